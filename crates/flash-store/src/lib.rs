//! The model store: where models live on disk and every operation on them.
//!
//! - [`name`]: `org/name[:revision]` names, refused when they could escape the store;
//! - [`store`]: import (safetensors folder -> flash format, with dtype
//!   conversion and tied-weight dedup), list, info, remove, verify, export;
//! - [`convert`]: bf16/fp16/fp32 conversion;
//! - [`encode`]: which tensors are stored compressed, and writing them;
//! - [`tp`]: how a model is split into tensor-parallel ranks at import.
//!
//! Crash safety: all writes go to `tmp/` and are renamed into `models/`.

pub mod convert;
pub mod encode;
pub mod error;
pub mod name;
pub mod pull;
pub mod store;
pub mod tp;

pub use convert::DtypeChoice;
pub use error::StoreError;
pub use name::{ModelName, RankedName};
pub use store::{
    nvidia_gpu_present, ImportOptions, ImportReport, ModelInfo, Store, StoreSettings, VerifyReport,
    SETTINGS_FILE,
};
