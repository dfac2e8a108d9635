//! Fixtures shared by the benchmarks: request heads and snapshots with many routes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use common::{parse_config, Format, Snapshot};

/// The system allocator, counting allocations and reallocations; a bench installs it with
/// `#[global_allocator] static GLOBAL: benches::Counting = benches::Counting;` and reads
/// [`allocations`] around the work it measures.
#[derive(Debug)]
pub struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// Allocations and reallocations so far (with [`Counting`] installed).
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

// SAFETY: forwards to the system allocator unchanged, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

/// The head wrk sends.
pub const MINIMAL_GET: &[u8] = b"GET /13b HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n";

/// A browser-like head of about 500 bytes.
pub const BROWSER_GET: &[u8] = b"GET /api/v1/orders/12345?expand=items&currency=EUR HTTP/1.1\r\n\
Host: api.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n\
Accept: application/json, text/plain, */*\r\n\
Accept-Language: en-GB,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Referer: https://shop.example.com/orders\r\n\
Origin: https://shop.example.com\r\n\
Connection: keep-alive\r\n\
Cookie: session=0123456789abcdef0123456789abcdef; theme=dark\r\n\
X-Request-Id: 7f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b\r\n\r\n";

/// A snapshot with `n` routes: a mix of exact paths, prefixes, exact and wildcard hosts and
/// method lists, ending with a catch-all. The browser request matches a prefix route near the
/// middle of the table.
pub fn snapshot_with_routes(n: usize) -> Snapshot {
    let config = parse_config(&routes_config(n), Format::Toml).expect("bench config parses");
    Snapshot::compile(config, 1).expect("bench config compiles")
}

/// The TOML of [`snapshot_with_routes`].
pub fn routes_config(n: usize) -> String {
    let mut text = String::from(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nid = \"u\"\ntargets = [{ address = \"127.0.0.1:9\" }]\n",
    );
    for i in 0..n.saturating_sub(2) {
        let route = match i % 4 {
            0 => format!("path = \"/svc{i}/status\"\nmethods = [\"GET\"]"),
            1 => format!("path_prefix = \"/svc{i}\""),
            2 => format!("path_prefix = \"/svc{i}/v1\"\nhosts = [\"svc{i}.example.com\"]"),
            _ => format!("path_prefix = \"/svc{i}\"\nhosts = [\"*.tenant{i}.example.com\"]\nmethods = [\"GET\", \"POST\"]"),
        };
        text.push_str(&format!(
            "[[routes]]\nid = \"r{i}\"\n{route}\nupstream = \"u\"\n"
        ));
    }
    text.push_str("[[routes]]\nid = \"orders\"\npath_prefix = \"/api/v1/orders\"\nhosts = [\"api.example.com\"]\nupstream = \"u\"\n");
    text.push_str("[[routes]]\nid = \"all\"\npath_prefix = \"/\"\nupstream = \"u\"\n");
    text
}

/// A config of `n` routes as a large API's: half parametrised paths
/// (`/svc{i}/items/{id}`, `GET`), half tenants' wildcard hosts (`*.t{i}.example.com`, every
/// path), then a catch-all. [`snapshot_with_routes`]'s mix has neither many parameters nor a
/// host that misses every table.
pub fn api_routes_config(n: usize) -> String {
    let mut text = String::from(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nid = \"u\"\ntargets = [{ address = \"127.0.0.1:9\" }]\n",
    );
    for i in 0..n.saturating_sub(1) {
        let route = if i % 2 == 0 {
            format!("path = \"/svc{i}/items/{{id}}\"\nmethods = [\"GET\"]")
        } else {
            format!("path_prefix = \"/\"\nhosts = [\"*.t{i}.example.com\"]")
        };
        text.push_str(&format!(
            "[[routes]]\nid = \"r{i}\"\n{route}\nupstream = \"u\"\n"
        ));
    }
    text.push_str("[[routes]]\nid = \"all\"\npath_prefix = \"/\"\nupstream = \"u\"\n");
    text
}
