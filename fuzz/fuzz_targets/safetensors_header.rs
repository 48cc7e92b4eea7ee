//! Whole safetensors files (length prefix, header, data) into the strict
//! parser: it must never panic, and what it accepts must be safe to plan
//! reads from.
//!
//! cargo +nightly fuzz run safetensors_header
#![no_main]

use flash_format::safetensors::parse_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = parse_bytes(data) else {
        return;
    };
    let data_len = data.len() as u64 - header.data_start();
    let mut cursor = 0;
    for t in &header.tensors {
        assert!(
            t.begin <= t.end && t.end <= data_len,
            "{t:?} outside {data_len} bytes"
        );
        assert_eq!(t.dtype.byte_len(&t.shape), Some(t.end - t.begin), "{t:?}");
        if t.begin != t.end {
            assert!(t.begin >= cursor, "{t:?} overlaps the previous tensor");
            cursor = t.end;
        }
    }
    assert_eq!(header.data_len(), data_len);
});
