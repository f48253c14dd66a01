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
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::breaker::{self, Admission, Breaker};
use crate::chat::{ChatMessage, ChatTemplate};
use crate::config::RuntimeConfig;
use crate::error::EngineError;
use crate::flags::FlagStore;
use crate::gguf::GgufFile;
use crate::kv::{BlockId, BlockPool, KvStore};
use crate::metrics::{Histograms, LatencyMetrics};
use crate::models::{load_gguf, BatchToken, Model};
use crate::sampler::{top_logprobs, Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::tokenizer::{StreamDecoder, Tokenizer};

#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub id: String,
    pub path: PathBuf,
    pub architecture: String,
    pub context_length: usize,
    pub vocab_size: usize,
    pub weight_bytes: usize,
    pub file_type: String,
    /// Time the load-time warmup took (0 when it was off).
    pub warmup_ms: f64,
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
pub const GATED_FEATURES: &[&str] = &["ttft_pipeline.kv_prefetch"];

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
    pub fn parse(s: &str) -> Result<Self, EngineError> {
        match s {
            "urgent" => Ok(Priority::Urgent),
            "default" => Ok(Priority::Default),
            "background" => Ok(Priority::Background),
            other => Err(EngineError::InvalidParams(format!("priority must be urgent, default or background, got '{other}'"))),
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
    completed: AtomicU64,
    generated_tokens: AtomicU64,
    /// Forward passes to fail on purpose (tests of the failure paths).
    #[cfg(test)]
    inject_failures: AtomicUsize,
}

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
    pub n_completed: u64,
    pub n_generated_tokens: u64,
    /// Models whose circuit breaker is open or half-open.
    pub n_breakers_open: usize,
    pub n_breaker_transitions: u64,
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
    pin_prefix: bool,
    features: Vec<String>,
    deadline: Option<(Instant, u64)>,
    t_submit: Instant,
    cancel: Arc<AtomicBool>,
    unread: Arc<AtomicUsize>,
    events: UnboundedSender<Event>,
    _in_flight: InFlight,
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
    Shutdown,
}

struct Worker {
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
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
    config: RuntimeConfig,
    models: Mutex<HashMap<String, Arc<Worker>>>,
    /// Held while a model loads: concurrent loads of one id then share the
    /// first one's result instead of each reading the weights (and its KV
    /// pool) before all but one are thrown away.
    loading: Mutex<()>,
    next_request: AtomicU64,
    t_start: Instant,
    latency: Arc<LatencyMetrics>,
    flags: Option<Arc<FlagStore>>,
    /// Requests per (gated feature, on) since start.
    flag_counts: Mutex<std::collections::BTreeMap<(String, bool), u64>>,
}

impl Default for Engine {
    fn default() -> Self {
        Self::with_config(RuntimeConfig::default())
    }
}

fn model_id_for(path: &Path) -> String {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    stem.to_owned()
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_config(config: RuntimeConfig) -> Self {
        Engine {
            config,
            models: Mutex::default(),
            loading: Mutex::default(),
            next_request: AtomicU64::new(0),
            t_start: Instant::now(),
            latency: Arc::default(),
            flags: None,
            flag_counts: Mutex::default(),
        }
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Makes requests consult these feature flags (see `flags.rs`).
    pub fn with_feature_flags(mut self, flags: FlagStore) -> Self {
        self.flags = Some(Arc::new(flags));
        self
    }

    pub fn feature_flags(&self) -> Option<&FlagStore> {
        self.flags.as_deref()
    }

    /// Load-time warmup (`ttft_pipeline.warmup`): on without a flags file;
    /// with one, when Phase 5 and the TTFT pipeline are on (not per request:
    /// a model is loaded for everyone).
    fn warmup_enabled(&self) -> bool {
        let Some(store) = &self.flags else { return true };
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
    /// with nothing in flight, or refuses when every model is busy.
    fn evict_for_one_more(&self) -> Result<(), EngineError> {
        let max = self.config.model_cache.max_models;
        loop {
            let victim = {
                let models = self.models.lock().unwrap();
                if models.len() < max {
                    return Ok(());
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
                    let _ = self.unload_model(&id);
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
        let path = path.as_ref();
        let canonical = std::fs::canonicalize(path)
            .map_err(|e| EngineError::ModelLoad { path: path.display().to_string(), reason: format!("cannot open: {e}") })?;
        let id = id.unwrap_or_else(|| model_id_for(path));
        if id.is_empty() {
            return Err(EngineError::InvalidParams("model id must not be empty".into()));
        }
        let _loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = self.models.lock().unwrap().get(&id) {
            if w.info.path == canonical {
                return Ok(w.info.clone());
            }
            return Err(EngineError::InvalidParams(format!(
                "model id '{id}' is already loaded from {}",
                w.info.path.display()
            )));
        }

        self.evict_for_one_more()?;
        let g = GgufFile::open(&canonical)?;
        let model: Arc<dyn Model> = Arc::from(load_gguf(&g)?);
        let tokenizer = Tokenizer::from_gguf(&g).map_err(|e| EngineError::ModelLoad {
            path: canonical.display().to_string(),
            reason: e.to_string(),
        })?;
        if tokenizer.vocab_size() > model.config().vocab_size {
            return Err(EngineError::ModelLoad {
                path: canonical.display().to_string(),
                reason: format!("tokenizer has {} tokens but the model {}", tokenizer.vocab_size(), model.config().vocab_size),
            });
        }
        let text_of = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or("").to_owned();
        let template = ChatTemplate::new(tokenizer.chat_template.as_deref(), &text_of(tokenizer.bos_id), &text_of(tokenizer.eos_id))
            .map_err(|e| EngineError::ModelLoad { path: canonical.display().to_string(), reason: e.to_string() })?;
        let cfg = model.config();
        let info = ModelInfo {
            id: id.clone(),
            path: canonical,
            architecture: cfg.architecture.clone(),
            context_length: cfg.context_length,
            vocab_size: cfg.vocab_size,
            weight_bytes: model.weight_bytes(),
            warmup_ms: 0.0,
            file_type: g.tensor("blk.0.attn_q.weight").map(|t| t.qtype.name()).unwrap_or("?").to_owned(),
        };
        let tokenizer = Arc::new(tokenizer);
        let (tx, rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        counters.last_used_ms.store(self.t_start.elapsed().as_millis() as u64, Ordering::Relaxed);
        let kv_cfg = &self.config.kv_cache;
        let n_blocks = self.config.kv_cache_bytes() / (model.kv_bytes_per_position() * kv_cfg.block_size).max(1);
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
            max_batch: self.config.max_batch(),
            prefill_chunk: self.config.scheduler.prefill_chunk,
            stream_buffer: self.config.scheduler.stream_buffer,
        };
        let warm = self.warmup_enabled();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (tokenizer, counters, latency) = (tokenizer.clone(), counters.clone(), self.latency.clone());
            std::thread::Builder::new()
                .name(format!("mlx-serving:{id}"))
                .spawn(move || {
                    let mut w = WorkerLoop::new(model, tokenizer, counters, latency, kv, pool, settings);
                    let took = if warm { w.warm_up() } else { Duration::ZERO };
                    let _ = ready_tx.send(took);
                    w.run(rx)
                })
                .map_err(|e| EngineError::Internal(format!("cannot start model thread: {e}")))?
        };
        // Loading returns once the model is warm: the first request is then no slower than the tenth.
        let mut info = info;
        info.warmup_ms = ready_rx.recv().map_err(|_| EngineError::Internal("model thread ended during warmup".into()))?.as_secs_f64() * 1e3;
        let breaker = Arc::new(Breaker::new(self.config.qos.circuit_breaker));
        let worker = Arc::new(Worker { info: info.clone(), tokenizer, template, tx, counters, breaker, thread: Mutex::new(Some(thread)) });

        let mut models = self.models.lock().unwrap();
        if let Some(existing) = models.get(&id) {
            // Another caller loaded the same id meanwhile; keep theirs.
            let existing = existing.clone();
            drop(models);
            worker.stop();
            return Ok(existing.info.clone());
        }
        models.insert(id, worker);
        Ok(info)
    }

    /// Stops the model's worker; its running requests end with `Cancelled`.
    pub fn unload_model(&self, id: &str) -> Result<(), EngineError> {
        let w = self.models.lock().unwrap().remove(id).ok_or_else(|| EngineError::ModelNotLoaded(id.to_owned()))?;
        w.stop();
        Ok(())
    }

    pub fn list_models(&self) -> Vec<ModelInfo> {
        let mut v: Vec<_> = self.models.lock().unwrap().values().map(|w| w.info.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn model_info(&self, id: &str) -> Option<ModelInfo> {
        self.models.lock().unwrap().get(id).map(|w| w.info.clone())
    }

    pub fn stats(&self) -> EngineStats {
        let models = self.models.lock().unwrap();
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
            s.prefix_cache_queries += c.prefix_queries.load(Ordering::Relaxed);
            s.prefix_cache_hits += c.prefix_hits.load(Ordering::Relaxed);
            s.n_preemptions += c.preemptions.load(Ordering::Relaxed);
            s.n_breakers_open += (w.breaker.state() != breaker::BreakerState::Closed) as usize;
            s.n_breaker_transitions += w.breaker.transitions();
            s.n_completed += w.counters.completed.load(Ordering::Relaxed);
            s.n_generated_tokens += w.counters.generated_tokens.load(Ordering::Relaxed);
        }
        s
    }

    /// TTFT, inter-token and end-to-end latency histograms of every request so far.
    pub fn latency_histograms(&self) -> Histograms {
        self.latency.snapshot()
    }

    fn worker(&self, id: &str) -> Result<Arc<Worker>, EngineError> {
        self.models.lock().unwrap().get(id).cloned().ok_or_else(|| EngineError::ModelNotLoaded(id.to_owned()))
    }

    /// Token ids of `text`, with control tokens parsed as in a prompt.
    pub fn tokenize(&self, model: &str, text: &str, add_bos: Option<bool>) -> Result<Vec<u32>, EngineError> {
        let w = self.worker(model)?;
        w.tokenizer.encode(text, add_bos.unwrap_or(w.tokenizer.add_bos), true)
    }

    pub fn detokenize(&self, model: &str, ids: &[u32]) -> Result<String, EngineError> {
        Ok(self.worker(model)?.tokenizer.decode(ids))
    }

    /// The prompt a request's chat messages render to.
    pub fn apply_chat_template(&self, model: &str, messages: &[ChatMessage]) -> Result<String, EngineError> {
        self.worker(model)?.template.render(messages, true)
    }

    /// Validates and queues a request; its tokens arrive on the handle.
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestHandle, EngineError> {
        let t_submit = Instant::now();
        let w = self.worker(&req.model)?;
        let bad = |m: String| Err(EngineError::InvalidParams(m));
        req.sampling.validate()?;
        if let Some(m) = req.max_tokens {
            if m <= 0 {
                return bad(format!("maxTokens must be a positive integer, got {m}"));
            }
        }
        if req.top_logprobs > MAX_TOP_LOGPROBS {
            return bad(format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {}", req.top_logprobs));
        }
        if req.stop_sequences.iter().any(String::is_empty) {
            return bad("stop sequences must not be empty strings".into());
        }
        let lim = &self.config.limits;
        let over = |what: &str, n: usize, max: usize, key: &str| -> Result<(), EngineError> {
            if n > max {
                return Err(EngineError::InvalidParams(format!("{what}: {n} exceeds the limit of {max} (limits.{key})")));
            }
            Ok(())
        };
        over("stop sequences", req.stop_sequences.len(), lim.max_stop_sequences, "maxStopSequences")?;
        for s in &req.stop_sequences {
            over("stop sequence characters", s.chars().count(), lim.max_stop_sequence_chars, "maxStopSequenceChars")?;
        }
        over("stop token ids", req.stop_token_ids.len(), lim.max_stop_token_ids, "maxStopTokenIds")?;
        match &req.input {
            Input::Prompt(text) => over("prompt characters", text.len(), lim.max_prompt_chars, "maxPromptChars")?,
            Input::Tokens(ids) => over("prompt tokens", ids.len(), lim.max_prompt_tokens, "maxPromptTokens")?,
            Input::Messages(msgs) => {
                over("messages", msgs.len(), lim.max_messages, "maxMessages")?;
                let chars = msgs.iter().map(|m| m.content.len() + m.role.len()).sum();
                over("message characters", chars, lim.max_prompt_chars, "maxPromptChars")?;
            }
        }
        let tk = &w.tokenizer;
        let prompt = match &req.input {
            Input::Prompt(text) => tk.encode(text, tk.add_bos, true)?,
            Input::Tokens(ids) => {
                if let Some(&bad_id) = ids.iter().find(|&&t| t as usize >= w.info.vocab_size) {
                    return bad(format!("token id {bad_id} is outside the vocabulary (size {})", w.info.vocab_size));
                }
                ids.clone()
            }
            Input::Messages(msgs) => {
                if msgs.is_empty() {
                    return bad("messages must not be empty".into());
                }
                let text = w.template.render(msgs, true)?;
                // Templates write BOS themselves when the model wants one.
                tk.encode(&text, false, true)?
            }
        };
        if prompt.is_empty() {
            return bad("the prompt is empty".into());
        }
        over("prompt tokens", prompt.len(), lim.max_prompt_tokens, "maxPromptTokens")?;
        let ctx = w.info.context_length;
        if prompt.len() >= ctx {
            return bad(format!("the prompt has {} tokens but the context holds {ctx}", prompt.len()));
        }
        let room = ctx - prompt.len();
        let cap = self.config.streaming.max_tokens;
        if let Some(m) = req.max_tokens {
            if m as u64 > cap as u64 {
                return bad(format!("maxTokens {m} exceeds the configured limit streaming.maxTokens = {cap}"));
            }
        }
        let max_tokens = req.max_tokens.map(|m| m as usize).unwrap_or(cap).min(room);
        let timeout_ms = req.timeout_ms.or(Some(self.config.streaming.request_timeout).filter(|&t| t > 0));

        let c = &w.counters;
        let kv_positions = c.kv_blocks_total.load(Ordering::Relaxed) * self.config.kv_cache.block_size;
        if prompt.len() >= kv_positions {
            return bad(format!("the prompt has {} tokens but the KV cache holds {kv_positions} (kv_cache.memoryMiB)", prompt.len()));
        }

        // Admission: a bounded number of requests in flight per model, and a
        // bounded queue of requests and prompt tokens waiting to run.
        let limit = self.config.streaming.max_concurrent_streams;
        if c.in_flight.fetch_add(1, Ordering::Relaxed) >= limit {
            c.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::Overloaded(format!("{limit} requests are in flight (streaming.maxConcurrentStreams)")));
        }
        let in_flight = InFlight(c.clone());
        let sched = &self.config.scheduler;
        let n_queued = c.queued.fetch_add(1, Ordering::Relaxed);
        let n_tokens = c.queued_tokens.fetch_add(prompt.len(), Ordering::Relaxed);
        let queued = Queued(c.clone(), prompt.len());
        if n_queued >= sched.max_queued_requests {
            return Err(EngineError::Overloaded(format!("{n_queued} requests are queued (scheduler.maxQueuedRequests)")));
        }
        // A queue holding nothing admits any prompt the cache can hold.
        if n_queued > 0 && n_tokens + prompt.len() > sched.max_queued_tokens {
            return Err(EngineError::Overloaded(format!(
                "{n_tokens} prompt tokens are queued; {} more exceed scheduler.maxQueuedTokens",
                prompt.len()
            )));
        }
        w.counters.last_used_ms.store(self.t_start.elapsed().as_millis() as u64, Ordering::Relaxed);

        // Last, so a refusal above never takes the half-open probe's place.
        let admission = w.breaker.admit(Instant::now()).map_err(|wait| {
            EngineError::Overloaded(format!(
                "model '{}' is failing: its circuit breaker is open after consecutive failures; next probe in {} ms",
                req.model,
                wait.as_millis()
            ))
        })?;
        let ticket = BreakerTicket { breaker: w.breaker.clone(), admission, settled: false };
        let id = self.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        // Without a flags file every gated feature follows the runtime config.
        let mut features = Vec::new();
        let mut prefix_cache = true;
        if let Some(store) = &self.flags {
            let flags = store.current();
            let rid = req.request_id.clone().unwrap_or_else(|| id.to_string());
            let mut counts = self.flag_counts.lock().unwrap();
            for &name in GATED_FEATURES {
                let on = flags.evaluate(name, &rid).enabled;
                *counts.entry((name.to_owned(), on)).or_default() += 1;
                if on {
                    features.push(name.to_owned());
                }
            }
            prefix_cache = features.iter().any(|f| f == "ttft_pipeline.kv_prefetch");
        }
        let (events_tx, events_rx) = unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let unread = Arc::new(AtomicUsize::new(0));
        let job = Job {
            prompt,
            max_tokens,
            sampling: req.sampling,
            stop_sequences: req.stop_sequences,
            stop_token_ids: req.stop_token_ids,
            ignore_eos: req.ignore_eos,
            top_logprobs: req.top_logprobs,
            priority: req.priority,
            cache_salt: req.cache_salt,
            prefix_cache,
            pin_prefix: req.pin_prefix,
            features,
            deadline: timeout_ms.map(|ms| (t_submit + Duration::from_millis(ms), ms)),
            t_submit,
            cancel: cancel.clone(),
            unread: unread.clone(),
            events: events_tx,
            _in_flight: in_flight,
            queued: Some(queued),
            ticket,
        };
        w.tx.send(Msg::Job(Box::new(job))).map_err(|_| EngineError::ModelNotLoaded(req.model.clone()))?;
        Ok(RequestHandle { id, events: events_rx, unread, cancel })
    }

    /// Stops every worker; running requests end with `Cancelled`.
    pub fn shutdown(&self) {
        let workers: Vec<_> = self.models.lock().unwrap().drain().map(|(_, w)| w).collect();
        for w in workers {
            w.stop();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// State of one request inside the worker.
struct Sequence {
    job: Box<Job>,
    /// Admission order: ties within a priority go to the earliest.
    arrival: u64,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    /// Block table: the KV cache blocks of positions `0..n_cached`, and room
    /// for the positions being computed this step.
    blocks: Vec<BlockId>,
    /// Prefix-cache keys of the full blocks at the front of `blocks`.
    keys: Vec<u64>,
    /// Positions whose keys and values are in `blocks`.
    n_cached: usize,
    n_generated: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopMatcher,
    t_first_token: Option<Instant>,
    t_last_token: Option<Instant>,
}

impl Sequence {
    /// Tokens still to run through the model before the next one is sampled
    /// (the whole prompt at first, then 1 per step; more after preemption).
    fn pending(&self) -> usize {
        self.tokens.len() - self.n_cached
    }

    fn salt_key(&self, pool: &BlockPool) -> u64 {
        pool.salt_key(self.job.cache_salt.as_deref())
    }

    fn release_blocks(&mut self, pool: &mut BlockPool) {
        for b in self.blocks.drain(..) {
            pool.release(b);
        }
        self.keys.clear();
        self.n_cached = 0;
    }

    /// Takes the cached blocks of the longest prefix found in the prefix
    /// cache. At least one token is always left to compute, since sampling
    /// needs its logits.
    fn reuse_prefix(&mut self, pool: &mut BlockPool) {
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
    fn blocks_short(&self, bs: usize, n_positions: usize) -> usize {
        n_positions.div_ceil(bs).saturating_sub(self.blocks.len())
    }

    /// Allocates the blocks to hold `n_positions` positions; the caller has
    /// checked that the pool has them.
    fn grow(&mut self, pool: &mut BlockPool, n_positions: usize) {
        for _ in 0..self.blocks_short(pool.block_size(), n_positions) {
            self.blocks.push(pool.allocate().expect("blocks are counted before they are allocated"));
        }
    }

    /// Makes the blocks that became full findable in the prefix cache.
    fn register_full_blocks(&mut self, pool: &mut BlockPool) {
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

enum Outcome {
    Continue,
    Finished(FinishReason),
    Failed(EngineError),
    /// The caller went away: drop silently.
    Abandoned,
}

struct Settings {
    max_batch: usize,
    prefill_chunk: usize,
    stream_buffer: usize,
}

struct WorkerLoop {
    model: Arc<dyn Model>,
    tokenizer: Arc<Tokenizer>,
    counters: Arc<Counters>,
    latency: Arc<LatencyMetrics>,
    kv: KvStore,
    pool: BlockPool,
    running: Vec<Sequence>,
    /// Admitted, not running (batch full, no blocks, or preempted); one
    /// queue per priority, in arrival order.
    waiting: [VecDeque<Sequence>; 3],
    settings: Settings,
    next_arrival: u64,
    /// References held on pinned prefix blocks.
    pinned: Vec<BlockId>,
}

impl WorkerLoop {
    fn new(
        model: Arc<dyn Model>,
        tokenizer: Arc<Tokenizer>,
        counters: Arc<Counters>,
        latency: Arc<LatencyMetrics>,
        kv: KvStore,
        pool: BlockPool,
        settings: Settings,
    ) -> Self {
        WorkerLoop {
            model,
            tokenizer,
            counters,
            latency,
            kv,
            pool,
            running: Vec::new(),
            waiting: Default::default(),
            settings: Settings { max_batch: settings.max_batch.max(1), ..settings },
            next_arrival: 0,
            pinned: Vec::new(),
        }
    }

    /// Runs every batch shape the kernels specialise on once (1-4 tokens:
    /// the GEMM tile's remainders; 8 and 64: parallel activation
    /// quantization and full tiles; several sequences: the attention split)
    /// and the tokenizer, so the first request pays no first-touch costs
    /// (weight pages, thread start, lazy regex compilation).
    fn warm_up(&mut self) -> Duration {
        let t = Instant::now();
        let _ = self.tokenizer.encode("Warm up the tokenizer: 123, héllo!", false, true);
        let vocab = self.model.config().vocab_size as u32;
        let bs = self.pool.block_size();
        for (n_seqs, n_tokens) in [(1usize, 1usize), (2, 1), (3, 1), (4, 1), (8, 1), (1, 5), (1, 8), (1, 64)] {
            let per_seq = n_tokens.div_ceil(bs);
            if n_seqs * per_seq > self.pool.available() {
                continue;
            }
            let tables: Vec<Vec<BlockId>> = (0..n_seqs).map(|_| (0..per_seq).filter_map(|_| self.pool.allocate()).collect()).collect();
            let batch: Vec<BatchToken> = (0..n_seqs)
                .flat_map(|seq| (0..n_tokens).map(move |pos| BatchToken { token: (seq * 31 + pos * 7) as u32 % vocab, pos, seq, logits: pos + 1 == n_tokens }))
                .collect();
            let refs: Vec<&[BlockId]> = tables.iter().map(Vec::as_slice).collect();
            let (model, kv) = (&self.model, &mut self.kv);
            let _ = rayon::scope(|_| std::panic::catch_unwind(AssertUnwindSafe(|| model.forward(&batch, kv, &refs))));
            for b in tables.into_iter().flatten() {
                self.pool.release(b);
            }
        }
        t.elapsed()
    }

    fn n_waiting(&self) -> usize {
        self.waiting.iter().map(VecDeque::len).sum()
    }

    fn admit(&mut self, job: Box<Job>) {
        self.next_arrival += 1;
        let seq = Sequence {
            arrival: self.next_arrival,
            tokens: job.prompt.clone(),
            blocks: Vec::new(),
            keys: Vec::new(),
            n_cached: 0,
            n_generated: 0,
            sampler: Sampler::new(job.sampling.clone()),
            decoder: StreamDecoder::default(),
            stop: StopMatcher::new(job.stop_sequences.clone()),
            t_first_token: None,
            t_last_token: None,
            job,
        };
        self.waiting[seq.job.priority as usize].push_back(seq);
    }

    /// Publishes the scheduler's state; called before any final event is
    /// sent, so a caller that sees its request end sees the engine without it.
    fn publish(&self) {
        let c = &self.counters;
        c.running.store(self.running.len(), Ordering::Relaxed);
        c.waiting.store(self.n_waiting(), Ordering::Relaxed);
        c.kv_blocks_used.store(self.pool.used(), Ordering::Relaxed);
        c.kv_blocks_cached.store(self.pool.cached(), Ordering::Relaxed);
        c.kv_blocks_pinned.store(self.pinned.len(), Ordering::Relaxed);
        c.kv_blocks_touched.store(self.pool.touched(), Ordering::Relaxed);
        c.prefix_queries.store(self.pool.queries, Ordering::Relaxed);
        c.prefix_hits.store(self.pool.hits, Ordering::Relaxed);
    }

    /// Drops waiting requests whose caller left or whose deadline passed,
    /// then moves waiting sequences into the batch, highest priority first,
    /// while the batch has room and the cache has blocks for their prompt.
    fn fill(&mut self) {
        let now = Instant::now();
        for q in self.waiting.iter_mut() {
            q.retain(|s| {
                if s.job.abandoned() {
                    return false;
                }
                match s.job.deadline {
                    Some((at, ms)) if now >= at => {
                        let _ = s.job.events.send(Event::Error(EngineError::Timeout(ms)));
                        false
                    }
                    _ => true,
                }
            });
        }
        while self.running.len() < self.settings.max_batch {
            let Some(p) = (0..3).find(|&p| !self.waiting[p].is_empty()) else { break };
            let mut s = self.waiting[p].pop_front().unwrap();
            s.reuse_prefix(&mut self.pool);
            // Room for the whole prompt and the first generated token: a
            // sequence admitted now is never preempted by its own prefill.
            if s.blocks_short(self.pool.block_size(), s.tokens.len() + 1) > self.pool.available() {
                s.release_blocks(&mut self.pool);
                self.waiting[p].push_front(s);
                break;
            }
            if s.job.queued.take().is_some() && s.job.prefix_cache {
                // First run (not a preempted one coming back).
                self.pool.queries += s.tokens.len() as u64;
                self.pool.hits += s.n_cached as u64;
            }
            self.running.push(s);
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut paused = false;
        loop {
            // Idle: block for work. Paused (nothing could run, e.g. every
            // consumer is behind): wait briefly. Busy: take what arrived, step.
            let first = if self.running.is_empty() && self.n_waiting() == 0 {
                match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                }
            } else if paused {
                match rx.recv_timeout(Duration::from_millis(2)) {
                    Ok(m) => Some(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => Some(Msg::Shutdown),
                }
            } else {
                None
            };
            let mut shutdown = false;
            for msg in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                match msg {
                    Msg::Job(j) => self.admit(j),
                    Msg::Shutdown => shutdown = true,
                }
            }
            if shutdown {
                break;
            }
            self.fill();
            paused = !self.step();
            self.publish();
        }
        let mut all: Vec<Sequence> = self.running.drain(..).collect();
        all.extend(self.waiting.iter_mut().flat_map(|q| q.drain(..)));
        for s in all.iter_mut() {
            s.release_blocks(&mut self.pool);
        }
        for b in self.pinned.drain(..) {
            self.pool.release(b);
        }
        self.publish();
        for s in all {
            let _ = s.job.events.send(Event::Error(EngineError::Cancelled));
        }
    }

    /// Picks the sequence to preempt: lowest priority, then latest arrival.
    fn victim(&self) -> usize {
        (0..self.running.len()).max_by_key(|&i| (self.running[i].job.priority, self.running[i].arrival)).unwrap()
    }

    fn preempt(&mut self, i: usize) {
        // `remove`, not `swap_remove`: the batch keeps its arrival order.
        let mut s = self.running.remove(i);
        s.release_blocks(&mut self.pool);
        self.counters.preemptions.fetch_add(1, Ordering::Relaxed);
        self.waiting[s.job.priority as usize].push_front(s);
    }

    /// One batched forward: the next token of every decoding sequence, then
    /// prompt chunks up to the budget. Returns whether anything ran.
    fn step(&mut self) -> bool {
        let now = Instant::now();
        self.retire(|s| {
            if s.job.abandoned() {
                return Some(Outcome::Abandoned);
            }
            match s.job.deadline {
                Some((at, ms)) if now >= at => Some(Outcome::Failed(EngineError::Timeout(ms))),
                _ => None,
            }
        });
        if self.running.is_empty() {
            return false;
        }
        let buffer = self.settings.stream_buffer;
        let can_run = |s: &Sequence| s.job.unread.load(Ordering::Relaxed) < buffer;

        // Decode first: every running sequence with one pending token gets a
        // slot; preempt until the cache has the blocks they need.
        loop {
            let need: usize = self
                .running
                .iter()
                .filter(|s| s.pending() == 1 && can_run(s))
                .map(|s| s.blocks_short(self.pool.block_size(), s.n_cached + 1))
                .sum();
            if need <= self.pool.available() {
                break;
            }
            if self.running.len() == 1 {
                // A lone sequence that fills the whole cache ends here.
                self.retire(|_| Some(Outcome::Finished(FinishReason::Length)));
                return true;
            }
            let v = self.victim();
            self.preempt(v);
        }
        let mut batch = Vec::new();
        for (i, s) in self.running.iter_mut().enumerate() {
            if s.pending() == 1 && can_run(s) {
                let pos = s.n_cached;
                batch.push(BatchToken { token: s.tokens[pos], pos, seq: i, logits: true });
                s.grow(&mut self.pool, pos + 1);
            }
        }
        // Then prompt chunks, in batch order, as far as budget and blocks go.
        let mut budget = self.settings.prefill_chunk;
        let bs = self.pool.block_size();
        for (i, s) in self.running.iter_mut().enumerate() {
            if s.pending() < 2 || budget == 0 || !can_run(s) {
                continue;
            }
            let room = (s.blocks.len() + self.pool.available()) * bs - s.n_cached;
            let take = s.pending().min(budget).min(room);
            if take == 0 {
                break;
            }
            let (start, end) = (s.n_cached, s.n_cached + take);
            for pos in start..end {
                batch.push(BatchToken { token: s.tokens[pos], pos, seq: i, logits: pos + 1 == s.tokens.len() });
            }
            s.grow(&mut self.pool, end);
            budget -= take;
        }
        if batch.is_empty() {
            // Every sequence is paused on its consumer, or prompts wait for
            // blocks that running sequences hold: preempt the newest so the
            // oldest can progress.
            if self.running.iter().any(|s| s.pending() > 1 && can_run(s)) && self.running.len() > 1 {
                let v = self.victim();
                self.preempt(v);
                return true;
            }
            return false;
        }

        #[cfg(test)]
        if self.counters.inject_failures.load(Ordering::Relaxed) > 0 {
            self.counters.inject_failures.fetch_sub(1, Ordering::Relaxed);
            self.fail_all(EngineError::Generation("injected failure".into()));
            return true;
        }
        let model = self.model.clone();
        let tables: Vec<&[BlockId]> = self.running.iter().map(|s| s.blocks.as_slice()).collect();
        let kv = &mut self.kv;
        // Run the forward as a rayon job: this thread then waits once per
        // step instead of once per matmul, and the kernels' parallel loops
        // start from inside the pool.
        let result = rayon::scope(|_| std::panic::catch_unwind(AssertUnwindSafe(|| model.forward(&batch, kv, &tables))));
        drop(tables);
        let mut logits = match result {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                self.fail_all(EngineError::Generation(e.to_string()));
                return true;
            }
            Err(_) => {
                self.fail_all(EngineError::Internal("model forward panicked".into()));
                return true;
            }
        };
        for bt in &batch {
            let s = &mut self.running[bt.seq];
            s.n_cached = s.n_cached.max(bt.pos + 1);
        }
        for s in self.running.iter_mut() {
            s.register_full_blocks(&mut self.pool);
        }

        let vocab = self.model.config().vocab_size;
        let mut outcomes: Vec<Option<Outcome>> = (0..self.running.len()).map(|_| None).collect();
        for (bt, l) in batch.iter().filter(|b| b.logits).zip(logits.chunks_exact_mut(vocab)) {
            let s = &mut self.running[bt.seq];
            outcomes[bt.seq] = Some(Self::emit(&self.tokenizer, &self.counters, &self.latency, s, l));
        }
        let mut it = outcomes.into_iter();
        self.retire(|_| match it.next().flatten() {
            Some(Outcome::Continue) | None => None,
            other => other,
        });
        true
    }

    /// Samples the next token of `s` and sends what it releases.
    fn emit(tk: &Tokenizer, counters: &Counters, latency: &LatencyMetrics, s: &mut Sequence, logits: &mut [f32]) -> Outcome {
        // Alternatives come from the model's own distribution, before sampling edits the logits.
        let top = top_logprobs(logits, s.job.top_logprobs);
        let sampled = s.sampler.sample(logits, &s.tokens);
        let tok = sampled.token;
        let now = Instant::now();
        match s.t_last_token {
            None => {
                s.t_first_token = Some(now);
                latency.record(|h| h.ttft.observe((now - s.job.t_submit).as_secs_f64()));
            }
            Some(last) => latency.record(|h| h.itl.observe((now - last).as_secs_f64())),
        }
        s.t_last_token = Some(now);
        if (tk.is_eog(tok) && !s.job.ignore_eos) || s.job.stop_token_ids.contains(&tok) {
            return Outcome::Finished(FinishReason::Stop);
        }
        s.tokens.push(tok);
        s.n_generated += 1;
        counters.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let text = s.decoder.push(tk.piece(tok));
        let (text, stopped) = s.stop.push(&text);
        let ev = Event::Token { text, token_id: tok, logprob: Some(sampled.logprob), top_logprobs: top };
        s.job.unread.fetch_add(1, Ordering::Relaxed);
        if s.job.events.send(ev).is_err() {
            return Outcome::Abandoned;
        }
        if stopped {
            Outcome::Finished(FinishReason::Stop)
        } else if s.n_generated >= s.job.max_tokens {
            Outcome::Finished(FinishReason::Length)
        } else {
            Outcome::Continue
        }
    }

    /// Removes the sequences for which `decide` gives an outcome, frees
    /// their blocks, and tells their callers how they ended.
    fn retire(&mut self, mut decide: impl FnMut(&Sequence) -> Option<Outcome>) {
        let mut ended = Vec::new();
        let mut kept = Vec::with_capacity(self.running.len());
        for s in std::mem::take(&mut self.running) {
            match decide(&s) {
                None | Some(Outcome::Continue) => kept.push(s),
                Some(outcome) => ended.push((s, outcome)),
            }
        }
        self.running = kept;
        for (s, outcome) in ended.iter_mut() {
            // Before any final event, like the counters.
            s.job.ticket.settle(match outcome {
                Outcome::Finished(_) => breaker::Outcome::Success,
                Outcome::Failed(EngineError::Generation(_) | EngineError::Internal(_)) => breaker::Outcome::Failure,
                _ => breaker::Outcome::Neutral,
            });
            if s.job.pin_prefix && matches!(outcome, Outcome::Finished(_)) {
                // One more reference per full block: it never becomes evictable.
                for &key in &s.keys {
                    if let Some(b) = self.pool.lookup(key) {
                        if !self.pinned.contains(&b) {
                            self.pinned.push(b);
                        } else {
                            self.pool.release(b);
                        }
                    }
                }
            }
            s.release_blocks(&mut self.pool);
        }
        // Counters first, so a caller that sees its last event also sees the
        // engine without its sequence.
        self.publish();
        for (s, outcome) in ended {
            match outcome {
                Outcome::Continue | Outcome::Abandoned => {}
                Outcome::Failed(e) => {
                    let _ = s.job.events.send(Event::Error(e));
                }
                Outcome::Finished(reason) => self.finish(s, reason),
            }
        }
    }

    fn finish(&self, mut s: Sequence, reason: FinishReason) {
        // Text held back for UTF-8 or a possible stop sequence that never
        // completed belongs to the output.
        let tail = s.decoder.finish();
        let (mut tail, stopped) = s.stop.push(&tail);
        if !stopped {
            tail.push_str(&s.stop.flush());
        }
        if !tail.is_empty() {
            let last = *s.tokens.last().unwrap();
            let ev = Event::Token { text: tail, token_id: last, logprob: None, top_logprobs: Vec::new() };
            s.job.unread.fetch_add(1, Ordering::Relaxed);
            let _ = s.job.events.send(ev);
        }
        let now = Instant::now();
        let t_first = s.t_first_token.unwrap_or(now);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let decode_s = (now - t_first).as_secs_f64();
        let stats = Stats {
            n_prompt_tokens: s.job.prompt.len(),
            n_generated_tokens: s.n_generated,
            t_first_token_ms: ms(t_first - s.job.t_submit),
            t_total_ms: ms(now - s.job.t_submit),
            decode_tokens_per_s: if s.n_generated > 1 && decode_s > 0.0 { (s.n_generated - 1) as f64 / decode_s } else { 0.0 },
            finish_reason: reason,
            features: std::mem::take(&mut s.job.features),
        };
        self.latency.record(|h| h.e2e.observe((now - s.job.t_submit).as_secs_f64()));
        self.counters.completed.fetch_add(1, Ordering::Relaxed);
        let _ = s.job.events.send(Event::Done(stats));
    }

    fn fail_all(&mut self, e: EngineError) {
        self.retire(|_| Some(Outcome::Failed(e.clone())));
    }
}

#[cfg(test)]
mod tests;
