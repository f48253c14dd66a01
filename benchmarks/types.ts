/** Shapes shared by the Phase 5 benchmark scripts and their JSON results. */

/** Summary statistics of a sample (milliseconds unless named otherwise). */
export interface Stats {
  n: number;
  mean: number;
  median: number;
  p95: number;
  p99: number;
  min: number;
  max: number;
  stdDev: number;
  /** 95% confidence interval of the mean (normal approximation). */
  ci95: [number, number];
}

/** One request as the benchmark saw it. */
export interface RequestResult {
  ok: boolean;
  /** Submit to first token, ms (NaN when none arrived). */
  ttftMs: number;
  /** Submit to the end, ms. */
  latencyMs: number;
  tokens: number;
  /** Error code (`Overloaded`, `Timeout`, `HTTP 429`, ...) when not ok. */
  error?: string;
}

/** A chat request of the benchmark workload. */
export interface BenchRequest {
  messages: { role: string; content: string }[];
  maxTokens: number;
  requestId: string;
  timeoutMs: number;
}

/** Where requests go: the engine in this process with Phase 5 off or on, or a running server. */
export interface Target {
  name: 'baseline' | 'phase5' | 'server';
  request(req: BenchRequest): Promise<RequestResult>;
  close(): Promise<void>;
}

/** CPU (the process's share of the whole machine, percent) and memory, sampled during a run. */
export interface ResourceSample {
  atMs: number;
  cpuPct: number;
  rssMiB: number;
  /** Machine memory in use, percent. */
  systemMemPct: number;
}

export type FailureMode = 'out_of_memory' | 'timeout' | 'high_error_rate' | 'resource_exhaustion' | 'crash';

export interface ThroughputResult {
  phase: string;
  targetRate: number;
  durationS: number;
  requests: number;
  completed: number;
  errors: number;
  errorRate: number;
  avgReqPerS: number;
  peakConcurrent: number;
  avgLatencyMs: number;
  p95LatencyMs: number;
  outputTokPerS: number;
  avgCpuPct: number;
  peakRssMiB: number;
}

export interface StressLevel extends ThroughputResult {
  timeouts: number;
  peakSystemMemPct: number;
  peakCpuPct: number;
  status: 'ok' | 'failed';
  failureMode?: FailureMode;
}

/** What the regression check compares (lower is better for TTFT, higher for throughput). */
export interface RegressionMetrics {
  ttftP50Ms: number;
  ttftP95Ms: number;
  ttftP99Ms: number;
  ttftMeanMs: number;
  throughputTokPerS: number;
}
