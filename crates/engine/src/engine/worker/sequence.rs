//! A request's state inside the worker: tokens, blocks, sampler, guesses.

use super::super::*;

/// State of one request inside the worker.
pub(super) struct Sequence {
    pub(super) job: Box<Job>,
    /// Admission order: ties within a priority go to the earliest.
    pub(super) arrival: u64,
    /// Prompt then generated tokens.
    pub(super) tokens: Vec<u32>,
    /// Block table: the KV cache blocks of positions `0..n_cached`, and room
    /// for the positions being computed this step.
    pub(super) blocks: Vec<BlockId>,
    /// Prefix-cache keys of the full blocks at the front of `blocks`.
    pub(super) keys: Vec<u64>,
    /// Positions whose keys and values are in `blocks`.
    pub(super) n_cached: usize,
    pub(super) n_generated: usize,
    pub(super) sampler: Sampler,
    pub(super) decoder: StreamDecoder,
    pub(super) stop: StopMatcher,
    pub(super) t_first_token: Option<Instant>,
    pub(super) t_last_token: Option<Instant>,
    /// Guessed next tokens riding along this step (speculative decoding).
    pub(super) draft: Vec<u32>,
    /// With a draft model: the distribution each guess was drawn from.
    pub(super) draft_q: Vec<Vec<(u32, f32)>>,
    /// The draft model's cache blocks for this sequence, holding positions
    /// `0..draft_cached` of `tokens`.
    pub(super) draft_blocks: Vec<BlockId>,
    pub(super) draft_cached: usize,
    /// How many guesses the draft model makes, and when it pauses.
    pub(super) draft_len: crate::engine::speculative::DraftLength,
}

impl Sequence {
    /// Tokens still to run through the model before the next one is sampled
    /// (the whole prompt at first, then 1 per step; more after preemption).
    pub(super) fn pending(&self) -> usize {
        self.tokens.len() - self.n_cached
    }

    pub(super) fn salt_key(&self, pool: &BlockPool) -> u64 {
        pool.salt_key(self.job.cache_salt.as_deref())
    }

    pub(super) fn release_blocks(&mut self, pool: &mut BlockPool) {
        for b in self.blocks.drain(..) {
            pool.release(b);
        }
        self.keys.clear();
        self.n_cached = 0;
    }

    /// Takes the cached blocks of the longest prefix found in the prefix
    /// cache. At least one token is always left to compute, since sampling
    /// needs its logits.
    pub(super) fn reuse_prefix(&mut self, pool: &mut BlockPool) {
        if !self.job.prefix_cache {
            return;
        }
        let bs = pool.block_size();
        let mut prev = self.salt_key(pool);
        for chunk in self.tokens[..self.tokens.len() - 1].chunks_exact(bs) {
            let key = pool.key(prev, chunk);
            let Some(b) = pool.lookup(key) else { break };
            self.blocks.push(b);
            self.keys.push(key);
            prev = key;
        }
        self.n_cached = self.blocks.len() * bs;
    }

    /// Blocks still needed to hold `n_positions` positions.
    pub(super) fn blocks_short(&self, bs: usize, n_positions: usize) -> usize {
        n_positions.div_ceil(bs).saturating_sub(self.blocks.len())
    }

    /// Allocates the blocks to hold `n_positions` positions; the caller has
    /// checked that the pool has them.
    pub(super) fn grow(&mut self, pool: &mut BlockPool, n_positions: usize) {
        for _ in 0..self.blocks_short(pool.block_size(), n_positions) {
            self.blocks.push(pool.allocate().expect("blocks are counted before they are allocated"));
        }
    }

    /// Makes the blocks that became full findable in the prefix cache.
    pub(super) fn register_full_blocks(&mut self, pool: &mut BlockPool) {
        if !self.job.prefix_cache {
            return;
        }
        let bs = pool.block_size();
        while self.keys.len() < self.n_cached / bs {
            let i = self.keys.len();
            let prev = self.keys.last().copied().unwrap_or_else(|| self.salt_key(pool));
            let key = pool.key(prev, &self.tokens[i * bs..(i + 1) * bs]);
            pool.register(self.blocks[i], key);
            self.keys.push(key);
        }
    }
}
