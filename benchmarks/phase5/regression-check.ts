/**
 * Regression check: measures the Phase 5 configuration (TTFT P50/P95/P99/mean
 * over a short TTFT run, output tok/s over a short open-loop run) and compares
 * it with a committed baseline. Only a regression beyond the tolerance fails:
 * TTFT above baseline * (1 + tolerance), throughput below baseline *
 * (1 - tolerance). Exit code 0 (pass) or 1 (regression).
 *
 *   npx tsx benchmarks/phase5/regression-check.ts [--baseline benchmarks/phase5/baseline.json]
 *       [--tolerance 10] [--samples 50] [--warmup 5] [--rate 2] [--duration 20]
 *       [--current metrics.json] [--update-baseline] [--http URL]
 *
 * --current compares an existing measurement instead of measuring;
 * --update-baseline writes the measurement as the new baseline.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

import { defaultModelPath } from '../../lib/index';
import type { RegressionMetrics } from '../types';
import { fmt, table, writeResult } from '../utils';
import { runLoad } from './load';
import { openTargets } from './target';
import { runTtft } from './ttft-benchmark';

const LOWER_IS_BETTER: (keyof RegressionMetrics)[] = ['ttftP50Ms', 'ttftP95Ms', 'ttftP99Ms', 'ttftMeanMs'];
const HIGHER_IS_BETTER: (keyof RegressionMetrics)[] = ['throughputTokPerS'];

export interface Comparison {
  metric: keyof RegressionMetrics;
  baseline: number;
  current: number;
  changePct: number;
  regressed: boolean;
}

export function compare(baseline: RegressionMetrics, current: RegressionMetrics, tolerancePct: number): Comparison[] {
  const t = tolerancePct / 100;
  return [...LOWER_IS_BETTER, ...HIGHER_IS_BETTER].map((metric) => {
    const [b, c] = [baseline[metric], current[metric]];
    if (!Number.isFinite(b) || !Number.isFinite(c)) throw new Error(`metric ${metric} is missing or not a number`);
    const lower = LOWER_IS_BETTER.includes(metric);
    return { metric, baseline: b, current: c, changePct: ((c - b) / b) * 100, regressed: lower ? c > b * (1 + t) : c < b * (1 - t) };
  });
}

async function measure(o: { model: string; http?: string; samples: number; warmup: number; rate: number; duration: number }): Promise<RegressionMetrics> {
  const ttft = await runTtft({ samples: o.samples, warmup: o.warmup, maxTokens: 8, model: o.model, http: o.http, seed: 1 }, ['phase5']);
  const s = ttft.phases[0].stats;
  const [target] = await openTargets({ http: o.http, model: o.model }, ['phase5']);
  const load = await runLoad(target, { rate: o.rate, durationS: o.duration, maxConcurrent: 100, maxTokens: 64, timeoutMs: 60_000, seed: 1 }, 'regression');
  await target.close();
  return { ttftP50Ms: s.median, ttftP95Ms: s.p95, ttftP99Ms: s.p99, ttftMeanMs: s.mean, throughputTokPerS: load.outputTokPerS };
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      baseline: { type: 'string', default: path.join(__dirname, 'baseline.json') },
      tolerance: { type: 'string', default: '10' },
      samples: { type: 'string', default: '50' },
      warmup: { type: 'string', default: '5' },
      rate: { type: 'string', default: '2' },
      duration: { type: 'string', default: '20' },
      current: { type: 'string' },
      'update-baseline': { type: 'boolean', default: false },
      model: { type: 'string', default: process.env.MODEL_PATH ?? defaultModelPath() },
      http: { type: 'string', default: process.env.MLX_SERVING_URL },
    },
  });
  const current: RegressionMetrics = values.current
    ? JSON.parse(readFileSync(values.current, 'utf8')).metrics
    : await measure({
        model: values.model!,
        http: values.http,
        samples: Number(values.samples),
        warmup: Number(values.warmup),
        rate: Number(values.rate),
        duration: Number(values.duration),
      });
  if (values['update-baseline']) {
    const doc = { date: new Date().toISOString(), machine: { cpus: os.cpus().length, model: os.cpus()[0]?.model }, metrics: current };
    writeFileSync(values.baseline!, JSON.stringify(doc, null, 2) + '\n');
    console.log(`baseline updated: ${values.baseline}`);
    return 0;
  }
  const baseline: RegressionMetrics = JSON.parse(readFileSync(values.baseline!, 'utf8')).metrics;
  const tol = Number(values.tolerance);
  const rows = compare(baseline, current, tol);
  console.log(`\nRegression check against ${values.baseline} (tolerance ${tol}%, only regressions fail)`);
  console.log(
    table(
      ['Metric', 'Baseline', 'Current', 'Change', 'Status'],
      rows.map((r) => [r.metric, fmt(r.baseline), fmt(r.current), `${r.changePct >= 0 ? '+' : ''}${fmt(r.changePct)}%`, r.regressed ? 'REGRESSION' : 'ok']),
    ),
  );
  const failed = rows.filter((r) => r.regressed);
  console.log(failed.length ? `\nFAIL: ${failed.map((r) => r.metric).join(', ')} regressed` : '\nPASS: no regression');
  console.log(`wrote ${writeResult('regression-check', { baseline, metrics: current, tolerancePct: tol, rows, pass: !failed.length })}`);
  return failed.length ? 1 : 0;
}

if (require.main === module) {
  main().then(
    (code) => process.exit(code),
    (e) => {
      console.error(e);
      process.exit(2);
    },
  );
}
