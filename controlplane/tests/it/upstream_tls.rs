//! TLS towards upstreams (`tls` on an upstream) through the real binary, with a Python HTTPS
//! origin (`tests/https_peer.py`) and the gateway's own TLS listener as an HTTP/2 one: the
//! target's certificate checked against the given authorities and name (SNI sent), refused
//! with 502 `upstream_tls` when it does not hold, a client certificate for mutual TLS, pooled
//! TLS connections reused, uploads, large answers and WebSocket tunnels through TLS, health
//! checks over TLS, and ALPN choosing HTTP/2. The gRPC case is in `grpc.rs`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;
use crate::tls::Cert;

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/https_peer.py");

/// A running `https_peer.py`, stopped when dropped.
struct HttpsPeer {
    child: Child,
    addr: SocketAddr,
    /// What it prints after its port.
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl HttpsPeer {
    fn start(cert: &Cert, client_ca: Option<&Cert>) -> HttpsPeer {
        let mut args = vec![
            cert.cert.to_str().unwrap().to_owned(),
            cert.key.to_str().unwrap().to_owned(),
        ];
        if let Some(ca) = client_ca {
            args.push("--client-ca".into());
            args.push(ca.cert.to_str().unwrap().to_owned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (child, out, addr) = crate::grpc::start_peer(
            PEER,
            &args,
            "the test HTTPS origin",
            "(none: python3's ssl module)",
        );
        HttpsPeer { child, addr, out }
    }

    /// Its next line of output.
    fn line(&mut self) -> String {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut self.out, &mut line);
        line.trim().to_owned()
    }
}

impl Drop for HttpsPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A certificate authority and a P-256 certificate for `name` and `*.name` it signed (the
/// support's openssl helpers): `ca.cert` is the authority's, `leaf` the target's.
fn ca_and_leaf(dir: &std::path::Path, name: &str) -> (Cert, Cert) {
    make_ca(dir, "Test CA");
    let leaf_name = format!("{name}-leaf");
    signed_leaf(dir, &leaf_name, name, &format!("DNS:{name},DNS:*.{name}"));
    let ca = Cert {
        cert: dir.join("ca.pem"),
        key: dir.join("ca.key"),
    };
    let leaf = Cert {
        cert: dir.join(format!("{leaf_name}.pem")),
        key: dir.join(format!("{leaf_name}.key")),
    };
    (ca, leaf)
}

/// One request through the gateway's plain listener; the status and body.
fn request(gw: &Gateway, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    request_to(gw, "t", method, path, body)
}

/// [`request`] with `Host: host`.
fn request_to(gw: &Gateway, host: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let mut c = gw.connect();
    c.send(&req);
    let r = c.read_response_to(method);
    (r.status, r.body)
}

/// The origin's JSON answer to a GET of `path`, which must be a 200.
fn answer(gw: &Gateway, path: &str) -> Value {
    let (status, body) = request(gw, "GET", path, b"");
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

#[test]
fn https_upstreams_are_verified_pooled_and_health_checked() {
    let dir = temp_dir("upstream-tls");
    // `open` presents a certificate its authority signed; the others a self-signed one,
    // trusted as its own authority.
    let (authority, leaf) = ca_and_leaf(&dir, "up.test");
    let srv = Cert::new(&dir, "up.test");
    let other = Cert::new(&dir, "other.test");
    // A client certificate as meshes issue them: a SPIFFE URI and a common name with a
    // space, no DNS name (before: refused, "names no DNS name").
    let client = Cert::with_names(
        &dir,
        "client",
        "/CN=Gateway Client",
        "URI:spiffe://example.test/gateway",
    );
    // Self-signed for up.test but made for clients only (extendedKeyUsage clientAuth): not
    // one to serve, trusted as its own authority or not (before: taken when pinned).
    // The same for one whose key may only sign certificates (a CA's).
    let purposed = |file: &str, purpose: &str| {
        Cert::with_extensions(
            &dir,
            file,
            "/CN=up.test",
            &["subjectAltName=DNS:up.test", purpose],
        )
    };
    let client_only = purposed("client-only", "extendedKeyUsage=clientAuth");
    let signer = purposed("signer", "keyUsage=critical,keyCertSign,cRLSign");
    // Not a CA, so webpki takes it as its own anchor without reading its key usage (the
    // first version of the check ran only where webpki refused); a Netscape type for
    // clients only; and one for server-gated crypto, which OpenSSL takes for a server.
    let end_crl = Cert::with_extensions(
        &dir,
        "end-crl",
        "/CN=up.test",
        &[
            "subjectAltName=DNS:up.test",
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=cRLSign",
        ],
    );
    let ns_client = purposed("ns-client", "nsCertType=client");
    let sgc = purposed("sgc", "extendedKeyUsage=msSGC");
    let mut open = HttpsPeer::start(&leaf, None);
    let mutual = HttpsPeer::start(&srv, Some(&client));
    let clients_only = HttpsPeer::start(&client_only, None);
    let signs_only = HttpsPeer::start(&signer, None);
    let crl_only = HttpsPeer::start(&end_crl, None);
    let ns_clients = HttpsPeer::start(&ns_client, None);
    let gated = HttpsPeer::start(&sgc, None);
    let log = dir.join("access.log");

    // The gateway's TLS listener offering only h2, as an HTTP/2 upstream.
    let origin = Origin::echo();
    let h2_config = format!(
        "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\
         tls = {{ certificates = [\"srv\"], alpn = [\"h2\"] }}\n\
         [[upstreams]]\nid = \"origin\"\ntargets = [{{ address = \"{}\" }}]\n\
         [[routes]]\nid = \"all\"\npath_prefix = \"/\"\nupstream = \"origin\"\n\
         [[certificates]]\nid = \"srv\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        origin.addr,
        srv.cert.display(),
        srv.key.display()
    );
    let h2_gw = Gateway::start(&h2_config, Driver::IoUring);
    let h2_addr = h2_gw.listeners[0];

    let ca = authority.cert.display();
    let own = srv.cert.display();
    let check = "health_check = { path = \"/health\", interval_ms = 200, timeout_ms = 150 }";
    let upstreams = [
        (
            "verified",
            open.addr,
            format!("tls = {{ server_name = \"api.up.test\", ca_file = \"{ca}\" }}\n{check}"),
        ),
        // No name: the certificate must name 127.0.0.1, which it does not.
        (
            "by-ip",
            open.addr,
            format!("tls = {{ ca_file = \"{ca}\" }}"),
        ),
        (
            "wrong-ca",
            open.addr,
            format!(
                "tls = {{ server_name = \"up.test\", ca_file = \"{}\" }}\n{check}",
                other.cert.display()
            ),
        ),
        ("unverified", open.addr, "tls = { verify = false }".into()),
        (
            "mutual",
            mutual.addr,
            format!(
                "tls = {{ server_name = \"up.test\", ca_file = \"{own}\", \
                 certificate = \"client\" }}"
            ),
        ),
        (
            "no-client-cert",
            mutual.addr,
            format!("tls = {{ server_name = \"up.test\", ca_file = \"{own}\" }}"),
        ),
        (
            "h2",
            h2_addr,
            format!(
                "protocol = \"h2\"\n\
                 tls = {{ server_name = \"b.up.test\", ca_pem = \"\"\"{}\"\"\" }}",
                srv.cert_pem()
            ),
        ),
        // HTTP/1.1 offered to a listener that speaks only h2: no protocol in common.
        (
            "h2-only",
            h2_addr,
            format!("tls = {{ server_name = \"up.test\", ca_file = \"{own}\" }}"),
        ),
        // HTTP/2 to a target that chooses no protocol by ALPN (it speaks HTTP/1.1 only).
        (
            "h2-no-alpn",
            open.addr,
            format!("protocol = \"h2\"\ntls = {{ server_name = \"up.test\", ca_file = \"{ca}\" }}"),
        ),
        // The self-signed certificate trusted as its own authority still needs the name.
        (
            "own-wrong-name",
            mutual.addr,
            format!(
                "tls = {{ server_name = \"other.test\", ca_file = \"{own}\", \
                 certificate = \"client\" }}"
            ),
        ),
        // ... and a purpose that lets it serve.
        (
            "own-client-only",
            clients_only.addr,
            format!(
                "tls = {{ server_name = \"up.test\", ca_file = \"{}\" }}",
                client_only.cert.display()
            ),
        ),
        (
            "own-signer",
            signs_only.addr,
            format!(
                "tls = {{ server_name = \"up.test\", ca_file = \"{}\" }}",
                signer.cert.display()
            ),
        ),
        (
            "own-crl",
            crl_only.addr,
            format!(
                "tls = {{ server_name = \"up.test\", ca_file = \"{}\" }}",
                end_crl.cert.display()
            ),
        ),
        (
            "own-ns-client",
            ns_clients.addr,
            format!(
                "tls = {{ server_name = \"up.test\", ca_file = \"{}\" }}",
                ns_client.cert.display()
            ),
        ),
        (
            "own-sgc",
            gated.addr,
            format!(
                "tls = {{ server_name = \"up.test\", ca_file = \"{}\" }}",
                sgc.cert.display()
            ),
        ),
    ];
    let mut config = format!(
        "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n\
         [[listeners]]\naddress = \"127.0.0.1:0\"\ntls = {{ certificates = [\"front\"] }}\n\n\
         [[certificates]]\nid = \"front\"\ncert_file = \"{own}\"\nkey_file = \"{}\"\n\n\
         [[certificates]]\nid = \"client\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n\
         [access_log]\npath = \"{}\"\n\n[limits]\nmax_body_bytes = 100000000\n\n\
         [timeouts]\nupstream_send_ms = 30000\n\n",
        srv.key.display(),
        client.cert.display(),
        client.key.display(),
        log.display()
    );
    for (id, addr, extra) in &upstreams {
        config += &format!(
            "[[upstreams]]\nid = \"{id}\"\ntargets = [{{ address = \"{addr}\" }}]\n{extra}\n\n\
             [[routes]]\nid = \"{id}\"\npath_prefix = \"/{id}/\"\nupstream = \"{id}\"\n\n"
        );
    }
    config += "[[routes]]\nid = \"shaped\"\npath_prefix = \"/shaped/\"\nupstream = \"verified\"\n\
               response = { deny = [\"secret\"] }\n";
    let gw = Gateway::start(&config, Driver::IoUring);

    // SNI carries the configured name; a second request reuses the pooled TLS connection.
    let first = answer(&gw, "/verified/a");
    assert_eq!(first["sni"], "api.up.test", "{first}");
    assert_eq!(first["client"], Value::Null);
    let second = answer(&gw, "/verified/b");
    assert_eq!(
        (&second["conn"], &second["req"], &second["path"]),
        (&first["conn"], &Value::from(2), &Value::from("/verified/b")),
        "{second}"
    );
    // An upstream that sends more than the answer (here a whole second answer, in TLS
    // records of its own that came in the same read): the connection is not reused, and
    // the next request gets its own answer.
    let (status, body) = request(&gw, "GET", "/verified/extra", b"");
    assert_eq!((status, body.as_slice()), (200, &b"{}"[..]));
    let next = answer(&gw, "/verified/next");
    assert_eq!(next["path"], "/verified/next", "{next}");
    assert_ne!(next["conn"], first["conn"], "{next}");
    // An upload and a large answer through TLS.
    let (status, body) = request(&gw, "POST", "/verified/up", &vec![b'u'; 300_000]);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status, &v["len"], &v["method"]),
        (200, &Value::from(300_000), &Value::from("POST"))
    );
    let (status, body) = request(&gw, "GET", "/verified/big", b"");
    assert_eq!((status, body.len()), (200, 1 << 20));
    assert!(body.iter().all(|&b| b == b'x'));
    // An answer the connection's close ends is whole with close_notify only; a FIN alone
    // (an attacker's cut, RFC 9112 9.8) resets the client's connection (before: relayed as
    // whole, ended by a FIN).
    for (path, whole) in [
        ("/verified/until-close", true),
        ("/verified/until-cut", false),
    ] {
        let mut c = gw.connect();
        c.send(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        let mut got = Vec::new();
        let end = c.stream.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("the-body"), "{path}: {text}");
        assert_eq!(end.is_ok(), whole, "{path}: {end:?} {text}");
    }

    // An upload the target refuses at once and stops reading (its socket's bytes are TLS
    // records): its 413 reaches the client once the upload stalls, not after `send_ms`. An
    // early 200 on a route whose `response` filters goes through the filter, whether the
    // target then waits or closes at once (a reset: its answer is read before the error).
    for (path, status, body) in [
        ("/verified/early", 413, "too big!"),
        ("/shaped/early-json", 200, r#"{"a":1}"#),
        ("/shaped/early-json-close", 200, r#"{"a":1}"#),
    ] {
        let mut c = gw.connect();
        let size = 48 << 20;
        c.send(
            format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n").as_bytes(),
        );
        let mut writer = c.stream.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let chunk = vec![b'y'; 1 << 20];
            for _ in 0..size >> 20 {
                if writer.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let started = Instant::now();
        let r = c.read_response_to("POST");
        assert_eq!((r.status, r.body_str()), (status, body), "{path}");
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{path}: {:?}",
            started.elapsed()
        );
        drop(c);
        sender.join().unwrap();
    }

    // Certificates that do not hold: 502, logged as `upstream_tls`.
    let refused = [
        "/by-ip/",
        "/wrong-ca/",
        "/no-client-cert/",
        "/h2-only/",
        "/h2-no-alpn/",
        "/own-wrong-name/",
        "/own-client-only/",
        "/own-signer/",
        "/own-crl/",
        "/own-ns-client/",
    ];
    for path in refused {
        let (status, body) = request(&gw, "GET", path, b"");
        assert_eq!(status, 502, "{path}: {}", String::from_utf8_lossy(&body));
    }
    // Without verification any certificate is taken; an IP target sends no SNI.
    let v = answer(&gw, "/unverified/");
    assert_eq!(v["sni"], Value::Null, "{v}");
    // Mutual TLS: the client certificate is presented.
    let v = answer(&gw, "/mutual/");
    assert_eq!(
        (&v["client"], &v["sni"]),
        (&Value::from("Gateway Client"), &Value::from("up.test")),
        "{v}"
    );
    // HTTP/2 over TLS (ALPN h2) to the other gateway, which relays to the echo origin.
    // (The other gateway answers 421 to a Host that is not the SNI name, as HTTP/2 lets a
    // server do: the client's Host is forwarded, so here it is that name.)
    let (status, body) = request_to(&gw, "b.up.test", "GET", "/h2/x", b"");
    assert_eq!((status, body.as_slice()), (200, &b"origin saw /h2/x"[..]));
    let seen = origin.requests().pop().unwrap();
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));

    // Every request above has its line: the access log is written behind the answers, so
    // a count short of them all could read the log before the last ones (a run of the whole
    // suite found `/own-wrong-name/`'s missing with 16).
    // Server-gated crypto is a purpose OpenSSL takes for a server (the first version of the
    // check refused it).
    assert_eq!(answer(&gw, "/own-sgc/")["sni"], "up.test");
    let lines = wait_log_lines(&log, 25);
    let kind = |path: &str| {
        lines
            .iter()
            .find(|l| l["path"] == path)
            .map(|l| l["error"].clone())
            .unwrap_or_else(|| panic!("no line for {path}: {lines:?}"))
    };
    let tls_failures = [
        "/by-ip/",
        "/wrong-ca/",
        "/h2-only/",
        "/h2-no-alpn/",
        "/own-wrong-name/",
        "/own-client-only/",
        "/own-signer/",
        "/own-crl/",
        "/own-ns-client/",
    ];
    for path in tls_failures {
        assert_eq!(kind(path), "upstream_tls", "{path}");
    }
    // TLS 1.3: the server refuses the missing certificate after the client's handshake is
    // done, so the refusal arrives as the answer's first read.
    assert_ne!(kind("/no-client-cert/"), Value::Null);

    // A WebSocket tunnel through TLS: bytes both ways after the 101.
    let mut s = TcpStream::connect(gw.listeners[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"GET /verified/ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\n\r\n",
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while find(&got, b"\r\n\r\n").is_none() {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed before the 101: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s.write_all(b"ping through tls").unwrap();
    let mut echoed = vec![0u8; 16];
    s.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"ping through tls");
    drop(s);
    // A tunnel whose TLS target ends it with a FIN alone (which anyone on the path can
    // forge) ends for a TLS client without close_notify; with close_notify, with one
    // (before: both passed on as clean ends).
    for (path, end) in [("ws-close", "close_notify"), ("ws-cut", "no close_notify")] {
        let request = format!(
            "GET /verified/{path} HTTP/1.1\r\nHost: up.test\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\n\r\n"
        );
        let (ended, data) =
            crate::tls::tls_read_all(gw.listeners[1], &own.to_string(), "up.test", &request);
        let text = String::from_utf8_lossy(&data);
        assert!(
            text.starts_with("HTTP/1.1 101") && text.ends_with("bye"),
            "{path}: {text}"
        );
        assert_eq!(ended, end, "{path}: {text}");
    }
    // A TLS client that ends the tunnel with a FIN alone: its end is not passed on to the
    // target as a clean one (before: close_notify); the tunnel is aborted.
    const RAGGED: &str = r#"
import socket, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                    server_hostname="up.test")
s.sendall(b"GET /verified/ws-report HTTP/1.1\r\nHost: up.test\r\nUpgrade: websocket\r\n"
          b"Connection: Upgrade\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(4096)
raw = socket.socket(fileno=s.detach())
raw.shutdown(socket.SHUT_WR)
after = b""
try:
    while True:
        chunk = raw.recv(65536)
        if not chunk:
            break
        after += chunk
except OSError:
    pass
print(head.split(b"\r\n")[0].decode(), len(after))
"#;
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            RAGGED,
            &gw.listeners[1].port().to_string(),
            &own.to_string(),
        ])
        .output()
        .expect("python3 runs");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.starts_with("HTTP/1.1 101 "), "{out:?}");
    assert_eq!(open.line(), "ws-report ragged");

    // Health checks over TLS: the verified upstream's target passes, the one checked against
    // the wrong authority fails.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let good = gw
            .admin("GET", "/v1/upstreams/verified/health", None)
            .json();
        let bad = gw
            .admin("GET", "/v1/upstreams/wrong-ca/health", None)
            .json();
        let (g, b) = (&good["targets"][0], &bad["targets"][0]);
        if g["last_check"]["ok"] == true && b["state"] == "unhealthy" {
            assert_eq!(g["state"], "healthy", "{good}");
            assert_eq!(g["last_check"]["status"], 200, "{good}");
            break;
        }
        assert!(Instant::now() < deadline, "{good}\n{bad}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The client certificate is in use: deleting it is refused, naming the upstream.
    let r = gw.admin("DELETE", "/v1/certificates/client", None);
    assert_eq!(r.status, 409, "{}", r.body_str());
    assert!(
        r.body_str().contains("upstreams/mutual"),
        "{}",
        r.body_str()
    );

    // Other TLS settings for an upstream: its pooled connections are left, not reused with
    // the old ones (here the SNI name).
    let before = answer(&gw, "/verified/c");
    let put = |tls: Value| {
        let body = serde_json::json!({"id": "verified", "tls": tls,
            "targets": [{"address": open.addr.to_string()}]});
        gw.admin("PUT", "/v1/upstreams/verified", Some(&body.to_string()))
    };
    let ca_path = authority.cert.to_str().unwrap();
    let r = put(serde_json::json!({"server_name": "b.up.test", "ca_file": ca_path}));
    assert_eq!(r.status, 200, "{}", r.body_str());
    let after = answer(&gw, "/verified/d");
    assert_eq!(after["sni"], "b.up.test", "{after}");
    assert_ne!(after["conn"], before["conn"], "{before} {after}");
    // Settings that cannot work are refused, naming the field.
    let r = put(serde_json::json!({"ca_pem": "junk"}));
    assert_eq!(r.status, 422, "{}", r.body_str());
    assert!(r.body_str().contains("/tls/ca_pem"), "{}", r.body_str());
    // A bundle with the authority's private key in it would be stored, journaled and shown
    // by every GET as sent (before: 200, the key in the answer).
    let bundle = std::fs::read_to_string(&authority.cert).unwrap()
        + &std::fs::read_to_string(&authority.key).unwrap();
    let r = put(serde_json::json!({"server_name": "b.up.test", "ca_pem": bundle}));
    assert_eq!(r.status, 422, "{}", r.body_str());
    assert!(r.body_str().contains("/tls/ca_pem"), "{}", r.body_str());
    assert!(!r.body_str().contains("BEGIN"), "{}", r.body_str());
    let r = put(serde_json::json!({"verify": false, "ca_file": ca_path}));
    assert_eq!(r.status, 422, "{}", r.body_str());

    let metrics = gw.admin("GET", "/metrics", None).body_str().to_owned();
    let count = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("gateway_errors_total{side=\"upstream\",kind=\"upstream_tls\"} ")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(count.parse::<u64>().unwrap() >= 3, "{count}");

    // A `ca_file` whose content changed (the authority rotated): the next publish (here
    // SIGHUP, the config file itself unchanged) trusts the new authorities. First the file
    // is applied again (it replaces the changes made through the API above).
    gw.signal(libc::SIGHUP);
    gw.wait_log("it replaced the changes", Duration::from_secs(5));
    let revision = |gw: &Gateway| gw.admin("GET", "/v1/status", None).json()["revision"].clone();
    let before = revision(&gw);
    std::fs::copy(&authority.cert, &other.cert).unwrap();
    gw.signal(libc::SIGHUP);
    let line = gw.wait_log(
        &format!("(revision {})", before.as_u64().unwrap() + 1),
        Duration::from_secs(5),
    );
    assert!(!line.contains("no change"), "{line}");
    let v = answer(&gw, "/wrong-ca/");
    assert_eq!(v["sni"], "up.test", "{v}");
}
