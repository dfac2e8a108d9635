//! Upstream connections: connect with a deadline, and a per-worker keep-alive pool.
//!
//! Hot path for `take` / `put`. The pool is keyed by target address and upstream (its live
//! state, which the control plane keeps from one revision to the next), not by snapshot, so a
//! config change keeps the connections of targets that still exist. Upstreams that share a
//! target keep their connections apart, as nginx's `keepalive` per `upstream` block and
//! Envoy's pools per cluster do: each counts its own in its circuit's `max_connections`. Each
//! target of an upstream keeps at most `max_idle` idle connections (most recently used first
//! out); idle ones older than the idle timeout are closed on the next `take` and by the
//! worker's periodic sweep.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use common::live::UpstreamLive;
use common::router::Fnv;
use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;
use monoio::net::TcpStream;

/// Largest response head an upstream may send, and the read buffer's size before its
/// [`HEAD_ROOM`].
pub const UPSTREAM_BUF: usize = 64 * 1024;
/// Room for a response head on top of [`UPSTREAM_BUF`] in the read buffer: an answer whose
/// body is a multiple of 64 KiB (a 64 KiB file) then comes with its head in as many reads as
/// the body alone would take, not one more for the last few hundred bytes.
pub const HEAD_ROOM: usize = 4 * 1024;
/// Capacity of an upstream connection's read buffer.
pub const UPSTREAM_READ: usize = UPSTREAM_BUF + HEAD_ROOM;

/// An open connection to a target with its read buffer.
pub struct UpstreamConn {
    /// The read of the next answer submitted while the connection waits in the pool (see
    /// [`UpstreamConn::arm`]), holding the read buffer. Declared first, so dropped before
    /// `stream`: dropping it cancels the read.
    armed: ReadSlot,
    pub stream: UpstreamIo,
    pub buf: Vec<u8>,
    pub idle_since: Instant,
    /// Counted in its upstream's open connections (`circuit.max_connections`) while it lives.
    pub counted: Option<Counted>,
    /// The last answer on this connection had a body large enough to splice: for a client
    /// that takes a splice, the next answer's head is read with at most
    /// [`crate::splice::HEAD_READ`] bytes, so a large body stays in the socket.
    pub large_answers: bool,
    /// The last answer had no body because of what it answered (a HEAD, a 204, a 304):
    /// the answers where an upstream that sends a body anyway is a known bug. When such a
    /// connection is taken from the pool, a peek looks for bytes too, as the armed read may
    /// not have been submitted yet (see [`UpstreamConn::idle_and_open`]).
    pub peek_when_taken: bool,
    /// The deadline of its reads.
    timer: crate::io::ReadTimer,
    /// Its TCP_USER_TIMEOUT ([`set_send_timeout`]), kept to see when a reuse needs another.
    send_timeout: Duration,
    /// The client connection its current exchange is for, if that client is to be watched
    /// while reads wait (a whole HTTP/1.1 connection), and when to look at it next; cleared
    /// when the connection goes back to a pool.
    watch: Option<(crate::io::ClientWatch, Instant)>,
}

impl std::fmt::Debug for UpstreamConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConn")
            .field("armed", &self.armed.is_armed())
            .field("stream", &self.stream)
            .field("buf", &self.buf.len())
            .field("idle_since", &self.idle_since)
            .field("counted", &self.counted)
            .field("large_answers", &self.large_answers)
            .field("send_timeout", &self.send_timeout)
            .finish_non_exhaustive()
    }
}

/// An upstream connection's byte stream: TCP, or TLS over it (an upstream with `tls`).
#[derive(Debug)]
pub enum UpstreamIo {
    Tcp(TcpStream),
    Tls(crate::tls::TlsStream),
}

impl UpstreamIo {
    /// The TCP stream, when the bytes go over it as they are (what splicing and peeking at
    /// the socket need: through TLS, the socket holds records, not the answer's bytes).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            UpstreamIo::Tcp(s) => Some(s),
            UpstreamIo::Tls(_) => None,
        }
    }

    /// Whether the upstream's end of the stream, once a read gave `Ok(0)`, closes what came
    /// whole: a TCP FIN does, a TLS connection's only with close_notify (RFC 9112 9.8).
    pub fn ended_cleanly(&self) -> bool {
        match self {
            UpstreamIo::Tcp(_) => true,
            UpstreamIo::Tls(s) => !s.truncated(),
        }
    }

    /// Whether the upstream's end of the stream, once a read gave `Ok(0)`, will have come
    /// without close_notify, asked after the stream is split ([`UpstreamIo::ended_cleanly`]).
    pub fn truncation(&self) -> impl Fn() -> bool + use<> {
        let tls = match self {
            UpstreamIo::Tcp(_) => None,
            UpstreamIo::Tls(s) => Some(s.truncation()),
        };
        move || tls.as_ref().is_some_and(crate::tls::Truncation::get)
    }

    /// A read half and a write half that may run at once (a tunnel, an HTTP/2 connection).
    pub fn into_halves(self) -> (UpstreamRead, UpstreamWrite) {
        match self {
            UpstreamIo::Tcp(s) => {
                let (r, w) = monoio::io::Splitable::into_split(s);
                (UpstreamRead::Tcp(r), UpstreamWrite::Tcp(w))
            }
            UpstreamIo::Tls(s) => {
                let (r, w) = s.split();
                (UpstreamRead::Tls(r), UpstreamWrite::Tls(w))
            }
        }
    }
}

/// The read half of an [`UpstreamIo`].
#[derive(Debug)]
pub enum UpstreamRead {
    Tcp(monoio::io::OwnedReadHalf<TcpStream>),
    Tls(crate::tls::TlsReadHalf),
}

/// The write half of an [`UpstreamIo`].
#[derive(Debug)]
pub enum UpstreamWrite {
    Tcp(monoio::io::OwnedWriteHalf<TcpStream>),
    Tls(crate::tls::TlsWriteHalf),
}

impl AsyncReadRent for UpstreamRead {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        match self {
            UpstreamRead::Tcp(s) => s.read(buf).await,
            UpstreamRead::Tls(s) => s.read(buf).await,
        }
    }

    async fn readv<T: monoio::buf::IoVecBufMut>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        match self {
            UpstreamRead::Tcp(s) => s.readv(buf).await,
            UpstreamRead::Tls(s) => s.readv(buf).await,
        }
    }
}

impl monoio::io::AsyncWriteRent for UpstreamWrite {
    async fn write<T: monoio::buf::IoBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        match self {
            UpstreamWrite::Tcp(s) => s.write(buf).await,
            UpstreamWrite::Tls(s) => s.write(buf).await,
        }
    }

    async fn writev<T: monoio::buf::IoVecBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        match self {
            UpstreamWrite::Tcp(s) => s.writev(buf).await,
            UpstreamWrite::Tls(s) => s.writev(buf).await,
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            UpstreamWrite::Tcp(s) => s.flush().await,
            UpstreamWrite::Tls(s) => s.flush().await,
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            UpstreamWrite::Tcp(s) => s.shutdown().await,
            UpstreamWrite::Tls(s) => s.shutdown().await,
        }
    }
}

impl AsRawFd for UpstreamIo {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            UpstreamIo::Tcp(s) => s.as_raw_fd(),
            UpstreamIo::Tls(s) => s.as_raw_fd(),
        }
    }
}

impl AsyncReadRent for UpstreamIo {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        match self {
            UpstreamIo::Tcp(s) => s.read(buf).await,
            UpstreamIo::Tls(s) => s.read(buf).await,
        }
    }

    async fn readv<T: monoio::buf::IoVecBufMut>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        match self {
            UpstreamIo::Tcp(s) => s.readv(buf).await,
            UpstreamIo::Tls(s) => s.readv(buf).await,
        }
    }
}

impl monoio::io::AsyncWriteRent for UpstreamIo {
    async fn write<T: monoio::buf::IoBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        match self {
            UpstreamIo::Tcp(s) => s.write(buf).await,
            UpstreamIo::Tls(s) => s.write(buf).await,
        }
    }

    async fn writev<T: monoio::buf::IoVecBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        match self {
            UpstreamIo::Tcp(s) => s.writev(buf).await,
            UpstreamIo::Tls(s) => s.writev(buf).await,
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            UpstreamIo::Tcp(s) => s.flush().await,
            UpstreamIo::Tls(s) => s.flush().await,
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            UpstreamIo::Tcp(s) => s.shutdown().await,
            UpstreamIo::Tls(s) => s.shutdown().await,
        }
    }
}

/// One open connection in an upstream's circuit counters; dropped with the connection.
#[derive(Debug)]
pub struct Counted(std::sync::Arc<common::live::UpstreamLive>);

impl Counted {
    /// Counts one more connection whatever the number open: an upstream without circuit
    /// limits counts its connections too, so that a limit set later holds for them.
    pub fn one_more(live: &std::sync::Arc<common::live::UpstreamLive>) -> Counted {
        live.circuit
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Counted(live.clone())
    }

    /// Counts one more connection, unless `max` are open or being opened already: taken
    /// before the connect starts, so concurrent connects cannot all pass the check.
    pub fn within(live: &std::sync::Arc<common::live::UpstreamLive>, max: u32) -> Option<Counted> {
        use std::sync::atomic::Ordering::Relaxed;
        let open = &live.circuit.connections;
        if open.fetch_add(1, Relaxed) >= max {
            open.fetch_sub(1, Relaxed);
            return None;
        }
        Some(Counted(live.clone()))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0
            .circuit
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl UpstreamConn {
    /// How many bytes the read of the next answer's head may take: at most
    /// [`crate::splice::HEAD_READ`] when the client takes a splice and the last answer here
    /// was large (so that most of a large body stays in the socket to splice), else no bound.
    pub(crate) fn head_read(&self, client_splices: bool) -> usize {
        if client_splices && self.large_answers && self.stream.tcp().is_some() {
            crate::splice::HEAD_READ
        } else {
            usize::MAX
        }
    }

    /// Gives the connection `limit` as its send timeout ([`set_send_timeout`]) if it has
    /// another: the upstream's `send_ms` may have changed since it was opened. One system
    /// call where it differs, none otherwise.
    pub(crate) fn keep_send_timeout(&mut self, limit: Duration) {
        if self.send_timeout != limit && set_send_timeout(self.stream.as_raw_fd(), limit).is_ok() {
            self.send_timeout = limit;
        }
    }

    /// Swaps this connection's read timer with `timer`. A client connection lends it the
    /// timer its task keeps for upstream reads and takes it back at the end of the exchange:
    /// a timer stays with one task, which keeps it cheap to move on (see
    /// [`crate::io::ReadTimer`]). Correct either way: a timer left with the connection is
    /// replaced when another task first waits on it.
    pub(crate) fn lend_timer(&mut self, timer: &mut crate::io::ReadTimer) {
        std::mem::swap(&mut self.timer, timer);
    }

    /// Watches `client` while this connection's reads wait, from `since` (the request's
    /// start) on: the first look is [`crate::io::CLIENT_CHECK`] after it.
    pub(crate) fn watch(&mut self, client: Option<crate::io::ClientWatch>, since: Instant) {
        self.watch = client.map(|c| (c, since + crate::io::CLIENT_CHECK));
    }

    /// Reads more of the upstream's answer into `buf` (appending), failing at `deadline`.
    /// `Ok(0)`: the upstream closed.
    pub(crate) async fn read_more(
        &mut self,
        deadline: Instant,
    ) -> Result<usize, crate::io::ReadError> {
        self.read_at_most(usize::MAX, deadline).await
    }

    /// Like [`UpstreamConn::read_more`], reading at most `most` bytes (the first read after
    /// the pool takes whatever its armed read got, up to the buffer's size).
    pub(crate) async fn read_at_most(
        &mut self,
        most: usize,
        deadline: Instant,
    ) -> Result<usize, crate::io::ReadError> {
        if self.armed.is_armed() {
            let read = crate::io::finish_read(
                std::pin::Pin::new(&mut self.armed),
                &mut self.buf,
                deadline,
                &mut self.timer,
                self.watch.as_mut().map(|(client, next)| (*client, next)),
            )
            .await;
            // A read that did not end (a timeout, a client that left) is cancelled; the
            // caller closes the connection.
            self.armed.clear();
            return read;
        }
        let mut pos = 0;
        crate::io::read_at_most(
            &mut self.stream,
            &mut self.buf,
            &mut pos,
            UPSTREAM_BUF,
            most,
            deadline,
            &mut self.timer,
            self.watch.as_mut().map(|(client, next)| (*client, next)),
        )
        .await
    }

    /// Submits the read of the next answer into the (empty) buffer, as the connection goes
    /// into the pool: the pool then sees an upstream that closes the idle connection or
    /// sends bytes nobody asked for by that read ending, without a system call of its own
    /// (nginx keeps a read handler on its idle connections for the same reason), and the
    /// next exchange's first read is already waiting.
    fn arm(&mut self) {
        debug_assert!(
            !self.armed.is_armed(),
            "armed twice: the buffer is with the first read"
        );
        // Through TLS a read is several steps on the session, not one submitted receive:
        // such a connection waits unarmed, looked at with a peek when taken.
        let UpstreamIo::Tcp(stream) = &mut self.stream else {
            return;
        };
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let end = buf.capacity();
        let read = stream.read(buf.slice_mut(0..end));
        // SAFETY: monoio's `TcpStream::read` submits the receive when called, with its own
        // handle of the socket (`SharedFd`), and returns a future that owns that operation
        // and the buffer and never touches the stream again (monoio 0.2.4,
        // `net/tcp/stream.rs` and `driver/op/recv.rs`): its type borrows the stream only
        // because an `impl Future` of a trait method captures every lifetime in scope. So it
        // may outlive that borrow. Dropped, it cancels the receive; the socket stays open
        // until the receive has ended.
        unsafe { self.armed.put(read) };
    }

    /// Whether an idle connection is still open and has sent nothing unasked: its armed
    /// read is still waiting (the end of one is seen once the worker's event loop has
    /// reaped it), or, unarmed, a non-blocking peek finds nothing.
    ///
    /// The armed read sees bytes only once the event loop has submitted it and reaped its
    /// end: a connection put back and taken again within one turn of the loop (a burst of
    /// requests) is looked at by nothing else. After an answer that had no body because of
    /// what it answered, a peek also looks, so that a body sent anyway, already here, is
    /// not read as the next request's answer. One system call on those reuses only.
    fn idle_and_open(&mut self) -> bool {
        if !self.armed.is_armed() {
            return still_open(&self.stream);
        }
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        self.armed.poll_read(&mut cx).is_pending()
            && (!self.peek_when_taken || still_open(&self.stream))
    }

    /// Ends the armed read if it has read something (the start of an answer the upstream
    /// sent before taking the whole request), keeping that in `buf`; one still waiting stays
    /// armed, and the socket holds whatever has not reached it yet.
    pub(crate) fn settle(&mut self) {
        settle_into(&mut self.armed, &mut self.buf);
        if let UpstreamIo::Tls(s) = &self.stream {
            // Through TLS: what the target has sent so far, decrypted without waiting.
            s.read_ahead().pull(&mut self.buf);
        }
    }

    /// The stream to write an upload to, and the look for an early answer meanwhile (the
    /// armed read stays in place: it may take that answer, in order, before any peek).
    pub(crate) fn upload(&mut self) -> (&mut UpstreamIo, AnswerLook<'_>) {
        let ahead = match &self.stream {
            UpstreamIo::Tls(s) => Some(s.read_ahead()),
            UpstreamIo::Tcp(_) => None,
        };
        let look = AnswerLook {
            armed: &mut self.armed,
            buf: &mut self.buf,
            ahead,
        };
        (&mut self.stream, look)
    }

    pub(crate) fn new(stream: UpstreamIo, send_timeout: Duration) -> Self {
        UpstreamConn {
            send_timeout,
            armed: ReadSlot::default(),
            stream,
            buf: Vec::with_capacity(UPSTREAM_READ),
            idle_since: Instant::now(),
            counted: None,
            large_answers: false,
            peek_when_taken: false,
            timer: crate::io::ReadTimer::default(),
            watch: None,
        }
    }
}

/// Why a connection to a target could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect failed: {0}")]
    Io(#[from] io::Error),
    /// The TLS handshake failed (`TimedOut`: it did not end in time).
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
}

/// Whether a connect failed for want of a socket of the gateway's own (file descriptors,
/// memory), which says nothing of the target. Not `EADDRNOTAVAIL`: besides local ports run
/// out, it is what a target the host has no address to reach from gets (`[::1]` with IPv6
/// off), which must stay that target's failure.
pub fn no_socket(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Opens a connection with TCP_NODELAY, failing after `timeout`; bytes it sends that the
/// upstream leaves unacknowledged (or its window shut) for `send_timeout` make the
/// connection fail with `ETIMEDOUT`.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    send_timeout: Duration,
) -> Result<Box<UpstreamConn>, ConnectError> {
    let stream = monoio::time::timeout(timeout, TcpStream::connect_addr(addr))
        .await
        .map_err(|_| ConnectError::Timeout)??;
    stream.set_nodelay(true)?;
    // Where the option is unsupported the connection still works, just without the bound.
    let _ = set_send_timeout(stream.as_raw_fd(), send_timeout);
    Ok(Box::new(UpstreamConn::new(
        UpstreamIo::Tcp(stream),
        send_timeout,
    )))
}

/// Runs the TLS handshake on a new connection (`conn`, its TCP stream as `connect` opened
/// it) by `deadline`, sending and checking `name`.
pub async fn start_tls(
    conn: Box<UpstreamConn>,
    tls: &common::tls::UpstreamTls,
    name: rustls::pki_types::ServerName<'static>,
    deadline: Instant,
) -> Result<Box<UpstreamConn>, ConnectError> {
    let UpstreamConn {
        stream,
        send_timeout,
        counted,
        ..
    } = *conn;
    let UpstreamIo::Tcp(tcp) = stream else {
        return Err(ConnectError::Tls(io::ErrorKind::InvalidInput.into()));
    };
    let offered_h2 = tls.config.alpn_protocols.iter().any(|p| p == b"h2");
    let tls = crate::tls::connect(tcp, tls.config.clone(), name, deadline)
        .await
        .map_err(ConnectError::Tls)?;
    if offered_h2 && !tls.is_h2() {
        // A target that chose no protocol (no ALPN) may speak anything: HTTP/2 is only
        // spoken where it said so.
        let why = "the target did not choose h2 by ALPN";
        return Err(ConnectError::Tls(io::Error::new(
            io::ErrorKind::InvalidData,
            why,
        )));
    }
    let mut conn = Box::new(UpstreamConn::new(UpstreamIo::Tls(tls), send_timeout));
    conn.counted = counted;
    Ok(conn)
}

/// Sets TCP_USER_TIMEOUT: once sent bytes stay unacknowledged, or the peer's receive window
/// stays shut (zero-window probes unanswered by any opening), for `limit`, the kernel drops
/// the connection and pending and later I/O on it fails with `ETIMEDOUT`. Costs nothing per
/// request: no timer of the worker's is involved.
pub fn set_send_timeout(fd: std::os::fd::RawFd, limit: Duration) -> io::Result<()> {
    // SAFETY: `fd` is an open socket owned by the caller, which outlives this borrow.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&fd).set_tcp_user_timeout(Some(limit))
}

/// Whether a write failed because the peer left it unacknowledged past the send timeout.
pub fn is_send_timeout(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ETIMEDOUT)
}

/// Whether an idle connection is still open and has no unexpected bytes waiting.
/// Through TLS, records the session has not read yet (a session ticket) count as bytes
/// waiting: such a connection is closed rather than reused.
fn still_open(stream: &UpstreamIo) -> bool {
    crate::io::peek(stream.as_raw_fd()) == crate::io::Peeked::Nothing
}

/// Idle connections of one worker, per target and upstream.
#[derive(Debug)]
pub struct Pool {
    /// Boxed: a connection then moves between the pool and a request as one pointer, not
    /// as its whole state at each of the hand-overs of a request.
    idle: ByKey<Box<UpstreamConn>>,
    pub max_idle: usize,
    pub idle_timeout: Duration,
}

/// Which idle connections a request may take: those to its target opened for its upstream.
/// The upstream is its live state's address, which cannot be another upstream's while the
/// pool's entry holds that state ([`ByKey`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolKey {
    pub target: SocketAddr,
    upstream: usize,
}

/// Hashed per request (a take and a put): an IPv4 target and its upstream as one word, fewer
/// bytes for the byte-wise FNV than a derived hash of the address alone (its variant, the
/// address's length and bytes, the port). Equal keys hash equally; the map tells keys apart
/// by `Eq`.
impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        // The upstream's heap address (its low 4 bits zero) rotated, so that the bits in
        // which two upstreams differ mix with the target's.
        let upstream = (self.upstream as u64 >> 4).rotate_left(48);
        match self.target {
            SocketAddr::V4(a) => {
                let addr = (u64::from(a.ip().to_bits()) << 16) | u64::from(a.port());
                h.write_u64(addr ^ upstream);
            }
            SocketAddr::V6(a) => {
                h.write_u128(a.ip().to_bits());
                h.write_u64(u64::from(a.port()) ^ upstream);
            }
        }
    }
}

impl PoolKey {
    pub fn new(target: SocketAddr, upstream: &Arc<UpstreamLive>) -> PoolKey {
        PoolKey {
            target,
            upstream: Arc::as_ptr(upstream) as usize,
        }
    }
}

/// Pooled connections per [`PoolKey`], for this pool and the HTTP/2 one. Each entry holds
/// its upstream's state, which keeps the key's upstream address from being reused by
/// another upstream's while the entry is there.
#[derive(Debug)]
pub(crate) struct ByKey<T>(HashMap<PoolKey, (Arc<UpstreamLive>, Vec<T>), BuildHasherDefault<Fnv>>);

impl<T> Default for ByKey<T> {
    fn default() -> Self {
        ByKey(HashMap::default())
    }
}

impl<T> ByKey<T> {
    /// The connections to `target` opened for `upstream`, if any were kept.
    pub fn get(&self, target: SocketAddr, upstream: &Arc<UpstreamLive>) -> Option<&Vec<T>> {
        let (_, list) = self.0.get(&PoolKey::new(target, upstream))?;
        Some(list)
    }

    /// The connections to `target` opened for `upstream`, if any were kept.
    pub fn get_mut(
        &mut self,
        target: SocketAddr,
        upstream: &Arc<UpstreamLive>,
    ) -> Option<&mut Vec<T>> {
        let (_, list) = self.0.get_mut(&PoolKey::new(target, upstream))?;
        Some(list)
    }

    /// The connections to `target` opened for `upstream`, a new entry if need be.
    pub fn entry(&mut self, target: SocketAddr, upstream: &Arc<UpstreamLive>) -> &mut Vec<T> {
        let key = PoolKey::new(target, upstream);
        &mut self
            .0
            .entry(key)
            .or_insert_with(|| (upstream.clone(), Vec::new()))
            .1
    }

    /// Every entry's connections.
    pub fn lists_mut(&mut self) -> impl Iterator<Item = &mut Vec<T>> {
        self.0.values_mut().map(|(_, list)| list)
    }

    /// The connections opened for `upstream`, to each of its targets.
    pub fn lists_of_mut(
        &mut self,
        upstream: &Arc<UpstreamLive>,
    ) -> impl Iterator<Item = &mut Vec<T>> {
        let ours = Arc::as_ptr(upstream) as usize;
        (self.0.iter_mut())
            .filter(move |(key, _)| key.upstream == ours)
            .map(|(_, (_, list))| list)
    }

    /// Keeps the entries `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&PoolKey, &Vec<T>) -> bool) {
        self.0.retain(|key, (_, list)| keep(key, list));
    }

    /// Connections kept, over all entries.
    pub fn count(&self) -> usize {
        self.0.values().map(|(_, list)| list.len()).sum()
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Pool {
            idle: ByKey::default(),
            max_idle,
            idle_timeout,
        }
    }

    /// The most recently returned live connection to `addr` opened for `upstream`, if any,
    /// checked first by its armed read ([`UpstreamConn::arm`]): one the upstream closed
    /// while it sat in the pool (its keep-alive timeout) is not used, nor one it sent bytes
    /// on that nobody asked for (a second answer, a body after a HEAD answer): read as the
    /// next request's answer, they would give one client another's response, and every
    /// later client on the connection the one before theirs. nginx and HAProxy watch idle
    /// connections for the same reason. The non-blocking peek that checked them before cost
    /// a system call per reuse, 3 to 4% of the requests per CPU-second at small answers
    /// (`docs/perf/pool-peek-ab-2cpu.csv`, `docs/perf/armed-read-ab-2cpu-20261206.md`).
    pub fn take(
        &mut self,
        addr: SocketAddr,
        upstream: &Arc<UpstreamLive>,
        now: Instant,
    ) -> Option<Box<UpstreamConn>> {
        let list = self.idle.get_mut(addr, upstream)?;
        while let Some(mut conn) = list.pop() {
            let idle = now.duration_since(conn.idle_since);
            if idle < self.idle_timeout && conn.idle_and_open() {
                return Some(conn);
            }
        }
        None
    }

    /// Returns a connection to `addr` opened for `upstream` whose last response was fully
    /// read, its next read armed ([`UpstreamConn::arm`]); dropped when the pool is full.
    pub fn put(
        &mut self,
        addr: SocketAddr,
        upstream: &Arc<UpstreamLive>,
        mut conn: Box<UpstreamConn>,
        now: Instant,
    ) {
        if self.max_idle == 0 || !conn.buf.is_empty() {
            return;
        }
        if let UpstreamIo::Tls(s) = &conn.stream {
            if !s.drained() {
                return;
            }
        }
        let list = self.idle.entry(addr, upstream);
        if list.len() < self.max_idle {
            conn.idle_since = now;
            conn.watch = None;
            conn.arm();
            list.push(conn);
        }
    }

    /// Closes connections idle for longer than the idle timeout, and those the upstream
    /// closed (or sent bytes on) meanwhile: they would hold places in the upstream's
    /// `circuit.max_connections` until a request to their target found them. Past
    /// `max_idle` (lowered at runtime, to 0 to turn pooling off) the least recently used go
    /// too: before, they stayed, and were reused, until their idle timeout.
    pub fn sweep(&mut self, now: Instant) {
        let timeout = self.idle_timeout;
        let most = self.max_idle;
        for list in self.idle.lists_mut() {
            list.retain_mut(|c| now.duration_since(c.idle_since) < timeout && c.idle_and_open());
            // The most recently used are at the end.
            let over = list.len().saturating_sub(most);
            list.drain(..over);
        }
    }

    /// Closes the idle connections of `upstream` that its targets closed meanwhile.
    pub fn drop_closed(&mut self, upstream: &Arc<UpstreamLive>) {
        for list in self.idle.lists_of_mut(upstream) {
            list.retain_mut(|c| c.idle_and_open());
        }
    }

    /// Closes the idle connections `keep` says no to: to targets an upstream no longer has
    /// or drains, and those of upstreams that were removed (their state is let go).
    pub(crate) fn retain(&mut self, keep: impl Fn(&PoolKey) -> bool) {
        self.idle.retain(|key, _| keep(key));
    }

    /// Closes every idle connection (shutdown).
    pub fn clear(&mut self) {
        self.idle.clear();
    }

    /// Idle connections held, over all targets.
    pub fn idle_count(&self) -> usize {
        self.idle.count()
    }
}

/// What an upload's look for an early answer reads first, on a connection whose armed
/// read may hold the start of it.
pub(crate) struct AnswerLook<'a> {
    armed: &'a mut ReadSlot,
    buf: &'a mut Vec<u8>,
    /// Through TLS, the session to decrypt ahead from.
    ahead: Option<crate::tls::ReadAhead>,
}

impl AnswerLook<'_> {
    /// What the upstream sent that was read already (kept in the connection's buffer, for
    /// the answer's read): the armed read's bytes once it has ended, or through TLS what
    /// it has sent so far, decrypted without waiting.
    pub(crate) fn read_so_far(&mut self) -> &[u8] {
        settle_into(self.armed, self.buf);
        if let Some(ahead) = &self.ahead {
            ahead.pull(self.buf);
        }
        self.buf
    }

    /// Whether the socket's bytes are the answer's own (not TLS records): a peek at them
    /// means something.
    pub(crate) fn plain(&self) -> bool {
        self.ahead.is_none()
    }
}

/// Moves what an ended armed read took into `buf` (appended to nothing: the read had the
/// buffer); a read still waiting stays armed.
fn settle_into(armed: &mut ReadSlot, buf: &mut Vec<u8>) {
    if !armed.is_armed() {
        return;
    }
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if let Poll::Ready((_, slice)) = armed.poll_read(&mut cx) {
        *buf = slice.into_inner();
    }
}

/// Room for one armed read ([`UpstreamConn::arm`]): the future monoio's read returns, of a
/// type that cannot be named, kept without a heap allocation per read (the request path
/// allocates nothing). The room is allocated once, with the connection.
struct ReadSlot {
    room: Box<std::mem::MaybeUninit<[u64; SLOT_WORDS]>>,
    /// How to poll and drop the future in `room`, while one is there.
    live: Option<(PollRead, DropRead)>,
    /// Neither Send nor Sync, as the futures it keeps (monoio's are bound to the thread).
    _local: std::marker::PhantomData<*mut ()>,
}

/// Words of room in a [`ReadSlot`]; a future that does not fit fails to compile.
const SLOT_WORDS: usize = 32;

type PollRead = unsafe fn(*mut u8, &mut std::task::Context<'_>) -> Poll<crate::io::ReadOutcome>;
type DropRead = unsafe fn(*mut u8);

impl Default for ReadSlot {
    fn default() -> Self {
        ReadSlot {
            room: Box::new(std::mem::MaybeUninit::uninit()),
            live: None,
            _local: std::marker::PhantomData,
        }
    }
}

impl ReadSlot {
    fn is_armed(&self) -> bool {
        self.live.is_some()
    }

    /// Keeps `read` (dropping one kept before).
    ///
    /// # Safety
    /// `read` may borrow nothing that can go away before it is polled to its end or dropped.
    unsafe fn put<F: std::future::Future<Output = crate::io::ReadOutcome>>(&mut self, read: F) {
        const {
            assert!(std::mem::size_of::<F>() <= SLOT_WORDS * 8);
            assert!(std::mem::align_of::<F>() <= 8);
        }
        self.clear();
        // SAFETY: the room is large and aligned enough for `F` (checked above) and holds no
        // live value (cleared); it is in its own allocation, so `F` does not move until it is
        // dropped in place (pinned).
        unsafe { self.room.as_mut_ptr().cast::<F>().write(read) };
        self.live = Some((poll_in_place::<F>, drop_in_place::<F>));
    }

    /// Polls the kept read; once it has ended, the room is empty again. Only while one is
    /// kept ([`ReadSlot::is_armed`]).
    fn poll_read(&mut self, cx: &mut std::task::Context<'_>) -> Poll<crate::io::ReadOutcome> {
        let Some((poll, _)) = self.live else {
            unreachable!("a read slot polled with no read in it");
        };
        // SAFETY: `live` says the room holds the future `poll` was made for.
        let out = unsafe { poll(self.room.as_mut_ptr().cast(), cx) };
        if out.is_ready() {
            self.clear();
        }
        out
    }

    /// Drops the kept read, if any (cancelling it if it has not ended).
    fn clear(&mut self) {
        if let Some((_, drop)) = self.live.take() {
            // SAFETY: the room holds the future `drop` was made for, dropped once (`live`
            // is taken).
            unsafe { drop(self.room.as_mut_ptr().cast()) };
        }
    }
}

impl std::future::Future for ReadSlot {
    type Output = crate::io::ReadOutcome;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        self.get_mut().poll_read(cx)
    }
}

impl Drop for ReadSlot {
    fn drop(&mut self) {
        self.clear();
    }
}

/// # Safety
/// `at` points at a live `F` that never moves.
unsafe fn poll_in_place<F: std::future::Future>(
    at: *mut u8,
    cx: &mut std::task::Context<'_>,
) -> Poll<F::Output> {
    // SAFETY: the caller's contract.
    unsafe { std::pin::Pin::new_unchecked(&mut *at.cast::<F>()) }.poll(cx)
}

/// # Safety
/// `at` points at a live `F`, not used again.
unsafe fn drop_in_place<F>(at: *mut u8) {
    // SAFETY: the caller's contract.
    unsafe { at.cast::<F>().drop_in_place() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::live::TargetSet;

    #[test]
    fn upstreams_with_one_target_keep_their_idle_connections_apart() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let (a, b) = (
                UpstreamLive::new(TargetSet::new(Vec::new())),
                UpstreamLive::new(TargetSet::new(Vec::new())),
            );
            let second = Duration::from_secs(1);
            let mut pool = Pool::new(4, Duration::from_secs(60));
            let now = Instant::now();
            let mut accepted = Vec::new();
            for _ in 0..2 {
                let conn = connect(addr, second, second).await.unwrap();
                accepted.push(listener.accept().unwrap());
                pool.put(addr, &a, conn, now);
            }
            assert!(pool.take(addr, &b, now).is_none(), "b took a's connection");
            assert!(pool.take(addr, &a, now).is_some(), "a's connection, to a");
            assert_eq!(pool.idle_count(), 1);
            // A change that keeps the target in `b` only closes `a`'s connection to it.
            let kept = PoolKey::new(addr, &b);
            pool.retain(|key| *key == kept);
            assert_eq!(pool.idle_count(), 0);
        });
    }

    /// A body an upstream sent after a HEAD's answer, already in the socket when the
    /// connection is taken again in the same turn of the event loop (its armed read not
    /// submitted yet), keeps the connection from being reused; after other answers, and with
    /// nothing in the socket, the pool gives the connection back without a peek's cost.
    #[test]
    fn bytes_after_a_bodiless_answer_are_seen_when_the_connection_is_taken_at_once() {
        use std::io::Write;
        for uring in [true, false] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            crate::io::block_on_driver(uring, async {
                let live = UpstreamLive::new(TargetSet::new(Vec::new()));
                let second = Duration::from_secs(1);
                let mut pool = Pool::new(4, Duration::from_secs(60));
                let now = Instant::now();
                for (after_head, late) in [(true, true), (true, false), (false, false)] {
                    let mut conn = connect(addr, second, second).await.unwrap();
                    let (mut peer, _) = listener.accept().unwrap();
                    conn.peek_when_taken = after_head;
                    pool.put(addr, &live, conn, now);
                    if late {
                        peer.write_all(b"<html>a body sent anyway").unwrap();
                        // Loopback: the bytes are in the gateway's socket once the write
                        // returns; wait only until they show, with no await in between.
                        let fd = pool.idle.get_mut(addr, &live).unwrap()[0]
                            .stream
                            .as_raw_fd();
                        let until = std::time::Instant::now() + second;
                        while crate::io::peek(fd) == crate::io::Peeked::Nothing {
                            assert!(std::time::Instant::now() < until, "the bytes never came");
                            std::hint::spin_loop();
                        }
                    }
                    let taken = pool.take(addr, &live, now);
                    assert_eq!(
                        taken.is_some(),
                        !late,
                        "uring {uring}, after a HEAD {after_head}, bytes waiting {late}"
                    );
                    drop(taken);
                    assert_eq!(pool.idle_count(), 0);
                }
            });
        }
    }
}
