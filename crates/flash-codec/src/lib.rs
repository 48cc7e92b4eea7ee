//! Lossless compression of floating-point tensor bytes (`bf16`, `f16`,
//! `f32`) for the flash format (docs/FORMAT.md, "Compressed tensors").
//!
//! The exponent of a trained model's weight carries about 2.6 bits of
//! information in its 8 bits; the sign and mantissa are close to random.
//! Each element is therefore split into a *symbol* (the exponent byte; for
//! `f16` the high byte) that is entropy-coded with 32 interleaved rANS lanes,
//! and *raw bits* stored verbatim in a raw plane. bf16 weights shrink to about
//! 0.66 of their size, bit-exactly.
//!
//! A tensor is cut into chunks of [`CHUNK_ELEMS`] elements, each stored on
//! its own as [`Codec::Raw`] (its bytes verbatim) or [`Codec::Rans`]. The
//! byte format of a `Rans` chunk, the decoding rule and the measurements
//! behind [`PROB_BITS`] are in this crate's `README.md`.
//!
//! Three decoders decode the same stream bit for bit:
//! - [`decode_chunk`] / [`decode_tensor`]: the CPU decoder (rayon over
//!   chunks). It is written in the GPU's step form: 32 lanes decode one
//!   element each per step, and the lanes that need a renormalisation word
//!   take consecutive words of the stream in lane order (what a warp does
//!   with `__ballot_sync` + `__popc`).
//! - [`CUDA_SOURCE`]: the CUDA C of the GPU decoder (entry point
//!   [`CUDA_KERNEL`]), compiled at run time with NVRTC by the caller, which
//!   uploads [`GpuChunk`] descriptors and launches one warp per chunk; see
//!   [`CUDA_SOURCE`] for the launch contract.
//! - `tests/gpu_emulation.rs`: a line-by-line CPU transliteration of the
//!   kernel (LUT build, ballot/popc, raw copies, status words).
//!
//! Every input is checked: a chunk whose header, table, length or stream is
//! inconsistent gives a [`CodecError`], never a panic, an out-of-bounds
//! access or a hang (decoding time is bounded by the element count).
//! [`ChunkInfo::parse`] validates a chunk without decoding it (the GPU path
//! runs it on the host for every chunk before the kernel sees it). A
//! corruption of the raw plane or of a table symbol cannot be seen by the
//! codec; the caller's checksum of the decoded bytes catches those.
//!
//! Encoding is deterministic: the same input gives the same bytes on every
//! machine (integer-only frequency normalisation, no floating point).
//!
//! No I/O, no CUDA calls, no `unsafe`.
//!
//! Dependencies, and why:
//! - `thiserror`: the error types [`CodecError`] and [`TensorError`].
//! - `rayon`: [`encode_tensor`] and [`decode_tensor`] work on chunks in
//!   parallel.
//! - dev only: `rand` (seeded test data), `proptest` (random round trips),
//!   `half` (building bf16/f16 test values from f32).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(target_arch = "x86_64")]
mod avx2;
mod chunk;
mod error;
mod freq;
mod gpu;
mod layout;
mod tensor;

pub use chunk::{decode_chunk, encode_chunk, ChunkInfo};
pub use error::{CodecError, TensorError};
pub use gpu::{
    GpuChunk, CUDA_KERNEL, CUDA_SHARED_BYTES_PER_BLOCK, CUDA_SOURCE, CUDA_THREADS_PER_BLOCK,
    CUDA_WARPS_PER_BLOCK, GPU_CHUNK_BYTES,
};
pub use layout::{Codec, Layout};
pub use tensor::{chunk_count, decode_tensor, encode_tensor};

/// The CPU decoder this machine runs: `"avx2"` (x86-64 with AVX2: the
/// vector steps, about 3x the scalar speed) or `"scalar"` (other CPUs, or
/// `FLASH_CPU_DECODER=scalar` in the environment).
pub fn cpu_decoder() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if avx2::detect().is_some() {
        return "avx2";
    }
    "scalar"
}

/// Elements per chunk in tensors written by flash (the last chunk of a
/// tensor may be shorter). 65536 bf16 elements = 128 KiB decoded; one GPU
/// warp decodes one chunk in 2048 steps.
pub const CHUNK_ELEMS: usize = 65536;

/// Interleaved rANS lanes: element `j` of a chunk is coded by lane `j % 32`.
pub const LANES: usize = 32;

/// Probability precision: frequencies sum to `2^PROB_BITS`. 11 was chosen
/// from measurements (README.md): 12 saves under 0.1 % of the stored size
/// and doubles the GPU's shared-memory table.
pub const PROB_BITS: u32 = 11;

/// `2^PROB_BITS`, the sum of a table's frequencies.
pub const PROB_SCALE: u32 = 1 << PROB_BITS;

/// Lower bound of a lane state: states live in `[L, 2^32)`; every lane
/// starts encoding at, and ends decoding at, exactly `L`.
pub const L: u32 = 1 << 16;

/// Bytes of a `Rans` chunk's header: `words` (u32), `symbols` (u16),
/// reserved (u16, zero).
pub const HEADER_BYTES: usize = 8;

/// Offset of the frequency table in a `Rans` chunk: header + 32 lane states.
pub const TABLE_OFFSET: usize = HEADER_BYTES + 4 * LANES;

/// A chunk is stored `Rans` only when its stored length is at most this
/// many percent of its decoded length; otherwise `Raw`.
pub const MAX_RANS_PERCENT: usize = 98;

/// Hidden entry points for `examples/codec_speed.rs` and the tests: the
/// probability precision as a parameter (streams made with another
/// precision than [`PROB_BITS`] are not the flash format), and an encoder
/// that stores every chunk `Rans` however large.
#[doc(hidden)]
pub mod explore {
    pub use crate::chunk::{decode_chunk_pb, encode_chunk_pb, encode_chunk_rans_pb, Kernel};
}
