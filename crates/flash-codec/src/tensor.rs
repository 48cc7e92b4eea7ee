//! Whole tensors: chunking and rayon over chunks.

use crate::chunk::{decode_chunk, encode_chunk};
use crate::error::TensorError;
use crate::layout::{Codec, Layout};
use rayon::prelude::*;

/// Chunks of a tensor of `elems` elements cut every `chunk_elems`:
/// `ceil(elems / chunk_elems)` (0 for an empty tensor).
///
/// # Panics
/// When `chunk_elems` is 0.
pub fn chunk_count(elems: usize, chunk_elems: usize) -> usize {
    assert!(chunk_elems > 0, "chunk_elems is 0");
    elems.div_ceil(chunk_elems)
}

/// Encodes a tensor (`decoded`: whole little-endian elements of `layout`)
/// in chunks of `chunk_elems` elements ([`CHUNK_ELEMS`](crate::CHUNK_ELEMS)
/// in the flash format), in parallel; returns each chunk's codec and
/// stored bytes, in order. Chunk `i` covers elements
/// `[i * chunk_elems, min(n, (i + 1) * chunk_elems))`.
///
/// # Panics
/// When `chunk_elems` is 0 or `decoded` is not whole elements.
pub fn encode_tensor(layout: Layout, decoded: &[u8], chunk_elems: usize) -> Vec<(Codec, Vec<u8>)> {
    assert!(chunk_elems > 0, "chunk_elems is 0");
    let eb = layout.elem_bytes();
    assert!(
        decoded.len() % eb == 0,
        "a tensor of {} bytes is not a whole number of {eb}-byte elements",
        decoded.len()
    );
    decoded
        .par_chunks(chunk_elems.saturating_mul(eb))
        .map(|c| {
            let mut out = Vec::new();
            let codec = encode_chunk(layout, c, &mut out);
            (codec, out)
        })
        .collect()
}

/// Decodes a tensor from its chunks (codec and stored bytes, in order) into
/// `out` (its decoded length), in parallel. The number of chunks must be
/// `ceil(elems / chunk_elems)`. When chunks fail, the error names the one
/// with the smallest index. Only `out` is written; on an error its content
/// is unspecified.
pub fn decode_tensor(
    layout: Layout,
    chunks: &[(Codec, &[u8])],
    chunk_elems: usize,
    out: &mut [u8],
) -> Result<(), TensorError> {
    if chunk_elems == 0 {
        return Err(TensorError::ZeroChunkElems);
    }
    let eb = layout.elem_bytes();
    if out.len() % eb != 0 {
        return Err(TensorError::PartialElement {
            len: out.len(),
            elem_bytes: eb,
        });
    }
    let elems = out.len() / eb;
    let expected = chunk_count(elems, chunk_elems);
    if chunks.len() != expected {
        return Err(TensorError::ChunkCount {
            got: chunks.len(),
            expected,
            elems,
            chunk_elems,
        });
    }
    let failed = out
        .par_chunks_mut(chunk_elems.saturating_mul(eb))
        .zip(chunks.par_iter())
        .enumerate()
        .filter_map(|(index, (o, &(codec, stored)))| {
            decode_chunk(layout, codec, stored, o)
                .err()
                .map(|error| TensorError::Chunk { index, error })
        })
        .min_by_key(|e| match e {
            TensorError::Chunk { index, .. } => *index,
            _ => usize::MAX,
        });
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
