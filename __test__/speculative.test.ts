/**
 * Prompt-lookup speculative decoding on the real default model: greedy and
 * seeded outputs equal plain decoding token for token, alone and with other
 * streams, and on an answer that repeats its input most guesses are kept.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, test } from 'node:test';

import { createEngine, type Engine, type GeneratorParams } from '../lib/index';

const CODE = `function total(items) {\n  let sum = 0;\n  for (const item of items) {\n    sum += item.price * item.quantity;\n  }\n  return sum;\n}`;

let dir: string;
let plain: Engine;
let spec: Engine;

before(async () => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'mlx-serving-spec-'));
  const config = path.join(dir, 'runtime.yaml');
  writeFileSync(config, 'speculative:\n  enabled: true\n');
  plain = await createEngine();
  spec = await createEngine({ configPath: config });
  await plain.loadModel('default');
  await spec.loadModel('default');
});

after(async () => {
  await plain.shutdown();
  await spec.shutdown();
  rmSync(dir, { recursive: true, force: true });
});

async function tokens(engine: Engine, params: GeneratorParams): Promise<number[]> {
  const ids: number[] = [];
  for await (const c of engine.createGenerator(params)) {
    if (c.type === 'token') ids.push(c.tokenId);
    if (c.type === 'error') throw new Error(c.error.message);
  }
  return ids;
}

test('greedy and seeded outputs are identical to plain decoding, and guesses are kept on repeating text', async () => {
  const before = spec.getMetrics().speculative;
  const cases: GeneratorParams[] = [
    { model: 'default', messages: [{ role: 'user', content: `Repeat this code exactly:\n\n${CODE}` }], maxTokens: 80, temperature: 0 },
    { model: 'default', messages: [{ role: 'user', content: `Repeat this code exactly:\n\n${CODE}` }], maxTokens: 60, temperature: 0.8, seed: 3 },
    { model: 'default', prompt: 'One, two, three, one, two, three, one, two,', maxTokens: 40, temperature: 0 },
    { model: 'default', messages: [{ role: 'user', content: 'Why is the sky blue?' }], maxTokens: 40, temperature: 0.7, topP: 0.9, seed: 5 },
  ];
  for (const p of cases) {
    assert.deepEqual(await tokens(spec, p), await tokens(plain, p), JSON.stringify(p).slice(0, 80));
  }
  const m = spec.getMetrics().speculative;
  assert.ok(m.drafted - before.drafted > 20, JSON.stringify(m));
  assert.ok((m.accepted - before.accepted) / (m.drafted - before.drafted) > 0.3, JSON.stringify(m));
  assert.equal(plain.getMetrics().speculative.drafted, 0);
});

test('several streams at once (within speculative.maxBatch) still match plain decoding', async () => {
  const cases: GeneratorParams[] = [0, 1, 2].map((i) => ({
    model: 'default',
    messages: [{ role: 'user', content: `Copy this line ${i + 1} times: the quick brown fox.` }],
    maxTokens: 48,
    temperature: 0,
  }));
  const together = await Promise.all(cases.map((p) => tokens(spec, p)));
  for (const [i, p] of cases.entries()) assert.deepEqual(together[i], await tokens(plain, p));
  const m = spec.getMetrics();
  assert.equal(m.kvCache.blocksUsed, m.kvCache.blocksPinned);
});

test('a draft model: greedy output unchanged, its guesses checked, compatibility reported, detached cleanly', async () => {
  const draft = await spec.loadDraftModel({ model: 'default', modelId: 'draft' });
  assert.equal(draft.id, 'draft');
  assert.equal(spec.getModelInfo('default')?.draftModel, 'draft');
  // Drafts are not servable models of their own.
  assert.deepEqual(spec.listModels().map((m) => m.id), ['default']);

  const before = spec.getMetrics().speculative;
  const cases: GeneratorParams[] = [
    { model: 'default', messages: [{ role: 'user', content: 'Why is the sky blue?' }], maxTokens: 48, temperature: 0 },
    { model: 'default', prompt: 'The capital of France is', maxTokens: 24, temperature: 0 },
  ];
  for (const p of cases) assert.deepEqual(await tokens(spec, p), await tokens(plain, p));
  const m = spec.getMetrics().speculative;
  const drafted = m.drafted - before.drafted;
  // The model drafting for itself agrees with itself almost always.
  assert.ok(drafted > 40 && (m.accepted - before.accepted) / drafted > 0.9, JSON.stringify({ before, m }));

  // Sampled requests run through the rejection rule and end normally.
  const sampled = await tokens(spec, { model: 'default', prompt: 'Once upon a time', maxTokens: 32, temperature: 0.9, seed: 1 });
  assert.equal(sampled.length, 32);

  const report = await spec.isDraftModelCompatible('default', 'draft');
  assert.equal(report.compatible, true);
  assert.deepEqual(report.errors, []);
  assert.ok(report.warnings.some((w) => w.includes('not smaller')), JSON.stringify(report));
  assert.equal(report.details.draftModel.vocabSize, report.details.primaryModel.vocabSize);

  await spec.unloadDraftModel('default');
  assert.equal(spec.getModelInfo('default')?.draftModel, undefined);
  assert.deepEqual(await tokens(spec, cases[1]), await tokens(plain, cases[1]));
  const m2 = spec.getMetrics();
  assert.equal(m2.kvCache.blocksUsed, m2.kvCache.blocksPinned);
});

test('a draft model with another vocabulary, or for no loaded model, is refused with a stable code', async () => {
  const other = path.join(__dirname, '..', 'crates', 'engine', 'tests', 'fixtures', 'llama', 'model.gguf');
  await assert.rejects(spec.loadDraftModel({ model: other, primaryModel: 'default' }), (e: any) => e.code === 'InvalidParams' && /vocabulary/.test(e.message));
  await assert.rejects(spec.loadDraftModel({ model: 'default', primaryModel: 'nope' }), (e: any) => e.code === 'ModelNotLoaded');
  await assert.rejects(spec.loadDraftModel({ model: '/no/such/file.gguf' }), (e: any) => e.code === 'ModelLoadError');
  await assert.rejects(spec.loadDraftModel({} as any), (e: any) => e.code === 'InvalidParams');
  await assert.rejects(spec.isDraftModelCompatible('default', 'nope'), (e: any) => e.code === 'ModelNotLoaded');
  await assert.rejects(spec.unloadDraftModel('nope'), (e: any) => e.code === 'ModelNotLoaded');
  await assert.rejects(spec.loadDraftModel({ model: 'default', primaryModel: 42 } as any), (e: any) => e.code === 'InvalidParams');
  await assert.rejects(spec.loadDraftModel({ model: 'default', modelId: '' }), (e: any) => e.code === 'InvalidParams');
  await assert.rejects(spec.loadDraftModel(null as any), (e: any) => e.code === 'InvalidParams');
  // A directory that is no model folder.
  await assert.rejects(spec.loadDraftModel({ model: dir }), (e: any) => e.code === 'ModelLoadError');
  assert.equal(spec.getModelInfo('default')?.draftModel, undefined);
  // Still serving, identically to plain decoding.
  const p: GeneratorParams = { model: 'default', prompt: 'The capital of France is', maxTokens: 12, temperature: 0 };
  assert.deepEqual(await tokens(spec, p), await tokens(plain, p));
});
