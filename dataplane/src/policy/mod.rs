//! Traffic policies on the request path: IP filter, domain allowlist and CORS,
//! authentication (API key, JWT), authorization (ACL) and rate limiting, run in that fixed
//! order: the listener's policies, then the route's compiled list (global ones included,
//! sorted by [`common::policy::Stage`]), then the authenticated consumer's rate limits.
//!
//! Hot path for requests that have policies; the others skip this module entirely.
//! [`check`] reads the request head in place and writes only into the connection's reused
//! [`PolicyState`]: either a complete refusal (403, 421, 401, 429, or a CORS preflight
//! answer) or what the forwarded request must gain and lose (the consumer header, the
//! credential). IP, API-key and rate-limit checks allocate nothing once warm; a JWT is
//! decoded and parsed (see [`jwt`]); a rate-limit key seen for the first time inserts one map
//! entry.

pub mod cluster;
pub mod jwt;
pub mod ratelimit;

use std::io::Write;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use common::policy::{ApiKey, Cors, Policies, PolicyKind, RateKey, RateLimit, Stage};
use common::router::{normalize_host, MAX_HOST_LEN};
use common::{Route, Snapshot};

use crate::codec::request::RequestHead;
use crate::codec::{same_field_name, Span};
use ratelimit::{key_of, Limiter, Registry};

/// Per-connection scratch the policies write into; reused from request to request.
#[derive(Debug, Default)]
pub struct PolicyState {
    /// A refusal or preflight answer: the head without its blank line, then the body.
    pub out: Vec<u8>,
    pub out_head_len: usize,
    /// Field lines to add to the forwarded request (each with its CRLF).
    pub extra: Vec<u8>,
    /// Field lines of the request not to forward, in buffer order.
    pub drops: Vec<Span>,
    /// Query parameters not to forward (API keys), their pairs' spans in buffer order (once
    /// the authentication group has decided).
    pub query_drops: Vec<Span>,
    /// Field lines to add to the response (CORS, a rate limit's `headers_on_success`), each
    /// with its CRLF.
    pub response_extra: Vec<u8>,
    /// Where in `response_extra` the admitted rate limits' fields start, if one wrote them:
    /// a later limit's refusal leaves them out (its `X-RateLimit-*` would otherwise stand
    /// beside another limit's remaining count).
    pub rate_fields_at: Option<usize>,
    /// A cors policy ran for the request: the upstream's own `Access-Control-*` fields are
    /// dropped from the answer (the gateway's, if any, replace them).
    pub cors_ran: bool,
    /// A rate limit refused the request: its answer's fields are the limit's alone (a
    /// route's `response_headers` set none of [`RATE_LIMIT_FIELDS`] on it).
    pub rate_refused: bool,
    /// The consumer an authentication policy identified (index into the snapshot's
    /// consumers).
    pub consumer: Option<u32>,
    /// `extra` holds the forwarded `Host` (a route's `request_headers` sets it).
    pub sets_host: bool,
    /// A preflight asks about a method no route at its path takes: its cors policy refuses
    /// it whatever `methods` says (the real request would be a 404 without CORS fields).
    /// Set by the route lookup, before the policies run; `reset` leaves it.
    pub preflight_unrouted: bool,
    /// The rate limits that admitted the request so far (policy and bucket key; the first
    /// [`MAX_TAKEN`]): a later limit's refusal gives their requests back.
    taken: [(u16, Option<ratelimit::Key>); MAX_TAKEN],
    n_taken: usize,
    decode: Vec<u8>,
}

/// Rate limits whose admission a later one's refusal gives back (more on one request are
/// not: a fixed array keeps the state free of allocation).
const MAX_TAKEN: usize = 4;

impl PolicyState {
    /// Empty, with room for the fields the gateway adds to a request (`X-Request-Id`,
    /// `traceparent`, a few policy fields), so they do not grow the buffer field by field: a
    /// state lives for a connection, and for one request on an HTTP/2 stream.
    pub fn with_room() -> PolicyState {
        PolicyState {
            extra: Vec::with_capacity(256),
            ..PolicyState::default()
        }
    }

    /// Forgets the previous request's decisions.
    pub fn reset(&mut self) {
        self.out.clear();
        self.out_head_len = 0;
        self.extra.clear();
        self.drops.clear();
        self.query_drops.clear();
        self.response_extra.clear();
        self.rate_fields_at = None;
        self.cors_ran = false;
        self.rate_refused = false;
        self.sets_host = false;
        self.consumer = None;
        self.n_taken = 0;
    }

    /// Whether the query pair starting at `at` in the buffer is one not to forward.
    pub fn query_dropped(&self, at: usize) -> bool {
        span_starts_at(&self.query_drops, at)
    }
}

/// The fields a rate limit's answers carry (lower-case): on its refusal, a route's
/// `response_headers` set none of them beside its own.
pub const RATE_LIMIT_FIELDS: [&[u8]; 6] = [
    b"retry-after",
    b"ratelimit",
    b"ratelimit-policy",
    b"x-ratelimit-limit",
    b"x-ratelimit-remaining",
    b"x-ratelimit-reset",
];

/// `lines` (field lines, each `Name: value` and CRLF) without those whose name is one of
/// `names` (lower-case), in place.
pub fn drop_lines_named(lines: &mut Vec<u8>, names: &[&[u8]]) {
    let mut kept = Vec::with_capacity(lines.len());
    for line in lines.split_inclusive(|&b| b == b'\n') {
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        if !names.iter().any(|n| name.eq_ignore_ascii_case(n)) {
            kept.extend_from_slice(line);
        }
    }
    *lines = kept;
}

/// Whether one of `spans` (sorted by start, as [`add_drop`] and [`sort_and_merge`] keep them)
/// starts at `at`: a binary search, not a walk of them all.
pub fn span_starts_at(spans: &[Span], at: usize) -> bool {
    spans.binary_search_by_key(&at, |d| d.start).is_ok()
}

/// What the policies decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward the request, with the changes in the [`PolicyState`].
    Pass,
    /// Answer with `PolicyState::out` (status given for metrics).
    Answer(u16),
}

/// The rate-limit buckets a worker uses, resolved from the [`Registry`] once per snapshot.
#[derive(Debug, Default)]
pub struct Limiters {
    revision: u64,
    by_policy: Vec<Option<Arc<Limiter>>>,
}

impl Limiters {
    /// Resolves the limiters of `snap` if it is not the snapshot they were resolved for:
    /// those of policies it no longer has are let go (and freed once no worker holds them).
    pub(crate) fn refresh(&mut self, snap: &Snapshot) {
        if self.revision == snap.revision && self.by_policy.len() == snap.policies.list.len() {
            return;
        }
        // Build the new list before dropping the old one, so a limiter kept across the
        // change is still alive when the registry is asked for it.
        let fresh: Vec<Option<Arc<Limiter>>> = snap
            .policies
            .list
            .iter()
            .map(|p| match &p.kind {
                PolicyKind::RateLimit(rl) => Some(Registry::global().get(&p.id, rl)),
                _ => None,
            })
            .collect();
        self.by_policy = fresh;
        self.revision = snap.revision;
    }
}

/// The time the checks run at.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Monotonic nanoseconds (rate limits).
    pub mono_ns: u64,
    /// Seconds since the Unix epoch (JWT `exp` / `nbf`).
    pub unix_s: u64,
}

impl Clock {
    pub fn now() -> Clock {
        Clock {
            mono_ns: ratelimit::now_ns(),
            unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

/// One request field line.
#[derive(Debug, Clone, Copy)]
struct Field<'a> {
    line: Span,
    name: &'a [u8],
    value: &'a [u8],
}

/// The field lines of a parsed request head (the parser has already checked that every line
/// ends in CRLF and has a colon).
fn fields<'a>(buf: &'a [u8], head: &RequestHead) -> impl Iterator<Item = Field<'a>> + 'a {
    lines(buf, head.fields_start, head.fields_end)
}

/// The method a CORS preflight asks about (its first `Access-Control-Request-Method`, the
/// one the `cors` policy checks), if the request is one (it has an `Origin` too).
pub fn preflight_method<'a>(buf: &'a [u8], head: &RequestHead) -> Option<&'a [u8]> {
    let (mut origin, mut method) = (false, None);
    for f in fields(buf, head) {
        origin |= f.name.eq_ignore_ascii_case(b"origin");
        if f.name
            .eq_ignore_ascii_case(b"access-control-request-method")
        {
            method.get_or_insert(f.value);
        }
    }
    method.filter(|_| origin)
}

/// RFC 9110 7.6.2: an OPTIONS or TRACE request with `Max-Forwards: 0` is answered by the
/// gateway as its final recipient: `true`, with that answer (the head without its blank
/// line, then the body) in `state.out`. OPTIONS gets `allow`; TRACE the request as received
/// (`message/http`, RFC 9110 9.3.8) less what may be secret: cookies, credentials and the
/// fields the policies leave out (API keys). With a larger value the request goes on with
/// one less; without one, or with one that is not a number, as it is.
pub fn max_forwards(buf: &[u8], head: &RequestHead, allow: &[u8], state: &mut PolicyState) -> bool {
    let Some(value) = fields(buf, head)
        .find(|f| f.name.eq_ignore_ascii_case(b"max-forwards"))
        .map(|f| f.value)
        .filter(|v| !v.is_empty() && v.iter().all(u8::is_ascii_digit))
    else {
        return false;
    };
    let hops = std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    if hops > 0 {
        drop_named(
            buf,
            head.fields_start,
            head.fields_end,
            b"max-forwards",
            &mut state.drops,
        );
        state
            .extra
            .extend_from_slice(format!("Max-Forwards: {}\r\n", hops - 1).as_bytes());
        return false;
    }
    let out = &mut state.out;
    out.clear();
    if head.method.of(buf) == b"TRACE" {
        let mut echo = buf[head.start..head.fields_start].to_vec();
        for f in fields(buf, head) {
            let secret = [&b"cookie"[..], b"authorization", b"proxy-authorization"]
                .iter()
                .any(|n| f.name.eq_ignore_ascii_case(n))
                || state
                    .drops
                    .iter()
                    .any(|d| d.start <= f.line.start && f.line.end <= d.end);
            if !secret {
                echo.extend_from_slice(f.line.of(buf));
            }
        }
        echo.extend_from_slice(b"\r\n");
        out.extend_from_slice(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: message/http\r\nContent-Length: {}\r\n",
                echo.len()
            )
            .as_bytes(),
        );
        state.out_head_len = out.len();
        out.extend_from_slice(&echo);
    } else {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\nAllow: ");
        out.extend_from_slice(allow);
        out.extend_from_slice(b"\r\nContent-Length: 0\r\n");
        state.out_head_len = out.len();
    }
    true
}

/// Removes from a relayed response every `Access-Control-*` field line, which the gateway's
/// own CORS fields replace. (`Vary` stays: the gateway adds `Vary: Origin` beside it.)
pub fn drop_cors_fields(buf: &[u8], start: usize, end: usize, drops: &mut Vec<Span>) {
    for f in lines(buf, start, end) {
        if f.name.len() > 15 && f.name[..15].eq_ignore_ascii_case(b"access-control-") {
            add_drop(drops, f.line);
        }
    }
}

/// Leaves `field` (a field the parser noted, named `name`) out of a head whose field lines
/// span `fields`; every line of that name when it was repeated.
pub fn drop_field(
    buf: &[u8],
    field: Option<crate::codec::FieldRef>,
    fields: (usize, usize),
    name: &[u8],
    drops: &mut Vec<Span>,
) {
    if let Some(f) = field {
        add_drop(drops, f.line);
        if f.repeated {
            drop_named(buf, fields.0, fields.1, name, drops);
        }
    }
}

/// Removes from a head every field line named `name` between `start` and `end`, in any case
/// and with `_` for `-` ([`same_field_name`]): CGI-style servers read `X_Env` as `X-Env`,
/// so a copy so spelled would reach them beside the value the gateway sets.
pub fn drop_named(buf: &[u8], start: usize, end: usize, name: &[u8], drops: &mut Vec<Span>) {
    for f in lines(buf, start, end) {
        if same_field_name(f.name, name) {
            add_drop(drops, f.line);
        }
    }
}

/// Every field line between `start` and `end` as (line span, name, trimmed value).
pub fn each_field(
    buf: &[u8],
    start: usize,
    end: usize,
) -> impl Iterator<Item = (Span, &[u8], &[u8])> + '_ {
    lines(buf, start, end).map(|f| (f.line, f.name, f.value))
}

/// The value of the first field named `name` (case-insensitively) between `start` and `end`.
pub fn field_value<'a>(buf: &'a [u8], start: usize, end: usize, name: &[u8]) -> Option<&'a [u8]> {
    lines(buf, start, end)
        .find(|f| f.name.eq_ignore_ascii_case(name))
        .map(|f| f.value)
}

fn lines(buf: &[u8], start: usize, end: usize) -> impl Iterator<Item = Field<'_>> + '_ {
    let mut at = start;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let rest = &buf[at..end];
        let len = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |i| i + 1);
        let line = &rest[..len];
        let start = at;
        at += len;
        let colon = line.iter().position(|&b| b == b':')?;
        let value = trim(&line[colon + 1..]);
        Some(Field {
            line: Span {
                start,
                end: start + len,
            },
            name: &line[..colon],
            value,
        })
    })
}

fn trim(v: &[u8]) -> &[u8] {
    let s = v
        .iter()
        .position(|&b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .unwrap_or(v.len());
    let e = v
        .iter()
        .rposition(|&b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .map_or(s, |i| i + 1);
    &v[s..e]
}

/// The one field named `name`: `Err` when it appears more than once (ambiguous).
fn one_field<'a>(buf: &'a [u8], head: &RequestHead, name: &[u8]) -> Result<Option<Field<'a>>, ()> {
    let mut found = None;
    for f in fields(buf, head).filter(|f| f.name.eq_ignore_ascii_case(name)) {
        if found.is_some() {
            return Err(());
        }
        found = Some(f);
    }
    Ok(found)
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the rightmost
/// address in `X-Forwarded-For` (or, without one, `Forwarded: for=`) that is not itself a
/// trusted proxy. Walking from the right stops at anything unreadable, which leaves the last
/// address walked (never one the client could forge past a trusted hop).
pub fn client_ip(p: &Policies, buf: &[u8], head: &RequestHead, peer: IpAddr) -> IpAddr {
    let peer = canonical(peer);
    if p.trusted_proxies.is_empty() || !p.trusted_proxies.contains(peer) {
        return peer;
    }
    // The last hops only: a longer chain than this is treated as unreadable beyond it.
    const HOPS: usize = 32;
    let mut hops = [None::<IpAddr>; HOPS];
    let mut n = 0usize;
    let mut push = |ip: Option<IpAddr>| {
        hops[n % HOPS] = ip;
        n += 1;
    };
    // Only the one field the trusted proxies are configured to write: were the other read
    // too, a client could supply it where the proxy never touches it.
    let xff = !p.client_ip_from_forwarded;
    for f in fields(buf, head) {
        if xff && f.name.eq_ignore_ascii_case(b"x-forwarded-for") {
            // Empty list elements are ignored (RFC 9110 5.6.1): `10.1.1.1,` names one hop.
            for item in f
                .value
                .split(|&b| b == b',')
                .map(trim)
                .filter(|i| !i.is_empty())
            {
                // Some proxies add the port: `192.0.2.1:4711`, `[2001:db8::1]:443`.
                push(parse_ip(item).or_else(|| forwarded_for(item)));
            }
        } else if !xff && f.name.eq_ignore_ascii_case(b"forwarded") {
            for element in f
                .value
                .split(|&b| b == b',')
                .filter(|e| !trim(e).is_empty())
            {
                push(forwarded_param(element, b"for=").and_then(forwarded_for));
            }
        }
    }
    let mut client = peer;
    for i in (n.saturating_sub(HOPS)..n).rev() {
        match hops[i % HOPS] {
            Some(ip) => {
                client = ip;
                if !p.trusted_proxies.contains(ip) {
                    break;
                }
            }
            None => break,
        }
    }
    client
}

/// The scheme the client used, as the trusted proxy in front of the gateway says (`true`:
/// `https`), with `trust_forwarded_proto`: the last value of the one field the proxies
/// write, `X-Forwarded-Proto` or (with `client_ip_header = "forwarded"`) the last
/// `Forwarded` element's `proto=`. `None` without it, when the peer is not in
/// `trusted_proxies`, or when the value is neither `http` nor `https`.
pub fn forwarded_https(
    p: &Policies,
    buf: &[u8],
    plan: &crate::codec::FieldPlan,
    peer: IpAddr,
) -> Option<bool> {
    if !p.trust_forwarded_proto || !p.trusted_proxies.contains(canonical(peer)) {
        return None;
    }
    let proto = match p.client_ip_from_forwarded {
        false => last_element(plan.xfp?.of(buf))?,
        true => forwarded_param(last_element(plan.forwarded.last()?.of(buf))?, b"proto=")?,
    };
    let proto = unquote(trim(proto));
    if proto.eq_ignore_ascii_case(b"https") {
        Some(true)
    } else if proto.eq_ignore_ascii_case(b"http") {
        Some(false)
    } else {
        None
    }
}

/// A field's last list element that is not empty (RFC 9110 5.6.1: `https,` says https).
fn last_element(v: &[u8]) -> Option<&[u8]> {
    v.rsplit(|&b| b == b',').find(|e| !trim(e).is_empty())
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn parse_ip(s: &[u8]) -> Option<IpAddr> {
    std::str::from_utf8(s).ok()?.parse().ok().map(canonical)
}

/// The value of the first `name` parameter (`name` with its `=`, e.g. `b"for="`, in any
/// case) of one `Forwarded` element (`for=192.0.2.1;proto=https`), as written.
fn forwarded_param<'a>(element: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    element
        .split(|&b| b == b';')
        .map(trim)
        .find(|pair| pair.len() > name.len() && pair[..name.len()].eq_ignore_ascii_case(name))
        .map(|pair| &pair[name.len()..])
}

/// `v` without the double quotes around it, if it has them.
fn unquote(v: &[u8]) -> &[u8] {
    v.strip_prefix(b"\"")
        .and_then(|x| x.strip_suffix(b"\""))
        .unwrap_or(v)
}

/// A `Forwarded` `for=` value: `192.0.2.1`, `"192.0.2.1:80"`, `"[2001:db8::1]:443"`.
fn forwarded_for(v: &[u8]) -> Option<IpAddr> {
    let v = unquote(v);
    if let Some(rest) = v.strip_prefix(b"[") {
        let end = rest.iter().position(|&b| b == b']')?;
        let ip: Ipv6Addr = std::str::from_utf8(&rest[..end]).ok()?.parse().ok()?;
        return Some(canonical(IpAddr::V6(ip)));
    }
    let host = match v.iter().position(|&b| b == b':') {
        Some(i) => &v[..i],
        None => v,
    };
    parse_ip(host)
}

/// Runs the listener's policies, then `route`'s (and, once authenticated, the consumer's)
/// over the request from `client` (the address [`client_ip`] found). Without a route (no match), the listener's and the global IP filter and
/// domain policies still run, so that an unknown host gets its 421 rather than a 404.
#[allow(clippy::too_many_arguments)]
pub fn check(
    snap: &Snapshot,
    route: Option<&Route>,
    listener: u16,
    buf: &[u8],
    head: &RequestHead,
    client: IpAddr,
    limiters: &mut Limiters,
    clock: Clock,
    st: &mut PolicyState,
) -> Verdict {
    st.reset();
    let p = &snap.policies;
    let on_listener = p
        .listeners
        .get(listener as usize)
        .map_or(&[][..], |l| &l[..]);
    for &idx in on_listener {
        if let Some(v) = screen(p, idx, client, buf, head, st) {
            return v;
        }
    }
    let Some(route) = route else {
        for &idx in p.global_unrouted.iter() {
            if let Some(v) = screen(p, idx, client, buf, head, st) {
                return v;
            }
        }
        return Verdict::Pass;
    };
    let list = &route.policies;
    let mut consumer: Option<u32> = None;
    let mut i = 0;
    while i < list.len() {
        let policy = &p.list[list[i] as usize];
        match &policy.kind {
            PolicyKind::IpFilter { .. } | PolicyKind::Domain(_) => {
                if let Some(v) = screen(p, list[i], client, buf, head, st) {
                    return v;
                }
            }
            PolicyKind::Cors(c) => {
                if let Some(v) = cors(c, &policy.id, buf, head, st) {
                    return v;
                }
            }
            PolicyKind::ApiKey(_) | PolicyKind::Jwt(_) => {
                // Authentication policies form one group: the first whose credential is
                // present decides; none present is a 401.
                let start = i;
                while i + 1 < list.len()
                    && p.list[list[i + 1] as usize].stage == Stage::Authentication
                {
                    i += 1;
                }
                match authenticate(p, &list[start..=i], buf, head, clock, st) {
                    Ok(c) => {
                        consumer = Some(c);
                        st.consumer = consumer;
                        sort_and_merge(&mut st.query_drops);
                    }
                    Err(v) => return v,
                }
            }
            PolicyKind::Acl { consumers, groups } => {
                let Some(c) = consumer else {
                    return refuse(st, 401, &policy.id, "authentication is required", &[]);
                };
                let who = &p.consumers[c as usize];
                let allowed =
                    consumers.contains(&c) || who.groups.iter().any(|g| groups.contains(g));
                if !allowed {
                    return refuse(
                        st,
                        403,
                        &policy.id,
                        "the consumer is not allowed on this route",
                        &[],
                    );
                }
            }
            PolicyKind::RateLimit(rl) => {
                if let Some(v) = rate_limit(
                    snap, list[i], rl, &policy.id, buf, head, client, consumer, limiters, clock, st,
                ) {
                    return v;
                }
            }
        }
        i += 1;
    }
    if let Some(c) = consumer {
        for &idx in p.consumers[c as usize].policies.iter() {
            if list.contains(&idx) {
                continue;
            }
            let policy = &p.list[idx as usize];
            if let PolicyKind::RateLimit(rl) = &policy.kind {
                if let Some(v) = rate_limit(
                    snap, idx, rl, &policy.id, buf, head, client, consumer, limiters, clock, st,
                ) {
                    return v;
                }
            }
        }
    }
    Verdict::Pass
}

/// An IP filter or domain policy: a refusal, or `None` to go on.
fn screen(
    p: &Policies,
    idx: u16,
    client: IpAddr,
    buf: &[u8],
    head: &RequestHead,
    st: &mut PolicyState,
) -> Option<Verdict> {
    let policy = &p.list[idx as usize];
    match &policy.kind {
        PolicyKind::IpFilter { allow, deny }
            if deny.contains(client) || (!allow.is_empty() && !allow.contains(client)) =>
        {
            return Some(refuse(
                st,
                403,
                &policy.id,
                "the client address is not allowed",
                &[],
            ));
        }
        PolicyKind::Domain(d) => {
            let mut lower = [0u8; MAX_HOST_LEN];
            let host = head
                .host
                .map(|h| h.of(buf))
                .and_then(|h| normalize_host(h, &mut lower));
            if !host.is_some_and(|h| d.allows(h)) {
                return Some(refuse(
                    st,
                    d.status,
                    &policy.id,
                    "the gateway does not serve this host",
                    &[],
                ));
            }
        }
        _ => {}
    }
    None
}

/// The origin (`scheme://authority`) of a `Referer` URL.
fn referer_origin(r: &[u8]) -> Option<&[u8]> {
    // A scheme at the start (RFC 3986 3.1), or the reference is relative, whatever `://` its
    // query holds (before, `/page?next=https://x` was read as the origin `/page?next=https://x`).
    let scheme_end = r.iter().position(|&b| b == b':')?;
    let scheme = &r[..scheme_end];
    let is_scheme = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && (scheme.iter()).all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !is_scheme || !r[scheme_end..].starts_with(b"://") {
        return None;
    }
    let rest = &r[scheme_end + 3..];
    let auth_end = rest
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    Some(&r[..scheme_end + 3 + auth_end])
}

fn cors(
    c: &Cors,
    id: &str,
    buf: &[u8],
    head: &RequestHead,
    st: &mut PolicyState,
) -> Option<Verdict> {
    st.cors_ran = true;
    let Ok(origin) = one_field(buf, head, b"origin") else {
        return Some(refuse(st, 403, id, "more than one Origin field", &[]));
    };
    let Some(origin) = origin.map(|f| f.value) else {
        if !c.any_origin || c.allow_credentials {
            // The answer would differ with an Origin: a shared cache must know (and the
            // upstream's own Access-Control-* fields are dropped, as with one).
            st.response_extra.extend_from_slice(b"Vary: Origin\r\n");
        }
        // A Referer with no origin to read (a relative or malformed one, which no browser
        // sends) counts as none.
        let referer = fields(buf, head)
            .find(|f| f.name.eq_ignore_ascii_case(b"referer"))
            .and_then(|r| referer_origin(r.value));
        return match referer {
            Some(o) if c.allows(o) => None,
            Some(_) => Some(refuse(
                st,
                403,
                id,
                "the referring page's origin is not allowed",
                &[],
            )),
            None if c.require_origin => Some(refuse(st, 403, id, "the request has no Origin", &[])),
            None => None,
        };
    };
    if !c.allows(origin) || origin.iter().any(|&b| !(0x21..0x7f).contains(&b)) {
        return Some(refuse(st, 403, id, "the origin is not allowed", &[]));
    }
    let method = head.method.of(buf);
    let requested = fields(buf, head).find(|f| {
        f.name
            .eq_ignore_ascii_case(b"access-control-request-method")
    });
    if method == b"OPTIONS" {
        if let Some(requested) = requested {
            // A preflight: answered here, never forwarded. GET, HEAD and POST are
            // CORS-safelisted: a browser never needs them listed (it asks for a preflight
            // for their headers).
            let asked_for = requested.value;
            if st.preflight_unrouted {
                return Some(refuse(
                    st,
                    403,
                    id,
                    "no route with CORS at this path takes the method",
                    &[],
                ));
            }
            if !c.any_method
                && !matches!(asked_for, b"GET" | b"HEAD" | b"POST")
                && !c.methods.iter().any(|m| &m[..] == asked_for)
            {
                return Some(refuse(
                    st,
                    403,
                    id,
                    "the method is not allowed for this origin",
                    &[],
                ));
            }
            let asked = fields(buf, head).filter(|f| {
                f.name
                    .eq_ignore_ascii_case(b"access-control-request-headers")
            });
            for f in asked {
                for name in f
                    .value
                    .split(|&b| b == b',')
                    .map(trim)
                    .filter(|n| !n.is_empty())
                {
                    if !c.any_header && !c.headers.iter().any(|h| h.eq_ignore_ascii_case(name)) {
                        return Some(refuse(
                            st,
                            403,
                            id,
                            "a requested header is not allowed for this origin",
                            &[],
                        ));
                    }
                }
            }
            // Beside the head, as for every answer: a route's `response_headers` that set
            // or remove `Vary` take nothing of `Vary: Origin`.
            allow_origin_fields(c, origin, &mut st.response_extra);
            let out = &mut st.out;
            out.clear();
            out.extend_from_slice(b"HTTP/1.1 204 No Content\r\n");
            out.extend_from_slice(b"Access-Control-Allow-Methods: ");
            out.extend_from_slice(&c.allow_methods);
            out.extend_from_slice(b"\r\n");
            if c.any_header {
                // The names asked for, as asked (a field value: no CR or LF in it).
                let mut first = true;
                for f in fields(buf, head).filter(|f| {
                    f.name
                        .eq_ignore_ascii_case(b"access-control-request-headers")
                }) {
                    let names = f.value.split(|&b| b == b',').map(trim);
                    for name in names.filter(|n| !n.is_empty()) {
                        out.extend_from_slice(match first {
                            true => b"Access-Control-Allow-Headers: ",
                            false => b", ",
                        });
                        out.extend_from_slice(name);
                        first = false;
                    }
                }
                if !first {
                    out.extend_from_slice(b"\r\n");
                }
            } else if !c.allow_headers.is_empty() {
                out.extend_from_slice(b"Access-Control-Allow-Headers: ");
                out.extend_from_slice(&c.allow_headers);
                out.extend_from_slice(b"\r\n");
            }
            let _ = write!(out, "Access-Control-Max-Age: {}\r\n", c.max_age_s);
            st.out_head_len = out.len();
            return Some(Verdict::Answer(204));
        }
    }
    let extra = &mut st.response_extra;
    allow_origin_fields(c, origin, extra);
    if !c.expose_headers.is_empty() {
        extra.extend_from_slice(b"Access-Control-Expose-Headers: ");
        extra.extend_from_slice(&c.expose_headers);
        extra.extend_from_slice(b"\r\n");
    }
    None
}

fn allow_origin_fields(c: &Cors, origin: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"Access-Control-Allow-Origin: ");
    if c.any_origin && !c.allow_credentials {
        out.extend_from_slice(b"*\r\n");
    } else {
        out.extend_from_slice(origin);
        out.extend_from_slice(b"\r\nVary: Origin\r\n");
    }
    if c.allow_credentials {
        out.extend_from_slice(b"Access-Control-Allow-Credentials: true\r\n");
    }
}

/// Appends `v` to `out` with each `%XX` escape decoded; a `%` that starts none is kept.
#[inline(never)]
fn pct_decode_into(v: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < v.len() {
        let escaped = (v[i] == b'%')
            .then(|| common::snapshot::unescape(*v.get(i + 1)?, *v.get(i + 2)?))
            .flatten();
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(v[i]);
                i += 1;
            }
        }
    }
}

/// Tries the authentication policies `group` in order; returns the consumer.
fn authenticate(
    p: &Policies,
    group: &[u16],
    buf: &[u8],
    head: &RequestHead,
    clock: Clock,
    st: &mut PolicyState,
) -> Result<u32, Verdict> {
    // Client-sent copies of any consumer header are never forwarded.
    for &idx in group {
        let Some(name) = p.list[idx as usize].kind.consumer_header() else {
            continue;
        };
        // `X-Consumer_Id` too: CGI-style upstreams read both spellings as one variable.
        for f in fields(buf, head).filter(|f| same_field_name(f.name, name)) {
            add_drop(&mut st.drops, f.line);
        }
    }
    for &idx in group {
        let policy = &p.list[idx as usize];
        match &policy.kind {
            PolicyKind::ApiKey(k) => {
                let mut presented: Option<&[u8]> = None;
                if let Some(h) = &k.header {
                    match one_field(buf, head, h) {
                        Err(()) => {
                            return Err(unauthorized(
                                st,
                                p,
                                group,
                                &policy.id,
                                "more than one API key field",
                            ))
                        }
                        // An empty value is no key (an SDK's unset variable), as in Kong:
                        // the query, or the route's other policies, may still have one.
                        Ok(Some(f)) if !f.value.is_empty() => presented = Some(f.value),
                        Ok(_) => {}
                    }
                }
                let mut from_query = false;
                if presented.is_none() {
                    if let Some(q) = &k.query {
                        let mut pairs = query_pairs(buf, head, q);
                        presented = pairs.next().map(|(v, _)| v);
                        if presented.is_some() && pairs.next().is_some() {
                            let why = "more than one API key query parameter";
                            return Err(unauthorized(st, p, group, &policy.id, why));
                        }
                        presented = presented.filter(|v| !v.is_empty());
                        from_query = true;
                    }
                }
                let Some(key) = presented else {
                    continue;
                };
                // A query value as clients send it: `%XX` escapes decoded (a base64 key's `/`,
                // `+` and `=` come as `%2F`, `%2B` and `%3D` from every form encoder). `+`
                // stays `+` (raw keys with one keep working), and so does a `%` that starts
                // no escape.
                let key = match from_query && key.contains(&b'%') {
                    true => {
                        st.decode.clear();
                        pct_decode_into(key, &mut st.decode);
                        &st.decode[..]
                    }
                    false => key,
                };
                let digest = common::policy::api_key_digest(key);
                // Only digests are compared, in constant time; a key itself never is.
                let Some(consumer) = p.api_keys.find(&digest) else {
                    return Err(unauthorized(
                        st,
                        p,
                        group,
                        &policy.id,
                        "the API key is not valid",
                    ));
                };
                if k.strip_credential {
                    // The key read, and every other place this policy could read one from
                    // (its field spelled with `_`, its query parameter next to a field's key):
                    // none that was not checked reaches the upstream.
                    strip_api_keys(k, buf, head, st);
                }
                strip_unchecked(p, group, idx, buf, head, st);
                consumer_field(st, &k.consumer_header, &p.consumers[consumer as usize].id);
                return Ok(consumer);
            }
            PolicyKind::Jwt(j) => {
                let auth = match one_field(buf, head, b"authorization") {
                    // A malformed request, not a missing credential (RFC 6750 3.1).
                    Err(()) => {
                        let challenge = b"WWW-Authenticate: Bearer realm=\"gateway\", \
                                          error=\"invalid_request\"\r\n";
                        let detail = "more than one Authorization field";
                        return Err(refuse(st, 400, &policy.id, detail, challenge));
                    }
                    Ok(a) => a,
                };
                let Some(auth) = auth else { continue };
                let v = auth.value;
                if v.len() < 7 || !v[..7].eq_ignore_ascii_case(b"bearer ") {
                    continue;
                }
                let token = trim(&v[7..]);
                let consumer = match jwt::verify(j, token, clock.unix_s, &mut st.decode) {
                    Ok(id) => match p.consumer_ids.get(id.as_str()) {
                        Some(&c) => c,
                        None => {
                            let why = "the token's consumer is unknown";
                            return Err(challenge(st, p, group, &policy.id, why, true));
                        }
                    },
                    Err(e) => return Err(challenge(st, p, group, &policy.id, e.reason(), true)),
                };
                if j.strip_credential {
                    add_drop(&mut st.drops, auth.line);
                }
                strip_unchecked(p, group, idx, buf, head, st);
                consumer_field(st, &j.consumer_header, &p.consumers[consumer as usize].id);
                return Ok(consumer);
            }
            _ => {}
        }
    }
    let id = &p.list[group[0] as usize].id;
    Err(unauthorized(st, p, group, id, "credentials are required"))
}

/// After the policy `decided` of `group` authenticated the request: the credentials the
/// group's other policies would have read, which nobody checked, are not forwarded either
/// where those policies strip theirs (an unverified bearer token next to a valid API key
/// must not reach an upstream that reads claims from it).
fn strip_unchecked(
    p: &Policies,
    group: &[u16],
    decided: u16,
    buf: &[u8],
    head: &RequestHead,
    st: &mut PolicyState,
) {
    for &idx in group.iter().filter(|&&i| i != decided) {
        match &p.list[idx as usize].kind {
            PolicyKind::ApiKey(k) if k.strip_credential => strip_api_keys(k, buf, head, st),
            PolicyKind::Jwt(j) if j.strip_credential => {
                for f in fields(buf, head).filter(|f| f.name.eq_ignore_ascii_case(b"authorization"))
                {
                    add_drop(&mut st.drops, f.line);
                }
            }
            _ => {}
        }
    }
}

/// Leaves out of the forwarded request every key `k` could read: its fields (however the
/// name is spelled, see [`same_field_name`]) and its query parameters.
fn strip_api_keys(k: &ApiKey, buf: &[u8], head: &RequestHead, st: &mut PolicyState) {
    if let Some(h) = &k.header {
        for f in fields(buf, head).filter(|f| same_field_name(f.name, h)) {
            add_drop(&mut st.drops, f.line);
        }
    }
    if let Some(q) = &k.query {
        // Sorted and merged once the group has decided ([`sort_and_merge`]): two policies'
        // pairs interleave, and inserting each in place would cost their number squared.
        st.query_drops
            .extend(query_pairs(buf, head, q).map(|(_, span)| span));
    }
}

/// A route's `request_headers` on the request the policies passed: the copies of the names
/// it sets or removes dropped, its lines added.
pub fn route_edits(
    h: &common::headers::RouteHeaders,
    buf: &[u8],
    head: &RequestHead,
    st: &mut PolicyState,
) {
    for name in h.request_drop.iter() {
        drop_named(buf, head.fields_start, head.fields_end, name, &mut st.drops);
    }
    st.extra.extend_from_slice(&h.request_lines);
    st.sets_host = h.sets_host;
}

fn consumer_field(st: &mut PolicyState, name: &[u8], id: &str) {
    st.extra.extend_from_slice(name);
    st.extra.extend_from_slice(b": ");
    st.extra.extend_from_slice(id.as_bytes());
    st.extra.extend_from_slice(b"\r\n");
}

/// Every pair of the request's query whose name is `name`, as any upstream may read it:
/// percent-encoded (`api%6Bey` is `apikey` to one that decodes names), in another case
/// (ASP.NET's names are case-insensitive), after a `;` (Rack 2, Go before 1.17 and Python
/// before 3.9.2 split on it too): its value and the pair's span in `buf` (`name=value`,
/// without a separator).
pub(crate) fn query_pairs<'a, 'n>(
    buf: &'a [u8],
    head: &RequestHead,
    name: &'n [u8],
) -> impl Iterator<Item = (&'a [u8], Span)> + use<'a, 'n> {
    let target = head.origin_target;
    let t = target.of(buf);
    let q = t.iter().position(|&b| b == b'?').map_or(t.len(), |q| q + 1);
    let mut at = q;
    t[q..]
        .split(|&b| is_query_separator(b))
        .filter_map(move |pair| {
            let start = target.start + at;
            at += pair.len() + 1;
            let (k, v) = match pair.iter().position(|&b| b == b'=') {
                Some(e) => (&pair[..e], &pair[e + 1..]),
                None => (pair, &pair[pair.len()..]),
            };
            query_name_is(k, name).then_some((
                v,
                Span {
                    start,
                    end: start + pair.len(),
                },
            ))
        })
}

/// Whether `b` ends a query pair for some upstream: `&`, or `;`.
pub(crate) fn is_query_separator(b: u8) -> bool {
    b == b'&' || b == b';'
}

/// Whether the raw query parameter name `raw` is `name`, as sent or percent-decoded, in any
/// case, or as PHP reads them both ([`php_name`]: `api.key` and `api_key` are one to PHP,
/// whichever of them `name` is).
pub(crate) fn query_name_is(raw: &[u8], name: &[u8]) -> bool {
    // Most names PHP reads as they are: no allocation.
    let php = php_name(name);
    let want = php.as_deref().unwrap_or(name);
    let is = |n: &[u8]| {
        n.eq_ignore_ascii_case(name)
            || php_name(n)
                .as_deref()
                .unwrap_or(n)
                .eq_ignore_ascii_case(want)
    };
    is(raw) || (raw.contains(&b'%') && crate::shape::pct_decode(raw).is_some_and(|d| is(&d)))
}

/// The name PHP gives a query parameter named `n` (`$_GET`'s key), where it is not `n`
/// itself: `+` read as a space (PHP decodes names as form fields), leading spaces dropped,
/// `.` and ` ` made `_`, and `[` too unless a `]` follows it, which makes the parameter an
/// array under the name before it (`api_key[]`). `None` for a name PHP leaves as it is (the
/// common case: no allocation).
fn php_name(n: &[u8]) -> Option<Vec<u8>> {
    if !n.iter().any(|b| matches!(b, b' ' | b'+' | b'.' | b'[')) {
        return None;
    }
    let n = &n[n.iter().position(|&b| b != b' ' && b != b'+')?..];
    let base = match n.iter().position(|&b| b == b'[') {
        Some(i) if n[i + 1..].contains(&b']') => &n[..i],
        _ => n,
    };
    let renamed: Vec<u8> = (base.iter())
        .map(|&b| match b {
            b' ' | b'+' | b'.' | b'[' => b'_',
            b => b,
        })
        .collect();
    (!renamed.is_empty()).then_some(renamed)
}

/// Adds `s` to `drops`, keeping it sorted, merged (spans that touch or overlap become one)
/// and free of overlaps. Spans mostly come in order (fields and query pairs are found from
/// the start): one of those costs a binary search and a push, so a request with many
/// dropped fields or pairs costs time in proportion to them, not to their square.
pub fn add_drop(drops: &mut Vec<Span>, s: Span) {
    let pos = drops.partition_point(|d| d.start < s.start);
    // Into the span before it if they touch, or the one that starts where it does; else a
    // span of its own.
    let at = match pos.checked_sub(1) {
        Some(before) if drops[before].end >= s.start => {
            drops[before].end = drops[before].end.max(s.end);
            before
        }
        _ if drops.get(pos).is_some_and(|d| d.start == s.start) => {
            drops[pos].end = drops[pos].end.max(s.end);
            pos
        }
        _ => {
            drops.insert(pos, s);
            pos
        }
    };
    // The spans after it that it now reaches join it.
    let end = drops[at].end;
    let reached = drops[at + 1..].partition_point(|d| d.start <= end);
    if reached > 0 {
        drops[at].end = end.max(drops[at + reached].end);
        drops.drain(at + 1..at + 1 + reached);
    }
}

/// Sorts `drops` by start and merges the spans that touch or overlap: what [`add_drop`]
/// keeps, for spans added in any order (in time proportional to n log n).
pub fn sort_and_merge(drops: &mut Vec<Span>) {
    drops.sort_unstable_by_key(|d| d.start);
    let mut kept = 0;
    for r in 1..drops.len() {
        if drops[r].start <= drops[kept].end {
            drops[kept].end = drops[kept].end.max(drops[r].end);
        } else {
            kept += 1;
            drops[kept] = drops[r];
        }
    }
    drops.truncate(kept + 1);
}

/// Gives back to the rate limits that admitted the request what they took: it goes nowhere
/// after all (another limit refused it, or its path is refused as ambiguous).
pub fn give_back(limiters: &Limiters, st: &mut PolicyState) {
    for &(taken, key) in &st.taken[..st.n_taken] {
        if let Some(l) = limiters
            .by_policy
            .get(taken as usize)
            .and_then(Option::as_ref)
        {
            l.give_back(key.as_ref());
        }
    }
    st.n_taken = 0;
}

#[allow(clippy::too_many_arguments)]
fn rate_limit(
    snap: &Snapshot,
    idx: u16,
    rl: &RateLimit,
    id: &str,
    buf: &[u8],
    head: &RequestHead,
    client: IpAddr,
    consumer: Option<u32>,
    limiters: &mut Limiters,
    clock: Clock,
    st: &mut PolicyState,
) -> Option<Verdict> {
    limiters.refresh(snap);
    let limiter = limiters.by_policy.get(idx as usize)?.as_ref()?;
    let ip_key = |ip: IpAddr| {
        let mut raw = [0u8; 17];
        raw[0] = b'i';
        raw[1..].copy_from_slice(&match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => {
                // One bucket per /64: a single host usually holds a whole /64 and could
                // otherwise take a fresh bucket per address.
                let mut o = v6.octets();
                o[8..].fill(0);
                o
            }
        });
        key_of(&raw)
    };
    let key = match &rl.key {
        RateKey::Route => None,
        RateKey::ClientIp => Some(ip_key(client)),
        RateKey::Consumer => Some(match consumer {
            Some(c) => {
                let mut raw = [0u8; 65];
                let cid = snap.policies.consumers[c as usize].id.as_bytes();
                raw[0] = b'c';
                raw[1..=cid.len()].copy_from_slice(cid);
                key_of(&raw[..=cid.len()])
            }
            None => ip_key(client),
        }),
        // Without the field (or with it empty), the client's address: one client that
        // leaves it out does not use up everyone else's bucket (as Kong falls back). No
        // field value can be an address key: those hold NUL bytes.
        RateKey::Header(name) => Some(
            match fields(buf, head).find(|f| f.name.eq_ignore_ascii_case(name)) {
                Some(f) if !f.value.is_empty() => key_of(f.value),
                _ => ip_key(client),
            },
        ),
    };
    let d = limiter.check(key.as_ref(), clock.mono_ns);
    if d.allowed {
        if let Some(remaining) = d.remaining.filter(|_| rl.headers_on_success) {
            st.rate_fields_at.get_or_insert(st.response_extra.len());
            admitted_fields(rl, id, remaining, d.reset_ns, &mut st.response_extra);
        }
        if let Some(slot) = st.taken.get_mut(st.n_taken) {
            *slot = (idx, key);
            st.n_taken += 1;
        }
        return None;
    }
    // The limits that admitted it before this one count it no more: it goes nowhere (before,
    // a client over its own limit used up a shared one for everyone).
    give_back(limiters, st);
    // The refusal carries this limit's fields only.
    if let Some(at) = st.rate_fields_at.take() {
        st.response_extra.truncate(at);
    }
    // The refusal's fields go with the policies' (CORS), which a route's `response_headers`
    // leave alone: a route cannot take `Retry-After` from its 429 or 503, nor add another.
    st.rate_refused = true;
    if d.unavailable {
        st.response_extra.extend_from_slice(b"Retry-After: 1\r\n");
        let why = "the cluster rate limit's store is unreachable";
        return Some(refuse(st, 503, id, why, &[]));
    }
    let retry_s = d.retry_after_ns.div_ceil(1_000_000_000).max(1);
    let reset_s = d.reset_ns.div_ceil(1_000_000_000).max(retry_s);
    let mut fields_buf = [0u8; 512];
    let mut w = &mut fields_buf[..];
    let _ = write!(w, "Retry-After: {retry_s}\r\nRateLimit-Policy: ");
    let _ = w.write_all(&rl.policy_field);
    let _ = write!(w, "\r\nRateLimit: \"{id}\";r=0;t={retry_s}\r\n");
    if rl.x_ratelimit_headers {
        let _ = write!(
            w,
            "X-RateLimit-Limit: {}\r\nX-RateLimit-Remaining: 0\r\nX-RateLimit-Reset: {reset_s}\r\n",
            rl.rate
        );
    }
    let used = 512 - w.len();
    st.response_extra.extend_from_slice(&fields_buf[..used]);
    Some(refuse(st, 429, id, "the rate limit is exceeded", &[]))
}

fn unauthorized(
    st: &mut PolicyState,
    p: &Policies,
    group: &[u16],
    id: &str,
    detail: &str,
) -> Verdict {
    challenge(st, p, group, id, detail, false)
}

/// The 401 with one challenge per scheme the route's policies take. `invalid_token`: a
/// bearer token was presented and refused, which the challenge says (RFC 6750 3.1,
/// `error="invalid_token"` and why): a client reads it to get a new token rather than ask
/// the user again.
fn challenge(
    st: &mut PolicyState,
    p: &Policies,
    group: &[u16],
    id: &str,
    detail: &str,
    invalid_token: bool,
) -> Verdict {
    // One challenge per scheme, however many policies of each kind the route has.
    let kinds = |f: fn(&PolicyKind) -> bool| group.iter().any(|&i| f(&p.list[i as usize].kind));
    let mut fields = [0u8; 256];
    let mut w = &mut fields[..];
    if kinds(|k| matches!(k, PolicyKind::Jwt(_))) {
        let _ = w.write_all(b"WWW-Authenticate: Bearer realm=\"gateway\"");
        if invalid_token {
            // `detail` is one of the gateway's own short texts: no quote or backslash.
            let _ = write!(
                w,
                ", error=\"invalid_token\", error_description=\"{detail}\""
            );
        }
        let _ = w.write_all(b"\r\n");
    }
    if kinds(|k| matches!(k, PolicyKind::ApiKey(_))) {
        let _ = w.write_all(b"WWW-Authenticate: ApiKey realm=\"gateway\"\r\n");
    }
    let used = 256 - w.len();
    refuse(st, 401, id, detail, &fields[..used])
}

/// The fields an admitted request's answer carries (`headers_on_success`): the policy, what
/// is left of it and the whole seconds until the bucket is full again (`t=0`: it is full).
fn admitted_fields(rl: &RateLimit, id: &str, remaining: u64, reset_ns: u64, out: &mut Vec<u8>) {
    let reset_s = reset_ns.div_ceil(1_000_000_000);
    out.extend_from_slice(b"RateLimit-Policy: ");
    out.extend_from_slice(&rl.policy_field);
    let _ = write!(out, "\r\nRateLimit: \"{id}\";r={remaining};t={reset_s}\r\n");
    if rl.x_ratelimit_headers {
        let _ = write!(
            out,
            "X-RateLimit-Limit: {}\r\nX-RateLimit-Remaining: {remaining}\r\n\
             X-RateLimit-Reset: {reset_s}\r\n",
            rl.rate
        );
    }
}

/// Writes a problem+json refusal (RFC 9457) into `st.out`.
fn refuse(st: &mut PolicyState, status: u16, policy: &str, detail: &str, extra: &[u8]) -> Verdict {
    let title = common::reason::phrase(status);
    let mut body = [0u8; 384];
    let mut w = &mut body[..];
    let _ = writeln!(
        w,
        "{{\"type\":\"about:blank\",\"title\":\"{title}\",\"status\":{status},\"detail\":\"{detail}\",\"policy\":\"{policy}\"}}"
    );
    let body_len = 384 - w.len();
    let out = &mut st.out;
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {status} {title}\r\nContent-Type: application/problem+json\r\nContent-Length: {body_len}\r\nCache-Control: no-store\r\n"
    );
    out.extend_from_slice(extra);
    // The cors policy's fields (a later policy's refusal of an allowed cross-origin call:
    // the page may read it) stay in `response_extra`, which goes out after the route's
    // `response_headers` have removed their names from this head.
    st.out_head_len = out.len();
    out.extend_from_slice(&body[..body_len]);
    Verdict::Answer(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_keys_have_their_escapes_decoded_and_nothing_else() {
        let decoded = |v: &[u8]| {
            let mut out = Vec::new();
            pct_decode_into(v, &mut out);
            out
        };
        assert_eq!(decoded(b"Zm9v%2FYmFy%2BcXV4%3D%3D"), b"Zm9v/YmFy+cXV4==");
        assert_eq!(decoded(b"Zm9v/YmFy+cXV4=="), b"Zm9v/YmFy+cXV4==");
        assert_eq!(decoded(b"100%"), b"100%");
        assert_eq!(decoded(b"a%zzb%4"), b"a%zzb%4");
        assert_eq!(decoded(b"%25%41"), b"%A");
    }

    #[test]
    fn a_query_key_name_is_matched_as_php_reads_it_too() {
        // PHP's $_GET['api_key'] is any of these; before, they passed unchecked (and
        // unstripped) beside the key the gateway checked.
        for raw in [
            &b"api_key"[..],
            b"API_KEY",
            b"api.key",
            b"api+key" as &[u8],
            b"api%20key",
            b"api%2Ekey",
            b"api[key",
            b"api_key[]",
            b"api_key[0]",
            b" api.key",
        ] {
            assert!(
                query_name_is(raw, b"api_key"),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        for raw in [
            &b"apikey"[..],
            b"api_key2",
            b"xapi_key",
            b"[api_key]",
            b"api",
        ] {
            assert!(
                !query_name_is(raw, b"api_key"),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        // A configured name PHP reads otherwise: `api.key` is `$_GET['api_key']` too (before,
        // `api_key=` went on unchecked beside a checked `api.key=`).
        for raw in [
            &b"api.key"[..],
            b"api_key",
            b"API_KEY",
            b"api key",
            b"api%5Fkey",
        ] {
            assert!(
                query_name_is(raw, b"api.key"),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        assert!(!query_name_is(b"apikey", b"api.key"));
    }

    #[test]
    fn drops_stay_sorted_and_merged() {
        let mut d = vec![Span { start: 10, end: 20 }, Span { start: 40, end: 50 }];
        add_drop(&mut d, Span { start: 30, end: 35 });
        add_drop(&mut d, Span { start: 20, end: 30 });
        add_drop(&mut d, Span { start: 40, end: 50 });
        assert_eq!(
            d,
            vec![Span { start: 10, end: 35 }, Span { start: 40, end: 50 }]
        );
        // One that reaches over several, and one inside another.
        add_drop(&mut d, Span { start: 60, end: 70 });
        add_drop(&mut d, Span { start: 5, end: 45 });
        add_drop(&mut d, Span { start: 62, end: 64 });
        assert_eq!(
            d,
            vec![Span { start: 5, end: 50 }, Span { start: 60, end: 70 }]
        );
    }

    #[test]
    fn drops_match_a_sort_and_merge_of_every_span_in_any_order() {
        // Spans of a small range in a scrambled order, against the plain answer.
        let mut x: u32 = 7;
        for _ in 0..200 {
            let (mut d, mut pushed) = (Vec::new(), Vec::new());
            let mut covered = [false; 64];
            for _ in 0..12 {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let start = (x >> 8) as usize % 60;
                let end = start + 1 + (x >> 20) as usize % 4;
                add_drop(&mut d, Span { start, end });
                pushed.push(Span { start, end });
                covered[start..end].iter_mut().for_each(|c| *c = true);
            }
            // The plain answer: maximal runs of covered bytes (touching spans join).
            let mut want = Vec::new();
            let mut i = 0;
            while i < 64 {
                if covered[i] {
                    let start = i;
                    while i < 64 && covered[i] {
                        i += 1;
                    }
                    want.push(Span { start, end: i });
                } else {
                    i += 1;
                }
            }
            assert_eq!(d, want);
            sort_and_merge(&mut pushed);
            assert_eq!(pushed, want);
        }
    }

    #[test]
    fn referer_origins() {
        assert_eq!(
            referer_origin(b"https://app.example/x?y"),
            Some(&b"https://app.example"[..])
        );
        assert_eq!(
            referer_origin(b"http://a:8080"),
            Some(&b"http://a:8080"[..])
        );
        assert_eq!(referer_origin(b"nonsense"), None);
        // Relative references, whatever their query or fragment holds.
        for relative in [
            &b"/page?next=https://app.example/"[..],
            b"page.html#https://x",
            b"//app.example/x",
            b"1http://a/",
        ] {
            assert_eq!(referer_origin(relative), None, "{relative:?}");
        }
    }

    #[test]
    fn forwarded_values() {
        assert_eq!(
            forwarded_for(b"192.0.2.60"),
            Some("192.0.2.60".parse().unwrap())
        );
        assert_eq!(
            forwarded_for(b"\"192.0.2.60:8080\""),
            Some("192.0.2.60".parse().unwrap())
        );
        assert_eq!(
            forwarded_for(b"\"[2001:db8::1]:4711\""),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(forwarded_for(b"unknown"), None);
        assert_eq!(forwarded_for(b"_hidden"), None);
    }

    // The checks in-process, from a TOML snapshot, without a socket.

    use common::{parse_config, Format};

    use crate::codec::request::parse_request;
    use crate::codec::FieldPlan;

    const BASE: &str = r#"
[[listeners]]
address = "127.0.0.1:0"
[[upstreams]]
id = "o"
targets = [{ address = "127.0.0.1:9" }]
[[consumers]]
id = "app"
groups = ["mobile"]
[[consumers]]
id = "ops"
[[credentials]]
id = "app-key"
consumer = "app"
kind = "api_key"
key = "app-secret-1"
[[credentials]]
id = "ops-key"
consumer = "ops"
kind = "api_key"
key = "ops-secret-1"
"#;

    fn snapshot(extra: &str) -> Snapshot {
        let text = format!("{BASE}{extra}");
        Snapshot::compile(parse_config(&text, Format::Toml).unwrap(), 1).unwrap()
    }

    /// Runs the policies of `route` over `request` from `client` at `now_s` seconds.
    fn run(
        snap: &Snapshot,
        route: &str,
        request: &[u8],
        client: &str,
        now_s: u64,
    ) -> (Verdict, PolicyState) {
        let limits = snap.limits;
        let mut plan = FieldPlan::default();
        let head = parse_request(request, &limits, &mut plan).unwrap().unwrap();
        let route = snap.routes.iter().find(|r| &*r.id == route).unwrap();
        let mut st = PolicyState::default();
        let clock = Clock {
            mono_ns: now_s * 1_000_000_000,
            unix_s: 1_800_000_000 + now_s,
        };
        let verdict = check(
            snap,
            Some(route),
            0,
            request,
            &head,
            client.parse().unwrap(),
            &mut Limiters::default(),
            clock,
            &mut st,
        );
        (verdict, st)
    }

    /// The policies' answer as it goes out: its head, then the policies' fields (which
    /// the connection writes after the route's edits of that head), then its body.
    fn answer(st: &PolicyState) -> String {
        let (head, body) = st.out.split_at(st.out_head_len.min(st.out.len()));
        let whole = [head, &st.response_extra, body].concat();
        String::from_utf8_lossy(&whole).into_owned()
    }

    /// Route `r` behind an API key read from `X-Api-Key`.
    const KEY_ROUTE: &str = r#"
[[policies]]
id = "unit-key"
kind = "api_key"
header = "X-Api-Key"
[[routes]]
id = "r"
path_prefix = "/"
upstream = "o"
policies = ["unit-key"]
"#;

    #[test]
    fn a_trace_echo_leaves_out_every_dropped_line_next_to_another() {
        // The key line and a forged consumer line side by side: their drops merge into one
        // span, and the echo left out only the line where it starts.
        let snap = snapshot(KEY_ROUTE);
        let req = b"TRACE /x HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\n\
                    X-Api-Key: app-secret-1\r\nX-Consumer-Id: forged\r\nX-Seen: yes\r\n\r\n";
        let (v, mut st) = run(&snap, "r", req, "127.0.0.1", 0);
        assert_eq!(v, Verdict::Pass);
        let mut plan = FieldPlan::default();
        let head = parse_request(req, &snap.limits, &mut plan)
            .unwrap()
            .unwrap();
        assert!(max_forwards(req, &head, b"GET", &mut st));
        let echo = answer(&st);
        assert!(
            echo.ends_with(
                "TRACE /x HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\nX-Seen: yes\r\n\r\n"
            ),
            "{echo}"
        );
    }

    #[test]
    fn an_api_key_identifies_the_consumer_and_is_not_forwarded() {
        let snap = snapshot(KEY_ROUTE);
        let req = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Api-Key: app-secret-1\r\nX-Consumer-Id: forged\r\n\r\n";
        let (v, st) = run(&snap, "r", req, "127.0.0.1", 0);
        assert_eq!(v, Verdict::Pass);
        assert_eq!(
            snap.policies.consumers[st.consumer.unwrap() as usize]
                .id
                .as_ref(),
            "app"
        );
        assert_eq!(st.extra, b"X-Consumer-Id: app\r\n");
        // The key line and the forged consumer line are both left out of the forwarded head.
        let dropped: Vec<&[u8]> = st.drops.iter().map(|d| d.of(req)).collect();
        assert_eq!(
            dropped,
            [&b"X-Api-Key: app-secret-1\r\nX-Consumer-Id: forged\r\n"[..]]
        );

        let (v, st) = run(
            &snap,
            "r",
            b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
            "127.0.0.1",
            0,
        );
        assert_eq!(v, Verdict::Answer(401));
        assert!(
            answer(&st).starts_with("HTTP/1.1 401 Unauthorized\r\n"),
            "{}",
            answer(&st)
        );
        let bad = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Api-Key: nope\r\n\r\n";
        assert_eq!(run(&snap, "r", bad, "127.0.0.1", 0).0, Verdict::Answer(401));
        assert_eq!(run(&snap, "r", bad, "127.0.0.1", 0).1.consumer, None);
    }

    #[test]
    fn acl_ip_filter_and_domain_refuse_with_their_status() {
        let snap = snapshot(
            r#"
[[policies]]
id = "unit-key2"
kind = "api_key"
[[policies]]
id = "mobile-only"
kind = "acl"
groups = ["mobile"]
[[policies]]
id = "tens"
kind = "ip_filter"
allow = ["10.0.0.0/8"]
deny = ["10.9.0.0/16"]
[[policies]]
id = "hosts"
kind = "domain"
hosts = ["api.example.com", "*.example.net"]
[[routes]]
id = "acl"
path = "/acl"
upstream = "o"
policies = ["unit-key2", "mobile-only"]
[[routes]]
id = "ip"
path = "/ip"
upstream = "o"
policies = ["tens"]
[[routes]]
id = "dom"
path = "/dom"
upstream = "o"
policies = ["hosts"]
"#,
        );
        let app = b"GET /acl HTTP/1.1\r\nHost: a\r\nX-Api-Key: app-secret-1\r\n\r\n";
        let ops = b"GET /acl HTTP/1.1\r\nHost: a\r\nX-Api-Key: ops-secret-1\r\n\r\n";
        assert_eq!(run(&snap, "acl", app, "127.0.0.1", 0).0, Verdict::Pass);
        let (v, st) = run(&snap, "acl", ops, "127.0.0.1", 0);
        assert_eq!(v, Verdict::Answer(403));
        assert!(
            answer(&st).contains("\"policy\":\"mobile-only\""),
            "{}",
            answer(&st)
        );

        let ip = b"GET /ip HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(run(&snap, "ip", ip, "10.1.2.3", 0).0, Verdict::Pass);
        assert_eq!(run(&snap, "ip", ip, "10.9.0.1", 0).0, Verdict::Answer(403));
        assert_eq!(run(&snap, "ip", ip, "192.0.2.1", 0).0, Verdict::Answer(403));

        let host = |h: &str| format!("GET /dom HTTP/1.1\r\nHost: {h}\r\n\r\n");
        assert_eq!(
            run(
                &snap,
                "dom",
                host("API.example.com:443").as_bytes(),
                "127.0.0.1",
                0
            )
            .0,
            Verdict::Pass
        );
        assert_eq!(
            run(
                &snap,
                "dom",
                host("x.example.net").as_bytes(),
                "127.0.0.1",
                0
            )
            .0,
            Verdict::Pass
        );
        assert_eq!(
            run(&snap, "dom", host("evil.test").as_bytes(), "127.0.0.1", 0).0,
            Verdict::Answer(421)
        );
    }

    #[test]
    fn a_rate_limit_refuses_past_its_burst_and_refills_on_the_fake_clock() {
        let snap = snapshot(
            r#"
[[policies]]
id = "unit-rate-limit"
kind = "rate_limit"
rate = 1
per = "second"
burst = 2
key = "client_ip"
[[routes]]
id = "r"
path_prefix = "/"
upstream = "o"
policies = ["unit-rate-limit"]
"#,
        );
        let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut limiters = Limiters::default();
        let mut go = |client: &str, now_s: u64| {
            let limits = snap.limits;
            let mut plan = FieldPlan::default();
            let head = parse_request(req, &limits, &mut plan).unwrap().unwrap();
            let mut st = PolicyState::default();
            let clock = Clock {
                mono_ns: 1_000_000_000_000 + now_s * 1_000_000_000,
                unix_s: now_s,
            };
            let v = check(
                &snap,
                Some(&snap.routes[0]),
                0,
                req,
                &head,
                client.parse().unwrap(),
                &mut limiters,
                clock,
                &mut st,
            );
            (v, answer(&st))
        };
        assert_eq!(go("192.0.2.1", 0).0, Verdict::Pass);
        assert_eq!(go("192.0.2.1", 0).0, Verdict::Pass);
        let (v, text) = go("192.0.2.1", 0);
        assert_eq!(v, Verdict::Answer(429));
        assert!(text.contains("Retry-After: 1\r\n"), "{text}");
        // Another client has its own bucket; a second later one token is back.
        assert_eq!(go("192.0.2.2", 0).0, Verdict::Pass);
        assert_eq!(go("192.0.2.1", 1).0, Verdict::Pass);
        assert_eq!(go("192.0.2.1", 1).0, Verdict::Answer(429));
    }

    #[test]
    fn a_refresh_lets_go_of_the_limiters_of_policies_the_config_dropped() {
        let with = snapshot(
            r#"
[[policies]]
id = "unit-dropped-limit"
kind = "rate_limit"
rate = 1
per = "hour"
"#,
        );
        let without = Snapshot::compile(parse_config(BASE, Format::Toml).unwrap(), 2).unwrap();
        let mut limiters = Limiters::default();
        limiters.refresh(&with);
        let held = limiters.by_policy.iter().flatten().next().unwrap();
        let weak = Arc::downgrade(held);
        limiters.refresh(&without);
        assert!(
            weak.upgrade().is_none(),
            "the dropped policy's buckets are freed"
        );
    }

    #[test]
    fn a_preflight_asks_about_its_first_request_method() {
        // The one the cors policy checks (before: routed by the last, checked by the first).
        let snap = snapshot("");
        let limits = snap.limits;
        let head_of = |req: &'static [u8]| {
            let mut plan = FieldPlan::default();
            parse_request(req, &limits, &mut plan).unwrap().unwrap()
        };
        let two: &[u8] = b"OPTIONS /x HTTP/1.1\r\nHost: a\r\nOrigin: https://a.test\r\n\
            Access-Control-Request-Method: GET\r\nAccess-Control-Request-Method: DELETE\r\n\r\n";
        assert_eq!(preflight_method(two, &head_of(two)), Some(&b"GET"[..]));
        let no_origin: &[u8] =
            b"OPTIONS /x HTTP/1.1\r\nHost: a\r\nAccess-Control-Request-Method: GET\r\n\r\n";
        assert_eq!(preflight_method(no_origin, &head_of(no_origin)), None);
    }

    #[test]
    fn a_trusted_proxys_word_for_the_scheme() {
        let snap = |top: &str| {
            let text = format!("trusted_proxies = [\"10.0.0.0/8\"]\n{top}{BASE}");
            Snapshot::compile(parse_config(&text, Format::Toml).unwrap(), 1).unwrap()
        };
        let said = |snap: &Snapshot, fields: &str, peer: &str| {
            let request = format!("GET / HTTP/1.1\r\nHost: a\r\n{fields}\r\n");
            let mut plan = FieldPlan::default();
            let limits = snap.limits;
            parse_request(request.as_bytes(), &limits, &mut plan)
                .unwrap()
                .unwrap();
            let peer = peer.parse().unwrap();
            forwarded_https(&snap.policies, request.as_bytes(), &plan, peer)
        };
        let xfp = snap("trust_forwarded_proto = true\n");
        for (fields, peer, want) in [
            ("X-Forwarded-Proto: https\r\n", "10.0.0.1", Some(true)),
            ("X-Forwarded-Proto: HTTP\r\n", "10.0.0.1", Some(false)),
            // An IPv4 peer on a dual-stack socket.
            (
                "X-Forwarded-Proto: https\r\n",
                "::ffff:10.0.0.1",
                Some(true),
            ),
            ("X-Forwarded-Proto: https\r\n", "192.0.2.1", None),
            (
                "X-Forwarded-Proto: http , https\r\n",
                "10.0.0.1",
                Some(true),
            ),
            (
                "X-Forwarded-Proto: https\r\nX-Forwarded-Proto: ftp\r\n",
                "10.0.0.1",
                None,
            ),
            ("X_Forwarded_Proto: https\r\n", "10.0.0.1", None),
            ("", "10.0.0.1", None),
            // Not the field these proxies write.
            ("Forwarded: proto=https\r\n", "10.0.0.1", None),
        ] {
            assert_eq!(said(&xfp, fields, peer), want, "{fields:?} from {peer}");
        }
        let fwd = snap("trust_forwarded_proto = true\nclient_ip_header = \"forwarded\"\n");
        for (fields, want) in [
            (
                "Forwarded: for=192.0.2.1;proto=http, for=10.0.0.2;Proto=\"https\"\r\n",
                Some(true),
            ),
            // The last element says nothing of the scheme: no earlier one's word is taken.
            (
                "Forwarded: for=192.0.2.1;proto=https, for=10.0.0.2\r\n",
                None,
            ),
            ("X-Forwarded-Proto: https\r\n", None),
        ] {
            assert_eq!(said(&fwd, fields, "10.0.0.1"), want, "{fields:?}");
        }
        let off = snap("");
        assert_eq!(said(&off, "X-Forwarded-Proto: https\r\n", "10.0.0.1"), None);
    }
}
