//! The model's shape and defaults, from Hugging Face's `config.json` and
//! (when present) `generation_config.json`. The shape itself (dimensions
//! and their checks) is flash-format's [`DecoderShape`], which the
//! synthesizer's presets share; this module adds what the engine needs
//! besides: the architecture, RoPE, norms, special tokens, sampling
//! defaults.

use crate::error::EngineError;
use crate::Result;
use flash_format::DecoderShape;
use serde_json::Value;
use std::ops::Deref;
use std::path::Path;

/// The decoder families the engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// `Qwen3ForCausalLM`: per-head RMSNorm of queries and keys
    /// (`q_norm`, `k_norm`), no projection biases.
    Qwen3,
    /// `LlamaForCausalLM` (Llama 2/3): no biases, optional Llama 3 RoPE scaling.
    Llama,
    /// `Qwen2ForCausalLM`: biases on the query, key and value projections.
    Qwen2,
}

impl Arch {
    /// The architectures this engine knows, as `config.json` names them.
    pub const CLASSES: [&'static str; 3] =
        ["Qwen3ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM"];

    pub fn from_class(class: &str) -> Option<Arch> {
        match class {
            "Qwen3ForCausalLM" => Some(Arch::Qwen3),
            "LlamaForCausalLM" => Some(Arch::Llama),
            "Qwen2ForCausalLM" => Some(Arch::Qwen2),
            _ => None,
        }
    }

    pub fn class(self) -> &'static str {
        match self {
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// Whether layers have `self_attn.q_norm` / `self_attn.k_norm`.
    pub fn has_qk_norm(self) -> bool {
        self == Arch::Qwen3
    }
}

/// RoPE frequency scaling (`rope_scaling` of `config.json`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Llama 3 (`rope_type: "llama3"`): long wavelengths divided by
    /// `factor`, short ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// `rope_type: "linear"`: every frequency divided by `factor`.
    Linear { factor: f64 },
}

/// Sampling defaults of `generation_config.json` (absent fields are `None`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationDefaults {
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    /// `eos_token_id` of `generation_config.json` (one id or a list).
    pub eos_token_ids: Vec<u32>,
}

/// What the engine needs to know of a model: its [`DecoderShape`] (whose
/// fields and helpers read through the config: `cfg.hidden_size`,
/// `cfg.q_dim()`) and the rest of `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    /// The dimensions, checked.
    pub shape: DecoderShape,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    /// Bias on the q/k/v projections (`attention_bias`; always for Qwen2).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation: `eos_token_id` of `config.json` and of
    /// `generation_config.json`, deduplicated, in that order.
    pub eos_token_ids: Vec<u32>,
    pub generation: GenerationDefaults,
}

/// A model config is its shape plus the rest: the shape's fields and
/// helpers are read through it.
impl Deref for ModelConfig {
    type Target = DecoderShape;

    fn deref(&self) -> &DecoderShape {
        &self.shape
    }
}

/// The token ids of a config field (`eos_token_id`: one id or a list).
/// Values that are not ids (strings, negative numbers) are left out, as
/// Hugging Face ignores them; an integer too large for a token id is an
/// error naming the field, not a smaller id by truncation.
fn ids(v: &Value, key: &str) -> std::result::Result<Vec<u32>, String> {
    let id = |x: &Value| match x.as_u64() {
        None => Ok(None),
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| format!("{key} {n} is not a token id (above 2^32 - 1)")),
    };
    match v.get(key) {
        Some(Value::Array(a)) => a.iter().filter_map(|x| id(x).transpose()).collect(),
        Some(x) => Ok(id(x)?.into_iter().collect()),
        None => Ok(Vec::new()),
    }
}

impl ModelConfig {
    /// Reads `dir/config.json` and, if present, `dir/generation_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(EngineError::config(
                &path,
                "missing: not a model folder (a Hugging Face config.json is expected)",
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
            path: path.clone(),
            source,
        })?;
        let mut cfg = Self::from_json_str(&text).map_err(|e| match e {
            EngineError::Invalid(why) => EngineError::config(&path, why),
            e => e,
        })?;
        let gpath = dir.join("generation_config.json");
        if gpath.is_file() {
            let text = std::fs::read_to_string(&gpath).map_err(|source| EngineError::Io {
                path: gpath.clone(),
                source,
            })?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| EngineError::config(&gpath, format!("not valid JSON: {e}")))?;
            cfg.set_generation(&v).map_err(|e| match e {
                EngineError::Invalid(why) => EngineError::config(&gpath, why),
                e => e,
            })?;
        }
        Ok(cfg)
    }

    /// Merges the fields of a `generation_config.json`. Its special token
    /// ids pass the same checks as `config.json`'s; errors are
    /// [`EngineError::Invalid`] ([`ModelConfig::from_dir`] adds the path).
    pub fn set_generation(&mut self, v: &Value) -> Result<()> {
        let bad = EngineError::Invalid;
        let f = |k: &str| v.get(k).and_then(Value::as_f64).map(|x| x as f32);
        let g = GenerationDefaults {
            do_sample: v.get("do_sample").and_then(Value::as_bool),
            temperature: f("temperature"),
            top_p: f("top_p"),
            top_k: v.get("top_k").and_then(Value::as_u64).map(|k| k as usize),
            repetition_penalty: f("repetition_penalty"),
            eos_token_ids: ids(v, "eos_token_id").map_err(bad)?,
        };
        for id in &g.eos_token_ids {
            if !self.eos_token_ids.contains(id) {
                self.eos_token_ids.push(*id);
            }
        }
        if self.bos_token_id.is_none() {
            self.bos_token_id = ids(v, "bos_token_id").map_err(bad)?.first().copied();
        }
        self.generation = g;
        self.check_special_tokens().map_err(bad)
    }

    /// Parses the text of a `config.json`. Errors are [`EngineError::Invalid`]
    /// ([`ModelConfig::from_dir`] adds the path).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let bad = |why: String| EngineError::Invalid(why);
        let v: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let class = v
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no \"architectures\" list".into()))?;
        let arch = Arch::from_class(class).ok_or_else(|| {
            bad(format!(
                "architecture {class:?} is not supported (the engine runs {})",
                Arch::CLASSES.join(", ")
            ))
        })?;
        let shape = DecoderShape::from_config_json(&v).map_err(|e| bad(e.to_string()))?;
        let rope_scaling = match v.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(rs) => parse_rope_scaling(rs).map_err(bad)?,
        };
        let cfg = ModelConfig {
            arch,
            shape,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta: v
                .get("rope_theta")
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|n| n as usize)
                .unwrap_or(4096),
            attention_bias: arch == Arch::Qwen2
                || v.get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            bos_token_id: ids(&v, "bos_token_id").map_err(bad)?.first().copied(),
            eos_token_ids: ids(&v, "eos_token_id").map_err(bad)?,
            generation: GenerationDefaults::default(),
        };
        cfg.check_special_tokens().map_err(bad)?;
        Ok(cfg)
    }

    /// The engine's own check beyond the shape's: every special token id
    /// lies inside the vocabulary.
    fn check_special_tokens(&self) -> Result<(), String> {
        if let Some(bad) = self
            .eos_token_ids
            .iter()
            .chain(self.bos_token_id.iter())
            .find(|&&id| id as usize >= self.vocab_size)
        {
            return Err(format!(
                "special token id {bad} is outside the vocabulary of {}",
                self.vocab_size
            ));
        }
        Ok(())
    }

    /// RoPE inverse frequencies (`head_dim / 2` of them), scaling applied,
    /// computed in f64 as Hugging Face's `_compute_*_parameters` do in f32.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            }) => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

fn parse_rope_scaling(rs: &Value) -> Result<Option<RopeScaling>, String> {
    let kind = rs
        .get("rope_type")
        .or_else(|| rs.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| {
        rs.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope_scaling ({kind}) lacks a numeric {k:?}"))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")?,
        })),
        "llama3" => {
            let s = RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            };
            if let RopeScaling::Llama3 {
                low_freq_factor,
                high_freq_factor,
                ..
            } = s
            {
                if high_freq_factor <= low_freq_factor {
                    return Err("rope_scaling: high_freq_factor must exceed low_freq_factor".into());
                }
            }
            Ok(Some(s))
        }
        other => Err(format!(
            "rope_scaling type {other:?} is not supported (default, linear, llama3)"
        )),
    }
}
