/**
 * What a JSON schema costs: decode throughput and TTFT with and without one
 * at 1, 8 and 32 streams (same prompts, same token counts, one run), and the
 * first-use compile time of each schema in the test battery.
 *
 * Constrained runs use a schema that cannot end before `--tokens` (an array
 * of at least 500 records), so both sides generate exactly as many tokens;
 * the unconstrained side sets ignoreEos for the same reason. A schema forces
 * some tokens (`", "age": `), which the engine feeds in one step like a
 * prompt, so it can beat free text; the `mask` column isolates the per-token
 * cost of the mask with a regex that forces nothing (600 letters).
 *
 *   npx tsx benchmarks/structured.ts [--model default] [--streams 1,8,32] [--tokens 96] [--runs 3]
 */
import { parseArgs } from 'node:util';

import { createEngine, type Engine, type GeneratorParams } from '../lib/index';
import { SCHEMAS } from '../__test__/schemas';
import { fmt, percentile, table, writeResult } from './utils';

const { values: args } = parseArgs({
  options: {
    model: { type: 'string', default: 'default' },
    streams: { type: 'string', default: '1,8,32' },
    tokens: { type: 'string', default: '96' },
    runs: { type: 'string', default: '3' },
  },
});
const LEVELS = args.streams!.split(',').map(Number);
const N_TOKENS = Number(args.tokens);
const RUNS = Number(args.runs);

const RECORDS = {
  type: 'array',
  minItems: 500,
  items: {
    type: 'object',
    properties: { name: { type: 'string', maxLength: 16 }, age: { type: 'integer', minimum: 0, maximum: 120 }, city: { type: 'string', maxLength: 16 } },
    required: ['name', 'age', 'city'],
    additionalProperties: false,
  },
};

interface Level { streams: number; tokPerS: number; ttftP50: number }
type Kind = 'free' | 'schema' | 'mask';
const KIND: Record<Kind, Partial<GeneratorParams>> = {
  free: { ignoreEos: true },
  schema: { responseFormat: { type: 'json_schema', schema: RECORDS } },
  mask: { regex: '[a-z ,.]{600}' },
};

async function level(engine: Engine, model: string, n: number, kind: Kind): Promise<Level> {
  const t0 = performance.now();
  const ttfts: number[] = [];
  let tokens = 0;
  await Promise.all(
    Array.from({ length: n }, async (_, i) => {
      const p: GeneratorParams = {
        model,
        messages: [{ role: 'user', content: `List people (batch ${i}) as JSON records.` }],
        maxTokens: N_TOKENS,
        ...KIND[kind],
      };
      for await (const c of engine.createGenerator(p)) {
        if (c.type === 'error') throw new Error(c.error.message);
        if (c.type === 'metadata') {
          tokens += c.stats.tokensGenerated;
          ttfts.push(c.stats.timeToFirstToken);
        }
      }
    }),
  );
  const wall = (performance.now() - t0) / 1e3;
  ttfts.sort((a, b) => a - b);
  return { streams: n, tokPerS: tokens / wall, ttftP50: percentile(ttfts, 50) };
}

async function main(): Promise<void> {
  const engine = await createEngine();
  const model = args.model!;
  await engine.loadModel(model);
  await engine.warmupModel(model);

  // First use: the token trie (once per model), then each schema's compile
  // (once per distinct schema; later requests reuse it). Measured as the
  // TTFT difference against the same request unconstrained.
  const ttft = async (p: Partial<GeneratorParams>): Promise<number> => {
    for await (const c of engine.createGenerator({ model, prompt: 'JSON:', maxTokens: 1, ...p })) {
      if (c.type === 'metadata') return c.stats.timeToFirstToken;
      if (c.type === 'error') throw new Error(c.error.message);
    }
    throw new Error('no metadata');
  };
  const plain = Math.min(await ttft({}), await ttft({}), await ttft({}));
  const trie = (await ttft({ regex: '[a-z]+' })) - plain;
  const compile: number[] = [];
  for (const schema of SCHEMAS) compile.push((await ttft({ responseFormat: { type: 'json_schema', schema } })) - plain);
  const cached = (await ttft({ responseFormat: { type: 'json_schema', schema: SCHEMAS[0] } })) - plain;
  compile.sort((a, b) => a - b);
  console.log(`\nfirst constrained request on the model (token trie): +${fmt(trie)} ms`);
  console.log(`schema compile over ${SCHEMAS.length} schemas (first use): p50 ${fmt(percentile(compile, 50), 2)} ms, p90 ${fmt(percentile(compile, 90), 2)} ms, max ${fmt(compile.at(-1)!, 2)} ms; cached: ${fmt(cached, 2)} ms`);

  const rows: Array<Record<Kind, Level> & { streams: number }> = [];
  const kinds = Object.keys(KIND) as Kind[];
  for (const n of LEVELS) {
    const runs: Record<Kind, Level[]> = { free: [], schema: [], mask: [] };
    for (let r = 0; r < RUNS; r++) {
      // Interleaved, so drift on a shared machine hits every side alike.
      for (const k of kinds) runs[k].push(await level(engine, model, n, k));
    }
    const median = (ls: Level[]) => ls.sort((a, b) => a.tokPerS - b.tokPerS)[Math.floor(ls.length / 2)];
    rows.push({ streams: n, free: median(runs.free), schema: median(runs.schema), mask: median(runs.mask) });
  }
  console.log(`\n${model}, ${N_TOKENS} tokens per stream, median of ${RUNS}`);
  console.log(
    table(
      ['streams', 'tok/s free', 'tok/s schema', 'schema / free', 'tok/s mask', 'mask / free', 'TTFT p50 ms free / schema / mask'],
      rows.map((r) => [
        r.streams, fmt(r.free.tokPerS), fmt(r.schema.tokPerS), `${fmt(r.schema.tokPerS / r.free.tokPerS, 3)}x`,
        fmt(r.mask.tokPerS), `${fmt(r.mask.tokPerS / r.free.tokPerS, 3)}x`, `${fmt(r.free.ttftP50)} / ${fmt(r.schema.ttftP50)} / ${fmt(r.mask.ttftP50)}`,
      ]),
    ),
  );
  writeResult('structured', { date: new Date().toISOString(), model, tokens: N_TOKENS, runs: RUNS, trieMs: trie, compileMs: compile, cachedMs: cached, rows });
  await engine.shutdown();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
