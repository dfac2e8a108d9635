//! HTTP/2 and gRPC upstreams through the real binary on loopback: a Python grpcio service
//! (`tests/grpc_peer.py`) behind the gateway, called with a grpcio client over h2c and TLS
//! (unary and the three streaming kinds, trailers, deadlines and cancellations, a killed
//! upstream, retries on UNAVAILABLE, circuit limits, health checks), gRPC-Web built by hand
//! (binary and text, over HTTP/1.1 and HTTP/2, with its CORS preflight), an `h2c` upstream
//! reached from HTTP/1.1 and HTTP/2 clients, h2load against a unary method, and JSON calls
//! transcoded to gRPC (`transcoders`, with descriptor sets made by protoc in the test); and a
//! raw HTTP/2 upstream (`tests/h2_reset_peer.py`) that resets the streams it is sent or
//! refuses them with GOAWAY.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;
use crate::tls::Cert;

#[test]
fn a_grpc_health_check_keeps_no_more_of_the_answer_than_it_reads() {
    // A target whose health answer is SERVING and 128 MiB more: the check kept the whole
    // body (a target streaming for the check's timeout grew the buffer without a bound).
    // Now it keeps 8 bytes, and an answer that long is not SERVING.
    let svc = GrpcService::start("bulky-health");
    let dir = temp_dir("grpc-bulky");
    let cert = Cert::new(&dir, "grpc.test");
    let upstream = format!(
        "[[upstreams]]\nid = \"grpc\"\nprotocol = \"grpc\"\n\
         targets = [{{ address = \"{}\" }}]\n\
         health_check = {{ path = \"/grpc.health.v1.Health/Check\", interval_ms = 10000, \
         timeout_ms = 10000 }}\n",
        svc.addr
    );
    let gw = Gateway::start(&config(&upstream, &cert, ""), Driver::IoUring);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = gw.admin("GET", "/v1/upstreams/grpc/health", None).json();
        let check = &h["targets"][0]["last_check"];
        if check["ok"] == false {
            assert_eq!(check["status"], 503, "{h}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no finished gRPC health check: {h}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The process's peak memory stayed far below the answer's size.
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(peak_kib < 96 * 1024, "peak resident memory {peak_kib} KiB");
}

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc_peer.py");

/// A running `grpc_peer.py serve`, stopped when dropped (or by [`GrpcService::kill`]).
struct GrpcService {
    child: Child,
    addr: SocketAddr,
}

impl GrpcService {
    fn start(mode: &str) -> GrpcService {
        Self::start_with(&["serve", mode])
    }

    /// `grpc_peer.py` with these arguments (a `serve` mode).
    fn start_with(args: &[&str]) -> GrpcService {
        let (child, _, addr) = start_peer(PEER, args, "the test gRPC service", "grpcio");
        GrpcService { child, addr }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GrpcService {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a Python peer (`script` with `args`) that prints `port N` when it listens on
/// 127.0.0.1:N; its stdout after that line is returned for reading. `needs`: the PyPI package
/// named when it does not start.
pub(crate) fn start_peer(
    script: &str,
    args: &[&str],
    what: &str,
    needs: &str,
) -> (Child, BufReader<std::process::ChildStdout>, SocketAddr) {
    let mut child = Command::new("python3")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 runs {what}: {e}"));
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let _ = out.read_line(&mut line);
    let Some(port) = line
        .trim()
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
    else {
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        panic!("{what} did not start (it needs the PyPI package {needs}): {err}");
    };
    (child, out, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Runs `grpc_peer.py call` against `target` and returns each check's JSON answer.
fn calls(
    target: SocketAddr,
    tls: Option<(&Cert, &str)>,
    checks: &[&str],
) -> Vec<serde_json::Value> {
    let mut cmd = Command::new("python3");
    cmd.arg(PEER).arg("call").arg(target.to_string());
    if let Some((cert, name)) = tls {
        cmd.arg("--tls").arg(&cert.cert).arg(name);
    }
    answers(cmd, checks)
}

/// [`calls`] over h2c with `:authority` set to `authority`.
fn calls_with_authority(
    target: SocketAddr,
    authority: &str,
    checks: &[&str],
) -> Vec<serde_json::Value> {
    let mut cmd = Command::new("python3");
    cmd.arg(PEER).arg("call").arg(target.to_string());
    cmd.args(["--authority", authority]);
    answers(cmd, checks)
}

/// Runs `cmd` (a `grpc_peer.py call` without its checks) with `checks`; each one's answer.
fn answers(mut cmd: Command, checks: &[&str]) -> Vec<serde_json::Value> {
    let out = cmd
        .args(checks)
        .output()
        .expect("python3 runs the test gRPC client");
    let text = String::from_utf8_lossy(&out.stdout);
    let answers: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        answers.len(),
        checks.len(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    answers
}

/// The upstream `grpc` (protocol `grpc`), with `svc` as its one target.
fn grpc_upstream(svc: &GrpcService) -> String {
    format!(
        "[[upstreams]]\nid = \"grpc\"\nprotocol = \"grpc\"\ntargets = [{{ address = \"{}\" }}]\n",
        svc.addr
    )
}

fn config(upstream: &str, cert: &Cert, extra: &str) -> String {
    format!(
        r#"workers = 1

[[listeners]]
address = "127.0.0.1:0"
h2c = true

[[listeners]]
address = "127.0.0.1:0"
tls = {{ certificates = ["grpc"] }}

[[certificates]]
id = "grpc"
cert_file = "{}"
key_file = "{}"

{upstream}

[[routes]]
id = "echo"
path_prefix = "/test.Echo/"
upstream = "grpc"
{extra}
"#,
        cert.cert.display(),
        cert.key.display(),
    )
}

#[test]
fn grpc_calls_go_to_a_tls_upstream_verified_and_health_checked_over_tls() {
    let dir = temp_dir("grpc-tls-upstream");
    let (cert, other) = (Cert::new(&dir, "grpc.test"), Cert::new(&dir, "other.test"));
    let svc = GrpcService::start_with(&[
        "serve-tls",
        cert.cert.to_str().unwrap(),
        cert.key.to_str().unwrap(),
    ]);
    let check = "health_check = { path = \"/grpc.health.v1.Health/Check\", interval_ms = 200, \
                 timeout_ms = 150 }";
    let upstreams = format!(
        "[[upstreams]]\nid = \"grpc\"\nprotocol = \"grpc\"\ntargets = [{{ address = \"{a}\" }}]\n\
         tls = {{ server_name = \"api.grpc.test\", ca_file = \"{ca}\" }}\n{check}\n\n\
         [[upstreams]]\nid = \"untrusted\"\nprotocol = \"grpc\"\ntargets = [{{ address = \"{a}\" }}]\n\
         tls = {{ server_name = \"api.grpc.test\", ca_file = \"{other}\" }}\n{check}\n",
        a = svc.addr,
        ca = cert.cert.display(),
        other = other.cert.display(),
    );
    let route = "[[routes]]\nid = \"untrusted\"\npath_prefix = \"/test.Echo/\"\n\
                 hosts = [\"untrusted\"]\nupstream = \"untrusted\"\n";
    let gw = Gateway::start(&config(&upstreams, &cert, route), Driver::IoUring);
    let a = calls(
        gw.listeners[0],
        None,
        &["unary", "server_stream", "bidi", "big", "fail:5", "many"],
    );
    assert_eq!(a[0]["reply"], "echo:hello", "{}", a[0]);
    assert_eq!(a[0]["trailer"], "m1");
    assert_eq!(a[1]["reply"][4], "item-4", "{}", a[1]);
    assert_eq!(
        a[2]["reply"],
        serde_json::json!(["bidi:one", "bidi:two", "bidi:three"])
    );
    assert_eq!(a[3]["reply_len"], 3 * 1024 * 1024 + 5);
    assert_eq!(a[4]["code"], "NOT_FOUND", "{}", a[4]);
    assert_eq!(a[5]["ok"], 200, "{}", a[5]);
    // The health check speaks gRPC over TLS too: the trusted upstream's target passes, the
    // other's fails (its certificate is not signed by `other`).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let good = gw.admin("GET", "/v1/upstreams/grpc/health", None).json();
        let bad = gw
            .admin("GET", "/v1/upstreams/untrusted/health", None)
            .json();
        let (g, b) = (&good["targets"][0], &bad["targets"][0]);
        if g["last_check"]["ok"] == true && b["state"] == "unhealthy" {
            assert_eq!(g["state"], "healthy", "{good}");
            assert_eq!(b["last_check"]["ok"], false, "{bad}");
            break;
        }
        assert!(Instant::now() < deadline, "{good}\n{bad}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A call to the upstream whose certificate is not trusted: UNAVAILABLE, saying why.
    let a = calls_with_authority(gw.listeners[0], "untrusted", &["unary"]);
    assert_eq!(a[0]["code"], "UNAVAILABLE", "{}", a[0]);
    assert_eq!(a[0]["details"], "upstream TLS handshake failed", "{}", a[0]);
}

both_drivers!(grpc_calls_of_every_kind_pass_through_over_h2c_and_tls);

#[test]
fn clients_that_stop_reading_do_not_hold_up_other_calls_on_the_upstream_connection() {
    // Twelve 1.5 MB echo calls whose client never reads the answers pin what the upstream
    // connection lets each stream hold; another client's call on the same connection must
    // still get its answer, not wait for window (RFC 9113 5.2).
    let svc = GrpcService::start("");
    let dir = temp_dir("grpc-stall");
    let cert = Cert::new(&dir, "grpc.test");
    let upstream = grpc_upstream(&svc);
    let extra = "[timeouts]\nupstream_response_head_ms = 3000\n";
    let gw = Gateway::start(&config(&upstream, &cert, extra), Driver::IoUring);
    let h2c = gw.listeners[0];
    // The upstream connection exists before the stalled calls take their share of it.
    assert_eq!(calls(h2c, None, &["unary"])[0]["reply"], "echo:hello");
    let mut staller = Command::new("python3")
        .arg(PEER)
        .args(["stall", &h2c.to_string(), "12", "1500000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(staller.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "stalled");
    // The echoes have had time to fill every window they can.
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let a = calls(h2c, None, &["unary"]);
    let took = started.elapsed();
    drop(staller.stdin.take());
    let _ = staller.wait();
    assert_eq!(a[0]["reply"], "echo:hello", "{}", a[0]);
    assert!(took < Duration::from_secs(2), "{took:?}");
}

fn grpc_calls_of_every_kind_pass_through_over_h2c_and_tls(driver: Driver) {
    let svc = GrpcService::start("");
    let dir = temp_dir("grpc");
    let cert = Cert::new(&dir, "grpc.test");
    let upstream = format!(
        "[[upstreams]]\nid = \"grpc\"\nprotocol = \"grpc\"\nmax_streams = 8\n\
         targets = [{{ address = \"{}\" }}]\n\
         health_check = {{ path = \"/grpc.health.v1.Health/Check\", interval_ms = 200, timeout_ms = 150 }}\n",
        svc.addr
    );
    let gw = Gateway::start(&config(&upstream, &cert, ""), driver);
    let checks = [
        "unary",
        "server_stream",
        "client_stream",
        "bidi",
        "big",
        "fail:5",
        "many",
    ];
    for (name, tls) in [("h2c", None), ("tls", Some((&cert, "grpc.test")))] {
        let target = if tls.is_some() {
            gw.listeners[1]
        } else {
            gw.listeners[0]
        };
        let a = calls(target, tls, &checks);
        assert_eq!(a[0]["reply"], "echo:hello", "{name}: {}", a[0]);
        assert_eq!(a[0]["trailer"], "m1", "{name}: trailers relayed");
        assert_eq!(
            a[1]["reply"],
            serde_json::json!(["item-0", "item-1", "item-2", "item-3", "item-4"]),
            "{name}"
        );
        assert_eq!(a[2]["reply"], "a|b|c", "{name}");
        assert_eq!(
            a[3]["reply"],
            serde_json::json!(["bidi:one", "bidi:two", "bidi:three"]),
            "{name}: ping-pong needs both directions at once"
        );
        assert_eq!(a[4]["reply_len"], 3 * 1024 * 1024 + 5, "{name}");
        // The upstream's own status and message come through unchanged.
        assert_eq!(a[5]["code"], "NOT_FOUND", "{name}");
        assert_eq!(a[5]["details"], "asked to fail", "{name}");
        // 200 concurrent calls over max_streams = 8 per connection.
        assert_eq!(a[6]["ok"], 200, "{name}");
    }
    // The gRPC health check marks the target healthy.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = gw.admin("GET", "/v1/upstreams/grpc/health", None).json();
        let t = &h["targets"][0];
        if t["last_check"]["ok"] == true {
            assert_eq!(t["state"], "healthy", "{h}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no passing gRPC health check: {h}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every call is counted under its route.
    let metrics = gw.admin("GET", "/metrics", None).body_str().to_owned();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("gateway_requests_total{route=\"echo\",class=\"2xx\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 2 * 206, "{line}");
}

#[test]
fn grpc_deadlines_are_enforced_capped_and_an_unreachable_upstream_is_unavailable() {
    let mut svc = GrpcService::start("");
    let dir = temp_dir("grpc-deadline");
    let cert = Cert::new(&dir, "grpc.test");
    let upstream = format!(
        "[[upstreams]]\nid = \"grpc\"\nprotocol = \"grpc\"\ntargets = [{{ address = \"{}\" }}]\n\
         circuit = {{ max_requests = 1 }}\n",
        svc.addr
    );
    let extra = "[timeouts]\nupstream_response_head_ms = 800\n";
    let gw = Gateway::start(&config(&upstream, &cert, extra), Driver::IoUring);
    let h2c = gw.listeners[0];
    let a = calls(h2c, None, &["remaining", "sleep_long", "deadline"]);
    // The client asked for 30 s; the upstream is told the capped deadline.
    let left: u64 = a[0]["reply"].as_str().unwrap().parse().unwrap();
    assert!(left <= 800 && left > 300, "{}", a[0]);
    // A call the upstream does not answer in time ends at the gateway's cap with
    // DEADLINE_EXCEEDED, not after the client's 20 s nor the upstream's 5 s.
    assert_eq!(a[1]["code"], "DEADLINE_EXCEEDED", "{}", a[1]);
    let elapsed = a[1]["elapsed_ms"].as_u64().unwrap();
    assert!((700..3000).contains(&elapsed), "{}", a[1]);
    // The client's own shorter deadline still holds, and when it passes the client resets
    // its stream: the gateway cancels the upstream's call at once, not at its own 800 ms.
    assert_eq!(a[2]["code"], "DEADLINE_EXCEEDED", "{}", a[2]);
    let a = calls(h2c, None, &["last_cancel"]);
    let ran = a[0]["reply"].as_i64().unwrap();
    assert!(
        (250..700).contains(&ran),
        "the upstream saw the cancel after {ran} ms"
    );
    // A deadline that passes is the call's, not the target's failure.
    let h = gw.admin("GET", "/v1/upstreams/grpc/health", None).json();
    assert_eq!(h["targets"][0]["consecutive_failures"], 0, "{h}");
    assert_eq!(h["targets"][0]["state"], "healthy", "{h}");
    // Whichever saw the deadline first (the upstream, told what was left of it, or the
    // gateway), it is never an upstream's response timeout.
    let metrics = gw.admin("GET", "/metrics", None).body_str().to_owned();
    let timeouts = metrics
        .lines()
        .find(|l| l.contains("kind=\"response_timeout\""))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(timeouts.ends_with(" 0"), "{timeouts}");

    // Killed while a call is in flight: the call ends UNAVAILABLE at once.
    let mut client = Command::new("python3")
        .arg(PEER)
        .args(["call", &h2c.to_string(), "sleep_long"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.admin("GET", "/v1/upstreams/grpc/health", None).json()["targets"][0]["outstanding"]
        != 1
    {
        assert!(
            Instant::now() < deadline,
            "the call never reached the upstream"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The circuit's one request is taken: another call is UNAVAILABLE at once.
    let a = calls(h2c, None, &["unary"]);
    assert_eq!(a[0]["code"], "UNAVAILABLE", "{}", a[0]);
    assert_eq!(a[0]["details"], "circuit_max_requests", "{}", a[0]);
    let killed = Instant::now();
    svc.kill();
    let mut out = String::new();
    client
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let _ = client.wait();
    let answer: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(answer["code"], "UNAVAILABLE", "{answer}");
    assert!(killed.elapsed() < Duration::from_secs(3), "{answer}");
    // And new calls are UNAVAILABLE too (connection refused), not a hang.
    let started = Instant::now();
    let a = calls(h2c, None, &["unary"]);
    assert_eq!(a[0]["code"], "UNAVAILABLE", "{}", a[0]);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn grpc_unavailable_answers_and_refused_connects_are_retried_on_another_target() {
    let (good, bad) = (GrpcService::start(""), GrpcService::start("unavailable"));
    let dir = temp_dir("grpc-retry");
    let cert = Cert::new(&dir, "grpc.test");
    let upstream = format!(
        "[[upstreams]]\nid = \"grpc\"\nprotocol = \"grpc\"\n\
         targets = [{{ address = \"{}\" }}, {{ address = \"{}\" }}, {{ address = \"{}\" }}]\n\
         retry = {{ attempts = 3, budget_percent = 100, budget_min_per_s = 1000 }}\n\
         passive = {{ consecutive_failures = 2, ejection_ms = 60000, max_ejected_percent = 100 }}\n",
        good.addr,
        bad.addr,
        closed_port()
    );
    let gw = Gateway::start(&config(&upstream, &cert, ""), Driver::IoUring);
    // Round robin sends two of three first tries to a target that fails; each is retried
    // (`grpc:UNAVAILABLE` is the default for gRPC upstreams) until it reaches the good one.
    let checks = ["unary"; 12];
    for a in calls(gw.listeners[0], None, &checks) {
        assert_eq!(a["reply"], "echo:hello", "{a}");
    }
    let metrics = gw.admin("GET", "/metrics", None).body_str().to_owned();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("gateway_target_retries_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // UNAVAILABLE answers are failures for passive health too (before: only HTTP 5xx, which
    // a gRPC server never answers): the failing target is ejected, the good one is not.
    let health = gw.admin("GET", "/v1/upstreams/grpc/health", None).json();
    let state = |addr: SocketAddr| {
        health["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["address"] == addr.to_string())
            .map(|t| t["state"].as_str().unwrap().to_owned())
    };
    assert_eq!(state(bad.addr).as_deref(), Some("ejected"), "{health}");
    assert_eq!(state(good.addr).as_deref(), Some("healthy"), "{health}");
}

/// The next line a peer prints, if it comes within `wait`.
fn line_within(out: &mut BufReader<std::process::ChildStdout>, wait: Duration) -> Option<String> {
    use std::os::fd::AsRawFd;
    if out.buffer().is_empty() {
        let mut ready = libc::pollfd {
            fd: out.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, for the duration of the call.
        if unsafe { libc::poll(&mut ready, 1, ms) } <= 0 {
            return None;
        }
    }
    let mut line = String::new();
    out.read_line(&mut line).ok()?;
    Some(line)
}

/// A running `h2_reset_peer.py CODE`: an h2c upstream that resets every stream with CODE.
struct ResetPeer {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    addr: SocketAddr,
}

impl ResetPeer {
    /// `h2_reset_peer.py` with these arguments.
    fn start_with(args: &[&str]) -> ResetPeer {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/h2_reset_peer.py");
        let (child, out, addr) = start_peer(script, args, "the test HTTP/2 peer", "h2");
        ResetPeer { child, out, addr }
    }

    /// Stops the peer; how many requests it was sent.
    fn requests(self) -> usize {
        let text = self.output();
        text.lines().filter(|l| l.starts_with("request ")).count()
    }

    /// Stops the peer (in `headers` mode); its first "headers ..." line.
    fn headers_line(self) -> String {
        let text = self.output();
        let line = text.lines().find(|l| l.starts_with("headers "));
        line.unwrap_or_else(|| panic!("{text}")).to_owned()
    }

    /// Stops the peer; what it printed after its port.
    fn output(mut self) -> String {
        self.stop();
        let mut text = String::new();
        let _ = self.out.read_to_string(&mut text);
        text
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// It runs until killed: a test that fails, or keeps it to the end, must not leave it behind.
impl Drop for ResetPeer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn request_trailers_to_an_http2_upstream_lose_the_fields_the_gateway_sets_or_checks() {
    // An HTTP/2 client's body relayed to an h2c upstream as it comes, its trailers once the
    // upstream has the request: they go on as HTTP/2 trailers but for a client address and a
    // policy's consumer header (in either spelling), which an upstream merging trailers into
    // the head would take for the gateway's, and fields that frame or route a message
    // (RFC 9110 6.5.1; before: `content-length`, `host` and `trailer` went on).
    let mut peer = ResetPeer::start_with(&["0", "trailers"]);
    let old_addr = peer.addr.to_string();
    let config = h2c_upstream_config(
        &[peer.addr],
        "h2c = true",
        "",
        "",
        "[[policies]]\nid = \"who\"\nkind = \"api_key\"\nconsumer_header = \"X-Who\"\n",
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    const CLIENT: &str = r#"
import socket, sys
import h2.connection, h2.config, h2.events
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
c.send_headers(1, [(":method", "POST"), (":path", "/up"), (":scheme", "http"),
                   (":authority", "t")])
c.send_data(1, b"abc")
s.sendall(c.data_to_send())
sys.stdin.readline()
c.send_headers(1, [("x-sum", "1"), ("x-forwarded-for", "10.1.1.1"), ("x-who", "forged"),
                   ("x_who", "forged"), ("content-length", "99"), ("host", "evil.example"),
                   ("trailer", "x")], end_stream=True)
s.sendall(c.data_to_send())
status, done = None, False
while not done:
    data = s.recv(65536)
    if not data:
        break
    for e in c.receive_data(data):
        if isinstance(e, h2.events.ResponseReceived):
            status = dict(e.headers)[b":status"].decode()
        if isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)):
            done = True
    s.sendall(c.data_to_send())
print(status, flush=True)
"#;
    let mut client = Command::new("python3")
        .args(["-c", CLIENT, &gw.addr.port().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with the PyPI package h2");
    // The head has reached the upstream (its line, after the connection's): the body is
    // being relayed as it comes.
    let line = std::iter::from_fn(|| line_within(&mut peer.out, Duration::from_secs(10)))
        .find(|l| l != "connection\n");
    assert!(
        line.as_deref()
            .is_some_and(|l| l.starts_with("request /up")),
        "{line:?}"
    );
    let _ = client.stdin.take().unwrap().write_all(b"go\n");
    let out = client.wait_with_output().unwrap();
    answered_with_trailers(&out, peer);
    drop(gw);

    // The body and its trailers in one write with the head: all here when the request is
    // taken, the trailers still go on (not a whole body without them).
    let peer = ResetPeer::start_with(&["0", "trailers"]);
    let gw = Gateway::start(
        &config.replace(&old_addr, &peer.addr.to_string()),
        Driver::IoUring,
    );
    let at_once = CLIENT.replace("s.sendall(c.data_to_send())\nsys.stdin.readline()\n", "");
    assert_ne!(at_once, CLIENT);
    let out = Command::new("python3")
        .args(["-c", &at_once, &gw.addr.port().to_string()])
        .output()
        .expect("python3 with the PyPI package h2");
    answered_with_trailers(&out, peer);
}

/// For the request-trailers test: the client got the peer's 204, and the peer got only the
/// trailer field the gateway neither sets nor checks.
fn answered_with_trailers(out: &std::process::Output, peer: ResetPeer) {
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "204",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = peer.output();
    let trailers: Vec<&str> = seen.lines().filter(|l| l.starts_with("trailers")).collect();
    assert_eq!(trailers, ["trailers x-sum=1"], "{seen}");
}

#[test]
fn a_grpc_call_goes_to_another_target_only_if_the_upstream_did_not_take_it() {
    let dir = temp_dir("grpc-reset");
    let cert = Cert::new(&dir, "grpc.test");
    let body = dir.join("call.bin");
    // One empty message, framed.
    std::fs::write(&body, [0u8, 0, 0, 0, 0]).unwrap();
    let call = |gw: &Gateway| {
        Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "--http2-prior-knowledge",
                "-o",
                "/dev/null",
                "-D",
                "-",
            ])
            .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
            .args(["-w", "%{http_code}", "--data-binary"])
            .arg(format!("@{}", body.display()))
            .arg(format!("http://{}/test.Echo/Unary", gw.listeners[0]))
            .output()
            .expect("curl")
    };
    // RST_STREAM INTERNAL_ERROR: the upstream had the call and may have acted on it; with
    // `retry` on (UNAVAILABLE, the gRPC default) it still goes to no other target.
    // RST_STREAM REFUSED_STREAM: it did not; another target may get it. So may a call above
    // the last stream id of a GOAWAY, whatever its code (RFC 9113 6.8; 11: ENHANCE_YOUR_CALM).
    // The client's status is the reset code's (gRPC's PROTOCOL-HTTP2.md): INTERNAL for
    // INTERNAL_ERROR, CANCELLED for CANCEL, RESOURCE_EXHAUSTED for ENHANCE_YOUR_CALM;
    // UNAVAILABLE only for what was not processed (before: UNAVAILABLE for every reset,
    // which a client's retry policy takes for safe to send again).
    for (code, mode, most, least, status) in [
        (2, "reset", 1, 1, "13"),
        (8, "reset", 1, 1, "1"),
        (11, "reset", 1, 1, "8"),
        (7, "reset", usize::MAX, 2, "14"),
        (11, "goaway", usize::MAX, 2, "14"),
        (0, "goaway", usize::MAX, 2, "14"),
    ] {
        let args = [code.to_string(), mode.to_owned()];
        let args: Vec<&str> = args
            .iter()
            .map(String::as_str)
            .filter(|a| *a != "reset")
            .collect();
        let (a, b) = (ResetPeer::start_with(&args), ResetPeer::start_with(&args));
        let upstream = format!(
            "[[upstreams]]\nid = \"grpc\"\nprotocol = \"grpc\"\n\
             targets = [{{ address = \"{}\" }}, {{ address = \"{}\" }}]\n\
             retry = {{ attempts = 3, budget_percent = 100, budget_min_per_s = 1000 }}\n",
            a.addr, b.addr
        );
        let gw = Gateway::start(&config(&upstream, &cert, ""), Driver::IoUring);
        let out = call(&gw);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.ends_with("200"), "{text}");
        let grpc_status = text
            .lines()
            .find_map(|l| l.strip_prefix("grpc-status: "))
            .map(str::trim);
        assert_eq!(grpc_status, Some(status), "{mode} {code}: {text}");
        // The targets' metrics count every send, the resend on a fresh connection after a
        // refused stream included (before: neither counted it).
        let metrics = gw.admin("GET", "/metrics", None).body_str().to_owned();
        let sum = |family: &str| -> usize {
            metrics
                .lines()
                .filter(|l| l.starts_with(&format!("{family}{{upstream=\"grpc\"")))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<usize>().ok())
                .sum()
        };
        drop(gw);
        let sent = a.requests() + b.requests();
        assert!(
            (least..=most).contains(&sent),
            "{mode} {code}: the call reached the upstream {sent} times"
        );
        assert_eq!(
            (
                sum("gateway_target_requests_total"),
                sum("gateway_target_retries_total")
            ),
            (sent, sent - 1),
            "{mode} {code}"
        );
    }
}

#[test]
fn the_gateways_own_grpc_answer_over_http2_counts_its_head() {
    // A call to a target that refuses connections: the gateway's trailers-only UNAVAILABLE
    // to an HTTP/2 client is logged with its head's bytes, as to an HTTP/1.1 client (before,
    // `bytes_out` 0).
    let log = temp_dir("grpc-own-bytes").join("access.log");
    let top = format!("[access_log]\npath = \"{}\"\n", log.display());
    let config = h2c_upstream_config(&[closed_port()], "h2c = true", &top, "", "")
        .replace("protocol = \"h2c\"", "protocol = \"grpc\"");
    let gw = Gateway::start(&config, Driver::IoUring);
    let url = format!("http://{}/svc.S/M", gw.listeners[0]);
    let out = curl_run(
        10,
        "%{http_code}",
        &[
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
            "--data-binary",
            "",
            &url,
        ],
        "HTTP/2 tests",
    );
    assert_eq!(out.last, "200", "{}", out.body);
    let line = wait_log_lines(&log, 1).remove(0);
    assert!(line["bytes_out"].as_u64().unwrap() > 40, "{line}");
}

#[test]
fn a_refused_stream_is_sent_again_on_its_live_connection() {
    // Every stream refused (REFUSED_STREAM), the connection going on, the circuit allowing
    // one connection: the request goes once more on that connection, and is the upstream's
    // 502 (before, the resend wanted a new connection, which the circuit refused: a 503
    // `max_connections` for one request on one connection).
    let peer = ResetPeer::start_with(&["7"]);
    let config = h2c_upstream_config(
        &[peer.addr],
        "",
        "",
        "circuit = { max_connections = 1 }",
        "",
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    let r = gw
        .connect()
        .roundtrip("GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 502, "{}", r.head);
    assert_eq!(r.header("x-gateway-reason"), None, "{}", r.head);
    drop(gw);
    let text = peer.output();
    let lines = |start: &str| text.lines().filter(|l| l.starts_with(start)).count();
    assert_eq!((lines("request "), lines("connection")), (2, 1), "{text}");
}

#[test]
fn a_grpc_content_type_does_not_make_a_post_to_an_h2c_upstream_idempotent() {
    // Two targets that never answer, a retry policy on timeouts for idempotent methods: a
    // POST (gRPC or not) reaches one of them once and times out (a gRPC call gets that as
    // UNAVAILABLE in a trailers-only answer).
    let (a, b) = (
        ResetPeer::start_with(&["0", "silent"]),
        ResetPeer::start_with(&["0", "silent"]),
    );
    let config = h2c_upstream_config(
        &[a.addr, b.addr],
        "h2c = true",
        "[timeouts]\nupstream_response_head_ms = 300",
        "retry = { attempts = 3, on = [\"timeout\"], methods = \"idempotent\", \
         budget_percent = 100, budget_min_per_s = 1000 }",
        "",
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--http2-prior-knowledge",
            "-D",
            "-",
        ])
        .args(["-H", "content-type: application/grpc", "--data-binary", "x"])
        .arg(format!("http://{}/svc/Method", gw.listeners[0]))
        .output()
        .expect("curl");
    let head = String::from_utf8_lossy(&out.stdout);
    assert!(head.starts_with("HTTP/2 200"), "{head}");
    assert!(head.contains("grpc-status: 14"), "{head}");
    drop(gw);
    assert_eq!(a.requests() + b.requests(), 1);
}

#[test]
fn http2_upstreams_sharing_a_target_keep_their_connections_apart() {
    // Two h2c upstreams with one target: each opens its own connection (its own
    // `max_streams` and circuit count), as two HTTP/1.1 upstreams keep their pools apart.
    let peer = ResetPeer::start_with(&["0", "no-content"]);
    let config = format!(
        "workers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n\
         [[upstreams]]\nid = \"a\"\nprotocol = \"h2c\"\ntargets = [{{ address = \"{t}\" }}]\n\
         circuit = {{ max_connections = 1 }}\n\
         [[upstreams]]\nid = \"b\"\nprotocol = \"h2c\"\ntargets = [{{ address = \"{t}\" }}]\n\n\
         [[routes]]\nid = \"a\"\npath_prefix = \"/a/\"\nupstream = \"a\"\n\
         [[routes]]\nid = \"b\"\npath_prefix = \"/b/\"\nupstream = \"b\"\n",
        t = peer.addr
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    for path in ["/a/1", "/b/1", "/a/2", "/b/2"] {
        let r = gw.connect().roundtrip(&format!(
            "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        ));
        assert_eq!(r.status, 204, "{path}: {}", r.head);
    }
    drop(gw);
    let text = peer.output();
    let lines = |start: &str| text.lines().filter(|l| l.starts_with(start)).count();
    assert_eq!((lines("request "), lines("connection")), (4, 2), "{text}");
}

#[test]
fn lowering_max_streams_holds_for_the_connections_open_already() {
    // One connection with room for 100 streams, then max_streams lowered to 1: three calls
    // at once take a connection each (before, all three went on the one open already, for
    // as long as traffic kept it in use).
    let peer = ResetPeer::start_with(&["0", "answers"]);
    let config = h2c_upstream_config(&[peer.addr], "", "", "max_streams = 100", "");
    let gw = Gateway::start(&config, Driver::IoUring);
    let get = |path: &str| {
        gw.connect()
            .roundtrip(&format!(
                "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            ))
            .status
    };
    assert_eq!(get("/len"), 200);
    let mut upstream = gw.admin("GET", "/v1/upstreams/h2", None).json();
    upstream["max_streams"] = 1.into();
    let r = gw.admin("PUT", "/v1/upstreams/h2", Some(&upstream.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    std::thread::scope(|s| {
        let calls: Vec<_> = (0..3).map(|_| s.spawn(|| get("/slow"))).collect();
        for call in calls {
            assert_eq!(call.join().unwrap(), 200);
        }
    });
    drop(gw);
    let text = peer.output();
    let connections = text.lines().filter(|l| l.starts_with("connection")).count();
    assert_eq!(connections, 3, "{text}");
}

#[test]
fn a_burst_to_a_cold_http2_upstream_shares_the_connection_being_opened() {
    // 50 streams at once from one client, and no connection to the upstream yet: the first
    // request opens one and the others wait for it (up to max_streams) instead of opening
    // one each. Before: 50 connections, or with max_connections = 2, 48 answers of 503.
    let peer = ResetPeer::start_with(&["0", "no-content"]);
    let gw = two_connections_to(&peer);
    let codes = h2load_burst(50, &format!("http://{}/x", gw.listeners[0]));
    assert!(codes.starts_with("status codes: 50 2xx"), "{codes}");
    drop(gw);
    let peer_text = peer.output();
    let lines = |start: &str| peer_text.lines().filter(|l| l.starts_with(start)).count();
    assert_eq!(
        (lines("request "), lines("connection")),
        (50, 1),
        "{peer_text}"
    );
}

#[test]
fn an_http2_upstreams_answers_keep_http11s_rules() {
    let peer = ResetPeer::start_with(&["0", "answers"]);
    let log = temp_dir("h2-answers").join("access.log");
    // The clients' header list bound, low: it is not the upstreams' (before, it was, and
    // `/250`'s head, about 9.5 KB as HPACK counts, was a 502).
    let top = format!(
        "[access_log]\npath = \"{}\"\n[http2]\nmax_header_list_size = 4096\n",
        log.display()
    );
    let config = h2c_upstream_config(&[peer.addr], "h2c = true", &top, "", "");
    let gw = Gateway::start(&config, Driver::IoUring);
    let raw = |path: &str| {
        let mut c = gw.connect();
        c.send(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes());
        let mut got = Vec::new();
        let _ = c.stream.read_to_end(&mut got);
        String::from_utf8_lossy(&got).into_owned()
    };
    // Interim answers are passed on (RFC 9110 15.2), before the final one, to HTTP/1.1 and
    // HTTP/2 clients (before: dropped).
    let text = raw("/hints");
    assert!(
        text.starts_with("HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")
            && text.contains("\r\n\r\nHTTP/1.1 200 OK\r\n"),
        "{text}"
    );
    // The interim is the upstream's first byte (before: the final head's time).
    let text = raw("/hints-slow");
    assert!(
        text.starts_with("HTTP/1.1 103 ") && text.contains("HTTP/1.1 200 "),
        "{text}"
    );
    let lines = wait_log_lines(&log, 2);
    let slow = lines.iter().find(|l| l["path"] == "/hints-slow").unwrap();
    let first = slow["upstream_first_byte_ms"].as_f64().unwrap();
    assert!(first < 500.0, "{slow}");
    // The upstream-response histogram takes the final head's time, a second later (before:
    // the interim's, as the log's first byte).
    let metrics = gw.admin("GET", "/metrics", None).body_str().to_owned();
    let waited: f64 = (metrics.lines())
        .find_map(|l| l.strip_prefix("gateway_upstream_response_duration_seconds_sum "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(waited >= 1.0, "{waited}");
    let url = format!("http://{}/hints", gw.listeners[0]);
    let out = curl_run(
        10,
        "",
        &["--http2-prior-knowledge", "-D", "-", &url],
        "HTTP/2 tests",
    );
    assert!(
        out.body.starts_with("HTTP/2 103") && out.body.contains("HTTP/2 200"),
        "{}",
        out.body
    );
    // Not a 101, which HTTP/2 has not, nor an interim with more than 256 fields: a 502 as
    // from an HTTP/1.1 upstream (the review found both relayed); an interim's
    // `Content-Length` goes (RFC 9110 8.6).
    for path in ["/s101", "/hints-big", "/hints-huge"] {
        let text = raw(path);
        assert!(text.starts_with("HTTP/1.1 502 "), "{path}: {text}");
    }
    let text = raw("/hints-cl");
    assert!(
        text.starts_with("HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 204 "),
        "{text}"
    );
    // Trailers lose the fields that frame or route a message (before: relayed).
    let text = raw("/trailers");
    assert!(text.contains("hello\r\n0\r\nx-ok: 1\r\n\r\n"), "{text}");
    // At most 256 field lines, as from an HTTP/1.1 upstream (before: 300 relayed), and 64
    // KiB (a first bound in HPACK's measure let a head of one field pass up to 72 KiB).
    assert!(raw("/big/65000").starts_with("HTTP/1.1 200 OK"));
    let text = raw("/big/66000");
    assert!(text.starts_with("HTTP/1.1 502 "), "{}", &text[..40]);
    assert!(raw("/250").starts_with("HTTP/1.1 200 OK"));
    let text = raw("/300");
    assert!(text.starts_with("HTTP/1.1 502 "), "{text}");
    // An HTTP/1.0 client that asks for keep-alive is told it has it (before: kept, but not
    // told, so the client closed), and its next request goes on the connection.
    let mut c = gw.connect();
    for _ in 0..2 {
        let r = c.roundtrip("GET /len HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n");
        assert_eq!(
            (r.status, r.header("connection")),
            (200, Some("keep-alive")),
            "{}",
            r.head
        );
    }
    // A client that pipelined a request behind its body and half-closed is not taken for
    // gone while the first is answered (before: 499 at the first look, a second on).
    let mut c = gw.connect();
    c.send(
        b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello\
          GET /250 HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    let r = c.read_response();
    assert_eq!((r.status, r.body_str()), (200, "slow"), "{}", r.head);
}

#[test]
fn an_http2_connection_its_target_closed_holds_no_place_in_max_connections() {
    // Each target answers, then closes its connection. Before, the closed connection held
    // the upstream's one place until the pool's sweep (a second): the other target's
    // request got 503 max_connections with nothing open.
    let (a, b) = (
        ResetPeer::start_with(&["0", "answer-close"]),
        ResetPeer::start_with(&["0", "answer-close"]),
    );
    let circuit = "circuit = { max_connections = 1 }";
    let gw = Gateway::start(
        &h2c_upstream_config(&[a.addr, b.addr], "", "", circuit, ""),
        Driver::IoUring,
    );
    for i in 0..4 {
        let r = gw
            .connect()
            .roundtrip("GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        assert_eq!(r.status, 204, "{i}: {}", r.head);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_retrys_first_byte_is_its_own() {
    // The first try answers a 103, then a 503, which is retried (an HTTP/1.0 client gets no
    // interims, so nothing was passed on); the retry's answer comes a second and more later.
    // Before: `upstream_first_byte_ms` kept the first try's interim.
    let (first, second) = (
        ResetPeer::start_with(&["0", "interim-503"]),
        ResetPeer::start_with(&["0", "answers"]),
    );
    let log = temp_dir("h2-retry-first-byte").join("access.log");
    let top = format!("[access_log]\npath = \"{}\"\n", log.display());
    let retry = "retry = { attempts = 2, on = [\"503\"], budget_min_per_s = 1000 }";
    let gw = Gateway::start(
        &h2c_upstream_config(&[first.addr, second.addr], "", &top, retry, ""),
        Driver::IoUring,
    );
    // Round robin: one of two requests meets the 503 first.
    for _ in 0..2 {
        let r = gw
            .connect()
            .roundtrip("GET /slow HTTP/1.0\r\nHost: t\r\n\r\n");
        assert_eq!(r.status, 200, "{}", r.head);
    }
    let lines = wait_log_lines(&log, 2);
    let retried = (lines.iter())
        .find(|l| l["retries"] == 1)
        .unwrap_or_else(|| panic!("no request retried: {lines:?}"));
    let first_byte = retried["upstream_first_byte_ms"].as_f64().unwrap();
    assert!(first_byte > 1000.0, "{retried}");
    // A client that leaves while its retry is being answered: the retry went, and is
    // counted as one (a first fix counted retries once their try returned, and a try the
    // client's leaving drops never does).
    for _ in 0..2 {
        let mut c = gw.connect();
        c.send(b"GET /slow HTTP/1.0\r\nHost: t\r\n\r\n");
        std::thread::sleep(Duration::from_millis(500));
        drop(c);
    }
    let lines = wait_log_lines(&log, 4);
    let left = (lines[2..].iter())
        .find(|l| l["status"] == 499)
        .unwrap_or_else(|| panic!("no 499: {lines:?}"));
    let retried = (lines[2..].iter()).filter(|l| l["retries"] == 1).count();
    assert_eq!(retried, 1, "{left} {lines:?}");
}

#[test]
fn no_pooling_closes_an_http2_upstream_connection_once_its_streams_end() {
    // `max_idle_per_target = 0` disables pooling: before, HTTP/2 upstreams kept one idle
    // connection anyway and used it again.
    let peer = ResetPeer::start_with(&["0", "no-content"]);
    let top = "[upstream_pool]\nmax_idle_per_target = 0";
    let gw = Gateway::start(
        &h2c_upstream_config(&[peer.addr], "", top, "", ""),
        Driver::IoUring,
    );
    for _ in 0..3 {
        let r = gw
            .connect()
            .roundtrip("GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        assert_eq!(r.status, 204, "{}", r.head);
    }
    drop(gw);
    let text = peer.output();
    let lines = |start: &str| text.lines().filter(|l| l.starts_with(start)).count();
    assert_eq!((lines("request "), lines("connection")), (3, 3), "{text}");
}

/// A config whose one route `all` sends everything to the h2c upstream `h2` of `targets`;
/// the other arguments are lines for the listener (`h2c = true`), tables before the upstream
/// (`[timeouts]`), lines for the upstream, and lines after the route (its own, or tables).
fn h2c_upstream_config(
    targets: &[SocketAddr],
    listener: &str,
    top: &str,
    upstream: &str,
    rest: &str,
) -> String {
    let targets: Vec<String> = (targets.iter())
        .map(|t| format!("{{ address = \"{t}\" }}"))
        .collect();
    format!(
        "workers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n{listener}\n\n{top}\n\n\
         [[upstreams]]\nid = \"h2\"\nprotocol = \"h2c\"\ntargets = [{}]\n{upstream}\n\n\
         [[routes]]\nid = \"all\"\npath_prefix = \"/\"\nupstream = \"h2\"\n{rest}",
        targets.join(", ")
    )
}

#[test]
fn a_streamed_body_is_the_clients_time_not_the_upstreams_silence() {
    // A body streamed to an h2c upstream that answers once it has it all (a client-streaming
    // call, a slow upload): `upstream_response_head_ms` counts from when the body last moved
    // on. Before: from the head sent, so the upload was cut at 400 ms with a 504 and the
    // healthy target charged a response timeout. A client that pauses is the client's
    // silence, bounded by `client_body_ms` (the review found a first version charging the
    // target for it): a 408, the target not charged.
    let peer = ResetPeer::start_with(&["0", "trailers"]);
    // A gateway with an h2c listener proxying to `target`, with these `[timeouts]` lines
    // and upstream lines.
    let start = |target: SocketAddr, timeouts: &str, upstream: &str| {
        let top = format!("[timeouts]\n{timeouts}");
        let config = h2c_upstream_config(&[target], "h2c = true", &top, upstream, "");
        Gateway::start(&config, Driver::IoUring)
    };
    let gw = start(
        peer.addr,
        "upstream_response_head_ms = 400\nclient_body_ms = 1200\n",
        "",
    );
    const CLIENT: &str = r#"
import socket, sys, time
import h2.connection, h2.config, h2.events
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
method = sys.argv[4] if len(sys.argv) > 4 else "POST"
c.send_headers(1, [(":method", method), (":path", "/up"), (":scheme", "http"),
                   (":authority", "t")])
s.sendall(c.data_to_send())
start = time.monotonic()
for i in range(int(sys.argv[2])):
    time.sleep(0.15)
    c.send_data(1, b"piece")
    s.sendall(c.data_to_send())
pause = float(sys.argv[3])
ended = pause == 0
if ended:
    c.end_stream(1)
    s.sendall(c.data_to_send())
s.settimeout(pause or 10)
status, done = None, False
while not done:
    try:
        data = s.recv(65536)
    except socket.timeout:
        # The pause is over with no answer: the body ends now.
        c.end_stream(1)
        s.sendall(c.data_to_send())
        s.settimeout(10)
        continue
    if not data:
        break
    for e in c.receive_data(data):
        if isinstance(e, h2.events.ResponseReceived):
            status = dict(e.headers)[b":status"].decode()
            took = time.monotonic() - start
        if isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)):
            done = True
    s.sendall(c.data_to_send())
print(status, round(took, 1), flush=True)
"#;
    let run_as = |gw: &Gateway, pieces: &str, pause: &str, method: &str| {
        let out = Command::new("python3")
            .args([
                "-c",
                CLIENT,
                &gw.addr.port().to_string(),
                pieces,
                pause,
                method,
            ])
            .output()
            .expect("python3 with the PyPI package h2");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let (status, took) = text.split_once(' ').unwrap_or_else(|| {
            panic!("{text}: {}", String::from_utf8_lossy(&out.stderr));
        });
        (status.to_owned(), took.parse::<f64>().unwrap())
    };
    let run = |gw: &Gateway, pieces: &str, pause: &str| run_as(gw, pieces, pause, "POST");
    // 8 pieces 150 ms apart: 1.2 s of body, every gap within the timeout.
    let (status, took) = run(&gw, "8", "0");
    assert_eq!(status, "204", "after {took} s");
    let health = gw.admin("GET", "/v1/upstreams/h2/health", None).json();
    assert_eq!(health["targets"][0]["consecutive_failures"], 0, "{health}");
    // A pause longer than the head timeout, shorter than the body's: waited out.
    let (status, took) = run(&gw, "1", "0.8");
    assert_eq!(status, "204", "after {took} s");
    // A pause longer than client_body_ms: 408, 1.2 s after the last piece, before the
    // client would have ended the body; the target is not charged.
    let (status, took) = run(&gw, "1", "3");
    assert_eq!(status, "408", "after {took} s");
    assert!(took < 2.5, "{took}");
    let health = gw.admin("GET", "/v1/upstreams/h2/health", None).json();
    assert_eq!(health["targets"][0]["consecutive_failures"], 0, "{health}");
    drop(gw);
    // client_body_ms shorter than the head timeout: a pause is cut at it, not at the head
    // timeout (the second review found the first wait armed before the pump said it awaited
    // the client, so a 3 s pause ran to the 5 s head timeout). A body that ends while the
    // client's longer bound is armed: the upstream's silence counts from its end, 500 ms
    // (the third review found the wait sleeping on to the client's 3 s bound). A per-try
    // bound counts from the body's end too, as Envoy's does: a pause of the client's is not
    // the try's (before: a 504 at 500 ms, and the target charged for it).
    let silent = ResetPeer::start_with(&["0", "silent"]);
    let per_try = "retry = { attempts = 2, per_try_timeout_ms = 500 }";
    for (target, timeouts, upstream, pause, want, within) in [
        (
            peer.addr,
            "upstream_response_head_ms = 5000\nclient_body_ms = 1000\n",
            "",
            "3",
            "408",
            1.0..2.0,
        ),
        (
            silent.addr,
            "upstream_response_head_ms = 500\nclient_body_ms = 3000\n",
            "",
            "1",
            "504",
            1.4..2.3,
        ),
        (
            silent.addr,
            "client_body_ms = 5000\n",
            per_try,
            "3",
            "504",
            3.4..5.0,
        ),
        (
            peer.addr,
            "client_body_ms = 5000\n",
            per_try,
            "1",
            "204",
            0.9..3.0,
        ),
    ] {
        let gw = start(target, timeouts, upstream);
        let (status, took) = run(&gw, "1", pause);
        assert_eq!(status, want, "{timeouts} {upstream}: after {took} s");
        assert!(within.contains(&took), "{timeouts} {upstream}: {took}");
        let health = gw.admin("GET", "/v1/upstreams/h2/health", None).json();
        let charged = u64::from(want == "504");
        assert_eq!(
            health["targets"][0]["consecutive_failures"], charged,
            "{health}"
        );
    }
    // Nor does `overall_timeout_ms` bound a PUT (which the policy may retry) while its body
    // streams: such a request has its `[timeouts]` only (the review found a 504 the moment
    // the body ended, and the target charged).
    let overall = "retry = { attempts = 2, overall_timeout_ms = 500 }";
    let gw = start(peer.addr, "client_body_ms = 5000\n", overall);
    let (status, took) = run_as(&gw, "1", "1", "PUT");
    assert_eq!(status, "204", "after {took} s");
    let health = gw.admin("GET", "/v1/upstreams/h2/health", None).json();
    assert_eq!(health["targets"][0]["consecutive_failures"], 0, "{health}");
}

#[test]
fn a_burst_takes_no_more_streams_than_the_target_allows() {
    // The target allows one stream per connection (SETTINGS_MAX_CONCURRENT_STREAMS 1). A
    // new connection's streams go out before its SETTINGS come: once the target has said
    // its limit on a connection, new ones take no more than that (before: the burst's
    // second connection took three, and grpc-core reset two, UNAVAILABLE).
    let svc = GrpcService::start("one-stream");
    let dir = temp_dir("grpc-one-stream");
    let cert = Cert::new(&dir, "grpc.test");
    let upstream = format!(
        "[[upstreams]]\nid = \"grpc\"\nprotocol = \"grpc\"\ntargets = [{{ address = \"{}\" }}]\n",
        svc.addr
    );
    let gw = Gateway::start(&config(&upstream, &cert, ""), Driver::IoUring);
    let a = calls(gw.listeners[0], None, &["unary", "burst"]);
    assert_eq!(a[0]["reply"], "echo:hello", "{}", a[0]);
    let all_ok = serde_json::json!(["OK", "OK", "OK", "OK"]);
    assert_eq!(a[1]["codes"], all_ok, "{}", a[1]);
}

#[test]
fn a_silent_grpc_upstream_past_the_cap_is_the_targets_timeout() {
    // Calls with a 10 s deadline, capped at 500 ms, to an upstream that never answers (a
    // connection gone silent): each ends DEADLINE_EXCEEDED for the client, but the silence
    // is the target's response timeout (its connection not used again, counted in its
    // health). Before: taken for the client's deadline, the dead connection was used for
    // every later call and the target never ejected.
    let mut peer = ResetPeer::start_with(&["0", "silent"]);
    let config = h2c_upstream_config(
        &[peer.addr],
        "h2c = true",
        "[timeouts]\nupstream_response_head_ms = 500\n",
        "protocol = \"grpc\"\n\
         passive = { consecutive_failures = 2, ejection_ms = 60000, max_ejected_percent = 100 }",
        "",
    )
    .replace("protocol = \"h2c\"\n", "");
    let gw = Gateway::start(&config, Driver::IoUring);
    let a = calls(gw.listeners[0], None, &["unary", "unary"]);
    for answer in &a {
        assert_eq!(answer["code"], "DEADLINE_EXCEEDED", "{answer}");
    }
    let health = gw.admin("GET", "/v1/upstreams/h2/health", None).json();
    assert_eq!(health["targets"][0]["state"], "ejected", "{health}");
    // Each call on a connection of its own.
    let connections = std::iter::from_fn(|| line_within(&mut peer.out, Duration::from_secs(5)))
        .filter(|l| l == "connection\n")
        .take(2)
        .count();
    assert_eq!(connections, 2);
    drop(gw);

    // A per-try bound as long as the client's own deadline (a client that does not cancel
    // at its deadline): once that deadline has passed, whichever timer ends the wait, it is
    // the call's, not the target's (a first version counted it: ejected after two calls).
    let config = config
        .replace(
            "upstream_response_head_ms = 500",
            "upstream_response_head_ms = 60000",
        )
        .replace(
            "passive = {",
            "retry = { attempts = 2, on = [\"timeout\"], per_try_timeout_ms = 500 }\npassive = {",
        );
    let gw = Gateway::start(&config, Driver::IoUring);
    for _ in 0..2 {
        let out = Command::new("curl")
            .args([
                "-s",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "--http2-prior-knowledge",
                "-X",
                "POST",
            ])
            .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
            .args(["-H", "grpc-timeout: 500m", "--data-binary", ""])
            .arg(format!("http://{}/silent.S/M", gw.listeners[0]))
            .output()
            .expect("curl");
        let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        assert!(head.contains("grpc-status: 4"), "{head}");
    }
    let health = gw.admin("GET", "/v1/upstreams/h2/health", None).json();
    let t = &health["targets"][0];
    let healthy = (serde_json::json!("healthy"), serde_json::json!(0));
    assert_eq!(
        (&t["state"], &t["consecutive_failures"]),
        (&healthy.0, &healthy.1),
        "{t}"
    );
}

#[test]
fn an_http2_answer_cut_after_its_head_counts_against_its_target() {
    // The head (200) and the start of a body, then RST_STREAM: a failure of the target, as
    // over HTTP/1.1 (before: counted a success, never ejected).
    let peer = ResetPeer::start_with(&["2", "partial"]);
    let config = h2c_upstream_config(
        &[peer.addr],
        "",
        "",
        "passive = { consecutive_failures = 2, ejection_ms = 60000, max_ejected_percent = 100 }",
        "",
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    for _ in 0..2 {
        gw.connect().get_to_close("/x");
    }
    let health = gw.admin("GET", "/v1/upstreams/h2/health", None).json();
    assert_eq!(health["targets"][0]["state"], "ejected", "{health}");
}

/// A gateway with an h2c listener whose one route goes to `peer` as an h2c upstream of at
/// most two connections (`circuit.max_connections`).
fn two_connections_to(peer: &ResetPeer) -> Gateway {
    let config = h2c_upstream_config(
        &[peer.addr],
        "h2c = true",
        "",
        "circuit = { max_connections = 2 }",
        "",
    );
    Gateway::start(&config, Driver::IoUring)
}

/// `h2load -n N -c 1 -m N` on `url`: its "status codes" line.
fn h2load_burst(n: usize, url: &str) -> String {
    let out = Command::new("h2load")
        .args(["-n", &n.to_string(), "-c", "1", "-m", &n.to_string(), url])
        .output()
        .expect("h2load is needed (scripts/test installs Debian's nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("status codes:"));
    line.unwrap_or_else(|| panic!("{text}")).to_owned()
}

#[test]
fn streams_a_goaway_left_unprocessed_go_again_on_one_new_connection() {
    // The first connection's GOAWAY (last stream 0) leaves 20 streams unprocessed: each goes
    // again on a fresh connection, and they share the one being opened. Before: 20 more
    // connections (with max_connections, 503s).
    let peer = ResetPeer::start_with(&["0", "goaway-once"]);
    let gw = two_connections_to(&peer);
    let codes = h2load_burst(20, &format!("http://{}/x", gw.listeners[0]));
    assert!(codes.starts_with("status codes: 20 2xx"), "{codes}");
    drop(gw);
    let text = peer.output();
    assert_eq!(
        text.lines().filter(|l| *l == "connection").count(),
        2,
        "{text}"
    );
}

#[test]
fn an_http2_upstream_connection_that_allows_no_stream_takes_none() {
    // SETTINGS with MAX_CONCURRENT_STREAMS 0: that connection is not given streams (each
    // request goes on a new one, whose first stream the peer answers before its SETTINGS
    // apply). Before: it counted as room for one, the stream waited there for the head
    // timeout (5 s here) and the target was blamed for a request it never had. A stream
    // that cannot open is given up after upstream_connect_ms.
    let peer = ResetPeer::start_with(&["0", "zero"]);
    let config = h2c_upstream_config(
        &[peer.addr],
        "",
        "[timeouts]\nupstream_connect_ms = 300\nupstream_response_head_ms = 5000",
        "",
        "",
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let asked = std::time::Instant::now();
        let r = gw
            .connect()
            .roundtrip("GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{:?}",
            asked.elapsed()
        );
        statuses.push(r.status);
    }
    assert_eq!(statuses, [204, 204, 204]);
}

#[test]
fn a_timeout_retry_to_an_http2_upstream_gets_its_own_head_timeout() {
    // A silent target and one that answers (204): a request whose first try times out goes
    // to the other with a full `upstream_response_head_ms` of its own (it had none left, and
    // the answering target was blamed).
    let (silent, answers) = (
        ResetPeer::start_with(&["0", "silent"]),
        ResetPeer::start_with(&["0", "no-content"]),
    );
    let config = h2c_upstream_config(
        &[silent.addr, answers.addr],
        "",
        "[timeouts]\nupstream_response_head_ms = 400",
        "retry = { attempts = 2, on = [\"timeout\"], budget_percent = 100, \
         budget_min_per_s = 1000 }",
        "",
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    for _ in 0..2 {
        let r = gw
            .connect()
            .roundtrip("GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        assert_eq!(r.status, 204, "{}", r.head);
    }
    drop(gw);
    assert_eq!(silent.requests(), 1);
    assert_eq!(answers.requests(), 2);
}

#[test]
fn an_http11_client_keeps_its_connection_after_the_gateways_502_from_an_http2_upstream() {
    // Every stream reset (INTERNAL_ERROR): each request gets the gateway's 502, and the
    // connection goes on, a body read whole or not, as on the HTTP/1.1 path (before: closed
    // after each).
    let peer = ResetPeer::start_with(&["2"]);
    let config = h2c_upstream_config(&[peer.addr], "", "", "", "");
    let gw = Gateway::start(&config, Driver::IoUring);
    let mut c = gw.connect();
    for request in [
        "POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
        "GET /b HTTP/1.1\r\nHost: t\r\n\r\n",
        "GET /c HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    ] {
        let r = c.roundtrip(request);
        assert_eq!(r.status, 502, "{}", r.head);
        let close = request.contains("close");
        assert_eq!(r.header("connection") == Some("close"), close, "{}", r.head);
    }
    assert!(c.is_closed_within(Duration::from_secs(5)));
}

#[test]
fn a_body_against_its_content_length_to_an_http2_upstream_is_a_bad_request() {
    // An HTTP/2 client's body against its `content-length`, to a gRPC upstream, whole (5
    // of 10 bytes, then its end), as a plain POST and as a gRPC-Web call: h2 resets the
    // client's stream, and the log says 400 `bad_request` (the second review found 499s on
    // these paths, the gRPC-Web one as `"status":499,"error":"bad_request"`). One streamed
    // past its length is reset as h2 schedules it, which its reader cannot tell from the
    // connection's GOAWAY: logged as the client gone (documented).
    // An upstream that answers once the request has ended.
    let peer = ResetPeer::start_with(&["0", "trailers"]);
    let dir = temp_dir("h2up-malformed");
    let log = dir.join("access.log");
    let config = format!(
        "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\nh2c = true\n\
         [access_log]\npath = \"{}\"\n\
         [[upstreams]]\nid = \"g\"\nprotocol = \"grpc\"\n\
         targets = [{{ address = \"{}\" }}]\n\
         [[routes]]\nid = \"all\"\npath_prefix = \"/\"\nupstream = \"g\"\n",
        log.display(),
        peer.addr
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    run_h2_client(
        gw.addr,
        r#"
c.send_headers(1, [(":method", "POST"), (":path", "/whole"), (":scheme", "http"),
                   (":authority", "t"), ("content-length", "10")])
c.send_data(1, b"12345", end_stream=True)
s.sendall(c.data_to_send())
time.sleep(0.3)
c.send_headers(3, [(":method", "POST"), (":path", "/svc.S/M"), (":scheme", "http"),
                   (":authority", "t"), ("content-type", "application/grpc-web+proto"),
                   ("content-length", "10")])
c.send_data(3, b"12345", end_stream=True)
s.sendall(c.data_to_send())
"#,
    );
    let lines = wait_log_lines(&log, 2);
    for (l, path) in lines.iter().zip(["/whole", "/svc.S/M"]) {
        assert_eq!(l["path"], path, "{l}");
        assert_eq!(l["error"], "bad_request", "{l}");
        assert_eq!(l["status"], 400, "{l}");
    }
}

#[test]
fn a_grpc_web_client_over_http11_keeps_its_connection_after_the_gateways_error() {
    // Every stream reset: each gRPC-Web call gets the gateway's own status in a head with its
    // length, and the connection goes on (before: closed after each, as noted in stop 60).
    let peer = ResetPeer::start_with(&["2"]);
    let config = grpc_upstream_config(peer.addr);
    let gw = Gateway::start(&config, Driver::IoUring);
    let mut c = gw.connect();
    let call = frame(b"hi");
    for close in [false, false, true] {
        let connection = if close { "Connection: close\r\n" } else { "" };
        c.send(
            format!(
                "POST /svc.S/M HTTP/1.1\r\nHost: t\r\nContent-Type: application/grpc-web+proto\r\n\
                 {connection}Content-Length: {}\r\n\r\n",
                call.len()
            )
            .as_bytes(),
        );
        c.send(&call);
        let r = c.read_response();
        assert_eq!(r.status, 200, "{}", r.head);
        assert!(
            r.header("grpc-status").is_some_and(|s| s != "0"),
            "{}",
            r.head
        );
        assert_eq!(r.header("content-length"), Some("0"), "{}", r.head);
        assert_eq!(r.header("connection") == Some("close"), close, "{}", r.head);
    }
    assert!(c.is_closed_within(Duration::from_secs(5)));
}

#[test]
fn a_get_on_a_pooled_http2_connection_closed_under_it_goes_once_more() {
    // The upstream closes its pooled connection (no GOAWAY) as a GET arrives on it: the GET
    // goes again on a new connection, as on HTTP/1.1 (before: a 502); a POST does not.
    let peer = ResetPeer::start_with(&["0", "close-once"]);
    let config = h2c_upstream_config(&[peer.addr], "", "", "", "");
    let gw = Gateway::start(&config, Driver::IoUring);
    let mut c = gw.connect();
    let get = |c: &mut Client, path: &str| {
        let r = c.roundtrip(&format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n"));
        (r.status, r.body_str().to_owned())
    };
    assert_eq!(get(&mut c, "/warm"), (200, "ok".to_owned()));
    assert_eq!(get(&mut c, "/close"), (200, "ok".to_owned()));
    drop(gw);
    let text = peer.output();
    assert_eq!(
        text.lines().filter(|l| l.starts_with("connection")).count(),
        2,
        "{text}"
    );
    let peer = ResetPeer::start_with(&["0", "close-once"]);
    let config = h2c_upstream_config(&[peer.addr], "", "", "", "");
    let gw = Gateway::start(&config, Driver::IoUring);
    let mut c = gw.connect();
    assert_eq!(get(&mut c, "/warm"), (200, "ok".to_owned()));
    let r = c.roundtrip("POST /close HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx");
    assert_eq!(r.status, 502, "{}", r.head);
}

#[test]
fn a_whole_body_an_http2_upstream_takes_slowly_is_not_its_silence() {
    // An HTTP/1.1 client's 512 KiB body, held whole, to an h2c upstream that takes it at
    // about 200 KB/s (2.5 s) and answers once it has it all: the head's wait counts from the
    // body's last piece going out, as a streamed body's does (before: from when h2 was
    // handed the body, so a 504 after 800 ms, the target charged, a third of it taken).
    let peer = ResetPeer::start_with(&["0", "slow-reader"]);
    let config = h2c_upstream_config(
        &[peer.addr],
        "",
        "[timeouts]\nupstream_response_head_ms = 800",
        "",
        "",
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    let body = vec![b'x'; 512 * 1024];
    let mut c = gw.connect();
    c.send(
        format!(
            "POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    c.send(&body);
    let r = c.read_response();
    assert_eq!((r.status, r.body_str()), (200, "524288"), "{}", r.head);
}

#[test]
fn a_request_of_max_header_count_fields_goes_to_an_http2_upstream() {
    // 256 fields, the most `max_header_count` allows, plus the gateway's own: the forwarded
    // head was parsed into room for 256 and refused with 400.
    let peer = ResetPeer::start_with(&["0", "headers"]);
    let config = h2c_upstream_config(&[peer.addr], "", "[limits]\nmax_header_count = 256", "", "");
    let gw = Gateway::start(&config, Driver::IoUring);
    let fields: String = (0..254).map(|i| format!("X-F-{i}: {i}\r\n")).collect();
    let r = gw.connect().roundtrip(&format!(
        "GET /x HTTP/1.1\r\nHost: a.test\r\n{fields}Connection: close\r\n\r\n"
    ));
    assert_eq!((r.status, r.body_str()), (200, "ok"), "{}", r.head);
    drop(gw);
    let line = peer.headers_line();
    assert!(
        line.contains(" x-f-0=0 ") && line.contains(" x-f-253=253"),
        "{line}"
    );
}

#[test]
fn an_http11_requests_trailer_field_does_not_go_to_an_http2_upstream() {
    // The body is read whole, its chunked trailer section left out: the `Trailer` field
    // that announces it does not go on either (before, it did, for fields that never came).
    let peer = ResetPeer::start_with(&["0", "headers"]);
    let config = h2c_upstream_config(&[peer.addr], "", "", "", "");
    let gw = Gateway::start(&config, Driver::IoUring);
    let r = gw.connect().roundtrip(
        "POST /x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\
         Connection: close\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 42\r\n\r\n",
    );
    assert_eq!((r.status, r.body_str()), (200, "ok"), "{}", r.head);
    drop(gw);
    let line = peer.headers_line();
    assert!(line.contains(" content-length=5"), "{line}");
    assert!(!line.contains(" trailer="), "{line}");
}

#[test]
fn a_target_with_bytes_a_uri_may_not_have_goes_to_an_http2_upstream_escaped() {
    // An HTTP/1.1 upstream gets `/a<b` as sent; `http::Uri` refuses it, and it was a 400
    // towards HTTP/2 upstreams alone. Now it goes percent-encoded (RFC 3986 2.1).
    let peer = ResetPeer::start_with(&["0", "headers"]);
    let config = h2c_upstream_config(&[peer.addr], "", "", "", "");
    let gw = Gateway::start(&config, Driver::IoUring);
    let r = gw.connect().roundtrip(
        "GET /a<b>`c?q=\"x\"&r=%41 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((r.status, r.body_str()), (200, "ok"), "{}", r.head);
    drop(gw);
    let line = peer.headers_line();
    assert!(
        line.contains(" :path=/a%3Cb%3E%60c?q=%22x%22&r=%41 "),
        "{line}"
    );
}

#[test]
fn a_route_edits_the_fields_of_an_http2_upstreams_requests_and_answers() {
    // `request_headers` and `response_headers` towards an h2c upstream: the forwarded
    // request's fields (its `:authority` from the set Host) and the answer's, as for an
    // HTTP/1.1 upstream.
    let peer = ResetPeer::start_with(&["0", "headers"]);
    let config = h2c_upstream_config(
        &[peer.addr],
        "",
        "",
        "",
        "request_headers = { set = { Host = \"internal.svc\", X-Env = \"prod\" }, \
         remove = [\"cookie\"] }\n\
         response_headers = { set = { Cache-Control = \"no-store\" }, \
         remove = [\"Server\", \"X-Powered-By\"] }\n",
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    let r = gw.connect().roundtrip(
        "GET /x HTTP/1.1\r\nHost: a.test\r\nX-Env: dev\r\nCookie: s=1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((r.status, r.body_str()), (200, "ok"), "{}", r.head);
    assert_eq!(r.header("cache-control"), Some("no-store"), "{}", r.head);
    assert!(
        !r.head.to_ascii_lowercase().contains("private"),
        "{}",
        r.head
    );
    assert_eq!(r.header("server"), None, "{}", r.head);
    // Its `_` spelling too, as from an HTTP/1.1 upstream (before: the exact name only).
    assert_eq!(r.header("x_powered_by"), None, "{}", r.head);
    drop(gw);
    let line = peer.headers_line();
    let fields: Vec<&str> = line.split(' ').skip(1).collect();
    assert!(fields.contains(&":authority=internal.svc"), "{line}");
    assert!(fields.contains(&"x-env=prod"), "{line}");
    assert!(!fields.iter().any(|f| f.starts_with("x-env=dev")), "{line}");
    assert!(!fields.iter().any(|f| f.starts_with("cookie=")), "{line}");
    assert!(fields.contains(&"x-forwarded-host=a.test"), "{line}");
}

#[test]
fn overall_timeout_ms_bounds_the_tries_to_an_http2_upstream() {
    // Three silent h2c targets, five tries of 400 ms each (the response head timeout): cut
    // at 1 s by `overall_timeout_ms`, after three tries (at 0, 400 and 800 ms), with 504.
    let silent: Vec<ResetPeer> = (0..3)
        .map(|_| ResetPeer::start_with(&["0", "silent"]))
        .collect();
    let targets: Vec<String> = silent
        .iter()
        .map(|p| format!("{{ address = \"{}\" }}", p.addr))
        .collect();
    let config = format!(
        "workers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n\
         [timeouts]\nupstream_response_head_ms = 400\n\n\
         [[upstreams]]\nid = \"h2\"\nprotocol = \"h2c\"\ntargets = [{}]\n\
         retry = {{ attempts = 5, on = [\"timeout\"], budget_percent = 100, \
         budget_min_per_s = 1000, overall_timeout_ms = 1000 }}\n\n\
         [[routes]]\nid = \"all\"\npath_prefix = \"/\"\nupstream = \"h2\"\n",
        targets.join(", ")
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    let started = Instant::now();
    let r = gw
        .connect()
        .roundtrip("GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.head);
    drop(gw);
    let tries: usize = silent.into_iter().map(ResetPeer::requests).sum();
    assert_eq!(tries, 3, "tries within 1 s (took {took:?})");
}

/// One listener and a catch-all route to a `grpc` upstream at `target`.
fn grpc_upstream_config(target: SocketAddr) -> String {
    format!(
        "workers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n\
         [[upstreams]]\nid = \"grpc\"\nprotocol = \"grpc\"\n\
         targets = [{{ address = \"{target}\" }}]\n\n\
         [[routes]]\nid = \"all\"\npath_prefix = \"/\"\nupstream = \"grpc\"\n"
    )
}

#[test]
fn a_grpc_answer_with_a_length_keeps_its_status_for_an_http11_client() {
    // The upstream gives its answer's length, then `grpc-status: 9` in its trailers: an
    // HTTP/1.1 client gets the answer chunked, with the trailers (before: by the length,
    // the status left out, so the failed call read as a success).
    let mut peer = ResetPeer::start_with(&["0", "failed-length"]);
    let gw = Gateway::start(&grpc_upstream_config(peer.addr), Driver::IoUring);
    let mut c = gw.connect();
    let call = frame(b"hi");
    c.send(
        format!(
            "POST /svc.S/M HTTP/1.1\r\nHost: t\r\nContent-Type: application/grpc\r\n\
             TE: trailers\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            call.len()
        )
        .as_bytes(),
    );
    c.send(&call);
    let mut got = Vec::new();
    let _ = c.stream.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200 "), "{text:?}");
    assert!(
        text.contains("\r\ntransfer-encoding: chunked\r\n"),
        "{text:?}"
    );
    assert!(!text.contains("content-length"), "{text:?}");
    assert!(
        text.ends_with("\r\n5\r\n\0\0\0\0\0\r\n0\r\ngrpc-status: 9\r\ngrpc-message: nope\r\n\r\n"),
        "{text:?}"
    );
    // A HEAD's answer has no body to chunk: its length is the one a GET would get.
    let mut c = gw.connect();
    c.send(
        b"HEAD /svc.S/M HTTP/1.1\r\nHost: t\r\nContent-Type: application/grpc\r\n\
          Connection: close\r\n\r\n",
    );
    let r = c.read_response_to("HEAD");
    assert_eq!(r.header("content-length"), Some("5"), "{}", r.head);
    drop(gw);
    peer.stop();
}

/// A gRPC-Web call (binary, one message "hi") to `gw` over HTTP/1.1; the client, to read
/// the answer.
fn web_call(gw: &Gateway) -> Client {
    let call = frame(b"hi");
    let mut c = gw.connect();
    c.send(
        format!(
            "POST /svc.S/M HTTP/1.1\r\nHost: t\r\nContent-Type: application/grpc-web+proto\r\n\
             Content-Length: {}\r\n\r\n",
            call.len()
        )
        .as_bytes(),
    );
    c.send(&call);
    c
}

#[test]
fn a_grpc_web_answer_that_ends_inside_a_message_is_cut_not_given_its_trailers() {
    // One message, then the first bytes of another, then `grpc-status: 0`: a trailer frame
    // after them would be read as the rest of that message, and its status never seen.
    let mut peer = ResetPeer::start_with(&["0", "torn"]);
    let other = peer.addr.to_string();
    let config = grpc_upstream_config(peer.addr);
    let gw = Gateway::start(&config, Driver::IoUring);
    let mut c = web_call(&gw);
    let mut got = Vec::new();
    let _ = c.stream.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.contains("grpc-status:0"),
        "no trailer frame: {text:?}"
    );
    assert!(!text.ends_with("0\r\n\r\n"), "cut, not ended: {text:?}");
    drop(gw);
    peer.stop();

    // Another status with a page that is not gRPC: its body is no messages, so nothing is
    // cut; none of the page goes out (before: its bytes, read by the client as frames),
    // and the answer's one frame, its trailer frame, says UNAVAILABLE, as a 503 maps. So
    // does the same page cut by a reset: none of it went out, so the answer still ends with
    // its trailer frame (the first version of the fix read the page as messages, and cut
    // the answer without one).
    for mode in ["html-503", "html-reset"] {
        let mut peer = ResetPeer::start_with(&["0", mode]);
        let gw = Gateway::start(
            &config.replace(&other, &peer.addr.to_string()),
            Driver::IoUring,
        );
        let mut c = web_call(&gw);
        let r = c.read_response();
        assert_eq!(r.status, 503, "{mode}: {}", r.head);
        let got = frames(&r.body);
        assert_eq!(
            got.len(),
            1,
            "{mode}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        let trailer = String::from_utf8_lossy(&got[0].1).to_string();
        assert_eq!(got[0].0, 0x80, "{mode}: {trailer}");
        assert!(trailer.contains("grpc-status:14\r\n"), "{mode}: {trailer}");
        assert!(trailer.contains("HTTP 503, not gRPC"), "{mode}: {trailer}");
        drop(gw);
        peer.stop();
    }
}

#[test]
fn grpc_web_answers_always_carry_a_status_and_keep_their_message_format() {
    // A gRPC-Web client reads a trailer frame without `grpc-status` as a success: an
    // upstream answer that is not gRPC, or ends without a status, gets UNKNOWN from the
    // gateway. And `application/grpc-web+json` goes upstream as `application/grpc+json`.
    for (mode, message) in [
        ("html", "the upstream's answer is not gRPC"),
        ("no-status", "the upstream's answer has no grpc-status"),
    ] {
        let mut peer = ResetPeer::start_with(&["0", mode]);
        let config = grpc_upstream_config(peer.addr);
        let gw = Gateway::start(&config, Driver::IoUring);
        let format = if mode == "html" { "+json" } else { "" };
        let mut c = gw.connect();
        let call = frame(b"{}");
        c.send(
            format!(
                "POST /svc.S/M HTTP/1.1\r\nHost: t\r\nContent-Type: application/grpc-web{format}\r\n\
                 Content-Length: {}\r\n\r\n",
                call.len()
            )
            .as_bytes(),
        );
        c.send(&call);
        let r = c.read_response();
        assert_eq!(r.status, 200, "{mode}: {}", r.head);
        let got = frames(&r.body);
        let trailer = got
            .iter()
            .find(|(flag, _)| *flag == 0x80)
            .expect("a trailer frame");
        let text = String::from_utf8_lossy(&trailer.1).to_string();
        assert!(text.contains("grpc-status:2\r\n"), "{mode}: {text}");
        assert!(
            text.contains(&message.replace(' ', "%20")) || text.contains(message),
            "{mode}: {text}"
        );
        if mode == "html" {
            // Nothing of the page reaches the client as a message.
            assert_eq!(got.len(), 1, "{got:?}");
        } else {
            assert_eq!(got[0], (0, b"hi".to_vec()));
        }
        drop(gw);
        peer.stop();
        let mut out = String::new();
        let _ = peer.out.read_to_string(&mut out);
        let expected = if mode == "html" {
            "application/grpc+json"
        } else {
            "application/grpc"
        };
        assert!(
            out.lines().any(|l| l.ends_with(&format!(" {expected}"))),
            "{mode}: {out}"
        );
    }
}

#[test]
fn a_204_from_an_http2_upstream_goes_out_without_content_length() {
    // The upstream's 204 carries `content-length: 0`, which RFC 9110 8.6 forbids: the
    // gateway's answer, over HTTP/1.1 and HTTP/2, has none.
    let peer = ResetPeer::start_with(&["0", "no-content"]);
    let config = h2c_upstream_config(&[peer.addr], "h2c = true", "", "", "");
    let gw = Gateway::start(&config, Driver::IoUring);
    for (version, status) in [
        ("--http1.1", "HTTP/1.1 204"),
        ("--http2-prior-knowledge", "HTTP/2 204"),
    ] {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                version,
                "-D",
                "-",
                "-o",
                "/dev/null",
            ])
            .arg(format!("http://{}/nothing", gw.listeners[0]))
            .output()
            .expect("curl");
        let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        assert!(head.starts_with(&status.to_ascii_lowercase()), "{head}");
        assert!(!head.contains("content-length"), "{version}: {head}");
    }
    drop(gw);
    assert_eq!(peer.requests(), 2);
}

/// The gRPC-Web frames of a body: (flag, payload) pairs.
fn frames(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        out.push((body[0], body[5..5 + len].to_vec()));
        body = &body[5 + len..];
    }
    assert!(body.is_empty(), "trailing bytes: {body:?}");
    out
}

/// One gRPC message frame.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0];
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn b64(data: &[u8]) -> String {
    let out = Command::new("base64")
        .arg("-w0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(data)?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn unb64(text: &[u8]) -> Vec<u8> {
    let out = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(text)?;
            c.wait_with_output()
        })
        .unwrap();
    out.stdout
}

#[test]
fn an_http1_client_that_leaves_has_its_upstream_call_cancelled() {
    let svc = GrpcService::start("");
    let dir = temp_dir("grpc-leave");
    let cert = Cert::new(&dir, "grpc.test");
    let upstream = grpc_upstream(&svc);
    let gw = Gateway::start(&config(&upstream, &cert, ""), Driver::IoUring);
    // A gRPC-Web call over HTTP/1.1 that the upstream answers after 5 s; its client leaves.
    let body = frame(b"5000");
    let mut req = format!(
        "POST /test.Echo/Sleep HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc-web+proto\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let mut c = gw.connect();
    c.send(&req);
    std::thread::sleep(Duration::from_millis(300));
    drop(c);
    // The gateway looks at the client every second: the upstream's call is cancelled then,
    // not left to run its 5 s.
    let deadline = Instant::now() + Duration::from_secs(8);
    let ran = loop {
        let a = calls(gw.listeners[0], None, &["last_cancel"]);
        let ran = a[0]["reply"].as_i64().unwrap();
        if ran >= 0 {
            break ran;
        }
        assert!(
            Instant::now() < deadline,
            "the upstream's call was never cancelled"
        );
    };
    assert!(
        (300..2500).contains(&ran),
        "the upstream saw the cancel after {ran} ms"
    );
    let metrics = gw.admin("GET", "/metrics", None).body_str().to_owned();
    let closed = metrics
        .lines()
        .find(|l| l.contains("kind=\"client_closed\""))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(closed.ends_with(" 1"), "{closed}");
}

#[test]
fn grpc_web_binary_and_text_over_http1_and_http2_with_cors() {
    let svc = GrpcService::start("");
    let dir = temp_dir("grpc-web");
    let cert = Cert::new(&dir, "grpc.test");
    let upstream = grpc_upstream(&svc);
    let extra = r#"policies = ["web"]

[[policies]]
id = "web"
kind = "cors"
origins = ["https://app.example"]
headers = ["content-type", "x-grpc-web", "x-user-agent", "grpc-timeout"]
expose_headers = ["grpc-status", "grpc-message"]
"#;
    let gw = Gateway::start(&config(&upstream, &cert, extra), Driver::IoUring);
    let h2c = gw.listeners[0];

    // Binary over HTTP/1.1, by hand: chunked answer, the message frame, the trailer frame.
    let body = frame(b"hi");
    let mut c = gw.connect();
    let mut req = format!(
        "POST /test.Echo/Unary HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc-web+proto\r\n\
         X-Grpc-Web: 1\r\nOrigin: https://app.example\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    c.send(&req);
    let resp = c.read_response();
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type"),
        Some("application/grpc-web+proto")
    );
    assert_eq!(
        resp.header("access-control-expose-headers"),
        Some("grpc-status, grpc-message")
    );
    let f = frames(&resp.body);
    assert_eq!(f[0], (0, b"echo:hi".to_vec()));
    assert_eq!(f[1].0, 0x80);
    let trailers = String::from_utf8(f[1].1.clone()).unwrap();
    assert!(trailers.contains("grpc-status:0\r\n"), "{trailers:?}");
    // The connection stays usable.
    c.send(&req);
    assert_eq!(c.read_response().status, 200);

    // Text over HTTP/1.1: a streamed answer in base64, decoded back to the same frames.
    let mut c = gw.connect();
    let text = b64(&frame(b"3"));
    c.send(
        format!(
            "POST /test.Echo/ServerStream HTTP/1.1\r\nHost: x\r\n\
             Content-Type: application/grpc-web-text\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        )
        .as_bytes(),
    );
    let resp = c.read_response();
    assert_eq!(
        resp.header("content-type"),
        Some("application/grpc-web-text")
    );
    let f = frames(&unb64(&resp.body));
    let messages: Vec<&[u8]> = f.iter().map(|(_, p)| p.as_slice()).collect();
    assert_eq!(messages[..3], [&b"item-0"[..], b"item-1", b"item-2"]);
    assert_eq!(f[3].0, 0x80);

    // Binary over HTTP/2 (curl, prior knowledge), and an upstream failure as gRPC status.
    let path = dir.join("msg.bin");
    std::fs::write(&path, frame(b"4")).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "-H"])
        .arg("content-type: application/grpc-web")
        .arg("--data-binary")
        .arg(format!("@{}", path.display()))
        .arg(format!("http://{h2c}/test.Echo/Fail"))
        .args(["-D", "-"])
        .output()
        .expect("curl is needed for the gRPC-Web test");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/2 200"), "{text}");
    // A failure before any message: trailers-only, the status in the head.
    assert!(text.contains("grpc-status: 4"), "{text}");
    assert!(text.contains("grpc-message: asked to fail"), "{text}");

    // The CORS preflight a browser sends first.
    let mut c = gw.connect();
    let resp = c.roundtrip(
        "OPTIONS /test.Echo/Unary HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n\
         Access-Control-Request-Method: POST\r\n\
         Access-Control-Request-Headers: content-type,x-grpc-web\r\n\r\n",
    );
    assert_eq!(resp.status, 204);
    assert_eq!(
        resp.header("access-control-allow-origin"),
        Some("https://app.example")
    );

    // A malformed text body is refused as a gRPC answer (INTERNAL, from 400).
    let mut c = gw.connect();
    let resp = c.roundtrip(
        "POST /test.Echo/Unary HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc-web-text\r\n\
         Content-Length: 5\r\n\r\n!!!!!",
    );
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("grpc-status"), Some("13"));
}

#[test]
fn h2c_upstreams_serve_http1_and_http2_clients() {
    // The upstream is a second gateway with an h2c listener, in front of an echo origin.
    let origin = Origin::start(std::sync::Arc::new(|req: &Received, s: &mut TcpStream| {
        let line = req.request_line().to_owned();
        let body = String::from_utf8_lossy(&req.raw_body).into_owned();
        let text = format!(
            "{line} xff={} te={} body={body}",
            req.header("x-forwarded-for").unwrap_or("-"),
            req.header("transfer-encoding").unwrap_or("-"),
        );
        let _ = write!(
            s,
            "HTTP/1.1 201 Created\r\nContent-Length: {}\r\nX-Origin: yes\r\n\r\n{text}",
            text.len()
        );
        Keep::Open
    }));
    let inner = Gateway::start(
        &format!(
            "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\nh2c = true\n\
             [[upstreams]]\nid = \"o\"\ntargets = [{{ address = \"{}\" }}]\n\
             [[routes]]\nid = \"all\"\npath_prefix = \"/\"\nupstream = \"o\"\n",
            origin.addr
        ),
        Driver::IoUring,
    );
    let outer = Gateway::start(
        &format!(
            "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\nh2c = true\n\
             [[upstreams]]\nid = \"inner\"\nprotocol = \"h2c\"\n\
             targets = [{{ address = \"{}\" }}]\n\
             health_check = {{ path = \"/ping\", interval_ms = 200, timeout_ms = 150, \
             expect_status = [201] }}\n\
             [[routes]]\nid = \"api\"\npath_prefix = \"/api/\"\nstrip_prefix = true\n\
             upstream = \"inner\"\n",
            inner.addr
        ),
        Driver::IoUring,
    );
    // HTTP/1.1 client: a body with a length and a chunked one, keep-alive between them.
    let mut c = outer.connect();
    let resp =
        c.roundtrip("POST /api/items?x=1 HTTP/1.1\r\nHost: shop\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(resp.status, 201, "{}", resp.body_str());
    assert_eq!(resp.header("x-origin"), Some("yes"));
    let body = resp.body_str();
    assert!(body.starts_with("POST /items?x=1 HTTP/1.1"), "{body}");
    assert!(body.ends_with("body=hello"), "{body}");
    assert!(body.contains("xff=127.0.0.1"), "{body}");
    let resp = c.roundtrip(
        "PUT /api/c HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: chunked\r\n\r\n\
         3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    );
    assert_eq!(resp.status, 201);
    // Read whole, the body goes on with its length.
    let body = resp.body_str();
    assert!(body.ends_with("te=- body=abcde"), "{body}");

    // HTTP/2 client.
    let out = Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "-d", "from-h2"])
        .arg(format!("http://{}/api/h2", outer.addr))
        .args(["-w", "\n%{http_version} %{http_code}"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("POST /h2 HTTP/1.1"), "{text}");
    assert!(text.contains("body=from-h2"), "{text}");
    assert!(text.ends_with("\n2 201"), "{text}");
    // One that waits for `100 Continue` gets it, and sends its body after it.
    let out = Command::new("curl")
        .args([
            "-sS",
            "-v",
            "--http2-prior-knowledge",
            "--expect100-timeout",
            "20",
        ])
        .args(["-H", "Expect: 100-continue", "-d", "after-100"])
        .arg(format!("http://{}/api/h2", outer.addr))
        .args(["-w", "\n%{http_version} %{http_code}"])
        .output()
        .unwrap();
    let (text, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(text.contains("body=after-100"), "{text}");
    assert!(text.ends_with("\n2 201"), "{text}");
    assert!(err.contains("< HTTP/2 100"), "{err}");

    // Health checks over HTTP/2 (GET /ping, answered 201 by the origin behind).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = outer
            .admin("GET", "/v1/upstreams/inner/health", None)
            .json();
        let check = &h["targets"][0]["last_check"];
        if check["ok"] == true {
            assert_eq!(check["status"], 201, "{h}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no passing HTTP/2 health check: {h}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(origin
        .requests()
        .iter()
        .any(|r| r.request_line().starts_with("GET /ping HTTP/1.1")));

    // The inner gateway going away: 502 to the next request, as for HTTP/1.1 upstreams.
    drop(inner);
    let mut c = outer.connect();
    let resp = c.roundtrip("GET /api/gone HTTP/1.1\r\nHost: shop\r\n\r\n");
    assert_eq!(resp.status, 502);
}

#[test]
fn h2load_against_a_grpc_unary_method_has_no_errors() {
    let svc = GrpcService::start("");
    let dir = temp_dir("grpc-h2load");
    let cert = Cert::new(&dir, "grpc.test");
    let upstream = grpc_upstream(&svc);
    let gw = Gateway::start(&config(&upstream, &cert, ""), Driver::IoUring);
    let msg = dir.join("msg.bin");
    std::fs::write(&msg, frame(b"load")).unwrap();
    let out = Command::new("h2load")
        .args(["-n", "3000", "-c", "8", "-m", "10", "-d"])
        .arg(&msg)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg(format!("http://{}/test.Echo/Unary", gw.listeners[0]))
        .output()
        .expect("h2load (Debian nghttp2-client) is needed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("3000 succeeded, 0 failed, 0 errored, 0 timeout"),
        "{text}"
    );
    assert!(text.contains("status codes: 3000 2xx"), "{text}");
    // And every call succeeded as gRPC too: none logged as an error.
    let metrics = gw.admin("GET", "/metrics", None).body_str().to_owned();
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("gateway_errors_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

const PROTOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/proto");

/// Runs protoc (PyPI grpcio-tools) on the test service's proto: its descriptor set (with
/// imports) and its Python modules, in `dir`.
fn protoc(dir: &std::path::Path) -> std::path::PathBuf {
    let set = dir.join("shop.pb");
    let protos = [
        "shop/v1/shop.proto",
        "google/api/annotations.proto",
        "google/api/http.proto",
    ]
    .map(|p| Path::new(PROTOS).join(p));
    let files: Vec<&Path> = protos.iter().map(|p| p.as_path()).collect();
    run_protoc(&[Path::new(PROTOS)], &set, &files, Some(dir));
    set
}

/// protoc (PyPI grpcio-tools) on `files` under `includes`: their descriptor set (imports
/// included) into `set`, and Python modules into `python_out` if given.
fn run_protoc(includes: &[&Path], set: &Path, files: &[&Path], python_out: Option<&Path>) {
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "grpc_tools.protoc", "--include_imports"])
        .arg(format!("--descriptor_set_out={}", set.display()));
    for include in includes {
        cmd.arg("-I").arg(include);
    }
    if let Some(dir) = python_out {
        cmd.arg(format!("--python_out={}", dir.display()));
    }
    let out = cmd.args(files).output().expect("python3 runs protoc");
    assert!(
        out.status.success(),
        "protoc failed (it needs the PyPI package grpcio-tools): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A gateway with a transcoding route (h2c too, `client_send_ms` 1 s) to `deep.S/M`, whose
/// message holds itself (`message F { F not = 1; string v = 2; }`), as `GET /deep` (fields
/// from the query) and `POST /deep.S/M` (the body); its upstream is never reached by the
/// tests that use it.
fn deep_transcoder() -> Gateway {
    let dir = temp_dir("deep-proto");
    std::fs::write(
        dir.join("deep.proto"),
        "syntax = \"proto3\";\npackage deep;\nimport \"google/api/annotations.proto\";\n\
         message F { F not = 1; string v = 2; }\n\
         service S { rpc M(F) returns (F) { option (google.api.http) = { get: \"/deep\" \
         additional_bindings { post: \"/deep.S/M\" body: \"*\" } }; } }\n",
    )
    .unwrap();
    let set = dir.join("deep.pb");
    let includes = [dir.as_path(), Path::new(PROTOS)];
    run_protoc(&includes, &set, &[&dir.join("deep.proto")], None);
    let config = format!(
        "workers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\nh2c = true\n\n\
         [timeouts]\nclient_send_ms = 1000\n\n\
         [[upstreams]]\nid = \"g\"\nprotocol = \"grpc\"\n\
         targets = [{{ address = \"127.0.0.1:9\" }}]\n\n\
         [[transcoders]]\nid = \"deep\"\ndescriptor_set = \"{}\"\nservices = [\"deep.S\"]\n\n\
         [[routes]]\nid = \"deep\"\npath_prefix = \"/\"\nupstream = \"g\"\ntranscoder = \"deep\"\n",
        set.display()
    );
    Gateway::start(&config, Driver::IoUring)
}

/// Writes `dir/r.proto`, whose service `r.S` has one method `M` with the HTTP rule `rule`
/// (`get: "/x"`), and compiles it into `dir/r.pb`.
fn one_method_descriptor(dir: &Path, rule: &str) {
    std::fs::write(
        dir.join("r.proto"),
        format!(
            "syntax = \"proto3\";\npackage r;\nimport \"google/api/annotations.proto\";\n\
             message F {{ string v = 1; }}\n\
             service S {{ rpc M(F) returns (F) {{ option (google.api.http) = {{ {rule} }}; }} }}\n"
        ),
    )
    .unwrap();
    let includes = [dir, Path::new(PROTOS)];
    run_protoc(&includes, &dir.join("r.pb"), &[&dir.join("r.proto")], None);
}

/// A gateway transcoding every request with the descriptor set `set` (service `r.S`) to a
/// gRPC upstream on a closed port: a request a binding takes is a 503.
fn transcoding_to_a_closed_port(set: &Path) -> Gateway {
    transcoding_to(set, closed_port())
}

/// A gateway transcoding every request with the descriptor set `set` (service `r.S`) to the
/// gRPC upstream `target`.
fn transcoding_to(set: &Path, target: SocketAddr) -> Gateway {
    Gateway::start(&transcoding_config(set, target, "", ""), Driver::IoUring)
}

/// The config of [`transcoding_to`], with `listener` lines for its listener (`h2c = true`)
/// and `top` tables before the upstream (`[timeouts]`, `[access_log]`).
fn transcoding_config(set: &Path, target: SocketAddr, listener: &str, top: &str) -> String {
    format!(
        "workers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n{listener}\n\n{top}\n\n\
         [[upstreams]]\nid = \"g\"\nprotocol = \"grpc\"\n\
         targets = [{{ address = \"{}\" }}]\n\n\
         [[transcoders]]\nid = \"r\"\ndescriptor_set = \"{}\"\nservices = [\"r.S\"]\n\n\
         [[routes]]\nid = \"r\"\npath_prefix = \"/\"\nupstream = \"g\"\ntranscoder = \"r\"\n",
        target,
        set.display()
    )
}

fn request_status(gw: &Gateway, method: &str, path: &str) -> u16 {
    let body = if method == "GET" {
        ""
    } else {
        "Content-Length: 2\r\n\r\n{}"
    };
    let request = format!("{method} {path} HTTP/1.1\r\nHost: t\r\n{body}");
    let request = if body.is_empty() {
        format!("{request}\r\n")
    } else {
        request
    };
    gw.connect().roundtrip(&request).status
}

#[test]
fn a_json_clients_grpc_compression_fields_do_not_reach_the_call() {
    // The gateway makes the gRPC messages of a JSON call and reads its answer only
    // uncompressed: the client's `grpc-encoding` / `grpc-accept-encoding` are not the
    // call's (before: passed on, inviting a compressed answer the client then got a 502
    // for), and the call says `grpc-accept-encoding: identity`.
    let dir = temp_dir("json-encoding");
    one_method_descriptor(&dir, "post: \"/m\" body: \"*\"");
    let peer = ResetPeer::start_with(&["0", "headers"]);
    let gw = transcoding_to(&dir.join("r.pb"), peer.addr);
    let r = gw.connect().roundtrip(
        "POST /m HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         grpc-encoding: gzip\r\ngrpc-accept-encoding: gzip\r\nContent-Length: 2\r\n\r\n{}",
    );
    // The peer answers text, no gRPC: the JSON client's 502.
    assert_eq!(r.status, 502, "{}", r.body_str());
    let line = peer.headers_line();
    assert!(line.contains("grpc-accept-encoding=identity"), "{line}");
    assert!(!line.contains("gzip"), "{line}");
}

#[test]
fn a_json_call_the_upstream_never_answers_is_a_504() {
    // Before: 503 UNAVAILABLE without `grpc-timeout`, 504 with it, for the same silence.
    let dir = temp_dir("json-timeout");
    one_method_descriptor(&dir, "post: \"/m\" body: \"*\"");
    let peer = ResetPeer::start_with(&["0", "silent"]);
    let set = dir.join("r.pb");
    let top = "[timeouts]\nupstream_response_head_ms = 300";
    let gw = Gateway::start(
        &transcoding_config(&set, peer.addr, "", top),
        Driver::IoUring,
    );
    let quiet = ResetPeer::start_with(&["0", "head-silent"]);
    let log = dir.join("access.log");
    let top = format!(
        "[timeouts]\nupstream_body_ms = 300\n[access_log]\npath = \"{}\"",
        log.display()
    );
    let after_head = Gateway::start(
        &transcoding_config(&set, quiet.addr, "h2c = true", &top),
        Driver::IoUring,
    );
    // Silent before its head, or after it (the review found that one still a 503).
    for (gw, deadline) in [(&gw, ""), (&gw, "grpc-timeout: 10S\r\n"), (&after_head, "")] {
        let mut c = gw.connect();
        let r = c.roundtrip(&format!(
            "POST /m HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{deadline}\
             Content-Length: 2\r\n\r\n{{}}"
        ));
        assert_eq!(
            (r.status, r.json()["code"].as_u64()),
            (504, Some(4)),
            "{deadline}: {}",
            r.body_str()
        );
        // A whole answer: the connection ends with a FIN where it says it closes, else
        // goes on (the review found the one after the head reset, and logged as a 200).
        if r.header("connection") == Some("close") {
            let mut rest = Vec::new();
            if !c.buf.is_empty() || c.stream.read_to_end(&mut rest).is_err() {
                panic!("{deadline}: not ended cleanly after the answer");
            }
        } else {
            let again = c.roundtrip(
                "POST /m HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
                 Content-Length: 2\r\n\r\n{}",
            );
            assert_eq!(again.status, 504, "{deadline}: {}", again.head);
        }
    }
    let line = wait_log_lines(&log, 1).remove(0);
    assert_eq!(
        (line["status"].as_u64(), line["error"].as_str()),
        (Some(504), Some("response_timeout")),
        "{line}"
    );
    // An HTTP/2 client that resets its stream after the upstream's head, before any of the
    // JSON answer: logged 499 (before: the upstream's 200, nothing sent).
    const RESET: &str = r#"
import time
c.send_headers(1, [(":method", "POST"), (":path", "/m"), (":scheme", "http"),
                   (":authority", "t"), ("content-type", "application/json")])
c.send_data(1, b"{}", end_stream=True)
s.sendall(c.data_to_send())
time.sleep(0.1)
c.reset_stream(1, error_code=8)
s.sendall(c.data_to_send())
time.sleep(0.2)
"#;
    let out = crate::http2::h2_client(&after_head, RESET);
    assert!(out.status.success(), "{out:?}");
    // The 504s above (one, and one more on its kept connection), then this one.
    let lines = wait_log_lines(&log, 3);
    let reset = lines.last().unwrap();
    assert_eq!(
        (reset["status"].as_u64(), reset["error"].as_str()),
        (Some(499), Some("client_closed")),
        "{reset}"
    );
    // A native gRPC call over HTTP/2, its upstream silent after its head: the client got the
    // 200 head, then the status in trailers; logged 200, the status sent (the review found
    // the 499 rule above turning it into a 504).
    const NATIVE: &str = r#"
c.send_headers(1, [(":method", "POST"), (":path", "/r.S/M"), (":scheme", "http"),
                   (":authority", "t"), ("content-type", "application/grpc"), ("te", "trailers")])
c.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
s.sendall(c.data_to_send())
status, grpc, done = None, None, False
while not done:
    data = s.recv(65536)
    if not data:
        break
    for e in c.receive_data(data):
        if isinstance(e, h2.events.ResponseReceived):
            status = dict(e.headers)[b":status"].decode()
        if isinstance(e, h2.events.TrailersReceived):
            grpc = dict(e.headers).get(b"grpc-status", b"").decode()
        if isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)):
            done = True
    s.sendall(c.data_to_send())
print(status, grpc)
"#;
    let out = crate::http2::h2_client(&after_head, NATIVE);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "200 14",
        "{out:?}"
    );
    let lines = wait_log_lines(&log, 4);
    let native = lines.last().unwrap();
    assert_eq!(
        (native["status"].as_u64(), native["error"].as_str()),
        (Some(200), Some("response_timeout")),
        "{native}"
    );
}

#[test]
fn a_unary_ok_without_a_message_is_a_malformed_answer() {
    // 502, logged and counted as the target's malformed answer (before: no error kind).
    let dir = temp_dir("json-empty-ok");
    one_method_descriptor(&dir, "post: \"/m\" body: \"*\"");
    let peer = ResetPeer::start_with(&["0", "empty-ok"]);
    let log = dir.join("access.log");
    let top = format!("[access_log]\npath = \"{}\"", log.display());
    let gw = Gateway::start(
        &transcoding_config(&dir.join("r.pb"), peer.addr, "", &top),
        Driver::IoUring,
    );
    let r = gw.connect().roundtrip(
        "POST /m HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Content-Length: 2\r\n\r\n{}",
    );
    assert_eq!(r.status, 502, "{}", r.body_str());
    let line = wait_log_lines(&log, 1).remove(0);
    assert_eq!(line["error"], "upstream_malformed", "{line}");
    // A gRPC answer whose content type is written `Application/GRPC+proto`: media types
    // compare without case (RFC 9110 8.3.1), as gRPC-Web's check had it (before: a 502,
    // "the upstream answered HTTP 200, not gRPC").
    let caps = ResetPeer::start_with(&["0", "caps"]);
    let gw = Gateway::start(
        &transcoding_config(&dir.join("r.pb"), caps.addr, "", ""),
        Driver::IoUring,
    );
    let r = gw.connect().roundtrip(
        "POST /m HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Content-Length: 2\r\n\r\n{}",
    );
    assert_eq!((r.status, r.body_str()), (200, "{}"), "{}", r.head);
}

#[test]
fn a_broken_server_stream_ends_the_json_answer_at_once() {
    // A stream whose second message cannot be read (compressed), left open by the upstream
    // (a watch): before, the client waited until the upstream ended it, and the upstream's
    // stream was never cancelled.
    let dir = temp_dir("json-broken-stream");
    std::fs::write(
        dir.join("r.proto"),
        "syntax = \"proto3\";\npackage r;\nimport \"google/api/annotations.proto\";\n\
         message F { string v = 1; }\n\
         service S { rpc M(F) returns (stream F) {\n\
         option (google.api.http) = { get: \"/s\" }; } }\n",
    )
    .unwrap();
    let includes = [&*dir, Path::new(PROTOS)];
    run_protoc(&includes, &dir.join("r.pb"), &[&dir.join("r.proto")], None);
    let peer = ResetPeer::start_with(&["0", "bad-stream"]);
    let stream_set = dir.join("r.pb");
    let gw = transcoding_to(&stream_set, peer.addr);
    for accept in ["application/json", "application/x-ndjson"] {
        let started = Instant::now();
        let mut c = gw.connect();
        c.send(format!("GET /s HTTP/1.1\r\nHost: t\r\nAccept: {accept}\r\n\r\n").as_bytes());
        c.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        let _ = c.stream.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{accept}: {text}");
        // Cut short (no last chunk): the client does not take it for whole.
        assert!(!text.ends_with("0\r\n\r\n"), "{accept}: {text}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{accept}: {:?}",
            started.elapsed()
        );
    }
    // A unary call's broken answer is a whole 502, after which the connection goes on (the
    // review found it reset, and a request pipelined behind it lost).
    let dir = temp_dir("json-broken-unary");
    one_method_descriptor(&dir, "post: \"/m\" body: \"*\"");
    let unary = transcoding_to(&dir.join("r.pb"), peer.addr);
    let mut c = unary.connect();
    let call = "POST /m HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
                Content-Length: 2\r\n\r\n{}";
    c.send(format!("{call}{call}").as_bytes());
    for _ in 0..2 {
        let r = c.read_response();
        assert_eq!(r.status, 502, "{}", r.head);
    }
    drop(unary);
    // Each call's stream reset upstream (the second's reset may still be on its way).
    let mut peer = peer;
    let resets = std::iter::from_fn(|| line_within(&mut peer.out, Duration::from_secs(5)))
        .filter(|l| l.starts_with("reset "))
        .take(4)
        .count();
    assert_eq!(resets, 4);
    // A JSON array stream that stalls after a message is cut, and logged as the stall it is
    // (before: `upstream_closed`).
    let quiet = ResetPeer::start_with(&["0", "msg-silent"]);
    let log = dir.join("access.log");
    let top = format!(
        "[timeouts]\nupstream_body_ms = 300\n[access_log]\npath = \"{}\"",
        log.display()
    );
    let stalled = Gateway::start(
        &transcoding_config(&stream_set, quiet.addr, "", &top),
        Driver::IoUring,
    );
    let mut c = stalled.connect();
    c.send(b"GET /s HTTP/1.1\r\nHost: t\r\nAccept: application/json\r\n\r\n");
    let mut got = Vec::new();
    let _ = c.stream.read_to_end(&mut got);
    let line = wait_log_lines(&log, 1).remove(0);
    assert_eq!(line["error"], "response_timeout", "{line}");
    // An NDJSON stream ends whole with its error line: the connection goes on, and a request
    // pipelined behind it is answered (the review found it reset).
    let mut c = stalled.connect();
    let ndjson = "GET /s HTTP/1.1\r\nHost: t\r\nAccept: application/x-ndjson\r\n\r\n";
    c.send(format!("{ndjson}{ndjson}").as_bytes());
    for _ in 0..2 {
        let r = c.read_response();
        assert!(
            r.body_str().ends_with("\"details\":[]}}\n"),
            "{}",
            r.body_str()
        );
    }
}

#[test]
fn a_custom_binding_of_kind_star_takes_any_method() {
    // google/api/http.proto: `*` leaves the method unspecified (before: only a request whose
    // method was `*` matched, every other one was a 405 with `Allow: *`).
    let dir = temp_dir("star-proto");
    one_method_descriptor(&dir, "custom: { kind: \"*\" path: \"/any/{v}\" }");
    let gw = transcoding_to_a_closed_port(&dir.join("r.pb"));
    for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
        assert_eq!(request_status(&gw, method, "/any/a"), 503, "{method}");
    }
    assert_eq!(request_status(&gw, "GET", "/other"), 404);
    // The 503 keeps an HTTP/1.1 connection, its request read whole: the pipelined one
    // behind it is answered (before: closed after the JSON error).
    let mut c = gw.connect();
    c.send(
        b"POST /any/a HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}\
             GET /any/b HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    let first = c.read_response();
    assert_eq!(
        (first.status, first.header("connection")),
        (503, None),
        "{}",
        first.head
    );
    assert_eq!(c.read_response().status, 503);
}

#[test]
fn a_changed_descriptor_file_is_served_after_a_put_or_a_sighup() {
    // The descriptor file is rewritten with another binding. Before, a PUT of the
    // transcoder as it was, or SIGHUP, found "no change" (the config names only the path)
    // and kept the old bindings, until an unrelated change loaded the file. Now its SHA-256
    // is part of the config: a changed file is a change.
    let dir = temp_dir("reload-proto");
    let set = dir.join("r.pb");
    let write = |path: &str| one_method_descriptor(&dir, &format!("get: \"{path}\""));
    write("/one");
    let gw = transcoding_to_a_closed_port(&set);
    // A bound path goes to the (closed) upstream: 503; an unbound one is not found.
    let status = |path: &str| request_status(&gw, "GET", path);
    assert_eq!((status("/one"), status("/two")), (503, 404));
    let stored = gw.admin("GET", "/v1/transcoders/r", None).json();
    let first = stored["descriptor_sha256"].clone();
    assert_eq!(first.as_str().map(str::len), Some(64), "{stored}");
    write("/two");
    let put = gw.admin("PUT", "/v1/transcoders/r", Some(&stored.to_string()));
    assert_eq!(put.status, 200, "{}", put.body_str());
    assert_eq!((status("/one"), status("/two")), (404, 503));
    let now = gw.admin("GET", "/v1/transcoders/r", None).json();
    assert_ne!(now["descriptor_sha256"], first);
    // And through SIGHUP, the config file unchanged.
    write("/three");
    gw.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status("/three") != 503 {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not load the new descriptors"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status("/two"), 404);
}

#[test]
fn a_query_parameter_thousands_of_fields_deep_is_refused_not_a_crash() {
    // A message that holds itself makes `not.not.not...` a valid name at any depth: 1,600
    // levels (under the default 8 KiB URI) overflowed a worker's stack, which aborts the
    // whole process. Now refused past 32 fields; the gateway serves on.
    let gw = deep_transcoder();
    let post = |query: &str| {
        gw.connect().roundtrip(&format!(
            "GET /deep?{query} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        ))
    };
    let deep = format!("{}v=1", "not.".repeat(1600));
    let r = post(&deep);
    assert_eq!(r.status, 400, "{}", r.body_str());
    assert!(
        r.body_str().contains("more than 32 fields deep"),
        "{}",
        r.body_str()
    );
    // Still serving: an unknown field is refused as before.
    let r = post("nope=1");
    assert_eq!(r.status, 400, "{}", r.body_str());
    assert!(r.body_str().contains("no field"), "{}", r.body_str());
    // The binding whose body is the message takes no query parameter: one would replace
    // what the body says (before, `?v=q` replaced the body's `v`).
    let r = gw.connect().roundtrip(
        "POST /deep.S/M?v=q HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Content-Length: 9\r\nConnection: close\r\n\r\n{\"v\":\"b\"}",
    );
    assert_eq!(r.status, 400, "{}", r.body_str());
    assert!(
        r.body_str().contains("no query parameters"),
        "{}",
        r.body_str()
    );
}

#[test]
fn a_template_variable_over_32_fields_deep_is_refused() {
    // A descriptor whose `google.api.http` path has a variable thousands of fields deep over
    // a message that holds itself overflowed a worker's stack at the first request it
    // matched. Past 32 fields it is refused with the transcoder.
    let gw = deep_transcoder();
    let dir = temp_dir("deep-template");
    let variable = format!("{}v", "not.".repeat(32));
    std::fs::write(
        dir.join("deeper.proto"),
        format!(
            "syntax = \"proto3\";\npackage deeper;\nimport \"google/api/annotations.proto\";\n\
             message F {{ F not = 1; string v = 2; }}\n\
             service S {{ rpc M(F) returns (F) {{ \
             option (google.api.http) = {{ get: \"/v1/{{{variable}}}\" }}; }} }}\n"
        ),
    )
    .unwrap();
    let set = dir.join("deeper.pb");
    let includes = [dir.as_path(), Path::new(PROTOS)];
    run_protoc(&includes, &set, &[&dir.join("deeper.proto")], None);
    let body = serde_json::json!({
        "descriptor_set_base64": b64(&std::fs::read(&set).unwrap()),
        "services": ["deeper.S"],
    });
    let r = gw.admin("PUT", "/v1/transcoders/deeper", Some(&body.to_string()));
    assert_eq!(r.status, 422, "{}", r.body_str());
    assert!(
        r.body_str().contains("more than 32 fields deep"),
        "{}",
        r.body_str()
    );
}

#[test]
fn a_refusal_to_an_http2_client_with_a_shut_window_ends_after_client_send_ms() {
    // A transcoding route's refusal (a JSON problem) to an HTTP/2 client that keeps its
    // stream window at 0: its body waited for the window with no bound, holding the stream
    // (and, for upstream answers sent the same way, the upstream call and its circuit slot).
    const CLIENT: &str = r#"
import socket, sys, time
import h2.config, h2.connection, h2.events, h2.settings
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.settimeout(0.2)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
c.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "t"),
                   (":path", "/deep.S/M?nope=1"), ("content-type", "application/json")])
c.send_data(1, b"{}", end_stream=True)
s.sendall(c.data_to_send())
started, status, end = time.time(), None, "none"
while time.time() - started < 8 and end == "none":
    try:
        data = s.recv(65536)
    except socket.timeout:
        continue
    if not data:
        end = "closed"
        break
    for e in c.receive_data(data):
        if isinstance(e, h2.events.ResponseReceived):
            status = dict(e.headers)[b":status"].decode()
        elif isinstance(e, h2.events.StreamReset):
            end = "reset"
        elif isinstance(e, h2.events.ConnectionTerminated):
            end = "goaway"
    s.sendall(c.data_to_send())
print(status, end, round(time.time() - started, 1))
"#;
    let gw = deep_transcoder();
    let out = Command::new("python3")
        .args(["-c", CLIENT, &gw.listeners[0].port().to_string()])
        .output()
        .expect("python3 with the PyPI package h2");
    let text = String::from_utf8_lossy(&out.stdout);
    let parts: Vec<&str> = text.split_whitespace().collect();
    assert!(
        matches!(parts[..], ["400", "reset", _]),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after: f64 = parts[2].parse().unwrap();
    assert!((0.5..5.0).contains(&after), "reset after {after} s");
}

/// curl with a JSON body (or none); returns the status, the content type and the body.
fn curl_json(args: &[&str]) -> (u16, String, String) {
    let o = curl_run(
        20,
        "%{http_code} %{content_type}",
        args,
        "the transcoding test",
    );
    let (code, ct) = o.last.split_once(' ').unwrap_or((&o.last, ""));
    (code.parse().unwrap(), ct.to_owned(), o.body)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

#[test]
fn json_calls_are_transcoded_to_grpc_and_back() {
    let dir = temp_dir("transcode");
    let set = protoc(&dir);
    let mut svc = GrpcService::start_with(&["serve-shop", dir.to_str().unwrap()]);
    // Answers with the start of a message, then resets.
    let cut = ResetPeer::start_with(&["2", "partial"]);
    // Answer a unary call with two messages, or with one and the start of another.
    let two = ResetPeer::start_with(&["0", "two"]);
    let torn = ResetPeer::start_with(&["0", "torn"]);
    let config = format!(
        r#"workers = 1

[[listeners]]
address = "127.0.0.1:0"
h2c = true

[[upstreams]]
id = "orders-grpc"
protocol = "grpc"
targets = [{{ address = "{}" }}]

[[upstreams]]
id = "orders-cut"
protocol = "grpc"
targets = [{{ address = "{}" }}]

[[upstreams]]
id = "orders-two"
protocol = "grpc"
targets = [{{ address = "{}" }}]

[[upstreams]]
id = "orders-torn"
protocol = "grpc"
targets = [{{ address = "{}" }}]

[[routes]]
id = "orders-two"
hosts = ["two.test"]
path_prefix = "/v1/"
upstream = "orders-two"
transcoder = "orders"

[[routes]]
id = "orders-torn"
hosts = ["torn.test"]
path_prefix = "/v1/"
upstream = "orders-torn"
transcoder = "orders"

[[transcoders]]
id = "orders"
descriptor_set = "{}"
services = ["shop.v1.Orders"]

[[routes]]
id = "orders-cut"
hosts = ["cut.test"]
path_prefix = "/v1/"
upstream = "orders-cut"
transcoder = "orders"

[[routes]]
id = "orders-keyed"
hosts = ["keyed.test"]
path_prefix = "/v1/"
upstream = "orders-grpc"
transcoder = "orders"
policies = ["query-key"]

[[policies]]
id = "query-key"
kind = "api_key"
query = "apikey"

[[consumers]]
id = "app"

[[credentials]]
id = "app-key"
consumer = "app"
kind = "api_key"
key = "key-of-the-app"

[[routes]]
id = "orders-rest"
path_prefix = "/v1/"
upstream = "orders-grpc"
transcoder = "orders"

[[routes]]
id = "orders-echo"
path = "/shop.v1.Orders/Echo"
upstream = "orders-grpc"
transcoder = "orders"

[timeouts]
client_body_ms = 1000
client_send_ms = 1000
"#,
        svc.addr,
        cut.addr,
        two.addr,
        torn.addr,
        set.display()
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    let base = format!("http://{}", gw.addr);
    let url = |p: &str| format!("{base}{p}");

    // An upstream that fails in the middle of its answer's only message (RST_STREAM
    // INTERNAL_ERROR): nothing of it went out, so the JSON client gets the error (INTERNAL,
    // the reset code's), not an empty reply.
    let (code, ct, body) = curl_json(&["-H", "Host: cut.test", &url("/v1/orders/o-1")]);
    assert_eq!((code, ct.as_str()), (500, "application/json"), "{body}");
    assert_eq!(json(&body)["code"], 13, "{body}");
    // A unary answer of two messages, or of one and a torn second, is malformed: 502, not
    // one of the messages passed off as the answer.
    for host in ["Host: two.test", "Host: torn.test"] {
        let (code, _, body) = curl_json(&["-H", host, &url("/v1/orders/o-1")]);
        assert_eq!(code, 502, "{host}: {body}");
        assert_eq!(json(&body)["code"], 13, "{host}: {body}");
    }

    // An API key in the query is the gateway's, not a message field: taken out first.
    let (code, _, body) = curl_json(&[
        "-H",
        "Host: keyed.test",
        &url("/v1/orders/o-1?apikey=key-of-the-app"),
    ]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["id"], "o-1", "{body}");

    // GET with a path variable: nested messages, an enum, repeated fields, a map, int64
    // beyond 2^53 (as a string), Timestamp and Duration.
    let (code, ct, body) = curl_json(&[&url("/v1/orders/o-1")]);
    assert_eq!((code, ct.as_str()), (200, "application/json"), "{body}");
    assert_eq!(
        json(&body),
        serde_json::json!({"id": "o-1", "customer": "ann", "status": "SHIPPED",
            "items": [{"sku": "a-1", "quantity": 2, "priceCents": "1999"},
                      {"sku": "b-2", "quantity": 1, "priceCents": "9007199254740993"}],
            "createdAt": "2026-01-02T03:04:05.500Z", "shipWithin": "3600s",
            "labels": {"lane": "express"}, "discount": 0.25, "gift": true})
    );
    // Query parameters into fields: a string with an escape, an int, an enum, a repeated
    // field, a bool and a Timestamp.
    let (code, _, body) = curl_json(&[&url(
        "/v1/orders?customer=ann%20lee&pageSize=5&status=PENDING&tags=x&tags=y&gift_only=true\
         &since=2026-05-01T00:00:00Z",
    )]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        json(&body),
        serde_json::json!({"orders": [
            {"id": "x", "customer": "ann lee", "status": "PENDING", "gift": true,
             "createdAt": "2026-05-01T00:00:00Z"},
            {"id": "y", "customer": "ann lee", "status": "PENDING", "gift": true,
             "createdAt": "2026-05-01T00:00:00Z"}], "nextPageToken": "5"})
    );
    // POST with `body: "order"` and a query parameter for the rest.
    let (code, _, body) = curl_json(&[
        "-X",
        "POST",
        "-d",
        r#"{"customer":"bob","items":[{"sku":"z","quantity":3}],"shipWithin":"1.5s"}"#,
        &url("/v1/orders?requestId=r9"),
    ]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        json(&body),
        serde_json::json!({"id": "new-r9", "customer": "bob",
            "items": [{"sku": "z", "quantity": 3}], "shipWithin": "1.500s"})
    );
    // PATCH and PUT (additional binding) with a nested path variable that wins over the body.
    for method in ["PATCH", "PUT"] {
        let (code, _, body) = curl_json(&[
            "-X",
            method,
            "-d",
            r#"{"id":"ignored","status":"CANCELLED","notes":["a","b"]}"#,
            &url("/v1/orders/o-7"),
        ]);
        assert_eq!(code, 200, "{method}: {body}");
        assert_eq!(
            json(&body),
            serde_json::json!({"id": "o-7", "status": "CANCELLED", "notes": ["a", "b"]}),
            "{method}"
        );
    }
    // DELETE with an empty answer message; a custom verb with `body: "*"`; response_body.
    let (code, _, body) = curl_json(&["-X", "DELETE", &url("/v1/orders/o-7")]);
    assert_eq!((code, body.as_str()), (200, "{}"));
    let (code, _, body) = curl_json(&[
        "-X",
        "POST",
        "-d",
        r#"{"reason":"changed mind"}"#,
        &url("/v1/orders/o-8:cancel"),
    ]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        json(&body),
        serde_json::json!({"id": "o-8", "customer": "changed mind", "status": "CANCELLED"})
    );
    let (code, _, body) = curl_json(&[&url("/v1/orders/o-1/items")]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)[1]["sku"], "b-2");
    // A method without a mapping: POST to its gRPC path; over HTTP/2 too.
    let order = r#"{"id":"e","items":[{"sku":"q","priceCents":"12"}],"status":"PENDING","createdAt":"2026-03-04T05:06:07Z","shipWithin":"0.250s","labels":{"a":"b"}}"#;
    let (code, _, body) = curl_json(&[
        "--http2-prior-knowledge",
        "-d",
        order,
        &url("/shop.v1.Orders/Echo"),
    ]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body), json(order));
    // A native gRPC call on a transcoding route goes through as it is (before: read as JSON,
    // 400): the length-prefixed message `Order { id: "e" }` comes back the same.
    let framed = dir.join("echo.grpc");
    std::fs::write(&framed, b"\0\0\0\0\x03\x0a\x01e").unwrap();
    let (code, ct, body) = curl_json(&[
        "--http2-prior-knowledge",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--data-binary",
        &format!("@{}", framed.display()),
        &url("/shop.v1.Orders/Echo"),
    ]);
    assert_eq!((code, ct.as_str()), (200, "application/grpc"), "{body:?}");
    assert_eq!(body.as_bytes(), b"\0\0\0\0\x03\x0a\x01e");
    // A JSON body over HTTP/2 that comes in pieces 0.4 s apart, 1.6 s in all: client_body_ms
    // (1 s here) bounds the silence between pieces, not the whole body (before: 408).
    const SLOW: &str = r#"
import socket, sys, time
import h2.connection, h2.config, h2.events
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
c.send_headers(1, [(":method", "POST"), (":path", "/v1/orders?requestId=slow"),
                   (":scheme", "http"), (":authority", "t"),
                   ("content-type", "application/json")])
s.sendall(c.data_to_send())
for piece in [b'{"customer":', b'"bob",', b'"items":[]', b'}']:
    time.sleep(0.4)
    c.send_data(1, piece, end_stream=piece == b'}')
    s.sendall(c.data_to_send())
status, body, done = None, b"", False
while not done:
    data = s.recv(65536)
    if not data:
        break
    for e in c.receive_data(data):
        if isinstance(e, h2.events.ResponseReceived):
            status = dict(e.headers)[b":status"].decode()
        elif isinstance(e, h2.events.DataReceived):
            body += e.data
        elif isinstance(e, h2.events.StreamEnded):
            done = True
    s.sendall(c.data_to_send())
print(status, body.decode())
"#;
    let out = Command::new("python3")
        .args(["-c", SLOW, &gw.addr.port().to_string()])
        .output()
        .expect("python3 with the PyPI package h2");
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, body) = text.trim().split_once(' ').unwrap_or_default();
    assert_eq!(
        status,
        "200",
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(body)["id"], "new-slow", "{body}");
    // A client that keeps its window shut is given up after client_send_ms (1 s here), also
    // when the answer is a unary JSON one, written whole at the call's end (before: held).
    const SHUT: &str = r#"
import socket, sys, time
import h2.connection, h2.config, h2.events, h2.settings
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
c.send_headers(1, [(":method", "GET"), (":path", "/v1/orders/o-1"), (":scheme", "http"),
                   (":authority", "t")], end_stream=True)
s.sendall(c.data_to_send())
start, seen = time.time(), None
while seen is None and time.time() - start < 8:
    try:
        data = s.recv(65536)
    except socket.timeout:
        continue
    if not data:
        break
    for e in c.receive_data(data):
        if isinstance(e, h2.events.StreamReset):
            seen = time.time() - start
    s.sendall(c.data_to_send())
print("reset" if seen is not None else "held", seen)
"#;
    let out = Command::new("python3")
        .args(["-c", SHUT, &gw.addr.port().to_string()])
        .output()
        .expect("python3 with the PyPI package h2");
    let text = String::from_utf8_lossy(&out.stdout);
    let (what, after) = text.trim().split_once(' ').unwrap_or_default();
    assert_eq!(
        what,
        "reset",
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(after.parse::<f64>().unwrap() < 5.0, "{text}");

    // Server streaming: a JSON array, or newline-delimited JSON when asked for.
    let (code, _, body) = curl_json(&[&url("/v1/customers/ann/events?count=3")]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        json(&body),
        serde_json::json!([{"orderId": "ann-0", "status": "PENDING"},
            {"orderId": "ann-1", "status": "PENDING", "seq": 1},
            {"orderId": "ann-2", "status": "PENDING", "seq": 2}])
    );
    let (code, ct, body) = curl_json(&[
        "-H",
        "Accept: application/x-ndjson",
        &url("/v1/customers/ann/events?count=99"),
    ]);
    assert_eq!((code, ct.as_str()), (200, "application/x-ndjson"));
    let lines: Vec<serde_json::Value> = body.lines().map(json).collect();
    assert_eq!(lines.len(), 3, "{body}");
    assert_eq!(lines[1]["orderId"], "ann-1");
    // The stream failed after two events: the last line says how.
    assert_eq!(lines[2]["error"]["code"], 14, "{body}");
    assert_eq!(lines[2]["error"]["message"], "stream broke");
    // The weights decide (before, any range naming NDJSON did), and the answer says it was
    // chosen by `Accept`.
    let events = url("/v1/customers/ann/events?count=2");
    let prefers_json = "Accept: application/json, application/x-ndjson;q=0.1";
    let (code, ct, body) = curl_json(&["-H", prefers_json, &events]);
    assert_eq!((code, ct.as_str()), (200, "application/json"), "{body}");
    assert!(json(&body).is_array(), "{body}");
    let vary = curl_run(20, "%header{vary}", &["-H", prefers_json, &events], "curl");
    assert_eq!(vary.last, "accept");

    // gRPC errors become HTTP statuses with a JSON body (and the status details), with the
    // custom metadata of a trailers-only answer (before: dropped).
    let (code, _, body) = curl_json(&[&url("/v1/orders/missing")]);
    assert_eq!(code, 404);
    let note = curl_run(
        20,
        "%header{x-order-note}",
        &[&url("/v1/orders/missing")],
        "curl",
    );
    assert_eq!(note.last, "not-here");
    assert_eq!(
        json(&body),
        serde_json::json!({"code": 5, "message": "no order missing", "details": []})
    );
    let (code, _, body) = curl_json(&[&url("/v1/orders/locked")]);
    assert_eq!(code, 400, "FAILED_PRECONDITION");
    let b = json(&body);
    assert_eq!(b["code"], 9);
    assert_eq!(b["details"][0]["@type"], "type.googleapis.com/shop.v1.Lock");
    assert_eq!(b["details"][0]["value"], "CAE=");

    // Bad requests: 400 naming the field, never reaching the upstream.
    for (body, field) in [
        (r#"{"customer":"bob","colour":"red"}"#, "order.colour"),
        (
            r#"{"items":[{"quantity":"many"}]}"#,
            "order.items[0].quantity",
        ),
        (
            r#"{"items":[{"quantity":3000000000}]}"#,
            "order.items[0].quantity",
        ),
        (r#"{"status":"LOST"}"#, "order.status"),
        (r#"{"createdAt":"yesterday"}"#, "order.createdAt"),
    ] {
        let (code, _, answer) = curl_json(&["-d", body, &url("/v1/orders")]);
        assert_eq!(code, 400, "{body}: {answer}");
        let a = json(&answer);
        assert_eq!(
            (a["code"].as_u64(), a["field"].as_str()),
            (Some(3), Some(field)),
            "{answer}"
        );
    }
    let (code, _, answer) = curl_json(&["-d", "{\"customer\":", &url("/v1/orders")]);
    assert_eq!(code, 400, "{answer}");
    // A coded body is not read as JSON (before: taken as it was, gzip bytes or not).
    let mut c = Client::connect(gw.addr);
    let r = c.roundtrip(
        "POST /v1/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Encoding: gzip\r\nContent-Length: 16\r\n\r\n{\"customer\":\"x\"}",
    );
    assert_eq!(r.status, 415, "{}", r.body_str());
    assert_eq!(r.header("accept-encoding"), Some("identity"));
    assert_eq!(json(r.body_str())["code"], 3);
    // The gateway's own answers carry `Date` (RFC 9110 6.6.1), as its HTTP/1.1 ones do
    // (before: none on the transcoder's).
    assert!(
        r.header("date").is_some_and(|d| d.ends_with(" GMT")),
        "{r:?}"
    );
    let (code, _, answer) = curl_json(&[&url("/v1/orders?colour=red")]);
    assert_eq!(code, 400);
    assert_eq!(json(&answer)["field"], "colour");
    // No mapping for the method or the path.
    let (code, _, _) = curl_json(&["-X", "DELETE", &url("/v1/orders")]);
    assert_eq!(code, 405);
    // HEAD is answered as GET (before: 405), and a refused HEAD too, each with its head only
    // and the length a GET would get: the connection stays in step for the next request.
    let (_, _, got) = curl_json(&[&url("/v1/orders/o-1")]);
    let mut c = Client::connect(gw.addr);
    c.send(
        b"HEAD /v1/orders/o-1 HTTP/1.1\r\nHost: x\r\n\r\n\
          HEAD /shop.v1.Orders/Echo HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /v1/nothing/here HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let head = c.read_response_to("HEAD");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some(&*got.len().to_string()));
    let head = c.read_response_to("HEAD");
    assert_eq!(head.status, 405);
    // RFC 9110 15.5.6: the methods the path takes.
    assert_eq!(head.header("allow"), Some("POST"));
    assert!(head.body.is_empty());
    let length: usize = head.header("content-length").unwrap().parse().unwrap();
    assert!(length > 0);
    let next = c.read_response();
    assert_eq!(next.status, 404, "{}", next.body_str());
    assert_eq!(json(next.body_str())["code"], 5);
    assert!(next.header("date").is_some(), "{next:?}");
    // A HEAD to a watch that goes on (one event, then nothing for 20 s): its answer is its
    // head, and the next request on the connection is answered at once (before: after the
    // watch ended, the upstream stream held all that time).
    let started = std::time::Instant::now();
    c.send(
        b"HEAD /v1/customers/ann/events?count=98 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /v1/orders/o-1 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let head = c.read_response_to("HEAD");
    assert_eq!(head.status, 200, "{}", head.head);
    assert_eq!(c.read_response().status, 200);
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    // The same over HTTP/2, a unary and a server-streaming method: the head only, the
    // stream ended with it. (Before, DATA followed the HEAD's answer: clients failed the
    // stream with PROTOCOL_ERROR.)
    for path in ["/v1/orders/o-1", "/v1/customers/ann/events"] {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--http2-prior-knowledge", "-I", "--max-time", "10"])
            .arg(url(path))
            .output()
            .expect("curl (Debian package curl) runs");
        let head = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{path}: {head}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(head.starts_with("HTTP/2 200"), "{path}: {head}");
    }
    let (code, _, answer) = curl_json(&[&url("/v1/nothing/here")]);
    assert_eq!(code, 404);
    assert_eq!(json(&answer)["code"], 5);

    // The transcoders resource: refused descriptor sets name the field.
    let bad = gw.admin(
        "PUT",
        "/v1/transcoders/t2",
        Some(r#"{"descriptor_set_base64":"AAAA","services":["shop.v1.Orders"]}"#),
    );
    assert_eq!(bad.status, 422, "{}", bad.body_str());
    assert!(
        bad.body_str()
            .contains("\"pointer\":\"/descriptor_set_base64\""),
        "{}",
        bad.body_str()
    );
    let b64 = {
        let out = Command::new("base64")
            .arg("-w0")
            .arg(&set)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let lacking = gw.admin(
        "PUT",
        "/v1/transcoders/t2",
        Some(&format!(
            r#"{{"descriptor_set_base64":"{b64}","services":["shop.v1.Nope"]}}"#
        )),
    );
    assert_eq!(lacking.status, 422, "{}", lacking.body_str());
    assert!(
        lacking.body_str().contains("\"pointer\":\"/services/0\""),
        "{}",
        lacking.body_str()
    );
    let ok = gw.admin(
        "PUT",
        "/v1/transcoders/t2",
        Some(&format!(
            r#"{{"descriptor_set_base64":"{b64}","services":["shop.v1.Orders"]}}"#
        )),
    );
    assert_eq!(ok.status, 201, "{}", ok.body_str());
    let used = gw.admin("DELETE", "/v1/transcoders/orders", None);
    assert_eq!(used.status, 409, "{}", used.body_str());
    assert!(
        used.body_str().contains("routes/orders-rest"),
        "{}",
        used.body_str()
    );
    assert_eq!(gw.admin("DELETE", "/v1/transcoders/t2", None).status, 204);

    // The upstream gone: 503 with gRPC's UNAVAILABLE.
    svc.kill();
    let (code, _, answer) = curl_json(&[&url("/v1/orders/o-1")]);
    assert_eq!(code, 503, "{answer}");
    assert_eq!(json(&answer)["code"], 14);
}

#[test]
fn an_http2_answer_h2_refuses_as_malformed_is_logged_as_the_upstreams_malformed_answer() {
    // A head with `connection: close`, which HTTP/2 forbids: h2 resets the stream itself.
    // Before, logged `upstream_closed`, as if the upstream had reset it.
    let peer = ResetPeer::start_with(&["0", "malformed"]);
    let log = temp_dir("h2-malformed").join("access.log");
    let section = format!("[access_log]\npath = \"{}\"\n", log.display());
    let config = h2c_upstream_config(&[peer.addr], "", "", "", &section);
    let gw = Gateway::start(&config, Driver::IoUring);
    let r = gw
        .connect()
        .roundtrip("GET /m HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 502, "{}", r.head);
    let lines = wait_log_lines(&log, 1);
    assert_eq!(lines[0]["status"], 502, "{}", lines[0]);
    assert_eq!(lines[0]["error"], "upstream_malformed", "{}", lines[0]);
}

#[test]
fn a_transcoded_call_answered_without_grpc_is_a_502_unless_the_status_is_an_error() {
    // Before, a 204 went to the client as a 204 with a JSON error body (and, over HTTP/2, a
    // DATA frame after it), a 200-class or 3xx status as a success carrying an error.
    let dir = temp_dir("transcode-not-grpc");
    let set = protoc(&dir);
    let no_content = ResetPeer::start_with(&["0", "no-content"]);
    let busy = ResetPeer::start_with(&["0", "html-503"]);
    let mut config = format!(
        "workers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\nh2c = true\n\n\
         [[transcoders]]\nid = \"orders\"\ndescriptor_set = \"{}\"\n\
         services = [\"shop.v1.Orders\"]\n",
        set.display()
    );
    for (id, peer) in [("a", &no_content), ("b", &busy)] {
        config.push_str(&format!(
            "\n[[upstreams]]\nid = \"{id}\"\nprotocol = \"grpc\"\n\
             targets = [{{ address = \"{}\" }}]\n\n\
             [[routes]]\nid = \"{id}\"\nhosts = [\"{id}.test\"]\npath_prefix = \"/v1/\"\n\
             upstream = \"{id}\"\ntranscoder = \"orders\"\n",
            peer.addr
        ));
    }
    let gw = Gateway::start(&config, Driver::IoUring);
    for (host, status) in [("a.test", 502), ("b.test", 503)] {
        let r = gw.connect().roundtrip(&format!(
            "GET /v1/orders/o-1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ));
        assert_eq!(r.status, status, "{host}: {}", r.head);
        let body: serde_json::Value = serde_json::from_str(r.body_str()).unwrap();
        assert!(
            body["message"].as_str().unwrap().contains("not gRPC"),
            "{body}"
        );
        // The gateway's JSON is not the page: none of the fields about the page's bytes
        // (before: `content-encoding: gzip` on plain JSON, which clients failed to read).
        assert_eq!(r.header("content-encoding"), None, "{}", r.head);
        assert_eq!(r.header("etag"), None, "{}", r.head);
    }
}
