//! The [`TierManager`]: the policy of [`Ledger`] made concurrent, with the
//! memory and transfer work delegated to the daemon's [`Transfers`].

use crate::backend::{GpuBuf, MemoryBuf, TierBackend, Transfers};
use crate::disk_queue::DiskQueue;
use crate::error::{Holder, NoSpace, TierError};
use crate::ledger::{Flight, Ledger, Plan, Refusal, Slot};
use crate::popularity::{Popularity, DEFAULT_HALF_LIFE};
use crate::status::{ModelReport, ModelState, TierCounters, TierReport, TierStatus};
use crate::types::{fmt_bytes, ClientId, LeaseId, ModelId, Tier};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Index of the memory tier in `State::tiers`; GPU `n` is at `n + 1`.
const MEMORY: usize = 0;

/// How long a request waits by default for bytes in flight (loads, copies
/// used as a transfer source, frees) to become usable before it is refused.
pub const DEFAULT_SPACE_WAIT: Duration = Duration::from_secs(30);

/// Loads reading the disk at once, by default: one load keeps the disk
/// busy, so a second only shares its rate (see `disk_queue`).
pub const DEFAULT_DISK_LOADS: usize = 1;

fn tier_at(t: usize) -> Tier {
    if t == MEMORY {
        Tier::Memory
    } else {
        Tier::Gpu((t - 1) as u16)
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

/// A model image in a tier, shared by the table, leases and transfers.
pub(crate) enum Image<X: Transfers> {
    Memory(Arc<MemoryBuf<X>>),
    Gpu(Arc<GpuBuf<X>>),
}

impl<X: Transfers> Clone for Image<X> {
    fn clone(&self) -> Self {
        match self {
            Image::Memory(b) => Image::Memory(b.clone()),
            Image::Gpu(b) => Image::Gpu(b.clone()),
        }
    }
}

/// Builds a [`TierManager`]; see [`TierManager::builder`].
pub struct TierBuilder<X: Transfers> {
    transfers: X,
    memory: X::Memory,
    memory_budget: u64,
    gpus: Vec<(X::Gpu, u64)>,
    inclusive: bool,
    space_wait: Duration,
    half_life: Duration,
    disk_loads: usize,
}

impl<X: Transfers> TierBuilder<X> {
    /// Adds a GPU tier; the first call is `gpu:0`, the next `gpu:1`, ...
    /// A budget of 0 bytes disables it (requests get [`TierError::Disabled`]).
    pub fn gpu(mut self, backend: X::Gpu, budget: u64) -> Self {
        self.gpus.push((backend, budget));
        self
    }

    /// Whether a GPU load from disk also leaves a copy in the memory tier
    /// (default: yes), filled in the same pass over the disk
    /// ([`Transfers::disk_to_gpu`] with `keep`). When the memory tier has no
    /// room at once, the load fills the GPU only; either way the memory tier
    /// is used as the source when it already holds (or is loading) the model.
    pub fn inclusive(mut self, yes: bool) -> Self {
        self.inclusive = yes;
        self
    }

    /// How long a request waits for bytes in flight, or for copies other
    /// clients lease, before it is refused (default [`DEFAULT_SPACE_WAIT`]).
    /// Requests that cannot be met even once every load has finished and
    /// every other client's lease has ended are refused at once.
    pub fn space_wait(mut self, wait: Duration) -> Self {
        self.space_wait = wait;
        self
    }

    /// The half-life of a request's weight in a model's popularity, which
    /// orders evictions (default [`DEFAULT_HALF_LIFE`]; see
    /// [`crate::popularity`]).
    pub fn popularity_half_life(mut self, half_life: Duration) -> Self {
        self.half_life = half_life;
        self
    }

    /// How many loads may read the disk at once (default
    /// [`DEFAULT_DISK_LOADS`]; 0: no limit). The others wait for a turn,
    /// the smallest first, holding no room in any tier meanwhile (the
    /// crate's `disk_queue` module says why). Loads from the memory tier
    /// never wait.
    pub fn disk_loads(mut self, n: usize) -> Self {
        self.disk_loads = n;
        self
    }

    pub fn build(self) -> TierManager<X> {
        let mut tiers = vec![Ledger::new(Tier::Memory, self.memory_budget)];
        let mut gpus = Vec::with_capacity(self.gpus.len());
        for (i, (backend, budget)) in self.gpus.into_iter().enumerate() {
            tiers.push(Ledger::new(Tier::Gpu(i as u16), budget));
            gpus.push(backend);
        }
        TierManager {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    tiers,
                    leases: HashMap::new(),
                    next_lease: 1,
                    tick: 0,
                    popularity: Popularity::new(self.half_life),
                    queued: HashSet::new(),
                }),
                changed: Condvar::new(),
                transfers: self.transfers,
                memory: self.memory,
                gpus,
                inclusive: self.inclusive,
                space_wait: self.space_wait,
                disk: DiskQueue::new(self.disk_loads),
            }),
        }
    }
}

/// The tiers of one daemon. Cheap to clone (one `Arc`); every method blocks
/// the calling thread (call it from `spawn_blocking` in async code).
pub struct TierManager<X: Transfers> {
    shared: Arc<Shared<X>>,
}

impl<X: Transfers> Clone for TierManager<X> {
    fn clone(&self) -> Self {
        TierManager {
            shared: self.shared.clone(),
        }
    }
}

impl<X: Transfers> fmt::Debug for TierManager<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TierManager")
            .field("status", &self.status())
            .finish()
    }
}

struct Shared<X: Transfers> {
    state: Mutex<State<X>>,
    /// Signalled after every change of `state` that could let a waiter go
    /// on: a load ending, a lease or pin released, memory freed, an unload.
    changed: Condvar,
    transfers: X,
    memory: X::Memory,
    gpus: Vec<X::Gpu>,
    inclusive: bool,
    space_wait: Duration,
    /// Turns on the disk for loads from it.
    disk: DiskQueue,
}

struct State<X: Transfers> {
    /// Memory, then the GPUs by ordinal.
    tiers: Vec<Ledger<Image<X>>>,
    leases: HashMap<LeaseId, LeaseRecord>,
    next_lease: u64,
    /// Logical clock of uses (ties of popularity go least recent first).
    tick: u64,
    /// Requests per model, recent ones weighing more: eviction order.
    popularity: Popularity,
    /// (tier, model) of the requests waiting for a turn on the disk to
    /// load that copy: a second request for it waits for that load instead
    /// of queueing its own (single-flight before the load is published).
    queued: HashSet<(usize, ModelId)>,
}

struct LeaseRecord {
    model: ModelId,
    tier: usize,
    client: ClientId,
    /// Owned by a [`Lease`] value (released by its drop), or detached
    /// (released by [`TierManager::release`] or [`TierManager::client_gone`]).
    attached: bool,
}

/// What a successful [`obtain`](Shared::obtain) leaves on the copy.
#[derive(Debug, Clone, Copy)]
enum Hold {
    /// A lease for this client.
    Lease(ClientId),
    /// A pin, for the caller to use the copy as a transfer source.
    Pin,
    /// Nothing (prewarm); `keep` marks the copy as never evicted.
    Prewarm { keep: bool },
}

#[derive(Debug, Clone, Copy)]
struct Want {
    hold: Hold,
    /// Wait up to `space_wait` for bytes in flight, instead of being refused.
    wait_for_space: bool,
    /// Load the model when absent (else `NotResident`).
    may_load: bool,
}

struct Obtained<X: Transfers> {
    /// Present for `Hold::Lease` and `Hold::Pin`.
    image: Option<Image<X>>,
    lease: Option<LeaseId>,
    bytes: u64,
    served_from: Tier,
}

#[derive(Clone, Copy)]
enum Count {
    Hit,
    Coalesced,
    Miss,
}

impl Count {
    fn add_to(self, c: &mut TierCounters) {
        match self {
            Count::Hit => c.hits += 1,
            Count::Coalesced => c.coalesced += 1,
            Count::Miss => c.misses += 1,
        }
    }
}

enum Found {
    /// With the tier its bytes came from.
    Ready(Tier),
    Loading(Arc<Flight>, Tier),
    Absent,
}

/// A load [`Shared::load_into`] runs: the copy's bytes, the copies evicted
/// for it, where it comes from (a memory copy, else the disk), the memory
/// copy to fill on the way, and what the request holds on the result.
struct LoadJob<'s, X: Transfers> {
    bytes: u64,
    victims: &'s [ModelId],
    source: Option<&'s Image<X>>,
    keep_bytes: Option<u64>,
    hold: Hold,
}

/// Room reserved in the memory tier for a copy filled by a GPU load from
/// disk ([`State::begin_memory_copy`]).
struct MemoryCopy<X: Transfers> {
    flight: Arc<Flight>,
    bytes: u64,
    /// Copies evicted for it, to drop outside the lock.
    evicted: Vec<Image<X>>,
    /// Evicted bytes beyond `bytes`, freed once `evicted` is dropped.
    excess: u64,
}

/// The result of [`TierManager::load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    pub tier: Tier,
    pub bytes: u64,
    /// `tier` itself when the copy was already there.
    pub served_from: Tier,
}

impl<X: Transfers> TierManager<X> {
    /// A manager with a memory tier of `memory_budget` bytes (0: none) and no
    /// GPU tier yet: add them with [`TierBuilder::gpu`].
    pub fn builder(transfers: X, memory: X::Memory, memory_budget: u64) -> TierBuilder<X> {
        TierBuilder {
            transfers,
            memory,
            memory_budget,
            gpus: Vec::new(),
            inclusive: true,
            space_wait: DEFAULT_SPACE_WAIT,
            half_life: DEFAULT_HALF_LIFE,
            disk_loads: DEFAULT_DISK_LOADS,
        }
    }

    /// The cache tiers: memory, then the GPUs.
    pub fn tiers(&self) -> Vec<Tier> {
        (0..=self.shared.gpus.len()).map(tier_at).collect()
    }

    /// The daemon's transfers, as given to the builder.
    pub fn transfers(&self) -> &X {
        &self.shared.transfers
    }

    /// Makes `model` resident in `tier` and leases that copy to `client`.
    ///
    /// Served from the highest tier that holds the model: a hit in `tier`
    /// costs a lock; otherwise the model is loaded from the memory tier (GPU
    /// tiers only) or from disk, evicting the least popular copies as
    /// needed. Concurrent requests for the same copy share one load. Blocks
    /// for the load, and for at most `space_wait` when the room it needs is
    /// held by loads in flight or copies other clients lease; refuses at once
    /// when kept copies, reservations and `client`'s own leases leave too
    /// little room ([`TierError::NoSpace`] says which).
    pub fn acquire(
        &self,
        model: &ModelId,
        tier: Tier,
        client: ClientId,
    ) -> Result<Lease<X>, TierError> {
        let t = self.shared.index(tier)?;
        let o = self.shared.obtain(
            model,
            t,
            Want {
                hold: Hold::Lease(client),
                wait_for_space: true,
                may_load: true,
            },
        )?;
        Ok(Lease {
            shared: self.shared.clone(),
            id: o.lease.expect("a lease was taken"),
            model: model.clone(),
            tier,
            client,
            bytes: o.bytes,
            served_from: o.served_from,
            image: o.image,
        })
    }

    /// Prewarms: makes `model` resident in `tier` without leasing it. With
    /// `keep`, the copy is never evicted until [`TierManager::unload`] or
    /// [`TierManager::set_keep`]; without, an existing mark is left as is.
    /// A GPU load also leaves a memory copy when the manager is inclusive;
    /// `keep` applies to `tier` only.
    pub fn load(&self, model: &ModelId, tier: Tier, keep: bool) -> Result<Loaded, TierError> {
        let t = self.shared.index(tier)?;
        let o = self.shared.obtain(
            model,
            t,
            Want {
                hold: Hold::Prewarm { keep },
                wait_for_space: true,
                may_load: true,
            },
        )?;
        Ok(Loaded {
            tier,
            bytes: o.bytes,
            served_from: o.served_from,
        })
    }

    /// Reserves `bytes` of `tier`'s budget for memory that is not a copy:
    /// the buffers (KV cache, activations) of an engine serving `owner` for
    /// `client`, allocated by the caller beside the tier's copies. A
    /// reservation is never evicted; making room for it evicts copies, waits
    /// for loads in flight and other clients' leases, and is refused, as
    /// [`TierManager::acquire`] for `client` would ([`TierError::NoSpace`]
    /// names `owner`). Dropping the [`Reservation`] gives the bytes back.
    pub fn reserve(
        &self,
        tier: Tier,
        bytes: u64,
        owner: &ModelId,
        client: ClientId,
    ) -> Result<Reservation<X>, TierError> {
        let sh = &*self.shared;
        let t = sh.index(tier)?;
        // Waits and refusals as for a copy `client` asks for.
        let want = Want {
            hold: Hold::Lease(client),
            wait_for_space: true,
            may_load: true,
        };
        let mut st = sh.lock();
        let mut waiting_since: Option<Instant> = None;
        let (evicted, excess) = loop {
            match st.plan_room(owner, t, bytes, &want, waiting_since)? {
                Plan::Fits => break st.tiers[t].reserve(bytes, &[]),
                Plan::Evict(victims) => {
                    debug!(%owner, %tier, ?victims, "evicted to make room for an engine");
                    break st.tiers[t].reserve(bytes, &victims);
                }
                Plan::Wait => {
                    let (guard, more) = sh.wait_for_room(st, t, &mut waiting_since);
                    st = guard;
                    if !more {
                        let waited = waiting_since.map(|s| s.elapsed());
                        return Err(st.refusal(owner, t, bytes, Refusal::Full, waited));
                    }
                }
                Plan::Refuse(_) => unreachable!("plan_room refuses with an error"),
            }
        };
        drop(st);
        sh.drop_evicted(t, evicted, excess);
        Ok(Reservation {
            shared: self.shared.clone(),
            t,
            bytes,
        })
    }

    /// Sets or clears the keep mark of a resident copy.
    pub fn set_keep(&self, model: &ModelId, tier: Tier, keep: bool) -> Result<(), TierError> {
        let t = self.shared.index(tier)?;
        let mut st = self.shared.lock();
        let r = st.tiers[t]
            .ready_mut(model)
            .ok_or_else(|| TierError::NotResident {
                model: model.clone(),
                tier,
            })?;
        r.kept = keep;
        drop(st);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Removes the copies of `model` from `tier`, or from every cache tier
    /// when `None`, and returns the bytes freed per tier (tiers without a copy
    /// are left out). Clears keep marks. All or nothing: when a targeted
    /// copy is leased, nothing is removed ([`TierError::Busy`]). Waits for a
    /// load of the model in flight to end, and for transfers reading the copy.
    pub fn unload(
        &self,
        model: &ModelId,
        tier: Option<Tier>,
    ) -> Result<Vec<(Tier, u64)>, TierError> {
        let sh = &*self.shared;
        let targets: Vec<usize> = match tier {
            Some(tier) => vec![sh.index(tier)?],
            None => (0..=sh.gpus.len()).rev().collect(),
        };
        let mut st = sh.lock();
        loop {
            let mut transient = false;
            for &t in &targets {
                match st.tiers[t].get(model).map(|e| &e.slot) {
                    Some(Slot::Ready(r)) if r.leases > 0 => {
                        return Err(TierError::Busy {
                            model: model.clone(),
                            tier: tier_at(t),
                            holders: st.clients_of(model, t),
                        })
                    }
                    Some(Slot::Ready(r)) => transient |= r.pins > 0,
                    Some(Slot::Loading(_)) => transient = true,
                    None => {}
                }
            }
            if !transient {
                break;
            }
            st = sh.wait(st);
        }
        let mut removed = Vec::new();
        for &t in &targets {
            if st.tiers[t].ready(model).is_some() {
                let (image, bytes) = st.tiers[t].remove(model);
                st.tiers[t].counters.unloads += 1;
                removed.push((t, image, bytes));
            }
        }
        drop(st);
        let freed = removed.iter().map(|(t, _, b)| (tier_at(*t), *b)).collect();
        info!(%model, ?freed, "unloaded");
        sh.free_outside_lock(removed);
        Ok(freed)
    }

    /// Releases a detached lease (see [`Lease::detach`]).
    pub fn release(&self, lease: LeaseId) -> Result<(), TierError> {
        let mut st = self.shared.lock();
        match st.leases.get(&lease) {
            None => return Err(TierError::UnknownLease(lease)),
            Some(r) if r.attached => return Err(TierError::LeaseAttached(lease)),
            Some(_) => st.end_lease(lease),
        }
        drop(st);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// The client's connection closed: releases its detached leases and
    /// returns how many. Leases still owned by [`Lease`] values are released
    /// when those are dropped (the RPC layer drops a connection's values with
    /// the connection).
    pub fn client_gone(&self, client: ClientId) -> usize {
        let mut st = self.shared.lock();
        let ids: Vec<LeaseId> = st
            .leases
            .iter()
            .filter(|(_, r)| r.client == client && !r.attached)
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            st.end_lease(*id);
        }
        drop(st);
        if !ids.is_empty() {
            info!(%client, leases = ids.len(), "client gone: leases released");
            self.shared.changed.notify_all();
        }
        ids.len()
    }

    /// The tiers holding a complete copy of `model`, highest first.
    pub fn locate(&self, model: &ModelId) -> Vec<Tier> {
        let st = self.shared.lock();
        let mut v: Vec<Tier> = st
            .tiers
            .iter()
            .filter(|l| l.ready(model).is_some())
            .map(|l| l.tier)
            .collect();
        v.reverse();
        v
    }

    /// A snapshot of every tier: budgets, use, copies, counters, load times.
    pub fn status(&self) -> TierStatus {
        let st = self.shared.lock();
        let now = Instant::now();
        let mut clients: HashMap<(usize, &ModelId), Vec<ClientId>> = HashMap::new();
        for r in st.leases.values() {
            clients
                .entry((r.tier, &r.model))
                .or_default()
                .push(r.client);
        }
        let tiers = st
            .tiers
            .iter()
            .enumerate()
            .map(|(t, l)| {
                let mut models: Vec<(u64, ModelReport)> = l
                    .entries()
                    .map(|(m, e)| match &e.slot {
                        Slot::Loading(x) => (
                            u64::MAX,
                            ModelReport {
                                model: m.clone(),
                                bytes: e.bytes,
                                state: ModelState::Loading,
                                loaded_from: x.from,
                                leases: 0,
                                clients: Vec::new(),
                                kept: false,
                                pins: 0,
                                waiters: x.waiters,
                                idle_ms: None,
                                popularity: st.popularity.score(m, now),
                            },
                        ),
                        Slot::Ready(r) => {
                            let mut c = clients.get(&(t, m)).cloned().unwrap_or_default();
                            c.sort();
                            (
                                r.last_use,
                                ModelReport {
                                    model: m.clone(),
                                    bytes: e.bytes,
                                    state: ModelState::Ready,
                                    loaded_from: r.from,
                                    leases: r.leases,
                                    clients: c,
                                    kept: r.kept,
                                    pins: r.pins,
                                    waiters: 0,
                                    idle_ms: Some(now.duration_since(r.used_at).as_millis() as u64),
                                    popularity: st.popularity.score(m, now),
                                },
                            )
                        }
                    })
                    .collect();
                models.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.model.cmp(&b.1.model)));
                let mut load_seconds = vec![l.load_times[0].report(Tier::Disk)];
                if t != MEMORY {
                    load_seconds.push(l.load_times[1].report(Tier::Memory));
                }
                TierReport {
                    tier: l.tier,
                    budget: l.budget,
                    used: l.used(),
                    resident: l.resident(),
                    loading: l.loading(),
                    freeing: l.freeing(),
                    reserved: l.reserved(),
                    waiting: l.waiting,
                    models: models.into_iter().map(|(_, m)| m).collect(),
                    counters: l.counters,
                    load_seconds,
                }
            })
            .collect();
        let leases = st.leases.len();
        drop(st);
        // The disk queue's own lock, never taken with the state's.
        let (disk_reading, disk_waiting) = self.shared.disk.load();
        TierStatus {
            tiers,
            leases,
            disk_loads_limit: self.shared.disk.limit(),
            disk_reading,
            disk_waiting,
        }
    }

    /// Checks the invariants (budget accounting of every tier; every lease
    /// on a resident copy, lease counts matching the lease table). For tests
    /// and debug assertions of the daemon; takes the lock.
    pub fn check_invariants(&self) -> Result<(), String> {
        let st = self.shared.lock();
        for l in &st.tiers {
            l.check()?;
        }
        let mut counts: HashMap<(usize, &ModelId), u32> = HashMap::new();
        for (id, r) in &st.leases {
            if st.tiers[r.tier].ready(&r.model).is_none() {
                return Err(format!(
                    "{id} of {} holds {} in the {} tier, which has no copy of it",
                    r.client,
                    r.model,
                    tier_at(r.tier)
                ));
            }
            *counts.entry((r.tier, &r.model)).or_default() += 1;
        }
        for (t, l) in st.tiers.iter().enumerate() {
            for (m, e) in l.entries() {
                if let Slot::Ready(r) = &e.slot {
                    let n = counts.get(&(t, m)).copied().unwrap_or(0);
                    if r.leases != n {
                        return Err(format!(
                            "{m} in the {} tier counts {} leases, the lease table {n}",
                            l.tier, r.leases
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl<X: Transfers> State<X> {
    /// Whether `bytes` would fit in tier `t` once every lease of a client
    /// other than the requester (`hold`'s) ended: what stays is kept copies,
    /// reservations and copies the requester leases itself (waiting for
    /// those could only end in a refusal).
    fn fits_once_others_release(&self, t: usize, bytes: u64, hold: Hold) -> bool {
        let me = match hold {
            Hold::Lease(c) => Some(c),
            Hold::Pin | Hold::Prewarm { .. } => None,
        };
        let ledger = &self.tiers[t];
        let mine: std::collections::HashSet<&ModelId> = self
            .leases
            .values()
            .filter(|r| r.tier == t && Some(r.client) == me)
            .map(|r| &r.model)
            .collect();
        let stays: u64 = ledger
            .entries()
            .filter_map(|(m, e)| match &e.slot {
                Slot::Ready(r) if r.kept || mine.contains(m) => Some(e.bytes),
                _ => None,
            })
            .sum::<u64>()
            + ledger.reserved();
        bytes <= ledger.budget.saturating_sub(stays)
    }

    /// Reserves room in the memory tier for a copy of `model` that a GPU
    /// load from disk fills on its way (`bytes`: its memory image), evicting
    /// as a memory load would, but only copies of less popular models: no
    /// client asked for this copy, and a model requested once must not push
    /// out one requested often. `None` when the memory tier has no room at
    /// once, or only by evicting a model at least as popular, or another
    /// request is already making the copy.
    fn begin_memory_copy(&mut self, model: &ModelId, bytes: u64) -> Option<MemoryCopy<X>> {
        let now = Instant::now();
        let popularity = &self.popularity;
        let score = |m: &ModelId| popularity.score(m, now);
        let ledger = &mut self.tiers[MEMORY];
        if ledger.get(model).is_some() {
            return None;
        }
        let victims = match ledger.plan(bytes, &score) {
            Plan::Fits => Vec::new(),
            Plan::Evict(v) => {
                let mine = score(model);
                if let Some(v) = v.iter().find(|v| score(v) >= mine) {
                    debug!(%model, more_popular = %v, "the memory tier keeps more popular models: the GPU load keeps no memory copy");
                    return None;
                }
                v
            }
            Plan::Wait | Plan::Refuse(_) => {
                debug!(%model, "no room in the memory tier now: the GPU load keeps no memory copy");
                return None;
            }
        };
        let flight = Arc::new(Flight::default());
        let (evicted, excess) =
            ledger.begin_load(model, bytes, &victims, flight.clone(), Tier::Disk);
        Some(MemoryCopy {
            flight,
            bytes,
            evicted,
            excess,
        })
    }

    /// Ends the memory copy made on the way of a GPU load: ready when the
    /// load succeeded, gone otherwise; requests waiting for it go on.
    fn end_memory_copy(
        &mut self,
        model: &ModelId,
        flight: Arc<Flight>,
        buf: MemoryBuf<X>,
        outcome: Result<(), &TierError>,
        seconds: f64,
    ) {
        match outcome {
            Ok(()) => {
                self.tick += 1;
                let tick = self.tick;
                let ledger = &mut self.tiers[MEMORY];
                let bytes = ledger.get(model).map_or(0, |e| e.bytes);
                ledger.finish_ok(model, Image::Memory(Arc::new(buf)), tick, Instant::now());
                ledger.load_times[0].observe(seconds);
                let _ = flight.outcome.set(Ok(()));
                info!(%model, tier = %Tier::Memory, from = %Tier::Disk, bytes = %fmt_bytes(bytes), seconds, "loaded on the way to a GPU");
            }
            Err(e) => {
                self.tiers[MEMORY].finish_err(model);
                let _ = flight.outcome.set(Err(e.clone()));
            }
        }
    }

    /// A use of `model` in tier `t`; also refreshes the memory copy behind a
    /// GPU copy, so that an inclusive memory tier does not see the hottest
    /// models as the coldest.
    fn touch(&mut self, model: &ModelId, t: usize) {
        self.tick += 1;
        let now = Instant::now();
        self.tiers[t].touch(model, self.tick, now);
        if t != MEMORY {
            self.tiers[MEMORY].touch(model, self.tick, now);
        }
    }

    /// Applies `hold` to the ready copy of `model` in tier `t`.
    fn hold(
        &mut self,
        model: &ModelId,
        t: usize,
        hold: Hold,
    ) -> (Option<Image<X>>, Option<LeaseId>, u64) {
        let ledger = &mut self.tiers[t];
        let bytes = ledger.get(model).expect("held copy exists").bytes;
        let r = ledger.ready_mut(model).expect("held copy is ready");
        match hold {
            Hold::Lease(client) => {
                r.leases += 1;
                let image = r.image.clone();
                let id = LeaseId(self.next_lease);
                self.next_lease += 1;
                self.leases.insert(
                    id,
                    LeaseRecord {
                        model: model.clone(),
                        tier: t,
                        client,
                        attached: true,
                    },
                );
                (Some(image), Some(id), bytes)
            }
            Hold::Pin => {
                r.pins += 1;
                (Some(r.image.clone()), None, bytes)
            }
            Hold::Prewarm { keep } => {
                r.kept |= keep;
                (None, None, bytes)
            }
        }
    }

    /// Ends a pin. The caller's clone of the image goes first, so that the
    /// table holds the only reference once the copy is evictable again.
    fn unpin(&mut self, model: &ModelId, t: usize, image: Option<Image<X>>) {
        drop(image);
        let r = self.tiers[t].ready_mut(model).expect("a pinned copy stays");
        r.pins -= 1;
    }

    fn end_lease(&mut self, id: LeaseId) {
        let rec = self.leases.remove(&id).expect("lease exists");
        let r = self.tiers[rec.tier]
            .ready_mut(&rec.model)
            .expect("a leased copy stays");
        r.leases -= 1;
    }

    fn clients_of(&self, model: &ModelId, t: usize) -> Vec<ClientId> {
        let mut v: Vec<ClientId> = self
            .leases
            .values()
            .filter(|r| r.tier == t && &r.model == model)
            .map(|r| r.client)
            .collect();
        v.sort();
        v
    }

    /// How room for `bytes` of `model` in tier `t` can be made, or the
    /// refusal. Copies leased by other clients are given back within a
    /// request's time: a request that may wait for space (a serving daemon)
    /// queues behind them, up to `space_wait`, rather than being refused.
    fn plan_room(
        &self,
        model: &ModelId,
        t: usize,
        bytes: u64,
        want: &Want,
        waiting_since: Option<Instant>,
    ) -> Result<Plan, TierError> {
        let now = Instant::now();
        match self.tiers[t].plan(bytes, &|m| self.popularity.score(m, now)) {
            Plan::Refuse(Refusal::Full)
                if want.wait_for_space && self.fits_once_others_release(t, bytes, want.hold) =>
            {
                Ok(Plan::Wait)
            }
            Plan::Refuse(why) => {
                Err(self.refusal(model, t, bytes, why, waiting_since.map(|s| s.elapsed())))
            }
            plan => Ok(plan),
        }
    }

    /// The error for a request of `bytes` in tier `t` that cannot be met.
    fn refusal(
        &self,
        model: &ModelId,
        t: usize,
        bytes: u64,
        why: Refusal,
        waited: Option<Duration>,
    ) -> TierError {
        let l = &self.tiers[t];
        let tier = l.tier;
        match why {
            Refusal::Disabled => TierError::Disabled {
                model: model.clone(),
                tier,
            },
            Refusal::TooLarge => TierError::TooLarge {
                model: model.clone(),
                tier,
                needed: bytes,
                budget: l.budget,
            },
            Refusal::Full => {
                let b = l.breakdown();
                let mut held: Vec<Holder> = l
                    .entries()
                    .filter_map(|(m, e)| match &e.slot {
                        Slot::Ready(r) if r.held() => Some(Holder {
                            model: m.clone(),
                            bytes: e.bytes,
                            kept: r.kept,
                            clients: self.clients_of(m, t),
                        }),
                        _ => None,
                    })
                    .collect();
                held.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.model.cmp(&b.model)));
                TierError::NoSpace(Box::new(NoSpace {
                    model: model.clone(),
                    tier,
                    needed: bytes,
                    budget: l.budget,
                    free: b.free,
                    evictable: b.evictable,
                    in_flight: b.in_flight,
                    held,
                    reserved: l.reserved(),
                    waited_ms: waited.map(|d| d.as_millis() as u64),
                }))
            }
        }
    }
}

impl<X: Transfers> Shared<X> {
    /// Waits, under `space_wait` counted from the first wait (`since`), for
    /// a change that may leave room in tier `t`. Returns the lock again,
    /// and whether there is time left to look once more.
    fn wait_for_room<'a>(
        &'a self,
        mut st: MutexGuard<'a, State<X>>,
        t: usize,
        since: &mut Option<Instant>,
    ) -> (MutexGuard<'a, State<X>>, bool) {
        let first = *since.get_or_insert_with(Instant::now);
        let left = self.space_wait.saturating_sub(first.elapsed());
        if left.is_zero() {
            return (st, false);
        }
        st.tiers[t].waiting += 1;
        st = self.wait_timeout(st, left);
        st.tiers[t].waiting -= 1;
        (st, true)
    }

    fn lock(&self) -> MutexGuard<'_, State<X>> {
        // No code outside this crate runs under the lock, and the state is
        // consistent between statements, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State<X>>) -> MutexGuard<'a, State<X>> {
        self.changed.wait(g).unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_timeout<'a>(
        &self,
        g: MutexGuard<'a, State<X>>,
        d: Duration,
    ) -> MutexGuard<'a, State<X>> {
        self.changed
            .wait_timeout(g, d)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    fn index(&self, tier: Tier) -> Result<usize, TierError> {
        match tier {
            Tier::Memory => Ok(MEMORY),
            Tier::Gpu(n) if (n as usize) < self.gpus.len() => Ok(n as usize + 1),
            _ => Err(TierError::NoSuchTier {
                tier,
                available: (0..=self.gpus.len())
                    .map(|t| tier_at(t).to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Drops removed copies (no lock held: a free may be slow), then returns
    /// their bytes from `freeing` to the free budget.
    fn free_outside_lock(&self, removed: Vec<(usize, Image<X>, u64)>) {
        if removed.is_empty() {
            return;
        }
        let sizes: Vec<(usize, u64)> = removed.into_iter().map(|(t, _image, b)| (t, b)).collect();
        let mut st = self.lock();
        for (t, b) in sizes {
            st.tiers[t].freed(b);
        }
        drop(st);
        self.changed.notify_all();
    }

    /// The heart of the manager: makes `model` ready in tier `t` and applies
    /// `want.hold` to it, under the lock, in the same critical section that
    /// finds or completes the copy (so nothing can evict it in between).
    ///
    /// Lock discipline: the lock is released around every call into the
    /// daemon (`image_bytes`, allocations, transfers), around drops of
    /// buffers, and while waiting on `changed`; after each such gap the state
    /// is looked at afresh (`continue`).
    fn obtain(&self, model: &ModelId, t: usize, want: Want) -> Result<Obtained<X>, TierError> {
        let tier = tier_at(t);
        let mut size: Option<u64> = None;
        // A pin on the memory copy, when a GPU load will copy from it.
        let mut source: Option<Obtained<X>> = None;
        let mut tried_memory = false;
        // This request's turn on the disk, once it has one (dropped at the
        // end, after the lock).
        let mut turn = None;
        // What the request counts in this tier, by outcome: it loaded (or
        // was refused), found the copy on its first look, or got a copy
        // another request loaded.
        let mut count = Count::Miss;
        // The model's size in the memory tier, when a load from disk should
        // leave a copy there on its way to this GPU tier.
        let mut keep_bytes: Option<u64> = None;
        let mut first_look = true;
        let mut waiting_since: Option<Instant> = None;
        let mut st = self.lock();
        if !matches!(want.hold, Hold::Pin) {
            // A client's request (a pin is the manager's own use of a copy).
            st.popularity.request(model, Instant::now());
        }
        if st.tiers[t].budget == 0 {
            return Err(st.refusal(model, t, 0, Refusal::Disabled, None));
        }
        let result = loop {
            let (guard, existing) =
                self.join_existing(st, model, t, want.hold, first_look, &mut source);
            st = guard;
            if let Some((result, c)) = existing {
                count = c;
                break result;
            }
            first_look = false;
            if !want.may_load {
                break Err(TierError::NotResident {
                    model: model.clone(),
                    tier,
                });
            }
            let Some(bytes) = size else {
                drop(st);
                let r = self.image_bytes(model, tier);
                st = self.lock();
                match r {
                    Ok(b) => {
                        size = Some(b);
                        continue;
                    }
                    Err(e) => break Err(e),
                }
            };
            let plan = match st.plan_room(model, t, bytes, &want, waiting_since) {
                Ok(plan) => plan,
                Err(e) => break Err(e),
            };
            if t != MEMORY && !tried_memory {
                tried_memory = true;
                if st.tiers[MEMORY].budget > 0 {
                    drop(st);
                    let r = self.memory_source(model);
                    st = self.lock();
                    match r {
                        Ok((src, keep)) => (source, keep_bytes) = (src, keep),
                        Err(e) => break Err(e),
                    }
                    continue;
                }
            }
            // A load from disk takes its turn on the disk once its room can
            // be had, and before reserving it: while it waits for the turn,
            // its room (and the copies it would evict) stay with others.
            // It never holds a turn while waiting for room.
            if source.is_none() {
                match plan {
                    Plan::Fits | Plan::Evict(_) if turn.is_none() => {
                        let key = (t, model.clone());
                        if st.queued.contains(&key) {
                            // Another request waits for its turn to load this
                            // copy: that load will be ours too.
                            st = self.wait(st);
                            continue;
                        }
                        st.queued.insert(key.clone());
                        drop(st);
                        turn = Some(self.disk.enter(bytes));
                        st = self.lock();
                        // The load is published (or the turn given back)
                        // before the lock is released again.
                        st.queued.remove(&key);
                        self.changed.notify_all();
                        continue;
                    }
                    Plan::Wait if turn.is_some() => {
                        drop(st);
                        turn = None;
                        st = self.lock();
                        continue;
                    }
                    _ => {}
                }
            }
            let victims = match plan {
                Plan::Fits => Vec::new(),
                Plan::Evict(v) => v,
                Plan::Wait if want.wait_for_space => {
                    let (guard, more) = self.wait_for_room(st, t, &mut waiting_since);
                    st = guard;
                    if more {
                        continue;
                    }
                    let waited = waiting_since.map(|s| s.elapsed());
                    break Err(st.refusal(model, t, bytes, Refusal::Full, waited));
                }
                Plan::Wait => {
                    break Err(st.refusal(model, t, bytes, Refusal::Full, None));
                }
                Plan::Refuse(_) => unreachable!("handled above"),
            };
            let job = LoadJob {
                bytes,
                victims: &victims,
                source: source.as_ref().and_then(|s| s.image.as_ref()),
                keep_bytes: keep_bytes.filter(|_| source.is_none()),
                hold: want.hold,
            };
            let (guard, loaded) = self.load_into(st, model, t, job);
            st = guard;
            break loaded;
        };
        count.add_to(&mut st.tiers[t].counters);
        if let Some(src) = source {
            st.unpin(model, MEMORY, src.image);
            self.changed.notify_all();
        }
        drop(st);
        result
    }

    /// Takes what tier `t` already has of `model`: a ready copy, held as
    /// `hold`, or a load in flight, waited for (dropping `source`, the pin
    /// on a memory copy this request no longer needs) and then held.
    /// Returns the lock, and the request's result with how it counts, or
    /// `None` when the tier has neither.
    #[allow(clippy::type_complexity)]
    fn join_existing<'a>(
        &'a self,
        mut st: MutexGuard<'a, State<X>>,
        model: &ModelId,
        t: usize,
        hold: Hold,
        first_look: bool,
        source: &mut Option<Obtained<X>>,
    ) -> (
        MutexGuard<'a, State<X>>,
        Option<(Result<Obtained<X>, TierError>, Count)>,
    ) {
        let found = match st.tiers[t].get(model).map(|e| &e.slot) {
            Some(Slot::Ready(r)) => Found::Ready(r.from),
            Some(Slot::Loading(l)) => Found::Loading(l.flight.clone(), l.from),
            None => Found::Absent,
        };
        let outcome = match found {
            Found::Absent => None,
            Found::Ready(from) => {
                // Found on arrival: a hit. Found after a gap (sizing,
                // filling memory, waiting for room): another request
                // loaded it meanwhile, as if we had waited for its load.
                let (count, served_from) = if first_look {
                    (Count::Hit, tier_at(t))
                } else {
                    (Count::Coalesced, from)
                };
                st.touch(model, t);
                let (image, lease, bytes) = st.hold(model, t, hold);
                Some((
                    Ok(Obtained {
                        image,
                        lease,
                        bytes,
                        served_from,
                    }),
                    count,
                ))
            }
            Found::Loading(flight, from) => {
                if let Some(src) = source.take() {
                    // Someone else is loading this copy: our source is not needed.
                    st.unpin(model, MEMORY, src.image);
                    self.changed.notify_all();
                }
                st.tiers[t].loading_mut(model).expect("loading").waiters += 1;
                while flight.outcome.get().is_none() {
                    st = self.wait(st);
                }
                let result = match flight.outcome.get().expect("outcome set") {
                    Ok(()) => {
                        // The loader left a pin for us: the copy is there.
                        st.tiers[t].ready_mut(model).expect("pinned for us").pins -= 1;
                        st.touch(model, t);
                        let (image, lease, bytes) = st.hold(model, t, hold);
                        Ok(Obtained {
                            image,
                            lease,
                            bytes,
                            served_from: from,
                        })
                    }
                    Err(e) => Err(e.clone()),
                };
                Some((result, Count::Coalesced))
            }
        };
        (st, outcome)
    }

    /// For a GPU load of `model`: the memory tier's copy as its source (a
    /// copy there, or a load of it in flight to join; pinned), and when
    /// there is none and the manager is inclusive, the size of the memory
    /// copy the load from disk fills on its way. The memory copy is not
    /// loaded first: the GPU would wait for the whole of it. Called
    /// without the lock.
    fn memory_source(
        &self,
        model: &ModelId,
    ) -> Result<(Option<Obtained<X>>, Option<u64>), TierError> {
        let found = self.obtain(
            model,
            MEMORY,
            Want {
                hold: Hold::Pin,
                wait_for_space: false,
                may_load: false,
            },
        );
        match found {
            Ok(o) => Ok((Some(o), None)),
            Err(TierError::NotResident { .. }) if self.inclusive => {
                Ok((None, Some(self.image_bytes(model, Tier::Memory)?)))
            }
            Err(TierError::NotResident { .. }) => Ok((None, None)),
            Err(e) => Err(e),
        }
    }

    /// Loads `model` into tier `t` once its room is planned: under the lock
    /// `st`, reserves `bytes`, evicts `victims` and publishes the load for
    /// other requests to wait on (and, with `keep_bytes`, a memory copy the
    /// same pass fills); without it, runs the transfer from `source`, else
    /// from disk; then, locked again, publishes the outcome and takes
    /// `hold` on the new copy. Returns the lock with the result.
    fn load_into<'a>(
        &'a self,
        mut st: MutexGuard<'a, State<X>>,
        model: &ModelId,
        t: usize,
        job: LoadJob<'_, X>,
    ) -> (MutexGuard<'a, State<X>>, Result<Obtained<X>, TierError>) {
        let LoadJob {
            bytes,
            victims,
            source,
            keep_bytes,
            hold,
        } = job;
        let tier = tier_at(t);
        let from = if source.is_some() {
            Tier::Memory
        } else {
            Tier::Disk
        };
        let flight = Arc::new(Flight::default());
        let (evicted, excess) = st.tiers[t].begin_load(model, bytes, victims, flight.clone(), from);
        let keep = keep_bytes.and_then(|b| st.begin_memory_copy(model, b));
        drop(st);
        if !victims.is_empty() {
            debug!(%model, %tier, ?victims, "evicted to make room");
        }
        // Before allocating: the memory must be back first.
        self.drop_evicted(t, evicted, excess);
        let mut keep = keep.and_then(|k| self.alloc_memory_copy(model, k));
        let started = Instant::now();
        let r = self.run_load(model, t, bytes, source, keep.as_mut().map(|(_, buf)| buf));
        let seconds = started.elapsed().as_secs_f64();
        let mut st = self.lock();
        if let Some((flight, buf)) = keep {
            st.end_memory_copy(model, flight, buf, r.as_ref().map(|_| ()), seconds);
            self.changed.notify_all();
        }
        let result = match r {
            Ok(image) => {
                st.tick += 1;
                let tick = st.tick;
                let ledger = &mut st.tiers[t];
                ledger.finish_ok(model, image, tick, Instant::now());
                ledger.load_times[usize::from(from == Tier::Memory)].observe(seconds);
                let _ = flight.outcome.set(Ok(()));
                let (image, lease, bytes) = st.hold(model, t, hold);
                info!(%model, %tier, %from, bytes = %fmt_bytes(bytes), seconds, "loaded");
                Ok(Obtained {
                    image,
                    lease,
                    bytes,
                    served_from: from,
                })
            }
            Err(e) => {
                st.tiers[t].finish_err(model);
                let _ = flight.outcome.set(Err(e.clone()));
                warn!(%model, %tier, %from, error = %e, "load failed");
                Err(e)
            }
        };
        self.changed.notify_all();
        (st, result)
    }

    /// Drops the copies a reservation of tier `t` evicted (no lock held: a
    /// free may be slow), then gives `excess`, the evicted bytes beyond the
    /// reservation, back to the tier's free budget.
    fn drop_evicted(&self, t: usize, evicted: Vec<Image<X>>, excess: u64) {
        drop(evicted);
        if excess > 0 {
            self.lock().tiers[t].freed(excess);
        }
        self.changed.notify_all();
    }

    /// The size of `model`'s image in `tier`, a panic of the backend caught.
    fn image_bytes(&self, model: &ModelId, tier: Tier) -> Result<u64, TierError> {
        panic::catch_unwind(AssertUnwindSafe(|| self.transfers.image_bytes(model, tier)))
            .unwrap_or_else(|p| {
                Err(TierError::model(
                    model,
                    format!("sizing panicked: {}", panic_message(&*p)),
                ))
            })
    }

    /// Allocates the memory copy reserved by
    /// [`State::begin_memory_copy`]; when that fails, the reservation ends
    /// (requests waiting on it get the error) and the GPU load goes on
    /// alone.
    fn alloc_memory_copy(
        &self,
        model: &ModelId,
        reserved: MemoryCopy<X>,
    ) -> Option<(Arc<Flight>, MemoryBuf<X>)> {
        let MemoryCopy {
            flight,
            bytes,
            evicted,
            excess,
        } = reserved;
        self.drop_evicted(MEMORY, evicted, excess);
        match self.alloc_evicting(MEMORY, bytes, |b| self.memory.alloc(b)) {
            Ok(buf) => Some((flight, buf)),
            Err(e) => {
                warn!(%model, error = %e, "no memory copy on the way to the GPU");
                let mut st = self.lock();
                st.tiers[MEMORY].finish_err(model);
                let _ = flight.outcome.set(Err(e));
                drop(st);
                self.changed.notify_all();
                None
            }
        }
    }

    /// Allocates and fills a copy of `model` in tier `t` (and `keep`, a
    /// memory copy filled on the way, for a GPU load from disk). No lock held.
    fn run_load(
        &self,
        model: &ModelId,
        t: usize,
        bytes: u64,
        source: Option<&Image<X>>,
        keep: Option<&mut MemoryBuf<X>>,
    ) -> Result<Image<X>, TierError> {
        let from = if source.is_some() {
            Tier::Memory
        } else {
            Tier::Disk
        };
        let work = || -> Result<Image<X>, TierError> {
            if t == MEMORY {
                let mut buf = self.alloc_evicting(t, bytes, |b| self.memory.alloc(b))?;
                self.transfers.disk_to_memory(model, &mut buf)?;
                Ok(Image::Memory(Arc::new(buf)))
            } else {
                let g = (t - 1) as u16;
                let mut buf = self.alloc_evicting(t, bytes, |b| self.gpus[t - 1].alloc(b))?;
                match source {
                    Some(Image::Memory(src)) => {
                        self.transfers.memory_to_gpu(model, src, g, &mut buf)?
                    }
                    _ => self.transfers.disk_to_gpu(model, g, &mut buf, keep)?,
                }
                Ok(Image::Gpu(Arc::new(buf)))
            }
        };
        let cause = match panic::catch_unwind(AssertUnwindSafe(work)) {
            Ok(Ok(image)) => return Ok(image),
            Ok(Err(e)) => e,
            Err(payload) => TierError::Backend(format!("panicked: {}", panic_message(&*payload))),
        };
        Err(TierError::Load {
            model: model.clone(),
            from,
            to: tier_at(t),
            cause: Box::new(cause),
        })
    }

    /// `alloc`, evicting the first evictable copy of the tier in eviction
    /// order and trying again each time the backend reports `OutOfMemory`.
    fn alloc_evicting<B>(
        &self,
        t: usize,
        bytes: u64,
        alloc: impl Fn(u64) -> Result<B, TierError>,
    ) -> Result<B, TierError> {
        loop {
            match alloc(bytes) {
                Err(TierError::OutOfMemory(msg)) => {
                    let mut guard = self.lock();
                    let st = &mut *guard;
                    let now = Instant::now();
                    let Some(victim) = st.tiers[t].victim(&|m| st.popularity.score(m, now)) else {
                        return Err(TierError::OutOfMemory(msg));
                    };
                    let (image, b) = st.tiers[t].remove(&victim);
                    st.tiers[t].counters.evictions += 1;
                    st.tiers[t].counters.evicted_bytes += b;
                    drop(guard);
                    warn!(tier = %tier_at(t), %victim, reason = %msg, "allocation failed within the budget: evicted one more copy");
                    self.free_outside_lock(vec![(t, image, b)]);
                }
                r => return r,
            }
        }
    }
}

/// Bytes of a tier's budget held by [`TierManager::reserve`] until dropped.
pub struct Reservation<X: Transfers> {
    shared: Arc<Shared<X>>,
    t: usize,
    bytes: u64,
}

impl<X: Transfers> Reservation<X> {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn tier(&self) -> Tier {
        tier_at(self.t)
    }
}

impl<X: Transfers> Drop for Reservation<X> {
    fn drop(&mut self) {
        self.shared.lock().tiers[self.t].unreserve(self.bytes);
        self.shared.changed.notify_all();
    }
}

impl<X: Transfers> fmt::Debug for Reservation<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("tier", &self.tier())
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// A client's hold on a model's copy in one tier: while it lives, the copy
/// is not evicted nor unloaded. Dropping it releases it.
///
/// A lease is owned either by this value (attached) or, after
/// [`Lease::detach`], by the manager's table, where
/// [`TierManager::release`] (by id) or [`TierManager::client_gone`] end it.
pub struct Lease<X: Transfers> {
    shared: Arc<Shared<X>>,
    id: LeaseId,
    model: ModelId,
    tier: Tier,
    client: ClientId,
    bytes: u64,
    served_from: Tier,
    /// `None` once detached.
    image: Option<Image<X>>,
}

impl<X: Transfers> Lease<X> {
    pub fn id(&self) -> LeaseId {
        self.id
    }
    pub fn model(&self) -> &ModelId {
        &self.model
    }
    pub fn tier(&self) -> Tier {
        self.tier
    }
    pub fn client(&self) -> ClientId {
        self.client
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    /// Where the bytes came from for this request: the lease's own tier for
    /// a hit, else the tier the load read (memory or disk).
    pub fn served_from(&self) -> Tier {
        self.served_from
    }

    /// The copy, when this is a memory-tier lease.
    pub fn memory(&self) -> Option<&MemoryBuf<X>> {
        match &self.image {
            Some(Image::Memory(b)) => Some(b),
            _ => None,
        }
    }

    /// The copy, when this is a GPU-tier lease.
    pub fn gpu(&self) -> Option<&GpuBuf<X>> {
        match &self.image {
            Some(Image::Gpu(b)) => Some(b),
            _ => None,
        }
    }

    /// Hands the lease to the manager's table: it lasts until
    /// [`TierManager::release`] of the returned id or
    /// [`TierManager::client_gone`] of its client. The buffer is no longer
    /// reachable through this lease (take what the client needs, an IPC
    /// handle, before).
    pub fn detach(mut self) -> LeaseId {
        drop(self.image.take());
        let mut st = self.shared.lock();
        st.leases
            .get_mut(&self.id)
            .expect("an attached lease is in the table")
            .attached = false;
        self.id
    }
}

impl<X: Transfers> Drop for Lease<X> {
    fn drop(&mut self) {
        if let Some(image) = self.image.take() {
            // Our reference goes before the count: once the copy is
            // evictable, the table holds its only reference.
            drop(image);
            self.shared.lock().end_lease(self.id);
            self.shared.changed.notify_all();
        }
    }
}

impl<X: Transfers> fmt::Debug for Lease<X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.id)
            .field("model", &self.model)
            .field("tier", &self.tier)
            .field("client", &self.client)
            .field("bytes", &self.bytes)
            .field("served_from", &self.served_from)
            .finish()
    }
}
