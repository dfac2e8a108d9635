//! What the dashboard reads beyond the resources: a live stream of per-route rates, error
//! rates and latency percentiles (one JSON line a second, computed from the workers'
//! counters), the access log's last lines, and the dashboard's own static files.
//!
//! The stream is a plain streamed response (`application/x-ndjson`) rather than
//! Server-Sent Events: `EventSource` cannot send an `Authorization` header, a streamed
//! `fetch` can. It ends after `seconds` (at most an hour) so nothing lives forever; the page
//! opens it again.

use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use dataplane::metrics::{quantile_us, route_counts, RouteCounts, BUCKETS};
use serde_json::{json, Value};

use crate::api::{json_response, only_param, Admin, Problem};

/// Longest a stream runs before the page must open it again.
const MAX_STREAM_SECONDS: u64 = 3600;
/// Most access log lines one request returns; how far back from the end it looks first, and
/// at most (doubling the window while the lines asked for are not in it: long lines, a
/// `user_agent` or `path` of kilobytes, left 244 of 1,000 in the first).
const MAX_LOG_LINES: usize = 1000;
const LOG_TAIL_BYTES: u64 = 512 * 1024;
const LOG_TAIL_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// One query parameter `name` as a number in `1..=max`, `default` when absent.
fn number_param(raw: Option<&str>, name: &str, default: u64, max: u64) -> Result<u64, Problem> {
    let bad = |d: String| Problem::new(StatusCode::BAD_REQUEST, "Bad Query", d);
    match only_param(raw, name)? {
        None => Ok(default),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(bad(format!(
                "{name}={v:?}: expected a number from 1 to {max}"
            ))),
        },
    }
}

/// The counters at one moment.
struct Sample {
    at: Instant,
    routes: Vec<RouteCounts>,
}

fn ms(us: Option<u64>) -> Value {
    us.map_or(Value::Null, |us| json!(us as f64 / 1000.0))
}

/// One line of the stream: each configured route's requests per second, share of 5xx
/// answers and latency percentiles since `prev`, and the same over all routes.
fn tick(admin: &Admin, prev: Option<&Sample>) -> (Value, Sample) {
    let now = Sample {
        at: Instant::now(),
        routes: route_counts(&admin.worker_metrics()),
    };
    let snap = admin.snapshot();
    let seconds = prev.map_or(0.0, |p| now.at.duration_since(p.at).as_secs_f64());
    // Counters are by route slot, and slots only ever get added: the same index in the
    // previous sample is the same route.
    let slots: std::collections::HashMap<&str, usize> = now
        .routes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.route.as_str(), i))
        .collect();
    let delta_of = |slot: usize| {
        let cur = &now.routes[slot];
        // The first line has nothing to compare with: no requests, no percentiles yet.
        let before = match prev {
            Some(p) => p.routes.get(slot),
            None => Some(cur),
        };
        Delta::between(cur, before)
    };
    // The total counts every slot: requests no route matched (404s, refused heads), the
    // routes past the label cap and removed routes too, not only the routes listed.
    let mut total = Delta::default();
    for slot in 0..now.routes.len() {
        total.add(&delta_of(slot));
    }
    let mut routes = Vec::new();
    for route in &snap.routes {
        let Some(&slot) = slots.get(&*route.id) else {
            continue;
        };
        let cur = &now.routes[slot];
        let delta = delta_of(slot);
        let mut line = delta.summary(seconds);
        line.insert("route".into(), json!(&*route.id));
        line.insert(
            "requests_total".into(),
            json!(cur.by_class.iter().sum::<u64>()),
        );
        routes.push(Value::Object(line));
    }
    let line = json!({
        "time_ms": crate::store::local::now_ms(),
        "revision": snap.revision,
        "total": total.summary(seconds),
        "routes": routes,
    });
    (line, now)
}

/// Requests, 5xx answers and latencies between two samples.
#[derive(Default)]
struct Delta {
    requests: u64,
    errors: u64,
    buckets: [u64; BUCKETS],
}

impl Delta {
    fn between(cur: &RouteCounts, before: Option<&RouteCounts>) -> Delta {
        let mut by_class = cur.by_class;
        let mut buckets = cur.buckets;
        if let Some(b) = before {
            for (n, old) in by_class.iter_mut().zip(b.by_class) {
                *n = n.saturating_sub(old);
            }
            for (n, old) in buckets.iter_mut().zip(b.buckets) {
                *n = n.saturating_sub(old);
            }
        }
        Delta {
            requests: by_class.iter().sum(),
            errors: by_class[4],
            buckets,
        }
    }

    fn add(&mut self, other: &Delta) {
        self.requests += other.requests;
        self.errors += other.errors;
        for (t, n) in self.buckets.iter_mut().zip(other.buckets) {
            *t += n;
        }
    }

    /// `rps` over `seconds`, `error_rate`, `p50_ms`, `p99_ms`.
    fn summary(&self, seconds: f64) -> serde_json::Map<String, Value> {
        let rate = if seconds > 0.0 {
            self.requests as f64 / seconds
        } else {
            0.0
        };
        let error_rate = if self.requests > 0 {
            self.errors as f64 / self.requests as f64
        } else {
            0.0
        };
        let mut m = serde_json::Map::new();
        m.insert("rps".into(), json!((rate * 10.0).round() / 10.0));
        m.insert("error_rate".into(), json!(error_rate));
        m.insert("p50_ms".into(), ms(quantile_us(&self.buckets, 0.5)));
        m.insert("p99_ms".into(), ms(quantile_us(&self.buckets, 0.99)));
        m
    }
}

/// `GET /v1/stream?seconds=N`: one JSON line a second for N seconds (default and most 3600).
pub async fn stream(
    State(admin): State<Arc<Admin>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let seconds = number_param(
        raw.as_deref(),
        "seconds",
        MAX_STREAM_SECONDS,
        MAX_STREAM_SECONDS,
    )?;
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The counters now, and the first line a second later (before, the first line came at
    // once with nothing to compare: a 0 req/s dip in the dashboard's plot at every stream's
    // start, on every tab taking the stream over).
    interval.tick().await;
    let (_, base) = tick(&admin, None);
    let state = (admin, Some(base), interval, seconds);
    let lines =
        futures_util::stream::unfold(state, |(admin, prev, mut interval, left)| async move {
            if left == 0 {
                return None;
            }
            interval.tick().await;
            let (line, now) = tick(&admin, prev.as_ref());
            let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
            bytes.push(b'\n');
            Some((
                Ok::<_, Infallible>(Bytes::from(bytes)),
                (admin, Some(now), interval, left - 1),
            ))
        });
    let mut resp = Response::new(Body::from_stream(lines));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// `GET /v1/access_log?lines=N`: the last N lines (default 50, at most 1000) of the access
/// log file; 404 when the access log is off or goes to stdout. Only the gateway's own lines
/// (JSON objects starting with `"ts"`): `access_log.path` may name any file, and this must
/// not read out one that is not a log (a stored private key, another service's secrets).
pub async fn access_log_tail(
    State(admin): State<Arc<Admin>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let want = number_param(raw.as_deref(), "lines", 50, MAX_LOG_LINES as u64)? as usize;
    let snap = admin.snapshot();
    let path = match snap.access_log.as_ref().map(|l| &l.sink) {
        Some(common::snapshot::LogSink::File(p)) => p.clone(),
        _ => {
            return Err(Problem::not_found(
                "the access log is not written to a file (access_log.path)".into(),
            ))
        }
    };
    let read = || -> std::io::Result<Option<(Vec<String>, bool)>> {
        // Anything but a regular file (a FIFO a shipper reads, a socket) is not opened at
        // all; and without waiting for a writer, should it have become a FIFO since.
        match std::fs::metadata(&path) {
            Ok(meta) if !meta.is_file() => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Some((Vec::new(), false)))
            }
            _ => {}
        }
        let open = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path);
        let mut f = match open {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Some((Vec::new(), false)))
            }
            Err(e) => return Err(e),
        };
        let meta = f.metadata()?;
        if !meta.is_file() {
            // A FIFO (a log shipper reads it) has nothing to read back, and reading it would
            // take lines from the shipper.
            return Ok(None);
        }
        let len = meta.len();
        let mut window = LOG_TAIL_BYTES;
        loop {
            let from = len.saturating_sub(window);
            // Read from the byte before the window: the first line is then what the window
            // cut, or, where a line ended just before it, empty; never a whole line, and it
            // goes (the review found a whole one dropped, and `truncated` said, when the
            // window began where a line did).
            let at = from.saturating_sub(1);
            f.seek(SeekFrom::Start(at))?;
            let mut bytes = Vec::new();
            (&mut f).take(len - at).read_to_end(&mut bytes)?;
            let text = String::from_utf8_lossy(&bytes);
            let mut lines: Vec<&str> = text.lines().collect();
            if from > 0 && !lines.is_empty() {
                lines.remove(0);
            }
            lines.retain(|l| l.starts_with("{\"ts\":\"") && l.ends_with('}'));
            let short = lines.len() < want && from > 0;
            if short && window < LOG_TAIL_MAX_BYTES {
                window *= 2;
                continue;
            }
            let skip = lines.len().saturating_sub(want);
            let lines = lines[skip..].iter().map(|l| (*l).to_owned()).collect();
            return Ok(Some((lines, short)));
        }
    };
    let read = read().map_err(|e| {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Unreadable Log",
            format!("{}: {e}", path.display()),
        )
    })?;
    let Some((lines, cut)) = read else {
        return Err(Problem::not_found(format!(
            "the access log goes to {}, which is not a regular file: nothing to read back",
            path.display()
        )));
    };
    Ok(json_response(
        StatusCode::OK,
        None,
        // `truncated`: fewer lines than asked, as the file's last 16 MiB hold no more.
        json!({"path": path.display().to_string(), "lines": lines, "truncated": cut}),
    ))
}

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    resp
}

/// `GET /ui`: the dashboard page.
pub async fn ui_index() -> Response {
    static_file("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /ui/{file}`: its script and style sheet.
pub async fn ui_file(Path(file): Path<String>) -> Response {
    match ui_file_named(&file) {
        Ok((_, content_type, body)) => static_file(content_type, body),
        Err(p) => p.into_response(),
    }
}

/// The dashboard's files under `/ui/`: name, content type, content.
const UI_FILES: [(&str, &str, &str); 2] = [
    ("app.js", "text/javascript; charset=utf-8", APP_JS),
    ("style.css", "text/css; charset=utf-8", STYLE_CSS),
];

/// The dashboard file `name` (under `/ui/`), or the 404 for a name that is none.
pub fn ui_file_named(name: &str) -> Result<(&'static str, &'static str, &'static str), Problem> {
    (UI_FILES.iter().find(|(n, ..)| *n == name).copied())
        .ok_or_else(|| Problem::not_found(format!("no dashboard file {name:?}")))
}
