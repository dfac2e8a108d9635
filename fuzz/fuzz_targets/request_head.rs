//! The request-head parser on arbitrary bytes: it never panics, a head it accepts has spans
//! inside the buffer in order, and feeding the same bytes in two reads (any split) gives the
//! same answer as one read.
#![no_main]

use common::Limits;
use dataplane::codec::request::parse_request;
use dataplane::codec::FieldPlan;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The defaults of `[limits]`, smaller for the URI so the 414 paths are reached too.
    let limits = Limits {
        max_header_bytes: 16 * 1024,
        max_header_count: 100,
        max_uri_bytes: 2048,
        max_body_bytes: 1 << 20,
        max_connections: 65_536,
        merge_slashes: true,
    };
    let mut plan = FieldPlan::default();
    let whole = parse_request(data, &limits, &mut plan);
    if let Ok(Some(head)) = &whole {
        assert!(head.start <= head.fields_start);
        assert!(head.fields_start <= head.fields_end);
        assert!(head.fields_end + 2 == head.head_end);
        assert!(head.head_end <= data.len());
        for span in [head.method, head.target, head.origin_target]
            .into_iter()
            .chain(head.host)
            .chain(head.upgrade)
            .chain(head.user_agent)
        {
            assert!(span.start <= span.end && span.end <= head.head_end);
        }
        for d in &plan.drop {
            assert!(head.fields_start <= d.start && d.end <= head.fields_end);
        }
        // A parsed head parses the same with nothing after it.
        let again = parse_request(&data[..head.head_end], &limits, &mut FieldPlan::default());
        assert_eq!(again.map(|h| h.map(|h| h.head_end)), Ok(Some(head.head_end)));
    }
    // A prefix never yields a head that the whole does not.
    if data.len() > 1 {
        let cut = data[0] as usize % data.len();
        if let Ok(Some(prefix_head)) = parse_request(&data[..cut], &limits, &mut FieldPlan::default()) {
            assert_eq!(whole.map(|h| h.map(|h| h.head_end)), Ok(Some(prefix_head.head_end)));
        }
    }
});
