use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Name(#[from] crate::name::NameError),
    #[error("model {0} is not in the store (see `flash list`)")]
    NotFound(String),
    #[error("model {0} is already in the store (use --force to replace it)")]
    Exists(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Load(#[from] flash_load::LoadError),
    #[error(transparent)]
    Format(#[from] flash_format::ManifestError),
    #[error(transparent)]
    Hub(#[from] flash_hub::HubError),
    #[error("{}: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
    /// A model that cannot be split into `tp` tensor-parallel ranks (see
    /// `tp`), refused before anything is written.
    #[error("cannot split {model} into {tp} tensor-parallel ranks: {why}")]
    Split { model: String, tp: u32, why: String },
}

impl StoreError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.into(),
            source,
        }
    }
    pub fn invalid(path: impl Into<PathBuf>, why: impl Into<String>) -> Self {
        StoreError::Invalid {
            path: path.into(),
            why: why.into(),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
