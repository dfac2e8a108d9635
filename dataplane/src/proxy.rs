//! One client connection: read a request head, route it, forward it, relay the response, and
//! loop for the next request (keep-alive, pipelining).
//!
//! Hot path. Per request: one snapshot load, a parse over the read buffer, a route lookup, one
//! vectored write of the head (and whatever body bytes came with it) from the read buffer, and
//! the same for the response. Bodies move between sockets in the connections' own buffers. After
//! warm-up nothing here allocates; the only per-request state is on the stack or in buffers
//! owned by the connection.
//!
//! Error policy: a problem caused by the client is a 4xx, one caused by the upstream a 502 (504
//! on its timeouts), and the client connection is closed whenever framing could be in doubt.
//! A read that timed out is never retried on the same connection: with io_uring its bytes may
//! already be consumed.

use std::cell::Cell;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use common::slots::NO_ROUTE_SLOT;
use common::{Limits, Route, RouteAction, Snapshot, Timeouts};
use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelableAsyncReadRent, Canceller, Splitable,
};
use monoio::net::TcpStream;

use crate::codec::chunked::ChunkedDecoder;
use crate::codec::request::{parse_request, RequestHead};
use crate::codec::response::{parse_response, ResponseHead};
use crate::codec::{BodyKind, FieldPlan, Span};
use crate::forward::{self, request_pieces, response_pieces};
use crate::gather::write_gathered;
use crate::metrics::UpstreamError;
use crate::policy::{self, Clock, PolicyState, Verdict};
use crate::status::{Status, CONTINUE};
use crate::upstream::{
    connect, is_send_timeout, set_send_timeout, ConnectError, UpstreamConn, UPSTREAM_BUF,
};
use crate::worker::{Peer, WorkerCtx};

/// Initial size of a client connection's read buffer; it grows up to `max_header_bytes` for a
/// large head and to [`BODY_BUF`] to relay a large request body.
const CLIENT_BUF: usize = 8 * 1024;
const BODY_BUF: usize = 64 * 1024;
/// Longest a lingering close waits for the client to stop sending.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// Most a lingering close reads and discards.
const LINGER_BYTES: usize = 16 * 1024 * 1024;

/// Why reading from a socket stopped.
#[derive(Debug)]
enum ReadError {
    Timeout,
    Io,
    /// The peer left bytes the gateway sent unacknowledged past its send timeout
    /// (`ETIMEDOUT` from TCP_USER_TIMEOUT); the connection is gone.
    Stalled,
}

/// How a request ended for the client connection.
#[derive(Debug)]
enum Next {
    /// Ready for the next request on this connection.
    KeepAlive,
    /// Close the connection.
    Close,
    /// The upstream switched protocols: tunnel bytes both ways from now on.
    Upgrade(UpstreamConn, ResponseHead),
}

/// What went wrong talking to an upstream, and so what the client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpstreamFailure {
    /// Nothing came back at all (closed or reset before any byte).
    NothingReceived,
    Timeout,
    /// The request stayed unacknowledged past `upstream_send_ms` (the kernel dropped the
    /// connection while the gateway waited for the answer).
    Stalled,
    Broken,
    /// A response head the gateway cannot frame.
    Malformed,
}

/// A response the gateway makes itself.
#[derive(Debug, Clone, Copy)]
enum Reply<'a> {
    Canned(Status),
    /// A route's direct response: head without its blank line, then the body.
    Direct {
        bytes: &'a [u8],
        head_len: usize,
    },
}

struct Client {
    stream: TcpStream,
    /// Read buffer; `buf[pos..]` is received and not yet consumed.
    buf: Vec<u8>,
    pos: usize,
    scratch: Vec<u8>,
    iov: Vec<libc::iovec>,
    req_plan: FieldPlan,
    resp_plan: FieldPlan,
    peer_ip: IpAddr,
    /// Index of the listener the connection came in on.
    listener: u16,
    limits: Limits,
    timeouts: Timeouts,
    served: u64,
    /// Cancels the read that waits for a next request when the connection parks.
    canceller: Canceller,
    /// Status of the response last sent, and the metrics slot of the route that sent it.
    last_status: u16,
    last_slot: u32,
    /// What the route's policies decided for the current request.
    policy: PolicyState,
    /// The answer went out while the client may still be sending the request body: close
    /// with a lingering close.
    linger: bool,
}

/// How long a failed write to an upstream waits for an answer it may have sent early.
const EARLY_ANSWER_WAIT: Duration = Duration::from_millis(100);

/// Why relaying a request body stopped.
#[derive(Debug)]
enum BodyRelayError {
    /// From the client's side: answer with the status, if any, and close.
    Client(Option<Status>),
    /// Writing to the upstream failed.
    Upstream(std::io::Error),
}

/// What waiting for the next request head gave.
#[derive(Debug)]
enum Head {
    Request(RequestHead),
    /// The client closed or stayed silent too long: close quietly.
    Closed,
    /// Idle past `client_park_ms`: hand the socket to the worker's park lot.
    Park,
}

/// Serves a connection until it closes or parks; `served` counts requests already served on
/// it (0 for a fresh connection).
pub(crate) async fn serve(ctx: Rc<WorkerCtx>, stream: TcpStream, peer: Peer, served: u64) {
    let snap = ctx.config.load();
    if served == 0 {
        let _ = stream.set_nodelay(true);
        let _ = set_send_timeout(stream.as_raw_fd(), snap.timeouts.client_send);
    }
    let mut client = Client {
        stream,
        buf: Vec::with_capacity(CLIENT_BUF),
        pos: 0,
        scratch: Vec::with_capacity(512),
        iov: Vec::with_capacity(16),
        req_plan: FieldPlan::default(),
        resp_plan: FieldPlan::default(),
        peer_ip: peer.ip,
        listener: peer.listener,
        limits: snap.limits,
        timeouts: snap.timeouts,
        served,
        canceller: Canceller::new(),
        last_status: 0,
        last_slot: NO_ROUTE_SLOT,
        policy: PolicyState::default(),
        linger: false,
    };
    drop(snap);
    loop {
        let head = match client.read_head(&ctx).await {
            Ok(Head::Request(head)) => head,
            Ok(Head::Closed) => return,
            Ok(Head::Park) => {
                let Client {
                    stream,
                    peer_ip,
                    listener,
                    ..
                } = client;
                if let Some(lot) = ctx.park.borrow_mut().as_mut() {
                    // A socket the kernel will not watch is closed, like an expired one.
                    let peer = Peer {
                        ip: peer_ip,
                        listener,
                    };
                    let _ = lot.park(stream, peer, Instant::now());
                }
                return;
            }
            Err(status) => {
                client.send_static(status.response(true)).await;
                return;
            }
        };
        // One snapshot per request: a keep-alive client sees a config change on its very next
        // request, and this request finishes on the snapshot it started with.
        let snap = ctx.snapshot();
        client.limits = snap.limits;
        client.timeouts = snap.timeouts;
        client.served += 1;
        let started = Instant::now();
        client.last_status = 0;
        client.last_slot = NO_ROUTE_SLOT;
        let next = client.handle(&ctx, &snap, head).await;
        if client.last_status != 0 {
            let us = started.elapsed().as_micros() as u64;
            ctx.metrics
                .request(client.last_slot, client.last_status, us);
        }
        match next {
            Next::KeepAlive if !ctx.draining.get() => {}
            Next::KeepAlive => return,
            Next::Close => {
                if client.linger {
                    client.linger_close().await;
                }
                return;
            }
            Next::Upgrade(conn, resp) => {
                drop(snap);
                return client.tunnel(conn, resp).await;
            }
        }
    }
}

impl Client {
    /// Reads until a whole request head is buffered at `buf[0..]`. `Err`: answer with that
    /// status and close.
    async fn read_head(&mut self, ctx: &WorkerCtx) -> Result<Head, Status> {
        // Move pipelined bytes to the front so the head's offsets start at 0.
        if self.pos > 0 {
            self.buf.copy_within(self.pos.., 0);
            self.buf.truncate(self.buf.len() - self.pos);
            self.pos = 0;
        }
        let mut header_deadline = None;
        loop {
            if !self.buf.is_empty() {
                if let Some(head) = parse_request(&self.buf, &self.limits, &mut self.req_plan)? {
                    return Ok(Head::Request(head));
                }
            }
            let waiting_idle = self.buf.is_empty();
            let deadline = match header_deadline {
                Some(d) => d,
                None if !waiting_idle => {
                    let d = Instant::now() + self.timeouts.client_header;
                    header_deadline = Some(d);
                    d
                }
                // Waiting for the first byte of a request.
                None if self.served == 0 => Instant::now() + self.timeouts.client_header,
                None => Instant::now() + self.timeouts.client_idle,
            };
            if waiting_idle && ctx.draining.get() {
                return Ok(Head::Closed);
            }
            let slot = waiting_idle.then(|| ctx.idle.borrow_mut().insert(self.stream.as_raw_fd()));
            let park_after = self
                .timeouts
                .client_park
                .filter(|_| waiting_idle && self.served > 0 && ctx.park.borrow().is_some());
            let res = match park_after {
                Some(grace) => self.read_or_park(grace).await,
                None => {
                    let want = self.limits.max_header_bytes;
                    read_more(
                        &mut self.stream,
                        &mut self.buf,
                        &mut self.pos,
                        want,
                        deadline,
                    )
                    .await
                    .map(Some)
                }
            };
            if let Some(slot) = slot {
                ctx.idle.borrow_mut().remove(slot);
            }
            match res {
                Ok(None) => return Ok(Head::Park),
                // Closed before or in the middle of a head: nobody to answer.
                Ok(Some(0)) => return Ok(Head::Closed),
                Ok(Some(_)) => {}
                Err(ReadError::Timeout) if waiting_idle => return Ok(Head::Closed),
                Err(ReadError::Timeout) => return Err(Status::RequestTimeout),
                Err(ReadError::Io | ReadError::Stalled) => return Ok(Head::Closed),
            }
        }
    }

    /// Waits up to `grace` for the next request's first bytes. `Ok(None)`: nothing came and
    /// the read was cancelled without consuming anything, so the connection can park.
    async fn read_or_park(&mut self, grace: Duration) -> Result<Option<usize>, ReadError> {
        self.buf.clear();
        self.pos = 0;
        let owned = std::mem::take(&mut self.buf);
        let read = self.stream.cancelable_read(owned, self.canceller.handle());
        let mut read = std::pin::pin!(read);
        let mut timer = std::pin::pin!(monoio::time::sleep(grace));
        let first = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = read.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        let (res, buf) = match first {
            Some(done) => done,
            None => {
                // Cancel, then wait for the read to finish either way: bytes that arrived in
                // the meantime are returned with the buffer, never lost.
                self.canceller = std::mem::take(&mut self.canceller).cancel();
                read.await
            }
        };
        self.buf = buf;
        match res {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => Ok(None),
            Err(_) => Err(ReadError::Io),
        }
    }

    async fn handle(&mut self, ctx: &WorkerCtx, snap: &Snapshot, head: RequestHead) -> Next {
        let method = head.method.of(&self.buf);
        let host = head.host.map(|h| h.of(&self.buf));
        let preflight = method == b"OPTIONS" && policy::is_preflight(&self.buf, &head);
        let found = snap.router.find(host, head.path(&self.buf), |id| {
            let r = &snap.routes[id as usize];
            r.accepts(method) || (preflight && r.has_cors)
        });
        let route = found.map(|id| &snap.routes[id as usize]);
        if let Some(route) = route {
            self.last_slot = route.metrics_slot;
        }
        let p = &snap.policies;
        let screened = match route {
            Some(r) => !r.policies.is_empty(),
            None => !p.global_unrouted.is_empty(),
        } || p
            .listeners
            .get(self.listener as usize)
            .is_some_and(|l| !l.is_empty());
        if !screened {
            self.policy.reset();
        } else {
            let verdict = policy::check(
                snap,
                route,
                self.listener,
                &self.buf,
                &head,
                self.peer_ip,
                &mut ctx.limiters.borrow_mut(),
                Clock::now(),
                &mut self.policy,
            );
            if let Verdict::Answer(_) = verdict {
                let out = std::mem::take(&mut self.policy.out);
                let reply = Reply::Direct {
                    bytes: &out,
                    head_len: self.policy.out_head_len,
                };
                let next = self.respond(&head, reply, ctx).await;
                self.policy.out = out;
                return next;
            }
        }
        let Some(route) = route else {
            return self
                .respond(&head, Reply::Canned(Status::NotFound), ctx)
                .await;
        };
        match &route.action {
            RouteAction::Respond { bytes, head_len } => {
                let reply = Reply::Direct {
                    bytes,
                    head_len: *head_len,
                };
                self.respond(&head, reply, ctx).await
            }
            RouteAction::Proxy { upstream } => {
                let target = ctx.pick_target(snap, *upstream);
                self.proxy(ctx, &head, route, target).await
            }
        }
    }

    /// Answers without an upstream.
    async fn respond(&mut self, head: &RequestHead, reply: Reply<'_>, ctx: &WorkerCtx) -> Next {
        // The request body is consumed if it is all buffered; otherwise close after answering
        // rather than read a body nobody wants.
        let complete = self.skip_buffered_body(head);
        let close = !complete || !head.keep_alive || ctx.draining.get();
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        match reply {
            Reply::Direct { bytes, head_len } => {
                out.extend_from_slice(&bytes[..head_len]);
                if close {
                    out.extend_from_slice(b"Connection: close\r\n");
                } else if head.http10 {
                    out.extend_from_slice(b"Connection: keep-alive\r\n");
                }
                out.extend_from_slice(b"\r\n");
                if !head.is_head(&self.buf) {
                    out.extend_from_slice(&bytes[head_len..]);
                }
            }
            Reply::Canned(status) => out.extend_from_slice(status.response(close || head.http10)),
        }
        self.last_status = match reply {
            Reply::Direct { bytes, .. } => direct_status(bytes),
            Reply::Canned(status) => status.code(),
        };
        let (res, out) = self.stream.write_all(out).await;
        self.scratch = out;
        if res.is_err() || close || matches!(reply, Reply::Canned(_) if head.http10) {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }

    /// Consumes the request body if it is entirely in the buffer.
    fn skip_buffered_body(&mut self, head: &RequestHead) -> bool {
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
                true
            }
            None => false,
        }
    }

    async fn send_static(&mut self, bytes: &'static [u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Forwards the request to `target` and relays the response.
    async fn proxy(
        &mut self,
        ctx: &WorkerCtx,
        head: &RequestHead,
        route: &Route,
        target: SocketAddr,
    ) -> Next {
        // Body bytes that arrived with the head go out in the same write.
        let buffered = &self.buf[head.head_end..];
        let mut decoder = None;
        let (first_body, mut body_left) = match head.body {
            BodyKind::None | BodyKind::UntilClose => (0, 0u64),
            BodyKind::Length(n) => {
                let k = usize::try_from(n).map_or(buffered.len(), |n| n.min(buffered.len()));
                (k, n - k as u64)
            }
            BodyKind::Chunked => {
                let mut d = ChunkedDecoder::new(self.limits.max_header_bytes);
                let k = match d.advance(buffered) {
                    Ok(k) => k,
                    Err(_) => return self.fail(Status::BadRequest).await,
                };
                if d.data_len() > self.limits.max_body_bytes {
                    return self.fail(Status::PayloadTooLarge).await;
                }
                let left = u64::from(!d.is_done());
                decoder = Some(d);
                (k, left)
            }
        };
        let body_end = head.head_end + first_body;
        // The whole request is in the buffer: it can be sent again on a fresh connection.
        let replayable = body_left == 0;
        // Read while the head's spans still point at it: relaying a body reuses the buffer.
        let is_head = head.is_head(&self.buf);
        for &d in &self.policy.drops {
            policy::add_drop(&mut self.req_plan.drop, d);
        }
        let (line, tail) = forward::request_extras(
            &self.buf,
            head,
            &self.req_plan,
            route.strip_prefix_len,
            self.peer_ip,
            &self.policy.extra,
            self.policy.query_drop,
            &mut self.scratch,
        );

        let mut retried = false;
        let (mut conn, resp) = loop {
            let now = Instant::now();
            let pooled_conn = ctx.pool.borrow_mut().take(target, now);
            let pooled = pooled_conn.is_some();
            let mut conn = match pooled_conn {
                Some(c) => c,
                None => match connect(
                    target,
                    self.timeouts.upstream_connect,
                    self.timeouts.upstream_send,
                )
                .await
                {
                    Ok(c) => c,
                    Err(ConnectError::Timeout) => {
                        ctx.metrics.upstream_error(UpstreamError::ConnectTimeout);
                        return self.fail(Status::GatewayTimeout).await;
                    }
                    Err(ConnectError::Io(_)) => {
                        ctx.metrics.upstream_error(UpstreamError::ConnectFailed);
                        return self.fail(Status::BadGateway).await;
                    }
                },
            };
            let pieces = request_pieces(head, &self.req_plan, line, tail, body_end);
            let sent = write_gathered(
                &mut conn.stream,
                &mut self.buf,
                &mut self.scratch,
                &mut self.iov,
                pieces,
            )
            .await;
            if let Err(e) = sent {
                // A pooled connection the upstream had closed: nothing of the request got
                // through and nothing more has been read from the client, so it can go
                // again on a fresh connection, once.
                if pooled && !retried && !is_send_timeout(&e) {
                    retried = true;
                    continue;
                }
                // The rest of the request body may still be on its way from the client.
                self.linger = body_left > 0;
                return self
                    .upstream_write_failed(ctx, &mut conn, head, is_head, &e)
                    .await;
            }
            self.pos = body_end;
            if body_left > 0 {
                if head.expect_continue {
                    let (res, _) = self.stream.write_all(CONTINUE).await;
                    if res.is_err() {
                        return Next::Close;
                    }
                }
                match self
                    .relay_request_body(&mut conn, head.body, &mut body_left, decoder.as_mut())
                    .await
                {
                    Ok(()) => {}
                    Err(BodyRelayError::Client(Some(status))) => {
                        // A body refused mid-way (413, 400): the client may still be sending.
                        self.linger = status != Status::RequestTimeout;
                        return self.fail(status).await;
                    }
                    Err(BodyRelayError::Client(None)) => return Next::Close,
                    Err(BodyRelayError::Upstream(e)) => {
                        self.linger = body_left > 0;
                        return self
                            .upstream_write_failed(ctx, &mut conn, head, is_head, &e)
                            .await;
                    }
                }
            }
            let sent_at = Instant::now();
            let deadline = sent_at + self.timeouts.upstream_response_head;
            match self
                .read_response_head(&mut conn, head, is_head, deadline)
                .await
            {
                Ok(resp) => {
                    let us = sent_at.elapsed().as_micros() as u64;
                    ctx.metrics.upstream_latency.observe(us);
                    break (conn, resp);
                }
                Err(UpstreamFailure::NothingReceived)
                    if pooled && replayable && !retried && head.is_idempotent(&self.buf) =>
                {
                    retried = true;
                    self.pos = head.start;
                    continue;
                }
                Err(UpstreamFailure::Timeout) => {
                    ctx.metrics.upstream_error(UpstreamError::ResponseTimeout);
                    return self.fail(Status::GatewayTimeout).await;
                }
                Err(UpstreamFailure::Stalled) => {
                    ctx.metrics.upstream_error(UpstreamError::SendTimeout);
                    return self.fail(Status::GatewayTimeout).await;
                }
                Err(UpstreamFailure::Malformed) => {
                    ctx.metrics.upstream_error(UpstreamError::Malformed);
                    return self.fail(Status::BadGateway).await;
                }
                Err(UpstreamFailure::NothingReceived | UpstreamFailure::Broken) => {
                    ctx.metrics.upstream_error(UpstreamError::Broken);
                    return self.fail(Status::BadGateway).await;
                }
            }
        };

        if resp.status == 101 {
            if head.upgrade.is_none() {
                ctx.metrics.upstream_error(UpstreamError::Malformed);
                return self.fail(Status::BadGateway).await;
            }
            self.last_status = 101;
            return Next::Upgrade(conn, resp);
        }
        let close_client =
            !head.keep_alive || resp.body == BodyKind::UntilClose || ctx.draining.get();
        let reusable = resp.reusable && !head.http10;
        self.last_status = resp.status;
        match self
            .relay_response(&mut conn, &resp, head, close_client)
            .await
        {
            Ok(true) if reusable => {
                conn.buf.clear();
                ctx.pool.borrow_mut().put(target, conn, Instant::now());
            }
            Ok(_) => {}
            Err(()) => return Next::Close,
        }
        if close_client {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }

    /// After a failed write of the request to the upstream: an upstream that answered before
    /// taking the whole request (a 413 or 401 to an upload, then stopped reading or closed) has
    /// that answer relayed, and the client connection closes since the rest of its body was
    /// not read. Otherwise the failure is counted and the client gets 504 when the upstream
    /// left the request unacknowledged past `upstream_send_ms`, 502 otherwise.
    async fn upstream_write_failed(
        &mut self,
        ctx: &WorkerCtx,
        conn: &mut UpstreamConn,
        head: &RequestHead,
        is_head: bool,
        e: &std::io::Error,
    ) -> Next {
        // Whatever the upstream sent is already in the socket's receive queue, readable even
        // after a reset or a timeout; the bound only matters for a socket that is still open.
        let deadline = Instant::now() + EARLY_ANSWER_WAIT;
        if let Ok(resp) = self.read_response_head(conn, head, is_head, deadline).await {
            if resp.status != 101 {
                self.last_status = resp.status;
                let _ = self.relay_response(conn, &resp, head, true).await;
                return Next::Close;
            }
        }
        if is_send_timeout(e) {
            ctx.metrics.upstream_error(UpstreamError::SendTimeout);
            self.fail(Status::GatewayTimeout).await
        } else {
            ctx.metrics.upstream_error(UpstreamError::Broken);
            self.fail(Status::BadGateway).await
        }
    }

    /// Streams the rest of the request body from the client to the upstream, through the
    /// client's read buffer.
    async fn relay_request_body(
        &mut self,
        conn: &mut UpstreamConn,
        kind: BodyKind,
        left: &mut u64,
        mut decoder: Option<&mut ChunkedDecoder>,
    ) -> Result<(), BodyRelayError> {
        while *left > 0 {
            if self.pos == self.buf.len() {
                self.buf.clear();
                self.pos = 0;
                if self.buf.capacity() < BODY_BUF {
                    self.buf.reserve(BODY_BUF);
                }
            }
            if self.pos == self.buf.len() {
                let deadline = Instant::now() + self.timeouts.client_body;
                match read_more(
                    &mut self.stream,
                    &mut self.buf,
                    &mut self.pos,
                    BODY_BUF,
                    deadline,
                )
                .await
                {
                    Ok(0) | Err(ReadError::Io | ReadError::Stalled) => {
                        return Err(BodyRelayError::Client(None))
                    }
                    Ok(_) => {}
                    Err(ReadError::Timeout) => {
                        return Err(BodyRelayError::Client(Some(Status::RequestTimeout)))
                    }
                }
            }
            let avail = &self.buf[self.pos..];
            let take = match (kind, decoder.as_deref_mut()) {
                (BodyKind::Chunked, Some(d)) => {
                    let k = d
                        .advance(avail)
                        .map_err(|_| BodyRelayError::Client(Some(Status::BadRequest)))?;
                    if d.data_len() > self.limits.max_body_bytes {
                        return Err(BodyRelayError::Client(Some(Status::PayloadTooLarge)));
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
            let start = self.pos;
            let buf = std::mem::take(&mut self.buf);
            let (res, slice) = conn.stream.write_all(buf.slice(start..start + take)).await;
            self.buf = slice.into_inner();
            self.pos = start + take;
            res.map_err(BodyRelayError::Upstream)?;
        }
        Ok(())
    }

    /// Reads the response head into `conn.buf`, relaying 1xx interim responses (other than
    /// 101) to the client on the way.
    /// `is_head`: the request's method is HEAD, worked out before any body relay reused the
    /// client buffer the request head's spans point into.
    async fn read_response_head(
        &mut self,
        conn: &mut UpstreamConn,
        head: &RequestHead,
        is_head: bool,
        deadline: Instant,
    ) -> Result<ResponseHead, UpstreamFailure> {
        let mut received = false;
        conn.buf.clear();
        loop {
            if !conn.buf.is_empty() {
                match parse_response(&conn.buf, is_head, UPSTREAM_BUF, &mut self.resp_plan) {
                    Ok(Some(resp)) if (100..200).contains(&resp.status) && resp.status != 101 => {
                        if !head.http10 {
                            let interim = std::mem::take(&mut conn.buf);
                            let end = resp.head_end;
                            let (res, slice) = self.stream.write_all(interim.slice(..end)).await;
                            conn.buf = slice.into_inner();
                            if res.is_err() {
                                return Err(UpstreamFailure::Broken);
                            }
                        }
                        conn.buf.drain(..resp.head_end);
                        continue;
                    }
                    Ok(Some(resp)) => return Ok(resp),
                    Ok(None) => {}
                    Err(_) => return Err(UpstreamFailure::Malformed),
                }
            }
            let mut pos = 0;
            match read_more(
                &mut conn.stream,
                &mut conn.buf,
                &mut pos,
                UPSTREAM_BUF,
                deadline,
            )
            .await
            {
                Ok(0) | Err(ReadError::Io) if !received => {
                    return Err(UpstreamFailure::NothingReceived)
                }
                Ok(0) | Err(ReadError::Io) => return Err(UpstreamFailure::Broken),
                Err(ReadError::Timeout) => return Err(UpstreamFailure::Timeout),
                Err(ReadError::Stalled) => return Err(UpstreamFailure::Stalled),
                Ok(_) => received = true,
            }
        }
    }

    /// Sends the response head (minus hop-by-hop fields) and body to the client. `Ok(true)`:
    /// the body ended exactly where the framing said and the upstream connection is clean.
    async fn relay_response(
        &mut self,
        conn: &mut UpstreamConn,
        resp: &ResponseHead,
        head: &RequestHead,
        close_client: bool,
    ) -> Result<bool, ()> {
        // Fields the gateway adds: connection management towards this client only, and the
        // CORS fields of a cors policy (which replace any the upstream sent).
        self.scratch.clear();
        if !self.policy.response_extra.is_empty() {
            self.scratch.extend_from_slice(&self.policy.response_extra);
            policy::drop_cors_fields(
                &conn.buf,
                resp.fields_start,
                resp.fields_end,
                &mut self.resp_plan.drop,
            );
        }
        if close_client {
            self.scratch.extend_from_slice(b"Connection: close\r\n");
        } else if head.http10 {
            self.scratch
                .extend_from_slice(b"Connection: keep-alive\r\n");
        }
        self.scratch.extend_from_slice(b"\r\n");
        let tail = Span {
            start: 0,
            end: self.scratch.len(),
        };

        let avail = &conn.buf[resp.head_end..];
        let mut decoder = None;
        let (first, mut left) = match resp.body {
            BodyKind::None => (0, 0u64),
            BodyKind::Length(n) => {
                let k = usize::try_from(n).map_or(avail.len(), |n| n.min(avail.len()));
                (k, n - k as u64)
            }
            BodyKind::Chunked => {
                let mut d = ChunkedDecoder::new(UPSTREAM_BUF);
                let Ok(k) = d.advance(avail) else {
                    // Nothing sent yet: the client can still be told.
                    self.fail(Status::BadGateway).await;
                    return Err(());
                };
                let left = u64::from(!d.is_done());
                decoder = Some(d);
                (k, left)
            }
            BodyKind::UntilClose => (avail.len(), 1),
        };
        let mut clean = resp.head_end + first == conn.buf.len();
        let pieces = response_pieces(resp, &self.resp_plan, tail, first);
        write_gathered(
            &mut self.stream,
            &mut conn.buf,
            &mut self.scratch,
            &mut self.iov,
            pieces,
        )
        .await
        .map_err(|_| ())?;

        while left > 0 {
            conn.buf.clear();
            let mut pos = 0;
            let deadline = Instant::now() + self.timeouts.upstream_body;
            let n = match read_more(
                &mut conn.stream,
                &mut conn.buf,
                &mut pos,
                UPSTREAM_BUF,
                deadline,
            )
            .await
            {
                Ok(0) if resp.body == BodyKind::UntilClose => return Ok(false),
                Ok(n) => n,
                // Truncated or stalled body: the client cannot tell unless the connection
                // closes (RFC 9112 §8).
                Err(_) => return Err(()),
            };
            if n == 0 {
                return Err(());
            }
            let take = match resp.body {
                BodyKind::Chunked => {
                    let d = decoder.as_mut().ok_or(())?;
                    let k = d.advance(&conn.buf).map_err(|_| ())?;
                    if d.is_done() {
                        left = 0;
                    }
                    k
                }
                BodyKind::UntilClose => n,
                _ => {
                    let k = usize::try_from(left).map_or(n, |l| l.min(n));
                    left -= k as u64;
                    k
                }
            };
            clean = take == conn.buf.len();
            let buf = std::mem::take(&mut conn.buf);
            let (res, slice) = self.stream.write_all(buf.slice(..take)).await;
            conn.buf = slice.into_inner();
            res.map_err(|_| ())?;
        }
        Ok(clean)
    }

    /// After a 101: relays the head, then bytes both ways until both sides are done or the
    /// tunnel has been silent for `upstream_body`.
    async fn tunnel(mut self, mut conn: UpstreamConn, resp: ResponseHead) {
        // Bytes the client sent after the upgrade request belong to the new protocol.
        if self.pos < self.buf.len() {
            let start = self.pos;
            let buf = std::mem::take(&mut self.buf);
            let (res, slice) = conn.stream.write_all(buf.slice(start..)).await;
            self.buf = slice.into_inner();
            if res.is_err() {
                return;
            }
            self.pos = self.buf.len();
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(b"\r\n");
        let tail = Span { start: 0, end: 2 };
        let rest = conn.buf.len() - resp.head_end;
        let pieces = response_pieces(&resp, &self.resp_plan, tail, rest);
        let sent = write_gathered(
            &mut self.stream,
            &mut conn.buf,
            &mut self.scratch,
            &mut self.iov,
            pieces,
        )
        .await;
        if sent.is_err() {
            return;
        }

        let idle = self.timeouts.upstream_body;
        let client_fd = self.stream.as_raw_fd();
        let upstream_fd = conn.stream.as_raw_fd();
        let (cr, cw) = self.stream.into_split();
        let (ur, uw) = conn.stream.into_split();
        let activity = Cell::new(Instant::now());
        let open = Cell::new(2u8);
        let up = copy_half(cr, uw, self.buf, &activity, &open);
        let down = copy_half(ur, cw, conn.buf, &activity, &open);
        let watchdog = async {
            loop {
                if open.get() == 0 {
                    return;
                }
                let quiet_until = activity.get() + idle;
                if Instant::now() >= quiet_until {
                    // Wake both pending reads with EOF; no read is cancelled mid-flight.
                    // SAFETY: both fds belong to streams owned by the copy futures joined
                    // below, which are still alive, so neither fd can have been reused.
                    unsafe {
                        libc::shutdown(client_fd, libc::SHUT_RDWR);
                        libc::shutdown(upstream_fd, libc::SHUT_RDWR);
                    }
                    return;
                }
                monoio::time::sleep_until(
                    quiet_until
                        .min(Instant::now() + Duration::from_millis(500))
                        .into(),
                )
                .await;
            }
        };
        monoio::join!(up, down, watchdog);
    }

    /// Closes a connection whose request body was not read to the end without destroying the
    /// answer already written: a close with unread input makes the kernel send a reset, which
    /// can reach the client before it has read the answer (RFC 9112 §9.6). Stops sending
    /// (FIN), then reads and discards what the client still sends until it closes, for at most
    /// `LINGER_TIME` and `LINGER_BYTES`.
    async fn linger_close(&mut self) {
        let _ = self.stream.shutdown().await;
        let deadline = Instant::now() + LINGER_TIME;
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
            )
            .await
            {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    }

    /// Answers with `status` (if the client can still take it) and closes.
    async fn fail(&mut self, status: Status) -> Next {
        self.last_status = status.code();
        self.send_static(status.response(true)).await;
        Next::Close
    }
}

/// Copies one direction of a tunnel until EOF or error, then half-closes the other side.
async fn copy_half<R: AsyncReadRent, W: AsyncWriteRent>(
    mut from: R,
    mut to: W,
    mut buf: Vec<u8>,
    activity: &Cell<Instant>,
    open: &Cell<u8>,
) {
    if buf.capacity() < 16 * 1024 {
        buf.reserve(16 * 1024);
    }
    loop {
        buf.clear();
        let (res, b) = from.read(buf).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        activity.set(Instant::now());
        let (res, b) = to.write_all(buf).await;
        buf = b;
        if res.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
    open.set(open.get() - 1);
}

/// Reads more bytes into `buf` (after compacting consumed ones), up to `max` buffered,
/// failing at `deadline`. `Ok(0)`: end of stream.
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    pos: &mut usize,
    max: usize,
    deadline: Instant,
) -> Result<usize, ReadError> {
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
    let owned = std::mem::take(buf);
    let read = stream.read(owned.slice_mut(len..));
    match monoio::time::timeout_at(deadline.into(), read).await {
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
        Err(_) => Err(ReadError::Timeout),
    }
}

/// The status code of a direct response (its bytes start with `HTTP/1.1 NNN`).
fn direct_status(bytes: &[u8]) -> u16 {
    bytes
        .get(9..12)
        .and_then(|d| std::str::from_utf8(d).ok())
        .and_then(|d| d.parse().ok())
        .unwrap_or(200)
}
