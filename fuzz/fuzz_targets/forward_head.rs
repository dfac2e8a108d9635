//! A request head through what the gateway does with it before it goes upstream: parsed,
//! its path normalised, routed (as decoding servers read it too), its route's policies run
//! (IP filter, CORS, an API key from a field or the query, a JWT, an ACL, a rate limit),
//! its route's header edits applied, and the forwarded head built. Never panics, and the
//! forwarded head of a request the policies pass:
//! - parses again, as one whole head, with the same method;
//! - has one `X-Forwarded-For`, `X-Real-IP` and `X-Forwarded-Proto` (the gateway's), at most
//!   one `Host`, `X-Forwarded-Host`, `Forwarded`, and one framing field for its body;
//! - on a route that authenticates, has `X-Consumer-Id` (in any spelling) exactly when a
//!   consumer was identified, and then no credential left: the same route's policies, run on
//!   it, identify no one;
//! - carries none of the fields its route removes, and those it sets once.
//!
//! The first input byte picks the peer: a client the IP filter allows, a trusted proxy (whose
//! `X-Forwarded-For` is read), or a client it refuses; the rest is the request.
#![no_main]

use std::net::IpAddr;

use common::{parse_config, Format, Limits, Snapshot};
use dataplane::codec::request::{normalize_path, parse_request, RequestHead};
use dataplane::codec::{BodyKind, FieldPlan};
use dataplane::forward::{request_extras, request_pieces};
use dataplane::gather::Piece;
use dataplane::policy::{self, Clock, Limiters, PolicyState, Verdict};
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"
trusted_proxies = ["10.0.0.0/8"]
[[listeners]]
address = "127.0.0.1:0"
[[upstreams]]
id = "o"
targets = [{ address = "127.0.0.1:9" }]
[[consumers]]
id = "app"
groups = ["mobile"]
[[consumers]]
id = "ops"
[[credentials]]
id = "app-key"
consumer = "app"
kind = "api_key"
key = "app-secret-1"
[[credentials]]
id = "ops-key"
consumer = "ops"
kind = "api_key"
key = "ops-secret-1"
[[policies]]
id = "key"
kind = "api_key"
header = "X-Api-Key"
query = "apikey"
[[policies]]
id = "tok"
kind = "jwt"
algorithm = "HS256"
secret = "0123456789abcdef0123456789abcdef"
require_exp = false
[[policies]]
id = "lan"
kind = "ip_filter"
allow = ["127.0.0.0/8", "10.0.0.0/8", "::1/128"]
[[policies]]
id = "web"
kind = "cors"
origins = ["https://app.example.com"]
methods = ["PUT", "DELETE"]
headers = ["X-Api-Key"]
[[policies]]
id = "mob"
kind = "acl"
groups = ["mobile"]
consumers = ["ops"]
[[policies]]
id = "lim"
kind = "rate_limit"
rate = 1000000000
key = "header:X-Tenant"
[[routes]]
id = "keyed"
path_prefix = "/api"
strip_prefix = true
upstream = "o"
policies = ["lan", "key", "tok", "mob", "lim"]
request_headers = { set = { "X-Env" = "prod" }, remove = ["Cookie", "X-Debug"] }
[[routes]]
id = "users"
path = "/users/{id}"
upstream = "o"
policies = ["key"]
[[routes]]
id = "admin"
path_prefix = "/users/admin"
upstream = "o"
policies = ["tok"]
[[routes]]
id = "web"
hosts = ["*.example.com"]
path_prefix = "/"
upstream = "o"
policies = ["web", "key"]
[[routes]]
id = "open"
path_prefix = "/"
upstream = "o"
"#;

fn snapshot() -> &'static Snapshot {
    static SNAP: std::sync::OnceLock<Snapshot> = std::sync::OnceLock::new();
    SNAP.get_or_init(|| {
        let config = parse_config(CONFIG, Format::Toml).expect("the fuzz config parses");
        Snapshot::compile(config, 1).expect("the fuzz config compiles")
    })
}

/// The field lines of a parsed head: (name, value).
fn fields<'a>(buf: &'a [u8], head: &RequestHead) -> Vec<(&'a [u8], &'a [u8])> {
    buf[head.fields_start..head.fields_end]
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            let colon = l
                .iter()
                .position(|&b| b == b':')
                .expect("a field line has a colon");
            (&l[..colon], &l[colon + 1..])
        })
        .collect()
}

/// How many lines are named `name`, ignoring case and taking `_` for `-` (as CGI-style
/// upstreams read names).
fn count(lines: &[(&[u8], &[u8])], name: &str) -> usize {
    let norm = |c: u8| {
        if c == b'_' {
            b'-'
        } else {
            c.to_ascii_lowercase()
        }
    };
    lines
        .iter()
        .filter(|(n, _)| {
            n.len() == name.len() && n.iter().zip(name.bytes()).all(|(&a, b)| norm(a) == b)
        })
        .count()
}

fn run_check(
    snap: &Snapshot,
    route: &common::snapshot::Route,
    buf: &[u8],
    head: &RequestHead,
    client: IpAddr,
    st: &mut PolicyState,
) -> Verdict {
    let clock = Clock {
        mono_ns: 1_000_000_000_000,
        unix_s: 1_800_000_000,
    };
    policy::check(
        snap,
        Some(route),
        0,
        buf,
        head,
        client,
        &mut Limiters::default(),
        clock,
        st,
    )
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, request)) = data.split_first() else {
        return;
    };
    let snap = snapshot();
    let peer: IpAddr = match pick % 3 {
        0 => [127, 0, 0, 1].into(),
        1 => [10, 1, 2, 3].into(),
        _ => [192, 0, 2, 1].into(),
    };
    let mut buf = request.to_vec();
    let mut plan = FieldPlan::default();
    let Ok(Some(mut head)) = parse_request(&buf, &snap.limits, &mut plan) else {
        return;
    };
    normalize_path(&mut buf, &mut head);
    let method = head.method.of(&buf).to_vec();
    if method == b"CONNECT" || head.target.of(&buf) == b"*" {
        return;
    }
    let host = head.host.map(|h| h.of(&buf));
    let path = head.path(&buf);
    let Some((id, ambiguous)) = snap
        .router
        .find_as_read(host, path, |id| snap.routes[id as usize].accepts(&method))
    else {
        return;
    };
    let route = &snap.routes[id as usize];
    let client = policy::client_ip(&snap.policies, &buf, &head, peer);
    let mut st = PolicyState::with_room();
    let verdict = run_check(snap, route, &buf, &head, client, &mut st);
    assert!(st.out_head_len <= st.out.len());
    if verdict != Verdict::Pass || ambiguous {
        return;
    }
    // The route's edits, by the proxy's own code, after the policies.
    if let Some(h) = &route.headers {
        policy::route_edits(h, &buf, &head, &mut st);
    }
    for &d in &st.drops {
        policy::add_drop(&mut plan.drop, d);
    }
    for d in &plan.drop {
        assert!(head.fields_start <= d.start && d.start < d.end && d.end <= head.fields_end);
    }
    for w in plan.drop.windows(2) {
        assert!(
            w[0].end <= w[1].start,
            "drops out of order: {:?}",
            plan.drop
        );
    }
    let mut scratch = Vec::new();
    let (line, added) = request_extras(
        &buf,
        &head,
        &plan,
        route.strip_prefix_len,
        None,
        peer,
        client,
        b"http",
        b"http",
        &st.extra,
        st.sets_host,
        &st.query_drops,
        &mut scratch,
    );
    let mut fwd = Vec::new();
    for piece in request_pieces(&head, &plan, line, added, head.head_end) {
        match piece {
            Piece::Src(s) => fwd.extend_from_slice(&buf[s.start..s.end]),
            Piece::Extra(s) => fwd.extend_from_slice(&scratch[s.start..s.end]),
        }
    }
    // Room for what the gateway adds.
    let roomy = Limits {
        max_header_bytes: snap.limits.max_header_bytes * 2 + 4096,
        max_header_count: snap.limits.max_header_count + 16,
        ..snap.limits
    };
    let mut plan2 = FieldPlan::default();
    let again = parse_request(&fwd, &roomy, &mut plan2);
    let text = String::from_utf8_lossy(&fwd);
    let Ok(Some(h2)) = again else {
        panic!("the forwarded head does not parse ({again:?}):\n{text}");
    };
    assert_eq!(h2.head_end, fwd.len(), "{text}");
    assert_eq!(h2.method.of(&fwd), &method[..], "{text}");
    let lines = fields(&fwd, &h2);
    for name in ["x-forwarded-for", "x-real-ip", "x-forwarded-proto"] {
        assert_eq!(count(&lines, name), 1, "{name}:\n{text}");
    }
    for name in ["host", "x-forwarded-host", "forwarded", "connection"] {
        assert!(count(&lines, name) <= 1, "{name}:\n{text}");
    }
    let (te, cl) = (
        count(&lines, "transfer-encoding"),
        count(&lines, "content-length"),
    );
    match head.body {
        BodyKind::Chunked => assert!(te == 1 && cl == 0, "{text}"),
        BodyKind::Length(_) => assert!(te == 0 && cl == 1, "{text}"),
        _ => assert!(te == 0 && cl <= 1, "{text}"),
    }
    assert_eq!(h2.body, head.body, "{text}");
    let consumer = st.consumer.is_some();
    // Every route but `open` authenticates, and its policies' `consumer_header` is the
    // gateway's alone there (on `open`, as in Kong, a client's copy is the client's word).
    if &*route.id != "open" {
        assert_eq!(count(&lines, "x-consumer-id"), consumer as usize, "{text}");
    }
    if let Some(h) = &route.headers {
        // What the route removes is gone; what it sets is there once, as it set it.
        for name in h.request_drop.iter() {
            let name = std::str::from_utf8(name).expect("a configured name is text");
            let name = name.to_ascii_lowercase();
            let set = h.request_lines.split(|&b| b == b'\n').filter(|l| {
                l.len() > name.len()
                    && l[..name.len()].eq_ignore_ascii_case(name.as_bytes())
                    && l[name.len()] == b':'
            });
            assert_eq!(count(&lines, &name), set.count(), "{name}:\n{text}");
        }
    }
    if consumer {
        // The credentials of the route's authentication policies (`key` on all but `admin`,
        // `tok` on `keyed` and `admin`).
        if &*route.id != "admin" {
            assert_eq!(count(&lines, "x-api-key"), 0, "{text}");
        }
        if matches!(&*route.id, "keyed" | "admin") {
            assert_eq!(count(&lines, "authorization"), 0, "{text}");
        }
        // No credential is left for the route's policies to find: they identify no one.
        let mut st2 = PolicyState::with_room();
        let local: IpAddr = [127, 0, 0, 1].into();
        let verdict = run_check(snap, route, &fwd, &h2, local, &mut st2);
        assert!(
            verdict != Verdict::Pass && st2.consumer.is_none(),
            "a credential reached the upstream ({verdict:?}):\n{text}"
        );
    }
});
