/**
 * The OpenAI-compatible HTTP server over real HTTP on the default model:
 * endpoints, SSE, errors, auth, overload, disconnects, metrics, the CLI and
 * the dashboard in headless Chromium.
 */
import assert from 'node:assert/strict';
import * as net from 'node:net';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { createEngine, type Engine, type HttpServer } from '../lib/index';

const ROOT = path.join(__dirname, '..');

async function post(url: string, body: unknown, headers: Record<string, string> = {}): Promise<Response> {
  return fetch(url, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
}

/** Reads an SSE response into its `data:` payloads. */
async function sse(res: Response): Promise<string[]> {
  const text = await res.text();
  return text
    .split('\n\n')
    .map((e) => e.trim())
    .filter((e) => e.startsWith('data: '))
    .map((e) => e.slice('data: '.length));
}

async function waitFor(cond: () => Promise<boolean>, ms = 3000): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  assert.fail('condition not reached in time');
}

describe('HTTP server', () => {
  let engine: Engine;
  let server: HttpServer;
  let base: string;

  before(async () => {
    engine = await createEngine();
    await engine.loadModel('default');
    server = await engine.startServer({ port: 0, maxConcurrent: 2, bodyLimitBytes: 64 * 1024 });
    base = server.url;
    assert.match(base, /^http:\/\/127\.0\.0\.1:\d+$/);
  });

  after(async () => {
    await server.close(1000);
    await engine.shutdown();
  });

  test('GET /health and /v1/models', async () => {
    const health = await fetch(`${base}/health`);
    assert.equal(health.status, 200);
    assert.equal((await health.json()).status, 'ok');
    const models = await (await fetch(`${base}/v1/models`)).json();
    assert.equal(models.object, 'list');
    assert.deepEqual(models.data.map((m: { id: string }) => m.id), ['default']);
    const one = await (await fetch(`${base}/v1/models/default`)).json();
    assert.equal(one.id, 'default');
    assert.equal(one.object, 'model');
    const missing = await fetch(`${base}/v1/models/nope`);
    assert.equal(missing.status, 404);
    assert.equal((await missing.json()).error.code, 'ModelNotLoaded');
  });

  test('chat completion, non-streaming, matches the in-process API', async () => {
    const messages = [{ role: 'user', content: 'Explain in three sentences why the sky is blue.' }];
    const res = await post(`${base}/v1/chat/completions`, { model: 'default', messages, max_tokens: 20, temperature: 0 });
    assert.equal(res.status, 200);
    const body = await res.json();
    assert.equal(body.object, 'chat.completion');
    assert.equal(body.choices[0].message.role, 'assistant');
    assert.equal(body.choices[0].finish_reason, 'length');
    assert.equal(body.usage.completion_tokens, 20);
    assert.equal(body.usage.total_tokens, body.usage.prompt_tokens + 20);
    assert.equal(body.choices[0].message.content, await engine.generate({ model: 'default', messages, maxTokens: 20 }));
  });

  test('chat completion streams SSE chunks, usage, then [DONE]', async () => {
    const res = await post(`${base}/v1/chat/completions`, {
      model: 'default',
      messages: [{ role: 'user', content: 'Say hello.' }],
      max_tokens: 8,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
      logprobs: true,
      top_logprobs: 2,
    });
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /text\/event-stream/);
    const events = await sse(res);
    assert.equal(events.at(-1), '[DONE]');
    const chunks = events.slice(0, -1).map((e) => JSON.parse(e));
    assert.equal(chunks[0].choices[0].delta.role, 'assistant');
    const usage = chunks.at(-1);
    assert.deepEqual(usage.choices, []);
    assert.equal(usage.usage.completion_tokens, 8);
    const finish = chunks.at(-2);
    assert.equal(finish.choices[0].finish_reason, 'length');
    const withText = chunks.filter((c) => c.choices[0]?.delta?.content);
    assert.ok(withText.length > 0);
    for (const c of withText) {
      const lp = c.choices[0].logprobs.content[0];
      assert.ok(lp.logprob <= 0 && lp.top_logprobs.length === 2);
      assert.ok(lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob);
    }
  });

  test('legacy completions with stop and logprobs', async () => {
    const full = await (await post(`${base}/v1/completions`, { model: 'default', prompt: 'One, two, three, four,', max_tokens: 10, temperature: 0 })).json();
    const text: string = full.choices[0].text;
    assert.equal(full.object, 'text_completion');
    assert.ok(text.length > 0);
    const stopAt = text.trim().split(/\s+/)[1];
    const stopped = await (await post(`${base}/v1/completions`, { model: 'default', prompt: 'One, two, three, four,', max_tokens: 10, temperature: 0, stop: [stopAt] })).json();
    assert.equal(stopped.choices[0].finish_reason, 'stop');
    assert.ok(!stopped.choices[0].text.includes(stopAt));
    const lp = await (await post(`${base}/v1/completions`, { model: 'default', prompt: 'Hi', max_tokens: 3, logprobs: 1, temperature: 0 })).json();
    assert.equal(lp.choices[0].logprobs.tokens.length, 3);
    assert.equal(lp.choices[0].logprobs.token_logprobs.length, 3);
  });

  test('n choices: each its own sequence, seeded apart, streamed with their index', async () => {
    const ask = { model: 'default', messages: [{ role: 'user', content: 'Name a colour.' }], max_tokens: 8, temperature: 1, seed: 7, n: 2 };
    const first = await (await post(`${base}/v1/chat/completions`, ask)).json();
    assert.deepEqual(first.choices.map((c: { index: number }) => c.index), [0, 1]);
    const texts = first.choices.map((c: { message: { content: string } }) => c.message.content);
    // Seeds 7 and 8: reproducible, and the first is what n = 1 with seed 7 gives.
    const again = await (await post(`${base}/v1/chat/completions`, ask)).json();
    assert.deepEqual(again.choices.map((c: { message: { content: string } }) => c.message.content), texts);
    const one = await (await post(`${base}/v1/chat/completions`, { ...ask, n: 1 })).json();
    assert.equal(one.choices[0].message.content, texts[0]);
    assert.equal(first.usage.prompt_tokens, one.usage.prompt_tokens);
    // Completion tokens add up over the choices (choice 0's are n = 1's).
    assert.ok(first.usage.completion_tokens > one.usage.completion_tokens && first.usage.completion_tokens <= 16, JSON.stringify(first.usage));
    // Streaming: both indexes, a finish per choice, usage and [DONE] once.
    const res = await post(`${base}/v1/completions`, { model: 'default', prompt: 'Once upon a time', max_tokens: 6, n: 2, stream: true, stream_options: { include_usage: true }, temperature: 0, ignore_eos: true });
    const events = await sse(res);
    assert.equal(events.at(-1), '[DONE]');
    const chunks = events.slice(0, -1).map((e) => JSON.parse(e));
    const byChoice = [0, 1].map((i) => chunks.filter((c) => c.choices[0]?.index === i));
    for (const cs of byChoice) assert.equal(cs.filter((c) => c.choices[0].finish_reason === 'length').length, 1);
    // Greedy: both choices say the same.
    const said = byChoice.map((cs) => cs.map((c) => c.choices[0].text).join(''));
    assert.equal(said[0], said[1]);
    assert.equal(chunks.at(-1).usage.completion_tokens, 12);
    // Choice 1 starts once choice 0's prompt is cached, and reuses it.
    const hits = engine.getMetrics().prefixCache.hits;
    const long = { model: 'default', prompt: [7, ...Array.from({ length: 300 }, (_, k) => 100 + (k % 97))], max_tokens: 1, n: 2 };
    assert.equal((await post(`${base}/v1/completions`, long)).status, 200);
    assert.ok(engine.getMetrics().prefixCache.hits - hits >= 256, `${engine.getMetrics().prefixCache.hits - hits} prompt tokens found cached`);
    // More choices than the server runs at once, or than allowed: 400.
    assert.equal((await post(`${base}/v1/completions`, { model: 'default', prompt: 'x', n: 3 })).status, 400);
    assert.equal((await post(`${base}/v1/completions`, { model: 'default', prompt: 'x', n: 17 })).status, 400);
  });

  test('logprobs carry each token\'s own bytes, also for pieces of a character', async () => {
    const emoji = { model: 'default', messages: [{ role: 'user', content: 'Reply with three emoji only: 😀😀😀' }], max_tokens: 6, temperature: 0 };
    const chat = await (await post(`${base}/v1/chat/completions`, { ...emoji, logprobs: true, top_logprobs: 3 })).json();
    const content: { token: string; bytes: number[]; top_logprobs: { token: string; bytes: number[] }[] }[] = chat.choices[0].logprobs.content;
    // The tokens' bytes rebuild the message, emoji included.
    assert.equal(Buffer.from(content.flatMap((c) => c.bytes)).toString('utf8'), chat.choices[0].message.content);
    assert.ok(content.some((c) => c.token.startsWith('bytes:')), JSON.stringify(content.map((c) => c.token)));
    for (const c of content) assert.equal(new Set(c.top_logprobs.map((t) => t.token)).size, 3, 'alternatives have distinct names');
    // Legacy completions: five alternatives per position, offsets into the text.
    const prompt = await engine.applyChatTemplate({ model: 'default', messages: emoji.messages });
    const legacy = (await (await post(`${base}/v1/completions`, { model: 'default', prompt, max_tokens: 6, temperature: 0, logprobs: 5 })).json()).choices[0];
    for (const top of legacy.logprobs.top_logprobs) assert.equal(Object.keys(top).length, 5, JSON.stringify(top));
    assert.equal(legacy.logprobs.text_offset.length, 6);
    // Offsets belong to the tokens, even where a stop sequence held text back.
    const list = { model: 'default', prompt: 'List:\n1. apple\n2.', max_tokens: 8, temperature: 0, logprobs: 0 };
    const plain = (await (await post(`${base}/v1/completions`, list)).json()).choices[0].logprobs.text_offset;
    const held = (await (await post(`${base}/v1/completions`, { ...list, stop: [' grape juice', '\n9.'] })).json()).choices[0].logprobs.text_offset;
    assert.deepEqual(held, plain.slice(0, held.length));
    assert.equal(legacy.logprobs.text_offset[0], 0);
    assert.ok(legacy.logprobs.text_offset.every((o: number, i: number, a: number[]) => i === 0 || o >= a[i - 1]));
  });

  test('bad input gets 400/404/413 with OpenAI-style errors', async () => {
    const cases: [unknown, number, string][] = [
      ['{not json', 400, 'InvalidParams'],
      [{ model: 'default' }, 400, 'InvalidParams'],
      [{ model: 'default', messages: [{ role: 'user', content: 'x' }], temperature: -1 }, 400, 'InvalidParams'],
      [{ model: 'default', messages: [{ role: 'user', content: 'x' }], max_tokens: 0 }, 400, 'InvalidParams'],
      [{ model: 'default', messages: [{ role: 'user', content: 'x' }], n: 3 }, 400, 'InvalidParams'],
      [{ model: 'default', messages: [] }, 400, 'InvalidParams'],
      [{ model: 'nope', messages: [{ role: 'user', content: 'x' }] }, 404, 'ModelNotLoaded'],
    ];
    for (const [body, status, code] of cases) {
      const res = await post(`${base}/v1/chat/completions`, body);
      assert.equal(res.status, status, JSON.stringify(body));
      const err = (await res.json()).error;
      assert.equal(err.code, code);
      assert.ok(err.message.length > 0);
    }
    const big = await post(`${base}/v1/completions`, { model: 'default', prompt: 'x'.repeat(100 * 1024) });
    assert.equal(big.status, 413);
    assert.equal((await big.json()).error.code, 'InvalidParams');
    // Legacy completions take no tools (chat does: structured.test.ts).
    const tools = await post(`${base}/v1/completions`, { model: 'default', prompt: 'x', tools: [{ type: 'function', function: { name: 'f' } }] });
    assert.equal(tools.status, 400);
    const toolsError = (await tools.json()).error;
    assert.match(toolsError.message, /tools is not supported/);
    assert.equal(toolsError.param, 'tools');
    const wrongMethod = await fetch(`${base}/v1/chat/completions`);
    assert.equal(wrongMethod.status, 405);
    assert.equal((await wrongMethod.json()).error.code, 'InvalidParams');
    const badPriority = await post(`${base}/v1/completions`, { model: 'default', prompt: 'x', max_tokens: 2, priority: 'highest' });
    assert.equal(badPriority.status, 400);
    assert.match((await badPriority.json()).error.message, /priority/);
    // Numbers the engine's request rules refuse come back naming OpenAI's field.
    for (const [body, param, mention] of [
      [{ model: 'default', prompt: [1, -1] }, 'prompt', 'prompt[1]'],
      [{ model: 'default', prompt: [1, 2.5] }, 'prompt', 'prompt[1]'],
      [{ model: 'default', prompt: 'x', max_tokens: 2.5 }, 'max_tokens', 'max_tokens must be a positive integer'],
    ] as const) {
      const res = await post(`${base}/v1/completions`, body);
      const err = (await res.json()).error;
      assert.equal(res.status, 400, JSON.stringify(body));
      assert.deepEqual([err.code, err.param], ['InvalidParams', param], JSON.stringify(err));
      assert.ok(err.message.includes(mention), err.message);
    }
    const after = await post(`${base}/v1/completions`, { model: 'default', prompt: [1, 2, 3], max_tokens: 2 });
    assert.equal(after.status, 200, 'the server still serves after refusing them');
    assert.equal((await fetch(`${base}/v2/nothing`)).status, 404);
  });

  test('a connection that never finishes its headers is closed (header read timeout)', async () => {
    const url = new URL(base);
    const t0 = Date.now();
    const closedAfter = await new Promise<number>((resolve, reject) => {
      const sock = net.connect(Number(url.port), url.hostname, () => sock.write('GET /health HTTP/1.1\r\nHost: x\r\n'));
      sock.on('error', () => {});
      sock.on('close', () => resolve(Date.now() - t0));
      setTimeout(() => reject(new Error('still open after 30 s')), 30_000).unref();
    });
    assert.ok(closedAfter >= 9_000 && closedAfter < 20_000, `closed after ${closedAfter} ms`);
    assert.equal((await fetch(`${base}/health`)).status, 200);
  });

  test('past maxConcurrent a request gets 429 with Retry-After, and the admitted ones complete', async () => {
    const long = { model: 'default', prompt: 'Write a long story.', max_tokens: 400, ignore_eos: true, stream: true };
    const c1 = new AbortController();
    const c2 = new AbortController();
    const a = await fetch(`${base}/v1/completions`, { method: 'POST', body: JSON.stringify(long), signal: c1.signal, headers: { 'Content-Type': 'application/json' } });
    const b = await fetch(`${base}/v1/completions`, { method: 'POST', body: JSON.stringify(long), signal: c2.signal, headers: { 'Content-Type': 'application/json' } });
    assert.equal(a.status, 200);
    assert.equal(b.status, 200);
    const rejected = await post(`${base}/v1/completions`, { model: 'default', prompt: 'x', max_tokens: 2 });
    assert.equal(rejected.status, 429);
    assert.equal(rejected.headers.get('retry-after'), '1');
    assert.equal((await rejected.json()).error.code, 'Overloaded');
    // Client disconnects cancel their generations and free the slots.
    c1.abort();
    c2.abort();
    await waitFor(async () => (await engine.healthCheck()).activeRequests === 0);
    const ok = await post(`${base}/v1/completions`, { model: 'default', prompt: 'x', max_tokens: 2 });
    assert.equal(ok.status, 200);
  });

  test('/metrics speaks Prometheus with vLLM names', async () => {
    const text = await (await fetch(`${base}/metrics`)).text();
    // The clients that disconnected in the test above count as aborts.
    assert.match(text, /vllm:request_success_total\{model_name="default",replica="[^"]+",finished_reason="abort"\} [1-9]/);
    for (const name of [
      'vllm:num_requests_running',
      'vllm:generation_tokens_total',
      'vllm:time_to_first_token_seconds_bucket',
      'vllm:e2e_request_latency_seconds_count',
      'mlx_serving_kv_cache_bytes',
    ]) {
      assert.ok(text.includes(name), name);
    }
    assert.match(text, /^mlx_serving_requests_rejected_total\{model_name="default",replica="[^"]+"\} 1$/m);
    const data = await (await fetch(`${base}/dashboard/data`)).json();
    assert.ok(data.ttft_p95_ms > 0);
    assert.equal(data.models, 1);
  });

  test('the dashboard renders in headless Chromium', { skip: !existsSync('/usr/bin/chromium') && 'Debian chromium is not installed' }, async () => {
    const { chromium } = await import('playwright-core');
    const browser = await chromium.launch({
      executablePath: '/usr/bin/chromium',
      args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--no-first-run'],
    });
    try {
      const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
      const errors: string[] = [];
      page.on('pageerror', (e) => errors.push(String(e)));
      await page.goto(base + '/');
      await page.waitForFunction(() => document.getElementById('v-tokens_per_s')?.textContent !== '–');
      await page.waitForTimeout(2500); // a few polls, so the series have lines
      assert.match((await page.textContent('#status')) ?? '', /1 model\(s\) loaded/);
      assert.equal(await page.locator('canvas').count(), 7);
      const out = path.join(ROOT, 'benchmarks', 'results', 'dashboard.png');
      mkdirSync(path.dirname(out), { recursive: true });
      await page.screenshot({ path: out });
      assert.deepEqual(errors, []);
    } finally {
      await browser.close();
    }
  });
});

test('API key: /v1 needs the bearer token, /health does not; CORS only for the origins given', async () => {
  const engine = await createEngine();
  await engine.loadModel('default');
  const server = await engine.startServer({ port: 0, apiKey: 'sekret', corsOrigins: ['http://app.example'] });
  try {
    // CORS: a preflight from an allowed origin is answered before the key check.
    const pre = await fetch(`${server.url}/v1/chat/completions`, {
      method: 'OPTIONS',
      headers: { Origin: 'http://app.example', 'Access-Control-Request-Method': 'POST', 'Access-Control-Request-Headers': 'authorization, content-type' },
    });
    assert.equal(pre.status, 204);
    assert.equal(pre.headers.get('access-control-allow-origin'), 'http://app.example');
    assert.match(pre.headers.get('access-control-allow-headers') ?? '', /authorization/);
    const sdk = await fetch(`${server.url}/v1/chat/completions`, {
      method: 'OPTIONS',
      headers: { Origin: 'http://app.example', 'Access-Control-Request-Method': 'POST', 'Access-Control-Request-Headers': 'authorization, x-stainless-os' },
    });
    assert.match(sdk.headers.get('access-control-allow-headers') ?? '', /x-stainless-os/);
    const read = await fetch(`${server.url}/v1/models`, { headers: { Origin: 'http://app.example', Authorization: 'Bearer sekret' } });
    assert.equal(read.headers.get('access-control-allow-origin'), 'http://app.example');
    const other = await fetch(`${server.url}/v1/models`, { headers: { Origin: 'http://evil.example', Authorization: 'Bearer sekret' } });
    assert.equal(other.headers.get('access-control-allow-origin'), null);
    assert.equal((await fetch(`${server.url}/v1/models`)).status, 401);
    assert.equal((await fetch(`${server.url}/v1/models`, { headers: { Authorization: 'Bearer wrong' } })).status, 401);
    assert.equal((await fetch(`${server.url}/v1/models`, { headers: { Authorization: 'Bearer sekret' } })).status, 200);
    assert.equal((await fetch(`${server.url}/v1/models`, { headers: { Authorization: 'bearer sekret' } })).status, 200);
    assert.equal((await fetch(`${server.url}/health`)).status, 200);
  } finally {
    await server.close(0);
    await engine.shutdown();
  }
});

test('/health is 503 while no model is loaded', async () => {
  const engine = await createEngine();
  const server = await engine.startServer({ port: 0 });
  try {
    const res = await fetch(`${server.url}/health`);
    assert.equal(res.status, 503);
    assert.equal((await res.json()).status, 'loading');
  } finally {
    await server.close(0);
    await engine.shutdown();
  }
});

test('CLI: --help, serve on a free port, SIGTERM exits cleanly', async () => {
  const cli = path.join(ROOT, 'bin', 'mlx-serving.js');
  const help = spawn(process.execPath, [cli, '--help']);
  let helpText = '';
  help.stdout.on('data', (d) => (helpText += d));
  assert.equal(await new Promise((r) => help.on('exit', r)), 0);
  assert.match(helpText, /serve \[options\]/);

  const bad = spawn(process.execPath, [cli, 'serve', '--port', 'abc']);
  assert.equal(await new Promise((r) => bad.on('exit', r)), 2);

  // A config with a misspelt key is refused with the key's path.
  const dir = mkdtempSync(path.join(tmpdir(), 'mlx-serving-cfg-'));
  const cfg = path.join(dir, 'runtime.yaml');
  writeFileSync(cfg, 'streaming:\n  maxConcurentStreams: 3\n');
  const badCfg = spawn(process.execPath, [cli, 'serve', '--port', '0', '--config', cfg]);
  let errText = '';
  badCfg.stderr.on('data', (d) => (errText += d));
  assert.equal(await new Promise((r) => badCfg.on('exit', r)), 2);
  assert.match(errText, /streaming: unknown field `maxConcurentStreams`/);
  rmSync(dir, { recursive: true, force: true });

  const proc = spawn(process.execPath, [cli, 'serve', '--port', '0'], { env: { ...process.env, MAX_CONCURRENT: '4' } });
  let out = '';
  proc.stdout.on('data', (d) => (out += d));
  const exited = new Promise<number | null>((r) => proc.on('exit', (code) => r(code)));
  try {
    await waitFor(async () => /serving 'default' on the cpu backend at (http:\S+)/.test(out), 30_000);
    const url = /serving 'default' on the cpu backend at (http:\S+)/.exec(out)![1];
    assert.match(out, /curl .*\/v1\/chat\/completions/);
    const res = await post(`${url}/v1/chat/completions`, { model: 'default', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 3 });
    assert.equal(res.status, 200);
  } finally {
    proc.kill('SIGTERM');
  }
  assert.equal(await exited, 0);
});
