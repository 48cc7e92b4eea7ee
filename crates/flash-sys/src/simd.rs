//! CPU vector instructions that take raw pointers, behind safe functions
//! (x86-64 only). `pulp` makes the other AVX2 intrinsics safe once its
//! [`V3`] token proves the CPU has them; a gather reads memory through a
//! pointer and base offsets, so it stays `unsafe` there and is wrapped here
//! with the bounds made impossible to break.

use std::arch::x86_64::{__m256i, _mm256_i32gather_epi32};

pub use pulp::x86::V3;

/// The eight `u32` of `table` at the eight 32-bit indices of `index`, each
/// taken modulo `N` (a power of two): one AVX2 gather.
///
/// Inline it into code compiled for AVX2 (`V3::vectorize`); elsewhere the
/// gather becomes a call.
#[inline(always)]
pub fn gather_u32<const N: usize>(simd: V3, table: &[u32; N], index: __m256i) -> __m256i {
    const { assert!(N.is_power_of_two() && N <= 1 << 30) };
    let index = simd
        .avx2
        ._mm256_and_si256(index, simd.avx._mm256_set1_epi32(N as i32 - 1));
    // SAFETY: `simd` exists only where the CPU has AVX2 (`V3::try_new`
    // checked it). Every index is masked into 0..N, so with scale 4 each of
    // the eight 4-byte reads lies inside `table`, which is borrowed for the
    // call. The gather only reads.
    unsafe { _mm256_i32gather_epi32::<4>(table.as_ptr().cast::<i32>(), index) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_masked_indices() {
        let Some(simd) = V3::try_new() else {
            eprintln!("no AVX2 on this CPU: nothing to check");
            return;
        };
        let table: [u32; 16] = std::array::from_fn(|i| 100 + i as u32);
        let index: __m256i = pulp::cast([0i32, 1, 15, 16, 17, -1, 7, 1 << 30]);
        let got: [u32; 8] = simd.vectorize(|| pulp::cast(gather_u32(simd, &table, index)));
        assert_eq!(got, [100, 101, 115, 100, 101, 115, 107, 100]);
    }
}
