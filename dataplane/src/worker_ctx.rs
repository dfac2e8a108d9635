//! State one worker shares among its connection tasks ([`WorkerCtx`]). The worker builds it
//! and the request path reads it, so neither imports the other for it.

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use common::Snapshot;

use crate::access_log::WorkerLog;
use crate::metrics::WorkerMetrics;
use crate::park::ParkLot;
use crate::trace::Rng;
use crate::upstream::Pool;

/// Per-worker state shared by that worker's connection tasks (single-threaded: `Rc`, `Cell`).
#[derive(Debug)]
pub(crate) struct WorkerCtx {
    pub config: Arc<ArcSwap<Snapshot>>,
    /// The snapshot this worker last saw, shared by its requests without touching the
    /// `Arc`'s counter, which every worker would otherwise bounce between cores twice per
    /// request. The extra `Rc` is allocated once per config change, not per request.
    #[allow(clippy::redundant_allocation)]
    pub current: RefCell<Rc<Arc<Snapshot>>>,
    /// The published pointer as last loaded: looking whether it changed is one atomic
    /// load (an `ArcSwap::load` takes and returns a debt slot: about 40 instructions).
    pub published: RefCell<arc_swap::Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>>,
    pub pool: RefCell<Pool>,
    /// HTTP/2 connections to `h2c` and `grpc` upstreams.
    pub h2pool: RefCell<crate::h2pool::H2Pool>,
    pub rr: RefCell<RoundRobin>,
    /// Each upstream's target set as this worker last saw it (see [`WorkerCtx::target_set`]).
    pub sets: RefCell<SetCache>,
    /// Set once shutdown begins: finish the current request, then close.
    pub draining: Cell<bool>,
    /// Set when the drain's time is up: requests still being answered are given up and
    /// tunnels still open end now, so that their requests are logged before the access log
    /// closes.
    pub cut_off: Cell<bool>,
    /// The tasks of the requests being answered, woken when `cut_off` is set.
    pub cut: RefCell<CutList>,
    /// In the drain of a binary upgrade: until when a keep-alive connection waiting for its
    /// next request still takes one (answered with `Connection: close`), since its client may
    /// already be sending it; the successor serves whatever comes next.
    pub handover_until: Cell<Option<Instant>>,
    /// Accept loops still running (a binary upgrade's drain waits for them to end: an accept
    /// left pending when the runtime goes could take a connection nobody would serve).
    pub accepting: Cell<usize>,
    /// Connections waiting for their next request, closed at once on shutdown.
    pub idle: RefCell<IdleSet>,
    /// Keep-alive connections idle past `client_park_ms`; `None` when epoll is unavailable.
    pub park: RefCell<Option<ParkLot>>,
    pub metrics: Arc<WorkerMetrics>,
    /// This worker's handles on the shared rate-limit buckets.
    pub limiters: RefCell<crate::policy::Limiters>,
    /// This worker's end of the access log.
    pub log: RefCell<WorkerLog>,
    /// Request ids, trace ids and log sampling.
    pub rng: RefCell<Rng>,
    /// A wall-clock reading and the monotonic instant it was taken at, renewed every
    /// housekeeping tick: access log timestamps come from it without a clock call per request.
    pub wall: Cell<(Instant, SystemTime)>,
    pub active: Cell<usize>,
    /// When this worker last logged that it holds `[limits] max_connections` connections.
    pub full_logged: Cell<Option<Instant>>,
    pub index: usize,
}

/// Per upstream, the target set this worker last saw, reset when the snapshot changes.
#[derive(Debug, Default)]
#[allow(clippy::redundant_allocation)]
pub(crate) struct SetCache {
    revision: u64,
    /// [`common::live::GENERATION`] when the entries were taken: while it has not moved, no
    /// set was published and the entries are current.
    generation: u64,
    sets: Vec<Option<Rc<Arc<common::live::TargetSet>>>>,
}

/// Per-upstream position in its round-robin schedule, kept across snapshots: by upstream
/// index, the upstream's live state (its address, the same while the upstream keeps its id)
/// and its next position. Before, every new revision restarted every schedule, so an
/// automation writing consumers every few seconds sent most requests to the first targets.
#[derive(Debug, Default)]
pub(crate) struct RoundRobin {
    next: Vec<(usize, u32)>,
}

impl WorkerCtx {
    /// The wall-clock time of the monotonic instant `at` (within a tick of a clock step).
    pub fn wall_time(&self, at: Instant) -> SystemTime {
        let (base, wall) = self.wall.get();
        match at.checked_duration_since(base) {
            Some(d) => wall + d,
            None => wall - base.duration_since(at),
        }
    }

    /// Takes a new wall-clock reading (the worker's housekeeping tick).
    pub fn renew_wall(&self) {
        self.wall.set((Instant::now(), SystemTime::now()));
    }

    /// The current target set of upstream `index` (of a snapshot with `revision` and `count`
    /// upstreams) for one exchange: one load of the publication counter while nothing was
    /// published, and a new local handle only when a set changed, so requests that hold it
    /// to their end touch no shared reference count.
    #[allow(clippy::redundant_allocation)]
    pub fn target_set(
        &self,
        revision: u64,
        count: usize,
        index: usize,
        live: &common::live::UpstreamLive,
    ) -> Rc<Arc<common::live::TargetSet>> {
        let mut cache = self.sets.borrow_mut();
        let generation = common::live::GENERATION.load(std::sync::atomic::Ordering::Acquire);
        if cache.revision != revision || cache.sets.len() != count || cache.generation != generation
        {
            cache.revision = revision;
            cache.generation = generation;
            cache.sets.clear();
            cache.sets.resize(count, None);
        }
        if let Some(rc) = &cache.sets[index] {
            return rc.clone();
        }
        let published = live.set.load();
        let rc = Rc::new(Arc::clone(&published));
        cache.sets[index] = Some(rc.clone());
        rc
    }

    /// The current snapshot for one request: a check of the published pointer (no shared
    /// write), and a new local handle only when the config changed.
    #[allow(clippy::redundant_allocation)]
    pub fn snapshot(&self) -> Rc<Arc<Snapshot>> {
        let mut cache = self.published.borrow_mut();
        let published = cache.load();
        let mut current = self.current.borrow_mut();
        if !Arc::ptr_eq(published, &current) {
            *current = Rc::new(Arc::clone(published));
        }
        Rc::clone(&current)
    }
}

impl RoundRobin {
    /// The next position in the schedule of the upstream whose live state is at `live`,
    /// upstream `index` of a snapshot with `count`. A new upstream starts at `offset` (each
    /// worker at its own, so they do not all hit the same target first); one a new snapshot
    /// moved to another index takes its position along.
    pub fn next(&mut self, live: usize, count: usize, index: usize, offset: u32) -> u32 {
        if self.next.len() < count {
            self.next.resize(count, (0, 0));
        }
        if self.next[index].0 != live {
            match self.next.iter().position(|&(l, _)| l == live) {
                Some(at) => self.next.swap(at, index),
                None => {
                    // What held the index goes to the end, where its upstream (moved to an
                    // index not looked up yet) finds it; upstreams since removed are let go
                    // once they outnumber the current ones.
                    let moved = std::mem::replace(&mut self.next[index], (live, offset));
                    if moved.0 != 0 && self.next.len() < 2 * count + 16 {
                        self.next.push(moved);
                    }
                }
            }
        }
        let n = self.next[index].1;
        self.next[index].1 = n.wrapping_add(1);
        n
    }
}

/// Values in numbered slots that are reused: a freed slot is taken again before the list
/// grows, so nothing allocates once warm. A free slot holds `T::default()`.
#[derive(Debug, Default)]
pub(crate) struct Slots<T> {
    slots: Vec<T>,
    free: Vec<usize>,
}

impl<T: Default> Slots<T> {
    /// Puts `value` in a free slot and returns its number.
    pub fn insert(&mut self, value: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = value;
                i
            }
            None => {
                self.slots.push(value);
                self.slots.len() - 1
            }
        }
    }

    pub fn remove(&mut self, slot: usize) {
        self.slots[slot] = T::default();
        self.free.push(slot);
    }
}

/// Raw fds of idle connections.
pub(crate) type IdleSet = Slots<Option<RawFd>>;

impl IdleSet {
    pub fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.slots.iter().filter_map(|&fd| fd)
    }
}

/// The wakers of the tasks answering requests, one slot per connection (per stream on
/// HTTP/2), so that the drain's end reaches requests waiting on anything (an upstream, a
/// client's window): see [`crate::proxy::serve`]. A slot is taken with no waker yet.
pub(crate) type CutList = Slots<Option<Waker>>;

impl CutList {
    /// Keeps `waker` for `slot` (a clone only when it is another task's).
    pub fn set(&mut self, slot: usize, waker: &Waker) {
        let kept = &mut self.slots[slot];
        if !kept.as_ref().is_some_and(|k| k.will_wake(waker)) {
            *kept = Some(waker.clone());
        }
    }

    /// Wakes every task in the list.
    pub fn wake_all(&mut self) {
        for waker in self.slots.iter_mut().filter_map(Option::take) {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RoundRobin;

    #[test]
    fn round_robin_positions_follow_their_upstream_across_snapshots() {
        let mut rr = RoundRobin::default();
        // Upstreams at 0x10 and 0x20, indexes 0 and 1; this worker starts at 5.
        assert_eq!(rr.next(0x10, 2, 0, 5), 5);
        assert_eq!(rr.next(0x10, 2, 0, 5), 6);
        assert_eq!(rr.next(0x20, 2, 1, 5), 5);
        // A new snapshot puts 0x30 first: the others move and keep their positions.
        assert_eq!(rr.next(0x20, 3, 2, 5), 6);
        assert_eq!(rr.next(0x30, 3, 0, 5), 5);
        assert_eq!(rr.next(0x10, 3, 1, 5), 7);
        assert_eq!(rr.next(0x10, 3, 1, 5), 8);
        // 0x30 goes; 0x10 back at index 0 keeps its position, 0x20 too.
        assert_eq!(rr.next(0x10, 2, 0, 5), 9);
        assert_eq!(rr.next(0x20, 2, 1, 5), 7);
        // The list stays bounded however many upstreams come and go.
        for live in 0x100..0x200 {
            rr.next(live, 2, 0, 0);
        }
        assert!(rr.next.len() <= 2 * 2 + 16, "{}", rr.next.len());
    }
}
