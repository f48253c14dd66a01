//! The engine: loaded models, each owned by one worker thread that runs all
//! of that model's requests together (every step is one batched forward of
//! the running sequences' next tokens plus a chunk of waiting prompts).
//!
//! Callers talk to a worker by messages; each request gets its own channel of
//! `Event`s. Validation, chat templating and tokenization happen on the
//! caller's thread, before the request reaches the worker.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::config::RuntimeConfig;
use crate::error::EngineError;
use crate::gguf::GgufFile;
use crate::models::{load_gguf, BatchToken, KvCache, Model};
use crate::sampler::{top_logprobs, Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Prompt tokens prefilled per step across all sequences: bounds how long a
/// step (and so every running stream's next token) can take.
const PREFILL_CHUNK: usize = 256;

#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub id: String,
    pub path: PathBuf,
    pub architecture: String,
    pub context_length: usize,
    pub vocab_size: usize,
    pub weight_bytes: usize,
    pub file_type: String,
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
    pub events: UnboundedReceiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl RequestHandle {
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
    /// Bytes held by the running sequences' KV caches.
    kv_bytes: AtomicUsize,
    completed: AtomicU64,
    generated_tokens: AtomicU64,
}

#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub n_models: usize,
    pub n_running: usize,
    pub n_waiting: usize,
    pub kv_bytes: usize,
    pub n_completed: u64,
    pub n_generated_tokens: u64,
}

struct Job {
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    stop_sequences: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    top_logprobs: usize,
    deadline: Option<(Instant, u64)>,
    t_submit: Instant,
    cancel: Arc<AtomicBool>,
    events: UnboundedSender<Event>,
    _in_flight: InFlight,
}

/// Counts a request as in flight until its job is dropped, however it ends.
struct InFlight(Arc<Counters>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
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
    next_request: AtomicU64,
    t_start: Instant,
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
        Engine { config, models: Mutex::default(), next_request: AtomicU64::new(0), t_start: Instant::now() }
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
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
            file_type: g.tensor("blk.0.attn_q.weight").map(|t| t.qtype.name()).unwrap_or("?").to_owned(),
        };
        let tokenizer = Arc::new(tokenizer);
        let (tx, rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        counters.last_used_ms.store(self.t_start.elapsed().as_millis() as u64, Ordering::Relaxed);
        let max_batch = self.config.max_batch();
        let thread = {
            let (tokenizer, counters) = (tokenizer.clone(), counters.clone());
            std::thread::Builder::new()
                .name(format!("mlx-serving:{id}"))
                .spawn(move || WorkerLoop::new(model, tokenizer, counters, max_batch).run(rx))
                .map_err(|e| EngineError::Internal(format!("cannot start model thread: {e}")))?
        };
        let worker = Arc::new(Worker { info: info.clone(), tokenizer, template, tx, counters, thread: Mutex::new(Some(thread)) });

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
            s.kv_bytes += w.counters.kv_bytes.load(Ordering::Relaxed);
            s.n_completed += w.counters.completed.load(Ordering::Relaxed);
            s.n_generated_tokens += w.counters.generated_tokens.load(Ordering::Relaxed);
        }
        s
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

        // Admission: a bounded number of requests in flight per model.
        let limit = self.config.streaming.max_concurrent_streams;
        if w.counters.in_flight.fetch_add(1, Ordering::Relaxed) >= limit {
            w.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::Overloaded(format!("{limit} requests are in flight (streaming.maxConcurrentStreams)")));
        }
        let in_flight = InFlight(w.counters.clone());
        w.counters.last_used_ms.store(self.t_start.elapsed().as_millis() as u64, Ordering::Relaxed);

        let id = self.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        let (events_tx, events_rx) = unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job {
            prompt,
            max_tokens,
            sampling: req.sampling,
            stop_sequences: req.stop_sequences,
            stop_token_ids: req.stop_token_ids,
            ignore_eos: req.ignore_eos,
            top_logprobs: req.top_logprobs,
            deadline: timeout_ms.map(|ms| (t_submit + Duration::from_millis(ms), ms)),
            t_submit,
            cancel: cancel.clone(),
            events: events_tx,
            _in_flight: in_flight,
        };
        w.tx.send(Msg::Job(Box::new(job))).map_err(|_| EngineError::ModelNotLoaded(req.model.clone()))?;
        Ok(RequestHandle { id, events: events_rx, cancel })
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
    cache: KvCache,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    n_prefilled: usize,
    n_generated: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopMatcher,
    t_first_token: Option<Instant>,
}

impl Sequence {
    fn prefilling(&self) -> bool {
        self.n_prefilled < self.job.prompt.len()
    }
}

enum Outcome {
    Continue,
    Finished(FinishReason),
    Failed(EngineError),
    /// The caller went away: drop silently.
    Abandoned,
}

struct WorkerLoop {
    model: Arc<dyn Model>,
    tokenizer: Arc<Tokenizer>,
    counters: Arc<Counters>,
    running: Vec<Sequence>,
    /// Admitted, not yet running (the batch is full), in arrival order.
    waiting: VecDeque<Box<Job>>,
    max_batch: usize,
}

impl WorkerLoop {
    fn new(model: Arc<dyn Model>, tokenizer: Arc<Tokenizer>, counters: Arc<Counters>, max_batch: usize) -> Self {
        WorkerLoop { model, tokenizer, counters, running: Vec::new(), waiting: VecDeque::new(), max_batch: max_batch.max(1) }
    }

    fn admit(&mut self, job: Box<Job>) {
        self.waiting.push_back(job);
        self.counters.waiting.store(self.waiting.len(), Ordering::Relaxed);
    }

    /// Moves waiting requests into the batch while it has room; drops the
    /// ones whose caller left or whose deadline passed while they waited.
    fn fill(&mut self) {
        let now = Instant::now();
        self.waiting.retain(|j| {
            if j.cancel.load(Ordering::Relaxed) || j.events.is_closed() {
                return false;
            }
            match j.deadline {
                Some((at, ms)) if now >= at => {
                    let _ = j.events.send(Event::Error(EngineError::Timeout(ms)));
                    false
                }
                _ => true,
            }
        });
        while self.running.len() < self.max_batch {
            let Some(job) = self.waiting.pop_front() else { break };
            self.start(job);
        }
        self.counters.waiting.store(self.waiting.len(), Ordering::Relaxed);
    }

    fn start(&mut self, job: Box<Job>) {
        let sampler = Sampler::new(job.sampling.clone());
        let stop = StopMatcher::new(job.stop_sequences.clone());
        self.running.push(Sequence {
            cache: self.model.new_cache(),
            tokens: job.prompt.clone(),
            n_prefilled: 0,
            n_generated: 0,
            sampler,
            decoder: StreamDecoder::default(),
            stop,
            t_first_token: None,
            job,
        });
        self.counters.running.store(self.running.len(), Ordering::Relaxed);
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            // Idle: block for work. Busy: take whatever arrived, then step.
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(Msg::Job(j)) => self.admit(j),
                    Ok(Msg::Shutdown) | Err(_) => break,
                }
            }
            let mut shutdown = false;
            while let Ok(msg) = rx.try_recv() {
                match msg {
                    Msg::Job(j) => self.admit(j),
                    Msg::Shutdown => shutdown = true,
                }
            }
            if shutdown {
                for s in self.running.drain(..) {
                    let _ = s.job.events.send(Event::Error(EngineError::Cancelled));
                }
                for j in self.waiting.drain(..) {
                    let _ = j.events.send(Event::Error(EngineError::Cancelled));
                }
                break;
            }
            self.fill();
            self.step();
        }
        self.counters.running.store(0, Ordering::Relaxed);
        self.counters.waiting.store(0, Ordering::Relaxed);
        self.counters.kv_bytes.store(0, Ordering::Relaxed);
    }

    /// One batched forward: a token for every decoding sequence, then prompt
    /// chunks up to the budget.
    fn step(&mut self) {
        self.retire(|s| {
            if s.job.cancel.load(Ordering::Relaxed) || s.job.events.is_closed() {
                return Some(Outcome::Abandoned);
            }
            match s.job.deadline {
                Some((at, ms)) if Instant::now() >= at => Some(Outcome::Failed(EngineError::Timeout(ms))),
                _ => None,
            }
        });
        if self.running.is_empty() {
            return;
        }

        let mut batch = Vec::new();
        let mut budget = PREFILL_CHUNK;
        for (i, s) in self.running.iter_mut().enumerate() {
            if !s.prefilling() {
                let pos = s.tokens.len() - 1;
                batch.push(BatchToken { token: s.tokens[pos], pos, seq: i, logits: true });
            }
        }
        for (i, s) in self.running.iter_mut().enumerate() {
            if s.prefilling() && budget > 0 {
                let end = (s.n_prefilled + budget).min(s.job.prompt.len());
                for pos in s.n_prefilled..end {
                    batch.push(BatchToken { token: s.tokens[pos], pos, seq: i, logits: pos + 1 == s.job.prompt.len() });
                }
                budget -= end - s.n_prefilled;
                s.n_prefilled = end;
            }
        }

        let model = self.model.clone();
        let mut caches: Vec<&mut KvCache> = self.running.iter_mut().map(|s| &mut s.cache).collect();
        // Run the forward as a rayon job: this thread then waits once per
        // step instead of once per matmul, and the kernels' parallel loops
        // start from inside the pool.
        let result = rayon::scope(|_| std::panic::catch_unwind(AssertUnwindSafe(|| model.forward(&batch, &mut caches))));
        drop(caches);
        let mut logits = match result {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return self.fail_all(EngineError::Generation(e.to_string())),
            Err(_) => return self.fail_all(EngineError::Internal("model forward panicked".into())),
        };

        let vocab = self.model.config().vocab_size;
        let mut outcomes: Vec<Option<Outcome>> = (0..self.running.len()).map(|_| None).collect();
        for (bt, l) in batch.iter().filter(|b| b.logits).zip(logits.chunks_exact_mut(vocab)) {
            let s = &mut self.running[bt.seq];
            outcomes[bt.seq] = Some(Self::emit(&self.tokenizer, &self.counters, s, l));
        }
        let mut it = outcomes.into_iter();
        self.retire(|_| match it.next().flatten() {
            Some(Outcome::Continue) | None => None,
            other => other,
        });
    }

    /// Samples the next token of `s` and sends what it releases.
    fn emit(tk: &Tokenizer, counters: &Counters, s: &mut Sequence, logits: &mut [f32]) -> Outcome {
        // Alternatives come from the model's own distribution, before sampling edits the logits.
        let top = top_logprobs(logits, s.job.top_logprobs);
        let sampled = s.sampler.sample(logits, &s.tokens);
        let tok = sampled.token;
        if s.t_first_token.is_none() {
            s.t_first_token = Some(Instant::now());
        }
        if (tk.is_eog(tok) && !s.job.ignore_eos) || s.job.stop_token_ids.contains(&tok) {
            return Outcome::Finished(FinishReason::Stop);
        }
        s.tokens.push(tok);
        s.n_generated += 1;
        counters.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let text = s.decoder.push(tk.piece(tok));
        let (text, stopped) = s.stop.push(&text);
        let ev = Event::Token { text, token_id: tok, logprob: Some(sampled.logprob), top_logprobs: top };
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

    /// Removes the sequences for which `decide` gives an outcome, telling
    /// their callers how they ended.
    fn retire(&mut self, mut decide: impl FnMut(&Sequence) -> Option<Outcome>) {
        let mut kept = Vec::with_capacity(self.running.len());
        for mut s in self.running.drain(..) {
            let outcome = decide(&s);
            if !matches!(outcome, None | Some(Outcome::Continue)) {
                // Counters first, so a caller that sees its last event also
                // sees the engine without its sequence.
                self.counters.running.fetch_sub(1, Ordering::Relaxed);
                self.counters.kv_bytes.fetch_sub(s.cache.bytes().min(self.counters.kv_bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
            }
            match outcome {
                None | Some(Outcome::Continue) => kept.push(s),
                Some(Outcome::Abandoned) => {}
                Some(Outcome::Failed(e)) => {
                    let _ = s.job.events.send(Event::Error(e));
                }
                Some(Outcome::Finished(reason)) => {
                    // Text held back for UTF-8 or a possible stop sequence
                    // that never completed belongs to the output.
                    let mut tail = s.decoder.finish();
                    let (mut out, stopped) = s.stop.push(&tail);
                    if !stopped {
                        out.push_str(&s.stop.flush());
                    }
                    tail = out;
                    if !tail.is_empty() {
                        let last = *s.tokens.last().unwrap();
                        let ev = Event::Token { text: tail, token_id: last, logprob: None, top_logprobs: Vec::new() };
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
                        decode_tokens_per_s: if s.n_generated > 1 && decode_s > 0.0 {
                            (s.n_generated - 1) as f64 / decode_s
                        } else {
                            0.0
                        },
                        finish_reason: reason,
                    };
                    let _ = s.job.events.send(Event::Done(stats));
                    self.counters.completed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.running = kept;
        self.counters.running.store(self.running.len(), Ordering::Relaxed);
        let kv: usize = self.running.iter().map(|s| s.cache.bytes()).sum();
        self.counters.kv_bytes.store(kv, Ordering::Relaxed);
    }

    fn fail_all(&mut self, e: EngineError) {
        self.retire(|_| Some(Outcome::Failed(e.clone())));
    }
}

#[cfg(test)]
mod tests;
