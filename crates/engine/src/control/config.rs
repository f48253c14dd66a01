//! `config/runtime.yaml`: the engine's serving settings. Unknown keys and bad
//! values are errors that name the key's path, never silently ignored.

use std::path::Path;

use serde::Deserialize;

use crate::error::EngineError;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct RuntimeConfig {
    pub streaming: Streaming,
    pub batching: Batching,
    pub model_cache: ModelCache,
    pub scheduler: Scheduler,
    pub kv_cache: KvCacheConfig,
    pub limits: Limits,
    pub qos: Qos,
    pub speculative: Speculative,
}

/// Speculative decoding: a sequence's next tokens are guessed, by prompt
/// lookup (an earlier place where its last few tokens occurred, in the
/// prompt or its own output) or by the attached draft model, and checked in
/// the same forward as its next token; every guess the model agrees with is
/// a token without a step of its own. Output keeps the model's distribution
/// (greedy output is unchanged; see `speculative.rs`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct Speculative {
    /// Without a flags file; with one, the `ttft_pipeline.speculative` flag
    /// decides per request.
    pub enabled: bool,
    /// Guessed tokens checked per step.
    pub max_draft_tokens: usize,
    /// Lengths of the suffix looked up, longest tried first.
    pub ngram_min: usize,
    pub ngram_max: usize,
    /// Speculate only while at most this many sequences run: a large batch
    /// already keeps the cores busy, and guesses would only add work.
    pub max_batch: usize,
}

impl Default for Speculative {
    fn default() -> Self {
        Speculative { enabled: false, max_draft_tokens: 4, ngram_min: 2, ngram_max: 3, max_batch: 4 }
    }
}

/// `qos.*`: the circuit breaker and the policy engine (see `qos.rs`).
pub type Qos = crate::control::qos::QosSettings;

/// Per model: fail fast after consecutive engine failures, then probe.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct CircuitBreakerConfig {
    pub enabled: bool,
    /// Consecutive failed requests (the model's forward failed) that open it.
    pub failure_threshold: u32,
    /// How long it stays open before one probe request is let through.
    pub open_ms: u64,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig { enabled: true, failure_threshold: 5, open_ms: 10_000 }
    }
}

/// Per-request caps, so one request cannot take the machine: each breach is
/// an `InvalidParams` error naming the limit.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct Limits {
    /// Prompt tokens (also bounded by the model's context and the KV cache).
    pub max_prompt_tokens: usize,
    /// Characters of prompt text or of all chat messages together, checked
    /// before tokenizing (tokenizing costs time too).
    pub max_prompt_chars: usize,
    pub max_messages: usize,
    pub max_stop_sequences: usize,
    /// Characters of each stop sequence.
    pub max_stop_sequence_chars: usize,
    pub max_stop_token_ids: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_prompt_tokens: 32_768,
            max_prompt_chars: 1 << 20,
            max_messages: 1024,
            max_stop_sequences: 16,
            max_stop_sequence_chars: 256,
            max_stop_token_ids: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct Scheduler {
    /// Prompt tokens prefilled per step across all sequences; decode tokens
    /// are scheduled first, so running streams never wait behind a long prompt.
    pub prefill_chunk: usize,
    /// Requests admitted but not yet running; more are refused (`Overloaded`).
    pub max_queued_requests: usize,
    /// Prompt tokens of the queued requests; more are refused (`Overloaded`).
    pub max_queued_tokens: usize,
    /// Token events a consumer may leave unread before its sequence pauses
    /// (backpressure on that stream alone).
    pub stream_buffer: usize,
    /// KV prefetch: prompt budget a step leaves unused goes to requests still
    /// waiting for a batch slot, whole blocks into the prefix cache, so their
    /// prefill is mostly done when they are scheduled.
    pub prefetch_waiting: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct KvCacheConfig {
    /// Memory for each model's paged KV cache, MiB (touched only as used).
    #[serde(rename = "memoryMiB")]
    pub memory_mib: f64,
    /// Positions per block.
    pub block_size: usize,
    /// Reuse the cached blocks of earlier prompts that start the same way.
    pub prefix_caching: bool,
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler { prefill_chunk: 256, max_queued_requests: 256, max_queued_tokens: 262_144, stream_buffer: 256, prefetch_waiting: false }
    }
}

impl Default for KvCacheConfig {
    fn default() -> Self {
        KvCacheConfig { memory_mib: 1024.0, block_size: 16, prefix_caching: true }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct Streaming {
    /// Generations running or waiting at once; more are refused (`Overloaded`, HTTP 429).
    pub max_concurrent_streams: usize,
    /// Most stream events handed to a consumer in one delivery.
    pub batch_size: usize,
    /// Default per-request timeout in ms (0: none); a request's own `timeoutMs` wins.
    pub request_timeout: u64,
    /// Output tokens of a request that names none, and the most one may ask
    /// for. `None` (the default): what the model's context leaves after the
    /// prompt, as vLLM and OpenAI do.
    pub max_tokens: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct Batching {
    /// `false`: one sequence per forward step (no continuous batching).
    pub enabled: bool,
    /// Sequences decoded together per step; more wait, in arrival order.
    pub max_batch_size: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct ModelCache {
    /// Models loaded at once; loading one more evicts the least recently used idle one.
    pub max_models: usize,
    pub eviction_policy: EvictionPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvictionPolicy {
    Lru,
}

impl Default for Streaming {
    fn default() -> Self {
        Streaming { max_concurrent_streams: 64, batch_size: 64, request_timeout: 0, max_tokens: None }
    }
}

impl Default for Batching {
    fn default() -> Self {
        Batching { enabled: true, max_batch_size: 32 }
    }
}

impl Default for ModelCache {
    fn default() -> Self {
        ModelCache { max_models: 4, eviction_policy: EvictionPolicy::Lru }
    }
}

/// Where an engine's runtime config comes from: the defaults, or a file that
/// `Engine::reload_config_file` re-reads, with an override the caller keeps
/// across reloads (the CLI's `--max-concurrent`).
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub path: Option<std::path::PathBuf>,
    pub max_concurrent_streams: Option<usize>,
}

impl ConfigSource {
    pub fn read(&self) -> Result<RuntimeConfig, EngineError> {
        let mut config = match &self.path {
            Some(path) => RuntimeConfig::from_file(path)?,
            None => RuntimeConfig::default(),
        };
        match self.max_concurrent_streams {
            Some(0) => return Err(EngineError::InvalidParams("maxConcurrentStreams must be at least 1".into())),
            Some(m) => config.streaming.max_concurrent_streams = m,
            None => {}
        }
        Ok(config)
    }
}

impl RuntimeConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, EngineError> {
        let path = path.as_ref();
        let text = crate::formats::filebuf::read_text(path, crate::formats::filebuf::MAX_CONFIG_TEXT)
            .map_err(|e| EngineError::InvalidParams(format!("cannot read config {}: {e}", path.display())))?;
        Self::from_yaml(&text).map_err(|e| EngineError::InvalidParams(format!("config {}: {e}", path.display())))
    }

    /// Parses and validates; errors read `key.path: reason`.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        // An empty file is the defaults.
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let cfg: RuntimeConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if path == "." { inner } else { format!("{path}: {inner}") }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        let positive = [
            ("streaming.maxConcurrentStreams", self.streaming.max_concurrent_streams),
            ("streaming.batchSize", self.streaming.batch_size),
            ("streaming.maxTokens", self.streaming.max_tokens.unwrap_or(1)),
            ("batching.maxBatchSize", self.batching.max_batch_size),
            ("model_cache.maxModels", self.model_cache.max_models),
            ("scheduler.prefillChunk", self.scheduler.prefill_chunk),
            ("scheduler.maxQueuedRequests", self.scheduler.max_queued_requests),
            ("scheduler.maxQueuedTokens", self.scheduler.max_queued_tokens),
            ("scheduler.streamBuffer", self.scheduler.stream_buffer),
            ("kv_cache.blockSize", self.kv_cache.block_size),
            ("limits.maxPromptTokens", self.limits.max_prompt_tokens),
            ("limits.maxPromptChars", self.limits.max_prompt_chars),
            ("limits.maxMessages", self.limits.max_messages),
            ("limits.maxStopSequenceChars", self.limits.max_stop_sequence_chars),
            ("qos.circuitBreaker.failureThreshold", self.qos.circuit_breaker.failure_threshold as usize),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(format!("{key}: must be at least 1"));
            }
        }
        let mib = self.kv_cache.memory_mib;
        if !(mib > 0.0 && mib <= 1048576.0) {
            return Err(format!("kv_cache.memoryMiB: must be above 0 and at most 1048576, got {mib}"));
        }
        self.qos.validate()?;
        let sp = &self.speculative;
        if !(1..=16).contains(&sp.max_draft_tokens) {
            return Err(format!("speculative.maxDraftTokens: must be 1 to 16, got {}", sp.max_draft_tokens));
        }
        if sp.ngram_min == 0 || sp.ngram_min > sp.ngram_max || sp.ngram_max > 8 {
            return Err(format!("speculative.ngramMin/ngramMax: need 1 <= min <= max <= 8, got {} and {}", sp.ngram_min, sp.ngram_max));
        }
        if self.kv_cache.block_size > 1024 {
            return Err(format!("kv_cache.blockSize: must be at most 1024, got {}", self.kv_cache.block_size));
        }
        Ok(())
    }

    /// Bytes of each model's KV cache.
    pub fn kv_cache_bytes(&self) -> usize {
        (self.kv_cache.memory_mib * 1048576.0) as usize
    }

    /// Sequences one forward step may hold.
    pub fn max_batch(&self) -> usize {
        if self.batching.enabled {
            self.batching.max_batch_size
        } else {
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_committed_file() {
        let text = include_str!("../../../../config/runtime.yaml");
        let cfg = RuntimeConfig::from_yaml(text).unwrap();
        assert!(cfg.streaming.max_concurrent_streams > 0);
        assert_eq!(cfg.model_cache.eviction_policy, EvictionPolicy::Lru);
    }

    #[test]
    fn missing_sections_take_defaults() {
        let cfg = RuntimeConfig::from_yaml("batching:\n  enabled: false\n").unwrap();
        assert_eq!(cfg.max_batch(), 1);
        assert_eq!(cfg.streaming, Streaming::default());
        assert_eq!(RuntimeConfig::from_yaml("").unwrap(), RuntimeConfig::default());
    }

    #[test]
    fn errors_name_the_key_path() {
        for (yaml, want) in [
            ("streaming:\n  maxConcurentStreams: 3\n", "streaming: unknown field `maxConcurentStreams`"),
            ("streaming:\n  maxTokens: lots\n", "streaming.maxTokens: invalid type"),
            ("batching:\n  maxBatchSize: 0\n", "batching.maxBatchSize: must be at least 1"),
            ("model_cache:\n  evictionPolicy: fifo\n", "model_cache.evictionPolicy: unknown variant `fifo`"),
            ("schedular: {}\n", "unknown field `schedular`"),
            ("kv_cache:\n  blockSize: 0\n", "kv_cache.blockSize: must be at least 1"),
            ("kv_cache:\n  memoryMiB: -1\n", "kv_cache.memoryMiB: must be above 0"),
            ("kv_cache:\n  memoryMiB: .nan\n", "kv_cache.memoryMiB: must be above 0"),
            ("- not a map\n", "invalid type"),
            ("qos:\n  polices: []\n", "qos: unknown field `polices`"),
            ("qos:\n  policies:\n    - {name: a, metric: ttft, threshold: 1, action: alert}\n", "qos.policies[0].metric: unknown variant `ttft`"),
        ] {
            let err = RuntimeConfig::from_yaml(yaml).unwrap_err();
            assert!(err.contains(want), "{yaml:?}: {err}");
        }
    }
}
