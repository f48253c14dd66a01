/**
 * What a hostile client or file could do to the process, on the real model
 * over real HTTP: prompts built to be expensive to refuse, clients that
 * leave mid-work, bodies that lie about their length, special files as
 * model or config paths, settings that would quietly weaken the server.
 * Each must cost a clear error for the one request at fault, and nothing
 * else.
 */
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { createEngine, EngineClientError, type Engine, type HttpServer } from '../lib/index';

const rssMiB = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))![1]) / 1024;
const threads = () => Number(/Threads:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))![1]);

/** Sends raw bytes and resolves with the status line of the reply and how long it took. */
function raw(url: string, bytes: string): Promise<{ status: string; ms: number }> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const s = net.connect(Number(port), hostname, () => s.write(bytes));
    let got = '';
    s.on('data', (d) => {
      got += d;
      if (got.includes('\r\n')) {
        resolve({ status: got.split('\r\n')[0], ms: performance.now() - t0 });
        s.destroy();
      }
    });
    s.on('error', reject);
    setTimeout(() => reject(new Error(`no reply within 5 s: ${JSON.stringify(got)}`)), 5000).unref();
  });
}

describe('hostile clients', () => {
  let engine: Engine;
  let server: HttpServer;

  before(async () => {
    engine = await createEngine();
    await engine.loadModel('default');
    server = await engine.startServer({ port: 0, maxConcurrent: 16 });
  });

  after(async () => {
    await server.close(1000);
    await engine.shutdown();
  });

  const post = (body: unknown, signal?: AbortSignal) =>
    fetch(`${server.url}/v1/completions`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body), signal });

  test('32 prompts of 1 MiB over the token limit at once: each a 400, memory and threads stay bounded', async () => {
    // ~174k tokens each, under maxPromptChars (1 MiB) and over maxPromptTokens (32,768).
    const prompt = 'hello world '.repeat(87_000);
    // Slots for all 32: what bounds the work is the engine, not the server's semaphore.
    const wide = await engine.startServer({ port: 0, maxConcurrent: 64 });
    const before = rssMiB();
    const t0 = performance.now();
    const replies = await Promise.all(
      Array.from({ length: 32 }, () =>
        fetch(`${wide.url}/v1/completions`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ model: 'default', prompt, max_tokens: 4 }) }),
      ),
    );
    const bodies = await Promise.all(replies.map((r) => r.json()));
    const grew = rssMiB() - before;
    for (const [i, r] of replies.entries()) {
      assert.equal(r.status, 400);
      assert.match(bodies[i].error.message, /prompt tokens: more than \d+ exceeds the limit of 32768 \(limits\.maxPromptTokens\)/);
    }
    // Before the fix: +2.6 GB and 17.8 s on 2 cores; after, +0.5 GB (the 32 bodies
    // parsed and waiting their turn, and this process is the client too) and 1.2 s.
    assert.ok(grew < 1200, `RSS grew by ${grew.toFixed(0)} MiB`);
    console.log(`32 over-limit 1 MiB prompts: ${(performance.now() - t0).toFixed(0)} ms, RSS +${grew.toFixed(0)} MiB`);
    await wide.close(1000);
  });

  test('40 clients that leave during tokenization: threads stay bounded, the slots come back', async () => {
    const prompt = 'hello world '.repeat(87_000);
    const t0 = threads();
    await Promise.all(
      Array.from({ length: 40 }, async () => {
        const ac = new AbortController();
        setTimeout(() => ac.abort(), 150);
        await post({ model: 'default', prompt, max_tokens: 4 }, ac.signal).then((r) => r.text()).catch(() => {});
      }),
    );
    const peak = threads();
    // A slot comes back only when its request's work has stopped, so at most
    // maxConcurrent (16) tokenizations were ever queued or running.
    assert.ok(peak - t0 <= 24, `threads ${t0} -> ${peak}`);
    // The slots come back once the abandoned work stops: all 16 at once.
    const t1 = performance.now();
    for (;;) {
      const replies = await Promise.all(Array.from({ length: 16 }, () => post({ model: 'default', prompt: 'Hi', max_tokens: 1 })));
      await Promise.all(replies.map((r) => r.text()));
      if (replies.every((r) => r.status === 200)) break;
      assert.ok(performance.now() - t1 < 30_000, 'the slots did not come back');
      await new Promise((r) => setTimeout(r, 200));
    }
  });

  test('16 clients that leave while their prompts wait to be tokenized free their slots without that work', async () => {
    // Each prompt is tokenized whole, then refused for the context; one
    // alone takes `one` ms. Sixteen queue for the two turns (one per core).
    const prompt = 'hello world '.repeat(40_000);
    const t0 = performance.now();
    assert.equal((await post({ model: 'default', prompt, max_tokens: 4 })).status, 400);
    const one = performance.now() - t0;
    const acs = Array.from({ length: 16 }, () => new AbortController());
    const left = acs.map((ac) => post({ model: 'default', prompt, max_tokens: 4 }, ac.signal).then((r) => r.text()).catch(() => {}));
    await new Promise((r) => setTimeout(r, 100));
    acs.forEach((ac) => ac.abort());
    await Promise.all(left);
    const t1 = performance.now();
    for (;;) {
      const replies = await Promise.all(Array.from({ length: 16 }, () => post({ model: 'default', prompt: 'Hi', max_tokens: 1 })));
      await Promise.all(replies.map((r) => r.text()));
      if (replies.every((r) => r.status === 200)) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    const back = performance.now() - t1;
    // Left to run, the 16 tokenizations would hold the slots for about 8 x `one`;
    // cancelled, only the two under way finish.
    console.log(`one prompt ${one.toFixed(0)} ms; 16 slots back ${back.toFixed(0)} ms after their clients left`);
    assert.ok(back < 4 * one, `slots back after ${back.toFixed(0)} ms; one prompt takes ${one.toFixed(0)} ms`);
  });

  test("a model's slow chat template renders off the event loop", async () => {
    // The tiny llama's MLX folder with a template that loops ~16M times
    // before it writes anything (within the fuel bound of 20M steps).
    const dir = mkdtempSync(path.join(os.tmpdir(), 'slow-template-'));
    cpSync(path.join(__dirname, '..', 'crates', 'engine', 'tests', 'fixtures', 'llama', 'mlx'), dir, { recursive: true });
    const cfgPath = path.join(dir, 'tokenizer_config.json');
    const cfg = JSON.parse(readFileSync(cfgPath, 'utf8'));
    cfg.chat_template = "{% for i in range(4000) %}{% for j in range(4000) %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}";
    writeFileSync(cfgPath, JSON.stringify(cfg));
    try {
      await engine.loadModel({ model: dir, modelId: 'slow-template' });
      let ticks = 0;
      const timer = setInterval(() => ticks++, 5);
      const t0 = performance.now();
      const out = await engine.applyChatTemplate({ model: 'slow-template', messages: [{ role: 'user', content: 'hi' }] }).catch((e) => e);
      const took = performance.now() - t0;
      clearInterval(timer);
      console.log(`slow template: ${took.toFixed(0)} ms, ${ticks} timer ticks meanwhile`, out instanceof Error ? out.message : out);
      assert.ok(took > 100, `the render took only ${took.toFixed(0)} ms`);
      // Rendered on the JavaScript thread, no timer would fire until it ended.
      assert.ok(ticks >= took / 5 / 4, `${ticks} ticks in ${took.toFixed(0)} ms`);
    } finally {
      await engine.unloadModel('slow-template').catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('16 requests aborted, then 16 more at once against 16 slots: no 429', async () => {
    const body = { model: 'default', prompt: 'Tell a long story:', max_tokens: 200, ignore_eos: true, stream: true };
    for (let round = 0; round < 3; round++) {
      const acs = Array.from({ length: 16 }, () => new AbortController());
      const streams = await Promise.all(acs.map((ac) => post(body, ac.signal)));
      for (const s of streams) assert.equal(s.status, 200);
      await Promise.all(streams.map((s) => s.body!.getReader().read()));
      acs.forEach((ac) => ac.abort());
      const next = await Promise.all(Array.from({ length: 16 }, () => post({ ...body, stream: false, max_tokens: 2 })));
      assert.deepEqual(next.map((r) => r.status), Array(16).fill(200));
      await Promise.all(next.map((r) => r.text()));
    }
  });

  test('a body that claims 5 GB is refused at its headers; a malformed chunked body is a 400', async () => {
    const claim = await raw(server.url, 'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000000000\r\n\r\n');
    assert.equal(claim.status, 'HTTP/1.1 413 Payload Too Large');
    assert.ok(claim.ms < 2000, `${claim.ms} ms`);
    const chunked = await raw(server.url, 'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n');
    assert.equal(chunked.status, 'HTTP/1.1 400 Bad Request');
  });

  test('an empty API key is refused, not a server without authentication', async () => {
    await assert.rejects(engine.startServer({ port: 0, apiKey: '' }), (e: EngineClientError) => e.code === 'InvalidParams' && /apiKey must not be empty/.test(e.message));
  });

  test('an abort while the prompt waits to be tokenized ends the generator at once', async () => {
    // Long prompts queue for the turns to tokenize (one per core); each is
    // tokenized whole (under twice the early-refusal size) and then refused
    // for the context.
    const long = 'hello world '.repeat(40_000);
    const t0 = performance.now();
    const busy = Array.from({ length: 8 }, () => engine.generate({ model: 'default', prompt: long, maxTokens: 4 }).catch((e: EngineClientError) => e.code));
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 5);
    const chunks = [];
    for await (const c of engine.createGenerator({ model: 'default', prompt: long, maxTokens: 4 }, { signal: ac.signal })) chunks.push(c);
    const aborted = performance.now() - t0;
    const codes = await Promise.all(busy);
    const all = performance.now() - t0;
    assert.deepEqual(chunks.map((c) => c.type), ['error']);
    assert.equal((chunks[0] as { error: { code: string } }).error.code, 'Cancelled');
    assert.deepEqual(new Set(codes), new Set(['InvalidParams']));
    // It did not wait for the eight ahead of it.
    assert.ok(aborted < all / 2, `aborted after ${aborted.toFixed(0)} ms, the others took ${all.toFixed(0)} ms`);
  });

  test('a NUL in a model id is InvalidParams, and the engine goes on', async () => {
    await assert.rejects(engine.loadModel({ model: 'default', modelId: 'a\0b' }), (e: EngineClientError) => e.code === 'InvalidParams');
    assert.equal((await post({ model: 'default', prompt: 'Hi', max_tokens: 2 })).status, 200);
  });
});

describe('special files and the command line', () => {
  let dir: string;
  before(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'mlx-hostile-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  test('a FIFO as the model or the config is refused at once, without blocking the event loop', async () => {
    const fifo = path.join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    const t0 = performance.now();
    await assert.rejects(createEngine({ configPath: fifo }), (e: EngineClientError) => /not a regular file/.test(e.message));
    const engine = await createEngine();
    try {
      await assert.rejects(engine.loadModel({ model: fifo }), (e: EngineClientError) => e.code === 'ModelLoadError' && /not a regular file/.test(e.message));
    } finally {
      await engine.shutdown();
    }
    assert.ok(performance.now() - t0 < 5000);
  });

  test('a port already in use: one line naming it, a non-zero exit', async () => {
    const blocker = net.createServer().listen(0, '127.0.0.1');
    await new Promise((r) => blocker.once('listening', r));
    const port = (blocker.address() as net.AddressInfo).port;
    try {
      const bin = path.join(__dirname, '..', 'bin', 'mlx-serving.js');
      const child = spawn(process.execPath, [bin, 'serve', '--port', String(port)], { stdio: ['ignore', 'pipe', 'pipe'] });
      let err = '';
      child.stderr!.on('data', (d) => (err += d));
      const code = await new Promise<number | null>((r) => child.on('exit', r));
      assert.notEqual(code, 0);
      const lines = err.trim().split('\n');
      assert.equal(lines.length, 1, err);
      assert.match(lines[0], new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port}: the port is already in use`));
    } finally {
      blocker.close();
    }
  });

  test('--api-key with an empty value exits with a clear message', async () => {
    const bin = path.join(__dirname, '..', 'bin', 'mlx-serving.js');
    const child = spawn(process.execPath, [bin, 'serve', '--port', '0', '--api-key', ''], { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    child.stderr!.on('data', (d) => (err += d));
    const code = await new Promise<number | null>((r) => child.on('exit', r));
    assert.notEqual(code, 0);
    assert.match(err, /apiKey must not be empty/);
  });
});
