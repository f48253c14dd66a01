//! Token sampling: penalties, then greedy or temperature with top-k, top-p and
//! min-p, from a seeded generator so the same seed gives the same output.

use std::collections::HashMap;

/// Tokens looked back over for the repetition penalties (llama.cpp's default).
pub const PENALTY_WINDOW: usize = 64;
/// After temperature, logits this far below the maximum carry less than
/// 1e-6 of the total probability even over a 150k vocabulary, so they are
/// dropped before sorting.
const LOGIT_CUTOFF: f32 = 25.0;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means off.
    pub top_k: usize,
    /// 1 means off.
    pub top_p: f32,
    /// 0 means off.
    pub min_p: f32,
    /// 1 means off.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    /// Added to a token's logit before anything else (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
        }
    }
}

/// xoshiro256**: small, fast, and reproducible across platforms.
#[derive(Debug, Clone)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // SplitMix64 spreads any seed (even 0) over the whole state.
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E3779B97F4A7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D049BB133111EB);
            x ^ (x >> 31)
        };
        Rng([next(), next(), next(), next()])
    }
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }
    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    candidates: Vec<(u32, f32)>,
}

/// The chosen token and its log-probability under the model's distribution
/// (before penalties and temperature), as OpenAI's `logprobs` reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
}

/// `log Σ exp(l)`, computed stably.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln()
}

/// The `n` most likely tokens and their log-probabilities, most likely first.
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let lse = log_sum_exp(logits);
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(idx.len());
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, by_logit);
        idx.truncate(n);
    }
    idx.sort_unstable_by(by_logit);
    idx.into_iter().map(|i| (i, logits[i as usize] - lse)).collect()
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            use std::time::{SystemTime, UNIX_EPOCH};
            static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
            t ^ COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed).wrapping_mul(0x9E3779B97F4A7C15)
        });
        Sampler { params, rng: Rng::new(seed), candidates: Vec::new() }
    }

    /// Picks the next token. `history` is the sequence so far (prompt and
    /// output); its last `PENALTY_WINDOW` tokens feed the penalties.
    /// `logits` is modified in place.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> Sampled {
        // The reported log-probability is of the unpenalized distribution.
        let raw = self.penalizes().then(|| logits.to_vec());
        let token = self.pick(logits, history);
        Sampled { token, logprob: logprob(raw.as_deref().unwrap_or(logits), token) }
    }

    /// `sample` without the log-probability (a caller that computes it
    /// from logits of its own).
    pub fn pick(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.penalize(logits, history);
        if self.params.temperature == 0.0 {
            argmax(logits)
        } else {
            self.fill_candidates(logits);
            self.draw(None)
        }
    }

    /// Whether `penalize` changes logits (callers keep a copy of the raw
    /// ones for reporting log-probabilities).
    pub fn penalizes(&self) -> bool {
        let p = &self.params;
        p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 || !p.logit_bias.is_empty()
    }

    fn penalize(&self, logits: &mut [f32], history: &[u32]) {
        if !self.penalizes() {
            return;
        }
        let p = &self.params;
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        let window = &history[history.len().saturating_sub(PENALTY_WINDOW)..];
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in window {
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &c) in &counts {
            let Some(l) = logits.get_mut(t as usize) else { continue };
            *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            *l -= p.presence_penalty + p.frequency_penalty * c as f32;
        }
    }

    /// The distribution `sample` draws from (after penalties, temperature,
    /// top-k, min-p and top-p) as `(token, probability)` pairs that sum to
    /// 1, most likely first; a single pair when decoding greedily.
    /// Speculative sampling needs it whole, for the draft and the target.
    /// `logits` is modified in place.
    pub fn distribution(&mut self, logits: &mut [f32], history: &[u32]) -> Vec<(u32, f32)> {
        self.penalize(logits, history);
        if self.params.temperature == 0.0 {
            return vec![(argmax(logits), 1.0)];
        }
        self.fill_candidates(logits);
        let total: f32 = self.candidates.iter().map(|e| e.1).sum();
        self.candidates.iter().map(|&(t, p)| (t, p / total)).collect()
    }

    /// A token drawn from `dist` (pairs of `distribution`).
    pub fn draw_from(&mut self, dist: &[(u32, f32)]) -> u32 {
        self.draw(Some(dist))
    }

    /// Uniform in [0, 1), from the request's seeded generator.
    pub fn uniform(&mut self) -> f32 {
        self.rng.next_f32()
    }

    /// Draws from `dist`, or from the candidates `fill_candidates` left
    /// (their weights need not sum to 1).
    fn draw(&mut self, dist: Option<&[(u32, f32)]>) -> u32 {
        let c = dist.unwrap_or(&self.candidates);
        let total: f32 = c.iter().map(|e| e.1).sum();
        let mut r = self.rng.next_f32() * total;
        for e in c.iter() {
            if r < e.1 {
                return e.0;
            }
            r -= e.1;
        }
        c.last().map(|e| e.0).unwrap_or(0)
    }

    /// Leaves in `candidates` the tokens temperature sampling may pick and
    /// their unnormalised weights, most likely first.
    fn fill_candidates(&mut self, logits: &[f32]) {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) * inv_t;
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l * inv_t))
                .filter(|&(_, l)| l >= max - LOGIT_CUTOFF),
        );
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // Softmax over the survivors (all within LOGIT_CUTOFF of the max).
        let mut sum = 0.0f32;
        for e in c.iter_mut() {
            e.1 = (e.1 - max).exp();
            sum += e.1;
        }
        for e in c.iter_mut() {
            e.1 /= sum;
        }
        if p.min_p > 0.0 {
            let floor = c[0].1 * p.min_p;
            let keep = c.iter().take_while(|e| e.1 >= floor).count().max(1);
            c.truncate(keep);
        }
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                cum += e.1;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
    }
}

/// Log-probability of `token` under the softmax of `logits`.
pub fn logprob(logits: &[f32], token: u32) -> f32 {
    logits[token as usize] - log_sum_exp(logits)
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { seed: Some(7), ..Default::default() };
        f(&mut p);
        p
    }

    #[test]
    fn greedy_picks_the_maximum_and_reports_its_logprob() {
        let mut s = Sampler::new(SamplingParams::default());
        let mut logits = vec![0.0, 2.0, 1.0];
        let out = s.sample(&mut logits, &[]);
        assert_eq!(out.token, 1);
        let expected = 2.0 - (1.0f32 + 2f32.exp() + 1f32.exp()).ln();
        assert!((out.logprob - expected).abs() < 1e-5);
    }

    #[test]
    fn top_logprobs_are_sorted_and_normalised() {
        let logits = vec![1.0, 3.0, 2.0, 3.0];
        let top = top_logprobs(&logits, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let total: f32 = top_logprobs(&logits, 10).iter().map(|t| t.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!(top_logprobs(&logits, 0).is_empty());
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| {
                p.temperature = 1.0;
                p.seed = Some(seed);
            }));
            (0..50).map(|_| s.sample(&mut logits.clone(), &[]).token).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn top_k_and_top_p_and_min_p_restrict_the_support() {
        let logits = vec![3.0, 2.9, 0.0, -1.0, -2.0];
        for (p, allowed) in [
            (params(|p| { p.temperature = 1.0; p.top_k = 2; }), vec![0, 1]),
            (params(|p| { p.temperature = 1.0; p.top_p = 0.5; }), vec![0]),
            (params(|p| { p.temperature = 1.0; p.min_p = 0.5; }), vec![0, 1]),
        ] {
            let mut s = Sampler::new(p);
            for _ in 0..200 {
                let t = s.sample(&mut logits.clone(), &[]).token;
                assert!(allowed.contains(&t), "{t} not in {allowed:?}");
            }
        }
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        let logits = vec![0.0, 1.0f32.ln() + 0.0, 2.0f32.ln()]; // weights 1 : 1 : 2
        let mut s = Sampler::new(params(|p| p.temperature = 1.0));
        let mut counts = [0u32; 3];
        for _ in 0..20000 {
            counts[s.sample(&mut logits.clone(), &[]).token as usize] += 1;
        }
        let frac = counts[2] as f32 / 20000.0;
        assert!((frac - 0.5).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn penalties_discourage_recent_tokens() {
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 2.0));
        // Token 0 wins without the penalty; halving its logit lets token 1 win.
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0]).token, 1);
        let mut s = Sampler::new(params(|p| p.presence_penalty = 1.5));
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0]).token, 1);
        let mut s = Sampler::new(params(|p| p.frequency_penalty = 0.4));
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0, 0, 0]).token, 1);
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0]).token, 0);
    }

    #[test]
    fn logit_bias_moves_tokens_and_logprobs_stay_the_models() {
        let mut s = Sampler::new(params(|p| p.logit_bias = vec![(1, 2.0), (0, -100.0), (9, 5.0)]));
        let picked = s.sample(&mut [3.0, 2.0], &[]);
        assert_eq!(picked.token, 1);
        assert!((picked.logprob - logprob(&[3.0, 2.0], 1)).abs() < 1e-6);
    }
}
