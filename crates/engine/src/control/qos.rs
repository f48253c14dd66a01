//! QoS policy engine: policies from `runtime.yaml` (`qos.policies`) watch
//! live metrics over sliding windows and change the running engine:
//! throttle admission, shed or defer `background` requests, shrink the batch
//! or the concurrent-stream limit, and put everything back once healthy.
//!
//! Oscillation is guarded three ways: a policy is restored only after
//! `recoverAfter` consecutive evaluations past the threshold by the
//! `hysteresis` margin; a policy does not change state again within
//! `cooldownMs` of its last change; and at most `maxActionsPerMinute`
//! actions fire per minute across all policies (restoring is never capped,
//! so the engine cannot stay throttled because of the cap).
//!
//! The evaluator is a pure state machine over `(time, measurements)`; the
//! engine feeds it once per `evaluationIntervalMs` and applies the active
//! set of actions to [`Knobs`], which admission and the schedulers read.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use serde::Deserialize;

/// Seconds kept by the sliding windows (the longest allowed policy window).
pub const MAX_WINDOW_S: u64 = 600;
/// Samples kept per second per window (bounds memory under any load).
const MAX_SAMPLES_PER_S: usize = 4096;

/// Seconds since the process's first measurement: the windows' clock.
pub fn now_s() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

#[derive(Debug, Default, Clone)]
struct Bucket {
    sec: u64,
    ok: u64,
    errors: u64,
    failures: u64,
    tokens: u64,
    ttft_ms: Vec<f32>,
    e2e_ms: Vec<f32>,
}

/// Per-second outcomes of one model's requests over the last
/// [`MAX_WINDOW_S`] seconds.
#[derive(Debug, Default)]
pub struct Window {
    buckets: VecDeque<Bucket>,
}

impl Window {
    fn at(&mut self, sec: u64) -> &mut Bucket {
        if self.buckets.back().is_none_or(|b| b.sec < sec) {
            self.buckets.push_back(Bucket { sec, ..Default::default() });
            while self.buckets.front().is_some_and(|b| b.sec + MAX_WINDOW_S <= sec) {
                self.buckets.pop_front();
            }
        }
        // A clock read on another thread a moment earlier lands in the newest bucket.
        self.buckets.back_mut().unwrap()
    }

    pub fn ttft(&mut self, sec: u64, ms: f64) {
        let b = self.at(sec);
        if b.ttft_ms.len() < MAX_SAMPLES_PER_S {
            b.ttft_ms.push(ms as f32);
        }
    }

    /// A request that completed, with its end-to-end latency.
    pub fn ok(&mut self, sec: u64, e2e_ms: f64) {
        let b = self.at(sec);
        b.ok += 1;
        if b.e2e_ms.len() < MAX_SAMPLES_PER_S {
            b.e2e_ms.push(e2e_ms as f32);
        }
    }

    /// A request the engine ended with an error; `failure` when the model
    /// itself failed (a forward that errored or panicked), not a timeout.
    pub fn error(&mut self, sec: u64, failure: bool) {
        let b = self.at(sec);
        b.errors += 1;
        b.failures += failure as u64;
    }

    pub fn tokens(&mut self, sec: u64, n: u64) {
        self.at(sec).tokens += n;
    }

    /// Adds the last `window_s` seconds (up to `now`) into `into`.
    pub fn summarize(&self, now: u64, window_s: u64, into: &mut WindowSummary) {
        into.seconds = window_s;
        for b in self.buckets.iter().rev().take_while(|b| b.sec + window_s > now) {
            into.ok += b.ok;
            into.errors += b.errors;
            into.failures += b.failures;
            into.tokens += b.tokens;
            into.ttft_ms.extend_from_slice(&b.ttft_ms);
            into.e2e_ms.extend_from_slice(&b.e2e_ms);
        }
    }
}

/// Outcomes over a window, possibly of several models together.
#[derive(Debug, Default, Clone)]
pub struct WindowSummary {
    pub seconds: u64,
    pub ok: u64,
    pub errors: u64,
    pub failures: u64,
    pub tokens: u64,
    pub ttft_ms: Vec<f32>,
    pub e2e_ms: Vec<f32>,
}

/// Nearest-rank percentile (`q` in 0..=1) of unsorted samples.
pub fn percentile(samples: &[f32], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f32::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1] as f64)
}

impl WindowSummary {
    pub fn requests(&self) -> u64 {
        self.ok + self.errors
    }
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests() > 0).then(|| self.errors as f64 / self.requests() as f64)
    }
    pub fn failure_rate(&self) -> Option<f64> {
        (self.requests() > 0).then(|| self.failures as f64 / self.requests() as f64)
    }
    pub fn ttft_p95_ms(&self) -> Option<f64> {
        percentile(&self.ttft_ms, 0.95)
    }
    pub fn e2e_p95_ms(&self) -> Option<f64> {
        percentile(&self.e2e_ms, 0.95)
    }
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1) as f64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// P95 time to first token over the window, ms.
    TtftP95Ms,
    /// P95 end-to-end latency of completed requests over the window, ms.
    E2eP95Ms,
    /// Requests ended by an engine-side error (timeout, model failure) over
    /// requests ended, in the window.
    ErrorRate,
    /// Requests waiting to run now, all models.
    QueueDepth,
    /// Fraction of KV blocks referenced by sequences now, all models (0..1).
    KvUsage,
    /// Generated tokens per second over the window.
    ThroughputTps,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::TtftP95Ms => "ttft_p95_ms",
            Metric::E2eP95Ms => "e2e_p95_ms",
            Metric::ErrorRate => "error_rate",
            Metric::QueueDepth => "queue_depth",
            Metric::KvUsage => "kv_usage",
            Metric::ThroughputTps => "throughput_tps",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    #[default]
    Above,
    Below,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    #[default]
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Only the alert (every action raises one).
    Alert,
    /// Shrink the queue (`scheduler.maxQueuedRequests` x factor): more
    /// requests get `Overloaded` at once instead of waiting.
    ThrottleAdmission,
    /// Refuse new `background` requests and drop queued ones (`Overloaded`).
    ShedBackground,
    /// Keep `background` requests queued, not started, while active.
    DeferBackground,
    /// Sequences per forward step (`batching.maxBatchSize` x factor).
    ReduceBatch,
    /// Requests in flight per model (`streaming.maxConcurrentStreams` x factor).
    ReduceConcurrency,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Alert => "alert",
            Action::ThrottleAdmission => "throttle_admission",
            Action::ShedBackground => "shed_background",
            Action::DeferBackground => "defer_background",
            Action::ReduceBatch => "reduce_batch",
            Action::ReduceConcurrency => "reduce_concurrency",
        }
    }
}

fn default_window() -> u64 {
    30
}
fn default_factor() -> f64 {
    0.5
}
fn default_min_samples() -> u64 {
    10
}

/// One policy: when `metric` is `op` `threshold` over `windowSeconds`, do `action`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Policy {
    pub name: String,
    pub metric: Metric,
    #[serde(default)]
    pub op: Op,
    pub threshold: f64,
    #[serde(default = "default_window")]
    pub window_seconds: u64,
    #[serde(default)]
    pub severity: Severity,
    pub action: Action,
    /// How far the reduce/throttle actions scale their limit (0 < f <= 1).
    #[serde(default = "default_factor")]
    pub factor: f64,
    /// Observations the window needs before a latency or error-rate policy
    /// may fire (a single slow request is not a trend).
    #[serde(default = "default_min_samples")]
    pub min_samples: u64,
}

impl Policy {
    fn breached(&self, v: f64) -> bool {
        match self.op {
            Op::Above => v > self.threshold,
            Op::Below => v < self.threshold,
        }
    }
    /// Past the threshold on the healthy side by the hysteresis margin.
    fn healthy(&self, v: f64, hysteresis: f64) -> bool {
        let margin = hysteresis * self.threshold.abs();
        match self.op {
            Op::Above => v <= self.threshold - margin,
            Op::Below => v >= self.threshold + margin,
        }
    }
}

/// The evaluator's settings (`qos.*` in `runtime.yaml`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct QosSettings {
    pub enabled: bool,
    /// Decide and report, but leave the engine as it is (also set by the
    /// `qos_policy.dry_run` feature flag).
    pub dry_run: bool,
    pub evaluation_interval_ms: u64,
    pub cooldown_ms: u64,
    pub max_actions_per_minute: u32,
    pub recover_after: u32,
    pub hysteresis: f64,
    pub policies: Vec<Policy>,
    pub circuit_breaker: crate::control::config::CircuitBreakerConfig,
}

impl Default for QosSettings {
    fn default() -> Self {
        QosSettings {
            enabled: true,
            dry_run: false,
            evaluation_interval_ms: 1000,
            cooldown_ms: 10_000,
            max_actions_per_minute: 6,
            recover_after: 3,
            hysteresis: 0.1,
            policies: Vec::new(),
            circuit_breaker: Default::default(),
        }
    }
}

impl QosSettings {
    pub fn validate(&self) -> Result<(), String> {
        if !(10..=60_000).contains(&self.evaluation_interval_ms) {
            return Err(format!("qos.evaluationIntervalMs: must be 10 to 60000, got {}", self.evaluation_interval_ms));
        }
        if !(0.0..1.0).contains(&self.hysteresis) {
            return Err(format!("qos.hysteresis: must be at least 0 and below 1, got {}", self.hysteresis));
        }
        if self.recover_after == 0 {
            return Err("qos.recoverAfter: must be at least 1".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.policies.iter().enumerate() {
            let at = format!("qos.policies[{i}]");
            if p.name.is_empty() || !names.insert(p.name.as_str()) {
                return Err(format!("{at}.name: must be non-empty and unique, got '{}'", p.name));
            }
            if !p.threshold.is_finite() {
                return Err(format!("{at}.threshold: must be a finite number"));
            }
            if !(1..=MAX_WINDOW_S).contains(&p.window_seconds) {
                return Err(format!("{at}.windowSeconds: must be 1 to {MAX_WINDOW_S}, got {}", p.window_seconds));
            }
            if !(p.factor > 0.0 && p.factor <= 1.0) {
                return Err(format!("{at}.factor: must be above 0 and at most 1, got {}", p.factor));
            }
            if p.min_samples == 0 {
                return Err(format!("{at}.minSamples: must be at least 1"));
            }
        }
        Ok(())
    }
}

/// The live limits the actions change, read by admission and the schedulers.
/// Factors are per mille (1000: unchanged).
#[derive(Debug)]
pub struct Knobs {
    queue_pm: AtomicU32,
    streams_pm: AtomicU32,
    batch_pm: AtomicU32,
    shed_background: AtomicBool,
    defer_background: AtomicBool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            queue_pm: AtomicU32::new(1000),
            streams_pm: AtomicU32::new(1000),
            batch_pm: AtomicU32::new(1000),
            shed_background: AtomicBool::new(false),
            defer_background: AtomicBool::new(false),
        }
    }
}

fn scaled(limit: usize, pm: &AtomicU32) -> usize {
    let pm = pm.load(Ordering::Relaxed) as usize;
    (limit * pm / 1000).max(1)
}

impl Knobs {
    /// Sets every knob from the active actions; the strongest (smallest
    /// factor) of several policies with the same action wins.
    pub fn apply(&self, active: &[(Action, f64)]) {
        let pm = |a: Action| {
            active.iter().filter(|(x, _)| *x == a).map(|(_, f)| (f * 1000.0).round() as u32).min().unwrap_or(1000).max(1)
        };
        self.queue_pm.store(pm(Action::ThrottleAdmission), Ordering::Relaxed);
        self.streams_pm.store(pm(Action::ReduceConcurrency), Ordering::Relaxed);
        self.batch_pm.store(pm(Action::ReduceBatch), Ordering::Relaxed);
        self.shed_background.store(active.iter().any(|(a, _)| *a == Action::ShedBackground), Ordering::Relaxed);
        self.defer_background.store(active.iter().any(|(a, _)| *a == Action::DeferBackground), Ordering::Relaxed);
    }
    pub fn max_queued(&self, limit: usize) -> usize {
        scaled(limit, &self.queue_pm)
    }
    pub fn max_streams(&self, limit: usize) -> usize {
        scaled(limit, &self.streams_pm)
    }
    pub fn max_batch(&self, limit: usize) -> usize {
        scaled(limit, &self.batch_pm)
    }
    pub fn shed_background(&self) -> bool {
        self.shed_background.load(Ordering::Relaxed)
    }
    /// What a background request gets while `shed_background` holds.
    pub fn shed_error() -> crate::error::EngineError {
        crate::error::EngineError::Overloaded("background requests are being shed (a QoS policy is active)".into())
    }
    pub fn defer_background(&self) -> bool {
        self.defer_background.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Fired,
    Restored,
    /// Breached, but held back by the cooldown or the per-minute cap.
    Suppressed,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Fired => "fired",
            EventKind::Restored => "restored",
            EventKind::Suppressed => "suppressed",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct QosEvent {
    pub at_ms: u64,
    pub policy: String,
    pub kind: EventKind,
    pub severity: Severity,
    pub action: Action,
    pub metric: Metric,
    pub value: Option<f64>,
    pub threshold: f64,
    pub dry_run: bool,
    pub reason: String,
}

#[derive(Debug, Default)]
struct PolicyState {
    active: bool,
    healthy_streak: u32,
    last_change_ms: Option<u64>,
    /// A suppression was reported for the current breach already.
    suppressed: bool,
}

/// The policies' states; see the module comment for the rules.
#[derive(Debug, Default)]
pub struct Evaluator {
    states: HashMap<String, PolicyState>,
    /// When actions fired, for the per-minute cap.
    fired_at: VecDeque<u64>,
}

impl Evaluator {
    /// One evaluation at `now_ms`. `measure(metric, window_s, min_samples)`
    /// gives the metric's value, or `None` when the window has too few
    /// observations (no traffic counts as healthy).
    pub fn evaluate(
        &mut self,
        cfg: &QosSettings,
        now_ms: u64,
        dry_run: bool,
        mut measure: impl FnMut(Metric, u64, u64) -> Option<f64>,
    ) -> Vec<QosEvent> {
        let mut events = Vec::new();
        // Policies removed by a config reload let go of their actions.
        self.states.retain(|name, _| cfg.policies.iter().any(|p| &p.name == name));
        while self.fired_at.front().is_some_and(|&t| t + 60_000 <= now_ms) {
            self.fired_at.pop_front();
        }
        for p in &cfg.policies {
            let value = measure(p.metric, p.window_seconds, p.min_samples);
            let st = self.states.entry(p.name.clone()).or_default();
            let event = |kind, reason: String| QosEvent {
                at_ms: now_ms,
                policy: p.name.clone(),
                kind,
                severity: p.severity,
                action: p.action,
                metric: p.metric,
                value,
                threshold: p.threshold,
                dry_run,
                reason,
            };
            let cooling = st.last_change_ms.is_some_and(|t| now_ms < t + cfg.cooldown_ms);
            if !st.active {
                if !value.is_some_and(|v| p.breached(v)) {
                    st.suppressed = false;
                    continue;
                }
                let held = if cooling {
                    Some(format!("cooldown of {} ms since its last change", cfg.cooldown_ms))
                } else if self.fired_at.len() >= cfg.max_actions_per_minute as usize {
                    Some(format!("{} actions fired in the last minute (qos.maxActionsPerMinute)", self.fired_at.len()))
                } else {
                    None
                };
                match held {
                    Some(reason) => {
                        if !std::mem::replace(&mut st.suppressed, true) {
                            events.push(event(EventKind::Suppressed, reason));
                        }
                    }
                    None => {
                        st.active = true;
                        st.suppressed = false;
                        st.healthy_streak = 0;
                        st.last_change_ms = Some(now_ms);
                        self.fired_at.push_back(now_ms);
                        let op = if p.op == Op::Above { "above" } else { "below" };
                        events.push(event(EventKind::Fired, format!("{} {op} {}", p.metric.as_str(), p.threshold)));
                    }
                }
            } else {
                let healthy = value.is_none_or(|v| p.healthy(v, cfg.hysteresis));
                st.healthy_streak = if healthy { st.healthy_streak + 1 } else { 0 };
                if st.healthy_streak >= cfg.recover_after && !cooling {
                    st.active = false;
                    st.healthy_streak = 0;
                    st.last_change_ms = Some(now_ms);
                    events.push(event(
                        EventKind::Restored,
                        format!("healthy for {} evaluations", cfg.recover_after),
                    ));
                }
            }
        }
        events
    }

    /// Actions of the policies now active, with their factors.
    pub fn active(&self, cfg: &QosSettings) -> Vec<(Action, f64)> {
        cfg.policies
            .iter()
            .filter(|p| self.states.get(&p.name).is_some_and(|s| s.active))
            .map(|p| (p.action, p.factor))
            .collect()
    }

    pub fn active_policies(&self) -> Vec<String> {
        let mut v: Vec<String> = self.states.iter().filter(|(_, s)| s.active).map(|(n, _)| n.clone()).collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests;
