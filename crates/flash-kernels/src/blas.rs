//! cuBLAS, loaded at run time: one handle bound to one stream, bf16 inputs
//! with f32 accumulation (`CUBLAS_COMPUTE_32F`), bf16 or f32 outputs. Its
//! libraries are ~600 MB, so nothing loads them before a handle is asked for
//! ([`Blas::new`]); [`cublas_available`] says why they cannot be used,
//! never panics.

use crate::ffi::{self, BlasHandle};
use crate::view::DevView;
use flash_sys::cuda::{CudaError, Stream};

/// Whether cuBLAS can be used (checked once per process).
pub fn cublas_available() -> Result<(), CudaError> {
    ffi::cublas_available()
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
    handle: BlasHandle,
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
        let (handle, version) = BlasHandle::new(stream)?;
        Ok(Blas { handle, version })
    }

    /// cuBLAS's version (130100 for 13.1.0).
    pub fn version(&self) -> i32 {
        self.version
    }

    pub fn stream(&self) -> &Stream {
        self.handle.stream()
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ (+ y when accumulate)`, all row-major:
    /// `x` and `w` bf16 (w as Hugging Face stores a linear layer, [out, in]),
    /// `y` bf16 or f32, f32 accumulation. Queued on the handle's stream.
    /// Every view is checked against the shapes first.
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
        self.handle
            .gemm_bf16(&x, &w, &y, out == OutType::F32, m, n, k, accumulate)
    }
}
