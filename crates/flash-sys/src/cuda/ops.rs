//! The GPU operations of the inference engine: NVRTC-compiled kernels
//! (cached on disk), cuBLAS matrix products, and safe views into device
//! memory that check bounds before anything is queued.
//!
//! # The surface
//! - [`DevView`]: a byte range of a [`DeviceMemory`] (a model's weights as
//!   the loader placed them, the engine's activations, the KV cache). Every
//!   op checks that each view holds the bytes its shapes need, is aligned
//!   for its element type and lives on the op's GPU.
//! - [`Ops::new`] → one stream and the kernels ([`Kernels`]: compiled once
//!   per source/GPU architecture/NVRTC version and cached in a folder). The
//!   cuBLAS handle ([`Blas`]) on that stream is made by [`Ops::load_blas`]
//!   or by the first [`Ops::gemm`]: its libraries are ~600 MB, which a cold
//!   start whose products all fit [`Ops::gemv`] never reads. Every op is
//!   queued on that stream; nothing here allocates after `new` but cuBLAS's
//!   own workspace.
//! - Element types: weights and most activations are bf16; the residual
//!   stream, logits and softmax are f32; token ids and argmax results i32.
//!
//! Device memory outlives queued work because [`DeviceMemory`]'s drop
//! synchronises its context before freeing, so a view's borrow may end as
//! soon as the op is queued.
//!
//! Missing libraries (`libnvrtc` on a cold cache, `libcublas`) are errors
//! that say what is missing, never panics: their entry points are checked
//! before the first call.

mod blas;
pub mod check;
mod nvrtc;

pub use blas::{cublas_available, Blas, OutType};
pub use nvrtc::{nvrtc_version, ImageKind, KernelImage};

use super::{check_range, has_symbol, CudaError, DeviceMemory, During, Gpu, Stream};
use cudarc::driver::sys;
use std::ffi::{c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The CUDA C source of every kernel.
pub const KERNEL_SOURCE: &str = include_str!("ops/kernels.cu");
/// The largest head dimension the attention kernels take.
pub const MAX_HEAD_DIM: usize = 256;
/// The most pieces decode attention splits the keys into.
pub const MAX_ATTENTION_SPLITS: usize = 32;
const NVRTC_OPTIONS: &[&str] = &["--std=c++17"];
const DRIVER_SYMBOLS: &[&str] = &[
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuModuleUnload",
    "cuLaunchKernel",
];

/// The folder compiled kernels are cached in: `$FLASH_KERNEL_CACHE`, else
/// `<store>/kernels` for a store root, else `<cache dir>/flashtensors/kernels`.
pub fn default_kernel_cache(store_root: Option<&Path>) -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FLASH_KERNEL_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(r) = store_root {
        return Some(r.join("kernels"));
    }
    if let Some(h) = std::env::var_os("FLASH_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(h).join("kernels"));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("flashtensors").join("kernels"))
}

// ---------------------------------------------------------------------------
// Views
// ---------------------------------------------------------------------------

/// A byte range of device memory, checked against its allocation. Cheap to
/// copy; borrows the allocation.
#[derive(Debug, Clone, Copy)]
pub struct DevView<'a> {
    mem: &'a DeviceMemory,
    offset: usize,
    len: usize,
}

impl<'a> DevView<'a> {
    /// `mem[offset..offset + len]`; refused when outside the allocation.
    pub fn new(mem: &'a DeviceMemory, offset: usize, len: usize) -> Result<Self, CudaError> {
        check_range("device view", offset, len, mem.len())?;
        Ok(DevView { mem, offset, len })
    }

    /// The whole allocation.
    pub fn whole(mem: &'a DeviceMemory) -> Self {
        DevView {
            mem,
            offset: 0,
            len: mem.len(),
        }
    }

    /// `self[offset..offset + len]`.
    pub fn sub(&self, offset: usize, len: usize) -> Result<Self, CudaError> {
        check_range("device sub-view", offset, len, self.len)?;
        Ok(DevView {
            mem: self.mem,
            offset: self.offset + offset,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of the first byte.
    pub fn device_ptr(&self) -> u64 {
        self.mem.device_ptr() + self.offset as u64
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.device_ptr()
    }

    pub fn gpu(&self) -> &Gpu {
        self.mem.gpu()
    }

    /// Refuses a view shorter than `bytes` or misaligned for its elements.
    pub(crate) fn require(&self, what: &str, bytes: usize) -> Result<(), CudaError> {
        if self.len < bytes {
            return Err(CudaError::Usage(format!(
                "{what}: the view holds {} bytes, {bytes} are needed",
                self.len
            )));
        }
        Ok(())
    }

    pub(crate) fn aligned(&self, what: &str, align: u64) -> Result<(), CudaError> {
        if self.device_ptr() % align != 0 {
            return Err(CudaError::Usage(format!(
                "{what}: device address {:#x} is not {align}-byte aligned",
                self.device_ptr()
            )));
        }
        Ok(())
    }

    pub(crate) fn same_gpu(&self, gpu: &Gpu, what: &str) -> Result<(), CudaError> {
        if self.mem.gpu() != gpu {
            return Err(CudaError::Usage(format!(
                "{what}: memory of GPU {} used on GPU {}",
                self.mem.gpu().ordinal(),
                gpu.ordinal()
            )));
        }
        Ok(())
    }

    /// Downloads the view (after all queued work on its GPU).
    pub fn copy_to_host(&self, dst: &mut [u8]) -> Result<(), CudaError> {
        check_range("view download", 0, dst.len(), self.len)?;
        self.mem.copy_to_host(self.offset, dst)
    }

    /// Uploads into the view (after all queued work on its GPU).
    pub fn copy_from_host(&self, src: &[u8]) -> Result<(), CudaError> {
        check_range("view upload", 0, src.len(), self.len)?;
        self.mem.copy_from_host(self.offset, src)
    }

    /// Downloads `dst.len()` f32 values from the start of the view.
    pub fn copy_to_host_f32(&self, dst: &mut [f32]) -> Result<(), CudaError> {
        let n = std::mem::size_of_val(dst);
        // SAFETY: any byte pattern is a valid f32, the slice covers exactly
        // the same n bytes of dst, which is borrowed mutably for the call.
        let bytes = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u8, n) };
        self.copy_to_host(bytes)
    }

    /// Uploads i32 values (token ids) to the start of the view.
    pub fn copy_from_host_i32(&self, src: &[i32]) -> Result<(), CudaError> {
        let n = std::mem::size_of_val(src);
        // SAFETY: reads the same n initialised bytes src covers, while src
        // is borrowed for the call.
        let bytes = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const u8, n) };
        self.copy_from_host(bytes)
    }
}

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

fn checked(
    gpu: &Gpu,
    what: &str,
    v: &DevView<'_>,
    ty: Ty,
    elements: usize,
) -> Result<u64, CudaError> {
    let bytes = elements
        .checked_mul(ty.size())
        .ok_or_else(|| CudaError::Usage(format!("{what}: size overflows")))?;
    v.require(what, bytes)?;
    v.aligned(what, ty.size() as u64)?;
    v.same_gpu(gpu, what)?;
    Ok(v.ptr())
}

/// `a * b` elements, or an error naming `what` when that overflows.
fn elements(what: &str, a: usize, b: usize) -> Result<usize, CudaError> {
    a.checked_mul(b)
        .ok_or_else(|| CudaError::Usage(format!("{what}: size overflows")))
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

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

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

/// How the kernels were obtained at start.
#[derive(Debug, Clone)]
pub struct KernelInfo {
    pub cache_hit: bool,
    pub compile_seconds: f64,
    pub cache_seconds: f64,
    /// cuModuleLoadData and function lookups.
    pub load_seconds: f64,
    pub cache_file: Option<PathBuf>,
    pub arch: String,
    pub image_bytes: usize,
    pub nvrtc_version: Option<(i32, i32)>,
}

/// The engine's kernels, loaded into one GPU's context.
pub struct Kernels {
    gpu: Gpu,
    module: sys::CUmodule,
    funcs: [sys::CUfunction; KERNEL_COUNT],
    info: KernelInfo,
}

// SAFETY: CUmodule and CUfunction are handles into the driver, whose API is
// thread-safe; the module is unloaded once, in Drop, and the function handles
// are never used after it.
unsafe impl Send for Kernels {}
// SAFETY: as above; launching the same function from several threads is
// allowed by CUDA.
unsafe impl Sync for Kernels {}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels").field("info", &self.info).finish()
    }
}

fn driver_symbols() -> Result<(), CudaError> {
    let missing: Vec<&str> = DRIVER_SYMBOLS
        .iter()
        .copied()
        .filter(|s| !has_symbol(s))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CudaError::Usage(format!(
            "the CUDA driver lacks {}",
            missing.join(", ")
        )))
    }
}

impl Kernels {
    /// Compiles (or takes from `cache_dir`) the kernels for `gpu` and loads them.
    pub fn load(gpu: &Gpu, cache_dir: Option<&Path>) -> Result<Kernels, CudaError> {
        driver_symbols()?;
        let info = gpu.info()?;
        let img = nvrtc::image(
            KERNEL_SOURCE,
            "flash-engine",
            NVRTC_OPTIONS,
            info.compute_capability,
            cache_dir,
        )?;
        let t0 = std::time::Instant::now();
        gpu.bind_to_thread()?;
        let mut bytes = img.bytes.clone();
        if img.kind == ImageKind::Ptx && bytes.last() != Some(&0) {
            bytes.push(0);
        }
        let mut module: sys::CUmodule = std::ptr::null_mut();
        // SAFETY: bytes is a complete cubin or NUL-terminated PTX image (its
        // checksum matched, or NVRTC just produced it), alive for the call;
        // writes one module handle, owned by the returned Kernels.
        unsafe { sys::cuModuleLoadData(&mut module, bytes.as_ptr() as *const c_void) }
            .result()
            .during("loading the engine's kernels (cuModuleLoadData)")?;
        let mut k = Kernels {
            gpu: gpu.clone(),
            module,
            funcs: [std::ptr::null_mut(); KERNEL_COUNT],
            info: KernelInfo {
                cache_hit: img.cache_hit,
                compile_seconds: img.compile_seconds,
                cache_seconds: img.cache_seconds,
                load_seconds: 0.0,
                cache_file: img.path.clone(),
                arch: img.arch.clone(),
                image_bytes: img.bytes.len(),
                nvrtc_version: nvrtc_version().ok(),
            },
        };
        for (i, name) in KERNEL_NAMES.iter().enumerate() {
            let c = CString::new(*name).map_err(|_| CudaError::Usage("kernel name".into()))?;
            let mut f: sys::CUfunction = std::ptr::null_mut();
            // SAFETY: the module is live (owned by k); writes one handle.
            unsafe { sys::cuModuleGetFunction(&mut f, k.module, c.as_ptr()) }
                .result()
                .during_with(|| format!("looking up kernel {name}"))?;
            k.funcs[i] = f;
        }
        k.info.load_seconds = t0.elapsed().as_secs_f64();
        Ok(k)
    }

    pub fn info(&self) -> &KernelInfo {
        &self.info
    }

    /// Queues kernel `k`. `args` point at the kernel's parameters, in order,
    /// with the C types of kernels.cu (device pointers as u64, int as i32,
    /// float as f32, long long as i64).
    fn launch(
        &self,
        stream: &Stream,
        k: K,
        grid: (u32, u32, u32),
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        if stream.gpu() != &self.gpu {
            return Err(CudaError::Usage(
                "kernel launch on a stream of another GPU".into(),
            ));
        }
        self.gpu.bind_to_thread()?;
        // SAFETY: the function belongs to this live module; the callers pass
        // one pointer per kernel parameter, each to a live local of the
        // parameter's exact C type, and every device pointer among them was
        // checked to span the memory the kernel touches for these shapes;
        // the stream is live.
        unsafe {
            sys::cuLaunchKernel(
                self.funcs[k as usize],
                grid.0,
                grid.1,
                grid.2,
                block,
                1,
                1,
                0,
                stream.raw(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .during_with(|| format!("launching {}", KERNEL_NAMES[k as usize]))
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        if let Err(e) = self.gpu.synchronize() {
            tracing::warn!("before unloading the engine's kernels: {e}");
        }
        let _ = self.gpu.bind_to_thread();
        // SAFETY: the module is live and unloaded exactly once, with no work
        // left on the context.
        if let Err(e) = unsafe { sys::cuModuleUnload(self.module) }.result() {
            tracing::warn!("cuModuleUnload: {e}");
        }
    }
}

/// Pointers to kernel parameters, in order.
macro_rules! args {
    ($($a:expr),* $(,)?) => {
        [$(&$a as *const _ as *mut c_void),*]
    };
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
        let g = self.gpu();
        let ids_p = checked(g, "embed ids", &ids, Ty::I32, tokens)?;
        let table_p = checked(g, "embed table", &table, Ty::Bf16, vocab * hidden)?;
        let out_p = checked(g, "embed output", &out, Ty::F32, tokens * hidden)?;
        let (h, v) = (int("hidden", hidden)?, int("vocab", vocab)?);
        let grid = grid_dim("tokens", tokens, i32::MAX as usize)?;
        self.kernels.launch(
            &self.stream,
            K::Embed,
            (grid, 1, 1),
            256,
            &mut args!(ids_p, table_p, out_p, h, v),
        )
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
        let g = self.gpu();
        let x_p = checked(g, "rmsnorm input", &x, Ty::F32, rows * n)?;
        let w_p = checked(g, "rmsnorm weight", &w, Ty::Bf16, n)?;
        let o_p = checked(g, "rmsnorm output", &out, Ty::Bf16, rows * n)?;
        let ni = int("rmsnorm width", n)?;
        let grid = grid_dim("rmsnorm rows", rows, i32::MAX as usize)?;
        self.kernels.launch(
            &self.stream,
            K::RmsF32,
            (grid, 1, 1),
            Self::norm_block(n),
            &mut args!(x_p, w_p, o_p, ni, eps),
        )
    }

    /// After the q/k/v projections of `shape.tokens` tokens at positions
    /// `pos0..`: the projections' biases added when given (Qwen2), per-head RMSNorm of q and k when their weights are given
    /// (Qwen3), RoPE with the `[max_pos, head_dim/2]` f32 tables (q in place),
    /// and k, v written into the layer's caches `[kv_heads, max_seq, head_dim]`.
    /// `hf_round` rounds the rotation as transformers does in bf16 (cos/sin,
    /// each product and the sum to bf16).
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
        let g = self.gpu();
        let AttnShape {
            tokens: t,
            heads: nq,
            kv_heads: nkv,
            head_dim: hd,
            pos0,
            max_seq,
        } = *shape;
        let q_p = checked(g, "q", &q, Ty::Bf16, t * nq * hd)?;
        let k_p = checked(g, "k", &k, Ty::Bf16, t * nkv * hd)?;
        let v_p = checked(g, "v", &v, Ty::Bf16, t * nkv * hd)?;
        let (qw_p, kw_p) = match norms {
            Some((qw, kw)) => (
                checked(g, "q_norm weight", &qw, Ty::Bf16, hd)?,
                checked(g, "k_norm weight", &kw, Ty::Bf16, hd)?,
            ),
            None => (0u64, 0u64),
        };
        let (qb_p, kb_p, vb_p) = match biases {
            Some((qb, kb, vb)) => (
                checked(g, "q bias", &qb, Ty::Bf16, nq * hd)?,
                checked(g, "k bias", &kb, Ty::Bf16, nkv * hd)?,
                checked(g, "v bias", &vb, Ty::Bf16, nkv * hd)?,
            ),
            None => (0u64, 0u64, 0u64),
        };
        let table = (pos0 + t) * (hd / 2);
        let cos_p = checked(g, "rope cos table", &cos, Ty::F32, table)?;
        let sin_p = checked(g, "rope sin table", &sin, Ty::F32, table)?;
        let kc_p = checked(g, "k cache", &k_cache, Ty::Bf16, shape.cache_elements())?;
        let vc_p = checked(g, "v cache", &v_cache, Ty::Bf16, shape.cache_elements())?;
        let (nq_i, nkv_i, hd_i) = (
            int("heads", nq)?,
            int("kv_heads", nkv)?,
            int("head_dim", hd)?,
        );
        let (pos_i, ms_i) = (int("pos0", pos0)?, int("max_seq", max_seq)?);
        let grid_x = grid_dim("tokens", t, i32::MAX as usize)?;
        let grid_y = grid_dim("heads", nq + nkv, 65535)?;
        let hf_i = i32::from(hf_round);
        self.kernels.launch(
            &self.stream,
            K::QkRope,
            (grid_x, grid_y, 1),
            (hd.div_ceil(32) * 32) as u32,
            &mut args!(
                q_p, k_p, v_p, qw_p, kw_p, qb_p, kb_p, vb_p, cos_p, sin_p, kc_p, vc_p, nq_i, nkv_i,
                hd_i, pos_i, ms_i, eps, hf_i
            ),
        )
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
        let g = self.gpu();
        let AttnShape {
            tokens: t,
            heads: nq,
            kv_heads: nkv,
            head_dim: hd,
            pos0,
            max_seq,
        } = *shape;
        let q_p = checked(g, "attention q", &q, Ty::Bf16, t * nq * hd)?;
        let kc_p = checked(g, "k cache", &k_cache, Ty::Bf16, shape.cache_elements())?;
        let vc_p = checked(g, "v cache", &v_cache, Ty::Bf16, shape.cache_elements())?;
        let o_p = checked(g, "attention output", &out, Ty::Bf16, t * nq * hd)?;
        let len = pos0 + t;
        let nsplit = attention_splits(t, nq, len);
        let chunk = len.div_ceil(nsplit);
        let part_p = if nsplit > 1 {
            checked(
                g,
                "attention scratch",
                &scratch,
                Ty::F32,
                t * nq * nsplit * (hd + 2),
            )?
        } else {
            0u64
        };
        let (nq_i, nkv_i, hd_i) = (
            int("heads", nq)?,
            int("kv_heads", nkv)?,
            int("head_dim", hd)?,
        );
        let (pos_i, ms_i, chunk_i) = (
            int("pos0", pos0)?,
            int("max_seq", max_seq)?,
            int("chunk", chunk)?,
        );
        let grid_x = grid_dim("tokens", t, i32::MAX as usize)?;
        let grid_y = grid_dim("heads", nq, 65535)?;
        self.kernels.launch(
            &self.stream,
            K::Attention,
            (grid_x, grid_y, nsplit as u32),
            128,
            &mut args!(
                q_p, kc_p, vc_p, o_p, part_p, nq_i, nkv_i, hd_i, pos_i, ms_i, chunk_i, scale
            ),
        )?;
        if nsplit > 1 {
            let ns_i = nsplit as i32;
            self.kernels.launch(
                &self.stream,
                K::AttentionCombine,
                (grid_x, grid_y, 1),
                (hd.div_ceil(32) * 32) as u32,
                &mut args!(part_p, o_p, nq_i, hd_i, ns_i),
            )?;
        }
        Ok(())
    }

    fn elementwise_grid(n: usize) -> u32 {
        n.div_ceil(256).clamp(1, 8192) as u32
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
        let g = self.gpu();
        let g_p = checked(g, "swiglu gate", &gate, Ty::Bf16, n)?;
        let u_p = checked(g, "swiglu up", &up, Ty::Bf16, n)?;
        let o_p = checked(g, "swiglu output", &out, Ty::Bf16, n)?;
        let n_i = n as i64;
        self.kernels.launch(
            &self.stream,
            K::Swiglu,
            (Self::elementwise_grid(n), 1, 1),
            256,
            &mut args!(g_p, u_p, o_p, n_i),
        )
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
        let g = self.gpu();
        let x_p = checked(g, "residual", &x, Ty::F32, n)?;
        let d_p = checked(g, "residual update", &d, Ty::Bf16, n)?;
        let n_i = n as i64;
        let r_i = i32::from(round);
        self.kernels.launch(
            &self.stream,
            K::ResidualAdd,
            (Self::elementwise_grid(n), 1, 1),
            256,
            &mut args!(x_p, d_p, n_i, r_i),
        )
    }

    /// `out (f32) = x (bf16)` over `n` elements.
    pub fn bf16_to_f32(&self, x: DevView<'_>, out: DevView<'_>, n: usize) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let g = self.gpu();
        let x_p = checked(g, "bf16_to_f32 input", &x, Ty::Bf16, n)?;
        let o_p = checked(g, "bf16_to_f32 output", &out, Ty::F32, n)?;
        let n_i = n as i64;
        self.kernels.launch(
            &self.stream,
            K::Bf16ToF32,
            (Self::elementwise_grid(n), 1, 1),
            256,
            &mut args!(x_p, o_p, n_i),
        )
    }

    /// `out[r]` (i32) = index of the first maximum of f32 row `r` of `n`.
    pub fn argmax(
        &self,
        x: DevView<'_>,
        out: DevView<'_>,
        rows: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        let g = self.gpu();
        let x_p = checked(g, "argmax input", &x, Ty::F32, rows * n)?;
        let o_p = checked(g, "argmax output", &out, Ty::I32, rows)?;
        let n_i = int("argmax width", n)?;
        let grid = grid_dim("argmax rows", rows, i32::MAX as usize)?;
        self.kernels.launch(
            &self.stream,
            K::Argmax,
            (grid, 1, 1),
            1024,
            &mut args!(x_p, o_p, n_i),
        )
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
        let g = self.gpu();
        let views: Vec<&DevView<'_>> = std::iter::once(&x)
            .chain(parts.iter().map(|p| &p.w))
            .collect();
        if !Self::gemv_fits(k, &views) {
            return Err(CudaError::Usage(format!(
                "gemv needs k % 8 == 0 (k = {k}) and 16-byte aligned input and weights"
            )));
        }
        let x_p = checked(
            g,
            "gemv input",
            &x,
            Ty::Bf16,
            elements("gemv input", tokens, k)?,
        )?;
        let mut w = [0u64; 3];
        let mut o = [0u64; 3];
        let mut r = [0i32; 3];
        let mut m = [0i32; 3];
        let mut out_row_bytes = [0u64; 3];
        let mut total = 0usize;
        for (i, p) in parts.iter().enumerate() {
            let ty = p.mode.ty();
            w[i] = checked(
                g,
                "gemv weight",
                &p.w,
                Ty::Bf16,
                elements("gemv weight", p.rows, k)?,
            )?;
            o[i] = checked(
                g,
                "gemv output",
                &p.out,
                ty,
                elements("gemv output", tokens, p.rows)?,
            )?;
            r[i] = int("gemv rows", p.rows)?;
            m[i] = p.mode.mode();
            out_row_bytes[i] = (p.rows * ty.size()) as u64;
            total += p.rows;
        }
        if total == 0 || tokens == 0 {
            return Ok(());
        }
        let k_i = int("gemv k", k)?;
        let grid = grid_dim("gemv blocks", total.div_ceil(GEMV_WARPS), i32::MAX as usize)?;
        for t0 in (0..tokens).step_by(GEMV_TOKENS) {
            let n = int("gemv tokens", GEMV_TOKENS.min(tokens - t0))?;
            let x_t = x_p + (t0 * k * 2) as u64;
            let o_t: [u64; 3] = std::array::from_fn(|i| o[i] + t0 as u64 * out_row_bytes[i]);
            self.kernels.launch(
                &self.stream,
                K::Gemv,
                (grid, 1, 1),
                (GEMV_WARPS * 32) as u32,
                &mut args!(
                    x_t, k_i, n, w[0], w[1], w[2], o_t[0], o_t[1], o_t[2], r[0], r[1], r[2], m[0],
                    m[1], m[2]
                ),
            )?;
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
        let g = self.gpu();
        let w_elements = elements("gemv_swiglu weight", rows, k)?;
        let x_p = checked(
            g,
            "gemv_swiglu input",
            &x,
            Ty::Bf16,
            elements("gemv_swiglu input", tokens, k)?,
        )?;
        let g_p = checked(g, "gemv_swiglu gate weight", &wg, Ty::Bf16, w_elements)?;
        let u_p = checked(g, "gemv_swiglu up weight", &wu, Ty::Bf16, w_elements)?;
        let o_p = checked(
            g,
            "gemv_swiglu output",
            &out,
            Ty::Bf16,
            elements("gemv_swiglu output", tokens, rows)?,
        )?;
        let (k_i, r_i) = (int("gemv_swiglu k", k)?, int("gemv_swiglu rows", rows)?);
        let grid = grid_dim(
            "gemv_swiglu blocks",
            rows.div_ceil(GEMV_WARPS),
            i32::MAX as usize,
        )?;
        for t0 in (0..tokens).step_by(GEMV_TOKENS) {
            let n = int("gemv_swiglu tokens", GEMV_TOKENS.min(tokens - t0))?;
            let x_t = x_p + (t0 * k * 2) as u64;
            let o_t = o_p + (t0 * rows * 2) as u64;
            self.kernels.launch(
                &self.stream,
                K::GemvSwiglu,
                (grid, 1, 1),
                (GEMV_WARPS * 32) as u32,
                &mut args!(x_t, k_i, n, g_p, u_p, o_t, r_i),
            )?;
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
    fn kernel_cache_folder() {
        // Only the store-root branch is deterministic under any environment.
        if std::env::var_os("FLASH_KERNEL_CACHE").is_none() {
            assert_eq!(
                default_kernel_cache(Some(Path::new("/s"))),
                Some(PathBuf::from("/s/kernels"))
            );
        }
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

    /// Needs libnvrtc (no GPU): `cargo test -p flash-sys -- --ignored nvrtc`.
    #[test]
    #[ignore = "needs libnvrtc"]
    fn kernels_compile_with_nvrtc() {
        let dir = tempfile::tempdir().unwrap();
        let img = nvrtc::image(
            KERNEL_SOURCE,
            "flash-engine",
            NVRTC_OPTIONS,
            (9, 0),
            Some(dir.path()),
        )
        .unwrap();
        assert!(!img.cache_hit);
        assert_eq!(img.kind, ImageKind::Cubin);
        assert!(img.bytes.len() > 1000);
        let again = nvrtc::image(
            KERNEL_SOURCE,
            "flash-engine",
            NVRTC_OPTIONS,
            (9, 0),
            Some(dir.path()),
        )
        .unwrap();
        assert!(again.cache_hit);
        assert_eq!(again.bytes, img.bytes);
        eprintln!(
            "compile {:.3} s, cache hit {:.4} s",
            img.compile_seconds, again.cache_seconds
        );
    }
}
