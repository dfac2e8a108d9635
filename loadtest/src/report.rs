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
    /// CPU seconds the origin used during the run (0 where not measured: CSVs from before
    /// it was).
    pub origin_cpu_s: f64,
}

impl Sample {
    pub fn per_cpu_second(&self) -> f64 {
        if self.cpu_s > 0.0 {
            self.wrk.requests as f64 / self.cpu_s
        } else {
            0.0
        }
    }

    /// Requests per CPU-second of the proxy and the origin together: robust to softirq work
    /// (the loopback's receive path) being charged to whichever of the two happens to run.
    pub fn per_pair_cpu_second(&self) -> f64 {
        if self.cpu_s > 0.0 && self.origin_cpu_s > 0.0 {
            self.wrk.requests as f64 / (self.cpu_s + self.origin_cpu_s)
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
    /// Requests per (proxy + origin) CPU-second; 0 where the origin was not measured.
    pub per_pair_cpu_s: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Rows compared repetition by repetition when both ran: (row, against). The two run close
/// together in each repetition, so a slow stretch of the machine touches both, and the
/// median of their per-repetition ratios is steadier than the ratio of their medians.
pub const PAIRS: [(&str, &str); 4] = [
    ("gateway", "gateway-baseline"),
    ("gateway+log", "gateway"),
    ("gateway-baseline+log", "gateway-baseline"),
    ("gateway+log", "gateway-baseline+log"),
];

/// One row's requests per proxy CPU-second against another's, repetition by repetition.
#[derive(Debug, Clone, PartialEq)]
pub struct Paired {
    /// Median, lowest and highest of `row / against - 1` over the repetitions.
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Repetitions where `row` served more per CPU-second.
    pub ahead: usize,
    pub reps: usize,
}

/// `figure` of `row` and of `against` at `body`, for each repetition where both have a
/// positive one.
fn by_repetition(
    samples: &[Sample],
    body: &str,
    row: &str,
    against: &str,
    figure: impl Fn(&Sample) -> f64,
) -> Vec<(f64, f64)> {
    let per_rep = |proxy: &str| {
        samples
            .iter()
            .filter(|s| s.body == body && s.proxy == proxy && figure(s) > 0.0)
            .map(|s| (s.rep, figure(s)))
            .collect::<Vec<_>>()
    };
    let theirs = per_rep(against);
    per_rep(row)
        .into_iter()
        .filter_map(|(rep, mine)| {
            let (_, other) = theirs.iter().find(|(r, _)| *r == rep)?;
            Some((mine, *other))
        })
        .collect()
}

/// `row` against `against` at `body`, over the repetitions where both have a figure.
pub fn paired(samples: &[Sample], body: &str, row: &str, against: &str) -> Option<Paired> {
    let changes: Vec<f64> = by_repetition(samples, body, row, against, Sample::per_cpu_second)
        .into_iter()
        .map(|(mine, other)| mine / other - 1.0)
        .collect();
    if changes.is_empty() {
        return None;
    }
    Some(Paired {
        median: median(changes.clone()),
        min: changes.iter().copied().fold(f64::INFINITY, f64::min),
        max: changes.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        ahead: changes.iter().filter(|&&c| c > 0.0).count(),
        reps: changes.len(),
    })
}

/// A warning per row (body size and proxy) whose runs had non-2xx answers or socket errors:
/// their requests per second and per CPU-second count failed answers (a cheap 502 or 401 is
/// counted as served), so neither they nor the ratios against them compare with clean rows.
pub fn error_warnings(samples: &[Sample]) -> String {
    let mut out = String::new();
    let bodies = dedup(samples.iter().map(|s| s.body.clone()));
    let proxies = dedup(samples.iter().map(|s| s.proxy.clone()));
    for body in &bodies {
        for proxy in &proxies {
            let row = samples
                .iter()
                .filter(|s| &s.body == body && &s.proxy == proxy);
            let (non_2xx, errors) = row.fold((0u64, 0u64), |(n, e), s| {
                (n + s.wrk.non_2xx, e + s.wrk.socket_errors)
            });
            if non_2xx + errors > 0 {
                out.push_str(&format!(
                    "WARNING {body} {proxy}: {non_2xx} non-2xx answers and {errors} socket \
                     errors over its runs: its figures count failed answers as served, and \
                     do not compare with the other rows'\n"
                ));
            }
        }
    }
    out
}

/// A line per [`PAIRS`] entry and body size that the samples have both rows of, e.g.
/// `13b: gateway+log vs gateway, paired by repetition: median -0.8% (-4.3% to +3.9%), ahead
/// in 2 of 7`.
pub fn paired_lines(samples: &[Sample]) -> String {
    let bodies = dedup(samples.iter().map(|s| s.body.clone()));
    let mut out = String::new();
    for (row, against) in PAIRS {
        for body in &bodies {
            if let Some(p) = paired(samples, body, row, against) {
                out.push_str(&format!(
                    "{body}: {row} vs {against}, paired by repetition: median {:+.1}% \
                     ({:+.1}% to {:+.1}%), ahead in {} of {}\n",
                    p.median * 100.0,
                    p.min * 100.0,
                    p.max * 100.0,
                    p.ahead,
                    p.reps
                ));
            }
        }
    }
    out
}

/// A line per body size where both rows ran, saying in how many repetitions `row`'s p99 was
/// below `against`'s, e.g. `h2-13b-paced: gateway's p99 below nginx's in 2 of 5
/// repetitions`. (A target of "lower p99" read from medians alone hides how often it held.)
pub fn p99_lines(samples: &[Sample], row: &str, against: &str) -> String {
    let mut out = String::new();
    for body in dedup(samples.iter().map(|s| s.body.clone())) {
        let reps = by_repetition(samples, &body, row, against, |s| s.wrk.p99_us);
        if reps.is_empty() {
            continue;
        }
        let below = reps.iter().filter(|(mine, other)| mine < other).count();
        out.push_str(&format!(
            "{body}: {row}'s p99 below {against}'s in {below} of {} repetitions\n",
            reps.len()
        ));
    }
    out
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
                per_pair_cpu_s: median(runs.iter().map(|s| s.per_pair_cpu_second()).collect()),
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

/// Whether a row is a peer the gateway is measured against: another HTTP proxy (not a
/// gateway build, not the origin alone, not the L4 relay, which does no HTTP).
pub fn is_peer(proxy: &str) -> bool {
    !proxy.starts_with("gateway") && proxy != "origin-direct" && proxy != "l4-relay"
}

/// The best peer's value of one figure in a body size's rows: the largest where more is
/// better, the smallest otherwise; `None` without a peer that has it.
fn best_peer(
    summaries: &[Summary],
    body: &str,
    figure: impl Fn(&Summary) -> f64,
    more_is_better: bool,
) -> Option<f64> {
    summaries
        .iter()
        .filter(|p| p.body == body && is_peer(&p.proxy))
        .map(figure)
        .filter(|v| *v > 0.0)
        .reduce(|a, b| if (b > a) == more_is_better { b } else { a })
}

/// The comparison table in markdown: each row's figures beside their ratio to the best
/// peer's in its body size, figure by figure (the most requests per second and per
/// CPU-second, the lowest p50 and p99, each from whichever peer has it); the peer with the
/// most requests per proxy CPU-second is named.
pub fn table(summaries: &[Summary]) -> String {
    let mut out = String::from(
        "| body | proxy | req/s | p50 | p99 | proxy CPU-s | req per proxy CPU-s | req per (proxy + origin) CPU-s | best peer | req/s vs best | p50 vs best | p99 vs best | req/CPU-s vs best | req/(proxy + origin) CPU-s vs best | non-2xx | socket errors |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let dash = || "-".to_owned();
    let count = |v: f64| {
        if v > 0.0 {
            format!("{v:.0}")
        } else {
            dash()
        }
    };
    for s in summaries {
        let vs = |figure: fn(&Summary) -> f64, more_is_better: bool| {
            if s.proxy == "origin-direct" {
                return dash();
            }
            match best_peer(summaries, &s.body, figure, more_is_better) {
                Some(best) => ratio(figure(s), best),
                None => dash(),
            }
        };
        let named = if s.proxy == "origin-direct" {
            dash()
        } else {
            summaries
                .iter()
                .filter(|p| p.body == s.body && is_peer(&p.proxy))
                .max_by(|a, b| a.per_cpu_s.total_cmp(&b.per_cpu_s))
                .map_or_else(dash, |p| p.proxy.clone())
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.body,
            s.proxy,
            s.rps,
            fmt_us(s.p50_us),
            fmt_us(s.p99_us),
            s.cpu_s,
            count(s.per_cpu_s),
            count(s.per_pair_cpu_s),
            named,
            vs(|x| x.rps, true),
            vs(|x| x.p50_us, false),
            vs(|x| x.p99_us, false),
            vs(|x| x.per_cpu_s, true),
            vs(|x| x.per_pair_cpu_s, true),
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
        // 13 fields since the origin's CPU is measured; 12 before.
        if f.len() != 12 && f.len() != 13 {
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
            origin_cpu_s: if f.len() == 13 { num(12)? } else { 0.0 },
        });
    }
    Ok(out)
}

/// Every run, one line each.
pub fn write_csv(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut out = String::from(
        "proxy,body,rep,requests,seconds,rps,p50_us,p99_us,proxy_cpu_s,req_per_cpu_s,non_2xx,socket_errors,origin_cpu_s\n",
    );
    for s in samples {
        let _ = writeln!(
            out,
            // CPU seconds to the nanosecond: `report` recomputes the table from them.
            "{},{},{},{},{:.2},{:.1},{:.1},{:.1},{:.9},{:.0},{},{},{:.9}",
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
            s.wrk.socket_errors,
            s.origin_cpu_s
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
    // One per row of the default `--proxies` and more (Tableau's ten): two rows sharing a
    // colour could not be told apart.
    let colours = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(proxy: &str, body: &str, rps: f64, p99: f64, per_cpu: f64, pair: f64) -> Summary {
        Summary {
            proxy: proxy.into(),
            body: body.into(),
            rps,
            p50_us: p99 / 2.0,
            p99_us: p99,
            cpu_s: 1.0,
            per_cpu_s: per_cpu,
            per_pair_cpu_s: pair,
            non_2xx: 0,
            socket_errors: 0,
        }
    }

    /// The cells of `proxy`'s row for `body`.
    fn row(table: &str, body: &str, proxy: &str) -> Vec<String> {
        table
            .lines()
            .map(|l| {
                l.split('|')
                    .map(|c| c.trim().to_owned())
                    .collect::<Vec<_>>()
            })
            .find(|c| c.len() > 3 && c[1] == body && c[2] == proxy)
            .unwrap_or_else(|| panic!("no row {body} {proxy} in\n{table}"))
    }

    #[test]
    fn ratios_are_to_the_best_peer_figure_by_figure() {
        let s = vec![
            summary("origin-direct", "64k", 90.0, 100.0, 0.0, 0.0),
            summary("gateway", "64k", 60.0, 1500.0, 300.0, 120.0),
            summary("nginx", "64k", 50.0, 2000.0, 100.0, 60.0),
            // The tuned nginx is the best peer per CPU-second; HAProxy has the lowest p99
            // and the most per (proxy + origin) CPU-second.
            summary("nginx+buf64k", "64k", 40.0, 3000.0, 200.0, 70.0),
            summary("haproxy", "64k", 45.0, 1000.0, 150.0, 80.0),
            // Not a peer, however fast.
            summary("l4-relay", "64k", 80.0, 500.0, 600.0, 300.0),
            summary("gateway", "13b", 10.0, 100.0, 10.0, 5.0),
        ];
        let t = table(&s);
        let g = row(&t, "64k", "gateway");
        // body proxy req/s p50 p99 cpu per-cpu pair best rps-vs p50-vs p99-vs cpu-vs pair-vs
        assert_eq!(g[9], "nginx+buf64k");
        assert_eq!(&g[10..15], ["1.20", "1.50", "1.50", "1.50", "1.50"]);
        // A body size without peers has no ratios; the origin alone has none either.
        let g13 = row(&t, "13b", "gateway");
        assert_eq!(&g13[9..15], ["-", "-", "-", "-", "-", "-"]);
        assert_eq!(
            &row(&t, "64k", "origin-direct")[10..15],
            ["-", "-", "-", "-", "-"]
        );
        assert!(!is_peer("l4-relay") && !is_peer("gateway-baseline") && is_peer("haproxy+buf64k"));
    }

    fn sample(proxy: &str, body: &str, rep: usize, requests: u64, cpu_s: f64) -> Sample {
        Sample {
            proxy: proxy.into(),
            body: body.into(),
            rep,
            wrk: WrkResult {
                requests,
                seconds: 1.0,
                rps: requests as f64,
                p50_us: 10.0,
                p99_us: 20.0,
                non_2xx: 0,
                socket_errors: 0,
            },
            cpu_s,
            origin_cpu_s: 0.0,
        }
    }

    #[test]
    fn rows_are_compared_repetition_by_repetition() {
        // The machine slows down in repetition 1 for both rows: the ratio of medians says
        // the log costs nothing, each repetition says it costs 5% or 10%.
        let s = vec![
            sample("gateway", "13b", 0, 1000, 1.0),
            sample("gateway+log", "13b", 0, 950, 1.0),
            sample("gateway", "13b", 1, 600, 1.0),
            sample("gateway+log", "13b", 1, 540, 1.0),
            sample("gateway", "13b", 2, 1100, 1.0),
            sample("gateway+log", "13b", 2, 1045, 1.0),
            // A repetition only one row has is left out.
            sample("gateway+log", "13b", 3, 2000, 1.0),
        ];
        let p = paired(&s, "13b", "gateway+log", "gateway").unwrap();
        assert_eq!((p.reps, p.ahead), (3, 0));
        assert!((p.median + 0.05).abs() < 1e-9, "{p:?}");
        assert!(
            (p.min + 0.10).abs() < 1e-9 && (p.max + 0.05).abs() < 1e-9,
            "{p:?}"
        );
        assert!(paired(&s, "4k", "gateway+log", "gateway").is_none());
        assert!(paired(&s, "13b", "gateway", "gateway-baseline").is_none());
        assert_eq!(
            paired_lines(&s),
            "13b: gateway+log vs gateway, paired by repetition: median -5.0% (-10.0% to -5.0%), \
             ahead in 0 of 3\n"
        );
    }

    #[test]
    fn report_renders_the_table_the_run_printed() {
        // CPU times with more digits than milliseconds: the CSV kept three, and `report`
        // recomputed per-CPU-second figures 0.1% off the live table's.
        let s = vec![
            sample("gateway", "13b", 0, 22_835, 0.409_375_512),
            sample("gateway", "13b", 1, 22_911, 0.408_826_104),
            sample("nginx", "13b", 0, 17_001, 0.437_619_873),
            sample("nginx", "13b", 1, 17_235, 0.440_003_991),
        ];
        let dir = std::env::temp_dir().join(format!("loadtest-csv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("r.csv");
        write_csv(&csv, &s).unwrap();
        let back = read_csv(&csv).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(table(&summarize(&back)), table(&summarize(&s)));
    }

    #[test]
    fn rows_with_failed_answers_are_named() {
        let mut failing = sample("nginx", "4k", 1, 1000, 1.0);
        failing.wrk.non_2xx = 7;
        let mut reset = sample("nginx", "4k", 2, 1000, 1.0);
        reset.wrk.socket_errors = 2;
        let s = vec![sample("gateway", "4k", 1, 1000, 1.0), failing, reset];
        assert_eq!(
            error_warnings(&s),
            "WARNING 4k nginx: 7 non-2xx answers and 2 socket errors over its runs: its \
             figures count failed answers as served, and do not compare with the other rows'\n"
        );
        assert_eq!(error_warnings(&s[..1]), "");
    }

    #[test]
    fn p99s_are_compared_repetition_by_repetition() {
        let with_p99 = |proxy: &str, body: &str, rep: usize, p99_us: f64| {
            let mut s = sample(proxy, body, rep, 1000, 1.0);
            s.wrk.p99_us = p99_us;
            s
        };
        let s = vec![
            with_p99("gateway", "h2-13b", 0, 900.0),
            with_p99("nginx", "h2-13b", 0, 1000.0),
            with_p99("gateway", "h2-13b", 1, 1200.0),
            with_p99("nginx", "h2-13b", 1, 1000.0),
            // Equal is not below; a repetition only one row has is left out.
            with_p99("gateway", "h2-13b", 2, 1000.0),
            with_p99("nginx", "h2-13b", 2, 1000.0),
            with_p99("gateway", "h2-13b", 3, 10.0),
            with_p99("gateway", "h1-13b", 0, 10.0),
            with_p99("nginx", "h1-13b", 0, 20.0),
        ];
        assert_eq!(
            p99_lines(&s, "gateway", "nginx"),
            "h2-13b: gateway's p99 below nginx's in 1 of 3 repetitions\n\
             h1-13b: gateway's p99 below nginx's in 1 of 1 repetitions\n"
        );
        assert_eq!(p99_lines(&s, "gateway", "haproxy"), "");
    }

    #[test]
    fn the_csv_keeps_the_origin_cpu_and_old_csvs_still_read() {
        let dir = std::env::temp_dir().join(format!("loadtest-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.csv");
        let sample = Sample {
            proxy: "gateway".into(),
            body: "13b".into(),
            rep: 0,
            wrk: WrkResult {
                requests: 1000,
                seconds: 1.0,
                rps: 1000.0,
                p50_us: 10.0,
                p99_us: 20.0,
                non_2xx: 0,
                socket_errors: 0,
            },
            cpu_s: 0.5,
            origin_cpu_s: 0.5,
        };
        write_csv(&path, &[sample]).unwrap();
        let back = read_csv(&path).unwrap();
        assert_eq!(back[0].origin_cpu_s, 0.5);
        assert_eq!(back[0].per_pair_cpu_second(), 1000.0);
        let old = "proxy,body,rep,requests,seconds,rps,p50_us,p99_us,proxy_cpu_s,req_per_cpu_s,non_2xx,socket_errors\n\
                   nginx,13b,0,1000,1.00,1000.0,10.0,20.0,0.500,2000,0,0\n";
        std::fs::write(&path, old).unwrap();
        let back = read_csv(&path).unwrap();
        assert_eq!(
            (back[0].origin_cpu_s, back[0].per_pair_cpu_second()),
            (0.0, 0.0)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
