/**
 * The public TypeScript API on the real default model: streaming, chat,
 * determinism, abort, timeouts, concurrency, events and lifecycle.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { createEngine, EngineClientError, type Engine, type GeneratorChunk } from '../lib/index';

const MODEL = 'default';

async function collect(gen: AsyncGenerator<GeneratorChunk>): Promise<{ text: string; ids: number[]; chunks: GeneratorChunk[] }> {
  const chunks: GeneratorChunk[] = [];
  let text = '';
  const ids: number[] = [];
  for await (const c of gen) {
    chunks.push(c);
    if (c.type === 'token') {
      text += c.token;
      ids.push(c.tokenId);
    }
  }
  return { text, ids, chunks };
}

describe('engine API on the default model', () => {
  let engine: Engine;
  const events: string[] = [];

  before(async () => {
    engine = await createEngine();
    for (const name of ['model:loaded', 'model:unloaded', 'generation:started', 'generation:completed']) {
      engine.on(name, () => events.push(name));
    }
    const handle = await engine.loadModel('default');
    assert.equal(handle.id, MODEL);
    assert.equal(handle.architecture, 'llama');
    assert.equal(handle.vocabSize, 49152);
  });

  after(async () => {
    await engine.shutdown();
  });

  test('streams a chat reply with tokens then metadata', async () => {
    const { text, chunks } = await collect(
      engine.createGenerator({ model: MODEL, messages: [{ role: 'user', content: 'Explain in three sentences why the sky is blue.' }], maxTokens: 24 }),
    );
    assert.match(text, /Rayleigh scattering/);
    const last = chunks.at(-1)!;
    assert.equal(last.type, 'metadata');
    if (last.type === 'metadata') {
      assert.ok(last.stats.promptTokens > 10);
      assert.equal(last.stats.tokensGenerated, chunks.filter((c) => c.type === 'token').length);
      assert.ok(last.stats.timeToFirstToken > 0 && last.stats.timeToFirstToken <= last.stats.totalTime);
      assert.ok(['stop', 'length'].includes(last.stats.finishReason));
    }
    for (const c of chunks) if (c.type === 'token') assert.ok(Number.isFinite(c.logprob) && c.logprob! <= 0);
  });

  test('greedy output is deterministic, and the same seed gives the same sample', async () => {
    const params = { model: MODEL, prompt: 'The best thing about the ocean is', maxTokens: 20 };
    const a = await engine.generate(params);
    const b = await engine.generate(params);
    assert.equal(a, b);
    assert.ok(a.length > 0);
    const sampled = { ...params, temperature: 0.9, topP: 0.95, topK: 40, seed: 1234 };
    assert.equal(await engine.generate(sampled), await engine.generate(sampled));
    const others = new Set<string>();
    for (let seed = 1; seed <= 4; seed++) others.add(await engine.generate({ ...sampled, seed }));
    assert.ok(others.size > 1, 'different seeds should give different samples');
  });

  test('maxTokens, stop sequences and stop token ids end the stream', async () => {
    const prompt = 'Count from one to twenty: one, two, three,';
    const full = await collect(engine.createGenerator({ model: MODEL, prompt, maxTokens: 12 }));
    assert.equal(full.ids.length, 12);
    const meta = full.chunks.at(-1)!;
    assert.ok(meta.type === 'metadata' && meta.stats.finishReason === 'length');

    const stopped = await engine.generate({ model: MODEL, prompt, maxTokens: 12, stopSequences: ['six'] });
    assert.ok(!stopped.includes('six'), stopped);
    assert.ok(full.text.startsWith(stopped), `${stopped} is not a prefix of ${full.text}`);

    // Stop on the first token id that did not occur before it.
    const k = full.ids.findIndex((id, i) => i > 0 && !full.ids.slice(0, i).includes(id));
    const byId = await collect(engine.createGenerator({ model: MODEL, prompt, maxTokens: 12, stopTokenIds: [full.ids[k]] }));
    assert.deepEqual(byId.ids, full.ids.slice(0, k));
  });

  test('prompt as token ids and tokenize/detokenize agree', async () => {
    const { tokens } = await engine.tokenize({ model: MODEL, text: 'Hello, world! 🦀' });
    assert.ok(tokens.length > 3);
    assert.equal((await engine.detokenize({ model: MODEL, tokens })).text, 'Hello, world! 🦀');
    // Control tokens round-trip too.
    const turn = '<|im_start|>user\nHi<|im_end|>';
    const ids = (await engine.tokenize({ model: MODEL, text: turn })).tokens;
    assert.equal((await engine.detokenize({ model: MODEL, tokens: ids })).text, turn);
    const viaText = await engine.generate({ model: MODEL, prompt: 'Hello, world! 🦀', maxTokens: 8 });
    const viaIds = await engine.generate({ model: MODEL, prompt: { tokens }, maxTokens: 8 });
    assert.equal(viaIds, viaText);
  });

  test('streamed text never carries broken UTF-8', async () => {
    const { chunks } = await collect(
      engine.createGenerator({
        model: MODEL,
        messages: [{ role: 'user', content: 'Reply with five emoji about food and nothing else.' }],
        maxTokens: 30,
      }),
    );
    for (const c of chunks) if (c.type === 'token') assert.ok(!c.token.includes('\uFFFD'), JSON.stringify(c.token));
  });

  test('one token chunk per generated token, also when max_tokens cuts a character in two', async () => {
    const emoji = { model: MODEL, messages: [{ role: 'user', content: 'Reply with three emoji only: 😀😀😀' }] };
    for (let maxTokens = 1; maxTokens <= 6; maxTokens++) {
      const { chunks } = await collect(engine.createGenerator({ ...emoji, maxTokens }));
      const tokens = chunks.filter((c) => c.type === 'token');
      const meta = chunks.find((c) => c.type === 'metadata');
      assert.ok(meta?.type === 'metadata');
      assert.equal(tokens.length, meta.stats.tokensGenerated, `maxTokens ${maxTokens}: ${JSON.stringify(tokens)}`);
      const text = tokens.map((c) => (c.type === 'token' ? c.token : '')).join('');
      assert.equal(text, await engine.generate({ ...emoji, maxTokens }));
    }
  });

  test('AbortSignal stops a stream within one token', async () => {
    const controller = new AbortController();
    let tokens = 0;
    let error: GeneratorChunk | undefined;
    const story = { model: MODEL, messages: [{ role: 'user', content: 'Write a long story about a dragon.' }], maxTokens: 400 };
    for await (const c of engine.createGenerator(story, { signal: controller.signal })) {
      if (c.type === 'token' && ++tokens === 5) controller.abort();
      if (c.type === 'error') error = c;
    }
    assert.ok(tokens >= 5, `the story ended after ${tokens} tokens`);
    assert.ok(error && error.type === 'error' && error.error.code === 'Cancelled');
    // One token may already be in flight when the abort lands.
    assert.ok(tokens <= 6, `${tokens} tokens after abort at 5`);
    await assert.rejects(
      engine.generate({ model: MODEL, prompt: 'x', maxTokens: 5 }, { signal: AbortSignal.abort() }),
      (e: unknown) => e instanceof EngineClientError && e.code === 'Cancelled',
    );
    // An abort that lands while the request is being submitted still cancels it.
    const late = new AbortController();
    const pending = engine.generate({ ...story, maxTokens: 200, ignoreEos: true }, { signal: late.signal });
    late.abort();
    await assert.rejects(pending, (e: unknown) => e instanceof EngineClientError && e.code === 'Cancelled');
    // AbortSignal.timeout() is a timeout, not a cancellation.
    await assert.rejects(
      engine.generate({ ...story, maxTokens: 400, ignoreEos: true }, { signal: AbortSignal.timeout(50) }),
      (e: unknown) => e instanceof EngineClientError && e.code === 'Timeout',
    );
    // The worker updates its counters just after it drops the sequence.
    for (let i = 0; i < 100 && (await engine.healthCheck()).activeRequests > 0; i++) await new Promise((r) => setTimeout(r, 10));
    assert.equal((await engine.healthCheck()).activeRequests, 0);
  });

  test('breaking out of the loop frees the request', async () => {
    for await (const c of engine.createGenerator({ model: MODEL, prompt: 'Once upon a time', maxTokens: 300 })) {
      if (c.type === 'token') break;
    }
    for (let i = 0; i < 50 && (await engine.healthCheck()).activeRequests > 0; i++) await new Promise((r) => setTimeout(r, 20));
    assert.equal((await engine.healthCheck()).activeRequests, 0);
  });

  test('timeoutMs ends a long generation with Timeout', async () => {
    await assert.rejects(
      engine.generate({ model: MODEL, prompt: 'Write a very long essay about rivers.', maxTokens: 2000, ignoreEos: true }, { timeoutMs: 150 }),
      (e: unknown) => e instanceof EngineClientError && e.code === 'Timeout',
    );
  });

  test('concurrent streams all make progress and match their solo output', async () => {
    const prompts = ['The sun is', 'My favourite food is', 'In the year 2050,', 'The cat sat on', 'Rust is a language that'];
    const solo = [];
    for (const p of prompts) solo.push(await engine.generate({ model: MODEL, prompt: p, maxTokens: 16 }));
    // Record the order in which streams receive tokens: interleaved, not one after another.
    const order: number[] = [];
    const results = await Promise.all(
      prompts.map(async (p, i) => {
        let text = '';
        for await (const c of engine.createGenerator({ model: MODEL, prompt: p, maxTokens: 16 })) {
          if (c.type === 'token') {
            text += c.token;
            order.push(i);
          }
        }
        return text;
      }),
    );
    assert.deepEqual(results, solo);
    const firstDone = order.lastIndexOf(order[0]);
    assert.ok(new Set(order.slice(0, firstDone)).size > 1, 'streams should interleave');
  });

  test('onToken callback streams beside the promise', async () => {
    const seen: string[] = [];
    const text = await engine.generate({ model: MODEL, prompt: 'Colors of the rainbow:', maxTokens: 10 }, { onToken: (c) => seen.push(c.token) });
    assert.equal(seen.length, 10);
    assert.equal(seen.join(''), text);
  });

  test('info, health, runtime and cache stats describe the engine', async () => {
    assert.equal(engine.listModels().length, 1);
    assert.equal(engine.getModelInfo(MODEL)?.id, MODEL);
    assert.equal(engine.getModelInfo('nope'), undefined);
    const health = await engine.healthCheck();
    assert.equal(health.status, 'healthy');
    assert.equal(health.modelsLoaded, 1);
    const rt = await engine.getRuntimeInfo();
    assert.equal(rt.backend, 'cpu');
    assert.ok(['amx', 'avx512-vnni', 'avx2', 'scalar'].includes(rt.isa));
    // AMX tiles for prompts where the cpu and the kernel grant them; elsewhere the reason why not.
    if (rt.isa === 'amx') assert.equal(rt.amx, undefined);
    else assert.match(rt.amx ?? '', /amx/);
    // Setup fetched libmlx (mlx-cpu): the addon loads it at run time.
    assert.equal(rt.mlx.available, true, rt.mlx.reason);
    assert.match(rt.mlx.version ?? '', /^0\.\d+\.\d+/);
    assert.equal(typeof rt.mlx.gpu, 'boolean');
    const cache = await engine.getCacheStats();
    assert.equal(cache.models[0].id, MODEL);
    assert.ok(cache.totalWeightBytes > 50e6);
    // A decode step reads every matrix (the tied embedding as the output) and one embedding row.
    const info = engine.getModelInfo(MODEL)!;
    assert.ok(info.decodeWeightBytes > 0.9 * info.weightBytes && info.decodeWeightBytes < 1.01 * info.weightBytes, String(info.decodeWeightBytes));
    assert.equal(info.kvBytesPerPosition, 30 * 2 * 3 * 64 * 2);
    assert.ok(events.includes('model:loaded') && events.includes('generation:started') && events.includes('generation:completed'));
  });

  test('the read-bandwidth probe measures, and refuses sizes out of range', async () => {
    const native = require('../index.js') as typeof import('../index.js');
    assert.ok((await native.readBandwidth(64)) > 0.1);
    for (const bad of [0, 16385, -1, 1.5]) {
      await assert.rejects(native.readBandwidth(bad), (e: Error) => /InvalidParams|mib must|Expected|u32/.test(e.message), String(bad));
    }
    assert.equal((await engine.healthCheck()).status, 'healthy');
  });

  test('loading the same file twice returns the same model; unload removes it', async () => {
    const again = await engine.loadModel({ model: 'default' });
    assert.equal(again.id, MODEL);
    const second = await engine.loadModel({ model: again.path, modelId: 'second' });
    assert.equal(second.id, 'second');
    assert.equal(engine.listModels().length, 2);
    await engine.warmupModel('second');
    const before = engine.getMetrics();
    await engine.unloadModel('second');
    assert.equal(engine.listModels().length, 1);
    assert.ok(events.includes('model:unloaded'));
    // Counters keep what the unloaded model counted.
    const now = engine.getMetrics();
    assert.ok(now.completed >= before.completed && now.generatedTokens >= before.generatedTokens, JSON.stringify([before.completed, now.completed]));
    await assert.rejects(engine.generate({ model: 'second', prompt: 'hi' }), (e: unknown) => e instanceof EngineClientError && e.code === 'ModelNotLoaded');
  });

  test('unloading a model ends its running streams cleanly', async () => {
    await engine.loadModel({ model: engine.getModelInfo(MODEL)!.path, modelId: 'doomed' });
    const gen = engine.createGenerator({ model: 'doomed', prompt: 'Tell me everything about the sea.', maxTokens: 500 });
    const first = await gen.next();
    assert.equal((first.value as GeneratorChunk).type, 'token');
    await engine.unloadModel('doomed');
    let last: GeneratorChunk | undefined;
    for await (const c of gen) last = c;
    assert.ok(last?.type === 'error' && last.error.code === 'Cancelled');
  });
});

test('runtime config: batching.maxBatchSize queues, maxConcurrentStreams refuses, bad files are rejected', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'mlx-serving-cfg-'));
  const cfg = path.join(dir, 'runtime.yaml');
  writeFileSync(cfg, 'streaming:\n  maxConcurrentStreams: 2\nbatching:\n  maxBatchSize: 1\n');
  const engine = await createEngine({ configPath: cfg });
  try {
    await engine.loadModel('default');
    const long = { model: 'default', prompt: 'Tell a story.', maxTokens: 60, ignoreEos: true };
    const a = engine.generate(long);
    const b = engine.generate(long);
    let sawWaiting = false;
    for (let i = 0; i < 200 && !sawWaiting; i++) {
      const h = await engine.healthCheck();
      sawWaiting = h.activeRequests === 1 && h.waitingRequests === 1;
      await new Promise((r) => setTimeout(r, 5));
    }
    assert.ok(sawWaiting, 'the second request should wait for the first');
    await assert.rejects(engine.generate({ model: 'default', prompt: 'x' }), (e: unknown) => e instanceof EngineClientError && e.code === 'Overloaded');
    assert.equal((await a).length > 0 && (await b).length > 0, true);
  } finally {
    await engine.shutdown();
  }
  writeFileSync(cfg, 'batching:\n  maxBatchSize: 0\n');
  await assert.rejects(createEngine({ configPath: cfg }), (e: unknown) => e instanceof EngineClientError && e.code === 'InvalidParams' && /batching\.maxBatchSize: must be at least 1/.test(e.message));
  rmSync(dir, { recursive: true, force: true });
});

test('shutdown ends running streams and servers, and rejects later calls', async () => {
  const engine = await createEngine();
  await engine.loadModel('default');
  const server = await engine.startServer({ port: 0 });
  const gen = engine.createGenerator({ model: 'default', prompt: 'A long tale:', maxTokens: 500 });
  await gen.next();
  await engine.shutdown();
  let last: GeneratorChunk | undefined;
  for await (const c of gen) last = c;
  assert.ok(last?.type === 'error' && last.error.code === 'Cancelled');
  // The server is closed with the engine (else it would keep the process up).
  await assert.rejects(fetch(`${server.url}/health`));
  await server.close();
  await assert.rejects(engine.loadModel('default'), (e: unknown) => e instanceof EngineClientError);
  assert.equal((await engine.healthCheck()).status, 'unhealthy');
});
