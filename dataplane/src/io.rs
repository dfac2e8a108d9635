//! Reading into a connection's growable buffer with a deadline: the one read loop the client
//! side and the upstream side share.
//!
//! Hot path. A read that times out is never retried on the same connection: with io_uring the
//! cancelled read may already have consumed bytes, so the caller closes the connection. Each
//! connection side reads with one [`ReadTimer`], registered once and moved forward read after
//! read, instead of a timer per read.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, RawWakerVTable};
use std::time::Instant;

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, CancelableAsyncReadRent, Canceller};
use monoio::time::Sleep;

use crate::upstream::is_send_timeout;

/// Why reading from a socket stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadError {
    Timeout,
    Io,
    /// The peer left bytes the gateway sent unacknowledged past its send timeout
    /// (`ETIMEDOUT` from TCP_USER_TIMEOUT); the connection is gone.
    Stalled,
    /// The client the read was for left while it waited (see [`ClientWatch`]).
    ClientLeft,
}

/// How often a read for a client (an upstream's answer) that is still waiting looks whether
/// that client is still there.
pub(crate) const CLIENT_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// A client connection that an upstream read is for: while the read waits, the client is
/// looked at every [`CLIENT_CHECK`], and one that closed or reset its connection ends the
/// wait (logged as 499; the upstream connection closes), as nginx does by default
/// (`proxy_ignore_client_abort off`). Without it a client that gave up on a slow answer
/// (a long poll, a slow report) would keep its upstream request, connection and
/// `circuit.max_requests` slot until the upstream answered or timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientWatch {
    pub fd: std::os::fd::RawFd,
    /// Whether the client's bytes are TLS records: whatever waits unread may be its
    /// close_notify, so the TCP state tells (the client's FIN received) rather than a peek.
    pub tls: bool,
}

impl ClientWatch {
    /// Whether the client has closed its end or reset the connection. A plain connection
    /// with bytes waiting (a pipelined request) before its FIN is still there: its FIN may
    /// be a half-close after sending everything.
    pub fn gone(self) -> bool {
        if self.tls {
            peer_closed(self.fd)
        } else {
            peek(self.fd) == Peeked::Closed
        }
    }
}

/// Whether `watch`'s client has gone, looked at each time `look` comes round (a timer set
/// [`CLIENT_CHECK`] ahead, moved on at each look): for a wait that no read of that client's
/// does itself (an upstream read watches through [`read_at_most`]).
pub(crate) fn poll_gone(
    watch: ClientWatch,
    mut look: Pin<&mut Sleep>,
    cx: &mut Context<'_>,
) -> bool {
    while look.as_mut().poll(cx).is_ready() {
        if watch.gone() {
            return true;
        }
        look.as_mut().reset((Instant::now() + CLIENT_CHECK).into());
    }
    false
}

/// Whether the peer of TCP socket `fd` has closed its end (its FIN is in: `CLOSE_WAIT`) or
/// reset the connection (`CLOSE`), whatever bytes still wait unread.
pub(crate) fn peer_closed(fd: std::os::fd::RawFd) -> bool {
    // Linux's TCP states (include/net/tcp_states.h), which the libc crate does not name.
    const TCP_CLOSE: u8 = 7;
    const TCP_CLOSE_WAIT: u8 = 8;
    tcp_info(fd).is_some_and(|(info, _)| matches!(info.tcpi_state, TCP_CLOSE | TCP_CLOSE_WAIT))
}

/// A connection side's read deadline: one timer for all its reads, made at the first.
///
/// A timer per read (`timeout_at`) enters the runtime's timer wheel when the read waits and
/// leaves it when the read completes: two updates of the wheel's lists per read, each
/// writing the neighbouring entries (other connections' timers, cold in the cache). This one
/// stays registered: a later deadline only moves its expiry forward (no wheel update), and
/// when the earlier one comes round the wheel re-files the entry once. A client connection's
/// reads thus touch the wheel about once per timeout period instead of twice per read.
///
/// monoio's timer keeps the first waker that polled it, so a timer polled from another task
/// (an upstream connection taken from the pool by another client connection) is replaced in
/// place by a new one: as costly as a timer per read, never a missed deadline. Boxed, so that
/// it stays put while registered whatever moves the connection.
///
/// A read that completes leaves the timer registered until its deadline or the next arming
/// (that is the saving). Meanwhile it holds the waker of the task that waited, and with it
/// that task's allocation. A client connection's timers go when it closes or parks; an
/// upstream connection last used with its own timer (by an HTTP/2 stream or an aggregate's
/// step, which lend none) keeps at most one finished task alive from the pool, until the
/// connection's next use or its response-head deadline.
#[derive(Default)]
pub(crate) struct ReadTimer {
    sleep: Option<Pin<Box<Sleep>>>,
    /// The waker the timer holds (its data and vtable pointers, only compared).
    owner: (*const (), *const RawWakerVTable),
    /// The deadline `arm` set, applied at the next poll.
    armed: Option<Instant>,
}

impl std::fmt::Debug for ReadTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ReadTimer")
            .field(&self.sleep.as_ref().map(|s| s.deadline()))
            .finish()
    }
}

impl ReadTimer {
    /// Sets the deadline of the next wait (taking effect at the next poll).
    pub fn arm(&mut self, deadline: Instant) {
        self.armed = Some(deadline);
    }

    /// Whether the armed deadline has passed; otherwise the task is woken when it does.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let waker = cx.waker();
        let owner = (waker.data(), std::ptr::from_ref(waker.vtable()));
        if let Some(deadline) = self.armed.take() {
            let deadline = deadline.into();
            match &mut self.sleep {
                Some(sleep) if self.owner == owner => sleep.as_mut().reset(deadline),
                // Dropping the old timer takes it out of the wheel with its waker.
                Some(sleep) => sleep.set(monoio::time::sleep_until(deadline)),
                None => self.sleep = Some(Box::pin(monoio::time::sleep_until(deadline))),
            }
            self.owner = owner;
        }
        self.sleep
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
    }
}

/// Reads more bytes into `buf` (after compacting consumed ones), up to `max` buffered,
/// failing at `deadline` (kept by `timer`). `Ok(0)`: end of stream.
pub(crate) async fn read_more<R: AsyncReadRent>(
    stream: &mut R,
    buf: &mut Vec<u8>,
    pos: &mut usize,
    max: usize,
    deadline: Instant,
    timer: &mut ReadTimer,
) -> Result<usize, ReadError> {
    read_at_most(stream, buf, pos, max, usize::MAX, deadline, timer, None).await
}

/// Like [`read_more`], reading at most `most` bytes. With a `watch` (a client and when to
/// look at it next), failing with [`ReadError::ClientLeft`] once that client is gone; the
/// next look is moved on as it is taken.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn read_at_most<R: AsyncReadRent>(
    stream: &mut R,
    buf: &mut Vec<u8>,
    pos: &mut usize,
    max: usize,
    most: usize,
    deadline: Instant,
    timer: &mut ReadTimer,
    watch: Option<(ClientWatch, &mut Instant)>,
) -> Result<usize, ReadError> {
    let (len, end) = make_room(buf, pos, max, most)?;
    let owned = std::mem::take(buf);
    let read = std::pin::pin!(stream.read(owned.slice_mut(len..end)));
    finish_read(read, buf, deadline, timer, watch).await
}

/// Like [`read_more`], for a reader whose reads can be cancelled: at the deadline the read
/// is cancelled and `buf` taken back with what it held (a head that timed out is still
/// logged with its bytes and request line). Only for a stream that is the whole connection.
pub(crate) async fn read_more_keeping<R: CancelableAsyncReadRent>(
    stream: &mut R,
    buf: &mut Vec<u8>,
    pos: &mut usize,
    max: usize,
    deadline: Instant,
    timer: &mut ReadTimer,
    canceller: &mut Canceller,
) -> Result<usize, ReadError> {
    let (len, end) = make_room(buf, pos, max, usize::MAX)?;
    let owned = std::mem::take(buf);
    let read = stream.cancelable_read(owned.slice_mut(len..end), canceller.handle());
    let mut read = std::pin::pin!(read);
    match finish_read(read.as_mut(), buf, deadline, timer, None).await {
        Err(ReadError::Timeout) => {
            *canceller = std::mem::take(canceller).cancel();
            let (_, slice) = read.await;
            *buf = slice.into_inner();
            Err(ReadError::Timeout)
        }
        done => done,
    }
}

/// Makes room in `buf` for a read of at most `most` bytes (compacting consumed ones, then
/// growing by doubling up to `max` buffered): where the read goes, `len..end`.
fn make_room(
    buf: &mut Vec<u8>,
    pos: &mut usize,
    max: usize,
    most: usize,
) -> Result<(usize, usize), ReadError> {
    if *pos == buf.len() {
        buf.clear();
        *pos = 0;
    } else if *pos > 0 && buf.len() == buf.capacity() {
        buf.copy_within(*pos.., 0);
        buf.truncate(buf.len() - *pos);
        *pos = 0;
    }
    if buf.len() == buf.capacity() {
        if buf.len() >= max {
            return Err(ReadError::Io);
        }
        // Grow by doubling, up to `max`.
        buf.reserve_exact(buf.capacity().max(1024).min(max - buf.len()));
    }
    let len = buf.len();
    Ok((len, buf.capacity().min(len.saturating_add(most))))
}

/// What a read submitted for a buffer's spare room gives back.
pub(crate) type ReadOutcome = monoio::BufResult<usize, monoio::buf::SliceMut<Vec<u8>>>;

/// Waits for `read` (of a buffer taken from `buf`, which it puts back) until `deadline`,
/// watching a client as [`read_at_most`] says.
pub(crate) async fn finish_read<F: Future<Output = ReadOutcome> + ?Sized>(
    mut read: Pin<&mut F>,
    buf: &mut Vec<u8>,
    deadline: Instant,
    timer: &mut ReadTimer,
    mut watch: Option<(ClientWatch, &mut Instant)>,
) -> Result<usize, ReadError> {
    // With a client to watch the timer wakes the task at its next look, then every
    // CLIENT_CHECK, until `deadline`. A look already due fires at once; the next is then set
    // from the clock read for it, so no read pays for a clock reading of its own, and the
    // timer keeps moving forward (see `ReadTimer`).
    timer.arm(match &watch {
        Some((_, next)) => deadline.min(**next),
        None => deadline,
    });
    let done = std::future::poll_fn(|cx| {
        if let Poll::Ready(done) = read.as_mut().poll(cx) {
            return Poll::Ready(Ok(done));
        }
        while timer.poll_expired(cx) {
            let now = Instant::now();
            let Some((client, next)) = watch.as_mut().filter(|_| now < deadline) else {
                // A client that left since its last look (up to CLIENT_CHECK ago) is what
                // ended the wait for it: its 499, not a timeout charged to the upstream.
                if watch.as_ref().is_some_and(|(client, _)| client.gone()) {
                    return Poll::Ready(Err(ReadError::ClientLeft));
                }
                return Poll::Ready(Err(ReadError::Timeout));
            };
            if client.gone() {
                return Poll::Ready(Err(ReadError::ClientLeft));
            }
            **next = now + CLIENT_CHECK;
            timer.arm(deadline.min(**next));
        }
        Poll::Pending
    })
    .await;
    match done {
        Ok((res, slice)) => {
            *buf = slice.into_inner();
            res.map_err(|e| {
                if is_send_timeout(&e) {
                    ReadError::Stalled
                } else {
                    ReadError::Io
                }
            })
        }
        // The buffer went with the cancelled read; the caller closes this connection.
        Err(e) => Err(e),
    }
}

/// Writes all of `buf[range]` from an owned buffer, lending it to the kernel and putting it
/// back whatever the outcome.
pub(crate) async fn write_range<W: monoio::io::AsyncWriteRent>(
    stream: &mut W,
    buf: &mut Vec<u8>,
    range: std::ops::Range<usize>,
) -> std::io::Result<()> {
    let owned = std::mem::take(buf);
    let (res, slice) = monoio::io::AsyncWriteRentExt::write_all(stream, owned.slice(range)).await;
    *buf = slice.into_inner();
    res.map(|_| ())
}

/// What a non-blocking peek at a socket saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peeked {
    /// Nothing to read yet: the peer is there and quiet.
    Nothing,
    /// Bytes are waiting.
    Data,
    /// The peer closed (FIN) or reset the connection.
    Closed,
}

/// Peeks at one byte of `fd` without consuming it or waiting (one `recv` with `MSG_PEEK`).
pub(crate) fn peek(fd: std::os::fd::RawFd) -> Peeked {
    peek_into(fd, &mut [0u8; 1]).0
}

/// Peeks at up to `buf.len()` bytes of `fd` without consuming them or waiting: what it saw,
/// and how many bytes it copied into `buf`.
pub(crate) fn peek_into(fd: std::os::fd::RawFd, buf: &mut [u8]) -> (Peeked, usize) {
    // SAFETY: the caller's socket `fd` is open for the duration of the call; recv writes at
    // most `buf.len()` bytes into `buf`.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => (Peeked::Closed, 0),
        n if n > 0 => (Peeked::Data, n as usize),
        _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock => {
            (Peeked::Nothing, 0)
        }
        _ => (Peeked::Closed, 0),
    }
}

/// The bytes of `fd`'s TCP connection its peer has acknowledged (`TCP_INFO`); `None` if
/// the kernel does not say.
pub(crate) fn bytes_acked(fd: std::os::fd::RawFd) -> Option<u64> {
    // A kernel too old to fill the field gives a shorter struct.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
    tcp_info(fd)
        .filter(|(_, len)| *len >= needed)
        .map(|(info, _)| info.tcpi_bytes_acked)
}

/// `fd`'s `TCP_INFO` and how many bytes of it the kernel filled; `None` if it failed.
fn tcp_info(fd: std::os::fd::RawFd) -> Option<(libc::tcp_info, usize)> {
    // SAFETY: an all-zero `tcp_info` is valid (plain integers).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large; the
    // caller's socket is open for the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((info, len as usize))
}

/// Aborts the TCP connection of `fd` at once (RFC 9293 3.10.5, ABORT): a reset goes to the
/// peer, unsent data is dropped, and pending reads and writes end with `ECONNRESET`; the fd
/// stays open (`connect` to `AF_UNSPEC` disconnects a socket). What a close with SO_LINGER 0
/// does, for a connection whose fd cannot be closed yet, nor shut down (a FIN would go
/// before the reset).
pub(crate) fn abort_connection(fd: std::os::fd::RawFd) {
    // SAFETY: an all-zero sockaddr is valid; only its family (AF_UNSPEC) is read.
    let mut addr: libc::sockaddr = unsafe { std::mem::zeroed() };
    addr.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    // SAFETY: `addr` lives across the call, which reads that many bytes of it; the caller's
    // socket is open.
    unsafe {
        libc::connect(
            fd,
            &addr,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        );
    }
}

/// Makes closing `fd` reset the connection (SO_LINGER on, 0 s) instead of ending it with a
/// FIN; what it still queues to send is dropped.
pub(crate) fn reset_when_closed(fd: std::os::fd::RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `linger`, which is that large, for the call; the caller's
    // socket is open.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Bytes a TCP socket holds that the peer has not acknowledged yet (sent or not), or `None`
/// if the kernel does not say.
pub(crate) fn send_queued(fd: std::os::fd::RawFd) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int; the caller's socket is open for the call.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    (rc == 0).then(|| usize::try_from(n).unwrap_or(0))
}

/// Runs `fut` to completion on a new runtime of the gateway's io_uring driver (`uring`) or
/// of its epoll fallback, for tests that must hold under both.
#[cfg(test)]
pub(crate) fn block_on_driver<F: std::future::Future>(uring: bool, fut: F) -> F::Output {
    if uring {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .expect("io_uring runtime (the gateway's own driver)")
            .block_on(fut)
    } else {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("epoll runtime")
            .block_on(fut)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// How long `timer`'s armed deadline took to wake the task; the wait gives up at 1 s (a
    /// deadline that woke no one then looks like a 1 s wait, since the give-up's own wake-up
    /// finds the timer expired).
    async fn expiry(timer: &mut ReadTimer) -> Duration {
        let start = Instant::now();
        let expired = std::future::poll_fn(|cx| match timer.poll_expired(cx) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        });
        let _ = monoio::time::timeout(Duration::from_secs(1), expired).await;
        start.elapsed()
    }

    /// Whether `waited` is the wake-up of a deadline `after` the arming, not the give-up's.
    fn on_time(waited: Duration, after: Duration) -> bool {
        waited >= after && waited < Duration::from_millis(900)
    }

    #[test]
    fn a_later_deadline_moves_the_expiry_on() {
        for uring in [true, false] {
            block_on_driver(uring, async {
                let mut timer = ReadTimer::default();
                timer.arm(Instant::now() + Duration::from_millis(20));
                // Registered, as a read that completed before its deadline leaves it.
                std::future::poll_fn(|cx| Poll::Ready(timer.poll_expired(cx))).await;
                timer.arm(Instant::now() + Duration::from_millis(80));
                let waited = expiry(&mut timer).await;
                assert!(
                    on_time(waited, Duration::from_millis(80)),
                    "woken after {waited:?}"
                );
            });
        }
    }

    #[test]
    fn a_timer_another_task_waited_on_wakes_the_next_task() {
        // An upstream connection's timer, last polled by another client connection's task:
        // monoio's timer keeps the first waker it was given, so without its replacement the
        // deadline would wake the other task and this one would wait for ever.
        for uring in [true, false] {
            block_on_driver(uring, async {
                let mut timer = monoio::spawn(async {
                    let mut timer = ReadTimer::default();
                    timer.arm(Instant::now() + Duration::from_millis(20));
                    std::future::poll_fn(|cx| Poll::Ready(timer.poll_expired(cx))).await;
                    timer
                })
                .await;
                timer.arm(Instant::now() + Duration::from_millis(60));
                let waited = expiry(&mut timer).await;
                assert!(
                    on_time(waited, Duration::from_millis(60)),
                    "woken after {waited:?}"
                );
            });
        }
    }
}
