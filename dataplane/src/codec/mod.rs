//! HTTP/1.1 message heads and body framing, parsed in place.
//!
//! Hot path. `request` and `response` run httparse over a connection's read buffer and then
//! apply the intermediary rules of RFC 9110 / RFC 9112 that httparse leaves to its caller:
//! framing (Content-Length, Transfer-Encoding), Host, hop-by-hop fields. They do not copy the
//! head: they return offsets into the buffer and fill a [`FieldPlan`] saying which field lines
//! to leave out when the head is forwarded. `chunked` validates chunked bodies as they stream.

pub mod chunked;
pub mod request;
pub mod response;

/// `%XX` decoding, shared with the control plane's.
pub(crate) use common::snapshot::unescape;

/// A byte range in a connection's read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    /// The bytes of this span in `buf`.
    #[inline]
    pub fn of<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start..self.end]
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// A field the gateway may replace: its first line and value, and whether it appeared more
/// than once (then its value is ambiguous).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldRef {
    /// The whole field line with its CRLF.
    pub line: Span,
    pub value: Span,
    pub repeated: bool,
}

impl FieldRef {
    pub(crate) fn note(
        slot: &mut Option<FieldRef>,
        buf: &[u8],
        headers: &[httparse::Header<'_>],
        i: usize,
        fields_end: usize,
    ) {
        match slot {
            Some(f) => f.repeated = true,
            None => {
                *slot = Some(FieldRef {
                    line: Span {
                        start: offset_in(buf, headers[i].name.as_bytes()),
                        end: line_end(buf, headers, i, fields_end),
                    },
                    value: {
                        let v = trim_ows(headers[i].value);
                        let start = offset_in(buf, v);
                        Span {
                            start,
                            end: start + v.len(),
                        }
                    },
                    repeated: false,
                })
            }
        }
    }
}

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyKind {
    /// No body.
    #[default]
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the connection closes (responses only).
    UntilClose,
}

/// When a head that is arriving in pieces is worth parsing again. A parse starts from the
/// head's first byte, so parsing after every read would cost the head's length squared when
/// a peer sends it a few bytes per packet (a 256 KiB head in 1-byte writes: about a second of
/// a worker's time, and `max_header_bytes` goes up to 1 MiB). A parse is due only where its
/// answer can have changed, so a head costs a few times its length whatever its pieces:
/// - the first bytes (a peer speaking another protocol is refused at once);
/// - the head doubled since the last parse (a bad byte is refused by twice the bytes);
/// - a size bound of the parser's was crossed (`marks`: 431, 414);
/// - a line ended with an empty line after the head's first byte, which ends the head (or
///   makes it malformed). Empty lines before a request line (RFC 9112 2.2) do not count;
/// - a CR came that no LF follows, or a line that starts with whitespace, which no head may
///   hold (a peer that sent such a head whole would otherwise wait for the header timeout,
///   not get its 400 or 502 at once).
#[derive(Debug, Default)]
pub(crate) struct Reparse {
    /// The head's length at the last parse (0: none yet).
    parsed: usize,
    /// How much of it was looked at for the empty line (each byte once).
    scanned: usize,
    /// Where its first byte that is not CR or LF is, once one came.
    content: Option<usize>,
}

impl Reparse {
    /// Whether `buf` (the head so far) is worth parsing; if so, noted as parsed.
    #[inline]
    pub(crate) fn due(&mut self, buf: &[u8], marks: &[usize]) -> bool {
        if self.parsed == 0 {
            // The first bytes: parsed at once, scanned later (a head that came whole costs
            // nothing more).
            self.parsed = buf.len();
            return true;
        }
        self.due_again(buf, marks)
    }

    fn due_again(&mut self, buf: &[u8], marks: &[usize]) -> bool {
        let (last, len) = (self.parsed, buf.len());
        if len < last.max(self.scanned) {
            // A new head in the buffer: its first bytes.
            *self = Self {
                parsed: len,
                ..Self::default()
            };
            return true;
        }
        let from = self.scanned;
        if self.content.is_none() {
            let skip = buf[from..].iter().position(|&b| b != b'\r' && b != b'\n');
            self.content = skip.map(|i| from + i);
        }
        self.scanned = len;
        // The scan last: a parse that is due anyway covers an end among the bytes.
        let due = len >= last.saturating_mul(2)
            || marks.iter().any(|&m| last < m && m <= len)
            || bare_cr(buf, from.saturating_sub(1))
            || self
                .content
                .is_some_and(|c| ends_head(buf, from.max(c + 1)));
        if due {
            self.parsed = len;
        }
        due
    }
}

/// Whether a CR at `from` or after is followed by a byte other than LF, or an LF by a space
/// or a tab (a line folded or of whitespace only, which no head may hold either).
fn bare_cr(buf: &[u8], from: usize) -> bool {
    buf.get(from..).is_some_and(|b| {
        b.windows(2).any(|w| {
            (w[0] == b'\r' && w[1] != b'\n') || (w[0] == b'\n' && matches!(w[1], b' ' | b'\t'))
        })
    })
}

/// Whether an LF at `from` or after ends an empty line (`LF LF` or `LF CR LF`).
fn ends_head(buf: &[u8], from: usize) -> bool {
    (from..buf.len()).any(|i| {
        buf[i] == b'\n'
            && match i.checked_sub(1).map(|j| buf[j]) {
                Some(b'\n') => true,
                Some(b'\r') => i >= 2 && buf[i - 2] == b'\n',
                _ => false,
            }
    })
}

/// RFC 3986 §2.3: letters, digits, `-`, `.`, `_` and `~`, the characters a URI never needs
/// to escape.
pub(crate) fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// Field names equal ignoring case and taking `_` for `-`, as CGI-style servers do
/// (`X_Forwarded_For` is their `HTTP_X_FORWARDED_FOR`, as `X-Forwarded-For` is).
pub(crate) fn same_field_name(a: &[u8], b: &[u8]) -> bool {
    let norm = |c: u8| match c {
        b'_' => b'-',
        c => c.to_ascii_lowercase(),
    };
    a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| norm(x) == norm(y))
}

/// Per-connection scratch that a parse fills: field lines to leave out when forwarding, and the
/// client's `X-Forwarded-For` values. Reused from request to request, so it does not allocate
/// once warm.
#[derive(Debug, Default)]
pub struct FieldPlan {
    /// Field lines (with their CRLF) not to forward, in buffer order.
    pub drop: Vec<Span>,
    /// Values of the client's `X-Forwarded-For` lines, in order.
    pub xff: Vec<Span>,
    /// Values of the client's `Forwarded` lines (RFC 7239), in order.
    pub forwarded: Vec<Span>,
    /// The value of the last `X-Forwarded-Proto` line (read only from a trusted proxy).
    pub xfp: Option<Span>,
}

impl FieldPlan {
    pub fn clear(&mut self) {
        self.drop.clear();
        self.xff.clear();
        self.forwarded.clear();
        self.xfp = None;
    }
}

/// Which header fields (by index) a parse decided not to forward; turned into line spans by
/// [`DroppedFields::into_plan`].
#[derive(Debug, Default)]
pub(crate) struct DroppedFields([u64; common::snapshot::MAX_HEADER_COUNT / 64]);

impl DroppedFields {
    pub fn mark(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    pub fn is_marked(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    /// Marks every field named by a `Connection` option, except `protected` names
    /// (RFC 9110 §7.6.1: the fields a connection option names are hop-by-hop).
    pub fn mark_nominated(
        &mut self,
        buf: &[u8],
        headers: &[httparse::Header<'_>],
        options: &[Span],
        protected: &[&[u8]],
    ) {
        if options.is_empty() {
            return;
        }
        for (i, h) in headers.iter().enumerate() {
            let name = h.name.as_bytes();
            if !protected.iter().any(|p| p.eq_ignore_ascii_case(name))
                && options.iter().any(|o| o.of(buf).eq_ignore_ascii_case(name))
            {
                self.mark(i);
            }
        }
    }

    /// Writes the marked fields' lines (with their CRLF), merged when adjacent, into `plan`.
    pub fn into_plan(
        self,
        buf: &[u8],
        headers: &[httparse::Header<'_>],
        fields_end: usize,
        plan: &mut FieldPlan,
    ) {
        for i in (0..headers.len()).filter(|&i| self.is_marked(i)) {
            let start = offset_in(buf, headers[i].name.as_bytes());
            let end = line_end(buf, headers, i, fields_end);
            match plan.drop.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => plan.drop.push(Span { start, end }),
            }
        }
    }
}

/// End (after its line break) of header field `i`'s line: where the next field starts, or
/// `fields_end` for the last one.
pub(crate) fn line_end(
    buf: &[u8],
    headers: &[httparse::Header<'_>],
    i: usize,
    fields_end: usize,
) -> usize {
    headers
        .get(i + 1)
        .map_or(fields_end, |n| offset_in(buf, n.name.as_bytes()))
}

/// Whether the line ending just before `end` ends in CRLF (httparse also accepts a bare LF,
/// which a downstream parser might read differently).
pub(crate) fn crlf_before(buf: &[u8], end: usize) -> bool {
    end >= 2 && &buf[end - 2..end] == b"\r\n"
}

/// The field lines a forwarded head keeps: everything between `fields_start` and `fields_end`
/// except the plan's dropped lines (for tests).
#[cfg(test)]
pub(crate) fn kept_fields(
    buf: &[u8],
    fields_start: usize,
    fields_end: usize,
    plan: &FieldPlan,
) -> String {
    let mut out = Vec::new();
    let mut at = fields_start;
    for d in &plan.drop {
        out.extend_from_slice(&buf[at..d.start]);
        at = d.end;
    }
    out.extend_from_slice(&buf[at..fields_end]);
    String::from_utf8(out).expect("test heads are ASCII")
}

/// Offset of `part` (a sub-slice of `buf`) within `buf`.
#[inline]
pub(crate) fn offset_in(buf: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - buf.as_ptr() as usize
}

/// The method and target of the whole request line at the start of `buf` (`METHOD SP
/// TARGET SP HTTP/x.y CRLF`, the method a token), for a head that timed out before its end.
pub(crate) fn request_line(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    let mut parts = buf[..end].split(|&b| b == b' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    let ok = parts.next().is_none()
        && !method.is_empty()
        && method.iter().all(token)
        && !target.is_empty()
        && target.iter().all(|&b| b.is_ascii_graphic())
        && version.starts_with(b"HTTP/");
    ok.then_some((method, target))
}

/// The value of the one field line named `name` (case-insensitively) among the whole lines
/// after the request line at the start of `buf`, a head that was refused before it parsed:
/// `None` without one, or with two (a second spelled with `_`, which CGI-style servers read
/// as the same, included). Not the hot path: a refused head only.
pub(crate) fn raw_single_field<'a>(buf: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    // The head's whole lines, up to the empty line that ends it (CRLF or a bare LF, which
    // the parser refused): nothing of a body or of the next request behind it.
    let whole = buf.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let mut found = None;
    for line in buf[..whole].split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if same_field_name(&line[..colon], name) {
            if found.is_some() || !line[..colon].eq_ignore_ascii_case(name) {
                return None;
            }
            found = Some(trim_ows(&line[colon + 1..]));
        }
    }
    found
}

/// Trims optional whitespace (SP / HTAB) at both ends.
#[inline]
pub(crate) fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// Parses a Content-Length value: 1*DIGIT, nothing else, no overflow.
pub(crate) fn parse_content_length(v: &[u8]) -> Option<u64> {
    let v = trim_ows(v);
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in v {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

/// The comma-separated elements of a list-valued field, trimmed, empty ones skipped
/// (RFC 9110 §5.6.1).
pub(crate) fn list_elements(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',')
        .map(trim_ows)
        .filter(|e| !e.is_empty())
}

/// The values of the field lines named `name` in `fields` (a head's field lines, each
/// ending in CRLF), in order. For the rare fields read again after parsing (an upgrade's).
pub(crate) fn field_values<'a>(
    fields: &'a [u8],
    name: &'a [u8],
) -> impl Iterator<Item = &'a [u8]> + 'a {
    crate::policy::each_field(fields, 0, fields.len())
        .filter(move |(_, n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, _, value)| value)
}

/// Whether an upgrade to `protocol` is passed on: any but `h2c`, whose upgrade would turn the
/// connection into HTTP/2 straight to the upstream, past routing, policies and the access
/// log (RFC 9113 3.1 deprecates it; the gateway takes HTTP/2 by prior knowledge or ALPN).
pub(crate) fn upgrade_passed(protocol: &[u8]) -> bool {
    let name = protocol.split(|&b| b == b'/').next().unwrap_or(protocol);
    !name.eq_ignore_ascii_case(b"h2c")
}

/// The protocols a request's `Upgrade` lines (all of them, RFC 9110 5.3) offer that go to
/// the upstream.
pub(crate) fn offered_upgrades(fields: &[u8]) -> impl Iterator<Item = &[u8]> {
    field_values(fields, b"upgrade")
        .flat_map(list_elements)
        .filter(|p| upgrade_passed(p))
}

/// Whether a `101` (its field lines `resp_fields`) switched to protocols the request
/// (`req_fields`) offered: its `Upgrade` must name them (RFC 9110 7.8), and a server must not
/// switch to one the client did not ask for. A name offered without a version takes any.
pub(crate) fn switched_as_offered(resp_fields: &[u8], req_fields: &[u8]) -> bool {
    let mut named = false;
    for p in field_values(resp_fields, b"upgrade").flat_map(list_elements) {
        named = true;
        let name = p.split(|&b| b == b'/').next().unwrap_or(p);
        let offered = offered_upgrades(req_fields).any(|o| {
            o.eq_ignore_ascii_case(p) || (!o.contains(&b'/') && o.eq_ignore_ascii_case(name))
        });
        if !offered {
            return false;
        }
    }
    named
}

/// Result of folding Transfer-Encoding lines.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct TransferCodings {
    pub present: bool,
    /// `chunked` is the last coding.
    pub chunked_last: bool,
    /// `chunked` appears.
    chunked: bool,
    /// A coding other than `chunked` appears.
    pub other: bool,
    /// Something is malformed (not a token, `chunked` twice or not last).
    pub malformed: bool,
    /// No framing can be read from them: a coding that is not a token, or `chunked` twice
    /// (RFC 9112 6.1: a sender must not apply it more than once).
    pub unframeable: bool,
}

impl TransferCodings {
    pub fn add_line(&mut self, v: &[u8]) {
        self.present = true;
        for coding in list_elements(v) {
            // Parameters (`;q=`) are not allowed on transfer codings we accept; a token check
            // rejects them, as well as quoted or otherwise odd names.
            if !coding.iter().all(|&b| common::snapshot::is_tchar(b)) {
                self.malformed = true;
                self.unframeable = true;
                continue;
            }
            if self.chunked_last {
                // Anything after chunked, including a second chunked.
                self.malformed = true;
            }
            if coding.eq_ignore_ascii_case(b"chunked") {
                self.unframeable |= self.chunked;
                self.chunked = true;
                self.chunked_last = true;
            } else {
                self.other = true;
                self.chunked_last = false;
            }
        }
    }
}

/// The longest DNS name, in characters without a trailing dot (RFC 1035 2.3.4).
const MAX_DNS_NAME: usize = 253;

/// Whether `v` is a syntactically valid `Host` value: uri-host [ ":" port ] (RFC 9110 §7.2),
/// with no userinfo, path or whitespace. Empty is valid syntax (an authority-less URI); the
/// request parser refuses it for the http URIs the gateway serves.
pub(crate) fn valid_host(v: &[u8]) -> bool {
    let (host, port) = if v.first() == Some(&b'[') {
        let Some(close) = v.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &v[1..close];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return false;
        }
        match &v[close + 1..] {
            [] => (&v[..0], None),
            [b':', port @ ..] => (&v[..0], Some(port)),
            _ => return false,
        }
    } else {
        match v.iter().position(|&b| b == b':') {
            // An empty host before a port (`:80`) is an http URI without a host all the
            // same (RFC 9110 4.2.1); only the whole value may be empty here (see above).
            Some(0) => return false,
            Some(c) => (&v[..c], Some(&v[c + 1..])),
            None => (v, None),
        }
    };
    // RFC 3986's reg-name also takes sub-delims and escapes, which no DNS name has: a
    // wildcard route would take `evil.com,api.a.test` for one of its names, and upstreams
    // read `X-Forwarded-Host: evil.com,api.a.test` as a list whose first element is the
    // client's. Unreserved characters only (as the empty labels below).
    let host_ok = host
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    // No empty label (`.a`, `a..b`; nginx refuses the second), which no DNS name has: a
    // wildcard route would otherwise take `x..a.test` for one of its names. One trailing
    // dot ends a fully qualified name.
    // Nor one longer than a DNS name may be (253 characters, RFC 1035 2.3.4): routes match
    // names up to that only, so a longer one took the routes of any host instead of a
    // wildcard route's (and its policies).
    let labels_ok = host.is_empty() || {
        let name = host.strip_suffix(b".").unwrap_or(host);
        !name.is_empty()
            && name.len() <= MAX_DNS_NAME
            && name.split(|&b| b == b'.').all(|l| !l.is_empty())
    };
    // RFC 3986's port is any run of digits, but one past 65535 names no TCP port: a Host
    // naming one is refused (400) rather than routed as if it named a real one.
    let port_ok = port.is_none_or(|p| {
        p.len() <= 5
            && p.iter().all(u8::is_ascii_digit)
            && p.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= 65535
    });
    host_ok && labels_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `head` to a [`Reparse`] in pieces of `step` bytes: the lengths at which a parse
    /// was due.
    fn parses(head: &[u8], step: usize, marks: &[usize]) -> Vec<usize> {
        let mut r = Reparse::default();
        let mut due = Vec::new();
        for end in (step..head.len() + step).step_by(step) {
            let buf = &head[..end.min(head.len())];
            if r.due(buf, marks) {
                due.push(buf.len());
            }
        }
        due
    }

    #[test]
    fn a_head_in_pieces_is_parsed_a_few_times_and_when_it_ends() {
        let mut head = b"\r\n\r\nGET /a HTTP/1.1\r\nHost: a\r\n".to_vec();
        for i in 0..200 {
            head.extend_from_slice(format!("X-Field-{i}: {}\r\n", "v".repeat(40)).as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let len = head.len();
        for step in [1, 2, 3, 7, 64] {
            let due = parses(&head, step, &[]);
            // The first piece, each doubling, and the end: never once per line or per piece.
            assert_eq!(due[0], step, "step {step}");
            assert_eq!(*due.last().unwrap(), len, "step {step}: {due:?}");
            assert!(
                due.len() <= 2 + len.ilog2() as usize,
                "step {step}: {due:?}"
            );
            assert!(
                due.windows(2).all(|w| w[1] >= 2 * w[0] || w[1] == len),
                "{due:?}"
            );
        }
        // The empty line's CR LF split over two pieces, and a bare LF ending it.
        for head in [
            &b"GET / HTTP/1.1\r\nHost: aaaaaaaaaaaaaaaaaaaaa\r\n\r\n"[..],
            b"GET / HTTP/1.1\n\n",
        ] {
            for step in 1..head.len() {
                assert_eq!(
                    *parses(head, step, &[]).last().unwrap(),
                    head.len(),
                    "{step}"
                );
            }
        }
    }

    #[test]
    fn empty_lines_before_a_head_and_crossed_bounds() {
        // Empty lines before a request line (RFC 9112 2.2) do not end anything.
        let blank = b"\r\n".repeat(4000);
        let due = parses(&blank, 2, &[]);
        assert_eq!(due, [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]);
        assert_eq!(parses(b"\n\n\n\nG\n\n", 1, &[]), [1, 2, 4, 7]);
        // The parser's size bounds: a parse where each is reached, whatever else.
        let long = b"GET /"
            .iter()
            .copied()
            .chain([b'a'; 5000])
            .collect::<Vec<_>>();
        assert_eq!(
            parses(&long, 100, &[1000, 3001]),
            [100, 200, 400, 800, 1000, 2000, 3100]
        );
        // A CR no LF follows: malformed, parsed at once (the first version waited for the
        // header timeout); one at the end of a piece once the next piece comes.
        let mut r = Reparse::default();
        assert!(r.due(b"GET /r HTTP/1.1\r\nHost: a\r\n", &[]));
        assert!(r.due(b"GET /r HTTP/1.1\r\nHost: a\r\n\r\r", &[]));
        let mut r = Reparse::default();
        assert!(r.due(b"GET /r HTTP/1.1\r", &[]));
        assert!(r.due(b"GET /r HTTP/1.1\rHost: a\r\r", &[]));
        // A line of whitespace (or folded) after the fields.
        for (first, then) in [
            (&b"\r\n"[..], &b" \r\n"[..]),
            (b"\r\n", b"\t\r\n"),
            (b"\n", b" \n"),
        ] {
            let mut r = Reparse::default();
            let head = [&b"GET /r HTTP/1.1\r\nHost: a"[..], first].concat();
            assert!(r.due(&head, &[]));
            assert!(r.due(&[&head[..], then].concat(), &[]), "{then:?}");
        }
        // A new head in the same buffer starts over.
        let mut r = Reparse::default();
        assert!(r.due(b"GET / HTTP/1.1\r\n", &[]));
        assert!(!r.due(b"GET / HTTP/1.1\r\nA", &[]));
        assert!(r.due(b"GE", &[]));
    }

    #[test]
    fn a_refused_heads_fields_are_read_up_to_its_end_only() {
        fn id(buf: &[u8]) -> Option<&[u8]> {
            raw_single_field(buf, b"x-request-id")
        }
        assert_eq!(
            id(b"GET / HTTP/1.1\r\nX-Request-Id:  a1 \r\n\r\n"),
            Some(&b"a1"[..])
        );
        assert_eq!(
            id(b"GET / HTTP/1.1\r\nx-request-id: a\r\nX-REQUEST-ID: b\r\n\r\n"),
            None
        );
        // A copy spelled with `_` is a second one (the review of 17ae934 found it kept).
        for head in [
            &b"GET / HTTP/1.1\r\nX-Request-Id: a\r\nX_Request_Id: b\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nx_request_id: b\r\nX-Request-Id: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nX_Request_Id: b\r\n\r\n",
        ] {
            assert_eq!(id(head), None, "{}", String::from_utf8_lossy(head));
        }
        // Not past the empty line, with CRLF or bare LF: a body or the next request.
        assert_eq!(
            id(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nX-Request-Id: next\r\n"),
            None
        );
        assert_eq!(id(b"GET / HTTP/1.1\nHost: a\n\nX-Request-Id: next\n"), None);
        // A head cut short: its whole lines only.
        assert_eq!(
            id(b"GET / HTTP/1.1\r\nX-Request-Id: w\r\nX-Req"),
            Some(&b"w"[..])
        );
        assert_eq!(id(b"GET / HTTP/1.1\r\nX-Request-Id: cut"), None);
        assert_eq!(
            request_line(b"GET /a?b HTTP/1.1\r\nHo"),
            Some((&b"GET"[..], &b"/a?b"[..]))
        );
        for bad in [
            &b"GET /a HTTP/1.1"[..],
            b"GET /a\r\n",
            b"G(T /a HTTP/1.1\r\n",
            b"\x16\x03 x\r\n",
        ] {
            assert_eq!(request_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn content_length() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b" 42 "), Some(42));
        for bad in [
            &b""[..],
            b"-1",
            b"0x10",
            b"1_000",
            b"1,1",
            b"99999999999999999999",
            b"+5",
        ] {
            assert_eq!(parse_content_length(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn transfer_codings() {
        let fold = |lines: &[&[u8]]| {
            let mut t = TransferCodings::default();
            for l in lines {
                t.add_line(l);
            }
            (t.chunked_last, t.other, t.malformed)
        };
        let unframeable = |lines: &[&[u8]]| {
            let mut t = TransferCodings::default();
            for l in lines {
                t.add_line(l);
            }
            t.unframeable
        };
        assert!(unframeable(&[b"chunked, chunked"]));
        assert!(unframeable(&[b"chunked", b"gzip, Chunked"]));
        assert!(unframeable(&[b"\"chunked\""]));
        assert!(!unframeable(&[b"gzip, chunked"]));
        assert!(!unframeable(&[b"chunked, gzip"]));
        assert_eq!(fold(&[b"chunked"]), (true, false, false));
        assert_eq!(fold(&[b"CHUNKED"]), (true, false, false));
        assert_eq!(fold(&[b"chunked,"]), (true, false, false));
        assert_eq!(fold(&[b"gzip, chunked"]), (true, true, false));
        assert_eq!(fold(&[b"chunked", b"identity"]), (false, true, true));
        assert_eq!(fold(&[b"chunked, chunked"]), (true, false, true));
        assert_eq!(fold(&[b"\"chunked\""]), (false, false, true));
        assert_eq!(fold(&[b"xchunked"]), (false, true, false));
    }

    #[test]
    fn host_values() {
        for ok in [
            &b"localhost"[..],
            b"a.b:8080",
            b"a.b:65535",
            b"a.b:",
            b"a.b.",
            b"a.b.:80",
            b"[::1]:80",
            b"[::1]",
            b"",
            b"x_y",
        ] {
            assert!(valid_host(ok), "{ok:?}");
        }
        for bad in [
            &b"user@localhost"[..],
            b"a b",
            b"a/b",
            b"a:port",
            b"[::1",
            b"[zz]",
            b"a:123456",
            b"a:65536",
            b"[::1]:99999",
            b":80",
            b":",
            b".a.test",
            b"x..a.test",
            b"a.test..",
            b"evil.com,api.a.test",
            b"a;b.test",
            b"a%2e.test",
            b"a=b",
            b".",
        ] {
            assert!(!valid_host(bad), "{bad:?}");
        }
        // The longest name a DNS name may be, and one longer (its routes would not be found).
        let longest = format!("{}.test", "a".repeat(248));
        assert!(valid_host(longest.as_bytes()));
        assert!(valid_host(format!("{longest}.:80").as_bytes()));
        assert!(!valid_host(format!("a{longest}").as_bytes()));
    }
}
