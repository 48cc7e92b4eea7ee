//! Tensor-parallel checkpoints: which dimension of each tensor of a dense
//! decoder (Qwen3, Llama 3, Qwen2 and their Hugging Face relatives) is split
//! across `tp` ranks, and the split and gather of the bytes themselves.
//!
//! The rules are those of vLLM's and Megatron's parallel layers, on the
//! Hugging Face `[out, in]` weights, so that rank `r` of an import holds
//! exactly what rank `r` of a vLLM worker loads:
//!
//! | tensors | split |
//! |---|---|
//! | `q_proj`, `k_proj`, `v_proj`, `gate_proj`, `up_proj` (column-parallel): weight and bias | dim 0 (the output features) |
//! | `o_proj`, `down_proj` (row-parallel): weight | dim 1 (the input features) |
//! | `o_proj`, `down_proj`: bias | replicated (added once, after the all-reduce) |
//! | `embed_tokens`, `lm_head` (vocab-parallel): weight | dim 0 (the vocabulary) |
//! | anything else of at most one dimension (norms: `input_layernorm`, `post_attention_layernorm`, `model.norm`, `q_norm`, `k_norm`) | replicated |
//!
//! Rank `r` of `n` takes the `r`-th of `n` equal contiguous parts along the
//! split dimension. Refused, with the reason:
//! - a split dimension not divisible by `n` (the vocabulary included: vLLM
//!   pads it to a multiple of 64 first, flash does not pad; for a
//!   vocabulary that is a multiple of 64, as in every Qwen and Llama
//!   release, the parts are vLLM's);
//! - `num_attention_heads` or `num_key_value_heads` of `config.json` not
//!   divisible by `n`: heads stay whole in a rank, so the q, k and v parts
//!   are whole heads of `head_dim` rows each (vLLM replicates key/value
//!   heads when there are fewer than ranks; flash refuses);
//! - a tensor of more than one dimension that is none of the above (a fused
//!   `qkv_proj`, a quantization scale of a parallel layer...): splitting it
//!   the wrong way would give wrong results without an error.
//! - any parameter but `weight` and `bias` of a parallel layer, even of one
//!   dimension (a per-channel scale of `q_proj` must be split, not
//!   replicated);
//! - a split tensor whose elements are smaller than a byte (`F4`, `F6_*`).

use flash_format::DType;
use serde_json::Value;

/// How many heads `config.json` gives attention: the q, k and v parts of a
/// rank must be whole heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// `num_attention_heads`.
    pub attention: u64,
    /// `num_key_value_heads` (`num_attention_heads` when absent, as in
    /// transformers).
    pub key_value: u64,
}

impl Heads {
    /// The heads of a `config.json` (or of its `text_config`); `None` when
    /// it does not say.
    pub fn from_config(config: &Value) -> Option<Heads> {
        let cfg = if config.get("num_attention_heads").is_some() {
            config
        } else {
            config.get("text_config")?
        };
        let attention = cfg.get("num_attention_heads")?.as_u64()?;
        let key_value = match cfg.get("num_key_value_heads") {
            None | Some(Value::Null) => attention,
            Some(v) => v.as_u64()?,
        };
        Some(Heads {
            attention,
            key_value,
        })
    }
}

/// What a layer does across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    /// Output features split (dim 0): `q_proj`, `k_proj`, `v_proj`,
    /// `gate_proj`, `up_proj`.
    Column,
    /// Input features split (dim 1): `o_proj`, `down_proj`.
    Row,
    /// Vocabulary split (dim 0): `embed_tokens`, `lm_head`.
    Vocab,
}

fn layer_of(module: &str) -> Option<Layer> {
    Some(match module {
        "q_proj" | "k_proj" | "v_proj" | "gate_proj" | "up_proj" => Layer::Column,
        "o_proj" | "down_proj" => Layer::Row,
        "embed_tokens" | "lm_head" => Layer::Vocab,
        _ => return None,
    })
}

/// The dimension of tensor `name` (of `dtype` and `shape`, as in the
/// checkpoint) split across `tp` ranks, `None` when it is replicated, or
/// why it cannot be split. `heads` comes from `config.json`; attention
/// projections need it.
pub fn split_dim(
    name: &str,
    dtype: DType,
    shape: &[u64],
    tp: u32,
    heads: Option<Heads>,
) -> Result<Option<u32>, String> {
    if tp <= 1 {
        return Ok(None);
    }
    let mut parts = name.rsplit('.');
    let param = parts.next().unwrap_or("");
    let module = parts.next().unwrap_or("");
    let Some(layer) = layer_of(module) else {
        if shape.len() <= 1 {
            return Ok(None);
        }
        return Err(format!(
            "tensor {name:?} ({shape:?}) is not a layer flash knows how to split \
             (q/k/v/o_proj, gate/up/down_proj, embed_tokens, lm_head; others must have \
             at most one dimension, which is replicated)"
        ));
    };
    let dim = match (layer, param) {
        (Layer::Column, "weight") if shape.len() == 2 => 0,
        (Layer::Column, "bias") if shape.len() == 1 => 0,
        (Layer::Row, "weight") if shape.len() == 2 => 1,
        (Layer::Row, "bias") if shape.len() == 1 => return Ok(None),
        (Layer::Vocab, "weight") if shape.len() == 2 => 0,
        (_, "weight" | "bias") => {
            return Err(format!(
                "tensor {name:?} has shape {shape:?}, not the shape of a {module} {param}"
            ))
        }
        _ => {
            return Err(format!(
                "tensor {name:?}: flash does not know how to split the {param:?} of a {module} \
                 layer (only its weight and bias)"
            ))
        }
    };
    let size = shape[dim];
    if module == "q_proj" || module == "k_proj" || module == "v_proj" {
        let heads = heads.ok_or_else(|| {
            format!(
                "config.json gives no num_attention_heads: the parts of {name:?} must be \
                 whole attention heads"
            )
        })?;
        let (count, what) = if module == "q_proj" {
            (heads.attention, "num_attention_heads")
        } else {
            (heads.key_value, "num_key_value_heads")
        };
        check_heads(heads, tp)?;
        if count == 0 || size % count != 0 {
            return Err(format!(
                "tensor {name:?} has {size} rows, not a whole number of rows for each of the \
                 {count} heads of config.json's {what}"
            ));
        }
    }
    if size % u64::from(tp) != 0 {
        return Err(if layer == Layer::Vocab {
            format!(
                "the vocabulary of {name:?} ({size} rows) is not divisible by {tp} \
                 (vLLM pads it; flash does not: use a tensor-parallel size that divides it)"
            )
        } else {
            format!(
                "tensor {name:?}: dimension {dim} ({size}) of its shape {shape:?} is not \
                 divisible by {tp}"
            )
        });
    }
    if dtype.bits() % 8 != 0 {
        return Err(format!(
            "tensor {name:?} is {dtype}, whose elements are smaller than a byte: flash does \
             not split those"
        ));
    }
    Ok(Some(dim as u32))
}

/// Refuses a tensor-parallel size that would cut attention heads.
pub fn check_heads(heads: Heads, tp: u32) -> Result<(), String> {
    let tp64 = u64::from(tp);
    if heads.attention % tp64 != 0 || heads.key_value % tp64 != 0 {
        return Err(format!(
            "config.json has num_attention_heads {} and num_key_value_heads {}; both must be \
             divisible by {tp} so that every rank holds whole heads",
            heads.attention, heads.key_value
        ));
    }
    Ok(())
}

/// The shape of one rank's part of a tensor of `shape` split along `dim`
/// into `tp` parts.
pub fn shard_shape(shape: &[u64], dim: u32, tp: u32) -> Vec<u64> {
    let mut s = shape.to_vec();
    s[dim as usize] /= u64::from(tp);
    s
}

/// The shape of the whole tensor whose parts have `part_shape`.
pub fn whole_shape(part_shape: &[u64], dim: u32, tp: u32) -> Vec<u64> {
    let mut s = part_shape.to_vec();
    s[dim as usize] *= u64::from(tp);
    s
}

/// `(outer, rows, row bytes)` of a tensor of `shape` seen along `dim`: the
/// row-major bytes are `outer` blocks of `rows` rows of `row bytes` each.
fn blocks(dtype: DType, shape: &[u64], dim: u32) -> (usize, usize, usize) {
    let d = dim as usize;
    let outer: u64 = shape[..d].iter().product();
    let inner: u64 = shape[d + 1..].iter().product();
    (
        outer as usize,
        shape[d] as usize,
        (inner * dtype.bits() / 8) as usize,
    )
}

/// Splits a tensor's row-major little-endian `bytes` (of `dtype`, `shape`)
/// into `tp` equal parts along `dim`: part `r` holds indices
/// `[r * k, (r + 1) * k)` of that dimension, `k = shape[dim] / tp`. The
/// caller has checked the split with [`split_dim`].
pub fn split(bytes: &[u8], dtype: DType, shape: &[u64], dim: u32, tp: u32) -> Vec<Vec<u8>> {
    let tp = tp as usize;
    let (outer, rows, row) = blocks(dtype, shape, dim);
    let part = rows / tp * row;
    let mut out: Vec<Vec<u8>> = (0..tp).map(|_| Vec::with_capacity(outer * part)).collect();
    for block in bytes.chunks_exact(rows * row).take(outer) {
        for (r, o) in out.iter_mut().enumerate() {
            o.extend_from_slice(&block[r * part..(r + 1) * part]);
        }
    }
    out
}

/// Puts the parts of a split tensor back together: the inverse of
/// [`split`]. Every part has `part_shape`.
pub fn gather(parts: &[Vec<u8>], dtype: DType, part_shape: &[u64], dim: u32) -> Vec<u8> {
    let (outer, rows, row) = blocks(dtype, part_shape, dim);
    let part = rows * row;
    let mut out = Vec::with_capacity(outer * part * parts.len());
    for b in 0..outer {
        for p in parts {
            out.extend_from_slice(&p[b * part..(b + 1) * part]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn heads(a: u64, kv: u64) -> Option<Heads> {
        Some(Heads {
            attention: a,
            key_value: kv,
        })
    }

    #[test]
    fn rules_by_layer() {
        let h = heads(8, 4);
        let d = |name: &str, shape: &[u64]| split_dim(name, DType::BF16, shape, 2, h);
        let p = "model.layers.3";
        assert_eq!(
            d(&format!("{p}.self_attn.q_proj.weight"), &[64, 32]),
            Ok(Some(0))
        );
        assert_eq!(d(&format!("{p}.self_attn.k_proj.bias"), &[32]), Ok(Some(0)));
        assert_eq!(
            d(&format!("{p}.mlp.up_proj.weight"), &[96, 32]),
            Ok(Some(0))
        );
        assert_eq!(
            d(&format!("{p}.self_attn.o_proj.weight"), &[32, 64]),
            Ok(Some(1))
        );
        assert_eq!(
            d(&format!("{p}.mlp.down_proj.weight"), &[32, 96]),
            Ok(Some(1))
        );
        assert_eq!(d(&format!("{p}.mlp.down_proj.bias"), &[32]), Ok(None));
        assert_eq!(d("model.embed_tokens.weight", &[320, 32]), Ok(Some(0)));
        assert_eq!(d("lm_head.weight", &[320, 32]), Ok(Some(0)));
        assert_eq!(d(&format!("{p}.input_layernorm.weight"), &[32]), Ok(None));
        assert_eq!(d(&format!("{p}.self_attn.q_norm.weight"), &[16]), Ok(None));
        assert_eq!(d("model.norm.weight", &[32]), Ok(None));
        assert_eq!(d("model.rotary_emb.inv_freq", &[8]), Ok(None));
        // One rank: nothing is split, whatever the name.
        assert_eq!(
            split_dim(
                "model.layers.0.self_attn.qkv_proj.weight",
                DType::BF16,
                &[3, 4],
                1,
                None
            ),
            Ok(None)
        );
    }

    #[test]
    fn refusals_say_why() {
        let h = heads(8, 4);
        let d = |name: &str, shape: &[u64], tp| split_dim(name, DType::BF16, shape, tp, h);
        let e = d("model.layers.0.self_attn.qkv_proj.weight", &[96, 32], 2).unwrap_err();
        assert!(e.contains("qkv_proj") && e.contains("not a layer"), "{e}");
        let e = d("model.layers.0.self_attn.q_proj.weight_scale", &[64], 2).unwrap_err();
        assert!(e.contains("weight_scale"), "{e}");
        let e = d("model.embed_tokens.weight", &[321, 32], 2).unwrap_err();
        assert!(e.contains("vocabulary") && e.contains("321"), "{e}");
        let e = d("model.layers.0.self_attn.k_proj.weight", &[32, 32], 8).unwrap_err();
        assert!(
            e.contains("num_key_value_heads 4") && e.contains("by 8"),
            "{e}"
        );
        let e = d("model.layers.0.mlp.gate_proj.weight", &[33, 32], 2).unwrap_err();
        assert!(e.contains("33") && e.contains("dimension 0"), "{e}");
        let e = d("model.layers.0.self_attn.q_proj.weight", &[60, 32], 2).unwrap_err();
        assert!(e.contains("60 rows") && e.contains("8 heads"), "{e}");
        let e = split_dim(
            "model.layers.0.self_attn.q_proj.weight",
            DType::BF16,
            &[64, 32],
            2,
            None,
        )
        .unwrap_err();
        assert!(e.contains("num_attention_heads"), "{e}");
        let e = split_dim("lm_head.weight", DType::F4, &[64, 32], 2, h).unwrap_err();
        assert!(e.contains("F4"), "{e}");
    }

    #[test]
    fn heads_from_config() {
        let c = json!({"num_attention_heads": 16, "num_key_value_heads": 8});
        assert_eq!(Heads::from_config(&c), heads(16, 8));
        let c = json!({"num_attention_heads": 12});
        assert_eq!(Heads::from_config(&c), heads(12, 12));
        let c = json!({"text_config": {"num_attention_heads": 4, "num_key_value_heads": 2}});
        assert_eq!(Heads::from_config(&c), heads(4, 2));
        assert_eq!(Heads::from_config(&json!({"hidden_size": 4})), None);
    }

    #[test]
    fn split_and_gather_are_inverse() {
        // A [2, 6, 3] u16 tensor split along each dimension into 3 (dim 0
        // cannot: 2 rows) or 2 parts.
        let shape = [2u64, 6, 3];
        let bytes: Vec<u8> = (0..72u8).collect();
        for (dim, tp) in [(1u32, 3u32), (1, 2), (2, 3), (0, 2)] {
            let parts = split(&bytes, DType::U16, &shape, dim, tp);
            let ps = shard_shape(&shape, dim, tp);
            for p in &parts {
                assert_eq!(p.len() as u64, DType::U16.byte_len(&ps).unwrap());
            }
            assert_eq!(whole_shape(&ps, dim, tp), shape);
            assert_eq!(
                gather(&parts, DType::U16, &ps, dim),
                bytes,
                "dim {dim} tp {tp}"
            );
        }
        // Dimension 1 of 6 in 3: part 1 is rows 2..4 of each outer block.
        let parts = split(&bytes, DType::U16, &shape, 1, 3);
        let want: Vec<u8> = [12..24, 48..60].into_iter().flatten().collect();
        assert_eq!(parts[1], want);
    }
}
