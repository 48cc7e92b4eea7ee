//! Bytes into the `model.flash.json` parser: it must never panic, and what
//! it accepts must validate again after a serialization round trip.
//!
//! cargo +nightly fuzz run manifest
#![no_main]

use flash_format::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        let again = Manifest::parse(m.to_json().as_bytes()).expect("a valid manifest re-parses");
        assert_eq!(again, m);
    }
});
