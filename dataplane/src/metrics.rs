//! Per-worker counters, summed only when scraped.
//!
//! Hot path. Each worker writes its own [`WorkerMetrics`]; nothing on the request path is
//! shared or contended. A counter is bumped with a relaxed load and store (not a locked
//! read-modify-write: there is one writer), and the control plane reads them with relaxed
//! loads when `/metrics` is scraped, so a scrape may be a few increments behind, never torn.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::slots::{route_slot_names, MAX_ROUTE_SLOTS};

use crate::error::{ErrorKind, SkipReason, StepError};
use crate::tls::HandshakeFailure;

/// Upper bounds of the latency histogram buckets, in microseconds (`+Inf` follows).
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

#[inline]
fn bump(c: &AtomicU64, by: u64) {
    // Single writer: a plain load and store is enough and avoids a locked instruction.
    c.store(
        c.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

/// The histogram bucket of a latency in microseconds.
#[inline]
fn bucket(us: u64) -> usize {
    LATENCY_BUCKETS_US
        .iter()
        .position(|&b| us <= b)
        .unwrap_or(LATENCY_BUCKETS_US.len())
}

/// Buckets of a latency histogram, `+Inf` included.
pub const BUCKETS: usize = LATENCY_BUCKETS_US.len() + 1;

/// `n` counters at zero, from zeroed memory (the OS maps pages only when first written).
fn zeroed_counters(n: usize) -> Box<[AtomicU64]> {
    let zeros: Box<[u64]> = vec![0u64; n].into_boxed_slice();
    // SAFETY: AtomicU64 has the same size, alignment and bit validity as u64, and the box is
    // given up to be rebuilt as the same allocation with the same length.
    unsafe { Box::from_raw(Box::into_raw(zeros) as *mut [AtomicU64]) }
}

/// One route's counters, summed over the workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteCounts {
    pub route: String,
    /// Requests by status class, 1xx to 5xx.
    pub by_class: [u64; 5],
    /// Latency histogram, [`LATENCY_BUCKETS_US`] then `+Inf`.
    pub buckets: [u64; BUCKETS],
}

/// Every route's counters so far (routes that served nothing yet included).
pub fn route_counts(workers: &[Arc<WorkerMetrics>]) -> Vec<RouteCounts> {
    route_slot_names()
        .into_iter()
        .enumerate()
        .map(|(slot, route)| {
            let mut c = RouteCounts {
                route,
                by_class: [0; 5],
                buckets: [0; BUCKETS],
            };
            for w in workers {
                for (class, n) in c.by_class.iter_mut().enumerate() {
                    *n += w.requests[slot * 5 + class].load(Ordering::Relaxed);
                }
                for (b, n) in c.buckets.iter_mut().enumerate() {
                    *n += w.route_latency[slot * BUCKETS + b].load(Ordering::Relaxed);
                }
            }
            c
        })
        .collect()
}

/// The latency under which a fraction `q` of the requests in `buckets` finished, in
/// microseconds (the upper bound of the bucket that reaches it; the last finite bound for
/// `+Inf`); `None` without requests.
pub fn quantile_us(buckets: &[u64; BUCKETS], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let want = (total as f64 * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= want {
            return Some(LATENCY_BUCKETS_US[i.min(LATENCY_BUCKETS_US.len() - 1)]);
        }
    }
    LATENCY_BUCKETS_US.last().copied()
}

/// A latency histogram.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    #[inline]
    pub fn observe(&self, us: u64) {
        self.observe_in(bucket(us), us);
    }

    /// [`Histogram::observe`] with the bucket already known.
    #[inline]
    fn observe_in(&self, bucket: usize, us: u64) {
        bump(&self.buckets[bucket], 1);
        bump(&self.sum_us, us);
    }
}

/// One worker's counters.
#[derive(Debug)]
pub struct WorkerMetrics {
    /// `[slot * 5 + status class]`: requests by route and status class (1xx..5xx).
    requests: Box<[AtomicU64]>,
    /// `[slot * BUCKETS + bucket]`: request latency by route (no sum), for the dashboard's
    /// per-route percentiles. Allocated zeroed, so the pages of unused slots stay unmapped.
    route_latency: Box<[AtomicU64]>,
    pub request_latency: Histogram,
    pub upstream_latency: Histogram,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    open_connections: AtomicU64,
    /// Times an accept loop stopped at `[limits] max_connections`.
    accept_paused: AtomicU64,
    /// Completed TLS handshakes.
    tls_handshakes: AtomicU64,
    /// Failed TLS handshakes, by reason.
    tls_failures: [AtomicU64; HandshakeFailure::ALL.len()],
    /// Access log lines dropped because the worker's log buffers were full.
    access_log_dropped: AtomicU64,
    /// Response bytes passed on through a pipe (`splice`), heads included.
    spliced_bytes: AtomicU64,
    /// Shaped answers relayed unchanged, by reason.
    transform_skipped: [AtomicU64; SkipReason::ALL.len()],
    /// Aggregate steps by (aggregate, step). Locked once per finished step by its worker,
    /// and by a scrape; aggregates are not the plain proxy path.
    steps: std::sync::Mutex<StepMap>,
}

/// Step counters by aggregate id, then step id.
type StepMap =
    std::collections::BTreeMap<Box<str>, std::collections::BTreeMap<Box<str>, StepStats>>;

/// One aggregate step's latency histogram and failures.
#[derive(Debug, Default, Clone)]
struct StepStats {
    buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: u64,
    failures: [u64; StepError::ALL.len()],
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            requests: (0..MAX_ROUTE_SLOTS * 5)
                .map(|_| AtomicU64::new(0))
                .collect(),
            route_latency: zeroed_counters(MAX_ROUTE_SLOTS * BUCKETS),
            request_latency: Histogram::default(),
            upstream_latency: Histogram::default(),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            transform_skipped: std::array::from_fn(|_| AtomicU64::new(0)),
            steps: Default::default(),
            open_connections: AtomicU64::new(0),
            accept_paused: AtomicU64::new(0),
            tls_handshakes: AtomicU64::new(0),
            tls_failures: std::array::from_fn(|_| AtomicU64::new(0)),
            access_log_dropped: AtomicU64::new(0),
            spliced_bytes: AtomicU64::new(0),
        }
    }
}

impl WorkerMetrics {
    /// Counts a finished request.
    #[inline]
    pub fn request(&self, slot: u32, status: u16, latency_us: u64) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        if let Some(c) = self.requests.get(slot as usize * 5 + class) {
            bump(c, 1);
        }
        let b = bucket(latency_us);
        if let Some(c) = self.route_latency.get(slot as usize * BUCKETS + b) {
            bump(c, 1);
        }
        self.request_latency.observe_in(b, latency_us);
    }

    /// Counts a request that ended with `kind`.
    #[inline]
    pub fn error(&self, kind: ErrorKind) {
        bump(&self.errors[kind as usize], 1);
    }

    /// Counts an access log line dropped for want of buffer space.
    #[inline]
    pub fn access_log_dropped(&self) {
        bump(&self.access_log_dropped, 1);
    }

    /// Counts response bytes passed on through a pipe.
    #[inline]
    pub fn spliced(&self, bytes: u64) {
        bump(&self.spliced_bytes, bytes);
    }

    /// Counts a shaped answer relayed unchanged.
    pub fn transform_skipped(&self, reason: SkipReason) {
        bump(&self.transform_skipped[reason as usize], 1);
    }

    /// Records an aggregate's finished steps: `(step id, microseconds, failure)` each. One
    /// lock per aggregate; allocates only the first time a step is seen.
    pub fn steps<'a>(
        &self,
        aggregate: &str,
        steps: impl Iterator<Item = (&'a str, u64, Option<StepError>)>,
    ) {
        let mut all = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        if !all.contains_key(aggregate) {
            all.insert(aggregate.into(), Default::default());
        }
        let Some(by_step) = all.get_mut(aggregate) else {
            return;
        };
        for (step, us, failed) in steps {
            if !by_step.contains_key(step) {
                by_step.insert(step.into(), StepStats::default());
            }
            let Some(s) = by_step.get_mut(step) else {
                continue;
            };
            s.buckets[bucket(us)] += 1;
            s.sum_us += us;
            if let Some(e) = failed {
                s.failures[e as usize] += 1;
            }
        }
    }

    /// Counts a TLS handshake: `None` completed, else why it failed.
    pub fn tls_handshake(&self, failed: Option<HandshakeFailure>) {
        match failed {
            None => bump(&self.tls_handshakes, 1),
            Some(why) => bump(&self.tls_failures[why as usize], 1),
        }
    }

    pub fn set_open_connections(&self, n: usize) {
        self.open_connections.store(n as u64, Ordering::Relaxed);
    }

    /// An accept loop stopped taking connections at `[limits] max_connections`.
    pub fn accept_paused(&self) {
        bump(&self.accept_paused, 1);
    }
}

/// Prometheus text exposition of the sum over `workers`.
pub fn render(workers: &[Arc<WorkerMetrics>], revision: u64) -> String {
    let sum = |f: &dyn Fn(&WorkerMetrics) -> &AtomicU64| -> u64 {
        workers.iter().map(|w| f(w).load(Ordering::Relaxed)).sum()
    };
    let mut out = String::new();
    out.push_str("# HELP gateway_requests_total Requests answered, by route and status class.\n");
    out.push_str("# TYPE gateway_requests_total counter\n");
    let names = route_slot_names();
    for (slot, name) in names.iter().enumerate() {
        for class in 0..5 {
            let n = sum(&|w: &WorkerMetrics| &w.requests[slot * 5 + class]);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "gateway_requests_total{{route=\"{}\",class=\"{}xx\"}} {n}",
                    escape(name),
                    class + 1
                );
            }
        }
    }
    out.push_str(
        "# HELP gateway_errors_total Requests that ended in an error, by the side that caused it and kind.\n",
    );
    out.push_str("# TYPE gateway_errors_total counter\n");
    for kind in ErrorKind::ALL {
        let n = sum(&|w: &WorkerMetrics| &w.errors[kind as usize]);
        let _ = writeln!(
            out,
            "gateway_errors_total{{side=\"{}\",kind=\"{}\"}} {n}",
            kind.side().label(),
            kind.label()
        );
    }
    out.push_str("# HELP gateway_access_log_dropped_total Access log lines dropped because the log buffers were full.\n");
    out.push_str("# TYPE gateway_access_log_dropped_total counter\n");
    let _ = writeln!(
        out,
        "gateway_access_log_dropped_total {}",
        sum(&|w: &WorkerMetrics| &w.access_log_dropped)
    );
    out.push_str("# HELP gateway_access_log_lost_total Access log lines lost because the log could not be opened or written.\n");
    out.push_str("# TYPE gateway_access_log_lost_total counter\n");
    let _ = writeln!(
        out,
        "gateway_access_log_lost_total {}",
        crate::access_log::LOST_LINES.load(Ordering::Relaxed)
    );
    out.push_str("# HELP gateway_spliced_bytes_total Response bytes sent to clients through a pipe (splice), the body never copied through the gateway's memory.\n");
    out.push_str("# TYPE gateway_spliced_bytes_total counter\n");
    let _ = writeln!(
        out,
        "gateway_spliced_bytes_total {}",
        sum(&|w: &WorkerMetrics| &w.spliced_bytes)
    );
    histogram(
        &mut out,
        "gateway_request_duration_seconds",
        "Time from a complete request head to the end of the response.",
        workers,
        |w| &w.request_latency,
    );
    histogram(
        &mut out,
        "gateway_upstream_response_duration_seconds",
        "Time from the request sent upstream to the final response head (past any 1xx).",
        workers,
        |w| &w.upstream_latency,
    );
    out.push_str("# HELP gateway_transform_skipped_total Answers of routes with `response` relayed unchanged, by reason.\n");
    out.push_str("# TYPE gateway_transform_skipped_total counter\n");
    for reason in SkipReason::ALL {
        let n = sum(&|w: &WorkerMetrics| &w.transform_skipped[reason as usize]);
        let _ = writeln!(
            out,
            "gateway_transform_skipped_total{{reason=\"{}\"}} {n}",
            reason.label()
        );
    }
    steps(&mut out, workers);
    out.push_str(
        "# HELP gateway_tls_handshakes_total TLS handshakes on client connections, by outcome.\n",
    );
    out.push_str("# TYPE gateway_tls_handshakes_total counter\n");
    let _ = writeln!(
        out,
        "gateway_tls_handshakes_total{{result=\"ok\"}} {}",
        sum(&|w: &WorkerMetrics| &w.tls_handshakes)
    );
    for why in HandshakeFailure::ALL {
        let n = sum(&|w: &WorkerMetrics| &w.tls_failures[why as usize]);
        let _ = writeln!(
            out,
            "gateway_tls_handshakes_total{{result=\"{}\"}} {n}",
            why.label()
        );
    }
    out.push_str("# HELP gateway_open_connections Client connections being served (parked idle ones excluded).\n");
    out.push_str("# TYPE gateway_open_connections gauge\n");
    let _ = writeln!(
        out,
        "gateway_open_connections {}",
        sum(&|w: &WorkerMetrics| &w.open_connections)
    );
    out.push_str(
        "# HELP gateway_accept_paused_total Times a worker stopped accepting connections at \
         [limits] max_connections.\n",
    );
    out.push_str("# TYPE gateway_accept_paused_total counter\n");
    let _ = writeln!(
        out,
        "gateway_accept_paused_total {}",
        sum(&|w: &WorkerMetrics| &w.accept_paused)
    );
    out.push_str("# HELP gateway_config_revision The config revision the workers serve.\n");
    out.push_str("# TYPE gateway_config_revision gauge\n");
    let _ = writeln!(out, "gateway_config_revision {revision}");
    out
}

fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    workers: &[Arc<WorkerMetrics>],
    pick: impl Fn(&WorkerMetrics) -> &Histogram,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut buckets = [0u64; LATENCY_BUCKETS_US.len() + 1];
    for (i, b) in buckets.iter_mut().enumerate() {
        *b = workers
            .iter()
            .map(|w| pick(w).buckets[i].load(Ordering::Relaxed))
            .sum();
    }
    let sum_us: u64 = workers
        .iter()
        .map(|w| pick(w).sum_us.load(Ordering::Relaxed))
        .sum();
    series(out, name, "", &buckets, sum_us);
}

/// One histogram series: its cumulative buckets, sum and count, with `labels` (`a="b",...`,
/// or empty) on each line.
fn series(out: &mut String, name: &str, labels: &str, buckets: &[u64], sum_us: u64) {
    let (sep, braces) = if labels.is_empty() {
        ("", String::new())
    } else {
        (",", format!("{{{labels}}}"))
    };
    let mut cumulative = 0;
    for (i, n) in buckets.iter().enumerate() {
        cumulative += n;
        let le = LATENCY_BUCKETS_US
            .get(i)
            .map_or("+Inf".to_owned(), |&b| format!("{}", b as f64 / 1e6));
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
        );
    }
    let _ = writeln!(out, "{name}_sum{braces} {}", sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count{braces} {cumulative}");
}

fn steps(out: &mut String, workers: &[Arc<WorkerMetrics>]) {
    let mut all: std::collections::BTreeMap<(Box<str>, Box<str>), StepStats> = Default::default();
    for w in workers {
        let steps = w.steps.lock().unwrap_or_else(|e| e.into_inner());
        let flat = steps
            .iter()
            .flat_map(|(a, m)| m.iter().map(move |(st, s)| ((a.clone(), st.clone()), s)));
        for (k, s) in flat {
            let t = all.entry(k).or_default();
            for (a, b) in t.buckets.iter_mut().zip(s.buckets) {
                *a += b;
            }
            t.sum_us += s.sum_us;
            for (a, b) in t.failures.iter_mut().zip(s.failures) {
                *a += b;
            }
        }
    }
    let name = "gateway_aggregate_step_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time an aggregate step took, by aggregate and step."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    for ((agg, step), s) in &all {
        let labels = format!("aggregate=\"{}\",step=\"{}\"", escape(agg), escape(step));
        series(out, name, &labels, &s.buckets, s.sum_us);
    }
    let name = "gateway_aggregate_step_failures_total";
    let _ = writeln!(
        out,
        "# HELP {name} Aggregate steps that failed, by aggregate, step and kind."
    );
    let _ = writeln!(out, "# TYPE {name} counter");
    for ((agg, step), s) in &all {
        for e in StepError::ALL {
            let n = s.failures[e as usize];
            if n > 0 {
                let _ = writeln!(
                    out,
                    "{name}{{aggregate=\"{}\",step=\"{}\",kind=\"{}\"}} {n}",
                    escape(agg),
                    escape(step),
                    e.label()
                );
            }
        }
    }
}

/// A label value as the Prometheus text format writes it: `\\`, `"` and a line end escaped.
pub fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_as_the_text_format_says() {
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }

    #[test]
    fn every_error_kind_has_a_counter() {
        let w = Arc::new(WorkerMetrics::default());
        for kind in ErrorKind::ALL {
            w.error(kind);
        }
        let text = render(&[w], 1);
        for kind in ErrorKind::ALL {
            let line = format!(
                "gateway_errors_total{{side=\"{}\",kind=\"{}\"}} 1\n",
                kind.side().label(),
                kind.label()
            );
            assert!(text.contains(&line), "{line} missing in:\n{text}");
        }
    }

    #[test]
    fn renders_sums_over_workers() {
        let a = Arc::new(WorkerMetrics::default());
        let b = Arc::new(WorkerMetrics::default());
        let slot = common::slots::route_slot("metrics-test-route");
        a.request(slot, 200, 150);
        b.request(slot, 204, 3_000);
        b.request(slot, 502, 20);
        a.error(ErrorKind::ConnectTimeout);
        b.access_log_dropped();
        a.spliced(65_000);
        b.spliced(1_000);
        a.set_open_connections(2);
        b.set_open_connections(3);
        let text = render(&[a, b], 7);
        assert!(
            text.contains("gateway_requests_total{route=\"metrics-test-route\",class=\"2xx\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("gateway_requests_total{route=\"metrics-test-route\",class=\"5xx\"} 1\n")
        );
        assert!(
            text.contains("gateway_errors_total{side=\"upstream\",kind=\"connect_timeout\"} 1\n")
        );
        assert!(text.contains("gateway_errors_total{side=\"upstream\",kind=\"send_timeout\"} 0\n"));
        assert!(text.contains("gateway_access_log_dropped_total 1\n"));
        assert!(text.contains("gateway_spliced_bytes_total 66000\n"));
        assert!(
            text.contains("gateway_request_duration_seconds_bucket{le=\"0.0001\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("gateway_request_duration_seconds_bucket{le=\"0.00025\"} 2\n"));
        assert!(text.contains("gateway_request_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("gateway_request_duration_seconds_count 3\n"));
        assert!(
            text.contains("gateway_request_duration_seconds_sum 0.00317\n"),
            "{text}"
        );
        assert!(text.contains("gateway_open_connections 5\n"));
        assert!(text.contains("gateway_config_revision 7\n"));
    }

    #[test]
    fn route_counts_and_quantiles() {
        let a = Arc::new(WorkerMetrics::default());
        let b = Arc::new(WorkerMetrics::default());
        let slot = common::slots::route_slot("metrics-quantile-route");
        for _ in 0..98 {
            a.request(slot, 200, 400);
        }
        b.request(slot, 503, 40_000);
        b.request(slot, 200, 40_000);
        let counts = route_counts(&[a, b]);
        let c = counts
            .iter()
            .find(|c| c.route == "metrics-quantile-route")
            .unwrap();
        assert_eq!(c.by_class, [0, 99, 0, 0, 1]);
        assert_eq!(quantile_us(&c.buckets, 0.5), Some(500));
        assert_eq!(quantile_us(&c.buckets, 0.99), Some(50_000));
        assert_eq!(quantile_us(&[0; BUCKETS], 0.5), None);
    }
}
