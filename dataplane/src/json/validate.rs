//! A JSON checker (RFC 8259) for the answers aggregates merge: one pass over the bytes, no
//! values built, the spans of a top-level object's members kept. It accepts exactly what
//! serde_json accepts (the tests compare the two on many inputs), except that it refuses
//! nesting deeper than [`MAX_DEPTH`], which serde_json's trees cannot hold either.
//!
//! Not on the plain proxy path. On a dense 1 KiB answer (an array of small objects, a token
//! every two or three bytes) this takes about 14 instructions a byte, UTF-8 check included,
//! where serde_json's check takes about 20 (it is built to produce values); on text, where
//! strings are scanned eight bytes at a time, a few.

use std::fmt;
use std::ops::Range;

/// Deepest nesting of arrays and objects accepted: serde_json's limit for its trees (its
/// recursion limit of 128 counts down before it tests, so 127 levels parse and 128 do not).
pub const MAX_DEPTH: usize = 127;

/// Why a text is not JSON, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid {
    pub at: usize,
    pub what: &'static str,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

impl std::error::Error for Invalid {}

/// A top-level member: where its key (the string's content, without its quotes) and its
/// value lie, as 32-bit offsets (a text of at most [`MAX_TEXT`] bytes), and whether the key
/// has escapes. 20 bytes: an answer is kept with its members' spans until it is merged, and
/// a member can be as short as `"a":0,`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberSpan {
    key: [u32; 2],
    value: [u32; 2],
    pub escaped: bool,
}

impl MemberSpan {
    pub fn key(&self) -> Range<usize> {
        self.key[0] as usize..self.key[1] as usize
    }

    pub fn value(&self) -> Range<usize> {
        self.value[0] as usize..self.value[1] as usize
    }
}

/// Longest text checked (`max_step_bytes` and `response.max_bytes` are at most 64 MiB).
pub const MAX_TEXT: usize = u32::MAX as usize;

/// Checks that `text` is one JSON value with only whitespace around it. For an object,
/// returns its members' spans in order (repeated keys included).
pub fn check(text: &[u8]) -> Result<Option<Vec<MemberSpan>>, Invalid> {
    if text.len() > MAX_TEXT {
        return Err(invalid(MAX_TEXT, "a text longer than 4 GiB"));
    }
    if let Err(e) = std::str::from_utf8(text) {
        // Outside strings JSON is ASCII, so this is the strings' UTF-8.
        return Err(invalid(e.valid_up_to(), "invalid UTF-8"));
    }
    let b = text;
    let mut i = skip_ws(b, 0);
    let members = if b.get(i) == Some(&b'{') {
        let (members, end) = top_object(b, i)?;
        i = end;
        Some(members)
    } else {
        i = value_end(b, i, 0)?;
        None
    };
    i = skip_ws(b, i);
    if i != b.len() {
        return Err(invalid(i, "trailing characters"));
    }
    Ok(members)
}

/// Bytes that end a plain run in a string: the quote, the backslash, control characters.
static STOP: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// The high bit of each byte of `w` that is a quote, a backslash or below 0x20, at least for
/// the first such byte (bits above it may be set spuriously by borrows; only the lowest is
/// used).
#[inline]
pub(crate) fn stop_bytes(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    zero(w ^ (ONES * u64::from(b'"')))
        | zero(w ^ (ONES * u64::from(b'\\')))
        | (w.wrapping_sub(ONES * 0x20) & !w & HIGH)
}

// The checker below works on the bytes and an index kept in a register: each step takes the
// index and returns the index after what it read, or where and why the text is not JSON.

#[cold]
fn invalid(at: usize, what: &'static str) -> Invalid {
    Invalid { at, what }
}

#[inline(always)]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// The top-level object at its `{`, recording where each member's key and value lie.
fn top_object(b: &[u8], mut i: usize) -> Result<(Vec<MemberSpan>, usize), Invalid> {
    let mut out = Vec::with_capacity(8);
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return Ok((out, i + 1));
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return Err(invalid(i, "expected a member name"));
        }
        let (end, escaped) = string_end(b, i + 1)?;
        let key = i + 1..end - 1;
        i = colon(b, end)?;
        let vstart = i;
        i = value_end(b, i, 1)?;
        // Offsets fit: the text is at most MAX_TEXT bytes.
        out.push(MemberSpan {
            key: [key.start as u32, key.end as u32],
            value: [vstart as u32, i as u32],
            escaped,
        });
        i = skip_ws(b, i);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return Ok((out, i + 1)),
            _ => return Err(invalid(i, "expected ',' or '}'")),
        }
    }
}

/// One value at `i` (after whitespace), nested in `depth` containers: the index after it.
/// Containers are walked in one loop rather than by recursion: the open ones are a bit
/// stack (1: an object), so a member or an element costs a few branches, not a call per
/// token. `MAX_DEPTH` is 127, so the stack fits a `u128`.
fn value_end(b: &[u8], mut i: usize, depth: usize) -> Result<usize, Invalid> {
    let mut open: u128 = 0;
    let mut here = 0usize;
    'value: loop {
        match b.get(i) {
            Some(&c @ (b'{' | b'[')) => {
                if depth + here >= MAX_DEPTH {
                    return Err(invalid(i, "nested deeper than 127 levels"));
                }
                let object = c == b'{';
                i = skip_ws(b, i + 1);
                if b.get(i) == Some(&(c + 2)) {
                    // `{}` or `[]`: '}' and ']' follow their openers two code points on.
                    i += 1;
                } else {
                    here += 1;
                    open = open << 1 | u128::from(object);
                    if object {
                        i = member_name(b, i)?;
                    }
                    continue 'value;
                }
            }
            Some(b'"') => i = string_end(b, i + 1)?.0,
            Some(b'-' | b'0'..=b'9') => i = number_end(b, i)?,
            Some(b't') => i = literal_end(b, i, b"true")?,
            Some(b'f') => i = literal_end(b, i, b"false")?,
            Some(b'n') => i = literal_end(b, i, b"null")?,
            Some(_) => return Err(invalid(i, "expected a value")),
            None => return Err(invalid(i, "unexpected end")),
        }
        // After a value: the next member or element, or the end of containers.
        while here > 0 {
            i = skip_ws(b, i);
            let object = open & 1 == 1;
            match b.get(i) {
                Some(b',') => {
                    i = skip_ws(b, i + 1);
                    if object {
                        i = member_name(b, i)?;
                    }
                    continue 'value;
                }
                Some(b'}') if object => {}
                Some(b']') if !object => {}
                _ => return Err(invalid(i, "expected ',' or the container's end")),
            }
            i += 1;
            here -= 1;
            open >>= 1;
        }
        return Ok(i);
    }
}

/// A member's name and its colon, at the name's opening quote: the index of its value
/// (after whitespace).
#[inline(always)]
fn member_name(b: &[u8], i: usize) -> Result<usize, Invalid> {
    if b.get(i) != Some(&b'"') {
        return Err(invalid(i, "expected a member name"));
    }
    let (end, _) = string_end(b, i + 1)?;
    colon(b, end)
}

/// The colon after a member name (whitespace around it): the index of the value.
#[inline(always)]
fn colon(b: &[u8], i: usize) -> Result<usize, Invalid> {
    let i = skip_ws(b, i);
    if b.get(i) != Some(&b':') {
        return Err(invalid(i, "expected ':'"));
    }
    Ok(skip_ws(b, i + 1))
}

/// A string's content from `i` (after the opening quote): the index after the closing quote,
/// and whether it had escapes.
#[inline(always)]
fn string_end(b: &[u8], mut i: usize) -> Result<(usize, bool), Invalid> {
    let mut escaped = false;
    loop {
        // The plain run up to a quote, a backslash or a control character: eight bytes at a
        // time while none is among them, then byte by byte.
        while let Some(chunk) = b.get(i..i + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let stops = stop_bytes(u64::from_le_bytes(word));
            if stops != 0 {
                i += (stops.trailing_zeros() / 8) as usize;
                break;
            }
            i += 8;
        }
        while i < b.len() && !STOP[usize::from(b[i])] {
            i += 1;
        }
        match b.get(i) {
            Some(b'"') => return Ok((i + 1, escaped)),
            Some(b'\\') => {
                escaped = true;
                i = escape_end(b, i + 1)?;
            }
            Some(_) => return Err(invalid(i, "control character in a string")),
            None => return Err(invalid(i, "unterminated string")),
        }
    }
}

/// An escape after its backslash: the index after it.
fn escape_end(b: &[u8], i: usize) -> Result<usize, Invalid> {
    match b.get(i) {
        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(i + 1),
        // Any four hex digits: like serde_json's check, a lone surrogate passes (the text is
        // copied, not decoded; a member name that cannot be decoded is refused where it is
        // decoded).
        Some(b'u') => {
            let digits = b
                .get(i + 1..i + 5)
                .ok_or_else(|| invalid(i, "short \\u escape"))?;
            if !digits.iter().all(u8::is_ascii_hexdigit) {
                return Err(invalid(i, "invalid \\u escape"));
            }
            Ok(i + 5)
        }
        _ => Err(invalid(i, "invalid escape")),
    }
}

#[inline(always)]
fn digits_end(b: &[u8], mut i: usize) -> usize {
    while let Some(b'0'..=b'9') = b.get(i) {
        i += 1;
    }
    i
}

/// A number at its first character: the index after it.
#[inline(always)]
fn number_end(b: &[u8], mut i: usize) -> Result<usize, Invalid> {
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = digits_end(b, i + 1),
        _ => return Err(invalid(i, "invalid number")),
    }
    if b.get(i) == Some(&b'.') {
        let end = digits_end(b, i + 1);
        if end == i + 1 {
            return Err(invalid(end, "invalid number"));
        }
        i = end;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        let end = digits_end(b, i);
        if end == i {
            return Err(invalid(end, "invalid number"));
        }
        i = end;
    }
    Ok(i)
}

#[inline(always)]
fn literal_end(b: &[u8], i: usize, word: &'static [u8]) -> Result<usize, Invalid> {
    if b.get(i..i + word.len()) == Some(word) {
        Ok(i + word.len())
    } else {
        Err(invalid(i, "invalid literal"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// serde_json's verdict, the oracle.
    fn serde_accepts(text: &[u8]) -> bool {
        serde_json::from_slice::<serde::de::IgnoredAny>(text).is_ok()
    }

    const SAMPLES: &[&str] = &[
        "{}",
        "[]",
        "0",
        "-0",
        "1.5e10",
        "-12.5E-3",
        "1e+2",
        "true",
        "false",
        "null",
        r#""a\"b\\c\/d\b\f\n\r\t\u00e9""#,
        r#""\ud83d\ude00""#,
        "  {\"a\" : [1, {\"b\": null}] }  ",
        "{\"a\":1,\"a\":2}",
        "[1,2,3]",
        "\"é ü 漢\"",
        // Invalid.
        "",
        " ",
        "{",
        "}",
        "[",
        "[1,]",
        "{\"a\":1,}",
        "{a:1}",
        "{\"a\" 1}",
        "01",
        "1.",
        ".5",
        "1e",
        "1e+",
        "-",
        "+1",
        "tru",
        "nul",
        "truex",
        "[1 2]",
        "\"abc",
        "\"a\nb\"",
        r#""\x""#,
        r#""\u12""#,
        r#""\u12G4""#,
        r#""\ud800""#,
        r#""\udc00""#,
        r#""\ud800\u0041""#,
        "{} {}",
        "[] x",
        "\u{0}",
        "{\"a\":}",
        "[,]",
        "NaN",
        "Infinity",
        "[\"\t\"]",
    ];

    #[test]
    fn agrees_with_serde_json_on_samples() {
        for s in SAMPLES {
            assert_eq!(
                check(s.as_bytes()).is_ok(),
                serde_accepts(s.as_bytes()),
                "{s:?}"
            );
        }
        assert!(check(b"\xff").is_err());
        assert!(check(b"\"\xc3\x28\"").is_err());
    }

    #[test]
    fn agrees_with_serde_json_on_random_token_strings() {
        // Strings of JSON-ish tokens, most of them invalid, some valid: a deterministic
        // generator (xorshift) so a failure reproduces.
        const TOKENS: &[&str] = &[
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            " ",
            "\"k\"",
            "\"\\n\"",
            "\"\\u00e9\"",
            "1",
            "-2.5",
            "3e4",
            "true",
            "null",
            "0",
            "\"",
            "\\",
            "e",
            ".",
            "-",
            "\"a b\"",
            "\t",
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut valid = 0;
        for _ in 0..200_000 {
            let len = (next() % 12) as usize;
            let mut s = String::new();
            for _ in 0..len {
                s.push_str(TOKENS[(next() % TOKENS.len() as u64) as usize]);
            }
            let ours = check(s.as_bytes()).is_ok();
            assert_eq!(ours, serde_accepts(s.as_bytes()), "{s:?}");
            valid += usize::from(ours);
        }
        assert!(
            valid > 1000,
            "the generator made too few valid texts ({valid})"
        );
    }

    #[test]
    fn the_word_scan_finds_the_first_stop_byte() {
        for pos in 0..8 {
            for stop in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
                let mut w = *b"abcdefgh";
                w[pos] = stop;
                let bits = stop_bytes(u64::from_le_bytes(w));
                assert_eq!(bits.trailing_zeros() / 8, pos as u32, "{stop} at {pos}");
            }
        }
        assert_eq!(stop_bytes(u64::from_le_bytes(*b"ab \x7f\xffc~!")), 0);
        assert_eq!(
            stop_bytes(u64::from_le_bytes(*b"\xc3\xa9\xe6\xbc\xa2 za")),
            0
        );
    }

    #[test]
    fn records_top_level_members_and_limits_depth() {
        let text = br#" {"a": [1, 2], "k\u0065y" : {"x": "y"}, "a": 3} "#;
        let m = check(text).unwrap().unwrap();
        let spans: Vec<(&[u8], bool, &[u8])> = m
            .iter()
            .map(|m| (&text[m.key()], m.escaped, &text[m.value()]))
            .collect();
        assert_eq!(
            spans,
            vec![
                (&b"a"[..], false, &b"[1, 2]"[..]),
                (&br"k\u0065y"[..], true, &br#"{"x": "y"}"#[..]),
                (&b"a"[..], false, &b"3"[..]),
            ]
        );
        assert_eq!(check(b"[1]").unwrap(), None);
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(check(deep(MAX_DEPTH).as_bytes()).is_ok());
        assert!(check(deep(MAX_DEPTH + 1).as_bytes()).is_err());
        // The limit is serde_json's, which shapes and merges open the text with.
        let serde_reads = |t: &str| serde_json::from_str::<serde_json::Value>(t).is_ok();
        assert!(serde_reads(&deep(MAX_DEPTH)));
        assert!(!serde_reads(&deep(MAX_DEPTH + 1)));
        let deep_obj = format!(
            "{}1{}",
            "{\"a\":".repeat(MAX_DEPTH + 1),
            "}".repeat(MAX_DEPTH + 1)
        );
        assert!(check(deep_obj.as_bytes()).is_err());
    }
}
