/**
 * KV prefetch of waiting requests, on against off, in one run on the default
 * model: a burst of requests with distinct ~200-token prompts, more than
 * the batch holds (batching.maxBatchSize 4), so most wait for a slot. With
 * prefetch the prompt budget that decode steps leave unused prefills the
 * waiting prompts into the prefix cache; TTFT then excludes most of their
 * prefill. Engines alternate per trial; percentiles are over all requests.
 *
 *   npx tsx benchmarks/kv-prefetch.ts [--trials 2] [--requests 12] [--tokens 32]
 */
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

import { createEngine, type Engine } from '../lib/index';
import { fmt, percentile, table, writeResult } from './utils';

const { values } = parseArgs({
  options: { trials: { type: 'string', default: '2' }, requests: { type: 'string', default: '12' }, tokens: { type: 'string', default: '32' } },
});
const trials = Number(values.trials);
const nRequests = Number(values.requests);
const maxTokens = Number(values.tokens);

const BODY =
  'Summarise the following notes for a colleague who missed the meeting. The team reviewed the quarterly plan, the hiring ' +
  'schedule, the budget for the new office, the state of the customer support queue, the migration of the billing system, ' +
  'the results of the last security audit, and the roadmap for the mobile application. Several open questions remain about ' +
  'the timeline of the migration and the staffing of the support team during the holidays.';

function config(on: boolean): string {
  const file = path.join(mkdtempSync(path.join(tmpdir(), 'mlx-serving-prefetch-')), 'runtime.yaml');
  writeFileSync(file, `batching:\n  maxBatchSize: 4\nscheduler:\n  prefetchWaiting: ${on}\n`);
  return file;
}

/** TTFT in ms of each request of a burst, and the burst's output texts. */
async function burst(engine: Engine, trial: number): Promise<{ ttft: number[]; texts: string[] }> {
  const t0 = performance.now();
  const runs = Array.from({ length: nRequests }, async (_, i) => {
    // A distinct first line: no two prompts share a cached prefix.
    const content = `Request ${trial}-${i}: ${'abcdefghijklmnop'[i % 16].repeat(3)}.\n${BODY}`;
    let first = 0;
    let text = '';
    for await (const c of engine.createGenerator({ model: 'default', messages: [{ role: 'user', content }], maxTokens, temperature: 0 })) {
      if (c.type === 'token') {
        if (!first) first = performance.now() - t0;
        text += c.token;
      }
    }
    return { first, text };
  });
  const done = await Promise.all(runs);
  return { ttft: done.map((d) => d.first), texts: done.map((d) => d.text) };
}

(async () => {
  const engines = { off: await createEngine({ configPath: config(false) }), on: await createEngine({ configPath: config(true) }) };
  for (const e of Object.values(engines)) await e.loadModel('default');
  const ttft = { off: [] as number[], on: [] as number[] };
  let diffs = 0;
  const before = engines.on.getMetrics().prefixCache;
  for (let t = 0; t < trials; t++) {
    const off = await burst(engines.off, t);
    const on = await burst(engines.on, t);
    ttft.off.push(...off.ttft);
    ttft.on.push(...on.ttft);
    diffs += off.texts.filter((x, i) => x !== on.texts[i]).length;
  }
  const after = engines.on.getMetrics().prefixCache;
  const rows = (['off', 'on'] as const).map((k) => {
    const s = [...ttft[k]].sort((a, b) => a - b);
    return [k, fmt(percentile(s, 50)), fmt(percentile(s, 95)), fmt(s[s.length - 1])];
  });
  const p = (k: 'off' | 'on', q: number) => percentile([...ttft[k]].sort((a, b) => a - b), q);
  rows.push(['on/off', fmt(p('on', 50) / p('off', 50), 2) + 'x', fmt(p('on', 95) / p('off', 95), 2) + 'x', '']);
  console.log(table(['prefetch', 'TTFT P50 ms', 'TTFT P95 ms', 'max ms'], rows));
  const prefetched = after.prefetchedTokens - before.prefetchedTokens;
  console.log(`prefetched ${prefetched} prompt tokens; cache hits ${after.hits - before.hits}; output diffs ${diffs}`);
  console.log(`wrote ${writeResult('kv-prefetch', { trials, nRequests, maxTokens, ttft, prefetched, diffs })}`);
  for (const e of Object.values(engines)) await e.shutdown();
})();
