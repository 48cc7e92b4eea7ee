//! How often each model is requested lately: the order in which a tier
//! gives up its copies.
//!
//! A model's score is its count of requests, each weighted by
//! `2^(-age / half_life)`. Evicting the lowest score first (ties: the least
//! recently used) keeps the models many requests go to, where plain LRU
//! lets every model requested once push one of them out. On the swap
//! workload of `flash bench-daemon` (30 models, Zipf 1.0, a GPU tier of 3
//! and a memory tier of 6) LRU served 54 % of the requests from disk; this
//! order, with the admission rule of the memory tier (a copy filled on the
//! way to a GPU only displaces less popular ones), 38 %. The half-life lets
//! popularity move: a model used all morning and then left falls below a
//! model used twice since, within a few half-lives.
//!
//! Scores are only compared, never shown as rates; nothing here reads a
//! clock (the caller passes `now`), so tests drive time.

use crate::types::ModelId;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Default half-life of a request's weight.
pub const DEFAULT_HALF_LIFE: Duration = Duration::from_secs(300);

/// Scores below this are forgotten when the table grows past
/// `prune_at` entries: a request's weight after ~13 half-lives.
const FORGET_BELOW: f64 = 1e-4;

#[derive(Debug, Clone, Copy)]
struct Score {
    /// Weighted count as of `at`.
    value: f64,
    at: Instant,
}

#[derive(Debug)]
pub(crate) struct Popularity {
    half_life: Duration,
    scores: HashMap<ModelId, Score>,
    /// The table's size that triggers the next prune: at least
    /// [`Popularity::PRUNE_AT`], and twice what the last prune kept, so
    /// that many models all requested lately cost one prune per doubling.
    prune_at: usize,
}

impl Popularity {
    /// Models tracked before forgotten ones are dropped.
    const PRUNE_AT: usize = 4096;

    pub fn new(half_life: Duration) -> Self {
        Popularity {
            half_life: half_life.max(Duration::from_millis(1)),
            scores: HashMap::new(),
            prune_at: Self::PRUNE_AT,
        }
    }

    fn decay(&self, s: Score, now: Instant) -> f64 {
        let age = now.saturating_duration_since(s.at).as_secs_f64();
        s.value * (-age / self.half_life.as_secs_f64()).exp2()
    }

    /// Counts a request of `model` at `now`.
    pub fn request(&mut self, model: &ModelId, now: Instant) {
        let value = self.scores.get(model).map_or(0.0, |&s| self.decay(s, now)) + 1.0;
        self.scores.insert(model.clone(), Score { value, at: now });
        if self.scores.len() > self.prune_at {
            let half_life = self.half_life.as_secs_f64();
            self.scores.retain(|_, s| {
                let age = now.saturating_duration_since(s.at).as_secs_f64();
                s.value * (-age / half_life).exp2() >= FORGET_BELOW
            });
            self.prune_at = (2 * self.scores.len()).max(Self::PRUNE_AT);
        }
    }

    /// `model`'s score at `now` (0 when never requested or forgotten).
    pub fn score(&self, model: &ModelId, now: Instant) -> f64 {
        self.scores.get(model).map_or(0.0, |&s| self.decay(s, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> ModelId {
        ModelId::new(s)
    }

    #[test]
    fn requests_add_and_age_halves() {
        let t0 = Instant::now();
        let mut p = Popularity::new(Duration::from_secs(10));
        assert_eq!(p.score(&m("a"), t0), 0.0);
        p.request(&m("a"), t0);
        p.request(&m("a"), t0);
        assert_eq!(p.score(&m("a"), t0), 2.0);
        let later = t0 + Duration::from_secs(10);
        assert!((p.score(&m("a"), later) - 1.0).abs() < 1e-9);
        p.request(&m("a"), later);
        assert!((p.score(&m("a"), later) - 2.0).abs() < 1e-9);
        assert!((p.score(&m("a"), later + Duration::from_secs(20)) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn a_model_left_falls_below_one_used_since() {
        let t0 = Instant::now();
        let mut p = Popularity::new(Duration::from_secs(60));
        for _ in 0..50 {
            p.request(&m("morning"), t0);
        }
        let noon = t0 + Duration::from_secs(600); // ten half-lives
        p.request(&m("new"), noon);
        p.request(&m("new"), noon);
        assert!(p.score(&m("new"), noon) > p.score(&m("morning"), noon));
    }

    #[test]
    fn forgotten_models_are_pruned() {
        let t0 = Instant::now();
        let mut p = Popularity::new(Duration::from_secs(1));
        for i in 0..Popularity::PRUNE_AT {
            p.request(&m(&format!("old{i}")), t0);
        }
        let later = t0 + Duration::from_secs(60);
        p.request(&m("hot"), later);
        assert_eq!(p.scores.len(), 1, "only the live score stays");
        assert_eq!(p.score(&m("hot"), later), 1.0);
    }

    #[test]
    fn many_live_models_are_kept_and_pruned_once_per_doubling() {
        let t0 = Instant::now();
        let mut p = Popularity::new(Duration::from_secs(60));
        let n = Popularity::PRUNE_AT + 10;
        for i in 0..n {
            p.request(&m(&format!("live{i}")), t0);
        }
        assert_eq!(p.scores.len(), n, "all live: none forgotten");
        assert_eq!(p.prune_at, 2 * (Popularity::PRUNE_AT + 1));
        assert!(p.score(&m("live0"), t0) > 0.99);
    }
}
