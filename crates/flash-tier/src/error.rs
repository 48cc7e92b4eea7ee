//! Errors. Every refusal names the model, the tier, the bytes needed and what
//! holds the tier, so that the daemon can show it to the user as it is.

use crate::types::{fmt_bytes, ClientId, LeaseId, ModelId, Tier};
use serde::Serialize;
use std::fmt;

/// Why a tier operation failed. `Clone`: the waiters of a failed load all
/// receive the loader's error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TierError {
    /// The tier is not a cache tier of this manager (the disk, or a GPU
    /// ordinal it was not given).
    #[error("{tier} is not a cache tier here (tiers: {available})")]
    NoSuchTier { tier: Tier, available: String },

    /// The tier exists with a budget of 0 bytes (a machine without a GPU, or
    /// a memory tier turned off).
    #[error("cannot place {model} in the {tier} tier: its budget is 0 bytes")]
    Disabled { model: ModelId, tier: Tier },

    /// The model is larger than the tier's whole budget: no eviction helps.
    #[error("{model} needs {} in the {tier} tier, more than its whole budget of {}", fmt_bytes(*.needed), fmt_bytes(*.budget))]
    TooLarge {
        model: ModelId,
        tier: Tier,
        needed: u64,
        budget: u64,
    },

    /// The tier is full of copies that may not be evicted (leased or kept).
    #[error("{0}")]
    NoSpace(Box<NoSpace>),

    /// `unload` of a copy that clients hold.
    #[error("{model} is in use in the {tier} tier: {}", list_clients(.holders))]
    Busy {
        model: ModelId,
        tier: Tier,
        /// One entry per lease.
        holders: Vec<ClientId>,
    },

    /// The model has no copy in that tier (`unload`, `set_keep`, and internal
    /// look-ups that may not load).
    #[error("{model} is not in the {tier} tier")]
    NotResident { model: ModelId, tier: Tier },

    /// `release` of a lease that does not exist (already released, or its
    /// client is gone).
    #[error("{0} is not held")]
    UnknownLease(LeaseId),

    /// `release` by id of a lease still owned by a [`Lease`](crate::Lease)
    /// value: drop that value instead (or `detach` it first).
    #[error("{0} is owned by a Lease value: drop it, or detach it before releasing it by id")]
    LeaseAttached(LeaseId),

    /// A load failed: the allocation, the transfer, or a panic in either.
    /// `cause` is what the backend or the transfer returned.
    #[error("loading {model} from {from} into {to} failed: {cause}")]
    Load {
        model: ModelId,
        from: Tier,
        to: Tier,
        cause: Box<TierError>,
    },

    /// Returned by a [`TierBackend`](crate::TierBackend) whose memory is
    /// exhausted although the budget allows the allocation (fragmentation of a
    /// pinned pool, another process on the GPU). The manager then evicts the
    /// least popular evictable copy and tries again.
    #[error("out of memory: {0}")]
    OutOfMemory(String),

    /// Any other failure of a backend or a transfer.
    #[error("{0}")]
    Backend(String),

    /// The daemon cannot size or read this model (not in the store, damaged).
    #[error("{model}: {message}")]
    Model { model: ModelId, message: String },
}

impl TierError {
    /// A backend or transfer failure with this message.
    pub fn backend(message: impl Into<String>) -> Self {
        TierError::Backend(message.into())
    }

    /// An allocation that failed for lack of memory.
    pub fn out_of_memory(message: impl Into<String>) -> Self {
        TierError::OutOfMemory(message.into())
    }

    /// A model the daemon cannot provide.
    pub fn model(model: &ModelId, message: impl Into<String>) -> Self {
        TierError::Model {
            model: model.clone(),
            message: message.into(),
        }
    }

    /// A refusal for lack of room (`Disabled`, `TooLarge`, `NoSpace`), or an
    /// allocation that ran out of memory: the request may succeed in another
    /// tier or later, nothing is broken.
    pub fn is_capacity(&self) -> bool {
        match self {
            TierError::Disabled { .. }
            | TierError::TooLarge { .. }
            | TierError::NoSpace(_)
            | TierError::OutOfMemory(_) => true,
            TierError::Load { cause, .. } => cause.is_capacity(),
            _ => false,
        }
    }
}

fn list_clients(c: &[ClientId]) -> String {
    if c.is_empty() {
        return "no client".into();
    }
    let v: Vec<String> = c.iter().map(|c| c.to_string()).collect();
    format!("leased by {}", v.join(", "))
}

/// The details of a [`TierError::NoSpace`].
#[derive(Debug, Clone, Serialize)]
pub struct NoSpace {
    pub model: ModelId,
    pub tier: Tier,
    /// Bytes the model needs.
    pub needed: u64,
    pub budget: u64,
    /// Budget minus everything counted (copies, loads in flight, frees in flight).
    pub free: u64,
    /// Bytes of copies that could have been evicted (not enough).
    pub evictable: u64,
    /// Bytes that are only temporarily unavailable: loads in flight, copies
    /// being used as the source of a transfer, memory being freed.
    pub in_flight: u64,
    /// The copies that may not be evicted, largest first.
    pub held: Vec<Holder>,
    /// Bytes reserved for engines' buffers (never evicted).
    pub reserved: u64,
    /// How long the request waited for in-flight bytes before giving up
    /// (`None`: refused at once because waiting could not help).
    pub waited_ms: Option<u64>,
}

/// A copy that blocks eviction.
#[derive(Debug, Clone, Serialize)]
pub struct Holder {
    pub model: ModelId,
    pub bytes: u64,
    pub kept: bool,
    /// One entry per lease.
    pub clients: Vec<ClientId>,
}

impl fmt::Display for NoSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no room for {} ({}) in the {} tier: budget {}, {} free, {} evictable",
            self.model,
            fmt_bytes(self.needed),
            self.tier,
            fmt_bytes(self.budget),
            fmt_bytes(self.free),
            fmt_bytes(self.evictable),
        )?;
        if self.in_flight > 0 {
            write!(f, ", {} in flight", fmt_bytes(self.in_flight))?;
        }
        if !self.held.is_empty() {
            f.write_str("; held: ")?;
            for (i, h) in self.held.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{} ({}", h.model, fmt_bytes(h.bytes))?;
                if h.kept {
                    f.write_str(", kept")?;
                }
                if !h.clients.is_empty() {
                    write!(f, ", {}", list_clients(&h.clients))?;
                }
                f.write_str(")")?;
            }
        }
        if self.reserved > 0 {
            write!(f, "; {} reserved for engines", fmt_bytes(self.reserved))?;
        }
        if let Some(ms) = self.waited_ms {
            write!(f, "; waited {ms} ms for loads in flight")?;
        }
        Ok(())
    }
}
