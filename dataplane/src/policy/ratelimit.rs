//! Token-bucket rate limiting in GCRA form: one atomic "theoretical arrival time" per bucket,
//! one compare-and-swap per check, shared by all workers, so a limit of R per period is R for
//! the whole node.
//!
//! Hot path. Time is a parameter (nanoseconds on a monotonic clock the caller owns), so tests
//! drive a fake clock. A bucket admits `burst` requests at once and then one every
//! `period / rate`: over a span S it admits at most `burst + S * rate / period` requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Instant;

use common::config::{RateScope, StoreErrorMode};
use common::policy::{RateLimit, RateParams};
use dashmap::DashMap;
use sha2::{Digest, Sha256};

/// A limit: `rate` requests per `period_ns`, with `burst` admitted at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Nanoseconds between two admitted requests at the sustained rate.
    emission_ns: u64,
    /// How far ahead of now the arrival time may run: `burst * emission_ns`.
    tolerance_ns: u64,
    pub rate: u64,
    pub period_ns: u64,
    pub burst: u64,
}

impl Limit {
    /// Nanoseconds between two admitted requests at the sustained rate.
    pub fn emission_ns(&self) -> u64 {
        self.emission_ns
    }

    /// How long an emptied bucket takes to fill again (`burst` emissions).
    pub fn tolerance_ns(&self) -> u64 {
        self.tolerance_ns
    }

    /// `rate` and `burst` at least 1; `period_ns` at least `rate`.
    pub fn new(rate: u64, period_ns: u64, burst: u64) -> Option<Limit> {
        if rate == 0 || burst == 0 || period_ns < rate {
            return None;
        }
        let emission_ns = period_ns / rate;
        Some(Limit {
            emission_ns,
            tolerance_ns: emission_ns.checked_mul(burst)?,
            rate,
            period_ns,
            burst,
        })
    }
}

/// What a check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests that could still be admitted right now; `None`: not known (a cluster limit
    /// admitting while its store is down).
    pub remaining: Option<u64>,
    /// Nanoseconds until the bucket is full again.
    pub reset_ns: u64,
    /// When refused: nanoseconds until a request would be admitted.
    pub retry_after_ns: u64,
    /// Refused because a cluster limit's store is down (`on_store_error = "deny"`).
    pub unavailable: bool,
}

impl Decision {
    /// Admitted, with nothing known about what is left (a cluster share, a store that is down).
    pub fn admitted() -> Decision {
        Decision {
            allowed: true,
            remaining: None,
            reset_ns: 0,
            retry_after_ns: 0,
            unavailable: false,
        }
    }

    /// Refused; a request may come back after `wait_ns`.
    pub fn refused(wait_ns: u64) -> Decision {
        Decision {
            allowed: false,
            remaining: Some(0),
            reset_ns: wait_ns,
            retry_after_ns: wait_ns,
            unavailable: false,
        }
    }
}

/// One bucket.
#[derive(Debug, Default)]
pub struct Bucket {
    /// Theoretical arrival time of the next request, in the caller's clock.
    tat: AtomicU64,
}

impl Bucket {
    /// Checks one request at `now_ns` and, if admitted, counts it.
    pub fn check(&self, limit: &Limit, now_ns: u64) -> Decision {
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let base = tat.max(now_ns);
            let next = base.saturating_add(limit.emission_ns);
            if next - now_ns > limit.tolerance_ns {
                let retry_after_ns = next - now_ns - limit.tolerance_ns;
                return Decision {
                    allowed: false,
                    remaining: Some(0),
                    reset_ns: base - now_ns,
                    retry_after_ns,
                    unavailable: false,
                };
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    let used = next - now_ns;
                    return Decision {
                        allowed: true,
                        remaining: Some((limit.tolerance_ns - used) / limit.emission_ns),
                        reset_ns: used,
                        retry_after_ns: 0,
                        unavailable: false,
                    };
                }
                Err(current) => tat = current,
            }
        }
    }

    /// Gives back one request admitted by [`Bucket::check`] (a later limit refused it).
    pub fn give_back(&self, limit: &Limit) {
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(limit.emission_ns))
            });
    }

    /// The bucket's arrival time (idle buckets, whose time is past, can be evicted).
    pub fn arrival_ns(&self) -> u64 {
        self.tat.load(Ordering::Relaxed)
    }
}

/// A bucket key of fixed size, so a keyed bucket costs the same whatever the key: keys up to
/// 31 bytes are kept as `[len, bytes.., 0..]`; longer ones (header values can be kilobytes) as
/// `[0xff, SHA-256(key)[..31]]`.
pub type Key = [u8; 32];

/// The fixed-size key for `raw`.
pub fn key_of(raw: &[u8]) -> Key {
    let mut k = [0u8; 32];
    if raw.len() < 32 {
        k[0] = raw.len() as u8;
        k[1..=raw.len()].copy_from_slice(raw);
    } else {
        let digest = Sha256::digest(raw);
        k[0] = 0xff;
        k[1..].copy_from_slice(&digest[..31]);
    }
    k
}

/// Bytes of memory one keyed bucket costs at most: a map slot is 41 bytes (the key, the
/// arrival time and a control byte), and right after the table doubles only 7/16 of its slots
/// are used (94 bytes per key); the rest is slack for uneven shards. The README quotes the
/// bound built from it, and a test checks it with a counting allocator.
pub const BYTES_PER_KEY: usize = 128;

/// The buckets of one rate-limit policy: one for the whole policy, or one per key in a
/// sharded map, shared by every worker.
///
/// Memory stays bounded: when the map holds `max_keys` buckets, a new key first sweeps out
/// the buckets that have refilled completely (they hold no information: a fresh bucket
/// behaves the same), at most once per emission interval of the burst; if the map is still
/// full, every new key shares one overflow bucket until room appears. A flood of distinct
/// keys therefore costs at most `max_keys * BYTES_PER_KEY` plus the shards' fixed overhead,
/// and cannot grant the flood more than one extra bucket's worth of requests.
#[derive(Debug)]
pub struct Limiter {
    pub limit: Limit,
    /// For `scope = "cluster"`: this node's shares of the cluster's buckets; the node's own
    /// buckets then serve only `on_store_error = "local"`.
    pub cluster: Option<super::cluster::ClusterShares>,
    single: Bucket,
    overflow: Bucket,
    keyed: DashMap<Key, Bucket>,
    max_keys: usize,
    next_sweep_ns: AtomicU64,
}

impl Limiter {
    pub fn new(limit: Limit, max_keys: usize) -> Limiter {
        Limiter {
            limit,
            cluster: None,
            single: Bucket::default(),
            overflow: Bucket::default(),
            keyed: DashMap::new(),
            max_keys,
            next_sweep_ns: AtomicU64::new(0),
        }
    }

    /// Checks one request: against the policy's single bucket when `key` is `None`, else
    /// against that key's bucket.
    pub fn check(&self, key: Option<&Key>, now_ns: u64) -> Decision {
        if let Some(c) = &self.cluster {
            if !super::cluster::ClusterShares::store_down() {
                return c.check(&self.limit, key, now_ns);
            }
            match c.mode {
                StoreErrorMode::Allow => return Decision::admitted(),
                StoreErrorMode::Deny => {
                    return Decision {
                        unavailable: true,
                        ..Decision::refused(1_000_000_000)
                    }
                }
                StoreErrorMode::Local => {}
            }
        }
        let Some(key) = key else {
            return self.single.check(&self.limit, now_ns);
        };
        if let Some(bucket) = self.keyed.get(key) {
            return bucket.check(&self.limit, now_ns);
        }
        if self.keyed.len() >= self.max_keys {
            self.sweep(now_ns);
            if self.keyed.len() >= self.max_keys {
                return self.overflow.check(&self.limit, now_ns);
            }
        }
        let bucket = self.keyed.entry(*key).or_default();
        bucket.check(&self.limit, now_ns)
    }

    /// Gives back one request that [`Limiter::check`] admitted for `key`: another limit
    /// refused it, and it goes nowhere (nginx counts a request against its `limit_req`
    /// zones only once all admit it).
    pub fn give_back(&self, key: Option<&Key>) {
        if let Some(c) = &self.cluster {
            if !super::cluster::ClusterShares::store_down() {
                return c.give_back(key);
            }
            if c.mode != StoreErrorMode::Local {
                // Admitted without a bucket (allow), or not at all (deny).
                return;
            }
        }
        let Some(key) = key else {
            return self.single.give_back(&self.limit);
        };
        match self.keyed.get(key) {
            Some(bucket) => bucket.give_back(&self.limit),
            // Admitted by the overflow bucket while the map was full.
            None => self.overflow.give_back(&self.limit),
        }
    }

    /// Drops the buckets that are full again, at most once per emission interval of the
    /// burst ([`spaced_sweep`]: so a flood of new keys does not turn every request into a
    /// full scan).
    fn sweep(&self, now_ns: u64) {
        let every = self.limit.tolerance_ns.max(1_000_000);
        spaced_sweep(&self.next_sweep_ns, now_ns, every, || {
            self.keyed.retain(|_, b| b.arrival_ns() > now_ns);
        });
    }

    /// Number of keyed buckets held.
    pub fn keys(&self) -> usize {
        self.keyed.len()
    }
}

/// Runs `sweep` (of a full map of keys) once `next` (a time in ns) has come, in one worker
/// at a time: the others skip it until it has ended and set the next, [`sweep_gap`] after
/// this one's start.
pub(super) fn spaced_sweep(next: &AtomicU64, now_ns: u64, every_ns: u64, sweep: impl FnOnce()) {
    let due = next.load(Ordering::Relaxed);
    if now_ns < due
        || next
            .compare_exchange(due, u64::MAX, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    let started = Instant::now();
    sweep();
    let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    next.store(
        now_ns.saturating_add(sweep_gap(every_ns, took)),
        Ordering::Release,
    );
}

/// How long after a sweep's start the next may start: `every_ns`, and at least ten times
/// what the sweep took. A map of millions of keys that a flood keeps full takes a worker
/// tens of milliseconds to sweep; spaced by a fixed interval alone, sweeps would take all of
/// the workers' time and hold the map's shards from every other request meanwhile. At ten
/// times, they take at most a tenth of it.
fn sweep_gap(every_ns: u64, took_ns: u64) -> u64 {
    every_ns.max(took_ns.saturating_mul(10))
}

/// Limiters by policy id, so that a config change that leaves a rate-limit policy's id and
/// parameters alone keeps its buckets. Workers ask once per snapshot revision; a policy that
/// no snapshot any worker holds uses is freed (the registry keeps only a weak reference).
#[derive(Debug, Default)]
pub struct Registry {
    by_id: Mutex<HashMap<Box<str>, Entry>>,
}

type Entry = (RateParams, Weak<Limiter>);

impl Registry {
    /// The process-wide registry.
    pub fn global() -> &'static Registry {
        static REGISTRY: OnceLock<Registry> = OnceLock::new();
        REGISTRY.get_or_init(Registry::default)
    }

    /// The limiter for policy `id` with parameters `rl`: the existing one if the parameters
    /// are unchanged and someone still holds it, else a new one.
    pub fn get(&self, id: &str, rl: &RateLimit) -> Arc<Limiter> {
        let params = rl.params();
        let mut map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((p, weak)) = map.get(id) {
            if *p == params {
                if let Some(l) = weak.upgrade() {
                    return l;
                }
            }
        }
        let limit = Limit::new(rl.rate, rl.period_s * 1_000_000_000, rl.burst)
            .expect("compile checked rate, burst and period (rate <= 1e9 <= period in ns)");
        let mut limiter = Limiter::new(limit, rl.max_keys);
        if rl.scope == RateScope::Cluster {
            limiter.cluster = Some(super::cluster::ClusterShares::new(
                rl.on_store_error,
                rl.max_keys,
            ));
        }
        let limiter = Arc::new(limiter);
        map.retain(|_, (_, w)| w.strong_count() > 0);
        map.insert(id.into(), (params, Arc::downgrade(&limiter)));
        limiter
    }
}

impl Registry {
    /// The cluster-scoped limiters some snapshot still uses, by policy id.
    pub fn cluster_limiters(&self) -> super::cluster::ClusterLimiters {
        let map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter_map(|(id, (_, w))| {
                let l = w.upgrade()?;
                l.cluster.is_some().then(|| (id.clone(), l))
            })
            .collect()
    }
}

/// Nanoseconds on the process's monotonic clock, the time every real limiter check uses.
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    // Starts at one second so that a bucket's zero arrival time is always in the past.
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1_000_000_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::policy::RateKey;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_request_given_back_is_admitted_again() {
        let limit = Limit::new(10, 60 * SECOND, 2).unwrap();
        let l = Limiter::new(limit, 10);
        let t0 = 10 * SECOND;
        let key = key_of(b"a");
        for k in [None, Some(&key)] {
            assert!(l.check(k, t0).allowed && l.check(k, t0).allowed);
            assert!(!l.check(k, t0).allowed);
            l.give_back(k);
            assert!(l.check(k, t0).allowed);
            assert!(!l.check(k, t0).allowed);
        }
        // Given back to an idle bucket: no more than full.
        let b = Bucket::default();
        assert!(b.check(&limit, t0).allowed);
        b.give_back(&limit);
        b.give_back(&limit);
        let admitted = (0..5).filter(|_| b.check(&limit, t0).allowed).count();
        assert_eq!(admitted, 2);
    }

    #[test]
    fn burst_then_exact_refill() {
        let limit = Limit::new(1000, SECOND, 100).unwrap();
        let bucket = Bucket::default();
        let t0 = 10 * SECOND;
        let admitted = (0..150)
            .filter(|_| bucket.check(&limit, t0).allowed)
            .count();
        assert_eq!(admitted, 100);
        // One emission interval (1 ms) later exactly one more is admitted.
        let refused = bucket.check(&limit, t0 + 999_999);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ns, 1);
        assert!(bucket.check(&limit, t0 + 1_000_000).allowed);
        assert!(!bucket.check(&limit, t0 + 1_000_000).allowed);
    }

    #[test]
    fn retry_after_is_exact() {
        let limit = Limit::new(2, SECOND, 1).unwrap();
        let bucket = Bucket::default();
        let t0 = SECOND;
        assert!(bucket.check(&limit, t0).allowed);
        let d = bucket.check(&limit, t0 + 100_000_000);
        assert!(!d.allowed);
        // The next slot opens half a second after the first request.
        assert_eq!(d.retry_after_ns, 400_000_000);
        assert!(!bucket.check(&limit, t0 + 499_999_999).allowed);
        assert!(bucket.check(&limit, t0 + 500_000_000).allowed);
    }

    #[test]
    fn admits_burst_plus_rate_over_a_span() {
        // 1000/s with burst 100, driven far over the limit for 10 s of fake time.
        let limit = Limit::new(1000, SECOND, 100).unwrap();
        let bucket = Bucket::default();
        let start = SECOND;
        let admitted = (0..400_000u64)
            .map(|i| start + i * 25_000) // a request every 25 µs: 40,000/s
            .filter(|&t| t < start + 10 * SECOND)
            .filter(|&t| bucket.check(&limit, t).allowed)
            .count();
        // 100 at once, then one per millisecond: the 10,000th refill lands exactly on the end
        // of the span, which is excluded.
        assert_eq!(admitted, 10_099);
    }

    #[test]
    fn remaining_counts_down() {
        let limit = Limit::new(10, SECOND, 3).unwrap();
        let bucket = Bucket::default();
        let t = SECOND;
        let rem: Vec<_> = (0..3).map(|_| bucket.check(&limit, t).remaining).collect();
        assert_eq!(rem, [Some(2), Some(1), Some(0)]);
    }

    #[test]
    fn shared_by_threads_admits_exactly_the_burst() {
        let limit = Limit::new(1, SECOND, 1000).unwrap();
        let bucket = std::sync::Arc::new(Bucket::default());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let b = bucket.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .filter(|_| b.check(&limit, SECOND).allowed)
                        .count()
                })
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 1000);
    }

    #[test]
    fn keyed_buckets_are_separate_and_bounded() {
        let limit = Limit::new(1, SECOND, 2).unwrap();
        let l = Limiter::new(limit, 1000);
        let (a, b) = (key_of(b"10.0.0.1"), key_of(b"10.0.0.2"));
        assert!(l.check(Some(&a), SECOND).allowed);
        assert!(l.check(Some(&a), SECOND).allowed);
        assert!(!l.check(Some(&a), SECOND).allowed);
        assert!(l.check(Some(&b), SECOND).allowed);
        // Long keys are hashed into the fixed size, and stay distinct.
        let long1 = key_of(&[b'x'; 100]);
        let mut v = vec![b'x'; 100];
        v[99] = b'y';
        assert_ne!(long1, key_of(&v));
        assert_ne!(key_of(b"ab"), key_of(b"ab\0"));
    }

    #[test]
    fn a_million_distinct_keys_stay_within_max_keys() {
        // 1000/s, burst 10: a key's bucket is full again 10 ms after its one request.
        let limit = Limit::new(1000, SECOND, 10).unwrap();
        let l = Limiter::new(limit, 10_000);
        let mut now = SECOND;
        for i in 0..1_000_000u32 {
            now += 1_000; // 1,000,000 requests per second of fake time, each a new key
            l.check(Some(&key_of(&i.to_be_bytes())), now);
            assert!(l.keys() <= 10_000);
        }
        // Sweeps keep room: once the flood's buckets are full again (and the next sweep is
        // due: sweeps are spaced by real time too, ten times what one took), a new key gets
        // a bucket of its own, not the overflow's, whether the map was full (and is swept)
        // or not. (How many of the flood's keys shared the overflow bucket depends on how
        // fast this machine sweeps against the fake clock.)
        let after = key_of(b"after");
        assert!(l.check(Some(&after), now + 60 * SECOND).allowed);
        assert!(l.keyed.contains_key(&after), "{} keys", l.keys());
    }

    #[test]
    fn sweeps_are_spaced_by_ten_times_what_one_takes() {
        // A quick sweep: its interval.
        assert_eq!(sweep_gap(10_000_000, 50_000), 10_000_000);
        assert_eq!(sweep_gap(1_000_000, 50_000), 1_000_000);
        // A slow one (a huge map): ten times its time.
        assert_eq!(sweep_gap(10_000_000, 80_000_000), 800_000_000);
        assert_eq!(sweep_gap(1, u64::MAX), u64::MAX);
    }

    #[test]
    fn a_sweep_holds_off_the_next_until_its_gap_has_passed() {
        // 1000/s, burst 10: a map full of buckets that have refilled is swept by the next
        // new key.
        let limit = Limit::new(1000, SECOND, 10).unwrap();
        let l = Limiter::new(limit, 100);
        let now = SECOND;
        for i in 0..100u32 {
            l.check(Some(&key_of(&i.to_be_bytes())), now);
        }
        assert_eq!(l.keys(), 100);
        // All full again 10 ms later: the next new key sweeps them out.
        let later = now + 20_000_000;
        l.check(Some(&key_of(b"new")), later);
        assert_eq!(l.keys(), 1);
        // The next is set once the sweep has ended (not left held off for good).
        let next = l.next_sweep_ns.load(Ordering::Relaxed);
        assert!(next >= later + 1_000_000 && next < u64::MAX, "{next}");
    }

    #[test]
    fn registry_keeps_state_for_unchanged_policies() {
        let rl = |rate| RateLimit {
            rate,
            period_s: 1,
            burst: 1,
            key: RateKey::Route,
            max_keys: 10,
            x_ratelimit_headers: false,
            headers_on_success: false,
            scope: RateScope::Node,
            on_store_error: StoreErrorMode::Allow,
            policy_field: Box::new([]),
        };
        let reg = Registry::default();
        let a = reg.get("p", &rl(5));
        let b = reg.get("p", &rl(5));
        assert!(Arc::ptr_eq(&a, &b));
        let c = reg.get("p", &rl(6));
        assert!(!Arc::ptr_eq(&a, &c));
        drop((a, b, c));
        let d = reg.get("p", &rl(6));
        assert_eq!(d.limit.rate, 6);
    }

    #[test]
    fn invalid_limits_are_refused() {
        assert!(Limit::new(0, SECOND, 1).is_none());
        assert!(Limit::new(1, SECOND, 0).is_none());
        assert!(Limit::new(10, 5, 1).is_none());
    }
}
