/**
 * Statistics and small helpers for the benchmark scripts.
 *
 * Percentiles use the nearest-rank method: the P-th percentile of n sorted
 * values is the value at rank ceil(P/100 * n) (1-based), so it is always an
 * observed value and P100 is the maximum. The confidence interval of the mean
 * is the normal approximation mean ± 1.96 * s / sqrt(n), with s the sample
 * standard deviation (n - 1 in the denominator).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import type { ResourceSample, Stats } from './types';

export function percentile(sorted: number[], p: number): number {
  if (!sorted.length) return NaN;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

export function mean(xs: number[]): number {
  return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : NaN;
}

export function stdDev(xs: number[]): number {
  if (xs.length < 2) return 0;
  const m = mean(xs);
  return Math.sqrt(xs.reduce((a, x) => a + (x - m) ** 2, 0) / (xs.length - 1));
}

export function stats(values: number[]): Stats {
  const xs = values.filter(Number.isFinite);
  const sorted = [...xs].sort((a, b) => a - b);
  const m = mean(xs);
  const half = xs.length ? (1.96 * stdDev(xs)) / Math.sqrt(xs.length) : NaN;
  return {
    n: xs.length,
    mean: m,
    median: percentile(sorted, 50),
    p95: percentile(sorted, 95),
    p99: percentile(sorted, 99),
    min: sorted[0] ?? NaN,
    max: sorted[sorted.length - 1] ?? NaN,
    stdDev: stdDev(xs),
    ci95: [m - half, m + half],
  };
}

/** A seeded generator (so runs with the same seed send the same workload). */
export function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 2 ** 32;
  };
}

/** Exponential inter-arrival gap (ms) of a Poisson process at `ratePerS`. */
export function poissonGapMs(rand: () => number, ratePerS: number): number {
  return (-Math.log(1 - rand()) / ratePerS) * 1000;
}

/** Samples this process's CPU share of the machine and memory every `everyMs`. */
export class ResourceMonitor {
  readonly samples: ResourceSample[] = [];
  private timer?: NodeJS.Timeout;
  private last = { cpu: process.cpuUsage(), at: performance.now() };
  private readonly t0 = performance.now();

  start(everyMs = 500): this {
    this.timer = setInterval(() => this.sample(), everyMs);
    return this;
  }

  private sample(): void {
    const now = performance.now();
    const cpu = process.cpuUsage();
    const usedUs = cpu.user - this.last.cpu.user + (cpu.system - this.last.cpu.system);
    const wallUs = (now - this.last.at) * 1000;
    this.last = { cpu, at: now };
    this.samples.push({
      atMs: now - this.t0,
      cpuPct: wallUs > 0 ? (usedUs / (wallUs * os.cpus().length)) * 100 : 0,
      rssMiB: process.memoryUsage().rss / 2 ** 20,
      systemMemPct: (1 - os.freemem() / os.totalmem()) * 100,
    });
  }

  stop(): { avgCpuPct: number; peakCpuPct: number; peakRssMiB: number; peakSystemMemPct: number } {
    clearInterval(this.timer);
    this.sample();
    const s = this.samples;
    return {
      avgCpuPct: mean(s.map((x) => x.cpuPct)),
      peakCpuPct: Math.max(...s.map((x) => x.cpuPct)),
      peakRssMiB: Math.max(...s.map((x) => x.rssMiB)),
      peakSystemMemPct: Math.max(...s.map((x) => x.systemMemPct)),
    };
  }
}

export function fmt(v: number, digits = 1): string {
  return Number.isFinite(v) ? v.toFixed(digits) : '-';
}

/** Prints a markdown table. */
export function table(header: string[], rows: (string | number)[][]): string {
  const line = (cells: (string | number)[]) => `| ${cells.join(' | ')} |`;
  return [line(header), line(header.map(() => '---')), ...rows.map(line)].join('\n');
}

/** Writes `benchmarks/results/<name>-<timestamp>.json` and returns its path. */
export function writeResult(name: string, data: unknown): string {
  const dir = path.join(__dirname, 'results');
  mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${name}-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
  writeFileSync(file, JSON.stringify({ date: new Date().toISOString(), host: { cpus: os.cpus().length, totalMemGiB: os.totalmem() / 2 ** 30 }, ...(data as object) }, null, 2));
  return file;
}

let lastProgress = 0;
/** Progress on one terminal line (stderr, so stdout keeps only the report); every 2 s when not a terminal. */
export function progress(msg: string): void {
  if (process.stderr.isTTY) process.stderr.write(`\r\x1b[K${msg}`);
  else if (performance.now() - lastProgress > 2000) {
    lastProgress = performance.now();
    process.stderr.write(`${msg}\n`);
  }
}
export function progressDone(): void {
  if (process.stderr.isTTY) process.stderr.write('\n');
}

/** TTFT and decode speed of one generation. */
export interface SingleStream {
  ttftMs: number;
  decodeTokPerS: number;
}

/** One line of a side-by-side table; `ratio` > 1 means we are faster. */
export interface PeerRow {
  metric: string;
  ours: number;
  peer: number;
  ratio: number;
  /** Decode rows: the fraction of the measured read bandwidth each side reached. */
  bandwidth?: { ours: number; peer: number };
}

/**
 * TTFT and decode of `ours` against `peer` on the first `len` tokens of
 * `corpus` for each length, the two alternating `runs` times so both see
 * the same machine state; medians.
 */
export async function singleStreamRows(
  lengths: number[],
  runs: number,
  nDecode: number,
  corpus: number[],
  ours: (prompt: number[], n: number) => Promise<SingleStream>,
  peer: (prompt: number[], n: number) => Promise<SingleStream>,
): Promise<PeerRow[]> {
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const rows: PeerRow[] = [];
  for (const len of lengths) {
    const prompt = corpus.slice(0, len);
    const a: SingleStream[] = [];
    const b: SingleStream[] = [];
    for (let r = 0; r < runs; r++) {
      a.push(await ours(prompt, nDecode));
      b.push(await peer(prompt, nDecode));
    }
    const [ttftA, ttftB] = [median(a.map((m) => m.ttftMs)), median(b.map((m) => m.ttftMs))];
    const [decA, decB] = [median(a.map((m) => m.decodeTokPerS)), median(b.map((m) => m.decodeTokPerS))];
    rows.push({ metric: `TTFT ms, ${len}-token prompt`, ours: ttftA, peer: ttftB, ratio: ttftB / ttftA });
    rows.push({ metric: `decode tok/s after ${len} tokens`, ours: decA, peer: decB, ratio: decA / decB });
  }
  return rows;
}

/** Prints rows as a markdown table with the peer's name in the header. */
export function printPeerTable(rows: PeerRow[], oursName: string, peerName: string): void {
  const bw = rows.some((r) => r.bandwidth);
  const pct = (x: number) => `${(100 * x).toFixed(0)}%`;
  console.log(`| metric | ${oursName} | ${peerName} | speed ratio (>1: we are faster) |${bw ? ' read bandwidth reached, ours / peer |' : ''}`);
  console.log(`| --- | ---: | ---: | ---: |${bw ? ' ---: |' : ''}`);
  for (const r of rows) {
    const b = bw ? ` ${r.bandwidth ? `${pct(r.bandwidth.ours)} / ${pct(r.bandwidth.peer)}` : ''} |` : '';
    console.log(`| ${r.metric} | ${r.ours.toFixed(1)} | ${r.peer.toFixed(1)} | ${r.ratio.toFixed(2)}x |${b}`);
  }
}

/**
 * node-llama-cpp on the CPU. It ships one ggml CPU library per x86 level
 * (`libggml-cpu-haswell.so` for AVX2, `-sapphirerapids` for AMX, ...) and
 * loads the best one the host runs. `cpuVariant` makes it load that one only,
 * so an AVX-512 host can also measure the peer an AVX2-only host would run
 * (ours forced the same way with MLX_SERVING_ISA=avx2): the other libraries
 * are renamed aside while the backend loads (a second or so) and renamed back
 * at once, or at the next run if this one was killed in between.
 */
export async function loadLlamaCpp(cpuVariant?: string): Promise<{ llama: any; cpu: string }> {
  const { existsSync, readdirSync, renameSync } = await import('node:fs');
  const { createRequire } = await import('node:module');
  const target = `${process.platform}-${process.arch}`;
  // The package exports only dist/index.js; its bins/ sit beside dist/.
  const bins = path.join(path.dirname(createRequire(__filename).resolve(`@node-llama-cpp/${target}`)), '..', 'bins', target);
  const aside = '.not-loaded';
  for (const f of readdirSync(bins)) if (f.endsWith(aside)) renameSync(path.join(bins, f), path.join(bins, f.slice(0, -aside.length)));
  const hidden: string[] = [];
  if (cpuVariant) {
    if (!existsSync(path.join(bins, `libggml-cpu-${cpuVariant}.so`))) {
      throw new Error(`no node-llama-cpp CPU variant "${cpuVariant}" in ${bins}`);
    }
    for (const f of readdirSync(bins)) {
      if (!f.startsWith('libggml-cpu-') || f === `libggml-cpu-${cpuVariant}.so`) continue;
      renameSync(path.join(bins, f), path.join(bins, f + aside));
      hidden.push(f);
    }
  }
  try {
    const { getLlama } = await import('node-llama-cpp');
    const llama = await getLlama({ gpu: false, build: 'never', logLevel: 'error' as never });
    // "CPU : SSE3 = 1 | ... | AVX512 = 1 | AMX_INT8 = 1 | ..." -> the widest features it uses.
    const on = (name: string) => new RegExp(`\\b${name} = 1`).test(llama.systemInfo);
    const cpu = ['AMX_INT8', 'AVX512_VNNI', 'AVX512', 'AVX2'].find(on) ?? 'baseline';
    return { llama, cpu: cpu.toLowerCase().replace('_', '-') };
  } finally {
    for (const f of hidden) renameSync(path.join(bins, f + aside), path.join(bins, f));
  }
}
