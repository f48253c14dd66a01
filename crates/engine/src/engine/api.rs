//! What callers hand the engine and get back: model info and load options,
//! the resolved request (`GenerateRequest`, built by `request.rs`), and the
//! handle whose events stream a request's tokens.

use super::*;
use crate::text::grammar::Constraint;
use crate::text::output::ReasoningFormat;
use crate::text::tools::{CallFormat, Tool, ToolCallDelta, ToolChoice};

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
    /// How its tool calls are written and parsed.
    pub tool_call_format: CallFormat,
}

/// Per-model settings given at load (a canary's candidate may differ from
/// its baseline only in these).
#[derive(Debug, Clone, Default)]
pub struct ModelOptions {
    /// Caps every request's timeout on this model, milliseconds.
    pub request_timeout_ms: Option<u64>,
    /// The backend to run it on (`cpu` unless asked).
    pub backend: BackendKind,
    /// `hermes` or `mistral`: how its tool calls are written (none: from
    /// its chat template and vocabulary).
    pub tool_call_format: Option<String>,
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
    /// Tokens generated before end-of-generation tokens, stop token ids and
    /// stop sequences may end the output.
    pub min_tokens: usize,
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
    /// What the output must follow (a JSON schema, regex or grammar).
    pub constraint: Option<Constraint>,
    /// Functions offered to the model; its calls arrive as `Event::ToolCall`.
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
    /// Several calls in one reply.
    pub parallel_tool_calls: bool,
    /// Whether `<think>` blocks go to `Event::Token::reasoning`.
    pub reasoning_format: ReasoningFormat,
}

impl GenerateRequest {
    /// Greedy, default limits, no stops: set the fields that differ.
    pub fn new(model: impl Into<String>, input: Input) -> Self {
        GenerateRequest {
            model: model.into(),
            input,
            max_tokens: None,
            min_tokens: 0,
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
            constraint: None,
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
            parallel_tool_calls: true,
            reasoning_format: ReasoningFormat::Auto,
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
    /// The model called tools (it stopped after its calls).
    ToolCalls,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
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
    /// `reasoning`: text of the model's `<think>` blocks, split out of `text`
    /// (see `ReasoningFormat`).
    Token { text: String, reasoning: String, token_id: u32, logprob: Option<f32>, top_logprobs: Vec<(u32, f32)> },
    /// A piece of a tool call the model is making (its text is not in any
    /// `Token`): see `ToolCallDelta`.
    ToolCall(ToolCallDelta),
    Done(Stats),
    Error(EngineError),
}

/// The caller's side of one request.
pub struct RequestHandle {
    pub id: u64,
    /// The prompt as the model reads it (template applied, tokenized).
    pub prompt_tokens: Vec<u32>,
    pub(super) events: UnboundedReceiver<Event>,
    /// Token events sent and not yet received: the worker pauses the
    /// sequence while this is at `scheduler.streamBuffer`.
    pub(super) unread: Arc<AtomicUsize>,
    pub(super) cancel: Arc<AtomicBool>,
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
