//! `loadtest aggregate`: an aggregate of three parallel steps against three loopback origins
//! answering 1 KiB of JSON, beside the same three requests made through plain proxy routes.
//!
//! 1. Instant origins (nginx answering a fixed JSON body), saturating load: gateway CPU per
//!    aggregate request against gateway CPU per three proxied requests (wrk cycling over the
//!    three routes), for a dense and a text-heavy 1 KiB body.
//! 2. Origins answering after 5, 10 and 20 ms: the aggregate's saturated rate, then a run at
//!    about half of it (closed loop, with as many connections as that rate needs at the
//!    slowest step's latency) for p50 / p99, beside each proxied route at the same
//!    connection count (one after another, a client's three calls take the sum).
//!
//! The delayed origins are threads of this process (one per connection, pinned to the origin
//! CPUs); everything is on 127.0.0.1 only and every run is bounded by `--duration`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::procs::{self, Workdir};
use crate::wrk::{self, WrkResult};
use crate::Options;

/// Two kinds of 1 KiB JSON answer, keys prefixed with `k` so three of them never collide:
/// `dense`, an array of 38 small objects (numbers and short strings: the costliest to check
/// per byte), or text, a record with a few long string members (cheap per byte).
fn json_body(k: usize, dense: bool) -> Vec<u8> {
    if !dense {
        let text = "A sturdy desk lamp with a warm, even light and a heavy base. ".repeat(14);
        let s = format!(
            "{{\"s{k}_id\":{k},\"s{k}_name\":\"Desk lamp {k}\",\"s{k}_price\":39.5,\"s{k}_tags\":[\"lighting\",\"office\"],\"s{k}_description\":\"{}\"}}",
            &text[..text.len().min(880)]
        );
        return s.into_bytes();
    }
    let mut s = format!("{{\"s{k}_id\":{k},\"s{k}_items\":[");
    let mut i = 0;
    while s.len() < 1000 {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!("{{\"n\":{i},\"v\":\"value-{i:04}\"}}"));
        i += 1;
    }
    s.push_str("]}");
    s.into_bytes()
}

/// Pins the calling thread to the CPUs in `list` (`1`, `0,2`, `4-7`).
fn pin(list: &str) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity get
    // valid pointers to it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for part in list.split(',') {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            if let (Ok(a), Ok(b)) = (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                for c in a..=b {
                    libc::CPU_SET(c, &mut set);
                }
            }
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// An origin on 127.0.0.1 answering every request with `body` after `delay`; keep-alive,
/// one thread per connection. Stops accepting when `stop` is set.
fn origin(
    body: Vec<u8>,
    delay: Duration,
    cpus: String,
    stop: Arc<AtomicBool>,
) -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(&body);
    let response = Arc::new(response);
    thread::spawn(move || {
        pin(&cpus);
        for conn in l.incoming() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Ok(mut s) = conn else { continue };
            let (response, cpus) = (response.clone(), cpus.clone());
            thread::spawn(move || {
                pin(&cpus);
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
                let mut buf = vec![0u8; 16 * 1024];
                let mut have = 0;
                loop {
                    // Requests carry no body: each head ends at CRLF CRLF.
                    let end = loop {
                        if let Some(i) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        if have == buf.len() {
                            return;
                        }
                        match s.read(&mut buf[have..]) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => have += n,
                        }
                    };
                    buf.copy_within(end..have, 0);
                    have -= end;
                    if !delay.is_zero() {
                        thread::sleep(delay);
                    }
                    if s.write_all(&response).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

fn config(port: u16, admin_port: u16, workers: usize, origins: &[SocketAddr]) -> String {
    let mut s = format!(
        "workers = {workers}\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n[upstream_pool]\nmax_idle_per_target = 4096\n\
         [tracing]\nrequest_id = false\ntraceparent = false\n\
         [admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{}\"\n\
         [[aggregates]]\nid = \"agg\"\ndeadline_ms = 5000\n",
        procs::ADMIN_TOKEN
    );
    for i in 0..origins.len() {
        s.push_str(&format!(
            "[[aggregates.steps]]\nid = \"s{i}\"\nupstream = \"o{i}\"\npath = \"/s{i}\"\n"
        ));
    }
    for (i, o) in origins.iter().enumerate() {
        s.push_str(&format!(
            "[[upstreams]]\nid = \"o{i}\"\ntargets = [{{ address = \"{o}\" }}]\n\
             [[routes]]\nid = \"s{i}\"\npath = \"/s{i}\"\nupstream = \"o{i}\"\n"
        ));
    }
    s.push_str("[[routes]]\nid = \"agg\"\npath = \"/agg\"\naggregate = \"agg\"\n");
    s
}

/// One wrk run with the gateway's CPU time over it; any error answer or socket error fails it.
fn measured(
    o: &Options,
    gw: &procs::Proc,
    connections: usize,
    script: Option<&Path>,
    path: &str,
) -> Result<(WrkResult, f64)> {
    let (r, cpu) = measured_lenient(o, gw, connections, script, path)?;
    if r.non_2xx > 0 || r.socket_errors > 0 {
        bail!(
            "{path}: {} non-2xx answers, {} socket errors",
            r.non_2xx,
            r.socket_errors
        );
    }
    Ok((r, cpu))
}

/// `--warmup` seconds of wrk on `path`, none for 0.
fn warm_up(o: &Options, gw: &procs::Proc, script: Option<&Path>, path: &str) -> Result<()> {
    if o.warmup > 0 {
        let url = format!("http://{}{path}", gw.addr);
        wrk::run_script(&o.wrk_cpus, o.connections, o.warmup, script, &url)
            .with_context(|| format!("warm-up on {path}"))?;
    }
    Ok(())
}

/// One wrk run with the gateway's CPU time over it.
fn measured_lenient(
    o: &Options,
    gw: &procs::Proc,
    connections: usize,
    script: Option<&Path>,
    path: &str,
) -> Result<(WrkResult, f64)> {
    let url = format!("http://{}{path}", gw.addr);
    let cpu0 = gw.cpu_seconds();
    let r = wrk::run_script(&o.wrk_cpus, connections, o.duration, script, &url)?;
    let cpu = gw.cpu_seconds() - cpu0;
    Ok((r, cpu))
}

fn start(
    o: &Options,
    gateway: &Path,
    dir: &Workdir,
    origins: &[SocketAddr],
    tag: &str,
) -> Result<procs::Proc> {
    let port = procs::free_port()?;
    let admin_port = procs::free_port()?;
    let conf = dir.file(&format!("{tag}.toml"));
    std::fs::write(&conf, config(port, admin_port, o.workers, origins))?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let gw = procs::start_gateway(
        dir,
        gateway,
        &o.proxy_cpus,
        tag,
        &conf,
        addr,
        admin_port,
        None,
    )?;
    // The aggregate answers with all three steps merged.
    let (status, body) = crate::http_get(gw.addr, "/agg")?;
    let text = String::from_utf8_lossy(&body);
    if status != 200 || !(0..3).all(|k| text.contains(&format!("\"s{k}_id\":{k}"))) {
        bail!("the aggregate answered {status}: {text}");
    }
    Ok(gw)
}

/// Part 1 for one kind of body: a table of the repetitions and the median CPU ratio.
fn instant(
    o: &Options,
    gateway: &Path,
    dir: &Workdir,
    script: &Path,
    dense: bool,
) -> Result<String> {
    let kind = if dense { "dense" } else { "text" };
    let bodies: Vec<Vec<u8>> = (0..3).map(|k| json_body(k, dense)).collect();
    let (_nginx, origins) = procs::start_json_origins(dir, &bodies, &o.origin_cpus)?;
    let gw = start(
        o,
        gateway,
        dir,
        &origins,
        &format!("gateway-instant-{kind}"),
    )?;
    let c = o.connections;
    warm_up(o, &gw, None, "/agg")?;
    warm_up(o, &gw, Some(script), "/s0")?;
    let mut out = format!(
        "| instant origins, 1 KiB {kind} JSON | requests/s | p50 | p99 | gateway CPU µs per aggregate or per 3 proxied |\n| --- | --- | --- | --- | --- |\n"
    );
    let mut agg_cost = Vec::new();
    let mut three_cost = Vec::new();
    for rep in 0..o.reps {
        let (a, a_cpu) = measured(o, &gw, c, None, "/agg")?;
        let (p, p_cpu) = measured(o, &gw, c, Some(script), "/s0")?;
        let per_agg = a_cpu / a.requests as f64 * 1e6;
        let per_three = p_cpu / p.requests as f64 * 3.0 * 1e6;
        agg_cost.push(per_agg);
        three_cost.push(per_three);
        out.push_str(&format!(
            "| rep {rep}: aggregate of 3 | {:.0} | {:.2} ms | {:.2} ms | {per_agg:.1} |\n| rep {rep}: 3 proxied requests | {:.0} (÷3: {:.0}) | {:.2} ms | {:.2} ms | {per_three:.1} |\n",
            a.rps, a.p50_us / 1e3, a.p99_us / 1e3, p.rps, p.rps / 3.0, p.p50_us / 1e3, p.p99_us / 1e3
        ));
    }
    out.push_str(&format!(
        "\n{kind} JSON, median gateway CPU: {:.1} µs per aggregate, {:.1} µs per 3 proxied requests (ratio {:.2})\n\n",
        median(&agg_cost),
        median(&three_cost),
        median(&agg_cost) / median(&three_cost)
    ));
    Ok(out)
}

/// Runs both parts and prints their tables.
pub fn run(o: &Options, gateway: &Path) -> Result<()> {
    let dir = Workdir(o.out.join("aggregate"));
    // Each run starts its gateways on fresh data directories.
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0)?;
    let script = dir.file("three.lua");
    std::fs::write(
        &script,
        "local paths = {\"/s0\", \"/s1\", \"/s2\"}\nlocal i = 0\n\
         request = function()\n  i = i % 3 + 1\n  return wrk.format(\"GET\", paths[i])\nend\n",
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut out = String::new();

    // 1. Instant origins: CPU per aggregate against CPU per three proxied requests.
    for dense in [true, false] {
        let part = instant(o, gateway, &dir, &script, dense)?;
        println!("{part}");
        out.push_str(&part);
    }

    // 2. Origins after 5, 10, 20 ms: latency at about half the saturated rate.
    let delayed: Vec<SocketAddr> = [5u64, 10, 20]
        .iter()
        .enumerate()
        .map(|(k, &ms)| {
            origin(
                json_body(k, true),
                Duration::from_millis(ms),
                o.origin_cpus.clone(),
                stop.clone(),
            )
        })
        .collect::<Result<_>>()?;
    let gw = start(o, gateway, &dir, &delayed, "gateway-delayed")?;
    warm_up(o, &gw, None, "/agg")?;
    // The saturation probe: wrk's 2 s timeouts may fire on a queue this deep; they are
    // reported, and the rate counts completed requests only.
    let saturating = 600;
    let (sat, _) = measured_lenient(o, &gw, saturating, None, "/agg")?;
    if sat.non_2xx > 0 {
        bail!("/agg answered {} non-2xx under saturation", sat.non_2xx);
    }
    let half = sat.rps / 2.0;
    // Closed loop: each connection completes about 1 / 20.5 ms requests per second.
    let conns = ((half * 0.0205).round() as usize).max(1);
    out.push_str(&format!(
        "origins after 5, 10, 20 ms: saturated at {:.0} aggregates/s ({saturating} connections, {} socket errors); at about half ({conns} connections):\n\n",
        sat.rps, sat.socket_errors
    ));
    out.push_str(
        "| origins after 5/10/20 ms | requests/s | p50 | p99 |\n| --- | --- | --- | --- |\n",
    );
    for rep in 0..o.reps {
        let (a, _) = measured(o, &gw, conns, None, "/agg")?;
        let mut p50_sum = 0.0;
        let mut p99_sum = 0.0;
        let mut slowest = WrkResult::default();
        for k in 0..3 {
            let (p, _) = measured(o, &gw, conns, None, &format!("/s{k}"))?;
            p50_sum += p.p50_us;
            p99_sum += p.p99_us;
            slowest = p;
        }
        out.push_str(&format!(
            "| rep {rep}: aggregate of 3 | {:.0} | {:.2} ms | {:.2} ms |\n| rep {rep}: the 20 ms route alone | {:.0} | {:.2} ms | {:.2} ms |\n| rep {rep}: 3 proxied, one after another (sum) | — | {:.2} ms | {:.2} ms |\n",
            a.rps,
            a.p50_us / 1e3,
            a.p99_us / 1e3,
            slowest.rps,
            slowest.p50_us / 1e3,
            slowest.p99_us / 1e3,
            p50_sum / 1e3,
            p99_sum / 1e3
        ));
    }
    stop.store(true, Ordering::Relaxed);
    drop(gw);
    println!("{}", &out[out.find("origins after").unwrap_or(0)..]);
    let table = o.out.join("aggregate.md");
    std::fs::write(&table, &out).with_context(|| format!("writing {}", table.display()))?;
    println!("wrote {}", table.display());
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    crate::report::median(v.to_vec())
}
