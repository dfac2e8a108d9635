//! A flood of 1,000,000 distinct client keys against one keyed rate-limit policy (the default
//! `max_keys` of 100,000) must not grow memory past the documented bound,
//! `max_keys * BYTES_PER_KEY` plus the map's fixed overhead. A counting allocator measures the
//! live heap bytes; the clock is fake, and it runs fast enough that most keys' buckets are
//! still live when the map fills (the worst case for eviction).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use dataplane::policy::ratelimit::{key_of, Limit, Limiter, BYTES_PER_KEY};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grew(by: isize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: defers every operation to the system allocator; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size() as isize);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size() as isize);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size as isize - layout.size() as isize);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_million_distinct_keys_stay_within_the_documented_bound() {
    const SECOND: u64 = 1_000_000_000;
    const MAX_KEYS: usize = 100_000;
    // 10 per second, burst 10: a key's bucket stays live for a second after its request.
    let limit = Limit::new(10, SECOND, 10).expect("a valid limit");
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let limiter = Limiter::new(limit, MAX_KEYS);
    let mut now = SECOND;
    let mut admitted = 0u64;
    for i in 0..1_000_000u32 {
        // 200,000 new keys per second of fake time: the map fills in half a second.
        now += 5_000;
        let mut raw = [0u8; 17];
        raw[0] = b'i';
        raw[13..].copy_from_slice(&i.to_be_bytes());
        if limiter.check(Some(&key_of(&raw)), now).allowed {
            admitted += 1;
        }
        assert!(limiter.keys() <= MAX_KEYS);
    }
    let peak = (PEAK.load(Ordering::Relaxed) - before) as usize;
    let bound = MAX_KEYS * BYTES_PER_KEY;
    println!(
        "1,000,000 distinct keys: {} buckets held, peak heap growth {peak} bytes ({:.1} per key), documented bound {bound} bytes; {admitted} admitted",
        limiter.keys(),
        peak as f64 / MAX_KEYS as f64
    );
    assert!(
        peak <= bound + 64 * 1024,
        "peak {peak} over the bound {bound}"
    );
    // Sweeps made room again and again: far more than max_keys keys got their own bucket.
    assert!(admitted > 3 * MAX_KEYS as u64, "admitted {admitted}");
}
