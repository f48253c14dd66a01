/**
 * The public API's types: options, handles, chunks, stats, metrics. The
 * values behind them are checked by the engine (`crates/engine/src/request.rs`
 * for generation params); these say what a caller may pass and get back.
 */
import type { ErrorCode } from './errors';

export interface EngineOptions {
  /** A `runtime.yaml` (see `config/runtime.yaml`); built-in defaults without one. */
  configPath?: string;
  /** Overrides `streaming.maxConcurrentStreams`. */
  maxConcurrentStreams?: number;
  /**
   * A `feature-flags.yaml` (see `config/feature-flags.yaml`): each request's
   * Phase 5 features are decided by its `requestId`. Default: `FEATURE_FLAGS_PATH`,
   * else the package's own file. `false`: no flags, every feature follows the
   * runtime config.
   */
  featureFlagsPath?: string | false;
  /** Re-read the flags file when it changes (a bad file keeps the flags in force and emits `flags:error`). */
  watchFeatureFlags?: boolean;
  /** Re-read `configPath` when it changes (`config:reloaded`; a bad file keeps the config in force and emits `config:error`). */
  watchConfig?: boolean;
  /** Other mlx-serving options are accepted for compatibility. */
  [key: string]: unknown;
}

export interface ConvertReport {
  /** Tensors written. */
  tensors: number;
  /** Tensors written as MLX affine groups of 32, bit-exact (Q4_0, Q4_1, Q8_0). */
  quantized: number;
  /** Tensors written dequantized to float16 (formats MLX has no exact match for). */
  dequantized: number;
  /** Size of model.safetensors. */
  bytes: number;
}

/** A feature-flag decision and its reason (see `config/feature-flags.yaml` for the rule). */
export interface FeatureDecision {
  enabled: boolean;
  reason:
    | 'enabled'
    | 'kill_switch'
    | 'phase5_disabled'
    | 'phase5_rollout_excluded'
    | 'unknown_feature'
    | 'feature_disabled'
    | 'rollout_excluded'
    | 'sub_feature_disabled';
  /** The request's bucket (0-9999) in the rollout that decided, when one did. */
  bucket?: number;
}

/** A QoS policy event or a canary transition (`qos:alert` / `canary:transition` events). */
export interface ControlEvent {
  source: 'qos' | 'canary';
  /** Wall-clock milliseconds. */
  atMs: number;
  /** QoS: `fired`, `restored`, `suppressed`; canary: `started`, `advanced`, `promoted`, `rolled_back`. */
  kind: string;
  reason: string;
  policy?: string;
  severity?: 'info' | 'warning' | 'critical';
  action?: string;
  metric?: string;
  value?: number;
  threshold?: number;
  dryRun?: boolean;
  /** Canary: the candidate's share of traffic after the transition. */
  percent?: number;
  /** Canary: decided by the engine (triggers, schedule) rather than by API. */
  automatic?: boolean;
}

/** The QoS policy engine's state and the limits in force now. */
export interface QosStatus {
  enabled: boolean;
  dryRun: boolean;
  activePolicies: string[];
  maxConcurrentStreams: number;
  maxQueuedRequests: number;
  maxBatchSize: number;
  sheddingBackground: boolean;
  deferringBackground: boolean;
}

export interface CanaryOptions {
  /** The model id clients ask for (may be the baseline's id). */
  name: string;
  /** Loaded model ids of the two arms. */
  baseline: string;
  candidate: string;
  /** The candidate's share per stage, increasing, ending at 100. Default [1, 10, 50, 100]. */
  stages?: number[];
  hashSeed?: string;
  /** Candidate requests a stage needs before it may advance on schedule (default 50). */
  minSamples?: number;
  /** Advance automatically after this long in a stage (0 or absent: only by `advanceCanary`). */
  stageMs?: number;
  /** Rollback triggers (defaults: 2x error rate, 1.5x P95 latency, 20%/h memory, 0.1% crashes; 20 samples per arm). */
  triggers?: {
    errorRateRatio?: number;
    errorRateFloor?: number;
    latencyP95Ratio?: number;
    memoryGrowthPerHour?: number;
    memoryMinMs?: number;
    crashRate?: number;
    minSamples?: number;
  };
}

export interface CanaryArmStats {
  requests: number;
  errors: number;
  failures: number;
  errorRate: number;
  latencyP95Ms?: number;
}

export interface CanaryStatus {
  name: string;
  baseline: string;
  candidate: string;
  state: 'running' | 'promoted' | 'rolled_back';
  reason?: string;
  percent: number;
  stages: number[];
  /** The arms over the current stage. */
  baselineStats: CanaryArmStats;
  candidateStats: CanaryArmStats;
}

export interface LoadModelOptions {
  /** A GGUF file or an MLX model folder (config.json, *.safetensors, tokenizer.json), or `'default'` for the embedded SmolLM2-135M-Instruct. */
  model: string;
  /** The id requests use; defaults to the file name without extension (a folder's whole name). */
  modelId?: string;
  /** Caps every request's timeout on this model, in milliseconds (a canary candidate may differ from its baseline in this). */
  requestTimeoutMs?: number;
  /**
   * Compute backend: `'cpu'` (default; our own kernels), `'mlx'` (libmlx; `getRuntimeInfo().mlx`
   * says whether it is available), or `'auto'` (`mlx` where MLX has a GPU, else `cpu`).
   */
  backend?: 'cpu' | 'mlx' | 'auto';
  /**
   * How the model writes tool calls: `'hermes'` (`<tool_call>` blocks), `'mistral'`
   * (`[TOOL_CALLS]` then a JSON list; needs that control token) or `'mistral-v11'`
   * (`[TOOL_CALLS]name[ARGS]{...}` per call; needs both control tokens) or `'llama3'` (the reply
   * is one `{"name": ..., "parameters": {...}}` object). By default, from the model's chat
   * template and vocabulary; `ModelHandle.toolCallFormat` says which was chosen.
   */
  toolCallFormat?: ToolCallFormat;
}

export interface ModelHandle {
  id: string;
  path: string;
  architecture: string;
  contextLength: number;
  vocabSize: number;
  weightBytes: number;
  /** Weight bytes one decode step reads (every matrix once, one embedding row). */
  decodeWeightBytes: number;
  /** Bytes of keys and values one cached position takes (a step at context n also reads n of them). */
  kvBytesPerPosition: number;
  quantization: string;
  backend: 'cpu' | 'mlx';
  toolCallFormat: ToolCallFormat;
  state: 'ready';
  /** Milliseconds the load-time warmup took (0 when `ttft_pipeline.warmup` is off). */
  warmupMs: number;
  /** The draft model attached for speculative decoding (`loadDraftModel`). */
  draftModel?: string;
}

export interface LoadDraftModelOptions extends LoadModelOptions {
  /** The loaded model the draft guesses for; may be left out while exactly one model is loaded. */
  primaryModel?: string;
}

/** What `isDraftModelCompatible` found. */
export interface CompatibilityReport {
  /** No errors: the draft can be attached (warnings say where it may not pay off). */
  compatible: boolean;
  errors: string[];
  warnings: string[];
  details: {
    primaryModel: DraftPairModel;
    draftModel: DraftPairModel;
  };
}

export interface DraftPairModel {
  id: string;
  architecture: string;
  vocabSize: number;
  contextLength: number;
  weightBytes: number;
}

export interface ChatMessage {
  role: string;
  /** Text; may be empty for an assistant turn that only called tools. */
  content: string;
  /** An assistant turn's tool calls (OpenAI's shape: arguments as JSON text). */
  toolCalls?: ToolCallRecord[];
  /** A `tool` turn: the id of the call it answers. */
  toolCallId?: string;
  name?: string;
}

/** A function the model may call, in OpenAI's shape. */
export interface ToolDefinition {
  type: 'function';
  function: {
    name: string;
    description?: string;
    /** A JSON schema of the arguments object. */
    parameters?: Record<string, unknown>;
    strict?: boolean;
  };
}

/** A call as a conversation records it (OpenAI's `tool_calls` entries). */
export interface ToolCallRecord {
  id: string;
  type: 'function';
  function: { name: string; arguments: string };
}

/** `auto` lets the model decide; `required` and a named function constrain the output to a call. */
/** How a model writes tool calls (`docs/structured-output.md`). */
export type ToolCallFormat = 'hermes' | 'mistral' | 'mistral-v11' | 'llama3';

export type ToolChoice = 'auto' | 'none' | 'required' | { type: 'function'; function: { name: string } };

/** What the output must be: any JSON object, or a value valid against a JSON schema. */
export type ResponseFormat =
  | { type: 'text' }
  | { type: 'json_object' }
  | { type: 'json_schema'; schema: Record<string, unknown> | boolean; strict?: boolean };

/**
 * A piece of a tool call the model is making. A call's first chunk comes as soon as its name is
 * written (often with `argumentsDelta: ''`); later chunks of the same `index` carry the arguments
 * as they are written. Joined, a call's `argumentsDelta`s are its arguments object as JSON text.
 */
export interface ToolCallChunk {
  type: 'toolCall';
  /** The call's place among this generation's calls, from 0. */
  index: number;
  /** The same on every chunk of a call. */
  id: string;
  name: string;
  /** This chunk's part of the arguments' JSON text. */
  argumentsDelta: string;
}

export interface GeneratorParams {
  model: string;
  prompt?: string | { tokens: number[] };
  messages?: ChatMessage[];
  /** Default: what the context leaves after the prompt (or the config's `streaming.maxTokens`). */
  maxTokens?: number;
  /** Tokens generated before end-of-generation tokens, stop token ids or stop sequences may end the output. */
  minTokens?: number;
  temperature?: number;
  topP?: number;
  topK?: number;
  minP?: number;
  repetitionPenalty?: number;
  presencePenalty?: number;
  frequencyPenalty?: number;
  seed?: number;
  stopSequences?: string[];
  stopTokenIds?: number[];
  /** Generate past end-of-generation tokens (benchmarks). */
  ignoreEos?: boolean;
  /** Constrain the output to JSON (any object, or a schema). */
  responseFormat?: ResponseFormat;
  /** Constrain the output to match this regex, whole. */
  regex?: string;
  /** Constrain the output to this Lark grammar (llguidance's dialect). */
  grammar?: string;
  /** Functions the model may call; calls arrive as `toolCall` chunks. */
  tools?: ToolDefinition[];
  toolChoice?: ToolChoice;
  /** Several calls in one reply (default true). */
  parallelToolCalls?: boolean;
  /** Token id to a bias in [-100, 100], added to its logit. */
  logitBias?: Record<string, number>;
  /**
   * Where the model's `<think>` blocks go: `auto` (the default) splits them
   * into the token chunks' `reasoning` when the model's template writes them,
   * `parsed` always does, `inline` leaves them in the text.
   */
  reasoningFormat?: 'auto' | 'parsed' | 'inline';
}

export interface GenerationStats {
  promptTokens: number;
  tokensGenerated: number;
  /** Milliseconds from submission to the first token. */
  timeToFirstToken: number;
  /** Output tokens per second after the first token. */
  tokensPerSecond: number;
  /** Milliseconds from submission to the end. */
  totalTime: number;
  finishReason: 'stop' | 'length' | 'tool_calls';
  /** Gated Phase 5 features that were on for this request (empty without a flags file), and `canary.baseline` / `canary.candidate` when a canary routed it. */
  features: string[];
}

export type GeneratorChunk =
  | { type: 'token'; token: string; tokenId: number; logprob?: number; isFinal?: boolean; reasoning?: string }
  | ToolCallChunk
  | { type: 'metadata'; stats: GenerationStats; toolCalls?: ToolCallRecord[] }
  | { type: 'error'; error: { code: ErrorCode; message: string } };

export interface GenerateOptions {
  signal?: AbortSignal;
  timeoutMs?: number;
  /** Scheduling class: `urgent` runs first; `background` is preempted first. */
  priority?: 'urgent' | 'default' | 'background';
  /** Requests with different salts never share prefix-cache blocks (tenant isolation). */
  cacheSalt?: string;
  requestId?: string;
  /** Streaming callback, called for every token chunk (`generate` only). */
  onToken?: (chunk: Extract<GeneratorChunk, { type: 'token' }>) => void;
}

export interface HealthStatus {
  status: 'healthy' | 'unhealthy';
  modelsLoaded: number;
  activeRequests: number;
  waitingRequests: number;
  uptimeMs: number;
}

export interface RuntimeInfo {
  version: string;
  backend: string;
  /** The kernel path: `amx` (AVX-512 VNNI, and AMX-INT8 tiles for prompts through K-quant and 8-bit matrices), `avx512-vnni`, `avx2` or `scalar`; `MLX_SERVING_ISA` forces one. */
  isa: string;
  /** Why prompts do not run on AMX tiles here (absent where they do): no AMX, the kernel refused the tile state, or `MLX_SERVING_ISA` chose another path. */
  amx?: string;
  threads: number;
  /** MLX (libmlx from PyPI's MLX wheels, loaded at run time): whether it loads here, its version, whether it has a GPU. */
  mlx: { available: boolean; version?: string; gpu: boolean; reason?: string };
  node: string;
  platform: string;
  arch: string;
}

export interface ServerOptions {
  /** Default 127.0.0.1 (loopback only). */
  host?: string;
  /** Default 8080; 0 picks a free port. */
  port?: number;
  /** When set, `/v1/*` requires `Authorization: Bearer <apiKey>`. */
  apiKey?: string;
  /** Generations at once; more get HTTP 429 with Retry-After. Default 64. */
  maxConcurrent?: number;
  /** Largest request body; more gets HTTP 413. Default 4 MiB. */
  bodyLimitBytes?: number;
  /**
   * Origins whose browser pages may call the API (CORS), e.g.
   * `['http://localhost:3000']`, or `['*']` for any. Default none: other
   * sites' pages cannot drive a server on this machine.
   */
  corsOrigins?: string[];
  /** This replica's name in the `x-mlx-serving-replica` header and the metrics' `replica` label. Default: host name and port. */
  replicaId?: string;
}

export interface HttpServer {
  url: string;
  host: string;
  port: number;
  replicaId: string;
  /**
   * Drains, then stops: `/health` turns 503 `draining` and new generations get 503 with
   * `Retry-After` while the listener stays open, so load balancers move traffic away; in-flight
   * requests get `graceMs` (default 5000) to finish, then the listener closes. `/live` answers
   * throughout.
   */
  close(graceMs?: number): Promise<void>;
}

/** A cumulative latency histogram: `counts[i]` requests took at most `edges[i]` seconds. */
export interface LatencyHistogram {
  edges: number[];
  counts: number[];
  sum: number;
  count: number;
}

/** The scheduler's live state and latency histograms (vLLM's definitions and bucket edges). */
export interface EngineMetrics {
  running: number;
  waiting: number;
  completed: number;
  generatedTokens: number;
  /**
   * KV blocks: total, referenced (pinned included), cached for reuse, pinned by `warmupModel`;
   * bytes of referenced blocks, and bytes ever written (the pools' resident memory, which grows to
   * `kv_cache.memoryMiB` per model as the prefix cache fills, then stays).
   */
  kvCache: { blocksTotal: number; blocksUsed: number; blocksCached: number; blocksPinned: number; bytesUsed: number; bytesTouched: number; usage: number };
  /** `prefetchedTokens`: prompt tokens computed into the cache while their request waited for a batch slot (KV prefetch). */
  prefixCache: { queries: number; hits: number; hitRate: number; prefetchedTokens: number };
  preemptions: number;
  /** Speculative decoding: guessed tokens checked, kept, and the share kept. */
  speculative: { drafted: number; accepted: number; acceptanceRate: number };
  /** Models whose breaker is open or half-open (they answer `Overloaded` at once), and state changes so far. */
  circuitBreakers: { open: number; transitions: number };
  /** Requests per gated feature, on and off (empty without a flags file). */
  featureFlags: { feature: string; enabled: boolean; requests: number }[];
  /** The QoS policy engine and the limits its actions set. */
  qos: QosStatus;
  /** The canary, once one has been started. */
  canary?: CanaryStatus;
  /** Submission to first token. */
  ttft: LatencyHistogram;
  /** Between consecutive tokens of a request. */
  itl: LatencyHistogram;
  /** Submission to the end of a request. */
  e2e: LatencyHistogram;
}

export interface ModelCacheStats {
  /** `lastAccess`: Unix epoch ms of the model's last request (or its load). */
  models: { id: string; weightBytes: number; lastAccess: number }[];
  totalWeightBytes: number;
}
