//! The daemon's tier manager: which model is where, under which budget, and
//! who holds it.
//!
//! A model lives in up to three tiers. The **disk** (the store) holds every
//! model, always, and is the source of truth. The **memory** tier (one pool
//! pinned at daemon start on GPU machines, plain aligned memory elsewhere) and
//! one **GPU** tier per device (daemon-owned `cuMemAlloc` memory) are caches,
//! each with a budget in bytes. A [`TierManager`] owns the bookkeeping of the
//! cache tiers and decides what to load and what to evict; the daemon supplies
//! the memory ([`TierBackend`]: allocate a buffer in a tier) and the byte
//! movers ([`Transfers`]: size a model, disk → memory, memory → GPU,
//! disk → GPU). Nothing here does I/O, CUDA or networking, so the whole policy
//! runs in CPU tests with fake backends.
//!
//! # What a request does
//!
//! [`TierManager::acquire`]`(model, tier, client)` returns a [`Lease`] on a
//! copy of `model` in `tier`:
//!
//! 1. **hit**: the copy is there: it is marked used and leased (one lock, no
//!    I/O);
//! 2. **coalesced**: a load of that copy is in flight: the request waits for
//!    it and shares its result, success or error (single-flight);
//! 3. **miss**: the request loads it, from the highest tier that has it. For a
//!    GPU tier that is the memory copy if there is one (or one being loaded);
//!    otherwise it goes straight from disk to the GPU, at the speed of a
//!    direct load, and when the manager is inclusive (the default) the same
//!    pass over the disk fills a memory copy (reserved beside the GPU's,
//!    where the memory tier has room at once; requests for it wait on that
//!    load as on any other). Loads from disk take turns on it, one at a
//!    time by default ([`TierBuilder::disk_loads`]), the smallest waiting
//!    first: loads sharing the disk all end late, loads in turn end one
//!    after the other, the same total sooner on average.
//!
//! Room is made by evicting copies of the tier that are neither leased, kept,
//! nor being read by a transfer — as few as needed, the least popular first
//! (the fewest requests lately, recent ones weighing more; ties: the least
//! recently used; see [`popularity`]), and none if that would not suffice. When the room is held
//! by loads in flight (which end on their own) or by copies other clients
//! lease (given back when their requests end), the request waits up to
//! [`TierBuilder::space_wait`]: a serving daemon queues a request behind
//! the others rather than failing it. When kept copies, reservations and
//! the requester's own leases leave too little room, waiting cannot help and
//! it is refused at once. Either refusal is [`TierError::NoSpace`], which
//! names the model, the tier, the bytes needed, the budget, what is free,
//! and every copy that is leased (by which clients) or kept. Every wait is
//! bounded: nothing deadlocks.
//!
//! Eviction only drops copies. A model evicted from a GPU keeps its memory
//! copy if it has one, and one evicted from memory keeps its GPU copies; no
//! bytes are copied down, since the disk always has the model. Popularity
//! belongs to the model, not to a copy: requests served by a GPU copy keep
//! its memory copy popular too, so an inclusive memory tier does not evict
//! the models hottest on the GPU first. The memory copy a GPU load from disk
//! fills on its way is made only in free room or in place of less popular
//! models: a model requested once goes to the GPU without pushing a popular
//! one out of memory.
//!
//! [`TierManager::reserve`] holds bytes of a tier's budget for memory that
//! is not a copy: the daemon's GPU engines (KV cache, activations) take
//! their room from the GPU tier's budget before they allocate, evicting idle
//! copies as a load would, so that copies and engines together stay within
//! the budget. A reservation is never evicted; dropping it gives the bytes
//! back.
//!
//! [`TierManager::load`] prewarms (optionally `keep`: never evicted),
//! [`TierManager::unload`] drops copies (refused while leased),
//! [`TierManager::status`] reports budgets, use, copies, leases, counters and
//! load-time histograms (serde `Serialize`, for `flash status --json` and
//! `/metrics`).
//!
//! # Leases
//!
//! A lease keeps its copy from being evicted or unloaded. It is owned either
//! by a [`Lease`] value (dropping it releases the lease; it also gives access
//! to the buffer) or, after [`Lease::detach`], by the manager, where
//! [`TierManager::release`] ends it by [`LeaseId`] and
//! [`TierManager::client_gone`] ends all of a client's. The RPC layer detaches
//! a lease once it has sent the client what it needs (IPC handles), and calls
//! `client_gone` when the connection closes. `release` and `client_gone` never
//! end a lease still owned by a [`Lease`] value (that value lends the buffer,
//! which cannot be taken back from under it): the RPC layer keeps such values
//! in the connection's state, so that they drop with it.
//!
//! # Invariants
//!
//! For every tier, under the lock:
//! - `used = resident + loading + freeing <= budget`: bytes are reserved
//!   (`loading`) before the allocation, so concurrent loads never overcommit;
//!   evicted and unloaded copies stay counted (`freeing`) until their buffer
//!   has been dropped; a failed load returns its reservation after its buffer
//!   is gone. Counted bytes are therefore always at least the bytes the
//!   backend holds for the tier: a budget equal to the physical memory is
//!   never exceeded.
//! - the copies of the table sum to `resident`, the loads to `loading`;
//! - a copy with a lease, a pin or a keep mark is never removed; every lease
//!   in the lease table refers to a resident copy, whose lease count matches;
//! - a failed load leaves no entry and no reservation, and all its waiters
//!   get its error;
//! - when a copy's leases and pins are all gone, the table holds the only
//!   reference to its buffer (leases and transfers drop their references
//!   before releasing their counts), so evicting it frees its memory.
//!
//! [`TierManager::check_invariants`] checks them.
//!
//! # Threads and locks
//!
//! One `Mutex` guards all of the state, with one `Condvar` signalled on every
//! change that could let a waiter go on. The disk's turns have a lock of
//! their own, taken only while the state's is not held (a load waits for
//! its turn after publishing itself, lock released), **so no thread ever
//! holds both and there is no lock order**. It is held only for bookkeeping: never while calling the
//! daemon's code (sizes, allocations, transfers), never while dropping the
//! last reference to a buffer, never while waiting (the `Condvar` releases
//! it). A request that
//! loads does so on its own thread, lock released, and takes the lock again to
//! publish the result. Every method blocks its caller: the daemon calls them
//! from `tokio::task::spawn_blocking` (or its own threads); [`Lease`] values
//! may be dropped on any thread. Transfers must not call back into the
//! manager for the model they are loading.
//!
//! A wait never forms a cycle: single-flight waiters wait on a loader, which
//! waits on nothing but its turn on the disk (loads ahead of it, which
//! wait on nothing but their transfers) and its transfer (without a time
//! limit: transfers must end on their own); requests waiting for room (at most `space_wait`) and
//! `unload` wait for loads in flight, pins (held by transfers) and frees, none
//! of which wait for room in the same tier; a GPU load may hold a pin on the
//! memory copy it reads while it waits for GPU room, and requests for memory
//! room that wait on that pin thus wait on GPU loads, which never wait on
//! memory. No wait depends on a client releasing a lease.
//!
//! # What is counted
//!
//! Each request counts, in each tier it consults, exactly one of
//! ([`TierCounters`]): `hits` (the copy was there on arrival), `coalesced`
//! (it got a copy another request loaded: single-flight) or `misses` (it
//! loaded the copy itself, or was refused). A GPU request served from the
//! memory copy counts a GPU miss and a memory hit. Loads count `loads` (or
//! `load_failures`) and their duration in a histogram by source tier
//! ([`LoadHistogram`]); [`Lease::served_from`] tells the daemon where each
//! request's bytes came from, for its own switch-latency metrics.
//!
//! # Example
//!
//! A CPU stand-in for the daemon's backends (a `Vec<u8>` per copy):
//!
//! ```
//! use flash_tier::{ClientId, ModelId, Tier, TierBackend, TierError, TierManager, Transfers};
//!
//! struct Heap;
//! impl TierBackend for Heap {
//!     type Buf = Vec<u8>;
//!     fn alloc(&self, bytes: u64) -> Result<Vec<u8>, TierError> {
//!         Ok(vec![0; bytes as usize])
//!     }
//! }
//!
//! struct Store;
//! impl Transfers for Store {
//!     type Memory = Heap;
//!     type Gpu = Heap; // a CPU device standing in for a GPU
//!     fn image_bytes(&self, _: &ModelId, _: Tier) -> Result<u64, TierError> {
//!         Ok(4096)
//!     }
//!     fn disk_to_memory(&self, _: &ModelId, dst: &mut Vec<u8>) -> Result<(), TierError> {
//!         dst.fill(1);
//!         Ok(())
//!     }
//!     fn memory_to_gpu(&self, _: &ModelId, src: &Vec<u8>, _gpu: u16, dst: &mut Vec<u8>) -> Result<(), TierError> {
//!         dst.copy_from_slice(src);
//!         Ok(())
//!     }
//!     fn disk_to_gpu(
//!         &self,
//!         _: &ModelId,
//!         _gpu: u16,
//!         dst: &mut Vec<u8>,
//!         keep: Option<&mut Vec<u8>>,
//!     ) -> Result<(), TierError> {
//!         dst.fill(1);
//!         if let Some(memory) = keep {
//!             memory.fill(1); // the same read fills the memory copy
//!         }
//!         Ok(())
//!     }
//! }
//!
//! let tiers = TierManager::builder(Store, Heap, 1 << 20).gpu(Heap, 1 << 16).build();
//! let model = ModelId::new("Qwen/Qwen3-0.6B");
//!
//! let lease = tiers.acquire(&model, Tier::Gpu(0), ClientId(7))?;
//! assert_eq!(lease.served_from(), Tier::Disk); // disk -> GPU, memory filled on the way
//! assert_eq!(lease.gpu().unwrap()[0], 1);
//!
//! let id = lease.detach(); // the RPC layer keeps the id for the client
//! tiers.release(id)?;
//! assert_eq!(tiers.locate(&model), [Tier::Gpu(0), Tier::Memory]);
//! assert_eq!(tiers.status().tier(Tier::Gpu(0)).unwrap().counters.misses, 1);
//! # Ok::<(), TierError>(())
//! ```

mod backend;
mod disk_queue;
mod error;
mod ledger;
mod manager;
pub mod popularity;
mod status;
mod types;

pub use backend::{GpuBuf, MemoryBuf, TierBackend, Transfers};
pub use error::{Holder, NoSpace, TierError};
pub use manager::{
    Lease, Loaded, Reservation, TierBuilder, TierManager, DEFAULT_DISK_LOADS, DEFAULT_SPACE_WAIT,
};
pub use status::{
    Bucket, LoadHistogram, ModelReport, ModelState, TierCounters, TierReport, TierStatus,
    LOAD_SECONDS_BUCKETS,
};
pub use types::{fmt_bytes, ClientId, LeaseId, ModelId, Tier};
