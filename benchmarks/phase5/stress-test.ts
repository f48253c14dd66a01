/**
 * Stress test: open-loop Poisson load rising level by level until a level
 * fails; prints each level and the maximum sustainable throughput (the last
 * level that held). Runs the Phase 5 configuration (or --http URL).
 *
 *   npx tsx benchmarks/phase5/stress-test.ts [--start 0.5] [--factor 2] [--levels 8]
 *       [--level-duration 30] [--max-concurrent 100] [--max-tokens 64] [--timeout-ms 30000]
 *
 * A level fails, in this order of precedence, on: `crash` (the engine or
 * server stopped answering), `out_of_memory` (machine memory above 90%),
 * `timeout` (over 5% of requests timed out), `high_error_rate` (over 10%
 * errors), `resource_exhaustion` (CPU above 95% of the machine on average).
 */
import { parseArgs } from 'node:util';

import { defaultModelPath } from '../../lib/index';
import type { FailureMode, StressLevel } from '../types';
import { fmt, table, writeResult } from '../utils';
import { runLoad } from './load';
import { openTargets } from './target';

export function classify(l: { crashed: boolean; peakSystemMemPct: number; timeouts: number; requests: number; errorRate: number; avgCpuPct: number }): FailureMode | undefined {
  if (l.crashed) return 'crash';
  if (l.peakSystemMemPct > 90) return 'out_of_memory';
  if (l.requests && l.timeouts / l.requests > 0.05) return 'timeout';
  if (l.errorRate > 0.1) return 'high_error_rate';
  if (l.avgCpuPct > 95) return 'resource_exhaustion';
  return undefined;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      start: { type: 'string', default: '0.5' },
      factor: { type: 'string', default: '2' },
      levels: { type: 'string', default: '8' },
      'level-duration': { type: 'string', default: '30' },
      'max-concurrent': { type: 'string', default: '100' },
      'max-tokens': { type: 'string', default: '64' },
      'timeout-ms': { type: 'string', default: '30000' },
      seed: { type: 'string', default: '1' },
      model: { type: 'string', default: process.env.MODEL_PATH ?? defaultModelPath() },
      http: { type: 'string', default: process.env.MLX_SERVING_URL },
    },
  });
  const num = (name: string, min: number) => {
    const n = Number(values[name as keyof typeof values]);
    if (!Number.isFinite(n) || n < min) throw new Error(`--${name} must be a number >= ${min}`);
    return n;
  };
  const [target] = await openTargets({ http: values.http, model: values.model! }, ['phase5']);
  const levels: StressLevel[] = [];
  let rate = num('start', 0.001);
  for (let i = 0; i < num('levels', 1); i++, rate *= num('factor', 1.01)) {
    const r = await runLoad(
      target,
      {
        rate,
        durationS: num('level-duration', 0.1),
        maxConcurrent: num('max-concurrent', 1),
        maxTokens: num('max-tokens', 1),
        timeoutMs: num('timeout-ms', 1),
        seed: num('seed', 0) + i,
      },
      `stress-${rate.toFixed(2)}`,
    );
    const failureMode = classify(r);
    const { crashed: _crashed, ...rest } = r;
    levels.push({ ...rest, status: failureMode ? 'failed' : 'ok', failureMode });
    if (failureMode) break;
  }
  await target.close();

  console.log(`\nStress test, ${target.name}, ${values.http ?? values.model}`);
  console.log(
    table(
      ['Level', 'Req/s (target)', 'Req/s', 'Requests', 'Errors', 'P95 latency', 'Peak concurrency', 'CPU %', 'Memory', 'Status'],
      levels.map((l, i) => [
        i + 1,
        fmt(l.targetRate, 2),
        fmt(l.avgReqPerS, 2),
        l.requests,
        l.errors,
        `${fmt(l.p95LatencyMs, 0)} ms`,
        l.peakConcurrent,
        fmt(l.avgCpuPct),
        `${fmt(l.peakRssMiB, 0)} MiB (${fmt(l.peakSystemMemPct, 0)}% of machine)`,
        l.status === 'ok' ? 'ok' : `FAILED: ${l.failureMode}`,
      ]),
    ),
  );
  const held = levels.filter((l) => l.status === 'ok');
  const best = held[held.length - 1];
  const broke = levels.find((l) => l.status === 'failed');
  console.log(
    best
      ? `\nMaximum sustainable throughput: ${fmt(best.avgReqPerS, 2)} req/s (${fmt(best.outputTokPerS)} output tok/s) at a target of ${fmt(best.targetRate, 2)} req/s`
      : '\nMaximum sustainable throughput: none (the first level failed)',
  );
  console.log(broke ? `Breaking point: ${fmt(broke.targetRate, 2)} req/s (${broke.failureMode})` : 'No level failed: raise --levels or --factor to find the breaking point.');
  console.log(`\nwrote ${writeResult('stress-test', { options: values, levels, maxSustainable: best ?? null, breakingPoint: broke ?? null })}`);
}

if (require.main === module) {
  main().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
