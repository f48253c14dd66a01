/**
 * OpenAI clients unchanged against our server: the official `openai` SDKs
 * for Node and Python, LangChain's completion model, and the wire details they rely on (lists of
 * prompts, a role-only first chunk, error types, Retry-After, metadata and
 * peer-extension fields, `system_fingerprint`, `x-request-id`).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';

import OpenAI from 'openai';

import { createEngine, type Engine, type HttpServer } from '../lib/index';

describe('OpenAI clients, unchanged', () => {
  let engine: Engine;
  let server: HttpServer;
  let client: OpenAI;

  before(async () => {
    engine = await createEngine();
    await engine.loadModel('default');
    server = await engine.startServer({ port: 0, maxConcurrent: 8 });
    client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 });
  });

  after(async () => {
    await server.close(1000);
    await engine.shutdown();
  });

  const post = (path: string, body: unknown, headers: Record<string, string> = {}) =>
    fetch(`${server.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) });

  test('completions take a list of prompts: one choice per prompt times n, each as it would be alone', async () => {
    const prompts = ['The capital of France is', 'Two plus two equals'];
    const alone = await Promise.all(
      prompts.map(async (prompt) => (await client.completions.create({ model: 'default', prompt, max_tokens: 6, temperature: 0 })).choices[0].text),
    );
    const r = await client.completions.create({ model: 'default', prompt: prompts, n: 2, max_tokens: 6, temperature: 0 });
    assert.deepEqual(r.choices.map((c) => c.index), [0, 1, 2, 3]);
    assert.deepEqual(r.choices.map((c) => c.text), [alone[0], alone[0], alone[1], alone[1]]);
    // Each prompt counted once; every choice's tokens.
    const one = await client.completions.create({ model: 'default', prompt: prompts[0], max_tokens: 6, temperature: 0 });
    const two = await client.completions.create({ model: 'default', prompt: prompts[1], max_tokens: 6, temperature: 0 });
    assert.equal(r.usage?.prompt_tokens, one.usage!.prompt_tokens + two.usage!.prompt_tokens);
    assert.equal(r.usage?.completion_tokens, 2 * (one.usage!.completion_tokens + two.usage!.completion_tokens));
    // Lists of token lists, streamed: chunks carry their choice's index.
    const tokens = [[504, 3575], [42, 43, 44]];
    const stream = await client.completions.create({ model: 'default', prompt: tokens, max_tokens: 3, temperature: 0, stream: true });
    const seen = new Map<number, string>();
    for await (const c of stream) for (const ch of c.choices) seen.set(ch.index, (seen.get(ch.index) ?? '') + ch.text);
    assert.deepEqual([...seen.keys()].sort(), [0, 1]);
    const solo = await client.completions.create({ model: 'default', prompt: tokens[1], max_tokens: 3, temperature: 0 });
    assert.equal(seen.get(1), solo.choices[0].text);
    // Past the server's slots: refused whole, naming the prompt.
    await assert.rejects(
      client.completions.create({ model: 'default', prompt: Array(5).fill('x'), n: 2, max_tokens: 1 }),
      (e: unknown) => e instanceof OpenAI.BadRequestError && (e.error as { param?: string }).param === 'prompt',
    );
  });

  test('the official Python SDK: chat, streams, parse() with a Pydantic model, lists of prompts, extra_body, error classes', async () => {
    const script = path.join(__dirname, 'python', 'openai_client.py');
    const out = await new Promise<string>((resolve, reject) =>
      execFile('python3', [script, server.url], { timeout: 120_000 }, (err, stdout, stderr) => (err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout))),
    );
    assert.match(out, /^openai 3\.\d+\.\d+: ok$/m);
  });

  test("LangChain's completion model batches prompts in one request", async () => {
    const { OpenAI: LangChainOpenAI } = await import('@langchain/openai');
    const llm = new LangChainOpenAI({ model: 'default', apiKey: 'unused', temperature: 0, maxTokens: 5, configuration: { baseURL: `${server.url}/v1` } });
    const out = await llm.generate(['Hello, my name is', 'The weather today is']);
    assert.equal(out.generations.length, 2);
    for (const g of out.generations) assert.ok(g[0].text.length > 0, JSON.stringify(out));
    assert.deepEqual(await llm.batch(['Hello, my name is']), [out.generations[0][0].text]);
  });

  test('a chat stream opens with a role-only chunk, so the SDK helper counts each logprob once', async () => {
    const res = await post('/v1/chat/completions', { model: 'default', messages: [{ role: 'user', content: 'Hi!' }], max_tokens: 5, temperature: 0, stream: true, logprobs: true });
    const events = (await res.text()).split('\n\n').filter((e) => e.startsWith('data: {')).map((e) => JSON.parse(e.slice(6)));
    assert.deepEqual(events[0].choices[0].delta, { role: 'assistant', content: '' });
    assert.deepEqual(events[0].choices[0].logprobs, { content: [] });
    assert.ok(events.slice(1).every((e) => !('role' in e.choices[0].delta)));
    const stream = client.chat.completions.stream({ model: 'default', messages: [{ role: 'user', content: 'Hi!' }], max_tokens: 5, temperature: 0, logprobs: true, stream_options: { include_usage: true } });
    const done = await stream.finalChatCompletion();
    assert.equal(done.choices[0].logprobs?.content?.length, done.usage?.completion_tokens);
    assert.equal(done.choices[0].message.role, 'assistant');
  });

  test('errors carry the type OpenAI gives their status; a 429 says when to retry from the work ahead', async () => {
    await assert.rejects(
      client.chat.completions.create({ model: 'nope', messages: [{ role: 'user', content: 'x' }] }),
      (e: unknown) => e instanceof OpenAI.NotFoundError && (e.error as { type: string }).type === 'not_found_error',
    );
    await assert.rejects(
      client.chat.completions.create({ model: 'default', messages: [{ role: 'user', content: 'x' }], temperature: 2.5 }),
      (e: unknown) => e instanceof OpenAI.BadRequestError && (e.error as { type: string; param: string }).type === 'invalid_request_error' && (e.error as { param: string }).param === 'temperature',
    );
    const locked = await engine.startServer({ port: 0, apiKey: 'secret', maxConcurrent: 1 });
    try {
      const bad = new OpenAI({ baseURL: `${locked.url}/v1`, apiKey: 'wrong', maxRetries: 0 });
      await assert.rejects(bad.models.list(), (e: unknown) => e instanceof OpenAI.AuthenticationError && (e.error as { type: string }).type === 'authentication_error');
      // One slot, held by a long generation: the next request gets 429.
      const good = new OpenAI({ baseURL: `${locked.url}/v1`, apiKey: 'secret', maxRetries: 0 });
      const long = good.completions.create({ model: 'default', prompt: 'Once upon a time', max_tokens: 400, min_tokens: 400, temperature: 0 } as OpenAI.CompletionCreateParamsNonStreaming);
      await new Promise((r) => setTimeout(r, 300));
      const metrics = await (await fetch(`${locked.url}/metrics`)).text();
      const read = (name: string) => Number(new RegExp(`^vllm:e2e_request_latency_seconds_${name}\\{[^}]*\\} (\\S+)$`, 'm').exec(metrics)![1]);
      const expected = Math.min(60, Math.max(1, Math.ceil(read('sum') / read('count'))));
      const err = await good.completions.create({ model: 'default', prompt: 'x', max_tokens: 1 }).then(
        () => assert.fail('expected a 429'),
        (e: unknown) => e,
      );
      assert.ok(err instanceof OpenAI.RateLimitError, String(err));
      assert.equal((err.error as { type: string }).type, 'rate_limit_error');
      assert.equal(err.headers?.get('retry-after'), String(expected));
      assert.equal((await long).usage?.completion_tokens, 400);
    } finally {
      await locked.close(1000);
    }
  });

  test('metadata fields pass; peer extensions work; unknown stream_options keys are refused', async () => {
    const messages = [{ role: 'user', content: 'Name a color.' }];
    const body = { model: 'default', messages, max_tokens: 6, temperature: 0 };
    const plain = await (await post('/v1/chat/completions', body)).json();
    const tagged = await post('/v1/chat/completions', { ...body, prompt_cache_key: 'k1', safety_identifier: 'user-1', user: 'u', metadata: { a: 'b' }, store: false, service_tier: 'auto', cache_prompt: false });
    assert.equal(tagged.status, 200);
    assert.equal((await tagged.json()).choices[0].message.content, plain.choices[0].message.content);
    // vLLM's return_token_ids, the way llama-benchy sends it on every request.
    const ids = await (await post('/v1/chat/completions', { ...body, return_token_ids: true })).json();
    assert.equal(ids.prompt_token_ids.length, ids.usage.prompt_tokens);
    assert.equal(ids.choices[0].token_ids.length, ids.usage.completion_tokens);
    const streamed = await post('/v1/chat/completions', { ...body, return_token_ids: true, stream: true, stream_options: { include_usage: true, continuous_usage_stats: true } });
    const chunks = (await streamed.text()).split('\n\n').filter((e) => e.startsWith('data: {')).map((e) => JSON.parse(e.slice(6)));
    assert.deepEqual(chunks[0].prompt_token_ids, ids.prompt_token_ids);
    assert.deepEqual(chunks.flatMap((c) => c.choices.flatMap((ch: { token_ids?: number[] }) => ch.token_ids ?? [])), ids.choices[0].token_ids);
    const usages = chunks.filter((c) => c.choices.length > 0).map((c) => c.usage.completion_tokens);
    assert.deepEqual(usages, [...usages].sort((a, b) => a - b), 'usage so far only grows');
    assert.equal(usages.at(-1), ids.usage.completion_tokens);
    // min_tokens holds off the end of a reply that would stop sooner.
    const short = await (await post('/v1/chat/completions', { ...body, messages: [{ role: 'user', content: 'Reply with one word: yes.' }], max_tokens: 40 })).json();
    assert.equal(short.choices[0].finish_reason, 'stop');
    const held = await (await post('/v1/chat/completions', { ...body, messages: [{ role: 'user', content: 'Reply with one word: yes.' }], max_tokens: 40, min_tokens: short.usage.completion_tokens + 5 })).json();
    assert.ok(held.usage.completion_tokens >= short.usage.completion_tokens + 5, JSON.stringify(held.usage));
    const refused = await post('/v1/chat/completions', { ...body, stream: true, stream_options: { include_usage: true, typo_usage: true } });
    assert.equal(refused.status, 400);
    assert.match((await refused.json()).error.message, /typo_usage/);
  });

  test('the developer role is the system role; max_tokens follows the context; fingerprint and request id', async () => {
    const ask = (role: string) =>
      post('/v1/chat/completions', { model: 'default', messages: [{ role, content: 'Be brief.' }, { role: 'user', content: 'Hi' }], max_tokens: 1, return_token_ids: true }).then((r) => r.json());
    const [dev, sys] = await Promise.all([ask('developer'), ask('system')]);
    assert.deepEqual(dev.prompt_token_ids, sys.prompt_token_ids);
    // Past the old 2048 cap, within SmolLM2's 8192-token context.
    const long = await client.chat.completions.create({ model: 'default', messages: [{ role: 'user', content: 'Reply with one word: yes.' }], max_tokens: 3000, temperature: 0 });
    assert.equal(long.choices[0].finish_reason, 'stop');
    await assert.rejects(
      client.chat.completions.create({ model: 'default', messages: [{ role: 'user', content: 'x' }], max_tokens: 9000 }),
      (e: unknown) => e instanceof OpenAI.BadRequestError && /do not fit/.test(e.message),
    );
    assert.match(long.system_fingerprint ?? '', /^fp_[0-9a-f]{12}$/);
    const again = await client.chat.completions.create({ model: 'default', messages: [{ role: 'user', content: 'x' }], max_tokens: 1 });
    assert.equal(again.system_fingerprint, long.system_fingerprint);
    const echoed = await post('/v1/completions', { model: 'default', prompt: 'a', max_tokens: 1 }, { 'x-request-id': 'trace-42' });
    assert.equal(echoed.headers.get('x-request-id'), 'trace-42');
    const ours = await fetch(`${server.url}/v1/models`);
    assert.match(ours.headers.get('x-request-id') ?? '', /^req-[0-9a-f-]+$/);
    assert.notEqual((await fetch(`${server.url}/health`)).headers.get('x-request-id'), ours.headers.get('x-request-id'));
  });
});
