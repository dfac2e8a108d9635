//! HTTP/2 with clients: ALPN `h2` on TLS listeners and prior knowledge on `h2c` listeners.
//!
//! The `h2` crate speaks the protocol (framing, HPACK, flow control, and the limits against
//! rapid reset, CONTINUATION floods and oversized header lists). Each stream becomes one
//! request on the same path an HTTP/1.1 request takes: its head is written as an HTTP/1.1
//! head and read through [`H2Stream`], a client stream whose reads give that head and then
//! the body (chunked when the client sent no length), and whose writes take the HTTP/1.1
//! answer apart into a HEADERS frame and DATA frames. Routing, policies, aggregation,
//! profiles, the access log and the metrics therefore behave exactly as over HTTP/1.1.
//!
//! The connection's socket is driven through [`PollIo`], which lends monoio's owned-buffer
//! reads and writes to h2's poll-based I/O (one in flight each way); on TLS its frames go
//! straight into the session's records.
//!
//! Hot path. Per stream: one task, the request path's future boxed once, its buffers, the
//! synthesised head, the answer's header map (values are slices of the answer's bytes, not
//! copies), and h2's own bookkeeping; per body piece one `Bytes`: a large piece is the
//! relay's buffer itself ([`ClientStream::write_spent`]), a small one a copy into the
//! connection's scratch. On TLS a body byte is copied twice in user space (into a record to
//! encrypt it, and rustls's records into the buffer of the TCP write), on h2c once (into
//! PollIo's write buffer). The answer's HTTP/1.1 head is read back by walking its lines
//! ([`AnswerLines`]), not parsed again. About 39,600 user-space instructions per proxied
//! request against nginx's 23,600 (`docs/perf/tls-2cpu.md`), a third of them in the `h2`
//! crate's connection (frames, HPACK, flow control); the next saving on our side is a seam
//! that hands the parsed upstream head to the stream, and the request the same way.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use ::h2::server::SendResponse;
use ::h2::{Reason, RecvStream, SendStream};
use bytes::{Buf, Bytes, BytesMut};
use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent,
};
use monoio::BufResult;

use super::stream::{ClientStream, Scheme, WriteHalf};
use crate::peer::Peer;
use crate::tls::PlainQueue;
use crate::worker::Contained;
use crate::worker_ctx::WorkerCtx;

/// The client connection preface of RFC 9113 3.4.
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The preface's first part, `PRI * HTTP/2.0` and an empty line: what an HTTP/1.1 parser
/// reads as a (refused) request head, and what tells an `h2c` listener a client speaks HTTP/2.
pub(crate) const PREFACE_HEAD: &[u8] = PREFACE.split_at(18).0;

/// Bytes of frames queued before a write waits for the socket.
const WRITE_BUF: usize = 64 * 1024;
/// On TLS, the smallest rest of a write (beyond whole records) that goes into a record of
/// its own at once instead of waiting in `wbuf` for the next write.
const SEAL_TAIL: usize = 4 * 1024;
/// The least a connection's answer scratch, or its write buffer, is given at once: they grow
/// as answers need (to 64 KiB and more under large answers) and are given back when the
/// connection is idle, so that one serving small answers holds little.
const SCRATCH: usize = 4 * 1024;
/// How often an idle or draining connection is looked at.
const TICK: Duration = Duration::from_millis(500);

/// Serves one HTTP/2 connection until it closes; `prefix` is what was already read of it.
pub(crate) async fn serve<S: ClientStream>(
    ctx: Rc<WorkerCtx>,
    stream: S,
    prefix: &[u8],
    peer: Peer,
) {
    let snap = ctx.snapshot();
    let h = &snap.http2;
    let conn_info = Rc::new(ConnInfo {
        fd: stream.as_raw_fd(),
        sni: stream.sni().map(Into::into),
        scheme: stream.scheme(),
        open: Cell::new(0),
        last_end: Cell::new(Instant::now()),
        resets: Cell::new(0),
        streams: Cell::new(0),
        max_resets: h.max_pending_resets,
        client_send: snap.timeouts.client_send,
        waker: RefCell::new(None),
        scratch: RefCell::new(BytesMut::new()),
    });
    let (r, w) = stream.into_halves();
    // Set while no stream is served: the connection's write buffers go back to the
    // allocator, as does its answer scratch (before, an idle connection held about 200 KiB).
    let idle = Rc::new(Cell::new(false));
    let io = PollIo::new(r, w, prefix).releasing_when(idle.clone());
    let mut builder = ::h2::server::Builder::new();
    builder
        .max_concurrent_streams(h.max_concurrent_streams)
        .max_header_list_size(h.max_header_list_size)
        .initial_window_size(h.initial_stream_window)
        .initial_connection_window_size(h.initial_connection_window)
        .max_pending_accept_reset_streams(h.max_pending_resets as usize)
        .max_concurrent_reset_streams(h.max_pending_resets as usize)
        .max_local_error_reset_streams(Some(1024))
        .max_send_buffer_size(WRITE_BUF * 4);
    let (handshake_timeout, idle_timeout) =
        (snap.timeouts.client_header, snap.timeouts.client_idle);
    drop(snap);
    let mut conn =
        match monoio::time::timeout(handshake_timeout, builder.handshake::<_, Bytes>(io)).await {
            Ok(Ok(conn)) => conn,
            _ => return,
        };
    let mut tick = Box::pin(monoio::time::sleep(TICK));
    let mut goaway_at: Option<Instant> = None;
    // Set once `abrupt_shutdown` has been asked for (rapid reset, or an idle client that never
    // answers the GOAWAY's PING): it is asked for once.
    let mut aborted = false;
    loop {
        let event = poll_fn(|cx| {
            if !aborted && conn_info.too_many_resets() {
                // Too many streams cancelled while being answered: rapid reset.
                conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                aborted = true;
            }
            {
                let mut w = conn_info.waker.borrow_mut();
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
            }
            if let Poll::Ready(next) = conn.poll_accept(cx) {
                return Poll::Ready(Some(next));
            }
            if tick.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        match event {
            Some(Some(Ok((req, respond)))) => {
                idle.set(false);
                let info = conn_info.clone();
                let ctx = ctx.clone();
                info.open.set(info.open.get() + 1);
                info.streams.set(info.streams.get() + 1);
                monoio::spawn(async move {
                    // A panic in one stream's request path is contained like a connection's:
                    // that stream is reset (its handles drop), the worker goes on.
                    let served = Contained(serve_request(ctx, &info, req, respond, peer)).await;
                    if served.is_err() {
                        log::error!(
                            "an HTTP/2 stream task panicked (message above); that stream was \
                             reset and the worker goes on"
                        );
                    }
                    info.open.set(info.open.get() - 1);
                    info.last_end.set(Instant::now());
                });
            }
            // A protocol error (h2 has sent its GOAWAY) or the client went away.
            Some(Some(Err(e))) => {
                log::debug!("http/2 connection from {}: {e}", peer.ip);
                break;
            }
            Some(None) => break,
            None => {
                tick = Box::pin(monoio::time::sleep(TICK));
                if conn_info.open.get() == 0 && !idle.get() {
                    // Nothing served since the last tick: the buffers are let go (the write
                    // buffers at the flush this loop's next poll makes).
                    idle.set(true);
                    *conn_info.scratch.borrow_mut() = BytesMut::new();
                }
                let idle =
                    conn_info.open.get() == 0 && conn_info.last_end.get().elapsed() >= idle_timeout;
                // Its listener's TLS or `h2c` changed since it was accepted: it ends as in
                // a drain, its streams finishing (before: it went on for good).
                let outdated = goaway_at.is_none() && {
                    let tls = conn_info.scheme == super::stream::Scheme::Https;
                    super::outdated(&ctx.config.load(), peer.listener, tls, !tls)
                };
                match goaway_at {
                    None if ctx.draining.get() || idle || outdated => {
                        // GOAWAY with the last stream id: streams already open finish.
                        conn.graceful_shutdown();
                        goaway_at = Some(Instant::now());
                    }
                    // The graceful GOAWAY's last one goes out when the client answers its
                    // PING: one that never does, with no stream left (none being served,
                    // none with answer bytes still queued in h2; or only a header block
                    // never finished) and nothing of ours left unread, is closed anyway.
                    // Not while it still reads an answer: closing with its acknowledgements
                    // unread would reset the connection and lose what it has not read.
                    Some(at)
                        if !aborted
                            && conn_info.open.get() == 0
                            && !conn.has_streams()
                            && at.elapsed() >= 2 * TICK
                            && crate::io::send_queued(conn_info.fd) == Some(0) =>
                    {
                        conn.abrupt_shutdown(Reason::NO_ERROR);
                        aborted = true;
                    }
                    _ => {}
                }
            }
        }
    }
    // Let the last frames (GOAWAY, final DATA) out.
    let _ = monoio::time::timeout(Duration::from_secs(1), poll_fn(|cx| conn.poll_closed(cx))).await;
}

/// What the streams of one connection share.
struct ConnInfo {
    fd: std::os::fd::RawFd,
    sni: Option<Box<str>>,
    scheme: Scheme,
    /// Streams being served.
    open: Cell<u32>,
    /// When the last stream ended (for the idle timeout).
    last_end: Cell<Instant>,
    /// Streams the client reset before their answer was complete.
    resets: Cell<u32>,
    /// Streams accepted on the connection.
    streams: Cell<u32>,
    /// More than this many resets, when they are also more than half of the streams,
    /// closes the connection with ENHANCE_YOUR_CALM.
    max_resets: u32,
    /// How long an answer waits for the client to open its flow-control window
    /// (`client_send_ms`): a client that keeps it shut has stopped reading.
    client_send: Duration,
    /// Wakes the connection task (to act on `resets`).
    waker: RefCell<Option<Waker>>,
    /// Where answer bytes are copied to become the `Bytes` h2 sends: one allocation reused
    /// for the connection's answers once h2 has sent what was cut from it before.
    scratch: RefCell<BytesMut>,
}

impl ConnInfo {
    /// `pieces` (`len` bytes in all) copied into one `Bytes` for h2.
    fn copy_in<'a>(&self, pieces: impl Iterator<Item = &'a [u8]>, len: usize) -> Bytes {
        let mut scratch = self.scratch.borrow_mut();
        if scratch.capacity() < len {
            // Reclaims the allocation when every `Bytes` cut from it before has been
            // dropped; otherwise a new one, never smaller than the last.
            scratch.reserve(len.max(SCRATCH));
        }
        pieces.for_each(|p| scratch.extend_from_slice(p));
        scratch.split().freeze()
    }

    /// Rapid reset: many streams cancelled while being answered, and most of them. A
    /// browser cancels some streams as a page changes; an attack cancels nearly all.
    fn too_many_resets(&self) -> bool {
        let resets = self.resets.get();
        resets > self.max_resets && u64::from(resets) * 2 > u64::from(self.streams.get())
    }

    /// Counts a stream the client reset mid-answer, or one the gateway reset as malformed.
    fn reset_by_client(&self) {
        self.resets.set(self.resets.get() + 1);
        if self.too_many_resets() {
            if let Some(w) = self.waker.borrow().as_ref() {
                w.wake_by_ref();
            }
        }
    }
}

async fn serve_request(
    ctx: Rc<WorkerCtx>,
    info: &Rc<ConnInfo>,
    req: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
    peer: Peer,
) {
    let (parts, body) = req.into_parts();
    // Malformed (RFC 9113 8.3.1 and 8.2.1): a request without a path is not served as `/`;
    // an `:authority` with userinfo, an empty `host` (h2 refuses an empty `:authority`), a
    // `host` that is not the `:authority`, or a value with whitespace at either end, not
    // forwarded.
    let userinfo = parts
        .uri
        .authority()
        .is_some_and(|a| a.as_str().contains('@'));
    let empty_host = parts
        .headers
        .get_all(http::header::HOST)
        .iter()
        .any(|v| v.is_empty());
    // A `host` naming another authority than `:authority` (RFC 9113 8.3.1: a server
    // SHOULD treat it as malformed): which one the client meant is a guess.
    let other_host = parts.uri.authority().is_some_and(|a| {
        let default_port = match parts.uri.scheme_str() {
            Some("https") => ":443",
            _ => ":80",
        };
        let a = canonical_host(a.as_str().as_bytes(), default_port);
        parts
            .headers
            .get_all(http::header::HOST)
            .iter()
            .any(|h| !canonical_host(h.as_bytes(), default_port).eq_ignore_ascii_case(a))
    });
    if !has_path(&parts)
        || userinfo
        || empty_host
        || other_host
        || parts.headers.values().any(|v| padded(v.as_bytes()))
    {
        let mut respond = respond;
        respond.send_reset(Reason::PROTOCOL_ERROR);
        // Counted as a client's reset is: a connection that sends little else is ended
        // (GOAWAY ENHANCE_YOUR_CALM), as one resetting its streams is (h2 counts only the
        // resets it makes itself).
        info.reset_by_client();
        // Logged as a malformed HTTP/1.1 request is (`400`, `bad_request`), though its
        // answer is the reset: an attack of such requests shows in the access log.
        let snap = ctx.snapshot();
        let mut req = super::context::RequestCtx::new(peer.ip);
        let target = parts.uri.path_and_query().map_or("", |pq| pq.as_str());
        let line = (parts.method.as_str().as_bytes(), target.as_bytes());
        req.begin_unparsed(&ctx, &snap, peer.ip, Some(line), &[]);
        req.error = Some(crate::error::ErrorKind::BadRequest);
        req.finish(&ctx, &snap);
        return;
    }
    // A body that came whole with its head (and without trailers) goes on with its length,
    // as nginx sends a buffered one, rather than chunked: some origins refuse a chunked GET
    // (an empty DATA frame with END_STREAM after the HEADERS), and a length is cheaper.
    let mut body = body;
    let mut early = BytesMut::new();
    let whole = if body.is_end_stream() {
        Some(0)
    } else if parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        None
    } else {
        ready_whole(&mut body, &mut early).then_some(early.len())
    };
    let (head, chunked) = request_head(&parts, whole);
    let stream = H2Stream {
        info: info.clone(),
        head,
        head_pos: 0,
        body: Some(body),
        chunked,
        pending: Bytes::new(),
        early_end: whole.is_some() && !early.is_empty(),
        early,
        respond: Rc::new(RefCell::new(Some(respond))),
        send: None,
        answer: Answer::Head(Vec::new()),
        head_request: parts.method == http::Method::HEAD,
        malformed: false,
    };
    super::serve_h2_stream(ctx, stream, peer).await;
}

/// A host as it is compared with another: without the scheme's default port and without
/// a trailing dot (`example.com.:80` is `example.com`).
fn canonical_host<'a>(host: &'a [u8], default_port: &str) -> &'a [u8] {
    let host = host.strip_suffix(default_port.as_bytes()).unwrap_or(host);
    host.strip_suffix(b".").unwrap_or(host)
}

/// Whether a field value starts or ends with whitespace (SP or HTAB).
fn padded(v: &[u8]) -> bool {
    let ws = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
    ws(v.first()) || ws(v.last())
}

/// Whether a request that needs a `:path` (all but CONNECT) came with one. h2 refuses an
/// empty one, and a missing one beside an `:authority`; with neither, the request's URI is
/// empty, and its path and query would read as `/` (`Uri::path` alone gives "").
fn has_path(parts: &http::request::Parts) -> bool {
    parts.method == http::Method::CONNECT || !parts.uri.path().is_empty()
}

/// The most of a request body taken with its head to send it with its length.
const WHOLE_BODY: usize = 64 * 1024;

/// What a request body's failure is: h2's own reset of the stream, for a malformed request
/// (its DATA against its `content-length`, RFC 9113 8.1.1), a bad request; anything else
/// (the client's reset, the connection's end, a GOAWAY) the client gone.
pub(super) fn body_error(e: &::h2::Error) -> crate::error::ErrorKind {
    match e.is_reset() && e.is_library() {
        true => crate::error::ErrorKind::BadRequest,
        false => crate::error::ErrorKind::ClientClosed,
    }
}

/// What an HTTP/2 client's body stream has ready right now, without waiting, appended to
/// `out` (up to `limit` bytes, and the rest of the DATA frame that reaches it): whether the
/// body has ended. The end of the data is not the end while trailers wait (`is_end_stream`
/// says no): such a body is relayed as it comes, trailers and all.
pub(super) fn take_ready(
    body: &mut RecvStream,
    out: &mut BytesMut,
    limit: usize,
) -> Result<bool, crate::error::ErrorKind> {
    let mut cx = Context::from_waker(Waker::noop());
    while out.len() < limit {
        if body.is_end_stream() {
            return Ok(true);
        }
        match body.poll_data(&mut cx) {
            Poll::Ready(Some(Ok(data))) => {
                let _ = body.flow_control().release_capacity(data.len());
                out.extend_from_slice(&data);
            }
            Poll::Ready(Some(Err(e))) => return Err(body_error(&e)),
            Poll::Ready(None) => return Ok(body.is_end_stream()),
            Poll::Pending => return Ok(false),
        }
    }
    Ok(body.is_end_stream())
}

/// Takes the request body's bytes already here into `early`: whether that is all of it (at
/// most [`WHOLE_BODY`]), with no trailers after it. A failed stream is not whole; its
/// failure comes with its next read.
fn ready_whole(body: &mut RecvStream, early: &mut BytesMut) -> bool {
    take_ready(body, early, WHOLE_BODY).unwrap_or(false) && early.len() <= WHOLE_BODY
}

/// The HTTP/1.1 head of an HTTP/2 request (RFC 9113 8.3.1 and 8.2.3): the request line from
/// the pseudo-headers, `Host` from `:authority`, cookies joined into one field, and
/// `Transfer-Encoding: chunked` when a body follows without a length (`Content-Length` when
/// `whole` gives the length of a body all here already; 0: none, `None`: one still coming).
/// Returns the head and whether the body is to be chunked.
fn request_head(parts: &http::request::Parts, whole: Option<usize>) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    if parts.method == http::Method::CONNECT {
        out.extend_from_slice(parts.uri.authority().map_or("", |a| a.as_str()).as_bytes());
    } else {
        match parts.uri.path_and_query() {
            Some(pq) if !pq.as_str().is_empty() => out.extend_from_slice(pq.as_str().as_bytes()),
            _ => out.push(b'/'),
        }
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let authority = parts.uri.authority().map(|a| a.as_str());
    if let Some(a) = authority {
        super::push_field(&mut out, b"host", a.as_bytes());
    }
    let mut cookie: Option<Vec<u8>> = None;
    let mut has_length = false;
    for (name, value) in parts.headers.iter() {
        let n = name.as_str();
        match n {
            "host" if authority.is_some() => continue,
            "cookie" => {
                // Crumbs joined with "; " (RFC 9113 8.2.3); an empty one adds nothing.
                let c = cookie.get_or_insert_with(Vec::new);
                if !value.is_empty() {
                    if !c.is_empty() {
                        c.extend_from_slice(b"; ");
                    }
                    c.extend_from_slice(value.as_bytes());
                }
                continue;
            }
            n if connection_specific(n) => continue,
            "content-length" => has_length = true,
            _ => {}
        }
        super::push_field(&mut out, n.as_bytes(), value.as_bytes());
    }
    if let Some(c) = cookie {
        super::push_field(&mut out, b"cookie", &c);
    }
    let chunked = whole.is_none() && !has_length;
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    // No body: no length either, but for a method whose requests carry content (RFC 9110
    // 8.6: a POST's `Content-Length: 0`, which some servers require, 411 otherwise).
    let content = matches!(
        parts.method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH
    );
    if let (Some(len), false) = (whole.filter(|&n| n > 0 || content), has_length) {
        out.extend_from_slice(b"content-length: ");
        crate::access_log::push_u64(&mut out, len as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (out, chunked)
}

/// Whether a lower-case field name is connection-specific (RFC 9113 8.2.2): never carried
/// between HTTP/1.1 and HTTP/2.
pub(super) fn connection_specific(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "http2-settings"
    )
}

/// Where the HTTP/1.1 answer written to an [`H2Stream`] is.
enum Answer {
    /// Collecting the head.
    Head(Vec<u8>),
    /// Relaying the body.
    Body(Framing),
    Done,
}

/// How the HTTP/1.1 answer's body is delimited.
enum Framing {
    Length(u64),
    Chunked(Dechunk),
    Close,
}

/// One HTTP/2 stream as the request path's client stream.
pub(crate) struct H2Stream {
    info: Rc<ConnInfo>,
    /// The synthesised HTTP/1.1 head, read first.
    head: Vec<u8>,
    head_pos: usize,
    body: Option<RecvStream>,
    chunked: bool,
    /// Body bytes (with chunk framing when chunked) not yet read.
    pending: Bytes,
    /// Body bytes taken from the stream as the head was read, to see whether the whole body
    /// came with it; not yet framed or read. `early_end`: the stream's end came after them.
    early: BytesMut,
    early_end: bool,
    /// Until the answer's head goes: shared with the [`ResetWatch`] that ends the
    /// exchange's waits when the client resets the stream. Borrowed only between awaits.
    respond: Rc<RefCell<Option<SendResponse<Bytes>>>>,
    send: Option<SendStream<Bytes>>,
    answer: Answer,
    head_request: bool,
    /// The request turned out malformed as its body came (h2 reset the stream, or the
    /// gateway did for a trailer): see [`ClientStream::reset_for_malformed`].
    malformed: bool,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("fd", &self.info.fd)
            .finish()
    }
}

impl H2Stream {
    /// Waits until request bytes are ready to copy (or the request has ended).
    async fn next_bytes(&mut self) -> io::Result<()> {
        while self.head_pos == self.head.len() && self.pending.is_empty() && self.body.is_some() {
            let polled = poll_fn(|cx| self.poll_body(cx)).await;
            self.take_polled(polled)?;
        }
        Ok(())
    }

    /// The request body's next piece: what `early` holds, then the stream's.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, ::h2::Error>>> {
        if !self.early.is_empty() {
            return Poll::Ready(Some(Ok(self.early.split().freeze())));
        }
        let Some(body) = self.body.as_mut().filter(|_| !self.early_end) else {
            return Poll::Ready(None);
        };
        let polled = ready!(body.poll_data(cx));
        if let Some(Ok(data)) = &polled {
            // The window reopens as the request path takes the bytes.
            let _ = body.flow_control().release_capacity(data.len());
        }
        Poll::Ready(polled)
    }

    /// Takes a piece of the request body into `pending`, chunk-framed when the synthesised
    /// head says chunked (the last chunk at the end).
    fn take_polled(&mut self, polled: Option<Result<Bytes, ::h2::Error>>) -> io::Result<()> {
        match polled {
            Some(Ok(data)) if data.is_empty() => {}
            Some(Ok(data)) => {
                self.pending = if self.chunked {
                    let mut framed = Vec::with_capacity(data.len() + 20);
                    push_hex(&mut framed, data.len());
                    framed.extend_from_slice(b"\r\n");
                    framed.extend_from_slice(&data);
                    framed.extend_from_slice(b"\r\n");
                    Bytes::from(framed)
                } else {
                    data
                }
            }
            Some(Err(e)) => {
                self.malformed |= body_error(&e) == crate::error::ErrorKind::BadRequest;
                return Err(io::Error::other(e));
            }
            None => {
                // Trailers came with the stream's end, so they are here now; they go on in
                // the last chunk (a body with a length has nowhere to carry them).
                let trailers = self.body.as_mut().and_then(|body| {
                    match body.poll_trailers(&mut Context::from_waker(Waker::noop())) {
                        Poll::Ready(Ok(t)) => t,
                        _ => None,
                    }
                });
                self.body = None;
                self.early_end = false;
                if trailers
                    .as_ref()
                    .is_some_and(|t| t.values().any(|v| padded(v.as_bytes())))
                {
                    // Malformed, as such a field in the head is (RFC 9113 8.2.1): the stream
                    // is reset and the request ends unfinished, never with the last chunk.
                    if let Some(respond) = self.respond.borrow_mut().as_mut() {
                        respond.send_reset(Reason::PROTOCOL_ERROR);
                    }
                    self.malformed = true;
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a trailer field value with whitespace at either end",
                    ));
                }
                if self.chunked {
                    self.pending = match trailers {
                        Some(t) => last_chunk(&t),
                        None => Bytes::from_static(b"0\r\n\r\n"),
                    };
                }
            }
        }
        Ok(())
    }

    /// Takes the request body's bytes already here into `early`, without waiting: whether
    /// that is all of it, and fits in `room` with its framing.
    fn whole_body_here(&mut self, room: usize) -> bool {
        let Some(body) = self.body.as_mut() else {
            return false;
        };
        // A body whose trailers wait is not whole: it would go on without them.
        if !self.early_end {
            match take_ready(body, &mut self.early, room) {
                Ok(true) => self.early_end = true,
                Ok(false) | Err(_) => return false,
            }
        }
        // One chunk's size line and CRLFs, and the last chunk.
        const FRAMING: usize = 32;
        self.early_end && self.early.len() + FRAMING <= room
    }

    /// Copies ready request bytes into `dst`; 0 once the request has ended.
    fn copy_out(&mut self, dst: &mut [u8]) -> usize {
        if self.head_pos < self.head.len() {
            let n = dst.len().min(self.head.len() - self.head_pos);
            dst[..n].copy_from_slice(&self.head[self.head_pos..self.head_pos + n]);
            self.head_pos += n;
            return n;
        }
        let n = dst.len().min(self.pending.len());
        dst[..n].copy_from_slice(&self.pending[..n]);
        self.pending.advance(n);
        n
    }

    async fn read_owned<T: IoBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        if let Err(e) = self.next_bytes().await {
            return (Err(e), buf);
        }
        let room = buf.bytes_total();
        // SAFETY: `write_ptr` points at `bytes_total` writable bytes owned by `buf`.
        let dst = unsafe { std::slice::from_raw_parts_mut(buf.write_ptr(), room) };
        let head_read = self.head_pos < self.head.len();
        let mut n = self.copy_out(dst);
        // A body that came whole with its head follows it in the same read: it is then in
        // the request path's buffer, as on HTTP/1.1, and the request can be sent again (a
        // retry). A body still coming stays the stream's, to relay as it comes.
        if head_read && self.head_pos == self.head.len() && self.whole_body_here(room - n) {
            while n < room {
                if self.pending.is_empty() && self.body.is_some() {
                    let mut cx = Context::from_waker(Waker::noop());
                    // Never pending: the body's end is in `early`.
                    if let Poll::Ready(polled) = self.poll_body(&mut cx) {
                        let _ = self.take_polled(polled);
                    }
                }
                let more = self.copy_out(&mut dst[n..]);
                if more == 0 {
                    break;
                }
                n += more;
            }
        }
        // SAFETY: `n` bytes were written at the start.
        unsafe { buf.set_init(n) };
        (Ok(n), buf)
    }

    /// Takes the HTTP/1.1 answer's bytes apart into HEADERS and DATA frames.
    async fn write_bytes(&mut self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            let body_piece = match &mut self.answer {
                Answer::Done => return Ok(()),
                Answer::Head(buf) if buf.is_empty() => {
                    // The usual case: the whole head in one write, read where it lies.
                    match self.start_answer(&data)? {
                        Some(end) => data.advance(end),
                        None => {
                            // Not all there: kept until the rest comes (`start_answer` did
                            // nothing).
                            self.answer = Answer::Head(data.to_vec());
                            return Ok(());
                        }
                    }
                    continue;
                }
                Answer::Head(buf) => {
                    let scan_from = buf.len().saturating_sub(3);
                    buf.extend_from_slice(&data);
                    let Some(end) = find_head_end(buf, scan_from) else {
                        if buf.len() > 256 * 1024 {
                            return Err(io::ErrorKind::InvalidData.into());
                        }
                        return Ok(());
                    };
                    let all = Bytes::from(std::mem::take(buf));
                    data = Bytes::slice(&all, end..);
                    if self.start_answer(&Bytes::slice(&all, ..end))?.is_none() {
                        return Err(io::ErrorKind::InvalidData.into());
                    }
                    continue;
                }
                Answer::Body(Framing::Length(rem)) => {
                    // Bytes past the length are not part of this answer.
                    let take = (*rem).min(data.len() as u64) as usize;
                    *rem -= take as u64;
                    let last = *rem == 0;
                    let piece = data.split_to(take);
                    data.clear();
                    (piece, last)
                }
                Answer::Body(Framing::Chunked(d)) => {
                    let mut out = Vec::with_capacity(data.len());
                    let last = d.feed(&data, &mut out);
                    data.clear();
                    let trailers = match last {
                        true => trailer_fields(&d.trailers),
                        false => http::HeaderMap::new(),
                    };
                    if !trailers.is_empty() {
                        // The data, then the trailers in HEADERS that end the stream.
                        self.answer = Answer::Done;
                        self.send_data(Bytes::from(out), false).await?;
                        let send = self
                            .send
                            .as_mut()
                            .ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))?;
                        send.send_trailers(trailers).map_err(io::Error::other)?;
                        return Ok(());
                    }
                    (Bytes::from(out), last)
                }
                Answer::Body(Framing::Close) => (std::mem::take(&mut data), false),
            };
            let (piece, last) = body_piece;
            if last {
                self.answer = Answer::Done;
            }
            self.send_data(piece, last).await?;
        }
        Ok(())
    }

    /// Sends the answer's HEADERS from the HTTP/1.1 head at the start of `data` (an
    /// informational head as informational HEADERS, after which the final head is still to
    /// come) and returns the head's length; `None`: the head is not all there yet, nothing was
    /// done. Field values are slices of `data`, not copies.
    fn start_answer(&mut self, data: &Bytes) -> io::Result<Option<usize>> {
        let malformed = || io::Error::from(io::ErrorKind::InvalidData);
        let mut lines = match AnswerLines::new(data) {
            Ok(lines) => lines,
            Err(Incomplete) => return Ok(None),
        };
        let code = lines.status().ok_or_else(malformed)?;
        if code == 101 {
            // A switch of protocols cannot happen on HTTP/2.
            return Err(malformed());
        }
        let informational = code < 200;
        let no_body = informational || self.head_request || code == 204 || code == 304;
        let mut response = http::Response::new(());
        // Room for a usual answer's fields without growing the map on the way.
        response.headers_mut().reserve(FIELDS);
        *response.status_mut() = http::StatusCode::from_u16(code).map_err(|_| malformed())?;
        let (mut chunked, mut length) = (false, None);
        loop {
            let (name, value) = match lines.next_line() {
                Ok(Line::Field(name, value)) => (name, value),
                Ok(Line::Malformed) => return Err(malformed()),
                Ok(Line::End) => break,
                Err(Incomplete) => return Ok(None),
            };
            let (n, request_id) = match answer_field(name) {
                AnswerField::Drop => continue,
                // A name with whitespace or a separator in it (`Transfer-Encoding : chunked`)
                // refuses the head, as a parser would: dropping the field could change the
                // framing.
                AnswerField::Invalid => return Err(malformed()),
                AnswerField::Chunked => {
                    // Only `chunked` alone is taken apart here: HTTP/2 carries no transfer
                    // codings (RFC 9113 §8.2.2), and the request path refuses an answer with
                    // another one before writing its head.
                    if !no_body && (chunked || !value.eq_ignore_ascii_case(b"chunked")) {
                        return Err(malformed());
                    }
                    chunked = true;
                    continue;
                }
                // 1xx and 204 have no content and state no length (RFC 9110 §8.6); a HEAD
                // or 304 answer's length is the GET one's, kept.
                AnswerField::ContentLength if informational || code == 204 => continue,
                AnswerField::ContentLength => {
                    length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
                    (http::header::CONTENT_LENGTH, false)
                }
                AnswerField::RequestId => (X_REQUEST_ID, true),
                AnswerField::Named(n) => (n, false),
            };
            let Ok(mut v) = http::HeaderValue::from_maybe_shared(data.slice_ref(value)) else {
                // A control character (a bare CR among them) in a value.
                return Err(malformed());
            };
            if request_id {
                // Unique per answer: not worth a place in the client's HPACK table.
                v.set_sensitive(true);
            }
            response.headers_mut().append(n, v);
        }
        let mut held = self.respond.borrow_mut();
        let respond = held
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))?;
        if informational {
            // `100 Continue` (the gateway's own, to a client that asked for it) or an
            // upstream's hints: informational HEADERS (RFC 9113 §8.1), then the final answer.
            respond
                .send_informational(response)
                .map_err(io::Error::other)?;
            self.answer = Answer::Head(Vec::new());
            return Ok(Some(lines.consumed()));
        }
        let framing = match (no_body, chunked, length) {
            (true, _, _) => Framing::Length(0),
            (false, true, _) => Framing::Chunked(Dechunk::default()),
            (false, false, Some(n)) => Framing::Length(n),
            (false, false, None) => Framing::Close,
        };
        let end = matches!(framing, Framing::Length(0));
        let send = respond
            .send_response(response, end)
            .map_err(io::Error::other)?;
        *held = None;
        drop(held);
        self.send = Some(send);
        self.answer = if end {
            Answer::Done
        } else {
            Answer::Body(framing)
        };
        Ok(Some(lines.consumed()))
    }

    /// Sends body bytes as the client's flow-control window allows.
    async fn send_data(&mut self, data: Bytes, end: bool) -> io::Result<()> {
        let send = self
            .send
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))?;
        send_flow(send, data, end, Some(self.info.client_send)).await
    }
}

/// What a stalled stream must get out for its stall bound to start again (see
/// [`send_flow`]).
const STALL_PROGRESS: usize = 16 * 1024;

/// Sends `data` on an HTTP/2 stream as the peer's flow-control window allows (waiting for it
/// to open: back-pressure), ending the stream after it when `end`.
///
/// With `stall`, a wait for the window fails once the stream has been waiting that long
/// without getting [`STALL_PROGRESS`] bytes out: a bound per opening of the window would let
/// a client that opens it a byte at a time, just in time, hold the stream (and the upstream
/// connection behind it) for good. HTTP/2 has no guard against such small openings, as TCP's
/// against silly windows. A window that opens in time costs no timer.
pub(crate) async fn send_flow(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
    stall: Option<Duration>,
) -> io::Result<()> {
    if data.is_empty() {
        if end {
            send.send_data(Bytes::new(), true)
                .map_err(io::Error::other)?;
        }
        return Ok(());
    }
    // Since the first wait without enough sent: when it fails, and what went out since.
    let mut bound: Option<(Instant, usize)> = None;
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = loop {
            let c = send.capacity();
            if c > 0 {
                break c;
            }
            let opened = poll_fn(|cx| send.poll_capacity(cx));
            let opened = match stall {
                Some(d) => {
                    let (by, _) = *bound.get_or_insert_with(|| (Instant::now() + d, 0));
                    monoio::time::timeout_at(by.into(), opened)
                        .await
                        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
                }
                None => opened.await,
            };
            match opened {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => return Err(io::ErrorKind::BrokenPipe.into()),
            }
        };
        let piece = data.split_to(cap.min(data.len()));
        let n = piece.len();
        send.send_data(piece, end && data.is_empty())
            .map_err(io::Error::other)?;
        if let Some((_, sent)) = &mut bound {
            *sent += n;
            if *sent >= STALL_PROGRESS {
                bound = None;
            }
        }
    }
    Ok(())
}

/// A look at whether the client has reset an HTTP/2 stream before its answer's head went,
/// without a borrow of the stream: what an exchange that borrows the stream throughout (its
/// connect, its upload, its retries' backoff) is raced against (see [`until_reset`]).
#[derive(Clone)]
pub struct ResetWatch(Rc<RefCell<Option<SendResponse<Bytes>>>>);

impl ResetWatch {
    /// Ready once the client has reset the stream; pending for ever once the answer's head
    /// has gone (its writes see a reset then).
    fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        match self.0.borrow_mut().as_mut() {
            Some(respond) => respond.poll_reset(cx).map(|_| ()),
            None => Poll::Pending,
        }
    }
}

/// `wait`, unless `reset` (an HTTP/2 stream's, see [`ResetWatch`]) says the client reset
/// the stream first: `None` then, and `wait` is dropped, its I/O with it.
pub async fn until_reset<F: Future>(reset: Option<&ResetWatch>, wait: F) -> Option<F::Output> {
    let Some(reset) = reset else {
        return Some(wait.await);
    };
    let mut wait = std::pin::pin!(wait);
    poll_fn(|cx| {
        if let Poll::Ready(out) = wait.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        reset.poll(cx).map(|()| None)
    })
    .await
}

impl H2Stream {
    /// Whether the client has reset this stream.
    fn was_reset(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut respond = self.respond.borrow_mut();
        let reset = match (self.send.as_mut(), respond.as_mut()) {
            (Some(s), _) => s.poll_reset(&mut cx),
            (None, Some(r)) => r.poll_reset(&mut cx),
            (None, None) => return false,
        };
        matches!(reset, Poll::Ready(Ok(_)))
    }
}

/// An HTTP/2 stream's answer side, taken from its [`H2Stream`] to answer in HTTP/2 terms
/// directly (an HTTP/2 upstream's answer, with its trailers). A stream the client resets
/// before the answer is complete counts towards the connection's rapid-reset limit, as for
/// answers written through the stream.
pub(crate) struct H2Answer {
    respond: SendResponse<Bytes>,
    send: Option<SendStream<Bytes>>,
    info: Rc<ConnInfo>,
    /// The answer ended (or was reset by the gateway).
    done: bool,
}

impl std::fmt::Debug for H2Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Answer")
            .field("done", &self.done)
            .finish()
    }
}

impl H2Answer {
    /// Sends the HEADERS; `end`: nothing follows.
    pub fn send_head(&mut self, resp: http::Response<()>, end: bool) -> Result<(), ::h2::Error> {
        self.send = Some(self.respond.send_response(resp, end)?);
        self.done = end;
        Ok(())
    }

    /// Sends body bytes as the client's window allows.
    pub async fn send_data(&mut self, data: Bytes) -> io::Result<()> {
        let send = self
            .send
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))?;
        // Bounded here too, whatever the caller bounds: a JSON or gRPC-Web answer's body, or
        // an error's, is sent from places that put no timer around it, and a client that
        // keeps its window shut would hold the stream, its upstream call and circuit slot.
        send_flow(send, data, false, Some(self.info.client_send)).await
    }

    /// Ends the answer, with trailers if there are some.
    pub fn finish(&mut self, trailers: Option<http::HeaderMap>) -> Result<(), ::h2::Error> {
        let Some(send) = self.send.as_mut() else {
            return Ok(());
        };
        self.done = true;
        match trailers {
            Some(t) if !t.is_empty() => send.send_trailers(t),
            _ => send.send_data(Bytes::new(), true),
        }
    }

    /// Resets the stream: the client must not take a cut answer for complete.
    pub fn abort(&mut self) {
        self.done = true;
        match self.send.as_mut() {
            Some(s) => s.send_reset(Reason::INTERNAL_ERROR),
            None => self.respond.send_reset(Reason::INTERNAL_ERROR),
        }
    }

    /// Ready once the client has reset the stream.
    pub fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let reset = match self.send.as_mut() {
            Some(s) => s.poll_reset(cx),
            None => self.respond.poll_reset(cx),
        };
        match reset {
            Poll::Ready(_) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for H2Answer {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut cx = Context::from_waker(Waker::noop());
        if self.poll_reset(&mut cx).is_ready() {
            self.info.reset_by_client();
        } else {
            self.abort();
        }
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        if !matches!(self.answer, Answer::Done) && self.was_reset() {
            self.info.reset_by_client();
            return;
        }
        match self.answer {
            Answer::Done => {}
            // Unanswered or cut short (a body delimited by the upstream's close ends with
            // `shutdown`, on that close only): the client must not take it for complete.
            _ => {
                if let Some(s) = self.send.as_mut() {
                    s.send_reset(Reason::INTERNAL_ERROR);
                } else if let Some(r) = self.respond.borrow_mut().as_mut() {
                    r.send_reset(Reason::INTERNAL_ERROR);
                }
            }
        }
    }
}

/// The last chunk of a request body, with `trailers` in its trailer section but for the
/// fields that control framing, routing or the connection, which an HTTP/1.1 recipient must
/// not take from a trailer (and the gateway's own chunked reader refuses).
fn last_chunk(trailers: &http::HeaderMap) -> Bytes {
    let mut out = b"0\r\n".to_vec();
    for (name, value) in trailers {
        if crate::codec::chunked::is_framing_field(name.as_str().as_bytes()) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

/// Appends `n` in lower-case hex (a chunk size), without formatting machinery.
pub(super) fn push_hex(out: &mut Vec<u8>, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(n >> (4 * i)) & 15]);
    }
}

/// The offset just past the first `\r\n\r\n` at or after `from`.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| from + i + 4)
}

/// Fields an answer's HEADERS usually has room for (`HeaderMap::reserve`).
const FIELDS: usize = 12;

/// The gateway's own field, on every answer: named without a parse or an allocation.
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// What a field of an answer head becomes in HEADERS.
#[derive(Debug, PartialEq, Eq)]
enum AnswerField {
    /// Connection-specific (RFC 9113 8.2.2): not sent.
    Drop,
    /// `Transfer-Encoding`: the body is chunked; not sent.
    Chunked,
    ContentLength,
    RequestId,
    /// Sent under this name.
    Named(http::HeaderName),
    /// Not a field name `http` takes: the head is refused.
    Invalid,
}

/// Names a field of an answer head. The fields nearly every answer has are told apart by
/// length and a comparison, and named with `http`'s constants; any other name goes through
/// `HeaderName::from_bytes` (which lower-cases and checks it).
fn answer_field(name: &[u8]) -> AnswerField {
    use http::header;
    let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
    let known = match name.len() {
        2 if is(b"te") => return AnswerField::Drop,
        4 if is(b"date") => header::DATE,
        4 if is(b"etag") => header::ETAG,
        4 if is(b"vary") => header::VARY,
        6 if is(b"server") => header::SERVER,
        7 if is(b"upgrade") => return AnswerField::Drop,
        10 if is(b"connection") || is(b"keep-alive") => return AnswerField::Drop,
        12 if is(b"content-type") => header::CONTENT_TYPE,
        12 if is(b"x-request-id") => return AnswerField::RequestId,
        13 if is(b"last-modified") => header::LAST_MODIFIED,
        13 if is(b"accept-ranges") => header::ACCEPT_RANGES,
        13 if is(b"cache-control") => header::CACHE_CONTROL,
        14 if is(b"content-length") => return AnswerField::ContentLength,
        14 if is(b"http2-settings") => return AnswerField::Drop,
        16 if is(b"proxy-connection") => return AnswerField::Drop,
        17 if is(b"transfer-encoding") => return AnswerField::Chunked,
        _ => match http::HeaderName::from_bytes(name) {
            Ok(n) => n,
            Err(_) => return AnswerField::Invalid,
        },
    };
    AnswerField::Named(known)
}

/// The fields of an HTTP/1.1 answer's trailer section (`raw`: its lines with their CRLFs) to
/// send as HTTP/2 trailers: not connection-specific ones (RFC 9113 8.2.2), nor those that
/// control framing or routing (RFC 9110 6.5.1), nor any HTTP/2 cannot carry.
fn trailer_fields(raw: &[u8]) -> http::HeaderMap {
    let mut out = http::HeaderMap::new();
    for line in raw.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], crate::codec::trim_ows(&line[colon + 1..]));
        let AnswerField::Named(name) = answer_field(name) else {
            continue;
        };
        if crate::codec::chunked::is_framing_field(name.as_str().as_bytes()) {
            continue;
        }
        if let Ok(value) = http::HeaderValue::from_bytes(value) {
            out.append(name, value);
        }
    }
    out
}

/// Whether a line from [`AnswerLines::take_line`] ended in a bare LF.
fn bare_lf(line: &[u8]) -> bool {
    line.last() == Some(&b'\n')
}

/// The head of an answer written to an [`H2Stream`] is not all there yet.
#[derive(Debug, PartialEq, Eq)]
struct Incomplete;

/// One line of an answer head's fields.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    /// A field's name and its value without the whitespace around it.
    Field(&'a [u8], &'a [u8]),
    /// A line without a colon or with an empty name, or a bare LF. (A name with whitespace in
    /// it is a field that `http::HeaderName` refuses.)
    Malformed,
    /// The empty line that ends the head.
    End,
}

/// Walks the lines of the HTTP/1.1 answer head written to an [`H2Stream`]. That head is the
/// gateway's own output: an upstream's head that `parse_response` accepted (CRLF line ends,
/// well-formed fields, a three-digit status), with the gateway's fields added, or a head the
/// gateway made. So the lines are split where they lie, without a general parser's second
/// pass (httparse's header array, its validation, and a separate search for the head's end
/// cost about 1,700 instructions per answer more than this walk); what the walk still meets
/// that is not a field line is [`Line::Malformed`], and names and values are checked where
/// they become an `http::HeaderName` and `HeaderValue`, which take the bytes httparse takes
/// (a token; visible ASCII, SP, HTAB and obs-text): a head with a field either refuses is
/// refused whole, as before.
struct AnswerLines<'a> {
    head: &'a [u8],
    /// Where the next line starts.
    at: usize,
    status: Option<u16>,
}

impl<'a> AnswerLines<'a> {
    /// Reads the status line.
    fn new(head: &'a [u8]) -> Result<Self, Incomplete> {
        let mut lines = AnswerLines {
            head,
            at: 0,
            status: None,
        };
        let line = lines.take_line()?;
        // `HTTP/1.x SP 3DIGIT [SP reason]`
        if bare_lf(line) {
            return Ok(lines);
        }
        let version_and_code = line.strip_prefix(b"HTTP/1.");
        if let Some([_, b' ', a @ b'1'..=b'5', b @ b'0'..=b'9', c @ b'0'..=b'9', rest @ ..]) =
            version_and_code
        {
            if rest.first().is_none_or(|&sp| sp == b' ') {
                let digit = |x: &u8| u16::from(x - b'0');
                lines.status = Some(digit(a) * 100 + digit(b) * 10 + digit(c));
            }
        }
        Ok(lines)
    }

    /// The status code; `None`: the status line is not one.
    fn status(&self) -> Option<u16> {
        self.status
    }

    /// Bytes of the head read so far (all of it once [`Line::End`] was returned).
    fn consumed(&self) -> usize {
        self.at
    }

    /// The next line, without its CRLF (a bare LF stays on it, and makes it malformed).
    fn take_line(&mut self) -> Result<&'a [u8], Incomplete> {
        let rest = &self.head[self.at..];
        let lf = memchr::memchr(b'\n', rest).ok_or(Incomplete)?;
        self.at += lf + 1;
        Ok(match rest[..lf].split_last() {
            Some((b'\r', line)) => line,
            // Keeps the LF, which makes the line malformed ([`bare_lf`]).
            _ => &rest[..=lf],
        })
    }

    fn next_line(&mut self) -> Result<Line<'a>, Incomplete> {
        let line = self.take_line()?;
        if line.is_empty() {
            return Ok(Line::End);
        }
        if bare_lf(line) {
            return Ok(Line::Malformed);
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            return Ok(Line::Malformed);
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() {
            return Ok(Line::Malformed);
        }
        Ok(Line::Field(name, crate::codec::trim_ows(value)))
    }
}

/// Chunked-body decoding of the gateway's own output (already validated upstream side).
#[derive(Debug, Default)]
struct Dechunk {
    state: DState,
    remaining: u64,
    /// The trailer section's bytes (its lines, with their CRLFs), bounded by the upstream
    /// side's reader (`UPSTREAM_BUF` of trailers at most).
    trailers: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum DState {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// In the trailer section; `true` at the start of a line.
    Trailer(bool),
    Done,
}

impl Dechunk {
    /// Appends the chunk data in `input` to `out`; `true` once the body has ended.
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                DState::Size => {
                    if let Some(d) = char::from(b).to_digit(16) {
                        self.remaining = self.remaining.saturating_mul(16) + u64::from(d);
                    } else {
                        self.state = if b == b'\r' {
                            DState::SizeLf
                        } else {
                            DState::Ext
                        };
                    }
                    i += 1;
                }
                DState::Ext => {
                    if b == b'\r' {
                        self.state = DState::SizeLf;
                    }
                    i += 1;
                }
                DState::SizeLf => {
                    i += 1;
                    self.state = if self.remaining == 0 {
                        DState::Trailer(true)
                    } else {
                        DState::Data
                    };
                }
                DState::Data => {
                    let n = (self.remaining.min((input.len() - i) as u64)) as usize;
                    out.extend_from_slice(&input[i..i + n]);
                    i += n;
                    self.remaining -= n as u64;
                    if self.remaining == 0 {
                        self.state = DState::DataCr;
                    }
                }
                DState::DataCr => {
                    i += 1;
                    self.state = DState::DataLf;
                }
                DState::DataLf => {
                    i += 1;
                    self.state = DState::Size;
                }
                DState::Trailer(line_start) => {
                    i += 1;
                    self.trailers.push(b);
                    if b == b'\n' {
                        if line_start {
                            self.state = DState::Done;
                        } else {
                            self.state = DState::Trailer(true);
                        }
                    } else if b != b'\r' {
                        self.state = DState::Trailer(false);
                    }
                }
                DState::Done => break,
            }
        }
        self.state == DState::Done
    }
}

impl std::os::fd::AsRawFd for H2Stream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.info.fd
    }
}

impl AsyncReadRent for H2Stream {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        self.read_owned(buf).await
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        (Err(io::ErrorKind::Unsupported.into()), buf)
    }
}

impl CancelableAsyncReadRent for H2Stream {
    async fn cancelable_read<T: IoBufMut>(
        &mut self,
        buf: T,
        _c: CancelHandle,
    ) -> BufResult<usize, T> {
        self.read_owned(buf).await
    }

    async fn cancelable_readv<T: IoVecBufMut>(
        &mut self,
        buf: T,
        _c: CancelHandle,
    ) -> BufResult<usize, T> {
        (Err(io::ErrorKind::Unsupported.into()), buf)
    }
}

impl AsyncWriteRent for H2Stream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: `read_ptr` points at `bytes_init` initialised bytes owned by `buf`.
        let plain = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
        let n = plain.len();
        let data = self.info.copy_in(std::iter::once(plain), n);
        let res = self.write_bytes(data).await;
        (res.map(|()| n), buf)
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        let all = {
            // SAFETY: the iovec array and the memory it describes belong to `buf`.
            let iovs =
                unsafe { std::slice::from_raw_parts(buf.read_iovec_ptr(), buf.read_iovec_len()) };
            let pieces = iovs.iter().map(|v| {
                // SAFETY: each iovec describes initialised bytes owned by `buf`.
                unsafe {
                    std::slice::from_raw_parts(v.iov_base.cast::<u8>().cast_const(), v.iov_len)
                }
            });
            self.info
                .copy_in(pieces, iovs.iter().map(|v| v.iov_len).sum())
        };
        let n = all.len();
        let res = self.write_bytes(all).await;
        (res.map(|()| n), buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        if matches!(self.answer, Answer::Body(Framing::Close)) {
            self.answer = Answer::Done;
            self.send_data(Bytes::new(), true).await?;
        }
        Ok(())
    }
}

/// The halves of a stream that cannot be tunnelled (an HTTP/2 stream): reads end at once,
/// writes fail.
#[derive(Debug)]
pub(crate) struct Refused;

impl AsyncReadRent for Refused {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        (Ok(0), buf)
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        (Ok(0), buf)
    }
}

impl WriteHalf for Refused {}

impl AsyncWriteRent for Refused {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        (Err(io::ErrorKind::Unsupported.into()), buf)
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        (Err(io::ErrorKind::Unsupported.into()), buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ClientStream for H2Stream {
    const KEEPS_WRITES: bool = true;
    const PARKABLE: bool = false;
    const WHOLE_CONNECTION: bool = false;
    /// A stream's head comes in one piece of a few hundred bytes, and a stream lives for one
    /// request: a small buffer comes from the allocator's per-thread cache, where 8 KiB would
    /// not.
    const READ_BUF: usize = 1024;
    const PRIOR_KNOWLEDGE: bool = false;
    const TRANSFER_CODINGS: bool = false;
    type ReadHalf = Refused;
    type WriteHalf = Refused;

    async fn write_spent(
        &mut self,
        buf: &mut Vec<u8>,
        range: std::ops::Range<usize>,
    ) -> io::Result<()> {
        // Body bytes of an answer framed by length or close, filling at least half the
        // buffer (so what h2 holds is at most twice the bytes it still has to send): handed
        // to h2 as they lie, with a new buffer for the caller.
        let plain = matches!(
            self.answer,
            Answer::Body(Framing::Length(_) | Framing::Close)
        );
        if plain && range.len() * 2 >= buf.capacity() && range.end <= buf.len() {
            let mut owned = std::mem::replace(buf, Vec::with_capacity(buf.capacity()));
            owned.truncate(range.end);
            return self
                .write_bytes(Bytes::slice(&Bytes::from(owned), range.start..))
                .await;
        }
        crate::io::write_range(self, buf, range).await
    }

    fn scheme(&self) -> Scheme {
        self.info.scheme
    }

    fn sni(&self) -> Option<&str> {
        self.info.sni.as_deref()
    }

    fn watch(&self) -> Option<crate::io::ClientWatch> {
        None
    }

    fn take_h2_body(&mut self) -> Option<(Bytes, RecvStream)> {
        // Only before any of the body was read as HTTP/1.1 bytes.
        if self.head_pos < self.head.len() || !self.pending.is_empty() {
            return None;
        }
        let body = self.body.take()?;
        Some((self.early.split().freeze(), body))
    }

    fn take_h2_respond(&mut self) -> Option<H2Answer> {
        if !matches!(&self.answer, Answer::Head(b) if b.is_empty()) {
            return None;
        }
        let respond = self.respond.borrow_mut().take()?;
        self.answer = Answer::Done;
        Some(H2Answer {
            respond,
            send: None,
            info: self.info.clone(),
            done: false,
        })
    }

    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Before the answer's head, the stream's reset is seen on its response handle; after
        // it, on its send stream (the body under way).
        match (self.send.as_mut(), self.respond.borrow_mut().as_mut()) {
            (Some(send), _) => send.poll_reset(cx).map(|_| ()),
            (None, Some(respond)) => respond.poll_reset(cx).map(|_| ()),
            (None, None) => Poll::Pending,
        }
    }

    fn reset_watch(&self) -> Option<ResetWatch> {
        Some(ResetWatch(self.respond.clone()))
    }

    fn reset_for_malformed(&mut self) -> bool {
        if self.malformed {
            return true;
        }
        let Some(body) = self.body.as_mut() else {
            return false;
        };
        // The body's failure says whose the reset was, after what came before it (a few
        // frames at most: the stream has ended).
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..64 {
            match body.poll_data(&mut cx) {
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(e))) => {
                    return body_error(&e) == crate::error::ErrorKind::BadRequest
                }
                _ => return false,
            }
        }
        false
    }

    fn into_halves(self) -> (Refused, Refused) {
        (Refused, Refused)
    }

    fn into_parkable(self) -> Result<monoio::net::TcpStream, Self> {
        Err(self)
    }
}

type ReadFut<R> = Pin<Box<dyn Future<Output = (R, io::Result<usize>, Vec<u8>)>>>;
type WriteFut<W> = Pin<Box<dyn Future<Output = (W, io::Result<()>, Vec<u8>)>>>;

/// A connection's two halves as one poll-based byte stream for h2: one owned-buffer read and
/// one write in flight at a time, each a boxed future that hands its half and buffer back.
///
/// On a socket, frames are copied into `wbuf` and written from there. On TLS they go
/// straight into the session's records ([`PlainQueue`]), which is the one copy encryption
/// needs anyway; `wbuf` then only holds what does not fill a whole record yet, so records
/// stay full-sized however h2 cuts its writes (a 9-byte frame head before each 16 KiB
/// payload would otherwise cost a record of its own).
pub(crate) struct PollIo<R, W> {
    reader: Option<R>,
    rbuf: Vec<u8>,
    rpos: usize,
    reading: Option<ReadFut<R>>,
    writer: Option<W>,
    wbuf: Vec<u8>,
    spare: Vec<u8>,
    writing: Option<WriteFut<W>>,
    shut: bool,
    /// The TLS session's plaintext entrance, when the writer has one.
    records: Option<PlainQueue>,
    /// Plaintext bytes encrypted since the last write of records began.
    encrypted: usize,
    /// While set, a flush that leaves nothing to write lets the write buffers go.
    idle: Option<Rc<Cell<bool>>>,
}

impl<R, W: WriteHalf> PollIo<R, W> {
    pub(crate) fn new(reader: R, writer: W, prefix: &[u8]) -> Self {
        let mut rbuf = Vec::with_capacity(16 * 1024);
        rbuf.extend_from_slice(prefix);
        let records = writer.plain_queue();
        PollIo {
            reader: Some(reader),
            rbuf,
            rpos: 0,
            reading: None,
            writer: Some(writer),
            // Allocated as the first frames are written, and grown as they need; an idle
            // connection holds none (see `releasing_when`).
            wbuf: Vec::new(),
            spare: Vec::new(),
            writing: None,
            shut: false,
            records,
            encrypted: 0,
            idle: None,
        }
    }

    /// Lets the write buffers go at a flush that leaves nothing to write while `idle` is
    /// set: capacity held is resident, and an idle client connection held 128 KiB of them.
    pub(crate) fn releasing_when(mut self, idle: Rc<Cell<bool>>) -> Self {
        self.idle = Some(idle);
        self
    }
}

impl<R: AsyncReadRent + 'static, W: AsyncWriteRent + 'static> PollIo<R, W> {
    fn poll_flush_inner(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write_out(cx, true)
    }

    /// Writes out what is buffered and waits until it is written; on TLS, `partial` also
    /// seals the record `wbuf` holds (a flush), otherwise it waits for more.
    fn poll_write_out(&mut self, cx: &mut Context<'_>, partial: bool) -> Poll<io::Result<()>> {
        loop {
            if let Some(fut) = self.writing.as_mut() {
                let (w, res, mut buf) = ready!(fut.as_mut().poll(cx));
                self.writing = None;
                self.writer = Some(w);
                buf.clear();
                self.spare = buf;
                res?;
            }
            if let Some(records) = &self.records {
                if partial && !self.wbuf.is_empty() {
                    records.push(&[io::IoSlice::new(&self.wbuf)])?;
                    self.wbuf.clear();
                }
                if !records.pending() {
                    self.release_if_idle();
                    return Poll::Ready(Ok(()));
                }
            } else if self.wbuf.is_empty() {
                self.release_if_idle();
                return Poll::Ready(Ok(()));
            }
            let Some(mut w) = self.writer.take() else {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            };
            self.writing = Some(if self.records.is_some() {
                self.encrypted = 0;
                Box::pin(async move {
                    // Writes every record queued when it starts.
                    let res = w.flush().await;
                    (w, res, Vec::new())
                })
            } else {
                let buf = std::mem::replace(&mut self.wbuf, std::mem::take(&mut self.spare));
                Box::pin(async move {
                    let (res, buf) = w.write_all(buf).await;
                    (w, res.map(|_| ()), buf)
                })
            });
        }
    }
}

impl<R, W> PollIo<R, W> {
    /// With nothing left to write: the write buffers go while the connection is idle.
    fn release_if_idle(&mut self) {
        if self.wbuf.is_empty() && self.idle.as_ref().is_some_and(|i| i.get()) {
            self.wbuf = Vec::new();
            self.spare = Vec::new();
        }
    }

    /// `wbuf`, with some room if it had none.
    fn wbuf(&mut self) -> &mut Vec<u8> {
        if self.wbuf.capacity() == 0 {
            self.wbuf.reserve(SCRATCH);
        }
        &mut self.wbuf
    }
}

/// Takes `data` (fewer than [`SmallPieces::MAX`] slices) into TLS records: with what `wbuf`
/// holds, whole records' worth at once, and a rest shorter than [`SEAL_TAIL`] into `wbuf`.
/// Returns the bytes encrypted.
fn encrypt(
    records: &PlainQueue,
    wbuf: &mut Vec<u8>,
    data: &[io::IoSlice<'_>],
) -> io::Result<usize> {
    cut_records(|pieces| records.push(pieces), wbuf, data)
}

/// [`encrypt`] with the records' entrance as `push`.
fn cut_records(
    mut push: impl FnMut(&[io::IoSlice<'_>]) -> io::Result<()>,
    wbuf: &mut Vec<u8>,
    data: &[io::IoSlice<'_>],
) -> io::Result<usize> {
    debug_assert!(data.len() < SmallPieces::MAX);
    let len: usize = data.iter().map(|d| d.len()).sum();
    let total = wbuf.len() + len;
    // A large tail is sealed in a shorter record now rather than copied to wait for more:
    // past a few KiB, copying costs more than a record's own overhead.
    let whole = if total % PlainQueue::RECORD >= SEAL_TAIL {
        total
    } else {
        total / PlainQueue::RECORD * PlainQueue::RECORD
    };
    // Bytes of `data` that go into records now.
    let mut from_data = 0;
    if whole > 0 {
        from_data = whole - wbuf.len();
        let mut pieces = SmallPieces::new();
        if !wbuf.is_empty() {
            pieces.push(wbuf);
        }
        let mut left = from_data;
        for d in data {
            if left == 0 {
                break;
            }
            let take = left.min(d.len());
            pieces.push(&d[..take]);
            left -= take;
        }
        push(pieces.as_slices())?;
        wbuf.clear();
    }
    // The tail (shorter than SEAL_TAIL) waits for more.
    for d in data {
        let skip = from_data.min(d.len());
        from_data -= skip;
        wbuf.extend_from_slice(&d[skip..]);
    }
    Ok(whole)
}

/// The pieces of one push of records: a few slices, on the stack.
struct SmallPieces<'a> {
    slices: [io::IoSlice<'a>; SmallPieces::MAX],
    len: usize,
}

impl<'a> SmallPieces<'a> {
    const MAX: usize = 8;

    fn new() -> Self {
        SmallPieces {
            slices: [io::IoSlice::new(&[]); SmallPieces::MAX],
            len: 0,
        }
    }

    fn push(&mut self, s: &'a [u8]) {
        assert!(
            self.len < SmallPieces::MAX,
            "callers push at most SmallPieces::MAX slices"
        );
        self.slices[self.len] = io::IoSlice::new(s);
        self.len += 1;
    }

    fn as_slices(&self) -> &[io::IoSlice<'a>] {
        &self.slices[..self.len]
    }
}

impl<R: AsyncReadRent + Unpin + 'static, W: AsyncWriteRent + Unpin + 'static> tokio::io::AsyncRead
    for PollIo<R, W>
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.rpos < this.rbuf.len() {
                let n = out.remaining().min(this.rbuf.len() - this.rpos);
                out.put_slice(&this.rbuf[this.rpos..this.rpos + n]);
                this.rpos += n;
                return Poll::Ready(Ok(()));
            }
            if this.reading.is_none() {
                let Some(mut r) = this.reader.take() else {
                    return Poll::Ready(Ok(()));
                };
                let mut buf = std::mem::take(&mut this.rbuf);
                buf.clear();
                this.rpos = 0;
                this.reading = Some(Box::pin(async move {
                    let (res, buf) = r.read(buf).await;
                    (r, res, buf)
                }));
            }
            let Some(fut) = this.reading.as_mut() else {
                continue;
            };
            let (r, res, buf) = ready!(fut.as_mut().poll(cx));
            this.reading = None;
            this.rbuf = buf;
            match res {
                // End of stream: no reader any more, so every later read says so too.
                Ok(0) => return Poll::Ready(Ok(())),
                Ok(_) => this.reader = Some(r),
                Err(e) => {
                    this.reader = Some(r);
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

impl<R: AsyncReadRent + Unpin + 'static, W: AsyncWriteRent + Unpin + 'static> tokio::io::AsyncWrite
    for PollIo<R, W>
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.records.is_some() {
            if this.encrypted >= WRITE_BUF {
                // Enough records for one write: wait for the socket (back-pressure).
                ready!(this.poll_write_out(cx, false))?;
            }
            let data = &data[..data.len().min(SmallPieces::MAX - 1)];
            this.wbuf();
            if let Some(records) = &this.records {
                this.encrypted += encrypt(records, &mut this.wbuf, data)?;
            }
            return Poll::Ready(Ok(data.iter().map(|d| d.len()).sum()));
        }
        if this.wbuf.len() >= WRITE_BUF {
            ready!(this.poll_flush_inner(cx))?;
        }
        let mut n = 0;
        let wbuf = this.wbuf();
        for d in data {
            wbuf.extend_from_slice(d);
            n += d.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_inner(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_inner(cx))?;
        if !this.shut {
            this.shut = true;
            if let Some(mut w) = this.writer.take() {
                this.writing = Some(Box::pin(async move {
                    let res = w.shutdown().await;
                    (w, res, Vec::new())
                }));
            }
        }
        this.poll_flush_inner(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_into_whole_records_and_short_tails_wait() {
        const R: usize = PlainQueue::RECORD;
        // h2's writes of a 64 KiB answer: a frame head, then up to 16 KiB of payload, with a
        // first payload shortened by the answer's head; then a 300-byte last piece.
        let mut stream = Vec::new();
        let mut writes: Vec<Vec<Vec<u8>>> = Vec::new();
        let mut byte = 0u8;
        let mut piece = |n: usize| {
            (0..n)
                .map(|_| {
                    byte = byte.wrapping_add(1);
                    byte
                })
                .collect::<Vec<u8>>()
        };
        for payload in [R - 200, R, R, R, 300] {
            writes.push(vec![piece(9), piece(payload)]);
        }
        writes.push(vec![piece(13)]); // a WINDOW_UPDATE on its own
        let mut wbuf = Vec::new();
        let mut records = Vec::new();
        for w in &writes {
            w.iter().for_each(|p| stream.extend_from_slice(p));
            let slices: Vec<io::IoSlice<'_>> = w.iter().map(|p| io::IoSlice::new(p)).collect();
            let before: usize = records.iter().map(Vec::len).sum();
            let sealed = cut_records(
                |pieces| {
                    records.push(pieces.iter().flat_map(|p| p.iter().copied()).collect());
                    Ok(())
                },
                &mut wbuf,
                &slices,
            )
            .unwrap();
            assert_eq!(records.iter().map(Vec::len).sum::<usize>() - before, sealed);
            assert!(wbuf.len() < SEAL_TAIL, "a tail that waits is short");
        }
        // Nothing lost, nothing repeated, in order.
        let mut out: Vec<u8> = records.concat();
        out.extend_from_slice(&wbuf);
        assert_eq!(out, stream);
        // Every push is whole records, except one that ends in a tail of SEAL_TAIL or more.
        for r in &records {
            assert!(
                r.len() % R == 0 || r.len() % R >= SEAL_TAIL,
                "push of {}",
                r.len()
            );
        }
        // The 9-byte heads did not become records of their own: the first write (long enough
        // to seal at once), then one whole record per 16 KiB frame, each carrying the heads
        // and tail bytes left before it; the last 300 bytes and the small frames wait.
        let lens: Vec<usize> = records.iter().map(Vec::len).collect();
        assert_eq!(lens, [R - 191, R, R, R]);
        assert_eq!(wbuf.len(), 3 * 9 + 9 + 300 + 13);
    }

    #[test]
    fn a_long_tail_is_sealed_at_once() {
        let mut wbuf = b"abc".to_vec();
        let mut pushed = Vec::new();
        let data = vec![7u8; SEAL_TAIL + 10];
        let sealed = cut_records(
            |pieces| {
                pushed.push(pieces.iter().map(|p| p.len()).collect::<Vec<_>>());
                Ok(())
            },
            &mut wbuf,
            &[io::IoSlice::new(&data)],
        )
        .unwrap();
        assert_eq!(sealed, SEAL_TAIL + 13);
        assert_eq!(pushed, vec![vec![3, SEAL_TAIL + 10]]);
        assert!(wbuf.is_empty());
        // A short write waits whole.
        let sealed = cut_records(
            |_| panic!("nothing to seal"),
            &mut wbuf,
            &[io::IoSlice::new(b"xy")],
        );
        assert_eq!(sealed.unwrap(), 0);
        assert_eq!(wbuf, b"xy");
    }

    /// Feeds `input` to a fresh decoder in pieces of `step` bytes.
    fn dechunk(input: &[u8], step: usize) -> (Vec<u8>, bool) {
        let mut d = Dechunk::default();
        let mut out = Vec::new();
        let mut done = false;
        for piece in input.chunks(step) {
            done = d.feed(piece, &mut out);
        }
        (out, done)
    }

    #[test]
    fn chunked_answers_are_decoded_whatever_the_write_boundaries() {
        let body = b"5;ext=\"a b\"\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in [1, 2, 3, 7, body.len()] {
            let (out, done) = dechunk(body, step);
            assert_eq!(out, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            assert!(done, "step {step}");
        }
        // Not finished until the last empty line.
        let (out, done) = dechunk(b"3\r\nabc\r\n0\r\n", 4);
        assert_eq!((out.as_slice(), done), (&b"abc"[..], false));
    }

    #[test]
    fn chunk_sizes_are_hex() {
        for n in [0usize, 1, 15, 16, 255, 4096, 65_535, usize::MAX] {
            let mut out = Vec::new();
            push_hex(&mut out, n);
            assert_eq!(out, format!("{n:x}").into_bytes());
        }
    }

    /// Every line of `head` as [`AnswerLines`] reads it, and the bytes it took.
    fn walk(head: &[u8]) -> (Option<u16>, Vec<Result<Line<'_>, Incomplete>>, usize) {
        let Ok(mut lines) = AnswerLines::new(head) else {
            return (None, vec![Err(Incomplete)], 0);
        };
        let mut out = Vec::new();
        loop {
            let line = lines.next_line();
            let stop = !matches!(line, Ok(Line::Field(..)) | Ok(Line::Malformed));
            out.push(line);
            if stop {
                return (lines.status(), out, lines.consumed());
            }
        }
    }

    #[test]
    fn answer_heads_are_read_line_by_line_where_they_lie() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Type:text/plain\r\nX-A:  spaced \t\r\n\
                     Empty:\r\nDate: Fri, 04 Dec 2026 23:40:00 GMT\r\n\r\nbody";
        let (status, lines, used) = walk(head);
        assert_eq!(status, Some(200));
        assert_eq!(
            lines,
            [
                Ok(Line::Field(b"Content-Type", b"text/plain")),
                Ok(Line::Field(b"X-A", b"spaced")),
                Ok(Line::Field(b"Empty", b"")),
                Ok(Line::Field(b"Date", b"Fri, 04 Dec 2026 23:40:00 GMT")),
                Ok(Line::End),
            ]
        );
        assert_eq!(&head[used..], b"body");
        // No fields, no reason phrase, another minor version.
        let (status, lines, used) = walk(b"HTTP/1.0 204\r\n\r\n");
        assert_eq!((status, lines, used), (Some(204), vec![Ok(Line::End)], 16));
        // Cut anywhere before the empty line's LF, a head is incomplete, not malformed.
        for cut in 0..head.len() - 4 {
            let (_, lines, _) = walk(&head[..cut]);
            assert_eq!(lines.last(), Some(&Err(Incomplete)), "cut at {cut}");
        }
    }

    #[test]
    fn what_is_not_a_field_line_or_a_status_line_is_refused() {
        for line in [&b"no colon"[..], b": empty name", b"Bare: lf\n"] {
            let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
            head.extend_from_slice(line);
            head.extend_from_slice(b"\r\n\r\n");
            let (status, lines, _) = walk(&head);
            assert_eq!(status, Some(200));
            assert_eq!(
                lines[0],
                Ok(Line::Malformed),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        for status_line in [
            &b"HTTP/1.1 200 OK\n"[..],
            b"HTTP/1.1 2000 OK\r\n",
            b"HTTP/1.1 20 OK\r\n",
            b"HTTP/1.1 099 Low\r\n",
            b"HTTP/1.1 600 High\r\n",
            b"HTTP/1.1 2x0 OK\r\n",
            b"HTTP/2.0 200 OK\r\n",
            b"HTTP/1.1  200 OK\r\n",
            b"ICY 200 OK\r\n",
        ] {
            let lines = AnswerLines::new(status_line).unwrap();
            assert_eq!(
                lines.status(),
                None,
                "{:?}",
                String::from_utf8_lossy(status_line)
            );
        }
        for (line, code) in [
            (&b"HTTP/1.1 100 Continue\r\n"[..], 100),
            (b"HTTP/1.1 599\r\n", 599),
        ] {
            assert_eq!(AnswerLines::new(line).unwrap().status(), Some(code));
        }
    }

    /// Random answer heads, well-formed and with one byte spoilt: wherever the upstream
    /// parser (`parse_response`) accepts a head, the walk reads the same fields and ends at the
    /// same byte; and whatever the bytes, no field it yields runs across a line end. (A bare
    /// CR inside a line stays in its value, which `HeaderValue` refuses.)
    #[test]
    fn the_walk_reads_what_parse_response_accepts_and_keeps_fields_to_their_lines() {
        let mut rng = crate::trace::Rng::seeded(0x5eed_2026);
        let mut pick = |n: usize| (rng.next_u32() as usize) % n;
        let names: [&[u8]; 10] = [
            b"Content-Type",
            b"content-length",
            b"X-Request-Id",
            b"Date",
            b"server",
            b"X-A",
            b"set-cookie",
            b"VARY",
            b"x-custom-thing",
            b"ETag",
        ];
        let value_bytes = b"abcXYZ019 \t,;=/\"-_.:()\x80\xff";
        let spoilers = [b'\n', b'\r', b':', b' ', b'\t', 0, 0x7f, b'a'];
        // Heads the parser accepted: clean ones, spoilt ones.
        let mut accepted = [0; 2];
        for case in 0..20_000 {
            let mut head = format!("HTTP/1.{} {} OK\r\n", pick(2), 100 + pick(500)).into_bytes();
            for _ in 0..pick(8) {
                let name = names[pick(names.len())];
                head.extend_from_slice(name);
                head.push(b':');
                head.extend(std::iter::repeat_n(b' ', pick(3)));
                if names[1] == name || pick(4) == 0 {
                    head.extend_from_slice(b"13");
                } else {
                    for _ in 0..pick(20) {
                        head.push(value_bytes[pick(value_bytes.len())]);
                    }
                }
                head.extend(std::iter::repeat_n(b'\t', pick(2)));
                head.extend_from_slice(b"\r\n");
            }
            head.extend_from_slice(b"\r\n");
            if case % 2 == 1 {
                let at = pick(head.len());
                head[at] = spoilers[pick(spoilers.len())];
            }
            head.extend_from_slice(b"body");

            let (_, lines, used) = walk(&head);
            for line in &lines {
                if let Ok(Line::Field(name, value)) = line {
                    // A field is one line: no LF in it.
                    assert!(
                        !name.contains(&b'\n') && !value.contains(&b'\n'),
                        "a field across lines in {:?}",
                        String::from_utf8_lossy(&head)
                    );
                }
            }
            let mut plan = crate::codec::FieldPlan::default();
            let Ok(Some(parsed)) =
                crate::codec::response::parse_response(&head, false, 64 * 1024, &mut plan)
            else {
                continue;
            };
            accepted[case % 2] += 1;
            let mut fields = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut fields);
            assert!(resp.parse(&head).unwrap().is_complete());
            let expected: Vec<_> = resp
                .headers
                .iter()
                .map(|f| {
                    Ok(Line::Field(
                        f.name.as_bytes(),
                        crate::codec::trim_ows(f.value),
                    ))
                })
                .chain([Ok(Line::End)])
                .collect();
            assert_eq!(lines, expected, "{:?}", String::from_utf8_lossy(&head));
            assert_eq!(used, parsed.head_end);
            assert_eq!(
                AnswerLines::new(&head).unwrap().status(),
                Some(parsed.status)
            );
        }
        // Every clean head, and a good share of the spoilt ones, were compared.
        assert!(
            accepted[0] == 10_000 && accepted[1] > 1_000,
            "accepted: {accepted:?}"
        );
    }

    /// What an HTTP/2 client got when the request path wrote `pieces` to its stream: status,
    /// fields and body; or the kind of error the writes returned (`ConnectionReset`: the
    /// client saw the stream reset). One in-memory connection (h2's own client and server
    /// over a duplex pipe) per call.
    fn answered(
        method: &str,
        pieces: &[&[u8]],
    ) -> Result<(u16, http::HeaderMap, Vec<u8>), io::ErrorKind> {
        answered_in_full(method, pieces, false).map(|a| (a.status, a.fields, a.body))
    }

    /// What an HTTP/2 client got, informational answers included.
    struct Got {
        /// Informational answers: status and `Link` field.
        informational: Vec<(u16, Option<String>)>,
        status: u16,
        fields: http::HeaderMap,
        body: Vec<u8>,
    }

    /// [`answered`], with the informational answers, and with the stream shut down after the
    /// writes when `shutdown` (the request path's end of a body delimited by the close).
    fn answered_in_full(
        method: &str,
        pieces: &[&[u8]],
        shutdown: bool,
    ) -> Result<Got, io::ErrorKind> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let pieces: Vec<Bytes> = pieces.iter().map(|p| Bytes::copy_from_slice(p)).collect();
        let method = http::Method::from_bytes(method.as_bytes()).unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async move {
            let (client_io, server_io) = tokio::io::duplex(1 << 16);
            let server = tokio::task::spawn_local(async move {
                let mut conn = ::h2::server::handshake(server_io).await.unwrap();
                let (req, respond) = conn.accept().await.unwrap().unwrap();
                // The connection sends what the stream queues while it is polled.
                tokio::task::spawn_local(async move { while conn.accept().await.is_some() {} });
                let mut stream = H2Stream {
                    info: Rc::new(ConnInfo {
                        fd: -1,
                        sni: None,
                        scheme: Scheme::Http,
                        open: Cell::new(1),
                        last_end: Cell::new(Instant::now()),
                        resets: Cell::new(0),
                        streams: Cell::new(1),
                        max_resets: 100,
                        client_send: Duration::from_secs(60),
                        waker: RefCell::new(None),
                        scratch: RefCell::new(BytesMut::new()),
                    }),
                    head: Vec::new(),
                    head_pos: 0,
                    body: None,
                    chunked: false,
                    pending: Bytes::new(),
                    early: BytesMut::new(),
                    early_end: false,
                    respond: Rc::new(RefCell::new(Some(respond))),
                    send: None,
                    answer: Answer::Head(Vec::new()),
                    head_request: req.method() == http::Method::HEAD,
                    malformed: false,
                };
                for piece in pieces {
                    stream.write_bytes(piece).await.map_err(|e| e.kind())?;
                }
                if shutdown {
                    stream.shutdown().await.map_err(|e| e.kind())?;
                }
                Ok(())
            });
            let (mut client, conn) = ::h2::client::handshake(client_io).await.unwrap();
            tokio::task::spawn_local(async move {
                let _ = conn.await;
            });
            let request = http::Request::builder()
                .method(method)
                .uri("http://a.test/")
                .body(())
                .unwrap();
            let (mut answer, _) = client.send_request(request, true).unwrap();
            server.await.unwrap()?;
            let mut informational = Vec::new();
            while let Some(hint) = poll_fn(|cx| answer.poll_informational(cx)).await {
                let hint = hint.map_err(|_| io::ErrorKind::ConnectionReset)?;
                let link = hint
                    .headers()
                    .get("link")
                    .map(|v| v.to_str().unwrap().to_owned());
                informational.push((hint.status().as_u16(), link));
            }
            let answer = answer.await.map_err(|_| io::ErrorKind::ConnectionReset)?;
            let (parts, mut body) = answer.into_parts();
            let mut got = Vec::new();
            while let Some(data) = body.data().await {
                let data = data.map_err(|_| io::ErrorKind::ConnectionReset)?;
                let _ = body.flow_control().release_capacity(data.len());
                got.extend_from_slice(&data);
            }
            Ok(Got {
                informational,
                status: parts.status.as_u16(),
                fields: parts.headers,
                body: got,
            })
        })
    }

    #[test]
    fn answers_become_headers_and_data_however_they_are_written() {
        let answer: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\
            Server: origin\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\
            Keep-Alive: timeout=5\r\nX-Request-Id: 0af7651916cd43dd\r\nX-Custom:  v \r\n\r\nhello";
        let in_threes: Vec<&[u8]> = answer.chunks(3).collect();
        for pieces in [vec![answer], in_threes] {
            let (status, fields, body) = answered("GET", &pieces).unwrap();
            assert_eq!(status, 200);
            assert_eq!(body, b"hello");
            let field = |n: &str| fields.get(n).map(|v| v.to_str().unwrap().to_owned());
            assert_eq!(field("content-length").as_deref(), Some("5"));
            assert_eq!(field("server").as_deref(), Some("origin"));
            assert_eq!(field("x-request-id").as_deref(), Some("0af7651916cd43dd"));
            assert_eq!(field("x-custom").as_deref(), Some("v"));
            assert_eq!(field("connection"), None);
            assert_eq!(field("keep-alive"), None);
            assert_eq!(fields.len(), 4, "{fields:?}");
        }
        // A HEAD answer and a 204 end with their HEADERS whatever their length says.
        let (status, fields, body) =
            answered("HEAD", &[b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"]).unwrap();
        assert_eq!((status, body.len()), (200, 0));
        assert_eq!(fields.get("content-length").unwrap(), "5");
        let (status, _, body) = answered("GET", &[b"HTTP/1.1 204 No Content\r\n\r\n"]).unwrap();
        assert_eq!((status, body.len()), (204, 0));
        // A chunked answer arrives as its data, without its framing or its coding field.
        let (status, fields, body) = answered(
            "GET",
            &[
                b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
                b"lo\r\n0\r\n\r\n",
            ],
        )
        .unwrap();
        assert_eq!((status, body.as_slice()), (201, &b"hello"[..]));
        assert_eq!(fields.get("transfer-encoding"), None);
    }

    #[test]
    fn informational_answers_go_out_as_informational_headers() {
        let answer: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n\
            HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nContent-Length: 9\r\n\r\n\
            HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let in_fives: Vec<&[u8]> = answer.chunks(5).collect();
        for pieces in [vec![answer], in_fives] {
            let got = answered_in_full("GET", &pieces, false).unwrap();
            assert_eq!(
                got.informational,
                [(100, None), (103, Some("</a.css>; rel=preload".to_owned()))]
            );
            assert_eq!((got.status, got.body.as_slice()), (200, &b"ok"[..]));
        }
        // No protocol switch on HTTP/2.
        assert_eq!(
            answered("GET", &[b"HTTP/1.1 101 Switching Protocols\r\n\r\n"]),
            Err(io::ErrorKind::InvalidData)
        );
    }

    #[test]
    fn a_body_delimited_by_the_close_ends_whole_only_when_shut_down() {
        let cut: &[&[u8]] = &[b"HTTP/1.1 200 OK\r\nServer: o\r\n\r\nthe st", b"art"];
        let got = answered_in_full("GET", cut, true).unwrap();
        assert_eq!((got.status, got.body.as_slice()), (200, &b"the start"[..]));
        assert_eq!(got.fields.get("content-length"), None);
        // Dropped without `shutdown` (the upstream failed mid-body): reset, not ended.
        assert_eq!(
            answered_in_full("GET", cut, false).err(),
            Some(io::ErrorKind::ConnectionReset)
        );
    }

    #[test]
    fn only_chunked_is_taken_apart_and_no_content_states_no_length() {
        for head in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(
                answered("GET", &[head]),
                Err(io::ErrorKind::InvalidData),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
        // Without a body there is nothing to decode.
        let (status, _, body) = answered(
            "HEAD",
            &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"],
        )
        .unwrap();
        assert_eq!((status, body.len()), (200, 0));
        // A 204 with a length loses it (RFC 9110 §8.6); a HEAD answer keeps the GET one's.
        let (status, fields, _) = answered(
            "GET",
            &[b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-A: a\r\n\r\n"],
        )
        .unwrap();
        assert_eq!(status, 204);
        assert_eq!(fields.get("content-length"), None);
        assert_eq!(fields.get("x-a").unwrap(), "a");
    }

    #[test]
    fn an_answer_head_with_a_field_a_parser_refuses_is_refused_whole() {
        for head in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding : chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-A: a\nX-B: b\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
        ] {
            assert_eq!(
                answered("GET", &[head]),
                Err(io::ErrorKind::InvalidData),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn answer_trailers_keep_only_what_http2_may_carry() {
        let raw = b"X-Checksum: abc\r\nContent-Length: 5\r\nConnection: close\r\n\
                    Host: h\r\nBad Name: x\r\nno colon\r\nServer-Timing:  db;dur=5 \r\n\
                    x-checksum: def\r\n\r\n";
        let t = trailer_fields(raw);
        let got: Vec<(&str, &str)> = t
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                ("x-checksum", "abc"),
                ("x-checksum", "def"),
                ("server-timing", "db;dur=5")
            ]
        );
        assert!(trailer_fields(b"\r\n").is_empty());
    }

    #[test]
    fn answer_fields_are_named_dropped_or_refused() {
        use http::header;
        for (name, expected) in [
            (
                &b"Content-Type"[..],
                AnswerField::Named(header::CONTENT_TYPE),
            ),
            (b"DATE", AnswerField::Named(header::DATE)),
            (b"HTTP2-Settings", AnswerField::Drop),
            (b"etag", AnswerField::Named(header::ETAG)),
            (b"Vary", AnswerField::Named(header::VARY)),
            (b"Server", AnswerField::Named(header::SERVER)),
            (b"Last-Modified", AnswerField::Named(header::LAST_MODIFIED)),
            (b"Accept-Ranges", AnswerField::Named(header::ACCEPT_RANGES)),
            (b"Cache-Control", AnswerField::Named(header::CACHE_CONTROL)),
            (b"Set-Cookie", AnswerField::Named(header::SET_COOKIE)),
            (
                b"X-Custom-Thing",
                AnswerField::Named(http::HeaderName::from_static("x-custom-thing")),
            ),
            (b"Content-Length", AnswerField::ContentLength),
            (b"X-Request-ID", AnswerField::RequestId),
            (b"Transfer-Encoding", AnswerField::Chunked),
            (b"Connection", AnswerField::Drop),
            (b"Keep-Alive", AnswerField::Drop),
            (b"Proxy-Connection", AnswerField::Drop),
            (b"Upgrade", AnswerField::Drop),
            (b"TE", AnswerField::Drop),
            (b"Bad Name", AnswerField::Invalid),
            (b"Bad\x7fName", AnswerField::Invalid),
        ] {
            assert_eq!(
                answer_field(name),
                expected,
                "{:?}",
                String::from_utf8_lossy(name)
            );
        }
        assert_eq!(X_REQUEST_ID.as_str(), "x-request-id");
    }

    #[test]
    fn head_end_is_found_across_the_scan_start() {
        assert_eq!(find_head_end(b"HTTP/1.1 200 OK\r\n\r\nbody", 0), Some(19));
        assert_eq!(find_head_end(b"HTTP/1.1 200 OK\r\n\r\n", 15), Some(19));
        assert_eq!(find_head_end(b"HTTP/1.1 200 OK\r\n", 0), None);
        assert_eq!(find_head_end(b"ab", 5), None);
    }

    #[test]
    fn a_request_without_a_path_is_not_served_as_slash() {
        let parts = |method: &str, parts: http::uri::Parts| {
            let uri = http::Uri::from_parts(parts).unwrap();
            let req = http::Request::builder().method(method).uri(uri);
            req.body(()).unwrap().into_parts().0
        };
        let with = |pq: Option<&'static str>, authority: Option<&'static str>| {
            let mut p = http::uri::Parts::default();
            p.path_and_query = pq.map(http::uri::PathAndQuery::from_static);
            if let Some(a) = authority {
                p.scheme = Some(http::uri::Scheme::HTTPS);
                p.authority = Some(http::uri::Authority::from_static(a));
            }
            p
        };
        // What h2 makes of `:method GET` with no `:path` and no `:authority` (a `host` field
        // instead): an empty URI.
        assert!(!has_path(&parts("GET", with(None, None))));
        assert!(has_path(&parts("GET", with(Some("/"), None))));
        assert!(has_path(&parts("GET", with(Some("/a?b"), Some("h.test")))));
        assert!(has_path(&parts("OPTIONS", with(Some("*"), None))));
        // CONNECT has none (and is refused later with 405).
        let mut connect = http::uri::Parts::default();
        connect.authority = Some(http::uri::Authority::from_static("h.test:443"));
        assert!(has_path(&parts("CONNECT", connect)));
    }

    #[test]
    fn requests_become_http1_heads() {
        let req = http::Request::builder()
            .method("POST")
            .uri("https://api.example:8443/items?x=1")
            .header("host", "ignored.example")
            .header("cookie", "a=1")
            .header("cookie", "")
            .header("cookie", "b=2")
            .header("te", "trailers")
            .header("x-custom", "v")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let (head, chunked) = request_head(&parts, None);
        assert!(chunked);
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "POST /items?x=1 HTTP/1.1\r\nhost: api.example:8443\r\nx-custom: v\r\n\
             cookie: a=1; b=2\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        // With a length, or with no body at all, nothing is chunked.
        let req = http::Request::builder()
            .method("PUT")
            .uri("http://h/u")
            .header("content-length", "3")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let (head, chunked) = request_head(&parts, None);
        assert!(!chunked);
        assert!(String::from_utf8(head)
            .unwrap()
            .contains("content-length: 3\r\n"));
        let (parts, ()) = http::Request::get("http://h/")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(
            request_head(&parts, Some(0)),
            (b"GET / HTTP/1.1\r\nhost: h\r\n\r\n".to_vec(), false)
        );
        // A body all here already goes with its length.
        assert_eq!(
            request_head(&parts, Some(12)),
            (
                b"GET / HTTP/1.1\r\nhost: h\r\ncontent-length: 12\r\n\r\n".to_vec(),
                false
            )
        );
        // A POST without a body says its length is 0 (before: no length at all).
        let (parts, ()) = http::Request::post("http://h/")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(
            request_head(&parts, Some(0)),
            (
                b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n".to_vec(),
                false
            )
        );
    }
}
