//! Prompt-lookup drafting for speculative decoding: the tokens that followed
//! the most recent earlier occurrence of a sequence's last few tokens are a
//! cheap guess at what comes next (summaries quote their source, code edits
//! repeat the code, lists repeat their shape).
//!
//! Verification lives in the scheduler (`engine/worker.rs`): the guesses run
//! in the same forward as the sequence's next token, each position's token is
//! sampled from the model as usual, and a guess is kept only while it equals
//! that sample. Since the guess is fixed before sampling, this is exactly
//! sampling from the model at every position (the rejection rule of
//! speculative sampling with a one-token draft distribution): greedy output
//! is identical and sampled output keeps its distribution.

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

#[cfg(test)]
mod tests {
    use super::*;

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
