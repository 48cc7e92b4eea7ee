//! Names of things: tiers, models, clients, leases.

use serde::{Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Where a model image can live. Ordered from slowest to fastest:
/// `Disk < Memory < Gpu(0) < Gpu(1) ...`; "a higher tier" means a later one.
///
/// [`Tier::Disk`] is the store: it always holds every model and is never
/// managed here (it appears as the source of a load). [`Tier::Memory`] and
/// [`Tier::Gpu`] are the cache tiers, each with a byte budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    Disk,
    Memory,
    /// Daemon-owned device memory of the GPU with this ordinal.
    Gpu(u16),
}

impl Tier {
    /// Whether this tier is a cache (memory or a GPU) rather than the store.
    pub fn is_cache(self) -> bool {
        !matches!(self, Tier::Disk)
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tier::Disk => f.write_str("disk"),
            Tier::Memory => f.write_str("memory"),
            Tier::Gpu(n) => write!(f, "gpu:{n}"),
        }
    }
}

impl Serialize for Tier {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses `disk`, `memory` (or `mem`), `gpu` (GPU 0) and `gpu:N`.
impl FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "disk" => Ok(Tier::Disk),
            "memory" | "mem" => Ok(Tier::Memory),
            "gpu" => Ok(Tier::Gpu(0)),
            _ => s
                .strip_prefix("gpu:")
                .and_then(|n| n.parse().ok())
                .map(Tier::Gpu)
                .ok_or_else(|| format!("unknown tier {s:?} (expected disk, memory, gpu or gpu:N)")),
        }
    }
}

/// A model's name as the store knows it (`org/name@revision`). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(Arc<str>);

impl ModelId {
    pub fn new(name: impl AsRef<str>) -> Self {
        ModelId(Arc::from(name.as_ref()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for ModelId {
    fn from(s: &str) -> Self {
        ModelId::new(s)
    }
}

impl From<String> for ModelId {
    fn from(s: String) -> Self {
        ModelId(Arc::from(s))
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for ModelId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// One connection of the daemon (the RPC layer numbers them). Leases belong
/// to a client; [`TierManager::client_gone`](crate::TierManager::client_gone)
/// ends them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ClientId(pub u64);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {}", self.0)
    }
}

/// A lease's number, unique for the life of a [`TierManager`](crate::TierManager).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct LeaseId(pub u64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lease {}", self.0)
    }
}

/// `1536` → `"1.50 KiB"`: sizes in messages.
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_order_print_and_parse() {
        assert!(
            Tier::Disk < Tier::Memory && Tier::Memory < Tier::Gpu(0) && Tier::Gpu(0) < Tier::Gpu(1)
        );
        for t in [Tier::Disk, Tier::Memory, Tier::Gpu(0), Tier::Gpu(7)] {
            assert_eq!(t.to_string().parse::<Tier>().unwrap(), t);
        }
        assert_eq!("gpu".parse::<Tier>().unwrap(), Tier::Gpu(0));
        assert!("gpu:x".parse::<Tier>().is_err());
        assert!("ssd".parse::<Tier>().is_err());
    }

    #[test]
    fn bytes_are_readable() {
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.50 KiB");
        assert_eq!(fmt_bytes(16 << 30), "16.00 GiB");
    }
}
