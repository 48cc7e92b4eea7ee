//! Choosing the next token from logits, in the order of Hugging Face's
//! `generate`: repetition penalty, then temperature, top-k and top-p, then a
//! draw from a seeded generator (or the arg-max when greedy).

use crate::config::GenerationDefaults;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// How to pick tokens. `Default` is greedy with no penalty.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 (or below): greedy (arg-max). Otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches
    /// `p`; 1.0 (or more) = off.
    pub top_p: f32,
    /// Hugging Face's repetition penalty over the prompt and the generated
    /// tokens: a seen token's logit is divided by it when positive,
    /// multiplied when negative. 1.0 = off.
    pub repetition_penalty: f32,
    /// Seed of the generator; `None` seeds from the clock.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    /// Checks the values; the error says which one is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() {
            return Err(format!("temperature {} is not a number", self.temperature));
        }
        if self.top_p.is_nan() || self.top_p <= 0.0 {
            return Err(format!("top-p {} must be in (0, 1]", self.top_p));
        }
        let penalty_ok = self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0;
        if !penalty_ok {
            return Err(format!(
                "repetition penalty {} must be positive",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// A request's sampling fields; each `None` falls back on the model's
/// `generation_config.json` ([`SamplingRequest::resolve`]). `flash run`'s
/// flags and the OpenAI API's parameters are both one of these.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingRequest {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
}

impl SamplingRequest {
    /// The parameters with the model's defaults `g` filled in as Hugging
    /// Face's `generate` reads them: it samples only when `do_sample` is
    /// true, with its temperature (1.0 when absent), top-k and top-p;
    /// otherwise greedy unless the request says otherwise. The repetition
    /// penalty applies either way.
    pub fn resolve(&self, g: &GenerationDefaults) -> SamplingParams {
        let samples = g.do_sample == Some(true);
        let from_config = |x: Option<f32>, off: f32| if samples { x.unwrap_or(off) } else { off };
        SamplingParams {
            temperature: self
                .temperature
                .unwrap_or_else(|| from_config(g.temperature.or(Some(1.0)), 0.0)),
            top_k: self
                .top_k
                .unwrap_or(if samples { g.top_k.unwrap_or(0) } else { 0 }),
            top_p: self.top_p.unwrap_or_else(|| from_config(g.top_p, 1.0)),
            repetition_penalty: self
                .repetition_penalty
                .unwrap_or(g.repetition_penalty.unwrap_or(1.0)),
            seed: self.seed,
        }
    }
}

/// A sampler: the parameters, the generator and reused buffers.
pub struct Sampler {
    params: SamplingParams,
    rng: SmallRng,
    /// The seed actually used (reported so a run can be repeated).
    seed: u64,
    scores: Vec<f32>,
    cand: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ (u64::from(std::process::id()) << 32)
        });
        Sampler {
            params,
            rng: SmallRng::seed_from_u64(seed),
            seed,
            scores: Vec::new(),
            cand: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The next token for `logits`, given every token so far (`history`:
    /// prompt and generated, for the repetition penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        self.scores.clear();
        self.scores.extend_from_slice(logits);
        if p.repetition_penalty != 1.0 {
            apply_repetition_penalty(&mut self.scores, history, p.repetition_penalty);
        }
        if p.is_greedy() {
            return argmax(&self.scores);
        }
        let inv_t = 1.0 / p.temperature;
        self.cand.clear();
        self.cand.extend(
            self.scores
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.is_nan())
                .map(|(i, &s)| (s * inv_t, i as u32)),
        );
        if self.cand.is_empty() {
            return 0;
        }
        // Descending by score, ties by lower id (as a stable sort would).
        let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if p.top_k > 0 && p.top_k < self.cand.len() {
            self.cand.select_nth_unstable_by(p.top_k - 1, order);
            self.cand.truncate(p.top_k);
        }
        self.cand.sort_unstable_by(order);
        // Softmax over the candidates.
        let max = self.cand[0].0;
        let mut sum = 0f64;
        for c in self.cand.iter_mut() {
            c.0 = (c.0 - max).exp();
            sum += f64::from(c.0);
        }
        if p.top_p < 1.0 {
            let mut cum = 0f64;
            let mut keep = self.cand.len();
            for (i, c) in self.cand.iter().enumerate() {
                cum += f64::from(c.0) / sum;
                if cum >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            self.cand.truncate(keep.max(1));
            sum = self.cand.iter().map(|c| f64::from(c.0)).sum();
        }
        let mut r = self.rng.random::<f64>() * sum;
        for c in &self.cand {
            r -= f64::from(c.0);
            if r < 0.0 {
                return c.1;
            }
        }
        self.cand[self.cand.len() - 1].1
    }
}

/// Hugging Face's `RepetitionPenaltyLogitsProcessor`: every distinct token
/// of `history` is penalized once.
pub fn apply_repetition_penalty(scores: &mut [f32], history: &[u32], penalty: f32) {
    // Penalize each id once even when it occurs many times: mark as we go.
    let mut seen = std::collections::HashSet::with_capacity(history.len());
    for &t in history {
        let i = t as usize;
        if i < scores.len() && seen.insert(t) {
            let s = scores[i];
            scores[i] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// Index of the largest value; the first one on ties (as `torch.argmax`).
/// NaN values are never chosen (unless all are NaN, then 0).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in x.iter().enumerate() {
        if !v.is_nan() && (!found || v > bv) {
            best = i;
            bv = v;
            found = true;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, -1.0, 2.5, 0.0, -3.0, 2.9]
    }

    fn draws(params: SamplingParams, n: usize) -> Vec<u32> {
        let mut s = Sampler::new(params);
        (0..n).map(|_| s.sample(&logits(), &[])).collect()
    }

    #[test]
    fn greedy_is_argmax_first_on_ties() {
        assert_eq!(draws(SamplingParams::default(), 3), vec![1, 1, 1]);
        assert_eq!(argmax(&[0.5, 2.0, 2.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0]), 1);
        // top_k = 1 is greedy whatever the temperature.
        let p = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            seed: Some(3),
            ..Default::default()
        };
        assert!(draws(p, 50).iter().all(|&t| t == 1));
    }

    #[test]
    fn seeded_runs_repeat_and_seeds_differ() {
        let p = |seed| SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..Default::default()
        };
        let a = draws(p(7), 200);
        assert_eq!(a, draws(p(7), 200));
        assert_ne!(a, draws(p(8), 200));
        // Plain sampling at temperature 1 reaches tokens beyond the top 3.
        assert!(a.iter().any(|&t| ![1, 7, 4].contains(&t)));
    }

    #[test]
    fn top_k_keeps_only_the_k_best() {
        let p = SamplingParams {
            temperature: 100.0, // nearly uniform: without top-k every token shows
            top_k: 3,
            seed: Some(1),
            ..Default::default()
        };
        let d = draws(p, 500);
        assert!(d.iter().all(|t| [1, 7, 4].contains(t)), "{d:?}");
        for t in [1, 7, 4] {
            assert!(d.contains(&t), "token {t} never drawn");
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities at T=1: softmax of logits(); 1 (3.0) and 7 (2.9)
        // hold about 0.27 + 0.25; with p = 0.5 the set is {1, 7}.
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(2),
            ..Default::default()
        };
        let d = draws(p, 500);
        assert!(d.iter().all(|t| [1, 7].contains(t)), "{d:?}");
        assert!(d.contains(&1) && d.contains(&7));
        // A tiny p keeps only the most likely token.
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1e-6,
            seed: Some(2),
            ..Default::default()
        };
        assert!(draws(p, 100).iter().all(|&t| t == 1));
    }

    #[test]
    fn repetition_penalty_matches_hugging_face() {
        let mut s = vec![2.0, -2.0, 1.0, 4.0];
        apply_repetition_penalty(&mut s, &[0, 1, 1, 1, 3], 2.0);
        assert_eq!(s, vec![1.0, -4.0, 1.0, 2.0]);
        // Greedy with a penalty moves off a repeated winner.
        let mut sampler = Sampler::new(SamplingParams {
            repetition_penalty: 1.5,
            ..Default::default()
        });
        assert_eq!(sampler.sample(&logits(), &[]), 1);
        assert_eq!(sampler.sample(&logits(), &[1]), 7);
        assert_eq!(sampler.sample(&logits(), &[1, 7]), 4);
    }

    #[test]
    fn validate_names_the_bad_value() {
        let bad = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("top-p"));
        let bad = SamplingParams {
            repetition_penalty: -1.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("repetition"));
        assert!(SamplingParams::default().validate().is_ok());
    }
}
