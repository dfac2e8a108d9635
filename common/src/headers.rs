//! A route's `request_headers` and `response_headers`: fields it sets on, or removes from,
//! the requests it forwards and the answers it gives (nginx's `proxy_set_header` and
//! `add_header ... always`, Envoy's `request_headers_to_add` / `response_headers_to_remove`,
//! Kong's request and response transformers).

use std::sync::Arc;

use crate::config::HeaderEdits;
use crate::snapshot::{Route, RouteAction};
use crate::validate::{cgi_name, is_tchar};
use crate::ConfigError;

/// Most fields one `set` or `remove` may name.
pub const MAX_EDITS: usize = 32;
/// Longest value a `set` may give.
const MAX_VALUE: usize = 4096;

/// A route's header edits, compiled.
#[derive(Debug, Default)]
pub struct RouteHeaders {
    /// Lower-case names whose copies the forwarded request loses: every `set` and `remove`
    /// name of `request_headers`.
    pub request_drop: Box<[Box<[u8]>]>,
    /// `Name: value\r\n` lines added to every forwarded request.
    pub request_lines: Box<[u8]>,
    /// `request_headers` sets `Host`: an absolute-form target's authority does not become
    /// the forwarded `Host` then.
    pub sets_host: bool,
    /// The request fields a trailer section may not carry on this route: the policies'
    /// ([`crate::policy::Policies::trailer_refused`]) and the names `request_headers` sets
    /// or removes, whose copies a trailer would otherwise take to the upstream. `None`: the
    /// policies' alone.
    pub trailer_refused: Option<Arc<[Box<[u8]>]>>,
    /// Lower-case names whose copies leave a relayed answer: every `set` and `remove` name
    /// of `response_headers`.
    pub response_drop: Arc<[Box<[u8]>]>,
    /// `Name: value\r\n` lines added to every answer.
    pub response_lines: Box<[u8]>,
}

/// Fields no route may set or remove, on either side: they frame the message or manage its
/// connection, hop by hop (RFC 9110 7.6.1), and the gateway writes them itself.
const FRAMING: &[&str] = &[
    "connection",
    "content-length",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Request fields the gateway sets on every forwarded request.
const GATEWAY_REQUEST: &[&str] = &[
    "forwarded",
    "traceparent",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-request-id",
];

/// Answer fields the gateway sets on every answer.
const GATEWAY_RESPONSE: &[&str] = &["date", "x-request-id"];

/// Compiles a route's edits, once its policies are known: `consumer_headers` are the
/// `consumer_header`s of its authentication policies, with the policies' ids (the policy
/// sets that field: the route may not); `grpc`: the route (or a variant) proxies to a gRPC
/// upstream. `None` when the route edits nothing.
pub fn compile(
    request: Option<&HeaderEdits>,
    response: Option<&HeaderEdits>,
    route: &Route,
    consumer_headers: &[(&[u8], &str)],
    trailer_refused: &[Box<[u8]>],
    grpc: bool,
    at: &str,
) -> Result<Option<Arc<RouteHeaders>>, ConfigError> {
    if request.is_none() && response.is_none() {
        return Ok(None);
    }
    let mut out = RouteHeaders::default();
    if let Some(edits) = request {
        let at = format!("{at}.request_headers");
        let actions =
            std::iter::once(&route.action).chain(route.variants.iter().map(|v| &v.action));
        let (mut forwards, mut aggregates) = (false, false);
        for a in actions {
            forwards |= matches!(a, RouteAction::Proxy { .. } | RouteAction::Aggregate { .. });
            aggregates |= matches!(a, RouteAction::Aggregate { .. });
        }
        if !forwards {
            return Err(ConfigError::field(
                at,
                "the route forwards no request (it answers with `respond` or `redirect`)",
            ));
        }
        let shaped = route.shape.is_some() || route.variants.iter().any(|v| v.shape.is_some());
        let refused = |name: &str, removing: bool| -> Option<String> {
            if let Some(why) = reserved(name, GATEWAY_REQUEST, "forwarded request") {
                return Some(why);
            }
            // Set by the gateway since 2026-12-07: a stored route's edit of it is noted and
            // dropped below, so the gateway's goes out alone.
            if name == "x-real-ip" {
                let why = "the gateway sets it on every forwarded request (the client address)";
                let field = format!("{at}.{}.X-Real-IP", if removing { "remove" } else { "set" });
                if !crate::validate::tolerated(&field, &format!("{why}; the edit is ignored")) {
                    return Some(why.into());
                }
            }
            if name == "max-forwards" {
                return Some("the gateway counts it down (RFC 9110 7.6.2)".into());
            }
            if name == "expect" {
                return Some("the gateway answers a client's `100-continue` itself".into());
            }
            if let Some(why) = grpc_field(name, grpc) {
                return Some(why);
            }
            if name == "host" && removing {
                return Some("every HTTP/1.1 request carries a Host: set it instead".into());
            }
            if name == "host" && aggregates {
                return Some("an aggregate's steps each send their upstream's Host".into());
            }
            if (shaped || aggregates) && matches!(name, "accept-encoding" | "range" | "if-range") {
                return Some(
                    "the route reshapes or aggregates answers, which takes them whole and \
                     uncompressed: the gateway sets this field"
                        .into(),
                );
            }
            consumer_headers
                .iter()
                .find(|(h, _)| cgi_name(h) == name)
                .map(|(_, p)| format!("policy {p:?} sets it (its consumer_header)"))
        };
        let (drop, mut lines) = edits_of(edits, &at, refused)?;
        // A stored route's X-Real-IP line (tolerated above): never beside the gateway's.
        let mut kept = Vec::with_capacity(lines.len());
        for line in lines.split_inclusive(|&b| b == b'\n') {
            let name = "x-real-ip:";
            if line.get(..name.len()).is_none_or(|n| cgi_name(n) != name) {
                kept.extend_from_slice(line);
            }
        }
        lines = kept;
        let host = edits
            .set
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("host"));
        if let Some((name, value)) = host {
            if !valid_host_value(value) {
                return Err(ConfigError::field(
                    format!("{at}.set.{name}"),
                    format!(
                        "{value:?} is not a host name or IP address (IPv6 in brackets) with \
                         an optional port"
                    ),
                ));
            }
        }
        out.sets_host = host.is_some();
        if !drop.is_empty() {
            let mut refused = trailer_refused.to_vec();
            refused.extend(
                drop.iter()
                    .filter(|n| !trailer_refused.contains(n))
                    .cloned(),
            );
            out.trailer_refused = Some(refused.into());
        }
        out.request_drop = drop.into();
        out.request_lines = lines.into();
    }
    if let Some(edits) = response {
        let at = format!("{at}.response_headers");
        let respond = matches!(route.action, RouteAction::Respond { .. });
        let redirect = matches!(route.action, RouteAction::Redirect(_));
        let refused = |name: &str, _removing: bool| -> Option<String> {
            if let Some(why) = reserved(name, GATEWAY_RESPONSE, "answer") {
                return Some(why);
            }
            if let Some(why) = grpc_field(name, grpc) {
                return Some(why);
            }
            if name == "vary" && !route.variants.is_empty() {
                return Some("the route's variants set it".into());
            }
            if name.starts_with("access-control-") && route.has_cors {
                return Some("the route's cors policy sets these fields".into());
            }
            if name == "content-type" && respond {
                return Some("`respond` has its own `content_type`".into());
            }
            if name == "location" && redirect {
                return Some("the route's `redirect` sets it".into());
            }
            None
        };
        let (drop, lines) = edits_of(edits, &at, refused)?;
        out.response_drop = drop.into();
        out.response_lines = lines.into();
    }
    Ok(Some(Arc::new(out)))
}

/// Why `name` is gRPC's, if it is: a `grpc-` field (a call's deadline, status, message and
/// codings), or the content type on a route to a gRPC upstream (gRPC's framing says it).
fn grpc_field(name: &str, grpc: bool) -> Option<String> {
    if name.starts_with("grpc-") {
        return Some("gRPC's own field: the client and the service set it".into());
    }
    (grpc && name == "content-type")
        .then(|| "the route calls a gRPC upstream, whose messages set it".into())
}

/// Whether `value` can be a request's `Host`: a host name or IP address (IPv6 in brackets),
/// and an optional port.
fn valid_host_value(value: &str) -> bool {
    let (host, port) = match value.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (value, None),
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok_and(|n| n > 0)
    });
    port_ok && crate::validate::valid_host_name(host)
}

/// Why `name` is the gateway's to write, if it is: a framing or hop-by-hop field, or one of
/// `gateway`'s, which it sets on every `what`.
fn reserved(name: &str, gateway: &[&str], what: &str) -> Option<String> {
    if FRAMING.contains(&name) {
        return Some(
            "it frames the message or manages the connection, hop by hop: the gateway \
             writes it"
                .into(),
        );
    }
    gateway
        .contains(&name)
        .then(|| format!("the gateway sets it on every {what}"))
}

/// One side's edits: the lower-case names to drop (set and removed ones), and the lines to
/// add.
type Edits = (Vec<Box<[u8]>>, Vec<u8>);

/// One side's [`Edits`], each name checked: a token, not twice, not one `refused` (given the
/// lower-case name and whether it is removed) names a reason for.
fn edits_of(
    edits: &HeaderEdits,
    at: &str,
    refused: impl Fn(&str, bool) -> Option<String>,
) -> Result<Edits, ConfigError> {
    if edits.set.len() > MAX_EDITS || edits.remove.len() > MAX_EDITS {
        return Err(ConfigError::field(
            at,
            format!("at most {MAX_EDITS} fields in `set` and {MAX_EDITS} in `remove`"),
        ));
    }
    let mut drop: Vec<Box<[u8]>> = Vec::new();
    let mut lines = Vec::new();
    // A name is checked as CGI-style upstreams read it, `_` for `-` (`Content_Length` is
    // their `CONTENT_LENGTH`), which is also how the edit matches the message's fields: before,
    // `remove = ["Content_Length"]` passed and dropped the real `Content-Length`, unframing
    // the request (a second one smuggled in its body) or the answer. `None`: an edit a stored
    // config holds that is refused now, ignored.
    let named = |name: &str, path: String, removing: bool, drop: &[Box<[u8]>]| {
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(ConfigError::field(
                path,
                format!("{name:?} is not a field name (RFC 9110 5.1: a token)"),
            ));
        }
        let lower = name.to_ascii_lowercase();
        let read = cgi_name(name);
        if drop.iter().any(|d| cgi_name(d) == read) {
            // Stored by a build that told `x_a` from `X-A` (it refused only the same name in
            // another case): the later one is left out, whichever has the `_`.
            let why = "named twice (names are case-insensitive, and `_` is `-` to CGI-style \
                       upstreams)";
            let same = drop.iter().any(|d| **d == *lower.as_bytes());
            if !same && crate::validate::tolerated(&path, &format!("{why}; ignored")) {
                return Ok(None);
            }
            return Err(ConfigError::field(path, format!("{name:?} is {why}")));
        }
        if let Some(why) = refused(&read, removing) {
            let spelled = lower != read;
            let ignored = format!("{why} (spelled with `_`); the edit is ignored");
            if spelled && crate::validate::tolerated(&path, &ignored) {
                return Ok(None);
            }
            return Err(ConfigError::field(path, format!("{name:?}: {why}")));
        }
        Ok(Some(lower.into_bytes().into_boxed_slice()))
    };
    for (name, value) in &edits.set {
        let path = format!("{at}.set.{name}");
        let Some(lower) = named(name, path.clone(), false, &drop)? else {
            continue;
        };
        let visible = |b: u8| b == b'\t' || (0x20..0x7f).contains(&b);
        let trimmed = value.trim_matches([' ', '\t']);
        if value.len() > MAX_VALUE || !value.bytes().all(visible) || trimmed.len() != value.len() {
            return Err(ConfigError::field(
                path,
                format!(
                    "the value must be visible ASCII, spaces and tabs inside only, at most \
                     {MAX_VALUE} bytes"
                ),
            ));
        }
        drop.push(lower);
        lines.extend_from_slice(name.as_bytes());
        lines.extend_from_slice(b": ");
        lines.extend_from_slice(value.as_bytes());
        lines.extend_from_slice(b"\r\n");
    }
    for (j, name) in edits.remove.iter().enumerate() {
        if let Some(lower) = named(name, format!("{at}.remove[{j}]"), true, &drop)? {
            drop.push(lower);
        }
    }
    Ok((drop, lines))
}
