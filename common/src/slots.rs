//! Stable metric slots for route ids, process-wide.
//!
//! Per-worker request counters are plain arrays indexed by slot, so the request path never
//! looks a route up by name or inserts into a map. A route id keeps its slot across config
//! changes (and gets it back if it is removed and added again), so counters survive them.
//! Slot 0 counts requests that matched no route; ids beyond [`MAX_ROUTE_SLOTS`] share the last
//! slot, reported as `(other)`.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// Number of slots, the no-route slot and the overflow slot included.
pub const MAX_ROUTE_SLOTS: usize = 4096;
/// Slot of requests no route matched.
pub const NO_ROUTE_SLOT: u32 = 0;
const OVERFLOW_SLOT: u32 = MAX_ROUTE_SLOTS as u32 - 1;

#[derive(Debug, Default)]
struct Registry {
    by_id: HashMap<String, u32>,
    names: Vec<String>,
}

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        Mutex::new(Registry {
            by_id: HashMap::new(),
            names: vec!["(none)".to_owned()],
        })
    })
}

/// The slot of route `id`, assigned on first sight.
pub fn route_slot(id: &str) -> u32 {
    let mut r = registry().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(&slot) = r.by_id.get(id) {
        return slot;
    }
    let next = r.names.len() as u32;
    if next >= OVERFLOW_SLOT {
        return OVERFLOW_SLOT;
    }
    r.names.push(id.to_owned());
    r.by_id.insert(id.to_owned(), next);
    next
}

/// The slot route `id` has, without assigning one: validating a config (a dry run, a write
/// that is refused) must not use up slots, which are never given back. A route that has
/// none yet counts in the overflow slot until [`route_slot`] assigns it one as its config is
/// published ([`crate::Snapshot::claim_metric_slots`]).
pub fn known_route_slot(id: &str) -> u32 {
    let r = registry().lock().unwrap_or_else(|p| p.into_inner());
    r.by_id.get(id).copied().unwrap_or(OVERFLOW_SLOT)
}

/// The label of every assigned slot, by slot number (for scraping).
pub fn route_slot_names() -> Vec<String> {
    let r = registry().lock().unwrap_or_else(|p| p.into_inner());
    let mut names = r.names.clone();
    if names.len() >= OVERFLOW_SLOT as usize {
        names.resize(OVERFLOW_SLOT as usize, String::new());
        names.push("(other)".to_owned());
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_stable_per_id() {
        let a = route_slot("slot-test-a");
        let b = route_slot("slot-test-b");
        assert_ne!(a, b);
        assert_ne!(a, NO_ROUTE_SLOT);
        assert_eq!(route_slot("slot-test-a"), a);
        assert_eq!(route_slot_names()[a as usize], "slot-test-a");
        // Looking a slot up assigns none.
        assert_eq!(known_route_slot("slot-test-never-published"), OVERFLOW_SLOT);
        assert!(!route_slot_names().contains(&"slot-test-never-published".to_owned()));
        assert_eq!(known_route_slot("slot-test-a"), a);
    }
}
