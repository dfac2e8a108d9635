//! Criterion benchmarks of the request path pieces and the whole in-memory path (parse, route,
//! head rewrite, gather), plus allocations per request counted by a global allocator.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use benches::{api_routes_config, routes_config, snapshot_with_routes, BROWSER_GET, MINIMAL_GET};
use common::{parse_config, Format, Limits, RouteAction, Snapshot};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use dataplane::codec::chunked::ChunkedDecoder;
use dataplane::codec::request::{parse_request, RequestHead};
use dataplane::codec::FieldPlan;
use dataplane::forward::{request_extras, request_pieces};
use dataplane::gather::Gather;

#[global_allocator]
static GLOBAL: benches::Counting = benches::Counting;

const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

/// Buffers a connection keeps from request to request.
struct Scratch {
    buf: Vec<u8>,
    plan: FieldPlan,
    extra: Vec<u8>,
    iov: Vec<libc::iovec>,
}

/// The whole in-memory request path: parse, route, head rewrite, build the vectored write.
/// Returns the number of bytes the write would send.
fn request_path(snap: &Snapshot, s: &mut Scratch) -> usize {
    let limits: &Limits = &snap.limits;
    let head = parse_request(&s.buf, limits, &mut s.plan)
        .expect("valid request")
        .expect("complete request");
    let method = head.method.of(&s.buf);
    let host = head.host.map(|h| h.of(&s.buf));
    let id = snap
        .router
        .find(host, head.path(&s.buf), |id| {
            snap.routes[id as usize].accepts(method)
        })
        .expect("a route matches");
    let route = &snap.routes[id as usize];
    let RouteAction::Proxy { upstream } = route.action else {
        unreachable!("bench routes proxy")
    };
    black_box(&snap.upstreams[upstream]);
    rewrite(s, &head, route.strip_prefix_len)
}

/// The head rewrite: added fields, new request line if any, and the iovecs of the write.
/// Returns the bytes the write would send.
fn rewrite(s: &mut Scratch, head: &RequestHead, strip_prefix_len: usize) -> usize {
    let (line, tail) = request_extras(
        &s.buf,
        head,
        &s.plan,
        strip_prefix_len,
        None,
        PEER,
        PEER,
        b"http",
        b"http",
        b"",
        false,
        &[],
        &mut s.extra,
    );
    let pieces = request_pieces(head, &s.plan, line, tail, head.head_end);
    let g = Gather::new(
        std::mem::take(&mut s.buf),
        std::mem::take(&mut s.extra),
        std::mem::take(&mut s.iov),
        pieces,
    );
    let len = g.len();
    (s.buf, s.extra, s.iov) = g.into_parts();
    len
}

fn scratch(request: &[u8]) -> Scratch {
    let mut buf = Vec::with_capacity(8192);
    buf.extend_from_slice(request);
    Scratch {
        buf,
        plan: FieldPlan::default(),
        extra: Vec::with_capacity(512),
        iov: Vec::with_capacity(16),
    }
}

fn benches(c: &mut Criterion) {
    let snap10 = snapshot_with_routes(10);
    let snap1000 = snapshot_with_routes(1000);
    let limits = snap10.limits;

    let mut g = c.benchmark_group("parse");
    let mut plan = FieldPlan::default();
    g.bench_function("minimal_get", |b| {
        b.iter(|| parse_request(black_box(MINIMAL_GET), &limits, &mut plan))
    });
    g.bench_function("browser_get", |b| {
        b.iter(|| parse_request(black_box(BROWSER_GET), &limits, &mut plan))
    });
    g.finish();

    let mut g = c.benchmark_group("route");
    for (name, snap) in [("10_routes", &snap10), ("1000_routes", &snap1000)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                snap.router.find(
                    Some(black_box(&b"api.example.com"[..])),
                    black_box(b"/api/v1/orders/12345"),
                    |id| snap.routes[id as usize].accepts(b"GET"),
                )
            })
        });
    }
    // A large API's table: the last parametrised route, and a host no table has (every
    // wildcard host and parametrised path is passed over for the catch-all).
    for n in [1000, 10_000] {
        let config = parse_config(&api_routes_config(n), Format::Toml).expect("parses");
        let snap = Snapshot::compile(config, 1).expect("compiles");
        let last = format!("/svc{}/items/42", (n - 2) / 2 * 2);
        let want = snap
            .routes
            .iter()
            .position(|r| *r.id == *format!("r{}", (n - 2) / 2 * 2));
        let accepts = |id: u32| snap.routes[id as usize].accepts(b"GET");
        let found = snap
            .router
            .find(Some(b"api.example.com"), last.as_bytes(), accepts);
        assert_eq!(found.map(|id| id as usize), want, "{last}");
        g.bench_function(format!("{n}_api_routes_last_param"), |b| {
            b.iter(|| {
                snap.router.find(
                    Some(black_box(&b"api.example.com"[..])),
                    black_box(last.as_bytes()),
                    |id| snap.routes[id as usize].accepts(b"GET"),
                )
            })
        });
        g.bench_function(format!("{n}_api_routes_no_host_or_path"), |b| {
            b.iter(|| {
                snap.router.find(
                    Some(black_box(&b"x.nowhere.example.com"[..])),
                    black_box(b"/api/v1/orders/12345"),
                    |id| snap.routes[id as usize].accepts(b"GET"),
                )
            })
        });
    }
    g.finish();

    // Hash balancing over 256 targets of weight 10 (256,000 ring points, cut to 65,536),
    // healthy, and every one unhealthy (an outage: panic mode).
    let mut g = c.benchmark_group("pick");
    let targets = (0..256u32)
        .map(|i| common::live::LiveTarget {
            addr: std::net::SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8], 80)),
            weight: 10,
            host: None,
            draining: false,
            backup: false,
            state: common::live::TargetState::new(),
        })
        .collect();
    let set = common::live::TargetSet::new(targets);
    let pick = |key: u64| common::live::Pick {
        balance: common::config::Balance::Hash,
        counter: 0,
        random: 0,
        key,
        tried: Default::default(),
        withdrawn: Default::default(),
    };
    let mut key = 0u64;
    g.bench_function("hash_256_targets", |b| {
        b.iter(|| {
            key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
            set.pick(&pick(key))
        })
    });
    for t in &set.targets {
        t.state.set_unhealthy(true);
    }
    g.bench_function("hash_256_targets_all_down", |b| {
        b.iter(|| {
            key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
            set.pick(&pick(key))
        })
    });
    g.finish();

    // Compiling a config (what a PUT or a reload costs the control plane), parsing aside.
    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    for (name, text) in [
        ("1000_routes", routes_config(1000)),
        ("10000_routes", routes_config(10_000)),
        ("1000_api_routes", api_routes_config(1000)),
        ("10000_api_routes", api_routes_config(10_000)),
    ] {
        let config = parse_config(&text, Format::Toml).expect("parses");
        g.bench_function(name, |b| {
            b.iter_batched(
                || config.clone(),
                |c| Snapshot::compile(c, 1).expect("compiles"),
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();

    let shared = ArcSwap::from_pointee(snapshot_with_routes(10));
    c.bench_function("snapshot_load", |b| {
        b.iter(|| black_box(shared.load().revision))
    });
    let shared_arc = Arc::new(shared);
    c.bench_function("snapshot_load_full", |b| {
        b.iter(|| black_box(shared_arc.load_full().revision))
    });

    let mut s = scratch(BROWSER_GET);
    let head = parse_request(&s.buf, &limits, &mut s.plan)
        .unwrap()
        .unwrap();
    c.bench_function("head_rewrite", |b| b.iter(|| rewrite(&mut s, &head, 0)));

    let mut g = c.benchmark_group("request_path");
    for (name, snap) in [("10_routes", &snap10), ("1000_routes", &snap1000)] {
        let mut s = scratch(BROWSER_GET);
        g.bench_function(name, |b| b.iter(|| request_path(snap, &mut s)));
    }
    g.finish();

    let body: Vec<u8> = {
        let mut v = Vec::new();
        for _ in 0..16 {
            v.extend_from_slice(b"1000\r\n");
            v.extend(std::iter::repeat_n(b'x', 4096));
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(b"0\r\n\r\n");
        v
    };
    c.bench_function("chunked_validate_64k", |b| {
        b.iter_batched(
            || ChunkedDecoder::new(16384),
            |mut d| d.advance(black_box(&body)),
            BatchSize::SmallInput,
        )
    });

    // Allocations per request on the in-memory path, after warm-up.
    let mut s = scratch(BROWSER_GET);
    for _ in 0..1000 {
        request_path(&snap1000, &mut s);
    }
    const N: u64 = 100_000;
    let before = benches::allocations();
    for _ in 0..N {
        black_box(request_path(&snap1000, &mut s));
    }
    let allocs = benches::allocations() - before;
    println!(
        "allocations per request on the in-memory path: {} ({allocs} over {N} requests)",
        allocs as f64 / N as f64
    );
}

criterion_group!(hot_path, benches);
criterion_main!(hot_path);
