/**
 * Prompt-lookup speculative decoding, on against off, in one run on the
 * default model: decode tok/s of single greedy streams on inputs whose
 * answer repeats the input (rewriting code, quoting a text) and on inputs
 * that do not (open questions), with the share of guesses kept. Engines
 * alternate per trial; the table gives medians.
 *
 *   npx tsx benchmarks/speculative.ts [--trials 3] [--tokens 128]
 */
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

import { createEngine, type Engine } from '../lib/index';
import { fmt, percentile, table, writeResult } from './utils';

const { values } = parseArgs({ options: { trials: { type: 'string', default: '3' }, tokens: { type: 'string', default: '128' } } });
const trials = Number(values.trials);
const maxTokens = Number(values.tokens);

const CODE = `function total(items) {
  let sum = 0;
  for (const item of items) {
    if (item.price > 0) {
      sum += item.price * item.quantity;
    }
  }
  return sum;
}`;
const TEXT =
  'The committee met on Tuesday to review the budget. After a long discussion, the members agreed to fund the new library wing, ' +
  'to repair the roof of the town hall, and to postpone the decision on the bridge until the spring survey is complete.';

const WORKLOADS: Record<string, string[]> = {
  repeating: [
    `Rename the variable sum to total in this code and show the whole code:\n\n${CODE}`,
    `Copy this text exactly:\n\n${TEXT}`,
    `Add a comment above the loop and repeat the whole function:\n\n${CODE}`,
  ],
  'not repeating': ['Why is the sky blue?', 'Write a short poem about autumn.', 'Give three tips for learning to cook.'],
};

function config(on: boolean): string {
  const file = path.join(mkdtempSync(path.join(tmpdir(), 'mlx-serving-spec-')), 'runtime.yaml');
  writeFileSync(file, `speculative:\n  enabled: ${on}\n`);
  return file;
}

async function run(engine: Engine, prompt: string): Promise<{ tps: number; text: string }> {
  let text = '';
  let tps = 0;
  for await (const c of engine.createGenerator({ model: 'default', messages: [{ role: 'user', content: prompt }], maxTokens, temperature: 0 })) {
    if (c.type === 'token') text += c.token;
    if (c.type === 'metadata') tps = c.stats.tokensPerSecond;
  }
  return { tps, text };
}

(async () => {
  const engines = { off: await createEngine({ configPath: config(false) }), on: await createEngine({ configPath: config(true) }) };
  for (const e of Object.values(engines)) await e.loadModel('default');
  const rows: (string | number)[][] = [];
  const result: Record<string, unknown> = {};
  for (const [name, prompts] of Object.entries(WORKLOADS)) {
    const tps = { off: [] as number[], on: [] as number[] };
    let mismatches = 0;
    const before = engines.on.getMetrics().speculative;
    for (let t = 0; t < trials; t++) {
      for (const p of prompts) {
        const off = await run(engines.off, p);
        const on = await run(engines.on, p);
        tps.off.push(off.tps);
        tps.on.push(on.tps);
        if (off.text !== on.text) mismatches++;
      }
    }
    const after = engines.on.getMetrics().speculative;
    const drafted = after.drafted - before.drafted;
    const kept = after.accepted - before.accepted;
    const med = (xs: number[]) => percentile([...xs].sort((a, b) => a - b), 50);
    rows.push([name, fmt(med(tps.off)), fmt(med(tps.on)), fmt(med(tps.on) / med(tps.off), 2) + 'x', drafted, drafted ? fmt((100 * kept) / drafted) + '%' : '-', mismatches]);
    result[name] = { tpsOff: tps.off, tpsOn: tps.on, drafted, kept, mismatches };
  }
  console.log(table(['workload', 'off tok/s', 'on tok/s', 'ratio', 'guessed', 'kept', 'output diffs'], rows));
  console.log(`wrote ${writeResult('speculative', { maxTokens, trials, result })}`);
  for (const e of Object.values(engines)) await e.shutdown();
})();
