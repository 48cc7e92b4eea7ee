//! Decoding encoded tensors on the CPU: the twin of the GPU decoder, used by
//! host loads, by GPU loads where the GPU decoder is not available, and by
//! `verify` and `export`.
//!
//! A job that [`decodes`](crate::Job::decodes) holds the stored bytes of whole
//! chunks of one tensor; each chunk is checked (flash-codec validates its
//! header and table, never reads past its stored bytes, and checks that the
//! stream ends where it should) and decoded into its place in the
//! destination. Errors name the file, the tensor and the chunk.

use crate::error::LoadError;
use crate::plan::{Job, LoadPlan, PlannedChunk};
use flash_format::manifest::{ChunkCodec, ElementLayout};
use flash_sys::os::AlignedBuf;

/// `buf`, replaced by a larger one when it holds fewer than `len` bytes.
pub(crate) fn at_least(
    buf: &mut Option<AlignedBuf>,
    len: usize,
) -> Result<&mut AlignedBuf, LoadError> {
    if buf.as_ref().is_none_or(|b| b.len() < len) {
        *buf = Some(
            AlignedBuf::new(len)
                .map_err(|e| LoadError::Device(format!("buffer of {len} bytes: {e}")))?,
        );
    }
    Ok(buf.as_mut().expect("made above"))
}

/// The codec's view of a layout.
pub fn codec_layout(layout: ElementLayout) -> flash_codec::Layout {
    match layout {
        ElementLayout::Bf16 => flash_codec::Layout::Bf16,
        ElementLayout::F16 => flash_codec::Layout::F16,
        ElementLayout::F32 => flash_codec::Layout::F32,
    }
}

/// The codec's view of a chunk codec.
pub fn codec_kind(codec: ChunkCodec) -> flash_codec::Codec {
    match codec {
        ChunkCodec::Raw => flash_codec::Codec::Raw,
        ChunkCodec::Rans => flash_codec::Codec::Rans,
    }
}

/// An error about chunk `c` of `plan`.
pub fn chunk_error(plan: &LoadPlan, c: &PlannedChunk, why: impl Into<String>) -> LoadError {
    let t = &plan.encoded[c.tensor as usize];
    LoadError::Decode {
        path: plan.files[t.file].path.clone(),
        tensor: t.name.clone(),
        chunk: c.index,
        why: why.into(),
    }
}

/// The stored bytes of chunk `c` within `window`, the bytes of `job` as
/// read from `job.file_offset` (fewer than `job.len` at the end of a file).
pub fn stored_bytes<'w>(
    plan: &LoadPlan,
    job: &Job,
    c: &PlannedChunk,
    window: &'w [u8],
) -> Result<&'w [u8], LoadError> {
    let at = c
        .file_offset
        .checked_sub(job.file_offset)
        .map(|a| a as usize)
        .filter(|&a| a + c.stored_len as usize <= window.len())
        .ok_or_else(|| {
            chunk_error(
                plan,
                c,
                format!(
                    "its {} stored bytes at {} are not in the {} bytes read from {}",
                    c.stored_len,
                    c.file_offset,
                    window.len(),
                    job.file_offset
                ),
            )
        })?;
    Ok(&window[at..at + c.stored_len as usize])
}

/// Decodes chunk `c` from its stored bytes into `out` (its decoded length).
pub fn decode_chunk(
    plan: &LoadPlan,
    c: &PlannedChunk,
    stored: &[u8],
    out: &mut [u8],
) -> Result<(), LoadError> {
    let layout = codec_layout(plan.encoded[c.tensor as usize].layout);
    flash_codec::decode_chunk(layout, codec_kind(c.codec), stored, out)
        .map_err(|e| chunk_error(plan, c, e.to_string()))
}

/// The chunks of a decoding job.
pub fn job_chunks<'p>(plan: &'p LoadPlan, job: &Job) -> &'p [PlannedChunk] {
    &plan.chunks[job.chunks.0 as usize..job.chunks.1 as usize]
}

/// The destination span of a decoding job: from its first chunk's decoded
/// bytes to the end of its last one's. Its chunks follow each other in the
/// destination, contiguous within a tensor; between the tensors of a window
/// that spans several ([`LoadPlan::jobs`]) lie gaps that are not the job's
/// to write ([`job_dest_runs`]).
pub fn job_dest_range(plan: &LoadPlan, job: &Job) -> std::ops::Range<u64> {
    let chunks = job_chunks(plan, job);
    match (chunks.first(), chunks.last()) {
        (Some(a), Some(b)) => a.dest_offset..b.dest_offset + b.decoded_len,
        _ => 0..0,
    }
}

/// The destination ranges a decoding job writes, in order: its chunks'
/// decoded bytes, contiguous ones merged (one range per tensor, or per run
/// of tensors with nothing between them).
pub fn job_dest_runs(plan: &LoadPlan, job: &Job) -> Vec<std::ops::Range<u64>> {
    let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
    for c in job_chunks(plan, job) {
        let r = c.dest_offset..c.dest_offset + c.decoded_len;
        match runs.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => runs.push(r),
        }
    }
    runs
}

/// A sink that decodes every chunk of a plan's decoding jobs on the CPU
/// and hands `(chunk, decoded bytes or why not)` to a function, on the
/// reader threads, in no particular order (`verify`, `export`: nothing is
/// kept in memory but one window per reader). Verbatim jobs are refused:
/// plan only the encoded tensors.
pub struct DecodedChunks<F> {
    f: F,
}

impl<F> DecodedChunks<F>
where
    F: Fn(&PlannedChunk, Result<&[u8], LoadError>) -> Result<(), LoadError> + Sync,
{
    pub fn new(f: F) -> Self {
        DecodedChunks { f }
    }
}

pub struct DecodedChunksWorker<'s, F> {
    sink: &'s DecodedChunks<F>,
    window: Option<AlignedBuf>,
    decoded: Vec<u8>,
}

impl<F> crate::pipeline::Sink for DecodedChunks<F>
where
    F: Fn(&PlannedChunk, Result<&[u8], LoadError>) -> Result<(), LoadError> + Sync,
{
    type Worker<'s>
        = DecodedChunksWorker<'s, F>
    where
        Self: 's;
    fn worker(&self) -> Result<DecodedChunksWorker<'_, F>, LoadError> {
        Ok(DecodedChunksWorker {
            sink: self,
            window: None,
            decoded: Vec::new(),
        })
    }
}

impl<F> crate::pipeline::SinkWorker for DecodedChunksWorker<'_, F>
where
    F: Fn(&PlannedChunk, Result<&[u8], LoadError>) -> Result<(), LoadError> + Sync,
{
    fn transfer(
        &mut self,
        job: &Job,
        plan: &LoadPlan,
        read: &mut crate::pipeline::ReadFn,
    ) -> Result<(), LoadError> {
        if !job.decodes() {
            return Err(LoadError::Device(
                "a verbatim window given to a decoding scan".into(),
            ));
        }
        let window = at_least(&mut self.window, job.len as usize)?;
        let n = read(&mut window[..job.len as usize], 0)?;
        for c in job_chunks(plan, job) {
            self.decoded.resize(c.decoded_len as usize, 0);
            let decoded = stored_bytes(plan, job, c, &window[..n])
                .and_then(|stored| decode_chunk(plan, c, stored, &mut self.decoded))
                .map(|()| &self.decoded[..]);
            (self.sink.f)(c, decoded)?;
        }
        Ok(())
    }

    fn finish(self) -> Result<(), LoadError> {
        Ok(())
    }
}

/// The decoded bytes of one stored tensor of `source`, read with plain
/// reads (imports, tools): verbatim bytes as they are, encoded ones decoded
/// chunk by chunk.
pub fn read_tensor(
    source: &crate::ModelSource,
    file: &std::fs::File,
    t: &crate::StoredTensor,
) -> Result<Vec<u8>, LoadError> {
    use std::os::unix::fs::FileExt;
    let path = &source.files[t.file].path;
    let read = |len: u64, at: u64| -> Result<Vec<u8>, LoadError> {
        let len = usize::try_from(len)
            .map_err(|_| LoadError::model(path, format!("tensor {:?} is too large", t.name)))?;
        let mut bytes = Vec::new();
        bytes
            .try_reserve_exact(len)
            .map_err(|e| LoadError::model(path, format!("tensor {:?}: {e}", t.name)))?;
        bytes.resize(len, 0);
        file.read_exact_at(&mut bytes, at)
            .map_err(|e| LoadError::io(path, e))?;
        Ok(bytes)
    };
    let Some(e) = &t.encoding else {
        return read(t.length, t.offset);
    };
    let stored = read(e.stored_length, t.offset)?;
    let mut out = vec![0u8; t.length as usize];
    let layout = codec_layout(e.layout);
    for (i, c) in e.chunks.iter().enumerate() {
        let bad = |why: String| LoadError::Decode {
            path: path.clone(),
            tensor: t.name.clone(),
            chunk: i as u32,
            why,
        };
        let s = stored
            .get(c.stored_at as usize..(c.stored_at + c.stored_len) as usize)
            .ok_or_else(|| bad("its stored bytes run past the tensor's".into()))?;
        let o = out
            .get_mut(c.decoded_at as usize..(c.decoded_at + c.decoded_len) as usize)
            .ok_or_else(|| bad("its decoded bytes run past the tensor's".into()))?;
        flash_codec::decode_chunk(layout, codec_kind(c.codec), s, o)
            .map_err(|e| bad(e.to_string()))?;
    }
    Ok(out)
}

/// Decodes a whole stored image (laid out as
/// [`LoadPlan::stored_image`](crate::LoadPlan::stored_image)) into the
/// plan's destination layout on the CPU: verbatim ranges copied, chunks
/// decoded in parallel.
pub fn decode_image(plan: &LoadPlan, image: &[u8], out: &mut [u8]) -> Result<(), LoadError> {
    decode_range(plan, image, 0..plan.dest_len, out)
}

/// The bytes `[range)` of the plan's destination layout, from a stored
/// image, into `out` (`range`'s length): what a copy-mode fill or a CPU
/// engine reads from a compressed model in the memory tier.
pub fn decode_range(
    plan: &LoadPlan,
    image: &[u8],
    range: std::ops::Range<u64>,
    out: &mut [u8],
) -> Result<(), LoadError> {
    use rayon::prelude::*;
    if out.len() as u64 != range.end.saturating_sub(range.start)
        || (image.len() as u64) < plan.image_len
    {
        return Err(LoadError::Device(format!(
            "decoding [{}, {}) into {} bytes from an image of {} (the plan's is {})",
            range.start,
            range.end,
            out.len(),
            image.len(),
            plan.image_len
        )));
    }
    let overlap = |start: u64, len: u64| {
        let (a, b) = (start.max(range.start), (start + len).min(range.end));
        (a < b).then_some((a, b))
    };
    for s in &plan.segments {
        if let Some((a, b)) = overlap(s.dest_offset, s.len) {
            let from = (s.image_offset + a - s.dest_offset) as usize;
            out[(a - range.start) as usize..(b - range.start) as usize]
                .copy_from_slice(&image[from..from + (b - a) as usize]);
        }
    }
    // Chunks overlapping the range, decoded in parallel straight into their
    // place in `out` (each gets its own disjoint slice); a chunk the range
    // cuts is decoded into a buffer of its own and the overlap copied.
    let mut wanted: Vec<&PlannedChunk> = plan
        .chunks
        .iter()
        .filter(|c| overlap(c.dest_offset, c.decoded_len).is_some())
        .collect();
    wanted.sort_by_key(|c| c.dest_offset);
    let mut pieces: Vec<(&PlannedChunk, u64, &mut [u8])> = Vec::with_capacity(wanted.len());
    let (mut rest, mut rest_at) = (out, range.start);
    for c in wanted {
        let (a, b) = overlap(c.dest_offset, c.decoded_len).expect("chosen for it");
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((a - rest_at) as usize);
        let (piece, tail) = tail.split_at_mut((b - a) as usize);
        pieces.push((c, a, piece));
        (rest, rest_at) = (tail, b);
    }
    pieces.into_par_iter().try_for_each(|(c, a, piece)| {
        let at = c.image_offset as usize;
        let stored = image
            .get(at..at + c.stored_len as usize)
            .ok_or_else(|| chunk_error(plan, c, "its stored bytes lie outside the image"))?;
        if piece.len() as u64 == c.decoded_len {
            return decode_chunk(plan, c, stored, piece);
        }
        let mut whole = vec![0u8; c.decoded_len as usize];
        decode_chunk(plan, c, stored, &mut whole)?;
        let from = (a - c.dest_offset) as usize;
        piece.copy_from_slice(&whole[from..from + piece.len()]);
        Ok(())
    })?;
    Ok(())
}
