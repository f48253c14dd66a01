//! The engine's control plane: one thread, started with the first model,
//! that every `qos.evaluationIntervalMs` evaluates the QoS policies against
//! the models' recent outcomes and applies their actions to the knobs, and
//! judges a running canary (rollback triggers, scheduled stages). Also the
//! live reload of `runtime.yaml`.

use std::collections::BTreeMap;

use super::*;
use crate::control::canary::{Arm, ArmStats, Canary, CanaryConfig, CanaryEvent, State};
use crate::control::qos::{self, Evaluator, Metric, QosEvent, WindowSummary, MAX_WINDOW_S};

/// Events kept for the binding to collect; older ones are dropped first.
const MAX_EVENTS: usize = 1024;

/// A decision of the control plane, for logs, events and dashboards.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlEvent {
    Qos(QosEvent),
    Canary(CanaryEvent),
}

#[derive(Debug, Default)]
pub(super) struct ControlState {
    evaluator: Evaluator,
    events: VecDeque<ControlEvent>,
    /// QoS events per (policy, kind) since start.
    qos_counts: BTreeMap<(String, &'static str), u64>,
    /// Whether the policies were enforced / dry-run at the last evaluation.
    qos_enabled: bool,
    qos_dry_run: bool,
    canary: Option<Canary>,
    canary_counts: BTreeMap<&'static str, u64>,
}

impl ControlState {
    /// The model a request for `model` goes to while a canary owns that name.
    /// Whether `model` is the name of the canary in force.
    pub(super) fn routes(&self, model: &str) -> bool {
        self.canary.as_ref().is_some_and(|c| c.cfg.name == model)
    }

    pub(super) fn route(&self, model: &str, request_id: &str) -> Option<(String, Arm)> {
        let c = self.canary.as_ref()?;
        if c.cfg.name != model {
            return None;
        }
        let arm = c.route(request_id);
        Some((c.model(arm).to_owned(), arm))
    }

    fn push(&mut self, e: ControlEvent) {
        match &e {
            ControlEvent::Qos(q) => *self.qos_counts.entry((q.policy.clone(), q.kind.as_str())).or_default() += 1,
            ControlEvent::Canary(c) => *self.canary_counts.entry(c.kind).or_default() += 1,
        }
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }
}

/// The policy engine's state, for metrics and dashboards.
#[derive(Debug, Clone, Default)]
pub struct QosStatus {
    pub enabled: bool,
    pub dry_run: bool,
    pub active_policies: Vec<String>,
    /// Limits in force now (after any action): per model.
    pub max_concurrent_streams: usize,
    pub max_queued_requests: usize,
    pub max_batch_size: usize,
    pub shedding_background: bool,
    pub deferring_background: bool,
    /// Events per (policy, kind) since start.
    pub event_counts: Vec<(String, String, u64)>,
}

#[derive(Debug, Clone)]
pub struct CanaryStatus {
    pub name: String,
    pub baseline: String,
    pub candidate: String,
    pub state: String,
    /// Why it rolled back.
    pub reason: Option<String>,
    pub percent: f64,
    pub stages: Vec<f64>,
    /// The arms over the current stage.
    pub baseline_stats: ArmStats,
    pub candidate_stats: ArmStats,
    pub transitions: Vec<(String, u64)>,
}

pub(super) struct ControlThread {
    stop: mpsc::Sender<()>,
    handle: JoinHandle<()>,
}

impl ControlThread {
    pub(super) fn stop(self) {
        drop(self.stop);
        let _ = self.handle.join();
    }
}

/// Milliseconds on a monotonic clock (cooldowns and stages), and on the wall
/// clock (event timestamps).
fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Resident memory of the process beside the models' KV caches (which grow
/// to their budget by design), in bytes; `None` where /proc is missing.
fn memory_beside_kv(workers: &[Arc<Worker>]) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    let kv: usize = workers
        .iter()
        .map(|w| w.counters.kv_blocks_touched.load(Ordering::Relaxed) * w.counters.kv_block_bytes.load(Ordering::Relaxed))
        .sum();
    Some((kib * 1024).saturating_sub(kv as u64))
}

fn summarize(workers: &[Arc<Worker>], window_s: u64) -> WindowSummary {
    let now = qos::now_s();
    let mut s = WindowSummary::default();
    for w in workers {
        w.counters.window.lock().unwrap().summarize(now, window_s, &mut s);
    }
    s
}

fn arm_stats(workers: &[Arc<Worker>], window_s: u64) -> ArmStats {
    let s = summarize(workers, window_s);
    ArmStats { requests: s.requests(), errors: s.errors, failures: s.failures, latency_p95_ms: s.e2e_p95_ms() }
}

impl Shared {
    pub(super) fn config(&self) -> Arc<RuntimeConfig> {
        self.config.read().unwrap().clone()
    }

    /// Whether the policies are enforced, and whether only as a dry run. With
    /// a flags file the `qos_policy` feature decides (a model-wide switch, so
    /// its rollout is not per request); without one, `qos.enabled`.
    fn qos_mode(&self, cfg: &RuntimeConfig) -> (bool, bool) {
        let dry = cfg.qos.dry_run;
        if !cfg.qos.enabled || cfg.qos.policies.is_empty() {
            return (false, dry);
        }
        let Some(store) = self.flags.read().unwrap().clone() else { return (true, dry) };
        let f = store.current();
        let on = !f.emergency.kill_switch
            && f.phase5.enabled
            && f.phase5.rollout_percentage > 0.0
            && f.features.get("qos_policy").is_some_and(|q| q.enabled && q.rollout_percentage > 0.0);
        (on, dry || f.option("qos_policy", "dry_run") == Some(true))
    }

    fn tick(&self) {
        let cfg = self.config();
        let workers: Vec<(String, Arc<Worker>)> =
            self.models.lock().unwrap().iter().map(|(id, w)| (id.clone(), w.clone())).collect();
        let all: Vec<Arc<Worker>> = workers.iter().map(|(_, w)| w.clone()).collect();
        let (now, wall) = (mono_ms(), unix_ms());
        let (enabled, dry_run) = self.qos_mode(&cfg);
        let mut ctl = self.control.lock().unwrap();
        ctl.qos_enabled = enabled;
        ctl.qos_dry_run = dry_run;
        if enabled {
            let mut windows: HashMap<u64, WindowSummary> = HashMap::new();
            let measure = |metric: Metric, window_s: u64, min_samples: u64| -> Option<f64> {
                let gauge = |f: fn(&Counters) -> usize| all.iter().map(|w| f(&w.counters)).sum::<usize>();
                match metric {
                    Metric::QueueDepth => Some(gauge(|c| c.queued.load(Ordering::Relaxed)) as f64),
                    Metric::KvUsage => {
                        let total = gauge(|c| c.kv_blocks_total.load(Ordering::Relaxed));
                        (total > 0).then(|| gauge(|c| c.kv_blocks_used.load(Ordering::Relaxed)) as f64 / total as f64)
                    }
                    _ => {
                        let s = windows.entry(window_s).or_insert_with(|| summarize(&all, window_s));
                        match metric {
                            Metric::TtftP95Ms => (s.ttft_ms.len() as u64 >= min_samples).then(|| s.ttft_p95_ms()).flatten(),
                            Metric::E2eP95Ms => (s.e2e_ms.len() as u64 >= min_samples).then(|| s.e2e_p95_ms()).flatten(),
                            Metric::ErrorRate => (s.requests() >= min_samples).then(|| s.error_rate()).flatten(),
                            _ => Some(s.tokens_per_s()),
                        }
                    }
                }
            };
            let events = ctl.evaluator.evaluate(&cfg.qos, now, dry_run, measure);
            for mut e in events {
                e.at_ms = wall;
                ctl.push(ControlEvent::Qos(e));
            }
            let active = if dry_run { Vec::new() } else { ctl.evaluator.active(&cfg.qos) };
            self.knobs.apply(&active);
        } else {
            // Switched off (flags, config): everything back to the configured limits.
            ctl.evaluator = Evaluator::default();
            self.knobs.apply(&[]);
        }

        let Some(canary) = ctl.canary.as_mut() else { return };
        if canary.state != State::Running {
            return;
        }
        let arm = |id: &str| -> Vec<Arc<Worker>> { workers.iter().filter(|(m, _)| m == id).map(|(_, w)| w.clone()).collect() };
        let (base, cand) = (arm(&canary.cfg.baseline), arm(&canary.cfg.candidate));
        let event = if cand.is_empty() || base.is_empty() {
            let which = if cand.is_empty() { &canary.cfg.candidate } else { &canary.cfg.baseline };
            canary.rollback(now, format!("model '{which}' is no longer loaded"), true).ok()
        } else {
            let stage_s = (now.saturating_sub(canary.stage_started_ms()) / 1000 + 1).min(MAX_WINDOW_S);
            let memory = memory_beside_kv(&all);
            canary.evaluate(now, &arm_stats(&base, stage_s), &arm_stats(&cand, stage_s), memory)
        };
        if let Some(mut e) = event {
            e.at_ms = wall;
            ctl.push(ControlEvent::Canary(e));
        }
    }
}

impl Engine {
    /// Starts the control thread once (with the first model: before that
    /// there is nothing to evaluate).
    pub(super) fn start_control(&self) {
        let mut slot = self.control.lock().unwrap();
        if slot.is_some() {
            return;
        }
        let (stop, rx) = mpsc::channel::<()>();
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new().name("mlx-serving:control".into()).spawn(move || loop {
            let every = Duration::from_millis(shared.config().qos.evaluation_interval_ms);
            match rx.recv_timeout(every) {
                Err(mpsc::RecvTimeoutError::Timeout) => shared.tick(),
                _ => break,
            }
        });
        // Without the thread the engine still serves; policies just do not act.
        if let Ok(handle) = handle {
            *slot = Some(ControlThread { stop, handle });
        }
    }

    /// Runs one control evaluation now (also run by the control thread).
    pub fn evaluate_control(&self) {
        self.shared.tick();
    }

    /// Events since the last call, oldest first.
    pub fn drain_control_events(&self) -> Vec<ControlEvent> {
        self.shared.control.lock().unwrap().events.drain(..).collect()
    }

    /// Replaces the settings in force. Limits, timeouts, queue bounds,
    /// `model_cache` and the QoS policies apply at once; the returned keys
    /// changed too but apply to models loaded from now on (they size a
    /// model's cache, batch and breaker when it loads).
    pub fn reload_config(&self, new: RuntimeConfig) -> Vec<&'static str> {
        let old = self.config();
        let mut later = Vec::new();
        if old.kv_cache != new.kv_cache {
            later.push("kv_cache");
        }
        if old.batching != new.batching {
            later.push("batching");
        }
        if old.scheduler.prefill_chunk != new.scheduler.prefill_chunk {
            later.push("scheduler.prefillChunk");
        }
        if old.speculative != new.speculative {
            later.push("speculative");
        }
        if old.scheduler.stream_buffer != new.scheduler.stream_buffer {
            later.push("scheduler.streamBuffer");
        }
        if old.scheduler.prefetch_waiting != new.scheduler.prefetch_waiting {
            later.push("scheduler.prefetchWaiting");
        }
        if old.qos.circuit_breaker != new.qos.circuit_breaker {
            later.push("qos.circuitBreaker");
        }
        *self.shared.config.write().unwrap() = Arc::new(new);
        later
    }

    pub fn qos_status(&self) -> QosStatus {
        let cfg = self.config();
        let k = &self.shared.knobs;
        let ctl = self.shared.control.lock().unwrap();
        QosStatus {
            enabled: ctl.qos_enabled,
            dry_run: ctl.qos_dry_run,
            active_policies: ctl.evaluator.active_policies(),
            max_concurrent_streams: k.max_streams(cfg.streaming.max_concurrent_streams),
            max_queued_requests: k.max_queued(cfg.scheduler.max_queued_requests),
            max_batch_size: k.max_batch(cfg.max_batch()),
            shedding_background: k.shed_background(),
            deferring_background: k.defer_background(),
            event_counts: ctl.qos_counts.iter().map(|((p, k), n)| (p.clone(), k.to_string(), *n)).collect(),
        }
    }

    /// Starts a canary between two loaded models; requests for `cfg.name`
    /// are routed from now on. Its name may be the baseline's id (clients of
    /// that model then take part), not the candidate's.
    pub fn start_canary(&self, cfg: CanaryConfig) -> Result<CanaryEvent, EngineError> {
        cfg.validate().map_err(EngineError::InvalidParams)?;
        if cfg.name == cfg.candidate {
            return Err(EngineError::InvalidParams("canary.name: must not be the candidate's model id".into()));
        }
        for id in [&cfg.baseline, &cfg.candidate] {
            self.worker(id)?;
        }
        let workers: Vec<Arc<Worker>> = self.shared.models.lock().unwrap().values().cloned().collect();
        let mut ctl = self.shared.control.lock().unwrap();
        if ctl.canary.as_ref().is_some_and(|c| c.state == State::Running) {
            return Err(EngineError::InvalidParams("a canary is already running: roll it back or promote it first".into()));
        }
        let (canary, mut ev) = Canary::start(cfg, mono_ms(), memory_beside_kv(&workers));
        ev.at_ms = unix_ms();
        ctl.canary = Some(canary);
        ctl.push(ControlEvent::Canary(ev.clone()));
        Ok(ev)
    }

    fn with_canary(&self, f: impl FnOnce(&mut Canary, u64) -> Result<CanaryEvent, String>) -> Result<CanaryEvent, EngineError> {
        let mut ctl = self.shared.control.lock().unwrap();
        let c = ctl.canary.as_mut().ok_or_else(|| EngineError::InvalidParams("no canary has been started".into()))?;
        let mut ev = f(c, mono_ms()).map_err(EngineError::InvalidParams)?;
        ev.at_ms = unix_ms();
        ctl.push(ControlEvent::Canary(ev.clone()));
        Ok(ev)
    }

    /// Moves the canary to its next stage, or promotes it after the last.
    pub fn advance_canary(&self) -> Result<CanaryEvent, EngineError> {
        self.with_canary(|c, now| c.advance(now, false))
    }

    /// Sends all of the canary's traffic back to the baseline.
    pub fn rollback_canary(&self, reason: &str) -> Result<CanaryEvent, EngineError> {
        let reason = if reason.is_empty() { "manual rollback".to_owned() } else { reason.to_owned() };
        self.with_canary(|c, now| c.rollback(now, reason, false))
    }

    pub fn canary_status(&self) -> Option<CanaryStatus> {
        let workers: Vec<(String, Arc<Worker>)> =
            self.shared.models.lock().unwrap().iter().map(|(id, w)| (id.clone(), w.clone())).collect();
        let ctl = self.shared.control.lock().unwrap();
        let c = ctl.canary.as_ref()?;
        let stage_s = (mono_ms().saturating_sub(c.stage_started_ms()) / 1000 + 1).min(MAX_WINDOW_S);
        let arm = |id: &str| {
            let ws: Vec<Arc<Worker>> = workers.iter().filter(|(m, _)| m == id).map(|(_, w)| w.clone()).collect();
            arm_stats(&ws, stage_s)
        };
        Some(CanaryStatus {
            name: c.cfg.name.clone(),
            baseline: c.cfg.baseline.clone(),
            candidate: c.cfg.candidate.clone(),
            state: c.state.as_str().to_owned(),
            reason: match &c.state {
                State::RolledBack { reason } => Some(reason.clone()),
                _ => None,
            },
            percent: c.percent(),
            stages: c.cfg.stages.clone(),
            baseline_stats: arm(&c.cfg.baseline),
            candidate_stats: arm(&c.cfg.candidate),
            transitions: ctl.canary_counts.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
        })
    }
}
