/**
 * Speculative decoding in one run on the default model, against plain
 * decoding: prompt lookup, and a draft model (the model drafting for itself,
 * the upper bound of agreement, and a layer-skip draft: the model's first
 * `--draft-layers` layers and its own head, written by `convertModel`).
 * Decode tok/s of single greedy streams on inputs whose answer repeats the
 * input (rewriting code, quoting a text) and on inputs that do not (open
 * questions), with the share of guesses kept. Engines alternate per trial;
 * the table gives medians.
 *
 *   npx tsx benchmarks/speculative.ts [--trials 3] [--tokens 128] [--draft-layers 6]
 */
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

import { convertModel, createEngine, type Engine } from '../lib/index';
import { fmt, percentile, table, writeResult } from './utils';

const { values } = parseArgs({
  options: { trials: { type: 'string', default: '3' }, tokens: { type: 'string', default: '128' }, 'draft-layers': { type: 'string', default: '6' } },
});
const trials = Number(values.trials);
const maxTokens = Number(values.tokens);
const draftLayers = Number(values['draft-layers']);

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

const work = mkdtempSync(path.join(tmpdir(), 'mlx-serving-spec-'));

function config(on: boolean): string {
  const file = path.join(work, `runtime-${on}.yaml`);
  writeFileSync(file, `speculative:\n  enabled: ${on}\n`);
  return file;
}

/** The default model cut to its first `n` layers (an MLX folder reads only the layers its config names). */
async function layerSkipDraft(n: number): Promise<string> {
  const dir = path.join(work, `first-${n}-layers`);
  await convertModel('default', dir);
  const cfgPath = path.join(dir, 'config.json');
  const cfg = JSON.parse(readFileSync(cfgPath, 'utf8'));
  cfg.num_hidden_layers = n;
  writeFileSync(cfgPath, JSON.stringify(cfg));
  return dir;
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
  const engines: Record<string, Engine> = {
    off: await createEngine({ configPath: config(false) }),
    'prompt lookup': await createEngine({ configPath: config(true) }),
    'draft: itself': await createEngine({ configPath: config(true) }),
    [`draft: ${draftLayers} layers`]: await createEngine({ configPath: config(true) }),
  };
  for (const e of Object.values(engines)) await e.loadModel('default');
  await engines['draft: itself'].loadDraftModel({ model: 'default', modelId: 'self' });
  await engines[`draft: ${draftLayers} layers`].loadDraftModel({ model: await layerSkipDraft(draftLayers), modelId: 'skip' });
  const arms = Object.keys(engines).filter((a) => a !== 'off');
  const rows: (string | number)[][] = [];
  const result: Record<string, unknown> = {};
  const med = (xs: number[]) => percentile([...xs].sort((a, b) => a - b), 50);
  for (const [name, prompts] of Object.entries(WORKLOADS)) {
    const tps: Record<string, number[]> = Object.fromEntries(Object.keys(engines).map((a) => [a, []]));
    const mismatches: Record<string, number> = Object.fromEntries(arms.map((a) => [a, 0]));
    const before = Object.fromEntries(arms.map((a) => [a, engines[a].getMetrics().speculative]));
    for (let t = 0; t < trials; t++) {
      for (const p of prompts) {
        const off = await run(engines.off, p);
        tps.off.push(off.tps);
        for (const a of arms) {
          const on = await run(engines[a], p);
          tps[a].push(on.tps);
          if (on.text !== off.text) mismatches[a]++;
        }
      }
    }
    rows.push([name, 'off', fmt(med(tps.off)), '1.00x', '-', '-', '-']);
    const armResults: Record<string, unknown> = {};
    for (const a of arms) {
      const after = engines[a].getMetrics().speculative;
      const drafted = after.drafted - before[a].drafted;
      const kept = after.accepted - before[a].accepted;
      rows.push([name, a, fmt(med(tps[a])), fmt(med(tps[a]) / med(tps.off), 2) + 'x', drafted, drafted ? fmt((100 * kept) / drafted) + '%' : '-', mismatches[a]]);
      armResults[a] = { tps: tps[a], drafted, kept, mismatches: mismatches[a] };
    }
    result[name] = { tpsOff: tps.off, arms: armResults };
  }
  console.log(table(['workload', 'speculation', 'tok/s', 'vs off', 'guessed', 'kept', 'output diffs'], rows));
  console.log(`wrote ${writeResult('speculative', { maxTokens, trials, draftLayers, result })}`);
  for (const e of Object.values(engines)) await e.shutdown();
})();
