//! JWT bearer-token verification (RFC 7519 / RFC 7515 compact form) for HS256, RS256 and
//! ES256.
//!
//! The algorithm is the policy's: a token whose header names any other `alg` (`none`, or
//! HS256 against an RSA key) is refused before any key is touched, and the key's type is
//! fixed by the policy at compile time, so the classic confusion attacks have nothing to
//! work with. The signature is checked before the claims are read. Every failure is an
//! [`JwtError`] (a 401 for the client); nothing here panics on hostile input.
//!
//! Cost: decoding and one signature check (ring); the claims are parsed with serde_json,
//! which allocates, so JWT routes are not allocation-free like the plain proxy path.

use common::config::JwtAlgorithm;
use common::keys::{decode_b64url, KeyMaterial};
use common::policy::Jwt;
use ring::signature::{self, UnparsedPublicKey};
use serde_json::Value;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    TooLarge,
    Malformed,
    /// `alg` is not the policy's algorithm (or `crit` names an extension).
    Algorithm,
    /// No key with the token's `kid`.
    UnknownKey,
    BadSignature,
    Expired,
    /// No `exp` claim, which the policy requires.
    NoExpiry,
    NotYetValid,
    Issuer,
    Audience,
    /// The consumer claim is missing or not a string.
    NoConsumer,
}

impl JwtError {
    /// Short text for the problem body and `error_description`.
    pub fn reason(self) -> &'static str {
        match self {
            JwtError::TooLarge => "the token is too large",
            JwtError::Malformed => "the token is malformed",
            JwtError::Algorithm => "the token's algorithm is not accepted",
            JwtError::UnknownKey => "the token names an unknown key",
            JwtError::BadSignature => "the token's signature is invalid",
            JwtError::Expired => "the token has expired",
            JwtError::NoExpiry => "the token has no exp claim, which is required",
            JwtError::NotYetValid => "the token is not valid yet",
            JwtError::Issuer => "the token's issuer is not accepted",
            JwtError::Audience => "the token's audience is not accepted",
            JwtError::NoConsumer => "the token does not name a consumer",
        }
    }
}

/// Verifies `token` at `now_s` (seconds since the Unix epoch) and returns the consumer claim's
/// value. `scratch` is reused for decoding.
pub fn verify(
    policy: &Jwt,
    token: &[u8],
    now_s: u64,
    scratch: &mut Vec<u8>,
) -> Result<String, JwtError> {
    if token.len() > policy.max_token_bytes {
        return Err(JwtError::TooLarge);
    }
    let mut parts = token.split(|&b| b == b'.');
    let (Some(h64), Some(p64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let signed = &token[..h64.len() + 1 + p64.len()];

    decode_b64url(h64, scratch).ok_or(JwtError::Malformed)?;
    let header: Value = serde_json::from_slice(scratch).map_err(|_| JwtError::Malformed)?;
    let header = header.as_object().ok_or(JwtError::Malformed)?;
    let want = match policy.algorithm {
        JwtAlgorithm::HS256 => "HS256",
        JwtAlgorithm::RS256 => "RS256",
        JwtAlgorithm::ES256 => "ES256",
    };
    if header.get("alg").and_then(Value::as_str) != Some(want) || header.contains_key("crit") {
        return Err(JwtError::Algorithm);
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.as_str()),
        Some(_) => return Err(JwtError::Malformed),
    };

    let mut sig = Vec::new();
    decode_b64url(s64, &mut sig).ok_or(JwtError::Malformed)?;
    let mut tried = false;
    let mut valid = false;
    for key in policy.keys.iter() {
        if let (Some(want), Some(have)) = (kid, key.kid.as_deref()) {
            if want != have {
                continue;
            }
        }
        tried = true;
        if check_signature(&key.material, signed, &sig) {
            valid = true;
            break;
        }
    }
    if !tried {
        return Err(JwtError::UnknownKey);
    }
    if !valid {
        return Err(JwtError::BadSignature);
    }

    decode_b64url(p64, scratch).ok_or(JwtError::Malformed)?;
    let claims: Value = serde_json::from_slice(scratch).map_err(|_| JwtError::Malformed)?;
    let claims = claims.as_object().ok_or(JwtError::Malformed)?;
    let time = |name: &str| -> Result<Option<f64>, JwtError> {
        match claims.get(name) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or(JwtError::Malformed),
        }
    };
    let now = now_s as f64;
    let leeway = policy.leeway_s as f64;
    match time("exp")? {
        Some(exp) if now >= exp + leeway => return Err(JwtError::Expired),
        None if policy.require_exp => return Err(JwtError::NoExpiry),
        _ => {}
    }
    // A token issued in the future (`iat`) is no more valid yet than one whose `nbf` is.
    for name in ["nbf", "iat"] {
        if let Some(t) = time(name)? {
            if now + leeway < t {
                return Err(JwtError::NotYetValid);
            }
        }
    }
    if let Some(iss) = &policy.issuer {
        if claims.get("iss").and_then(Value::as_str) != Some(iss) {
            return Err(JwtError::Issuer);
        }
    }
    if let Some(aud) = &policy.audience {
        let ok = match claims.get("aud") {
            Some(Value::String(s)) => s == &**aud,
            Some(Value::Array(list)) => list.iter().any(|v| v.as_str() == Some(aud)),
            _ => false,
        };
        if !ok {
            return Err(JwtError::Audience);
        }
    }
    match claims.get(&*policy.consumer_claim) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(JwtError::NoConsumer),
    }
}

fn check_signature(key: &KeyMaterial, signed: &[u8], sig: &[u8]) -> bool {
    match key {
        KeyMaterial::Hmac(secret) => {
            let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
            // Constant time in the signature bytes.
            ring::hmac::verify(&k, signed, sig).is_ok()
        }
        KeyMaterial::Rsa { n, e } => signature::RsaPublicKeyComponents { n, e }
            .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, sig)
            .is_ok(),
        KeyMaterial::P256 { point } => {
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(signed, sig)
                .is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::keys::{encode_b64url, JwtKey};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn policy(algorithm: JwtAlgorithm, material: KeyMaterial) -> Jwt {
        Jwt {
            algorithm,
            keys: vec![JwtKey {
                kid: None,
                material,
            }]
            .into(),
            issuer: Some("https://issuer.example".into()),
            audience: Some("orders".into()),
            leeway_s: 30,
            require_exp: true,
            consumer_claim: "sub".into(),
            consumer_header: b"X-Consumer-Id"[..].into(),
            strip_credential: true,
            max_token_bytes: 8192,
        }
    }

    fn hs256(header: &str, claims: &str, secret: &[u8]) -> String {
        let signed = format!(
            "{}.{}",
            encode_b64url(header.as_bytes()),
            encode_b64url(claims.as_bytes())
        );
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let sig = ring::hmac::sign(&k, signed.as_bytes());
        format!("{signed}.{}", encode_b64url(sig.as_ref()))
    }

    const NOW: u64 = 1_800_000_000;

    fn claims(extra: &str) -> String {
        format!(
            r#"{{"sub":"mobile-app","iss":"https://issuer.example","aud":["x","orders"],"exp":{}{extra}}}"#,
            NOW + 60
        )
    }

    #[test]
    fn hs256_accepts_a_good_token_and_refuses_each_defect() {
        let p = policy(JwtAlgorithm::HS256, KeyMaterial::Hmac(SECRET.into()));
        let h = r#"{"alg":"HS256","typ":"JWT"}"#;
        let mut s = Vec::new();
        let good = hs256(h, &claims(""), SECRET);
        assert_eq!(
            verify(&p, good.as_bytes(), NOW, &mut s).unwrap(),
            "mobile-app"
        );

        let cases: Vec<(String, JwtError)> = vec![
            (
                hs256(h, &claims(""), b"another secret, also 32 bytes...."),
                JwtError::BadSignature,
            ),
            (
                hs256(
                    h,
                    &format!(
                        r#"{{"sub":"a","iss":"https://issuer.example","aud":"orders","exp":{}}}"#,
                        NOW - 31
                    ),
                    SECRET,
                ),
                JwtError::Expired,
            ),
            (
                hs256(
                    h,
                    r#"{"sub":"a","iss":"https://issuer.example","aud":"orders"}"#,
                    SECRET,
                ),
                JwtError::NoExpiry,
            ),
            (
                hs256(h, &claims(&format!(r#","nbf":{}"#, NOW + 31)), SECRET),
                JwtError::NotYetValid,
            ),
            (
                hs256(h, &claims(&format!(r#","iat":{}"#, NOW + 31)), SECRET),
                JwtError::NotYetValid,
            ),
            (
                hs256(h, &claims(r#","iat":"yesterday""#), SECRET),
                JwtError::Malformed,
            ),
            (
                hs256(
                    h,
                    &format!(
                        r#"{{"sub":"a","iss":"https://evil.example","aud":"orders","exp":{}}}"#,
                        NOW + 60
                    ),
                    SECRET,
                ),
                JwtError::Issuer,
            ),
            (
                hs256(
                    h,
                    &format!(
                        r#"{{"sub":"a","iss":"https://issuer.example","aud":"billing","exp":{}}}"#,
                        NOW + 60
                    ),
                    SECRET,
                ),
                JwtError::Audience,
            ),
            (
                hs256(
                    h,
                    &format!(
                        r#"{{"iss":"https://issuer.example","aud":"orders","exp":{}}}"#,
                        NOW + 60
                    ),
                    SECRET,
                ),
                JwtError::NoConsumer,
            ),
            (
                hs256(r#"{"alg":"none"}"#, &claims(""), SECRET),
                JwtError::Algorithm,
            ),
            (
                hs256(r#"{"alg":"RS256"}"#, &claims(""), SECRET),
                JwtError::Algorithm,
            ),
            (
                hs256(r#"{"alg":"HS256","crit":["x"]}"#, &claims(""), SECRET),
                JwtError::Algorithm,
            ),
            ("a.b".into(), JwtError::Malformed),
            ("a.b.c.d".into(), JwtError::Malformed),
            ("!!!.e30.AAAA".into(), JwtError::Malformed),
            ("x".repeat(9000), JwtError::TooLarge),
        ];
        for (token, want) in cases {
            assert_eq!(
                verify(&p, token.as_bytes(), NOW, &mut s),
                Err(want),
                "{token}"
            );
        }
        // `alg: none` with an empty signature.
        let none = format!(
            "{}.{}.",
            encode_b64url(br#"{"alg":"none"}"#),
            encode_b64url(claims("").as_bytes())
        );
        assert_eq!(
            verify(&p, none.as_bytes(), NOW, &mut s),
            Err(JwtError::Algorithm)
        );
        // Within the leeway an expired token still passes.
        let late = hs256(h, &claims(""), SECRET);
        assert!(verify(&p, late.as_bytes(), NOW + 60 + 29, &mut s).is_ok());
        assert_eq!(
            verify(&p, late.as_bytes(), NOW + 60 + 30, &mut s),
            Err(JwtError::Expired)
        );
    }

    #[test]
    fn es256_round_trip_and_hs256_confusion() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        use ring::signature::KeyPair;
        let point = pair.public_key().as_ref().to_vec();
        let p = policy(
            JwtAlgorithm::ES256,
            KeyMaterial::P256 {
                point: point.clone().into(),
            },
        );
        let signed = format!(
            "{}.{}",
            encode_b64url(br#"{"alg":"ES256"}"#),
            encode_b64url(claims("").as_bytes())
        );
        let sig = pair.sign(&rng, signed.as_bytes()).unwrap();
        let token = format!("{signed}.{}", encode_b64url(sig.as_ref()));
        let mut s = Vec::new();
        assert_eq!(
            verify(&p, token.as_bytes(), NOW, &mut s).unwrap(),
            "mobile-app"
        );
        // A token "signed" with HMAC using the public key bytes as the secret.
        let forged = hs256(r#"{"alg":"HS256"}"#, &claims(""), &point);
        assert_eq!(
            verify(&p, forged.as_bytes(), NOW, &mut s),
            Err(JwtError::Algorithm)
        );
        let forged = hs256(r#"{"alg":"ES256"}"#, &claims(""), &point);
        assert_eq!(
            verify(&p, forged.as_bytes(), NOW, &mut s),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn garbage_never_panics() {
        let p = policy(JwtAlgorithm::HS256, KeyMaterial::Hmac(SECRET.into()));
        let mut s = Vec::new();
        let mut x: u32 = 7;
        for len in 0..300 {
            let token: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    b"eyJhbGciOiJIUzI1NiJ9._-.=+/\0\xff"[(x % 28) as usize]
                })
                .collect();
            assert!(verify(&p, &token, NOW, &mut s).is_err());
        }
    }
}
