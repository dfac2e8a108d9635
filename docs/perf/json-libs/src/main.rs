//! How fast three JSON libraries check three 1 KiB step answers, the work an aggregate cannot
//! skip (README, Performance, Aggregates). Bodies as the `loadtest aggregate` origins send
//! them: `dense` (38 small objects) and `text` (a record with a long string).

use std::hint::black_box;
use std::time::Instant;

fn body(k: usize, dense: bool) -> Vec<u8> {
    if !dense {
        let text = "A sturdy desk lamp with a warm, even light and a heavy base. ".repeat(14);
        return format!(
            "{{\"s{k}_id\":{k},\"s{k}_name\":\"Desk lamp {k}\",\"s{k}_price\":39.5,\"s{k}_tags\":[\"lighting\",\"office\"],\"s{k}_description\":\"{}\"}}",
            &text[..text.len().min(880)]
        )
        .into_bytes();
    }
    let mut s = format!("{{\"s{k}_id\":{k},\"s{k}_items\":[");
    let mut i = 0;
    while s.len() < 1000 {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!("{{\"n\":{i},\"v\":\"value-{i:04}\"}}"));
        i += 1;
    }
    s.push_str("]}");
    s.into_bytes()
}

fn time(name: &str, n: usize, mut f: impl FnMut()) {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    println!("  {name:44} {:6.2} µs", t.elapsed().as_secs_f64() * 1e6 / n as f64);
}

fn main() {
    let n = 200_000;
    for dense in [true, false] {
        let bodies: Vec<Vec<u8>> = (0..3).map(|k| body(k, dense)).collect();
        let sizes: Vec<usize> = bodies.iter().map(Vec::len).collect();
        println!("{} bodies {sizes:?}, per 3 bodies:", if dense { "dense" } else { "text" });
        time("serde_json: check (&RawValue)", n, || {
            for b in &bodies {
                let v: &serde_json::value::RawValue = serde_json::from_slice(b).unwrap();
                black_box(v);
            }
        });
        time("serde_json: check (IgnoredAny)", n, || {
            for b in &bodies {
                let v: serde::de::IgnoredAny = serde_json::from_slice(b).unwrap();
                black_box(v);
            }
        });
        time("serde_json: Value tree", n, || {
            for b in &bodies {
                let v: serde_json::Value = serde_json::from_slice(b).unwrap();
                black_box(v);
            }
        });
        time("sonic-rs: check (IgnoredAny)", n, || {
            for b in &bodies {
                let v: serde::de::IgnoredAny = sonic_rs::from_slice(b).unwrap();
                black_box(v);
            }
        });
        time("sonic-rs: LazyValue", n, || {
            for b in &bodies {
                let v: sonic_rs::LazyValue = sonic_rs::from_slice(b).unwrap();
                black_box(v);
            }
        });
        time("sonic-rs: Value tree", n, || {
            for b in &bodies {
                let v: sonic_rs::Value = sonic_rs::from_slice(b).unwrap();
                black_box(v);
            }
        });
        let mut buf = Vec::with_capacity(4096);
        let mut scratch = simd_json::Buffers::new(4096);
        time("simd-json: tape (copy + parse in place)", n, || {
            for b in &bodies {
                buf.clear();
                buf.extend_from_slice(b);
                let t = simd_json::to_tape_with_buffers(&mut buf, &mut scratch).unwrap();
                black_box(&t);
            }
        });
    }
}
