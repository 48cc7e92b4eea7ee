//! The flash format manifest (`model.flash.json`). `docs/FORMAT.md` is the
//! specification; this module is its reference implementation.

use crate::dtype::DType;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "model.flash.json";
pub const FORMAT_NAME: &str = "flash";
pub const FORMAT_VERSION: u32 = 1;
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
    /// Total bytes of the data files.
    pub fn data_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Number of tensor-parallel ranks.
    pub fn ranks(&self) -> u32 {
        self.files.iter().map(|f| f.rank + 1).max().unwrap_or(1)
    }

    /// Tensor count including aliases.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len() + self.aliases.len()
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
        if self.version != FORMAT_VERSION {
            return Err(format!(
                "format version {} is not supported (this build reads version {FORMAT_VERSION})",
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
        }
        let mut names = HashMap::with_capacity(self.tensors.len());
        let mut by_file: Vec<Vec<&TensorRecord>> = vec![Vec::new(); self.files.len()];
        for t in &self.tensors {
            if names.insert(t.name.as_str(), ()).is_some() {
                return Err(format!("tensor {:?} appears twice", t.name));
            }
            let file = self.files.get(t.file as usize).ok_or_else(|| {
                format!(
                    "tensor {:?} names data file #{} which does not exist",
                    t.name, t.file
                )
            })?;
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
            if t.offset
                .checked_add(t.length)
                .is_none_or(|end| end > file.size)
            {
                return Err(format!(
                    "tensor {:?}: bytes [{}, +{}) run past the end of {:?} ({} bytes)",
                    t.name, t.offset, t.length, file.name, file.size
                ));
            }
            by_file[t.file as usize].push(t);
        }
        for list in &mut by_file {
            list.sort_by_key(|t| (t.offset, t.length));
            for w in list.windows(2) {
                if w[0].length > 0 && w[1].length > 0 && w[0].offset + w[0].length > w[1].offset {
                    return Err(format!(
                        "tensors {:?} and {:?} overlap",
                        w[0].name, w[1].name
                    ));
                }
            }
        }
        for (alias, target) in &self.aliases {
            if names.contains_key(alias.as_str()) {
                return Err(format!("alias {alias:?} is also a stored tensor"));
            }
            if !names.contains_key(target.as_str()) {
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
}
