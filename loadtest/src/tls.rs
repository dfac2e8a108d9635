//! `loadtest tls`: the gateway against nginx as TLS-terminating reverse proxies in front of
//! the same nginx origin, with the same certificate (ECDSA P-256, made by the openssl CLI),
//! TLS 1.2 and 1.3, and the client's choice of cipher suite on both:
//!
//! - `h1-13b`, `h1-64k`: HTTP/1.1 over TLS, keep-alive, wrk;
//! - `h2-13b`, `h2-64k`: HTTP/2 over TLS (ALPN), h2load with 10 streams per connection;
//! - `h2-13b-paced`, `h2-64k-paced`: the same at a fixed offered rate, half of what the
//!   slower proxy served in the saturated warm-up, the same for both, one stream at a time
//!   per connection: latency below saturation (at saturation h2load's own queue of 500
//!   streams sets the p99; paced with 10 streams per connection, its bursts of ten set it).
//!   h2load's pacing sends every connection's request at the same moment, so a paced
//!   request's latency includes draining that burst of one answer per connection;
//! - `handshake-full`: a new connection and a full handshake per request, four at a time,
//!   never resuming, 13-byte body, each timed from `connect` to the answer's last byte (the
//!   harness's own rustls client, `handshake.rs`; before 2026-12-04 `openssl s_time -new`,
//!   which gives no latency);
//! - `handshake-resumed`: a new connection per request that resumes the session (wrk with
//!   `Connection: close`: wrk resumes; both servers keep sessions, nginx with a shared
//!   session cache and tickets, the gateway with rustls's defaults). With `--connections`
//!   (50) connections wrk's one thread is the bottleneck (both proxies serve the same ~4,000
//!   handshakes per second, neither is busy all the time), so its latency is mostly wrk's
//!   own event loop: every `epoll_wait` returns every connection, and an answer waits for
//!   the loop to come round, about one pass over all 50 connections' handshakes;
//! - `handshake-resumed-4c`: the same with 4 connections, where the client is not the
//!   bottleneck, for the proxies' own latency.
//!
//! Requests per proxy CPU-second and p99 as in `compare`, interleaved, medians of `--reps`.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::handshake;
use crate::procs::{self, Proc, Workdir};
use crate::report::{self, Sample};
use crate::wrk::{self, WrkResult};
use crate::Options;

/// The rows: (label, URL path, how it is driven). A paced row follows the saturated row of
/// its path (its rate comes from that row's warm-up).
const CASES: [(&str, &str, Driver); 9] = [
    ("h1-13b", "/13b", Driver::Wrk),
    ("h1-64k", "/64k", Driver::Wrk),
    ("h2-13b", "/13b", Driver::H2load),
    ("h2-13b-paced", "/13b", Driver::H2loadPaced),
    ("h2-64k", "/64k", Driver::H2load),
    ("h2-64k-paced", "/64k", Driver::H2loadPaced),
    ("handshake-full", "/13b", Driver::Handshakes),
    ("handshake-resumed", "/13b", Driver::WrkClose),
    ("handshake-resumed-4c", "/13b", Driver::WrkCloseFew),
];

/// Refuses a row name `--rows` gives that is not one of [`CASES`].
pub fn check_rows(rows: &[String]) -> Result<()> {
    for row in rows {
        if !CASES.iter().any(|c| c.0 == row) {
            let known: Vec<&str> = CASES.iter().map(|c| c.0).collect();
            bail!("unknown tls row {row:?} (rows: {})", known.join(","));
        }
    }
    Ok(())
}

/// Connections of `handshake-resumed-4c`.
const FEW_CONNECTIONS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driver {
    Wrk,
    WrkClose,
    /// `WrkClose` with [`FEW_CONNECTIONS`] connections.
    WrkCloseFew,
    H2load,
    /// h2load at a fixed rate: half the slower proxy's saturated warm-up rate on the path.
    H2loadPaced,
    /// Full handshakes, [`handshake::CLIENTS`] at a time.
    Handshakes,
}

/// The paced rows' offered load, as a fraction of the slower proxy's saturated rate.
const PACED_FRACTION: f64 = 0.5;

pub fn run(opts: &Options, gateway: &Path) -> Result<()> {
    if opts.warmup == 0 {
        bail!("tls needs a warm-up (--warmup 1 or more): the paced rows' rate comes from it");
    }
    for tool in ["h2load", "openssl"] {
        if crate::which(tool).is_none() {
            bail!("{tool} is not installed: apt-get install nghttp2-client openssl");
        }
    }
    let chosen =
        |c: &(&str, &str, Driver)| opts.rows.is_empty() || opts.rows.iter().any(|r| r == c.0);
    let cases: Vec<_> = CASES.iter().filter(|c| chosen(c)).collect();
    // A paced row's rate comes from its path's saturated row's warm-up, chosen or not.
    let warm: Vec<_> = CASES
        .iter()
        .filter(|c| {
            chosen(c)
                || (c.2 == Driver::H2load
                    && cases
                        .iter()
                        .any(|p| p.2 == Driver::H2loadPaced && p.1 == c.1))
        })
        .collect();
    let dir = Workdir(opts.out.join("work-tls"));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0)?;
    let (cert, key) = (dir.file("cert.pem"), dir.file("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "30", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("openssl req")?;
    if !out.status.success() {
        bail!("openssl req: {}", String::from_utf8_lossy(&out.stderr));
    }
    let origin = procs::start_origin(&dir, opts.workers, &opts.origin_cpus)?;
    let gw = start_gateway(opts, &dir, gateway, "gateway-tls", origin.addr, &cert, &key)?;
    // `--baseline`: a second gateway build, interleaved with the others (an A/B).
    let baseline = match &opts.baseline {
        Some(bin) => Some(start_gateway(
            opts,
            &dir,
            bin,
            "gateway-baseline-tls",
            origin.addr,
            &cert,
            &key,
        )?),
        None => None,
    };
    let nginx = start_nginx(opts, &dir, origin.addr, &cert, &key)?;
    let mut proxies = vec![("gateway", &gw)];
    if let Some(b) = &baseline {
        proxies.push(("gateway-baseline", b));
    }
    proxies.push(("nginx", &nginx));
    // Each must answer with the origin's bytes over HTTP/1.1 and HTTP/2 before anything runs.
    for (name, p) in &proxies {
        for (body, len) in [("13b", 13usize), ("64k", 65536)] {
            for flag in ["--http1.1", "--http2"] {
                let out = Command::new("curl")
                    .args(["-sk", flag, "-w", "\n%{http_version}"])
                    .arg(format!("https://localhost:{}/{body}", p.addr.port()))
                    .output()
                    .context("curl")?;
                let text = out.stdout;
                let want = procs::body_bytes(len);
                let ok = text.len() > len && text[..len] == want[..];
                let version =
                    String::from_utf8_lossy(&text[text.len().min(len + 1)..]).into_owned();
                let want_version = if flag == "--http2" { "2" } else { "1.1" };
                if !ok || version != want_version {
                    bail!("{name} answered /{body} {flag} wrongly (HTTP version {version:?})");
                }
            }
        }
    }
    println!(
        "verified: every proxy returns the origin's bodies over HTTP/1.1 and HTTP/2 on TLS; wrk and h2load on CPUs {}, proxies on {}, origin on {}",
        opts.wrk_cpus, opts.proxy_cpus, opts.origin_cpus
    );
    let close_script = dir.file("close.lua");
    std::fs::write(&close_script, "wrk.headers[\"Connection\"] = \"close\"\n")?;
    // Requests per second per h2load client for each paced path, set by the warm-up.
    let paced = std::cell::RefCell::new(std::collections::HashMap::<&str, u64>::new());
    let drive = |case: &(&str, &str, Driver), p: &Proc, seconds: u64| -> Result<WrkResult> {
        let url = format!("https://localhost:{}{}", p.addr.port(), case.1);
        match case.2 {
            Driver::Wrk => wrk::run(&opts.wrk_cpus, 1, opts.connections, seconds, &url),
            Driver::H2loadPaced => {
                let rps = paced.borrow().get(case.1).copied();
                let rps = rps.context("a paced row needs its path's saturated row first")?;
                h2load(
                    &opts.wrk_cpus,
                    opts.connections,
                    seconds,
                    &url,
                    &dir,
                    Some(rps),
                )
            }
            Driver::WrkClose | Driver::WrkCloseFew => wrk::run_script(
                &opts.wrk_cpus,
                if case.2 == Driver::WrkClose {
                    opts.connections
                } else {
                    FEW_CONNECTIONS
                },
                seconds,
                Some(&close_script),
                &url,
            ),
            Driver::H2load => h2load(&opts.wrk_cpus, opts.connections, seconds, &url, &dir, None),
            Driver::Handshakes => handshake::drive(&opts.wrk_cpus, p.addr, seconds, case.1),
        }
    };
    for case in warm {
        let mut slowest = f64::INFINITY;
        for (_, p) in &proxies {
            let w = drive(case, p, opts.warmup)?;
            slowest = slowest.min(w.rps);
        }
        if case.2 == Driver::H2load {
            let per_client = slowest * PACED_FRACTION / opts.connections as f64;
            let per_client = (per_client as u64).max(1);
            println!(
                "paced {}: {} requests/s offered ({per_client} per connection, {PACED_FRACTION} of the slower proxy's {slowest:.0})",
                case.1,
                per_client * opts.connections as u64
            );
            paced.borrow_mut().insert(case.1, per_client);
        }
    }
    let mut samples = Vec::new();
    println!(
        "order seed: {} (--seed to run again in this order)",
        opts.seed
    );
    let clock = crate::cpu_clocks(&origin, proxies.iter().map(|(_, p)| *p));
    println!("CPU time read from: {clock}");
    if let Some(note) = crate::unmirrored(opts.reps) {
        println!("{note}");
    }
    for rep in 0..opts.reps {
        for case in &cases {
            let order = crate::run_order(proxies.len(), rep, opts.seed).into_iter();
            for (name, p) in order.map(|i| proxies[i]) {
                let before = p.cpu_seconds();
                let origin_before = origin.cpu_seconds();
                let w = drive(case, p, opts.duration)?;
                let cpu_s = p.cpu_seconds() - before;
                let origin_cpu_s = origin.cpu_seconds() - origin_before;
                println!(
                    "rep {rep} {:>9} {name:<8} {:>9.0} req/s  p99 {:>8.0} µs  cpu {:.2} s  {:>7.0} req/cpu-s  non-2xx {} errors {}",
                    case.0,
                    w.rps,
                    w.p99_us,
                    cpu_s,
                    if cpu_s > 0.0 { w.requests as f64 / cpu_s } else { 0.0 },
                    w.non_2xx,
                    w.socket_errors
                );
                samples.push(Sample {
                    proxy: name.to_owned(),
                    body: case.0.to_owned(),
                    rep,
                    wrk: w,
                    cpu_s,
                    origin_cpu_s,
                });
            }
        }
    }
    let summaries = report::summarize(&samples);
    let table = report::table(&summaries);
    println!("\n{table}");
    // Issue 13's targets are per row against nginx, with a lower p99: how often it was lower,
    // and the gateway against `--baseline` repetition by repetition; rows with failed answers
    // first.
    let warnings = report::error_warnings(&samples);
    let lines = format!(
        "{warnings}{}{}",
        report::p99_lines(&samples, "gateway", "nginx"),
        report::paired_lines(&samples)
    );
    println!("{lines}");
    let csv = opts.out.join("tls.csv");
    report::write_csv(&csv, &samples)?;
    let md = format!(
        "machine: {}\n\nCPU time read from: {clock}\n\nTLS: same ECDSA P-256 certificate, TLS 1.2 and 1.3, client-chosen suites. `handshake-full`: one full handshake per request (the harness's rustls client, 4 at a time, no resumption; latency from connect to the answer's last byte); `handshake-resumed`: one resumed handshake per request (wrk, Connection: close; `-4c`: 4 connections, the client below saturation).\n\n{table}\n{lines}",
        crate::machine()
    );
    std::fs::write(opts.out.join("tls.md"), md)?;
    println!(
        "wrote {} and {}",
        csv.display(),
        opts.out.join("tls.md").display()
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn start_gateway(
    opts: &Options,
    dir: &Workdir,
    bin: &Path,
    name: &str,
    origin: std::net::SocketAddr,
    cert: &Path,
    key: &Path,
) -> Result<Proc> {
    let port = procs::free_port()?;
    let admin_port = procs::free_port()?;
    let text = procs::gateway_config(
        port,
        admin_port,
        opts.workers,
        origin,
        false,
        None,
        None,
        None,
    )
    .replacen(
        &format!("address = \"127.0.0.1:{port}\"\n"),
        &format!("address = \"127.0.0.1:{port}\"\ntls = {{ certificates = [\"local\"] }}\n"),
        1,
    );
    let text = format!(
        "{text}[[certificates]]\nid = \"local\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let conf = dir.file(&format!("{name}.toml"));
    std::fs::write(&conf, text)?;
    let addr = format!("127.0.0.1:{port}").parse()?;
    procs::start_gateway(
        dir,
        bin,
        &opts.proxy_cpus,
        name,
        &conf,
        addr,
        admin_port,
        None,
    )
}

/// nginx as Debian 12 packages it (1.22): `listen ... ssl http2`.
fn start_nginx(
    opts: &Options,
    dir: &Workdir,
    origin: std::net::SocketAddr,
    cert: &Path,
    key: &Path,
) -> Result<Proc> {
    let port = procs::free_port()?;
    let conf = format!(
        "worker_processes {workers};\ndaemon off;\nmaster_process on;\nworker_rlimit_nofile 65536;\n\
         error_log {err} warn;\npid {pid};\nevents {{ worker_connections 30000; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 120s;\n\
           client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n\
           ssl_protocols TLSv1.2 TLSv1.3;\n  ssl_certificate {cert};\n  ssl_certificate_key {key};\n\
           ssl_session_cache shared:SSL:10m;\n  ssl_session_tickets on;\n\
           upstream origin {{\n    server {origin};\n    keepalive 1024;\n    keepalive_requests 10000000;\n  }}\n\
           server {{\n    listen 127.0.0.1:{port} ssl http2 reuseport;\n    location / {{\n      proxy_pass http://origin;\n\
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
        workers = opts.workers,
        err = dir.file("nginx-tls.err").display(),
        pid = dir.file("nginx-tls.pid").display(),
        tmp = dir.file("tmp").display(),
        cert = cert.display(),
        key = key.display(),
    );
    procs::start_nginx(dir, "nginx-tls", &conf, port, &opts.proxy_cpus)
}

/// Runs h2load for `seconds` (`-D`) with 10 streams per connection, one thread, as fast as
/// it can, or at `rps` requests per second per connection one stream at a time; the p99
/// comes from its per-request log.
fn h2load(
    cpus: &str,
    connections: usize,
    seconds: u64,
    url: &str,
    dir: &Workdir,
    rps: Option<u64>,
) -> Result<WrkResult> {
    let log = dir.file("h2load-requests.log");
    // h2load appends to its log: without this, each run's percentiles would include every
    // earlier run's requests (both proxies', saturated and paced).
    match std::fs::remove_file(&log) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).context("removing the last h2load log")
        }
        _ => {}
    }
    // Paced: one stream at a time per connection (see the module's comment).
    let streams = if rps.is_some() { "-m1" } else { "-m10" };
    let mut cmd = crate::procs::command("taskset");
    cmd.args(["-c", cpus, "h2load", "-t1", streams])
        .arg(format!("-c{connections}"))
        .arg(format!("-D{seconds}"))
        .arg(format!("--log-file={}", log.display()));
    if let Some(rps) = rps {
        cmd.arg(format!("--rps={rps}"));
    }
    let out = cmd.arg(url).output().context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "h2load failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut r =
        parse_h2load(&text).with_context(|| format!("unexpected h2load output:\n{text}"))?;
    if r.requests == 0 {
        // As for wrk: a row with nothing served has no figures (not zeros in its medians).
        bail!("h2load: no requests succeeded:\n{text}");
    }
    // Each line: start time (µs since the epoch), status, time to the whole answer (µs).
    let mut lat: Vec<f64> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    lat.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    r.p50_us = pick(0.5);
    r.p99_us = pick(0.99);
    Ok(r)
}

fn parse_h2load(text: &str) -> Option<WrkResult> {
    let mut r = WrkResult::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "finished in 5.00s, 41234.50 req/s, 1.53MB/s"
            let mut parts = rest.split(", ");
            r.seconds = parts.next()?.trim_end_matches('s').parse().ok()?;
            r.rps = parts.next()?.trim_end_matches(" req/s").parse().ok()?;
        }
        if let Some(rest) = line.strip_prefix("requests: ") {
            // "requests: 200 total, 200 started, 200 done, 200 succeeded, 0 failed, 0 errored, 0 timeout"
            let field = |name: &str| -> Option<u64> {
                rest.split(", ")
                    .find(|p| p.ends_with(name))?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            };
            r.requests = field("succeeded")?;
            // h2load's `failed` includes the non-2xx answers (counted below from the status
            // codes) and `errored`, which includes `timeout`: the requests that got no answer
            // are `errored` alone.
            r.socket_errors = field("errored")?;
        }
        if let Some(rest) = line.strip_prefix("status codes: ") {
            // "status codes: 200 2xx, 0 3xx, 0 4xx, 0 5xx"
            r.non_2xx = rest
                .split(", ")
                .skip(1)
                .filter_map(|p| p.split(' ').next()?.parse::<u64>().ok())
                .sum();
        }
    }
    (r.seconds > 0.0).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_usage_lists_every_row() {
        let usage: String = crate::USAGE.split_whitespace().collect();
        let listed = usage
            .split("--rowsLISTtls:onlytheserows,among")
            .nth(1)
            .and_then(|rest| rest.split('[').next())
            .expect("--rows in the usage");
        let names: Vec<&str> = CASES.iter().map(|c| c.0).collect();
        assert_eq!(listed.split(',').collect::<Vec<_>>(), names);
    }

    #[test]
    fn parses_an_h2load_report() {
        let text = "finished in 5.00s, 41234.50 req/s, 1.53MB/s\n\
                    requests: 206172 total, 206672 started, 206172 done, 206170 succeeded, 2 failed, 0 errored, 0 timeout\n\
                    status codes: 206170 2xx, 0 3xx, 1 4xx, 1 5xx\n";
        let r = parse_h2load(text).unwrap();
        assert_eq!(r.seconds, 5.0);
        assert_eq!(r.rps, 41234.5);
        assert_eq!(r.requests, 206_170);
        // The two failed are the non-2xx answers, not socket errors (before: counted as
        // both).
        assert_eq!(r.socket_errors, 0);
        assert_eq!(r.non_2xx, 2);
        // `errored` includes `timeout`; `failed` includes both: three requests unanswered.
        let text = text.replace(
            "2 failed, 0 errored, 0 timeout",
            "5 failed, 3 errored, 1 timeout",
        );
        assert_eq!(parse_h2load(&text).unwrap().socket_errors, 3);
    }
}
