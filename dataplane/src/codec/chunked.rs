//! Incremental validator for the chunked transfer coding (RFC 9112 §7.1).
//!
//! Hot path. The gateway relays chunked bodies verbatim (no userspace copy), so this decoder
//! does not produce data: it walks bytes as they arrive, byte by byte through the framing and in
//! one step over chunk data, and says how many of them belong to the message and when the
//! message ends. It is strict where leniency has enabled request smuggling: hex sizes that would
//! overflow, bare LF or CR, bytes between the size and CRLF other than a well-formed extension,
//! missing CRLF after data, and framing fields in the trailer section are all errors (in a
//! request's, also the fields the gateway sets or checks, see [`ChunkedDecoder::request`]).

use std::sync::Arc;

use common::snapshot::is_tchar;

/// Longest chunk-size line (size, extensions, CRLF) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// Most hex digits a chunk size may have, leading zeros included: a `u64`'s. The line goes on
/// as it came, and a recipient that reads fewer digits would take a padded size for another.
const MAX_SIZE_DIGITS: u8 = 16;

/// Why a chunked body is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("malformed chunked framing")]
    Malformed,
    #[error("chunk size overflows")]
    Overflow,
    #[error("trailer section too large")]
    TrailerTooLarge,
    #[error("a request trailer field the gateway sets or checks")]
    RefusedTrailer,
}

/// Appends the chunk data of a complete chunked body that [`ChunkedDecoder`] has already
/// validated (so its framing is known to be well-formed); trailers are left out. For bodies
/// the gateway consumes itself (fan-out steps), not for relaying.
pub fn decode_validated(raw: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < raw.len() {
        let mut size = 0usize;
        while let Some(d) = raw.get(i).and_then(|&b| (b as char).to_digit(16)) {
            size = size.saturating_mul(16).saturating_add(d as usize);
            i += 1;
        }
        // Skip extensions up to the end of the size line.
        match raw[i..].iter().position(|&b| b == b'\n') {
            Some(lf) => i += lf + 1,
            None => return,
        }
        if size == 0 {
            return;
        }
        let end = (i + size).min(raw.len());
        out.extend_from_slice(&raw[i..end]);
        // Data, then its CRLF.
        i = end + 2;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting the first hex digit of a size.
    SizeStart,
    /// In the hex digits.
    Size,
    /// After the size (or an extension piece): BWS, `;`, or CR.
    AfterSize {
        saw_ws: bool,
    },
    /// After an extension's `;`: BWS, then its name (RFC 9112 7.1.1).
    ExtPreName,
    /// In an extension's name (a token).
    ExtName,
    /// BWS after a name: `=` or `;` must follow.
    ExtPostName,
    /// After `=`: BWS, then a token or a quoted string.
    ExtPreValue,
    /// In a token value.
    ExtValue,
    /// Inside a quoted-string extension value.
    ExtQuoted,
    /// After a backslash in a quoted string.
    ExtQuotedEscape,
    /// After a value: `;`, or CR right after it, or BWS before a `;`.
    ExtPostValue {
        saw_ws: bool,
    },
    /// Saw CR of the size line; expecting LF.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// Resumable chunked-body validator.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    line_len: usize,
    trailer_len: usize,
    max_trailer: usize,
    /// Hex digits of the size being read.
    digits: u8,
    /// Bytes of chunk data seen so far.
    data_len: u64,
    /// Bytes of chunk data the size lines seen so far declare.
    declared: u64,
    /// First bytes of the current trailer field name, lower-cased, to spot framing fields
    /// and refused ones (policy header names are at most 64 bytes; longer ones are told by
    /// these and their length).
    name: [u8; 64],
    name_len: usize,
    /// A request's: more names its trailer section must not carry.
    refused: Option<Arc<[Box<[u8]>]>>,
}

impl ChunkedDecoder {
    /// A decoder whose trailer section may hold up to `max_trailer` bytes.
    pub fn new(max_trailer: usize) -> Self {
        Self {
            state: State::SizeStart,
            size: 0,
            line_len: 0,
            trailer_len: 0,
            max_trailer,
            digits: 0,
            data_len: 0,
            declared: 0,
            name: [0; 64],
            name_len: 0,
            refused: None,
        }
    }

    /// A decoder for a request body relayed as it came, whose trailer section must not carry
    /// the fields named in `refused` (lower-case; `_` is taken for `-`, as the head's copies
    /// are): the head's are checked, dropped or replaced, a trailer's would go on unseen.
    pub fn request(max_trailer: usize, refused: Arc<[Box<[u8]>]>) -> Self {
        Self {
            refused: Some(refused),
            ..Self::new(max_trailer)
        }
    }

    /// Whether the whole message (last chunk and trailers) has been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Total chunk-data bytes seen so far.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// Total chunk-data bytes the size lines seen so far declare, the current chunk's whole
    /// size included: a body limit is checked against it before the chunk's data comes (only
    /// the start of a size line split across reads may have gone on by then, never data).
    pub fn declared_len(&self) -> u64 {
        self.declared
    }

    /// Walks `input`; returns how many bytes belong to this message (all of `input` unless the
    /// message ends inside it).
    pub fn advance(&mut self, input: &[u8]) -> Result<usize, ChunkError> {
        self.walk(input, |_| {})
    }

    /// Like [`ChunkedDecoder::advance`], appending the chunk data met to `data` (the body
    /// without its framing, for a recipient that does not take the chunked coding).
    pub fn advance_into(&mut self, input: &[u8], data: &mut Vec<u8>) -> Result<usize, ChunkError> {
        self.walk(input, |d| data.extend_from_slice(d))
    }

    fn walk(&mut self, input: &[u8], mut data: impl FnMut(&[u8])) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Data {
                let take = (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                data(&input[i..i + take]);
                i += take;
                self.size -= take as u64;
                self.data_len += take as u64;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            if self.state == State::Done {
                break;
            }
            let b = input[i];
            i += 1;
            self.step(b)?;
        }
        Ok(i)
    }

    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        use State::*;
        let in_size_line = matches!(
            self.state,
            SizeStart
                | Size
                | AfterSize { .. }
                | ExtPreName
                | ExtName
                | ExtPostName
                | ExtPreValue
                | ExtValue
                | ExtQuoted
                | ExtQuotedEscape
                | ExtPostValue { .. }
                | SizeLf
        );
        if in_size_line {
            self.line_len += 1;
            if self.line_len > MAX_CHUNK_LINE {
                return Err(ChunkError::Malformed);
            }
        }
        if matches!(
            self.state,
            TrailerStart | TrailerName | TrailerValue | TrailerLf | EndLf
        ) {
            self.trailer_len += 1;
            if self.trailer_len > self.max_trailer {
                return Err(ChunkError::TrailerTooLarge);
            }
        }
        self.state = match (self.state, b) {
            (SizeStart | Size, _) if b.is_ascii_hexdigit() => {
                let d = u64::from((b as char).to_digit(16).unwrap_or(0));
                self.size = self
                    .size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(d))
                    .ok_or(ChunkError::Overflow)?;
                if self.state == SizeStart {
                    self.digits = 0;
                }
                self.digits += 1;
                if self.digits > MAX_SIZE_DIGITS {
                    return Err(ChunkError::Malformed);
                }
                Size
            }
            (Size, b' ' | b'\t') => AfterSize { saw_ws: true },
            (Size | AfterSize { .. }, b';') => ExtPreName,
            (Size, b'\r') | (AfterSize { saw_ws: false }, b'\r') => SizeLf,
            (AfterSize { .. }, b' ' | b'\t') => AfterSize { saw_ws: true },
            // chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] ):
            // an empty name or value, a stray `=` or whitespace inside one is malformed.
            (ExtPreName, b' ' | b'\t') => ExtPreName,
            (ExtPreName | ExtName, _) if is_tchar(b) => ExtName,
            (ExtName, b'\r') => SizeLf,
            (ExtName | ExtPostName, b';') => ExtPreName,
            (ExtName | ExtPostName, b'=') => ExtPreValue,
            (ExtName | ExtPostName, b' ' | b'\t') => ExtPostName,
            (ExtPreValue, b' ' | b'\t') => ExtPreValue,
            (ExtPreValue, b'"') => ExtQuoted,
            (ExtPreValue | ExtValue, _) if is_tchar(b) => ExtValue,
            (ExtValue, b'\r') | (ExtPostValue { saw_ws: false }, b'\r') => SizeLf,
            (ExtValue | ExtPostValue { .. }, b';') => ExtPreName,
            (ExtValue | ExtPostValue { .. }, b' ' | b'\t') => ExtPostValue { saw_ws: true },
            (ExtQuoted, b'"') => ExtPostValue { saw_ws: false },
            (ExtQuoted, b'\\') => ExtQuotedEscape,
            (ExtQuoted, _)
                if b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80 =>
            {
                ExtQuoted
            }
            (ExtQuotedEscape, _) if b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80 => {
                ExtQuoted
            }
            (SizeLf, b'\n') => {
                self.line_len = 0;
                self.declared = self.declared.saturating_add(self.size);
                if self.size == 0 {
                    TrailerStart
                } else {
                    Data
                }
            }
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => SizeStart,
            (TrailerStart, b'\r') => EndLf,
            (TrailerStart, _) if is_tchar(b) => {
                self.name_len = 0;
                self.push_name(b);
                TrailerName
            }
            (TrailerName, b':') => {
                if self.is_framing_name() {
                    return Err(ChunkError::Malformed);
                }
                if self.is_refused_name() {
                    return Err(ChunkError::RefusedTrailer);
                }
                TrailerValue
            }
            (TrailerName, _) if is_tchar(b) => {
                self.push_name(b);
                TrailerName
            }
            (TrailerValue, b'\r') => TrailerLf,
            (TrailerValue, _) if b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80 => {
                TrailerValue
            }
            (TrailerLf, b'\n') => TrailerStart,
            (EndLf, b'\n') => Done,
            _ => return Err(ChunkError::Malformed),
        };
        Ok(())
    }

    fn push_name(&mut self, b: u8) {
        if self.name_len < self.name.len() {
            self.name[self.name_len] = b.to_ascii_lowercase();
        }
        self.name_len += 1;
    }

    /// See [`is_framing_field`].
    fn is_framing_name(&self) -> bool {
        self.name_len <= self.name.len() && is_framing_field(&self.name[..self.name_len])
    }

    /// Whether the current trailer field is one of `refused`'s. A name longer than the bytes
    /// kept of it (a route's `request_headers` may name one) is taken for one of the same
    /// length whose first bytes it has: refused rather than let through unchecked.
    fn is_refused_name(&self) -> bool {
        let Some(refused) = &self.refused else {
            return false;
        };
        match self.name.get(..self.name_len) {
            Some(name) => names_one_of(name, refused),
            None => refused.iter().any(|r| {
                r.len() == self.name_len
                    && crate::codec::same_field_name(&self.name, &r[..self.name.len()])
            }),
        }
    }
}

/// Whether the field `name` is one of `refused` (lower-case names; `_` is taken for `-`, as
/// CGI-style servers do).
pub fn names_one_of(name: &[u8], refused: &[Box<[u8]>]) -> bool {
    refused
        .iter()
        .any(|r| crate::codec::same_field_name(name, r))
}

/// Whether a trailer field named `lower` (lower-case) is one that must never appear in a
/// trailer because it controls framing, routing or the connection (RFC 9110 §6.5.1). `_` is
/// taken for `-`, as the head's parser drops those spellings: an upstream that merges
/// trailers into the head and reads them as CGI-style servers do would see a framing field
/// the head could not carry.
pub fn is_framing_field(lower: &[u8]) -> bool {
    const FRAMING: [&[u8]; 9] = [
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-connection",
    ];
    FRAMING
        .iter()
        .any(|f| crate::codec::same_field_name(lower, f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_a_validated_body_yields_its_data() {
        let raw = b"5;ext=1\r\nhello\r\n1\r\n \r\nB\r\nworld, and!\r\n0\r\nX-Check: x\r\n\r\n";
        let mut d = ChunkedDecoder::new(1024);
        assert_eq!(d.advance(raw).unwrap(), raw.len());
        assert!(d.is_done());
        let mut out = b"prefix:".to_vec();
        decode_validated(raw, &mut out);
        assert_eq!(out, b"prefix:hello world, and!");
    }

    /// Feeds `input` split at every offset; returns (consumed, done) or the error, checking that
    /// every split gives the same answer as one piece.
    fn feed_all_splits(input: &[u8]) -> Result<(usize, bool), ChunkError> {
        let whole = {
            let mut d = ChunkedDecoder::new(1024);
            d.advance(input).map(|n| (n, d.is_done()))
        };
        for split in 0..=input.len() {
            let mut d = ChunkedDecoder::new(1024);
            let got = d.advance(&input[..split]).and_then(|a| {
                if d.is_done() {
                    return Ok((a, true));
                }
                let b = d.advance(&input[split..])?;
                Ok((a + b, d.is_done()))
            });
            assert_eq!(
                got,
                whole,
                "split at {split} of {:?}",
                String::from_utf8_lossy(input)
            );
        }
        whole
    }

    #[test]
    fn valid_bodies() {
        let ok: &[&[u8]] = &[
            b"5\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            b"A\r\n0123456789\r\n0\r\n\r\n",
            b"a\r\n0123456789\r\n0\r\n\r\n",
            b"5;name=value\r\nhello\r\n0\r\n\r\n",
            b"5 ; a=\"q \\\" x\"; b\r\nhello\r\n0\r\n\r\n",
            b"5;a;b=c ;d = \"e\"\t; f\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"\"\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nY: z\r\n\r\n",
            b"000005\r\nhello\r\n0000\r\n\r\n",
            b"0000000000000005\r\nhello\r\n0\r\n\r\n",
        ];
        for input in ok {
            assert_eq!(feed_all_splits(input), Ok((input.len(), true)));
        }
    }

    #[test]
    fn stops_at_message_end() {
        let input = b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        assert_eq!(feed_all_splits(input), Ok((15, true)));
    }

    #[test]
    fn invalid_bodies() {
        let bad: &[(&[u8], ChunkError)] = &[
            (b"zz\r\nok\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"-5\r\nhello\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"5 \r\nhello\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"5\nhello\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"5\r\nhelloX\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"5\r\nhello\n0\r\n\r\n", ChunkError::Malformed),
            (b"5;a\nhello\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"5;a\x00b\r\nhello\r\n0\r\n\r\n", ChunkError::Malformed),
            // Extensions out of their grammar (before: relayed as they came).
            (b"5;=b\r\nhello\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"5;a=\r\nhello\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"5;;\r\nhello\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"5;\r\nhello\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"5;a b\r\nhello\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"5;a=b=c\r\nhello\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"5;a=b c\r\nhello\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"5;a=\"b\"c\r\nhello\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"5;a \r\nhello\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"5;a=b \r\nhello\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"0x5\r\nhello\r\n0\r\n\r\n", ChunkError::Malformed),
            (b"\r\n", ChunkError::Malformed),
            (
                b"00000000000000005\r\nhello\r\n0\r\n\r\n",
                ChunkError::Malformed,
            ),
            (
                b"10000000000000005\r\nhello\r\n0\r\n\r\n",
                ChunkError::Overflow,
            ),
            (
                b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n",
                ChunkError::Malformed,
            ),
            (
                b"5\r\nhello\r\n0\r\nX-T: 1\r\nTransfer_Encoding: chunked\r\n\r\n",
                ChunkError::Malformed,
            ),
            (
                b"5\r\nhello\r\n0\r\ncontent_length: 5\r\n\r\n",
                ChunkError::Malformed,
            ),
            (b"5\r\nhello\r\n0\r\nX: a\rb\r\n\r\n", ChunkError::Malformed),
            (b"5\r\nhello\r\n0\r\n: v\r\n\r\n", ChunkError::Malformed),
        ];
        for (input, want) in bad {
            assert_eq!(
                feed_all_splits(input),
                Err(*want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn trailer_size_is_bounded() {
        let mut d = ChunkedDecoder::new(16);
        let r = d.advance(b"0\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n");
        assert_eq!(r, Err(ChunkError::TrailerTooLarge));
    }

    #[test]
    fn a_request_trailer_may_not_carry_a_refused_field() {
        let refused: Arc<[Box<[u8]>]> = Arc::from([Box::from(&b"x-consumer-id"[..])]);
        for trailer in ["X-Consumer-Id: forged", "x-consumer_ID: forged"] {
            let input = format!("3\r\nabc\r\n0\r\nX-Sum: 1\r\n{trailer}\r\n\r\n");
            // Split anywhere, the field is still seen.
            for at in 0..input.len() {
                let mut d = ChunkedDecoder::request(1024, refused.clone());
                let r = d
                    .advance(&input.as_bytes()[..at])
                    .and_then(|_| d.advance(&input.as_bytes()[at..]));
                assert_eq!(
                    r,
                    Err(ChunkError::RefusedTrailer),
                    "{trailer} split at {at}"
                );
            }
            // Without the list (an answer's), it goes on.
            let mut d = ChunkedDecoder::new(1024);
            assert_eq!(d.advance(input.as_bytes()), Ok(input.len()));
            assert!(d.is_done());
        }
        // Other fields, a name the refused one starts with, and a longer one, go on.
        let long = "X".repeat(100);
        let input = format!("0\r\nX-Consumer-Ids: 1\r\nX-Sum: 2\r\n{long}: 3\r\n\r\n");
        let mut d = ChunkedDecoder::request(1024, refused);
        assert_eq!(d.advance(input.as_bytes()), Ok(input.len()));
        assert!(d.is_done());
        // A refused name longer than the bytes kept of a name (a route's header edit may
        // name one): before, never matched. Another of its length and start is refused too.
        let name = format!("x-{}", "a".repeat(70));
        let refused: Arc<[Box<[u8]>]> = Arc::from([Box::from(name.as_bytes())]);
        for trailer in [name.to_uppercase(), name.replace('-', "_")] {
            let input = format!("0\r\n{trailer}: 1\r\n\r\n");
            let mut d = ChunkedDecoder::request(1024, refused.clone());
            assert_eq!(d.advance(input.as_bytes()), Err(ChunkError::RefusedTrailer));
        }
        let longer = format!("0\r\n{name}b: 1\r\n\r\n");
        let mut d = ChunkedDecoder::request(1024, refused);
        assert_eq!(d.advance(longer.as_bytes()), Ok(longer.len()));
    }

    #[test]
    fn counts_data() {
        let mut d = ChunkedDecoder::new(64);
        d.advance(b"5\r\nhello\r\n3\r\nabc\r\n").unwrap();
        assert_eq!((d.data_len(), d.declared_len()), (8, 8));
        assert!(!d.is_done());
        // A size counts whole as soon as its line ends, before its data comes.
        d.advance(b"100000005\r\nab").unwrap();
        assert_eq!((d.data_len(), d.declared_len()), (10, 0x1_0000_0005 + 8));
    }
}
