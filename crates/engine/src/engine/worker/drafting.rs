//! The draft model's side of the worker: its own cache per sequence, and
//! the guesses it drafts for the next step (speculative decoding).

use super::*;

/// A smaller model with the same vocabulary that drafts guesses for this
/// worker's sequences, with its own paged cache (no prefix sharing: its
/// blocks live as long as their sequence runs).
pub(in crate::engine) struct Drafter {
    pub(in crate::engine) model: Arc<dyn Model>,
    pub(in crate::engine) kv: KvStore,
    pub(in crate::engine) pool: BlockPool,
}

impl Drafter {
    pub(super) fn release(&mut self, s: &mut Sequence) {
        for b in s.draft_blocks.drain(..) {
            self.pool.release(b);
        }
        s.draft_cached = 0;
    }
}

impl WorkerLoop {
    /// Attaches (or detaches) the draft model; caches of the previous one go.
    pub(super) fn set_drafter(&mut self, drafter: Option<Drafter>) {
        if let Some(mut old) = self.drafter.take() {
            for s in self.running.iter_mut().chain(self.waiting.iter_mut().flatten()) {
                old.release(s);
            }
        }
        self.drafter = drafter;
    }

    /// Draft-model guesses for the sequences `(index, k)`: the draft model
    /// first catches up on the tokens its cache lacks, then proposes up to
    /// `k` tokens one forward at a time (every sequence's in one batch),
    /// each drawn under the sequence's own sampling settings from the
    /// distribution kept in `draft_q` for the acceptance test. A sequence
    /// more than a prefill chunk behind (a long prompt) only catches up by
    /// one chunk this step, so the running streams never wait on a long
    /// draft prefill. A sequence the draft's cache or context cannot hold
    /// gets no guesses; a failed draft forward only costs this step's guesses.
    pub(super) fn draft_with_model(&mut self, wanted: &[(usize, usize)]) {
        let Some(d) = self.drafter.as_mut() else { return };
        let bs = d.pool.block_size();
        let dcfg = d.model.config();
        let vocab = dcfg.vocab_size.min(self.model.config().vocab_size);
        let chunk = self.settings.prefill_chunk.max(1);
        // (sequence, guesses wanted: 0 while catching up, positions cached after the first forward)
        let mut active: Vec<(usize, usize, usize)> = Vec::new();
        let mut batch = Vec::new();
        for &(i, k) in wanted {
            let s = &mut self.running[i];
            let n = s.tokens.len();
            let catching_up = n - s.draft_cached > chunk;
            if k == 0 && !catching_up {
                continue;
            }
            // `end`: positions the draft computes (up to the one before its last guess).
            let (k, end) = if catching_up { (0, s.draft_cached + chunk) } else { (k, n + k - 1) };
            if end > dcfg.context_length {
                continue;
            }
            let short = end.div_ceil(bs).saturating_sub(s.draft_blocks.len());
            if short > d.pool.available() {
                continue;
            }
            for _ in 0..short {
                s.draft_blocks.push(d.pool.allocate().expect("counted above"));
            }
            let seq = active.len();
            let to = if k == 0 { end } else { n };
            batch.extend((s.draft_cached..to).map(|pos| BatchToken { token: s.tokens[pos], pos, seq, logits: k > 0 && pos + 1 == n }));
            active.push((i, k, to));
        }
        let mut first = true;
        while !batch.is_empty() {
            let tables: Vec<&[BlockId]> = active.iter().map(|&(i, _, _)| self.running[i].draft_blocks.as_slice()).collect();
            let result = forward(d.model.as_ref(), &batch, &mut d.kv, &tables);
            drop(tables);
            let Ok(mut logits) = result else {
                for &(i, _, _) in &active {
                    let s = &mut self.running[i];
                    s.draft.clear();
                    s.draft_q.clear();
                    d.release(s);
                }
                return;
            };
            if std::mem::take(&mut first) {
                for &(i, _, to) in &active {
                    self.running[i].draft_cached = to;
                }
            }
            let rows = logits.chunks_exact_mut(dcfg.vocab_size);
            let mut next = Vec::new();
            for (bt, row) in batch.iter().filter(|b| b.logits).zip(rows) {
                let (i, k, _) = active[bt.seq];
                let s = &mut self.running[i];
                s.draft_cached = bt.pos + 1;
                // Penalties see the sequence as it would be with the guesses so far.
                let tail = s.tokens.len().saturating_sub(crate::sampler::PENALTY_WINDOW);
                let history: Vec<u32> = s.tokens[tail..].iter().chain(&s.draft).copied().collect();
                let q = s.sampler.distribution(&mut row[..vocab], &history);
                let tok = s.sampler.draw_from(&q);
                s.draft.push(tok);
                s.draft_q.push(q);
                if s.draft.len() < k {
                    next.push(BatchToken { token: tok, pos: bt.pos + 1, seq: bt.seq, logits: true });
                }
            }
            batch = next;
        }
    }
}
