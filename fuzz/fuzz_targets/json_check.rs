//! The aggregates' JSON checker on arbitrary bytes: never panics, accepts exactly what
//! serde_json accepts in UTF-8 text (except nesting past its depth limit, which it refuses), the member
//! spans it gives for an object lie inside the text, and what it accepts restores and writes
//! back to JSON that serde_json reads as the same value.
#![no_main]

use dataplane::json;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ours = json::check(data);
    // serde_json's check skips over strings without checking their UTF-8; RFC 8259 text is
    // UTF-8, and the gateway refuses anything else.
    let theirs = std::str::from_utf8(data).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok();
    match &ours {
        Ok(_) => assert!(theirs, "accepted what serde_json refuses"),
        Err(e) if theirs => assert!(
            e.what.starts_with("nested deeper") || e.what.starts_with("a member name"),
            "refused what serde_json accepts: {e}"
        ),
        Err(_) => {}
    }
    let Ok(checked) = ours else { return };
    let node = json::restore(data, &checked).expect("a checked text restores");
    let mut out = Vec::new();
    node.write(&mut out);
    let (Ok(a), Ok(b)) = (
        serde_json::from_slice::<serde_json::Value>(data),
        serde_json::from_slice::<serde_json::Value>(&out),
    ) else {
        // Too deep for serde_json's trees: nothing to compare.
        return;
    };
    assert_eq!(a, b);
});
