//! `gateway`: the API gateway binary. Parses the command line and hands over to the control
//! plane, which loads the config, starts the data-plane workers and handles signals.

use controlplane::cli::{self, Command, SYNOPSIS, USAGE};

/// mimalloc instead of glibc's malloc. Plain HTTP/1.1 proxying allocates nothing per request,
/// but the HTTP/2 path does (the `h2` crate's frames, header maps and buffers): glibc's
/// allocator was 11% of the gateway's CPU time under h2load over TLS, and with mimalloc the
/// gateway served 4 to 19% more HTTP/2 requests per CPU-second. The price: HTTP/1.1 over TLS
/// at 13 B 3 to 5% fewer (rustls allocates per record), about 15 MiB more memory at rest;
/// cleartext HTTP/1.1 level (`docs/perf/tls-2cpu.md`, run 11).
#[global_allocator]
static ALLOC: MiMalloc = MiMalloc;

/// mimalloc, asked through the entry point each request's alignment needs. The `mimalloc`
/// crate sends every request to `mi_malloc_aligned`, whose fast path covers only blocks of at
/// most 1 KiB; a larger request whose size is not a power of two is over-allocated by
/// `align - 1` bytes and aligned by hand (`mi_theap_malloc_zero_aligned_at_overalloc`: about
/// 200 more instructions, and a block of the next size class), even for the alignment of 8
/// that every mimalloc block has anyway. On the HTTP/2 path that was 4 allocations per
/// request (the stream's boxed future among them). Requests aligned to at most a word go to
/// `mi_malloc`, `mi_zalloc` and `mi_realloc`, as mimalloc's own `mi_realloc_aligned` does for
/// them; larger alignments keep the aligned entry points.
struct MiMalloc;

/// The alignment every mimalloc block has: block sizes are whole words, and a page's first
/// block starts 16-byte aligned. (Not 16: a 24-byte block can start at 40.)
const WORD: usize = std::mem::size_of::<usize>();

// SAFETY: each method forwards to mimalloc with the layout's size (and its alignment where
// that is above a word, which every mimalloc block already satisfies), and frees with
// `mi_free`, which takes blocks from every entry point used here.
unsafe impl std::alloc::GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_malloc, mi_malloc_aligned};
        // SAFETY: plain allocation calls; a null result is passed on as the trait allows.
        unsafe {
            if layout.align() <= WORD {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};
        // SAFETY: as in `alloc`.
        unsafe {
            if layout.align() <= WORD {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from one of this allocator's methods (the trait's contract).
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys::{mi_realloc, mi_realloc_aligned};
        // SAFETY: `ptr` came from this allocator with `layout` (the trait's contract).
        unsafe {
            if layout.align() <= WORD {
                mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

/// `mi_option_purge_delay` in mimalloc's option enum (the same index in the v2 and v3
/// headers bundled with `libmimalloc-sys`; its Rust constants stop short of it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long mimalloc keeps memory it no longer uses before giving it back to the kernel.
/// Its default, 1 s, is shorter than the HTTP/2 path's allocation cycle (each connection's
/// 64 KiB answer buffers are replaced every few hundred answers): the kernel took back
/// pages that were soon needed again, and refaulting them, huge pages zeroed whole, cost
/// the gateway 2 to 3% of its CPU time under h2load (400 to 1,200 page faults a second; 0
/// to 5 with 10 s; `docs/perf/tls-2cpu.md`). Memory left over after a burst still goes
/// back, 10 s later. An operator's `MIMALLOC_PURGE_DELAY` wins.
const PURGE_DELAY_MS: std::ffi::c_long = 10_000;

fn configure_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists
        // (`mi_option_set` is not thread-safe); the option index is checked by the test below.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

use std::io::Write as _;

fn main() {
    configure_allocator();
    let code = match cli::parse(std::env::args().skip(1)) {
        // Written, not `println!`: a reader that stops early (`gateway --help | head`) is no
        // reason to panic (println! did, on the broken pipe).
        Ok(Command::Help) => {
            let _ = writeln!(std::io::stdout(), "{USAGE}");
            0
        }
        Ok(Command::Version) => {
            let _ = writeln!(std::io::stdout(), "gateway {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok(Command::Check(path, node)) => controlplane::check(&path, node),
        Ok(Command::Run(args)) => controlplane::run(args),
        Err(e) => {
            eprintln!("gateway: {e}\n{SYNOPSIS}");
            controlplane::EXIT_INVALID
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};

    use super::*;

    #[test]
    fn every_allocation_is_aligned_usable_and_kept_through_realloc() {
        // Sizes across mimalloc's small, medium and large blocks, powers of two and not,
        // with every alignment from 1 to 4 KiB (the word-aligned ones take the plain entry
        // points, the others the aligned ones).
        let sizes = [
            1, 7, 8, 24, 100, 1000, 1025, 1500, 4096, 5000, 70_000, 300_000,
        ];
        for &size in &sizes {
            for shift in 0..=12 {
                let layout = Layout::from_size_align(size, 1 << shift).unwrap();
                // SAFETY: a non-zero size; every pointer is checked, written within its
                // size, and freed once with its layout.
                unsafe {
                    let p = ALLOC.alloc(layout);
                    assert!(!p.is_null(), "{layout:?}");
                    assert_eq!(p as usize % layout.align(), 0, "{layout:?}");
                    for i in 0..size {
                        p.add(i).write(i as u8);
                    }
                    let grown = size * 3 + 1;
                    let q = ALLOC.realloc(p, layout, grown);
                    assert_eq!(q as usize % layout.align(), 0, "{layout:?} grown");
                    for i in 0..size {
                        assert_eq!(q.add(i).read(), i as u8, "{layout:?} byte {i}");
                    }
                    ALLOC.dealloc(q, Layout::from_size_align(grown, layout.align()).unwrap());

                    let z = ALLOC.alloc_zeroed(layout);
                    assert_eq!(z as usize % layout.align(), 0, "{layout:?} zeroed");
                    assert!((0..size).all(|i| z.add(i).read() == 0), "{layout:?} zeroed");
                    ALLOC.dealloc(z, layout);
                }
            }
        }
    }

    #[test]
    fn the_option_set_at_start_is_mimallocs_purge_delay() {
        // `main` does not run in a test binary, so the option still holds what mimalloc read
        // at start: the environment's value, else its own default for the purge delay
        // (1000 ms in the bundled v3 header). Another index would hold another default.
        let expected = std::env::var("MIMALLOC_PURGE_DELAY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        // SAFETY: reads an option; nothing in this test binary sets options.
        let now = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(
            now, expected,
            "option {MI_OPTION_PURGE_DELAY} is not mimalloc's purge delay"
        );
    }
}
