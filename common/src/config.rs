//! The declarative configuration: what an operator writes in a TOML or JSON file (and, later,
//! sends to the admin API). These types only describe; [`crate::Snapshot::compile`] is the one
//! place that checks them and turns them into something the data plane can run.
//!
//! Every struct refuses unknown fields, so a typo is an error that names the field instead of a
//! setting silently ignored.

use serde::{Deserialize, Serialize};

/// The whole gateway configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Number of data-plane worker threads, one per CPU. Default: the number of CPUs in this
    /// process's affinity mask. `--workers N` on the command line overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Addresses the data plane accepts client connections on. At least one.
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// Named groups of backend targets that routes send requests to.
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// Rules that choose, for each request, what answers it.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Timeouts, all in milliseconds.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Size limits on client requests.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Per-worker upstream keep-alive connection pools.
    #[serde(default)]
    pub upstream_pool: PoolConfig,
    /// Graceful shutdown on SIGTERM / SIGINT.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// The admin REST API.
    #[serde(default)]
    pub admin: AdminConfig,
}

/// The admin REST API (control plane).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `IP:PORT` the admin API listens on; never a data-plane listener. Port 0 picks a free
    /// port. A non-loopback address needs `token` (or `GATEWAY_ADMIN_TOKEN`). Default
    /// `127.0.0.1:9901`. Changes take effect after a restart.
    pub listen: String,
    /// Bearer token every admin request except `GET /v1/health` must carry. Default: the
    /// `GATEWAY_ADMIN_TOKEN` environment variable, else a token generated on first start and
    /// stored in the data directory (`admin-token`, mode 0600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9901".to_owned(),
            token: None,
        }
    }
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `IP:PORT` to listen on, for example `127.0.0.1:8080` or `[::1]:8080`. Port 0 picks a free
    /// port (the chosen one is printed at start). No default.
    pub address: String,
}

/// A named set of backend targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Unique id that routes refer to: letters, digits, `-`, `_`, `.`; 1 to 64 characters.
    pub id: String,
    /// The instances requests are spread over by weighted round robin. At least one.
    pub targets: Vec<TargetConfig>,
}

/// One backend instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `HOST:PORT`; a host name is resolved when the config is loaded. No default.
    pub address: String,
    /// Relative share of requests, 1 to 1000. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// A routing rule. Exactly one of `path` / `path_prefix`, and exactly one of `upstream` /
/// `respond`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique id, same alphabet as upstream ids.
    pub id: String,
    /// Matches this exact path (the request target before `?`), for example `/health`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Matches paths that start with this prefix at a segment boundary: `/api` matches `/api`,
    /// `/api/x` and `/api?q`, not `/apix`. A prefix ending in `/` matches anything under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Host names this route answers for: exact (`api.example.com`) or wildcard
    /// (`*.example.com`, one or more labels). Case-insensitive; the port is ignored.
    /// Default: any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Methods this route answers (case-sensitive tokens such as `GET`; `GET` implies `HEAD`).
    /// Default: any method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Remove the matched `path_prefix` before forwarding (`/api/x` → `/x`). Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub strip_prefix: bool,
    /// Id of the upstream that requests matching this route go to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// A fixed response the gateway sends itself, without any upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub respond: Option<DirectResponseConfig>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A response the gateway answers with itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponseConfig {
    /// Status code, 200 to 599. Default 200.
    #[serde(default = "default_status")]
    pub status: u16,
    /// Response body, sent as is. Default empty. At most 64 KiB.
    #[serde(default)]
    pub body: String,
    /// `Content-Type` of the body. Default `text/plain; charset=utf-8`.
    #[serde(default = "default_content_type")]
    pub content_type: String,
}

fn default_status() -> u16 {
    200
}
fn default_content_type() -> String {
    "text/plain; charset=utf-8".to_owned()
}

/// Timeouts in milliseconds. Each is at least 1 and at most 86,400,000 (one day).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// From the first byte of a request to the end of its head; on expiry the client gets 408 and
    /// the connection is closed. Default 10,000.
    pub client_header_ms: u64,
    /// Longest silence while reading a request body from the client (408 if no response started
    /// yet, then close). Default 30,000.
    pub client_body_ms: u64,
    /// How long an idle keep-alive client connection waits for its next request before the
    /// gateway closes it quietly. Default 60,000.
    pub client_idle_ms: u64,
    /// After this long without a next request, a keep-alive client connection gives its
    /// buffers and task back and waits in the worker's epoll set (about 100 bytes) until the
    /// client sends again. Lower saves memory with many idle clients; higher saves a few
    /// syscalls for clients that pause briefly between requests. 0 disables parking.
    /// Default 20.
    pub client_park_ms: u64,
    /// TCP connect to a target; on expiry 504. Default 5,000.
    pub upstream_connect_ms: u64,
    /// From the end of sending the request to the end of the response head; on expiry 504.
    /// Default 60,000.
    pub upstream_response_head_ms: u64,
    /// Longest silence while relaying a response body or an upgraded (WebSocket) tunnel before
    /// both connections are closed. Default 60,000.
    pub upstream_body_ms: u64,
    /// How long an idle pooled upstream connection is kept. Default 30,000.
    pub upstream_idle_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            client_header_ms: 10_000,
            client_body_ms: 30_000,
            client_idle_ms: 60_000,
            client_park_ms: 20,
            upstream_connect_ms: 5_000,
            upstream_response_head_ms: 60_000,
            upstream_body_ms: 60_000,
            upstream_idle_ms: 30_000,
        }
    }
}

/// Limits on what a client may send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request head (request line and fields), in bytes; larger: 431. 1,024 to
    /// 1,048,576. Default 16,384. Also bounds a response head from an upstream (larger: 502) and
    /// a chunked trailer section.
    pub max_header_bytes: usize,
    /// Most header fields in a request; more: 431. 1 to 256. Default 100.
    pub max_header_count: usize,
    /// Longest request target, in bytes; longer: 414. 16 up to `max_header_bytes`. Default 8,192.
    pub max_uri_bytes: usize,
    /// Largest request body, in bytes; larger: 413. Default 10,485,760 (10 MiB).
    pub max_body_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
            max_header_count: 100,
            max_uri_bytes: 8 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
        }
    }
}

/// Upstream keep-alive pools (one per worker and target).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Most idle connections kept per target in each worker; 0 disables pooling. At most
    /// 10,000. Default 64.
    pub max_idle_per_target: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_idle_per_target: 64,
        }
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After SIGTERM / SIGINT, how long in-flight requests may take to finish, in
    /// milliseconds, before the process exits anyway. Default 10,000.
    pub drain_timeout_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout_ms: 10_000,
        }
    }
}
