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

use std::collections::{HashMap, HashSet, VecDeque};
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
use crate::models::{BatchToken, Model};
use crate::sampler::{top_logprobs, Sampled, Sampler, SamplingParams};
use crate::text::stop::StopMatcher;
use crate::text::grammar::{Grammars, Guide};
use crate::text::tokenizer::{StreamDecoder, Tokenizer};
use crate::text::output::OutputParser;
use crate::text::tools::{CallFormat, CallTokens, MISTRAL_ARGS, MISTRAL_CALLS};

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
    /// Until this many tokens are out, nothing but `max_tokens` ends it.
    min_tokens: usize,
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
    /// The grammar its output follows.
    guide: Option<Guide>,
    /// The grammar a tool call the model opens follows, attached when the
    /// tag appears (`tool_choice: auto`).
    lazy_guide: Option<Guide>,
    /// Splits its output into content, reasoning and tool calls.
    output: OutputParser,
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
    /// The grammar compiler over this model's vocabulary. Its token trie
    /// takes tens of ms (~105 ms for a 49k vocabulary), so it is built on a
    /// thread of its own from the load on (`trie_build`); a constrained
    /// request that comes sooner waits for it.
    grammars: Arc<GrammarsCell>,
    trie_build: Mutex<Option<JoinHandle<()>>>,
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
    breaker: Arc<Breaker>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

type GrammarsCell = std::sync::OnceLock<Result<Arc<Grammars>, String>>;

/// The model's grammar compiler, built by the first caller.
fn grammars_of<'a>(cell: &'a GrammarsCell, tokenizer: &Arc<Tokenizer>, n_logits: usize) -> &'a Result<Arc<Grammars>, String> {
    cell.get_or_init(|| Grammars::new(tokenizer.clone(), n_logits).map(Arc::new))
}

impl Worker {
    fn stop(&self) {
        let _ = self.tx.send(Msg::Shutdown);
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
        if let Some(t) = self.trie_build.lock().unwrap().take() {
            let _ = t.join();
        }
    }

    fn grammars(&self) -> &Result<Arc<Grammars>, String> {
        grammars_of(&self.grammars, &self.tokenizer, self.info.vocab_size)
    }
}

pub struct Engine {
    shared: Arc<Shared>,
    /// Loads in progress: a second load of an id waits for the first and
    /// then shares its result, instead of reading the weights again; loads
    /// of other ids run side by side, so a slow file holds up no other load.
    loading: load::Loading,
    /// Requests being templated and tokenized now: at most one per core, so
    /// a burst of long prompts queues here instead of each tokenizing at
    /// once (32 prompts of 1 MiB at once took a server to 2.8 GB).
    preparing: (Mutex<usize>, std::sync::Condvar),
    /// Requests in `submit` by the caller's request id, with their cancel
    /// flags: a caller that gives up before it has a handle (a JavaScript
    /// `AbortSignal`) stops the templating and the wait for a turn.
    pending: Mutex<submit::Pending>,
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
            loading: load::Loading::default(),
            preparing: Default::default(),
            pending: Mutex::default(),
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
        let w = self.worker(model)?;
        // Renders take the same turns as submits: one per core at a time.
        let _turn = self.prepare_turn(&AtomicBool::new(false))?;
        w.template.render(messages, true, self.config().limits.max_prompt_chars)
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

mod api;
mod control;
pub mod kv;
pub mod speculative;
mod draft;
mod load;
mod stats;
mod submit;
mod worker;
pub use control::{CanaryStatus, ControlEvent, QosStatus};
pub use draft::DraftCompatibility;
pub use stats::EngineStats;
pub use api::*;
use load::{open_model, resolve};
use stats::Totals;
use worker::{Settings, WorkerLoop};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod structured_tests;
#[cfg(test)]
mod bounds_tests;
#[cfg(test)]
mod ending_tests;
