//! The GPU operations of the inference engine: its kernels (`kernels.cu`,
//! through the generic [`Module`] API), cuBLAS matrix products, and the
//! checks every op makes on its views before anything is queued.
//!
//! # The surface
//! - [`DevView`]: a byte range of a [`DeviceMemory`](flash_sys::cuda::DeviceMemory)
//!   (a model's weights as the loader placed them, the engine's activations,
//!   the KV cache). Every op checks that each view holds the bytes its shapes
//!   need, is aligned for its element type and lives on the op's GPU.
//! - [`Ops::new`] → one stream and the kernels ([`Kernels`]: compiled once
//!   per source/GPU architecture/NVRTC version and cached in a folder). The
//!   cuBLAS handle ([`Blas`]) on that stream is made by [`Ops::load_blas`]
//!   or by the first [`Ops::gemm`]: its libraries are ~600 MB, which a cold
//!   start whose products all fit [`Ops::gemv`] never reads. Every op is
//!   queued on that stream; nothing here allocates after `new` but cuBLAS's
//!   own workspace.
//! - Element types: weights and most activations are bf16; the residual
//!   stream, logits and softmax are f32; token ids and argmax results i32.
//! - [`check`]: every op against a CPU computation (`flash selftest`).
//!
//! Each op is its shapes and one launch: `self.op(kernel)` starts the
//! launch, each `.view(what, view, type, dims)?` checks a view against its
//! shape and adds it as the next argument, scalars follow in the kernel's
//! order (`.int(what, n)?` refuses sizes over 32 bits), and `.launch(grid,
//! block)` queues it.
//!
//! Missing libraries (`libnvrtc` on a cold cache, `libcublas`) are errors
//! that say what is missing, never panics: their entry points are checked
//! before the first call.

pub mod check;

pub use crate::blas::{cublas_available, Blas, OutType};
pub use crate::module::KernelInfo;
pub use crate::nvrtc::{nvrtc_version, ImageKind, KernelImage};
pub use crate::view::DevView;

use crate::module::{CudaSource, LaunchArgs, LaunchConfig, Module};
use flash_sys::cuda::{CudaError, Gpu, Stream};
use std::path::Path;
use std::sync::OnceLock;

/// The CUDA C source of every kernel of the engine.
pub const KERNEL_SOURCE: &str = include_str!("ops/kernels.cu");
/// The largest head dimension the attention kernels take.
pub const MAX_HEAD_DIM: usize = 256;
/// The most pieces decode attention splits the keys into.
pub const MAX_ATTENTION_SPLITS: usize = 32;
const NVRTC_OPTIONS: &[&str] = &["--std=c++17"];
/// The largest grid x dimension a launch here uses.
const MAX_GRID_X: usize = i32::MAX as usize;
/// The largest grid y dimension CUDA takes.
const MAX_GRID_Y: usize = 65535;

/// The engine's kernels as a source: cached as
/// `flash-engine-smXY-<hash>.bin`, the names and format flash-sys used, so
/// caches written before the kernels moved here still hit.
pub const ENGINE_SOURCE: CudaSource<'static> = CudaSource {
    name: "flash-engine",
    code: KERNEL_SOURCE,
    options: NVRTC_OPTIONS,
    functions: &KERNEL_NAMES,
};

// ---------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------

/// Element types of the views the kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Bf16,
    F32,
    I32,
}

impl Ty {
    fn size(self) -> usize {
        match self {
            Ty::Bf16 => 2,
            Ty::F32 | Ty::I32 => 4,
        }
    }
}

/// Refuses a view that does not hold `dims` elements of `ty` (their product,
/// overflow included), is misaligned for `ty`, or lives on another GPU.
fn check_view(
    gpu: &Gpu,
    what: &str,
    v: &DevView<'_>,
    ty: Ty,
    dims: &[usize],
) -> Result<(), CudaError> {
    let bytes = dims
        .iter()
        .try_fold(ty.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| CudaError::Usage(format!("{what}: size overflows")))?;
    v.require(what, bytes)?;
    v.aligned(what, ty.size() as u64)?;
    v.same_gpu(gpu, what)
}

fn int(what: &str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Usage(format!("{what} = {v} exceeds 32 bits")))
}

fn grid_dim(what: &str, v: usize, max: usize) -> Result<u32, CudaError> {
    if v == 0 || v > max {
        return Err(CudaError::Usage(format!(
            "{what} = {v}: a launch needs 1..={max}"
        )));
    }
    Ok(v as u32)
}

/// Threads for one per element of a head (`hd`), in whole warps.
fn warp_multiple(hd: usize) -> u32 {
    (hd.div_ceil(32) * 32) as u32
}

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

/// The kernels of kernels.cu, in [`KERNEL_NAMES`] order.
#[derive(Debug, Clone, Copy)]
enum K {
    Embed,
    RmsF32,
    QkRope,
    Attention,
    AttentionCombine,
    Swiglu,
    ResidualAdd,
    Argmax,
    Bf16ToF32,
    Gemv,
    GemvSwiglu,
}

const KERNEL_COUNT: usize = 11;

const KERNEL_NAMES: [&str; KERNEL_COUNT] = [
    "embed_f32",
    "rmsnorm_f32",
    "qk_norm_rope_cache",
    "attention",
    "attention_combine",
    "swiglu",
    "residual_add",
    "argmax_rows",
    "bf16_to_f32",
    "gemv_bf16",
    "gemv_swiglu",
];

/// The engine's kernels ([`ENGINE_SOURCE`]), loaded into one GPU's context.
#[derive(Debug)]
pub struct Kernels {
    module: Module,
}

impl Kernels {
    /// Compiles (or takes from `cache_dir`) the kernels for `gpu` and loads them.
    pub fn load(gpu: &Gpu, cache_dir: Option<&Path>) -> Result<Kernels, CudaError> {
        Ok(Kernels {
            module: Module::load(gpu, &ENGINE_SOURCE, cache_dir)?,
        })
    }

    pub fn info(&self) -> &KernelInfo {
        self.module.info()
    }

    /// The module the kernels were loaded as.
    pub fn module(&self) -> &Module {
        &self.module
    }
}

// ---------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------

/// How [`Ops::gemv`] writes a product's f32 sum into its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvOut {
    /// `out (bf16) = sum`.
    Bf16,
    /// `out (f32) = sum`.
    F32,
    /// `out (f32) += sum` (an f32 residual stream).
    AddF32,
    /// `out (f32) = bf16(out + bf16(sum))` (a bf16 residual stream, as
    /// transformers keeps it).
    AddRounded,
    /// `out (f32) = bf16(sum)` (bf16 logits, returned as f32).
    F32OfBf16,
}

impl GemvOut {
    /// The mode number of kernels.cu (`GEMV_*`).
    fn mode(self) -> i32 {
        match self {
            GemvOut::Bf16 => 0,
            GemvOut::F32 => 1,
            GemvOut::AddF32 => 2,
            GemvOut::AddRounded => 3,
            GemvOut::F32OfBf16 => 4,
        }
    }

    fn ty(self) -> Ty {
        match self {
            GemvOut::Bf16 => Ty::Bf16,
            _ => Ty::F32,
        }
    }
}

/// One matrix of an [`Ops::gemv`]: `out[t, r] = w[r, :] · x[t, :]` for
/// `rows` rows (`out` is `[tokens, rows]`).
#[derive(Debug, Clone, Copy)]
pub struct GemvPart<'a> {
    pub w: DevView<'a>,
    pub out: DevView<'a>,
    pub rows: usize,
    pub mode: GemvOut,
}

/// Rows (warps) of one [`Ops::gemv`] block.
const GEMV_WARPS: usize = 8;
/// Tokens one gemv launch multiplies (`GEMV_TOKENS` in kernels.cu); more
/// are split over launches, each reading the weights again.
pub const GEMV_TOKENS: usize = 8;

/// Shapes of the attention step of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Tokens of this step (the prompt chunk, or 1 when decoding).
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Position of the first token (tokens already in the cache).
    pub pos0: usize,
    /// Positions the cache holds per KV head.
    pub max_seq: usize,
}

impl AttnShape {
    fn validate(&self) -> Result<(), CudaError> {
        let bad = |why: String| Err(CudaError::Usage(format!("attention {self:?}: {why}")));
        if self.tokens == 0 || self.heads == 0 || self.kv_heads == 0 {
            return bad("empty".into());
        }
        if self.heads % self.kv_heads != 0 {
            return bad("heads must be a multiple of kv_heads".into());
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 || self.head_dim > MAX_HEAD_DIM {
            return bad(format!("head_dim must be even and at most {MAX_HEAD_DIM}"));
        }
        if self.pos0 + self.tokens > self.max_seq {
            return bad("the cache is full".into());
        }
        Ok(())
    }

    /// Elements of one layer's K (or V) cache.
    pub fn cache_elements(&self) -> usize {
        self.kv_heads * self.max_seq * self.head_dim
    }

    /// The dimensions of one layer's K (or V) cache.
    fn cache_dims(&self) -> [usize; 3] {
        [self.kv_heads, self.max_seq, self.head_dim]
    }
}

/// Bytes of the scratch buffer [`Ops::attention`] needs for `head_dim`.
pub fn attention_scratch_bytes(head_dim: usize) -> usize {
    SPLIT_BELOW * MAX_ATTENTION_SPLITS * (head_dim + 2) * 4
}

/// Attention splits the keys over blocks only while tokens × heads is below
/// this (decode); a prefill has blocks enough.
const SPLIT_BELOW: usize = 256;

/// The number of key splits for `tokens` queries ending at `len` keys.
fn attention_splits(tokens: usize, heads: usize, len: usize) -> usize {
    if tokens * heads >= SPLIT_BELOW {
        1
    } else {
        len.div_ceil(64).clamp(1, MAX_ATTENTION_SPLITS)
    }
}

/// One launch of an engine kernel being prepared: each view is checked
/// against its shape as it is added, each size converted to its C type, in
/// the kernel's parameter order. Errors are returned at the step that fails
/// (`?` at each call); nothing is queued before [`OpLaunch::launch`].
struct OpLaunch<'o, 'a> {
    ops: &'o Ops,
    k: K,
    args: LaunchArgs<'a>,
}

impl<'a> OpLaunch<'_, 'a> {
    /// A pointer argument: `v` holds `dims` elements of `ty`.
    fn view(
        mut self,
        what: &str,
        v: DevView<'a>,
        ty: Ty,
        dims: &[usize],
    ) -> Result<Self, CudaError> {
        check_view(self.ops.gpu(), what, &v, ty, dims)?;
        self.args.view(v);
        Ok(self)
    }

    /// [`OpLaunch::view`], or a null pointer for an absent input.
    fn opt_view(
        self,
        what: &str,
        v: Option<DevView<'a>>,
        ty: Ty,
        dims: &[usize],
    ) -> Result<Self, CudaError> {
        match v {
            Some(v) => self.view(what, v, ty, dims),
            None => Ok(self.null()),
        }
    }

    fn null(mut self) -> Self {
        self.args.null();
        self
    }

    /// An `int` argument from a size, refused above `i32::MAX`.
    fn int(mut self, what: &str, v: usize) -> Result<Self, CudaError> {
        self.args.i32(int(what, v)?);
        Ok(self)
    }

    fn i32(mut self, v: i32) -> Self {
        self.args.i32(v);
        self
    }

    /// An `int` argument that is 1 or 0.
    fn flag(self, b: bool) -> Self {
        self.i32(i32::from(b))
    }

    /// A `long long` element count.
    fn count(mut self, what: &str, n: usize) -> Result<Self, CudaError> {
        let n = i64::try_from(n)
            .map_err(|_| CudaError::Usage(format!("{what} = {n} exceeds 63 bits")))?;
        self.args.i64(n);
        Ok(self)
    }

    fn f32(mut self, v: f32) -> Self {
        self.args.f32(v);
        self
    }

    /// Queues the kernel: `grid` blocks of `threads` threads.
    fn launch(self, grid: (u32, u32, u32), threads: u32) -> Result<(), CudaError> {
        self.ops.kernels.module.launch(
            &self.ops.stream,
            self.k as usize,
            LaunchConfig::new(grid, threads),
            &self.args,
        )
    }
}

/// The kernels and cuBLAS on one stream of one GPU.
#[derive(Debug)]
pub struct Ops {
    kernels: Kernels,
    /// Made on first use ([`Ops::blas`]).
    blas: OnceLock<Blas>,
    stream: Stream,
}

impl Ops {
    /// A stream and the kernels (compiled or from `cache_dir`) for `gpu`;
    /// cuBLAS is loaded later ([`Ops::load_blas`]).
    pub fn new(gpu: &Gpu, cache_dir: Option<&Path>) -> Result<Ops, CudaError> {
        let stream = gpu.stream()?;
        let kernels = Kernels::load(gpu, cache_dir)?;
        Ok(Ops {
            kernels,
            blas: OnceLock::new(),
            stream,
        })
    }

    /// Loads cuBLAS and makes its handle now rather than at the first
    /// [`Ops::gemm`].
    pub fn load_blas(&self) -> Result<(), CudaError> {
        self.blas().map(|_| ())
    }

    /// Whether cuBLAS has been loaded.
    pub fn blas_loaded(&self) -> bool {
        self.blas.get().is_some()
    }

    pub fn gpu(&self) -> &Gpu {
        self.stream.gpu()
    }

    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    pub fn kernel_info(&self) -> &KernelInfo {
        self.kernels.info()
    }

    /// The cuBLAS handle, made on the first call. Two threads racing here
    /// may each make one; the loser's is dropped.
    pub fn blas(&self) -> Result<&Blas, CudaError> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        let made = Blas::new(&self.stream)?;
        let _ = self.blas.set(made);
        self.blas
            .get()
            .ok_or_else(|| CudaError::Usage("the cuBLAS handle was not kept".into()))
    }

    /// Waits for every op queued so far.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize()
    }

    /// Starts a launch of kernel `k` on this stream.
    fn op<'a>(&self, k: K) -> OpLaunch<'_, 'a> {
        OpLaunch {
            ops: self,
            k,
            args: LaunchArgs::new(),
        }
    }

    /// `out[t, :] = f32(table[ids[t], :])` for `tokens` ids (i32) into a
    /// `[vocab, hidden]` bf16 table.
    pub fn embed(
        &self,
        ids: DevView<'_>,
        table: DevView<'_>,
        out: DevView<'_>,
        tokens: usize,
        hidden: usize,
        vocab: usize,
    ) -> Result<(), CudaError> {
        self.op(K::Embed)
            .view("embed ids", ids, Ty::I32, &[tokens])?
            .view("embed table", table, Ty::Bf16, &[vocab, hidden])?
            .view("embed output", out, Ty::F32, &[tokens, hidden])?
            .int("hidden", hidden)?
            .int("vocab", vocab)?
            .launch((grid_dim("tokens", tokens, MAX_GRID_X)?, 1, 1), 256)
    }

    fn norm_block(n: usize) -> u32 {
        (n.div_ceil(32) * 32).clamp(32, 512) as u32
    }

    /// RMSNorm of `rows` f32 rows of `n` to bf16: `out = x / rms(x) * w`.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_f32(
        &self,
        x: DevView<'_>,
        w: DevView<'_>,
        out: DevView<'_>,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let grid = (grid_dim("rmsnorm rows", rows, MAX_GRID_X)?, 1, 1);
        self.op(K::RmsF32)
            .view("rmsnorm input", x, Ty::F32, &[rows, n])?
            .view("rmsnorm weight", w, Ty::Bf16, &[n])?
            .view("rmsnorm output", out, Ty::Bf16, &[rows, n])?
            .int("rmsnorm width", n)?
            .f32(eps)
            .launch(grid, Self::norm_block(n))
    }

    /// After the q/k/v projections of `shape.tokens` tokens at positions
    /// `pos0..`: the projections' biases added when given (Qwen2), per-head
    /// RMSNorm of q and k when their weights are given (Qwen3), RoPE with the
    /// `[max_pos, head_dim/2]` f32 tables (q in place), and k, v written into
    /// the layer's caches `[kv_heads, max_seq, head_dim]`. `hf_round` rounds
    /// the rotation as transformers does in bf16 (cos/sin, each product and
    /// the sum to bf16).
    #[allow(clippy::too_many_arguments)]
    pub fn qk_norm_rope_cache(
        &self,
        shape: &AttnShape,
        q: DevView<'_>,
        k: DevView<'_>,
        v: DevView<'_>,
        norms: Option<(DevView<'_>, DevView<'_>)>,
        biases: Option<(DevView<'_>, DevView<'_>, DevView<'_>)>,
        cos: DevView<'_>,
        sin: DevView<'_>,
        k_cache: DevView<'_>,
        v_cache: DevView<'_>,
        eps: f32,
        hf_round: bool,
    ) -> Result<(), CudaError> {
        shape.validate()?;
        let AttnShape {
            tokens: t,
            heads: nq,
            kv_heads: nkv,
            head_dim: hd,
            pos0,
            max_seq,
        } = *shape;
        let (qw, kw) = norms.unzip();
        let (qb, kb, vb) = match biases {
            Some((qb, kb, vb)) => (Some(qb), Some(kb), Some(vb)),
            None => (None, None, None),
        };
        let table = [pos0 + t, hd / 2];
        let grid = (
            grid_dim("tokens", t, MAX_GRID_X)?,
            grid_dim("heads", nq + nkv, MAX_GRID_Y)?,
            1,
        );
        self.op(K::QkRope)
            .view("q", q, Ty::Bf16, &[t, nq, hd])?
            .view("k", k, Ty::Bf16, &[t, nkv, hd])?
            .view("v", v, Ty::Bf16, &[t, nkv, hd])?
            .opt_view("q_norm weight", qw, Ty::Bf16, &[hd])?
            .opt_view("k_norm weight", kw, Ty::Bf16, &[hd])?
            .opt_view("q bias", qb, Ty::Bf16, &[nq, hd])?
            .opt_view("k bias", kb, Ty::Bf16, &[nkv, hd])?
            .opt_view("v bias", vb, Ty::Bf16, &[nkv, hd])?
            .view("rope cos table", cos, Ty::F32, &table)?
            .view("rope sin table", sin, Ty::F32, &table)?
            .view("k cache", k_cache, Ty::Bf16, &shape.cache_dims())?
            .view("v cache", v_cache, Ty::Bf16, &shape.cache_dims())?
            .int("heads", nq)?
            .int("kv_heads", nkv)?
            .int("head_dim", hd)?
            .int("pos0", pos0)?
            .int("max_seq", max_seq)?
            .f32(eps)
            .flag(hf_round)
            .launch(grid, warp_multiple(hd))
    }

    /// Causal GQA attention of `shape.tokens` queries (bf16 `[tokens, heads,
    /// head_dim]`, RoPE applied) against the layer's caches, into `out`
    /// (bf16, same shape). Softmax in f32, scores scaled by `scale`.
    /// `scratch` holds [`attention_scratch_bytes`] bytes (used when decoding).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        shape: &AttnShape,
        q: DevView<'_>,
        k_cache: DevView<'_>,
        v_cache: DevView<'_>,
        out: DevView<'_>,
        scratch: DevView<'_>,
        scale: f32,
    ) -> Result<(), CudaError> {
        shape.validate()?;
        let AttnShape {
            tokens: t,
            heads: nq,
            kv_heads: nkv,
            head_dim: hd,
            pos0,
            max_seq,
        } = *shape;
        let len = pos0 + t;
        let nsplit = attention_splits(t, nq, len);
        // Partial results per split, merged by attention_combine.
        let part = (nsplit > 1).then_some(scratch);
        let part_dims = [t, nq, nsplit, hd + 2];
        let grid = (
            grid_dim("tokens", t, MAX_GRID_X)?,
            grid_dim("heads", nq, MAX_GRID_Y)?,
        );
        self.op(K::Attention)
            .view("attention q", q, Ty::Bf16, &[t, nq, hd])?
            .view("k cache", k_cache, Ty::Bf16, &shape.cache_dims())?
            .view("v cache", v_cache, Ty::Bf16, &shape.cache_dims())?
            .view("attention output", out, Ty::Bf16, &[t, nq, hd])?
            .opt_view("attention scratch", part, Ty::F32, &part_dims)?
            .int("heads", nq)?
            .int("kv_heads", nkv)?
            .int("head_dim", hd)?
            .int("pos0", pos0)?
            .int("max_seq", max_seq)?
            .int("chunk", len.div_ceil(nsplit))?
            .f32(scale)
            .launch((grid.0, grid.1, nsplit as u32), 128)?;
        if nsplit > 1 {
            self.op(K::AttentionCombine)
                .opt_view("attention scratch", part, Ty::F32, &part_dims)?
                .view("attention output", out, Ty::Bf16, &[t, nq, hd])?
                .int("heads", nq)?
                .int("head_dim", hd)?
                .int("splits", nsplit)?
                .launch((grid.0, grid.1, 1), warp_multiple(hd))?;
        }
        Ok(())
    }

    fn elementwise_grid(n: usize) -> (u32, u32, u32) {
        (n.div_ceil(256).clamp(1, 8192) as u32, 1, 1)
    }

    /// `out = silu(gate) * up` over `n` bf16 elements (`out` may be `gate`).
    pub fn swiglu(
        &self,
        gate: DevView<'_>,
        up: DevView<'_>,
        out: DevView<'_>,
        n: usize,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        self.op(K::Swiglu)
            .view("swiglu gate", gate, Ty::Bf16, &[n])?
            .view("swiglu up", up, Ty::Bf16, &[n])?
            .view("swiglu output", out, Ty::Bf16, &[n])?
            .count("swiglu elements", n)?
            .launch(Self::elementwise_grid(n), 256)
    }

    /// `x += d` over `n` elements: f32 residual stream, bf16 update; with
    /// `round`, the sum is rounded to bf16 (transformers' bf16 residual).
    pub fn residual_add(
        &self,
        x: DevView<'_>,
        d: DevView<'_>,
        n: usize,
        round: bool,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        self.op(K::ResidualAdd)
            .view("residual", x, Ty::F32, &[n])?
            .view("residual update", d, Ty::Bf16, &[n])?
            .count("residual elements", n)?
            .flag(round)
            .launch(Self::elementwise_grid(n), 256)
    }

    /// `out (f32) = x (bf16)` over `n` elements.
    pub fn bf16_to_f32(&self, x: DevView<'_>, out: DevView<'_>, n: usize) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        self.op(K::Bf16ToF32)
            .view("bf16_to_f32 input", x, Ty::Bf16, &[n])?
            .view("bf16_to_f32 output", out, Ty::F32, &[n])?
            .count("bf16_to_f32 elements", n)?
            .launch(Self::elementwise_grid(n), 256)
    }

    /// `out[r]` (i32) = index of the first maximum of f32 row `r` of `n`.
    pub fn argmax(
        &self,
        x: DevView<'_>,
        out: DevView<'_>,
        rows: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        self.op(K::Argmax)
            .view("argmax input", x, Ty::F32, &[rows, n])?
            .view("argmax output", out, Ty::I32, &[rows])?
            .int("argmax width", n)?
            .launch((grid_dim("argmax rows", rows, MAX_GRID_X)?, 1, 1), 1024)
    }

    /// Whether [`Ops::gemv`] takes inner dimension `k` and these views:
    /// rows of whole 16-byte vectors, 16-byte aligned.
    pub fn gemv_fits(k: usize, views: &[&DevView<'_>]) -> bool {
        k > 0
            && k % 8 == 0
            && k <= i32::MAX as usize
            && views.iter().all(|v| v.device_ptr() % 16 == 0)
    }

    /// Products of `tokens` bf16 rows `x[tokens, k]` with up to three
    /// row-major bf16 matrices in one launch per [`GEMV_TOKENS`] tokens (a
    /// layer's q, k and v for a decode step or a short prompt):
    /// `part.out[t, r] = part.w[r, :] · x[t, :]`, summed in f32 and written as
    /// `part.mode` says. See [`Ops::gemv_fits`] for what it takes.
    pub fn gemv(
        &self,
        x: DevView<'_>,
        k: usize,
        tokens: usize,
        parts: &[GemvPart<'_>],
    ) -> Result<(), CudaError> {
        if parts.is_empty() || parts.len() > 3 {
            return Err(CudaError::Usage(format!(
                "gemv takes 1 to 3 matrices, not {}",
                parts.len()
            )));
        }
        let views: Vec<&DevView<'_>> = std::iter::once(&x)
            .chain(parts.iter().map(|p| &p.w))
            .collect();
        if !Self::gemv_fits(k, &views) {
            return Err(CudaError::Usage(format!(
                "gemv needs k % 8 == 0 (k = {k}) and 16-byte aligned input and weights"
            )));
        }
        // The whole call's shapes, before the first launch is queued.
        let g = self.gpu();
        check_view(g, "gemv input", &x, Ty::Bf16, &[tokens, k])?;
        for p in parts {
            check_view(g, "gemv weight", &p.w, Ty::Bf16, &[p.rows, k])?;
            check_view(g, "gemv output", &p.out, p.mode.ty(), &[tokens, p.rows])?;
            int("gemv rows", p.rows)?;
        }
        let total: usize = parts.iter().map(|p| p.rows).sum();
        if total == 0 || tokens == 0 {
            return Ok(());
        }
        let grid = grid_dim("gemv blocks", total.div_ceil(GEMV_WARPS), MAX_GRID_X)?;
        for t0 in (0..tokens).step_by(GEMV_TOKENS) {
            let n = GEMV_TOKENS.min(tokens - t0);
            let mut l = self
                .op(K::Gemv)
                .view(
                    "gemv input",
                    x.sub(t0 * k * 2, n * k * 2)?,
                    Ty::Bf16,
                    &[n, k],
                )?
                .int("gemv k", k)?
                .int("gemv tokens", n)?;
            // Three weights, three outputs (these tokens' rows), three row
            // counts, three modes; absent parts are null with 0 rows.
            for i in 0..3 {
                let w = parts.get(i).map(|p| p.w);
                let rows = parts.get(i).map_or(0, |p| p.rows);
                l = l.opt_view("gemv weight", w, Ty::Bf16, &[rows, k])?;
            }
            for i in 0..3 {
                l = match parts.get(i) {
                    Some(p) => {
                        let row = p.rows * p.mode.ty().size();
                        let out = p.out.sub(t0 * row, n * row)?;
                        l.view("gemv output", out, p.mode.ty(), &[n, p.rows])?
                    }
                    None => l.null(),
                };
            }
            for i in 0..3 {
                l = l.int("gemv rows", parts.get(i).map_or(0, |p| p.rows))?;
            }
            for i in 0..3 {
                l = l.i32(parts.get(i).map_or(0, |p| p.mode.mode()));
            }
            l.launch((grid, 1, 1), (GEMV_WARPS * 32) as u32)?;
        }
        Ok(())
    }

    /// `out[t, r] = silu(wg[r, :] · x[t, :]) * (wu[r, :] · x[t, :])` in bf16
    /// for `tokens` rows of `x` and `rows` rows of the weights (an MLP's gate
    /// and up projections and its activation, rounded as [`Ops::swiglu`]
    /// after two bf16 products), one launch per [`GEMV_TOKENS`] tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_swiglu(
        &self,
        x: DevView<'_>,
        k: usize,
        tokens: usize,
        wg: DevView<'_>,
        wu: DevView<'_>,
        out: DevView<'_>,
        rows: usize,
    ) -> Result<(), CudaError> {
        if !Self::gemv_fits(k, &[&x, &wg, &wu]) {
            return Err(CudaError::Usage(format!(
                "gemv_swiglu needs k % 8 == 0 (k = {k}) and 16-byte aligned input and weights"
            )));
        }
        if rows == 0 || tokens == 0 {
            return Ok(());
        }
        // The whole call's shapes, before the first launch is queued.
        let g = self.gpu();
        check_view(g, "gemv_swiglu input", &x, Ty::Bf16, &[tokens, k])?;
        check_view(g, "gemv_swiglu output", &out, Ty::Bf16, &[tokens, rows])?;
        let grid = grid_dim("gemv_swiglu blocks", rows.div_ceil(GEMV_WARPS), MAX_GRID_X)?;
        for t0 in (0..tokens).step_by(GEMV_TOKENS) {
            let n = GEMV_TOKENS.min(tokens - t0);
            self.op(K::GemvSwiglu)
                .view(
                    "gemv_swiglu input",
                    x.sub(t0 * k * 2, n * k * 2)?,
                    Ty::Bf16,
                    &[n, k],
                )?
                .int("gemv_swiglu k", k)?
                .int("gemv_swiglu tokens", n)?
                .view("gemv_swiglu gate weight", wg, Ty::Bf16, &[rows, k])?
                .view("gemv_swiglu up weight", wu, Ty::Bf16, &[rows, k])?
                .view(
                    "gemv_swiglu output",
                    out.sub(t0 * rows * 2, n * rows * 2)?,
                    Ty::Bf16,
                    &[n, rows],
                )?
                .int("gemv_swiglu rows", rows)?
                .launch((grid, 1, 1), (GEMV_WARPS * 32) as u32)?;
        }
        Ok(())
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ (+ y)`, see [`Blas::gemm`].
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        x: DevView<'_>,
        w: DevView<'_>,
        y: DevView<'_>,
        out: OutType,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        x.aligned("gemm input", 2)?;
        w.aligned("gemm weight", 2)?;
        y.aligned("gemm output", out.size() as u64)?;
        self.blas()?.gemm(x, w, y, out, m, n, k, accumulate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_only_when_blocks_are_few() {
        assert_eq!(attention_splits(512, 32, 512), 1);
        assert_eq!(attention_splits(1, 32, 1), 1);
        assert_eq!(attention_splits(1, 32, 65), 2);
        assert_eq!(attention_splits(1, 32, 100_000), MAX_ATTENTION_SPLITS);
        assert_eq!(attention_splits(7, 32, 700), 11);
        // The scratch always suffices for the split chosen.
        for (t, h, len) in [(1, 32, 4096), (7, 32, 9000), (1, 1, 10), (255, 1, 300)] {
            let s = attention_splits(t, h, len);
            assert!(t * h * s * (128 + 2) * 4 <= attention_scratch_bytes(128) || s == 1);
        }
    }

    #[test]
    fn attention_shapes_are_checked() {
        let ok = AttnShape {
            tokens: 4,
            heads: 8,
            kv_heads: 2,
            head_dim: 64,
            pos0: 0,
            max_seq: 16,
        };
        assert!(ok.validate().is_ok());
        assert!(AttnShape { heads: 7, ..ok }.validate().is_err());
        assert!(AttnShape { head_dim: 63, ..ok }.validate().is_err());
        assert!(AttnShape {
            head_dim: 512,
            ..ok
        }
        .validate()
        .is_err());
        assert!(AttnShape { pos0: 13, ..ok }.validate().is_err());
        assert!(AttnShape { tokens: 0, ..ok }.validate().is_err());
        assert_eq!(ok.cache_elements(), 2 * 16 * 64);
    }

    #[test]
    fn every_kernel_is_in_the_source() {
        for name in KERNEL_NAMES {
            assert!(
                KERNEL_SOURCE.contains(&format!("void {name}(")),
                "{name} missing from kernels.cu"
            );
        }
    }

    /// Needs libnvrtc (no GPU): `cargo test -p flash-kernels -- --ignored nvrtc`.
    #[test]
    #[ignore = "needs libnvrtc"]
    fn kernels_compile_with_nvrtc() {
        let dir = tempfile::tempdir().unwrap();
        let image = |dir: &Path| {
            crate::nvrtc::image(
                KERNEL_SOURCE,
                ENGINE_SOURCE.name,
                NVRTC_OPTIONS,
                (9, 0),
                Some(dir),
            )
            .unwrap()
        };
        let img = image(dir.path());
        assert!(!img.cache_hit);
        assert_eq!(img.kind, ImageKind::Cubin);
        assert!(img.bytes.len() > 1000);
        let again = image(dir.path());
        assert!(again.cache_hit);
        assert_eq!(again.bytes, img.bytes);
        eprintln!(
            "compile {:.3} s, cache hit {:.4} s, {}",
            img.compile_seconds,
            again.cache_seconds,
            again.path.unwrap().display()
        );
    }
}
