//! HTTP/2 connections to upstreams that speak it (`protocol = "h2c"`, `"h2"` or `"grpc"`,
//! over TLS with the upstream's `tls`): per worker,
//! target and upstream (as [`crate::upstream::Pool`] keeps them), a few multiplexed
//! connections, each carrying up to `max_streams` requests at once (fewer if the target's
//! SETTINGS say so); a request that finds them all full opens another. A connection the
//! target closes or sends GOAWAY on is marked closed by its driver task and leaves the pool
//! at the next look; streams already open on it finish.
//!
//! The h2 crate runs the protocol over the same monoio adapter the client side uses
//! ([`crate::proxy::PollIo`]). Not the hot path of plain HTTP/1.1 proxying; per request it
//! costs a pool lookup and h2's own stream bookkeeping.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::live::UpstreamLive;
use h2::client::SendRequest;

use crate::error::ErrorKind;
use crate::upstream::{ByKey, Counted, PoolKey};

/// The flow-control window the gateway opens per stream to an upstream. The connection's is
/// that times the streams it may carry: a client that stops reading holds back its own
/// stream, never the connection's other streams (RFC 9113 5.2; with a smaller connection
/// window, a few stalled streams left every other call on it without DATA). What the
/// gateway may have to hold is bounded by the streams' windows either way.
const STREAM_WINDOW: u32 = 256 << 10;
/// The least connection window, for connections of few streams.
const CONNECTION_WINDOW: u32 = 8 << 20;

/// One HTTP/2 connection to a target.
pub(crate) struct H2Conn {
    send: SendRequest<Bytes>,
    /// Streams open on it (held by [`StreamSlot`]s).
    open: Cell<u32>,
    /// Set by the driver task when the connection has ended (closed, GOAWAY, error).
    closed: Rc<Cell<bool>>,
    max_streams: u32,
    /// When the last stream ended.
    idle_since: Cell<Instant>,
    /// Counted in the upstream's open connections (`circuit.max_connections`).
    _counted: Option<Counted>,
    /// The socket, open while the driver task holds the connection (until `closed`).
    fd: RawFd,
    /// Its TCP_USER_TIMEOUT (the upstream's `send_ms` when last set).
    send_timeout: Cell<Duration>,
}

impl std::fmt::Debug for H2Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Conn")
            .field("open", &self.open.get())
            .field("closed", &self.closed.get())
            .finish_non_exhaustive()
    }
}

impl H2Conn {
    /// Whether it can take one more stream now (the target's SETTINGS may allow none), its
    /// upstream's `max_streams` being `limit` now: lowered, it holds for the connections
    /// open already (before, they kept the number they were opened with for good).
    pub fn has_room(&self, limit: u32) -> bool {
        let peer = u32::try_from(self.send.current_max_send_streams()).unwrap_or(u32::MAX);
        !self.closed.get() && self.open.get() < self.max_streams.min(limit).min(peer)
    }

    /// A handle that opens streams on the connection, and the slot the stream holds.
    /// `send_timeout` is the upstream's `send_ms` now: a connection opened before it changed
    /// takes it (one system call then), as a reused HTTP/1.1 connection does.
    pub fn open_stream(
        self: &Rc<Self>,
        send_timeout: Duration,
    ) -> (SendRequest<Bytes>, StreamSlot) {
        // Not once closed: the driver task has dropped the socket, and the number may
        // name another one since.
        if !self.closed.get()
            && self.send_timeout.get() != send_timeout
            && crate::upstream::set_send_timeout(self.fd, send_timeout).is_ok()
        {
            self.send_timeout.set(send_timeout);
        }
        self.open.set(self.open.get() + 1);
        (self.send.clone(), StreamSlot(self.clone()))
    }

    /// Marks the connection unusable for new streams (a stream found it dead).
    pub fn mark_closed(&self) {
        self.closed.set(true);
    }
}

/// One open stream on a connection; the connection counts it until this drops.
#[derive(Debug)]
pub(crate) struct StreamSlot(Rc<H2Conn>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let c = &self.0;
        c.open.set(c.open.get() - 1);
        if c.open.get() == 0 {
            c.idle_since.set(Instant::now());
        }
    }
}

/// The largest response head an upstream may send, in HPACK's measure (each field's name,
/// value and 32 bytes, RFC 9113 6.5.2): room for the 64 KiB and 256 field lines an HTTP/1.1
/// upstream's head may have, whatever the clients' `[http2] max_header_list_size` (which
/// bounded it before: a lower one made good upstreams fail, a higher one let larger heads
/// through). The 64 KiB themselves are checked on the head as it came (see
/// `h2forward::head_bytes`).
const MAX_HEADER_LIST: u32 =
    (crate::upstream::UPSTREAM_BUF + common::snapshot::MAX_HEADER_COUNT * 32) as u32;

/// Starts HTTP/2 with prior knowledge on a connected socket (opened with `send_timeout` as
/// its TCP_USER_TIMEOUT) and spawns the task that drives the connection. `Err`: the
/// handshake failed (the peer closed, or wrote garbage).
pub(crate) async fn handshake(
    stream: crate::upstream::UpstreamIo,
    max_streams: u32,
    first_streams: u32,
    counted: Option<Counted>,
    send_timeout: Duration,
) -> Result<Rc<H2Conn>, h2::Error> {
    let fd = stream.as_raw_fd();
    let (r, w) = stream.into_halves();
    let io = crate::proxy::PollIo::new(r, w, &[]);
    let mut b = h2::client::Builder::new();
    // At most 2^31 - 1, the largest window HTTP/2 has (RFC 9113 6.9.1): fits in a u32.
    let connection_window = (u64::from(max_streams) * u64::from(STREAM_WINDOW))
        .clamp(u64::from(CONNECTION_WINDOW), (1 << 31) - 1) as u32;
    // Until the target's SETTINGS come, h2 would let any number of streams go out (the
    // peer's limit is unknown), and a burst past the target's SETTINGS_MAX_CONCURRENT_STREAMS
    // would be reset (grpc-core: ENHANCE_YOUR_CALM, not retried): at most `first_streams`
    // (what the target says on its other connections, see [`H2Pool::stream_limit`]); its
    // SETTINGS then say.
    b.initial_max_send_streams(first_streams.min(max_streams) as usize)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(connection_window)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_reset_streams(1024)
        .enable_push(false);
    let (send, conn) = b.handshake::<_, Bytes>(io).await?;
    let closed = Rc::new(Cell::new(false));
    let flag = closed.clone();
    monoio::spawn(async move {
        if let Err(e) = conn.await {
            log::debug!("upstream HTTP/2 connection ended: {e}");
        }
        flag.set(true);
    });
    Ok(Rc::new(H2Conn {
        send,
        open: Cell::new(0),
        closed,
        max_streams,
        idle_since: Cell::new(Instant::now()),
        _counted: counted,
        fd,
        send_timeout: Cell::new(send_timeout),
    }))
}

/// A connection being opened to a target for an upstream. Requests that find no room in
/// the pool meanwhile wait for it, up to its `max_streams`, instead of each opening one of
/// their own (a burst at start, after an idle time or after a GOAWAY opened as many
/// connections as requests, and a `circuit.max_connections` refused the rest).
#[derive(Debug)]
pub(crate) struct Connecting {
    /// Streams promised on it: its opener's and its waiters'.
    reserved: Cell<u32>,
    max_streams: u32,
    /// Once it is known: the connection, or why it could not be opened (`None`: its opener
    /// went away first, and each waiter looks at the pool again).
    outcome: RefCell<Option<Result<Rc<H2Conn>, Option<ErrorKind>>>>,
    waiters: RefCell<Vec<Waker>>,
}

impl Connecting {
    /// Waits for the outcome.
    pub async fn wait(&self) -> Result<Rc<H2Conn>, Option<ErrorKind>> {
        poll_fn(|cx| match &*self.outcome.borrow() {
            Some(outcome) => Poll::Ready(outcome.clone()),
            None => {
                let mut waiters = self.waiters.borrow_mut();
                if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    waiters.push(cx.waker().clone());
                }
                Poll::Pending
            }
        })
        .await
    }

    fn finish(&self, outcome: Result<Rc<H2Conn>, Option<ErrorKind>>) {
        *self.outcome.borrow_mut() = Some(outcome);
        for w in self.waiters.take() {
            w.wake();
        }
    }

    fn open_to_waiters(&self) -> bool {
        self.outcome.borrow().is_none() && self.reserved.get() < self.max_streams
    }
}

/// Held by the request opening a connection: says how it went to the requests waiting for
/// it, and that its opener went away if dropped before.
#[derive(Debug)]
pub(crate) struct Opening(Rc<Connecting>);

impl Opening {
    pub fn finish(self, outcome: Result<Rc<H2Conn>, ErrorKind>) {
        self.0.finish(outcome.map_err(Some));
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        if self.0.outcome.borrow().is_none() {
            self.0.finish(Err(None));
        }
    }
}

/// A worker's HTTP/2 upstream connections, per target and upstream, and those being opened.
#[derive(Debug, Default)]
pub(crate) struct H2Pool {
    conns: ByKey<Rc<H2Conn>>,
    opening: ByKey<Rc<Connecting>>,
}

impl H2Pool {
    /// A connection to `target` opened for `upstream` with room for one more stream, if
    /// there is one (`max_streams`: the upstream's now). `keep_idle`: one without streams may
    /// be used again (pooling is on, `upstream_pool.max_idle_per_target` above 0); otherwise
    /// it goes (and closes).
    pub fn take(
        &mut self,
        target: SocketAddr,
        upstream: &Arc<UpstreamLive>,
        max_streams: u32,
        keep_idle: bool,
    ) -> Option<Rc<H2Conn>> {
        let list = self.conns.get_mut(target, upstream)?;
        list.retain(|c| !c.closed.get() && (keep_idle || c.open.get() > 0));
        list.iter().find(|c| c.has_room(max_streams)).cloned()
    }

    /// The most streams a new connection to `target` for `upstream` should send before its
    /// SETTINGS come: the fewest its open connections allow (what the target's SETTINGS said
    /// on them), at most `max_streams`. Not remembered once they have all closed: a
    /// connection whose target's SETTINGS name no limit keeps the one it started with (h2
    /// keeps its initial value), so a remembered low limit could never be raised again.
    pub fn stream_limit(
        &self,
        target: SocketAddr,
        upstream: &Arc<UpstreamLive>,
        max_streams: u32,
    ) -> u32 {
        let open = self.conns.get(target, upstream).and_then(|list| {
            list.iter()
                .filter(|c| !c.closed.get())
                .map(|c| u32::try_from(c.send.current_max_send_streams()).unwrap_or(u32::MAX))
                .min()
        });
        open.unwrap_or(max_streams).clamp(1, max_streams.max(1))
    }

    /// Drops the connections to `target` for `upstream` that have ended (they hold a place in
    /// `circuit.max_connections` until then).
    pub fn prune(&mut self, target: SocketAddr, upstream: &Arc<UpstreamLive>) {
        if let Some(list) = self.conns.get_mut(target, upstream) {
            list.retain(|c| !c.closed.get());
        }
    }

    /// A connection being opened to `target` for `upstream` that can take one more stream,
    /// that stream promised on it.
    pub fn join(
        &mut self,
        target: SocketAddr,
        upstream: &Arc<UpstreamLive>,
    ) -> Option<Rc<Connecting>> {
        let list = self.opening.get_mut(target, upstream)?;
        list.retain(|c| c.outcome.borrow().is_none());
        let c = list.iter().find(|c| c.open_to_waiters())?.clone();
        c.reserved.set(c.reserved.get() + 1);
        Some(c)
    }

    /// Notes that this request opens a connection to `target` for `upstream` (carrying up to
    /// `max_streams`), for others to [`H2Pool::join`].
    pub fn open(
        &mut self,
        target: SocketAddr,
        upstream: &Arc<UpstreamLive>,
        max_streams: u32,
    ) -> Opening {
        let c = Rc::new(Connecting {
            reserved: Cell::new(1),
            max_streams,
            outcome: RefCell::new(None),
            waiters: RefCell::new(Vec::new()),
        });
        let list = self.opening.entry(target, upstream);
        list.retain(|c| c.outcome.borrow().is_none());
        list.push(c.clone());
        Opening(c)
    }

    /// Adds a new connection to `target` opened for `upstream`.
    pub fn add(&mut self, target: SocketAddr, upstream: &Arc<UpstreamLive>, conn: Rc<H2Conn>) {
        self.conns.entry(target, upstream).push(conn);
    }

    /// Drops connections that ended, and those without streams idle for `timeout` (dropping
    /// the last handle makes the driver send GOAWAY and close). More than one idle
    /// connection to a target of an upstream is not kept, nor any when `max_idle` (the
    /// HTTP/1.1 pool's `max_idle_per_target`) is 0.
    pub fn sweep(&mut self, now: Instant, timeout: Duration, max_idle: usize) {
        let keep = max_idle.min(1);
        for list in self.opening.lists_mut() {
            list.retain(|c| c.outcome.borrow().is_none());
        }
        self.opening.retain(|_, list| !list.is_empty());
        for list in self.conns.lists_mut() {
            list.retain(|c| !c.closed.get());
            let mut idle_kept = 0;
            list.retain(|c| {
                if c.open.get() > 0 {
                    return true;
                }
                idle_kept += 1;
                idle_kept <= keep && now.duration_since(c.idle_since.get()) < timeout
            });
        }
        self.conns.retain(|_, list| !list.is_empty());
    }

    /// Drops the connections of `upstream`, to any target, that have ended (they hold places
    /// in its `circuit.max_connections` until then).
    pub fn drop_closed(&mut self, upstream: &Arc<UpstreamLive>) {
        for list in self.conns.lists_of_mut(upstream) {
            list.retain(|c| !c.closed.get());
        }
        // An opening that has finished holds its connection for those that joined it.
        for list in self.opening.lists_of_mut(upstream) {
            list.retain(|c| c.outcome.borrow().is_none());
        }
    }

    /// Drops the connections `keep` says no to (as [`crate::upstream::Pool::retain`]);
    /// streams open on them finish.
    pub fn retain(&mut self, keep: impl Fn(&PoolKey) -> bool) {
        self.conns.retain(|key, _| keep(key));
        self.opening.retain(|key, _| keep(key));
    }

    /// Drops every connection (shutdown).
    pub fn clear(&mut self) {
        self.conns.clear();
        self.opening.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The connection's TCP_USER_TIMEOUT.
    fn send_timeout_of(conn: &H2Conn) -> Option<Duration> {
        // SAFETY: the connection's socket is open while its driver task holds it, which
        // it does until the test's runtime ends.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(conn.fd) };
        socket2::SockRef::from(&fd).tcp_user_timeout().unwrap()
    }

    #[test]
    fn a_stream_opened_after_send_ms_changed_gives_the_connection_the_new_one() {
        // A target that takes the connection and reads nothing: the client's side of the
        // handshake (preface and SETTINGS) is written without waiting for the server's.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(async move {
                let (one, later) = (Duration::from_secs(1), Duration::from_millis(2500));
                let conn = crate::upstream::connect(target, Duration::from_secs(5), one)
                    .await
                    .unwrap();
                let conn = Rc::new(handshake(conn.stream, 10, 10, None, one).await.unwrap());
                assert_eq!(send_timeout_of(&conn), Some(one));
                // The upstream's `send_ms` is 2.5 s by the next stream (changed at runtime).
                let (_send, slot) = conn.open_stream(later);
                assert_eq!(send_timeout_of(&conn), Some(later));
                drop(slot);
                let (_send, _slot) = conn.open_stream(later);
                assert_eq!(send_timeout_of(&conn), Some(later));
            });
        drop(held.join().unwrap());
    }
}
