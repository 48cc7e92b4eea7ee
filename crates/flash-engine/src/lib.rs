//! The inference engine of flashtensors: dense decoder models (Qwen3,
//! Llama 3, Qwen2) on weights that flash-load put in memory.
//!
//! - [`config`]: `config.json` / `generation_config.json` as a [`ModelConfig`];
//! - [`weights`]: Hugging Face tensor names to layers ([`ModelTensors`]),
//!   every tensor checked for presence, shape and dtype;
//! - [`Backend`]: the forward pass behind a small trait (contract in
//!   [`backend`]), so the CPU reference and a GPU engine are interchangeable;
//! - [`cpu`]: [`CpuModel`], the f32 reference forward with a KV cache;
//! - [`sampling`], [`text`] (tokenizer, chat template, streaming decode) and
//!   [`generate`](mod@generate) (the loop: EOS, stop strings, max tokens).
//!
//! ```no_run
//! use flash_engine::*;
//! let dir = std::path::Path::new("/models/qwen3-0.6b");
//! let (mut model, _) = CpuModel::load(dir, &Default::default(), &CpuOptions::default())?;
//! let tok = TextTokenizer::from_dir(dir)?;
//! let text = tok.apply_chat_template(&[Message::new("user", "Hi")], true)?;
//! let prompt = tok.encode(&text, false)?;
//! let opts = GenerateOptions {
//!     max_tokens: 32,
//!     eos_token_ids: model.config().eos_token_ids.clone(),
//!     ..Default::default()
//! };
//! let out = generate(&mut model, &tok, &prompt, &opts, &mut |piece| {
//!     print!("{piece}");
//!     true
//! })?;
//! println!("\n{} tokens at {:.1} tokens/s", out.token_ids.len(), out.tokens_per_s());
//! # Ok::<(), EngineError>(())
//! ```
#![forbid(unsafe_code)]

pub mod backend;
pub mod config;
pub mod cpu;
pub mod error;
pub mod generate;
pub mod gpu;
pub mod sampling;
pub mod text;
pub mod weights;

pub use backend::Backend;
pub use config::{Arch, GenerationDefaults, ModelConfig, RopeScaling};
pub use cpu::{CpuModel, CpuOptions};
pub use error::EngineError;
pub use flash_format::DecoderShape;
pub use generate::{generate, FinishReason, GenerateOptions, Generation};
pub use gpu::{GpuEngine, GpuOptions, ENGINE_LIBRARY_BYTES, FUSED_MAX_TOKENS};
pub use sampling::{Sampler, SamplingParams, SamplingRequest};
pub use text::{Message, StreamDecoder, TextTokenizer};
pub use weights::ModelTensors;

/// `Result` with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
