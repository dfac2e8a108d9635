//! Request-target templates and their values, and JSON reshaping and merging over
//! `serde_json::Value` trees: what [`crate::json`] falls back to for arrays and `append`, and
//! the baseline the `aggregate` bench compares it with. Pure functions, called directly by
//! the benches and the unit tests.
//!
//! Not on the plain proxy path: only aggregates and rewritten or shaped routes come here.

use std::borrow::Cow;

use common::aggregate::{Part, Shape, Template};
use common::config::OnConflict;
pub use common::snapshot::pct_decode;
use serde_json::{Map, Value};

/// Why a shape could not be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeError {
    /// `target` names a member the value does not have.
    TargetMissing,
}

/// The value at `path` (`[]`: the value itself).
pub fn lookup<'a>(mut v: &'a Value, path: &[Box<str>]) -> Option<&'a Value> {
    for key in path {
        v = match v {
            Value::Object(m) => m.get(&**key)?,
            Value::Array(a) => a.get(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// The member at `path`, taken out of `v`; with `index`, arrays on the way are indexed
/// (`items.0`: a `target`), else a path through an array finds nothing (an `allow` path).
fn take(v: &mut Value, path: &[Box<str>], index: bool) -> Option<Value> {
    let (last, parents) = path.split_last()?;
    let mut at = v;
    for key in parents {
        at = match at {
            Value::Object(m) => m.get_mut(&**key)?,
            Value::Array(a) if index => a.get_mut(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    match at {
        // Shifting the members after it, not swapping the last into its place: the rest
        // keep their order.
        Value::Object(m) => m.shift_remove(&**last),
        Value::Array(a) if index => {
            let i = last.parse::<usize>().ok().filter(|&i| i < a.len())?;
            Some(a.remove(i))
        }
        _ => None,
    }
}

/// Removes the member at `path` wherever it is: an array on the way is gone through, the
/// rest of the path removed from each of its elements (`deny = ["items.cost"]` removes every
/// item's cost).
pub fn remove_all(v: &mut Value, path: &[Box<str>]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    match v {
        Value::Array(items) => items.iter_mut().for_each(|i| remove_all(i, path)),
        Value::Object(m) if rest.is_empty() => {
            m.shift_remove(&**first);
        }
        Value::Object(m) => {
            if let Some(inner) = m.get_mut(&**first) {
                remove_all(inner, rest);
            }
        }
        _ => {}
    }
}

fn put(dst: &mut Map<String, Value>, path: &[Box<str>], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = dst;
    for key in parents {
        let slot = at
            .entry(&**key)
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(m) = slot else {
            return;
        };
        at = m;
    }
    at.insert(last.to_string(), value);
}

/// `allow`, `deny` and `rename` on one object (arrays apply them to each element).
fn filter(v: &mut Value, shape: &Shape) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(|i| filter(i, shape)),
        Value::Object(_) => {
            if !shape.allow.is_empty() {
                let mut kept = Map::new();
                for path in shape.allow.iter() {
                    if let Some(x) = take(v, path, false) {
                        put(&mut kept, path, x);
                    }
                }
                *v = Value::Object(kept);
            }
            for path in shape.deny.iter() {
                remove_all(v, path);
            }
            if let Value::Object(m) = v {
                // All at once: `{a = "b", b = "a"}` swaps the two.
                let moved: Vec<_> = (shape.rename.iter())
                    .filter_map(|(from, to)| Some((to, m.shift_remove(&**from)?)))
                    .collect();
                for (to, x) in moved {
                    m.insert(to.to_string(), x);
                }
            }
        }
        _ => {}
    }
}

/// Applies `shape` in its order: `target`, `allow` / `deny`, `rename`, `group`.
pub fn apply(shape: &Shape, v: Value) -> Result<Value, ShapeError> {
    Ok(apply_rest(shape, apply_target(shape, v)?))
}

/// The first part of a shape: the member `target` names (the value itself without one).
pub fn apply_target(shape: &Shape, mut v: Value) -> Result<Value, ShapeError> {
    match &shape.target {
        Some(t) => take(&mut v, t, true).ok_or(ShapeError::TargetMissing),
        None => Ok(v),
    }
}

/// The rest of a shape, after `target`: `allow` / `deny`, `rename`, `group`.
pub fn apply_rest(shape: &Shape, mut v: Value) -> Value {
    filter(&mut v, shape);
    if let Some(g) = &shape.group {
        let mut m = Map::new();
        m.insert(g.to_string(), v);
        v = Value::Object(m);
    }
    v
}

/// Merges `src` into `dst`: objects recursively, other values that meet by `policy`.
/// `Err(path)`: `on_conflict = "error"` and two values met at `path` (outermost key first).
pub fn merge(
    dst: &mut Map<String, Value>,
    src: Map<String, Value>,
    policy: OnConflict,
) -> Result<(), Vec<String>> {
    for (k, v) in src {
        let Some(existing) = dst.get_mut(&k) else {
            dst.insert(k, v);
            continue;
        };
        match (existing, v) {
            (Value::Object(a), Value::Object(b)) => {
                if let Err(mut path) = merge(a, b, policy) {
                    path.insert(0, k);
                    return Err(path);
                }
            }
            (existing, v) => match policy {
                OnConflict::Error => return Err(vec![k]),
                OnConflict::First => {}
                OnConflict::Last => *existing = v,
                OnConflict::Append => match (existing, v) {
                    (Value::Array(a), Value::Array(b)) => a.extend(b),
                    (Value::Array(a), v) => a.push(v),
                    (existing, v) => {
                        let old = existing.take();
                        *existing = Value::Array(vec![old, v]);
                    }
                },
            },
        }
    }
    Ok(())
}

/// The media type of a `Content-Type` value: what comes before its parameters, without the
/// whitespace around it (RFC 9110 8.3.1).
pub fn media_type(value: &[u8]) -> &[u8] {
    let essence = value.split(|&b| b == b';').next().unwrap_or(&[]);
    crate::codec::trim_ows(essence)
}

/// Whether a `Content-Type` value names JSON (`application/json`, `*/*+json`).
pub fn is_json_type(value: &[u8]) -> bool {
    let essence = media_type(value);
    essence.eq_ignore_ascii_case(b"application/json")
        || (essence.len() > 5
            && essence[essence.len() - 5..].eq_ignore_ascii_case(b"+json")
            && essence.contains(&b'/'))
}

/// Whether a `Content-Type` value names media no JSON text is sent as (images, sound, video,
/// fonts, 3D models, PDF, archives): an answer a filtering shape does not look into for JSON
/// (see [`opens_json`]), so that a HEAD, whose answer has no body, gets what its GET does.
pub fn is_binary_type(value: &[u8]) -> bool {
    const ARCHIVES: [&str; 10] = [
        "application/pdf",
        "application/zip",
        "application/gzip",
        "application/x-gzip",
        "application/x-tar",
        "application/x-bzip2",
        "application/x-xz",
        "application/x-7z-compressed",
        "application/vnd.rar",
        "application/zstd",
    ];
    let essence = media_type(value);
    let top = essence.split(|&b| b == b'/').next().unwrap_or_default();
    ["image", "audio", "video", "font", "model"]
        .iter()
        .any(|t| top.eq_ignore_ascii_case(t.as_bytes()))
        || ARCHIVES
            .iter()
            .any(|t| essence.eq_ignore_ascii_case(t.as_bytes()))
}

/// Whether a `Content-Type` value names an event stream (`text/event-stream`): an answer
/// relayed as its events come, never held to look at its body.
pub fn is_event_stream(value: &[u8]) -> bool {
    media_type(value).eq_ignore_ascii_case(b"text/event-stream")
}

/// Whether a body that begins with `data` opens a JSON object or array (its first character
/// other than JSON whitespace, RFC 8259 2, is `{` or `[`); `None` while `data` is whitespace
/// only, or too short to tell how it is encoded. What a filtering shape takes for JSON
/// whatever the answer's type says. A body is read as the JSON readers that take bytes read
/// it ([`Units::of`]): after a byte order mark (RFC 8259 8.1 lets parsers ignore one;
/// `fetch().json()` and Python's `json.loads` do), and in UTF-16 or UTF-32 where its first
/// bytes say so (Python's `json.loads` and `requests` read those too), so a body that is
/// JSON to such clients is JSON here.
pub fn opens_json(data: &[u8]) -> Option<bool> {
    opens_json_so_far(data, &mut 0)
}

/// [`opens_json`] over a body read piece by piece: `body` is all of it so far (a mark may
/// be cut across two reads), `skipped` how much of it earlier calls found to be the mark or
/// whitespace, kept between calls so that no byte is looked at twice.
pub fn opens_json_so_far(body: &[u8], skipped: &mut usize) -> Option<bool> {
    let units = Units::of(body)?;
    *skipped = (*skipped).max(units.mark);
    while let Some(unit) = body.get(*skipped..*skipped + units.width) {
        let c = match units.big_endian {
            true => unit.iter().fold(0u32, |c, &b| c << 8 | u32::from(b)),
            false => unit.iter().rev().fold(0u32, |c, &b| c << 8 | u32::from(b)),
        };
        match c {
            0x20 | 0x09 | 0x0A | 0x0D => *skipped += units.width,
            _ => return Some(c == u32::from(b'{') || c == u32::from(b'[')),
        }
    }
    None
}

/// How a body's text is encoded: the width of its code units, their byte order, and the
/// length of its byte order mark.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Units {
    width: usize,
    big_endian: bool,
    mark: usize,
}

impl Units {
    /// As Python's `json.detect_encoding` (and RFC 4627 3) tells it: by a byte order mark,
    /// UTF-32's before UTF-16's, or else by which of the first four bytes are NUL (JSON text
    /// begins with two ASCII characters); `None` while the bytes so far could begin more
    /// than one of them.
    fn of(b: &[u8]) -> Option<Units> {
        let units = |width, big_endian, mark| {
            Some(Units {
                width,
                big_endian,
                mark,
            })
        };
        match *b {
            [0, 0, 0xFE, 0xFF, ..] => units(4, true, 4),
            [0xFF, 0xFE, 0, 0, ..] => units(4, false, 4),
            // UTF-32's mark or UTF-16's: more bytes tell.
            [0xFF, 0xFE] | [0xFF, 0xFE, 0] => None,
            [0xFE, 0xFF, ..] => units(2, true, 2),
            [0xFF, 0xFE, ..] => units(2, false, 2),
            [0xEF, 0xBB, 0xBF, ..] => units(1, false, 3),
            [0xEF] | [0xEF, 0xBB] => None,
            [0, x, _, _, ..] => units(if x != 0 { 2 } else { 4 }, true, 0),
            [_, 0, c, d, ..] => units(if c != 0 || d != 0 { 2 } else { 4 }, false, 0),
            // A NUL among the first two bytes: the next ones tell UTF-16 from UTF-32.
            [] | [_] | [0, ..] | [_, 0, ..] => None,
            _ => units(1, false, 0),
        }
    }
}

/// What the gateway needs to know of an upstream answer's head before it reads the body as
/// JSON (a step's answer, a shaped route's), from one pass over its fields: the first of each.
#[derive(Debug, Default, Clone, Copy)]
pub struct AnswerFields<'a> {
    pub content_type: Option<&'a [u8]>,
    /// A `Content-Encoding` other than `identity`.
    pub encoded: bool,
    /// The `Content-Length`, where there is a valid one (the head's framing was checked).
    pub content_length: Option<u64>,
}

impl<'a> AnswerFields<'a> {
    /// Reads the field lines between `start` and `end` of `buf`.
    pub fn of(buf: &'a [u8], start: usize, end: usize) -> AnswerFields<'a> {
        let mut f = AnswerFields::default();
        for (_, name, value) in crate::policy::each_field(buf, start, end) {
            if name.eq_ignore_ascii_case(b"content-type") {
                f.content_type.get_or_insert(value);
            } else if name.eq_ignore_ascii_case(b"content-length") {
                f.content_length = f
                    .content_length
                    .or_else(|| crate::codec::parse_content_length(value));
            } else if name.eq_ignore_ascii_case(b"content-encoding") {
                // Every line and every coding in it counts (`identity`, then `gzip` on a
                // line of its own, is a gzipped body).
                f.encoded |= value
                    .split(|&b| b == b',')
                    .map(<[u8]>::trim_ascii)
                    .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"));
            }
        }
        f
    }

    /// Whether the body is JSON as it is (a JSON type, no encoding).
    pub fn is_plain_json(&self) -> bool {
        !self.encoded && self.content_type.is_some_and(is_json_type)
    }
}

/// Appends `bytes` percent-encoded: every byte but the unreserved ones (RFC 3986 §2.3), so
/// the result is one path segment or one query value whatever it holds.
pub fn pct_encode(bytes: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if crate::codec::is_unreserved(b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

/// Decodes a query value as browsers and forms encode it (`application/x-www-form-urlencoded`):
/// `+` is a space, then `%XX` escapes; `None` for a malformed escape.
pub fn form_decode(raw: &[u8]) -> Option<Cow<'_, [u8]>> {
    if !raw.contains(&b'+') {
        return pct_decode(raw);
    }
    let spaced: Vec<u8> = raw
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    Some(Cow::Owned(pct_decode(&spaced)?.into_owned()))
}

/// The raw value of the first query parameter `name` in `query` (the part after `?`), its
/// name read as a form's is (`vi%65w` and `vi+ew` are `view` and `vi ew`).
pub fn query_param<'a>(query: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    query.split(|&b| b == b'&').find_map(|pair| {
        let (k, v) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &[][..]),
        };
        let named = k == name
            || (k.iter().any(|&b| b == b'%' || b == b'+')
                && form_decode(k).is_some_and(|k| *k == *name));
        named.then_some(v)
    })
}

/// A scalar JSON value as placeholder text; `None` for null, objects and arrays.
pub fn scalar_text(v: &Value) -> Option<Cow<'_, [u8]>> {
    match v {
        Value::String(s) => Some(Cow::Borrowed(s.as_bytes())),
        Value::Number(n) => Some(Cow::Owned(n.to_string().into_bytes())),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { b"true" } else { b"false" })),
        _ => None,
    }
}

/// Where placeholder values come from.
pub trait Values {
    /// The route parameter `name`, raw from the request path.
    fn param(&self, name: &str) -> Option<&[u8]>;
    /// The client's query string (after `?`), if any.
    fn query(&self) -> Option<&[u8]>;
    /// The scalar at `path` in the earlier step `step`'s answer (after its `target`).
    fn step_field(&self, step: usize, path: &[Box<str>]) -> Option<Cow<'_, [u8]>>;
}

/// What is wrong with a placeholder's value (missing, malformed or not a scalar; in the path,
/// empty or a dot segment), naming the placeholder as written.
#[derive(Debug)]
pub struct Unfilled {
    pub why: String,
    /// The value was the client's to give (a route parameter or a query value), not an
    /// earlier step's.
    pub by_client: bool,
}

/// Fills `t` into `out`. Values from the client are percent-decoded, then every value is
/// percent-encoded as one segment or query value.
pub fn fill(t: &Template, values: &impl Values, out: &mut Vec<u8>) -> Result<(), Unfilled> {
    let mut in_query = false;
    for part in t.parts.iter() {
        let value: Option<Cow<'_, [u8]>> = match part {
            Part::Literal(l) => {
                in_query |= l.contains('?');
                out.extend_from_slice(l.as_bytes());
                continue;
            }
            Part::Param(name) => values.param(name).and_then(pct_decode),
            Part::Query(name) => values
                .query()
                .and_then(|q| query_param(q, name.as_bytes()))
                .and_then(form_decode),
            Part::Step { step, path } => values.step_field(*step, path),
        };
        let why = match value {
            Some(v) if !in_query && !one_segment(&v) => {
                "is empty or a dot segment, which the path cannot take"
            }
            // `%00` in a path: servers disagree on what it names (one stops at it, another
            // keeps the rest), which is why the gateway refuses it from clients.
            Some(v) if !in_query && v.contains(&0) => {
                "holds a NUL byte, which the path cannot take"
            }
            Some(v) => {
                pct_encode(&v, out);
                continue;
            }
            None => "has no scalar value",
        };
        return Err(Unfilled {
            why: format!("{} {why}", placeholder_name(part)),
            by_client: matches!(part, Part::Param(_) | Part::Query(_)),
        });
    }
    Ok(())
}

/// Whether `v` can stand as one path segment of a member's request: not empty (`/a//b` is
/// another path), and neither `.` nor `..`, not even between the `/` or `\` it holds (sent
/// as `%2F` and `%5C`, but decoded by some servers before they resolve dot segments: a value
/// `..` would climb out of the path the step names).
fn one_segment(v: &[u8]) -> bool {
    !v.is_empty()
        && v.split(|&b| b == b'/' || b == b'\\')
            .all(|piece| piece != b"." && piece != b"..")
}

fn placeholder_name(part: &Part) -> String {
    match part {
        Part::Literal(l) => l.to_string(),
        Part::Param(n) => format!("{{{n}}}"),
        Part::Query(n) => format!("{{query.{n}}}"),
        Part::Step { step, path } => format!("{{step {step}: {}}}", path.join(".")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_content_encoding_line_other_than_identity_makes_an_answer_encoded() {
        let encoded = |fields: &str| {
            let head = format!("HTTP/1.1 200 OK\r\n{fields}\r\n");
            AnswerFields::of(head.as_bytes(), 17, head.len()).encoded
        };
        // Before, only the first line was read: the gzip line went on over a reshaped body.
        assert!(encoded(
            "Content-Encoding: identity\r\nContent-Encoding: gzip\r\n"
        ));
        assert!(encoded("Content-Encoding: identity, br\r\n"));
        assert!(encoded("content-encoding: GZIP\r\n"));
        assert!(!encoded("Content-Encoding: identity\r\n"));
        assert!(!encoded("Content-Encoding: \r\n"));
        assert!(!encoded("Content-Type: application/json\r\n"));
    }
    use serde_json::json;

    #[test]
    fn a_body_opening_an_object_or_array_is_told_by_its_first_byte() {
        for (data, want) in [
            (&b""[..], None),
            (b" \r\n\t", None),
            (b"{\"a\":1}", Some(true)),
            (b"\n  [1]", Some(true)),
            (b"hello {", Some(false)),
            (b"\"a string\"", Some(false)),
            (b"\x0c{", Some(false)),
            // A byte order mark, whole or cut short (then read on by `opens_json_so_far`).
            (b"\xEF\xBB\xBF {\"a\":1}", Some(true)),
            (b"\xEF\xBB", None),
            (b"\xEF\xBB\xBFhello", Some(false)),
            (b"\xEFx", Some(false)),
        ] {
            assert_eq!(
                opens_json(data),
                want,
                "{:?}",
                String::from_utf8_lossy(data)
            );
        }
        // Read by read: a mark cut across reads, whitespace not looked at twice.
        let body = b"\xEF\xBB\xBF \n [1]";
        let mut skipped = 0;
        assert_eq!(opens_json_so_far(&body[..1], &mut skipped), None);
        assert_eq!(opens_json_so_far(&body[..2], &mut skipped), None);
        assert_eq!(opens_json_so_far(&body[..5], &mut skipped), None);
        assert_eq!(skipped, 5);
        assert_eq!(opens_json_so_far(body, &mut skipped), Some(true));
        let text = b"\xEF{ x";
        let mut skipped = 0;
        assert_eq!(opens_json_so_far(&text[..1], &mut skipped), None);
        assert_eq!(opens_json_so_far(text, &mut skipped), Some(false));
        // UTF-16 and UTF-32, with and without a mark, as Python's `json.loads` reads them.
        let wide = |text: &str, width: usize, big: bool, mark: bool| {
            let mut out = Vec::new();
            let chars = mark.then_some('\u{feff}').into_iter().chain(text.chars());
            for c in chars {
                let c = c as u32;
                let bytes = match width {
                    2 => (c as u16).to_be_bytes().to_vec(),
                    _ => c.to_be_bytes().to_vec(),
                };
                match big {
                    true => out.extend_from_slice(&bytes),
                    false => out.extend(bytes.iter().rev()),
                }
            }
            out
        };
        for width in [2, 4] {
            for big in [true, false] {
                for mark in [true, false] {
                    let at = format!("width {width}, big endian {big}, mark {mark}");
                    let json = wide(" \r\n{\"cost\": 1}", width, big, mark);
                    assert_eq!(opens_json(&json), Some(true), "{at}");
                    assert_eq!(
                        opens_json(&wide("\t[1]", width, big, mark)),
                        Some(true),
                        "{at}"
                    );
                    assert_eq!(
                        opens_json(&wide("  hi {", width, big, mark)),
                        Some(false),
                        "{at}"
                    );
                    // Read by read, one byte at a time: never decided otherwise, nor twice.
                    let mut skipped = 0;
                    let first = (1..=json.len())
                        .find_map(|n| opens_json_so_far(&json[..n], &mut skipped))
                        .unwrap();
                    assert!(first, "{at}");
                }
            }
        }
        // Binary data whose first bytes are NUL is not taken for JSON (an MP4 box).
        assert_eq!(opens_json(b"\0\0\0\x18ftypmp42"), Some(false));
        assert_eq!(opens_json(b"\xFF\xFE\0"), None);
        assert_eq!(opens_json(b"{\0"), None);
        assert_eq!(opens_json(b"{\0\"\0"), Some(true));
        assert!(is_event_stream(b"Text/Event-Stream; charset=utf-8"));
        assert!(!is_event_stream(b"text/plain"));
    }

    fn paths(p: &[&str]) -> Box<[common::aggregate::DotPath]> {
        p.iter()
            .map(|s| s.split('.').map(Into::into).collect())
            .collect()
    }

    #[test]
    fn shape_applies_target_then_filters_then_rename_then_group() {
        let shape = Shape {
            target: Some(vec!["data".into()].into_boxed_slice()),
            allow: paths(&["qty", "where.city"]),
            rename: vec![("qty".into(), "in_stock".into())].into_boxed_slice(),
            group: Some("stock".into()),
            ..Shape::default()
        };
        let v = json!({"data": {"qty": 3, "cost": 9, "where": {"city": "Oslo", "zip": "1"}}});
        assert_eq!(
            apply(&shape, v).unwrap(),
            json!({"stock": {"in_stock": 3, "where": {"city": "Oslo"}}})
        );
        assert_eq!(
            apply(&shape, json!({"nodata": 1})),
            Err(ShapeError::TargetMissing)
        );
        let deny = Shape {
            deny: paths(&["cost", "a.b"]),
            ..Shape::default()
        };
        assert_eq!(
            apply(&deny, json!([{"cost": 1, "x": 2, "a": {"b": 1, "c": 2}}])).unwrap(),
            json!([{"x": 2, "a": {"c": 2}}])
        );
    }

    #[test]
    fn merge_policies() {
        let obj = |v: Value| match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let a = || obj(json!({"id": 1, "tags": ["a"], "meta": {"x": 1}}));
        let b = || obj(json!({"id": 2, "tags": ["b"], "meta": {"y": 2}}));
        let mut m = a();
        assert_eq!(
            merge(&mut m, b(), OnConflict::Error),
            Err(vec!["id".to_owned()])
        );
        let mut m = a();
        merge(&mut m, obj(json!({"meta": {"y": 2}})), OnConflict::Error).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"id": 1, "tags": ["a"], "meta": {"x": 1, "y": 2}})
        );
        let mut m = a();
        assert_eq!(
            merge(&mut m, obj(json!({"meta": {"x": 5}})), OnConflict::Error),
            Err(vec!["meta".to_owned(), "x".to_owned()])
        );
        let mut m = a();
        merge(&mut m, b(), OnConflict::First).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"id": 1, "tags": ["a"], "meta": {"x": 1, "y": 2}})
        );
        let mut m = a();
        merge(&mut m, b(), OnConflict::Last).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"id": 2, "tags": ["b"], "meta": {"x": 1, "y": 2}})
        );
        let mut m = a();
        merge(&mut m, b(), OnConflict::Append).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"id": [1, 2], "tags": ["a", "b"], "meta": {"x": 1, "y": 2}})
        );
    }

    struct V(Value);
    impl Values for V {
        fn param(&self, name: &str) -> Option<&[u8]> {
            (name == "id").then_some(&b"a%2Fb c"[..])
        }
        fn query(&self) -> Option<&[u8]> {
            Some(b"lang=en&x=%ZZ")
        }
        fn step_field(&self, step: usize, path: &[Box<str>]) -> Option<Cow<'_, [u8]>> {
            (step == 0)
                .then_some(&self.0)
                .and_then(|v| lookup(v, path))
                .and_then(scalar_text)
        }
    }

    #[test]
    fn query_values_decode_like_forms() {
        assert_eq!(&*form_decode(b"a+b%2Bc").unwrap(), b"a b+c");
        assert_eq!(&*form_decode(b"plain").unwrap(), b"plain");
        assert!(form_decode(b"%G0").is_none());
    }

    #[test]
    fn templates_fill_and_encode() {
        let t = Template {
            parts: vec![
                Part::Literal("/i/".into()),
                Part::Param("id".into()),
                Part::Literal("/".into()),
                Part::Step {
                    step: 0,
                    path: vec!["p".into(), "sku".into()].into_boxed_slice(),
                },
                Part::Literal("?l=".into()),
                Part::Query("lang".into()),
            ]
            .into_boxed_slice(),
            has_query: true,
        };
        let mut out = Vec::new();
        fill(&t, &V(json!({"p": {"sku": "x/y&z"}})), &mut out).unwrap();
        assert_eq!(out, b"/i/a%2Fb%20c/x%2Fy%26z?l=en");
        out.clear();
        let err = fill(&t, &V(json!({"p": {"sku": {"nested": 1}}})), &mut out).unwrap_err();
        assert!(err.why.contains("sku") && !err.by_client, "{err:?}");
        let bad = Template {
            parts: vec![Part::Query("x".into())].into_boxed_slice(),
            has_query: false,
        };
        let err = fill(&bad, &V(Value::Null), &mut out).unwrap_err();
        assert!(err.why.contains("{query.x}") && err.by_client, "{err:?}");
        // In the path, a value that is empty or a dot segment (also between the slashes it
        // holds) is refused; in the query it is a value like any other.
        for sku in ["", ".", "..", "a/../b", "..\\x", "./"] {
            out.clear();
            let err = fill(&t, &V(json!({"p": {"sku": sku}})), &mut out).unwrap_err();
            assert!(err.why.contains("dot segment"), "{sku:?}: {err:?}");
        }
        for sku in ["...", ".a", "a..b", "a.b/c"] {
            out.clear();
            assert!(
                fill(&t, &V(json!({"p": {"sku": sku}})), &mut out).is_ok(),
                "{sku:?}"
            );
        }
        // Nor a NUL byte, which would go out as `%00` (before: sent).
        out.clear();
        let err = fill(&t, &V(json!({"p": {"sku": "a\0.txt"}})), &mut out).unwrap_err();
        assert!(err.why.contains("NUL"), "{err:?}");
        let in_query = Template {
            parts: vec![
                Part::Literal("/p?x=".into()),
                Part::Step {
                    step: 0,
                    path: vec!["v".into()].into_boxed_slice(),
                },
            ]
            .into_boxed_slice(),
            has_query: true,
        };
        out.clear();
        fill(&in_query, &V(json!({"v": ".."})), &mut out).unwrap();
        assert_eq!(out, b"/p?x=..");
        // In the query, a NUL is a value like any other, encoded.
        out.clear();
        fill(&in_query, &V(json!({"v": "a\0"})), &mut out).unwrap();
        assert_eq!(out, b"/p?x=a%00");
    }

    #[test]
    fn json_content_types() {
        assert!(is_json_type(b"application/json"));
        assert!(is_json_type(b"Application/JSON; charset=utf-8"));
        assert!(is_json_type(b"application/problem+json"));
        assert!(!is_json_type(b"text/plain"));
        assert!(!is_json_type(b"+json"));
    }
}
