//! TLS on client connections: the handshake, and [`TlsStream`], a client stream that
//! decrypts and encrypts with rustls on top of monoio's owned-buffer TCP I/O.
//!
//! Hot path for HTTPS. Ciphertext is read into one reused buffer per connection, fed to
//! rustls, and the plaintext is copied once into the caller's buffer; plaintext to send is
//! encrypted as one run of records (a vectored head and body fill whole records, however many
//! pieces they come in) and written from one reused buffer with one `write_all`, so they go
//! out as one TCP write. (Encrypting needs the copy; nothing else copies.)
//!
//! For a tunnel the stream splits into a read half and a write half over monoio's split TCP
//! halves, sharing the rustls session (borrowed only for synchronous calls, never across an
//! await). TLS output that reading produces (a KeyUpdate answer) goes out with the next
//! write, so the two halves never write records concurrently.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent,
    OwnedReadHalf, OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;
use monoio::BufResult;
use rustls::server::ServerConnection;
use rustls::ServerConfig;

/// Ciphertext read per TCP read: one full TLS record and its overhead.
const RECORD_BUF: usize = 16 * 1024 + 512;

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
    conn: ServerConnection,
    /// Ciphertext read from TCP and not yet given to rustls: `rx[rpos..]`.
    rx: Vec<u8>,
    rpos: usize,
    /// Records to send, reused.
    tx: Vec<u8>,
    /// TCP reached end of stream.
    eof: bool,
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
/// passes. Bytes the client sent after its last handshake message stay buffered. A failure
/// hands the connection back still open, so the caller can count it before the client sees
/// the close.
pub(crate) async fn accept(
    mut tcp: TcpStream,
    config: Arc<ServerConfig>,
    deadline: Instant,
) -> Result<TlsStream, (HandshakeFailure, TcpStream)> {
    let mut conn = match ServerConnection::new(config) {
        Ok(conn) => conn,
        Err(_) => return Err((HandshakeFailure::Other, tcp)),
    };
    // Every write is flushed at once, so the outgoing records never pile up; without a
    // limit a large write is encrypted whole instead of failing part way.
    conn.set_buffer_limit(None);
    let session = Rc::new(RefCell::new(Session {
        conn,
        rx: Vec::with_capacity(RECORD_BUF),
        rpos: 0,
        tx: Vec::new(),
        eof: false,
    }));
    let shake = async {
        loop {
            {
                // TLS 1.3: once the client's Finished is in, all that is left to send are
                // session tickets. They go out in the same write as the first answer rather
                // than in a write of their own, which a request would wait behind (the client
                // does not wait for them; TLS 1.2's last flight is flushed below as before).
                let s = session.borrow();
                if !s.conn.is_handshaking()
                    && s.conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3)
                {
                    return Ok(());
                }
            }
            flush_records(&mut tcp, &session)
                .await
                .map_err(|_| HandshakeFailure::Closed)?;
            if !session.borrow().conn.is_handshaking() {
                return Ok(());
            }
            match fill(&mut tcp, &session, None).await {
                Ok(true) => {}
                Ok(false) | Err(Fill::Io) => return Err(HandshakeFailure::Closed),
                Err(Fill::Tls(e)) => {
                    // Tell the client why (the alert rustls queued), best effort.
                    let _ = flush_records(&mut tcp, &session).await;
                    return Err(HandshakeFailure::of(&e));
                }
            }
        }
    };
    match monoio::time::timeout_at(deadline.into(), shake).await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => return Err((why, tcp)),
        Err(_) => return Err((HandshakeFailure::Timeout, tcp)),
    }
    let (sni, h2) = {
        let s = session.borrow();
        (
            s.conn.server_name().map(Into::into),
            s.conn.alpn_protocol() == Some(b"h2"),
        )
    };
    Ok(TlsStream {
        tcp,
        session,
        sni,
        h2,
    })
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
    let mut s = session.borrow_mut();
    let s = &mut *s;
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
    s.rpos += before - pending.len();
    s.conn.process_new_packets().map_err(Fill::Tls)?;
    Ok(true)
}

/// Writes every record rustls has queued.
async fn flush_records<W: AsyncWriteRent>(
    tcp: &mut W,
    session: &RefCell<Session>,
) -> io::Result<()> {
    let tx = {
        let mut s = session.borrow_mut();
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
            // End of TCP without close_notify: for HTTP the same as a close.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return (Ok(0), buf),
            Err(e) => return (Err(e), buf),
        }
        match fill(tcp, session, cancel.clone()).await {
            Ok(_) => {}
            Err(Fill::Io) => return (Err(io::ErrorKind::ConnectionReset.into()), buf),
            Err(Fill::Tls(e)) => return (Err(io::Error::new(io::ErrorKind::InvalidData, e)), buf),
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
    let queued = session.borrow_mut().conn.writer().write_all(plain);
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
    // The session has no buffer limit, so it takes everything or fails.
    match session.borrow_mut().conn.writer().write_vectored(pieces)? {
        n if n == len => Ok(n),
        _ => Err(io::ErrorKind::WriteZero.into()),
    }
}

/// Sends close_notify, then half-closes TCP.
async fn close<W: AsyncWriteRent>(tcp: &mut W, session: &RefCell<Session>) -> io::Result<()> {
    session.borrow_mut().conn.send_close_notify();
    flush_records(tcp, session).await?;
    tcp.shutdown().await
}

impl TlsStream {
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
/// buffered first, and go out with the write half's next `flush`.
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
        PlainQueue(self.session.clone())
    }
}

/// The read half of a split [`TlsStream`].
pub struct TlsReadHalf {
    tcp: OwnedReadHalf<TcpStream>,
    session: Shared,
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
