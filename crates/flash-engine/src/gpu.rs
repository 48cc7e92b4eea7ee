//! The GPU backend: the decoder on bf16 weights used in place where the
//! loader put them (one device allocation, no copy): flash-kernels' fused
//! matrix-vector kernels for the products of decode and of chunks of at most
//! [`FUSED_MAX_TOKENS`] tokens ([`GpuOptions::fused_decode`]), cuBLAS for
//! longer prefills, NVRTC kernels (flash-kernels `ops`) for the rest.
//! cuBLAS is loaded while the weights stream in, or, with
//! [`GpuOptions::blas_at_load`] off, by the first product that needs it: a
//! cold `flash run` with a short prompt then never reads its ~600 MB of
//! libraries, which would compete with the weights for the disk.
//!
//! # Data layout (all device memory allocated once, when the engine is built)
//! - residual stream `x`: f32 `[batch, hidden]`. The o_proj and down_proj
//!   products accumulate into it directly (cuBLAS with beta = 1, or the
//!   fused kernels' residual mode), so the residual adds cost nothing;
//! - normalised activations, q/k/v, attention output, gate/up: bf16;
//! - KV cache: bf16 `[layer][k|v][kv_head][max_seq][head_dim]`;
//! - RoPE tables: f32 `[max_seq, head_dim/2]` (Llama 3 scaling applied on the
//!   host by [`ModelConfig::rope_inv_freq`]);
//! - logits: f32 `[LOGIT_ROWS, vocab]`, copied to host for sampling (or
//!   reduced on the device by [`GpuEngine::forward_greedy`]).
//!
//! A forward of more than `batch` tokens runs in chunks of `batch` (default
//! 512). Decode (one token) queues 8 kernels per layer on one stream (norm,
//! q/k/v, RoPE and cache, attention (and its merge when it splits the keys),
//! o, norm, gate/up with SwiGLU, down),
//! allocates nothing and synchronises once, for the logits.
//!
//! # Numerics
//! bf16 weights and activations, f32 accumulation (cuBLAS compute 32F,
//! f32 softmax and norms), f32 residual stream. Roundings follow Hugging
//! Face's bf16 forward where it is free to (see kernels.cu), so the engine
//! tracks transformers; the CPU engine ([`crate::cpu`]) is the f32 reference.

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::weights::ModelTensors;
use crate::Result;
use flash_format::DType;
use flash_kernels::default_kernel_cache;
use flash_kernels::ops::{
    attention_scratch_bytes, AttnShape, DevView, GemvOut, GemvPart, KernelInfo, Ops, OutType,
    MAX_HEAD_DIM,
};
use flash_load::{load_to_gpu, GpuModel, LoadOptions, LoadStats, ModelSource, TensorView};
use flash_sys::cuda::{CudaError, DeviceMemory, Gpu};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rows of logits computed per lm_head product (teacher forcing runs in
/// pieces of this many positions).
pub const LOGIT_ROWS: usize = 32;

/// Default most positions of a sequence when the model allows more (the KV
/// cache is allocated up front: 4096 positions of Qwen3-8B take 0.6 GB).
pub const DEFAULT_MAX_SEQ: usize = 4096;

fn dev(e: CudaError) -> EngineError {
    EngineError::Device(e.to_string())
}

/// Options of a GPU model.
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// Most positions of a sequence (the KV cache's size); `None`: the
    /// model's `max_position_embeddings`, at most [`DEFAULT_MAX_SEQ`].
    pub max_seq_len: Option<usize>,
    /// Most tokens of one forward chunk (prefill); activations are sized
    /// for it.
    pub batch_tokens: usize,
    /// Where compiled kernels are cached; `None`: flash-kernels' default
    /// (`$FLASH_KERNEL_CACHE`, `$FLASH_HOME/kernels`, the user's cache).
    pub kernel_cache: Option<PathBuf>,
    /// Round as transformers' bf16 forward does: the residual stream kept
    /// in bf16 (each add rounded) and RoPE in bf16. Off (the default): an
    /// f32 residual stream (closer to the f32 reference, ~3 % faster
    /// decode). A cross-check against transformers: with `bf16_logits`, the
    /// argmax agreed with transformers bf16 at 98.4 % (Qwen3-0.6B-shaped)
    /// and 93.8 % (Llama-1B-shaped) of 64 positions, against 95.3 % and
    /// 92.2 % without (H200, random weights).
    pub hf_rounding: bool,
    /// Logits rounded to bf16 (the lm_head's output dtype in transformers
    /// and vLLM), returned as f32. Off (the default): f32 logits.
    pub bf16_logits: bool,
    /// Decode steps and chunks of at most [`FUSED_MAX_TOKENS`] tokens with
    /// flash-kernels' fused matrix-vector kernels (q/k/v in one launch,
    /// gate/up with the activation, residual adds in the o/down products)
    /// instead of cuBLAS. On by default; off for A/B comparisons (`flash
    /// bench-engine --no-fused-decode`). Ignored for weights the kernels
    /// cannot read (unaligned rows).
    pub fused_decode: bool,
    /// Load cuBLAS while the weights stream in (the default). Off: the
    /// first product the fused kernels do not take loads it (`flash run`
    /// turns this off for a prompt of at most [`FUSED_MAX_TOKENS`] tokens).
    pub blas_at_load: bool,
}

/// The most tokens of a forward chunk whose products run on the fused
/// matrix-vector kernels (each launch of 8 tokens reads the weights once);
/// longer chunks use cuBLAS.
pub const FUSED_MAX_TOKENS: usize = 16;

impl GpuOptions {
    /// The most positions of a sequence and the most tokens of a forward
    /// chunk the engine sizes its buffers for, for `cfg`.
    fn shape(&self, cfg: &ModelConfig) -> (usize, usize) {
        let max_seq = self
            .max_seq_len
            .unwrap_or(cfg.max_position_embeddings.min(DEFAULT_MAX_SEQ))
            .max(1);
        (max_seq, self.batch_tokens.clamp(1, 1 << 16))
    }

    /// Device memory an engine for `cfg` allocates beside the weights:
    /// its buffers (KV cache, activations, RoPE tables), exactly, plus
    /// [`ENGINE_LIBRARY_BYTES`] for cuBLAS's workspace and the kernels'
    /// modules. The daemon reserves this much of the GPU tier's budget
    /// before it builds the engine.
    pub fn engine_bytes(&self, cfg: &ModelConfig) -> u64 {
        let (max_seq, batch) = self.shape(cfg);
        let lens = BufferLens::new(cfg, batch, max_seq);
        lens.all()
            .iter()
            .fold(ENGINE_LIBRARY_BYTES, |sum, &n| sum.saturating_add(n as u64))
    }
}

/// An allowance for what an engine's libraries allocate on the device on
/// their own (cuBLAS's workspace and handles, the kernels' modules): an
/// upper bound chosen to cover cuBLAS's documented workspace on Hopper
/// (32 MiB) with room to spare, not a measured figure.
pub const ENGINE_LIBRARY_BYTES: u64 = 64 << 20;

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            max_seq_len: None,
            batch_tokens: 512,
            kernel_cache: None,
            hf_rounding: false,
            bf16_logits: false,
            fused_decode: true,
            blas_at_load: true,
        }
    }
}

/// What [`GpuEngine::load`] did.
#[derive(Clone, Debug)]
pub struct GpuLoadReport {
    /// Reading the weights into the GPU (flash-load), until the engine's
    /// setup has ended too.
    pub load: Duration,
    pub stats: LoadStats,
    /// Kernels, cuBLAS (with `blas_at_load`), buffers, KV cache, RoPE
    /// tables (made on another thread during `load`, so not added to it).
    pub setup: Duration,
}

/// Which ops [`GpuEngine::queue_layers`] queues (profiling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Parts {
    All,
    /// Only the products whose bit is set (q, k, v, o, gate, up, down).
    Gemms(u8),
    /// Everything but the products.
    Others,
}

/// Time of one kind of product over every layer, in a decode step.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProductTime {
    pub name: String,
    pub ms: f64,
    /// Weight bytes read per second.
    pub gbps: f64,
}

/// See [`GpuEngine::profile_decode`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct DecodeProfile {
    pub step_ms: f64,
    /// CPU time to queue the step.
    pub queue_ms: f64,
    /// Every product of the layers, alone.
    pub products_ms: f64,
    /// Every other kernel of the layers, alone.
    pub others_ms: f64,
    pub products: Vec<ProductTime>,
}

/// The device memory of the activations, written by every forward.
struct Buffers {
    x: DeviceMemory,
    xn: DeviceMemory,
    q: DeviceMemory,
    k: DeviceMemory,
    v: DeviceMemory,
    attn: DeviceMemory,
    gate: DeviceMemory,
    up: DeviceMemory,
    /// A layer's o_proj / down_proj output (bf16) before the residual add.
    delta: DeviceMemory,
    logits: DeviceMemory,
    logits16: DeviceMemory,
    ids: DeviceMemory,
    argmax: DeviceMemory,
    scratch: DeviceMemory,
    cos: DeviceMemory,
    sin: DeviceMemory,
    kv: DeviceMemory,
}

/// Device memory holding a model's weights at the offsets of its tensor
/// table: a [`GpuModel`] loaded by this process, or a copy someone else owns
/// (the daemon's tier, leased for the time the engine is bound to it).
pub trait GpuWeights: Send + Sync {
    /// The allocation the tensors lie in.
    fn memory(&self) -> &DeviceMemory;
    /// A tensor by its Hugging Face name (offsets within [`Self::memory`]).
    fn tensor(&self, name: &str) -> Option<&TensorView>;
}

impl GpuWeights for GpuModel {
    fn memory(&self) -> &DeviceMemory {
        &self.mem
    }
    fn tensor(&self, name: &str) -> Option<&TensorView> {
        self.get(name)
    }
}

/// The tensors of `weights` for `cfg`, checked (all bf16).
fn resolve_bf16(cfg: &ModelConfig, weights: &dyn GpuWeights) -> Result<ModelTensors<TensorView>> {
    let w = ModelTensors::resolve(cfg, |name| weights.tensor(name))?;
    w.try_map(|name, t| {
        if t.dtype == DType::BF16 {
            Ok(())
        } else {
            Err(EngineError::tensor(
                name,
                format!(
                    "dtype {}: the GPU engine reads bf16 weights (convert the model to bf16, \
                     or run it on the CPU)",
                    t.dtype
                ),
            ))
        }
    })?;
    Ok(w)
}

/// A decoder on one GPU with its KV cache (one sequence).
///
/// The weights are read in place from a [`GpuWeights`]; an engine can be
/// [unbound](GpuEngine::unbind) from them (it keeps its kernels, buffers and
/// cache, and refuses to run) and [bound](GpuEngine::bind) to another copy of
/// the same model on the same GPU: the daemon binds it to a leased copy for
/// each request, so an idle engine holds no lease.
pub struct GpuEngine {
    cfg: ModelConfig,
    model: Option<Arc<dyn GpuWeights>>,
    w: ModelTensors<TensorView>,
    ops: Ops,
    b: Buffers,
    max_seq: usize,
    batch: usize,
    pos: usize,
    logits: Vec<f32>,
    ids_host: Vec<i32>,
    device: String,
    hf_rounding: bool,
    bf16_logits: bool,
    /// [`GpuOptions::fused_decode`], and the bound weights allow it.
    fused_decode: bool,
    /// [`GpuOptions::fused_decode`] as asked.
    fused_asked: bool,
}

/// What an engine needs besides its weights, made before (or while) they
/// arrive: kernels and cuBLAS on a stream, activations, KV cache.
struct Prepared {
    ops: Ops,
    b: Buffers,
    max_seq: usize,
    batch: usize,
    device: String,
}

impl Prepared {
    fn prepare(gpu: &Gpu, cfg: &ModelConfig, opts: &GpuOptions) -> Result<Prepared> {
        if cfg.head_dim > MAX_HEAD_DIM {
            return Err(EngineError::Invalid(format!(
                "head_dim {} exceeds the GPU engine's {MAX_HEAD_DIM}",
                cfg.head_dim
            )));
        }
        let (max_seq, batch) = opts.shape(cfg);
        let cache_dir = opts
            .kernel_cache
            .clone()
            .or_else(|| default_kernel_cache(None));
        let ops = Ops::new(gpu, cache_dir.as_deref()).map_err(dev)?;
        if opts.blas_at_load {
            ops.load_blas().map_err(dev)?;
        }
        let b = Buffers::new(gpu, cfg, batch, max_seq).map_err(dev)?;
        let info = gpu.info().map_err(dev)?;
        Ok(Prepared {
            ops,
            b,
            max_seq,
            batch,
            device: format!("cuda:{} ({})", info.ordinal, info.name),
        })
    }
}

/// One matrix of a fused product: tensor `w` of the weights in `mem`.
fn gemv_part<'a>(
    mem: &'a DeviceMemory,
    w: &TensorView,
    out: DevView<'a>,
    rows: usize,
    mode: GemvOut,
) -> std::result::Result<GemvPart<'a>, CudaError> {
    Ok(GemvPart {
        w: DevView::new(mem, w.offset as usize, w.length as usize)?,
        out,
        rows,
        mode,
    })
}

/// Whether the fused decode kernels can read these weights: every matrix's
/// rows are whole 16-byte vectors at 16-byte aligned addresses.
fn gemv_fits(cfg: &ModelConfig, w: &ModelTensors<TensorView>, mem: &DeviceMemory) -> bool {
    let dims_ok = [cfg.hidden_size, cfg.q_dim(), cfg.intermediate_size]
        .iter()
        .all(|d| d % 8 == 0);
    let mut aligned = mem.device_ptr() % 16 == 0;
    let _ = w.try_map(|_, t| {
        aligned &= t.offset % 16 == 0;
        Ok(())
    });
    dims_ok && aligned
}

impl GpuEngine {
    /// Builds the engine on weights already resident on a GPU (a
    /// [`GpuModel`] from flash-load, shared: the engine reads it in place).
    pub fn new(cfg: ModelConfig, model: Arc<GpuModel>, opts: &GpuOptions) -> Result<Self> {
        Self::with_weights(cfg, model, opts)
    }

    /// Builds the engine on weights already resident on a GPU, wherever
    /// they are (read in place, never copied).
    pub fn with_weights(
        cfg: ModelConfig,
        model: Arc<dyn GpuWeights>,
        opts: &GpuOptions,
    ) -> Result<Self> {
        let gpu = model.memory().gpu().clone();
        let parts = Prepared::prepare(&gpu, &cfg, opts)?;
        Self::assemble(cfg, model, parts, opts)
    }

    /// The engine from its weights and what [`Prepared::prepare`] made.
    fn assemble(
        cfg: ModelConfig,
        model: Arc<dyn GpuWeights>,
        parts: Prepared,
        opts: &GpuOptions,
    ) -> Result<Self> {
        let w = resolve_bf16(&cfg, model.as_ref())?;
        let fused_decode = opts.fused_decode && gemv_fits(&cfg, &w, model.memory());
        let Prepared {
            ops,
            b,
            max_seq,
            batch,
            device,
        } = parts;
        Ok(GpuEngine {
            fused_decode,
            fused_asked: opts.fused_decode,
            logits: vec![0f32; cfg.vocab_size],
            ids_host: vec![0i32; batch],
            device,
            hf_rounding: opts.hf_rounding,
            bf16_logits: opts.bf16_logits,
            cfg,
            model: Some(model),
            w,
            ops,
            b,
            max_seq,
            batch,
            pos: 0,
        })
    }

    /// Reads the model folder `dir` (flash format or safetensors) into one
    /// allocation on `gpu` and builds the engine on it. The kernels, the
    /// cuBLAS handle, the activations and the KV cache are made on another
    /// thread while the weights stream in (a cold start pays for the
    /// longer of the two, not their sum).
    pub fn load(
        dir: &Path,
        gpu: &Gpu,
        load: &LoadOptions,
        opts: &GpuOptions,
    ) -> Result<(Self, GpuLoadReport)> {
        let cfg = ModelConfig::from_dir(dir)?;
        let source = ModelSource::open(dir)?;
        Self::load_from(cfg, &source, gpu, load, opts)
    }

    /// [`GpuEngine::load`] of a model whose config and folder the caller
    /// has already read (`flash run` reads them before it picks a device).
    pub fn load_from(
        cfg: ModelConfig,
        source: &ModelSource,
        gpu: &Gpu,
        load: &LoadOptions,
        opts: &GpuOptions,
    ) -> Result<(Self, GpuLoadReport)> {
        let t0 = Instant::now();
        let (loaded, prepared) = std::thread::scope(|s| {
            let prep = s.spawn(|| {
                let t = Instant::now();
                Prepared::prepare(gpu, &cfg, opts).map(|p| (p, t.elapsed()))
            });
            let loaded = load_to_gpu(source, None, gpu, load, None);
            let prepared = prep.join().unwrap_or_else(|_| {
                Err(EngineError::Invalid(
                    "preparing the GPU engine panicked".into(),
                ))
            });
            (loaded, prepared)
        });
        let (model, stats) = loaded?;
        let load_time = t0.elapsed();
        let (parts, setup) = prepared?;
        let engine = Self::assemble(cfg, Arc::new(model), parts, opts)?;
        Ok((
            engine,
            GpuLoadReport {
                load: load_time,
                stats,
                setup,
            },
        ))
    }

    /// Turns the fused decode kernels on or off ([`GpuOptions::fused_decode`]);
    /// returns whether they are now used (not for unaligned weights).
    pub fn set_fused_decode(&mut self, on: bool) -> bool {
        self.fused_asked = on;
        self.fused_decode = on
            && self
                .model
                .as_ref()
                .is_some_and(|m| gemv_fits(&self.cfg, &self.w, m.memory()));
        self.fused_decode
    }

    /// How the kernels were obtained (compiled, or from the disk cache).
    pub fn kernel_info(&self) -> &KernelInfo {
        self.ops.kernel_info()
    }

    /// The weights this engine reads (`None` while unbound).
    pub fn model(&self) -> Option<&Arc<dyn GpuWeights>> {
        self.model.as_ref()
    }

    /// Reads the weights from `weights` from now on: another copy of the
    /// same model (same config, bf16) on this engine's GPU. The cache is
    /// emptied.
    pub fn bind(&mut self, weights: Arc<dyn GpuWeights>) -> Result<()> {
        let ours = self.ops_gpu_ordinal();
        let theirs = weights.memory().gpu().ordinal();
        if ours != theirs {
            return Err(EngineError::Invalid(format!(
                "the engine runs on GPU {ours}, the weights are on GPU {theirs}"
            )));
        }
        self.w = resolve_bf16(&self.cfg, weights.as_ref())?;
        self.fused_decode = self.fused_asked && gemv_fits(&self.cfg, &self.w, weights.memory());
        self.model = Some(weights);
        self.pos = 0;
        Ok(())
    }

    /// Lets go of the weights (the engine keeps everything else); a forward
    /// is refused until [`GpuEngine::bind`].
    pub fn unbind(&mut self) {
        self.model = None;
        self.pos = 0;
    }

    fn ops_gpu_ordinal(&self) -> usize {
        self.b.x.gpu().ordinal()
    }

    /// The weights' memory, or an error while unbound.
    fn weights_mem(&self) -> std::result::Result<&DeviceMemory, CudaError> {
        self.model
            .as_ref()
            .map(|m| m.memory())
            .ok_or_else(|| CudaError::Usage("the engine has no weights bound".into()))
    }

    /// Bytes of weights one decode step reads: every layer, the final norm
    /// and the output matrix (the embedding table is gathered, one row).
    pub fn decode_weight_bytes(&self) -> u64 {
        let mut total = 0u64;
        let _ = self.w.try_map(|name, t| {
            if name != "model.embed_tokens.weight" {
                total += t.length;
            }
            Ok(())
        });
        if self.w.lm_head.is_none() {
            total += self.w.embed_tokens.length;
        }
        total
    }

    fn check(&self, tokens: &[u32], pos: usize) -> Result<()> {
        if self.model.is_none() {
            return Err(EngineError::Invalid(
                "the GPU engine has no weights bound".into(),
            ));
        }
        if tokens.is_empty() {
            return Err(EngineError::Invalid("forward of no tokens".into()));
        }
        if pos > self.pos {
            return Err(EngineError::Invalid(format!(
                "forward at position {pos}, but the cache holds only {} positions",
                self.pos
            )));
        }
        if pos + tokens.len() > self.max_seq {
            return Err(EngineError::ContextFull {
                needed: pos + tokens.len(),
                max: self.max_seq,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(EngineError::Invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// Runs the decoder layers on `tokens` (at most `batch`) at `pos..`;
    /// leaves the residual stream in `x`.
    fn layers(&mut self, tokens: &[u32], pos: usize) -> Result<()> {
        let n = tokens.len();
        for (d, &t) in self.ids_host.iter_mut().zip(tokens) {
            *d = t as i32;
        }
        DevView::whole(&self.b.ids)
            .copy_from_host_i32(&self.ids_host[..n])
            .map_err(dev)?;
        self.queue_layers(n, pos, Parts::All).map_err(dev)
    }

    fn queue_layers(
        &self,
        n: usize,
        pos: usize,
        parts: Parts,
    ) -> std::result::Result<(), CudaError> {
        let (gemms, others) = match parts {
            Parts::All => (u8::MAX, true),
            Parts::Gemms(mask) => (mask, false),
            Parts::Others => (0, true),
        };
        // Which products run (bit i: q, k, v, o, gate, up, down).
        let g = |bit: u8| gemms & (1 << bit) != 0;
        let cfg = &self.cfg;
        let (o, b) = (&self.ops, &self.b);
        let (h, qd, kvd, inter) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        let eps = cfg.rms_norm_eps as f32;
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();
        let mem = self.weights_mem()?;
        let wv = |t: &TensorView| DevView::new(mem, t.offset as usize, t.length as usize);
        let all = DevView::whole;
        let (x, xn, q, k, v) = (all(&b.x), all(&b.xn), all(&b.q), all(&b.k), all(&b.v));
        let (attn, gate, up) = (all(&b.attn), all(&b.gate), all(&b.up));
        let shape = AttnShape {
            tokens: n,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            pos0: pos,
            max_seq: self.max_seq,
        };
        let cache_bytes = shape.cache_elements() * 2;
        let kv = all(&b.kv);
        if others {
            o.embed(
                all(&b.ids),
                wv(&self.w.embed_tokens)?,
                x,
                n,
                h,
                cfg.vocab_size,
            )?;
        }
        // Decode and short chunks: the fused matrix-vector kernels (q/k/v in
        // one launch, gate/up with the activation, the residual add in
        // o/down).
        let fused = self.fused_decode && n <= FUSED_MAX_TOKENS;
        let resid = if self.hf_rounding {
            GemvOut::AddRounded
        } else {
            GemvOut::AddF32
        };
        let part = |w: &TensorView, out, rows, mode| gemv_part(mem, w, out, rows, mode);
        let delta = all(&b.delta);
        for (l, lw) in self.w.layers.iter().enumerate() {
            let kc = kv.sub(2 * l * cache_bytes, cache_bytes)?;
            let vc = kv.sub((2 * l + 1) * cache_bytes, cache_bytes)?;
            // The products, each queued when its bit is set (fused: q's bit
            // runs q/k/v, gate's runs gate/up and the activation).
            let qkv = || -> std::result::Result<(), CudaError> {
                if fused {
                    if g(0) {
                        let parts = [
                            part(&lw.q_proj, q, qd, GemvOut::Bf16)?,
                            part(&lw.k_proj, k, kvd, GemvOut::Bf16)?,
                            part(&lw.v_proj, v, kvd, GemvOut::Bf16)?,
                        ];
                        o.gemv(xn, h, n, &parts)?;
                    }
                    return Ok(());
                }
                for (bit, w, out, rows) in [
                    (0, &lw.q_proj, q, qd),
                    (1, &lw.k_proj, k, kvd),
                    (2, &lw.v_proj, v, kvd),
                ] {
                    if g(bit) {
                        o.gemm(xn, wv(w)?, out, OutType::Bf16, n, rows, h, false)?;
                    }
                }
                Ok(())
            };
            // A product added to the residual stream `x`.
            let residual = |bit: u8, w: &TensorView, input: DevView<'_>, inner: usize| {
                if !g(bit) {
                    return Ok(());
                }
                if fused {
                    o.gemv(input, inner, n, &[part(w, x, h, resid)?])
                } else if self.hf_rounding {
                    o.gemm(input, wv(w)?, delta, OutType::Bf16, n, h, inner, false)?;
                    o.residual_add(x, delta, n * h, true)
                } else {
                    o.gemm(input, wv(w)?, x, OutType::F32, n, h, inner, true)
                }
            };
            let mlp_in = || -> std::result::Result<(), CudaError> {
                if fused {
                    if g(4) {
                        o.gemv_swiglu(xn, h, n, wv(&lw.gate_proj)?, wv(&lw.up_proj)?, gate, inter)?;
                    }
                    return Ok(());
                }
                if g(4) {
                    o.gemm(
                        xn,
                        wv(&lw.gate_proj)?,
                        gate,
                        OutType::Bf16,
                        n,
                        inter,
                        h,
                        false,
                    )?;
                }
                if g(5) {
                    o.gemm(xn, wv(&lw.up_proj)?, up, OutType::Bf16, n, inter, h, false)?;
                }
                if others {
                    o.swiglu(gate, up, gate, n * inter)?;
                }
                Ok(())
            };
            if others {
                o.rmsnorm_f32(x, wv(&lw.input_layernorm)?, xn, n, h, eps)?;
            }
            qkv()?;
            if !others {
                residual(3, &lw.o_proj, attn, qd)?;
                mlp_in()?;
                residual(6, &lw.down_proj, gate, inter)?;
                continue;
            }
            let norms = match (&lw.q_norm, &lw.k_norm) {
                (Some(a), Some(c)) => Some((wv(a)?, wv(c)?)),
                _ => None,
            };
            let biases = match (&lw.q_bias, &lw.k_bias, &lw.v_bias) {
                (Some(a), Some(c), Some(d)) => Some((wv(a)?, wv(c)?, wv(d)?)),
                _ => None,
            };
            o.qk_norm_rope_cache(
                &shape,
                q,
                k,
                v,
                norms,
                biases,
                all(&b.cos),
                all(&b.sin),
                kc,
                vc,
                eps,
                self.hf_rounding,
            )?;
            o.attention(&shape, q, kc, vc, attn, all(&b.scratch), scale)?;
            residual(3, &lw.o_proj, attn, qd)?;
            o.rmsnorm_f32(x, wv(&lw.post_attention_layernorm)?, xn, n, h, eps)?;
            mlp_in()?;
            residual(6, &lw.down_proj, gate, inter)?;
        }
        Ok(())
    }

    /// Where one decode step's time goes (for `flash bench-engine`): the
    /// whole step, the CPU time to queue it, the products alone (each kind
    /// over every layer, with its bandwidth) and the other kernels alone.
    /// Leaves the cache at `pos` positions (the step's keys are rewritten).
    pub fn profile_decode(&mut self, pos: usize, reps: usize) -> Result<DecodeProfile> {
        if pos == 0 || pos >= self.max_seq || pos > self.pos {
            return Err(EngineError::Invalid(format!(
                "profile at position {pos}: the cache holds {} of {} positions",
                self.pos, self.max_seq
            )));
        }
        let reps = reps.max(1);
        let time = |s: &Self, parts: Parts, logits: bool| -> Result<(f64, f64)> {
            let mut best = (f64::MAX, f64::MAX);
            for _ in 0..reps {
                s.synchronize()?;
                let t = Instant::now();
                s.queue_layers(1, pos, parts).map_err(dev)?;
                if logits {
                    s.queue_logits(0, 1).map_err(dev)?;
                }
                let queued = t.elapsed().as_secs_f64();
                s.synchronize()?;
                best.0 = best.0.min(t.elapsed().as_secs_f64());
                best.1 = best.1.min(queued);
            }
            Ok(best)
        };
        let (step, queue) = time(self, Parts::All, true)?;
        let (others, _) = time(self, Parts::Others, false)?;
        let (gemms, _) = time(self, Parts::Gemms(u8::MAX), false)?;
        let (lm_head, _) = {
            let mut best = f64::MAX;
            for _ in 0..reps {
                self.synchronize()?;
                let t = Instant::now();
                self.queue_logits(0, 1).map_err(dev)?;
                self.synchronize()?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            (best, 0.0)
        };
        let l0 = &self.w.layers[0];
        // (mask bit, name, weight bytes of one layer)
        let groups: Vec<(u8, &str, u64)> = if self.fused_decode {
            vec![
                (
                    0,
                    "qkv_proj (fused)",
                    l0.q_proj.length + l0.k_proj.length + l0.v_proj.length,
                ),
                (3, "o_proj (+ residual)", l0.o_proj.length),
                (
                    4,
                    "gate_up_proj (+ swiglu)",
                    l0.gate_proj.length + l0.up_proj.length,
                ),
                (6, "down_proj (+ residual)", l0.down_proj.length),
            ]
        } else {
            vec![
                (0, "q_proj", l0.q_proj.length),
                (1, "k_proj", l0.k_proj.length),
                (2, "v_proj", l0.v_proj.length),
                (3, "o_proj", l0.o_proj.length),
                (4, "gate_proj", l0.gate_proj.length),
                (5, "up_proj", l0.up_proj.length),
                (6, "down_proj", l0.down_proj.length),
            ]
        };
        let mut products = Vec::new();
        for (bit, name, size) in groups {
            let (t, _) = time(self, Parts::Gemms(1 << bit), false)?;
            let bytes = size as f64 * self.w.layers.len() as f64;
            products.push(ProductTime {
                name: name.to_string(),
                ms: t * 1e3,
                gbps: bytes / t / 1e9,
            });
        }
        let out_bytes = self.w.output().length as f64;
        products.push(ProductTime {
            name: "lm_head (+ final norm)".into(),
            ms: lm_head * 1e3,
            gbps: out_bytes / lm_head / 1e9,
        });
        Ok(DecodeProfile {
            step_ms: step * 1e3,
            queue_ms: queue * 1e3,
            products_ms: gemms * 1e3,
            others_ms: others * 1e3,
            products,
        })
    }

    /// Queues the final norm and lm_head for residual rows
    /// `first..first + rows` (rows <= LOGIT_ROWS) into the logits buffer.
    fn queue_logits(&self, first: usize, rows: usize) -> std::result::Result<(), CudaError> {
        let cfg = &self.cfg;
        let (o, b) = (&self.ops, &self.b);
        let h = cfg.hidden_size;
        let x = DevView::whole(&b.x).sub(first * h * 4, rows * h * 4)?;
        let norm = &self.w.norm;
        let out_w = self.w.output();
        let mem = self.weights_mem()?;
        let wv = |t: &TensorView| DevView::new(mem, t.offset as usize, t.length as usize);
        let xn = DevView::whole(&b.xn);
        o.rmsnorm_f32(x, wv(norm)?, xn, rows, h, cfg.rms_norm_eps as f32)?;
        let v = cfg.vocab_size;
        if self.fused_decode && rows <= FUSED_MAX_TOKENS {
            let mode = if self.bf16_logits {
                GemvOut::F32OfBf16
            } else {
                GemvOut::F32
            };
            let part = GemvPart {
                w: wv(out_w)?,
                out: DevView::whole(&b.logits),
                rows: v,
                mode,
            };
            return o.gemv(xn, h, rows, &[part]);
        }
        if self.bf16_logits {
            let l16 = DevView::whole(&b.logits16);
            o.gemm(xn, wv(out_w)?, l16, OutType::Bf16, rows, v, h, false)?;
            o.bf16_to_f32(l16, DevView::whole(&b.logits), rows * v)
        } else {
            let l = DevView::whole(&b.logits);
            o.gemm(xn, wv(out_w)?, l, OutType::F32, rows, v, h, false)
        }
    }

    /// Runs every chunk but the last, returns the last chunk's length.
    fn run_chunks(
        &mut self,
        tokens: &[u32],
        pos: usize,
        mut each: impl FnMut(&mut Self, usize, usize) -> Result<()>,
    ) -> Result<()> {
        self.check(tokens, pos)?;
        self.pos = pos;
        let mut at = 0;
        while at < tokens.len() {
            let n = self.batch.min(tokens.len() - at);
            self.layers(&tokens[at..at + n], pos + at)?;
            // The cache now holds these positions.
            self.pos = pos + at + n;
            each(self, at, n)?;
            at += n;
        }
        Ok(())
    }

    /// Like [`Backend::forward`], but returns the most likely next token
    /// (argmax on the device: 4 bytes come back instead of the logits).
    pub fn forward_greedy(&mut self, tokens: &[u32], pos: usize) -> Result<u32> {
        let total = tokens.len();
        self.run_chunks(tokens, pos, |s, at, n| {
            if at + n == total {
                s.queue_logits(n - 1, 1).map_err(dev)?;
                s.ops
                    .argmax(
                        DevView::whole(&s.b.logits),
                        DevView::whole(&s.b.argmax),
                        1,
                        s.cfg.vocab_size,
                    )
                    .map_err(dev)?;
            }
            Ok(())
        })?;
        let mut id = [0u8; 4];
        DevView::whole(&self.b.argmax)
            .copy_to_host(&mut id)
            .map_err(dev)?;
        Ok(i32::from_le_bytes(id).max(0) as u32)
    }

    /// Waits for all queued work (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.ops.synchronize().map_err(dev)
    }
}

/// The byte length of each of [`Buffers`]' allocations: one place for the
/// allocation and for [`GpuOptions::engine_bytes`].
struct BufferLens([usize; 17]);

impl BufferLens {
    fn new(cfg: &ModelConfig, batch: usize, max_seq: usize) -> Self {
        let (h, qd, kvd, inter, v) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let hd = cfg.head_dim;
        let half = hd / 2;
        // Lengths as saturating products: a validated shape keeps each
        // dimension below 2^31 and the batch is at most 2^16, but the KV
        // cache multiplies three dimensions with the context, which the
        // caller sets. A length that does not fit is usize::MAX, so its
        // allocation (and the tier's reservation) fails by name instead of
        // wrapping around to a small buffer.
        let len = |parts: &[usize]| parts.iter().fold(1usize, |p, &n| p.saturating_mul(n));
        let cache = len(&[
            cfg.num_hidden_layers,
            2,
            cfg.num_key_value_heads,
            max_seq,
            hd,
            2,
        ]);
        // In the order of `Buffers`' fields; at least 4 bytes each.
        BufferLens(
            [
                len(&[batch, h, 4]),
                len(&[batch, h, 2]),
                len(&[batch, qd, 2]),
                len(&[batch, kvd, 2]),
                len(&[batch, kvd, 2]),
                len(&[batch, qd, 2]),
                len(&[batch, inter, 2]),
                len(&[batch, inter, 2]),
                len(&[batch, h, 2]),
                len(&[LOGIT_ROWS, v, 4]),
                len(&[LOGIT_ROWS, v, 2]),
                batch * 4,
                LOGIT_ROWS * 4,
                attention_scratch_bytes(hd),
                len(&[max_seq, half, 4]),
                len(&[max_seq, half, 4]),
                cache,
            ]
            .map(|n| n.max(4)),
        )
    }

    fn all(&self) -> &[usize; 17] {
        &self.0
    }
}

impl Buffers {
    fn new(
        gpu: &Gpu,
        cfg: &ModelConfig,
        batch: usize,
        max_seq: usize,
    ) -> std::result::Result<Buffers, CudaError> {
        let half = cfg.head_dim / 2;
        let [x, xn, q, k, v, attn, gate, up, delta, logits, logits16, ids, argmax, scratch, cos, sin, kv] =
            *BufferLens::new(cfg, batch, max_seq).all();
        let alloc = |bytes: usize| gpu.alloc(bytes);
        let b = Buffers {
            x: alloc(x)?,
            xn: alloc(xn)?,
            q: alloc(q)?,
            k: alloc(k)?,
            v: alloc(v)?,
            attn: alloc(attn)?,
            gate: alloc(gate)?,
            up: alloc(up)?,
            delta: alloc(delta)?,
            logits: alloc(logits)?,
            logits16: alloc(logits16)?,
            ids: alloc(ids)?,
            argmax: alloc(argmax)?,
            scratch: alloc(scratch)?,
            cos: alloc(cos)?,
            sin: alloc(sin)?,
            kv: alloc(kv)?,
        };
        // Unwritten cache rows are never read (attention reads 0..=pos),
        // but zeros make a bug visible as zeros, not as garbage.
        b.kv.fill(0)?;
        let inv = cfg.rope_inv_freq();
        let mut cos = Vec::with_capacity(max_seq * half);
        let mut sin = Vec::with_capacity(max_seq * half);
        for p in 0..max_seq {
            for f in &inv {
                let (s, c) = (p as f64 * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        b.cos.copy_from_host(0, &bytes(&cos))?;
        b.sin.copy_from_host(0, &bytes(&sin))?;
        Ok(b)
    }
}

impl Backend for GpuEngine {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn device(&self) -> String {
        self.device.clone()
    }

    fn position(&self) -> usize {
        self.pos
    }

    fn max_seq_len(&self) -> usize {
        self.max_seq
    }

    fn reset(&mut self) {
        self.pos = 0;
    }

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<&[f32]> {
        let total = tokens.len();
        self.run_chunks(tokens, pos, |s, at, n| {
            if at + n == total {
                s.queue_logits(n - 1, 1).map_err(dev)?;
            }
            Ok(())
        })?;
        DevView::whole(&self.b.logits)
            .copy_to_host_f32(&mut self.logits)
            .map_err(dev)?;
        Ok(&self.logits)
    }

    fn forward_all(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>> {
        let v = self.cfg.vocab_size;
        let mut out = vec![0f32; tokens.len() * v];
        self.run_chunks(tokens, pos, |s, at, n| {
            let mut r = 0;
            while r < n {
                let rows = LOGIT_ROWS.min(n - r);
                s.queue_logits(r, rows).map_err(dev)?;
                let dst = &mut out[(at + r) * v..(at + r + rows) * v];
                DevView::whole(&s.b.logits)
                    .copy_to_host_f32(dst)
                    .map_err(dev)?;
                r += rows;
            }
            Ok(())
        })?;
        Ok(out)
    }
}

/// How two sets of logits `[positions, vocab]` agree.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LogitsAgreement {
    pub positions: usize,
    /// Positions whose argmax is the same.
    pub top1_agree: usize,
    pub min_cosine: f64,
    pub mean_cosine: f64,
    pub max_abs_diff: f64,
}

impl LogitsAgreement {
    pub fn top1_fraction(&self) -> f64 {
        if self.positions == 0 {
            return 0.0;
        }
        self.top1_agree as f64 / self.positions as f64
    }

    /// The bar: top-1 agreement >= `top1` and cosine >= `cosine` at
    /// every position.
    pub fn passes(&self, top1: f64, cosine: f64) -> bool {
        self.positions > 0 && self.top1_fraction() >= top1 && self.min_cosine >= cosine
    }
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] || row[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Compares logits row by row (cosine similarity, argmax, largest
/// difference). Rows are `vocab` long; a length mismatch or a non-finite
/// value makes the cosine of that row 0 (a failure).
pub fn compare_logits(a: &[f32], b: &[f32], vocab: usize) -> LogitsAgreement {
    let vocab = vocab.max(1);
    let positions = a.len().min(b.len()) / vocab;
    let mut top1_agree = 0;
    let mut min_cosine = if a.len() == b.len() && positions > 0 {
        f64::INFINITY
    } else {
        0.0
    };
    let mut sum_cos = 0.0;
    let mut max_abs_diff = 0f64;
    for (ra, rb) in a.chunks_exact(vocab).zip(b.chunks_exact(vocab)) {
        let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
        let mut finite = true;
        for (&x, &y) in ra.iter().zip(rb) {
            finite &= x.is_finite() && y.is_finite();
            let (x, y) = (x as f64, y as f64);
            dot += x * y;
            na += x * x;
            nb += y * y;
            max_abs_diff = max_abs_diff.max((x - y).abs());
        }
        let cos = if finite && na > 0.0 && nb > 0.0 {
            dot / (na.sqrt() * nb.sqrt())
        } else if finite && na == 0.0 && nb == 0.0 {
            1.0
        } else {
            0.0
        };
        min_cosine = min_cosine.min(cos);
        sum_cos += cos;
        if argmax(ra) == argmax(rb) {
            top1_agree += 1;
        }
    }
    LogitsAgreement {
        positions,
        top1_agree,
        min_cosine: if positions == 0 { 0.0 } else { min_cosine },
        mean_cosine: if positions == 0 {
            0.0
        } else {
            sum_cos / positions as f64
        },
        max_abs_diff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_default_to_a_bounded_cache() {
        let o = GpuOptions::default();
        assert_eq!(o.batch_tokens, 512);
        assert!(o.max_seq_len.is_none());
        assert!(o.kernel_cache.is_none());
    }

    #[test]
    fn logits_comparison() {
        let a = [1.0, 2.0, 3.0, 0.5, 0.1, 0.2];
        let same = compare_logits(&a, &a, 3);
        assert_eq!(same.positions, 2);
        assert_eq!(same.top1_agree, 2);
        assert!((same.min_cosine - 1.0).abs() < 1e-12);
        assert!(same.passes(0.95, 0.999));
        // Second row's argmax moves and its direction changes.
        let b = [1.0, 2.0, 3.0, 0.1, 0.5, 0.2];
        let d = compare_logits(&a, &b, 3);
        assert_eq!(d.top1_agree, 1);
        assert!(d.min_cosine < 0.9);
        assert!((d.max_abs_diff - 0.4).abs() < 1e-6);
        assert!(!d.passes(0.95, 0.999));
        // NaN or a length mismatch fails.
        let n = [1.0, f32::NAN, 3.0];
        assert_eq!(compare_logits(&n, &a[..3], 3).min_cosine, 0.0);
        assert!(!compare_logits(&a, &a[..3], 3).passes(0.0, 0.5));
        assert!(!compare_logits(&[], &[], 3).passes(0.0, 0.0));
    }

    /// The GPU engine against the CPU reference on a tiny synthesized
    /// model (the GPU machine runs the same through `flash selftest`).
    #[test]
    #[ignore = "needs a GPU"]
    fn gpu_matches_cpu_on_a_tiny_model() {
        use crate::cpu::{CpuModel, CpuOptions};
        let cuda = flash_sys::cuda::probe().expect("a GPU");
        let gpu = cuda.device(0).unwrap();
        for arch in [flash_synth::Arch::Qwen3, flash_synth::Arch::Llama] {
            let dir = tempfile::tempdir().unwrap();
            let spec = flash_synth::spec(arch, "tiny").unwrap();
            flash_synth::synth(&spec, dir.path(), &Default::default()).unwrap();
            let lo = LoadOptions::default();
            let (mut cpu, _) = CpuModel::load(dir.path(), &lo, &CpuOptions::default()).unwrap();
            let opts = GpuOptions {
                kernel_cache: Some(dir.path().join("kernels")),
                ..Default::default()
            };
            let (mut g, _) = GpuEngine::load(dir.path(), &gpu, &lo, &opts).unwrap();
            let v = cpu.config().vocab_size;
            let tokens: Vec<u32> = (0..64).map(|i| (i * 7 + 3) as u32 % v as u32).collect();
            let want = cpu.forward_all(&tokens, 0).unwrap();
            let got = g.forward_all(&tokens, 0).unwrap();
            let agree = compare_logits(&got, &want, v);
            assert!(agree.passes(0.95, 0.999), "{arch:?}: {agree:?}");
        }
    }
}
