//! The live side of upstreams: which addresses each upstream's targets have right now, and each
//! target's health and counters. Shared by every worker (which picks targets and reports
//! outcomes) and the control plane (which resolves host names, runs active checks, ends
//! ejections and serves `/v1/upstreams/{id}/health`).
//!
//! A [`Snapshot`](crate::Snapshot) keeps what the operator wrote (host names included); an
//! upstream's current [`TargetSet`] lives in its [`UpstreamLive`], which the control plane keeps
//! from one config revision to the next and replaces without a revision when DNS answers
//! change. A [`TargetState`] is keyed by upstream and address, so health survives unrelated
//! config changes.
//!
//! Hot path: [`TargetSet::pick`] costs one relaxed load of the chosen target's flags when it
//! is usable; the per-target counters are striped per worker so workers do not share a cache
//! line for them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;

use crate::config::Balance;

/// Counter stripes per target; worker `i` writes stripe `i % STRIPES`.
pub const STRIPES: usize = 16;

/// Failure kinds counted per target; the data plane maps its error kinds onto these.
pub const FAILURE_KINDS: [&str; 7] = [
    "connect_failed",
    "connect_timeout",
    "send_timeout",
    "response_timeout",
    "upstream_closed",
    "upstream_malformed",
    "status_5xx",
];

/// Index of `status_5xx` in [`FAILURE_KINDS`].
pub const STATUS_5XX: usize = 6;

const UNHEALTHY: u8 = 1;
const EJECTED: u8 = 2;

/// Bumped whenever any upstream's target set changes: workers then drop pooled connections
/// to addresses no longer in use.
pub static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Tells the workers that something they cache changed (a target set, or the snapshot the
/// upstreams come from): their next sweep prunes pooled connections against it.
pub fn bump_generation() {
    GENERATION.fetch_add(1, std::sync::atomic::Ordering::Release);
}

/// Milliseconds since the first call in this process (the clock of ejections).
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One worker's counters for one target.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe {
    requests: AtomicU64,
    outstanding: AtomicI64,
    retries: AtomicU64,
    errors: [AtomicU64; FAILURE_KINDS.len()],
}

/// The last active check of a target, and the streaks that decide its state.
#[derive(Debug, Default, Clone)]
pub struct CheckState {
    pub last: Option<LastCheck>,
    pub passes: u32,
    pub fails: u32,
    /// The checker whose results count (0: none). A stopped checker's task may still be
    /// finishing a check on another thread; it leaves the state alone once this changed.
    pub owner: u64,
}

/// One active check's result.
#[derive(Debug, Clone, Copy)]
pub struct LastCheck {
    pub at: SystemTime,
    pub ok: bool,
    /// The status answered, if one was.
    pub status: Option<u16>,
}

/// Health and counters of one target (one address of one upstream).
#[derive(Debug, Default)]
pub struct TargetState {
    flags: AtomicU8,
    consecutive_failures: AtomicU32,
    /// Ejections in a row (each within `ejection_ms` of the previous one's end).
    streak: AtomicU32,
    ejections: AtomicU64,
    ejected_until: AtomicU64,
    stripes: [Stripe; STRIPES],
    /// Written by the active checker only.
    pub check: Mutex<CheckState>,
}

/// Passive health settings, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Passive {
    pub consecutive_failures: u32,
    pub ejection_ms: u64,
    pub max_ejected_percent: u32,
}

impl TargetState {
    pub fn new() -> Arc<TargetState> {
        Arc::new(TargetState::default())
    }

    /// Neither failing its active checks nor ejected.
    #[inline]
    pub fn is_healthy(&self) -> bool {
        self.flags.load(Relaxed) == 0
    }

    pub fn is_unhealthy(&self) -> bool {
        self.flags.load(Relaxed) & UNHEALTHY != 0
    }

    pub fn is_ejected(&self) -> bool {
        self.flags.load(Relaxed) & EJECTED != 0
    }

    /// The active checker's verdict.
    pub fn set_unhealthy(&self, unhealthy: bool) {
        if unhealthy {
            self.flags.fetch_or(UNHEALTHY, Relaxed);
        } else {
            self.flags.fetch_and(!UNHEALTHY, Relaxed);
        }
    }

    /// A request to this target starts (worker `stripe`): outstanding from now on.
    #[inline]
    pub fn begin(&self, stripe: usize) {
        self.stripes[stripe % STRIPES]
            .outstanding
            .fetch_add(1, Relaxed);
    }

    /// A request was sent to this target: counted once it is known to have reached it (not
    /// refused by a circuit limit before), so the count only ever grows, as a Prometheus
    /// counter must (taking back one counted at the start made scrapes see it go down).
    #[inline]
    pub fn count_request(&self, stripe: usize) {
        self.stripes[stripe % STRIPES]
            .requests
            .fetch_add(1, Relaxed);
    }

    /// A request to this target ended.
    #[inline]
    pub fn end(&self, stripe: usize) {
        self.stripes[stripe % STRIPES]
            .outstanding
            .fetch_sub(1, Relaxed);
    }

    /// A request failed here with [`FAILURE_KINDS`]`[kind]`.
    pub fn count_error(&self, stripe: usize, kind: usize) {
        self.stripes[stripe % STRIPES].errors[kind].fetch_add(1, Relaxed);
    }

    /// A retry went to this target.
    pub fn count_retry(&self, stripe: usize) {
        self.stripes[stripe % STRIPES].retries.fetch_add(1, Relaxed);
    }

    /// Requests in flight, over all workers.
    pub fn outstanding(&self) -> u64 {
        let n: i64 = self
            .stripes
            .iter()
            .map(|s| s.outstanding.load(Relaxed))
            .sum();
        n.max(0) as u64
    }

    pub fn requests(&self) -> u64 {
        self.stripes.iter().map(|s| s.requests.load(Relaxed)).sum()
    }

    pub fn retries(&self) -> u64 {
        self.stripes.iter().map(|s| s.retries.load(Relaxed)).sum()
    }

    /// Failures of [`FAILURE_KINDS`]`[kind]`.
    pub fn errors(&self, kind: usize) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.errors[kind].load(Relaxed))
            .sum()
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Relaxed)
    }

    pub fn ejections(&self) -> u64 {
        self.ejections.load(Relaxed)
    }

    /// A request succeeded here (passive health): the failure streak ends. The streak it
    /// ended, for [`TargetState::failed_after_all`].
    #[inline]
    pub fn succeeded(&self) -> u32 {
        let streak = self.consecutive_failures.load(Relaxed);
        if streak != 0 {
            self.consecutive_failures.store(0, Relaxed);
        }
        streak
    }

    /// A request whose answer's head counted as a success (ending a `streak` of failures)
    /// failed after all, in its body: the streak goes on from where the head ended it, this
    /// failure added, as [`TargetState::failed`] says. (An answer's success is taken when its
    /// head comes, as Envoy takes it, so that a long body does not hold back the failures
    /// of the requests after it.)
    pub fn failed_after_all(
        &self,
        streak: u32,
        passive: Option<&Passive>,
        set: &TargetSet,
        now: u64,
    ) -> bool {
        self.consecutive_failures.fetch_add(streak, Relaxed);
        self.failed(passive, set, now)
    }

    /// A request failed here. With passive health, the `consecutive_failures`-th failure in
    /// a row ejects the target, unless `max_ejected_percent` of `set` is already ejected.
    /// Returns whether this call ejected it.
    pub fn failed(&self, passive: Option<&Passive>, set: &TargetSet, now: u64) -> bool {
        if self.is_ejected() {
            // Requests that were in flight when it was ejected (or panic mode): they do not
            // count towards the next ejection.
            return false;
        }
        let n = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        let Some(p) = passive else { return false };
        if n < p.consecutive_failures {
            return false;
        }
        // Counting the ejected targets and ejecting this one are one step per set: two
        // workers whose targets fail at once must not both see room for one more. Never
        // waited for (failures go on arriving on every worker in an outage): while another
        // worker decides, this failure only adds to the streak, and the next one decides.
        let _one_at_a_time = match set.ejecting.try_lock() {
            Ok(held) => held,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        if self.is_ejected() {
            return false; // another worker ejected it meanwhile
        }
        let total = set.targets.len();
        let allowed = match p.max_ejected_percent {
            0 => 0,
            pct => (total * pct as usize / 100).max(1),
        };
        let ejected = set.targets.iter().filter(|t| t.state.is_ejected()).count();
        if ejected >= allowed {
            return false;
        }
        let last_end = self.ejected_until.load(Relaxed);
        let streak = if last_end != 0 && now < last_end + p.ejection_ms {
            self.streak.load(Relaxed) + 1
        } else {
            1
        };
        // The end is written before the flag, so the control plane's tick never sees the
        // flag with the previous ejection's (past) end.
        let until = now + p.ejection_ms * u64::from(streak.min(10));
        self.ejected_until
            .store(until, std::sync::atomic::Ordering::Release);
        if self
            .flags
            .fetch_or(EJECTED, std::sync::atomic::Ordering::Release)
            & EJECTED
            != 0
        {
            return false; // another worker got there first
        }
        self.streak.store(streak, Relaxed);
        self.ejections.fetch_add(1, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
        true
    }

    /// Ends an ejection whose time is up (the control plane's tick). Returns whether it did.
    pub fn expire(&self, now: u64) -> bool {
        let ejected = self.flags.load(std::sync::atomic::Ordering::Acquire) & EJECTED != 0;
        if ejected
            && now
                >= self
                    .ejected_until
                    .load(std::sync::atomic::Ordering::Acquire)
        {
            self.consecutive_failures.store(0, Relaxed);
            self.flags.fetch_and(!EJECTED, Relaxed);
            return true;
        }
        false
    }

    /// `healthy`, `unhealthy`, `ejected` or `draining` (in that order of precedence, last
    /// first).
    pub fn state_label(&self, draining: bool) -> &'static str {
        if draining {
            "draining"
        } else if self.is_ejected() {
            "ejected"
        } else if self.is_unhealthy() {
            "unhealthy"
        } else {
            "healthy"
        }
    }
}

/// One address requests can go to.
#[derive(Debug, Clone)]
pub struct LiveTarget {
    pub addr: SocketAddr,
    pub weight: u32,
    /// The host name it was resolved from; `None` for a literal address.
    pub host: Option<Arc<str>>,
    pub draining: bool,
    /// Gets requests only while no other target is usable (nginx's `backup`; an SRV
    /// record of a priority after the lowest).
    pub backup: bool,
    pub state: Arc<TargetState>,
}

impl LiveTarget {
    /// May get new requests without panic mode.
    #[inline]
    fn usable(&self) -> bool {
        !self.draining && self.state.is_healthy()
    }
}

/// What a pick needs besides the set.
#[derive(Debug, Clone, Copy)]
pub struct Pick {
    pub balance: Balance,
    /// The worker's position in this upstream's round-robin schedule.
    pub counter: u32,
    /// Random bits (least_request's two choices).
    pub random: u64,
    /// The hashed key (hash balancing).
    pub key: u64,
    /// The targets this request tried already: a retry goes to one it has not tried while
    /// there is one.
    pub tried: Tried,
    /// Targets of the set that were drained or removed since the request took it: like
    /// draining ones, the last resort.
    pub withdrawn: Tried,
}

/// Which targets (index and target) a fallback of [`TargetSet::pick`] takes.
type Tier<'a> = dyn Fn(usize, &LiveTarget) -> bool + 'a;

/// A set of target indices, one bit each for the [`crate::snapshot::MAX_TARGETS`] a set
/// may hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tried([u64; crate::snapshot::MAX_TARGETS / 64]);

impl Tried {
    pub fn add(&mut self, i: usize) {
        if let Some(word) = self.0.get_mut(i / 64) {
            *word |= 1 << (i % 64);
        }
    }

    pub fn has(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// These and `other`'s.
    pub fn with(mut self, other: Tried) -> Tried {
        for (w, o) in self.0.iter_mut().zip(other.0) {
            *w |= o;
        }
        self
    }
}

/// An upstream's addresses right now, with what balancing needs precomputed.
#[derive(Debug, Default)]
pub struct TargetSet {
    pub targets: Vec<LiveTarget>,
    /// Smooth weighted round-robin order over `targets` (indices), one full cycle.
    pub schedule: Box<[u16]>,
    /// Consistent-hash ring: (point, target index), sorted by point.
    ring: Box<[(u64, u16)]>,
    /// How many targets the schedule and the ring hold: those that are not backups (all of
    /// them when every one is).
    balanced: usize,
    /// Held while a passive health check decides an ejection (see [`TargetState::failed`]).
    ejecting: Mutex<()>,
}

/// Ring points per unit of weight.
const POINTS_PER_WEIGHT: usize = 100;
/// Most points on one ring.
const MAX_POINTS: usize = 64 * 1024;

impl TargetSet {
    pub fn new(targets: Vec<LiveTarget>) -> TargetSet {
        let schedule = smooth_wrr(&targets);
        let ring = ring(&targets);
        TargetSet {
            balanced: balanced(&targets).count(),
            targets,
            schedule,
            ring,
            ejecting: Mutex::new(()),
        }
    }

    /// Chooses a target for a request: by `p.balance` among usable targets (not draining,
    /// healthy, not ejected, and not tried already by this request when another will do).
    /// When no target is usable, panic mode: any target that is not draining, then any at
    /// all. `None` only for an empty set.
    #[inline]
    pub fn pick(&self, p: &Pick) -> Option<usize> {
        let n = self.targets.len();
        if n == 0 {
            return None;
        }
        let fresh = |i: usize| !p.tried.has(i);
        let usable = |i: usize, t: &LiveTarget| t.usable() && !p.withdrawn.has(i);
        let offered = |i: usize, t: &LiveTarget| !t.draining && !p.withdrawn.has(i);
        let first = match p.balance {
            Balance::RoundRobin => {
                usize::from(self.schedule[p.counter as usize % self.schedule.len()])
            }
            Balance::LeastRequest => self.two_choices(p.random),
            Balance::Hash => self
                .ring_walk(p.key, p.tried.with(p.withdrawn))
                .unwrap_or(0),
        };
        if usable(first, &self.targets[first]) && fresh(first) {
            return Some(first);
        }
        // Fallbacks, from the best kind of target to any, each drawn by weight: the share
        // of a target that is down spreads over the others as their weights say (not all to
        // its neighbour). The draw follows the key for hashing, so a key keeps its target.
        let draw = match p.balance {
            Balance::Hash => p.key,
            Balance::LeastRequest => p.random,
            Balance::RoundRobin => mix(u64::from(p.counter)),
        };
        // Backups come after the others, as in nginx: while one of those is usable, and for
        // a retry once every one of those was tried.
        let backups = self.balanced < n;
        let primary = |t: &LiveTarget| !t.backup;
        let tiers: [(bool, &Tier); 7] = [
            (backups, &|i, t| primary(t) && usable(i, t) && fresh(i)),
            (true, &|i, t| usable(i, t) && fresh(i)),
            (backups, &|i, t| primary(t) && usable(i, t)),
            (true, &|i, t| usable(i, t)),
            (true, &|i, t| offered(i, t) && fresh(i)),
            (true, &|i, t| offered(i, t)),
            (true, &|_, _| true),
        ];
        (tiers.iter().filter(|(wanted, _)| *wanted)).find_map(|(_, ok)| {
            match ok(first, &self.targets[first]) {
                // The balancer's own choice while it will do (panic mode keeps its rotation).
                true => Some(first),
                false => self.draw_by_weight(draw, |i, t| ok(i, t)),
            }
        })
    }

    /// One of the targets `ok` takes, drawn with `draw` in proportion to their weights (a
    /// weight of 0 counts as 1); `None` if `ok` takes none.
    fn draw_by_weight(&self, draw: u64, ok: impl Fn(usize, &LiveTarget) -> bool) -> Option<usize> {
        let weight = |t: &LiveTarget| u64::from(t.weight.max(1));
        let total: u64 = (self.targets.iter().enumerate())
            .filter(|&(i, t)| ok(i, t))
            .map(|(_, t)| weight(t))
            .sum();
        if total == 0 {
            return None;
        }
        let mut x = draw % total;
        for (i, t) in self.targets.iter().enumerate().filter(|&(i, t)| ok(i, t)) {
            if x < weight(t) {
                return Some(i);
            }
            x -= weight(t);
        }
        None
    }

    /// Power of two choices: of two random targets, the one with fewer outstanding requests
    /// per unit of weight (a usable one before one that is not). With equal weights the two
    /// are distinct and drawn alike; otherwise each is drawn in proportion to its weight (the
    /// round-robin cycle holds each target weight times), and a tie goes to the first: while
    /// nothing is outstanding (requests one at a time) the targets share by weight, instead
    /// of the heaviest taking every request.
    fn two_choices(&self, random: u64) -> usize {
        let n = self.targets.len();
        if n == 1 {
            return 0;
        }
        // Equal weights and no backups (the schedule holds the others only, each weight
        // times: as long as the set by chance with primaries of weights 1 and 2 and a backup).
        let (i, j) = if self.schedule.len() == n && self.balanced == n {
            let i = (random as u32 as usize) % n;
            (i, (i + 1 + ((random >> 32) as usize) % (n - 1)) % n)
        } else {
            let draw = |bits: u64| usize::from(self.schedule[bits as usize % self.schedule.len()]);
            (draw(random as u32 as u64), draw(random >> 32))
        };
        let (a, b) = (&self.targets[i], &self.targets[j]);
        match (a.usable(), b.usable()) {
            (true, false) => return i,
            (false, true) => return j,
            _ => {}
        }
        // oa / wa <= ob / wb, without division (a weight of 0 counts as 1).
        let load = |t: &LiveTarget, other: &LiveTarget| {
            t.state.outstanding() * u64::from(other.weight.max(1))
        };
        if load(a, b) <= load(b, a) {
            i
        } else {
            j
        }
    }

    /// The first usable target not `tried` at or after `key` on the ring (the first
    /// target there when there is none).
    fn ring_walk(&self, key: u64, tried: Tried) -> Option<usize> {
        let start = self.ring.partition_point(|&(point, _)| point < key);
        let len = self.ring.len();
        let first = usize::from(self.ring[start % len].1);
        // The walk ends once it has met every target: with none usable (an outage) it would
        // otherwise go round the whole ring (100 points per unit of weight, up to 65,536),
        // for each request.
        let (mut met, mut distinct) = (Tried::default(), 0);
        for k in 0..len {
            let i = usize::from(self.ring[(start + k) % len].1);
            if self.targets[i].usable() && !tried.has(i) {
                return Some(i);
            }
            if !met.has(i) {
                met.add(i);
                distinct += 1;
                if distinct == self.balanced {
                    break;
                }
            }
        }
        Some(first)
    }

    /// How many targets are ejected now.
    pub fn ejected(&self) -> usize {
        self.targets.iter().filter(|t| t.state.is_ejected()).count()
    }
}

/// Smooth weighted round robin (as nginx does it), unrolled into one cycle so workers only
/// keep a counter: weights 5,1,1 give a a b a c a a.
pub fn smooth_wrr(targets: &[LiveTarget]) -> Box<[u16]> {
    let members: Vec<(usize, &LiveTarget)> = balanced(targets).collect();
    if members.is_empty() {
        return Box::new([0]);
    }
    let g = members.iter().fold(0, |g, (_, t)| gcd(g, t.weight.max(1)));
    let weights: Vec<i64> = members
        .iter()
        .map(|(_, t)| i64::from(t.weight.max(1) / g))
        .collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; members.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for k in 0..members.len() {
            current[k] += weights[k];
            if current[k] > current[best] {
                best = k;
            }
        }
        current[best] -= total;
        // Targets are capped at MAX_TARGETS (256), so the index fits.
        out.push(members[best].0 as u16);
    }
    out.into_boxed_slice()
}

/// The targets the balancer chooses among first, with their indices: those that are not
/// backups, or every target when all are.
fn balanced(targets: &[LiveTarget]) -> impl Iterator<Item = (usize, &LiveTarget)> {
    let all = targets.iter().all(|t| t.backup);
    targets
        .iter()
        .enumerate()
        .filter(move |(_, t)| all || !t.backup)
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A consistent-hash ring: each target owns points derived from its address only, so adding
/// or removing one target moves only the keys of its points (about 1/N of them).
fn ring(targets: &[LiveTarget]) -> Box<[(u64, u16)]> {
    if targets.is_empty() {
        return Box::new([]);
    }
    // Not reduced by the weights' common divisor: a target's points then depend only on its
    // own address and weight while the weights add up to at most MAX_POINTS / 100.
    let units: usize = balanced(targets)
        .map(|(_, t)| t.weight.max(1) as usize)
        .sum();
    let per_unit = (MAX_POINTS / units).clamp(1, POINTS_PER_WEIGHT);
    let mut ring = Vec::with_capacity(units * per_unit);
    for (i, t) in balanced(targets) {
        let name = t.addr.to_string();
        for k in 0..t.weight.max(1) as usize * per_unit {
            let mut h = hash_bytes(name.as_bytes());
            h = mix(h ^ k as u64);
            ring.push((h, i as u16));
        }
    }
    ring.sort_unstable();
    ring.into_boxed_slice()
}

/// A 64-bit hash of `bytes` for hash balancing (FNV-1a, then a finaliser so nearby keys land
/// far apart on the ring).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Circuit counters of one upstream on this node.
#[derive(Debug, Default)]
pub struct CircuitCounters {
    pub connections: AtomicU32,
    pub pending: AtomicU32,
    pub requests: AtomicU32,
    /// Requests refused, by reason: max_connections, max_pending, max_requests.
    pub rejected: [AtomicU64; 3],
}

/// Reasons in the order of [`CircuitCounters::rejected`].
pub const CIRCUIT_REASONS: [&str; 3] = ["max_connections", "max_pending", "max_requests"];

/// The retry budget: requests and retries over a sliding one-second window (this second's
/// counts plus the previous second's, weighted by how much of it the window still covers),
/// so the allowance does not drop to the floor at each second's start.
#[derive(Debug, Default)]
pub struct RetryBudget {
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
    prev_requests: AtomicU64,
    prev_retries: AtomicU64,
    /// Retries refused for want of budget.
    pub denied: AtomicU64,
}

impl RetryBudget {
    fn roll(&self, now_ms: u64) {
        let s = now_ms / 1000;
        let seen = self.second.load(Relaxed);
        // Only forwards: a worker with an older reading must not reset a newer second.
        if s > seen
            && self
                .second
                .compare_exchange(seen, s, Relaxed, Relaxed)
                .is_ok()
        {
            let (req, ret) = (
                self.requests.swap(0, Relaxed),
                self.retries.swap(0, Relaxed),
            );
            let adjacent = s == seen + 1;
            self.prev_requests
                .store(if adjacent { req } else { 0 }, Relaxed);
            self.prev_retries
                .store(if adjacent { ret } else { 0 }, Relaxed);
        }
    }

    /// Gives back a retry [`RetryBudget::try_retry`] took that was never sent (the circuit
    /// refused it, or its client left first). Taken from the current second's count: one
    /// taken just before a new second began stays counted in the last, a second at most.
    pub fn give_back(&self) {
        let _ = self
            .retries
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
    }

    /// A request (not a retry) to the upstream.
    pub fn note_request(&self, now_ms: u64) {
        self.roll(now_ms);
        self.requests.fetch_add(1, Relaxed);
    }

    /// Takes one retry from the budget if there is one: retries over the last second stay
    /// within `percent` of the requests over the last second, or `min_per_s`, whichever is
    /// more.
    pub fn try_retry(&self, now_ms: u64, percent: u32, min_per_s: u32) -> bool {
        self.roll(now_ms);
        let left = 1000 - now_ms % 1000;
        let window = |cur: &AtomicU64, prev: &AtomicU64| {
            cur.load(Relaxed) + prev.load(Relaxed) * left / 1000
        };
        let requests = window(&self.requests, &self.prev_requests);
        let allowed = (requests * u64::from(percent) / 100).max(u64::from(min_per_s));
        let used = self.prev_retries.load(Relaxed) * left / 1000;
        // Checked, then taken, in one step: an increment taken back after the check could
        // meet another worker's roll in between and wrap the count below zero.
        let taken = self.retries.fetch_update(Relaxed, Relaxed, |now| {
            (used.saturating_add(now) < allowed).then_some(now + 1)
        });
        if taken.is_err() {
            self.denied.fetch_add(1, Relaxed);
        }
        taken.is_ok()
    }
}

/// An upstream's live state: its current target set, and its circuit and budget counters.
/// The control plane keeps one per upstream id across config revisions.
#[derive(Debug, Default)]
pub struct UpstreamLive {
    pub set: ArcSwap<TargetSet>,
    pub circuit: CircuitCounters,
    pub budget: RetryBudget,
    /// When ([`now_ms`] + 1; 0: never) a failed TLS handshake with one of its targets was
    /// last logged: at most one line every few seconds per upstream, across workers.
    pub tls_logged_ms: AtomicU64,
}

impl UpstreamLive {
    pub fn new(set: TargetSet) -> Arc<UpstreamLive> {
        Arc::new(UpstreamLive {
            set: ArcSwap::from_pointee(set),
            circuit: CircuitCounters::default(),
            budget: RetryBudget::default(),
            tls_logged_ms: AtomicU64::new(0),
        })
    }

    /// Whether a TLS failure may be logged now: the first, and then one every `every_ms`
    /// (one caller wins a race).
    pub fn tls_log_due(&self, every_ms: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = now_ms() + 1;
        let last = self.tls_logged_ms.load(Relaxed);
        (last == 0 || now >= last + every_ms)
            && self
                .tls_logged_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }

    /// Replaces the target set (in-flight requests keep the one they picked from).
    pub fn publish(&self, set: TargetSet) {
        self.set.store(Arc::new(set));
        // Release: a worker that sees the new generation (Acquire) sees the new set.
        bump_generation();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> TargetSet {
        TargetSet::new(
            (0..n)
                .map(|i| LiveTarget {
                    addr: SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8], 80)),
                    weight: 1,
                    host: None,
                    draining: false,
                    backup: false,
                    state: TargetState::new(),
                })
                .collect(),
        )
    }

    fn pick(s: &TargetSet, balance: Balance, counter: u32, key: u64) -> usize {
        s.pick(&Pick {
            balance,
            counter,
            random: u64::from(counter).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            key,
            tried: Tried::default(),
            withdrawn: Tried::default(),
        })
        .unwrap()
    }

    #[test]
    fn round_robin_skips_targets_that_are_down_and_panics_when_all_are() {
        let s = set(3);
        s.targets[1].state.set_unhealthy(true);
        let got: Vec<usize> = (0..6)
            .map(|c| pick(&s, Balance::RoundRobin, c, 0))
            .collect();
        assert!(!got.contains(&1), "{got:?}");
        assert!(got.contains(&0) && got.contains(&2));
        s.targets[0].state.set_unhealthy(true);
        s.targets[2].state.set_unhealthy(true);
        // Panic mode: every target is down, requests still go to all of them in turn.
        let got: std::collections::HashSet<usize> = (0..3)
            .map(|c| pick(&s, Balance::RoundRobin, c, 0))
            .collect();
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn a_retry_goes_to_a_target_it_has_not_tried_while_there_is_one() {
        let s = set(3);
        for balance in [Balance::RoundRobin, Balance::LeastRequest, Balance::Hash] {
            for start in 0..50u32 {
                let mut tried = Tried::default();
                let mut seen = std::collections::HashSet::new();
                for _ in 0..3 {
                    let i = s
                        .pick(&Pick {
                            balance,
                            counter: start,
                            random: mix(u64::from(start)),
                            key: u64::from(start) * 7919,
                            tried,
                            withdrawn: Tried::default(),
                        })
                        .unwrap();
                    tried.add(i);
                    seen.insert(i);
                }
                assert_eq!(seen.len(), 3, "{balance:?} from {start}");
            }
        }
        // Every target down (panic mode), still each tried once before any again.
        for t in &s.targets {
            t.state.set_unhealthy(true);
        }
        let mut tried = Tried::default();
        for _ in 0..3 {
            let i = pick_tried(&s, Balance::Hash, 5, tried);
            assert!(!tried.has(i));
            tried.add(i);
        }
        // Beyond 64 targets too: target 64 is not target 0.
        let mut far = Tried::default();
        far.add(64);
        assert!(far.has(64) && !far.has(0) && !far.is_empty());
    }

    fn pick_tried(s: &TargetSet, balance: Balance, key: u64, tried: Tried) -> usize {
        s.pick(&Pick {
            balance,
            counter: 0,
            random: 0,
            key,
            tried,
            withdrawn: Tried::default(),
        })
        .unwrap()
    }

    #[test]
    fn the_share_of_a_target_that_is_down_spreads_over_the_others_by_weight() {
        let mut s = set(4);
        s.targets[3].weight = 2;
        let s = TargetSet::new(s.targets);
        s.targets[0].state.set_unhealthy(true);
        // Weights 1, 1, 1, 2: the down target's turns go 1:1:2 to the others.
        let mut share = [0usize; 4];
        for c in 0..50_000u32 {
            share[pick(&s, Balance::RoundRobin, c, 0)] += 1;
        }
        assert_eq!(share[0], 0);
        // Of 50,000 turns, 10,000 were the down target's: 2,500 + 2,500 + 5,000 of them.
        let expect = [0, 12_500, 12_500, 25_000];
        for i in 1..4 {
            assert!(share[i].abs_diff(expect[i]) < 800, "{share:?}");
        }
    }

    #[test]
    fn draining_targets_get_nothing_while_another_target_is_left() {
        let mut s = set(2);
        s.targets[0].draining = true;
        let s = TargetSet::new(s.targets);
        s.targets[1].state.set_unhealthy(true);
        // Even in panic mode a draining target is the last resort.
        assert!((0..4).all(|c| pick(&s, Balance::RoundRobin, c, 0) == 1));
    }

    #[test]
    fn least_request_prefers_the_less_loaded_of_two() {
        let s = set(2);
        for _ in 0..5 {
            s.targets[0].state.begin(0);
        }
        assert!((0..20).all(|c| pick(&s, Balance::LeastRequest, c, 0) == 1));
        for _ in 0..10 {
            s.targets[1].state.begin(1);
        }
        assert!((0..20).all(|c| pick(&s, Balance::LeastRequest, c, 0) == 0));
    }

    #[test]
    fn backups_get_requests_only_when_the_others_cannot_take_them() {
        // Targets 0 and 1, and 2 a backup (weight 5: weights do not make it a first choice).
        let mut s = set(3);
        s.targets[2].backup = true;
        s.targets[2].weight = 5;
        let s = TargetSet::new(s.targets);
        let picks = |s: &TargetSet, balance, tried: Tried| -> std::collections::HashSet<usize> {
            (0..300u32)
                .map(|c| {
                    s.pick(&Pick {
                        balance,
                        counter: c,
                        random: mix(u64::from(c)),
                        key: mix(u64::from(c) + 7),
                        tried,
                        withdrawn: Tried::default(),
                    })
                    .unwrap()
                })
                .collect()
        };
        let all = [Balance::RoundRobin, Balance::LeastRequest, Balance::Hash];
        for balance in all {
            assert_eq!(
                picks(&s, balance, Tried::default()),
                [0, 1].into(),
                "{balance:?}"
            );
        }
        // A retry once both were tried: the backup, before either of them again (nginx).
        let mut both = Tried::default();
        both.add(0);
        both.add(1);
        for balance in all {
            assert_eq!(picks(&s, balance, both), [2].into(), "{balance:?}");
        }
        // One of them down: the other; both down: the backup.
        s.targets[0].state.set_unhealthy(true);
        for balance in all {
            assert_eq!(
                picks(&s, balance, Tried::default()),
                [1].into(),
                "{balance:?}"
            );
        }
        s.targets[1].state.set_unhealthy(true);
        for balance in all {
            assert_eq!(
                picks(&s, balance, Tried::default()),
                [2].into(),
                "{balance:?}"
            );
        }
        // Every one down (panic mode): the others first.
        s.targets[2].state.set_unhealthy(true);
        for balance in all {
            let got = picks(&s, balance, Tried::default());
            assert!(!got.contains(&2), "{balance:?}: {got:?}");
        }
    }

    #[test]
    fn least_request_never_draws_a_backup_whose_set_is_as_long_as_the_schedule() {
        // Weights 1 and 2 and a backup: the schedule (1 + 2) is as long as the set, which
        // was taken for equal weights, and a third of the draws went to the backup.
        let mut s = set(3);
        s.targets[1].weight = 2;
        s.targets[2].backup = true;
        let s = TargetSet::new(s.targets);
        let mut share = [0usize; 3];
        for c in 0..30_000u32 {
            share[pick(&s, Balance::LeastRequest, c, 0)] += 1;
        }
        assert_eq!(share[2], 0, "{share:?}");
        assert!(share[0].abs_diff(10_000) < 1_000, "{share:?}");
    }

    #[test]
    fn least_request_shares_by_weight_when_nothing_is_outstanding() {
        // Requests one at a time: nothing is ever outstanding, and the heavier target took
        // every request.
        let mut s = set(3);
        s.targets[1].weight = 2;
        s.targets[2].weight = 3;
        let s = TargetSet::new(s.targets);
        let mut share = [0usize; 3];
        for c in 0..60_000u32 {
            share[s
                .pick(&Pick {
                    balance: Balance::LeastRequest,
                    counter: c,
                    random: mix(u64::from(c)),
                    key: 0,
                    tried: Tried::default(),
                    withdrawn: Tried::default(),
                })
                .unwrap()] += 1;
        }
        for (got, want) in share.iter().zip([10_000, 20_000, 30_000]) {
            assert!(got.abs_diff(want) < 1_000, "{share:?}");
        }
        // Under load, the fewer outstanding per unit of weight still wins.
        for _ in 0..9 {
            s.targets[2].state.begin(2);
        }
        for _ in 0..2 {
            s.targets[1].state.begin(1);
        }
        let mut share = [0usize; 3];
        for c in 0..30_000u32 {
            share[pick(&s, Balance::LeastRequest, c, 0)] += 1;
        }
        // Per unit of weight, target 0 (0 outstanding of weight 1) gets the most, then 1 (2
        // of 2), then 2 (9 of 3), which loses every comparison.
        assert!(
            share[0] > share[1] / 2 && share[1] / 2 > share[2] / 3,
            "{share:?}"
        );
        // It gets only the draws of it twice: (3/6)^2 of them.
        assert!(share[2].abs_diff(30_000 / 4) < 500, "{share:?}");
    }

    #[test]
    fn hashing_is_stable_and_removing_one_of_ten_moves_about_a_tenth() {
        let ten = set(10);
        let keys: Vec<u64> = (0..10_000u32)
            .map(|k| hash_bytes(format!("user-{k}").as_bytes()))
            .collect();
        let before: Vec<SocketAddr> = keys
            .iter()
            .map(|&k| ten.targets[pick(&ten, Balance::Hash, 0, k)].addr)
            .collect();
        let again: Vec<SocketAddr> = keys
            .iter()
            .map(|&k| ten.targets[pick(&ten, Balance::Hash, 7, k)].addr)
            .collect();
        assert_eq!(before, again, "the same key reaches the same target");
        let nine = TargetSet::new(ten.targets[..9].to_vec());
        let moved = keys
            .iter()
            .zip(&before)
            .filter(|(&k, &was)| nine.targets[pick(&nine, Balance::Hash, 0, k)].addr != was)
            .count();
        // Only the removed target's keys move: about 1/10 of them.
        assert!((700..1300).contains(&moved), "{moved} of 10000 moved");
        let removed = ten.targets[9].addr;
        assert_eq!(moved, before.iter().filter(|&&a| a == removed).count());
    }

    #[test]
    fn adding_a_lighter_target_moves_no_key_between_the_others() {
        let weighted = |weights: &[u32]| {
            TargetSet::new(
                weights
                    .iter()
                    .enumerate()
                    .map(|(i, &weight)| LiveTarget {
                        addr: SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)),
                        weight,
                        host: None,
                        draining: false,
                        backup: false,
                        state: TargetState::new(),
                    })
                    .collect(),
            )
        };
        let (two, three) = (weighted(&[2, 2]), weighted(&[2, 2, 1]));
        for k in 0..5_000u32 {
            let key = hash_bytes(&k.to_be_bytes());
            let after = three.targets[pick(&three, Balance::Hash, 0, key)].addr;
            let before = two.targets[pick(&two, Balance::Hash, 0, key)].addr;
            assert!(
                after == before || after == three.targets[2].addr,
                "key {k} moved"
            );
        }
    }

    #[test]
    fn failures_while_ejected_do_not_count_towards_the_next_ejection() {
        let s = set(2);
        let p = Passive {
            consecutive_failures: 2,
            ejection_ms: 100,
            max_ejected_percent: 50,
        };
        let t = &s.targets[0].state;
        t.failed(Some(&p), &s, 0);
        assert!(t.failed(Some(&p), &s, 0));
        // In-flight requests failing after the ejection.
        assert!(!t.failed(Some(&p), &s, 10) && !t.failed(Some(&p), &s, 20));
        assert!(t.expire(100));
        assert_eq!(t.consecutive_failures(), 0);
        assert!(
            !t.failed(Some(&p), &s, 150),
            "one failure is not two in a row"
        );
    }

    #[test]
    fn passive_ejection_respects_the_threshold_the_cap_and_grows() {
        let s = set(3);
        let p = Passive {
            consecutive_failures: 2,
            ejection_ms: 1000,
            max_ejected_percent: 50,
        };
        let t0 = &s.targets[0].state;
        assert!(!t0.failed(Some(&p), &s, 0));
        assert!(t0.failed(Some(&p), &s, 0), "second failure in a row ejects");
        assert!(t0.is_ejected());
        // 50% of 3 is one target: the second is not ejected.
        let t1 = &s.targets[1].state;
        assert!(!t1.failed(Some(&p), &s, 0) && !t1.failed(Some(&p), &s, 0));
        assert!(!t1.is_ejected());
        assert!(!t0.expire(999) && t0.expire(1000));
        // Ejected again soon after: twice as long.
        t0.failed(Some(&p), &s, 1500);
        assert!(t0.failed(Some(&p), &s, 1500));
        assert!(!t0.expire(3499) && t0.expire(3500));
        assert_eq!(t0.ejections(), 2);
        // A success ends a streak of failures.
        t1.succeeded();
        assert_eq!(t1.consecutive_failures(), 0);
    }

    #[test]
    fn workers_failing_different_targets_at_once_never_eject_past_the_cap() {
        // Each thread is a worker whose target fails at the same moment as the others'. The
        // count of ejected targets and the ejection were two steps: two workers could both
        // see room for one more and both eject.
        let s = set(4);
        let p = Passive {
            consecutive_failures: 1,
            ejection_ms: 1000,
            max_ejected_percent: 25,
        };
        let start = std::sync::Barrier::new(4);
        let mut most = 0;
        for round in 0..500u64 {
            let now = round * 10_000;
            let ejected: usize = std::thread::scope(|sc| {
                let threads: Vec<_> = (0..4)
                    .map(|i| {
                        let (s, p, start) = (&s, &p, &start);
                        sc.spawn(move || {
                            start.wait();
                            usize::from(s.targets[i].state.failed(Some(p), s, now))
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).sum()
            });
            most = most.max(ejected);
            assert!(
                ejected <= 1,
                "round {round}: {ejected} of 4 ejected, the cap is 1"
            );
            for t in &s.targets {
                t.state.expire(now + 5_000);
            }
        }
        assert_eq!(most, 1, "every round ejects one target");
    }

    #[test]
    fn the_retry_budget_allows_a_percentage_over_a_sliding_second_with_a_floor() {
        let b = RetryBudget::default();
        for _ in 0..100 {
            b.note_request(5_000);
        }
        let granted = (0..50).filter(|_| b.try_retry(5_100, 20, 3)).count();
        assert_eq!(granted, 20);
        // Half a second later the window still holds half of the last second: 50 requests
        // and 10 retries, so 10 - 10 = 0 more, and then the floor of 3 would be exceeded too.
        let granted = (0..50).filter(|_| b.try_retry(6_500, 20, 3)).count();
        assert_eq!(granted, 0);
        // Two seconds on, nothing is left of it: the floor.
        let granted = (0..50).filter(|_| b.try_retry(8_000, 20, 3)).count();
        assert_eq!(granted, 3);
        assert_eq!(b.denied.load(Relaxed), 30 + 50 + 47);
        // A stale reading does not reset a newer second.
        b.note_request(7_000);
        assert_eq!(b.second.load(Relaxed), 8);
        // A retry given back (never sent) leaves room for another; no more than was taken.
        b.give_back();
        assert!(b.try_retry(8_000, 20, 3));
        assert!(!b.try_retry(8_000, 20, 3));
        let fresh = RetryBudget::default();
        fresh.give_back();
        assert_eq!(fresh.retries.load(Relaxed), 0);
    }

    #[test]
    fn retries_refused_while_other_workers_roll_the_second_never_wrap_the_count() {
        // Workers refused a retry while others move the budget to a new second: the count
        // of this second's retries must stay a count (it wrapped below zero when a refusal's
        // increment was taken back after a roll had reset it, and the next look overflowed).
        let b = Arc::new(RetryBudget::default());
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for i in 0..200_000u64 {
                        // Now and then a worker is a second ahead of the others.
                        let now = 1_000 * (i / 500) + if i % 7 == w { 1_000 } else { 0 };
                        assert!(!b.try_retry(now, 0, 0));
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("no worker panicked");
        }
        assert!(b.retries.load(Relaxed) < 1_000_000, "{b:?}");
        assert_eq!(b.denied.load(Relaxed), 800_000);
        // And within one second, four workers' 1,000 tries each get exactly the allowance
        // (the floor, 1,000): a refusal's count never stands in another's way.
        let b = Arc::new(RetryBudget::default());
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    (0..1_000).filter(|_| b.try_retry(5_000, 0, 1_000)).count()
                })
            })
            .collect();
        let granted: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
        assert_eq!(granted, 1_000);
        assert_eq!(b.denied.load(Relaxed), 3_000);
    }
}
