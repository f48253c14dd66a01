/**
 * The Phase 5 control plane on the real default model: a canary whose
 * candidate fails rolls itself back while the baseline serves without
 * errors; a QoS policy sheds background requests while the queue is deep and
 * lets them in again once it drains; runtime.yaml reloads live and a garbage
 * file keeps the config in force.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { test } from 'node:test';

import { createEngine, EngineClientError, type ControlEvent, type GenerationStats } from '../lib/index';

async function run(engine: Awaited<ReturnType<typeof createEngine>>, model: string, requestId: string, priority?: 'background') {
  let stats: GenerationStats | undefined;
  for await (const c of engine.createGenerator({ model, prompt: 'Name a colour:', maxTokens: 4, temperature: 0 }, { requestId, priority })) {
    if (c.type === 'metadata') stats = c.stats;
    if (c.type === 'error') throw new EngineClientError(c.error.code, c.error.message);
  }
  return stats!;
}

test('a canary whose candidate fails (impossible timeout) rolls back by itself; the baseline serves without errors', async () => {
  const engine = await createEngine();
  try {
    await engine.loadModel({ model: 'default' });
    // The candidate: the same weights under an engine setting that cannot succeed.
    await engine.loadModel({ model: 'default', modelId: 'candidate', requestTimeoutMs: 1 });
    const transitions: ControlEvent[] = [];
    engine.on('canary:transition', (e: ControlEvent) => transitions.push(e));
    const started = engine.startCanary({
      name: 'default',
      baseline: 'default',
      candidate: 'candidate',
      stages: [25, 50, 100],
      triggers: { minSamples: 5 },
    });
    assert.equal(started.kind, 'started');
    assert.equal(started.percent, 25);

    const baselineErrors: string[] = [];
    let candidateErrors = 0;
    let i = 0;
    while (engine.getCanaryStatus()!.state === 'running' && i < 400) {
      const wave = Array.from({ length: 8 }, () => `user-${i++}`);
      await Promise.all(
        wave.map(async (id) => {
          try {
            const s = await run(engine, 'default', id);
            if (!s.features?.includes('canary.baseline')) baselineErrors.push(`${id}: ${s.features}`);
          } catch (e) {
            // Only the candidate's requests may fail, and only by its timeout.
            if ((e as EngineClientError).code === 'Timeout') candidateErrors++;
            else baselineErrors.push(`${id}: ${(e as Error).message}`);
          }
        }),
      );
      engine.evaluateControl();
    }
    const status = engine.getCanaryStatus()!;
    assert.equal(status.state, 'rolled_back', JSON.stringify(status));
    assert.match(status.reason!, /error rate/);
    assert.equal(status.percent, 0);
    assert.deepEqual(baselineErrors, []);
    assert.ok(candidateErrors >= 5, `${candidateErrors} candidate errors`);
    const rolledBack = transitions.find((t) => t.kind === 'rolled_back');
    assert.ok(rolledBack?.automatic, JSON.stringify(transitions));
    // After the rollback every request id, the candidate's too, is served by the baseline.
    for (let j = 0; j < 16; j++) {
      const arms = (await run(engine, 'default', `user-${j}`)).features?.filter((f) => f.startsWith('canary.'));
      assert.deepEqual(arms, ['canary.baseline']);
    }
    assert.equal(engine.getMetrics().canary?.state, 'rolled_back');
    assert.throws(() => engine.advanceCanary(), { code: 'InvalidParams' });
  } finally {
    await engine.shutdown();
  }
});

test('a QoS policy sheds background requests while the queue is deep, then restores; runtime.yaml reloads live', async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'mlx-serving-qos-'));
  const configPath = path.join(dir, 'runtime.yaml');
  const policy = `qos:
  evaluationIntervalMs: 50
  cooldownMs: 0
  recoverAfter: 2
  policies:
    - name: deep-queue
      metric: queue_depth
      threshold: 3
      severity: critical
      action: shed_background
`;
  writeFileSync(configPath, `batching:\n  maxBatchSize: 2\n${policy}`);
  // No flags file: the runtime config alone turns QoS on (the shipped flags keep
  // the `qos_policy` feature off until it is rolled out).
  const engine = await createEngine({ configPath, watchConfig: true, featureFlagsPath: false });
  try {
    await engine.loadModel({ model: 'default' });
    const alerts: ControlEvent[] = [];
    engine.on('qos:alert', (e: ControlEvent) => alerts.push(e));
    const waitFor = async (ok: () => boolean, what: string) => {
      for (let k = 0; k < 400 && !ok(); k++) await new Promise((r) => setTimeout(r, 25));
      assert.ok(ok(), what);
    };

    const flood = Array.from({ length: 12 }, (_, k) =>
      engine.generate({ model: 'default', prompt: `Story ${k}:`, maxTokens: 48, ignoreEos: true }),
    );
    await waitFor(() => alerts.some((a) => a.kind === 'fired'), 'the policy fires while 10 requests queue');
    const fired = alerts.find((a) => a.kind === 'fired')!;
    assert.equal(fired.policy, 'deep-queue');
    assert.equal(fired.severity, 'critical');
    assert.ok(fired.value! > 3);
    assert.equal(engine.getMetrics().qos.sheddingBackground, true);
    await assert.rejects(run(engine, 'default', 'bg-1', 'background'), (e: EngineClientError) => e.code === 'Overloaded' && /QoS/.test(e.message));
    // Default-priority requests are untouched by the policy.
    const texts = await Promise.all(flood);
    assert.equal(texts.length, 12);
    await waitFor(() => alerts.some((a) => a.kind === 'restored'), 'restored once the queue drained');
    assert.equal(engine.getQosStatus().sheddingBackground, false);
    await run(engine, 'default', 'bg-2', 'background');

    // Garbage during hot reload: the config in force stays (the policy is still there).
    const errors: unknown[] = [];
    engine.on('config:error', (e) => errors.push(e));
    writeFileSync(configPath, 'qos: [this is not: a config');
    await waitFor(() => errors.length > 0, 'config:error for a garbage file');
    assert.throws(() => engine.reloadConfig(), { code: 'InvalidParams' });
    assert.equal(engine.getQosStatus().enabled, true);

    // A valid file applies: without policies the engine stops evaluating them.
    const reloaded: { appliesOnNextLoad: string[] }[] = [];
    engine.on('config:reloaded', (e) => reloaded.push(e));
    writeFileSync(configPath, 'batching:\n  maxBatchSize: 4\n');
    await waitFor(() => reloaded.length > 0, 'config:reloaded for a valid file');
    assert.deepEqual(reloaded[0].appliesOnNextLoad, ['batching']);
    await waitFor(() => !engine.getQosStatus().enabled, 'policies gone');
  } finally {
    await engine.shutdown();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a canary addressed by a name that is no model id is served over HTTP, as through the API', async () => {
  const engine = await createEngine();
  try {
    await engine.loadModel({ model: 'default' });
    await engine.loadModel({ model: 'default', modelId: 'candidate' });
    engine.startCanary({ name: 'assistant', baseline: 'default', candidate: 'candidate', stages: [50, 100] });
    const server = await engine.startServer({ port: 0 });
    const ask = (model: string, user: string) =>
      fetch(`${server.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model, user, messages: [{ role: 'user', content: 'Name a colour.' }], max_tokens: 3, temperature: 0 }),
      });
    for (const user of ['u-1', 'u-2', 'u-3', 'u-4']) {
      const res = await ask('assistant', user);
      const body = await res.json();
      assert.equal(res.status, 200, JSON.stringify(body));
      assert.equal(body.model, 'assistant');
    }
    assert.equal((await run(engine, 'assistant', 'u-1')).features?.some((f) => f.startsWith('canary.')), true);
    const unknown = await ask('nope', 'u-1');
    assert.equal(unknown.status, 404);
    assert.equal((await unknown.json()).error.code, 'ModelNotLoaded');
  } finally {
    await engine.shutdown();
  }
});
