/**
 * Throughput benchmark: open-loop Poisson arrivals of chat requests at a
 * target rate for a duration, at most --max-concurrent in flight; baseline
 * (Phase 5 off) then Phase 5 (on), in one run.
 *
 *   npx tsx benchmarks/phase5/throughput-benchmark.ts [--rate 2] [--duration 600]
 *       [--max-concurrent 100] [--max-tokens 64] [--timeout-ms 60000] [--http URL]
 *
 * CPU is this process's share of the whole machine (the engine runs in it;
 * with --http it is the client only). Environment: MODEL_PATH, MLX_SERVING_URL.
 */
import { parseArgs } from 'node:util';

import { defaultModelPath } from '../../lib/index';
import type { ThroughputResult } from '../types';
import { fmt, table, writeResult } from '../utils';
import { runLoad, type LoadOptions } from './load';
import { openTargets } from './target';

export function loadOptions(defaults: { rate: number; durationS: number }): LoadOptions & { model: string; http?: string } {
  const { values } = parseArgs({
    options: {
      rate: { type: 'string', default: String(defaults.rate) },
      duration: { type: 'string', default: String(defaults.durationS) },
      'max-concurrent': { type: 'string', default: '100' },
      'max-tokens': { type: 'string', default: '64' },
      'timeout-ms': { type: 'string', default: '60000' },
      seed: { type: 'string', default: '1' },
      model: { type: 'string', default: process.env.MODEL_PATH ?? defaultModelPath() },
      http: { type: 'string', default: process.env.MLX_SERVING_URL },
    },
  });
  const num = (name: string, v: string, min: number) => {
    const n = Number(v);
    if (!Number.isFinite(n) || n < min) throw new Error(`--${name} must be a number >= ${min}, got '${v}'`);
    return n;
  };
  return {
    rate: num('rate', values.rate!, 0.001),
    durationS: num('duration', values.duration!, 0.1),
    maxConcurrent: num('max-concurrent', values['max-concurrent']!, 1),
    maxTokens: num('max-tokens', values['max-tokens']!, 1),
    timeoutMs: num('timeout-ms', values['timeout-ms']!, 1),
    seed: num('seed', values.seed!, 0),
    model: values.model!,
    http: values.http,
  };
}

export function printThroughput(rows: ThroughputResult[]): void {
  console.log(
    table(
      ['Phase', 'Target req/s', 'Avg Req/s', 'Peak Concurrent', 'Avg latency', 'P95 latency', 'Output tok/s', 'Error rate', 'CPU %', 'Peak RSS'],
      rows.map((r) => [
        r.phase,
        fmt(r.targetRate, 2),
        fmt(r.avgReqPerS, 2),
        r.peakConcurrent,
        `${fmt(r.avgLatencyMs, 0)} ms`,
        `${fmt(r.p95LatencyMs, 0)} ms`,
        fmt(r.outputTokPerS),
        `${fmt(r.errorRate * 100)}%`,
        fmt(r.avgCpuPct),
        `${fmt(r.peakRssMiB, 0)} MiB`,
      ]),
    ),
  );
}

export async function main(defaults = { rate: 2, durationS: 600 }, name = 'throughput-benchmark'): Promise<void> {
  const o = loadOptions(defaults);
  const rows: ThroughputResult[] = [];
  for (const target of await openTargets({ http: o.http, model: o.model })) {
    rows.push(await runLoad(target, o, `throughput-${target.name}`));
    await target.close();
  }
  console.log(`\nOpen-loop Poisson load, ${o.rate} req/s for ${o.durationS} s, ${o.maxTokens} output tokens, ${o.http ?? o.model}`);
  printThroughput(rows);
  console.log(`\nwrote ${writeResult(name, { options: o, rows })}`);
}

if (require.main === module) {
  main().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
