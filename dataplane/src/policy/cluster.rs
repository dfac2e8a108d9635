//! Cluster-wide rate limits (`scope = "cluster"`): the nodes sharing `[cluster] redis` admit
//! one limit together, without a Redis round trip on a worker.
//!
//! Each key's bucket lives in Redis as a GCRA arrival time on Redis's clock. A node holds,
//! per key, an *allowance*: how many requests it may still admit before it hears from Redis
//! again. A worker's check is one atomic decrement of it. A background thread (`gw-cluster`)
//! reconciles every `[cluster] sync_ms` (5 ms by default): for each key used lately it sends
//! the requests this node admitted (and saw) since the last round, and one Lua script, atomic
//! in Redis, adds the admitted ones to the key's arrival time and answers the key's headroom
//! (the requests the bucket would admit now) and how many nodes want the key (saw requests for
//! it in the last four rounds). The node's new allowance is the headroom plus what the bucket
//! refills until the next round, divided by the nodes that want the key: the nodes together
//! take what the bucket holds, and a node that carries the load alone gets all of it.
//!
//! The error, in requests: a key a node has not used for as long as its bucket takes to
//! fill (`burst` emissions, at least a second) starts with an allowance of `burst / live
//! nodes` before its first round there (more than the cluster had if other nodes emptied the
//! bucket meanwhile); one used within that time starts from what its last round left plus
//! its part of the refill since, and at most `burst / live nodes` once it has been unused
//! for four rounds (Redis has stopped counting the node as wanting it); when the load moves
//! to another node, the old one still counts as wanting the key for four rounds. Measured by the three-node tests (README).
//!
//! While Redis cannot be reached (a round failed, or no reply came for ten intervals),
//! `on_store_error` decides: `allow` admits, `deny` refuses with 503, `local` applies the
//! limit on this node alone (the node-scoped buckets). Counts made while Redis was away are
//! dropped, not charged when it returns; the shares are kept, so a key resumes from what it
//! had left (and its refill since).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use common::config::StoreErrorMode;
use common::snapshot::RedisAddr;
use common::Snapshot;
use dashmap::DashMap;

use super::ratelimit::{Decision, Key, Limit, Limiter, Registry};

/// The store's state, as the last round found it.
const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;
static STORE: AtomicU8 = AtomicU8::new(UNKNOWN);
/// When the call a round waits on went to Redis (the limiters' clock; 0: none waits), and
/// the interval rounds run at: a store that has not answered a call for ten intervals (at
/// least 250 ms) counts as down even while the round still waits for it. Only a wait counts:
/// a round busy with many keys of its own, or asleep between rounds, is no outage (before,
/// the time since the last answer counted, so that a flood of new keys, whose sorting took
/// longer than that, switched `on_store_error` on for every cluster policy).
static WAITING_SINCE_NS: AtomicU64 = AtomicU64::new(0);
/// The longest a call waited for its answer since the reconciling thread last looked.
static LONGEST_WAIT_NS: AtomicU64 = AtomicU64::new(0);
static SYNC_NS: AtomicU64 = AtomicU64::new(5_000_000);
/// Nodes that reconciled in the last 3 s, this one included.
static LIVE_NODES: AtomicU32 = AtomicU32::new(1);

/// Keys not used for this long stop being reconciled; past their bucket's fill time too, they
/// restart from a fresh allowance.
const IDLE_NS: u64 = 1_000_000_000;
/// Keys sent to Redis in one script call.
const BATCH: usize = 500;
/// Script calls per policy and round, at most.
const ROUND_BATCHES: usize = 4;

/// The key of a route-scoped policy's single bucket.
const ROUTE_KEY: Key = [0; 32];
/// The key every new key shares while the map is full.
const OVERFLOW_KEY: Key = [0xfe; 32];

/// One key's share on this node.
#[derive(Debug, Default)]
struct Share {
    /// Requests this node may still admit before the next round (may go below 0 by a few
    /// in races; below 1 refuses).
    allowance: AtomicI64,
    /// Requests admitted since the last round.
    spent: AtomicU64,
    /// Requests refused since the last round (with `spent`: the node's demand).
    refused: AtomicU64,
    /// When the key was last checked (the caller's clock), 0 before its first use.
    active_ns: AtomicU64,
    /// How long after its last use the share is kept: its limit's fill time, at least
    /// [`IDLE_NS`]. Dropped sooner, a key could start over from a full allowance each time
    /// and pass its limit by pausing.
    horizon_ns: AtomicU64,
    /// When the key's bucket is full again, as its last round found it (the limiters' clock;
    /// 0: no round yet). An idle key starts afresh from then (not after its horizon), and is
    /// kept until then: a bucket that requests of several nodes put in debt (each starting
    /// with at least one while `burst` is below the live nodes) is not taken for full again
    /// after one fill time, over and over.
    full_at_ns: AtomicU64,
    /// In the next round's list ([`DIRTY`], see [`ClusterShares::dirty`]), in the backlog
    /// ([`BACKLOG`]), or in neither ([`IDLE`]).
    queued: AtomicU8,
    /// It has a place in the backlog's queue (one at most, whatever its state now).
    in_backlog: std::sync::atomic::AtomicBool,
}

/// [`Share::queued`]'s states.
const IDLE: u8 = 0;
const DIRTY: u8 = 1;
const BACKLOG: u8 = 2;

/// A cluster-scoped limiter's state on this node.
#[derive(Debug)]
pub struct ClusterShares {
    pub mode: StoreErrorMode,
    shares: DashMap<Key, Share>,
    max_keys: usize,
    /// When a full map may next be swept of idle keys (at most once per 100 ms, so a flood
    /// of new keys does not make every request scan the map).
    next_sweep_ns: AtomicU64,
    /// The keys that saw requests since the last round: a round visits only these, so its
    /// cost follows the traffic, not the number of keys held.
    dirty: std::sync::Mutex<Vec<Key>>,
    /// Keys with counts not sent yet that did not fit in their round (more keys than
    /// [`ROUND_BATCHES`] calls take), first come first sent once the round's dirty keys are.
    /// A key that sees a request meanwhile is dirty again and goes with the next round.
    backlog: std::sync::Mutex<std::collections::VecDeque<Key>>,
}

impl ClusterShares {
    pub fn new(mode: StoreErrorMode, max_keys: usize) -> ClusterShares {
        ClusterShares {
            mode,
            shares: DashMap::new(),
            max_keys,
            next_sweep_ns: AtomicU64::new(0),
            dirty: std::sync::Mutex::new(Vec::new()),
            backlog: std::sync::Mutex::new(std::collections::VecDeque::new()),
        }
    }

    /// Whether the store is down (a check then follows `mode`): the last round failed, or a
    /// call has waited for its answer for ten intervals (at least 250 ms).
    pub fn store_down() -> bool {
        match STORE.load(Ordering::Relaxed) {
            DOWN => true,
            // Not known yet (the first round's connect or call still under way): a Redis that
            // hangs from the start is down as one that hangs later is (before, requests were
            // admitted under `deny` for as long as the first call waited).
            UP | UNKNOWN => match WAITING_SINCE_NS.load(Ordering::Relaxed) {
                0 => false,
                since => super::ratelimit::now_ns().saturating_sub(since) > silence_ns(),
            },
            _ => false,
        }
    }

    /// Checks one request against this node's share of the key's cluster bucket.
    pub fn check(&self, limit: &Limit, key: Option<&Key>, now_ns: u64) -> Decision {
        let key = key.unwrap_or(&ROUTE_KEY);
        let left = match self.shares.get(key) {
            Some(share) => self.take_and_queue(&share, key, limit, now_ns),
            None => {
                let key = if self.shares.len() >= self.max_keys && !self.sweep(now_ns) {
                    // Still full: new keys share one bucket until room appears.
                    &OVERFLOW_KEY
                } else {
                    key
                };
                let share = self.shares.entry(*key).or_default();
                self.take_and_queue(&share, key, limit, now_ns)
            }
        };
        if let Some(left) = left {
            // What this node may still admit before its next round (its part of the
            // cluster's headroom: at most what the cluster has), and the time the bucket
            // takes to refill what this node's part is short of its part of a full bucket
            // (0 when it holds that: with several nodes, never the whole burst).
            let live = u64::from(LIVE_NODES.load(Ordering::Relaxed).max(1));
            return Decision {
                remaining: Some(left),
                reset_ns: limit
                    .burst
                    .saturating_sub(left.saturating_mul(live))
                    .saturating_mul(limit.emission_ns()),
                ..Decision::admitted()
            };
        }
        // The next round may bring more: a client is told to come back after one emission
        // interval (Retry-After rounds it up to whole seconds).
        Decision::refused(limit.period_ns / limit.rate)
    }
}

impl ClusterShares {
    /// Gives back one request [`ClusterShares::check`] admitted for `key` (another limit
    /// refused it), unless a round has charged it to Redis already: it stays the node's
    /// demand, as a refused request is.
    pub fn give_back(&self, key: Option<&Key>) {
        let key = key.unwrap_or(&ROUTE_KEY);
        let Some(share) = self
            .shares
            .get(key)
            .or_else(|| self.shares.get(&OVERFLOW_KEY))
        else {
            return;
        };
        let uncharged = share
            .spent
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| s.checked_sub(1));
        if uncharged.is_ok() {
            share.allowance.fetch_add(1, Ordering::AcqRel);
            share.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// [`take`], and the key into the next round's list if it is not there yet.
    fn take_and_queue(&self, share: &Share, key: &Key, limit: &Limit, now_ns: u64) -> Option<u64> {
        let allowed = take(share, limit, now_ns);
        if share.queued.swap(DIRTY, Ordering::AcqRel) != DIRTY {
            self.dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(*key);
        }
        allowed
    }

    /// Drops the idle keys of a full map, at most once per 100 ms (and as
    /// [`super::ratelimit::spaced_sweep`] spaces them); whether there is room now.
    fn sweep(&self, now_ns: u64) -> bool {
        super::ratelimit::spaced_sweep(&self.next_sweep_ns, now_ns, 100_000_000, || {
            self.shares.retain(|_, s| fresh(s, now_ns));
        });
        self.shares.len() < self.max_keys
    }
}

/// Whether the share was used within its horizon (see [`Share::horizon_ns`]), or its bucket
/// is not full again yet (see [`Share::full_at_ns`]).
fn fresh(s: &Share, now_ns: u64) -> bool {
    let horizon = s.horizon_ns.load(Ordering::Relaxed).max(IDLE_NS);
    now_ns.saturating_sub(s.active_ns.load(Ordering::Relaxed)) < horizon
        || now_ns < s.full_at_ns.load(Ordering::Relaxed)
        // Counts waiting in the backlog to be sent.
        || s.queued.load(Ordering::Relaxed) == BACKLOG
}

/// How long after its last demand for a key Redis counts a node as wanting it: four rounds,
/// at least 20 ms.
fn wanting_window(sync: Duration) -> Duration {
    (sync * 4).max(Duration::from_millis(20))
}

/// [`wanting_window`] at the current interval, in the limiters' clock.
fn wanting_window_ns() -> u64 {
    let sync = Duration::from_nanos(SYNC_NS.load(Ordering::Relaxed));
    u64::try_from(wanting_window(sync).as_nanos()).unwrap_or(u64::MAX)
}

/// Takes one request from `share`. A share idle for [`IDLE_NS`] (no longer reconciled) first
/// gets its allowance back: `burst / live nodes` (at least one) once its bucket is full again
/// as its last round found it (without one, after the bucket's fill time), or at its first
/// use; else what it had plus its part of the refill since. `Some`: admitted, with what is
/// left of the allowance; `None`: refused.
fn take(share: &Share, limit: &Limit, now_ns: u64) -> Option<u64> {
    let last = share.active_ns.swap(now_ns, Ordering::Relaxed);
    let idle = now_ns.saturating_sub(last);
    if idle >= IDLE_NS {
        let horizon = limit.tolerance_ns().max(IDLE_NS);
        share.horizon_ns.store(horizon, Ordering::Relaxed);
        let live = u64::from(LIVE_NODES.load(Ordering::Relaxed).max(1));
        let full = (limit.burst / live).max(1);
        // As the key's last round found its bucket, else after the bucket's fill time.
        let full_again = match share.full_at_ns.load(Ordering::Relaxed) {
            0 => idle >= horizon,
            at => now_ns >= at,
        };
        let start = if last == 0 || full_again {
            full
        } else {
            let left = u64::try_from(share.allowance.load(Ordering::Acquire)).unwrap_or(0);
            let refilled = idle / limit.emission_ns().max(1) / live;
            left.saturating_add(refilled).min(full)
        };
        share
            .allowance
            .store(i64::try_from(start).unwrap_or(i64::MAX), Ordering::Relaxed);
        // `spent` stays: requests admitted and not yet charged (a round that failed put them
        // back) go with the next round; reset, an outage longer than IDLE_NS lost them.
    } else if last != 0 && idle >= wanting_window_ns() {
        // Redis no longer counts this node as wanting the key (it sent no demand for it in
        // the last four rounds), so the other nodes have been given the bucket's headroom
        // meanwhile: what this node's last round left it is capped as a fresh start is (at
        // its share of a full bucket) until its next round says what is left. Before, a
        // node that got the whole headroom while alone spent it again on its return.
        let live = u64::from(LIVE_NODES.load(Ordering::Relaxed).max(1));
        let cap = i64::try_from((limit.burst / live).max(1)).unwrap_or(i64::MAX);
        let _ = share
            .allowance
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                (a > cap).then_some(cap)
            });
    }
    // Taken only while at least one is left (a refusal leaves the allowance alone, so a
    // round setting it meanwhile is not undone).
    let mut left = share.allowance.load(Ordering::Acquire);
    loop {
        if left < 1 {
            share.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match share.allowance.compare_exchange_weak(
            left,
            left - 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                share.spent.fetch_add(1, Ordering::Relaxed);
                return Some(u64::try_from(left - 1).unwrap_or(0));
            }
            Err(now) => left = now,
        }
    }
}

/// The Lua script of a round: KEYS are the live-node set, then the buckets; ARGV the node id,
/// the emission interval and the tolerance (microseconds, fractional), how long a node counts
/// as wanting a key after it last did (microseconds), then per key the requests this node
/// admitted and the requests it saw (admitted or not). It answers the live node count, then
/// per key its headroom (below 0 for a bucket in debt), the number of nodes that want it
/// (this one counted once, whether it does or not), and the microseconds until the bucket is
/// full again. Times count from 2026-01-01 so a double keeps them to well under a
/// microsecond.
///
/// A bucket's key expires a second after the bucket is full again (its arrival time passed,
/// it holds nothing a fresh one does not; before, a whole fill time later, so that a limit
/// per client held a hundred times the memory in Redis it needs), and its `:nodes` set of the
/// nodes that want it with it, or when no node counts as wanting it any more.
///
/// A key that holds something no gateway wrote (another type, a value that is no time) is
/// replaced rather than failing the script: a script that stops half way has charged the
/// keys before it, and one such key would fail every round, for every key.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1767225600) * 1000000 + tonumber(t[2])
local function trim(key, before)
  if type(redis.pcall('ZREMRANGEBYSCORE', key, '-inf', before)) == 'table' then
    redis.call('DEL', key)
  end
end
trim(KEYS[1], now - 3000000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], 60000)
local live = redis.call('ZCARD', KEYS[1])
local emission = tonumber(ARGV[2])
local tolerance = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local out = {live}
for i = 2, #KEYS do
  local spent = tonumber(ARGV[2 * i + 1])
  local demand = tonumber(ARGV[2 * i + 2])
  local got = redis.pcall('GET', KEYS[i])
  local tat = type(got) == 'string' and tonumber(got) or now
  if tat ~= tat or tat < now or tat > now + 1e18 then tat = now end
  tat = tat + spent * emission
  local ttl = math.floor((tat - now) / 1000) + 1000
  redis.call('SET', KEYS[i], string.format('%.3f', tat), 'PX', string.format('%d', ttl))
  local headroom = math.floor((now + tolerance - tat) / emission)
  local wanting = KEYS[i] .. ':nodes'
  trim(wanting, now - window)
  if demand > 0 then redis.call('ZADD', wanting, now, ARGV[1]) end
  redis.call('PEXPIRE', wanting, math.max(ttl, math.floor(window / 1000) + 1000))
  local active = redis.call('ZCARD', wanting)
  if not redis.call('ZSCORE', wanting, ARGV[1]) then active = active + 1 end
  out[3 * i - 4] = headroom
  out[3 * i - 3] = active
  out[3 * i - 2] = math.floor(tat - now)
end
return out
"#;

/// The store as the last round found it, for `/v1/status`: `"up"`, `"down"` (the last round
/// failed, or no reply came for ten intervals) or `"unknown"` (no round yet), and the live
/// nodes the last successful round counted.
pub fn store_state() -> (&'static str, u32) {
    let state = if ClusterShares::store_down() {
        "down"
    } else if STORE.load(Ordering::Relaxed) == UP {
        "up"
    } else {
        "unknown"
    };
    (state, LIVE_NODES.load(Ordering::Relaxed))
}

/// Starts the thread that reconciles cluster-scoped limits with Redis (it idles while the
/// config has no `[cluster] redis`).
pub fn start(config: Arc<ArcSwap<Snapshot>>) {
    static STARTED: OnceLock<()> = OnceLock::new();
    if STARTED.set(()).is_err() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("gw-cluster".into())
        .spawn(move || reconcile_forever(&config));
    if let Err(e) = spawned {
        log::error!("cluster rate limits: cannot start their thread: {e}");
    }
}

/// The least time between two log lines of one Redis outage whose reason changed.
const REASON_RELOG: Duration = Duration::from_secs(2);
/// The least time between two log lines of answers that came late.
const SLOW_RELOG: Duration = Duration::from_secs(60);

fn reconcile_forever(config: &ArcSwap<Snapshot>) {
    let mut conn: Option<(RedisAddr, Redis)> = None;
    let mut last_start: Option<Instant> = None;
    // The failure last logged, and when: an outage is logged when it starts and again when
    // its reason changes (a password refused once the network is back), at most every
    // REASON_RELOG, as a reason that quotes changing details must not log every round.
    let mut logged: Option<(String, Instant)> = None;
    let mut slow_logged: Option<Instant> = None;
    loop {
        let snap = config.load_full();
        let Some((cluster, addr)) = snap
            .cluster
            .as_ref()
            .and_then(|c| Some((c, c.redis.clone()?)))
        else {
            conn = None;
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let started = Instant::now();
        SYNC_NS.store(cluster.sync.as_nanos() as u64, Ordering::Relaxed);
        // What the buckets refill between two rounds: the interval as it really is when
        // rounds run late.
        let interval = last_start.map_or(cluster.sync, |l| {
            started.duration_since(l).max(cluster.sync)
        });
        last_start = Some(started);
        // Why the round failed, for the log: a refused password or a script error must
        // not read as a network outage.
        let mut why = String::new();
        if conn.as_ref().is_none_or(|(a, _)| *a != addr) {
            // Its handshake (AUTH, SELECT) is a call waited on too.
            conn = match waited(|| Redis::connect(&addr)) {
                Ok(r) => Some((addr.clone(), r)),
                Err(e) => {
                    why = format!("cannot connect: {}", reason(&e));
                    None
                }
            };
        }
        let ok = match conn.as_mut() {
            Some((_, redis)) => {
                let node = &cluster.node_id;
                // A bug hit here must not end reconciliation for good: the round fails.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    round(redis, node, interval)
                })) {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        why = reason(&e);
                        false
                    }
                    Err(_) => {
                        why = "a round panicked (message above)".to_owned();
                        false
                    }
                }
            }
            None => false,
        };
        // A call that waited past the silence bound had `on_store_error` apply meanwhile,
        // though the round went on: said too (before, such a stall left no trace), at most
        // once a minute.
        let longest = LONGEST_WAIT_NS.swap(0, Ordering::Relaxed);
        if ok
            && longest > silence_ns()
            && slow_logged.is_none_or(|at: Instant| at.elapsed() >= SLOW_RELOG)
        {
            log::warn!(
                "cluster rate limits: Redis at {} took {} ms to answer (the bound is {} ms); \
                 on_store_error applied meanwhile",
                addr.address,
                longest / 1_000_000,
                silence_ns() / 1_000_000
            );
            slow_logged = Some(Instant::now());
        }
        let before = STORE.swap(if ok { UP } else { DOWN }, Ordering::Relaxed);
        if !ok {
            conn = None;
            let changed = logged
                .as_ref()
                .is_some_and(|(last, at)| *last != why && at.elapsed() >= REASON_RELOG);
            if before != DOWN || changed {
                log::warn!(
                    "cluster rate limits: Redis at {} failed ({why}); on_store_error applies",
                    addr.address
                );
                logged = Some((why, Instant::now()));
            }
            // The shares stay as the last round left them: when Redis is back, a key
            // exhausted before the outage starts from what it had (plus its part of the
            // refill since, as a key idle that long does), not from a fresh share of the
            // whole burst. Clearing them admitted `burst / live nodes` more per key after
            // every failed round, even for a key over its limit.
        } else if before == DOWN {
            log::info!("cluster rate limits: Redis at {} is back", addr.address);
            logged = None;
        }
        let pause = if ok {
            cluster.sync
        } else {
            cluster.sync.max(Duration::from_millis(100))
        };
        std::thread::sleep(pause.saturating_sub(started.elapsed()));
    }
}

/// One round over every cluster-scoped limiter: their recently used keys' counts go to
/// Redis, their allowances come back.
/// `interval`: the time between rounds (for the buckets' refill and how long a node counts
/// as wanting a key).
fn round(redis: &mut Redis, node: &str, interval: Duration) -> std::io::Result<()> {
    let now = super::ratelimit::now_ns();
    let limiters = Registry::global().cluster_limiters();
    let mut sent_any = false;
    for (id, limiter) in &limiters {
        let Some(c) = &limiter.cluster else { continue };
        let batch = next_batch(c);
        if now >= c.next_sweep_ns.load(Ordering::Relaxed) {
            // Idle keys go now and then, not every round.
            c.next_sweep_ns.store(now + IDLE_NS, Ordering::Relaxed);
            c.shares.retain(|_, s| fresh(s, now));
        }
        for (n, chunk) in batch.chunks(BATCH).enumerate() {
            let args = script_args(id, &limiter.limit, node, interval, chunk);
            let answer = match eval_waited(redis, &args) {
                Ok(answer) => answer,
                Err(e) => {
                    // Admitted here, and Redis did not run the script (the connection was
                    // gone): back into their shares for the next round that reaches it
                    // (before, lost: those requests were admitted on top of the limit). A
                    // reply late or malformed may follow a run: not put back, or a slow
                    // Redis would have them charged again at every round.
                    let unsent = match not_run(&e) {
                        true => n * BATCH,
                        false => (n + 1) * BATCH,
                    };
                    restore(c, batch.get(unsent..).unwrap_or_default());
                    return Err(e);
                }
            };
            sent_any = true;
            if let Err(e) = apply(c, &limiter.limit, interval, now, chunk, &answer) {
                restore(c, batch.get((n + 1) * BATCH..).unwrap_or_default());
                return Err(e);
            }
        }
    }
    if !sent_any {
        // Keeps this node counted as live, and checks the connection.
        let idle = Limit::new(1, 1, 1).expect("valid");
        let answer = eval_waited(redis, &script_args("-", &idle, node, interval, &[]))?;
        if let Some(Reply::Int(n)) = answer.first() {
            LIVE_NODES.store(u32::try_from(*n).unwrap_or(1).max(1), Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Whether a command that failed so cannot have run: Redis refused it (an error reply), or
/// the connection was closed or reset before any of the reply came (Redis dropped it, or went
/// away), or the command was never written.
fn not_run(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    refused(e)
        || matches!(
            e.kind(),
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected
        )
}

/// Whether `e` is Redis's error reply to a command.
fn refused(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Refused>())
}

/// Redis's error reply to a command, which it did not run.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Puts the counts of a round's keys that did not reach Redis back into their shares, and
/// the keys back into the next round's list.
fn restore(c: &ClusterShares, unsent: &[(Key, u64, u64)]) {
    for &(key, spent, demand) in unsent {
        // Swept meanwhile (idle past its horizon through an outage): made again, holding
        // its counts for the next round.
        let s = c.shares.entry(key).or_default();
        s.spent.fetch_add(spent, Ordering::AcqRel);
        s.refused.fetch_add(demand - spent, Ordering::AcqRel);
        if s.queued.swap(DIRTY, Ordering::AcqRel) != DIRTY {
            c.dirty.lock().unwrap_or_else(|p| p.into_inner()).push(key);
        }
    }
}

/// The keys a round sends for one limiter, with their counts (admitted, seen), busiest first.
///
/// Only the keys this node saw requests for since the last round: the others keep their
/// allowance, and the load on Redis follows the traffic, not the key count. A flood of new
/// keys would make a round of a call per [`BATCH`] of them, and a key in use could run out of
/// its share, under its limit, long before its call came: the busiest keys go first, and at
/// most [`ROUND_BATCHES`] calls' worth of keys per round; the others keep their counts in
/// the backlog, sent first come first in the rounds after (new keys start with a share of
/// their own meanwhile). A round visits its dirty keys and what it sends, not the whole
/// backlog (before, every round sorted the backlog again: a flood of 800,000 keys kept the
/// thread busy for tens of seconds).
fn next_batch(c: &ClusterShares) -> Vec<(Key, u64, u64)> {
    let mut batch = Vec::new();
    let dirty = std::mem::take(&mut *c.dirty.lock().unwrap_or_else(|p| p.into_inner()));
    for key in dirty {
        take_counts(c, key, DIRTY, &mut batch);
    }
    let room = ROUND_BATCHES * BATCH;
    if batch.len() > room {
        batch.select_nth_unstable_by_key(room, |&(_, _, demand)| std::cmp::Reverse(demand));
        to_backlog(c, &batch[room..]);
        batch.truncate(room);
    }
    batch.sort_by_key(|&(_, _, demand)| std::cmp::Reverse(demand));
    let mut backlog = c.backlog.lock().unwrap_or_else(|p| p.into_inner());
    // Places whose key went dirty since (or was swept) are skipped, a bounded number a round.
    for _ in 0..4 * room {
        if batch.len() >= room {
            break;
        }
        let Some(key) = backlog.pop_front() else {
            break;
        };
        if let Some(s) = c.shares.get(&key) {
            s.in_backlog.store(false, Ordering::Release);
        }
        take_counts(c, key, BACKLOG, &mut batch);
    }
    batch
}

/// Moves a queued key's counts into `batch`, if it is still queued as `from` says (a key in
/// the backlog that became dirty meanwhile goes with the dirty ones instead).
fn take_counts(c: &ClusterShares, key: Key, from: u8, batch: &mut Vec<(Key, u64, u64)>) {
    let Some(s) = c.shares.get(&key) else {
        return;
    };
    // Requests from here on queue the key again for the next round.
    if s.queued
        .compare_exchange(from, IDLE, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    let spent = s.spent.swap(0, Ordering::AcqRel);
    let refused = s.refused.swap(0, Ordering::AcqRel);
    if spent + refused > 0 {
        batch.push((key, spent, spent + refused));
    }
}

/// Puts counts that did not fit in a round back into their shares, their keys at the end of
/// the backlog (unless a request made one dirty again meanwhile).
fn to_backlog(c: &ClusterShares, unsent: &[(Key, u64, u64)]) {
    let mut backlog = c.backlog.lock().unwrap_or_else(|p| p.into_inner());
    for &(key, spent, demand) in unsent {
        let s = c.shares.entry(key).or_default();
        s.spent.fetch_add(spent, Ordering::AcqRel);
        s.refused.fetch_add(demand - spent, Ordering::AcqRel);
        // A key keeps the place it has (before, one that went dirty and back got another
        // each round, and while rounds were full of dirty keys the queue grew without end).
        if s.queued
            .compare_exchange(IDLE, BACKLOG, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            && !s.in_backlog.swap(true, Ordering::AcqRel)
        {
            backlog.push_back(key);
        }
    }
    // Places of swept keys (made again since, with a place of their own) pile up while
    // rounds are full: dropped once they are as many as the keys held.
    if backlog.len() > 2 * c.shares.len() + ROUND_BATCHES * BATCH {
        for key in backlog.iter() {
            if let Some(s) = c.shares.get(key) {
                s.in_backlog.store(false, Ordering::Release);
            }
        }
        backlog.retain(|key| {
            c.shares.get(key).is_some_and(|s| {
                s.queued.load(Ordering::Acquire) == BACKLOG
                    && !s.in_backlog.swap(true, Ordering::AcqRel)
            })
        });
    }
}

/// A failure as the log says it: a read that timed out is no answer in time (before, "Resource
/// temporarily unavailable (os error 11)").
fn reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock => "no answer within 500 ms".to_owned(),
        _ => e.to_string(),
    }
}

/// The longest a call may wait for its answer before the store counts as down: ten
/// intervals, at least 250 ms.
fn silence_ns() -> u64 {
    (SYNC_NS.load(Ordering::Relaxed) * 10).max(250_000_000)
}

/// One script call, while [`WAITING_SINCE_NS`] says since when it waits.
fn eval_waited(redis: &mut Redis, args: &[Vec<u8>]) -> std::io::Result<Vec<Reply>> {
    waited(|| redis.eval(args))
}

/// Runs `call` (one that waits on Redis) with [`WAITING_SINCE_NS`] saying since when, and
/// its wait counted in [`LONGEST_WAIT_NS`].
fn waited<T>(call: impl FnOnce() -> T) -> T {
    let sent = super::ratelimit::now_ns().max(1);
    WAITING_SINCE_NS.store(sent, Ordering::Relaxed);
    let answer = call();
    WAITING_SINCE_NS.store(0, Ordering::Relaxed);
    let waited = super::ratelimit::now_ns().saturating_sub(sent);
    LONGEST_WAIT_NS.fetch_max(waited, Ordering::Relaxed);
    answer
}

/// Sets the allowances of `chunk`'s keys from a script answer: the headroom, plus what the
/// bucket gains until the next round (granted ahead, so that a bucket which is full at a
/// round does not lose its refill until the next), shared by the nodes that want the key;
/// and when each bucket is full again, counted from `now_ns`.
fn apply(
    c: &ClusterShares,
    limit: &Limit,
    sync: Duration,
    now_ns: u64,
    chunk: &[(Key, u64, u64)],
    answer: &[Reply],
) -> std::io::Result<()> {
    let refill = (u128::from(limit.rate) * sync.as_nanos() / u128::from(limit.period_ns)) as i64;
    let bad = || std::io::Error::other("unexpected script answer");
    let live = match answer.first() {
        Some(Reply::Int(n)) => (*n).max(1),
        _ => return Err(bad()),
    };
    LIVE_NODES.store(u32::try_from(live).unwrap_or(1), Ordering::Relaxed);
    if answer.len() != 1 + 3 * chunk.len() {
        return Err(bad());
    }
    for ((key, _, _), values) in chunk.iter().zip(answer[1..].chunks(3)) {
        let [Reply::Int(headroom), Reply::Int(wanting), Reply::Int(ahead_us)] = values else {
            return Err(bad());
        };
        let wanting = (*wanting).max(1);
        // A bucket in debt (below 0: more was admitted than it held) has its debt taken off
        // the refill, so that a leftover handed out by chance, or requests admitted while
        // a round was under way, are paid back rather than left to add up.
        let total = (headroom + refill).max(0);
        // What does not divide evenly goes to each node by chance in proportion (`total %
        // wanting` of `wanting` rounds): nothing is lost to rounding, however low the rate
        // or many the nodes (before, the remainder went to no node, so a bucket holding
        // fewer requests than nodes wanting it admitted none), and no node is favoured (a
        // fixed order gave it all to the first node by id, round after round).
        let share = total / wanting + i64::from(draw(wanting as u64) < (total % wanting) as u64);
        if let Some(s) = c.shares.get(key) {
            // Requests admitted while the round was under way count against the new share.
            let since = s.spent.load(Ordering::Relaxed) as i64;
            s.allowance.store(share - since, Ordering::Release);
            let ahead_ns = u64::try_from(*ahead_us).unwrap_or(0).saturating_mul(1000);
            (s.full_at_ns).store(now_ns.saturating_add(ahead_ns), Ordering::Relaxed);
        }
    }
    Ok(())
}

/// A number drawn in `0..n` (`n` > 0), for the reconciling thread: the workers' generator
/// ([`crate::trace::Rng`]), one for the thread.
fn draw(n: u64) -> u64 {
    thread_local! {
        static RNG: std::cell::RefCell<crate::trace::Rng> =
            std::cell::RefCell::new(crate::trace::Rng::from_entropy());
    }
    RNG.with(|r| r.borrow_mut().next_u64() % n.max(1))
}

/// EVAL arguments for one batch of one policy's keys.
fn script_args(
    policy: &str,
    limit: &Limit,
    node: &str,
    sync: Duration,
    chunk: &[(Key, u64, u64)],
) -> Vec<Vec<u8>> {
    let emission_us = limit.period_ns as f64 / limit.rate as f64 / 1000.0;
    let tolerance_us = emission_us * limit.burst as f64;
    let mut args: Vec<Vec<u8>> = Vec::with_capacity(6 + 2 * chunk.len());
    args.push(b"EVAL".to_vec());
    args.push(SCRIPT.as_bytes().to_vec());
    args.push((chunk.len() + 1).to_string().into_bytes());
    args.push(b"gw:nodes".to_vec());
    // The limit's parameters are part of the key: a changed policy starts from fresh buckets
    // (its old arrival times may lie far ahead for the new rate).
    let prefix = format!(
        "gw:rl:{policy}:{}-{}-{}:",
        limit.rate, limit.period_ns, limit.burst
    );
    for (key, _, _) in chunk {
        // Hashed: a short key is held as its bytes (`ratelimit::key_of`), and an API key or
        // a client's address is none of Redis's business (before, readable there in hex).
        let hashed = <sha2::Sha256 as sha2::Digest>::digest(key);
        args.push(format!("{prefix}{}", common::to_hex(&hashed)).into_bytes());
    }
    args.push(node.as_bytes().to_vec());
    args.push(format!("{emission_us:.6}").into_bytes());
    args.push(format!("{tolerance_us:.6}").into_bytes());
    // A node stops counting as wanting a key four rounds (at least 20 ms) after it last did.
    let window_us = wanting_window(sync).as_micros();
    args.push(window_us.to_string().into_bytes());
    for (_, spent, demand) in chunk {
        args.push(spent.to_string().into_bytes());
        args.push(demand.to_string().into_bytes());
    }
    args
}

/// A RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Status(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

/// A blocking Redis connection (RESP2), for the reconciling thread only.
struct Redis {
    reader: BufReader<Bounded<TcpStream>>,
    writer: TcpStream,
}

impl Redis {
    fn connect(addr: &RedisAddr) -> std::io::Result<Redis> {
        let target = std::net::ToSocketAddrs::to_socket_addrs(&*addr.address)?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let stream = TcpStream::connect_timeout(&target, Duration::from_millis(500))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        stream.set_write_timeout(Some(Duration::from_millis(500)))?;
        let mut r = Redis {
            reader: BufReader::new(Bounded::new(stream.try_clone()?)),
            writer: stream,
        };
        if let Some(p) = &addr.password {
            // A Redis 6 ACL user and its password, or a password alone.
            let mut auth = vec![b"AUTH".to_vec()];
            if let Some(user) = &addr.user {
                auth.push(user.as_bytes().to_vec());
            }
            auth.push(p.as_bytes().to_vec());
            r.command(&auth)?;
        }
        if addr.db != 0 {
            r.command(&[b"SELECT".to_vec(), addr.db.to_string().into_bytes()])?;
        }
        Ok(r)
    }

    /// Runs one command; an error reply is an error.
    fn command(&mut self, args: &[Vec<u8>]) -> std::io::Result<Reply> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&out)?;
        self.reader.get_mut().renew();
        match read_reply(&mut self.reader, 0) {
            // Cut off (closed or reset) after a part of the reply came: the command ran.
            Err(e) if not_run(&e) && !refused(&e) && self.reader.get_ref().started() => Err(
                std::io::Error::new(std::io::ErrorKind::InvalidData, "reply cut short"),
            ),
            reply => reply,
        }
    }

    /// Runs the script; its answer as an array.
    fn eval(&mut self, args: &[Vec<u8>]) -> std::io::Result<Vec<Reply>> {
        match self.command(args)? {
            Reply::Array(items) => Ok(items),
            other => Err(std::io::Error::other(format!("unexpected reply {other:?}"))),
        }
    }
}

/// Longest line of a reply (a status, an error, a length) taken from Redis.
const MAX_REPLY_LINE: u64 = 64 * 1024;
/// Largest bulk string taken (the replies the gateway asks for hold numbers and statuses).
const MAX_BULK: i64 = 1 << 20;
/// Longest array taken (a round's answer holds 1 + 3 × [`BATCH`] numbers).
const MAX_ARRAY: i64 = 64 * 1024;
/// Deepest nesting of arrays taken (a round's answer is one array of numbers).
const MAX_REPLY_DEPTH: usize = 8;
/// Most bytes one reply may take.
const MAX_REPLY_BYTES: u64 = 4 << 20;
/// Longest a whole reply may take to come in: each read has its own 500 ms, and a server
/// that sent a little at a time could otherwise hold the reconciling thread for good.
const REPLY_WITHIN: Duration = Duration::from_secs(2);

/// A reader that fails once a reply has taken [`MAX_REPLY_BYTES`] or its time
/// ([`REPLY_WITHIN`], give or take one read's timeout), counted from [`Bounded::renew`].
struct Bounded<R> {
    inner: R,
    deadline: Instant,
    left: u64,
}

impl<R> Bounded<R> {
    fn new(inner: R) -> Bounded<R> {
        let mut b = Bounded {
            inner,
            deadline: Instant::now(),
            left: 0,
        };
        b.renew();
        b
    }

    /// Whether a byte of the current reply has come.
    fn started(&self) -> bool {
        self.left < MAX_REPLY_BYTES
    }

    /// A new reply's allowance.
    fn renew(&mut self) {
        self.deadline = Instant::now() + REPLY_WITHIN;
        self.left = MAX_REPLY_BYTES;
    }
}

impl<R: std::io::Read> std::io::Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if Instant::now() >= self.deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "reply not whole in time",
            ));
        }
        if self.left == 0 {
            return Err(std::io::Error::other("reply too large"));
        }
        let most = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..most])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Whether an error reply says a script failed as it ran (Redis names its line:
/// `@user_script:9`; Redis 6 says `Error running script`), so that it may have written
/// before: not when Redis refused writes (a replica's `READONLY`, `OOM`, `MISCONF`...),
/// which it does at the script's first write, or its own state kept it from running.
fn ran_partly(reply: &str) -> bool {
    // Not NOPERM: an ACL that refuses one of the script's commands does so mid-script.
    const NOT_RUN: [&str; 9] = [
        "READONLY",
        "OOM",
        "MISCONF",
        "NOREPLICAS",
        "MASTERDOWN",
        "LOADING",
        "BUSY",
        "CLUSTERDOWN",
        "TRYAGAIN",
    ];
    // Redis 7 puts the code first, Redis 6 after its `Error running script` preamble.
    let refused = reply
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|word| NOT_RUN.contains(&word));
    (reply.contains("@user_script") || reply.contains("Error running script")) && !refused
}

/// Reads one RESP2 reply, `depth` arrays deep. A server that sends more than the limits
/// above or nests deeper is an error (its connection is dropped), not memory or stack
/// without bound; the connection's reader ([`Bounded`]) bounds the bytes and the time.
fn read_reply(r: &mut impl BufRead, depth: usize) -> std::io::Result<Reply> {
    let mut line = Vec::with_capacity(32);
    std::io::Read::take(&mut *r, MAX_REPLY_LINE).read_until(b'\n', &mut line)?;
    if line.len() < 3 || !line.ends_with(b"\r\n") {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let body = std::str::from_utf8(&line[1..line.len() - 2])
        .map_err(|_| std::io::Error::other("bad reply line"))?;
    let int = || {
        body.parse::<i64>()
            .map_err(|_| std::io::Error::other("bad integer"))
    };
    match line[0] {
        b'+' => Ok(Reply::Status(body.to_owned())),
        // Redis refused the command (LOADING, BUSY, READONLY, OOM...): it did not run.
        b'-' if depth == 0 && !ran_partly(body) => {
            Err(std::io::Error::other(Refused(format!("redis: {body}"))))
        }
        b'-' => Err(std::io::Error::other(format!("redis: {body}"))),
        b':' => Ok(Reply::Int(int()?)),
        b'$' => {
            let n = int()?;
            if n < 0 {
                return Ok(Reply::Bulk(None));
            }
            if n > MAX_BULK {
                return Err(std::io::Error::other("bulk reply too large"));
            }
            let mut data = vec![0u8; n as usize + 2];
            std::io::Read::read_exact(r, &mut data)?;
            data.truncate(n as usize);
            Ok(Reply::Bulk(Some(data)))
        }
        b'*' => {
            let n = int()?;
            if depth == MAX_REPLY_DEPTH {
                return Err(std::io::Error::other("reply nested too deep"));
            }
            if n > MAX_ARRAY {
                return Err(std::io::Error::other("array reply too long"));
            }
            let mut items = Vec::with_capacity(n.clamp(0, 1024) as usize);
            for _ in 0..n.max(0) {
                items.push(read_reply(r, depth + 1)?);
            }
            Ok(Reply::Array(items))
        }
        _ => Err(std::io::Error::other("unknown reply type")),
    }
}

/// The cluster-scoped limiters alive, by policy id (for the reconciling thread).
pub(super) type ClusterLimiters = Vec<(Box<str>, Arc<Limiter>)>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_keep_overflowing_the_rounds_keep_one_place_in_the_backlog() {
        // More keys in use than a round takes, every one seeing a request each round: the
        // backlog holds each at most once (before, those sent back each round got another
        // place, never taken while the rounds were full: 1,000 more a round here).
        let limit = Limit::new(1, 1_000_000_000, 5).expect("valid");
        let c = ClusterShares::new(StoreErrorMode::Allow, 1_000_000);
        let key = |i: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k
        };
        let keys = (ROUND_BATCHES * BATCH) as u32 + 1000;
        for _ in 0..50 {
            for i in 0..keys {
                c.check(&limit, Some(&key(i)), 1);
            }
            assert_eq!(next_batch(&c).len(), ROUND_BATCHES * BATCH);
            assert!(c.backlog.lock().unwrap().len() <= keys as usize);
        }
    }

    #[test]
    fn a_flood_of_keys_waits_in_the_backlog_and_keys_in_use_go_first() {
        let limit = Limit::new(1, 1_000_000_000, 5).expect("valid");
        let c = ClusterShares::new(StoreErrorMode::Allow, 1_000_000);
        let key = |i: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k
        };
        let room = ROUND_BATCHES * BATCH;
        let flood = 3 * room as u32 + 100;
        let mut seen = 0;
        for i in 0..flood {
            c.check(&limit, Some(&key(i)), 1);
            seen += 1;
        }
        // A key in use: three requests.
        for _ in 0..3 {
            c.check(&limit, Some(&key(0)), 1);
            seen += 1;
        }
        let first = next_batch(&c);
        assert_eq!(first.len(), room);
        assert_eq!((first[0].0, first[0].2), (key(0), 4), "the busiest first");
        assert_eq!(c.backlog.lock().unwrap().len(), flood as usize - room);
        // The next rounds send the backlog, first come first, a round's worth each; a key of
        // it that sees a request meanwhile goes with the dirty keys, first, and once.
        let waiting = c.backlog.lock().unwrap().back().copied().unwrap();
        c.check(&limit, Some(&waiting), 1);
        seen += 1;
        let second = next_batch(&c);
        assert_eq!(second.len(), room);
        assert_eq!((second[0].0, second[0].2), (waiting, 2));
        // (Its old place there is skipped when its turn comes.)
        assert_eq!(
            c.backlog.lock().unwrap().len(),
            flood as usize - 2 * room + 1
        );
        let mut all = [first, second, next_batch(&c), next_batch(&c)].concat();
        assert!(next_batch(&c).is_empty() && c.backlog.lock().unwrap().is_empty());
        // Every request counted once, every key sent once.
        assert_eq!(all.iter().map(|&(_, _, seen)| seen).sum::<u64>(), seen);
        all.sort();
        all.dedup_by_key(|(k, _, _)| *k);
        assert_eq!(all.len(), flood as usize);
    }

    #[test]
    fn a_key_goes_to_redis_hashed() {
        // Before, a short key (an API key, a client address) went as its bytes in hex.
        let limit = Limit::new(1, 1_000_000_000, 5).expect("valid");
        let key = super::super::ratelimit::key_of(b"secret-api-key");
        let args = script_args("p", &limit, "n", Duration::from_millis(5), &[(key, 1, 1)]);
        let name = String::from_utf8(args[4].clone()).unwrap();
        let hex = name.strip_prefix("gw:rl:p:1-1000000000-5:").expect(&name);
        assert_eq!(hex.len(), 64, "{name}");
        assert!(!hex.contains(&common::to_hex(b"secret")), "{name}");
    }

    #[test]
    fn a_read_timed_out_is_said_as_no_answer() {
        let e = std::io::Error::from(std::io::ErrorKind::WouldBlock);
        assert_eq!(reason(&e), "no answer within 500 ms");
        let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "reply not whole in time");
        assert_eq!(reason(&e), "reply not whole in time");
    }

    #[test]
    fn only_a_command_the_connection_lost_is_taken_for_not_run() {
        use std::io::{Error, ErrorKind::*};
        for kind in [UnexpectedEof, ConnectionReset, BrokenPipe] {
            assert!(not_run(&Error::from(kind)), "{kind:?}");
        }
        // A reply late, cut short or one the gateway cannot read may follow a run.
        for kind in [WouldBlock, TimedOut, InvalidData, Other] {
            assert!(!not_run(&Error::from(kind)), "{kind:?}");
        }
        // An error reply: Redis refused the command (a restarting Redis answers LOADING).
        let mut r = std::io::BufReader::new(&b"-LOADING Redis is loading\r\n"[..]);
        let e = read_reply(&mut r, 0).unwrap_err();
        assert!(not_run(&e), "{e}");
        assert!(e.to_string().contains("LOADING"), "{e}");
        let mut r = std::io::BufReader::new(&b"*2\r\n:1\r\n-ERR in the answer\r\n"[..]);
        assert!(!not_run(&read_reply(&mut r, 0).unwrap_err()));
        // Writes refused, at the script's first: nothing ran (the review found READONLY,
        // which Redis 7 names the script's line in, taken for a script that ran).
        let mut r = std::io::BufReader::new(
            &b"-READONLY You can't write against a read only replica. script: 3ad1, \
               on @user_script:6.\r\n"[..],
        );
        assert!(not_run(&read_reply(&mut r, 0).unwrap_err()));
        // A script that failed as it ran (Redis 7's words, then Redis 6's).
        for reply in [
            &b"-WRONGTYPE Operation against a key holding the wrong kind of value script: \
               3ad1, on @user_script:9.\r\n"[..],
            b"-ERR Error running script (call to f_3ad1): @user_script:9: bad\r\n",
        ] {
            let mut r = std::io::BufReader::new(reply);
            let e = read_reply(&mut r, 0).unwrap_err();
            assert!(!not_run(&e), "{e}");
        }
    }

    #[test]
    fn replies_are_read() {
        let mut input: &[u8] = b"*3\r\n:3\r\n$5\r\nhello\r\n*2\r\n+OK\r\n$-1\r\n";
        assert_eq!(
            read(&mut input).unwrap(),
            Reply::Array(vec![
                Reply::Int(3),
                Reply::Bulk(Some(b"hello".to_vec())),
                Reply::Array(vec![Reply::Status("OK".into()), Reply::Bulk(None)]),
            ])
        );
        let mut err: &[u8] = b"-NOSCRIPT no\r\n";
        assert!(read(&mut err).is_err());
        let mut short: &[u8] = b"$5\r\nhel";
        assert!(read(&mut short).is_err());
    }

    fn read(input: &mut &[u8]) -> std::io::Result<Reply> {
        read_reply(input, 0)
    }

    #[test]
    fn replies_past_the_limits_are_errors() {
        // Nested as deep as allowed, and one deeper (a reply nested thousands deep used to
        // recurse that deep).
        let nested = |depth: usize| [&b"*1\r\n".repeat(depth)[..], b":1\r\n"].concat();
        assert!(read(&mut &nested(MAX_REPLY_DEPTH)[..]).is_ok());
        let e = read(&mut &nested(MAX_REPLY_DEPTH + 1)[..]).unwrap_err();
        assert!(e.to_string().contains("nested too deep"), "{e}");
        assert!(read(&mut &nested(100_000)[..]).is_err());
        // A line without end is read no further than its limit.
        let endless = vec![b'+'; 1 << 20];
        let mut input = &endless[..];
        assert!(read(&mut input).is_err());
        assert_eq!(input.len(), endless.len() - MAX_REPLY_LINE as usize);
        // A bulk string or an array over its limit.
        let big = format!("${}\r\n", MAX_BULK + 1);
        assert!(read(&mut big.as_bytes()).is_err());
        let long = format!("*{}\r\n", MAX_ARRAY + 1);
        assert!(read(&mut long.as_bytes()).is_err());
    }

    #[test]
    fn a_reply_is_bounded_in_bytes_and_time() {
        use std::io::Read;
        // A round's largest answer (1 + 3 × BATCH numbers) comes through.
        let round = 1 + 3 * BATCH;
        let mut text = format!("*{round}\r\n").into_bytes();
        for _ in 0..round {
            text.extend_from_slice(b":1234567890123\r\n");
        }
        let mut r = BufReader::new(Bounded::new(&text[..]));
        assert!(matches!(read_reply(&mut r, 0), Ok(Reply::Array(a)) if a.len() == round));
        // Past MAX_REPLY_BYTES: an error, whatever the reply is.
        let endless = std::io::repeat(b'1');
        let mut r = BufReader::new(Bounded::new(endless));
        let mut sink = Vec::new();
        let e = r.read_to_end(&mut sink).unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
        assert_eq!(sink.len() as u64, MAX_REPLY_BYTES);
        // Past its time: an error at the next read, until renewed.
        let mut b = Bounded::new(&b":1\r\n"[..]);
        b.deadline = Instant::now() - Duration::from_millis(1);
        assert_eq!(
            b.read(&mut [0u8; 8]).unwrap_err().kind(),
            std::io::ErrorKind::TimedOut
        );
        b.renew();
        assert_eq!(b.read(&mut [0u8; 8]).unwrap(), 4);
    }

    /// Held by the tests that set [`LIVE_NODES`] (a process-wide count).
    static LIVE: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn only_a_call_waiting_past_the_bound_makes_the_store_down() {
        let _live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        let now = super::super::ratelimit::now_ns();
        let second_ago = now.saturating_sub(1_000_000_000).max(1);
        for state in [UNKNOWN, UP] {
            STORE.store(state, Ordering::Relaxed);
            // Nothing waits: a round busy with keys of its own, or asleep, is no outage.
            WAITING_SINCE_NS.store(0, Ordering::Relaxed);
            assert!(!ClusterShares::store_down(), "{state}");
            WAITING_SINCE_NS.store(now, Ordering::Relaxed);
            assert!(!ClusterShares::store_down(), "{state}");
            // A call a second without its answer: down, also before the first round ended
            // (before, a Redis that hung from the start was never down while it did).
            WAITING_SINCE_NS.store(second_ago, Ordering::Relaxed);
            assert!(ClusterShares::store_down(), "{state}");
        }
        WAITING_SINCE_NS.store(0, Ordering::Relaxed);
        STORE.store(DOWN, Ordering::Relaxed);
        assert!(ClusterShares::store_down());
        STORE.store(UNKNOWN, Ordering::Relaxed);
    }

    #[test]
    fn a_pause_shorter_than_the_fill_time_gives_back_only_the_refill() {
        let _live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        LIVE_NODES.store(1, Ordering::Relaxed);
        // 5 a minute, burst 5: one every 12 s, full again after 60 s.
        let limit = Limit::new(5, 60_000_000_000, 5).unwrap();
        let c = ClusterShares::new(StoreErrorMode::Allow, 10);
        let second = 1_000_000_000;
        let t = 100 * second;
        let admitted = |at: u64| (0..6).filter(|_| c.check(&limit, None, at).allowed).count();
        assert_eq!(admitted(t), 5);
        // Idle past a second: no longer reconciled, and swept by a round, but kept, and
        // empty as the bucket is (it was a fresh allowance again each second before).
        let later = t + 1_100_000_000;
        c.shares.retain(|_, s| fresh(s, later));
        assert_eq!(admitted(later), 0);
        // 12 s after that: one emission's refill.
        assert_eq!(admitted(later + 12 * second), 1);
        // A minute unused: full again; an admitted request says what is left of the share
        // and how long the bucket takes to fill the rest (12 s a request).
        let again = later + 200 * second;
        let left: Vec<_> = (0..6).map(|_| c.check(&limit, None, again)).collect();
        let remaining: Vec<_> = left.iter().map(|d| d.remaining).collect();
        assert_eq!(remaining, [4, 3, 2, 1, 0, 0].map(Some));
        assert_eq!(left[1].reset_ns, 2 * 12 * second);
        assert!(!left[5].allowed);
        // A fast limit's share still goes after a second unused.
        let fast = Limit::new(1000, second, 100).unwrap();
        let d = ClusterShares::new(StoreErrorMode::Allow, 10);
        assert!(d.check(&fast, None, t).allowed);
        d.shares.retain(|_, s| fresh(s, t + 1_100_000_000));
        assert!(d.shares.is_empty());
    }

    #[test]
    fn what_does_not_divide_evenly_goes_to_each_node_in_proportion() {
        let _live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        LIVE_NODES.store(3, Ordering::Relaxed);
        // 1 of headroom, 3 nodes wanting it, no refill in a round: this node's share is 1
        // in about a third of the rounds (before: never, for every node).
        let limit = Limit::new(1, 1_000_000_000, 2).unwrap();
        let c = ClusterShares::new(StoreErrorMode::Deny, 10);
        let _ = c.check(&limit, None, 1);
        let answer = [3, 1, 3, 0].map(Reply::Int);
        let sync = Duration::from_millis(5);
        let mut given = 0;
        for _ in 0..3000 {
            c.shares
                .get(&ROUTE_KEY)
                .unwrap()
                .spent
                .store(0, Ordering::Relaxed);
            apply(&c, &limit, sync, 0, &[(ROUTE_KEY, 0, 1)], &answer).unwrap();
            given += c
                .shares
                .get(&ROUTE_KEY)
                .unwrap()
                .allowance
                .load(Ordering::Relaxed);
        }
        assert!((800..1200).contains(&given), "{given}");
        LIVE_NODES.store(1, Ordering::Relaxed);
    }

    #[test]
    fn a_bucket_in_debt_pays_it_back_from_its_refill() {
        let _live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        LIVE_NODES.store(1, Ordering::Relaxed);
        // 1000 a second, 5 a round: a bucket 3 past empty gives 2, one 9 past gives none
        // (before: the debt was read as 0, the whole refill given, and a debt once made,
        // by a leftover handed out by chance, was never paid back).
        let limit = Limit::new(1000, 1_000_000_000, 10).unwrap();
        let c = ClusterShares::new(StoreErrorMode::Deny, 10);
        let _ = c.check(&limit, None, 1);
        let sync = Duration::from_millis(5);
        for (headroom, share) in [(-3, 2), (-9, 0), (4, 9)] {
            c.shares
                .get(&ROUTE_KEY)
                .unwrap()
                .spent
                .store(0, Ordering::Relaxed);
            let answer = [1, headroom, 1, 0].map(Reply::Int);
            apply(&c, &limit, sync, 0, &[(ROUTE_KEY, 0, 1)], &answer).unwrap();
            let got = c
                .shares
                .get(&ROUTE_KEY)
                .unwrap()
                .allowance
                .load(Ordering::Relaxed);
            assert_eq!(got, share, "{headroom}");
        }
    }

    #[test]
    fn a_bucket_in_debt_is_not_taken_for_full_after_one_fill_time() {
        let _live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        LIVE_NODES.store(3, Ordering::Relaxed);
        // 1 a minute, burst 1, three live nodes: a key starts on each with one request (a
        // share under one rounds up), so three reached the bucket at once, and its round
        // says it is full again in three minutes. Idle past the fill time, the key does not
        // start afresh before then (before: one more on every node each minute).
        let limit = Limit::new(1, 60_000_000_000, 1).unwrap();
        let c = ClusterShares::new(StoreErrorMode::Deny, 10);
        let second = 1_000_000_000;
        let t = 1000 * second;
        assert!(c.check(&limit, None, t).allowed);
        assert!(!c.check(&limit, None, t).allowed);
        let round = [3, 0, 3, 180_000_000].map(Reply::Int);
        let sync = Duration::from_millis(5);
        apply(&c, &limit, sync, t, &[(ROUTE_KEY, 1, 2)], &round).unwrap();
        let later = t + 61 * second;
        c.shares.retain(|_, s| fresh(s, later));
        assert!(!c.check(&limit, None, later).allowed);
        assert!(!c.check(&limit, None, t + 122 * second).allowed);
        assert!(c.check(&limit, None, t + 181 * second).allowed);
    }

    #[test]
    fn a_share_back_after_leaving_the_wanting_window_is_capped_until_its_next_round() {
        let _live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        LIVE_NODES.store(3, Ordering::Relaxed);
        // 1 a second, burst 30; three live nodes.
        let limit = Limit::new(1, 1_000_000_000, 30).unwrap();
        let c = ClusterShares::new(StoreErrorMode::Allow, 10);
        let ms = 1_000_000;
        let t = 100_000 * ms;
        assert!(c.check(&limit, None, t).allowed);
        // A round: this node alone wants the key, and gets the bucket's whole headroom.
        c.shares
            .get(&ROUTE_KEY)
            .unwrap()
            .spent
            .store(0, Ordering::Relaxed);
        let answer = [3, 29, 1, 1_000_000].map(Reply::Int);
        apply(
            &c,
            &limit,
            Duration::from_millis(5),
            t,
            &[(ROUTE_KEY, 1, 1)],
            &answer,
        )
        .unwrap();
        // Used again within four rounds: Redis still counts it, its share stands.
        assert_eq!(c.check(&limit, None, t + 10 * ms).remaining, Some(28));
        // 200 ms unused: Redis gave the headroom to the nodes that wanted the key meanwhile,
        // so this one starts from its share of a full bucket (10), not the 28 it held.
        let back = t + 210 * ms;
        let first = c.check(&limit, None, back);
        // Its part of a full bucket less one: 3 emissions (1 s each) short of it.
        assert_eq!((first.remaining, first.reset_ns), (Some(9), 3_000 * ms));
        let admitted = (0..40)
            .filter(|_| c.check(&limit, None, back).allowed)
            .count();
        assert_eq!(admitted + 1, 10);
    }

    #[test]
    fn a_reply_reset_after_it_began_ran_and_a_swept_key_keeps_its_counts() {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        // A fake Redis: its answer begins, then the connection is reset (SO_LINGER 0).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = RedisAddr {
            address: listener.local_addr().unwrap().to_string().into(),
            user: None,
            password: None,
            db: 0,
        };
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"*4\r\n:1\r\n").unwrap();
            std::thread::sleep(Duration::from_millis(50));
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: a valid socket and a `linger` that lives across the call.
            let set = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            assert_eq!(set, 0);
        });
        let mut redis = Redis::connect(&addr).unwrap();
        let e = redis.eval(&[b"EVAL".to_vec()]).unwrap_err();
        server.join().unwrap();
        assert!(!not_run(&e), "{e:?}");
        // Counts put back for a key swept meanwhile: made again, not lost.
        let c = ClusterShares::new(StoreErrorMode::Deny, 10);
        restore(&c, &[(ROUTE_KEY, 3, 4)]);
        let share = c.shares.get(&ROUTE_KEY).unwrap();
        assert_eq!(share.spent.load(Ordering::Relaxed), 3);
        assert_eq!(share.refused.load(Ordering::Relaxed), 1);
        assert_eq!(*c.dirty.lock().unwrap(), [ROUTE_KEY]);
    }

    #[test]
    fn counts_not_yet_charged_outlive_an_idle_key_restart() {
        // A round that failed put 7 admitted requests back; the key is next checked after
        // an outage longer than IDLE_NS, which starts its allowance afresh. Before, the 7
        // went with it, never charged.
        let _live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        LIVE_NODES.store(1, Ordering::Relaxed);
        let limit = Limit::new(1, 1_000_000_000, 20).unwrap();
        let c = ClusterShares::new(StoreErrorMode::Deny, 10);
        let t = 5_000_000_000;
        assert!(c.check(&limit, None, t).allowed);
        restore(&c, &[(ROUTE_KEY, 6, 6)]);
        assert!(c.check(&limit, None, t + 3 * IDLE_NS).allowed);
        let share = c.shares.get(&ROUTE_KEY).unwrap();
        assert_eq!(share.spent.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn shares_admit_their_allowance_then_refuse() {
        let _live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        let limit = Limit::new(1000, 1_000_000_000, 100).unwrap();
        let c = ClusterShares::new(StoreErrorMode::Allow, 10);
        LIVE_NODES.store(4, Ordering::Relaxed);
        let t = 5_000_000_000;
        // A fresh key starts from burst / live nodes.
        let admitted = (0..100)
            .filter(|_| c.check(&limit, None, t).allowed)
            .count();
        assert_eq!(admitted, 25);
        // A round sets the allowance from the cluster's headroom; what was admitted since
        // the counts were taken comes off it.
        let share = c.shares.get(&ROUTE_KEY).unwrap();
        assert_eq!(share.spent.load(Ordering::Relaxed), 25);
        share.spent.store(2, Ordering::Relaxed);
        drop(share);
        // 36 of headroom and 4 more refilled over the next 4 ms, for 4 nodes.
        let sync = Duration::from_millis(4);
        // Of 5 live nodes, 4 want the key.
        let answer = [5, 36, 4, 0].map(Reply::Int);
        apply(&c, &limit, sync, 0, &[(ROUTE_KEY, 25, 30)], &answer).unwrap();
        let admitted = (0..100)
            .filter(|_| c.check(&limit, None, t).allowed)
            .count();
        assert_eq!(
            admitted, 8,
            "40 / 4 nodes, less the 2 admitted during the round"
        );
        LIVE_NODES.store(1, Ordering::Relaxed);
    }
}
