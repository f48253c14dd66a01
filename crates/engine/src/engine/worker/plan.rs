//! The scheduler's choices for a step (vLLM's `schedule`): which sequences
//! decode, how many guesses ride along, how much of which prompts to
//! prefill, what to preempt when blocks run out, and which waiting prompts
//! to prefetch into the prefix cache.

use super::*;

impl WorkerLoop {
    /// Chooses this step's batch: retires timed-out and abandoned sequences,
    /// gives every decoding sequence a slot (preempting until the cache has
    /// its blocks), then guesses, then prompt chunks, then prefetch. `Err`
    /// says there is nothing to run, and whether the step still changed
    /// something (a retirement or preemption).
    pub(super) fn plan(&mut self) -> Result<StepPlan, bool> {
        let now = Instant::now();
        self.retire(|s| {
            if s.job.abandoned() {
                return Some(Outcome::Abandoned);
            }
            match s.job.deadline {
                Some((at, ms)) if now >= at => Some(Outcome::Failed(EngineError::Timeout(ms))),
                _ => None,
            }
        });
        if self.running.is_empty() {
            return Err(false);
        }
        let buffer = self.settings.stream_buffer;
        let can_run = |s: &Sequence| s.job.unread.load(Ordering::Relaxed) < buffer;

        // Decode first: every running sequence with one pending token gets a
        // slot; preempt until the cache has the blocks they need.
        loop {
            let need: usize = self
                .running
                .iter()
                .filter(|s| s.pending() == 1 && can_run(s))
                .map(|s| s.blocks_short(self.pool.block_size(), s.n_cached + 1))
                .sum();
            if need <= self.pool.available() {
                break;
            }
            if self.running.len() == 1 {
                // A lone sequence that fills the whole cache ends here.
                self.retire(|_| Some(Outcome::Finished(FinishReason::Length)));
                return Err(true);
            }
            let v = self.victim();
            self.preempt(v);
        }
        let mut batch = Vec::new();
        let decoding: Vec<usize> = (0..self.running.len()).filter(|&i| self.running[i].pending() == 1 && can_run(&self.running[i])).collect();
        for &i in &decoding {
            let s = &mut self.running[i];
            s.grow(&mut self.pool, s.n_cached + 1);
        }
        // Then guesses (speculative decoding), from blocks nobody needs this
        // step; each sequence's guesses follow its next token in the batch.
        let spec = self.settings.speculative.clone();
        let speculate = self.running.len() <= spec.max_batch;
        let ctx = self.model.config().context_length;
        let guesses_wanted = |s: &Sequence| {
            let left = s.job.max_tokens.saturating_sub(s.n_generated + 1);
            spec.max_draft_tokens.min(left).min(ctx.saturating_sub(s.n_cached + 2))
        };
        if speculate && self.drafter.is_some() {
            let mut wanted = Vec::new();
            for &i in &decoding {
                let s = &mut self.running[i];
                if s.job.speculative && s.draft_len.this_step() {
                    wanted.push((i, guesses_wanted(s).min(s.draft_len.k)));
                }
            }
            self.draft_with_model(&wanted);
        }
        for &i in &decoding {
            let s = &mut self.running[i];
            let pos = s.n_cached;
            batch.push(BatchToken { token: s.tokens[pos], pos, seq: i, logits: true });
            if speculate && s.job.speculative {
                let mut d = if self.drafter.is_some() {
                    std::mem::take(&mut s.draft)
                } else {
                    crate::engine::speculative::prompt_lookup(&s.tokens, spec.ngram_min, spec.ngram_max, guesses_wanted(s))
                };
                // Guesses the grammar would refuse after the next token cannot be kept.
                if let Some(g) = s.job.guide.as_mut() {
                    let n = g.accepted_prefix(&d);
                    d.truncate(n);
                }
                while !d.is_empty() && s.blocks_short(self.pool.block_size(), pos + 1 + d.len()) > self.pool.available() {
                    d.pop();
                }
                s.draft_q.truncate(d.len());
                for (j, &tok) in d.iter().enumerate() {
                    batch.push(BatchToken { token: tok, pos: pos + 1 + j, seq: i, logits: true });
                }
                s.grow(&mut self.pool, pos + 1 + d.len());
                s.draft = d;
            }
        }
        // Then prompt chunks, as far as budget and blocks go: most urgent
        // first, then by arrival, so a background request's long prompt
        // cannot hold back an urgent request's first token.
        let mut budget = self.settings.prefill_chunk;
        let bs = self.pool.block_size();
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| (self.running[i].job.priority, self.running[i].arrival));
        for i in order {
            let s = &mut self.running[i];
            if s.pending() < 2 || budget == 0 || !can_run(s) {
                continue;
            }
            let room = (s.blocks.len() + self.pool.available()) * bs - s.n_cached;
            let take = s.pending().min(budget).min(room);
            if take == 0 {
                break;
            }
            let (start, end) = (s.n_cached, s.n_cached + take);
            for pos in start..end {
                batch.push(BatchToken { token: s.tokens[pos], pos, seq: i, logits: pos + 1 == s.tokens.len() });
            }
            s.grow(&mut self.pool, end);
            budget -= take;
        }
        let prefetch = self.prefetch(&mut batch, budget);
        if batch.is_empty() {
            // Every sequence is paused on its consumer, or prompts wait for
            // blocks that running sequences hold: preempt the newest so the
            // oldest can progress.
            if self.running.iter().any(|s| s.pending() > 1 && can_run(s)) && self.running.len() > 1 {
                let v = self.victim();
                self.preempt(v);
                return Err(true);
            }
            return Err(false);
        }
        Ok(StepPlan { batch, prefetch })
    }

    /// Picks the sequence to preempt: lowest priority, then latest arrival.
    pub(super) fn victim(&self) -> usize {
        (0..self.running.len()).max_by_key(|&i| (self.running[i].job.priority, self.running[i].arrival)).unwrap()
    }

    pub(super) fn preempt(&mut self, i: usize) {
        // `remove`, not `swap_remove`: the batch keeps its arrival order.
        let mut s = self.running.remove(i);
        s.release_blocks(&mut self.pool);
        if let Some(d) = self.drafter.as_mut() {
            d.release(&mut s);
        }
        self.counters.preemptions.fetch_add(1, Ordering::Relaxed);
        self.waiting[s.job.priority as usize].push_front(s);
    }

    /// KV prefetch: while every batch slot is taken, puts prompt chunks of
    /// the requests next in line into `batch` (whole blocks, never a prompt's
    /// last token, within the `budget` left and leaving blocks for the running
    /// streams' next steps). Returns those sequences, taken off their queues;
    /// their batch entries index past the running ones.
    pub(super) fn prefetch(&mut self, batch: &mut Vec<BatchToken>, mut budget: usize) -> Vec<Sequence> {
        let bs = self.pool.block_size();
        let max_batch = self.knobs.max_batch(self.settings.max_batch);
        let mut out = Vec::new();
        if !self.settings.prefetch_waiting || self.running.len() < max_batch {
            return out;
        }
        // One block per running stream stays free for their next tokens.
        let reserve = self.running.len();
        for p in 0..3 {
            while budget >= bs && self.pool.available() > reserve {
                let Some(front) = self.waiting[p].front() else { break };
                let end_max = (front.tokens.len() - 1) / bs * bs;
                if !front.job.prefix_cache || !front.blocks.is_empty() || end_max == 0 {
                    break;
                }
                let mut s = self.waiting[p].pop_front().unwrap();
                s.reuse_prefix(&mut self.pool);
                let room = (s.blocks.len() + self.pool.available().saturating_sub(reserve)) * bs;
                let end = end_max.min((s.n_cached + budget) / bs * bs).min(room);
                if end <= s.n_cached {
                    // Nothing new fits (or it is all cached already): leave it be.
                    s.release_blocks(&mut self.pool);
                    self.waiting[p].push_front(s);
                    return out;
                }
                let seq = self.running.len() + out.len();
                batch.extend((s.n_cached..end).map(|pos| BatchToken { token: s.tokens[pos], pos, seq, logits: false }));
                budget -= end - s.n_cached;
                s.grow(&mut self.pool, end);
                self.counters.prefetched_tokens.fetch_add((end - s.n_cached) as u64, Ordering::Relaxed);
                out.push(s);
            }
        }
        out
    }
}
