//! The engine: loaded models, each owned by one worker thread that runs all
//! of that model's requests together (every step is one batched forward of
//! the running sequences' next tokens plus a chunk of waiting prompts).
//!
//! Callers talk to a worker by messages; each request gets its own channel of
//! `Event`s. Validation, chat templating and tokenization happen on the
//! caller's thread, before the request reaches the worker.
//!
//! The worker is a continuous-batching scheduler over a paged KV cache (see
//! `kv.rs`): requests wait in priority order, join the batch when it has room
//! and the cache has blocks for their prompt, reuse cached prefix blocks,
//! prefill in chunks after the decode tokens of every running sequence, and
//! leave the batch the moment they finish or are cancelled. When the cache
//! runs out of blocks, the lowest-priority, most recent sequence is
//! preempted: its blocks are released (full ones stay in the prefix cache)
//! and it is recomputed later from its tokens.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::control::breaker::{self, Admission, Breaker};
use crate::text::chat::{ChatMessage, ChatTemplate};
use crate::control::config::{ConfigSource, RuntimeConfig};
use crate::error::EngineError;
use crate::control::flags::FlagStore;
use crate::backend::BackendKind;
use crate::engine::kv::{BlockId, BlockPool, KvStore};
use crate::control::metrics::{Histograms, LatencyMetrics};
use crate::control::qos::{now_s, Knobs, Window};
use crate::request::PromptFit;
use crate::models::{BatchToken, Model};
use crate::sampler::{top_logprobs, Sampled, Sampler, SamplingParams};
use crate::text::stop::StopMatcher;
use crate::text::tokenizer::{StreamDecoder, Tokenizer};

#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub id: String,
    pub path: PathBuf,
    pub architecture: String,
    pub context_length: usize,
    pub vocab_size: usize,
    pub weight_bytes: usize,
    /// Weight bytes one decode step reads; with `kv_bytes_per_position`
    /// times the context, what a step streams from memory.
    pub decode_weight_bytes: usize,
    pub kv_bytes_per_position: usize,
    pub file_type: String,
    /// Time the load-time warmup took (0 when it was off).
    pub warmup_ms: f64,
    /// Caps every request's timeout on this model (`ModelOptions`).
    pub request_timeout_ms: Option<u64>,
    /// When a request last arrived for it (or it loaded), Unix epoch ms.
    pub last_access_ms: u64,
    /// The id of the draft model attached to it (`load_draft_model`).
    pub draft_model: Option<String>,
    /// The backend it runs on.
    pub backend: BackendKind,
}

/// Per-model settings given at load (a canary's candidate may differ from
/// its baseline only in these).
#[derive(Debug, Clone, Default)]
pub struct ModelOptions {
    /// Caps every request's timeout on this model, milliseconds.
    pub request_timeout_ms: Option<u64>,
    /// The backend to run it on (`cpu` unless asked).
    pub backend: BackendKind,
}

/// A load's outcome.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub info: ModelInfo,
    /// Models unloaded to make room for it (`model_cache.maxModels`).
    pub evicted: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum Input {
    Prompt(String),
    Tokens(Vec<u32>),
    Messages(Vec<ChatMessage>),
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub model: String,
    pub input: Input,
    /// `None`: the config's `streaming.maxTokens`, bounded by the context.
    pub max_tokens: Option<i64>,
    pub sampling: SamplingParams,
    pub stop_sequences: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past end-of-generation tokens (benchmarks, like vLLM's `ignore_eos`).
    pub ignore_eos: bool,
    /// Alternatives reported with each token (OpenAI's `top_logprobs`).
    pub top_logprobs: usize,
    pub timeout_ms: Option<u64>,
    pub priority: Priority,
    /// Sequences with different salts never share prefix-cache blocks
    /// (tenants that must not learn about each other's prompts).
    pub cache_salt: Option<String>,
    /// The caller's request id: feature-flag decisions hash it, so a
    /// request id always gets the same flags. `None`: the engine's own id.
    pub request_id: Option<String>,
    /// Keep the prompt's full KV blocks in the prefix cache for as long as
    /// the model is loaded (a known system prompt), never evicted.
    pub pin_prefix: bool,
}

impl GenerateRequest {
    /// Greedy, default limits, no stops: set the fields that differ.
    pub fn new(model: impl Into<String>, input: Input) -> Self {
        GenerateRequest {
            model: model.into(),
            input,
            max_tokens: None,
            sampling: SamplingParams::default(),
            stop_sequences: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            top_logprobs: 0,
            timeout_ms: None,
            priority: Priority::Default,
            cache_salt: None,
            request_id: None,
            pin_prefix: false,
        }
    }
}

/// The feature flags the engine consults per request, and what each gates.
/// `ttft_pipeline.kv_prefetch`: the request reuses and feeds the prefix cache.
/// `ttft_pipeline.speculative`: speculative decoding, by prompt lookup or the
/// attached draft model (see `speculative.rs`).
/// `batching.priority_scheduling`: the request's priority class orders its
/// admission and preemption (off: it is scheduled as `default`).
pub const GATED_FEATURES: &[&str] = &["ttft_pipeline.kv_prefetch", "ttft_pipeline.speculative", "batching.priority_scheduling"];

/// Scheduling class: the waiting queue serves `Urgent` first, and
/// preemption takes `Background` sequences first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Priority {
    Urgent = 0,
    #[default]
    Default = 1,
    Background = 2,
}

impl Priority {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "urgent" => Some(Priority::Urgent),
            "default" => Some(Priority::Default),
            "background" => Some(Priority::Background),
            _ => None,
        }
    }
}

/// Most alternatives a request may ask for per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop sequence.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Stats {
    pub n_prompt_tokens: usize,
    pub n_generated_tokens: usize,
    pub t_first_token_ms: f64,
    pub t_total_ms: f64,
    /// Output tokens per second after the first token.
    pub decode_tokens_per_s: f64,
    pub finish_reason: FinishReason,
    /// The gated features that were on for this request.
    pub features: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// One sampled token and the text it released (possibly empty: held back
    /// for UTF-8 or a possible stop sequence). At the end, text held back
    /// for a stop sequence that never completed arrives with `logprob: None`.
    Token { text: String, token_id: u32, logprob: Option<f32>, top_logprobs: Vec<(u32, f32)> },
    Done(Stats),
    Error(EngineError),
}

/// The caller's side of one request.
pub struct RequestHandle {
    pub id: u64,
    events: UnboundedReceiver<Event>,
    /// Token events sent and not yet received: the worker pauses the
    /// sequence while this is at `scheduler.streamBuffer`.
    unread: Arc<AtomicUsize>,
    cancel: Arc<AtomicBool>,
}

impl RequestHandle {
    fn counted(&self, ev: Option<Event>) -> Option<Event> {
        if let Some(Event::Token { .. }) = ev {
            self.unread.fetch_sub(1, Ordering::Relaxed);
        }
        ev
    }

    pub async fn recv(&mut self) -> Option<Event> {
        let ev = self.events.recv().await;
        self.counted(ev)
    }

    pub fn blocking_recv(&mut self) -> Option<Event> {
        let ev = self.events.blocking_recv();
        self.counted(ev)
    }

    /// The next event if one is ready.
    pub fn try_recv(&mut self) -> Option<Event> {
        let ev = self.events.try_recv().ok();
        self.counted(ev)
    }

    /// A clonable way to cancel the request from elsewhere.
    pub fn canceller(&self) -> Canceller {
        Canceller(self.cancel.clone())
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        // Nobody is listening any more: free the sequence.
        self.cancel.store(true, Ordering::Relaxed);
    }
}

#[derive(Clone)]
pub struct Canceller(Arc<AtomicBool>);
impl Canceller {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Counters shared between a worker and the engine.
#[derive(Default, Debug)]
struct Counters {
    running: AtomicUsize,
    waiting: AtomicUsize,
    /// Submitted and not yet finished (queued in the channel, waiting or running).
    in_flight: AtomicUsize,
    /// Milliseconds since the engine started, at the last submit (LRU).
    last_used_ms: AtomicU64,
    /// Submitted and not yet running, and their prompt tokens.
    queued: AtomicUsize,
    queued_tokens: AtomicUsize,
    /// Blocks of the paged KV cache: total, referenced by sequences, and
    /// unreferenced but kept for their cached prefix.
    kv_blocks_total: AtomicUsize,
    kv_blocks_used: AtomicUsize,
    kv_blocks_cached: AtomicUsize,
    kv_blocks_pinned: AtomicUsize,
    kv_blocks_touched: AtomicUsize,
    kv_block_bytes: AtomicUsize,
    /// Prompt tokens looked up in the prefix cache, and found there.
    prefix_queries: AtomicU64,
    prefix_hits: AtomicU64,
    preemptions: AtomicU64,
    /// Speculative decoding: guessed tokens checked, and kept.
    spec_drafted: AtomicU64,
    spec_accepted: AtomicU64,
    /// KV prefetch: prompt tokens computed for requests still waiting.
    prefetched_tokens: AtomicU64,
    completed: AtomicU64,
    generated_tokens: AtomicU64,
    /// Recent outcomes per second, for the QoS policies and the canary.
    window: Mutex<Window>,
    /// Forward passes to fail on purpose (tests of the failure paths).
    #[cfg(test)]
    inject_failures: AtomicUsize,
}

struct Job {
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    stop_sequences: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    top_logprobs: usize,
    priority: Priority,
    cache_salt: Option<String>,
    /// Whether the request reuses and feeds the prefix cache.
    prefix_cache: bool,
    /// Whether its decode steps check guesses (prompt lookup or the draft model).
    speculative: bool,
    pin_prefix: bool,
    features: Vec<String>,
    deadline: Option<(Instant, u64)>,
    t_submit: Instant,
    cancel: Arc<AtomicBool>,
    unread: Arc<AtomicUsize>,
    events: UnboundedSender<Event>,
    /// Released before the request's final event (see `retire`).
    in_flight: Option<InFlight>,
    /// Present until the request first runs.
    queued: Option<Queued>,
    /// Tells the model's circuit breaker how the request ended (when dropped).
    ticket: BreakerTicket,
}

/// A request's place in its model's circuit breaker: settled by the worker
/// when the request ends, or as neutral (a client-side ending) if dropped
/// unsettled (abandoned while waiting, shutdown).
struct BreakerTicket {
    breaker: Arc<Breaker>,
    admission: Admission,
    settled: bool,
}

impl BreakerTicket {
    fn settle(&mut self, outcome: breaker::Outcome) {
        if !std::mem::replace(&mut self.settled, true) {
            self.breaker.record(self.admission, outcome, Instant::now());
        }
    }
}

impl Drop for BreakerTicket {
    fn drop(&mut self) {
        self.settle(breaker::Outcome::Neutral);
    }
}

impl Job {
    fn abandoned(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.events.is_closed()
    }
}

/// Counts a request as in flight until its job is dropped, however it ends.
struct InFlight(Arc<Counters>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request and its prompt tokens as queued until it first runs or ends.
struct Queued(Arc<Counters>, usize);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
        self.0.queued_tokens.fetch_sub(self.1, Ordering::Relaxed);
    }
}

enum Msg {
    Job(Box<Job>),
    /// Attach a draft model (or detach with `None`).
    Drafter(Option<worker::Drafter>),
    Shutdown,
}

struct Worker {
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    /// The attached draft model's description and tokenizer.
    draft: Mutex<Option<(ModelInfo, Arc<Tokenizer>)>>,
    template: ChatTemplate,
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
    breaker: Arc<Breaker>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Worker {
    fn stop(&self) {
        let _ = self.tx.send(Msg::Shutdown);
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

pub struct Engine {
    shared: Arc<Shared>,
    /// Held while a model loads: concurrent loads of one id then share the
    /// first one's result instead of each reading the weights (and its KV
    /// pool) before all but one are thrown away.
    loading: Mutex<()>,
    next_request: AtomicU64,
    t_start: Instant,
    /// `t_start` as Unix epoch milliseconds.
    unix_start_ms: u64,
    latency: Arc<LatencyMetrics>,
    /// Requests per (gated feature, on) since start.
    flag_counts: Mutex<std::collections::BTreeMap<(String, bool), u64>>,
    /// The control thread (QoS evaluator, canary), started with the first model.
    control: Mutex<Option<control::ControlThread>>,
    /// What `reload_config_file` re-reads.
    config_source: ConfigSource,
}

/// What an engine starts from: its runtime config and, optionally, a
/// feature-flags file that requests then consult.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    pub config: ConfigSource,
    pub feature_flags_path: Option<PathBuf>,
}

/// What the engine shares with its control thread.
struct Shared {
    config: RwLock<Arc<RuntimeConfig>>,
    models: Mutex<HashMap<String, Arc<Worker>>>,
    /// What unloaded models counted.
    retired: Mutex<Totals>,
    flags: RwLock<Option<Arc<FlagStore>>>,
    /// Limits the QoS actions change, read by admission and the workers.
    knobs: Arc<Knobs>,
    control: Mutex<control::ControlState>,
}

impl Default for Engine {
    fn default() -> Self {
        Self::with_config(RuntimeConfig::default())
    }
}

/// Opens a model file or folder and describes it (no worker yet).
fn open_model(canonical: PathBuf, id: String, request_timeout_ms: Option<u64>, backend: BackendKind) -> Result<(Arc<dyn Model>, Tokenizer, ModelInfo), EngineError> {
    let crate::models::Opened { model, tokenizer, weight_format } = crate::models::open_on(&canonical, backend)?;
    let model: Arc<dyn Model> = Arc::from(model);
    let cfg = model.config();
    if tokenizer.vocab_size() > cfg.vocab_size {
        return Err(EngineError::ModelLoad {
            path: canonical.display().to_string(),
            reason: format!("tokenizer has {} tokens but the model {}", tokenizer.vocab_size(), cfg.vocab_size),
        });
    }
    let info = ModelInfo {
        id,
        path: canonical,
        architecture: cfg.architecture.clone(),
        context_length: cfg.context_length,
        vocab_size: cfg.vocab_size,
        weight_bytes: model.weight_bytes(),
        decode_weight_bytes: model.decode_weight_bytes(),
        kv_bytes_per_position: model.kv_bytes_per_position(),
        warmup_ms: 0.0,
        request_timeout_ms,
        file_type: weight_format,
        last_access_ms: 0,
        draft_model: None,
        backend,
    };
    Ok((model, tokenizer, info))
}

/// The file or folder a load names, and the id it gets (the caller's, or
/// one made from the name).
fn resolve(path: &Path, id: Option<String>) -> Result<(PathBuf, String), EngineError> {
    let canonical = std::fs::canonicalize(path)
        .map_err(|e| EngineError::ModelLoad { path: path.display().to_string(), reason: format!("cannot open: {e}") })?;
    let id = id.unwrap_or_else(|| model_id_for(path));
    if id.is_empty() {
        return Err(EngineError::InvalidParams("model id must not be empty".into()));
    }
    Ok((canonical, id))
}

fn model_id_for(path: &Path) -> String {
    // A folder's whole name; a file's name without its extension.
    let name = if path.is_dir() { path.file_name() } else { path.file_stem() };
    let stem = name.and_then(|s| s.to_str()).unwrap_or("model");
    stem.to_owned()
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_config(config: RuntimeConfig) -> Self {
        Engine {
            shared: Arc::new(Shared {
                config: RwLock::new(Arc::new(config)),
                models: Mutex::default(),
                retired: Mutex::default(),
                flags: RwLock::default(),
                knobs: Arc::default(),
                control: Mutex::default(),
            }),
            loading: Mutex::default(),
            next_request: AtomicU64::new(0),
            t_start: Instant::now(),
            unix_start_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            latency: Arc::default(),
            flag_counts: Mutex::default(),
            control: Mutex::default(),
            config_source: ConfigSource::default(),
        }
    }

    /// An engine configured from files (`createEngine`, the CLI).
    pub fn open(options: EngineOptions) -> Result<Self, EngineError> {
        let mut engine = Engine::with_config(options.config.read()?);
        engine.config_source = options.config;
        if let Some(path) = &options.feature_flags_path {
            engine = engine.with_feature_flags(FlagStore::open(path)?);
        }
        Ok(engine)
    }

    /// Re-reads the runtime config file, keeping the override it was opened
    /// with. An unreadable or invalid file changes nothing and the error
    /// names the key; see `reload_config` for what applies when.
    pub fn reload_config_file(&self) -> Result<Vec<&'static str>, EngineError> {
        if self.config_source.path.is_none() {
            return Err(EngineError::InvalidParams("no config file was given (createEngine({ configPath }))".into()));
        }
        Ok(self.reload_config(self.config_source.read()?))
    }

    /// The settings in force (a snapshot: a reload replaces it).
    pub fn config(&self) -> Arc<RuntimeConfig> {
        self.shared.config()
    }

    /// Makes requests consult these feature flags (see `flags.rs`).
    pub fn with_feature_flags(self, flags: FlagStore) -> Self {
        *self.shared.flags.write().unwrap() = Some(Arc::new(flags));
        self
    }

    pub fn feature_flags(&self) -> Option<Arc<FlagStore>> {
        self.shared.flags.read().unwrap().clone()
    }

    /// Load-time warmup (`ttft_pipeline.warmup`): on without a flags file;
    /// with one, when Phase 5 and the TTFT pipeline are on (not per request:
    /// a model is loaded for everyone).
    fn warmup_enabled(&self) -> bool {
        let Some(store) = self.feature_flags() else { return true };
        let f = store.current();
        !f.emergency.kill_switch
            && f.phase5.enabled
            && f.phase5.rollout_percentage > 0.0
            && f.features.get("ttft_pipeline").is_some_and(|t| t.enabled && t.rollout_percentage > 0.0)
            && f.option("ttft_pipeline", "warmup") == Some(true)
    }

    /// How many requests had each gated feature on and off.
    pub fn feature_flag_counts(&self) -> Vec<(String, bool, u64)> {
        self.flag_counts.lock().unwrap().iter().map(|((f, on), n)| (f.clone(), *on, *n)).collect()
    }

    /// Makes room for one more model: evicts the least recently used model
    /// with nothing in flight, or refuses when every model is busy. Returns
    /// the ids it unloaded.
    fn evict_for_one_more(&self) -> Result<Vec<String>, EngineError> {
        let max = self.config().model_cache.max_models;
        let mut evicted = Vec::new();
        loop {
            let victim = {
                let models = self.shared.models.lock().unwrap();
                if models.len() < max {
                    return Ok(evicted);
                }
                models
                    .values()
                    .filter(|w| w.counters.in_flight.load(Ordering::Relaxed) == 0)
                    .min_by_key(|w| w.counters.last_used_ms.load(Ordering::Relaxed))
                    .map(|w| w.info.id.clone())
            };
            match victim {
                Some(id) => {
                    // Another caller may have removed it meanwhile; loop and re-check.
                    if self.unload_model(&id).is_ok() {
                        evicted.push(id);
                    }
                }
                None => {
                    return Err(EngineError::Overloaded(format!(
                        "model_cache.maxModels ({max}) models are loaded and all are serving requests"
                    )))
                }
            }
        }
    }

    /// Loads a GGUF model and starts its worker. Loading a path that is
    /// already loaded returns the existing model.
    pub fn load_model(&self, path: impl AsRef<Path>, id: Option<String>) -> Result<ModelInfo, EngineError> {
        self.load_model_with(path, id, ModelOptions::default())
    }

    /// `load_model` with per-model settings.
    pub fn load_model_with(&self, path: impl AsRef<Path>, id: Option<String>, options: ModelOptions) -> Result<ModelInfo, EngineError> {
        self.load(path, id, options).map(|l| l.info)
    }

    /// `load_model_with`, also saying which models it unloaded to make room.
    pub fn load(&self, path: impl AsRef<Path>, id: Option<String>, options: ModelOptions) -> Result<Loaded, EngineError> {
        let path = path.as_ref();
        if options.request_timeout_ms == Some(0) {
            return Err(EngineError::InvalidParams("requestTimeoutMs must be at least 1".into()));
        }
        let (canonical, id) = resolve(path, id)?;
        let _loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = self.shared.models.lock().unwrap().get(&id) {
            if w.info.path == canonical && w.info.backend == options.backend {
                return Ok(Loaded { info: w.info.clone(), evicted: Vec::new() });
            }
            if w.info.path == canonical {
                return Err(EngineError::InvalidParams(format!(
                    "model id '{id}' is already loaded on the {} backend; give the {} one another id",
                    w.info.backend.name(),
                    options.backend.name()
                )));
            }
            return Err(EngineError::InvalidParams(format!(
                "model id '{id}' is already loaded from {}",
                w.info.path.display()
            )));
        }

        let evicted = self.evict_for_one_more()?;
        let (model, tokenizer, info) = open_model(canonical, id.clone(), options.request_timeout_ms, options.backend)?;
        let canonical = info.path.clone();
        let text_of = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or("").to_owned();
        let template = ChatTemplate::new(tokenizer.chat_template.as_deref(), &text_of(tokenizer.bos_id), &text_of(tokenizer.eos_id))
            .map_err(|e| EngineError::ModelLoad { path: canonical.display().to_string(), reason: e.to_string() })?;
        let tokenizer = Arc::new(tokenizer);
        let (tx, rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        counters.last_used_ms.store(self.t_start.elapsed().as_millis() as u64, Ordering::Relaxed);
        let config = self.config();
        let kv_cfg = &config.kv_cache;
        let n_blocks = config.kv_cache_bytes() / (model.kv_bytes_per_position() * kv_cfg.block_size).max(1);
        if n_blocks < 2 {
            return Err(EngineError::ModelLoad {
                path: info.path.display().to_string(),
                reason: format!("kv_cache.memoryMiB = {} holds fewer than two blocks of this model", kv_cfg.memory_mib),
            });
        }
        let kv = model.new_kv_store(kv_cfg.block_size, n_blocks);
        let pool = BlockPool::new(n_blocks, kv_cfg.block_size, kv_cfg.prefix_caching);
        counters.kv_blocks_total.store(n_blocks, Ordering::Relaxed);
        counters.kv_block_bytes.store(kv.block_bytes(), Ordering::Relaxed);
        let settings = Settings {
            max_batch: config.max_batch(),
            prefill_chunk: config.scheduler.prefill_chunk,
            prefetch_waiting: config.scheduler.prefetch_waiting && kv_cfg.prefix_caching,
            stream_buffer: config.scheduler.stream_buffer,
            speculative: config.speculative.clone(),
        };
        let warm = self.warmup_enabled();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (tokenizer, counters, latency, knobs) =
                (tokenizer.clone(), counters.clone(), self.latency.clone(), self.shared.knobs.clone());
            std::thread::Builder::new()
                .name(format!("mlx-serving:{id}"))
                .spawn(move || {
                    let mut w = WorkerLoop::new(model, tokenizer, counters, latency, knobs, kv, pool, settings);
                    let took = if warm { w.warm_up() } else { Duration::ZERO };
                    let _ = ready_tx.send(took);
                    w.run(rx)
                })
                .map_err(|e| EngineError::Internal(format!("cannot start model thread: {e}")))?
        };
        // Loading returns once the model is warm: the first request is then no slower than the tenth.
        let mut info = info;
        info.warmup_ms = ready_rx.recv().map_err(|_| EngineError::Internal("model thread ended during warmup".into()))?.as_secs_f64() * 1e3;
        let breaker = Arc::new(Breaker::new(config.qos.circuit_breaker));
        let worker = Arc::new(Worker {
            info: info.clone(),
            tokenizer,
            draft: Mutex::new(None),
            template,
            tx,
            counters,
            breaker,
            thread: Mutex::new(Some(thread)),
        });

        let mut models = self.shared.models.lock().unwrap();
        if let Some(existing) = models.get(&id) {
            // Another caller loaded the same id meanwhile; keep theirs.
            let existing = existing.clone();
            drop(models);
            worker.stop();
            return Ok(Loaded { info: existing.info.clone(), evicted });
        }
        models.insert(id, worker);
        drop(models);
        self.start_control();
        Ok(Loaded { info, evicted })
    }

    /// Stops the model's worker; its running requests end with `Cancelled`.
    pub fn unload_model(&self, id: &str) -> Result<(), EngineError> {
        let mut models = self.shared.models.lock().unwrap();
        let w = models.remove(id).ok_or_else(|| EngineError::ModelNotLoaded(id.to_owned()))?;
        let counted = self.retire(&w);
        drop(models);
        self.stop_worker(&w, counted);
        Ok(())
    }

    pub fn list_models(&self) -> Vec<ModelInfo> {
        let mut v: Vec<_> = self.shared.models.lock().unwrap().values().map(|w| self.info_of(w)).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn model_info(&self, id: &str) -> Option<ModelInfo> {
        self.shared.models.lock().unwrap().get(id).map(|w| self.info_of(w))
    }

    fn info_of(&self, w: &Worker) -> ModelInfo {
        let mut info = w.info.clone();
        info.last_access_ms = self.unix_start_ms + w.counters.last_used_ms.load(Ordering::Relaxed);
        info.draft_model = w.draft.lock().unwrap().as_ref().map(|(d, _)| d.id.clone());
        info
    }

    /// Whether requests may name `model`: a loaded model's id, or the name
    /// of the canary in force (routed to one of its arms by `submit`).
    pub fn serves(&self, model: &str) -> bool {
        self.model_info(model).is_some() || self.shared.control.lock().unwrap().routes(model)
    }

    /// TTFT, inter-token and end-to-end latency histograms of every request so far.
    pub fn latency_histograms(&self) -> Histograms {
        self.latency.snapshot()
    }

    fn worker(&self, id: &str) -> Result<Arc<Worker>, EngineError> {
        self.shared.models.lock().unwrap().get(id).cloned().ok_or_else(|| EngineError::ModelNotLoaded(id.to_owned()))
    }

    /// Token ids of `text`, with control tokens parsed as in a prompt.
    pub fn tokenize(&self, model: &str, text: &str, add_bos: Option<bool>) -> Result<Vec<u32>, EngineError> {
        let w = self.worker(model)?;
        w.tokenizer.encode(text, add_bos.unwrap_or(w.tokenizer.add_bos), true)
    }

    /// A token's own bytes, as logprobs report them (control tokens as their text).
    pub fn token_bytes(&self, model: &str, id: u32) -> Result<Vec<u8>, EngineError> {
        Ok(self.worker(model)?.tokenizer.bytes_with_specials(id).to_vec())
    }

    pub fn detokenize(&self, model: &str, ids: &[u32]) -> Result<String, EngineError> {
        let tk = &self.worker(model)?.tokenizer;
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= tk.vocab_size()) {
            return Err(EngineError::InvalidParams(format!("token id {bad} is not in the vocabulary (size {})", tk.vocab_size())));
        }
        // Control tokens as their text, so tokenize (which parses them) and
        // detokenize round-trip, as Hugging Face's decode does by default.
        Ok(tk.decode_with_specials(ids))
    }

    /// The prompt a request's chat messages render to.
    pub fn apply_chat_template(&self, model: &str, messages: &[ChatMessage]) -> Result<String, EngineError> {
        self.worker(model)?.template.render(messages, true)
    }

    /// Validates and queues a request; its tokens arrive on the handle.
    pub fn submit(&self, mut req: GenerateRequest) -> Result<RequestHandle, EngineError> {
        let t_submit = Instant::now();
        let id = self.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        let rid = req.request_id.clone().unwrap_or_else(|| id.to_string());
        // A canary's name routes to one of its arms by the request id.
        let mut arm = None;
        if let Some((model, a)) = self.shared.control.lock().unwrap().route(&req.model, &rid) {
            req.model = model;
            arm = Some(a);
        }
        let w = self.worker(&req.model)?;
        let config = self.config();
        let (prompt, max_tokens) = self.tokenize_request(&w, &req, &config)?;
        let timeout_ms = [req.timeout_ms, w.info.request_timeout_ms]
            .into_iter()
            .flatten()
            .min()
            .or(Some(config.streaming.request_timeout).filter(|&t| t > 0));
        // With a flags file, priority classes apply to the requests the
        // `batching.priority_scheduling` rollout includes.
        let priority = match self.feature_flags() {
            Some(f) if !f.current().evaluate("batching.priority_scheduling", &rid).enabled => Priority::Default,
            _ => req.priority,
        };
        let (in_flight, queued, ticket) = self.admit(&w, &req.model, priority, prompt.len(), &config)?;
        let (mut features, prefix_cache, speculative) = self.gated_features(&rid, &config);
        let (events_tx, events_rx) = unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let unread = Arc::new(AtomicUsize::new(0));
        if let Some(a) = arm {
            features.push(format!("canary.{}", a.as_str()));
        }
        let job = Job {
            prompt,
            max_tokens,
            sampling: req.sampling,
            stop_sequences: req.stop_sequences,
            stop_token_ids: req.stop_token_ids,
            ignore_eos: req.ignore_eos,
            top_logprobs: req.top_logprobs,
            priority,
            cache_salt: req.cache_salt,
            prefix_cache,
            speculative,
            pin_prefix: req.pin_prefix,
            features,
            deadline: timeout_ms.map(|ms| (t_submit + Duration::from_millis(ms), ms)),
            t_submit,
            cancel: cancel.clone(),
            unread: unread.clone(),
            events: events_tx,
            in_flight: Some(in_flight),
            queued: Some(queued),
            ticket,
        };
        w.tx.send(Msg::Job(Box::new(job))).map_err(|_| EngineError::ModelNotLoaded(req.model.clone()))?;
        Ok(RequestHandle { id, events: events_rx, unread, cancel })
    }

    /// The checked, tokenized prompt and the tokens it may generate.
    fn tokenize_request(&self, w: &Worker, req: &GenerateRequest, config: &RuntimeConfig) -> Result<(Vec<u32>, usize), EngineError> {
        req.validate()?;
        req.check_limits(&config.limits)?;
        let tk = &w.tokenizer;
        let prompt = match &req.input {
            Input::Prompt(text) => tk.encode(text, tk.add_bos, true)?,
            Input::Tokens(ids) => {
                PromptFit::check_vocabulary(ids, w.info.vocab_size)?;
                ids.clone()
            }
            Input::Messages(msgs) => {
                let text = w.template.render(msgs, true)?;
                // Templates write BOS themselves when the model wants one.
                tk.encode(&text, false, true)?
            }
        };
        let max_tokens = PromptFit {
            n_prompt_tokens: prompt.len(),
            context_length: w.info.context_length,
            kv_positions: w.counters.kv_blocks_total.load(Ordering::Relaxed) * config.kv_cache.block_size,
            max_prompt_tokens: config.limits.max_prompt_tokens,
            max_tokens_cap: config.streaming.max_tokens,
        }
        .max_tokens(req)?;
        Ok((prompt, max_tokens))
    }

    /// Admission: a bounded number of requests in flight per model, a
    /// bounded queue of requests and prompt tokens waiting to run (QoS
    /// actions may have lowered the limits for now), then the breaker. The
    /// guards it returns give the slots back when the request ends.
    fn admit(
        &self,
        w: &Worker,
        model: &str,
        priority: Priority,
        n_prompt_tokens: usize,
        config: &RuntimeConfig,
    ) -> Result<(InFlight, Queued, BreakerTicket), EngineError> {
        let (knobs, c) = (&self.shared.knobs, &w.counters);
        if priority == Priority::Background && knobs.shed_background() {
            return Err(Knobs::shed_error());
        }
        let limit = knobs.max_streams(config.streaming.max_concurrent_streams);
        if c.in_flight.fetch_add(1, Ordering::Relaxed) >= limit {
            c.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::Overloaded(format!("{limit} requests are in flight (streaming.maxConcurrentStreams)")));
        }
        let in_flight = InFlight(c.clone());
        let sched = &config.scheduler;
        let max_queued = knobs.max_queued(sched.max_queued_requests);
        let n_queued = c.queued.fetch_add(1, Ordering::Relaxed);
        let n_tokens = c.queued_tokens.fetch_add(n_prompt_tokens, Ordering::Relaxed);
        let queued = Queued(c.clone(), n_prompt_tokens);
        if n_queued >= max_queued {
            return Err(EngineError::Overloaded(format!("{n_queued} requests are queued (scheduler.maxQueuedRequests)")));
        }
        // A queue holding nothing admits any prompt the cache can hold.
        if n_queued > 0 && n_tokens + n_prompt_tokens > sched.max_queued_tokens {
            return Err(EngineError::Overloaded(format!(
                "{n_tokens} prompt tokens are queued; {n_prompt_tokens} more exceed scheduler.maxQueuedTokens"
            )));
        }
        c.last_used_ms.store(self.t_start.elapsed().as_millis() as u64, Ordering::Relaxed);

        // Last, so a refusal above never takes the half-open probe's place.
        let admission = w.breaker.admit(Instant::now()).map_err(|wait| {
            EngineError::Overloaded(format!(
                "model '{model}' is failing: its circuit breaker is open after consecutive failures; next probe in {} ms",
                wait.as_millis()
            ))
        })?;
        Ok((in_flight, queued, BreakerTicket { breaker: w.breaker.clone(), admission, settled: false }))
    }

    /// The gated features on for request id `rid` (counted), and whether
    /// they give it the prefix cache and speculative decoding. Without a
    /// flags file every gated feature follows the runtime config.
    fn gated_features(&self, rid: &str, config: &RuntimeConfig) -> (Vec<String>, bool, bool) {
        let Some(store) = self.feature_flags() else {
            return (Vec::new(), true, config.speculative.enabled);
        };
        let flags = store.current();
        let mut counts = self.flag_counts.lock().unwrap();
        let mut features = Vec::new();
        for &name in GATED_FEATURES {
            let on = flags.evaluate(name, rid).enabled;
            *counts.entry((name.to_owned(), on)).or_default() += 1;
            if on {
                features.push(name.to_owned());
            }
        }
        let on = |f: &str| features.iter().any(|x| x == f);
        let (prefix_cache, speculative) = (on("ttft_pipeline.kv_prefetch"), on("ttft_pipeline.speculative"));
        (features, prefix_cache, speculative)
    }

    /// Stops every worker; running requests end with `Cancelled`.
    pub fn shutdown(&self) {
        if let Some(t) = self.control.lock().unwrap().take() {
            t.stop();
        }
        let workers: Vec<_> = {
            let mut models = self.shared.models.lock().unwrap();
            models.drain().map(|(_, w)| (self.retire(&w), w)).collect()
        };
        for (counted, w) in workers {
            self.stop_worker(&w, counted);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

mod control;
pub mod kv;
pub mod speculative;
mod draft;
mod stats;
mod worker;
pub use control::{CanaryStatus, ControlEvent, QosStatus};
pub use draft::DraftCompatibility;
pub use stats::EngineStats;
use stats::Totals;
use worker::{Settings, WorkerLoop};

#[cfg(test)]
mod tests;
