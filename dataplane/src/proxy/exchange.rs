//! The upstream exchange: send a request (head, then body) on a session and read the response
//! head. It returns the head and a [`BodyReader`] to its caller instead of writing anything to
//! a client, so plain proxying streams the body on ([`super::relay`]) while a fan-out can run
//! several exchanges concurrently on one worker and collect their bodies.
//!
//! Hot path: the request head goes out with one vectored write straight from the client's
//! read buffer; nothing allocates.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use monoio::buf::IoBuf;
use monoio::io::AsyncWriteRentExt;

use super::context::RequestCtx;
use super::downstream::{Downstream, BODY_BUF};
use super::relay::BodyReader;
use super::stream::ClientStream;
use crate::codec::chunked::ChunkedDecoder;
use crate::codec::response::{parse_response, ResponseHead};
use crate::codec::{BodyKind, FieldPlan, Reparse};
use crate::error::{ErrorKind, ProxyError};
use crate::gather::{write_gathered, Piece, COALESCE_MAX};
use crate::io::{peek_into, Peeked, ReadError};
use crate::upstream::{is_send_timeout, UpstreamConn, UPSTREAM_BUF};

/// What reading a response head gave.
#[derive(Debug)]
pub(crate) enum HeadRead {
    /// An interim (1xx other than 101) response at the start of the buffer (its fields to
    /// drop in the caller's plan): pass it on or skip it, drain it, and read again.
    Interim(ResponseHead),
    Final(ResponseHead),
}

/// The error for a failed write to an upstream: a send timeout (the upstream stopped
/// reading), or a closed connection, which may be retried when nothing of the request body
/// had to be read from the client yet (the caller decides that).
pub(crate) fn write_error(e: &std::io::Error) -> ProxyError {
    if is_send_timeout(e) {
        ProxyError::new(ErrorKind::SendTimeout)
    } else {
        ProxyError::new(ErrorKind::UpstreamClosed)
    }
}

/// Sends `pieces` of `src` and `extra` (a request head and the body bytes that came with it)
/// on `conn`. A failure is retryable unless the upstream stalled: nothing of it was acted on.
pub(crate) async fn send_head(
    conn: &mut UpstreamConn,
    src: &mut Vec<u8>,
    extra: &mut Vec<u8>,
    iov: &mut Vec<libc::iovec>,
    pieces: impl Iterator<Item = Piece>,
) -> Result<(), ProxyError> {
    match write_gathered(&mut conn.stream, src, extra, iov, pieces, COALESCE_MAX).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let err = write_error(&e);
            Err(err.retryable(err.kind == ErrorKind::UpstreamClosed))
        }
    }
}

/// Reads a response head into `conn.buf` (which holds whatever is left of an interim
/// response the caller drained), at most `most` bytes per read. `first_byte` is set when the
/// first byte arrives; `replayable`: an upstream that closes before sending anything may get
/// the request again.
pub(crate) async fn read_head(
    conn: &mut UpstreamConn,
    is_head: bool,
    deadline: Instant,
    plan: &mut FieldPlan,
    first_byte: &mut Option<Instant>,
    replayable: bool,
    most: usize,
) -> Result<HeadRead, ProxyError> {
    let mut reparse = Reparse::default();
    loop {
        if !conn.buf.is_empty() && reparse.due(&conn.buf, &[UPSTREAM_BUF]) {
            let mut parsed = parse_response(&conn.buf, is_head, UPSTREAM_BUF, plan);
            if let Ok(Some(_)) = parsed {
                // `HTTP/1.1 200` without the space before an absent reason phrase, which the
                // status line must have (RFC 9112 4): rare, so the byte is inserted and the
                // head parsed again, its offsets moved by it (its version still as sent: an
                // HTTP/1.0 answer's connection closes after it).
                if conn.buf.get(12) == Some(&b'\r') {
                    conn.buf.insert(12, b' ');
                    parsed = parse_response(&conn.buf, is_head, UPSTREAM_BUF, plan);
                }
                // The status line carries the gateway's own version (RFC 9110 6.2), not an
                // HTTP/1.0 upstream's: an HTTP/1.1 client would take `HTTP/1.0` for a
                // connection that closes. Interim and early answers too.
                if conn.buf.starts_with(b"HTTP/1.0 ") {
                    conn.buf[5..8].copy_from_slice(b"1.1");
                }
            }
            match parsed {
                Ok(Some(resp)) if (100..200).contains(&resp.status) && resp.status != 101 => {
                    return Ok(HeadRead::Interim(resp));
                }
                Ok(Some(resp)) => {
                    conn.peek_when_taken = is_head || matches!(resp.status, 204 | 304);
                    return Ok(HeadRead::Final(resp));
                }
                Ok(None) => {}
                Err(_) => return Err(ErrorKind::UpstreamMalformed.into()),
            }
        }
        match conn.read_at_most(most, deadline).await {
            Ok(0) | Err(ReadError::Io) => {
                let nothing = first_byte.is_none();
                return Err(
                    ProxyError::new(ErrorKind::UpstreamClosed).retryable(nothing && replayable)
                );
            }
            Err(ReadError::Timeout) => return Err(ErrorKind::ResponseTimeout.into()),
            Err(ReadError::Stalled) => return Err(ErrorKind::SendTimeout.into()),
            Err(ReadError::ClientLeft) => return Err(ErrorKind::ClientClosed.into()),
            Ok(_) => {
                first_byte.get_or_insert_with(Instant::now);
            }
        }
    }
}

/// One whole exchange for a request already complete in `request` (head and body): sends it,
/// skips interim responses, and returns the final head with a reader for its body, which
/// starts in `conn.buf` after `head_end`. Each step of an aggregate is one (`fanout`).
/// `replayable`: the request may be sent again if the connection closes before any answer.
pub(crate) async fn exchange(
    conn: &mut UpstreamConn,
    request: &mut Vec<u8>,
    is_head: bool,
    deadline: Instant,
    body_idle: std::time::Duration,
    plan: &mut FieldPlan,
    replayable: bool,
) -> Result<(ResponseHead, BodyReader), ProxyError> {
    // One buffer: a plain write, no iovec list.
    let len = request.len();
    if let Err(e) = crate::io::write_range(&mut conn.stream, request, 0..len).await {
        let err = write_error(&e);
        return Err(err.retryable(err.kind == ErrorKind::UpstreamClosed));
    }
    conn.buf.clear();
    let mut first_byte = None;
    let mut interims = 0;
    loop {
        let read = read_head(
            conn,
            is_head,
            deadline,
            plan,
            &mut first_byte,
            replayable,
            usize::MAX,
        );
        match read.await? {
            HeadRead::Interim(resp) => {
                // As when relaying (`MAX_INTERIM`): more is a faulty upstream, and a buffer
                // packed with small interim heads would be moved once per head.
                interims += 1;
                if interims > super::MAX_INTERIM {
                    return Err(ErrorKind::UpstreamMalformed.into());
                }
                conn.buf.drain(..resp.head_end);
            }
            HeadRead::Final(resp) => {
                let reader = BodyReader::start(&resp, &conn.buf, body_idle)?;
                return Ok((resp, reader));
            }
        }
    }
}

/// Streams the rest of the request body from the client to the upstream, through the
/// client's read buffer (`left`: bytes still to come, or 1 while a chunked body is not done).
/// A client-side error means the client's body failed (answer with its status, if any); an
/// upstream-side one that writing to the upstream failed, or that the upstream closed while
/// the client paused (the caller relays an answer it finds).
pub(crate) async fn relay_request_body<S: ClientStream>(
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    conn: &mut UpstreamConn,
    kind: BodyKind,
    left: &mut u64,
    mut decoder: Option<&mut ChunkedDecoder>,
) -> Result<(), ProxyError> {
    while *left > 0 {
        if down.pos == down.buf.len() {
            // The next bytes go into the emptied buffer. While the client pauses, the upstream is looked at: one that closed its end
            // (an upload's early 413 or 401) has its answer relayed at once, not after bytes
            // the client may never send. One that answered and keeps its end open may still
            // read the rest (a duplex exchange), so the wait goes on.
            let upstream = conn.stream.as_raw_fd();
            let closed = || crate::io::peer_closed(upstream);
            if !down.read_body_bytes_unless(EARLY_CHECK, closed).await? {
                return Err(ProxyError::new(ErrorKind::UpstreamClosed));
            }
        }
        let avail = &down.buf[down.pos..];
        let take = match (kind, decoder.as_deref_mut()) {
            (BodyKind::Chunked, Some(d)) => {
                let k = d
                    .advance(avail)
                    .map_err(|_| ProxyError::new(ErrorKind::BadRequest))?;
                if d.declared_len() > down.limits.max_body_bytes {
                    return Err(ErrorKind::BodyTooLarge.into());
                }
                if d.is_done() {
                    *left = 0;
                }
                k
            }
            _ => {
                let k = usize::try_from(*left).map_or(avail.len(), |l| l.min(avail.len()));
                *left -= k as u64;
                k
            }
        };
        let start = down.pos;
        let buf = std::mem::take(&mut down.buf);
        let (stream, mut look) = conn.upload();
        let fd = stream.as_raw_fd();
        // Through TLS the socket holds records: what they hold is decrypted ahead instead.
        let peek = look.plain().then_some(fd);
        let write = stream.write_all(buf.slice(start..start + take));
        let answered = || final_answer_waiting(look.read_so_far(), peek);
        let Some((res, slice)) = unless_answered(write, fd, answered).await else {
            // The write is abandoned with the buffer it held: the client connection closes
            // after the answer, so nothing in it is needed.
            down.buf = Vec::with_capacity(BODY_BUF);
            down.pos = 0;
            return Err(ProxyError::new(ErrorKind::UpstreamClosed));
        };
        down.buf = slice.into_inner();
        down.pos = start + take;
        req.bytes_in += take as u64;
        res.map_err(|e| write_error(&e))?;
    }
    Ok(())
}

/// How long a write of request body bytes runs before the gateway looks whether the
/// upstream has answered meanwhile, and again after each such interval.
const EARLY_CHECK: Duration = Duration::from_millis(100);
/// How long an upstream that has answered may take none of the body (no byte acknowledged)
/// before the gateway stops sending it.
const EARLY_STALL: Duration = Duration::from_secs(1);

/// Runs `write` (of request body bytes to the upstream on socket `fd`) to its end, unless
/// the upstream has answered and stopped taking the body: an upload's early 413 or 401,
/// after which it reads no more. `None` then, once no byte of it has been acknowledged for
/// [`EARLY_STALL`] (not at the send timeout, `upstream_send_ms`); the caller relays the
/// answer (`early_answer`). An upstream that answered and still reads, however slowly, gets
/// the whole body (RFC 9112 9.3 leaves that to the client).
///
/// `answered` looks for the answer: what a pooled connection's armed read took, then the
/// socket ([`crate::upstream::AnswerLook`]).
async fn unless_answered<F: std::future::Future>(
    write: F,
    fd: RawFd,
    mut answered: impl FnMut() -> bool,
) -> Option<F::Output> {
    let mut write = std::pin::pin!(write);
    // The acknowledged count, and since when it has not moved.
    let mut still: Option<(u64, Instant)> = None;
    loop {
        match monoio::time::timeout(EARLY_CHECK, write.as_mut()).await {
            Ok(out) => return Some(out),
            Err(_) => {
                let Some(acked) = crate::io::bytes_acked(fd) else {
                    continue;
                };
                let now = Instant::now();
                match still {
                    Some((before, since)) if before == acked => {
                        if now - since >= EARLY_STALL && answered() {
                            return None;
                        }
                    }
                    _ => still = Some((acked, now)),
                }
            }
        }
    }
}

/// Whether the start of a final answer waits: `read` (bytes of it read already), then
/// what the upstream's socket `fd` holds (none through TLS, whose socket holds records);
/// what is there past any whole interim (1xx) heads, and not what may still become one.
pub(crate) fn final_answer_waiting(read: &[u8], fd: Option<RawFd>) -> bool {
    let mut buf = [0u8; 2048];
    let have = read.len().min(buf.len());
    buf[..have].copy_from_slice(&read[..have]);
    let peeked = match fd {
        Some(fd) => match peek_into(fd, &mut buf[have..]) {
            (Peeked::Data, n) => n,
            _ => 0,
        },
        None => 0,
    };
    let n = have + peeked;
    if n == 0 {
        return false;
    }
    let interim = |r: &[u8]| r.len() >= 10 && r.starts_with(b"HTTP/1.") && &r[8..10] == b" 1";
    let mut rest = &buf[..n];
    while interim(rest) {
        match rest.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(i) => rest = &rest[i + 4..],
            // Not whole yet (or longer than the peek): the upstream is still talking.
            None => return false,
        }
    }
    // A start too short to tell from an interim head's.
    let may_be_interim = rest.len() < 10
        && rest
            .iter()
            .zip(b"HTTP/1.1 1")
            .enumerate()
            .all(|(i, (a, b))| i == 7 || a == b);
    !rest.is_empty() && !may_be_interim
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener};
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::upstream::connect;

    /// An origin that answers one request with `body` (chunked when `chunked`, after a
    /// `100 Continue` otherwise). It tells `received` when the request is in, and sends the
    /// body only once `go` says so (closing without it if that does not come in 2 s).
    fn origin(
        body: &'static str,
        chunked: bool,
        received: Option<mpsc::Sender<()>>,
        go: Option<mpsc::Receiver<()>>,
    ) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            assert!(got.starts_with(b"GET /step HTTP/1.1\r\n"));
            if let Some(r) = received {
                r.send(()).unwrap();
            }
            let head = if chunked {
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned()
            } else {
                format!(
                    "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
            };
            s.write_all(head.as_bytes()).unwrap();
            if let Some(go) = go {
                if go.recv_timeout(Duration::from_secs(2)).is_err() {
                    return;
                }
            }
            let rest = if chunked {
                format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len())
            } else {
                body.to_owned()
            };
            s.write_all(rest.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        });
        addr
    }

    #[test]
    fn two_exchanges_run_concurrently_on_one_runtime_without_a_client() {
        // The first origin sends its body only after the second has received its request:
        // run one after the other, the first exchange would never complete.
        let (tx, rx) = mpsc::channel();
        let a = origin("{\"product\":1}", false, None, Some(rx));
        let b = origin("{\"reviews\":[]}", true, Some(tx), None);
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let (ra, rb) = rt.block_on(async move {
            let step = |target: SocketAddr| async move {
                let mut conn = connect(target, Duration::from_secs(1), Duration::from_secs(1))
                    .await
                    .map_err(|_| ProxyError::new(ErrorKind::ConnectFailed))?;
                let mut request = b"GET /step HTTP/1.1\r\nHost: origin\r\n\r\n".to_vec();
                let mut plan = FieldPlan::default();
                let deadline = Instant::now() + Duration::from_secs(5);
                let (resp, mut body) = exchange(
                    &mut conn,
                    &mut request,
                    false,
                    deadline,
                    Duration::from_secs(5),
                    &mut plan,
                    true,
                )
                .await?;
                let mut out = Vec::new();
                let within = body
                    .collect(&mut conn, resp.head_end, &mut out, 1024)
                    .await?;
                assert!(within);
                Ok::<_, ProxyError>((resp.status, out, body.clean()))
            };
            monoio::join!(step(a), step(b))
        });
        assert_eq!(ra.unwrap(), (200, b"{\"product\":1}".to_vec(), true));
        assert_eq!(rb.unwrap(), (200, b"{\"reviews\":[]}".to_vec(), true));
    }

    /// The answers after which the pool peeks at a connection it hands out again: those
    /// without a body because of what they answer (where a body sent anyway is a known
    /// upstream bug), not those that say their body is empty.
    #[test]
    fn answers_without_a_body_by_their_kind_mark_the_connection_for_a_peek() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async move {
            let second = Duration::from_secs(1);
            let mut conn = connect(addr, second, second).await.unwrap();
            let _peer = l.accept().unwrap();
            for (head, is_head, peek) in [
                ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true, true),
                ("HTTP/1.1 204 No Content\r\n\r\n", false, true),
                (
                    "HTTP/1.1 304 Not Modified\r\nETag: \"a\"\r\n\r\n",
                    false,
                    true,
                ),
                ("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false, false),
                (
                    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                    false,
                    false,
                ),
            ] {
                conn.buf.clear();
                conn.buf.extend_from_slice(head.as_bytes());
                let read = read_head(
                    &mut conn,
                    is_head,
                    Instant::now() + second,
                    &mut FieldPlan::default(),
                    &mut None,
                    false,
                    1024,
                )
                .await;
                assert!(matches!(read, Ok(HeadRead::Final(_))), "{head}");
                assert_eq!(conn.peek_when_taken, peek, "{head}");
            }
        });
    }
}
