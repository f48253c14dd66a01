/**
 * Soak: a mixed load for a given time against the engine in this process
 * (the TypeScript API and the HTTP server side by side), sampling memory,
 * KV blocks, handles and errors every second. Memory must be flat once warm.
 *
 *   npx tsx benchmarks/soak.ts [--duration 1800] [--concurrency 6] [--warm 0.3] [--max-growth-mib 32]
 *
 * The mix: chat and raw prompts; streaming and not; greedy and seeded
 * sampling; short and long outputs; random aborts mid-stream, impossible
 * timeouts, invalid requests; and a second model id loaded and unloaded
 * again and again (the model cache evicting and reloading).
 *
 * Verdict: after the warm fraction of the run, RSS beside the KV cache (RSS
 * minus the KV blocks written so far, which fill their fixed budget as the
 * prefix cache keeps blocks) may not grow by more than --max-growth-mib
 * (the last quarter's minimum against the first warm quarter's); at the end the
 * engine must be idle with no KV blocks in use, and no error may be other
 * than the mix provokes. Exit code 0 (flat) or 1. Writes JSON to
 * benchmarks/results/.
 */
import { parseArgs } from 'node:util';

import { createEngine, defaultModelPath, type Engine, type GeneratorParams } from '../lib/index';
import { fmt, progress, progressDone, rng, table, writeResult } from './utils';

const { values } = parseArgs({
  options: {
    duration: { type: 'string', default: '1800' },
    concurrency: { type: 'string', default: '6' },
    warm: { type: 'string', default: '0.3' },
    'max-growth-mib': { type: 'string', default: '32' },
    seed: { type: 'string', default: '1' },
  },
});
const DURATION_S = Number(values.duration);
const CONCURRENCY = Number(values.concurrency);

interface Sample {
  t: number;
  rssMiB: number;
  /** KV cache memory written so far: a cache filling its budget, not a leak. */
  kvTouchedMiB: number;
  heapMiB: number;
  kvBlocksUsed: number;
  running: number;
  waiting: number;
  handles: number;
  done: number;
  errors: Record<string, number>;
}

const counts = { done: 0, errors: {} as Record<string, number> };
const countError = (code: string) => (counts.errors[code] = (counts.errors[code] ?? 0) + 1);
const EXPECTED = new Set(['Cancelled', 'Timeout', 'InvalidParams', 'Overloaded', 'ModelNotLoaded', 'HTTP 400', 'HTTP 404', 'HTTP 429']);

async function viaApi(engine: Engine, params: GeneratorParams, rand: () => number): Promise<void> {
  const ctl = new AbortController();
  const abortAfter = rand() < 0.15 ? Math.floor(rand() * 6) : -1;
  const timeoutMs = rand() < 0.05 ? 1 : undefined;
  let n = 0;
  try {
    for await (const c of engine.createGenerator(params, { signal: ctl.signal, timeoutMs })) {
      if (c.type === 'token' && n++ === abortAfter) ctl.abort();
      if (c.type === 'error') countError(c.error.code);
    }
    counts.done++;
  } catch (e) {
    countError((e as { code?: string }).code ?? 'thrown');
  }
}

async function viaHttp(url: string, params: GeneratorParams, rand: () => number): Promise<void> {
  const stream = rand() < 0.5;
  const ctl = new AbortController();
  const body = params.messages
    ? { model: params.model, messages: params.messages, max_tokens: params.maxTokens, temperature: params.temperature ?? 0, seed: params.seed, stream }
    : { model: params.model, prompt: params.prompt, max_tokens: params.maxTokens, temperature: params.temperature ?? 0, seed: params.seed, stream };
  try {
    const res = await fetch(`${url}/v1/${params.messages ? 'chat/completions' : 'completions'}`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
      signal: ctl.signal,
    });
    if (res.status !== 200) countError(`HTTP ${res.status}`);
    if (stream && rand() < 0.2) ctl.abort(); // disconnect mid-stream
    else await res.text();
    counts.done++;
  } catch (e) {
    if ((e as Error).name !== 'AbortError') countError('fetch');
  }
}

async function main(): Promise<number> {
  const rand = rng(Number(values.seed));
  // Two models: 'default' always, 'spare' loaded and unloaded over and over.
  const engine = await createEngine();
  await engine.loadModel('default');
  const server = await engine.startServer({ port: 0, maxConcurrent: CONCURRENCY * 2 });
  const samples: Sample[] = [];
  const t0 = performance.now();
  const elapsed = () => (performance.now() - t0) / 1000;
  const sample = () => {
    const m = engine.getMetrics();
    const mem = process.memoryUsage();
    samples.push({
      t: elapsed(),
      rssMiB: mem.rss / 2 ** 20,
      kvTouchedMiB: m.kvCache.bytesTouched / 2 ** 20,
      heapMiB: mem.heapUsed / 2 ** 20,
      kvBlocksUsed: m.kvCache.blocksUsed - m.kvCache.blocksPinned,
      running: m.running,
      waiting: m.waiting,
      handles: (process as unknown as { _getActiveHandles(): unknown[] })._getActiveHandles().length,
      done: counts.done,
      errors: { ...counts.errors },
    });
    const last = samples[samples.length - 1];
    progress(`[soak] ${fmt(last.t, 0)}/${DURATION_S} s, rss ${fmt(last.rssMiB, 0)} MiB, ${last.done} done, ${last.running} running`);
  };
  const timer = setInterval(sample, 1000);

  const prompts = ['Once upon a time', 'The capital of France is', 'def add(a, b):', 'List three fruits:', 'Explain rain in one line.'];
  const worker = async (w: number) => {
    const r = rng(Number(values.seed) * 1000 + w);
    while (elapsed() < DURATION_S) {
      const x = r();
      const maxTokens = r() < 0.2 ? 96 : 1 + Math.floor(r() * 16);
      const sampled = r() < 0.3 ? { temperature: 0.8, seed: Math.floor(r() * 1000) } : {};
      const params: GeneratorParams =
        r() < 0.5
          ? { model: 'default', prompt: prompts[Math.floor(r() * prompts.length)], maxTokens, ...sampled }
          : { model: 'default', messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: prompts[Math.floor(r() * prompts.length)] }], maxTokens, ...sampled };
      if (x < 0.04) await viaApi(engine, { ...params, maxTokens: -1 }, r); // invalid
      else if (x < 0.08) {
        // The spare model: load, use, unload (the cache evicts and reloads).
        try {
          await engine.loadModel({ model: defaultModelPath(), modelId: 'spare' });
          await viaApi(engine, { ...params, model: 'spare' }, r);
          await engine.unloadModel('spare');
        } catch (e) {
          countError((e as { code?: string }).code ?? 'thrown');
        }
      } else if (x < 0.5) await viaApi(engine, params, r);
      else await viaHttp(server.url, params, r);
    }
  };
  await Promise.all(Array.from({ length: CONCURRENCY }, (_, w) => worker(w)));
  clearInterval(timer);
  await new Promise((r) => setTimeout(r, 500));
  sample();
  progressDone();
  await server.close(1000);
  const end = engine.getMetrics();
  await engine.shutdown();

  // Verdict on the samples after warm-up.
  const warm = samples.filter((s) => s.t >= DURATION_S * Number(values.warm));
  const q = Math.max(1, Math.floor(warm.length / 4));
  // The KV pools fill their fixed budget as the prefix cache keeps blocks: that is the cache, not
  // a leak, so the verdict is on the memory beside it.
  // Floors (quarter minima): the spare model swings RSS by its size while loaded; a leak lifts the floor.
  const floor = (xs: Sample[]) => Math.min(...xs.map((s) => s.rssMiB - s.kvTouchedMiB));
  const early = floor(warm.slice(0, q));
  const late = floor(warm.slice(-q));
  const growth = late - early;
  const unexpected = Object.entries(counts.errors).filter(([k]) => !EXPECTED.has(k));
  const idle = end.running === 0 && end.waiting === 0 && end.kvCache.blocksUsed === end.kvCache.blocksPinned;
  const flat = growth <= Number(values['max-growth-mib']);

  const every = Math.max(1, Math.floor(samples.length / 12));
  console.log(`\nSoak, ${DURATION_S} s, ${CONCURRENCY} concurrent clients (API and HTTP mixed)`);
  console.log(
    table(
      ['t (s)', 'RSS MiB', 'KV written MiB', 'RSS - KV MiB', 'JS heap MiB', 'KV blocks in use', 'running', 'handles', 'requests done', 'errors'],
      samples
        .filter((_, i) => i % every === 0 || i === samples.length - 1)
        .map((s) => [fmt(s.t, 0), fmt(s.rssMiB, 0), fmt(s.kvTouchedMiB, 0), fmt(s.rssMiB - s.kvTouchedMiB, 0), fmt(s.heapMiB, 0), s.kvBlocksUsed, s.running, s.handles, s.done, Object.values(s.errors).reduce((a, b) => a + b, 0)]),
    ),
  );
  console.log(`\nErrors by code (all expected from the mix unless listed as unexpected): ${JSON.stringify(counts.errors)}`);
  console.log(`RSS beside the KV cache after warm-up: ${fmt(early)} MiB -> ${fmt(late)} MiB (growth ${fmt(growth)} MiB, limit ${values['max-growth-mib']} MiB): ${flat ? 'FLAT' : 'GROWING'}`);
  console.log(`End state: ${idle ? 'idle, no KV blocks in use' : `NOT IDLE (${end.running} running, ${end.waiting} waiting, ${end.kvCache.blocksUsed} blocks)`}`);
  if (unexpected.length) console.log(`Unexpected errors: ${JSON.stringify(Object.fromEntries(unexpected))}`);
  console.log(`wrote ${writeResult('soak', { durationS: DURATION_S, concurrency: CONCURRENCY, samples, errors: counts.errors, rssGrowthMiB: growth, flat, idle })}`);
  return flat && idle && !unexpected.length ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (e) => {
    console.error(e);
    process.exit(2);
  },
);
