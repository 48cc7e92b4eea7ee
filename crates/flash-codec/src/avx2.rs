//! The CPU decoder's full steps in AVX2 (x86-64 with AVX2, checked at run
//! time; other CPUs use the scalar steps of `chunk.rs`).
//!
//! A full step decodes 32 lanes as four vectors of eight. Per vector: the
//! slots' table entries are gathered (`flash_sys::simd::gather_u32`: the
//! one intrinsic that reads through a pointer, so its `unsafe` lives in
//! flash-sys; eight scalar loads instead made the decoder 1.6x slower on
//! this project's CI machine), the eight states advance
//! with one 32-bit multiply, the lanes whose state fell below `L` form an
//! 8-bit mask, and the next `popcount(mask)` words of the stream go to those
//! lanes in lane order through a permutation looked up by the mask. The
//! words a step takes, their order, and every check (overrun, final states,
//! words left) are exactly those of the scalar decoder: the two produce the
//! same bytes and the same errors for every input, which the tests check.
//!
//! The other intrinsics come from `pulp`, whose `V3` token proves AVX2
//! present and makes them safe to call; `V3::vectorize` compiles the step
//! loop with the features enabled.

use crate::error::CodecError;
use crate::LANES;
use flash_sys::simd::{gather_u32, V3};

use std::arch::x86_64::{__m128i as I128, __m256i as I256};

/// Slots of the largest supported precision (PB = 12).
const SLOTS: usize = 1 << 12;

/// The decoding table of one chunk for the vector steps: per slot
/// `(slot - cum) | sym << 12 | (freq - 1) << 20` (12 + 8 + 12 bits).
pub(crate) struct PackedLut(pub(crate) [u32; SLOTS]);

impl PackedLut {
    pub(crate) fn entry(freq: u32, bias: u32, sym: u8) -> u32 {
        bias | (sym as u32) << 12 | (freq - 1) << 20
    }
}

/// For each 8-bit mask of lanes that need a word, the permutation that puts
/// word `popcount(mask & ((1 << j) - 1))` of eight consecutive words into
/// lane `j` (lanes outside the mask get word 0 and ignore it).
static REFILL: [[u32; 8]; 256] = refill_table();

const fn refill_table() -> [[u32; 8]; 256] {
    let mut t = [[0u32; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let mut j = 0;
        let mut k = 0;
        while j < 8 {
            if m & (1 << j) != 0 {
                t[m][j] = k;
                k += 1;
            }
            j += 1;
        }
        m += 1;
    }
    t
}

/// The AVX2 token when this CPU has AVX2 (and the rest of x86-64-v3) and
/// `FLASH_CPU_DECODER` is not `scalar` (checked once per process: it lets
/// one binary compare both decoders, or avoid a suspected vector bug).
pub(crate) fn detect() -> Option<V3> {
    static SCALAR: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let scalar = *SCALAR
        .get_or_init(|| std::env::var_os("FLASH_CPU_DECODER").is_some_and(|v| v == "scalar"));
    if scalar {
        None
    } else {
        V3::try_new()
    }
}

/// The decoded values of eight lanes from their symbols and raw bytes, and
/// how a step's 32 values are stored: the vector twin of the `join_*`
/// functions of `layout.rs`, per layout.
pub(crate) trait Join: Copy {
    /// Raw bytes per element.
    const RB: usize;
    /// Decoded bytes per element (2 or 4).
    const EB: usize;
    /// Eight elements as u32 lanes, from eight symbols (u32 lanes) and
    /// `8 * RB` raw bytes.
    fn join8(simd: V3, sym: I256, raw: &[u8]) -> I256;
    /// Stores a step's 32 joined elements into `out` (`32 * EB` bytes):
    /// narrowed to 16 bits for 2-byte elements, as they are for 4-byte ones.
    #[inline(always)]
    fn store(simd: V3, vals: &[I256; 4], out: &mut [u8]) {
        if Self::EB == 2 {
            store_u16(simd, vals, out)
        } else {
            for (o, v) in out.chunks_exact_mut(32).zip(vals) {
                o.copy_from_slice(&pulp::cast::<I256, [u8; 32]>(*v));
            }
        }
    }
}

/// bf16: `sign << 15 | sym << 7 | mantissa`, sign and mantissa in the raw
/// byte (`join_bf16`).
#[derive(Clone, Copy)]
pub(crate) struct Bf16;
/// f16: `sym << 8 | raw` (`join_f16`).
#[derive(Clone, Copy)]
pub(crate) struct F16;
/// f32: `sign << 31 | sym << 23 | mantissa`, sign and mantissa in the 24-bit
/// raw value (`join_f32`).
#[derive(Clone, Copy)]
pub(crate) struct F32;

#[inline(always)]
fn bytes8(simd: V3, raw: &[u8]) -> I256 {
    let r8: [u8; 8] = raw[..8].try_into().expect("8 bytes");
    let r16: [u8; 16] = std::array::from_fn(|i| if i < 8 { r8[i] } else { 0 });
    simd.avx2
        ._mm256_cvtepu8_epi32(pulp::cast::<[u8; 16], I128>(r16))
}

/// Two vectors of eight u32 below 2^16 as 16 u16, in lane order.
#[inline(always)]
fn store_u16(simd: V3, vals: &[I256; 4], out: &mut [u8]) {
    for h in 0..2 {
        let packed = simd.avx2._mm256_permute4x64_epi64::<0b11_01_10_00>(
            simd.avx2._mm256_packus_epi32(vals[2 * h], vals[2 * h + 1]),
        );
        let bytes: [u8; 32] = pulp::cast(packed);
        out[32 * h..32 * h + 32].copy_from_slice(&bytes);
    }
}

/// `(r & 1 << E) << 8 | sym << E | (r & (1 << E) - 1)`: the sign moved from
/// bit `E` of the raw value to bit `E + 8`, the 8-bit symbol (exponent)
/// placed between it and the mantissa (bf16: E = 7, f32: E = 23).
#[inline(always)]
fn sign_exp_mantissa<const E: i32>(simd: V3, sym: I256, r: I256) -> I256 {
    let (avx, avx2) = (simd.avx, simd.avx2);
    let sign = avx2._mm256_and_si256(r, avx._mm256_set1_epi32(1 << E));
    let mantissa = avx2._mm256_and_si256(r, avx._mm256_set1_epi32((1 << E) - 1));
    avx2._mm256_or_si256(
        avx2._mm256_or_si256(
            avx2._mm256_slli_epi32::<8>(sign),
            avx2._mm256_slli_epi32::<E>(sym),
        ),
        mantissa,
    )
}

impl Join for Bf16 {
    const RB: usize = 1;
    const EB: usize = 2;
    #[inline(always)]
    fn join8(simd: V3, sym: I256, raw: &[u8]) -> I256 {
        sign_exp_mantissa::<7>(simd, sym, bytes8(simd, raw))
    }
}

impl Join for F16 {
    const RB: usize = 1;
    const EB: usize = 2;
    #[inline(always)]
    fn join8(simd: V3, sym: I256, raw: &[u8]) -> I256 {
        let avx2 = simd.avx2;
        avx2._mm256_or_si256(avx2._mm256_slli_epi32::<8>(sym), bytes8(simd, raw))
    }
}

impl Join for F32 {
    const RB: usize = 3;
    const EB: usize = 4;
    #[inline(always)]
    fn join8(simd: V3, sym: I256, raw: &[u8]) -> I256 {
        let avx2 = simd.avx2;
        let r24: [u8; 24] = raw[..24].try_into().expect("24 bytes");
        let r32: [u8; 32] = std::array::from_fn(|i| if i < 24 { r24[i] } else { 0 });
        // Dwords 0-3 to the low half and 3-6 to the high half: each half then
        // starts with the first byte of its four elements (0 and 12).
        let halves = avx2._mm256_permutevar8x32_epi32(
            pulp::cast::<[u8; 32], I256>(r32),
            pulp::cast([0u32, 1, 2, 3, 3, 4, 5, 6]),
        );
        const Z: i8 = -1; // pshufb: a negative index writes 0
        let spread: [i8; 16] = [0, 1, 2, Z, 3, 4, 5, Z, 6, 7, 8, Z, 9, 10, 11, Z];
        let shuffle: [i8; 32] = std::array::from_fn(|i| spread[i % 16]);
        let r = avx2._mm256_shuffle_epi8(halves, pulp::cast(shuffle));
        sign_exp_mantissa::<23>(simd, sym, r)
    }
}

/// Decodes the full steps of a chunk (`out.len() / (32 * J::EB)` of them)
/// with the lane states `x`; returns the words consumed, or the scalar
/// decoder's error for the same input.
pub(crate) fn full_steps<const PB: u32, J: Join>(
    simd: V3,
    lut: &PackedLut,
    x: &mut [u32; LANES],
    stream: &[u8],
    raw: &[u8],
    out: &mut [u8],
) -> Result<usize, CodecError> {
    // `steps` is inlined into the closure, which `vectorize` compiles with
    // AVX2 enabled.
    simd.vectorize(|| steps::<PB, J>(simd, lut, x, stream, raw, out))
}

#[inline(always)]
fn steps<const PB: u32, J: Join>(
    simd: V3,
    lut: &PackedLut,
    x: &mut [u32; LANES],
    stream: &[u8],
    raw: &[u8],
    out: &mut [u8],
) -> Result<usize, CodecError> {
    let avx = simd.avx;
    let avx2 = simd.avx2;
    let words = stream.len() / 2;
    let slot_mask = avx._mm256_set1_epi32((1 << PB) - 1);
    let pb = avx._mm256_set1_epi32(PB as i32);
    let low12 = avx._mm256_set1_epi32(0xfff);
    let low8 = avx._mm256_set1_epi32(0xff);
    let zero = avx._mm256_setzero_si256();
    let xs: [[u32; 8]; 4] = pulp::cast(*x);
    let mut xv: [I256; 4] = xs.map(pulp::cast);
    let mut pos = 0usize;
    let mut spare = [0u8; 2 * LANES];
    for (t, (o, r)) in out
        .chunks_exact_mut(LANES * J::EB)
        .zip(raw.chunks_exact(LANES * J::RB))
        .enumerate()
    {
        let win = super::chunk::window(stream, pos, &mut spare);
        let mut k = 0usize;
        let mut vals = [zero; 4];
        for g in 0..4 {
            let xg = xv[g];
            let e = gather_u32(simd, &lut.0, avx2._mm256_and_si256(xg, slot_mask));
            // x' = freq * (x >> PB) + (slot - cum), freq = (e >> 20) + 1.
            let q = avx2._mm256_srlv_epi32(xg, pb);
            let f1 = avx2._mm256_srli_epi32::<20>(e);
            let nx = avx2._mm256_add_epi32(
                avx2._mm256_add_epi32(avx2._mm256_mullo_epi32(f1, q), q),
                avx2._mm256_and_si256(e, low12),
            );
            // Lanes below L (x' >> 16 == 0) take the next words in lane order.
            let need = avx2._mm256_cmpeq_epi32(avx2._mm256_srli_epi32::<16>(nx), zero);
            let mask = avx._mm256_movemask_ps(pulp::cast(need)) as usize & 0xff;
            // Earlier groups took at most 24 words: `at + 16 <= 64`.
            let at = 2 * k.min(3 * 8);
            let w8: [u8; 16] = win[at..at + 16].try_into().expect("16 bytes");
            let w = avx2._mm256_cvtepu16_epi32(pulp::cast::<[u8; 16], I128>(w8));
            let w = avx2._mm256_permutevar8x32_epi32(w, pulp::cast(REFILL[mask]));
            let refilled = avx2._mm256_or_si256(avx2._mm256_slli_epi32::<16>(nx), w);
            xv[g] = avx2._mm256_blendv_epi8(nx, refilled, need);
            k += mask.count_ones() as usize;
            let sym = avx2._mm256_and_si256(avx2._mm256_srli_epi32::<12>(e), low8);
            vals[g] = J::join8(simd, sym, &r[8 * J::RB * g..]);
        }
        pos += k;
        if pos > words {
            return Err(CodecError::StreamOverrun { step: t, words });
        }
        J::store(simd, &vals, o);
    }
    let xs: [[u32; 8]; 4] = xv.map(pulp::cast);
    *x = pulp::cast(xs);
    Ok(pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refill_permutation_counts_lower_lanes() {
        assert_eq!(REFILL[0b1010_0110], [0, 0, 1, 0, 0, 2, 0, 3]);
        assert_eq!(REFILL[0xff], [0, 1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn packed_entry_fields() {
        let e = PackedLut::entry(2048, 2047, 0xab);
        assert_eq!(e & 0xfff, 2047);
        assert_eq!((e >> 12) & 0xff, 0xab);
        assert_eq!((e >> 20) + 1, 2048);
    }
}
