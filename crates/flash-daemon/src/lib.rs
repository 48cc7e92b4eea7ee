//! The flashtensors daemon: a long-lived process that knows which
//! model is where — on disk (the store), in host memory, resident on each
//! GPU — moves models between those tiers under byte budgets, and lends
//! their memory to clients.
//!
//! - [`server`]: the daemon process — its configuration, the state every
//!   request shares, its start (tiers, the gRPC listeners on the Unix socket
//!   and optionally TCP with a token, HTTP) and a graceful stop; [`run`] is
//!   the entry point.
//! - `home`: the daemon's files in `$FLASH_HOME` (lock, pid, socket, token)
//!   and its shared-memory folder: created at start, a dead daemon's
//!   removed, all removed at a clean stop.
//! - `service`: the gRPC service `flash.v1.Flash` (generated in
//!   `flash-client`): requests checked and mapped onto the store and the
//!   tiers, tier and store errors onto gRPC codes.
//! - `lease`: share mode (leases: CUDA IPC handles, shared-memory ranges),
//!   copy mode (fills of the client's buffers) and the sessions that own
//!   leases (released when a client's connection closes).
//! - [`metrics`]: the HTTP listener's `/metrics` (Prometheus text) and
//!   `/health`, an `axum::Router` that [`run`] extends with other routes.
//! - [`serve`] and [`openai`]: the inference engines hosted by the daemon
//!   ([`serve::EngineHost`]: one engine per model, on its copy in a tier,
//!   one request at a time each) and the OpenAI-compatible HTTP API on them
//!   (`/v1/models`, `/v1/completions`, `/v1/chat/completions`), added to the
//!   HTTP listener by passing [`openai::routes`] to [`run`].
//! - `text`: each served model's config and tokenizer, parsed once per
//!   version, ahead of its first request when it is put in a tier.
//! - [`tiers`]: the [`TierBackend`](flash_tier::TierBackend)s of the memory
//!   tier ([`HostMemory`], images carved from one shared, pinned-once host
//!   pool) and of each GPU ([`GpuMemory`]), the byte movers of the store's
//!   models ([`StoreTransfers`], built on `flash-load`), and [`build_tiers`],
//!   which probes CUDA and assembles a [`TierManager`](flash_tier::TierManager)
//!   with one tier per device.
//!
//! The policy (eviction by popularity, leases, single-flight loads, refusals) is
//! `flash-tier`'s; this crate supplies memory and moves bytes. Like every
//! crate but `flash-sys`, it has no `unsafe` code.

#![forbid(unsafe_code)]

mod fresh;
mod home;
mod lease;
pub mod metrics;
pub mod openai;
pub mod serve;
pub mod server;
mod service;
mod text;
pub mod tiers;

/// The HTTP router type that [`run`] takes extra routes as.
pub use axum::Router;
/// Loads that read the store's disk at once unless `flash start --disk-loads` says otherwise.
pub use flash_tier::DEFAULT_DISK_LOADS;
pub use server::{run, DaemonConfig, DaemonError, DaemonHandle, LOCK_FILE, LOG_FILE, PID_FILE};
pub use tiers::{
    build_tiers, build_tiers_on, build_tiers_with, GpuMemory, HostImage, HostMemory, SetupError,
    StoreTransfers, TierConfig, Tiers,
};
