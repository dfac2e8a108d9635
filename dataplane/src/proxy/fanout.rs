//! Fan-out aggregation: one client request answered by several upstream requests (steps)
//! whose JSON answers are merged into one object.
//!
//! Steps run concurrently on the worker, each an [`exchange`] on a session from the
//! [`Connector`] (pooled like any proxied request); a step with `after` starts once those
//! steps have answered. Each step is bounded by its `timeout_ms` and by the aggregate's
//! `deadline_ms`, so the answer never waits past the deadline. The first failed required step
//! (in step order) ends the aggregate at once: the steps still running are dropped, which
//! cancels their I/O and closes their connections.
//!
//! Not the plain proxy path: an aggregate parses and writes JSON and allocates per request.

use std::cell::Cell;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use common::aggregate::Aggregate;
use common::{Route, Snapshot};
use serde_json::{json, Value};

use super::connector::{Attempts, Connector, Outcome, Session, UpstreamRef};
use super::context::RequestCtx;
use super::downstream::{client_left, Downstream, Next};
use super::exchange::exchange;
use super::select::{params, query_of, RequestValues, StepAnswer};
use super::stream::ClientStream;
use crate::codec::chunked::ChunkedDecoder;
use crate::codec::request::RequestHead;
use crate::codec::{BodyKind, FieldPlan};
use crate::error::{ErrorKind, ProxyError, StepError};
use crate::json::{self, Node};
use crate::policy::each_field;
use crate::shape::{self, AnswerFields};
use crate::worker_ctx::WorkerCtx;

/// A failed step.
#[derive(Debug)]
struct Failure {
    error: StepError,
    /// The status this failure stands for: the step's own for a 4xx, 504 for timeouts, else
    /// 502.
    status: u16,
    /// What the step's upstream answered, if it did.
    upstream_status: Option<u16>,
    /// A 4xx answer's JSON body and its `Content-Type`, relayed when the step is required.
    body: Option<(Vec<u8>, Vec<u8>)>,
    /// A 4xx answer's fields that go with its status, relayed with it: every
    /// `WWW-Authenticate` (a 401 must carry one; several are several challenges) and
    /// `Retry-After` (a 429's), as field lines.
    relayed: Vec<u8>,
    detail: String,
}

impl Failure {
    fn new(error: StepError, detail: impl Into<String>) -> Failure {
        let status = match error {
            StepError::Timeout | StepError::Deadline => 504,
            _ => 502,
        };
        Failure {
            error,
            status,
            upstream_status: None,
            body: None,
            relayed: Vec::new(),
            detail: detail.into(),
        }
    }
}

/// A step's answer: its body, checked to be JSON with a member at the step's `target`.
/// Merging reads it in place ([`json::Node`]), from where the check left it.
#[derive(Debug)]
struct Answer {
    raw: Vec<u8>,
    checked: json::Checked,
    /// The upstream's status (2xx).
    status: u16,
}

type StepOutcome = Result<Answer, Failure>;

/// What every step's request carries, captured from the client's head before its buffer is
/// reused for the body.
#[derive(Debug)]
struct Input {
    params: Vec<(Box<str>, Vec<u8>)>,
    /// The client's query without the pairs the policies strip (an API key stripped from
    /// the request is not sent to a step through `{query.NAME}` either).
    query: Option<Vec<u8>>,
    /// Forwarding and policy fields, each line with its CRLF.
    fields: Vec<u8>,
    /// Per step: the client field lines `pass_headers` names.
    pass: Vec<Vec<u8>>,
    /// The client's fields that describe its body (`Content-Type`, `Content-Encoding`,
    /// `Content-Language`), as field lines, for the step that takes the body: a gzip body
    /// sent on without its coding would be taken for plain bytes.
    body_fields: Vec<u8>,
    /// Per step: the balancing key, for a step whose upstream hashes.
    keys: Vec<u64>,
    keep_alive: bool,
    http10: bool,
    is_head: bool,
}

impl Input {
    fn capture<S: ClientStream>(
        snap: &Snapshot,
        down: &Downstream<S>,
        req: &RequestCtx,
        head: &RequestHead,
        route: &Route,
        agg: &Aggregate,
        peer: IpAddr,
    ) -> Input {
        let buf = &down.buf[..];
        // Behind trusted proxies: the address they name, as for a proxied route.
        let client_ip = crate::policy::client_ip(&snap.policies, buf, head, peer);
        let mut fields = Vec::with_capacity(256);
        fields.extend_from_slice(b"X-Forwarded-For: ");
        for v in &down.req_plan.xff {
            fields.extend_from_slice(v.of(buf));
            fields.extend_from_slice(b", ");
        }
        crate::forward::write_ip(&mut fields, peer);
        fields.extend_from_slice(b"\r\nX-Real-IP: ");
        crate::forward::write_ip(&mut fields, client_ip);
        fields.extend_from_slice(b"\r\nX-Forwarded-Proto: ");
        fields.extend_from_slice(super::client_scheme(down, req));
        fields.extend_from_slice(b"\r\n");
        if let Some(h) = head.host.filter(|h| !h.is_empty()) {
            fields.extend_from_slice(b"X-Forwarded-Host: ");
            fields.extend_from_slice(h.of(buf));
            fields.extend_from_slice(b"\r\n");
        }
        // The policies' and the route's drops, and the fields the client made hop-by-hop
        // (named in its `Connection`, RFC 9110 7.6.1), which the request's plan drops.
        let dropped = |line: crate::codec::Span| {
            req.policy
                .drops
                .iter()
                .chain(&down.req_plan.drop)
                .any(|d| d.start <= line.start && line.end <= d.end)
        };
        // The consumer header, X-Request-Id and traceparent.
        fields.extend_from_slice(&req.policy.extra);
        // A trace the gateway continues goes on with its `tracestate` (every line of it not
        // dropped, as on a proxied request); one it replaced does not (W3C Trace Context
        // 3.3).
        if req.trace.continued() && head.tracestate.is_some() {
            for (line, name, _) in each_field(buf, head.fields_start, head.fields_end) {
                if name.eq_ignore_ascii_case(b"tracestate") && !dropped(line) {
                    fields.extend_from_slice(line.of(buf));
                }
            }
        }
        fields.extend_from_slice(b"Accept-Encoding: identity\r\n");
        let pass = agg
            .steps
            .iter()
            .map(|s| {
                let mut out = Vec::new();
                if s.pass_headers.is_empty() {
                    return out;
                }
                for (line, name, _) in each_field(buf, head.fields_start, head.fields_end) {
                    let wanted = s
                        .pass_headers
                        .iter()
                        .any(|p| name.eq_ignore_ascii_case(p.as_bytes()));
                    if wanted && !dropped(line) {
                        out.extend_from_slice(line.of(buf));
                    }
                }
                out
            })
            .collect();
        let keys = agg
            .steps
            .iter()
            .map(|s| {
                super::select::hash_key(&snap.upstreams[s.upstream].hash_on, buf, head, client_ip)
            })
            .collect();
        Input {
            keys,
            params: params(route, head.path(buf)),
            query: kept_query(buf, head, &req.policy.query_drops),
            fields,
            pass,
            body_fields: body_fields(buf, head, dropped),
            keep_alive: head.keep_alive,
            http10: head.http10,
            is_head: head.is_head(buf),
        }
    }
}

/// The request's query (after `?`) without the pairs in `drops` (spans in `buf`, sorted).
fn kept_query(buf: &[u8], head: &RequestHead, drops: &[crate::codec::Span]) -> Option<Vec<u8>> {
    let query = query_of(buf, head)?;
    if drops.is_empty() {
        return Some(query.to_vec());
    }
    // The target from its `?`, whose pairs start `base` bytes into the buffer.
    let base = head.origin_target.start + head.path_len;
    let mut out = Vec::with_capacity(query.len() + 1);
    crate::forward::push_target_without(&mut out, &buf[base..base + query.len() + 1], |at, _| {
        crate::policy::span_starts_at(drops, base + at)
    });
    // `?` before the first kept pair; none kept: an empty query.
    out.drain(..out.len().min(1));
    Some(out)
}

/// The field lines of a step's 4xx answer that go with its status (see
/// [`Failure::relayed`]), each with its CRLF.
fn relayed_fields(buf: &[u8], start: usize, end: usize) -> Vec<u8> {
    copy_fields(buf, start, end, &[b"WWW-Authenticate", b"Retry-After"])
}

/// The request's field lines that describe its body, each with its CRLF; not those
/// `dropped` (a route's `request_headers` set or remove them).
fn body_fields(
    buf: &[u8],
    head: &RequestHead,
    dropped: impl Fn(crate::codec::Span) -> bool,
) -> Vec<u8> {
    let names: [&[u8]; 3] = [b"Content-Type", b"Content-Encoding", b"Content-Language"];
    let mut out = Vec::new();
    for (line, name, _) in each_field(buf, head.fields_start, head.fields_end) {
        if names.iter().any(|n| n.eq_ignore_ascii_case(name)) && !dropped(line) {
            out.extend_from_slice(line.of(buf));
        }
    }
    out
}

/// Every line of the fields `names` between `start` and `end` of `buf` (two lines of one
/// field are two values: two challenges, two codings applied in turn), each written with
/// its name as `names` spells it and its CRLF.
fn copy_fields(buf: &[u8], start: usize, end: usize, names: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (_, name, value) in each_field(buf, start, end) {
        let Some(known) = names.iter().find(|n| n.eq_ignore_ascii_case(name)) else {
            continue;
        };
        out.extend_from_slice(known);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Answers the request with the aggregate `snap.aggregates[index]`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn aggregate<S: ClientStream>(
    ctx: &WorkerCtx,
    snap: &Snapshot,
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    head: &RequestHead,
    route: &Route,
    index: usize,
    peer: IpAddr,
) -> Next {
    let agg = &snap.aggregates[index];
    req.aggregate = Some(index as u32);
    // An aggregate reads (its steps send their own methods), unless a step carries the
    // client's body: a route that names no `methods` takes GET and HEAD, not a DELETE
    // answered with its steps' GETs, which a client would take for done.
    let method = head.method.of(&down.buf);
    let read = method == b"GET" || method == b"HEAD";
    if route.methods.is_none() && !agg.steps.iter().any(|s| s.body) && !read {
        return super::not_allowed(ctx, down, req, head, b"GET, HEAD").await;
    }
    super::add_trace_fields(down, req, head);
    let input = Input::capture(snap, down, req, head, route, agg, peer);
    let body = match read_body(down, req, head).await {
        Ok(b) => b,
        Err(kind) => {
            down.linger = kind != ErrorKind::ClientTimeout;
            return down.fail(req, kind).await;
        }
    };
    let started = Instant::now();
    let deadline = started + agg.deadline;
    // Not a client with a pipelined request buffered already: its FIN may be a half-close
    // after sending everything, which a peek, seeing only the FIN, would take for leaving.
    let watch = down.stream.watch().filter(|_| down.pos == down.buf.len());
    let client = &mut down.stream;
    let retries = Cell::new(0);
    let (results, gone) = run_steps(
        ctx, snap, agg, &input, &body, deadline, client, watch, &retries,
    )
    .await;
    // The steps' retries together (each step's exchange counts its own): the access log's.
    req.attempts.retries = retries.get();
    let done = outcomes(req, &results);
    if gone || client_left(down, req) {
        // Gone while the steps ran (nginx's 499): nothing to send, nothing to log as sent.
        record(ctx, agg, done, &[]);
        req.fail(ErrorKind::ClientClosed);
        req.status = ErrorKind::ClientClosed.status();
        return Next::Cut;
    }
    let mut late = Vec::new();
    let (status, head_fields, mut out) = answer(agg, results, req, &mut late);
    record(ctx, agg, done, &late);
    let mut resp = Vec::with_capacity(160 + head_fields.len());
    resp.extend_from_slice(b"HTTP/1.1 ");
    crate::access_log::push_u64(&mut resp, u64::from(status));
    resp.push(b' ');
    resp.extend_from_slice(common::reason::phrase(status).as_bytes());
    resp.extend_from_slice(b"\r\n");
    resp.extend_from_slice(&head_fields);
    resp.extend_from_slice(b"Content-Length: ");
    crate::access_log::push_u64(&mut resp, out.len() as u64);
    resp.extend_from_slice(b"\r\n");
    if input.is_head {
        out.clear();
    }
    down.send_made(
        ctx,
        req,
        status,
        &resp,
        &mut out,
        input.keep_alive,
        input.http10,
    )
    .await
}

/// Reads the whole request body (within `max_body_bytes`; the head parser already refused
/// larger lengths), leaving `down.pos` after it. Also what requests of HTTP/1.1 clients to
/// HTTP/2 upstreams are read with.
pub(super) async fn read_body<S: ClientStream>(
    down: &mut Downstream<S>,
    req: &mut RequestCtx,
    head: &RequestHead,
) -> Result<Vec<u8>, ErrorKind> {
    let mut out = Vec::new();
    let limit = down.limits.max_body_bytes;
    let mut decoder = match head.body {
        BodyKind::None | BodyKind::UntilClose => {
            down.pos = head.head_end;
            return Ok(out);
        }
        BodyKind::Length(_) => None,
        BodyKind::Chunked => Some(ChunkedDecoder::new(down.limits.max_header_bytes)),
    };
    let mut left = match head.body {
        BodyKind::Length(n) => n,
        _ => 1,
    };
    down.pos = head.head_end;
    let mut asked = false;
    let mut raw = Vec::new();
    loop {
        let avail = &down.buf[down.pos..];
        let take = match decoder.as_mut() {
            Some(d) => {
                let k = d.advance(avail).map_err(|_| ErrorKind::BadRequest)?;
                // The framing is kept until the end: bound it too (chunk extensions can make
                // it far larger than the data): at most the body limit again, plus 64 KiB.
                let framed = limit.saturating_mul(2).saturating_add(65536);
                if d.data_len() > limit || (raw.len() + k) as u64 > framed {
                    return Err(ErrorKind::BodyTooLarge);
                }
                raw.extend_from_slice(&avail[..k]);
                if d.is_done() {
                    left = 0;
                }
                k
            }
            None => {
                let k = usize::try_from(left).map_or(avail.len(), |l| l.min(avail.len()));
                out.extend_from_slice(&avail[..k]);
                left -= k as u64;
                k
            }
        };
        down.pos += take;
        req.bytes_in += take as u64;
        if left == 0 {
            break;
        }
        if head.expect_continue && !asked {
            asked = true;
            down.send_continue(req)
                .await
                .map_err(|_| ErrorKind::ClientClosed)?;
        }
        down.read_body_bytes().await?;
    }
    if decoder.is_some() {
        crate::codec::chunked::decode_validated(&raw, &mut out);
    }
    down.linger = false;
    Ok(out)
}

type StepFuture<'a> = Pin<Box<dyn Future<Output = StepOutcome> + 'a>>;

/// Runs the steps, each when the steps it waits for have answered; stops at the first
/// failed required step. A step never started (or not finished) has no result. While steps
/// run, the client is watched: its whole connection (`watch`) looked at every
/// [`crate::io::CLIENT_CHECK`], an HTTP/2 stream's RST_STREAM as it comes. A client that has
/// left stops them all (true beside the results), their upstream requests dropped as an
/// exchange's are, not left to run to their timeouts for nobody. Every step's retries are
/// added to `retries`, a cancelled step's too.
#[allow(clippy::too_many_arguments)]
async fn run_steps<S: ClientStream>(
    ctx: &WorkerCtx,
    snap: &Snapshot,
    agg: &Aggregate,
    input: &Input,
    body: &[u8],
    deadline: Instant,
    client: &mut S,
    watch: Option<crate::io::ClientWatch>,
    retries: &Cell<u8>,
) -> (Vec<Option<(Duration, StepOutcome)>>, bool) {
    // Armed only with a connection to look at.
    let mut look = std::pin::pin!(watch.map(|_| monoio::time::sleep(crate::io::CLIENT_CHECK)));
    let n = agg.steps.len();
    let mut results: Vec<Option<(Duration, StepOutcome)>> = (0..n).map(|_| None).collect();
    let mut started = vec![false; n];
    let mut running: Vec<(usize, Instant, StepFuture<'_>)> = Vec::with_capacity(n);
    let mut path = Vec::new();
    loop {
        // Start every step whose `after` steps have all answered (a failed one fails it).
        let mut progress = true;
        while progress {
            progress = false;
            for j in 0..n {
                let step = &agg.steps[j];
                if started[j] || step.after.iter().any(|&d| results[d].is_none()) {
                    continue;
                }
                started[j] = true;
                progress = true;
                let failed_dep = step
                    .after
                    .iter()
                    .find(|&&d| matches!(results[d], Some((_, Err(_)))));
                if let Some(&d) = failed_dep {
                    let why = format!("step {:?} it waits for failed", agg.steps[d].id);
                    results[j] = Some((
                        Duration::ZERO,
                        Err(Failure::new(StepError::Dependency, why)),
                    ));
                    continue;
                }
                let now = Instant::now();
                if now >= deadline {
                    let f = Failure::new(StepError::Deadline, "the aggregate's deadline passed");
                    results[j] = Some((Duration::ZERO, Err(f)));
                    continue;
                }
                let earlier: Vec<StepAnswer<'_>> = if step.after.is_empty() {
                    Vec::new()
                } else {
                    results
                        .iter()
                        .enumerate()
                        .map(|(k, r)| match r {
                            Some((_, Ok(a))) if step.after.contains(&k) => {
                                Some((&a.raw[..], agg.steps[k].shape.target.as_ref()))
                            }
                            _ => None,
                        })
                        .collect()
                };
                let values = RequestValues {
                    params: &input.params,
                    query: input.query.as_deref(),
                    steps: &earlier,
                };
                path.clear();
                if let Err(e) = shape::fill(&step.path, &values, &mut path) {
                    let mut f =
                        Failure::new(StepError::MissingField, format!("{} (step path)", e.why));
                    // The client's request lacks what the step needs: the client's error.
                    if e.by_client {
                        f.status = 400;
                    }
                    results[j] = Some((Duration::ZERO, Err(f)));
                    continue;
                }
                let request =
                    step_request(agg, j, &path, &snap.upstreams[step.upstream], input, body);
                let (budget, own) = {
                    let left = deadline - now;
                    if step.timeout < left {
                        (step.timeout, true)
                    } else {
                        (left, false)
                    }
                };
                // One move into its box: the step's future is large and a move copies it whole.
                let key = input.keys[j];
                let task = timed_call(ctx, snap, agg, j, key, request, budget, own, retries);
                // Kept in step order, which the polls below keep: of steps that end at once
                // (a deadline), the first in step order is taken first, and decides.
                let at = running.partition_point(|(k, ..)| *k < j);
                running.insert(at, (j, now, Box::pin(task)));
            }
        }
        let required_failed =
            (0..n).any(|j| agg.steps[j].required && matches!(results[j], Some((_, Err(_)))));
        if required_failed || running.is_empty() {
            // Dropping the futures still running cancels their I/O.
            return (results, false);
        }
        let next = std::future::poll_fn(|cx| {
            for i in 0..running.len() {
                if let Poll::Ready(out) = running[i].2.as_mut().poll(cx) {
                    let (j, at, _) = running.remove(i);
                    return Poll::Ready(Some((j, at, out)));
                }
            }
            if client.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            if let (Some(watch), Some(sleep)) = (watch, look.as_mut().as_pin_mut()) {
                if crate::io::poll_gone(watch, sleep, cx) {
                    return Poll::Ready(None);
                }
            }
            Poll::Pending
        })
        .await;
        let Some((j, at, out)) = next else {
            return (results, true);
        };
        results[j] = Some((at.elapsed(), out));
    }
}

/// Step `j`'s exchange, bounded by `budget`: its own timeout (`own`) or what is left of the
/// aggregate's deadline.
#[allow(clippy::too_many_arguments)]
async fn timed_call(
    ctx: &WorkerCtx,
    snap: &Snapshot,
    agg: &Aggregate,
    j: usize,
    key: u64,
    request: Vec<u8>,
    budget: Duration,
    own: bool,
    retries: &Cell<u8>,
) -> StepOutcome {
    let call = call(ctx, snap, agg, j, key, request, retries);
    match monoio::time::timeout(budget, call).await {
        Ok(r) => r,
        Err(_) if own => Err(Failure::new(
            StepError::Timeout,
            format!(
                "no whole answer within its timeout_ms ({} ms)",
                budget.as_millis()
            ),
        )),
        Err(_) => Err(Failure::new(
            StepError::Deadline,
            "no whole answer before the aggregate's deadline",
        )),
    }
}

/// The request line and fields of step `j`, then its body.
fn step_request(
    agg: &Aggregate,
    j: usize,
    path: &[u8],
    upstream: &common::Upstream,
    input: &Input,
    body: &[u8],
) -> Vec<u8> {
    let step = &agg.steps[j];
    let body: &[u8] = if step.body { body } else { b"" };
    let mut r = Vec::with_capacity(256 + input.fields.len() + body.len());
    r.extend_from_slice(step.method.as_bytes());
    r.push(b' ');
    r.extend_from_slice(path);
    r.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    // The upstream's name for itself: its first target as written, or its SRV name.
    let host = match (&upstream.srv, upstream.targets.first()) {
        (Some(srv), _) => &**srv,
        (None, Some(t)) => &*t.address,
        (None, None) => &*upstream.id,
    };
    r.extend_from_slice(host.as_bytes());
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(&input.fields);
    r.extend_from_slice(&input.pass[j]);
    let bodiless = matches!(&*step.method, "GET" | "HEAD" | "DELETE" | "OPTIONS");
    if step.body || !bodiless {
        if step.body {
            r.extend_from_slice(&input.body_fields);
        }
        r.extend_from_slice(b"Content-Length: ");
        crate::access_log::push_u64(&mut r, body.len() as u64);
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body);
    r
}

/// One step's exchange on a pooled or new session, its answer read whole and checked.
#[allow(clippy::too_many_arguments)]
async fn call(
    ctx: &WorkerCtx,
    snap: &Snapshot,
    agg: &Aggregate,
    j: usize,
    key: u64,
    mut request: Vec<u8>,
    retries: &Cell<u8>,
) -> StepOutcome {
    let step = &agg.steps[j];
    let idempotent = crate::codec::request::is_idempotent_method(step.method.as_bytes());
    let up = UpstreamRef::of(snap, step.upstream);
    let mut t = snap.timeouts;
    up.upstream.timeouts.apply(&mut t);
    let connector = Connector::new(ctx, up, &t, key, true, idempotent);
    let is_head = &*step.method == "HEAD";
    let max = agg.max_step_bytes;
    let mut attempts = Tally {
        attempts: Attempts::default(),
        total: retries,
    };
    let mut plan = FieldPlan::default();
    let attempt = async |session: &mut super::connector::Session, _: &mut Tally<'_>| {
        let head_deadline = session.head_deadline(Instant::now() + t.upstream_response_head);
        let conn = &mut session.conn;
        let (resp, mut reader) = exchange(
            conn,
            &mut request,
            is_head,
            head_deadline,
            t.upstream_body,
            &mut plan,
            idempotent,
        )
        .await?;
        let fields = AnswerFields::of(&conn.buf, resp.fields_start, resp.fields_end);
        let (json, encoded) = (fields.is_plain_json(), fields.encoded);
        // What a required 4xx passes on to the client.
        let (ctype, relayed) = match (400..500).contains(&resp.status) {
            true => (
                fields.content_type.map(<[u8]>::to_vec),
                relayed_fields(&conn.buf, resp.fields_start, resp.fields_end),
            ),
            false => (None, Vec::new()),
        };
        let mut raw = match resp.body {
            BodyKind::Length(n) => Vec::with_capacity(usize::try_from(n).unwrap_or(max).min(max)),
            _ => Vec::new(),
        };
        let within = reader.collect(conn, resp.head_end, &mut raw, max).await?;
        let clean = within && reader.clean() && resp.reusable;
        let framing = !within && reader.framing_over(max);
        Ok::<_, ProxyError>((
            resp.status,
            json,
            encoded,
            (within, framing),
            raw,
            clean,
            ctype,
            relayed,
        ))
    };
    let mut slot = None;
    let (status, json, encoded, (within, framing), raw, clean, ctype, relayed) = match connector
        .run(&mut attempts, &mut slot, attempt, |a| a.0)
        .await
    {
        Ok(done) => done,
        Err(e) => {
            let mut f = Failure::new(StepError::Upstream, e.kind.label());
            // A timeout stays a 504; the gateway's own 503s (circuit limits, no
            // address) stay 503s.
            if matches!(e.kind.status(), 503 | 504) {
                f.status = e.kind.status();
            }
            return Err(f);
        }
    };
    let session = Session::answered(&mut slot);
    connector.checkin(
        session,
        if clean {
            Outcome::Reusable
        } else {
            Outcome::Done
        },
    );
    // A 206 is part of a representation, never one to merge as if whole.
    if !(200..300).contains(&status) || status == 206 {
        let mut f = Failure::new(StepError::Status, format!("answered {status}"));
        f.upstream_status = Some(status);
        if (400..500).contains(&status) && !about_the_steps_request(status, step.body) {
            f.status = status;
            f.relayed = relayed;
            if let Some(ct) = ctype.filter(|_| json && !encoded && within) {
                if json::parse(&raw).is_ok() {
                    f.body = Some((raw, ct));
                }
            }
        }
        return Err(f);
    }
    // A 2xx the step cannot use: a failure that names what the upstream answered.
    let failed = |error, detail: &str| {
        let mut f = Failure::new(error, detail);
        f.upstream_status = Some(status);
        Err(f)
    };
    if !within {
        // A chunked answer's framing is bounded too (chunks of a few bytes, long extensions).
        let detail = if framing {
            format!(
                "its chunked answer's framing is larger than twice max_step_bytes ({max}) and \
                 64 KiB"
            )
        } else {
            format!("its answer is larger than max_step_bytes ({max})")
        };
        return failed(StepError::TooLarge, &detail);
    }
    let raw = if raw.is_empty() && (matches!(status, 204 | 205) || is_head) {
        b"{}".to_vec()
    } else if encoded || !json {
        let detail = "its answer is not identity-encoded application/json";
        return failed(StepError::NotJson, detail);
    } else {
        raw
    };
    let checked = match json::check(&raw) {
        Ok(c) => c,
        Err(e) => return failed(StepError::InvalidJson, &e.to_string()),
    };
    if step.shape.target.is_some() {
        let has_target = json::restore(&raw, &checked)
            .is_some_and(|a| json::apply_target(&step.shape, a).is_ok());
        if !has_target {
            let detail = "its answer has no member at `target`";
            return failed(StepError::TargetMissing, detail);
        }
    }
    Ok(Answer {
        raw,
        checked,
        status,
    })
}

/// A step's attempts; its retries are added to the aggregate's when it ends, or is
/// cancelled (a timeout, the deadline, a required step failing, the client leaving).
struct Tally<'a> {
    attempts: Attempts,
    total: &'a Cell<u8>,
}

impl AsMut<Attempts> for Tally<'_> {
    fn as_mut(&mut self) -> &mut Attempts {
        &mut self.attempts
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        let sum = self.total.get().saturating_add(self.attempts.retries);
        self.total.set(sum);
    }
}

/// Whether a step's 4xx is about the request the gateway made for it, not the client's: the
/// gateway's failure, a `502`. Its method (`405`), framing (`411`), size (`413`, unless the
/// step carries the client's body; `414` and `431`: the target and fields the gateway
/// built), `Expect` (`417`), connection or protocol (`408`, `421`, `426`), a proxy's
/// credentials the gateway does not have (`407`, whose challenge is for the gateway), or a
/// condition or range (`412`, `416`), which a step's request never carries.
fn about_the_steps_request(status: u16, carries_client_body: bool) -> bool {
    match status {
        405 | 407 | 408 | 411 | 412 | 414 | 416 | 417 | 421 | 426 | 431 => true,
        413 => !carries_client_body,
        _ => false,
    }
}

/// Per-step metrics and the failed steps for the access log.
/// Each step that ran: its index, how long it took (µs) and how it failed, if it did; the
/// failed ones go into the access log's failed steps.
fn outcomes(
    req: &mut RequestCtx,
    results: &[Option<(Duration, StepOutcome)>],
) -> Vec<(usize, u64, Option<StepError>)> {
    let done: Vec<_> = (results.iter().enumerate())
        .filter_map(|(j, r)| {
            let (took, out) = r.as_ref()?;
            Some((
                j,
                took.as_micros() as u64,
                out.as_ref().err().map(|f| f.error),
            ))
        })
        .collect();
    for &(j, _, failed) in &done {
        if failed.is_some() {
            req.failed_steps.push(j as u16);
        }
    }
    done
}

/// Records each step's duration and failure in the metrics; `late`: steps that failed as
/// their answers were shaped or merged.
fn record(
    ctx: &WorkerCtx,
    agg: &Aggregate,
    mut done: Vec<(usize, u64, Option<StepError>)>,
    late: &[(usize, StepError)],
) {
    for &(j, e) in late {
        if let Some(d) = done.iter_mut().find(|d| d.0 == j) {
            d.2 = Some(e);
        }
    }
    let steps = done
        .iter()
        .map(|&(j, us, failed)| (&*agg.steps[j].id, us, failed));
    ctx.metrics.steps(&agg.id, steps);
}

/// A step that answered but failed as its answer was shaped or merged: recorded in `late`
/// (for the metrics) and the access log's failed steps; the aggregate's answer if the step
/// was required (with the other failed steps: `errors`, the earlier ones, and those after
/// it in `results`), else it goes into `_errors` (`None`).
#[allow(clippy::too_many_arguments)]
fn fail_late(
    agg: &Aggregate,
    j: usize,
    mut f: Failure,
    upstream_status: u16,
    req: &mut RequestCtx,
    errors: &mut Vec<Value>,
    late: &mut Vec<(usize, StepError)>,
    results: &[Option<(Duration, StepOutcome)>],
) -> Option<(u16, Vec<u8>, Vec<u8>)> {
    f.upstream_status = Some(upstream_status);
    req.failed_steps.push(j as u16);
    late.push((j, f.error));
    if agg.steps[j].required {
        let mut others = std::mem::take(errors);
        others.retain(|e| e["error"] != StepError::Dependency.label());
        others.extend(failed_after(agg, results, j + 1));
        return Some(step_failed(agg, j, f, req, others));
    }
    errors.push(error_member(&agg.steps[j].id, &f));
    None
}

/// The status, the head fields (before Content-Length) and the body of the answer; steps
/// that answered but failed as they were shaped or merged are added to `late`.
fn answer(
    agg: &Aggregate,
    mut results: Vec<Option<(Duration, StepOutcome)>>,
    req: &mut RequestCtx,
    late: &mut Vec<(usize, StepError)>,
) -> (u16, Vec<u8>, Vec<u8>) {
    let n = agg.steps.len();
    // A required step that failed: the first in step order decides, unless it failed only
    // because a step it waits for did (that step is the cause).
    let failed = |j: usize| agg.steps[j].required && matches!(results[j], Some((_, Err(_))));
    let waited =
        |j: usize| matches!(&results[j], Some((_, Err(f))) if f.error == StepError::Dependency);
    if let Some(j) = (0..n).filter(|&j| failed(j)).min_by_key(|&j| waited(j)) {
        let Some((_, Err(f))) = results[j].take() else {
            unreachable!("checked above")
        };
        let others = failed_after(agg, &results, 0).collect();
        return step_failed(agg, j, f, req, others);
    }
    let mut merged: json::Members<'_> = Vec::new();
    let mut errors = Vec::new();
    let mut size = 64;
    for j in 0..n {
        let step = &agg.steps[j];
        let a = match &results[j] {
            Some((_, Ok(a))) => a,
            Some((_, Err(f))) => {
                errors.push(error_member(&step.id, f));
                continue;
            }
            None => continue,
        };
        size += a.raw.len();
        // Checked when the step answered: valid JSON, a member at `target`.
        let Some(answer) = json::restore(&a.raw, &a.checked) else {
            continue;
        };
        let shaped = json::apply(&step.shape, answer).map_err(|e| match e {
            json::ShapeError::Unreadable => Failure::new(
                StepError::InvalidJson,
                format!("its answer is {}", json::UNREADABLE),
            ),
            json::ShapeError::TargetMissing => Failure::new(
                StepError::TargetMissing,
                "its answer has no member at `target`",
            ),
        });
        let mut node = match shaped {
            Ok(node) => node,
            Err(f) => match fail_late(agg, j, f, a.status, req, &mut errors, late, &results) {
                Some(refused) => return refused,
                None => continue,
            },
        };
        let Some(members) = node.members() else {
            let f = Failure::new(
                StepError::NotAnObject,
                "its result is not a JSON object; give the step a `group`",
            );
            match fail_late(agg, j, f, a.status, req, &mut errors, late, &results) {
                Some(refused) => return refused,
                None => continue,
            }
        };
        let path = match json::merge(&mut merged, std::mem::take(members), agg.on_conflict) {
            Ok(()) => continue,
            Err(json::MergeError::Conflict(path)) => path,
            Err(json::MergeError::Unreadable) => {
                // A failed step (named in `_errors`); none of its members is merged, and
                // the earlier steps' values are as they were (the merge is all or nothing).
                let f = Failure::new(
                    StepError::InvalidJson,
                    format!("its answer meets another's in {}", json::UNREADABLE),
                );
                match fail_late(agg, j, f, a.status, req, &mut errors, late, &results) {
                    Some(refused) => return refused,
                    None => continue,
                }
            }
        };
        {
            let key = path.join(".");
            let other = (0..j)
                .find(|&k| earlier_sets(agg, k, &results[k], &path))
                .map_or("?", |k| &*agg.steps[k].id);
            req.fail(ErrorKind::StepConflict);
            let detail = format!(
                "steps {other:?} and {:?} both set {key:?} (on_conflict = \"error\")",
                step.id
            );
            let body = json!({
                "type": "about:blank",
                "title": "Bad Gateway",
                "status": 502,
                "detail": detail,
                "steps": [other, &*step.id],
                "key": key,
            });
            return problem(502, &body);
        }
    }
    let complete = errors.is_empty();
    // The gateway's member, listing the failed steps: one an answer had is never passed on
    // (a member could otherwise report failures, or hide them).
    let name = common::aggregate::ERRORS_MEMBER;
    merged.retain(|(k, _)| k != name);
    if !complete {
        merged.push((name.into(), Node::Value(Value::Array(errors))));
    }
    let mut head = Vec::with_capacity(96);
    head.extend_from_slice(b"Content-Type: application/json\r\nX-Gateway-Completed: ");
    head.extend_from_slice(if complete { b"true\r\n" } else { b"false\r\n" });
    let mut out = Vec::with_capacity(size);
    Node::Object(merged).write(&mut out);
    (200, head, out)
}

/// Whether step `k`'s shaped answer has a value at `path` (to name the other step of a
/// conflict; runs only then).
fn earlier_sets(
    agg: &Aggregate,
    k: usize,
    result: &Option<(Duration, StepOutcome)>,
    path: &[String],
) -> bool {
    let Some((_, Ok(a))) = result else {
        return false;
    };
    let Ok(node) = json::parse(&a.raw) else {
        return false;
    };
    let Ok(shaped) = json::apply(&agg.steps[k].shape, node) else {
        return false;
    };
    let path: Vec<Box<str>> = path.iter().map(|p| p.as_str().into()).collect();
    json::lookup(&shaped, &path).is_some()
}

/// The `_errors` members of the steps from `from` on that failed, but for those that
/// failed only because a step they wait for did (they never ran; that step is listed, or is
/// the answer's).
fn failed_after<'a>(
    agg: &'a Aggregate,
    results: &'a [Option<(Duration, StepOutcome)>],
    from: usize,
) -> impl Iterator<Item = Value> + 'a {
    (from..results.len()).filter_map(move |k| match &results[k] {
        Some((_, Err(f))) if f.error != StepError::Dependency => {
            Some(error_member(&agg.steps[k].id, f))
        }
        _ => None,
    })
}

fn error_member(step: &str, f: &Failure) -> Value {
    let mut m = json!({"step": step, "status": f.status, "error": f.error.label()});
    if let Some(s) = f.upstream_status {
        m["upstream_status"] = json!(s);
    }
    m
}

/// The answer when required step `j` failed: its own 4xx (its JSON body, or problem+json),
/// else 502 / 504 with problem+json naming the step; a problem lists `others`, the other
/// steps that failed, in `_errors` (a step this one waited for among them: the cause).
fn step_failed(
    agg: &Aggregate,
    j: usize,
    mut f: Failure,
    req: &mut RequestCtx,
    others: Vec<Value>,
) -> (u16, Vec<u8>, Vec<u8>) {
    req.fail(ErrorKind::StepFailed);
    let step = &agg.steps[j];
    let relayed = std::mem::take(&mut f.relayed);
    let relay = |head: &mut Vec<u8>| head.extend_from_slice(&relayed);
    if let Some((body, ctype)) = f.body.take() {
        let mut head = Vec::with_capacity(128);
        head.extend_from_slice(b"Content-Type: ");
        head.extend_from_slice(&ctype);
        head.extend_from_slice(b"\r\nX-Gateway-Completed: false\r\n");
        relay(&mut head);
        return (f.status, head, body);
    }
    let mut body = json!({
        "type": "about:blank",
        "title": common::reason::phrase(f.status),
        "status": f.status,
        "detail": format!("required step {:?} failed: {}", step.id, f.detail),
        "step": &*step.id,
        "error": f.error.label(),
    });
    if let Some(s) = f.upstream_status {
        body["upstream_status"] = json!(s);
    }
    if !others.is_empty() {
        body[common::aggregate::ERRORS_MEMBER] = Value::Array(others);
    }
    let (status, mut head, out) = problem(f.status, &body);
    relay(&mut head);
    (status, head, out)
}

fn problem(status: u16, body: &Value) -> (u16, Vec<u8>, Vec<u8>) {
    let head = b"Content-Type: application/problem+json\r\nX-Gateway-Completed: false\r\n".to_vec();
    (status, head, serde_json::to_vec(body).unwrap_or_default())
}
