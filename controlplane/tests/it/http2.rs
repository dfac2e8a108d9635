//! HTTP/2 to clients through the real binary: curl `--http2` over TLS (ALPN, SNI for two
//! names) and with prior knowledge on an h2c listener, bodies both ways (with and without a
//! length), HEAD, 421, the access log and metrics; h2load over TLS and h2c; the negative
//! tests of `tests/h2_attacks.py` (PyPI `h2`); GOAWAY on drain; and answers that end
//! with the upstream's close (whole or cut), transfer codings HTTP/2 cannot carry and
//! interim answers.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use crate::tls::{curl_tls, Cert};

const BIG: usize = 1024 * 1024;

/// The `/big` answer: 1 MiB in a pattern with a period (251) prime to every record and
/// frame size, so a piece lost, repeated or moved shows.
fn big_body() -> Vec<u8> {
    (0..BIG).map(|i| (i % 251) as u8).collect()
}

/// An origin that echoes what it got (method, target, body length and framing), sends 1 MiB
/// for `/big`, and answers `/slow` after a second, `/slower` after ten.
fn origin() -> Origin {
    Origin::start(Arc::new(|req: &Received, s: &mut TcpStream| {
        let line = req.request_line().to_owned();
        let target = req.target().to_owned();
        if target == "/big" {
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n");
            let _ = s.write_all(&big_body());
            return Keep::Open;
        }
        if target == "/chunked" {
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                  6\r\nchunk-\r\n7;x=y\r\nencoded\r\n0\r\nx-t: 1\r\n\r\n",
            );
            return Keep::Open;
        }
        // Answers HTTP/2 cannot carry as they are, or that end with the connection.
        if target == "/te-gzip" {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot gzip");
            return Keep::Close;
        }
        if target == "/close-ok" {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nX-Origin: yes\r\n\r\nuntil the close\n");
            return Keep::Close;
        }
        if target == "/close-cut" {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nX-Origin: yes\r\n\r\nthe start");
            return Keep::Reset;
        }
        if target == "/slow" {
            std::thread::sleep(Duration::from_secs(1));
        }
        if target == "/slower" {
            std::thread::sleep(Duration::from_secs(10));
        }
        let (body, framing) = match decode_chunked(&req.raw_body) {
            Some((data, _)) if req.header("transfer-encoding").is_some() => (data, "chunked"),
            _ => (req.raw_body.clone(), "length"),
        };
        let text = format!(
            "{line} body={} framing={framing} proto={}\n",
            body.len(),
            req.header("x-forwarded-proto").unwrap_or("-")
        );
        // A HEAD answer has the length of the GET one and no body (RFC 9110 9.3.2).
        let body = if line.starts_with("HEAD ") {
            ""
        } else {
            text.as_str()
        };
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Origin: yes\r\n\r\n{body}",
            text.len()
        );
        Keep::Open
    }))
}

fn config(origin: SocketAddr, a: &Cert, b: &Cert, log: &Path) -> String {
    format!(
        r#"workers = 1

[[listeners]]
address = "127.0.0.1:0"
tls = {{ certificates = ["a", "b"] }}

[[listeners]]
address = "127.0.0.1:0"
h2c = true

[[upstreams]]
id = "origin"
targets = [{{ address = "{origin}" }}]

[[routes]]
id = "direct"
path = "/direct"
respond = {{ status = 200, body = "direct\n" }}

[[routes]]
id = "all"
path_prefix = "/"
upstream = "origin"

[[certificates]]
id = "a"
cert_file = "{}"
key_file = "{}"

[[certificates]]
id = "b"
cert_file = "{}"
key_file = "{}"

[access_log]
path = "{}"
"#,
        a.cert.display(),
        a.key.display(),
        b.cert.display(),
        b.key.display(),
        log.display()
    )
}

struct Setup {
    gw: Gateway,
    a: Cert,
    b: Cert,
    log: std::path::PathBuf,
    _origin: Origin,
}

fn setup(tag: &str) -> Setup {
    let dir = temp_dir(tag);
    let (a, b) = (Cert::new(&dir, "a.test"), Cert::new(&dir, "b.test"));
    let log = dir.join("access.log");
    let origin = origin();
    let gw = Gateway::start(&config(origin.addr, &a, &b, &log), Driver::IoUring);
    Setup {
        gw,
        a,
        b,
        log,
        _origin: origin,
    }
}

/// curl with `-w` giving the HTTP version and status on the last line: the body and that
/// line.
fn curl(args: &[&str]) -> (String, String) {
    let (_, body, last, _) = curl_status(args);
    (body, last)
}

#[test]
fn curl_speaks_http2_over_tls_and_h2c_through_the_whole_path() {
    let s = setup("h2-curl");
    let (tls, h2c) = (s.gw.listeners[0], s.gw.listeners[1]);
    let resolve = |name: &str| format!("{name}:{}:127.0.0.1", tls.port());
    let url = |name: &str, path: &str| format!("https://{name}:{}{path}", tls.port());

    // ALPN h2 with SNI for two names, each verified against its own certificate.
    for (name, cert) in [("a.test", &s.a), ("www.b.test", &s.b)] {
        let (code, body, err) = curl_tls(tls, name, "/get?x=1", &cert.cert, &["--http2"]);
        assert_eq!(code, 200, "{err}");
        assert_eq!(
            body,
            "GET /get?x=1 HTTP/1.1 body=0 framing=length proto=https\n"
        );
        let (_, last) = curl(&[
            "--http2",
            "-o",
            "/dev/null",
            "--cacert",
            cert.cert.to_str().unwrap(),
            "--resolve",
            &resolve(name),
            &url(name, "/v"),
        ]);
        assert_eq!(last, "2 200");
    }
    // The same listener still speaks HTTP/1.1 to a client that asks for it.
    let ca = s.a.cert.to_str().unwrap();
    let (_, last) = curl(&[
        "--http1.1",
        "-o",
        "/dev/null",
        "--cacert",
        ca,
        "--resolve",
        &resolve("a.test"),
        &url("a.test", "/"),
    ]);
    assert_eq!(last, "1.1 200");

    // Bodies: with a length, and streamed without one (chunked towards the origin).
    let (body, last) = curl(&[
        "--http2",
        "--cacert",
        ca,
        "--resolve",
        &resolve("a.test"),
        "-d",
        "hello=world",
        &url("a.test", "/post"),
    ]);
    assert_eq!(last, "2 200");
    assert_eq!(
        body,
        "POST /post HTTP/1.1 body=11 framing=length proto=https\n"
    );
    let mut child = Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "--cacert",
            ca,
            "--resolve",
            &resolve("a.test"),
            "-T",
            "-",
        ])
        .arg(url("a.test", "/upload"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&vec![b'u'; 300_000])
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "PUT /upload HTTP/1.1 body=300000 framing=chunked proto=https\n"
    );

    // A 1 MiB answer through the flow-control windows, and HEAD without a body.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "--cacert",
            ca,
            "--resolve",
            &resolve("a.test"),
        ])
        .arg(url("a.test", "/big"))
        .output()
        .unwrap();
    assert_eq!(out.stdout.len(), BIG);
    assert!(out.stdout == big_body(), "the 1 MiB answer arrived changed");
    // A chunked answer from the origin arrives as DATA frames, its framing gone.
    let (body, last) = curl(&[
        "--http2",
        "--cacert",
        ca,
        "--resolve",
        &resolve("a.test"),
        &url("a.test", "/chunked"),
    ]);
    assert_eq!((body.as_str(), last.as_str()), ("chunk-encoded", "2 200"));
    let (head, last) = curl(&[
        "--http2",
        "-I",
        "--cacert",
        ca,
        "--resolve",
        &resolve("a.test"),
        &url("a.test", "/head"),
    ]);
    assert_eq!(last, "2 200");
    assert!(head.contains("x-origin: yes"), "{head}");

    // :authority naming another host than the SNI name: 421, as over HTTP/1.1.
    let (_, last) = curl(&[
        "--http2",
        "-o",
        "/dev/null",
        "--cacert",
        ca,
        "--resolve",
        &resolve("a.test"),
        "-H",
        "Host: b.test",
        &url("a.test", "/"),
    ]);
    assert_eq!(last, "2 421");

    // h2c with prior knowledge, and HTTP/1.1 on the same cleartext listener.
    let (body, last) = curl(&["--http2-prior-knowledge", &format!("http://{h2c}/plain")]);
    assert_eq!(last, "2 200");
    assert_eq!(
        body,
        "GET /plain HTTP/1.1 body=0 framing=length proto=http\n"
    );
    let (body, last) = curl(&["--http2-prior-knowledge", &format!("http://{h2c}/direct")]);
    assert_eq!((body.as_str(), last.as_str()), ("direct\n", "2 200"));
    let out = Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge"])
        .arg(format!("http://{h2c}/big"))
        .output()
        .unwrap();
    assert!(
        out.stdout == big_body(),
        "the 1 MiB answer over h2c arrived changed"
    );
    let (_, last) = curl(&[
        "--http1.1",
        "-o",
        "/dev/null",
        &format!("http://{h2c}/plain"),
    ]);
    assert_eq!(last, "1.1 200");

    // Every HTTP/2 request is logged and counted like any other.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let logged = loop {
        let text = std::fs::read_to_string(&s.log).unwrap_or_default();
        if text.contains("/upload") && text.contains("\"/direct\"")
            || std::time::Instant::now() > deadline
        {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        logged
            .lines()
            .any(|l| l.contains("\"/upload\"") && l.contains("\"status\":200")),
        "{logged}"
    );
    let metrics = s.gw.admin("GET", "/metrics", None).body_str().to_owned();
    let direct = metrics
        .lines()
        .find(|l| l.starts_with("gateway_requests_total{route=\"direct\",class=\"2xx\"}"))
        .unwrap_or_else(|| panic!("no direct route counter: {metrics}"));
    assert!(direct.ends_with(" 1"), "{direct}");
}

/// How an HTTP/1.1-over-TLS answer to `GET path` ended ("close_notify" or
/// "no close_notify"), with its status and body length.
fn tls_end(addr: SocketAddr, ca: &str, path: &str) -> (String, u16, usize) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n");
    let (end, data) = crate::tls::tls_read_all(addr, ca, "a.test", &request);
    let text = String::from_utf8_lossy(&data);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (end, status, body.len())
}

/// curl's exit status, the answer's body and the last line of `-w` (version and status),
/// and what it printed on stderr.
fn curl_status(args: &[&str]) -> (Option<i32>, String, String, String) {
    let o = curl_run(20, "%{http_version} %{http_code}", args, "the HTTP/2 tests");
    (o.code, o.body, o.last, o.stderr)
}

#[test]
fn answers_end_whole_or_visibly_cut_and_interim_ones_reach_http2_clients() {
    let s = setup("h2-framing");
    let (tls, h2c) = (s.gw.listeners[0], s.gw.listeners[1]);
    let ca = s.a.cert.to_str().unwrap();
    let resolve = format!("a.test:{}:127.0.0.1", tls.port());
    let over_tls = |version: &str, path: &str| {
        let url = format!("https://a.test:{}{path}", tls.port());
        curl_status(&[version, "--cacert", ca, "--resolve", &resolve, &url])
    };
    let h2c_url = |path: &str| format!("http://{h2c}{path}");

    // A body the origin ends by closing arrives whole, and ended as such: END_STREAM over
    // HTTP/2, close_notify over TLS (curl does not tell a TLS close without one apart, so
    // HTTP/1.1 over TLS is also read by Python's ssl, which does).
    assert_eq!(
        tls_end(tls, ca, "/close-ok"),
        ("close_notify".to_owned(), 200, 16)
    );
    let (end, status, _) = tls_end(tls, ca, "/close-cut");
    assert!(end != "close_notify" || status != 200, "{end} {status}");
    for (version, proto) in [("--http2", "2 200"), ("--http1.1", "1.1 200")] {
        let (code, body, last, err) = over_tls(version, "/close-ok");
        assert_eq!(
            (code, body.as_str(), last.as_str()),
            (Some(0), "until the close\n", proto),
            "{err}"
        );
    }
    let (code, body, last, err) = curl_status(&["--http2-prior-knowledge", &h2c_url("/close-ok")]);
    assert_eq!(
        (code, body.as_str(), last.as_str()),
        (Some(0), "until the close\n", "2 200"),
        "{err}"
    );
    // Cut by the origin's reset: never a whole 200 to an HTTP/2 client (a 502 if the head
    // had not gone out yet, else a reset stream).
    let (code, body, last, err) = over_tls("--http2", "/close-cut");
    assert!(
        !(code == Some(0) && last.ends_with(" 200")),
        "TLS /close-cut: curl {code:?}, {last}, body {body:?}: {err}"
    );
    let (code, body, last, err) = curl_status(&["--http2-prior-knowledge", &h2c_url("/close-cut")]);
    assert!(
        !(code == Some(0) && last.ends_with(" 200")),
        "h2c /close-cut: curl {code:?}, {last}, body {body:?}: {err}"
    );

    // A transfer coding HTTP/2 cannot carry: 502 (an HTTP/1.1 client gets it as it came).
    let (code, _, last, err) = over_tls("--http2", "/te-gzip");
    assert_eq!((code, last.as_str()), (Some(0), "2 502"), "{err}");
    let (code, _, last, err) = curl_status(&["--http2-prior-knowledge", &h2c_url("/te-gzip")]);
    assert_eq!((code, last.as_str()), (Some(0), "2 502"), "{err}");
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http1.1",
            "--raw",
            "-D",
            "-",
            "--cacert",
            ca,
            "--resolve",
            &resolve,
        ])
        .arg(format!("https://a.test:{}/te-gzip", tls.port()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("transfer-encoding: gzip"),
        "{text}"
    );
    assert!(text.ends_with("not gzip"), "{text}");

    // `Expect: 100-continue` over HTTP/2 gets the gateway's 100 as informational HEADERS
    // (a client waiting for it would otherwise wait out its own timeout first).
    let (code, body, last, err) = curl_status(&[
        "-v",
        "--http2-prior-knowledge",
        "--expect100-timeout",
        "20",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        "hello",
        &h2c_url("/post"),
    ]);
    assert_eq!((code, last.as_str()), (Some(0), "2 200"), "{err}");
    assert_eq!(
        body,
        "POST /post HTTP/1.1 body=5 framing=length proto=http\n"
    );
    assert!(err.contains("< HTTP/2 100"), "{err}");
}

/// Runs h2load and checks that every request succeeded.
fn h2load(args: &[&str]) {
    let out = Command::new("h2load")
        .args(["-n", "100000", "-c", "50", "-m", "10"])
        .args(args)
        .output()
        .expect("h2load is needed (scripts/test installs Debian's nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_else(|| panic!("no summary from h2load: {text}"));
    assert!(
        line.contains("100000 succeeded, 0 failed, 0 errored, 0 timeout"),
        "{line}"
    );
    assert!(text.contains("status codes: 100000 2xx"), "{text}");
}

#[test]
fn h2load_over_tls_and_h2c_has_no_failures() {
    let s = setup("h2-load");
    h2load(&[&format!(
        "https://127.0.0.1:{}/direct",
        s.gw.listeners[0].port()
    )]);
    h2load(&[&format!("http://{}/direct", s.gw.listeners[1])]);
}

#[test]
fn attacks_get_the_right_goaway_or_reset_and_others_are_served() {
    let s = setup("h2-attacks");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/h2_attacks.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(s.gw.listeners[1].to_string())
        .arg("/slow")
        .arg("/slower")
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.trim_end().ends_with("0 failed"), "{text}");
    assert!(
        text.lines().filter(|l| l.starts_with("PASS")).count() >= 25,
        "{text}"
    );
}

#[test]
fn a_body_against_its_content_length_is_a_bad_request_not_a_client_gone() {
    // `content-length: 10` and 5 bytes of DATA with END_STREAM, or 3 and 5: malformed (RFC
    // 9113 8.1.1), h2 resets the stream, and the log says `bad_request` (before:
    // `client_closed`, 499); also where the body is read whole first, for retries (the
    // review found those still 499). A client's own RST_STREAM(PROTOCOL_ERROR) mid-body
    // stays a 499.
    let origin = origin();
    let dir = temp_dir("h2-short-body");
    let log = dir.join("access.log");
    let config = format!(
        "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\nh2c = true\n\
         [[upstreams]]\nid = \"o\"\ntargets = [{{ address = \"{0}\" }}]\n\
         [[upstreams]]\nid = \"ro\"\ntargets = [{{ address = \"{0}\" }}]\n\
         retry = {{ attempts = 2, on = [\"connect\"], methods = \"all\" }}\n\
         [[routes]]\nid = \"ro\"\npath_prefix = \"/ro\"\nupstream = \"ro\"\n\
         [[routes]]\nid = \"all\"\npath_prefix = \"/\"\nupstream = \"o\"\n\
         [access_log]\npath = \"{1}\"\n",
        origin.addr,
        log.display()
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    run_h2_client(
        gw.listeners[0],
        r#"
c.send_headers(1, [(":method", "POST"), (":path", "/short"), (":scheme", "http"),
                   (":authority", "t"), ("content-length", "10")])
c.send_data(1, b"12345", end_stream=True)
s.sendall(c.data_to_send())
time.sleep(0.3)
c.send_headers(3, [(":method", "POST"), (":path", "/long"), (":scheme", "http"),
                   (":authority", "t"), ("content-length", "3")])
c.send_data(3, b"12345", end_stream=True)
s.sendall(c.data_to_send())
time.sleep(0.3)
c.send_headers(5, [(":method", "POST"), (":path", "/ro/short"), (":scheme", "http"),
                   (":authority", "t"), ("content-length", "10")])
c.send_data(5, b"12345", end_stream=True)
s.sendall(c.data_to_send())
time.sleep(0.3)
c.send_headers(7, [(":method", "POST"), (":path", "/cancelled"), (":scheme", "http"),
                   (":authority", "t"), ("content-length", "10")])
c.send_data(7, b"12345")
s.sendall(c.data_to_send())
time.sleep(0.3)
c.reset_stream(7, error_code=1)
s.sendall(c.data_to_send())
time.sleep(0.3)
c.send_headers(9, [(":method", "POST"), (":path", "/goaway"), (":scheme", "http"),
                   (":authority", "t"), ("content-length", "10")])
c.send_data(9, b"12345")
s.sendall(c.data_to_send())
time.sleep(0.3)
# DATA on stream 0: a connection error, h2's GOAWAY ends the stream mid-body.
s.sendall(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
"#,
    );
    let lines = wait_log_lines(&log, 5);
    for (l, path) in lines.iter().zip(["/short", "/long", "/ro/short"]) {
        assert_eq!(l["path"], path, "{l}");
        assert_eq!(l["error"], "bad_request", "{l}");
        assert_eq!(l["status"], 400, "{l}");
    }
    // The client's reset, and h2's GOAWAY for the connection (the review found an upload
    // ended by it logged 400): the client gone.
    for (l, path) in lines[3..].iter().zip(["/cancelled", "/goaway"]) {
        assert_eq!(l["path"], path, "{l}");
        assert_eq!(l["status"], 499, "{l}");
    }
}

#[test]
fn a_retry_its_client_cancels_during_the_backoff_gives_its_budget_back() {
    // Nothing listens at either target: each try fails to connect, and a retry waits 1.5 s.
    // The budget allows one retry a second. An HTTP/2 client's first try fails, its retry
    // takes the budget's token, and the client resets the stream during the wait: the retry
    // is not sent, and its token goes back, so the next request's retry is allowed (before:
    // the token was spent on nothing, and the next retry denied).
    let (a, b) = (closed_port(), closed_port());
    let config = format!(
        "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\nh2c = true\n\
         [[upstreams]]\nid = \"r\"\ntargets = [{{ address = \"{a}\" }}, {{ address = \"{b}\" }}]\n\
         retry = {{ attempts = 3, on = [\"connect\"], methods = \"all\", backoff_ms = 1500, \
         max_backoff_ms = 3000, budget_percent = 0, budget_min_per_s = 1 }}\n\
         [[routes]]\nid = \"all\"\npath_prefix = \"/\"\nupstream = \"r\"\n"
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    run_h2_client(
        gw.listeners[0],
        r#"
c.send_headers(1, [(":method", "GET"), (":path", "/first"), (":scheme", "http"),
                   (":authority", "t")], end_stream=True)
s.sendall(c.data_to_send())
time.sleep(0.2)
c.reset_stream(1, error_code=8)
s.sendall(c.data_to_send())
"#,
    );
    let r = Client::connect(gw.listeners[0]).roundtrip("GET /second HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 502, "{}", r.head);
    let metrics = gw.admin("GET", "/metrics", None).body_str().to_owned();
    let denied = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gateway_retry_budget_denied_total{upstream=\"r\"} "))
        .unwrap_or("0");
    assert_eq!(denied, "0", "{metrics}");
}

#[test]
fn a_reset_stream_gives_up_its_upstream_connect_at_once() {
    // A target whose accept queue is full: connects hang until `upstream_connect_ms`. Ten
    // streams, each reset 100 ms after its HEADERS: each exchange ends with the reset, its
    // connect with it (before: each held its connect, a socket, until the connect timeout,
    // so one connection could hold thousands of upstream connects by opening and resetting
    // streams; logged 499 `connect_timeout` after 4 s).
    let stuck = StuckTarget::start();
    let stuck_addr = stuck.addr;
    let dir = temp_dir("h2-reset-connect");
    let log = dir.join("access.log");
    let config = format!(
        "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\nh2c = true\n\
         [timeouts]\nupstream_connect_ms = 4000\n\
         [[upstreams]]\nid = \"stuck\"\ntargets = [{{ address = \"{stuck_addr}\" }}]\n\
         [[routes]]\nid = \"all\"\npath_prefix = \"/\"\nupstream = \"stuck\"\n\
         [access_log]\npath = \"{}\"\n",
        log.display()
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    run_h2_client(
        gw.listeners[0],
        r#"
for i in range(10):
    sid = 1 + 2 * i
    c.send_headers(sid, [(":method", "GET"), (":path", "/r%d" % i), (":scheme", "http"),
                         (":authority", "t")], end_stream=True)
    s.sendall(c.data_to_send())
    time.sleep(0.1)
    c.reset_stream(sid, error_code=8)
    s.sendall(c.data_to_send())
"#,
    );
    let lines = wait_log_lines(&log, 10);
    for l in &lines {
        assert_eq!(l["status"], 499, "{l}");
        assert_eq!(l["error"], "client_closed", "{l}");
        let ms = l["duration_ms"].as_f64().unwrap_or(f64::MAX);
        assert!(ms < 2000.0, "{l}");
    }
    drop(stuck);
}

#[test]
fn a_shut_window_or_an_unanswered_ping_does_not_hold_a_connection() {
    // A client that keeps its stream window shut stops reading: after `client_send_ms` its
    // stream is reset (and the upstream exchange ends), also when it opens the window a byte
    // at a time. An idle connection whose client never answers the GOAWAY's PING is closed
    // all the same.
    let dir = temp_dir("h2-held");
    let (a, b) = (Cert::new(&dir, "a.test"), Cert::new(&dir, "b.test"));
    let origin = origin();
    let config = format!(
        "{}\n[timeouts]\nclient_send_ms = 1000\nclient_idle_ms = 1000\n",
        config(origin.addr, &a, &b, &dir.join("access.log"))
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/h2_attacks.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg("--held")
        .arg(gw.listeners[1].to_string())
        .arg("/big")
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("PASS")).count(),
        4,
        "{text}"
    );
}

#[test]
fn drain_sends_goaway_and_finishes_open_streams() {
    let mut s = setup("h2-drain");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/h2_attacks.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg("--drain")
        .arg(s.gw.listeners[1].to_string())
        .arg("/slow")
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "READY");
    // The request is at the origin (it answers after a second): now the drain starts.
    std::thread::sleep(Duration::from_millis(200));
    s.gw.signal(libc::SIGTERM);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{rest:?}");
    assert_eq!(
        rest.last().map(String::as_str),
        Some("0 failed"),
        "{rest:?}"
    );
    assert_eq!(s.gw.wait_exit(Duration::from_secs(15)), Some(0));
}

#[test]
fn a_stream_reset_while_its_answer_streams_ends_the_upstream_exchange() {
    // The upstream sends a head and one chunk, then nothing (server-sent events). The client
    // reads the first DATA and resets the stream: the exchange ends at once, its upstream
    // connection closes, instead of staying open until upstream_body_ms (20 s here).
    let (tx, ended) = std::sync::mpsc::channel();
    let ended_tx = std::sync::Mutex::new(tx);
    let origin = Origin::start(Arc::new(move |_req: &Received, s: &mut TcpStream| {
        let _ =
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata:1\r\n");
        let start = std::time::Instant::now();
        let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
        let closed = matches!(std::io::Read::read(s, &mut [0u8; 16]), Ok(0) | Err(_))
            && start.elapsed() < Duration::from_secs(15);
        let _ = ended_tx
            .lock()
            .unwrap()
            .send(closed.then(|| start.elapsed()));
        Keep::Close
    }));
    let gw = h2c_proxy(&origin, "[timeouts]\nupstream_body_ms = 20000\n");
    const CLIENT: &str = r#"
import time
c.send_headers(1, [(":method", "GET"), (":path", "/events"), (":scheme", "http"),
                   (":authority", "t")], end_stream=True)
s.sendall(c.data_to_send())
got = False
while not got:
    for e in c.receive_data(s.recv(65536)):
        if isinstance(e, h2.events.DataReceived):
            got = True
c.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
s.sendall(c.data_to_send())
print("reset", flush=True)
time.sleep(3)
"#;
    let out = h2_client(&gw, CLIENT);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "reset",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = ended.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(
        after.is_some_and(|d| d < Duration::from_secs(5)),
        "upstream connection closed after {after:?} (upstream_body_ms is 20 s)"
    );
}

#[test]
fn a_connection_serves_as_before_once_its_idle_buffers_went_back() {
    // Two 1 MiB answers on one connection, over h2c and over TLS, 1.2 s apart: between them
    // the idle connection gave its write buffers and answer scratch back (at its tick), and
    // the second answer comes whole all the same.
    let s = setup("h2-idle-release");
    let script = r#"
import socket, ssl, sys, time
import h2.config, h2.connection, h2.events
host, port = sys.argv[1].rsplit(":", 1)
sock = socket.create_connection((host, int(port)), timeout=10)
scheme = "http"
if sys.argv[2] != "-":
    ctx = ssl.create_default_context(cafile=sys.argv[2])
    ctx.set_alpn_protocols(["h2"])
    sock = ctx.wrap_socket(sock, server_hostname="a.test")
    scheme = "https"
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
sock.sendall(c.data_to_send())
for sid in (1, 3):
    c.send_headers(sid, [(":method", "GET"), (":path", "/big"), (":scheme", scheme),
                         (":authority", "a.test")], end_stream=True)
    sock.sendall(c.data_to_send())
    body, done = bytearray(), False
    while not done:
        for e in c.receive_data(sock.recv(65536)):
            if isinstance(e, h2.events.DataReceived):
                body += e.data
                c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            done = done or isinstance(e, h2.events.StreamEnded)
        sock.sendall(c.data_to_send())
    want = bytes(i % 251 for i in range(len(body)))
    print(sid, len(body), body == want)
    time.sleep(1.2)
"#;
    let ca = s.a.cert.to_str().unwrap();
    for (addr, ca) in [(s.gw.listeners[1], "-"), (s.gw.listeners[0], ca)] {
        let out = Command::new("python3")
            .args(["-c", script, &addr.to_string(), ca])
            .output()
            .expect("python3 with the PyPI package h2");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.trim(),
            format!("1 {BIG} True\n3 {BIG} True"),
            "{addr}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn an_h2c_preface_that_arrives_in_pieces_is_still_http2() {
    // Split inside `PRI * HTTP/2.0\r\n\r\n`, the preface's part an HTTP/1.1 parser would read
    // as a request line with version 2.0 (a 505 before), and at its end.
    let config = "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\nh2c = true\n\
                  [[routes]]\nid = \"r\"\npath = \"/\"\nrespond = { status = 200 }\n";
    let gw = Gateway::start(config, Driver::IoUring);
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let empty_settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
    for split in [1, 4, 15, 16, 17, 18, 23] {
        let mut s = TcpStream::connect(gw.listeners[0]).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&preface[..split]).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        s.write_all(&preface[split..]).unwrap();
        s.write_all(&empty_settings).unwrap();
        // The server's preface: a SETTINGS frame (type 4) on stream 0.
        let mut frame = [0u8; 9];
        std::io::Read::read_exact(&mut s, &mut frame)
            .unwrap_or_else(|e| panic!("split at {split}: no frame header: {e}"));
        assert_eq!(
            (frame[3], &frame[5..9]),
            (4, &[0u8, 0, 0, 0][..]),
            "split at {split}: {:?}",
            String::from_utf8_lossy(&frame)
        );
    }
}

#[test]
fn request_trailers_go_on_to_an_http1_upstream_in_the_last_chunk() {
    let origin = Origin::echo();
    let gw = h2c_proxy(&origin, "");
    // A body without a length, then trailers, one a framing field an HTTP/1.1 recipient must
    // not take from a trailer.
    const CLIENT: &str = r#"
c.send_headers(1, [(":method", "POST"), (":path", "/up"), (":scheme", "http"),
                   (":authority", "t")])
c.send_data(1, b"hello")
c.send_headers(1, [("x-checksum", "abc"), ("host", "elsewhere")], end_stream=True)
s.sendall(c.data_to_send())
status, done = None, False
while not done:
    for e in c.receive_data(s.recv(65536)):
        if isinstance(e, h2.events.ResponseReceived):
            status = dict(e.headers)[b":status"].decode()
        if isinstance(e, h2.events.StreamEnded):
            done = True
    s.sendall(c.data_to_send())
print(status, flush=True)
"#;
    let out = h2_client(&gw, CLIENT);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = origin.wait_requests(1).remove(0);
    assert!(
        seen.head.contains("Transfer-Encoding: chunked"),
        "{}",
        seen.head
    );
    assert_eq!(
        String::from_utf8_lossy(&seen.raw_body),
        "5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n"
    );
    // A field the gateway sets (a client address) in the trailers: a bad request, as over
    // HTTP/1.1, and the upstream never gets the request whole.
    let forged = CLIENT.replace(
        "(\"host\", \"elsewhere\")",
        "(\"x-forwarded-for\", \"10.1.1.1\")",
    );
    let out = h2_client(&gw, &forged);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "400",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(origin.requests().len(), 1);
}

#[test]
fn a_body_here_whole_goes_with_its_length_and_a_host_that_is_not_the_authority_is_refused() {
    let origin = Origin::echo();
    let gw = h2c_proxy(&origin, "");
    // Stream 1: a GET whose END_STREAM comes on an empty DATA frame; stream 3: a POST whose
    // body comes whole in the same write as its head, without a length; stream 5: a `host`
    // that names another authority than `:authority` (RFC 9113 8.3.1); stream 7: the same
    // host written with the scheme's default port and a trailing dot.
    const CLIENT: &str = r#"
c.config.validate_outbound_headers = False
head = lambda m, p: [(":method", m), (":path", p), (":scheme", "http"), (":authority", "t")]
c.send_headers(1, head("GET", "/empty"))
c.send_data(1, b"", end_stream=True)
c.send_headers(3, head("POST", "/whole"))
c.send_data(3, b"hello", end_stream=True)
c.send_headers(5, head("GET", "/other") + [("host", "elsewhere")], end_stream=True)
c.send_headers(7, head("GET", "/same")[:3] + [(":authority", "t:80"), ("host", "t.")],
               end_stream=True)
s.sendall(c.data_to_send())
out, done = {}, set()
while len(done) < 4:
    for e in c.receive_data(s.recv(65536)):
        if isinstance(e, h2.events.ResponseReceived):
            out[e.stream_id] = dict(e.headers)[b":status"].decode()
        if isinstance(e, h2.events.StreamEnded):
            done.add(e.stream_id)
        if isinstance(e, h2.events.StreamReset):
            out[e.stream_id] = "reset %d" % e.error_code
            done.add(e.stream_id)
    s.sendall(c.data_to_send())
print(out[1], out[3], out[5], out[7], flush=True)
"#;
    let out = h2_client(&gw, CLIENT);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "200 200 reset 1 200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = origin.wait_requests(3);
    seen.retain(|r| !r.head.contains("/same"));
    seen.sort_by_key(|r| r.head.contains("/whole"));
    let (get, post) = (&seen[0], &seen[1]);
    assert!(get.head.starts_with("GET /empty "), "{}", get.head);
    assert!(
        !get.head.to_ascii_lowercase().contains("transfer-encoding"),
        "{}",
        get.head
    );
    assert!(get.raw_body.is_empty(), "{:?}", get.raw_body);
    assert!(post.head.contains("content-length: 5"), "{}", post.head);
    assert!(
        !post.head.to_ascii_lowercase().contains("transfer-encoding"),
        "{}",
        post.head
    );
    assert_eq!(post.raw_body, b"hello");
    // The same host written with the scheme's port and a trailing dot went on.
    assert_eq!(
        origin.requests().len(),
        3,
        "the request with another host never went on"
    );
}

#[test]
fn an_http1_upstreams_answer_trailers_go_on_as_http2_trailers() {
    let origin = Origin::start(Arc::new(|_req: &Received, s: &mut TcpStream| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n\
              5\r\nhello\r\n0\r\nX-Checksum: abc\r\nServer-Timing: db;dur=5\r\n\r\n",
        );
        Keep::Open
    }));
    let gw = h2c_proxy(&origin, "");
    const CLIENT: &str = r#"
c.send_headers(1, [(":method", "GET"), (":path", "/t"), (":scheme", "http"),
                   (":authority", "t")], end_stream=True)
s.sendall(c.data_to_send())
body, trailers, done = b"", None, False
while not done:
    for e in c.receive_data(s.recv(65536)):
        if isinstance(e, h2.events.DataReceived):
            body += e.data
            c.acknowledge_received_data(len(e.data), 1)
        if isinstance(e, h2.events.TrailersReceived):
            trailers = sorted((k.decode(), v.decode()) for k, v in e.headers)
        if isinstance(e, h2.events.StreamEnded):
            done = True
    s.sendall(c.data_to_send())
print(body.decode(), trailers, flush=True)
"#;
    let out = h2_client(&gw, CLIENT);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello [('server-timing', 'db;dur=5'), ('x-checksum', 'abc')]",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_http2_path_is_checked_and_decoded_as_an_http1_one() {
    let origin = Origin::echo();
    let gw = h2c_proxy(&origin, "");
    let url = |path: &str| format!("http://{}{path}", gw.listeners[0]);
    let (_, last) = curl(&["--http2-prior-knowledge", &url("/%6Fk/%7E%2F?q=%6F")]);
    assert_eq!(last, "2 200");
    for path in ["/%zz", "/a%00"] {
        let (_, last) = curl(&["--http2-prior-knowledge", "-o", "/dev/null", &url(path)]);
        assert_eq!(last, "2 400", "{path}");
    }
    let seen = origin.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].request_line(), "GET /ok/~%2F?q=%6F HTTP/1.1");
}

#[test]
fn an_empty_host_or_a_padded_trailer_value_resets_the_stream() {
    let origin = Origin::echo();
    let log = temp_dir("h2-malformed-log").join("access.log");
    let gw = h2c_proxy(
        &origin,
        &format!("[access_log]\npath = \"{}\"\n", log.display()),
    );
    // Each request on its own stream of one connection; the client's own checks are off so
    // it sends what it is told. Prints each stream's end: its reset code or its status.
    const CLIENT: &str = r#"
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
    validate_outbound_headers=False, normalize_outbound_headers=False))
c.initiate_connection()
def head(path, extra=(), authority="t"):
    return [(":method", "POST"), (":scheme", "http"), (":authority", authority),
            (":path", path)] + list(extra)
c.send_headers(1, head("/empty-host", [("host", "")]), end_stream=True)
c.send_headers(3, head("/padded"))
c.send_data(3, b"abc")
c.send_headers(5, head("/fine"))
c.send_data(5, b"abc")
c.send_headers(7, head("/no-port", authority="t:99999"), end_stream=True)
c.send_headers(9, [(":method", "GET"), (":scheme", "http"), (":path", "/bad-host"),
                   ("host", "t u")], end_stream=True)
c.send_headers(3, [("x-sum", " 1 ")], end_stream=True)
c.send_headers(5, [("x-sum", "1")], end_stream=True)
s.sendall(c.data_to_send())
ends = {}
while len(ends) < 5:
    for e in c.receive_data(s.recv(65536)):
        if isinstance(e, h2.events.ResponseReceived):
            ends[e.stream_id] = dict(e.headers)[b":status"].decode()
        if isinstance(e, h2.events.StreamReset):
            ends[e.stream_id] = "reset %d" % e.error_code
    s.sendall(c.data_to_send())
print(sorted(ends.items()), flush=True)
"#;
    let out = h2_client(&gw, CLIENT);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "[(1, 'reset 1'), (3, 'reset 1'), (5, '200'), (7, '400'), (9, '400')]",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Only the well-formed request reached the origin whole, its trailer in the last chunk.
    let seen = origin.wait_requests(1);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].request_line(), "POST /fine HTTP/1.1");
    assert_eq!(seen[0].raw_body, b"3\r\nabc\r\n0\r\nx-sum: 1\r\n\r\n");
    // The malformed request is logged as a malformed HTTP/1.1 one is, though its answer is
    // the reset (before: no line at all).
    let lines = wait_log_lines(&log, 5);
    let refused = lines
        .iter()
        .find(|l| l["path"] == "/empty-host")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(
        (&refused["status"], &refused["error"], &refused["method"]),
        (
            &serde_json::json!(400),
            &serde_json::json!("bad_request"),
            &serde_json::json!("POST")
        ),
        "{refused}"
    );
}

#[test]
fn an_early_answer_reaches_an_http2_client_that_pauses_mid_body() {
    let origin = crate::proxy::head_only_origin(crate::proxy::refuse_and_close);
    let config = format!(
        "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\nh2c = true\n\
         [[upstreams]]\nid = \"o\"\ntargets = [{{ address = \"{origin}\" }}]\n\
         [[routes]]\nid = \"all\"\npath_prefix = \"/\"\nupstream = \"o\"\n"
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    // Five bytes of a hundred, then a pause (the socket's timeout ends a wait for nothing).
    const CLIENT: &str = r#"
c.send_headers(1, [(":method", "POST"), (":path", "/upload"), (":scheme", "http"),
                   (":authority", "t"), ("content-length", "100")])
c.send_data(1, b"hello")
s.sendall(c.data_to_send())
status, body, done = None, b"", False
while not done:
    for e in c.receive_data(s.recv(65536)):
        if isinstance(e, h2.events.ResponseReceived):
            status = dict(e.headers)[b":status"].decode()
        if isinstance(e, h2.events.DataReceived):
            body += e.data
        if isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)):
            done = True
    s.sendall(c.data_to_send())
print(status, body.decode(), flush=True)
"#;
    let out = h2_client(&gw, CLIENT);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "413 too big!",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_stream_reset_after_its_head_went_out_is_logged_with_the_status_sent() {
    // The client takes the head and its first window of a 1 MiB body, then resets the
    // stream: the answer's status reached it, so the log keeps it (as over HTTP/1.1), with
    // the head's bytes, and says the client left. Before: 499 and 0 bytes, when the first
    // piece of the body went apart from the head.
    // Head and body in one write: the gateway's first read holds a large piece of the body.
    let origin = Origin::start(Arc::new(|_req: &Received, s: &mut TcpStream| {
        let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n").into_bytes();
        answer.extend(big_body());
        let _ = s.write_all(&answer);
        Keep::Close
    }));
    let dir = temp_dir("h2-reset-log");
    let log = dir.join("access.log");
    let gw = h2c_proxy(
        &origin,
        &format!("[access_log]\npath = \"{}\"\n", log.display()),
    );
    const CLIENT: &str = r#"
c.send_headers(1, [(":method", "GET"), (":path", "/big"), (":scheme", "http"),
                   (":authority", "t")], end_stream=True)
s.sendall(c.data_to_send())
status, got = None, 0
while got < 65535:
    for e in c.receive_data(s.recv(65536)):
        if isinstance(e, h2.events.ResponseReceived):
            status = dict(e.headers)[b":status"].decode()
        if isinstance(e, h2.events.DataReceived):
            got += len(e.data)
c.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
s.sendall(c.data_to_send())
print(status, got, flush=True)
"#;
    let out = h2_client(&gw, CLIENT);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "200 65535",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = &wait_log_lines(&log, 1)[0];
    assert_eq!(
        (&line["status"], &line["error"]),
        (&serde_json::json!(200), &serde_json::json!("client_closed")),
        "{line}"
    );
    assert!(line["bytes_out"].as_u64().unwrap() > 0, "{line}");
}

/// A gateway with an `h2c` listener whose one route proxies everything to `origin`.
fn h2c_proxy(origin: &Origin, extra: &str) -> Gateway {
    let config = format!(
        "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\nh2c = true\n\
         [[upstreams]]\nid = \"o\"\ntargets = [{{ address = \"{}\" }}]\n\
         [[routes]]\nid = \"all\"\npath_prefix = \"/\"\nupstream = \"o\"\n{extra}",
        origin.addr
    );
    Gateway::start(&config, Driver::IoUring)
}

/// Runs `script` (Python, the PyPI package h2) with `s` a socket to the gateway's first
/// listener and `c` an HTTP/2 client connection on it, preface sent.
pub(crate) fn h2_client(gw: &Gateway, script: &str) -> std::process::Output {
    const PREAMBLE: &str = "import socket, sys\n\
        import h2.connection, h2.config, h2.events, h2.errors\n\
        s = socket.create_connection((\"127.0.0.1\", int(sys.argv[1])), timeout=10)\n\
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))\n\
        c.initiate_connection()\n";
    Command::new("python3")
        .args(["-c", &format!("{PREAMBLE}{script}")])
        .arg(gw.listeners[0].port().to_string())
        .output()
        .expect("python3 with the PyPI package h2 is needed for the HTTP/2 tests")
}
