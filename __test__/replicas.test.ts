/**
 * A replica behind a load balancer: its id on every response and metric,
 * liveness apart from readiness, and a drain that keeps the listener open,
 * answers new work with 503 and lets the streams in flight finish.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { createEngine, type Engine } from '../lib/index';

describe('replicas', () => {
  let engine: Engine;

  before(async () => {
    engine = await createEngine();
    await engine.loadModel('default');
  });

  after(async () => {
    await engine.shutdown();
  });

  test('the replica id is on every response and every metric; the default is host:port', async () => {
    const named = await engine.startServer({ port: 0, replicaId: 'replica-a' });
    const anon = await engine.startServer({ port: 0 });
    try {
      assert.equal(named.replicaId, 'replica-a');
      for (const path of ['/health', '/v1/models', '/nope']) {
        assert.equal((await fetch(named.url + path)).headers.get('x-mlx-serving-replica'), 'replica-a', path);
      }
      const metrics = await (await fetch(`${named.url}/metrics`)).text();
      assert.match(metrics, /^vllm:num_requests_waiting\{model_name="default",replica="replica-a"\} 0$/m);
      assert.match(metrics, /^vllm:kv_cache_usage_perc\{model_name="default",replica="replica-a"\} [0-9.e-]+$/m);
      assert.ok(anon.replicaId.endsWith(`:${anon.port}`), anon.replicaId);
      assert.equal((await fetch(`${anon.url}/health`)).headers.get('x-mlx-serving-replica'), anon.replicaId);
      for (const bad of ['', 'a"b', 'x'.repeat(129), 'with space']) {
        await assert.rejects(engine.startServer({ port: 0, replicaId: bad }), /replicaId must be/, JSON.stringify(bad));
      }
    } finally {
      await named.close(0);
      await anon.close(0);
    }
  });

  test('a drain turns /health 503 while the listener stays open, refuses new work, and lets streams finish', async () => {
    const server = await engine.startServer({ port: 0, replicaId: 'draining-one' });
    assert.equal((await fetch(`${server.url}/live`)).status, 200);
    const body = { model: 'default', prompt: 'Once upon a time', max_tokens: 120, min_tokens: 120, temperature: 0, stream: true };
    const res = await fetch(`${server.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    const reader = res.body!.getReader();
    const first = await reader.read();
    assert.ok(!first.done);
    const closed = server.close(30_000);
    // Readiness turns at once; liveness and the listener stay.
    const health = await fetch(`${server.url}/health`);
    assert.equal(health.status, 503);
    assert.equal((await health.json()).status, 'draining');
    const live = await fetch(`${server.url}/live`);
    assert.deepEqual([live.status, await live.json()], [200, { status: 'alive', draining: true }]);
    const refused = await fetch(`${server.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'default', messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 }),
    });
    assert.equal(refused.status, 503);
    assert.equal(refused.headers.get('retry-after'), '1');
    assert.equal((await refused.json()).error.code, 'Draining');
    // The stream in flight runs to its end.
    let text = new TextDecoder().decode(first.value);
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      text += new TextDecoder().decode(value);
    }
    const usage = text.split('\n\n').filter((e) => e.startsWith('data: {')).map((e) => JSON.parse(e.slice(6)));
    assert.ok(text.trimEnd().endsWith('data: [DONE]'), text.slice(-200));
    assert.equal(usage.filter((c) => c.choices?.[0]?.finish_reason).at(-1).choices[0].finish_reason, 'length');
    await closed;
    await assert.rejects(fetch(`${server.url}/live`), 'the listener closed after the drain');
  });
});
