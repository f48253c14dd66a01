/**
 * TTFT benchmark: N chat requests one after another (after a warmup), with
 * Phase 5 off (baseline) and on, in one run; then the table and the verdict
 * against the Phase 5 guide's targets.
 *
 *   npx tsx benchmarks/phase5/ttft-benchmark.ts [--samples 1000] [--warmup 20]
 *       [--max-tokens 8] [--model path.gguf] [--http URL] [--seed 1]
 *
 * Environment: TTFT_SAMPLES, TTFT_WARMUP, MODEL_PATH, MLX_SERVING_URL.
 */
import { parseArgs } from 'node:util';

import { defaultModelPath } from '../../lib/index';
import type { Stats } from '../types';
import { fmt, progress, progressDone, rng, stats, table, writeResult } from '../utils';
import { chatRequest, GUIDE_TARGETS, openTargets } from './target';

export interface TtftOptions {
  samples: number;
  warmup: number;
  maxTokens: number;
  model: string;
  http?: string;
  seed: number;
}

export interface TtftReport {
  phases: { phase: string; stats: Stats; errors: number }[];
  improvementPct?: number;
  verdict: { p95Target: boolean; p95Stretch: boolean; improvement?: boolean };
}

export function ttftOptions(defaults: { samples: number; warmup: number }): TtftOptions {
  const { values } = parseArgs({
    options: {
      samples: { type: 'string', default: process.env.TTFT_SAMPLES ?? String(defaults.samples) },
      warmup: { type: 'string', default: process.env.TTFT_WARMUP ?? String(defaults.warmup) },
      'max-tokens': { type: 'string', default: '8' },
      model: { type: 'string', default: process.env.MODEL_PATH ?? defaultModelPath() },
      http: { type: 'string', default: process.env.MLX_SERVING_URL },
      seed: { type: 'string', default: '1' },
    },
  });
  const int = (name: string, v: string, min: number) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min) throw new Error(`--${name} must be an integer >= ${min}, got '${v}'`);
    return n;
  };
  return {
    samples: int('samples', values.samples!, 1),
    warmup: int('warmup', values.warmup!, 0),
    maxTokens: int('max-tokens', values['max-tokens']!, 1),
    model: values.model!,
    http: values.http,
    seed: int('seed', values.seed!, 0),
  };
}

export async function runTtft(opts: TtftOptions, which: ('baseline' | 'phase5')[] = ['baseline', 'phase5']): Promise<TtftReport> {
  const targets = await openTargets({ http: opts.http, model: opts.model }, which);
  const phases: TtftReport['phases'] = [];
  for (const target of targets) {
    // The same workload for every phase.
    const rand = rng(opts.seed);
    for (let i = 0; i < opts.warmup; i++) {
      await target.request(chatRequest(i, rand, opts.maxTokens, 60_000, `warmup-${target.name}`));
    }
    const ttfts: number[] = [];
    let errors = 0;
    for (let i = 0; i < opts.samples; i++) {
      const r = await target.request(chatRequest(i, rand, opts.maxTokens, 60_000, `ttft-${target.name}`));
      if (r.ok && Number.isFinite(r.ttftMs)) ttfts.push(r.ttftMs);
      else errors++;
      progress(`[ttft] ${target.name}: ${i + 1}/${opts.samples}`);
    }
    progressDone();
    phases.push({ phase: target.name, stats: stats(ttfts), errors });
    await target.close();
  }
  const base = phases.find((p) => p.phase === 'baseline');
  const p5 = phases.find((p) => p.phase === 'phase5') ?? phases[phases.length - 1];
  const improvementPct = base && p5 !== base ? ((base.stats.p95 - p5.stats.p95) / base.stats.p95) * 100 : undefined;
  return {
    phases,
    improvementPct,
    verdict: {
      p95Target: p5.stats.p95 <= GUIDE_TARGETS.ttftP95Ms,
      p95Stretch: p5.stats.p95 <= GUIDE_TARGETS.ttftP95StretchMs,
      improvement: improvementPct === undefined ? undefined : improvementPct >= GUIDE_TARGETS.ttftImprovementPct,
    },
  };
}

export function printTtft(report: TtftReport, opts: TtftOptions): void {
  console.log(`\nTTFT over ${opts.samples} chat requests (after ${opts.warmup} warmup), ${opts.http ?? opts.model}`);
  console.log(
    table(
      ['Phase', 'Mean', 'Median', 'P95', 'P99', 'Min', 'Max', 'StdDev', 'Errors'],
      report.phases.map((p) => [p.phase, ...[p.stats.mean, p.stats.median, p.stats.p95, p.stats.p99, p.stats.min, p.stats.max, p.stats.stdDev].map((v) => `${fmt(v)} ms`), p.errors]),
    ),
  );
  const v = report.verdict;
  const pass = (ok: boolean | undefined) => (ok === undefined ? 'n/a' : ok ? 'PASS' : 'FAIL');
  if (report.improvementPct !== undefined) {
    console.log(`\nP95 improvement: ${fmt(report.improvementPct)}% (target >= ${GUIDE_TARGETS.ttftImprovementPct}%): ${pass(v.improvement)}`);
  }
  console.log(`P95 <= ${GUIDE_TARGETS.ttftP95Ms} ms: ${pass(v.p95Target)}; stretch <= ${GUIDE_TARGETS.ttftP95StretchMs} ms: ${pass(v.p95Stretch)}`);
  console.log('(The guide set these targets for Apple Silicon and 2B-27B models; they are printed, not tuned for.)');
}

export async function main(defaults = { samples: 1000, warmup: 20 }, name = 'ttft-benchmark'): Promise<void> {
  const opts = ttftOptions(defaults);
  const report = await runTtft(opts);
  printTtft(report, opts);
  console.log(`\nwrote ${writeResult(name, { options: opts, ...report })}`);
}

if (require.main === module) {
  main().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
