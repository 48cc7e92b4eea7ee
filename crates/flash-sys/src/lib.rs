//! The one crate with `unsafe` code: everything that talks to CUDA or asks the
//! operating system for more than `std` offers.
//!
//! - [`os`]: memory aligned for O_DIRECT, O_DIRECT opens, page-cache residency
//!   (`mincore`) and eviction (`posix_fadvise`), io_uring availability.
//! - [`uring`]: many reads of one file in flight from one thread (io_uring,
//!   registered buffers), for the disk probe.
//! - [`cuda`]: the CUDA driver, loaded at run time through cudarc. A machine
//!   without a driver gets [`cuda::probe`] returning why, never a panic.
//! - [`shm`]: the daemon's host pool (shared memory, pinned once), clients'
//!   maps of it, the daemon's lock file and signals.
//!
//! Every `unsafe` block carries a `SAFETY:` comment.

pub mod cuda;
pub mod os;
pub mod shm;
pub mod uring;
