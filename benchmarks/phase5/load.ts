/**
 * Open-loop load: requests arrive as a Poisson process at a target rate for
 * a duration, whatever happens to earlier ones, with at most `maxConcurrent`
 * in flight (arrivals beyond it count as errors: the client would be refused).
 */
import type { RequestResult, Target, ThroughputResult } from '../types';
import { mean, percentile, poissonGapMs, progress, progressDone, ResourceMonitor, rng } from '../utils';
import { chatRequest } from './target';

export interface LoadOptions {
  rate: number;
  durationS: number;
  maxConcurrent: number;
  maxTokens: number;
  timeoutMs: number;
  seed: number;
}

export async function runLoad(target: Target, o: LoadOptions, tag: string): Promise<ThroughputResult & { timeouts: number; peakCpuPct: number; peakSystemMemPct: number; crashed: boolean }> {
  const rand = rng(o.seed);
  const monitor = new ResourceMonitor().start();
  const results: RequestResult[] = [];
  const inFlight = new Set<Promise<void>>();
  let peak = 0;
  const t0 = performance.now();
  let next = 0;
  for (let i = 0; ; i++) {
    next += poissonGapMs(rand, o.rate);
    if (next > o.durationS * 1000) break;
    const wait = t0 + next - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    if (inFlight.size >= o.maxConcurrent) {
      results.push({ ok: false, ttftMs: NaN, latencyMs: 0, tokens: 0, error: 'ClientConcurrencyCap' });
      continue;
    }
    const p: Promise<void> = target.request(chatRequest(i, rand, o.maxTokens, o.timeoutMs, tag)).then((r) => {
      results.push(r);
      inFlight.delete(p);
    });
    inFlight.add(p);
    peak = Math.max(peak, inFlight.size);
    progress(`[${tag}] ${((performance.now() - t0) / 1000).toFixed(0)}/${o.durationS} s, ${inFlight.size} in flight, ${results.length} done`);
  }
  await Promise.all(inFlight);
  progressDone();
  const wallS = (performance.now() - t0) / 1000;
  const res = monitor.stop();
  const ok = results.filter((r) => r.ok);
  const lat = ok.map((r) => r.latencyMs).sort((a, b) => a - b);
  return {
    phase: target.name,
    targetRate: o.rate,
    durationS: wallS,
    requests: results.length,
    completed: ok.length,
    errors: results.length - ok.length,
    errorRate: results.length ? (results.length - ok.length) / results.length : 0,
    avgReqPerS: ok.length / wallS,
    peakConcurrent: peak,
    avgLatencyMs: mean(lat),
    p95LatencyMs: percentile(lat, 95),
    outputTokPerS: ok.reduce((a, r) => a + r.tokens, 0) / wallS,
    avgCpuPct: res.avgCpuPct,
    peakRssMiB: res.peakRssMiB,
    timeouts: results.filter((r) => r.error === 'Timeout').length,
    peakCpuPct: res.peakCpuPct,
    peakSystemMemPct: res.peakSystemMemPct,
    crashed: results.some((r) => r.error === 'ConnectionError' || r.error === 'InternalError'),
  };
}
