/**
 * Aggregate decode throughput with N concurrent streams against one stream,
 * in one run: shows what batching the streams into one forward per step buys
 * (each weight is read once per step for the whole batch).
 *
 *   npx tsx benchmarks/concurrency.ts [--streams 1,2,4,8] [--tokens 64]
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

import { createEngine } from '../lib/index';

const { values: args } = parseArgs({
  options: {
    streams: { type: 'string', default: '1,2,4,8' },
    tokens: { type: 'string', default: '64' },
  },
});
const LEVELS = args.streams!.split(',').map(Number);
const N_TOKENS = Number(args.tokens);

async function main(): Promise<void> {
  const engine = await createEngine();
  await engine.loadModel('default');
  await engine.warmupModel('default');
  const rows: { streams: number; wallMs: number; tokens: number; aggTokPerS: number; meanTtftMs: number }[] = [];
  for (const n of LEVELS) {
    const t0 = performance.now();
    const stats = await Promise.all(
      Array.from({ length: n }, async (_, i) => {
        for await (const c of engine.createGenerator({ model: 'default', prompt: `Story number ${i}: once upon a time`, maxTokens: N_TOKENS, ignoreEos: true })) {
          if (c.type === 'metadata') return c.stats;
          if (c.type === 'error') throw new Error(c.error.message);
        }
        throw new Error('no metadata');
      }),
    );
    const wallMs = performance.now() - t0;
    const tokens = stats.reduce((a, s) => a + s.tokensGenerated, 0);
    rows.push({ streams: n, wallMs, tokens, aggTokPerS: (tokens * 1000) / wallMs, meanTtftMs: stats.reduce((a, s) => a + s.timeToFirstToken, 0) / n });
  }
  const base = rows[0].aggTokPerS;
  console.log(`\n${N_TOKENS} tokens per stream, default model`);
  console.log('| streams | wall ms | tokens | aggregate tok/s | vs 1 stream | mean TTFT ms |');
  console.log('| ---: | ---: | ---: | ---: | ---: | ---: |');
  for (const r of rows) {
    console.log(`| ${r.streams} | ${r.wallMs.toFixed(0)} | ${r.tokens} | ${r.aggTokPerS.toFixed(1)} | ${(r.aggTokPerS / base).toFixed(2)}x | ${r.meanTtftMs.toFixed(1)} |`);
  }
  const out = path.join(__dirname, 'results', 'concurrency.json');
  mkdirSync(path.dirname(out), { recursive: true });
  writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), tokensPerStream: N_TOKENS, rows }, null, 2));
  await engine.shutdown();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
