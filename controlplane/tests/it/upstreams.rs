//! Upstreams that come and go, through the real binary on loopback: active health checks with
//! retries covering a killed target, per-try timeouts, DNS discovery (A and SRV) against a DNS
//! server the test runs (`tests/dns_server.py`, PyPI `dnslib`), the retry budget, consistent
//! hashing, circuit limits and draining.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

/// How a backend answers requests other than its health check.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// 200 with its name as the body.
    Answer,
    /// This status, always (health checks too).
    Status(u16),
    /// Reads the request and never answers.
    Silent,
    /// Answers after this long.
    Slow(Duration),
    /// Answers requests, fails its health check (500).
    SickCheck,
    /// Sends a head with this status and part of the body it announces, then closes.
    CutBody(u16),
}

/// A backend that can be killed (listener and every connection closed) and brought back on
/// the same address.
struct Backend {
    addr: SocketAddr,
    name: String,
    mode: Mode,
    /// Requests other than health checks, and POSTs among them.
    hits: Arc<AtomicUsize>,
    posts: Arc<AtomicUsize>,
    /// Connections the backend saw closed by the gateway.
    closed: Arc<AtomicUsize>,
    alive: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Backend {
    fn start(name: &str, mode: Mode) -> Backend {
        Self::on("127.0.0.1:0".parse().unwrap(), name, mode)
    }

    fn on(addr: SocketAddr, name: &str, mode: Mode) -> Backend {
        let mut b = Backend {
            addr,
            name: name.to_owned(),
            mode,
            hits: Arc::default(),
            posts: Arc::default(),
            closed: Arc::default(),
            alive: Arc::new(AtomicBool::new(false)),
            conns: Arc::default(),
        };
        b.listen();
        b
    }

    fn listen(&mut self) {
        let listener = TcpListener::bind(self.addr).unwrap();
        self.addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let alive = Arc::new(AtomicBool::new(true));
        self.alive = alive.clone();
        let (name, mode) = (self.name.clone(), self.mode);
        let (hits, posts, closed, conns) = (
            self.hits.clone(),
            self.posts.clone(),
            self.closed.clone(),
            self.conns.clone(),
        );
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            while alive.load(SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        conns.lock().unwrap().push(s.try_clone().unwrap());
                        let (name, hits, posts, closed, alive) = (
                            name.clone(),
                            hits.clone(),
                            posts.clone(),
                            closed.clone(),
                            alive.clone(),
                        );
                        thread::spawn(move || {
                            serve(s, &name, mode, &hits, &posts, &alive);
                            closed.fetch_add(1, SeqCst);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
    }

    /// Stops listening and closes every connection, as a crashed process would.
    fn kill(&mut self) {
        self.alive.store(false, SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        // The accept loop notices within a couple of milliseconds and drops the listener.
        thread::sleep(Duration::from_millis(20));
    }

    fn revive(&mut self) {
        self.listen();
    }
}

fn serve(
    mut s: TcpStream,
    name: &str,
    mode: Mode,
    hits: &AtomicUsize,
    posts: &AtomicUsize,
    alive: &AtomicBool,
) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        while buf.len() < end + len {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..end + len);
        if !alive.load(SeqCst) {
            return;
        }
        let health = head.starts_with("get /healthz ");
        if !health {
            hits.fetch_add(1, SeqCst);
            if head.starts_with("post ") {
                posts.fetch_add(1, SeqCst);
            }
        }
        let (status, body) = match mode {
            Mode::Status(code) => (code, name.to_owned()),
            Mode::Silent if !health => {
                // Hold the connection open without answering until the gateway gives up.
                let mut b = [0u8; 1];
                while matches!(s.read(&mut b), Ok(n) if n > 0) {}
                return;
            }
            Mode::Slow(d) if !health => {
                thread::sleep(d);
                (200, name.to_owned())
            }
            Mode::CutBody(status) if !health => {
                let head = format!("HTTP/1.1 {status} X\r\nContent-Length: 100\r\n\r\n");
                let _ = s.write_all(format!("{head}0123456789").as_bytes());
                // Closed though `conns` holds a clone of it.
                let _ = s.shutdown(std::net::Shutdown::Both);
                return;
            }
            Mode::SickCheck if health => (500, name.to_owned()),
            _ => (200, name.to_owned()),
        };
        // A backend named as a JSON object answers as JSON (an aggregate's step takes it).
        let ctype = match body.starts_with('{') {
            true => "Content-Type: application/json\r\n",
            false => "",
        };
        let reply = format!(
            "HTTP/1.1 {status} X\r\n{ctype}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// A config with one route to upstream `u` made of `targets` (TOML inline tables) and
/// `settings` (more keys of the upstream).
fn config(workers: usize, targets: &[String], settings: &str, extra: &str) -> String {
    format!(
        "workers = {workers}\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[[upstreams]]\n\
         id = \"u\"\ntargets = [{}]\n{settings}\n\n[[routes]]\nid = \"all\"\npath_prefix = \"/\"\n\
         upstream = \"u\"\n{extra}",
        targets.join(", ")
    )
}

fn target(addr: SocketAddr) -> String {
    format!("{{ address = \"{addr}\" }}")
}

fn get(gw: &Gateway, path: &str) -> Response {
    gw.connect().roundtrip(&format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    ))
}

/// One state per target address, from the health endpoint.
fn states(gw: &Gateway) -> HashMap<String, String> {
    let r = gw.admin("GET", "/v1/upstreams/u/health", None);
    assert_eq!(r.status, 200, "{}", r.body_str());
    r.json()["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["address"].as_str().unwrap().to_owned(),
                t["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Waits until `addr`'s state is `want`; returns how long that took.
fn wait_state(gw: &Gateway, addr: SocketAddr, want: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let now = states(gw);
        if now.get(&addr.to_string()).map(String::as_str) == Some(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{addr} not {want} within {limit:?}: {now:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// A counter's value from `/metrics` (0 when the series is absent).
fn metric(gw: &Gateway, series: &str) -> u64 {
    let r = gw.admin("GET", "/metrics", None);
    r.body_str()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// Clients sending GETs on keep-alive connections until told to stop; each answer's status
/// is counted.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<HashMap<u16, usize>>>,
}

impl Load {
    fn start(gw: &Gateway, clients: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|_| {
                let (addr, stop) = (gw.addr, stop.clone());
                thread::spawn(move || {
                    let mut seen = HashMap::new();
                    let mut c = Client::connect(addr);
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !stop.load(SeqCst) && Instant::now() < deadline {
                        let r = c.roundtrip("GET /load HTTP/1.1\r\nHost: t\r\n\r\n");
                        *seen.entry(r.status).or_insert(0) += 1;
                        if r.header("connection") == Some("close") {
                            c = Client::connect(addr);
                        }
                        thread::sleep(pause);
                    }
                    seen
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(self) -> HashMap<u16, usize> {
        self.stop.store(true, SeqCst);
        let mut all = HashMap::new();
        for t in self.threads {
            for (status, n) in t.join().expect("a client saw a broken answer") {
                *all.entry(status).or_insert(0) += n;
            }
        }
        all
    }
}

#[test]
fn a_backup_target_serves_only_while_the_others_cannot() {
    // nginx's `backup`: no requests while a target that is not a backup is usable, every
    // request once none is (here: unhealthy by its checks), none again once one is back.
    let mut main = Backend::start("main", Mode::Answer);
    let spare = Backend::start("spare", Mode::Answer);
    let targets = [
        target(main.addr),
        format!(
            "{{ address = \"{}\", backup = true, weight = 10 }}",
            spare.addr
        ),
    ];
    let settings = "health_check = { path = \"/healthz\", interval_ms = 200, timeout_ms = 200, \
                    healthy_after = 1, unhealthy_after = 1 }";
    let gw = Gateway::start(&config(1, &targets, settings, ""), Driver::IoUring);
    let bodies = |n: usize| -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for _ in 0..n {
            *seen
                .entry(get(&gw, "/x").body_str().to_owned())
                .or_default() += 1;
        }
        seen
    };
    assert_eq!(bodies(20), HashMap::from([("main".to_owned(), 20)]));
    let health = gw.admin("GET", "/v1/upstreams/u/health", None).json();
    let backup: Vec<bool> = (health["targets"].as_array().unwrap().iter())
        .map(|t| t["backup"].as_bool().unwrap())
        .collect();
    assert_eq!(backup, [false, true], "{health}");

    main.kill();
    wait_state(&gw, main.addr, "unhealthy", Duration::from_secs(5));
    assert_eq!(bodies(20), HashMap::from([("spare".to_owned(), 20)]));
    main.revive();
    wait_state(&gw, main.addr, "healthy", Duration::from_secs(5));
    assert_eq!(bodies(20), HashMap::from([("main".to_owned(), 20)]));

    // An upstream whose every target is a backup has no first choice: refused.
    let all = format!("{{ address = \"{}\", backup = true }}", spare.addr);
    let body = serde_json::json!({"id": "u", "targets": [
        {"address": spare.addr.to_string(), "backup": true}]});
    let r = gw.admin("PUT", "/v1/upstreams/u", Some(&body.to_string()));
    assert_eq!(r.status, 422, "{all}: {}", r.body_str());
    assert!(r.body_str().contains("backup"), "{}", r.body_str());
}

#[test]
fn active_checks_start_an_interval_apart_whatever_they_take() {
    // A target whose check never answers: each check takes its whole timeout (200 ms), and
    // the next one still starts an interval (200 ms, 10% jitter) after it started. They
    // came an interval after the last one ended, half as often, so a hanging target was
    // noticed a timeout per check later than the README said.
    let silent = Backend::start("silent", Mode::Silent);
    // (A silent backend answers `/healthz`, not other paths.)
    let settings = "health_check = { path = \"/hang\", interval_ms = 200, timeout_ms = 200, \
                    unhealthy_after = 100 }";
    let _gw = Gateway::start(
        &config(1, &[target(silent.addr)], settings, ""),
        Driver::IoUring,
    );
    let checks = || silent.conns.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(5);
    while checks() == 0 {
        assert!(Instant::now() < deadline, "no check came");
        thread::sleep(Duration::from_millis(5));
    }
    let first = checks();
    thread::sleep(Duration::from_secs(2));
    let n = checks() - first;
    // About 10 (5 when each waited for the last to time out).
    assert!((7..=12).contains(&n), "{n} checks in 2 s, 200 ms apart");
}

#[test]
fn a_killed_target_is_covered_by_retries_marked_unhealthy_and_comes_back() {
    let mut backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|n| Backend::start(n, Mode::Answer))
        .collect();
    let targets: Vec<String> = backends.iter().map(|b| target(b.addr)).collect();
    let settings = "health_check = { path = \"/healthz\", interval_ms = 300, timeout_ms = 200, \
                    healthy_after = 2, unhealthy_after = 2 }\n\
                    retry = { attempts = 3, on = [\"connect\", \"reset\", \"timeout\", \"502\", \
                    \"503\"], budget_percent = 50 }";
    let gw = Gateway::start(&config(2, &targets, settings, ""), Driver::IoUring);
    let load = Load::start(&gw, 4, Duration::from_millis(3));
    thread::sleep(Duration::from_millis(800));
    let b = backends[1].addr;
    assert!(backends[1].hits.load(SeqCst) > 0, "b had its share before");

    backends[1].kill();
    let took = wait_state(&gw, b, "unhealthy", Duration::from_secs(5));
    // unhealthy_after intervals (each up to 10% longer) plus a timeout, and a poll.
    assert!(
        took <= Duration::from_millis(330 * 2 + 200 + 40),
        "marked unhealthy after {took:?}"
    );
    let series = format!("gateway_target_requests_total{{upstream=\"u\",target=\"{b}\"}}");
    let before = metric(&gw, &series);
    thread::sleep(Duration::from_millis(700));
    assert_eq!(
        metric(&gw, &series),
        before,
        "an unhealthy target gets no requests"
    );

    backends[1].revive();
    wait_state(&gw, b, "healthy", Duration::from_secs(5));
    let hits_before: Vec<usize> = backends.iter().map(|b| b.hits.load(SeqCst)).collect();
    thread::sleep(Duration::from_millis(900));
    let statuses = load.finish();
    let share: Vec<usize> = backends
        .iter()
        .zip(&hits_before)
        .map(|(b, before)| b.hits.load(SeqCst) - before)
        .collect();
    let total: usize = share.iter().sum();
    assert!(
        share[1] * 5 >= total,
        "b is back and gets its share: {share:?}"
    );
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "no failed request: {statuses:?}"
    );
    assert!(statuses[&200] > 200, "{statuses:?}");

    let health = gw.admin("GET", "/v1/upstreams/u/health", None).json();
    let t = &health["targets"][1];
    assert_eq!(t["address"], b.to_string());
    assert_eq!(t["host"], serde_json::Value::Null);
    assert_eq!(t["state"], "healthy");
    assert_eq!(t["last_check"]["ok"], true);
    assert_eq!(t["last_check"]["status"], 200);
    assert!(t["last_check"]["at"].as_str().unwrap().ends_with('Z'));
    for key in ["consecutive_failures", "outstanding", "ejections"] {
        assert!(t[key].is_u64(), "{key}: {t}");
    }
    assert!(
        metric(
            &gw,
            &format!(
                "gateway_target_retries_total{{upstream=\"u\",target=\"{}\"}}",
                backends[0].addr
            )
        ) + metric(
            &gw,
            &format!(
                "gateway_target_retries_total{{upstream=\"u\",target=\"{}\"}}",
                backends[2].addr
            )
        ) > 0,
        "the requests b failed were retried on the others"
    );
    let missing = gw.admin("GET", "/v1/upstreams/nope/health", None);
    assert_eq!(missing.status, 404);
}

#[test]
fn a_silent_target_times_out_per_try_and_a_post_is_not_retried() {
    let silent = Backend::start("silent", Mode::Silent);
    let ok = Backend::start("ok", Mode::Answer);
    let settings = "retry = { attempts = 2, on = [\"timeout\"], per_try_timeout_ms = 300 }";
    let gw = Gateway::start(
        &config(1, &[target(silent.addr), target(ok.addr)], settings, ""),
        Driver::IoUring,
    );
    for _ in 0..4 {
        let r = get(&gw, "/x");
        assert_eq!((r.status, r.body_str()), (200, "ok"));
    }
    // Round robin over the first tries: two of four on the silent target (retries take no
    // turn; taking one made every first try land on it).
    assert_eq!(
        silent.hits.load(SeqCst),
        2,
        "first tries on the silent target"
    );
    let mut timed_out = 0;
    for _ in 0..4 {
        let started = Instant::now();
        let r = gw.connect().roundtrip(
            "POST /order HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        );
        match r.status {
            200 => assert_eq!(r.body_str(), "ok"),
            504 => {
                let took = started.elapsed();
                assert!(
                    took >= Duration::from_millis(290) && took < Duration::from_secs(3),
                    "{took:?}"
                );
                timed_out += 1;
            }
            other => panic!("POST answered {other}"),
        }
    }
    assert!(timed_out >= 1, "one POST went to the silent target");
    assert_eq!(
        silent.posts.load(SeqCst),
        timed_out,
        "each failed POST tried once"
    );
    assert_eq!(
        ok.posts.load(SeqCst),
        4 - timed_out,
        "no POST retried on the other"
    );
}

#[test]
fn a_slow_upload_is_the_clients_time_not_the_per_try_bound() {
    let ok = Backend::start("ok", Mode::Answer);
    let settings = "retry = { attempts = 2, per_try_timeout_ms = 300 }\n\
                    passive = { consecutive_failures = 1, ejection_ms = 30000 }";
    let gw = Gateway::start(
        &config(1, &[target(ok.addr)], settings, ""),
        Driver::IoUring,
    );
    // Bodies the client sends in three pieces over 500 ms, longer than the try's bound: the
    // target answers at once when it has them all. Before, each was a 504 for the target's
    // silence (`response_timeout`), and the target was ejected for it.
    let heads = [
        "POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 30\r\n\r\n",
        "POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 30\r\nExpect: 100-continue\r\n\r\n",
    ];
    for head in heads {
        let mut c = gw.connect();
        c.send(head.as_bytes());
        if head.contains("Expect") {
            assert_eq!(c.read_response().status, 100, "{head}");
        }
        for i in 0..3 {
            std::thread::sleep(Duration::from_millis(250));
            c.send(format!("piece-{i}---").as_bytes());
        }
        let r = c.read_response();
        assert_eq!((r.status, r.body_str()), (200, "ok"), "{head}");
    }
    let health = gw.admin("GET", "/v1/upstreams/u/health", None).json();
    assert_eq!(health["targets"][0]["state"], "healthy", "{health}");
    assert_eq!(ok.posts.load(SeqCst), 2);
    // The bound still holds once the body is in: a silent target is a 504 300 ms after it.
    let silent = Backend::start("silent", Mode::Silent);
    let gw = Gateway::start(
        &config(1, &[target(silent.addr)], settings, ""),
        Driver::IoUring,
    );
    let mut c = gw.connect();
    c.send(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nab");
    std::thread::sleep(Duration::from_millis(500));
    c.send(b"cd");
    let sent = Instant::now();
    assert_eq!(c.read_response().status, 504);
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

/// A gateway whose upstream `u` has the one target `svc.test:PORT` (a name the test's DNS
/// server gives), and `extra` config.
fn with_svc_target(port: u16, extra: &str) -> Gateway {
    let target = format!("{{ address = \"svc.test:{port}\" }}");
    Gateway::start(&config(1, &[target], "", extra), Driver::IoUring)
}

/// An upstream `id` whose targets an SRV name gives, and its route `/id`.
fn srv_upstream(id: &str, srv: &str) -> String {
    format!(
        "[[upstreams]]\nid = \"{id}\"\ndiscovery = {{ dns_srv = \"{srv}\" }}\n\n\
         [[routes]]\nid = \"{id}\"\npath_prefix = \"/{id}\"\nupstream = \"{id}\"\n\n"
    )
}

/// The DNS server of `tests/dns_server.py` with its zone and query log.
struct Dns {
    child: Child,
    port: u16,
    zone: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Dns {
    fn start(zone: &serde_json::Value) -> Dns {
        let dir = temp_dir("dns");
        let (zone_path, log) = (dir.join("zone.json"), dir.join("queries.log"));
        std::fs::write(&zone_path, zone.to_string()).unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dns_server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(&zone_path)
            .arg(&log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs the test DNS server");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let Ok(port) = line.trim().parse() else {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("the test DNS server did not start (it needs the PyPI package dnslib): {err}");
        };
        Dns {
            child,
            port,
            zone: zone_path,
            log,
        }
    }

    fn set_zone(&self, zone: &serde_json::Value) {
        let tmp = self.zone.with_extension("tmp");
        std::fs::write(&tmp, zone.to_string()).unwrap();
        std::fs::rename(&tmp, &self.zone).unwrap();
    }

    /// When each query for `name` of `qtype` came (monotonic seconds).
    fn queries(&self, name: &str, qtype: &str) -> Vec<f64> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut p = l.split(' ');
                let (t, n, q) = (p.next()?, p.next()?, p.next()?);
                (n == name && q == qtype).then(|| t.parse().unwrap())
            })
            .collect()
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn discovery_follows_dns_answers_within_the_clamped_ttl_and_srv_weights() {
    let first = Backend::start("first", Mode::Answer);
    let port = first.addr.port();
    // The new address: the same port on another loopback address.
    let second = Backend::on(
        SocketAddr::from(([127, 0, 0, 2], port)),
        "second",
        Mode::Answer,
    );
    let heavy = Backend::start("heavy", Mode::Answer);
    let light = Backend::start("light", Mode::Answer);
    let spare = Backend::start("spare", Mode::Answer);
    let zone = |ip: &str| {
        serde_json::json!({
            "ttl": 0,
            "a": {
                "svc.test": [ip],
                "heavy.test": ["127.0.0.1"],
                "light.test": ["127.0.0.1"],
            },
            "srv": {"_http._tcp.pool.test": [
                [10, 30, heavy.addr.port(), "heavy.test"],
                [10, 10, light.addr.port(), "light.test"],
                [20, 50, light.addr.port(), "light.test"],
                [30, 50, spare.addr.port(), "light.test"],
            ]},
        })
    };
    let dns = Dns::start(&zone("127.0.0.1"));
    let extra = format!(
        "[resolver]\nnameservers = [\"127.0.0.1:{}\"]\nmin_ttl_ms = 1500\n\n{}",
        dns.port,
        srv_upstream("pool", "_http._tcp.pool.test")
    );
    let gw = with_svc_target(port, &extra);
    assert_eq!(get(&gw, "/x").body_str(), "first");
    let health = gw.admin("GET", "/v1/upstreams/u/health", None).json();
    assert_eq!(health["targets"][0]["host"], "svc.test");
    assert_eq!(health["targets"][0]["address"], first.addr.to_string());

    dns.set_zone(&zone("127.0.0.2"));
    let changed = Instant::now();
    loop {
        if get(&gw, "/x").body_str() == "second" {
            break;
        }
        // The clamped TTL (1.5 s) plus one second.
        assert!(
            changed.elapsed() < Duration::from_millis(2500),
            "traffic did not move"
        );
        thread::sleep(Duration::from_millis(20));
    }
    // Every later request goes to the new address.
    for _ in 0..5 {
        assert_eq!(get(&gw, "/x").body_str(), "second");
    }
    let asked = dns.queries("svc.test", "A");
    assert!(asked.len() >= 2, "{asked:?}");
    for pair in asked.windows(2) {
        // TTL 0 in the answers, clamped up to min_ttl_ms: no query before it ran out.
        assert!(pair[1] - pair[0] >= 1.45, "queries too close: {asked:?}");
    }

    // The name disappears (NXDOMAIN): the last good address stays, the failure is counted.
    let mut gone = zone("127.0.0.2");
    gone["a"].as_object_mut().unwrap().remove("svc.test");
    dns.set_zone(&gone);
    let failed = "gateway_dns_lookups_total{name=\"svc.test\",result=\"failed\"}";
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&gw, failed) == 0 {
        assert!(Instant::now() < deadline, "no failed lookup counted");
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(&gw, "/x").body_str(), "second");
    dns.set_zone(&zone("127.0.0.2"));

    // SRV: the lowest priority's records, in proportion to their weights (3:1); a record of
    // a later priority is a backup target (no requests while those are usable).
    let health = gw.admin("GET", "/v1/upstreams/pool/health", None).json();
    let spare_at = format!("127.0.0.1:{}", spare.addr.port());
    let listed: Vec<(&str, bool)> = (health["targets"].as_array().unwrap().iter())
        .map(|t| {
            (
                t["address"].as_str().unwrap(),
                t["backup"].as_bool().unwrap(),
            )
        })
        .collect();
    assert!(listed.contains(&(&spare_at, true)), "{health}");
    assert_eq!(listed.iter().filter(|(_, b)| !b).count(), 2, "{health}");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..200 {
        *seen
            .entry(get(&gw, "/pool").body_str().to_owned())
            .or_default() += 1;
    }
    assert_eq!(seen.get("heavy"), Some(&150), "{seen:?}");
    assert_eq!(seen.get("light"), Some(&50), "{seen:?}");

    // A record's host moves: the SRV upstream follows it too.
    let moved = Backend::on(
        SocketAddr::from(([127, 0, 0, 2], light.addr.port())),
        "moved",
        Mode::Answer,
    );
    let mut zone2 = zone("127.0.0.2");
    zone2["a"]["light.test"] = serde_json::json!(["127.0.0.2"]);
    dns.set_zone(&zone2);
    let changed = Instant::now();
    while !(0..4).any(|_| get(&gw, "/pool").body_str() == "moved") {
        assert!(
            changed.elapsed() < Duration::from_millis(2500),
            "the SRV upstream did not follow its record's host"
        );
        thread::sleep(Duration::from_millis(20));
    }
    drop((second, moved));
}

#[test]
fn a_resolver_change_asks_the_names_again_through_the_new_servers() {
    // Two DNS servers with other answers for svc.test, each for 300 s. The config moves
    // from the first to the second: the name is asked again at once (before: the first
    // answer was kept until its TTL ran out, and the new servers never asked meanwhile).
    let zone = |ip: &str| serde_json::json!({"ttl": 300, "a": {"svc.test": [ip]}});
    let (old, new) = (
        Dns::start(&zone("127.0.0.1")),
        Dns::start(&zone("127.0.0.2")),
    );
    let extra = format!("[resolver]\nnameservers = [\"127.0.0.1:{}\"]\n", old.port);
    let port = closed_port().port();
    let gw = with_svc_target(port, &extra);
    let address = |gw: &Gateway| {
        let health = gw.admin("GET", "/v1/upstreams/u/health", None).json();
        health["targets"][0]["address"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(address(&gw), format!("127.0.0.1:{port}"));
    let mut config = gw.admin("GET", "/v1/config", None).json();
    config["resolver"]["nameservers"] = serde_json::json!([format!("127.0.0.1:{}", new.port)]);
    let r = gw.admin("PUT", "/v1/config", Some(&config.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    let deadline = Instant::now() + Duration::from_secs(5);
    while address(&gw) != format!("127.0.0.2:{port}") {
        assert!(Instant::now() < deadline, "{}", address(&gw));
        thread::sleep(Duration::from_millis(20));
    }
    assert!(!new.queries("svc.test", "A").is_empty());
}

#[test]
fn srv_answers_are_read_as_rfc_2782_says_and_records_of_other_names_left_out() {
    // One SRV name with a port-0 record, three target hosts that never answer, a backup;
    // another whose only record is ".", the service not available there; and a host whose
    // A answer carries a record of another name. Before: a target IP:0 answering 502, the
    // silent hosts looked up one after another until the first lookup's bound dropped the
    // whole answer (503 at start), the backup counted as a failed lookup before it was ever
    // asked, the empty name "" asked every min_ttl_ms, and 127.0.0.9 made a target.
    let b = Backend::start("b", Mode::Answer);
    let port = b.addr.port();
    let dns = Dns::start(&serde_json::json!({
        "ttl": 60,
        "a": {"ok.test": ["127.0.0.1"], "zero.test": ["127.0.0.1"],
              "backup.test": ["127.0.0.3"], "svc.test": ["127.0.0.1"]},
        "srv": {
            "_h._tcp.main.test": [
                [10, 1, 0, "zero.test"], [10, 1, port, "ok.test"], [10, 1, port, "d1.test"],
                [10, 1, port, "d2.test"], [10, 1, port, "d3.test"], [20, 1, port, "backup.test"],
                // No host name: a quote and a line end, which went on into the metrics'
                // label (a line of its own) and the log.
                [10, 1, port, "ev\"il} 1\nfake_metric.test"],
            ],
            "_h._tcp.none.test": [[0, 0, 0, "."]],
        },
        "foreign": {"svc.test": [["other.test", "127.0.0.9"]]},
        "drop": ["d1.test", "d2.test", "d3.test"],
    }));
    let extra = format!(
        "[resolver]\nnameservers = [\"127.0.0.1:{}\"]\ntimeout_ms = 300\nmin_ttl_ms = 500\n\n{}{}",
        dns.port,
        srv_upstream("main", "_h._tcp.main.test"),
        srv_upstream("none", "_h._tcp.none.test")
    );
    let gw = with_svc_target(port, &extra);
    let targets = |upstream: &str| -> Vec<(String, bool)> {
        let health = gw.admin("GET", &format!("/v1/upstreams/{upstream}/health"), None);
        (health.json()["targets"].as_array().unwrap().iter())
            .map(|t| {
                let address = t["address"].as_str().unwrap().to_owned();
                (address, t["backup"].as_bool().unwrap())
            })
            .collect()
    };
    let at = |ip: &str| format!("{ip}:{port}");
    assert_eq!(
        targets("main"),
        [(at("127.0.0.1"), false), (at("127.0.0.3"), true)]
    );
    for _ in 0..4 {
        assert_eq!(get(&gw, "/main").body_str(), "b");
    }
    let failed = |name: &str| {
        metric(
            &gw,
            &format!("gateway_dns_lookups_total{{name=\"{name}\",result=\"failed\"}}"),
        )
    };
    assert_eq!(failed("backup.test"), 0);
    let metrics = gw.admin("GET", "/metrics", None).body_str().to_owned();
    assert!(
        !metrics.contains("fake_metric") && !metrics.contains("ev\""),
        "{metrics}"
    );
    gw.wait_log("is no host name: left out", Duration::from_secs(5));
    assert!(targets("none").is_empty());
    assert_eq!(get(&gw, "/none").status, 503);
    assert_eq!(targets("u"), [(at("127.0.0.1"), false)]);
    // Past a few min_ttl_ms: the "." target was never asked for as a host.
    thread::sleep(Duration::from_millis(1200));
    assert!(dns.queries("", "A").is_empty());
    drop(b);
}

#[test]
fn srv_target_hosts_are_looked_up_through_every_name_server() {
    // The first name server never answers: each lookup takes its timeout there, then the
    // second's answer. The target hosts' lookups are given that long too, and one that never
    // answers is cut before the first lookup's bound, so the SRV answer stands with the
    // others (before: one timeout, which left it without addresses; then, given a lookup's
    // time, the silent host took the whole answer past the bound: no targets at start).
    let b = Backend::start("b", Mode::Answer);
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = b.addr.port();
    let dns = Dns::start(&serde_json::json!({
        "ttl": 60,
        "a": {"ok.test": ["127.0.0.1"]},
        "srv": {"_h._tcp.main.test": [[10, 1, port, "ok.test"], [10, 1, port, "slow.test"]]},
        "drop": ["slow.test"],
    }));
    let extra = format!(
        "[resolver]\nnameservers = [\"{}\", \"127.0.0.1:{}\"]\ntimeout_ms = 300\n\n{}",
        silent.local_addr().unwrap(),
        dns.port,
        srv_upstream("main", "_h._tcp.main.test")
    );
    let gw = Gateway::start(&config(1, &[target(b.addr)], "", &extra), Driver::IoUring);
    assert_eq!(get(&gw, "/main").body_str(), "b");
}

#[test]
fn a_name_that_keeps_failing_is_logged_less_and_less_often() {
    // NXDOMAIN every 50 ms for a second: counted each time, logged at the 1st, 2nd, 4th,
    // 8th... failure in a row (before: a warning each time).
    let b = Backend::start("b", Mode::Answer);
    let dns = Dns::start(&serde_json::json!({"ttl": 60, "a": {"svc.test": ["127.0.0.1"]}}));
    let extra = format!(
        "[resolver]\nnameservers = [\"127.0.0.1:{}\"]\nmin_ttl_ms = 50\n\n",
        dns.port
    );
    let target = format!("{{ address = \"gone.test:{}\" }}", b.addr.port());
    let gw = Gateway::start(&config(1, &[target], "", &extra), Driver::IoUring);
    thread::sleep(Duration::from_millis(1000));
    // The log first: every failure it shows is counted by then.
    let logged = (gw.log_lines().iter())
        .filter(|l| l.contains("resolver: gone.test:"))
        .count() as u32;
    let failed = metric(
        &gw,
        "gateway_dns_lookups_total{name=\"gone.test\",result=\"failed\"}",
    );
    assert!(failed >= 10, "{failed}");
    // One line per power of two: 1, 2, 4, 8, ...
    let most = failed.ilog2() + 1;
    assert!(
        (4..=most).contains(&logged),
        "{logged} lines, {failed} failures"
    );
}

#[test]
fn a_failed_query_for_one_address_family_keeps_that_familys_addresses() {
    // A dual-stack name: when its A (then AAAA) query fails while the other answers, the
    // target keeps both addresses (it used to lose the failed family's on one lost query).
    let b = Backend::start("b", Mode::Answer);
    let port = b.addr.port();
    let zone = |servfail: &[&str]| {
        serde_json::json!({"ttl": 0, "a": {"dual.test": ["127.0.0.1"]},
            "aaaa": {"dual.test": ["::1"]}, "servfail": {"dual.test": servfail}})
    };
    let dns = Dns::start(&zone(&[]));
    let extra = format!(
        "[resolver]\nnameservers = [\"127.0.0.1:{}\"]\nmin_ttl_ms = 200\n",
        dns.port
    );
    let gw = Gateway::start(
        &config(
            1,
            &[format!("{{ address = \"dual.test:{port}\" }}")],
            "",
            &extra,
        ),
        Driver::IoUring,
    );
    let addresses = || -> Vec<String> {
        let health = gw.admin("GET", "/v1/upstreams/u/health", None).json();
        let mut a: Vec<String> = health["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["address"].as_str().unwrap().to_owned())
            .collect();
        a.sort();
        a
    };
    let both = vec![format!("127.0.0.1:{port}"), format!("[::1]:{port}")];
    let deadline = Instant::now() + Duration::from_secs(5);
    while addresses() != both {
        assert!(Instant::now() < deadline, "{:?}", addresses());
        thread::sleep(Duration::from_millis(20));
    }
    for failing in ["A", "AAAA"] {
        dns.set_zone(&zone(&[failing]));
        let asked = dns.queries("dual.test", failing).len();
        let deadline = Instant::now() + Duration::from_secs(5);
        // Two lookups after the change have failed for that family.
        while dns.queries("dual.test", failing).len() < asked + 2 {
            assert!(Instant::now() < deadline, "no new {failing} queries");
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(addresses(), both, "{failing} failing");
        dns.set_zone(&zone(&[]));
    }
    // The A query fails while the AAAA one answers that there are none (NODATA): the IPv6
    // address goes, the IPv4 one stays (before: the failure stood for both families, and
    // the removed address kept its traffic).
    dns.set_zone(
        &serde_json::json!({"ttl": 0, "a": {"dual.test": ["127.0.0.1"]},
        "servfail": {"dual.test": ["A"]}}),
    );
    let v4 = vec![format!("127.0.0.1:{port}")];
    let deadline = Instant::now() + Duration::from_secs(5);
    while addresses() != v4 {
        assert!(Instant::now() < deadline, "{:?}", addresses());
        thread::sleep(Duration::from_millis(20));
    }
}

/// A gateway with one target, `v4.test` (an IPv4-only name, TTL 60 s, resolver
/// `min_ttl_ms` 200), whose `failing` query (`A` or `AAAA`) the name server answers SERVFAIL:
/// the backend, the name server and the gateway.
fn v4_name_failing(failing: &str) -> (Backend, Dns, Gateway) {
    let b = Backend::start("b", Mode::Answer);
    let zone = serde_json::json!({"ttl": 60, "a": {"v4.test": ["127.0.0.1"]},
        "servfail": {"v4.test": [failing]}});
    let dns = Dns::start(&zone);
    let extra = format!(
        "[resolver]\nnameservers = [\"127.0.0.1:{}\"]\nmin_ttl_ms = 200\n",
        dns.port
    );
    let target = format!("{{ address = \"v4.test:{}\" }}", b.addr.port());
    let gw = Gateway::start(&config(1, &[target], "", &extra), Driver::IoUring);
    (b, dns, gw)
}

#[test]
fn a_family_that_always_fails_is_asked_less_and_less_often() {
    // A answers with a TTL of 60 s, AAAA always SERVFAIL (common): the AAAA query is retried
    // at min_ttl_ms (200 ms), then 400, 800, 1,600 ms... up to the answer's TTL. It was
    // asked every 200 ms for as long as the name was used, with a warning each time.
    let (_b, dns, gw) = v4_name_failing("AAAA");
    assert_eq!(get(&gw, "/x").body_str(), "b");
    thread::sleep(Duration::from_millis(3000));
    // Within 3 s: the first lookup's, then 0.2, 0.6, 1.4 and 3.0 s after it (15 at a
    // fixed 200 ms).
    let asked = dns.queries("v4.test", "AAAA").len();
    assert!((3..=6).contains(&asked), "{asked} AAAA queries in 3 s");
    assert_eq!(get(&gw, "/x").body_str(), "b");
}

#[test]
fn a_name_whose_only_family_fails_is_asked_again_at_min_ttl() {
    // An IPv4-only name whose A query fails while AAAA answers "none" (NODATA): no address
    // yet, and it is asked again every min_ttl_ms as a failed lookup is (a first version of
    // the NODATA fix gave it the failing family's growing pause: 0.2, 0.4, 0.8, 1.6 s...,
    // up to max_ttl_ms, 503 meanwhile).
    let (_b, dns, gw) = v4_name_failing("A");
    // Eight A queries within 5 s (at a doubling pause: 51 s).
    let deadline = Instant::now() + Duration::from_secs(5);
    while dns.queries("v4.test", "A").len() < 8 {
        assert!(
            Instant::now() < deadline,
            "{} A queries",
            dns.queries("v4.test", "A").len()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(&gw, "/x").status, 503);
    dns.set_zone(&serde_json::json!({"ttl": 60, "a": {"v4.test": ["127.0.0.1"]}}));
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&gw, "/x").status != 200 {
        assert!(Instant::now() < deadline, "still no address");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_first_lookup_that_waits_for_a_silent_name_server_holds_up_no_other_admin_call() {
    // A name server that takes queries and never answers: a write naming a new host waits
    // out the resolver's timeouts for its first lookup (before: under the admin store's
    // lock, so every other admin call, reads included, waited with it).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let extra = format!(
        "[resolver]\nnameservers = [\"{}\"]\ntimeout_ms = 1500\n",
        silent.local_addr().unwrap()
    );
    let gw = Gateway::start(
        &config(1, &["{ address = \"127.0.0.1:1\" }".into()], "", &extra),
        Driver::IoUring,
    );
    thread::scope(|s| {
        let slow = s.spawn(|| {
            gw.admin(
                "PUT",
                "/v1/upstreams/slow",
                Some(r#"{"targets":[{"address":"slow.test:80"}]}"#),
            )
        });
        // The write's lookup has begun once the name server has its query.
        silent
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut query = [0u8; 512];
        silent
            .recv(&mut query)
            .expect("the write's lookup reaches the name server");
        let read = gw.admin("GET", "/v1/upstreams", None);
        assert_eq!(read.status, 200, "{}", String::from_utf8_lossy(&read.body));
        let other = gw.admin(
            "PUT",
            "/v1/routes/other",
            Some(r#"{"path":"/other","respond":{"body":"o"}}"#),
        );
        assert_eq!(
            other.status,
            201,
            "{}",
            String::from_utf8_lossy(&other.body)
        );
        assert!(
            !slow.is_finished(),
            "the read and the other write waited for the lookup"
        );
        let slow = slow.join().unwrap();
        assert_eq!(slow.status, 201, "{}", String::from_utf8_lossy(&slow.body));
    });
    // Both writes landed, the slow one after the other.
    let config = gw.admin("GET", "/v1/config", None).json();
    let ids = |kind: &str| -> Vec<String> {
        config[kind]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(ids("upstreams").contains(&"slow".to_owned()), "{config}");
    assert!(ids("routes").contains(&"other".to_owned()), "{config}");
    assert_eq!(get(&gw, "/other").status, 200);
}

#[test]
fn retries_stay_within_the_budget_when_every_target_fails() {
    let a = Backend::start("a", Mode::Status(503));
    let b = Backend::start("b", Mode::Status(503));
    let settings =
        "retry = { attempts = 3, on = [\"503\"], budget_percent = 20, budget_min_per_s = 3 }";
    let gw = Gateway::start(
        &config(1, &[target(a.addr), target(b.addr)], settings, ""),
        Driver::IoUring,
    );
    let started = Instant::now();
    let mut c = gw.connect();
    let n = 150;
    for _ in 0..n {
        let r = c.roundtrip("GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(r.status, 503, "the last try's answer is relayed");
    }
    // Whole one-second windows the run touched (the window slides).
    let seconds = started.elapsed().as_secs() + 2;
    let tries = a.hits.load(SeqCst) + b.hits.load(SeqCst);
    let retries = (tries - n) as u64;
    // Per second: 20% of that second's requests, or 3, whichever is more.
    let bound = n as u64 * 20 / 100 + 3 * seconds;
    assert!(retries > 0, "failures were retried");
    assert!(
        retries <= bound,
        "{retries} retries for {n} requests (bound {bound})"
    );
    assert!(metric(&gw, "gateway_retry_budget_denied_total{upstream=\"u\"}") > 0);
}

#[test]
fn a_retry_tries_every_target_once_before_any_again() {
    // Three targets that all fail: each request's three tries go to the three of them,
    // whatever the balancing (hashing and least_request went back to a failed one before).
    for balance in [
        "hash\"\nhash_on = \"header:X-Key",
        "least_request",
        "round_robin",
    ] {
        let backends: Vec<Backend> = (0..3)
            .map(|i| Backend::start(&format!("t{i}"), Mode::Status(503)))
            .collect();
        let targets: Vec<String> = backends.iter().map(|b| target(b.addr)).collect();
        let settings = format!(
            "balance = \"{balance}\"\n\
             retry = {{ attempts = 3, on = [\"503\"], budget_min_per_s = 1000 }}"
        );
        let gw = Gateway::start(&config(1, &targets, &settings, ""), Driver::IoUring);
        let mut c = gw.connect();
        for k in 0..20 {
            let r = c.roundtrip(&format!(
                "GET /x HTTP/1.1\r\nHost: t\r\nX-Key: k{k}\r\n\r\n"
            ));
            assert_eq!(r.status, 503);
        }
        let hits: Vec<usize> = backends.iter().map(|b| b.hits.load(SeqCst)).collect();
        assert_eq!(hits, [20, 20, 20], "{balance}");
    }
}

#[test]
fn round_robin_goes_on_across_config_changes_that_leave_its_upstream_alone() {
    // A write between every two requests (a consumer, then a whole config with one more
    // upstream listed before `u`, which moves it to another index): the rotation goes on
    // (before: each revision restarted it, and every request went to the first target).
    let backends: Vec<Backend> = (0..3)
        .map(|i| Backend::start(&format!("t{i}"), Mode::Answer))
        .collect();
    let targets: Vec<String> = backends.iter().map(|b| target(b.addr)).collect();
    let gw = Gateway::start(&config(1, &targets, "", ""), Driver::IoUring);
    for i in 0..12 {
        assert_eq!(get(&gw, "/x").status, 200);
        let r = match i % 2 {
            0 => gw.admin("PUT", &format!("/v1/consumers/c{i}"), Some("{}")),
            _ => {
                let mut whole = gw.admin("GET", "/v1/config", None).json();
                let ups = whole["upstreams"].as_array_mut().unwrap();
                let first = serde_json::json!({"id": format!("a{i}"),
                                               "targets": [{"address": "127.0.0.1:9"}]});
                ups.insert(0, first);
                gw.admin("PUT", "/v1/config", Some(&whole.to_string()))
            }
        };
        assert!(r.status == 200 || r.status == 201, "{}", r.body_str());
    }
    let hits: Vec<usize> = backends.iter().map(|b| b.hits.load(SeqCst)).collect();
    assert_eq!(hits, [4, 4, 4]);
}

#[test]
fn hashing_keeps_keys_on_their_target_and_removing_one_of_ten_moves_a_tenth() {
    let backends: Vec<Backend> = (0..10)
        .map(|i| Backend::start(&format!("t{i}"), Mode::Answer))
        .collect();
    let targets: Vec<String> = backends.iter().map(|b| target(b.addr)).collect();
    let settings = "balance = \"hash\"\nhash_on = \"header:X-User-Id\"";
    let gw = Gateway::start(&config(2, &targets, settings, ""), Driver::IoUring);
    let mut c = gw.connect();
    let mut ask = |user: usize| {
        let r = c.roundtrip(&format!(
            "GET /x HTTP/1.1\r\nHost: t\r\nX-User-Id: user-{user}\r\n\r\n"
        ));
        r.body_str().to_owned()
    };
    let before: Vec<String> = (0..300).map(&mut ask).collect();
    let again: Vec<String> = (0..300).map(&mut ask).collect();
    assert_eq!(before, again, "the same key reaches the same target");
    let used: std::collections::HashSet<&String> = before.iter().collect();
    assert!(used.len() >= 8, "keys spread over the targets: {used:?}");

    let nine: Vec<serde_json::Value> = backends[..9]
        .iter()
        .map(|b| serde_json::json!({"address": b.addr.to_string()}))
        .collect();
    let body = serde_json::json!({"id": "u", "targets": nine, "balance": "hash", "hash_on": "header:X-User-Id"});
    let r = gw.admin("PUT", "/v1/upstreams/u", Some(&body.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    let mut c = gw.connect();
    let after: Vec<String> = (0..300)
        .map(|user| {
            c.roundtrip(&format!(
                "GET /x HTTP/1.1\r\nHost: t\r\nX-User-Id: user-{user}\r\n\r\n"
            ))
            .body_str()
            .to_owned()
        })
        .collect();
    let moved: Vec<usize> = (0..300).filter(|&k| before[k] != after[k]).collect();
    // Only the removed target's keys move, and they are about a tenth.
    assert!(moved.iter().all(|&k| before[k] == "t9"), "{moved:?}");
    assert_eq!(moved.len(), before.iter().filter(|t| *t == "t9").count());
    assert!(
        (12..=60).contains(&moved.len()),
        "{} of 300 moved",
        moved.len()
    );
}

#[test]
fn circuit_limits_answer_503_with_the_reason() {
    let slow = Backend::start("slow", Mode::Slow(Duration::from_millis(600)));
    let settings = "circuit = { max_requests = 2 }";
    let gw = Gateway::start(
        &config(1, &[target(slow.addr)], settings, ""),
        Driver::IoUring,
    );
    let addr = gw.addr;
    let busy: Vec<_> = (0..2)
        .map(|_| {
            thread::spawn(move || {
                Client::connect(addr)
                    .roundtrip("GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
                    .status
            })
        })
        .collect();
    while slow.hits.load(SeqCst) < 2 {
        thread::sleep(Duration::from_millis(5));
    }
    let mut c = gw.connect();
    let r = c.roundtrip("GET /b HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-gateway-reason"), Some("max_requests"));
    for t in busy {
        assert_eq!(t.join().unwrap(), 200);
    }
    // The client connection stays usable, and so does the upstream once below the limit.
    assert_eq!(
        c.roundtrip("GET /c HTTP/1.1\r\nHost: t\r\n\r\n").status,
        200
    );
    assert_eq!(
        metric(
            &gw,
            "gateway_circuit_rejected_total{upstream=\"u\",reason=\"max_requests\"}"
        ),
        1
    );
    drop(gw);

    // max_pending: a target whose accept queue is full leaves connects hanging.
    let stuck = StuckTarget::start();
    let stuck_addr = stuck.addr;
    let settings = "circuit = { max_pending = 1, max_connections = 100 }";
    let gw = Gateway::start(
        &config(
            1,
            &[target(stuck_addr)],
            settings,
            "[timeouts]\nupstream_connect_ms = 1500\n",
        ),
        Driver::IoUring,
    );
    let addr = gw.addr;
    let waiting = thread::spawn(move || {
        Client::connect(addr)
            .roundtrip("GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
            .status
    });
    thread::sleep(Duration::from_millis(300));
    let r = gw.connect().roundtrip("GET /b HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(
        (r.status, r.header("x-gateway-reason")),
        (503, Some("max_pending"))
    );
    assert_eq!(
        waiting.join().unwrap(),
        504,
        "the pending one times out connecting"
    );
    // The refusal left the count as it was: with nothing pending, the next request may wait
    // for its connect again. (Before, the refusal took one off the count, which went below
    // zero when the pending one ended: every later connect was a 503 max_pending.)
    let r = gw.connect().roundtrip("GET /c HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((r.status, r.header("x-gateway-reason")), (504, None));
    drop(stuck);
}

/// A GET of `path` on its own connection, from a thread, once `backend` (which has answered
/// nothing yet) holds it: the thread gives the status.
fn in_flight_at(gw: &Gateway, backend: &Backend, path: &str) -> thread::JoinHandle<u16> {
    let (addr, request) = (gw.addr, format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n"));
    let answer = thread::spawn(move || Client::connect(addr).roundtrip(&request).status);
    while backend.hits.load(SeqCst) < 1 {
        thread::sleep(Duration::from_millis(5));
    }
    answer
}

#[test]
fn lowering_max_idle_per_target_closes_the_idle_connections_past_it() {
    // Four connections pooled; the limit lowered to 1, then 0 (pooling off): the ones past
    // it close within a sweep, and with 0 the next request opens its own (before: all four
    // stayed, and served, until their idle timeout).
    let slow = Backend::start("slow", Mode::Slow(Duration::from_millis(300)));
    let gw = Gateway::start(&config(1, &[target(slow.addr)], "", ""), Driver::IoUring);
    let busy: Vec<_> = (0..4)
        .map(|i| {
            let addr = gw.addr;
            thread::spawn(move || {
                let req = format!("GET /{i} HTTP/1.1\r\nHost: t\r\n\r\n");
                Client::connect(addr).roundtrip(&req).status
            })
        })
        .collect();
    for b in busy {
        assert_eq!(b.join().unwrap(), 200);
    }
    assert_eq!(slow.conns.lock().unwrap().len(), 4);
    let closed_within = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while slow.closed.load(SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "{} closed",
                slow.closed.load(SeqCst)
            );
            thread::sleep(Duration::from_millis(20));
        }
    };
    for (most, closed) in [(1, 3), (0, 4)] {
        let mut whole = gw.admin("GET", "/v1/config", None).json();
        whole["upstream_pool"]["max_idle_per_target"] = serde_json::json!(most);
        let r = gw.admin("PUT", "/v1/config", Some(&whole.to_string()));
        assert_eq!(r.status, 200, "{}", r.body_str());
        closed_within(closed);
    }
    assert_eq!(get(&gw, "/x").status, 200);
    assert_eq!(slow.conns.lock().unwrap().len(), 5);
}

#[test]
fn a_gateway_out_of_file_descriptors_blames_no_target() {
    // The gateway's own fd limit reached: a request that needs an upstream connection is a
    // 503 `no_socket`, the (healthy) target is neither ejected nor checked unhealthy, and
    // once fds are free again it serves (before: 502 `connect_failed`, counted against the
    // target, which was ejected; and its active checks failed).
    let ok = Backend::start("ok", Mode::Answer);
    let settings = "passive = { consecutive_failures = 2, ejection_ms = 30000 }\n\
                    health_check = { path = \"/healthz\", interval_ms = 100, timeout_ms = 100, \
                    healthy_after = 50, unhealthy_after = 1 }";
    let top = "[upstream_pool]\nmax_idle_per_target = 0\n";
    let gw = Gateway::start(
        &config(1, &[target(ok.addr)], settings, top),
        Driver::IoUring,
    );
    let mut c = gw.connect();
    let ask = |c: &mut Client| c.roundtrip("GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(ask(&mut c).status, 200);
    // New descriptors take the lowest free numbers: a limit of as many as are open, and 8,
    // leaves 8 (those open above it, the io_uring ring's, stay).
    let open = std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
        .unwrap()
        .count() as u64;
    let limit = libc::rlimit {
        rlim_cur: open + 8,
        rlim_max: open + 8,
    };
    // SAFETY: sets a resource limit of a child process this test started; no pointers kept.
    let set = unsafe { libc::prlimit(gw.pid(), libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
    // Idle clients take every descriptor left (the accepts past them fail).
    let idle: Vec<Client> = (0..40).map(|_| gw.connect()).collect();
    // Long enough for a few health checks.
    thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let r = ask(&mut c);
        assert_eq!(
            (r.status, r.header("x-gateway-reason")),
            (503, Some("no_socket")),
            "{}",
            r.head
        );
    }
    // (The admin API, in the same process, needs a descriptor too.)
    drop(idle);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        states(&gw).get(&ok.addr.to_string()).map(String::as_str),
        Some("healthy")
    );
    assert!(
        metric(
            &gw,
            "gateway_errors_total{side=\"gateway\",kind=\"no_socket\"}"
        ) >= 3
    );
    assert_eq!(ask(&mut c).status, 200);
}

#[test]
fn max_connections_counts_pooled_connections() {
    let slow = Backend::start("slow", Mode::Slow(Duration::from_millis(400)));
    let settings = "circuit = { max_connections = 1 }";
    let log = temp_dir("max-connections").join("access.log");
    let top = format!("[access_log]\npath = \"{}\"\n", log.display());
    let gw = Gateway::start(
        &config(1, &[target(slow.addr)], settings, &top),
        Driver::IoUring,
    );
    let first = in_flight_at(&gw, &slow, "/a");
    // The one connection is busy: a second request would need a new one.
    let r = gw.connect().roundtrip("GET /b HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(
        (r.status, r.header("x-gateway-reason")),
        (503, Some("max_connections"))
    );
    assert_eq!(first.join().unwrap(), 200);
    // Pooled again, it serves the next request.
    assert_eq!(get(&gw, "/c").status, 200);
    // The refused request never reached the target: two requests, not three, and no
    // target in its log line.
    let series = format!(
        "gateway_target_requests_total{{upstream=\"u\",target=\"{}\"}}",
        slow.addr
    );
    assert_eq!(metric(&gw, &series), 2);
    let lines = wait_log_lines(&log, 3);
    let refused = (lines.iter())
        .find(|l| l["path"] == "/b")
        .expect("the refused request's line");
    assert_eq!(refused["error"], "circuit_max_connections", "{refused}");
    assert_eq!(refused["target"], serde_json::Value::Null, "{refused}");
    let served = lines.iter().find(|l| l["path"] == "/c").unwrap();
    assert_eq!(served["target"], slow.addr.to_string(), "{served}");
}

#[test]
fn a_retry_the_circuit_refuses_is_no_retry_sent() {
    // Two connections allowed: /a holds one on the slow target, /b takes the other to the
    // failing one, and while its retry waits its backoff, /c takes the place /b's closed
    // connection left. The retry, which would need a third, is refused: it reached no
    // target, so it is not counted as a retry of the slow one's, nor in the log's `retries`
    // (before: both, one each).
    let slow = Backend::start("slow", Mode::Slow(Duration::from_millis(2500)));
    let fail = Backend::start("fail", Mode::Status(503));
    let settings = "circuit = { max_connections = 2 }\n\
                    retry = { attempts = 2, on = [\"503\"], budget_min_per_s = 1000, \
                    backoff_ms = 1000 }";
    let log = temp_dir("circuit-retry").join("access.log");
    let top = format!("[access_log]\npath = \"{}\"\n", log.display());
    let targets = [target(slow.addr), target(fail.addr)];
    let gw = Gateway::start(&config(1, &targets, settings, &top), Driver::IoUring);
    let a = in_flight_at(&gw, &slow, "/a");
    let addr = gw.addr;
    let b = thread::spawn(move || {
        let r = Client::connect(addr).roundtrip("GET /b HTTP/1.1\r\nHost: t\r\n\r\n");
        (r.status, r.header("x-gateway-reason").map(str::to_owned))
    });
    // /b's first try is over (its connection closed) once it is outstanding nowhere.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let health = gw.admin("GET", "/v1/upstreams/u/health", None).json();
        let out = |i: usize| health["targets"][i]["outstanding"].as_u64();
        if fail.hits.load(SeqCst) == 1 && out(1) == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "{health}");
        thread::sleep(Duration::from_millis(10));
    }
    let c = thread::spawn(move || {
        let r = Client::connect(addr).roundtrip("GET /c HTTP/1.1\r\nHost: t\r\n\r\n");
        r.status
    });
    assert_eq!(b.join().unwrap(), (503, Some("max_connections".to_owned())));
    assert_eq!((a.join().unwrap(), c.join().unwrap()), (200, 200));
    assert_eq!((slow.hits.load(SeqCst), fail.hits.load(SeqCst)), (2, 1));
    for t in [slow.addr, fail.addr] {
        let series = format!("gateway_target_retries_total{{upstream=\"u\",target=\"{t}\"}}");
        assert_eq!(metric(&gw, &series), 0, "{series}");
    }
    let lines = wait_log_lines(&log, 3);
    let refused = lines.iter().find(|l| l["path"] == "/b").unwrap();
    assert_eq!(refused["retries"], 0, "{refused}");
    assert_eq!(refused["error"], "circuit_max_connections", "{refused}");
    assert_eq!(refused["target"], fail.addr.to_string(), "{refused}");
}

#[test]
fn a_pooled_connection_its_target_closed_holds_no_place_in_max_connections() {
    // Each target answers keep-alive, then closes. Before: the closed connection, pooled
    // for the first target, was found only by a request to that target, and held the one
    // place until the idle timeout: the other target's request got 503 max_connections.
    let closing = || {
        Origin::start(Arc::new(|_: &Received, s: &mut TcpStream| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            Keep::Close
        }))
    };
    let (a, b) = (closing(), closing());
    let settings = "circuit = { max_connections = 1 }";
    let gw = Gateway::start(
        &config(1, &[target(a.addr), target(b.addr)], settings, ""),
        Driver::IoUring,
    );
    for path in ["/1", "/2", "/3", "/4"] {
        let r = get(&gw, path);
        assert_eq!(r.status, 200, "{path}: {}", r.head);
        // The target's close reaches the pooled connection.
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!((a.requests().len(), b.requests().len()), (2, 2));
}

#[test]
fn a_connection_limit_set_at_runtime_counts_the_connections_already_open() {
    // Before: connections opened while the upstream had no circuit were never counted, so a
    // limit set later let as many more open.
    let slow = Backend::start("slow", Mode::Slow(Duration::from_millis(400)));
    let gw = Gateway::start(&config(1, &[target(slow.addr)], "", ""), Driver::IoUring);
    assert_eq!(get(&gw, "/pooled").status, 200);
    let r = gw.admin(
        "PATCH",
        "/v1/upstreams/u",
        Some(r#"{"circuit": {"max_connections": 1}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body_str());
    // The pooled connection, busy; a second request would need another.
    let (addr, hits) = (gw.addr, slow.hits.clone());
    let first = thread::spawn(move || {
        Client::connect(addr)
            .roundtrip("GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
            .status
    });
    while hits.load(SeqCst) < 2 {
        thread::sleep(Duration::from_millis(5));
    }
    let r = gw.connect().roundtrip("GET /b HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(
        (r.status, r.header("x-gateway-reason")),
        (503, Some("max_connections"))
    );
    assert_eq!(first.join().unwrap(), 200);
}

#[test]
fn upstreams_sharing_a_target_keep_their_connections_apart() {
    // `a` allows one connection, `b` (the same target) any number. A request to `b` used to
    // take `a`'s pooled connection, still counted in `a`'s limit, so a request to `a` meanwhile
    // found its one connection busy: 503 with nothing in flight for `a`.
    let slow = Backend::start("slow", Mode::Slow(Duration::from_millis(300)));
    let config = format!(
        "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\
         [[upstreams]]\nid = \"a\"\ntargets = [{t}]\ncircuit = {{ max_connections = 1 }}\n\
         [[upstreams]]\nid = \"b\"\ntargets = [{t}]\n\
         [[routes]]\nid = \"a\"\npath_prefix = \"/a/\"\nupstream = \"a\"\n\
         [[routes]]\nid = \"b\"\npath_prefix = \"/b/\"\nupstream = \"b\"\n",
        t = target(slow.addr)
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    assert_eq!(get(&gw, "/a/1").status, 200);
    let busy = {
        let addr = gw.addr;
        thread::spawn(move || {
            Client::connect(addr)
                .roundtrip("GET /b/1 HTTP/1.1\r\nHost: t\r\n\r\n")
                .status
        })
    };
    while slow.hits.load(SeqCst) < 2 {
        thread::sleep(Duration::from_millis(5));
    }
    let r = get(&gw, "/a/2");
    assert_eq!(
        (r.status, r.header("x-gateway-reason")),
        (200, None),
        "{}",
        r.body_str()
    );
    assert_eq!(busy.join().unwrap(), 200);
    // One connection each.
    assert_eq!(slow.conns.lock().unwrap().len(), 2);
    // The target drains in `a` only: `a`'s pooled connection closes at the worker's next
    // sweep (it would hold a place in `a`'s limit, and nothing else may take it), `b`'s stays.
    let body = serde_json::json!({"id": "a", "targets": [
        {"address": slow.addr.to_string(), "draining": true},
    ]});
    let r = gw.admin("PUT", "/v1/upstreams/a", Some(&body.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    let deadline = Instant::now() + Duration::from_secs(3);
    while slow.closed.load(SeqCst) < 1 {
        assert!(
            Instant::now() < deadline,
            "a's pooled connection stayed open"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(&gw, "/b/2").status, 200);
    assert_eq!(
        (slow.conns.lock().unwrap().len(), slow.closed.load(SeqCst)),
        (2, 1),
        "b's pooled connection was closed"
    );
}

#[test]
fn max_connections_holds_for_connections_being_opened() {
    // Eight requests at once and none open yet: each checked the count before any connect
    // had finished, and all went ahead. Connections being opened now count.
    let slow = Backend::start("slow", Mode::Slow(Duration::from_millis(500)));
    let settings = "circuit = { max_connections = 2 }";
    let gw = Gateway::start(
        &config(1, &[target(slow.addr)], settings, ""),
        Driver::IoUring,
    );
    let mut clients: Vec<Client> = (0..8).map(|_| gw.connect()).collect();
    for c in &mut clients {
        c.send(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n");
    }
    let mut statuses: Vec<u16> = clients
        .iter_mut()
        .map(|c| c.read_response_to("GET").status)
        .collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 503, 503, 503, 503, 503, 503]);
    assert_eq!(slow.conns.lock().unwrap().len(), 2);
}

/// An origin that misbehaves after some answers: `/close` answers and closes 20 ms later
/// without saying so (no `Connection: close`); a HEAD gets its head, then 20 ms later the
/// body it should not have (a buggy framework); `/twice` is answered, then 20 ms later
/// answered again. Everything else is answered `ok`, or its target when it is `/echo...`.
fn sloppy_origin() -> Origin {
    Origin::start(Arc::new(|req: &Received, s: &mut TcpStream| {
        let head = req.request_line().starts_with("HEAD ");
        if req.target().starts_with("/echo") {
            let t = req.target();
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{t}",
                t.len()
            );
            return Keep::Open;
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n");
        if !head {
            let _ = s.write_all(b"ok");
        }
        if head || req.target() == "/close" || req.target() == "/twice" {
            thread::sleep(Duration::from_millis(20));
        }
        if head {
            let _ = s.write_all(b"ok");
        }
        if req.target() == "/twice" {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale");
        }
        match req.target() == "/close" {
            true => Keep::Close,
            false => Keep::Open,
        }
    }))
}

#[test]
fn a_pooled_connection_that_went_bad_is_not_used() {
    // Both drivers: a pooled connection's armed read is an io_uring receive on one, a
    // readiness wait on the other.
    for driver in [Driver::IoUring, Driver::Epoll] {
        pooled_connections_that_went_bad_are_not_used(driver);
    }
}

fn pooled_connections_that_went_bad_are_not_used(driver: Driver) {
    let origin = sloppy_origin();
    let gw = Gateway::start(&config(1, &[target(origin.addr)], "", ""), driver);
    let mut c = gw.connect();
    // A POST cannot be sent again on a fresh connection, so its pooled one is looked at
    // before use, however short its idle time: this one was closed by the upstream.
    for _ in 0..3 {
        let r = c.roundtrip("POST /close HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx");
        assert_eq!((r.status, r.body_str()), (200, "ok"));
        thread::sleep(Duration::from_millis(50));
    }
    // After an answer to HEAD, bytes the upstream sent unasked are not taken for the next
    // request's answer.
    let r = c.roundtrip("HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
    thread::sleep(Duration::from_millis(50));
    let r = c.roundtrip("GET /echo-after-head HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((r.status, r.body_str()), (200, "/echo-after-head"));
    // Nor a second answer to one request: each client gets the answer to its own, never
    // the one before (which would then shift every later answer on the connection).
    let r = c.roundtrip("GET /twice HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((r.status, r.body_str()), (200, "ok"));
    thread::sleep(Duration::from_millis(50));
    for n in 0..3 {
        let target = format!("/echo-{n}");
        let r = gw
            .connect()
            .roundtrip(&format!("GET {target} HTTP/1.1\r\nHost: t\r\n\r\n"));
        assert_eq!((r.status, r.body_str()), (200, target.as_str()));
    }
}

#[test]
fn a_draining_target_finishes_in_flight_requests_and_gets_no_new_ones() {
    let old = Backend::start("old", Mode::Slow(Duration::from_millis(500)));
    let new = Backend::start("new", Mode::Answer);
    let gw = Gateway::start(
        &config(1, &[target(old.addr), target(new.addr)], "", ""),
        Driver::IoUring,
    );
    // Warm a pooled connection to each.
    let mut c = gw.connect();
    for _ in 0..2 {
        assert_eq!(
            c.roundtrip("GET /w HTTP/1.1\r\nHost: t\r\n\r\n").status,
            200
        );
    }
    assert_eq!(old.hits.load(SeqCst), 1);
    let addr = gw.addr;
    let in_flight = thread::spawn(move || {
        let mut c = Client::connect(addr);
        let mut bodies = Vec::new();
        for _ in 0..2 {
            let r = c.roundtrip("GET /slow HTTP/1.1\r\nHost: t\r\n\r\n");
            assert_eq!(r.status, 200);
            bodies.push(r.body_str().to_owned());
        }
        bodies
    });
    while old.hits.load(SeqCst) < 2 {
        thread::sleep(Duration::from_millis(5));
    }
    let body = serde_json::json!({"id": "u", "targets": [
        {"address": old.addr.to_string(), "draining": true},
        {"address": new.addr.to_string()},
    ]});
    let r = gw.admin("PUT", "/v1/upstreams/u", Some(&body.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(states(&gw)[&old.addr.to_string()], "draining");
    let bodies = in_flight.join().unwrap();
    assert!(
        bodies.contains(&"old".to_owned()),
        "the in-flight request finished: {bodies:?}"
    );
    let hits = old.hits.load(SeqCst);
    for _ in 0..6 {
        assert_eq!(get(&gw, "/n").body_str(), "new");
    }
    assert_eq!(
        old.hits.load(SeqCst),
        hits,
        "no new requests to a draining target"
    );
    // Its pooled connections close (the worker's next sweep, within about a second).
    let deadline = Instant::now() + Duration::from_secs(3);
    let opened = old.conns.lock().unwrap().len();
    assert!(opened >= 1);
    while old.closed.load(SeqCst) < opened {
        assert!(
            Instant::now() < deadline,
            "pooled connections to old stayed open"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_config_change_keeps_the_upstream_connections_of_requests_in_flight() {
    let slow = Backend::start("slow", Mode::Slow(Duration::from_millis(300)));
    let gw = Gateway::start(&config(1, &[target(slow.addr)], "", ""), Driver::IoUring);
    let in_flight = in_flight_at(&gw, &slow, "/slow");
    // A change that leaves the target be, while its connection carries a request.
    let r = gw.admin(
        "PUT",
        "/v1/routes/other",
        Some(r#"{"path":"/other","respond":{}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body_str());
    assert_eq!(in_flight.join().unwrap(), 200);
    // The next request goes over that connection: it was pooled, not closed.
    assert_eq!(get(&gw, "/again").status, 200);
    assert_eq!(slow.hits.load(SeqCst), 2);
    assert_eq!(
        slow.conns.lock().unwrap().len(),
        1,
        "the connection in use at the change was closed and another opened"
    );
}

#[test]
fn failing_targets_are_ejected_for_a_growing_time_and_come_back() {
    let good = Backend::start("good", Mode::Answer);
    let bad = Backend::start("bad", Mode::Status(500));
    let settings =
        "passive = { consecutive_failures = 3, ejection_ms = 600, max_ejected_percent = 50 }";
    let gw = Gateway::start(
        &config(1, &[target(good.addr), target(bad.addr)], settings, ""),
        Driver::IoUring,
    );
    let mut c = gw.connect();
    let mut send = |n: usize| -> Vec<u16> {
        (0..n)
            .map(|_| c.roundtrip("GET /x HTTP/1.1\r\nHost: t\r\n\r\n").status)
            .collect()
    };
    // Round robin: every other request reaches bad until its third 500 in a row.
    let statuses = send(10);
    assert_eq!(
        statuses.iter().filter(|&&s| s == 500).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(states(&gw)[&bad.addr.to_string()], "ejected");
    // Health is keyed by upstream and address: an unrelated change keeps it.
    let route = r#"{"path": "/other", "respond": {"status": 204}}"#;
    let r = gw.admin("PUT", "/v1/routes/other", Some(route));
    assert_eq!(r.status, 201, "{}", r.body_str());
    assert_eq!(states(&gw)[&bad.addr.to_string()], "ejected");
    let hits = bad.hits.load(SeqCst);
    assert!(send(6).iter().all(|&s| s == 200));
    assert_eq!(
        bad.hits.load(SeqCst),
        hits,
        "an ejected target gets no requests"
    );
    // Back after ejection_ms, failing again: ejected again, for twice as long.
    let waited = wait_state(&gw, bad.addr, "healthy", Duration::from_secs(3));
    assert!(waited >= Duration::from_millis(400), "{waited:?}");
    send(10);
    assert_eq!(states(&gw)[&bad.addr.to_string()], "ejected");
    let again = wait_state(&gw, bad.addr, "healthy", Duration::from_secs(5));
    assert!(
        again >= Duration::from_millis(1000),
        "the second ejection lasts 2 x 600 ms: {again:?}"
    );
    let health = gw.admin("GET", "/v1/upstreams/u/health", None).json();
    assert_eq!(health["targets"][1]["ejections"], 2);
    assert_eq!(
        metric(
            &gw,
            &format!(
                "gateway_target_errors_total{{upstream=\"u\",target=\"{}\",kind=\"status_5xx\"}}",
                bad.addr
            )
        ),
        6
    );
}

#[test]
fn a_target_that_cuts_its_answers_short_is_counted_and_ejected() {
    // The head is fine, the body ends early: the client's answer is cut, and the target
    // failed it as much as one that closes before answering (before: counted a success,
    // never ejected, no target error).
    let good = Backend::start("good", Mode::Answer);
    let cut = Backend::start("cut", Mode::CutBody(200));
    let cut_5xx = Backend::start("cut-5xx", Mode::CutBody(503));
    let settings =
        "passive = { consecutive_failures = 2, ejection_ms = 60000, max_ejected_percent = 50 }";
    let targets = [target(good.addr), target(cut.addr), target(cut_5xx.addr)];
    let gw = Gateway::start(&config(1, &targets, settings, ""), Driver::IoUring);
    let send = |n: usize| {
        for _ in 0..n {
            gw.connect().get_to_close("/x");
        }
    };
    let errors = |t: &Backend, kind: &str| {
        metric(
            &gw,
            &format!(
                "gateway_target_errors_total{{upstream=\"u\",target=\"{}\",kind=\"{kind}\"}}",
                t.addr
            ),
        )
    };
    // Round robin: each target once. A 503 cut short is one failure (its status), not two.
    send(3);
    let health = gw.admin("GET", "/v1/upstreams/u/health", None).json();
    let streaks: Vec<&serde_json::Value> = (0..3)
        .map(|i| &health["targets"][i]["consecutive_failures"])
        .collect();
    assert_eq!(streaks, [0, 1, 1], "{health}");
    assert_eq!(errors(&cut_5xx, "status_5xx"), 1);
    // The second failure in a row ejects each: a cut body counts as a failure after all,
    // though its head's success ended the streak first.
    send(3);
    assert_eq!(states(&gw)[&cut.addr.to_string()], "ejected");
    assert_eq!(cut.hits.load(SeqCst), 2);
    assert_eq!(errors(&cut, "upstream_closed"), 2);
    assert_eq!(errors(&cut_5xx, "status_5xx"), 2);
    assert_eq!(errors(&cut_5xx, "upstream_closed"), 0);
}

#[test]
fn when_every_target_fails_its_checks_requests_still_go_to_them() {
    let a = Backend::start("a", Mode::SickCheck);
    let b = Backend::start("b", Mode::SickCheck);
    let settings = "health_check = { path = \"/healthz\", interval_ms = 100, timeout_ms = 50, unhealthy_after = 1 }";
    let gw = Gateway::start(
        &config(1, &[target(a.addr), target(b.addr)], settings, ""),
        Driver::IoUring,
    );
    wait_state(&gw, a.addr, "unhealthy", Duration::from_secs(3));
    wait_state(&gw, b.addr, "unhealthy", Duration::from_secs(3));
    // Panic mode: both are down, so both still get their share.
    let bodies: std::collections::HashSet<String> = (0..4)
        .map(|_| get(&gw, "/x").body_str().to_owned())
        .collect();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    // Without active checks, nothing holds them unhealthy any more.
    let body = serde_json::json!({"id": "u", "targets": [
        {"address": a.addr.to_string()}, {"address": b.addr.to_string()},
    ]});
    let r = gw.admin("PUT", "/v1/upstreams/u", Some(&body.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    let health = gw.admin("GET", "/v1/upstreams/u/health", None).json();
    for t in health["targets"].as_array().unwrap() {
        assert_eq!(t["state"], "healthy", "{t}");
        assert_eq!(t["last_check"], serde_json::Value::Null, "{t}");
    }
}

#[test]
fn an_upstream_has_timeouts_of_its_own() {
    // One target answering after 600 ms, behind two upstreams: `quick` keeps the global
    // `upstream_response_head_ms` (300: 504), `patient` has its own (3,000: answered), for a
    // proxied request and an aggregate's step alike.
    let slow = Backend::start("{\"slow\":1}", Mode::Slow(Duration::from_millis(600)));
    let config = format!(
        "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\
         [timeouts]\nupstream_response_head_ms = 300\n\
         [[upstreams]]\nid = \"quick\"\ntargets = [{t}]\n\
         [[upstreams]]\nid = \"patient\"\ntargets = [{t}]\n\
         timeouts = {{ response_head_ms = 3000 }}\n\
         [[aggregates]]\nid = \"agg\"\n\
         steps = [{{ id = \"s\", upstream = \"patient\", path = \"/s\" }}]\n\
         [[routes]]\nid = \"quick\"\npath = \"/quick\"\nupstream = \"quick\"\n\
         [[routes]]\nid = \"patient\"\npath = \"/patient\"\nupstream = \"patient\"\n\
         [[routes]]\nid = \"agg\"\npath = \"/agg\"\naggregate = \"agg\"\n",
        t = target(slow.addr)
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    assert_eq!(get(&gw, "/quick").status, 504);
    let r = get(&gw, "/patient");
    assert_eq!((r.status, r.body_str()), (200, "{\"slow\":1}"));
    let r = get(&gw, "/agg");
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert!(r.body_str().contains("\"slow\":1"), "{}", r.body_str());
    // Out of range: refused, naming the field.
    let e = gw.admin(
        "PATCH",
        "/v1/upstreams/patient",
        Some(r#"{"timeouts": {"body_ms": 0}}"#),
    );
    assert_eq!(e.status, 422, "{}", e.body_str());
    assert!(
        e.body_str().contains("timeouts.body_ms"),
        "{}",
        e.body_str()
    );
}

#[test]
fn a_retry_waits_its_backoff() {
    // Two targets that answer 503 and note when; one retry, with a 600 ms backoff: the
    // second try comes 300 to 600 ms after the first (plus the time a try takes), not at
    // once, and the first try's connection is closed before the wait, not held through it.
    // The request's answer is the last try's.
    let seen: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let closed: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let busy = || {
        let (seen, closed) = (seen.clone(), closed.clone());
        Origin::start(Arc::new(move |_req: &Received, s: &mut TcpStream| {
            seen.lock().unwrap().push(Instant::now());
            let _ = s.write_all(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy");
            // Until the gateway closes the connection (or sends another request).
            let _ = s.read(&mut [0u8; 1]);
            closed.lock().unwrap().push(Instant::now());
            Keep::Close
        }))
    };
    let (a, b) = (busy(), busy());
    let settings = "retry = { attempts = 2, on = [\"503\"], budget_min_per_s = 1000, \
                    backoff_ms = 600 }";
    let targets = [target(a.addr), target(b.addr)];
    let gw = Gateway::start(&config(1, &targets, settings, ""), Driver::IoUring);
    let r = get(&gw, "/x");
    assert_eq!(r.status, 503, "{}", r.body_str());
    let times = seen.lock().unwrap().clone();
    assert_eq!(times.len(), 2, "one try on each target");
    let gap = times[1] - times[0];
    assert!(
        gap >= Duration::from_millis(300),
        "the retry came after {gap:?}"
    );
    assert!(gap < Duration::from_secs(5), "the retry came after {gap:?}");
    let first_closed = closed.lock().unwrap().first().copied();
    let first_closed = first_closed.expect("the first try's connection closed by the retry");
    assert!(
        times[1] - first_closed >= Duration::from_millis(250),
        "the first try's connection closed {:?} before the retry",
        times[1] - first_closed
    );
}

#[test]
fn overall_timeout_ms_bounds_the_tries_together() {
    // Three silent targets, five tries of 400 ms each: 2 s of tries, cut at 1 s by
    // `overall_timeout_ms`. Tries start at 0, 400 and 800 ms; the third is cut at 1,000 ms
    // (its own bound would be 1,200) and no fourth starts: 504 after three tries.
    let silent: Vec<Backend> = (0..3)
        .map(|n| Backend::start(&format!("s{n}"), Mode::Silent))
        .collect();
    let targets: Vec<String> = silent.iter().map(|b| target(b.addr)).collect();
    let settings = "retry = { attempts = 5, on = [\"timeout\"], budget_min_per_s = 1000, \
                    per_try_timeout_ms = 400, overall_timeout_ms = 1000 }";
    let gw = Gateway::start(&config(1, &targets, settings, ""), Driver::IoUring);
    let started = Instant::now();
    let r = get(&gw, "/x");
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.body_str());
    let tries: usize = silent.iter().map(|b| b.hits.load(SeqCst)).sum();
    assert_eq!(tries, 3, "tries within 1 s (took {took:?})");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(1900),
        "answered after {took:?}"
    );

    // A backoff that would end past the bound is not waited: the first try's 503 stands.
    // Nor does the retry not sent take from the budget (3 a second here): before, the first
    // three took it all, and the next two were counted as denied by it.
    let busy = [
        Backend::start("b1", Mode::Status(503)),
        Backend::start("b2", Mode::Status(503)),
    ];
    let targets: Vec<String> = busy.iter().map(|b| target(b.addr)).collect();
    let settings = "retry = { attempts = 2, on = [\"503\"], budget_percent = 0, \
                    budget_min_per_s = 3, backoff_ms = 2000, overall_timeout_ms = 800 }";
    let gw = Gateway::start(&config(1, &targets, settings, ""), Driver::IoUring);
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(get(&gw, "/x").status, 503);
        assert!(
            started.elapsed() < Duration::from_millis(800),
            "{:?}",
            started.elapsed()
        );
    }
    let tries: usize = busy.iter().map(|b| b.hits.load(SeqCst)).sum();
    assert_eq!(tries, 5, "each retry would have waited 1 to 2 s");
    let denied = metric(&gw, "gateway_retry_budget_denied_total{upstream=\"u\"}");
    assert_eq!(
        denied, 0,
        "retries the deadline stopped are not the budget's"
    );

    // Only a request that may be retried: a POST, sent once, has its `[timeouts]` only, and
    // an answer after 800 ms comes through a 500 ms bound that cuts a GET.
    let slow = Backend::start("slow", Mode::Slow(Duration::from_millis(800)));
    let settings = "retry = { attempts = 3, on = [\"timeout\"], budget_min_per_s = 1000, \
                    overall_timeout_ms = 500 }";
    let gw = Gateway::start(
        &config(1, &[target(slow.addr)], settings, ""),
        Driver::IoUring,
    );
    assert_eq!(get(&gw, "/x").status, 504);
    let r = gw.connect().roundtrip(
        "POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    );
    assert_eq!((r.status, r.body_str()), (200, "slow"));
}

#[test]
fn a_retry_backoff_counts_on_no_target_and_ends_when_the_client_leaves() {
    // Two targets answering 503, one retry after a 2 to 4 s backoff. During the wait the
    // request is outstanding nowhere (the failed try ended, the next has not begun), and a
    // client that leaves ends it: logged 499, and the retry is never sent.
    let busy = [
        Backend::start("b1", Mode::Status(503)),
        Backend::start("b2", Mode::Status(503)),
    ];
    let targets: Vec<String> = busy.iter().map(|b| target(b.addr)).collect();
    let settings = "retry = { attempts = 2, on = [\"503\"], budget_min_per_s = 1000, \
                    backoff_ms = 4000 }";
    let dir = temp_dir("backoff-left");
    let log = dir.join("access.log");
    let extra = format!("\n[access_log]\npath = \"{}\"\n", log.display());
    let gw = Gateway::start(&config(1, &targets, settings, &extra), Driver::IoUring);
    let hits = || busy.iter().map(|b| b.hits.load(SeqCst)).sum::<usize>();
    let outstanding = || {
        let h = gw.admin("GET", "/v1/upstreams/u/health", None).json();
        let list = h["targets"].as_array().unwrap().clone();
        list.iter()
            .map(|t| t["outstanding"].as_u64().unwrap())
            .sum::<u64>()
    };
    let mut client = TcpStream::connect(gw.addr).unwrap();
    client
        .write_all(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Request-Id: left\r\n\r\n")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while hits() < 1 {
        assert!(Instant::now() < deadline, "the first try never came");
        thread::sleep(Duration::from_millis(5));
    }
    // The first try's 503 comes at once; the wait then lasts 2 s at least.
    let deadline = Instant::now() + Duration::from_millis(1500);
    while outstanding() != 0 {
        assert!(
            Instant::now() < deadline,
            "the request counted as outstanding during the backoff"
        );
        thread::sleep(Duration::from_millis(20));
    }
    drop(client);
    let lines = wait_log_lines(&log, 1);
    assert_eq!(lines[0]["request_id"], "left");
    assert_eq!(lines[0]["status"], 499, "{}", lines[0]);
    assert_eq!(hits(), 1, "the retry went out after the client left");
}

/// Two targets (`modes`), one retry by the policy `retry` (the upstream's TOML line, and the
/// same as JSON): once the first try has reached its target, the other is drained; the
/// answer must be `status`, and the retry must go to the first target again (a draining
/// target is the last resort).
fn a_retry_skips_the_target_drained_during_its_request(
    modes: [Mode; 2],
    (settings, retry): (&str, serde_json::Value),
    status: u16,
) {
    let backends = modes.map(|m| Backend::start("b", m));
    let targets: Vec<String> = backends.iter().map(|b| target(b.addr)).collect();
    let gw = Gateway::start(&config(1, &targets, settings, ""), Driver::IoUring);
    let hits = |i: usize| backends[i].hits.load(SeqCst);
    thread::scope(|s| {
        let answer = s.spawn(|| get(&gw, "/x"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while hits(0) + hits(1) == 0 {
            assert!(Instant::now() < deadline, "the first try never came");
            thread::sleep(Duration::from_millis(5));
        }
        let (first, other) = if hits(0) == 1 { (0, 1) } else { (1, 0) };
        let body = serde_json::json!({"id": "u", "targets": [
            {"address": backends[first].addr.to_string()},
            {"address": backends[other].addr.to_string(), "draining": true},
        ], "retry": retry});
        let r = gw.admin("PUT", "/v1/upstreams/u", Some(&body.to_string()));
        assert_eq!(r.status, 200, "{}", r.body_str());
        assert_eq!(
            hits(first) + hits(other),
            1,
            "the first try ended before the drain"
        );
        let r = answer.join().unwrap();
        assert_eq!(r.status, status, "{}", r.body_str());
        assert_eq!(
            (hits(first), hits(other)),
            (2, 0),
            "the retry went to the drained target"
        );
    });
}

#[test]
fn a_retry_after_its_backoff_goes_to_no_target_drained_meanwhile() {
    // Two targets answering 503, one retry after a 0.6 to 1.2 s backoff, during which the
    // target not tried yet is drained. It went to the drained one, picked from the targets
    // as they were when the request began.
    a_retry_skips_the_target_drained_during_its_request(
        [Mode::Status(503), Mode::Status(503)],
        (
            "retry = { attempts = 2, on = [\"503\"], budget_min_per_s = 1000, backoff_ms = 1200 }",
            serde_json::json!({"attempts": 2, "on": ["503"], "budget_min_per_s": 1000,
                               "backoff_ms": 1200}),
        ),
        503,
    );
}

#[test]
fn a_retry_without_backoff_goes_to_no_target_drained_during_the_first_try() {
    // Two targets slower than the per-try timeout, one retry at once; the other target is
    // drained during the first try. Before, the retry went to it all the same (the targets
    // were looked at again only after a backoff).
    let slow = Mode::Slow(Duration::from_millis(800));
    a_retry_skips_the_target_drained_during_its_request(
        [slow, slow],
        (
            "retry = { attempts = 2, on = [\"timeout\"], per_try_timeout_ms = 500, \
             budget_min_per_s = 1000 }",
            serde_json::json!({"attempts": 2, "on": ["timeout"], "per_try_timeout_ms": 500,
                               "budget_min_per_s": 1000}),
        ),
        504,
    );
}

#[test]
fn a_body_that_comes_after_its_head_is_held_for_a_retry() {
    // A PUT whose body comes 300 ms after its head, to a target answering 503 and one
    // answering 200: the body is read whole before the first try (it has a length, at most
    // 64 KiB), so the 503 is retried on the other target with the whole body. Before, such a
    // body was streamed and the request not retried. Round robin: the first tries alternate.
    let backends = [
        Backend::start("down", Mode::Status(503)),
        Backend::start("up", Mode::Answer),
    ];
    let targets: Vec<String> = backends.iter().map(|b| target(b.addr)).collect();
    let settings = "retry = { attempts = 2, on = [\"503\"], budget_min_per_s = 1000 }";
    let slow_body = "\n[timeouts]\nclient_body_ms = 1000\n";
    let gw = Gateway::start(&config(1, &targets, settings, slow_body), Driver::IoUring);
    let body = "x".repeat(20_000);
    for _ in 0..2 {
        let mut c = gw.connect();
        c.send(
            format!(
                "PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        thread::sleep(Duration::from_millis(300));
        c.send(body.as_bytes());
        let r = c.read_response();
        assert_eq!((r.status, r.body_str()), (200, "up"));
    }
    assert_eq!(backends[0].hits.load(SeqCst), 1, "one first try there");
    assert_eq!(backends[1].hits.load(SeqCst), 2);
    // A client that stops sending its body gets 408 once `client_body_ms` is up, and the
    // request goes nowhere.
    let mut c = Client::connect(gw.addr);
    c.send(b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n01234");
    let r = c.read_response();
    assert_eq!(r.status, 408, "{}", r.head);
    let hits: usize = backends.iter().map(|b| b.hits.load(SeqCst)).sum();
    assert_eq!(hits, 3, "the stalled request reached a target");
    // Not one whose client waits for `100 Continue` before sending it: streamed, as before.
    let mut c = gw.connect();
    c.send(b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n");
    thread::sleep(Duration::from_millis(100));
    c.send(b"v=1");
    let mut r = c.read_response();
    if r.status == 100 {
        r = c.read_response();
    }
    let down = backends[0].hits.load(SeqCst);
    match r.status {
        503 => assert_eq!(down, 2, "its one try went to the 503 target"),
        200 => assert_eq!(down, 1, "its one try went to the other"),
        other => panic!("answered {other}"),
    }
    // A chunked body is held the same way (up to 64 KiB): before, one that came after its
    // head was streamed and its request not retried, one that came with it was.
    for _ in 0..2 {
        let mut c = gw.connect();
        c.send(b"PUT /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel");
        thread::sleep(Duration::from_millis(300));
        c.send(b"lo\r\n0\r\n\r\n");
        let r = c.read_response();
        assert_eq!((r.status, r.body_str()), (200, "up"));
    }
}

#[test]
fn an_http2_request_with_a_body_is_retried_like_an_http11_one() {
    // A PUT over h2c whose small body came with its head (one write: HEADERS, then DATA
    // with END_STREAM) is whole in hand, so a 503 from the first target is retried on the
    // other, as for HTTP/1.1 (before: never, over HTTP/2). So is one whose DATA comes 300 ms
    // after its HEADERS: a body with a length, up to 64 KiB, is read whole before the first
    // try of a request that may be retried.
    let backends = [
        Backend::start("down", Mode::Status(503)),
        Backend::start("up", Mode::Answer),
    ];
    let targets: Vec<String> = backends.iter().map(|b| target(b.addr)).collect();
    let settings = "retry = { attempts = 2, on = [\"503\"], budget_min_per_s = 1000 }";
    let config = config(1, &targets, settings, "").replacen(
        "address = \"127.0.0.1:0\"\n",
        "address = \"127.0.0.1:0\"\nh2c = true\n",
        1,
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    const CLIENT: &str = r#"
import socket, sys, time
import h2.connection, h2.config, h2.events
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
s.sendall(c.data_to_send())
tries = [("PUT", 0), ("PUT", 0), ("DELETE", 0), ("DELETE", 0), ("PUT", 0.3), ("PUT", 0.3)]
for i, (method, delay) in enumerate(tries):
    sid = 1 + 2 * i
    c.send_headers(sid, [(":method", method), (":path", "/x"), (":scheme", "http"),
                         (":authority", "t"), ("content-length", "3")])
    if delay:
        s.sendall(c.data_to_send())
        time.sleep(delay)
    c.send_data(sid, b"v=1", end_stream=True)
    s.sendall(c.data_to_send())
    status, body, done = None, b"", False
    while not done:
        data = s.recv(65536)
        if not data:
            break
        for e in c.receive_data(data):
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
                status = dict(e.headers)[b":status"].decode()
            elif isinstance(e, h2.events.DataReceived) and e.stream_id == sid:
                body += e.data
                c.acknowledge_received_data(len(e.data), sid)
            elif isinstance(e, h2.events.StreamEnded) and e.stream_id == sid:
                done = True
        s.sendall(c.data_to_send())
    print(method, status, body.decode())
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", CLIENT, &gw.addr.port().to_string()])
        .output()
        .expect("python3 with the PyPI package h2");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "PUT 200 up",
            "PUT 200 up",
            "DELETE 200 up",
            "DELETE 200 up",
            "PUT 200 up",
            "PUT 200 up"
        ],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        backends[0].hits.load(SeqCst),
        3,
        "round robin: every other try"
    );
}
