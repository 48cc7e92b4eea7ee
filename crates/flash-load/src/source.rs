//! What a model folder holds: the flash format or plain safetensors, opened
//! and validated, as one list of stored tensors.
//!
//! A flash model split into tensor-parallel ranks holds each name once per
//! rank; it is opened one rank at a time ([`ModelSource::open_rank`]), and
//! a rank then loads like any model.

use crate::error::LoadError;
use flash_format::manifest::{ChunkCodec, ElementLayout, Manifest, MANIFEST_FILE};
use flash_format::safetensors::{self, ShardIndex, INDEX_FILE};
use flash_format::DType;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A data file of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    pub path: PathBuf,
    pub len: u64,
}

/// A tensor whose bytes are stored in one of the source's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub file: usize,
    /// Absolute byte offset in the file.
    pub offset: u64,
    /// Bytes of the tensor (decoded, when it is stored encoded).
    pub length: u64,
    /// How the tensor is stored when not verbatim (flash format version 2).
    pub encoding: Option<StoredEncoding>,
}

/// An encoded tensor's chunks, as the planner needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEncoding {
    pub layout: ElementLayout,
    /// Bytes from `offset` to the end of the last chunk in the file.
    pub stored_length: u64,
    /// Per chunk: codec, offset of its stored bytes from the tensor's
    /// `offset`, stored length, decoded offset in the tensor, decoded length.
    pub chunks: Vec<StoredChunk>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredChunk {
    pub codec: ChunkCodec,
    pub stored_at: u64,
    pub stored_len: u64,
    pub decoded_at: u64,
    pub decoded_len: u64,
}

impl StoredTensor {
    /// Bytes the tensor occupies in its file.
    pub fn stored_length(&self) -> u64 {
        self.encoding
            .as_ref()
            .map_or(self.length, |e| e.stored_length)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Flash,
    Safetensors,
}

/// An opened model folder.
#[derive(Debug, Clone)]
pub struct ModelSource {
    pub dir: PathBuf,
    pub kind: SourceKind,
    pub files: Vec<SourceFile>,
    pub tensors: Vec<StoredTensor>,
    /// Alias name -> stored tensor name (tied weights stored once).
    pub aliases: BTreeMap<String, String>,
    /// The checkpoint's `__metadata__` (merged over shards).
    pub metadata: BTreeMap<String, String>,
    /// The manifest, for the flash format.
    pub manifest: Option<Manifest>,
}

impl ModelSource {
    /// Opens `dir`: the flash format when `model.flash.json` is there, else a
    /// sharded safetensors checkpoint through its index, else every
    /// `*.safetensors` file of the folder.
    ///
    /// A model of several tensor-parallel ranks is refused: its names repeat
    /// once per rank; open one with [`ModelSource::open_rank`].
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::model(dir, "not a folder"));
        }
        if dir.join(MANIFEST_FILE).is_file() {
            let manifest = Manifest::read(dir)?;
            let ranks = manifest.ranks();
            if ranks > 1 {
                return Err(LoadError::model(
                    dir,
                    format!(
                        "model {} is split into {ranks} tensor-parallel ranks (one per GPU): \
                         load one rank at a time (rank 0 to {})",
                        manifest.model_id,
                        ranks - 1
                    ),
                ));
            }
            Self::from_manifest(dir, manifest)
        } else {
            Self::open_safetensors(dir)
        }
    }

    /// Opens rank `rank` of the model in `dir`: its tensors only (the
    /// shards' names and shapes), in its own data files, so that
    /// [`LoadPlan::new`](crate::LoadPlan::new), `load_to_host`,
    /// `load_to_gpu` and `load_placed` load that rank as they load any
    /// model. `manifest` is the rank's view
    /// ([`Manifest::rank_view`]). Rank 0 of a model of one rank (or of a
    /// safetensors folder) is the whole model; any other rank that the
    /// model does not have is an error naming how many it has.
    pub fn open_rank(dir: &Path, rank: u32) -> Result<Self, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::model(dir, "not a folder"));
        }
        if !dir.join(MANIFEST_FILE).is_file() {
            if rank == 0 {
                return Self::open_safetensors(dir);
            }
            return Err(LoadError::model(
                dir,
                format!("a safetensors checkpoint has one rank (0), not rank {rank}"),
            ));
        }
        let manifest = Manifest::read(dir)?;
        let ranks = manifest.ranks();
        let view = manifest.rank_view(rank).ok_or_else(|| {
            LoadError::model(
                dir,
                format!(
                    "model {} has {ranks} tensor-parallel rank(s) (0 to {}), not rank {rank}",
                    manifest.model_id,
                    ranks - 1
                ),
            )
        })?;
        Self::from_manifest(dir, view)
    }

    /// How many tensor-parallel ranks the model in `dir` has (1 for a
    /// safetensors checkpoint or an unsharded flash model).
    pub fn ranks(dir: &Path) -> Result<u32, LoadError> {
        if dir.join(MANIFEST_FILE).is_file() {
            Ok(Manifest::read(dir)?.ranks())
        } else {
            Ok(1)
        }
    }

    /// A source over the files and tensors of `manifest` (one rank's).
    fn from_manifest(dir: &Path, manifest: Manifest) -> Result<Self, LoadError> {
        let mut files = Vec::with_capacity(manifest.files.len());
        for f in &manifest.files {
            let path = dir.join(&f.name);
            let len = std::fs::metadata(&path)
                .map_err(|e| LoadError::io(&path, e))?
                .len();
            if len != f.size {
                return Err(LoadError::model(
                    &path,
                    format!("data file is {len} bytes, the manifest says {}", f.size),
                ));
            }
            files.push(SourceFile { path, len });
        }
        let tensors = manifest
            .tensors
            .iter()
            .map(|t| StoredTensor {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                file: t.file as usize,
                offset: t.offset,
                length: t.length,
                encoding: t.encoding.as_ref().map(|e| {
                    let elem = t.dtype.bits() / 8;
                    StoredEncoding {
                        layout: e.layout,
                        stored_length: e.stored_length,
                        chunks: e
                            .spans(t.length / elem, elem)
                            .into_iter()
                            .zip(&e.chunks)
                            .map(|((stored_at, stored_len, decoded_at, decoded_len), c)| {
                                StoredChunk {
                                    codec: c.0,
                                    stored_at,
                                    stored_len,
                                    decoded_at,
                                    decoded_len,
                                }
                            })
                            .collect(),
                    }
                }),
            })
            .collect();
        Ok(ModelSource {
            dir: dir.to_path_buf(),
            kind: SourceKind::Flash,
            files,
            tensors,
            aliases: manifest.aliases.clone(),
            metadata: manifest.metadata.clone(),
            manifest: Some(manifest),
        })
    }

    fn open_safetensors(dir: &Path) -> Result<Self, LoadError> {
        let index_path = dir.join(INDEX_FILE);
        let index = if index_path.is_file() {
            Some(ShardIndex::read(&index_path)?)
        } else {
            None
        };
        let shard_names: Vec<String> = match &index {
            Some(index) => index.shards(),
            None => {
                let mut names = Vec::new();
                let rd = std::fs::read_dir(dir).map_err(|e| LoadError::io(dir, e))?;
                for entry in rd {
                    let entry = entry.map_err(|e| LoadError::io(dir, e))?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.ends_with(".safetensors") && entry.path().is_file() {
                        names.push(name);
                    }
                }
                names.sort();
                names
            }
        };
        if shard_names.is_empty() {
            return Err(LoadError::model(
                dir,
                "no model.flash.json, model.safetensors.index.json or *.safetensors file here",
            ));
        }
        let mut files = Vec::new();
        let mut tensors = Vec::new();
        let mut metadata = BTreeMap::new();
        let mut where_: HashMap<String, usize> = HashMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(LoadError::model(
                    &index_path,
                    format!("the index names shard {name:?}, which is missing"),
                ));
            }
            let header = safetensors::read_header(&path)?;
            let data_start = header.data_start();
            let len = data_start + header.data_len();
            metadata.extend(header.metadata);
            for t in header.tensors {
                if let Some(&other) = where_.get(&t.name) {
                    return Err(LoadError::model(
                        &path,
                        format!("tensor {:?} is also in {}", t.name, shard_names[other]),
                    ));
                }
                if let Some(index) = &index {
                    if index.weight_map.get(&t.name) != Some(name) {
                        return Err(LoadError::model(
                            &path,
                            format!(
                                "tensor {:?} is here but the index does not map it to this shard",
                                t.name
                            ),
                        ));
                    }
                }
                where_.insert(t.name.clone(), i);
                tensors.push(StoredTensor {
                    offset: data_start + t.begin,
                    length: t.end - t.begin,
                    name: t.name,
                    dtype: t.dtype,
                    shape: t.shape,
                    file: i,
                    encoding: None,
                });
            }
            files.push(SourceFile { path, len });
        }
        if let Some(index) = &index {
            if let Some(missing) = index.weight_map.keys().find(|k| !where_.contains_key(*k)) {
                return Err(LoadError::model(
                    &index_path,
                    format!(
                        "the index maps tensor {missing:?} to {:?}, which does not hold it",
                        index.weight_map[missing]
                    ),
                ));
            }
        }
        Ok(ModelSource {
            dir: dir.to_path_buf(),
            kind: SourceKind::Safetensors,
            files,
            tensors,
            aliases: BTreeMap::new(),
            metadata,
            manifest: None,
        })
    }

    /// Bytes of tensor data (aliases counted once; decoded sizes).
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.length).sum()
    }

    /// Whether any tensor is stored encoded.
    pub fn is_encoded(&self) -> bool {
        self.tensors.iter().any(|t| t.encoding.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flash_format::safetensors::{write_file, TensorSpec};

    #[test]
    fn a_safetensors_folder_has_rank_0_only() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TensorSpec {
            name: "w".into(),
            dtype: DType::U8,
            shape: vec![3],
        };
        write_file(
            &dir.path().join("model.safetensors"),
            &[(spec, &[1u8, 2, 3][..])],
            &Default::default(),
        )
        .unwrap();
        let whole = ModelSource::open(dir.path()).unwrap();
        let rank0 = ModelSource::open_rank(dir.path(), 0).unwrap();
        assert_eq!(rank0.tensors, whole.tensors);
        assert_eq!(ModelSource::ranks(dir.path()).unwrap(), 1);
        let e = ModelSource::open_rank(dir.path(), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("one rank (0), not rank 1"), "{e}");
    }
}
