//! Key material for JWT verification, read from PEM or from a JWK set, and the base64 codecs
//! both need. Only the shape is checked here (a DER `SubjectPublicKeyInfo` of the right
//! algorithm, a 65-byte uncompressed P-256 point, a 2048-bit or larger RSA modulus); the data
//! plane hands the bytes to its signature library.
//!
//! Base64url decoding is also used per request on tokens, so it does not allocate beyond its
//! output and never panics on hostile input.

use crate::config::JwtAlgorithm;

/// A key that verifies signatures of one algorithm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMaterial {
    /// HS256 shared secret.
    Hmac(Box<[u8]>),
    /// RS256 public key: big-endian modulus and exponent without leading zeros.
    Rsa { n: Box<[u8]>, e: Box<[u8]> },
    /// ES256 public key: the uncompressed point `04 || x || y`.
    P256 { point: Box<[u8]> },
}

/// One verification key and its `kid`, if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtKey {
    pub kid: Option<Box<str>>,
    pub material: KeyMaterial,
}

fn b64_value(c: u8, url: bool) -> Option<u8> {
    Some(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' if url => 62,
        b'_' if url => 63,
        b'+' if !url => 62,
        b'/' if !url => 63,
        _ => return None,
    })
}

/// Decodes base64url without padding (RFC 4648 §5, as JWS uses it) into `out` (cleared
/// first). `None` on any byte outside the alphabet, on `=`, or on a length no encoding has.
pub fn decode_b64url(input: &[u8], out: &mut Vec<u8>) -> Option<()> {
    decode(input, true, out)
}

/// Decodes standard base64 (RFC 4648 §4) with optional padding, ignoring ASCII whitespace
/// (as in PEM bodies).
pub fn decode_b64(input: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let mut clean: Vec<u8> = input
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    while clean.last() == Some(&b'=') {
        clean.pop();
    }
    decode(&clean, false, out)
}

fn decode(input: &[u8], url: bool, out: &mut Vec<u8>) -> Option<()> {
    out.clear();
    if input.len() % 4 == 1 {
        return None;
    }
    out.reserve(input.len() / 4 * 3 + 2);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &c in input {
        acc = (acc << 6) | u32::from(b64_value(c, url)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    // Leftover bits must be zero, or two encodings would decode to the same bytes.
    if acc & ((1 << bits) - 1) != 0 {
        return None;
    }
    Some(())
}

/// Encodes base64url without padding.
pub fn encode_b64url(input: &[u8]) -> String {
    let mut out = Vec::with_capacity(input.len().div_ceil(3) * 4);
    encode(input, URL_ALPHABET, false, &mut out);
    // Only ASCII from the alphabet was written.
    out.into_iter().map(char::from).collect()
}

/// Appends standard base64 with padding (RFC 4648 §4) of `input` to `out`.
pub fn encode_b64_into(input: &[u8], out: &mut Vec<u8>) {
    encode(input, STD_ALPHABET, true, out);
}

const URL_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const STD_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn encode(input: &[u8], alphabet: &[u8; 64], pad: bool, out: &mut Vec<u8>) {
    out.reserve(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let n = chunk.len();
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=n {
            out.push(alphabet[((v >> (18 - 6 * i)) & 63) as usize]);
        }
        if pad {
            out.extend(std::iter::repeat_n(b'=', 3 - n));
        }
    }
}

/// Decodes standard base64 made of padded pieces one after another (a gRPC-Web text body
/// may be several encodings concatenated), appending to `out`. `None` on a byte outside the
/// alphabet, misplaced padding, or a length that is not a multiple of 4.
pub fn decode_b64_pieces(input: &[u8], out: &mut Vec<u8>) -> Option<()> {
    if !input.len().is_multiple_of(4) {
        return None;
    }
    for group in input.chunks(4) {
        let pads = group.iter().rev().take_while(|&&c| c == b'=').count();
        if pads > 2 {
            return None;
        }
        let mut v = 0u32;
        for &c in &group[..4 - pads] {
            v = (v << 6) | u32::from(b64_value(c, false)?);
        }
        v <<= 6 * pads as u32;
        let bytes = [(v >> 16) as u8, (v >> 8) as u8, v as u8];
        out.extend_from_slice(&bytes[..3 - pads]);
    }
    Some(())
}

/// A DER reader over one buffer: just what public keys need.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// Reads one element with tag `tag` and returns its contents.
    fn take(&mut self, tag: u8) -> Result<&'a [u8], String> {
        let b = self.0;
        if b.first() != Some(&tag) {
            return Err(format!("expected DER tag {tag:#04x}"));
        }
        let (len, head) = match *b.get(1).ok_or("truncated DER")? {
            l if l < 0x80 => (usize::from(l), 2),
            0x81 => (usize::from(*b.get(2).ok_or("truncated DER")?), 3),
            0x82 => (
                usize::from(*b.get(2).ok_or("truncated DER")?) << 8
                    | usize::from(*b.get(3).ok_or("truncated DER")?),
                4,
            ),
            _ => return Err("unsupported DER length".into()),
        };
        let end = head + len;
        if end > b.len() {
            return Err("truncated DER".into());
        }
        self.0 = &b[end..];
        Ok(&b[head..end])
    }
}

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

fn strip_zeros(b: &[u8]) -> &[u8] {
    let i = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[i..]
}

fn rsa_key(n: &[u8], e: &[u8]) -> Result<KeyMaterial, String> {
    let (n, e) = (strip_zeros(n), strip_zeros(e));
    if n.len() < 256 || n.len() > 1024 {
        return Err(format!(
            "the RSA modulus has {} bits; 2048 to 8192 are accepted",
            n.len() * 8
        ));
    }
    if e.is_empty() || e.len() > 4 || e[e.len() - 1] & 1 == 0 {
        return Err("the RSA exponent must be odd and at most 32 bits".into());
    }
    // At least 3, as the verifier takes it (e = 1 would make every signature check fail).
    // Accepted before: a stored config keeps its key (which verifies nothing).
    let why = "the RSA exponent must be at least 3 (with 1, no signature verifies)";
    if e == [1] && !crate::validate::tolerated("a JWT policy's RSA key", why) {
        return Err(why.into());
    }
    Ok(KeyMaterial::Rsa {
        n: n.into(),
        e: e.into(),
    })
}

fn p256_key(point: &[u8]) -> Result<KeyMaterial, String> {
    if point.len() != 65 || point[0] != 4 {
        return Err("the P-256 key must be an uncompressed point (65 bytes)".into());
    }
    // A point off the curve verifies no signature: refused at the write rather than every
    // token failing as "signature invalid". Accepted before: a stored config keeps it.
    let why = "the P-256 key is not a point on the curve (no signature verifies with it)";
    if !p256::on_curve(&point[1..33], &point[33..])
        && !crate::validate::tolerated("a JWT policy's EC key", why)
    {
        return Err(why.into());
    }
    Ok(KeyMaterial::P256 {
        point: point.into(),
    })
}

/// Whether a point is on NIST P-256 (`y^2 = x^3 - 3x + b` modulo its prime), with both
/// coordinates below the prime: the check a verifier makes of a public key before it uses
/// it, done here once, when a key is written. Plain arithmetic on 256-bit numbers held as
/// four 64-bit limbs, least significant first; a key is checked once, so the reduction is
/// bit by bit rather than fast.
mod p256 {
    type U256 = [u64; 4];

    const P: U256 = [
        0xffff_ffff_ffff_ffff,
        0x0000_0000_ffff_ffff,
        0x0000_0000_0000_0000,
        0xffff_ffff_0000_0001,
    ];
    const B: U256 = [
        0x3bce_3c3e_27d2_604b,
        0x651d_06b0_cc53_b0f6,
        0xb3eb_bd55_7698_86bc,
        0x5ac6_35d8_aa3a_93e7,
    ];

    /// A big-endian 32-byte number.
    fn from_be(b: &[u8]) -> U256 {
        let mut out = [0u64; 4];
        for (i, limb) in out.iter_mut().enumerate() {
            let at = 32 - 8 * (i + 1);
            *limb = u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or_default());
        }
        out
    }

    fn less(a: &U256, b: &U256) -> bool {
        for i in (0..4).rev() {
            if a[i] != b[i] {
                return a[i] < b[i];
            }
        }
        false
    }

    /// `a - b`, for `a >= b`.
    fn sub(a: &U256, b: &U256) -> U256 {
        let mut out = [0u64; 4];
        let mut borrow = false;
        for i in 0..4 {
            let (d, o1) = a[i].overflowing_sub(b[i]);
            let (d, o2) = d.overflowing_sub(u64::from(borrow));
            out[i] = d;
            borrow = o1 || o2;
        }
        out
    }

    /// `a + b mod P`, for `a, b < P`.
    fn add_mod(a: &U256, b: &U256) -> U256 {
        let mut out = [0u64; 4];
        let mut carry = false;
        for i in 0..4 {
            let (d, o1) = a[i].overflowing_add(b[i]);
            let (d, o2) = d.overflowing_add(u64::from(carry));
            out[i] = d;
            carry = o1 || o2;
        }
        if carry || !less(&out, &P) {
            // The sum wrapped past 2^256 (then it is 2^256 + out, and out - P wraps back)
            // or is at least P: one subtraction of P brings it below P.
            out = sub(&out, &P);
        }
        out
    }

    /// `a - b mod P`, for `a, b < P`.
    fn sub_mod(a: &U256, b: &U256) -> U256 {
        if less(a, b) {
            add_mod(&sub(&P, b), a)
        } else {
            sub(a, b)
        }
    }

    /// `a * b mod P`, for `a, b < P`: the 512-bit product, reduced bit by bit.
    fn mul_mod(a: &U256, b: &U256) -> U256 {
        let mut wide = [0u64; 8];
        for i in 0..4 {
            let mut carry = 0u128;
            for j in 0..4 {
                let t = u128::from(a[i]) * u128::from(b[j]) + u128::from(wide[i + j]) + carry;
                wide[i + j] = t as u64;
                carry = t >> 64;
            }
            wide[i + 4] = carry as u64;
        }
        let mut r = [0u64; 4];
        for bit in (0..512).rev() {
            // r = 2r + bit, kept below P (2r < 2P, so one subtraction is enough).
            let top = r[3] >> 63;
            for i in (1..4).rev() {
                r[i] = (r[i] << 1) | (r[i - 1] >> 63);
            }
            r[0] = (r[0] << 1) | ((wide[bit / 64] >> (bit % 64)) & 1);
            if top == 1 || !less(&r, &P) {
                r = sub(&r, &P);
            }
        }
        r
    }

    /// Whether the point with big-endian coordinates `x` and `y` (32 bytes each) is on the
    /// curve.
    pub(super) fn on_curve(x: &[u8], y: &[u8]) -> bool {
        let (x, y) = (from_be(x), from_be(y));
        if !less(&x, &P) || !less(&y, &P) {
            return false;
        }
        let lhs = mul_mod(&y, &y);
        let x3 = mul_mod(&mul_mod(&x, &x), &x);
        let three_x = add_mod(&add_mod(&x, &x), &x);
        let rhs = add_mod(&sub_mod(&x3, &three_x), &B);
        lhs == rhs
    }
}

/// RSAPublicKey (PKCS #1): SEQUENCE { n INTEGER, e INTEGER }.
fn pkcs1(der: &[u8]) -> Result<KeyMaterial, String> {
    let mut seq = Der(Der(der).take(0x30)?);
    let n = seq.take(0x02)?;
    let e = seq.take(0x02)?;
    rsa_key(n, e)
}

/// SubjectPublicKeyInfo: SEQUENCE { SEQUENCE { algorithm OID, parameters }, BIT STRING }.
fn spki(der: &[u8], algorithm: JwtAlgorithm) -> Result<KeyMaterial, String> {
    let mut outer = Der(Der(der).take(0x30)?);
    let mut alg = Der(outer.take(0x30)?);
    let oid = alg.take(0x06)?;
    let bits = outer.take(0x03)?;
    let key = bits.strip_prefix(&[0]).ok_or("bad BIT STRING")?;
    match algorithm {
        JwtAlgorithm::RS256 if oid == OID_RSA => pkcs1(key),
        JwtAlgorithm::ES256 if oid == OID_EC => {
            if alg.take(0x06)? != OID_P256 {
                return Err("the EC key is not on curve P-256".into());
            }
            p256_key(key)
        }
        _ => Err(format!(
            "the key's algorithm does not match the policy's {algorithm:?}"
        )),
    }
}

/// Reads a PEM public key for RS256 or ES256.
pub fn from_pem(pem: &str, algorithm: JwtAlgorithm) -> Result<KeyMaterial, String> {
    let (label, body) = pem_body(pem).ok_or("not a PEM block (-----BEGIN ...-----)")?;
    let mut der = Vec::new();
    decode_b64(body.as_bytes(), &mut der).ok_or("the PEM body is not valid base64")?;
    match label {
        "PUBLIC KEY" => spki(&der, algorithm),
        "RSA PUBLIC KEY" if algorithm == JwtAlgorithm::RS256 => pkcs1(&der),
        other => Err(format!(
            "a {other:?} PEM block cannot verify {algorithm:?} (use a PUBLIC KEY block)"
        )),
    }
}

fn pem_body(pem: &str) -> Option<(&str, &str)> {
    let start = pem.find("-----BEGIN ")?;
    let rest = &pem[start + 11..];
    let label_end = rest.find("-----")?;
    let label = &rest[..label_end];
    let body = &rest[label_end + 5..];
    let end = body.find(&format!("-----END {label}-----"))?;
    Some((label, &body[..end]))
}

/// Reads a JWK set: every key must suit `algorithm` (`kty` `oct`, `RSA` or `EC` P-256), be
/// meant for signatures (RFC 7517 4.2, 4.3: `use` `sig`, `key_ops` with `verify`, when they
/// are there), have a string `kid` if any, and hold no private part (`d` and the other RSA
/// and EC private members): a verification key set is public, and is shown as stored.
pub fn from_jwks(jwks: &serde_json::Value, algorithm: JwtAlgorithm) -> Result<Vec<JwtKey>, String> {
    let keys = jwks
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("a JWK set is an object with a \"keys\" array")?;
    if keys.is_empty() || keys.len() > 16 {
        return Err("a JWK set must hold 1 to 16 keys".into());
    }
    let mut out = Vec::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        let field = |name: &str| -> Result<Vec<u8>, String> {
            let s = k
                .get(name)
                .and_then(|v| v.as_str())
                .ok_or_else(|| format!("keys[{i}] has no string {name:?}"))?;
            let mut v = Vec::new();
            decode_b64url(s.as_bytes(), &mut v)
                .ok_or_else(|| format!("keys[{i}].{name} is not base64url"))?;
            Ok(v)
        };
        let text = |name: &str| -> Result<Option<&str>, String> {
            match k.get(name) {
                None => Ok(None),
                Some(v) => v
                    .as_str()
                    .map(Some)
                    .ok_or_else(|| format!("keys[{i}].{name} must be a string")),
            }
        };
        if text("use")?.is_some_and(|u| u != "sig") {
            return Err(format!("keys[{i}].use is not \"sig\": not a signature key"));
        }
        if let Some(ops) = k.get("key_ops") {
            let verify = ops
                .as_array()
                .is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify")));
            if !verify {
                return Err(format!("keys[{i}].key_ops does not list \"verify\""));
            }
        }
        let kty = k.get("kty").and_then(|v| v.as_str()).unwrap_or("");
        if kty != "oct" {
            if let Some(private) = ["d", "p", "q", "dp", "dq", "qi", "oth"]
                .into_iter()
                .find(|m| k.get(*m).is_some())
            {
                return Err(format!(
                    "keys[{i}].{private}: a private key part; the set takes public keys only"
                ));
            }
        }
        if let Some(alg) = text("alg")? {
            if alg != format!("{algorithm:?}") {
                return Err(format!(
                    "keys[{i}] is for {alg}, the policy verifies {algorithm:?}"
                ));
            }
        }
        let material = match (algorithm, kty) {
            (JwtAlgorithm::HS256, "oct") => {
                let secret = field("k")?;
                check_secret(&secret).map_err(|e| format!("keys[{i}]: {e}"))?;
                KeyMaterial::Hmac(secret.into())
            }
            (JwtAlgorithm::RS256, "RSA") => {
                rsa_key(&field("n")?, &field("e")?).map_err(|e| format!("keys[{i}]: {e}"))?
            }
            (JwtAlgorithm::ES256, "EC") => {
                if k.get("crv").and_then(|v| v.as_str()) != Some("P-256") {
                    return Err(format!("keys[{i}] is not on curve P-256"));
                }
                let (x, y) = (field("x")?, field("y")?);
                if x.len() != 32 || y.len() != 32 {
                    return Err(format!("keys[{i}]: x and y must be 32 bytes each"));
                }
                let mut point = vec![4u8];
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                p256_key(&point)?
            }
            _ => {
                return Err(format!(
                    "keys[{i}] has kty {kty:?}, which cannot verify {algorithm:?}"
                ))
            }
        };
        let kid = text("kid")?.map(Into::into);
        out.push(JwtKey { kid, material });
    }
    Ok(out)
}

/// An HS256 secret must hold at least 256 bits (RFC 7518 §3.2).
pub fn check_secret(secret: &[u8]) -> Result<(), String> {
    if secret.len() < 32 {
        Err("an HS256 secret must be at least 32 bytes".into())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_base64_pieces_round_trip() {
        let mut enc = Vec::new();
        encode_b64_into(b"hello", &mut enc);
        assert_eq!(enc, b"aGVsbG8=");
        // Two encodings one after another decode to both inputs.
        encode_b64_into(b"\x00\x80\xff!", &mut enc);
        let mut dec = Vec::new();
        decode_b64_pieces(&enc, &mut dec).unwrap();
        assert_eq!(dec, b"hello\x00\x80\xff!");
        for bad in [&b"aGVsbG8"[..], b"a===", b"aG*s", b"aGVs\nbG8="] {
            assert!(decode_b64_pieces(bad, &mut Vec::new()).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn base64url_round_trip_and_rejects() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let enc = encode_b64url(&data);
            let mut dec = Vec::new();
            decode_b64url(enc.as_bytes(), &mut dec).unwrap();
            assert_eq!(dec, data);
        }
        let mut out = Vec::new();
        assert!(decode_b64url(b"a", &mut out).is_none());
        assert!(decode_b64url(b"ab=", &mut out).is_none());
        assert!(decode_b64url(b"a+b/", &mut out).is_none());
        // "QR" leaves non-zero bits: not a canonical encoding.
        assert!(decode_b64url(b"QR", &mut out).is_none());
        assert!(decode_b64url(b"QQ", &mut out).is_some());
    }

    // openssl ecparam -name prime256v1 -genkey | openssl ec -pubout
    const EC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEfzynpaEj2BSm008l1QvmJNZRDc92
yKFmjJ0jhJ1rLnSYNC1PdaadfahDLMTrgJgFh10PQ9TDKDLHmT58wITqMQ==
-----END PUBLIC KEY-----
";

    #[test]
    fn pem_keys() {
        let k = from_pem(EC_PEM, JwtAlgorithm::ES256).unwrap();
        assert!(matches!(k, KeyMaterial::P256 { ref point } if point.len() == 65));
        // An EC key cannot serve an RS256 policy.
        assert!(from_pem(EC_PEM, JwtAlgorithm::RS256).is_err());
        assert!(from_pem("not pem", JwtAlgorithm::RS256).is_err());
        assert!(from_pem(
            "-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----",
            JwtAlgorithm::RS256
        )
        .is_err());
    }

    #[test]
    fn an_rsa_exponent_below_3_is_refused() {
        // e = 1 made a key every signature check failed with (the verifier needs e >= 3):
        // "the token's signature is invalid" on every token, not a 422 at the write.
        let n = [0xc5u8; 256];
        for (e, ok) in [
            (&[1u8][..], false),
            (&[3], true),
            (&[1, 0, 1], true),
            (&[2], false),
        ] {
            assert_eq!(rsa_key(&n, e).is_ok(), ok, "{e:?}");
        }
        // A config stored by an earlier build that took such a key still starts, noting it.
        let (stored, notes) = crate::validate::compiling_stored(|| rsa_key(&n, &[1]));
        assert!(stored.is_ok());
        assert_eq!(notes.len(), 1, "{notes:?}");
    }

    #[test]
    fn p256_points_are_checked_on_the_curve() {
        let hex = |h: &str| -> Vec<u8> {
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                .collect()
        };
        // The curve's generator, and the test key's point.
        let gx = hex("6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296");
        let gy = hex("4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5");
        assert!(p256::on_curve(&gx, &gy));
        let KeyMaterial::P256 { point } = from_pem(EC_PEM, JwtAlgorithm::ES256).unwrap() else {
            panic!("an EC key")
        };
        assert!(p256::on_curve(&point[1..33], &point[33..]));
        // Off the curve: y + 1, the audit's point of 0x01 bytes, a coordinate of p itself.
        let mut off = gy.clone();
        off[31] ^= 1;
        assert!(!p256::on_curve(&gx, &off));
        assert!(!p256::on_curve(&[1; 32], &[1; 32]));
        let p = hex("ffffffff00000001000000000000000000000000ffffffffffffffffffffffff");
        assert!(!p256::on_curve(&p, &gy));
        // Refused when written; a config stored by an earlier build keeps it, noted.
        let bad = [&[4u8][..], &[1; 64]].concat();
        assert!(p256_key(&bad).is_err());
        let (stored, notes) = crate::validate::compiling_stored(|| p256_key(&bad));
        assert!(stored.is_ok());
        assert_eq!(notes.len(), 1, "{notes:?}");
    }

    #[test]
    fn jwks_keys() {
        let jwks = serde_json::json!({"keys": [
            {"kty": "oct", "kid": "a", "k": encode_b64url(&[7u8; 32])}
        ]});
        let keys = from_jwks(&jwks, JwtAlgorithm::HS256).unwrap();
        assert_eq!(keys[0].kid.as_deref(), Some("a"));
        assert!(from_jwks(&jwks, JwtAlgorithm::RS256).is_err());
        let short = serde_json::json!({"keys": [{"kty": "oct", "k": "AAAA"}]});
        assert!(from_jwks(&short, JwtAlgorithm::HS256).is_err());
        assert!(from_jwks(&serde_json::json!({"keys": []}), JwtAlgorithm::HS256).is_err());
    }

    #[test]
    fn jwks_keys_must_be_public_signature_keys() {
        let secret = encode_b64url(&[7u8; 32]);
        let refused = |extra: serde_json::Value| {
            let mut key = serde_json::json!({"kty": "oct", "k": secret});
            key.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            from_jwks(&serde_json::json!({ "keys": [key] }), JwtAlgorithm::HS256).unwrap_err()
        };
        assert!(refused(serde_json::json!({"kid": 5})).contains("kid must be a string"));
        assert!(refused(serde_json::json!({"use": "enc"})).contains("not a signature key"));
        let ops = serde_json::json!({"key_ops": ["encrypt"]});
        assert!(refused(ops).contains("verify"));
        // Listed for signatures, they pass.
        let ok = serde_json::json!({"keys": [
            {"kty": "oct", "k": secret, "use": "sig", "key_ops": ["sign", "verify"]}
        ]});
        assert!(from_jwks(&ok, JwtAlgorithm::HS256).is_ok());
        let private = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "d": "AA"}
        ]});
        let e = from_jwks(&private, JwtAlgorithm::ES256).unwrap_err();
        assert!(e.contains("keys[0].d: a private key part"), "{e}");
    }
}
