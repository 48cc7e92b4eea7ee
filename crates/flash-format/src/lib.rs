//! On-disk formats, as data: no threads, no device, no policy.
//!
//! - [`safetensors`]: a strict reader of the safetensors specification (every
//!   dtype, scalars, zero-size tensors, `__metadata__`, sharded indexes) and a
//!   streaming writer.
//! - [`manifest`]: the flash format's `model.flash.json` and its invariants.
//! - [`writer`]: streams tensors into aligned, checksummed flash data files.
//! - [`shape`]: the shape of a dense decoder as `config.json` states it and
//!   its checks, shared by the inference engine and the synthesizer.
//!
//! Invariant: anything these parsers accept is safe to plan reads from: every
//! byte range lies inside its file and matches its dtype and shape.

pub mod dtype;
pub mod manifest;
pub mod safetensors;
pub mod shape;
pub mod writer;

pub use dtype::DType;
pub use manifest::{Manifest, ManifestError, TensorRecord};
pub use shape::{DecoderShape, ShapeError};
