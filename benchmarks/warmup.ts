/**
 * Load-time warmup, on against off, in one run: TTFT of the first request
 * after loading against the median of the next nine (different prompts, no
 * prefix reuse), on fresh engines, alternating, median over trials.
 *
 *   npx tsx benchmarks/warmup.ts [--trials 3]
 */
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

import { createEngine } from '../lib/index';
import { fmt, percentile, table, writeResult } from './utils';

const { values } = parseArgs({ options: { trials: { type: 'string', default: '3' } } });

function flags(warmup: boolean): string {
  const file = path.join(mkdtempSync(path.join(tmpdir(), 'mlx-serving-warmup-')), 'flags.yaml');
  writeFileSync(
    file,
    'phase5: {enabled: true, rollout_percentage: 100, hash_seed: "w"}\n' +
      `features:\n  ttft_pipeline: {enabled: true, rollout_percentage: 100, hash_seed: "t", kv_prefetch: false, warmup: ${warmup}}\n`,
  );
  return file;
}

async function trial(warmup: boolean): Promise<{ loadMs: number; firstMs: number; restMs: number }> {
  const engine = await createEngine({ featureFlagsPath: flags(warmup) });
  const t0 = performance.now();
  await engine.loadModel('default');
  const loadMs = performance.now() - t0;
  const ttfts: number[] = [];
  for (let i = 0; i < 10; i++) {
    for await (const c of engine.createGenerator({ model: 'default', prompt: `Question ${i}: what colour is the sky at dusk?`, maxTokens: 1 })) {
      if (c.type === 'metadata') ttfts.push(c.stats.timeToFirstToken);
    }
  }
  await engine.shutdown();
  return { loadMs, firstMs: ttfts[0], restMs: percentile([...ttfts.slice(1)].sort((a, b) => a - b), 50) };
}

async function main(): Promise<void> {
  const runs: Record<'off' | 'on', { loadMs: number; firstMs: number; restMs: number }[]> = { off: [], on: [] };
  for (let t = 0; t < Number(values.trials); t++) {
    runs.off.push(await trial(false));
    runs.on.push(await trial(true));
  }
  const med = (xs: number[]) => percentile([...xs].sort((a, b) => a - b), 50);
  const rows = (['off', 'on'] as const).map((k) => {
    const r = runs[k];
    const first = med(r.map((x) => x.firstMs));
    const rest = med(r.map((x) => x.restMs));
    return [k, `${fmt(med(r.map((x) => x.loadMs)), 0)} ms`, `${fmt(first)} ms`, `${fmt(rest)} ms`, `${fmt(first / rest, 2)}x`];
  });
  console.log(`\nWarmup at load, median of ${values.trials} fresh engines`);
  console.log(table(['Warmup', 'Load', 'First TTFT', 'Median TTFT (2nd-10th)', 'First / rest'], rows));
  console.log(`\nwrote ${writeResult('warmup', { runs })}`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
