//! The GPU decoder of compressed tensors: flash-codec's CUDA source on the
//! module API.
//!
//! The loader reads a window of stored chunks into pinned memory, checks
//! every chunk there ([`chunk_descriptor`] runs flash-codec's host-side
//! validation), copies the window to device scratch memory and queues
//! [`GpuDecoder::launch`], which decodes each chunk with one warp straight
//! into its place in the model's allocation. A chunk whose stream turns out
//! corrupt (it overruns, or its lanes do not end where they must) is counted
//! in the launch's status words, never written past its destination.

use crate::module::{CudaSource, LaunchArgs, LaunchConfig, Module};
use crate::view::DevView;
use flash_codec::{ChunkInfo, Codec, GpuChunk, Layout, GPU_CHUNK_BYTES};
use flash_sys::cuda::{CudaError, Gpu, Stream};
use std::path::Path;

/// The decoder's source, as `flash kernels --compile-only` lists it.
pub const DECODE_SOURCE: CudaSource<'static> = CudaSource {
    name: "flash-decode",
    code: flash_codec::CUDA_SOURCE,
    options: &["--std=c++17"],
    functions: &[flash_codec::CUDA_KERNEL],
};

/// Bytes of one launch's status words.
pub const STATUS_BYTES: usize = 8;

/// The status words a launch must start from: no bad chunk, no smallest bad
/// index.
pub const STATUS_INIT: [u8; STATUS_BYTES] = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];

/// What a launch's status words say: `None` when every chunk decoded, else
/// `(bad chunks, index of the first bad one)`.
pub fn read_status(words: &[u8]) -> Option<(u32, u32)> {
    let count = u32::from_le_bytes(words.get(0..4)?.try_into().ok()?);
    let first = u32::from_le_bytes(words.get(4..8)?.try_into().ok()?);
    (count > 0).then_some((count, first))
}

/// One chunk to decode: its stored bytes as they are on the host (checked
/// here) and where they will be on the device, and its destination.
pub struct DecodeChunk<'h, 'd> {
    pub layout: Layout,
    pub codec: Codec,
    pub elems: u32,
    /// The stored bytes, on the host (the copy that is uploaded to `src`).
    pub stored: &'h [u8],
    /// Where `stored` is on the device.
    pub src: DevView<'d>,
    /// Where the decoded bytes go.
    pub dst: DevView<'d>,
}

/// Checks a chunk and returns its descriptor: the stored bytes pass
/// flash-codec's validation (header, table, lengths), the device source
/// holds them at a 16-byte aligned address, the destination has room for
/// the decoded elements at an element-aligned address. The kernel then
/// touches no byte outside `src` and `dst`, provided the device copy of
/// `stored` is what was checked here.
pub fn chunk_descriptor(c: &DecodeChunk<'_, '_>) -> Result<GpuChunk, String> {
    let eb = c.layout.elem_bytes();
    let decoded = c.elems as usize * eb;
    match c.codec {
        Codec::Raw if c.stored.len() != decoded => {
            return Err(format!(
                "a raw chunk of {} bytes for {decoded} decoded bytes",
                c.stored.len()
            ))
        }
        Codec::Raw => {}
        Codec::Rans => {
            ChunkInfo::parse(c.layout, c.elems as usize, c.stored).map_err(|e| e.to_string())?;
        }
    }
    if c.src.len() < c.stored.len() || c.src.device_ptr() % 16 != 0 {
        return Err(format!(
            "device source of {} bytes at {:#x} for {} stored bytes (16-byte aligned)",
            c.src.len(),
            c.src.device_ptr(),
            c.stored.len()
        ));
    }
    if c.dst.len() < decoded || c.dst.device_ptr() % eb as u64 != 0 {
        return Err(format!(
            "destination of {} bytes at {:#x} for {decoded} decoded bytes",
            c.dst.len(),
            c.dst.device_ptr()
        ));
    }
    Ok(GpuChunk::new(
        c.src.device_ptr(),
        c.dst.device_ptr(),
        c.elems,
        c.layout,
        c.codec,
    ))
}

/// The decoder's kernel, loaded into one GPU's context.
pub struct GpuDecoder {
    module: Module,
}

impl GpuDecoder {
    /// Compiles (or takes from `cache_dir`) the decoder for `gpu` and loads it.
    pub fn load(gpu: &Gpu, cache_dir: Option<&Path>) -> Result<GpuDecoder, CudaError> {
        Ok(GpuDecoder {
            module: Module::load(gpu, &DECODE_SOURCE, cache_dir)?,
        })
    }

    pub fn module(&self) -> &Module {
        &self.module
    }

    /// Queues the decode of `n` chunks whose descriptors (made by
    /// [`chunk_descriptor`] and written with `GpuChunk::write_to`) are in
    /// `descs`, with `status` set to [`STATUS_INIT`] before, on `stream`.
    pub fn launch(
        &self,
        stream: &Stream,
        descs: DevView<'_>,
        n: u32,
        status: DevView<'_>,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        descs.require("decode descriptors", n as usize * GPU_CHUNK_BYTES)?;
        descs.aligned("decode descriptors", 8)?;
        status.require("decode status", STATUS_BYTES)?;
        status.aligned("decode status", 4)?;
        let mut args = LaunchArgs::new();
        args.view(descs).u32(n).view(status);
        self.module.launch(
            stream,
            0,
            LaunchConfig::new(
                (GpuChunk::grid_blocks(n), 1, 1),
                flash_codec::CUDA_THREADS_PER_BLOCK,
            ),
            &args,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_words() {
        assert_eq!(read_status(&STATUS_INIT), None);
        let mut w = STATUS_INIT;
        w[0] = 2;
        w[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(read_status(&w), Some((2, 7)));
        assert_eq!(read_status(&[1, 2]), None);
    }
}
