//! What [`TierManager::status`](crate::TierManager::status) reports: the
//! `flash status` / `flash ps` view and the numbers behind `/metrics`.

use crate::types::{ClientId, ModelId, Tier};
use serde::Serialize;

/// Upper bounds (seconds) of the load-time histogram buckets, Prometheus
/// style: a load of `s` seconds counts in every bucket with `le >= s`; the
/// implicit `+Inf` bucket is the histogram's `count`.
pub const LOAD_SECONDS_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Everything the manager knows, at one instant (taken under its lock).
#[derive(Debug, Clone, Serialize)]
pub struct TierStatus {
    /// Memory first, then the GPUs by ordinal.
    pub tiers: Vec<TierReport>,
    /// Leases held, attached and detached.
    pub leases: usize,
    /// Loads reading the disk at once, at most (0: no limit); loads
    /// reading it now, and loads waiting for their turn.
    pub disk_loads_limit: usize,
    pub disk_reading: usize,
    pub disk_waiting: usize,
}

impl TierStatus {
    /// The report of one tier.
    pub fn tier(&self, tier: Tier) -> Option<&TierReport> {
        self.tiers.iter().find(|t| t.tier == tier)
    }
}

/// One cache tier.
#[derive(Debug, Clone, Serialize)]
pub struct TierReport {
    pub tier: Tier,
    pub budget: u64,
    /// `resident + loading + freeing + reserved`; never above `budget`.
    pub used: u64,
    /// Bytes of complete copies.
    pub resident: u64,
    /// Bytes reserved by loads in flight.
    pub loading: u64,
    /// Bytes of evicted copies whose memory is being returned.
    pub freeing: u64,
    /// Bytes held for engines' buffers ([`TierManager::reserve`](crate::TierManager::reserve)).
    pub reserved: u64,
    /// Requests waiting for loads in flight to leave room.
    pub waiting: u32,
    /// Loads in flight first, then copies from the most to the least
    /// recently used (the end of the list is evicted first).
    pub models: Vec<ModelReport>,
    pub counters: TierCounters,
    /// Load durations into this tier, one histogram per source tier.
    pub load_seconds: Vec<LoadHistogram>,
}

impl TierReport {
    pub fn model(&self, model: &ModelId) -> Option<&ModelReport> {
        self.models.iter().find(|m| &m.model == model)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    Loading,
    Ready,
}

/// One model's copy in a tier.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub model: ModelId,
    pub bytes: u64,
    pub state: ModelState,
    /// Where the bytes came from (disk or memory).
    pub loaded_from: Tier,
    /// Leases held on this copy; `clients` has one entry per lease.
    pub leases: u32,
    pub clients: Vec<ClientId>,
    /// Never evicted (`load --keep`); `unload` clears it.
    pub kept: bool,
    /// Transfers reading this copy and requests about to take it: the copy
    /// is not evictable while this is non-zero. Zero when the manager is idle.
    pub pins: u32,
    /// Requests waiting for this load (single-flight); 0 once ready.
    pub waiters: u32,
    /// Milliseconds since the last use (`None` while loading).
    pub idle_ms: Option<u64>,
    /// The model's requests lately, each weighing half as much every
    /// half-life ([`crate::popularity`]): idle copies of the least popular
    /// models are evicted first.
    pub popularity: f64,
}

/// Counters of one tier since the manager started. Every request that
/// consults a tier counts exactly one of `hits`, `coalesced`, `misses`, by
/// outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TierCounters {
    /// The copy was there on arrival.
    pub hits: u64,
    /// The request got a copy that another request loaded (it waited for
    /// that load: single-flight).
    pub coalesced: u64,
    /// The request loaded the copy itself, or was refused, or its load failed.
    pub misses: u64,
    /// Loads completed.
    pub loads: u64,
    pub load_failures: u64,
    pub loaded_bytes: u64,
    /// Copies evicted to make room.
    pub evictions: u64,
    pub evicted_bytes: u64,
    /// Copies removed by `unload`.
    pub unloads: u64,
}

/// Load durations into a tier from one source tier.
#[derive(Debug, Clone, Serialize)]
pub struct LoadHistogram {
    pub from: Tier,
    pub count: u64,
    pub sum_seconds: f64,
    /// Cumulative counts for the bounds of [`LOAD_SECONDS_BUCKETS`].
    pub buckets: Vec<Bucket>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Bucket {
    pub le: f64,
    pub count: u64,
}

/// Accumulates one [`LoadHistogram`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Histo {
    /// Per bucket (not cumulative); the last is `+Inf`.
    counts: [u64; LOAD_SECONDS_BUCKETS.len() + 1],
    sum: f64,
}

impl Histo {
    pub fn observe(&mut self, seconds: f64) {
        let i = LOAD_SECONDS_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(LOAD_SECONDS_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += seconds;
    }

    pub fn report(&self, from: Tier) -> LoadHistogram {
        let mut acc = 0;
        let buckets = LOAD_SECONDS_BUCKETS
            .iter()
            .zip(self.counts)
            .map(|(&le, c)| {
                acc += c;
                Bucket { le, count: acc }
            })
            .collect();
        LoadHistogram {
            from,
            count: self.counts.iter().sum(),
            sum_seconds: self.sum,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let mut h = Histo::default();
        for s in [0.0005, 0.003, 0.003, 7.0, 500.0] {
            h.observe(s);
        }
        let r = h.report(Tier::Disk);
        assert_eq!(r.count, 5);
        assert!((r.sum_seconds - 507.0065).abs() < 1e-9);
        let at = |le: f64| r.buckets.iter().find(|b| b.le == le).unwrap().count;
        assert_eq!(at(0.001), 1);
        assert_eq!(at(0.0025), 1);
        assert_eq!(at(0.005), 3);
        assert_eq!(at(5.0), 3);
        assert_eq!(at(10.0), 4);
        assert_eq!(at(120.0), 4); // 500 s only in +Inf (= count)
    }
}
