//! The compiled, immutable [`Snapshot`] the workers read, and [`Snapshot::compile`], the one
//! validating function that builds it from a [`Config`]. A config file and (later) an admin API
//! change both go through it, so an invalid config cannot be represented in a snapshot.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::aggregate::{Aggregate, Profile, ProfileMatch, Shape, Template};
use crate::config::{Balance, Config, DirectResponseConfig, RouteConfig};
use crate::live::{Passive, UpstreamLive};
use crate::router::{PathTable, Router, Seg};
use crate::validate::{check_id, first_repeat, tolerated, valid_host_pattern};
use crate::ConfigError;

pub use crate::validate::is_tchar;

/// Most targets in one upstream.
pub const MAX_TARGETS: usize = 256;
/// Largest target weight.
pub const MAX_WEIGHT: u32 = 1000;
/// Largest `max_header_count` (the parser keeps header slots on the stack).
pub const MAX_HEADER_COUNT: usize = 256;
/// Largest direct-response body.
pub const MAX_DIRECT_BODY: usize = 64 * 1024;

/// Everything a worker needs to serve requests, compiled once per config change.
#[derive(Debug)]
pub struct Snapshot {
    /// Monotonically increasing config revision.
    pub revision: u64,
    /// Configured worker count, if any.
    pub workers: Option<usize>,
    /// Listen addresses (binding happens at start; a change needs a restart).
    pub listeners: Vec<SocketAddr>,
    /// Per listener, in the order of `listeners`: TLS and HTTP/2 (these change at runtime).
    pub listener_protocols: Vec<ListenerProtocols>,
    /// Each listener's redirect, which answers every request on it (index as `listeners`).
    pub listener_redirects: Vec<Option<Box<Redirect>>>,
    /// Every certificate, in config order (for their expiry in the metrics).
    pub certificates: Vec<std::sync::Arc<crate::tls::Certificate>>,
    /// Ids of the certificates served as their `cert_file` reads now but never published so
    /// (the file changed while the gateway was down): the next change publishes them, and
    /// refuses one that has expired ([`Snapshot::refuse_newly_expired`]).
    pub unpublished_certificates: Vec<String>,
    /// HTTP/2 limits and windows.
    pub http2: crate::config::Http2Config,
    pub router: Router,
    pub routes: Vec<Route>,
    pub upstreams: Vec<Upstream>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// Most idle pooled connections per target and worker.
    pub max_idle_per_target: usize,
    /// Whether large response bodies may be spliced (`[relay] splice`).
    pub splice: bool,
    pub drain_timeout: Duration,
    /// Where the admin API listens.
    pub admin_listen: SocketAddr,
    /// Consumers, credentials and policies, compiled.
    pub policies: crate::policy::Policies,
    /// The access log, when one is configured.
    pub access_log: Option<AccessLog>,
    /// Request ids and trace context.
    pub tracing: crate::config::TracingConfig,
    /// Fan-outs that routes refer to.
    pub aggregates: Vec<Aggregate>,
    /// Client profiles that route variants refer to.
    pub profiles: Vec<Profile>,
    /// JSON to gRPC transcoders that routes refer to.
    pub transcoders: Vec<std::sync::Arc<crate::transcode::Transcoder>>,
    /// This node in a cluster, if it is in one.
    pub cluster: Option<Cluster>,
    /// The config this snapshot was compiled from, normalised (for `GET` and diffs): API
    /// keys appear only as `key_sha256`.
    pub config: Config,
}

/// `[cluster]`, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub node_id: Box<str>,
    /// Where cluster-scoped rate limits are counted.
    pub redis: Option<RedisAddr>,
    pub sync: Duration,
}

/// A Redis server: `redis://[[USER]:PASSWORD@]HOST:PORT[/DB]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisAddr {
    /// `HOST:PORT` (the host resolved when connecting).
    pub address: Box<str>,
    /// A Redis 6 ACL user, if the URL names one (`redis://USER:PASSWORD@...`).
    pub user: Option<Box<str>>,
    pub password: Option<Box<str>>,
    pub db: u32,
}

impl RedisAddr {
    /// Parses a `redis://` URL.
    pub fn parse(url: &str) -> Result<RedisAddr, String> {
        let bad = || {
            let shown = crate::redact_url(url);
            format!("{shown:?} is not redis://[[USER]:PASSWORD@]HOST:PORT[/DB]")
        };
        let rest = url.strip_prefix("redis://").ok_or_else(bad)?;
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        // `:PASSWORD`, `USER:PASSWORD` (the password may hold more colons) or `PASSWORD`,
        // each percent-decoded.
        let decoded = |s: &str| percent_decoded(s).ok_or_else(bad);
        let (user, password) = match auth.map(|a| a.split_once(':')) {
            None => (None, None),
            Some(None) => (None, auth.map(decoded).transpose()?),
            Some(Some(("", p))) => (None, Some(decoded(p)?)),
            Some(Some((u, p))) => (Some(decoded(u)?), Some(decoded(p)?)),
        };
        let (address, db) = match rest.split_once('/') {
            Some((a, "")) => (a, 0),
            Some((a, d)) => (a, d.parse().map_err(|_| bad())?),
            None => (rest, 0),
        };
        let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad());
        }
        Ok(RedisAddr {
            address: address.into(),
            user: user.map(Into::into),
            password: password.map(Into::into),
            db,
        })
    }
}

/// `s` with its `%XX` escapes decoded (RFC 3986 2.1); `None` for a bad escape or a result
/// that is not UTF-8. For the user information of store URLs (Redis here, etcd in the
/// control plane) and the admin API's query.
pub fn percent_decoded(s: &str) -> Option<String> {
    String::from_utf8(pct_decode(s.as_bytes())?.into_owned()).ok()
}

/// Decodes `%XX` escapes; `None` for a malformed one (`%` without two hex digits after it).
pub fn pct_decode(raw: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    if !raw.contains(&b'%') {
        return Some(std::borrow::Cow::Borrowed(raw));
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            out.push(unescape(*raw.get(i + 1)?, *raw.get(i + 2)?)?);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    Some(std::borrow::Cow::Owned(out))
}

/// The byte two hex digits spell (a `%XX` escape's, RFC 3986 §2.1).
pub fn unescape(hi: u8, lo: u8) -> Option<u8> {
    let digit = |b: u8| (b as char).to_digit(16);
    Some((digit(hi)? * 16 + digit(lo)?) as u8)
}

/// The compiled access log settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLog {
    /// Where lines go.
    pub sink: LogSink,
    /// Of 1xx to 4xx answers, log those whose uniform draw in `0..2^32` is below this
    /// (`u64` so that a sample of 1.0 logs every one).
    pub sample_below: u64,
}

/// Where access log lines are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogSink {
    Stdout,
    File(std::path::PathBuf),
}

impl AccessLog {
    fn compile(c: &crate::config::AccessLogConfig) -> Result<AccessLog, ConfigError> {
        if !(0.0..=1.0).contains(&c.sample) {
            return Err(ConfigError::field(
                "access_log.sample",
                "must be a fraction from 0.0 to 1.0",
            ));
        }
        let sink = match c.path.as_str() {
            "" => {
                return Err(ConfigError::field(
                    "access_log.path",
                    "must be a file path or \"stdout\"",
                ))
            }
            "stdout" => LogSink::Stdout,
            p if !p.starts_with('/') => {
                return Err(ConfigError::field(
                    "access_log.path",
                    "must be an absolute path or \"stdout\"",
                ))
            }
            p => LogSink::File(p.into()),
        };
        Ok(AccessLog {
            sink,
            sample_below: (c.sample * 4_294_967_296.0) as u64,
        })
    }
}

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    pub id: Box<str>,
    /// Methods accepted; `None` accepts any.
    pub methods: Option<Box<[Box<[u8]>]>>,
    /// Bytes of the matched prefix to remove before forwarding (0: none).
    pub strip_prefix_len: usize,
    pub action: RouteAction,
    /// Where this route's request counters live ([`crate::slots`]).
    pub metrics_slot: u32,
    /// Indices into `Snapshot::policies.list`, global ones included, in stage order.
    pub policies: Box<[u16]>,
    /// Whether a `cors` policy is among them: the route then also takes CORS preflights
    /// (`OPTIONS`), which that policy answers, whatever its `methods`.
    pub has_cors: bool,
    /// It names no `methods` and each of its answers is an aggregate no step of which
    /// carries the client's body: it takes reads only (GET, HEAD; others get its 405).
    pub reads_only: bool,
    /// The segments of a parametrised `path` (empty for other routes).
    pub pattern: Box<[Seg]>,
    /// The names of its `{name}` parameters, in path order.
    pub params: Box<[Box<str>]>,
    /// The forwarded request target of a proxied route, when rewritten.
    pub rewrite: Option<Template>,
    /// Reshaping of a proxied route's JSON answers.
    pub shape: Option<Shape>,
    /// Answers for kinds of client, tried in order after the policies.
    pub variants: Box<[Variant]>,
    /// `Vary` value naming the request fields the variants' profiles read (empty: none).
    pub vary: Box<[u8]>,
    /// Index into `Snapshot::transcoders`: JSON requests become gRPC calls.
    pub transcoder: Option<usize>,
    /// Fields set on, or removed from, what the route forwards and answers.
    pub headers: Option<Arc<crate::headers::RouteHeaders>>,
}

/// A route's answer for one client profile.
#[derive(Debug)]
pub struct Variant {
    /// Index into the snapshot's profiles.
    pub profile: usize,
    /// `Proxy` or `Aggregate`.
    pub action: RouteAction,
    pub rewrite: Option<Template>,
    pub shape: Option<Shape>,
}

impl Route {
    /// Whether this route takes `method`. A route that takes GET also takes HEAD, as every
    /// GET resource must (RFC 9110 §9.3.2). TRACE only where `methods` names it: it echoes
    /// the request, credentials included, back to whoever can make a client send it.
    #[inline]
    pub fn accepts(&self, method: &[u8]) -> bool {
        match &self.methods {
            None => method != b"TRACE",
            Some(list) => list
                .iter()
                .any(|m| &m[..] == method || (method == b"HEAD" && &m[..] == b"GET")),
        }
    }

    /// Whether this route answers `method` with what it does rather than a 405: it takes it
    /// ([`Route::accepts`]), and a route that takes reads only is asked for a read.
    pub fn serves(&self, method: &[u8]) -> bool {
        self.accepts(method) && (!self.reads_only || matches!(method, b"GET" | b"HEAD"))
    }
}

/// What a route does with a request.
#[derive(Debug)]
pub enum RouteAction {
    /// Forward to `upstreams[index]`.
    Proxy { upstream: usize },
    /// Fan out: `aggregates[index]`.
    Aggregate { aggregate: usize },
    /// Answer with these bytes: the status line and fields in `bytes[..head_len]` (without the
    /// blank line, so the worker can add `Connection: close` when it must), the body after.
    Respond {
        status: u16,
        bytes: Box<[u8]>,
        head_len: usize,
    },
    /// Answer with a redirect to the request's URL, parts of it replaced.
    Redirect(Box<Redirect>),
}

/// A route's `redirect` (see [`crate::config::RedirectConfig`]): each part set replaces the
/// request's.
#[derive(Debug)]
pub struct Redirect {
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
    /// `http` or `https`.
    pub scheme: Option<Box<str>>,
    /// Lower-case.
    pub host: Option<Box<str>>,
    pub port: Option<u16>,
    pub path: Option<Box<str>>,
    pub strip_query: bool,
}

impl Redirect {
    /// The scheme it sends the client to, when that is all it changes (a `port` that is
    /// that scheme's default changes nothing).
    pub fn scheme_only(&self) -> Option<&str> {
        let scheme = self.scheme.as_deref()?;
        let default = if scheme == "https" { 443 } else { 80 };
        let port = self.port.is_none_or(|p| p == default);
        (self.host.is_none() && self.path.is_none() && port).then_some(scheme)
    }
}

/// A compiled upstream: what the operator configured. Its addresses right now are in
/// `live`, which the control plane keeps across revisions and updates as DNS answers change.
#[derive(Debug)]
pub struct Upstream {
    pub id: Box<str>,
    /// The configured targets (empty with SRV discovery).
    pub targets: Vec<Target>,
    /// The SRV name targets are discovered from, if any.
    pub srv: Option<Box<str>>,
    pub balance: Balance,
    /// What `hash` balancing hashes.
    pub hash_on: HashOn,
    pub health_check: Option<HealthCheck>,
    pub passive: Option<Passive>,
    pub retry: Option<RetryPolicy>,
    pub circuit: Option<Circuit>,
    pub protocol: crate::config::UpstreamProtocol,
    /// TLS towards the targets.
    pub tls: Option<crate::tls::UpstreamTls>,
    /// `h2c`, `h2` / `grpc`: streams at once on one connection.
    pub max_streams: u32,
    /// Its own timeouts, which replace the global ones towards its targets.
    pub timeouts: UpstreamTimeouts,
    /// The target set and counters requests use.
    pub live: Arc<UpstreamLive>,
}

/// One configured target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// As written: `IP:PORT` or `HOST:PORT`.
    pub address: Box<str>,
    /// The address, when `address` is a literal one.
    pub addr: Option<SocketAddr>,
    /// The host name and port, when `address` names a host.
    pub host: Option<(Box<str>, u16)>,
    pub weight: u32,
    pub draining: bool,
    pub backup: bool,
}

/// What `hash` balancing hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// Nothing (the upstream does not hash).
    None,
    /// A request header field (name lowercased).
    Header(Box<str>),
    Cookie(Box<str>),
    ClientIp,
    Path,
}

/// Active health checks, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: Box<str>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
    pub expect_status: Box<[u16]>,
    /// How targets are checked: HTTP/1.1 `GET`, HTTP/2 `GET` (h2c, h2), or a gRPC call
    /// (grpc).
    pub protocol: crate::config::UpstreamProtocol,
    /// Over TLS, as requests go (the upstream's `tls`).
    pub tls: Option<crate::tls::UpstreamTls>,
}

/// Retries, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// Bit `i`: failures of [`crate::live::FAILURE_KINDS`]`[i]` are retried.
    pub on_kinds: u8,
    /// Bit `s - 500`: status `s` is retried.
    pub on_status: u128,
    /// Bit `c`: a gRPC answer with `grpc-status: c` (before any message) is retried, and
    /// with bit 14 (`UNAVAILABLE`) the failures a gRPC client sees as UNAVAILABLE too
    /// (connect failures, a connection closed before any answer).
    pub on_grpc: u32,
    /// `methods = "all"`.
    pub all_methods: bool,
    pub budget_percent: u32,
    pub budget_min_per_s: u32,
    pub per_try: Option<Duration>,
    /// `overall_timeout_ms`: the tries together, from the first one's start.
    pub overall: Option<Duration>,
    /// `backoff_ms` and `max_backoff_ms`: see [`RetryPolicy::backoff`].
    pub backoff: Option<(Duration, Duration)>,
}

impl RetryPolicy {
    /// How long to wait before retry `n` (1 for the first), given `random` bits: between half
    /// of and all of the lesser of `backoff_ms` times `2^n - 1` and `max_backoff_ms`; zero
    /// without a backoff.
    pub fn backoff(&self, n: u32, random: u64) -> Duration {
        let Some((base, max)) = self.backoff else {
            return Duration::ZERO;
        };
        let growth = (1u32 << n.clamp(1, 16)) - 1;
        let ceiling = base.saturating_mul(growth).min(max);
        let half = ceiling / 2;
        let spread = u64::try_from((ceiling - half).as_micros()).unwrap_or(u64::MAX);
        half + Duration::from_micros(random % spread.saturating_add(1))
    }

    /// Whether a request can be retried at all: more than one try, and its method is one
    /// the policy retries (`idempotent`, or `methods = "all"`).
    pub fn may_retry(&self, idempotent: bool) -> bool {
        self.attempts > 1 && (idempotent || self.all_methods)
    }

    /// Whether a failure of kind index `kind` is retried.
    pub fn on_kind(&self, kind: usize) -> bool {
        self.on_kinds & (1 << kind) != 0
    }

    /// Whether an answer with `status` is retried.
    pub fn on_status(&self, status: u16) -> bool {
        (500..600).contains(&status) && self.on_status & (1u128 << (status - 500)) != 0
    }

    /// Whether a gRPC answer with `grpc-status: code` is retried.
    pub fn on_grpc(&self, code: u8) -> bool {
        code < 32 && self.on_grpc & (1 << code) != 0
    }
}

/// Circuit limits (`u32::MAX`: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Circuit {
    pub max_connections: u32,
    pub max_pending: u32,
    pub max_requests: u32,
}

/// An upstream's own timeouts (`None`: the global one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpstreamTimeouts {
    pub connect: Option<Duration>,
    pub response_head: Option<Duration>,
    pub body: Option<Duration>,
    pub send: Option<Duration>,
}

impl UpstreamTimeouts {
    /// `global` with this upstream's own timeouts in place of its `upstream_*` ones.
    pub fn apply(&self, global: &mut Timeouts) {
        if *self == UpstreamTimeouts::default() {
            return;
        }
        let pairs = [
            (self.connect, &mut global.upstream_connect),
            (self.response_head, &mut global.upstream_response_head),
            (self.body, &mut global.upstream_body),
            (self.send, &mut global.upstream_send),
        ];
        for (own, t) in pairs {
            if let Some(own) = own {
                *t = own;
            }
        }
    }
}

/// Timeouts as durations.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub client_header: Duration,
    pub client_body: Duration,
    pub client_idle: Duration,
    /// `None`: parking disabled.
    pub client_park: Option<Duration>,
    pub client_send: Duration,
    pub upstream_connect: Duration,
    pub upstream_response_head: Duration,
    pub upstream_body: Duration,
    pub upstream_send: Duration,
    pub upstream_idle: Duration,
    pub tls_handshake: Duration,
}

/// What a listener speaks.
#[derive(Debug, Clone, Default)]
pub struct ListenerProtocols {
    /// Terminate TLS with this config; `None`: cleartext.
    pub tls: Option<crate::tls::ListenerTls>,
    /// Cleartext HTTP/2 with prior knowledge.
    pub h2c: bool,
}

/// Request limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_header_count: usize,
    pub max_uri_bytes: usize,
    pub max_body_bytes: u64,
    /// Client connections per worker (see [`crate::config::LimitsConfig::max_connections`]).
    pub max_connections: usize,
    /// Whether runs of `/` in a request's path are merged before it is routed and forwarded
    /// ([`crate::config::Config::merge_slashes`]): read with the head, as the limits are.
    pub merge_slashes: bool,
}

impl Snapshot {
    /// Compiles a node file alone, as `gateway validate --node` checks it: what its
    /// listeners name and it does not define is left to the store (see
    /// [`crate::validate::from_store`]), and returned.
    pub fn compile_node_file(
        config: Config,
        revision: u64,
    ) -> Result<(Snapshot, Vec<String>), ConfigError> {
        let (compiled, notes) =
            crate::validate::compiling_node_file(|| Snapshot::compile(config, revision));
        compiled.map(|s| (s, notes))
    }

    /// [`Snapshot::compile`] for a config stored by an earlier build (the data directory's,
    /// the etcd store's): rules added since give way instead of keeping the gateway from
    /// starting on its own state. Returns, beside the snapshot, what they let through (to
    /// log); a write through the API is held to them.
    pub fn compile_stored(
        config: Config,
        revision: u64,
    ) -> Result<(Snapshot, Vec<String>), ConfigError> {
        let (compiled, notes) =
            crate::validate::compiling_stored(|| Snapshot::compile(config, revision));
        compiled.map(|s| (s, notes))
    }

    /// Gives every route its metrics slot, for good: call as the snapshot is published
    /// (compiling only looks the slots up, see [`crate::slots::known_route_slot`]).
    pub fn claim_metric_slots(&mut self) {
        for r in &mut self.routes {
            r.metrics_slot = crate::slots::route_slot(&r.id);
        }
    }

    /// Refuses this snapshot's certificates that have expired and that `current` (the
    /// snapshot running now, if any) does not already serve as published: publishing one is
    /// an error, one that expires while in use is not ([`crate::tls::refuse_newly_expired`]).
    pub fn refuse_newly_expired(
        &self,
        current: Option<&Snapshot>,
        now: std::time::SystemTime,
    ) -> Result<(), ConfigError> {
        let published: Vec<_> = current.map_or_else(Vec::new, |c| {
            c.certificates
                .iter()
                .filter(|cert| !c.unpublished_certificates.contains(&cert.id))
                .cloned()
                .collect()
        });
        crate::tls::refuse_newly_expired(
            &self.config.certificates,
            &self.certificates,
            &published,
            now,
        )
    }

    /// Validates `config` and compiles it. Host names in target addresses are kept as names
    /// (no DNS here): the control plane resolves them into each upstream's `live` set.
    pub fn compile(mut config: Config, revision: u64) -> Result<Snapshot, ConfigError> {
        if config.workers == Some(0) || config.workers.is_some_and(|w| w > 1024) {
            return Err(ConfigError::field("workers", "must be between 1 and 1024"));
        }
        if config.listeners.is_empty() {
            return Err(ConfigError::field(
                "listeners",
                "at least one listener is required",
            ));
        }
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for (i, l) in config.listeners.iter().enumerate() {
            let addr: SocketAddr = l.address.parse().map_err(|_| {
                ConfigError::field(
                    format!("listeners[{i}].address"),
                    format!("{:?} is not an IP:PORT socket address", l.address),
                )
            })?;
            let clash = listeners
                .iter()
                .find(|&&o| same_socket(o, addr))
                .filter(|&&o| {
                    o == addr || !tolerated(&format!("listeners[{i}].address"), "overlaps another")
                });
            if let Some(other) = clash {
                return Err(ConfigError::field(
                    format!("listeners[{i}].address"),
                    match *other == addr {
                        true => format!("{addr} is listed twice"),
                        false => format!("{addr} and {other} cannot both be bound"),
                    },
                ));
            }
            listeners.push(addr);
        }

        let (listener_protocols, certificates) = compile_tls(&mut config)?;
        check_http2(&config.http2)?;
        let mut listener_redirects = Vec::with_capacity(config.listeners.len());
        for (i, l) in config.listeners.iter().enumerate() {
            let Some(d) = &l.redirect else {
                listener_redirects.push(None);
                continue;
            };
            let at = format!("listeners[{i}].redirect");
            let r = redirect(d, &at)?;
            let own = if l.tls.is_some() { "https" } else { "http" };
            // Every request to the listener is redirected: one that leaves the scheme, the
            // host and the port as they are (a `path` alone, or the listener's own port)
            // sends the client back to it, round and round.
            let own_port = l
                .address
                .parse::<std::net::SocketAddr>()
                .ok()
                .map(|a| a.port());
            if r.host.is_none()
                && r.port.is_none_or(|p| Some(p) == own_port)
                && r.scheme.as_deref().is_none_or(|s| s == own)
                && !tolerated(&at, "sends the client back to its listener")
            {
                return Err(ConfigError::field(
                    at,
                    format!(
                        "the listener speaks {own} and this redirect keeps the host and the \
                         port: the client would be sent back to it, again and again"
                    ),
                ));
            }
            listener_redirects.push(Some(r));
        }

        crate::upstreams::check_resolver(&config.resolver)?;
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        let repeat = first_repeat(config.upstreams.iter().map(|u| u.id.as_str()));
        for (i, u) in config.upstreams.iter_mut().enumerate() {
            if repeat == Some(i) {
                return Err(ConfigError::field(
                    format!("upstreams[{i}].id"),
                    format!("duplicate upstream id {:?}", u.id),
                ));
            }
            upstreams.push(crate::upstreams::compile_upstream(u, i, &certificates)?);
        }
        let upstream_index = index_by_id(upstreams.iter().map(|u| &*u.id));
        let repeat = first_repeat(config.aggregates.iter().map(|a| a.id.as_str()));
        let aggregates = config
            .aggregates
            .iter()
            .enumerate()
            .map(|(i, a)| {
                crate::aggregate::compile_aggregate(a, i, repeat == Some(i), &upstream_index)
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (i, a) in aggregates.iter().enumerate() {
            for (j, step) in a.steps.iter().enumerate() {
                if upstreams[step.upstream].protocol.is_h2() {
                    return Err(ConfigError::field(
                        format!("aggregates[{i}].steps[{j}].upstream"),
                        format!(
                            "upstream {:?} speaks {}; aggregate steps call HTTP/1.1 upstreams",
                            &*upstreams[step.upstream].id,
                            protocol_name(upstreams[step.upstream].protocol)
                        ),
                    ));
                }
            }
        }
        let repeat = first_repeat(config.client_profiles.iter().map(|p| p.id.as_str()));
        let profiles = config
            .client_profiles
            .iter()
            .enumerate()
            .map(|(i, p)| crate::aggregate::compile_profile(p, i, repeat == Some(i)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut transcoders = Vec::with_capacity(config.transcoders.len());
        let repeat = first_repeat(config.transcoders.iter().map(|t| t.id.as_str()));
        for (i, t) in config.transcoders.iter_mut().enumerate() {
            if repeat == Some(i) {
                return Err(ConfigError::field(
                    format!("transcoders[{i}].id"),
                    format!("duplicate transcoder id {:?}", t.id),
                ));
            }
            let compiled = crate::transcode::compile_transcoder(t, i)?;
            t.descriptor_sha256.clone_from(&compiled.file_sha256);
            transcoders.push(std::sync::Arc::new(compiled));
        }
        // A stored route path with a lower-case escape (taken by an earlier build, when
        // requests kept theirs as sent): spelled as requests are routed now, so that it
        // keeps matching what it matched (a new config is refused below instead).
        for (i, r) in config.routes.iter_mut().enumerate() {
            for (field, path) in [("path", &mut r.path), ("path_prefix", &mut r.path_prefix)] {
                let upper = |p: &&mut String| {
                    crate::validate::lower_case_escape(p) && !crate::validate::escapes_unreserved(p)
                };
                let Some(p) = path.as_mut().filter(upper) else {
                    continue;
                };
                let why = "has an escape with a lower-case hex digit: upper-cased, as requests \
                           are before routing";
                if tolerated(&format!("routes[{i}].{field}"), why) {
                    *p = crate::validate::upper_case_escapes(p);
                }
            }
        }
        let policies = crate::policy::compile(&mut config)?;
        let cluster = compile_cluster(&config)?;
        for (i, p) in policies.list.iter().enumerate() {
            if let crate::policy::PolicyKind::RateLimit(rl) = &p.kind {
                let shared = cluster.as_ref().is_some_and(|c| c.redis.is_some());
                if rl.scope == crate::config::RateScope::Cluster && !shared {
                    let at = config
                        .policies
                        .iter()
                        .position(|c| c.id() == &*p.id)
                        .unwrap_or(i);
                    return Err(ConfigError::field(
                        format!("policies[{at}].scope"),
                        "`cluster` needs `[cluster] redis`",
                    ));
                }
            }
        }
        let mut routes = Vec::with_capacity(config.routes.len());
        let mut router = Router::default();
        let known = Known {
            upstreams: &upstreams,
            upstream_index,
            aggregate_index: index_by_id(aggregates.iter().map(|a| &*a.id)),
            profile_index: index_by_id(profiles.iter().map(|p| &*p.id)),
            transcoder_index: index_by_id(transcoders.iter().map(|t| &*t.id)),
            aggregates: &aggregates,
            route_repeat: first_repeat(config.routes.iter().map(|r| r.id.as_str())),
            merge_slashes: config.merges_slashes(),
        };
        // Earlier routes by path (see `path_key`) and host: a route is checked against those
        // only.
        let mut by_path: HashMap<(bool, Vec<u8>), SamePath> = HashMap::new();
        for (i, r) in config.routes.iter().enumerate() {
            let mut route = compile_route(r, i, &known)?;
            route.policies = crate::policy::route_policies(
                &policies,
                &r.policies,
                &format!("routes[{i}].policies"),
            )?;
            route.vary = variants_vary(&route, &profiles, &policies, &format!("routes[{i}]"))?;
            route.has_cors = route.policies.iter().any(|&p| {
                matches!(
                    policies.list[p as usize].kind,
                    crate::policy::PolicyKind::Cors(_)
                )
            });
            route.reads_only = route.methods.is_none()
                && std::iter::once(&route.action)
                    .chain(route.variants.iter().map(|v| &v.action))
                    .all(|a| {
                        matches!(a, RouteAction::Aggregate { aggregate }
                            if !aggregates[*aggregate].takes_body())
                    });
            let consumer_headers: Vec<(&[u8], &str)> = route
                .policies
                .iter()
                .map(|&p| &policies.list[p as usize])
                .filter_map(|p| Some((p.kind.consumer_header()?, &*p.id)))
                .collect();
            let grpc = std::iter::once(&route.action)
                .chain(route.variants.iter().map(|v| &v.action))
                .any(|a| {
                    matches!(a, RouteAction::Proxy { upstream }
                        if upstreams[*upstream].protocol == crate::config::UpstreamProtocol::Grpc)
                });
            route.headers = crate::headers::compile(
                r.request_headers.as_ref(),
                r.response_headers.as_ref(),
                &route,
                &consumer_headers,
                &policies.trailer_refused,
                grpc,
                &format!("routes[{i}]"),
            )?;
            let same_path = by_path.entry(path_key(r)).or_default();
            add_to_router(&mut router, r, i, &config.routes, &routes, same_path)?;
            routes.push(route);
        }
        refuse_redirects_to_themselves(&router, &routes, &config.routes, config.merges_slashes())?;

        let t = &config.timeouts;
        let ms = |name: &str, v: u64| -> Result<Duration, ConfigError> {
            if !(1..=86_400_000).contains(&v) {
                return Err(ConfigError::field(
                    format!("timeouts.{name}"),
                    "must be between 1 and 86400000 milliseconds",
                ));
            }
            Ok(Duration::from_millis(v))
        };
        let timeouts = Timeouts {
            client_header: ms("client_header_ms", t.client_header_ms)?,
            client_body: ms("client_body_ms", t.client_body_ms)?,
            client_idle: ms("client_idle_ms", t.client_idle_ms)?,
            client_park: match t.client_park_ms {
                0 => None,
                v => Some(ms("client_park_ms", v)?),
            },
            client_send: ms("client_send_ms", t.client_send_ms)?,
            upstream_connect: ms("upstream_connect_ms", t.upstream_connect_ms)?,
            upstream_response_head: ms("upstream_response_head_ms", t.upstream_response_head_ms)?,
            upstream_body: ms("upstream_body_ms", t.upstream_body_ms)?,
            upstream_send: ms("upstream_send_ms", t.upstream_send_ms)?,
            upstream_idle: ms("upstream_idle_ms", t.upstream_idle_ms)?,
            tls_handshake: ms("tls_handshake_ms", t.tls_handshake_ms)?,
        };
        let l = &config.limits;
        if !(1024..=1024 * 1024).contains(&l.max_header_bytes) {
            return Err(ConfigError::field(
                "limits.max_header_bytes",
                "must be between 1024 and 1048576",
            ));
        }
        if !(1..=MAX_HEADER_COUNT).contains(&l.max_header_count) {
            return Err(ConfigError::field(
                "limits.max_header_count",
                format!("must be between 1 and {MAX_HEADER_COUNT}"),
            ));
        }
        if !(16..=l.max_header_bytes).contains(&l.max_uri_bytes) {
            return Err(ConfigError::field(
                "limits.max_uri_bytes",
                "must be between 16 and limits.max_header_bytes",
            ));
        }
        if !(1..=1_000_000).contains(&l.max_connections) {
            return Err(ConfigError::field(
                "limits.max_connections",
                "must be between 1 and 1000000",
            ));
        }
        let limits = Limits {
            max_header_bytes: l.max_header_bytes,
            max_header_count: l.max_header_count,
            max_uri_bytes: l.max_uri_bytes,
            max_body_bytes: l.max_body_bytes,
            max_connections: l.max_connections,
            merge_slashes: config.merges_slashes(),
        };
        if config.upstream_pool.max_idle_per_target > 10_000 {
            return Err(ConfigError::field(
                "upstream_pool.max_idle_per_target",
                "must be at most 10000",
            ));
        }
        let admin_listen: SocketAddr = config.admin.listen.parse().map_err(|_| {
            ConfigError::field(
                "admin.listen",
                format!("{:?} is not an IP:PORT socket address", config.admin.listen),
            )
        })?;
        let clash = listeners
            .iter()
            .find(|&&l| same_socket(l, admin_listen))
            .filter(|&&l| {
                l == admin_listen || !tolerated("admin.listen", "overlaps a data-plane listener")
            });
        if let Some(l) = clash {
            return Err(ConfigError::field(
                "admin.listen",
                match *l == admin_listen {
                    true => format!("{admin_listen} is also a data-plane listener"),
                    false => format!("{admin_listen} overlaps the data-plane listener {l}"),
                },
            ));
        }
        if let Some(token) = &config.admin.token {
            if token.len() < 16 || token.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
                return Err(ConfigError::field(
                    "admin.token",
                    "must be at least 16 visible ASCII characters",
                ));
            }
        }
        let drain_ms = config.shutdown.drain_timeout_ms;
        if drain_ms > 3_600_000 {
            return Err(ConfigError::field(
                "shutdown.drain_timeout_ms",
                "must be at most 3600000 milliseconds",
            ));
        }
        let access_log = config
            .access_log
            .as_ref()
            .map(AccessLog::compile)
            .transpose()?;
        if !config.tracing.sampled && !config.tracing.traceparent {
            let why = "`sampled` is the flag of the traceparent the gateway creates, and \
                       `traceparent = false` creates none: it would have no effect";
            if !crate::validate::tolerated("tracing.sampled", why) {
                return Err(ConfigError::field("tracing.sampled", why));
            }
        }
        Ok(Snapshot {
            revision,
            workers: config.workers,
            listeners,
            listener_protocols,
            listener_redirects,
            certificates,
            unpublished_certificates: Vec::new(),
            http2: config.http2.clone(),
            router,
            routes,
            upstreams,
            timeouts,
            limits,
            max_idle_per_target: config.upstream_pool.max_idle_per_target,
            splice: config.relay.splice,
            drain_timeout: Duration::from_millis(drain_ms),
            admin_listen,
            policies,
            access_log,
            tracing: config.tracing,
            aggregates,
            transcoders,
            cluster,
            profiles,
            config,
        })
    }
}

/// Compiles `certificates` (filling their read-only fields) and each listener's TLS and
/// HTTP/2 settings.
type CompiledTls = (
    Vec<ListenerProtocols>,
    Vec<std::sync::Arc<crate::tls::Certificate>>,
);

fn compile_tls(config: &mut Config) -> Result<CompiledTls, ConfigError> {
    let mut certs = Vec::with_capacity(config.certificates.len());
    let repeat = first_repeat(config.certificates.iter().map(|c| c.id.as_str()));
    for i in 0..config.certificates.len() {
        let at = format!("certificates[{i}]");
        let id = config.certificates[i].id.clone();
        crate::validate::check_id(&id, &format!("{at}.id"))?;
        if repeat == Some(i) {
            return Err(ConfigError::field(
                format!("{at}.id"),
                format!("duplicate certificate id {id:?}"),
            ));
        }
        let c = &mut config.certificates[i];
        certs.push(std::sync::Arc::new(crate::tls::compile_certificate(
            c, &at,
        )?));
    }
    let mut out = Vec::with_capacity(config.listeners.len());
    for (i, l) in config.listeners.iter().enumerate() {
        let at = format!("listeners[{i}]");
        let tls = match &l.tls {
            None => None,
            Some(t) => {
                if t.certificates.is_empty() {
                    return Err(ConfigError::field(
                        format!("{at}.tls.certificates"),
                        "a TLS listener needs at least one certificate",
                    ));
                }
                let mut mine = Vec::with_capacity(t.certificates.len());
                for (j, id) in t.certificates.iter().enumerate() {
                    let field = format!("{at}.tls.certificates[{j}]");
                    // By id, so that one the store holds (a node file checked alone) counts too.
                    if t.certificates[..j].contains(id) {
                        if tolerated(&field, "listed twice") {
                            continue;
                        }
                        return Err(ConfigError::field(
                            field,
                            format!("certificate {id:?} is listed twice"),
                        ));
                    }
                    let Some(c) = certs.iter().find(|c| c.id == *id) else {
                        if crate::validate::from_store(&field, id) {
                            continue;
                        }
                        return Err(ConfigError::field(
                            field,
                            format!("no certificate has id {id:?}"),
                        ));
                    };
                    mine.push(c.clone());
                }
                let at = format!("{at}.tls");
                Some(crate::tls::compile_listener(t, mine, &at, &l.address)?)
            }
        };
        if l.h2c && tls.is_some() {
            return Err(ConfigError::field(
                format!("{at}.h2c"),
                "h2c is for cleartext listeners; a TLS listener offers HTTP/2 through `tls.alpn`",
            ));
        }
        out.push(ListenerProtocols { tls, h2c: l.h2c });
    }
    Ok((out, certs))
}

fn check_http2(h: &crate::config::Http2Config) -> Result<(), ConfigError> {
    use crate::upstreams::within;
    let at = |f: &str| format!("http2.{f}");
    within(
        at("max_concurrent_streams"),
        h.max_concurrent_streams.into(),
        1,
        1000,
    )?;
    within(
        at("max_header_list_size"),
        h.max_header_list_size.into(),
        1024,
        1 << 20,
    )?;
    within(
        at("initial_stream_window"),
        h.initial_stream_window.into(),
        65_535,
        1 << 24,
    )?;
    within(
        at("initial_connection_window"),
        h.initial_connection_window.into(),
        65_535,
        1 << 26,
    )?;
    within(
        at("max_pending_resets"),
        h.max_pending_resets.into(),
        1,
        10_000,
    )
}

/// What routes can refer to.
struct Known<'a> {
    upstreams: &'a [Upstream],
    /// Each upstream's index by its id.
    upstream_index: HashMap<&'a str, usize>,
    /// Each aggregate's, client profile's and transcoder's index by its id.
    aggregate_index: HashMap<&'a str, usize>,
    profile_index: HashMap<&'a str, usize>,
    transcoder_index: HashMap<&'a str, usize>,
    aggregates: &'a [Aggregate],
    /// The first route whose id an earlier route has.
    route_repeat: Option<usize>,
    /// Request paths have their runs of `/` merged (`merge_slashes`).
    merge_slashes: bool,
}

fn compile_route(r: &RouteConfig, i: usize, known: &Known<'_>) -> Result<Route, ConfigError> {
    let at = format!("routes[{i}]");
    check_id(&r.id, &format!("{at}.id"))?;
    if known.route_repeat == Some(i) {
        return Err(ConfigError::field(
            format!("{at}.id"),
            format!("duplicate route id {:?}", r.id),
        ));
    }
    let path = match (&r.path, &r.path_prefix) {
        (Some(p), None) => p,
        (None, Some(p)) => p,
        _ => {
            return Err(ConfigError::field(
                at,
                "exactly one of `path` and `path_prefix` is required",
            ))
        }
    };
    let field = if r.path.is_some() {
        "path"
    } else {
        "path_prefix"
    };
    if !path.starts_with('/')
        || path
            .bytes()
            .any(|b| !(0x21..0x7f).contains(&b) || b == b'?')
    {
        return Err(ConfigError::field(
            format!("{at}.{field}"),
            format!("{path:?} must start with '/' and hold visible ASCII without '?' or '#'"),
        ));
    }
    if path.contains('#') {
        return Err(ConfigError::field(
            format!("{at}.{field}"),
            format!("{path:?} must not contain '#'"),
        ));
    }
    let flaw = crate::validate::path_flaw(path)
        .or_else(|| {
            crate::validate::escapes_unreserved(path).then_some(
                "escapes a letter, digit, '-', '.', '_' or '~', which requests have decoded \
                 before they are routed: write it as it is",
            )
        })
        .or_else(|| {
            crate::validate::lower_case_escape(path).then_some(
                "has an escape with a lower-case hex digit, which requests have upper-cased \
                 before they are routed (RFC 3986 6.2.2.1): write %2F, not %2f",
            )
        });
    if let Some(why) = flaw {
        let at = format!("{at}.{field}");
        if !tolerated(&at, &format!("{why}: never matches")) {
            return Err(ConfigError::field(
                at,
                format!("{path:?} {why}, so no request could match it"),
            ));
        }
    }
    if known.merge_slashes
        && path.contains("//")
        && !crate::validate::tolerated(&format!("{at}.{field}"), "a run of '/': never matches")
    {
        return Err(ConfigError::field(
            format!("{at}.{field}"),
            format!(
                "{path:?} has a run of '/', which no request path has once merged: write one \
                 '/', or set merge_slashes = false"
            ),
        ));
    }
    let (pattern, params) = if r.path.is_some() && path.contains(['{', '}']) {
        parse_pattern(path, &format!("{at}.path"))?
    } else if path.contains(['{', '}']) {
        return Err(ConfigError::field(
            format!("{at}.path_prefix"),
            format!("{path:?}: parameters ({{name}}) are for `path`, not `path_prefix`"),
        ));
    } else {
        (Box::default(), Box::default())
    };
    if r.strip_prefix && r.path_prefix.is_none() {
        return Err(ConfigError::field(
            format!("{at}.strip_prefix"),
            "only applies to a `path_prefix` route",
        ));
    }
    if r.strip_prefix && r.redirect.is_some() {
        return Err(ConfigError::field(
            format!("{at}.strip_prefix"),
            "a redirect keeps the path, or replaces it with its `path`",
        ));
    }
    let forwards = r.upstream.is_some() || r.variants.iter().any(|v| v.upstream.is_some());
    let field = format!("{at}.strip_prefix");
    if r.strip_prefix && !forwards && !tolerated(&field, "forwards nothing: no effect") {
        return Err(ConfigError::field(
            field,
            "strips the path a route forwards to an `upstream`; this one forwards none",
        ));
    }
    let methods = if r.methods.is_empty() {
        None
    } else {
        for (j, m) in r.methods.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(is_tchar) {
                return Err(ConfigError::field(
                    format!("{at}.methods[{j}]"),
                    format!("{m:?} is not a method token"),
                ));
            }
            let field = format!("{at}.methods[{j}]");
            if let Some(upper) = crate::validate::standard_method_miscased(m) {
                if !tolerated(&field, "another case than the method's: never matches") {
                    return Err(ConfigError::field(
                        field,
                        format!("methods are case-sensitive (RFC 9110 9.1): {m:?} is not {upper}"),
                    ));
                }
            }
            if m == "CONNECT" && !tolerated(&field, "CONNECT never reaches a route") {
                return Err(ConfigError::field(
                    field,
                    "the gateway opens no tunnels: a CONNECT is refused (405) before routing",
                ));
            }
        }
        Some(
            r.methods
                .iter()
                .map(|m| m.as_bytes().into())
                .collect::<Vec<Box<[u8]>>>()
                .into_boxed_slice(),
        )
    };
    let actions = [
        r.upstream.is_some(),
        r.respond.is_some(),
        r.aggregate.is_some(),
        r.redirect.is_some(),
    ];
    if actions.iter().filter(|&&set| set).count() != 1 {
        return Err(ConfigError::field(
            at,
            "exactly one of `upstream`, `respond`, `aggregate` and `redirect` is required",
        ));
    }
    let action = match (&r.respond, &r.redirect) {
        (Some(d), _) => {
            required_answer_field(d.status, r.response_headers.as_ref(), &at)?;
            direct_response(d, &format!("{at}.respond"))?
        }
        (_, Some(d)) => {
            if d.scheme.is_some() && d.host.is_none() {
                return Err(ConfigError::field(
                    format!("{at}.redirect.scheme"),
                    "a route matches on every listener, this scheme's too, where the \
                     redirect would send the client where it is: set `host` as well, or put \
                     the redirect on the listener (`[[listeners]] redirect`)",
                ));
            }
            RouteAction::Redirect(redirect(d, &format!("{at}.redirect"))?)
        }
        _ => route_action(
            r.upstream.as_deref(),
            r.aggregate.as_deref(),
            known,
            &params,
            &at,
        )?,
    };
    let (rewrite, shape) = proxy_options(
        r.upstream.is_some(),
        r.rewrite.as_deref(),
        r.response.as_ref(),
        &params,
        &at,
    )?;
    check_shaped(&action, shape.is_some(), known, &at)?;
    let transcoder = match &r.transcoder {
        None => None,
        Some(t) => Some(route_transcoder(r, t, &action, known, &at)?),
    };
    if rewrite.is_some() && r.strip_prefix {
        return Err(ConfigError::field(
            format!("{at}.rewrite"),
            "replaces the whole path, so `strip_prefix` cannot be set with it",
        ));
    }
    let mut variants = Vec::with_capacity(r.variants.len());
    for (k, v) in r.variants.iter().enumerate() {
        let vat = format!("{at}.variants[{k}]");
        let profile = (known.profile_index.get(v.profile.as_str()).copied()).ok_or_else(|| {
            ConfigError::field(
                format!("{vat}.profile"),
                format!("unknown client profile {:?}", v.profile),
            )
        })?;
        if r.variants[..k].iter().any(|o| o.profile == v.profile) {
            return Err(ConfigError::field(
                format!("{vat}.profile"),
                format!(
                    "profile {:?} already has a variant on this route",
                    v.profile
                ),
            ));
        }
        if v.upstream.is_some() == v.aggregate.is_some() {
            return Err(ConfigError::field(
                vat,
                "exactly one of `upstream` and `aggregate` is required",
            ));
        }
        let action = route_action(
            v.upstream.as_deref(),
            v.aggregate.as_deref(),
            known,
            &params,
            &vat,
        )?;
        let (rewrite, shape) = proxy_options(
            v.upstream.is_some(),
            v.rewrite.as_deref(),
            v.response.as_ref(),
            &params,
            &vat,
        )?;
        check_shaped(&action, shape.is_some(), known, &vat)?;
        variants.push(Variant {
            profile,
            action,
            rewrite,
            shape,
        });
    }
    let strip_prefix_len = if r.strip_prefix {
        path.trim_end_matches('/').len()
    } else {
        0
    };
    Ok(Route {
        id: r.id.as_str().into(),
        methods,
        strip_prefix_len,
        action,
        metrics_slot: crate::slots::known_route_slot(&r.id),
        policies: Box::new([]),
        has_cors: false,
        reads_only: false,
        pattern,
        params,
        rewrite,
        shape,
        variants: variants.into_boxed_slice(),
        vary: Box::default(),
        transcoder,
        headers: None,
    })
}

/// A route's `transcoder`: a known one, on a route that proxies to a gRPC upstream and
/// forwards paths as they are (the methods' HTTP paths are matched on the request's).
fn route_transcoder(
    r: &RouteConfig,
    id: &str,
    action: &RouteAction,
    known: &Known<'_>,
    at: &str,
) -> Result<usize, ConfigError> {
    let field = |why: &str| ConfigError::field(format!("{at}.transcoder"), why.to_owned());
    let index = (known.transcoder_index.get(id).copied())
        .ok_or_else(|| field(&format!("unknown transcoder {id:?}")))?;
    match action {
        RouteAction::Proxy { upstream }
            if known.upstreams[*upstream].protocol == crate::config::UpstreamProtocol::Grpc => {}
        _ => return Err(field("needs an `upstream` with `protocol = \"grpc\"`")),
    }
    if !r.variants.is_empty() || r.rewrite.is_some() || r.response.is_some() || r.strip_prefix {
        return Err(field(
            "cannot be combined with `variants`, `rewrite`, `response` or `strip_prefix`",
        ));
    }
    Ok(index)
}

/// `[cluster]`: a node id, the Redis URL, the sync interval.
fn compile_cluster(config: &Config) -> Result<Option<Cluster>, ConfigError> {
    let Some(c) = &config.cluster else {
        return Ok(None);
    };
    check_id(&c.node_id, "cluster.node_id")?;
    let redis = match &c.redis {
        Some(url) => {
            Some(RedisAddr::parse(url).map_err(|e| ConfigError::field("cluster.redis", e))?)
        }
        None => None,
    };
    let sync_ms = c.sync_ms.unwrap_or(5);
    if !(1..=1000).contains(&sync_ms) {
        return Err(ConfigError::field(
            "cluster.sync_ms",
            "must be between 1 and 1000",
        ));
    }
    Ok(Some(Cluster {
        node_id: c.node_id.as_str().into(),
        redis,
        sync: Duration::from_millis(sync_ms),
    }))
}

/// How an upstream protocol is written in the config.
fn protocol_name(p: crate::config::UpstreamProtocol) -> &'static str {
    match p {
        crate::config::UpstreamProtocol::Http1 => "http1",
        crate::config::UpstreamProtocol::H2c => "h2c",
        crate::config::UpstreamProtocol::H2 => "h2",
        crate::config::UpstreamProtocol::Grpc => "grpc",
    }
}

/// A `response` shape needs an HTTP/1.1 upstream (HTTP/2 answers are relayed as they come).
fn check_shaped(
    action: &RouteAction,
    shaped: bool,
    known: &Known<'_>,
    at: &str,
) -> Result<(), ConfigError> {
    if let (RouteAction::Proxy { upstream }, true) = (action, shaped) {
        let u = &known.upstreams[*upstream];
        if u.protocol.is_h2() {
            return Err(ConfigError::field(
                format!("{at}.response"),
                format!(
                    "upstream {:?} speaks {}; response shaping needs an http1 upstream",
                    &*u.id,
                    protocol_name(u.protocol)
                ),
            ));
        }
    }
    Ok(())
}

/// A route's or variant's `upstream` / `aggregate` (exactly one is set).
/// Whether sockets bound to `a` and `b` would clash: one port (not 0, which picks a free
/// one), one address family (listeners are IPv6-only), and the same address or a wildcard
/// (`0.0.0.0`, `[::]`) on either side.
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn route_action(
    upstream: Option<&str>,
    aggregate: Option<&str>,
    known: &Known<'_>,
    params: &[Box<str>],
    at: &str,
) -> Result<RouteAction, ConfigError> {
    if let Some(u) = upstream {
        return match known.upstream_index.get(u) {
            Some(&upstream) => Ok(RouteAction::Proxy { upstream }),
            None => Err(ConfigError::field(
                format!("{at}.upstream"),
                format!("unknown upstream {u:?}"),
            )),
        };
    }
    let a = aggregate.unwrap_or_default();
    let index = (known.aggregate_index.get(a).copied()).ok_or_else(|| {
        ConfigError::field(
            format!("{at}.aggregate"),
            format!("unknown aggregate {a:?}"),
        )
    })?;
    for s in known.aggregates[index].steps.iter() {
        // The field is the route's `aggregate` (a path the API turns into a JSON pointer);
        // which step of it, the reason says.
        crate::aggregate::check_params(&s.path, params, &format!("{at}.aggregate")).map_err(
            |e| match e {
                ConfigError::Invalid { path, reason } => ConfigError::Invalid {
                    path,
                    reason: format!("aggregate {a:?}, step {:?}, {reason}", s.id),
                },
                other => other,
            },
        )?;
    }
    Ok(RouteAction::Aggregate { aggregate: index })
}

/// `rewrite` and `response`, which only a proxied route or variant takes.
fn proxy_options(
    proxied: bool,
    rewrite: Option<&str>,
    response: Option<&crate::config::ShapeConfig>,
    params: &[Box<str>],
    at: &str,
) -> Result<(Option<Template>, Option<Shape>), ConfigError> {
    if !proxied {
        for (set, name) in [
            (rewrite.is_some(), "rewrite"),
            (response.is_some(), "response"),
        ] {
            if set {
                return Err(ConfigError::field(
                    format!("{at}.{name}"),
                    "only applies with `upstream`",
                ));
            }
        }
        return Ok((None, None));
    }
    let rewrite = rewrite
        .map(|t| crate::aggregate::compile_rewrite(t, params, &format!("{at}.rewrite")))
        .transpose()?;
    let shape = response
        .map(|c| crate::aggregate::compile_shape(c, &format!("{at}.response")))
        .transpose()?;
    Ok((rewrite, shape))
}

/// Splits a parametrised path into segments: `/products/{id}` → `products`, a parameter.
fn parse_pattern(
    path: &str,
    at: &str,
) -> Result<(Box<[Seg]>, crate::aggregate::Names), ConfigError> {
    let mut segs = Vec::new();
    let mut names: Vec<Box<str>> = Vec::new();
    if path[1..].split('/').count() > crate::router::MAX_PARAM_SEGMENTS {
        return Err(ConfigError::field(
            at,
            format!(
                "{path:?}: a path with parameters has at most {} segments",
                crate::router::MAX_PARAM_SEGMENTS
            ),
        ));
    }
    for seg in path[1..].split('/') {
        if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            if !crate::aggregate::valid_param_name(name) {
                return Err(ConfigError::field(
                    at,
                    format!("{path:?}: {{{name}}}: a parameter name is letters, digits and '_'"),
                ));
            }
            if names.iter().any(|n| **n == *name) {
                return Err(ConfigError::field(
                    at,
                    format!("{path:?}: parameter {{{name}}} appears twice"),
                ));
            }
            names.push(name.into());
            segs.push(Seg::Param);
        } else if seg.contains(['{', '}']) {
            return Err(ConfigError::field(
                at,
                format!("{path:?}: a parameter is a whole segment, `/{{name}}/`"),
            ));
        } else {
            segs.push(Seg::Literal(seg.as_bytes().into()));
        }
    }
    Ok((segs.into_boxed_slice(), names.into_boxed_slice()))
}

/// The `Vary` value for a route's variants: the request fields their profiles read. A
/// consumer-group profile reads the route's credential, so it needs an authentication policy.
fn variants_vary(
    route: &Route,
    profiles: &[Profile],
    policies: &crate::policy::Policies,
    at: &str,
) -> Result<Box<[u8]>, ConfigError> {
    let mut names: Vec<String> = Vec::new();
    let mut add = |n: &str| {
        if !names.iter().any(|x| x.eq_ignore_ascii_case(n)) {
            names.push(n.to_owned());
        }
    };
    for (k, v) in route.variants.iter().enumerate() {
        match &profiles[v.profile].matcher {
            ProfileMatch::Header { name, .. } => add(name),
            ProfileMatch::UserAgent(_) => add("User-Agent"),
            // The query is part of the URL a cache keys on already.
            ProfileMatch::Query { .. } => {}
            ProfileMatch::ConsumerGroups(_) => {
                let mut found = false;
                for &p in route.policies.iter() {
                    match &policies.list[p as usize].kind {
                        crate::policy::PolicyKind::ApiKey(k) => {
                            found = true;
                            if let Some(h) = &k.header {
                                add(&String::from_utf8_lossy(h));
                            }
                        }
                        crate::policy::PolicyKind::Jwt(_) => {
                            found = true;
                            add("Authorization");
                        }
                        _ => {}
                    }
                }
                if !found {
                    return Err(ConfigError::field(
                        format!("{at}.variants[{k}].profile"),
                        format!(
                            "profile {:?} matches consumer groups, so the route needs an authentication policy (api_key or jwt)",
                            profiles[v.profile].id
                        ),
                    ));
                }
            }
        }
    }
    Ok(names.join(", ").into_bytes().into_boxed_slice())
}

/// A `respond` route's status that needs a field (RFC 9110): a 401 `WWW-Authenticate`
/// (15.5.2), a 405 `Allow` (15.5.6), a 407 `Proxy-Authenticate` (15.5.8), which only the
/// route's `response_headers` can give it; a 426 `Upgrade` (15.5.22), which none can.
fn required_answer_field(
    status: u16,
    edits: Option<&crate::config::HeaderEdits>,
    at: &str,
) -> Result<(), ConfigError> {
    let name = match status {
        401 => "WWW-Authenticate",
        405 => "Allow",
        407 => "Proxy-Authenticate",
        426 => "Upgrade",
        _ => return Ok(()),
    };
    // A challenge at least; an empty `Allow` is one (RFC 9110 10.2.1: no method allowed,
    // "if the resource has been temporarily disabled by configuration").
    let set = edits.is_some_and(|e| {
        (e.set.iter())
            .any(|(k, v)| k.eq_ignore_ascii_case(name) && (status == 405 || !v.trim().is_empty()))
    });
    let why = match status {
        426 => "a 426 must carry Upgrade (RFC 9110 15.5.22), which a route cannot set".to_owned(),
        _ => format!("a {status} must carry {name} (RFC 9110): set it in `response_headers`"),
    };
    let field = format!("{at}.respond.status");
    if set || tolerated(&field, &why) {
        return Ok(());
    }
    Err(ConfigError::field(field, why))
}

fn direct_response(d: &DirectResponseConfig, at: &str) -> Result<RouteAction, ConfigError> {
    if !(200..=599).contains(&d.status) {
        return Err(ConfigError::field(
            format!("{at}.status"),
            "must be between 200 and 599",
        ));
    }
    if d.body.len() > MAX_DIRECT_BODY {
        return Err(ConfigError::field(
            format!("{at}.body"),
            format!("must be at most {MAX_DIRECT_BODY} bytes"),
        ));
    }
    if d.content_type.is_empty()
        || d.content_type
            .bytes()
            .any(|b| !(b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b)))
    {
        return Err(ConfigError::field(
            format!("{at}.content_type"),
            "must be a non-empty visible ASCII field value",
        ));
    }
    // No content (RFC 9110 15.3.5, 15.4.5): no body, and no fields that would frame one (a
    // client reading a 204 with a Content-Length would take the bytes after it for the
    // next answer).
    // A 205 has no content either (RFC 9110 15.3.6), but HTTP/1.1 framing does not know
    // that (RFC 9112 6.3): it says so with `Content-Length: 0`.
    let bodiless = matches!(d.status, 204 | 205 | 304);
    let why = format!("must be empty: a {} answer has no body", d.status);
    if bodiless && !d.body.is_empty() && !tolerated(&format!("{at}.body"), &why) {
        return Err(ConfigError::field(format!("{at}.body"), why));
    }
    // The default type cannot be told from one written out (a GET shows it): another is
    // one the answer would never carry.
    let why = format!(
        "is not sent: a {} answer has no body, so no Content-Type; leave it out",
        d.status
    );
    let typed = d.content_type != crate::config::default_content_type();
    if bodiless && typed && !tolerated(&format!("{at}.content_type"), &why) {
        return Err(ConfigError::field(format!("{at}.content_type"), why));
    }
    let head = match bodiless {
        true => format!(
            "HTTP/1.1 {} {}\r\n{}",
            d.status,
            crate::reason::phrase(d.status),
            if d.status == 205 {
                "Content-Length: 0\r\n"
            } else {
                ""
            }
        ),
        false => format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            d.status,
            crate::reason::phrase(d.status),
            d.content_type,
            d.body.len()
        ),
    };
    let mut bytes = head.into_bytes();
    let head_len = bytes.len();
    // (A stored config's body on a 204, 205 or 304 is left out.)
    if !bodiless {
        bytes.extend_from_slice(d.body.as_bytes());
    }
    Ok(RouteAction::Respond {
        status: d.status,
        bytes: bytes.into_boxed_slice(),
        head_len,
    })
}

/// A route's or listener's `redirect`, checked.
fn redirect(d: &crate::config::RedirectConfig, at: &str) -> Result<Box<Redirect>, ConfigError> {
    let status = d.status.unwrap_or(301);
    if ![301, 302, 303, 307, 308].contains(&status) {
        return Err(ConfigError::field(
            format!("{at}.status"),
            format!("{status} is not a redirect status: 301, 302, 303, 307 or 308"),
        ));
    }
    if let Some(s) = d
        .scheme
        .as_deref()
        .filter(|s| !matches!(*s, "http" | "https"))
    {
        return Err(ConfigError::field(
            format!("{at}.scheme"),
            format!("{s:?}: `http` or `https`"),
        ));
    }
    if let Some(h) = &d.host {
        if !crate::validate::valid_host_name(h) {
            return Err(ConfigError::field(
                format!("{at}.host"),
                format!("{h:?} is not a host name or IP address (an IPv6 one in brackets)"),
            ));
        }
    }
    if d.port == Some(0) {
        return Err(ConfigError::field(format!("{at}.port"), "1 to 65535"));
    }
    if let Some(p) = &d.path {
        if !p.starts_with('/')
            || p.bytes()
                .any(|b| !(0x21..0x7f).contains(&b) || b == b'?' || b == b'#')
        {
            return Err(ConfigError::field(
                format!("{at}.path"),
                format!("{p:?} must start with '/' and hold visible ASCII without '?' or '#'"),
            ));
        }
        if let Some(why) = crate::validate::path_flaw(p) {
            let at = format!("{at}.path");
            if !tolerated(&at, why) {
                return Err(ConfigError::field(
                    at,
                    format!("{p:?} {why}: the client's request to it would be refused"),
                ));
            }
        }
    }
    if d.scheme.is_none() && d.host.is_none() && d.port.is_none() && d.path.is_none() {
        return Err(ConfigError::field(
            at,
            "set at least one of `scheme`, `host`, `port` and `path`: otherwise the client is \
             sent where it is",
        ));
    }
    Ok(Box::new(Redirect {
        status,
        scheme: d.scheme.as_deref().map(Into::into),
        host: d.host.as_deref().map(|h| h.to_ascii_lowercase().into()),
        port: d.port,
        path: d.path.as_deref().map(Into::into),
        strip_query: d.strip_query,
    }))
}

/// Indexes by id, the first of each id (a repeated one is refused on its own).
fn index_by_id<'a>(ids: impl Iterator<Item = &'a str>) -> HashMap<&'a str, usize> {
    let mut index = HashMap::new();
    for (i, id) in ids.enumerate() {
        index.entry(id).or_insert(i);
    }
    index
}

/// What makes two routes' paths the same: exact or prefix, and the path with every
/// parameter segment written `{}` (`/a/{id}` and `/a/{sku}` match the same requests).
fn path_key(r: &RouteConfig) -> (bool, Vec<u8>) {
    match (&r.path, &r.path_prefix) {
        (Some(p), _) => {
            let segs: Vec<&[u8]> = (p.as_bytes().split(|&c| c == b'/'))
                .map(|s| match s.first() {
                    Some(b'{') => &b"{}"[..],
                    _ => s,
                })
                .collect();
            (true, segs.join(&b'/'))
        }
        (_, Some(p)) => (false, p.as_bytes().to_vec()),
        _ => (false, Vec::new()),
    }
}

/// Earlier routes with one [`path_key`], by host as written in lower case (`None`: routes
/// without `hosts`): the only routes that can shadow a route or be shadowed by it.
type SamePath = HashMap<Option<String>, Vec<usize>>;

/// The keys of [`SamePath`] that route `r` is filed under.
fn host_keys(r: &RouteConfig) -> impl Iterator<Item = Option<String>> + '_ {
    let none = r.hosts.is_empty().then_some(None);
    none.into_iter().chain(r.hosts.iter().map(|h| {
        // As the router files it: `a.com.` is `a.com`, `[0:0::1]` is `[::1]` (the review
        // found two routes for one address written two ways both taken, one unreachable).
        let h = h.to_ascii_lowercase();
        let h = h.strip_suffix('.').unwrap_or(&h);
        Some(crate::router::canonical_host(h).into_owned())
    }))
}

/// Refuses a route whose redirect keeps the scheme, host and port and names a path that the
/// redirected request would be routed back to it by: for each method the route takes, the
/// one the client then sends (GET after a 303, and after a 301 or 302 for a POST; the same
/// one otherwise), on the path as requests are routed (unreserved escapes decoded, runs of
/// `/` merged with `merge_slashes`). Another route taking it (a more specific one, or the
/// GET route of a POST route's path) leaves it alone.
fn refuse_redirects_to_themselves(
    router: &crate::router::Router,
    routes: &[Route],
    configs: &[RouteConfig],
    merge_slashes: bool,
) -> Result<(), ConfigError> {
    for (i, (route, r)) in routes.iter().zip(configs).enumerate() {
        let RouteAction::Redirect(d) = &route.action else {
            continue;
        };
        let Some(path) = d.path.as_deref() else {
            continue;
        };
        if d.host.is_some() || d.scheme.is_some() || d.port.is_some() {
            continue;
        }
        let path = as_routed(path, merge_slashes);
        // The hosts it answers for: each exact one, a name under each wildcard (one that no
        // configured name can be, so that no exact route stands in front of it), or any.
        let hosts: Vec<Option<String>> = match r.hosts.is_empty() {
            true => vec![None],
            false => (r.hosts.iter())
                .map(|h| {
                    let h = h.replacen("*.", "~.", 1).to_ascii_lowercase();
                    Some(h.trim_end_matches('.').to_owned())
                })
                .collect(),
        };
        // The methods asked: those the route names; for one that names none, what clients
        // follow such a redirect with: GET after a 301, 302 or 303 (browsers, and API
        // clients that follow those), and after a 307 or 308, which keep the method, the
        // methods of APIs too.
        let asked: Vec<&[u8]> = match (&route.methods, d.status) {
            (Some(list), _) => list.iter().map(|m| &m[..]).collect(),
            (None, 307 | 308) => vec![b"GET", b"POST", b"PUT", b"PATCH", b"DELETE"],
            (None, _) => vec![b"GET"],
        };
        let back = asked.iter().copied().find(|&m| {
            // A HEAD stays a HEAD (Fetch, curl); after a 303 anything else is a GET.
            let next: &[u8] = match (d.status, m) {
                (_, b"HEAD") => m,
                (303, _) | (301 | 302, b"POST") => b"GET",
                _ => m,
            };
            hosts.iter().any(|h| {
                let host = h.as_deref().map(str::as_bytes);
                let found = router.find(host, path.as_bytes(), |id| {
                    routes[id as usize].accepts(next)
                });
                found == Some(i as u32)
            })
        });
        let at = format!("routes[{i}].redirect.path");
        if let Some(m) = back.filter(|_| !tolerated(&at, "sends the client back to its route")) {
            return Err(ConfigError::field(
                at,
                format!(
                    "{:?} is routed back to this route for a {}: the client would be sent to \
                     it again and again",
                    d.path.as_deref().unwrap_or_default(),
                    String::from_utf8_lossy(m)
                ),
            ));
        }
    }
    Ok(())
}

/// `path` as a request for it is routed: unreserved characters' escapes decoded, the others'
/// hex digits upper-cased, and runs of `/` merged when `merge`.
fn as_routed(path: &str, merge: bool) -> String {
    let path = crate::validate::upper_case_escapes(path);
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        let c = match crate::validate::unreserved_escape(b, i) {
            Some(c) => {
                i += 3;
                char::from(c)
            }
            None => {
                i += 1;
                char::from(b[i - 1])
            }
        };
        if !(merge && c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// Adds route `i` to the router, then files it in `same_path` (the earlier routes with its
/// [`path_key`]); `earlier` are the routes before it, compiled.
fn add_to_router(
    router: &mut Router,
    r: &RouteConfig,
    i: usize,
    all: &[RouteConfig],
    earlier: &[Route],
    same_path: &mut SamePath,
) -> Result<(), ConfigError> {
    let at = format!("routes[{i}]");
    let (path, exact) = match (&r.path, &r.path_prefix) {
        (Some(p), _) => (p.as_bytes(), true),
        (_, Some(p)) => (p.as_bytes(), false),
        _ => unreachable!("compile_route checked that one of path / path_prefix is set"),
    };
    // Two routes with the same host key and path, whose method sets overlap, would make the
    // second one unreachable: refuse instead of silently shadowing it (naming the first).
    // Methods both name (no `methods` names every one but TRACE); the HEAD that GET brings
    // is not counted, so that a HEAD route may come before a GET one and answer HEAD.
    let names_some = |x: &RouteConfig| x.methods.iter().any(|m| m != "TRACE");
    let methods_overlap = |o: &RouteConfig| {
        (o.methods.is_empty() && r.methods.is_empty())
            || (o.methods.is_empty() && names_some(r))
            || (r.methods.is_empty() && names_some(o))
            || o.methods.iter().any(|m| r.methods.contains(m))
    };
    // Nor may every method the route takes be taken by earlier ones (a HEAD route after a
    // GET one): the earliest of those, if so.
    let shadowed = |same: &[usize]| -> Option<usize> {
        if r.methods.is_empty() {
            return same.iter().copied().find(|&j| all[j].methods.is_empty());
        }
        let head = r.methods.iter().any(|m| m == "GET").then_some("HEAD");
        let mut first: Option<usize> = None;
        for m in r.methods.iter().map(String::as_str).chain(head) {
            let j = (same.iter().copied()).find(|&j| earlier[j].accepts(m.as_bytes()))?;
            first = Some(first.map_or(j, |f| f.min(j)));
        }
        first
    };
    let keys: Vec<Option<String>> = host_keys(r).collect();
    let clash = (keys.iter())
        .filter_map(|h| {
            let same = same_path.get(h)?;
            (same.iter().copied().find(|&j| methods_overlap(&all[j]))).or_else(|| shadowed(same))
        })
        .min();
    let why = "shadowed by an earlier route";
    if let Some(j) = clash.filter(|_| !tolerated(&at, why)) {
        return Err(ConfigError::field(
            at,
            format!(
                "matches the same host, path and methods as routes[{j}] ({:?}), so one of them could never be chosen",
                all[j].id
            ),
        ));
    }
    for h in keys {
        same_path.entry(h).or_default().push(i);
    }
    let id = u32::try_from(i).map_err(|_| ConfigError::field("routes", "too many routes"))?;
    if r.hosts.is_empty() {
        insert(&mut router.any_host, path, exact, id);
    } else {
        for (j, h) in r.hosts.iter().enumerate() {
            let host = h.to_ascii_lowercase();
            let host = host.strip_suffix('.').unwrap_or(&host);
            let (wild, name) = match host.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, host),
            };
            if !valid_host_pattern(name) {
                return Err(ConfigError::field(
                    format!("{at}.hosts[{j}]"),
                    format!("{h:?} is not a host name or `*.` wildcard"),
                ));
            }
            // Names under an IP address: none a request can carry (a stored config's
            // matches nothing, as it did).
            if wild && name.starts_with('[') {
                let why = format!("{h:?}: a `*.` wildcard names the names under a DNS name");
                if !crate::validate::tolerated(&format!("{at}.hosts[{j}]"), &why) {
                    return Err(ConfigError::field(format!("{at}.hosts[{j}]"), why));
                }
            }
            let name = &*crate::router::canonical_host(name);
            if wild {
                let suffix = format!(".{name}").into_bytes().into_boxed_slice();
                insert(
                    router.wildcard_hosts.entry(suffix).or_default(),
                    path,
                    exact,
                    id,
                );
            } else {
                let table = router
                    .exact_hosts
                    .entry(name.as_bytes().into())
                    .or_default();
                insert(table, path, exact, id);
            }
        }
    }
    Ok(())
}

/// Whether two `path`s match the same requests (parameter names aside).
fn insert(table: &mut PathTable, path: &[u8], exact: bool, id: u32) {
    if exact && path.contains(&b'{') {
        table.insert_param(path, id);
    } else if exact {
        table.insert_exact(path, id);
    } else {
        table.insert_prefix(path, id);
    }
}
