//! A model's `config.json` into the dense decoder's shape: parsing must
//! never panic, and a shape it accepts has row widths that fit the GPU
//! kernels' 32-bit sizes, so what the engine and the synthesizer derive
//! from it (query and key/value widths, head groups) cannot overflow.
//!
//! cargo +nightly fuzz run decoder_shape
#![no_main]

use flash_format::shape::DecoderShape;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(shape) = DecoderShape::from_config_json(&v) else {
        return;
    };
    // Debug assertions are on in fuzz builds: an overflow here panics.
    let widths = [shape.q_dim(), shape.kv_dim(), shape.hidden_size, shape.intermediate_size];
    for w in widths {
        assert!(w <= i32::MAX as usize, "{shape:?}: a width of {w}");
    }
    assert_eq!(shape.group_size() * shape.num_key_value_heads, shape.num_attention_heads);
    assert_eq!(shape.validate(), Ok(()));
});
