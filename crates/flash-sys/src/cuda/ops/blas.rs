//! cuBLAS, loaded at run time: one handle bound to one stream, bf16 inputs
//! with f32 accumulation (`CUBLAS_COMPUTE_32F`), bf16 or f32 outputs.

use super::super::{CudaError, Stream};
use super::DevView;
use cudarc::cublas::sys;
use std::ffi::{c_void, CStr};
use std::sync::{Mutex, OnceLock};

const CUBLAS_SYMBOLS: &[&str] = &[
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasGemmEx",
    "cublasGetStatusString",
    "cublasGetVersion_v2",
];

/// Whether cuBLAS can be used (checked once per process).
pub fn cublas_available() -> Result<(), CudaError> {
    static V: OnceLock<Result<(), String>> = OnceLock::new();
    V.get_or_init(|| {
        // SAFETY: only dlopens the candidate library names and closes them.
        if !unsafe { sys::is_culib_present() } {
            return Err("cuBLAS (libcublas.so) cannot be loaded: install the CUDA \
                        runtime libraries (libcublas, libcublasLt)"
                .to_string());
        }
        let missing: Vec<&str> = CUBLAS_SYMBOLS
            .iter()
            .copied()
            // SAFETY: the library is present; `get` only looks the symbol up.
            .filter(|s| unsafe { sys::culib().get::<*const ()>(s.as_bytes()).is_err() })
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

fn status(s: sys::cublasStatus_t, what: &str) -> Result<(), CudaError> {
    if s == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Ok(());
    }
    // SAFETY: returns a static NUL-terminated string (or null).
    let text = unsafe {
        let p = sys::cublasGetStatusString(s);
        if p.is_null() {
            format!("{s:?}")
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    Err(CudaError::Usage(format!("{what}: {text} ({s:?})")))
}

/// The output type of a GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutType {
    Bf16,
    F32,
}

impl OutType {
    pub fn size(self) -> usize {
        match self {
            OutType::Bf16 => 2,
            OutType::F32 => 4,
        }
    }
}

/// A cuBLAS handle whose work goes to one stream. `Send + Sync` (calls are
/// serialised by a mutex; cuBLAS handles must not be used by two threads at
/// once).
pub struct Blas {
    handle: Mutex<usize>,
    stream: Stream,
    version: i32,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas")
            .field("version", &self.version)
            .finish()
    }
}

impl Blas {
    /// A handle on `stream`'s GPU whose work is queued on `stream`.
    pub fn new(stream: &Stream) -> Result<Blas, CudaError> {
        cublas_available()?;
        stream.gpu().bind_to_thread()?;
        let mut h: sys::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: writes one handle through a valid pointer; the handle is
        // owned by the returned Blas and destroyed once in its Drop.
        status(unsafe { sys::cublasCreate_v2(&mut h) }, "cublasCreate")?;
        // The handle is kept as an address so that Blas is Send + Sync; it is
        // only ever used under the mutex.
        let mut blas = Blas {
            handle: Mutex::new(h as usize),
            stream: stream.clone(),
            version: 0,
        };
        // SAFETY: h is a live handle; the stream is live as long as blas
        // holds its clone.
        status(
            unsafe { sys::cublasSetStream_v2(h, stream.raw() as sys::cudaStream_t) },
            "cublasSetStream",
        )?;
        let mut v = 0i32;
        // SAFETY: h is live; writes one int.
        status(
            unsafe { sys::cublasGetVersion_v2(h, &mut v) },
            "cublasGetVersion",
        )?;
        blas.version = v;
        Ok(blas)
    }

    /// cuBLAS's version (130100 for 13.1.0).
    pub fn version(&self) -> i32 {
        self.version
    }

    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ (+ y when accumulate)`, all row-major:
    /// `x` and `w` bf16 (w as Hugging Face stores a linear layer, [out, in]),
    /// `y` bf16 or f32, f32 accumulation. Queued on the handle's stream.
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
        if m == 0 || n == 0 {
            return Ok(());
        }
        let gpu = self.stream.gpu();
        for (name, v, bytes) in [
            ("gemm input", &x, m * k * 2),
            ("gemm weight", &w, n * k * 2),
            ("gemm output", &y, m * n * out.size()),
        ] {
            v.require(name, bytes)?;
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
        let ctype = match out {
            OutType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
            OutType::F32 => sys::cudaDataType::CUDA_R_32F,
        };
        gpu.bind_to_thread()?;
        let h = self.handle.lock().unwrap_or_else(|p| p.into_inner());
        // Column-major view: yᵀ[n, m] = (wᵀ)ᵀ… i.e. C = op(A)·B with
        // A = w as a k×n column-major matrix (lda k) transposed, B = x as a
        // k×m column-major matrix (ldb k), C = y as n×m (ldc n).
        // SAFETY: every pointer lies in a live device allocation with at
        // least the bytes the shapes need (checked above); alpha/beta are
        // host scalars (the default pointer mode) alive for the call; the
        // handle is live and used by one thread at a time (the mutex).
        let s = unsafe {
            sys::cublasGemmEx(
                *h as sys::cublasHandle_t,
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w.ptr() as *const c_void,
                sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                x.ptr() as *const c_void,
                sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const c_void,
                y.ptr() as *mut c_void,
                ctype,
                n as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        status(s, &format!("cublasGemmEx {m}x{n}x{k}"))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        let h = *self.handle.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.stream.synchronize();
        let _ = self.stream.gpu().bind_to_thread();
        // SAFETY: the handle is live and destroyed exactly once, after its
        // stream's work ended.
        let s = unsafe { sys::cublasDestroy_v2(h as sys::cublasHandle_t) };
        if s != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            tracing::warn!("cublasDestroy: {s:?}");
        }
    }
}
