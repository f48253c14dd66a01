//! The engine handle: construction from files, config reload, counters,
//! shutdown.

use std::sync::Arc;

use mlx_serving_engine::control::config::ConfigSource;
use mlx_serving_engine::engine::EngineOptions;
use mlx_serving_engine::Engine;
use napi_derive::napi;

use crate::{blocking, js_error, Coded, Result};

#[napi]
pub struct NativeEngine {
    pub(crate) inner: Arc<Engine>,
}

/// Settings of a reload that apply only to models loaded afterwards.
#[napi(object)]
pub struct NativeConfigReload {
    pub applies_on_next_load: Vec<String>,
}

#[napi(object)]
pub struct NativeEngineOptions {
    /// A `runtime.yaml`; defaults apply without one.
    pub config_path: Option<String>,
    /// Overrides `streaming.maxConcurrentStreams` (the CLI's `--max-concurrent`).
    pub max_concurrent_streams: Option<u32>,
    /// A `feature-flags.yaml`: requests then consult its flags.
    pub feature_flags_path: Option<String>,
}

#[napi(object)]
pub struct NativeEngineStats {
    pub models: u32,
    pub running: u32,
    pub waiting: u32,
    pub completed: f64,
    pub generated_tokens: f64,
    pub kv_blocks_total: f64,
    pub kv_blocks_used: f64,
    pub kv_blocks_cached: f64,
    pub kv_blocks_pinned: f64,
    pub kv_bytes: f64,
    pub kv_bytes_touched: f64,
    pub prefix_cache_queries: f64,
    pub prefix_cache_hits: f64,
    pub preemptions: f64,
    /// Speculative decoding: guessed tokens checked, and kept.
    pub spec_drafted: f64,
    pub spec_accepted: f64,
    /// KV prefetch: prompt tokens computed for requests still waiting.
    pub prefetched_tokens: f64,
    pub breakers_open: u32,
    pub breaker_transitions: f64,
}

/// A cumulative histogram: `counts[i]` values were `<= edges[i]` seconds.
#[napi(object)]
pub struct NativeHistogram {
    pub edges: Vec<f64>,
    pub counts: Vec<f64>,
    pub sum: f64,
    pub count: f64,
}

impl From<&mlx_serving_engine::control::metrics::Histogram> for NativeHistogram {
    fn from(h: &mlx_serving_engine::control::metrics::Histogram) -> Self {
        NativeHistogram {
            edges: h.edges.to_vec(),
            counts: h.counts.iter().map(|&c| c as f64).collect(),
            sum: h.sum,
            count: h.count as f64,
        }
    }
}

#[napi(object)]
pub struct NativeLatencyHistograms {
    pub ttft: NativeHistogram,
    pub itl: NativeHistogram,
    #[napi(js_name = "e2e")]
    pub e2e: NativeHistogram,
}

#[napi]
impl NativeEngine {
    #[napi(constructor)]
    pub fn new(options: Option<NativeEngineOptions>) -> Result<Self> {
        let o = options.unwrap_or(NativeEngineOptions { config_path: None, max_concurrent_streams: None, feature_flags_path: None });
        let options = EngineOptions {
            config: ConfigSource { path: o.config_path.map(Into::into), max_concurrent_streams: o.max_concurrent_streams.map(|m| m as usize) },
            feature_flags_path: o.feature_flags_path.map(Into::into),
        };
        Ok(NativeEngine { inner: Arc::new(Engine::open(options).map_err(js_error)?) })
    }

    /// Re-reads the runtime config file. An unreadable or invalid file
    /// changes nothing and the error names the key; a valid one applies at
    /// once, except the settings listed, which apply to models loaded later.
    #[napi]
    pub fn reload_config(&self) -> Result<NativeConfigReload> {
        let later = self.inner.reload_config_file().map_err(js_error)?;
        Ok(NativeConfigReload { applies_on_next_load: later.into_iter().map(String::from).collect() })
    }

    #[napi]
    pub fn stats(&self) -> NativeEngineStats {
        let s = self.inner.stats();
        NativeEngineStats {
            models: s.n_models as u32,
            running: s.n_running as u32,
            waiting: s.n_waiting as u32,
            completed: s.n_completed as f64,
            generated_tokens: s.n_generated_tokens as f64,
            kv_blocks_total: s.kv_blocks_total as f64,
            kv_blocks_used: s.kv_blocks_used as f64,
            kv_blocks_cached: s.kv_blocks_cached as f64,
            kv_blocks_pinned: s.kv_blocks_pinned as f64,
            kv_bytes_touched: s.kv_bytes_touched as f64,
            kv_bytes: s.kv_bytes as f64,
            prefix_cache_queries: s.prefix_cache_queries as f64,
            prefix_cache_hits: s.prefix_cache_hits as f64,
            preemptions: s.n_preemptions as f64,
            spec_drafted: s.n_spec_drafted as f64,
            spec_accepted: s.n_spec_accepted as f64,
            prefetched_tokens: s.n_prefetched_tokens as f64,
            breakers_open: s.n_breakers_open as u32,
            breaker_transitions: s.n_breaker_transitions as f64,
        }
    }

    /// TTFT, inter-token and end-to-end latency histograms (vLLM's bucket edges).
    #[napi]
    pub fn latency_histograms(&self) -> NativeLatencyHistograms {
        let h = self.inner.latency_histograms();
        NativeLatencyHistograms { ttft: (&h.ttft).into(), itl: (&h.itl).into(), e2e: (&h.e2e).into() }
    }

    /// Stops every model; running requests end with `Cancelled`.
    #[napi]
    pub async fn shutdown(&self) -> Coded<()> {
        let e = self.inner.clone();
        Coded::of(blocking(move || {
            e.shutdown();
            Ok(())
        }))
        .await
    }
}
