//! The flash format manifest (`model.flash.json`). `docs/FORMAT.md` is the
//! specification; this module is its reference implementation.

use crate::dtype::DType;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "model.flash.json";
pub const FORMAT_NAME: &str = "flash";
/// The newest version this build reads and writes. Version 2 adds encoded
/// (compressed) tensors; a model without any is written as version 1, which
/// older readers accept.
pub const FORMAT_VERSION: u32 = 2;
/// The version of manifests without encoded tensors.
pub const PLAIN_FORMAT_VERSION: u32 = 1;
/// Encoded chunks start at multiples of this many bytes of their tensor's
/// stored bytes (GPU decoders read them with 16-byte loads).
pub const CHUNK_ALIGN: u64 = 16;
/// Every tensor starts at a multiple of this in its data file: enough for
/// O_DIRECT on 4 KiB-sector disks and for any GPU load instruction.
pub const ALIGNMENT: u64 = 4096;
/// Bytes covered by one checksum.
pub const DEFAULT_CHECKSUM_CHUNK: u64 = 16 << 20;
pub const CHECKSUM_ALGORITHM: &str = "xxh3-64";
/// Manifests larger than this are refused before parsing.
pub const MAX_MANIFEST_LEN: u64 = 256 << 20;

/// Rounds `x` up to a multiple of `align` (a power of two).
pub fn align_up(x: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (x + align - 1) & !(align - 1)
}

/// XXH3-64 (seed 0) of one checksum chunk, as the manifest stores it.
pub fn chunk_checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

pub fn checksum_hex(sum: u64) -> String {
    format!("{sum:016x}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Source {
    /// `hub`, `local`, `synth` or `dict`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksumSpec {
    pub algorithm: String,
    pub chunk_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFile {
    /// A plain file name inside the model folder.
    pub name: String,
    pub size: u64,
    /// Tensor-parallel rank whose tensors this file holds (0 when unsharded).
    #[serde(default)]
    pub rank: u32,
    /// One lowercase hex checksum per `chunk_size` bytes; the last chunk may be short.
    pub checksums: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorRecord {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Index into `files`.
    pub file: u32,
    pub offset: u64,
    pub length: u64,
    /// Lowercase hex XXH3-64 of the tensor's bytes, so a bad chunk can be
    /// narrowed to the tensors that are actually wrong.
    pub checksum: String,
    /// How the tensor's bytes are stored when not verbatim (version 2):
    /// `length` and `checksum` still describe the decoded bytes, and the
    /// stored bytes are `encoding.stored_length` bytes at `offset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<TensorEncoding>,
    /// In a model of several tensor-parallel ranks: the dimension this
    /// tensor was split along. Rank `r` of `n` holds the `r`-th of `n` equal
    /// contiguous parts along it, and `shape` is the part's shape. `None`:
    /// the tensor is whole in every rank (replicated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_dim: Option<u32>,
}

/// How the fields of each element are split for coding (see flash-codec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElementLayout {
    /// bf16: the 8 exponent bits coded, sign and 7 mantissa bits raw.
    Bf16,
    /// f16: the high byte coded, the low byte raw.
    F16,
    /// f32: the 8 exponent bits coded, sign and 23 mantissa bits raw.
    F32,
}

impl ElementLayout {
    /// The dtype whose elements this layout splits.
    pub fn dtype(self) -> DType {
        match self {
            ElementLayout::Bf16 => DType::BF16,
            ElementLayout::F16 => DType::F16,
            ElementLayout::F32 => DType::F32,
        }
    }

    /// The layout for elements of `dtype`, if it has one.
    pub fn for_dtype(dtype: DType) -> Option<Self> {
        match dtype {
            DType::BF16 => Some(ElementLayout::Bf16),
            DType::F16 => Some(ElementLayout::F16),
            DType::F32 => Some(ElementLayout::F32),
            _ => None,
        }
    }
}

/// How one chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkCodec {
    /// The decoded bytes verbatim.
    Raw,
    /// flash-codec's interleaved rANS stream (exponents coded, the rest raw).
    Rans,
}

/// One chunk of an encoded tensor: its codec, its stored length in bytes,
/// and the XXH3-64 of its decoded bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRecord(pub ChunkCodec, pub u64, pub String);

/// An encoded tensor's chunks. Chunk `i` holds elements
/// `[i * chunk_elems, min(n, (i + 1) * chunk_elems))`; its stored bytes start
/// at the tensor's `offset` for the first chunk and at the next multiple of
/// [`CHUNK_ALIGN`] after the previous chunk for the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEncoding {
    pub layout: ElementLayout,
    pub chunk_elems: u64,
    /// Bytes from `offset` to the end of the last chunk.
    pub stored_length: u64,
    pub chunks: Vec<ChunkRecord>,
}

impl TensorEncoding {
    /// `(offset from the tensor's first stored byte, stored length,
    /// decoded offset, decoded length)` of every chunk, for a tensor of
    /// `elems` elements of `elem_bytes` bytes.
    pub fn spans(&self, elems: u64, elem_bytes: u64) -> Vec<(u64, u64, u64, u64)> {
        let mut at = 0u64;
        let mut out = Vec::with_capacity(self.chunks.len());
        for (i, c) in self.chunks.iter().enumerate() {
            let first = i as u64 * self.chunk_elems;
            let n = self.chunk_elems.min(elems.saturating_sub(first));
            out.push((at, c.1, first * elem_bytes, n * elem_bytes));
            at = align_up(at + c.1, CHUNK_ALIGN);
        }
        out
    }

    /// Checks the chunk table against a tensor of `dtype` and `length`
    /// decoded bytes; returns why not.
    fn validate(&self, dtype: DType, length: u64) -> Result<(), String> {
        if self.layout.dtype() != dtype {
            return Err(format!(
                "layout {:?} does not split {dtype} elements",
                self.layout
            ));
        }
        if self.chunk_elems == 0 || self.chunk_elems > 1 << 24 {
            return Err(format!(
                "chunk_elems {} is not in 1..=16777216",
                self.chunk_elems
            ));
        }
        let elem_bytes = dtype.bits() / 8;
        let elems = length / elem_bytes;
        let want = elems.div_ceil(self.chunk_elems);
        if self.chunks.len() as u64 != want {
            return Err(format!(
                "{} chunks listed, {elems} elements in chunks of {} need {want}",
                self.chunks.len(),
                self.chunk_elems
            ));
        }
        let spans = self.spans(elems, elem_bytes);
        for (i, (c, &(_, stored, _, decoded))) in self.chunks.iter().zip(&spans).enumerate() {
            if c.2.len() != 16 || u64::from_str_radix(&c.2, 16).is_err() {
                return Err(format!("chunk {i} has a malformed checksum"));
            }
            let ok = match c.0 {
                ChunkCodec::Raw => stored == decoded,
                // A coded chunk never needs more than its decoded size plus
                // its header, table and padding.
                ChunkCodec::Rans => stored > 0 && stored <= decoded + 4096,
            };
            if !ok {
                return Err(format!(
                    "chunk {i}: {stored} stored bytes do not fit a {:?} chunk of {decoded} bytes",
                    c.0
                ));
            }
        }
        let end = spans.last().map_or(0, |&(at, stored, _, _)| at + stored);
        if end != self.stored_length {
            return Err(format!(
                "stored_length {} but the chunks end at {end}",
                self.stored_length
            ));
        }
        Ok(())
    }
}

impl TensorRecord {
    /// Bytes the tensor occupies in its data file.
    pub fn stored_length(&self) -> u64 {
        self.encoding
            .as_ref()
            .map_or(self.length, |e| e.stored_length)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub model_id: String,
    pub source: Source,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// The dtype holding most bytes (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<DType>,
    pub alignment: u64,
    pub checksum: ChecksumSpec,
    pub files: Vec<DataFile>,
    pub tensors: Vec<TensorRecord>,
    /// Names whose bytes are those of another tensor (tied weights), stored once.
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    /// The checkpoint's `__metadata__`, merged over its shards.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Other files of the model kept beside the data (config, tokenizer...).
    #[serde(default)]
    pub extra_files: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
}

/// True when `name` can be used as a file name inside a model folder.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

impl Manifest {
    /// Total bytes of the data files (what the model takes on disk).
    pub fn data_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Bytes of the stored tensors once decoded (aliases not counted).
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.length).sum()
    }

    /// Whether any tensor is stored encoded.
    pub fn is_encoded(&self) -> bool {
        self.tensors.iter().any(|t| t.encoding.is_some())
    }

    /// The version this manifest must be written as: 1 unless a tensor is
    /// encoded, so that plain models stay readable by older builds.
    pub fn required_version(&self) -> u32 {
        if self.is_encoded() {
            FORMAT_VERSION
        } else {
            PLAIN_FORMAT_VERSION
        }
    }

    /// Number of tensor-parallel ranks.
    pub fn ranks(&self) -> u32 {
        self.files
            .iter()
            .map(|f| f.rank.saturating_add(1))
            .max()
            .unwrap_or(1)
    }

    /// The rank whose data file holds tensor `t` (0 when the file index is
    /// out of range, which [`Manifest::validate`] refuses).
    pub fn rank_of(&self, t: &TensorRecord) -> u32 {
        self.files.get(t.file as usize).map_or(0, |f| f.rank)
    }

    /// Tensor names a load of one rank sees, aliases included (every rank
    /// holds the same names).
    pub fn tensor_count(&self) -> usize {
        let ranks = self.ranks() as usize;
        self.tensors.len() / ranks + self.aliases.len()
    }

    /// Rank `rank`'s part of the model as a manifest of its own: that
    /// rank's data files (their `rank` set to 0) and tensors (their `file`
    /// renumbered, `split_dim` dropped), the aliases and everything else
    /// unchanged. It describes the shard as an unsharded model: what a load
    /// of one rank reads. `None` when the model has no such rank.
    ///
    /// For a model of one rank, `rank_view(0)` is the manifest itself.
    pub fn rank_view(&self, rank: u32) -> Option<Manifest> {
        if rank >= self.ranks() {
            return None;
        }
        let mut renumber = vec![None; self.files.len()];
        let mut files = Vec::new();
        for (i, f) in self.files.iter().enumerate() {
            if f.rank == rank {
                renumber[i] = Some(files.len() as u32);
                files.push(DataFile {
                    rank: 0,
                    ..f.clone()
                });
            }
        }
        let tensors = self
            .tensors
            .iter()
            .filter_map(|t| {
                let file = (*renumber.get(t.file as usize)?)?;
                Some(TensorRecord {
                    file,
                    split_dim: None,
                    ..t.clone()
                })
            })
            .collect();
        Some(Manifest {
            files,
            tensors,
            ..self.clone()
        })
    }

    /// Reads and validates `dir/model.flash.json`.
    pub fn read(dir: &Path) -> Result<Self, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let io = |source| ManifestError::Io {
            path: path.clone(),
            source,
        };
        let len = std::fs::metadata(&path).map_err(io)?.len();
        if len > MAX_MANIFEST_LEN {
            return Err(ManifestError::Invalid {
                path,
                why: format!("manifest is {len} bytes, over the {MAX_MANIFEST_LEN} limit"),
            });
        }
        let bytes = std::fs::read(&path).map_err(io)?;
        Self::parse(&bytes).map_err(|why| ManifestError::Invalid { path, why })
    }

    /// Parses and validates manifest bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| format!("not a valid manifest: {e}"))?;
        m.validate()?;
        Ok(m)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain data")
    }

    /// Checks every invariant the loader relies on; the error names the
    /// offending tensor or file.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT_NAME {
            return Err(format!(
                "format is {:?}, expected {FORMAT_NAME:?}",
                self.format
            ));
        }
        if !(PLAIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&self.version) {
            return Err(format!(
                "format version {} is not supported (this build reads versions {PLAIN_FORMAT_VERSION} to {FORMAT_VERSION})",
                self.version
            ));
        }
        if self.version < FORMAT_VERSION && self.is_encoded() {
            return Err(format!(
                "version {} cannot hold encoded tensors (version {FORMAT_VERSION} can)",
                self.version
            ));
        }
        if !self.alignment.is_power_of_two() || self.alignment < 8 {
            return Err(format!(
                "alignment {} is not a power of two >= 8",
                self.alignment
            ));
        }
        if self.checksum.algorithm != CHECKSUM_ALGORITHM {
            return Err(format!(
                "unknown checksum algorithm {:?}",
                self.checksum.algorithm
            ));
        }
        if self.checksum.chunk_size == 0 || self.checksum.chunk_size % self.alignment != 0 {
            return Err(format!(
                "checksum chunk_size {} is not a positive multiple of the alignment",
                self.checksum.chunk_size
            ));
        }
        for f in &self.files {
            if !is_plain_file_name(&f.name) || f.name == MANIFEST_FILE {
                return Err(format!(
                    "data file name {:?} is not a plain file name",
                    f.name
                ));
            }
            let chunks = f.size.div_ceil(self.checksum.chunk_size);
            if f.checksums.len() as u64 != chunks {
                return Err(format!(
                    "data file {:?} has {} checksums, its size needs {chunks}",
                    f.name,
                    f.checksums.len()
                ));
            }
            if f.checksums
                .iter()
                .any(|c| u64::from_str_radix(c, 16).is_err() || c.len() != 16)
            {
                return Err(format!("data file {:?} has a malformed checksum", f.name));
            }
            // Each rank has a file of its own, so ranks are fewer than files.
            if f.rank as usize >= self.files.len() {
                return Err(format!(
                    "data file {:?} is of rank {} but the model has only {} data files",
                    f.name,
                    f.rank,
                    self.files.len()
                ));
            }
        }
        // Names are unique within a rank; every rank of a model split for
        // tensor parallelism holds the same names.
        let ranks = self.ranks();
        let mut names: HashMap<(u32, &str), &TensorRecord> =
            HashMap::with_capacity(self.tensors.len());
        let mut by_file: Vec<Vec<&TensorRecord>> = vec![Vec::new(); self.files.len()];
        for t in &self.tensors {
            let file = self.files.get(t.file as usize).ok_or_else(|| {
                format!(
                    "tensor {:?} names data file #{} which does not exist",
                    t.name, t.file
                )
            })?;
            if names.insert((file.rank, t.name.as_str()), t).is_some() {
                return Err(if ranks > 1 {
                    format!("tensor {:?} appears twice in rank {}", t.name, file.rank)
                } else {
                    format!("tensor {:?} appears twice", t.name)
                });
            }
            if t.checksum.len() != 16 || u64::from_str_radix(&t.checksum, 16).is_err() {
                return Err(format!("tensor {:?} has a malformed checksum", t.name));
            }
            if t.offset % self.alignment != 0 {
                return Err(format!(
                    "tensor {:?} offset {} is not aligned",
                    t.name, t.offset
                ));
            }
            if t.dtype.byte_len(&t.shape) != Some(t.length) {
                return Err(format!(
                    "tensor {:?}: length {} does not match shape {:?} of {}",
                    t.name, t.length, t.shape, t.dtype
                ));
            }
            if let Some(e) = &t.encoding {
                e.validate(t.dtype, t.length)
                    .map_err(|why| format!("tensor {:?}: encoding: {why}", t.name))?;
            }
            if let Some(d) = t.split_dim {
                if ranks < 2 {
                    return Err(format!(
                        "tensor {:?} has a split_dim but the model has one rank",
                        t.name
                    ));
                }
                if d as usize >= t.shape.len() {
                    return Err(format!(
                        "tensor {:?}: split_dim {d} but its shape {:?} has {} dimensions",
                        t.name,
                        t.shape,
                        t.shape.len()
                    ));
                }
            }
            if t.offset
                .checked_add(t.stored_length())
                .is_none_or(|end| end > file.size)
            {
                return Err(format!(
                    "tensor {:?}: bytes [{}, +{}) run past the end of {:?} ({} bytes)",
                    t.name,
                    t.offset,
                    t.stored_length(),
                    file.name,
                    file.size
                ));
            }
            by_file[t.file as usize].push(t);
        }
        if ranks > 1 {
            self.validate_ranks(ranks, &names)?;
        }
        for list in &mut by_file {
            list.sort_by_key(|t| (t.offset, t.stored_length()));
            for w in list.windows(2) {
                if w[0].stored_length() > 0
                    && w[1].stored_length() > 0
                    && w[0].offset + w[0].stored_length() > w[1].offset
                {
                    return Err(format!(
                        "tensors {:?} and {:?} overlap",
                        w[0].name, w[1].name
                    ));
                }
            }
        }
        // An alias stands in every rank for the target of that rank.
        for (alias, target) in &self.aliases {
            if names.contains_key(&(0, alias.as_str())) {
                return Err(format!("alias {alias:?} is also a stored tensor"));
            }
            if !names.contains_key(&(0, target.as_str())) {
                return Err(format!(
                    "alias {alias:?} points to {target:?}, which is not stored"
                ));
            }
        }
        for f in &self.extra_files {
            if !is_plain_file_name(f) {
                return Err(format!("extra file {f:?} is not a plain file name"));
            }
        }
        Ok(())
    }

    /// The rules of a model split into `ranks` tensor-parallel ranks: every
    /// rank has data files and the same tensor names, and a name has the
    /// same dtype, shape (the part's) and `split_dim` in every rank, so the
    /// whole tensor is the ranks' parts put back together.
    fn validate_ranks(
        &self,
        ranks: u32,
        names: &HashMap<(u32, &str), &TensorRecord>,
    ) -> Result<(), String> {
        let mut with_files = vec![false; ranks as usize];
        for f in &self.files {
            with_files[f.rank as usize] = true;
        }
        if let Some(r) = with_files.iter().position(|&has| !has) {
            return Err(format!(
                "the model has {ranks} ranks but rank {r} has no data file"
            ));
        }
        let mut per_rank = vec![0usize; ranks as usize];
        for &(rank, _) in names.keys() {
            per_rank[rank as usize] += 1;
        }
        for (&(rank, name), t) in names {
            if rank == 0 {
                continue;
            }
            let Some(first) = names.get(&(0, name)) else {
                return Err(format!(
                    "tensor {name:?} is in rank {rank} but not in rank 0"
                ));
            };
            if (t.dtype, &t.shape, t.split_dim) != (first.dtype, &first.shape, first.split_dim) {
                return Err(format!(
                    "tensor {name:?}: rank {rank} holds {} {:?} split along {:?}, rank 0 holds {} {:?} split along {:?}",
                    t.dtype, t.shape, t.split_dim, first.dtype, first.shape, first.split_dim
                ));
            }
        }
        // Every rank's names are among rank 0's; equal counts make them equal.
        if let Some(r) = per_rank.iter().position(|&n| n != per_rank[0]) {
            return Err(format!(
                "rank {r} holds {} tensors, rank 0 holds {}",
                per_rank[r], per_rank[0]
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model of `ranks` ranks, one data file each, holding tensors `a`
    /// (split along dim 0) and `n` (replicated), and an alias `b` of `a`.
    fn split_model(ranks: u32) -> Manifest {
        let mut files = Vec::new();
        let mut tensors = Vec::new();
        for r in 0..ranks {
            files.push(DataFile {
                name: format!("data-r{r}-00000.bin"),
                size: 8192,
                rank: r,
                checksums: vec![checksum_hex(0)],
            });
            for (i, (name, shape, split)) in [("a", vec![4u64, 8], Some(0)), ("n", vec![8], None)]
                .into_iter()
                .enumerate()
            {
                tensors.push(TensorRecord {
                    name: name.into(),
                    dtype: DType::BF16,
                    length: DType::BF16.byte_len(&shape).unwrap(),
                    shape,
                    file: r,
                    offset: i as u64 * ALIGNMENT,
                    checksum: checksum_hex(u64::from(r)),
                    encoding: None,
                    split_dim: split.filter(|_| ranks > 1),
                });
            }
        }
        Manifest {
            format: FORMAT_NAME.into(),
            version: PLAIN_FORMAT_VERSION,
            model_id: "t/split".into(),
            source: Source::default(),
            architecture: None,
            dtype: Some(DType::BF16),
            alignment: ALIGNMENT,
            checksum: ChecksumSpec {
                algorithm: CHECKSUM_ALGORITHM.into(),
                chunk_size: 16 * ALIGNMENT,
            },
            files,
            tensors,
            aliases: BTreeMap::from([("b".to_string(), "a".to_string())]),
            metadata: BTreeMap::new(),
            extra_files: Vec::new(),
        }
    }

    fn refused(m: &Manifest, words: &[&str]) {
        let e = m.validate().unwrap_err();
        for w in words {
            assert!(e.contains(w), "{e:?} lacks {w:?}");
        }
        assert!(Manifest::parse(m.to_json().as_bytes()).is_err());
    }

    #[test]
    fn names_repeat_once_per_rank() {
        let m = split_model(2);
        m.validate().unwrap();
        assert_eq!(m.ranks(), 2);
        assert_eq!(m.tensor_count(), 3, "a, n and the alias b, per rank");
        assert_eq!(Manifest::parse(m.to_json().as_bytes()).unwrap(), m);

        // Twice in one rank.
        let mut bad = m.clone();
        bad.tensors[1].name = "a".into();
        refused(&bad, &["\"a\" appears twice in rank 0"]);
        // Only in some ranks.
        let mut bad = m.clone();
        bad.tensors[3].name = "x".into();
        refused(&bad, &["\"x\" is in rank 1 but not in rank 0"]);
        let mut bad = m.clone();
        bad.tensors.pop();
        refused(&bad, &["rank 1 holds 1 tensors, rank 0 holds 2"]);
        // Parts that differ between ranks.
        let mut bad = m.clone();
        bad.tensors[2].shape = vec![2, 16];
        refused(&bad, &["\"a\": rank 1 holds BF16 [2, 16]"]);
        let mut bad = m.clone();
        bad.tensors[2].split_dim = Some(1);
        refused(&bad, &["split along Some(1)"]);
        // A split dimension the tensor does not have; a split in a model of
        // one rank.
        let mut bad = m.clone();
        bad.tensors[1].split_dim = Some(1);
        bad.tensors[3].split_dim = Some(1);
        refused(&bad, &["\"n\": split_dim 1", "1 dimensions"]);
        let mut one = split_model(1);
        one.tensors[0].split_dim = Some(0);
        refused(&one, &["one rank"]);
        // A rank without files; a rank number far past the files.
        let mut bad = split_model(3);
        bad.files[1].rank = 0;
        bad.tensors.retain(|t| t.file != 1);
        refused(&bad, &["rank 1 has no data file"]);
        let mut bad = m.clone();
        bad.files[1].rank = u32::MAX;
        refused(&bad, &["of rank 4294967295", "only 2 data files"]);
    }

    #[test]
    fn a_rank_view_is_a_model_of_its_own() {
        let m = split_model(3);
        for r in 0..3 {
            let v = m.rank_view(r).unwrap();
            v.validate().unwrap();
            assert_eq!(v.ranks(), 1);
            assert_eq!(v.files.len(), 1);
            assert_eq!(v.files[0].name, format!("data-r{r}-00000.bin"));
            assert_eq!(v.tensors.len(), 2);
            assert!(v
                .tensors
                .iter()
                .all(|t| t.file == 0 && t.split_dim.is_none()));
            assert_eq!(
                v.tensors[0].checksum,
                checksum_hex(u64::from(r)),
                "rank {r}'s own records"
            );
            assert_eq!(v.aliases, m.aliases);
        }
        assert!(m.rank_view(3).is_none());
        let one = split_model(1);
        assert_eq!(one.rank_view(0).unwrap(), one);
    }
}
