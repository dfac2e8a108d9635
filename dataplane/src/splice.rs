//! Large response bodies relayed socket to socket through a pipe (`splice(2)`): the kernel
//! moves page references from the upstream socket's receive queue into a pipe and from the
//! pipe into the client socket's send queue, so no body byte is copied into or out of user
//! space. Used, when `[relay] splice` is on (it is off by default: copying measured cheaper on
//! most machines, `docs/perf/splice-2cpu.md`), for a length-framed body with at least
//! [`SPLICE_MIN`] bytes still to come, from a TCP upstream to a plain TCP client (not TLS, not
//! HTTP/2, not a body the gateway reads or rewrites).
//!
//! The splices are direct non-blocking system calls on the worker thread: io_uring's splice
//! cannot try a socket without blocking, so it would run every one in the ring's worker
//! threads. Waiting is io_uring poll operations (`readable`, `writable`). Both sockets are
//! switched to `O_NONBLOCK` for the relay and back after it, so the ring's own operations on
//! them always see the flags they were opened with.
//!
//! Each worker keeps up to [`MAX_PIPES`] pipes, created on first use (a pipe counts against
//! the user's `pipe-user-pages-soft`, 16 pages each); with none to spare the body is copied
//! as before. A pipe is only put back empty: one left holding bytes by an error is closed.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

use crate::gather::Gather;

/// Body bytes still to come from which a body is spliced rather than copied.
pub(crate) const SPLICE_MIN: u64 = 16 * 1024;

/// The most a read of a response head takes for a client a body can be spliced to, on an
/// upstream connection whose last answer was large (`UpstreamConn::large_answers`): a head
/// with a small body (a 4 KiB one) still in one read, most of a large body left in the
/// socket to splice.
pub(crate) const HEAD_READ: usize = 8 * 1024;

/// Pipes one worker keeps at most (one per body being spliced at the same time).
pub(crate) const MAX_PIPES: usize = 64;

/// The most a pipe is given at a time: a default pipe's capacity (16 slots). Larger pipes
/// (`F_SETPIPE_SZ` 256 KiB, one splice per 64 KiB answer) measured twice as slow: the whole
/// answer went to the client socket in one send, which TCP's pacing then spread out with
/// timers.
const PIPE_BYTES: usize = 64 * 1024;

/// The most iovecs one `writev` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Why a spliced relay stopped before the body's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpliceError {
    /// The upstream closed or failed before the body's end.
    UpstreamClosed,
    /// The upstream sent nothing for the body's idle time.
    UpstreamTimeout,
    /// The client closed or failed.
    ClientClosed,
}

/// A pipe: its read end and its write end.
#[derive(Debug)]
struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        Ok(unsafe {
            Pipe {
                rd: OwnedFd::from_raw_fd(fds[0]),
                wr: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }
}

/// A worker's spare pipes and how many it has made in all (those in use included).
#[derive(Debug, Default)]
struct Pipes {
    free: Vec<Pipe>,
    made: usize,
}

thread_local! {
    static PIPES: RefCell<Pipes> = RefCell::default();
}

/// A pipe taken from the worker's spares for one relay; back to them on drop if empty.
struct Lease {
    pipe: Option<Pipe>,
    /// Bytes in the pipe.
    held: usize,
}

impl Lease {
    fn take() -> Option<Lease> {
        PIPES.with(|p| {
            let mut p = p.borrow_mut();
            let pipe = match p.free.pop() {
                Some(pipe) => pipe,
                None if p.made < MAX_PIPES => {
                    let pipe = Pipe::new().ok()?;
                    p.made += 1;
                    pipe
                }
                None => return None,
            };
            Some(Lease {
                pipe: Some(pipe),
                held: 0,
            })
        })
    }

    fn pipe(&self) -> &Pipe {
        self.pipe
            .as_ref()
            .expect("a lease holds its pipe until dropped")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(pipe) = self.pipe.take() else { return };
        // (`try_with`: a lease dropped while the thread's locals are torn down just closes.)
        let _ = PIPES.try_with(|p| {
            let mut p = p.borrow_mut();
            if self.held == 0 {
                p.free.push(pipe);
            } else {
                // Bytes of a body nobody will get: close the pipe with them.
                p.made -= 1;
                drop(pipe);
            }
        });
    }
}

/// `O_NONBLOCK` on a socket for as long as this lives (cleared again on drop if it was off).
struct NonBlocking {
    fd: RawFd,
    flags: libc::c_int,
}

impl NonBlocking {
    fn set(fd: RawFd) -> io::Result<NonBlocking> {
        // SAFETY: fcntl on a descriptor the caller keeps open; no memory is passed.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        if flags & libc::O_NONBLOCK == 0 {
            // SAFETY: as above.
            if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(NonBlocking { fd, flags })
    }
}

impl Drop for NonBlocking {
    fn drop(&mut self) {
        if self.flags & libc::O_NONBLOCK == 0 {
            // SAFETY: the socket is still open (its owner outlives this guard).
            unsafe { libc::fcntl(self.fd, libc::F_SETFL, self.flags) };
        }
    }
}

/// One non-blocking splice of at most `len` bytes from `from` to `to`.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the call; null offsets (sockets and pipes have
    // none).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Sends `head` and then the next `len` bytes of `from` to `to`, all through one pipe (so
/// the client is woken once for the whole answer when it has all arrived), waiting at most
/// `idle` for each piece from the upstream. `Ok(None)`: no pipe to spare, nothing was sent
/// (send and copy instead). `Err` carries the bytes the client got before the failure; what
/// the pipe held when the upstream failed is passed on first, as a copying relay would have.
pub(crate) async fn relay(
    from: &TcpStream,
    to: &TcpStream,
    head: &mut Gather,
    len: u64,
    idle: Duration,
) -> Result<Option<u64>, (SpliceError, u64)> {
    let Some(mut lease) = Lease::take() else {
        return Ok(None);
    };
    let (src, dst) = (from.as_raw_fd(), to.as_raw_fd());
    let _src_nb = NonBlocking::set(src).map_err(|_| (SpliceError::UpstreamClosed, 0))?;
    let _dst_nb = NonBlocking::set(dst).map_err(|_| (SpliceError::ClientClosed, 0))?;
    let (rd, wr) = {
        let p = lease.pipe();
        (p.rd.as_raw_fd(), p.wr.as_raw_fd())
    };
    let mut left = len;
    let mut sent = 0u64;
    let mut failed = None;
    loop {
        // Fill the pipe as far as it goes; pass it on when nothing more fits or comes.
        let mut stuck = false;
        if !head.is_empty() {
            // The head into the pipe first (a copy: it is the gateway's, not the upstream's).
            let iov = head.unwritten();
            let count = iov.len().min(IOV_MAX) as libc::c_int;
            // SAFETY: the iovecs point into buffers `head` owns and keeps alive for the call.
            let n = unsafe { libc::writev(wr, iov.as_ptr(), count) };
            if n > 0 {
                head.consume(n as usize);
                lease.held += n as usize;
            } else if lease.held == 0 {
                // An empty pipe that takes nothing: not a state to wait out.
                return Err((SpliceError::ClientClosed, sent));
            }
            stuck = !head.is_empty();
        }
        let room = PIPE_BYTES.saturating_sub(lease.held);
        if !stuck && failed.is_none() && left > 0 {
            if room == 0 {
                stuck = true;
            } else {
                match splice(src, wr, usize::try_from(left).map_or(room, |l| l.min(room))) {
                    Ok(0) => failed = Some(SpliceError::UpstreamClosed),
                    Ok(n) => {
                        lease.held += n;
                        left -= n as u64;
                    }
                    // Nothing from the upstream yet (or the pipe's slots are full): pass on what
                    // the pipe holds, or wait for the upstream.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && lease.held > 0 => {
                        stuck = true
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let ready = monoio::time::timeout_at(
                            (Instant::now() + idle).into(),
                            from.readable(false),
                        )
                        .await;
                        match ready {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => failed = Some(SpliceError::UpstreamClosed),
                            Err(_) => failed = Some(SpliceError::UpstreamTimeout),
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => failed = Some(SpliceError::UpstreamClosed),
                }
            }
        }
        let filled = head.is_empty() && (left == 0 || failed.is_some());
        if lease.held > 0 && (stuck || filled) {
            match splice(rd, dst, lease.held) {
                // The pipe holds bytes, so nothing moved means the client side is gone.
                Ok(0) => return Err((SpliceError::ClientClosed, sent)),
                Ok(n) => {
                    lease.held -= n;
                    sent += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if to.writable(false).await.is_err() {
                        return Err((SpliceError::ClientClosed, sent));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err((SpliceError::ClientClosed, sent)),
            }
        }
        if lease.held == 0 && filled {
            return match failed {
                Some(e) => Err((e, sent)),
                None => Ok(Some(sent)),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener};
    use std::sync::mpsc;

    use super::*;
    use crate::codec::Span;
    use crate::gather::Piece;

    /// The byte at `i` of a test body: a pattern that shows a lost, doubled or moved piece.
    fn byte(i: usize) -> u8 {
        (i % 251) as u8
    }

    /// An upstream that sends `send` bytes of the pattern in pieces of `piece` bytes, pausing
    /// `pause` between them, then waits `hold` before it closes.
    fn upstream(send: usize, piece: usize, pause: Duration, hold: Duration) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let body: Vec<u8> = (0..send).map(byte).collect();
            for chunk in body.chunks(piece) {
                if s.write_all(chunk).is_err() {
                    return;
                }
                std::thread::sleep(pause);
            }
            std::thread::sleep(hold);
        });
        addr
    }

    /// A client that waits `stall` before it reads (so the gateway's socket fills up), then
    /// reads to the end and reports what it got; with `leave`, it resets the connection
    /// after 100 ms without reading.
    fn client(stall: Duration, leave: bool) -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        // Small socket buffers (the accepted socket inherits the listener's): a stalled
        // client fills them long before the body's end.
        set_buffer(l.as_raw_fd(), libc::SO_RCVBUF);
        let addr = l.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            if leave {
                // After the relay's connect has surely completed, a reset (not a FIN): the
                // relay's next send fails at once.
                std::thread::sleep(Duration::from_millis(100));
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                return;
            }
            std::thread::sleep(stall);
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            let _ = tx.send(got);
        });
        (addr, rx)
    }

    fn set_buffer(fd: RawFd, which: libc::c_int) {
        let size: libc::c_int = 8 * 1024;
        // SAFETY: setsockopt on an open socket with a c_int option value.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                which,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
    }

    fn flags(fd: RawFd) -> libc::c_int {
        // SAFETY: F_GETFL on an open descriptor.
        unsafe { libc::fcntl(fd, libc::F_GETFL) }
    }

    fn free_pipes() -> (usize, usize) {
        PIPES.with(|p| {
            let p = p.borrow();
            (p.free.len(), p.made)
        })
    }

    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n";
    const TAIL: &[u8] = b"X-Request-Id: 1\r\n\r\n";

    /// One relay: an upstream that sends `send` bytes in pieces of `piece` (2 ms apart) and
    /// closes `hold` after the last, a relay of `len` bytes after a head of `HEAD` and
    /// `tail`, to a client that reads after `stall` (or resets at once, with `leave`).
    struct Case {
        send: usize,
        len: u64,
        piece: usize,
        hold: Duration,
        stall: Duration,
        leave: bool,
        idle: Duration,
        tail: Vec<u8>,
    }

    impl Default for Case {
        fn default() -> Self {
            Case {
                send: 300_000,
                len: 300_000,
                piece: 300_000,
                hold: Duration::from_secs(1),
                stall: Duration::ZERO,
                leave: false,
                idle: Duration::from_secs(5),
                tail: TAIL.to_vec(),
            }
        }
    }

    /// What a relay did: its outcome, what the client got, the thread's pipes (free, made).
    type Outcome = (
        Result<Option<u64>, (SpliceError, u64)>,
        Vec<u8>,
        (usize, usize),
    );

    /// Runs `case` on an io_uring runtime, then on an epoll one (same thread, same pipes).
    fn run(case: &Case) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        for uring in [true, false] {
            let pause = Duration::from_millis(2);
            let from = upstream(case.send, case.piece, pause, case.hold);
            let (to, got) = client(case.stall, case.leave);
            let (len, idle, tail) = (case.len, case.idle, case.tail.clone());
            let relay_both = async move {
                let from = TcpStream::connect(from).await.unwrap();
                let to = TcpStream::connect(to).await.unwrap();
                set_buffer(to.as_raw_fd(), libc::SO_SNDBUF);
                let before = (flags(from.as_raw_fd()), flags(to.as_raw_fd()));
                let pieces = [
                    Piece::Src(Span {
                        start: 0,
                        end: HEAD.len(),
                    }),
                    Piece::Extra(Span {
                        start: 0,
                        end: tail.len(),
                    }),
                ];
                let mut head = Gather::new(HEAD.to_vec(), tail, Vec::new(), pieces.into_iter());
                let res = relay(&from, &to, &mut head, len, idle).await;
                // The sockets' flags are as they were, whatever happened.
                assert_eq!((flags(from.as_raw_fd()), flags(to.as_raw_fd())), before);
                drop(to);
                res
            };
            let res = crate::io::block_on_driver(uring, relay_both);
            let got = if case.leave {
                Vec::new()
            } else {
                got.recv_timeout(Duration::from_secs(10)).unwrap()
            };
            outcomes.push((res, got, free_pipes()));
        }
        outcomes
    }

    fn expected(tail: &[u8], body: usize) -> Vec<u8> {
        let mut all = [HEAD, tail].concat();
        all.extend((0..body).map(byte));
        all
    }

    #[test]
    fn a_large_body_arrives_whole_after_the_head_and_the_pipe_goes_back() {
        // Pieces with pauses (the relay waits for the upstream) to a client that reads only
        // after 300 ms (the relay waits for the client's socket to drain).
        let case = Case {
            piece: 7_000,
            stall: Duration::from_millis(300),
            ..Case::default()
        };
        for (res, got, pipes) in run(&case) {
            let want = expected(TAIL, 300_000);
            assert_eq!(res, Ok(Some(want.len() as u64)));
            assert_eq!(got.len(), want.len());
            assert!(got == want, "the body arrived changed");
            // Runtimes of one thread share its pipes: one made, and it is back.
            assert_eq!(pipes, (1, 1));
        }
    }

    #[test]
    fn a_head_larger_than_the_pipe_goes_out_whole_before_the_body() {
        let mut tail: Vec<u8> = (0..100_000).map(|i| b'a' + (i % 26) as u8).collect();
        tail.extend_from_slice(b"\r\n\r\n");
        let case = Case {
            stall: Duration::from_millis(100),
            tail: tail.clone(),
            ..Case::default()
        };
        for (res, got, pipes) in run(&case) {
            let want = expected(&tail, 300_000);
            assert_eq!(res, Ok(Some(want.len() as u64)));
            assert!(got == want, "{} bytes, wanted {}", got.len(), want.len());
            assert_eq!(pipes, (1, 1));
        }
    }

    #[test]
    fn the_relay_stops_at_the_body_length_and_leaves_the_rest_in_the_socket() {
        let case = Case {
            send: 100_000,
            len: 60_000,
            ..Case::default()
        };
        for (res, got, _) in run(&case) {
            let want = expected(TAIL, 60_000);
            assert_eq!(res, Ok(Some(want.len() as u64)));
            assert!(got == want, "{} bytes, wanted {}", got.len(), want.len());
        }
    }

    #[test]
    fn an_upstream_that_closes_early_has_what_it_sent_passed_on() {
        // The upstream closes right after 40,000 bytes while the client has not read yet:
        // the pipe still holds bytes when the relay sees the end of the stream, and passes
        // them all on before it reports the failure.
        let case = Case {
            send: 40_000,
            piece: 10_000,
            hold: Duration::ZERO,
            stall: Duration::from_millis(300),
            ..Case::default()
        };
        for (res, got, pipes) in run(&case) {
            let want = expected(TAIL, 40_000);
            assert_eq!(res, Err((SpliceError::UpstreamClosed, want.len() as u64)));
            assert!(got == want, "{} bytes, wanted {}", got.len(), want.len());
            assert_eq!(pipes, (1, 1), "an emptied pipe goes back");
        }
    }

    #[test]
    fn a_silent_upstream_times_out() {
        let case = Case {
            send: 20_000,
            idle: Duration::from_millis(200),
            ..Case::default()
        };
        for (res, got, _) in run(&case) {
            let want = expected(TAIL, 20_000);
            assert_eq!(res, Err((SpliceError::UpstreamTimeout, want.len() as u64)));
            assert!(got == want);
        }
    }

    #[test]
    fn a_client_that_left_stops_the_relay_and_its_pipe_is_closed_with_the_bytes_in_it() {
        let case = Case {
            leave: true,
            ..Case::default()
        };
        for (res, _, pipes) in run(&case) {
            assert!(
                matches!(res, Err((SpliceError::ClientClosed, _))),
                "{res:?}"
            );
            // The send fails while the pipe holds bytes: that pipe is closed, none is left.
            assert_eq!(pipes, (0, 0));
        }
    }

    #[test]
    fn with_every_pipe_in_use_there_is_none_to_lease() {
        let leases: Vec<Lease> = (0..MAX_PIPES).map_while(|_| Lease::take()).collect();
        assert_eq!(leases.len(), MAX_PIPES);
        assert!(Lease::take().is_none());
        drop(leases);
        assert_eq!(free_pipes(), (MAX_PIPES, MAX_PIPES));
        assert!(Lease::take().is_some());
    }
}
