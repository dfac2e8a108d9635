//! Gateway nodes sharing a Redis (Debian `redis-server`, started here on a free loopback
//! port): a cluster-scoped rate limit admits one limit across three nodes, whichever of them
//! the load reaches, and `on_store_error` decides what happens while Redis is away.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

/// A redis-server on loopback, stopped when dropped.
struct Redis {
    child: Option<Child>,
    port: u16,
    /// More `redis-server` arguments.
    extra: Vec<String>,
}

impl Redis {
    fn start() -> Redis {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let extra = extra.iter().map(|a| a.to_string()).collect();
        let mut r = Redis {
            child: None,
            port,
            extra,
        };
        r.run();
        r
    }

    fn run(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian redis-server) is needed: scripts/test installs it");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn node(id: &str, redis: u16, mode: &str) -> Gateway {
    node_syncing(id, redis, mode, 5)
}

/// A node reconciling every `sync_ms`.
fn node_syncing(id: &str, redis: u16, mode: &str, sync_ms: u64) -> Gateway {
    limit_node(id, redis, mode, sync_ms, (1000, 100))
}

/// A node whose every request passes a cluster limit of `rate` per second with `burst`.
fn limit_node(
    id: &str,
    redis: u16,
    mode: &str,
    sync_ms: u64,
    (rate, burst): (u64, u64),
) -> Gateway {
    Gateway::start(
        &format!(
            r#"workers = 1

[[listeners]]
address = "127.0.0.1:0"

[cluster]
node_id = "{id}"
redis = "redis://127.0.0.1:{redis}"
sync_ms = {sync_ms}

[[policies]]
id = "cluster-limit"
kind = "rate_limit"
scope = "cluster"
rate = {rate}
per = "second"
burst = {burst}
on_store_error = "{mode}"

[[routes]]
id = "api"
path_prefix = "/"
respond = {{ body = "ok" }}
policies = ["cluster-limit"]
"#
        ),
        Driver::IoUring,
    )
}

/// Sends requests to `targets` (one keep-alive connection each, paced to `per_node` per
/// second) for `span`, each target during its share of the time given by `on(target, t)`;
/// returns the 200s, the 429s and the time from the first request to the last.
fn load(
    targets: &[SocketAddr],
    per_node: u64,
    span: Duration,
    on: impl Fn(usize, Duration) -> bool + Sync,
) -> (u64, u64, Duration) {
    let ok = Arc::new(AtomicU64::new(0));
    let limited = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    std::thread::scope(|s| {
        for (i, &addr) in targets.iter().enumerate() {
            let (ok, limited, on) = (ok.clone(), limited.clone(), &on);
            s.spawn(move || {
                let mut c = Client::connect(addr);
                let gap = Duration::from_nanos(1_000_000_000 / per_node);
                let mut next = start;
                loop {
                    let now = start.elapsed();
                    if now >= span {
                        break;
                    }
                    if !on(i, now) {
                        std::thread::sleep(Duration::from_millis(1));
                        next = Instant::now();
                        continue;
                    }
                    let resp = c.roundtrip("GET /x HTTP/1.1\r\nHost: n\r\n\r\n");
                    match resp.status {
                        200 => ok.fetch_add(1, Ordering::Relaxed),
                        429 => limited.fetch_add(1, Ordering::Relaxed),
                        s => panic!("unexpected status {s}"),
                    };
                    next += gap;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            });
        }
    });
    (
        ok.load(Ordering::Relaxed),
        limited.load(Ordering::Relaxed),
        start.elapsed(),
    )
}

#[test]
fn a_cluster_limit_holds_across_three_nodes() {
    let redis = Redis::start();
    let nodes: Vec<Gateway> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| node(id, redis.port, "allow"))
        .collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|g| g.addr).collect();
    let span = Duration::from_secs(10);
    let mut report = Vec::new();
    for (name, per_node, on) in [
        (
            "spread over three nodes",
            1000,
            &(|_: usize, _: Duration| true) as &(dyn Fn(usize, Duration) -> bool + Sync),
        ),
        ("all on one node", 3000, &|i: usize, _: Duration| i == 0),
        (
            "moving from node to node",
            3000,
            &|i: usize, t: Duration| (t.as_millis() / 2500) as usize % 3 == i,
        ),
    ] {
        // A full bucket to start from: idle for longer than the burst takes to refill.
        std::thread::sleep(Duration::from_millis(300));
        let (ok, limited, took) = load(&addrs, per_node, span, on);
        let expected = 1000.0 * took.as_secs_f64() + 100.0;
        let error = (ok as f64 - expected) / expected;
        report.push(format!(
            "{name}: {ok} admitted, {limited} refused in {:.2} s; expected {expected:.0}, error {:+.2}%",
            took.as_secs_f64(),
            error * 100.0
        ));
        assert!(limited > 0, "{name}: the load must exceed the limit");
        assert!(error.abs() <= 0.02, "{}", report.join("\n"));
    }
    println!("{}", report.join("\n"));
}

#[test]
fn pausing_between_bursts_does_not_pass_a_slow_cluster_limit() {
    // 5 a minute: after the first 5, a client pausing 1.2 s between bursts gets nothing
    // more (each pause used to start the node's share over from a full allowance).
    let redis = Redis::start();
    let gw = Gateway::start(
        &format!(
            "workers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n\
             [cluster]\nnode_id = \"n1\"\nredis = \"redis://127.0.0.1:{}\"\n\n\
             [[policies]]\nid = \"slow\"\nkind = \"rate_limit\"\nscope = \"cluster\"\n\
             rate = 5\nper = \"minute\"\nburst = 5\nkey = \"client_ip\"\n\n\
             [[routes]]\nid = \"api\"\npath_prefix = \"/\"\n\
             respond = {{ body = \"ok\" }}\npolicies = [\"slow\"]\n",
            redis.port
        ),
        Driver::IoUring,
    );
    let mut c = gw.connect();
    let mut admitted = Vec::new();
    for round in 0..3 {
        if round > 0 {
            std::thread::sleep(Duration::from_millis(1200));
        }
        let ok = (0..6)
            .filter(|_| c.roundtrip("GET /x HTTP/1.1\r\nHost: n\r\n\r\n").status == 200)
            .count();
        admitted.push(ok);
    }
    assert_eq!(admitted, [5, 0, 0]);
}

#[test]
fn on_store_error_decides_while_redis_is_away() {
    let mut redis = Redis::start();
    let allow = node("a", redis.port, "allow");
    let deny = node("d", redis.port, "deny");
    let local = node("l", redis.port, "local");
    // Every node's rounds reach Redis: all three count as live.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = allow.admin("GET", "/v1/status", None).json();
        assert_ne!(status["cluster"]["redis"], "down", "{status}");
        if status["cluster"]["redis"] == "up" && status["cluster"]["live_nodes"] == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Redis up: the limit holds on each (they share one bucket).
    let (ok, limited, _) = load(&[allow.addr], 3000, Duration::from_millis(500), |_, _| true);
    assert!(limited > 0 && ok < 1000, "{ok} {limited}");
    redis.stop();
    // Let every node's next round find Redis gone.
    std::thread::sleep(Duration::from_millis(300));
    let (ok, limited, _) = load(&[allow.addr], 3000, Duration::from_millis(500), |_, _| true);
    assert_eq!(limited, 0, "allow: every request passes ({ok} admitted)");
    let status = deny.admin("GET", "/v1/status", None).json();
    assert_eq!(status["cluster"]["node_id"], "d", "{status}");
    assert_eq!(status["cluster"]["redis"], "down", "{status}");
    let mut c = deny.connect();
    let resp = c.roundtrip("GET /x HTTP/1.1\r\nHost: n\r\n\r\n");
    assert_eq!(resp.status, 503, "deny");
    assert_eq!(resp.header("retry-after"), Some("1"));
    // local: the node applies 1000/s + 100 on its own.
    std::thread::sleep(Duration::from_millis(200));
    let (ok, limited, took) = load(&[local.addr], 3000, Duration::from_millis(1000), |_, _| {
        true
    });
    let expected = 1000.0 * took.as_secs_f64() + 100.0;
    assert!(limited > 0, "local limits");
    assert!(
        (ok as f64 - expected).abs() <= 0.05 * expected,
        "local: {ok} vs {expected:.0}"
    );
    // Redis back: the cluster limit applies again.
    redis.run();
    std::thread::sleep(Duration::from_millis(400));
    let mut c = deny.connect();
    assert_eq!(
        c.roundtrip("GET /x HTTP/1.1\r\nHost: n\r\n\r\n").status,
        200
    );
}

/// A node with a 1/s, burst-20 cluster limit on every request (`on_store_error = "deny"`),
/// reconciling every `sync_ms`, once its first round has reached Redis.
fn slow_limit_node(id: &str, redis: u16, sync_ms: u64) -> Gateway {
    let gw = limit_node(id, redis, "deny", sync_ms, (1, 20));
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.admin("GET", "/v1/status", None).json()["cluster"]["redis"] != "up" {
        assert!(Instant::now() < deadline, "Redis never up");
        std::thread::sleep(Duration::from_millis(10));
    }
    gw
}

/// The statuses of `n` requests on one connection to `gw`.
fn statuses(gw: &Gateway, n: usize) -> Vec<u16> {
    let mut c = gw.connect();
    (0..n)
        .map(|_| c.roundtrip("GET /x HTTP/1.1\r\nHost: n\r\n\r\n").status)
        .collect()
}

/// Redis drops its clients' connections (`CLIENT KILL TYPE normal`), keeping its data: the
/// nodes' next rounds fail, and the ones after reconnect.
fn drop_redis_clients(port: u16) {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(b"*4\r\n$6\r\nCLIENT\r\n$4\r\nKILL\r\n$4\r\nTYPE\r\n$6\r\nnormal\r\n")
        .unwrap();
    let mut reply = [0u8; 16];
    let n = conn.read(&mut reply).unwrap();
    assert!(reply[..n].starts_with(b":"), "{:?}", &reply[..n]);
}

/// Runs one command on the Redis at `port`; returns its reply as read in one go.
fn redis_command(port: u16, args: &[&str]) -> String {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    conn.write_all(out.as_bytes()).unwrap();
    let mut reply = vec![0u8; 64 * 1024];
    let n = conn.read(&mut reply).unwrap();
    String::from_utf8_lossy(&reply[..n]).into_owned()
}

/// The gateway's keys in the Redis at `port` once there are at least `n` (within 5 s).
fn wait_keys(port: u16, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = redis_command(port, &["KEYS", "gw:*"]);
        let keys: Vec<String> = (reply.lines())
            .filter(|l| l.starts_with("gw:"))
            .map(str::to_owned)
            .collect();
        if keys.len() >= n {
            return keys;
        }
        assert!(
            Instant::now() < deadline,
            "{n} keys not in Redis: {reply:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn keys_something_else_wrote_over_are_replaced_not_failing_every_round() {
    // Before: a key of another type failed the script at every round, so the store was
    // `down` for every key (`on_store_error = "deny"` refusing all), and the keys before it
    // in a batch were charged again at each round.
    let redis = Redis::start();
    let gw = slow_limit_node("w", redis.port, 5);
    let admitted = |n: usize| statuses(&gw, n).iter().filter(|&&s| s == 200).count();
    assert_eq!(admitted(5), 5);
    let keys = wait_keys(redis.port, 3);
    // The node set, a bucket and its wanting set, each of another type now.
    for key in &keys {
        redis_command(redis.port, &["DEL", key]);
        let put = match key.ends_with(":nodes") {
            true => redis_command(redis.port, &["SET", key, "x"]),
            false => redis_command(redis.port, &["RPUSH", key, "x"]),
        };
        assert!(put.starts_with('+') || put.starts_with(':'), "{put}");
    }
    // Rounds go on (the bucket starts afresh): what is left of the burst, then refused.
    std::thread::sleep(Duration::from_millis(100));
    let after = admitted(40);
    assert!(
        (14..=21).contains(&after),
        "{after} of 40 admitted: {keys:?}"
    );
    assert_eq!(
        gw.admin("GET", "/v1/status", None).json()["cluster"]["redis"],
        "up"
    );
    let failed: Vec<String> = gw
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("failed ("))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
}

#[test]
fn a_bucket_far_ahead_is_kept_not_taken_for_one_no_gateway_wrote() {
    // A limit's arrival time may lie far ahead (at 1 an hour, a few million requests past
    // the burst put it centuries on). The review of the script's check for values no
    // gateway wrote found one past 31.7 years taken for one, and the bucket reset to full.
    let redis = Redis::start();
    let gw = Gateway::start(
        &format!(
            "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\
             [cluster]\nnode_id = \"far\"\nredis = \"redis://127.0.0.1:{}\"\nsync_ms = 5\n\
             [[policies]]\nid = \"hourly\"\nkind = \"rate_limit\"\nscope = \"cluster\"\n\
             rate = 1\nper = \"hour\"\nburst = 1000\non_store_error = \"deny\"\n\
             [[routes]]\nid = \"api\"\npath_prefix = \"/\"\nrespond = {{ body = \"ok\" }}\n\
             policies = [\"hourly\"]\n",
            redis.port
        ),
        Driver::IoUring,
    );
    let admitted = |n: usize| statuses(&gw, n).iter().filter(|&&s| s == 200).count();
    assert_eq!(admitted(1), 1);
    // The node set, the bucket and its wanting set.
    let keys = wait_keys(redis.port, 3);
    let key = (keys.iter())
        .find(|k| k.starts_with("gw:rl:") && !k.ends_with(":nodes"))
        .unwrap_or_else(|| panic!("no bucket in Redis: {keys:?}"));
    // The bucket overspent: its arrival time 114 years ahead of Redis's clock.
    let time = redis_command(redis.port, &["TIME"]);
    let parts: Vec<f64> = (time.lines())
        .filter_map(|l| l.parse::<f64>().ok())
        .collect();
    let now_us = (parts[0] - 1_767_225_600.0) * 1e6 + parts[1];
    let tat = format!("{:.3}", now_us + 3.6e15);
    let set = redis_command(redis.port, &["SET", key, &tat, "PX", "600000000"]);
    assert!(set.starts_with("+OK"), "{set}");
    // One request sends the key to the next rounds (only keys that saw requests go), which
    // find the bucket spent: then refused.
    admitted(1);
    std::thread::sleep(Duration::from_millis(100));
    let after = admitted(40);
    assert!(
        after <= 3,
        "{after} of 40 admitted after the bucket was spent"
    );
}

#[test]
fn a_key_over_its_limit_stays_over_it_after_a_redis_outage() {
    // Before: a failed round cleared every share, and the first round after it started each
    // key from a fresh share: `burst / live nodes` more admitted, even for an exhausted key.
    let redis = Redis::start();
    let gw = slow_limit_node("o", redis.port, 5);
    let statuses = |n: usize| statuses(&gw, n);
    let first = statuses(40);
    let admitted = first.iter().filter(|&&s| s == 200).count();
    assert!((20..=22).contains(&admitted), "{first:?}");
    // Redis drops the node's connection: its round fails, the next one (100 ms on)
    // reconnects. Redis keeps the key's bucket throughout.
    drop_redis_clients(redis.port);
    gw.wait_log("failed (", Duration::from_secs(5));
    gw.wait_log("is back", Duration::from_secs(5));
    let after = statuses(20);
    let admitted = after.iter().filter(|&&s| s == 200).count();
    assert!(
        admitted <= 3,
        "{admitted} of 20 admitted after the outage: {after:?}"
    );
}

#[test]
fn requests_admitted_before_a_failed_round_are_charged_when_redis_is_back() {
    // Rounds every second: ten requests admitted, then the round that would have charged
    // them fails. Before, their counts went with it, and the bucket in Redis never knew.
    let redis = Redis::start();
    let gw = slow_limit_node("c", redis.port, 1000);
    let admitted = |n: usize| statuses(&gw, n).iter().filter(|&&s| s == 200).count();
    assert_eq!(admitted(10), 10);
    drop_redis_clients(redis.port);
    gw.wait_log("failed (", Duration::from_secs(5));
    gw.wait_log("is back", Duration::from_secs(5));
    // What is left of the burst of 20, over two rounds (and about 3 s of refill at 1/s).
    let mut after = admitted(30);
    std::thread::sleep(Duration::from_millis(1200));
    after += admitted(30);
    assert!(
        after <= 15,
        "{after} admitted after the outage, 10 of 20 spent before it"
    );
}

/// A measurement more than a check (`cargo test -p controlplane --test it cluster_error_by
/// -- --ignored --nocapture`): the spread and the moving load of the three-node test, 10 s
/// each per reconciliation interval, printing the error of each (and checking the 2% up to
/// 20 ms).
#[test]
#[ignore]
fn cluster_error_by_sync_interval() {
    let mut report = Vec::new();
    for sync_ms in [1, 5, 20, 100] {
        let redis = Redis::start();
        let nodes: Vec<Gateway> = ["n1", "n2", "n3"]
            .iter()
            .map(|id| node_syncing(id, redis.port, "allow", sync_ms))
            .collect();
        let addrs: Vec<SocketAddr> = nodes.iter().map(|g| g.addr).collect();
        std::thread::sleep(Duration::from_millis(300));
        for (name, per_node, spread) in [("spread", 1000, true), ("moving", 3000, false)] {
            let (ok, _, took) = load(&addrs, per_node, Duration::from_secs(10), |i, t| {
                spread || (t.as_millis() / 2500) as usize % 3 == i
            });
            let expected = 1000.0 * took.as_secs_f64() + 100.0;
            let error = (ok as f64 - expected) / expected;
            report.push(format!(
                "| {sync_ms} | {name} | {ok} | {expected:.0} | {:+.2}% |",
                error * 100.0
            ));
            // Longer intervals are reported, not held to the 2% (see the README).
            assert!(sync_ms > 20 || error.abs() <= 0.02, "{}", report.join("\n"));
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    println!(
        "| sync_ms | load | admitted | expected | error |\n| --- | --- | ---: | ---: | ---: |"
    );
    println!("{}", report.join("\n"));
}

#[test]
fn a_limit_below_one_a_round_is_shared_not_starved_nor_multiplied() {
    // 2 a second, burst 2, three nodes: the bucket refills less than one request per round,
    // so most rounds have one request to give and three nodes wanting it. What is left over
    // after an even split goes to each node by chance, in proportion (before: to the asking
    // node's rank by time of demand, which was always last, so nobody got it: 4 of the 10
    // admitted).
    let redis = Redis::start();
    let nodes: Vec<Gateway> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| limit_node(id, redis.port, "deny", 5, (2, 2)))
        .collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|g| g.addr).collect();
    let (ok, limited, took) = load(&addrs, 100, Duration::from_secs(4), |_, _| true);
    let expected = 2.0 * took.as_secs_f64() + 2.0;
    assert!(limited > 0);
    assert!(
        (ok as f64 - expected).abs() <= 2.5,
        "spread: {ok} admitted, expected {expected:.1}"
    );
    // 10 a second, burst 10: each node gets its part, none all of it (a first fix gave the
    // leftover to the first node by id every round: 103, 3 and 3 of 109).
    let redis = Redis::start();
    let nodes: Vec<Gateway> = ["p1", "p2", "p3"]
        .iter()
        .map(|id| limit_node(id, redis.port, "deny", 5, (10, 10)))
        .collect();
    let each: Vec<u64> = std::thread::scope(|s| {
        let runs: Vec<_> = (nodes.iter())
            .map(|n| s.spawn(|| load(&[n.addr], 100, Duration::from_secs(4), |_, _| true).0))
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let total: u64 = each.iter().sum();
    assert!((40..=60).contains(&total), "{each:?}");
    assert!(each.iter().all(|&n| n * 6 >= total), "{each:?}");
    // 1 a second, burst 1, requests going round the three nodes every 400 ms: each node
    // sees the key again after 1.2 s, past its bucket's fill time, but the bucket is in debt
    // as its last round there found it (each node started the key with one request). Before,
    // the node took it for full again: every request passed, three times the limit.
    let redis = Redis::start();
    let nodes: Vec<Gateway> = ["m1", "m2", "m3"]
        .iter()
        .map(|id| limit_node(id, redis.port, "deny", 5, (1, 1)))
        .collect();
    let started = Instant::now();
    let mut ok = 0;
    for i in 0..15 {
        let at = started + Duration::from_millis(400 * i as u64);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let status = (nodes[i % 3].connect())
            .roundtrip("GET /x HTTP/1.1\r\nHost: n\r\nConnection: close\r\n\r\n")
            .status;
        assert!(status == 200 || status == 429, "{status}");
        ok += usize::from(status == 200);
    }
    // 6 s: 1 a second and the burst, and the two more the first round gave (one per node).
    assert!((4..=9).contains(&ok), "round robin: {ok} of 15 admitted");
}

/// A TCP relay to `127.0.0.1:port` that holds each reply of Redis back for `delay_ms`: a
/// Redis that answers, slowly. Killed when dropped.
struct SlowRelay {
    child: Child,
    port: u16,
}

impl SlowRelay {
    fn start(port: u16, delay_ms: u64) -> SlowRelay {
        const RELAY: &str = r#"
import socket, sys, threading, time
to, delay = int(sys.argv[1]), int(sys.argv[2]) / 1000
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(16)
print(ls.getsockname()[1], flush=True)
def pipe(a, b, wait):
    try:
        while True:
            data = a.recv(1 << 16)
            if not data:
                break
            time.sleep(wait)
            b.sendall(data)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
while True:
    c, _ = ls.accept()
    r = socket.create_connection(("127.0.0.1", to))
    threading.Thread(target=pipe, args=(c, r, 0), daemon=True).start()
    threading.Thread(target=pipe, args=(r, c, delay), daemon=True).start()
"#;
        let mut child = Command::new("python3")
            .args(["-c", RELAY, &port.to_string(), &delay_ms.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let port = line.trim().parse().expect("the relay's port");
        SlowRelay { child, port }
    }
}

impl Drop for SlowRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_redis_that_answers_slowly_is_not_down() {
    // Each reply 120 ms late. A flood of distinct keys makes rounds of many script calls,
    // each answered: the store is up, and a client of one key under its limit meanwhile gets
    // 200s only: never the 503 of `on_store_error = "deny"` (before: a round over 300 ms in
    // all counted as an outage, so anyone could switch the mode on for every key), nor 429s
    // (a first fix left a key in use to wait for its call in a round of thousands, its share
    // spent meanwhile).
    let redis = Redis::start();
    let relay = SlowRelay::start(redis.port, 120);
    let gw = Gateway::start(
        &format!(
            "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n\
             [cluster]\nnode_id = \"s\"\nredis = \"redis://127.0.0.1:{}\"\nsync_ms = 30\n\n\
             [[policies]]\nid = \"per-key\"\nkind = \"rate_limit\"\nscope = \"cluster\"\n\
             rate = 100\nburst = 20\nkey = \"header:X-Key\"\non_store_error = \"deny\"\n\n\
             [[routes]]\nid = \"api\"\npath_prefix = \"/\"\nrespond = {{ body = \"ok\" }}\n\
             policies = [\"per-key\"]\n",
            relay.port
        ),
        Driver::IoUring,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.admin("GET", "/v1/status", None).json()["cluster"]["redis"] != "up" {
        assert!(Instant::now() < deadline, "Redis never up");
        std::thread::sleep(Duration::from_millis(10));
    }
    let addr = gw.addr;
    let flood = std::thread::spawn(move || {
        let mut c = Client::connect(addr);
        for batch in 0..40 {
            let mut requests = String::new();
            for k in 0..500 {
                requests += &format!("GET /x HTTP/1.1\r\nHost: n\r\nX-Key: k{batch}-{k}\r\n\r\n");
            }
            c.send(requests.as_bytes());
            for _ in 0..500 {
                assert_eq!(c.read_response().status, 200);
            }
        }
    });
    let mut one = gw.connect();
    let mut seen = Vec::new();
    // During the flood, and the rounds that carry its keys to Redis after it.
    let mut until = None;
    while until.is_none_or(|u| Instant::now() < u) {
        if until.is_none() && flood.is_finished() {
            until = Some(Instant::now() + Duration::from_secs(3));
        }
        let r = one.roundtrip("GET /x HTTP/1.1\r\nHost: n\r\nX-Key: one\r\n\r\n");
        seen.push(r.status);
        // About 33 a second, a third of the key's limit.
        std::thread::sleep(Duration::from_millis(30));
    }
    flood.join().unwrap();
    assert!(seen.len() > 10, "{seen:?}");
    assert!(seen.iter().all(|&s| s == 200), "{seen:?}");
}

#[test]
fn a_redis_answer_later_than_the_bound_is_logged() {
    // Each reply 400 ms late, past the 250 ms a call may wait before the store counts as
    // down: `on_store_error` applies while a call waits, and the node says so once the
    // answer comes (before, such stalls switched the mode on and left no trace in the log).
    let redis = Redis::start();
    let relay = SlowRelay::start(redis.port, 400);
    let gw = node("late", relay.port, "deny");
    let line = gw.wait_log(" to answer (the bound is 250 ms)", Duration::from_secs(10));
    assert!(line.contains("on_store_error applied meanwhile"), "{line}");
    // Once a minute at most.
    std::thread::sleep(Duration::from_millis(1000));
    let lines = gw.log_lines();
    let late = lines
        .iter()
        .filter(|l| l.contains(" to answer (the bound"))
        .count();
    assert_eq!(late, 1, "{lines:?}");
}

#[test]
fn a_bucket_key_expires_once_the_bucket_is_full_again() {
    // One request on a 1/s, burst-20 limit: the bucket is full again a second later, and its
    // keys expire a second after that (before, 20 s later: a whole fill time on top).
    let redis = Redis::start();
    let gw = slow_limit_node("ttl", redis.port, 5);
    assert_eq!(statuses(&gw, 1), [200]);
    let keys = wait_keys(redis.port, 3);
    let bucket = keys
        .iter()
        .find(|k| k.starts_with("gw:rl:") && !k.ends_with(":nodes"));
    let bucket = bucket.expect("the bucket's key");
    for key in [bucket.clone(), format!("{bucket}:nodes")] {
        let reply = redis_command(redis.port, &["PTTL", &key]);
        let ms: i64 = reply.trim().trim_start_matches(':').parse().expect(&reply);
        assert!((1000..=2000).contains(&ms), "{key}: {ms} ms");
    }
}

#[test]
fn a_redis_password_with_colons_is_one_password() {
    // `redis://:PASSWORD@...` with colons in the password: before, sent as a user and a
    // password (`AUTH pa ss`), which Redis refused, so the cluster limit never had its store.
    let redis = Redis::start_with(&["--requirepass", "pa:ss"]);
    let gw = Gateway::start(
        &format!(
            "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[cluster]\nnode_id = \"p\"\n\
             redis = \"redis://:pa:ss@127.0.0.1:{}\"\n",
            redis.port
        ),
        Driver::IoUring,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = gw.admin("GET", "/v1/status", None).json();
        if status["cluster"]["redis"] == "up" {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_redis_outage_is_logged_again_when_its_reason_changes() {
    // Nothing listens at first (cannot connect); then a Redis that refuses the password.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = Gateway::start(
        &format!(
            "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[cluster]\nnode_id = \"r\"\n\
             redis = \"redis://:right@127.0.0.1:{port}\"\n"
        ),
        Driver::IoUring,
    );
    let failures = || -> Vec<String> {
        (gw.log_lines().into_iter())
            .filter(|l| l.contains("cluster rate limits: Redis at") && l.contains("failed"))
            .collect()
    };
    gw.wait_log("failed (cannot connect", Duration::from_secs(10));
    let mut redis = Redis {
        child: None,
        port,
        extra: vec!["--requirepass".into(), "other".into()],
    };
    redis.run();
    // Rounds fail every 100 ms or so: a new reason is logged (once, 2 s after the first
    // line at most), the same one is not logged again each round.
    let deadline = Instant::now() + Duration::from_secs(10);
    while failures().len() < 2 {
        assert!(Instant::now() < deadline, "{:?}", gw.log_lines());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(700));
    let lines = failures();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines[0].contains("Connection refused"), "{lines:#?}");
    assert!(lines[1].contains("WRONGPASS"), "{lines:#?}");
}
