//! The machine's limits, the self-checks and the benchmarks of flashtensors,
//! as functions that return reports.
//!
//! Every front end runs the same measurements: the `flash` binary prints
//! these reports as tables or JSON (`flash doctor`, `flash bench`, `flash
//! selftest`...), and another front end (the Python SDK, a service) can call
//! the same functions and get the same numbers. Nothing here parses
//! arguments, draws progress bars or prints: long runs report their
//! progress through callbacks, and the reports are `serde::Serialize`
//! structs whose JSON is the one the binary prints (device scripts and
//! tests parse it).
//!
//! - [`limits`]: the GPU copy measurements every report compares against
//!   (pinned host-to-device, device-to-device);
//! - [`doctor`]: what this machine offers each stage of a load (host, GPUs
//!   and their copies, pinning, the store's disk), saved beside the store;
//! - [`loaders`]: the load path against a naive baseline and the stage
//!   limits (scenarios cold, warm, pinned, decode), and cold reads of files
//!   with several read patterns;
//! - [`selftest`]: synthesized models loaded through every path to every
//!   GPU (and host memory), every byte checked against the import's
//!   checksums; compressed models and a corrupted chunk;
//! - [`engine`]: the inference engine's checks (every GPU op against the
//!   CPU, the kernel cache, the GPU forward against the CPU reference), its
//!   benchmark against the roofline, teacher-forced logits;
//! - [`kernels`]: every CUDA source the binary carries compiled with NVRTC;
//! - [`daemon`]: the daemon's check (a real daemon on a scratch store, share
//!   and copy mode from this and a second process), through flash-client;
//! - [`daemon_bench`]: the daemon's benchmarks against a running daemon
//!   (memory tier → GPU upload, attach, a swap workload).
//!
//! It depends on every library below the front ends (flash-load,
//! flash-store, flash-synth, flash-engine, flash-kernels, flash-client) and
//! on none of the front ends: the daemon is reached as a separate process,
//! started from the `flash` binary whose path the caller passes.

pub mod daemon;
pub mod daemon_bench;
pub mod doctor;
pub mod engine;
pub mod kernels;
pub mod limits;
pub mod loaders;
pub mod selftest;

use std::path::PathBuf;

/// Why a check, a measurement or a benchmark could not run. A check that
/// ran and found a fault is not an error: its report says so.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Load(#[from] flash_load::LoadError),
    #[error(transparent)]
    Store(#[from] flash_store::StoreError),
    #[error(transparent)]
    Synth(#[from] flash_synth::SynthError),
    #[error(transparent)]
    Engine(#[from] flash_engine::EngineError),
    #[error(transparent)]
    Client(#[from] flash_client::ClientError),
    #[error(transparent)]
    Cuda(#[from] flash_sys::cuda::CudaError),
    #[error(transparent)]
    Manifest(#[from] flash_format::ManifestError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An option or a request the check cannot run with (the message says
    /// which and what it takes).
    #[error("{0}")]
    Invalid(String),
    /// A measurement that could not be made, or a run that did not happen as
    /// the check needs (the message says what).
    #[error("{0}")]
    Failed(String),
}

impl CheckError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CheckError {
        let path = path.into();
        move |source| CheckError::Io { path, source }
    }
}

pub type Result<T, E = CheckError> = std::result::Result<T, E>;

/// A scratch folder, made empty on creation and removed on drop (on every
/// path out of a check, errors included).
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Makes `path` an empty folder (whatever a dead run left there is
    /// removed first).
    pub fn new(path: PathBuf) -> Result<ScratchDir> {
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(CheckError::io(&path))?;
        Ok(ScratchDir { path })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
