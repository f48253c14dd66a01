//! Node binding for the mlx-serving engine. Thin by design: it converts
//! arguments, turns engine events into JS objects behind awaitable streams,
//! and maps `EngineError` to stable codes. The TypeScript layer (`lib/`)
//! builds the public API on top.

use std::sync::Arc;

use mlx_serving_engine::canary::{ArmStats, CanaryConfig, Triggers};
use mlx_serving_engine::chat::ChatMessage;
use mlx_serving_engine::config::RuntimeConfig;
use mlx_serving_engine::flags::FlagStore;
use mlx_serving_engine::cpu::Isa;
use mlx_serving_engine::engine::{Canceller, ControlEvent, Event, ModelInfo, ModelOptions, RequestHandle, Stats};
use mlx_serving_engine::request::{Number, PromptSpec, RequestDefaults, RequestSpec};
use mlx_serving_engine::backend::BackendKind;
use mlx_serving_engine::{Engine, EngineError};
use napi::bindgen_prelude::*;
use napi::tokio;
use napi_derive::napi;

/// The one mapping from engine errors to JS errors: the message starts with
/// the stable code, which the TypeScript layer lifts into `error.code`.
fn js_error(e: EngineError) -> Error {
    Error::new(Status::GenericFailure, format!("{}: {e}", e.code()))
}

fn invalid(msg: String) -> Error {
    js_error(EngineError::InvalidParams(msg))
}

#[napi(object)]
pub struct NativeModelInfo {
    pub id: String,
    pub path: String,
    pub architecture: String,
    pub context_length: u32,
    pub vocab_size: u32,
    pub weight_bytes: f64,
    /// Weight bytes one decode step reads.
    pub decode_weight_bytes: f64,
    /// Bytes of keys and values one cached position takes.
    pub kv_bytes_per_position: f64,
    pub file_type: String,
    pub warmup_ms: f64,
    pub request_timeout_ms: Option<f64>,
    /// Unix epoch milliseconds of the last request (or the load).
    pub last_access_ms: f64,
    /// The id of the attached draft model.
    pub draft_model: Option<String>,
    /// `cpu` or `mlx`.
    pub backend: String,
}

impl From<ModelInfo> for NativeModelInfo {
    fn from(m: ModelInfo) -> Self {
        NativeModelInfo {
            id: m.id,
            path: m.path.display().to_string(),
            architecture: m.architecture,
            context_length: m.context_length as u32,
            vocab_size: m.vocab_size as u32,
            weight_bytes: m.weight_bytes as f64,
            decode_weight_bytes: m.decode_weight_bytes as f64,
            kv_bytes_per_position: m.kv_bytes_per_position as f64,
            file_type: m.file_type,
            warmup_ms: m.warmup_ms,
            request_timeout_ms: m.request_timeout_ms.map(|t| t as f64),
            last_access_ms: m.last_access_ms as f64,
            draft_model: m.draft_model,
            backend: m.backend.name().to_owned(),
        }
    }
}

#[napi(object)]
pub struct NativeDraftCompatibility {
    pub compatible: bool,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub primary: NativeModelInfo,
    pub draft: NativeModelInfo,
}

#[napi(object)]
pub struct NativeMessage {
    pub role: String,
    pub content: String,
}

/// Generation parameters as JavaScript sends them. Every number stays an
/// f64 so that the engine's checks (`RequestSpec::resolve`) see what was
/// sent, not what napi would wrap or truncate it to (-1 as 4294967295).
#[napi(object)]
pub struct NativeGenerateParams {
    pub model: String,
    pub prompt: Option<String>,
    pub prompt_tokens: Option<Vec<f64>>,
    pub messages: Option<Vec<NativeMessage>>,
    pub max_tokens: Option<f64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<f64>,
    pub stop_sequences: Option<Vec<String>>,
    pub stop_token_ids: Option<Vec<f64>>,
    pub ignore_eos: Option<bool>,
    pub timeout_ms: Option<f64>,
    /// `urgent`, `default` or `background`.
    pub priority: Option<String>,
    pub cache_salt: Option<String>,
    /// Feature-flag decisions hash it (sticky per id).
    pub request_id: Option<String>,
    /// Keep the prompt's KV blocks cached while the model is loaded.
    pub pin_prefix: Option<bool>,
}

impl From<NativeGenerateParams> for RequestSpec {
    fn from(p: NativeGenerateParams) -> Self {
        let numbers = |v: Vec<f64>| v.into_iter().map(Number::from).collect();
        let prompt = match (p.prompt, p.prompt_tokens) {
            (Some(text), _) => Some(PromptSpec::Text(text)),
            (None, Some(ids)) => Some(PromptSpec::Tokens { tokens: numbers(ids) }),
            (None, None) => None,
        };
        RequestSpec {
            model: Some(p.model),
            prompt,
            messages: p.messages.map(|m| m.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect()),
            max_tokens: p.max_tokens.map(Number::from),
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k.map(Number::from),
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            seed: p.seed.map(Number::from),
            stop_sequences: p.stop_sequences,
            stop_token_ids: p.stop_token_ids.map(numbers),
            ignore_eos: p.ignore_eos,
            top_logprobs: None,
            timeout_ms: p.timeout_ms,
            priority: p.priority,
            cache_salt: p.cache_salt,
            request_id: p.request_id,
            pin_prefix: p.pin_prefix,
        }
    }
}

#[napi(object)]
pub struct NativeStats {
    pub prompt_tokens: u32,
    pub tokens_generated: u32,
    pub time_to_first_token: f64,
    pub total_time: f64,
    pub tokens_per_second: f64,
    pub finish_reason: String,
    /// Gated Phase 5 features that were on for the request.
    pub features: Vec<String>,
}

impl From<Stats> for NativeStats {
    fn from(s: Stats) -> Self {
        NativeStats {
            prompt_tokens: s.n_prompt_tokens as u32,
            tokens_generated: s.n_generated_tokens as u32,
            time_to_first_token: s.t_first_token_ms,
            total_time: s.t_total_ms,
            tokens_per_second: s.decode_tokens_per_s,
            finish_reason: s.finish_reason.as_str().to_owned(),
            features: s.features,
        }
    }
}

/// One stream event: `kind` is `token`, `done` or `error`.
#[napi(object)]
pub struct NativeChunk {
    pub kind: String,
    pub text: Option<String>,
    pub token_id: Option<u32>,
    pub logprob: Option<f64>,
    pub stats: Option<NativeStats>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

impl From<Event> for NativeChunk {
    fn from(e: Event) -> Self {
        let mut c = NativeChunk {
            kind: String::new(),
            text: None,
            token_id: None,
            logprob: None,
            stats: None,
            error_code: None,
            error_message: None,
        };
        match e {
            Event::Token { text, token_id, logprob, .. } => {
                c.kind = "token".into();
                c.text = Some(text);
                c.token_id = Some(token_id);
                c.logprob = logprob.map(f64::from);
            }
            Event::Done(s) => {
                c.kind = "done".into();
                c.stats = Some(s.into());
            }
            Event::Error(e) => {
                c.kind = "error".into();
                c.error_code = Some(e.code().into());
                c.error_message = Some(e.to_string());
            }
        }
        c
    }
}

/// The events of one generation request.
#[napi]
pub struct NativeStream {
    handle: tokio::sync::Mutex<RequestHandle>,
    canceller: Canceller,
    request_id: f64,
    /// Most events per `next()` (`streaming.batchSize`).
    batch_size: usize,
}

#[napi]
impl NativeStream {
    #[napi(getter)]
    pub fn request_id(&self) -> f64 {
        self.request_id
    }

    /// Waits for at least one event and returns every event ready by then;
    /// an empty array means the stream has ended.
    #[napi]
    pub async fn next(&self) -> Vec<NativeChunk> {
        let mut h = self.handle.lock().await;
        let mut out = Vec::new();
        if let Some(first) = h.recv().await {
            out.push(first.into());
            while out.len() < self.batch_size {
                let Some(ev) = h.try_recv() else { break };
                out.push(ev.into());
            }
        }
        out
    }

    /// Stops the request at the next step; the stream then ends.
    #[napi]
    pub fn cancel(&self) {
        self.canceller.cancel();
    }
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

impl From<&mlx_serving_engine::metrics::Histogram> for NativeHistogram {
    fn from(h: &mlx_serving_engine::metrics::Histogram) -> Self {
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
pub struct NativeEngine {
    inner: Arc<Engine>,
    /// Where `reloadConfig` reads from, and the override it keeps.
    config_path: Option<String>,
    max_concurrent_streams: Option<usize>,
}

/// Settings of a reload that apply only to models loaded afterwards.
#[napi(object)]
pub struct NativeConfigReload {
    pub applies_on_next_load: Vec<String>,
}

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

/// A millisecond count from JS: finite and non-negative.
fn ms_option(name: &str, v: Option<f64>) -> Result<Option<u64>> {
    match v {
        None => Ok(None),
        // Up, so a fraction of a millisecond is not 0 (no limit, or refused).
        Some(x) if x.is_finite() && x >= 0.0 => Ok(Some(x.ceil() as u64)),
        Some(x) => Err(invalid(format!("{name} must be a non-negative number of milliseconds, got {x}"))),
    }
}

impl TryFrom<NativeCanaryOptions> for CanaryConfig {
    type Error = napi::Error;
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

#[napi(object)]
pub struct NativeEngineOptions {
    /// A `runtime.yaml`; defaults apply without one.
    pub config_path: Option<String>,
    /// Overrides `streaming.maxConcurrentStreams` (the CLI's `--max-concurrent`).
    pub max_concurrent_streams: Option<u32>,
    /// A `feature-flags.yaml`: requests then consult its flags.
    pub feature_flags_path: Option<String>,
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
}

#[napi(object)]
pub struct NativeFlagCount {
    pub feature: String,
    pub enabled: bool,
    pub requests: f64,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> std::result::Result<T, EngineError> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| js_error(EngineError::Internal(format!("worker task failed: {e}"))))?
        .map_err(js_error)
}

#[napi]
impl NativeEngine {
    #[napi(constructor)]
    pub fn new(options: Option<NativeEngineOptions>) -> Result<Self> {
        let config_path = options.as_ref().and_then(|o| o.config_path.clone());
        let max_concurrent_streams = match options.as_ref().and_then(|o| o.max_concurrent_streams) {
            Some(0) => return Err(invalid("maxConcurrentStreams must be at least 1".into())),
            m => m.map(|m| m as usize),
        };
        let config = Self::read_config(config_path.as_deref(), max_concurrent_streams)?;
        let mut engine = Engine::with_config(config);
        if let Some(path) = options.as_ref().and_then(|o| o.feature_flags_path.as_deref()) {
            engine = engine.with_feature_flags(FlagStore::open(path).map_err(js_error)?);
        }
        Ok(NativeEngine { inner: Arc::new(engine), config_path, max_concurrent_streams })
    }

    fn read_config(path: Option<&str>, max_concurrent_streams: Option<usize>) -> Result<RuntimeConfig> {
        let mut config = match path {
            Some(path) => RuntimeConfig::from_file(path).map_err(js_error)?,
            None => RuntimeConfig::default(),
        };
        if let Some(m) = max_concurrent_streams {
            config.streaming.max_concurrent_streams = m;
        }
        Ok(config)
    }

    /// Re-reads the runtime config file. An unreadable or invalid file
    /// changes nothing and the error names the key; a valid one applies at
    /// once, except the settings listed, which apply to models loaded later.
    #[napi]
    pub fn reload_config(&self) -> Result<NativeConfigReload> {
        let path = self
            .config_path
            .as_deref()
            .ok_or_else(|| invalid("no config file was given (createEngine({ configPath }))".into()))?;
        let config = Self::read_config(Some(path), self.max_concurrent_streams)?;
        let later = self.inner.reload_config(config);
        Ok(NativeConfigReload { applies_on_next_load: later.into_iter().map(String::from).collect() })
    }

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
        let d = self.flags()?.current().evaluate(&name, &request_id);
        Ok(NativeFlagDecision { enabled: d.enabled, reason: d.reason.as_str().to_owned(), bucket: d.bucket })
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

    /// Loads a GGUF file or MLX folder (off the JS thread) on `backend`
    /// (`cpu`, `mlx` or `auto`; `cpu` when absent).
    #[napi]
    pub async fn load_model(&self, path: String, id: Option<String>, request_timeout_ms: Option<f64>, backend: Option<String>) -> Result<NativeModelInfo> {
        let backend = BackendKind::parse(backend.as_deref().unwrap_or("cpu")).map_err(js_error)?;
        let options = ModelOptions { request_timeout_ms: ms_option("requestTimeoutMs", request_timeout_ms)?, backend };
        let e = self.inner.clone();
        blocking(move || e.load_model_with(&path, id, options)).await.map(Into::into)
    }

    /// Loads a draft model for speculative decoding of `primary`'s requests.
    #[napi]
    pub async fn load_draft_model(&self, primary: String, path: String, id: Option<String>) -> Result<NativeModelInfo> {
        let e = self.inner.clone();
        blocking(move || e.load_draft_model(&primary, &path, id)).await.map(Into::into)
    }

    /// Detaches the draft of `model` (a primary or draft id), or every draft.
    #[napi]
    pub async fn unload_draft_model(&self, model: Option<String>) -> Result<Vec<String>> {
        let e = self.inner.clone();
        blocking(move || e.unload_draft_model(model.as_deref())).await
    }

    #[napi]
    pub fn is_draft_model_compatible(&self, primary: String, draft: String) -> Result<NativeDraftCompatibility> {
        let r = self.inner.draft_compatibility(&primary, &draft).map_err(js_error)?;
        Ok(NativeDraftCompatibility {
            compatible: r.compatible,
            errors: r.errors,
            warnings: r.warnings,
            primary: r.primary.into(),
            draft: r.draft.into(),
        })
    }

    #[napi]
    pub async fn unload_model(&self, id: String) -> Result<()> {
        let e = self.inner.clone();
        blocking(move || e.unload_model(&id)).await
    }

    #[napi]
    pub fn list_models(&self) -> Vec<NativeModelInfo> {
        self.inner.list_models().into_iter().map(Into::into).collect()
    }

    #[napi]
    pub fn get_model_info(&self, id: String) -> Option<NativeModelInfo> {
        self.inner.model_info(&id).map(Into::into)
    }

    #[napi]
    pub async fn tokenize(&self, model: String, text: String, add_bos: Option<bool>) -> Result<Vec<u32>> {
        let e = self.inner.clone();
        blocking(move || e.tokenize(&model, &text, add_bos)).await
    }

    #[napi]
    pub fn detokenize(&self, model: String, tokens: Vec<u32>) -> Result<String> {
        self.inner.detokenize(&model, &tokens).map_err(js_error)
    }

    #[napi]
    pub fn apply_chat_template(&self, model: String, messages: Vec<NativeMessage>) -> Result<String> {
        let msgs: Vec<ChatMessage> = messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect();
        self.inner.apply_chat_template(&model, &msgs).map_err(js_error)
    }

    /// Validates, templates and tokenizes (off the JS thread), then queues
    /// the request.
    #[napi]
    pub async fn generate(&self, params: NativeGenerateParams) -> Result<NativeStream> {
        let req = RequestSpec::from(params).resolve(&RequestDefaults::default()).map_err(|e| js_error(e.into()))?;
        let e = self.inner.clone();
        let handle = blocking(move || e.submit(req)).await?;
        Ok(NativeStream {
            canceller: handle.canceller(),
            request_id: handle.id as f64,
            handle: tokio::sync::Mutex::new(handle),
            batch_size: self.inner.config().streaming.batch_size,
        })
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

    #[napi]
    pub async fn start_server(&self, opts: NativeServerOptions) -> Result<NativeServer> {
        let d = mlx_serving_server::ServerOptions::default();
        let port = opts.port.unwrap_or(d.port as u32);
        if port > u16::MAX as u32 {
            return Err(invalid(format!("port must be at most 65535, got {port}")));
        }
        let o = mlx_serving_server::ServerOptions {
            host: opts.host.unwrap_or(d.host),
            port: port as u16,
            api_key: opts.api_key.filter(|k| !k.is_empty()),
            max_concurrent: opts
                .max_concurrent
                .map_or(self.inner.config().streaming.max_concurrent_streams, |m| m.max(1) as usize),
            body_limit_bytes: opts.body_limit_bytes.map_or(d.body_limit_bytes, |b| b as usize),
            cors_origins: opts.cors_origins.unwrap_or_default(),
        };
        let s = mlx_serving_server::start(self.inner.clone(), o)
            .await
            .map_err(|e| js_error(EngineError::InvalidParams(format!("cannot listen: {e}"))))?;
        Ok(NativeServer { host: s.addr.ip().to_string(), port: s.addr.port() as u32, inner: tokio::sync::Mutex::new(Some(s)) })
    }

    /// Stops every model; running requests end with `Cancelled`.
    #[napi]
    pub async fn shutdown(&self) -> Result<()> {
        let e = self.inner.clone();
        blocking(move || {
            e.shutdown();
            Ok(())
        })
        .await
    }
}


#[napi(object)]
pub struct NativeServerOptions {
    pub host: Option<String>,
    pub port: Option<u32>,
    pub api_key: Option<String>,
    pub max_concurrent: Option<u32>,
    pub body_limit_bytes: Option<u32>,
    pub cors_origins: Option<Vec<String>>,
}

/// The OpenAI-compatible HTTP server, running on the addon's tokio runtime.
#[napi]
pub struct NativeServer {
    inner: tokio::sync::Mutex<Option<mlx_serving_server::RunningServer>>,
    host: String,
    port: u32,
}

#[napi]
impl NativeServer {
    #[napi(getter)]
    pub fn host(&self) -> String {
        self.host.clone()
    }
    #[napi(getter)]
    pub fn port(&self) -> u32 {
        self.port
    }
    /// Stops accepting connections; in-flight requests get `grace_ms` to finish.
    #[napi]
    pub async fn close(&self, grace_ms: Option<u32>) {
        if let Some(s) = self.inner.lock().await.take() {
            s.stop(std::time::Duration::from_millis(grace_ms.unwrap_or(5000) as u64)).await;
        }
    }
}

#[napi(object)]
pub struct NativeRuntimeInfo {
    pub version: String,
    pub backend: String,
    pub isa: String,
    pub threads: u32,
    pub mlx: NativeMlxInfo,
}

/// Whether MLX (libmlx through our shim) loads in this process.
#[napi(object)]
pub struct NativeMlxInfo {
    pub available: bool,
    pub version: Option<String>,
    pub gpu: bool,
    /// Why it is not available.
    pub reason: Option<String>,
}

#[napi]
pub fn runtime_info() -> NativeRuntimeInfo {
    NativeRuntimeInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        backend: "cpu".into(),
        isa: Isa::detect().name().into(),
        threads: mlx_serving_engine::cpu::n_threads() as u32,
        mlx: NativeMlxInfo {
            available: mlx_serving_mlx::available(),
            version: mlx_serving_mlx::version(),
            gpu: mlx_serving_mlx::has_gpu(),
            reason: mlx_serving_mlx::unavailable_reason().map(str::to_owned),
        },
    }
}

/// GB/s of reading `mib` MiB with the kernels' worker threads (best of
/// five), the ceiling for decode: benchmarks report the fraction reached.
#[napi]
pub async fn read_bandwidth(mib: f64) -> Result<f64> {
    // A float, checked here: napi would wrap -1 and truncate 1.5.
    if !(1.0..=16384.0).contains(&mib) || mib.fract() != 0.0 {
        return Err(invalid(format!("mib must be a whole number from 1 to 16384, got {mib}")));
    }
    blocking(move || Ok(mlx_serving_engine::cpu::read_bandwidth(mib as usize))).await
}

#[napi(object)]
pub struct NativeConvertReport {
    pub tensors: u32,
    pub quantized: u32,
    pub dequantized: u32,
    pub bytes: f64,
}

/// Writes an MLX model folder from a GGUF file (off the JS thread).
#[napi]
pub async fn convert_gguf_to_mlx(gguf: String, out_dir: String) -> Result<NativeConvertReport> {
    let r = blocking(move || mlx_serving_engine::convert::gguf_to_mlx(gguf.as_ref(), out_dir.as_ref())).await?;
    Ok(NativeConvertReport { tensors: r.tensors as u32, quantized: r.quantized as u32, dequantized: r.dequantized as u32, bytes: r.bytes as f64 })
}
