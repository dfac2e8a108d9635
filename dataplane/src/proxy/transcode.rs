//! JSON/REST calls to gRPC upstreams (a route's `transcoder`): the request's method, path,
//! query and JSON body become one gRPC request message ([`common::transcode`]), and the
//! answer's messages become JSON: one object for a unary method, a JSON array (or
//! newline-delimited JSON when the client sends `Accept: application/x-ndjson`) for a
//! server-streaming one, streamed as the messages arrive.
//!
//! Errors are JSON too, `{"code": N, "message": "...", "details": [...]}` with the HTTP
//! status of the gRPC code (`common::transcode::http_status_for_grpc`): the upstream's
//! status and message (and the `google.rpc.Status` details of `grpc-status-details-bin`,
//! each as `{"@type", "value"}` with the value in base64), a refused request as 400 with
//! `field` naming the bad field, the gateway's own failures (503 for an unreachable
//! upstream, 504 past a deadline). A stream that fails after its first message cannot change
//! its status: newline-delimited JSON ends with an `{"error": {...}}` line, a JSON array is
//! cut short.

use std::sync::Arc;

use bytes::Bytes;
use common::transcode::{http_status_for_grpc, Binding, Transcoder};
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::HeaderMap;

use super::h2forward::Sink;
use crate::error::ErrorKind;

/// A transcoded call's request, ready to go upstream.
pub(super) struct Prepared {
    /// The binding's index in its transcoder.
    pub binding: usize,
    /// The request message in a gRPC frame.
    pub framed: Bytes,
    pub ndjson: bool,
}

/// Why a call cannot be made: the HTTP status and the JSON error body.
pub(super) struct Refused {
    pub status: u16,
    pub body: Vec<u8>,
    /// A 405's `Allow` value: the methods the path takes.
    pub allow: Option<String>,
}

/// Builds the gRPC request of a JSON call: `Err` with the answer when no method maps to
/// the method and path (404, or 405 when another method does), or the request is bad (400).
pub(super) fn prepare(
    t: &Transcoder,
    method: &str,
    target: &str,
    body: &[u8],
    accept: &[u8],
) -> Result<Prepared, Refused> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let (index, vars) = match t.find_index(method, path) {
        Ok(found) => found,
        Err(other_method) => {
            let (status, code, message) = if other_method {
                (405, 12, format!("{path} does not take {method}"))
            } else {
                (404, 5, format!("no method is mapped to {method} {path}"))
            };
            return Err(Refused {
                status,
                body: error_body(code, &message, None, &[]),
                allow: other_method.then(|| t.allowed(path)),
            });
        }
    };
    let b = &t.bindings[index];
    let message = b
        .request_message(&vars, query, body, t.max_message_bytes)
        .map_err(|r| {
            let field = (!r.field.is_empty()).then_some(r.field.as_str());
            let message = match field {
                Some(f) => format!("invalid value at {f}: {}", r.message),
                None => r.message.clone(),
            };
            Refused {
                status: 400,
                body: error_body(3, &message, field, &[]),
                allow: None,
            }
        })?;
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let ndjson = prefers_ndjson(accept);
    Ok(Prepared {
        binding: index,
        framed: framed.into(),
        ndjson,
    })
}

/// Whether `Accept` prefers NDJSON to the JSON array (RFC 9110 12.5.1): each one's weight
/// is the one of the most specific range that matches it (`application/x-ndjson` before
/// `application/*` before `*/*`, media types in any case, 8.3.1), 0 where none does (`q=0`
/// says "not this one", 12.4.2); NDJSON when its weight is the higher (a tie, or no
/// `Accept`, is the array). Before, any range naming NDJSON with a weight above 0 chose it,
/// even `application/json, application/x-ndjson;q=0.1`.
fn prefers_ndjson(accept: &[u8]) -> bool {
    // (specificity: 0 no range, 1 `*/*`, 2 `application/*`, 3 the type; weight in
    // thousandths) for NDJSON, then for JSON.
    let mut best = [(0u8, 0u16); 2];
    for range in accept.split(|&b| b == b',') {
        let mut parts = range.split(|&b| b == b';');
        let media = parts.next().unwrap_or_default().trim_ascii();
        let Some(slash) = media.iter().position(|&b| b == b'/') else {
            continue;
        };
        let (kind, sub) = (&media[..slash], &media[slash + 1..]);
        let weight = parts.find_map(|p| weight(p.trim_ascii())).unwrap_or(1000);
        for (slot, wanted) in best.iter_mut().zip([&b"x-ndjson"[..], b"json"]) {
            let specificity = match (kind, sub) {
                (b"*", b"*") => 1,
                _ if !kind.eq_ignore_ascii_case(b"application") => 0,
                (_, b"*") => 2,
                _ if sub.eq_ignore_ascii_case(wanted) => 3,
                _ => 0,
            };
            if specificity > slot.0 {
                *slot = (specificity, weight);
            } else if specificity == slot.0 && specificity > 0 {
                slot.1 = slot.1.max(weight);
            }
        }
    }
    best[0].1 > best[1].1
}

/// A `q=` parameter's weight in thousandths (RFC 9110 12.4.2: 0 to 1, up to three
/// decimals); `None` for another parameter. A malformed one counts as 1.
fn weight(p: &[u8]) -> Option<u16> {
    if p.len() < 2 || !p[..2].eq_ignore_ascii_case(b"q=") {
        return None;
    }
    let v = &p[2..];
    let (int, frac) = match v.iter().position(|&b| b == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &b""[..]),
    };
    let digits = |d: &[u8]| d.iter().all(u8::is_ascii_digit);
    let whole = match int {
        // More than three decimals is no weight RFC 9110 allows; its first three count
        // (`q=0.0000` is still "not this one").
        b"0" if digits(frac) => 0,
        b"1" if frac.iter().all(|&b| b == b'0') && frac.len() <= 3 => return Some(1000),
        _ => return Some(1000),
    };
    let mut thousandths = 0u16;
    for i in 0..3 {
        thousandths = thousandths * 10 + u16::from(frac.get(i).map_or(0, |d| d - b'0'));
    }
    Some(whole + thousandths)
}

/// `{"code": N, "message": "...", "field": "...", "details": [...]}`.
pub(super) fn error_body(
    code: u32,
    message: &str,
    field: Option<&str>,
    details: &[(String, Vec<u8>)],
) -> Vec<u8> {
    let mut v = serde_json::json!({ "code": code, "message": message });
    if let Some(f) = field {
        v["field"] = f.into();
    }
    let details: Vec<serde_json::Value> = details
        .iter()
        .map(|(type_url, value)| {
            let mut b64 = Vec::new();
            common::keys::encode_b64_into(value, &mut b64);
            serde_json::json!({ "@type": type_url, "value": String::from_utf8_lossy(&b64) })
        })
        .collect();
    v["details"] = details.into();
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The details of a `google.rpc.Status` (field 3, `repeated google.protobuf.Any`): each
/// `type_url` (1) and `value` (2). Malformed input gives what was read before it.
fn status_details(mut b: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((field, value, rest)) = next_field(b) {
        b = rest;
        if field != 3 {
            continue;
        }
        let (mut url, mut data, mut any) = (String::new(), Vec::new(), value.unwrap_or_default());
        while let Some((f, v, rest)) = next_field(any) {
            any = rest;
            match (f, v) {
                (1, Some(v)) => url = String::from_utf8_lossy(v).into_owned(),
                (2, Some(v)) => data = v.to_vec(),
                _ => {}
            }
        }
        out.push((url, data));
    }
    out
}

/// A protobuf field read: its number, its bytes when length-delimited, and the rest.
type Field<'a> = (u64, Option<&'a [u8]>, &'a [u8]);

/// One protobuf field of `b`.
fn next_field(b: &[u8]) -> Option<Field<'_>> {
    let (key, mut rest) = varint(b)?;
    let value = match key & 7 {
        0 => {
            rest = varint(rest)?.1;
            None
        }
        1 => {
            rest = rest.get(8..)?;
            None
        }
        2 => {
            let (len, r) = varint(rest)?;
            let len = usize::try_from(len).ok()?;
            let v = r.get(..len)?;
            rest = &r[len..];
            Some(v)
        }
        5 => {
            rest = rest.get(4..)?;
            None
        }
        _ => return None,
    };
    Some((key >> 3, value, rest))
}

fn varint(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, &b[i + 1..]));
        }
    }
    None
}

/// The gRPC status of an answer: code, message (percent-decoded) and details.
fn grpc_status(fields: &HeaderMap) -> (u32, String, Vec<(String, Vec<u8>)>) {
    let code = fields
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let raw = fields
        .get("grpc-message")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let mut message = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = raw
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (raw[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                message.push(v);
                i += 3;
            }
            (c, _) => {
                message.push(c);
                i += 1;
            }
        }
    }
    let details = fields
        .get("grpc-status-details-bin")
        .and_then(|v| {
            // Unpadded base64, as gRPC sends binary metadata.
            let mut text = v.as_bytes().to_vec();
            while text.len() % 4 != 0 {
                text.push(b'=');
            }
            let mut raw = Vec::new();
            common::keys::decode_b64_pieces(&text, &mut raw).map(|()| raw)
        })
        .map(|raw| status_details(&raw))
        .unwrap_or_default();
    (
        code,
        String::from_utf8_lossy(&message).into_owned(),
        details,
    )
}

/// The JSON encoding of a gRPC answer over another sink.
pub(super) struct JsonSink<K> {
    pub inner: K,
    pub transcoder: Arc<Transcoder>,
    pub binding: usize,
    pub ndjson: bool,
    /// The answer's head fields, kept until the status is known.
    head: Option<HeaderMap>,
    /// Bytes of a message frame not yet complete.
    frame: Vec<u8>,
    /// A unary answer's JSON, sent with the trailers' status.
    unary: Option<Vec<u8>>,
    /// A stream's head and first bytes went out.
    started: bool,
    /// The answer is broken (a malformed message): the rest is dropped.
    broken: Option<String>,
    /// The client's answer is over (an error answer, or a stream cut once broken): the
    /// upstream's rest is not waited for.
    ended: bool,
    /// The client's answer went out whole: one of the sink's own ([`JsonSink::answer`]), or
    /// an NDJSON stream ended by its error line.
    whole: bool,
    /// The status sent and the failure, as the access log and metrics should have them.
    verdict: Option<(u16, Option<ErrorKind>)>,
}

impl<K: Sink> JsonSink<K> {
    pub fn new(inner: K, transcoder: Arc<Transcoder>, binding: usize, ndjson: bool) -> Self {
        JsonSink {
            inner,
            transcoder,
            binding,
            ndjson,
            head: None,
            frame: Vec::new(),
            unary: None,
            started: false,
            broken: None,
            ended: false,
            whole: false,
            verdict: None,
        }
    }

    fn binding(&self) -> &Binding {
        &self.transcoder.bindings[self.binding]
    }

    /// The upstream's head fields that go on to the client (custom metadata), with the JSON
    /// content type; not those about the upstream's bytes (RFC 9110 8.4, 8.8), which the
    /// gateway's JSON is not: those a reshaped body drops ([`super::relay`]'s list), and its
    /// coding, range and date (a non-gRPC answer's `Content-Encoding: gzip` on the gateway's
    /// plain JSON error made it unreadable).
    fn client_fields(&self, content_type: &'static str) -> HeaderMap {
        let about_the_bytes = |n: &str| {
            super::relay::ABOUT_THE_UPSTREAMS_BYTES.contains(&n.as_bytes())
                || ["content-encoding", "content-range", "last-modified"].contains(&n)
        };
        let mut out = HeaderMap::new();
        for (name, value) in self.head.iter().flatten() {
            let n = name.as_str();
            if n.starts_with("grpc-") || name == CONTENT_TYPE || about_the_bytes(n) {
                continue;
            }
            out.append(name.clone(), value.clone());
        }
        out.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        out
    }

    /// Sends a whole answer: `status` and `body` (JSON).
    async fn answer(&mut self, status: u16, body: Vec<u8>) -> Result<(), ()> {
        self.verdict = Some((status, self.verdict.and_then(|v| v.1)));
        let mut fields = self.client_fields("application/json");
        fields.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        self.inner.head(status, fields, body.is_empty()).await?;
        if !body.is_empty() {
            self.inner.data(body.into()).await?;
            self.inner.finish(None).await?;
        }
        self.whole = true;
        Ok(())
    }

    /// Converts the complete message frames received so far.
    async fn messages(&mut self) -> Result<(), ()> {
        while self.broken.is_none() && self.frame.len() >= 5 {
            let len =
                u32::from_be_bytes([self.frame[1], self.frame[2], self.frame[3], self.frame[4]])
                    as usize;
            if self.frame[0] != 0 {
                self.broken = Some("the upstream sent a compressed message".into());
                break;
            }
            if len > self.transcoder.max_message_bytes {
                self.broken = Some(format!(
                    "the upstream's message of {len} bytes is larger than max_message_bytes"
                ));
                break;
            }
            if self.frame.len() < 5 + len {
                break;
            }
            let mut json = Vec::with_capacity(len * 2 + 2);
            let converted = self
                .binding()
                .response_json(&self.frame[5..5 + len], &mut json);
            self.frame.drain(..5 + len);
            if let Err(e) = converted {
                self.broken = Some(e);
                break;
            }
            if !self.binding().server_streaming {
                if self.unary.is_some() {
                    // A unary call has one answer message (gRPC clients take more as
                    // INTERNAL): not the last one passed off as the answer.
                    self.broken = Some("the upstream sent more than one message".into());
                    break;
                }
                self.unary = Some(json);
                continue;
            }
            let mut piece = Vec::with_capacity(json.len() + 2);
            if !self.started {
                self.started = true;
                self.verdict = Some((200, None));
                let ct = if self.ndjson {
                    "application/x-ndjson"
                } else {
                    piece.push(b'[');
                    "application/json"
                };
                let mut fields = self.client_fields(ct);
                // Chosen by `Accept` (RFC 9110 12.5.5): a cache must not hand the array to
                // a client that asked for NDJSON, nor the other way round.
                fields.append(http::header::VARY, HeaderValue::from_static("accept"));
                self.inner.head(200, fields, false).await?;
            } else if !self.ndjson {
                piece.push(b',');
            }
            piece.extend_from_slice(&json);
            if self.ndjson {
                piece.push(b'\n');
            }
            self.inner.data(piece.into()).await?;
        }
        Ok(())
    }
}

impl<K: Sink> Sink for JsonSink<K> {
    async fn head(&mut self, status: u16, headers: HeaderMap, end: bool) -> Result<(), ()> {
        // Media types compare without case (RFC 9110 8.3.1), as gRPC-Web's check does.
        let grpc = super::h2forward::grpc_content(&headers);
        if status != 200 || !grpc {
            // Not a gRPC answer (a proxy in between, a misconfigured target): nor do the
            // fields about that page go with the gateway's JSON in its place (a download
            // named after the page, its language).
            let mut headers = headers;
            for page in [
                "content-language",
                "content-location",
                "content-disposition",
            ] {
                headers.remove(page);
            }
            self.head = Some(headers);
            let code = super::h2forward::grpc_code_for_http(status);
            let message = format!("the upstream answered HTTP {status}, not gRPC");
            let body = error_body(code.into(), &message, None, &[]);
            self.broken = Some(String::new());
            // An error status stays (a proxy's 503, a 404); any other, a success or a
            // redirect carrying an error body, or a 204 that could carry none, is the
            // gateway's 502: gRPC takes every status but 200 as a failure.
            let shown = if (400..600).contains(&status) {
                status
            } else {
                502
            };
            self.ended = true;
            return self.answer(shown, body).await;
        }
        self.head = Some(headers);
        if end {
            // Trailers-only: the status is in the head, which also holds the custom metadata
            // that goes on with the error (kept for `client_fields`).
            let fields = self.head.clone().unwrap_or_default();
            return self.finish(Some(fields)).await;
        }
        Ok(())
    }

    async fn data(&mut self, data: Bytes) -> Result<(), ()> {
        if self.broken.is_some() {
            return Ok(());
        }
        self.frame.extend_from_slice(&data);
        self.messages().await?;
        if self.broken.is_some() {
            // Ended now (a 502, or a stream cut short), not when the upstream ends: a stream
            // it keeps sending on (a watch) would hold the client meanwhile.
            self.ended = true;
            return self.finish(None).await;
        }
        Ok(())
    }

    async fn finish(&mut self, trailers: Option<HeaderMap>) -> Result<(), ()> {
        // A success that ends inside a message is malformed (a failure's status stands).
        let ok = trailers.as_ref().is_some_and(|t| grpc_status(t).0 == 0);
        if self.broken.is_none() && !self.frame.is_empty() && ok {
            self.broken = Some("the upstream's answer ends inside a message".into());
        }
        if let Some(why) = self.broken.take() {
            if why.is_empty() {
                // Already answered (a non-gRPC answer).
                return Ok(());
            }
            let body = error_body(13, &why, None, &[]);
            self.verdict = Some((502, Some(ErrorKind::UpstreamMalformed)));
            if self.started {
                // Cut short: the client must not take it for complete.
                self.verdict = Some((200, Some(ErrorKind::UpstreamMalformed)));
                self.inner.abort();
                return Ok(());
            }
            return self.answer(502, body).await;
        }
        let (code, message, details) = grpc_status(&trailers.unwrap_or_default());
        let streaming = self.binding().server_streaming;
        if code != 0 {
            let body = error_body(code, &message, None, &details);
            if !self.started {
                return self.answer(http_status_for_grpc(code), body).await;
            }
            if self.ndjson {
                let mut line = b"{\"error\":".to_vec();
                line.extend_from_slice(&body);
                line.extend_from_slice(b"}\n");
                self.inner.data(line.into()).await?;
                self.inner.finish(None).await?;
                // Ended whole, its error said in its last line.
                self.whole = true;
                return Ok(());
            }
            // A JSON array already under way cannot carry the error: cut it short.
            self.verdict = Some((200, Some(ErrorKind::UpstreamClosed)));
            self.inner.abort();
            return Ok(());
        }
        if !streaming {
            return match self.unary.take() {
                Some(json) => self.answer(200, json).await,
                None => {
                    let body = error_body(13, "the upstream answered without a message", None, &[]);
                    // A malformed answer, logged and counted against the target as one.
                    self.verdict = Some((502, Some(ErrorKind::UpstreamMalformed)));
                    self.answer(502, body).await
                }
            };
        }
        if !self.started {
            self.started = true;
            let (ct, body): (_, &[u8]) = if self.ndjson {
                ("application/x-ndjson", b"")
            } else {
                ("application/json", b"[]")
            };
            let mut fields = self.client_fields(ct);
            fields.append(http::header::VARY, HeaderValue::from_static("accept"));
            self.inner.head(200, fields, body.is_empty()).await?;
            if body.is_empty() {
                return Ok(());
            }
            self.inner.data(Bytes::from_static(body)).await?;
            return self.inner.finish(None).await;
        }
        if !self.ndjson {
            self.inner.data(Bytes::from_static(b"]")).await?;
        }
        self.inner.finish(None).await
    }

    fn abort(&mut self) {
        self.inner.abort();
    }

    fn poll_gone(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.inner.poll_gone(cx)
    }

    fn closes(&self) -> bool {
        self.inner.closes()
    }

    fn verdict(&self) -> Option<(u16, Option<ErrorKind>)> {
        self.verdict
    }

    fn sent(&self) -> u64 {
        self.inner.sent()
    }

    fn ended(&self) -> bool {
        self.ended
    }

    fn head_only(&self) -> bool {
        self.inner.head_only()
    }

    fn whole(&self) -> bool {
        self.whole
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_is_chosen_where_accept_prefers_it() {
        for (accept, yes) in [
            (&b"application/x-ndjson"[..], true),
            (b" Application/X-NDJSON ; q=0.5", true),
            (b"application/x-ndjson;q=1", true),
            (b"application/x-ndjson;q=0", false),
            (b"application/x-ndjson; Q=0.000", false),
            (b"application/x-ndjsonx", false),
            (b"application/json", false),
            (b"", false),
            (b"*/*", false),
            (b"application/*", false),
            // The higher weight wins (before, any NDJSON range did).
            (b"application/json, application/x-ndjson;q=0.1", false),
            (b"application/x-ndjson;q=0.9, application/json;q=0.5", true),
            (
                b"application/json;q=0.5, application/x-ndjson;q=0.501",
                true,
            ),
            // The most specific range gives a type its weight.
            (b"*/*;q=0.1, application/x-ndjson", true),
            (b"application/*;q=0.2, application/json;q=0.1", true),
            (b"application/x-ndjson;q=0.5, */*", false),
        ] {
            assert_eq!(
                prefers_ndjson(accept),
                yes,
                "{}",
                String::from_utf8_lossy(accept)
            );
        }
        assert_eq!(weight(b"q=0.25"), Some(250));
        assert_eq!(weight(b"Q=1.000"), Some(1000));
        assert_eq!(weight(b"q=0"), Some(0));
        assert_eq!(weight(b"q=0.0000"), Some(0));
        assert_eq!(weight(b"charset=utf-8"), None);
    }

    #[test]
    fn status_details_are_read_from_google_rpc_status() {
        // Status { code: 9, message: "locked", details: [Any { type_url: "t/x", value: "\x01" }] }
        let any = [0x0a, 3, b't', b'/', b'x', 0x12, 1, 1];
        let mut status = vec![0x08, 9, 0x12, 6];
        status.extend_from_slice(b"locked");
        status.push(0x1a);
        status.push(any.len() as u8);
        status.extend_from_slice(&any);
        assert_eq!(status_details(&status), vec![("t/x".to_owned(), vec![1])]);
        // Truncated input gives what was read before it.
        assert!(status_details(&status[..status.len() - 2]).is_empty());
        let mut fields = HeaderMap::new();
        fields.insert("grpc-status", HeaderValue::from_static("9"));
        fields.insert(
            "grpc-message",
            HeaderValue::from_static("order%20is%20locked"),
        );
        let mut b64 = Vec::new();
        common::keys::encode_b64_into(&status, &mut b64);
        while b64.last() == Some(&b'=') {
            b64.pop();
        }
        fields.insert(
            "grpc-status-details-bin",
            HeaderValue::from_bytes(&b64).unwrap(),
        );
        let (code, message, details) = grpc_status(&fields);
        assert_eq!((code, message.as_str()), (9, "order is locked"));
        assert_eq!(details, vec![("t/x".to_owned(), vec![1])]);
        let body: serde_json::Value =
            serde_json::from_slice(&error_body(code, &message, None, &details)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"code": 9, "message": "order is locked",
                "details": [{"@type": "t/x", "value": "AQ=="}]})
        );
    }
}
