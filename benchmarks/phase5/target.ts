/**
 * What the Phase 5 scripts drive: the engine in this process, once with the
 * Phase 5 feature flags off (baseline) and once on, or a running server over
 * HTTP (`--http URL`, one phase: whatever that server's flags say), and the
 * chat workload they send.
 */
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';

import { createEngine, defaultConfigPath, type Engine } from '../../lib/index';
import type { BenchRequest, RequestResult, Target } from '../types';

/** Flags for a phase: the committed file's features, with the global switch off or on. */
function flagsFile(enabled: boolean): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'mlx-serving-phase5-'));
  const file = path.join(dir, 'feature-flags.yaml');
  writeFileSync(
    file,
    `phase5: {enabled: ${enabled}, rollout_percentage: 100, hash_seed: "bench"}\n` +
      'features:\n' +
      '  ttft_pipeline: {enabled: true, rollout_percentage: 100, hash_seed: "ttft", kv_prefetch: true, warmup: true, speculative: false}\n' +
      '  qos_policy: {enabled: false, rollout_percentage: 0, hash_seed: "qos", dry_run: true}\n',
  );
  return file;
}

function engineTarget(name: 'baseline' | 'phase5', engine: Engine, model: string): Target {
  return {
    name,
    async request(req: BenchRequest): Promise<RequestResult> {
      const t0 = performance.now();
      let ttftMs = NaN;
      let tokens = 0;
      try {
        for await (const c of engine.createGenerator(
          { model, messages: req.messages, maxTokens: req.maxTokens },
          { requestId: req.requestId, timeoutMs: req.timeoutMs },
        )) {
          if (c.type === 'token' && c.logprob !== undefined) {
            if (tokens++ === 0) ttftMs = performance.now() - t0;
          } else if (c.type === 'error') {
            return { ok: false, ttftMs, latencyMs: performance.now() - t0, tokens, error: c.error.code };
          }
        }
        return { ok: true, ttftMs, latencyMs: performance.now() - t0, tokens };
      } catch (e) {
        return { ok: false, ttftMs, latencyMs: performance.now() - t0, tokens, error: (e as { code?: string }).code ?? 'Error' };
      }
    },
    close: () => engine.shutdown(),
  };
}

function httpTarget(base: string, model: string): Target {
  return {
    name: 'server',
    async request(req: BenchRequest): Promise<RequestResult> {
      const t0 = performance.now();
      let ttftMs = NaN;
      let tokens = 0;
      try {
        const res = await fetch(`${base.replace(/\/$/, '')}/v1/chat/completions`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', ...(process.env.API_KEY ? { authorization: `Bearer ${process.env.API_KEY}` } : {}) },
          body: JSON.stringify({ model, messages: req.messages, max_tokens: req.maxTokens, temperature: 0, stream: true, user: req.requestId }),
          signal: AbortSignal.timeout(req.timeoutMs),
        });
        if (!res.ok || !res.body) return { ok: false, ttftMs, latencyMs: performance.now() - t0, tokens, error: `HTTP ${res.status}` };
        const decoder = new TextDecoder();
        let buf = '';
        for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
          buf += decoder.decode(chunk, { stream: true });
          let nl;
          while ((nl = buf.indexOf('\n')) >= 0) {
            const line = buf.slice(0, nl).trim();
            buf = buf.slice(nl + 1);
            if (!line.startsWith('data:') || line === 'data: [DONE]') continue;
            const ev = JSON.parse(line.slice(5));
            if (ev.error) return { ok: false, ttftMs, latencyMs: performance.now() - t0, tokens, error: ev.error.code ?? 'error' };
            if (ev.choices?.[0]?.delta?.content) {
              if (tokens++ === 0) ttftMs = performance.now() - t0;
            }
          }
        }
        return { ok: true, ttftMs, latencyMs: performance.now() - t0, tokens };
      } catch (e) {
        const name = (e as Error).name;
        return { ok: false, ttftMs, latencyMs: performance.now() - t0, tokens, error: name === 'TimeoutError' ? 'Timeout' : 'ConnectionError' };
      }
    },
    close: async () => {},
  };
}

export interface TargetOptions {
  http?: string;
  model: string;
  /** Model id for HTTP requests (the server's model id). */
  modelId?: string;
}

/** The targets of a run, in order: baseline then Phase 5 in process, or the server. */
export async function openTargets(opts: TargetOptions, phases: ('baseline' | 'phase5')[] = ['baseline', 'phase5']): Promise<Target[]> {
  if (opts.http) return [httpTarget(opts.http, opts.modelId ?? 'default')];
  const out: Target[] = [];
  for (const phase of phases) {
    const engine = await createEngine({ configPath: defaultConfigPath(), featureFlagsPath: flagsFile(phase === 'phase5') });
    const h = await engine.loadModel({ model: opts.model, modelId: 'bench' });
    out.push(engineTarget(phase, engine, h.id));
  }
  return out;
}

/** System prompts of a few assistants (every chat product has one) and user questions. */
const SYSTEMS = [
  'You are the support assistant of Northwind Books, an online bookshop. Be brief and polite. Orders ship within two working days; returns are free within 30 days with the order number; damaged items are replaced at no cost. Never invent order details; ask for the order number when it is missing. ',
  'You are a coding helper for a TypeScript team. Answer with short explanations and small code samples. Prefer the standard library, explain trade-offs in one sentence, and point out security issues such as injection or unvalidated input whenever you see them. ',
  'You are a travel planner. Suggest itineraries with times, transport between stops and a rough budget. Mention opening hours when they matter, keep each day realistic, and offer one rainy-day alternative per city. ',
  'You are a cooking assistant. Give recipes with quantities in grams, steps numbered, and total time. Offer substitutions for common allergies (nuts, gluten, dairy) and say how to store leftovers safely. ',
];
const QUESTIONS = [
  'Where is my order?',
  'How do I return a damaged book?',
  'Explain async iterators.',
  'How should I validate user input?',
  'Plan a day in Lisbon.',
  'What can I do in Kyoto when it rains?',
  'A quick pasta for two?',
  'How long do cooked lentils keep?',
  'Do you ship abroad?',
  'What is a discriminated union?',
  'Two days in Vienna on a budget?',
  'A dairy-free pancake recipe?',
];

/** The `i`-th request of the workload: one of the system prompts and a question. */
export function chatRequest(i: number, rand: () => number, maxTokens: number, timeoutMs: number, runTag: string): BenchRequest {
  const system = SYSTEMS[Math.floor(rand() * SYSTEMS.length)];
  const question = QUESTIONS[Math.floor(rand() * QUESTIONS.length)];
  return {
    messages: [
      { role: 'system', content: system },
      { role: 'user', content: question },
    ],
    maxTokens,
    requestId: `${runTag}-${i}`,
    timeoutMs,
  };
}

/** The guide's targets were set for Apple Silicon and 2B-27B models; printed beside ours, never tuned for. */
export const GUIDE_TARGETS = {
  ttftP95Ms: 550,
  ttftP95StretchMs: 400,
  ttftImprovementPct: 10,
};
