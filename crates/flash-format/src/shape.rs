//! The shape of a dense decoder (Qwen3, Llama, Qwen2) as its Hugging Face
//! `config.json` states it, and the checks every such shape must pass.
//!
//! One type for the two crates that deal in shapes: the inference engine
//! reads it from a model's `config.json` (`flash_engine::ModelConfig`), the
//! synthesizer writes checkpoints of it (`flash_synth::ModelSpec`). A shape
//! this module accepts has no zero dimension, whole groups of query heads
//! per key/value head and an even head size (RoPE rotates pairs), so
//! neither crate has to check those again. Each adds the checks of its own
//! (the engine: special token ids inside the vocabulary; the synthesizer: a
//! vocabulary that holds its tokenizer) and wraps [`ShapeError`] in its own
//! error type.

use serde_json::Value;

/// The dimensions of a dense decoder, named as in `config.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecoderShape {
    pub hidden_size: usize,
    /// The MLP's inner width.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); equal to
    /// `num_attention_heads` when `config.json` leaves it out.
    pub num_key_value_heads: usize,
    /// Per-head size: explicit in Qwen3 (and recent Llama) configs, else
    /// `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Whether the LM head is the input embedding (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
}

/// Why a shape is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("missing or non-integer {0:?}")]
    Field(&'static str),
    #[error("{0} is 0")]
    Zero(&'static str),
    #[error("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")]
    Heads { heads: usize, kv_heads: usize },
    #[error("head_dim {0} is odd (RoPE needs pairs)")]
    OddHeadDim(usize),
    #[error("{what} is {value}, above {max} (the largest width the GPU kernels index)")]
    TooLarge {
        what: &'static str,
        value: u128,
        max: usize,
    },
}

/// The largest dimension, and the largest query or key/value width
/// (heads × head size), a shape may have: the GPU kernels index rows with
/// 32-bit signed integers. Real models are far below it (a 405B Llama's
/// widest row is 53,248), so a larger value is a damaged or hostile
/// `config.json`, refused before anything is sized from it.
pub const MAX_WIDTH: usize = i32::MAX as usize;

impl DecoderShape {
    /// Reads the shape from a parsed `config.json`, with Hugging Face's
    /// defaults (`num_key_value_heads`: the attention heads; `head_dim`:
    /// `hidden_size / num_attention_heads`; untied embeddings), and checks
    /// it ([`DecoderShape::validate`]).
    pub fn from_config_json(v: &Value) -> Result<Self, ShapeError> {
        let field = |k: &'static str| -> Result<usize, ShapeError> {
            v.get(k)
                .and_then(Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or(ShapeError::Field(k))
        };
        let optional = |k: &'static str| match v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => field(k).map(Some),
        };
        let hidden_size = field("hidden_size")?;
        let num_attention_heads = field("num_attention_heads")?;
        let shape = DecoderShape {
            hidden_size,
            intermediate_size: field("intermediate_size")?,
            num_hidden_layers: field("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: optional("num_key_value_heads")?.unwrap_or(num_attention_heads),
            head_dim: optional("head_dim")?
                .unwrap_or_else(|| hidden_size / num_attention_heads.max(1)),
            vocab_size: field("vocab_size")?,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        shape.validate()?;
        Ok(shape)
    }

    /// The checks every dense decoder passes: no dimension is 0 or above
    /// [`MAX_WIDTH`], nor is the query or the key/value width (heads × head
    /// size), the query heads split into whole groups per key/value head,
    /// the head size is even.
    pub fn validate(&self) -> Result<(), ShapeError> {
        let dims = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        if let Some((k, _)) = dims.iter().find(|(_, n)| *n == 0) {
            return Err(ShapeError::Zero(k));
        }
        // Widths as u128: a product of two usizes cannot overflow it.
        let widths = [
            (
                "num_attention_heads × head_dim",
                self.num_attention_heads as u128 * self.head_dim as u128,
            ),
            (
                "num_key_value_heads × head_dim",
                self.num_key_value_heads as u128 * self.head_dim as u128,
            ),
        ];
        let too_large = dims
            .iter()
            .map(|&(k, n)| (k, n as u128))
            .chain(widths)
            .find(|&(_, n)| n > MAX_WIDTH as u128);
        if let Some((what, value)) = too_large {
            return Err(ShapeError::TooLarge {
                what,
                value,
                max: MAX_WIDTH,
            });
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(ShapeError::Heads {
                heads: self.num_attention_heads,
                kv_heads: self.num_key_value_heads,
            });
        }
        if self.head_dim % 2 != 0 {
            return Err(ShapeError::OddHeadDim(self.head_dim));
        }
        Ok(())
    }

    /// Query heads per key/value head (1 for a shape not yet validated
    /// whose key/value heads are 0).
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads.max(1)
    }

    /// Width of the queries: `num_attention_heads × head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the keys (and of the values): `num_key_value_heads × head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn qwen3_tiny() -> Value {
        json!({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "vocab_size": 320, "tie_word_embeddings": true})
    }

    #[test]
    fn reads_a_config() {
        let s = DecoderShape::from_config_json(&qwen3_tiny()).unwrap();
        assert_eq!((s.q_dim(), s.kv_dim(), s.group_size()), (64, 32, 2));
        assert!(s.tie_word_embeddings);
    }

    #[test]
    fn hugging_face_defaults() {
        let mut v = qwen3_tiny();
        let o = v.as_object_mut().unwrap();
        o.remove("head_dim");
        o.remove("num_key_value_heads");
        o.insert("tie_word_embeddings".into(), Value::Null);
        let s = DecoderShape::from_config_json(&v).unwrap();
        assert_eq!((s.head_dim, s.num_key_value_heads), (16, 4));
        assert!(!s.tie_word_embeddings);
    }

    #[test]
    fn refusals_name_the_field() {
        let mut v = qwen3_tiny();
        v["num_key_value_heads"] = json!(3);
        let e = DecoderShape::from_config_json(&v).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads 3"), "{e}");
        v["num_key_value_heads"] = json!(2);
        v["head_dim"] = json!(15);
        assert_eq!(
            DecoderShape::from_config_json(&v).unwrap_err(),
            ShapeError::OddHeadDim(15)
        );
        v["head_dim"] = json!(0);
        assert_eq!(
            DecoderShape::from_config_json(&v).unwrap_err(),
            ShapeError::Zero("head_dim")
        );
        v["hidden_size"] = json!("64");
        assert_eq!(
            DecoderShape::from_config_json(&v).unwrap_err(),
            ShapeError::Field("hidden_size")
        );
    }

    /// A dimension too large for the kernels is refused before anything is
    /// sized from it, and so is a width made of two dimensions that each
    /// pass (2^16 heads of 2^16 each). Before this check, 2^33 heads of
    /// 2^31 each passed, and their width, 2^64, is 0 in a u64.
    #[test]
    fn widths_beyond_the_kernels_are_refused() {
        let mut v = qwen3_tiny();
        v["intermediate_size"] = json!(1u64 << 31);
        let e = DecoderShape::from_config_json(&v).unwrap_err();
        assert_eq!(
            e,
            ShapeError::TooLarge {
                what: "intermediate_size",
                value: 1 << 31,
                max: MAX_WIDTH
            }
        );
        assert!(
            e.to_string().contains("intermediate_size is 2147483648"),
            "{e}"
        );

        let mut v = qwen3_tiny();
        v["num_attention_heads"] = json!(1u64 << 16);
        v["num_key_value_heads"] = json!(1u64 << 16);
        v["head_dim"] = json!(1u64 << 16);
        let e = DecoderShape::from_config_json(&v).unwrap_err();
        assert_eq!(
            e,
            ShapeError::TooLarge {
                what: "num_attention_heads × head_dim",
                value: 1 << 32,
                max: MAX_WIDTH
            }
        );

        let mut v = qwen3_tiny();
        v["num_attention_heads"] = json!(4);
        v["num_key_value_heads"] = json!(2);
        v["head_dim"] = json!(MAX_WIDTH / 4 / 2 * 2);
        let s = DecoderShape::from_config_json(&v).expect("the widest query row allowed");
        assert!(s.q_dim() <= MAX_WIDTH);
    }
}
