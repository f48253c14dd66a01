//! The model worker: one thread per model running the continuous-batching
//! scheduler over its paged KV cache (see the module docs of `engine.rs`).

use super::*;

mod drafting;
mod output;
mod plan;
mod sequence;
pub(super) use drafting::Drafter;
use sequence::Sequence;

enum Outcome {
    Continue,
    Finished(FinishReason),
    Failed(EngineError),
    /// The caller went away: drop silently.
    Abandoned,
}

pub(super) struct Settings {
    pub(super) max_batch: usize,
    pub(super) prefill_chunk: usize,
    pub(super) prefetch_waiting: bool,
    pub(super) stream_buffer: usize,
    pub(super) speculative: crate::control::config::Speculative,
}

pub(super) struct WorkerLoop {
    model: Arc<dyn Model>,
    tokenizer: Arc<Tokenizer>,
    counters: Arc<Counters>,
    latency: Arc<LatencyMetrics>,
    knobs: Arc<Knobs>,
    kv: KvStore,
    pool: BlockPool,
    running: Vec<Sequence>,
    /// Admitted, not running (batch full, no blocks, or preempted); one
    /// queue per priority, in arrival order.
    waiting: [VecDeque<Sequence>; 3],
    settings: Settings,
    next_arrival: u64,
    /// References held on pinned prefix blocks.
    pinned: Vec<BlockId>,
    drafter: Option<Drafter>,
}

impl WorkerLoop {
    pub(super) fn new(
        model: Arc<dyn Model>,
        tokenizer: Arc<Tokenizer>,
        counters: Arc<Counters>,
        latency: Arc<LatencyMetrics>,
        knobs: Arc<Knobs>,
        kv: KvStore,
        pool: BlockPool,
        settings: Settings,
    ) -> Self {
        WorkerLoop {
            model,
            tokenizer,
            counters,
            latency,
            knobs,
            kv,
            pool,
            running: Vec::new(),
            waiting: Default::default(),
            settings: Settings { max_batch: settings.max_batch.max(1), ..settings },
            next_arrival: 0,
            pinned: Vec::new(),
            drafter: None,
        }
    }

    /// Runs every batch shape the kernels specialise on once (1-8 tokens:
    /// the GEMM's single-pass widths; 64: parallel activation quantization
    /// and tiles of 4; several sequences: the attention split) and the
    /// tokenizer, so the first request pays no first-touch costs (weight
    /// pages, thread start, lazy regex compilation).
    pub(super) fn warm_up(&mut self) -> Duration {
        let t = Instant::now();
        let _ = self.tokenizer.encode("Warm up the tokenizer: 123, héllo!", false, true);
        let vocab = self.model.config().vocab_size as u32;
        let bs = self.pool.block_size();
        for (n_seqs, n_tokens) in [(1usize, 1usize), (2, 1), (3, 1), (4, 1), (8, 1), (1, 5), (1, 6), (1, 7), (1, 64)] {
            let per_seq = n_tokens.div_ceil(bs);
            if n_seqs * per_seq > self.pool.available() {
                continue;
            }
            let tables: Vec<Vec<BlockId>> = (0..n_seqs).map(|_| (0..per_seq).filter_map(|_| self.pool.allocate()).collect()).collect();
            let batch: Vec<BatchToken> = (0..n_seqs)
                .flat_map(|seq| (0..n_tokens).map(move |pos| BatchToken { token: (seq * 31 + pos * 7) as u32 % vocab, pos, seq, logits: pos + 1 == n_tokens }))
                .collect();
            let refs: Vec<&[BlockId]> = tables.iter().map(Vec::as_slice).collect();
            let _ = forward(self.model.as_ref(), &batch, &mut self.kv, &refs);
            for b in tables.into_iter().flatten() {
                self.pool.release(b);
            }
        }
        t.elapsed()
    }

    fn n_waiting(&self) -> usize {
        self.waiting.iter().map(VecDeque::len).sum()
    }

    fn admit(&mut self, job: Box<Job>) {
        self.next_arrival += 1;
        let seq = Sequence {
            arrival: self.next_arrival,
            tokens: job.prompt.clone(),
            blocks: Vec::new(),
            keys: Vec::new(),
            n_cached: 0,
            n_generated: 0,
            sampler: Sampler::new(job.sampling.clone()),
            decoder: StreamDecoder::default(),
            stop: StopMatcher::new(job.stop_sequences.clone()),
            t_first_token: None,
            t_last_token: None,
            draft: Vec::new(),
            draft_q: Vec::new(),
            draft_blocks: Vec::new(),
            draft_cached: 0,
            draft_len: crate::engine::speculative::DraftLength::new(self.settings.speculative.max_draft_tokens),
            job,
        };
        self.waiting[seq.job.priority as usize].push_back(seq);
    }

    /// Publishes the scheduler's state; called before any final event is
    /// sent, so a caller that sees its request end sees the engine without it.
    fn publish(&self) {
        let c = &self.counters;
        c.running.store(self.running.len(), Ordering::Relaxed);
        c.waiting.store(self.n_waiting(), Ordering::Relaxed);
        c.kv_blocks_used.store(self.pool.used(), Ordering::Relaxed);
        c.kv_blocks_cached.store(self.pool.cached(), Ordering::Relaxed);
        c.kv_blocks_pinned.store(self.pinned.len(), Ordering::Relaxed);
        c.kv_blocks_touched.store(self.pool.touched(), Ordering::Relaxed);
        c.prefix_queries.store(self.pool.queries, Ordering::Relaxed);
        c.prefix_hits.store(self.pool.hits, Ordering::Relaxed);
    }

    /// Drops waiting requests whose caller left or whose deadline passed
    /// (and background ones while a QoS policy sheds them), then moves
    /// waiting sequences into the batch, highest priority first, while the
    /// batch has room and the cache has blocks for their prompt.
    fn fill(&mut self) {
        let now = Instant::now();
        let shed = self.knobs.shed_background();
        let counters = &self.counters;
        for (p, q) in self.waiting.iter_mut().enumerate() {
            q.retain(|s| {
                if s.job.abandoned() {
                    return false;
                }
                if shed && p == Priority::Background as usize && s.job.queued.is_some() {
                    let _ = s.job.events.send(Event::Error(Knobs::shed_error()));
                    return false;
                }
                match s.job.deadline {
                    Some((at, ms)) if now >= at => {
                        counters.window.lock().unwrap().error(now_s(), false);
                        let _ = s.job.events.send(Event::Error(EngineError::Timeout(ms)));
                        false
                    }
                    _ => true,
                }
            });
        }
        // Deferred background requests stay queued; the batch may be smaller for now.
        let n_prio = if self.knobs.defer_background() { Priority::Background as usize } else { 3 };
        let max_batch = self.knobs.max_batch(self.settings.max_batch);
        while self.running.len() < max_batch {
            let Some(p) = (0..n_prio).find(|&p| !self.waiting[p].is_empty()) else { break };
            let mut s = self.waiting[p].pop_front().unwrap();
            s.reuse_prefix(&mut self.pool);
            // Room for the whole prompt and the first generated token: a
            // sequence admitted now is never preempted by its own prefill.
            if s.blocks_short(self.pool.block_size(), s.tokens.len() + 1) > self.pool.available() {
                s.release_blocks(&mut self.pool);
                self.waiting[p].push_front(s);
                break;
            }
            if s.job.queued.take().is_some() && s.job.prefix_cache {
                // First run (not a preempted one coming back).
                self.pool.queries += s.tokens.len() as u64;
                self.pool.hits += s.n_cached as u64;
            }
            self.running.push(s);
        }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut paused = false;
        loop {
            // Idle: block for work. Paused (nothing could run, e.g. every
            // consumer is behind): wait briefly. Busy: take what arrived, step.
            let first = if self.running.is_empty() && self.n_waiting() == 0 {
                match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                }
            } else if paused {
                match rx.recv_timeout(Duration::from_millis(2)) {
                    Ok(m) => Some(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => Some(Msg::Shutdown),
                }
            } else {
                None
            };
            let mut shutdown = false;
            for msg in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                match msg {
                    Msg::Job(j) => self.admit(j),
                    Msg::Drafter(d) => self.set_drafter(d),
                    Msg::Shutdown => shutdown = true,
                }
            }
            if shutdown {
                break;
            }
            self.fill();
            paused = !self.step();
            self.publish();
        }
        self.set_drafter(None);
        let mut all: Vec<Sequence> = self.running.drain(..).collect();
        all.extend(self.waiting.iter_mut().flat_map(|q| q.drain(..)));
        for s in all.iter_mut() {
            s.release_blocks(&mut self.pool);
        }
        for b in self.pinned.drain(..) {
            self.pool.release(b);
        }
        self.publish();
        for s in all {
            let _ = s.job.events.send(Event::Error(EngineError::Cancelled));
        }
    }

    /// One step: plan the batch, run it, apply the results (vLLM's
    /// schedule / execute / update split). Returns whether anything ran.
    fn step(&mut self) -> bool {
        let plan = match self.plan() {
            Ok(plan) => plan,
            Err(progressed) => return progressed,
        };
        #[cfg(test)]
        if self.counters.inject_failures.load(Ordering::Relaxed) > 0 {
            self.counters.inject_failures.fetch_sub(1, Ordering::Relaxed);
            self.apply(plan, Err(EngineError::Generation("injected failure".into())));
            return true;
        }
        let result = self.execute(&plan);
        self.apply(plan, result);
        true
    }

    /// Runs the planned batch through the model: every running sequence's
    /// blocks, then the prefetched ones'.
    /// The masks of constrained sequences that sample this step are computed
    /// beside it, on another pool thread (llguidance: tens to hundreds of
    /// microseconds per sequence).
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<f32>, EngineError> {
        let model = self.model.clone();
        let mut guides: Vec<&mut Guide> = Vec::new();
        let mut tables: Vec<&[BlockId]> = Vec::with_capacity(self.running.len() + plan.prefetch.len());
        for (i, s) in self.running.iter_mut().enumerate() {
            tables.push(s.blocks.as_slice());
            if let Some(g) = s.job.guide.as_mut().filter(|_| plan.batch.iter().any(|b| b.seq == i && b.logits)) {
                guides.push(g);
            }
        }
        tables.extend(plan.prefetch.iter().map(|s| s.blocks.as_slice()));
        if guides.is_empty() {
            return forward(model.as_ref(), &plan.batch, &mut self.kv, &tables);
        }
        let kv = &mut self.kv;
        rayon::join(|| forward(model.as_ref(), &plan.batch, kv, &tables), || guides.into_iter().for_each(Guide::prepare)).0
    }

    /// Applies a step's outcome: prefetched prompts go back to their queues
    /// (cached), a failure fails every running request, and otherwise each
    /// sequence's rows are sampled, its guesses verified and its tokens
    /// streamed.
    fn apply(&mut self, plan: StepPlan, result: Result<Vec<f32>, EngineError>) {
        let StepPlan { batch, prefetch } = plan;
        let failed = result.as_ref().err().cloned();
        // Prefetched prompts: their full blocks go into the prefix cache and
        // the sequences back to the front of their queues, holding nothing.
        let n_running = self.running.len();
        for mut s in prefetch.into_iter().rev() {
            if failed.is_none() {
                // `prefetch` computed exactly its blocks, each one full.
                s.n_cached = s.blocks.len() * self.pool.block_size();
                s.register_full_blocks(&mut self.pool);
            }
            s.release_blocks(&mut self.pool);
            self.waiting[s.job.priority as usize].push_front(s);
        }
        if let Some(e) = failed {
            self.fail_all(e);
            return;
        }
        let Ok(mut logits) = result else { unreachable!("failures returned above") };
        for bt in batch.iter().filter(|b| b.seq < n_running) {
            let s = &mut self.running[bt.seq];
            // Guessed positions count once verified (below).
            if bt.pos < s.tokens.len() {
                s.n_cached = s.n_cached.max(bt.pos + 1);
            }
        }
        for s in self.running.iter_mut() {
            s.register_full_blocks(&mut self.pool);
        }

        let vocab = self.model.config().vocab_size;
        let mut outcomes: Vec<Option<Outcome>> = (0..self.running.len()).map(|_| None).collect();
        // One logits row per entry that asked, in batch order; a sequence's
        // rows are adjacent: its next token, then one per guess.
        let mut rows = logits.chunks_exact_mut(vocab);
        let mut i = 0;
        while i < batch.len() {
            if !batch[i].logits {
                i += 1;
                continue;
            }
            let seq = batch[i].seq;
            let n = batch[i..].iter().take_while(|b| b.seq == seq && b.logits).count();
            let s = &mut self.running[seq];
            let draft = std::mem::take(&mut s.draft);
            let draft_q = std::mem::take(&mut s.draft_q);
            let first_guess_pos = s.tokens.len();
            let (mut out, mut used, mut kept) = (Outcome::Continue, 0, 0);
            for r in 0..n {
                let row = rows.next().expect("a logits row per entry that asked");
                used += 1;
                // Alternatives come from the model's own distribution, before sampling edits the row.
                let top = top_logprobs(row, s.job.top_logprobs);
                // A grammar leaves only the tokens it allows; the logprob
                // reported stays the model's own (the chosen token's logit
                // is not masked, so only the normaliser is kept, and the
                // logit itself where penalties will change it).
                // `min_tokens` bans the tokens that would end the output
                // early, as a mask does.
                let short = s.n_generated + r < s.job.min_tokens;
                let mut unmasked = None;
                if s.job.guide.is_some() || short {
                    let lse = crate::sampler::log_sum_exp(row);
                    let raw = s.sampler.penalizes().then(|| row.to_vec());
                    if short {
                        let ends = self.tokenizer.eog_ids.iter().filter(|_| !s.job.ignore_eos).chain(&s.job.stop_token_ids);
                        for &t in ends {
                            if let Some(l) = row.get_mut(t as usize) {
                                *l = f32::NEG_INFINITY;
                            }
                        }
                    }
                    if let Some(Err(e)) = s.job.guide.as_mut().map(|g| g.apply(row)) {
                        out = Outcome::Failed(EngineError::Grammar(format!("the output cannot continue: {e}")));
                        break;
                    }
                    unmasked = Some((lse, raw));
                }
                let sampled = match (draft_q.get(r), unmasked) {
                    // A draft model's guess: speculative sampling's rejection rule.
                    (Some(q), _) => {
                        let raw = s.sampler.penalizes().then(|| row.to_vec());
                        let p = s.sampler.distribution(row, &s.tokens);
                        let (u_keep, u_draw) = (s.sampler.uniform(), s.sampler.uniform());
                        let token = match crate::engine::speculative::accept_or_replace(&p, q, draft[r], u_keep, u_draw) {
                            Ok(()) => draft[r],
                            Err(t) => t,
                        };
                        Sampled { token, logprob: crate::sampler::logprob(raw.as_deref().unwrap_or(row), token) }
                    }
                    (None, Some((lse, raw))) => {
                        let token = s.sampler.pick(row, &s.tokens);
                        Sampled { token, logprob: raw.as_deref().unwrap_or(row)[token as usize] - lse }
                    }
                    (None, None) => s.sampler.sample(row, &s.tokens),
                };
                out = Self::emit(&self.tokenizer, &self.counters, &self.latency, s, sampled, top);
                // A guess counts when the token chosen before it equals it:
                // its keys and values were then computed from the right token
                // (and no tokens the grammar forced came in between).
                let in_place = s.tokens.len() == first_guess_pos + r + 1;
                if !(matches!(out, Outcome::Continue) && r < draft.len() && in_place && s.tokens.last() == Some(&draft[r])) {
                    break;
                }
                s.n_cached += 1;
                kept += 1;
            }
            for _ in used..n {
                rows.next();
            }
            // The draft's cache is right up to the last guess kept.
            s.draft_cached = s.draft_cached.min(first_guess_pos + kept as usize);
            if !draft_q.is_empty() {
                s.draft_len.update(draft_q.len(), kept as usize, self.settings.speculative.max_draft_tokens);
            }
            if !draft.is_empty() {
                self.counters.spec_drafted.fetch_add(draft.len() as u64, Ordering::Relaxed);
                self.counters.spec_accepted.fetch_add(kept, Ordering::Relaxed);
            }
            outcomes[seq] = Some(out);
            i += n;
        }
        let mut it = outcomes.into_iter();
        self.retire(|_| match it.next().flatten() {
            Some(Outcome::Continue) | None => None,
            other => other,
        });
    }
}

/// A step's batch: decode slots, guesses, prompt chunks, then prefetched
/// prompts, whose sequences (off their queues meanwhile) index past the
/// running ones.
struct StepPlan {
    batch: Vec<BatchToken>,
    prefetch: Vec<Sequence>,
}

/// One forward pass, run as a rayon job (this thread then waits once per
/// step instead of once per matmul, and the kernels' parallel loops start
/// from inside the pool), with a panic caught: a bug in one step fails that
/// step's requests, not the worker.
fn forward(model: &dyn Model, batch: &[BatchToken], kv: &mut KvStore, tables: &[&[BlockId]]) -> Result<Vec<f32>, EngineError> {
    match rayon::scope(|_| std::panic::catch_unwind(AssertUnwindSafe(|| model.forward(batch, kv, tables)))) {
        Ok(Ok(logits)) => Ok(logits),
        Ok(Err(e)) => Err(EngineError::Generation(e.to_string())),
        Err(_) => Err(EngineError::Internal("model forward panicked".into())),
    }
}
