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
    /// How response bodies are relayed.
    #[serde(default)]
    pub relay: RelayConfig,
    /// Graceful shutdown on SIGTERM / SIGINT.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// The admin REST API.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The clients that policies identify (by API key or JWT claim).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<ConsumerConfig>,
    /// Secrets that identify a consumer (API keys).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<CredentialConfig>,
    /// Named policies (IP filter, domain allowlist, CORS, API key, JWT, ACL, rate limit) that
    /// `global_policies`, routes and consumers refer to by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicyConfig>,
    /// Ids of policies that apply to every route, before the route's own. Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub global_policies: Vec<String>,
    /// CIDRs of proxies in front of the gateway whose `X-Forwarded-For` / `Forwarded` fields
    /// are believed: the client address is then the rightmost address in those fields that
    /// is not itself a trusted proxy. Default none: the client address is always the socket
    /// peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    /// The one field the trusted proxies write the client address in: `x-forwarded-for`
    /// (the default) or `forwarded` (RFC 7239). The other is never read, so a client cannot
    /// slip an address past a proxy that only appends to the other one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip_header: Option<ClientIpHeader>,
    /// Whether the trusted proxies' word for the client's scheme is believed too: the last
    /// value of `X-Forwarded-Proto` (or `Forwarded`'s `proto=` with `client_ip_header =
    /// "forwarded"`). Only for proxies that write that field themselves: one that passes a
    /// client's through would let it claim HTTPS. Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub trust_forwarded_proto: bool,
    /// Whether each run of `/` in a request's path is merged into one before the request is
    /// routed and forwarded, so that `//admin` meets the `/admin` route's policies (nginx
    /// and Tomcat read it as `/admin`). Default true; false keeps such paths as sent (a path
    /// that carries a URL, `/fetch/https://...`). While it is on, a route path with a run of
    /// `/` is refused: it would never match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_slashes: Option<bool>,
    /// The access log: one JSON line per request. Absent: no access log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogConfig>,
    /// Request ids and W3C trace context on forwarded requests and responses.
    #[serde(default)]
    pub tracing: TracingConfig,
    /// Fan-outs: one client request answered by several upstream requests whose JSON
    /// answers are merged. Routes name them in `aggregate`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aggregates: Vec<AggregateConfig>,
    /// Kinds of client (mobile, partner, ...) that route `variants` answer differently.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_profiles: Vec<ClientProfileConfig>,
    /// Certificates (with their private keys) that TLS listeners serve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateConfig>,
    /// This node in a cluster of gateways: its id and the shared stores (Redis for
    /// cluster-wide rate limits). Absent: a single node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// JSON/REST to gRPC transcoders, each from a protobuf descriptor set, that routes to
    /// gRPC upstreams name in `transcoder`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transcoders: Vec<TranscoderConfig>,
    /// HTTP/2 with clients (TLS listeners offering `h2`, cleartext listeners with `h2c`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub http2: Http2Config,
    /// Name servers and TTL bounds for host names in target addresses and SRV discovery.
    #[serde(default, skip_serializing_if = "is_default")]
    pub resolver: ResolverConfig,
}

impl Config {
    /// Whether request paths have their runs of `/` merged (`merge_slashes`, default true).
    pub fn merges_slashes(&self) -> bool {
        self.merge_slashes.unwrap_or(true)
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A fan-out: several upstream requests (steps) for one client request, their JSON answers
/// merged into one object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// Unique id (same alphabet as route ids).
    pub id: String,
    /// Longest the whole aggregate may take, 1 to 600,000 ms; steps still running then have
    /// failed with a timeout. Default 1,000.
    #[serde(default = "default_deadline")]
    pub deadline_ms: u64,
    /// What happens when two steps set the same key to values that are not both objects:
    /// `error` (502), `first`, `last`, or `append` (arrays concatenate, other values become
    /// an array of both). Default `error`.
    #[serde(default)]
    pub on_conflict: OnConflict,
    /// Largest step response body, 1 to 67,108,864 bytes; larger is that step's failure.
    /// Default 1,048,576.
    #[serde(default = "default_max_step_bytes")]
    pub max_step_bytes: usize,
    /// The upstream requests, 1 to 32, merged in this order.
    pub steps: Vec<StepConfig>,
}

fn default_deadline() -> u64 {
    1000
}
fn default_max_step_bytes() -> usize {
    1024 * 1024
}

/// How an aggregate resolves two steps' values meeting at one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    #[default]
    Error,
    First,
    Last,
    Append,
}

/// One upstream request of an aggregate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// Unique within the aggregate (same alphabet as route ids; not `query`).
    pub id: String,
    /// Id of the upstream the request goes to.
    pub upstream: String,
    /// Request target template: `/items/{id}?lang={query.lang}`. `{name}` is a route
    /// parameter, `{query.name}` a query parameter of the client's request, `{step.a.b}` a
    /// field of an earlier step's answer (the step must be in `after`).
    pub path: String,
    /// Request method. Default `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Whether the aggregate fails when this step does. Default true.
    #[serde(default = "default_true")]
    pub required: bool,
    /// Longest this step may take, 1 to 600,000 ms (the aggregate's deadline still applies).
    /// Default: the aggregate's deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Steps that must have answered before this one starts. Default none: it starts at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Client request fields copied to this step's request, e.g. `Authorization`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pass_headers: Vec<String>,
    /// Whether this step's request carries the client's request body (at most one step).
    #[serde(default, skip_serializing_if = "is_false")]
    pub body: bool,
    /// Dot path of the member to take instead of the whole answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Dot paths of the members to keep (all others go). Not with `deny`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Dot paths of the members to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Top-level members to rename: `{ qty = "in_stock" }`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub rename: std::collections::BTreeMap<String, String>,
    /// Put the result under this key instead of merging its members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// A kind of client, recognised by exactly one of a header, the User-Agent, a query
/// parameter or the authenticated consumer's groups.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientProfileConfig {
    /// Unique id (same alphabet as route ids).
    pub id: String,
    /// A request field whose value is one of `values` (compared exactly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<NameValues>,
    /// User-Agent patterns, `*` matching any run of characters (case-sensitive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_agent: Vec<String>,
    /// A query parameter whose value is one of `values`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<NameValues>,
    /// Groups of the authenticated consumer (any one of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumer_groups: Vec<String>,
}

/// A field or parameter name and the values that match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameValues {
    pub name: String,
    pub values: Vec<String>,
}

/// Reshaping of a JSON response (routes and variants).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeConfig {
    /// Dot paths of the members to keep. Not with `deny`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Dot paths of the members to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Top-level members to rename.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub rename: std::collections::BTreeMap<String, String>,
    /// Dot path of the member to answer with instead of the whole body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Wrap the result in an object under this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Largest body reshaped, 1 to 67,108,864 bytes; larger ones are relayed unchanged.
    /// Default 1,048,576.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<usize>,
}

/// A route's answer for one kind of client: exactly one of `upstream`, `aggregate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantConfig {
    /// Id of the client profile this variant is for.
    pub profile: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<String>,
    /// Request target template for `upstream` (like the route's `rewrite`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<String>,
    /// Reshaping of the upstream's JSON answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<ShapeConfig>,
}

/// Where access log lines go and how many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// A file path (created if missing, appended to, reopened on SIGUSR1 for logrotate), or
    /// `stdout`. Required.
    pub path: String,
    /// Fraction of requests answered with 1xx to 4xx that are logged, from 0.0 to 1.0; 5xx
    /// answers are always logged. Default 1.0 (every request).
    #[serde(default = "one")]
    pub sample: f64,
}

// `sample` is validated to lie in 0.0..=1.0, so it is never NaN.
impl Eq for AccessLogConfig {}

fn one() -> f64 {
    1.0
}

/// Request ids and trace context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Every forwarded request and every response carries `X-Request-Id`: the client's value
    /// when it is 1 to 128 visible ASCII characters, else a new random 128-bit hex id.
    /// Default true.
    pub request_id: bool,
    /// Forwarded requests carry a W3C `traceparent`: a valid incoming one keeps its trace id
    /// and gets the gateway's own parent id; an absent or invalid one is replaced by a new
    /// one. `tracestate` is passed through. Default true.
    pub traceparent: bool,
    /// The sampled flag of a `traceparent` the gateway creates. Default true.
    pub sampled: bool,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            request_id: true,
            traceparent: true,
            sampled: true,
        }
    }
}

/// The field trusted proxies write the client address in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientIpHeader {
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    #[serde(rename = "forwarded")]
    Forwarded,
}

/// A client of the APIs: an application, a partner, a team.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Unique id (the same alphabet as route ids). Sent upstream in the authentication
    /// policy's `consumer_header`, and matched against a JWT's `consumer_claim`.
    pub id: String,
    /// Group names (same alphabet) that `acl` policies can allow. Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Ids of `rate_limit` policies applied to this consumer's requests once authenticated,
    /// after the route's. Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
}

/// A secret that identifies one consumer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    /// Unique id (same alphabet as route ids).
    pub id: String,
    /// Id of the consumer this credential identifies.
    pub consumer: String,
    /// `api_key` (the only kind so far; JWTs name their consumer in a claim instead).
    pub kind: CredentialKind,
    /// The API key, 8 to 256 visible ASCII characters. Write-only: once accepted it is
    /// replaced by `key_sha256` and never stored, shown or logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// SHA-256 of the key, 64 lower-case hex digits. Set by the gateway from `key`, or given
    /// directly to add a key without ever sending it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
}

/// Kinds of credential.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    #[default]
    ApiKey,
}

/// A named policy. `kind` selects which fields it takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PolicyConfig {
    IpFilter(IpFilterConfig),
    Domain(DomainConfig),
    Cors(CorsConfig),
    ApiKey(ApiKeyConfig),
    Jwt(JwtConfig),
    Acl(AclConfig),
    RateLimit(RateLimitConfig),
}

impl PolicyConfig {
    /// The policy's id.
    pub fn id(&self) -> &str {
        match self {
            PolicyConfig::IpFilter(p) => &p.id,
            PolicyConfig::Domain(p) => &p.id,
            PolicyConfig::Cors(p) => &p.id,
            PolicyConfig::ApiKey(p) => &p.id,
            PolicyConfig::Jwt(p) => &p.id,
            PolicyConfig::Acl(p) => &p.id,
            PolicyConfig::RateLimit(p) => &p.id,
        }
    }

    /// The `kind` as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyConfig::IpFilter(_) => "ip_filter",
            PolicyConfig::Domain(_) => "domain",
            PolicyConfig::Cors(_) => "cors",
            PolicyConfig::ApiKey(_) => "api_key",
            PolicyConfig::Jwt(_) => "jwt",
            PolicyConfig::Acl(_) => "acl",
            PolicyConfig::RateLimit(_) => "rate_limit",
        }
    }
}

/// `kind = "ip_filter"`: allow and deny lists of client addresses. A client in `deny` is
/// refused; otherwise, when `allow` is not empty, a client outside it is refused (403).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpFilterConfig {
    pub id: String,
    /// IPv4 / IPv6 CIDRs (`10.0.0.0/8`, `2001:db8::/32`) or single addresses. Default none.
    #[serde(default)]
    pub allow: Vec<String>,
    /// CIDRs or addresses refused even when in `allow`. Default none.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// `kind = "domain"`: the `Host` values the gateway answers for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    pub id: String,
    /// Host names, exact (`api.example.com`) or `*.example.com` (one or more labels);
    /// case-insensitive, port ignored. At least one.
    pub hosts: Vec<String>,
    /// Status for any other host: 421 (Misdirected Request, the default) or 403.
    #[serde(default = "default_domain_status")]
    pub status: u16,
}

fn default_domain_status() -> u16 {
    421
}

/// `kind = "cors"`: which web origins may call the route from a browser. Requests whose
/// `Origin` (or, without one, `Referer`) is not allowed get 403; preflights (`OPTIONS` with
/// `Access-Control-Request-Method`) are answered by the gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    pub id: String,
    /// Allowed origins, `scheme://host[:port]` exactly as browsers send them, or `*` for any.
    /// At least one.
    pub origins: Vec<String>,
    /// Methods a preflight may ask for. Default `GET`, `HEAD`, `POST`.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Request header names a preflight may ask for (case-insensitive). Default none.
    #[serde(default)]
    pub headers: Vec<String>,
    /// Response header names the browser may expose to the page. Default none.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Seconds a browser may cache a preflight answer, at most 86,400. Default 600.
    #[serde(default = "default_max_age")]
    pub max_age_s: u32,
    /// Whether pages may send cookies / HTTP auth (`Access-Control-Allow-Credentials`).
    /// Not allowed with `*`. Default false.
    #[serde(default)]
    pub allow_credentials: bool,
    /// Whether a request with neither `Origin` nor `Referer` (not from a browser page) is
    /// refused. Default false.
    #[serde(default)]
    pub require_origin: bool,
}

fn default_max_age() -> u32 {
    600
}

/// `kind = "api_key"`: authenticates with an API key (see `credentials`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub id: String,
    /// Request header that carries the key. Default `X-Api-Key` when `query` is not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Query parameter that carries the key (also accepted when `header` is set). Default
    /// none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Header that carries the consumer id to the upstream; any copy the client sent is
    /// removed. Default `X-Consumer-Id`.
    #[serde(default = "default_consumer_header")]
    pub consumer_header: String,
    /// Whether the key is kept out of the forwarded request (its header lines and its query
    /// parameters removed, see the README). Default true.
    #[serde(default = "default_true")]
    pub strip_credential: bool,
}

fn default_consumer_header() -> String {
    "X-Consumer-Id".to_owned()
}
fn default_true() -> bool {
    true
}

/// JWT signature algorithms. The policy's, never the token's, decides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    #[default]
    HS256,
    RS256,
    ES256,
}

/// `kind = "jwt"`: authenticates with a bearer JSON Web Token (RFC 7519).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub id: String,
    /// `HS256`, `RS256` or `ES256`. Tokens whose header names another `alg` are refused.
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret, at least 32 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// RS256 / ES256 public key in PEM (`BEGIN PUBLIC KEY`, or `BEGIN RSA PUBLIC KEY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// A JWK set (`{"keys": [...]}`) instead of `secret` / `public_key`; a token's `kid`
    /// picks the key. At most 16 keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<serde_json::Value>,
    /// Required `iss`. Default: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Required `aud` (a string, or one element of an array). Default: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds, at most 3,600. Default 30.
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
    /// Whether a token without `exp` is refused. Default true.
    #[serde(default = "default_true")]
    pub require_exp: bool,
    /// Claim whose (string) value is the consumer id. Default `sub`.
    #[serde(default = "default_claim")]
    pub consumer_claim: String,
    /// Header that carries the consumer id to the upstream. Default `X-Consumer-Id`.
    #[serde(default = "default_consumer_header")]
    pub consumer_header: String,
    /// Whether `Authorization` is removed before forwarding. Default true.
    #[serde(default = "default_true")]
    pub strip_credential: bool,
    /// Longest token accepted, in bytes (longer: 401), 256 to 65,536. Default 8,192.
    #[serde(default = "default_max_token")]
    pub max_token_bytes: usize,
}

fn default_leeway() -> u64 {
    30
}
fn default_claim() -> String {
    "sub".to_owned()
}
fn default_max_token() -> usize {
    8192
}

/// `kind = "acl"`: only the listed consumers or members of the listed groups pass (403 for
/// others; 401 when no authentication policy identified a consumer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    pub id: String,
    /// Consumer ids allowed. Default none.
    #[serde(default)]
    pub consumers: Vec<String>,
    /// Group names allowed. Default none. At least one consumer or group in all.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The period a rate is counted over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RatePeriod {
    #[default]
    Second,
    Minute,
    Hour,
}

impl RatePeriod {
    /// The period in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            RatePeriod::Second => 1,
            RatePeriod::Minute => 60,
            RatePeriod::Hour => 3600,
        }
    }
}

/// `kind = "rate_limit"`: a token bucket of `burst` requests refilled at `rate` per `per`,
/// shared by all workers. Over the limit: 429 with `Retry-After`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub id: String,
    /// Requests per `per`, 1 to 1,000,000,000.
    pub rate: u64,
    /// `second`, `minute` or `hour`. Default `second`.
    #[serde(default)]
    pub per: RatePeriod,
    /// Requests admitted at once from a full bucket, 1 to 1,000,000,000. Default: `rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    /// What a bucket is kept per: `route` (one bucket for the policy), `client_ip`,
    /// `consumer` (anonymous requests count per client IP) or `header:NAME` (requests
    /// without the header share one bucket). Default `route`.
    #[serde(default = "default_rate_key")]
    pub key: String,
    /// Most keyed buckets kept, 1 to 10,000,000; see the README for the memory bound.
    /// Default 100,000.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// Also send `X-RateLimit-Limit`, `-Remaining` and `-Reset` on 429. Default false.
    #[serde(default)]
    pub x_ratelimit_headers: bool,
    /// Also send `RateLimit-Policy` and `RateLimit` (and the `X-RateLimit-*` fields with
    /// `x_ratelimit_headers`) on the answers of the requests it admits, so clients can pace
    /// themselves before a 429. Default false: only refusals carry them.
    #[serde(default, skip_serializing_if = "is_false")]
    pub headers_on_success: bool,
    /// `node` (each node counts alone; the default) or `cluster` (the nodes sharing
    /// `[cluster] redis` count together).
    #[serde(default, skip_serializing_if = "RateScope::is_node")]
    pub scope: RateScope,
    /// With `scope = "cluster"`, what happens while Redis cannot be reached: `allow` (the
    /// default: requests pass), `deny` (refused with 503) or `local` (each node applies the
    /// limit alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_store_error: Option<StoreErrorMode>,
}

/// Where a rate limit is counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateScope {
    #[default]
    Node,
    Cluster,
}

impl RateScope {
    pub fn is_node(&self) -> bool {
        *self == RateScope::Node
    }
}

/// What a cluster-scoped rate limit does while its store is unreachable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreErrorMode {
    #[default]
    Allow,
    Deny,
    Local,
}

/// `[cluster]`: this node among several.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id, unique in the cluster (same alphabet as other ids).
    pub node_id: String,
    /// `redis://[[USER]:PASSWORD@]HOST:PORT[/DB]`: where cluster-scoped rate limits are
    /// counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<String>,
    /// How often a node reconciles its rate-limit counts with Redis, in milliseconds. 1 to
    /// 1,000; default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_ms: Option<u64>,
    /// With an etcd config store: a file holding 32 random bytes as 64 hex digits (`openssl
    /// rand -hex 32`), the same on every node. Certificates' private keys are stored in etcd
    /// encrypted with it (AES-256-GCM), never in the clear; without it an etcd store refuses
    /// private keys. Read at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
}

fn default_rate_key() -> String {
    "route".to_owned()
}
fn default_max_keys() -> usize {
    100_000
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
    /// Ids of `ip_filter` and `domain` policies for every request that comes in on this
    /// listener, whether or not a route matches; they run before the global and route
    /// policies. Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Terminate TLS on this listener: `{ certificates = ["api-example"] }`. Absent:
    /// cleartext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTlsConfig>,
    /// On a cleartext listener, also accept HTTP/2 with prior knowledge (RFC 9113 3.3): a
    /// connection that opens with the HTTP/2 preface speaks HTTP/2, any other HTTP/1.1.
    /// Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub h2c: bool,
    /// Answer every request on this listener with a redirect, before any route or policy:
    /// a plain-HTTP listener's `{ scheme = "https" }` sends each request to the same URL over
    /// HTTPS. Absent: requests are routed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RedirectConfig>,
}

/// TLS settings of one listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// Ids of `certificates`, at least one. A client's SNI name picks the certificate whose
    /// names match it (exactly, else by wildcard); clients without SNI, or with a name none
    /// matches, get the first.
    pub certificates: Vec<String>,
    /// Lowest TLS version accepted: `"1.2"` (the default) or `"1.3"`.
    #[serde(
        default = "default_min_tls",
        skip_serializing_if = "is_default_min_tls"
    )]
    pub min_version: String,
    /// Protocols offered by ALPN, in order of preference: `"h2"`, `"http/1.1"`. Default both.
    #[serde(default = "default_alpn")]
    pub alpn: Vec<String>,
}

fn default_min_tls() -> String {
    "1.2".to_owned()
}
fn is_default_min_tls(v: &str) -> bool {
    v == "1.2"
}
fn default_alpn() -> Vec<String> {
    vec!["h2".to_owned(), "http/1.1".to_owned()]
}

/// A certificate chain and its private key, for TLS listeners.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// Unique id that listeners refer to (same alphabet as route ids).
    pub id: String,
    /// The certificate chain in PEM, leaf first. One of `cert_pem` and `cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_pem: Option<String>,
    /// A file holding the PEM chain, read whenever the config is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// The private key in PEM (PKCS#8, PKCS#1 or SEC1). Write-only: the admin API stores it
    /// with mode 0600 in the data directory and replaces it by `key_sha256`; it is never
    /// shown.
    #[serde(default, skip_serializing)]
    pub key_pem: Option<String>,
    /// A file holding the private key, read whenever the config is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// SHA-256 of the key's PEM text, 64 lower-case hex digits. Set by the gateway; a PUT
    /// that carries it instead of `key_pem` keeps the key stored under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
    /// Read-only, set by the gateway: the DNS names the certificate is valid for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Read-only, set by the gateway: when the certificate expires (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// Read-only, set by the gateway: SHA-256 of the chain (its DER certificates in order),
    /// 64 lower-case hex digits. A `cert_file` whose chain changed (an intermediate added, a
    /// certificate reissued with the same key and expiry) changes it, so the next publish
    /// (SIGHUP, a PUT) serves the new chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_sha256: Option<String>,
    /// The key found under `key_sha256` in the data directory, filled in by the control
    /// plane before compiling; never serialised.
    #[serde(skip)]
    pub stored_key: StoredKey,
}

/// A private key kept out of every serialised form, `Debug` and equality (it follows from
/// `key_sha256`, which is compared).
#[derive(Clone, Default)]
pub struct StoredKey(pub Option<std::sync::Arc<str>>);

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "StoredKey(..)"
        } else {
            "StoredKey(None)"
        })
    }
}

impl PartialEq for StoredKey {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for StoredKey {}

/// HTTP/2 with clients: limits against abusive peers and flow-control windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Config {
    /// Most streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS), 1 to
    /// 1,000. Default 128.
    pub max_concurrent_streams: u32,
    /// Largest decoded header list a client may send (SETTINGS_MAX_HEADER_LIST_SIZE), in
    /// bytes; larger: the stream is refused with 431. 1,024 to 1,048,576. Default 65,536
    /// (the same header-byte bound `[limits] max_header_bytes` also applies).
    pub max_header_list_size: u32,
    /// Initial flow-control window of each stream, 65,535 to 16,777,216. Default 1,048,576.
    pub initial_stream_window: u32,
    /// Flow-control window of the whole connection, 65,535 to 67,108,864. Default 4,194,304.
    pub initial_connection_window: u32,
    /// Streams a client may reset before the gateway has answered them, over the life of
    /// one connection, before the connection is closed with ENHANCE_YOUR_CALM (rapid reset,
    /// CVE-2023-44487); only while such resets are also more than half of the connection's
    /// streams, so a long-lived browser connection that cancels now and then is not cut.
    /// 1 to 10,000. Default 100.
    pub max_pending_resets: u32,
}

impl Default for Http2Config {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 128,
            max_header_list_size: 65_536,
            initial_stream_window: 1 << 20,
            initial_connection_window: 4 << 20,
            max_pending_resets: 100,
        }
    }
}

/// A named set of backend targets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Unique id that routes refer to: letters, digits, `-`, `_`, `.`; 1 to 64 characters.
    pub id: String,
    /// The instances requests are spread over. At least one, unless `discovery` finds them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetConfig>,
    /// Targets found in DNS instead of listed: `{ dns_srv = "_http._tcp.catalog.internal" }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<DiscoveryConfig>,
    /// How a request's target is chosen: `round_robin` (weighted; the default),
    /// `least_request` (power of two choices over outstanding requests) or `hash`
    /// (consistent, on `hash_on`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,
    /// With `balance = "hash"`: what is hashed, `header:NAME`, `cookie:NAME`, `client_ip` or
    /// `path`. Required with `hash`, refused otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<String>,
    /// Active health checks, run by the control plane. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckConfig>,
    /// Passive health: targets that fail requests in a row are ejected for a while. Absent:
    /// none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive: Option<PassiveConfig>,
    /// Retries of failed requests on another target. Absent: only the retry of a pooled
    /// connection the upstream had closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryConfig>,
    /// Limits per upstream and gateway node; above one, requests are answered 503 at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit: Option<CircuitConfig>,
    /// What the targets speak: `http1` (the default), `h2c` (HTTP/2 with prior knowledge),
    /// `h2` (HTTP/2 over TLS: needs `tls`) or `grpc` (gRPC over HTTP/2, over TLS with `tls`:
    /// errors become gRPC statuses, `grpc-timeout` is honoured).
    #[serde(default, skip_serializing_if = "UpstreamProtocol::is_http1")]
    pub protocol: UpstreamProtocol,
    /// TLS towards the targets (HTTPS upstreams). Absent: cleartext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTlsConfig>,
    /// `h2c` and `grpc`: streams open at once on one connection before the worker opens
    /// another to the same target. 1 to 1000; default 100 (or less, if the target says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_streams: Option<u32>,
    /// This upstream's own `[timeouts]` towards its targets; each one absent takes the
    /// global value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<UpstreamTimeoutsConfig>,
}

/// TLS towards an upstream's targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// The name sent in SNI and checked against the target's certificate. Default: the
    /// target's host name (a `HOST:PORT` target, an SRV record's target); for a target
    /// given as `IP:PORT`, no SNI and the certificate must name that IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// The authorities (PEM certificates) trusted to sign the targets' certificates, inline
    /// or in a file. Default: the system's (`/etc/ssl/certs/ca-certificates.crt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Whether the target's certificate is checked (chain, name, validity). Default true;
    /// `false` accepts any certificate, so anyone on the path can read and change the
    /// traffic: for tests only.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub verify: bool,
    /// The id of a `certificates` entry presented to targets that ask for a client
    /// certificate (mutual TLS). Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Lowest TLS version used: `"1.2"` (the default) or `"1.3"`.
    #[serde(
        default = "default_min_tls",
        skip_serializing_if = "is_default_min_tls"
    )]
    pub min_version: String,
    /// Read-only, set by the gateway (what it is given is replaced): SHA-256 of the
    /// authorities' PEM text in use (`ca_pem`, `ca_file` or the system's), 64 lower-case
    /// hex digits. A `ca_file` whose content changed changes it, so the next publish
    /// (SIGHUP, a PUT) trusts the new authorities. Absent with `verify = false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_sha256: Option<String>,
}

fn is_true(b: &bool) -> bool {
    *b
}

/// An upstream's own timeouts, in milliseconds (1 to 86,400,000): each replaces the
/// `[timeouts]` field of the same name with `upstream_` before it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTimeoutsConfig {
    /// `upstream_connect_ms`: opening a connection to a target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<u64>,
    /// `upstream_response_head_ms`: from the request sent to the answer's head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_head_ms: Option<u64>,
    /// `upstream_body_ms`: the longest silence within the answer's body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_ms: Option<u64>,
    /// `upstream_send_ms`: the longest a write to the target may wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_ms: Option<u64>,
}

/// A JSON/REST to gRPC transcoder: the services of a protobuf descriptor set, each method
/// mapped to HTTP by its `google.api.http` option.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TranscoderConfig {
    /// Unique id that routes refer to.
    pub id: String,
    /// Path of a binary `FileDescriptorSet` with its imports (`protoc --include_imports
    /// --descriptor_set_out=FILE`), read when the config is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptor_set: Option<String>,
    /// The same bytes in base64 (for the admin API). Exactly one of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptor_set_base64: Option<String>,
    /// Full names of the services exposed (`shop.v1.Orders`). At least one.
    pub services: Vec<String>,
    /// Largest protobuf message either way, in bytes. 1 to 67,108,864; default 4,194,304.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<u64>,
    /// Read-only, set by the gateway: SHA-256 of the `descriptor_set` file as last read (64
    /// lower-case hex digits). A file that changed changes it, so the next publish (SIGHUP,
    /// a PUT of the transcoder as it is) serves the new descriptors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptor_sha256: Option<String>,
}

/// The protocol an upstream's targets speak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`).
    H2,
    Grpc,
}

impl UpstreamProtocol {
    pub fn is_http1(&self) -> bool {
        *self == UpstreamProtocol::Http1
    }

    /// Whether requests go over HTTP/2 streams.
    pub fn is_h2(&self) -> bool {
        !self.is_http1()
    }
}

/// One backend instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `IP:PORT`, or `HOST:PORT` with a host name that the control plane resolves (A and
    /// AAAA) through `[resolver]` and re-resolves when its TTL runs out. No default.
    pub address: String,
    /// Relative share of requests, 1 to 1000. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// No new requests; in-flight ones finish, pooled connections to it close. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// Requests only while no other target (one that is not a backup) can take them, as
    /// nginx's `backup`. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub backup: bool,
}

/// Where an upstream's targets come from when they are not listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// A DNS SRV name, for example `_http._tcp.catalog.internal`: the records' targets and
    /// ports (of the lowest priority), weighted by the records' weights.
    pub dns_srv: String,
}

/// Load-balancing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    RoundRobin,
    LeastRequest,
    Hash,
}

/// Active health checks: an HTTP/1.1 `GET` to each target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// The path checked, starting with `/`. No default.
    pub path: String,
    /// Time between two checks of one target (with up to 10% jitter). 100 to 3,600,000.
    /// Default 5,000.
    #[serde(default = "default_check_interval")]
    pub interval_ms: u64,
    /// How long one check may take. 1 to `interval_ms`. Default 1,000.
    #[serde(default = "default_check_timeout")]
    pub timeout_ms: u64,
    /// Passing checks in a row that make an unhealthy target healthy. 1 to 100. Default 2.
    #[serde(default = "default_two")]
    pub healthy_after: u32,
    /// Failing checks in a row that make a target unhealthy. 1 to 100. Default 2.
    #[serde(default = "default_two")]
    pub unhealthy_after: u32,
    /// Statuses that pass. Default `[200]`.
    #[serde(default = "default_expect_status")]
    pub expect_status: Vec<u16>,
}

fn default_check_interval() -> u64 {
    5_000
}
fn default_check_timeout() -> u64 {
    1_000
}
fn default_two() -> u32 {
    2
}
fn default_expect_status() -> Vec<u16> {
    vec![200]
}

/// Passive health (outlier ejection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveConfig {
    /// Failed requests in a row (connect failures, resets, timeouts, malformed answers, 5xx
    /// statuses) that eject a target. 1 to 1,000. Default 5.
    pub consecutive_failures: u32,
    /// How long the first ejection lasts; the n-th in a row lasts n times as long (at most
    /// 10 times). 1 to 3,600,000. Default 30,000.
    pub ejection_ms: u64,
    /// Most of an upstream's targets ejected at once, in percent (at least one target when
    /// above 0). 0 to 100. Default 50.
    pub max_ejected_percent: u32,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            ejection_ms: 30_000,
            max_ejected_percent: 50,
        }
    }
}

/// Which requests may be retried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryMethods {
    /// GET, HEAD, OPTIONS, TRACE, PUT, DELETE (RFC 9110 section 9.2.2).
    #[default]
    Idempotent,
    All,
}

/// Retries on another target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Tries in all, the first included (2: one retry). 1 to 10. Default 2.
    pub attempts: u32,
    /// What is retried: error kinds (`connect_failed`, `connect_timeout`, `send_timeout`,
    /// `response_timeout`, `upstream_closed`, `upstream_malformed`), the groups `connect`
    /// (both connect kinds), `reset` (`upstream_closed`) and `timeout` (`connect_timeout`,
    /// `send_timeout`, `response_timeout`), and status codes from 500 to 599 as strings.
    /// Default `["connect", "reset", "timeout"]`.
    pub on: Vec<String>,
    /// `idempotent` (the default) or `all`.
    pub methods: RetryMethods,
    /// Retries allowed, in percent of the upstream's requests in the current second. 0 to
    /// 100. Default 20.
    pub budget_percent: u32,
    /// Retries allowed per second whatever the percentage says. Default 3.
    pub budget_min_per_s: u32,
    /// Bounds each try (connect, send, response head). Absent: only the `[timeouts]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    /// Bounds the tries together, from the first one's start: no try waits for a connection
    /// or a response head past it, and no retry starts (nor waits its backoff) past it; a
    /// try it cuts short fails as a timeout and is not retried. Absent: nothing bounds the
    /// tries together but `attempts`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overall_timeout_ms: Option<u64>,
    /// A wait before each retry, in milliseconds, growing with each: retry `n` waits a random
    /// time between half of and all of the lesser of `backoff_ms` times `2^n - 1` (Envoy's
    /// growth) and `max_backoff_ms`. 1 to 10,000. Absent: a retry goes at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u64>,
    /// The longest backoff. `backoff_ms` to 10,000; default 10 times `backoff_ms` (at most
    /// 10,000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_backoff_ms: Option<u64>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: 2,
            on: vec!["connect".into(), "reset".into(), "timeout".into()],
            methods: RetryMethods::Idempotent,
            budget_percent: 20,
            budget_min_per_s: 3,
            per_try_timeout_ms: None,
            overall_timeout_ms: None,
            backoff_ms: None,
            max_backoff_ms: None,
        }
    }
}

/// Circuit-breaking limits per upstream and gateway node. Each is optional (absent: no
/// limit), 1 to 1,000,000.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitConfig {
    /// Open connections to the upstream's targets (pooled ones included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a new connection to open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending: Option<u32>,
    /// Requests in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
}

/// Where and how host names in target addresses and SRV names are resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResolverConfig {
    /// `IP:PORT` (or `IP`, port 53) of the name servers, tried in order. Default: the
    /// system's resolution, `/etc/hosts` first, then the `nameserver` lines of
    /// `/etc/resolv.conf`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Shortest time an answer is kept, whatever its TTL says. Default 1,000.
    pub min_ttl_ms: u64,
    /// Longest time an answer is kept. Default 300,000.
    pub max_ttl_ms: u64,
    /// How long one query waits for each name server. Default 2,000.
    pub timeout_ms: u64,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            min_ttl_ms: 1_000,
            max_ttl_ms: 300_000,
            timeout_ms: 2_000,
        }
    }
}

/// A routing rule. Exactly one of `path` / `path_prefix`, and exactly one of `upstream` /
/// `respond` / `aggregate` / `redirect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique id, same alphabet as upstream ids.
    pub id: String,
    /// Matches this exact path (the request target before `?`), for example `/health`; a
    /// segment `{name}` matches any one non-empty segment and names a route parameter
    /// (`/products/{id}`).
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
    /// Default: any method but `TRACE`, which only a route that names it takes.
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
    /// A redirect the gateway answers with: the request's URL with the parts given here
    /// replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RedirectConfig>,
    /// Id of the aggregate (fan-out) that answers this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<String>,
    /// With an `upstream` of `protocol = "grpc"`: the id of the transcoder that turns JSON
    /// requests into gRPC calls (and the answers back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transcoder: Option<String>,
    /// For `upstream`: the forwarded request target, a template filled from the route's
    /// `{name}` parameters (`/items/{id}`); the client's query string is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<String>,
    /// For `upstream`: reshaping of the JSON answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<ShapeConfig>,
    /// Other answers for kinds of client: the first whose profile matches is used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<VariantConfig>,
    /// Ids of policies that apply to this route, after `global_policies`. Whatever the
    /// order here, they run in the fixed order IP filter, domain / CORS, authentication,
    /// ACL, rate limit. Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Fields set on, or removed from, every request the route forwards (to its upstream,
    /// its variants' and its aggregate steps').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderEdits>,
    /// Fields set on, or removed from, every answer the route gives (relayed, made by the
    /// gateway, refused by a policy), but a `101`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderEdits>,
}

/// Header fields a route sets or removes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdits {
    /// Field name to value: each replaces every copy of its name, or is added.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub set: std::collections::BTreeMap<String, String>,
    /// Field names removed (case-insensitive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A redirect: the request's URL (its scheme, host, port, path and query) with the parts
/// set here replaced, in `Location`. At least one part is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// 301, 302, 303, 307 or 308. Default 301.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// `http` or `https`. Default: the listener's. A route's redirect that sets it also sets
    /// `host` (a route matches on every listener, the new scheme's too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Host name or IP address (IPv6 in brackets). Default: the request's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Port. Default: the request's, unless `host` or another scheme than the listener's is
    /// set (then the scheme's default port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Path. Default: the request's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Leave the request's query out. Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub strip_query: bool,
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
pub(crate) fn default_content_type() -> String {
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
    /// How long a client may leave response bytes unacknowledged, or keep its receive window
    /// shut, before the gateway drops the connection (the kernel's TCP_USER_TIMEOUT, set when
    /// the connection is accepted). Guards against clients that stop reading (the shut-window
    /// case needs Linux 5.11 or later). Default 60,000.
    pub client_send_ms: u64,
    /// TCP connect to a target; on expiry 504. Default 5,000.
    pub upstream_connect_ms: u64,
    /// From the end of sending the request to the end of the response head; on expiry 504.
    /// Default 60,000.
    pub upstream_response_head_ms: u64,
    /// Longest silence while relaying a response body or an upgraded (WebSocket) tunnel before
    /// both connections are closed. Default 60,000.
    pub upstream_body_ms: u64,
    /// How long an upstream may leave request bytes unacknowledged, or keep its receive window
    /// shut, before the gateway drops the connection (TCP_USER_TIMEOUT, set at connect); the
    /// client gets 504 if no response has started. Default 60,000.
    pub upstream_send_ms: u64,
    /// How long an idle pooled upstream connection is kept. Default 30,000.
    pub upstream_idle_ms: u64,
    /// From accepting a connection on a TLS listener to the end of its handshake; on expiry
    /// the connection is closed. Default 10,000.
    pub tls_handshake_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            client_header_ms: 10_000,
            client_body_ms: 30_000,
            client_idle_ms: 60_000,
            client_park_ms: 20,
            client_send_ms: 60_000,
            upstream_connect_ms: 5_000,
            upstream_response_head_ms: 60_000,
            upstream_body_ms: 60_000,
            upstream_send_ms: 60_000,
            upstream_idle_ms: 30_000,
            tls_handshake_ms: 10_000,
        }
    }
}

/// Limits on what a client may send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request head (request line and fields), in bytes; larger: 431. 1,024 to
    /// 1,048,576. Default 16,384. Also bounds a chunked request's trailer section (an
    /// upstream's answer head may be up to 64 KiB, whatever this says).
    pub max_header_bytes: usize,
    /// Most header fields in a request; more: 431. 1 to 256. Default 100.
    pub max_header_count: usize,
    /// Longest request target, in bytes; longer: 414. 16 up to `max_header_bytes`. Default 8,192.
    pub max_uri_bytes: usize,
    /// Largest request body, in bytes; larger: 413. Default 10,485,760 (10 MiB).
    pub max_body_bytes: u64,
    /// Most client connections one worker holds open (busy, idle and parked ones); at that
    /// many it stops accepting until one closes, and new connections wait in the listen
    /// backlog. 1 to 1,000,000. Default 65,536. Left out when it is the default, so stores
    /// written by this build stay readable by the builds before it (a rolling upgrade).
    #[serde(skip_serializing_if = "is_default_max_connections")]
    pub max_connections: usize,
}

fn is_default_max_connections(v: &usize) -> bool {
    *v == LimitsConfig::default().max_connections
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
            max_header_count: 100,
            max_uri_bytes: 8 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
            max_connections: 65_536,
        }
    }
}

/// How response bodies are relayed to clients.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Large length-framed response bodies (16 KiB or more still to come) go from the upstream
    /// socket to a plain TCP client's socket through a pipe (`splice(2)`) instead of being
    /// copied through the gateway's memory. Default false: over five machines and layouts
    /// copying served 7 to 19% more 64 KiB answers per CPU-second in three, was level in a
    /// fourth, and splicing won the fifth (+37%) (`docs/perf/splice-2cpu.md`).
    pub splice: bool,
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
