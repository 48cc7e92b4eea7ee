//! The vector decoder (AVX2 where the CPU has it) and the scalar one give
//! the same bytes and the same errors for every input: valid chunks of
//! every layout, length and precision, and corrupted ones.

mod common;

use common::*;
use flash_codec::explore::{decode_chunk_pb, encode_chunk_rans_pb, Kernel};
use flash_codec::{cpu_decoder, Codec, CodecError, Layout};
use rand::Rng;

fn both<const PB: u32>(
    layout: Layout,
    stored: &[u8],
    len: usize,
) -> (Result<Vec<u8>, CodecError>, Result<Vec<u8>, CodecError>) {
    let run = |kernel| {
        let mut out = vec![0u8; len];
        decode_chunk_pb::<PB>(layout, Codec::Rans, stored, &mut out, kernel).map(|()| out)
    };
    (run(Kernel::Best), run(Kernel::Scalar))
}

fn encoded<const PB: u32>(layout: Layout, decoded: &[u8]) -> Vec<u8> {
    let mut stored = Vec::new();
    assert_eq!(
        encode_chunk_rans_pb::<PB>(layout, decoded, &mut stored),
        Codec::Rans
    );
    stored
}

#[test]
fn this_machine_names_its_decoder() {
    // CI runs on x86-64 with AVX2: there the vector decoder must be the one
    // the tests below compare with the scalar one.
    println!("CPU decoder: {}", cpu_decoder());
    if cfg!(target_arch = "x86_64") && std::is_x86_feature_detected!("avx2") {
        assert_eq!(cpu_decoder(), "avx2");
    } else {
        assert_eq!(cpu_decoder(), "scalar");
    }
}

#[test]
fn valid_chunks_decode_identically() {
    let mut r = rng(3);
    for layout in LAYOUTS {
        let eb = layout.elem_bytes();
        // Whole steps, partial last steps, one element, a full flash chunk.
        for elems in [1usize, 31, 32, 33, 64, 95, 1000, 4096, 4099, 65536] {
            for (what, decoded) in [
                ("normal 0.02", normal_bytes(layout, elems, 0.02, r.random())),
                ("normal 3.0", normal_bytes(layout, elems, 3.0, r.random())),
                ("random bytes", random_bytes(elems * eb, r.random())),
                ("constant", to_bytes(layout, &vec![0.25; elems])),
            ] {
                let cases = [
                    (10, encoded::<10>(layout, &decoded)),
                    (11, encoded::<11>(layout, &decoded)),
                    (12, encoded::<12>(layout, &decoded)),
                ];
                for (pb, stored) in cases {
                    let (best, scalar) = match pb {
                        10 => both::<10>(layout, &stored, decoded.len()),
                        11 => both::<11>(layout, &stored, decoded.len()),
                        _ => both::<12>(layout, &stored, decoded.len()),
                    };
                    let ctx = format!("{layout:?} {elems} elements, {what}, PB {pb}");
                    assert_eq!(scalar.as_deref(), Ok(&decoded[..]), "scalar: {ctx}");
                    assert_eq!(
                        best.as_deref(),
                        Ok(&decoded[..]),
                        "{}: {ctx}",
                        cpu_decoder()
                    );
                }
            }
        }
    }
}

#[test]
fn corrupted_chunks_fail_identically() {
    let mut r = rng(17);
    let samples: Vec<(Layout, Vec<u8>, Vec<u8>)> = LAYOUTS
        .into_iter()
        .flat_map(|layout| {
            [40usize, 32 * 40, 3000].map(|elems| {
                let decoded = normal_bytes(layout, elems, 0.05, elems as u64);
                let stored = encoded::<11>(layout, &decoded);
                (layout, decoded, stored)
            })
        })
        .collect();
    let (mut failed, mut cases) = (0, 0);
    for _ in 0..6000 {
        let (layout, decoded, stored) = &samples[r.random_range(0..samples.len())];
        let mut bad = stored.clone();
        for _ in 0..r.random_range(1..=3) {
            // Mostly the states and the stream, where the decoders run.
            let at = if r.random_bool(0.8) {
                r.random_range(8..bad.len().min(8 + 128 + 2 * decoded.len() / 3))
            } else {
                r.random_range(0..bad.len())
            };
            bad[at] ^= 1 << r.random_range(0..8);
        }
        if r.random_bool(0.1) {
            bad.truncate(r.random_range(0..bad.len()));
        }
        let (best, scalar) = both::<11>(*layout, &bad, decoded.len());
        match (&best, &scalar) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{layout:?}: same stream, other bytes"),
            (a, b) => assert_eq!(a.as_ref().err(), b.as_ref().err(), "{layout:?}"),
        }
        cases += 1;
        failed += scalar.is_err() as usize;
    }
    println!("{failed} of {cases} corrupted chunks refused by both decoders alike");
    assert!(
        failed * 2 > cases,
        "the corruptions mostly hit checked bytes"
    );
}
