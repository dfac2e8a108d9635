//! Request ids and W3C trace context (`traceparent`, Trace Context Level 1 §3.2).
//!
//! Hot path: ids live in fixed arrays on the request context; generating one is a few rounds of
//! a per-worker PRNG seeded from the kernel; nothing allocates.
//!
//! Rules: a client's `X-Request-Id` is kept when it is one value of 1 to 128 visible ASCII
//! characters, otherwise the gateway makes a new 128-bit id (32 lowercase hex digits). A valid
//! incoming `traceparent` keeps its trace id and flags and gets a new parent id (the gateway's
//! hop); an absent, repeated or invalid one is replaced by a new trace (flags from `sampled`).

/// Longest client-supplied request id kept.
pub const MAX_REQUEST_ID: usize = 128;

/// A fast non-cryptographic generator (wyrand), one per worker, seeded from `getrandom`. Ids
/// need to be unique and not guessable from each other, not secret.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the kernel's random source (the time and thread as a fallback).
    pub fn from_entropy() -> Rng {
        let mut seed = [0u8; 8];
        // SAFETY: writes at most 8 bytes into `seed`.
        let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        let mut s = u64::from_ne_bytes(seed);
        if n != 8 {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            // SAFETY: gettid has no arguments and cannot fail.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u64;
            s = t ^ tid.rotate_left(32);
        }
        Rng(s)
    }

    #[cfg(test)]
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed)
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        (t as u64) ^ ((t >> 64) as u64)
    }

    /// A uniform draw in `0..2^32`.
    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn nonzero(&mut self) -> u64 {
        loop {
            let v = self.next_u64();
            if v != 0 {
                return v;
            }
        }
    }
}

/// The 8 hex digits of `x` (most significant first) as the bytes of a big-endian `u64`: the
/// nibbles are spread one per byte with three shifts and masks, then each byte becomes its
/// digit without a branch or a table (`+ '0'`, and `+ 39` more for 10..15, which lands on 'a').
/// (On x86_64 `hex_into` does the same on 16 digits in a vector register.)
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
#[inline]
fn hex8(x: u32) -> [u8; 8] {
    let mut v = u64::from(x);
    v = (v | (v << 16)) & 0x0000_ffff_0000_ffff;
    v = (v | (v << 8)) & 0x00ff_00ff_00ff_00ff;
    v = (v | (v << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    (v + 0x3030_3030_3030_3030 + letters * 39).to_be_bytes()
}

/// Writes `v` as 16 lowercase hex digits into `out[..16]`.
#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn hex_into(out: &mut [u8], v: u64) {
    out[..8].copy_from_slice(&hex8((v >> 32) as u32));
    out[8..16].copy_from_slice(&hex8(v as u32));
}

/// Writes `v` as 16 lowercase hex digits into `out[..16]`: the same digit arithmetic as
/// [`hex8`] on all 16 nibbles at once in one SSE2 register (SSE2 is part of every x86_64).
#[cfg(target_arch = "x86_64")]
#[inline]
fn hex_into(out: &mut [u8], v: u64) {
    use std::arch::x86_64::{
        __m128i, _mm_add_epi8, _mm_and_si128, _mm_cmpgt_epi8, _mm_cvtsi64_si128, _mm_set1_epi8,
        _mm_srli_epi16, _mm_storeu_si128, _mm_unpacklo_epi8,
    };
    let out = &mut out[..16];
    // SAFETY: SSE2 is always available on x86_64; the store writes exactly the 16 bytes of
    // `out`, which the slicing above bounds-checked, and `storeu` needs no alignment.
    unsafe {
        // Most significant byte first, each byte split into its high and low nibble.
        let bytes = _mm_cvtsi64_si128(v.swap_bytes() as i64);
        let low4 = _mm_set1_epi8(0x0f);
        let high = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
        let low = _mm_and_si128(bytes, low4);
        let nibbles = _mm_unpacklo_epi8(high, low);
        let letters = _mm_and_si128(_mm_cmpgt_epi8(nibbles, _mm_set1_epi8(9)), _mm_set1_epi8(39));
        let digits = _mm_add_epi8(_mm_add_epi8(nibbles, _mm_set1_epi8(b'0' as i8)), letters);
        _mm_storeu_si128(out.as_mut_ptr().cast::<__m128i>(), digits);
    }
}

/// `X-Request-Id: `, the start of a request id's field line.
const ID_NAME: &[u8] = b"X-Request-Id: ";

/// This request's id, as it is forwarded, returned and logged. It is kept as its whole field
/// line (`X-Request-Id: <id>\r\n`), so forwarding and answering each append it in one copy.
#[derive(Clone, Copy)]
pub struct RequestId {
    line: [u8; ID_NAME.len() + MAX_REQUEST_ID + 2],
    len: u8,
    /// Nothing in the id that a log line escapes (`access_log::plain_run`; one the gateway
    /// made is hex): a log line takes it as it is, without scanning it again.
    plain: bool,
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

impl Default for RequestId {
    fn default() -> Self {
        let mut line = [0; ID_NAME.len() + MAX_REQUEST_ID + 2];
        line[..ID_NAME.len()].copy_from_slice(ID_NAME);
        RequestId {
            line,
            len: 0,
            plain: true,
        }
    }
}

impl RequestId {
    pub fn as_bytes(&self) -> &[u8] {
        &self.line[ID_NAME.len()..ID_NAME.len() + usize::from(self.len)]
    }

    /// `X-Request-Id: <id>\r\n`; empty when there is no id.
    pub fn field_line(&self) -> &[u8] {
        match self.len {
            0 => &[],
            n => &self.line[..ID_NAME.len() + usize::from(n) + 2],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the id has nothing to escape in a JSON string (here: no quote, no backslash).
    pub fn is_plain(&self) -> bool {
        self.plain
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps the client's value if it is 1 to 128 visible ASCII characters (so it is safe in a
    /// header and a log line); otherwise makes a new one.
    pub fn set(&mut self, client: Option<&[u8]>, rng: &mut Rng) {
        let id = &mut self.line[ID_NAME.len()..];
        let len = match client {
            Some(v)
                if !v.is_empty()
                    && v.len() <= MAX_REQUEST_ID
                    && v.iter().all(|&b| (0x21..0x7f).contains(&b)) =>
            {
                id[..v.len()].copy_from_slice(v);
                self.plain = crate::access_log::plain_run(v) == v.len();
                v.len()
            }
            _ => {
                hex_into(&mut id[..16], rng.next_u64());
                hex_into(&mut id[16..32], rng.next_u64());
                self.plain = true;
                32
            }
        };
        id[len..len + 2].copy_from_slice(b"\r\n");
        self.len = len as u8;
    }
}

/// `traceparent: `, the start of the trace context's field line.
const TP_NAME: &[u8] = b"traceparent: ";
/// Where the value starts in the field line, and its length (version 00).
const TP: usize = TP_NAME.len();
const TP_LEN: usize = 55;

/// The trace context of this request's hop through the gateway, kept as its whole field line
/// (`traceparent: 00-<trace id>-<parent id>-<flags>\r\n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    line: [u8; TP + TP_LEN + 2],
    set: bool,
    /// The client's trace goes on (else the gateway started one, and the client's
    /// `tracestate`, which belongs to the trace it replaced, is not forwarded).
    continued: bool,
}

impl Default for TraceParent {
    fn default() -> Self {
        let mut line = [0; TP + TP_LEN + 2];
        line[..TP].copy_from_slice(TP_NAME);
        line[TP..TP + 3].copy_from_slice(b"00-");
        line[TP + 35] = b'-';
        line[TP + 52] = b'-';
        line[TP + TP_LEN..].copy_from_slice(b"\r\n");
        TraceParent {
            line,
            set: false,
            continued: false,
        }
    }
}

impl TraceParent {
    pub fn clear(&mut self) {
        self.set = false;
    }

    /// The `traceparent` value, if any (forwarding uses the whole `field_line`).
    #[cfg(test)]
    pub fn value(&self) -> Option<&[u8]> {
        self.set.then_some(&self.line[TP..TP + TP_LEN])
    }

    /// `traceparent: <value>\r\n`, if there is a value.
    pub fn field_line(&self) -> Option<&[u8]> {
        self.set.then_some(&self.line[..])
    }

    /// Whether the client's trace goes on (it sent one valid `traceparent`).
    pub fn continued(&self) -> bool {
        self.set && self.continued
    }

    /// The 32 hex digits of the trace id, if any.
    pub fn trace_id(&self) -> Option<&[u8]> {
        self.set.then_some(&self.line[TP + 3..TP + 35])
    }

    /// Continues the incoming trace (`client`: the one `traceparent` value, if exactly one came)
    /// with a new parent id, or starts a new trace. The version, dashes, name and line end are
    /// written once, by `default`.
    pub fn set(&mut self, client: Option<&[u8]>, sampled: bool, rng: &mut Rng) {
        let h = &mut self.line[TP..TP + TP_LEN];
        match client.and_then(parse_traceparent) {
            Some((trace_id, flags)) => {
                h[3..35].copy_from_slice(trace_id);
                // The flags this version defines, sampled (01) and random trace id (02,
                // Level 2), go on; the others are zeroed, as a version-00 sender must (a
                // later version's flags are not ours to pass on).
                let low = char::from(flags[1]).to_digit(16).unwrap_or(0) & 0b11;
                h[53] = b'0';
                h[54] = b'0' + low as u8;
                self.continued = true;
            }
            None => {
                hex_into(&mut h[3..19], rng.nonzero());
                hex_into(&mut h[19..35], rng.next_u64());
                h[53..55].copy_from_slice(if sampled { b"01" } else { b"00" });
                self.continued = false;
            }
        }
        hex_into(&mut h[36..52], rng.nonzero());
        self.set = true;
    }
}

fn is_lower_hex(s: &[u8]) -> bool {
    s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The trace id and flags of a valid `traceparent` value.
fn parse_traceparent(v: &[u8]) -> Option<(&[u8], &[u8])> {
    if v.len() < 55 {
        return None;
    }
    let (version, trace_id, parent_id, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
    let dashes = v[2] == b'-' && v[35] == b'-' && v[52] == b'-';
    // Version 00 is exactly 55 bytes; a later version may append fields after a dash.
    let length_ok = match version {
        b"00" => v.len() == 55,
        b"ff" => false,
        _ => v.len() == 55 || v[55] == b'-',
    };
    let ok = dashes
        && length_ok
        && is_lower_hex(version)
        && is_lower_hex(trace_id)
        && is_lower_hex(parent_id)
        && is_lower_hex(flags)
        && trace_id.iter().any(|&b| b != b'0')
        && parent_id.iter().any(|&b| b != b'0');
    ok.then_some((trace_id, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_keeps_its_trace_id_and_flags_with_a_new_parent() {
        let mut rng = Rng::seeded(1);
        let mut tp = TraceParent::default();
        tp.set(Some(VALID), true, &mut rng);
        let v = tp.value().unwrap();
        assert_eq!(&v[..36], &VALID[..36]);
        assert_eq!(&v[52..], b"-01");
        assert_ne!(
            &v[36..52],
            &VALID[36..52],
            "the gateway's hop has its own parent id"
        );
        assert!(is_lower_hex(&v[36..52]));
        assert_eq!(tp.trace_id().unwrap(), b"4bf92f3577b34da6a3ce929d0e0e4736");
        let line = [&b"traceparent: "[..], v, b"\r\n"].concat();
        assert_eq!(tp.field_line().unwrap(), &line[..]);
        tp.clear();
        assert_eq!(tp.field_line(), None);
        let unsampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        tp.set(Some(unsampled), true, &mut rng);
        assert_eq!(
            &tp.value().unwrap()[53..],
            b"00",
            "the caller's flags are kept"
        );
        assert!(tp.continued());
        // Sampled and random trace id (Level 2) go on; flags no version defines are zeroed,
        // a later version's included (its extra fields are not passed on either).
        for (flags, out) in [("03", "03"), ("ff", "03"), ("09", "01"), ("f6", "02")] {
            let v = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}");
            tp.set(Some(v.as_bytes()), true, &mut rng);
            assert_eq!(&tp.value().unwrap()[53..], out.as_bytes(), "{flags}");
        }
        let later = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-extra";
        tp.set(Some(later), true, &mut rng);
        let v = tp.value().unwrap();
        assert_eq!((&v[..3], &v[53..]), (&b"00-"[..], &b"01"[..]));
    }

    #[test]
    fn an_invalid_or_absent_traceparent_starts_a_new_trace() {
        let bad: &[&[u8]] = &[
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"garbage",
            b"",
        ];
        let mut rng = Rng::seeded(7);
        for (i, b) in bad.iter().enumerate() {
            let mut tp = TraceParent::default();
            tp.set(Some(b), i % 2 == 0, &mut rng);
            let v = tp.value().unwrap();
            assert!(
                parse_traceparent(v).is_some(),
                "{:?}",
                String::from_utf8_lossy(v)
            );
            assert_ne!(&v[3..35], &VALID[3..35]);
            assert_eq!(&v[53..], if i % 2 == 0 { b"01" } else { b"00" });
            let line = tp.field_line().unwrap();
            assert!(line.starts_with(b"traceparent: 00-") && line.ends_with(b"\r\n"));
            assert!(!tp.continued());
        }
        let mut tp = TraceParent::default();
        tp.set(None, true, &mut rng);
        assert!(parse_traceparent(tp.value().unwrap()).is_some());
    }

    #[test]
    fn a_later_version_with_more_fields_is_continued() {
        let v = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        assert!(parse_traceparent(v).is_some());
        assert!(parse_traceparent(&v[..56]).is_some());
        assert!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x")
                .is_none()
        );
    }

    #[test]
    fn hex_digits_match_the_formatter() {
        let mut rng = Rng::seeded(11);
        let edges = [
            0,
            u64::MAX,
            0x0123_4567_89ab_cdef,
            0xfedc_ba98_7654_3210,
            0x9a9a_9a9a_9a9a_9a9a,
        ];
        for v in edges.into_iter().chain((0..10_000).map(|_| rng.next_u64())) {
            let mut out = [0u8; 17];
            hex_into(&mut out[1..], v);
            assert_eq!(std::str::from_utf8(&out[1..]).unwrap(), format!("{v:016x}"));
            assert_eq!(out[0], 0, "nothing written before the slice");
            // The portable digits (the other architectures' `hex_into`).
            let high = hex8((v >> 32) as u32);
            let low = hex8(v as u32);
            assert_eq!(&high[..], &out[1..9]);
            assert_eq!(&low[..], &out[9..]);
        }
    }

    #[test]
    fn request_ids_are_kept_when_visible_ascii_and_made_otherwise() {
        let mut rng = Rng::seeded(3);
        let mut id = RequestId::default();
        assert_eq!(id.field_line(), b"", "no id, no field");
        id.set(Some(b"abc-123"), &mut rng);
        assert_eq!(id.as_bytes(), b"abc-123");
        assert_eq!(id.field_line(), b"X-Request-Id: abc-123\r\n");
        let longest = [b'x'; 128];
        id.set(Some(&longest), &mut rng);
        assert_eq!(id.as_bytes(), &longest[..]);
        let line = [&b"X-Request-Id: "[..], &longest, b"\r\n"].concat();
        assert_eq!(id.field_line(), &line[..]);
        assert!(id.is_plain());
        // Kept, but a log line must escape it.
        id.set(Some(br#"a"b\c"#), &mut rng);
        assert_eq!((id.as_bytes(), id.is_plain()), (&br#"a"b\c"#[..], false));
        id.set(Some(b"short"), &mut rng);
        assert_eq!(
            id.field_line(),
            b"X-Request-Id: short\r\n",
            "a shorter id after a longer one"
        );
        assert!(id.is_plain());
        let mut seen = std::collections::HashSet::new();
        for bad in [
            &[b'x'; 129][..],
            b"",
            b"has space",
            b"tab\there",
            b"caf\xc3\xa9",
        ] {
            id.set(Some(bad), &mut rng);
            assert_eq!(id.as_bytes().len(), 32, "{bad:?}");
            assert!(is_lower_hex(id.as_bytes()) && id.is_plain());
            assert!(seen.insert(id.as_bytes().to_vec()), "ids repeat");
        }
        id.set(None, &mut rng);
        assert_eq!(id.as_bytes().len(), 32);
    }
}
