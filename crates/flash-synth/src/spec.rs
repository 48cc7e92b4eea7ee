//! Model shapes: the presets (real Hugging Face configs), the tensor list in
//! Hugging Face order, parameter counts and the `config.json` /
//! `generation_config.json` they imply. The dimensions and their checks are
//! flash-format's [`DecoderShape`], the type the inference engine reads
//! from `config.json` too.

use crate::tokenizer;
use crate::SynthError;
use flash_format::safetensors::TensorSpec;
use flash_format::{DType, DecoderShape};
use serde_json::{json, Value};
use std::fmt;
use std::str::FromStr;

/// The model families `flash synth` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    /// Qwen3 dense decoders (`Qwen3ForCausalLM`).
    Qwen3,
    /// Llama 3.x decoders (`LlamaForCausalLM`).
    Llama,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Qwen3, Arch::Llama];

    /// The canonical name (`"qwen3"`, `"llama"`), the one [`FromStr`] takes.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Qwen3 => "qwen3",
            Arch::Llama => "llama",
        }
    }

    /// Preset sizes, smallest first (`tiny` is a test model of a few
    /// hundred kilobytes).
    pub fn sizes(self) -> &'static [&'static str] {
        match self {
            Arch::Qwen3 => &["tiny", "0.6b", "1.7b", "4b", "8b", "14b", "32b"],
            Arch::Llama => &["tiny", "1b", "8b"],
        }
    }

    /// The `model_type` of `config.json`.
    pub fn model_type(self) -> &'static str {
        self.name()
    }

    /// The `architectures[0]` of `config.json`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Llama => "LlamaForCausalLM",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = SynthError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "qwen3" => Ok(Arch::Qwen3),
            "llama" | "llama3" => Ok(Arch::Llama),
            _ => Err(SynthError::UnknownArch {
                name: s.to_string(),
            }),
        }
    }
}

/// Llama 3 frequency-dependent RoPE scaling (`rope_type: "llama3"`).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: u64,
}

impl RopeScaling {
    fn to_json(&self) -> Value {
        json!({
            "factor": self.factor,
            "high_freq_factor": self.high_freq_factor,
            "low_freq_factor": self.low_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "rope_type": "llama3",
        })
    }
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Normal with mean 0 and this standard deviation (linear layers,
    /// embeddings).
    Normal { std: f32 },
    /// All ones (RMSNorm weights, as `from_config` initializes them).
    Ones,
}

/// One tensor of the checkpoint: its safetensors spec and how to fill it.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthTensor {
    pub spec: TensorSpec,
    pub init: Init,
}

impl SynthTensor {
    pub fn elements(&self) -> u64 {
        self.spec.shape.iter().product()
    }
    pub fn bytes(&self) -> u64 {
        self.spec.dtype.byte_len(&self.spec.shape).unwrap_or(0)
    }
}

/// A decoder to synthesize: its shape and the other fields of its Hugging
/// Face `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub arch: Arch,
    /// Preset name (`"8b"`, `"tiny"`, ...).
    pub size: String,
    /// The Hugging Face repository whose config this preset copies, if any.
    pub reference: Option<String>,
    /// The dimensions (and whether the LM head is the embedding).
    pub shape: DecoderShape,
    pub max_position_embeddings: u64,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// Llama 3 RoPE scaling; `None` writes `"rope_scaling": null`.
    pub rope_scaling: Option<RopeScaling>,
    /// `initializer_range`: the standard deviation of the random weights.
    pub initializer_range: f64,
}

/// Every preset, `(arch, size)`, in the order `flash synth --help` lists them.
pub fn presets() -> Vec<(Arch, &'static str)> {
    Arch::ALL
        .iter()
        .flat_map(|&a| a.sizes().iter().map(move |&s| (a, s)))
        .collect()
}

/// The preset `size` of `arch`. Sizes are case-insensitive (`"8B"` works).
pub fn spec(arch: Arch, size: &str) -> Result<ModelSpec, SynthError> {
    let lower = size.to_ascii_lowercase();
    let found = match arch {
        Arch::Qwen3 => qwen3(&lower),
        Arch::Llama => llama(&lower),
    };
    found.ok_or_else(|| SynthError::UnknownSize {
        arch,
        size: size.to_string(),
        valid: arch.sizes().join(", "),
    })
}

/// Hidden 64, 2 layers, 4 heads (2 KV) of 16: a checkpoint of about half a
/// megabyte whose vocabulary is exactly the synthetic tokenizer's.
const TINY: (usize, usize, usize, usize, usize, usize) = (64, 128, 2, 4, 2, 16);

fn qwen3(size: &str) -> Option<ModelSpec> {
    // (hidden, intermediate, layers, heads, kv heads, tied, repo)
    let (h, i, l, a, kv, tie, repo) = match size {
        "tiny" => {
            let (h, i, l, a, kv, _) = TINY;
            (h, i, l, a, kv, true, None)
        }
        "0.6b" => (1024, 3072, 28, 16, 8, true, Some("Qwen/Qwen3-0.6B")),
        "1.7b" => (2048, 6144, 28, 16, 8, true, Some("Qwen/Qwen3-1.7B")),
        "4b" => (2560, 9728, 36, 32, 8, true, Some("Qwen/Qwen3-4B")),
        "8b" => (4096, 12288, 36, 32, 8, false, Some("Qwen/Qwen3-8B")),
        "14b" => (5120, 17408, 40, 40, 8, false, Some("Qwen/Qwen3-14B")),
        "32b" => (5120, 25600, 64, 64, 8, false, Some("Qwen/Qwen3-32B")),
        _ => return None,
    };
    let tiny = repo.is_none();
    Some(ModelSpec {
        arch: Arch::Qwen3,
        size: size.to_string(),
        reference: repo.map(str::to_string),
        shape: DecoderShape {
            hidden_size: h,
            intermediate_size: i,
            num_hidden_layers: l,
            num_attention_heads: a,
            num_key_value_heads: kv,
            head_dim: if tiny { TINY.5 } else { 128 },
            vocab_size: if tiny {
                tokenizer::vocab_size(Arch::Qwen3) as usize
            } else {
                151_936
            },
            tie_word_embeddings: tie,
        },
        max_position_embeddings: 40_960,
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-6,
        rope_scaling: None,
        initializer_range: 0.02,
    })
}

fn llama(size: &str) -> Option<ModelSpec> {
    // (hidden, intermediate, layers, heads, kv heads, head_dim, tied, rope factor, repo)
    let (h, i, l, a, kv, hd, tie, factor, repo) = match size {
        "tiny" => {
            let (h, i, l, a, kv, hd) = TINY;
            (h, i, l, a, kv, hd, false, 32.0, None)
        }
        "1b" => (
            2048,
            8192,
            16,
            32,
            8,
            64,
            true,
            32.0,
            Some("meta-llama/Llama-3.2-1B-Instruct"),
        ),
        "8b" => (
            4096,
            14336,
            32,
            32,
            8,
            128,
            false,
            8.0,
            Some("meta-llama/Llama-3.1-8B-Instruct"),
        ),
        _ => return None,
    };
    Some(ModelSpec {
        arch: Arch::Llama,
        size: size.to_string(),
        reference: repo.map(str::to_string),
        shape: DecoderShape {
            hidden_size: h,
            intermediate_size: i,
            num_hidden_layers: l,
            num_attention_heads: a,
            num_key_value_heads: kv,
            head_dim: hd,
            vocab_size: if repo.is_none() {
                tokenizer::vocab_size(Arch::Llama) as usize
            } else {
                128_256
            },
            tie_word_embeddings: tie,
        },
        max_position_embeddings: 131_072,
        rope_theta: 500_000.0,
        rms_norm_eps: 1e-5,
        rope_scaling: Some(RopeScaling {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }),
        initializer_range: 0.02,
    })
}

fn torch_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::F32 => "float32",
        _ => "bfloat16",
    }
}

impl ModelSpec {
    /// `"qwen3-8b"`, `"llama-tiny"`.
    pub fn name(&self) -> String {
        format!("{}-{}", self.arch, self.size)
    }

    /// Checks the shape for things that would make a broken checkpoint:
    /// the shape's own checks ([`DecoderShape::validate`]) and a vocabulary
    /// that holds the synthetic tokenizer's tokens.
    pub fn validate(&self) -> Result<(), SynthError> {
        let bad = |why: String| SynthError::InvalidSpec {
            model: self.name(),
            why,
        };
        self.shape.validate().map_err(|e| bad(e.to_string()))?;
        let need = tokenizer::vocab_size(self.arch);
        if (self.shape.vocab_size as u64) < need {
            return Err(bad(format!(
                "vocab_size {} is smaller than the tokenizer's {need} tokens",
                self.shape.vocab_size
            )));
        }
        Ok(())
    }

    /// Every tensor, in the order of the Hugging Face state dict (which is
    /// the order `save_pretrained` shards in).
    pub fn tensors(&self, dtype: DType) -> Vec<SynthTensor> {
        let s = &self.shape;
        let (h, i, v) = (
            s.hidden_size as u64,
            s.intermediate_size as u64,
            s.vocab_size as u64,
        );
        let (q, kv, hd) = (s.q_dim() as u64, s.kv_dim() as u64, s.head_dim as u64);
        let std = self.initializer_range as f32;
        let mut out = Vec::new();
        let mut push = |name: String, shape: Vec<u64>, init: Init| {
            out.push(SynthTensor {
                spec: TensorSpec { name, dtype, shape },
                init,
            })
        };
        let normal = Init::Normal { std };
        push("model.embed_tokens.weight".into(), vec![v, h], normal);
        for n in 0..s.num_hidden_layers {
            let p = format!("model.layers.{n}");
            push(format!("{p}.self_attn.q_proj.weight"), vec![q, h], normal);
            push(format!("{p}.self_attn.k_proj.weight"), vec![kv, h], normal);
            push(format!("{p}.self_attn.v_proj.weight"), vec![kv, h], normal);
            push(format!("{p}.self_attn.o_proj.weight"), vec![h, q], normal);
            if self.arch == Arch::Qwen3 {
                push(format!("{p}.self_attn.q_norm.weight"), vec![hd], Init::Ones);
                push(format!("{p}.self_attn.k_norm.weight"), vec![hd], Init::Ones);
            }
            push(format!("{p}.mlp.gate_proj.weight"), vec![i, h], normal);
            push(format!("{p}.mlp.up_proj.weight"), vec![i, h], normal);
            push(format!("{p}.mlp.down_proj.weight"), vec![h, i], normal);
            push(format!("{p}.input_layernorm.weight"), vec![h], Init::Ones);
            push(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                Init::Ones,
            );
        }
        push("model.norm.weight".into(), vec![h], Init::Ones);
        if !s.tie_word_embeddings {
            push("lm_head.weight".into(), vec![v, h], normal);
        }
        out
    }

    /// Parameters, counting a tied embedding once (as model cards do).
    pub fn param_count(&self) -> u64 {
        self.tensors(DType::BF16)
            .iter()
            .map(SynthTensor::elements)
            .sum()
    }

    /// Parameters outside the input embedding and the LM head (the
    /// "non-embedding" count of the Qwen3 model cards).
    pub fn non_embedding_param_count(&self) -> u64 {
        let s = &self.shape;
        let embed = (s.vocab_size * s.hidden_size) as u64;
        let heads = if s.tie_word_embeddings { 1 } else { 2 };
        self.param_count() - heads * embed
    }

    /// Bytes of tensor data at `dtype` (the index's `total_size`).
    pub fn data_bytes(&self, dtype: DType) -> u64 {
        self.tensors(dtype).iter().map(SynthTensor::bytes).sum()
    }

    /// `config.json`, as the reference model's, with the synthetic
    /// tokenizer's special token ids.
    pub fn config_json(&self, dtype: DType) -> Value {
        let ids = tokenizer::special_ids(self.arch);
        let eos: Value = match ids.config_eos.as_slice() {
            [one] => json!(one),
            many => json!(many),
        };
        let mut c = json!({
            "architectures": [self.arch.hf_class()],
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": ids.bos,
            "eos_token_id": eos,
            "head_dim": self.shape.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.shape.hidden_size,
            "initializer_range": self.initializer_range,
            "intermediate_size": self.shape.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": self.arch.model_type(),
            "num_attention_heads": self.shape.num_attention_heads,
            "num_hidden_layers": self.shape.num_hidden_layers,
            "num_key_value_heads": self.shape.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": self.rope_scaling.as_ref().map(RopeScaling::to_json),
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.shape.tie_word_embeddings,
            "torch_dtype": torch_dtype(dtype),
            "transformers_version": "4.51.0",
            "use_cache": true,
            "vocab_size": self.shape.vocab_size,
        });
        let obj = c.as_object_mut().expect("an object");
        match self.arch {
            Arch::Qwen3 => {
                obj.insert(
                    "max_window_layers".into(),
                    json!(self.shape.num_hidden_layers),
                );
                obj.insert("sliding_window".into(), Value::Null);
                obj.insert("use_sliding_window".into(), json!(false));
            }
            Arch::Llama => {
                obj.insert("mlp_bias".into(), json!(false));
                obj.insert("pretraining_tp".into(), json!(1));
            }
        }
        c
    }

    /// `generation_config.json`, with the reference model's sampling defaults.
    pub fn generation_config_json(&self) -> Value {
        let ids = tokenizer::special_ids(self.arch);
        let mut g = json!({
            "bos_token_id": ids.bos,
            "do_sample": true,
            "eos_token_id": ids.generation_eos,
            "transformers_version": "4.51.0",
        });
        let obj = g.as_object_mut().expect("an object");
        match self.arch {
            Arch::Qwen3 => {
                obj.insert("pad_token_id".into(), json!(ids.pad));
                obj.insert("temperature".into(), json!(0.6));
                obj.insert("top_k".into(), json!(20));
                obj.insert("top_p".into(), json!(0.95));
            }
            Arch::Llama => {
                obj.insert("temperature".into(), json!(0.6));
                obj.insert("top_p".into(), json!(0.9));
            }
        }
        g
    }
}
