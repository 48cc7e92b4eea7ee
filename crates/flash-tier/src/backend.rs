//! What the daemon plugs in: memory allocation per tier ([`TierBackend`]) and
//! the byte movers between tiers ([`Transfers`]).

use crate::error::TierError;
use crate::types::{ModelId, Tier};

/// Allocates model images in one tier. One value per tier: a host-memory
/// backend (a pinned pool on GPU machines, aligned memory elsewhere) and one
/// per GPU (`cuMemAlloc`).
///
/// A buffer is freed by dropping it. The manager drops buffers only outside
/// its lock, and only when no lease or transfer still holds them, so `Drop`
/// may be slow (`cuMemFree` synchronises the context).
pub trait TierBackend: Send + Sync + 'static {
    /// A model image in this tier.
    type Buf: Send + Sync + 'static;

    /// A buffer of exactly `bytes` bytes (the manager has already reserved
    /// them in the tier's budget). Return [`TierError::OutOfMemory`] when the
    /// memory is exhausted despite the budget (a fragmented pool, another
    /// process on the GPU): the manager then evicts the least popular
    /// evictable copy of the tier and calls again. Called without any lock
    /// held, from the thread that asked for the model.
    fn alloc(&self, bytes: u64) -> Result<Self::Buf, TierError>;
}

/// The buffer type of the memory tier of `X`.
pub type MemoryBuf<X> = <<X as Transfers>::Memory as TierBackend>::Buf;
/// The buffer type of the GPU tiers of `X`.
pub type GpuBuf<X> = <<X as Transfers>::Gpu as TierBackend>::Buf;

/// Sizes models and moves their bytes between tiers. The daemon implements it
/// on top of `flash-load` (disk → host pipeline, disk → GPU pipeline, pinned
/// upload).
///
/// Every method is called without any lock of the manager held, on the
/// thread that asked for the model, and may take seconds. Methods must not
/// call back into the [`TierManager`](crate::TierManager) for the same model
/// (the calling request is the load every other request for that model
/// waits on). A panic is caught and turned into an error ([`TierError::Load`],
/// or [`TierError::Model`] for `image_bytes`). A failed transfer leaves
/// nothing behind: the manager drops the buffer and returns its bytes to the
/// budget. Requests waiting for a load wait without a time limit: a transfer
/// must end (or fail) on its own, e.g. with an I/O timeout.
pub trait Transfers: Send + Sync + 'static {
    type Memory: TierBackend;
    type Gpu: TierBackend;

    /// The size of the model's image in `tier`: what its buffer there holds
    /// (a compressed model is smaller in the memory tier, which keeps its
    /// stored bytes, than on a GPU, which holds it decoded). Called once per
    /// miss, before anything is reserved.
    fn image_bytes(&self, model: &ModelId, tier: Tier) -> Result<u64, TierError>;

    /// Fills `dst` with the model read from the store.
    fn disk_to_memory(&self, model: &ModelId, dst: &mut MemoryBuf<Self>) -> Result<(), TierError>;

    /// Fills `dst` on GPU `gpu` from the model's memory-tier copy `src`.
    /// Must return only once the copy has completed: `src` is borrowed for the
    /// call and may be evicted right after it.
    fn memory_to_gpu(
        &self,
        model: &ModelId,
        src: &MemoryBuf<Self>,
        gpu: u16,
        dst: &mut GpuBuf<Self>,
    ) -> Result<(), TierError>;

    /// Fills `dst` on GPU `gpu` straight from the store (a GPU load whose
    /// model the memory tier does not hold). With `keep`, the same pass over
    /// the disk also fills that memory-tier buffer, exactly as
    /// [`disk_to_memory`](Self::disk_to_memory) would: an inclusive
    /// manager's cold load leaves its memory copy without reading the disk
    /// twice or waiting for the memory copy before the upload. Must return
    /// only once the data is on the device and in `keep`.
    fn disk_to_gpu(
        &self,
        model: &ModelId,
        gpu: u16,
        dst: &mut GpuBuf<Self>,
        keep: Option<&mut MemoryBuf<Self>>,
    ) -> Result<(), TierError>;
}
