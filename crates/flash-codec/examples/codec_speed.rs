//! CPU speed and compression of flash-codec on synthetic weights.
//!
//!     cargo run -p flash-codec --release --example codec_speed [MiB]
//!
//! Prints, per layout, single-thread encode speed (MB/s of input), decode
//! speed (MB/s of decoded output) and stored/decoded ratio on normal data;
//! then the ratio for probability precisions 10, 11 and 12 on bf16 data of
//! several distributions; then the parallel (rayon) tensor speeds.

use flash_codec::explore::{decode_chunk_pb, encode_chunk_pb, Kernel};
use flash_codec::{decode_tensor, encode_tensor, Codec, Layout, CHUNK_ELEMS};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{normal, to_bytes};

/// Weights of a few kinds, one after the other: projections of several
/// scales, heavy tails (Laplace), norms around 1.
fn mixed(rng: &mut SmallRng, n: usize) -> Vec<f32> {
    let part = n / 6;
    let mut v = Vec::with_capacity(n);
    for std in [0.006, 0.02, 0.05] {
        v.extend(normal(rng, part, std));
    }
    for _ in 0..part {
        let u: f64 = rng.random::<f64>() - 0.5;
        v.push((-0.015 * u.signum() * (1.0 - 2.0 * u.abs()).max(1e-300).ln()) as f32);
    }
    v.extend(normal(rng, part, 1.0));
    let rest = n - v.len();
    v.extend(normal(rng, rest, 0.1).into_iter().map(|x| 1.0 + x));
    v
}

/// This thread's CPU time in seconds (Linux: /proc/thread-self/schedstat,
/// nanoseconds on the CPU), so that speeds per core stay meaningful on a
/// loaded machine; `None` elsewhere.
fn thread_cpu_time() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 * 1e-9)
}

/// The best of `reps` runs: single-thread runs are timed by this thread's
/// CPU time (when known), parallel ones by the wall clock.
fn best_of<T>(reps: usize, parallel: bool, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..reps {
        let c = thread_cpu_time().filter(|_| !parallel);
        let t = Instant::now();
        let r = f();
        let wall = t.elapsed().as_secs_f64();
        let took = match (c, thread_cpu_time()) {
            (Some(a), Some(b)) => b - a,
            _ => wall,
        };
        best = best.min(took);
        out = Some(r);
    }
    (best, out.expect("reps > 0"))
}

/// Serial encode + decode with precision PB: (encode MB/s, decode MB/s,
/// ratio), decoded with `kernel`.
fn serial<const PB: u32>(layout: Layout, data: &[u8], kernel: Kernel) -> (f64, f64, f64) {
    let chunk_bytes = CHUNK_ELEMS * layout.elem_bytes();
    let (te, chunks) = best_of(3, false, || {
        data.chunks(chunk_bytes)
            .map(|c| {
                let mut out = Vec::with_capacity(c.len());
                (encode_chunk_pb::<PB>(layout, c, &mut out), out)
            })
            .collect::<Vec<(Codec, Vec<u8>)>>()
    });
    let stored: usize = chunks.iter().map(|(_, b)| b.len()).sum();
    let mut out = vec![0u8; data.len()];
    let (td, ()) = best_of(3, false, || {
        for ((codec, s), o) in chunks.iter().zip(out.chunks_mut(chunk_bytes)) {
            decode_chunk_pb::<PB>(layout, *codec, s, o, kernel).expect("decodes");
        }
    });
    assert!(out == data, "round trip");
    let mb = data.len() as f64 / 1e6;
    (mb / te, mb / td, stored as f64 / data.len() as f64)
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(64);
    let mut rng = SmallRng::seed_from_u64(1);
    println!("flash-codec CPU, {mib} MiB per case, chunks of {CHUNK_ELEMS} elements");
    println!("single thread (speeds per second of this thread's CPU time), normal(0, 0.02) data, PROB_BITS = {}:", flash_codec::PROB_BITS);
    println!(
        "{:<6} {:>12} {:>12} {:>14} {:>8}",
        "layout", "encode MB/s", "decode MB/s", "(scalar) MB/s", "ratio"
    );
    for layout in [Layout::Bf16, Layout::F16, Layout::F32] {
        let n = mib * (1 << 20) / layout.elem_bytes();
        let data = to_bytes(layout, &normal(&mut rng, n, 0.02));
        let (e, d, r) = serial::<{ flash_codec::PROB_BITS }>(layout, &data, Kernel::Best);
        let (_, ds, _) = serial::<{ flash_codec::PROB_BITS }>(layout, &data, Kernel::Scalar);
        println!(
            "{:<6} {e:>12.0} {d:>12.0} {ds:>14.0} {r:>8.4}",
            format!("{layout:?}")
        );
    }

    println!("\nbf16 stored/decoded by probability precision (single-thread speeds):");
    println!(
        "{:<16} {:>24} {:>24} {:>24}",
        "data", "PB=10", "PB=11", "PB=12"
    );
    let n = mib * (1 << 20) / 2;
    let sets: Vec<(&str, Vec<f32>)> = vec![
        ("normal 0.02", normal(&mut rng, n, 0.02)),
        ("normal 1.0", normal(&mut rng, n, 1.0)),
        ("mixed", mixed(&mut rng, n)),
    ];
    for (name, values) in &sets {
        let data = to_bytes(Layout::Bf16, values);
        let cells = [
            serial::<10>(Layout::Bf16, &data, Kernel::Best),
            serial::<11>(Layout::Bf16, &data, Kernel::Best),
            serial::<12>(Layout::Bf16, &data, Kernel::Best),
        ];
        let fmt: Vec<String> = cells
            .iter()
            .map(|(e, d, r)| format!("{r:.5} ({e:.0}/{d:.0})"))
            .collect();
        println!("{name:<16} {:>24} {:>24} {:>24}", fmt[0], fmt[1], fmt[2]);
    }

    let threads = rayon::current_num_threads();
    println!("\nrayon, {threads} threads, bf16 normal(0, 0.02):");
    let data = to_bytes(Layout::Bf16, &sets[0].1);
    let (te, chunks) = best_of(3, true, || encode_tensor(Layout::Bf16, &data, CHUNK_ELEMS));
    let refs: Vec<(Codec, &[u8])> = chunks.iter().map(|(c, b)| (*c, b.as_slice())).collect();
    let mut out = vec![0u8; data.len()];
    let (td, r) = best_of(3, true, || {
        decode_tensor(Layout::Bf16, &refs, CHUNK_ELEMS, &mut out)
    });
    r.expect("decodes");
    assert!(out == data);
    let mb = data.len() as f64 / 1e6;
    println!("encode {:.0} MB/s, decode {:.0} MB/s", mb / te, mb / td);
}
