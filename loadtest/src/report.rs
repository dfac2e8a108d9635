//! Medians over repetitions, the comparison table (markdown), CSV and an SVG chart.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use crate::wrk::WrkResult;

/// One measured run.
#[derive(Debug, Clone)]
pub struct Sample {
    pub proxy: String,
    pub body: String,
    pub rep: usize,
    pub wrk: WrkResult,
    /// CPU seconds the proxy used during the run (0 for the origin-direct baseline).
    pub cpu_s: f64,
}

impl Sample {
    pub fn per_cpu_second(&self) -> f64 {
        if self.cpu_s > 0.0 {
            self.wrk.requests as f64 / self.cpu_s
        } else {
            0.0
        }
    }
}

/// Medians of one proxy and body size.
#[derive(Debug, Clone)]
pub struct Summary {
    pub proxy: String,
    pub body: String,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub cpu_s: f64,
    pub per_cpu_s: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Groups samples by (proxy, body) in first-seen order and takes medians.
pub fn summarize(samples: &[Sample]) -> Vec<Summary> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for s in samples {
        let k = (s.proxy.clone(), s.body.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(proxy, body)| {
            let runs: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.proxy == proxy && s.body == body)
                .collect();
            Summary {
                rps: median(runs.iter().map(|s| s.wrk.rps).collect()),
                p50_us: median(runs.iter().map(|s| s.wrk.p50_us).collect()),
                p99_us: median(runs.iter().map(|s| s.wrk.p99_us).collect()),
                cpu_s: median(runs.iter().map(|s| s.cpu_s).collect()),
                per_cpu_s: median(runs.iter().map(|s| s.per_cpu_second()).collect()),
                non_2xx: runs.iter().map(|s| s.wrk.non_2xx).sum(),
                socket_errors: runs.iter().map(|s| s.wrk.socket_errors).sum(),
                proxy,
                body,
            }
        })
        .collect()
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

/// The comparison table in markdown, each proxy's figures beside the ratio to nginx's.
pub fn table(summaries: &[Summary]) -> String {
    let mut out = String::from(
        "| body | proxy | req/s | p50 | p99 | proxy CPU-s | req per proxy CPU-s | req/s vs nginx | p50 vs nginx | p99 vs nginx | CPU-s vs nginx | req/CPU-s vs nginx | non-2xx | socket errors |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for s in summaries {
        let nginx = summaries
            .iter()
            .find(|n| n.proxy == "nginx" && n.body == s.body);
        let dash = || "-".to_owned();
        let [r_rps, r_p50, r_p99, r_cpu_s, r_cpu] = match nginx {
            Some(n) if s.proxy != "origin-direct" => [
                ratio(s.rps, n.rps),
                ratio(s.p50_us, n.p50_us),
                ratio(s.p99_us, n.p99_us),
                ratio(s.cpu_s, n.cpu_s),
                ratio(s.per_cpu_s, n.per_cpu_s),
            ],
            _ => [dash(), dash(), dash(), dash(), dash()],
        };
        let per_cpu = if s.per_cpu_s > 0.0 {
            format!("{:.0}", s.per_cpu_s)
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.body,
            s.proxy,
            s.rps,
            fmt_us(s.p50_us),
            fmt_us(s.p99_us),
            s.cpu_s,
            per_cpu,
            r_rps,
            r_p50,
            r_p99,
            r_cpu_s,
            r_cpu,
            s.non_2xx,
            s.socket_errors
        );
    }
    out
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// Reads back a CSV written by [`write_csv`].
pub fn read_csv(path: &Path) -> Result<Vec<Sample>> {
    let text = std::fs::read_to_string(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let bad = || anyhow::anyhow!("{}:{}: malformed line {line:?}", path.display(), i + 1);
        if f.len() != 12 {
            return Err(bad());
        }
        let num = |k: usize| f[k].parse::<f64>().map_err(|_| bad());
        out.push(Sample {
            proxy: f[0].to_owned(),
            body: f[1].to_owned(),
            rep: num(2)? as usize,
            wrk: WrkResult {
                requests: num(3)? as u64,
                seconds: num(4)?,
                rps: num(5)?,
                p50_us: num(6)?,
                p99_us: num(7)?,
                non_2xx: num(10)? as u64,
                socket_errors: num(11)? as u64,
            },
            cpu_s: num(8)?,
        });
    }
    Ok(out)
}

/// Every run, one line each.
pub fn write_csv(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut out = String::from(
        "proxy,body,rep,requests,seconds,rps,p50_us,p99_us,proxy_cpu_s,req_per_cpu_s,non_2xx,socket_errors\n",
    );
    for s in samples {
        let _ = writeln!(
            out,
            "{},{},{},{},{:.2},{:.1},{:.1},{:.1},{:.3},{:.0},{},{}",
            s.proxy,
            s.body,
            s.rep,
            s.wrk.requests,
            s.wrk.seconds,
            s.wrk.rps,
            s.wrk.p50_us,
            s.wrk.p99_us,
            s.cpu_s,
            s.per_cpu_second(),
            s.wrk.non_2xx,
            s.wrk.socket_errors
        );
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// Grouped bars: requests per proxy CPU-second, one group per body size, one bar per proxy.
pub fn write_svg(path: &Path, summaries: &[Summary], title: &str) -> Result<()> {
    let proxies: Vec<String> = dedup(
        summaries
            .iter()
            .filter(|s| s.per_cpu_s > 0.0)
            .map(|s| s.proxy.clone()),
    );
    let bodies: Vec<String> = dedup(summaries.iter().map(|s| s.body.clone()));
    let max = summaries.iter().map(|s| s.per_cpu_s).fold(0.0, f64::max) * 1.15;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let slots = (bodies.len() * (proxies.len() + 1)) as u32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0u32..slots.max(1), 0f64..max.max(1.0))?;
    let body_names = bodies.clone();
    let group = proxies.len() as u32 + 1;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(slots as usize)
        .x_label_formatter(&|x| {
            let g = (*x / group) as usize;
            if *x % group == group / 2 {
                body_names.get(g).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("requests per proxy CPU-second")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    let colours = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
    ];
    for (pi, proxy) in proxies.iter().enumerate() {
        let colour = colours[pi % colours.len()];
        let bars: Vec<Rectangle<(u32, f64)>> = bodies
            .iter()
            .enumerate()
            .filter_map(|(bi, body)| {
                let s = summaries
                    .iter()
                    .find(|s| &s.proxy == proxy && &s.body == body)?;
                let x = bi as u32 * group + pi as u32;
                Some(Rectangle::new(
                    [(x, 0.0), (x + 1, s.per_cpu_s)],
                    colour.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)?
            .label(proxy.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn dedup(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}
