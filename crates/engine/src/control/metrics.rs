//! Latency histograms kept by the engine, with vLLM's definitions and bucket
//! edges so dashboards built for vLLM read ours unchanged:
//! - TTFT: submit to the first output token;
//! - ITL: between consecutive output tokens of one request;
//! - E2E: submit to the request's end.

use std::sync::Mutex;

/// Upper bucket edges in seconds, as in vLLM's `vllm:time_to_first_token_seconds`.
pub const TTFT_BUCKETS_S: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
    640.0, 2560.0,
];
/// As in vLLM's `vllm:inter_token_latency_seconds`.
pub const ITL_BUCKETS_S: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// As in vLLM's `vllm:e2e_request_latency_seconds`.
pub const E2E_BUCKETS_S: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0,
    7680.0,
];

/// A cumulative histogram (Prometheus semantics: bucket `i` counts values `<= edges[i]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub edges: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(edges: &'static [f64]) -> Self {
        Histogram { edges, counts: vec![0; edges.len()], sum: 0.0, count: 0 }
    }

    pub fn observe(&mut self, v: f64) {
        // Edges are sorted: every bucket from the first that holds `v` on counts it.
        let first = self.edges.partition_point(|&e| e < v);
        self.counts[first..].iter_mut().for_each(|c| *c += 1);
        self.sum += v;
        self.count += 1;
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Histograms {
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
}

impl Default for Histograms {
    fn default() -> Self {
        Histograms { ttft: Histogram::new(TTFT_BUCKETS_S), itl: Histogram::new(ITL_BUCKETS_S), e2e: Histogram::new(E2E_BUCKETS_S) }
    }
}

/// Shared by the engine and its model workers.
#[derive(Debug, Default)]
pub struct LatencyMetrics(Mutex<Histograms>);

impl LatencyMetrics {
    pub fn record(&self, f: impl FnOnce(&mut Histograms)) {
        f(&mut self.0.lock().unwrap());
    }

    pub fn snapshot(&self) -> Histograms {
        self.0.lock().unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_edges_inclusive() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 3.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, [2, 3]);
        assert_eq!(h.count, 4);
        assert!((h.sum - 3.65).abs() < 1e-12);
    }

    #[test]
    fn vllm_edges_are_sorted() {
        for e in [TTFT_BUCKETS_S, ITL_BUCKETS_S, E2E_BUCKETS_S] {
            assert!(e.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
