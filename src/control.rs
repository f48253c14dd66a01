//! The control plane: QoS status, canary rollout, feature flags.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use mlx_serving_engine::control::canary::{ArmStats, CanaryConfig, Triggers};
use mlx_serving_engine::engine::ControlEvent;
use mlx_serving_engine::EngineError;
use mlx_serving_engine::control::flags::FlagStore;
use napi_derive::napi;

use crate::engine::NativeEngine;
use crate::{invalid, js_error, ms_option, Result};

#[napi(object)]
pub struct NativeQosStatus {
    pub enabled: bool,
    pub dry_run: bool,
    pub active_policies: Vec<String>,
    pub max_concurrent_streams: u32,
    pub max_queued_requests: u32,
    pub max_batch_size: u32,
    pub shedding_background: bool,
    pub deferring_background: bool,
}

/// A control-plane decision: a QoS policy event or a canary transition.
#[napi(object)]
pub struct NativeControlEvent {
    /// `qos` or `canary`.
    pub source: String,
    pub at_ms: f64,
    /// QoS: `fired`, `restored`, `suppressed`; canary: `started`,
    /// `advanced`, `promoted`, `rolled_back`.
    pub kind: String,
    pub reason: String,
    pub policy: Option<String>,
    pub severity: Option<String>,
    pub action: Option<String>,
    pub metric: Option<String>,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub dry_run: Option<bool>,
    pub percent: Option<f64>,
    pub automatic: Option<bool>,
}

impl From<ControlEvent> for NativeControlEvent {
    fn from(e: ControlEvent) -> Self {
        match e {
            ControlEvent::Qos(q) => NativeControlEvent {
                source: "qos".into(),
                at_ms: q.at_ms as f64,
                kind: q.kind.as_str().into(),
                reason: q.reason,
                policy: Some(q.policy),
                severity: Some(q.severity.as_str().into()),
                action: Some(q.action.as_str().into()),
                metric: Some(q.metric.as_str().into()),
                value: q.value,
                threshold: Some(q.threshold),
                dry_run: Some(q.dry_run),
                percent: None,
                automatic: None,
            },
            ControlEvent::Canary(c) => NativeControlEvent {
                source: "canary".into(),
                at_ms: c.at_ms as f64,
                kind: c.kind.into(),
                reason: c.reason,
                policy: None,
                severity: None,
                action: None,
                metric: None,
                value: None,
                threshold: None,
                dry_run: None,
                percent: Some(c.percent),
                automatic: Some(c.automatic),
            },
        }
    }
}

#[napi(object)]
pub struct NativeCanaryTriggers {
    pub error_rate_ratio: Option<f64>,
    pub error_rate_floor: Option<f64>,
    pub latency_p95_ratio: Option<f64>,
    pub memory_growth_per_hour: Option<f64>,
    pub memory_min_ms: Option<f64>,
    pub crash_rate: Option<f64>,
    pub min_samples: Option<u32>,
}

#[napi(object)]
pub struct NativeCanaryOptions {
    pub name: String,
    pub baseline: String,
    pub candidate: String,
    pub stages: Option<Vec<f64>>,
    pub hash_seed: Option<String>,
    pub min_samples: Option<u32>,
    pub stage_ms: Option<f64>,
    pub triggers: Option<NativeCanaryTriggers>,
}

#[napi(object)]
pub struct NativeArmStats {
    pub requests: f64,
    pub errors: f64,
    pub failures: f64,
    pub error_rate: f64,
    pub latency_p95_ms: Option<f64>,
}

impl From<&ArmStats> for NativeArmStats {
    fn from(a: &ArmStats) -> Self {
        NativeArmStats {
            requests: a.requests as f64,
            errors: a.errors as f64,
            failures: a.failures as f64,
            error_rate: a.error_rate(),
            latency_p95_ms: a.latency_p95_ms,
        }
    }
}

#[napi(object)]
pub struct NativeCanaryStatus {
    pub name: String,
    pub baseline: String,
    pub candidate: String,
    /// `running`, `promoted` or `rolled_back`.
    pub state: String,
    pub reason: Option<String>,
    pub percent: f64,
    pub stages: Vec<f64>,
    pub baseline_stats: NativeArmStats,
    pub candidate_stats: NativeArmStats,
}

impl TryFrom<NativeCanaryOptions> for CanaryConfig {
    type Error = napi::Error<crate::Code>;
    fn try_from(o: NativeCanaryOptions) -> Result<Self> {
        let d = CanaryConfig::default();
        let t = o.triggers.unwrap_or(NativeCanaryTriggers {
            error_rate_ratio: None,
            error_rate_floor: None,
            latency_p95_ratio: None,
            memory_growth_per_hour: None,
            memory_min_ms: None,
            crash_rate: None,
            min_samples: None,
        });
        let dt = d.triggers;
        Ok(CanaryConfig {
            name: o.name,
            baseline: o.baseline,
            candidate: o.candidate,
            stages: o.stages.unwrap_or(d.stages),
            hash_seed: o.hash_seed.unwrap_or(d.hash_seed),
            min_samples: o.min_samples.map_or(d.min_samples, u64::from),
            stage_ms: ms_option("stageMs", o.stage_ms)?.unwrap_or(d.stage_ms),
            triggers: Triggers {
                error_rate_ratio: t.error_rate_ratio.unwrap_or(dt.error_rate_ratio),
                error_rate_floor: t.error_rate_floor.unwrap_or(dt.error_rate_floor),
                latency_p95_ratio: t.latency_p95_ratio.unwrap_or(dt.latency_p95_ratio),
                memory_growth_per_hour: t.memory_growth_per_hour.unwrap_or(dt.memory_growth_per_hour),
                memory_min_ms: ms_option("triggers.memoryMinMs", t.memory_min_ms)?.unwrap_or(dt.memory_min_ms),
                crash_rate: t.crash_rate.unwrap_or(dt.crash_rate),
                min_samples: t.min_samples.map_or(dt.min_samples, u64::from),
            },
        })
    }
}

/// A feature-flag decision for one request.
#[napi(object)]
pub struct NativeFlagDecision {
    pub enabled: bool,
    /// `enabled`, `kill_switch`, `phase5_disabled`, `phase5_rollout_excluded`,
    /// `unknown_feature`, `feature_disabled`, `rollout_excluded` or `sub_feature_disabled`.
    pub reason: String,
    /// The request's bucket (0-9999) in the rollout that decided, if one did.
    pub bucket: Option<u32>,
    /// A reload of an edited file that failed (reported once per edit); the
    /// flags in force decided.
    pub reload_error: Option<String>,
}

impl NativeFlagDecision {
    fn of(d: mlx_serving_engine::control::flags::Decision, reload_error: Option<String>) -> Self {
        NativeFlagDecision { enabled: d.enabled, reason: d.reason.as_str().to_owned(), bucket: d.bucket, reload_error }
    }
}

/// Flags files read without an engine, one store per path as given.
static FLAG_FILES: LazyLock<Mutex<HashMap<String, Arc<FlagStore>>>> = LazyLock::new(Default::default);

/// The package-root `evaluateFeature`: the decision under the flags in
/// `path`, re-read when the file changed since the last call (one `stat`
/// otherwise), so services that never create an engine decide the same way.
#[napi]
pub fn evaluate_feature_in_file(path: String, name: String, request_id: String) -> Result<NativeFlagDecision> {
    let known = FLAG_FILES.lock().unwrap().get(&path).cloned();
    let (store, reload_error) = match known {
        Some(store) => {
            let err = store.refresh().err().map(|e| match e {
                EngineError::InvalidParams(m) => m,
                e => e.to_string(),
            });
            (store, err)
        }
        None => {
            // Read outside the lock: a slow file must not hold up other paths.
            let store = Arc::new(FlagStore::open(&path).map_err(js_error)?);
            (FLAG_FILES.lock().unwrap().entry(path).or_insert(store).clone(), None)
        }
    };
    Ok(NativeFlagDecision::of(store.current().evaluate(&name, &request_id), reload_error))
}

#[napi(object)]
pub struct NativeFlagCount {
    pub feature: String,
    pub enabled: bool,
    pub requests: f64,
}

#[napi]
impl NativeEngine {
    /// Runs the QoS policies and the canary's checks now (they also run
    /// every `qos.evaluationIntervalMs`).
    #[napi]
    pub fn evaluate_control(&self) {
        self.inner.evaluate_control();
    }

    /// QoS and canary events since the last call, oldest first.
    #[napi]
    pub fn drain_control_events(&self) -> Vec<NativeControlEvent> {
        self.inner.drain_control_events().into_iter().map(Into::into).collect()
    }

    #[napi]
    pub fn qos_status(&self) -> NativeQosStatus {
        let q = self.inner.qos_status();
        NativeQosStatus {
            enabled: q.enabled,
            dry_run: q.dry_run,
            active_policies: q.active_policies,
            max_concurrent_streams: q.max_concurrent_streams as u32,
            max_queued_requests: q.max_queued_requests as u32,
            max_batch_size: q.max_batch_size as u32,
            shedding_background: q.shedding_background,
            deferring_background: q.deferring_background,
        }
    }

    #[napi]
    pub fn start_canary(&self, options: NativeCanaryOptions) -> Result<NativeControlEvent> {
        let cfg = CanaryConfig::try_from(options)?;
        let ev = self.inner.start_canary(cfg).map_err(js_error)?;
        Ok(ControlEvent::Canary(ev).into())
    }

    #[napi]
    pub fn advance_canary(&self) -> Result<NativeControlEvent> {
        Ok(ControlEvent::Canary(self.inner.advance_canary().map_err(js_error)?).into())
    }

    #[napi]
    pub fn rollback_canary(&self, reason: Option<String>) -> Result<NativeControlEvent> {
        let ev = self.inner.rollback_canary(reason.as_deref().unwrap_or("")).map_err(js_error)?;
        Ok(ControlEvent::Canary(ev).into())
    }

    #[napi]
    pub fn canary_status(&self) -> Option<NativeCanaryStatus> {
        self.inner.canary_status().map(|c| NativeCanaryStatus {
            baseline_stats: (&c.baseline_stats).into(),
            candidate_stats: (&c.candidate_stats).into(),
            name: c.name,
            baseline: c.baseline,
            candidate: c.candidate,
            state: c.state,
            reason: c.reason,
            percent: c.percent,
            stages: c.stages,
        })
    }

    fn flags(&self) -> Result<Arc<FlagStore>> {
        self.inner
            .feature_flags()
            .ok_or_else(|| invalid("no feature flags file was given (createEngine({ featureFlagsPath }))".into()))
    }

    /// Why `name` is on or off for a request id under the flags in force.
    #[napi]
    pub fn evaluate_feature(&self, name: String, request_id: String) -> Result<NativeFlagDecision> {
        Ok(NativeFlagDecision::of(self.flags()?.current().evaluate(&name, &request_id), None))
    }

    /// Re-reads the flags file; when it is unreadable or invalid the flags
    /// in force stay and the error says why.
    #[napi]
    pub fn reload_feature_flags(&self) -> Result<()> {
        self.flags()?.reload().map_err(js_error)
    }

    /// Requests per gated feature, on and off, since start.
    #[napi]
    pub fn feature_flag_counts(&self) -> Vec<NativeFlagCount> {
        self.inner
            .feature_flag_counts()
            .into_iter()
            .map(|(feature, enabled, n)| NativeFlagCount { feature, enabled, requests: n as f64 })
            .collect()
    }
}
