/**
 * Overload and slow clients over real HTTP on the default model: far more
 * simultaneous requests than capacity get 429 and nothing else, the admitted
 * ones complete, health stays green, and the engine ends idle with no KV
 * blocks in use; a client that never reads its stream holds back only itself.
 * And a minute of the soak's mixed load must leave memory flat.
 */
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { copyFileSync, mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { createEngine, defaultModelPath, EngineClientError, type Engine, type HttpServer } from '../lib/index';

describe('overload and slow clients', () => {
  let engine: Engine;
  let server: HttpServer;

  before(async () => {
    engine = await createEngine();
    await engine.loadModel('default');
    server = await engine.startServer({ port: 0, maxConcurrent: 8 });
  });

  after(async () => {
    await server.close(1000);
    await engine.shutdown();
  });

  async function idle() {
    let m = engine.getMetrics();
    for (let i = 0; i < 400 && (m.running || m.waiting || m.kvCache.blocksUsed > m.kvCache.blocksPinned); i++) {
      await new Promise((r) => setTimeout(r, 10));
      m = engine.getMetrics();
    }
    return m;
  }

  test('200 simultaneous requests against 8 slots: 200 or 429 only, admitted ones complete, health stays green', async () => {
    const body = JSON.stringify({ model: 'default', prompt: 'Count to ten:', max_tokens: 8, ignore_eos: true });
    let healthBad = 0;
    let polling = true;
    const health = (async () => {
      while (polling) {
        if ((await fetch(`${server.url}/health`)).status !== 200) healthBad++;
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    const results = await Promise.all(
      Array.from({ length: 200 }, async () => {
        const t0 = performance.now();
        const res = await fetch(`${server.url}/v1/completions`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body });
        const json = await res.json();
        return { status: res.status, ms: performance.now() - t0, json };
      }),
    );
    polling = false;
    await health;
    const statuses = new Set(results.map((r) => r.status));
    assert.deepEqual([...statuses].filter((s) => s !== 200 && s !== 429), []);
    const ok = results.filter((r) => r.status === 200);
    const refused = results.filter((r) => r.status === 429);
    assert.ok(ok.length >= 8 && refused.length > 0, `${ok.length} admitted, ${refused.length} refused`);
    for (const r of ok) assert.equal(r.json.usage.completion_tokens, 8);
    for (const r of refused) assert.equal(r.json.error.code, 'Overloaded');
    // Refusals do not wait for generation: the slowest refusal beats the median admitted request.
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    assert.ok(Math.max(...refused.map((r) => r.ms)) < median(ok.map((r) => r.ms)) + 1000);
    assert.equal(healthBad, 0);
    const m = await idle();
    assert.equal(m.running + m.waiting, 0);
    assert.equal(m.kvCache.blocksUsed, m.kvCache.blocksPinned);
  });

  test('a client that never reads its stream does not stall the others, and leaves nothing behind', async () => {
    const ctl = new AbortController();
    const stalled = await fetch(`${server.url}/v1/completions`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ model: 'default', prompt: 'Tell a long story:', max_tokens: 2000, ignore_eos: true, stream: true }),
      signal: ctl.signal,
    });
    assert.equal(stalled.status, 200);
    // Never read `stalled.body`. Others still get full answers.
    for (let i = 0; i < 3; i++) {
      const res = await fetch(`${server.url}/v1/completions`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ model: 'default', prompt: `Item ${i}:`, max_tokens: 16, ignore_eos: true }),
      });
      assert.equal((await res.json()).usage.completion_tokens, 16);
    }
    ctl.abort();
    const m = await idle();
    assert.equal(m.running + m.waiting, 0);
    assert.equal(m.kvCache.blocksUsed, m.kvCache.blocksPinned);
  });
});

test('engines ended by shutdown() or only dropped and garbage-collected free their models', async () => {
  const { code, stdout, stderr } = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
    execFile(
      process.execPath,
      ['--expose-gc', '--import', 'tsx', path.join(__dirname, '..', 'benchmarks', 'engine-lifecycle.ts'), '--rounds', '6'],
      { cwd: path.join(__dirname, '..'), timeout: 120_000 },
      (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
  assert.equal(code, 0, stdout + stderr);
  assert.match(stdout, /: FREED/);
});

test('soak, CI-sized: a minute of mixed load leaves memory flat and the engine idle', async () => {
  const { code, stdout, stderr } = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
    execFile(
      process.execPath,
      ['--import', 'tsx', path.join(__dirname, '..', 'benchmarks', 'soak.ts'), '--duration', '60', '--warm', '0.5', '--max-growth-mib', '48'],
      { cwd: path.join(__dirname, '..'), timeout: 180_000 },
      (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
  assert.equal(code, 0, stdout + stderr);
  assert.match(stdout, /: FLAT/);
  assert.match(stdout, /End state: idle, no KV blocks in use/);
});

describe('faults', () => {
  test('a model file truncated, then replaced with garbage, while loaded: the loaded model keeps serving; reloading it is a clear error', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'mlx-serving-fault-'));
    const file = path.join(dir, 'model.gguf');
    copyFileSync(defaultModelPath(), file);
    const engine = await createEngine();
    try {
      await engine.loadModel({ model: file, modelId: 'victim' });
      const params = { model: 'victim', prompt: 'The capital of France is', maxTokens: 12, temperature: 0 };
      const before = await engine.generate(params);
      truncateSync(file, 4096);
      assert.equal(await engine.generate(params), before);
      writeFileSync(file, Buffer.alloc(1 << 20, 0x5a));
      assert.equal(await engine.generate(params), before);
      await assert.rejects(
        engine.loadModel({ model: file, modelId: 'again' }),
        (e: unknown) => e instanceof EngineClientError && e.code === 'ModelLoadError' && e.message.includes(file),
      );
      truncateSync(file, 0);
      await assert.rejects(engine.loadModel({ model: file, modelId: 'again' }), { code: 'ModelLoadError' });
      assert.equal(await engine.generate(params), before);
    } finally {
      await engine.shutdown();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('the server killed mid-stream: the client sees the stream fail, and a restarted server serves again', async () => {
    const bin = path.join(__dirname, '..', 'bin', 'mlx-serving.js');
    const start = (port: number) =>
      new Promise<{ child: ChildProcess; url: string }>((resolve, reject) => {
        const child = spawn(process.execPath, [bin, 'serve', '--port', String(port)], { stdio: ['ignore', 'pipe', 'pipe'] });
        let out = '';
        let err = '';
        child.stdout!.on('data', (d) => {
          out += d;
          const m = /at (http:\/\/[^ ]+) /.exec(out);
          if (m) resolve({ child, url: m[1] });
        });
        child.stderr!.on('data', (d) => (err += d));
        child.on('exit', (code) => reject(new Error(`server exited with ${code}: ${err}`)));
      });
    const first = await start(0);
    const port = Number(new URL(first.url).port);
    let second: { child: ChildProcess; url: string } | undefined;
    try {
      const res = await fetch(`${first.url}/v1/completions`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ model: 'default', prompt: 'Tell a long story:', max_tokens: 2000, ignore_eos: true, stream: true }),
      });
      assert.equal(res.status, 200);
      const reader = res.body!.getReader();
      assert.ok((await reader.read()).value!.length > 0);
      first.child.kill('SIGKILL');
      await assert.rejects(
        (async () => {
          for (;;) if ((await reader.read()).done) throw new Error('the stream ended cleanly instead of failing');
        })(),
        (e: Error) => !/ended cleanly/.test(e.message),
      );
      second = await start(port);
      const again = await fetch(`${second.url}/v1/completions`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ model: 'default', prompt: 'Hello', max_tokens: 4, ignore_eos: true }),
      });
      assert.equal(again.status, 200);
      assert.equal((await again.json()).usage.completion_tokens, 4);
    } finally {
      first.child.kill('SIGKILL');
      second?.child.kill('SIGTERM');
    }
  });
});
