//! The `unsafe` code that talks to the operating system, the CPU's vector
//! units and the CUDA driver:
//! everything that asks the OS for more than `std` offers, and the driver's
//! contexts, memory, streams, events, pinned memory and IPC. The GPU
//! kernels (NVRTC, cuBLAS, the inference engine's ops) are flash-kernels',
//! whose own `unsafe` is confined to one module; this crate knows nothing
//! about models or kernels.
//!
//! - [`os`]: memory aligned for O_DIRECT, O_DIRECT opens, page-cache residency
//!   (`mincore`) and eviction (`posix_fadvise`), io_uring availability.
//! - [`uring`]: many reads of one file in flight from one thread (io_uring,
//!   registered buffers), for the disk probe.
//! - [`cuda`]: the CUDA driver, loaded at run time through cudarc. A machine
//!   without a driver gets [`cuda::probe`] returning why, never a panic. The
//!   few handles flash-kernels needs to queue its own work (the raw stream,
//!   symbol checks, the error helper) are documented there.
//! - [`simd`] (x86-64): the AVX2 table gather of the CPU codec's vector
//!   decoder, safe for any index.
//! - [`shm`]: the daemon's host pool (shared memory, pinned once), clients'
//!   maps of it, the daemon's lock file and signals.
//!
//! Every `unsafe` block carries a `SAFETY:` comment.

pub mod cuda;
pub mod os;
pub mod shm;
#[cfg(target_arch = "x86_64")]
pub mod simd;
pub mod uring;
