//! Building a forwarded head: the new request line (when the target changes), the fields the
//! gateway adds, and the list of pieces (kept runs of the original head, added fields, body
//! bytes) that one vectored write sends.
//!
//! Hot path: writes into a reused scratch buffer only; no allocation once it has grown.

use std::net::IpAddr;

use crate::codec::request::RequestHead;
use crate::codec::response::ResponseHead;
use crate::codec::{BodyKind, FieldPlan, Span};
use crate::gather::Piece;

/// Writes into `out` (cleared first) the rewritten request line, if the target changes
/// (absolute form, `strip_prefix_len` bytes of prefix to remove, or a `rewrite` path that
/// replaces the path and keeps the query), and the fields the gateway adds, ending with the
/// blank line. Returns their spans in `out`. `peer` is the socket's (appended to
/// `X-Forwarded-For`), `client` the client's address as the policies take it (`X-Real-IP`:
/// the peer, or behind trusted proxies the address they name). `scheme` is the listener's
/// (the `proto=` of the gateway's `Forwarded` element), `proto` the client's
/// (`X-Forwarded-Proto`: a trusted
/// proxy's word for it, or the listener's); `added`, lines the policies and the route add;
/// `sets_host`: one of them is the `Host`, so an absolute-form target's authority does not
/// become one.
#[allow(clippy::too_many_arguments)]
pub fn request_extras(
    buf: &[u8],
    head: &RequestHead,
    plan: &FieldPlan,
    strip_prefix_len: usize,
    rewrite: Option<&[u8]>,
    peer: IpAddr,
    client: IpAddr,
    scheme: &[u8],
    proto: &[u8],
    added: &[u8],
    sets_host: bool,
    query_drops: &[Span],
    out: &mut Vec<u8>,
) -> (Option<Span>, Span) {
    out.clear();
    let mut target = head.origin_target.of(buf);
    // Bytes of the path to leave out: a stripped prefix, or the whole path for a rewrite.
    let strip = match rewrite {
        Some(_) => head.path_len,
        None => strip_prefix_len.min(head.path_len),
    };
    // An HTTP/1.0 request line is rewritten to the gateway's version.
    let version = head.http10 && !head.forwards_http10();
    let line =
        if head.absolute || strip > 0 || !query_drops.is_empty() || rewrite.is_some() || version {
            let origin = head.origin_target.start;
            target = &target[strip..];
            out.extend_from_slice(head.method.of(buf));
            out.push(b' ');
            if let Some(path) = rewrite {
                out.extend_from_slice(path);
            } else if target.first() != Some(&b'/') {
                out.push(b'/');
            }
            // Pairs of the query to leave out, by their start in the buffer.
            let base = origin + strip;
            push_target_without(out, target, |at, _| {
                crate::policy::span_starts_at(query_drops, base + at)
            });
            out.extend_from_slice(if head.forwards_http10() {
                b" HTTP/1.0\r\n"
            } else {
                b" HTTP/1.1\r\n"
            });
            Some(Span {
                start: 0,
                end: out.len(),
            })
        } else {
            None
        };
    let tail_start = out.len();
    if head.absolute && !sets_host {
        if let Some(h) = head.host {
            out.extend_from_slice(b"Host: ");
            out.extend_from_slice(h.of(buf));
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"X-Forwarded-For: ");
    for v in &plan.xff {
        out.extend_from_slice(v.of(buf));
        out.extend_from_slice(b", ");
    }
    let peer_text = out.len();
    write_ip(out, peer);
    let peer_text = peer_text..out.len();
    out.extend_from_slice(b"\r\nX-Real-IP: ");
    match client == peer {
        // The usual case (no trusted proxies): the text just written, not formatted again.
        true => out.extend_from_within(peer_text),
        false => write_ip(out, client),
    }
    out.extend_from_slice(b"\r\nX-Forwarded-Proto: ");
    out.extend_from_slice(proto);
    out.extend_from_slice(b"\r\n");
    if !plan.forwarded.is_empty() {
        // A client's (or a proxy's before it) Forwarded goes on with the gateway's element
        // for the client it saw appended, so an upstream reading the last element is told
        // the truth (only the elements before it are the client's word).
        out.extend_from_slice(b"Forwarded: ");
        for v in &plan.forwarded {
            out.extend_from_slice(v.of(buf));
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(b"for=");
        let shown = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
            v4 => v4,
        };
        match shown {
            IpAddr::V4(_) => write_ip(out, peer),
            IpAddr::V6(_) => {
                out.extend_from_slice(b"\"[");
                write_ip(out, peer);
                out.extend_from_slice(b"]\"");
            }
        }
        out.extend_from_slice(b";proto=");
        out.extend_from_slice(scheme);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(h) = head.host {
        if !h.is_empty() {
            out.extend_from_slice(b"X-Forwarded-Host: ");
            out.extend_from_slice(h.of(buf));
            out.extend_from_slice(b"\r\n");
        }
    }
    if head.body == BodyKind::Chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    if head.upgrade.is_some() {
        out.extend_from_slice(b"Connection: upgrade\r\nUpgrade: ");
        let fields = &buf[head.fields_start..head.fields_end];
        for (i, protocol) in crate::codec::offered_upgrades(fields).enumerate() {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(protocol);
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(added);
    out.extend_from_slice(b"\r\n");
    (
        line,
        Span {
            start: tail_start,
            end: out.len(),
        },
    )
}

/// Appends `target` without the pairs of its query that `dropped` (given each pair's offset
/// in `target` and its raw name) says to leave out; the `?` goes when no pair is left.
pub fn push_target_without(
    out: &mut Vec<u8>,
    target: &[u8],
    mut dropped: impl FnMut(usize, &[u8]) -> bool,
) {
    let Some(q) = target.iter().position(|&b| b == b'?') else {
        out.extend_from_slice(target);
        return;
    };
    out.extend_from_slice(&target[..q]);
    // A kept pair goes out after the separator it came after (`?` for the first kept).
    let mut first = true;
    let mut at = q + 1;
    for pair in target[q + 1..].split(|&b| crate::policy::is_query_separator(b)) {
        let start = at;
        at += pair.len() + 1;
        let name = pair.split(|&b| b == b'=').next().unwrap_or(pair);
        if dropped(start, name) {
            continue;
        }
        out.push(if first { b'?' } else { target[start - 1] });
        first = false;
        out.extend_from_slice(pair);
    }
}

/// The kept field lines between `at` and `end`: everything except `drops` (in order).
struct KeptFields<'a> {
    drops: std::slice::Iter<'a, Span>,
    at: usize,
    end: usize,
    done: bool,
}

impl Iterator for KeptFields<'_> {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        if let Some(d) = self.drops.next() {
            let piece = Piece::Src(Span {
                start: self.at,
                end: d.start,
            });
            self.at = d.end;
            return Some(piece);
        }
        if self.done {
            return None;
        }
        self.done = true;
        Some(Piece::Src(Span {
            start: self.at,
            end: self.end,
        }))
    }
}

/// The pieces of a forwarded head: the start line, the kept field lines, the added fields
/// (with the blank line) and the body bytes that came with the head.
pub fn head_pieces<'a>(
    line: Piece,
    fields: (usize, usize),
    drops: &'a [Span],
    added: Span,
    body: Span,
) -> impl Iterator<Item = Piece> + 'a {
    std::iter::once(line)
        .chain(KeptFields {
            drops: drops.iter(),
            at: fields.0,
            end: fields.1,
            done: false,
        })
        .chain([Piece::Extra(added), Piece::Src(body)])
}

/// The pieces of a forwarded request: request line (rewritten or original), kept fields,
/// added fields, then the body bytes that came with the head.
pub fn request_pieces<'a>(
    head: &RequestHead,
    plan: &'a FieldPlan,
    line: Option<Span>,
    added: Span,
    body_end: usize,
) -> impl Iterator<Item = Piece> + 'a {
    let first = match line {
        Some(l) => Piece::Extra(l),
        None => Piece::Src(Span {
            start: head.start,
            end: head.fields_start,
        }),
    };
    let body = Span {
        start: head.head_end,
        end: body_end,
    };
    head_pieces(
        first,
        (head.fields_start, head.fields_end),
        &plan.drop,
        added,
        body,
    )
}

/// The pieces of a relayed response head and the first `body_len` body bytes after it.
pub fn response_pieces<'a>(
    resp: &ResponseHead,
    plan: &'a FieldPlan,
    added: Span,
    body_len: usize,
) -> impl Iterator<Item = Piece> + 'a {
    let line = Piece::Src(Span {
        start: 0,
        end: resp.fields_start,
    });
    let body = Span {
        start: resp.head_end,
        end: resp.head_end + body_len,
    };
    head_pieces(
        line,
        (resp.fields_start, resp.fields_end),
        &plan.drop,
        added,
        body,
    )
}

/// Appends the textual form of `ip` without allocating.
pub fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    use std::io::Write;
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        // Every proxied request writes one (X-Forwarded-For): digits by hand, not through
        // the formatting machinery (about 600 instructions less per request).
        // Into a stack array first, then one copy: no capacity check per digit.
        IpAddr::V4(v4) => {
            let mut text = [0u8; 16];
            let mut n = 0;
            for octet in v4.octets() {
                if octet >= 100 {
                    text[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    text[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                text[n] = b'0' + octet % 10;
                text[n + 1] = b'.';
                n += 2;
            }
            // The last octet's dot is not part of the address.
            out.extend_from_slice(&text[..n - 1]);
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_addresses_are_written_as_display_writes_them() {
        let mut out = Vec::new();
        for octet in 0..=255u8 {
            for v4 in [
                std::net::Ipv4Addr::new(octet, 0, 255, octet),
                std::net::Ipv4Addr::new(9, octet, 10, 100),
            ] {
                out.clear();
                write_ip(&mut out, IpAddr::V4(v4));
                assert_eq!(out, v4.to_string().as_bytes());
            }
        }
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        out.clear();
        write_ip(&mut out, mapped);
        assert_eq!(out, b"192.0.2.7");
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        out.clear();
        write_ip(&mut out, v6);
        assert_eq!(out, b"2001:db8::1");
    }
    use crate::codec::request::parse_request;
    use crate::gather::Gather;

    const LIMITS: common::Limits = common::Limits {
        max_header_bytes: 8192,
        max_header_count: 64,
        max_uri_bytes: 4096,
        max_body_bytes: 1 << 20,
        max_connections: 1,
        merge_slashes: true,
    };

    /// The head the upstream gets for `request` (its body bytes included).
    fn forwarded(
        request: &[u8],
        strip: usize,
        scheme: &[u8],
        added: &[u8],
        query_drops: &[(usize, usize)],
    ) -> String {
        forwarded_to(request, strip, None, scheme, added, query_drops)
    }

    fn forwarded_to(
        request: &[u8],
        strip: usize,
        rewrite: Option<&[u8]>,
        scheme: &[u8],
        added: &[u8],
        query_drops: &[(usize, usize)],
    ) -> String {
        let mut plan = FieldPlan::default();
        let head = parse_request(request, &LIMITS, &mut plan).unwrap().unwrap();
        let mut out = Vec::new();
        let query_drops: Vec<Span> = query_drops
            .iter()
            .map(|&(start, end)| Span { start, end })
            .collect();
        let (line, tail) = request_extras(
            request,
            &head,
            &plan,
            strip,
            rewrite,
            "192.0.2.7".parse().unwrap(),
            "198.51.100.9".parse().unwrap(),
            scheme,
            scheme,
            added,
            false,
            &query_drops,
            &mut out,
        );
        let pieces = request_pieces(&head, &plan, line, tail, request.len());
        let g = Gather::new(request.to_vec(), out, Vec::new(), pieces);
        let (src, extra, iov) = g.into_parts();
        // Rebuild the bytes the iovecs point at, in order.
        let mut bytes = Vec::new();
        for v in &iov {
            // SAFETY: each iovec points into `src` or `extra`, both alive here.
            bytes.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
            });
        }
        drop((src, extra));
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn forwarding_fields_are_appended_and_hop_by_hop_ones_left_out() {
        let got = forwarded(
            b"POST /p HTTP/1.1\r\nHost: api.test\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: gopher\r\nX-Real-IP: 6.6.6.6\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nx_real_ip: 7.7.7.7\r\nContent-Length: 2\r\n\r\nhi",
            0,
            b"https",
            b"X-Consumer-Id: app\r\n",
            &[],
        );
        assert_eq!(
            got,
            "POST /p HTTP/1.1\r\nHost: api.test\r\nContent-Length: 2\r\nX-Forwarded-For: 10.0.0.1, 192.0.2.7\r\nX-Real-IP: 198.51.100.9\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: api.test\r\nX-Consumer-Id: app\r\n\r\nhi"
        );
    }

    #[test]
    fn an_http10_request_goes_on_as_http11_when_it_names_its_host() {
        let got = forwarded(b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n", 0, b"http", b"", &[]);
        assert!(got.starts_with("GET /x HTTP/1.1\r\nHost: a\r\n"), "{got}");
        // Without one, HTTP/1.1 would need a Host it cannot make up.
        let got = forwarded(b"GET /x HTTP/1.0\r\n\r\n", 0, b"http", b"", &[]);
        assert!(
            got.starts_with("GET /x HTTP/1.0\r\nX-Forwarded-For: "),
            "{got}"
        );
    }

    #[test]
    fn the_target_is_rewritten_for_a_stripped_prefix_an_absolute_form_and_a_dropped_key() {
        let got = forwarded(
            b"GET /api/v1/x?k=1 HTTP/1.1\r\nHost: a\r\n\r\n",
            4,
            b"http",
            b"",
            &[],
        );
        assert!(
            got.starts_with("GET /v1/x?k=1 HTTP/1.1\r\nHost: a\r\n"),
            "{got}"
        );
        let got = forwarded(
            b"GET /api/v1/x?k=1 HTTP/1.1\r\nHost: a\r\n\r\n",
            4,
            b"http",
            b"",
            &[(14, 17)],
        );
        assert!(got.starts_with("GET /v1/x HTTP/1.1\r\n"), "{got}");
        let got = forwarded(
            b"GET http://b.test/p HTTP/1.1\r\nHost: ignored\r\n\r\n",
            0,
            b"http",
            b"",
            &[],
        );
        assert!(got.starts_with("GET /p HTTP/1.1\r\n"), "{got}");
        assert!(
            got.contains("\r\nHost: b.test\r\n") && !got.contains("ignored"),
            "{got}"
        );
        // `?api_key=s` is the only parameter: the `?` goes too.
        let req = b"GET /p?api_key=s HTTP/1.1\r\nHost: a\r\n\r\n";
        let got = forwarded(req, 0, b"http", b"", &[(7, 16)]);
        assert!(got.starts_with("GET /p HTTP/1.1\r\n"), "{got}");
        // Every pair given goes, wherever it is; empty pairs stay as they came.
        let req = b"GET /p?k=1&a=2&&k=3&b&k=4 HTTP/1.1\r\nHost: a\r\n\r\n";
        let got = forwarded(req, 0, b"http", b"", &[(7, 10), (16, 19), (22, 25)]);
        assert!(got.starts_with("GET /p?a=2&&b HTTP/1.1\r\n"), "{got}");
    }

    #[test]
    fn a_rewrite_replaces_the_path_and_keeps_the_query() {
        let req = b"GET /products/7?lang=en&key=s3cret HTTP/1.1\r\nHost: h\r\n\r\n";
        let got = forwarded_to(req, 0, Some(b"/items/7"), b"http", b"", &[]);
        assert!(
            got.starts_with("GET /items/7?lang=en&key=s3cret HTTP/1.1\r\n"),
            "{got}"
        );
        // The API key parameter (`&key=s3cret`, bytes 23..34) is still cut out.
        let got = forwarded_to(req, 0, Some(b"/items/7"), b"http", b"", &[(24, 34)]);
        assert!(
            got.starts_with("GET /items/7?lang=en HTTP/1.1\r\n"),
            "{got}"
        );
        let bare = b"GET /products/7 HTTP/1.1\r\nHost: h\r\n\r\n";
        let got = forwarded_to(bare, 0, Some(b"/items/7"), b"http", b"", &[]);
        assert!(got.starts_with("GET /items/7 HTTP/1.1\r\n"), "{got}");
    }
}
