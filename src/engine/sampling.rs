//! Choosing the next token from the model's logits, on the host: penalties, then greedy or
//! temperature sampling with top-k, top-p and min-p (the order llama.cpp and Ollama use).
//! A seeded request owns its random generator, so the same seed gives the same text.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
    /// 0.0 disables min-p.
    pub min_p: f32,
    /// 1.0 disables the repeat penalty.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at (0: none; -1 in Ollama's API means the
    /// whole context, which callers map to `usize::MAX`).
    pub repeat_last_n: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.0,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, repeat_penalty: 1.0, ..Default::default() }
    }

    pub fn has_penalties(&self) -> bool {
        self.repeat_last_n > 0
            && (self.repeat_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0)
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sampler { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token; `history` holds the prompt and generated tokens so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if self.params.has_penalties() {
            apply_penalties(logits, history, &self.params);
        }
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> =
            logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, l)| (i as u32, *l)).collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        // Only the candidates that top-k keeps need ordering, and none do when neither
        // top-p nor min-p looks at the order: a full sort of the vocabulary every step
        // costs more than the rest of sampling.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if self.params.top_k > 0 && self.params.top_k < candidates.len() {
            candidates.select_nth_unstable_by(self.params.top_k - 1, by_logit);
            candidates.truncate(self.params.top_k);
        }
        let ordered = self.params.top_p < 1.0 || self.params.min_p > 0.0;
        if ordered {
            candidates.sort_unstable_by(by_logit);
        }
        let max = if ordered { candidates[0].1 } else { candidates.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max) };
        let inverse_temperature = 1.0 / self.params.temperature;
        let mut probabilities: Vec<f32> =
            candidates.iter().map(|(_, l)| ((l - max) * inverse_temperature).exp()).collect();
        let total: f32 = probabilities.iter().sum();
        probabilities.iter_mut().for_each(|p| *p /= total);
        let mut keep = probabilities.len();
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            for (index, p) in probabilities.iter().enumerate() {
                cumulative += p;
                if cumulative >= self.params.top_p {
                    keep = index + 1;
                    break;
                }
            }
        }
        if self.params.min_p > 0.0 {
            // Ordered here, so the first is the likeliest.
            let threshold = probabilities[0] * self.params.min_p;
            keep = keep.min(probabilities.iter().take_while(|p| **p >= threshold).count().max(1));
        }
        let total: f32 = probabilities[..keep].iter().sum();
        let mut point = self.rng.random::<f32>() * total;
        for (index, p) in probabilities[..keep].iter().enumerate() {
            point -= p;
            if point <= 0.0 {
                return candidates[index].0;
            }
        }
        candidates[keep - 1].0
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (index, value) in logits.iter().enumerate() {
        if *value > best_value {
            best_value = *value;
            best = index;
        }
    }
    best as u32
}

fn apply_penalties(logits: &mut [f32], history: &[u32], params: &SamplingParams) {
    let start = history.len().saturating_sub(params.repeat_last_n);
    let mut counts: HashMap<u32, u32> = HashMap::new();
    for token in &history[start..] {
        *counts.entry(*token).or_default() += 1;
    }
    for (token, count) in counts {
        let Some(logit) = logits.get_mut(token as usize) else { continue };
        if params.repeat_penalty != 1.0 {
            // As in llama.cpp/CTRL: shrink positive logits, push negative ones further down.
            if *logit > 0.0 {
                *logit /= params.repeat_penalty;
            } else {
                *logit *= params.repeat_penalty;
            }
        }
        *logit -= params.frequency_penalty * count as f32 + params.presence_penalty;
    }
}

/// Log-probabilities of all tokens (log-softmax).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let log_sum = sum.ln() + max;
    logits.iter().map(|l| l - log_sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest() {
        let mut sampler = Sampler::new(SamplingParams::greedy());
        assert_eq!(sampler.sample(&mut [0.1, 2.0, -1.0, 1.9], &[]), 1);
    }

    #[test]
    fn same_seed_same_choices() {
        let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: Some(7), repeat_penalty: 1.0, ..Default::default() };
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = || {
            let mut sampler = Sampler::new(params.clone());
            (0..20).map(|_| sampler.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn top_k_one_is_greedy() {
        let params = SamplingParams { temperature: 5.0, top_k: 1, seed: Some(1), repeat_penalty: 1.0, ..Default::default() };
        let mut sampler = Sampler::new(params);
        for _ in 0..10 {
            assert_eq!(sampler.sample(&mut [0.0, 3.0, 2.9], &[]), 1);
        }
    }

    #[test]
    fn repeat_penalty_discourages_seen_tokens() {
        let params = SamplingParams { temperature: 0.0, repeat_penalty: 2.0, repeat_last_n: 8, ..Default::default() };
        let mut sampler = Sampler::new(params);
        assert_eq!(sampler.sample(&mut [1.0, 1.5], &[1]), 0);
    }

    #[test]
    fn log_softmax_sums_to_one() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }
}
