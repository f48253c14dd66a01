/**
 * Phase 5 feature flags through the public API: the documented MD5 rule,
 * reproduced here with node:crypto, decides every request; flags gate the
 * prefix cache for real; a bad reload keeps the flags in force.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { createEngine, defaultFeatureFlagsPath, EngineClientError, evaluateFeature, isFeatureEnabled, type Engine } from '../lib/index';

/** The rule as another service would write it. */
function bucket(requestId: string, seed: string): number {
  const hex = createHash('md5').update(requestId + seed, 'utf8').digest('hex');
  return parseInt(hex.slice(0, 8), 16) % 10000;
}

const FLAGS = (ttftPercent: number) => `
phase5: {enabled: true, rollout_percentage: 100, hash_seed: "p5"}
emergency: {kill_switch: false}
features:
  ttft_pipeline: {enabled: true, rollout_percentage: ${ttftPercent}, hash_seed: "ttft", kv_prefetch: true, warmup: true, speculative: false}
  qos_policy: {enabled: false, rollout_percentage: 0, hash_seed: "qos", dry_run: true}
`;

describe('feature flags', () => {
  let engine: Engine;
  let dir: string;
  let file: string;

  before(async () => {
    dir = mkdtempSync(path.join(tmpdir(), 'mlx-serving-flags-'));
    file = path.join(dir, 'feature-flags.yaml');
    writeFileSync(file, FLAGS(30));
    engine = await createEngine({ featureFlagsPath: file, watchFeatureFlags: true });
    await engine.loadModel('default');
  });

  after(async () => {
    await engine.shutdown();
    rmSync(dir, { recursive: true, force: true });
  });

  test('decisions follow the documented MD5 bucket rule exactly', () => {
    let on = 0;
    for (let i = 0; i < 3000; i++) {
      const id = `user-${i}`;
      const d = engine.evaluateFeature('ttft_pipeline', id);
      assert.equal(d.enabled, bucket(id, 'ttft') < 3000, id);
      assert.equal(d.bucket, bucket(id, 'ttft'));
      on += Number(d.enabled);
    }
    assert.ok(on > 800 && on < 1000, `${on} of 3000 at 30%`);
    assert.equal(engine.evaluateFeature('qos_policy', 'x').reason, 'feature_disabled');
    assert.equal(engine.evaluateFeature('ttft_pipeline.speculative', 'user-1').enabled, false);
    assert.equal(engine.evaluateFeature('nope', 'x').reason, 'unknown_feature');
  });

  test('the flags gate the prefix cache per request, with identical output', async () => {
    const ids = (on: boolean) => Array.from({ length: 200 }, (_, i) => `r${i}`).filter((id) => engine.isFeatureEnabled('ttft_pipeline.kv_prefetch', id) === on);
    const messages = [
      { role: 'system', content: 'You answer in one short sentence. '.repeat(20) },
      { role: 'user', content: 'What is rain?' },
    ];
    const run = async (requestId: string) => {
      let text = '';
      let features: string[] = [];
      for await (const c of engine.createGenerator({ model: 'default', messages, maxTokens: 8 }, { requestId })) {
        if (c.type === 'token') text += c.token;
        if (c.type === 'metadata') features = c.stats.features;
      }
      return { text, features };
    };
    const [off1, off2] = ids(false);
    const [on1, on2] = ids(true);
    const hits0 = engine.getMetrics().prefixCache.hits;
    const a = await run(off1);
    const b = await run(off2);
    assert.deepEqual(a.features, []);
    assert.equal(engine.getMetrics().prefixCache.hits, hits0, 'baseline requests neither feed nor use the cache');
    const c = await run(on1);
    const d = await run(on2);
    assert.deepEqual(c.features, ['ttft_pipeline.kv_prefetch']);
    assert.ok(engine.getMetrics().prefixCache.hits > hits0 + 100, 'the second Phase 5 request reused the first one`s prefix');
    assert.equal(new Set([a.text, b.text, c.text, d.text]).size, 1);
    const counts = engine.getMetrics().featureFlags;
    assert.ok(counts.some((x) => x.feature === 'ttft_pipeline.kv_prefetch' && x.enabled && x.requests >= 2));
    assert.ok(counts.some((x) => x.feature === 'ttft_pipeline.kv_prefetch' && !x.enabled && x.requests >= 2));
  });

  test('a bad file is rejected on reload and the flags in force stay', async () => {
    const before = engine.evaluateFeature('ttft_pipeline', 'user-7');
    writeFileSync(file, 'phase5: {enabled: true, rollout_percentage: 250, hash_seed: "p5"}\n');
    assert.throws(() => engine.reloadFeatureFlags(), (e: unknown) => e instanceof EngineClientError && e.code === 'InvalidParams' && /rollout_percentage/.test(e.message));
    assert.deepEqual(engine.evaluateFeature('ttft_pipeline', 'user-7'), before);
    // The watcher sees a good file and applies it.
    // The watcher does not keep the process alive; this timer does, until it fires.
    const keepAlive = setInterval(() => {}, 100);
    const reloaded = new Promise((r) => engine.once('flags:reloaded', r));
    writeFileSync(file, FLAGS(0));
    await reloaded;
    clearInterval(keepAlive);
    assert.equal(engine.evaluateFeature('ttft_pipeline', 'user-7').reason, 'rollout_excluded');
  });
});

test('environment overrides beat the file; the committed file loads', async () => {
  process.env.PHASE5_ENABLED = 'false';
  try {
    const e = await createEngine({ featureFlagsPath: defaultFeatureFlagsPath() });
    assert.equal(e.evaluateFeature('ttft_pipeline', 'anyone').reason, 'phase5_disabled');
    await e.shutdown();
    process.env.PHASE5_ENABLED = 'maybe';
    await assert.rejects(createEngine({ featureFlagsPath: defaultFeatureFlagsPath() }), (err: unknown) => err instanceof EngineClientError && /PHASE5_ENABLED/.test(err.message));
  } finally {
    delete process.env.PHASE5_ENABLED;
  }
  assert.match(readFileSync(defaultFeatureFlagsPath(), 'utf8'), /kill_switch/);
});

test("the guide's calls: isFeatureEnabled('phase5', id) from the package root, and createEngine() with the shipped flags", async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'mlx-serving-flags-root-'));
  const file = path.join(dir, 'flags.yaml');
  writeFileSync(file, FLAGS(30).replace('rollout_percentage: 100, hash_seed: "p5"', 'rollout_percentage: 40, hash_seed: "p5"'));
  process.env.FEATURE_FLAGS_PATH = file;
  const warnings: string[] = [];
  const onWarning = (w: Error) => warnings.push(w.message);
  process.on('warning', onWarning);
  t.after(() => {
    delete process.env.FEATURE_FLAGS_PATH;
    process.off('warning', onWarning);
    rmSync(dir, { recursive: true, force: true });
  });
  // The global rollout decides `phase5`, by the documented rule.
  let on = 0;
  for (let i = 0; i < 1000; i++) {
    const id = `req-${i}`;
    assert.equal(isFeatureEnabled('phase5', id), bucket(id, 'p5') < 4000, id);
    on += Number(isFeatureEnabled('phase5', id));
  }
  assert.ok(on > 330 && on < 470, `${on} of 1000 at 40%`);
  const inside = Array.from({ length: 100 }, (_, i) => `u${i}`).find((id) => bucket(id, 'p5') < 4000 && bucket(id, 'ttft') < 3000)!;
  assert.deepEqual(evaluateFeature('ttft_pipeline', inside), { enabled: true, reason: 'enabled', bucket: bucket(inside, 'ttft') });
  // An engine on the same file decides the same way.
  const engine = await createEngine({ featureFlagsPath: file });
  for (const id of ['a', 'b', 'c', inside]) assert.deepEqual(engine.evaluateFeature('phase5', id), evaluateFeature('phase5', id));
  await engine.shutdown();
  // An edit applies on the next call; a bad one warns once and keeps the flags in force.
  writeFileSync(file, FLAGS(30).replace('enabled: true, rollout_percentage: 100', 'enabled: false, rollout_percentage: 100'));
  assert.equal(evaluateFeature('phase5', inside).reason, 'phase5_disabled');
  writeFileSync(file, 'phase5: [not yaml');
  assert.equal(evaluateFeature('phase5', inside).reason, 'phase5_disabled');
  assert.equal(evaluateFeature('phase5', inside).reason, 'phase5_disabled');
  await new Promise((r) => setImmediate(r));
  assert.equal(warnings.filter((w) => /flags\.yaml: phase5: invalid type.*\(the flags in force stay\)/.test(w)).length, 1, warnings.join('\n'));
  assert.throws(() => isFeatureEnabled('phase5', 42 as unknown as string), (e: unknown) => e instanceof EngineClientError && e.code === 'InvalidParams');

  // Without options an engine reads the shipped file, as the CLI does; `false` asks for none.
  delete process.env.FEATURE_FLAGS_PATH;
  const plain = await createEngine();
  assert.equal(plain.isFeatureEnabled('phase5', 'anyone'), true);
  assert.equal(plain.evaluateFeature('qos_policy', 'anyone').reason, 'feature_disabled');
  await plain.shutdown();
  const none = await createEngine({ featureFlagsPath: false });
  assert.throws(() => none.isFeatureEnabled('phase5', 'x'), /no feature flags file/);
  await none.shutdown();
  await assert.rejects(createEngine({ featureFlagsPath: path.join(dir, 'missing.yaml') }), (e: unknown) => e instanceof EngineClientError && e.code === 'InvalidParams');
});
