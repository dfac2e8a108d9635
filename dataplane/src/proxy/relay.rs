//! The response body: [`BodyReader`] frames it as it arrives (length, chunked, until close),
//! and [`relay_response`] sends the head and the body on to the client.
//!
//! Hot path: the head goes out with one vectored write from the upstream's read buffer (the
//! first body bytes in the same write), and each later read is written on from the same
//! buffer; nothing is copied or allocated. A large length-framed body to a plain TCP client
//! goes socket to socket through a pipe instead ([`crate::splice`], `splice_rest`), with the
//! head written into the pipe ahead of it.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::context::RequestCtx;
use super::downstream::{client_left, push_request_id, Downstream};
use super::stream::ClientStream;
use crate::codec::chunked::ChunkedDecoder;
use crate::codec::response::ResponseHead;
use crate::codec::{BodyKind, Span};
use crate::error::{ErrorKind, ProxyError, SkipReason};
use crate::forward::response_pieces;
use crate::gather::{write_gathered, Gather};
use crate::io::ReadError;
use crate::json;
use crate::metrics::WorkerMetrics;
use crate::policy;
use crate::shape::{
    is_binary_type, is_event_stream, is_json_type, opens_json_so_far, AnswerFields,
};
use crate::splice::SpliceError;
use crate::upstream::{UpstreamConn, UPSTREAM_BUF, UPSTREAM_READ};
use common::aggregate::Shape;

/// Reads a response body from its upstream connection, piece by piece.
#[derive(Debug)]
pub(crate) struct BodyReader {
    kind: BodyKind,
    /// Bytes still to come (1 while a chunked or close-delimited body is not done).
    left: u64,
    decoder: Option<ChunkedDecoder>,
    /// The last piece ended exactly where the framing said: the connection holds nothing more.
    clean: bool,
    /// Longest wait for the next piece.
    idle: Duration,
    /// Body bytes that came with the head, at `head_end..` of the buffer.
    first: usize,
}

impl BodyReader {
    /// A reader for `resp`, whose head ends at `resp.head_end` in `buf`; the body bytes that
    /// arrived with the head are [`BodyReader::first`].
    pub fn start(resp: &ResponseHead, buf: &[u8], idle: Duration) -> Result<Self, ProxyError> {
        let avail = &buf[resp.head_end..];
        let mut decoder = None;
        let (first, left) = match resp.body {
            BodyKind::None => (0, 0u64),
            BodyKind::Length(n) => {
                let k = usize::try_from(n).map_or(avail.len(), |n| n.min(avail.len()));
                (k, n - k as u64)
            }
            BodyKind::Chunked => {
                let mut d = ChunkedDecoder::new(UPSTREAM_BUF);
                let k = d
                    .advance(avail)
                    .map_err(|_| ProxyError::new(ErrorKind::UpstreamMalformed))?;
                let left = u64::from(!d.is_done());
                decoder = Some(d);
                (k, left)
            }
            BodyKind::UntilClose => (avail.len(), 1),
        };
        Ok(BodyReader {
            kind: resp.body,
            left,
            decoder,
            clean: resp.head_end + first == buf.len(),
            idle,
            first,
        })
    }

    /// After [`BodyReader::collect`] stopped: whether it stopped for a chunked body's framing
    /// (its content was within `max`).
    pub fn framing_over(&self, max: usize) -> bool {
        self.decoder
            .as_ref()
            .is_some_and(|d| d.data_len() <= max as u64)
    }

    /// Body bytes that came in the same read as the head (right after it).
    pub fn first(&self) -> usize {
        self.first
    }

    /// Whether the whole body has been read.
    pub fn done(&self) -> bool {
        self.left == 0
    }

    /// Whether the body ended exactly where its framing said, leaving the connection clean for
    /// another request (always false for a close-delimited body).
    pub fn clean(&self) -> bool {
        self.left == 0 && self.clean
    }

    /// The body bytes still to come when they can be spliced: a length-framed body with at
    /// least [`crate::splice::SPLICE_MIN`] of them left.
    pub fn spliceable(&self) -> Option<u64> {
        (matches!(self.kind, BodyKind::Length(_)) && self.left >= crate::splice::SPLICE_MIN)
            .then_some(self.left)
    }

    /// Whether the body is large enough that, read apart from its head, most of it is spliced.
    pub fn large(&self) -> bool {
        let least = crate::splice::SPLICE_MIN + crate::splice::HEAD_READ as u64;
        matches!(self.kind, BodyKind::Length(n) if n >= least)
    }

    /// Whether a body of which `wire` bytes have been read (its framing included) is over
    /// `max` bytes of content: its chunks' data, or the bytes themselves.
    fn over(&self, wire: usize, max: usize) -> bool {
        match &self.decoder {
            Some(d) => d.data_len() > max as u64 || wire > max.saturating_mul(2) + 65536,
            None => wire > max,
        }
    }

    /// Whether the rest of a length-framed body fits in `room` bytes.
    pub fn rest_fits(&self, room: usize) -> bool {
        matches!(self.kind, BodyKind::Length(_)) && self.left > 0 && self.left <= room as u64
    }

    /// Records that the rest of the body was relayed without this reader (spliced), to its
    /// length; `extra`: the upstream sent more after it (so the connection is not reused).
    pub fn spliced(&mut self, extra: bool) {
        self.left = 0;
        self.clean = !extra;
    }

    /// Reads the next piece into `conn.buf` (cleared first). `Some(n)`: pass on
    /// `conn.buf[..n]`; `None`: the body is complete.
    pub async fn next(&mut self, conn: &mut UpstreamConn) -> Result<Option<usize>, ProxyError> {
        if self.left == 0 {
            return Ok(None);
        }
        conn.buf.clear();
        let n = match conn.read_more(Instant::now() + self.idle).await {
            // The close ends the body; over TLS, only with close_notify (RFC 9112 9.8: a TCP
            // end alone may be an attacker's cut).
            Ok(0) if self.kind == BodyKind::UntilClose && conn.stream.ended_cleanly() => {
                self.left = 0;
                self.clean = false;
                return Ok(None);
            }
            // Truncated: the client can only tell if the connection closes (RFC 9112 §8).
            Ok(0) | Err(ReadError::Io | ReadError::Stalled) => {
                return Err(ErrorKind::UpstreamClosed.into())
            }
            Err(ReadError::Timeout) => return Err(ErrorKind::ResponseTimeout.into()),
            Err(ReadError::ClientLeft) => return Err(ErrorKind::ClientClosed.into()),
            Ok(n) => n,
        };
        let take = match (self.kind, self.decoder.as_mut()) {
            (BodyKind::Chunked, Some(d)) => {
                let k = d
                    .advance(&conn.buf)
                    .map_err(|_| ProxyError::new(ErrorKind::UpstreamMalformed))?;
                if d.is_done() {
                    self.left = 0;
                }
                k
            }
            (BodyKind::UntilClose, _) => n,
            _ => {
                let k = usize::try_from(self.left).map_or(n, |l| l.min(n));
                self.left -= k as u64;
                k
            }
        };
        self.clean = take == conn.buf.len();
        Ok(Some(take))
    }

    /// Reads the whole rest of the body, appending its content to `out` (chunked framing
    /// removed). `Ok(false)`: the body is larger than `max` bytes (a fan-out step's bound;
    /// a chunked one's framing counts too once it passes `max` again and 64 KiB), and
    /// reading stopped there. `conn.buf` must still hold the head and the first body bytes.
    pub async fn collect(
        &mut self,
        conn: &mut UpstreamConn,
        head_end: usize,
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<bool, ProxyError> {
        let mut raw = Vec::new();
        let wire = if self.kind == BodyKind::Chunked {
            &mut raw
        } else {
            &mut *out
        };
        let start = wire.len();
        if self.over(self.first, max) {
            return Ok(false);
        }
        wire.extend_from_slice(&conn.buf[head_end..head_end + self.first]);
        while let Some(n) = self.next(conn).await? {
            if self.over(wire.len() - start + n, max) {
                return Ok(false);
            }
            wire.extend_from_slice(&conn.buf[..n]);
        }
        if self.kind == BodyKind::Chunked {
            crate::codec::chunked::decode_validated(&raw, out);
        }
        Ok(true)
    }
}

/// Adds the request's `X-Request-Id` to the fields the gateway writes (`extra`) and leaves out
/// any the upstream sent, when the request has an id (`[tracing] request_id`).
pub(crate) fn replace_request_id(
    extra: &mut Vec<u8>,
    drops: &mut Vec<Span>,
    buf: &[u8],
    resp: &ResponseHead,
    req: &RequestCtx,
) {
    if req.request_id.is_empty() {
        return;
    }
    push_request_id(extra, req);
    let fields = (resp.fields_start, resp.fields_end);
    policy::drop_field(buf, resp.request_id, fields, b"x-request-id", drops);
}

/// Writes into `down.scratch` the fields the gateway adds to a relayed response, ending with
/// the blank line: connection management towards this client only, the request id, the
/// route's own fields (`Vary`), the CORS fields of a cors policy (which replace any the
/// upstream sent), `Content-Length` for a body the gateway rewrote, and `Date` where the
/// upstream sent none (RFC 9110 6.6.1). An HTTP/1.0 client gets no `Transfer-Encoding`.
fn response_tail<S>(
    down: &mut Downstream<S>,
    req: &RequestCtx,
    buf: &[u8],
    resp: &ResponseHead,
    http10: bool,
    close_client: bool,
    content_length: Option<usize>,
) -> Span {
    down.scratch.clear();
    // The policies' fields (CORS, a rate limit's `headers_on_success`).
    down.scratch.extend_from_slice(&req.policy.response_extra);
    if req.policy.cors_ran {
        policy::drop_cors_fields(
            buf,
            resp.fields_start,
            resp.fields_end,
            &mut down.resp_plan.drop,
        );
    }
    replace_request_id(&mut down.scratch, &mut down.resp_plan.drop, buf, resp, req);
    if let Some(names) = &req.response_drop {
        // The route's `response_headers`: its values replace the upstream's.
        for name in names.iter() {
            let (fs, fe) = (resp.fields_start, resp.fields_end);
            policy::drop_named(buf, fs, fe, name, &mut down.resp_plan.drop);
        }
    }
    if http10 && resp.transfer_encoding {
        // A chunked body goes on without its chunks (and without the trailers `Trailer`
        // announces); a HEAD's or a 304's has none.
        let (fs, fe) = (resp.fields_start, resp.fields_end);
        for name in [&b"transfer-encoding"[..], b"trailer"] {
            policy::drop_named(buf, fs, fe, name, &mut down.resp_plan.drop);
        }
    }
    if !resp.dated {
        crate::status::push_date(&mut down.scratch);
    }
    down.scratch.extend_from_slice(&req.response_fields);
    if let Some(n) = content_length {
        down.scratch.extend_from_slice(b"Content-Length: ");
        crate::access_log::push_u64(&mut down.scratch, n as u64);
        down.scratch.extend_from_slice(b"\r\n");
    }
    if close_client {
        down.scratch.extend_from_slice(b"Connection: close\r\n");
    } else if http10 {
        down.scratch
            .extend_from_slice(b"Connection: keep-alive\r\n");
    }
    down.scratch.extend_from_slice(b"\r\n");
    Span {
        start: 0,
        end: down.scratch.len(),
    }
}

/// Writes the response head from `conn.buf` (minus the dropped fields), the gateway's fields
/// (`tail` in `down.scratch`) and the first `first_body` body bytes in one vectored write.
/// A client that is gone is recorded (logged as 499).
async fn send_head<S: ClientStream>(
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    conn: &mut UpstreamConn,
    resp: &ResponseHead,
    tail: Span,
    first_body: usize,
) -> Result<(), ProxyError> {
    // A stream that keeps what it sends takes a large first piece of the body from the
    // buffer it lies in (`write_spent`) rather than copy it with the head.
    let apart = S::KEEPS_WRITES && first_body * 2 >= conn.buf.capacity();
    let with_head = if apart { 0 } else { first_body };
    let pieces = response_pieces(resp, &down.resp_plan, tail, with_head);
    let mut sent = write_gathered(
        &mut down.stream,
        &mut conn.buf,
        &mut down.scratch,
        &mut down.iov,
        pieces,
        S::COALESCE,
    )
    .await
    .map(|n| {
        // The head went out: the client has its status, whatever becomes of the body.
        req.status = resp.status;
        req.bytes_out += n as u64;
    });
    if apart && sent.is_ok() {
        let body = resp.head_end..resp.head_end + first_body;
        sent = down.stream.write_spent(&mut conn.buf, body).await;
        if sent.is_ok() {
            req.bytes_out += first_body as u64;
        }
    }
    sent.map_err(|_| {
        req.fail(ErrorKind::ClientClosed);
        ErrorKind::ClientClosed.into()
    })
}

/// Passes an interim (1xx) answer at the start of `buf` on to the client, its fields as the
/// plan keeps them (hop-by-hop ones and any framing field dropped, as in a final head).
pub(crate) async fn send_interim<S: ClientStream>(
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    buf: &mut Vec<u8>,
    interim: &ResponseHead,
) -> Result<(), ()> {
    down.scratch.clear();
    down.scratch.extend_from_slice(b"\r\n");
    let end = Span { start: 0, end: 2 };
    let pieces = response_pieces(interim, &down.resp_plan, end, 0);
    let sent = write_gathered(
        &mut down.stream,
        buf,
        &mut down.scratch,
        &mut down.iov,
        pieces,
        S::COALESCE,
    )
    .await;
    match sent {
        Ok(n) => {
            req.bytes_out += n as u64;
            Ok(())
        }
        Err(_) => Err(()),
    }
}

/// Sends the head and a large body through a pipe ([`crate::splice`]) when splicing is on
/// (`[relay] splice`), the client's socket takes a splice and the body is large enough;
/// `None`: neither sent (not spliceable, or no pipe to spare).
async fn splice_rest<S: ClientStream>(
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    conn: &mut UpstreamConn,
    resp: &ResponseHead,
    tail: Span,
    body: &mut BodyReader,
) -> Option<Result<bool, ProxyError>> {
    // Field by field (not `Downstream::splice_socket`): the other fields are taken below.
    if !down.splice {
        return None;
    }
    // Through TLS the upstream's socket holds records, which are decrypted, not spliced.
    let upstream = conn.stream.tcp()?;
    let (client, len) = (down.stream.splice_socket()?, body.spliceable()?);
    let pieces = response_pieces(resp, &down.resp_plan, tail, body.first());
    let mut head = Gather::new(
        std::mem::take(&mut conn.buf),
        std::mem::take(&mut down.scratch),
        std::mem::take(&mut down.iov),
        pieces,
    );
    let idle = down.timeouts.upstream_body;
    let spliced = crate::splice::relay(upstream, client, &mut head, len, idle).await;
    (conn.buf, down.scratch, down.iov) = head.into_parts();
    let (n, failed) = match spliced {
        Ok(None) => return None,
        Ok(Some(n)) => (n, None),
        Err((e, n)) => (n, Some(e)),
    };
    if n > 0 {
        req.status = resp.status;
        req.bytes_out += n;
        req.spliced += n;
    }
    Some(match failed {
        None => {
            // Bytes after the body's end would be read as the next request's answer.
            let extra = crate::io::peek(conn.stream.as_raw_fd()) != crate::io::Peeked::Nothing;
            body.spliced(extra);
            Ok(body.clean())
        }
        Some(e) => Err(match e {
            SpliceError::UpstreamClosed => ErrorKind::UpstreamClosed,
            SpliceError::UpstreamTimeout => ErrorKind::ResponseTimeout,
            SpliceError::ClientClosed => ErrorKind::ClientClosed,
        }
        .into()),
    })
}

/// Sends the response head (minus hop-by-hop fields, plus the gateway's own) and its body to
/// the client. `Ok(true)`: the body ended exactly where the framing said and the upstream
/// connection is clean. On `Err`, `req.status` says whether the head went out (0: nothing was
/// sent, the client can still get an error answer).
pub(crate) async fn relay_response<S: ClientStream>(
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    conn: &mut UpstreamConn,
    resp: &ResponseHead,
    http10: bool,
    close_client: bool,
) -> Result<bool, ProxyError> {
    let idle = down.timeouts.upstream_body;
    if client_left(down, req) {
        req.fail(ErrorKind::ClientClosed);
        return Err(ErrorKind::ClientClosed.into());
    }
    if http10 && resp.body == BodyKind::Chunked {
        return relay_dechunked(down, req, conn, resp).await;
    }
    let tail = response_tail(down, req, &conn.buf, resp, http10, close_client, None);
    let mut body = BodyReader::start(resp, &conn.buf, idle)?;
    let mut cut = None;
    let bounded = conn.head_read(down.splice_socket().is_some()) != usize::MAX;
    conn.large_answers = body.large();
    if bounded && body.spliceable().is_none() {
        // The head was read with at most `splice::HEAD_READ` bytes: the rest of a body too
        // small to splice is read before the head goes out, so both go in one write. One
        // the upstream cuts short still gets its head and what came, like any other; one
        // that stalls is a 504 (the timed-out read took the buffer, and nothing was sent).
        while body.rest_fits(conn.buf.capacity() - conn.buf.len()) {
            match conn.read_more(Instant::now() + idle).await {
                Ok(0) | Err(ReadError::Io | ReadError::Stalled) => {
                    cut = Some(ErrorKind::UpstreamClosed);
                    break;
                }
                Err(ReadError::Timeout) => return Err(ErrorKind::ResponseTimeout.into()),
                Err(ReadError::ClientLeft) => return Err(ErrorKind::ClientClosed.into()),
                Ok(_) => body = BodyReader::start(resp, &conn.buf, idle)?,
            }
        }
    }
    if let Some(relayed) = splice_rest(down, req, conn, resp, tail, &mut body).await {
        return relayed;
    }
    send_head(down, req, conn, resp, tail, body.first()).await?;
    if let Some(kind) = cut {
        return Err(kind.into());
    }
    loop {
        // An HTTP/2 client's RST_STREAM ends the relay at once, however long the upstream
        // stays quiet (a stream of events): the upstream connection closes.
        let next = body.next(conn);
        let next = match S::WHOLE_CONNECTION {
            true => next.await,
            false => super::unless_reset(&mut down.stream, next).await?,
        };
        let Some(n) = next? else {
            break;
        };
        // The next read starts over at the buffer's start.
        if down.send(req, &mut conn.buf, 0..n).await.is_err() {
            return Err(ErrorKind::ClientClosed.into());
        }
    }
    if resp.body == BodyKind::UntilClose {
        // The upstream's own close ended the body: end it the way that tells a client the
        // body is whole (END_STREAM on HTTP/2, close_notify over TLS, FIN). Cut short, the
        // stream is reset instead, and a TLS connection closes without close_notify.
        let _ = down.stream.shutdown().await;
    }
    Ok(body.clean())
}

/// An answer in chunks to an HTTP/1.0 client, which has no transfer codings (RFC 9112 6.1:
/// a server must not send one to it): its data goes on without the chunk framing (and
/// without trailers), delimited by the close of the connection. The caller closes it.
async fn relay_dechunked<S: ClientStream>(
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    conn: &mut UpstreamConn,
    resp: &ResponseHead,
) -> Result<bool, ProxyError> {
    // Its `Transfer-Encoding` goes, as for any answer to an HTTP/1.0 client.
    let tail = response_tail(down, req, &conn.buf, resp, true, true, None);
    let mut body = BodyReader::start(resp, &conn.buf, down.timeouts.upstream_body)?;
    // The reader frames and checks the body; this decoder takes the data out of it.
    let mut data = ChunkedDecoder::new(usize::MAX);
    let mut out = Vec::new();
    let first = resp.head_end..resp.head_end + body.first();
    data.advance_into(&conn.buf[first], &mut out)
        .map_err(|_| ProxyError::new(ErrorKind::UpstreamMalformed))?;
    send_head(down, req, conn, resp, tail, 0).await?;
    loop {
        let len = out.len();
        if len > 0 && down.send(req, &mut out, 0..len).await.is_err() {
            return Err(ErrorKind::ClientClosed.into());
        }
        out.clear();
        let Some(n) = body.next(conn).await? else {
            break;
        };
        data.advance_into(&conn.buf[..n], &mut out)
            .map_err(|_| ProxyError::new(ErrorKind::UpstreamMalformed))?;
    }
    Ok(body.clean())
}

/// Reads the body of `resp` into `wire` (which holds its head and the body bytes read so
/// far) until its first byte other than whitespace: whether it opens a JSON object or array
/// ([`crate::shape::opens_json`]). A body that ends first is not JSON; one still undecided
/// past `max` bytes is taken for JSON (and so is too large: a 502 with a filter, fail-closed).
async fn opens_json_body(
    reader: &mut BodyReader,
    conn: &mut UpstreamConn,
    wire: &mut Vec<u8>,
    resp: &ResponseHead,
    max: usize,
) -> Result<bool, ProxyError> {
    // The reader has checked the framing; this decoder only takes the data out of it.
    let mut chunks = (resp.body == BodyKind::Chunked).then(|| ChunkedDecoder::new(usize::MAX));
    // The body's data so far (a byte order mark may be cut across two reads), and how much
    // of it was a mark or whitespace (not looked at again).
    let mut data = Vec::new();
    let mut skipped = 0;
    let mut from = resp.head_end;
    loop {
        let opens = match chunks.as_mut() {
            Some(d) => {
                d.advance_into(&wire[from..], &mut data)
                    .map_err(|_| ProxyError::new(ErrorKind::UpstreamMalformed))?;
                opens_json_so_far(&data, &mut skipped)
            }
            None => opens_json_so_far(&wire[resp.head_end..], &mut skipped),
        };
        if let Some(opens) = opens {
            return Ok(opens);
        }
        if wire.len() - resp.head_end > max {
            return Ok(true);
        }
        from = wire.len();
        match reader.next(conn).await? {
            Some(n) => wire.extend_from_slice(&conn.buf[..n]),
            None => return Ok(false),
        }
    }
}

/// Fields about the upstream's bytes, which a reshaped body no longer is: its framing,
/// validator and digests, the trailers it announced (the answer goes out whole, without
/// them), and its byte ranges (nginx clears `Accept-Ranges` when it rewrites a body).
pub(super) const ABOUT_THE_UPSTREAMS_BYTES: [&[u8]; 9] = [
    b"content-length",
    b"transfer-encoding",
    b"etag",
    b"content-md5",
    b"content-digest",
    b"repr-digest",
    b"digest",
    b"trailer",
    b"accept-ranges",
];

/// Like [`relay_response`], for a route with a `response` shape: a 2xx identity-encoded JSON
/// answer within `max_bytes` is read whole, reshaped and sent with its new length (without
/// [`ABOUT_THE_UPSTREAMS_BYTES`], since the body changed); any other answer is relayed
/// unchanged and counted in `gateway_transform_skipped_total`. With a filter (allow, deny), a
/// 2xx answer of another type whose body opens a JSON object or array is taken as JSON too.
/// A HEAD (`is_head`) gets what its GET would, as far as the head tells: without those
/// fields where the GET's answer would (or, with a type told by the body, might) be
/// reshaped, which would not be the GET answer's; a 502 where the GET's would be one.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn relay_shaped<S: ClientStream>(
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    conn: &mut UpstreamConn,
    resp: &ResponseHead,
    http10: bool,
    close_client: bool,
    is_head: bool,
    shape: &Shape,
    metrics: &WorkerMetrics,
) -> Result<bool, ProxyError> {
    let (fs, fe) = (resp.fields_start, resp.fields_end);
    let fields = AnswerFields::of(&conn.buf, fs, fe);
    // A shape that filters (allow, deny) is never bypassed by a JSON answer: one it cannot
    // read is a 502, not relayed with every member it should have removed. Nor by JSON under
    // another type (an upstream that labels its JSON text/plain, or not at all): an answer
    // not declared JSON is told by its body's first byte, unless it is compressed (asked
    // for identity, the upstream sent it anyway) or an event stream (relayed as it comes).
    let filters = !shape.allow.is_empty() || !shape.deny.is_empty();
    let declared = fields.content_type.is_some_and(is_json_type);
    let sniff = filters
        && !declared
        && !fields.encoded
        && !fields.content_type.is_some_and(is_event_stream);
    let length = match (is_head, resp.body) {
        (true, _) => fields.content_length,
        (false, BodyKind::Length(n)) => Some(n),
        (false, BodyKind::None) => Some(0),
        (false, _) => None,
    };
    // Only whole 2xx bodies are reshaped: 206 carries a range of the body, 204 none (RFC
    // 9110 15.3.5). A 205 must have none either (15.3.6): one known empty is relayed as it
    // is, one whose framing may carry content is read as a 200's is (empty, it is relayed
    // as it is; with content, that goes through the filter). A HEAD's 205 without a length
    // is taken for empty, as its GET most likely is, and keeps its fields as that GET does.
    let empty_205 = match is_head {
        true => length.is_none_or(|n| n == 0),
        false => length == Some(0),
    };
    let whole = (200..300).contains(&resp.status)
        && !matches!(resp.status, 204 | 206)
        && !(resp.status == 205 && empty_205);
    let over = length.is_some_and(|n| n > shape.max_bytes as u64);
    let skip = if !whole {
        Some(SkipReason::Status)
    } else if !declared && !sniff {
        Some(SkipReason::NotJson)
    } else if fields.encoded {
        Some(SkipReason::Compressed)
    } else if declared && over {
        Some(SkipReason::TooLarge)
    } else if is_head && (over || fields.content_type.is_some_and(is_binary_type)) {
        // A type told by the body, over `max_bytes` (its GET is never reshaped, but relayed
        // as it is, or, its body JSON, a 502 no head can foretell), or media no JSON is
        // sent as (its GET's body, looked at, is not JSON but where mislabelled).
        Some(SkipReason::NotJson)
    } else if length == Some(0) {
        // Nothing to read as JSON: a 502 where a filter wants it to be (a JSON type).
        Some(match declared {
            true => SkipReason::InvalidJson,
            false => SkipReason::NotJson,
        })
    } else {
        None
    };
    if is_head && skip.is_none() {
        // The GET's answer would be reshaped: the fields about the upstream's bytes would
        // not be about its body.
        for name in ABOUT_THE_UPSTREAMS_BYTES {
            policy::drop_named(&conn.buf, fs, fe, name, &mut down.resp_plan.drop);
        }
        return relay_response(down, req, conn, resp, http10, close_client).await;
    }
    if let Some(reason) = skip {
        if !is_head {
            metrics.transform_skipped(reason);
        }
        // A 206 to a request sent without `Range` breaks the protocol, and a part of a body
        // cannot be filtered: not relayed with what the filter is there to remove.
        let partial = resp.status == 206;
        let unread = matches!(
            reason,
            SkipReason::Compressed | SkipReason::TooLarge | SkipReason::InvalidJson
        );
        if filters && (partial || unread) {
            req.filter_refused = true;
            return Err(ErrorKind::UpstreamMalformed.into());
        }
        return relay_response(down, req, conn, resp, http10, close_client).await;
    }
    if client_left(down, req) {
        req.fail(ErrorKind::ClientClosed);
        return Err(ErrorKind::ClientClosed.into());
    }
    // The head and the body's bytes as they came on the wire: relayed as they are when the
    // body turns out too large or not JSON (a reader started on them resumes where this one
    // stopped).
    let head_end = resp.head_end;
    let mut reader = BodyReader::start(resp, &conn.buf, down.timeouts.upstream_body)?;
    let mut wire = conn.buf[..head_end + reader.first()].to_vec();
    if sniff && !opens_json_body(&mut reader, conn, &mut wire, resp, shape.max_bytes).await? {
        // Not JSON whatever its type: nothing in it for the filter. Relayed from what was
        // read, as below.
        metrics.transform_skipped(SkipReason::NotJson);
        let finished_clean = !reader.done() || reader.clean();
        conn.buf = wire;
        let relayed = relay_response(down, req, conn, resp, http10, close_client).await;
        conn.buf = Vec::with_capacity(UPSTREAM_READ);
        return relayed.map(|c| c && finished_clean);
    }
    let mut over = wire.len() - head_end > shape.max_bytes;
    while !over {
        match reader.next(conn).await? {
            Some(n) => {
                wire.extend_from_slice(&conn.buf[..n]);
                over = wire.len() - head_end > shape.max_bytes;
            }
            None => break,
        }
    }
    let clean = reader.clean();
    let shaped = if over {
        Err(SkipReason::TooLarge)
    } else {
        let mut decoded = Vec::new();
        let content = if resp.body == BodyKind::Chunked {
            crate::codec::chunked::decode_validated(&wire[head_end..], &mut decoded);
            &decoded[..]
        } else {
            &wire[head_end..]
        };
        match json::parse(content) {
            // A 205 (or a sniffed answer) that turned out empty: nothing in it to filter.
            Err(_) if content.is_empty() && !declared => Err(SkipReason::NotJson),
            Err(_) if content.is_empty() && resp.status == 205 => Err(SkipReason::Status),
            Err(_) => Err(SkipReason::InvalidJson),
            Ok(v) => match json::apply(shape, v) {
                Ok(v) => {
                    let mut out = Vec::with_capacity(content.len());
                    v.write(&mut out);
                    Ok(out)
                }
                Err(json::ShapeError::TargetMissing) => Err(SkipReason::TargetMissing),
                Err(json::ShapeError::Unreadable) => Err(SkipReason::InvalidJson),
            },
        }
    };
    conn.buf = wire;
    let mut body = match shaped {
        Ok(body) => body,
        Err(reason) => {
            metrics.transform_skipped(reason);
            if filters && !matches!(reason, SkipReason::Status | SkipReason::NotJson) {
                conn.buf = Vec::with_capacity(UPSTREAM_READ);
                req.filter_refused = true;
                return Err(ErrorKind::UpstreamMalformed.into());
            }
            // A reader started on `wire` sees a clean end; what followed the body in the
            // last read (if anything) is what the first reader saw.
            let finished_clean = over || clean;
            let relayed = relay_response(down, req, conn, resp, http10, close_client).await;
            conn.buf = Vec::with_capacity(UPSTREAM_READ);
            return relayed.map(|c| c && finished_clean);
        }
    };
    for name in ABOUT_THE_UPSTREAMS_BYTES {
        policy::drop_named(&conn.buf, fs, fe, name, &mut down.resp_plan.drop);
    }
    let tail = response_tail(
        down,
        req,
        &conn.buf,
        resp,
        http10,
        close_client,
        Some(body.len()),
    );
    send_head(down, req, conn, resp, tail, 0).await?;
    // The pooled connection keeps a buffer of the usual size, not the body's.
    conn.buf = Vec::with_capacity(UPSTREAM_READ);
    let len = body.len();
    if down.send(req, &mut body, 0..len).await.is_err() {
        return Err(ErrorKind::ClientClosed.into());
    }
    Ok(clean)
}
