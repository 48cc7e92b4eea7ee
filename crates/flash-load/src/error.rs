use std::path::PathBuf;

/// Why a model could not be planned or loaded. Every variant names the file
/// or folder it concerns.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Safetensors(#[from] flash_format::safetensors::Error),
    #[error(transparent)]
    Manifest(#[from] flash_format::ManifestError),
    #[error("{}: {why}", path.display())]
    Model { path: PathBuf, why: String },
    #[error("{}: file ended at byte {got}, expected data up to byte {expected} (changed since it was planned?)", path.display())]
    Truncated {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    #[error("{}: tensor {tensor:?}, chunk {chunk}: {why}", path.display())]
    Decode {
        path: PathBuf,
        tensor: String,
        chunk: u32,
        why: String,
    },
    #[error("device: {0}")]
    Device(String),
}

impl LoadError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LoadError::Io {
            path: path.into(),
            source,
        }
    }
    pub fn model(path: impl Into<PathBuf>, why: impl Into<String>) -> Self {
        LoadError::Model {
            path: path.into(),
            why: why.into(),
        }
    }
}
