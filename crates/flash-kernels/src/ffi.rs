//! Every `unsafe` block of flash-kernels, and nothing else: NVRTC (compile
//! a program, read its image), the driver's module calls
//! (`cuModuleLoadData`, `cuModuleGetFunction`, `cuModuleUnload`,
//! `cuFuncGetParamInfo`, `cuFuncSetAttribute`, `cuLaunchKernel`), cuBLAS
//! (create, bind to a stream, `cublasGemmEx`, destroy) and byte views of
//! `f32`/`i32` slices.
//!
//! The crate root denies `unsafe_code` and allows it on this module alone,
//! so the rule is the compiler's; `clippy::undocumented_unsafe_blocks` makes
//! a `SAFETY:` comment on every block a lint error when missing.
//!
//! Every function here is safe to call: it checks what its `unsafe` relies
//! on (handles owned by the types here, symbols present before cudarc is
//! asked for them, sizes) or, for the one thing no code here can check — that
//! a kernel given these pointers and scalars stays inside the memory they
//! name — says so at [`LoadedModule::launch`], whose callers check every
//! view against their op's shapes.
#![deny(clippy::undocumented_unsafe_blocks)]

use crate::view::DevView;
use cudarc::cublas::sys as blas;
use cudarc::driver::sys as cu;
use cudarc::nvrtc::sys as nvrtc;
use flash_sys::cuda::{CudaError, During, Gpu, Stream};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};

// ---------------------------------------------------------------------------
// NVRTC
// ---------------------------------------------------------------------------

/// Every NVRTC entry point called here (cudarc panics on a missing symbol,
/// so they are checked before the first call).
const NVRTC_SYMBOLS: &[&str] = &[
    "nvrtcVersion",
    "nvrtcGetErrorString",
    "nvrtcCreateProgram",
    "nvrtcCompileProgram",
    "nvrtcGetProgramLogSize",
    "nvrtcGetProgramLog",
    "nvrtcGetCUBINSize",
    "nvrtcGetCUBIN",
    "nvrtcGetPTXSize",
    "nvrtcGetPTX",
    "nvrtcDestroyProgram",
    "nvrtcGetNumSupportedArchs",
    "nvrtcGetSupportedArchs",
];

/// Whether NVRTC can be used, and its version; checked once per process.
/// Every other NVRTC function here calls this first.
pub(crate) fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    static V: OnceLock<Result<(i32, i32), String>> = OnceLock::new();
    V.get_or_init(|| {
        // SAFETY: only dlopens the candidate library names and closes them.
        if !unsafe { nvrtc::is_culib_present() } {
            return Err(
                "NVRTC (libnvrtc.so) cannot be loaded: install the CUDA runtime \
                        compiler library (it ships with the CUDA toolkit and PyTorch wheels)"
                    .to_string(),
            );
        }
        let missing: Vec<&str> = NVRTC_SYMBOLS
            .iter()
            .copied()
            // SAFETY: the library is present; `get` only looks the symbol up.
            .filter(|s| unsafe { nvrtc::culib().get::<*const ()>(s.as_bytes()).is_err() })
            .collect();
        if !missing.is_empty() {
            return Err(format!("libnvrtc lacks {}", missing.join(", ")));
        }
        let (mut major, mut minor) = (0 as c_int, 0 as c_int);
        // SAFETY: the symbol is present (checked above); writes two ints
        // through valid pointers.
        let r = unsafe { nvrtc::nvrtcVersion(&mut major, &mut minor) };
        if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
            return Err(format!("nvrtcVersion failed: {r:?}"));
        }
        Ok((major, minor))
    })
    .clone()
    .map_err(CudaError::Usage)
}

fn nvrtc_err(r: nvrtc::nvrtcResult, what: &str) -> CudaError {
    // SAFETY: only called after nvrtc_version() succeeded (the symbol is
    // present); nvrtcGetErrorString returns a static NUL-terminated string
    // or null, which is checked.
    let s = unsafe {
        let p = nvrtc::nvrtcGetErrorString(r);
        if p.is_null() {
            format!("{r:?}")
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    CudaError::Usage(format!("{what}: {s}"))
}

/// The architectures this NVRTC compiles for (90 for sm_90).
pub(crate) fn nvrtc_supported_archs() -> Result<Vec<i32>, CudaError> {
    nvrtc_version()?;
    let mut n: c_int = 0;
    // SAFETY: NVRTC is loaded with every symbol used here (nvrtc_version);
    // writes one int through a valid pointer.
    let r = unsafe { nvrtc::nvrtcGetNumSupportedArchs(&mut n) };
    if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err(r, "nvrtcGetNumSupportedArchs"));
    }
    let mut archs = vec![0 as c_int; n.max(0) as usize];
    if !archs.is_empty() {
        // SAFETY: archs has room for the n ints NVRTC writes.
        let r = unsafe { nvrtc::nvrtcGetSupportedArchs(archs.as_mut_ptr()) };
        if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
            return Err(nvrtc_err(r, "nvrtcGetSupportedArchs"));
        }
    }
    Ok(archs)
}

/// An NVRTC program, destroyed on drop.
struct Program(nvrtc::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program is live (made by nvrtcCreateProgram, which
        // succeeded) and destroyed exactly once, here.
        unsafe { nvrtc::nvrtcDestroyProgram(&mut self.0) };
    }
}

/// Compiles `src` (program `name`) for `arch` ("sm_90": a cubin;
/// "compute_90": PTX, when `ptx`) with the extra `options`, and returns the
/// image.
pub(crate) fn nvrtc_compile(
    src: &str,
    name: &str,
    arch: &str,
    options: &[&str],
    ptx: bool,
) -> Result<Vec<u8>, CudaError> {
    nvrtc_version()?;
    let c_src = CString::new(src)
        .map_err(|_| CudaError::Usage(format!("the source of {name} has a NUL")))?;
    let c_name =
        CString::new(name).map_err(|_| CudaError::Usage("kernel name has a NUL".into()))?;
    let mut all: Vec<CString> = vec![CString::new(format!("--gpu-architecture={arch}"))
        .map_err(|_| CudaError::Usage("bad option".into()))?];
    for o in options {
        all.push(CString::new(*o).map_err(|_| CudaError::Usage(format!("bad option {o}")))?);
    }
    let ptrs: Vec<*const c_char> = all.iter().map(|c| c.as_ptr()).collect();
    let mut raw: nvrtc::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: NVRTC is loaded (nvrtc_version); the strings are NUL-terminated
    // and outlive the call; no headers (count 0, null arrays); writes one
    // program handle, owned by `prog` below on success.
    let r = unsafe {
        nvrtc::nvrtcCreateProgram(
            &mut raw,
            c_src.as_ptr(),
            c_name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err(r, "nvrtcCreateProgram"));
    }
    let prog = Program(raw);
    // SAFETY: prog is live; ptrs point at NUL-terminated strings (`all`)
    // alive for the call, and their count is passed.
    let r = unsafe { nvrtc::nvrtcCompileProgram(prog.0, ptrs.len() as c_int, ptrs.as_ptr()) };
    if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
        let mut n = 0usize;
        // SAFETY: prog is live; writes one size.
        unsafe { nvrtc::nvrtcGetProgramLogSize(prog.0, &mut n) };
        let mut log = vec![0u8; n.max(1)];
        // SAFETY: log has room for the n bytes NVRTC writes (at least 1).
        unsafe { nvrtc::nvrtcGetProgramLog(prog.0, log.as_mut_ptr() as *mut c_char) };
        let log = String::from_utf8_lossy(&log)
            .trim_end_matches('\0')
            .to_string();
        return Err(CudaError::Usage(format!(
            "NVRTC could not compile {name} for {arch}: {}\n{log}",
            nvrtc_err(r, "nvrtcCompileProgram")
        )));
    }
    let mut n = 0usize;
    // SAFETY: prog is live and compiled; writes one size.
    let r = unsafe {
        if ptx {
            nvrtc::nvrtcGetPTXSize(prog.0, &mut n)
        } else {
            nvrtc::nvrtcGetCUBINSize(prog.0, &mut n)
        }
    };
    if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err(r, "reading the compiled image's size"));
    }
    let mut bytes = vec![0u8; n];
    if bytes.is_empty() {
        return Err(CudaError::Usage("NVRTC produced an empty image".into()));
    }
    // SAFETY: prog is live and compiled; bytes has exactly the size NVRTC
    // reported for this image, which it fills.
    let r = unsafe {
        if ptx {
            nvrtc::nvrtcGetPTX(prog.0, bytes.as_mut_ptr() as *mut c_char)
        } else {
            nvrtc::nvrtcGetCUBIN(prog.0, bytes.as_mut_ptr() as *mut c_char)
        }
    };
    if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err(r, "reading the compiled image"));
    }
    Ok(bytes)
}

// ---------------------------------------------------------------------------
// Driver: modules and launches
// ---------------------------------------------------------------------------

/// Driver entry points a module needs beyond the ones `flash_sys::cuda::probe`
/// checks (present in every driver for CUDA 11 and later).
const MODULE_SYMBOLS: &[&str] = &[
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuModuleUnload",
    "cuLaunchKernel",
    "cuFuncSetAttribute",
];
/// Reports a kernel's parameter sizes (CUDA 12.4 and later); without it,
/// launches are not checked against the kernel's signature.
const PARAM_INFO: &str = "cuFuncGetParamInfo";
/// More parameters than any kernel here has; the lookup stops there.
const MAX_PARAMS: usize = 512;
/// Launches with at most this many parameters build their pointer array on
/// the stack.
const STACK_PARAMS: usize = 32;

/// One kernel parameter's value: its native-endian bytes at the start of an
/// 8-byte, 8-aligned slot, and its size (4 or 8). The driver copies `size`
/// bytes from the slot's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Param {
    slot: u64,
    size: usize,
}

impl Param {
    /// A placeholder (a zero `int`), for inline storage not yet filled.
    pub(crate) const ZERO: Param = Param { slot: 0, size: 4 };

    /// An 8-byte value (a device address, `long long`, `unsigned long long`).
    pub(crate) fn bits64(v: [u8; 8]) -> Param {
        Param {
            slot: u64::from_ne_bytes(v),
            size: 8,
        }
    }

    /// A 4-byte value (`int`, `unsigned`, `float`).
    pub(crate) fn bits32(v: [u8; 4]) -> Param {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&v);
        Param {
            slot: u64::from_ne_bytes(b),
            size: 4,
        }
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }
}

/// A module loaded into one GPU's primary context, with the functions
/// looked up in it. Unloaded on drop, after the GPU's queued work.
pub(crate) struct LoadedModule {
    gpu: Gpu,
    module: cu::CUmodule,
    names: Vec<String>,
    functions: Vec<cu::CUfunction>,
    /// Each function's parameter sizes as the driver reports them (None:
    /// this driver cannot say).
    params: Vec<Option<Vec<usize>>>,
}

// SAFETY: CUmodule and CUfunction are handles into the driver, whose API is
// thread-safe; the module is unloaded once, in Drop, and the function
// handles, owned alongside it, are never used after that.
unsafe impl Send for LoadedModule {}
// SAFETY: as above; launching the same function from several threads is
// allowed by CUDA, and no method hands out the raw handles.
unsafe impl Sync for LoadedModule {}

impl LoadedModule {
    /// Loads `image` (a cubin, or PTX when `ptx`; a NUL is appended to PTX
    /// that lacks one) into `gpu`'s primary context and looks up
    /// `functions`. `what` names the module in errors.
    pub(crate) fn load(
        gpu: &Gpu,
        image: &[u8],
        ptx: bool,
        functions: &[&str],
        what: &str,
    ) -> Result<LoadedModule, CudaError> {
        let missing: Vec<&str> = MODULE_SYMBOLS
            .iter()
            .copied()
            .filter(|s| !gpu.driver_has_symbol(s))
            .collect();
        if !missing.is_empty() {
            return Err(CudaError::Usage(format!(
                "the CUDA driver lacks {}",
                missing.join(", ")
            )));
        }
        if image.is_empty() {
            return Err(CudaError::Usage(format!("{what}: an empty image")));
        }
        let owned;
        let bytes = if ptx && image.last() != Some(&0) {
            owned = [image, &[0u8]].concat();
            &owned[..]
        } else {
            image
        };
        gpu.bind_to_thread()?;
        let mut module: cu::CUmodule = std::ptr::null_mut();
        // SAFETY: the symbol is present (checked above); bytes is a complete
        // cubin or NUL-terminated PTX image (its cache checksum matched, or
        // NVRTC just produced it), alive for the call; writes one module
        // handle, owned by the LoadedModule below.
        unsafe { cu::cuModuleLoadData(&mut module, bytes.as_ptr() as *const c_void) }
            .result()
            .during_with(|| format!("loading {what} (cuModuleLoadData)"))?;
        // Owned from here: an error below unloads it (Drop).
        let mut m = LoadedModule {
            gpu: gpu.clone(),
            module,
            names: Vec::with_capacity(functions.len()),
            functions: Vec::with_capacity(functions.len()),
            params: Vec::with_capacity(functions.len()),
        };
        let param_info = gpu.driver_has_symbol(PARAM_INFO);
        for name in functions {
            let c = CString::new(*name)
                .map_err(|_| CudaError::Usage(format!("kernel name {name:?} has a NUL")))?;
            let mut f: cu::CUfunction = std::ptr::null_mut();
            // SAFETY: the module is live (owned by m) and its context bound;
            // c is NUL-terminated and alive for the call; writes one handle,
            // valid while the module is loaded (m owns both).
            unsafe { cu::cuModuleGetFunction(&mut f, m.module, c.as_ptr()) }
                .result()
                .during_with(|| format!("looking up kernel {name}"))?;
            let params = if param_info { param_sizes(f) } else { None };
            m.names.push(name.to_string());
            m.functions.push(f);
            m.params.push(params);
        }
        Ok(m)
    }

    pub(crate) fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The parameter sizes of function `index`, when the driver reports them.
    pub(crate) fn param_sizes(&self, index: usize) -> Option<&[usize]> {
        self.params.get(index).and_then(|p| p.as_deref())
    }

    fn function(&self, index: usize) -> Result<(cu::CUfunction, &str), CudaError> {
        match (self.functions.get(index), self.names.get(index)) {
            (Some(&f), Some(name)) => Ok((f, name)),
            _ => Err(CudaError::Usage(format!(
                "no function {index}: the module has {}",
                self.functions.len()
            ))),
        }
    }

    /// Lets function `index` use up to `bytes` of dynamic shared memory
    /// (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`; above 48 KiB a
    /// launch needs it).
    pub(crate) fn set_max_dynamic_shared_bytes(
        &self,
        index: usize,
        bytes: u32,
    ) -> Result<(), CudaError> {
        let (f, name) = self.function(index)?;
        let v = c_int::try_from(bytes)
            .map_err(|_| CudaError::Usage(format!("{name}: {bytes} bytes of shared memory")))?;
        self.gpu.bind_to_thread()?;
        // SAFETY: the symbol is present (checked at load); f is a function
        // of this live module, whose context is bound; the attribute takes
        // one int by value.
        unsafe {
            cu::cuFuncSetAttribute(
                f,
                cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                v,
            )
        }
        .result()
        .during_with(|| format!("setting {name}'s dynamic shared memory to {bytes} bytes"))
    }

    /// Queues function `index` on `stream`: `grid` blocks of `block`
    /// threads, `shared_mem_bytes` of dynamic shared memory, `params` in the
    /// kernel's order.
    ///
    /// Checked here: the function exists, `stream` belongs to the module's
    /// GPU, and, when the driver reports parameter sizes (CUDA 12.4 and
    /// later), that `params` has exactly the kernel's count and sizes, so
    /// the driver never reads past a value. Cannot be checked here: that the
    /// kernel, given these device addresses and scalars, touches only the
    /// memory they name. The caller keeps that: every address comes from a
    /// `DevView` of this GPU (`crate::module::LaunchArgs`), and the ops
    /// check each view's size against their shapes before launching.
    pub(crate) fn launch(
        &self,
        index: usize,
        stream: &Stream,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        params: &[Param],
    ) -> Result<(), CudaError> {
        let (f, name) = self.function(index)?;
        if stream.gpu() != &self.gpu {
            return Err(CudaError::Usage(format!(
                "launching {name}: a stream of GPU {} for a module of GPU {}",
                stream.gpu().ordinal(),
                self.gpu.ordinal()
            )));
        }
        if let Some(sizes) = self.param_sizes(index) {
            let same =
                sizes.len() == params.len() && sizes.iter().zip(params).all(|(&s, p)| s == p.size);
            if !same {
                let given: Vec<usize> = params.iter().map(Param::size).collect();
                return Err(CudaError::Usage(format!(
                    "launching {name}: the kernel takes parameters of {sizes:?} bytes, \
                     {given:?} were given"
                )));
            }
        }
        // The driver reads each parameter through a pointer; the slots live
        // in `params`, borrowed for the call. On the stack for the usual
        // counts: a decode step launches hundreds of kernels.
        let mut stack = [std::ptr::null_mut::<c_void>(); STACK_PARAMS];
        let mut heap = Vec::new();
        let ptrs: &mut [*mut c_void] = if params.len() <= STACK_PARAMS {
            &mut stack[..params.len()]
        } else {
            heap.resize(params.len(), std::ptr::null_mut());
            &mut heap
        };
        for (ptr, p) in ptrs.iter_mut().zip(params) {
            *ptr = &p.slot as *const u64 as *mut c_void;
        }
        let kernel_params = if ptrs.is_empty() {
            std::ptr::null_mut()
        } else {
            ptrs.as_mut_ptr()
        };
        self.gpu.bind_to_thread()?;
        // SAFETY: f is a function of this live module, whose context is
        // bound; the stream is live (borrowed) and of the same context;
        // kernel_params points at one pointer per kernel parameter (null
        // for none), each to an 8-byte aligned slot of at least the
        // parameter's size (count and sizes checked above when the driver
        // reports them), alive for the call (the driver copies the values
        // before returning; it only reads the array). The memory the kernel
        // touches: see this function's docs.
        unsafe {
            cu::cuLaunchKernel(
                f,
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                block.2,
                shared_mem_bytes,
                stream.cu_stream(),
                kernel_params,
                std::ptr::null_mut(),
            )
        }
        .result()
        .during_with(|| format!("launching {name}"))
    }
}

/// The sizes of `f`'s parameters, or None when the driver does not say.
fn param_sizes(f: cu::CUfunction) -> Option<Vec<usize>> {
    let mut sizes = Vec::new();
    for i in 0..MAX_PARAMS {
        let (mut offset, mut size) = (0usize, 0usize);
        // SAFETY: the symbol is present (the caller checked); f is a live
        // function handle; writes two sizes through valid pointers.
        let r = unsafe { cu::cuFuncGetParamInfo(f, i, &mut offset, &mut size) };
        match r {
            cu::CUresult::CUDA_SUCCESS => sizes.push(size),
            // Past the last parameter.
            cu::CUresult::CUDA_ERROR_INVALID_VALUE => return Some(sizes),
            _ => return None,
        }
    }
    None
}

impl Drop for LoadedModule {
    fn drop(&mut self) {
        if let Err(e) = self.gpu.synchronize() {
            tracing::warn!("before unloading a kernel module: {e}");
        }
        let _ = self.gpu.bind_to_thread();
        // SAFETY: the module is live and unloaded exactly once, with no work
        // left on the context; its function handles die with it (owned
        // here, never handed out).
        if let Err(e) = unsafe { cu::cuModuleUnload(self.module) }.result() {
            tracing::warn!("cuModuleUnload: {e}");
        }
    }
}

// ---------------------------------------------------------------------------
// cuBLAS
// ---------------------------------------------------------------------------

const CUBLAS_SYMBOLS: &[&str] = &[
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasGemmEx",
    "cublasGetStatusString",
    "cublasGetVersion_v2",
];

/// Whether cuBLAS can be used (checked once per process). Every other
/// cuBLAS function here is reached only through a [`BlasHandle`], made
/// after this succeeded.
pub(crate) fn cublas_available() -> Result<(), CudaError> {
    static V: OnceLock<Result<(), String>> = OnceLock::new();
    V.get_or_init(|| {
        // SAFETY: only dlopens the candidate library names and closes them.
        if !unsafe { blas::is_culib_present() } {
            return Err("cuBLAS (libcublas.so) cannot be loaded: install the CUDA \
                        runtime libraries (libcublas, libcublasLt)"
                .to_string());
        }
        let missing: Vec<&str> = CUBLAS_SYMBOLS
            .iter()
            .copied()
            // SAFETY: the library is present; `get` only looks the symbol up.
            .filter(|s| unsafe { blas::culib().get::<*const ()>(s.as_bytes()).is_err() })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("libcublas lacks {}", missing.join(", ")))
        }
    })
    .clone()
    .map_err(CudaError::Usage)
}

fn status(s: blas::cublasStatus_t, what: &str) -> Result<(), CudaError> {
    if s == blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Ok(());
    }
    // SAFETY: reached only with cuBLAS loaded (a handle exists); returns a
    // static NUL-terminated string or null, which is checked.
    let text = unsafe {
        let p = blas::cublasGetStatusString(s);
        if p.is_null() {
            format!("{s:?}")
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    Err(CudaError::Usage(format!("{what}: {text} ({s:?})")))
}

/// A raw cuBLAS handle, only ever used under [`BlasHandle`]'s mutex.
struct RawBlas(blas::cublasHandle_t);

// SAFETY: a cuBLAS handle may move between threads; it must not be used by
// two at once, which the mutex around it ensures.
unsafe impl Send for RawBlas {}

/// A cuBLAS handle whose work goes to one stream; destroyed on drop, after
/// that stream's work. `Send + Sync`: calls are serialised by a mutex.
pub(crate) struct BlasHandle {
    handle: Mutex<RawBlas>,
    stream: Stream,
}

impl BlasHandle {
    /// A handle on `stream`'s GPU queuing on `stream`, and cuBLAS's version.
    pub(crate) fn new(stream: &Stream) -> Result<(BlasHandle, i32), CudaError> {
        cublas_available()?;
        stream.gpu().bind_to_thread()?;
        let mut h: blas::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: cuBLAS is loaded with every symbol used here; writes one
        // handle through a valid pointer, owned by the BlasHandle below.
        let s = unsafe { blas::cublasCreate_v2(&mut h) };
        status(s, "cublasCreate")?;
        // Owned from here: an error below destroys it (Drop).
        let handle = BlasHandle {
            handle: Mutex::new(RawBlas(h)),
            stream: stream.clone(),
        };
        // SAFETY: h is live; the stream is live as long as the handle holds
        // its clone, and belongs to the bound context.
        let s = unsafe { blas::cublasSetStream_v2(h, stream.cu_stream() as blas::cudaStream_t) };
        status(s, "cublasSetStream")?;
        let mut v = 0i32;
        // SAFETY: h is live; writes one int.
        let s = unsafe { blas::cublasGetVersion_v2(h, &mut v) };
        status(s, "cublasGetVersion")?;
        Ok((handle, v))
    }

    pub(crate) fn stream(&self) -> &Stream {
        &self.stream
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ (+ y when accumulate)`, all row-major,
    /// `x` and `w` bf16, `y` bf16 (or f32 when `y_f32`), f32 accumulation.
    /// Checks that every view holds the bytes the shapes need and lives on
    /// the handle's GPU, and that the sizes fit cuBLAS's ints.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_bf16(
        &self,
        x: &DevView<'_>,
        w: &DevView<'_>,
        y: &DevView<'_>,
        y_f32: bool,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let gpu = self.stream.gpu();
        let y_size = if y_f32 { 4 } else { 2 };
        let bytes = |a: usize, b: usize, size: usize| {
            a.checked_mul(b)
                .and_then(|e| e.checked_mul(size))
                .ok_or_else(|| CudaError::Usage(format!("gemm of {m}x{n}x{k}: size overflows")))
        };
        for (name, v, need) in [
            ("gemm input", x, bytes(m, k, 2)?),
            ("gemm weight", w, bytes(n, k, 2)?),
            ("gemm output", y, bytes(m, n, y_size)?),
        ] {
            v.require(name, need)?;
            v.same_gpu(gpu, name)?;
        }
        let too_big = |d: usize| d > i32::MAX as usize;
        if too_big(m) || too_big(n) || too_big(k) {
            return Err(CudaError::Usage(format!(
                "gemm of {m}x{n}x{k} exceeds cuBLAS's 32-bit sizes"
            )));
        }
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0f32 };
        let ctype = if y_f32 {
            blas::cudaDataType::CUDA_R_32F
        } else {
            blas::cudaDataType::CUDA_R_16BF
        };
        gpu.bind_to_thread()?;
        let h = self.handle.lock().unwrap_or_else(|p| p.into_inner());
        // Column-major view: C = op(A)·B with A = w as a k×n column-major
        // matrix (lda k) transposed, B = x as a k×m column-major matrix
        // (ldb k), C = y as n×m (ldc n).
        // SAFETY: every pointer lies in a live device allocation of this GPU
        // with at least the bytes the shapes need (checked above; device
        // memory outlives queued work: its drop synchronises); alpha/beta
        // are host scalars (the default pointer mode) alive for the call;
        // the handle is live and used by one thread at a time (the mutex).
        let s = unsafe {
            blas::cublasGemmEx(
                h.0,
                blas::cublasOperation_t::CUBLAS_OP_T,
                blas::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w.device_ptr() as *const c_void,
                blas::cudaDataType::CUDA_R_16BF,
                k as i32,
                x.device_ptr() as *const c_void,
                blas::cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const c_void,
                y.device_ptr() as *mut c_void,
                ctype,
                n as i32,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        status(s, &format!("cublasGemmEx {m}x{n}x{k}"))
    }
}

impl Drop for BlasHandle {
    fn drop(&mut self) {
        let h = self.handle.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.stream.synchronize();
        let _ = self.stream.gpu().bind_to_thread();
        // SAFETY: the handle is live and destroyed exactly once, after its
        // stream's work ended.
        let s = unsafe { blas::cublasDestroy_v2(h.0) };
        if s != blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            tracing::warn!("cublasDestroy: {s:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// Byte views
// ---------------------------------------------------------------------------

/// The bytes of `v` (native order), to download f32 values into.
pub(crate) fn f32s_as_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    let n = std::mem::size_of_val(v);
    // SAFETY: any byte pattern is a valid f32 and u8 has alignment 1; the
    // slice covers exactly v's n bytes and borrows v mutably for its life.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, n) }
}

/// The bytes of `v` (native order), to upload i32 values from.
pub(crate) fn i32s_as_bytes(v: &[i32]) -> &[u8] {
    let n = std::mem::size_of_val(v);
    // SAFETY: reads the same n initialised bytes v covers (u8 has alignment
    // 1), borrowing v for the slice's life.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, n) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_hold_native_bytes_first() {
        let p = Param::bits32(7i32.to_ne_bytes());
        assert_eq!(p.size(), 4);
        assert_eq!(&p.slot.to_ne_bytes()[..4], &7i32.to_ne_bytes());
        let p = Param::bits32(1.5f32.to_ne_bytes());
        assert_eq!(&p.slot.to_ne_bytes()[..4], &1.5f32.to_ne_bytes());
        let p = Param::bits64(0xdead_beef_u64.to_ne_bytes());
        assert_eq!((p.slot, p.size()), (0xdead_beef, 8));
    }

    #[test]
    fn byte_views_cover_the_values() {
        let mut f = [1.0f32, -2.0];
        let b = f32s_as_bytes_mut(&mut f);
        assert_eq!(b.len(), 8);
        b[..4].copy_from_slice(&3.0f32.to_ne_bytes());
        assert_eq!(f, [3.0, -2.0]);
        let i = [1i32, -1];
        assert_eq!(i32s_as_bytes(&i)[4..], (-1i32).to_ne_bytes());
    }
}
