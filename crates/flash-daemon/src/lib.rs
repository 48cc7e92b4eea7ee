//! The flashtensors daemon (issue 4): a long-lived process that knows which
//! model is where — on disk (the store), in host memory, resident on each
//! GPU — moves models between those tiers under byte budgets, and lends
//! their memory to clients.
//!
//! This crate will become the daemon: the gRPC server over a Unix socket
//! (load in share and copy modes, release, unload, status, shutdown), leases
//! tied to connections, the `/metrics` listener, the pid file and restart
//! recovery. Today it holds the tier plumbing only:
//!
//! - [`tiers`]: the [`TierBackend`](flash_tier::TierBackend)s of the memory
//!   tier ([`HostMemory`]) and of each GPU ([`GpuMemory`]), the byte movers of
//!   the store's models ([`StoreTransfers`], built on `flash-load`), and
//!   [`build_tiers`], which probes CUDA and assembles a
//!   [`TierManager`](flash_tier::TierManager) with one tier per device.
//!
//! The policy (LRU eviction, leases, single-flight loads, refusals) is
//! `flash-tier`'s; this crate supplies memory and moves bytes. Like every
//! crate but `flash-sys`, it has no `unsafe` code.

#![forbid(unsafe_code)]

pub mod tiers;

pub use tiers::{
    build_tiers, build_tiers_on, GpuMemory, HostImage, HostMemory, SetupError, StoreTransfers,
    TierConfig, Tiers,
};
