//! Writing a tensor into a model's data files, verbatim or encoded: the one
//! place that decides which tensors are compressed (imports and the SDK's
//! `save_dict` both write through it).
//!
//! A tensor is encoded when compression is asked for, its dtype has an
//! element layout (bf16, f16, f32) and it has at least
//! [`MIN_ENCODED_ELEMS`] elements. Its chunks are encoded in parallel
//! (rayon); a chunk that would not shrink is stored raw by the codec, and a
//! tensor none of whose chunks shrank is written verbatim.

use crate::error::{Result, StoreError};
use flash_format::manifest::{ChunkCodec, ElementLayout};
use flash_format::writer::DataWriter;
use flash_format::DType;
use rayon::prelude::*;

/// Smaller tensors are written verbatim: a chunk's header and table would
/// eat what coding saves, and they are few bytes of any model.
pub const MIN_ENCODED_ELEMS: u64 = 4096;

fn codec_of(c: flash_codec::Codec) -> ChunkCodec {
    match c {
        flash_codec::Codec::Raw => ChunkCodec::Raw,
        flash_codec::Codec::Rans => ChunkCodec::Rans,
    }
}

/// Writes tensor `name` with its `bytes` (little-endian, `dtype` and
/// `shape`), encoded when `compress` allows and it pays.
pub fn write_tensor(
    writer: &mut DataWriter,
    name: &str,
    dtype: DType,
    shape: &[u64],
    bytes: &[u8],
    compress: bool,
) -> Result<()> {
    let layout = ElementLayout::for_dtype(dtype).filter(|_| compress);
    let elem = dtype.bits() / 8;
    let elems = (bytes.len() as u64).checked_div(elem).unwrap_or(0);
    let Some(layout) = layout.filter(|_| elems >= MIN_ENCODED_ELEMS) else {
        writer.begin_tensor(name, dtype, shape)?;
        writer.write(bytes)?;
        return Ok(());
    };
    let chunk_elems = flash_codec::CHUNK_ELEMS as u64;
    let codec_layout = flash_load::decode::codec_layout(layout);
    let encoded: Vec<(ChunkCodec, Vec<u8>, u64)> = bytes
        .par_chunks((chunk_elems * elem) as usize)
        .map(|decoded| {
            let mut out = Vec::new();
            let codec = flash_codec::encode_chunk(codec_layout, decoded, &mut out);
            (
                codec_of(codec),
                out,
                flash_format::manifest::chunk_checksum(decoded),
            )
        })
        .collect();
    if encoded.iter().all(|(c, _, _)| *c == ChunkCodec::Raw) {
        writer.begin_tensor(name, dtype, shape)?;
        writer.write(bytes)?;
        return Ok(());
    }
    let chunks: Vec<(ChunkCodec, &[u8], u64)> = encoded
        .iter()
        .map(|(c, b, sum)| (*c, b.as_slice(), *sum))
        .collect();
    writer
        .encoded_tensor(
            &flash_format::safetensors::TensorSpec {
                name: name.to_string(),
                dtype,
                shape: shape.to_vec(),
            },
            layout,
            chunk_elems,
            &chunks,
            flash_format::manifest::chunk_checksum(bytes),
        )
        .map_err(StoreError::from)
}
