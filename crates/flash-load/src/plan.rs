//! The read planner: which byte ranges of which files go where in the
//! destination memory.
//!
//! Invariants of a [`LoadPlan`] (the pipeline and the sinks rely on them):
//! - each segment's destination offset equals its file offset modulo
//!   [`ALIGN`], so an aligned window of the file maps to an aligned window of
//!   the destination, and O_DIRECT can read straight into either;
//! - the aligned windows of different segments never overlap in the
//!   destination, so workers can fill them concurrently;
//! - every selected tensor lies inside one segment.

use crate::error::LoadError;
use crate::source::{ModelSource, SourceFile};
use flash_format::manifest::align_up;
use flash_format::DType;
use std::collections::HashMap;

/// Alignment of windows in files and destination.
pub const ALIGN: u64 = 4096;

/// Gaps between selected tensors up to this size are read through rather than
/// skipped: one larger read beats two small ones.
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

/// A contiguous byte range of one file and where it lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub file: usize,
    pub file_offset: u64,
    pub len: u64,
    pub dest_offset: u64,
}

/// One read of the pipeline: an aligned window of a file and the aligned
/// destination window it fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    pub file: usize,
    pub file_offset: u64,
    /// Bytes to read; the file may end sooner (last window of a file).
    pub len: u64,
    pub dest_offset: u64,
    /// Set by the pipeline: the file is read through the page cache (it was
    /// found there), not with O_DIRECT.
    pub buffered: bool,
}

#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub files: Vec<SourceFile>,
    pub segments: Vec<Segment>,
    /// Selected tensors and aliases, in the order of the source.
    pub tensors: Vec<TensorView>,
    /// Size of the destination memory.
    pub dest_len: u64,
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

        // Stored tensors with bytes, in file order.
        let mut order: Vec<usize> = (0..source.tensors.len())
            .filter(|&i| chosen[i] && source.tensors[i].length > 0)
            .collect();
        order.sort_by_key(|&i| (source.tensors[i].file, source.tensors[i].offset));

        let mut segments: Vec<Segment> = Vec::new();
        let mut seg_of = vec![usize::MAX; source.tensors.len()];
        for &i in &order {
            let t = &source.tensors[i];
            let end = t.offset + t.length;
            match segments.last_mut() {
                Some(s) if s.file == t.file && t.offset <= s.file_offset + s.len + MERGE_GAP => {
                    s.len = s.len.max(end - s.file_offset);
                }
                _ => segments.push(Segment {
                    file: t.file,
                    file_offset: t.offset,
                    len: t.length,
                    dest_offset: 0,
                }),
            }
            seg_of[i] = segments.len() - 1;
        }
        // Destination: each segment's aligned window after the previous one,
        // keeping file and destination congruent modulo ALIGN.
        let mut cursor = 0u64;
        for s in &mut segments {
            let window_start = align_down(s.file_offset);
            s.dest_offset = cursor + (s.file_offset - window_start);
            cursor += align_up(s.file_offset + s.len, ALIGN) - window_start;
        }

        let mut tensors = Vec::new();
        let mut view_of = vec![None; source.tensors.len()];
        for (i, t) in source.tensors.iter().enumerate() {
            if !chosen[i] {
                continue;
            }
            let offset = match seg_of[i] {
                usize::MAX => 0, // zero-size tensor: no bytes anywhere
                s => segments[s].dest_offset + (t.offset - segments[s].file_offset),
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
            tensors,
            dest_len: cursor,
        })
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
                    dest_offset: cursor,
                };
                cursor += align_up(f.len, ALIGN);
                s
            })
            .collect();
        LoadPlan {
            files: files.to_vec(),
            segments,
            tensors: Vec::new(),
            dest_len: cursor,
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

    /// Splits the segments into aligned reads of at most `chunk` bytes
    /// (`chunk` is rounded up to [`ALIGN`]).
    pub fn jobs(&self, chunk: u64) -> Vec<Job> {
        let chunk = align_up(chunk.max(ALIGN), ALIGN);
        let mut jobs = Vec::new();
        for s in &self.segments {
            let start = align_down(s.file_offset);
            let end = align_up(s.file_offset + s.len, ALIGN);
            let dest_start = s.dest_offset - (s.file_offset - start);
            let mut off = start;
            while off < end {
                let len = chunk.min(end - off);
                jobs.push(Job {
                    file: s.file,
                    file_offset: off,
                    len,
                    dest_offset: dest_start + (off - start),
                    buffered: false,
                });
                off += len;
            }
        }
        jobs
    }
}
