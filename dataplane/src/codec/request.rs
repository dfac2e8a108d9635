//! Request heads: httparse plus the intermediary's checks (RFC 9112 §2-7, RFC 9110 §5-7).
//!
//! Hot path: header slots live on the stack, nothing is allocated, the result is offsets into
//! the read buffer. Everything that could let a request be framed differently by the gateway
//! and by an upstream is an error here: bare LF or CR, obs-fold, whitespace before the colon,
//! duplicate or malformed Content-Length, Content-Length with Transfer-Encoding, codings other
//! than a final `chunked`, missing, duplicate or malformed Host.

use std::mem::MaybeUninit;

use common::snapshot::MAX_HEADER_COUNT;
use common::Limits;

use super::{
    crlf_before, is_unreserved, line_end, offset_in, parse_content_length, trim_ows, unescape,
    valid_host, BodyKind, DroppedFields, FieldPlan, FieldRef, Span, TransferCodings,
};

/// A parsed request head; every span points into the buffer given to [`parse_request`]
/// (the default, all empty, is a slot for one to be parsed into).
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestHead {
    /// Start of the request line (leading empty lines skipped).
    pub start: usize,
    /// Start of the first field line (end of the request line and its CRLF).
    pub fields_start: usize,
    /// End of the field lines (start of the final empty line).
    pub fields_end: usize,
    /// End of the head (after the final empty line).
    pub head_end: usize,
    pub method: Span,
    /// The request target as received (after [`normalize_path`]: its path's escaped
    /// unreserved characters decoded and, with `merge_slashes`, its runs of `/` merged).
    pub target: Span,
    /// The part of the target to forward and route on: the whole target in origin form, the
    /// path and query in absolute form (may be empty: forward `/`).
    pub origin_target: Span,
    /// Length of the path within `origin_target` (before `?`).
    pub path_len: usize,
    /// The target was absolute-form (`http://host/path`): the Host line is replaced.
    pub absolute: bool,
    pub http10: bool,
    /// Host to route on and to forward: the Host value, or the absolute-form authority.
    pub host: Option<Span>,
    pub body: BodyKind,
    /// The client allows this connection to be reused after the response.
    pub keep_alive: bool,
    /// The `Upgrade` value when the client asked for an upgrade (`Connection: upgrade`).
    pub upgrade: Option<Span>,
    /// `Expect: 100-continue` with a body to come.
    pub expect_continue: bool,
    /// The `X-Request-Id` field, if any (request ids).
    pub request_id: Option<FieldRef>,
    /// The `traceparent` field, if any (W3C trace context).
    pub traceparent: Option<FieldRef>,
    /// The `tracestate` field, if any: dropped when the gateway starts a new trace.
    pub tracestate: Option<FieldRef>,
    /// The `User-Agent` value, if any (the access log).
    pub user_agent: Option<Span>,
    /// The path escapes unreserved characters (`%61` for `a`), or has an escape in lower case
    /// (`%2f`): [`normalize_path`] decodes the first, upper-cases the second, before the
    /// request is routed.
    pub escaped: bool,
    /// The path has a run of `/` and `merge_slashes` is on: [`normalize_path`] merges it.
    pub slash_runs: bool,
    /// Bytes [`normalize_path`] took out of the request line (the head's received length
    /// is `head_end - start + decoded`).
    pub decoded: usize,
}

/// Methods that are safe to send twice (RFC 9110 §9.2.2).
pub fn is_idempotent_method(method: &[u8]) -> bool {
    matches!(
        method,
        b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE"
    )
}

impl RequestHead {
    /// The path the router matches: `/` for the empty path of an absolute-form target.
    pub fn path<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        if self.path_len == 0 {
            b"/"
        } else {
            &self.origin_target.of(buf)[..self.path_len]
        }
    }

    /// Whether the request's method is safe to send twice ([`is_idempotent_method`]).
    pub fn is_idempotent(&self, buf: &[u8]) -> bool {
        is_idempotent_method(self.method.of(buf))
    }

    pub fn is_head(&self, buf: &[u8]) -> bool {
        self.method.of(buf) == b"HEAD"
    }

    /// Whether the request goes upstream as HTTP/1.0: an HTTP/1.0 request without a host,
    /// which HTTP/1.1 would need. Any other goes with the gateway's own version (RFC 9110
    /// 6.2), and its upstream connection can be reused.
    pub fn forwards_http10(&self) -> bool {
        self.http10 && self.host.is_none()
    }
}

/// Why a request head cannot be served. Each maps to one [`crate::error::ErrorKind`], which
/// decides the status; the connection is closed after the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not a well-formed HTTP/1.1 request head, or ambiguous framing.
    #[error("malformed request head")]
    Malformed,
    #[error("request target too long")]
    UriTooLong,
    #[error("request head too large")]
    HeadTooLarge,
    #[error("HTTP version not supported")]
    VersionNotSupported,
    /// A method the gateway does not proxy (`CONNECT`).
    #[error("method not supported")]
    MethodNotAllowed,
    #[error("unsupported expectation")]
    ExpectationFailed,
    #[error("transfer coding not supported")]
    UnsupportedTransferCoding,
    /// A declared `Content-Length` above `max_body_bytes`.
    #[error("request body too large")]
    BodyTooLarge,
}

/// Longest list of connection options (`Connection: a, b, ...`) accepted.
const MAX_CONNECTION_OPTIONS: usize = 16;

/// Parses the request head at the start of `buf`. `Ok(None)`: incomplete, read more (unless the
/// buffer already holds `max_header_bytes`, which the caller turns into 431 / 414 with
/// [`head_too_large`]). The connection is closed after answering an error.
pub fn parse_request(
    buf: &[u8],
    limits: &Limits,
    plan: &mut FieldPlan,
) -> Result<Option<RequestHead>, ParseError> {
    let mut head = RequestHead::default();
    Ok(parse_request_into(buf, limits, plan, &mut head)?.then_some(head))
}

/// Rewrites the request line's version in place from `HTTP/1.2` ... `HTTP/1.9` to `HTTP/1.1`,
/// and says whether it did: a recipient processes a later minor version of a major version
/// it implements as the highest minor version it implements (RFC 9112 2.3, RFC 9110 2.5),
/// and an intermediary sends its own version on. httparse refuses any but 1.0 and 1.1.
pub fn as_http11(buf: &mut [u8]) -> bool {
    // After the empty lines a client may send first, which the parser skips (RFC 9112 2.2).
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let line_end = buf[start..]
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .map_or(buf.len(), |e| start + e);
    let Some(at) = (line_end - start).checked_sub(9).map(|a| start + a) else {
        return false;
    };
    let line = &buf[..line_end];
    let later = line[at..].starts_with(b" HTTP/1.") && (b'2'..=b'9').contains(&line[at + 8]);
    if later {
        buf[at + 8] = b'1';
    }
    later
}

/// Why httparse refused the head in `buf`, as a [`ParseError`]; the request line is noted in
/// `out` where it is whole, as it is read before the fields (a field refused: a bad byte, too
/// many). Read again here, by a parser given no room for fields, off the hot path.
#[cold]
#[inline(never)]
fn refused_head(buf: &[u8], e: httparse::Error, out: &mut RequestHead) -> ParseError {
    let mut line = httparse::Request::new(&mut []);
    // It stops at the first field (too many for it) or at the head's end.
    let _ = line.parse(buf);
    if let (Some(method), Some(target), Some(_)) = (line.method, line.path, line.version) {
        out.method = span_of(buf, method.as_bytes());
        out.target = span_of(buf, target.as_bytes());
    }
    match e {
        httparse::Error::TooManyHeaders => ParseError::HeadTooLarge,
        // 505 for a version the gateway does not speak (`HTTP/2.0`); one that is no version
        // at all (`http/1.1`: the name is case-sensitive, RFC 9112 2.3) is malformed.
        httparse::Error::Version if versionlike(buf) => ParseError::VersionNotSupported,
        _ => ParseError::Malformed,
    }
}

/// [`parse_request`] writing the head into `out` (`Ok(true)`: complete), for the hot path:
/// the head is written once, where the connection keeps it, instead of being returned and
/// copied there.
pub fn parse_request_into(
    buf: &[u8],
    limits: &Limits,
    plan: &mut FieldPlan,
    out: &mut RequestHead,
) -> Result<bool, ParseError> {
    plan.clear();
    // Set as soon as the request line is read: a head refused after that (413, 417, 501,
    // a bad field) is logged with its method and path.
    out.method = Span::default();
    out.target = Span::default();
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADER_COUNT];
    let mut req = httparse::Request::new(&mut []);
    let slots = &mut slots[..limits.max_header_count.min(MAX_HEADER_COUNT)];
    let head_end = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= limits.max_header_bytes {
                return Err(head_too_large(buf, limits));
            }
            // A request line longer than the URI limit need not be read to its end.
            if !buf[..buf.len().min(limits.max_uri_bytes + 64)].contains(&b'\n')
                && buf.len() > limits.max_uri_bytes + 64
            {
                return Err(ParseError::UriTooLong);
            }
            return Ok(false);
        }
        Err(e) => return Err(refused_head(buf, e, out)),
    };
    if head_end > limits.max_header_bytes {
        return Err(head_too_large(buf, limits));
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(ParseError::Malformed);
    };
    let method_span = span_of(buf, method.as_bytes());
    let target_span = span_of(buf, target.as_bytes());
    (out.method, out.target) = (method_span, target_span);
    let start = method_span.start;
    let headers = &*req.headers;
    let fields_start = headers
        .first()
        .map_or(head_end - 2, |h| offset_in(buf, h.name.as_bytes()));
    let fields_end = head_end - 2;
    // httparse accepts a bare LF as a line end; an upstream might not. Require CRLF everywhere.
    if !crlf_before(buf, fields_start) || &buf[fields_end..head_end] != b"\r\n" {
        return Err(ParseError::Malformed);
    }
    if target_span.len() > limits.max_uri_bytes {
        return Err(ParseError::UriTooLong);
    }

    let mut host: Option<Span> = None;
    let mut host_index: Option<usize> = None;
    let mut content_length: Option<u64> = None;
    let mut codings = TransferCodings::default();
    let mut close = false;
    let mut keep_alive_opt = false;
    let mut upgrade_opt = false;
    let mut upgrade_value: Option<Span> = None;
    let mut expect_continue = false;
    let mut options = [Span::default(); MAX_CONNECTION_OPTIONS];
    let mut n_options = 0;
    let mut dropped = DroppedFields::default();
    let mut request_id: Option<FieldRef> = None;
    let mut traceparent: Option<FieldRef> = None;
    let mut tracestate: Option<FieldRef> = None;
    let mut user_agent: Option<Span> = None;

    for (i, h) in headers.iter().enumerate() {
        if !crlf_before(buf, line_end(buf, headers, i, fields_end)) {
            return Err(ParseError::Malformed);
        }
        let name = h.name.as_bytes();
        let value = trim_ows(h.value);
        let mut drop = false;
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => {
                if host.is_some() || !valid_host(value) {
                    return Err(ParseError::Malformed);
                }
                host = Some(span_of(buf, value));
                host_index = Some(i);
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                if content_length.is_some() {
                    return Err(ParseError::Malformed);
                }
                content_length = Some(parse_content_length(value).ok_or(ParseError::Malformed)?);
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                codings.add_line(value);
                drop = true;
            }
            // The framing fields spelled with `_`: an upstream that reads them as the real
            // ones would frame the body another way than the gateway did.
            14 if super::same_field_name(name, b"content-length") => drop = true,
            17 if super::same_field_name(name, b"transfer-encoding") => drop = true,
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for opt in super::list_elements(value) {
                    if opt.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if opt.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive_opt = true;
                    } else if opt.eq_ignore_ascii_case(b"upgrade") {
                        upgrade_opt = true;
                    } else {
                        if n_options == MAX_CONNECTION_OPTIONS {
                            return Err(ParseError::Malformed);
                        }
                        options[n_options] = span_of(buf, opt);
                        n_options += 1;
                    }
                }
                drop = true;
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => {
                // The first line that offers a protocol passed on (the forwarded head lists
                // those of every line).
                if super::list_elements(value).any(super::upgrade_passed) {
                    upgrade_value.get_or_insert(span_of(buf, value));
                }
                drop = true;
            }
            // Connection-specific: goes with an h2c upgrade, which is never passed on.
            14 if name.eq_ignore_ascii_case(b"http2-settings") => drop = true,
            6 if name.eq_ignore_ascii_case(b"expect") => {
                // A list (RFC 9110 10.1.1: `#expectation`), whose empty elements do not count
                // (5.6.1): `100-continue,` and an empty value are no other expectation.
                for e in super::list_elements(value) {
                    if !e.eq_ignore_ascii_case(b"100-continue") {
                        return Err(ParseError::ExpectationFailed);
                    }
                    expect_continue = true;
                }
                drop = true;
            }
            // The forwarding fields, also spelled with `_` (which CGI-style upstreams read as
            // the same variable): only the gateway's reach the upstream. Of a client's
            // `X-Forwarded-For` the values stay, the client's address appended.
            15 if super::same_field_name(name, b"x-forwarded-for") => {
                if !value.is_empty() && name.eq_ignore_ascii_case(b"x-forwarded-for") {
                    plan.xff.push(span_of(buf, value));
                }
                drop = true;
            }
            // The gateway's own (`forward::request_extras`), as Kong's: a client's would
            // reach an upstream that believes it (Go's chi and many frameworks read it
            // before X-Forwarded-For).
            9 if super::same_field_name(name, b"x-real-ip") => drop = true,
            // RFC 7239's: kept as a chain, as X-Forwarded-For is, with the gateway's own
            // element for the client appended (`forward::request_extras`).
            9 if name.eq_ignore_ascii_case(b"forwarded") => {
                if !value.is_empty() {
                    plan.forwarded.push(span_of(buf, value));
                }
                drop = true;
            }
            12 if super::same_field_name(name, b"x-request-id") => {
                FieldRef::note(&mut request_id, buf, headers, i, fields_end);
                // `X_Request_Id`, which CGI-style upstreams read as the gateway's own: no
                // one id to keep (a client's is replaced), and every spelling is left out.
                if !name.eq_ignore_ascii_case(b"x-request-id") {
                    if let Some(f) = &mut request_id {
                        f.repeated = true;
                    }
                }
            }
            11 if name.eq_ignore_ascii_case(b"traceparent") => {
                FieldRef::note(&mut traceparent, buf, headers, i, fields_end);
            }
            10 if name.eq_ignore_ascii_case(b"user-agent") => {
                user_agent.get_or_insert(span_of(buf, value));
            }
            10 if name.eq_ignore_ascii_case(b"tracestate") => {
                FieldRef::note(&mut tracestate, buf, headers, i, fields_end);
            }
            2 if name.eq_ignore_ascii_case(b"te") => drop = true,
            10 if name.eq_ignore_ascii_case(b"keep-alive") => drop = true,
            16 if name.eq_ignore_ascii_case(b"proxy-connection") => drop = true,
            19 if name.eq_ignore_ascii_case(b"proxy-authorization") => drop = true,
            17 if super::same_field_name(name, b"x-forwarded-proto") => {
                if name.eq_ignore_ascii_case(b"x-forwarded-proto") {
                    plan.xfp = Some(span_of(buf, value));
                }
                drop = true;
            }
            16 if super::same_field_name(name, b"x-forwarded-host") => drop = true,
            // Path overrides that IIS and Symfony-style frameworks take from a proxy: sent by
            // a client, they would reach a path other than the one routed and screened here.
            14 if super::same_field_name(name, b"x-original-url") => drop = true,
            13 if super::same_field_name(name, b"x-rewrite-url") => drop = true,
            _ => {}
        }
        if drop {
            dropped.mark(i);
        }
    }
    // Fields named by Connection are hop-by-hop too, except those the request cannot lose
    // (a client may name any field; Host and framing stay end-to-end).
    dropped.mark_nominated(
        buf,
        headers,
        &options[..n_options],
        &[b"host", b"content-length"],
    );

    let http10 = version == 0;
    // Request target forms (RFC 9112 §3.2).
    let t = target.as_bytes();
    let mut absolute = false;
    let mut origin_target = target_span;
    if method == "CONNECT" {
        // A tunnel, whatever the target's form: a 2xx would tell the client the connection
        // is now raw bytes both ways (RFC 9110 9.3.6), which the gateway does not do.
        return Err(ParseError::MethodNotAllowed);
    } else if t.first() == Some(&b'/') {
    } else if let Some(rest) = strip_scheme(t) {
        absolute = true;
        let auth_len = rest
            .iter()
            .position(|&b| b == b'/' || b == b'?' || b == b'#')
            .unwrap_or(rest.len());
        let authority = &rest[..auth_len];
        if authority.is_empty() || !valid_host(authority) {
            return Err(ParseError::Malformed);
        }
        let auth_span = span_of(buf, authority);
        origin_target = Span {
            start: auth_span.end,
            end: target_span.end,
        };
        // An empty path (`http://h`, `http://h?q`) is `/` (RFC 9112 3.2.1): routed as `/`,
        // and the rewritten request line gets the `/` (see `forward::request_extras`).
        if let Some(i) = host_index {
            // The authority wins over Host (RFC 9112 §3.2.2); the Host line is rewritten.
            dropped.mark(i);
        }
        host = Some(auth_span);
    } else if t == b"*" && method == "OPTIONS" {
    } else {
        return Err(ParseError::Malformed);
    }
    if !http10 && host_index.is_none() {
        return Err(ParseError::Malformed);
    }
    // An http URI has a host (RFC 9110 4.2.1: one with an empty host is invalid, to be
    // refused); nginx answers 400 too.
    if host.is_some_and(|h| h.is_empty()) {
        return Err(ParseError::Malformed);
    }
    let path_len = origin_target
        .of(buf)
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(origin_target.len());
    // Routes (and the policies on them) match the path as sent. A `..` segment would let
    // `/public/../admin` match `/public` here and reach `/admin` at an upstream that
    // resolves it: refuse dot segments, encoded ones too (RFC 3986 §6.2.2.3).
    let path = &origin_target.of(buf)[..path_len];
    if has_dot_segment(path) || origin_target.of(buf).contains(&b'#') {
        // A fragment is never part of a request target (RFC 9112 §3.2); forwarded, it
        // would hide the rest of the path from this check.
        return Err(ParseError::Malformed);
    }
    let escaped = match escapes(path) {
        Escapes::None => false,
        Escapes::Normalize => true,
        Escapes::Bad => return Err(ParseError::Malformed),
    };
    let slash_runs = limits.merge_slashes && has_slash_run(path);

    let body = if codings.present {
        if http10 || content_length.is_some() || codings.malformed {
            // HTTP/1.0 has no chunked; CL with TE is the classic smuggling vector: refuse
            // rather than pick one (RFC 9112 §6.1, §6.3).
            return Err(ParseError::Malformed);
        }
        if codings.other {
            return Err(ParseError::UnsupportedTransferCoding);
        }
        if !codings.chunked_last {
            return Err(ParseError::Malformed);
        }
        BodyKind::Chunked
    } else {
        match content_length {
            Some(0) | None => BodyKind::None,
            Some(n) if n > limits.max_body_bytes => return Err(ParseError::BodyTooLarge),
            Some(n) => BodyKind::Length(n),
        }
    };
    let keep_alive = if http10 {
        keep_alive_opt && !close
    } else {
        !close
    };
    let upgrade = if upgrade_opt && !http10 {
        upgrade_value
    } else {
        None
    };

    dropped.into_plan(buf, headers, fields_end, plan);

    *out = RequestHead {
        start,
        fields_start,
        fields_end,
        head_end,
        method: method_span,
        target: target_span,
        origin_target,
        path_len,
        absolute,
        http10,
        host,
        body,
        keep_alive,
        upgrade,
        // RFC 9110 10.1.1: an HTTP/1.0 request's expectation is ignored (and 15.2: no 1xx
        // goes to an HTTP/1.0 client).
        expect_continue: expect_continue && body != BodyKind::None && !http10,
        request_id,
        traceparent,
        tracestate,
        user_agent,
        escaped,
        slash_runs,
        decoded: 0,
    };
    Ok(true)
}

/// What the percent-escapes of a path are.
#[derive(Debug, PartialEq, Eq)]
enum Escapes {
    /// None that encodes an unreserved character, and none malformed.
    None,
    /// Some encode unreserved characters, or spell a hex digit in lower case (and none is
    /// malformed): [`normalize_path`] decodes the first and upper-cases the second.
    Normalize,
    /// A `%` without two hex digits after it (RFC 3986 §2.1), or `%00`: no server reads the
    /// path the same as another then (nginx refuses both with 400).
    Bad,
}

fn escapes(path: &[u8]) -> Escapes {
    let mut found = Escapes::None;
    let mut rest = path;
    while let Some(i) = rest.iter().position(|&b| b == b'%') {
        let Some(c) = rest
            .get(i + 1..i + 3)
            .and_then(|hex| unescape(hex[0], hex[1]))
        else {
            return Escapes::Bad;
        };
        if c == 0 {
            return Escapes::Bad;
        }
        if is_unreserved(c) || rest[i + 1..i + 3].iter().any(u8::is_ascii_lowercase) {
            found = Escapes::Normalize;
        }
        rest = &rest[i + 3..];
    }
    found
}

/// Whether `path` has two `/` in a row.
fn has_slash_run(path: &[u8]) -> bool {
    path.windows(2).any(|w| w == b"//")
}

/// Normalizes, in place, the path of a head [`parse_request`] marked `escaped` or
/// `slash_runs`: decodes its escaped unreserved characters (RFC 3986 §6.2.2.2: `/%6Frders` and
/// `/orders` are the same resource) and merges each run of `/` into one (`//orders` is
/// `/orders` to nginx, Tomcat and the servers behind them). Routes and their policies then
/// match the path every upstream resolves, not a spelling that walks around them, and the
/// upstream receives it so (as Envoy's `normalize_path` and `merge_slashes` forward it).
/// Escapes of other characters (`%2F`, `%20`) stay, their hex digits upper-cased (§6.2.2.1:
/// `%2f` and `%2F` are one character, and route paths are written so). The request line before the
/// path moves right by the bytes saved, so it stays one run ending where it did: the fields
/// after it, and every span into them, are untouched.
pub fn normalize_path(buf: &mut [u8], head: &mut RequestHead) {
    if !head.escaped && !head.slash_runs {
        return;
    }
    let merge_slashes = head.slash_runs;
    let from = head.origin_target.start;
    let end = from + head.path_len;
    let mut w = from;
    let mut r = from;
    while r < end {
        // `parse_request` checked that every `%` of the path has two hex digits after it.
        let c = match buf[r] {
            b'%' => unescape(buf[r + 1], buf[r + 2]),
            _ => None,
        };
        match c {
            Some(c) if is_unreserved(c) => {
                buf[w] = c;
                r += 3;
            }
            Some(_) => {
                buf[w] = b'%';
                buf[w + 1] = buf[r + 1].to_ascii_uppercase();
                buf[w + 2] = buf[r + 2].to_ascii_uppercase();
                r += 3;
                w += 3;
                continue;
            }
            None if merge_slashes && buf[r] == b'/' && w > from && buf[w - 1] == b'/' => {
                r += 1;
                continue;
            }
            None => {
                buf[w] = buf[r];
                r += 1;
            }
        }
        w += 1;
    }
    let saved = end - w;
    buf.copy_within(head.start..w, head.start + saved);
    let moved = |s: &mut Span| {
        if s.start < from {
            s.start += saved;
            s.end += saved;
        }
    };
    moved(&mut head.method);
    // An absolute-form target's authority moves; a Host field does not.
    if let Some(host) = head.host.as_mut() {
        moved(host);
    }
    head.start += saved;
    head.target.start += saved;
    head.origin_target.start += saved;
    head.path_len -= saved;
    head.decoded += saved;
    head.escaped = false;
    head.slash_runs = false;
}

/// Whether `path` has a `.` or `..` segment, counting `%2e` as a dot, `%2f`, `%5c` and
/// `\\` as separators, and ignoring `;` parameters (`..;x` is `..` to servlet containers):
/// upstreams differ on which of those they decode.
pub fn has_dot_segment(path: &[u8]) -> bool {
    let mut dots = 0usize;
    let mut other = false;
    // After a `;` the rest of the segment is parameters, not part of its name.
    let mut params = false;
    let mut i = 0;
    loop {
        let (sep, step, dot) = match path.get(i) {
            None => (true, 1, false),
            Some(b'/' | b'\\') => (true, 1, false),
            Some(b';') => {
                params = true;
                (false, 1, false)
            }
            Some(b'.') => (false, 1, true),
            Some(b'%') if path.len() >= i + 3 => match &path[i + 1..i + 3] {
                b"2e" | b"2E" => (false, 3, true),
                b"2f" | b"2F" | b"5c" | b"5C" => (true, 3, false),
                _ => (false, 1, false),
            },
            Some(_) => (false, 1, false),
        };
        if sep {
            if !other && (dots == 1 || dots == 2) {
                return true;
            }
            if i >= path.len() {
                return false;
            }
            dots = 0;
            other = false;
            params = false;
        } else if params {
        } else if dot {
            dots += 1;
        } else {
            other = true;
        }
        i += step;
    }
}

/// The status for a head that does not fit in `max_header_bytes`: 414 when the request line
/// alone is too long, 431 otherwise.
pub fn head_too_large(buf: &[u8], limits: &Limits) -> ParseError {
    let skip = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    // More empty lines than a request line may be long: a malformed request, not a long
    // target or head (RFC 9112 2.2 asks to skip some, not a head's worth).
    if skip > limits.max_uri_bytes {
        return ParseError::Malformed;
    }
    match buf[skip..].iter().position(|&b| b == b'\n') {
        None => ParseError::UriTooLong,
        Some(eol) if eol > limits.max_uri_bytes => ParseError::UriTooLong,
        Some(_) => ParseError::HeadTooLarge,
    }
}

/// Whether the request line in `buf` is a method, a target and `HTTP/x.y` (digits), a
/// version's syntax, or, while the line is not complete, a start of one: the line of a
/// version the gateway does not speak. A target with a space in it, or two spaces between
/// parts, make more than three parts: a malformed line (RFC 9112 3), whatever ends it.
fn versionlike(buf: &[u8]) -> bool {
    // Empty lines before the request line are skipped (RFC 9112 2.2), as the parser does.
    let skip = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let buf = &buf[skip..];
    let (line, complete) = match buf.iter().position(|&b| b == b'\n') {
        Some(i) => (&buf[..i], true),
        None => (buf, false),
    };
    // A CR ends the line as a LF does (what follows it cannot be part of the version).
    let (line, complete) = match line.strip_suffix(b"\r") {
        Some(line) => (line, true),
        None => (line, complete),
    };
    if line.split(|&b| b == b' ').count() != 3 {
        return false;
    }
    let version = line.rsplit(|&b| b == b' ').next().unwrap_or_default();
    let fits = |k: usize, b: u8| match k {
        0..=4 => b == b"HTTP/"[k],
        5 | 7 => b.is_ascii_digit(),
        6 => b == b'.',
        _ => false,
    };
    version.iter().enumerate().all(|(k, &b)| fits(k, b)) && (!complete || version.len() == 8)
}

fn strip_scheme(t: &[u8]) -> Option<&[u8]> {
    for scheme in [&b"http://"[..], b"https://"] {
        if t.len() > scheme.len() && t[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Some(&t[scheme.len()..]);
        }
    }
    None
}

fn span_of(buf: &[u8], part: &[u8]) -> Span {
    let start = offset_in(buf, part);
    Span {
        start,
        end: start + part.len(),
    }
}

#[cfg(test)]
mod tests;
