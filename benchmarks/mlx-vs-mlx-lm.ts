/**
 * The `mlx` backend against mlx-lm, same MLX folder (the default model
 * converted by `convertModel`), same MLX build (mlx-cpu 0.32.4 here), one
 * run, engines alternating. Prints one table with the ratios and writes JSON.
 *
 *   npx tsx benchmarks/mlx-vs-mlx-lm.ts [--runs 2] [--decode 16] [--streams 8] [--model DIR]
 *
 * `--model` takes another MLX folder. The 2-layer test fixture
 * (`--model crates/engine/tests/fixtures/llama/mlx --decode 128`) is one
 * whose kernels take almost no time, so a step costs what each engine adds
 * around MLX: the share a fast GPU leaves of a step.
 *
 * mlx-lm comes from PyPI into `.mlx/mlx-lm-venv` on first use (or give a
 * Python that has it with MLX_LM_PYTHON). Single stream: TTFT and decode
 * tok/s, greedy, prompts as token ids. Concurrent: `--streams` requests at
 * once against mlx-lm's own server (which batches them), aggregate
 * generated tokens per second of wall time.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';

import { convertModel, createEngine } from '../lib/index';
import { printPeerTable, singleStreamRows, type SingleStream } from './utils';

const { values: args } = parseArgs({
  options: {
    runs: { type: 'string', default: '2' },
    decode: { type: 'string', default: '16' },
    streams: { type: 'string', default: '8' },
    model: { type: 'string' },
  },
});
const RUNS = Number(args.runs);
const N_DECODE = Number(args.decode);
const STREAMS = Number(args.streams);
const PROMPT_LENGTHS = [16, 64];
const ROOT = path.join(__dirname, '..');
const MLX_DIR = path.join(ROOT, '.mlx');

const TEXT =
  'The river wound through the valley, carrying snowmelt from the mountains past villages, mills and ' +
  'orchards. Travellers who followed it spoke of markets where traders sold wool, salt, copper and ' +
  'spices, of bridges built by forgotten kings, and of a library whose shelves held maps of every ' +
  'road between the northern forests and the southern sea. ';

/** A Python with mlx-lm on the same MLX version as the addon's. */
function mlxLmPython(mlxVersion: string): string {
  if (process.env.MLX_LM_PYTHON) return process.env.MLX_LM_PYTHON;
  const venv = path.join(MLX_DIR, 'mlx-lm-venv');
  const py = path.join(venv, 'bin', 'python');
  if (!existsSync(py)) {
    console.log(`installing mlx-lm with mlx ${mlxVersion} into ${path.relative(ROOT, venv)} ...`);
    const run = (cmd: string, a: string[]) => {
      const r = spawnSync(cmd, a, { stdio: 'inherit' });
      if (r.status !== 0) throw new Error(`${cmd} ${a.join(' ')} failed`);
    };
    run('python3', ['-m', 'venv', venv]);
    const extra = process.platform === 'darwin' ? [] : ['[cpu]'];
    run(py, ['-m', 'pip', 'install', '-q', `mlx${extra.join('')}==${mlxVersion}`, 'mlx-lm==0.32.2']);
  }
  return py;
}

async function main(): Promise<void> {
  const engine = await createEngine();
  const rt = await engine.getRuntimeInfo();
  if (!rt.mlx.available) throw new Error(`MLX is unavailable: ${rt.mlx.reason}`);
  const folder = args.model ? path.resolve(args.model) : path.join(MLX_DIR, 'smollm2-135m-instruct-mlx');
  if (!args.model && !existsSync(path.join(folder, 'config.json'))) await convertModel('default', folder);
  await engine.loadModel({ model: folder, modelId: 'bench', backend: 'mlx' });
  const py = mlxLmPython(rt.mlx.version!);

  // mlx-lm, single stream: a driver process answering one request per line.
  const driver = spawn(py, [path.join(__dirname, 'mlx_lm_driver.py'), folder], { stdio: ['pipe', 'pipe', 'inherit'] });
  const lines = createInterface({ input: driver.stdout! })[Symbol.asyncIterator]();
  const next = async () => JSON.parse((await lines.next()).value as string);
  await next();

  const corpus = (await engine.tokenize({ model: 'bench', text: TEXT.repeat(10) })).tokens;

  // A fresh salt per run: every run prefills its whole prompt, as the peer's fresh sequence does.
  let cold = 0;
  async function ours(prompt: number[], nDecode: number): Promise<SingleStream> {
    let stats: { timeToFirstToken: number; tokensPerSecond: number } | undefined;
    for await (const c of engine.createGenerator({ model: 'bench', prompt: { tokens: prompt }, maxTokens: nDecode, ignoreEos: true, temperature: 0 }, { cacheSalt: `run-${++cold}` })) {
      if (c.type === 'metadata') stats = c.stats;
      if (c.type === 'error') throw new Error(c.error.message);
    }
    return { ttftMs: stats!.timeToFirstToken, decodeTokPerS: stats!.tokensPerSecond };
  }

  async function theirs(prompt: number[], nDecode: number): Promise<SingleStream> {
    driver.stdin!.write(JSON.stringify({ tokens: prompt, n: nDecode }) + '\n');
    return next();
  }

  await ours(corpus.slice(0, 8), 2);
  await theirs(corpus.slice(0, 8), 2);

  const rows = await singleStreamRows(PROMPT_LENGTHS, RUNS, N_DECODE, corpus, ours, theirs);
  driver.stdin!.end();

  // Concurrent streams: the same text prompts to both servers at once.
  const prompts = Array.from({ length: STREAMS }, (_, i) => TEXT.slice(i * 20, i * 20 + 80));
  let t0 = performance.now();
  const ourCounts = await Promise.all(
    prompts.map(async (p) => {
      let n = 0;
      for await (const c of engine.createGenerator({ model: 'bench', prompt: p, maxTokens: N_DECODE, temperature: 0 })) if (c.type === 'token') n++;
      return n;
    }),
  );
  const ourAggregate = (ourCounts.reduce((x, y) => x + y, 0) * 1000) / (performance.now() - t0);

  const port = 18000 + Math.floor(Math.random() * 1000);
  const server = spawn(py, ['-m', 'mlx_lm.server', '--model', folder, '--port', String(port)], { stdio: 'ignore' });
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; ; i++) {
    try {
      if ((await fetch(`${url}/v1/models`)).ok) break;
    } catch {
      if (i > 300) throw new Error('mlx-lm server did not start');
      await new Promise((r) => setTimeout(r, 200));
    }
  }
  const complete = async (prompt: string) => {
    const r = await fetch(`${url}/v1/completions`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ model: folder, prompt, max_tokens: N_DECODE, temperature: 0 }),
    });
    return ((await r.json()) as { usage: { completion_tokens: number } }).usage.completion_tokens;
  };
  await complete('Hello');
  t0 = performance.now();
  const theirCounts = await Promise.all(prompts.map(complete));
  const theirAggregate = (theirCounts.reduce((x, y) => x + y, 0) * 1000) / (performance.now() - t0);
  server.kill();
  rows.push({ metric: `aggregate tok/s, ${STREAMS} streams (mlx-lm: its server)`, ours: ourAggregate, peer: theirAggregate, ratio: ourAggregate / theirAggregate });

  const what = args.model ? path.relative(ROOT, folder) : 'SmolLM2-135M-Instruct as an MLX folder (4-bit/32 from Q4_1)';
  console.log(`\n${what}, MLX ${rt.mlx.version} (${rt.mlx.gpu ? 'GPU' : 'CPU'}), median of ${RUNS}, ${N_DECODE} decoded tokens`);
  printPeerTable(rows, 'mlx-serving (mlx backend)', 'mlx-lm');
  const out = path.join(__dirname, 'results', args.model ? 'mlx-vs-mlx-lm-other.json' : 'mlx-vs-mlx-lm.json');
  mkdirSync(path.dirname(out), { recursive: true });
  writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), model: path.relative(ROOT, folder), mlx: rt.mlx, runs: RUNS, nDecode: N_DECODE, streams: STREAMS, rows }, null, 2));
  console.log(`\nwritten to ${path.relative(process.cwd(), out)}`);
  await engine.shutdown();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
