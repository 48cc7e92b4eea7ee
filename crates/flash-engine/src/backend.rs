//! The forward pass behind a trait: what a device engine must provide for
//! generation ([`crate::generate()`]) to run on it.
//!
//! # Contract (for implementers)
//!
//! A backend holds one model and **one sequence**: its KV cache has room for
//! positions `0..max_seq_len()` and holds the keys and values of positions
//! `0..position()`.
//!
//! - [`Backend::forward`]`(tokens, pos)` runs the decoder on `tokens`, which
//!   sit at positions `pos, pos + 1, ...`. `pos` must equal `position()`
//!   (append only), or be smaller, in which case the cache is first
//!   truncated to `pos` (this rewinds, e.g. to reuse a common prompt prefix).
//!   A `pos` beyond `position()` is an error. The keys and values of the new
//!   positions are appended; `position()` becomes `pos + tokens.len()`.
//!   Prefill is a call with the whole prompt; decode is a call with one
//!   token. Attention is causal: position `p` sees `0..=p`.
//! - It returns the logits of the **last** of `tokens`: `vocab_size` f32
//!   values, before any sampling transform, borrowed from the backend (valid
//!   until the next call). Implementations keep their buffers between calls:
//!   the decode loop should not allocate.
//! - `tokens` must be non-empty and every id below `vocab_size`; passing
//!   `pos + tokens.len() > max_seq_len()` is an error
//!   ([`crate::EngineError::ContextFull`]), not a panic.
//! - [`Backend::reset`] empties the cache (`position()` becomes 0); the
//!   weights stay.
//! - [`Backend::forward_all`] is the teacher-forced variant: the logits of
//!   **every** position of `tokens`, row-major `[tokens.len(), vocab_size]`.
//!   The default runs one decode step per token; backends should override it
//!   with one batched pass (the tests compare the two).
//!
//! Numerics: the CPU backend ([`crate::cpu::CpuModel`]) is the reference
//! (f32 everywhere, weights converted from bf16/f16 at load). A GPU backend
//! keeps bf16 weights and is expected to agree with it to the tolerances of
//! the issue (top-1 agreement >= 95 % and cosine >= 0.999 on 64
//! teacher-forced positions).
//!
//! The math, per layer, in Hugging Face's conventions: `x += o_proj(attn(
//! rope(q_norm?(q_proj(rms(x)))), rope(k_norm?(k_proj(rms(x)))),
//! v_proj(rms(x))))`, then `x += down(silu(gate(rms(x))) * up(rms(x)))`;
//! RoPE rotates the pairs `(i, i + head_dim/2)` (`rotate_half`) with the
//! frequencies of [`crate::ModelConfig::rope_inv_freq`]; attention scales by
//! `1/sqrt(head_dim)`; query head `h` reads key/value head
//! `h / group_size()`. The final RMSNorm and `lm_head` (the embedding when
//! tied) give the logits.

use crate::config::ModelConfig;
use crate::Result;

/// A decoder with a KV cache for one sequence. See the module docs for the
/// contract.
pub trait Backend {
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;

    /// Where it runs, for humans and `--json`: `"cpu"`, `"cuda:0 (NVIDIA H100)"`.
    fn device(&self) -> String;

    /// Positions the cache holds now.
    fn position(&self) -> usize;

    /// Most positions one sequence may have (prompt plus generated tokens).
    fn max_seq_len(&self) -> usize;

    /// Empties the KV cache.
    fn reset(&mut self);

    /// Runs `tokens` at positions `pos..pos + tokens.len()` and returns the
    /// logits of the last one (`vocab_size` values).
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<&[f32]>;

    /// Logits of every position of `tokens` (teacher forcing), row-major
    /// `[tokens.len(), vocab_size]`, starting at `pos` like
    /// [`Backend::forward`].
    fn forward_all(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(tokens.len() * self.config().vocab_size);
        for (i, t) in tokens.iter().enumerate() {
            out.extend_from_slice(self.forward(std::slice::from_ref(t), pos + i)?);
        }
        Ok(out)
    }
}
