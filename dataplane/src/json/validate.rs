//! A JSON checker (RFC 8259) for the answers aggregates merge: one pass over the bytes, no
//! values built, the spans of a top-level object's members kept. It accepts exactly what
//! serde_json accepts (the tests compare the two on many inputs), except that it refuses
//! nesting deeper than [`MAX_DEPTH`], which serde_json's trees cannot hold either.
//!
//! Not on the plain proxy path. serde_json checks a dense 1 KiB answer at about 20
//! instructions a byte (it is built to produce values); this loop needs a few.

use std::fmt;
use std::ops::Range;

/// Deepest nesting of arrays and objects accepted (serde_json's limit for its trees).
pub const MAX_DEPTH: usize = 128;

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

/// A top-level member: the key's span (the string's content, without its quotes), whether
/// the key has escapes, and the value's span.
pub type MemberSpan = (Range<usize>, bool, Range<usize>);

/// Checks that `text` is one JSON value with only whitespace around it. For an object,
/// returns its members' spans in order (repeated keys included).
pub fn check(text: &[u8]) -> Result<Option<Vec<MemberSpan>>, Invalid> {
    if std::str::from_utf8(text).is_err() {
        // Outside strings JSON is ASCII, so this is the strings' UTF-8.
        let at = std::str::from_utf8(text).map_or_else(|e| e.valid_up_to(), |_| 0);
        return Err(Invalid {
            at,
            what: "invalid UTF-8",
        });
    }
    let mut c = Cursor { b: text, i: 0 };
    c.ws();
    let members = if c.peek() == Some(b'{') {
        Some(c.top_object()?)
    } else {
        c.value(0)?;
        None
    };
    c.ws();
    if c.i != text.len() {
        return Err(c.err("trailing characters"));
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

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn err(&self, what: &'static str) -> Invalid {
        Invalid { at: self.i, what }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), Invalid> {
        if self.peek() == Some(byte) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(what))
        }
    }

    /// The top-level object, recording where each member's key and value lie.
    fn top_object(&mut self) -> Result<Vec<MemberSpan>, Invalid> {
        self.i += 1;
        let mut out = Vec::with_capacity(8);
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(out);
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(self.err("expected a member name"));
            }
            let start = self.i + 1;
            let escaped = self.string()?;
            let key = start..self.i - 1;
            self.ws();
            self.expect(b':', "expected ':'")?;
            self.ws();
            let vstart = self.i;
            self.value(1)?;
            out.push((key, escaped, vstart..self.i));
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(out);
                }
                _ => return Err(self.err("expected ',' or '}'")),
            }
        }
    }

    /// One value at nesting `depth` (the containers around it).
    fn value(&mut self, depth: usize) -> Result<(), Invalid> {
        match self.peek() {
            Some(b'{') => self.container(depth, b'}'),
            Some(b'[') => self.container(depth, b']'),
            Some(b'"') => self.string().map(|_| ()),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(_) => Err(self.err("expected a value")),
            None => Err(self.err("unexpected end")),
        }
    }

    fn container(&mut self, depth: usize, close: u8) -> Result<(), Invalid> {
        if depth >= MAX_DEPTH {
            return Err(self.err("nested deeper than 128 levels"));
        }
        let object = close == b'}';
        self.i += 1;
        self.ws();
        if self.peek() == Some(close) {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            if object {
                if self.peek() != Some(b'"') {
                    return Err(self.err("expected a member name"));
                }
                self.string()?;
                self.ws();
                self.expect(b':', "expected ':'")?;
                self.ws();
            }
            self.value(depth + 1)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b) if b == close => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(self.err("expected ',' or the container's end")),
            }
        }
    }

    /// A string starting at its opening quote; leaves the cursor after the closing one.
    /// Returns whether it had escapes.
    fn string(&mut self) -> Result<bool, Invalid> {
        self.i += 1;
        let mut escaped = false;
        let b = self.b;
        let mut i = self.i;
        loop {
            // The plain run up to a quote, a backslash or a control character: eight bytes
            // at a time while none is among them, then byte by byte.
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
            self.i = i;
            match b.get(i) {
                Some(b'"') => {
                    self.i = i + 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    self.escape()?;
                    i = self.i;
                }
                Some(_) => return Err(self.err("control character in a string")),
                None => return Err(self.err("unterminated string")),
            }
        }
    }

    /// An escape, at its backslash.
    fn escape(&mut self) -> Result<(), Invalid> {
        self.i += 1;
        match self.peek() {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                self.i += 1;
                Ok(())
            }
            // Any four hex digits: like serde_json's check, a lone surrogate passes (the
            // text is copied, not decoded; a member name that cannot be decoded is refused
            // where it is decoded).
            Some(b'u') => self.hex4().map(|_| ()),
            _ => Err(self.err("invalid escape")),
        }
    }

    /// `uXXXX` at the `u`: its value.
    fn hex4(&mut self) -> Result<u16, Invalid> {
        let digits = self
            .b
            .get(self.i + 1..self.i + 5)
            .ok_or_else(|| self.err("short \\u escape"))?;
        let mut v = 0u16;
        for &d in digits {
            let n = (d as char)
                .to_digit(16)
                .ok_or_else(|| self.err("invalid \\u escape"))?;
            v = v << 4 | n as u16;
        }
        self.i += 5;
        Ok(v)
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<(), Invalid> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
        }
        Ok(())
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), Invalid> {
        if self.b.get(self.i..self.i + word.len()) == Some(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(self.err("invalid literal"))
        }
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
            .map(|(k, e, v)| (&text[k.clone()], *e, &text[v.clone()]))
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
        let deep_obj = format!(
            "{}1{}",
            "{\"a\":".repeat(MAX_DEPTH + 1),
            "}".repeat(MAX_DEPTH + 1)
        );
        assert!(check(deep_obj.as_bytes()).is_err());
    }
}
