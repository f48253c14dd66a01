//! Speculative decoding: guesses at a sequence's next tokens, checked in
//! the same forward as its next token (verification lives in the scheduler,
//! `engine/worker.rs`). Two sources of guesses:
//!
//! - Prompt lookup: the tokens that followed the most recent earlier
//!   occurrence of the sequence's last few tokens (summaries quote their
//!   source, code edits repeat the code, lists repeat their shape). Each
//!   position's token is sampled from the model as usual and a guess is kept
//!   only while it equals that sample. Since the guess is fixed before
//!   sampling, this is exactly sampling from the model at every position.
//! - A draft model: a smaller model with the same vocabulary draws the
//!   guesses from its own distribution q. Comparing with the target's sample
//!   would then bias the output towards q, so each guess goes through the
//!   rejection rule of speculative sampling (`accept_or_replace`).
//!
//! Either way greedy output is identical to plain decoding and sampled
//! output keeps the target model's distribution.

/// Tokens searched back from the end (bounds the cost per step).
const SEARCH_WINDOW: usize = 4096;

/// Up to `k` tokens that followed the latest earlier match of the last
/// `n` tokens, for `n` from `ngram_max` down to `ngram_min`; empty if none.
pub fn prompt_lookup(tokens: &[u32], ngram_min: usize, ngram_max: usize, k: usize) -> Vec<u32> {
    let len = tokens.len();
    let lo = len.saturating_sub(SEARCH_WINDOW);
    for n in (ngram_min..=ngram_max).rev() {
        if n == 0 || len <= n {
            continue;
        }
        let suffix = &tokens[len - n..];
        // Latest start first; the match must end before the suffix starts
        // overlapping itself at the very end (start + n < len).
        for start in (lo..len - n).rev() {
            if &tokens[start..start + n] == suffix {
                let from = start + n;
                let to = (from + k).min(len);
                if to > from {
                    return tokens[from..to].to_vec();
                }
            }
        }
    }
    Vec::new()
}

/// Speculative sampling's rule for a token `d` that the draft drew from
/// `q`, given the target's distribution `p` at the same position (both as
/// `(token, probability)` pairs, from `Sampler::distribution`): `d` is kept
/// with probability min(1, p(d) / q(d)); otherwise the token taken instead
/// is drawn from max(0, p - q), normalised. The result is distributed
/// exactly as p whatever q is (Leviathan et al. 2023; Chen et al. 2023).
/// `u_keep` and `u_draw` are independent uniforms in [0, 1).
/// Returns `Ok(())` when `d` is kept, else `Err(replacement)`.
pub fn accept_or_replace(p: &[(u32, f32)], q: &[(u32, f32)], d: u32, u_keep: f32, u_draw: f32) -> Result<(), u32> {
    let prob = |dist: &[(u32, f32)], t: u32| dist.iter().find(|e| e.0 == t).map_or(0.0, |e| e.1);
    let (pd, qd) = (prob(p, d), prob(q, d));
    // qd > 0 for a token the draft drew; a zero would mean "keep iff p has it".
    if pd >= qd || u_keep * qd < pd {
        return Ok(());
    }
    let mut q_sorted = q.to_vec();
    q_sorted.sort_unstable_by_key(|e| e.0);
    let q_of = |t: u32| q_sorted.binary_search_by_key(&t, |e| e.0).map_or(0.0, |i| q_sorted[i].1);
    let residual: Vec<(u32, f32)> = p.iter().map(|&(t, pt)| (t, (pt - q_of(t)).max(0.0))).filter(|e| e.1 > 0.0).collect();
    // p(d) < q(d) means p exceeds q somewhere, so the residual has mass;
    // rounding could still leave none, and then p itself is the answer.
    let dist = if residual.is_empty() { p } else { &residual };
    let total: f32 = dist.iter().map(|e| e.1).sum();
    let mut r = u_draw * total;
    for &(t, w) in dist {
        if r < w {
            return Err(t);
        }
        r -= w;
    }
    Err(dist.last().map_or(d, |e| e.0))
}

/// How many guesses a sequence's draft model makes: one more after all
/// were kept, one past the kept run otherwise; when even a single guess
/// fails, drafting pauses for 1, 2, 4 ... 16 steps. Every guess costs a
/// draft forward and widens the verify forward whether it is kept or not,
/// so a draft that disagrees must cost little.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DraftLength {
    pub k: usize,
    /// Steps left without drafting.
    pub pause: u32,
    backoff: u32,
}

impl DraftLength {
    pub fn new(max: usize) -> Self {
        DraftLength { k: max, pause: 0, backoff: 0 }
    }

    /// Whether to draft this step (a paused step counts down).
    pub fn this_step(&mut self) -> bool {
        if self.pause > 0 {
            self.pause -= 1;
            return false;
        }
        true
    }

    /// After a round of `drafted` guesses of which the first `kept` were kept.
    pub fn update(&mut self, drafted: usize, kept: usize, max: usize) {
        if kept == drafted {
            self.k = (self.k + 1).min(max);
            self.backoff = 0;
        } else if kept == 0 && drafted == 1 {
            self.backoff = (self.backoff * 2).clamp(1, 16);
            self.pause = self.backoff;
        } else {
            self.k = kept + 1;
            self.backoff = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::Rng;

    /// Pearson's chi-square of `counts` against probabilities `p`.
    fn chi_square(counts: &[u64], p: &[f64]) -> f64 {
        let n: u64 = counts.iter().sum();
        counts.iter().zip(p).map(|(&c, &pi)| (c as f64 - n as f64 * pi).powi(2) / (n as f64 * pi)).sum()
    }

    /// Draft tokens drawn from q and passed through the rule come out
    /// distributed as p, for drafts close to, far from and disjoint from
    /// the target, and for a greedy (one-hot) target.
    #[test]
    fn accepted_or_replaced_tokens_follow_the_target_distribution() {
        let cases: [(&[f64], &[f64]); 4] = [
            (&[0.5, 0.2, 0.15, 0.1, 0.05], &[0.4, 0.3, 0.1, 0.1, 0.1]),
            (&[0.05, 0.05, 0.1, 0.3, 0.5], &[0.6, 0.25, 0.1, 0.05, 0.0]),
            (&[0.0, 0.0, 0.0, 0.5, 0.5], &[0.5, 0.5, 0.0, 0.0, 0.0]),
            (&[0.0, 0.0, 1.0, 0.0, 0.0], &[0.2, 0.2, 0.2, 0.2, 0.2]),
        ];
        let mut rng = Rng::new(7);
        let n = 200_000;
        for (pi, qi) in cases {
            let pairs = |v: &[f64]| -> Vec<(u32, f32)> { v.iter().enumerate().filter(|e| *e.1 > 0.0).map(|(t, &x)| (t as u32, x as f32)).collect() };
            let (p, q) = (pairs(pi), pairs(qi));
            let mut counts = vec![0u64; pi.len()];
            let mut kept = 0u64;
            for _ in 0..n {
                // Draw d from q.
                let mut r = rng.next_f32();
                let d = q.iter().find(|e| { let hit = r < e.1; r -= e.1; hit }).map_or(q.last().unwrap().0, |e| e.0);
                let t = match accept_or_replace(&p, &q, d, rng.next_f32(), rng.next_f32()) {
                    Ok(()) => { kept += 1; d }
                    Err(t) => t,
                };
                counts[t as usize] += 1;
            }
            // Tokens p cannot produce never come out.
            for (t, &x) in pi.iter().enumerate() {
                if x == 0.0 {
                    assert_eq!(counts[t], 0, "token {t} has p = 0: {counts:?}");
                }
            }
            let support: Vec<usize> = (0..pi.len()).filter(|&t| pi[t] > 0.0).collect();
            let c: Vec<u64> = support.iter().map(|&t| counts[t]).collect();
            let pp: Vec<f64> = support.iter().map(|&t| pi[t]).collect();
            // 99.9th percentile of chi-square with up to 4 degrees of freedom: 18.47.
            let x2 = chi_square(&c, &pp);
            assert!(x2 < 18.47, "p {pi:?} q {qi:?}: chi-square {x2:.1}, counts {counts:?}");
            // The share kept is sum min(p, q) (the rule keeps as much as it can).
            let overlap: f64 = pi.iter().zip(qi).map(|(a, b)| a.min(*b)).sum();
            let share = kept as f64 / n as f64;
            assert!((share - overlap).abs() < 0.01, "kept {share:.3}, expected {overlap:.3}");
        }
    }

    #[test]
    fn draft_length_follows_what_the_target_keeps() {
        let mut d = DraftLength::new(3);
        d.update(3, 3, 3);
        assert_eq!(d.k, 3, "capped at the maximum");
        d.update(3, 1, 3);
        assert_eq!(d.k, 2, "one past the kept run");
        d.update(2, 2, 3);
        assert_eq!(d.k, 3);
        d.update(3, 0, 3);
        assert_eq!(d.k, 1);
        // A single failing guess pauses drafting, longer each time.
        let mut pauses = Vec::new();
        for _ in 0..6 {
            d.update(1, 0, 3);
            pauses.push(d.pause);
            let skipped = (0..).take_while(|_| !d.this_step()).count();
            assert_eq!(skipped as u32, *pauses.last().unwrap());
        }
        assert_eq!(pauses, [1, 2, 4, 8, 16, 16]);
        d.update(1, 1, 3);
        assert_eq!((d.k, d.pause, d.this_step()), (2, 0, true));
    }

    #[test]
    fn greedy_keeps_exactly_the_target_argmax() {
        let p = [(3u32, 1.0f32)];
        assert_eq!(accept_or_replace(&p, &[(3, 1.0)], 3, 0.99, 0.5), Ok(()));
        assert_eq!(accept_or_replace(&p, &[(5, 1.0)], 5, 0.0, 0.5), Err(3));
        // A sampled draft against a greedy target.
        assert_eq!(accept_or_replace(&p, &[(5, 0.7), (3, 0.3)], 5, 0.0, 0.99), Err(3));
    }

    #[test]
    fn proposes_what_followed_the_latest_match_longest_ngram_first() {
        //            0  1  2  3  4  5  6  7  8  9
        let t = [5, 6, 7, 8, 9, 1, 6, 7, 2, 6, 7];
        // Suffix [2, 6, 7]: no earlier match; [6, 7]: latest at 6..8 -> followed by 2, 6, 7.
        assert_eq!(prompt_lookup(&t, 2, 3, 3), [2, 6, 7]);
        assert_eq!(prompt_lookup(&t, 2, 3, 1), [2]);
        // Longest first: [1, 6, 7] occurs at 5..8 when the sequence ends with it.
        let t = [1, 6, 7, 4, 4, 6, 7, 9, 1, 6, 7];
        assert_eq!(prompt_lookup(&t, 2, 3, 2), [4, 4]);
    }

    #[test]
    fn nothing_to_propose() {
        assert!(prompt_lookup(&[1, 2, 3, 4], 2, 3, 4).is_empty());
        assert!(prompt_lookup(&[1], 1, 3, 4).is_empty());
        assert!(prompt_lookup(&[], 1, 3, 4).is_empty());
        // A match right before the end proposes what lies between it and the end.
        assert_eq!(prompt_lookup(&[3, 3, 3], 1, 1, 4), [3]);
    }
}
