//! What the engine reports about itself: the gauges of the loaded models
//! and counters that never go back, unloaded models' counts included.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{breaker, Engine, Worker};

#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub n_models: usize,
    pub n_running: usize,
    pub n_waiting: usize,
    /// Bytes of KV blocks referenced by sequences.
    pub kv_bytes: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_cached: usize,
    /// Blocks of pinned prefixes (counted in `kv_blocks_used` too).
    pub kv_blocks_pinned: usize,
    /// Bytes of KV blocks written at least once (resident memory of the pools).
    pub kv_bytes_touched: usize,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub n_preemptions: u64,
    pub n_spec_drafted: u64,
    pub n_spec_accepted: u64,
    pub n_prefetched_tokens: u64,
    pub n_completed: u64,
    pub n_generated_tokens: u64,
    /// Models whose circuit breaker is open or half-open.
    pub n_breakers_open: usize,
    pub n_breaker_transitions: u64,
}

/// The monotonic counters of `EngineStats`.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Totals(pub(super) [u64; 9]);

impl Totals {
    pub(super) fn of(w: &Worker) -> Totals {
        let c = &w.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Totals([
            l(&c.prefix_queries),
            l(&c.prefix_hits),
            l(&c.preemptions),
            l(&c.spec_drafted),
            l(&c.spec_accepted),
            l(&c.prefetched_tokens),
            l(&c.completed),
            l(&c.generated_tokens),
            w.breaker.transitions(),
        ])
    }

    pub(super) fn add(&mut self, o: &Totals) {
        self.0.iter_mut().zip(o.0).for_each(|(a, b)| *a += b);
    }

    fn add_to(&self, s: &mut EngineStats) {
        let [q, h, p, d, a, f, c, g, t] = self.0;
        s.prefix_cache_queries += q;
        s.prefix_cache_hits += h;
        s.n_preemptions += p;
        s.n_spec_drafted += d;
        s.n_spec_accepted += a;
        s.n_prefetched_tokens += f;
        s.n_completed += c;
        s.n_generated_tokens += g;
        s.n_breaker_transitions += t;
    }
}

impl EngineStats {
    /// Fraction of KV blocks referenced by sequences (vLLM's `kv_cache_usage_perc`, 0..1).
    pub fn kv_usage(&self) -> f64 {
        if self.kv_blocks_total == 0 {
            0.0
        } else {
            self.kv_blocks_used as f64 / self.kv_blocks_total as f64
        }
    }
}

impl Engine {
    pub fn stats(&self) -> EngineStats {
        let models = self.shared.models.lock().unwrap();
        let mut s = EngineStats { n_models: models.len(), ..Default::default() };
        for w in models.values() {
            s.n_running += w.counters.running.load(Ordering::Relaxed);
            s.n_waiting += w.counters.waiting.load(Ordering::Relaxed);
            let c = &w.counters;
            let used = c.kv_blocks_used.load(Ordering::Relaxed);
            s.kv_bytes += used * c.kv_block_bytes.load(Ordering::Relaxed);
            s.kv_blocks_used += used;
            s.kv_blocks_total += c.kv_blocks_total.load(Ordering::Relaxed);
            s.kv_blocks_cached += c.kv_blocks_cached.load(Ordering::Relaxed);
            s.kv_blocks_pinned += c.kv_blocks_pinned.load(Ordering::Relaxed);
            s.kv_bytes_touched += c.kv_blocks_touched.load(Ordering::Relaxed) * c.kv_block_bytes.load(Ordering::Relaxed);
            s.n_breakers_open += (w.breaker.state() != breaker::BreakerState::Closed) as usize;
            Totals::of(w).add_to(&mut s);
        }
        self.shared.retired.lock().unwrap().add_to(&mut s);
        s
    }

    /// Moves the counts of a worker leaving the model table into the
    /// engine's totals (called under the table's lock, so that `stats`
    /// never sees them missing): counters never go back.
    pub(super) fn retire(&self, w: &Worker) -> Totals {
        let counted = Totals::of(w);
        self.shared.retired.lock().unwrap().add(&counted);
        counted
    }

    /// Stops a retired worker; what it counted meanwhile joins the totals.
    pub(super) fn stop_worker(&self, w: &Worker, counted: Totals) {
        w.stop();
        let mut late = Totals::of(w);
        late.0.iter_mut().zip(counted.0).for_each(|(a, b)| *a -= b);
        self.shared.retired.lock().unwrap().add(&late);
    }
}
