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
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

fn main() {
    configure_allocator();
    let code = match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            println!("{USAGE}");
            0
        }
        Ok(Command::Version) => {
            println!("gateway {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok(Command::Check(path)) => controlplane::check(&path),
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
    use super::*;

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
