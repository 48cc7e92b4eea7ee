//! The GPU decoder's source, its descriptors and launch constants.

use crate::layout::{Codec, Layout};
use crate::PROB_SCALE;

/// The CUDA C source of the GPU decoder, for NVRTC (no includes; compiles
/// cleanly with `--gpu-architecture=compute_90`). This crate makes no CUDA
/// calls: the caller compiles it, uploads the descriptors and launches
/// [`CUDA_KERNEL`]. Measured on an H200: 43 registers, no spills, about
/// 445 GB/s of bf16 output (README.md).
///
/// Launch: `flash_codec_decode(const GpuChunk* chunks, unsigned int n_chunks,
/// unsigned int* status)` with
/// - grid: [`GpuChunk::grid_blocks`]`(n_chunks)` blocks
///   (`ceil(n_chunks / CUDA_WARPS_PER_BLOCK)`; any positive grid is correct,
///   warps loop over chunks with a grid stride);
/// - block: [`CUDA_THREADS_PER_BLOCK`] threads (one warp per chunk);
/// - shared memory: none dynamic ([`CUDA_SHARED_BYTES_PER_BLOCK`] static);
/// - `chunks`: `n_chunks` descriptors made by [`GpuChunk::write_to`], in
///   device memory, 8-byte aligned;
/// - `status`: two u32 in device memory, set to `[0, 0xffff_ffff]` before
///   the launch; afterwards `status[0]` counts bad chunks and `status[1]` is
///   the smallest bad index (`0xffff_ffff` when none).
///
/// Before the launch the host must check every `Rans` chunk with
/// [`ChunkInfo::parse`](crate::ChunkInfo::parse) and every `Raw` chunk's
/// length (`elems * elem_bytes`), put each stored chunk at a 16-byte aligned
/// device address and give each destination an element-aligned address with
/// room for `elems * elem_bytes` bytes. Destinations must not overlap each
/// other or any source. Give the kernel many chunks per launch (a few
/// thousand warps fill an H200: 132 SMs × 24 resident warps).
pub const CUDA_SOURCE: &str = include_str!("decode.cu");

/// The kernel's entry point in [`CUDA_SOURCE`] (`extern "C"`).
pub const CUDA_KERNEL: &str = "flash_codec_decode";

/// Warps per block (`FC_WARPS_PER_BLOCK` in the source); each decodes one
/// chunk at a time.
pub const CUDA_WARPS_PER_BLOCK: u32 = 4;

/// Threads per block: 32 per warp.
pub const CUDA_THREADS_PER_BLOCK: u32 = CUDA_WARPS_PER_BLOCK * 32;

/// Static shared memory per block: one table of `2^PROB_BITS` u32 per warp.
pub const CUDA_SHARED_BYTES_PER_BLOCK: usize =
    CUDA_WARPS_PER_BLOCK as usize * PROB_SCALE as usize * 4;

/// Bytes of a serialised [`GpuChunk`].
pub const GPU_CHUNK_BYTES: usize = 24;

/// One chunk for the GPU decoder. Serialised by [`write_to`](Self::write_to)
/// as the CUDA struct
/// ```c
/// struct GpuChunk {                // 24 bytes, 8-aligned, little-endian
///     unsigned long long src;      // offset 0: device address of the stored chunk
///     unsigned long long dst;      // offset 8: device address of its decoded bytes
///     unsigned int elems;          // offset 16: elements in the chunk
///     unsigned int kind;           // offset 20: layout | codec << 8
/// };
/// ```
/// with layout 0 = bf16, 1 = f16, 2 = f32 and codec 0 = raw, 1 = rans
/// ([`Layout::code`], [`Codec::code`]); the other bits of `kind` are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuChunk {
    /// Device address of the stored chunk (16-byte aligned).
    pub src: u64,
    /// Device address of the decoded bytes (element aligned).
    pub dst: u64,
    /// Elements in the chunk.
    pub elems: u32,
    /// `layout.code() | codec.code() << 8`.
    pub kind: u32,
}

impl GpuChunk {
    /// A descriptor for `elems` elements of `layout` stored with `codec`.
    pub fn new(src: u64, dst: u64, elems: u32, layout: Layout, codec: Codec) -> GpuChunk {
        GpuChunk {
            src,
            dst,
            elems,
            kind: Self::kind_of(layout, codec),
        }
    }

    /// The `kind` field for a layout and codec.
    pub const fn kind_of(layout: Layout, codec: Codec) -> u32 {
        layout.code() | (codec.code() << 8)
    }

    /// Layout and codec of `kind`, `None` when it is not one the kernel
    /// knows.
    pub const fn split_kind(kind: u32) -> Option<(Layout, Codec)> {
        if kind >> 16 != 0 {
            return None;
        }
        match (
            Layout::from_code(kind & 0xff),
            Codec::from_code((kind >> 8) & 0xff),
        ) {
            (Some(l), Some(c)) => Some((l, c)),
            _ => None,
        }
    }

    /// Appends the 24 bytes the CUDA struct holds.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.src.to_le_bytes());
        out.extend_from_slice(&self.dst.to_le_bytes());
        out.extend_from_slice(&self.elems.to_le_bytes());
        out.extend_from_slice(&self.kind.to_le_bytes());
    }

    /// The descriptor serialised in `b` (the inverse of
    /// [`write_to`](Self::write_to)).
    pub fn read_from(b: &[u8; GPU_CHUNK_BYTES]) -> GpuChunk {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        GpuChunk {
            src: u64_at(0),
            dst: u64_at(8),
            elems: u32_at(16),
            kind: u32_at(20),
        }
    }

    /// Blocks to launch for `n_chunks` chunks: one warp per chunk.
    pub const fn grid_blocks(n_chunks: u32) -> u32 {
        n_chunks.div_ceil(CUDA_WARPS_PER_BLOCK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{L, LANES, PROB_BITS, TABLE_OFFSET};

    /// The value of `#define NAME value` in the CUDA source.
    fn define(name: &str) -> String {
        let prefix = format!("#define {name} ");
        CUDA_SOURCE
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no #define {name}"))
            .trim()
            .to_string()
    }

    #[test]
    fn source_constants_match_the_crate() {
        assert_eq!(define("FC_PROB_BITS"), PROB_BITS.to_string());
        assert_eq!(define("FC_L"), format!("{L}u"));
        assert_eq!(define("FC_LANES"), LANES.to_string());
        assert_eq!(
            define("FC_WARPS_PER_BLOCK"),
            CUDA_WARPS_PER_BLOCK.to_string()
        );
        assert_eq!(define("FC_TABLE_OFFSET"), TABLE_OFFSET.to_string());
        for l in [Layout::Bf16, Layout::F16, Layout::F32] {
            let name = format!("FC_LAYOUT_{:?}", l).to_uppercase();
            assert_eq!(define(&name), l.code().to_string());
        }
        assert_eq!(define("FC_CODEC_RAW"), Codec::Raw.code().to_string());
        assert_eq!(define("FC_CODEC_RANS"), Codec::Rans.code().to_string());
        assert!(CUDA_SOURCE.contains(&format!("{CUDA_KERNEL}(")));
        assert!(!CUDA_SOURCE.contains("#include"));
    }

    #[test]
    fn descriptor_bytes() {
        let c = GpuChunk::new(
            0x1122_3344_5566_7780,
            0x0102_0304_0506_0708,
            65536,
            Layout::F32,
            Codec::Rans,
        );
        let mut b = Vec::new();
        c.write_to(&mut b);
        assert_eq!(b.len(), GPU_CHUNK_BYTES);
        assert_eq!(&b[0..8], &0x1122_3344_5566_7780u64.to_le_bytes());
        assert_eq!(&b[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[16..20], &65536u32.to_le_bytes());
        assert_eq!(&b[20..24], &[2, 1, 0, 0]);
        assert_eq!(GpuChunk::read_from(b.as_slice().try_into().unwrap()), c);
        assert_eq!(
            GpuChunk::split_kind(c.kind),
            Some((Layout::F32, Codec::Rans))
        );
        assert_eq!(GpuChunk::split_kind(0x1_0000), None);
        assert_eq!(GpuChunk::split_kind(3), None);
        assert_eq!(GpuChunk::grid_blocks(9), 3);
        assert_eq!(CUDA_SHARED_BYTES_PER_BLOCK, 4 * 2048 * 4);
    }
}
