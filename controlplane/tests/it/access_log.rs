//! The access log (one JSON line per request, field by field for each kind of outcome; no
//! line lost or torn under wrk; SIGUSR1 reopening), request ids and W3C trace context.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

/// The fields every line has.
const FIELDS: [&str; 20] = [
    "ts",
    "request_id",
    "client_ip",
    "method",
    "host",
    "path",
    "status",
    "route",
    "upstream",
    "target",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "upstream_connect_ms",
    "upstream_first_byte_ms",
    "consumer",
    "user_agent",
    "error",
    "trace_id",
    "retries",
];

/// Reads the log's lines once there are at least `n`, each parsed (a torn line fails here)
/// and with every field.
fn read_log(path: &Path, n: usize) -> Vec<Value> {
    let lines = wait_log_lines(path, n);
    for v in &lines {
        for f in FIELDS {
            assert!(v.get(f).is_some(), "line without {f}: {v}");
        }
    }
    lines
}

/// An origin that waits `delay` before answering 200, and echoes the request's
/// `X-Request-Id` back (so the gateway has one to replace).
fn slow_origin(delay: Duration) -> Origin {
    Origin::start(Arc::new(move |_req: &Received, s: &mut TcpStream| {
        thread::sleep(delay);
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nX-Request-Id: from-upstream\r\nContent-Length: 4\r\n\r\nslow"
        );
        Keep::Open
    }))
}

fn log_config(origin: &Origin, slow: &Origin, log: &Path, extra: &str) -> String {
    format!(
        r#"workers = 1

[[listeners]]
address = "127.0.0.1:0"

[[upstreams]]
id = "origin"
targets = [{{ address = "{origin}" }}]

[[upstreams]]
id = "dead"
targets = [{{ address = "{dead}" }}]

[[upstreams]]
id = "slow"
targets = [{{ address = "{slow}" }}]

[[routes]]
id = "api"
path_prefix = "/api"
upstream = "origin"

[[routes]]
id = "dead"
path = "/dead"
upstream = "dead"

[[routes]]
id = "slow"
path = "/slow"
upstream = "slow"

[[routes]]
id = "private"
path = "/private"
upstream = "origin"
policies = ["key"]

[[consumers]]
id = "mobile-app"

[[credentials]]
id = "mobile-key"
consumer = "mobile-app"
kind = "api_key"
key = "s3cr3t-key-1"

[[policies]]
id = "key"
kind = "api_key"
header = "X-Api-Key"
query = "api_key"

[timeouts]
upstream_response_head_ms = 400

[access_log]
path = "{log}"
{extra}
"#,
        origin = origin.addr,
        dead = closed_port(),
        slow = slow.addr,
        log = log.display()
    )
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The common checks of a line: timestamp format, client, method, numbers.
fn check_common(v: &Value, method: &str) {
    let ts = v["ts"].as_str().unwrap();
    // 2026-12-02T03:04:05.678Z
    assert_eq!(ts.len(), 24, "{ts}");
    assert!(
        ts.ends_with('Z') && &ts[10..11] == "T" && &ts[19..20] == ".",
        "{ts}"
    );
    assert_eq!(v["client_ip"], "127.0.0.1");
    assert_eq!(v["method"], method);
    assert!(v["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(v["bytes_in"].as_u64().unwrap() > 0);
    assert!(v["bytes_out"].as_u64().unwrap() > 0, "{v}");
    assert!(is_hex(v["trace_id"].as_str().unwrap(), 32), "{v}");
}

#[test]
fn every_outcome_is_logged_field_by_field() {
    let origin = Origin::echo();
    let slow = slow_origin(Duration::from_millis(900));
    let dir = temp_dir("access-log");
    let log = dir.join("access.log");
    let gw = Gateway::start(&log_config(&origin, &slow, &log, ""), Driver::IoUring);
    let mut c = gw.connect();

    let ok = "GET /api/items?page=2 HTTP/1.1\r\nHost: shop.test\r\nUser-Agent: curl/8.0 \"quoted\"\r\nX-Request-Id: req-200\r\n\r\n";
    let r = c.roundtrip(ok);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("req-200"));
    let ok_bytes = r.head.len() + 4 + r.body.len();
    assert_eq!(
        // A client's id with a quote and a backslash: kept, and escaped in the line.
        c.roundtrip(
            "GET /nowhere?api_key=s3cr3t-key-1 HTTP/1.1\r\nHost: shop.test\r\nX-Request-Id: req-\"404\\\r\n\r\n"
        )
        .status,
        404
    );
    let r = c.roundtrip("GET /private?api_key=wrong-key&x=1 HTTP/1.1\r\nHost: shop.test\r\nX-Request-Id: req-401\r\n\r\n");
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-request-id"), Some("req-401"));
    let r = c.roundtrip("GET /private?api_key=s3cr3t-key-1 HTTP/1.1\r\nHost: shop.test\r\nX-Request-Id: req-consumer\r\n\r\n");
    assert_eq!(r.status, 200);
    // The key twice (refused: which one?) and once more with its name percent-encoded.
    let r = c.roundtrip("GET /private?api_key=s3cr3t-key-1&x=1&api_key=s3cr3t-key-2&api%5Fkey=s3cr3t-key-3 HTTP/1.1\r\nHost: shop.test\r\nX-Request-Id: req-twice\r\n\r\n");
    assert_eq!(r.status, 401);
    let r = gw
        .connect()
        .roundtrip("GET /dead HTTP/1.1\r\nHost: shop.test\r\nX-Request-Id: req-502\r\n\r\n");
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-request-id"), Some("req-502"));
    let slow_post =
        "POST /slow HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 3\r\nX-Request-Id: req-504\r\n\r\nabc";
    let r = gw.connect().roundtrip(slow_post);
    assert_eq!(r.status, 504);

    let lines = read_log(&log, 7);
    assert_eq!(lines.len(), 7, "{lines:?}");
    let by_id = |id: &str| {
        lines
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("no line for {id}: {lines:?}"))
    };

    let l = by_id("req-200");
    check_common(l, "GET");
    assert_eq!(l["status"], 200);
    assert_eq!(l["host"], "shop.test");
    assert_eq!(l["path"], "/api/items?page=2");
    assert_eq!(l["route"], "api");
    assert_eq!(l["upstream"], "origin");
    assert_eq!(l["target"], origin.addr.to_string());
    assert_eq!(l["user_agent"], "curl/8.0 \"quoted\"");
    assert_eq!(l["bytes_in"], ok.len());
    assert_eq!(l["bytes_out"], ok_bytes);
    assert!(
        l["upstream_connect_ms"].as_f64().is_some(),
        "a new connection: {l}"
    );
    assert!(l["upstream_first_byte_ms"].as_f64().is_some());
    assert_eq!(l["consumer"], Value::Null);
    assert_eq!(l["error"], Value::Null);
    assert_eq!(l["retries"], 0);

    let l = by_id("req-\"404\\");
    check_common(l, "GET");
    assert_eq!(l["status"], 404);
    // Refused before any api_key policy read it: the key is still left out.
    assert_eq!(l["path"], "/nowhere");
    assert_eq!(l["route"], Value::Null);
    assert_eq!(l["upstream"], Value::Null);
    assert_eq!(l["target"], Value::Null);
    assert_eq!(l["upstream_connect_ms"], Value::Null);
    assert_eq!(l["upstream_first_byte_ms"], Value::Null);
    assert_eq!(l["user_agent"], Value::Null);
    assert_eq!(l["error"], "no_route");

    let l = by_id("req-401");
    check_common(l, "GET");
    assert_eq!(l["status"], 401);
    assert_eq!(l["route"], "private");
    // The key the api_key policy reads from the query never reaches the log.
    assert_eq!(l["path"], "/private?x=1");
    assert_eq!(by_id("req-twice")["path"], "/private?x=1");
    assert_eq!(l["target"], Value::Null);
    assert_eq!(l["error"], "policy_denied");

    let l = by_id("req-consumer");
    assert_eq!(l["status"], 200);
    assert_eq!(l["consumer"], "mobile-app");
    assert_eq!(l["path"], "/private");
    // The connection's second line with a target: its text kept from the first.
    assert_eq!(l["target"], origin.addr.to_string());
    // The same upstream connection as the first request: reused, so no connect time.
    assert_eq!(l["upstream_connect_ms"], Value::Null, "{l}");

    let l = by_id("req-502");
    check_common(l, "GET");
    assert_eq!(l["status"], 502);
    assert_eq!(l["route"], "dead");
    assert_eq!(l["upstream"], "dead");
    assert!(l["target"].as_str().is_some());
    assert_eq!(l["upstream_first_byte_ms"], Value::Null);
    assert_eq!(l["error"], "connect_failed");

    let l = by_id("req-504");
    check_common(l, "POST");
    assert_eq!(l["status"], 504);
    assert_eq!(l["route"], "slow");
    assert_eq!(l["target"], slow.addr.to_string());
    assert_eq!(l["upstream_first_byte_ms"], Value::Null);
    assert_eq!(l["error"], "response_timeout");
    assert!(l["duration_ms"].as_f64().unwrap() >= 400.0, "{l}");
    assert_eq!(l["bytes_in"], slow_post.len());
}

#[test]
fn the_admin_tail_shows_log_lines_only_whatever_the_file_holds() {
    // access_log.path may name any file; GET /v1/access_log must not read out one that is
    // not a log (a stored private key, say) through it.
    let origin = Origin::echo();
    let slow = slow_origin(Duration::from_millis(10));
    let dir = temp_dir("access-log-tail");
    let log = dir.join("access.log");
    std::fs::write(
        &log,
        "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let gw = Gateway::start(&log_config(&origin, &slow, &log, ""), Driver::IoUring);
    let r = gw
        .connect()
        .roundtrip("GET /api/t HTTP/1.1\r\nHost: shop.test\r\n\r\n");
    assert_eq!(r.status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tail = gw.admin("GET", "/v1/access_log?lines=10", None).json();
        let lines = tail["lines"].as_array().unwrap().clone();
        assert!(
            lines
                .iter()
                .all(|l| !l.as_str().unwrap().contains("PRIVATE KEY")
                    && !l.as_str().unwrap().contains("MIGH")),
            "{tail}"
        );
        if lines.len() == 1 {
            assert!(
                lines[0].as_str().unwrap().contains("\"path\":\"/api/t\""),
                "{tail}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{tail}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_admin_tail_gives_as_many_long_lines_as_asked_and_says_when_it_cannot() {
    // Lines of 4 KiB: the first 512 KiB held 127 of the 1,000 asked for (before: 127, said
    // nowhere); 20 KiB ones: the last 16 MiB hold 819, and the answer says it is short.
    let origin = Origin::echo();
    let slow = slow_origin(Duration::from_millis(10));
    for (size, want_lines, truncated) in [(4096, 1000, false), (20 * 1024, 819, true)] {
        let dir = temp_dir("access-log-long-tail");
        let log = dir.join("access.log");
        let mut text = String::new();
        for i in 0..1200 {
            let line = format!("{{\"ts\":\"t\",\"n\":{i},\"pad\":\"");
            let pad = "p".repeat(size - line.len() - 3);
            text.push_str(&format!("{line}{pad}\"}}\n"));
        }
        std::fs::write(&log, text).unwrap();
        let gw = Gateway::start(&log_config(&origin, &slow, &log, ""), Driver::IoUring);
        let tail = gw.admin("GET", "/v1/access_log?lines=1000", None).json();
        let lines = tail["lines"].as_array().unwrap();
        assert_eq!(lines.len(), want_lines, "{size}");
        assert!(lines[lines.len() - 1]
            .as_str()
            .unwrap()
            .contains("\"n\":1199,"));
        assert_eq!(tail["truncated"], truncated, "{size}");
    }
    // A window that starts where a line does: its first line is whole (the review found it
    // dropped, and `truncated` said): 1,000 lines of exactly 16 MiB after a short one.
    let dir = temp_dir("access-log-boundary");
    let log = dir.join("access.log");
    let mut text = format!("{{\"ts\":\"t\",\"n\":0,\"pad\":\"{}\"}}\n", "q".repeat(70));
    for i in 1..=1000 {
        let size = if i <= 784 { 16_777 } else { 16_778 };
        let line = format!("{{\"ts\":\"t\",\"n\":{i},\"pad\":\"");
        let pad = "p".repeat(size - line.len() - 3);
        text.push_str(&format!("{line}{pad}\"}}\n"));
    }
    assert_eq!(text.len() - text.find("\n").unwrap() - 1, 16 * 1024 * 1024);
    std::fs::write(&log, text).unwrap();
    let gw = Gateway::start(&log_config(&origin, &slow, &log, ""), Driver::IoUring);
    let tail = gw.admin("GET", "/v1/access_log?lines=1000", None).json();
    let lines = tail["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 1000);
    assert!(lines[0].as_str().unwrap().contains("\"n\":1,"));
    assert_eq!(tail["truncated"], false);
}

#[test]
fn a_client_that_leaves_before_the_answer_is_logged_as_499() {
    let origin = Origin::echo();
    let slow = slow_origin(Duration::from_millis(200));
    let dir = temp_dir("access-log-499");
    let log = dir.join("access.log");
    let config = log_config(&origin, &slow, &log, "").replace(
        "upstream_response_head_ms = 400",
        "upstream_response_head_ms = 5000",
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Request-Id: gone\r\n\r\n")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    drop(s);
    let l = &read_log(&log, 1)[0];
    assert_eq!(l["request_id"], "gone");
    assert_eq!(l["status"], 499, "{l}");
    assert_eq!(l["error"], "client_closed");
    assert_eq!(l["route"], "slow");
}

/// An origin that never answers `/hold`: it reports on `ended` how long after the request
/// came in the gateway closed the connection (`None`: not within 12 s). `/late` is
/// answered after 2.5 s.
pub(crate) fn holding_origin(ended: std::sync::mpsc::Sender<Option<Duration>>) -> Origin {
    let ended = std::sync::Mutex::new(ended);
    Origin::start(Arc::new(move |req: &Received, s: &mut TcpStream| {
        if req.target() == "/late" {
            thread::sleep(Duration::from_millis(2500));
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate");
            return Keep::Open;
        }
        let start = Instant::now();
        let _ = s.set_read_timeout(Some(Duration::from_secs(12)));
        let closed = matches!(std::io::Read::read(s, &mut [0u8; 64]), Ok(0) | Err(_))
            && start.elapsed() < Duration::from_secs(12);
        let _ = ended.lock().unwrap().send(closed.then(|| start.elapsed()));
        Keep::Close
    }))
}

#[test]
fn a_client_that_leaves_a_slow_answer_ends_its_upstream_request() {
    // Waiting for an answer, the gateway looks every second whether the client is still
    // there: one that left ends the exchange (499), as nginx does by default, instead of
    // holding the upstream request until the answer or the response timeout (10 s here).
    let origin = Origin::echo();
    let (tx, ended) = std::sync::mpsc::channel();
    let hold = holding_origin(tx);
    let dir = temp_dir("access-log-left");
    let log = dir.join("access.log");
    let config = log_config(&origin, &hold, &log, "").replace(
        "upstream_response_head_ms = 400",
        "upstream_response_head_ms = 10000",
    );
    let config = config.replace("path = \"/slow\"", "path_prefix = \"/\"");
    let gw = Gateway::start(&config, Driver::IoUring);

    // A client that is still there is answered, however many checks its wait spans.
    let mut c = gw.connect();
    let r = c.roundtrip("GET /late HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!((r.status, r.body_str()), (200, "late"));
    assert_eq!(read_log(&log, 1)[0]["status"], 200);

    // Two pipelined requests, then the client's half-close: while the second is still
    // buffered, the FIN is not taken for leaving, and the first is answered. (The second,
    // once the only one left, meets the FIN as any half-closed request does: 499.)
    let mut p = TcpStream::connect(gw.addr).unwrap();
    p.write_all(b"GET /late HTTP/1.1\r\nHost: a\r\n\r\nGET /late HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    p.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut p, &mut got);
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 1, "{text}");
    assert!(text.contains("late"), "{text}");
    // One that closes its connection while the upstream works on its request.
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"GET /hold HTTP/1.1\r\nHost: a\r\nX-Request-Id: left\r\n\r\n")
        .unwrap();
    hold.wait_requests(4);
    drop(s);
    let after = ended.recv_timeout(Duration::from_secs(15)).unwrap();
    assert!(
        after.is_some_and(|d| d < Duration::from_secs(5)),
        "upstream connection closed after {after:?} (the response timeout is 10 s)"
    );
    let lines = read_log(&log, 4);
    let l = lines.iter().find(|l| l["request_id"] == "left").unwrap();
    assert_eq!(l["status"], 499, "{l}");
    assert_eq!(l["error"], "client_closed", "{l}");
    // Not the target's failure.
    let health = gw.admin("GET", "/v1/upstreams/slow/health", None).json();
    let t = &health["targets"][0];
    assert_eq!(t["state"], "healthy", "{t}");
    assert_eq!(t["outstanding"], 0, "{t}");
    assert_eq!(t["consecutive_failures"], 0, "{t}");
}

#[test]
fn a_client_that_leaves_before_the_response_timeout_is_499_not_the_upstreams_504() {
    // The response timeout (400 ms) comes before the first look at the client (after 1 s):
    // the client that left at 100 ms is looked at then. Before: 504 response_timeout,
    // counted against the target (its errors, passive health, `retry.on`).
    let origin = Origin::echo();
    let (tx, _ended) = std::sync::mpsc::channel();
    let hold = holding_origin(tx);
    let log = temp_dir("access-log-left-early").join("access.log");
    let config = log_config(&origin, &hold, &log, "");
    assert!(config.contains("upstream_response_head_ms = 400"));
    let gw = Gateway::start(&config, Driver::IoUring);
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Request-Id: early\r\n\r\n")
        .unwrap();
    hold.wait_requests(1);
    drop(s);
    let l = &read_log(&log, 1)[0];
    assert_eq!(
        (&l["request_id"], &l["status"], &l["error"]),
        (&json!("early"), &json!(499), &json!("client_closed")),
        "{l}"
    );
    let health = gw.admin("GET", "/v1/upstreams/slow/health", None).json();
    assert_eq!(health["targets"][0]["consecutive_failures"], 0, "{health}");
}

#[test]
fn unparsable_requests_and_sampling() {
    let origin = Origin::echo();
    let slow = slow_origin(Duration::from_millis(0));
    let dir = temp_dir("access-log-sample");
    let log = dir.join("access.log");
    let config = log_config(&origin, &slow, &log, "sample = 0.0");
    let gw = Gateway::start(&config, Driver::IoUring);
    // Sampled out: 2xx-4xx.
    let mut c = gw.connect();
    for _ in 0..5 {
        assert_eq!(
            c.roundtrip("GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n").status,
            200
        );
        assert_eq!(
            c.roundtrip("GET /none HTTP/1.1\r\nHost: a\r\n\r\n").status,
            404
        );
    }
    // Always logged: 5xx.
    assert_eq!(
        gw.connect()
            .roundtrip("GET /dead HTTP/1.1\r\nHost: a\r\n\r\n")
            .status,
        502
    );
    let lines = read_log(&log, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["status"], 502);
    drop(gw);

    let log2 = dir.join("all.log");
    let gw = Gateway::start(&log_config(&origin, &slow, &log2, ""), Driver::IoUring);
    let r = gw
        .connect()
        .roundtrip("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n");
    assert_eq!(r.status, 400);
    assert!(is_hex(r.header("x-request-id").unwrap(), 32));
    let l = &read_log(&log2, 1)[0];
    assert_eq!(l["status"], 400);
    assert_eq!(l["error"], "bad_request");
    // The request line was read: it is logged (its query never: nothing screened it).
    assert_eq!(
        (l["method"].as_str(), l["path"].as_str()),
        (Some("GET"), Some("/"))
    );
    assert_eq!(l["request_id"], r.header("x-request-id").unwrap());
    let mut c = gw.connect();
    c.send(b"POST /up?api_key=s3cret HTTP/1.1\r\nHost: a\r\nContent-Length: 999999999999\r\n\r\n");
    assert_eq!(c.read_response().status, 413);
    let mut c = gw.connect();
    c.send(b"\x16\x03\x01 not a request\r\n\r\n");
    assert_eq!(c.read_response().status, 400);
    let lines = read_log(&log2, 3);
    assert_eq!(
        (
            lines[1]["status"].as_u64(),
            lines[1]["method"].as_str(),
            lines[1]["path"].as_str()
        ),
        (Some(413), Some("POST"), Some("/up")),
        "{}",
        lines[1]
    );
    // No request line: nothing to log of one.
    assert_eq!(
        (lines[2]["method"].as_str(), lines[2]["path"].as_str()),
        (Some(""), Some("")),
        "{}",
        lines[2]
    );
    // A chunked body too large by its first size: the body bytes read count too, as the
    // body of one too large by its length does (before: the head's alone).
    let mut c = gw.connect();
    let chunked =
        b"POST /api/up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFF\r\nabc";
    c.send(chunked);
    assert_eq!(c.read_response().status, 413);
    let l = &read_log(&log2, 4)[3];
    assert_eq!(
        (l["status"].as_u64(), l["bytes_in"].as_u64()),
        (Some(413), Some(chunked.len() as u64)),
        "{l}"
    );
    // A field with a byte no field may hold, after a whole request line: that line is
    // logged, and the client's request id kept (before: no method, no path, a new id).
    let mut c = gw.connect();
    c.send(
        b"GET /b1?x=1 HTTP/1.1\r\nHost: h\r\nX-Request-Id: my-id-1\r\nUser-Agent: x\x01y\r\n\r\n",
    );
    let r = c.read_response();
    assert_eq!((r.status, r.header("x-request-id")), (400, Some("my-id-1")));
    let l = &read_log(&log2, 5)[4];
    assert_eq!(
        (
            l["method"].as_str(),
            l["path"].as_str(),
            l["request_id"].as_str()
        ),
        (Some("GET"), Some("/b1"), Some("my-id-1")),
        "{l}"
    );
    // A stop drains and writes the last lines, and does not wait on the log.
    let mut gw = gw;
    assert_eq!(
        gw.connect()
            .roundtrip("GET /api/last HTTP/1.1\r\nHost: a\r\n\r\n")
            .status,
        200
    );
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));
    let lines = read_log(&log2, 4);
    assert_eq!(lines.last().unwrap()["path"], "/api/last");
}

#[test]
fn sigusr1_reopens_the_file_after_a_rotation() {
    let origin = Origin::echo();
    let slow = slow_origin(Duration::from_millis(0));
    let dir = temp_dir("access-log-rotate");
    let log = dir.join("access.log");
    let gw = Gateway::start(&log_config(&origin, &slow, &log, ""), Driver::IoUring);
    let mut c = gw.connect();
    assert_eq!(
        c.roundtrip("GET /api/1 HTTP/1.1\r\nHost: a\r\n\r\n").status,
        200
    );
    read_log(&log, 1);
    // What logrotate does: move the file, then signal.
    let rotated: PathBuf = dir.join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    gw.signal(libc::SIGUSR1);
    gw.wait_log("reopening the access log", Duration::from_secs(5));
    // Lines written before the writer reopens may still go to the moved file; wait until a
    // request shows up in the new one.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 2;
    while !log.exists() {
        assert_eq!(
            c.roundtrip(&format!("GET /api/{n} HTTP/1.1\r\nHost: a\r\n\r\n"))
                .status,
            200
        );
        n += 1;
        assert!(Instant::now() < deadline, "no new file after SIGUSR1");
        thread::sleep(Duration::from_millis(50));
    }
    let old = read_log(&rotated, 1);
    assert_eq!(old[0]["path"], "/api/1");
    let new = read_log(&log, 1);
    assert!(new.iter().all(|l| l["path"] != "/api/1"));
    // Every request is in exactly one of the two files.
    let total = read_log(&rotated, 1).len() + read_log(&log, 1).len();
    assert_eq!(total, n - 1);
}

#[test]
fn every_request_under_wrk_is_logged_once_and_whole() {
    let origin = Origin::echo();
    let slow = slow_origin(Duration::from_millis(0));
    let dir = temp_dir("access-log-wrk");
    let log = dir.join("access.log");
    let gw = Gateway::start(&log_config(&origin, &slow, &log, ""), Driver::IoUring);
    let out = std::process::Command::new("wrk")
        .args(["-t1", "-c8", "-d2s", "-H", "User-Agent: wrk \"load\"\\test"])
        .arg(format!("http://{}/api/load", gw.addr))
        .output()
        .expect("wrk is needed (scripts/test installs it; Debian package `wrk`)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every request the gateway answered, from its own metrics once the load is over.
    let answered = |text: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("gateway_requests_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (n, metrics) = loop {
        let a = gw.admin("GET", "/metrics", None).body_str().to_owned();
        thread::sleep(Duration::from_millis(300));
        let b = gw.admin("GET", "/metrics", None).body_str().to_owned();
        if answered(&a) == answered(&b) {
            break (answered(&b), b);
        }
        assert!(Instant::now() < deadline);
    };
    assert!(n > 100, "wrk made only {n} requests");
    let lines = read_log(&log, n as usize);
    assert_eq!(lines.len() as u64, n, "one line per request, none lost");
    let mut ids: Vec<&str> = lines
        .iter()
        .map(|l| l["request_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len() as u64, n, "request ids are unique");
    assert!(lines
        .iter()
        .all(|l| l["user_agent"] == "wrk \"load\"\\test"));
    assert!(
        metrics.contains("gateway_access_log_dropped_total 0\n"),
        "{metrics}"
    );
}

/// What the origin received for one request through the gateway, and what the client got.
fn through(gw: &Gateway, origin: &Origin, extra_fields: &str) -> (Received, Response) {
    let before = origin.requests().len();
    let r = gw.connect().roundtrip(&format!(
        "GET /api/t HTTP/1.1\r\nHost: a\r\n{extra_fields}\r\n"
    ));
    assert_eq!(r.status, 200);
    let seen = origin.wait_requests(before + 1).pop().unwrap();
    (seen, r)
}

#[test]
fn a_head_that_times_out_is_logged_with_its_bytes_and_request_line() {
    // Half a head, then nothing: a 408 after client_header_ms, logged with the bytes that
    // came, the request line (its query left out) and the client's request id. Before:
    // bytes_in 0, no method or path, and a new id (the read that timed out took the
    // buffer with it).
    let origin = Origin::echo();
    let slow = slow_origin(Duration::from_millis(0));
    let dir = temp_dir("access-log-408");
    let log = dir.join("access.log");
    let config = log_config(&origin, &slow, &log, "").replace(
        "upstream_response_head_ms = 400\n",
        "upstream_response_head_ms = 400\nclient_header_ms = 300\n",
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    let half = b"GET /api/x?k=v HTTP/1.1\r\nHost: a\r\nX-Request-Id: slow-1\r\nX-Req";
    let mut c = gw.connect();
    c.send(half);
    let r = c.read_response();
    assert_eq!(r.status, 408);
    assert_eq!(r.header("x-request-id"), Some("slow-1"));
    let l = &read_log(&log, 1)[0];
    assert_eq!(
        (&l["status"], &l["error"], &l["method"], &l["path"]),
        (
            &json!(408),
            &json!("client_timeout"),
            &json!("GET"),
            &json!("/api/x")
        ),
        "{l}"
    );
    assert_eq!(l["bytes_in"], json!(half.len()), "{l}");
    assert_eq!(l["request_id"], "slow-1", "{l}");
}

#[test]
fn request_ids_are_kept_made_and_replaced() {
    let origin = Origin::echo();
    let slow = slow_origin(Duration::from_millis(0));
    let dir = temp_dir("request-id");
    let log = dir.join("access.log");
    let gw = Gateway::start(&log_config(&origin, &slow, &log, ""), Driver::IoUring);

    // Kept.
    let (seen, r) = through(&gw, &origin, "X-Request-Id: abc-123_XYZ\r\n");
    assert_eq!(seen.header("x-request-id"), Some("abc-123_XYZ"));
    assert_eq!(r.header("x-request-id"), Some("abc-123_XYZ"));
    // Made: none sent.
    let (seen, r) = through(&gw, &origin, "");
    let id = seen.header("x-request-id").unwrap().to_owned();
    assert!(is_hex(&id, 32), "{id}");
    assert_eq!(r.header("x-request-id"), Some(id.as_str()));
    // Replaced: too long, not visible ASCII, or sent twice, a second time spelled with `_`
    // (which CGI-style upstreams read as the same; before, `X_Request_Id` reached them beside
    // the gateway's id, and the upstream read "forged,<id>").
    let long = "x".repeat(129);
    for bad in [
        format!("X-Request-Id: {long}\r\n"),
        "X-Request-Id: has space\r\n".to_owned(),
        "X-Request-Id: one\r\nX-Request-Id: two\r\n".to_owned(),
        "X_Request_Id: forged\r\n".to_owned(),
        "X-Request-Id: one\r\nx_request_id: two\r\n".to_owned(),
        "X_REQUEST_ID: two\r\nX-Request-Id: one\r\n".to_owned(),
    ] {
        let (seen, r) = through(&gw, &origin, &bad);
        let id = seen.header("x-request-id").unwrap().to_owned();
        assert!(is_hex(&id, 32), "{bad}: {id}");
        let lower = seen.head.to_ascii_lowercase().replace('_', "-");
        assert_eq!(lower.matches("x-request-id").count(), 1, "{}", seen.head);
        assert_eq!(r.header("x-request-id"), Some(id.as_str()));
    }
    // The gateway's id replaces the one an upstream sends back.
    let r = gw
        .connect()
        .roundtrip("GET /slow HTTP/1.1\r\nHost: a\r\nX-Request-Id: mine\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("mine"));
    assert!(!r.head.contains("from-upstream"), "{}", r.head);
    // A head refused once its request line was read gets the client's id back too, and
    // its log line has it and the trace. Before: a new id on the answer and in the log.
    let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    for (i, (request, status)) in [
        ("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n", 405),
        (
            "POST /api/t HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999\r\n",
            413,
        ),
        (
            "POST /api/t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n",
            501,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let r = gw.connect().roundtrip(&format!(
            "{request}X-Request-Id: refused-{i}\r\ntraceparent: {trace}\r\n\r\n"
        ));
        assert_eq!(r.status, status, "{request}");
        assert_eq!(
            r.header("x-request-id"),
            Some(format!("refused-{i}").as_str())
        );
    }
    // Sent twice, it is not the client's to keep.
    let r = gw.connect().roundtrip(
        "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nX-Request-Id: a\r\nX-Request-Id: b\r\n\r\n",
    );
    assert_eq!(r.status, 405);
    assert!(is_hex(r.header("x-request-id").unwrap(), 32), "{}", r.head);
    // The log has the same ids.
    let lines = read_log(&log, 10);
    assert!(lines.iter().any(|l| l["request_id"] == "abc-123_XYZ"));
    assert!(lines.iter().any(|l| l["request_id"] == id.as_str()));
    for i in 0..3 {
        let line = lines
            .iter()
            .find(|l| l["request_id"] == format!("refused-{i}").as_str())
            .unwrap_or_else(|| panic!("refused-{i}: {lines:?}"));
        assert_eq!(
            line["trace_id"], "0af7651916cd43dd8448eb211c80319c",
            "{line}"
        );
    }
}

#[test]
fn traceparent_is_continued_created_and_replaced() {
    let origin = Origin::echo();
    let slow = slow_origin(Duration::from_millis(0));
    let dir = temp_dir("traceparent");
    let log = dir.join("access.log");
    let gw = Gateway::start(&log_config(&origin, &slow, &log, ""), Driver::IoUring);
    let parse = |v: &str| -> (String, String, String) {
        let p: Vec<&str> = v.split('-').collect();
        assert_eq!(p.len(), 4, "{v}");
        assert_eq!(p[0], "00");
        assert!(
            is_hex(p[1], 32) && is_hex(p[2], 16) && is_hex(p[3], 2),
            "{v}"
        );
        (p[1].to_owned(), p[2].to_owned(), p[3].to_owned())
    };

    // Continued: same trace id and flags, the gateway's own parent id; tracestate untouched.
    let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let (seen, _) = through(
        &gw,
        &origin,
        &format!("traceparent: {incoming}\r\ntracestate: congo=t61rcWkgMzE\r\n"),
    );
    let (trace, parent, flags) = parse(seen.header("traceparent").unwrap());
    assert_eq!(trace, "0af7651916cd43dd8448eb211c80319c");
    assert_ne!(parent, "b7ad6b7169203331");
    assert_eq!(flags, "00");
    assert_eq!(seen.header("tracestate"), Some("congo=t61rcWkgMzE"));
    assert_eq!(seen.head.matches("traceparent").count(), 1, "{}", seen.head);
    // Flags no version defines are zeroed; sampled and random trace id (Level 2) go on.
    let flagged = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-ff";
    let (seen, _) = through(&gw, &origin, &format!("traceparent: {flagged}\r\n"));
    assert_eq!(parse(seen.header("traceparent").unwrap()).2, "03");

    // A tracestate belongs to the trace it came with: a new trace goes without it, whether
    // none came or one that is replaced. Before: passed on with the new, unrelated trace.
    for parent in ["", "traceparent: garbage\r\n"] {
        let (seen, _) = through(
            &gw,
            &origin,
            &format!("{parent}tracestate: vendor=secret\r\nTraceState: rojo=1\r\n"),
        );
        assert!(seen.header("traceparent").is_some());
        assert!(
            !seen.head.to_ascii_lowercase().contains("tracestate"),
            "{}",
            seen.head
        );
    }

    // Created: none sent (sampled by default).
    let (seen, _) = through(&gw, &origin, "");
    let (created, _, flags) = parse(seen.header("traceparent").unwrap());
    assert_eq!(flags, "01");

    // Replaced: malformed.
    for bad in [
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "garbage",
    ] {
        let (seen, _) = through(&gw, &origin, &format!("traceparent: {bad}\r\n"));
        let (t, _, _) = parse(seen.header("traceparent").unwrap());
        assert_ne!(t.to_uppercase(), "0AF7651916CD43DD8448EB211C80319C");
        assert_ne!(t, "00000000000000000000000000000000");
    }
    let lines = read_log(&log, 8);
    assert!(lines
        .iter()
        .any(|l| l["trace_id"] == "0af7651916cd43dd8448eb211c80319c"));
    assert!(lines.iter().any(|l| l["trace_id"] == created.as_str()));
}

#[test]
fn tracing_can_be_turned_off() {
    let origin = Origin::echo();
    let dir = temp_dir("tracing-off");
    let log = dir.join("access.log");
    let config = proxy_config(
        origin.addr,
        &format!(
            "[tracing]\nrequest_id = false\ntraceparent = false\n[access_log]\npath = \"{}\"\n",
            log.display()
        ),
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    let (seen, r) = through(
        &gw,
        &origin,
        "X-Request-Id: has space\r\ntraceparent: garbage\r\n",
    );
    assert_eq!(seen.header("x-request-id"), Some("has space"));
    assert_eq!(seen.header("traceparent"), Some("garbage"));
    assert_eq!(r.header("x-request-id"), None);
    // With the switch off, tracestate goes on as the client sent it.
    let (seen, _) = through(&gw, &origin, "tracestate: vendor=kept\r\n");
    assert_eq!(seen.header("tracestate"), Some("vendor=kept"));
    // The gateway has no request id then: the log says null (before: "").
    for line in read_log(&log, 2) {
        assert_eq!(line["request_id"], Value::Null, "{line}");
    }
}

#[test]
fn invalid_access_log_settings_are_refused() {
    let origin = Origin::echo();
    let dir = temp_dir("access-log-invalid");
    let path = dir.join("bad.toml");
    // A log over the config file itself (before: taken, and the next start refused the
    // file its lines had made invalid).
    let itself = format!("[access_log]\npath = \"{}\"\n", path.display());
    for (extra, field) in [
        ("[access_log]\npath = \"relative.log\"\n", "access_log.path"),
        (
            "[access_log]\npath = \"/tmp/x.log\"\nsample = 1.5\n",
            "access_log.sample",
        ),
        ("[access_log]\nsample = 0.5\n", "access_log"),
        (&itself, "is the config file (--config)"),
    ] {
        std::fs::write(&path, proxy_config(origin.addr, extra)).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("--check")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra}: {err}");
        assert!(err.contains(field), "{extra}: {err}");
    }
}

#[test]
fn lines_that_cannot_be_written_are_counted_and_the_error_logged_once() {
    let origin = Origin::echo();
    let gw = Gateway::start(
        &proxy_config(origin.addr, "[access_log]\npath = \"/dev/full\"\n"),
        Driver::IoUring,
    );
    let lost = || lost_lines(&gw);
    let mut c = gw.connect();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Requests in a few batches, until all 20 are counted.
    for i in 0..20 {
        assert_eq!(
            c.roundtrip("GET /x HTTP/1.1\r\nHost: a\r\n\r\n").status,
            200
        );
        if i % 5 == 4 {
            thread::sleep(Duration::from_millis(250));
        }
    }
    while lost() < 20 {
        assert!(Instant::now() < deadline, "lost lines: {}", lost());
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lost(), 20);
    let errors = gw
        .log_lines()
        .iter()
        .filter(|l| l.contains("access log: write failed"))
        .count();
    assert_eq!(errors, 1, "{:#?}", gw.log_lines());
}

#[test]
fn a_fifo_no_one_reads_loses_lines_and_holds_up_no_change_of_path() {
    // Before: the writer thread blocked in open() until a reader came: nothing said, nothing
    // counted, and a later change of path (or SIGUSR1) never taken.
    let origin = Origin::echo();
    let dir = temp_dir("access-log-fifo");
    let fifo = dir.join("fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let gw = Gateway::start(&proxy_config(origin.addr, ""), Driver::IoUring);
    let log_to = |path: &Path| {
        let mut config = gw.admin("GET", "/v1/config", None).json();
        config["access_log"] = serde_json::json!({"path": path});
        let r = gw.admin("PUT", "/v1/config", Some(&config.to_string()));
        assert_eq!(r.status, 200, "{}", r.body_str());
    };
    let request = || {
        let r = gw.connect().roundtrip("GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.status, 200);
    };
    log_to(&fifo);
    request();
    gw.wait_log("access log: cannot open", Duration::from_secs(5));
    // Nothing to read back from a FIFO: 404, as for stdout (before: a 500, "Illegal seek").
    let tail = gw.admin("GET", "/v1/access_log?lines=5", None);
    assert_eq!(tail.status, 404, "{}", tail.body_str());
    assert!(
        tail.body_str().contains("not a regular file"),
        "{}",
        tail.body_str()
    );
    // Nor from a socket (the review found a 500 there still: its open fails).
    let socket = dir.join("socket");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    log_to(&socket);
    let tail = gw.admin("GET", "/v1/access_log?lines=5", None);
    assert_eq!(tail.status, 404, "{}", tail.body_str());
    drop(listener);
    log_to(&fifo);
    let deadline = Instant::now() + Duration::from_secs(5);
    while lost_lines(&gw) < 1 {
        assert!(Instant::now() < deadline, "no line counted lost");
        thread::sleep(Duration::from_millis(20));
    }
    let file = dir.join("after.log");
    log_to(&file);
    request();
    assert_eq!(read_log(&file, 1)[0]["path"], "/x");
}

#[test]
fn an_access_log_over_a_file_the_gateway_reads_is_refused() {
    // Before: `200`, and the next request's line in the config file made every later start
    // exit 2 ("invalid config").
    let origin = Origin::echo();
    let gw = Gateway::start(&proxy_config(origin.addr, ""), Driver::IoUring);
    let mut config = gw.admin("GET", "/v1/config", None).json();
    config["access_log"] = serde_json::json!({"path": gw.config_path});
    let r = gw.admin("PUT", "/v1/config", Some(&config.to_string()));
    assert_eq!(r.status, 422, "{}", r.body_str());
    let problem = r.json();
    assert_eq!(problem["pointer"], "/access_log/path", "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("the config file (--config)"),
        "{problem}"
    );
    // At start (`--check` too): `invalid_access_log_settings_are_refused`.
}

/// `gateway_access_log_lost_total` now.
fn lost_lines(gw: &Gateway) -> u64 {
    let text = gw.admin("GET", "/metrics", None).body_str().to_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("gateway_access_log_lost_total "))
        .map(|v| v.parse::<u64>().unwrap())
        .expect("gateway_access_log_lost_total")
}

#[test]
fn a_file_size_limit_loses_lines_not_the_process() {
    // A write past RLIMIT_FSIZE (systemd's LimitFSIZE=, `ulimit -f`) raises SIGXFSZ, whose
    // default action ends the process: before, the gateway died there, a torn line at the
    // end of its log. Ignored, the write fails (EFBIG), the line is counted lost and the
    // file cut back to its last whole line.
    let origin = Origin::echo();
    let dir = temp_dir("access-log-fsize");
    let log = dir.join("access.log");
    std::fs::write(&log, format!("{}\n", "x".repeat(9999))).unwrap();
    let gw = Gateway::start(
        &proxy_config(
            origin.addr,
            &format!("[access_log]\npath = \"{}\"\n", log.display()),
        ),
        Driver::IoUring,
    );
    let limit = libc::rlimit {
        rlim_cur: 10_100,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit on our own child, with a valid rlimit and no old-limit pointer.
    let rc = unsafe { libc::prlimit(gw.pid(), libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let mut c = gw.connect();
    for _ in 0..3 {
        assert_eq!(
            c.roundtrip("GET /x HTTP/1.1\r\nHost: a\r\n\r\n").status,
            200
        );
    }
    let lost = || lost_lines(&gw);
    let deadline = Instant::now() + Duration::from_secs(10);
    while lost() < 3 {
        assert!(Instant::now() < deadline, "lost lines: {}", lost());
        thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.ends_with('\n'), "a torn line: {:?}", &text[9_990..]);
    // Still serving.
    assert_eq!(
        gw.connect()
            .roundtrip("GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            .status,
        200
    );
}

#[test]
fn client_ip_is_the_one_the_policies_use_behind_trusted_proxies() {
    let origin = Origin::echo();
    let slow = slow_origin(Duration::from_millis(0));
    let dir = temp_dir("access-log-xff");
    let log = dir.join("access.log");
    let config = format!(
        "trusted_proxies = [\"127.0.0.0/8\"]\n{}",
        log_config(&origin, &slow, &log, "")
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    // A route without policies: the log alone asks for the client address.
    let r = gw.connect().roundtrip(
        "GET /api/x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 198.51.100.4, 203.0.113.9\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let l = &read_log(&log, 1)[0];
    assert_eq!(l["client_ip"], "203.0.113.9", "{l}");
}

#[test]
fn an_upstream_that_fails_after_an_interim_answer_is_logged_with_its_first_byte() {
    // A 100 Continue (not passed on: the gateway sends its own), then the connection
    // closed: the upstream answered something, when, is logged (before: upstream_first_byte_ms
    // null, as if nothing had come).
    let origin = Origin::start(Arc::new(|_req: &Received, s: &mut TcpStream| {
        let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        Keep::Close
    }));
    let dir = temp_dir("access-log-interim");
    let log = dir.join("access.log");
    let config = proxy_config(
        origin.addr,
        &format!("[access_log]\npath = \"{}\"\n", log.display()),
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    let mut c = gw.connect();
    c.send(b"GET /interim HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read_response_to("GET").status, 502);
    let l = &read_log(&log, 1)[0];
    assert_eq!(l["status"], 502, "{l}");
    assert!(l["upstream_first_byte_ms"].as_f64().is_some(), "{l}");
}
