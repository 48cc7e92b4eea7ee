//! From Hugging Face tensor names to the parts of the decoder, checked
//! against the config: every expected tensor must exist with the right shape
//! and a float dtype (bf16, f16 or f32). Generic over what a tensor is (a
//! [`TensorView`] in loaded memory, an f32 vector on the CPU, a device
//! pointer on a GPU), so every backend resolves names the same way.

use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::Result;
use flash_format::DType;
use flash_load::TensorView;

/// The tensors of one decoder layer.
#[derive(Clone, Debug)]
pub struct LayerTensors<T> {
    /// `[q_dim, hidden]`
    pub q_proj: T,
    /// `[kv_dim, hidden]`
    pub k_proj: T,
    /// `[kv_dim, hidden]`
    pub v_proj: T,
    /// `[hidden, q_dim]`
    pub o_proj: T,
    /// `[q_dim]`, `[kv_dim]`, `[kv_dim]` when the config has attention biases (Qwen2).
    pub q_bias: Option<T>,
    pub k_bias: Option<T>,
    pub v_bias: Option<T>,
    /// `[head_dim]`, Qwen3 only.
    pub q_norm: Option<T>,
    pub k_norm: Option<T>,
    /// `[intermediate, hidden]`
    pub gate_proj: T,
    /// `[intermediate, hidden]`
    pub up_proj: T,
    /// `[hidden, intermediate]`
    pub down_proj: T,
    /// `[hidden]`
    pub input_layernorm: T,
    /// `[hidden]`
    pub post_attention_layernorm: T,
}

/// The tensors of the whole decoder.
#[derive(Clone, Debug)]
pub struct ModelTensors<T> {
    /// `[vocab, hidden]`
    pub embed_tokens: T,
    pub layers: Vec<LayerTensors<T>>,
    /// `[hidden]`
    pub norm: T,
    /// `[vocab, hidden]`; `None` when the embedding is tied (and no separate
    /// `lm_head.weight` is stored).
    pub lm_head: Option<T>,
}

fn opt<T, U>(
    x: &Option<T>,
    f: &mut impl FnMut(&str, &T) -> Result<U>,
    name: &str,
) -> Result<Option<U>> {
    x.as_ref().map(|t| f(name, t)).transpose()
}

impl<T> ModelTensors<T> {
    /// Converts every tensor with `f(hf_name, tensor)`.
    pub fn try_map<U>(&self, mut f: impl FnMut(&str, &T) -> Result<U>) -> Result<ModelTensors<U>> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for (n, l) in self.layers.iter().enumerate() {
            let p = |s: &str| format!("model.layers.{n}.{s}");
            layers.push(LayerTensors {
                q_proj: f(&p("self_attn.q_proj.weight"), &l.q_proj)?,
                k_proj: f(&p("self_attn.k_proj.weight"), &l.k_proj)?,
                v_proj: f(&p("self_attn.v_proj.weight"), &l.v_proj)?,
                o_proj: f(&p("self_attn.o_proj.weight"), &l.o_proj)?,
                q_bias: opt(&l.q_bias, &mut f, &p("self_attn.q_proj.bias"))?,
                k_bias: opt(&l.k_bias, &mut f, &p("self_attn.k_proj.bias"))?,
                v_bias: opt(&l.v_bias, &mut f, &p("self_attn.v_proj.bias"))?,
                q_norm: opt(&l.q_norm, &mut f, &p("self_attn.q_norm.weight"))?,
                k_norm: opt(&l.k_norm, &mut f, &p("self_attn.k_norm.weight"))?,
                gate_proj: f(&p("mlp.gate_proj.weight"), &l.gate_proj)?,
                up_proj: f(&p("mlp.up_proj.weight"), &l.up_proj)?,
                down_proj: f(&p("mlp.down_proj.weight"), &l.down_proj)?,
                input_layernorm: f(&p("input_layernorm.weight"), &l.input_layernorm)?,
                post_attention_layernorm: f(
                    &p("post_attention_layernorm.weight"),
                    &l.post_attention_layernorm,
                )?,
            });
        }
        Ok(ModelTensors {
            embed_tokens: f("model.embed_tokens.weight", &self.embed_tokens)?,
            layers,
            norm: f("model.norm.weight", &self.norm)?,
            lm_head: opt(&self.lm_head, &mut f, "lm_head.weight")?,
        })
    }

    /// The output projection: `lm_head`, or the embedding when tied.
    pub fn output(&self) -> &T {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }
}

/// The dtypes the engine reads weights in.
pub fn is_supported_dtype(d: DType) -> bool {
    matches!(d, DType::BF16 | DType::F16 | DType::F32)
}

impl ModelTensors<TensorView> {
    /// Finds and checks every tensor the config implies; `lookup` is the
    /// loaded model's name table (`HostModel::get`, `GpuModel::get`, ...).
    pub fn resolve<'a>(
        cfg: &ModelConfig,
        lookup: impl Fn(&str) -> Option<&'a TensorView>,
    ) -> Result<Self> {
        let h = cfg.hidden_size as u64;
        let q = cfg.q_dim() as u64;
        let kv = cfg.kv_dim() as u64;
        let i = cfg.intermediate_size as u64;
        let hd = cfg.head_dim as u64;
        let v = cfg.vocab_size as u64;
        let get = |name: &str, shape: &[u64]| -> Result<TensorView> {
            let t = lookup(name).ok_or_else(|| {
                EngineError::tensor(
                    name,
                    format!(
                        "missing (a {} checkpoint needs it, shape {shape:?})",
                        cfg.arch.class()
                    ),
                )
            })?;
            if t.shape != shape {
                return Err(EngineError::tensor(
                    name,
                    format!("shape {:?}, the config implies {shape:?}", t.shape),
                ));
            }
            if !is_supported_dtype(t.dtype) {
                return Err(EngineError::tensor(
                    name,
                    format!("dtype {} is not supported (bf16, f16, f32)", t.dtype),
                ));
            }
            Ok(t.clone())
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for n in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{n}.{s}");
            let bias = |s: &str, len: u64| -> Result<Option<TensorView>> {
                if cfg.attention_bias {
                    get(&p(s), &[len]).map(Some)
                } else {
                    Ok(None)
                }
            };
            let qk_norm = |s: &str| -> Result<Option<TensorView>> {
                if cfg.arch.has_qk_norm() {
                    get(&p(s), &[hd]).map(Some)
                } else {
                    Ok(None)
                }
            };
            layers.push(LayerTensors {
                q_proj: get(&p("self_attn.q_proj.weight"), &[q, h])?,
                k_proj: get(&p("self_attn.k_proj.weight"), &[kv, h])?,
                v_proj: get(&p("self_attn.v_proj.weight"), &[kv, h])?,
                o_proj: get(&p("self_attn.o_proj.weight"), &[h, q])?,
                q_bias: bias("self_attn.q_proj.bias", q)?,
                k_bias: bias("self_attn.k_proj.bias", kv)?,
                v_bias: bias("self_attn.v_proj.bias", kv)?,
                q_norm: qk_norm("self_attn.q_norm.weight")?,
                k_norm: qk_norm("self_attn.k_norm.weight")?,
                gate_proj: get(&p("mlp.gate_proj.weight"), &[i, h])?,
                up_proj: get(&p("mlp.up_proj.weight"), &[i, h])?,
                down_proj: get(&p("mlp.down_proj.weight"), &[h, i])?,
                input_layernorm: get(&p("input_layernorm.weight"), &[h])?,
                post_attention_layernorm: get(&p("post_attention_layernorm.weight"), &[h])?,
            });
        }
        let embed_tokens = get("model.embed_tokens.weight", &[v, h])?;
        // A tied model may still store lm_head (or the flash store may keep
        // it as an alias of the embedding); use it when it is there.
        let lm_head = if cfg.tie_word_embeddings && lookup("lm_head.weight").is_none() {
            None
        } else {
            Some(get("lm_head.weight", &[v, h])?)
        };
        Ok(ModelTensors {
            embed_tokens,
            layers,
            norm: get("model.norm.weight", &[h])?,
            lm_head,
        })
    }
}

/// Converts the little-endian bytes of a bf16/f16/f32 tensor to f32.
pub fn to_f32(name: &str, dtype: DType, bytes: &[u8]) -> Result<Vec<f32>> {
    let size = match dtype {
        DType::BF16 | DType::F16 => 2,
        DType::F32 => 4,
        d => {
            return Err(EngineError::tensor(
                name,
                format!("dtype {d} is not supported (bf16, f16, f32)"),
            ))
        }
    };
    if bytes.len() % size != 0 {
        return Err(EngineError::tensor(
            name,
            format!(
                "{} bytes is not a whole number of {dtype} values",
                bytes.len()
            ),
        ));
    }
    use rayon::prelude::*;
    let mut out = vec![0f32; bytes.len() / size];
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * size))
        .for_each(|(o, b)| match dtype {
            DType::BF16 => {
                for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                    *x = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::F16 => {
                for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                    *x = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            _ => {
                for (x, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                    *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        });
    Ok(out)
}
