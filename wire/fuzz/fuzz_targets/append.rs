//! Fuzzes `Append::decode`, which also decodes a storage node's journal entries.
//!
//! Invariant: a decoded Append re-encodes to exactly its input (no field is decoded lossily),
//! its decoded lengths add up to the input's length, and its LSNs strictly increase.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::Append;

fuzz_target!(|data: &[u8]| {
    let Ok(append) = Append::decode(data) else {
        return;
    };
    assert_eq!(
        append.encoded_len(),
        data.len(),
        "decoded lengths do not add up"
    );
    assert!(
        append.records.windows(2).all(|w| w[0].lsn < w[1].lsn),
        "LSNs do not increase"
    );
    let mut again = Vec::new();
    append.encode(&mut again);
    assert_eq!(again, data, "re-encoding gives other bytes");
});
