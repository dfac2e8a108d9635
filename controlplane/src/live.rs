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
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use dataplane::metrics::{quantile_us, route_counts, RouteCounts, BUCKETS};
use serde_json::{json, Value};

use crate::api::{json_response, Admin, Problem};

/// Longest a stream runs before the page must open it again.
const MAX_STREAM_SECONDS: u64 = 3600;
/// Most access log lines one request returns, and how far back from the end it looks.
const MAX_LOG_LINES: usize = 1000;
const LOG_TAIL_BYTES: u64 = 512 * 1024;

/// One query parameter `name` as a number in `1..=max`, `default` when absent.
fn number_param(raw: Option<&str>, name: &str, default: u64, max: u64) -> Result<u64, Problem> {
    let bad = |d: String| Problem::new(StatusCode::BAD_REQUEST, "Bad Query", d);
    let mut value = None;
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != name {
            return Err(bad(format!("unknown query parameter {k:?}")));
        }
        if value.replace(v).is_some() {
            return Err(bad(format!("{name} given more than once")));
        }
    }
    match value {
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
    let mut total_buckets = [0u64; BUCKETS];
    let (mut total_requests, mut total_errors) = (0u64, 0u64);
    let mut routes = Vec::new();
    for route in &snap.routes {
        let Some(cur) = now.routes.iter().find(|c| *c.route == *route.id) else {
            continue;
        };
        // The first line has nothing to compare with: no requests, no percentiles yet.
        let before = match prev {
            Some(p) => p.routes.iter().find(|c| c.route == cur.route),
            None => Some(cur),
        };
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
        let requests: u64 = by_class.iter().sum();
        let errors = by_class[4];
        total_requests += requests;
        total_errors += errors;
        for (t, n) in total_buckets.iter_mut().zip(buckets) {
            *t += n;
        }
        let rate = if seconds > 0.0 {
            requests as f64 / seconds
        } else {
            0.0
        };
        routes.push(json!({
            "route": &*route.id,
            "rps": (rate * 10.0).round() / 10.0,
            "error_rate": if requests > 0 { errors as f64 / requests as f64 } else { 0.0 },
            "p50_ms": ms(quantile_us(&buckets, 0.5)),
            "p99_ms": ms(quantile_us(&buckets, 0.99)),
            "requests_total": cur.by_class.iter().sum::<u64>(),
        }));
    }
    let rate = if seconds > 0.0 {
        total_requests as f64 / seconds
    } else {
        0.0
    };
    let line = json!({
        "time_ms": crate::store::local::now_ms(),
        "revision": snap.revision,
        "total": {
            "rps": (rate * 10.0).round() / 10.0,
            "error_rate": if total_requests > 0 { total_errors as f64 / total_requests as f64 } else { 0.0 },
            "p50_ms": ms(quantile_us(&total_buckets, 0.5)),
            "p99_ms": ms(quantile_us(&total_buckets, 0.99)),
        },
        "routes": routes,
    });
    (line, now)
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
    let state = (admin, None::<Sample>, interval, seconds + 1);
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
/// log file; 404 when the access log is off or goes to stdout.
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
    let read = || -> std::io::Result<Vec<String>> {
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let len = f.metadata()?.len();
        let from = len.saturating_sub(LOG_TAIL_BYTES);
        f.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        f.take(LOG_TAIL_BYTES).read_to_end(&mut bytes)?;
        let text = String::from_utf8_lossy(&bytes);
        let mut lines: Vec<&str> = text.lines().collect();
        if from > 0 && !lines.is_empty() {
            // The first line was cut by the window.
            lines.remove(0);
        }
        let skip = lines.len().saturating_sub(want);
        Ok(lines[skip..].iter().map(|l| (*l).to_owned()).collect())
    };
    let lines = read().map_err(|e| {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Unreadable Log",
            format!("{}: {e}", path.display()),
        )
    })?;
    Ok(json_response(
        StatusCode::OK,
        None,
        json!({"path": path.display().to_string(), "lines": lines}),
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
    match file.as_str() {
        "app.js" => static_file("text/javascript; charset=utf-8", APP_JS),
        "style.css" => static_file("text/css; charset=utf-8", STYLE_CSS),
        _ => Problem::not_found(format!("no dashboard file {file:?}")).into_response(),
    }
}
