//! The response-head parser on arbitrary bytes, for a GET and a HEAD request: it never panics,
//! and an accepted head's offsets lie inside the buffer in order.
#![no_main]

use dataplane::codec::response::parse_response;
use dataplane::codec::FieldPlan;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for head_request in [false, true] {
        let mut plan = FieldPlan::default();
        if let Ok(Some(resp)) = parse_response(data, head_request, 64 * 1024, &mut plan) {
            assert!((100..600).contains(&resp.status));
            assert!(resp.fields_start <= resp.fields_end);
            assert!(resp.fields_end + 2 == resp.head_end);
            assert!(resp.head_end <= data.len());
            for d in &plan.drop {
                assert!(resp.fields_start <= d.start && d.end <= resp.fields_end);
            }
            if let Some(f) = resp.request_id {
                assert!(f.line.start <= f.value.start && f.value.end <= f.line.end);
                assert!(f.line.end <= resp.fields_end);
            }
        }
    }
});
