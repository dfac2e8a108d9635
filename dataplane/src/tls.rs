//! TLS on client connections and towards upstreams: the handshakes, and [`TlsStream`], a
//! stream that decrypts and encrypts with rustls on top of monoio's owned-buffer TCP I/O.
//!
//! Hot path for HTTPS. Ciphertext is read into one reused buffer per connection, fed to
//! rustls, and the plaintext is copied once into the caller's buffer; plaintext to send is
//! encrypted as one run of records (a vectored head and body fill whole records, however many
//! pieces they come in). A flush of at least one full record's plaintext goes from rustls's
//! buffers straight into the socket with a non-blocking `sendmsg` ([`DirectSend`]: no copy of
//! the records, and out at once rather than at the end of the event loop's turn); what the
//! socket does not take, and every smaller flush, is copied into one reused buffer and
//! written with one `write_all` through the runtime, which batches many connections' small
//! writes into one system call.
//!
//! For a tunnel the stream splits into a read half and a write half over monoio's split TCP
//! halves, sharing the rustls session (borrowed only for synchronous calls, never across an
//! await). TLS output that reading produces (a KeyUpdate answer) goes out with the next
//! write, so the two halves never write records concurrently.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Instant;

use common::tls::ListenerTls;
use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent,
    OwnedReadHalf, OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;
use monoio::BufResult;
use rustls::client::ClientConnection;
use rustls::pki_types::ServerName;
use rustls::server::ServerConnection;
use rustls::Connection;

/// Ciphertext read per TCP read: one full TLS record and its overhead.
const RECORD_BUF: usize = 16 * 1024 + 512;
/// Plaintext from which a flush's records go straight to the socket ([`DirectSend`]): one
/// full record. Below it, the copy saved is smaller than the system call of its own.
const DIRECT_MIN: usize = 16 * 1024;
/// Longest [`TlsStream::close_notify`] waits for a full send buffer to take the record.
const CLOSE_NOTIFY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a handshake failed, as the metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// `[timeouts] tls_handshake_ms` ran out.
    Timeout,
    /// The client closed or reset the connection mid-handshake.
    Closed,
    /// The client speaks no TLS version, cipher suite or ALPN protocol the listener offers.
    Incompatible,
    /// The client sent bytes that are not a valid TLS handshake (plain HTTP, for one).
    BadMessage,
    /// The client ended the handshake with an alert (for example, it does not trust the
    /// certificate).
    ClientAlert,
    /// Anything else rustls refused.
    Other,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 6] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::Closed,
        HandshakeFailure::Incompatible,
        HandshakeFailure::BadMessage,
        HandshakeFailure::ClientAlert,
        HandshakeFailure::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Incompatible => "incompatible",
            HandshakeFailure::BadMessage => "bad_message",
            HandshakeFailure::ClientAlert => "client_alert",
            HandshakeFailure::Other => "other",
        }
    }

    fn of(e: &rustls::Error) -> Self {
        use rustls::Error as E;
        match e {
            E::PeerIncompatible(_) | E::NoApplicationProtocol => HandshakeFailure::Incompatible,
            E::InvalidMessage(_)
            | E::DecryptError
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. }
            | E::PeerMisbehaved(_) => HandshakeFailure::BadMessage,
            E::AlertReceived(_) => HandshakeFailure::ClientAlert,
            _ => HandshakeFailure::Other,
        }
    }
}

/// The session and its buffers, shared by the two halves of a split stream.
struct Session {
    conn: Connection,
    /// Ciphertext read from TCP and not yet given to rustls: `rx[rpos..]`.
    rx: Vec<u8>,
    rpos: usize,
    /// Records the socket did not take at once, reused.
    tx: Vec<u8>,
    /// TCP reached end of stream.
    eof: bool,
    /// TCP ended without close_notify (RFC 8446 6.1): read as a close, but one an attacker
    /// can make, so not as the end of a body that ends where the connection does.
    truncated: bool,
    /// The TCP socket, for [`DirectSend`].
    fd: RawFd,
    /// Plaintext bytes encrypted since the last flush.
    queued: usize,
    /// Every flush goes straight to the socket, small ones too (see [`PlainQueue`]).
    always_direct: bool,
    /// close_notify was sent (by [`close`], which also half-closes TCP, or by
    /// [`TlsStream::close_notify`]).
    shut: bool,
    /// The stream is split into halves, whose writes may be in flight while the read half
    /// reads: reading then leaves its output to the write half (see the module's doc).
    split: bool,
    /// Where the ciphertext given to rustls stands in its records, so that a connection
    /// going back to a pool can be told to hold no part of a record (rustls does not say).
    records: Records,
}

/// Follows TLS record boundaries (RFC 8446 5.1: a 5-byte header whose last two bytes are
/// the length) through the ciphertext as it is given to rustls.
#[derive(Debug, Default, Clone, Copy)]
struct Records {
    /// Header bytes seen of the next record (0 to 4).
    header: usize,
    /// The length's first byte, once seen.
    len_hi: u8,
    /// Bytes of the current record's body still to come.
    body_left: usize,
}

impl Records {
    fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len());
                self.body_left -= n;
                data = &data[n..];
                continue;
            }
            match self.header {
                3 => self.len_hi = data[0],
                4 => self.body_left = usize::from(self.len_hi) << 8 | usize::from(data[0]),
                _ => {}
            }
            self.header = (self.header + 1) % 5;
            data = &data[1..];
        }
    }

    /// Between two records.
    fn at_boundary(&self) -> bool {
        self.header == 0 && self.body_left == 0
    }
}

type Shared = Rc<RefCell<Session>>;

/// A client connection with TLS terminated.
pub struct TlsStream {
    tcp: TcpStream,
    session: Shared,
    /// The SNI name the client sent, lower-case.
    sni: Option<Box<str>>,
    h2: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("fd", &self.tcp.as_raw_fd())
            .field("sni", &self.sni)
            .finish()
    }
}

/// Runs the server side of a handshake on `tcp` until it completes, fails or `deadline`
/// passes, with `tls.config`, or `tls.resume_config` when the client's first read holds a
/// ClientHello that offers a session to resume. Bytes the client sent after its last
/// handshake message stay buffered. A failure hands the connection back still open, so the
/// caller can count it before the client sees the close.
pub(crate) async fn accept(
    mut tcp: TcpStream,
    tls: &ListenerTls,
    deadline: Instant,
) -> Result<TlsStream, (HandshakeFailure, TcpStream)> {
    let first =
        monoio::time::timeout_at(deadline.into(), tcp.read(Vec::with_capacity(RECORD_BUF))).await;
    let rx = match first {
        Ok((Ok(n), rx)) if n > 0 => rx,
        Ok(_) => return Err((HandshakeFailure::Closed, tcp)),
        Err(_) => return Err((HandshakeFailure::Timeout, tcp)),
    };
    let config = match offers_resumption(&rx) {
        true => tls.resume_config.clone(),
        false => tls.config.clone(),
    };
    let conn = match ServerConnection::new(config) {
        Ok(conn) => Connection::Server(conn),
        Err(_) => return Err((HandshakeFailure::Other, tcp)),
    };
    let session = Session::start(conn, rx, tcp.as_raw_fd());
    match monoio::time::timeout_at(deadline.into(), handshake(&mut tcp, &session)).await {
        Ok(Ok(())) => {}
        Ok(Err(Shake::Closed)) => return Err((HandshakeFailure::Closed, tcp)),
        Ok(Err(Shake::Tls(e))) => return Err((HandshakeFailure::of(&e), tcp)),
        Err(_) => return Err((HandshakeFailure::Timeout, tcp)),
    }
    let (sni, h2) = {
        let s = session.borrow();
        let sni = match &s.conn {
            Connection::Server(c) => c.server_name().map(Into::into),
            Connection::Client(_) => None,
        };
        (sni, s.conn.alpn_protocol() == Some(b"h2"))
    };
    Ok(TlsStream {
        tcp,
        session,
        sni,
        h2,
    })
}

/// Runs the client side of a handshake with an upstream on `tcp`, sending and checking
/// `name`, until it completes, fails or `deadline` passes. The error says why: `TimedOut`,
/// `ConnectionReset` (the upstream closed), or `InvalidData` with rustls's reason (an
/// untrusted certificate, a name it does not hold, no protocol in common).
pub(crate) async fn connect(
    mut tcp: TcpStream,
    config: std::sync::Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    deadline: Instant,
) -> io::Result<TlsStream> {
    let conn = ClientConnection::new(config, name)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let rx = Vec::with_capacity(RECORD_BUF);
    let session = Session::start(Connection::Client(conn), rx, tcp.as_raw_fd());
    match monoio::time::timeout_at(deadline.into(), handshake(&mut tcp, &session)).await {
        Ok(Ok(())) => {}
        Ok(Err(Shake::Closed)) => return Err(io::ErrorKind::ConnectionReset.into()),
        Ok(Err(Shake::Tls(e))) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(_) => return Err(io::ErrorKind::TimedOut.into()),
    }
    let h2 = session.borrow().conn.alpn_protocol() == Some(b"h2");
    Ok(TlsStream {
        tcp,
        session,
        sni: None,
        h2,
    })
}

/// Why a handshake failed.
enum Shake {
    Closed,
    Tls(rustls::Error),
}

/// Exchanges handshake messages until the session's handshake is done.
async fn handshake(tcp: &mut TcpStream, session: &RefCell<Session>) -> Result<(), Shake> {
    loop {
        // Also what is left once the peer's Finished is in: TLS 1.3's session tickets, on
        // the server's side. Held back for the first answer's write, they left the client's
        // first request waiting behind its unacknowledged Finished (Nagle, then a 40 ms
        // delayed ACK), and a client that asks nothing got none.
        flush_records(tcp, session)
            .await
            .map_err(|_| Shake::Closed)?;
        if !session.borrow().conn.is_handshaking() {
            return Ok(());
        }
        match fill(tcp, session, None).await {
            Ok(true) => {}
            Ok(false) | Err(Fill::Io) => return Err(Shake::Closed),
            Err(Fill::Tls(e)) => {
                // Tell the peer why (the alert rustls queued), best effort.
                let _ = flush_records(tcp, session).await;
                return Err(Shake::Tls(e));
            }
        }
    }
}

impl Session {
    /// A session whose first ciphertext (possibly none yet) is `rx`.
    fn start(mut conn: Connection, rx: Vec<u8>, fd: RawFd) -> Shared {
        // Every write is flushed at once, so the outgoing records never pile up; without a
        // limit a large write is encrypted whole instead of failing part way.
        conn.set_buffer_limit(None);
        Rc::new(RefCell::new(Session {
            conn,
            rx,
            rpos: 0,
            tx: Vec::new(),
            eof: false,
            truncated: false,
            fd,
            queued: 0,
            always_direct: false,
            shut: false,
            split: false,
            records: Records::default(),
        }))
    }
}

/// Whether `data`, the first bytes a client sent, hold a whole TLS 1.3 ClientHello that
/// offers a session to resume (its last extension, `pre_shared_key`, RFC 8446 4.2.11). Anything
/// else (a ClientHello cut across reads or records, not one at all) says no: rustls then
/// judges the bytes, and only the number of tickets sent afterwards depends on this.
fn offers_resumption(data: &[u8]) -> bool {
    const HANDSHAKE: u8 = 22;
    const CLIENT_HELLO: u8 = 1;
    const PRE_SHARED_KEY: u16 = 41;
    let be16 = |b: &[u8], at: usize| {
        b.get(at..at + 2)
            .map(|v| usize::from(v[0]) << 8 | usize::from(v[1]))
    };
    // One record: type, version, length; then the handshake message's type and length.
    if data.first() != Some(&HANDSHAKE) || data.get(5) != Some(&CLIENT_HELLO) {
        return false;
    }
    let Some(record) = be16(data, 3).and_then(|len| data.get(5..5 + len)) else {
        return false;
    };
    let len = record
        .get(1..4)
        .map(|l| usize::from(l[0]) << 16 | usize::from(l[1]) << 8 | usize::from(l[2]));
    let Some(hello) = len.and_then(|len| record.get(4..4 + len)) else {
        return false;
    };
    // Version and random, then the session id, cipher suites and compression methods.
    let mut at = 2 + 32;
    let Some(id) = hello.get(at) else {
        return false;
    };
    at += 1 + usize::from(*id);
    let Some(suites) = be16(hello, at) else {
        return false;
    };
    at += 2 + suites;
    let Some(methods) = hello.get(at) else {
        return false;
    };
    at += 1 + usize::from(*methods);
    let Some(exts) = be16(hello, at).and_then(|len| hello.get(at + 2..at + 2 + len)) else {
        return false;
    };
    let mut at = 0;
    while let (Some(kind), Some(len)) = (be16(exts, at), be16(exts, at + 2)) {
        if kind == usize::from(PRE_SHARED_KEY) {
            return true;
        }
        at += 4 + len;
    }
    false
}

/// Why [`fill`] stopped.
enum Fill {
    Io,
    Tls(rustls::Error),
}

/// Gives rustls more ciphertext: what is buffered, else one TCP read. `Ok(false)`: the TCP
/// stream ended (rustls has been told).
async fn fill<R: CancelableAsyncReadRent>(
    tcp: &mut R,
    session: &RefCell<Session>,
    cancel: Option<CancelHandle>,
) -> Result<bool, Fill> {
    let empty = {
        let mut s = session.borrow_mut();
        if s.rpos == s.rx.len() && !s.eof {
            let mut rx = std::mem::take(&mut s.rx);
            rx.clear();
            s.rpos = 0;
            Some(rx)
        } else {
            None
        }
    };
    if let Some(rx) = empty {
        let (res, buf) = match cancel {
            Some(c) => tcp.cancelable_read(rx, c).await,
            None => tcp.read(rx).await,
        };
        let mut s = session.borrow_mut();
        s.rx = buf;
        match res {
            Ok(0) => s.eof = true,
            Ok(_) => {}
            Err(_) => return Err(Fill::Io),
        }
    }
    feed(&mut session.borrow_mut())
}

/// Gives rustls what is buffered of the ciphertext (as much as it takes), or tells it the
/// stream ended. `Ok(false)`: it ended.
fn feed(s: &mut Session) -> Result<bool, Fill> {
    if s.eof && s.rpos == s.rx.len() {
        // Tell rustls the stream ended, so a missing close_notify is noticed.
        let _ = s.conn.read_tls(&mut io::empty());
        s.conn.process_new_packets().map_err(Fill::Tls)?;
        return Ok(false);
    }
    let mut pending = &s.rx[s.rpos..];
    let before = pending.len();
    if s.conn.read_tls(&mut pending).is_err() {
        return Err(Fill::Tls(rustls::Error::General(
            "record buffer full".into(),
        )));
    }
    let taken = before - pending.len();
    let given = s.rpos..s.rpos + taken;
    s.records.advance(&s.rx[given]);
    s.rpos += taken;
    s.conn.process_new_packets().map_err(Fill::Tls)?;
    Ok(true)
}

/// A handle on a TLS stream's session for reading ahead without waiting while a write is
/// in flight ([`TlsStream::read_ahead`]): an upstream that answered an upload early (a 413)
/// and stopped reading is seen, as a cleartext one is by a peek.
pub struct ReadAhead(Shared);

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadAhead")
    }
}

impl ReadAhead {
    /// Decrypts what the peer has sent so far, with non-blocking receives, appending the
    /// plaintext to `out` up to its capacity (it stays in the session past that). Nothing
    /// is lost: what is read here is what the next read of the stream would have returned.
    /// No read may be in flight on the stream (the write side may be).
    pub fn pull(&self, out: &mut Vec<u8>) {
        let mut s = self.0.borrow_mut();
        let s = &mut *s;
        let mut chunk = [0u8; 4096];
        loop {
            let room = out.capacity() - out.len();
            if room == 0 {
                return;
            }
            match s.conn.reader().read(&mut chunk[..room.min(4096)]) {
                Ok(0) => return,
                Ok(n) => {
                    out.extend_from_slice(&chunk[..n]);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
            if s.rpos == s.rx.len() {
                if s.eof {
                    return;
                }
                s.rx.clear();
                s.rpos = 0;
                if s.rx.capacity() == 0 {
                    s.rx.reserve(RECORD_BUF);
                }
                let cap = s.rx.capacity();
                // SAFETY: `recv` writes at most `cap` bytes into `rx`'s spare room, and
                // `set_len` covers only what it wrote; the fd is the session's socket, open
                // while the session is.
                unsafe {
                    match libc::recv(s.fd, s.rx.as_mut_ptr().cast(), cap, libc::MSG_DONTWAIT) {
                        0 => s.eof = true,
                        n if n > 0 => s.rx.set_len(n as usize),
                        _ => return,
                    }
                }
            }
            // A failure is the stream's next read's to report.
            if !matches!(feed(s), Ok(true)) {
                return;
            }
        }
    }
}

/// Writes every record rustls has queued: straight from rustls's buffers to the socket while
/// it takes them, the rest (a full send buffer) copied out and written through the runtime.
/// `tcp` is the session's socket, with no write in flight (the caller owns its write side).
async fn flush_records<W: AsyncWriteRent>(
    tcp: &mut W,
    session: &RefCell<Session>,
) -> io::Result<()> {
    let tx = {
        let mut s = session.borrow_mut();
        // Small writes go through the runtime, which makes one system call for many.
        let go_direct = s.always_direct || s.queued >= DIRECT_MIN;
        s.queued = 0;
        if go_direct {
            send_direct(&mut s)?;
        }
        if !s.conn.wants_write() {
            return Ok(());
        }
        let mut tx = std::mem::take(&mut s.tx);
        tx.clear();
        while s.conn.wants_write() {
            s.conn.write_tls(&mut tx)?;
        }
        tx
    };
    let (res, tx) = tcp.write_all(tx).await;
    session.borrow_mut().tx = tx;
    res.map(|_| ())
}

/// A non-blocking `sendmsg` on a TCP socket, as the sink rustls writes its records to: the
/// records go from rustls's buffers into the kernel, without a copy into `tx` first and
/// without waiting for the end of the event loop's turn. A full send buffer is
/// `WouldBlock`, and [`flush_records`] falls back to the runtime's write.
struct DirectSend(RawFd);

impl Write for DirectSend {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: an all-zero `msghdr` is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // `IoSlice` is ABI-compatible with `iovec` on Unix (std guarantees it); sendmsg only
        // reads through the pointer.
        msg.msg_iov = bufs.as_ptr().cast_mut().cast();
        msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
        // SAFETY: `msg` describes `bufs`, which outlive the call; the fd is the session's
        // socket, open while the session is.
        let n = unsafe { libc::sendmsg(self.0, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads decrypted bytes into `buf` (from its start, as monoio reads do), reading more
/// ciphertext as needed. `Ok(0)`: the client closed.
async fn read_owned<R: CancelableAsyncReadRent, T: IoBufMut>(
    tcp: &mut R,
    session: &RefCell<Session>,
    mut buf: T,
    cancel: Option<CancelHandle>,
) -> BufResult<usize, T> {
    let room = buf.bytes_total();
    if room == 0 {
        return (Ok(0), buf);
    }
    loop {
        let got = {
            // SAFETY: `write_ptr` points at `bytes_total` writable bytes owned by `buf`;
            // the slice does not outlive this block.
            let dst = unsafe { std::slice::from_raw_parts_mut(buf.write_ptr(), room) };
            session.borrow_mut().conn.reader().read(dst)
        };
        match got {
            Ok(n) => {
                // SAFETY: rustls wrote `n` bytes at the start of the buffer.
                unsafe { buf.set_init(n) };
                return (Ok(n), buf);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // End of TCP without close_notify: for HTTP the same as a close, but noted.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                session.borrow_mut().truncated = true;
                return (Ok(0), buf);
            }
            Err(e) => return (Err(e), buf),
        }
        match fill(tcp, session, cancel.clone()).await {
            Ok(_) => {}
            Err(Fill::Io) => return (Err(io::ErrorKind::ConnectionReset.into()), buf),
            Err(Fill::Tls(e)) => {
                let mut s = session.borrow_mut();
                if !s.split {
                    send_alert(&mut s);
                }
                return (Err(io::Error::new(io::ErrorKind::InvalidData, e)), buf);
            }
        }
    }
}

/// Encrypts an owned buffer's bytes and writes the records in one TCP write.
async fn write_buf<W: AsyncWriteRent, T: IoBuf>(
    tcp: &mut W,
    session: &RefCell<Session>,
    buf: T,
) -> BufResult<usize, T> {
    // SAFETY: `read_ptr` points at `bytes_init` initialised bytes owned by `buf`.
    let plain = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
    let queued = {
        let mut s = session.borrow_mut();
        s.queued += plain.len();
        s.conn.writer().write_all(plain)
    };
    let res = match queued {
        Ok(()) => flush_records(tcp, session).await.map(|()| plain.len()),
        Err(e) => Err(e),
    };
    (res, buf)
}

/// Encrypts the pieces of an owned iovec buffer as one run of records (a record spans
/// pieces, so a head gathered from many small pieces does not become as many records) and
/// writes the records in one TCP write.
async fn write_iovecs<W: AsyncWriteRent, T: IoVecBuf>(
    tcp: &mut W,
    session: &RefCell<Session>,
    buf: T,
) -> BufResult<usize, T> {
    // SAFETY: the iovec array and the memory it describes belong to `buf`, which outlives
    // `pieces`; `IoSlice` is ABI-compatible with `iovec` on Unix (std guarantees it).
    let pieces = unsafe {
        std::slice::from_raw_parts(
            buf.read_iovec_ptr().cast::<io::IoSlice<'_>>(),
            buf.read_iovec_len(),
        )
    };
    let res = match queue_plain(session, pieces) {
        Ok(n) => flush_records(tcp, session).await.map(|()| n),
        Err(e) => Err(e),
    };
    (res, buf)
}

/// Encrypts `pieces` into records as one run (a record may span pieces); they go out with
/// the next [`flush_records`]. `Ok`: the bytes queued, all of them.
fn queue_plain(session: &RefCell<Session>, pieces: &[io::IoSlice<'_>]) -> io::Result<usize> {
    let len: usize = pieces.iter().map(|p| p.len()).sum();
    let mut s = session.borrow_mut();
    s.queued += len;
    // The session has no buffer limit, so it takes everything or fails.
    match s.conn.writer().write_vectored(pieces)? {
        n if n == len => Ok(n),
        _ => Err(io::ErrorKind::WriteZero.into()),
    }
}

/// Sends close_notify, then half-closes TCP; once (a second call does nothing).
async fn close<W: AsyncWriteRent>(tcp: &mut W, session: &RefCell<Session>) -> io::Result<()> {
    {
        let mut s = session.borrow_mut();
        if std::mem::replace(&mut s.shut, true) {
            return Ok(());
        }
        s.conn.send_close_notify();
    }
    flush_records(tcp, session).await?;
    tcp.shutdown().await
}

/// After rustls refused what the client sent: the fatal alert it queued goes out (RFC 8446
/// §6.2), best effort, without waiting: one non-blocking send, since the connection closes
/// next whatever happens.
fn send_alert(s: &mut Session) {
    let _ = send_direct(s);
}

/// Writes what rustls has queued with non-blocking sends, as far as the socket takes it.
/// `Err` only for a failed send (not for a full send buffer).
fn send_direct(s: &mut Session) -> io::Result<()> {
    let mut direct = DirectSend(s.fd);
    while s.conn.wants_write() {
        match s.conn.write_tls(&mut direct) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl TlsStream {
    /// Sends close_notify before the connection is dropped (whose close sends the FIN): at
    /// once with a non-blocking send, which takes the small record unless the send buffer is
    /// full, else through the runtime within [`CLOSE_NOTIFY_WAIT`]. Once, like [`close`].
    pub async fn close_notify(&mut self) -> io::Result<()> {
        {
            let mut s = self.session.borrow_mut();
            if std::mem::replace(&mut s.shut, true) {
                return Ok(());
            }
            s.conn.send_close_notify();
            send_direct(&mut s)?;
            if !s.conn.wants_write() {
                return Ok(());
            }
        }
        // A client that does not read does not hold the connection open for long.
        let flushed = flush_records(&mut self.tcp, &self.session);
        match monoio::time::timeout(CLOSE_NOTIFY_WAIT, flushed).await {
            Ok(res) => res,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    /// A handle for reading ahead while a write is in flight ([`ReadAhead`]).
    pub fn read_ahead(&self) -> ReadAhead {
        ReadAhead(self.session.clone())
    }

    /// Whether nothing the peer sent waits inside the session: no ciphertext read and not
    /// yet decrypted, no part of a record, no plaintext not yet read, no close_notify. A
    /// connection going back to a pool must be so (what its socket holds, a peek sees):
    /// bytes past the end of an answer would be read as the next request's.
    pub fn drained(&self) -> bool {
        let mut s = self.session.borrow_mut();
        let s = &mut *s;
        s.rpos == s.rx.len()
            && !s.eof
            && s.records.at_boundary()
            && s.conn
                .process_new_packets()
                .is_ok_and(|io| io.plaintext_bytes_to_read() == 0 && !io.peer_has_closed())
    }

    /// Whether the peer's end of the stream came without close_notify (a read gave `Ok(0)`
    /// for it): RFC 9112 9.8 takes a body that ends with the connection for cut short then.
    pub fn truncated(&self) -> bool {
        self.session.borrow().truncated
    }

    /// A handle that tells [`TlsStream::truncated`] once the stream is split.
    pub fn truncation(&self) -> Truncation {
        Truncation(self.session.clone())
    }

    /// The SNI name the client sent, lower-case.
    pub fn sni(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    /// Whether ALPN chose `h2`.
    pub fn is_h2(&self) -> bool {
        self.h2
    }

    /// The two halves of a tunnel.
    pub fn split(self) -> (TlsReadHalf, TlsWriteHalf) {
        self.session.borrow_mut().split = true;
        let (r, w) = self.tcp.into_split();
        (
            TlsReadHalf {
                tcp: r,
                session: self.session.clone(),
            },
            TlsWriteHalf {
                tcp: w,
                session: self.session,
            },
        )
    }
}

impl AsRawFd for TlsStream {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp.as_raw_fd()
    }
}

impl AsyncReadRent for TlsStream {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        read_owned(&mut self.tcp, &self.session, buf, None).await
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        readv_first(self, buf).await
    }
}

impl CancelableAsyncReadRent for TlsStream {
    async fn cancelable_read<T: IoBufMut>(
        &mut self,
        buf: T,
        c: CancelHandle,
    ) -> BufResult<usize, T> {
        read_owned(&mut self.tcp, &self.session, buf, Some(c)).await
    }

    async fn cancelable_readv<T: IoVecBufMut>(
        &mut self,
        buf: T,
        _c: CancelHandle,
    ) -> BufResult<usize, T> {
        readv_first(self, buf).await
    }
}

/// A vectored read into the first iovec only (nothing here scatters client reads).
async fn readv_first<T: IoVecBufMut>(s: &mut TlsStream, mut buf: T) -> BufResult<usize, T> {
    // SAFETY: the iovec array belongs to `buf` and stays valid while it lives.
    let first = unsafe {
        std::slice::from_raw_parts(buf.write_iovec_ptr(), buf.write_iovec_len())
            .first()
            .copied()
    };
    let Some(iov) = first else {
        return (Ok(0), buf);
    };
    let mut tmp = Vec::with_capacity(iov.iov_len);
    let (res, tmp2) = read_owned(&mut s.tcp, &s.session, std::mem::take(&mut tmp), None).await;
    if let Ok(n) = res {
        // SAFETY: the iovec describes `iov_len` writable bytes owned by `buf`, and `n` is at
        // most that.
        unsafe {
            std::ptr::copy_nonoverlapping(tmp2.as_ptr(), iov.iov_base.cast::<u8>(), n);
            buf.set_init(n);
        }
    }
    (res, buf)
}

impl AsyncWriteRent for TlsStream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        write_buf(&mut self.tcp, &self.session, buf).await
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        write_iovecs(&mut self.tcp, &self.session, buf).await
    }

    async fn flush(&mut self) -> io::Result<()> {
        flush_records(&mut self.tcp, &self.session).await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        close(&mut self.tcp, &self.session).await
    }
}

/// A TLS session's plaintext entrance, for a writer that builds its output in pieces (the
/// HTTP/2 frame writer): bytes pushed are encrypted into records at once, without being
/// buffered first, and go out with the write half's next `flush`. Taking it makes every
/// flush of the session go straight to the socket: that writer has one flush in flight at a
/// time, so a small one left to the runtime would hold back the frames after it until the
/// event loop's next turn.
pub struct PlainQueue(Shared);

impl PlainQueue {
    /// The largest plaintext of one record (RFC 8446 5.1): pushes of whole multiples of it
    /// fill every record.
    pub const RECORD: usize = 16 * 1024;

    /// Encrypts `pieces` as one run of records (a record may span pieces).
    pub fn push(&self, pieces: &[io::IoSlice<'_>]) -> io::Result<()> {
        queue_plain(&self.0, pieces).map(|_| ())
    }

    /// Whether records are waiting to be written.
    pub fn pending(&self) -> bool {
        self.0.borrow().conn.wants_write()
    }
}

impl std::fmt::Debug for PlainQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlainQueue")
    }
}

impl TlsWriteHalf {
    /// The session's [`PlainQueue`].
    pub fn plain_queue(&self) -> PlainQueue {
        self.session.borrow_mut().always_direct = true;
        PlainQueue(self.session.clone())
    }
}

/// The read half of a split [`TlsStream`].
pub struct TlsReadHalf {
    tcp: OwnedReadHalf<TcpStream>,
    session: Shared,
}

/// Tells whether a TLS stream's peer ended it without close_notify ([`TlsStream::truncation`]).
pub struct Truncation(Shared);

impl Truncation {
    pub fn get(&self) -> bool {
        self.0.borrow().truncated
    }
}

impl std::fmt::Debug for Truncation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Truncation")
    }
}

/// The write half of a split [`TlsStream`].
pub struct TlsWriteHalf {
    tcp: OwnedWriteHalf<TcpStream>,
    session: Shared,
}

impl std::fmt::Debug for TlsReadHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsReadHalf")
    }
}

impl std::fmt::Debug for TlsWriteHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsWriteHalf")
    }
}

impl AsyncReadRent for TlsReadHalf {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        read_owned(&mut self.tcp, &self.session, buf, None).await
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        (Err(io::ErrorKind::Unsupported.into()), buf)
    }
}

impl AsyncWriteRent for TlsWriteHalf {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        write_buf(&mut self.tcp, &self.session, buf).await
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        write_iovecs(&mut self.tcp, &self.session, buf).await
    }

    async fn flush(&mut self) -> io::Result<()> {
        flush_records(&mut self.tcp, &self.session).await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        close(&mut self.tcp, &self.session).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::config::{CertificateConfig, ListenerTlsConfig};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    use std::sync::Arc;
    use std::time::Duration;

    const PEM: &str = include_str!("../../common/testdata/api.pem");
    const KEY: &str = include_str!("../../common/testdata/api.key");
    /// Far more than the two small socket buffers below can hold.
    const BODY: usize = 4 * 1024 * 1024;

    #[test]
    fn records_are_followed_across_any_split() {
        // Two records (bodies of 3 and 300 bytes) and the header of a third.
        let mut data = vec![23, 3, 3, 0, 3, 1, 2, 3, 23, 3, 3, 1, 44];
        data.extend(std::iter::repeat_n(7u8, 300));
        let whole = data.len();
        data.extend([23, 3, 3, 0]);
        for cut in 0..=data.len() {
            let mut r = Records::default();
            r.advance(&data[..cut]);
            let mut end = r;
            end.advance(&data[cut..]);
            assert!(!end.at_boundary(), "cut {cut}: inside the third header");
            let mut upto = Records::default();
            upto.advance(&data[..cut.min(whole)]);
            upto.advance(&data[cut.min(whole)..whole]);
            assert!(upto.at_boundary(), "cut {cut}");
            let boundary = [0, 8, whole].contains(&cut);
            assert_eq!(r.at_boundary(), boundary, "cut {cut}");
        }
    }

    fn byte(i: usize) -> u8 {
        (i % 251) as u8
    }

    fn server_tls() -> ListenerTls {
        let mut entry = CertificateConfig {
            id: "c".into(),
            cert_pem: Some(PEM.into()),
            key_pem: Some(KEY.into()),
            ..Default::default()
        };
        let cert = common::tls::compile_certificate(&mut entry, "c").unwrap();
        let tls = ListenerTlsConfig {
            certificates: vec!["c".into()],
            min_version: "1.2".into(),
            alpn: vec!["http/1.1".into()],
        };
        common::tls::compile_listener(&tls, vec![Arc::new(cert)], "l", "127.0.0.1:0").unwrap()
    }

    /// The client's check of the server: its certificate is the test one (a self-signed CA
    /// certificate, which rustls's own verifier refuses as an end entity), and its signatures
    /// verify.
    #[derive(Debug)]
    struct TrustTheTestCertificate;

    impl rustls::client::danger::ServerCertVerifier for TrustTheTestCertificate {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &rustls::pki_types::ServerName<'_>,
            _ocsp: &[u8],
            _now: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            let expected = CertificateDer::from_pem_slice(PEM.as_bytes()).unwrap();
            if end_entity.as_ref() != expected.as_ref() {
                return Err(rustls::Error::General("not the test certificate".into()));
            }
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            algorithms().supported_schemes()
        }
    }

    fn algorithms() -> rustls::crypto::WebPkiSupportedAlgorithms {
        common::tls::provider().signature_verification_algorithms
    }

    fn client_config() -> Arc<rustls::ClientConfig> {
        let config = rustls::ClientConfig::builder_with_provider(common::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(TrustTheTestCertificate))
            .with_no_client_auth();
        Arc::new(config)
    }

    /// Passes each side's records to the other until neither has more to send.
    fn converse(client: &mut rustls::ClientConnection, server: &mut ServerConnection) {
        let mut wire = Vec::new();
        loop {
            wire.clear();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            let from_client = !wire.is_empty();
            if from_client {
                server.read_tls(&mut &wire[..]).unwrap();
                server.process_new_packets().unwrap();
            }
            wire.clear();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            if wire.is_empty() && !from_client {
                return;
            }
            client.read_tls(&mut &wire[..]).unwrap();
            client.process_new_packets().unwrap();
        }
    }

    #[test]
    fn a_client_hello_that_offers_a_session_to_resume_is_told_apart() {
        let server = server_tls();
        let config = client_config();
        let name = || "api.example".try_into().unwrap();
        let hello = |client: &mut rustls::ClientConnection| {
            let mut out = Vec::new();
            client.write_tls(&mut out).unwrap();
            out
        };
        // The first connection has nothing to resume; its full handshake leaves tickets.
        let mut client = rustls::ClientConnection::new(config.clone(), name()).unwrap();
        let first = hello(&mut client);
        assert!(!offers_resumption(&first));
        let mut conn = ServerConnection::new(server.config.clone()).unwrap();
        conn.read_tls(&mut &first[..]).unwrap();
        conn.process_new_packets().unwrap();
        converse(&mut client, &mut conn);
        assert!(!client.is_handshaking());
        // The next offers one of them.
        let mut client = rustls::ClientConnection::new(config, name()).unwrap();
        let second = hello(&mut client);
        assert!(offers_resumption(&second));
        // Cut short, or not a ClientHello: no.
        assert!(!offers_resumption(&second[..second.len() - 1]));
        assert!(!offers_resumption(&second[..40]));
        assert!(!offers_resumption(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!offers_resumption(&[]));
    }

    /// A client with an 8 KiB receive buffer that waits before reading, then reads the body
    /// (`None`: it ended first) and the end of the stream.
    fn slow_client(
        addr: std::net::SocketAddr,
    ) -> std::thread::JoinHandle<(Option<Vec<u8>>, usize)> {
        std::thread::spawn(move || {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket.set_recv_buffer_size(8 * 1024).unwrap();
            socket.connect(&addr.into()).unwrap();
            let rcvbuf = socket.recv_buffer_size().unwrap();
            let tcp: std::net::TcpStream = socket.into();
            let conn =
                rustls::ClientConnection::new(client_config(), "api.example".try_into().unwrap())
                    .unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            // The handshake, then a pause: the server's writes fill both buffers meanwhile.
            tls.write_all(b"go").unwrap();
            tls.flush().unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let mut got = vec![0u8; BODY];
            let whole = tls.read_exact(&mut got).is_ok();
            // Then the end of the stream, without close_notify.
            let after = tls.read(&mut [0u8; 16]);
            assert!(
                matches!(&after, Err(e) if e.kind() == io::ErrorKind::UnexpectedEof),
                "{after:?}"
            );
            (whole.then_some(got), rcvbuf)
        })
    }

    #[test]
    fn a_write_the_socket_cannot_take_at_once_is_out_whole_when_it_returns() {
        for uring in [true, false] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let client = slow_client(listener.local_addr().unwrap());
            let serve = async move {
                let (std_tcp, _) = listener.accept().unwrap();
                let sock = socket2::SockRef::from(&std_tcp);
                sock.set_send_buffer_size(8 * 1024).unwrap();
                let sndbuf = sock.send_buffer_size().unwrap();
                let tcp = TcpStream::from_std(std_tcp).unwrap();
                let deadline = Instant::now() + Duration::from_secs(10);
                let Ok(mut tls) = accept(tcp, &server_tls(), deadline).await else {
                    panic!("handshake failed");
                };
                let (res, _) = tls.read(vec![0u8; 16]).await;
                assert_eq!(res.unwrap(), 2);
                // One write of 4 MiB: the socket takes a few KiB at once, the rest goes
                // through `tx` and the runtime's write.
                let body: Vec<u8> = (0..BODY).map(byte).collect();
                let (res, _) = tls.write(body).await;
                assert_eq!(res.unwrap(), BODY);
                // Ended at once, with no flush or close_notify after the write: what the
                // client reads is what the write itself handed to the kernel. (The FIN is
                // sent here rather than left to the close, which the io_uring driver makes
                // asynchronous.)
                // SAFETY: shutdown on the stream's own open socket.
                assert_eq!(unsafe { libc::shutdown(tls.as_raw_fd(), libc::SHUT_WR) }, 0);
                drop(tls);
                sndbuf
            };
            let sndbuf = crate::io::block_on_driver(uring, serve);
            let (got, rcvbuf) = client.join().unwrap();
            assert!(
                (sndbuf + rcvbuf) * 8 < BODY,
                "the buffers ({sndbuf} + {rcvbuf} bytes) would hold most of the body"
            );
            let got = got.unwrap_or_else(|| panic!("the body arrived cut short (uring: {uring})"));
            assert!(
                got.iter().enumerate().all(|(i, &b)| b == byte(i)),
                "uring: {uring}"
            );
        }
    }
}
