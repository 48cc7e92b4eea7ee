//! The read planner: which byte ranges of which files go where in the
//! destination memory.
//!
//! A plan has two kinds of stored ranges: verbatim [`Segment`]s, copied as
//! they are, and [`EncodedTensor`]s, whose chunks ([`PlannedChunk`]) are
//! decoded into the destination. Two layouts are planned: the destination
//! (decoded tensors, where the caller's tensors live) and a stored image
//! (the stored bytes themselves, congruent with the files: the daemon's
//! memory tier keeps a compressed model that way and decodes on upload).
//! Without encoded tensors both layouts are the same.
//!
//! Invariants of a [`LoadPlan`] (the pipeline and the sinks rely on them):
//! - each segment's destination and image offsets equal its file offset
//!   modulo [`ALIGN`], so an aligned window of the file maps to an aligned
//!   window of either, and O_DIRECT can read straight into them (device
//!   plans, [`LoadPlan::aligned_for_device`], drop this for the
//!   destination);
//! - the aligned windows of different segments never overlap in the
//!   destination or the image, and neither do decoded tensors, so workers
//!   can fill them concurrently;
//! - every selected tensor lies inside one segment or is one encoded tensor.

use crate::error::LoadError;
use crate::source::{ModelSource, SourceFile};
use flash_format::manifest::{align_up, ChunkCodec, ElementLayout};
use flash_format::DType;
use std::collections::HashMap;

/// The smallest read [`LoadPlan::jobs`] makes while a chunk is larger.
pub const MIN_JOB: u64 = 4 << 20;

/// Alignment of windows in files and destination.
pub const ALIGN: u64 = 4096;

/// Gaps between selected tensors up to this size are read through rather than
/// skipped: one larger read beats two small ones (also between the stored
/// chunks of consecutive encoded tensors that share a window).
pub const MERGE_GAP: u64 = 1 << 20;

fn align_down(x: u64) -> u64 {
    x & !(ALIGN - 1)
}

/// A tensor as it lies in the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorView {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Byte offset in the destination.
    pub offset: u64,
    pub length: u64,
}

/// The tensors of a loaded model, found by name.
#[derive(Debug, Clone, Default)]
pub struct TensorTable {
    tensors: Vec<TensorView>,
    index: HashMap<String, usize>,
}

impl TensorTable {
    pub fn new(tensors: Vec<TensorView>) -> Self {
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        TensorTable { tensors, index }
    }

    /// Every tensor, in the source's order (aliases after stored tensors).
    pub fn all(&self) -> &[TensorView] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorView> {
        Some(&self.tensors[*self.index.get(name)?])
    }
}

/// A contiguous byte range of one file, copied verbatim: where its bytes lie
/// in a stored image and in the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub file: usize,
    pub file_offset: u64,
    pub len: u64,
    /// Where the bytes lie in an image of the stored bytes (congruent with
    /// the file modulo [`ALIGN`]).
    pub image_offset: u64,
    /// Where the bytes land in the destination.
    pub dest_offset: u64,
}

/// An encoded tensor of a plan: its stored bytes are decoded chunk by chunk
/// into `[dest_offset, dest_offset + length)` of the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedTensor {
    pub name: String,
    pub layout: ElementLayout,
    pub file: usize,
    /// The stored bytes: `[file_offset, file_offset + stored_length)`.
    pub file_offset: u64,
    pub stored_length: u64,
    /// Where the stored bytes lie in a stored image.
    pub image_offset: u64,
    /// Where the decoded bytes go.
    pub dest_offset: u64,
    pub length: u64,
    /// Its chunks: `chunks[first_chunk..first_chunk + chunk_count]` of the plan.
    pub first_chunk: usize,
    pub chunk_count: usize,
}

/// One chunk of an encoded tensor, with its positions in the file, the
/// stored image and the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedChunk {
    /// Index of its tensor in [`LoadPlan::encoded`].
    pub tensor: u32,
    /// Index of the chunk within its tensor.
    pub index: u32,
    pub codec: ChunkCodec,
    pub file_offset: u64,
    pub stored_len: u64,
    pub image_offset: u64,
    pub dest_offset: u64,
    pub decoded_len: u64,
}

/// One read of the pipeline: an aligned window of a file, where it lies in a
/// stored image, and either the aligned destination window it fills (a
/// verbatim read) or the encoded chunks it holds (`chunks`, a range of
/// [`LoadPlan::chunks`]), which the sink decodes into the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    pub file: usize,
    pub file_offset: u64,
    /// Bytes to read; the file may end sooner (last window of a file).
    pub len: u64,
    pub image_offset: u64,
    /// Destination of a verbatim read (unused when `chunks` is not empty).
    pub dest_offset: u64,
    /// Set by the pipeline: the file is read through the page cache (it was
    /// found there), not with O_DIRECT.
    pub buffered: bool,
    /// Encoded chunks whose stored bytes lie in this window.
    pub chunks: (u32, u32),
}

impl Job {
    /// Whether the window holds encoded chunks to decode (else its bytes
    /// are copied verbatim).
    pub fn decodes(&self) -> bool {
        self.chunks.0 < self.chunks.1
    }
}

#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub files: Vec<SourceFile>,
    /// Verbatim ranges, in file order.
    pub segments: Vec<Segment>,
    /// Encoded tensors, in file order.
    pub encoded: Vec<EncodedTensor>,
    /// Their chunks, in file order.
    pub chunks: Vec<PlannedChunk>,
    /// Selected tensors and aliases, in the order of the source.
    pub tensors: Vec<TensorView>,
    /// Size of the destination memory.
    pub dest_len: u64,
    /// Size of an image of the stored bytes (the memory tier's copy of a
    /// model): equal to `dest_len` for a plan without encoded tensors.
    pub image_len: u64,
}

/// Lays out aligned windows one after the other: the offset where a range
/// starting at `file_offset` lands, given the window cursor.
fn place(cursor: &mut u64, file_offset: u64, len: u64) -> u64 {
    let window_start = align_down(file_offset);
    let at = *cursor + (file_offset - window_start);
    *cursor += align_up(file_offset + len, ALIGN) - window_start;
    at
}

impl LoadPlan {
    /// Plans a load of the tensors of `source` for which `select` is true
    /// (all when `None`). An alias selects the tensor it points to.
    pub fn new(
        source: &ModelSource,
        select: Option<&dyn Fn(&str) -> bool>,
    ) -> Result<Self, LoadError> {
        let by_name: HashMap<&str, usize> = source
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let wanted = |name: &str| select.is_none_or(|f| f(name));
        let mut chosen = vec![false; source.tensors.len()];
        for (i, t) in source.tensors.iter().enumerate() {
            chosen[i] = wanted(&t.name);
        }
        let mut aliases = Vec::new();
        for (alias, target) in &source.aliases {
            if wanted(alias) {
                let &i = by_name.get(target.as_str()).ok_or_else(|| {
                    LoadError::model(
                        &source.dir,
                        format!("alias {alias:?} points to missing {target:?}"),
                    )
                })?;
                chosen[i] = true;
                aliases.push((alias.clone(), i));
            }
        }

        // Stored tensors with bytes, in file order: verbatim ones merge into
        // segments, encoded ones stand alone.
        let mut order: Vec<usize> = (0..source.tensors.len())
            .filter(|&i| chosen[i] && source.tensors[i].length > 0)
            .collect();
        order.sort_by_key(|&i| (source.tensors[i].file, source.tensors[i].offset));

        let mut segments: Vec<Segment> = Vec::new();
        let mut encoded: Vec<EncodedTensor> = Vec::new();
        let mut chunks: Vec<PlannedChunk> = Vec::new();
        // Where each chosen tensor went: a segment, or an encoded tensor.
        enum Went {
            Nowhere,
            Segment(usize),
            Encoded(usize),
        }
        let mut went: Vec<Went> = (0..source.tensors.len()).map(|_| Went::Nowhere).collect();
        for &i in &order {
            let t = &source.tensors[i];
            if let Some(e) = &t.encoding {
                let index = encoded.len();
                encoded.push(EncodedTensor {
                    name: t.name.clone(),
                    layout: e.layout,
                    file: t.file,
                    file_offset: t.offset,
                    stored_length: e.stored_length,
                    image_offset: 0,
                    dest_offset: 0,
                    length: t.length,
                    first_chunk: chunks.len(),
                    chunk_count: e.chunks.len(),
                });
                chunks.extend(e.chunks.iter().enumerate().map(|(k, c)| PlannedChunk {
                    tensor: index as u32,
                    index: k as u32,
                    codec: c.codec,
                    file_offset: t.offset + c.stored_at,
                    stored_len: c.stored_len,
                    image_offset: c.stored_at,
                    dest_offset: c.decoded_at,
                    decoded_len: c.decoded_len,
                }));
                went[i] = Went::Encoded(index);
                continue;
            }
            let end = t.offset + t.length;
            match segments.last_mut() {
                Some(s) if s.file == t.file && t.offset <= s.file_offset + s.len + MERGE_GAP => {
                    s.len = s.len.max(end - s.file_offset);
                }
                _ => segments.push(Segment {
                    file: t.file,
                    file_offset: t.offset,
                    len: t.length,
                    image_offset: 0,
                    dest_offset: 0,
                }),
            }
            went[i] = Went::Segment(segments.len() - 1);
        }

        // The stored image: every stored range's aligned window in file
        // order, congruent with the file.
        let mut image = 0u64;
        let (mut s, mut e) = (0, 0);
        while s < segments.len() || e < encoded.len() {
            let seg_first = e == encoded.len()
                || (s < segments.len()
                    && (segments[s].file, segments[s].file_offset)
                        < (encoded[e].file, encoded[e].file_offset));
            if seg_first {
                let g = &mut segments[s];
                g.image_offset = place(&mut image, g.file_offset, g.len);
                s += 1;
            } else {
                let t = &mut encoded[e];
                t.image_offset = place(&mut image, t.file_offset, t.stored_length);
                e += 1;
            }
        }
        // The destination: verbatim segments congruent with the files (so
        // O_DIRECT reads land in place), then the decoded tensors.
        let mut dest = 0u64;
        for g in &mut segments {
            g.dest_offset = place(&mut dest, g.file_offset, g.len);
        }
        for t in &mut encoded {
            t.dest_offset = dest;
            dest = align_up(dest + t.length, ALIGN);
        }
        for c in &mut chunks {
            let t = &encoded[c.tensor as usize];
            c.image_offset += t.image_offset;
            c.dest_offset += t.dest_offset;
        }

        let mut tensors = Vec::new();
        let mut view_of = vec![None; source.tensors.len()];
        for (i, t) in source.tensors.iter().enumerate() {
            if !chosen[i] {
                continue;
            }
            let offset = match went[i] {
                Went::Nowhere => 0, // zero-size tensor: no bytes anywhere
                Went::Segment(s) => segments[s].dest_offset + (t.offset - segments[s].file_offset),
                Went::Encoded(e) => encoded[e].dest_offset,
            };
            view_of[i] = Some(offset);
            if wanted(&t.name) {
                tensors.push(TensorView {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    offset,
                    length: t.length,
                });
            }
        }
        for (alias, i) in aliases {
            let t = &source.tensors[i];
            tensors.push(TensorView {
                name: alias,
                dtype: t.dtype,
                shape: t.shape.clone(),
                offset: view_of[i].expect("target chosen"),
                length: t.length,
            });
        }
        Ok(LoadPlan {
            files: source.files.clone(),
            segments,
            encoded,
            chunks,
            tensors,
            dest_len: dest,
            image_len: image,
        })
    }

    /// Whether the plan decodes encoded tensors.
    pub fn is_encoded(&self) -> bool {
        !self.encoded.is_empty()
    }

    /// The same reads with each segment's and decoded tensor's first byte at
    /// a multiple of `align` (a power of two, at most [`ALIGN`]) in the
    /// destination, and the tensors moved with them. For device
    /// destinations only: their copies take any address, and the GPU
    /// kernels want tensors on 16-byte (better 256-byte) boundaries, which a
    /// safetensors header of arbitrary length does not give. It breaks the
    /// first invariant of the module (destination and file congruent modulo
    /// `ALIGN`), which only sinks reading O_DIRECT straight into the
    /// destination need. The stored image's layout does not change.
    pub fn aligned_for_device(mut self, align: u64) -> Self {
        debug_assert!(align.is_power_of_two() && align <= ALIGN);
        // (old start, new start) of each region, in destination order.
        let mut moved = Vec::with_capacity(self.segments.len() + self.encoded.len());
        let mut cursor = 0u64;
        for s in &mut self.segments {
            let window_start = align_down(s.file_offset);
            let lead = s.file_offset - window_start;
            let pad = (align - lead % align) % align;
            let new = cursor + pad + lead;
            moved.push((s.dest_offset, new));
            s.dest_offset = new;
            cursor = align_up(
                cursor + pad + align_up(s.file_offset + s.len, ALIGN) - window_start,
                ALIGN,
            );
        }
        for t in &mut self.encoded {
            let new = align_up(cursor, align);
            moved.push((t.dest_offset, new));
            for c in &mut self.chunks[t.first_chunk..t.first_chunk + t.chunk_count] {
                c.dest_offset = c.dest_offset - t.dest_offset + new;
            }
            t.dest_offset = new;
            cursor = align_up(new + t.length, ALIGN);
        }
        moved.sort_unstable();
        for t in &mut self.tensors {
            if t.length == 0 {
                continue;
            }
            // The region holding the tensor: the last one starting at or
            // before it (regions never overlap).
            let i = moved.partition_point(|&(old, _)| old <= t.offset);
            if let Some(&(old, new)) = i.checked_sub(1).and_then(|i| moved.get(i)) {
                t.offset = t.offset - old + new;
            }
        }
        self.dest_len = cursor;
        self
    }

    /// The plan that copies the stored bytes verbatim into an image of
    /// `image_len` bytes (the memory tier's copy of a model): the encoded
    /// tensors' stored ranges become segments, nothing is decoded, and only
    /// the verbatim tensors keep a view (at their image offsets).
    pub fn stored_image(&self) -> LoadPlan {
        let mut segments: Vec<Segment> = self
            .segments
            .iter()
            .map(|s| Segment {
                dest_offset: s.image_offset,
                ..*s
            })
            .chain(self.encoded.iter().map(|t| Segment {
                file: t.file,
                file_offset: t.file_offset,
                len: t.stored_length,
                image_offset: t.image_offset,
                dest_offset: t.image_offset,
            }))
            .collect();
        segments.sort_by_key(|s| (s.file, s.file_offset));
        let encoded_at: std::collections::HashSet<u64> =
            self.encoded.iter().map(|t| t.dest_offset).collect();
        let tensors =
            self.tensors
                .iter()
                .filter(|t| t.length == 0 || !encoded_at.contains(&t.offset))
                .map(|t| {
                    // A verbatim tensor: its segment's image offset plus its
                    // distance from the segment's start.
                    let s = self.segments.iter().find(|s| {
                        (s.dest_offset..s.dest_offset + s.len.max(1)).contains(&t.offset)
                    });
                    let offset = s.map_or(t.offset, |s| t.offset - s.dest_offset + s.image_offset);
                    TensorView {
                        offset,
                        ..t.clone()
                    }
                })
                .collect();
        LoadPlan {
            files: self.files.clone(),
            segments,
            encoded: Vec::new(),
            chunks: Vec::new(),
            tensors,
            dest_len: self.image_len,
            image_len: self.image_len,
        }
    }

    /// A plan that reads every byte of `files`, each file at the destination
    /// offset equal to the sum of the (aligned) sizes before it. Used to scan
    /// whole data files (verify, export); `tensors` is empty.
    pub fn whole_files(files: &[SourceFile]) -> Self {
        let mut cursor = 0;
        let segments = files
            .iter()
            .enumerate()
            .filter(|(_, f)| f.len > 0)
            .map(|(i, f)| {
                let s = Segment {
                    file: i,
                    file_offset: 0,
                    len: f.len,
                    image_offset: cursor,
                    dest_offset: cursor,
                };
                cursor += align_up(f.len, ALIGN);
                s
            })
            .collect();
        LoadPlan {
            files: files.to_vec(),
            segments,
            encoded: Vec::new(),
            chunks: Vec::new(),
            tensors: Vec::new(),
            dest_len: cursor,
            image_len: cursor,
        }
    }

    /// Bytes the tensors occupy (aliases not counted twice).
    pub fn tensor_bytes(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.tensors
            .iter()
            .filter(|t| seen.insert(t.offset) || t.length == 0)
            .map(|t| t.length)
            .sum()
    }

    /// Splits the plan into aligned reads of at most `chunk` bytes
    /// (`chunk` is rounded up to [`ALIGN`]) for `readers` threads, in file
    /// order. With `None`, every verbatim read is a whole window of `chunk`
    /// bytes from a multiple of `chunk` (the last one of a segment may be
    /// shorter).
    ///
    /// Guided sizes: each verbatim read is about the bytes still to be read
    /// divided by `2 × readers`, at most `chunk` and at least [`MIN_JOB`] (or
    /// `chunk` if smaller). Readers take jobs in order, so reads are large
    /// while there is much left and shrink near the end; the last round
    /// of reads then ends at about the same time for every reader instead
    /// of a few large reads finishing alone at a shallow queue (measured on
    /// the GPU machine: 36 reads of 32 MiB on 32 readers left the disk
    /// 10-20 % below its rate for a 1.2 GB model).
    ///
    /// Encoded tensors are read in windows of whole chunks, guided like the
    /// verbatim reads by stored bytes (up to `chunk`, more when a single
    /// chunk is larger) and at most twice `chunk` decoded: stored bytes
    /// read at the verbatim reads' size (a bf16 window decodes to about 1.5
    /// times its stored size), while the one buffer that holds a decoded
    /// window (a worker's, when the CPU decodes for a GPU) stays bounded. A
    /// window spans consecutive tensors whose chunks follow each other in
    /// the file and in the destination, small gaps apart
    /// (`chunks_join`).
    pub fn jobs(&self, chunk: u64, readers: Option<usize>) -> Vec<Job> {
        self.jobs_where(chunk, readers, |_| true)
    }

    /// Whether chunk `b` (of the next tensor) may share a read window with
    /// chunk `a`: it starts at most [`MERGE_GAP`] bytes after `a` ends, in
    /// the file (padding, read and skipped) and in the destination (a gap
    /// the window's sinks do not write: [`crate::decode::job_dest_runs`]).
    fn chunks_join(&self, a: usize, b: usize) -> bool {
        let (a, b) = (&self.chunks[a], &self.chunks[b]);
        let follows = |a_end: u64, b_start: u64| b_start >= a_end && b_start - a_end <= MERGE_GAP;
        follows(a.file_offset + a.stored_len, b.file_offset)
            && follows(a.dest_offset + a.decoded_len, b.dest_offset)
    }

    /// As [`jobs`](Self::jobs), for file `file` alone (the guided sizes
    /// shrink towards the end of that file).
    pub fn jobs_of_file(&self, file: usize, chunk: u64, readers: Option<usize>) -> Vec<Job> {
        self.jobs_where(chunk, readers, |f| f == file)
    }

    fn jobs_where(
        &self,
        chunk: u64,
        readers: Option<usize>,
        in_file: impl Fn(usize) -> bool,
    ) -> Vec<Job> {
        let chunk = align_up(chunk.max(ALIGN), ALIGN);
        let floor = match readers {
            Some(_) => MIN_JOB.min(chunk),
            None => chunk,
        };
        let divisor = 2 * readers.unwrap_or(1).max(1) as u64;
        let segments = || self.segments.iter().filter(|s| in_file(s.file));
        let encoded: Vec<&EncodedTensor> =
            self.encoded.iter().filter(|t| in_file(t.file)).collect();
        // Bytes still to hand out (guided sizes shrink with it), verbatim
        // segments first, then encoded windows.
        let mut remaining: u64 = segments()
            .map(|s| align_up(s.file_offset + s.len, ALIGN) - align_down(s.file_offset))
            .chain(encoded.iter().map(|t| {
                align_up(t.file_offset + t.stored_length, ALIGN) - align_down(t.file_offset)
            }))
            .sum();
        let mut jobs = Vec::new();
        for s in segments() {
            let start = align_down(s.file_offset);
            let end = align_up(s.file_offset + s.len, ALIGN);
            let lead = s.file_offset - start;
            let mut off = start;
            while off < end {
                let guided = align_up(remaining / divisor, ALIGN).clamp(floor, chunk);
                let len = guided.min(end - off);
                jobs.push(Job {
                    file: s.file,
                    file_offset: off,
                    len,
                    image_offset: s.image_offset - lead + (off - start),
                    dest_offset: s.dest_offset - lead + (off - start),
                    buffered: false,
                    chunks: (0, 0),
                });
                off += len;
                remaining = remaining.saturating_sub(len);
            }
        }
        let mut next = 0;
        while next < encoded.len() {
            // A run of tensors whose chunks follow each other in the file and
            // in the destination shares windows: a model of many small
            // tensors (a 0.6B's are 2-6 MiB stored) would otherwise be read
            // in pieces of one tensor each, far below the disk's rate.
            let t = encoded[next];
            let mut end = t.first_chunk + t.chunk_count;
            next += 1;
            while let Some(u) = encoded.get(next) {
                let adjacent = u.file == t.file
                    && u.first_chunk == end
                    && (u.chunk_count == 0
                        || end == t.first_chunk
                        || self.chunks_join(end - 1, end));
                if !adjacent {
                    break;
                }
                end += u.chunk_count;
                next += 1;
            }
            let mut first = t.first_chunk;
            while first < end {
                let limit = align_up(remaining / divisor, ALIGN).clamp(floor, chunk);
                let start = align_down(self.chunks[first].file_offset);
                let mut last = first + 1;
                let decoded_start = self.chunks[first].dest_offset;
                while last < end {
                    let c = &self.chunks[last];
                    if align_up(c.file_offset + c.stored_len, ALIGN) - start > limit
                        || c.dest_offset + c.decoded_len - decoded_start > 2 * chunk
                    {
                        break;
                    }
                    last += 1;
                }
                let c = &self.chunks[last - 1];
                let len = align_up(c.file_offset + c.stored_len, ALIGN) - start;
                let f = &self.chunks[first];
                jobs.push(Job {
                    file: t.file,
                    file_offset: start,
                    len,
                    image_offset: f.image_offset - (f.file_offset - start),
                    dest_offset: 0,
                    buffered: false,
                    chunks: (first as u32, last as u32),
                });
                remaining = remaining.saturating_sub(len);
                first = last;
            }
        }
        if !self.encoded.is_empty() {
            jobs.sort_by_key(|j| (j.file, j.file_offset));
        }
        jobs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceFile;

    fn plan(sizes: &[u64]) -> LoadPlan {
        let files: Vec<SourceFile> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| SourceFile {
                path: format!("f{i}").into(),
                len,
            })
            .collect();
        LoadPlan::whole_files(&files)
    }

    /// Jobs cover every aligned byte once, in order, aligned, within `chunk`.
    fn check_cover(p: &LoadPlan, jobs: &[Job], chunk: u64) {
        let mut at = std::collections::HashMap::<usize, u64>::new();
        for j in jobs {
            assert_eq!(j.file_offset % ALIGN, 0);
            assert_eq!(j.dest_offset % ALIGN, j.file_offset % ALIGN);
            assert!(j.len > 0 && j.len <= chunk, "{j:?}");
            let next = at.entry(j.file).or_insert(0);
            assert_eq!(*next, j.file_offset, "gap or overlap at {j:?}");
            *next += j.len;
        }
        for s in &p.segments {
            assert_eq!(at[&s.file], align_up(s.len, ALIGN));
        }
    }

    #[test]
    fn guided_jobs_cover_and_shrink_near_the_end() {
        let mib = 1u64 << 20;
        let p = plan(&[1200 * mib + 123, 5 * mib]);
        let jobs = p.jobs(32 * mib, Some(32));
        check_cover(&p, &jobs, 32 * mib);
        // Large while much is left: the first read is the largest...
        assert!(jobs.iter().all(|j| j.len <= jobs[0].len));
        assert!(jobs[0].len >= 16 * mib);
        assert_eq!(p.jobs(32 * mib, Some(4))[0].len, 32 * mib);
        // Fixed windows: whole chunks from multiples of the chunk.
        let fixed = p.jobs(32 * mib, None);
        check_cover(&p, &fixed, 32 * mib);
        assert!(fixed.iter().all(|j| j.file_offset % (32 * mib) == 0));
        assert_eq!(fixed.len(), 38 + 1);
        // ...and the last round (one job per reader) is small.
        let tail: u64 = jobs.iter().rev().take(32).map(|j| j.len).sum();
        assert!(tail <= 32 * 4 * mib + 5 * mib, "tail of {tail} bytes");
        // Sizes never grow within a file (readers take jobs in order).
        for w in jobs.windows(2) {
            if w[0].file == w[1].file && w[1].file_offset + w[1].len < p.files[w[1].file].len {
                assert!(w[1].len <= w[0].len, "{:?} then {:?}", w[0], w[1]);
            }
        }
    }

    #[test]
    fn small_chunks_and_one_reader_stay_exact() {
        let p = plan(&[10_000, 0, 3 * 4096]);
        for (chunk, readers) in [
            (4096, Some(1)),
            (8192, Some(3)),
            (1 << 30, Some(64)),
            (8192, None),
        ] {
            let jobs = p.jobs(chunk, readers);
            check_cover(&p, &jobs, align_up(chunk, ALIGN));
        }
    }

    #[test]
    fn device_alignment_moves_segments_and_their_tensors() {
        let mib = 1u64 << 20;
        // Two files whose data start at odd offsets (header lengths).
        let files = vec![
            SourceFile {
                path: "a".into(),
                len: 8 + 1234 + 3 * mib,
            },
            SourceFile {
                path: "b".into(),
                len: 8 + 77 + mib,
            },
        ];
        let seg = |file, file_offset, len, dest_offset| Segment {
            file,
            file_offset,
            len,
            image_offset: dest_offset,
            dest_offset,
        };
        let view = |name: &str, offset, length| TensorView {
            name: name.into(),
            dtype: DType::BF16,
            shape: vec![length / 2],
            offset,
            length,
        };
        // As LoadPlan::new places them: congruent with the files.
        let a0 = 1242u64;
        let b0 = align_up(a0 + 3 * mib, ALIGN) + 85;
        let p = LoadPlan {
            files,
            segments: vec![seg(0, 1242, 3 * mib, a0), seg(1, 85, mib, b0)],
            tensors: vec![
                view("x", a0, 2 * mib),
                view("y", a0 + 2 * mib, mib),
                view("z", b0, mib),
                view("alias", b0, mib),
                view("empty", 0, 0),
            ],
            dest_len: b0 - 85 + align_up(85 + mib, ALIGN),
            image_len: b0 - 85 + align_up(85 + mib, ALIGN),
            encoded: Vec::new(),
            chunks: Vec::new(),
        };
        let before = p.clone();
        let q = p.aligned_for_device(256);
        for t in q.tensors.iter().filter(|t| t.length > 0) {
            assert_eq!(t.offset % 256, 0, "{t:?}");
            assert!(t.offset + t.length <= q.dest_len);
        }
        // Within a segment, tensors keep their distances.
        assert_eq!(q.tensors[1].offset - q.tensors[0].offset, 2 * mib);
        assert_eq!(q.tensors[2].offset, q.tensors[3].offset);
        // The jobs still cover each file once, and their destination
        // windows neither overlap nor leave the allocation.
        let jobs = q.jobs(mib, Some(2));
        let mut windows: Vec<(u64, u64)> = jobs
            .iter()
            .map(|j| (j.dest_offset, j.dest_offset + j.len))
            .collect();
        windows.sort_unstable();
        assert!(windows.windows(2).all(|w| w[0].1 <= w[1].0));
        assert!(windows.last().is_some_and(|w| w.1 <= q.dest_len));
        for (s, old) in q.segments.iter().zip(&before.segments) {
            assert_eq!(s.dest_offset % 256, 0);
            let j = jobs
                .iter()
                .find(|j| j.file == s.file && j.file_offset == align_down(s.file_offset))
                .expect("a job starts each segment");
            // The byte at s.file_offset lands at s.dest_offset.
            assert_eq!(
                j.dest_offset + (s.file_offset - j.file_offset),
                s.dest_offset
            );
            assert_eq!(s.len, old.len);
        }
    }

    /// One encoded tensor of [`encoded_plan`]: its file, `(stored, decoded)`
    /// bytes per chunk, and the gaps before it in the file and destination.
    type Laid = (usize, Vec<(u64, u64)>, u64, u64);

    /// A plan of encoded tensors only, laid out in order.
    fn encoded_plan(tensors: &[Laid]) -> LoadPlan {
        let (mut file_at, mut dest_at) = (vec![0u64; 2], 0u64);
        let (mut encoded, mut chunks) = (Vec::new(), Vec::new());
        for (i, (file, sizes, file_gap, dest_gap)) in tensors.iter().enumerate() {
            file_at[*file] += file_gap;
            dest_at += dest_gap;
            let first_chunk = chunks.len();
            let (f0, d0) = (file_at[*file], dest_at);
            for (k, &(stored, decoded)) in sizes.iter().enumerate() {
                chunks.push(PlannedChunk {
                    tensor: i as u32,
                    index: k as u32,
                    codec: ChunkCodec::Rans,
                    file_offset: file_at[*file],
                    stored_len: stored,
                    image_offset: file_at[*file],
                    dest_offset: dest_at,
                    decoded_len: decoded,
                });
                file_at[*file] += stored;
                dest_at += decoded;
            }
            encoded.push(EncodedTensor {
                name: format!("t{i}"),
                layout: ElementLayout::Bf16,
                file: *file,
                file_offset: f0,
                stored_length: file_at[*file] - f0,
                image_offset: f0,
                dest_offset: d0,
                length: dest_at - d0,
                first_chunk,
                chunk_count: sizes.len(),
            });
        }
        LoadPlan {
            files: file_at
                .iter()
                .enumerate()
                .map(|(i, &len)| SourceFile {
                    path: format!("f{i}").into(),
                    len,
                })
                .collect(),
            segments: Vec::new(),
            tensors: Vec::new(),
            dest_len: dest_at,
            image_len: file_at.iter().sum(),
            encoded,
            chunks,
        }
    }

    #[test]
    fn encoded_windows_span_tensors_that_follow_each_other() {
        let kib = 1u64 << 10;
        let c = (84 * kib, 128 * kib); // one chunk: stored, decoded
        let small = vec![c; 3];
        let p = encoded_plan(&[
            (0, small.clone(), 0, 0),
            // Padding between, in the file and the destination: joined.
            (0, small.clone(), 4 * kib, 2 * kib),
            (0, small.clone(), 0, 0),
            // Too far in the file: a window of its own.
            (0, small.clone(), MERGE_GAP + 1, 0),
            // Another file: a window of its own.
            (1, small.clone(), 0, 0),
        ]);
        let mib = 1u64 << 20;
        let jobs = p.jobs(32 * mib, Some(2));
        let tensors_of = |j: &Job| -> Vec<u32> {
            let mut t: Vec<u32> = p.chunks[j.chunks.0 as usize..j.chunks.1 as usize]
                .iter()
                .map(|c| c.tensor)
                .collect();
            t.dedup();
            t
        };
        let spans: Vec<Vec<u32>> = jobs.iter().map(tensors_of).collect();
        assert_eq!(spans, vec![vec![0, 1, 2], vec![3], vec![4]], "{jobs:?}");
        // Every chunk once, in order; each window within the limits.
        let mut next = 0u32;
        for j in &jobs {
            assert_eq!(j.chunks.0, next, "{j:?}");
            next = j.chunks.1;
            let first = &p.chunks[j.chunks.0 as usize];
            let last = &p.chunks[j.chunks.1 as usize - 1];
            assert!(j.file_offset <= first.file_offset);
            assert!(j.file_offset + j.len >= last.file_offset + last.stored_len);
            assert!(j.len <= 32 * mib);
        }
        assert_eq!(next as usize, p.chunks.len());
        // A window's destination: its chunks' bytes, the gap left out.
        let runs = crate::decode::job_dest_runs(&p, &jobs[0]);
        let t1 = &p.encoded[1];
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert_eq!(runs[0], 0..3 * c.1);
        assert_eq!(
            runs[1],
            t1.dest_offset..p.encoded[2].dest_offset + p.encoded[2].length
        );
        // Small windows still cut a run: never more than the chunk size.
        let narrow = p.jobs(256 * kib, Some(2));
        assert!(narrow.len() > jobs.len());
        assert!(narrow.iter().all(|j| j.len <= 256 * kib), "{narrow:?}");
    }
}
