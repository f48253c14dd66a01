/**
 * The Phase 5 benchmark scripts run end to end with tiny settings (seconds):
 * exit codes and the structure of their output and JSON, never timings.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { after, describe, test } from 'node:test';

import { percentile, stats } from '../benchmarks/utils';

const ROOT = path.join(__dirname, '..');
const DIR = path.join(ROOT, 'benchmarks', 'phase5');

function run(script: string, args: string[], env: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      ['--import', 'tsx', path.join(DIR, script), ...args],
      { cwd: ROOT, env: { ...process.env, ...env }, timeout: 240_000 },
      (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

/** The JSON a script says it wrote. */
function written(stdout: string): any {
  const m = /wrote (\S+\.json)/.exec(stdout);
  assert.ok(m, `no result file in:\n${stdout}`);
  return JSON.parse(readFileSync(m[1], 'utf8'));
}

test('statistics: nearest-rank percentiles, mean, spread and interval', () => {
  const xs = [15, 20, 35, 40, 50];
  assert.equal(percentile(xs, 30), 20);
  assert.equal(percentile(xs, 40), 20);
  assert.equal(percentile(xs, 50), 35);
  assert.equal(percentile(xs, 100), 50);
  const s = stats([3, 1, 2, 4, NaN]);
  assert.equal(s.n, 4);
  assert.equal(s.mean, 2.5);
  assert.equal(s.median, 2);
  assert.equal(s.min, 1);
  assert.equal(s.max, 4);
  assert.ok(Math.abs(s.stdDev - Math.sqrt(5 / 3)) < 1e-12);
  assert.ok(s.ci95[0] < 2.5 && s.ci95[1] > 2.5);
});

describe('Phase 5 benchmark scripts', () => {
  const tmp = mkdtempSync(path.join(tmpdir(), 'mlx-serving-p5-'));
  after(() => rmSync(tmp, { recursive: true, force: true }));

  test('ttft-benchmark: baseline and Phase 5 rows, the verdict, JSON', async () => {
    const r = await run('ttft-benchmark.ts', ['--samples', '3', '--warmup', '1']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /\| Phase \| Mean \| Median \| P95 \| P99 \| Min \| Max \| StdDev \|/);
    assert.match(r.stdout, /\| baseline \|/);
    assert.match(r.stdout, /\| phase5 \|/);
    assert.match(r.stdout, /P95 improvement: .*: (PASS|FAIL)/);
    const j = written(r.stdout);
    assert.deepEqual(j.phases.map((p: any) => p.phase), ['baseline', 'phase5']);
    assert.equal(j.phases[1].stats.n + j.phases[1].errors, 3);
    for (const k of ['mean', 'median', 'p95', 'p99', 'min', 'max', 'stdDev', 'ci95']) assert.ok(k in j.phases[0].stats, k);
  });

  test('ttft-benchmark-quick takes its settings from the environment', async () => {
    const r = await run('ttft-benchmark-quick.ts', [], { TTFT_SAMPLES: '2', TTFT_WARMUP: '0' });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(written(r.stdout).options.samples, 2);
  });

  test('throughput benchmarks: the table and JSON per phase', async () => {
    for (const script of ['throughput-benchmark.ts', 'throughput-benchmark-quick.ts']) {
      const r = await run(script, ['--duration', '1', '--rate', '4', '--max-tokens', '4']);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /\| Phase \| Target req\/s \| Avg Req\/s \| Peak Concurrent \| Avg latency \| P95 latency \|/);
      const j = written(r.stdout);
      assert.deepEqual(j.rows.map((x: any) => x.phase), ['baseline', 'phase5']);
      for (const k of ['avgReqPerS', 'peakConcurrent', 'p95LatencyMs', 'errorRate', 'avgCpuPct', 'peakRssMiB']) assert.ok(k in j.rows[0], k);
    }
  });

  test('stress-test: levels with status and the sustainable-throughput line', async () => {
    const r = await run('stress-test.ts', ['--start', '2', '--factor', '2', '--levels', '2', '--level-duration', '1', '--max-tokens', '4']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /\| Level \| Req\/s \(target\) \| Req\/s \| Requests \| Errors \| P95 latency \| Peak concurrency \| CPU % \| Memory \| Status \|/);
    assert.match(r.stdout, /Maximum sustainable throughput: /);
    const j = written(r.stdout);
    assert.ok(j.levels.length >= 1 && j.levels.every((l: any) => l.status === 'ok' || l.failureMode));
  });

  test('regression-check: exit 1 on a regression, 0 otherwise, and --update-baseline', async () => {
    const current = path.join(tmp, 'current.json');
    const metrics = { ttftP50Ms: 100, ttftP95Ms: 200, ttftP99Ms: 300, ttftMeanMs: 120, throughputTokPerS: 100 };
    writeFileSync(current, JSON.stringify({ metrics }));
    const baseline = path.join(tmp, 'baseline.json');
    // A baseline this run must fail against: TTFT P95 20% better than now.
    writeFileSync(baseline, JSON.stringify({ metrics: { ...metrics, ttftP95Ms: 160 } }));
    const bad = await run('regression-check.ts', ['--baseline', baseline, '--current', current]);
    assert.equal(bad.code, 1, bad.stdout + bad.stderr);
    assert.match(bad.stdout, /ttftP95Ms .*REGRESSION/);
    // Within tolerance, and improvements, pass.
    writeFileSync(baseline, JSON.stringify({ metrics: { ...metrics, ttftP95Ms: 190, throughputTokPerS: 80 } }));
    const ok = await run('regression-check.ts', ['--baseline', baseline, '--current', current]);
    assert.equal(ok.code, 0, ok.stdout + ok.stderr);
    assert.match(ok.stdout, /PASS: no regression/);
    const fresh = path.join(tmp, 'fresh.json');
    const up = await run('regression-check.ts', ['--baseline', fresh, '--current', current, '--update-baseline']);
    assert.equal(up.code, 0, up.stderr);
    assert.deepEqual(JSON.parse(readFileSync(fresh, 'utf8')).metrics, metrics);
    // The committed baseline parses and has every metric.
    const committed = JSON.parse(readFileSync(path.join(DIR, 'baseline.json'), 'utf8')).metrics;
    for (const k of Object.keys(metrics)) assert.ok(Number.isFinite(committed[k]), k);
  });
});
