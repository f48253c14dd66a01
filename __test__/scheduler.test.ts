/**
 * The serving scheduler on the real default model: batched output equals
 * solo output, a prefix-cache hit equals a cold run, preemption under a tiny
 * KV budget keeps outputs, and every way a request can end gives its KV
 * blocks back.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { createEngine, EngineClientError, type Engine, type GeneratorParams } from '../lib/index';

const MODEL = 'default';

async function ids(engine: Engine, params: GeneratorParams): Promise<number[]> {
  const out: number[] = [];
  for await (const c of engine.createGenerator(params)) {
    if (c.type === 'token') out.push(c.tokenId);
    if (c.type === 'error') throw new EngineClientError(c.error.code, c.error.message);
  }
  return out;
}

/** The worker publishes its state just before final events; poll briefly for idle. */
async function idle(engine: Engine): Promise<ReturnType<Engine['getMetrics']>> {
  let m = engine.getMetrics();
  for (let i = 0; i < 200 && (m.running || m.waiting || m.kvCache.blocksUsed > m.kvCache.blocksPinned); i++) {
    await new Promise((r) => setTimeout(r, 5));
    m = engine.getMetrics();
  }
  return m;
}

const PROMPTS = Array.from({ length: 16 }, (_, i) =>
  [
    'The sun is',
    'My favourite food is',
    'In the year 2050,',
    'The cat sat on',
    'Rust is a language that',
    'Once upon a time',
    'The best way to learn is',
    'Water boils at',
  ][i % 8] + (i >= 8 ? ' (again)' : ''),
);

describe('scheduler on the default model', () => {
  let engine: Engine;
  before(async () => {
    engine = await createEngine();
    await engine.loadModel(MODEL);
  });
  after(async () => {
    await engine.shutdown();
  });

  test('greedy output of a request is the same alone and batched with 15 others', async () => {
    const solo: number[][] = [];
    for (const p of PROMPTS) solo.push(await ids(engine, { model: MODEL, prompt: p, maxTokens: 24, ignoreEos: true }));
    const batched = await Promise.all(PROMPTS.map((p) => ids(engine, { model: MODEL, prompt: p, maxTokens: 24, ignoreEos: true })));
    assert.deepEqual(batched, solo);
    const m = await idle(engine);
    assert.equal(m.kvCache.blocksUsed, m.kvCache.blocksPinned);
    assert.ok(m.ttft.count >= 32 && m.itl.count > 0 && m.e2e.count >= 32, 'histograms observed every request');
  });

  test('a prefix-cache hit gives the cold output and skips the shared blocks', async () => {
    const system = 'You are a meticulous assistant. '.repeat(40);
    const messages = [
      { role: 'system', content: system },
      { role: 'user', content: 'Name a colour.' },
    ];
    const before = engine.getMetrics().prefixCache;
    const cold = await ids(engine, { model: MODEL, messages, maxTokens: 12 });
    const mid = engine.getMetrics().prefixCache;
    assert.ok(mid.queries > before.queries);
    const warm = await ids(engine, { model: MODEL, messages, maxTokens: 12 });
    assert.deepEqual(warm, cold);
    const after = engine.getMetrics().prefixCache;
    // Nearly the whole ~250-token prompt came from the cache the second time.
    assert.ok(after.hits - mid.hits > 200, `hits ${after.hits - mid.hits}`);
    // A different salt shares nothing and still gives the same output.
    const salted: number[] = [];
    for await (const c of engine.createGenerator({ model: MODEL, messages, maxTokens: 12 }, { cacheSalt: 'tenant-b' })) {
      if (c.type === 'token') salted.push(c.tokenId);
    }
    assert.deepEqual(salted, cold);
    assert.equal(engine.getMetrics().prefixCache.hits, after.hits);
  });

  test('warmupModel pins a system prompt: its blocks stay referenced and later chats reuse them', async () => {
    const system = 'You are the assistant of a small museum. Mention opening hours (10:00 to 18:00) when asked. '.repeat(6);
    await engine.warmupModel(MODEL, { messages: [[{ role: 'system', content: system }]] });
    const m0 = await idle(engine);
    assert.ok(m0.kvCache.blocksPinned >= 4, `pinned ${m0.kvCache.blocksPinned}`);
    assert.equal(m0.kvCache.blocksUsed, m0.kvCache.blocksPinned, 'only pinned blocks stay referenced');
    await ids(engine, { model: MODEL, messages: [{ role: 'system', content: system }, { role: 'user', content: 'When do you open?' }], maxTokens: 4 });
    const m1 = await idle(engine);
    assert.ok(m1.prefixCache.hits - m0.prefixCache.hits >= m0.kvCache.blocksPinned * 16 - 16, `hits ${m1.prefixCache.hits - m0.prefixCache.hits}`);
    assert.ok(engine.getModelInfo(MODEL)!.warmupMs > 0, 'loading warmed the model up');
  });

  test('cancelled and timed-out requests leave no KV blocks in use', async () => {
    const long: GeneratorParams = { model: MODEL, prompt: 'Tell me a long story.', maxTokens: 400, ignoreEos: true };
    const ctl = new AbortController();
    const lastChunk = async (opts: Parameters<Engine['createGenerator']>[1]) => {
      let last;
      for await (const c of engine.createGenerator(long, opts)) last = c;
      return last;
    };
    const signalled = lastChunk({ signal: ctl.signal });
    const timedOut = lastChunk({ timeoutMs: 50 });
    // Breaking out of a loop early cancels too.
    for await (const c of engine.createGenerator(long)) if (c.type === 'token') break;
    ctl.abort();
    const [a, t] = await Promise.all([signalled, timedOut]);
    assert.ok(a?.type === 'error' && a.error.code === 'Cancelled', JSON.stringify(a));
    assert.ok(t?.type === 'error' && t.error.code === 'Timeout', JSON.stringify(t));
    const m = await idle(engine);
    assert.equal(m.kvCache.blocksUsed, m.kvCache.blocksPinned);
    assert.equal(m.running + m.waiting, 0);
  });
});

test('a tiny KV budget preempts and recomputes without changing outputs; the queue is bounded', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'mlx-serving-sched-'));
  const cfg = path.join(dir, 'runtime.yaml');
  // 23,040 bytes per position on this model: 2 MiB holds 91 positions (5 blocks of 16).
  writeFileSync(cfg, 'kv_cache:\n  memoryMiB: 2\n  blockSize: 16\nscheduler:\n  maxQueuedRequests: 8\n');
  const engine = await createEngine({ configPath: cfg });
  try {
    await engine.loadModel(MODEL);
    assert.equal(engine.getMetrics().kvCache.blocksTotal, 5);
    const prompts = PROMPTS.slice(0, 4);
    const params = (p: string): GeneratorParams => ({ model: MODEL, prompt: p, maxTokens: 30, ignoreEos: true });
    const solo: number[][] = [];
    for (const p of prompts) solo.push(await ids(engine, params(p)));
    const batched = await Promise.all(prompts.map((p) => ids(engine, params(p))));
    assert.deepEqual(batched, solo);
    const m = await idle(engine);
    assert.ok(m.preemptions > 0, 'four sequences of ~36 positions cannot fit 80 positions at once');
    assert.equal(m.kvCache.blocksUsed, 0);
    // A prompt longer than the whole cache is refused up front.
    await assert.rejects(ids(engine, params('word '.repeat(120))), (e: unknown) => e instanceof EngineClientError && e.code === 'InvalidParams');
    // More requests than the queue holds: the rest get Overloaded at once, the admitted ones finish.
    const results = await Promise.allSettled(Array.from({ length: 20 }, (_, i) => ids(engine, params(PROMPTS[i % 16]))));
    const refused = results.filter((r) => r.status === 'rejected');
    assert.ok(refused.length > 0);
    for (const r of refused) assert.equal(((r as PromiseRejectedResult).reason as EngineClientError).code, 'Overloaded');
    assert.ok(results.some((r) => r.status === 'fulfilled'));
    assert.equal((await idle(engine)).kvCache.blocksUsed, 0);
  } finally {
    await engine.shutdown();
    rmSync(dir, { recursive: true, force: true });
  }
});
