//! Load-test harness: the gateway against nginx and HAProxy as reverse proxies, in front of the
//! same nginx origin, on loopback, pinned to separate CPU sets, measured with wrk.
//!
//! `cargo run -p loadtest --release -- compare` builds the release gateway, checks that every
//! proxy returns the expected bytes, warms up, then runs wrk against each proxy (and the origin
//! directly) for each body size, interleaved and repeated, reading each proxy's CPU time from
//! `/proc`. It prints a markdown table of medians with ratios to nginx, and writes a CSV and an
//! SVG chart; a run with a second build (`--baseline`) or the access log on also prints those
//! rows against their reference repetition by repetition ([`report::PAIRS`]). `--churn` adds a
//! run with a config change through the admin API every 10 ms, `--idle N` measures RSS per
//! idle keep-alive connection, and `scaling` repeats the comparison for several worker counts
//! on separate CPU sets. Every run is bounded in time and targets 127.0.0.1 only.

mod aggregate;
mod handshake;
mod procs;
mod report;
mod tls;
mod wrk;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use procs::{Kind, Proc, Workdir, BODIES};
use report::Sample;

const USAGE: &str = "\
usage: loadtest compare [options]
       loadtest scaling [options] [--worker-counts 1,2,4,8]
       loadtest aggregate [options]     (an aggregate of 3 steps against 3 proxied requests)
       loadtest tls [options]           (TLS: HTTP/1.1 with wrk, HTTP/2 with h2load, full
                                        handshakes; the gateway against nginx `ssl http2`)
       loadtest report RESULTS.csv      (table, paired comparisons and chart again from a
                                        CSV)
       loadtest handshake-client ADDR PATH SECONDS CLIENTS
                                        (tls's full-handshake client, one line of
                                        figures; tls starts it on the client CPUs)

options (defaults in brackets):
  --reps N              repetitions, interleaved [3]
  --seed N              seeds the order of the rows in each repetition (shuffled, every
                        second repetition running the one before backwards; the seed is
                        printed, to run again in the same order) [the clock]
  --duration S          seconds per wrk run [5]
  --warmup S            seconds of warm-up per proxy and body, 0 for none [2]
  --connections N       wrk connections [50]
  --workers N           workers/threads of every proxy and of the origin [1]
  --wrk-cpus LIST       CPUs for wrk [0]
  --proxy-cpus LIST     CPUs for the proxies [1]
  --origin-cpus LIST    CPUs for the origin [1]
  --layout L            shared: wrk on CPU 0, proxies and origin on CPU 1 (the defaults);
                        split: the proxy alone on CPU 1, wrk and the origin on CPU 0
                        (as on a many-core machine); CPU options after it override it
  --proxies LIST        among gateway,gateway+policies,gateway+cluster (the rate limit of
                        gateway+policies cluster-scoped on a redis-server the harness
                        starts),gateway+etcd and gateway+etcd+cluster (gateway
                        and gateway+cluster with their config in an etcd the
                        harness starts),gateway+log (every request logged to a
                        file; after the runs the harness checks its lines against
                        the requests answered and prints the dropped count),
                        gateway+splice (`[relay] splice =
                        true`: large bodies spliced, not copied),nginx,haproxy and the
                        two-target upstream rows gateway+rr2 (round robin, the reference),
                        gateway+least_request, gateway+hash (on the path) and
                        gateway+health (an active check per target every second); the
                        tuned peers nginx+buf64k (proxy_buffer_size 64k, proxy_buffers
                        4 64k) and haproxy+buf64k (tune.bufsize 65536), and l4-relay
                        (HAProxy mode tcp: parses nothing; a reference, not a peer)
                        [gateway,gateway+policies,nginx,haproxy,nginx+buf64k,
                        haproxy+buf64k,l4-relay]
                        The table gives each figure's ratio to the best peer's (nginx,
                        haproxy and their tuned rows) in its body size, and requests per
                        (proxy + origin) CPU-second beside per proxy CPU-second.
  --bodies LIST         among 13b,4k,64k [all three]
  --churn               also measure the gateway with a config change every 10 ms
                        through its admin API
  --idle N              also measure RSS per idle keep-alive connection with N connections
  --out DIR             where the CSV, SVG and table go [loadtest/out]
  --gateway PATH        gateway binary [build and use target/release/gateway]
  --baseline PATH       also run this second gateway binary, as gateway-baseline, with the
                        plain gateway's config: an A/B of two builds in one interleaved run
                        (compare and tls); name gateway-baseline+log in --proxies to run
                        it with gateway+log's config too (the log's cost in two builds)
  --rows LIST           tls: only these rows, among h1-13b,h1-64k,h2-13b,h2-13b-paced,
                        h2-64k,h2-64k-paced,handshake-full,handshake-resumed,
                        handshake-resumed-4c [all]";

#[derive(Debug, Clone)]
struct Options {
    reps: usize,
    duration: u64,
    warmup: u64,
    connections: usize,
    workers: usize,
    wrk_cpus: String,
    proxy_cpus: String,
    origin_cpus: String,
    proxies: Vec<Kind>,
    bodies: Vec<(&'static str, usize)>,
    churn: bool,
    idle: usize,
    out: PathBuf,
    gateway: Option<PathBuf>,
    baseline: Option<PathBuf>,
    worker_counts: Vec<usize>,
    /// `tls`: the rows to run (empty: all).
    rows: Vec<String>,
    /// Seeds the order the rows run in each repetition (see [`run_order`]).
    seed: u64,
}

/// The order `n` rows run in repetition `rep`: a shuffle drawn from `seed` and `rep`, so
/// that no row always runs right after another (a rotation kept every row's neighbours),
/// and a run can be repeated in the same order with `--seed`. Repetitions come in pairs,
/// the second running the first's order backwards (A B C, then C B A): over a pair every
/// row has the same mean position, so a drift during the run (a machine warming, another
/// tenant) weighs on no row more than another, and of two rows each runs first once.
pub(crate) fn run_order(n: usize, rep: usize, seed: u64) -> Vec<usize> {
    if rep % 2 == 1 {
        let mut order = run_order(n, rep - 1, seed);
        order.reverse();
        return order;
    }
    let mut state = seed ^ ((rep / 2) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = || {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    order
}

/// A note when the last repetition has no mirrored partner (see [`run_order`]).
pub(crate) fn unmirrored(reps: usize) -> Option<String> {
    (reps % 2 == 1).then(|| {
        format!(
            "note: --reps {reps} is odd: the last repetition runs without its mirror, so its \
             order weighs on the medians; an even count balances every row's position"
        )
    })
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_owned()
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut o = Options {
        reps: 3,
        duration: 5,
        warmup: 2,
        connections: 50,
        workers: 1,
        wrk_cpus: "0".into(),
        proxy_cpus: "1".into(),
        origin_cpus: "1".into(),
        proxies: vec![
            Kind::Gateway,
            Kind::GatewayPolicies,
            Kind::Nginx,
            Kind::Haproxy,
            Kind::NginxTuned,
            Kind::HaproxyTuned,
            Kind::L4Relay,
        ],
        bodies: BODIES.to_vec(),
        churn: false,
        idle: 0,
        out: workspace_root().join("loadtest/out"),
        gateway: None,
        baseline: None,
        worker_counts: vec![1, 2, 4, 8],
        rows: Vec::new(),
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .with_context(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--reps" => o.reps = val()?.parse()?,
            "--seed" => o.seed = val()?.parse()?,
            "--duration" => o.duration = val()?.parse()?,
            "--warmup" => o.warmup = val()?.parse()?,
            "--connections" => o.connections = val()?.parse()?,
            "--workers" => o.workers = val()?.parse()?,
            "--wrk-cpus" => o.wrk_cpus = val()?,
            "--proxy-cpus" => o.proxy_cpus = val()?,
            "--origin-cpus" => o.origin_cpus = val()?,
            "--layout" => {
                let (wrk, proxy, origin) = match val()?.as_str() {
                    "shared" => ("0", "1", "1"),
                    "split" => ("0", "1", "0"),
                    other => bail!("unknown layout {other:?} (shared, split)"),
                };
                (o.wrk_cpus, o.proxy_cpus, o.origin_cpus) =
                    (wrk.into(), proxy.into(), origin.into());
            }
            "--proxies" => o.proxies = val()?.split(',').map(Kind::parse).collect::<Result<_>>()?,
            "--bodies" => {
                let v = val()?;
                o.bodies = v
                    .split(',')
                    .map(|b| {
                        BODIES
                            .iter()
                            .find(|(n, _)| *n == b)
                            .copied()
                            .with_context(|| format!("unknown body {b:?}"))
                    })
                    .collect::<Result<_>>()?;
            }
            "--churn" => o.churn = true,
            "--idle" => o.idle = val()?.parse()?,
            "--out" => o.out = PathBuf::from(val()?),
            "--gateway" => o.gateway = Some(PathBuf::from(val()?)),
            "--baseline" => o.baseline = Some(PathBuf::from(val()?)),
            "--rows" => o.rows = val()?.split(',').map(str::to_owned).collect(),
            "--worker-counts" => {
                o.worker_counts = val()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    match (&o.baseline, o.proxies.iter().any(|k| k.is_baseline())) {
        (Some(_), false) => o
            .proxies
            .insert(o.proxies.len().min(1), Kind::GatewayBaseline),
        (None, true) => bail!("gateway-baseline rows need --baseline PATH"),
        _ => {}
    }
    tls::check_rows(&o.rows)?;
    if o.reps == 0 || o.duration == 0 || o.duration > 600 || o.reps > 50 || o.warmup > 600 {
        bail!("--reps must be 1..50, --duration 1..600 seconds and --warmup 0..600 seconds");
    }
    Ok(o)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(mode) = args.first() else {
        println!("{USAGE}");
        return Ok(());
    };
    if matches!(mode.as_str(), "--help" | "-h" | "help") {
        println!("{USAGE}");
        return Ok(());
    }
    // The `handshake-full` row's client, started by `loadtest tls` under taskset.
    if mode == "handshake-client" {
        return handshake::client_main(&args[1..]);
    }
    if mode == "report" {
        let csv = PathBuf::from(args.get(1).context("report needs a CSV file")?);
        let samples = report::read_csv(&csv)?;
        let summaries = report::summarize(&samples);
        println!("{}", report::table(&summaries));
        let warnings = report::error_warnings(&samples);
        if !warnings.is_empty() {
            println!("{warnings}");
        }
        print!("{}", report::paired_lines(&samples));
        print!("{}", report::p99_lines(&samples, "gateway", "nginx"));
        let svg = csv.with_extension("svg");
        report::write_svg(&svg, &summaries, "requests per proxy CPU-second")?;
        println!("wrote {}", svg.display());
        return Ok(());
    }
    let opts = parse_options(&args[1..])?;
    procs::stop_on_signals()?;
    if mode != "tls" && !opts.rows.is_empty() {
        bail!("--rows is for tls only");
    }
    // HAProxy runs only as a row of `compare` (and `scaling`, which runs `compare`).
    let haproxy = matches!(mode.as_str(), "compare" | "scaling")
        && opts
            .proxies
            .iter()
            .any(|k| matches!(k, Kind::Haproxy | Kind::HaproxyTuned | Kind::L4Relay));
    for tool in ["wrk", "nginx", "haproxy", "taskset"] {
        if (tool != "haproxy" || haproxy) && which(tool).is_none() {
            bail!("{tool} is not installed: apt-get install wrk nginx-light haproxy util-linux");
        }
    }
    procs::raise_nofile();
    let gateway = match &opts.gateway {
        Some(p) => p.clone(),
        None => build_gateway()?,
    };
    std::fs::create_dir_all(&opts.out)?;
    println!("machine: {}", machine());
    match mode.as_str() {
        "compare" => compare(&opts, &gateway, "compare"),
        "scaling" => scaling(&opts, &gateway),
        "aggregate" => aggregate::run(&opts, &gateway),
        "tls" => tls::run(&opts, &gateway),
        _ => bail!("unknown mode {mode:?}\n{USAGE}"),
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .chain(
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(tool)),
        )
        .find(|p| p.is_file())
}

fn build_gateway() -> Result<PathBuf> {
    let root = workspace_root();
    // Stopped with the harness too (a signal during the build).
    let status = procs::command(env!("CARGO"))
        .args([
            "build",
            "--release",
            "-p",
            "controlplane",
            "--bin",
            "gateway",
        ])
        .current_dir(&root)
        .status()?;
    if !status.success() {
        bail!("building the gateway failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), PathBuf::from);
    Ok(target.join("release/gateway"))
}

/// Where the processes' CPU time is read: one clock for all, or each process's.
pub(crate) fn cpu_clocks<'a>(origin: &'a Proc, proxies: impl Iterator<Item = &'a Proc>) -> String {
    let all: Vec<(&str, &str)> = std::iter::once(origin)
        .chain(proxies)
        .map(|p| (p.name.as_str(), p.cpu_clock()))
        .collect();
    if all.iter().all(|(_, c)| *c == all[0].1) {
        return all[0].1.to_owned();
    }
    let each: Vec<String> = all.iter().map(|(n, c)| format!("{n}: {c}")).collect();
    each.join("; ")
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    format!("{cpu}, {cpus} CPUs, Linux {}", kernel.trim())
}

/// One full comparison with the CPU sets and worker count in `opts`.
fn compare(opts: &Options, gateway: &Path, tag: &str) -> Result<()> {
    let dir = Workdir(opts.out.join(format!("work-{tag}")));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0)?;
    let origin = procs::start_origin(&dir, opts.workers, &opts.origin_cpus)?;
    let mut proxies: Vec<(Kind, Proc)> = Vec::new();
    for &kind in &opts.proxies {
        let bin = match (kind, &opts.baseline) {
            (k, Some(baseline)) if k.is_baseline() => baseline.as_path(),
            _ => gateway,
        };
        let p = procs::start_proxy(kind, &dir, bin, opts.workers, &opts.proxy_cpus, origin.addr)?;
        proxies.push((kind, p));
    }
    // Every proxy must return exactly what the origin serves before anything is measured.
    for (name, len) in &opts.bodies {
        let want = procs::body_bytes(*len);
        for addr in std::iter::once(origin.addr).chain(proxies.iter().map(|(_, p)| p.addr)) {
            let (status, body) = http_get(addr, &format!("/{name}"))?;
            if status != 200 || body != want {
                bail!("{addr} answered /{name} with status {status} and {} bytes (want 200 and {len} exact bytes)", body.len());
            }
        }
    }
    println!(
        "verified: every proxy returns the expected bodies; workers {}, wrk on CPUs {}, proxies on {}, origin on {}",
        opts.workers, opts.wrk_cpus, opts.proxy_cpus, opts.origin_cpus
    );
    let wrk_threads = cpu_count(&opts.wrk_cpus);
    for (name, _) in opts.bodies.iter().filter(|_| opts.warmup > 0) {
        for addr in std::iter::once(origin.addr).chain(proxies.iter().map(|(_, p)| p.addr)) {
            wrk::run(
                &opts.wrk_cpus,
                wrk_threads,
                opts.connections,
                opts.warmup,
                &format!("http://{addr}/{name}"),
            )?;
        }
    }

    let mut samples = Vec::new();
    println!(
        "order seed: {} (--seed to run again in this order)",
        opts.seed
    );
    let clock = cpu_clocks(&origin, proxies.iter().map(|(_, p)| p));
    println!("CPU time read from: {clock}");
    if let Some(note) = unmirrored(opts.reps) {
        println!("{note}");
    }
    for rep in 0..opts.reps {
        for (name, _) in &opts.bodies {
            // None: the origin directly; Some(i): proxy i.
            let rows: Vec<Option<usize>> = std::iter::once(None)
                .chain((0..proxies.len()).map(Some))
                .collect();
            let order = run_order(rows.len(), rep, opts.seed)
                .into_iter()
                .map(|i| rows[i]);
            for which in order {
                let (label, addr, proc) = match which {
                    None => (Kind::Direct.name().to_owned(), origin.addr, None),
                    Some(i) => (
                        proxies[i].0.name().to_owned(),
                        proxies[i].1.addr,
                        Some(&proxies[i].1),
                    ),
                };
                let before = proc.map_or(0.0, Proc::cpu_seconds);
                let origin_before = origin.cpu_seconds();
                let w = wrk::run(
                    &opts.wrk_cpus,
                    wrk_threads,
                    opts.connections,
                    opts.duration,
                    &format!("http://{addr}/{name}"),
                )?;
                let cpu_s = proc.map_or(0.0, Proc::cpu_seconds) - before;
                let origin_cpu_s = origin.cpu_seconds() - origin_before;
                println!(
                    "rep {rep} {name:>4} {label:<16} {:>9.0} req/s  p99 {:>8.0} µs  cpu {:.2} s  {:>7.0} req/cpu-s  non-2xx {} socket errors {}",
                    w.rps,
                    w.p99_us,
                    cpu_s,
                    if cpu_s > 0.0 { w.requests as f64 / cpu_s } else { 0.0 },
                    w.non_2xx,
                    w.socket_errors
                );
                samples.push(Sample {
                    proxy: label,
                    body: (*name).to_owned(),
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
    let csv = opts.out.join(format!("{tag}.csv"));
    let svg = opts.out.join(format!("{tag}.svg"));
    report::write_csv(&csv, &samples)?;
    let title = format!(
        "requests per proxy CPU-second, {} worker(s) each",
        opts.workers
    );
    report::write_svg(&svg, &summaries, &title)?;
    let mut md = format!(
        "machine: {}\n\nCPU time read from: {clock}\n\n{table}",
        machine()
    );
    let warnings = report::error_warnings(&samples);
    if !warnings.is_empty() {
        println!("{warnings}");
        md.push_str(&format!("\n{warnings}"));
    }
    let pairs = report::paired_lines(&samples);
    if !pairs.is_empty() {
        println!("{pairs}");
        md.push_str(&format!("\n{pairs}"));
    }
    // Issue 10 asks for no lost line at the logged row's rate: every answer has its line.
    for (kind, p) in proxies.iter().filter(|(k, _)| k.logs()) {
        let text = access_log_check(p, &dir.file(&format!("{}-access.log", kind.name())))?;
        println!("{text}");
        md.push_str(&format!("\n{text}\n"));
    }

    if opts.churn {
        if let Some((_, gw)) = proxies.iter().find(|(k, _)| *k == Kind::Gateway) {
            let text = churn(opts, gw)?;
            println!("{text}");
            md.push_str(&format!("\n{text}"));
        }
    }
    if opts.idle > 0 {
        let mut lines = String::from("\n| proxy | idle connections | RSS before | RSS after | per connection |\n| --- | ---: | ---: | ---: | ---: |\n");
        for (kind, p) in &proxies {
            if matches!(kind, Kind::Gateway | Kind::Nginx) {
                lines.push_str(&idle_rss(p, opts.idle)?);
            }
        }
        println!("{lines}");
        md.push_str(&lines);
    }
    std::fs::write(opts.out.join(format!("{tag}.md")), md)?;
    println!(
        "wrote {}, {} and {}",
        csv.display(),
        svg.display(),
        opts.out.join(format!("{tag}.md")).display()
    );
    drop(proxies);
    drop(origin);
    Ok(())
}

fn cpu_count(list: &str) -> usize {
    list.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => {
                b.parse::<usize>()
                    .unwrap_or(0)
                    .saturating_sub(a.parse().unwrap_or(0))
                    + 1
            }
            None => 1,
        })
        .sum::<usize>()
        .max(1)
}

/// Worker counts 1, 2, 4, 8 with separate CPU sets for proxies, origin and wrk.
fn scaling(opts: &Options, gateway: &Path) -> Result<()> {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    let mut ran = false;
    for &w in &opts.worker_counts {
        if 3 * w > cpus {
            println!("scaling: skipping {w} workers: needs {} CPUs (proxies, origin, wrk), this machine has {cpus}", 3 * w);
            continue;
        }
        let range = |from: usize| format!("{}-{}", from, from + w - 1);
        let o = Options {
            workers: w,
            proxy_cpus: range(0),
            origin_cpus: range(w),
            wrk_cpus: range(2 * w),
            connections: opts.connections.max(50 * w),
            ..opts.clone()
        };
        compare(&o, gateway, &format!("scaling-{w}w"))?;
        ran = true;
    }
    if !ran {
        bail!("no worker count fits on {cpus} CPUs");
    }
    Ok(())
}

/// Gateway throughput for 13-byte bodies with and without a config change every 10 ms,
/// made through the admin API (each one validated, persisted and published).
fn churn(opts: &Options, gw: &Proc) -> Result<String> {
    let admin = gw.admin.context("the gateway has no admin API address")?;
    let wrk_threads = cpu_count(&opts.wrk_cpus);
    let url = format!("http://{}/13b", gw.addr);
    let mut plain = Vec::new();
    let mut churned = Vec::new();
    let mut changes = 0;
    let failed = Arc::new(AtomicU64::new(0));
    for _ in 0..opts.reps {
        plain.push(wrk::run(
            &opts.wrk_cpus,
            wrk_threads,
            opts.connections,
            opts.duration,
            &url,
        )?);
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (stop2, count2, failed2) = (stop.clone(), count.clone(), failed.clone());
        let changer = std::thread::spawn(move || {
            let mut client = AdminClient::new(admin);
            let mut n = 0u64;
            let start = Instant::now();
            let deadline = start + Duration::from_secs(3600);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                // One change per 10 ms tick, whatever each one takes (no drift).
                let tick = start + Duration::from_millis(10 * n);
                if let Some(wait) = tick.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                n += 1;
                // A real change each time: a route whose answer alternates.
                let body = format!(r#"{{"path":"/churn","respond":{{"body":"{n}"}}}}"#);
                match client.put("/v1/routes/churn", &body) {
                    Ok(200 | 201) => count2.fetch_add(1, Ordering::Relaxed),
                    _ => failed2.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
        let r = wrk::run(
            &opts.wrk_cpus,
            wrk_threads,
            opts.connections,
            opts.duration,
            &url,
        );
        stop.store(true, Ordering::Relaxed);
        let _ = changer.join();
        changes += count.load(Ordering::Relaxed);
        churned.push(r?);
    }
    let med = |v: &[wrk::WrkResult]| report::median(v.iter().map(|r| r.rps).collect());
    let (a, b) = (med(&plain), med(&churned));
    let non2xx: u64 = plain.iter().chain(&churned).map(|r| r.non_2xx).sum();
    let errors: u64 = plain.iter().chain(&churned).map(|r| r.socket_errors).sum();
    Ok(format!(
        "| config churn (gateway, 13b) | req/s |\n| --- | ---: |\n| no change | {a:.0} |\n| change every 10 ms through the admin API ({changes} changes in {} s, {} refused) | {b:.0} ({:.1}% of no change) |\n| non-2xx responses, all runs | {non2xx} |\n| socket errors, all runs | {errors} |\n",
        opts.reps as u64 * opts.duration,
        failed.load(Ordering::Relaxed),
        100.0 * b / a
    ))
}

/// A keep-alive connection to the gateway's admin API, reopened when it breaks.
struct AdminClient {
    addr: SocketAddr,
    conn: Option<TcpStream>,
}

impl AdminClient {
    fn new(addr: SocketAddr) -> Self {
        AdminClient { addr, conn: None }
    }

    /// `PUT` with a JSON body; returns the status.
    fn put(&mut self, path: &str, body: &str) -> Result<u16> {
        let result = self.try_put(path, body);
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    fn try_put(&mut self, path: &str, body: &str) -> Result<u16> {
        if self.conn.is_none() {
            let s = TcpStream::connect(self.addr)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_nodelay(true)?;
            self.conn = Some(s);
        }
        let s = self.conn.as_mut().context("admin connection")?;
        let request = format!(
            "PUT {path} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            procs::ADMIN_TOKEN,
            body.len()
        );
        s.write_all(request.as_bytes())?;
        read_answer(s, &mut Vec::new(), true).context("admin answer")
    }
}

/// Reads one answer from `s` into `raw` (cleared first): its head, then exactly its
/// `Content-Length` bytes of body; returns its status. An answer without `Content-Length` has
/// an empty body when `length_optional`, and is an error otherwise.
pub(crate) fn read_answer(
    s: &mut impl Read,
    raw: &mut Vec<u8>,
    length_optional: bool,
) -> Result<u16> {
    raw.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(status) = complete(raw, length_optional)? {
            return Ok(status);
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("the connection closed before the whole answer");
        }
        raw.extend_from_slice(&chunk[..n]);
    }
}

/// The status once `answer` holds a whole head and its `Content-Length` of body (see
/// [`read_answer`] for an answer without one).
fn complete(answer: &[u8], length_optional: bool) -> Result<Option<u16>> {
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&answer[..end]).context("a head that is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse::<usize>())
        .transpose()
        .context("a Content-Length that is not a number")?;
    let length = match (length, length_optional) {
        (Some(n), _) => n,
        (None, true) => 0,
        (None, false) => bail!("an answer without Content-Length"),
    };
    Ok((answer.len() >= end + 4 + length).then_some(status))
}

/// Opens `n` keep-alive connections (one request each), then reads the proxy's RSS growth.
fn idle_rss(p: &Proc, n: usize) -> Result<String> {
    let before = procs::rss_kib(p.pid());
    let mut conns = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(120);
    for _ in 0..n {
        if Instant::now() > deadline {
            bail!("opening {n} idle connections took too long");
        }
        let mut s =
            TcpStream::connect(p.addr).context("opening idle connections (raise ulimit -n?)")?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /13b HTTP/1.1\r\nHost: loadtest\r\n\r\n")?;
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"Hello, world!") {
            let k = s.read(&mut buf)?;
            if k == 0 {
                bail!("{} closed an idle connection", p.name);
            }
            got.extend_from_slice(&buf[..k]);
        }
        conns.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = procs::rss_kib(p.pid());
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    drop(conns);
    Ok(format!(
        "| {} | {n} | {before} KiB | {after} KiB | {per:.0} bytes |\n",
        p.name
    ))
}

/// A logged row (`gateway+log`, `gateway-baseline+log`) after the runs: its access log's lines
/// against the requests it answered (`gateway_requests_total`, every one logged at
/// `sample = 1.0`) and the lines its workers dropped (`gateway_access_log_dropped_total`).
fn access_log_check(p: &Proc, log: &Path) -> Result<String> {
    let admin = p
        .admin
        .with_context(|| format!("{} has no admin API", p.name))?;
    // The writer thread appends within about 100 ms: count until the count stands still.
    let mut lines = 0;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let n = count_lines(log)?;
        if n == lines {
            break;
        }
        lines = n;
    }
    let metrics = admin_get(admin, "/metrics")?;
    let answered = metric_sum(&metrics, "gateway_requests_total");
    let dropped = metric_sum(&metrics, "gateway_access_log_dropped_total");
    Ok(format!(
        "{}: {lines} access log lines for {answered} requests answered \
         (gateway_requests_total), {dropped} dropped (gateway_access_log_dropped_total)",
        p.name
    ))
}

/// Newlines in `path`, read in 1 MiB pieces.
fn count_lines(path: &Path) -> Result<u64> {
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let got = f.read(&mut buf)?;
        if got == 0 {
            return Ok(n);
        }
        n += buf[..got].iter().filter(|&&b| b == b'\n').count() as u64;
    }
}

/// The sum of a Prometheus counter's series (every label set) in `text`.
fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// GET on the admin API (bearer token, `Connection: close`); returns the body of a 200.
fn admin_get(addr: SocketAddr, path: &str) -> Result<String> {
    let auth = format!("Authorization: Bearer {}", procs::ADMIN_TOKEN);
    let raw = get_raw(addr, path, &auth)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no response head")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("admin GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}

/// GET with one more header line and `Connection: close`; returns the whole answer.
fn get_raw(addr: SocketAddr, path: &str, header: &str) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: loadtest\r\n{header}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    Ok(raw)
}

/// GET with `Connection: close`; returns the status and the (de-chunked) body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>)> {
    let raw = get_raw(addr, path, &format!("X-Api-Key: {}", procs::API_KEY))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no response head")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = head.get(9..12).context("short status line")?.parse()?;
    let body = raw[split + 4..].to_vec();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    if !chunked {
        return Ok((status, body));
    }
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let eol = body[at..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("bad chunk")?
            + at;
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&body[at..eol])
                .split(';')
                .next()
                .unwrap_or("")
                .trim(),
            16,
        )?;
        at = eol + 2;
        if size == 0 {
            return Ok((status, out));
        }
        out.extend_from_slice(body.get(at..at + size).context("short chunk")?);
        at += size + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn rows_run_in_a_shuffled_order_that_a_seed_repeats() {
        let n = 4;
        let orders: Vec<Vec<usize>> = (0..24).map(|rep| run_order(n, rep, 7)).collect();
        for o in &orders {
            let mut sorted = o.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2, 3]);
        }
        assert_eq!(orders[5], run_order(n, 5, 7), "the seed repeats it");
        // Balanced in pairs: each row's positions over a pair add up to n - 1.
        for pair in orders.chunks(2) {
            for row in 0..n {
                let at = |o: &Vec<usize>| o.iter().position(|&r| r == row).unwrap();
                assert_eq!(at(&pair[0]) + at(&pair[1]), n - 1, "{pair:?}");
            }
        }
        // Unlike a rotation, each row gets other neighbours: row 1 does not always follow
        // row 0, nor does any row always come first.
        let follows = |a: usize, b: usize| {
            orders
                .iter()
                .filter(|o| o.windows(2).any(|w| w == [a, b]))
                .count()
        };
        assert!(follows(0, 1) < orders.len() / 2, "{orders:?}");
        let firsts: std::collections::HashSet<usize> = orders.iter().map(|o| o[0]).collect();
        assert_eq!(firsts.len(), n, "{orders:?}");
        assert_eq!(parse_options(&args("--seed 42")).unwrap().seed, 42);
    }

    #[test]
    fn baseline_adds_a_second_gateway_right_after_the_first() {
        let o = parse_options(&args("--baseline /tmp/old --proxies gateway,nginx")).unwrap();
        assert_eq!(o.baseline.as_deref(), Some(Path::new("/tmp/old")));
        assert_eq!(
            o.proxies,
            [Kind::Gateway, Kind::GatewayBaseline, Kind::Nginx]
        );
        // Named explicitly, it keeps its place and is not added twice.
        let o = parse_options(&args(
            "--proxies nginx,gateway-baseline,gateway --baseline /tmp/old",
        ))
        .unwrap();
        assert_eq!(
            o.proxies,
            [Kind::Nginx, Kind::GatewayBaseline, Kind::Gateway]
        );
    }

    #[test]
    fn layouts_set_the_cpu_sets_and_later_options_override_them() {
        let o = parse_options(&args("--layout split")).unwrap();
        assert_eq!(
            (
                o.wrk_cpus.as_str(),
                o.proxy_cpus.as_str(),
                o.origin_cpus.as_str()
            ),
            ("0", "1", "0")
        );
        let o = parse_options(&args("--layout split --origin-cpus 2")).unwrap();
        assert_eq!(o.origin_cpus, "2");
        let o = parse_options(&args("--layout shared")).unwrap();
        assert_eq!(
            (
                o.wrk_cpus.as_str(),
                o.proxy_cpus.as_str(),
                o.origin_cpus.as_str()
            ),
            ("0", "1", "1")
        );
        let err = parse_options(&args("--layout diagonal")).unwrap_err();
        assert!(err.to_string().contains("shared, split"), "{err}");
    }

    #[test]
    fn tuned_peers_and_the_l4_relay_run_by_default() {
        let o = parse_options(&args("")).unwrap();
        for k in [Kind::NginxTuned, Kind::HaproxyTuned, Kind::L4Relay] {
            assert!(o.proxies.contains(&k), "{k:?}");
            assert_eq!(Kind::parse(k.name()).unwrap(), k);
        }
    }

    #[test]
    fn the_splice_row_turns_splicing_on() {
        let o = parse_options(&args("--proxies gateway,gateway+splice")).unwrap();
        assert_eq!(o.proxies, vec![Kind::Gateway, Kind::GatewaySplice]);
        assert_eq!(
            Kind::parse("gateway+splice").unwrap().name(),
            "gateway+splice"
        );
        assert!(procs::SPLICE_RELAY.contains("splice = true"));
    }

    #[test]
    fn the_logged_baseline_row_runs_the_baseline_binary_with_the_log_on() {
        let o = parse_options(&args(
            "--proxies gateway,gateway+log,gateway-baseline+log --baseline /tmp/old",
        ))
        .unwrap();
        // Named, a baseline row keeps the plain baseline row from being added.
        assert_eq!(
            o.proxies,
            [Kind::Gateway, Kind::GatewayLog, Kind::GatewayBaselineLog]
        );
        let k = Kind::parse("gateway-baseline+log").unwrap();
        assert!(k.is_baseline() && k.logs() && k.name() == "gateway-baseline+log");
        assert!(!Kind::GatewayLog.is_baseline() && !Kind::GatewayBaseline.logs());
    }

    #[test]
    fn baseline_proxy_without_a_binary_is_refused() {
        let err = parse_options(&args("--proxies gateway,gateway-baseline")).unwrap_err();
        assert!(err.to_string().contains("--baseline PATH"), "{err}");
        let err = parse_options(&args("--proxies gateway-baseline+log")).unwrap_err();
        assert!(err.to_string().contains("--baseline PATH"), "{err}");
        assert!(parse_options(&args("--proxies gateway"))
            .unwrap()
            .baseline
            .is_none());
    }

    #[test]
    fn an_answer_is_complete_with_its_whole_body() {
        let head = b"HTTP/1.1 200 OK\r\nServer: x\r\ncontent-length: 13\r\n\r\n";
        let mut a = head.to_vec();
        assert_eq!(
            complete(&a[..a.len() - 2], false).unwrap(),
            None,
            "no blank line yet"
        );
        assert_eq!(complete(&a, false).unwrap(), None, "no body yet");
        a.extend_from_slice(b"0123456789ab");
        assert_eq!(complete(&a, false).unwrap(), None, "one byte short");
        a.push(b'c');
        assert_eq!(complete(&a, false).unwrap(), Some(200));
        let e = complete(
            b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert!(e.unwrap_err().to_string().contains("Content-Length"));
        // The admin API's answers: no Content-Length, no body.
        let no_length = b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n";
        assert_eq!(complete(no_length, true).unwrap(), Some(204));
        // From a stream; one that ends before the body is whole is an error.
        let mut stream: &[u8] = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(
            read_answer(&mut stream, &mut Vec::new(), true).unwrap(),
            201
        );
        let mut short: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok";
        let e = read_answer(&mut short, &mut Vec::new(), true).unwrap_err();
        assert!(
            e.to_string().contains("closed before the whole answer"),
            "{e}"
        );
    }

    #[test]
    fn counter_series_are_summed_by_exact_name() {
        let text = "# HELP gateway_requests_total Requests answered.\n\
                    gateway_requests_total{route=\"a\",class=\"2xx\"} 40\n\
                    gateway_requests_total{route=\"b\",class=\"5xx\"} 2\n\
                    gateway_requests_total_other 7\n\
                    gateway_access_log_dropped_total 0\n";
        assert_eq!(metric_sum(text, "gateway_requests_total"), 42);
        assert_eq!(metric_sum(text, "gateway_access_log_dropped_total"), 0);
        assert_eq!(metric_sum(text, "gateway_missing_total"), 0);
    }

    #[test]
    fn tls_rows_are_checked_by_name() {
        let o = parse_options(&args("--rows handshake-resumed,handshake-resumed-4c")).unwrap();
        assert_eq!(o.rows, ["handshake-resumed", "handshake-resumed-4c"]);
        assert!(parse_options(&args("")).unwrap().rows.is_empty());
        let err = parse_options(&args("--rows h1-13b,h3-13b")).unwrap_err();
        assert!(
            err.to_string().contains("unknown tls row \"h3-13b\""),
            "{err}"
        );
    }
}
