//! Gateway nodes sharing their config through etcd (Debian `etcd-server`, started here on
//! free loopback ports): a change written through one node serves on the others (the time it
//! takes is measured and printed), two writers with the same ETag get one 2xx and one 412,
//! writes without If-Match are retried on the newer revision, a DELETE of what another node's
//! listeners use is refused, node settings stay in the node files, private keys are sealed in
//! etcd, a node killed while the config changes catches up when it starts, and while etcd is
//! away the nodes keep serving, writes get 503 and afterwards everything converges; a watch
//! whose etcd member hangs is opened again on one that answers.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;
use crate::tls::Cert;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An etcd server on loopback with its own data directory, killed when dropped.
struct Etcd {
    child: Option<Child>,
    port: u16,
    peer: u16,
    dir: PathBuf,
    /// With TLS on the client port: the CA that signed the server's certificate.
    ca: Option<PathBuf>,
    /// More `etcd` arguments.
    extra: Vec<String>,
}

impl Etcd {
    fn start() -> Etcd {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Etcd {
        let mut e = Etcd {
            child: None,
            port: free_port(),
            peer: free_port(),
            dir: temp_dir("etcd"),
            ca: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        e.run();
        e
    }

    /// An etcd serving its clients over TLS, with a certificate for 127.0.0.1 signed by a CA
    /// made here.
    fn start_tls() -> Etcd {
        let dir = temp_dir("etcd-tls");
        make_ca(&dir, "test etcd CA");
        signed_leaf(&dir, "server", "127.0.0.1", "IP:127.0.0.1");
        let mut e = Etcd {
            child: None,
            port: free_port(),
            peer: free_port(),
            ca: Some(dir.join("ca.pem")),
            extra: Vec::new(),
            dir,
        };
        e.run();
        e
    }

    /// Starts (or restarts, on the same data) the server and waits until it is healthy.
    fn run(&mut self) {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.port);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let mut cmd = Command::new("etcd");
        if self.ca.is_some() {
            cmd.arg("--cert-file")
                .arg(self.dir.join("server.pem"))
                .arg("--key-file")
                .arg(self.dir.join("server.key"));
        }
        let child = cmd
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--name", "default"])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (Debian etcd-server) is needed: scripts/test installs it");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(r) = self.http("GET", "/health", "") {
                if r.contains("\"true\"") {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "etcd did not become healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (as a crash or a network cut would look to the nodes).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self, prefix: &str) -> String {
        match &self.ca {
            Some(ca) => format!(
                "etcds://127.0.0.1:{}/{prefix}?ca={}",
                self.port,
                ca.display()
            ),
            None => format!("etcd://127.0.0.1:{}/{prefix}", self.port),
        }
    }

    /// One request to etcd's JSON gateway; the body, or None if it cannot be reached.
    fn http(&self, method: &str, path: &str, body: &str) -> Option<String> {
        use std::io::{Read, Write};
        if let Some(ca) = &self.ca {
            let out = Command::new("curl")
                .args(["-s", "--max-time", "5", "-X", method, "--cacert"])
                .arg(ca)
                .args(["--data-binary", body])
                .arg(format!("https://127.0.0.1:{}{path}", self.port))
                .output()
                .expect("curl (Debian curl) is needed: scripts/test installs it");
            return out
                .status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\nContent-Length: \
             {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).ok()?;
        let text = String::from_utf8_lossy(&out).into_owned();
        Some(text.split_once("\r\n\r\n")?.1.to_owned())
    }

    /// Puts `value` at `key` by hand (as `etcdctl put`); whether etcd answered.
    fn put(&self, key: &str, value: &str) -> bool {
        let put = serde_json::json!({"key": b64(key.as_bytes()), "value": b64(value.as_bytes())});
        self.http("POST", "/v3/kv/put", &put.to_string()).is_some()
    }

    /// Every value stored under `prefix`, decoded.
    fn values_under(&self, prefix: &str) -> Vec<String> {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        let body = format!(
            r#"{{"key":"{}","range_end":"{}"}}"#,
            b64(prefix.as_bytes()),
            b64(&end)
        );
        let answer = self.http("POST", "/v3/kv/range", &body).expect("etcd");
        // A chunked answer: the JSON object is the longest line.
        let json = answer
            .lines()
            .max_by_key(|l| l.len())
            .unwrap_or_default()
            .to_owned();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["kvs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|kv| String::from_utf8(unb64(kv["value"].as_str().unwrap())).unwrap())
            .collect()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unb64(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = B64.iter().position(|&x| x == c).unwrap() as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// A node file: one listener (with `listener_extra`), the node's id, and `extra`.
fn node_file(id: &str, listener_extra: &str, extra: &str) -> String {
    format!(
        "workers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n{listener_extra}\n\n\
         [cluster]\nnode_id = \"{id}\"\n{extra}\n"
    )
}

fn node(etcd: &Etcd, prefix: &str, file: &str) -> Gateway {
    Gateway::start_with(file, Driver::IoUring, &["--store", &etcd.url(prefix)])
}

/// Status and body of `GET path` on a node's listener.
fn get(gw: &Gateway, path: &str) -> (u16, String) {
    let r = gw
        .connect()
        .roundtrip(&format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
    (r.status, r.body_str().to_owned())
}

/// Waits until `GET path` on `gw` answers `body`; how long that took.
fn wait_serves(gw: &Gateway, path: &str, body: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if get(gw, path) == (200, body.to_owned()) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{path} did not serve {body:?} within {timeout:?}: {:?}",
            get(gw, path)
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Runs a gateway that must exit by itself (within 15 s; one that does not is killed, and
/// its output shows how far it got): its status and stderr.
fn exit_of(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
    }
    child.wait_with_output().unwrap()
}

fn respond_route(path: &str, body: &str) -> String {
    format!(r#"{{"path":"{path}","respond":{{"status":200,"body":"{body}"}}}}"#)
}

/// Puts routes `/r0` .. `/r{n-1}` answering `r` through `gw`, each a new one (201).
fn put_routes(gw: &Gateway, n: usize) {
    for i in 0..n {
        let path = format!("/r{i}");
        let r = gw.admin(
            "PUT",
            &format!("/v1/routes/r{i}"),
            Some(&respond_route(&path, "r")),
        );
        assert_eq!(r.status, 201, "{}", r.body_str());
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn three_nodes_share_one_config() {
    let etcd = Etcd::start();
    let secret_dir = temp_dir("secret");
    let secret = secret_dir.join("secret.hex");
    std::fs::write(&secret, format!("{}\n", "5a".repeat(32))).unwrap();
    let cluster_extra = format!("secret_file = \"{}\"", secret.display());
    // Node a seeds the empty store with the policy b's listener uses.
    let a = node(
        &etcd,
        "t1",
        &format!(
            "{}\n[[policies]]\nid = \"lan\"\nkind = \"ip_filter\"\nallow = [\"127.0.0.0/8\"]\n",
            node_file("a", "", &cluster_extra)
        ),
    );
    let b = node(
        &etcd,
        "t1",
        &node_file("b", "policies = [\"lan\"]", &cluster_extra),
    );
    let c = node(&etcd, "t1", &node_file("c", "", &cluster_extra));

    // Every node is listed with the revision it serves.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let nodes = c.admin("GET", "/v1/nodes", None).json();
        let ids: Vec<&str> = nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_str().unwrap())
            .collect();
        if ids == ["a", "b", "c"] {
            assert!(nodes["nodes"][1]["applied_revision"].as_u64().unwrap() >= 1);
            assert!(nodes["nodes"][1]["last_seen"].as_u64().unwrap() > 0);
            break;
        }
        assert!(Instant::now() < deadline, "nodes: {nodes}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A route written through a serves on b and c; the time it takes, measured.
    let mut delays = Vec::new();
    for i in 0..20 {
        let path = format!("/p{i}");
        let body = format!("r{i}");
        let r = a.admin(
            "PUT",
            &format!("/v1/routes/p{i}"),
            Some(&respond_route(&path, &body)),
        );
        assert_eq!(r.status, 201, "{}", r.body_str());
        std::thread::scope(|s| {
            let hb = s.spawn(|| wait_serves(&b, &path, &body, Duration::from_secs(2)));
            let hc = s.spawn(|| wait_serves(&c, &path, &body, Duration::from_secs(2)));
            delays.push(hb.join().unwrap());
            delays.push(hc.join().unwrap());
        });
    }
    delays.sort();
    println!(
        "propagation a -> b, c over {} samples: p50 {:?}, p90 {:?}, max {:?}",
        delays.len(),
        percentile(&delays, 0.5),
        percentile(&delays, 0.9),
        delays[delays.len() - 1]
    );

    // The same ETag through two nodes at once: one 2xx, one 412.
    let etag = b.admin("GET", "/v1/routes/p0", None);
    let etag = etag.header("etag").unwrap().to_owned();
    let write = |gw: &Gateway, body: &str| {
        let gw_body = respond_route("/p0", body);
        gw.admin_with(
            "PUT",
            "/v1/routes/p0",
            Some(&gw_body),
            &[
                ("Authorization", &format!("Bearer {ADMIN_TOKEN}")),
                ("If-Match", &etag),
            ],
        )
        .status
    };
    let statuses = std::thread::scope(|s| {
        let ha = s.spawn(|| write(&a, "from-a"));
        let hb = s.spawn(|| write(&b, "from-b"));
        let mut v = [ha.join().unwrap(), hb.join().unwrap()];
        v.sort();
        v
    });
    assert_eq!(statuses, [200, 412]);

    // Writers without If-Match on two nodes at once: every write lands, none is lost.
    std::thread::scope(|s| {
        for (gw, tag) in [(&a, "a"), (&c, "c")] {
            s.spawn(move || {
                for i in 0..8 {
                    let r = gw.admin(
                        "PUT",
                        &format!("/v1/routes/w{tag}{i}"),
                        Some(&respond_route(&format!("/w{tag}{i}"), tag)),
                    );
                    assert_eq!(r.status, 201, "{}", r.body_str());
                }
            });
        }
    });
    for gw in [&a, &b, &c] {
        for tag in ["a", "c"] {
            for i in 0..8 {
                wait_serves(gw, &format!("/w{tag}{i}"), tag, Duration::from_secs(5));
            }
        }
    }
    let revision = a.admin("GET", "/v1/config", None);
    let current: u64 = revision.header("etag").unwrap()[9..]
        .trim_end_matches('"')
        .parse()
        .unwrap();
    // Seed, 20 routes, one of the two If-Match writes, 16 writes.
    assert_eq!(current, 1 + 20 + 1 + 16);

    // A dry run through b changes nothing; a batch through b lands on every node at once.
    let r = b.admin(
        "PUT",
        "/v1/routes/dry?dry_run=true",
        Some(&respond_route("/dry", "dry")),
    );
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(r.json()["changes"][0]["op"], "add");
    let batch = serde_json::json!({"operations": [
        {"op": "put", "kind": "routes", "id": "b1", "value": {"path": "/b1", "respond": {"body": "b1"}}},
        {"op": "delete", "kind": "routes", "id": "wa7"},
    ]});
    let r = b.admin("POST", "/v1/config:batch", Some(&batch.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    for gw in [&a, &c] {
        wait_serves(gw, "/b1", "b1", Duration::from_secs(5));
        assert_eq!(get(gw, "/wa7").0, 404);
        assert_eq!(get(gw, "/dry").0, 404);
    }
    let current = current + 1;

    // What another node's listeners use cannot be deleted; what is unused can. A dry run
    // says so too (before: 200 with the revision it would make).
    for query in ["?dry_run=true", ""] {
        let r = a.admin("DELETE", &format!("/v1/policies/lan{query}"), None);
        assert_eq!(r.status, 409, "{query}: {}", r.body_str());
        assert!(r.body_str().contains("node b"), "{}", r.body_str());
    }
    // Nor made a policy no listener can have (before: 200, and node b refused that config
    // and every later one, serving the one before, and could not start again).
    let rate = r#"{"kind":"rate_limit","rate":100}"#;
    let r = a.admin("PUT", "/v1/policies/lan", Some(rate));
    assert_eq!(r.status, 409, "{}", r.body_str());
    assert!(r.body_str().contains("node b"), "{}", r.body_str());

    // Node settings stay in the node files: the config read back is accepted unchanged,
    // a change to a node setting is refused with a pointer.
    let config = c.admin("GET", "/v1/config", None).json();
    let r = c.admin("PUT", "/v1/config", Some(&config.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    let mut changed = config.clone();
    changed["workers"] = serde_json::json!(2);
    let r = c.admin("PUT", "/v1/config", Some(&changed.to_string()));
    assert_eq!(r.status, 422, "{}", r.body_str());
    assert_eq!(r.json()["pointer"], "/workers");

    // History and rollback work the same: roll back (through c) to before the w* routes.
    let revisions = c.admin("GET", "/v1/revisions", None).json();
    assert_eq!(revisions["current"], current);
    assert_eq!(
        revisions["revisions"].as_array().unwrap().len() as u64,
        current
    );
    let r = c.admin("POST", "/v1/revisions/21:rollback?dry_run=true", None);
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(get(&a, "/b1").0, 200);
    let r = c.admin("POST", "/v1/revisions/21:rollback", None);
    assert_eq!(r.status, 200, "{}", r.body_str());
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&a, "/wa0").0 != 404 || get(&b, "/wc7").0 != 404 {
        assert!(Instant::now() < deadline, "rollback did not reach a and b");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(get(&b, "/p19"), (200, "r19".to_owned()));

    // A private key is sealed in etcd and reaches the other nodes.
    let cert = Cert::new(&secret_dir, "shared.test");
    let body = serde_json::json!({"cert_pem": cert.cert_pem(), "key_pem": cert.key_pem()});
    let r = a.admin("PUT", "/v1/certificates/shared", Some(&body.to_string()));
    assert_eq!(r.status, 201, "{}", r.body_str());
    let sha = r.json()["key_sha256"].as_str().unwrap().to_owned();
    let sealed = etcd.values_under("/t1/keys/");
    assert_eq!(sealed.len(), 1);
    assert!(!sealed[0].contains("PRIVATE KEY"), "{}", sealed[0]);
    assert!(sealed[0].contains("AES-256-GCM"));
    for gw in [&b, &c] {
        let deadline = Instant::now() + Duration::from_secs(5);
        let on_disk = gw.data_dir.join("keys").join(format!("{sha}.pem"));
        while !on_disk.exists() {
            assert!(
                Instant::now() < deadline,
                "{} has no key",
                gw.data_dir.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(std::fs::read_to_string(&on_disk).unwrap(), cert.key_pem());
    }
    for v in etcd.values_under("/t1/") {
        assert!(!v.contains("PRIVATE KEY"));
    }
    // A node that started after the key changed has only the new one; a rollback to the
    // revision with the first (or a PUT naming it by digest) fetches it from etcd (before:
    // 422, "no stored key has this digest").
    let with_first = c.admin("GET", "/v1/revisions", None).json()["current"]
        .as_u64()
        .unwrap();
    let other = Cert::new(&secret_dir, "other.test");
    let body = serde_json::json!({"cert_pem": other.cert_pem(), "key_pem": other.key_pem()});
    let r = a.admin("PUT", "/v1/certificates/shared", Some(&body.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    let d = node(&etcd, "t1", &node_file("d", "", &cluster_extra));
    let first_key = d.data_dir.join("keys").join(format!("{sha}.pem"));
    assert!(!first_key.exists());
    let r = d.admin(
        "POST",
        &format!("/v1/revisions/{with_first}:rollback?dry_run=true"),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body_str());
    let body = serde_json::json!({"cert_pem": cert.cert_pem(), "key_sha256": sha});
    let r = d.admin("PUT", "/v1/certificates/shared", Some(&body.to_string()));
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(std::fs::read_to_string(&first_key).unwrap(), cert.key_pem());
    drop(d);

    // A node that stops cleanly takes its record out as it exits: what only its listeners
    // used can go at once (before: 409 until its lease ran out, 10 s later).
    let mut b = b;
    b.signal(libc::SIGTERM);
    assert_eq!(b.wait_exit(Duration::from_secs(10)), Some(0));
    let ids = |gw: &Gateway| {
        let nodes = gw.admin("GET", "/v1/nodes", None).json();
        let ids: Vec<String> = nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_str().unwrap().to_owned())
            .collect();
        ids
    };
    assert_eq!(ids(&a), ["a", "c"]);
    let r = a.admin("DELETE", "/v1/policies/lan", None);
    assert_eq!(r.status, 204, "{}", r.body_str());
}

#[test]
fn nodes_catch_up_and_outlive_an_etcd_outage() {
    let mut etcd = Etcd::start();
    let a = node(&etcd, "t2", &node_file("a", "", ""));
    let mut b = node(&etcd, "t2", &node_file("b", "", ""));
    let c = node(&etcd, "t2", &node_file("c", "", ""));
    let r = a.admin("PUT", "/v1/routes/one", Some(&respond_route("/one", "1")));
    assert_eq!(r.status, 201, "{}", r.body_str());
    wait_serves(&b, "/one", "1", Duration::from_secs(5));

    // A node killed while the config changes catches up when it starts again.
    b.signal(libc::SIGKILL);
    b.wait_exit_status(Duration::from_secs(5)).unwrap();
    let r = a.admin("PUT", "/v1/routes/two", Some(&respond_route("/two", "2")));
    assert_eq!(r.status, 201, "{}", r.body_str());
    let b = Gateway::start_with_data(
        &b.config_path.clone(),
        &b.data_dir.clone(),
        &["--store", &etcd.url("t2")],
    );
    assert_eq!(get(&b, "/two"), (200, "2".to_owned()));
    assert_eq!(get(&b, "/one"), (200, "1".to_owned()));

    // etcd away: every node keeps serving, writes get 503, the status says so.
    wait_serves(&c, "/two", "2", Duration::from_secs(5));
    etcd.stop();
    for gw in [&a, &b, &c] {
        let r = gw.admin(
            "PUT",
            "/v1/routes/three",
            Some(&respond_route("/three", "3")),
        );
        assert_eq!(r.status, 503, "{}", r.body_str());
        assert_eq!(r.json()["title"], "Store Unavailable");
        // Nothing reached etcd: the answer says nothing changed (before, it said a write
        // may have been made whatever the failure).
        assert!(r.body_str().contains("nothing changed"), "{}", r.body_str());
    }
    for gw in [&a, &b, &c] {
        assert_eq!(get(gw, "/two"), (200, "2".to_owned()));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = gw.admin("GET", "/v1/status", None).json();
            if s["store"]["reachable"] == false {
                assert_eq!(s["store"]["applied_revision"], 3);
                break;
            }
            assert!(Instant::now() < deadline, "status: {s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // etcd back: writes work again and every node converges.
    etcd.run();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = b.admin(
            "PUT",
            "/v1/routes/three",
            Some(&respond_route("/three", "3")),
        );
        if r.status == 201 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.body_str());
        assert!(
            Instant::now() < deadline,
            "writes still fail: {}",
            r.body_str()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for gw in [&a, &b, &c] {
        wait_serves(gw, "/three", "3", Duration::from_secs(10));
        let deadline = Instant::now() + Duration::from_secs(5);
        while gw.admin("GET", "/v1/status", None).json()["store"]["reachable"] != true {
            assert!(Instant::now() < deadline, "store still unreachable");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The node without a secret refuses a private key instead of storing it in the clear.
    let cert = Cert::new(&temp_dir("cert"), "nosecret.test");
    let body = serde_json::json!({"cert_pem": cert.cert_pem(), "key_pem": cert.key_pem()});
    let r = a.admin("PUT", "/v1/certificates/x", Some(&body.to_string()));
    assert_eq!(r.status, 422, "{}", r.body_str());
    assert!(etcd.values_under("/t2/keys/").is_empty());
}

#[test]
fn seed_from_copies_a_data_directory_once() {
    let etcd = Etcd::start();
    // A single node's data directory with a route.
    let local = Gateway::start(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[[routes]]\nid = \"old\"\npath = \"/old\"\n\
         respond = { body = \"from the data directory\" }\n",
        Driver::IoUring,
    );
    let data = local.data_dir.clone();
    drop(local);
    let file = node_file("a", "", "");
    let a = Gateway::start_with(
        &file,
        Driver::IoUring,
        &[
            "--store",
            &etcd.url("t3"),
            "--seed-from",
            data.to_str().unwrap(),
        ],
    );
    assert_eq!(get(&a, "/old"), (200, "from the data directory".to_owned()));
    let revisions = a.admin("GET", "/v1/revisions", None).json();
    assert_eq!(revisions["current"], 1);
    let source = revisions["revisions"][0]["source"].as_str().unwrap();
    assert!(source.starts_with("data directory"), "{source}");

    // Once: a store that holds a config is not overwritten.
    let dir = temp_dir("seed-again");
    let path = dir.join("node.toml");
    std::fs::write(&path, format!("{file}{ADMIN_SECTION}")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--store", &etcd.url("t3"), "--config"])
        .arg(&path)
        .arg("--seed-from")
        .arg(&data)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already holds config revision 1"), "{err}");
    // Nor one that holds no config but its history (the key deleted by hand): that is not
    // an empty store (before: the seed was ignored, and the history's newest served).
    let seed_into = |prefix: &str| {
        exit_of(
            Command::new(env!("CARGO_BIN_EXE_gateway"))
                .args(["--store", &etcd.url(prefix), "--config"])
                .arg(&path)
                .arg("--seed-from")
                .arg(&data)
                .arg("--data-dir")
                .arg(dir.join("data")),
        )
    };
    let history = node(&etcd, "t3h", &node_file("h", "", ""));
    put_routes(&history, 1);
    drop(history);
    let del = serde_json::json!({"key": b64(b"/t3h/config")});
    assert!(etcd
        .http("POST", "/v3/kv/deleterange", &del.to_string())
        .is_some());
    let out = seed_into("t3h");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("holds no config but the history"), "{err}");
    // Refused before the node claimed its id: no record of it holds another node's writes.
    let records = etcd.values_under("/t3h/nodes/");
    assert!(
        records.iter().all(|r| !r.contains(r#""id":"a""#)),
        "{records:?}"
    );

    // A node file whose admin address changed since the start: the upgrade is refused, as
    // for a listener's, and the old process serves on (before: the successor took the
    // handed-over socket while its config named an address nothing listened on).
    let file = std::fs::read_to_string(&a.config_path).unwrap();
    let moved = file.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.2:0\"");
    assert_ne!(moved, file);
    std::fs::write(&a.config_path, moved).unwrap();
    a.signal(libc::SIGUSR2);
    a.wait_log(
        "the socket handed over is bound to",
        Duration::from_secs(30),
    );
    a.wait_log("upgrade failed", Duration::from_secs(30));
    std::fs::write(&a.config_path, file).unwrap();
    assert_eq!(get(&a, "/old"), (200, "from the data directory".to_owned()));

    // An upgrade's successor, started with the same arguments, takes the store as its
    // predecessor left it (before: it refused it as a seed would, and the upgrade failed).
    let chain = crate::upgrade::Chain::new();
    let next = chain.push(crate::upgrade::upgrade(&a));
    assert_eq!(get(&a, "/old"), (200, "from the data directory".to_owned()));
    // A store emptied since (etcd rebuilt, its history gone): the next successor seeds
    // nothing, and the upgrade fails with the old process serving on (before: it seeded the
    // store again from `--seed-from`, replacing what every node served).
    let everything = serde_json::json!({"key": b64(b"/t3/"), "range_end": b64(b"/t30")});
    assert!(etcd
        .http("POST", "/v3/kv/deleterange", &everything.to_string())
        .is_some());
    // SAFETY: kill(2) on the gateway process this test's upgrade started.
    unsafe { libc::kill(next as i32, libc::SIGUSR2) };
    a.wait_log(
        "an upgrade's successor does not seed the store",
        Duration::from_secs(30),
    );
    assert_eq!(get(&a, "/old"), (200, "from the data directory".to_owned()));
    assert!(etcd.values_under("/t3/config").is_empty());
    crate::upgrade::stop(next);

    // A node file without [cluster] node_id is refused.
    std::fs::write(
        &path,
        format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n{ADMIN_SECTION}"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--store", &etcd.url("t3"), "--config"])
        .arg(&path)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node_id"));
}

#[test]
fn seed_from_takes_a_directory_an_earlier_build_stored_as_its_start_would() {
    // A data directory written by a build whose rules were looser (a 204 with a body): a
    // node starts on it, and it can be seeded into etcd as it is, what a newer rule refuses
    // left out and said (before: "invalid config", exit 2, until fixed by hand).
    let etcd = Etcd::start();
    let dir = temp_dir("seed-looser");
    let data = dir.join("data");
    stored_by_an_earlier_build(
        &data,
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n\
         [[routes]]\nid = \"nc\"\npath = \"/nc\"\nrespond = { status = 204, body = \"x\" }\n",
    );
    let a = Gateway::start_with(
        &node_file("a", "", ""),
        Driver::IoUring,
        &[
            "--store",
            &etcd.url("t3s"),
            "--seed-from",
            data.to_str().unwrap(),
        ],
    );
    let r = a.connect().roundtrip("GET /nc HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!((r.status, r.body.len()), (204, 0), "{}", r.head);
    let warned = a.wait_log("respond.body", Duration::from_secs(5));
    assert!(
        warned.contains("a write through the API must fix it"),
        "{warned}"
    );
}

#[test]
fn a_start_that_fails_after_claiming_its_record_lets_it_go() {
    // Its admin address taken: the start fails (exit 1) after the node claimed its record,
    // which goes at once (before: it stood for its 10 s TTL as a live node's).
    let etcd = Etcd::start();
    let seeded = node(&etcd, "t9", &node_file("a", "", ""));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = temp_dir("claim-fails");
    let path = dir.join("node.toml");
    let admin = format!(
        "\n[admin]\nlisten = \"{}\"\ntoken = \"test-admin-token-0123456789\"\n",
        taken.local_addr().unwrap()
    );
    std::fs::write(&path, format!("{}{admin}", node_file("z", "", ""))).unwrap();
    let out = exit_of(
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--store", &etcd.url("t9"), "--config"])
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.join("data")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("admin API"), "{err}");
    let records = etcd.values_under("/t9/nodes/");
    assert!(
        records.iter().all(|r| !r.contains(r#""id":"z""#)),
        "{records:?}"
    );
    assert!(
        records.iter().any(|r| r.contains(r#""id":"a""#)),
        "{records:?}"
    );
    drop(seeded);
}

#[test]
fn a_start_takes_only_a_node_file_validate_node_takes() {
    // The store holds certificate `api`; a node file whose listener names it twice is
    // refused at the start (exit 2, the field named) as `validate --node` refuses it
    // (before: it started, compiled with the tolerance stored configs get).
    let etcd = Etcd::start();
    let dir = temp_dir("node-file-checked");
    let secret = dir.join("secret.hex");
    std::fs::write(&secret, format!("{}\n", "5a".repeat(32))).unwrap();
    let extra = format!("secret_file = \"{}\"", secret.display());
    let seeded = node(&etcd, "t10", &node_file("a", "", &extra));
    let cert = Cert::new(&dir, "api.test");
    let body = serde_json::json!({"cert_pem": cert.cert_pem(), "key_pem": cert.key_pem()});
    let r = seeded.admin("PUT", "/v1/certificates/api", Some(&body.to_string()));
    assert_eq!(r.status, 201, "{}", r.body_str());
    let path = dir.join("node.toml");
    let twice = "tls = { certificates = [\"api\", \"api\"] }";
    std::fs::write(&path, node_file("z", twice, &extra)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["validate", "--node"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("listeners[0].tls.certificates[1]"), "{err}");
    let out = exit_of(
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--store", &etcd.url("t10"), "--config"])
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.join("data")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("listeners[0].tls.certificates[1]"), "{err}");
    // Named once: it starts, and serves the store's certificate.
    let once = "tls = { certificates = [\"api\"] }";
    let started = node(&etcd, "t10", &node_file("z", once, &extra));
    let (status, _, err) = crate::tls::curl_tls(started.addr, "api.test", "/", &cert.cert, &[]);
    assert_eq!(status, 404, "{err}");
    drop(seeded);
}

#[test]
fn tls_and_credentials_to_etcd() {
    let etcd = Etcd::start_tls();
    // Authentication on, with a root user.
    for (path, body) in [
        (
            "/v3/auth/user/add",
            r#"{"name":"root","password":"s3cret-pw"}"#,
        ),
        ("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#),
        ("/v3/auth/enable", "{}"),
    ] {
        let answer = etcd.http("POST", path, body).expect("etcd over TLS");
        assert!(!answer.contains("\"error\""), "{path}: {answer}");
    }
    let with_user = etcd
        .url("t4")
        .replace("etcds://", "etcds://root:s3cret-pw@");
    let a = Gateway::start_with(
        &node_file("a", "", ""),
        Driver::IoUring,
        &["--store", &with_user],
    );
    let r = a.admin(
        "PUT",
        "/v1/routes/tls",
        Some(&respond_route("/tls", "over tls")),
    );
    assert_eq!(r.status, 201, "{}", r.body_str());
    assert_eq!(get(&a, "/tls"), (200, "over tls".to_owned()));
    let status = a.admin("GET", "/v1/status", None).json();
    assert_eq!(status["store"]["reachable"], true);
    // The password never shows.
    assert!(!status.to_string().contains("s3cret-pw"), "{status}");
    assert!(status["store"]["url"]
        .as_str()
        .unwrap()
        .starts_with("etcds://root:***@"));

    // A wrong password, no credentials, or a CA that did not sign etcd's certificate: the
    // node refuses to start, saying why.
    let dir = temp_dir("tls-refused");
    let path = dir.join("node.toml");
    std::fs::write(&path, format!("{}{ADMIN_SECTION}", node_file("b", "", ""))).unwrap();
    let other_ca = temp_dir("other-ca");
    make_ca(&other_ca, "other");
    let wrong_ca = format!(
        "etcds://root:s3cret-pw@127.0.0.1:{}/t4?ca={}",
        etcd.port,
        other_ca.join("ca.pem").display()
    );
    for (url, expect) in [
        (
            with_user.replace("s3cret-pw", "wrong"),
            "authentication failed",
        ),
        (etcd.url("t4"), "user name is empty"),
        (wrong_ca, "certificate"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--store", &url, "--config"])
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {err}");
        assert!(err.contains(expect), "{url}: {err}");
    }
}

/// A TCP relay to `to` that can freeze: while frozen it passes nothing on, either way,
/// on the connections it has and on new ones (which it still accepts), as a hung etcd
/// member's sockets do; with `answers_to` (a request line's start), it passes everything on
/// but the answers to those requests (`POST /v3/kv/txn`: a member that applies writes and
/// whose answers are lost). Each call of the node's etcd client has a connection of its own.
fn freezing_relay(
    to: u16,
    answers_to: Option<&'static [u8]>,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let frozen = std::sync::Arc::new(AtomicBool::new(false));
    let f = frozen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                continue;
            };
            // Whether this connection's answer is held: the request line says.
            let mut first = [0u8; 16];
            let held = answers_to.is_some_and(|start| {
                client
                    .peek(&mut first)
                    .is_ok_and(|n| first[..n].starts_with(start))
            });
            let txn_answers_only = answers_to.is_some();
            for (mut from, mut into, freezes) in [
                (
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    !txn_answers_only,
                ),
                (server, client, !txn_answers_only || held),
            ] {
                let f = f.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        while freezes && f.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        if into.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (port, frozen)
}

#[test]
fn a_watch_that_stops_delivering_is_opened_again_elsewhere() {
    // Node a watches through a relay (its first endpoint) that then hangs, as an etcd
    // member can (a frozen VM, a stuck disk) while the others go on: a reads the store's
    // revision every few seconds, sees its watch behind, and watches again on the endpoint
    // that answers. Before: a served the old config for as long as the watch's 15 minutes.
    let etcd = Etcd::start();
    let (relay, frozen) = freezing_relay(etcd.port, None);
    let url = format!("etcd://127.0.0.1:{relay},127.0.0.1:{}/t5", etcd.port);
    let a = Gateway::start_with(&node_file("a", "", ""), Driver::IoUring, &["--store", &url]);
    let b = node(&etcd, "t5", &node_file("b", "", ""));
    let r = b.admin("PUT", "/v1/routes/v", Some(&respond_route("/v", "1")));
    assert_eq!(r.status, 201, "{}", r.body_str());
    wait_serves(&a, "/v", "1", Duration::from_secs(5));
    frozen.store(true, std::sync::atomic::Ordering::Relaxed);
    let r = b.admin("PUT", "/v1/routes/v", Some(&respond_route("/v", "2")));
    assert_eq!(r.status, 200, "{}", r.body_str());
    let took = wait_serves(&a, "/v", "2", Duration::from_secs(30));
    println!("a served the change {took:?} after it was made, its watch's member hung");
    a.wait_log("the config watch has not delivered", Duration::from_secs(1));
}

#[test]
fn a_watch_whose_answer_never_comes_is_opened_again_elsewhere() {
    // Node a's first endpoint takes its watch and never answers it (a hung member, or a
    // proxy in front of one), all else passing: the watch's head is waited for as long as
    // any call's, and the watch opened on the endpoint that answers. Before: waited for up
    // to 15 minutes, the stall check unable to cut it short (the watch had no socket yet),
    // and a served the old config meanwhile.
    let etcd = Etcd::start();
    let (relay, frozen) = freezing_relay(etcd.port, Some(b"POST /v3/watch"));
    frozen.store(true, std::sync::atomic::Ordering::Relaxed);
    let url = format!("etcd://127.0.0.1:{relay},127.0.0.1:{}/t5w", etcd.port);
    let a = Gateway::start_with(&node_file("a", "", ""), Driver::IoUring, &["--store", &url]);
    let b = node(&etcd, "t5w", &node_file("b", "", ""));
    let r = b.admin("PUT", "/v1/routes/v", Some(&respond_route("/v", "1")));
    assert_eq!(r.status, 201, "{}", r.body_str());
    let took = wait_serves(&a, "/v", "1", Duration::from_secs(30));
    println!("a served the change {took:?} after it was made, its watch unanswered");
    // The watch runs on the endpoint that answers, and stays there: no outage said (the
    // second review found a deadline set once for all endpoints leaving none for the
    // second, so the watch failed every 3 s, each change seen only as it was read again).
    std::thread::sleep(Duration::from_secs(7));
    let r = b.admin("PUT", "/v1/routes/v", Some(&respond_route("/v", "2")));
    assert_eq!(r.status, 200, "{}", r.body_str());
    let took = wait_serves(&a, "/v", "2", Duration::from_secs(5));
    println!("and the next {took:?} after");
    let outages: Vec<String> = (a.log_lines().into_iter())
        .filter(|l| l.contains("config store unreachable"))
        .collect();
    assert!(outages.is_empty(), "{outages:?}");
}

#[test]
fn a_write_whose_answer_is_lost_is_read_back_not_sent_to_another_endpoint() {
    // Node a's first endpoint takes its requests and holds back the answers: etcd applied
    // the write, and its answer was lost. The write is not sent again to the second
    // endpoint (where its compare would fail as if another write had come first): the node
    // reads the config back and finds it made. Before: a PUT with If-Match that was made
    // answered 412, and a DELETE that was made 404.
    let etcd = Etcd::start();
    let (relay, frozen) = freezing_relay(etcd.port, Some(b"POST /v3/kv/txn"));
    let url = format!("etcd://127.0.0.1:{relay},127.0.0.1:{}/t9", etcd.port);
    let a = Gateway::start_with(&node_file("a", "", ""), Driver::IoUring, &["--store", &url]);
    let r = a.admin("PUT", "/v1/routes/d", Some(&respond_route("/d", "1")));
    assert_eq!(r.status, 201, "{}", r.body_str());
    let etag = r.header("etag").unwrap().to_owned();
    let before = a.admin("GET", "/v1/revisions", None).json()["revisions"]
        .as_array()
        .unwrap()
        .len();
    frozen.store(true, std::sync::atomic::Ordering::Relaxed);
    let r = a.admin_with(
        "PUT",
        "/v1/routes/d",
        Some(&respond_route("/d", "2")),
        &[
            ("Authorization", &format!("Bearer {ADMIN_TOKEN}")),
            ("If-Match", &etag),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body_str());
    a.wait_log("read back, it was made", Duration::from_secs(1));
    frozen.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(get(&a, "/d"), (200, "2".to_owned()));
    // One revision for the write, read back from etcd itself.
    let revisions = a.admin("GET", "/v1/revisions", None).json()["revisions"].clone();
    assert_eq!(
        revisions.as_array().unwrap().len(),
        before + 1,
        "{revisions}"
    );
    let stored = etcd.values_under("/t9/config");
    assert!(stored[0].contains(r#""body":"2""#), "{stored:?}");

    // The same while another node writes after the lost answer and before the read-back:
    // the config then holds the other node's record, and the write is still known made
    // (its revision's record is this node's). Before that was read: 404 for the DELETE.
    let c = Gateway::start_with(&node_file("c", "", ""), Driver::IoUring, &["--store", &url]);
    let b = node(&etcd, "t9", &node_file("b", "", ""));
    frozen.store(true, std::sync::atomic::Ordering::Relaxed);
    thread::scope(|s| {
        let delete = s.spawn(|| c.admin("DELETE", "/v1/routes/d", None));
        // Once etcd has the delete (its answer held back), b writes.
        let deadline = Instant::now() + Duration::from_secs(2);
        while etcd.values_under("/t9/config")[0].contains(r#""path":"/d""#) {
            assert!(Instant::now() < deadline, "the delete never reached etcd");
            thread::sleep(Duration::from_millis(10));
        }
        let r = b.admin("PUT", "/v1/routes/e", Some(&respond_route("/e", "e")));
        assert_eq!(r.status, 201, "{}", r.body_str());
        let r = delete.join().unwrap();
        assert_eq!(r.status, 204, "{}", r.body_str());
    });
    frozen.store(false, std::sync::atomic::Ordering::Relaxed);
    let sources: Vec<String> = b.admin("GET", "/v1/revisions", None).json()["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["source"].as_str().unwrap().to_owned())
        .collect();
    let tail = &sources[sources.len() - 2..];
    assert_eq!(
        tail,
        ["api: DELETE /v1/routes/d", "api: PUT /v1/routes/e"],
        "{sources:?}"
    );
}

#[test]
fn a_hung_etcd_holds_up_only_the_writes_that_wait_for_it() {
    // The node's only endpoint hangs: writes wait for etcd (3 s each, then 503; one after
    // another, as every change goes through the store's lock), each on a thread of its own,
    // so `/v1/health` answers meanwhile (against ed1794b: after 8.9 s), and so do the reads
    // of the config and status, from what the last change left (against cb9a8e1: after 3 s).
    let etcd = Etcd::start();
    let (relay, frozen) = freezing_relay(etcd.port, None);
    let url = format!("etcd://127.0.0.1:{relay}/t6");
    let a = Gateway::start_with(&node_file("a", "", ""), Driver::IoUring, &["--store", &url]);
    let r = a.admin("PUT", "/v1/routes/kept", Some(&respond_route("/kept", "k")));
    assert_eq!(r.status, 201, "{}", r.body_str());
    let revision = a.admin("GET", "/v1/status", None).json()["revision"].clone();
    frozen.store(true, std::sync::atomic::Ordering::Relaxed);
    std::thread::scope(|s| {
        let writes: Vec<_> = (0..3)
            .map(|i| {
                let a = &a;
                s.spawn(move || {
                    let route = respond_route(&format!("/w{i}"), "w");
                    a.admin("PUT", &format!("/v1/routes/w{i}"), Some(&route))
                        .status
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        for path in [
            "/v1/health",
            "/v1/config",
            "/v1/routes",
            "/v1/routes/kept",
            "/v1/status",
        ] {
            let asked = Instant::now();
            let r = a.admin("GET", path, None);
            assert_eq!(r.status, 200, "{path}: {}", r.body_str());
            assert!(
                asked.elapsed() < Duration::from_secs(1),
                "{path}: {:?}",
                asked.elapsed()
            );
            match path {
                "/v1/routes" => assert_eq!(r.json()["items"][0]["id"], "kept", "{}", r.body_str()),
                "/v1/routes/kept" => assert_eq!(r.json()["path"], "/kept", "{}", r.body_str()),
                "/v1/status" => assert_eq!(r.json()["store"]["revision"], revision),
                _ => {}
            }
        }
        for w in writes {
            assert_eq!(w.join().unwrap(), 503);
        }
    });
    // A dry run that removes nothing another node's listeners could use (a route) does not
    // ask etcd which nodes use it (with a first version: 503 after 6 s).
    let r = a.admin("DELETE", "/v1/routes/kept?dry_run=true", None);
    assert_eq!(r.status, 200, "{}", r.body_str());
    // A stop while etcd hangs: the node waits a moment to take its record out, not etcd's
    // timeouts (with a first version of that: 3 s per endpoint, and the heartbeat's).
    let mut a = a;
    let asked = Instant::now();
    a.signal(libc::SIGTERM);
    assert_eq!(a.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
}

#[test]
fn a_store_restored_from_a_backup_is_what_every_node_serves() {
    // etcd restored from a backup taken before two changes: its revision goes back. Before,
    // running nodes kept the newer config, every write through them was a 409 (64 times),
    // and a node that joined served the older one: a split that nobody was told about.
    let mut etcd = Etcd::start();
    let a = node(&etcd, "t9", &node_file("a", "", ""));
    let b = node(&etcd, "t9", &node_file("b", "", ""));
    let r = a.admin(
        "PUT",
        "/v1/routes/hello",
        Some(&respond_route("/hello", "h")),
    );
    assert_eq!(r.status, 201, "{}", r.body_str());
    wait_serves(&b, "/hello", "h", Duration::from_secs(5));
    etcd.stop();
    let backup = temp_dir("etcd-backup").join("data");
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        let _ = std::fs::remove_dir_all(to);
        let ok = Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(ok.success());
    };
    copy(&etcd.dir.join("data"), &backup);
    etcd.run();
    for (id, body) in [("r1", "1"), ("r2", "2")] {
        let path = format!("/{id}");
        let r = a.admin(
            "PUT",
            &format!("/v1/routes/{id}"),
            Some(&respond_route(&path, body)),
        );
        assert_eq!(r.status, 201, "{}", r.body_str());
    }
    wait_serves(&b, "/r2", "2", Duration::from_secs(5));
    let before = a.admin("GET", "/v1/status", None).json()["store"]["applied_revision"]
        .as_u64()
        .unwrap();
    etcd.stop();
    copy(&backup, &etcd.dir.join("data"));
    etcd.run();
    // Each node takes the store's config (the watch sees the config go back), and says so.
    for gw in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while get(gw, "/r1").0 != 404 {
            assert!(Instant::now() < deadline, "still serving /r1");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(get(gw, "/hello"), (200, "h".to_owned()));
        gw.wait_log("etcd went back", Duration::from_secs(1));
    }
    // Writes work at once, with revision numbers past every one used before, which a dry
    // run names first (against 2013a24: the restored revision + 1, a number used before),
    // also through a node started since, which learns the highest from the live nodes'
    // records (against 60f9799: it numbered from the restored revision).
    let c = node(&etcd, "t9", &node_file("c", "", ""));
    let r = c.admin(
        "PUT",
        "/v1/routes/after?dry_run=true",
        Some(&respond_route("/after", "a")),
    );
    assert_eq!(r.status, 200, "{}", r.body_str());
    let would_be = r.json()["would_be_revision"].as_u64().unwrap();
    let r = c.admin(
        "PUT",
        "/v1/routes/after",
        Some(&respond_route("/after", "a")),
    );
    assert_eq!(r.status, 201, "{}", r.body_str());
    wait_serves(&a, "/after", "a", Duration::from_secs(5));
    let after = a.admin("GET", "/v1/status", None).json()["store"]["applied_revision"]
        .as_u64()
        .unwrap();
    assert!(
        after > before,
        "revision {after} after the restore, {before} before"
    );
    assert_eq!(would_be, after);
}

#[test]
fn a_store_rebuilt_empty_is_followed_and_numbered_on() {
    // etcd rebuilt empty under running nodes. Before: the watch found no config, the nodes
    // kept their old etcd revision, and every record written since (at lower etcd revisions)
    // was dropped as older: node b never served another change, and said nothing; a node
    // seeding the empty store numbered from 1, a number (an ETag) naming another config.
    let mut etcd = Etcd::start();
    let a = node(&etcd, "t14", &node_file("a", "", ""));
    let b = node(&etcd, "t14", &node_file("b", "", ""));
    put_routes(&a, 3);
    wait_serves(&b, "/r2", "r", Duration::from_secs(5));
    let revision = |gw: &Gateway| {
        gw.admin("GET", "/v1/status", None).json()["store"]["applied_revision"]
            .as_u64()
            .unwrap()
    };
    let before = revision(&a);
    etcd.stop();
    std::fs::remove_dir_all(etcd.dir.join("data")).unwrap();
    etcd.run();
    for gw in [&a, &b] {
        gw.wait_log("etcd holds no config any more", Duration::from_secs(20));
        // The config held is still served.
        assert_eq!(get(gw, "/r0"), (200, "r".to_owned()));
    }
    let r = a.admin("PUT", "/v1/routes/new", Some(&respond_route("/new", "n")));
    assert_eq!(r.status, 201, "{}", r.body_str());
    wait_serves(&b, "/new", "n", Duration::from_secs(5));
    assert_eq!(revision(&b), before + 1);

    // Rebuilt empty again, and seeded by a node that starts meanwhile: its number goes on
    // past the live nodes' (their records come back with their next beat).
    etcd.stop();
    std::fs::remove_dir_all(etcd.dir.join("data")).unwrap();
    etcd.run();
    let deadline = Instant::now() + Duration::from_secs(10);
    while etcd.values_under("/t14/nodes/").len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the nodes' records did not come back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = node(
        &etcd,
        "t14",
        &format!(
            "{}\n{}",
            node_file("c", "", ""),
            "[[routes]]\nid = \"seeded\"\npath = \"/seeded\"\nrespond = { body = \"s\" }\n"
        ),
    );
    c.wait_log(
        &format!("as revision {}", before + 2),
        Duration::from_secs(1),
    );
    for gw in [&a, &b, &c] {
        wait_serves(gw, "/seeded", "s", Duration::from_secs(5));
        assert_eq!(revision(gw), before + 2);
    }
}

#[test]
fn a_record_this_build_cannot_read_is_said_at_once() {
    // A newer build (a rolling upgrade) commits a record with a field this one does not know.
    // Before: every write through an older node retried 64 times and answered a 409 about
    // concurrent changes, logging the parse error each time; a restarted node exited 2
    // blaming a missing listener.
    let etcd = Etcd::start();
    let a = node(&etcd, "t10", &node_file("a", "", ""));
    let mut b = node(&etcd, "t10", &node_file("b", "", ""));
    let r = a.admin("PUT", "/v1/routes/v", Some(&respond_route("/v", "1")));
    assert_eq!(r.status, 201, "{}", r.body_str());
    let record = serde_json::json!({
        "revision": 9, "created_ms": 0, "source": "a newer build", "item_revisions": {},
        "config": {"routes": [{"id": "n", "path": "/n", "respond": {"status": 200},
                               "future_option": true}]}
    });
    assert!(etcd.put("/t10/config", &record.to_string()));
    let started = Instant::now();
    let r = a.admin("PUT", "/v1/routes/w", Some(&respond_route("/w", "2")));
    assert_eq!(r.status, 503, "{}", r.body_str());
    assert_eq!(r.json()["title"], "Store Unreadable", "{}", r.body_str());
    assert!(r.body_str().contains("future_option"), "{}", r.body_str());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        get(&a, "/v"),
        (200, "1".to_owned()),
        "the last config is still served"
    );
    // A node that starts on it says why, and exits 1 (a store problem, not a config one).
    b.signal(libc::SIGKILL);
    b.wait_exit_status(Duration::from_secs(5)).unwrap();
    let out = exit_of(
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("--config")
            .arg(&b.config_path)
            .arg("--data-dir")
            .arg(&b.data_dir)
            .args(["--store", &etcd.url("t10")]),
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("cannot read") && text.contains("future_option"),
        "{text}"
    );
}

#[test]
fn a_second_node_with_a_live_nodes_id_is_refused() {
    // Before: it started, and the two overwrote each other's record, so one was missing from
    // /v1/nodes and from the check that nothing a node uses is removed.
    let etcd = Etcd::start();
    let a = node(&etcd, "t11", &node_file("a", "", ""));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a
        .admin("GET", "/v1/nodes", None)
        .body_str()
        .contains("\"a\"")
    {
        assert!(Instant::now() < deadline, "node a never listed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let dir = temp_dir("twin");
    let file = dir.join("node.toml");
    std::fs::write(&file, node_file("a", "", "")).unwrap();
    let out = exit_of(
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("--config")
            .arg(&file)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--store", &etcd.url("t11")]),
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("node_id \"a\" is in use by a live node"),
        "{text}"
    );
    // The node itself, restarted at once on its data directory, is no twin.
    let (config, data) = (a.config_path.clone(), a.data_dir.clone());
    let mut a = a;
    a.signal(libc::SIGKILL);
    a.wait_exit_status(Duration::from_secs(5)).unwrap();
    let mut again = Gateway::start_with_data(&config, &data, &["--store", &etcd.url("t11")]);
    assert_eq!(
        again.admin("GET", "/v1/status", None).json()["cluster"]["node_id"],
        "a"
    );
    // Killed, and started at once on another data directory (a container replaced under a
    // new host name): the record it left is waited out, not taken for a live twin's (before:
    // exit 2 until the record's lease expired).
    again.signal(libc::SIGKILL);
    again.wait_exit_status(Duration::from_secs(5)).unwrap();
    let replaced =
        Gateway::start_with_data(&config, &dir.join("data"), &["--store", &etcd.url("t11")]);
    replaced.wait_log("for it to expire", Duration::from_secs(1));
    assert_eq!(
        replaced.admin("GET", "/v1/status", None).json()["cluster"]["node_id"],
        "a"
    );
}

#[test]
fn of_nodes_started_at_one_moment_with_one_id_one_runs() {
    // Before: each read the id free before any of them had written its record, and all ran,
    // overwriting each other's record.
    let etcd = Etcd::start();
    let mut children = Vec::new();
    for _ in 0..3 {
        let dir = temp_dir("same-moment");
        let file = dir.join("node.toml");
        std::fs::write(&file, format!("{}{ADMIN_SECTION}", node_file("a", "", ""))).unwrap();
        let log = std::fs::File::create(dir.join("stderr")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("--config")
            .arg(&file)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--store", &etcd.url("t18")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        children.push((child, dir));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let running = |children: &mut Vec<(Child, PathBuf)>| {
        (children.iter_mut())
            .filter_map(|(c, _)| c.try_wait().unwrap().is_none().then_some(()))
            .count()
    };
    while running(&mut children) > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut outcomes = Vec::new();
    for (child, dir) in &mut children {
        let status = child.try_wait().unwrap();
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let text = std::fs::read_to_string(dir.join("stderr")).unwrap();
        outcomes.push((status.map(|s| s.code()), text));
    }
    let ran: Vec<_> = outcomes.iter().filter(|(s, _)| s.is_none()).collect();
    assert_eq!(ran.len(), 1, "{outcomes:#?}");
    assert!(ran[0].1.contains("admin API listening"), "{}", ran[0].1);
    for (status, text) in outcomes.iter().filter(|(s, _)| s.is_some()) {
        assert_eq!(*status, Some(Some(2)), "{text}");
        assert!(
            text.contains("node_id \"a\" is in use by a live node"),
            "{text}"
        );
    }
}

#[test]
fn a_live_process_of_this_host_and_data_directory_path_is_refused_at_start() {
    // Two containers sharing the host's name, each with its own volume at one path: the
    // review found the second taking the first's live record for its own last run's.
    let etcd = Etcd::start();
    let dir = temp_dir("same-path");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let file = dir.join("node.toml");
    std::fs::write(&file, format!("{}{ADMIN_SECTION}", node_file("a", "", ""))).unwrap();
    let read = |p: &str| std::fs::read_to_string(p).unwrap().trim().to_owned();
    // Another volume at this path (another device and inode); or an older build's record,
    // which cannot say which volume it had (this node's own only to an upgrade's successor).
    for volume in [Some("1:1"), None] {
        let record = |n: u64| {
            let mut r = serde_json::json!({"id": "a", "host": read("/proc/sys/kernel/hostname"),
                               "boot_id": read("/proc/sys/kernel/random/boot_id"),
                               "data_dir": data.canonicalize().unwrap(),
                               "last_seen": n, "applied_revision": 1, "uses": []});
            if let Some(v) = volume {
                r["data_dir_id"] = v.into();
            }
            r
        };
        let stop = std::sync::atomic::AtomicBool::new(false);
        let out = std::thread::scope(|s| {
            s.spawn(|| {
                let until = Instant::now() + Duration::from_secs(15);
                let mut n = 1;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                    etcd.put("/t21/nodes/a", &record(n).to_string());
                    n += 1;
                    std::thread::sleep(Duration::from_millis(300));
                }
            });
            let out = exit_of(
                Command::new(env!("CARGO_BIN_EXE_gateway"))
                    .arg("--config")
                    .arg(&file)
                    .arg("--data-dir")
                    .arg(&data)
                    .args(["--store", &etcd.url("t21")]),
            );
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            out
        });
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{volume:?}: {text}");
        assert!(
            text.contains("is in use by a live node"),
            "{volume:?}: {text}"
        );
    }
}

#[test]
fn a_nodes_record_another_node_holds_is_not_written_over() {
    // A node cut off from etcd for longer than its lease, meanwhile replaced by one started
    // elsewhere with its id: before, its next heartbeat wrote over the other's record.
    let etcd = Etcd::start();
    let a = node(&etcd, "t19", &node_file("a", "", ""));
    a.wait_log("admin API listening", Duration::from_secs(5));
    let other = serde_json::json!({"id": "a", "host": "elsewhere", "data_dir": "/srv/gw",
                                   "applied_revision": 1, "last_seen": 1, "uses": []});
    assert!(etcd.put("/t19/nodes/a", &other.to_string()));
    a.wait_log(
        "node_id \"a\" is held by another node (host \"elsewhere\"",
        Duration::from_secs(5),
    );
    let status = a.admin("GET", "/v1/status", None).json();
    let error = status["store"]["last_error"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("is held by another node"), "{status}");
    assert_eq!(etcd.values_under("/t19/nodes/"), [other.to_string()]);
    // The other node gone, its record with it: this node's is written again.
    let del = serde_json::json!({"key": b64(b"/t19/nodes/a")});
    assert!(etcd
        .http("POST", "/v3/kv/deleterange", &del.to_string())
        .is_some());
    a.wait_log(
        "this node's record is its own again",
        Duration::from_secs(5),
    );
    let nodes = a.admin("GET", "/v1/nodes", None).json();
    assert_eq!(nodes["nodes"][0]["id"], "a", "{nodes}");
    assert_ne!(nodes["nodes"][0]["host"], "elsewhere", "{nodes}");
    let put_record = |record: &serde_json::Value| {
        assert!(etcd.put("/t19/nodes/a", &record.to_string()));
    };
    // Same host and data directory, another boot: another machine, another node.
    let mut twin = nodes["nodes"][0].clone();
    twin["boot_id"] = "00000000-0000-0000-0000-000000000000".into();
    twin["last_seen"] = 2.into();
    put_record(&twin);
    let deadline = Instant::now() + Duration::from_secs(5);
    let said = |a: &Gateway| {
        (a.log_lines().iter())
            .filter(|l| l.contains("is held by another node"))
            .count()
    };
    while said(&a) < 2 {
        assert!(Instant::now() < deadline, "{:?}", a.log_lines());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(etcd.values_under("/t19/nodes/"), [twin.to_string()]);
    // This very boot's, written by a process that has stopped (a successor that claimed the
    // record and then failed to start). Before: taken for a successor's, and the live
    // process wrote no record until that one's lease ran out.
    let mut earlier = nodes["nodes"][0].clone();
    earlier["last_seen"] = 3.into();
    put_record(&earlier);
    a.wait_log("left by another process of it", Duration::from_secs(5));
    let nodes = a.admin("GET", "/v1/nodes", None).json();
    assert!(
        nodes["nodes"][0]["last_seen"].as_u64().unwrap() > 3,
        "{nodes}"
    );
    // Written again and again: the process a binary upgrade replaced, an older build
    // (which writes without looking) still draining. Waited for, not fought over (the review
    // found two processes taking the record from each other every second).
    let stop = Instant::now() + Duration::from_secs(4);
    let mut n = 10u64;
    while Instant::now() < stop
        && !(a.log_lines().iter()).any(|l| l.contains("another process of this node"))
    {
        earlier["last_seen"] = n.into();
        put_record(&earlier);
        n += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    a.wait_log("another process of this node", Duration::from_millis(1));
    assert_eq!(etcd.values_under("/t19/nodes/"), [earlier.to_string()]);
    // Once it stops writing, this node writes its record again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.admin("GET", "/v1/nodes", None).json()["nodes"][0]["last_seen"]
        .as_u64()
        .unwrap()
        < 1000
    {
        assert!(Instant::now() < deadline, "never taken back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn another_nodes_change_naming_this_nodes_log_file_turns_the_log_off_here() {
    // Node b cannot see node a's access log. Before: a served b's change and went on
    // appending its log lines to the CA file its upstream now trusts.
    let etcd = Etcd::start();
    let dir = temp_dir("log-over-ca");
    make_ca(&dir, "log test CA");
    let ca = dir.join("ca.pem");
    let pem = std::fs::read_to_string(&ca).unwrap();
    let log = format!("\n[access_log]\npath = \"{}\"\n", ca.display());
    let a = node(&etcd, "t20", &node_file("a", "", &log));
    let b = node(&etcd, "t20", &node_file("b", "", ""));
    let up = serde_json::json!({"targets": [{"address": "127.0.0.1:1"}],
                                "tls": {"ca_file": ca}});
    let r = b.admin("PUT", "/v1/upstreams/u1", Some(&up.to_string()));
    assert_eq!(r.status, 201, "{}", r.body_str());
    a.wait_log(
        "the access log is off until the config changes",
        Duration::from_secs(10),
    );
    let r = a.connect().roundtrip("GET /x HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.status, 404);
    // A line would have been written within 200 ms.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(std::fs::read_to_string(&ca).unwrap(), pem);
}

#[test]
fn a_config_too_large_for_etcd_is_507_and_a_long_history_still_lists() {
    // etcd takes at most --max-request-bytes a write, and a config is written twice (the
    // current one and its history entry). Before: 500 Not Persisted with etcd's own message.
    let etcd = Etcd::start_with(&["--max-request-bytes", "200000"]);
    let a = node(&etcd, "t12", &node_file("a", "", ""));
    let big = "x".repeat(60_000);
    let r = a.admin(
        "PUT",
        "/v1/routes/big1",
        Some(&respond_route("/big1", &big)),
    );
    assert_eq!(r.status, 201, "{}", r.body_str());
    let r = a.admin(
        "PUT",
        "/v1/routes/big2",
        Some(&respond_route("/big2", &big)),
    );
    assert_eq!(r.status, 507, "{}", r.body_str());
    assert_eq!(r.json()["title"], "Config Too Large", "{}", r.body_str());
    assert!(
        r.body_str().contains("--max-request-bytes"),
        "{}",
        r.body_str()
    );
    let status = a.admin("GET", "/v1/status", None).json();
    assert_eq!(status["store"]["reachable"], true, "{status}");
    // Revisions of 60 KB each, more than one page of them: the history is read a few at a
    // time (before, in one answer, which a long history of large configs made too large).
    for i in 0..5 {
        let r = a.admin(
            "PUT",
            &format!("/v1/routes/r{i}"),
            Some(&respond_route(&format!("/r{i}"), "s")),
        );
        assert_eq!(r.status, 201, "{}", r.body_str());
    }
    let list = a.admin("GET", "/v1/revisions", None).json();
    let numbers: Vec<u64> = list["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (1..=7).collect::<Vec<u64>>(), "{list}");
}

#[test]
fn another_nodes_change_naming_a_new_host_holds_up_no_admin_call_here() {
    // Node b's name server takes queries and never answers: a change written through node a
    // that names a new host is looked up on b before b serves it (up to the resolver's
    // timeouts). Before, b did so holding its store's lock, so the calls that take it (the
    // nodes and revisions, the heartbeat) waited for the lookup. (A write on b waits still:
    // it is built on a's change, which b serves only once looked up.)
    let etcd = Etcd::start();
    let resolver = |s: &std::net::UdpSocket, ms: u32| {
        let at = s.local_addr().unwrap();
        format!("\n[resolver]\nnameservers = [\"{at}\"]\ntimeout_ms = {ms}\n")
    };
    let (silent_a, silent_b) = (
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
    );
    let a = node(&etcd, "t15", &node_file("a", "", &resolver(&silent_a, 200)));
    let b = node(
        &etcd,
        "t15",
        &node_file("b", "", &resolver(&silent_b, 3000)),
    );
    let r = a.admin(
        "PUT",
        "/v1/upstreams/slow",
        Some(r#"{"targets":[{"address":"slow.test:80"}]}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body_str());
    let written = a.admin("GET", "/v1/status", None).json()["store"]["revision"].clone();
    // b's lookup has begun once its name server has the query.
    silent_b
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut query = [0u8; 512];
    silent_b.recv(&mut query).expect("b looks the new host up");
    let asked = Instant::now();
    for path in ["/v1/nodes", "/v1/revisions"] {
        let r = b.admin("GET", path, None);
        assert_eq!(r.status, 200, "{path}: {}", r.body_str());
    }
    assert!(
        asked.elapsed() < Duration::from_millis(1500),
        "b's admin calls waited for its lookup: {:?}",
        asked.elapsed()
    );
    let route = respond_route("/other", "o");
    let other = b.admin("PUT", "/v1/routes/other", Some(&route));
    assert_eq!(other.status, 201, "{}", other.body_str());
    wait_serves(&b, "/other", "o", Duration::from_secs(15));
    let status = b.admin("GET", "/v1/status", None).json();
    assert!(
        status["store"]["applied_revision"].as_u64() > written.as_u64(),
        "{status}"
    );
}

#[test]
fn a_config_key_deleted_by_hand_is_said_and_a_starting_node_restores_the_newest_revision() {
    // `etcdctl del PREFIX/config`, its history left. Before: the running nodes said
    // nothing (the watch dropped the delete), and the next node to start took the prefix
    // for empty and seeded it with its node file: every node then served no routes.
    let etcd = Etcd::start();
    let a = node(&etcd, "t16", &node_file("a", "", ""));
    put_routes(&a, 2);
    let before = a.admin("GET", "/v1/status", None).json()["store"]["revision"]
        .as_u64()
        .unwrap();
    let del = serde_json::json!({"key": b64(b"/t16/config")});
    assert!(etcd
        .http("POST", "/v3/kv/deleterange", &del.to_string())
        .is_some());
    a.wait_log("etcd holds no config any more", Duration::from_secs(10));
    assert_eq!(get(&a, "/r1"), (200, "r".to_owned()));
    // A node that starts now (its file names a route of its own, which seeds an empty
    // store only) restores the newest revision, numbered on.
    let b = node(
        &etcd,
        "t16",
        &format!(
            "{}\n[[routes]]\nid = \"mine\"\npath = \"/mine\"\nrespond = {{ body = \"m\" }}\n",
            node_file("b", "", "")
        ),
    );
    b.wait_log(
        &format!("wrote revision {before} again"),
        Duration::from_secs(5),
    );
    for gw in [&a, &b] {
        wait_serves(gw, "/r1", "r", Duration::from_secs(5));
        assert_eq!(get(gw, "/mine").0, 404);
        let status = gw.admin("GET", "/v1/status", None).json();
        assert_eq!(status["store"]["revision"], before + 1, "{status}");
    }
}

#[test]
fn a_record_numbered_past_what_a_gateway_counts_to_is_unreadable() {
    // Written by hand with the largest u64: before, the next write wrapped round to
    // revision 0 (an ETag `config-r0` again) and overwrote revision 1 in the history.
    let etcd = Etcd::start();
    // A node record saying it saw the largest u64 (by hand): not taken for the highest
    // revision seen (the second review found the next write wrapping round to 0 so).
    let beat = serde_json::json!({"id": "zz", "applied_revision": 1, "last_seen": 0,
                                  "highest_revision": u64::MAX, "uses": []});
    assert!(etcd.put("/t17/nodes/zz", &beat.to_string()));
    let a = node(&etcd, "t17", &node_file("a", "", ""));
    let r = a.admin("PUT", "/v1/routes/v", Some(&respond_route("/v", "1")));
    assert_eq!(r.status, 201, "{}", r.body_str());
    let status = a.admin("GET", "/v1/status", None).json();
    assert_eq!(status["store"]["revision"], 2, "{status}");
    let record = serde_json::json!({
        "revision": u64::MAX, "created_ms": 0, "source": "by hand", "item_revisions": {},
        "config": {}
    });
    assert!(etcd.put("/t17/config", &record.to_string()));
    let r = a.admin("PUT", "/v1/routes/w", Some(&respond_route("/w", "2")));
    assert_eq!(r.status, 503, "{}", r.body_str());
    let by_hand = "beyond the largest a gateway counts to (9007199254740991): written by hand";
    assert!(r.body_str().contains(by_hand), "{}", r.body_str());
    // A number no u64 holds is a hand's too, not a newer build's (the fourth review found
    // it said to be one).
    let text = record
        .to_string()
        .replace(&u64::MAX.to_string(), "18446744073709551616");
    assert!(etcd.put("/t17/config", &text));
    let r = a.admin("PUT", "/v1/routes/w", Some(&respond_route("/w", "2")));
    assert_eq!(r.status, 503, "{}", r.body_str());
    assert!(r.body_str().contains(by_hand), "{}", r.body_str());
}
