//! The per-request context: everything one request carries from its parsed head to the one
//! [`RequestCtx::finish`] step that records its metrics and writes its access log line (the
//! model is Pingora's `ProxyHttp::CTX` and its `logging()` phase).
//!
//! Hot path. One context lives on each connection and is reset for every request, so its
//! buffers (the policies' edits, the access log's head fields) are reused and nothing
//! allocates once warm.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::slots::NO_ROUTE_SLOT;
use common::Snapshot;

use super::connector::Attempts;
use crate::access_log::{self, json_addr, json_id, json_ms, push_u64, AddrTexts, HeadFields};
use crate::codec::request::RequestHead;
use crate::error::ErrorKind;
use crate::policy::PolicyState;
use crate::trace::{RequestId, TraceParent};
use crate::worker_ctx::WorkerCtx;

/// One request's state.
#[derive(Debug)]
pub(crate) struct RequestCtx {
    /// When the head was complete.
    pub started: Instant,
    /// Index of the matched route in the snapshot.
    pub route: Option<u32>,
    /// The route's metrics slot.
    pub slot: u32,
    /// The client's address as the policies see it (after `trusted_proxies`).
    pub client_ip: IpAddr,
    /// What the policies decided: header edits, the consumer, a refusal.
    pub policy: PolicyState,
    /// Index of the upstream in the snapshot.
    pub upstream: Option<u32>,
    /// The target, connect time and retries of the upstream exchange.
    pub attempts: Attempts,
    /// From the request fully sent upstream to the first byte of the answer.
    pub first_byte: Option<Duration>,
    /// From the request fully sent upstream to the final answer's head (past any interim
    /// `1xx`): `gateway_upstream_response_duration_seconds`, as nginx's
    /// `$upstream_header_time`.
    pub head_after: Option<Duration>,
    /// When the exchange ended, if the clock was read for it already (see `end_now`).
    pub ended: Option<Instant>,
    /// Status sent to the client (0: none yet).
    pub status: u16,
    /// The request is a HEAD: the gateway's own answers to it carry no body (RFC 9110
    /// 9.3.2).
    pub head_only: bool,
    /// Bytes on the wire from and to the client, heads included.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Of `bytes_out`, those passed on through a pipe ([`crate::splice`]).
    pub spliced: u64,
    pub error: Option<ErrorKind>,
    /// The route's response filter refused the upstream's answer (its `upstream_malformed`
    /// is the route's rule, not the target's failure).
    pub filter_refused: bool,
    pub request_id: RequestId,
    pub trace: TraceParent,
    /// Index of the aggregate that answered, if one did.
    pub aggregate: Option<u32>,
    /// Its steps that failed (indices), for the access log.
    pub failed_steps: Vec<u16>,
    /// Field lines the route adds to its answer (`Vary` for variants, its
    /// `response_headers`), each with its CRLF.
    pub response_fields: Vec<u8>,
    /// Lower-case names of the fields a relayed answer loses (the route's
    /// `response_headers`: set or removed).
    pub response_drop: Option<std::sync::Arc<[Box<[u8]>]>>,
    /// The forwarded path of a rewritten route.
    pub rewritten: Vec<u8>,
    /// Whether the client used HTTPS, as a trusted proxy in front says
    /// ([`crate::policy::forwarded_https`]); `None`: the listener's scheme is the client's.
    pub forwarded_https: Option<bool>,
    /// The head's fields of the access log line, written before the buffer they come from
    /// is reused for the body.
    log_head: Vec<u8>,
    /// The target as logged, when parts of its query are left out (API keys).
    log_target: Vec<u8>,
    /// Whether this request is to be logged (the snapshot has an access log).
    logging: bool,
}

impl AsMut<Attempts> for RequestCtx {
    fn as_mut(&mut self) -> &mut Attempts {
        &mut self.attempts
    }
}

// The end of a line fits in the room `finish` reserves for it: five ids (route, upstream,
// consumer, error, aggregate) with their keys, every step of an aggregate failed, and the
// numbers and the target address with theirs.
const _: () =
    assert!(access_log::MAX_TAIL >= 5 * (64 + 32) + common::aggregate::MAX_STEPS * (64 + 3) + 1024);

impl RequestCtx {
    pub fn new(peer: IpAddr) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            route: None,
            slot: NO_ROUTE_SLOT,
            client_ip: peer,
            policy: PolicyState::with_room(),
            upstream: None,
            attempts: Attempts::default(),
            first_byte: None,
            head_after: None,
            head_only: false,
            ended: None,
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            spliced: 0,
            error: None,
            filter_refused: false,
            request_id: RequestId::default(),
            trace: TraceParent::default(),
            aggregate: None,
            failed_steps: Vec::new(),
            response_fields: Vec::new(),
            response_drop: None,
            rewritten: Vec::new(),
            forwarded_https: None,
            log_head: Vec::new(),
            log_target: Vec::new(),
            logging: false,
        }
    }

    fn reset(&mut self, snap: &Snapshot, peer: IpAddr) {
        self.started = Instant::now();
        self.route = None;
        self.slot = NO_ROUTE_SLOT;
        self.client_ip = peer;
        self.policy.reset();
        self.policy.preflight_unrouted = false;
        self.upstream = None;
        self.attempts = Attempts::default();
        self.first_byte = None;
        self.head_after = None;
        self.ended = None;
        self.status = 0;
        self.head_only = false;
        self.bytes_in = 0;
        self.bytes_out = 0;
        self.spliced = 0;
        self.error = None;
        self.filter_refused = false;
        self.request_id.clear();
        self.trace.clear();
        self.aggregate = None;
        self.failed_steps.clear();
        self.response_fields.clear();
        self.response_drop = None;
        self.rewritten.clear();
        self.forwarded_https = None;
        self.log_head.clear();
        self.logging = snap.access_log.is_some();
    }

    /// Starts a request whose head was parsed: its request id and trace context. The client
    /// address is the peer's until `handle` resolves it (only when a policy or the log uses it).
    pub fn begin(
        &mut self,
        worker: &WorkerCtx,
        snap: &Snapshot,
        buf: &[u8],
        head: &RequestHead,
        peer: IpAddr,
    ) {
        self.reset(snap, peer);
        self.head_only = head.is_head(buf);
        let tracing = &snap.tracing;
        if tracing.request_id || tracing.traceparent {
            let mut rng = worker.rng.borrow_mut();
            // A repeated field has no one value to keep.
            let single = |f: Option<crate::codec::FieldRef>| {
                f.filter(|f| !f.repeated).map(|f| f.value.of(buf))
            };
            if tracing.request_id {
                self.request_id.set(single(head.request_id), &mut rng);
            }
            if tracing.traceparent {
                self.trace
                    .set(single(head.traceparent), tracing.sampled, &mut rng);
            }
        }
        self.bytes_in = (head.head_end - head.start + head.decoded) as u64;
    }

    /// Starts a request whose head could not be parsed (it is answered with a 4xx and
    /// logged without request fields).
    /// `line`: the method and target when the request line was read before the head was
    /// refused (the target is logged without its query, which nothing screened for secrets);
    /// then the client's `X-Request-Id` and `traceparent` are read from the raw head in
    /// `buf`, so its answer and log line carry them as a parsed request's do.
    pub fn begin_unparsed(
        &mut self,
        worker: &WorkerCtx,
        snap: &Snapshot,
        peer: IpAddr,
        line: Option<(&[u8], &[u8])>,
        buf: &[u8],
    ) {
        self.reset(snap, peer);
        self.head_only = line.is_some_and(|(method, _)| method == b"HEAD");
        let field = |name: &[u8]| line.and_then(|_| crate::codec::raw_single_field(buf, name));
        let tracing = &snap.tracing;
        if tracing.request_id {
            let id = field(b"x-request-id");
            self.request_id.set(id, &mut worker.rng.borrow_mut());
        }
        if tracing.traceparent {
            let tp = field(b"traceparent");
            self.trace
                .set(tp, tracing.sampled, &mut worker.rng.borrow_mut());
        }
        if self.logging {
            let (method, target) = line.unwrap_or_default();
            let f = HeadFields {
                started: worker.wall_time(self.started),
                request_id: self.request_id.as_bytes(),
                request_id_plain: self.request_id.is_plain(),
                client_ip: peer,
                method,
                host: None,
                target,
                query_cut: true,
                user_agent: None,
                trace_id: self.trace.trace_id(),
            };
            access_log::write_head_fields(
                &mut self.log_head,
                &f,
                &mut worker.log.borrow_mut().client_ips,
            );
        }
    }

    /// Writes the head's fields of the access log line; call after the policies ran (they
    /// decide which query parameter is a credential to leave out) and before the request
    /// buffer is reused for the body.
    pub fn capture_head(&mut self, worker: &WorkerCtx, buf: &[u8], head: &RequestHead) {
        if !self.logging {
            return;
        }
        let mut target = head.target.of(buf);
        // A key an api_key policy could read is never logged, however its name is spelled
        // and however often it comes; also where no policy read it (a refusal before one ran,
        // a 404).
        // Only a target with a query has anything to leave out: the others never look the
        // snapshot up.
        if target.contains(&b'?') {
            let snap = worker.snapshot();
            let keys = &snap.policies.query_keys;
            if !keys.is_empty() {
                self.log_target.clear();
                crate::forward::push_target_without(&mut self.log_target, target, |_, name| {
                    keys.iter().any(|k| crate::policy::query_name_is(name, k))
                });
                target = &self.log_target;
            }
        }
        let f = HeadFields {
            started: worker.wall_time(self.started),
            request_id: self.request_id.as_bytes(),
            request_id_plain: self.request_id.is_plain(),
            client_ip: self.client_ip,
            method: head.method.of(buf),
            host: head.host.map(|h| h.of(buf)),
            target,
            query_cut: false,
            user_agent: head.user_agent.map(|u| u.of(buf)),
            trace_id: self.trace.trace_id(),
        };
        access_log::write_head_fields(
            &mut self.log_head,
            &f,
            &mut worker.log.borrow_mut().client_ips,
        );
    }

    /// Whether this request gets an access log line (its head fields are then captured).
    pub fn logging(&self) -> bool {
        self.logging
    }

    /// Reads the clock once for the end of the exchange: the pool's idle time, the request's
    /// duration and the next request's idle deadline all start from it.
    pub fn end_now(&mut self) -> Instant {
        let now = Instant::now();
        self.ended = Some(now);
        now
    }

    /// Records the outcome: `kind` unless an earlier error is already recorded.
    pub fn fail(&mut self, kind: ErrorKind) {
        self.error.get_or_insert(kind);
    }

    /// Ends the request: records its metrics and writes its access log line. A request that
    /// got no answer and had no error (the client left between requests) leaves no trace.
    pub fn finish(&mut self, worker: &WorkerCtx, snap: &Snapshot) {
        if self.status == 0 {
            match self.error {
                Some(e) => self.status = e.status(),
                None => return,
            }
        }
        let end = self.ended.unwrap_or_else(Instant::now);
        let elapsed = end.saturating_duration_since(self.started);
        let metrics = &worker.metrics;
        metrics.request(self.slot, self.status, elapsed.as_micros() as u64);
        if let Some(e) = self.error {
            metrics.error(e);
        }
        if let Some(head) = self.head_after {
            metrics.upstream_latency.observe(head.as_micros() as u64);
        }
        if self.spliced > 0 {
            metrics.spliced(self.spliced);
        }
        if !self.logging {
            return;
        }
        let Some(settings) = &snap.access_log else {
            return;
        };
        // `sample = 1.0` logs everything without drawing a number.
        let sampled = self.status >= 500
            || settings.sample_below > u64::from(u32::MAX)
            || u64::from(worker.rng.borrow_mut().next_u32()) < settings.sample_below;
        if !sampled {
            return;
        }
        let mut log = worker.log.borrow_mut();
        if !log.reserve(self.log_head.len() + access_log::MAX_TAIL) {
            metrics.access_log_dropped();
            return;
        }
        let (out, targets) = log.buffer();
        out.extend_from_slice(&self.log_head);
        self.write_tail(out, targets, snap, elapsed);
    }

    /// The fields known only at the end, closing the object and the line: at most
    /// [`access_log::MAX_TAIL`] bytes (ids are at most 64 bytes, an aggregate at most
    /// `MAX_STEPS` steps, each at most once; see the assertion above `impl RequestCtx`).
    fn write_tail(
        &self,
        out: &mut Vec<u8>,
        targets: &mut AddrTexts<SocketAddr>,
        snap: &Snapshot,
        elapsed: Duration,
    ) {
        let s = self.status;
        if (100..=999).contains(&s) {
            // Three digits, the usual case, in one copy of a known size.
            let mut status = *b"\"status\":000";
            access_log::fill_padded(&mut status[9..], u64::from(s));
            out.extend_from_slice(&status);
        } else {
            out.extend_from_slice(b"\"status\":");
            push_u64(out, u64::from(s));
        }
        out.extend_from_slice(b",\"route\":");
        let route = self.route.and_then(|r| snap.routes.get(r as usize));
        json_id(out, route.map(|r| &*r.id));
        out.extend_from_slice(b",\"upstream\":");
        let upstream = self.upstream.and_then(|u| snap.upstreams.get(u as usize));
        json_id(out, upstream.map(|u| &*u.id));
        out.extend_from_slice(b",\"target\":");
        match self.attempts.target {
            Some(t) => targets.write(out, t, json_addr),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"bytes_in\":");
        push_u64(out, self.bytes_in);
        out.extend_from_slice(b",\"bytes_out\":");
        push_u64(out, self.bytes_out);
        out.extend_from_slice(b",\"duration_ms\":");
        json_ms(out, elapsed);
        out.extend_from_slice(b",\"upstream_connect_ms\":");
        match self.attempts.connect {
            Some(d) => json_ms(out, d),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"upstream_first_byte_ms\":");
        match self.first_byte {
            Some(d) => json_ms(out, d),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"consumer\":");
        let consumer = self
            .policy
            .consumer
            .and_then(|c| snap.policies.consumers.get(c as usize));
        json_id(out, consumer.map(|c| &*c.id));
        out.extend_from_slice(b",\"retries\":");
        push_u64(out, u64::from(self.attempts.retries));
        out.extend_from_slice(b",\"error\":");
        json_id(out, self.error.map(ErrorKind::label));
        let aggregate = self.aggregate.and_then(|a| snap.aggregates.get(a as usize));
        if let Some(a) = aggregate {
            out.extend_from_slice(b",\"aggregate\":");
            json_id(out, Some(&a.id));
            out.extend_from_slice(b",\"failed_steps\":[");
            for (i, &j) in self.failed_steps.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json_id(out, a.steps.get(usize::from(j)).map(|s| &*s.id));
            }
            out.push(b']');
        }
        out.extend_from_slice(b"}\n");
    }
}
