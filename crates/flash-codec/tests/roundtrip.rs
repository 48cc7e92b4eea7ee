//! Bit-exact round trips, codec choice, determinism and compression ratio.

mod common;

use common::*;
use flash_codec::explore::{decode_chunk_pb, encode_chunk_rans_pb, Kernel};
use flash_codec::{
    decode_chunk, decode_tensor, encode_chunk, encode_tensor, ChunkInfo, Codec, Layout,
    CHUNK_ELEMS, PROB_BITS,
};
use proptest::prelude::*;

/// Encodes and decodes a tensor; checks it against the input and every Rans
/// chunk against the reference decoder. Returns the chunks.
fn round_trip(layout: Layout, data: &[u8], chunk_elems: usize) -> Vec<(Codec, Vec<u8>)> {
    let chunks = encode_tensor(layout, data, chunk_elems);
    let eb = layout.elem_bytes();
    assert_eq!(chunks.len(), (data.len() / eb).div_ceil(chunk_elems));
    let refs: Vec<(Codec, &[u8])> = chunks.iter().map(|(c, b)| (*c, b.as_slice())).collect();
    let mut out = vec![0xa5u8; data.len()];
    decode_tensor(layout, &refs, chunk_elems, &mut out).expect("decodes");
    assert!(out == data, "{layout:?}: decoded bytes differ");
    for ((codec, stored), part) in chunks.iter().zip(data.chunks(chunk_elems * eb)) {
        if *codec == Codec::Rans {
            assert!(stored.len() * 100 <= part.len() * 98);
            let r = reference_decode(layout, stored, part.len() / eb, PROB_BITS);
            assert!(r.as_deref() == Some(part), "reference decoder disagrees");
        } else {
            assert_eq!(stored.as_slice(), part);
        }
    }
    chunks
}

/// Encodes one chunk as Rans whatever it costs, then decodes it with both
/// decoders.
fn forced_round_trip(layout: Layout, data: &[u8]) -> Vec<u8> {
    let mut stored = Vec::new();
    let codec = encode_chunk_rans_pb::<PROB_BITS>(layout, data, &mut stored);
    let elems = data.len() / layout.elem_bytes();
    if elems == 0 {
        assert_eq!(codec, Codec::Raw);
        return stored;
    }
    assert_eq!(codec, Codec::Rans);
    let info = ChunkInfo::parse(layout, elems, &stored).expect("valid chunk");
    assert_eq!(info.stored_len, stored.len());
    let mut out = vec![0x5au8; data.len()];
    decode_chunk(layout, Codec::Rans, &stored, &mut out).expect("decodes");
    assert!(
        out == data,
        "{layout:?}, {elems} elements: decoded bytes differ"
    );
    assert_eq!(
        reference_decode(layout, &stored, elems, PROB_BITS).as_deref(),
        Some(data)
    );
    stored
}

#[test]
fn normal_data_of_several_scales() {
    for (i, layout) in LAYOUTS.into_iter().enumerate() {
        for (j, std) in [1e-4, 0.02, 1.0, 300.0].into_iter().enumerate() {
            // Three full chunks and a partial one.
            let n = 3 * CHUNK_ELEMS + 1234;
            let data = normal_bytes(layout, n, std, (i * 10 + j) as u64);
            let chunks = round_trip(layout, &data, CHUNK_ELEMS);
            assert!(
                chunks.iter().all(|(c, _)| *c == Codec::Rans),
                "{layout:?} std {std}"
            );
        }
    }
}

#[test]
fn other_chunk_sizes() {
    let data = normal_bytes(Layout::Bf16, 100_003, 0.02, 7);
    for chunk_elems in [1000, 4096, 32 * 100, 99_999, 1 << 20] {
        round_trip(Layout::Bf16, &data, chunk_elems);
    }
}

#[test]
fn all_equal_values() {
    for layout in LAYOUTS {
        for v in [0.0f32, 1.0, -3.5e-3] {
            let data = to_bytes(layout, &vec![v; CHUNK_ELEMS + 77]);
            let chunks = round_trip(layout, &data, CHUNK_ELEMS);
            assert_eq!(chunks[0].0, Codec::Rans);
            let info = ChunkInfo::parse(layout, CHUNK_ELEMS, &chunks[0].1).unwrap();
            assert_eq!(
                (info.symbols, info.words),
                (1, 0),
                "one symbol costs no words"
            );
        }
    }
}

#[test]
fn all_256_symbols() {
    // Skewed but every exponent present: a Rans chunk with a 256-entry table.
    let mut r = rng(3);
    let n = CHUNK_ELEMS;
    let mut data = Vec::new();
    for i in 0..n {
        let m: u16 = rand::Rng::random(&mut r);
        let e: u16 = if i < 256 * 8 {
            (i % 256) as u16
        } else {
            120 + (i % 5) as u16
        };
        data.extend_from_slice(&((m & 0x807f) | (e << 7)).to_le_bytes());
    }
    let chunks = round_trip(Layout::Bf16, &data, CHUNK_ELEMS);
    assert_eq!(chunks[0].0, Codec::Rans);
    assert_eq!(
        ChunkInfo::parse(Layout::Bf16, n, &chunks[0].1)
            .unwrap()
            .symbols,
        256
    );
    // Uniform exponents (incompressible symbols) still decode when forced.
    for layout in LAYOUTS {
        let data = random_bytes(4096 * layout.elem_bytes(), 11);
        forced_round_trip(layout, &data);
    }
}

#[test]
fn special_values() {
    let bf16: [u16; 12] = [
        0x0000, 0x8000, 0x7f80, 0xff80, 0x7fc0, 0x7f81, 0xffff, 0x0001, 0x8001, 0x007f, 0x7f7f,
        0xff7f,
    ];
    let f32s: [u32; 10] = [
        0,
        0x8000_0000,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0x7f80_0001,
        0xffff_ffff,
        1,
        0x8000_0001,
        0x7f7f_ffff,
    ];
    for layout in LAYOUTS {
        let mut normal = normal(&mut rng(5), 20_000, 0.02).into_iter();
        let mut data = Vec::new();
        for i in 0..20_000 {
            if i % 7 == 0 {
                match layout {
                    Layout::F32 => data.extend_from_slice(&f32s[i % f32s.len()].to_le_bytes()),
                    _ => data.extend_from_slice(&bf16[i % bf16.len()].to_le_bytes()),
                }
            } else {
                data.extend_from_slice(&to_bytes(layout, &[normal.next().unwrap()]));
            }
        }
        round_trip(layout, &data, 4096);
        forced_round_trip(layout, &data);
    }
}

#[test]
fn tiny_and_lane_multiple_chunks() {
    for layout in LAYOUTS {
        for n in (0..=33).chain([63, 64, 65, 32 * 7, 32 * 100, 32 * 100 + 31]) {
            let data = normal_bytes(layout, n, 0.02, n as u64);
            forced_round_trip(layout, &data);
            // Through the public encoder: tiny chunks are stored raw.
            let mut stored = Vec::new();
            let codec = encode_chunk(layout, &data, &mut stored);
            if n < 200 {
                assert_eq!(codec, Codec::Raw, "{n} elements");
            }
            let mut out = vec![0u8; data.len()];
            decode_chunk(layout, codec, &stored, &mut out).unwrap();
            assert_eq!(out, data);
        }
        let data = normal_bytes(layout, CHUNK_ELEMS, 1.0, 9);
        forced_round_trip(layout, &data);
    }
}

#[test]
fn incompressible_data_is_raw() {
    for layout in LAYOUTS {
        let data = random_bytes(
            2 * CHUNK_ELEMS * layout.elem_bytes() + 6 * layout.elem_bytes(),
            1,
        );
        let chunks = round_trip(layout, &data, CHUNK_ELEMS);
        assert!(chunks.iter().all(|(c, _)| *c == Codec::Raw), "{layout:?}");
    }
}

#[test]
fn encoding_is_deterministic() {
    for layout in LAYOUTS {
        let data = normal_bytes(layout, 2 * CHUNK_ELEMS + 5, 0.05, 2);
        assert_eq!(
            encode_tensor(layout, &data, CHUNK_ELEMS),
            encode_tensor(layout, &data, CHUNK_ELEMS)
        );
        // Serial chunk by chunk is the same as the parallel tensor encoder.
        let serial: Vec<(Codec, Vec<u8>)> = data
            .chunks(CHUNK_ELEMS * layout.elem_bytes())
            .map(|c| {
                let mut out = Vec::new();
                (encode_chunk(layout, c, &mut out), out)
            })
            .collect();
        assert_eq!(serial, encode_tensor(layout, &data, CHUNK_ELEMS));
    }
}

#[test]
fn encode_chunk_appends() {
    let data = normal_bytes(Layout::Bf16, 5000, 0.02, 4);
    let mut out = vec![1, 2, 3];
    let codec = encode_chunk(Layout::Bf16, &data, &mut out);
    assert_eq!(codec, Codec::Rans);
    assert_eq!(&out[..3], &[1, 2, 3]);
    let mut dec = vec![0u8; data.len()];
    decode_chunk(Layout::Bf16, codec, &out[3..], &mut dec).unwrap();
    assert_eq!(dec, data);
}

#[test]
fn bf16_compression_ratio() {
    let data = normal_bytes(Layout::Bf16, 2 << 20, 0.02, 42); // 4 MiB
    let chunks = encode_tensor(Layout::Bf16, &data, CHUNK_ELEMS);
    let stored: usize = chunks.iter().map(|(_, b)| b.len()).sum();
    let ratio = stored as f64 / data.len() as f64;
    println!("bf16 normal(0, 0.02): stored / decoded = {ratio:.4}");
    assert!(ratio <= 0.69, "ratio {ratio}");
}

#[test]
fn other_precisions_round_trip() {
    // The exploration entry points (PB 10 and 12) are full codecs too.
    let data = normal_bytes(Layout::Bf16, 10_000, 0.02, 8);
    let mut s10 = Vec::new();
    let c = flash_codec::explore::encode_chunk_pb::<10>(Layout::Bf16, &data, &mut s10);
    let mut out = vec![0u8; data.len()];
    decode_chunk_pb::<10>(Layout::Bf16, c, &s10, &mut out, Kernel::Best).unwrap();
    assert_eq!(out, data);
    assert_eq!(
        reference_decode(Layout::Bf16, &s10, 10_000, 10).as_deref(),
        Some(&data[..])
    );
    let mut s12 = Vec::new();
    let c = flash_codec::explore::encode_chunk_pb::<12>(Layout::Bf16, &data, &mut s12);
    decode_chunk_pb::<12>(Layout::Bf16, c, &s12, &mut out, Kernel::Best).unwrap();
    assert_eq!(out, data);
    // A PB-10 stream is not a PB-11 one.
    assert!(decode_chunk(Layout::Bf16, Codec::Rans, &s10, &mut out).is_err());
}

fn arb_values() -> impl Strategy<Value = Vec<u32>> {
    prop_oneof![
        // Any bits.
        prop::collection::vec(any::<u32>(), 0..600),
        // Few distinct exponents, random sign and mantissa.
        prop::collection::vec((0u32..4, any::<u32>()), 0..600).prop_map(|v| v
            .into_iter()
            .map(|(e, m)| ((120 + e) << 23) | (m & 0x807f_ffff))
            .collect()),
        // A handful of repeated values.
        prop::collection::vec(
            prop::sample::select(vec![0u32, 0x3f80_0000, 0xbf80_0000, 0x7fc0_0000, 1]),
            0..600
        ),
    ]
}

fn bytes_of(layout: Layout, v: &[u32]) -> Vec<u8> {
    let mut out = Vec::new();
    for &x in v {
        match layout {
            Layout::F32 => out.extend_from_slice(&x.to_le_bytes()),
            _ => out.extend_from_slice(&((x >> 16) as u16).to_le_bytes()),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_inputs_round_trip(v in arb_values(), l in 0usize..3, chunk in 1usize..300) {
        let layout = LAYOUTS[l];
        let data = bytes_of(layout, &v);
        forced_round_trip(layout, &data);
        round_trip(layout, &data, chunk);
    }
}
