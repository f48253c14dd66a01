/**
 * Backends on the real default model: the `mlx` backend (libmlx from the
 * mlx-cpu wheel here) gives the `cpu` backend's greedy text, alone and with
 * two streams batched; `auto` picks `cpu` on a machine without a GPU; a bad
 * backend gets InvalidParams and the engine keeps serving.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { createEngine, EngineClientError, type Engine } from '../lib/index';

const isCode = (code: string) => (e: unknown) => e instanceof EngineClientError && e.code === code;

describe('backends', () => {
  let engine: Engine;

  before(async () => {
    engine = await createEngine();
  });

  after(async () => {
    await engine.shutdown();
  });

  const greedy = (model: string, content: string) =>
    engine.generate({ model, messages: [{ role: 'user', content }], maxTokens: 12, temperature: 0 });

  test('mlx gives the cpu backend greedy text, alone and batched', async () => {
    const cpu = await engine.loadModel({ model: 'default', modelId: 'on-cpu' });
    const mlx = await engine.loadModel({ model: 'default', modelId: 'on-mlx', backend: 'mlx' });
    assert.equal(cpu.backend, 'cpu');
    assert.equal(mlx.backend, 'mlx');
    assert.equal(mlx.quantization, cpu.quantization);
    // Greedy text can only match across backends where each step's choice
    // is clear: on cpu these prompts' top two tokens are at least 0.24 apart
    // in log-probability at every one of the 12 steps ('What is the capital
    // of France?' has a 0.01 near-tie at its first token, which any change
    // of rounding may flip).
    const prompts = ['Count from one to five.', 'What colour is the sky on a clear day?'];
    const want = await Promise.all(prompts.map((p) => greedy('on-cpu', p)));
    assert.equal(await greedy('on-mlx', prompts[0]), want[0]);
    // Two streams in one batch on mlx: each still gets its own text.
    assert.deepEqual(await Promise.all(prompts.map((p) => greedy('on-mlx', p))), want);
    await engine.unloadModel('on-mlx');
    await engine.unloadModel('on-cpu');
  });

  test('auto picks cpu without a GPU; bad backends are refused and nothing breaks', async () => {
    const rt = await engine.getRuntimeInfo();
    const auto = await engine.loadModel({ model: 'default', modelId: 'auto', backend: 'auto' });
    assert.equal(auto.backend, rt.mlx.gpu ? 'mlx' : 'cpu');
    for (const backend of ['gpu', '', 'MLX']) {
      await assert.rejects(engine.loadModel({ model: 'default', modelId: 'bad', backend: backend as 'cpu' }), isCode('InvalidParams'));
    }
    for (const backend of [42, null, { name: 'mlx' }]) {
      await assert.rejects(engine.loadModel({ model: 'default', modelId: 'bad', backend: backend as unknown as 'cpu' }), isCode('InvalidParams'));
    }
    // The file under the same id on another backend is not silently the same model.
    await assert.rejects(engine.loadModel({ model: 'default', modelId: 'auto', backend: rt.mlx.gpu ? 'cpu' : 'mlx' }), isCode('InvalidParams'));
    assert.deepEqual(engine.listModels().map((m) => m.id), ['auto']);
    assert.ok((await greedy('auto', 'Hi')).length > 0);
  });
});
