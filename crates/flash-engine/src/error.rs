//! Errors of the engine. Each names the file, tensor or value at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {why}", path.display())]
    Config { path: PathBuf, why: String },
    #[error("tensor {name:?}: {why}")]
    Tensor { name: String, why: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the context is full: {needed} positions needed, the model allows {max}")]
    ContextFull { needed: usize, max: usize },
    #[error("device: {0}")]
    Device(String),
    #[error(transparent)]
    Load(#[from] flash_load::LoadError),
}

impl EngineError {
    pub(crate) fn config(path: impl Into<PathBuf>, why: impl Into<String>) -> Self {
        EngineError::Config {
            path: path.into(),
            why: why.into(),
        }
    }
    pub(crate) fn tensor(name: impl Into<String>, why: impl Into<String>) -> Self {
        EngineError::Tensor {
            name: name.into(),
            why: why.into(),
        }
    }
}
