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

fn main() {
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
