/**
 * Serving many users at once against llama.cpp (node-llama-cpp), same GGUF
 * file, same thread count, same process, in one run:
 *
 * 1. Bursts of N concurrent streams (default 16 and 64) of 64 output tokens:
 *    aggregate output tok/s, TTFT P50/P95 and ITL P95. node-llama-cpp runs one
 *    context with N sequences, which it batches itself.
 * 2. Open-loop Poisson arrivals at a fixed request rate: request throughput,
 *    TTFT P50/P95, ITL P95, errors. Requests wait for a free sequence in
 *    node-llama-cpp; ours queue in the engine.
 * 3. Prefix caching (ours only): TTFT of a ~1,000-token system prompt cold,
 *    then with the prefix cached (a different question each time).
 *
 *   npx tsx benchmarks/serving-vs-llama-cpp.ts [--streams 16,64] [--tokens 64]
 *       [--rate 4] [--duration 20] [--threads 2] [--skip-llama-cpp]
 *       [--llama-cpp-cpu haswell]
 *
 * Percentiles are nearest-rank. Greedy, end-of-generation ignored, so both
 * engines produce the same number of tokens.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

import { createEngine, defaultModelPath, type Engine } from '../lib/index';
import { loadLlamaCpp } from './utils';

const { values: args } = parseArgs({
  options: {
    model: { type: 'string', default: defaultModelPath() },
    streams: { type: 'string', default: '16,64' },
    tokens: { type: 'string', default: '64' },
    rate: { type: 'string', default: '4' },
    duration: { type: 'string', default: '20' },
    threads: { type: 'string', default: String(Math.min(cpus().length, Number(process.env.RAYON_NUM_THREADS ?? 1e9))) },
    'skip-llama-cpp': { type: 'boolean', default: false },
    'llama-cpp-cpu': { type: 'string' },
  },
});
const LEVELS = args.streams!.split(',').map(Number);
const N_TOKENS = Number(args.tokens);
const RATE = Number(args.rate);
const DURATION_S = Number(args.duration);
const THREADS = Number(args.threads);

function pct(xs: number[], p: number): number {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.max(1, Math.ceil((p / 100) * s.length)) - 1];
}

/** Per-request timings: submit to first token, and the gaps between tokens. */
interface Timing {
  ttftMs: number;
  itlMs: number[];
  tokens: number;
  ok: boolean;
}

interface Row {
  engine: string;
  scenario: string;
  requests: number;
  errors: number;
  wallS: number;
  aggTokPerS: number;
  reqPerS: number;
  ttftP50: number;
  ttftP95: number;
  itlP95: number;
}

function summarize(engine: string, scenario: string, timings: Timing[], wallS: number): Row {
  const ok = timings.filter((t) => t.ok);
  const tokens = ok.reduce((a, t) => a + t.tokens, 0);
  return {
    engine,
    scenario,
    requests: timings.length,
    errors: timings.length - ok.length,
    wallS,
    aggTokPerS: tokens / wallS,
    reqPerS: ok.length / wallS,
    ttftP50: pct(ok.map((t) => t.ttftMs), 50),
    ttftP95: pct(ok.map((t) => t.ttftMs), 95),
    itlP95: pct(ok.flatMap((t) => t.itlMs), 95),
  };
}

const prompt = (i: number) => `Request ${i}: write a short story about a lighthouse keeper and a storm.`;

type Runner = (i: number) => Promise<Timing>;

function oursRunner(engine: Engine): Runner {
  return async (i) => {
    const t0 = performance.now();
    let last = t0;
    const t: Timing = { ttftMs: NaN, itlMs: [], tokens: 0, ok: false };
    for await (const c of engine.createGenerator({ model: 'bench', prompt: prompt(i), maxTokens: N_TOKENS, ignoreEos: true })) {
      if (c.type === 'token' && c.logprob !== undefined) {
        const now = performance.now();
        if (t.tokens === 0) t.ttftMs = now - t0;
        else t.itlMs.push(now - last);
        last = now;
        t.tokens++;
      }
      if (c.type === 'metadata') t.ok = true;
    }
    return t;
  };
}

/** One node-llama-cpp context of `nSeq` sequences; requests wait for a free one. */
async function llamaCppRunner(lcModel: any, nSeq: number): Promise<{ run: Runner; dispose: () => Promise<void> }> {
  const ctx = await lcModel.createContext({ contextSize: nSeq * 160, sequences: nSeq, threads: THREADS, flashAttention: false });
  const free: any[] = [];
  const waiters: ((s: any) => void)[] = [];
  const acquire = async () => {
    if (free.length) return free.pop();
    if (ctx.sequencesLeft > 0) return ctx.getSequence();
    return new Promise<any>((r) => waiters.push(r));
  };
  const releases = new Set<Promise<void>>();
  const release = (s: any) => {
    const p: Promise<void> = s.clearHistory().then(() => {
      releases.delete(p);
      const w = waiters.shift();
      if (w) w(s);
      else free.push(s);
    });
    releases.add(p);
  };
  return {
    run: async (i) => {
      const t0 = performance.now();
      let last = t0;
      const t: Timing = { ttftMs: NaN, itlMs: [], tokens: 0, ok: false };
      const seq = await acquire();
      try {
        const tokens = lcModel.tokenize(prompt(i));
        // End-of-generation tokens are yielded and generation goes on, like our ignoreEos.
        for await (const _tok of seq.evaluate(tokens, { temperature: 0, yieldEogToken: true })) {
          const now = performance.now();
          if (t.tokens === 0) t.ttftMs = now - t0;
          else t.itlMs.push(now - last);
          last = now;
          if (++t.tokens >= N_TOKENS) break;
        }
        t.ok = t.tokens === N_TOKENS;
      } finally {
        release(seq);
      }
      return t;
    },
    dispose: async () => {
      while (releases.size) await Promise.all([...releases]);
      await ctx.dispose();
    },
  };
}

async function burst(run: Runner, n: number): Promise<[Timing[], number]> {
  const t0 = performance.now();
  const timings = await Promise.all(Array.from({ length: n }, (_, i) => run(i)));
  return [timings, (performance.now() - t0) / 1000];
}

/** Open loop: arrivals at exponential gaps, regardless of completions. */
async function poisson(run: Runner, seed: number): Promise<[Timing[], number]> {
  let s = seed;
  const rand = () => ((s = (s * 1103515245 + 12345) % 2 ** 31) + 1) / (2 ** 31 + 1);
  const pending: Promise<Timing>[] = [];
  const t0 = performance.now();
  let at = 0;
  for (let i = 0; ; i++) {
    at += (-Math.log(rand()) / RATE) * 1000;
    if (at > DURATION_S * 1000) break;
    const wait = t0 + at - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    pending.push(run(i).catch(() => ({ ttftMs: NaN, itlMs: [], tokens: 0, ok: false })));
  }
  const timings = await Promise.all(pending);
  return [timings, (performance.now() - t0) / 1000];
}

async function prefixCache(engine: Engine): Promise<{ promptTokens: number; coldMs: number; hitMs: number }> {
  const ttft = async (system: string, question: string) => {
    const messages = [
      { role: 'system', content: system },
      { role: 'user', content: question },
    ];
    for await (const c of engine.createGenerator({ model: 'bench', messages, maxTokens: 1 })) {
      if (c.type === 'metadata') return { ms: c.stats.timeToFirstToken, n: c.stats.promptTokens };
    }
    throw new Error('no metadata');
  };
  const colds: number[] = [];
  const hits: number[] = [];
  let n = 0;
  for (let r = 0; r < 3; r++) {
    // A fresh system prompt each round: the first request is cold, the next ones hit.
    const system = `Policy revision ${r}. ` + 'You are a careful support agent for a large online bookshop. Answer politely, cite the order number, never invent facts. '.repeat(40);
    const cold = await ttft(system, 'Where is my order?');
    colds.push(cold.ms);
    n = cold.n;
    hits.push((await ttft(system, 'Can I return a damaged book?')).ms);
    hits.push((await ttft(system, 'Do you ship abroad?')).ms);
  }
  return { promptTokens: n, coldMs: pct(colds, 50), hitMs: pct(hits, 50) };
}

async function main(): Promise<void> {
  process.env.RAYON_NUM_THREADS ??= String(THREADS);
  const maxLevel = Math.max(...LEVELS);
  // Batch as many streams as the largest burst, so both engines run them all at once.
  const { mkdtempSync } = await import('node:fs');
  const { tmpdir } = await import('node:os');
  const dir = mkdtempSync(path.join(tmpdir(), 'mlx-serving-bench-'));
  const configPath = path.join(dir, 'runtime.yaml');
  writeFileSync(configPath, `streaming:\n  maxConcurrentStreams: ${Math.max(256, maxLevel)}\nbatching:\n  maxBatchSize: ${maxLevel}\n`);
  const engine = await createEngine({ configPath });
  await engine.loadModel({ model: args.model!, modelId: 'bench' });
  await engine.warmupModel('bench');

  let lcModel: any;
  let peerCpu = 'not run';
  if (!args['skip-llama-cpp']) {
    const { llama, cpu } = await loadLlamaCpp(args['llama-cpp-cpu']);
    peerCpu = cpu;
    lcModel = await llama.loadModel({ modelPath: args.model! });
  }

  const rows: Row[] = [];
  const log = (r: Row) => {
    rows.push(r);
    console.error(`[bench] ${r.engine} ${r.scenario}: ${r.aggTokPerS.toFixed(1)} tok/s, TTFT p95 ${r.ttftP95.toFixed(0)} ms, ITL p95 ${r.itlP95.toFixed(1)} ms, errors ${r.errors}`);
  };
  const ours = oursRunner(engine);
  for (const n of LEVELS) {
    const [t, s] = await burst(ours, n);
    log(summarize('mlx-serving', `${n} streams`, t, s));
    if (lcModel) {
      const lc = await llamaCppRunner(lcModel, n);
      await lc.run(0); // warm the context
      const [t2, s2] = await burst(lc.run, n);
      log(summarize('node-llama-cpp', `${n} streams`, t2, s2));
      await lc.dispose();
    }
  }
  const poissonName = `Poisson ${RATE} req/s, ${DURATION_S} s`;
  {
    const [t, s] = await poisson(ours, 7);
    log(summarize('mlx-serving', poissonName, t, s));
  }
  if (lcModel) {
    const lc = await llamaCppRunner(lcModel, 16);
    await lc.run(0);
    const [t, s] = await poisson(lc.run, 7);
    log(summarize('node-llama-cpp', poissonName + ' (16 sequences)', t, s));
    await lc.dispose();
  }
  const pc = await prefixCache(engine);

  console.log(`\n${N_TOKENS} output tokens per request, ${THREADS} threads, ${path.basename(args.model!)}, ours ${(await engine.getRuntimeInfo()).isa}, node-llama-cpp ${peerCpu}`);
  console.log('| scenario | engine | requests | errors | aggregate tok/s | req/s | TTFT P50 ms | TTFT P95 ms | ITL P95 ms |');
  console.log('| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |');
  for (const r of rows) {
    console.log(
      `| ${r.scenario} | ${r.engine} | ${r.requests} | ${r.errors} | ${r.aggTokPerS.toFixed(1)} | ${r.reqPerS.toFixed(2)} | ${r.ttftP50.toFixed(0)} | ${r.ttftP95.toFixed(0)} | ${r.itlP95.toFixed(1)} |`,
    );
  }
  console.log('\nRatios (mlx-serving / node-llama-cpp; throughput > 1 and TTFT < 1 favour mlx-serving):');
  for (const r of rows.filter((x) => x.engine === 'mlx-serving')) {
    const peer = rows.find((x) => x.engine === 'node-llama-cpp' && x.scenario.startsWith(r.scenario));
    if (!peer) continue;
    console.log(
      `  ${r.scenario}: throughput ${(r.aggTokPerS / peer.aggTokPerS).toFixed(2)}x, TTFT P95 ${(r.ttftP95 / peer.ttftP95).toFixed(2)}x, ITL P95 ${(r.itlP95 / peer.itlP95).toFixed(2)}x`,
    );
  }
  console.log(
    `\nPrefix cache: ${pc.promptTokens}-token prompt, TTFT cold ${pc.coldMs.toFixed(0)} ms, cached prefix ${pc.hitMs.toFixed(0)} ms (${(pc.coldMs / pc.hitMs).toFixed(1)}x faster)`,
  );
  const m = engine.getMetrics();
  console.log(`Engine: ${m.preemptions} preemptions, prefix-cache hit rate ${(m.prefixCache.hitRate * 100).toFixed(1)}% of prompt tokens`);

  const out = path.join(__dirname, 'results', 'serving-vs-llama-cpp.json');
  mkdirSync(path.dirname(out), { recursive: true });
  writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), threads: THREADS, tokensPerRequest: N_TOKENS, rows, prefixCache: pc }, null, 2));
  await engine.shutdown();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
