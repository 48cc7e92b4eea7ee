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
    /// A host buffer could not be allocated: the call fails, the process
    /// goes on (buffers sized from a request are allocated fallibly).
    #[error("out of memory: {what} needs {bytes} bytes, which could not be allocated")]
    OutOfMemory { what: String, bytes: u64 },
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
    /// Whether the machine ran out of memory (host, or a GPU's: the CUDA
    /// driver's `CUDA_ERROR_OUT_OF_MEMORY` in a device error).
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            EngineError::OutOfMemory { .. } => true,
            EngineError::Device(m) => m.contains("OUT_OF_MEMORY") || m.contains("out of memory"),
            _ => false,
        }
    }

    pub(crate) fn tensor(name: impl Into<String>, why: impl Into<String>) -> Self {
        EngineError::Tensor {
            name: name.into(),
            why: why.into(),
        }
    }
}

/// Makes room for `additional` more values in `v` without aborting the
/// process when the allocator fails: the failure is an
/// [`EngineError::OutOfMemory`] naming `what`. `exact` reserves exactly
/// (a buffer sized once); otherwise the growth is amortized.
pub(crate) fn try_reserve<T>(
    v: &mut Vec<T>,
    additional: usize,
    exact: bool,
    what: &str,
) -> Result<(), EngineError> {
    let r = if exact {
        v.try_reserve_exact(additional)
    } else {
        v.try_reserve(additional)
    };
    r.map_err(|_| EngineError::OutOfMemory {
        what: what.to_string(),
        bytes: (v.len().saturating_add(additional) as u64)
            .saturating_mul(std::mem::size_of::<T>() as u64),
    })
}
