//! The upstream connector seam: for one exchange (a request's, or an aggregate step's) it
//! applies the upstream's circuit limits, picks a target (balancing over the healthy ones),
//! checks a session out (a pooled connection or a new one), runs the exchange, reports the
//! outcome (per-target counters, passive health) and retries on another target when the
//! upstream's `retry` policy and budget allow.
//!
//! Hot path. An upstream with no circuit, retry or passive settings costs a target-set load,
//! one flags load in the pick and two striped counter updates per request. The one retry the
//! gateway always makes stays: a request that failed on a *reused* connection in a way that
//! proves the upstream never acted on it (the error says `retryable`) goes once more on a
//! fresh connection to the same target, whatever the policy. Where sessions come from is a
//! [`SessionSource`]: the worker's pool and `connect` in production, a fake in the tests.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::live::{now_ms, LiveTarget, Pick, TargetSet, UpstreamLive, STATUS_5XX};
use common::snapshot::{RetryPolicy, Upstream};
use common::upstreams::GRPC_UNAVAILABLE;

use crate::error::{ErrorKind, ProxyError};
use crate::upstream::{connect, ConnectError, Counted, UpstreamConn};
use crate::worker_ctx::WorkerCtx;

/// An upstream session: an HTTP/1.1 connection to one target.
#[derive(Debug)]
pub(crate) struct Session {
    pub conn: Box<UpstreamConn>,
    pub target: SocketAddr,
    /// Taken from the pool (it may have been closed by the upstream while idle).
    pub reused: bool,
    /// When this try must have its response head (`retry.per_try_timeout_ms`), if bounded.
    pub try_deadline: Option<Instant>,
    /// The connection may go back to the pool (its target is not draining).
    poolable: bool,
}

impl Session {
    /// The session a successful [`Connector::run`] left in `slot`, which carries the answer's
    /// body.
    pub fn answered(slot: &mut Option<Session>) -> Session {
        slot.take()
            .expect("an answer comes from the session `run` left in the slot")
    }

    /// The response-head deadline of this try: `deadline`, or sooner when tries are bounded.
    pub fn head_deadline(&self, deadline: Instant) -> Instant {
        self.try_deadline.map_or(deadline, |t| t.min(deadline))
    }
}

/// What the connector records about the sessions of one exchange (a request's, or an
/// aggregate step's).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attempts {
    /// The target address used (the last one, after retries).
    pub target: Option<SocketAddr>,
    /// How long the upstream connection took to open; `None` for a pooled one.
    pub connect: Option<Duration>,
    /// Attempts made after the first.
    pub retries: u8,
    /// Something was sent to the client already (an interim response), or a target may have
    /// acted on a request not known to be idempotent (a gRPC call it reset after taking it):
    /// no more retries.
    pub committed: bool,
}

impl AsMut<Attempts> for Attempts {
    fn as_mut(&mut self) -> &mut Attempts {
        self
    }
}

/// How a session's exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The response was read to its end and the connection can carry another request.
    Reusable,
    /// The exchange finished or failed in a way that leaves the connection unusable.
    Done,
}

/// Where sessions come from, and the worker's balancing state.
pub(crate) trait SessionSource {
    /// An idle connection to `target` opened for `upstream`, if one is pooled.
    fn take_idle(
        &self,
        target: SocketAddr,
        upstream: &Arc<UpstreamLive>,
        now: Instant,
    ) -> Option<Box<UpstreamConn>>;
    /// Keeps a connection to `target` opened for `upstream` for reuse.
    fn put_idle(
        &self,
        target: SocketAddr,
        upstream: &Arc<UpstreamLive>,
        conn: Box<UpstreamConn>,
        now: Instant,
    );
    /// Opens a new connection.
    async fn connect(
        &self,
        target: SocketAddr,
        timeout: Duration,
        send_timeout: Duration,
    ) -> Result<Box<UpstreamConn>, ConnectError>;
    /// Closes the idle connections of `upstream` that its targets closed meanwhile.
    fn drop_closed_idle(&self, _upstream: &Arc<UpstreamLive>) {}
    /// This worker's counter stripe.
    fn stripe(&self) -> usize;
    /// The next round-robin position for `upstream`, upstream `index` of a snapshot with
    /// `count` upstreams.
    fn next_rr(&self, upstream: &Arc<UpstreamLive>, count: usize, index: usize) -> u32;
    /// Random bits.
    fn random(&self) -> u64;
    /// The upstream's current target set.
    #[allow(clippy::redundant_allocation)]
    fn target_set(&self, up: &UpstreamRef<'_>) -> Rc<Arc<TargetSet>>;
    /// Whether the current config sends requests of `upstream` to `target`: a target, not
    /// draining, of that upstream's current set (what the worker's sweep keeps pooled).
    fn serves(&self, target: SocketAddr, upstream: &Arc<UpstreamLive>) -> bool;
}

impl SessionSource for WorkerCtx {
    fn take_idle(
        &self,
        target: SocketAddr,
        upstream: &Arc<UpstreamLive>,
        now: Instant,
    ) -> Option<Box<UpstreamConn>> {
        self.pool.borrow_mut().take(target, upstream, now)
    }

    fn put_idle(
        &self,
        target: SocketAddr,
        upstream: &Arc<UpstreamLive>,
        conn: Box<UpstreamConn>,
        now: Instant,
    ) {
        self.pool.borrow_mut().put(target, upstream, conn, now);
    }

    async fn connect(
        &self,
        target: SocketAddr,
        timeout: Duration,
        send_timeout: Duration,
    ) -> Result<Box<UpstreamConn>, ConnectError> {
        connect(target, timeout, send_timeout).await
    }

    fn drop_closed_idle(&self, upstream: &Arc<UpstreamLive>) {
        self.pool.borrow_mut().drop_closed(upstream);
        self.h2pool.borrow_mut().drop_closed(upstream);
    }

    fn stripe(&self) -> usize {
        self.index
    }

    fn next_rr(&self, upstream: &Arc<UpstreamLive>, count: usize, index: usize) -> u32 {
        let live = Arc::as_ptr(upstream) as usize;
        self.rr
            .borrow_mut()
            .next(live, count, index, self.index as u32)
    }

    fn random(&self) -> u64 {
        self.rng.borrow_mut().next_u64()
    }

    #[allow(clippy::redundant_allocation)]
    fn target_set(&self, up: &UpstreamRef<'_>) -> Rc<Arc<TargetSet>> {
        WorkerCtx::target_set(self, up.revision, up.count, up.index, &up.upstream.live)
    }

    fn serves(&self, target: SocketAddr, upstream: &Arc<UpstreamLive>) -> bool {
        let snap = self.config.load();
        // Still an upstream of the config (kept, not removed), and its target.
        snap.upstreams
            .iter()
            .any(|u| Arc::ptr_eq(&u.live, upstream))
            && upstream
                .set
                .load()
                .targets
                .iter()
                .any(|t| t.addr == target && !t.draining)
    }
}

/// The upstream a connector serves and the snapshot facts it needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UpstreamRef<'a> {
    pub upstream: &'a Upstream,
    pub index: usize,
    pub revision: u64,
    pub count: usize,
}

impl<'a> UpstreamRef<'a> {
    pub fn of(snap: &'a common::Snapshot, index: usize) -> Self {
        UpstreamRef {
            upstream: &snap.upstreams[index],
            index,
            revision: snap.revision,
            count: snap.upstreams.len(),
        }
    }
}

/// Sessions to one upstream for one exchange. While it lives, the request counts as
/// outstanding on its target (least_request, `/health`) and in flight for
/// `circuit.max_requests`: both end when the connector is dropped, after the answer was
/// relayed or the exchange failed.
#[derive(Debug)]
pub(crate) struct Connector<'a, P: SessionSource> {
    source: &'a P,
    up: UpstreamRef<'a>,
    /// The target set this exchange picks from (held to its end: indices stay valid).
    #[allow(clippy::redundant_allocation)]
    set: Rc<Arc<TargetSet>>,
    /// The target whose request is open (begun and not yet ended).
    open: Cell<Option<usize>>,
    /// The open target answered with a head that counted as a success for passive health:
    /// the failure streak that success ended, should the answer fail after all
    /// ([`Connector::answer_failed`]).
    answered: Cell<Option<u32>>,
    /// Counted in the upstream's in-flight requests.
    in_flight: Cell<bool>,
    /// [`common::live::GENERATION`] when the exchange began: if target sets were published
    /// since, a connection is pooled only if its target is still there and not draining.
    generation: u64,
    connect_timeout: Duration,
    send_timeout: Duration,
    /// The hashed key (`balance = "hash"`).
    key: u64,
    /// The retry policy, when the request may be sent again at all (its whole body is in
    /// hand and its method is one the policy retries).
    retry: Option<&'a RetryPolicy>,
    /// A clock reading from the start of the request, used once for the first pooled take
    /// (the pool's idle check does not need a fresher one).
    now: Cell<Option<Instant>>,
    /// The round-robin turn of this request's last pick: a retry walks on from it.
    rr: Cell<Option<u32>>,
    /// When the tries must be over (`retry.overall_timeout_ms`, from the first one's start).
    tries_end: Cell<Option<Instant>>,
    /// The try under way is a retry not yet counted: it is once it reaches its target (see
    /// [`Connector::arrived`]).
    retry_owed: Cell<bool>,
    /// A retry took its token from the budget and has not reached its target yet: given
    /// back if it never does, also when the exchange is dropped (an HTTP/2 client's reset
    /// during the backoff).
    budget_held: Cell<bool>,
    /// The client, looked at while a retry's backoff waits (see [`Connector::watching`]).
    watch: Option<crate::io::ClientWatch>,
}

/// Decrements a circuit counter when dropped.
struct Held<'a>(&'a std::sync::atomic::AtomicU32);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// The error kind of a failed connect (its TLS handshake included).
fn connect_error(e: &ConnectError) -> ProxyError {
    ProxyError::new(match e {
        ConnectError::Timeout => ErrorKind::ConnectTimeout,
        ConnectError::Io(e) if crate::upstream::no_socket(e) => ErrorKind::NoSocket,
        ConnectError::Io(_) => ErrorKind::ConnectFailed,
        ConnectError::Tls(e) => match e.kind() {
            std::io::ErrorKind::TimedOut => ErrorKind::ConnectTimeout,
            std::io::ErrorKind::InvalidData => ErrorKind::UpstreamTls,
            _ => ErrorKind::ConnectFailed,
        },
    })
}

/// Logs why a TLS handshake with a target failed (an untrusted certificate, a name it does
/// not hold): the access log says `upstream_tls`, this says why. At most one line every 10 s
/// per upstream, so one under load does not flood the log nor hide another's reason.
fn tls_failure(upstream: &Upstream, addr: SocketAddr, e: &ConnectError) {
    let ConnectError::Tls(e) = e else { return };
    if e.kind() == std::io::ErrorKind::InvalidData && upstream.live.tls_log_due(10_000) {
        log::warn!("upstream {:?}: TLS with {addr} failed: {e}", upstream.id);
    }
}

/// Counts one more in `counter` unless that passes `max`.
fn try_count(counter: &std::sync::atomic::AtomicU32, max: u32) -> bool {
    if counter.fetch_add(1, Relaxed) >= max {
        counter.fetch_sub(1, Relaxed);
        return false;
    }
    true
}

/// The sooner of two optional deadlines.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// [`try_count`], released when the guard is dropped.
fn hold(counter: &std::sync::atomic::AtomicU32, max: u32) -> Option<Held<'_>> {
    // Built only on success: a guard dropped after a refusal would take back a count the
    // refusal never kept (`then_some` builds its argument either way).
    try_count(counter, max).then(|| Held(counter))
}

/// What a connector's request held, kept by the tunnel it became: it counts as outstanding
/// on its target (least_request, `/health`) and in flight for `circuit.max_requests` until
/// the tunnel ends, as the request did until the `101`.
#[derive(Debug)]
pub(crate) struct Hold {
    target: Option<(Arc<common::live::TargetState>, usize)>,
    circuit: Option<Arc<common::live::UpstreamLive>>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some((state, stripe)) = &self.target {
            state.end(*stripe);
        }
        if let Some(live) = &self.circuit {
            live.circuit.requests.fetch_sub(1, Relaxed);
        }
    }
}

impl<P: SessionSource> Drop for Connector<'_, P> {
    fn drop(&mut self) {
        self.close_target();
        if self.in_flight.get() {
            self.up.upstream.live.circuit.requests.fetch_sub(1, Relaxed);
        }
        if self.budget_held.get() {
            self.up.upstream.live.budget.give_back();
        }
    }
}

impl<'a, P: SessionSource> Connector<'a, P> {
    /// `replayable`: the whole request is in hand, so it can be sent again; `idempotent`: its
    /// method is safe to repeat; `key`: the hashed balancing key (0 when not hashing).
    pub fn new(
        source: &'a P,
        up: UpstreamRef<'a>,
        timeouts: &common::Timeouts,
        key: u64,
        replayable: bool,
        idempotent: bool,
    ) -> Self {
        let retry = up
            .upstream
            .retry
            .as_ref()
            .filter(|r| replayable && r.may_retry(idempotent));
        Connector {
            generation: common::live::GENERATION.load(std::sync::atomic::Ordering::Acquire),
            set: source.target_set(&up),
            open: Cell::new(None),
            answered: Cell::new(None),
            in_flight: Cell::new(false),
            source,
            up,
            connect_timeout: timeouts.upstream_connect,
            send_timeout: timeouts.upstream_send,
            key,
            retry,
            now: Cell::new(None),
            rr: Cell::new(None),
            tries_end: Cell::new(None),
            retry_owed: Cell::new(false),
            budget_held: Cell::new(false),
            watch: None,
        }
    }

    /// Hands what the request holds on its target and upstream over to the tunnel it
    /// becomes (see [`Hold`]); the connector's drop then releases nothing.
    pub fn hold(&self) -> Hold {
        Hold {
            target: self
                .open
                .take()
                .map(|i| (self.set.targets[i].state.clone(), self.source.stripe())),
            circuit: self
                .in_flight
                .replace(false)
                .then(|| self.up.upstream.live.clone()),
        }
    }

    /// Lets the first try's pool check use `now` (the request's start) instead of reading
    /// the clock again.
    pub fn started_at(self, now: Instant) -> Self {
        self.now.set(Some(now));
        self
    }

    /// A retry's backoff ends early, with `ClientClosed`, when this client leaves (looked at
    /// every [`crate::io::CLIENT_CHECK`]). For an exchange whose waits nothing else watches
    /// the client through: an upstream read watches it itself, and an HTTP/2 stream's
    /// exchange or an aggregate step is dropped when its client goes (see
    /// [`super::http2::until_reset`]).
    pub fn watching(mut self, watch: Option<crate::io::ClientWatch>) -> Self {
        self.watch = watch;
        self
    }

    fn pick(
        &self,
        set: &TargetSet,
        tried: common::live::Tried,
        withdrawn: common::live::Tried,
    ) -> Option<usize> {
        // One target: `TargetSet::pick` picks it whatever the balance and its state (its last
        // fallback takes any target), so the common case skips the round-robin counter and
        // the random draw.
        if set.targets.len() == 1 {
            return Some(0);
        }
        let u = self.up.upstream;
        let counter = match u.balance {
            common::config::Balance::RoundRobin => {
                let turn = match self.rr.get() {
                    // A retry walks on from the request's own turn, to the next targets of
                    // the schedule, and takes no turn from the rotation: taking one, with
                    // two targets, started every request on the same (failing) target.
                    Some(last) if !tried.is_empty() => last.wrapping_add(1),
                    _ => self.source.next_rr(&u.live, self.up.count, self.up.index),
                };
                self.rr.set(Some(turn));
                turn
            }
            _ => 0,
        };
        let random = match u.balance {
            common::config::Balance::LeastRequest => self.source.random(),
            _ => 0,
        };
        set.pick(&Pick {
            balance: u.balance,
            counter,
            random,
            key: self.key,
            tried,
            withdrawn,
        })
    }

    /// The targets of `set` that the current config no longer sends the upstream's requests
    /// to (drained or removed since the request took `set`, or the upstream removed):
    /// nothing when no set was published since.
    fn withdrawn(&self, set: &TargetSet) -> common::live::Tried {
        let mut gone = common::live::Tried::default();
        if common::live::GENERATION.load(std::sync::atomic::Ordering::Acquire) == self.generation {
            return gone;
        }
        let live = &self.up.upstream.live;
        for (i, t) in set.targets.iter().enumerate() {
            if !self.source.serves(t.addr, live) {
                gone.add(i);
            }
        }
        gone
    }

    /// A pooled session to `target`, if one is idle. Records the target. Not async: the
    /// common case builds no connect future.
    fn pooled(
        &self,
        rec: &mut Attempts,
        target: &LiveTarget,
        try_deadline: Option<Instant>,
    ) -> Option<Session> {
        rec.connect = None;
        // The first try reuses the request's clock reading; a retry reads it again.
        let now = self.now.take().unwrap_or_else(Instant::now);
        let mut conn = self
            .source
            .take_idle(target.addr, &self.up.upstream.live, now)?;
        self.arrived(target, rec);
        conn.keep_send_timeout(self.send_timeout);
        Some(Session {
            conn,
            target: target.addr,
            reused: true,
            try_deadline,
            poolable: !target.draining,
        })
    }

    /// A new connection to `target`, within the circuit limits. Records the target and the
    /// connect time.
    async fn connect_new(
        &self,
        rec: &mut Attempts,
        target: &LiveTarget,
        try_deadline: Option<Instant>,
    ) -> Result<Session, ProxyError> {
        let addr = target.addr;
        rec.connect = None;
        let live = &self.up.upstream.live;
        let (mut pending, mut counted) = (None, None);
        if let Some(c) = &self.up.upstream.circuit {
            // Released if the connect fails.
            counted = Counted::within(live, c.max_connections);
            if counted.is_none() {
                // Pooled connections the targets closed hold places until the next sweep
                // finds them: this worker's go first.
                self.source.drop_closed_idle(live);
                counted = Counted::within(live, c.max_connections);
            }
            if counted.is_none() {
                live.circuit.rejected[0].fetch_add(1, Relaxed);
                return Err(ErrorKind::CircuitMaxConnections.into());
            }
            pending = hold(&live.circuit.pending, c.max_pending);
            if pending.is_none() {
                live.circuit.rejected[1].fetch_add(1, Relaxed);
                return Err(ErrorKind::CircuitMaxPending.into());
            }
        }
        // Only a try the circuit let through reaches the target (the log's `target` stays
        // the last try's that did, or null).
        self.arrived(target, rec);
        let started = Instant::now();
        let timeout = match try_deadline {
            Some(t) => self
                .connect_timeout
                .min(t.saturating_duration_since(started)),
            None => self.connect_timeout,
        };
        let mut conn = self
            .source
            .connect(addr, timeout, self.send_timeout)
            .await
            .map_err(|e| connect_error(&e))?;
        if let Some(tls) = &self.up.upstream.tls {
            // Within the same connect timeout as the TCP connect.
            let name = tls.name_for(target.host.as_deref(), addr.ip());
            conn = crate::upstream::start_tls(conn, tls, name, started + timeout)
                .await
                .map_err(|e| {
                    tls_failure(self.up.upstream, addr, &e);
                    connect_error(&e)
                })?;
        }
        drop(pending);
        // Counted without circuit limits too: a limit set later holds for this one.
        conn.counted = Some(counted.unwrap_or_else(|| Counted::one_more(live)));
        rec.connect = Some(started.elapsed());
        Ok(Session {
            conn,
            target: addr,
            reused: false,
            try_deadline,
            poolable: !target.draining,
        })
    }

    /// Returns a session after its exchange; a reusable one goes back to the pool. If target
    /// sets or the config changed during the exchange, only if the current config still
    /// sends requests to its target: the worker's sweep, which closes pooled connections to
    /// targets that left or drain, may already have run. Before, every connection in use
    /// at a change was closed after its exchange, and as many new ones opened.
    pub fn checkin(&self, session: Session, outcome: Outcome) {
        self.checkin_at(session, outcome, Instant::now());
    }

    /// [`Connector::checkin`] with the time the exchange ended, when the caller has read the
    /// clock already.
    pub fn checkin_at(&self, session: Session, outcome: Outcome, now: Instant) {
        let wanted = || {
            common::live::GENERATION.load(std::sync::atomic::Ordering::Acquire) == self.generation
                || self.source.serves(session.target, &self.up.upstream.live)
        };
        if outcome == Outcome::Reusable && session.poolable && wanted() {
            let mut conn = session.conn;
            conn.buf.clear();
            let upstream = &self.up.upstream.live;
            self.source.put_idle(session.target, upstream, conn, now);
        }
    }

    /// Runs `attempt` on a session to a target of the upstream, and again on another target
    /// while the retry policy says the failure (or the answer's status, from `status_of`)
    /// should be retried, tries and budget are left, and nothing was sent to the client.
    /// The session of the last try is left in `slot`: on success it carries the answer's
    /// body; on failure (if one was checked out) the caller can still read an answer the
    /// upstream sent early. The session stays in the caller's slot rather than travel back
    /// with the answer: the result of every layer of the retry loop is then a few words, not
    /// a connection and a response head copied at each return.
    pub async fn run<C: AsMut<Attempts>, T>(
        &self,
        req: &mut C,
        slot: &mut Option<Session>,
        mut attempt: impl AsyncFnMut(&mut Session, &mut C) -> Result<T, ProxyError>,
        status_of: impl Fn(&T) -> u16,
    ) -> Result<T, ProxyError> {
        self.run_tries(
            req,
            slot,
            None,
            async |target, slot, req| self.on_target(req, target, slot, &mut attempt).await,
            // The last try's connection closes before the retry's backoff, not after it.
            |slot| *slot = None,
            |v| (status_of(v), None),
        )
        .await
    }

    /// [`Connector::run`] for an upstream that speaks HTTP/2: `attempt` gets the target and
    /// this try's deadline and opens its own stream (on a connection from the worker's
    /// HTTP/2 pool, or a new one from [`Connector::connect_stream`]). `answer_of` gives an
    /// answer's status and, for a gRPC answer without messages, its `grpc-status`. No retry
    /// waits its backoff past `deadline` (a gRPC call's): the last answer stands instead.
    pub async fn run_h2<C: AsMut<Attempts>, T>(
        &self,
        req: &mut C,
        deadline: Option<Instant>,
        mut attempt: impl AsyncFnMut(&LiveTarget, Option<Instant>, &mut C) -> Result<T, ProxyError>,
        answer_of: impl Fn(&T) -> (u16, Option<u8>),
    ) -> Result<T, ProxyError> {
        self.run_tries(
            req,
            &mut (),
            deadline,
            async |target, _, req| {
                let try_deadline = self.try_deadline();
                attempt(target, try_deadline, req).await
            },
            // The last try's stream closed with its answer, dropped before the backoff.
            |_| {},
            answer_of,
        )
        .await
    }

    /// A new TCP connection to `target` for HTTP/2, within the circuit limits; records the
    /// target and the connect time. The connection counts in `circuit.max_connections`
    /// while the returned guard lives.
    pub async fn connect_stream(
        &self,
        rec: &mut Attempts,
        target: &LiveTarget,
        try_deadline: Option<Instant>,
    ) -> Result<(crate::upstream::UpstreamIo, Option<Counted>), ProxyError> {
        let session = self.connect_new(rec, target, try_deadline).await?;
        Ok((session.conn.stream, session.conn.counted))
    }

    /// When a try must have its response head (`retry.per_try_timeout_ms` from now, and
    /// `retry.overall_timeout_ms` from the first try's start), if bounded.
    fn try_deadline(&self) -> Option<Instant> {
        // The clock is read only for a bound (most upstreams have none).
        let per_try = self.up.upstream.retry.as_ref().and_then(|r| r.per_try);
        earliest(per_try.map(|t| Instant::now() + t), self.tries_end.get())
    }

    /// The try's own bound (`retry.per_try_timeout_ms`) counted from `at`, for a request
    /// whose body was streamed from the client: the moment it had all gone. The upload's
    /// pace is the client's (`client_body_ms` bounds it), not the target's: Envoy, too,
    /// starts its per-try timer once the downstream request is complete. Not the tries'
    /// bound (`overall_timeout_ms`): a request whose body streams has its `[timeouts]` only.
    pub fn per_try_from(&self, at: Instant) -> Option<Instant> {
        let per_try = self.up.upstream.retry.as_ref().and_then(|r| r.per_try);
        per_try.map(|t| at + t)
    }

    /// Waits a retry's backoff, ended early with `ClientClosed` when the watched client
    /// leaves. Boxed: the wait's timer and watch stay out of every request's future.
    async fn back_off(&self, wait: Duration) -> Result<(), ProxyError> {
        let slept = Box::pin(super::unless_client_left(
            self.watch,
            monoio::time::sleep(wait),
        ));
        match slept.await {
            Some(()) => Ok(()),
            None => Err(ErrorKind::ClientClosed.into()),
        }
    }

    /// Records that this try reached `target` (a pooled connection taken, or a new one the
    /// circuit let be opened): the log's target, and a retry's count, once, however the try
    /// ends. Counted before the try, a retry the circuit refused was counted as sent; after
    /// it, one whose try was dropped (its client gone, its aggregate step cut) was not.
    pub fn arrived(&self, target: &LiveTarget, rec: &mut Attempts) {
        rec.target = Some(target.addr);
        if self.retry_owed.replace(false) {
            self.budget_held.set(false);
            rec.retries = rec.retries.saturating_add(1);
            target.state.count_retry(self.source.stripe());
        }
    }

    /// A request sent again to `target` within its try, on a fresh connection (the pooled
    /// one had been closed, or the upstream refused the stream unprocessed): a retry of the
    /// target's, as the policy's retries are (and a request once it has its connection).
    pub fn count_resend(&self, target: &LiveTarget, rec: &mut Attempts) {
        rec.retries = rec.retries.saturating_add(1);
        target.state.count_retry(self.source.stripe());
    }

    /// A request goes to `target` on the connection (or stream) it got: counted in the
    /// target's requests then, as it is sent (only ever up: a Prometheus counter).
    pub fn count_request(&self, target: &LiveTarget) {
        target.state.count_request(self.source.stripe());
    }

    /// `connected` as the try takes it: a failure that reached the target (a refused or
    /// timed-out connect, a failed handshake) counts as one of its requests, a circuit
    /// limit's refusal before any connect does not.
    pub fn reached<S>(
        &self,
        target: &LiveTarget,
        connected: Result<S, ProxyError>,
    ) -> Result<S, ProxyError> {
        if let Err(e) = &connected {
            if e.kind.reason().is_none() {
                self.count_request(target);
            }
        }
        connected
    }

    /// Starts a try on target `i` of the set: the request counts as outstanding there from
    /// now on.
    fn begin(&self, i: usize) -> &LiveTarget {
        let target = &self.set.targets[i];
        target.state.begin(self.source.stripe());
        self.open.set(Some(i));
        target
    }

    /// The retry loop: `one` tries a target (with `slot`, where it leaves its session); an
    /// answer (its status and gRPC status from `answer_of`) or a failure is retried on
    /// another target while the policy allows, and while the backoff would not pass
    /// `deadline` (a gRPC call's) or `retry.overall_timeout_ms`. Before a retry's backoff
    /// the last try lets go of what it held: its answer, if not taken, is dropped (its
    /// connection or stream closes), `release` empties the slot, and its target no longer
    /// counts the request as outstanding; the next target is picked once the wait is over
    /// (see [`Connector::back_off`]), on the targets' state then.
    async fn run_tries<C: AsMut<Attempts>, S, R>(
        &self,
        req: &mut C,
        slot: &mut S,
        deadline: Option<Instant>,
        mut one: impl AsyncFnMut(&LiveTarget, &mut S, &mut C) -> Result<R, ProxyError>,
        release: impl Fn(&mut S),
        answer_of: impl Fn(&R) -> (u16, Option<u8>),
    ) -> Result<R, ProxyError> {
        let u = self.up.upstream;
        let live = &u.live;
        if let Some(c) = &u.circuit {
            if !try_count(&live.circuit.requests, c.max_requests) {
                live.circuit.rejected[2].fetch_add(1, Relaxed);
                return Err(ErrorKind::CircuitMaxRequests.into());
            }
            // Released when the connector is dropped (the answer relayed).
            self.in_flight.set(true);
        }
        if u.retry.is_some() {
            // Every request of the upstream counts towards the budget, retryable or not.
            live.budget.note_request(now_ms());
        }
        if let Some(r) = self.retry {
            // A request that may be retried has its whole body in hand: the tries start now.
            self.tries_end.set(r.overall.map(|t| Instant::now() + t));
        }
        let deadline = earliest(deadline, self.tries_end.get());
        let set: &TargetSet = &self.set;
        let stripe = self.source.stripe();
        let mut tries = 0u32;
        let mut tried = common::live::Tried::default();
        let mut withdrawn = common::live::Tried::default();
        let mut wait = Duration::ZERO;
        loop {
            tries += 1;
            if tries > 1 {
                release(slot);
                if !wait.is_zero() {
                    // Its client gone, the retry is not sent: its budget goes back (when the
                    // connector goes).
                    self.back_off(wait).await?;
                }
                // A revision during the tries (and the wait) may have drained or removed
                // targets: a retry goes to none of them.
                withdrawn = self.withdrawn(set);
            }
            let Some(i) = self.pick(set, tried, withdrawn) else {
                return Err(ErrorKind::NoTargets.into());
            };
            let state = &set.targets[i].state;
            self.retry_owed.set(tries > 1);
            let result = one(self.begin(i), slot, req).await;
            if self.retry_owed.replace(false) && self.budget_held.replace(false) {
                // A retry that never reached its target (the circuit refused it): its
                // budget goes back.
                live.budget.give_back();
            }
            // Refused before reaching the target (max_connections, max_pending): not one of
            // its requests.
            let refused = matches!(&result, Err(e) if e.kind.reason().is_some());
            let failure = match &result {
                Ok(v) => {
                    let (status, grpc) = answer_of(v);
                    if status >= 500 {
                        state.count_error(stripe, STATUS_5XX);
                        state.failed(u.passive.as_ref(), set, now_ms());
                    } else if grpc == Some(GRPC_UNAVAILABLE) {
                        // A gRPC server's way of saying 503: its answers are all HTTP 200.
                        state.failed(u.passive.as_ref(), set, now_ms());
                    } else {
                        self.answered.set(Some(state.succeeded()));
                    }
                    self.retry
                        .is_some_and(|r| r.on_status(status) || grpc.is_some_and(|c| r.on_grpc(c)))
                }
                Err(_) if refused => false,
                Err(e) => match e.kind.target_failure() {
                    Some(k) => {
                        state.count_error(stripe, k);
                        state.failed(u.passive.as_ref(), set, now_ms());
                        self.retry.is_some_and(|r| r.on_kind(k))
                    }
                    None => false,
                },
            };
            let Some(r) = self
                .retry
                .filter(|r| failure && !req.as_mut().committed && tries < r.attempts)
            else {
                return result;
            };
            wait = match r.backoff {
                Some(_) => r.backoff(tries, self.source.random()),
                None => Duration::ZERO,
            };
            if deadline.is_some_and(|d| Instant::now() + wait >= d) {
                // The wait would outlast the request or its tries: the last answer stands.
                return result;
            }
            // Last: the budget counts only the retries that go (it counted those the
            // deadline then stopped, and said them denied).
            if !(live.budget).try_retry(now_ms(), r.budget_percent, r.budget_min_per_s) {
                return result;
            }
            self.budget_held.set(true);
            // An answer not relayed is dropped here: its connection or stream closes.
            drop(result);
            // The request is no longer outstanding at this target.
            self.close_target();
            tried.add(i);
        }
    }

    /// Ends the open target's request (it stops counting as outstanding there).
    fn close_target(&self) {
        self.answered.set(None);
        if let Some(i) = self.open.take() {
            self.set.targets[i].state.end(self.source.stripe());
        }
    }

    /// The answer whose head counted as a success failed after all, for `kind`: an upstream
    /// failure (closed or reset while answering, malformed framing or a `101` nobody asked
    /// for, silent past `upstream_body_ms`) counts against the target in its error counts
    /// and passive health, as one before the head does; once per answer, and not for an
    /// answer its status already counted as a failure (a 5xx). A client-side failure does
    /// not count.
    pub fn answer_failed(&self, kind: ErrorKind) {
        let Some(k) = kind.target_failure() else {
            return;
        };
        let (Some(i), Some(streak)) = (self.open.get(), self.answered.take()) else {
            return;
        };
        let state = &self.set.targets[i].state;
        state.count_error(self.source.stripe(), k);
        state.failed_after_all(
            streak,
            self.up.upstream.passive.as_ref(),
            &self.set,
            now_ms(),
        );
    }

    /// One try on `target`: a pooled session, and once more on a fresh connection when the
    /// pooled one turns out to have been closed by the upstream. The session is left in
    /// `slot` (see [`Connector::run`]).
    async fn on_target<C: AsMut<Attempts>, T>(
        &self,
        req: &mut C,
        target: &LiveTarget,
        slot: &mut Option<Session>,
        attempt: &mut impl AsyncFnMut(&mut Session, &mut C) -> Result<T, ProxyError>,
    ) -> Result<T, ProxyError> {
        let try_deadline = self.try_deadline();
        let mut fresh = false;
        loop {
            let pooled = match fresh {
                false => self.pooled(req.as_mut(), target, try_deadline),
                true => None,
            };
            let session = match pooled {
                Some(s) => slot.insert(s),
                None => {
                    let connected = self.connect_new(req.as_mut(), target, try_deadline).await;
                    slot.insert(self.reached(target, connected)?)
                }
            };
            self.count_request(target);
            match attempt(session, req).await {
                Ok(v) => return Ok(v),
                Err(e) if e.retryable && session.reused && !fresh => {
                    // A pooled connection the upstream had closed: nothing of the request
                    // was acted on, so it goes again on a new connection, once. A retry
                    // sent to the target like the policy's (its metric counts both).
                    fresh = true;
                    *slot = None;
                    self.count_resend(target, req.as_mut());
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::io::{Read, Write};
    use std::net::TcpListener as StdListener;

    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};

    use super::*;
    use crate::proxy::context::RequestCtx;

    #[test]
    fn a_refused_hold_leaves_the_count_as_it_was() {
        // Before, the guard built for a refusal was dropped and took back a count the
        // refusal never kept: after one refusal and the holder's end the count wrapped
        // below zero, and every later `max_pending` check failed for good.
        let pending = std::sync::atomic::AtomicU32::new(0);
        let first = hold(&pending, 1).expect("room for one");
        assert!(
            hold(&pending, 1).is_none(),
            "a second one waits past max_pending = 1"
        );
        assert_eq!(pending.load(Relaxed), 1);
        drop(first);
        assert_eq!(pending.load(Relaxed), 0);
        assert!(hold(&pending, 1).is_some(), "room again");
    }

    /// A pool that hands out the connections it was given, and counts connects.
    struct FakePool {
        #[allow(clippy::vec_box)] // boxed as the real pool keeps them
        idle: RefCell<Vec<Box<UpstreamConn>>>,
        connects: Cell<u32>,
        put_back: Cell<u32>,
        /// What `serves` answers.
        serving: Cell<bool>,
    }

    impl SessionSource for FakePool {
        fn take_idle(
            &self,
            _target: SocketAddr,
            _upstream: &Arc<UpstreamLive>,
            _now: Instant,
        ) -> Option<Box<UpstreamConn>> {
            self.idle.borrow_mut().pop()
        }

        fn put_idle(
            &self,
            _target: SocketAddr,
            _upstream: &Arc<UpstreamLive>,
            conn: Box<UpstreamConn>,
            _now: Instant,
        ) {
            self.put_back.set(self.put_back.get() + 1);
            self.idle.borrow_mut().push(conn);
        }

        async fn connect(
            &self,
            target: SocketAddr,
            timeout: Duration,
            send_timeout: Duration,
        ) -> Result<Box<UpstreamConn>, ConnectError> {
            self.connects.set(self.connects.get() + 1);
            connect(target, timeout, send_timeout).await
        }

        fn stripe(&self) -> usize {
            0
        }

        fn next_rr(&self, _upstream: &Arc<UpstreamLive>, _count: usize, _index: usize) -> u32 {
            0
        }

        fn random(&self) -> u64 {
            0
        }

        fn target_set(&self, up: &UpstreamRef<'_>) -> Rc<Arc<TargetSet>> {
            Rc::new(up.upstream.live.set.load_full())
        }

        fn serves(&self, _target: SocketAddr, _upstream: &Arc<UpstreamLive>) -> bool {
            self.serving.get()
        }
    }

    /// A snapshot with one upstream of `targets` (and `extra` upstream settings in TOML).
    fn upstream(targets: &[SocketAddr], extra: &str) -> common::Snapshot {
        let list: Vec<String> = targets
            .iter()
            .map(|t| format!("{{ address = \"{t}\" }}"))
            .collect();
        let text = format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nid = \"u\"\n\
             targets = [{}]\n{extra}\n",
            list.join(", ")
        );
        let config = common::parse_config(&text, common::Format::Toml).unwrap();
        common::Snapshot::compile(config, 1).unwrap()
    }

    #[allow(clippy::vec_box)]
    fn fake_pool(idle: Vec<Box<UpstreamConn>>) -> FakePool {
        FakePool {
            idle: RefCell::new(idle),
            connects: Cell::new(0),
            put_back: Cell::new(0),
            serving: Cell::new(true),
        }
    }

    /// An origin that answers `n` connections with one response each.
    fn origin(n: usize) -> SocketAddr {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for _ in 0..n {
                let Ok((mut s, _)) = l.accept() else { return };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            }
        });
        addr
    }

    /// A connection whose far end is already closed, as a pooled one the upstream timed out.
    async fn dead_conn() -> Box<UpstreamConn> {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let conn = connect(addr, Duration::from_secs(1), Duration::from_secs(1))
            .await
            .unwrap();
        let (s, _) = l.accept().unwrap();
        drop(s);
        drop(l);
        monoio::time::sleep(Duration::from_millis(20)).await;
        conn
    }

    /// One GET and its response head, as the exchange does it: a write failure or an empty
    /// answer is retryable (nothing reached the upstream's application).
    async fn get(session: &mut Session) -> Result<Vec<u8>, ProxyError> {
        let closed = ProxyError::new(ErrorKind::UpstreamClosed).retryable(true);
        let (res, _) = session
            .conn
            .stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n".to_vec())
            .await;
        res.map_err(|_| closed)?;
        let (res, buf) = session.conn.stream.read(vec![0u8; 1024]).await;
        match res {
            Ok(n) if n > 0 => Ok(buf[..n].to_vec()),
            _ => Err(closed),
        }
    }

    /// A new request's GET through `connector`: its result, the request's record, and the
    /// session left in the slot.
    async fn one_get(
        connector: &Connector<'_, FakePool>,
    ) -> (Result<Vec<u8>, ProxyError>, RequestCtx, Option<Session>) {
        let mut req = RequestCtx::new([127, 0, 0, 1].into());
        let mut slot = None;
        let got = connector
            .run(&mut req, &mut slot, async |s, _req| get(s).await, |_| 200)
            .await;
        (got, req, slot)
    }

    fn connector<'a>(pool: &'a FakePool, snap: &'a common::Snapshot) -> Connector<'a, FakePool> {
        Connector::new(
            pool,
            UpstreamRef::of(snap, 0),
            &snap.timeouts,
            0,
            true,
            true,
        )
    }

    fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
    }

    #[test]
    fn a_dead_pooled_connection_is_retried_once_on_a_fresh_one() {
        let target = origin(1);
        runtime().block_on(async move {
            let pool = fake_pool(vec![dead_conn().await]);
            let snap = upstream(&[target], "");
            let connector = connector(&pool, &snap);
            let (answer, req, slot) = one_get(&connector).await;
            let answer = answer.expect("the retry on a fresh connection succeeds");
            assert!(answer.starts_with(b"HTTP/1.1 200 OK"));
            let session = slot.expect("the session that answered");
            assert!(!session.reused);
            assert_eq!(pool.connects.get(), 1);
            assert_eq!(req.attempts.retries, 1);
            let state = &snap.upstreams[0].live.set.load().targets[0].state;
            assert_eq!(
                state.retries(),
                1,
                "counted in gateway_target_retries_total"
            );
            assert_eq!(
                state.requests(),
                2,
                "both sends counted in gateway_target_requests_total"
            );
            assert_eq!(req.attempts.target, Some(target));
            assert!(
                req.attempts.connect.is_some(),
                "the fresh connection's connect time"
            );
            connector.checkin(session, Outcome::Reusable);
            assert_eq!(pool.put_back.get(), 1);
        });
    }

    /// The connection's TCP_USER_TIMEOUT.
    fn send_timeout_of(conn: &UpstreamConn) -> Option<Duration> {
        use std::os::fd::{AsRawFd, BorrowedFd};
        // SAFETY: the connection's socket is open while `conn` is borrowed.
        let fd = unsafe { BorrowedFd::borrow_raw(conn.stream.as_raw_fd()) };
        socket2::SockRef::from(&fd).tcp_user_timeout().unwrap()
    }

    #[test]
    fn a_pooled_connection_takes_the_send_timeout_of_the_request_that_reuses_it() {
        // Opened with a 1 s send timeout; the upstream's `send_ms` is 2.5 s by the time it
        // is reused (changed at runtime): the reuse sets it.
        let target = origin(1);
        runtime().block_on(async move {
            let conn = connect(target, Duration::from_secs(1), Duration::from_secs(1))
                .await
                .unwrap();
            assert_eq!(send_timeout_of(&conn), Some(Duration::from_secs(1)));
            let pool = fake_pool(vec![conn]);
            let snap = upstream(&[target], "");
            let mut timeouts = snap.timeouts;
            timeouts.upstream_send = Duration::from_millis(2500);
            let connector =
                Connector::new(&pool, UpstreamRef::of(&snap, 0), &timeouts, 0, true, true);
            let (answer, _, slot) = one_get(&connector).await;
            answer.expect("an answer on the pooled connection");
            let session = slot.expect("the session that answered");
            assert!(session.reused);
            assert_eq!(
                send_timeout_of(&session.conn),
                Some(Duration::from_millis(2500))
            );
        });
    }

    #[test]
    fn a_connection_in_use_at_a_change_is_pooled_only_while_its_target_is_served() {
        let target = origin(2);
        runtime().block_on(async move {
            for serving in [true, false] {
                let pool = fake_pool(Vec::new());
                pool.serving.set(serving);
                let snap = upstream(&[target], "");
                let connector = connector(&pool, &snap);
                let (answer, _, mut slot) = one_get(&connector).await;
                answer.expect("an answer");
                // Target sets were published while the exchange ran. (Every other test's
                // pool serves its targets, so this bump changes none of their outcomes.)
                common::live::bump_generation();
                connector.checkin(Session::answered(&mut slot), Outcome::Reusable);
                assert_eq!(
                    pool.put_back.get(),
                    u32::from(serving),
                    "serving: {serving}"
                );
            }
        });
    }

    #[test]
    fn a_failure_on_a_fresh_connection_or_a_non_retryable_one_is_not_retried() {
        runtime().block_on(async move {
            // Fresh connection (nothing pooled) to an upstream that closes at once.
            let l = StdListener::bind("127.0.0.1:0").unwrap();
            let target = l.local_addr().unwrap();
            std::thread::spawn(move || {
                for _ in 0..2 {
                    let Ok((s, _)) = l.accept() else { return };
                    drop(s);
                }
            });
            let pool = fake_pool(Vec::new());
            let snap = upstream(&[target], "");
            let connector = connector(&pool, &snap);
            let (err, req, slot) = one_get(&connector).await;
            let err = err.expect_err("a fresh connection's failure is final");
            assert_eq!(err.kind, ErrorKind::UpstreamClosed);
            assert!(slot.is_some(), "the session stays for an early answer");
            assert_eq!((pool.connects.get(), req.attempts.retries), (1, 0));

            // A pooled connection, but the error says the upstream may have acted on it.
            let dead = dead_conn().await;
            pool.idle.borrow_mut().push(dead);
            let mut req = RequestCtx::new([127, 0, 0, 1].into());
            let mut slot = None;
            let err = connector
                .run(
                    &mut req,
                    &mut slot,
                    async |_s, _req| -> Result<(), ProxyError> {
                        Err(ProxyError::new(ErrorKind::ResponseTimeout))
                    },
                    |_| 200,
                )
                .await
                .expect_err("not retryable");
            assert_eq!(err.kind, ErrorKind::ResponseTimeout);
            assert!(slot.is_some_and(|s| s.reused), "the pooled session stays");
            assert_eq!((pool.connects.get(), req.attempts.retries), (1, 0));
        });
    }

    #[test]
    fn a_refused_connect_is_connect_failed() {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        let target = l.local_addr().unwrap();
        drop(l);
        runtime().block_on(async move {
            let pool = fake_pool(Vec::new());
            let snap = upstream(&[target], "");
            let connector = connector(&pool, &snap);
            let mut req = RequestCtx::new([127, 0, 0, 1].into());
            let mut slot = None;
            let err = connector
                .run(
                    &mut req,
                    &mut slot,
                    async |_s, _req| -> Result<(), ProxyError> { Ok(()) },
                    |_| 200,
                )
                .await
                .expect_err("nothing listens");
            assert!(slot.is_none(), "no session was opened");
            assert_eq!(err.kind, ErrorKind::ConnectFailed);
            assert_eq!(req.attempts.connect, None);
        });
    }

    #[test]
    fn a_request_is_counted_as_it_goes_out_not_when_its_answer_comes() {
        let target = origin(1);
        runtime().block_on(async move {
            let pool = fake_pool(Vec::new());
            let snap = upstream(&[target], "");
            let state = snap.upstreams[0].live.set.load().targets[0].state.clone();
            let connector = connector(&pool, &snap);
            let mut req = RequestCtx::new([127, 0, 0, 1].into());
            let mut slot = None;
            // What the count is while the try has its connection, before any answer (a
            // long poll's would otherwise show only once it ends).
            let during = connector
                .run(
                    &mut req,
                    &mut slot,
                    async |_s, _req| -> Result<u64, ProxyError> { Ok(state.requests()) },
                    |_| 200,
                )
                .await
                .expect("connected");
            assert_eq!(during, 1);
        });
    }

    #[test]
    fn a_try_refused_by_a_circuit_limit_is_not_counted_as_the_targets_request() {
        let target = origin(0);
        runtime().block_on(async move {
            let pool = fake_pool(Vec::new());
            let snap = upstream(&[target], "circuit = { max_connections = 1 }");
            let live = &snap.upstreams[0].live;
            let state = live.set.load().targets[0].state.clone();
            let _open = Counted::within(live, 1).expect("the one connection");
            let connector = connector(&pool, &snap);
            let (answer, _, slot) = one_get(&connector).await;
            assert_eq!(
                answer.expect_err("refused").kind,
                ErrorKind::CircuitMaxConnections
            );
            assert!(slot.is_none());
            drop(connector);
            // Never counted (before: counted at the start, then taken back, which a scrape
            // in between saw as the counter going down).
            assert_eq!((state.requests(), state.outstanding()), (0, 0));
        });
    }

    #[test]
    fn a_request_counts_as_outstanding_and_in_flight_until_the_connector_is_dropped() {
        let target = origin(1);
        runtime().block_on(async move {
            let pool = fake_pool(Vec::new());
            let snap = upstream(&[target], "circuit = { max_requests = 5 }");
            let live = &snap.upstreams[0].live;
            let state = live.set.load().targets[0].state.clone();
            let connector = connector(&pool, &snap);
            let (answer, _, slot) = one_get(&connector).await;
            answer.expect("the origin answers");
            let session = slot.expect("the session that answered");
            // The answer's body would be relayed now: still outstanding.
            assert_eq!(state.outstanding(), 1);
            assert_eq!(live.circuit.requests.load(Relaxed), 1);
            connector.checkin(session, Outcome::Done);
            drop(connector);
            assert_eq!(state.outstanding(), 0);
            assert_eq!(live.circuit.requests.load(Relaxed), 0);
            assert_eq!(state.requests(), 1);
        });
    }
}
