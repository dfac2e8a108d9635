//! Compiled traffic policies: consumers, credentials and policies checked and turned into
//! what the data plane runs per request (CIDR sets, hashed API keys, parsed JWT keys,
//! precomputed header bytes). Called by [`crate::Snapshot::compile`] only.
//!
//! Policies run in a fixed order whatever order a route lists them in, by [`Stage`]: IP
//! filter, domain allowlist and CORS, authentication, authorization (ACL), rate limit. The
//! rate-limit buckets themselves are not here: they must outlive a snapshot, so the data
//! plane keeps them, keyed by the policy id and [`RateLimit::params`].

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::cidr::IpSet;
use crate::config::{
    ApiKeyConfig, Config, CorsConfig, JwtAlgorithm, JwtConfig, PolicyConfig, RateLimitConfig,
};
use crate::keys::{self, JwtKey, KeyMaterial};
use crate::validate::{check_id, hex32, is_tchar, to_hex, valid_host_pattern};
use crate::ConfigError;

/// Most policies in one config (indices are `u16`).
pub const MAX_POLICIES: usize = 4096;

/// Where in the fixed order a policy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    IpFilter,
    Domain,
    /// After the domain allowlist: a preflight for a host the gateway does not serve is
    /// refused as any request for it is, whichever of the two is listed first.
    Cors,
    Authentication,
    Authorization,
    RateLimit,
}

/// Everything about policies a worker needs.
#[derive(Debug, Default)]
pub struct Policies {
    pub list: Vec<Policy>,
    pub consumers: Vec<Consumer>,
    /// API keys by their SHA-256 digest (see [`ApiKeys`]).
    pub api_keys: ApiKeys,
    /// Consumer id → index into `consumers` (JWT consumer claims).
    pub consumer_ids: HashMap<Box<str>, u32>,
    /// Policy id → index into `list`.
    pub by_id: HashMap<Box<str>, u16>,
    /// Peers whose forwarding field is believed.
    pub trusted_proxies: IpSet,
    /// Which field they write: `Forwarded` (true) or `X-Forwarded-For`.
    pub client_ip_from_forwarded: bool,
    /// Their word for the client's scheme is believed (`trust_forwarded_proto`).
    pub trust_forwarded_proto: bool,
    /// Indices into `list` that apply to every route (in stage order).
    pub global: Box<[u16]>,
    /// The global `ip_filter` and `domain` policies: what a request that matches no route
    /// still goes through.
    pub global_unrouted: Box<[u16]>,
    /// Per listener (by index), its `ip_filter` and `domain` policies, in stage order.
    pub listeners: Vec<Box<[u16]>>,
    /// The query parameters `api_key` policies read a key from: the access log leaves them
    /// out whether or not a policy ran.
    pub query_keys: Box<[Box<[u8]>]>,
    /// Lower-case names of the request fields a trailer section must not carry (beyond the
    /// framing ones): those the gateway sets or reads for forwarding and authentication, and
    /// every policy's key and consumer header. The head's copies are checked or replaced; a
    /// trailer's would reach the upstream unchecked, and one that merges trailers into the
    /// header section (RFC 9110 6.5.1 forbids it, some do it) would take a forged one.
    pub trailer_refused: std::sync::Arc<[Box<[u8]>]>,
}

/// The request fields [`Policies::trailer_refused`] always holds: credentials, those the
/// gateway writes for forwarding and tracing, and the path overrides it drops from the head
/// (IIS and Symfony-style frameworks take the path from them).
const TRAILER_REFUSED: &[&[u8]] = &[
    b"authorization",
    b"proxy-authorization",
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-real-ip",
    b"x-request-id",
    b"traceparent",
    b"x-original-url",
    b"x-rewrite-url",
];

/// Stored API keys: SHA-256 digests, bucketed by their first 8 bytes. A lookup hashes the
/// presented key, finds the bucket, and compares the full digests in constant time, so
/// neither the table nor the comparison's timing depends on how much of a stored digest a
/// guess matches.
#[derive(Debug, Default)]
pub struct ApiKeys {
    buckets: HashMap<u64, Vec<([u8; 32], u32)>>,
}

impl ApiKeys {
    /// Adds a digest for `consumer`; `false` if the digest is already there.
    pub fn insert(&mut self, digest: [u8; 32], consumer: u32) -> bool {
        let bucket = self.buckets.entry(prefix(&digest)).or_default();
        if bucket.iter().any(|(d, _)| constant_time_eq(d, &digest)) {
            return false;
        }
        bucket.push((digest, consumer));
        true
    }

    /// The consumer whose key has SHA-256 `digest`.
    pub fn find(&self, digest: &[u8; 32]) -> Option<u32> {
        let bucket = self.buckets.get(&prefix(digest))?;
        let mut found = None;
        for (d, consumer) in bucket {
            if constant_time_eq(d, digest) {
                found = Some(*consumer);
            }
        }
        found
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.buckets.values().map(Vec::len).sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

fn prefix(d: &[u8; 32]) -> u64 {
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// Compares `given` with `expected` in time that depends only on `expected`'s length (a
/// secret's length is not the secret).
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for (i, &e) in expected.iter().enumerate() {
        diff |= given.get(i).copied().unwrap_or(0) ^ e;
    }
    // Keeps the optimiser from turning the loop back into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// A compiled consumer.
#[derive(Debug)]
pub struct Consumer {
    pub id: Box<str>,
    pub groups: Box<[Box<str>]>,
    /// Rate-limit policies for this consumer, indices into `Policies::list`.
    pub policies: Box<[u16]>,
}

/// A compiled policy.
#[derive(Debug)]
pub struct Policy {
    pub id: Box<str>,
    pub stage: Stage,
    pub kind: PolicyKind,
}

/// What a policy checks.
#[derive(Debug)]
pub enum PolicyKind {
    IpFilter {
        /// Empty: everyone not denied.
        allow: IpSet,
        deny: IpSet,
    },
    Domain(Domain),
    Cors(Cors),
    ApiKey(ApiKey),
    Jwt(Jwt),
    Acl {
        consumers: Box<[u32]>,
        groups: Box<[Box<str>]>,
    },
    RateLimit(RateLimit),
}

impl PolicyKind {
    /// The field an authentication policy sets to the consumer it identified.
    pub fn consumer_header(&self) -> Option<&[u8]> {
        match self {
            PolicyKind::ApiKey(k) => Some(&k.consumer_header),
            PolicyKind::Jwt(j) => Some(&j.consumer_header),
            _ => None,
        }
    }
}

/// Allowed `Host` values, lower-case without port.
#[derive(Debug)]
pub struct Domain {
    pub exact: Box<[Box<[u8]>]>,
    /// `.example.com` for `*.example.com`.
    pub suffixes: Box<[Box<[u8]>]>,
    /// 421 or 403.
    pub status: u16,
}

impl Domain {
    /// Whether `host` (lower-case, no port, no trailing dot) is allowed.
    pub fn allows(&self, host: &[u8]) -> bool {
        self.exact.iter().any(|h| &h[..] == host)
            || self
                .suffixes
                .iter()
                .any(|s| host.len() > s.len() && host.ends_with(s))
    }
}

/// A compiled CORS policy; the `Access-Control-*` values are preformatted.
#[derive(Debug)]
pub struct Cors {
    pub any_origin: bool,
    /// `methods` holds `*`: a preflight may ask for any method.
    pub any_method: bool,
    /// `headers` holds `*`: a preflight may ask for any header (its list is then echoed,
    /// since browsers never take `*` for `Authorization`).
    pub any_header: bool,
    /// Allowed origins, lower-case.
    pub origins: Box<[Box<[u8]>]>,
    /// Methods a preflight may ask for.
    pub methods: Box<[Box<[u8]>]>,
    /// Header names a preflight may ask for, lower-case.
    pub headers: Box<[Box<[u8]>]>,
    /// `Access-Control-Allow-Methods` value.
    pub allow_methods: Box<[u8]>,
    /// `Access-Control-Allow-Headers` value (empty: none).
    pub allow_headers: Box<[u8]>,
    /// `Access-Control-Expose-Headers` value (empty: none).
    pub expose_headers: Box<[u8]>,
    pub max_age_s: u32,
    pub allow_credentials: bool,
    pub require_origin: bool,
}

impl Cors {
    /// Whether `origin` (as sent, `scheme://host[:port]`) may call.
    pub fn allows(&self, origin: &[u8]) -> bool {
        self.any_origin || self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }
}

/// A compiled API-key policy.
#[derive(Debug)]
pub struct ApiKey {
    /// Header name carrying the key.
    pub header: Option<Box<[u8]>>,
    /// Query parameter carrying the key.
    pub query: Option<Box<[u8]>>,
    pub consumer_header: Box<[u8]>,
    pub strip_credential: bool,
}

/// A compiled JWT policy.
#[derive(Debug)]
pub struct Jwt {
    pub algorithm: JwtAlgorithm,
    pub keys: Box<[JwtKey]>,
    pub issuer: Option<Box<str>>,
    pub audience: Option<Box<str>>,
    pub leeway_s: u64,
    pub require_exp: bool,
    pub consumer_claim: Box<str>,
    pub consumer_header: Box<[u8]>,
    pub strip_credential: bool,
    pub max_token_bytes: usize,
}

/// What a rate-limit bucket is kept per.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateKey {
    Route,
    ClientIp,
    Consumer,
    /// Lower-case header name.
    Header(Box<[u8]>),
}

/// A compiled rate-limit policy.
#[derive(Debug)]
pub struct RateLimit {
    pub rate: u64,
    pub period_s: u64,
    pub burst: u64,
    pub key: RateKey,
    pub max_keys: usize,
    pub x_ratelimit_headers: bool,
    /// The fields go on admitted requests' answers too.
    pub headers_on_success: bool,
    /// `RateLimit-Policy` field value: `"id";q=RATE;w=PERIOD`.
    pub policy_field: Box<[u8]>,
    pub scope: crate::config::RateScope,
    pub on_store_error: crate::config::StoreErrorMode,
}

impl RateLimit {
    /// What decides whether bucket state can be kept across a config change: the same id
    /// with the same parameters keeps its buckets.
    pub fn params(&self) -> RateParams {
        (
            self.rate,
            self.period_s,
            self.burst,
            self.key.clone(),
            self.max_keys,
            self.scope,
            self.on_store_error,
        )
    }
}

/// What identifies a rate limit's buckets across config changes (see [`RateLimit::params`]).
pub type RateParams = (
    u64,
    u64,
    u64,
    RateKey,
    usize,
    crate::config::RateScope,
    crate::config::StoreErrorMode,
);

/// A header name: an RFC 9110 token.
fn check_header_name(name: &str, at: &str) -> Result<Box<[u8]>, ConfigError> {
    if name.is_empty() || name.len() > 64 || !name.bytes().all(is_tchar) {
        return Err(ConfigError::field(
            at,
            format!("{name:?} is not a header field name"),
        ));
    }
    Ok(name.as_bytes().into())
}

/// Fields that frame or route the request, or that the gateway itself sets: a policy must not
/// remove or add them.
const RESERVED_FIELDS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

/// Fields the gateway writes into every forwarded request (its request id and trace, the
/// hop count): a key read from one would go on, and be logged as the request id; a consumer
/// id written into one would sit beside the gateway's own.
const GATEWAY_FIELDS: &[&str] = &[
    "x-request-id",
    "traceparent",
    "tracestate",
    "max-forwards",
    "via",
    "x-real-ip",
];

/// A header name a policy may strip or set (for `consumer_header`, `Authorization` too is
/// refused, so that a consumer id never replaces a credential).
fn check_policy_header(name: &str, at: &str, consumer: bool) -> Result<Box<[u8]>, ConfigError> {
    let v = check_header_name(name, at)?;
    let reserved = RESERVED_FIELDS.iter().any(|r| r.eq_ignore_ascii_case(name))
        || (consumer && name.eq_ignore_ascii_case("authorization"));
    if reserved {
        return Err(ConfigError::field(
            at,
            format!("{name:?} frames or routes the request and cannot be used here"),
        ));
    }
    if GATEWAY_FIELDS.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        let why = format!("{name:?} is written by the gateway itself and cannot be used here");
        // Accepted before: a stored config's policy keeps it.
        if !crate::validate::tolerated(at, &why) {
            return Err(ConfigError::field(at, why));
        }
    }
    Ok(v)
}

/// SHA-256 of an API key, as stored.
pub fn api_key_digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// Checks and compiles consumers, credentials and policies. Replaces each credential's
/// `key` by its `key_sha256` in `config`, so the key itself is never stored.
pub fn compile(config: &mut Config) -> Result<Policies, ConfigError> {
    if config.policies.len() > MAX_POLICIES {
        return Err(ConfigError::field(
            "policies",
            format!("at most {MAX_POLICIES} policies"),
        ));
    }
    let mut consumer_index: HashMap<&str, u32> = HashMap::new();
    for (i, c) in config.consumers.iter().enumerate() {
        check_id(&c.id, &format!("consumers[{i}].id"))?;
        if consumer_index.insert(&c.id, i as u32).is_some() {
            return Err(ConfigError::field(
                format!("consumers[{i}].id"),
                format!("duplicate consumer id {:?}", c.id),
            ));
        }
        for (j, g) in c.groups.iter().enumerate() {
            check_id(g, &format!("consumers[{i}].groups[{j}]"))?;
        }
    }

    let mut list = Vec::with_capacity(config.policies.len());
    let mut policy_index: HashMap<&str, u16> = HashMap::new();
    for (i, p) in config.policies.iter().enumerate() {
        let at = format!("policies[{i}]");
        check_id(p.id(), &format!("{at}.id"))?;
        if policy_index.insert(p.id(), i as u16).is_some() {
            return Err(ConfigError::field(
                format!("{at}.id"),
                format!("duplicate policy id {:?}", p.id()),
            ));
        }
        list.push(compile_policy(p, &at, &consumer_index)?);
    }

    let resolve = |ids: &[String], at: &str| -> Result<Vec<u16>, ConfigError> {
        let mut out: Vec<u16> = Vec::with_capacity(ids.len());
        for (j, id) in ids.iter().enumerate() {
            let &p = policy_index.get(id.as_str()).ok_or_else(|| {
                ConfigError::field(format!("{at}[{j}]"), format!("unknown policy {id:?}"))
            })?;
            if out.contains(&p) {
                return Err(ConfigError::field(
                    format!("{at}[{j}]"),
                    format!("policy {id:?} is listed twice"),
                ));
            }
            out.push(p);
        }
        Ok(out)
    };

    let mut consumers = Vec::with_capacity(config.consumers.len());
    for (i, c) in config.consumers.iter().enumerate() {
        let at = format!("consumers[{i}].policies");
        let policies = resolve(&c.policies, &at)?;
        for (j, &p) in policies.iter().enumerate() {
            if list[p as usize].stage != Stage::RateLimit {
                return Err(ConfigError::field(
                    format!("{at}[{j}]"),
                    "a consumer can only have rate_limit policies (the others run before the consumer is known)",
                ));
            }
            // One bucket for the policy, wherever it runs: consumers listing it would spend
            // one shared quota, where a limit on a consumer reads as its own (Kong counts a
            // consumer's limit per consumer). One consumer alone may have it so.
            let field = format!("{at}[{j}]");
            let one_bucket = matches!(&list[p as usize].kind,
                PolicyKind::RateLimit(r) if r.key == RateKey::Route);
            let id = &*list[p as usize].id;
            let listing = (config.consumers.iter())
                .filter(|o| o.policies.iter().any(|q| q == id))
                .count();
            let shared = one_bucket && listing > 1;
            if shared && !crate::validate::tolerated(&field, "one bucket for every consumer") {
                return Err(ConfigError::field(
                    field,
                    format!(
                        "policy {id:?} has key = \"route\" (the default): one bucket that the \
                         {listing} consumers listing it would share; give it key = \"consumer\" \
                         to count each consumer's requests apart"
                    ),
                ));
            }
        }
        consumers.push(Consumer {
            id: c.id.as_str().into(),
            groups: c.groups.iter().map(|g| g.as_str().into()).collect(),
            policies: policies.into(),
        });
    }

    let mut global = resolve(&config.global_policies, "global_policies")?;
    let is_cors = |p: u16| matches!(list[p as usize].kind, PolicyKind::Cors(_));
    if let Some(j) = global
        .iter()
        .enumerate()
        .filter(|&(_, &p)| is_cors(p))
        .nth(1)
        .map(|(j, _)| j)
    {
        return Err(ConfigError::field(
            format!("global_policies[{j}]"),
            "a second cors policy: each answer takes one (its fields would go out twice)",
        ));
    }
    global.sort_by_key(|&p| list[p as usize].stage);
    let unrouted = |p: &u16| {
        matches!(
            list[*p as usize].kind,
            PolicyKind::IpFilter { .. } | PolicyKind::Domain(_)
        )
    };
    let global_unrouted: Vec<u16> = global.iter().copied().filter(unrouted).collect();
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for (i, l) in config.listeners.iter().enumerate() {
        let at = format!("listeners[{i}].policies");
        let mut ids: Vec<u16> = Vec::with_capacity(l.policies.len());
        for (j, id) in l.policies.iter().enumerate() {
            let field = format!("{at}[{j}]");
            if l.policies[..j].contains(id) {
                let why = format!("policy {id:?} is listed twice");
                return Err(ConfigError::field(field, why));
            }
            let Some(&p) = policy_index.get(id.as_str()) else {
                // A node file checked alone leaves those it does not define to the store.
                if crate::validate::from_store(&field, id) {
                    continue;
                }
                return Err(ConfigError::field(field, format!("unknown policy {id:?}")));
            };
            if !unrouted(&p) {
                return Err(ConfigError::field(
                    field,
                    "a listener can only have ip_filter and domain policies (the others need a \
                     route)",
                ));
            }
            ids.push(p);
        }
        ids.sort_by_key(|&p| list[p as usize].stage);
        listeners.push(ids.into_boxed_slice());
    }

    let trusted_proxies = IpSet::parse(&config.trusted_proxies)
        .map_err(|(j, e)| ConfigError::field(format!("trusted_proxies[{j}]"), e.0))?;
    // Both read only what a trusted proxy wrote: without one they would do nothing, which a
    // config that sets them does not mean.
    if config.trusted_proxies.is_empty() {
        let idle = [
            (config.client_ip_header.is_some(), "client_ip_header"),
            (config.trust_forwarded_proto, "trust_forwarded_proto"),
        ];
        for (_, field) in idle.iter().filter(|(set, _)| *set) {
            let why = format!(
                "`{field}` reads what a trusted proxy writes, and `trusted_proxies` names none: \
                 it would have no effect (list the proxies in front of the gateway)"
            );
            if !crate::validate::tolerated(field, &why) {
                return Err(ConfigError::field(*field, why));
            }
        }
    }

    let mut api_keys = ApiKeys::default();
    let mut credential_ids: HashMap<&str, ()> = HashMap::new();
    // Each key's credential, to name the first in a clash.
    let mut key_holders: HashMap<[u8; 32], &str> = HashMap::new();
    for (i, c) in config.credentials.iter_mut().enumerate() {
        let at = format!("credentials[{i}]");
        check_id(&c.id, &format!("{at}.id"))?;
        if credential_ids.insert(&c.id, ()).is_some() {
            return Err(ConfigError::field(
                format!("{at}.id"),
                format!("duplicate credential id {:?}", c.id),
            ));
        }
        let &consumer = consumer_index.get(c.consumer.as_str()).ok_or_else(|| {
            ConfigError::field(
                format!("{at}.consumer"),
                format!("unknown consumer {:?}", c.consumer),
            )
        })?;
        let digest = match (&c.key, &c.key_sha256) {
            (Some(key), _) => {
                if !(8..=256).contains(&key.len())
                    || key.bytes().any(|b| !(0x21..0x7f).contains(&b))
                {
                    return Err(ConfigError::field(
                        format!("{at}.key"),
                        "an API key must be 8 to 256 visible ASCII characters",
                    ));
                }
                let digest = api_key_digest(key.as_bytes());
                // Both given: they must agree, or which key the credential holds is a guess.
                if c.key_sha256
                    .as_ref()
                    .is_some_and(|hex| *hex != to_hex(&digest))
                {
                    return Err(ConfigError::field(
                        format!("{at}.key_sha256"),
                        "is not the SHA-256 of `key`: give one or the other",
                    ));
                }
                digest
            }
            (None, Some(hex)) => hex32(hex).ok_or_else(|| {
                ConfigError::field(
                    format!("{at}.key_sha256"),
                    "must be 64 lower-case hex digits",
                )
            })?,
            (None, None) => {
                return Err(ConfigError::field(
                    format!("{at}.key"),
                    "an api_key credential needs `key` (or `key_sha256`)",
                ))
            }
        };
        if !api_keys.insert(digest, consumer) {
            // The field the credential was given by; the other credential by its id, as the
            // one written may be either (the pointer names the later one in the list).
            let field = if c.key.is_some() { "key" } else { "key_sha256" };
            let first = key_holders.get(&digest).copied().unwrap_or_default();
            return Err(ConfigError::field(
                format!("{at}.{field}"),
                format!(
                    "credential {:?} has the same key as credential {first:?}",
                    c.id
                ),
            ));
        }
        key_holders.insert(digest, &c.id);
        c.key = None;
        c.key_sha256 = Some(to_hex(&digest));
    }

    let client_ip_from_forwarded =
        config.client_ip_header == Some(crate::config::ClientIpHeader::Forwarded);
    let consumer_ids = consumer_index
        .iter()
        .map(|(&id, &i)| (Box::from(id), i))
        .collect();
    let by_id = policy_index
        .iter()
        .map(|(&id, &i)| (Box::from(id), i))
        .collect();
    // In the policies' order, each name once.
    let mut query_keys: Vec<Box<[u8]>> = Vec::new();
    for p in &list {
        if let PolicyKind::ApiKey(k) = &p.kind {
            if let Some(q) = k.query.as_ref().filter(|q| !query_keys.contains(q)) {
                query_keys.push(q.clone());
            }
        }
    }
    let mut trailer_refused: Vec<Box<[u8]>> =
        TRAILER_REFUSED.iter().map(|&n| Box::from(n)).collect();
    for p in &list {
        let key = match &p.kind {
            PolicyKind::ApiKey(k) => k.header.as_deref(),
            _ => None,
        };
        let names = [key, p.kind.consumer_header()];
        for name in names.into_iter().flatten() {
            let lower: Box<[u8]> = name.to_ascii_lowercase().into();
            if !trailer_refused.contains(&lower) {
                trailer_refused.push(lower);
            }
        }
    }
    Ok(Policies {
        query_keys: query_keys.into(),
        trailer_refused: trailer_refused.into(),
        list,
        consumers,
        api_keys,
        consumer_ids,
        by_id,
        trusted_proxies,
        client_ip_from_forwarded,
        trust_forwarded_proto: config.trust_forwarded_proto,
        global: global.into(),
        global_unrouted: global_unrouted.into(),
        listeners,
    })
}

/// A route's policies: the global ones, then its own, in stage order (stable, so that
/// authentication policies are tried in the order listed).
pub fn route_policies(
    policies: &Policies,
    ids: &[String],
    at: &str,
) -> Result<Box<[u16]>, ConfigError> {
    let mut out: Vec<u16> = policies.global.to_vec();
    for (j, id) in ids.iter().enumerate() {
        let &p = policies.by_id.get(id.as_str()).ok_or_else(|| {
            ConfigError::field(format!("{at}[{j}]"), format!("unknown policy {id:?}"))
        })?;
        if out.contains(&p) {
            let why = if policies.global.contains(&p) {
                "is already a global policy"
            } else {
                "is listed twice"
            };
            return Err(ConfigError::field(
                format!("{at}[{j}]"),
                format!("policy {id:?} {why}"),
            ));
        }
        let is_cors = |p: u16| matches!(policies.list[p as usize].kind, PolicyKind::Cors(_));
        if is_cors(p) {
            // The route's own replaces a global one (more specific wins); two of its own
            // would send every field twice.
            out.retain(|&o| !(is_cors(o) && policies.global.contains(&o)));
            if let Some(&other) = out.iter().find(|&&o| is_cors(o)) {
                return Err(ConfigError::field(
                    format!("{at}[{j}]"),
                    format!(
                        "policy {id:?} is a second cors policy here, after {:?}: a route \
                         takes one (its fields would go out twice)",
                        policies.list[other as usize].id
                    ),
                ));
            }
        }
        out.push(p);
    }
    out.sort_by_key(|&p| policies.list[p as usize].stage);
    let has = |stage| {
        out.iter()
            .any(|&p| policies.list[p as usize].stage == stage)
    };
    if has(Stage::Authorization) && !has(Stage::Authentication) {
        return Err(ConfigError::field(
            at,
            "an acl policy needs an authentication policy (api_key or jwt) on the same route or in global_policies",
        ));
    }
    Ok(out.into())
}

fn compile_policy(
    p: &PolicyConfig,
    at: &str,
    consumers: &HashMap<&str, u32>,
) -> Result<Policy, ConfigError> {
    let (stage, kind) = match p {
        PolicyConfig::IpFilter(f) => {
            if f.allow.is_empty() && f.deny.is_empty() {
                return Err(ConfigError::field(
                    at,
                    "an ip_filter needs `allow` or `deny` entries",
                ));
            }
            let allow = IpSet::parse(&f.allow)
                .map_err(|(j, e)| ConfigError::field(format!("{at}.allow[{j}]"), e.0))?;
            let deny = IpSet::parse(&f.deny)
                .map_err(|(j, e)| ConfigError::field(format!("{at}.deny[{j}]"), e.0))?;
            (Stage::IpFilter, PolicyKind::IpFilter { allow, deny })
        }
        PolicyConfig::Domain(d) => {
            if d.hosts.is_empty() {
                return Err(ConfigError::field(
                    format!("{at}.hosts"),
                    "at least one host is required",
                ));
            }
            if d.status != 421 && d.status != 403 {
                return Err(ConfigError::field(
                    format!("{at}.status"),
                    "must be 421 or 403",
                ));
            }
            let mut exact = Vec::new();
            let mut suffixes = Vec::new();
            for (j, h) in d.hosts.iter().enumerate() {
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
                    suffixes.push(format!(".{name}").into_bytes().into_boxed_slice());
                } else {
                    exact.push(name.as_bytes().into());
                }
            }
            (
                Stage::Domain,
                PolicyKind::Domain(Domain {
                    exact: exact.into(),
                    suffixes: suffixes.into(),
                    status: d.status,
                }),
            )
        }
        PolicyConfig::Cors(c) => (Stage::Cors, PolicyKind::Cors(compile_cors(c, at)?)),
        PolicyConfig::ApiKey(k) => (
            Stage::Authentication,
            PolicyKind::ApiKey(compile_api_key(k, at)?),
        ),
        PolicyConfig::Jwt(j) => (Stage::Authentication, PolicyKind::Jwt(compile_jwt(j, at)?)),
        PolicyConfig::Acl(a) => {
            if a.consumers.is_empty() && a.groups.is_empty() {
                return Err(ConfigError::field(
                    at,
                    "an acl needs at least one of `consumers` and `groups`",
                ));
            }
            let mut ids = Vec::with_capacity(a.consumers.len());
            for (j, c) in a.consumers.iter().enumerate() {
                let &i = consumers.get(c.as_str()).ok_or_else(|| {
                    ConfigError::field(
                        format!("{at}.consumers[{j}]"),
                        format!("unknown consumer {c:?}"),
                    )
                })?;
                ids.push(i);
            }
            for (j, g) in a.groups.iter().enumerate() {
                check_id(g, &format!("{at}.groups[{j}]"))?;
            }
            (
                Stage::Authorization,
                PolicyKind::Acl {
                    consumers: ids.into(),
                    groups: a.groups.iter().map(|g| g.as_str().into()).collect(),
                },
            )
        }
        PolicyConfig::RateLimit(r) => (
            Stage::RateLimit,
            PolicyKind::RateLimit(compile_rate_limit(r, at)?),
        ),
    };
    Ok(Policy {
        id: p.id().into(),
        stage,
        kind,
    })
}

fn token_list(items: &[String], at: &str, lower: bool) -> Result<Vec<Box<[u8]>>, ConfigError> {
    items
        .iter()
        .enumerate()
        .map(|(j, m)| {
            let v = check_header_name(m, &format!("{at}[{j}]"))?;
            Ok(if lower {
                v.to_ascii_lowercase().into()
            } else {
                v
            })
        })
        .collect()
}

/// Why an `origins` entry is not one a browser sends.
struct NotAnOrigin {
    text: String,
    /// The old, looser check took it.
    accepted_before: bool,
}

/// `o` as a browser serialises an origin (RFC 6454 6.2: `scheme://host[:port]`, lower case,
/// no default port), which is what `Origin` carries and what is compared with it.
fn browser_origin(o: &str) -> Result<String, NotAnOrigin> {
    let loose = (o.starts_with("http://") || o.starts_with("https://"))
        && !o.ends_with('/')
        && o.split_once("://").is_some_and(|(_, h)| {
            !h.is_empty() && !h.contains('/') && h.bytes().all(|b| (0x21..0x7f).contains(&b))
        });
    let refuse = |why: &str| NotAnOrigin {
        text: format!("{o:?} is not an origin a browser sends ({why})"),
        accepted_before: loose,
    };
    let lower = o.to_ascii_lowercase();
    let Some((scheme, rest)) = lower.split_once("://") else {
        return Err(refuse("scheme://host[:port], or \"*\""));
    };
    let default_port: u16 = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return Err(refuse("the scheme is http or https")),
    };
    if rest.contains(['/', '?', '#', '@']) {
        return Err(refuse("no path, query, fragment or user"));
    }
    if rest.contains('*') {
        return Err(refuse(
            "no wildcard: browsers send one exact origin, so list each one, or use \"*\"",
        ));
    }
    // The port is what follows the last `:` outside an IPv6 literal's brackets.
    let (host, port) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains(']') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    // A fully qualified name's final dot is kept: a page at `https://example.com./` sends
    // that origin.
    if !crate::validate::valid_host_name(host) {
        return Err(refuse("the host is a name or an IP address"));
    }
    let host = browser_host(host).map_err(&refuse)?;
    let Some(port) = port else {
        return Ok(format!("{scheme}://{host}"));
    };
    match port.parse::<u16>() {
        Ok(n) if n > 0 && port.bytes().all(|b| b.is_ascii_digit()) => {
            // Browsers leave the scheme's default port out, and write a port as a number.
            if n == default_port {
                Ok(format!("{scheme}://{host}"))
            } else {
                Ok(format!("{scheme}://{host}:{n}"))
            }
        }
        _ => Err(refuse("the port is a number from 1 to 65535")),
    }
}

/// `host` (lower case) as a browser writes it in an origin (the WHATWG URL standard's host
/// serialisation): an IPv6 address compressed, in hex throughout (an IPv4-mapped one too:
/// `[::ffff:7f00:1]`), an IPv4 address in dotted decimal. Before, `[0:0::1]` or
/// `[::ffff:127.0.0.1]` was stored as written and matched no browser's `Origin`. A host
/// that browsers read as an IPv4 address written another way (`127.0.0.01`, `2130706433`:
/// its last label is a number) is refused.
fn browser_host(host: &str) -> Result<std::borrow::Cow<'_, str>, &'static str> {
    if let Some(ip) = (host.strip_prefix('['))
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse::<std::net::Ipv6Addr>().ok())
    {
        return Ok(format!("[{}]", ipv6_as_browsers_write_it(ip)).into());
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let last = name.rsplit('.').next().unwrap_or(name);
    let numeric = !last.is_empty()
        && (last.bytes().all(|b| b.is_ascii_digit())
            || last
                .strip_prefix("0x")
                .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit())));
    if !numeric {
        return Ok(host.into());
    }
    match name.parse::<std::net::Ipv4Addr>() {
        Ok(ip) if ip.to_string() == name => Ok(name.to_owned().into()),
        _ => Err("an IPv4 address as browsers write it, in dotted decimal (127.0.0.1)"),
    }
}

/// An IPv6 address as the WHATWG URL standard serialises it: lower-case hex pieces, the
/// first longest run of two or more zero pieces as `::`, never a dotted IPv4 tail (which
/// Rust's own formatting writes for IPv4-mapped addresses).
fn ipv6_as_browsers_write_it(ip: std::net::Ipv6Addr) -> String {
    let pieces = ip.segments();
    let (mut best, mut run) = ((0, 0), (0, 0));
    for (i, &p) in pieces.iter().enumerate() {
        if p == 0 {
            run = if run.1 == 0 {
                (i, 1)
            } else {
                (run.0, run.1 + 1)
            };
            if run.1 > best.1 {
                best = run;
            }
        } else {
            run = (0, 0);
        }
    }
    let hex = |ps: &[u16]| {
        ps.iter()
            .map(|p| format!("{p:x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    if best.1 < 2 {
        return hex(&pieces);
    }
    let (start, end) = (best.0, best.0 + best.1);
    format!("{}::{}", hex(&pieces[..start]), hex(&pieces[end..]))
}

fn compile_cors(c: &CorsConfig, at: &str) -> Result<Cors, ConfigError> {
    if c.origins.is_empty() {
        return Err(ConfigError::field(
            format!("{at}.origins"),
            "at least one origin (or \"*\") is required",
        ));
    }
    let any_origin = c.origins.iter().any(|o| o == "*");
    let mut origins = Vec::new();
    for (j, o) in c.origins.iter().enumerate() {
        if o == "*" {
            continue;
        }
        let field = format!("{at}.origins[{j}]");
        let origin = match browser_origin(o) {
            Ok(origin) => origin,
            // Accepted before (it never matched): a stored config keeps it as it was.
            Err(why) if why.accepted_before && crate::validate::tolerated(&field, &why.text) => {
                o.to_ascii_lowercase()
            }
            Err(why) => return Err(ConfigError::field(field, why.text)),
        };
        origins.push(origin.into_bytes().into_boxed_slice());
    }
    if any_origin && c.allow_credentials {
        return Err(ConfigError::field(
            format!("{at}.allow_credentials"),
            "cannot be true when origins contains \"*\" (browsers refuse it)",
        ));
    }
    if c.max_age_s > 86_400 {
        return Err(ConfigError::field(
            format!("{at}.max_age_s"),
            "must be at most 86400",
        ));
    }
    // Methods as browsers send them: fetch() upper-cases these six whatever the page wrote
    // (and no other: `patch` goes out as `patch`).
    let methods_src: Vec<String> = if c.methods.is_empty() {
        vec!["GET".to_owned(), "HEAD".to_owned(), "POST".to_owned()]
    } else {
        (c.methods.iter())
            .map(|m| match m.to_ascii_uppercase().as_str() {
                u @ ("DELETE" | "GET" | "HEAD" | "OPTIONS" | "POST" | "PUT") => u.to_owned(),
                _ => m.clone(),
            })
            .collect()
    };
    let methods = token_list(&methods_src, &format!("{at}.methods"), false)?;
    let headers = token_list(&c.headers, &format!("{at}.headers"), true)?;
    token_list(&c.expose_headers, &format!("{at}.expose_headers"), false)?;
    // `*`: any method or any header, which browsers read so only for requests without
    // credentials (with them it is a name like any other).
    let any_method = c.methods.iter().any(|m| m == "*");
    let any_header = c.headers.iter().any(|h| h == "*");
    let any_exposed = c.expose_headers.iter().any(|h| h == "*");
    for (name, any) in [
        ("methods", any_method),
        ("headers", any_header),
        ("expose_headers", any_exposed),
    ] {
        let field = format!("{at}.{name}");
        let why = "\"*\" cannot be used with allow_credentials = true (browsers then read it as \
                   a name, not as any): list them";
        // `expose_headers` was taken before: a stored config keeps it (exposing nothing).
        if any
            && c.allow_credentials
            && (name != "expose_headers" || !crate::validate::tolerated(&field, why))
        {
            return Err(ConfigError::field(field, why));
        }
    }
    Ok(Cors {
        any_origin,
        any_method,
        any_header,
        origins: origins.into(),
        allow_methods: methods_src.join(", ").into_bytes().into(),
        allow_headers: c.headers.join(", ").into_bytes().into(),
        expose_headers: c.expose_headers.join(", ").into_bytes().into(),
        methods: methods.into(),
        headers: headers.into(),
        max_age_s: c.max_age_s,
        allow_credentials: c.allow_credentials,
        require_origin: c.require_origin,
    })
}

fn compile_api_key(k: &ApiKeyConfig, at: &str) -> Result<ApiKey, ConfigError> {
    let header = match (&k.header, &k.query) {
        (Some(h), _) => Some(check_policy_header(h, &format!("{at}.header"), false)?),
        (None, None) => Some(b"X-Api-Key"[..].into()),
        (None, Some(_)) => None,
    };
    let query = match &k.query {
        Some(q) => {
            if q.is_empty()
                || q.len() > 64
                || !q
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
            {
                return Err(ConfigError::field(
                    format!("{at}.query"),
                    format!("{q:?} must be 1 to 64 letters, digits, '-', '_', '.' or '~'"),
                ));
            }
            Some(q.as_bytes().into())
        }
        None => None,
    };
    Ok(ApiKey {
        header,
        query,
        consumer_header: check_policy_header(
            &k.consumer_header,
            &format!("{at}.consumer_header"),
            true,
        )?,
        strip_credential: k.strip_credential,
    })
}

fn compile_jwt(j: &JwtConfig, at: &str) -> Result<Jwt, ConfigError> {
    let sources = [j.secret.is_some(), j.public_key.is_some(), j.jwks.is_some()]
        .iter()
        .filter(|&&x| x)
        .count();
    if sources != 1 {
        return Err(ConfigError::field(
            at,
            "exactly one of `secret`, `public_key` and `jwks` is required",
        ));
    }
    let keys = if let Some(jwks) = &j.jwks {
        keys::from_jwks(jwks, j.algorithm)
            .map_err(|e| ConfigError::field(format!("{at}.jwks"), e))?
    } else if let Some(secret) = &j.secret {
        if j.algorithm != JwtAlgorithm::HS256 {
            return Err(ConfigError::field(
                format!("{at}.secret"),
                format!(
                    "{:?} verifies with a public key (`public_key` or `jwks`)",
                    j.algorithm
                ),
            ));
        }
        keys::check_secret(secret.as_bytes())
            .map_err(|e| ConfigError::field(format!("{at}.secret"), e))?;
        vec![JwtKey {
            kid: None,
            material: KeyMaterial::Hmac(secret.as_bytes().into()),
        }]
    } else {
        let pem = j.public_key.as_deref().unwrap_or_default();
        if j.algorithm == JwtAlgorithm::HS256 {
            return Err(ConfigError::field(
                format!("{at}.public_key"),
                "HS256 verifies with `secret` (or an `oct` key in `jwks`)",
            ));
        }
        vec![JwtKey {
            kid: None,
            material: keys::from_pem(pem, j.algorithm)
                .map_err(|e| ConfigError::field(format!("{at}.public_key"), e))?,
        }]
    };
    if j.leeway_s > 3600 {
        return Err(ConfigError::field(
            format!("{at}.leeway_s"),
            "must be at most 3600",
        ));
    }
    if !(256..=65_536).contains(&j.max_token_bytes) {
        return Err(ConfigError::field(
            format!("{at}.max_token_bytes"),
            "must be between 256 and 65536",
        ));
    }
    if j.consumer_claim.is_empty() || j.consumer_claim.len() > 64 {
        return Err(ConfigError::field(
            format!("{at}.consumer_claim"),
            "must be 1 to 64 characters",
        ));
    }
    Ok(Jwt {
        algorithm: j.algorithm,
        keys: keys.into(),
        issuer: j.issuer.as_deref().map(Into::into),
        audience: j.audience.as_deref().map(Into::into),
        leeway_s: j.leeway_s,
        require_exp: j.require_exp,
        consumer_claim: j.consumer_claim.as_str().into(),
        consumer_header: check_policy_header(
            &j.consumer_header,
            &format!("{at}.consumer_header"),
            true,
        )?,
        strip_credential: j.strip_credential,
        max_token_bytes: j.max_token_bytes,
    })
}

fn compile_rate_limit(r: &RateLimitConfig, at: &str) -> Result<RateLimit, ConfigError> {
    const MAX: u64 = 1_000_000_000;
    if !(1..=MAX).contains(&r.rate) {
        return Err(ConfigError::field(
            format!("{at}.rate"),
            "must be between 1 and 1000000000",
        ));
    }
    let burst = r.burst.unwrap_or(r.rate);
    if !(1..=MAX).contains(&burst) {
        return Err(ConfigError::field(
            format!("{at}.burst"),
            "must be between 1 and 1000000000",
        ));
    }
    let key = match r.key.as_str() {
        "route" => RateKey::Route,
        "client_ip" => RateKey::ClientIp,
        "consumer" => RateKey::Consumer,
        k => match k.strip_prefix("header:") {
            Some(name) => RateKey::Header(
                check_header_name(name, &format!("{at}.key"))?
                    .to_ascii_lowercase()
                    .into(),
            ),
            None => {
                return Err(ConfigError::field(
                    format!("{at}.key"),
                    format!("{k:?} is not one of route, client_ip, consumer, header:NAME"),
                ))
            }
        },
    };
    if !(1..=10_000_000).contains(&r.max_keys) {
        return Err(ConfigError::field(
            format!("{at}.max_keys"),
            "must be between 1 and 10000000",
        ));
    }
    let period_s = r.per.seconds();
    // The bucket holds burst * (period / rate) nanoseconds of credit in a u64.
    if (period_s * 1_000_000_000 / r.rate)
        .checked_mul(burst)
        .is_none()
    {
        return Err(ConfigError::field(
            format!("{at}.burst"),
            "is too large for this rate (burst / rate must cover less than 584 years)",
        ));
    }
    Ok(RateLimit {
        rate: r.rate,
        period_s,
        burst,
        key,
        max_keys: r.max_keys,
        x_ratelimit_headers: r.x_ratelimit_headers,
        headers_on_success: r.headers_on_success,
        policy_field: format!("\"{}\";q={};w={}", r.id, r.rate, period_s)
            .into_bytes()
            .into(),
        scope: r.scope,
        on_store_error: match (r.scope, r.on_store_error) {
            (crate::config::RateScope::Node, Some(_)) => {
                return Err(ConfigError::field(
                    format!("{at}.on_store_error"),
                    "applies to `scope = \"cluster\"` only",
                ))
            }
            (_, mode) => mode.unwrap_or_default(),
        },
    })
}
