//! Proves that the plain keep-alive GET proxy path does not allocate: a counting global
//! allocator around the whole process, an origin and a client written not to allocate in their
//! loops, and the real workers in between. Prints allocations per request.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use common::{parse_config, Format, Snapshot};
use dataplane::{DriverChoice, StartOptions};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: defers every operation to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nHello, world!";
const REQUEST: &[u8] = b"GET /hello HTTP/1.1\r\nHost: bench.test\r\nUser-Agent: alloc-test\r\n\r\n";

/// Keep-alive origin answering every request head with RESPONSE, allocation-free per request.
fn origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let mut filled = 0;
                loop {
                    match s.read(&mut buf[filled..]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => filled += n,
                    }
                    // Answer each complete head; keep any partial one.
                    while let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
                        if s.write_all(RESPONSE).is_err() {
                            return;
                        }
                        buf.copy_within(end + 4..filled, 0);
                        filled -= end + 4;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `n` keep-alive requests one after another, reading each full response: the
/// origin's, with the gateway's `X-Request-Id` (32 hex digits) and, since the origin sent
/// none, a `Date` added to the head.
fn drive(client: &mut TcpStream, n: usize) {
    const ID_LINE: usize = "X-Request-Id: ".len() + 32 + 2;
    const DATE_LINE: usize = "Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n".len();
    let head_end = RESPONSE.len() - "\r\nHello, world!".len();
    let want = RESPONSE.len() + ID_LINE + DATE_LINE;
    let mut buf = [0u8; 256];
    for _ in 0..n {
        client.write_all(REQUEST).unwrap();
        let mut got = 0;
        while got < want {
            let k = match client.read(&mut buf[got..]) {
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("read: {e}"),
            };
            assert!(k > 0, "gateway closed the connection");
            got += k;
        }
        assert_eq!(got, want);
        assert_eq!(&buf[..head_end], &RESPONSE[..head_end]);
        assert!(buf[head_end..].starts_with(b"X-Request-Id: "));
        assert!(buf[head_end + ID_LINE..].starts_with(b"Date: "));
        assert_eq!(
            &buf[head_end + ID_LINE + DATE_LINE..got],
            &RESPONSE[head_end..]
        );
    }
}

/// Allocations per proxied request with the default config (request ids and trace context
/// on), and with `access_log` set, every request logged to that file.
fn allocations_per_request(driver: DriverChoice, access_log: Option<&std::path::Path>) -> f64 {
    let origin = origin();
    let mut text = format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nid = \"o\"\ntargets = [{{ address = \"{origin}\" }}]\n[[routes]]\nid = \"r\"\npath_prefix = \"/\"\nupstream = \"o\"\n"
    );
    if let Some(path) = access_log {
        text.push_str(&format!("[access_log]\npath = \"{}\"\n", path.display()));
    }
    let snapshot = Snapshot::compile(parse_config(&text, Format::Toml).unwrap(), 1).unwrap();
    let shared = Arc::new(ArcSwap::from_pointee(snapshot));
    let plane = dataplane::start(
        shared,
        StartOptions {
            workers: 1,
            driver,
            inherited: Vec::new(),
        },
    )
    .unwrap();
    let mut client = TcpStream::connect(plane.addresses[0]).unwrap();
    client.set_nodelay(true).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Warm up: buffers, pools and the runtime's slabs reach their working size.
    drive(&mut client, 2_000);
    const N: usize = 20_000;
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    drive(&mut client, N);
    let allocs = ALLOCATIONS.load(Ordering::SeqCst) - before;
    let per_request = allocs as f64 / N as f64;
    println!(
        "{driver:?}, access log {}: {allocs} allocations over {N} proxied keep-alive GETs = {per_request:.4} per request",
        if access_log.is_some() { "on" } else { "off" }
    );
    drop(client);
    plane.begin_shutdown();
    plane.join(Instant::now() + Duration::from_secs(15));
    per_request
}

// One test function: the allocation counter is global, so nothing may run beside it.
#[test]
fn plain_keep_alive_get_proxy_path_does_not_allocate() {
    for driver in [DriverChoice::Auto, DriverChoice::Epoll] {
        let per_request = allocations_per_request(driver, None);
        // Zero on the request path; the bound leaves room only for the workers' once-a-second
        // housekeeping timers during the run, which are not per request.
        assert!(
            per_request < 0.001,
            "{driver:?}: {per_request} allocations per request"
        );
    }
    // With the access log on, lines go into the worker's recycled buffers and the writer
    // thread hands them back.
    let dir = std::env::temp_dir().join(format!("gw-alloc-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let per_request = allocations_per_request(DriverChoice::Auto, Some(&log));
    let lines = std::fs::read_to_string(&log).unwrap().lines().count();
    assert_eq!(lines, 22_000, "every request logged");
    assert!(per_request < 0.001, "{per_request} allocations per request");
    let _ = std::fs::remove_dir_all(&dir);
}
