//! The chunked-body validator on arbitrary bytes: never panics, consumes no more than it is
//! given, gives the same answer whether the bytes come in one read or in two (split at a
//! point taken from the input), and a body it accepts decodes to exactly its data length.
#![no_main]

use dataplane::codec::chunked::{decode_validated, ChunkedDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut whole = ChunkedDecoder::new(1024);
    let one = whole.advance(data);
    if let Ok(n) = one {
        assert!(n <= data.len());
    }
    if !data.is_empty() {
        let cut = data[0] as usize % (data.len() + 1);
        let mut split = ChunkedDecoder::new(1024);
        let two = split.advance(&data[..cut]).and_then(|a| {
            if split.is_done() {
                Ok(a)
            } else {
                split.advance(&data[cut..]).map(|b| a + b)
            }
        });
        match (one, two) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b);
                assert_eq!(whole.is_done(), split.is_done());
            }
            (Err(_), Err(_)) => {}
            (a, b) => panic!("one read {a:?}, two reads {b:?}"),
        }
    }
    if let Ok(n) = one {
        if whole.is_done() {
            let mut out = Vec::new();
            decode_validated(&data[..n], &mut out);
            assert_eq!(out.len() as u64, whole.data_len());
        }
    }
});
