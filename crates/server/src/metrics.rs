//! Serving metrics: Prometheus text with vLLM's metric names (so existing
//! dashboards work) plus `mlx_serving_*`, and rolling values for the live
//! dashboard.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mlx_serving_engine::engine::{CanaryStatus, EngineStats, QosStatus};
use mlx_serving_engine::control::metrics::{Histogram, Histograms};
use serde::Serialize;

/// How far back the dashboard's rolling values look.
const WINDOW: Duration = Duration::from_secs(60);

fn render_histogram(out: &mut String, h: &Histogram, name: &str, help: &str, labels: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (c, b) in h.counts.iter().zip(h.edges) {
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {c}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
}

struct Finished {
    at: Instant,
    ttft_s: f64,
    ok: bool,
}

#[derive(Default)]
struct Inner {
    prompt_tokens: u64,
    generation_tokens: u64,
    finished_stop: u64,
    finished_length: u64,
    /// Clients that left before the end (their generations were cancelled).
    aborted: u64,
    failed: u64,
    rejected: u64,
    bad_requests: u64,
    recent: VecDeque<Finished>,
    /// (time, engine's generated-token counter), sampled for tokens/s.
    token_samples: VecDeque<(Instant, u64)>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// One instant of the dashboard's series.
#[derive(Serialize, Debug, Default)]
pub struct Snapshot {
    pub ttft_p95_ms: Option<f64>,
    pub tokens_per_s: f64,
    pub running: usize,
    pub waiting: usize,
    /// Share of the paged KV cache's blocks held by sequences, percent.
    pub kv_usage_pct: f64,
    /// Share of prompt tokens found in the prefix cache since start, percent.
    pub prefix_hit_pct: f64,
    pub error_rate: f64,
    pub requests_per_min: usize,
    pub models: usize,
}

impl Metrics {
    pub fn request_done(&self, prompt_tokens: usize, generated: usize, ttft_s: f64, stopped: bool) {
        let mut m = self.inner.lock().unwrap();
        m.prompt_tokens += prompt_tokens as u64;
        m.generation_tokens += generated as u64;
        if stopped {
            m.finished_stop += 1;
        } else {
            m.finished_length += 1;
        }
        m.recent.push_back(Finished { at: Instant::now(), ttft_s, ok: true });
    }

    pub fn request_failed(&self) {
        let mut m = self.inner.lock().unwrap();
        m.failed += 1;
        m.recent.push_back(Finished { at: Instant::now(), ttft_s: f64::NAN, ok: false });
    }

    pub fn request_aborted(&self) {
        self.inner.lock().unwrap().aborted += 1;
    }

    pub fn rejected(&self) {
        self.inner.lock().unwrap().rejected += 1;
    }

    pub fn bad_request(&self) {
        self.inner.lock().unwrap().bad_requests += 1;
    }

    /// Records the engine's token counter; called about once a second.
    pub fn sample(&self, stats: &EngineStats) {
        let mut m = self.inner.lock().unwrap();
        let now = Instant::now();
        m.token_samples.push_back((now, stats.n_generated_tokens));
        while m.token_samples.front().is_some_and(|s| now - s.0 > Duration::from_secs(15)) {
            m.token_samples.pop_front();
        }
        while m.recent.front().is_some_and(|r| now - r.at > WINDOW) {
            m.recent.pop_front();
        }
    }

    pub fn snapshot(&self, stats: &EngineStats, running: usize) -> Snapshot {
        let waiting = stats.n_waiting;
        let m = self.inner.lock().unwrap();
        let now = Instant::now();
        let recent: Vec<&Finished> = m.recent.iter().filter(|r| now - r.at <= WINDOW).collect();
        let mut ttfts: Vec<f64> = recent.iter().filter(|r| r.ok).map(|r| r.ttft_s * 1e3).collect();
        ttfts.sort_by(f64::total_cmp);
        // Nearest-rank P95.
        let ttft_p95_ms = (!ttfts.is_empty()).then(|| ttfts[((ttfts.len() as f64 * 0.95).ceil() as usize).max(1) - 1]);
        let errors = recent.iter().filter(|r| !r.ok).count();
        let tokens_per_s = match (m.token_samples.front(), m.token_samples.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64(),
            _ => 0.0,
        };
        Snapshot {
            ttft_p95_ms,
            tokens_per_s,
            running,
            waiting,
            kv_usage_pct: stats.kv_usage() * 100.0,
            prefix_hit_pct: if stats.prefix_cache_queries == 0 {
                0.0
            } else {
                stats.prefix_cache_hits as f64 * 100.0 / stats.prefix_cache_queries as f64
            },
            error_rate: if recent.is_empty() { 0.0 } else { errors as f64 / recent.len() as f64 },
            requests_per_min: recent.len(),
            models: stats.n_models,
        }
    }

    /// `flags`: requests per (gated feature, on) from the engine.
    #[allow(clippy::too_many_arguments)]
    pub fn render(
        &self,
        replica: &str,
        stats: &EngineStats,
        hist: &Histograms,
        flags: &[(String, bool, u64)],
        qos: &QosStatus,
        canary: Option<&CanaryStatus>,
        model: &str,
        running: usize,
    ) -> String {
        let m = self.inner.lock().unwrap();
        // Every series carries the replica, so a fleet's metrics add up by label.
        let l = format!("model_name=\"{}\",replica=\"{replica}\"", model.replace(['"', '\\', '\n'], "_"));
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, series: &[(&str, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (extra, v) in series {
                let labels = if extra.is_empty() { l.clone() } else { format!("{l},{extra}") };
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        };
        metric("vllm:num_requests_running", "gauge", "Requests being generated.", &[("", running as f64)]);
        metric("vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled.", &[("", stats.n_waiting as f64)]);
        metric("vllm:prompt_tokens_total", "counter", "Prompt tokens processed.", &[("", m.prompt_tokens as f64)]);
        metric("vllm:generation_tokens_total", "counter", "Tokens generated.", &[("", stats.n_generated_tokens as f64)]);
        metric(
            "vllm:request_success_total",
            "counter",
            "Requests finished successfully.",
            &[
                ("finished_reason=\"stop\"", m.finished_stop as f64),
                ("finished_reason=\"length\"", m.finished_length as f64),
                ("finished_reason=\"abort\"", m.aborted as f64),
            ],
        );
        metric("mlx_serving_requests_failed_total", "counter", "Requests that ended in an error.", &[("", m.failed as f64)]);
        metric("mlx_serving_requests_rejected_total", "counter", "Requests refused with 429 (overloaded).", &[("", m.rejected as f64)]);
        metric("mlx_serving_bad_requests_total", "counter", "Requests refused with 4xx for bad input.", &[("", m.bad_requests as f64)]);
        metric("mlx_serving_models_loaded", "gauge", "Models loaded in the engine.", &[("", stats.n_models as f64)]);
        metric("mlx_serving_kv_cache_bytes", "gauge", "Bytes of KV cache blocks held by sequences.", &[("", stats.kv_bytes as f64)]);
        // The pools are allocated lazily and keep what they touched (the
        // prefix cache): resident memory grows with this, which is not a leak.
        metric("mlx_serving_kv_cache_touched_bytes", "gauge", "Bytes of KV cache pool memory written so far (resident).", &[("", stats.kv_bytes_touched as f64)]);
        metric("vllm:kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use (0-1).", &[("", stats.kv_usage())]);
        metric("vllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", &[("", stats.prefix_cache_queries as f64)]);
        metric("vllm:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", &[("", stats.prefix_cache_hits as f64)]);
        metric("vllm:num_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.", &[("", stats.n_preemptions as f64)]);
        metric("vllm:spec_decode_num_draft_tokens_total", "counter", "Speculative tokens guessed and checked.", &[("", stats.n_spec_drafted as f64)]);
        metric("vllm:spec_decode_num_accepted_tokens_total", "counter", "Speculative tokens kept.", &[("", stats.n_spec_accepted as f64)]);
        metric("mlx_serving_circuit_breakers_open", "gauge", "Models whose circuit breaker is open or half-open.", &[("", stats.n_breakers_open as f64)]);
        metric("mlx_serving_circuit_breaker_transitions_total", "counter", "Circuit breaker state changes.", &[("", stats.n_breaker_transitions as f64)]);
        let flag_series: Vec<(String, f64)> =
            flags.iter().map(|(f, on, n)| (format!("feature=\"{f}\",enabled=\"{on}\""), *n as f64)).collect();
        let flag_refs: Vec<(&str, f64)> = flag_series.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric("mlx_serving_feature_flag_requests_total", "counter", "Requests per gated Phase 5 feature, on and off.", &flag_refs);
        let qos_events: Vec<(String, f64)> =
            qos.event_counts.iter().map(|(p, k, n)| (format!("policy=\"{}\",kind=\"{k}\"", p.replace(['"', '\\', '\n'], "_")), *n as f64)).collect();
        let qos_refs: Vec<(&str, f64)> = qos_events.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric("mlx_serving_qos_enabled", "gauge", "1 when QoS policies are evaluated (0.5: dry run only).", &[("", if !qos.enabled { 0.0 } else if qos.dry_run { 0.5 } else { 1.0 })]);
        metric("mlx_serving_qos_active_policies", "gauge", "QoS policies whose action is in force.", &[("", qos.active_policies.len() as f64)]);
        metric("mlx_serving_qos_events_total", "counter", "QoS policy events (fired, restored, suppressed).", &qos_refs);
        metric("mlx_serving_qos_max_concurrent_streams", "gauge", "Requests in flight allowed per model now.", &[("", qos.max_concurrent_streams as f64)]);
        metric("mlx_serving_qos_max_batch_size", "gauge", "Sequences per forward step allowed now.", &[("", qos.max_batch_size as f64)]);
        metric("mlx_serving_qos_max_queued_requests", "gauge", "Queued requests allowed per model now.", &[("", qos.max_queued_requests as f64)]);
        metric("mlx_serving_qos_shedding_background", "gauge", "1 while background requests are refused.", &[("", qos.shedding_background as u8 as f64)]);
        if let Some(c) = canary {
            metric("mlx_serving_canary_percent", "gauge", "Share of the canary's traffic on the candidate.", &[("", c.percent)]);
            let state = format!("state=\"{}\"", c.state);
            metric("mlx_serving_canary_state", "gauge", "The canary's state (running, promoted, rolled_back).", &[(state.as_str(), 1.0)]);
            let tr: Vec<(String, f64)> = c.transitions.iter().map(|(k, n)| (format!("kind=\"{k}\""), *n as f64)).collect();
            let tr_refs: Vec<(&str, f64)> = tr.iter().map(|(l, v)| (l.as_str(), *v)).collect();
            metric("mlx_serving_canary_transitions_total", "counter", "Canary transitions (started, advanced, promoted, rolled_back).", &tr_refs);
            let (b, k) = (&c.baseline_stats, &c.candidate_stats);
            metric("mlx_serving_canary_stage_requests", "gauge", "Requests per arm in the current stage.", &[("arm=\"baseline\"", b.requests as f64), ("arm=\"candidate\"", k.requests as f64)]);
            metric("mlx_serving_canary_stage_errors", "gauge", "Errors per arm in the current stage.", &[("arm=\"baseline\"", b.errors as f64), ("arm=\"candidate\"", k.errors as f64)]);
        }
        render_histogram(&mut out, &hist.ttft, "vllm:time_to_first_token_seconds", "Time to first token.", &l);
        render_histogram(&mut out, &hist.itl, "vllm:inter_token_latency_seconds", "Time between consecutive output tokens.", &l);
        render_histogram(&mut out, &hist.e2e, "vllm:e2e_request_latency_seconds", "End-to-end request latency.", &l);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_and_rolling_values() {
        let m = Metrics::default();
        m.request_done(10, 5, 0.03, true);
        m.request_done(10, 7, 0.3, false);
        m.request_failed();
        m.request_aborted();
        let stats = EngineStats { n_models: 1, n_generated_tokens: 12, kv_blocks_total: 4, kv_blocks_used: 1, kv_bytes_touched: 49152, ..Default::default() };
        let mut hist = Histograms::default();
        hist.ttft.observe(0.03);
        hist.ttft.observe(0.3);
        let flags = [("ttft_pipeline.kv_prefetch".to_string(), true, 3)];
        let qos = QosStatus { enabled: true, event_counts: vec![("slow".into(), "fired".into(), 2)], ..Default::default() };
        let text = m.render("r1", &stats, &hist, &flags, &qos, None, "default", 0);
        assert!(text.contains("mlx_serving_qos_events_total{model_name=\"default\",replica=\"r1\",policy=\"slow\",kind=\"fired\"} 2"));
        assert!(text.contains("mlx_serving_feature_flag_requests_total{model_name=\"default\",replica=\"r1\",feature=\"ttft_pipeline.kv_prefetch\",enabled=\"true\"} 3"));
        assert!(text.contains("vllm:kv_cache_usage_perc{model_name=\"default\",replica=\"r1\"} 0.25"));
        assert!(text.contains("mlx_serving_kv_cache_touched_bytes{model_name=\"default\",replica=\"r1\"} 49152"));
        assert!(text.contains("vllm:generation_tokens_total{model_name=\"default\",replica=\"r1\"} 12"));
        assert!(text.contains("vllm:time_to_first_token_seconds_bucket{model_name=\"default\",replica=\"r1\",le=\"0.04\"} 1"));
        assert!(text.contains("vllm:time_to_first_token_seconds_count{model_name=\"default\",replica=\"r1\"} 2"));
        assert!(text.contains("finished_reason=\"length\"} 1"));
        assert!(text.contains("finished_reason=\"abort\"} 1"));
        let s = m.snapshot(&stats, 0);
        assert_eq!(s.ttft_p95_ms, Some(300.0));
        assert!((s.error_rate - 1.0 / 3.0).abs() < 1e-9);
    }
}
