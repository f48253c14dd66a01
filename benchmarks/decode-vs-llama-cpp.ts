/**
 * Single-stream speed against llama.cpp (node-llama-cpp), same GGUF file, same
 * thread count, same process, measured alternately so both see the same
 * machine state. Prints one table with the ratio and writes JSON.
 *
 *   npx tsx benchmarks/decode-vs-llama-cpp.ts [--model path.gguf] [--runs 3] [--decode 128]
 *       [--llama-cpp-cpu haswell]
 *
 * TTFT: prompt tokens in, first output token out (prefill of the whole
 * prompt). Decode: output tokens per second after the first, greedy, with
 * end-of-generation ignored so both engines produce the same count. Decode
 * rows also give the fraction of the machine's read bandwidth each engine
 * reached: the bytes a step reads (every weight matrix once, one embedding
 * row, the f16 keys and values it attends over, at the mean context of the
 * run) times tok/s, over a read probe on the same threads in the same run
 * (the best of one before and one after).
 *
 * What an AVX2-only host would see, on an AVX-512 one: MLX_SERVING_ISA=avx2
 * with `--llama-cpp-cpu haswell` (node-llama-cpp's AVX2 build).
 *
 * Models of real sizes: `python3 scripts/make_synthetic.py` writes them to
 * models/synthetic/ (e.g. `--model models/synthetic/llama-1b-q4_0.gguf`).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

import { readBandwidth } from '../index.js';
import { createEngine, defaultModelPath } from '../lib/index';
import { loadLlamaCpp, printPeerTable, singleStreamRows, type SingleStream } from './utils';

const { values: args } = parseArgs({
  options: {
    model: { type: 'string', default: defaultModelPath() },
    runs: { type: 'string', default: '3' },
    decode: { type: 'string', default: '128' },
    threads: { type: 'string', default: String(Math.min(cpus().length, Number(process.env.RAYON_NUM_THREADS ?? 1e9))) },
    'llama-cpp-cpu': { type: 'string' },
  },
});
const RUNS = Number(args.runs);
const N_DECODE = Number(args.decode);
const THREADS = Number(args.threads);
const PROMPT_LENGTHS = [15, 128, 512];

const TEXT =
  'The river wound through the valley, carrying snowmelt from the mountains past villages, mills and ' +
  'orchards. Travellers who followed it spoke of markets where traders sold wool, salt, copper and ' +
  'spices, of bridges built by forgotten kings, and of a library whose shelves held maps of every ' +
  'road between the northern forests and the southern sea. ';

async function main(): Promise<void> {
  process.env.RAYON_NUM_THREADS ??= String(THREADS);
  const engine = await createEngine();
  const model = await engine.loadModel({ model: args.model!, modelId: 'bench' });
  const rt = await engine.getRuntimeInfo();

  const { llama, cpu: peerCpu } = await loadLlamaCpp(args['llama-cpp-cpu']);
  const lcModel = await llama.loadModel({ modelPath: args.model! });
  const lcContext = await lcModel.createContext({ contextSize: 2048, threads: THREADS });

  const corpus = (await engine.tokenize({ model: 'bench', text: TEXT.repeat(20) })).tokens;

  // A fresh salt per run: every run prefills its whole prompt, as the peer's fresh sequence does.
  let cold = 0;
  async function ours(prompt: number[], nDecode: number): Promise<SingleStream> {
    let stats: { timeToFirstToken: number; tokensPerSecond: number } | undefined;
    for await (const c of engine.createGenerator({ model: 'bench', prompt: { tokens: prompt }, maxTokens: nDecode, ignoreEos: true }, { cacheSalt: `run-${++cold}` })) {
      if (c.type === 'metadata') stats = c.stats;
      if (c.type === 'error') throw new Error(c.error.message);
    }
    return { ttftMs: stats!.timeToFirstToken, decodeTokPerS: stats!.tokensPerSecond };
  }

  async function theirs(prompt: number[], nDecode: number): Promise<SingleStream> {
    const seq = lcContext.getSequence();
    const t0 = performance.now();
    let tFirst = 0;
    let n = 0;
    for await (const _ of seq.evaluate(prompt as never, { temperature: 0 })) {
      if (++n === 1) tFirst = performance.now();
      if (n >= nDecode) break;
    }
    const tEnd = performance.now();
    seq.dispose();
    return { ttftMs: tFirst - t0, decodeTokPerS: ((n - 1) * 1000) / (tEnd - tFirst) };
  }

  // Warm both (page in weights, first-call costs).
  await ours(corpus.slice(0, 32), 8);
  await theirs(corpus.slice(0, 32), 8);

  const probeMiB = 1024;
  const bwBefore = await readBandwidth(probeMiB);
  const rows = await singleStreamRows(PROMPT_LENGTHS, RUNS, N_DECODE, corpus, ours, theirs);
  const bandwidthGBs = Math.max(bwBefore, await readBandwidth(probeMiB));
  rows.forEach((r, i) => {
    if (!r.metric.startsWith('decode')) return;
    const context = PROMPT_LENGTHS[i >> 1] + N_DECODE / 2;
    const stepGB = (model.decodeWeightBytes + model.kvBytesPerPosition * context) / 1e9;
    r.bandwidth = { ours: (r.ours * stepGB) / bandwidthGBs, peer: (r.peer * stepGB) / bandwidthGBs };
  });

  console.log(`\nmodel ${path.basename(args.model!)} (${model.quantization}, ${(model.decodeWeightBytes / 1e6).toFixed(0)} MB read per step), ${THREADS} threads, ours ${rt.isa}, node-llama-cpp ${peerCpu}, median of ${RUNS}, ${N_DECODE} decoded tokens`);
  console.log(`host: ${cpus()[0]?.model ?? '?'}; read bandwidth ${bandwidthGBs.toFixed(1)} GB/s (${THREADS} threads, ${probeMiB} MiB)`);
  printPeerTable(rows, 'mlx-serving', 'node-llama-cpp');

  const out = path.join(__dirname, 'results', 'decode-vs-llama-cpp.json');
  mkdirSync(path.dirname(out), { recursive: true });
  writeFileSync(
    out,
    JSON.stringify({ date: new Date().toISOString(), model: args.model, host: cpus()[0]?.model, threads: THREADS, isa: rt.isa, peerCpu, bandwidthGBs, runs: RUNS, nDecode: N_DECODE, rows }, null, 2),
  );
  console.log(`\nwritten to ${path.relative(process.cwd(), out)}`);

  await lcContext.dispose();
  await lcModel.dispose();
  await engine.shutdown();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
