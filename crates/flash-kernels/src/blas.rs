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

    /// Runs the GEMMs an engine's first prefill runs (bf16 outputs, f32
    /// outputs added to a residual, f32 logits; a few prompt lengths; the
    /// widths of an 8B-class layer) on scratch memory, and waits for them.
    /// cuBLAS loads its kernels and builds its heuristics' state lazily, on
    /// the first GEMM of each kind in the process: about 0.1 s that the
    /// first request of a fresh process would otherwise pay. The scratch
    /// (under 150 MiB) is freed before this returns; its contents are
    /// whatever the allocator left (only the kernels' loading matters).
    pub fn warm_up(&self) -> Result<(), CudaError> {
        const WIDTH: usize = 4096;
        const INNER: usize = 3 * WIDTH;
        const TOKENS: [usize; 4] = [1, 8, 32, 256];
        let gpu = self.stream().gpu();
        let max_m = TOKENS[TOKENS.len() - 1];
        let x = gpu.alloc(max_m * INNER * 2)?;
        let w = gpu.alloc(INNER * WIDTH * 2)?;
        let y = gpu.alloc(max_m * INNER * 4)?;
        // (n, k): attention and MLP projections in, the MLP's projection out.
        for (n, k) in [(WIDTH, WIDTH), (INNER, WIDTH), (WIDTH, INNER)] {
            for m in TOKENS {
                for (out, accumulate) in [
                    (OutType::Bf16, false),
                    (OutType::F32, true),
                    (OutType::F32, false),
                ] {
                    self.gemm(
                        DevView::new(&x, 0, m * k * 2)?,
                        DevView::new(&w, 0, n * k * 2)?,
                        DevView::new(&y, 0, m * n * out.size())?,
                        out,
                        m,
                        n,
                        k,
                        accumulate,
                    )?;
                }
            }
        }
        self.stream().synchronize()
    }
}
