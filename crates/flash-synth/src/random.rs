//! Fast deterministic weights.
//!
//! A tensor is cut into blocks of [`BLOCK_ELEMS`] elements. Each block has its
//! own generator, seeded from `(seed, tensor name, block index)`, so blocks
//! can be filled in any order on any number of threads and the bytes stay the
//! same. The generator is wyrand (one 64x64->128 multiply per 64 bits); each
//! 16-bit slice of its output indexes a 65536-entry table of the inverse
//! normal CDF, already encoded in the output dtype. That is a normal
//! distribution quantized to 2^16 equiprobable levels (|z| <= 4.3), which for
//! 16-bit floats is finer than the format itself.

use crate::spec::Init;
use crate::SynthError;
use flash_format::DType;
use half::{bf16, f16};

/// Elements per block: 8 MiB of BF16.
pub const BLOCK_ELEMS: u64 = 1 << 22;

/// The dtypes synth writes.
pub fn check_dtype(dtype: DType) -> Result<(), SynthError> {
    match dtype {
        DType::BF16 | DType::F16 | DType::F32 => Ok(()),
        other => Err(SynthError::UnsupportedDType(other)),
    }
}

const WY_INC: u64 = 0xa076_1d64_78bd_642f;

/// wyrand: a counter (`state += WY_INC`) through a 64x64->128 mix, so the
/// n-th output can be reached directly.
struct WyRand(u64);

impl WyRand {
    /// The generator positioned so that `next` returns output number `n`.
    fn at(seed: u64, n: u64) -> Self {
        WyRand(seed.wrapping_add(n.wrapping_mul(WY_INC)))
    }

    #[inline(always)]
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(WY_INC);
        let t = u128::from(self.0).wrapping_mul(u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db));
        ((t >> 64) ^ t) as u64
    }
}

/// SplitMix64's finalizer: a bijective 64-bit mix.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a of a tensor name: stable across platforms and Rust versions.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn block_seed(seed: u64, name_hash: u64, block: u64) -> u64 {
    let s = mix64(seed ^ 0x5851_f42d_4c95_7f2d);
    let s = mix64(s ^ name_hash);
    mix64(s.wrapping_add(block.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// Inverse of the standard normal CDF (Acklam; relative error < 1.2e-9).
fn inv_norm_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const LOW: f64 = 0.02425;
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - LOW {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// How to produce the bytes of one kind of tensor at one dtype.
pub enum Filler {
    /// 16-bit dtypes: a table of encoded normal quantiles.
    Table16(Box<[u16; 65536]>),
    /// F32: the same quantiles as f32 bits.
    Table32(Box<[u32; 65536]>),
    /// A constant element (ones), little-endian bytes of one element.
    Constant(Vec<u8>),
}

fn quantiles(std: f32) -> impl Iterator<Item = f64> {
    (0..65536u32).map(move |i| inv_norm_cdf((f64::from(i) + 0.5) / 65536.0) * f64::from(std))
}

impl Filler {
    pub fn new(init: Init, dtype: DType) -> Result<Self, SynthError> {
        check_dtype(dtype)?;
        Ok(match (init, dtype) {
            (Init::Ones, DType::BF16) => Filler::Constant(bf16::ONE.to_le_bytes().to_vec()),
            (Init::Ones, DType::F16) => Filler::Constant(f16::ONE.to_le_bytes().to_vec()),
            (Init::Ones, _) => Filler::Constant(1f32.to_le_bytes().to_vec()),
            (Init::Normal { std }, DType::F32) => {
                let v: Vec<u32> = quantiles(std).map(|x| (x as f32).to_bits()).collect();
                Filler::Table32(v.into_boxed_slice().try_into().expect("65536 entries"))
            }
            (Init::Normal { std }, d) => {
                let v: Vec<u16> = if d == DType::F16 {
                    quantiles(std).map(|x| f16::from_f64(x).to_bits()).collect()
                } else {
                    quantiles(std)
                        .map(|x| bf16::from_f64(x).to_bits())
                        .collect()
                };
                Filler::Table16(v.into_boxed_slice().try_into().expect("65536 entries"))
            }
        })
    }

    /// Fills `out` with block `block` of a tensor, from its first element.
    pub fn fill(&self, seed: u64, name_hash: u64, block: u64, out: &mut [u8]) {
        self.fill_range(seed, name_hash, block, 0, out);
    }

    /// Fills `out` with the elements of block `block` that start at element
    /// `first` (`out.len()` is a whole number of elements; `first` plus
    /// their count stays within [`BLOCK_ELEMS`]). Any sub-range gets the
    /// same bytes as the same range of a whole-block fill: the generator
    /// is a counter, so it jumps to any position in O(1).
    pub fn fill_range(&self, seed: u64, name_hash: u64, block: u64, first: u64, out: &mut [u8]) {
        let seed = block_seed(seed, name_hash, block);
        match self {
            Filler::Constant(one) => {
                for c in out.chunks_exact_mut(one.len()) {
                    c.copy_from_slice(one);
                }
            }
            Filler::Table16(t) => fill_lanes::<2, 8>(
                seed,
                first,
                out,
                |i| t[i].to_le_bytes(),
                |r| {
                    let v = u64::from(t[(r & 0xffff) as usize])
                        | u64::from(t[((r >> 16) & 0xffff) as usize]) << 16
                        | u64::from(t[((r >> 32) & 0xffff) as usize]) << 32
                        | u64::from(t[(r >> 48) as usize]) << 48;
                    v.to_le_bytes()
                },
            ),
            Filler::Table32(t) => fill_lanes::<4, 16>(
                seed,
                first,
                out,
                |i| t[i].to_le_bytes(),
                |r| {
                    let lo = u64::from(t[(r & 0xffff) as usize])
                        | u64::from(t[((r >> 16) & 0xffff) as usize]) << 32;
                    let hi = u64::from(t[((r >> 32) & 0xffff) as usize])
                        | u64::from(t[(r >> 48) as usize]) << 32;
                    let mut b = [0u8; 16];
                    b[..8].copy_from_slice(&lo.to_le_bytes());
                    b[8..].copy_from_slice(&hi.to_le_bytes());
                    b
                },
            ),
        }
    }
}

/// Each 64-bit output of the generator makes four elements of `E` bytes
/// (`G = 4 * E` bytes): lane `k` is bits `16k..16k+16`, looked up by `one`;
/// `group` encodes all four at once for the fast path. Element `n` of the
/// block comes from output `n / 4`, lane `n % 4`.
#[inline(always)]
fn fill_lanes<const E: usize, const G: usize>(
    seed: u64,
    first: u64,
    out: &mut [u8],
    one: impl Fn(usize) -> [u8; E],
    group: impl Fn(u64) -> [u8; G],
) {
    let mut rng = WyRand::at(seed, first / 4);
    let lane = (first % 4) as usize;
    let mut out = out;
    if lane != 0 {
        let mut r = rng.next() >> (16 * lane);
        let head = ((4 - lane) * E).min(out.len());
        let (h, rest) = out.split_at_mut(head);
        for c in h.chunks_exact_mut(E) {
            c.copy_from_slice(&one((r & 0xffff) as usize));
            r >>= 16;
        }
        out = rest;
    }
    let mut chunks = out.chunks_exact_mut(G);
    for c in &mut chunks {
        c.copy_from_slice(&group(rng.next()));
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let mut r = rng.next();
        for c in tail.chunks_exact_mut(E) {
            c.copy_from_slice(&one((r & 0xffff) as usize));
            r >>= 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_normal() {
        assert!(inv_norm_cdf(0.5).abs() < 1e-12);
        assert!((inv_norm_cdf(0.975) - 1.959_963_985).abs() < 1e-6);
        assert!((inv_norm_cdf(0.001) + 3.090_232_306).abs() < 1e-6);
        let q: Vec<f64> = quantiles(1.0).collect();
        let mean = q.iter().sum::<f64>() / q.len() as f64;
        let var = q.iter().map(|x| x * x).sum::<f64>() / q.len() as f64;
        assert!(mean.abs() < 1e-9, "{mean}");
        assert!((var - 1.0).abs() < 2e-3, "{var}");
        assert!(q.windows(2).all(|w| w[0] < w[1]));
    }

    fn stats(dtype: DType, bytes: &[u8]) -> (f64, f64) {
        let vals: Vec<f64> = match dtype {
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            _ => bytes
                .chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        };
        let n = vals.len() as f64;
        let mean = vals.iter().sum::<f64>() / n;
        let std = (vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n).sqrt();
        (mean, std)
    }

    #[test]
    fn blocks_have_the_requested_distribution() {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let f = Filler::new(Init::Normal { std: 0.02 }, dtype).unwrap();
            // An odd length exercises the remainder path.
            let mut buf = vec![0u8; (100_003 * dtype.bits() / 8) as usize];
            f.fill(7, name_hash("w"), 0, &mut buf);
            let (mean, std) = stats(dtype, &buf);
            assert!(mean.abs() < 3e-4, "{dtype}: mean {mean}");
            assert!((std - 0.02).abs() < 4e-4, "{dtype}: std {std}");
            let ones = Filler::new(Init::Ones, dtype).unwrap();
            ones.fill(7, 0, 0, &mut buf);
            assert_eq!(stats(dtype, &buf), (1.0, 0.0));
        }
        assert!(matches!(
            Filler::new(Init::Ones, DType::I8),
            Err(SynthError::UnsupportedDType(DType::I8))
        ));
    }

    #[test]
    fn any_sub_range_matches_the_whole_block() {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let f = Filler::new(Init::Normal { std: 0.02 }, dtype).unwrap();
            let e = (dtype.bits() / 8) as usize;
            let mut whole = vec![0u8; 101 * e];
            f.fill(9, 5, 3, &mut whole);
            for first in 0..12usize {
                for n in [0usize, 1, 2, 3, 4, 5, 7, 8, 9, 60, 101 - first] {
                    if first + n > 101 {
                        continue;
                    }
                    let mut part = vec![0u8; n * e];
                    f.fill_range(9, 5, 3, first as u64, &mut part);
                    assert_eq!(
                        part,
                        whole[first * e..(first + n) * e],
                        "{dtype} {first} {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn blocks_depend_on_seed_name_and_index() {
        let f = Filler::new(Init::Normal { std: 0.02 }, DType::BF16).unwrap();
        let run = |seed, name: &str, block| {
            let mut b = vec![0u8; 4096];
            f.fill(seed, name_hash(name), block, &mut b);
            b
        };
        assert_eq!(run(1, "a", 0), run(1, "a", 0));
        assert_ne!(run(1, "a", 0), run(2, "a", 0));
        assert_ne!(run(1, "a", 0), run(1, "b", 0));
        assert_ne!(run(1, "a", 0), run(1, "a", 1));
    }
}
