//! The client side of a connection: reading request heads (and parking idle connections),
//! answering without an upstream, counting the bytes on the wire, and the lingering close.
//!
//! Hot path. The connection owns its read buffer, a scratch buffer for the fields the gateway
//! writes, and the iovec array for vectored writes; all are reused from request to request.

use std::future::Future;
use std::task::Poll;
use std::time::{Duration, Instant};

use common::{Limits, Timeouts};
use monoio::io::{AsyncWriteRentExt, Canceller};
use monoio::net::TcpStream;

use super::context::RequestCtx;
use super::stream::ClientStream;
use crate::codec::chunked::ChunkedDecoder;
use crate::codec::request::{
    as_http11, normalize_path, parse_request_into, ParseError, RequestHead,
};
use crate::codec::response::ResponseHead;
use crate::codec::{BodyKind, FieldPlan, Reparse, Span};
use crate::error::ErrorKind;
use crate::gather::{write_gathered, Piece};
use crate::io::{read_more, read_more_keeping, write_range, ReadError, ReadTimer};
use crate::status::Status;
use crate::upstream::UpstreamConn;
use crate::worker_ctx::WorkerCtx;

/// Appends `head` (a status line and field lines, each ending in CRLF) to `out`, without the
/// fields named in `drop` (lower-case): a route's `response_headers` replace the gateway's
/// own fields of those names too.
fn push_head_without(out: &mut Vec<u8>, head: &[u8], drop: Option<&[Box<[u8]>]>) {
    let Some(drop) = drop else {
        out.extend_from_slice(head);
        return;
    };
    for (k, line) in head.split_inclusive(|&b| b == b'\n').enumerate() {
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        if k > 0 && drop.iter().any(|d| d.eq_ignore_ascii_case(name)) {
            continue;
        }
        out.extend_from_slice(line);
    }
}

/// A client connection's read buffer starts at its stream's `READ_BUF`; it grows up to
/// `max_header_bytes` for a large head and to [`BODY_BUF`] to relay a large request body.
pub(crate) const BODY_BUF: usize = 64 * 1024;
/// Longest a lingering close waits for the client to stop sending.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// Most a lingering close reads and discards.
const LINGER_BYTES: usize = 16 * 1024 * 1024;

/// What waiting for the next request head gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Head {
    /// A request head, parsed into the caller's `RequestHead` (a few hundred bytes, written
    /// once there instead of copied out through each layer's return).
    Request,
    /// The client closed, or the connection failed: nothing more to send.
    Closed,
    /// No next request in time (`client_idle_ms`), or the worker drains: close, telling
    /// the client the connection ended in order (close_notify over TLS).
    Done,
    /// Idle past `client_park_ms`: hand the socket to the worker's park lot.
    Park,
}

/// A response the gateway makes itself.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Reply<'a> {
    Canned(Status),
    /// A direct response: head without its blank line, then the body.
    Direct {
        status: u16,
        bytes: &'a [u8],
        head_len: usize,
    },
}

/// How a request ended for the client connection.
/// Returned by every request's phases, so it is kept two words small: the rare upgrade is
/// boxed (one allocation per upgraded connection) rather than copy the connection and the
/// response head on every return.
#[derive(Debug)]
pub(crate) enum Next {
    /// Ready for the next request on this connection.
    KeepAlive,
    /// Close the connection; every answer on it went out whole.
    Close,
    /// Close the connection at once: the answer was cut short (or could not be written), so
    /// nothing may tell the client it ended (no close_notify over TLS, no lingering close).
    Cut,
    /// The upstream switched protocols: tunnel bytes both ways from now on, over this
    /// upstream connection, after relaying its 101 head.
    Upgrade(Box<(UpstreamConn, ResponseHead, super::connector::Hold)>),
}

/// A client connection.
pub(crate) struct Downstream<S> {
    pub stream: S,
    /// Read buffer; `buf[pos..]` is received and not yet consumed.
    pub buf: Vec<u8>,
    pub pos: usize,
    pub scratch: Vec<u8>,
    pub iov: Vec<libc::iovec>,
    pub req_plan: FieldPlan,
    pub resp_plan: FieldPlan,
    pub limits: Limits,
    pub timeouts: Timeouts,
    /// Requests served on this connection.
    pub served: u64,
    /// When the connection's first request head is due: `client_header_ms` after the
    /// connection began (none for a connection resumed after it served requests).
    first_head_by: Option<Instant>,
    /// Cancels the read that waits for a next request when the connection parks.
    canceller: Canceller,
    /// The deadline of its reads.
    timer: ReadTimer,
    /// The deadline of the reads of its upstream exchanges, lent to each upstream connection
    /// for the exchange (`UpstreamConn::lend_timer`).
    pub upstream_timer: ReadTimer,
    /// The client may still be sending the request body (set as a request with a body
    /// starts, cleared once the body has been read): a close is a lingering close.
    pub linger: bool,
    /// Large response bodies may go through a pipe (`[relay] splice`, set per request).
    pub splice: bool,
}

impl<S> std::fmt::Debug for Downstream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downstream")
            .field("buffered", &(self.buf.len() - self.pos))
            .field("served", &self.served)
            .finish_non_exhaustive()
    }
}

impl<S: ClientStream> Downstream<S> {
    pub fn new(stream: S, limits: Limits, timeouts: Timeouts, served: u64) -> Self {
        Downstream {
            stream,
            buf: Vec::with_capacity(S::READ_BUF),
            pos: 0,
            scratch: Vec::with_capacity(512),
            iov: Vec::with_capacity(16),
            req_plan: FieldPlan::default(),
            resp_plan: FieldPlan::default(),
            limits,
            timeouts,
            served,
            first_head_by: (served == 0).then(|| Instant::now() + timeouts.client_header),
            canceller: Canceller::new(),
            timer: ReadTimer::default(),
            upstream_timer: ReadTimer::default(),
            linger: false,
            // Set from the snapshot with each request; copying is the default.
            splice: false,
        }
    }

    /// The client's socket when a large body may be spliced into it: splicing is on
    /// (`[relay] splice`) and the stream is plain TCP.
    pub fn splice_socket(&self) -> Option<&TcpStream> {
        if self.splice {
            self.stream.splice_socket()
        } else {
            None
        }
    }

    /// Reads until a whole request head is buffered at `buf[0..]` and parsed into `head`.
    /// `Err`: answer with that error's status and close. `idle_from`: when the previous
    /// request ended, if the clock was read for it (the keep-alive wait counts from there).
    pub async fn read_head(
        &mut self,
        ctx: &WorkerCtx,
        mut idle_from: Option<Instant>,
        head: &mut RequestHead,
    ) -> Result<Head, ErrorKind> {
        // Move pipelined bytes to the front so the head's offsets start at 0.
        if self.pos > 0 {
            self.buf.copy_within(self.pos.., 0);
            self.buf.truncate(self.buf.len() - self.pos);
            self.pos = 0;
        }
        let mut header_deadline = None;
        // No request line read yet (an error before one was is logged without one).
        head.method = Span::default();
        let mut reparse = Reparse::default();
        loop {
            // Where the parser's answer turns into a 431 or a 414 (`parse_request_into`).
            let marks = [self.limits.max_header_bytes, self.limits.max_uri_bytes + 65];
            if !self.buf.is_empty()
                && !self.preface_so_far()
                && reparse.due(&self.buf, &marks)
                && self.parse_head(head)?
            {
                normalize_path(&mut self.buf, head);
                return Ok(Head::Request);
            }
            let waiting_idle = self.buf.is_empty();
            let mut deadline = match header_deadline {
                Some(d) => d,
                // The connection's first head is due `client_header_ms` after its start (its
                // accept, or its TLS handshake's end), not after its first byte: a client
                // that waits before sending it gets no more time (before, up to twice).
                None if self.served == 0 => {
                    let client_header = self.timeouts.client_header;
                    let d = (self.first_head_by).unwrap_or_else(|| Instant::now() + client_header);
                    header_deadline = Some(d);
                    d
                }
                None if !waiting_idle => {
                    let d = Instant::now() + self.timeouts.client_header;
                    header_deadline = Some(d);
                    d
                }
                None => {
                    // The park timer below counts from the same reading.
                    *idle_from.get_or_insert_with(Instant::now) + self.timeouts.client_idle
                }
            };
            // A new connection's first request is still served (once, then closed): it may
            // be on its way, or already in (a TLS session's buffer).
            if waiting_idle && self.served > 0 && ctx.draining.get() {
                match ctx.handover_until.get() {
                    // A binary upgrade: the client may be sending its next request already;
                    // it is answered (with `Connection: close`) if it comes within the grace.
                    Some(until) if Instant::now() < until => deadline = deadline.min(until),
                    _ => return Ok(Head::Done),
                }
            }
            let slot = (waiting_idle && S::WHOLE_CONNECTION)
                .then(|| ctx.idle.borrow_mut().insert(Some(self.stream.as_raw_fd())));
            let park_after = self.timeouts.client_park.filter(|_| {
                // Not while draining: nothing resumes parked connections any more.
                S::PARKABLE
                    && waiting_idle
                    && self.served > 0
                    && !ctx.draining.get()
                    && ctx.park.borrow().is_some()
            });
            let res = match park_after {
                Some(grace) => {
                    let until = idle_from.unwrap_or_else(Instant::now) + grace;
                    self.read_or_park(until).await
                }
                // The rest of a head that began: at its timeout the bytes that came are
                // kept, for the 408's log line.
                None if !waiting_idle && S::WHOLE_CONNECTION => read_more_keeping(
                    &mut self.stream,
                    &mut self.buf,
                    &mut self.pos,
                    self.limits.max_header_bytes,
                    deadline,
                    &mut self.timer,
                    &mut self.canceller,
                )
                .await
                .map(Some),
                None => {
                    let want = self.limits.max_header_bytes;
                    read_more(
                        &mut self.stream,
                        &mut self.buf,
                        &mut self.pos,
                        want,
                        deadline,
                        &mut self.timer,
                    )
                    .await
                    .map(Some)
                }
            };
            if let Some(slot) = slot {
                ctx.idle.borrow_mut().remove(slot);
            }
            match res {
                // A drain that began while the connection waited: nothing resumes parked
                // connections any more, so it waits on here (a binary upgrade's grace takes
                // one more request) or ends, as any idle connection does now.
                Ok(None) if ctx.draining.get() => continue,
                Ok(None) => return Ok(Head::Park),
                // The client ended its side in order (over TLS, its close_notify), before or
                // in the middle of a head: nobody to answer, and the gateway ends its side in
                // order too (RFC 8446 6.1: close_notify in reply). Or the drain shut an idle
                // socket's reading down (`worker::supervise`): an end of the gateway's making.
                Ok(Some(0)) => return Ok(Head::Done),
                // A new request's first bytes: it is read under the config in force now (a
                // change made while the connection waited for it holds for it; before, its
                // head was read under the last request's limits and header timeout).
                Ok(Some(_)) if waiting_idle => {
                    let snap = ctx.snapshot();
                    self.limits = snap.limits;
                    self.timeouts = snap.timeouts;
                }
                Ok(Some(_)) => {}
                Err(ReadError::Timeout) if waiting_idle => return Ok(Head::Done),
                Err(ReadError::Timeout) => return Err(ErrorKind::ClientTimeout),
                Err(ReadError::Io | ReadError::Stalled | ReadError::ClientLeft) => {
                    return Ok(Head::Closed)
                }
            }
        }
    }

    /// Parses the buffered request head into `head` (`Ok(true)`: complete), an `HTTP/1.2` to
    /// `HTTP/1.9` request line read as `HTTP/1.1` ([`as_http11`]).
    fn parse_head(&mut self, head: &mut RequestHead) -> Result<bool, ParseError> {
        match parse_request_into(&self.buf, &self.limits, &mut self.req_plan, head) {
            Err(ParseError::VersionNotSupported) if as_http11(&mut self.buf) => {
                parse_request_into(&self.buf, &self.limits, &mut self.req_plan, head)
            }
            parsed => parsed,
        }
    }

    /// Whether the connection's first bytes could still become the HTTP/2 preface's head,
    /// which `serve_stream` hands to HTTP/2 on an `h2c` listener. Parsed as a request line, a
    /// preface that arrived in pieces would be a 505.
    fn preface_so_far(&self) -> bool {
        let head = super::http2::PREFACE_HEAD;
        S::PRIOR_KNOWLEDGE
            && self.served == 0
            && self.buf.len() < head.len()
            && head.starts_with(&self.buf)
    }

    /// Waits until `until` (the park grace) for the next request's first bytes. `Ok(None)`:
    /// nothing came and the read was cancelled without consuming anything, so the connection
    /// can park.
    async fn read_or_park(&mut self, until: Instant) -> Result<Option<usize>, ReadError> {
        // Given up at `until`: cancelled, then waited for either way, so bytes that arrived
        // in the meantime are returned with the buffer, never lost.
        let (res, _) = self.read_unless(0, until, |_| Err(())).await;
        match res {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => Ok(None),
            Err(_) => Err(ReadError::Io),
        }
    }

    /// Answers without an upstream. The request body is consumed if it is all buffered;
    /// otherwise the connection closes after answering rather than read a body nobody wants.
    pub async fn respond(
        &mut self,
        ctx: &WorkerCtx,
        req: &mut RequestCtx,
        head: &RequestHead,
        reply: Reply<'_>,
    ) -> Next {
        let complete = self.skip_buffered_body(head, req);
        if complete {
            self.linger = false;
        }
        let close = !complete || !head.keep_alive || ctx.draining.get();
        let (status, head_bytes, body) = match reply {
            Reply::Direct {
                status,
                bytes,
                head_len,
            } => (status, &bytes[..head_len], &bytes[head_len..]),
            Reply::Canned(status) => {
                let (h, b) = split_canned(status.response(false));
                (status.code(), h, b)
            }
        };
        // A canned answer to an HTTP/1.0 client closes too: it carries no keep-alive.
        let close = close || (matches!(reply, Reply::Canned(_)) && head.http10);
        let connection: &[u8] = if close {
            b"Connection: close\r\n"
        } else if head.http10 {
            b"Connection: keep-alive\r\n"
        } else {
            b""
        };
        let body = if head.is_head(&self.buf) {
            &[][..]
        } else {
            body
        };
        if !self
            .write_answer(req, status, head_bytes, connection, body)
            .await
        {
            Next::Cut
        } else if close {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }

    /// Sends an answer the gateway composed for this request (an aggregate's): `head` is the
    /// status line and fields without the blank line, `body` goes out from its own buffer in
    /// the same vectored write (not copied); the connection is kept when the client allows.
    #[allow(clippy::too_many_arguments)]
    pub async fn send_made(
        &mut self,
        ctx: &WorkerCtx,
        req: &mut RequestCtx,
        status: u16,
        head: &[u8],
        body: &mut Vec<u8>,
        keep_alive: bool,
        http10: bool,
    ) -> Next {
        let close = !keep_alive || ctx.draining.get();
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        push_head_without(&mut out, head, req.response_drop.as_deref());
        crate::status::push_date(&mut out);
        push_request_id(&mut out, req);
        out.extend_from_slice(&req.response_fields);
        // The policies' fields (CORS, a rate limit's), which the route's edits leave alone.
        out.extend_from_slice(&req.policy.response_extra);
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if http10 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        let pieces = [
            Piece::Extra(Span {
                start: 0,
                end: out.len(),
            }),
            Piece::Src(Span {
                start: 0,
                end: body.len(),
            }),
        ];
        let sent = write_gathered(
            &mut self.stream,
            body,
            &mut out,
            &mut self.iov,
            pieces.into_iter(),
            S::COALESCE,
        )
        .await;
        self.scratch = out;
        match sent {
            Ok(n) => {
                req.status = status;
                req.bytes_out += n as u64;
                if close {
                    Next::Close
                } else {
                    Next::KeepAlive
                }
            }
            Err(_) => {
                req.fail(ErrorKind::ClientClosed);
                req.status = ErrorKind::ClientClosed.status();
                Next::Cut
            }
        }
    }

    /// Writes an answer the gateway makes itself: `head` (status line and fields, without
    /// the blank line), the request id, `connection` (a Connection field line, or nothing),
    /// the blank line, then `body`. `false`: the client got nothing (logged as 499).
    async fn write_answer(
        &mut self,
        req: &mut RequestCtx,
        status: u16,
        head: &[u8],
        connection: &[u8],
        body: &[u8],
    ) -> bool {
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        push_head_without(&mut out, head, req.response_drop.as_deref());
        crate::status::push_date(&mut out);
        push_request_id(&mut out, req);
        out.extend_from_slice(&req.response_fields);
        // A cors policy's fields: a page may read the gateway's own answers too.
        out.extend_from_slice(&req.policy.response_extra);
        out.extend_from_slice(connection);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
        let len = out.len();
        let res = write_range(&mut self.stream, &mut out, 0..len).await;
        self.scratch = out;
        match res {
            Ok(()) => {
                req.status = status;
                req.bytes_out += len as u64;
                true
            }
            Err(_) => {
                req.fail(ErrorKind::ClientClosed);
                req.status = ErrorKind::ClientClosed.status();
                false
            }
        }
    }

    /// Consumes the request body if it is entirely in the buffer.
    fn skip_buffered_body(&mut self, head: &RequestHead, req: &mut RequestCtx) -> bool {
        let avail = &self.buf[head.head_end..];
        let used = match head.body {
            BodyKind::None | BodyKind::UntilClose => Some(0),
            BodyKind::Length(n) => usize::try_from(n).ok().filter(|&n| n <= avail.len()),
            BodyKind::Chunked => {
                let mut d = ChunkedDecoder::new(self.limits.max_header_bytes);
                match d.advance(avail) {
                    Ok(n) if d.is_done() => Some(n),
                    _ => None,
                }
            }
        };
        match used {
            Some(n) => {
                self.pos = head.head_end + n;
                req.bytes_in += n as u64;
                true
            }
            None => false,
        }
    }

    /// Answers with the canned response for `kind` (if the client can still take one),
    /// records the error, and closes.
    pub async fn fail(&mut self, req: &mut RequestCtx, kind: ErrorKind) -> Next {
        // An HTTP/2 stream h2 reset for a malformed request (its body against its
        // `content-length`): a bad request, not the client gone (seen by the reset's watch or
        // the body's read, whichever came first).
        let kind = match kind == ErrorKind::ClientClosed && self.stream.reset_for_malformed() {
            true => ErrorKind::BadRequest,
            false => kind,
        };
        req.fail(kind);
        match kind.response() {
            Some(status) => {
                let (head, body) = split_canned(status.response(true));
                // A HEAD's answer has the body's length and no body.
                let body = if req.head_only { &[][..] } else { body };
                if self.write_answer(req, status.code(), head, b"", body).await {
                    Next::Close
                } else {
                    if kind == ErrorKind::BadRequest {
                        // Logged with the status it earned, as nginx logs a 400 it could
                        // not send (an HTTP/2 stream reset as malformed has no answer).
                        req.status = status.code();
                    }
                    Next::Cut
                }
            }
            // No answer for the client (it is gone or timed out): a plain close.
            None => Next::Cut,
        }
    }

    /// Answers with the canned response for an upstream failure `kind` a request whose body
    /// was read whole (or that had none) met before anything of its answer went out: nothing
    /// is left to read, so the connection goes on (as nginx's after its 502 or 504), unless
    /// the request (HTTP/1.0, `Connection: close`) or a drain ends it.
    pub async fn fail_keeping(
        &mut self,
        ctx: &WorkerCtx,
        req: &mut RequestCtx,
        head: &RequestHead,
        kind: ErrorKind,
    ) -> Next {
        let Some(status) = kind.response() else {
            return self.fail(req, kind).await;
        };
        req.fail(kind);
        let close = !head.keep_alive || head.http10 || ctx.draining.get();
        let (head_bytes, body) = split_canned(status.response(close));
        let body = if req.head_only { &[][..] } else { body };
        match self
            .write_answer(req, status.code(), head_bytes, b"", body)
            .await
        {
            false => Next::Cut,
            true if close => Next::Close,
            true => Next::KeepAlive,
        }
    }

    /// Writes `src[range]` to the client, counting it, when the caller needs none of `src`'s
    /// bytes afterwards: `src` may come back empty (see [`ClientStream::write_spent`]).
    pub async fn send(
        &mut self,
        req: &mut RequestCtx,
        src: &mut Vec<u8>,
        range: std::ops::Range<usize>,
    ) -> std::io::Result<()> {
        let len = range.len() as u64;
        self.stream.write_spent(src, range).await?;
        req.bytes_out += len;
        Ok(())
    }

    /// Reads more of the request body into the buffer (after `pos`), waiting at most
    /// `client_body_ms`. A client that closes or stalls is `ClientClosed`, one that is silent
    /// too long `ClientTimeout`.
    pub async fn read_body_bytes(&mut self) -> Result<(), ErrorKind> {
        let deadline = Instant::now() + self.timeouts.client_body;
        match read_more(
            &mut self.stream,
            &mut self.buf,
            &mut self.pos,
            BODY_BUF,
            deadline,
            &mut self.timer,
        )
        .await
        {
            Ok(0) | Err(ReadError::Io | ReadError::Stalled | ReadError::ClientLeft) => {
                Err(ErrorKind::ClientClosed)
            }
            Err(ReadError::Timeout) => Err(ErrorKind::ClientTimeout),
            Ok(_) => Ok(()),
        }
    }

    /// Reads until the buffer holds its first `end` bytes (a request's whole body after its
    /// head), each read waiting at most `client_body_ms`; the bytes already in the buffer stay
    /// where they are (spans into the head stay valid), and it grows as far as `end`.
    pub async fn read_body_whole(&mut self, end: usize) -> Result<(), ErrorKind> {
        while self.buf.len() < end {
            self.read_body_some(end).await?;
        }
        Ok(())
    }

    /// Reads what the client has sent of its body after what the buffer holds, up to `cap`
    /// bytes of buffer in all (at least one byte, within `client_body_ms`).
    pub async fn read_body_some(&mut self, cap: usize) -> Result<(), ErrorKind> {
        let deadline = Instant::now() + self.timeouts.client_body;
        // Nothing before `keep` is consumed: no read compacts the buffer.
        let mut keep = 0;
        let read = crate::io::read_at_most(
            &mut self.stream,
            &mut self.buf,
            &mut keep,
            cap,
            usize::MAX,
            deadline,
            &mut self.timer,
            None,
        );
        match read.await {
            Ok(0) | Err(ReadError::Io | ReadError::Stalled | ReadError::ClientLeft) => {
                Err(ErrorKind::ClientClosed)
            }
            Err(ReadError::Timeout) => Err(ErrorKind::ClientTimeout),
            Ok(_) => Ok(()),
        }
    }

    /// [`Downstream::read_body_bytes`] into an emptied buffer, asking `stop` every `every`
    /// while the client sends nothing: once it says so the read is given up (see
    /// [`Downstream::read_unless`]) and `Ok(false)` tells the caller to read no more.
    pub async fn read_body_bytes_unless(
        &mut self,
        every: Duration,
        stop: impl Fn() -> bool,
    ) -> Result<bool, ErrorKind> {
        let deadline = Instant::now() + self.timeouts.client_body;
        let first = deadline.min(Instant::now() + every);
        let looks = |now| {
            if now >= deadline {
                Err(ErrorKind::ClientTimeout)
            } else if stop() {
                Err(ErrorKind::UpstreamClosed)
            } else {
                Ok(deadline.min(now + every))
            }
        };
        match self.read_unless(BODY_BUF, first, looks).await {
            // Bytes that came before the read was given up are read first.
            (Ok(n), _) if n > 0 => Ok(true),
            (_, Some(ErrorKind::ClientTimeout)) => Err(ErrorKind::ClientTimeout),
            (_, Some(_)) => Ok(false),
            (Ok(_), None) | (Err(_), None) => Err(ErrorKind::ClientClosed),
        }
    }

    /// Reads into the buffer, emptied first (with room for `room` bytes at least), while
    /// `looks`, asked at `first` and then whenever the time it gave comes, says when to look
    /// next; once it gives up (`Err`), the read is cancelled and waited for, so bytes that
    /// came meanwhile are kept with the buffer and a TLS session's state stays whole (an
    /// HTTP/2 stream's read, which takes no cancel, is dropped: that loses nothing). The
    /// checks ride on the connection's read timer, not a timer of their own per read.
    /// Returns the read's outcome and why it was given up, if it was.
    async fn read_unless<W>(
        &mut self,
        room: usize,
        first: Instant,
        mut looks: impl FnMut(Instant) -> Result<Instant, W>,
    ) -> (std::io::Result<usize>, Option<W>) {
        self.buf.clear();
        self.pos = 0;
        if self.buf.capacity() < room {
            self.buf.reserve(room);
        }
        let owned = std::mem::take(&mut self.buf);
        let read = self.stream.cancelable_read(owned, self.canceller.handle());
        let mut read = std::pin::pin!(read);
        let timer = &mut self.timer;
        timer.arm(first);
        let done = std::future::poll_fn(|cx| {
            if let Poll::Ready(done) = read.as_mut().poll(cx) {
                return Poll::Ready(Ok(done));
            }
            while timer.poll_expired(cx) {
                match looks(Instant::now()) {
                    Ok(next) => timer.arm(next),
                    Err(why) => return Poll::Ready(Err(why)),
                }
            }
            Poll::Pending
        })
        .await;
        let (given_up, (res, buf)) = match done {
            Ok(done) => (None, done),
            Err(why) if S::WHOLE_CONNECTION => {
                self.canceller = std::mem::take(&mut self.canceller).cancel();
                (Some(why), read.await)
            }
            Err(why) => (Some(why), (Ok(0), Vec::with_capacity(room))),
        };
        self.buf = buf;
        (res, given_up)
    }

    /// Sends `100 Continue` to a client waiting for it before sending its body.
    pub async fn send_continue(&mut self, req: &mut RequestCtx) -> std::io::Result<()> {
        let (res, _) = self.stream.write_all(crate::status::CONTINUE).await;
        res?;
        req.bytes_out += crate::status::CONTINUE.len() as u64;
        Ok(())
    }

    /// Closes a connection whose request body was not read to the end without destroying the
    /// answer already written: a close with unread input makes the kernel send a reset, which
    /// can reach the client before it has read the answer (RFC 9112 §9.6). Stops sending
    /// (FIN), then reads and discards what the client still sends until it closes, for at most
    /// `LINGER_TIME` and `LINGER_BYTES`.
    pub async fn linger_close(&mut self) {
        let deadline = Instant::now() + LINGER_TIME;
        // Within the same bound: over TLS the shutdown writes close_notify.
        let _ = monoio::time::timeout_at(deadline.into(), self.stream.shutdown()).await;
        let mut drained = 0;
        while drained < LINGER_BYTES {
            self.buf.clear();
            self.pos = 0;
            match read_more(
                &mut self.stream,
                &mut self.buf,
                &mut self.pos,
                BODY_BUF,
                deadline,
                &mut self.timer,
            )
            .await
            {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    }
}

/// How long a request waits for its answer before the gateway checks, before writing it, that
/// the client is still there (a client that gave up is logged as 499 and sent nothing).
const LEFT_CHECK_AFTER: Duration = Duration::from_millis(50);

/// Whether the client closed its end while the gateway was waiting for the upstream (one
/// non-blocking peek, only for answers that took a while).
pub(crate) fn client_left<S: ClientStream>(down: &Downstream<S>, req: &RequestCtx) -> bool {
    // The wait for the answer's first byte, when known, saves a clock reading. It leaves out
    // the time the request took to send: after a long upload answered at once, a client that
    // left meanwhile is not peeked at, like any client answered within LEFT_CHECK_AFTER (its
    // answer is written, and logged with that answer's status unless the write fails).
    let waited = match req.first_byte {
        Some(wait) => wait,
        None => req.started.elapsed(),
    };
    // A client with a pipelined request buffered may have half-closed after sending it all:
    // the peek would see its FIN alone.
    if waited < LEFT_CHECK_AFTER || down.pos < down.buf.len() {
        return false;
    }
    down.stream.client_gone()
}

/// A canned response split into its head without the blank line, and its body.
fn split_canned(bytes: &'static [u8]) -> (&'static [u8], &'static [u8]) {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("every canned response has a blank line (status.rs tests it)");
    (&bytes[..end + 2], &bytes[end + 4..])
}

/// Appends the field line `name: value\r\n`.
pub(crate) fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `X-Request-Id: <id>\r\n` when the request has an id.
pub(crate) fn push_request_id(out: &mut Vec<u8>, req: &RequestCtx) {
    out.extend_from_slice(req.request_id.field_line());
}
