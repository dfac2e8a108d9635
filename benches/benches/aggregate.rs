//! Criterion bench of an aggregate's JSON work per request: three step answers of about
//! 1 KiB each parsed, shaped (allow, rename, group) and merged into one object, then
//! written out, the way `fanout` does it for every aggregate request. Also prints the
//! allocations one merge makes (a counting global allocator).
//!
//! Run with `cargo bench -p benches --bench aggregate`.

use common::aggregate::{DotPath, Shape};
use common::config::OnConflict;
use criterion::{criterion_group, criterion_main, Criterion};
use dataplane::{json, shape};
use serde_json::{json, Map, Value};

#[global_allocator]
static GLOBAL: benches::Counting = benches::Counting;

fn paths(p: &[&str]) -> Box<[DotPath]> {
    p.iter()
        .map(|s| s.split('.').map(Into::into).collect())
        .collect()
}

/// Three answers of about 1 KiB: a product, its reviews, its stock.
fn bodies() -> [Vec<u8>; 3] {
    let product = json!({
        "id": "12345", "name": "Desk lamp with a long descriptive name", "price": 39.5,
        "sku": "LMP-12345", "cost": 11.2, "currency": "EUR",
        "description": "x".repeat(770),
        "supplier": {"name": "Acme", "contact": "ops@acme.test", "country": "DE"},
        "tags": ["lighting", "office", "desk", "led"],
    });
    let reviews = json!((0..10)
        .map(|i| json!({
            "id": i, "stars": 4 + i % 2, "author": format!("reader-{i}"),
            "text": "Bright, even light and a sturdy base. Would buy again."
        }))
        .collect::<Vec<_>>());
    let stock = json!({"data": {
        "sku": "LMP-12345", "qty": 12, "warehouse": "north", "reserved": 3,
        "locations": (0..36).map(|i| json!({"bin": format!("A-{i:02}"), "qty": i})).collect::<Vec<_>>(),
        "updated": "2026-12-02T05:00:00Z"
    }});
    [product, reviews, stock].map(|v| serde_json::to_vec(&v).unwrap())
}

fn shapes() -> [Shape; 3] {
    [
        Shape {
            allow: paths(&["id", "name", "price", "sku", "supplier.name"]),
            ..Shape::default()
        },
        Shape {
            group: Some("reviews".into()),
            ..Shape::default()
        },
        Shape {
            target: Some(vec!["data".into()].into_boxed_slice()),
            allow: paths(&["qty", "warehouse"]),
            rename: vec![("qty".into(), "in_stock".into())].into_boxed_slice(),
            ..Shape::default()
        },
    ]
}

/// What one aggregate request does with its steps' answers: `dataplane::json`, which keeps
/// the answers as text and opens only the objects a shape or a merge needs.
fn merge(bodies: &[Vec<u8>; 3], shapes: &[Shape; 3]) -> Vec<u8> {
    let mut merged = Vec::new();
    let mut size = 0;
    for (body, shape) in bodies.iter().zip(shapes) {
        size += body.len();
        // As a step: checked when it answers, restored from that check to be merged.
        let checked = json::check(body).unwrap();
        let restored = json::restore(body, &checked).unwrap();
        let node = json::apply(shape, restored).unwrap();
        let mut node = node;
        let members = std::mem::take(node.members().unwrap());
        json::merge(&mut merged, members, OnConflict::Error).unwrap();
    }
    let mut out = Vec::with_capacity(size);
    json::Node::Object(merged).write(&mut out);
    out
}

/// The same through `serde_json::Value` trees (the baseline the data plane does not use).
fn merge_values(bodies: &[Vec<u8>; 3], shapes: &[Shape; 3]) -> Vec<u8> {
    let mut merged = Map::new();
    for (body, shape) in bodies.iter().zip(shapes) {
        let v: Value = serde_json::from_slice(body).unwrap();
        let v = shape::apply_rest(shape, shape::apply_target(shape, v).unwrap());
        let Value::Object(obj) = v else {
            unreachable!("every shape here gives an object")
        };
        shape::merge(&mut merged, obj, OnConflict::Error).unwrap();
    }
    serde_json::to_vec(&Value::Object(merged)).unwrap()
}

fn aggregate(c: &mut Criterion) {
    let bodies = bodies();
    let shapes = shapes();
    let sizes: Vec<usize> = bodies.iter().map(Vec::len).collect();
    let lazy: Value = serde_json::from_slice(&merge(&bodies, &shapes)).unwrap();
    let tree: Value = serde_json::from_slice(&merge_values(&bodies, &shapes)).unwrap();
    assert_eq!(lazy, tree, "both ways give the same answer");
    for (name, f) in [
        (
            "json::Node (used)",
            merge as fn(&[Vec<u8>; 3], &[Shape; 3]) -> Vec<u8>,
        ),
        ("serde_json::Value", merge_values),
    ] {
        let before = benches::allocations();
        let out = f(&bodies, &shapes);
        let allocs = benches::allocations() - before;
        println!(
            "{name}: 3 step answers ({sizes:?} bytes) merged into {} bytes with {allocs} allocations",
            out.len()
        );
    }
    c.bench_function("aggregate_merge_3x1k_allow_rename_group", |b| {
        b.iter(|| merge(&bodies, &shapes))
    });
    c.bench_function("aggregate_merge_3x1k_allow_rename_group_value_tree", |b| {
        b.iter(|| merge_values(&bodies, &shapes))
    });
}

criterion_group!(benches, aggregate);
criterion_main!(benches);
