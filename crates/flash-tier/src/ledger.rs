//! The policy of one tier, as plain data: which copies it holds, how its
//! budget is split, whom to evict. No threads, no locks, no buffers (a copy's
//! payload is a type parameter): the manager calls it under its lock, and the
//! unit tests below call it directly.
//!
//! Accounting: `used = resident + loading + freeing <= budget` at all times.
//! - `resident`: bytes of [`Slot::Ready`] copies;
//! - `loading`: bytes reserved by [`Slot::Loading`] entries — reserved before
//!   the allocation, so concurrent loads can never overcommit;
//! - `freeing`: bytes of copies taken out of the table whose buffers have not
//!   been dropped yet (the manager drops them outside its lock, then calls
//!   [`Ledger::freed`]). Until then the memory is still allocated, so it stays
//!   counted.

use crate::error::TierError;
use crate::status::{Histo, TierCounters};
use crate::types::{ModelId, Tier};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// One load in flight, shared by the loader and the requests waiting for it.
#[derive(Debug, Default)]
pub(crate) struct Flight {
    /// Set once, under the manager's lock, when the load ends.
    pub outcome: OnceLock<Result<(), TierError>>,
}

pub(crate) struct Entry<P> {
    pub bytes: u64,
    pub slot: Slot<P>,
}

pub(crate) enum Slot<P> {
    Loading(Loading),
    Ready(Ready<P>),
}

pub(crate) struct Loading {
    pub flight: Arc<Flight>,
    /// Requests waiting for this load; each gets a pin when it succeeds.
    pub waiters: u32,
    pub from: Tier,
}

pub(crate) struct Ready<P> {
    pub image: P,
    pub leases: u32,
    /// Short-lived holds: a transfer reading this copy, or a waiter of the
    /// load that made it, between the wake-up and its lease.
    pub pins: u32,
    pub kept: bool,
    /// Logical clock of the last use (breaks ties of popularity; ties
    /// cannot happen).
    pub last_use: u64,
    pub used_at: Instant,
    pub from: Tier,
}

impl<P> Ready<P> {
    /// Neither leased, kept nor pinned.
    pub fn evictable(&self) -> bool {
        self.leases == 0 && self.pins == 0 && !self.kept
    }
    /// Leased or kept: only a client or `unload` can change that.
    pub fn held(&self) -> bool {
        self.leases > 0 || self.kept
    }
}

/// What a request for `bytes` more in a tier should do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// The free budget suffices.
    Fits,
    /// Evicting these copies (in eviction order) makes room.
    Evict(Vec<ModelId>),
    /// Not now, but bytes in flight (loads, pinned copies, frees) will
    /// become free or evictable: wait for a change and plan again.
    Wait,
    Refuse(Refusal),
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Budget 0.
    Disabled,
    /// More than the whole budget.
    TooLarge,
    /// Leased and kept copies leave too little.
    Full,
}

/// How the tier's bytes are held, for error messages.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Breakdown {
    pub free: u64,
    pub evictable: u64,
    pub in_flight: u64,
    pub held: u64,
}

pub(crate) struct Ledger<P> {
    pub tier: Tier,
    pub budget: u64,
    resident: u64,
    loading: u64,
    freeing: u64,
    /// Bytes held by reservations (engines' buffers): never evicted.
    reserved: u64,
    entries: HashMap<ModelId, Entry<P>>,
    pub counters: TierCounters,
    /// Requests waiting for room (status only).
    pub waiting: u32,
    /// Load times by source: `[disk, memory]`.
    pub load_times: [Histo; 2],
}

impl<P> Ledger<P> {
    pub fn new(tier: Tier, budget: u64) -> Self {
        Ledger {
            tier,
            budget,
            resident: 0,
            loading: 0,
            freeing: 0,
            reserved: 0,
            entries: HashMap::new(),
            counters: TierCounters::default(),
            waiting: 0,
            load_times: Default::default(),
        }
    }

    pub fn used(&self) -> u64 {
        self.resident + self.loading + self.freeing + self.reserved
    }
    pub fn reserved(&self) -> u64 {
        self.reserved
    }
    pub fn resident(&self) -> u64 {
        self.resident
    }
    pub fn loading(&self) -> u64 {
        self.loading
    }
    pub fn freeing(&self) -> u64 {
        self.freeing
    }
    pub fn free(&self) -> u64 {
        self.budget.saturating_sub(self.used())
    }

    pub fn entries(&self) -> impl Iterator<Item = (&ModelId, &Entry<P>)> {
        self.entries.iter()
    }
    pub fn get(&self, model: &ModelId) -> Option<&Entry<P>> {
        self.entries.get(model)
    }
    pub fn ready(&self, model: &ModelId) -> Option<&Ready<P>> {
        match &self.entries.get(model)?.slot {
            Slot::Ready(r) => Some(r),
            Slot::Loading(_) => None,
        }
    }
    pub fn ready_mut(&mut self, model: &ModelId) -> Option<&mut Ready<P>> {
        match &mut self.entries.get_mut(model)?.slot {
            Slot::Ready(r) => Some(r),
            Slot::Loading(_) => None,
        }
    }
    pub fn loading_mut(&mut self, model: &ModelId) -> Option<&mut Loading> {
        match &mut self.entries.get_mut(model)?.slot {
            Slot::Loading(l) => Some(l),
            Slot::Ready(_) => None,
        }
    }

    /// Marks a use of the copy (if ready) at logical time `tick`.
    pub fn touch(&mut self, model: &ModelId, tick: u64, now: Instant) {
        if let Some(r) = self.ready_mut(model) {
            r.last_use = tick;
            r.used_at = now;
        }
    }

    pub fn breakdown(&self) -> Breakdown {
        let mut b = Breakdown {
            free: self.free(),
            in_flight: self.loading + self.freeing,
            held: self.reserved,
            ..Breakdown::default()
        };
        for e in self.entries.values() {
            if let Slot::Ready(r) = &e.slot {
                if r.held() {
                    b.held += e.bytes;
                } else if r.pins > 0 {
                    b.in_flight += e.bytes;
                } else {
                    b.evictable += e.bytes;
                }
            }
        }
        b
    }

    /// Evictable copies in eviction order: the lowest `score` (the model's
    /// popularity, see [`crate::popularity`]) first, ties the least
    /// recently used first.
    fn eviction_order(&self, score: &dyn Fn(&ModelId) -> f64) -> Vec<(&ModelId, u64)> {
        let mut v: Vec<(f64, u64, &ModelId, u64)> = self
            .entries
            .iter()
            .filter_map(|(m, e)| match &e.slot {
                Slot::Ready(r) if r.evictable() => Some((score(m), r.last_use, m, e.bytes)),
                _ => None,
            })
            .collect();
        v.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        v.into_iter().map(|(_, _, m, b)| (m, b)).collect()
    }

    /// The first evictable copy in eviction order.
    pub fn victim(&self, score: &dyn Fn(&ModelId) -> f64) -> Option<ModelId> {
        self.eviction_order(score)
            .first()
            .map(|(m, _)| (*m).clone())
    }

    /// How to make room for `bytes` more. Evicts the shortest prefix of the
    /// eviction order that makes room, and nothing when that cannot suffice.
    pub fn plan(&self, bytes: u64, score: &dyn Fn(&ModelId) -> f64) -> Plan {
        if self.budget == 0 {
            return Plan::Refuse(Refusal::Disabled);
        }
        if bytes > self.budget {
            return Plan::Refuse(Refusal::TooLarge);
        }
        let mut room = self.free();
        if bytes <= room {
            return Plan::Fits;
        }
        let mut victims = Vec::new();
        for (m, b) in self.eviction_order(score) {
            victims.push(m.clone());
            room += b;
            if room >= bytes {
                return Plan::Evict(victims);
            }
        }
        // Whatever is neither held nor free nor evictable is in flight and
        // will become free or evictable without any client acting.
        if bytes <= self.budget - self.breakdown().held {
            Plan::Wait
        } else {
            Plan::Refuse(Refusal::Full)
        }
    }

    /// Starts a load of `model` (`bytes`, from `from`): evicts `victims`
    /// (from [`Ledger::plan`], under the same lock) and reserves the bytes.
    /// Returns the victims' payloads, to be dropped outside the lock
    /// *before* allocating, and the bytes put in `freeing` until then (the
    /// part of the victims not taken over by the reservation; hand it to
    /// [`Ledger::freed`] after the drop).
    pub fn begin_load(
        &mut self,
        model: &ModelId,
        bytes: u64,
        victims: &[ModelId],
        flight: Arc<Flight>,
        from: Tier,
    ) -> (Vec<P>, u64) {
        debug_assert!(!self.entries.contains_key(model));
        let (images, excess) = self.evict_for(bytes, victims);
        self.loading += bytes;
        self.entries.insert(
            model.clone(),
            Entry {
                bytes,
                slot: Slot::Loading(Loading {
                    flight,
                    waiters: 0,
                    from,
                }),
            },
        );
        debug_assert!(self.used() <= self.budget);
        (images, excess)
    }

    /// Reserves `bytes` for something other than a copy (an engine's
    /// buffers), evicting `victims` (from [`Ledger::plan`], under the same
    /// lock). Returns what [`Ledger::begin_load`] returns.
    pub fn reserve(&mut self, bytes: u64, victims: &[ModelId]) -> (Vec<P>, u64) {
        let evicted = self.evict_for(bytes, victims);
        self.reserved += bytes;
        debug_assert!(self.used() <= self.budget);
        evicted
    }

    /// Evicts `victims` to make room for `bytes`: until their payloads are
    /// dropped their memory is still allocated; the caller's `bytes` cover
    /// that much of it, `freeing` the rest (the excess, returned).
    fn evict_for(&mut self, bytes: u64, victims: &[ModelId]) -> (Vec<P>, u64) {
        let mut images = Vec::with_capacity(victims.len());
        let mut evicted = 0;
        for m in victims {
            let (image, b) = self.take(m);
            evicted += b;
            self.counters.evictions += 1;
            self.counters.evicted_bytes += b;
            images.push(image);
        }
        let excess = evicted.saturating_sub(bytes);
        self.freeing += excess;
        (images, excess)
    }

    /// Ends a reservation of `bytes`.
    pub fn unreserve(&mut self, bytes: u64) {
        debug_assert!(self.reserved >= bytes);
        self.reserved -= bytes;
    }

    /// The load of `model` succeeded: the copy is ready, pinned once for each
    /// waiter. Returns the number of waiters.
    pub fn finish_ok(&mut self, model: &ModelId, image: P, tick: u64, now: Instant) -> u32 {
        let e = self
            .entries
            .get_mut(model)
            .expect("a load in flight has an entry");
        let Slot::Loading(l) = &e.slot else {
            unreachable!("only the loader finishes a load")
        };
        let (waiters, from) = (l.waiters, l.from);
        e.slot = Slot::Ready(Ready {
            image,
            leases: 0,
            pins: waiters,
            kept: false,
            last_use: tick,
            used_at: now,
            from,
        });
        self.loading -= e.bytes;
        self.resident += e.bytes;
        self.counters.loads += 1;
        self.counters.loaded_bytes += e.bytes;
        waiters
    }

    /// The load of `model` failed: its entry and reservation go.
    pub fn finish_err(&mut self, model: &ModelId) {
        let e = self
            .entries
            .remove(model)
            .expect("a load in flight has an entry");
        debug_assert!(matches!(e.slot, Slot::Loading(_)));
        self.loading -= e.bytes;
        self.counters.load_failures += 1;
    }

    /// Takes a ready copy out of the table (eviction or unload). Its bytes
    /// move to `freeing` until [`Ledger::freed`].
    pub fn remove(&mut self, model: &ModelId) -> (P, u64) {
        let (image, b) = self.take(model);
        self.freeing += b;
        (image, b)
    }

    fn take(&mut self, model: &ModelId) -> (P, u64) {
        let e = self.entries.remove(model).expect("victim exists");
        let Slot::Ready(r) = e.slot else {
            unreachable!("only ready copies are removed")
        };
        debug_assert!(r.leases == 0 && r.pins == 0, "removed a held copy");
        self.resident -= e.bytes;
        (r.image, e.bytes)
    }

    /// `bytes` put in `freeing` have been dropped.
    pub fn freed(&mut self, bytes: u64) {
        self.freeing -= bytes;
    }

    /// The accounting invariants; a description of the first one broken.
    pub fn check(&self) -> Result<(), String> {
        let (mut ready, mut loading) = (0, 0);
        for e in self.entries.values() {
            match e.slot {
                Slot::Ready(_) => ready += e.bytes,
                Slot::Loading(_) => loading += e.bytes,
            }
        }
        let t = self.tier;
        if ready != self.resident {
            return Err(format!(
                "{t}: copies sum to {ready} bytes, resident says {}",
                self.resident
            ));
        }
        if loading != self.loading {
            return Err(format!(
                "{t}: loads sum to {loading} bytes, loading says {}",
                self.loading
            ));
        }
        if self.used() > self.budget {
            return Err(format!(
                "{t}: used {} > budget {}",
                self.used(),
                self.budget
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> ModelId {
        ModelId::new(s)
    }

    /// Equal popularity: the order is least recently used first.
    fn recency(_: &ModelId) -> f64 {
        0.0
    }

    /// A memory ledger of `budget` holding `copies` (name, bytes), used in
    /// that order (the first is the least recently used).
    fn ledger(budget: u64, copies: &[(&str, u64)]) -> Ledger<()> {
        let mut l = Ledger::new(Tier::Memory, budget);
        let now = Instant::now();
        for (i, (name, b)) in copies.iter().enumerate() {
            assert_eq!(l.plan(*b, &recency), Plan::Fits, "{name}");
            l.begin_load(&m(name), *b, &[], Arc::default(), Tier::Disk);
            l.finish_ok(&m(name), (), i as u64, now);
        }
        l.check().unwrap();
        l
    }

    #[test]
    fn fits_without_eviction() {
        let l = ledger(100, &[("a", 30), ("b", 30)]);
        assert_eq!(l.plan(40, &recency), Plan::Fits);
        assert_eq!(l.free(), 40);
    }

    #[test]
    fn evicts_least_recently_used_prefix() {
        let mut l = ledger(100, &[("a", 30), ("b", 30), ("c", 30)]);
        // Needs 20 more than the 10 free: only the oldest.
        assert_eq!(l.plan(30, &recency), Plan::Evict(vec![m("a")]));
        // After a use of a, b is the oldest.
        l.touch(&m("a"), 10, Instant::now());
        assert_eq!(l.plan(30, &recency), Plan::Evict(vec![m("b")]));
        // Several when one is not enough.
        assert_eq!(l.plan(70, &recency), Plan::Evict(vec![m("b"), m("c")]));
        assert_eq!(
            l.plan(100, &recency),
            Plan::Evict(vec![m("b"), m("c"), m("a")])
        );
    }

    #[test]
    fn lower_popularity_goes_first_recency_breaks_ties() {
        let l = ledger(100, &[("a", 30), ("b", 30), ("c", 30)]);
        // a is the least recent but the most requested: b, then c.
        let score = |x: &ModelId| if x == &m("a") { 5.0 } else { 1.0 };
        assert_eq!(l.plan(30, &score), Plan::Evict(vec![m("b")]));
        assert_eq!(l.plan(70, &score), Plan::Evict(vec![m("b"), m("c")]));
        assert_eq!(l.victim(&score), Some(m("b")));
        let score = |x: &ModelId| if x == &m("c") { 0.5 } else { 1.0 };
        assert_eq!(l.victim(&score), Some(m("c")));
    }

    #[test]
    fn begin_load_accounts_victims_exactly() {
        let mut l = ledger(100, &[("a", 30), ("b", 30), ("c", 30)]);
        let Plan::Evict(v) = l.plan(25, &recency) else {
            panic!()
        };
        let (images, excess) = l.begin_load(&m("d"), 25, &v, Arc::default(), Tier::Disk);
        assert_eq!(images.len(), 1);
        // a's 30 bytes: 25 taken over by d's reservation, 5 being freed.
        assert_eq!(excess, 5);
        assert_eq!((l.resident(), l.loading(), l.freeing()), (60, 25, 5));
        l.check().unwrap();
        l.freed(excess);
        assert_eq!(l.used(), 85);
        assert_eq!(l.counters.evictions, 1);
        assert_eq!(l.counters.evicted_bytes, 30);
        l.finish_err(&m("d"));
        assert_eq!(l.used(), 60);
        assert!(l.get(&m("d")).is_none());
        assert_eq!(l.counters.load_failures, 1);
        l.check().unwrap();
    }

    #[test]
    fn skips_leased_kept_and_pinned() {
        let mut l = ledger(100, &[("a", 30), ("b", 30), ("c", 30)]);
        l.ready_mut(&m("a")).unwrap().leases = 1;
        l.ready_mut(&m("b")).unwrap().kept = true;
        assert_eq!(l.plan(30, &recency), Plan::Evict(vec![m("c")]));
        l.ready_mut(&m("c")).unwrap().pins = 1;
        // c will be unpinned: worth waiting for.
        assert_eq!(l.plan(30, &recency), Plan::Wait);
        let b = l.breakdown();
        assert_eq!(
            b,
            Breakdown {
                free: 10,
                evictable: 0,
                in_flight: 30,
                held: 60
            }
        );
        // 41 can never fit beside the 60 held.
        assert_eq!(l.plan(41, &recency), Plan::Refuse(Refusal::Full));
        l.ready_mut(&m("c")).unwrap().leases = 1;
        assert_eq!(l.plan(30, &recency), Plan::Refuse(Refusal::Full));
    }

    #[test]
    fn loads_in_flight_mean_wait_not_refuse() {
        let mut l = ledger(100, &[("a", 50)]);
        l.ready_mut(&m("a")).unwrap().leases = 1;
        l.begin_load(&m("b"), 40, &[], Arc::default(), Tier::Disk);
        assert_eq!(l.plan(20, &recency), Plan::Wait);
        assert_eq!(l.plan(51, &recency), Plan::Refuse(Refusal::Full));
        assert_eq!(l.plan(101, &recency), Plan::Refuse(Refusal::TooLarge));
        assert_eq!(
            Ledger::<()>::new(Tier::Gpu(0), 0).plan(1, &recency),
            Plan::Refuse(Refusal::Disabled)
        );
    }

    #[test]
    fn waiters_pin_the_finished_copy() {
        let mut l: Ledger<()> = Ledger::new(Tier::Gpu(0), 100);
        l.begin_load(&m("a"), 60, &[], Arc::default(), Tier::Memory);
        l.loading_mut(&m("a")).unwrap().waiters = 3;
        assert_eq!(l.finish_ok(&m("a"), (), 1, Instant::now()), 3);
        let r = l.ready(&m("a")).unwrap();
        assert_eq!((r.pins, r.from), (3, Tier::Memory));
        assert!(!r.evictable());
        assert_eq!(l.plan(60, &recency), Plan::Wait);
    }

    #[test]
    fn check_catches_broken_accounting() {
        let mut l = ledger(100, &[("a", 30)]);
        l.resident += 1;
        assert!(l.check().unwrap_err().contains("resident"));
    }
}
