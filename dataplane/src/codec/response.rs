//! Response heads from upstreams: httparse plus framing and hop-by-hop rules (RFC 9112 §6.3,
//! RFC 9110 §7.6.1).
//!
//! Hot path, no allocation. A response the gateway cannot frame without doubt (differing
//! Content-Length values, bare LF line ends, malformed fields) is an error that becomes 502.

use std::mem::MaybeUninit;

use common::snapshot::MAX_HEADER_COUNT;

use super::{
    crlf_before, line_end, offset_in, parse_content_length, trim_ows, BodyKind, DroppedFields,
    FieldPlan, FieldRef, Span, TransferCodings,
};

/// A parsed response head; offsets are into the buffer given to [`parse_response`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// Start of the first field line (end of the status line).
    pub fields_start: usize,
    /// Start of the final empty line.
    pub fields_end: usize,
    pub head_end: usize,
    pub body: BodyKind,
    /// The upstream connection can carry another request once this body is read.
    pub reusable: bool,
    /// The upstream's `X-Request-Id` field, which the gateway's replaces.
    pub request_id: Option<FieldRef>,
    /// The body carries a transfer coding other than `chunked` (or codings that cannot be
    /// taken apart): an HTTP/1.1 client gets it as it is, with its `Transfer-Encoding`; an
    /// HTTP/2 client cannot (HTTP/2 has no transfer codings, RFC 9113 §8.2.2).
    pub transfer_coded: bool,
    /// The head has a `Transfer-Encoding` field that goes on (not a 1xx's or a 204's), which
    /// an HTTP/1.0 client must not get (RFC 9112 §6.1).
    pub transfer_encoding: bool,
    /// The head has a `Date` field (the gateway adds one where it has none, RFC 9110 §6.6.1).
    pub dated: bool,
}

/// Why a response head is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("malformed response head")]
    Malformed,
    #[error("response head too large")]
    TooLarge,
    #[error("conflicting Content-Length values")]
    ConflictingLength,
}

/// Parses the response head at the start of `buf`. `head_request` says the request was HEAD
/// (so the response has no body whatever it declares). `Ok(None)`: incomplete.
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    max_head: usize,
    plan: &mut FieldPlan,
) -> Result<Option<ResponseHead>, ResponseError> {
    plan.clear();
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADER_COUNT];
    let mut resp = httparse::Response::new(&mut []);
    let head_end = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => {
            return Err(ResponseError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::TooLarge),
        Err(_) => return Err(ResponseError::Malformed),
    };
    if head_end > max_head {
        return Err(ResponseError::TooLarge);
    }
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return Err(ResponseError::Malformed);
    };
    // Three digits whose first is a class 1 to 5 (RFC 9110 §15); httparse takes `020` as 20.
    // Found by fuzzing: such a status line was relayed as it came.
    if !(100..=599).contains(&status) {
        return Err(ResponseError::Malformed);
    }
    let headers = &*resp.headers;
    let fields_end = head_end - 2;
    let fields_start = headers
        .first()
        .map_or(fields_end, |h| offset_in(buf, h.name.as_bytes()));
    // The status line must start the buffer (no leading empty lines in responses) and every
    // line must end in CRLF.
    if !buf.starts_with(b"HTTP/1.")
        || !crlf_before(buf, fields_start)
        || &buf[fields_end..head_end] != b"\r\n"
    {
        return Err(ResponseError::Malformed);
    }

    let mut content_length: Option<u64> = None;
    let mut codings = TransferCodings::default();
    let mut close = version == 0;
    let mut options = [Span::default(); 16];
    let mut n_options = 0;
    let mut dropped = DroppedFields::default();
    let mut cl_lines = DroppedFields::default();
    let mut request_id: Option<FieldRef> = None;
    let mut dated = false;
    // RFC 9110 8.6, RFC 9112 6.1: a 1xx or 204 carries neither Content-Length nor
    // Transfer-Encoding; an upstream's goes no further (nginx drops them too).
    let unframed = status < 200 || status == 204;

    for (i, h) in headers.iter().enumerate() {
        if !crlf_before(buf, line_end(buf, headers, i, fields_end)) {
            return Err(ResponseError::Malformed);
        }
        let name = h.name.as_bytes();
        let value = trim_ows(h.value);
        let mut drop = false;
        match name.len() {
            12 if name.eq_ignore_ascii_case(b"x-request-id") => {
                FieldRef::note(&mut request_id, buf, headers, i, fields_end);
            }
            4 if name.eq_ignore_ascii_case(b"date") => dated = true,
            // Dropped unread where no length may be (a bad one cannot hurt).
            14 if unframed && name.eq_ignore_ascii_case(b"content-length") => drop = true,
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                let n = parse_content_length(value).ok_or(ResponseError::Malformed)?;
                match content_length {
                    Some(prev) if prev != n => return Err(ResponseError::ConflictingLength),
                    // An identical repeat is harmless; forward one.
                    Some(_) => drop = true,
                    None => content_length = Some(n),
                }
                cl_lines.mark(i);
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                codings.add_line(value);
                drop = unframed;
            }
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for opt in super::list_elements(value) {
                    if opt.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !opt.eq_ignore_ascii_case(b"keep-alive")
                        && !opt.eq_ignore_ascii_case(b"upgrade")
                    {
                        // More than can be remembered: the ones past would be passed on,
                        // though the upstream said they are hop-by-hop.
                        if n_options == options.len() {
                            return Err(ResponseError::Malformed);
                        }
                        options[n_options] = Span {
                            start: offset_in(buf, opt),
                            end: offset_in(buf, opt) + opt.len(),
                        };
                        n_options += 1;
                    }
                }
                // A 101's too: the gateway says its own `Connection: upgrade` (RFC 9110
                // 7.6.1, 7.8), whatever other options (or `close`) the upstream's named.
                drop = true;
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => drop = status != 101,
            10 if name.eq_ignore_ascii_case(b"keep-alive") => drop = true,
            16 if name.eq_ignore_ascii_case(b"proxy-connection") => drop = true,
            2 if name.eq_ignore_ascii_case(b"te") => drop = true,
            // Connection-specific (an h2c upgrade's), never end to end.
            14 if name.eq_ignore_ascii_case(b"http2-settings") => drop = true,
            _ => {}
        }
        if drop {
            dropped.mark(i);
        }
    }
    // Date stays whatever Connection says: the gateway adds one only to an answer without
    // it, and a forwarded answer must have one (RFC 9110 6.6.1).
    dropped.mark_nominated(
        buf,
        headers,
        &options[..n_options],
        &[b"content-length", b"transfer-encoding", b"date"],
    );

    if codings.present && version == 0 {
        // An HTTP/1.0 message with Transfer-Encoding has faulty framing (RFC 9112 §6.1):
        // HTTP/1.0 has no transfer codings, so whether the body is chunked is anyone's guess.
        return Err(ResponseError::Malformed);
    }
    let no_body = head_request || (100..200).contains(&status) || status == 204 || status == 304;
    if codings.unframeable && !no_body {
        // `chunked` twice, or a coding that is not a token: where the body ends, and what
        // it holds, is a guess (nginx also answers 502).
        return Err(ResponseError::Malformed);
    }
    let mut reusable = !close;
    if codings.present && content_length.is_some() {
        // Transfer-Encoding overrides Content-Length, which must not reach the client, also
        // on an answer without a body (a HEAD's, a 304); the upstream connection is not
        // trusted again (RFC 9112 §6.3 (3)).
        for i in (0..headers.len()).filter(|&i| cl_lines.is_marked(i)) {
            dropped.mark(i);
        }
        reusable = false;
    }
    let body = if no_body {
        BodyKind::None
    } else if codings.present {
        if codings.chunked_last && !codings.malformed {
            BodyKind::Chunked
        } else {
            reusable = false;
            BodyKind::UntilClose
        }
    } else {
        match content_length {
            Some(0) => BodyKind::None,
            Some(n) => BodyKind::Length(n),
            None => {
                reusable = false;
                BodyKind::UntilClose
            }
        }
    };
    if status == 101 {
        reusable = false;
    }

    dropped.into_plan(buf, headers, fields_end, plan);

    Ok(Some(ResponseHead {
        status,
        fields_start,
        fields_end,
        head_end,
        body,
        reusable,
        request_id,
        transfer_coded: !no_body && codings.present && (codings.other || codings.malformed),
        transfer_encoding: codings.present && !unframed,
        dated,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(input: &[u8], head: bool) -> Result<Option<ResponseHead>, ResponseError> {
        let mut plan = FieldPlan::default();
        parse_response(input, head, 16384, &mut plan)
    }

    /// Forwarded head: every field line minus the dropped ones.
    fn forwarded(input: &[u8]) -> String {
        let mut plan = FieldPlan::default();
        let h = parse_response(input, false, 16384, &mut plan)
            .unwrap()
            .unwrap();
        crate::codec::kept_fields(input, h.fields_start, h.fields_end, &plan)
    }

    #[test]
    fn framing() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false)
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.body, r.reusable, r.head_end),
            (BodyKind::Length(5), true, 38)
        );
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(r.body, BodyKind::None);
        let r = parse(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.body, BodyKind::None);
        let r = parse(b"HTTP/1.1 200 OK\r\n\r\nabc", false)
            .unwrap()
            .unwrap();
        assert_eq!((r.body, r.reusable), (BodyKind::UntilClose, false));
        let r = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.body, r.reusable), (BodyKind::Chunked, true));
        let r = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(!r.reusable);
        let r = parse(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!r.reusable);
    }

    #[test]
    fn te_overrides_cl_and_cl_is_dropped() {
        let input = b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n";
        let r = parse(input, false).unwrap().unwrap();
        assert_eq!((r.body, r.reusable), (BodyKind::Chunked, false));
        assert_eq!(forwarded(input), "Transfer-Encoding: chunked\r\n");
        // Also where no body follows: a HEAD's answer, a 304.
        let mut plan = FieldPlan::default();
        for (input, head) in [
            (&input[..], true),
            (
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 40\r\n\
                  Transfer-Encoding: chunked\r\n\r\n",
                false,
            ),
        ] {
            let r = parse_response(input, head, 16384, &mut plan)
                .unwrap()
                .unwrap();
            assert_eq!(
                (r.body, r.reusable, r.transfer_encoding),
                (BodyKind::None, false, true)
            );
            let kept = crate::codec::kept_fields(input, r.fields_start, r.fields_end, &plan);
            assert_eq!(kept, "Transfer-Encoding: chunked\r\n");
        }
    }

    #[test]
    fn an_http10_answer_with_transfer_encoding_is_refused() {
        for te in ["chunked", "gzip"] {
            let input = format!("HTTP/1.0 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n");
            assert_eq!(
                parse(input.as_bytes(), false),
                Err(ResponseError::Malformed)
            );
        }
    }

    #[test]
    fn a_date_is_noted() {
        let dated = |input: &[u8]| parse(input, false).unwrap().unwrap().dated;
        assert!(dated(
            b"HTTP/1.1 200 OK\r\nDATE: x\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!dated(
            b"HTTP/1.1 200 OK\r\nDates: x\r\nContent-Length: 0\r\n\r\n"
        ));
    }

    #[test]
    fn codings_other_than_chunked_are_marked() {
        let coded = |te: &str, head: bool| {
            let input = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n");
            let r = parse(input.as_bytes(), head).unwrap().unwrap();
            (r.body, r.transfer_coded)
        };
        assert_eq!(coded("chunked", false), (BodyKind::Chunked, false));
        assert_eq!(coded("Chunked", false), (BodyKind::Chunked, false));
        assert_eq!(coded("gzip", false), (BodyKind::UntilClose, true));
        assert_eq!(coded("gzip, chunked", false), (BodyKind::Chunked, true));
        assert_eq!(coded("chunked, gzip", false), (BodyKind::UntilClose, true));
        // Chunked twice, or a coding that is no token: no framing to trust.
        for te in ["chunked, chunked", "\"chunked\"", "gzip;q=1, chunked"] {
            let input = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n");
            assert_eq!(
                parse(input.as_bytes(), false).unwrap_err(),
                ResponseError::Malformed
            );
            // Without a body the field goes unread (dropped from a 204, see below).
            assert!(parse(input.as_bytes(), true).is_ok(), "{te}");
        }
        // No body, nothing to decode.
        assert_eq!(coded("gzip", true), (BodyKind::None, false));
        let r = parse(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert_eq!((r.body, r.transfer_coded), (BodyKind::UntilClose, false));
        let two =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n";
        let r = parse(two, false).unwrap().unwrap();
        assert_eq!((r.body, r.transfer_coded), (BodyKind::Chunked, true));
    }

    #[test]
    fn no_framing_fields_go_out_in_1xx_and_204() {
        for input in [
            &b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-A: 1\r\n\r\n"[..],
            b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nX-A: 1\r\nContent-Length: 7\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nContent-Length: 1\r\nX-A: 1\r\nContent-Length: 2\r\n\r\n",
        ] {
            let r = parse(input, false).unwrap().unwrap();
            assert_eq!((r.body, r.transfer_coded), (BodyKind::None, false));
            assert_eq!(forwarded(input), "X-A: 1\r\n");
        }
        // A 304's length is the GET answer's (RFC 9110 8.6): kept.
        let input = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(forwarded(input), "Content-Length: 5\r\n");
    }

    #[test]
    fn hop_by_hop_fields_are_dropped() {
        let input = b"HTTP/1.1 200 OK\r\nConnection: X-Secret, keep-alive\r\nX-Secret: leak\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: foo\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nTrailer: X-T\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(forwarded(input), "Trailer: X-T\r\nContent-Length: 2\r\n");
        // Date stays, named or not: it must be there, and the gateway adds one only where
        // none came.
        let input = b"HTTP/1.1 200 OK\r\nConnection: Date\r\nDate: Sun, 06 Dec 2026 00:00:00 GMT\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(
            forwarded(input),
            "Date: Sun, 06 Dec 2026 00:00:00 GMT\r\nContent-Length: 2\r\n"
        );
        // More named than the parser keeps: refused, rather than pass the last ones on.
        let many: Vec<String> = (0..17).map(|i| format!("X-O{i}")).collect();
        let input = format!(
            "HTTP/1.1 200 OK\r\nConnection: {}\r\nX-O16: leak\r\nContent-Length: 2\r\n\r\nok",
            many.join(", ")
        );
        assert_eq!(
            parse(input.as_bytes(), false),
            Err(ResponseError::Malformed)
        );
    }

    #[test]
    fn bad_responses() {
        assert_eq!(
            parse(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n",
                false
            ),
            Err(ResponseError::ConflictingLength)
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\nContent-Length: 2\n\n", false),
            Err(ResponseError::Malformed)
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false),
            Err(ResponseError::Malformed)
        );
        assert_eq!(
            parse(b"HTTP/1.1 2000 OK\r\n\r\n", false),
            Err(ResponseError::Malformed)
        );
        // Status codes outside the five classes (a fuzzing find: `020` parsed as 20).
        for line in [
            &b"HTTP/1.1 020 OK"[..],
            b"HTTP/1.1 099 X",
            b"HTTP/1.1 600 X",
            b"HTTP/1.1 999 X",
        ] {
            let mut msg = line.to_vec();
            msg.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
            assert_eq!(
                parse(&msg, false),
                Err(ResponseError::Malformed),
                "{line:?}"
            );
        }
        assert_eq!(
            parse(b"garbage\r\n\r\n", false),
            Err(ResponseError::Malformed)
        );
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\nA: b", false), Ok(None));
        let r = parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.body, BodyKind::Length(2));
    }

    #[test]
    fn split_at_every_offset() {
        let input: &[u8] =
            b"HTTP/1.1 200 OK\r\nConnection: x\r\nX: 1\r\nContent-Length: 3\r\n\r\nabc";
        let full = parse(input, false).unwrap().unwrap();
        for cut in 0..input.len() {
            match parse(&input[..cut], false) {
                Ok(None) => assert!(cut < full.head_end, "cut {cut}"),
                Ok(Some(h)) => assert_eq!(h.head_end, full.head_end),
                Err(e) => panic!("cut {cut}: {e}"),
            }
        }
    }
}
