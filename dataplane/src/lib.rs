//! The data plane: a thread-per-core HTTP/1.1 reverse proxy on monoio.
//!
//! Map for a newcomer, in the order a request meets the modules:
//! - [`start`] binds the listeners (`worker::bind_listeners`, which waits out a crashed
//!   predecessor's sockets), starts the access log writer (`access_log`) and spawns one pinned
//!   worker thread per CPU (`worker`), each with its own monoio runtime (io_uring, or epoll
//!   when io_uring is unavailable or forced) and its own SO_REUSEPORT socket per listen
//!   address. `worker_ctx` is the state a worker shares with its connection tasks, `peer`
//!   who is at the other end of a connection.
//! - `proxy` serves one client connection, phase by phase (its own map lists them):
//!   downstream (read the head: `codec::request`; park idle connections: `park`), route (the
//!   snapshot's router), `policy`, then the connector, the exchange (`forward` and `gather`
//!   write the head; `codec::response` reads the answer), the relay (`codec::chunked`; a
//!   large body socket to socket through a pipe when `[relay] splice` is on: `splice`) or a
//!   tunnel, and finish.
//! - `trace` makes request ids and W3C trace context; `error` is the one classified error
//!   that decides statuses and metric labels; `status` has the responses the gateway sends
//!   itself; `io` the shared read loop.
//! - `upstream` holds each worker's keep-alive connection pools; `metrics` the per-worker
//!   counters the admin API renders; `access_log` the per-worker log buffers and the writer.
//!
//! The config arrives as an `ArcSwap<Snapshot>` loaded once per request; the control plane
//! swaps it without ever blocking a worker.

pub mod access_log;
pub mod codec;
pub mod error;
pub mod forward;
pub mod gather;
mod h2pool;
mod io;
pub mod json;
pub mod metrics;
mod park;
mod peer;
pub mod policy;
mod proxy;
pub mod shape;
mod splice;
pub mod status;
pub mod tls;
pub mod trace;
pub mod upstream;
mod worker;
mod worker_ctx;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use common::Snapshot;

pub use worker::{allowed_cpus, FailureLog};

/// Which I/O driver to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverChoice {
    /// io_uring when the kernel allows it, epoll otherwise.
    Auto,
    /// epoll even where io_uring works (tests, odd kernels).
    Epoll,
}

impl DriverChoice {
    /// From the `GATEWAY_IO_DRIVER` environment variable (`epoll`, `io_uring` or `auto`).
    pub fn from_env() -> Result<DriverChoice, String> {
        match std::env::var("GATEWAY_IO_DRIVER").as_deref() {
            Err(_) | Ok("") | Ok("auto") | Ok("io_uring") | Ok("iouring") => Ok(DriverChoice::Auto),
            Ok("epoll") | Ok("legacy") => Ok(DriverChoice::Epoll),
            Ok(other) => Err(format!(
                "GATEWAY_IO_DRIVER={other:?}: expected `auto`, `io_uring` or `epoll`"
            )),
        }
    }
}

/// The driver the workers run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    IoUring,
    Epoll,
}

impl std::fmt::Display for DriverKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DriverKind::IoUring => "io_uring",
            DriverKind::Epoll => "epoll",
        })
    }
}

/// How to start the data plane.
#[derive(Debug)]
pub struct StartOptions {
    /// Worker threads.
    pub workers: usize,
    pub driver: DriverChoice,
    /// Listening sockets handed over by the process this one replaces (a binary upgrade),
    /// by listener index: used instead of binding anew, so no connection waiting in their
    /// queues is lost. Empty for a normal start.
    pub inherited: Vec<Vec<std::net::TcpListener>>,
}

/// Why the data plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "cannot create the worker runtime: {0} (io_uring needs locked memory: raise RLIMIT_MEMLOCK, \
         e.g. LimitMEMLOCK=infinity in the systemd unit, or set GATEWAY_IO_DRIVER=epoll)"
    )]
    Runtime(std::io::Error),
    #[error("cannot spawn a worker thread: {0}")]
    Spawn(std::io::Error),
    #[error("cannot start the access log writer: {0}")]
    AccessLog(std::io::Error),
}

/// The running workers.
#[derive(Debug)]
pub struct DataPlane {
    /// Bound listen addresses (port 0 resolved), in config order.
    pub addresses: Vec<SocketAddr>,
    pub driver: DriverKind,
    pub workers: usize,
    /// The CPU each worker is pinned to.
    pub cpus: Vec<Option<usize>>,
    /// Each worker's counters, for scraping.
    pub metrics: Vec<Arc<metrics::WorkerMetrics>>,
    /// The listening sockets, by listener index (open while the workers run), for a binary
    /// upgrade to hand over.
    pub listener_fds: Vec<Vec<std::os::fd::RawFd>>,
    shutdown: Arc<AtomicBool>,
    handover: Arc<AtomicBool>,
    hurry: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    access_log: access_log::AccessLogWriter,
}

/// Binds every listener of the current snapshot and starts the workers.
pub fn start(config: Arc<ArcSwap<Snapshot>>, opts: StartOptions) -> Result<DataPlane, StartError> {
    let workers = opts.workers.max(1);
    let driver = match opts.driver {
        DriverChoice::Epoll => DriverKind::Epoll,
        DriverChoice::Auto if monoio::utils::detect_uring() => DriverKind::IoUring,
        DriverChoice::Auto => DriverKind::Epoll,
    };
    let snap = config.load_full();
    let mut per_worker: Vec<Vec<(u16, std::net::TcpListener)>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut addresses = Vec::new();
    let mut listener_fds = Vec::new();
    let mut inherited = opts.inherited;
    inherited.resize_with(snap.listeners.len(), Vec::new);
    for (index, (&addr, handed)) in snap.listeners.iter().zip(inherited).enumerate() {
        let sockets = worker::listeners_for(addr, workers, handed)
            .map_err(|source| StartError::Bind { addr, source })?;
        addresses.push(
            sockets[0]
                .local_addr()
                .map_err(|source| StartError::Bind { addr, source })?,
        );
        listener_fds.push(
            sockets
                .iter()
                .map(std::os::fd::AsRawFd::as_raw_fd)
                .collect(),
        );
        // More sockets than workers (handed over by a process with more workers): the
        // workers take turns, so every socket's queue is accepted from.
        for (i, s) in sockets.into_iter().enumerate() {
            per_worker[i % workers].push((index as u16, s));
        }
    }
    policy::cluster::start(config.clone());
    let (log_writer, mut logs) = access_log::AccessLogWriter::start(config.clone(), workers)
        .map_err(StartError::AccessLog)?;
    let cpus_allowed = allowed_cpus();
    let shutdown = Arc::new(AtomicBool::new(false));
    let handover = Arc::new(AtomicBool::new(false));
    let hurry = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut threads = Vec::with_capacity(workers);
    let mut cpus = Vec::with_capacity(workers);
    let all_metrics: Vec<Arc<metrics::WorkerMetrics>> =
        (0..workers).map(|_| Arc::default()).collect();
    for (index, (listeners, log)) in per_worker.into_iter().zip(logs.drain(..)).enumerate() {
        // Pin only when there are enough CPUs for one worker each; more workers than CPUs
        // share them as the scheduler sees fit.
        let cpu = (workers <= cpus_allowed.len()).then(|| cpus_allowed[index]);
        cpus.push(cpu);
        let spec = worker::WorkerSpec {
            index,
            cpu,
            driver,
            config: config.clone(),
            listeners,
            shutdown: shutdown.clone(),
            handover: handover.clone(),
            hurry: hurry.clone(),
            metrics: all_metrics[index].clone(),
            log,
            ready: ready_tx.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("gw-worker-{index}"))
            .spawn(move || worker::run(spec))
            .map_err(StartError::Spawn)?;
        threads.push(handle);
    }
    drop(ready_tx);
    let plane = DataPlane {
        addresses,
        driver,
        workers,
        cpus,
        metrics: all_metrics,
        listener_fds,
        shutdown,
        handover,
        hurry,
        threads,
        access_log: log_writer,
    };
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                plane.begin_shutdown();
                return Err(e);
            }
            Err(_) => break,
        }
    }
    Ok(plane)
}

impl DataPlane {
    /// Starts the graceful drain: stop accepting, close idle connections, let in-flight
    /// requests finish within the snapshot's drain timeout.
    pub fn begin_shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
    }

    /// The drain of a binary upgrade: as [`DataPlane::begin_shutdown`], except that the
    /// listening sockets, now also the successor's, are left listening; only this process's
    /// accepts stop.
    pub fn begin_handover(&self) {
        self.handover.store(true, Ordering::Release);
        self.shutdown.store(true, Ordering::Release);
    }

    /// Makes the access log reopen its file (after logrotate moved it; SIGUSR1).
    pub fn reopen_access_log(&self) {
        self.access_log.reopen();
    }

    /// [`DataPlane::reopen_access_log`] as a handle, for use while the plane is joined.
    pub fn access_log_reopener(&self) -> impl Fn() + Send + 'static {
        self.access_log.reopener()
    }

    /// Waits for the workers to finish, at most until `deadline`, then for the access log to
    /// write their last lines. Returns whether all workers finished.
    pub fn join(self, deadline: Instant) -> bool {
        self.join_hurrying(deadline, || false)
    }

    /// [`DataPlane::join`], asking `hurry` every 10 ms while workers are busy: once it says
    /// so, the drain ends now, as at its deadline (requests still being answered are given
    /// up and logged, the access log written out).
    pub fn join_hurrying(self, mut deadline: Instant, mut hurry: impl FnMut() -> bool) -> bool {
        // Asks `hurry` (until it has said so) and says whether the deadline has passed.
        let mut past = |deadline: &mut Instant, margin: Duration| {
            if !self.hurry.load(Ordering::Acquire) && hurry() {
                self.hurry.store(true, Ordering::Release);
                *deadline = (*deadline).min(Instant::now() + margin);
            }
            Instant::now() >= *deadline
        };
        for t in &self.threads {
            while !t.is_finished() {
                // The workers' cut-off and their tunnels' watchdogs, and a margin.
                if past(&mut deadline, Duration::from_secs(2)) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // The workers' last lines, written out within the same deadline (a writer stuck on
        // a file or pipe that takes nothing must not hold the exit past it, nor past a
        // second when hurried).
        while !self.access_log.is_finished() {
            if past(&mut deadline, Duration::from_secs(1)) {
                log::warn!(
                    "access log: still being written at the end of the drain; its last lines \
                     are lost"
                );
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for t in self.threads {
            let _ = t.join();
        }
        self.access_log.join();
        true
    }
}
