//! The CPU reference engine: the whole forward in f32, weights converted
//! from bf16/f16/f32 at load. It is the engine of machines without a GPU and
//! the reference the GPU engine is checked against (see [`CpuModel::forward_all`]).
//!
//! Matrix products: one token (decode) is a matrix-vector product split over
//! output rows with rayon; several tokens (prefill) go through
//! `matrixmultiply`'s sgemm (via ndarray's safe views), split over blocks of
//! output columns. Buffers live in the model and are reused: a decode step
//! allocates nothing but the attention scores of each worker.
//!
//! Every buffer whose size comes from a request (the KV cache, the
//! activations of a prompt, logits) is allocated fallibly: an allocation the
//! machine cannot make is an [`EngineError::OutOfMemory`], never an abort
//! of the process. [`CpuModel::reserve`] sizes the KV cache for a request
//! up front.

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::{try_reserve, EngineError};
use crate::weights::{to_f32, LayerTensors, ModelTensors};
use crate::Result;
use flash_load::{load_to_host, HostModel, LoadOptions, ModelSource};
use ndarray::{linalg::general_mat_mul, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Options of a CPU model.
#[derive(Clone, Debug, Default)]
pub struct CpuOptions {
    /// Most positions of a sequence (prompt + generation); `None`: the
    /// model's `max_position_embeddings`. The KV cache grows as used, so a
    /// large limit costs nothing up front.
    pub max_seq_len: Option<usize>,
}

/// What a [`CpuModel::load`] did.
#[derive(Clone, Debug)]
pub struct CpuLoadReport {
    /// Reading the weights from disk into host memory (flash-load).
    pub read: Duration,
    /// Converting them to f32.
    pub convert: Duration,
    /// Bytes of tensor data read.
    pub bytes: u64,
}

/// Per-layer keys and values of positions `0..len`, row-major
/// `[position, kv_head * head_dim]`.
#[derive(Default)]
struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

/// Work buffers, reused between calls.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    logits: Vec<f32>,
}

/// A decoder in f32 on the CPU, with its KV cache.
pub struct CpuModel {
    cfg: ModelConfig,
    w: ModelTensors<Vec<f32>>,
    inv_freq: Vec<f64>,
    max_seq: usize,
    cache: KvCache,
    s: Scratch,
}

impl CpuModel {
    /// Builds the model from f32 tensors (already checked by
    /// [`ModelTensors::resolve`] or built by hand for tests).
    pub fn new(cfg: ModelConfig, w: ModelTensors<Vec<f32>>, opts: &CpuOptions) -> Result<Self> {
        let expect = |name: &str, t: &Vec<f32>, len: usize| {
            if t.len() == len {
                Ok(())
            } else {
                Err(EngineError::tensor(
                    name,
                    format!("{} values, the config implies {len}", t.len()),
                ))
            }
        };
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        expect("model.embed_tokens.weight", &w.embed_tokens, v * h)?;
        expect("model.norm.weight", &w.norm, h)?;
        if let Some(l) = &w.lm_head {
            expect("lm_head.weight", l, v * h)?;
        }
        if w.layers.len() != cfg.num_hidden_layers {
            return Err(EngineError::Invalid(format!(
                "{} layers of weights, the config says {}",
                w.layers.len(),
                cfg.num_hidden_layers
            )));
        }
        let max_seq = opts
            .max_seq_len
            .unwrap_or(cfg.max_position_embeddings)
            .max(1);
        let layers = cfg.num_hidden_layers;
        Ok(CpuModel {
            inv_freq: cfg.rope_inv_freq(),
            cfg,
            w,
            max_seq,
            cache: KvCache {
                k: vec![Vec::new(); layers],
                v: vec![Vec::new(); layers],
                len: 0,
            },
            s: Scratch::default(),
        })
    }

    /// Converts the tensors of a model loaded into host memory.
    pub fn from_host(cfg: ModelConfig, host: &HostModel, opts: &CpuOptions) -> Result<Self> {
        let views = ModelTensors::resolve(&cfg, |name| host.get(name).map(|(t, _)| t))?;
        let w = views.try_map(|name, t| to_f32(name, t.dtype, host.bytes(t)))?;
        Self::new(cfg, w, opts)
    }

    /// Reads the model folder `dir` (flash format or safetensors, with its
    /// `config.json`) and converts it.
    pub fn load(
        dir: &Path,
        load: &LoadOptions,
        opts: &CpuOptions,
    ) -> Result<(Self, CpuLoadReport)> {
        let cfg = ModelConfig::from_dir(dir)?;
        let t0 = Instant::now();
        let source = ModelSource::open(dir)?;
        let (host, stats) = load_to_host(&source, None, load)?;
        let read = t0.elapsed();
        let t1 = Instant::now();
        let model = Self::from_host(cfg, &host, opts)?;
        drop(host);
        Ok((
            model,
            CpuLoadReport {
                read,
                convert: t1.elapsed(),
                bytes: stats.bytes_read,
            },
        ))
    }

    /// The f32 weights.
    pub fn weights(&self) -> &ModelTensors<Vec<f32>> {
        &self.w
    }

    /// Bytes of the KV cache for `positions` positions (keys and values of
    /// every layer).
    pub fn kv_cache_bytes(&self, positions: usize) -> u64 {
        (positions as u64)
            .saturating_mul(self.cfg.kv_dim() as u64)
            .saturating_mul(self.cfg.num_hidden_layers as u64)
            .saturating_mul(2 * std::mem::size_of::<f32>() as u64)
    }

    /// Makes room in the KV cache for `positions` positions (a request's
    /// prompt plus the tokens it may generate), so that generation does not
    /// allocate; room beyond what the last requests needed is given back.
    /// More than [`Backend::max_seq_len`] is [`EngineError::ContextFull`];
    /// an allocation the machine refuses is [`EngineError::OutOfMemory`]
    /// (the cache keeps what it held). The cached positions are kept.
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        if positions > self.max_seq {
            return Err(EngineError::ContextFull {
                needed: positions,
                max: self.max_seq,
            });
        }
        let what = format!(
            "the KV cache of {positions} positions ({} bytes)",
            self.kv_cache_bytes(positions)
        );
        let Some(want) = positions.checked_mul(self.cfg.kv_dim()) else {
            return Err(EngineError::OutOfMemory {
                what,
                bytes: self.kv_cache_bytes(positions),
            });
        };
        for c in self.cache.k.iter_mut().chain(self.cache.v.iter_mut()) {
            let keep = want.max(c.len());
            // A request far smaller than an earlier one gives memory back.
            if c.capacity() > keep.saturating_mul(2) {
                c.shrink_to(keep);
            }
            try_reserve(c, want.saturating_sub(c.len()), true, &what)?;
        }
        Ok(())
    }

    /// Runs `tokens` at `pos..`, filling `s.logits` with the logits of the
    /// last position (or of every position when `all`).
    fn run(&mut self, tokens: &[u32], pos: usize, all: bool) -> Result<()> {
        let cfg = &self.cfg;
        let n = tokens.len();
        if n == 0 {
            return Err(EngineError::Invalid("forward of no tokens".into()));
        }
        if pos > self.cache.len {
            return Err(EngineError::Invalid(format!(
                "forward at position {pos}, but the cache holds only {} positions",
                self.cache.len
            )));
        }
        if pos + n > self.max_seq {
            return Err(EngineError::ContextFull {
                needed: pos + n,
                max: self.max_seq,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(EngineError::Invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                cfg.vocab_size
            )));
        }
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let nh = cfg.num_attention_heads;
        let (qd, kvd, inter) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        let eps = cfg.rms_norm_eps as f32;
        let group = cfg.group_size();
        let scale = 1.0 / (hd as f32).sqrt();

        // Rewind: keep the keys and values of 0..pos.
        for l in 0..cfg.num_hidden_layers {
            self.cache.k[l].truncate(pos * kvd);
            self.cache.v[l].truncate(pos * kvd);
        }
        self.cache.len = pos;
        // Room for the new keys and values (nothing when `reserve` made it).
        for c in self.cache.k.iter_mut().chain(self.cache.v.iter_mut()) {
            try_reserve(c, n * kvd, false, "the KV cache")?;
        }

        let s = &mut self.s;
        let w = &self.w;
        resize(&mut s.x, n * h)?;
        resize(&mut s.xn, n * h)?;
        resize(&mut s.q, n * qd)?;
        resize(&mut s.k, n * kvd)?;
        resize(&mut s.v, n * kvd)?;
        resize(&mut s.attn, n * qd)?;
        resize(&mut s.proj, n * h)?;
        resize(&mut s.gate, n * inter)?;
        resize(&mut s.up, n * inter)?;
        // RoPE angles of the new positions.
        let half = hd / 2;
        resize(&mut s.cos, n * half)?;
        resize(&mut s.sin, n * half)?;
        for t in 0..n {
            let p = (pos + t) as f64;
            for (i, f) in self.inv_freq.iter().enumerate() {
                let (sn, cs) = (p * f).sin_cos();
                s.cos[t * half + i] = cs as f32;
                s.sin[t * half + i] = sn as f32;
            }
        }

        for (t, &tok) in tokens.iter().enumerate() {
            let row = tok as usize * h;
            s.x[t * h..(t + 1) * h].copy_from_slice(&w.embed_tokens[row..row + h]);
        }

        for (l, lw) in w.layers.iter().enumerate() {
            // Attention block.
            rms_norm(&s.x, &lw.input_layernorm, eps, &mut s.xn);
            linear(&s.xn, n, &lw.q_proj, qd, h, &mut s.q);
            linear(&s.xn, n, &lw.k_proj, kvd, h, &mut s.k);
            linear(&s.xn, n, &lw.v_proj, kvd, h, &mut s.v);
            add_bias(&mut s.q, lw.q_bias.as_deref());
            add_bias(&mut s.k, lw.k_bias.as_deref());
            add_bias(&mut s.v, lw.v_bias.as_deref());
            head_norms_and_rope(lw, &mut s.q, &mut s.k, &s.cos, &s.sin, hd, eps);

            let kc = &mut self.cache.k[l];
            let vc = &mut self.cache.v[l];
            kc.extend_from_slice(&s.k);
            vc.extend_from_slice(&s.v);
            let (kc, vc) = (&kc[..], &vc[..]);
            let q = &s.q;
            s.attn.par_chunks_mut(hd).enumerate().for_each_init(
                Vec::new,
                |scores: &mut Vec<f32>, (i, out)| {
                    let (t, head) = (i / nh, i % nh);
                    let kvh = head / group;
                    let qv = &q[t * qd + head * hd..t * qd + (head + 1) * hd];
                    let ctx = pos + t + 1;
                    scores.clear();
                    let mut max = f32::NEG_INFINITY;
                    for j in 0..ctx {
                        let kv = &kc[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd];
                        let sc = dot(qv, kv) * scale;
                        max = max.max(sc);
                        scores.push(sc);
                    }
                    let mut sum = 0f32;
                    for sc in scores.iter_mut() {
                        *sc = (*sc - max).exp();
                        sum += *sc;
                    }
                    let inv = 1.0 / sum;
                    out.fill(0.0);
                    for (j, &p) in scores.iter().enumerate() {
                        let vv = &vc[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd];
                        let p = p * inv;
                        for (o, &x) in out.iter_mut().zip(vv) {
                            *o += p * x;
                        }
                    }
                },
            );
            linear(&s.attn, n, &lw.o_proj, h, qd, &mut s.proj);
            add_into(&mut s.x, &s.proj);

            // MLP block.
            rms_norm(&s.x, &lw.post_attention_layernorm, eps, &mut s.xn);
            linear(&s.xn, n, &lw.gate_proj, inter, h, &mut s.gate);
            linear(&s.xn, n, &lw.up_proj, inter, h, &mut s.up);
            s.gate
                .par_chunks_mut(4096)
                .zip(s.up.par_chunks(4096))
                .for_each(|(g, u)| {
                    for (g, &u) in g.iter_mut().zip(u) {
                        *g = *g / (1.0 + (-*g).exp()) * u;
                    }
                });
            linear(&s.gate, n, &lw.down_proj, h, inter, &mut s.proj);
            add_into(&mut s.x, &s.proj);
        }
        self.cache.len = pos + n;

        let rows = if all { n } else { 1 };
        let first = n - rows;
        let v = self.cfg.vocab_size;
        rms_norm(&s.x[first * h..], &w.norm, eps, &mut s.xn[..rows * h]);
        resize(&mut s.logits, rows * v)?;
        linear(&s.xn[..rows * h], rows, w.output(), v, h, &mut s.logits);
        Ok(())
    }
}

impl Backend for CpuModel {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn device(&self) -> String {
        "cpu".into()
    }
    fn position(&self) -> usize {
        self.cache.len
    }
    fn max_seq_len(&self) -> usize {
        self.max_seq
    }
    fn reset(&mut self) {
        for l in 0..self.cfg.num_hidden_layers {
            self.cache.k[l].clear();
            self.cache.v[l].clear();
        }
        self.cache.len = 0;
    }
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<&[f32]> {
        self.run(tokens, pos, false)?;
        Ok(&self.s.logits)
    }
    fn forward_all(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>> {
        self.run(tokens, pos, true)?;
        let mut out = Vec::new();
        try_reserve(&mut out, self.s.logits.len(), true, "the logits")?;
        out.extend_from_slice(&self.s.logits);
        Ok(out)
    }
}

/// Sets the length of a work buffer (no allocation once it was that large;
/// an allocation the machine refuses is an error, not an abort).
fn resize(v: &mut Vec<f32>, len: usize) -> Result<()> {
    try_reserve(
        v,
        len.saturating_sub(v.len()),
        true,
        "the activations of the forward pass",
    )?;
    v.resize(len, 0.0);
    Ok(())
}

/// Per-head RMSNorm of queries and keys (Qwen3), then RoPE on both.
fn head_norms_and_rope(
    lw: &LayerTensors<Vec<f32>>,
    q: &mut [f32],
    k: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    hd: usize,
    eps: f32,
) {
    let half = hd / 2;
    let per_token_q = q.len() / (cos.len() / half);
    let per_token_k = k.len() / (cos.len() / half);
    for (x, norm, per_token) in [
        (q, lw.q_norm.as_deref(), per_token_q),
        (k, lw.k_norm.as_deref(), per_token_k),
    ] {
        for (t, tok) in x.chunks_exact_mut(per_token).enumerate() {
            let (c, s) = (
                &cos[t * half..(t + 1) * half],
                &sin[t * half..(t + 1) * half],
            );
            for head in tok.chunks_exact_mut(hd) {
                if let Some(w) = norm {
                    rms_norm_row(head, w, eps);
                }
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * c[i] - x2 * s[i];
                    b[i] = x2 * c[i] + x1 * s[i];
                }
            }
        }
    }
}

fn rms_norm_row(x: &mut [f32], w: &[f32], eps: f32) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let r = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for (v, &g) in x.iter_mut().zip(w) {
        *v = *v * r * g;
    }
}

/// `out[t] = x[t] / rms(x[t]) * w` for each row of `w.len()` values.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        or.copy_from_slice(xr);
        rms_norm_row(or, w, eps);
    }
}

fn add_bias(x: &mut [f32], b: Option<&[f32]>) {
    if let Some(b) = b {
        for row in x.chunks_exact_mut(b.len()) {
            add_into(row, b);
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Dot product with 8 independent accumulators (vectorizes well).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `out[n, out_dim] = x[n, in_dim] · w[out_dim, in_dim]ᵀ` (a PyTorch
/// `Linear` without bias).
pub(crate) fn linear(
    x: &[f32],
    n: usize,
    w: &[f32],
    out_dim: usize,
    in_dim: usize,
    out: &mut [f32],
) {
    debug_assert_eq!(x.len(), n * in_dim);
    debug_assert_eq!(w.len(), out_dim * in_dim);
    debug_assert_eq!(out.len(), n * out_dim);
    if n <= 2 {
        // Matrix-vector: each weight row read once per token, rows split
        // over the threads.
        for (xr, or) in x.chunks_exact(in_dim).zip(out.chunks_exact_mut(out_dim)) {
            let rows_per_task = (16384 / in_dim).clamp(8, 256);
            or.par_chunks_mut(rows_per_task)
                .enumerate()
                .for_each(|(c, o)| {
                    let r0 = c * rows_per_task;
                    for (i, o) in o.iter_mut().enumerate() {
                        let r = r0 + i;
                        *o = dot(xr, &w[r * in_dim..(r + 1) * in_dim]);
                    }
                });
        }
        return;
    }
    let (Ok(a), Ok(b), Ok(mut c)) = (
        ArrayView2::from_shape((n, in_dim), x),
        ArrayView2::from_shape((out_dim, in_dim), w),
        ArrayViewMut2::from_shape((n, out_dim), out),
    ) else {
        unreachable!("shapes are checked by the caller");
    };
    let bt = b.t();
    let threads = rayon::current_num_threads().max(1);
    let cols = out_dim.div_ceil(threads * 4).clamp(64, 1024);
    let jobs: Vec<_> = bt
        .axis_chunks_iter(Axis(1), cols)
        .zip(c.axis_chunks_iter_mut(Axis(1), cols))
        .collect();
    jobs.into_par_iter().for_each(|(b, mut c)| {
        general_mat_mul(1.0, &a, &b, 0.0, &mut c);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(max_seq_len: Option<usize>) -> (tempfile::TempDir, CpuModel) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let spec = flash_synth::spec(flash_synth::Arch::Qwen3, "tiny").unwrap();
        flash_synth::synth(&spec, &dir, &Default::default()).unwrap();
        let opts = CpuOptions { max_seq_len };
        let m = CpuModel::load(&dir, &Default::default(), &opts).unwrap().0;
        (tmp, m)
    }

    #[test]
    fn reserve_is_fallible_and_bounded_by_the_context() {
        let (_tmp, mut m) = tiny(Some(1 << 42));
        // 2^42 positions of this model's KV cache are far more bytes than
        // any address space: an error, not an abort.
        let e = m.reserve(1 << 42).unwrap_err();
        assert!(matches!(e, EngineError::OutOfMemory { .. }), "{e}");
        assert!(e.to_string().contains("KV cache"), "{e}");
        // The model still works after the failed reservation.
        m.reserve(64).unwrap();
        let kvd = m.config().kv_dim();
        assert!(m.cache.k.iter().all(|c| c.capacity() >= 64 * kvd));
        m.forward(&[1, 2, 3], 0).unwrap();
        assert_eq!(m.position(), 3);

        let (_tmp, mut m) = tiny(Some(8));
        let e = m.reserve(9).unwrap_err();
        assert!(
            matches!(e, EngineError::ContextFull { needed: 9, max: 8 }),
            "{e}"
        );
        m.reserve(8).unwrap();
    }

    #[test]
    fn reserve_gives_back_what_a_large_request_took() {
        let (_tmp, mut m) = tiny(None);
        let kvd = m.config().kv_dim();
        m.reserve(4096).unwrap();
        assert!(m.cache.v[0].capacity() >= 4096 * kvd);
        m.reset();
        m.reserve(16).unwrap();
        assert!(m.cache.v[0].capacity() < 4096 * kvd);
        assert!(m.cache.v[0].capacity() >= 16 * kvd);
    }

    #[test]
    fn linear_paths_agree() {
        let (n, i, o) = (5, 37, 70);
        let x: Vec<f32> = (0..n * i)
            .map(|k| ((k * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let w: Vec<f32> = (0..o * i)
            .map(|k| ((k * 5 % 11) as f32 - 5.0) / 7.0)
            .collect();
        let mut big = vec![0f32; n * o];
        linear(&x, n, &w, o, i, &mut big);
        for t in 0..n {
            let mut one = vec![0f32; o];
            linear(&x[t * i..(t + 1) * i], 1, &w, o, i, &mut one);
            for r in 0..o {
                let want: f64 = (0..i)
                    .map(|k| x[t * i + k] as f64 * w[r * i + k] as f64)
                    .sum();
                assert!((big[t * o + r] as f64 - want).abs() < 1e-4);
                assert!((one[r] as f64 - want).abs() < 1e-4);
            }
        }
    }
}
