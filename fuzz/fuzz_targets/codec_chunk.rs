//! Compressed chunks, valid and damaged, into the CPU decoders: neither may
//! panic, a chunk the encoder wrote decodes to its input, and the vector
//! decoder (AVX2, where the CPU has it) and the scalar one give the same
//! bytes and the same error for every damaged chunk.
//!
//! Random bytes almost never pass a chunk's header checks, so the input is
//! read as a recipe instead: a layout, the elements to encode, then edits
//! (a position and a byte to xor there, or a cut) applied to the encoded
//! chunk. The fuzzer's coverage then reaches the decoding steps.
//!
//! cargo +nightly fuzz run codec_chunk
#![no_main]

use flash_codec::explore::{decode_chunk_pb, Kernel};
use flash_codec::{encode_chunk, Codec, Layout, PROB_BITS};
use libfuzzer_sys::fuzz_target;

fn decode(
    layout: Layout,
    codec: Codec,
    stored: &[u8],
    len: usize,
    kernel: Kernel,
) -> (Result<(), flash_codec::CodecError>, Vec<u8>) {
    let mut out = vec![0u8; len];
    let r = decode_chunk_pb::<PROB_BITS>(layout, codec, stored, &mut out, kernel);
    (r, out)
}

fuzz_target!(|data: &[u8]| {
    let [kind, a, b, rest @ ..] = data else {
        return;
    };
    let layout = match kind % 3 {
        0 => Layout::Bf16,
        1 => Layout::F16,
        _ => Layout::F32,
    };
    let eb = layout.elem_bytes();
    let split = (u16::from_le_bytes([*a, *b]) as usize).min(rest.len());
    let (elements, edits) = rest.split_at(split);
    let decoded = &elements[..elements.len() / eb * eb];

    let mut stored = Vec::new();
    let codec = encode_chunk(layout, decoded, &mut stored);
    for kernel in [Kernel::Best, Kernel::Scalar] {
        let (r, out) = decode(layout, codec, &stored, decoded.len(), kernel);
        assert_eq!(r, Ok(()), "{kernel:?} refused an encoded chunk");
        assert_eq!(out, decoded, "{kernel:?} decoded other bytes");
    }

    // Damage: three bytes an edit (position, xor value); a trailing byte
    // cuts the chunk to that share of its length.
    let mut damaged = stored.clone();
    for e in edits.chunks_exact(3) {
        if damaged.is_empty() {
            break;
        }
        let at = u16::from_le_bytes([e[0], e[1]]) as usize % damaged.len();
        damaged[at] ^= e[2];
    }
    if edits.len() % 3 != 0 {
        let keep = damaged.len() * (edits[edits.len() - 1] as usize) / 256;
        damaged.truncate(keep);
    }
    // A chunk may also claim another length of decoded bytes.
    let lens = [decoded.len(), decoded.len() + eb, decoded.len().saturating_sub(eb)];
    for len in lens {
        let best = decode(layout, codec, &damaged, len, Kernel::Best);
        let scalar = decode(layout, codec, &damaged, len, Kernel::Scalar);
        assert_eq!(best.0, scalar.0, "the decoders disagree on whether it is valid");
        if best.0.is_ok() {
            assert_eq!(best.1, scalar.1, "the decoders decoded other bytes");
        }
    }
});
