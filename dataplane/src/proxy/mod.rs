//! One client connection, request after request, in the order a request goes through the
//! gateway:
//!
//! 1. `downstream`: read the head (or park the idle connection); answers the gateway makes
//!    itself; the lingering close. Written against the client-stream seam (`stream`).
//! 2. route and policies (here, [`handle`]): the snapshot's router, then the listener's,
//!    global and route policies, which write their edits and the consumer into the request
//!    context (`context`).
//! 3. action: a direct response, or [`proxy`]: `connector` checks a session out (pooled or
//!    new; the one retry lives there), `exchange` sends the head and body and reads the
//!    response head, `relay` streams the response body, `tunnel` takes over after a 101.
//! 4. finish: [`context::RequestCtx::finish`] records the metrics and writes the access log
//!    line, once per request.
//!
//! Hot path. Per request: one snapshot load, a parse over the read buffer, a route lookup, one
//! vectored write of the head (and whatever body bytes came with it) from the read buffer, and
//! the same for the response. Bodies move between sockets in the connections' own buffers.
//! After warm-up nothing here allocates; the per-request state lives in the connection's
//! reused [`context::RequestCtx`].
//!
//! Error policy: every failure is one [`crate::error::ErrorKind`], which decides the status (a
//! 4xx for the client's fault, 502 / 504 for the upstream's) and the metric; the client
//! connection is closed whenever framing could be in doubt.

mod connector;
mod context;
mod downstream;
mod exchange;
mod fanout;
mod h2forward;
mod http2;
mod relay;
mod select;
mod stream;
mod transcode;
mod tunnel;

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Instant;

use common::{Route, RouteAction, Snapshot};
use monoio::net::TcpStream;

use crate::codec::chunked::ChunkedDecoder;
use crate::codec::request::RequestHead;
use crate::codec::response::ResponseHead;
use crate::codec::{BodyKind, FieldPlan};
use crate::error::{ErrorKind, ProxyError, Side};
use crate::forward::{self, request_pieces};
use crate::peer::Peer;
use crate::policy::{self, Clock, Verdict};
use crate::status::Status;
use crate::upstream::{set_send_timeout, UpstreamConn};
use crate::worker_ctx::WorkerCtx;
use connector::{Connector, Outcome, Session};
use context::RequestCtx;
use downstream::{push_field, Downstream, Head, Next, Reply};
use exchange::{read_head, relay_request_body, send_head, HeadRead};
use stream::ClientStream;

pub(crate) use http2::PollIo;

/// Interim (1xx) answers passed on (or, for an aggregate's step, skipped) before a final
/// one; an upstream that sends more is faulty (`502`). To an HTTP/2 client each goes out as
/// informational HEADERS, which h2 queues without a bound (they are not flow-controlled).
const MAX_INTERIM: u32 = 16;

/// How often an open tunnel's watchdog looks whether it went quiet or the drain is over.
pub(crate) const TUNNEL_TICK: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a failed write to an upstream waits for an answer it may have sent early.
const EARLY_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Serves a connection until it closes or parks; `served` counts requests already served on
/// it (0 for a fresh connection).
pub(crate) async fn serve(ctx: Rc<WorkerCtx>, stream: TcpStream, peer: Peer, served: u64) {
    if served == 0 {
        let snap = ctx.config.load();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        // SAFETY: the fd belongs to `stream`, which outlives this borrow.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let _ = socket2::SockRef::from(&borrowed).set_nodelay(true);
        let _ = set_send_timeout(fd, snap.timeouts.client_send);
        let tls = snap
            .listener_protocols
            .get(usize::from(peer.listener))
            .and_then(|l| l.tls.as_ref());
        if let Some(tls) = tls {
            let tls = tls.clone();
            let deadline = Instant::now() + snap.timeouts.tls_handshake;
            drop(snap);
            // Boxed, like prior-knowledge HTTP/2 below: the handshake's and HTTP/2's states
            // would otherwise make every cleartext connection's task as large as theirs (one
            // allocation per such connection instead).
            Box::pin(serve_tls(ctx, stream, tls, deadline, peer)).await;
            return;
        }
    }
    if let Some((stream, read)) = serve_stream(ctx.clone(), stream, peer, served).await {
        Box::pin(http2::serve(ctx, stream, &read, peer)).await;
    }
}

/// Serves a connection on a TLS listener: the handshake, then HTTP/2 or HTTP/1.1 as ALPN chose.
async fn serve_tls(
    ctx: Rc<WorkerCtx>,
    stream: TcpStream,
    tls: common::tls::ListenerTls,
    deadline: Instant,
    peer: Peer,
) {
    match crate::tls::accept(stream, &tls, deadline).await {
        Ok(tls) => {
            ctx.metrics.tls_handshake(None);
            if tls.is_h2() {
                http2::serve(ctx, tls, &[], peer).await;
            } else {
                serve_stream(ctx, tls, peer, 0).await;
            }
        }
        Err((why, tcp)) => {
            // Counted before the close, so the count is there once the client sees it.
            ctx.metrics.tls_handshake(Some(why));
            drop(tcp);
        }
    }
}

/// Serves one HTTP/2 stream, as one request on the HTTP/1.1 path. The request path's future
/// is large and streams are many: it is built in place on the heap, so spawning a stream's
/// task moves a few words instead of kilobytes.
async fn serve_h2_stream(ctx: Rc<WorkerCtx>, stream: http2::H2Stream, peer: Peer) {
    let _ = boxed_in_place(|| serve_stream(ctx, stream, peer, 0)).await;
}

/// The future `make` returns, in a heap allocation made first, so the optimizer builds it
/// there. `Box::pin(make())` built it on the stack and copied all of it (7 KiB for an HTTP/2
/// stream's request path, though only its arguments are set yet): 1.9% of the gateway's CPU
/// under h2load, 0.5% left at this site after (`perf`, `memmove` by caller).
fn boxed_in_place<F: std::future::Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// Serves requests until the connection closes or parks. `Some`: the client opened with the
/// HTTP/2 preface on an `h2c` listener; the stream and the bytes read so far go to HTTP/2.
async fn serve_stream<S: ClientStream>(
    ctx: Rc<WorkerCtx>,
    stream: S,
    peer: Peer,
    served: u64,
) -> Option<(S, Vec<u8>)> {
    let snap = ctx.config.load();
    let mut down = Downstream::new(stream, snap.limits, snap.timeouts, served);
    drop(snap);
    let mut req = RequestCtx::new(peer.ip);
    let mut head = RequestHead::default();
    let cut = CutSlot::new(&ctx);
    loop {
        // The last request's end is the clock reading the idle wait starts from.
        match down.read_head(&ctx, req.ended, &mut head).await {
            Ok(Head::Request) => {}
            Ok(Head::Closed) => return None,
            Ok(Head::Done) => {
                down.stream.close_whole().await;
                return None;
            }
            Ok(Head::Park) => {
                if let Ok(tcp) = down.stream.into_parkable() {
                    if let Some(lot) = ctx.park.borrow_mut().as_mut() {
                        // A socket the kernel will not watch is closed, like an expired one.
                        let _ = lot.park(tcp, peer, Instant::now());
                    }
                }
                return None;
            }
            Err(_)
                if S::PRIOR_KNOWLEDGE
                    && down.served == 0
                    && down.buf.starts_with(http2::PREFACE_HEAD)
                    && ctx
                        .snapshot()
                        .listener_protocols
                        .get(usize::from(peer.listener))
                        .is_some_and(|l| l.h2c) =>
            {
                return Some((down.stream, down.buf));
            }
            Err(kind) => {
                let snap = ctx.snapshot();
                // The request line, if the head got that far (see `parse_request_into`), or
                // the whole first line of a head that timed out before its end.
                let line = (head.method.end > head.method.start)
                    .then(|| (head.method.of(&down.buf), head.target.of(&down.buf)))
                    .or_else(|| {
                        (kind == ErrorKind::ClientTimeout)
                            .then(|| crate::codec::request_line(&down.buf))
                            .flatten()
                    });
                req.begin_unparsed(&ctx, &snap, peer.ip, line, &down.buf);
                let next = down.fail(&mut req, kind).await;
                req.bytes_in = down.buf.len() as u64;
                req.finish(&ctx, &snap);
                if matches!(next, Next::Close) {
                    // The client may be sending a body behind the refused head (a 413 for
                    // its length, a 417): a reset would destroy the answer (RFC 9112 9.6).
                    down.linger = S::WHOLE_CONNECTION && kind != ErrorKind::ClientTimeout;
                    if down.linger {
                        down.linger_close().await;
                    } else {
                        down.stream.close_whole().await;
                    }
                }
                return None;
            }
        };
        // One snapshot per request: a keep-alive client sees a config change on its very next
        // request, and this request finishes on the snapshot it started with.
        let snap = ctx.snapshot();
        down.limits = snap.limits;
        down.timeouts = snap.timeouts;
        down.splice = snap.splice;
        down.served += 1;
        let tls = down.stream.scheme() == stream::Scheme::Https;
        if S::WHOLE_CONNECTION && outdated(&snap, peer.listener, tls, false) {
            // Its listener took TLS up (or dropped it) since: this request is answered, with
            // `Connection: close` (before: the connection went on in cleartext for good).
            head.keep_alive = false;
        }
        // Until its body has been read, closing means a lingering close (RFC 9112 9.6).
        down.linger = S::WHOLE_CONNECTION
            && match head.body {
                BodyKind::None | BodyKind::UntilClose => false,
                BodyKind::Length(n) => ((down.buf.len() - head.head_end) as u64) < n,
                BodyKind::Chunked => true,
            };
        req.begin(&ctx, &snap, &down.buf, &head, peer.ip);
        let answer = handle(&ctx, &snap, &mut down, &mut req, peer, &head);
        let Some(next) = cut.unless_cut(answer).await else {
            // The drain's time is up: the answer is given up (the connection closes, an
            // HTTP/2 stream is reset), and logged.
            req.error = Some(ErrorKind::DrainTimeout);
            req.finish(&ctx, &snap);
            return None;
        };
        match next {
            // A keep-alive answer written as a binary upgrade's drain began: its client may
            // send the next request at once, which the handover grace still answers.
            Next::KeepAlive if !ctx.draining.get() || ctx.handover_until.get().is_some() => {
                req.finish(&ctx, &snap)
            }
            Next::KeepAlive => {
                req.finish(&ctx, &snap);
                down.stream.close_whole().await;
                return None;
            }
            Next::Close => {
                req.finish(&ctx, &snap);
                // Not an HTTP/2 stream's: resetting it is how that ends.
                if down.linger && S::WHOLE_CONNECTION {
                    down.linger_close().await;
                } else {
                    down.stream.close_whole().await;
                }
                return None;
            }
            Next::Cut => {
                req.finish(&ctx, &snap);
                if S::WHOLE_CONNECTION {
                    // Closed with a reset, not a FIN: a FIN would end a body delimited by
                    // the close as if it were whole (RFC 9112 8: a cut message must be
                    // told apart).
                    crate::io::reset_when_closed(down.stream.as_raw_fd());
                }
                return None;
            }
            Next::Upgrade(upgrade) => {
                let (conn, resp, hold) = *upgrade;
                tunnel::tunnel(&ctx, down, &mut req, conn, resp).await;
                drop(hold);
                req.finish(&ctx, &snap);
                return None;
            }
        }
    }
}

/// A connection's (an HTTP/2 stream's) slot in the worker's [`crate::worker_ctx::CutList`],
/// for as long as it serves requests.
struct CutSlot<'a> {
    ctx: &'a WorkerCtx,
    slot: usize,
}

impl<'a> CutSlot<'a> {
    fn new(ctx: &'a WorkerCtx) -> Self {
        let slot = ctx.cut.borrow_mut().insert(None);
        CutSlot { ctx, slot }
    }

    /// `answer`, unless the drain's time is up first ([`WorkerCtx::cut_off`]): then `None`,
    /// and `answer` is dropped wherever it waits.
    fn unless_cut<F: std::future::Future>(&self, answer: F) -> UnlessCut<'_, F> {
        UnlessCut { cut: self, answer }
    }
}

impl Drop for CutSlot<'_> {
    fn drop(&mut self) {
        self.ctx.cut.borrow_mut().remove(self.slot);
    }
}

/// See [`CutSlot::unless_cut`]. A plain future, not an `async fn`: the request path's large
/// future is polled in place rather than moved into another one.
struct UnlessCut<'a, F> {
    cut: &'a CutSlot<'a>,
    answer: F,
}

impl<F: std::future::Future> std::future::Future for UnlessCut<'_, F> {
    type Output = Option<F::Output>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let (ctx, slot) = (self.cut.ctx, self.cut.slot);
        // SAFETY: structural pinning: `answer` is never moved out of `self`.
        let answer = unsafe { self.map_unchecked_mut(|u| &mut u.answer) };
        // Polled first, even once the time is up: by its first wait the request's head has
        // been taken for its log line.
        if let std::task::Poll::Ready(next) = answer.poll(cx) {
            return std::task::Poll::Ready(Some(next));
        }
        if ctx.cut_off.get() {
            return std::task::Poll::Ready(None);
        }
        ctx.cut.borrow_mut().set(slot, cx.waker());
        std::task::Poll::Pending
    }
}

/// Whether a connection accepted on `listener` with TLS (`tls`), or as cleartext HTTP/2
/// (`h2c`), is no longer what the listener serves: TLS turned on or off, `h2c` off, or the
/// listener gone since. Such a connection ends: after its request, or with a GOAWAY, as a
/// reload ends nginx's old workers' keep-alive connections.
pub(crate) fn outdated(snap: &Snapshot, listener: u16, tls: bool, h2c: bool) -> bool {
    match snap.listener_protocols.get(usize::from(listener)) {
        Some(l) => l.tls.is_some() != tls || (h2c && !l.h2c),
        None => true,
    }
}

/// Whether a `Host` value (with or without a port) names `sni` (lower-case, as rustls gives
/// it: without a trailing dot), ignoring case. `a.test.` names the same host as `a.test`
/// (RFC 1034 absolute name), as in routing.
fn same_host(host: &[u8], sni: &str) -> bool {
    let name = match host.iter().rposition(|&b| b == b':') {
        Some(i) if !host.starts_with(b"[") => &host[..i],
        _ => host,
    };
    let name = name.strip_suffix(b".").unwrap_or(name);
    name.eq_ignore_ascii_case(sni.as_bytes())
}

/// Routes the request, runs its policies, and carries out the route's action.
async fn handle<S: ClientStream>(
    ctx: &WorkerCtx,
    snap: &Snapshot,
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    peer: Peer,
    head: &RequestHead,
) -> Next {
    let method = head.method.of(&down.buf);
    let host = head.host.map(|h| h.of(&down.buf));
    if let (Some(sni), Some(host)) = (down.stream.sni(), host) {
        if !same_host(host, sni) {
            req.fail(ErrorKind::Misdirected);
            if req.logging() {
                req.client_ip = policy::client_ip(&snap.policies, &down.buf, head, peer.ip);
            }
            req.capture_head(ctx, &down.buf, head);
            let reply = Reply::Canned(Status::MisdirectedRequest);
            return down.respond(ctx, req, head, reply).await;
        }
    }
    // Behind a trusted proxy that terminates TLS, the client's scheme is the proxy's word.
    req.forwarded_https =
        policy::forwarded_https(&snap.policies, &down.buf, &down.req_plan, peer.ip);
    // `OPTIONS *`, or its absolute form with an empty path (`OPTIONS http://h`, which
    // RFC 9112 3.2.4 has the last proxy send on as `*`), asks about the server as a whole:
    // no route takes it, and no redirect (it names no resource to send the client to).
    let whole_server = method == b"OPTIONS"
        && (head.target.of(&down.buf) == b"*" || (head.absolute && head.origin_target.is_empty()));
    let own = snap.listener_redirects.get(usize::from(peer.listener));
    // The listener answers every request with its redirect, before any route or policy;
    // not one a trusted proxy says came in on the scheme the redirect is for already.
    let own = own
        .and_then(Option::as_deref)
        .filter(|_| !whole_server)
        .filter(|r| r.scheme_only().map(str::as_bytes) != Some(client_scheme(down, req)));
    if let Some(r) = own {
        if req.logging() {
            req.client_ip = policy::client_ip(&snap.policies, &down.buf, head, peer.ip);
        }
        req.capture_head(ctx, &down.buf, head);
        return redirect(ctx, down, req, head, r).await;
    }
    let preflight = match method == b"OPTIONS" {
        true => policy::preflight_method(&down.buf, head),
        false => None,
    };
    let path = head.path(&down.buf);
    // A preflight goes to the route the request it asks about would take, when that route
    // has CORS (its policy answers) and does not answer that request with a 405; otherwise
    // to the first route that takes OPTIONS or has CORS (whose policy refuses the method).
    let real = preflight
        .and_then(|m| {
            snap.router
                .find(host, path, |id| snap.routes[id as usize].accepts(m))
                .filter(|&id| snap.routes[id as usize].serves(m))
        })
        .filter(|&id| snap.routes[id as usize].has_cors);
    // Read as another route's by servers that decode escaped slashes or drop `;`
    // parameters (see `Router::find_as_read`).
    let mut ambiguous = false;
    let found = match whole_server {
        true => None,
        false => real.or_else(|| {
            let found = snap.router.find_as_read(host, path, |id| {
                let r = &snap.routes[id as usize];
                r.accepts(method) || (preflight.is_some() && r.has_cors)
            });
            ambiguous = found.is_some_and(|(_, a)| a);
            found.map(|(id, _)| id)
        }),
    };
    // No route with CORS takes the method asked about: a cors policy the preflight reaches
    // refuses it (the real request would get no CORS fields).
    req.policy.preflight_unrouted = preflight.is_some() && real.is_none();
    let route = found.map(|id| &snap.routes[id as usize]);
    if let (Some(id), Some(route)) = (found, route) {
        req.route = Some(id);
        req.slot = route.metrics_slot;
        if let Some(h) = &route.headers {
            // On every answer the route gives, a policy's refusal included.
            req.response_fields.extend_from_slice(&h.response_lines);
            if !h.response_drop.is_empty() {
                req.response_drop = Some(h.response_drop.clone());
            }
        }
    }
    let p = &snap.policies;
    let screened = match route {
        Some(r) => !r.policies.is_empty(),
        None => !p.global_unrouted.is_empty(),
    } || p
        .listeners
        .get(peer.listener as usize)
        .is_some_and(|l| !l.is_empty());
    if screened || req.logging() {
        // Behind trusted proxies this walks X-Forwarded-For: only when something reads it.
        req.client_ip = policy::client_ip(p, &down.buf, head, peer.ip);
    }
    let verdict = screened.then(|| {
        policy::check(
            snap,
            route,
            peer.listener,
            &down.buf,
            head,
            req.client_ip,
            &mut ctx.limiters.borrow_mut(),
            Clock::now(),
            &mut req.policy,
        )
    });
    // After the policies (they say which query parameter is a credential to leave out).
    req.capture_head(ctx, &down.buf, head);
    if let Some(Verdict::Answer(status)) = verdict {
        if status >= 400 {
            req.fail(ErrorKind::PolicyDenied);
        }
        // The cors policy's fields go out after the head (`write_answer`); a rate limit's
        // refusal carries the limit's fields, not a route's beside them.
        if req.policy.rate_refused {
            policy::drop_lines_named(&mut req.response_fields, &policy::RATE_LIMIT_FIELDS);
        }
        let out = std::mem::take(&mut req.policy.out);
        let reply = Reply::Direct {
            status,
            bytes: &out,
            head_len: req.policy.out_head_len,
        };
        let next = down.respond(ctx, req, head, reply).await;
        req.policy.out = out;
        return next;
    }
    let Some(route) = route else {
        if whole_server {
            // `OPTIONS *` (the only method with this target) asks about the server as a
            // whole (RFC 9110 9.3.7): the gateway is the one to answer, with what it forwards.
            let answer = [
                &b"HTTP/1.1 200 OK\r\nAllow: "[..],
                ALL_METHODS,
                b"\r\nContent-Length: 0\r\n",
            ]
            .concat();
            let reply = Reply::Direct {
                status: 200,
                bytes: &answer,
                head_len: answer.len(),
            };
            return down.respond(ctx, req, head, reply).await;
        }
        // TRACE is refused where no route names it, as nginx does, with what the routes of
        // its path take (RFC 9110 15.5.6).
        if head.method.of(&down.buf) == b"TRACE" {
            let allowed = allowed_at(snap, host, path);
            return not_allowed(ctx, down, req, head, &allowed).await;
        }
        req.fail(ErrorKind::NoRoute);
        return down
            .respond(ctx, req, head, Reply::Canned(Status::NotFound))
            .await;
    };
    if ambiguous {
        // Which route's policies hold would depend on how the upstream reads the path: a
        // bad request, after the screens and CORS (whose fields it carries), counted in no
        // rate limit (before: it took their tokens).
        policy::give_back(&ctx.limiters.borrow(), &mut req.policy);
        // Nor does it carry their fields (`headers_on_success`), which counted it.
        if let Some(at) = req.policy.rate_fields_at.take() {
            req.policy.response_extra.truncate(at);
        }
        req.fail(ErrorKind::BadRequest);
        return down
            .respond(ctx, req, head, Reply::Canned(Status::BadRequest))
            .await;
    }
    if let Some(h) = &route.headers {
        // After the policies, whose check starts the request's edits afresh.
        policy::route_edits(h, &down.buf, head, &mut req.policy);
    }
    let choice = if route.variants.is_empty() {
        select::Choice {
            action: &route.action,
            rewrite: route.rewrite.as_ref(),
            shape: route.shape.as_ref(),
        }
    } else {
        if !route.vary.is_empty() {
            push_field(&mut req.response_fields, b"Vary", &route.vary);
        }
        select::choose(snap, route, &down.buf, head, req.policy.consumer)
    };
    match choice.action {
        RouteAction::Respond {
            status,
            bytes,
            head_len,
        } => {
            let reply = Reply::Direct {
                status: *status,
                bytes,
                head_len: *head_len,
            };
            down.respond(ctx, req, head, reply).await
        }
        RouteAction::Redirect(r) => redirect(ctx, down, req, head, r).await,
        RouteAction::Proxy { upstream } => {
            req.upstream = Some(*upstream as u32);
            if let Some(t) = choice.rewrite {
                let params = select::params(route, head.path(&down.buf));
                let values = select::RequestValues {
                    params: &params,
                    query: None,
                    steps: &[],
                };
                if crate::shape::fill(t, &values, &mut req.rewritten).is_err() {
                    // A parameter with a malformed percent-escape.
                    return down.fail(req, ErrorKind::BadRequest).await;
                }
            }
            if choice.shape.is_some() {
                // Shaping needs the whole body as the upstream made it.
                let fields = (head.fields_start, head.fields_end);
                for name in [&b"accept-encoding"[..], b"range", b"if-range"] {
                    policy::drop_named(&down.buf, fields.0, fields.1, name, &mut req.policy.drops);
                }
                req.policy
                    .extra
                    .extend_from_slice(b"Accept-Encoding: identity\r\n");
            }
            let method = head.method.of(&down.buf);
            if (method == b"OPTIONS" || method == b"TRACE")
                && policy::max_forwards(&down.buf, head, &allowed(route), &mut req.policy)
            {
                // `Max-Forwards: 0`: the gateway is the final recipient.
                let out = std::mem::take(&mut req.policy.out);
                let reply = Reply::Direct {
                    status: 200,
                    bytes: &out,
                    head_len: req.policy.out_head_len,
                };
                let next = down.respond(ctx, req, head, reply).await;
                req.policy.out = out;
                return next;
            }
            let up = connector::UpstreamRef::of(snap, *upstream);
            // The upstream's own timeouts, for this request (the next starts afresh).
            up.upstream.timeouts.apply(&mut down.timeouts);
            // For a balancer hashing it, and `X-Real-IP` behind trusted proxies (without
            // them it is the peer, which `req.client_ip` starts as).
            if up.upstream.hash_on == common::snapshot::HashOn::ClientIp
                || !p.trusted_proxies.is_empty()
            {
                req.client_ip = policy::client_ip(p, &down.buf, head, peer.ip);
            }
            if up.upstream.protocol.is_h2() {
                let watch = down.stream.watch();
                let watched = std::cell::Cell::new(true);
                // Boxed: its state is larger than the HTTP/1.1 path's, and would otherwise
                // make every connection's task that large.
                let forward = boxed_in_place(|| {
                    h2forward::forward(ctx, snap, down, req, head, route, up, peer.ip, &watched)
                });
                return unless_client_left_while(watch, &watched, forward)
                    .await
                    .unwrap_or_else(|| client_left_meanwhile(req));
            }
            let refused = trailer_refused(snap, route);
            proxy(
                ctx,
                down,
                req,
                head,
                route,
                up,
                peer.ip,
                choice.shape,
                refused,
            )
            .await
        }
        RouteAction::Aggregate { aggregate } => {
            fanout::aggregate(ctx, snap, down, req, head, route, *aggregate, peer.ip).await
        }
    }
}

/// `work` (an exchange with an HTTP/2 upstream, whose waits read no HTTP/1.1 connection that
/// could watch the client), unless the client of a whole connection leaves first, looked at
/// every [`crate::io::CLIENT_CHECK`] as an upstream read's wait looks
/// ([`crate::io::ClientWatch`]). `None` then: `work` is dropped wherever it waits, which
/// resets its upstream streams and lets go of what it held (circuit counts, connections).
async fn unless_client_left<F: std::future::Future>(
    watch: Option<crate::io::ClientWatch>,
    work: F,
) -> Option<F::Output> {
    unless_client_left_while(watch, &std::cell::Cell::new(true), work).await
}

/// [`unless_client_left`], the client looked at only while `watched` holds.
async fn unless_client_left_while<F: std::future::Future>(
    watch: Option<crate::io::ClientWatch>,
    watched: &std::cell::Cell<bool>,
    work: F,
) -> Option<F::Output> {
    let Some(watch) = watch else {
        return Some(work.await);
    };
    let mut work = std::pin::pin!(work);
    let mut look = std::pin::pin!(monoio::time::sleep(crate::io::CLIENT_CHECK));
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(out) = work.as_mut().poll(cx) {
            return std::task::Poll::Ready(Some(out));
        }
        if watched.get() && crate::io::poll_gone(watch, look.as_mut(), cx) {
            return std::task::Poll::Ready(None);
        }
        std::task::Poll::Pending
    })
    .await
}

/// The end of a request whose client left while [`unless_client_left`] waited: logged as
/// 499 unless an answer had begun (then with its status), and the connection dropped.
fn client_left_meanwhile(req: &mut RequestCtx) -> Next {
    req.fail(ErrorKind::ClientClosed);
    Next::Cut
}

/// Answers the request with redirect `r` (a route's or its listener's).
async fn redirect<S: ClientStream>(
    ctx: &WorkerCtx,
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    head: &RequestHead,
    r: &common::snapshot::Redirect,
) -> Next {
    let mut out = std::mem::take(&mut req.policy.out);
    let scheme = client_scheme(down, req);
    let drops = &req.policy.query_drops;
    let next = match redirect_answer(r, &down.buf, head, scheme, drops, &mut out) {
        Some(head_len) => {
            let reply = Reply::Direct {
                status: r.status,
                bytes: &out,
                head_len,
            };
            down.respond(ctx, req, head, reply).await
        }
        // No host to send the client to (an HTTP/1.0 request without one).
        None => down.fail(req, ErrorKind::BadRequest).await,
    };
    req.policy.out = out;
    next
}

/// The scheme the client used: a trusted proxy's word for it, or the listener's.
fn client_scheme<S: ClientStream>(down: &Downstream<S>, req: &RequestCtx) -> &'static [u8] {
    match req.forwarded_https {
        Some(true) => b"https",
        Some(false) => b"http",
        None => down.stream.scheme().as_bytes(),
    }
}

/// Writes into `out` (cleared first) the answer to a request `head` for redirect `r`: its
/// status line, `Location` (the request's URL, with the parts `r` sets replaced) and an empty
/// body; returns the head's length. `scheme` is the client's; `drops` are the query pairs
/// the route's policies strip (an API key), which the `Location` does not carry to wherever
/// it points either. `None` when the request names no host and `r` sets none.
fn redirect_answer(
    r: &common::snapshot::Redirect,
    buf: &[u8],
    head: &RequestHead,
    scheme: &[u8],
    drops: &[crate::codec::Span],
    out: &mut Vec<u8>,
) -> Option<usize> {
    // The request's host and port: `name`, `name:port`, `[v6]`, `[v6]:port`.
    let authority = head.host.map_or(&b""[..], |h| h.of(buf));
    let split = match authority.iter().rposition(|&b| b == b':') {
        Some(i) if !authority[i..].contains(&b']') => i,
        _ => authority.len(),
    };
    let (host, port) = (&authority[..split], authority.get(split + 1..));
    let host = match &r.host {
        Some(h) => h.as_bytes(),
        None if host.is_empty() => return None,
        None => host,
    };
    let listener = scheme;
    let scheme = r.scheme.as_deref().map_or(scheme, str::as_bytes);
    // Another scheme or a host has its own port: the default one unless `port` says.
    let kept = (scheme == listener && r.host.is_none())
        .then_some(port)
        .flatten();
    let default = match scheme {
        b"https" => &b"443"[..],
        _ => b"80",
    };
    let path = match &r.path {
        Some(p) => p.as_bytes(),
        None => head.path(buf),
    };
    let target = head.origin_target.of(buf);
    let without_drops;
    let query = match r.strip_query {
        true => &[][..],
        false => {
            let query = target.get(head.path_len..).unwrap_or_default();
            if drops.is_empty() {
                query
            } else {
                let base = head.origin_target.start + head.path_len;
                let mut without = Vec::with_capacity(query.len());
                crate::forward::push_target_without(&mut without, query, |at, _| {
                    crate::policy::span_starts_at(drops, base + at)
                });
                without_drops = without;
                &without_drops
            }
        }
    };
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    crate::access_log::push_u64(out, r.status.into());
    out.push(b' ');
    out.extend_from_slice(common::reason::phrase(r.status).as_bytes());
    out.extend_from_slice(b"\r\nLocation: ");
    for part in [scheme, b"://", host] {
        out.extend_from_slice(part);
    }
    // The port `r` sets, or the request's where kept; written, then taken back when it is
    // none or the scheme's default.
    let mark = out.len();
    out.push(b':');
    match (r.port, kept) {
        (Some(p), _) => crate::access_log::push_u64(out, p.into()),
        (None, Some(p)) => out.extend_from_slice(p),
        (None, None) => {}
    }
    if out.len() == mark + 1 || out[mark + 1..] == *default {
        out.truncate(mark);
    }
    // Bytes a URI may not hold as they are (non-ASCII ones, which a request line is let
    // carry), escaped.
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in path.iter().chain(query) {
        if b >= 0x80 || b"\"<>\\^`{|}".contains(&b) {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        } else {
            out.push(b);
        }
    }
    out.extend_from_slice(b"\r\nContent-Length: 0\r\n");
    Some(out.len())
}

/// Every method the gateway forwards (CONNECT is refused; TRACE only where a route names it).
const ALL_METHODS: &[u8] = b"GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH";

/// The methods `route` takes, for an `Allow` field: its `methods` (with HEAD beside GET), or
/// every method the gateway forwards anywhere.
fn allowed(route: &Route) -> Vec<u8> {
    match &route.methods {
        Some(list) => taken(list).collect::<Vec<_>>().join(&b", "[..]),
        None => ALL_METHODS.to_vec(),
    }
}

/// The methods a route's `methods` list takes, in its order: each, with HEAD after GET
/// where the list does not name HEAD itself.
fn taken(list: &[Box<[u8]>]) -> impl Iterator<Item = &[u8]> {
    let head = !list.iter().any(|m| &m[..] == b"HEAD");
    list.iter().flat_map(move |m| {
        let m = &m[..];
        std::iter::once(m).chain((head && m == b"GET").then_some(&b"HEAD"[..]))
    })
}

/// The methods the routes of `host` and `path` take together, for an `Allow` field; every
/// method the gateway forwards where no route has the path, or one takes any method.
fn allowed_at(snap: &common::Snapshot, host: Option<&[u8]>, path: &[u8]) -> Vec<u8> {
    let (mut any, mut all) = (false, false);
    let mut methods: Vec<&[u8]> = Vec::new();
    snap.router.find(host, path, |id| {
        any = true;
        match &snap.routes[id as usize].methods {
            None => all = true,
            Some(list) => {
                for m in taken(list) {
                    if !methods.contains(&m) {
                        methods.push(m);
                    }
                }
            }
        }
        false
    });
    if all || !any {
        return ALL_METHODS.to_vec();
    }
    methods.join(&b", "[..])
}

/// Refuses a request for its body (malformed, too large, cut off or too slow), counting
/// the body bytes read for it (the access log's `bytes_in` is what came on the wire).
async fn refuse_body<S: ClientStream>(
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    head: &RequestHead,
    kind: ErrorKind,
) -> Next {
    req.bytes_in += down.buf.len().saturating_sub(head.head_end) as u64;
    down.fail(req, kind).await
}

/// Forwards the request to a target of `up` and relays the response (reshaped by `shape`, if
/// any); `peer` is the address the connection came from (appended to `X-Forwarded-For`);
/// `refused`: the fields a chunked body's trailer section must not carry
/// ([`common::policy::Policies::trailer_refused`]).
#[allow(clippy::too_many_arguments)]
async fn proxy<S: ClientStream>(
    ctx: &WorkerCtx,
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    head: &RequestHead,
    route: &Route,
    up: connector::UpstreamRef<'_>,
    peer: std::net::IpAddr,
    shape: Option<&common::aggregate::Shape>,
    refused: &std::sync::Arc<[Box<[u8]>]>,
) -> Next {
    // Body bytes that arrived with the head go out in the same write.
    let buffered = &down.buf[head.head_end..];
    let mut decoder = None;
    let (mut first_body, mut body_left) = match head.body {
        BodyKind::None | BodyKind::UntilClose => (0, 0u64),
        BodyKind::Length(n) => {
            let k = usize::try_from(n).map_or(buffered.len(), |n| n.min(buffered.len()));
            (k, n - k as u64)
        }
        BodyKind::Chunked => {
            let mut d = ChunkedDecoder::request(down.limits.max_header_bytes, refused.clone());
            let k = match d.advance(buffered) {
                Ok(k) => k,
                Err(_) => return refuse_body(down, req, head, ErrorKind::BadRequest).await,
            };
            if d.declared_len() > down.limits.max_body_bytes {
                return refuse_body(down, req, head, ErrorKind::BodyTooLarge).await;
            }
            let left = u64::from(!d.is_done());
            decoder = Some(d);
            (k, left)
        }
    };
    let idempotent = head.is_idempotent(&down.buf);
    // A body the request may be retried with is read whole first (up to `BODY_BUF`, and not
    // one whose client waits for `100 Continue`), so that whether it is retried does not
    // depend on how the client's packets fell; nginx reads every body first, Envoy holds one
    // for retries up to a limit. A chunked one is read until it ends or fills `BODY_BUF`
    // (then it is streamed, as a longer one with a length).
    let hold = body_left > 0
        && !head.expect_continue
        && up
            .upstream
            .retry
            .as_ref()
            .is_some_and(|r| r.may_retry(idempotent));
    match (head.body, decoder.as_mut()) {
        (BodyKind::Length(n), _) if hold && n <= downstream::BODY_BUF as u64 => {
            if let Err(kind) = down.read_body_whole(head.head_end + n as usize).await {
                return refuse_body(down, req, head, kind).await;
            }
            (first_body, body_left) = (n as usize, 0);
        }
        (BodyKind::Chunked, Some(d)) if hold => {
            let cap = head.head_end + downstream::BODY_BUF;
            while !d.is_done() && down.buf.len() < cap {
                if let Err(kind) = down.read_body_some(cap).await {
                    return refuse_body(down, req, head, kind).await;
                }
                let k = match d.advance(&down.buf[head.head_end + first_body..]) {
                    Ok(k) => k,
                    Err(_) => return refuse_body(down, req, head, ErrorKind::BadRequest).await,
                };
                if d.declared_len() > down.limits.max_body_bytes {
                    return refuse_body(down, req, head, ErrorKind::BodyTooLarge).await;
                }
                first_body += k;
            }
            body_left = u64::from(!d.is_done());
        }
        _ => {}
    }
    // All of it in the buffer already: nothing of it is left to linger for.
    down.linger &= body_left > 0;
    let body_end = head.head_end + first_body;
    // The whole request is in the buffer: it can be sent again on a fresh connection.
    let replayable = body_left == 0 && idempotent;
    let key = select::hash_key(&up.upstream.hash_on, &down.buf, head, req.client_ip);
    // Read while the head's spans still point at it: relaying a body reuses the buffer.
    let is_head = head.is_head(&down.buf);
    // So is an upgrade offer that a body follows (a 101 is checked against it after the
    // body went up); upgrades are rare, and only theirs are copied.
    let offer = match (head.upgrade, body_left > 0) {
        (Some(_), true) => Some(down.buf[head.fields_start..head.fields_end].to_vec()),
        _ => None,
    };
    let (line, tail) = forwarded_head(down, req, head, route, peer);

    req.bytes_in += first_body as u64;
    let head_timeout = down.timeouts.upstream_response_head;
    // A client that leaves while the answer is awaited ends the exchange; not one with a
    // pipelined request buffered already (its FIN may be a half-close after sending
    // everything, which a peek, seeing only the FIN, would take for leaving).
    let watch = down.stream.watch().filter(|_| body_end == down.buf.len());
    let connector = Connector::new(ctx, up, &down.timeouts, key, body_left == 0, idempotent)
        .started_at(req.started)
        .watching(watch);
    // Set by an attempt whose request write failed: the upstream may have answered early.
    let mut write_failed = false;
    // Set by an attempt whose answer came before the whole request was sent.
    let mut early = false;
    // Set by an attempt that read for an early answer and got none whole: what it read of
    // one went with the read it gave up, so the connection is not read again.
    let mut looked = false;
    // The body comes from the client as it is relayed: the try's own bound waits for its end.
    let streamed = body_left > 0;
    let reset = down.stream.reset_watch();
    let attempt = async |session: &mut connector::Session, req: &mut RequestCtx| {
        // Each try's own: an earlier one's failed write or early answer says nothing of it.
        (write_failed, early, looked) = (false, false, false);
        let reused = session.reused;
        // Once the start of an early answer is there, the rest of its head is waited for as
        // any answer's is (not within the try's bound while the client is still uploading).
        let try_deadline = session.try_deadline.filter(|_| !streamed);
        let look = move |plan, looked| {
            let head_deadline = Instant::now() + head_timeout;
            EarlyLook {
                reused,
                is_head,
                head_deadline: try_deadline.map_or(head_deadline, |t| t.min(head_deadline)),
                plan,
                looked,
            }
        };
        let conn = &mut session.conn;
        // The exchange's reads wait on the client connection's timer, which keeps expiring
        // later with each request instead of re-entering the timer wheel (see `ReadTimer`);
        // given back at check-in. Not an HTTP/2 stream's: it would be made for one request.
        if S::WHOLE_CONNECTION {
            conn.lend_timer(&mut down.upstream_timer);
        }
        conn.watch(watch, req.started);
        let pieces = request_pieces(head, &down.req_plan, line, tail, body_end);
        let sent = send_head(
            conn,
            &mut down.buf,
            &mut down.scratch,
            &mut down.iov,
            pieces,
        )
        .await;
        if let Err(e) = sent {
            write_failed = true;
            let answer = answered_early(conn, e, look(&mut down.resp_plan, &mut looked));
            let answer = answer.await;
            early = answer.is_ok();
            return answer;
        }
        down.pos = body_end;
        if body_left > 0 {
            if head.expect_continue && down.send_continue(req).await.is_err() {
                return Err(ErrorKind::ClientClosed.into());
            }
            let relayed =
                relay_request_body(down, req, conn, head.body, &mut body_left, decoder.as_mut())
                    .await;
            match relayed {
                Ok(()) => {
                    down.linger = false;
                    // A pipelined request came in behind the body: the client's FIN may be a
                    // half-close after sending everything, not its leaving (the watch was
                    // set when only the head was here).
                    if down.pos < down.buf.len() {
                        conn.watch(None, req.started);
                    }
                }
                Err(e) if e.kind.side() == Side::Client => {
                    // A body refused mid-way (413, 400): the client may still be sending.
                    down.linger = matches!(e.kind, ErrorKind::BadRequest | ErrorKind::BodyTooLarge);
                    return Err(e);
                }
                Err(e) => {
                    // The rest of the request body may still be on its way from the client.
                    down.linger = body_left > 0;
                    write_failed = true;
                    let look = look(&mut down.resp_plan, &mut looked);
                    let answer = answered_early(conn, e, look).await;
                    early = answer.is_ok();
                    return answer;
                }
            }
        }
        let sent_at = Instant::now();
        if streamed {
            session.try_deadline = connector.per_try_from(sent_at);
        }
        let deadline = session.head_deadline(sent_at + head_timeout);
        // After a small answer, the whole next one in one read, as it comes.
        let head_read = session.conn.head_read(down.splice_socket().is_some());
        let conn = &mut session.conn;
        let mut first_byte = None;
        let mut interims = 0;
        // `conn.buf` is empty, or holds the start of the answer that an upload's look for
        // an early answer took from the armed read (see `AnswerLook`).
        loop {
            let read = read_head(
                conn,
                is_head,
                deadline,
                &mut down.resp_plan,
                &mut first_byte,
                replayable,
                head_read,
            );
            match read.await {
                Ok(HeadRead::Interim(interim)) => {
                    interims += 1;
                    if interims > MAX_INTERIM {
                        return Err(ErrorKind::UpstreamMalformed.into());
                    }
                    // Not a `100 Continue`: the gateway sends its own when it wants the
                    // body (a second one, or one to a request without `Expect`, is no use
                    // to the client), as for an HTTP/2 upstream's.
                    if !head.http10 && interim.status != 100 {
                        // Passed on: the request cannot be retried from here on.
                        req.attempts.committed = true;
                        if relay::send_interim(down, req, &mut conn.buf, &interim)
                            .await
                            .is_err()
                        {
                            return Err(ErrorKind::ClientClosed.into());
                        }
                    }
                    conn.buf.drain(..interim.head_end);
                }
                Ok(HeadRead::Final(resp)) => {
                    req.first_byte = first_byte.map(|t| t.duration_since(sent_at));
                    // The final head's whole: not its first byte's, which may have come long
                    // before its end (a head in pieces, an interim first).
                    req.head_after = Some(sent_at.elapsed());
                    return Ok(resp);
                }
                Err(e) => {
                    // Bytes came before the failure (an interim answer, part of a head).
                    if first_byte.is_some() {
                        req.first_byte = first_byte.map(|t| t.duration_since(sent_at));
                    }
                    return Err(e);
                }
            }
        }
    };
    let mut slot = None;
    // An HTTP/2 client's reset ends the exchange wherever it is (its connect, its upload,
    // the answer's wait, a retry's backoff): a client that opens and resets streams by the
    // hundred (rapid reset) would otherwise keep as many upstream connects and requests
    // running (before: only the answer's wait watched the reset).
    // A whole connection's exchange is awaited where it is: moved into the race, its large
    // future would be copied for every request (about 800 instructions).
    let ran = match S::WHOLE_CONNECTION {
        true => connector.run(req, &mut slot, attempt, |r| r.status).await,
        false => {
            let run = connector.run(req, &mut slot, attempt, |r| r.status);
            let ran = http2::until_reset(reset.as_ref(), run).await;
            ran.unwrap_or_else(|| Err(ErrorKind::ClientClosed.into()))
        }
    };
    let resp = match ran {
        Ok(resp) => resp,
        Err(err) if err.kind.reason().is_some() => {
            // The gateway's own 503 (circuit limits, no address): the connection stays.
            req.fail(err.kind);
            // Counted again by `respond` as it skips the buffered body.
            req.bytes_in -= first_body as u64;
            push_field(
                &mut req.response_fields,
                b"X-Gateway-Reason",
                err.kind.reason().unwrap_or_default(),
            );
            return down
                .respond(ctx, req, head, Reply::Canned(Status::ServiceUnavailable))
                .await;
        }
        Err(err) => {
            if err.kind.side() == Side::Client {
                // The client's body failed: its own status (408 has no lingering close).
                return down.fail(req, err.kind).await;
            }
            if let (Some(session), true, false) = (slot.as_mut(), write_failed, looked) {
                // The rest of the request body may still be on its way from the client.
                down.linger |= body_left > 0;
                let conn = &mut session.conn;
                return early_answer(ctx, down, req, conn, head, is_head, shape, err.kind).await;
            }
            return upstream_failed(ctx, down, req, head, err.kind).await;
        }
    };
    let mut session = Session::answered(&mut slot);

    if resp.status == 101 {
        let offered = match &offer {
            Some(fields) => fields,
            None => &down.buf[head.fields_start..head.fields_end],
        };
        let switched = head.upgrade.is_some()
            && crate::codec::switched_as_offered(
                &session.conn.buf[resp.fields_start..resp.fields_end],
                offered,
            );
        if !switched {
            connector.answer_failed(ErrorKind::UpstreamMalformed);
            return upstream_failed(ctx, down, req, head, ErrorKind::UpstreamMalformed).await;
        }
        req.status = 101;
        return Next::Upgrade(Box::new((*session.conn, resp, connector.hold())));
    }
    if !carried::<S>(&resp, head.http10) {
        connector.answer_failed(ErrorKind::UpstreamMalformed);
        return upstream_failed(ctx, down, req, head, ErrorKind::UpstreamMalformed).await;
    }
    // An answer before the whole request: the rest of the request is not read, so neither
    // connection goes on.
    // An HTTP/1.0 client gets a chunked answer without its chunks, delimited by the close.
    let dechunked = head.http10 && resp.body == BodyKind::Chunked;
    let close_client = early
        || !head.keep_alive
        || resp.body == BodyKind::UntilClose
        || dechunked
        || ctx.draining.get();
    let reusable = resp.reusable && !head.forwards_http10() && !early;
    let relayed = match shape {
        Some(shape) => {
            let metrics = &ctx.metrics;
            let conn = &mut session.conn;
            let http10 = head.http10;
            relay::relay_shaped(
                down,
                req,
                conn,
                &resp,
                http10,
                close_client,
                is_head,
                shape,
                metrics,
            )
            .await
        }
        None => {
            relay::relay_response(
                down,
                req,
                &mut session.conn,
                &resp,
                head.http10,
                close_client,
            )
            .await
        }
    };
    match relayed {
        Ok(clean) => {
            let outcome = if clean && reusable {
                Outcome::Reusable
            } else {
                Outcome::Done
            };
            if S::WHOLE_CONNECTION {
                session.conn.lend_timer(&mut down.upstream_timer);
            }
            connector.checkin_at(session, outcome, req.end_now());
        }
        Err(e) => {
            // Not a filter refusing an answer (compressed, too large, not JSON): that is the
            // route's rule, not the target's health.
            if !req.filter_refused {
                connector.answer_failed(e.kind);
            }
            if req.status == 0 {
                return upstream_failed(ctx, down, req, head, e.kind).await;
            }
            req.fail(e.kind);
            return Next::Cut;
        }
    }
    if close_client {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

/// `wait`, unless the client resets its HTTP/2 stream first: the exchange is then given up
/// at once (its upstream connection closes), rather than held open until the upstream
/// answers. A client that opens and resets streams by the hundred (rapid reset) would
/// otherwise keep as many upstream requests running, and its resets would count against
/// it only as those answers came back.
async fn unless_reset<S: ClientStream, F: std::future::Future>(
    stream: &mut S,
    wait: F,
) -> Result<F::Output, ProxyError> {
    let mut wait = std::pin::pin!(wait);
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(out) = wait.as_mut().poll(cx) {
            return std::task::Poll::Ready(Ok(out));
        }
        stream
            .poll_reset(cx)
            .map(|()| Err(ErrorKind::ClientClosed.into()))
    })
    .await
}

/// After a failed write of the request to the upstream: an upstream that answered before
/// taking the whole request (a 413 or 401 to an upload, then stopped reading or closed) has
/// that answer relayed, and the client connection closes since the rest of its body was not
/// read. Otherwise the client gets the write failure's status (504 when the upstream left the
/// request unacknowledged past `upstream_send_ms`, 502 otherwise).
/// Answers a request whose upstream exchange failed before anything of an answer went out:
/// a request without a body has nothing left to read, so its connection goes on (as nginx's
/// after its 502 or 504); with a body, whose bytes may have gone upstream in part, it closes.
async fn upstream_failed<S: ClientStream>(
    ctx: &WorkerCtx,
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    head: &RequestHead,
    kind: ErrorKind,
) -> Next {
    match kind.response() {
        Some(status) if head.body == BodyKind::None && kind.side() != Side::Client => {
            req.fail(kind);
            down.respond(ctx, req, head, Reply::Canned(status)).await
        }
        _ => down.fail(req, kind).await,
    }
}

/// With a `shape`, the answer is reshaped (or refused) as on the usual path: a filter holds
/// for an early answer too.
#[allow(clippy::too_many_arguments)]
async fn early_answer<S: ClientStream>(
    ctx: &WorkerCtx,
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    conn: &mut UpstreamConn,
    head: &RequestHead,
    is_head: bool,
    shape: Option<&common::aggregate::Shape>,
    kind: ErrorKind,
) -> Next {
    let deadline = Instant::now() + EARLY_ANSWER_WAIT;
    match early_head(conn, is_head, &mut down.resp_plan, deadline).await {
        Some(resp) if !carried::<S>(&resp, head.http10) => {
            down.fail(req, ErrorKind::UpstreamMalformed).await
        }
        Some(resp) => {
            let http10 = head.http10;
            let relayed = match shape {
                Some(shape) => {
                    let metrics = &ctx.metrics;
                    relay::relay_shaped(
                        down, req, conn, &resp, http10, true, is_head, shape, metrics,
                    )
                    .await
                }
                None => relay::relay_response(down, req, conn, &resp, http10, true).await,
            };
            match relayed {
                Ok(_) => Next::Close,
                // Nothing of it sent (a filter refused it): the gateway's own answer, as on
                // the usual path.
                Err(e) if req.status == 0 => down.fail(req, e.kind).await,
                Err(e) => {
                    req.fail(e.kind);
                    Next::Cut
                }
            }
        }
        None => down.fail(req, kind).await,
    }
}

/// A try whose request write failed (`err`) ends with the answer the upstream sent before it
/// stopped taking the request (an upload's 413 or 401) when one waits in its socket: the
/// target answered, so it is not charged a failure (passive health) and the answer's status,
/// not the write, decides a retry. Not on a pooled connection whose failure the connector
/// retries on a fresh one: what waits there may predate the request (an idle close's 408).
async fn answered_early(
    conn: &mut UpstreamConn,
    err: ProxyError,
    look: EarlyLook<'_>,
) -> Result<ResponseHead, ProxyError> {
    if err.kind.side() == Side::Client || (look.reused && err.retryable) {
        return Err(err);
    }
    // What a pooled connection's armed read took, if it has ended, is the start of what
    // waits; one still waiting stays armed, to read the rest in order.
    conn.settle();
    // (Through TLS, `settle` decrypted what the target sent so far into the buffer.)
    let peek = conn.stream.tcp().map(|s| s.as_raw_fd());
    if !exchange::final_answer_waiting(&conn.buf, peek) {
        return Err(err);
    }
    *look.looked = true;
    let deadline = look.head_deadline;
    match early_head(conn, look.is_head, look.plan, deadline).await {
        Some(head) => Ok(head),
        // The rest of a head whose start came never did: as any head past its deadline.
        None if Instant::now() >= deadline => Err(ErrorKind::ResponseTimeout.into()),
        None => Err(err),
    }
}

/// What [`answered_early`] needs of the try: whether its connection was pooled, whether
/// the request is a HEAD, the deadline for the rest of a head whose start is there, the
/// answer's field plan, and where to say that it looked (see `looked` in [`proxy`]).
struct EarlyLook<'a> {
    reused: bool,
    is_head: bool,
    head_deadline: Instant,
    plan: &'a mut FieldPlan,
    looked: &'a mut bool,
}

/// The final answer head an upstream sent before taking the whole request (interim heads
/// skipped; not a 101), if it comes by `deadline`: whatever the upstream sent is already in
/// the socket's receive queue, readable even after a reset or a timeout, so the bound only
/// matters for a socket that is still open. A read that times out takes what it read with
/// it: the connection is not read again.
async fn early_head(
    conn: &mut UpstreamConn,
    is_head: bool,
    plan: &mut FieldPlan,
    deadline: Instant,
) -> Option<ResponseHead> {
    // `conn.buf` holds what was read of it already, if anything (see `answered_early`).
    let mut first_byte = None;
    loop {
        match read_head(
            conn,
            is_head,
            deadline,
            plan,
            &mut first_byte,
            false,
            usize::MAX,
        )
        .await
        {
            Ok(HeadRead::Interim(interim)) => {
                conn.buf.drain(..interim.head_end);
            }
            Ok(HeadRead::Final(resp)) if resp.status != 101 => return Some(resp),
            _ => return None,
        }
    }
}

/// The request fields a trailer section may not carry on `route`: the policies', and those
/// its `request_headers` set or remove.
fn trailer_refused<'a>(snap: &'a Snapshot, route: &'a Route) -> &'a std::sync::Arc<[Box<[u8]>]> {
    (route.headers.as_ref())
        .and_then(|h| h.trailer_refused.as_ref())
        .unwrap_or(&snap.policies.trailer_refused)
}

/// Answers `405 Method Not Allowed` with `Allow: allowed` (RFC 9110 15.5.6).
async fn not_allowed<S: ClientStream>(
    ctx: &WorkerCtx,
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    head: &RequestHead,
    allowed: &[u8],
) -> Next {
    req.fail(ErrorKind::MethodNotAllowed);
    const BODY: &[u8] = b"405 method not supported here.\n";
    let answer = [
        &b"HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n\
           Allow: "[..],
        allowed,
        b"\r\nContent-Length: 31\r\n",
        BODY,
    ]
    .concat();
    let reply = Reply::Direct {
        status: 405,
        bytes: &answer,
        head_len: answer.len() - BODY.len(),
    };
    down.respond(ctx, req, head, reply).await
}

/// Whether the client's protocol can carry `resp`'s body as the upstream coded it: neither
/// HTTP/2 nor HTTP/1.0 has transfer codings (RFC 9113 8.2.2, RFC 9112 6.1), so their
/// clients could only take `Transfer-Encoding: gzip` and the like for the content itself
/// (nginx answers such an upstream with 502 too).
fn carried<S: ClientStream>(resp: &ResponseHead, http10: bool) -> bool {
    (S::TRANSFER_CODINGS && !http10) || !resp.transfer_coded
}

/// The forwarded head's changes, in `down.scratch`: the request line (when the path changes)
/// and the fields added at the end (trace context, the policies' edits, `X-Forwarded-*`);
/// the fields dropped go into `down.req_plan`. [`request_pieces`] then gives the whole head.
fn forwarded_head<S: ClientStream>(
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    head: &RequestHead,
    route: &Route,
    peer: std::net::IpAddr,
) -> (Option<crate::codec::Span>, crate::codec::Span) {
    add_trace_fields(down, req, head);
    for &d in &req.policy.drops {
        policy::add_drop(&mut down.req_plan.drop, d);
    }
    forward::request_extras(
        &down.buf,
        head,
        &down.req_plan,
        route.strip_prefix_len,
        (!req.rewritten.is_empty()).then_some(&req.rewritten[..]),
        peer,
        req.client_ip,
        down.stream.scheme().as_bytes(),
        client_scheme(down, req),
        &req.policy.extra,
        req.policy.sets_host,
        &req.policy.query_drops,
        &mut down.scratch,
    )
}

/// Adds the request id and trace context to the forwarded head, in place of the client's
/// (each is set only when `[tracing]` asks for it).
fn add_trace_fields<S>(down: &mut Downstream<S>, req: &mut RequestCtx, head: &RequestHead) {
    let fields = (head.fields_start, head.fields_end);
    let drops = &mut down.req_plan.drop;
    if !req.request_id.is_empty() {
        policy::drop_field(&down.buf, head.request_id, fields, b"x-request-id", drops);
        req.policy
            .extra
            .extend_from_slice(req.request_id.field_line());
    }
    if let Some(line) = req.trace.field_line() {
        policy::drop_field(&down.buf, head.traceparent, fields, b"traceparent", drops);
        req.policy.extra.extend_from_slice(line);
        if !req.trace.continued() {
            // A `tracestate` belongs to the trace it came with, which this one replaces
            // (W3C Trace Context: a new trace deletes it).
            policy::drop_field(&down.buf, head.tracestate, fields, b"tracestate", drops);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same_host;

    #[test]
    fn a_host_names_the_sni_name_whatever_its_case_port_or_trailing_dot() {
        for host in [
            &b"a.test"[..],
            b"A.Test",
            b"a.test:8443",
            b"a.test.",
            b"a.test.:443",
        ] {
            assert!(
                same_host(host, "a.test"),
                "{}",
                String::from_utf8_lossy(host)
            );
        }
        for host in [
            &b"b.test"[..],
            b"a.test..",
            b"a.tes",
            b"a.test.b",
            b"[::1]:443",
        ] {
            assert!(
                !same_host(host, "a.test"),
                "{}",
                String::from_utf8_lossy(host)
            );
        }
    }
}
