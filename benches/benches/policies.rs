//! Criterion benches of the traffic policies' per-request pieces: a rate-limit check (one
//! thread, and two threads on one key), a CIDR lookup among 10,000 entries, an API-key lookup
//! (hash and table), and JWT verification for HS256, RS256 and ES256.
//!
//! Run with `cargo bench -p benches --bench policies`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::cidr::IpSet;
use common::config::JwtAlgorithm;
use common::keys::{encode_b64url, JwtKey, KeyMaterial};
use common::policy::{api_key_digest, ApiKeys, Jwt};
use criterion::{criterion_group, criterion_main, Criterion};
use dataplane::policy::jwt;
use dataplane::policy::ratelimit::{key_of, now_ns, Limit, Limiter};
use ring::signature::KeyPair;

fn rate_limit(c: &mut Criterion) {
    // High enough never to refuse, so every check does its compare-and-swap.
    let limit = Limit::new(1_000_000_000, 1_000_000_000, 1_000_000_000).unwrap();
    let limiter = Arc::new(Limiter::new(limit, 100_000));
    c.bench_function("rate_limit_check_route_1_thread", |b| {
        b.iter(|| limiter.check(None, now_ns()))
    });
    let key = key_of(b"i\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xff\xff\x0a\x01\x02\x03");
    c.bench_function("rate_limit_check_client_ip_1_thread", |b| {
        b.iter(|| limiter.check(Some(&key), now_ns()))
    });
    // A second thread hammers the same key while this one is measured.
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (l, stop) = (limiter.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..1000 {
                    l.check(Some(&key), now_ns());
                }
            }
        })
    };
    c.bench_function("rate_limit_check_one_key_2_threads", |b| {
        b.iter(|| limiter.check(Some(&key), now_ns()))
    });
    stop.store(true, Ordering::Relaxed);
    other.join().unwrap();
}

fn cidr(c: &mut Criterion) {
    let mut x: u32 = 0x2545_f491;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let entries: Vec<String> = (0..10_000)
        .map(|_| format!("{}/24", std::net::Ipv4Addr::from(next() & 0xffff_ff00)))
        .collect();
    let set = IpSet::parse(&entries).unwrap();
    let probes: Vec<IpAddr> = (0..1024).map(|_| IpAddr::V4(next().into())).collect();
    let mut i = 0;
    c.bench_function("cidr_lookup_10000_entries", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            set.contains(probes[i])
        })
    });
}

fn api_key(c: &mut Criterion) {
    let mut table = ApiKeys::default();
    for i in 0..10_000u32 {
        table.insert(api_key_digest(format!("key-{i:012}").as_bytes()), i);
    }
    let presented = b"key-000000004242";
    c.bench_function("api_key_lookup_10000_keys", |b| {
        b.iter(|| table.find(&api_key_digest(presented)))
    });
}

fn jwt_policy(algorithm: JwtAlgorithm, material: KeyMaterial) -> Jwt {
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

const CLAIMS: &str =
    r#"{"sub":"mobile-app","iss":"https://issuer.example","aud":"orders","exp":4102444800}"#;

fn signed(alg: &str) -> String {
    format!(
        "{}.{}",
        encode_b64url(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).as_bytes()),
        encode_b64url(CLAIMS.as_bytes())
    )
}

fn jwt(c: &mut Criterion) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut scratch = Vec::new();

    let secret = b"an-hs256-secret-of-at-least-32-bytes!";
    let hs = jwt_policy(JwtAlgorithm::HS256, KeyMaterial::Hmac(secret[..].into()));
    let s = signed("HS256");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let hs_token = format!(
        "{s}.{}",
        encode_b64url(ring::hmac::sign(&key, s.as_bytes()).as_ref())
    );

    let der = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../controlplane/tests/fixtures/rsa2048.pkcs1.der"
    ))
    .unwrap();
    let pair = ring::signature::RsaKeyPair::from_der(&der).unwrap();
    let pem = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../controlplane/tests/fixtures/rsa2048.pub.pem"
    ))
    .unwrap();
    let rs = jwt_policy(
        JwtAlgorithm::RS256,
        common::keys::from_pem(&pem, JwtAlgorithm::RS256).unwrap(),
    );
    let s = signed("RS256");
    let mut sig = vec![0u8; pair.public().modulus_len()];
    let rng = ring::rand::SystemRandom::new();
    pair.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &rng,
        s.as_bytes(),
        &mut sig,
    )
    .unwrap();
    let rs_token = format!("{s}.{}", encode_b64url(&sig));

    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let ec = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let es = jwt_policy(
        JwtAlgorithm::ES256,
        KeyMaterial::P256 {
            point: ec.public_key().as_ref().into(),
        },
    );
    let s = signed("ES256");
    let es_token = format!(
        "{s}.{}",
        encode_b64url(ec.sign(&rng, s.as_bytes()).unwrap().as_ref())
    );

    for (name, policy, token) in [
        ("jwt_verify_hs256", &hs, &hs_token),
        ("jwt_verify_rs256", &rs, &rs_token),
        ("jwt_verify_es256", &es, &es_token),
    ] {
        assert_eq!(
            jwt::verify(policy, token.as_bytes(), now, &mut scratch).unwrap(),
            "mobile-app"
        );
        c.bench_function(name, |b| {
            b.iter(|| jwt::verify(policy, token.as_bytes(), now, &mut scratch))
        });
    }
}

criterion_group!(policies, rate_limit, cidr, api_key, jwt);
criterion_main!(policies);
