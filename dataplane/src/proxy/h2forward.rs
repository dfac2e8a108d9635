//! Requests to upstreams that speak HTTP/2 (`protocol = "h2c"` or `"grpc"`), and the gRPC
//! translations at the edge.
//!
//! A request reaches here after routing and policies, like any proxied request: its
//! forwarded head (policies' edits, rewrite, `X-Forwarded-*`, trace fields) is built as for
//! HTTP/1.1 and turned into an HTTP/2 request. Then:
//! - an HTTP/2 client's stream is relayed frame by frame in both directions at once
//!   (bidirectional gRPC streaming), trailers included; its body is sent as it comes, unless
//!   it is already complete when the request starts (then it can be sent again on another
//!   target by a retry);
//! - an HTTP/1.1 client's body is read whole first (up to `limits.max_body_bytes`), and the
//!   answer goes back chunked with its trailers in the chunked trailer section (or with the
//!   upstream's length when it has one and no trailers can follow);
//! - a gRPC-Web call (`application/grpc-web`, `application/grpc-web-text`) to a `grpc`
//!   upstream becomes a gRPC call: its body is decoded from base64 for `-text`, the answer's
//!   messages are passed on (in base64 for `-text`) and its trailers become the trailer frame
//!   (flag 0x80) at the end of the body.
//!
//! For gRPC calls (gRPC and gRPC-Web) the gateway's own failures are gRPC answers: HTTP 200
//! with `grpc-status` and `grpc-message` and no body ("trailers-only"), the status from the
//! standard HTTP-to-gRPC table (an unreachable upstream is UNAVAILABLE), DEADLINE_EXCEEDED
//! when the call's `grpc-timeout` ran out. `grpc-timeout` is honoured (the call ends at its
//! deadline) and capped by `[timeouts] upstream_response_head_ms` (the upstream gets the
//! capped value).
//!
//! Not the HTTP/1.1 hot path: per request it builds an `http::Request` (header map and
//! values allocated) and h2's own stream state.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::net::IpAddr;
use std::pin::pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::live::LiveTarget;
use common::transcode::Transcoder;
use common::{Route, Snapshot};
use h2::{Reason, RecvStream, SendStream};
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::HeaderMap;
use monoio::io::AsyncWriteRentExt;
use std::sync::Arc;

use super::connector::{Connector, UpstreamRef};
use super::context::RequestCtx;
use super::downstream::{push_request_id, Downstream, Next};
use super::http2::{connection_specific, push_hex, send_flow, H2Answer};
use super::stream::ClientStream;
use crate::codec::request::RequestHead;
use crate::error::{ErrorKind, ProxyError};
use crate::forward::request_pieces;
use crate::gather::Piece;
use crate::h2pool;
use crate::worker_ctx::WorkerCtx;

/// Request body bytes an HTTP/2 client's stream may have ready when its request starts for
/// the request to count as complete (and so retryable).
const READY_BODY: usize = 64 * 1024;

/// What kind of call a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// Anything else: relayed as it is.
    Plain,
    /// gRPC (`application/grpc`, `application/grpc+proto`, ...).
    Grpc,
    /// gRPC-Web to a gRPC upstream: translated; `text` for the base64 form.
    Web { text: bool },
    /// JSON on a route with a transcoder.
    Json,
}

impl Call {
    /// Whether it is a gRPC call upstream (gRPC statuses, `grpc-timeout`).
    fn is_grpc(self) -> bool {
        self != Call::Plain
    }

    /// Whether the client's request body is read whole before the call (to translate it).
    fn whole_body(self) -> bool {
        matches!(self, Call::Web { .. } | Call::Json)
    }

    /// Whether the gateway's own failures are gRPC answers (else HTTP or JSON ones).
    fn grpc_answers(self) -> bool {
        matches!(self, Call::Grpc | Call::Web { .. })
    }
}

/// How an answer is encoded for the client.
#[derive(Clone)]
enum Encoding {
    /// As the upstream sent it.
    Native,
    /// gRPC-Web, in the content type the client used; `text`: its base64 form (as
    /// [`classify`] found it).
    Web {
        content_type: HeaderValue,
        text: bool,
    },
    /// JSON, from the messages of a transcoder's binding.
    Json {
        transcoder: Arc<Transcoder>,
        binding: usize,
        ndjson: bool,
    },
}

/// The message format a gRPC-Web content type names (`json` in `application/grpc-web+json`),
/// if any.
fn web_format(content_type: &[u8]) -> Option<&[u8]> {
    let essence = crate::shape::media_type(content_type);
    let plus = essence.iter().position(|&b| b == b'+')?;
    Some(&essence[plus + 1..]).filter(|f| !f.is_empty())
}

/// Whether an answer's `Content-Type` is gRPC's (`application/grpc`, `+format` or not).
pub(super) fn grpc_content(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| classify(v.as_bytes(), true) == Call::Grpc)
}

/// The call kind of a `Content-Type`; gRPC-Web is translated only for a gRPC upstream.
fn classify(content_type: &[u8], grpc_upstream: bool) -> Call {
    let essence = crate::shape::media_type(content_type);
    let Some(sub) = essence
        .get(..12)
        .filter(|p| p.eq_ignore_ascii_case(b"application/"))
        .map(|_| &essence[12..])
    else {
        return Call::Plain;
    };
    // `grpc`, `grpc-web` or `grpc-web-text`, each alone or with `+format`.
    let is = |name: &[u8]| {
        sub.len() >= name.len()
            && sub[..name.len()].eq_ignore_ascii_case(name)
            && (sub.len() == name.len() || sub[name.len()] == b'+')
    };
    if is(b"grpc") {
        Call::Grpc
    } else if is(b"grpc-web") && grpc_upstream {
        Call::Web { text: false }
    } else if is(b"grpc-web-text") && grpc_upstream {
        Call::Web { text: true }
    } else {
        Call::Plain
    }
}

/// `grpc-timeout` (RFC-less, from the gRPC over HTTP/2 spec): 1 to 8 digits and a unit.
fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n.saturating_mul(3600)),
        b'M' => Duration::from_secs(n.saturating_mul(60)),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A `grpc-timeout` value for `d`: milliseconds, or microseconds below one, rounded up.
fn grpc_timeout_value(d: Duration) -> HeaderValue {
    let (n, unit) = if d >= Duration::from_millis(1) {
        (d.as_millis().min(99_999_999) as u64, b'm')
    } else {
        (d.as_micros().max(1) as u64, b'u')
    };
    let mut out = Vec::with_capacity(10);
    crate::access_log::push_u64(&mut out, n);
    out.push(unit);
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static("1m"))
}

/// The gRPC status for an HTTP status, by the standard table.
pub(super) fn grpc_code_for_http(status: u16) -> u8 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// What an upstream stream's failure was: one h2 itself ended (the upstream's frames broke
/// the protocol: a malformed field, a flow-control violation) is the upstream's malformed
/// answer, as a malformed HTTP/1.1 head is; a reset, a GOAWAY or a lost connection is its
/// closing.
fn stream_failure(e: &::h2::Error) -> ErrorKind {
    // Only the codes h2 ends a stream or connection with for the peer's protocol errors: a
    // GOAWAY of its own with NO_ERROR (a connection closing) is no malformed answer.
    let protocol = matches!(
        e.reason(),
        Some(
            Reason::PROTOCOL_ERROR
                | Reason::FLOW_CONTROL_ERROR
                | Reason::FRAME_SIZE_ERROR
                | Reason::COMPRESSION_ERROR
                | Reason::STREAM_CLOSED
        )
    );
    if e.is_library() && protocol {
        ErrorKind::UpstreamMalformed
    } else {
        ErrorKind::UpstreamClosed
    }
}

/// The gRPC status for an upstream stream that ended with `e`, where it is not the
/// connection's end (UNAVAILABLE: the transport went away, as a client sees it): the
/// upstream reset the stream, or sent frames h2 refused. gRPC's PROTOCOL-HTTP2.md maps the
/// reset codes: REFUSED_STREAM is UNAVAILABLE (nothing was processed: may be retried),
/// CANCEL CANCELLED, ENHANCE_YOUR_CALM RESOURCE_EXHAUSTED, INADEQUATE_SECURITY
/// PERMISSION_DENIED, and the others INTERNAL: the call may have run, and UNAVAILABLE would
/// invite a client's retry policy to run it again.
fn grpc_status_for_reset(e: &::h2::Error) -> Option<u8> {
    if e.is_go_away() || e.is_io() || !(e.is_reset() || e.is_library()) {
        return None;
    }
    Some(match e.reason()? {
        Reason::REFUSED_STREAM => 14,
        Reason::CANCEL => 1,
        Reason::ENHANCE_YOUR_CALM => 8,
        Reason::INADEQUATE_SECURITY => 7,
        _ => 13,
    })
}

/// The gRPC status a gateway failure of `kind` gives (`deadline`: the call's `grpc-timeout`
/// ran out).
fn grpc_code_for(kind: ErrorKind, deadline: bool) -> u8 {
    match kind {
        ErrorKind::ResponseTimeout if deadline => 4,
        ErrorKind::DeadlineExceeded => 4,
        ErrorKind::BodyTooLarge => 8,
        ErrorKind::ClientClosed => 1,
        k => grpc_code_for_http(k.status()),
    }
}

/// Header fields (lower-case names) that are not forwarded between HTTP/1.1 and HTTP/2:
/// the connection-specific ones, `host` (which becomes `:authority`) and `expect`.
fn hop_by_hop(name: &str) -> bool {
    connection_specific(name) || matches!(name, "host" | "expect")
}

/// What [`outgoing`] needs of the upstream: the authority for a request without `Host`,
/// and whether it is reached over TLS.
#[derive(Debug, Clone, Copy)]
struct Upstream<'a> {
    authority: &'a str,
    tls: bool,
}

/// The request to send upstream, built once and copied for each try.
struct Outgoing {
    method: http::Method,
    uri: http::Uri,
    headers: HeaderMap,
}

impl Outgoing {
    /// The request for one try; `length`: the body's, when it is in hand and the head has
    /// none (a body the gateway read whole, or decoded).
    fn request(&self, length: Option<usize>) -> http::Request<()> {
        let mut r = http::Request::new(());
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.headers_mut() = self.headers.clone();
        let content = matches!(
            self.method,
            http::Method::POST | http::Method::PUT | http::Method::PATCH
        );
        if let Some(n) = length.filter(|&n| n > 0 || content) {
            if !self.headers.contains_key(CONTENT_LENGTH) {
                r.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
        r
    }
}

/// How long past a gRPC call's deadline its upstream may take to answer DEADLINE_EXCEEDED
/// itself (it was told the deadline) before the gateway gives up on it.
const GRPC_GRACE: Duration = Duration::from_millis(200);

/// Turns the forwarded HTTP/1.1 head into an HTTP/2 request. Sets `grpc_timeout` to the
/// call's timeout, as the client asked, when it has one (it goes upstream capped by `cap`).
fn outgoing(
    h1: &[u8],
    call: Call,
    up: Upstream<'_>,
    cap: Duration,
    grpc_timeout: &mut Option<Duration>,
) -> Result<Outgoing, ErrorKind> {
    // The client's fields (up to `[limits] max_header_count`), the route's `set` ones and
    // the gateway's own.
    // The gateway's own, 13 at most today: Host, X-Forwarded-For, -Proto and -Host,
    // Forwarded, framing (Transfer-Encoding), Connection and Upgrade, a consumer field,
    // Accept-Encoding, Max-Forwards, X-Request-Id and traceparent; room for more.
    const MOST: usize = common::snapshot::MAX_HEADER_COUNT + common::headers::MAX_EDITS + 32;
    let mut fields = [httparse::EMPTY_HEADER; MOST];
    let mut parsed = httparse::Request::new(&mut fields);
    match parsed.parse(h1) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(ErrorKind::BadRequest),
    }
    let method = http::Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| ErrorKind::BadRequest)?;
    let path = parsed.path.unwrap_or("/");
    let host = parsed
        .headers
        .iter()
        .find(|f| f.name.eq_ignore_ascii_case("host"))
        .and_then(|f| std::str::from_utf8(f.value).ok())
        .filter(|h| !h.is_empty())
        .unwrap_or(up.authority);
    // The target URI's scheme: `https` for a request that goes over TLS (RFC 9113 8.3.1).
    let uri = |path: &str| {
        http::Uri::builder()
            .scheme(if up.tls { "https" } else { "http" })
            .authority(host)
            .path_and_query(path)
            .build()
    };
    // A target with bytes a URI may not have (`<`, `"`, a backtick...), which an HTTP/1.1
    // upstream gets as sent, goes with them percent-encoded (before: a 400 here alone).
    let uri = match uri(path) {
        Ok(u) => u,
        Err(_) => uri(&escape_target(path)).map_err(|_| ErrorKind::BadRequest)?,
    };
    let mut headers = HeaderMap::with_capacity(parsed.headers.len() + 2);
    // A gRPC-Web call's message format (`+json` in `application/grpc-web+json`) stays the
    // upstream call's.
    let mut format: Option<&[u8]> = None;
    for f in parsed.headers.iter() {
        let name = HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| ErrorKind::BadRequest)?;
        if hop_by_hop(name.as_str()) {
            continue;
        }
        if name == "grpc-timeout" {
            if call.is_grpc() {
                *grpc_timeout = parse_grpc_timeout(f.value);
            }
            continue;
        }
        if call.whole_body() {
            // The body changes form; the type becomes plain gRPC.
            if name == CONTENT_TYPE && matches!(call, Call::Web { .. }) {
                format = web_format(f.value);
            }
            if name == CONTENT_LENGTH || name == CONTENT_TYPE {
                continue;
            }
            // The JSON client's, not the gRPC call's: the gateway frames the messages, and
            // reads the answer's only uncompressed.
            if call == Call::Json
                && (name == http::header::ACCEPT
                    || name == http::header::ACCEPT_ENCODING
                    || name == "grpc-encoding"
                    || name == "grpc-accept-encoding")
            {
                continue;
            }
        }
        let value = HeaderValue::from_bytes(f.value).map_err(|_| ErrorKind::BadRequest)?;
        headers.append(name, value);
    }
    if call == Call::Json {
        headers.insert("grpc-accept-encoding", HeaderValue::from_static("identity"));
    }
    if call.whole_body() {
        let grpc = match format {
            Some(f) => HeaderValue::from_bytes(&[&b"application/grpc+"[..], f].concat())
                .map_err(|_| ErrorKind::BadRequest)?,
            None => HeaderValue::from_static("application/grpc"),
        };
        headers.insert(CONTENT_TYPE, grpc);
    }
    if call.is_grpc() {
        // gRPC servers require it (it tells them trailers will get through).
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        if let Some(t) = *grpc_timeout {
            headers.insert("grpc-timeout", grpc_timeout_value(t.min(cap)));
        }
    }
    Ok(Outgoing {
        method,
        uri,
        headers,
    })
}

/// A request body as it goes upstream.
enum Body {
    /// Complete: sent in one go, and again on a retry.
    Whole(Bytes),
    /// An HTTP/2 client's stream still arriving: `first` is what was ready, the rest is
    /// relayed as it comes (the request cannot be retried).
    Stream { first: Bytes, rest: RecvStream },
}

/// An HTTP/2 client's request body: whole when it has already ended (or must be read whole:
/// a gRPC-Web call's), else the stream to relay as it comes. Counts the bytes taken.
async fn h2_request_body(
    early: Bytes,
    mut rest: RecvStream,
    call: Call,
    max: u64,
    timeouts: &common::Timeouts,
    req: &mut RequestCtx,
) -> Result<Body, ErrorKind> {
    let mut ready = BytesMut::from(early);
    let ended = super::http2::take_ready(&mut rest, &mut ready, READY_BODY)?;
    if ready.len() as u64 > max {
        return Err(ErrorKind::BodyTooLarge);
    }
    let body = if ended {
        Body::Whole(ready.freeze())
    } else if call.whole_body() {
        let more = read_h2_body(&mut rest, max - ready.len() as u64, timeouts.client_body).await?;
        ready.extend_from_slice(&more);
        Body::Whole(ready.freeze())
    } else {
        // The rest is counted by nobody: the access log's bytes_in is the head and the
        // part of the body that was ready.
        Body::Stream {
            first: ready.freeze(),
            rest,
        }
    };
    let n = match &body {
        Body::Whole(b) | Body::Stream { first: b, .. } => b.len(),
    };
    req.bytes_in += n as u64;
    Ok(body)
}

/// Reads an HTTP/2 client's whole body (a gRPC-Web or JSON call's), up to `max` bytes, with
/// at most `silence` between two pieces of it (`client_body_ms`, as on HTTP/1.1).
async fn read_h2_body(
    rest: &mut RecvStream,
    max: u64,
    silence: Duration,
) -> Result<Vec<u8>, ErrorKind> {
    let mut out = Vec::new();
    loop {
        let next = monoio::time::timeout(silence, poll_fn(|cx| rest.poll_data(cx)))
            .await
            .map_err(|_| ErrorKind::ClientTimeout)?;
        match next {
            Some(Ok(data)) => {
                let _ = rest.flow_control().release_capacity(data.len());
                if (out.len() + data.len()) as u64 > max {
                    return Err(ErrorKind::BodyTooLarge);
                }
                out.extend_from_slice(&data);
            }
            Some(Err(e)) => return Err(super::http2::body_error(&e)),
            None => return Ok(out),
        }
    }
}

/// Stops a spawned task when dropped (the request it serves has ended).
#[derive(Debug, Default)]
struct Abort {
    done: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

/// Sets its [`Abort`] when dropped.
#[derive(Debug)]
struct AbortOnDrop(Rc<Abort>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.done.set(true);
        if let Some(w) = self.0.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// Runs `work` until it ends or `abort` is set.
async fn until_aborted(abort: &Abort, work: impl Future<Output = ()>) {
    let mut work = pin!(work);
    poll_fn(|cx| {
        if abort.done.get() {
            return Poll::Ready(());
        }
        if work.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        *abort.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    })
    .await;
}

/// How far a streamed request body's relay is: when it last moved on (a piece in, a piece
/// out, its end), and whether the client's next piece is what it waits for (then a silence
/// is the client's, bounded by `client_body`; else the upstream's, sending or answering,
/// bounded by `upstream`). The wait for the response head sleeps until `armed`; a move that
/// makes its bound come sooner (the body ending while the client's longer bound was armed)
/// wakes it, as the body's end does: the try's own bound (`retry.per_try_timeout_ms`) counts
/// from there.
struct Progress {
    at: Cell<Instant>,
    /// When the body had all gone.
    ended: Cell<Option<Instant>>,
    awaiting_client: Cell<bool>,
    client_body: Duration,
    upstream: Duration,
    armed: Cell<Option<Instant>>,
    waiting: RefCell<Option<Waker>>,
}

impl Progress {
    fn new(client_body: Duration, upstream: Duration) -> Progress {
        Progress {
            at: Cell::new(Instant::now()),
            ended: Cell::new(None),
            awaiting_client: Cell::new(false),
            client_body,
            upstream,
            armed: Cell::new(None),
            waiting: RefCell::new(None),
        }
    }

    /// When the silence since the last move ends.
    fn deadline(&self) -> Instant {
        let bound = match self.awaiting_client.get() {
            true => self.client_body,
            false => self.upstream,
        };
        self.at.get() + bound
    }

    /// The body's end: the head's wait counts from now, and so does the try's own bound.
    fn end(&self) {
        self.moved(false);
        self.ended.set(Some(Instant::now()));
        if let Some(w) = self.waiting.borrow_mut().take() {
            w.wake();
        }
    }

    /// It moved on now; `awaiting_client`: the client's next piece is awaited.
    fn moved(&self, awaiting_client: bool) {
        self.at.set(Instant::now());
        self.awaiting_client.set(awaiting_client);
        if self.armed.get().is_some_and(|a| self.deadline() < a) {
            self.armed.set(None);
            if let Some(w) = self.waiting.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

/// A streamed request body as it was relayed, for sending it again on a retry.
#[derive(Debug, Default)]
struct Replay {
    data: BytesMut,
    /// The body ended (without trailers) within [`READY_BODY`].
    ended: bool,
    /// Too big to keep, or it had trailers: it cannot be sent again.
    lost: bool,
}

impl Replay {
    fn keep(&mut self, piece: &[u8]) {
        if self.data.len() + piece.len() > READY_BODY {
            self.lost = true;
            self.data = BytesMut::new();
        } else if !self.lost {
            self.data.extend_from_slice(piece);
        }
    }

    /// The whole body, if it can be sent again.
    fn complete(&self) -> Option<Bytes> {
        (self.ended && !self.lost).then(|| Bytes::copy_from_slice(&self.data))
    }
}

/// Relays an HTTP/2 client's request body to the upstream stream as it arrives, trailers
/// included but for the fields named in `refused` ([`common::policy::Policies::trailer_refused`]),
/// keeping a copy in `replay`; a client that resets its stream resets the upstream's.
/// `progress` says when the body last moved on, and whether the client's next piece is
/// awaited.
async fn pump(
    first: Bytes,
    mut from: RecvStream,
    mut to: SendStream<Bytes>,
    replay: &RefCell<Replay>,
    refused: Arc<[Box<[u8]>]>,
    progress: &Progress,
) {
    replay.borrow_mut().keep(&first);
    // Unbounded here: the request's own deadlines end the pump (it is aborted with it).
    let _ = send_flow(&mut to, first, false, None).await;
    progress.moved(true);
    // Once the upstream stream has failed, the body is still read (into `replay`): a
    // retry on another target may need it.
    let mut sending = true;
    loop {
        match poll_fn(|cx| from.poll_data(cx)).await {
            Some(Ok(data)) => {
                progress.moved(false);
                let n = data.len();
                replay.borrow_mut().keep(&data);
                if sending {
                    sending = send_flow(&mut to, data, false, None).await.is_ok();
                    progress.moved(true);
                }
                let _ = from.flow_control().release_capacity(n);
            }
            Some(Err(_)) => {
                replay.borrow_mut().lost = true;
                to.send_reset(Reason::CANCEL);
                return;
            }
            None => break,
        }
    }
    let trailers = poll_fn(|cx| from.poll_trailers(cx)).await;
    // The body's end: the wait for the response head counts from here.
    progress.end();
    match trailers {
        Ok(Some(mut trailers)) => {
            replay.borrow_mut().lost = true;
            // Fields that frame or route a message have no place in trailers (RFC 9110
            // 6.5.1), as the HTTP/1.1 path's last chunk has it; nor do the gateway's own.
            let forged: Vec<HeaderName> = trailers
                .keys()
                .filter(|n| {
                    let n = n.as_str().as_bytes();
                    crate::codec::chunked::is_framing_field(n)
                        || crate::codec::chunked::names_one_of(n, &refused)
                })
                .cloned()
                .collect();
            for name in forged {
                trailers.remove(name);
            }
            let _ = to.send_trailers(trailers);
        }
        Ok(None) => {
            replay.borrow_mut().ended = true;
            let _ = to.send_data(Bytes::new(), true);
        }
        Err(_) => {
            replay.borrow_mut().lost = true;
            to.send_reset(Reason::CANCEL);
        }
    }
}

/// Sends a body held whole that is larger than a stream's first window, in pieces as the
/// upstream's window opens, saying each piece's going in `progress`, and its end: the wait
/// for the response head counts from there, as for a streamed body (before, from when h2 was
/// handed all of it, so an upstream still reading it got a 504).
async fn send_whole(mut body: Bytes, mut to: SendStream<Bytes>, progress: &Progress) {
    const PIECE: usize = 16 * 1024;
    while !body.is_empty() {
        let piece = body.split_to(PIECE.min(body.len()));
        if send_flow(&mut to, piece, body.is_empty(), None)
            .await
            .is_err()
        {
            return;
        }
        progress.moved(false);
    }
    progress.end();
}

/// `target` with every byte RFC 3986 does not allow in a path or query (3.3, 3.4) written
/// `%XX`: what `http::Uri` refuses, and HTTP/1.1 requests may carry.
fn escape_target(target: &str) -> String {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b);
    let mut out = String::with_capacity(target.len() + 16);
    for &b in target.as_bytes() {
        if allowed(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The bytes `fields` would take in an HTTP/1.1 head (`name: value` and CRLF each, and a
/// status line's): an HTTP/2 upstream's head is bounded as an HTTP/1.1 one's is (64 KiB),
/// whatever HPACK's measure let through.
fn head_bytes(fields: &HeaderMap) -> usize {
    const STATUS_LINE: usize = "HTTP/1.1 200 OK\r\n\r\n".len();
    (fields.iter()).fold(STATUS_LINE, |n, (name, value)| {
        n + name.as_str().len() + value.len() + 4
    })
}

/// An upstream stream whose response head has arrived.
struct Opened {
    parts: http::response::Parts,
    body: RecvStream,
    /// The stream's place on its connection.
    _slot: h2pool::StreamSlot,
    /// Kept so the request side is not reset while the answer is read (the pump holds it
    /// while the request body streams).
    _send: Option<SendStream<Bytes>>,
    /// Stops the request-body pump when the request ends.
    _pump: Option<AbortOnDrop>,
}

/// Where an answer goes: an HTTP/2 client stream, an HTTP/1.1 connection, or one of those
/// through the gRPC-Web encoding.
pub(super) trait Sink {
    /// Sends the head; `end`: nothing follows. `Err`: the client is gone.
    async fn head(&mut self, status: u16, headers: HeaderMap, end: bool) -> Result<(), ()>;
    async fn data(&mut self, data: Bytes) -> Result<(), ()>;
    /// Ends the answer, with trailers if there are some.
    async fn finish(&mut self, trailers: Option<HeaderMap>) -> Result<(), ()>;
    /// Abandons the answer midway: the client sees it cut short (not as complete).
    fn abort(&mut self);
    /// Ready once the client is known to have gone (an HTTP/2 stream it reset).
    fn poll_gone(&mut self, _cx: &mut Context<'_>) -> Poll<()> {
        Poll::Pending
    }
    /// Whether the client's connection must close after this answer (an HTTP/1.1 answer
    /// delimited by the close).
    fn closes(&self) -> bool {
        false
    }
    /// The status the client was sent and the failure, when the sink itself decided them
    /// (a transcoded call's JSON error, or its stream cut short).
    fn verdict(&self) -> Option<(u16, Option<ErrorKind>)> {
        None
    }
    /// Bytes written to the client.
    fn sent(&self) -> u64;
    /// Whether trailers may only follow a whole message: gRPC-Web carries them in a frame
    /// of the body, which a client would read as the rest of a partial message.
    fn whole_messages_only(&self) -> bool {
        false
    }
    /// Whether none of the body goes to the client (a gRPC-Web answer that is not gRPC):
    /// its bytes are no messages, so an end at any point can still get its trailers.
    fn drops_body(&self) -> bool {
        false
    }
    /// Whether the sink has ended the client's answer itself (a transcoded answer it found
    /// broken): the rest of the upstream's is not waited for, and its stream is reset.
    fn ended(&self) -> bool {
        false
    }
    /// Whether the client's answer is complete with the head sent (a HEAD request's, a 204's
    /// or a 304's): the rest of the upstream's (a transcoded stream's messages) is not
    /// waited for, and its stream is reset.
    fn head_only(&self) -> bool {
        false
    }
    /// Whether the sink sent an answer of its own, whole (a JSON error with its length).
    fn whole(&self) -> bool {
        false
    }
}

/// An answer on an HTTP/2 client stream.
struct H2Sink {
    answer: H2Answer,
    sent: u64,
    /// Fields the gateway adds (request id, a route's `Vary`).
    extra: HeaderMap,
    /// The request was a HEAD: the answer is its head only, whatever comes after it (a
    /// transcoded answer's JSON).
    head_request: bool,
    /// The stream ended with the head (a HEAD's answer, a 204, a 304): body bytes and
    /// trailers that come after are dropped (DATA after it breaks the stream for the client).
    ended: bool,
}

impl Sink for H2Sink {
    async fn head(&mut self, status: u16, mut headers: HeaderMap, end: bool) -> Result<(), ()> {
        let bodiless = matches!(status, 204 | 304) || (100..200).contains(&status);
        if bodiless {
            // RFC 9110 8.6: no Content-Length on a 204 (nor a body on either).
            if status == 204 {
                headers.remove(CONTENT_LENGTH);
            }
        }
        let end = end || bodiless || self.head_request;
        self.ended = end;
        // `drain` names a field once, then gives its further values without the name.
        let mut last: Option<HeaderName> = None;
        for (name, value) in self.extra.drain() {
            if name.is_some() {
                last = name;
            }
            if let Some(n) = &last {
                headers.append(n.clone(), value);
            }
        }
        // Its HTTP/1.1 form's bytes, as an HTTP/1.1 client's head counts (before, none: the
        // gateway's own trailers-only gRPC answer was logged with `bytes_out` 0), its own
        // status line's.
        let code = http::StatusCode::from_u16(status).map_err(|_| ())?;
        let line = "HTTP/1.1 200 \r\n".len() + code.canonical_reason().map_or(0, str::len);
        self.sent += (head_bytes(&headers) - "HTTP/1.1 200 OK\r\n".len() + line) as u64;
        let mut resp = http::Response::new(());
        *resp.status_mut() = code;
        *resp.headers_mut() = headers;
        self.answer.send_head(resp, end).map_err(|_| ())
    }

    async fn data(&mut self, data: Bytes) -> Result<(), ()> {
        if self.ended {
            return Ok(());
        }
        self.sent += data.len() as u64;
        self.answer.send_data(data).await.map_err(|_| ())
    }

    async fn finish(&mut self, trailers: Option<HeaderMap>) -> Result<(), ()> {
        if self.ended {
            return Ok(());
        }
        self.answer.finish(trailers).map_err(|_| ())
    }

    fn abort(&mut self) {
        self.answer.abort();
    }

    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.answer.poll_reset(cx)
    }

    fn head_only(&self) -> bool {
        self.ended
    }

    fn sent(&self) -> u64 {
        self.sent
    }
}

/// An answer on an HTTP/1.1 connection.
struct H1Sink<'a, S> {
    down: &'a mut Downstream<S>,
    /// Field lines the gateway adds (request id, a route's `Vary`), each with its CRLF.
    extra: &'a [u8],
    http10: bool,
    head_request: bool,
    /// The client closes after this answer.
    close: bool,
    /// The body is sent chunked (else by length, or until close for HTTP/1.0).
    chunked: bool,
    /// The answer has no body (HEAD, 1xx, 204, 304): body bytes are dropped.
    no_body: bool,
    /// Its trailers carry its outcome (a gRPC call's `grpc-status`): sent chunked, so that
    /// they can follow, whatever length the upstream gave.
    trailers: bool,
    out: Vec<u8>,
    sent: u64,
}

impl<S: ClientStream> H1Sink<'_, S> {
    async fn write_out(&mut self) -> Result<(), ()> {
        let out = std::mem::take(&mut self.out);
        let (res, mut out) = self.down.stream.write_all(out).await;
        self.sent += out.len() as u64;
        out.clear();
        self.out = out;
        res.map(|_| ()).map_err(|_| ())
    }
}

impl<S: ClientStream> Sink for H1Sink<'_, S> {
    async fn head(&mut self, status: u16, headers: HeaderMap, end: bool) -> Result<(), ()> {
        let code = http::StatusCode::from_u16(status).map_err(|_| ())?;
        let out = &mut self.out;
        out.extend_from_slice(if self.http10 {
            b"HTTP/1.0 "
        } else {
            b"HTTP/1.1 "
        });
        out.extend_from_slice(code.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(code.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        let mut length = false;
        // RFC 9110 6.4.1: these answers have no body, whatever follows on the stream.
        let bodiless = status < 200 || status == 204 || status == 304;
        // A gRPC call's status comes in its trailers, which a length would leave out (before,
        // an upstream's `content-length` made a failed call read as a success); not where no
        // body follows (a HEAD's, a 304's length is the one a GET would get).
        let drop_length = self.trailers && !end && !self.http10 && !self.head_request && !bodiless;
        for (name, value) in headers.iter() {
            if hop_by_hop(name.as_str()) || (drop_length && name == CONTENT_LENGTH) {
                continue;
            }
            length |= name == CONTENT_LENGTH;
            super::push_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
        out.extend_from_slice(self.extra);
        self.no_body = self.head_request || bodiless;
        if self.no_body {
        } else if end {
            if !length {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
        } else if length {
            // The upstream's length; trailers, if any, cannot follow.
        } else if self.http10 {
            self.close = true;
        } else {
            self.chunked = true;
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if self.close {
            out.extend_from_slice(b"connection: close\r\n");
        } else if self.http10 {
            // An HTTP/1.0 client's connection ends after the answer unless it is told
            // otherwise (RFC 9112 9.3): it asked for keep-alive, and gets it.
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        self.write_out().await
    }

    async fn data(&mut self, data: Bytes) -> Result<(), ()> {
        if self.no_body || data.is_empty() {
            return Ok(());
        }
        if self.chunked {
            push_hex(&mut self.out, data.len());
            self.out.extend_from_slice(b"\r\n");
            self.out.extend_from_slice(&data);
            self.out.extend_from_slice(b"\r\n");
        } else {
            self.out.extend_from_slice(&data);
        }
        self.write_out().await
    }

    async fn finish(&mut self, trailers: Option<HeaderMap>) -> Result<(), ()> {
        if !self.chunked || self.no_body {
            return Ok(());
        }
        self.out.extend_from_slice(b"0\r\n");
        for (name, value) in trailers.iter().flatten() {
            super::push_field(&mut self.out, name.as_str().as_bytes(), value.as_bytes());
        }
        self.out.extend_from_slice(b"\r\n");
        self.write_out().await
    }

    fn abort(&mut self) {
        self.close = true;
    }

    fn head_only(&self) -> bool {
        self.no_body
    }

    fn closes(&self) -> bool {
        self.close
    }

    fn sent(&self) -> u64 {
        self.sent
    }
}

/// The gRPC-Web encoding over another sink: the content type the client used, messages
/// passed on (base64 for `-text`, in groups of 3 bytes so pieces need no padding), and the
/// trailers as the final frame.
struct WebSink<K> {
    inner: K,
    text: bool,
    content_type: HeaderValue,
    /// Bytes not yet encoded (fewer than 3), for `-text`.
    carry: Vec<u8>,
    /// The upstream answered something other than gRPC: no byte of its body goes out, and
    /// the trailer frame says what its status maps to, UNKNOWN for a 200 (a gRPC-Web client
    /// would read an answer without `grpc-status` as a success).
    foreign: bool,
    /// The upstream's HTTP status.
    status: u16,
    /// The upstream answered 200 with gRPC: its body is messages, and trailers may only
    /// follow a whole one.
    messages: bool,
}

impl<K: Sink> WebSink<K> {
    fn new(inner: K, content_type: HeaderValue, text: bool) -> Self {
        WebSink {
            inner,
            text,
            content_type,
            carry: Vec::new(),
            foreign: false,
            status: 200,
            messages: false,
        }
    }

    /// The trailer frame for `trailers`, which always carry a `grpc-status`: UNKNOWN when
    /// the upstream's answer was not gRPC or ended without one.
    fn trailer_frame(&self, trailers: Option<HeaderMap>) -> Vec<u8> {
        let trailers = match trailers {
            _ if self.foreign => Some(match self.status {
                200 => status_only(2, "the upstream's answer is not gRPC"),
                status => status_only(
                    grpc_code_for_http(status),
                    &format!("the upstream answered HTTP {status}, not gRPC"),
                ),
            }),
            Some(t) if t.contains_key("grpc-status") => Some(t),
            _ => Some(status_only(2, "the upstream's answer has no grpc-status")),
        };
        let mut block = Vec::new();
        for (name, value) in trailers.iter().flatten() {
            block.extend_from_slice(name.as_str().as_bytes());
            block.push(b':');
            block.extend_from_slice(value.as_bytes());
            block.extend_from_slice(b"\r\n");
        }
        let mut frame = Vec::with_capacity(5 + block.len());
        frame.push(0x80);
        frame.extend_from_slice(&(block.len() as u32).to_be_bytes());
        frame.extend_from_slice(&block);
        frame
    }

    /// `data` as it goes to the client: base64 for `-text`, keeping a remainder of less
    /// than 3 bytes back unless `last`.
    fn encode(&mut self, data: &[u8], last: bool) -> Bytes {
        if !self.text {
            return Bytes::copy_from_slice(data);
        }
        self.carry.extend_from_slice(data);
        let whole = if last {
            self.carry.len()
        } else {
            self.carry.len() / 3 * 3
        };
        let mut out = Vec::with_capacity(whole / 3 * 4 + 4);
        common::keys::encode_b64_into(&self.carry[..whole], &mut out);
        self.carry.drain(..whole);
        Bytes::from(out)
    }
}

impl<K: Sink> Sink for WebSink<K> {
    fn whole_messages_only(&self) -> bool {
        self.messages
    }

    fn drops_body(&self) -> bool {
        self.foreign
    }

    async fn head(&mut self, status: u16, mut headers: HeaderMap, end: bool) -> Result<(), ()> {
        // An answer that is not gRPC (a proxy's 503 page, a 404) has no messages for the
        // client: its body is dropped, and the trailer frame carries the status its HTTP
        // status maps to (UNKNOWN for a 200). Before, another status's body went out as if
        // it were frames, and its trailer frame said UNKNOWN.
        self.foreign = !grpc_content(&headers) && !headers.contains_key("grpc-status");
        self.status = status;
        self.messages = status == 200 && grpc_content(&headers);
        headers.remove(CONTENT_LENGTH);
        if self.foreign {
            headers.remove(http::header::CONTENT_ENCODING);
        }
        headers.insert(CONTENT_TYPE, self.content_type.clone());
        if end && self.foreign {
            // Nothing follows the head, but the trailer frame must.
            self.inner.head(status, headers, false).await?;
            return self.finish(None).await;
        }
        self.inner.head(status, headers, end).await
    }

    async fn data(&mut self, data: Bytes) -> Result<(), ()> {
        if self.foreign {
            return Ok(());
        }
        let piece = self.encode(&data, false);
        if piece.is_empty() {
            return Ok(());
        }
        self.inner.data(piece).await
    }

    async fn finish(&mut self, trailers: Option<HeaderMap>) -> Result<(), ()> {
        let frame = self.trailer_frame(trailers);
        let piece = self.encode(&frame, true);
        self.inner.data(piece).await?;
        self.inner.finish(None).await
    }

    fn abort(&mut self) {
        self.inner.abort();
    }

    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.poll_gone(cx)
    }

    fn closes(&self) -> bool {
        self.inner.closes()
    }

    fn sent(&self) -> u64 {
        self.inner.sent()
    }
}

/// `grpc-status` and `grpc-message` alone (trailers).
fn status_only(code: u8, message: &str) -> HeaderMap {
    let mut h = grpc_status_fields(code, message);
    h.remove(CONTENT_TYPE);
    h
}

/// A trailers-only gRPC answer's fields: `grpc-status` and a percent-encoded `grpc-message`.
fn grpc_status_fields(code: u8, message: &str) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(3);
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
    let mut m = Vec::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            m.push(b);
        } else {
            m.push(b'%');
            m.extend_from_slice(format!("{b:02X}").as_bytes());
        }
    }
    if let Ok(v) = HeaderValue::from_bytes(&m) {
        h.insert("grpc-message", v);
    }
    h
}

/// What the gateway tells a gRPC client about a failure of `kind`.
fn grpc_message(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ResponseTimeout => "upstream timed out",
        ErrorKind::DeadlineExceeded => "deadline exceeded",
        ErrorKind::ConnectFailed | ErrorKind::ConnectTimeout => "upstream connect failed",
        ErrorKind::UpstreamTls => "upstream TLS handshake failed",
        ErrorKind::UpstreamClosed => "upstream closed the stream",
        ErrorKind::NoTargets => "upstream has no targets",
        ErrorKind::BodyTooLarge => "request too large",
        _ => kind.label(),
    }
}

/// Forwards the request to a target of `up` over HTTP/2 and relays the answer. `watched`
/// is set false once an HTTP/1.1 client's body is read with a pipelined request behind it:
/// its FIN may then be a half-close after sending everything, not its leaving.
#[allow(clippy::too_many_arguments)]
pub(super) async fn forward<S: ClientStream>(
    ctx: &WorkerCtx,
    snap: &Snapshot,
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    head: &RequestHead,
    route: &Route,
    up: UpstreamRef<'_>,
    peer: IpAddr,
    watched: &std::cell::Cell<bool>,
) -> Next {
    let grpc_upstream = up.upstream.protocol == common::config::UpstreamProtocol::Grpc;
    let content_type = crate::policy::field_value(
        &down.buf,
        head.fields_start,
        head.fields_end,
        b"content-type",
    )
    .unwrap_or_default();
    // On a transcoding route, gRPC and gRPC-Web calls still go through as they are (as with
    // Envoy's transcoder): only the rest is JSON to translate.
    let transcoder = route
        .transcoder
        .and_then(|i| snap.transcoders.get(i))
        .cloned();
    let call = match classify(content_type, grpc_upstream) {
        Call::Plain if transcoder.is_some() => Call::Json,
        call => call,
    };
    let transcoder = transcoder.filter(|_| call == Call::Json);
    let mut encoding = match call {
        Call::Web { text } => HeaderValue::from_bytes(content_type)
            .map(|content_type| Encoding::Web { content_type, text })
            .unwrap_or(Encoding::Native),
        _ => Encoding::Native,
    };
    // What a JSON call maps from, read before the buffer is reused for the body.
    let json_call = transcoder.as_ref().map(|_| {
        let accept =
            crate::policy::field_value(&down.buf, head.fields_start, head.fields_end, b"accept")
                .unwrap_or_default()
                .to_vec();
        let method = String::from_utf8_lossy(head.method.of(&down.buf)).into_owned();
        // Without an API key the policies took from the query: it is no message field, and
        // must not reach the upstream.
        let origin = head.origin_target.start;
        let t = head.origin_target.of(&down.buf);
        let mut target = Vec::with_capacity(t.len() + 1);
        if t.first() != Some(&b'/') {
            // The empty path of an absolute-form target (`http://h?q`).
            target.push(b'/');
        }
        crate::forward::push_target_without(&mut target, t, |at, _| {
            req.policy.query_dropped(origin + at)
        });
        let target = String::from_utf8_lossy(&target).into_owned();
        // A coded body (gzip) is not read as JSON: refused, as the admin API refuses one.
        let coded = crate::policy::field_value(
            &down.buf,
            head.fields_start,
            head.fields_end,
            b"content-encoding",
        )
        .is_some_and(|v| !v.trim_ascii().eq_ignore_ascii_case(b"identity"));
        (method, target, accept, coded)
    });
    let is_head = head.is_head(&down.buf);
    let asked = Asked {
        head: is_head,
        http10: head.http10,
    };
    // gRPC calls are all POST: on a `grpc` upstream `methods` does not hold them back (the
    // README's rule); to an `h2c` upstream a POST is a POST, whatever its content type.
    // By its method: a request a stale pooled connection may be sent again after.
    let method_idempotent = head.is_idempotent(&down.buf);
    let idempotent = (grpc_upstream && call.is_grpc()) || method_idempotent;
    let http10 = head.http10;
    let keep_alive = head.keep_alive;
    let key = super::select::hash_key(&up.upstream.hash_on, &down.buf, head, req.client_ip);
    // The forwarded head, as HTTP/1.1 would send it, then as an HTTP/2 request.
    let (line, tail) = super::forwarded_head(down, req, head, route, peer);
    let mut h1 = Vec::with_capacity(head.head_end + 256);
    for piece in request_pieces(head, &down.req_plan, line, tail, head.head_end) {
        match piece {
            Piece::Src(s) => h1.extend_from_slice(s.of(&down.buf)),
            Piece::Extra(s) => h1.extend_from_slice(s.of(&down.scratch)),
        }
    }
    let timeouts = down.timeouts;
    let mut grpc_timeout = None;
    let target = Upstream {
        authority: up
            .upstream
            .targets
            .first()
            .map_or("upstream", |t| &*t.address),
        tls: up.upstream.tls.is_some(),
    };
    let mut out = match outgoing(
        &h1,
        call,
        target,
        timeouts.upstream_response_head,
        &mut grpc_timeout,
    ) {
        Ok(o) => o,
        Err(kind) => {
            return fail(down, req, call, &encoding, kind, false, asked, None, false).await
        }
    };
    drop(h1);
    // The call's time, capped by `upstream_response_head_ms`; and the client's own
    // deadline, which alone makes an expiry the client's (DEADLINE_EXCEEDED, not the
    // target's failure): one the cap ends is a response timeout like any other.
    let cap = timeouts.upstream_response_head;
    let call_deadline = grpc_timeout.map(|t| req.started + t.min(cap));
    let client_deadline = grpc_timeout.map(|t| req.started + t);

    // The request body. An HTTP/2 client that asked for `100 Continue` gets it (as
    // informational HEADERS) before its body is read; the HTTP/1.1 path sends its own.
    let body = match down.stream.take_h2_body() {
        Some((early, rest)) => {
            if head.expect_continue && down.send_continue(req).await.is_err() {
                return fail(
                    down,
                    req,
                    call,
                    &encoding,
                    ErrorKind::ClientClosed,
                    false,
                    asked,
                    None,
                    false,
                )
                .await;
            }
            h2_request_body(
                early,
                rest,
                call,
                down.limits.max_body_bytes,
                &timeouts,
                req,
            )
            .await
        }
        None => {
            let read = super::fanout::read_body(down, req, head).await;
            if down.pos < down.buf.len() {
                watched.set(false);
            }
            // The body is read whole and its chunked trailer section left out (as Envoy's
            // HTTP/1 codec does by default): no `Trailer` field announces fields that never
            // come (RFC 9110 6.6.2; before, it went on).
            out.headers.remove(http::header::TRAILER);
            read.map(|b| Body::Whole(b.into()))
        }
    };
    let mut body = match body {
        Ok(b) => b,
        Err(kind) => {
            // A stalled client gets no lingering close (as on the other paths).
            down.linger &= kind != ErrorKind::ClientTimeout;
            return fail(down, req, call, &encoding, kind, false, asked, None, false).await;
        }
    };
    if let (Call::Web { text: true }, Body::Whole(b)) = (call, &body) {
        let mut decoded = Vec::with_capacity(b.len() / 4 * 3);
        if common::keys::decode_b64_pieces(b, &mut decoded).is_none() {
            return fail(
                down,
                req,
                call,
                &encoding,
                ErrorKind::BadRequest,
                false,
                asked,
                None,
                false,
            )
            .await;
        }
        body = Body::Whole(decoded.into());
    }
    if let (Some(t), Some((method, target, accept, coded)), Body::Whole(b)) =
        (&transcoder, &json_call, &body)
    {
        let prepared = if *coded {
            // RFC 9110 15.5.16: 415, naming the coding taken.
            super::push_field(&mut req.response_fields, b"Accept-Encoding", b"identity");
            Err(super::transcode::Refused {
                status: 415,
                body: super::transcode::error_body(
                    3,
                    "the body has a Content-Encoding: a JSON call's body is read as it is \
                     (identity) only",
                    None,
                    &[],
                ),
                allow: None,
            })
        } else {
            super::transcode::prepare(t, method, target, b, accept)
        };
        match prepared {
            Ok(p) => {
                let grpc_path = &*t.bindings[p.binding].grpc_path;
                out.method = http::Method::POST;
                let mut uri = out.uri.clone().into_parts();
                uri.path_and_query = grpc_path.parse().ok();
                out.uri = http::Uri::from_parts(uri).unwrap_or_default();
                encoding = Encoding::Json {
                    transcoder: t.clone(),
                    binding: p.binding,
                    ndjson: p.ndjson,
                };
                body = Body::Whole(p.framed);
            }
            Err(refused) => {
                req.fail(match refused.status {
                    404 => ErrorKind::NoRoute,
                    405 => ErrorKind::MethodNotAllowed,
                    _ => ErrorKind::BadRequest,
                });
                if let Some(allow) = &refused.allow {
                    // RFC 9110 15.5.6: a 405 names the methods the target takes.
                    super::push_field(&mut req.response_fields, b"Allow", allow.as_bytes());
                }
                let close = !keep_alive || ctx.draining.get();
                return answer_json(down, req, refused.status, refused.body, close, asked).await;
            }
        }
    }
    // A streamed body is kept (up to READY_BODY) as it is relayed: a retry can send it
    // again once it has ended; until then, the request is committed to its target.
    let replay = Rc::new(RefCell::new(Replay::default()));
    let replayable = true;

    let connector = Connector::new(ctx, up, &timeouts, key, replayable, idempotent);
    let (whole, mut stream_body) = match body {
        Body::Whole(b) => (Some(b), None),
        Body::Stream { first, rest } => (None, Some((first, rest))),
    };
    // When the last try went out: each try has its own `upstream_response_head_ms`, as on
    // HTTP/1.1 (one shared deadline left a retry none, and blamed its target for it).
    let sent_at = std::cell::Cell::new(Instant::now());
    // The upstream's interim answers (103 Early Hints, 102), passed on to the client as they
    // come (RFC 9110 15.2: a proxy forwards them), as from an HTTP/1.1 upstream. Not to an
    // HTTP/1.0 client, which has none, nor to gRPC calls or through a translation (gRPC-Web,
    // JSON), nor a `100 Continue`: the gateway answers `Expect` itself.
    let pass_interims = call == Call::Plain && !http10;
    let interims: RefCell<Vec<http::Response<()>>> = RefCell::new(Vec::new());
    let attempt = async |target: &LiveTarget,
                         try_deadline: Option<Instant>,
                         req: &mut RequestCtx| {
        let mut fresh = false;
        // Sent once more already (a refused stream, or a stale connection's).
        let mut resent = false;
        // Connections others were opening that came to nothing for this request (their
        // opener went away, or no room after all): after a few, it opens its own.
        let mut rejoins = 0u8;
        // Waits for others' connections end by the first one's bound, however many.
        let mut joins_by = None;
        loop {
            let pooled = if fresh {
                // Not a pooled one (the stale one may be among them); those closed go, so
                // they no longer count against `circuit.max_connections`.
                ctx.h2pool
                    .borrow_mut()
                    .prune(target.addr, &up.upstream.live);
                None
            } else {
                let keep_idle = snap.max_idle_per_target > 0;
                let limit = up.upstream.max_streams;
                (ctx.h2pool.borrow_mut()).take(target.addr, &up.upstream.live, limit, keep_idle)
            };
            // A new connection records its target once the circuit lets it be opened.
            if pooled.is_some() {
                connector.arrived(target, &mut req.attempts);
            }
            req.attempts.connect = None;
            let mut reused = pooled.is_some();
            let started = Instant::now();
            // Within the connect timeout (from the connect's start: a TLS handshake
            // takes part of it), and the try's own bound.
            let by = started + timeouts.upstream_connect;
            let by = try_deadline.map_or(by, |t| t.min(by));
            // Without room in the pool, a connection another request is opening to the
            // target, if it has room: this one waits for it rather than open its own
            // (also for a resend after a GOAWAY: one being opened is a new one).
            let joined = match pooled {
                None if rejoins < 3 => ctx.h2pool.borrow_mut().join(target.addr, &up.upstream.live),
                _ => None,
            };
            let shared = match joined {
                Some(c) => {
                    match monoio::time::timeout_at((*joins_by.get_or_insert(by)).into(), c.wait())
                        .await
                    {
                        Ok(Ok(conn)) if conn.has_room(up.upstream.max_streams) => {
                            connector.arrived(target, &mut req.attempts);
                            Some(Ok(conn))
                        }
                        // The opener's failure: its connect reached the target unless the
                        // circuit refused it first.
                        Ok(Err(Some(kind))) => {
                            if kind.reason().is_none() {
                                connector.arrived(target, &mut req.attempts);
                            }
                            Some(Err(ProxyError::new(kind)))
                        }
                        // Its opener went away, or it has no room for this stream after all
                        // (the target's SETTINGS, or new requests took it): the pool again,
                        // where another may be opening one by now, then one of its own.
                        Ok(Ok(_) | Err(None)) => {
                            rejoins += 1;
                            continue;
                        }
                        Err(_) => Some(Err(ProxyError::new(ErrorKind::ConnectTimeout))),
                    }
                }
                None => None,
            };
            let conn = match (pooled, shared) {
                (Some(c), _) => c,
                (None, Some(shared)) => {
                    // As a pooled one: a stream it cannot open goes once to a fresh one.
                    reused = true;
                    connector.reached(target, shared)?
                }
                (None, None) => {
                    // No more streams than the target allowed on its other connections:
                    // its SETTINGS come only after the first streams may have gone out.
                    let first_streams = ctx.h2pool.borrow().stream_limit(
                        target.addr,
                        &up.upstream.live,
                        up.upstream.max_streams,
                    );
                    let opening =
                        ctx.h2pool
                            .borrow_mut()
                            .open(target.addr, &up.upstream.live, first_streams);
                    let connected = async {
                        let (tcp, counted) = connector
                            .connect_stream(&mut req.attempts, target, try_deadline)
                            .await?;
                        let shake = h2pool::handshake(
                            tcp,
                            up.upstream.max_streams,
                            first_streams,
                            counted,
                            timeouts.upstream_send,
                        );
                        match monoio::time::timeout_at(by.into(), shake).await {
                            Ok(Ok(c)) => Ok(c),
                            Ok(Err(_)) => Err(ProxyError::new(ErrorKind::ConnectFailed)),
                            Err(_) => Err(ProxyError::new(ErrorKind::ConnectTimeout)),
                        }
                    }
                    .await;
                    opening.finish(connected.as_ref().map(Rc::clone).map_err(|e| e.kind));
                    let c = connector.reached(target, connected)?;
                    req.attempts.connect = Some(started.elapsed());
                    if !target.draining {
                        let owner = &up.upstream.live;
                        ctx.h2pool.borrow_mut().add(target.addr, owner, c.clone());
                    }
                    c
                }
            };
            connector.count_request(target);
            let (mut send, slot) = conn.open_stream(timeouts.upstream_send);
            let body_now = whole.clone().or_else(|| replay.borrow().complete());
            let end = body_now.as_ref().is_some_and(Bytes::is_empty);
            let opened = match poll_fn(|cx| send.poll_ready(cx)).await {
                Ok(()) => {
                    let length = body_now
                        .as_ref()
                        .filter(|_| !call.is_grpc())
                        .map(Bytes::len);
                    let mut request = out.request(length);
                    if let Some(d) = call_deadline {
                        // What is left of the call's time, after the body, connects and
                        // earlier tries.
                        let left = d.saturating_duration_since(Instant::now());
                        request
                            .headers_mut()
                            .insert("grpc-timeout", grpc_timeout_value(left));
                    }
                    send.send_request(request, end)
                }
                Err(e) => Err(e),
            };
            let (response, up_send) = match opened {
                Ok(v) => v,
                Err(e) => {
                    // A connection that ended (GOAWAY, closed) while pooled.
                    log::debug!("upstream HTTP/2 stream not opened: {e}");
                    conn.mark_closed();
                    // Also after a refused stream's resend on it (found gone away since: the
                    // review of the first version saw a 502 where a new connection served).
                    if reused && !fresh {
                        fresh = true;
                        resent = true;
                        connector.count_resend(target, &mut req.attempts);
                        continue;
                    }
                    return Err(ProxyError::new(ErrorKind::UpstreamClosed).retryable(true));
                }
            };
            let mut pump_guard = None;
            let mut up_send = Some(up_send);
            let pumped = body_now.is_none();
            // The body goes on after this, as the upstream takes it: streamed, or whole but
            // larger than a stream's first window.
            let paced = pumped || body_now.as_ref().is_some_and(|b| b.len() > READY_BODY);
            let progress = Rc::new(Progress::new(
                timeouts.client_body,
                timeouts.upstream_response_head,
            ));
            match (&body_now, stream_body.take()) {
                (Some(b), _) if paced => {
                    let abort = Rc::new(Abort::default());
                    pump_guard = Some(AbortOnDrop(abort.clone()));
                    if let Some(to) = up_send.take() {
                        let (body, moved) = (b.clone(), progress.clone());
                        monoio::spawn(async move {
                            until_aborted(&abort, send_whole(body, to, &moved)).await;
                        });
                    }
                }
                (Some(b), _) if !b.is_empty() => {
                    // Within the stream's window it goes at once; beyond it, h2 holds the
                    // rest until the window opens (the body is in memory already).
                    let sending = up_send.as_mut().map(|u| u.send_data(b.clone(), true));
                    if !matches!(sending, Some(Ok(()))) {
                        conn.mark_closed();
                        return Err(ProxyError::new(ErrorKind::UpstreamClosed).retryable(true));
                    }
                }
                (Some(_), _) => {}
                (None, Some((first, rest))) => {
                    let abort = Rc::new(Abort::default());
                    pump_guard = Some(AbortOnDrop(abort.clone()));
                    if let Some(to) = up_send.take() {
                        let replay = replay.clone();
                        let refused = super::trailer_refused(snap, route).clone();
                        let moved = progress.clone();
                        monoio::spawn(async move {
                            let pump = pump(first, rest, to, &replay, refused, &moved);
                            until_aborted(&abort, pump).await;
                        });
                    }
                }
                (None, None) => return Err(ProxyError::new(ErrorKind::UpstreamClosed)),
            }
            sent_at.set(Instant::now());
            // This try's first byte, not an earlier one's (its interim) before a retry.
            req.first_byte = None;
            // A gRPC call's upstream was told its deadline (the client's, or the cap), and
            // one that is there answers DEADLINE_EXCEEDED itself when it passes: it has
            // GRPC_GRACE more to do so before its silence is its failure. Otherwise the
            // response head has `upstream_response_head` from the request sent, or, for a
            // streamed body, from when the body last moved on: a client-streaming call or a
            // slow upload is the client's time, not the upstream's silence (HTTP/1.1 starts
            // the timer once the body has gone), while a stream stalled both ways still ends.
            // A silence while the client's next piece is awaited is the client's: bounded by
            // `client_body` (HTTP/1.1's too), its end the client's timeout, not the target's.
            let client_silent = || pumped && progress.awaiting_client.get();
            let streamed = paced && call_deadline.is_none();
            // The try's own bound: for a body the client streams, from its end (before it,
            // the upload's pace is the client's), as on HTTP/1.1; a body held whole counts
            // in it from the try's start, as there.
            let try_by = || match pumped {
                true => (progress.ended.get()).and_then(|at| connector.per_try_from(at)),
                false => try_deadline,
            };
            // Whether the body's end, yet to come, brings a bound of its own.
            let end_bounds = |ended: bool| pumped && !ended && try_deadline.is_some();
            let head_deadline = || match call_deadline {
                Some(d) => d + GRPC_GRACE,
                None if paced => progress.deadline(),
                None => sent_at.get() + timeouts.upstream_response_head,
            };
            let mut response = pin!(response);
            let (mut got_interims, mut interim_passed, mut bad_interim) = (0, false, false);
            // When the first interim came: the upstream's first byte.
            let mut first_interim = None;
            let response = loop {
                let head_by = head_deadline();
                let deadline = try_by().map_or(head_by, |t| t.min(head_by));
                if streamed {
                    progress.armed.set(Some(head_by));
                }
                let awaits_end = end_bounds(progress.ended.get().is_some());
                let mut sleep = pin!(monoio::time::sleep_until(deadline.into()));
                let woke = poll_fn(|cx| {
                    // Interim answers first: polling the final one skips them.
                    while let Poll::Ready(Some(Ok(interim))) =
                        response.as_mut().get_mut().poll_informational(cx)
                    {
                        got_interims += 1;
                        first_interim.get_or_insert_with(Instant::now);
                        // More than an HTTP/1.1 upstream may send (`MAX_INTERIM`), one with
                        // more field lines than a head may have, or a `101`, which HTTP/2
                        // has not (RFC 9113 8.6) and nobody asked for: a faulty upstream.
                        bad_interim = got_interims > super::MAX_INTERIM
                            || interim.headers().len() > common::snapshot::MAX_HEADER_COUNT
                            || head_bytes(interim.headers()) > crate::upstream::UPSTREAM_BUF
                            || interim.status() == http::StatusCode::SWITCHING_PROTOCOLS;
                        if bad_interim {
                            return Poll::Ready(Some(Err(())));
                        }
                        if pass_interims && interim.status() != http::StatusCode::CONTINUE {
                            interims.borrow_mut().push(interim);
                            interim_passed = true;
                        }
                    }
                    if let Poll::Ready(r) = response.as_mut().poll(cx) {
                        return Poll::Ready(Some(Ok(r)));
                    }
                    if sleep.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(())));
                    }
                    if streamed || awaits_end {
                        // A move made the deadline sooner, or the body ended: look again.
                        if (streamed && progress.armed.get().is_none())
                            || (awaits_end && progress.ended.get().is_some())
                        {
                            return Poll::Ready(None);
                        }
                        *progress.waiting.borrow_mut() = Some(cx.waker().clone());
                    }
                    Poll::Pending
                })
                .await;
                if interim_passed {
                    // Passed on: the request cannot be retried from here on.
                    req.attempts.committed = true;
                }
                if let Some(at) = first_interim {
                    // The upstream's first byte, as an HTTP/1.1 upstream's interim counts.
                    req.first_byte
                        .get_or_insert_with(|| at.saturating_duration_since(sent_at.get()));
                }
                match woke {
                    Some(Ok(r)) => break Ok(r),
                    None => {}
                    Some(Err(())) if bad_interim => {
                        return Err(ProxyError::new(ErrorKind::UpstreamMalformed));
                    }
                    // The body moved on meanwhile: the wait goes on from there.
                    Some(Err(()))
                        if head_deadline() > Instant::now()
                            && try_by().is_none_or(|t| t > Instant::now()) => {}
                    Some(Err(())) => break Err(()),
                }
            };
            progress.armed.set(None);
            if pumped && replay.borrow().complete().is_none() {
                // The body is still arriving (or too big to keep): no other target can get it.
                req.attempts.committed = true;
            }
            return match response {
                // Whatever timer ended the wait (the deadline's grace, a per-try bound),
                // once the client's own deadline has passed it is the call's: the client's
                // choice, not the target's failure. Before it (the cap, a per-try bound), a
                // silent upstream is a response timeout as any other: its connection is not
                // used again, and it counts against the target.
                Err(_) if client_deadline.is_some_and(|d| d <= Instant::now()) => {
                    Err(ProxyError::new(ErrorKind::DeadlineExceeded))
                }
                // The client's bound passed (not a per-try one): its silence.
                Err(_) if streamed && client_silent() && head_deadline() <= Instant::now() => {
                    Err(ProxyError::new(ErrorKind::ClientTimeout))
                }
                Err(_) => {
                    // A connection that answers nothing may be dead (a host gone silently):
                    // new streams go to a new one.
                    conn.mark_closed();
                    Err(ProxyError::new(ErrorKind::ResponseTimeout))
                }
                Ok(Err(e)) => {
                    // Refused before the upstream acted on it (RFC 9113 8.7): may go again.
                    // So may a stream above the last id of the upstream's GOAWAY, whatever
                    // its error code (6.8); h2 reports only those with the GOAWAY's error
                    // (the streams at or below it that the close cuts end with an I/O one).
                    let unprocessed = e.reason() == Some(Reason::REFUSED_STREAM)
                        || (e.is_go_away()
                            && (e.is_remote() || e.reason() == Some(Reason::NO_ERROR)));
                    if e.is_go_away() || e.is_io() {
                        conn.mark_closed();
                    }
                    // A pooled connection that turns out closed (no GOAWAY: the upstream
                    // closed it idle, just as it was used) before any of the answer came:
                    // an idempotent request with its whole body goes once more on a new
                    // one, as on HTTP/1.1 (before: a 502).
                    // (Not one the gateway's own `upstream_send_ms` ended, ETIMEDOUT: an
                    // upstream that stopped taking the body would get it all again.)
                    let closed = e.get_io().is_some_and(|io| {
                        use std::io::ErrorKind::*;
                        matches!(
                            io.kind(),
                            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
                        )
                    });
                    let stale = closed && reused && method_idempotent && first_interim.is_none();
                    if (unprocessed || stale) && !resent && !pumped {
                        // Once more, whatever the retry policy: on a new connection where
                        // this one is done (GOAWAY, closed); a stream refused on one that goes
                        // on goes through the pool, which may pick it again (RFC 9113 8.7),
                        // so that a circuit's `max_connections` it fills is no 503 (before,
                        // always a new connection, which that limit refused).
                        fresh = e.is_go_away() || e.is_io() || stale;
                        resent = true;
                        connector.count_resend(target, &mut req.attempts);
                        continue;
                    }
                    if !unprocessed && call.is_grpc() {
                        // Reset by the upstream after it had the call (a code other than
                        // REFUSED_STREAM): it may have acted on it, and a gRPC method is not
                        // known to be idempotent, so no other target gets it.
                        req.attempts.committed = true;
                    }
                    let mut err = ProxyError::new(stream_failure(&e)).retryable(unprocessed);
                    err.grpc_status = grpc_status_for_reset(&e);
                    Err(err)
                }
                // More field lines than an HTTP/1.1 upstream's head may have (`[limits]`):
                // a 502 whatever the protocol, not relayed (the stream is reset).
                Ok(Ok(resp))
                    if resp.headers().len() > common::snapshot::MAX_HEADER_COUNT
                        || head_bytes(resp.headers()) > crate::upstream::UPSTREAM_BUF =>
                {
                    Err(ProxyError::new(ErrorKind::UpstreamMalformed))
                }
                Ok(Ok(resp)) => {
                    let (parts, body) = resp.into_parts();
                    Ok(Opened {
                        parts,
                        body,
                        _slot: slot,
                        _send: up_send,
                        _pump: pump_guard,
                    })
                }
            };
        }
    };
    let answer_of = |o: &Opened| {
        let grpc = o
            .parts
            .headers
            .get("grpc-status")
            .filter(|_| o.body.is_end_stream())
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .and_then(|v| v.parse::<u8>().ok());
        (o.parts.status.as_u16(), grpc)
    };
    let mut interims_out = 0;
    let opened = {
        // A client that cancels (resets its stream) while the upstream works on the call
        // ends it there too: dropping the upstream stream resets it.
        let run = pin!(connector.run_h2(req, call_deadline, attempt, answer_of));
        let mut run = run;
        loop {
            let woke = poll_fn(|cx| {
                if let Poll::Ready(r) = run.as_mut().poll(cx) {
                    return Poll::Ready(Some(Some(r)));
                }
                if !interims.borrow().is_empty() {
                    return Poll::Ready(None);
                }
                down.stream.poll_reset(cx).map(|()| Some(None))
            })
            .await;
            // Those passed on before the final answer (they may have come in its read).
            let passed = std::mem::take(&mut *interims.borrow_mut());
            for interim in passed {
                let head = interim_head(&interim);
                let (sent, _) = down.stream.write_all(head).await;
                // A client gone is seen by the reset, or by the answer's own write.
                if let Ok(n) = sent {
                    interims_out += n as u64;
                }
            }
            if let Some(done) = woke {
                break done;
            }
        }
    };
    req.bytes_out += interims_out;
    let Some(opened) = opened else {
        req.fail(ErrorKind::ClientClosed);
        req.status = ErrorKind::ClientClosed.status();
        return Next::Cut;
    };
    let opened = match opened {
        Ok(o) => o,
        Err(err) => {
            let deadline_hit = call_deadline.is_some_and(|d| Instant::now() >= d);
            if err.kind.reason().is_some() && !call.is_grpc() {
                req.fail(err.kind);
                super::push_field(
                    &mut req.response_fields,
                    b"X-Gateway-Reason",
                    err.kind.reason().unwrap_or_default(),
                );
            }
            let (kind, reset) = (err.kind, err.grpc_status);
            // An HTTP/1.1 client's body was read whole: its connection goes on after the
            // gateway's 502 or 504 (a JSON call's too), as on the HTTP/1.1 path (before:
            // closed).
            let keep = S::WHOLE_CONNECTION && kind.side() != crate::error::Side::Client;
            if keep && call == Call::Plain {
                return down.fail_keeping(ctx, req, head, kind).await;
            }
            let keep = keep && keep_alive && !http10 && !ctx.draining.get();
            return fail(
                down,
                req,
                call,
                &encoding,
                kind,
                deadline_hit,
                asked,
                reset,
                keep,
            )
            .await;
        }
    };
    let head_after = sent_at.get().elapsed();
    req.first_byte.get_or_insert(head_after);
    req.head_after = Some(head_after);
    let mut opened = opened;
    let mut extra = answer_fields(req, &mut opened.parts.headers);
    if !opened.parts.headers.contains_key(http::header::DATE) {
        // RFC 9110 6.6.1, as for an HTTP/1.1 upstream's answer.
        crate::status::push_date(&mut extra);
    }
    let relay = Relay {
        idle: timeouts.upstream_body,
        deadline: call_deadline,
        grpc: call.is_grpc(),
        json: call == Call::Json,
        send: timeouts.client_send,
    };
    let close = !keep_alive || ctx.draining.get();
    let sink = client_sink(down, &extra, http10, is_head, close, call == Call::Grpc);
    let h1 = matches!(sink, ClientSink::H1(_));
    let json = call == Call::Json;
    let (result, sent, closes, verdict, whole) = relay.run_through(sink, encoding, opened).await;
    req.bytes_out += sent;
    let clean = h1 && !closes;
    // A JSON call whose sink sent nothing of its own (no head: the client reset its stream
    // first): the failure's status (499), not the upstream's, which never went out.
    let unsent = json && verdict.is_none();
    // The sink's own status is the one sent (a JSON error in place of what failed); the
    // relay's failure, where there was one, says why (a stall, a reset), the sink's else,
    // also when the client left while the sink wrote (the target's failure stays counted).
    let relayed = |kind| {
        (result.as_ref().err())
            .map(|&(_, k)| k)
            .filter(|&k| k != ErrorKind::ClientClosed)
            .unwrap_or(kind)
    };
    let result = match verdict {
        Some((status, Some(kind))) => Err((status, relayed(kind))),
        Some((status, None)) => result.map(|_| status).map_err(|(_, kind)| (status, kind)),
        None => result,
    };
    match result {
        Ok(status) => {
            req.status = status;
            if clean {
                Next::KeepAlive
            } else {
                Next::Close
            }
        }
        Err((status, kind)) => {
            connector.answer_failed(kind);
            req.status = if unsent { kind.status() } else { status };
            req.fail(kind);
            // The sink answered whole itself (a JSON error, length-framed): the connection
            // goes on as after any whole answer; else the client must see the cut.
            match (whole, clean) {
                (true, true) => Next::KeepAlive,
                (true, false) => Next::Close,
                (false, _) => Next::Cut,
            }
        }
    }
}

/// An upstream's interim answer as an HTTP/1.1 head, which the client's stream sends as it
/// speaks (informational HEADERS to an HTTP/2 client). As from an HTTP/1.1 upstream, the
/// route's `response_headers` do not apply to it.
fn interim_head(interim: &http::Response<()>) -> Vec<u8> {
    let status = interim.status();
    let mut head = Vec::with_capacity(128);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    // A 1xx has no content and states no length (RFC 9110 8.6), as from an HTTP/1.1 one.
    let framing = |n: &HeaderName| n == CONTENT_LENGTH || n == http::header::TRANSFER_ENCODING;
    for (name, value) in interim.headers().iter().filter(|(n, _)| !framing(n)) {
        super::push_field(&mut head, name.as_str().as_bytes(), value.as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// The field lines the gateway adds to an answer (the cors policy's, the request id, the
/// route's `Vary`), with CRLFs; the upstream's own fields they replace are removed from
/// `upstream` (which is empty for the gateway's own answers).
fn answer_fields(req: &RequestCtx, upstream: &mut HeaderMap) -> Vec<u8> {
    let mut extra = Vec::with_capacity(128);
    // The policies' fields (CORS, a rate limit's `headers_on_success`).
    extra.extend_from_slice(&req.policy.response_extra);
    if req.policy.cors_ran {
        let cors: Vec<HeaderName> = upstream
            .keys()
            .filter(|n| n.as_str().starts_with("access-control-"))
            .cloned()
            .collect();
        for name in cors {
            upstream.remove(name);
        }
    }
    if !req.request_id.is_empty() {
        upstream.remove("x-request-id");
        push_request_id(&mut extra, req);
    }
    // The route's `response_headers`: its values replace the upstream's, every spelling
    // the HTTP/1.1 relay drops (`_` for `-`) too (before: the exact name only).
    if let Some(names) = &req.response_drop {
        let named: Vec<HeaderName> = (upstream.keys())
            .filter(|k| {
                let k = k.as_str().as_bytes();
                names.iter().any(|n| crate::codec::same_field_name(k, n))
            })
            .cloned()
            .collect();
        for name in named {
            upstream.remove(name);
        }
    }
    extra.extend_from_slice(&req.response_fields);
    extra
}

/// The field lines in `lines` (each `name: value\r\n`) as a header map.
fn field_map(lines: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in lines.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = HeaderName::from_bytes(&line[..colon].to_ascii_lowercase());
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (name, value) {
            map.append(n, v);
        }
    }
    map
}

/// What relaying an answer gave: the status sent (or the failure's status and kind), the
/// bytes sent, whether the client connection must close, and the sink's own verdict.
type Relayed = (
    Result<u16, (u16, ErrorKind)>,
    u64,
    bool,
    Option<(u16, Option<ErrorKind>)>,
    bool,
);

/// How an answer is relayed.
struct Relay {
    /// The longest wait for the next piece of the body.
    idle: Duration,
    /// The call's deadline (`grpc-timeout`).
    deadline: Option<Instant>,
    /// The call is gRPC: a deadline that passes mid-answer ends it with DEADLINE_EXCEEDED.
    grpc: bool,
    /// A JSON call (transcoded): its answer is made of whole messages only, so one cut in
    /// the middle of a message still gets its error answer.
    json: bool,
    /// The longest wait for the client to take a piece (an HTTP/2 client's window kept shut).
    send: Duration,
}

impl Relay {
    /// Relays through `sink` in the client's encoding. Returns the status sent (or the
    /// failure's) and the bytes.
    async fn run_through<K: Sink>(&self, sink: K, encoding: Encoding, opened: Opened) -> Relayed {
        match encoding {
            Encoding::Web { content_type, text } => {
                self.run_into(WebSink::new(sink, content_type, text), opened)
                    .await
            }
            Encoding::Json {
                transcoder,
                binding,
                ndjson,
            } => {
                let sink = super::transcode::JsonSink::new(sink, transcoder, binding, ndjson);
                self.run_into(sink, opened).await
            }
            Encoding::Native => self.run_into(sink, opened).await,
        }
    }

    /// [`Relay::run`] into `sink`, with what the sink knows afterwards.
    async fn run_into<K: Sink>(&self, mut sink: K, opened: Opened) -> Relayed {
        let r = self.run(&mut sink, opened).await;
        (r, sink.sent(), sink.closes(), sink.verdict(), sink.whole())
    }

    /// Relays the head, the body and the trailers of an answer to `sink`.
    async fn run<K: Sink>(&self, sink: &mut K, opened: Opened) -> Result<u16, (u16, ErrorKind)> {
        let Opened {
            parts, mut body, ..
        } = opened;
        let status = parts.status.as_u16();
        let end = body.is_end_stream();
        let mut headers = parts.headers;
        if status == 204 {
            // RFC 9110 8.6: a 204 carries no Content-Length, whatever the upstream sent.
            headers.remove(CONTENT_LENGTH);
        }
        if sink.head(status, headers, end).await.is_err() {
            return Err((ErrorKind::ClientClosed.status(), ErrorKind::ClientClosed));
        }
        if end || sink.ended() || sink.head_only() {
            return Ok(status);
        }
        // Where the gRPC messages are: trailers may only follow a whole message.
        let mut cursor = MessageCursor::default();
        loop {
            let next = self.next(sink, poll_fn(|cx| body.poll_data(cx))).await;
            match next {
                Err(None) => return Err((status, ErrorKind::ClientClosed)),
                Err(Some(deadline)) => {
                    return Err(self.expire(sink, status, deadline, &cursor).await)
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(self.cut(sink, status, &e, &cursor).await),
                Ok(Some(Ok(data))) => {
                    let n = data.len();
                    // Not a body that goes nowhere (before, a 503 page read as messages left
                    // the answer cut, without its trailer frame, at a reset or a deadline).
                    if self.grpc && !sink.drops_body() {
                        cursor.feed(&data);
                    }
                    match monoio::time::timeout(self.send, sink.data(data)).await {
                        // Ended by the sink, or complete with its head (a HEAD's answer to
                        // a transcoded stream, whose head came with its first message):
                        // dropping the stream resets it upstream. Before, a HEAD to a watch
                        // held the upstream stream, and an HTTP/1.1 connection, to its end.
                        Ok(Ok(())) if sink.ended() || sink.head_only() => return Ok(status),
                        Ok(Ok(())) => {}
                        Ok(Err(())) => return Err((status, ErrorKind::ClientClosed)),
                        Err(_) => {
                            // The client takes nothing (its window kept shut): given up.
                            sink.abort();
                            return Err((status, ErrorKind::ClientTimeout));
                        }
                    }
                    let _ = body.flow_control().release_capacity(n);
                }
            }
        }
        let mut trailers = match self.next(sink, poll_fn(|cx| body.poll_trailers(cx))).await {
            Err(None) => return Err((status, ErrorKind::ClientClosed)),
            Err(Some(deadline)) => return Err(self.expire(sink, status, deadline, &cursor).await),
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(self.cut(sink, status, &e, &cursor).await),
        };
        if let Some(t) = trailers.as_mut() {
            // Fields that frame or route a message have no place in trailers (RFC 9110
            // 6.5.1): dropped, as from a client's (an HTTP/1.1 upstream's are a 502).
            let framing: Vec<HeaderName> = (t.keys())
                .filter(|n| crate::codec::chunked::is_framing_field(n.as_str().as_bytes()))
                .cloned()
                .collect();
            for name in framing {
                t.remove(name);
            }
        }
        if sink.whole_messages_only() && !cursor.at_boundary() {
            // The upstream ended inside a message (or declared more than it sent): its
            // trailers cannot follow, so the answer is cut, as one whose stream failed.
            sink.abort();
            return Err((status, ErrorKind::UpstreamMalformed));
        }
        // A translated answer is written here (a unary JSON one whole, gRPC-Web's trailers),
        // bounded as each piece above is.
        match monoio::time::timeout(self.send, sink.finish(trailers)).await {
            Ok(Ok(())) => Ok(status),
            Ok(Err(())) => Err((status, ErrorKind::ClientClosed)),
            Err(_) => {
                sink.abort();
                Err((status, ErrorKind::ClientTimeout))
            }
        }
    }

    /// Waits for `fut` until the body's idle limit or the call's deadline; `Err(Some(true))`:
    /// the deadline passed, `Err(Some(false))`: the upstream was idle too long, `Err(None)`:
    /// the client went away (reset its stream).
    async fn next<K: Sink, T>(
        &self,
        sink: &mut K,
        fut: impl Future<Output = T>,
    ) -> Result<T, Option<bool>> {
        let idle_end = Instant::now() + self.idle;
        let (until, deadline) = match self.deadline {
            Some(d) if d < idle_end => (d, true),
            _ => (idle_end, false),
        };
        let mut fut = pin!(monoio::time::timeout_at(until.into(), fut));
        poll_fn(|cx| {
            if let Poll::Ready(r) = fut.as_mut().poll(cx) {
                return Poll::Ready(r.map_err(|_| Some(deadline)));
            }
            sink.poll_gone(cx).map(|()| Err(None))
        })
        .await
    }

    /// Ends an answer whose upstream ran past the call's deadline (a gRPC call gets
    /// DEADLINE_EXCEEDED in its trailers) or went idle (cut short; UNAVAILABLE for gRPC).
    async fn expire<K: Sink>(
        &self,
        sink: &mut K,
        status: u16,
        deadline: bool,
        cursor: &MessageCursor,
    ) -> (u16, ErrorKind) {
        let kind = if deadline {
            ErrorKind::DeadlineExceeded
        } else {
            ErrorKind::ResponseTimeout
        };
        // A JSON call the gateway gives up on is past its time, named or not (as `fail`).
        let code = match self.json {
            true => 4,
            false => grpc_code_for(kind, deadline),
        };
        self.end_early(sink, code, kind, cursor).await;
        (status, kind)
    }

    /// Ends an answer whose upstream stream failed midway (reset, connection lost, frames
    /// h2 refused): a gRPC call gets the status in its trailers (UNAVAILABLE for a lost
    /// connection, the reset code's otherwise), anything else is cut short.
    async fn cut<K: Sink>(
        &self,
        sink: &mut K,
        status: u16,
        e: &::h2::Error,
        cursor: &MessageCursor,
    ) -> (u16, ErrorKind) {
        let kind = stream_failure(e);
        let code = grpc_status_for_reset(e).unwrap_or(14);
        self.end_early(sink, code, kind, cursor).await;
        (status, kind)
    }

    /// Ends an answer early: a gRPC one with the status in its trailers when its last message
    /// is whole (a client would read trailers after a partial one as message bytes), a JSON
    /// one with its error (the JSON sink drops a partial message; nothing of it went out),
    /// anything else cut short.
    async fn end_early<K: Sink>(
        &self,
        sink: &mut K,
        code: u8,
        kind: ErrorKind,
        cursor: &MessageCursor,
    ) {
        if !self.json && (!self.grpc || !cursor.at_boundary()) {
            sink.abort();
            return;
        }
        let mut trailers = grpc_status_fields(code, grpc_message(kind));
        trailers.remove(CONTENT_TYPE);
        let _ = sink.finish(Some(trailers)).await;
    }
}

/// Follows the gRPC message framing (a 5-byte prefix with the length, then the message) of
/// an answer's body.
#[derive(Debug, Default)]
struct MessageCursor {
    /// Prefix bytes read of the current message (0 to 5).
    prefix: [u8; 5],
    have: usize,
    /// Message bytes still to come once the prefix is whole.
    left: u64,
}

impl MessageCursor {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.left > 0 {
                let n = (self.left.min(data.len() as u64)) as usize;
                self.left -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                self.left = u64::from(u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]));
                self.have = 0;
            }
        }
    }

    /// Between two messages.
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }
}

/// What the client's request line asked for, as far as an answer's form goes.
#[derive(Debug, Clone, Copy)]
struct Asked {
    /// HEAD: the answer has no body.
    head: bool,
    /// An HTTP/1.0 client.
    http10: bool,
}

/// Answers a request that failed before its answer began: a gRPC call gets a trailers-only
/// gRPC answer (`deadline`: its `grpc-timeout` ran out; `status`: the one an upstream's
/// reset gives, where known), a JSON call a JSON error, anything else the error's status.
/// `keep`: an HTTP/1.1 connection may go on after a JSON error (its request read whole).
#[allow(clippy::too_many_arguments)]
async fn fail<S: ClientStream>(
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    call: Call,
    encoding: &Encoding,
    kind: ErrorKind,
    deadline: bool,
    asked: Asked,
    status: Option<u8>,
    keep: bool,
) -> Next {
    let mut code = status.unwrap_or_else(|| grpc_code_for(kind, deadline));
    if call == Call::Json {
        // A JSON client's call the gateway gave up on is past its time, whether or not the
        // client named one (`grpc-timeout`): 504 DEADLINE_EXCEEDED, not 503 UNAVAILABLE.
        let timeout = matches!(
            kind,
            ErrorKind::ConnectTimeout | ErrorKind::SendTimeout | ErrorKind::ResponseTimeout
        );
        if timeout && status.is_none() {
            code = 4;
        }
        req.fail(kind);
        // The client's own faults keep their status; the rest is the gRPC code's.
        let status = match kind.side() {
            crate::error::Side::Client => kind.status(),
            _ => common::transcode::http_status_for_grpc(code.into()),
        };
        let body = super::transcode::error_body(code.into(), grpc_message(kind), None, &[]);
        return answer_json(down, req, status, body, !keep, asked).await;
    }
    if !call.grpc_answers() {
        return down.fail(req, kind).await;
    }
    req.fail(kind);
    let mut fields = grpc_status_fields(code, grpc_message(kind));
    let mut extra = answer_fields(req, &mut fields);
    // The gateway's own answer (RFC 9110 6.6.1), as its HTTP/1.1 ones.
    crate::status::push_date(&mut extra);
    // An HTTP/1.1 client's connection goes on where `keep` says (its body was read whole,
    // the fault is not its own): a gRPC-Web call's answer is a head with its length.
    let sink = client_sink(down, &extra, false, false, !keep, false);
    let sent = match encoding {
        Encoding::Web { content_type, text } => {
            send_head(WebSink::new(sink, content_type.clone(), *text), 200, fields).await
        }
        _ => send_head(sink, 200, fields).await,
    };
    match sent {
        Some(n) => {
            req.status = 200;
            req.bytes_out += n;
            if keep {
                Next::KeepAlive
            } else {
                Next::Close
            }
        }
        None => {
            // A malformed request's stream, reset: logged with the status it earned.
            req.status = match kind {
                ErrorKind::BadRequest => kind.status(),
                _ => ErrorKind::ClientClosed.status(),
            };
            Next::Cut
        }
    }
}

/// Sends a JSON answer the gateway makes (a transcoded call refused or failed); an
/// HTTP/1.1 connection stays open unless `close`.
async fn answer_json<S: ClientStream>(
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    status: u16,
    body: Vec<u8>,
    close: bool,
    asked: Asked,
) -> Next {
    let mut fields = HeaderMap::new();
    fields.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    fields.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    // The route's fields replace the gateway's own of the same names.
    let mut extra = answer_fields(req, &mut fields);
    crate::status::push_date(&mut extra);
    let mut sink = client_sink(down, &extra, asked.http10, asked.head, close, false);
    let keep = matches!(sink, ClientSink::H1(_)) && !close;
    let sent = async {
        // The answer to a HEAD ends with its head (with the length a GET would get): body
        // bytes after it would be read as the next answer on a kept connection.
        sink.head(status, fields, asked.head).await?;
        if asked.head {
            return Ok(());
        }
        sink.data(body.into()).await?;
        sink.finish(None).await
    }
    .await;
    req.bytes_out += sink.sent();
    req.status = match sent {
        Ok(()) => status,
        Err(()) => ErrorKind::ClientClosed.status(),
    };
    match sent {
        Ok(()) if keep => Next::KeepAlive,
        Ok(()) => Next::Close,
        Err(()) => Next::Cut,
    }
}

/// Sends a head that ends the answer (a trailers-only gRPC answer) through `sink`; the bytes
/// sent, `None` when the client is gone.
async fn send_head<K: Sink>(mut sink: K, status: u16, fields: HeaderMap) -> Option<u64> {
    sink.head(status, fields, true).await.ok()?;
    Some(sink.sent())
}

/// The client's side of an answer: its HTTP/2 stream, or its HTTP/1.1 connection.
enum ClientSink<'a, S> {
    H2(H2Sink),
    H1(H1Sink<'a, S>),
}

/// The sink for answering on `down`: `extra` are the gateway's field lines; for HTTP/1.1,
/// `close` closes the connection after the answer, and `trailers` says they carry the
/// answer's outcome (a gRPC call's).
fn client_sink<'a, S: ClientStream>(
    down: &'a mut Downstream<S>,
    extra: &'a [u8],
    http10: bool,
    head_request: bool,
    close: bool,
    trailers: bool,
) -> ClientSink<'a, S> {
    if let Some(answer) = down.stream.take_h2_respond() {
        return ClientSink::H2(H2Sink {
            answer,
            sent: 0,
            extra: field_map(extra),
            head_request,
            ended: false,
        });
    }
    ClientSink::H1(H1Sink {
        down,
        extra,
        http10,
        head_request,
        close,
        chunked: false,
        no_body: false,
        trailers,
        out: Vec::with_capacity(1024),
        sent: 0,
    })
}

impl<S: ClientStream> Sink for ClientSink<'_, S> {
    async fn head(&mut self, status: u16, headers: HeaderMap, end: bool) -> Result<(), ()> {
        match self {
            ClientSink::H2(s) => s.head(status, headers, end).await,
            ClientSink::H1(s) => s.head(status, headers, end).await,
        }
    }

    async fn data(&mut self, data: Bytes) -> Result<(), ()> {
        match self {
            ClientSink::H2(s) => s.data(data).await,
            ClientSink::H1(s) => s.data(data).await,
        }
    }

    async fn finish(&mut self, trailers: Option<HeaderMap>) -> Result<(), ()> {
        match self {
            ClientSink::H2(s) => s.finish(trailers).await,
            ClientSink::H1(s) => s.finish(trailers).await,
        }
    }

    fn abort(&mut self) {
        match self {
            ClientSink::H2(s) => s.abort(),
            ClientSink::H1(s) => s.abort(),
        }
    }

    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            ClientSink::H2(s) => s.poll_gone(cx),
            ClientSink::H1(s) => s.poll_gone(cx),
        }
    }

    fn closes(&self) -> bool {
        match self {
            ClientSink::H2(s) => s.closes(),
            ClientSink::H1(s) => s.closes(),
        }
    }

    fn head_only(&self) -> bool {
        match self {
            ClientSink::H2(s) => s.head_only(),
            ClientSink::H1(s) => s.head_only(),
        }
    }

    fn sent(&self) -> u64 {
        match self {
            ClientSink::H2(s) => s.sent(),
            ClientSink::H1(s) => s.sent(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_carry_the_policies_fields_and_only_cors_drops_the_upstreams_own() {
        let mut req = RequestCtx::new(std::net::Ipv4Addr::LOCALHOST.into());
        // A rate limit's `headers_on_success`, no cors policy.
        let fields = b"RateLimit-Policy: \"five\";q=5;w=60\r\nRateLimit: \"five\";r=4;t=24\r\n";
        req.policy.response_extra.extend_from_slice(fields);
        let mut upstream = HeaderMap::new();
        upstream.insert("access-control-allow-origin", HeaderValue::from_static("*"));
        let extra = answer_fields(&req, &mut upstream);
        assert!(
            extra.starts_with(fields),
            "{:?}",
            String::from_utf8_lossy(&extra)
        );
        assert!(upstream.contains_key("access-control-allow-origin"));
        // With one, the upstream's CORS fields give way to the policy's.
        req.policy.cors_ran = true;
        let extra = answer_fields(&req, &mut upstream);
        assert!(extra.starts_with(fields));
        assert!(upstream.is_empty());
    }

    #[test]
    fn content_types_classify_calls() {
        assert_eq!(classify(b"application/grpc", true), Call::Grpc);
        assert_eq!(classify(b"application/grpc+proto", false), Call::Grpc);
        assert_eq!(classify(b"Application/GRPC; charset=x", true), Call::Grpc);
        assert_eq!(
            classify(b"application/grpc-web", true),
            Call::Web { text: false }
        );
        assert_eq!(
            classify(b"application/grpc-web-text+proto", true),
            Call::Web { text: true }
        );
        // gRPC-Web is translated for gRPC upstreams only; elsewhere it is relayed as is.
        assert_eq!(classify(b"application/grpc-web", false), Call::Plain);
        for plain in [
            &b"application/json"[..],
            b"application/grpcx",
            b"text/grpc",
            b"",
        ] {
            assert_eq!(classify(plain, true), Call::Plain, "{plain:?}");
        }
    }

    #[test]
    fn message_boundaries_are_followed_across_pieces() {
        let mut c = MessageCursor::default();
        assert!(c.at_boundary());
        let two = [&[0u8, 0, 0, 0, 3, b'a', b'b', b'c'][..], &[0, 0, 0, 0, 0]].concat();
        for step in [1, 2, 3, two.len()] {
            let mut c = MessageCursor::default();
            for piece in two.chunks(step) {
                c.feed(piece);
            }
            assert!(c.at_boundary(), "step {step}");
        }
        c.feed(&[0, 0, 0, 0, 4, b'x']);
        assert!(!c.at_boundary());
        c.feed(b"yz");
        assert!(!c.at_boundary());
        c.feed(b"w");
        assert!(c.at_boundary());
        c.feed(&[0, 0]);
        assert!(!c.at_boundary(), "a prefix begun");
    }

    #[test]
    fn grpc_timeouts_parse_and_print() {
        assert_eq!(
            parse_grpc_timeout(b"100m"),
            Some(Duration::from_millis(100))
        );
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"5u"), Some(Duration::from_micros(5)));
        for bad in [&b""[..], b"m", b"123456789m", b"10x", b"-1m", b"1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout_value(Duration::from_millis(250)), "250m");
        assert_eq!(grpc_timeout_value(Duration::from_micros(20)), "20u");
    }

    #[test]
    fn gateway_failures_map_to_grpc_statuses() {
        assert_eq!(grpc_code_for(ErrorKind::ConnectFailed, false), 14);
        assert_eq!(grpc_code_for(ErrorKind::UpstreamClosed, false), 14);
        assert_eq!(grpc_code_for(ErrorKind::ResponseTimeout, true), 4);
        assert_eq!(grpc_code_for(ErrorKind::ResponseTimeout, false), 14);
        assert_eq!(grpc_code_for(ErrorKind::DeadlineExceeded, false), 4);
        // The call's own deadline is not the target's failure.
        assert_eq!(ErrorKind::DeadlineExceeded.target_failure(), None);
        assert_eq!(grpc_code_for(ErrorKind::BadRequest, false), 13);
        let h = grpc_status_fields(14, "upstream 100% down\n");
        assert_eq!(h["grpc-status"], "14");
        assert_eq!(h["grpc-message"], "upstream 100%25 down%0A");
    }

    #[test]
    fn forwarded_heads_become_http2_requests() {
        let h1 = b"POST /pkg.Svc/Call HTTP/1.1\r\nHost: api.example\r\nConnection: keep-alive\r\n\
                   Content-Type: application/grpc-web-text\r\nContent-Length: 12\r\n\
                   grpc-timeout: 90S\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n";
        let mut t = None;
        let up = Upstream {
            authority: "u",
            tls: false,
        };
        let out = outgoing(
            h1,
            Call::Web { text: true },
            up,
            Duration::from_secs(60),
            &mut t,
        )
        .unwrap();
        assert_eq!(
            t,
            Some(Duration::from_secs(90)),
            "the client's, to tell its expiry"
        );
        assert_eq!(out.method, http::Method::POST);
        assert_eq!(out.uri, "http://api.example/pkg.Svc/Call");
        let h = &out.headers;
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["grpc-timeout"], "60000m");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert!(h.get("connection").is_none() && h.get("host").is_none());
        assert!(h.get("content-length").is_none());
        // Over TLS the target URI's scheme is `https` (before: always `http`).
        let h1 = b"GET /x HTTP/1.1\r\nHost: api.example\r\n\r\n";
        let tls = Upstream { tls: true, ..up };
        let out = outgoing(h1, Call::Plain, tls, Duration::from_secs(60), &mut t).unwrap();
        assert_eq!(out.uri, "https://api.example/x");
        let out = outgoing(h1, Call::Plain, up, Duration::from_secs(60), &mut t).unwrap();
        assert_eq!(out.uri, "http://api.example/x");
    }
}
