//! Binary upgrades (SIGUSR2): the running gateway hands its sockets to the binary at its path
//! and drains. Under load from wrk (keep-alive), from a client opening a new connection per
//! request and from keep-alive clients whose connections park between requests, three
//! upgrades in a row fail no request and no connection; an upgrade whose new
//! binary does not start leaves the old process serving (and taking admin writes); the admin
//! API and the data directory move over with the sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;

const CONFIG: &str = "workers = 2\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n\
                      [[routes]]\nid = \"hello\"\npath = \"/\"\nrespond = { body = \"hello\" }\n";

/// The pid serving the admin API (the one that took over last). A process that has just
/// handed over answers a connection it still took `503` (`Handed Over`): asked again.
fn serving_pid(gw: &Gateway) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = gw.admin("GET", "/v1/status", None);
        if r.status == 200 {
            return r.json()["pid"].as_u64().unwrap() as u32;
        }
        assert!(
            r.status == 503 && Instant::now() < deadline,
            "{} {}",
            r.status,
            r.body_str()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

fn wait_exited(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !exited(pid) {
        assert!(Instant::now() < deadline, "process {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGUSR2 to the serving process and waits until another one serves; its pid.
pub(crate) fn upgrade(gw: &Gateway) -> u32 {
    let old = serving_pid(gw);
    // SAFETY: kill(2) on a gateway process this test started (directly or through upgrades).
    unsafe { libc::kill(old as i32, libc::SIGUSR2) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = serving_pid(gw);
        if now != old {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "no successor took over from {old}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The processes an upgrade chain started (not children of the test): any still running
/// when the test ends, even by a failed assertion, are stopped by pid.
pub(crate) struct Chain(std::sync::Mutex<Vec<u32>>);

impl Chain {
    pub(crate) fn new() -> Chain {
        Chain(std::sync::Mutex::new(Vec::new()))
    }

    pub(crate) fn push(&self, pid: u32) -> u32 {
        self.0.lock().unwrap().push(pid);
        pid
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        for &pid in self.0.lock().unwrap().iter() {
            if !exited(pid) {
                // SAFETY: kill(2) on a gateway process this test started through an upgrade.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// Stops a process the test started through an upgrade (not a child of the test), by pid.
pub(crate) fn stop(pid: u32) {
    // SAFETY: kill(2) on a gateway process this test started through an upgrade.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    wait_exited(pid, Duration::from_secs(10));
}

/// One request on a fresh connection; whether it got its 200 and whole body.
fn one_shot(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&out);
    if text.starts_with("HTTP/1.1 200") && text.ends_with("hello") {
        Ok(())
    } else {
        Err(format!("answer: {text:?}"))
    }
}

/// A keep-alive client that pauses 25 to 150 ms between requests, so its connection often
/// waits past `client_park_ms` (20 ms by default) and parks, until `running` ends (or 30 s);
/// before each request it looks whether the gateway closed the connection (an idle close:
/// it opens a new one). Counts answers, and records requests sent and not answered.
fn paced_client(
    addr: SocketAddr,
    seed: u64,
    running: &AtomicBool,
    ok: &AtomicU64,
    failures: &std::sync::Mutex<Vec<String>>,
) {
    let start = Instant::now();
    let mut rng = seed;
    let mut conn: Option<TcpStream> = None;
    while running.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(30) {
        if let Some(s) = &conn {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            let closed =
                !matches!(s.peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            s.set_nonblocking(false).unwrap();
            if closed {
                conn = None;
            }
        }
        let s = match conn.as_mut() {
            Some(s) => s,
            None => {
                let s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                conn.insert(s)
            }
        };
        let mut got = Vec::new();
        let answer = s
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .and_then(|()| {
                let mut buf = [0u8; 1024];
                while !got.ends_with(b"\r\n\r\nhello") {
                    match s.read(&mut buf)? {
                        0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                        n => got.extend_from_slice(&buf[..n]),
                    }
                }
                Ok(())
            });
        match answer {
            Ok(()) => {
                ok.fetch_add(1, Ordering::Relaxed);
                if String::from_utf8_lossy(&got).contains("Connection: close") {
                    conn = None;
                }
            }
            Err(e) => {
                failures.lock().unwrap().push(format!(
                    "keep-alive request: {e} (at {:?})",
                    start.elapsed()
                ));
                conn = None;
            }
        }
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(25 + (rng >> 33) % 126));
    }
}

both_drivers!(three_upgrades_under_load_fail_nothing);

fn three_upgrades_under_load_fail_nothing(driver: Driver) {
    let chain = Chain::new();
    let gw = Gateway::start(CONFIG, driver);
    let addr = gw.addr;
    let first = serving_pid(&gw);
    let running = AtomicBool::new(true);
    let start = Instant::now();
    let fresh_ok = AtomicU64::new(0);
    let paced_ok = AtomicU64::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    let (wrk_out, pids) = std::thread::scope(|s| {
        let wrk = s.spawn(|| {
            Command::new("wrk")
                .args(["-t1", "-c16", "-d7s"])
                .arg(format!("http://{addr}/"))
                .output()
                .expect("wrk (Debian wrk) is needed: scripts/test installs it")
        });
        s.spawn(|| {
            // Bounded by time too, so a failed assertion elsewhere cannot leave it spinning.
            while running.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(30) {
                match one_shot(addr) {
                    Ok(()) => {
                        fresh_ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{e} (at {:?})", start.elapsed())),
                }
            }
        });
        // Keep-alive connections that park between requests: a request that comes while
        // the drain of an upgrade begins is answered (with `Connection: close`), not lost.
        for seed in 0..16 {
            let (running, paced_ok, failures) = (&running, &paced_ok, &failures);
            s.spawn(move || paced_client(addr, seed, running, paced_ok, failures));
        }
        let mut pids = vec![first];
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(1500));
            pids.push(chain.push(upgrade(&gw)));
            println!(
                "upgraded to {} at {:?}",
                pids.last().unwrap(),
                start.elapsed()
            );
        }
        let out = wrk.join().unwrap();
        running.store(false, Ordering::Relaxed);
        (out, pids)
    });
    let wrk_text = String::from_utf8_lossy(&wrk_out.stdout).into_owned();
    println!("{wrk_text}");
    println!(
        "new-connection client: {} requests, paced keep-alive clients: {}, {} failures",
        fresh_ok.load(Ordering::Relaxed),
        paced_ok.load(Ordering::Relaxed),
        failures.lock().unwrap().len()
    );
    assert!(wrk_out.status.success(), "{wrk_text}");
    let requests: u64 = wrk_text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .map(|(n, _)| n.trim().parse().unwrap())
        .expect("wrk's summary");
    assert!(requests > 1000, "{wrk_text}");
    assert!(!wrk_text.contains("Socket errors"), "{wrk_text}");
    assert!(!wrk_text.contains("Non-2xx"), "{wrk_text}");
    assert!(fresh_ok.load(Ordering::Relaxed) > 100);
    assert!(paced_ok.load(Ordering::Relaxed) > 100);
    assert_eq!(
        *failures.lock().unwrap(),
        Vec::<String>::new(),
        "{:#?}",
        gw.log_lines()
    );

    // Four different processes served in turn; each old one drained and exited.
    let mut distinct = pids.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "{pids:?}");
    for &pid in &pids[..3] {
        wait_exited(pid, Duration::from_secs(15));
    }
    gw.wait_log(
        &format!("process {} serves now", pids[3]),
        Duration::from_secs(1),
    );
    // The data directory went along with the sockets: the last successor holds it, and
    // another gateway started on it is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--data-dir")
        .arg(&gw.data_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let holder = format!("in use by the gateway with pid {}", pids[3]);
    assert!(stderr.contains(&holder), "{stderr}");
    stop(pids[3]);
}

/// Replaces the file at `path` (a running binary) with `from`, as a package upgrade does.
/// Writes `text` to `path` as an executable (a "new binary" that acts as a test needs).
fn script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn install(from: &Path, path: &Path) {
    let tmp = path.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn a_failed_upgrade_leaves_the_old_process_serving() {
    let dir = temp_dir("upgrade-bin");
    let bin = dir.join("gateway");
    install(env!("CARGO_BIN_EXE_gateway").as_ref(), &bin);
    // systemd's side of Type=notify: a datagram socket named by NOTIFY_SOCKET.
    let notify_path = dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let next_notice = || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let chain = Chain::new();
    let gw = Gateway::start_binary(
        &bin,
        CONFIG,
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    let first = serving_pid(&gw);
    assert_eq!(next_notice(), "READY=1");

    // A "new binary" that cannot start (as one refusing the config would): exit 2, after
    // taking the data directory's lock over (writing its pid) as a successor does first.
    let broken = dir.join("broken.sh");
    let lock = gw.data_dir.join("lock");
    script(
        &broken,
        &format!(
            "#!/bin/sh\necho $$ > {}\necho 'gateway: invalid config: simulated' >&2\nexit 2\n",
            lock.display()
        ),
    );
    install(&broken, &bin);
    // SAFETY: kill(2) on the gateway this test started.
    unsafe { libc::kill(first as i32, libc::SIGUSR2) };
    gw.wait_log("upgrade failed", Duration::from_secs(30));
    assert_eq!(serving_pid(&gw), first);
    // The lock names the process that holds the directory, not the one that failed (before,
    // another gateway was refused naming the dead one).
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap().trim(),
        first.to_string()
    );
    assert_eq!(one_shot(gw.addr), Ok(()));
    // Still the one taking admin writes.
    let r = gw.admin(
        "PUT",
        "/v1/routes/later",
        Some(r#"{"path":"/later","respond":{"body":"later"}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body_str());

    // The real binary back in place: the upgrade goes through, with the config and the admin
    // API moving over.
    install(env!("CARGO_BIN_EXE_gateway").as_ref(), &bin);
    let status = format!(
        "GET /v1/status HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
    );
    let mut held = Client::connect(gw.admin);
    assert_eq!(held.roundtrip(&status).status, 200);
    let metrics = status.replace("/v1/status", "/metrics");
    let mut scraper = Client::connect(gw.admin);
    assert_eq!(scraper.roundtrip(&metrics).status, 200);
    // A request head not finished keeps the old process draining, so that it is still there
    // to answer on the held connection.
    let mut partial = TcpStream::connect(gw.addr).unwrap();
    partial.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let second = chain.push(upgrade(&gw));
    // A connection the old process still holds is not answered from its stale state (before:
    // its old revision and pid), but told to go to the successor.
    let r = held.roundtrip(&status);
    assert_eq!(r.status, 503, "{}", r.body_str());
    assert!(r.body_str().contains("Handed Over"), "{}", r.body_str());
    assert_eq!(
        (r.header("retry-after"), r.header("connection")),
        (Some("1"), Some("close"))
    );
    // A scrape there is answered with the old process's own counters (a 503 would be a
    // failed scrape at every upgrade), and its connection closed.
    let r = scraper.roundtrip(&metrics);
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    drop(partial);
    assert_ne!(second, first);
    // The successor tells systemd it is the service's main process now.
    assert_eq!(next_notice(), format!("MAINPID={second}\nREADY=1"));
    let r = gw
        .connect()
        .roundtrip("GET /later HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((r.status, r.body_str()), (200, "later"));
    let status = gw.admin("GET", "/v1/status", None).json();
    assert_eq!(status["revision"], 2);
    let r = gw.admin(
        "PUT",
        "/v1/routes/after",
        Some(r#"{"path":"/after","respond":{"body":"after"}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body_str());
    wait_exited(first, Duration::from_secs(15));
    stop(second);
}

#[test]
fn signals_during_an_upgrade_are_neither_fatal_nor_lost() {
    let dir = temp_dir("upgrade-signals");
    let bin = dir.join("gateway");
    install(env!("CARGO_BIN_EXE_gateway").as_ref(), &bin);
    let chain = Chain::new();
    // Long enough a drain (and head timeout) that the old process is surely still there
    // when the test signals it after the handover, however loaded the machine.
    let config = format!(
        "{CONFIG}[shutdown]\ndrain_timeout_ms = 60000\n[timeouts]\nclient_header_ms = 60000\n"
    );
    let gw = Gateway::start_binary(&bin, &config, &[]);
    let first = serving_pid(&gw);
    // A "new binary" sent a SIGUSR1 (logrotate's, say) before it can have set its own mask,
    // which then takes a second to start the gateway. Before, the SIGUSR1 killed it: the
    // successor started with no signal blocked. (Python, not sh: dash clears the mask.)
    let slow = dir.join("slow.py");
    script(
        &slow,
        &format!(
            "#!/usr/bin/env python3\nimport os, signal, sys, time\n\
             os.kill(os.getpid(), signal.SIGUSR1)\ntime.sleep(1)\n\
             os.execv({:?}, sys.argv)\n",
            env!("CARGO_BIN_EXE_gateway")
        ),
    );
    install(&slow, &bin);
    // A request head not finished keeps the old process draining after the handover.
    let mut partial = TcpStream::connect(gw.addr).unwrap();
    partial.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    // SAFETY: kill(2) on the gateway this test started.
    unsafe { libc::kill(first as i32, libc::SIGUSR2) };
    gw.wait_log("to take over the sockets", Duration::from_secs(10));
    // Meanwhile the file gains a route and the old process a SIGHUP (`systemctl reload`):
    // before, it was never read, and the reload lost without a word.
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    let route = "\n[[routes]]\nid = \"hup\"\npath = \"/hup\"\nrespond = { body = \"hup\" }\n";
    std::fs::write(&gw.config_path, format!("{text}{route}")).unwrap();
    // SAFETY: kill(2) on the gateway this test started.
    unsafe { libc::kill(first as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while serving_pid(&gw) == first {
        assert!(
            Instant::now() < deadline,
            "no successor took over; log: {:?}",
            gw.log_lines()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = chain.push(serving_pid(&gw));
    gw.wait_log("SIGHUP: passed on to process", Duration::from_secs(5));
    let served = |path: &str, body: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = gw.connect().roundtrip(&format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            ));
            if (r.status, r.body_str()) == (200, body) {
                break;
            }
            assert!(Instant::now() < deadline, "{} {}", r.status, r.body_str());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    served("/hup", "hup");
    // One sent to the old pid while it drains (a script that read the pid before the
    // successor said it serves) goes on too (before: dropped).
    assert!(!exited(first), "the old process still drains");
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    let route = "\n[[routes]]\nid = \"hup2\"\npath = \"/hup2\"\nrespond = { body = \"hup2\" }\n";
    std::fs::write(&gw.config_path, format!("{text}{route}")).unwrap();
    // SAFETY: kill(2) on the gateway this test started.
    unsafe { libc::kill(first as i32, libc::SIGHUP) };
    served("/hup2", "hup2");
    let passed = gw
        .log_lines()
        .iter()
        .filter(|l| l.contains("SIGHUP: passed on to process"))
        .count();
    assert_eq!(passed, 2, "{:?}", gw.log_lines());
    drop(partial);
    wait_exited(first, Duration::from_secs(15));
    stop(second);
}

#[test]
fn an_upgrade_starts_what_the_path_it_was_started_by_names_now() {
    // Started through a link, as a deployment that switches a link to each version: the
    // upgrade runs what the link names when it happens. Before, the old version's file
    // (/proc/self/exe, links resolved) was started again.
    let dir = temp_dir("upgrade-link");
    let v1 = dir.join("v1-gateway");
    install(env!("CARGO_BIN_EXE_gateway").as_ref(), &v1);
    let link = dir.join("gateway");
    std::os::unix::fs::symlink(&v1, &link).unwrap();
    let chain = Chain::new();
    let gw = Gateway::start_binary(&link, CONFIG, &[]);
    let first = serving_pid(&gw);
    let v2 = dir.join("v2-gateway.sh");
    script(
        &v2,
        &format!(
            "#!/bin/sh\necho 'gateway: v2 starting' >&2\nexec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_gateway")
        ),
    );
    let next = dir.join("gateway.next");
    std::os::unix::fs::symlink(&v2, &next).unwrap();
    std::fs::rename(&next, &link).unwrap();
    // The successor resumes the stored config: the --config file moved away meanwhile stops
    // nothing (the first version of the start's early check refused it).
    std::fs::rename(&gw.config_path, gw.config_path.with_extension("moved")).unwrap();
    let second = chain.push(upgrade(&gw));
    assert_ne!(second, first);
    gw.wait_log("v2 starting", Duration::from_secs(1));
    wait_exited(first, Duration::from_secs(15));
    stop(second);
}

#[test]
fn a_successor_that_closes_its_ready_pipe_is_given_up_at_once() {
    // It can no longer say it is ready: given up within a second or so, and the old process
    // takes writes again (before: a busy wait, a CPU at 100% for the whole 60 s bound).
    let dir = temp_dir("upgrade-closed-pipe");
    let bin = dir.join("gateway");
    install(env!("CARGO_BIN_EXE_gateway").as_ref(), &bin);
    let gw = Gateway::start_binary(&bin, CONFIG, &[]);
    let pid = serving_pid(&gw);
    let closes = dir.join("closes.sh");
    let text = "#!/usr/bin/env python3\nimport os, time\n\
                os.close(int(os.environ['GATEWAY_UPGRADE_READY']))\ntime.sleep(30)\n";
    script(&closes, text);
    install(&closes, &bin);
    // SAFETY: kill(2) on the gateway this test started.
    unsafe { libc::kill(pid as i32, libc::SIGUSR2) };
    gw.wait_log("closed its ready pipe", Duration::from_secs(10));
    assert_eq!(serving_pid(&gw), pid);
    let r = gw.admin(
        "PUT",
        "/v1/routes/later",
        Some(r#"{"path":"/later","respond":{"body":"later"}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body_str());
}

#[test]
fn a_successor_that_hangs_neither_stalls_the_admin_api_nor_holds_off_sigterm() {
    let dir = temp_dir("upgrade-hang");
    let bin = dir.join("gateway");
    install(env!("CARGO_BIN_EXE_gateway").as_ref(), &bin);
    let mut gw = Gateway::start_binary(&bin, CONFIG, &[]);
    let pid = serving_pid(&gw);
    // A "new binary" that starts and never gets ready (the wait for it is 60 s).
    let hangs = dir.join("hangs.sh");
    script(&hangs, "#!/bin/sh\nexec sleep 30\n");
    install(&hangs, &bin);
    // SAFETY: kill(2) on the gateway this test started.
    unsafe { libc::kill(pid as i32, libc::SIGUSR2) };
    gw.wait_log("to take over the sockets", Duration::from_secs(10));
    // Reads are answered at once; changes are refused, not held.
    let asked = Instant::now();
    assert_eq!(serving_pid(&gw), pid);
    let r = gw.admin(
        "PUT",
        "/v1/routes/later",
        Some(r#"{"path":"/later","respond":{"body":"later"}}"#),
    );
    assert_eq!(r.status, 503, "{}", r.body_str());
    assert!(r.body_str().contains("Upgrading"), "{}", r.body_str());
    // A retry goes on a new connection: to the successor once it serves. (Before, the
    // keep-alive connection stayed with this process, for the whole of a drain after.)
    assert_eq!(
        (r.header("retry-after"), r.header("connection")),
        (Some("1"), Some("close")),
        "{}",
        r.head
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(one_shot(gw.addr), Ok(()));
    // SIGTERM ends the upgrade (and its would-be successor) and the process.
    let signalled = Instant::now();
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(15),
        "{:?}",
        signalled.elapsed()
    );
    gw.wait_log("a shutdown signal came first", Duration::from_secs(1));
}
