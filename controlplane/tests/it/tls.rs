//! TLS on listeners through the real binary, with curl and `openssl s_client` as clients:
//! SNI picks among two certificates, 421 on a Host that is not the SNI name,
//! `X-Forwarded-Proto: https`, certificates managed through the admin API (key stored 0600
//! and never shown, a replaced certificate served to the next handshake while an open
//! connection goes on), handshake failures counted, sessions resumed over TLS 1.2 and 1.3, and
//! the conformance cases over TLS.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

both_drivers!(sni_chooses_the_certificate_and_host_must_match);

/// A self-signed certificate for `name` and `*.name` (P-256, or RSA), made by the openssl
/// CLI.
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Cert {
    pub fn new(dir: &Path, name: &str) -> Cert {
        Self::made(
            dir,
            name,
            "",
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        )
    }

    /// The same for an RSA 2048 key.
    pub fn new_rsa(dir: &Path, name: &str) -> Cert {
        Self::made(dir, name, "-rsa", &["-newkey", "rsa:2048"])
    }

    /// A self-signed P-256 certificate in `FILE.pem` with `subject` (`/CN=...`) and the
    /// subjectAltName `names` (`URI:spiffe://...`), as client certificates have them.
    pub fn with_names(dir: &Path, file: &str, subject: &str, names: &str) -> Cert {
        Self::with_extensions(dir, file, subject, &[&format!("subjectAltName={names}")])
    }

    /// A self-signed P-256 certificate in `FILE.pem` with `subject` and these X.509v3
    /// `extensions` (`-addext` values, such as `extendedKeyUsage=clientAuth`).
    pub fn with_extensions(dir: &Path, file: &str, subject: &str, extensions: &[&str]) -> Cert {
        let key_args = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];
        Self::make(dir, file, subject, extensions, &key_args)
    }

    fn made(dir: &Path, name: &str, suffix: &str, key_args: &[&str]) -> Cert {
        let subject = format!("/CN={name}");
        let names = format!("subjectAltName=DNS:{name},DNS:*.{name}");
        Self::make(
            dir,
            &format!("{name}{suffix}"),
            &subject,
            &[&names],
            key_args,
        )
    }

    fn make(dir: &Path, file: &str, subject: &str, extensions: &[&str], key_args: &[&str]) -> Cert {
        let cert = dir.join(format!("{file}.pem"));
        let key = dir.join(format!("{file}.key"));
        let mut args = vec!["req", "-x509"];
        args.extend_from_slice(key_args);
        args.extend_from_slice(&["-nodes", "-days", "30", "-keyout"]);
        args.extend_from_slice(&[key.to_str().unwrap(), "-out", cert.to_str().unwrap()]);
        args.extend_from_slice(&["-subj", subject]);
        for e in extensions {
            args.extend_from_slice(&["-addext", e]);
        }
        openssl(dir, &args);
        Cert { cert, key }
    }

    pub fn cert_pem(&self) -> String {
        std::fs::read_to_string(&self.cert).unwrap()
    }

    pub fn key_pem(&self) -> String {
        std::fs::read_to_string(&self.key).unwrap()
    }
}

/// Runs curl over TLS to `url` resolving `name` to `addr`, trusting `ca`; returns
/// (status or 0, body, stderr).
pub fn curl_tls(
    addr: std::net::SocketAddr,
    name: &str,
    path: &str,
    ca: &Path,
    extra: &[&str],
) -> (u16, String, String) {
    let resolve = format!("{name}:{}:127.0.0.1", addr.port());
    let url = format!("https://{name}:{}{path}", addr.port());
    let mut args = vec!["--cacert", ca.to_str().unwrap(), "--resolve", &resolve];
    args.extend_from_slice(extra);
    args.push(&url);
    let o = curl_run(10, "%{http_code}", &args, "the TLS tests");
    (o.last.trim().parse().unwrap_or(0), o.body, o.stderr)
}

/// Sends `request` over TLS (SNI `name`, trusting `ca`) and reads until the connection ends,
/// with Python's ssl reporting a ragged end: "close_notify" when the gateway ended with one,
/// "no close_notify" when TCP ended without it; with everything read.
pub fn tls_read_all(
    addr: std::net::SocketAddr,
    ca: &str,
    name: &str,
    request: &str,
) -> (String, Vec<u8>) {
    TlsReader::spawn(addr, ca, name, request).finish()
}

/// [`tls_read_all`] running in the background, for a test that acts on the gateway once the
/// first answer's bytes are in ([`TlsReader::wait_answered`]).
pub struct TlsReader {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl TlsReader {
    pub fn spawn(addr: std::net::SocketAddr, ca: &str, name: &str, request: &str) -> TlsReader {
        // Prints "got" once the first bytes arrive (or the end, if none do), then the way
        // the connection ended and everything read.
        const SCRIPT: &str = r#"
import socket, ssl, sys
port, ca, name = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
raw = socket.create_connection(("127.0.0.1", port), timeout=10)
s = ctx.wrap_socket(raw, server_hostname=name, suppress_ragged_eofs=False)
s.sendall(sys.stdin.buffer.read())
data, end, told = b"", "close_notify", False
try:
    while True:
        chunk = s.recv(65536)
        if not told:
            sys.stdout.write("got\n")
            sys.stdout.flush()
            told = True
        if not chunk:
            break
        data += chunk
except (ssl.SSLEOFError, ConnectionResetError):
    end = "no close_notify"
if not told:
    sys.stdout.write("got\n")
sys.stdout.buffer.write(end.encode() + b"\n" + data)
"#;
        let mut child = Command::new("python3")
            .args(["-c", SCRIPT, &addr.port().to_string(), ca, name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 is needed for the TLS tests");
        // Dropping stdin ends it, so the script's read of the request returns.
        child
            .stdin
            .take()
            .unwrap()
            .write_all(request.as_bytes())
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        TlsReader { child, out }
    }

    /// Waits until the first bytes of the answer arrived (or the connection ended).
    pub fn wait_answered(&mut self) {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        assert_eq!(line, "got\n", "the TLS reader failed: {}", self.stderr());
    }

    fn stderr(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        err
    }

    /// How the connection ended and everything read.
    pub fn finish(mut self) -> (String, Vec<u8>) {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        if line == "got\n" {
            line.clear();
            self.out.read_line(&mut line).unwrap();
        }
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut self.out, &mut data).unwrap();
        let _ = self.child.wait();
        if !line.ends_with('\n') {
            panic!("the TLS reader failed: {}", self.stderr());
        }
        (line.trim_end().to_owned(), data)
    }
}

/// The subject line `openssl s_client` prints for the certificate the gateway presents to a
/// client sending `servername` (`None`: no SNI).
fn presented_subject(addr: std::net::SocketAddr, servername: Option<&str>) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &addr.to_string()]);
    match servername {
        Some(n) => cmd.args(["-servername", n]),
        None => cmd.arg("-noservername"),
    };
    let out = cmd.stdin(Stdio::null()).output().expect("openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_else(|| panic!("no subject in s_client output: {text}"))
        .to_owned()
}

fn tls_config(origin: std::net::SocketAddr, a: &Cert, b: &Cert) -> String {
    format!(
        r#"workers = 1

[[listeners]]
address = "127.0.0.1:0"
tls = {{ certificates = ["a", "b"], alpn = ["http/1.1"] }}

[[listeners]]
address = "127.0.0.1:0"

[[upstreams]]
id = "origin"
targets = [{{ address = "{origin}" }}]

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
cert_pem = """{}"""
key_pem = """{}"""
"#,
        a.cert.display(),
        a.key.display(),
        b.cert_pem(),
        b.key_pem(),
    )
}

fn metric(gw: &Gateway, line_prefix: &str) -> u64 {
    let text = gw.admin("GET", "/metrics", None).body_str().to_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_prefix} in /metrics"))
}

fn sni_chooses_the_certificate_and_host_must_match(driver: Driver) {
    let dir = temp_dir("tls-sni");
    let (a, b) = (Cert::new(&dir, "a.test"), Cert::new(&dir, "b.test"));
    let origin = Origin::echo();
    let log = dir.join("access.log");
    let config = format!(
        "{}\n[access_log]\npath = \"{}\"\n",
        tls_config(origin.addr, &a, &b),
        log.display()
    );
    let gw = Gateway::start(&config, driver);
    let tls = gw.listeners[0];

    // Each name gets its own certificate: curl verifies it against that one only.
    let (code, body, err) = curl_tls(tls, "a.test", "/one", &a.cert, &[]);
    assert_eq!((code, body.as_str()), (200, "origin saw /one"), "{err}");
    let (code, body, err) = curl_tls(tls, "api.b.test", "/two", &b.cert, &[]);
    assert_eq!((code, body.as_str()), (200, "origin saw /two"), "{err}");
    // The wrong trust anchor fails: the certificate really is b's.
    let (code, _, _) = curl_tls(tls, "b.test", "/", &a.cert, &[]);
    assert_eq!(code, 0);

    assert!(presented_subject(tls, Some("b.test")).contains("b.test"));
    assert!(presented_subject(tls, Some("x.a.test")).contains("a.test"));
    // No SNI, or a name no certificate has: the listener's first certificate.
    assert!(presented_subject(tls, None).contains("a.test"));
    assert!(presented_subject(tls, Some("other.example")).contains("a.test"));

    // A Host that is not the SNI name: 421, and the origin never sees it.
    let seen = origin.requests().len();
    let (code, body, _) = curl_tls(tls, "a.test", "/", &a.cert, &["-H", "Host: b.test"]);
    assert_eq!(code, 421, "{body}");
    assert_eq!(origin.requests().len(), seen);
    // Logged whole, with the request's own fields (the first two lines are the 200s).
    let line = wait_log_lines(&log, 3).remove(2);
    assert_eq!(
        (
            line["status"].as_u64(),
            line["method"].as_str(),
            line["host"].as_str()
        ),
        (Some(421), Some("GET"), Some("b.test")),
        "{line}"
    );
    // The same name with a port and in another case is the same host.
    let (code, _, _) = curl_tls(tls, "a.test", "/", &a.cert, &["-H", "Host: A.Test:443"]);
    assert_eq!(code, 200);

    // The origin hears that the client used https.
    let req = origin.requests().pop().unwrap();
    assert_eq!(req.header("x-forwarded-proto"), Some("https"));

    // Keep-alive over TLS: two requests, one connection.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{num_connects} ",
        ])
        .arg("--cacert")
        .arg(&a.cert)
        .args(["--resolve", &format!("a.test:{}:127.0.0.1", tls.port())])
        .arg(format!("https://a.test:{}/k1", tls.port()))
        .arg(format!("https://a.test:{}/k2", tls.port()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1 0");

    // Cleartext HTTP on the TLS port is a failed handshake, counted by reason; the
    // cleartext listener beside it still serves.
    let before = metric(&gw, "gateway_tls_handshakes_total{result=\"bad_message\"}");
    let mut c = std::net::TcpStream::connect(tls).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = Vec::new();
    // A TLS alert, then the close (a timeout here would be an error).
    std::io::Read::read_to_end(&mut c, &mut answer).unwrap();
    assert_eq!(answer.first(), Some(&0x15), "{answer:?}");
    let after = metric(&gw, "gateway_tls_handshakes_total{result=\"bad_message\"}");
    assert_eq!(after, before + 1);
    assert!(metric(&gw, "gateway_tls_handshakes_total{result=\"ok\"}") >= 8);
    // Expiry as a gauge: 30 days from now, give or take the test's own run time.
    let expires = metric(
        &gw,
        "gateway_certificate_not_after_seconds{certificate=\"b\"}",
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (now + 29 * 86_400..now + 31 * 86_400).contains(&expires),
        "{expires}"
    );
    let mut plain = Client::connect(gw.listeners[1]);
    let r = plain.roundtrip("GET /plain HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(
        origin.requests().pop().unwrap().header("x-forwarded-proto"),
        Some("http")
    );
}

#[test]
fn a_silent_client_is_dropped_at_the_handshake_timeout() {
    let dir = temp_dir("tls-timeout");
    let (a, b) = (Cert::new(&dir, "a.test"), Cert::new(&dir, "b.test"));
    let origin = Origin::echo();
    let config = format!(
        "{}\n[timeouts]\ntls_handshake_ms = 300\n",
        tls_config(origin.addr, &a, &b)
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    let mut c = Client::connect(gw.listeners[0]);
    let started = Instant::now();
    assert!(c.is_closed_within(Duration::from_secs(5)));
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(
        metric(&gw, "gateway_tls_handshakes_total{result=\"timeout\"}"),
        1
    );
}

#[test]
fn min_version_1_3_refuses_tls_1_2() {
    let dir = temp_dir("tls-min");
    let (a, b) = (Cert::new(&dir, "a.test"), Cert::new(&dir, "b.test"));
    let origin = lines_origin();
    let config = tls_config(origin.addr, &a, &b).replace(
        "alpn = [\"http/1.1\"] }",
        "alpn = [\"http/1.1\"], min_version = \"1.3\" }",
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    let tls = gw.listeners[0];
    let (code, _, _) = curl_tls(tls, "a.test", "/", &a.cert, &["--tls-max", "1.2"]);
    assert_eq!(code, 0, "a TLS 1.2 client must be refused");
    assert_eq!(
        metric(&gw, "gateway_tls_handshakes_total{result=\"incompatible\"}"),
        1
    );
    let (code, body, err) = curl_tls(tls, "a.test", "/v13", &a.cert, &["--tlsv1.3"]);
    assert_eq!((code, body.as_str()), (200, "origin saw /v13\n"), "{err}");
    // A version the gateway does not offer is refused, naming the field.
    let mut config = gw.admin("GET", "/v1/config", None).json();
    config["listeners"][0]["tls"]["min_version"] = serde_json::json!("1.1");
    let r = gw.admin("PUT", "/v1/config", Some(&config.to_string()));
    assert_eq!(r.status, 422, "{}", r.body_str());
    assert!(
        r.body_str()
            .contains("\"pointer\":\"/listeners/0/tls/min_version\""),
        "{}",
        r.body_str()
    );
}

/// One request with `openssl s_client` (`version`: `-tls1_2` or `-tls1_3`), saving the session
/// to `sess_out` or resuming `sess_in`: its output.
#[test]
fn a_listener_that_takes_tls_up_ends_its_cleartext_connections() {
    // The cleartext listener (h2c too) gets TLS at runtime: a keep-alive HTTP/1.1
    // connection's next request is answered with `Connection: close` and the connection
    // ends; an h2c connection gets a GOAWAY (before: both went on in cleartext for good).
    let origin = Origin::echo();
    let dir = temp_dir("tls-taken-up");
    let (a, b) = (Cert::new(&dir, "a.test"), Cert::new(&dir, "b.test"));
    let text = tls_config(origin.addr, &a, &b).replacen(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[[upstreams]]",
        "[[listeners]]\naddress = \"127.0.0.1:0\"\nh2c = true\n\n[[upstreams]]",
        1,
    );
    let gw = Gateway::start(&text, Driver::IoUring);
    let clear = gw.listeners[1];
    let mut c = Client::connect(clear);
    assert_eq!(
        c.roundtrip("GET /x HTTP/1.1\r\nHost: a\r\n\r\n").status,
        200
    );
    let mut config = gw.admin("GET", "/v1/config", None).json();
    config["listeners"][1]["h2c"] = serde_json::json!(false);
    config["listeners"][1]["tls"] = serde_json::json!({"certificates": ["a"]});
    // An h2c client that has been answered once makes the change itself, then waits for
    // its GOAWAY.
    run_h2_client(
        clear,
        &format!(
            r#"import json, urllib.request, h2.events, h2.exceptions
c.send_headers(1, [(":method", "GET"), (":path", "/x"), (":scheme", "http"),
                   (":authority", "a")], end_stream=True)
s.sendall(c.data_to_send())
done = False
while not done:
    for e in c.receive_data(s.recv(65536)):
        done = done or isinstance(e, h2.events.StreamEnded)
    s.sendall(c.data_to_send())
put = urllib.request.Request("http://{admin}/v1/config", data=bytes.fromhex("{body}"),
                             method="PUT", headers={{"Authorization": "Bearer {ADMIN_TOKEN}",
                                                     "Content-Type": "application/json"}})
assert urllib.request.urlopen(put).status == 200
started, gone = time.time(), False
while not gone and time.time() - started < 5:
    data = s.recv(65536)
    if not data:
        break
    try:
        for e in c.receive_data(data):
            gone = gone or isinstance(e, h2.events.ConnectionTerminated)
    except h2.exceptions.ProtocolError:
        # The GOAWAY closed h2's side; the PING behind it (in the same read) is refused.
        gone = c.state_machine.state == h2.connection.ConnectionState.CLOSED
        assert gone
    s.sendall(c.data_to_send())
assert gone, "no GOAWAY within 5 s"
"#,
            admin = gw.admin,
            body = config
                .to_string()
                .bytes()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
        ),
    );
    let r = c.roundtrip("GET /y HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(c.is_closed_within(Duration::from_secs(5)));
    // New connections there speak TLS.
    let (status, _, err) = curl_tls(clear, "a.test", "/z", &a.cert, &[]);
    assert_eq!(status, 200, "{err}");
}

fn s_client_request(addr: std::net::SocketAddr, version: &str, session: (&str, &Path)) -> String {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            version,
            "-ign_eof",
            "-servername",
            "a.test",
            "-connect",
        ])
        .arg(addr.to_string())
        .arg(session.0)
        .arg(session.1)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET /resume HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let out = child.wait_with_output().expect("openssl s_client");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn sessions_resume_over_tls_1_2_and_1_3() {
    let dir = temp_dir("tls-resume");
    let (a, b) = (Cert::new(&dir, "a.test"), Cert::new(&dir, "b.test"));
    let origin = lines_origin();
    let gw = Gateway::start(&tls_config(origin.addr, &a, &b), Driver::IoUring);
    let tls = gw.listeners[0];
    // TLS 1.3 tickets go out as the handshake ends: a client that has sent nothing gets them
    // (before, they waited for the first answer, and a client's first request waited for
    // the ACK of its Finished: 40 ms with Nagle on).
    let tickets = Command::new("python3")
        .args([
            "-c",
            "import select, socket, ssl, sys\n\
             ctx = ssl.create_default_context(cafile=sys.argv[2])\n\
             ctx.minimum_version = ssl.TLSVersion.TLSv1_3\n\
             s = ctx.wrap_socket(socket.create_connection(('127.0.0.1', int(sys.argv[1]))), \
             server_hostname='a.test')\n\
             ready, _, _ = select.select([s], [], [], 5)\n\
             print('tickets' if ready else 'nothing')\n",
            &tls.port().to_string(),
            a.cert.to_str().unwrap(),
        ])
        .output()
        .expect("python3");
    assert_eq!(
        String::from_utf8_lossy(&tickets.stdout).trim(),
        "tickets",
        "{}",
        String::from_utf8_lossy(&tickets.stderr)
    );
    // A client whose first request comes in the same write as its Finished gets tickets and
    // its answer, and resumes with one of the tickets.
    let coalesced = Command::new("python3")
        .args([
            "-c",
            "import socket, ssl, sys\n\
             ctx = ssl.create_default_context(cafile=sys.argv[2])\n\
             ctx.minimum_version = ssl.TLSVersion.TLSv1_3\n\
             def run(session):\n\
             \x20   sock = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5)\n\
             \x20   inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()\n\
             \x20   tls = ctx.wrap_bio(inc, out, server_hostname='a.test', session=session)\n\
             \x20   while True:\n\
             \x20       try:\n\
             \x20           tls.do_handshake()\n\
             \x20           break\n\
             \x20       except ssl.SSLWantReadError:\n\
             \x20           sock.sendall(out.read())\n\
             \x20           inc.write(sock.recv(65536))\n\
             \x20   tls.write(b'GET /resume HTTP/1.1\\r\\nHost: a.test\\r\\nConnection: close\\r\\n\\r\\n')\n\
             \x20   sock.sendall(out.read())\n\
             \x20   body = b''\n\
             \x20   while True:\n\
             \x20       try:\n\
             \x20           chunk = tls.read(65536)\n\
             \x20           if not chunk:\n\
             \x20               break\n\
             \x20           body += chunk\n\
             \x20       except ssl.SSLWantReadError:\n\
             \x20           data = sock.recv(65536)\n\
             \x20           if not data:\n\
             \x20               break\n\
             \x20           inc.write(data)\n\
             \x20       except (ssl.SSLZeroReturnError, ssl.SSLEOFError):\n\
             \x20           break\n\
             \x20   return tls, b'origin saw /resume' in body\n\
             first, answered = run(None)\n\
             again, answered_again = run(first.session)\n\
             print(answered, first.session.has_ticket, answered_again, again.session_reused)\n",
            &tls.port().to_string(),
            a.cert.to_str().unwrap(),
        ])
        .output()
        .expect("python3");
    assert_eq!(
        String::from_utf8_lossy(&coalesced.stdout).trim(),
        "True True True True",
        "{}",
        String::from_utf8_lossy(&coalesced.stderr)
    );
    let mut changes = 0;
    for (version, name) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
        let sess = dir.join(format!("session{version}.pem"));
        let first = s_client_request(tls, version, ("-sess_out", &sess));
        assert!(first.contains("origin saw /resume"), "{first}");
        assert!(first.contains(&format!("New, {name}")), "{first}");
        // Dry runs with other certificate lists for the listener (each compiles session
        // state of its own) do not push out the live config's: before, three of them made
        // the next change start every client over with a full handshake.
        let config = gw.admin("GET", "/v1/config", None).json();
        for list in [["b", "a"].as_slice(), &["a"], &["b"]] {
            let mut other = config.clone();
            other["listeners"][0]["tls"]["certificates"] = serde_json::json!(list);
            let r = gw.admin("PUT", "/v1/config?dry_run=true", Some(&other.to_string()));
            assert_eq!(r.status, 200, "{}", r.body_str());
        }
        // Sessions outlive a config change (a route added) and, for TLS 1.3 (tickets), 150
        // other clients' sessions (the first build kept 128 clients' tickets at most).
        changes += 1;
        let r = gw.admin(
            "PUT",
            &format!("/v1/routes/r{changes}"),
            Some(&format!(
                r#"{{"path":"/r{changes}","respond":{{"body":"r"}}}}"#
            )),
        );
        assert_eq!(r.status, 201, "{}", r.body_str());
        let others = Command::new("python3")
            .args([
                "-c",
                "import socket, ssl, sys\n\
                 ctx = ssl.create_default_context(cafile=sys.argv[2])\n\
                 for _ in range(int(sys.argv[3])):\n    \
                 s = ctx.wrap_socket(socket.create_connection(('127.0.0.1', int(sys.argv[1]))), \
                 server_hostname='a.test')\n    \
                 s.sendall(b'GET /x HTTP/1.1\\r\\nHost: a.test\\r\\nConnection: close\\r\\n\\r\\n')\n    \
                 while s.recv(65536): pass\n    \
                 s.close()\n",
                &tls.port().to_string(),
                a.cert.to_str().unwrap(),
                if version == "-tls1_3" { "150" } else { "0" },
            ])
            .output()
            .expect("python3");
        assert!(
            others.status.success(),
            "{}",
            String::from_utf8_lossy(&others.stderr)
        );
        let again = s_client_request(tls, version, ("-sess_in", &sess));
        assert!(again.contains("origin saw /resume"), "{again}");
        assert!(
            again.contains(&format!("Reused, {name}")),
            "the {name} session was not resumed: {again}"
        );
        if version == "-tls1_3" {
            // Two tickets after a full handshake; one after a resumption, which used one (as
            // OpenSSL, so nginx, does).
            let tickets = |out: &str| out.matches("Post-Handshake New Session Ticket").count();
            assert_eq!((tickets(&first), tickets(&again)), (2, 1), "{again}");
        }
    }
    // A certificate replaced (a key rotated) ends the sessions made with the old one: a
    // session resumes the identity it was made with (before: for up to 12 hours more).
    let rotated = dir.join("rotated");
    std::fs::create_dir_all(&rotated).unwrap();
    let a2 = Cert::new(&rotated, "a.test");
    for (version, name) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
        let sess = dir.join(format!("session{version}.pem"));
        let first = s_client_request(tls, version, ("-sess_out", &sess));
        assert!(first.contains(&format!("New, {name}")), "{first}");
        let body = serde_json::json!({"cert_pem": a2.cert_pem(), "key_pem": a2.key_pem()});
        let r = gw.admin("PUT", "/v1/certificates/a", Some(&body.to_string()));
        assert_eq!(r.status, 200, "{}", r.body_str());
        let again = s_client_request(tls, version, ("-sess_in", &sess));
        assert!(again.contains("origin saw /resume"), "{again}");
        assert!(
            again.contains(&format!("New, {name}")),
            "a {name} session outlived its certificate: {again}"
        );
        // Back to the first certificate for the next round.
        let body = serde_json::json!({"cert_pem": a.cert_pem(), "key_pem": a.key_pem()});
        let r = gw.admin("PUT", "/v1/certificates/a", Some(&body.to_string()));
        assert_eq!(r.status, 200, "{}", r.body_str());
    }
}

#[test]
fn certificates_are_managed_through_the_admin_api() {
    let dir = temp_dir("tls-api");
    let (a, b) = (Cert::new(&dir, "a.test"), Cert::new(&dir, "b.test"));
    let second = dir.join("second");
    std::fs::create_dir_all(&second).unwrap();
    let a2 = Cert::new(&second, "a.test");
    let origin = lines_origin();
    let gw = Gateway::start(&tls_config(origin.addr, &a, &b), Driver::IoUring);
    let tls = gw.listeners[0];

    // A file that is not a regular one (read until memory ran out, or a FIFO blocking every
    // write after it): refused before anything is read, naming the field.
    let body = serde_json::json!({"cert_file": "/dev/zero", "key_pem": a2.key_pem()});
    let r = gw.admin("PUT", "/v1/certificates/z", Some(&body.to_string()));
    assert_eq!(r.status, 422, "{}", r.body_str());
    assert!(
        r.body_str().contains("not a regular file")
            && r.body_str().contains("\"pointer\":\"/cert_file\""),
        "{}",
        r.body_str()
    );
    // A new certificate with its key: created; the key is stored 0600 and never shown.
    let body = serde_json::json!({"cert_pem": a2.cert_pem(), "key_pem": a2.key_pem()});
    let r = gw.admin("PUT", "/v1/certificates/c", Some(&body.to_string()));
    assert_eq!(r.status, 201, "{}", r.body_str());
    let shown = gw.admin("GET", "/v1/certificates/c", None);
    assert_eq!(shown.status, 200);
    let item = shown.json();
    assert!(item.get("key_pem").is_none(), "{item}");
    let digest = item["key_sha256"].as_str().unwrap().to_owned();
    assert_eq!(item["names"], serde_json::json!(["a.test", "*.a.test"]));
    assert!(item["not_after"].as_str().unwrap().ends_with('Z'));
    let key_file = gw.data_dir.join("keys").join(format!("{digest}.pem"));
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    for path in ["/v1/config", "/v1/certificates", "/v1/revisions/2"] {
        let text = gw.admin("GET", path, None).body_str().to_owned();
        assert!(!text.contains("PRIVATE KEY"), "{path} shows a key: {text}");
    }
    // GET output PUT back keeps the stored key (no change, no new revision).
    let etag = |gw: &Gateway| {
        gw.admin("GET", "/v1/config", None)
            .header("etag")
            .map(str::to_owned)
    };
    let before = etag(&gw);
    let r = gw.admin("PUT", "/v1/certificates/c", Some(&item.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(etag(&gw), before);
    // A PATCH with a new certificate and key replaces both: the stored key's digest goes
    // (before: 422, the old digest standing against the new key).
    let third = dir.join("third");
    std::fs::create_dir_all(&third).unwrap();
    let a3 = Cert::new(&third, "a.test");
    let patch = serde_json::json!({"cert_pem": a3.cert_pem(), "key_pem": a3.key_pem()});
    let token = format!("Bearer {ADMIN_TOKEN}");
    let r = gw.admin_with(
        "PATCH",
        "/v1/certificates/c",
        Some(&patch.to_string()),
        &[
            ("Authorization", &token),
            ("Content-Type", "application/merge-patch+json"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body_str());
    let patched = gw.admin("GET", "/v1/certificates/c", None).json();
    assert_ne!(patched["key_sha256"], item["key_sha256"], "{patched}");
    let r = gw.admin("PUT", "/v1/certificates/c", Some(&item.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    let before = etag(&gw);

    // A chain read from `cert_file` that changed on disk (an intermediate added) is served
    // after the next publish, here a PUT of GET's output, though nothing else changed.
    let served_chain = || {
        let out = Command::new("openssl")
            .args(["s_client", "-showcerts", "-connect", &tls.to_string()])
            .args(["-servername", "a.test"])
            .stdin(Stdio::null())
            .output()
            .expect("openssl s_client");
        String::from_utf8_lossy(&out.stdout)
            .matches("BEGIN CERTIFICATE")
            .count()
    };
    assert_eq!(served_chain(), 1);
    let file_item = gw.admin("GET", "/v1/certificates/a", None).json();
    let leaf = a.cert_pem();
    std::fs::write(&a.cert, format!("{leaf}{}", b.cert_pem())).unwrap();
    let r = gw.admin("PUT", "/v1/certificates/a", Some(&file_item.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_ne!(etag(&gw), before, "the new chain is a change");
    assert_ne!(
        gw.admin("GET", "/v1/certificates/a", None).json()["chain_sha256"],
        file_item["chain_sha256"]
    );
    assert_eq!(served_chain(), 2);
    std::fs::write(&a.cert, leaf).unwrap();

    // Refusals name the field.
    let unnamed = dir.join("unnamed.pem");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/O=Intermediate",
            "-keyout",
        ])
        .arg(dir.join("unnamed.key"))
        .arg("-out")
        .arg(&unnamed)
        .output()
        .expect("openssl");
    assert!(out.status.success());
    let unnamed = std::fs::read_to_string(&unnamed).unwrap();
    let cases = [
        (
            serde_json::json!({"cert_pem": a.cert_pem(), "key_pem": b.key_pem()}),
            "\"pointer\":\"/key_pem\"",
        ),
        // The key's certificate second in the chain: the chain's order is at fault.
        (
            serde_json::json!({
                "cert_pem": format!("{}{}", b.cert_pem(), a2.cert_pem()),
                "key_pem": a2.key_pem()
            }),
            "the chain goes leaf first",
        ),
        // The same with a first certificate that names no host, as an intermediate's does.
        (
            serde_json::json!({
                "cert_pem": format!("{unnamed}{}", a2.cert_pem()),
                "key_pem": a2.key_pem()
            }),
            "the chain goes leaf first",
        ),
        // A key bundled with the certificates would be stored and shown with them.
        (
            serde_json::json!({
                "cert_pem": format!("{}{}", a2.cert_pem(), a2.key_pem()),
                "key_pem": a2.key_pem()
            }),
            "\"pointer\":\"/cert_pem\"",
        ),
        (
            serde_json::json!({"cert_pem": "not a certificate", "key_pem": a.key_pem()}),
            "\"pointer\":\"/cert_pem\"",
        ),
        // A later certificate that does not parse would fail every client's handshake
        // (before: taken).
        (
            serde_json::json!({
                "cert_pem": format!(
                    "{}-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                    a2.cert_pem()
                ),
                "key_pem": a2.key_pem()
            }),
            "certificate 2 of the chain (2 in all) is not a valid X.509 certificate",
        ),
        // An encrypted key says so (before: "no items found").
        (
            serde_json::json!({
                "cert_pem": a2.cert_pem(),
                "key_pem": "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n\
                            -----END ENCRYPTED PRIVATE KEY-----\n"
            }),
            "an encrypted private key",
        ),
        (
            serde_json::json!({"cert_pem": a.cert_pem(), "key_sha256": "00".repeat(32)}),
            "\"pointer\":\"/key_sha256\"",
        ),
    ];
    for (body, pointer) in cases {
        let r = gw.admin("PUT", "/v1/certificates/c", Some(&body.to_string()));
        assert_eq!(r.status, 422, "{}", r.body_str());
        assert!(
            r.body_str().contains(pointer),
            "{pointer}: {}",
            r.body_str()
        );
    }
    // A certificate that names no DNS name, with its own key, is taken (a client certificate
    // for an upstream's mutual TLS often has none) (before: 422 "names no DNS name").
    let body = serde_json::json!({
        "cert_pem": unnamed,
        "key_pem": std::fs::read_to_string(dir.join("unnamed.key")).unwrap()
    });
    let r = gw.admin("PUT", "/v1/certificates/unnamed", Some(&body.to_string()));
    assert_eq!(r.status, 201, "{}", r.body_str());
    let item = gw.admin("GET", "/v1/certificates/unnamed", None).json();
    assert!(item.get("names").is_none(), "no names shown: {item}");
    assert!(item["not_after"].is_string(), "{item}");
    let r = gw.admin("DELETE", "/v1/certificates/unnamed", None);
    assert_eq!(r.status, 204, "{}", r.body_str());
    // A key sent where another value belongs is not quoted back (nor logged): the parser's
    // message would have carried it whole.
    let key_line = a2.key_pem().lines().nth(1).unwrap().to_owned();
    for body in [
        serde_json::json!({
            "cert_pem": a2.cert_pem(),
            "key_pem": a2.key_pem(),
            "names": a2.key_pem()
        }),
        serde_json::json!({"cert_pem": a2.cert_pem(), "key_file": a2.key_pem()}),
    ] {
        let r = gw.admin("PUT", "/v1/certificates/c", Some(&body.to_string()));
        assert!(matches!(r.status, 400 | 422), "{}", r.body_str());
        assert!(!r.body_str().contains(&key_line), "{}", r.body_str());
        assert!(
            !r.body_str().contains("PRIVATE KEY-----"),
            "{}",
            r.body_str()
        );
        assert!(r.body_str().contains("<private key>"), "{}", r.body_str());
    }
    // Nor in the pointer, where a map key sent as one would be named.
    let mut set = serde_json::Map::new();
    set.insert(a2.key_pem(), serde_json::json!(5));
    let route = serde_json::json!({"path": "/k", "respond": {"body": "k"},
        "request_headers": {"set": set}});
    let r = gw.admin("PUT", "/v1/routes/k", Some(&route.to_string()));
    assert!(matches!(r.status, 400 | 422), "{}", r.body_str());
    assert!(
        !r.body_str().contains("PRIVATE KEY-----"),
        "{}",
        r.body_str()
    );
    // A certificate a listener uses cannot go.
    let r = gw.admin("DELETE", "/v1/certificates/a", None);
    assert_eq!(r.status, 409, "{}", r.body_str());
    assert!(r.body_str().contains("listeners/0"), "{}", r.body_str());

    // An open connection keeps its session while the certificate it got is replaced.
    let mut held = SClient::open(tls, "a.test");
    assert!(held.get("/before").contains("origin saw /before"));
    let body = serde_json::json!({"cert_pem": a2.cert_pem(), "key_pem": a2.key_pem()});
    let r = gw.admin("PUT", "/v1/certificates/a", Some(&body.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    // The next handshake gets the new certificate: only the new one verifies.
    let (code, _, err) = curl_tls(tls, "a.test", "/new", &a2.cert, &[]);
    assert_eq!(code, 200, "{err}");
    let (code, _, _) = curl_tls(tls, "a.test", "/new", &a.cert, &[]);
    assert_eq!(code, 0);
    assert!(held.get("/after").contains("origin saw /after"));

    // The listener's certificate list changes at runtime too: b first now.
    let mut config = gw.admin("GET", "/v1/config", None).json();
    config["listeners"][0]["tls"]["certificates"] = serde_json::json!(["b", "a"]);
    let r = gw.admin("PUT", "/v1/config", Some(&config.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert!(presented_subject(tls, None).contains("b.test"));

    // After a restart the stored key is found by its digest.
    drop(held);
    let data_dir = gw.data_dir.clone();
    drop(gw);
    let gw = Gateway::resume(&data_dir, Driver::IoUring);
    let (code, _, err) = curl_tls(gw.listeners[0], "a.test", "/resumed", &a2.cert, &[]);
    assert_eq!(code, 200, "{err}");
}

/// Replaces `cert`'s certificate file with one for the same name and key that expired in
/// 2020 (`openssl ca -selfsign` with fixed dates: `req -days` takes no past).
fn expire(dir: &Path, cert: &Cert, name: &str) {
    let ca = dir.join("expired-ca");
    std::fs::create_dir_all(ca.join("new")).unwrap();
    std::fs::write(ca.join("index.txt"), "").unwrap();
    std::fs::write(ca.join("serial"), "01\n").unwrap();
    std::fs::write(
        ca.join("ca.cnf"),
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = new\nserial = serial\n\
         policy = p\ndefault_md = sha256\ncopy_extensions = copy\nunique_subject = no\n\
         [p]\ncommonName = supplied\n",
    )
    .unwrap();
    let run = |args: &[&str]| openssl(&ca, args);
    let key = cert.key.to_str().unwrap();
    let subject = format!("/CN={name}");
    let san = format!("subjectAltName=DNS:{name}");
    run(&[
        "req", "-new", "-key", key, "-subj", &subject, "-addext", &san, "-out", "x.csr",
    ]);
    run(&[
        "ca",
        "-batch",
        "-selfsign",
        "-config",
        "ca.cnf",
        "-keyfile",
        key,
        "-in",
        "x.csr",
        "-startdate",
        "20200101000000Z",
        "-enddate",
        "20200102000000Z",
        "-out",
        "x.pem",
    ]);
    std::fs::copy(ca.join("x.pem"), &cert.cert).unwrap();
}

#[test]
fn a_certificate_that_expires_in_use_is_still_served_and_only_new_ones_are_refused() {
    let dir = temp_dir("tls-expired");
    let (a, b) = (Cert::new(&dir, "a.test"), Cert::new(&dir, "b.test"));
    let origin = lines_origin();
    let gw = Gateway::start(&tls_config(origin.addr, &a, &b), Driver::IoUring);
    let data_dir = gw.data_dir.clone();
    drop(gw);
    // `a` (a `cert_file`) is replaced by an expired certificate while the gateway is down:
    // the stored config still starts, and the certificate is served as it is (a client that
    // checks dates refuses it).
    expire(&dir, &a, "a.test");
    let gw = Gateway::resume(&data_dir, Driver::IoUring);
    let tls = gw.listeners[0];
    let (code, _, err) = curl_tls(tls, "a.test", "/expired", &a.cert, &[]);
    assert_eq!(code, 0, "curl took an expired certificate: {err}");
    assert!(err.contains("expired"), "{err}");
    let (code, body, err) = curl_tls(tls, "a.test", "/expired", &a.cert, &["-k"]);
    assert_eq!(code, 200, "{err}");
    assert!(body.contains("origin saw /expired"), "{body}");
    // The next change publishes the file's certificate, never published before: refused as
    // expired, naming the field, as when the file changes while the gateway runs (before:
    // 201, the expired certificate stored as published).
    let r = gw.admin(
        "PUT",
        "/v1/routes/other",
        Some(r#"{"path_prefix":"/other","upstream":"origin"}"#),
    );
    assert_eq!(r.status, 422, "{}", r.body_str());
    assert!(
        r.body_str()
            .contains("\"pointer\":\"/certificates/0/cert_file\""),
        "{}",
        r.body_str()
    );
    // A valid certificate in the file: the change goes through.
    let (expired_pem, key_pem) = (a.cert_pem(), a.key_pem());
    let fresh_dir = dir.join("fresh");
    std::fs::create_dir_all(&fresh_dir).unwrap();
    let fresh = Cert::new(&fresh_dir, "a.test");
    std::fs::write(&a.cert, fresh.cert_pem()).unwrap();
    std::fs::write(&a.key, fresh.key_pem()).unwrap();
    let r = gw.admin(
        "PUT",
        "/v1/routes/other",
        Some(r#"{"path_prefix":"/other","upstream":"origin"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body_str());
    // A new certificate that has already expired is refused, naming its field.
    let body = serde_json::json!({"cert_pem": expired_pem, "key_pem": key_pem});
    let r = gw.admin("PUT", "/v1/certificates/late", Some(&body.to_string()));
    assert_eq!(r.status, 422, "{}", r.body_str());
    assert!(
        r.body_str().contains("expired at 2020-01-02T00:00:00Z"),
        "{}",
        r.body_str()
    );
    assert!(
        r.body_str().contains("\"pointer\":\"/cert_pem\""),
        "{}",
        r.body_str()
    );
    // And so is the file given to a gateway that starts from it.
    std::fs::write(&a.cert, &expired_pem).unwrap();
    std::fs::write(&a.key, &key_pem).unwrap();
    let config = dir.join("expired.toml");
    std::fs::write(&config, tls_config(origin.addr, &a, &b)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--check", config.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("certificates[0].cert_file") && text.contains("expired"),
        "{text}"
    );
}

/// Answers `origin saw TARGET` and a newline, so a line reader sees each body whole.
fn lines_origin() -> Origin {
    Origin::echo_ending("\n")
}

#[test]
fn a_busy_tunnel_cut_by_the_drain_ends_with_close_notify() {
    // An origin that switches, then sends 64 KiB every millisecond: never quiet. The drain's end
    // cuts the tunnel, and the TLS client sees an orderly end, with close_notify (the first
    // version of the change shut the sockets' reading, which on Linux still returns what
    // comes, so the busy direction relayed on until the sockets were shut whole).
    let dir = temp_dir("tls-ws-busy");
    let (a, b) = (Cert::new(&dir, "a.test"), Cert::new(&dir, "b.test"));
    let origin = Origin::start(std::sync::Arc::new(
        |_req: &Received, s: &mut std::net::TcpStream| {
            let _ = s.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                  Connection: Upgrade\r\n\r\n",
            );
            for _ in 0..5000 {
                if s.write_all(&[b'x'; 64 << 10]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Keep::Close
        },
    ));
    let config = format!(
        "{}\n[shutdown]\ndrain_timeout_ms = 300\n",
        tls_config(origin.addr, &a, &b)
    );
    let mut gw = Gateway::start(&config, Driver::IoUring);
    let request = "GET /busy HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\n\r\n";
    let mut reader = TlsReader::spawn(gw.listeners[0], a.cert.to_str().unwrap(), "a.test", request);
    reader.wait_answered();
    gw.signal(libc::SIGTERM);
    let (end, data) = reader.finish();
    assert!(String::from_utf8_lossy(&data[..20]).starts_with("HTTP/1.1 101"));
    assert_eq!(end, "close_notify");
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_websocket_tunnel_runs_over_tls() {
    let dir = temp_dir("tls-ws");
    let (a, b) = (Cert::new(&dir, "a.test"), Cert::new(&dir, "b.test"));
    // An origin that upgrades, then echoes each client frame's payload back, unmasked.
    let origin = Origin::start(std::sync::Arc::new(
        |req: &Received, s: &mut std::net::TcpStream| {
            assert_eq!(req.header("upgrade"), Some("websocket"));
            let _ = write!(
                s,
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            );
            let target = req.target();
            if target == "/ends" || target == "/resets" {
                let _ = s.write_all(b"last words");
                std::thread::sleep(Duration::from_millis(100));
                return if target == "/ends" {
                    Keep::Close
                } else {
                    Keep::Reset
                };
            }
            let mut buf = [0u8; 4096];
            loop {
                let n = match std::io::Read::read(s, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let len = usize::from(buf[1] & 0x7f);
                let (mask, payload) = (&buf[2..6], &buf[6..6 + len.min(n - 6)]);
                let mut out = vec![buf[0], len as u8];
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
                if s.write_all(&out).is_err() {
                    break;
                }
            }
            Keep::Close
        },
    ));
    let log = dir.join("access.log");
    let config = format!(
        "{}\n[access_log]\npath = \"{}\"\n[timeouts]\nupstream_body_ms = 1500\n",
        tls_config(origin.addr, &a, &b),
        log.display()
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    // The tunnel's end follows the upstream's: a close ends it with close_notify, a reset
    // without (the client must not take an abort for an orderly end).
    let upgrade = "GET /chat HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                   Sec-WebSocket-Version: 13\r\n\r\n";
    let ca = a.cert.to_str().unwrap();
    for (path, ending) in [("/ends", "close_notify"), ("/resets", "no close_notify")] {
        let request = upgrade.replace("/chat", path);
        let (end, data) = tls_read_all(gw.listeners[0], ca, "a.test", &request);
        let text = String::from_utf8_lossy(&data);
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        assert!(text.ends_with("last words"), "{text}");
        assert_eq!(end, ending, "{path}");
    }
    // A tunnel gone quiet, ended by the gateway: no side failed (the first version of the
    // tunnel's reset logged it `client_closed`, and counted it), and the TLS client sees an
    // orderly end, with close_notify (before: a FIN alone, a truncation).
    let request = upgrade.replace("/chat", "/idle");
    let (end, data) = tls_read_all(gw.listeners[0], ca, "a.test", &request);
    assert!(String::from_utf8_lossy(&data).starts_with("HTTP/1.1 101"));
    assert_eq!(end, "close_notify");
    let lines = wait_log_lines(&log, 3);
    let idle = lines.iter().find(|l| l["path"] == "/idle").unwrap();
    assert_eq!(idle["error"], serde_json::Value::Null, "{idle}");
    let reset = lines.iter().find(|l| l["path"] == "/resets").unwrap();
    assert_eq!(reset["error"], "upstream_closed", "{reset}");
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-ign_eof", "-servername", "a.test"])
        .args(["-connect", &gw.listeners[0].to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client");
    let mut out = child.stdout.take().unwrap();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut out, &mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let stdin = child.stdin.as_mut().unwrap();
    stdin
        .write_all(b"GET /chat HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .unwrap();
    stdin.flush().unwrap();
    let wait_for = |needle: &[u8]| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if got
                .lock()
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "never saw {:?} in {:?}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(&got.lock().unwrap())
        );
    };
    wait_for(b"101 Switching Protocols");
    // Two frames through the tunnel, each echoed back through both TLS halves.
    for msg in ["hello over tls", "and again"] {
        let mask = [9u8, 8, 7, 6];
        let mut frame = vec![0x81, 0x80 | msg.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(msg.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        let stdin = child.stdin.as_mut().unwrap();
        stdin.write_all(&frame).unwrap();
        stdin.flush().unwrap();
        let mut want = vec![0x81, msg.len() as u8];
        want.extend_from_slice(msg.as_bytes());
        wait_for(&want);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// One `openssl s_client` session kept open, for requests on one TLS connection.
struct SClient {
    child: std::process::Child,
    out: std::sync::mpsc::Receiver<String>,
}

impl SClient {
    fn open(addr: std::net::SocketAddr, name: &str) -> SClient {
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-quiet",
                "-ign_eof",
                "-connect",
                &addr.to_string(),
            ])
            .args(["-servername", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_client");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        SClient { child, out: rx }
    }

    /// Sends a GET and returns the response's last line (the body: the echo origin's has no
    /// newline) once it arrives.
    fn get(&mut self, path: &str) -> String {
        let stdin = self.child.stdin.as_mut().unwrap();
        write!(stdin, "GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n").unwrap();
        stdin.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = String::new();
        while Instant::now() < deadline {
            if let Ok(line) = self.out.recv_timeout(Duration::from_millis(200)) {
                seen.push_str(&line);
                seen.push('\n');
                if line.starts_with("origin saw") {
                    return seen;
                }
            }
        }
        panic!("no answer on the held connection: {seen:?}");
    }
}

impl Drop for SClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// [`tls_config`] with the idle keep-alive timeout `idle_ms`.
fn ending_config(origin: std::net::SocketAddr, a: &Cert, b: &Cert, idle_ms: u64) -> String {
    format!(
        "{}\n[timeouts]\nclient_idle_ms = {idle_ms}\n",
        tls_config(origin, a, b)
    )
}

#[test]
fn tls_connections_end_with_close_notify_unless_an_answer_was_cut() {
    let dir = temp_dir("tls-ending");
    let (a, b) = (Cert::new(&dir, "a.test"), Cert::new(&dir, "b.test"));
    let ca = a.cert.to_str().unwrap();
    // `/cut` promises 100 bytes, sends 10 and resets; anything else gets "ok\n".
    let origin = Origin::start(std::sync::Arc::new(
        |req: &Received, s: &mut std::net::TcpStream| {
            if req.target() == "/cut" {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..");
                std::thread::sleep(Duration::from_millis(50));
                return Keep::Reset;
            }
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
            Keep::Open
        },
    ));
    let gw = Gateway::start(&ending_config(origin.addr, &a, &b, 300), Driver::IoUring);
    let addr = gw.listeners[0];
    let ended = |request: &str| {
        let (end, data) = tls_read_all(addr, ca, "a.test", request);
        let text = String::from_utf8_lossy(&data).into_owned();
        (end, text)
    };
    // Whole answers, then a close of the gateway's choosing: close_notify (RFC 8446 §6.1),
    // whatever made it close: the client's `Connection: close`, HTTP/1.0, a request it
    // refused, the idle timeout.
    for (why, request, status) in [
        (
            "Connection: close",
            "GET /a HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 200",
        ),
        (
            "HTTP/1.0",
            "GET /a HTTP/1.0\r\nHost: a.test\r\n\r\n",
            "HTTP/1.1 200",
        ),
        (
            "a bad request",
            "GET /a HTTP/1.1\r\nHost: a.test\r\nBad Field: x\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "the idle timeout",
            "GET /a HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "HTTP/1.1 200",
        ),
    ] {
        let (end, text) = ended(request);
        assert!(text.starts_with(status), "{why}: {text}");
        assert_eq!(end, "close_notify", "{why}: {text}");
    }
    // An answer cut short ends without it: the client must not take it for a whole one.
    let (end, text) = ended("GET /cut HTTP/1.1\r\nHost: a.test\r\n\r\n");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("only ten.."), "{text}");
    assert_eq!(end, "no close_notify", "{text}");

    // The drain (SIGTERM) closes an idle keep-alive connection in order too.
    let mut gw = Gateway::start(&ending_config(origin.addr, &a, &b, 60_000), Driver::IoUring);

    // A client that ends with its close_notify, after an answer or in the middle of a head,
    // gets the gateway's in reply (RFC 8446 6.1), well before the idle timeout.
    const CLOSES_FIRST: &str = r#"
import socket, ssl, sys
port, ca, first = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode().decode("unicode_escape")
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                    server_hostname="a.test", suppress_ragged_eofs=False)
s.sendall(first.encode())
if first.endswith("\r\n\r\n"):
    got = b""
    while not got.endswith(b"ok\n"):
        got += s.recv(65536)
try:
    s.unwrap()
    print("close_notify")
except (ssl.SSLError, OSError) as e:
    print("no close_notify", e)
"#;
    for first in [
        r"GET /a HTTP/1.1\r\nHost: a.test\r\n\r\n",
        r"GET /a HTTP/1.1\r\nHost: a.",
    ] {
        let out = Command::new("python3")
            .args([
                "-c",
                CLOSES_FIRST,
                &gw.listeners[0].port().to_string(),
                ca,
                first,
            ])
            .output()
            .expect("python3 is needed for the TLS tests");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.trim(),
            "close_notify",
            "{first}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut reader = TlsReader::spawn(
        gw.listeners[0],
        ca,
        "a.test",
        "GET /a HTTP/1.1\r\nHost: a.test\r\n\r\n",
    );
    reader.wait_answered();
    gw.signal(libc::SIGTERM);
    let (end, data) = reader.finish();
    let text = String::from_utf8_lossy(&data);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(end, "close_notify", "drain: {text}");
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_tls_client_that_leaves_a_slow_answer_ends_its_upstream_request() {
    // Its close_notify waits unread in the socket before its FIN: the gateway tells it left
    // by the connection's TCP state, not by a peek.
    let dir = temp_dir("tls-left");
    let (a, b) = (Cert::new(&dir, "a.test"), Cert::new(&dir, "b.test"));
    let (tx, ended) = std::sync::mpsc::channel();
    let hold = crate::access_log::holding_origin(tx);
    let config = format!(
        "{}\n[timeouts]\nupstream_response_head_ms = 10000\n",
        tls_config(hold.addr, &a, &b)
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    const LEAVES: &str = r#"
import socket, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                    server_hostname="a.test")
s.sendall(b"GET /hold HTTP/1.1\r\nHost: a.test\r\n\r\n")
sys.stdin.readline()
s.settimeout(0.2)
try:
    s.unwrap()  # sends close_notify; the reply it waits for does not come
except (ssl.SSLError, OSError):
    pass
s.close()
print("left")
"#;
    let mut client = Command::new("python3")
        .args([
            "-c",
            LEAVES,
            &gw.listeners[0].port().to_string(),
            a.cert.to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is needed for the TLS tests");
    hold.wait_requests(1);
    client.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = client.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "left");
    let after = ended.recv_timeout(Duration::from_secs(15)).unwrap();
    assert!(
        after.is_some_and(|d| d < Duration::from_secs(5)),
        "upstream connection closed after {after:?} (the response timeout is 10 s)"
    );
}

#[test]
fn an_early_answer_reaches_a_tls_client_that_pauses_mid_body() {
    // The upstream refuses the upload after its head and closes while the client, five bytes
    // into its body, pauses; then the client sends the rest. The answer goes out during the
    // pause, through the TLS read given up for it, and the connection ends with close_notify.
    // (Whether the lingering close then reads what follows, as it should, this cannot tell:
    // on loopback the answer is in before any reset, and Linux keeps it readable.)
    let dir = temp_dir("tls-early");
    let (a, b) = (Cert::new(&dir, "a.test"), Cert::new(&dir, "b.test"));
    let origin = crate::proxy::head_only_origin(crate::proxy::refuse_and_close);
    let gw = Gateway::start(&tls_config(origin, &a, &b), Driver::IoUring);
    const PAUSES: &str = r#"
import socket, ssl, sys, time
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                    server_hostname="a.test", suppress_ragged_eofs=False)
s.sendall(b"POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100\r\n\r\nhello")
time.sleep(1)
try:
    s.sendall(b"x" * 95)
except OSError:
    pass
data, end = b"", "close_notify"
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except (ssl.SSLEOFError, ConnectionResetError):
    end = "no close_notify"
print(end, data.decode().split("\r\n")[0], data.endswith(b"too big!"))
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            PAUSES,
            &gw.listeners[0].port().to_string(),
            a.cert.to_str().unwrap(),
        ])
        .output()
        .expect("python3 is needed for the TLS tests");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "close_notify HTTP/1.1 413 Payload Too Large True",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_record_that_fails_to_decrypt_gets_its_alert() {
    let dir = temp_dir("tls-alert");
    let (a, b) = (Cert::new(&dir, "a.test"), Cert::new(&dir, "b.test"));
    let origin = Origin::echo();
    let gw = Gateway::start(&ending_config(origin.addr, &a, &b, 60_000), Driver::IoUring);
    // The handshake through memory BIOs, then a request whose record's last byte (its AEAD
    // tag's) is flipped; what comes back is decrypted by the same session.
    const SCRIPT: &str = r#"
import socket, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(inc, out, server_hostname="a.test")
raw = socket.create_connection(("127.0.0.1", port), timeout=10)
while True:
    try:
        tls.do_handshake()
        break
    except ssl.SSLWantReadError:
        raw.sendall(out.read())
        chunk = raw.recv(65536)
        if not chunk:
            sys.exit("closed during the handshake")
        inc.write(chunk)
raw.sendall(out.read())
tls.write(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
record = bytearray(out.read())
record[-1] ^= 1
raw.sendall(bytes(record))
while True:
    try:
        chunk = raw.recv(65536)
    except ConnectionResetError:
        break
    if not chunk:
        break
    inc.write(chunk)
inc.write_eof()
try:
    tls.read(65536)
    print("read without an error")
except ssl.SSLError as e:
    print(e.reason)
"#;
    let out = Command::new("python3")
        .args(["-c", SCRIPT, &gw.listeners[0].port().to_string()])
        .arg(&a.cert)
        .output()
        .expect("python3 is needed for the TLS tests");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.trim(),
        "SSLV3_ALERT_BAD_RECORD_MAC",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(origin.requests().is_empty());
}

#[test]
fn an_ecdsa_and_an_rsa_certificate_for_one_name_each_go_to_the_clients_that_can_use_them() {
    let dir = temp_dir("tls-key-types");
    let (ec, rsa) = (Cert::new(&dir, "a.test"), Cert::new_rsa(&dir, "a.test"));
    let config = format!(
        r#"workers = 1

[[listeners]]
address = "127.0.0.1:0"
tls = {{ certificates = ["ec", "rsa"] }}

[[routes]]
id = "all"
path_prefix = "/"
respond = {{ status = 200, body = "ok" }}

[[certificates]]
id = "ec"
cert_file = "{}"
key_file = "{}"

[[certificates]]
id = "rsa"
cert_file = "{}"
key_file = "{}"
"#,
        ec.cert.display(),
        ec.key.display(),
        rsa.cert.display(),
        rsa.key.display(),
    );
    let gw = Gateway::start(&config, Driver::IoUring);
    // What `openssl s_client` run with SNI `name` and `args` said of the certificate the
    // gateway presented (its line starting `prefix`), or what went wrong.
    let presented = |name: &str, args: &[&str], prefix: &str| {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &gw.listeners[0].to_string()])
            .args(["-servername", name])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("openssl s_client");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| format!("no certificate: {}", String::from_utf8_lossy(&out.stderr)))
    };
    // The size of its key.
    let key_bits = |args: &[&str]| presented("a.test", args, "Server public key is ");
    // A client that takes both gets the first listed.
    assert_eq!(key_bits(&[]), "256 bit");
    assert_eq!(key_bits(&["-tls1_2"]), "256 bit");
    // TLS 1.3 with RSA-PSS signatures only, TLS 1.2 with RSA suites only: the RSA one.
    assert_eq!(
        key_bits(&["-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256"]),
        "2048 bit"
    );
    assert_eq!(
        key_bits(&["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"]),
        "2048 bit"
    );
    assert_eq!(
        key_bits(&["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"]),
        "256 bit"
    );

    // An ECDSA certificate naming `x.a.test` exactly and the RSA one covering it by its
    // wildcard: a client that can only take RSA gets the wildcard (before: the exact one,
    // and a failed handshake). A certificate with an IP address as its only subjectAltName
    // is never picked by its common name, which clients do not read beside one (before:
    // SNI `ip.a.test` got it, and curl refused its name).
    let x = Cert::new(&dir, "x.a.test");
    let ip = Cert::with_names(&dir, "ip", "/CN=ip.a.test", "IP:127.0.0.1");
    for (id, cert) in [("x", &x), ("ip", &ip)] {
        let body = serde_json::json!({
            "cert_pem": cert.cert_pem(),
            "key_pem": cert.key_pem(),
        });
        let r = gw.admin(
            "PUT",
            &format!("/v1/certificates/{id}"),
            Some(&body.to_string()),
        );
        assert_eq!(r.status, 201, "{}", r.body_str());
    }
    // No names to show (before: `["ip.a.test"]`).
    let ip_entry = gw.admin("GET", "/v1/certificates/ip", None).json();
    assert_eq!(ip_entry["names"], serde_json::Value::Null, "{ip_entry}");
    let mut config = gw.admin("GET", "/v1/config", None).json();
    config["listeners"][0]["tls"]["certificates"] = serde_json::json!(["ip", "x", "rsa"]);
    let r = gw.admin("PUT", "/v1/config", Some(&config.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    let subject = |name: &str, args: &[&str]| presented(name, args, "subject=");
    assert_eq!(subject("x.a.test", &[]), "CN = x.a.test");
    let rsa_only = ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"];
    assert_eq!(subject("x.a.test", &rsa_only), "CN = a.test");
    assert_eq!(subject("ip.a.test", &[]), "CN = a.test");
}
