/**
 * guidellm, a third-party load client (installed by scripts/setup.sh),
 * against `mlx-serving serve` unchanged: a short concurrent run with
 * synthetic prompts, read back from guidellm's own JSON report.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';

import { freePort, ROOT, startServer } from './fleet-helpers';

const run = promisify(execFile);

test('guidellm: 16 requests over 4 streams all complete with the lengths asked for', { timeout: 300_000 }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'guidellm-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  // guidellm counts tokens with the model's tokenizer, as a Hugging Face folder.
  const model = path.join(dir, 'model');
  await run(process.execPath, [path.join(ROOT, 'bin', 'mlx-serving.js'), 'convert', 'default', model]);
  const port = await freePort();
  const server = await startServer('guidellm', port, ['--port', String(port)]);
  t.after(() => server.proc.kill('SIGTERM'));
  const report = path.join(dir, 'report.json');
  await run('guidellm', [
    'run',
    '--backend', `kind=openai_http,target=http://127.0.0.1:${port},model=default`,
    '--profile', 'kind=concurrent,streams=4',
    '--constraint', 'kind=max_requests,count=16',
    '--tokenizer', `kind=hf_auto,model=${model}`,
    '--data', 'kind=synthetic_text,prompt_tokens=128,output_tokens=32',
    '--output', `kind=json,path=${report}`,
    '--disable-console',
  ], { cwd: dir, maxBuffer: 64 << 20, env: { ...process.env, HF_HUB_OFFLINE: '1' } });
  const bench = JSON.parse(readFileSync(report, 'utf8')).benchmarks[0];
  const state = bench.scheduler_state;
  assert.deepEqual([state.successful_requests, state.errored_requests, state.cancelled_requests], [16, 0, 0]);
  for (const r of bench.requests.successful) {
    // Its prompt (128 synthetic tokens in the chat template) and 32 tokens out, from our usage.
    assert.ok(r.prompt_tokens >= 128, JSON.stringify(r.prompt_tokens));
    assert.equal(r.output_tokens, 32);
    assert.ok(r.time_to_first_token_ms > 0 && r.output.length > 0);
  }
  const m = bench.metrics;
  console.log(
    `guidellm: ${m.requests_per_second.successful.mean.toFixed(2)} req/s, ${m.output_tokens_per_second.successful.mean.toFixed(0)} output tok/s, ` +
      `TTFT median ${m.time_to_first_token_ms.successful.median.toFixed(0)} ms`,
  );
});
