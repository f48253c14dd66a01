/**
 * Creates, uses and drops engines over and over, half ended with shutdown()
 * and half only garbage-collected, and prints the process's resident memory
 * after each round. Each engine loads the default model (its weights are
 * read into memory: ~94 MiB), so an engine that is not freed shows up as a
 * step of that size. Run with --expose-gc; exits 1 when memory grew by more
 * than one model over the rounds after the first.
 *
 *   node --expose-gc --import tsx benchmarks/engine-lifecycle.ts [--rounds 6]
 */
import { parseArgs } from 'node:util';

import { createEngine } from '../lib/index';

const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) {
  process.stderr.write('run with node --expose-gc\n');
  process.exit(2);
}
const { values } = parseArgs({ options: { rounds: { type: 'string', default: '6' } } });
const rounds = Number(values.rounds);
const mib = () => process.memoryUsage().rss / 2 ** 20;

async function collect() {
  // Finalizers of native objects run after the collection, from the event loop.
  for (let i = 0; i < 5; i++) {
    gc!();
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function round(i: number) {
  const engine = await createEngine();
  const { id, weightBytes } = await engine.loadModel({ model: 'default' });
  await engine.generate({ model: id, prompt: `Round ${i}:`, maxTokens: 4, temperature: 0 });
  if (i % 2 === 0) await engine.shutdown();
  return weightBytes / 2 ** 20;
}

(async () => {
  const rss: number[] = [];
  let model = 0;
  for (let i = 0; i < rounds; i++) {
    model = await round(i);
    await collect();
    rss.push(mib());
    console.log(`round ${i + 1} (${i % 2 === 0 ? 'shutdown' : 'dropped'}): RSS ${rss[i].toFixed(1)} MiB`);
  }
  const growth = rss[rss.length - 1] - rss[0];
  const ok = growth < model;
  console.log(`growth after the first round: ${growth.toFixed(1)} MiB (one model: ${model.toFixed(1)} MiB): ${ok ? 'FREED' : 'LEAKED'}`);
  process.exit(ok ? 0 : 1);
})();
