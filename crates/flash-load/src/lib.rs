//! The load library: from a model folder on disk to tensors in memory.
//!
//! A load is a pipeline (see `ARCHITECTURE.md`):
//! 1. [`ModelSource::open`] reads and validates the folder's metadata (flash
//!    manifest or safetensors headers) into a list of stored tensors;
//! 2. [`LoadPlan::new`] picks the tensors wanted and lays out the destination
//!    so that each file window maps to an aligned destination window;
//! 3. [`execute`] runs reader threads over the plan's jobs and hands each job
//!    to a [`Sink`]: [`HostSink`] (host memory, in place), [`ScanSink`]
//!    (streamed to a function) or [`CudaSink`] (pinned staging, async copies).

pub mod decode;
pub mod disk;
pub mod error;
pub mod gpu;
pub mod host;
pub mod pipeline;
pub mod placement;
pub mod plan;
pub mod source;

pub use disk::{ProbeResult, ReadPattern};
pub use error::LoadError;
pub use gpu::{load_to_gpu, CudaSink, GpuModel, StagingPool};
pub use host::{load_to_host, HostModel, HostSink, ScanSink};
pub use pipeline::{
    default_threads, execute, Advice, IoMode, LoadOptions, LoadStats, ReadFn, ReadOrder, Sink,
    SinkWorker, DEFAULT_READ_BYTES, STAGING_LIMIT,
};
pub use placement::{load_placed, Device, DeviceMap, PlacedModel};
pub use plan::{EncodedTensor, Job, LoadPlan, PlannedChunk, Segment, TensorTable, TensorView};
pub use source::{ModelSource, SourceFile, SourceKind, StoredChunk, StoredEncoding, StoredTensor};
