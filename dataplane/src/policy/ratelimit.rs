//! Token-bucket rate limiting in GCRA form: one atomic "theoretical arrival time" per bucket,
//! one compare-and-swap per check, shared by all workers, so a limit of R per period is R for
//! the whole node.
//!
//! Hot path. Time is a parameter (nanoseconds on a monotonic clock the caller owns), so tests
//! drive a fake clock. A bucket admits `burst` requests at once and then one every
//! `period / rate`: over a span S it admits at most `burst + S * rate / period` requests.

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Requests that could still be admitted right now.
    pub remaining: u64,
    /// Nanoseconds until the bucket is full again.
    pub reset_ns: u64,
    /// When refused: nanoseconds until a request would be admitted.
    pub retry_after_ns: u64,
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
                    remaining: 0,
                    reset_ns: base - now_ns,
                    retry_after_ns,
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
                        remaining: (limit.tolerance_ns - used) / limit.emission_ns,
                        reset_ns: used,
                        retry_after_ns: 0,
                    };
                }
                Err(current) => tat = current,
            }
        }
    }

    /// The bucket's arrival time (idle buckets, whose time is past, can be evicted).
    pub fn arrival_ns(&self) -> u64 {
        self.tat.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

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
        let rem: Vec<u64> = (0..3).map(|_| bucket.check(&limit, t).remaining).collect();
        assert_eq!(rem, [2, 1, 0]);
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
    fn invalid_limits_are_refused() {
        assert!(Limit::new(0, SECOND, 1).is_none());
        assert!(Limit::new(1, SECOND, 0).is_none());
        assert!(Limit::new(10, 5, 1).is_none());
    }
}
