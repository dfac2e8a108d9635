//! The control plane: owns the authoritative config, validates and compiles it into snapshots,
//! publishes them to the workers through one `ArcSwap`, and runs the process (signals,
//! graceful shutdown). The `gateway` binary is a thin `main` over [`run`].
//!
//! For now the config comes from a file (or the embedded default) and is reloaded on SIGHUP
//! through the same validate-and-publish path that the admin API will use.

pub mod cli;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use common::{parse_config, Config, ConfigError, Format, Snapshot, DEFAULT_CONFIG};
use dataplane::{DataPlane, StartOptions};

pub use cli::{Command, RunArgs};

/// Exit code for an invalid config or command line.
pub const EXIT_INVALID: i32 = 2;
/// Exit code for a failure to start (bind, runtime).
pub const EXIT_FAILURE: i32 = 1;

/// Where the running config came from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    Embedded,
    File(PathBuf),
}

/// Reads and compiles a config from `source`.
pub fn load(source: &ConfigSource, revision: u64) -> Result<Snapshot, ConfigError> {
    let config: Config = match source {
        ConfigSource::Embedded => parse_config(DEFAULT_CONFIG, Format::Toml)?,
        ConfigSource::File(path) => common::load_config(path)?,
    };
    Snapshot::compile(config, revision)
}

/// `gateway --check FILE`: validates and reports; returns the exit code.
pub fn check(path: &Path) -> i32 {
    match load(&ConfigSource::File(path.to_owned()), 1) {
        Ok(s) => {
            println!(
                "{}: OK ({} listener(s), {} upstream(s), {} route(s))",
                path.display(),
                s.listeners.len(),
                s.upstreams.len(),
                s.routes.len()
            );
            0
        }
        Err(e) => {
            eprintln!("{}: invalid config: {e}", path.display());
            EXIT_INVALID
        }
    }
}

/// Runs the gateway until SIGTERM / SIGINT; returns the process exit code.
pub fn run(args: RunArgs) -> i32 {
    let source = match &args.config {
        Some(p) => ConfigSource::File(p.clone()),
        None => ConfigSource::Embedded,
    };
    let snapshot = match load(&source, 1) {
        Ok(s) => s,
        Err(e) => {
            match &source {
                ConfigSource::File(p) => eprintln!("{}: invalid config: {e}", p.display()),
                ConfigSource::Embedded => eprintln!("embedded config: invalid: {e}"),
            }
            return EXIT_INVALID;
        }
    };
    let workers = args
        .workers
        .or(snapshot.workers)
        .unwrap_or_else(|| dataplane::allowed_cpus().len().max(1));
    let driver = match args.driver {
        Some(d) => d,
        None => match dataplane::DriverChoice::from_env() {
            Ok(d) => d,
            Err(e) => {
                eprintln!("gateway: {e}");
                return EXIT_INVALID;
            }
        },
    };
    if matches!(source, ConfigSource::Embedded) {
        eprintln!("gateway: no --config given; using the embedded default config (demo routes, no upstream)");
    }

    // Signals are taken synchronously by this thread: block them before any worker exists so
    // every thread inherits the mask.
    let signals = block_signals();
    let shared = Arc::new(ArcSwap::from_pointee(snapshot));
    let plane = match dataplane::start(shared.clone(), StartOptions { workers, driver }) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("gateway: {e}");
            return EXIT_FAILURE;
        }
    };
    log_started(&plane);
    wait_for_signals(&signals, &source, &shared, plane)
}

fn log_started(plane: &DataPlane) {
    let cpus: Vec<String> = plane
        .cpus
        .iter()
        .map(|c| c.map_or_else(|| "-".to_owned(), |c| c.to_string()))
        .collect();
    eprintln!(
        "gateway: driver {}, {} worker(s) pinned to CPUs [{}]",
        plane.driver,
        plane.workers,
        cpus.join(", ")
    );
    for addr in &plane.addresses {
        eprintln!("gateway: listening on http://{addr}");
    }
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signals(
    set: &libc::sigset_t,
    source: &ConfigSource,
    shared: &ArcSwap<Snapshot>,
    plane: DataPlane,
) -> i32 {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is a valid signal set and `sig` a valid out-pointer.
        let rc = unsafe { libc::sigwait(set, &mut sig) };
        if rc != 0 {
            continue;
        }
        match sig {
            libc::SIGHUP => reload(source, shared),
            _ => {
                let drain = shared.load().drain_timeout;
                eprintln!(
                    "gateway: signal {sig}: draining (up to {} ms), no new connections",
                    drain.as_millis()
                );
                plane.begin_shutdown();
                // The workers stop by themselves at the drain deadline; the margin covers
                // their last timer tick.
                let all = plane.join(Instant::now() + drain + Duration::from_secs(2));
                eprintln!(
                    "gateway: stopped{}",
                    if all { "" } else { " (workers still busy)" }
                );
                return 0;
            }
        }
    }
}

/// SIGHUP: re-reads the config file and publishes it if valid.
fn reload(source: &ConfigSource, shared: &ArcSwap<Snapshot>) {
    let ConfigSource::File(path) = source else {
        eprintln!("gateway: SIGHUP ignored: running on the embedded config");
        return;
    };
    let current = shared.load();
    match load(source, current.revision + 1) {
        Ok(next) => {
            if next.listeners != current.listeners {
                eprintln!("gateway: reload: listener changes take effect only after a restart");
            }
            let revision = next.revision;
            shared.store(Arc::new(next));
            eprintln!("gateway: reloaded {} (revision {revision})", path.display());
        }
        Err(e) => eprintln!(
            "gateway: reload of {} refused, still on revision {}: {e}",
            path.display(),
            current.revision
        ),
    }
}
