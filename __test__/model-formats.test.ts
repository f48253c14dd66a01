/**
 * Model formats on the real default model: `convertModel` writes an MLX
 * folder from the GGUF file, the folder loads as a model of its own, and it
 * gives the GGUF's greedy tokens exactly (same weights, same layout), on
 * the mlx backend too. Bad paths and folders get ModelLoadError and leave
 * the engine serving.
 */
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { convertModel, createEngine, EngineClientError, type Engine } from '../lib/index';

async function greedy(engine: Engine, model: string, content: string): Promise<string> {
  return engine.generate({ model, messages: [{ role: 'user', content }], maxTokens: 24, temperature: 0 });
}

describe('MLX folders and convert', () => {
  let engine: Engine;
  let dir: string;

  before(async () => {
    dir = mkdtempSync(path.join(tmpdir(), 'mlx-serving-convert-'));
    engine = await createEngine();
    await engine.loadModel('default');
  });

  after(async () => {
    await engine.shutdown();
    rmSync(dir, { recursive: true, force: true });
  });

  test('the converted folder loads and gives the GGUF greedy output', async () => {
    const out = path.join(dir, 'smollm2-mlx');
    const report = await convertModel('default', out);
    assert.equal(report.tensors, 272);
    assert.equal(report.quantized, 211, 'every Q4_1 and Q8_0 tensor maps exactly onto MLX groups');
    assert.equal(report.dequantized, 0);
    for (const f of ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json']) {
      assert.ok(existsSync(path.join(out, f)), f);
    }
    const config = JSON.parse(readFileSync(path.join(out, 'config.json'), 'utf8'));
    assert.deepEqual(config.quantization, { group_size: 32, bits: 4, 'model.embed_tokens': { group_size: 32, bits: 8 } });

    const handle = await engine.loadModel({ model: out, modelId: 'mlx' });
    assert.equal(handle.architecture, 'llama');
    assert.equal(handle.quantization, 'MLX 4-bit/32');
    for (const prompt of ['Write a short poem about the sea.', 'What is 17 times 23?', 'Name three primary colors.']) {
      assert.equal(await greedy(engine, 'mlx', prompt), await greedy(engine, 'default', prompt), prompt);
    }
    // The folder on the mlx backend (MLX's own quantized matmul on these groups) says the same.
    await engine.loadModel({ model: out, modelId: 'mlx-on-mlx', backend: 'mlx' });
    assert.equal(await greedy(engine, 'mlx-on-mlx', 'What is 17 times 23?'), await greedy(engine, 'default', 'What is 17 times 23?'));
    await engine.unloadModel('mlx-on-mlx');
    // Converting into a folder that already holds a model is refused.
    await assert.rejects(convertModel('default', out), (e: EngineClientError) => e.code === 'ModelLoadError' && /already holds a model/.test(e.message));
    await engine.unloadModel('mlx');
  });

  test('bad model paths and folders are ModelLoadError, and the engine keeps serving', async () => {
    const empty = mkdtempSync(path.join(dir, 'empty-'));
    const broken = mkdtempSync(path.join(dir, 'broken-'));
    writeFileSync(path.join(broken, 'config.json'), '{"model_type": "llama", "hidden_size": 64');
    const cases: [string, RegExp][] = [
      [empty, /directory without config.json: neither a GGUF file nor an MLX model folder/],
      [broken, /config.json: not valid JSON/],
      [path.join(dir, 'missing.gguf'), /cannot open/],
    ];
    for (const [model, want] of cases) {
      await assert.rejects(engine.loadModel({ model, modelId: 'bad' }), (e: EngineClientError) => e.code === 'ModelLoadError' && want.test(e.message));
    }
    await assert.rejects(convertModel(path.join(dir, 'missing.gguf'), path.join(dir, 'x')), (e: EngineClientError) => e.code === 'ModelLoadError');
    assert.ok((await greedy(engine, 'default', 'Hi')).length > 0);
  });
});
