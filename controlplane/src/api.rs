//! The admin REST API (axum): resources `routes` and `upstreams`, the whole config, revisions,
//! status and health, with revisions and strong ETags, conditional writes, dry runs and
//! `application/problem+json` errors (RFC 9457).
//!
//! Every write goes through [`Admin::apply`]: build the candidate config, validate and compile
//! it with the same code the config file goes through, persist it, then publish the snapshot
//! with one `ArcSwap::store` before answering. A refused change changes nothing.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use arc_swap::ArcSwap;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, RawQuery, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use common::config::{
    AggregateConfig, CertificateConfig, ClientProfileConfig, ConsumerConfig, CredentialConfig,
    PolicyConfig, RouteConfig, TranscoderConfig, UpstreamConfig,
};
use common::{Config, ConfigError, Snapshot};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::store::{EtcdStore, Store, StoreError};
use common::policy::constant_time_eq;

/// Largest request body the admin API reads.
pub const MAX_BODY: usize = 1024 * 1024;
/// The largest body of a write of the whole config (`PUT /v1/config`, a batch), and the
/// largest a config may grow to: what `GET /v1/config` returns can always be PUT back.
pub const MAX_CONFIG_BODY: usize = 32 * 1024 * 1024;

/// What the data plane runs on, for `/v1/status`.
#[derive(Debug, Clone)]
pub struct RuntimeInfo {
    pub workers: usize,
    /// Each worker's counters, summed by `/metrics`.
    pub metrics: Vec<Arc<dataplane::metrics::WorkerMetrics>>,
    pub driver: String,
    pub listeners: Vec<SocketAddr>,
    pub admin: SocketAddr,
}

/// Shared state of the control plane.
#[derive(Debug)]
pub struct Admin {
    store: Mutex<Store>,
    /// The store as its lock was last let go: what reads of the config and status answer
    /// from, so they never wait behind a write that waits for etcd.
    view: ArcSwap<View>,
    shared: Arc<ArcSwap<Snapshot>>,
    token: String,
    started: Instant,
    runtime: Mutex<Option<RuntimeInfo>>,
    upstreams: crate::upstreams::Upstreams,
    /// Set when a binary upgrade handed over to a successor (its pid): writes are refused.
    retired: std::sync::atomic::AtomicU32,
    /// Set while a binary upgrade starts its successor: writes are refused (and reads go on;
    /// holding the store's lock instead stalled the whole admin API for as long).
    frozen: std::sync::atomic::AtomicBool,
    /// The files this process reads whatever its config (its `--config` file...), which an
    /// access log must not write into.
    process_files: Vec<(std::path::PathBuf, String)>,
}

/// The store's current config as readers see it (see [`Admin::view`]).
#[derive(Debug)]
struct View {
    revision: u64,
    /// etcd's `mod_revision` of the record the config comes from (0 on a data directory).
    mod_revision: i64,
    config: Config,
    item_revisions: std::collections::BTreeMap<String, u64>,
    /// The store's part of `/v1/status`, less what its health says at the time asked.
    status: Value,
    health: Option<Arc<crate::store::etcd::Health>>,
}

impl View {
    fn of(store: &Store) -> View {
        View {
            revision: store.revision(),
            mod_revision: View::mod_revision_of(store),
            config: store.config().clone(),
            item_revisions: store.item_revisions().clone(),
            status: View::status_of(store),
            health: match store {
                Store::Etcd(e) => Some(e.health.clone()),
                Store::Local(_) => None,
            },
        }
    }

    fn status_of(store: &Store) -> Value {
        match store {
            Store::Local(s) => json!({"kind": "local", "dir": s.dir().display().to_string()}),
            Store::Etcd(e) => json!({
                "kind": "etcd",
                "url": e.url().redacted(),
                "node_id": e.node_id(),
                "revision": e.revision(),
                "applied_revision": e.applied,
                "rejected": e.rejected.as_ref().map(|(r, why)| json!({"revision": r, "error": why})),
            }),
        }
    }

    fn mod_revision_of(store: &Store) -> i64 {
        match store {
            Store::Etcd(e) => e.mod_revision(),
            Store::Local(_) => 0,
        }
    }

    /// Whether `store` still reads as this view. The config and item revisions change only
    /// with the record they come from: a commit (a new revision on a data directory, a new
    /// `mod_revision` in etcd) or a record taken from etcd (a new `mod_revision`), so those
    /// two numbers stand for them, and no lock release compares whole configs.
    fn shows(&self, store: &Store) -> bool {
        self.revision == store.revision()
            && self.mod_revision == View::mod_revision_of(store)
            && self.status == View::status_of(store)
    }

    /// Revision at which the item `kind/id` last changed.
    fn item_revision(&self, kind: Kind, id: &str) -> u64 {
        let key = format!("{}/{id}", kind.name());
        self.item_revisions
            .get(&key)
            .copied()
            .unwrap_or(self.revision)
    }
}

/// The store under its lock; letting it go shows what changed to readers.
struct Held<'a> {
    store: MutexGuard<'a, Store>,
    view: &'a ArcSwap<View>,
}

impl std::ops::Deref for Held<'_> {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Store {
        &mut self.store
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Still under the lock (the guard is dropped after this), so views are stored in
        // the order the store changed.
        if !self.view.load().shows(&self.store) {
            self.view.store(Arc::new(View::of(&self.store)));
        }
    }
}

/// A binary upgrade under way: writes are refused until it is dropped (the upgrade failed)
/// or passed to [`Admin::retire`].
#[derive(Debug)]
pub struct Frozen<'a>(&'a Admin);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.0
            .frozen
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// An error answer: `application/problem+json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub status: StatusCode,
    pub title: &'static str,
    pub detail: String,
    /// JSON pointer (RFC 6901) of the offending field in the request body, if any.
    pub pointer: Option<String>,
    /// A field the answer carries beside the problem: for a body refused for its media type,
    /// the ones taken (`Accept-Patch`, RFC 5789 2.2) or the content codings taken
    /// (`Accept-Encoding`, RFC 9110 15.5.16).
    field: Option<(&'static str, &'static str)>,
    /// The connection closes after this answer, which says when to retry: the process
    /// answering is going (a binary upgrade), and a client retrying on the same keep-alive
    /// connection would keep reaching it.
    go_elsewhere: bool,
}

impl Problem {
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status,
            title,
            // A detail quoting a value (a key sent in the wrong field) never carries a key.
            detail: common::without_private_keys(detail.into()),
            pointer: None,
            field: None,
            go_elsewhere: false,
        }
    }

    /// [`Problem::go_elsewhere`]: `Retry-After: 1` and `Connection: close`.
    fn retry_on_a_new_connection(mut self) -> Self {
        self.go_elsewhere = true;
        self
    }

    fn at(mut self, pointer: impl Into<String>) -> Self {
        self.pointer = Some(pointer.into());
        self
    }

    pub(crate) fn not_found(what: String) -> Self {
        Problem::new(StatusCode::NOT_FOUND, "Not Found", what)
    }
}

/// axum's path extractor, refusing (an id that is not UTF-8) with problem+json like every
/// other error of the API, not plain text.
struct Path<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(t)) => Ok(Path(t)),
            Err(e) => Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "Bad Path",
                e.body_text(),
            )),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Some(p) = self.pointer {
            // A map key in it may be anything a client sent, a key included.
            body["pointer"] = Value::String(common::without_private_keys(p));
        }
        let mut resp = (self.status, body.to_string()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some((name, value)) = self.field {
            resp.headers_mut().insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"gateway-admin\""),
            );
        }
        if self.go_elsewhere {
            let h = resp.headers_mut();
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// A resource kind under `/v1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Routes,
    Upstreams,
    Consumers,
    Credentials,
    Policies,
    Aggregates,
    ClientProfiles,
    Certificates,
    Transcoders,
}

/// Every resource kind's collection path.
pub const KIND_PATHS: [&str; 9] = [
    "/v1/routes",
    "/v1/upstreams",
    "/v1/consumers",
    "/v1/credentials",
    "/v1/policies",
    "/v1/aggregates",
    "/v1/client_profiles",
    "/v1/certificates",
    "/v1/transcoders",
];

impl Kind {
    fn parse(s: &str) -> Result<Kind, Problem> {
        match s {
            "routes" => Ok(Kind::Routes),
            "upstreams" => Ok(Kind::Upstreams),
            "consumers" => Ok(Kind::Consumers),
            "credentials" => Ok(Kind::Credentials),
            "policies" => Ok(Kind::Policies),
            "aggregates" => Ok(Kind::Aggregates),
            "client_profiles" => Ok(Kind::ClientProfiles),
            "certificates" => Ok(Kind::Certificates),
            "transcoders" => Ok(Kind::Transcoders),
            other => Err(Problem::not_found(format!("no resource kind {other:?}"))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Routes => "routes",
            Kind::Upstreams => "upstreams",
            Kind::Consumers => "consumers",
            Kind::Credentials => "credentials",
            Kind::Policies => "policies",
            Kind::Aggregates => "aggregates",
            Kind::ClientProfiles => "client_profiles",
            Kind::Certificates => "certificates",
            Kind::Transcoders => "transcoders",
        }
    }

    fn ids(self, c: &Config) -> Vec<String> {
        match self {
            Kind::Routes => c.routes.iter().map(|r| r.id.clone()).collect(),
            Kind::Upstreams => c.upstreams.iter().map(|u| u.id.clone()).collect(),
            Kind::Consumers => c.consumers.iter().map(|u| u.id.clone()).collect(),
            Kind::Credentials => c.credentials.iter().map(|u| u.id.clone()).collect(),
            Kind::Policies => c.policies.iter().map(|u| u.id().to_owned()).collect(),
            Kind::Aggregates => c.aggregates.iter().map(|u| u.id.clone()).collect(),
            Kind::ClientProfiles => c.client_profiles.iter().map(|u| u.id.clone()).collect(),
            Kind::Certificates => c.certificates.iter().map(|u| u.id.clone()).collect(),
            Kind::Transcoders => c.transcoders.iter().map(|u| u.id.clone()).collect(),
        }
    }

    fn get(self, c: &Config, id: &str) -> Option<Value> {
        self.position(c, id).map(|i| self.get_at(c, i))
    }

    /// The item at `i` of this kind's list.
    fn get_at(self, c: &Config, i: usize) -> Value {
        match self {
            Kind::Routes => to_value(&c.routes[i]),
            Kind::Upstreams => to_value(&c.upstreams[i]),
            Kind::Consumers => to_value(&c.consumers[i]),
            Kind::Credentials => to_value(&c.credentials[i]),
            Kind::Policies => to_value(&c.policies[i]),
            Kind::Aggregates => to_value(&c.aggregates[i]),
            Kind::ClientProfiles => to_value(&c.client_profiles[i]),
            Kind::Certificates => to_value(&c.certificates[i]),
            Kind::Transcoders => to_value(&c.transcoders[i]),
        }
    }

    /// Removes the items at the positions `dead` of this kind's list, keeping the others'
    /// order.
    fn remove_at(self, c: &mut Config, dead: &HashSet<usize>) {
        fn keep<T>(list: &mut Vec<T>, dead: &HashSet<usize>) {
            let mut i = 0;
            list.retain(|_| {
                i += 1;
                !dead.contains(&(i - 1))
            });
        }
        match self {
            Kind::Routes => keep(&mut c.routes, dead),
            Kind::Upstreams => keep(&mut c.upstreams, dead),
            Kind::Consumers => keep(&mut c.consumers, dead),
            Kind::Credentials => keep(&mut c.credentials, dead),
            Kind::Policies => keep(&mut c.policies, dead),
            Kind::Aggregates => keep(&mut c.aggregates, dead),
            Kind::ClientProfiles => keep(&mut c.client_profiles, dead),
            Kind::Certificates => keep(&mut c.certificates, dead),
            Kind::Transcoders => keep(&mut c.transcoders, dead),
        }
    }

    fn list(self, c: &Config) -> Vec<Value> {
        match self {
            Kind::Routes => c.routes.iter().map(to_value).collect(),
            Kind::Upstreams => c.upstreams.iter().map(to_value).collect(),
            Kind::Consumers => c.consumers.iter().map(to_value).collect(),
            Kind::Credentials => c.credentials.iter().map(to_value).collect(),
            Kind::Policies => c.policies.iter().map(to_value).collect(),
            Kind::Aggregates => c.aggregates.iter().map(to_value).collect(),
            Kind::ClientProfiles => c.client_profiles.iter().map(to_value).collect(),
            Kind::Certificates => c.certificates.iter().map(to_value).collect(),
            Kind::Transcoders => c.transcoders.iter().map(to_value).collect(),
        }
    }

    /// Inserts or replaces the item; returns whether it was created.
    fn put(self, c: &mut Config, id: &str, value: Value) -> Result<bool, Problem> {
        let at = self.position(c, id);
        self.put_at(c, at, id, value)
    }

    /// Where the item `id` is in this kind's list.
    fn position(self, c: &Config, id: &str) -> Option<usize> {
        match self {
            Kind::Routes => c.routes.iter().position(|r| r.id == id),
            Kind::Upstreams => c.upstreams.iter().position(|u| u.id == id),
            Kind::Consumers => c.consumers.iter().position(|u| u.id == id),
            Kind::Credentials => c.credentials.iter().position(|u| u.id == id),
            Kind::Policies => c.policies.iter().position(|u| u.id() == id),
            Kind::Aggregates => c.aggregates.iter().position(|u| u.id == id),
            Kind::ClientProfiles => c.client_profiles.iter().position(|u| u.id == id),
            Kind::Certificates => c.certificates.iter().position(|u| u.id == id),
            Kind::Transcoders => c.transcoders.iter().position(|u| u.id == id),
        }
    }

    /// [`Kind::put`] where the item `id` is known to be at `at` (`None`: not there).
    fn put_at(
        self,
        c: &mut Config,
        at: Option<usize>,
        id: &str,
        mut value: Value,
    ) -> Result<bool, Problem> {
        let Value::Object(map) = &mut value else {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid Value",
                format!("a {} item must be a JSON object", self.name()),
            )
            .at(""));
        };
        match map.get("id") {
            None => {
                map.insert("id".into(), Value::String(id.to_owned()));
            }
            Some(Value::String(s)) if s == id => {}
            Some(_) => {
                return Err(Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid Value",
                    format!("the body's id must be {id:?}, the id in the path"),
                )
                .at("/id"))
            }
        }
        fn upsert<T>(list: &mut Vec<T>, at: Option<usize>, item: T) -> bool {
            match at {
                Some(i) => {
                    list[i] = item;
                    false
                }
                None => {
                    list.push(item);
                    true
                }
            }
        }
        Ok(match self {
            Kind::Routes => {
                let item: RouteConfig = typed(value)?;
                upsert(&mut c.routes, at, item)
            }
            Kind::Upstreams => {
                let item: UpstreamConfig = typed(value)?;
                upsert(&mut c.upstreams, at, item)
            }
            Kind::Consumers => {
                let item: ConsumerConfig = typed(value)?;
                upsert(&mut c.consumers, at, item)
            }
            Kind::Credentials => {
                let item: CredentialConfig = typed(value)?;
                upsert(&mut c.credentials, at, item)
            }
            Kind::Policies => {
                let item = typed_policy(value)?;
                upsert(&mut c.policies, at, item)
            }
            Kind::Aggregates => {
                let item: AggregateConfig = typed(value)?;
                upsert(&mut c.aggregates, at, item)
            }
            Kind::ClientProfiles => {
                let item: ClientProfileConfig = typed(value)?;
                upsert(&mut c.client_profiles, at, item)
            }
            Kind::Certificates => {
                let item: CertificateConfig = typed(value)?;
                upsert(&mut c.certificates, at, item)
            }
            Kind::Transcoders => {
                let item: TranscoderConfig = typed(value)?;
                upsert(&mut c.transcoders, at, item)
            }
        })
    }

    fn remove(self, c: &mut Config, id: &str) -> bool {
        fn remove_where<T>(list: &mut Vec<T>, gone: impl Fn(&T) -> bool) -> bool {
            let before = list.len();
            list.retain(|x| !gone(x));
            before != list.len()
        }
        match self {
            Kind::Routes => remove_where(&mut c.routes, |r| r.id == id),
            Kind::Upstreams => remove_where(&mut c.upstreams, |u| u.id == id),
            Kind::Consumers => remove_where(&mut c.consumers, |u| u.id == id),
            Kind::Credentials => remove_where(&mut c.credentials, |u| u.id == id),
            Kind::Policies => remove_where(&mut c.policies, |u| u.id() == id),
            Kind::Aggregates => remove_where(&mut c.aggregates, |u| u.id == id),
            Kind::ClientProfiles => remove_where(&mut c.client_profiles, |u| u.id == id),
            Kind::Certificates => remove_where(&mut c.certificates, |u| u.id == id),
            Kind::Transcoders => remove_where(&mut c.transcoders, |u| u.id == id),
        }
    }

    /// Resources that refer to the item and would dangle without it.
    fn referrers(self, c: &Config, id: &str) -> Vec<String> {
        match self {
            Kind::Routes => Vec::new(),
            Kind::Upstreams => {
                let routes = c
                    .routes
                    .iter()
                    .filter(|r| {
                        r.upstream.as_deref() == Some(id)
                            || r.variants.iter().any(|v| v.upstream.as_deref() == Some(id))
                    })
                    .map(|r| format!("routes/{}", r.id));
                let aggregates = c
                    .aggregates
                    .iter()
                    .filter(|a| a.steps.iter().any(|s| s.upstream == id))
                    .map(|a| format!("aggregates/{}", a.id));
                routes.chain(aggregates).collect()
            }
            Kind::Aggregates => c
                .routes
                .iter()
                .filter(|r| {
                    r.aggregate.as_deref() == Some(id)
                        || r.variants
                            .iter()
                            .any(|v| v.aggregate.as_deref() == Some(id))
                })
                .map(|r| format!("routes/{}", r.id))
                .collect(),
            Kind::ClientProfiles => c
                .routes
                .iter()
                .filter(|r| r.variants.iter().any(|v| v.profile == id))
                .map(|r| format!("routes/{}", r.id))
                .collect(),
            Kind::Transcoders => c
                .routes
                .iter()
                .filter(|r| r.transcoder.as_deref() == Some(id))
                .map(|r| format!("routes/{}", r.id))
                .collect(),
            Kind::Certificates => {
                let listeners = c
                    .listeners
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| {
                        l.tls
                            .as_ref()
                            .is_some_and(|t| t.certificates.iter().any(|x| x == id))
                    })
                    .map(|(i, _)| format!("listeners/{i}"));
                // A client certificate for mutual TLS towards an upstream's targets.
                let upstreams = c
                    .upstreams
                    .iter()
                    .filter(|u| {
                        u.tls
                            .as_ref()
                            .is_some_and(|t| t.certificate.as_deref() == Some(id))
                    })
                    .map(|u| format!("upstreams/{}", u.id));
                listeners.chain(upstreams).collect()
            }
            Kind::Consumers => {
                let credentials = c
                    .credentials
                    .iter()
                    .filter(|k| k.consumer == id)
                    .map(|k| format!("credentials/{}", k.id));
                let acls = c.policies.iter().filter_map(|p| match p {
                    PolicyConfig::Acl(a) if a.consumers.iter().any(|x| x == id) => {
                        Some(format!("policies/{}", a.id))
                    }
                    _ => None,
                });
                credentials.chain(acls).collect()
            }
            Kind::Credentials => Vec::new(),
            Kind::Policies => {
                let mut out: Vec<String> = c
                    .routes
                    .iter()
                    .filter(|r| r.policies.iter().any(|p| p == id))
                    .map(|r| format!("routes/{}", r.id))
                    .collect();
                out.extend(
                    c.consumers
                        .iter()
                        .filter(|k| k.policies.iter().any(|p| p == id))
                        .map(|k| format!("consumers/{}", k.id)),
                );
                if c.global_policies.iter().any(|p| p == id) {
                    out.push("global_policies".to_owned());
                }
                out.extend(
                    c.listeners
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| l.policies.iter().any(|p| p == id))
                        .map(|(i, _)| format!("listeners/{i}")),
                );
                out
            }
        }
    }
}

fn to_value<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// Deserializes with the path of the first offending field: unknown fields are 400, values of
/// the wrong type 422.
fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let pointer = path_to_pointer(&e.path().to_string());
        let detail = e.inner().to_string();
        let status = if detail.starts_with("unknown field") {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        let title = if status == StatusCode::BAD_REQUEST {
            "Unknown Field"
        } else {
            "Invalid Value"
        };
        Problem::new(status, title, detail).at(pointer)
    })
}

/// A policy from its JSON. serde reads a `kind`-tagged enum through a buffer that forgets
/// where in it an error was, so an error is found again by reading the body as the kind's
/// own type, which keeps the path (`/allow`, not the whole policy).
fn typed_policy(value: Value) -> Result<PolicyConfig, Problem> {
    let copy = value.clone();
    typed::<PolicyConfig>(value).map_err(|p| policy_problem(&copy).unwrap_or(p))
}

/// The error in policy `value` with its path, read as the type its `kind` names; `None` if
/// that finds none (an unknown kind, or no error at all).
fn policy_problem(value: &Value) -> Option<Problem> {
    let mut v = value.clone();
    let kind = v.as_object_mut()?.shift_remove("kind")?;
    use common::config::{
        AclConfig, ApiKeyConfig, CorsConfig, DomainConfig, IpFilterConfig, JwtConfig,
        RateLimitConfig,
    };
    match kind.as_str()? {
        "ip_filter" => typed::<IpFilterConfig>(v).err(),
        "domain" => typed::<DomainConfig>(v).err(),
        "cors" => typed::<CorsConfig>(v).err(),
        "api_key" => typed::<ApiKeyConfig>(v).err(),
        "jwt" => typed::<JwtConfig>(v).err(),
        "acl" => typed::<AclConfig>(v).err(),
        "rate_limit" => typed::<RateLimitConfig>(v).err(),
        _ => None,
    }
}

/// A whole config from its JSON, an error in one of its policies found as [`typed_policy`]
/// finds it.
fn typed_config(value: Value) -> Result<Config, Problem> {
    let copy = value.clone();
    typed::<Config>(value).map_err(|p| {
        let index = (p.pointer.as_deref())
            .and_then(|ptr| ptr.strip_prefix("/policies/"))
            .and_then(|i| i.parse::<usize>().ok());
        let inner = index.and_then(|i| policy_problem(copy.get("policies")?.get(i)?));
        match (index, inner) {
            (Some(i), Some(mut inner)) => {
                let rest = inner.pointer.take().unwrap_or_default();
                inner.at(format!("/policies/{i}{rest}"))
            }
            _ => p,
        }
    })
}

/// `routes[2].targets[0].weight` → `/routes/2/targets/0/weight`. A path holds the keys of
/// maps as written (a header name, a rename), so any text: what does not read as
/// `name[index]...` is a step of its own, never a panic (an error's pointer is made while a
/// file reload runs on the main thread).
pub fn path_to_pointer(path: &str) -> String {
    if path == "." || path.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    for part in path.split('.') {
        let name_end = part.find('[').unwrap_or(part.len());
        if name_end > 0 {
            crate::json::push_pointer_step(&mut out, &part[..name_end]);
        }
        let mut rest = &part[name_end..];
        while let Some((index, after)) = rest.strip_prefix('[').and_then(|r| r.split_once(']')) {
            crate::json::push_pointer_step(&mut out, index);
            rest = after;
        }
        if !rest.is_empty() {
            crate::json::push_pointer_step(&mut out, rest);
        }
    }
    out
}

/// A validation error as a 422 with the pointer of the field.
fn invalid(e: ConfigError) -> Problem {
    let (status, title) = match e {
        ConfigError::Syntax { .. } => (StatusCode::BAD_REQUEST, "Malformed Config"),
        _ => (StatusCode::UNPROCESSABLE_ENTITY, "Invalid Config"),
    };
    Problem::new(status, title, e.to_string()).at(path_to_pointer(e.path()))
}

/// Item `id`, `current`, with `patch` applied ([`patch_item`]). A null for a member the item
/// does not have removes nothing, but it must still name a field of the item's type (the
/// schema has no other fields): 422 if not. The item is tried alone, in an empty config (a
/// copy of the whole one cost as much as the config is large).
fn patched(kind: Kind, id: &str, mut current: Value, patch: &Value) -> Result<Value, Problem> {
    if let (Value::Object(patch_map), Value::Object(cur)) = (patch, &current) {
        let mut probe = cur.clone();
        let mut any = false;
        for (k, v) in patch_map {
            if v.is_null() && !cur.contains_key(k) {
                probe.insert(k.clone(), Value::Null);
                any = true;
            }
        }
        if any {
            if let Err(mut p) = kind.put(&mut Config::default(), id, Value::Object(probe)) {
                if p.status == StatusCode::BAD_REQUEST {
                    p.status = StatusCode::UNPROCESSABLE_ENTITY;
                    p.title = "Invalid Value";
                    return Err(p);
                }
            }
        }
    }
    patch_item(kind, &mut current, patch);
    Ok(current)
}

/// RFC 7396 JSON Merge Patch of a `kind` item. A certificate patched with a new key
/// (`key_pem` or `key_file`), or a credential with a new `key`, and no `key_sha256` of its
/// own loses the stored key's digest, which would otherwise stand against the new key (the
/// digest is the gateway's output, refreshed from the key).
fn patch_item(kind: Kind, item: &mut Value, patch: &Value) {
    merge_patch(item, patch);
    let key_fields: &[&str] = match kind {
        Kind::Certificates => &["key_pem", "key_file"],
        Kind::Credentials => &["key"],
        _ => &[],
    };
    let new_key = |p: &Value| {
        key_fields
            .iter()
            .any(|k| p.get(k).is_some_and(|v| !v.is_null()))
    };
    if new_key(patch) && patch.get("key_sha256").is_none() {
        if let Value::Object(item) = item {
            item.shift_remove("key_sha256");
        }
    }
}

/// RFC 7396 JSON Merge Patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// What a change does, item by item; and per kind, whether the items kept changed order
/// (routes are tried in config order within a path, so an order is part of the config).
pub(crate) fn diff(old: &Config, new: &Config) -> Vec<Value> {
    let old_list = crate::store::item_values(old);
    let new_list = crate::store::item_values(new);
    type Items<'a> = std::collections::BTreeMap<&'a str, &'a Value>;
    fn by_key(list: &[(String, Value)]) -> Items<'_> {
        list.iter().map(|(k, v)| (k.as_str(), v)).collect()
    }
    let (old_items, new_items) = (by_key(&old_list), by_key(&new_list));
    let entry = |op: &str, key: &str| {
        let (kind, id) = key.split_once('/').unwrap_or((key, ""));
        json!({"op": op, "kind": kind, "id": id})
    };
    let mut out = Vec::new();
    for (key, value) in &old_items {
        match new_items.get(key) {
            None => out.push(entry("remove", key)),
            Some(v) if v != value => out.push(entry("replace", key)),
            Some(_) => {}
        }
    }
    for key in new_items.keys().filter(|k| !old_items.contains_key(*k)) {
        out.push(entry("add", key));
    }
    // The items in both, in each config's order: a kind whose sequences differ was reordered.
    fn kept<'a>(list: &'a [(String, Value)], other: &Items<'_>) -> Vec<&'a str> {
        list.iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| other.contains_key(k))
            .collect()
    }
    let (was, now) = (kept(&old_list, &new_items), kept(&new_list, &old_items));
    let mut reordered: Vec<&str> = was
        .iter()
        .zip(&now)
        .filter(|(a, b)| a != b)
        .filter_map(|(a, _)| a.split_once('/').map(|(kind, _)| kind))
        .collect();
    reordered.dedup();
    for kind in reordered {
        out.push(json!({"op": "reorder", "kind": kind}));
    }
    let settings = |c: &Config| {
        let mut v = to_value(c);
        if let Value::Object(m) = &mut v {
            for kind in KIND_PATHS {
                m.remove(&kind["/v1/".len()..]);
            }
        }
        v
    };
    if settings(old) != settings(new) {
        out.push(json!({"op": "replace", "kind": "settings"}));
    }
    out
}

/// Conditional request headers (RFC 9110 §13).
#[derive(Debug, Default)]
struct Preconditions {
    if_match: Option<Vec<String>>,
    if_none_match: Option<Vec<String>>,
}

/// The entity tags of an `If-Match` / `If-None-Match` value: `*` or a comma-separated list
/// (RFC 9110 §13.1.1). Anything that is not a current strong ETag simply never matches, so a
/// malformed `If-Match` fails with 412 and a malformed `If-None-Match` does not block.
fn entity_tags(value: &str) -> Vec<String> {
    value.split(',').map(|t| t.trim().to_owned()).collect()
}

impl Preconditions {
    fn from(headers: &HeaderMap) -> Preconditions {
        // Every line of the field: several lines are one comma-separated list (RFC 9110 5.3).
        let parse = |name: header::HeaderName| {
            let mut lines = headers.get_all(&name).iter().peekable();
            lines.peek()?;
            Some(
                lines
                    .flat_map(|v| entity_tags(&String::from_utf8_lossy(v.as_bytes())))
                    .collect(),
            )
        };
        Preconditions {
            if_match: parse(header::IF_MATCH),
            if_none_match: parse(header::IF_NONE_MATCH),
        }
    }

    /// Checks against the current ETag of the target (`None`: it does not exist): `If-Match`
    /// by strong comparison (a weak tag never matches: writes need strong validators),
    /// `If-None-Match` by weak comparison (RFC 9110 13.1.2: `W/"x"` matches `"x"`).
    fn check(&self, current: Option<&str>) -> Result<(), Problem> {
        self.check_if_match(current)?;
        if self.none_match_matches(current) {
            let tags = self.if_none_match.as_deref().unwrap_or_default();
            return Err(precondition_failed(format!(
                "If-None-Match {} matches the current ETag {}",
                tags.join(", "),
                current.unwrap_or("")
            )));
        }
        Ok(())
    }

    /// `If-Match`, compared strongly: 412 when it names none of the current ETag and `*`.
    fn check_if_match(&self, current: Option<&str>) -> Result<(), Problem> {
        let Some(tags) = &self.if_match else {
            return Ok(());
        };
        let matches = current.is_some_and(|etag| tags.iter().any(|t| t == "*" || t == etag));
        if matches {
            return Ok(());
        }
        Err(precondition_failed(format!(
            "If-Match {} does not match the current ETag {}",
            tags.join(", "),
            current.unwrap_or("(none: it does not exist)")
        )))
    }

    /// Whether `If-None-Match` names the current ETag (or `*` and the target exists).
    fn none_match_matches(&self, current: Option<&str>) -> bool {
        let (Some(tags), Some(etag)) = (&self.if_none_match, current) else {
            return false;
        };
        let weak = |t: &str| t.strip_prefix("W/").unwrap_or(t).to_owned();
        tags.iter().any(|t| t == "*" || weak(t) == weak(etag))
    }

    /// A read's answer (RFC 9110 13.2.2): 412 when `If-Match` fails, `304 Not Modified` with
    /// the ETag when `If-None-Match` names it, else `answer` with the ETag.
    fn answer_read(&self, etag: String, answer: impl FnOnce(String) -> Response) -> Response {
        if let Err(p) = self.check_if_match(Some(&etag)) {
            return p.into_response();
        }
        if !self.none_match_matches(Some(&etag)) {
            return answer(etag);
        }
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        if let Ok(v) = HeaderValue::from_str(&etag) {
            resp.headers_mut().insert(header::ETAG, v);
        }
        resp
    }
}

fn precondition_failed(detail: String) -> Problem {
    Problem::new(
        StatusCode::PRECONDITION_FAILED,
        "Precondition Failed",
        detail,
    )
}

#[derive(Debug, Default)]
struct WriteQuery {
    raw: Option<String>,
}

/// The value of the one query parameter an endpoint takes, `name` (`None` when absent), its
/// `%XX` escapes decoded as in the name; any other parameter, `name` twice, or a malformed
/// escape is a 400.
pub(crate) fn only_param(raw: Option<&str>, name: &str) -> Result<Option<String>, Problem> {
    let bad = |detail: String| Err(Problem::new(StatusCode::BAD_REQUEST, "Bad Query", detail));
    let mut value = None;
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = |s: &str| common::snapshot::percent_decoded(s);
        let (Some(k), Some(v)) = (decoded(k), decoded(v)) else {
            return bad(format!("{pair:?}: a malformed %XX escape"));
        };
        if k != name {
            return bad(format!("unknown query parameter {k:?}"));
        }
        if value.replace(v).is_some() {
            return bad(format!("{name} given more than once"));
        }
    }
    Ok(value)
}

impl WriteQuery {
    fn dry_run(&self) -> Result<bool, Problem> {
        let bad = |detail: String| Err(Problem::new(StatusCode::BAD_REQUEST, "Bad Query", detail));
        let value = only_param(self.raw.as_deref(), "dry_run")?;
        match value.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("false") | Some("0") => Ok(false),
            Some("true") | Some("1") | Some("") => Ok(true),
            Some(_) => bad(format!(
                "dry_run={:?}: expected true or false",
                value.unwrap_or_default()
            )),
        }
    }
}

/// The outcome of a write.
#[derive(Debug)]
pub struct Applied {
    pub revision: u64,
    /// The revision the change makes (or, in a dry run, would make).
    pub next: u64,
    pub changes: Vec<Value>,
    pub dry_run: bool,
}

fn config_etag(revision: u64) -> String {
    format!("\"config-r{revision}\"")
}

fn item_etag(kind: Kind, id: &str, revision: u64) -> String {
    format!("\"{}-{id}-r{revision}\"", kind.name())
}

impl Admin {
    pub fn new(
        store: Store,
        shared: Arc<ArcSwap<Snapshot>>,
        token: String,
        upstreams: crate::upstreams::Upstreams,
        process_files: Vec<(std::path::PathBuf, String)>,
    ) -> Admin {
        Admin {
            view: ArcSwap::from_pointee(View::of(&store)),
            store: Mutex::new(store),
            shared,
            token,
            started: Instant::now(),
            runtime: Mutex::new(None),
            upstreams,
            retired: std::sync::atomic::AtomicU32::new(0),
            frozen: std::sync::atomic::AtomicBool::new(false),
            process_files,
        }
    }

    pub fn set_runtime(&self, info: RuntimeInfo) {
        *lock(&self.runtime) = Some(info);
    }

    /// The one way a change happens: build the candidate from the current config, validate and
    /// compile it, persist it, publish it. With `dry_run` it stops after validation. On an
    /// etcd store, a commit that finds a newer revision committed by another node builds the
    /// change again on that revision (so `If-Match` preconditions see it and answer 412).
    pub fn apply(
        &self,
        dry_run: bool,
        source: &str,
        build: impl FnMut(&Store) -> Result<Config, Problem>,
    ) -> Result<Applied, Problem> {
        self.apply_then(dry_run, source, build, |_| ())
            .map(|(applied, ())| applied)
    }

    /// [`Admin::apply`], then `read` of the store as this write left it, under the same
    /// lock: another write cannot come between (an answer showing what it wrote, with its
    /// ETag, would invite an `If-Match` that overwrites that other write unseen).
    pub fn apply_then<R>(
        &self,
        dry_run: bool,
        source: &str,
        mut build: impl FnMut(&Store) -> Result<Config, Problem>,
        read: impl FnOnce(&Store) -> R,
    ) -> Result<(Applied, R), Problem> {
        let mut store = self.held();
        self.taking_writes()?;
        if let Store::Etcd(e) = &mut *store {
            // Validate against the newest shared config, not the one last seen.
            match e.refresh() {
                Ok(_) => {
                    store = self.publish_pending_unlocked(store);
                    self.taking_writes()?;
                }
                Err(err) if !dry_run => return Err(store_problem(err)),
                Err(_) => {}
            }
        }
        if let Store::Etcd(e) = &mut *store {
            e.check_readable().map_err(store_problem)?;
        }
        let started = std::time::Instant::now();
        let mut attempts = 0;
        let mut prefetched = false;
        while attempts < MIN_COMMIT_ATTEMPTS
            || (attempts < MAX_COMMIT_ATTEMPTS && started.elapsed() < COMMIT_RETRY_FOR)
        {
            attempts += 1;
            let mut next = build(&store)?;
            let revision = store.next_revision();
            let new_keys = crate::keys::take_new(&next);
            if let Store::Etcd(e) = &mut *store {
                // A key the config names by digest (a rollback, a GET put back) that another
                // node stored: in etcd, sealed, if not yet in this node's directory. One not
                // there either is the compile's 422, naming the field.
                if let Err(why) = e.fetch_keys(&next) {
                    log::warn!("a write names a private key this node cannot fetch: {why}");
                }
            }
            crate::keys::load(store.dir(), &mut next);
            let mut snapshot = Snapshot::compile(next, revision).map_err(invalid)?;
            // A certificate already served may have expired since; a new one may not.
            snapshot
                .refuse_newly_expired(Some(&self.shared.load()), std::time::SystemTime::now())
                .map_err(invalid)?;
            // The compiled config is the normalised one (API keys replaced by their hashes):
            // that is what is stored, diffed and served.
            let next = snapshot.config.clone();
            let current = store.config();
            // Settings the running gateway cannot take: a restart applies them.
            let restart_only = |what: &str, at: &str| {
                Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid Config",
                    format!(
                        "{what} cannot change while the gateway runs; restart it with the new config"
                    ),
                )
                .at(at)
            };
            if snapshot.listeners != self.shared.load().listeners {
                return Err(restart_only("listeners", "/listeners"));
            }
            if next.workers != current.workers {
                return Err(restart_only("workers", "/workers"));
            }
            let files = &self.process_files;
            if let Err((at, why)) = crate::store::local::refuse_paths_in(store.dir(), &next, files)
            {
                return Err(
                    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid Config", why).at(at),
                );
            }
            if next.admin != current.admin {
                return Err(restart_only("admin settings", "/admin"));
            }
            let size = serde_json::to_vec(&next).map_or(0, |v| v.len());
            if size > MAX_CONFIG_BODY {
                return Err(Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid Config",
                    format!(
                        "the config would be {size} bytes, over {MAX_CONFIG_BODY}: what GET \
                         /v1/config returns could no longer be PUT back"
                    ),
                ));
            }
            let changes = diff(current, &next);
            let removed = removed_items(current, &next);
            let unfit = unfit_for_listeners(current, &next);
            if let Store::Etcd(e) = &mut *store {
                check_cluster_write(e, &next, &new_keys, &removed, &unfit)?;
            }
            if dry_run || changes.is_empty() {
                // A change that changes nothing makes no revision, dry run or not.
                let next = if changes.is_empty() {
                    store.revision()
                } else {
                    revision
                };
                let applied = Applied {
                    revision: store.revision(),
                    next,
                    changes,
                    dry_run,
                };
                return Ok((applied, read(&store)));
            }
            if !prefetched && self.upstreams.has_new_names(&snapshot) {
                // Names never looked up: their first lookups (up to the resolver's timeouts
                // when their servers are silent) run without the store's lock, which every
                // other admin call needs, and the change is built again on whatever the
                // store holds then.
                prefetched = true;
                drop(store);
                self.upstreams.prefetch(&snapshot);
                store = self.held();
                self.taking_writes()?;
                continue;
            }
            match store.commit(next, source, &new_keys) {
                Ok(committed) => {
                    debug_assert_eq!(committed, revision);
                    self.upstreams.adopt(&mut snapshot);
                    snapshot.claim_metric_slots();
                    self.shared.store(Arc::new(snapshot));
                    // Again once the snapshot is out: the workers' next sweep prunes pooled
                    // connections to the targets of upstreams this change removed.
                    common::live::bump_generation();
                    if let Store::Etcd(e) = &mut *store {
                        e.mark_published();
                    }
                    let applied = Applied {
                        revision,
                        next: revision,
                        changes,
                        dry_run: false,
                    };
                    return Ok((applied, read(&store)));
                }
                Err(StoreError::Conflict) => {
                    store = self.publish_pending_unlocked(store);
                    self.taking_writes()?;
                    // A few milliseconds, at random: two nodes that keep meeting each other's
                    // commits fall out of step.
                    std::thread::sleep(commit_backoff());
                }
                Err(e) => {
                    log::error!("admin: cannot persist the change: {e}");
                    return Err(store_problem(e));
                }
            }
        }
        Err(Problem::new(
            StatusCode::CONFLICT,
            "Concurrent Changes",
            format!(
                "the config changed {attempts} times while this write was validated (in {} ms); \
                 nothing changed, try again",
                started.elapsed().as_millis()
            ),
        ))
    }

    /// Refuses a write while a binary upgrade starts this process's successor, and after
    /// the successor took over.
    fn taking_writes(&self) -> Result<(), Problem> {
        if self.frozen.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Upgrading",
                "a binary upgrade is starting this process's successor; retry: once it serves, \
                 changes go to it, and if the upgrade fails, to this process again",
            )
            .retry_on_a_new_connection());
        }
        self.serving()
    }

    /// Refuses every admin call once a binary upgrade's successor serves: what this process
    /// would show (its config, revision, pid) is no longer what is served, and a change here
    /// would be lost. A connection this process still holds is told so and closed, so that
    /// the client's retry reaches the successor.
    fn serving(&self) -> Result<(), Problem> {
        let successor = self.retired.load(std::sync::atomic::Ordering::Acquire);
        if successor != 0 {
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Handed Over",
                format!(
                    "this process has handed over to its upgrade (pid {successor}), which \
                     answers the admin API now; retry"
                ),
            )
            .retry_on_a_new_connection());
        }
        Ok(())
    }

    /// An etcd record seen by the watch: adopted, and published when it is newer than what
    /// the workers run.
    pub fn observe(&self, value: &[u8], mod_revision: i64) {
        let mut store = self.held();
        if let Store::Etcd(e) = &mut *store {
            e.adopt(value, mod_revision);
        }
        drop(self.publish_pending_unlocked(store));
    }

    /// The etcd config key deleted, as the watch saw it: the record held is forgotten (said
    /// in the log), as when a read finds none; the workers serve on what they run.
    pub fn observe_deleted(&self) {
        if let Store::Etcd(e) = &mut *self.held() {
            e.forget_record();
        }
    }

    /// Reads the config whole with `read` (etcd's `P/config` and its header revision) and
    /// takes what it holds now, even if older than the record held (the store was restored
    /// from a backup), publishing it. The read is made without the store's lock (etcd may
    /// hang); if the record held changed meanwhile (this node committed), the read may be
    /// older than it without the store going back, and only a newer record is taken. The
    /// record's etcd `mod_revision`, and the header revision.
    pub fn observe_read(
        &self,
        read: impl FnOnce() -> Result<(Vec<crate::etcd::Kv>, i64), crate::etcd::EtcdError>,
    ) -> Result<(Option<i64>, i64), crate::etcd::EtcdError> {
        let held = match &*self.held() {
            Store::Etcd(e) => e.mod_revision(),
            Store::Local(_) => 0,
        };
        let (kvs, revision) = read()?;
        let kv = kvs.first();
        let mut store = self.held();
        if let Store::Etcd(e) = &mut *store {
            match kv {
                Some(kv) if e.mod_revision() == held => {
                    e.adopt_current(&kv.value, kv.mod_revision);
                }
                Some(kv) => {
                    e.adopt(&kv.value, kv.mod_revision);
                }
                // Nothing there, and nothing committed here since the read.
                None if e.mod_revision() == held => e.forget_record(),
                None => {}
            }
        }
        drop(self.publish_pending_unlocked(store));
        Ok((kv.map(|kv| kv.mod_revision), revision))
    }

    /// Publishes the etcd store's record if the workers do not run it yet: a newer one, or
    /// after a restore from a backup an older one, whatever its revision number. One this
    /// node cannot compile (say, it removes a policy this node's listeners use) is not
    /// published: the node keeps serving the last one and `/v1/status` names it.
    fn publish_pending(&self, e: &mut EtcdStore) {
        if let Some(compiled) = Self::compile_pending(e, &self.process_files) {
            self.publish(e, compiled);
        }
    }

    /// [`Admin::publish_pending`], with the first DNS lookups of the names the record brings
    /// made without the store's lock, which every admin call needs (a lookup may wait out a
    /// silent name server's timeouts): compiled, its new names looked up unlocked, then
    /// published if the store still holds that record (compiled again if not).
    fn publish_pending_unlocked<'a>(&'a self, mut store: Held<'a>) -> Held<'a> {
        let Store::Etcd(e) = &mut *store else {
            return store;
        };
        let Some(compiled) = Self::compile_pending(e, &self.process_files) else {
            return store;
        };
        let record = e.mod_revision();
        if let Ok(snapshot) = &compiled.1 {
            if self.upstreams.has_new_names(snapshot) {
                drop(store);
                self.upstreams.prefetch(snapshot);
                store = self.held();
            }
        }
        if let Store::Etcd(e) = &mut *store {
            if e.mod_revision() == record && !e.published_or_rejected() {
                self.publish(e, compiled);
            } else {
                self.publish_pending(e);
            }
        }
        store
    }

    /// The etcd store's record compiled, with its revision, unless the workers run it
    /// already (or it was found not to compile).
    fn compile_pending(
        e: &mut EtcdStore,
        process_files: &[(std::path::PathBuf, String)],
    ) -> Option<(u64, Result<Snapshot, String>)> {
        if e.published_or_rejected() {
            return None;
        }
        let revision = e.revision();
        let mut next = e.config().clone();
        let result = e.fetch_keys(&next).and_then(|()| {
            crate::keys::load(e.dir(), &mut next);
            // Another node's change cannot see this node's access log: one that names the
            // file it writes (a CA file, a certificate) is served here without the log, as
            // a start does, rather than have the log's lines make that file unreadable.
            if let Err((at, why)) =
                crate::store::local::refuse_paths_in(e.dir(), &next, process_files)
            {
                log::error!(
                    "etcd revision {revision}: {at}: {why}; the access log is off until the \
                     config changes"
                );
                next.access_log = None;
            }
            let (snapshot, notes) =
                Snapshot::compile_stored(next, revision).map_err(|err| err.to_string())?;
            for note in notes {
                log::warn!("etcd revision {revision}: {note} (allowed by the node that wrote it)");
            }
            Ok(snapshot)
        });
        Some((revision, result))
    }

    /// Publishes the etcd store's record as [`Admin::compile_pending`] compiled it, or
    /// marks it rejected.
    fn publish(&self, e: &mut EtcdStore, (revision, result): (u64, Result<Snapshot, String>)) {
        match result {
            Ok(mut snapshot) => {
                self.upstreams.adopt(&mut snapshot);
                snapshot.claim_metric_slots();
                self.shared.store(Arc::new(snapshot));
                common::live::bump_generation();
                log::info!("config store: revision {revision} published");
                e.mark_published();
            }
            Err(why) => {
                log::error!(
                    "config store: revision {revision} cannot be served here ({why}); still \
                     serving revision {}",
                    e.applied
                );
                e.mark_rejected(why);
            }
        }
    }

    /// This node's id and record, for the etcd heartbeat.
    pub fn node_record(&self) -> (String, Value) {
        match &*self.held() {
            Store::Etcd(e) => (e.node_id().to_owned(), e.node_record()),
            Store::Local(_) => (String::new(), Value::Null),
        }
    }

    /// Stops changes for a binary upgrade: no write lands while the successor opens the
    /// store (they are refused with 503, not held).
    pub fn freeze(&self) -> Frozen<'_> {
        // Under the store's lock: a change under way ends first, and none starts after.
        let _store = self.held();
        self.frozen
            .store(true, std::sync::atomic::Ordering::Release);
        Frozen(self)
    }

    /// Whether a binary upgrade is starting this process's successor or has handed over to
    /// it: the node's record in etcd is then the successor's to write.
    pub fn upgrading(&self) -> bool {
        self.frozen.load(std::sync::atomic::Ordering::Acquire) || self.handed_over()
    }

    /// Whether a binary upgrade has handed over to a successor, which serves as the node.
    pub fn handed_over(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Acquire) != 0
    }

    /// The successor `pid` serves: from now on writes here are refused.
    pub fn retire(&self, frozen: Frozen<'_>, pid: u32) {
        self.retired
            .store(pid, std::sync::atomic::Ordering::Release);
        drop(frozen);
    }

    /// Each worker's counters (once the data plane runs).
    pub fn worker_metrics(&self) -> Vec<Arc<dataplane::metrics::WorkerMetrics>> {
        lock(&self.runtime)
            .as_ref()
            .map(|r| r.metrics.clone())
            .unwrap_or_default()
    }

    /// The snapshot the workers run.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.load_full()
    }

    /// The revision this node's workers run.
    pub fn applied_revision(&self) -> u64 {
        self.shared.load().revision
    }

    /// The store's state for `/v1/status`, from `view`.
    fn store_status(view: &View) -> Value {
        let mut status = view.status.clone();
        if let (Some(health), Some(fields)) = (&view.health, status.as_object_mut()) {
            fields.insert("reachable".into(), health.reachable().into());
            fields.insert(
                "last_error".into(),
                json!(health
                    .last_error()
                    .map(|(at, m)| json!({"at_ms": at, "error": m}))),
            );
        }
        status
    }

    /// SIGHUP: the config file again, through the same path.
    pub fn reload_file(&self, path: &std::path::Path) {
        if let Store::Etcd(_) = &*self.held() {
            log::info!(
                "SIGHUP ignored: with an etcd store the node file {} is read at start only, \
                 and shared resources change through the admin API",
                path.display()
            );
            return;
        }
        // Revisions made through the API since the file was last applied: the file replaces
        // them, which must not go unsaid.
        let (kept, recorded) = {
            let mut held = self.held();
            let recorded = match &*held {
                Store::Local(local) => crate::applied::read(local.dir()).map(|t| t.revision),
                Store::Etcd(_) => None,
            };
            (held.revisions().unwrap_or_default(), recorded)
        };
        let from_file = |r: &&crate::store::StoredRevision| {
            r.source == "file reload" || r.source.starts_with("file ")
        };
        let by_api: Vec<u64> = (kept.iter().rev())
            .take_while(|r| !from_file(r))
            .filter(|r| r.source.starts_with("api") || r.source.starts_with("rollback"))
            .map(|r| r.revision)
            .collect();
        // The API's changes go back past the oldest kept when revisions not kept lie between
        // it and the file's, as the data directory recorded it or else the newest file
        // revision kept (an earlier build's directory has no record); before, the oldest
        // kept was named as the first.
        let file_at = recorded.or_else(|| kept.iter().rev().find(from_file).map(|r| r.revision));
        let older = kept.first().is_some_and(|oldest| {
            !from_file(&oldest) && oldest.revision > file_at.unwrap_or(0) + 1
        });
        // Read once: what is applied is what the data directory then remembers as taken
        // (see `crate::applied`), so that a restart with the same file resumes.
        let text = std::fs::read(path);
        let result = self.apply(false, "file reload", |_| match &text {
            Ok(bytes) => crate::applied::parse(path, bytes.clone()).map_err(invalid),
            Err(e) => Err(invalid(common::ConfigError::Io {
                path: path.display().to_string(),
                reason: e.to_string(),
            })),
        });
        if let (Ok(a), Ok(bytes), Store::Local(local)) = (&result, &text, &*self.held()) {
            let digest = common::tls::sha256_hex(bytes);
            crate::applied::record(local.dir(), &digest, a.revision);
        }
        match result {
            Ok(a) if a.changes.is_empty() => {
                log::info!(
                    "reloaded {}: no change (revision {})",
                    path.display(),
                    a.revision
                )
            }
            Ok(a) => match (by_api.first(), by_api.last()) {
                (Some(&last), Some(&first)) => log::warn!(
                    "reloaded {} (revision {}): it replaced the changes made through the admin \
                     API since it was last applied (revisions {} to {last}); \
                     POST /v1/revisions/{last}:rollback brings them back",
                    path.display(),
                    a.revision,
                    match older {
                        true => format!("from before {first}, the oldest kept,"),
                        false => first.to_string(),
                    }
                ),
                _ => log::info!("reloaded {} (revision {})", path.display(), a.revision),
            },
            Err(p) => log::warn!(
                "reload of {} refused, still on revision {}: {}",
                path.display(),
                self.view().revision,
                p.detail
            ),
        }
    }

    /// The store under its lock (which a write holds for as long as etcd takes).
    fn held(&self) -> Held<'_> {
        Held {
            store: lock(&self.store),
            view: &self.view,
        }
    }

    /// The store's current config, revision and status as of the end of the last change.
    fn view(&self) -> Arc<View> {
        self.view.load_full()
    }

    /// Whether `headers` carry the admin token: one `Authorization: Bearer` field (of two,
    /// which one counts would be a guess, and the data plane's `jwt` policy refuses two as
    /// well), compared in constant time.
    fn token_given(&self, headers: &HeaderMap) -> bool {
        let mut fields = headers.get_all(header::AUTHORIZATION).iter();
        let field = fields.next().filter(|_| fields.next().is_none());
        let given = field
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .unwrap_or("");
        constant_time_eq(given.as_bytes(), self.token.as_bytes())
    }

    /// A write's preconditions, checked by `check` against the last change's view before
    /// its body is read (RFC 9110 13.2.1: a stale `If-Match` is a `412` whatever the body
    /// holds); the write checks them again under the store's lock. Not on etcd, where the
    /// view may not have another node's change yet (the write reads it first).
    fn precheck(&self, check: impl FnOnce(&View) -> Result<(), Problem>) -> Result<(), Problem> {
        let view = self.view();
        match view.health {
            None => check(&view),
            Some(_) => Ok(()),
        }
    }
}

/// Tries of a write that keeps meeting newer revisions from other nodes: at least
/// `MIN_COMMIT_ATTEMPTS`, then more while under `COMMIT_RETRY_FOR`, at most
/// `MAX_COMMIT_ATTEMPTS` (a node whose validation is slower than another node's stream of
/// writes still gets its write in once that stream pauses).
const MIN_COMMIT_ATTEMPTS: usize = 8;
const MAX_COMMIT_ATTEMPTS: usize = 64;
const COMMIT_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// A random pause of 1 to 4 ms between tries of a conflicting write.
fn commit_backoff() -> std::time::Duration {
    use std::hash::{BuildHasher, Hasher};
    // A fresh `RandomState` is seeded at random: enough randomness for a jitter.
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    std::time::Duration::from_micros(1_000 + bits % 3_000)
}

/// The answer to a store that could not commit or read.
fn store_problem(e: StoreError) -> Problem {
    match e {
        StoreError::Unavailable(m) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Store Unavailable",
            format!(
                "the config store cannot be reached ({m}); this node keeps serving its last \
                 config"
            ),
        ),
        StoreError::Failed(m) => Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Not Persisted",
            format!("{m}; nothing changed"),
        ),
        StoreError::Conflict => Problem::new(
            StatusCode::CONFLICT,
            "Concurrent Changes",
            "another revision was committed first; try again",
        ),
        // Not 413: the request may be a few bytes; the store cannot hold what it makes.
        StoreError::TooLarge(m) => Problem::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "Config Too Large",
            format!("{m}; nothing changed"),
        ),
        StoreError::Unreadable(m) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Store Unreadable",
            format!("{m}; this node keeps serving its last config, and takes no changes"),
        ),
    }
}

/// `kind/id` of the items `current` has and `next` does not.
fn removed_items(current: &Config, next: &Config) -> Vec<String> {
    let kept: std::collections::BTreeSet<String> = crate::store::item_values(next)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    crate::store::item_values(current)
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !kept.contains(k))
        .collect()
}

/// `policies/id` of the policies a listener could have in `current` (`ip_filter`, `domain`)
/// that `next` makes of another kind.
fn unfit_for_listeners(current: &Config, next: &Config) -> Vec<String> {
    let fit = |p: &PolicyConfig| matches!(p, PolicyConfig::IpFilter(_) | PolicyConfig::Domain(_));
    let was_fit = |id: &str| current.policies.iter().any(|p| p.id() == id && fit(p));
    (next.policies.iter())
        .filter(|p| !fit(p) && was_fit(p.id()))
        .map(|p| format!("policies/{}", p.id()))
        .collect()
}

/// What an etcd store refuses: changes to this node's own settings (they live in its node
/// file), private keys without a secret to encrypt them with, and removing what another
/// node's listeners use or making a policy they use one no listener can have.
fn check_cluster_write(
    e: &mut EtcdStore,
    next: &Config,
    new_keys: &[crate::keys::NewKey],
    removed: &[String],
    unfit: &[String],
) -> Result<(), Problem> {
    if let Some(pointer) = e.changed_node_setting(next) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid Config",
            format!(
                "{} is a setting of this node, read from its node file at start; with an etcd \
                 store it cannot change through the admin API",
                &pointer[1..]
            ),
        )
        .at(pointer));
    }
    if !new_keys.is_empty() && !e.has_secret() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid Config",
            "private keys are stored in etcd encrypted with [cluster] secret_file, and this \
             node's file sets none",
        )
        .at("/certificates"));
    }
    let users = e.used_elsewhere(removed).map_err(store_problem)?;
    if !users.is_empty() {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "Still Referenced",
            format!("still used by other nodes: {}", users.join(", ")),
        ));
    }
    // A policy another node's listeners use must stay one a listener can have: that node
    // would refuse the config (and every later one) and keep serving the one before.
    let users = e.used_elsewhere(unfit).map_err(store_problem)?;
    if !users.is_empty() {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "Still Referenced",
            format!(
                "used by other nodes as a listener's policy, which can only be of kind \
                 ip_filter or domain: {}",
                users.join(", ")
            ),
        ));
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the store half-changed (commit replaces it
    // in one assignment after the files are written), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The OpenAPI 3 document served at `/v1/openapi.json`; a test checks it against
/// [`ENDPOINTS`], which the router is built from.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every endpoint as (method, path template as in the OpenAPI document).
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("GET", "/v1/health"),
    ("GET", "/v1/status"),
    ("GET", "/metrics"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/config"),
    ("PUT", "/v1/config"),
    ("POST", "/v1/config:batch"),
    ("GET", "/v1/revisions"),
    ("GET", "/v1/nodes"),
    ("GET", "/v1/stream"),
    ("GET", "/v1/access_log"),
    ("GET", "/v1/revisions/{revision}"),
    ("POST", "/v1/revisions/{revision}:rollback"),
    ("GET", "/v1/routes"),
    ("GET", "/v1/routes/{id}"),
    ("PUT", "/v1/routes/{id}"),
    ("PATCH", "/v1/routes/{id}"),
    ("DELETE", "/v1/routes/{id}"),
    ("GET", "/v1/upstreams"),
    ("GET", "/v1/upstreams/{id}"),
    ("PUT", "/v1/upstreams/{id}"),
    ("PATCH", "/v1/upstreams/{id}"),
    ("DELETE", "/v1/upstreams/{id}"),
    ("GET", "/v1/upstreams/{id}/health"),
    ("GET", "/v1/consumers"),
    ("GET", "/v1/consumers/{id}"),
    ("PUT", "/v1/consumers/{id}"),
    ("PATCH", "/v1/consumers/{id}"),
    ("DELETE", "/v1/consumers/{id}"),
    ("GET", "/v1/credentials"),
    ("GET", "/v1/credentials/{id}"),
    ("PUT", "/v1/credentials/{id}"),
    ("PATCH", "/v1/credentials/{id}"),
    ("DELETE", "/v1/credentials/{id}"),
    ("GET", "/v1/policies"),
    ("GET", "/v1/policies/{id}"),
    ("PUT", "/v1/policies/{id}"),
    ("PATCH", "/v1/policies/{id}"),
    ("DELETE", "/v1/policies/{id}"),
    ("GET", "/v1/aggregates"),
    ("GET", "/v1/aggregates/{id}"),
    ("PUT", "/v1/aggregates/{id}"),
    ("PATCH", "/v1/aggregates/{id}"),
    ("DELETE", "/v1/aggregates/{id}"),
    ("GET", "/v1/client_profiles"),
    ("GET", "/v1/client_profiles/{id}"),
    ("PUT", "/v1/client_profiles/{id}"),
    ("PATCH", "/v1/client_profiles/{id}"),
    ("DELETE", "/v1/client_profiles/{id}"),
    ("GET", "/v1/certificates"),
    ("GET", "/v1/certificates/{id}"),
    ("PUT", "/v1/certificates/{id}"),
    ("PATCH", "/v1/certificates/{id}"),
    ("DELETE", "/v1/certificates/{id}"),
    ("GET", "/v1/transcoders"),
    ("GET", "/v1/transcoders/{id}"),
    ("PUT", "/v1/transcoders/{id}"),
    ("PATCH", "/v1/transcoders/{id}"),
    ("DELETE", "/v1/transcoders/{id}"),
];

/// The router path serving a documented path: one template serves every resource kind.
fn template(path: &str) -> String {
    // The router cannot match a suffix after a parameter: a revision and its rollback are
    // one route (`rollback` and `revision_other_method` tell them apart).
    if let Some(revision) = path.strip_suffix(":rollback") {
        return revision.to_owned();
    }
    for kind in KIND_PATHS {
        if let Some(rest) = path.strip_prefix(kind) {
            return format!("/v1/{{kind}}{rest}");
        }
    }
    path.to_owned()
}

fn handler(method: &str, path: &str) -> axum::routing::MethodRouter<Arc<Admin>> {
    use axum::routing::{delete, patch, put};
    match (method, path) {
        ("GET", "/v1/status") => get(status),
        ("GET", "/metrics") => get(metrics),
        ("GET", "/v1/openapi.json") => get(openapi),
        ("GET", "/v1/config") => get(get_config),
        ("PUT", "/v1/config") => put(put_config),
        ("POST", "/v1/config:batch") => post(batch),
        ("GET", "/v1/revisions") => get(list_revisions),
        ("GET", "/v1/nodes") => get(nodes),
        ("GET", "/v1/stream") => get(crate::live::stream),
        ("GET", "/v1/access_log") => get(crate::live::access_log_tail),
        ("GET", "/v1/revisions/{revision}") => get(get_revision),
        // Another method on a revision or its rollback: a 405 naming what each takes (the
        // router's own would list GET, HEAD and POST for both).
        ("POST", "/v1/revisions/{revision}") => post(rollback).fallback(revision_other_method),
        ("GET", "/v1/{kind}") => get(list_items),
        ("GET", "/v1/{kind}/{id}") => get(get_item),
        ("PUT", "/v1/{kind}/{id}") => put(put_or_patch_item),
        ("PATCH", "/v1/{kind}/{id}") => patch(put_or_patch_item),
        ("DELETE", "/v1/{kind}/{id}") => delete(delete_item),
        ("GET", "/v1/{kind}/{id}/health") => get(upstream_health),
        _ => unreachable!("ENDPOINTS and handler() list the same endpoints"),
    }
}

/// Runs a request's handler on a blocking thread: handlers call the store synchronously
/// (its lock; etcd's blocking client, 3 s per endpoint), and one that waits there must not
/// hold up the runtime's thread, which serves every other admin request. The runtime's
/// thread keeps driving the I/O the handler's future uses.
async fn off_runtime(req: axum::extract::Request, next: middleware::Next) -> Response {
    let handle = tokio::runtime::Handle::current();
    let run = tokio::task::spawn_blocking(move || handle.block_on(next.run(req)));
    match run.await {
        Ok(response) => response,
        Err(e) => Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal Error",
            format!("the request's handler failed: {e}"),
        )
        .into_response(),
    }
}

/// The admin API router, built from [`ENDPOINTS`].
pub fn app(admin: Arc<Admin>) -> Router {
    let mut protected: Router<Arc<Admin>> = Router::new();
    let mut registered: Vec<(&str, String)> = Vec::new();
    for &(method, path) in ENDPOINTS.iter().filter(|(_, p)| *p != "/v1/health") {
        let t = template(path);
        if !registered.contains(&(method, t.clone())) {
            protected = protected.route(&t, handler(method, &t));
            registered.push((method, t));
        }
    }
    let protected = protected
        .route_layer(middleware::from_fn_with_state(admin.clone(), require_token))
        .route_layer(middleware::from_fn(off_runtime));
    let api = Router::new()
        .route(
            "/v1/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        // The dashboard's static files: no token, no data (its requests carry the token).
        .route("/ui", get(crate::live::ui_index))
        .route("/ui/", get(crate::live::ui_index))
        .route("/ui/{file}", get(crate::live::ui_file))
        .merge(protected)
        .fallback(|| async { Problem::not_found("no such endpoint".into()) })
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(admin);
    // axum names a path's methods in `Allow` on whatever its method fallback answers, after
    // any layer of that router: a 404 there (a revision not kept) lists none.
    Router::new()
        .fallback_service(api)
        .layer(middleware::map_response(|mut r: Response| async move {
            if r.status() != StatusCode::METHOD_NOT_ALLOWED {
                r.headers_mut().remove(header::ALLOW);
            }
            // Answers carry secrets (a JWT policy's `secret`, `[cluster] redis`'s password,
            // the `[admin]` token): kept out of every cache (RFC 9111 5.2.2.5), the
            // dashboard's browser's included, which wrote them to its disk cache. The
            // dashboard's own files say `no-cache`.
            if !r.headers().contains_key(header::CACHE_CONTROL) {
                (r.headers_mut())
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            }
            r
        }))
}

/// A method a path's endpoint does not take: 401 without the token, as every endpoint but
/// the health check answers; 404 for a path that names nothing (an unknown kind, the
/// health of what is not an upstream), whose `Allow` would list methods that all fail
/// (RFC 9110 15.5.6: those the target resource supports); else 405.
async fn method_not_allowed(State(admin): State<Arc<Admin>>, req: Request) -> Response {
    let path = req.uri().path();
    // The endpoints that need no token (the health check, the dashboard's files).
    let public = path == "/v1/health" || path == "/ui" || path.starts_with("/ui/");
    if !public && !admin.token_given(req.headers()) {
        return unauthorized().into_response();
    }
    if let Some(file) = path.strip_prefix("/ui/").filter(|f| !f.is_empty()) {
        if let Err(p) = crate::live::ui_file_named(file) {
            return p.into_response();
        }
    }
    let fixed = ENDPOINTS.iter().any(|&(_, p)| p == path);
    if let Some(rest) = path.strip_prefix("/v1/").filter(|_| !fixed && !public) {
        // Segments as the handlers read them: `%61pi` is `api`.
        let parts: Vec<String> = (rest.split('/'))
            .map(|p| common::snapshot::percent_decoded(p).unwrap_or_else(|| p.to_owned()))
            .collect();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        if let Err(p) = Kind::parse(parts[0]) {
            return p.into_response();
        }
        if let [kind, id, "health"] = parts[..] {
            let view = admin.view();
            let upstream = (kind == "upstreams")
                .then(|| Kind::Upstreams.get(&view.config, id))
                .flatten();
            if upstream.is_none() {
                return Problem::not_found(format!("no upstream {id:?}")).into_response();
            }
        }
    }
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method Not Allowed",
        "this endpoint does not take that method",
    )
    .into_response()
}

fn unauthorized() -> Problem {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "a valid bearer token is required",
    )
}

async fn openapi() -> Response {
    let mut resp = (StatusCode::OK, OPENAPI).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The token of an `Authorization: Bearer TOKEN` value: the scheme's name in any case (RFC
/// 9110 11.1), then one or more spaces (RFC 9110 11.4, RFC 6750 2.1), trailing whitespace
/// being no part of a field value.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_start_matches(' ').trim_end_matches([' ', '\t']))
}

async fn require_token(State(admin): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    if admin.token_given(req.headers()) {
        match admin.serving() {
            Ok(()) => next.run(req).await,
            // A scrape of this process's own counters is answered (a 503 would be a failed
            // scrape, `up` 0, at every upgrade), and its connection closed, so that the next
            // one reaches the successor.
            Err(_) if req.method() == axum::http::Method::GET && req.uri().path() == "/metrics" => {
                let mut resp = next.run(req).await;
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                resp
            }
            Err(p) => p.into_response(),
        }
    } else {
        unauthorized().into_response()
    }
}

/// How long a request body may take to arrive whole.
const BODY_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// What a write's head alone refuses: a type other than JSON (415), a content coding (415),
/// a declared length past `limit` (413); [`read_json`] reads the body then. Before any
/// precondition is looked at: RFC 9110 13.2.1 has these failures, detected before the
/// content is processed, take precedence over a 412.
fn refuse_by_head(headers: &HeaderMap, patch: bool, limit: usize) -> Result<(), Problem> {
    // One type: of two, which the body is would be a guess (none is taken).
    let types = headers.get_all(header::CONTENT_TYPE).iter().count();
    let ctype = match types {
        1 => headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
        0 => "",
        _ => "several Content-Type fields",
    };
    let mime = ctype
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let ok = mime == "application/json" || (patch && mime == "application/merge-patch+json");
    if !ok {
        let mut p = Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported Media Type",
            format!(
                "expected Content-Type application/json{}, got {ctype:?}",
                if patch {
                    " or application/merge-patch+json"
                } else {
                    ""
                }
            ),
        );
        if patch {
            p.field = Some((
                "accept-patch",
                "application/merge-patch+json, application/json",
            ));
        }
        return Err(p);
    }
    // A compressed body would be read as JSON text and fail with a misleading message; the
    // API takes none (RFC 9110 15.5.16: 415, naming what it takes).
    let codings = headers.get_all(header::CONTENT_ENCODING).iter();
    let coded = codings
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|c| c.trim_ascii())
        .find(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"));
    if let Some(coding) = coded {
        let mut p = Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported Content Coding",
            format!(
                "Content-Encoding {:?}: the API takes bodies without a content coding",
                String::from_utf8_lossy(coding)
            ),
        );
        p.field = Some(("accept-encoding", "identity"));
        return Err(p);
    }
    // A declared length past the limit is refused before any of the body is read (and
    // before a `100 Continue` invites it).
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    Ok(())
}

/// The answer to a body past `limit` bytes.
fn too_large(limit: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "Content Too Large",
        format!("the body exceeds {limit} bytes"),
    )
}

/// Reads a body of at most `limit` bytes (413) as well-formed JSON (400).
async fn read_json(body: Body, limit: usize) -> Result<Value, Problem> {
    // The whole body within a bound: a client that trickles it would hold a handler thread.
    let read = tokio::time::timeout(BODY_TIME, axum::body::to_bytes(body, limit));
    let bytes: Bytes = match read.await {
        Ok(Ok(bytes)) => bytes,
        // Past the limit (a chunked body, or one whose length was not declared)...
        Ok(Err(e)) if over_limit(&e) => return Err(too_large(limit)),
        // ... or not a body at all: bad chunked framing, or a client gone mid-body.
        Ok(Err(e)) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "Malformed Body",
                format!("the body could not be read: {e}"),
            ))
        }
        Err(_) => {
            return Err(Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "Request Timeout",
                format!("the body did not arrive within {} s", BODY_TIME.as_secs()),
            ))
        }
    };
    crate::json::parse(&bytes).map_err(|e| {
        let p = Problem::new(StatusCode::BAD_REQUEST, "Malformed JSON", e.to_string());
        match e {
            crate::json::JsonError::Duplicate { pointer } => p.at(pointer),
            crate::json::JsonError::Syntax(_) => p,
        }
    })
}

/// Whether reading a body failed for its size (`to_bytes`'s limit), not its framing.
fn over_limit(e: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

pub(crate) fn json_response(status: StatusCode, etag: Option<String>, body: Value) -> Response {
    let mut resp = (status, axum::Json(body)).into_response();
    if let Some(e) = etag.and_then(|e| HeaderValue::from_str(&e).ok()) {
        resp.headers_mut().insert(header::ETAG, e);
    }
    resp
}

/// The answer to a change of the whole config: the dry-run diff, or the new revision and
/// what changed (and, for a rollback, the revision rolled back to).
fn config_change_response(a: &Applied, rolled_back_to: Option<u64>) -> Response {
    if a.dry_run {
        return dry_run_response(a);
    }
    let mut body = json!({"revision": a.revision, "changes": a.changes});
    if let Some(n) = rolled_back_to {
        body["rolled_back_to"] = json!(n);
    }
    json_response(StatusCode::OK, Some(config_etag(a.revision)), body)
}

fn dry_run_response(a: &Applied) -> Response {
    json_response(
        StatusCode::OK,
        None,
        json!({"dry_run": true, "revision": a.revision, "would_be_revision": a.next, "changes": a.changes}),
    )
}

async fn status(State(admin): State<Arc<Admin>>) -> Response {
    let info = lock(&admin.runtime).clone();
    // Neither read waits for the store's lock (a write may hold it while etcd hangs): while a
    // change is being published, `published_revision` may already be its revision and
    // `revision` not yet, for that moment.
    let view = admin.view();
    let snap = admin.shared.load();
    let body = json!({
        "revision": view.revision,
        "published_revision": snap.revision,
        "uptime_seconds": admin.started.elapsed().as_secs(),
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        "workers": info.as_ref().map(|i| i.workers),
        "io_driver": info.as_ref().map(|i| i.driver.clone()),
        "listeners": info.as_ref().map(|i| i.listeners.iter().map(ToString::to_string).collect::<Vec<_>>()),
        "admin": info.as_ref().map(|i| i.admin.to_string()),
        "routes": snap.routes.len(),
        "upstreams": snap.upstreams.len(),
        "store": Admin::store_status(&view),
        "cluster": snap.cluster.as_ref().map(|c| {
            let (redis, live) = dataplane::policy::cluster::store_state();
            json!({
                "node_id": &*c.node_id,
                "redis": c.redis.as_ref().map(|_| redis),
                "live_nodes": live,
            })
        }),
    });
    json_response(StatusCode::OK, None, body)
}

/// Prometheus text format: per-worker counters summed at scrape time.
async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    let workers = lock(&admin.runtime)
        .as_ref()
        .map(|i| i.metrics.clone())
        .unwrap_or_default();
    let snap = admin.shared.load();
    let mut text = dataplane::metrics::render(&workers, snap.revision);
    admin.upstreams.render_metrics(&mut text);
    render_certificates(&mut text, &snap.certificates);
    let mut resp = (StatusCode::OK, text).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// Each certificate's expiry, for alerts before it lapses.
fn render_certificates(out: &mut String, certs: &[Arc<common::tls::Certificate>]) {
    use std::fmt::Write as _;
    if certs.is_empty() {
        return;
    }
    out.push_str(
        "# HELP gateway_certificate_not_after_seconds When each certificate expires (Unix time).\n",
    );
    out.push_str("# TYPE gateway_certificate_not_after_seconds gauge\n");
    for c in certs {
        let _ = writeln!(
            out,
            "gateway_certificate_not_after_seconds{{certificate=\"{}\"}} {}",
            c.id, c.not_after
        );
    }
}

/// `GET /v1/upstreams/{id}/health`: each target's address, state, last active check and
/// counters.
async fn upstream_health(
    State(admin): State<Arc<Admin>>,
    Path((kind, id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    if kind != "upstreams" {
        return Err(Problem::not_found("no such endpoint".into()));
    }
    match admin.upstreams.health(&id) {
        Some(body) => Ok(json_response(StatusCode::OK, None, body)),
        None => Err(Problem::not_found(format!("no upstream {id:?}"))),
    }
}

async fn get_config(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Response {
    let view = admin.view();
    let etag = config_etag(view.revision);
    Preconditions::from(&headers).answer_read(etag, |etag| {
        json_response(StatusCode::OK, Some(etag), to_value(&view.config))
    })
}

async fn put_config(
    State(admin): State<Arc<Admin>>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let dry_run = WriteQuery { raw }.dry_run()?;
    let pre = Preconditions::from(&headers);
    refuse_by_head(&headers, false, MAX_CONFIG_BODY)?;
    admin.precheck(|view| pre.check(Some(&config_etag(view.revision))))?;
    let value = read_json(body, MAX_CONFIG_BODY).await?;
    let config = typed_config(value)?;
    let applied = admin.apply(dry_run, "api: PUT /v1/config", |store| {
        pre.check(Some(&config_etag(store.revision())))?;
        Ok(config.clone())
    })?;
    Ok(config_change_response(&applied, None))
}

async fn list_items(
    State(admin): State<Arc<Admin>>,
    Path(kind): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let kind = Kind::parse(&kind)?;
    let view = admin.view();
    let etag = config_etag(view.revision);
    Ok(Preconditions::from(&headers).answer_read(etag, |etag| {
        let items = kind.list(&view.config);
        json_response(
            StatusCode::OK,
            Some(etag),
            json!({"revision": view.revision, "items": items}),
        )
    }))
}

fn current_item_etag(store: &Store, kind: Kind, id: &str) -> Option<String> {
    kind.get(store.config(), id)?;
    let rev = store
        .item_revision(kind.name(), id)
        .unwrap_or(store.revision());
    Some(item_etag(kind, id, rev))
}

async fn get_item(
    State(admin): State<Arc<Admin>>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let kind = Kind::parse(&kind)?;
    let view = admin.view();
    let pre = Preconditions::from(&headers);
    let Some(value) = kind.get(&view.config, &id) else {
        // Without its preconditions the answer is a 404, so they are ignored (RFC 9110
        // 13.2.1).
        return Err(Problem::not_found(format!(
            "no {} item {id:?}",
            kind.name()
        )));
    };
    let rev = view.item_revision(kind, &id);
    let etag = item_etag(kind, &id, rev);
    Ok(pre.answer_read(etag, |etag| {
        let mut resp = json_response(StatusCode::OK, Some(etag), value);
        if let Ok(v) = HeaderValue::from_str(&rev.to_string()) {
            resp.headers_mut().insert("revision", v);
        }
        resp
    }))
}

/// Shared by PUT and PATCH of one item.
async fn write_item(
    admin: &Admin,
    kind: Kind,
    id: &str,
    q: &WriteQuery,
    headers: &HeaderMap,
    body: Body,
    method: Method,
) -> Result<Response, Problem> {
    let dry_run = q.dry_run()?;
    let pre = Preconditions::from(headers);
    let patch = method == Method::PATCH;
    refuse_by_head(headers, patch, MAX_BODY)?;
    admin.precheck(|view| {
        let etag =
            (kind.get(&view.config, id)).map(|_| item_etag(kind, id, view.item_revision(kind, id)));
        // As below: a patch of a missing item is a 404 whatever its preconditions.
        match patch && etag.is_none() {
            true => Ok(()),
            false => pre.check(etag.as_deref()),
        }
    })?;
    let input = read_json(body, MAX_BODY).await?;
    let mut created = false;
    let (applied, (etag, value)) = admin
        .apply_then(
            dry_run,
            &format!("api: {method} /v1/{}/{id}", kind.name()),
            |store| {
                let etag = current_item_etag(store, kind, id);
                // A patch of a missing item is a 404 whatever its preconditions (RFC 9110
                // 13.2.1: they are ignored where the answer without them is not a 2xx); a
                // PUT would create it, so they decide (`If-Match` on nothing fails).
                if !(patch && etag.is_none()) {
                    pre.check(etag.as_deref())?;
                }
                let mut next = store.config().clone();
                let value = if patch {
                    let Some(current) = kind.get(&next, id) else {
                        return Err(Problem::not_found(format!(
                            "no {} item {id:?} to patch",
                            kind.name()
                        )));
                    };
                    patched(kind, id, current, &input)?
                } else {
                    input.clone()
                };
                created = kind.put(&mut next, id, value).map_err(|mut p| {
                    // A patch whose result has a field its kind does not take is a patch
                    // that cannot be applied (RFC 5789 §2.2), not a malformed request.
                    if patch && p.status == StatusCode::BAD_REQUEST {
                        p.status = StatusCode::UNPROCESSABLE_ENTITY;
                        p.title = "Invalid Value";
                    }
                    p
                })?;
                Ok(next)
            },
            |store| {
                let etag = current_item_etag(store, kind, id);
                (etag, kind.get(store.config(), id).unwrap_or(Value::Null))
            },
        )
        .map_err(|p| item_pointer(p, kind, id, admin))?;
    if applied.dry_run {
        return Ok(dry_run_response(&applied));
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut resp = json_response(status, etag, value);
    if created {
        if let Ok(v) = HeaderValue::from_str(&format!("/v1/{}/{id}", kind.name())) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
    }
    Ok(resp)
}

/// A validation error about the written item itself is reported relative to its body.
fn item_pointer(mut p: Problem, kind: Kind, id: &str, admin: &Admin) -> Problem {
    if let Some(ptr) = &p.pointer {
        let view = admin.view();
        let mut candidate_ids = kind.ids(&view.config);
        if !candidate_ids.iter().any(|x| x == id) {
            candidate_ids.push(id.to_owned());
        }
        if let Some(index) = candidate_ids.iter().position(|x| x == id) {
            let prefix = format!("/{}/{index}", kind.name());
            if let Some(rest) = ptr.strip_prefix(&prefix) {
                if rest.is_empty() || rest.starts_with('/') {
                    p.pointer = Some(rest.to_owned());
                }
            }
        }
    }
    p
}

/// `PUT` (upsert) and `PATCH` (merge patch) of one item.
async fn put_or_patch_item(
    State(admin): State<Arc<Admin>>,
    Path((kind, id)): Path<(String, String)>,
    method: Method,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let kind = Kind::parse(&kind)?;
    write_item(
        &admin,
        kind,
        &id,
        &WriteQuery { raw },
        &headers,
        body,
        method,
    )
    .await
}

async fn delete_item(
    State(admin): State<Arc<Admin>>,
    Path((kind, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let kind = Kind::parse(&kind)?;
    let dry_run = WriteQuery { raw }.dry_run()?;
    let pre = Preconditions::from(&headers);
    let applied = admin.apply(
        dry_run,
        &format!("api: DELETE /v1/{}/{id}", kind.name()),
        |store| {
            let etag = current_item_etag(store, kind, &id);
            if etag.is_none() {
                return Err(Problem::not_found(format!(
                    "no {} item {id:?}",
                    kind.name()
                )));
            }
            pre.check(etag.as_deref())?;
            let users = kind.referrers(store.config(), &id);
            if !users.is_empty() {
                return Err(Problem::new(
                    StatusCode::CONFLICT,
                    "Still Referenced",
                    format!("{}/{id} is used by {}", kind.name(), users.join(", ")),
                ));
            }
            let mut next = store.config().clone();
            kind.remove(&mut next, &id);
            Ok(next)
        },
    )?;
    if applied.dry_run {
        return Ok(dry_run_response(&applied));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Where a batch's items are, per kind: found once per kind and kept up to date as the
/// operations apply, so a batch of n operations takes time in n, not n² (each operation
/// searching its kind's list). A deleted item stays in place, marked, until [`finish`]
/// removes the marked ones (a put of its id after the delete adds a new one at the end, as
/// a delete and then a put one after the other do).
///
/// [`finish`]: BatchIndex::finish
#[derive(Default)]
struct BatchIndex {
    /// Per kind: each live item's position, and the list's length (marked items included).
    at: HashMap<&'static str, (HashMap<String, usize>, usize)>,
    dead: HashMap<&'static str, (Kind, HashSet<usize>)>,
}

impl BatchIndex {
    fn of(&mut self, kind: Kind, c: &Config) -> &mut (HashMap<String, usize>, usize) {
        self.at.entry(kind.name()).or_insert_with(|| {
            let ids = kind.ids(c);
            let len = ids.len();
            (
                ids.into_iter().enumerate().map(|(i, id)| (id, i)).collect(),
                len,
            )
        })
    }

    fn finish(self, c: &mut Config) {
        for (kind, dead) in self.dead.into_values() {
            kind.remove_at(c, &dead);
        }
    }
}

/// One operation of a batch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Operation {
    op: String,
    kind: String,
    id: String,
    #[serde(default)]
    value: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    operations: Vec<Operation>,
}

async fn batch(
    State(admin): State<Arc<Admin>>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let dry_run = WriteQuery { raw }.dry_run()?;
    let pre = Preconditions::from(&headers);
    refuse_by_head(&headers, false, MAX_CONFIG_BODY)?;
    admin.precheck(|view| pre.check(Some(&config_etag(view.revision))))?;
    let batch: Batch = typed(read_json(body, MAX_CONFIG_BODY).await?)?;
    let mut candidate = None;
    let applied = admin.apply(dry_run, "api: POST /v1/config:batch", |store| {
        pre.check(Some(&config_etag(store.revision())))?;
        let mut next = store.config().clone();
        let mut index = BatchIndex::default();
        for (i, op) in batch.operations.iter().cloned().enumerate() {
            // The batch itself is well-formed; a value that does not fit its kind (an unknown
            // field, a wrong type) is an operation that cannot be applied: 422.
            let at = |mut p: Problem| {
                if p.status == StatusCode::BAD_REQUEST {
                    p.status = StatusCode::UNPROCESSABLE_ENTITY;
                    p.title = "Invalid Value";
                }
                let ptr = match &p.pointer {
                    Some(inner) => format!("/operations/{i}/value{inner}"),
                    None => format!("/operations/{i}"),
                };
                p.at(ptr)
            };
            let kind = Kind::parse(&op.kind).map_err(|p| {
                at(Problem {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    ..p
                })
            })?;
            match op.op.as_str() {
                "put" => {
                    let value = op.value.ok_or_else(|| {
                        at(Problem::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid Value",
                            "put needs a value",
                        ))
                    })?;
                    let (positions, len) = index.of(kind, &next);
                    let found = positions.get(&op.id).copied();
                    kind.put_at(&mut next, found, &op.id, value).map_err(at)?;
                    if found.is_none() {
                        positions.insert(op.id.clone(), *len);
                        *len += 1;
                    }
                }
                "patch" => {
                    let patch = op.value.ok_or_else(|| {
                        at(Problem::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid Value",
                            "patch needs a value",
                        ))
                    })?;
                    let Some(&found) = index.of(kind, &next).0.get(&op.id) else {
                        return Err(at(Problem::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid Value",
                            format!("no {} item {:?} to patch", kind.name(), op.id),
                        )));
                    };
                    let current = kind.get_at(&next, found);
                    let value = patched(kind, &op.id, current, &patch).map_err(at)?;
                    kind.put_at(&mut next, Some(found), &op.id, value)
                        .map_err(at)?;
                }
                "delete" => {
                    let Some(found) = index.of(kind, &next).0.remove(&op.id) else {
                        return Err(at(Problem::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid Value",
                            format!("no {} item {:?} to delete", kind.name(), op.id),
                        )));
                    };
                    let dead = index
                        .dead
                        .entry(kind.name())
                        .or_insert_with(|| (kind, HashSet::new()));
                    dead.1.insert(found);
                }
                other => {
                    return Err(at(Problem::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid Value",
                        format!("op {other:?}: expected put, patch or delete"),
                    )))
                }
            }
        }
        index.finish(&mut next);
        candidate = Some(next.clone());
        Ok(next)
    });
    let applied = applied.map_err(|p| batch_pointer(p, &batch.operations, candidate.as_ref()))?;
    Ok(config_change_response(&applied, None))
}

/// A validation error about an item a batch wrote, pointed at that operation's value (as a
/// single write's error is pointed at its body), not at the config the batch made.
fn batch_pointer(mut p: Problem, ops: &[Operation], candidate: Option<&Config>) -> Problem {
    let (Some(ptr), Some(config)) = (p.pointer.as_deref(), candidate) else {
        return p;
    };
    // `/routes/17/upstream`: the kind, the item's index in the candidate, the rest.
    let mut parts = ptr.splitn(4, '/').skip(1);
    let (Some(kind), Some(index)) = (parts.next(), parts.next()) else {
        return p;
    };
    let (Ok(kind), Ok(index)) = (Kind::parse(kind), index.parse::<usize>()) else {
        return p;
    };
    let rest = parts.next().map(|r| format!("/{r}")).unwrap_or_default();
    let Some(id) = kind.ids(config).into_iter().nth(index) else {
        return p;
    };
    let wrote = |o: &Operation| o.kind == kind.name() && o.id == id && o.op != "delete";
    if let Some(i) = ops.iter().rposition(wrote) {
        p.pointer = Some(format!("/operations/{i}/value{rest}"));
    }
    p
}

async fn list_revisions(State(admin): State<Arc<Admin>>) -> Result<Response, Problem> {
    let mut store = admin.held();
    let list: Vec<Value> = store
        .revisions()
        .map_err(store_problem)?
        .into_iter()
        .map(|r| json!({"revision": r.revision, "created_ms": r.created_ms, "source": r.source}))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        None,
        json!({"current": store.revision(), "revisions": list}),
    ))
}

/// `GET /v1/nodes`: the gateway nodes sharing this config and the revision each serves. A
/// node on a local data directory is alone.
async fn nodes(State(admin): State<Arc<Admin>>) -> Result<Response, Problem> {
    let mut store = admin.held();
    let mut list = match &mut *store {
        Store::Local(_) => {
            let snap = admin.shared.load();
            let id = snap.cluster.as_ref().map_or("local", |c| &*c.node_id);
            vec![json!({
                "id": id,
                "applied_revision": snap.revision,
                "last_seen": crate::store::local::now_ms(),
            })]
        }
        Store::Etcd(e) => e.nodes().map_err(store_problem)?,
    };
    list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Ok(json_response(StatusCode::OK, None, json!({"nodes": list})))
}

/// A revision number as the API writes them: digits only (`u64`'s parser also takes a
/// leading `+`, which would make `/v1/revisions/+1` another name of revision 1).
fn parse_revision(s: &str) -> Result<u64, Problem> {
    s.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| s.parse().ok())
        .flatten()
        .ok_or_else(|| Problem::not_found(format!("{s:?} is not a revision number")))
}

async fn get_revision(
    State(admin): State<Arc<Admin>>,
    Path(rev): Path<String>,
) -> Result<Response, Problem> {
    if let Some(n) = rev.strip_suffix(":rollback") {
        // The rollback action exists for a kept revision; it is POSTed, not read.
        kept(&admin, parse_revision(n)?)?;
        return Err(wrong_method("POST"));
    }
    let n = parse_revision(&rev)?;
    let mut store = admin.held();
    match store.load_revision(n).map_err(store_problem)? {
        Some(r) => Ok(json_response(
            StatusCode::OK,
            None,
            json!({"revision": r.revision, "created_ms": r.created_ms, "source": r.source, "config": r.config}),
        )),
        None => Err(Problem::not_found(format!("revision {n} is not kept"))),
    }
}

/// Any other method on `/v1/revisions/{n}` or `{n}:rollback`.
async fn revision_other_method(
    State(admin): State<Arc<Admin>>,
    Path(rev): Path<String>,
) -> Problem {
    let (n, allow) = match rev.strip_suffix(":rollback") {
        Some(n) => (n, "POST"),
        None => (&rev[..], "GET, HEAD"),
    };
    match parse_revision(n).and_then(|n| kept(&admin, n)) {
        Ok(()) => wrong_method(allow),
        Err(p) => p,
    }
}

/// 404 unless revision `n` is kept: a revision that is not has no method to list.
fn kept(admin: &Admin, n: u64) -> Result<(), Problem> {
    match admin.held().load_revision(n).map_err(store_problem)? {
        Some(_) => Ok(()),
        None => Err(Problem::not_found(format!("revision {n} is not kept"))),
    }
}

/// 405 for a revision or its rollback asked with the other's method, `Allow` naming the
/// methods it takes (axum's own answer lists both, as they share one path template).
fn wrong_method(allow: &'static str) -> Problem {
    let mut p = Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method Not Allowed",
        format!("this endpoint takes {allow}; a rollback is POST /v1/revisions/{{n}}:rollback"),
    );
    p.field = Some(("allow", allow));
    p
}

/// `POST /v1/revisions/{n}:rollback`: makes revision n's config the next revision.
async fn rollback(
    State(admin): State<Arc<Admin>>,
    Path(rev): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let Some(n) = rev.strip_suffix(":rollback") else {
        // A revision is read, not POSTed to: its rollback is `{n}:rollback`.
        kept(&admin, parse_revision(&rev)?)?;
        return Err(wrong_method("GET, HEAD"));
    };
    let n = parse_revision(n)?;
    let dry_run = WriteQuery { raw }.dry_run()?;
    let old = admin
        .held()
        .load_revision(n)
        .map_err(store_problem)?
        .ok_or_else(|| Problem::not_found(format!("revision {n} is not kept")))?;
    // With If-Match (the config's ETag), a rollback does not overwrite a change made since.
    let pre = Preconditions::from(&headers);
    let applied = admin.apply(dry_run, &format!("rollback to {n}"), |store| {
        pre.check(Some(&config_etag(store.revision())))?;
        // What only a restart changes stays as the running gateway has it: a revision from
        // before a restart that changed them can still be rolled back to. Of the listeners
        // that is their addresses: each listener running now comes back as the revision had
        // it at its address (its policies, TLS, redirect change at runtime), or stays as it
        // is where the revision had none there.
        let now = store.config();
        let mut config = old.config.clone();
        config.workers = now.workers;
        config.admin.clone_from(&now.admin);
        // The n-th listener at an address is the revision's n-th there (several may share
        // port 0, each a free port of its own).
        let at = |a: &str| a.parse::<std::net::SocketAddr>().ok();
        let running = &now.listeners;
        config.listeners = (running.iter().enumerate())
            .map(|(i, l)| {
                let here = at(&l.address);
                let nth = running[..i]
                    .iter()
                    .filter(|e| at(&e.address) == here)
                    .count();
                let then = (old.config.listeners.iter())
                    .filter(|o| here.is_some() && at(&o.address) == here)
                    .nth(nth);
                then.unwrap_or(l).clone()
            })
            .collect();
        Ok(config)
    })?;
    Ok(config_change_response(&applied, Some(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bearer_token_is_read_as_rfc_9110_writes_it() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }

    #[test]
    fn openapi_document_lists_exactly_the_endpoints() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"], json!("3.0.3"));
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in ["get", "put", "post", "patch", "delete"] {
                if item.get(method).is_some() {
                    documented.push((method.to_uppercase(), path.clone()));
                }
            }
        }
        let mut served: Vec<(String, String)> = ENDPOINTS
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
        // Every endpoint but health requires the bearer scheme.
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            json!("bearer")
        );
        assert_eq!(doc["security"], json!([{"bearer": []}]));
        assert_eq!(doc["paths"]["/v1/health"]["get"]["security"], json!([]));
        // Every operation documents the 401 it answers without a token.
        for (method, path) in ENDPOINTS.iter().filter(|(_, p)| *p != "/v1/health") {
            let op = &doc["paths"][*path][method.to_lowercase()];
            assert!(
                op["responses"]["401"].is_object(),
                "{method} {path} lacks a 401"
            );
        }
    }

    #[test]
    fn openapi_one_of_never_lists_a_schema_and_its_patch() {
        // Every item valid as `X` is valid as `XPatch` too, so `oneOf` (exactly one) refused
        // every batch operation with a `value` (before: all of them but the policies').
        fn walk(v: &Value, at: &str, bad: &mut Vec<String>) {
            match v {
                Value::Object(o) => {
                    if let Some(Value::Array(alts)) = o.get("oneOf") {
                        let refs: Vec<&str> =
                            alts.iter().filter_map(|a| a["$ref"].as_str()).collect();
                        if refs.iter().any(|r| refs.contains(&&*format!("{r}Patch"))) {
                            bad.push(at.to_owned());
                        }
                    }
                    for (k, v) in o {
                        walk(v, &format!("{at}/{k}"), bad);
                    }
                }
                Value::Array(a) => {
                    for (i, v) in a.iter().enumerate() {
                        walk(v, &format!("{at}/{i}"), bad);
                    }
                }
                _ => {}
            }
        }
        let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        let mut bad = Vec::new();
        walk(&doc, "", &mut bad);
        assert!(bad.is_empty(), "oneOf a schema and its patch at {bad:?}");
        let batch = &doc["components"]["schemas"]["RouteOperation"]["properties"]["value"];
        assert!(batch["anyOf"].is_array(), "{batch}");
    }

    #[test]
    fn pointers() {
        assert_eq!(
            path_to_pointer("routes[2].targets[0].weight"),
            "/routes/2/targets/0/weight"
        );
        assert_eq!(path_to_pointer("."), "");
        // Map keys as written: whatever does not read as an index is a step, no panic.
        for (path, pointer) in [
            (
                "routes[0].request_headers.set.a[0]]",
                "/routes/0/request_headers/set/a/0/]",
            ),
            ("set.a[0]é]", "/set/a/0/é]"),
            ("set.a[", "/set/a/["),
            ("set.]x[", "/set/]x/["),
            ("set.[1]", "/set/1"),
        ] {
            assert_eq!(path_to_pointer(path), pointer, "{path}");
        }
        assert_eq!(
            path_to_pointer("limits.max_uri_bytes"),
            "/limits/max_uri_bytes"
        );
    }

    #[test]
    fn merge_patch_rfc7396_examples() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
        let mut t = json!({"a": ["b"]});
        merge_patch(&mut t, &json!({"a": "c"}));
        assert_eq!(t, json!({"a": "c"}));
        let mut t = json!({"a": "foo"});
        merge_patch(&mut t, &json!(null));
        assert_eq!(t, json!(null));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret-token-123", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-12", b"secret-token-123"));
        assert!(!constant_time_eq(b"", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-124", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-1234", b"secret-token-123"));
    }
}
