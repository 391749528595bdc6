//! Fuzzes `decode_records`. The first 4 bytes (little-endian) are the record count, the rest
//! the records.
//!
//! Invariant: exactly `count` records come back, each with `backlink < lsn`, their encoded
//! lengths add up to the input's length and they re-encode to exactly the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::LogRecord;
use wire::record::{decode_records, encode_records};

fuzz_target!(|data: &[u8]| {
    let Some((count, bytes)) = data.split_first_chunk::<4>() else {
        return;
    };
    let count = u32::from_le_bytes(*count);
    let Ok(records) = decode_records(bytes, count) else {
        return;
    };
    assert_eq!(records.len(), count as usize, "wrong number of records");
    assert!(
        records.iter().all(|r| r.backlink < r.lsn),
        "a backlink does not precede its LSN"
    );
    assert_eq!(
        records.iter().map(LogRecord::encoded_len).sum::<usize>(),
        bytes.len(),
        "decoded lengths do not add up"
    );
    let mut again = Vec::new();
    encode_records(&records, &mut again);
    assert_eq!(again, bytes, "re-encoding gives other bytes");
});
