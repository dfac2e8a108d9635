//! Worker threads: one per CPU, each pinned, each with its own monoio runtime and its own
//! SO_REUSEPORT listener per listen address, sharing nothing on the request path but the config
//! snapshot.
//!
//! Shutdown without cancelling an in-flight accept (which leaks the accepted fd in monoio
//! 0.2.4): a supervisor task per worker polls the process-wide shutdown flag, then shuts the
//! listening sockets down (which makes the pending accept fail), closes idle keep-alive
//! connections the same way, and waits for in-flight requests up to the drain deadline.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use common::Snapshot;
use monoio::net::{TcpListener, TcpStream};

use crate::access_log::WorkerLog;
use crate::metrics::WorkerMetrics;
use crate::park::ParkLot;
use crate::peer::Peer;
use crate::trace::Rng;
use crate::upstream::{Pool, PoolKey};
use crate::worker_ctx::{IdleSet, RoundRobin, WorkerCtx};
use crate::{DriverKind, StartError};

/// Starts a task serving `stream`; `served` counts the requests it already served.
pub(crate) fn spawn_connection(ctx: &Rc<WorkerCtx>, stream: TcpStream, peer: Peer, served: u64) {
    ctx.active.set(ctx.active.get() + 1);
    ctx.metrics.set_open_connections(ctx.active.get());
    let guard = ActiveGuard(ctx.clone());
    monoio::spawn(async move {
        let ctx = guard.0.clone();
        let index = ctx.index;
        if Contained(crate::proxy::serve(ctx, stream, peer, served))
            .await
            .is_err()
        {
            log::error!(
                "worker {index}: a connection task panicked (message above); that connection \
                 was closed and the worker goes on"
            );
        }
        drop(guard);
    });
}

/// Polls a future inside `catch_unwind`. monoio does not catch panics in tasks, so without
/// this a bug hit by one request would unwind through the runtime and end the worker with
/// every connection on it. A panicking future resolves to `Err` and is dropped (its locals,
/// the connection's sockets among them, were dropped while unwinding).
pub(crate) struct Contained<F>(pub F);

impl<F: std::future::Future> std::future::Future for Contained<F> {
    type Output = Result<F::Output, ()>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        // SAFETY: structural pinning: the inner future is never moved out of `self`.
        let inner = unsafe { self.map_unchecked_mut(|c| &mut c.0) };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(_) => std::task::Poll::Ready(Err(())),
        }
    }
}

/// Resumes parked connections as their sockets become readable.
async fn unpark_loop(ctx: Rc<WorkerCtx>, driver: DriverKind) {
    let Some(epfd) = ctx.park.borrow().as_ref().map(ParkLot::epoll_fd) else {
        return;
    };
    // monoio can wait for any pollable fd through a stream type; a duplicate of the epoll fd,
    // dressed as a Unix stream, is never read or written, only polled.
    // SAFETY: dup of an open fd; the new fd is owned by the stream built on it.
    let dup = unsafe { libc::dup(epfd) };
    if dup < 0 {
        return;
    }
    // SAFETY: `dup` is a fresh fd owned by nothing else.
    let std_stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(dup) };
    let Ok(waiter) = monoio::net::UnixStream::from_std(std_stream) else {
        return;
    };
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
    loop {
        // Under epoll, a relaxed wait would trust stale readiness; ask the kernel instead.
        if waiter
            .readable(driver == DriverKind::IoUring)
            .await
            .is_err()
            || ctx.draining.get()
        {
            return;
        }
        loop {
            // SAFETY: `events` has room for 64 entries; timeout 0 never blocks.
            let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), 64, 0) };
            if n <= 0 {
                break;
            }
            for ev in &events[..n as usize] {
                let data = ev.u64;
                let parked = ctx.park.borrow_mut().as_mut().and_then(|p| p.take(data));
                if let Some(p) = parked {
                    spawn_connection(&ctx, p.stream, p.peer, 1);
                }
            }
            if n < 64 {
                break;
            }
        }
    }
}

/// Decrements the worker's active-connection count when a connection task ends or is dropped.
struct ActiveGuard(Rc<WorkerCtx>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get() - 1);
        self.0.metrics.set_open_connections(self.0.active.get());
    }
}

/// Everything one worker thread needs.
pub(crate) struct WorkerSpec {
    pub index: usize,
    pub cpu: Option<usize>,
    pub driver: DriverKind,
    pub config: Arc<ArcSwap<Snapshot>>,
    /// (listener index, socket): one per listen address, or several for one address after
    /// a binary upgrade handed over more sockets than there are workers.
    pub listeners: Vec<(u16, StdListener)>,
    pub shutdown: Arc<AtomicBool>,
    /// Set with `shutdown` when the listening sockets go on serving in another process: the
    /// drain then cancels this worker's accepts instead of shutting the sockets down.
    pub handover: Arc<AtomicBool>,
    /// Set during a drain when it is to end now (a second stop signal): requests still being
    /// answered are given up and logged as at the drain's deadline.
    pub hurry: Arc<AtomicBool>,
    pub metrics: Arc<WorkerMetrics>,
    /// This worker's end of the access log.
    pub log: WorkerLog,
    /// Receives the outcome of building the runtime.
    pub ready: mpsc::Sender<Result<(), StartError>>,
}

/// io_uring submission queue size per worker.
const RING_ENTRIES: u32 = 1024;

/// Builds the worker's io_uring runtime with cooperative task running.
///
/// Completions for a worker's sockets are mostly produced on other CPUs (the client's and the
/// origin's sends run the receive path there). By default the kernel then interrupts the worker
/// with an IPI so it runs the completion work at once; `IORING_SETUP_COOP_TASKRUN` lets that
/// work wait for the worker's next entry into the kernel, which in a busy event loop comes
/// within one tick. An A/B in the harness with the proxy alone on a CPU (wrk and the origin on
/// the other) measured 42,961 requests per CPU-second without it and 62,787 with it at 13 B
/// (`docs/perf/coop-taskrun-ab.md`). Kernels before 5.19 refuse the flag; the ring is then
/// built without it.
fn build_uring_runtime(
) -> io::Result<monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>> {
    let build = |coop: bool| {
        let mut urb = io_uring::IoUring::builder();
        if coop {
            urb.setup_coop_taskrun();
        }
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(RING_ENTRIES)
            .uring_builder(urb)
            .enable_timer()
            .build()
    };
    with_coop_fallback(build)
}

/// `build(true)`, or `build(false)` when the kernel refuses the flag (EINVAL); any other
/// error is returned as it is.
fn with_coop_fallback<R>(build: impl Fn(bool) -> io::Result<R>) -> io::Result<R> {
    match build(true) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => build(false),
        built => built,
    }
}

/// Thread body: pin, build the runtime, serve until shutdown.
pub(crate) fn run(spec: WorkerSpec) {
    if let Some(cpu) = spec.cpu {
        pin_to_cpu(cpu);
    }
    match spec.driver {
        DriverKind::IoUring => serve_on(build_uring_runtime(), spec),
        DriverKind::Epoll => serve_on(
            monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build(),
            spec,
        ),
    }
}

/// Reports how building the runtime went, then serves on it until shutdown.
fn serve_on<D: monoio::Driver>(built: io::Result<monoio::Runtime<D>>, spec: WorkerSpec) {
    match built {
        Ok(mut rt) => {
            let _ = spec.ready.send(Ok(()));
            rt.block_on(worker_main(spec));
        }
        Err(e) => {
            let _ = spec.ready.send(Err(StartError::Runtime(e)));
        }
    }
}

async fn worker_main(spec: WorkerSpec) {
    let snap = spec.config.load();
    let ctx = Rc::new(WorkerCtx {
        config: spec.config.clone(),
        current: RefCell::new(Rc::new(spec.config.load_full())),
        published: RefCell::new(arc_swap::Cache::new(spec.config.clone())),
        h2pool: RefCell::default(),
        pool: RefCell::new(Pool::new(
            snap.max_idle_per_target,
            snap.timeouts.upstream_idle,
        )),
        rr: RefCell::new(RoundRobin::default()),
        sets: RefCell::new(Default::default()),
        draining: Cell::new(false),
        cut_off: Cell::new(false),
        cut: RefCell::default(),
        handover_until: Cell::new(None),
        accepting: Cell::new(0),
        idle: RefCell::new(IdleSet::default()),
        park: RefCell::new(ParkLot::new().ok()),
        metrics: spec.metrics.clone(),
        limiters: RefCell::default(),
        log: RefCell::new(spec.log),
        rng: RefCell::new(Rng::from_entropy()),
        wall: Cell::new((Instant::now(), std::time::SystemTime::now())),
        active: Cell::new(0),
        full_logged: Cell::new(None),
        index: spec.index,
    });
    monoio::spawn(unpark_loop(ctx.clone(), spec.driver));
    drop(snap);
    let mut listener_fds = Vec::new();
    let accepts = monoio::io::Canceller::new();
    for (index, std_listener) in spec.listeners {
        match TcpListener::from_std(std_listener) {
            Ok(listener) => {
                listener_fds.push(listener.as_raw_fd());
                monoio::spawn(accept_loop(ctx.clone(), listener, index, accepts.handle()));
            }
            Err(e) => log::error!("worker {}: cannot use listener: {e}", spec.index),
        }
    }
    let stop = Stop {
        shutdown: &spec.shutdown,
        handover: &spec.handover,
        hurry: &spec.hurry,
        listener_fds: &listener_fds,
        accepts,
    };
    supervise(&ctx, stop).await;
}

async fn accept_loop(
    ctx: Rc<WorkerCtx>,
    listener: TcpListener,
    index: u16,
    cancel: monoio::io::CancelHandle,
) {
    ctx.accepting.set(ctx.accepting.get() + 1);
    accept_until_drained(&ctx, listener, index, cancel).await;
    ctx.accepting.set(ctx.accepting.get() - 1);
}

async fn accept_until_drained(
    ctx: &Rc<WorkerCtx>,
    listener: TcpListener,
    index: u16,
    cancel: monoio::io::CancelHandle,
) {
    let mut failures = FailureLog::default();
    loop {
        if !room_for_one_more(ctx).await {
            break;
        }
        match listener.cancelable_accept(cancel.clone()).await {
            Ok((stream, peer)) => {
                let peer = Peer {
                    ip: peer.ip(),
                    listener: index,
                };
                // A connection taken as the drain begins is still served (once, then closed),
                // never dropped unanswered.
                spawn_connection(ctx, stream, peer, 0);
                if ctx.draining.get() {
                    break;
                }
            }
            Err(e) => {
                if ctx.draining.get() {
                    break;
                }
                // Out of fds or memory: back off instead of spinning.
                if let Some(more) = failures.due(Instant::now()) {
                    log::warn!(
                        "worker {}: accept failed: {e}{more} (said at most once a minute)",
                        ctx.index
                    );
                }
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A failure that repeats (an accept out of file descriptors, retried every 50 ms): logged
/// at most once a minute, with how many were not (before: 20 lines a second per listener
/// and worker for as long as it lasted).
#[derive(Debug, Default)]
pub struct FailureLog {
    logged: Option<Instant>,
    unsaid: u64,
}

impl FailureLog {
    /// Whether to log the failure that happened at `now`; if so, what to add about the ones
    /// left unsaid since the last line.
    pub fn due(&mut self, now: Instant) -> Option<String> {
        let due = self
            .logged
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60));
        if !due {
            self.unsaid += 1;
            return None;
        }
        self.logged = Some(now);
        let more = match std::mem::take(&mut self.unsaid) {
            0 => String::new(),
            n => format!("; {n} more since the last line"),
        };
        Some(more)
    }
}

/// How often a worker at `[limits] max_connections` looks whether a connection closed.
const FULL_RECHECK: Duration = Duration::from_millis(10);

/// Waits while the worker holds `[limits] max_connections` client connections (busy, idle and
/// parked): it takes no new one, which waits in the listen backlog, until one closes. Returns
/// false when the drain began meanwhile.
async fn room_for_one_more(ctx: &WorkerCtx) -> bool {
    let mut paused = false;
    loop {
        let most = ctx.config.load().limits.max_connections;
        let parked = ctx.park.borrow().as_ref().map_or(0, ParkLot::len);
        let open = ctx.active.get() + parked;
        if open < most {
            return true;
        }
        if ctx.draining.get() {
            return false;
        }
        if !paused {
            paused = true;
            ctx.metrics.accept_paused();
            let now = Instant::now();
            if ctx
                .full_logged
                .get()
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60))
            {
                ctx.full_logged.set(Some(now));
                log::warn!(
                    "worker {}: {open} client connections open, [limits] max_connections is \
                     {most}: new ones wait in the listen backlog until one closes (said at most \
                     once a minute; gateway_accept_paused_total counts each pause)",
                    ctx.index
                );
            }
        }
        monoio::time::sleep(FULL_RECHECK).await;
    }
}

/// How long, in the drain of a binary upgrade, a keep-alive connection still takes one more
/// request.
const HANDOVER_IDLE_GRACE: Duration = Duration::from_secs(1);

/// How a worker is told to stop, and what it stops.
struct Stop<'a> {
    shutdown: &'a AtomicBool,
    handover: &'a AtomicBool,
    hurry: &'a AtomicBool,
    listener_fds: &'a [RawFd],
    /// Cancels the pending accepts.
    accepts: monoio::io::Canceller,
}

/// Housekeeping until shutdown, then the drain.
async fn supervise(ctx: &Rc<WorkerCtx>, stop: Stop<'_>) {
    let shutdown = stop.shutdown;
    let mut last_sweep = Instant::now();
    let mut seen_generation = common::live::GENERATION.load(Ordering::Relaxed);
    loop {
        monoio::time::sleep(Duration::from_millis(100)).await;
        if shutdown.load(Ordering::Acquire) {
            break;
        }
        // Lines reach the log within a tick even when traffic is light.
        ctx.log.borrow_mut().flush();
        ctx.renew_wall();
        let now = Instant::now();
        if now.duration_since(last_sweep) >= Duration::from_secs(1) {
            let snap = ctx.config.load();
            let mut pool = ctx.pool.borrow_mut();
            pool.max_idle = snap.max_idle_per_target;
            pool.idle_timeout = snap.timeouts.upstream_idle;
            pool.sweep(now);
            let mut h2pool = ctx.h2pool.borrow_mut();
            h2pool.sweep(now, snap.timeouts.upstream_idle, snap.max_idle_per_target);
            let generation = common::live::GENERATION.load(Ordering::Relaxed);
            if generation != seen_generation {
                // Target sets or upstreams changed: pooled connections to addresses that left
                // their upstream, or drain in it, close, as do those of upstreams removed;
                // those to addresses that remain stay.
                seen_generation = generation;
                let mut keep = std::collections::HashSet::new();
                for u in &snap.upstreams {
                    let set = u.live.set.load();
                    let serving = set.targets.iter().filter(|t| !t.draining);
                    keep.extend(serving.map(|t| PoolKey::new(t.addr, &u.live)));
                }
                pool.retain(|key| keep.contains(key));
                h2pool.retain(|key| keep.contains(key));
            }
            if let Some(park) = ctx.park.borrow_mut().as_mut() {
                park.expire(now, snap.timeouts.client_idle);
            }
            // A rate limit the config dropped lets go of its buckets now, not at this
            // worker's next rate-limited request, which may never come.
            ctx.limiters.borrow_mut().refresh(&snap);
            last_sweep = now;
        }
    }
    let handover = stop.handover.load(Ordering::Acquire);
    let idle_grace = Instant::now() + HANDOVER_IDLE_GRACE;
    if handover {
        ctx.handover_until.set(Some(idle_grace));
    }
    ctx.draining.set(true);
    if handover {
        // Parked connections come back as idle ones, under the same grace.
        let parked = ctx
            .park
            .borrow_mut()
            .as_mut()
            .map(ParkLot::take_all)
            .unwrap_or_default();
        for p in parked {
            spawn_connection(ctx, p.stream, p.peer, 1);
        }
    } else if let Some(park) = ctx.park.borrow_mut().as_mut() {
        park.clear();
    }
    if handover {
        // The sockets go on listening in the process this one handed them to: only this
        // worker's pending accepts end (a connection they already took is served), and the
        // connections queued on the sockets wait for the successor.
        drop(stop.accepts.cancel());
    } else {
        for &fd in stop.listener_fds {
            // SAFETY: the listeners are owned by accept tasks that live as long as this
            // runtime, so the fds are open and still theirs. shutdown() only makes the pending
            // accept fail.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
    // Idle keep-alive connections close at once, or in a binary upgrade once their grace is
    // over (any request they took meanwhile was answered with `Connection: close`).
    let mut idle_closed = false;
    let mut last_flush = Instant::now();
    let mut deadline = Instant::now() + ctx.config.load().drain_timeout;
    loop {
        if !idle_closed && (!handover || Instant::now() >= idle_grace) {
            for fd in ctx.idle.borrow().fds() {
                // Reading only: the waiting read ends, and the connection closes itself in
                // order (close_notify over TLS), which needs the sending side still open.
                // SAFETY: a connection removes its fd from the idle set before it closes the
                // socket, and this runs on the same thread, so every fd here is open and idle.
                unsafe { libc::shutdown(fd, libc::SHUT_RD) };
            }
            idle_closed = true;
        }
        let accepting = handover && ctx.accepting.get() > 0;
        // Lines of the requests answered meanwhile reach the log as they would before the
        // drain: within a tick (100 ms, so that a slow writer has as many ticks to take a
        // worker's few buffers as it has while serving).
        if last_flush.elapsed() >= Duration::from_millis(100) {
            ctx.log.borrow_mut().flush();
            last_flush = Instant::now();
        }
        if stop.hurry.load(Ordering::Acquire) && !ctx.cut_off.get() {
            deadline = deadline.min(Instant::now());
        }
        if Instant::now() >= deadline && !ctx.cut_off.get() && ctx.active.get() > 0 {
            // Requests still being answered are given up and logged at once; open tunnels end
            // (their watchdogs look every `TUNNEL_TICK`) and log theirs.
            ctx.cut_off.set(true);
            ctx.cut.borrow_mut().wake_all();
            deadline = Instant::now() + crate::proxy::TUNNEL_TICK * 2;
        }
        if (ctx.active.get() == 0 && !accepting) || Instant::now() >= deadline {
            if accepting {
                log::warn!(
                    "worker {}: {} accept(s) still pending at the end of the drain",
                    ctx.index,
                    ctx.accepting.get()
                );
            }
            if ctx.active.get() > 0 {
                // Connections whose requests were given up (and logged), or still reading a
                // request's head: they close with the process.
                log::warn!(
                    "worker {}: {} connection(s) still open at the end of the drain are closed",
                    ctx.index,
                    ctx.active.get()
                );
            }
            break;
        }
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    ctx.pool.borrow_mut().clear();
    ctx.h2pool.borrow_mut().clear();
    // Not left to the context's drop: monoio does not drop the tasks still holding it.
    ctx.log.borrow_mut().close();
    // The closes (and the cancels of pooled connections' armed reads) those drops queued
    // are submitted by the event loop's next turns, not when this task returns: a few turns
    // so that they reach the kernel now, not at the process's exit, which another worker's
    // drain may hold back.
    for _ in 0..3 {
        monoio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Binds `count` SO_REUSEPORT listening sockets on `addr` (port 0 resolved by the first).
///
/// SO_REUSEPORT would also let this process share a port with another process of the same user
/// that already listens there, silently splitting its traffic; a plain bind first makes that an
/// "address in use" error instead.
pub(crate) fn bind_listeners(addr: SocketAddr, count: usize) -> io::Result<Vec<StdListener>> {
    if addr.port() != 0 {
        wait_until_free(addr, Instant::now() + PREDECESSOR_WAIT)?;
    }
    let mut out = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count {
        let listener = reuseport_listener(addr)?;
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// One non-blocking SO_REUSEPORT listening socket on `addr`.
fn reuseport_listener(addr: SocketAddr) -> io::Result<StdListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// The sockets for `addr` with `count` workers: those `handed` over by a predecessor (a
/// binary upgrade) if any, with more bound beside them into the same SO_REUSEPORT group when
/// they are fewer than the workers; else [`bind_listeners`].
pub(crate) fn listeners_for(
    addr: SocketAddr,
    count: usize,
    mut handed: Vec<StdListener>,
) -> io::Result<Vec<StdListener>> {
    if handed.is_empty() {
        return bind_listeners(addr, count);
    }
    let bound = handed[0].local_addr()?;
    let matches = bound.ip() == addr.ip() && (addr.port() == 0 || addr.port() == bound.port());
    if !matches {
        return Err(io::Error::other(format!(
            "the socket handed over is bound to {bound}, not {addr}"
        )));
    }
    for s in &handed {
        s.set_nonblocking(true)?;
    }
    while handed.len() < count {
        handed.push(reuseport_listener(bound)?);
    }
    Ok(handed)
}

/// Longest a start waits for a crashed predecessor's listening sockets to go.
const PREDECESSOR_WAIT: Duration = Duration::from_secs(3);

/// Binds `addr` once without SO_REUSEPORT (and lets it go) to see whether anyone holds it.
fn probe_bind(addr: SocketAddr) -> io::Result<()> {
    let probe = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    probe.set_reuse_address(true)?;
    if addr.is_ipv6() {
        probe.set_only_v6(true)?;
    }
    probe.bind(&addr.into())
}

/// Returns once `addr` can be bound. A process killed with SIGKILL leaves its listening
/// sockets bound for a moment while io_uring releases them asynchronously (milliseconds to a
/// few hundred), so a supervisor's immediate restart would fail with "address in use". Such a
/// socket is still listening but no process has a file descriptor for it any more, while a
/// live instance does: only the first is waited out, until `deadline`.
fn wait_until_free(addr: SocketAddr, deadline: Instant) -> io::Result<()> {
    loop {
        match probe_bind(addr) {
            Err(e)
                if e.kind() == io::ErrorKind::AddrInUse
                    && Instant::now() < deadline
                    && !held_by_a_process(addr.port()) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            done => return done,
        }
    }
}

/// Whether a process has a file descriptor for a socket listening on `port` (in this network
/// namespace). Sockets are found in `/proc/net/tcp{,6}` and their owners in `/proc/*/fd`;
/// processes of other users are only visible to root, so for anyone else another user's
/// instance counts as gone and is waited for until the deadline, then refused all the same.
fn held_by_a_process(port: u16) -> bool {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return false;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    for entry in procs.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let link = link.to_string_lossy();
            let inode = link
                .strip_prefix("socket:[")
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok());
            if inode.is_some_and(|i| inodes.contains(&i)) {
                return true;
            }
        }
    }
    false
}

/// Inodes of the TCP sockets in LISTEN state on `port`.
fn listening_inodes(port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (cols.get(1), cols.get(3), cols.get(9))
            else {
                continue;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && local_port == Some(port) {
                if let Ok(i) = inode.parse() {
                    out.push(i);
                }
            }
        }
    }
    out
}

/// The CPUs this process may run on (its affinity mask).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: as above; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            log::warn!(
                "could not pin worker to CPU {cpu}: {}",
                io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeating_failure_is_said_once_a_minute_with_the_count_left_unsaid() {
        let mut log = FailureLog::default();
        let t0 = Instant::now();
        assert_eq!(log.due(t0).as_deref(), Some(""));
        for ms in (50..60_000).step_by(50) {
            assert_eq!(log.due(t0 + Duration::from_millis(ms)), None);
        }
        let more = log.due(t0 + Duration::from_secs(60));
        assert_eq!(more.as_deref(), Some("; 1199 more since the last line"));
        assert_eq!(log.due(t0 + Duration::from_secs(200)).as_deref(), Some(""));
    }

    #[test]
    fn a_panicking_task_is_contained_and_the_runtime_goes_on() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let outcomes = rt.block_on(async {
            let bad = monoio::spawn(Contained(async {
                monoio::time::sleep(Duration::from_millis(1)).await;
                let empty: &[u8] = &[];
                empty[usize::from(empty.is_empty())] // index out of bounds: panics
            }));
            let good = monoio::spawn(Contained(async {
                monoio::time::sleep(Duration::from_millis(2)).await;
                7u8
            }));
            (bad.await, good.await)
        });
        assert_eq!(outcomes, (Err(()), Ok(7)));
    }

    #[test]
    fn a_port_held_by_a_live_listener_is_refused_at_once() {
        let live = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = live.local_addr().unwrap();
        assert!(held_by_a_process(addr.port()));
        let started = Instant::now();
        let err = wait_until_free(addr, Instant::now() + Duration::from_secs(30)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // Not waited out: this process holds it.
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(live);
        wait_until_free(addr, Instant::now()).expect("free once the listener is gone");
    }

    #[test]
    fn a_listener_only_io_uring_still_holds_is_waited_out() {
        // What SIGKILL leaves: a listening socket whose last reference is an io_uring's file
        // table, released a moment later. A registered file with its fd closed is just that.
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        socket.set_reuse_address(true).unwrap();
        socket
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        socket.listen(16).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        let ring = io_uring::IoUring::new(8).unwrap();
        ring.submitter()
            .register_files(&[socket.as_raw_fd()])
            .unwrap();
        drop(socket);
        assert_eq!(
            probe_bind(addr).unwrap_err().kind(),
            io::ErrorKind::AddrInUse,
            "the ring keeps it bound"
        );
        assert!(!held_by_a_process(addr.port()));
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(ring);
        });
        wait_until_free(addr, Instant::now() + Duration::from_secs(20))
            .expect("waited until the ring let it go");
        release.join().unwrap();
    }

    #[test]
    fn coop_taskrun_falls_back_only_on_einval() {
        let old_kernel = |coop: bool| {
            if coop {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                Ok("plain ring")
            }
        };
        assert_eq!(with_coop_fallback(old_kernel).unwrap(), "plain ring");
        let new_kernel = |coop: bool| Ok(if coop { "coop ring" } else { "plain ring" });
        assert_eq!(with_coop_fallback(new_kernel).unwrap(), "coop ring");
        let no_memory =
            |_coop: bool| -> io::Result<&str> { Err(io::Error::from_raw_os_error(libc::ENOMEM)) };
        let err = with_coop_fallback(no_memory).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOMEM));
    }

    #[test]
    fn the_uring_runtime_builds_and_runs_io() {
        // Builds with the flag on this kernel (or without it on an old one) and completes
        // real io_uring operations and a timer.
        let mut rt = build_uring_runtime().expect("an io_uring runtime");
        let echoed = rt.block_on(async {
            let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let client = monoio::spawn(async move {
                let mut s = monoio::net::TcpStream::connect_addr(addr).await.unwrap();
                let (res, _) = monoio::io::AsyncWriteRentExt::write_all(&mut s, b"ping").await;
                res.unwrap();
            });
            let (mut conn, _) = listener.accept().await.unwrap();
            monoio::time::sleep(Duration::from_millis(1)).await;
            let (res, buf) =
                monoio::io::AsyncReadRentExt::read_exact(&mut conn, vec![0u8; 4]).await;
            res.unwrap();
            client.await;
            buf
        });
        assert_eq!(echoed, b"ping");
    }
}
