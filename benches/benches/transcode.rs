//! Criterion bench of JSON to gRPC transcoding: a JSON order of about 1 KiB (nested items,
//! an enum, a map, a Timestamp and a Duration) made into its protobuf request message, and
//! the protobuf answer made back into JSON, the way a transcoded unary call does both per
//! request (`common::transcode`, the `Echo` method of the tests' `shop.proto`). Also prints
//! the allocations each direction makes (a counting global allocator).
//!
//! Run with `cargo bench -p benches --bench transcode`.

use common::config::TranscoderConfig;
use common::transcode::compile_transcoder;
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;

#[global_allocator]
static GLOBAL: benches::Counting = benches::Counting;

const SHOP: &[u8] = include_bytes!("../../common/testdata/shop.pb");

fn transcode(c: &mut Criterion) {
    let mut b64 = Vec::new();
    common::keys::encode_b64_into(SHOP, &mut b64);
    let cfg = TranscoderConfig {
        id: "shop".into(),
        descriptor_set_base64: Some(String::from_utf8(b64).unwrap()),
        services: vec!["shop.v1.Orders".into()],
        ..TranscoderConfig::default()
    };
    let t = compile_transcoder(&cfg, 0).unwrap();
    let (echo, vars) = t.find("POST", "/shop.v1.Orders/Echo").unwrap();
    assert!(vars.is_empty());
    let items: Vec<_> = (0..12)
        .map(|i| json!({"sku": format!("SKU-{i:05}"), "quantity": i + 1, "priceCents": format!("{}", 1999 + i)}))
        .collect();
    let order = json!({
        "id": "ord-2026-000123", "customer": "customer-4711", "items": items,
        "status": "SHIPPED", "createdAt": "2026-12-02T05:00:00.250Z", "shipWithin": "86400s",
        "labels": {"lane": "express", "region": "eu-central", "channel": "mobile"},
        "discount": 0.15, "gift": true,
        "notes": ["leave at the door", "fragile", "call before delivery"],
    });
    let json_in = serde_json::to_vec(&order).unwrap();
    let max = t.max_message_bytes;
    let message = echo.request_message(&[], None, &json_in, max).unwrap();
    let mut json_out = Vec::new();
    echo.response_json(&message, &mut json_out).unwrap();
    let back: serde_json::Value = serde_json::from_slice(&json_out).unwrap();
    assert_eq!(back, order, "the round trip keeps the order");

    let before = benches::allocations();
    let m = echo.request_message(&[], None, &json_in, max).unwrap();
    let to_proto = benches::allocations() - before;
    let before = benches::allocations();
    let mut out = Vec::with_capacity(2048);
    echo.response_json(&m, &mut out).unwrap();
    let to_json = benches::allocations() - before;
    println!(
        "JSON {} bytes -> protobuf {} bytes: {to_proto} allocations; protobuf -> JSON {} bytes: \
         {to_json} allocations",
        json_in.len(),
        m.len(),
        out.len()
    );
    c.bench_function("transcode_json_to_protobuf_1k", |b| {
        b.iter(|| echo.request_message(&[], None, &json_in, max).unwrap())
    });
    c.bench_function("transcode_protobuf_to_json_1k", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(2048);
            echo.response_json(&message, &mut out).unwrap();
            out
        })
    });
}

criterion_group!(benches, transcode);
criterion_main!(benches);
