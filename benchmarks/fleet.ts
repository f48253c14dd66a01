/**
 * Replicas behind HAProxy (`deploy/haproxy.cfg`): the fleet's prefix-cache
 * hit rate and TTFT for growing chats, hashing on the `user` field against
 * round-robin, and the proxy's added latency against going to a replica
 * directly. The replicas share this machine's cores, so the point is cache
 * affinity and routing overhead, not speedup.
 *
 *   npx tsx benchmarks/fleet.ts [--replicas 3] [--users 12] [--turns 4]
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

const ROOT = path.join(__dirname, '..');
const { values } = parseArgs({ options: { replicas: { type: 'string', default: '3' }, users: { type: 'string', default: '12' }, turns: { type: 'string', default: '4' } } });
const [N, USERS, TURNS] = [Number(values.replicas), Number(values.users), Number(values.turns)];
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

async function replica(port: number, id: string): Promise<ChildProcess> {
  const p = spawn(process.execPath, [path.join(ROOT, 'bin', 'mlx-serving.js'), 'serve', '--port', String(port), '--replica-id', id], { stdio: ['ignore', 'pipe', 'ignore'] });
  let out = '';
  p.stdout!.on('data', (d) => (out += d));
  while (!/serving 'default'/.test(out)) await sleep(50);
  return p;
}

/** Time to the first content chunk of a streamed chat, and the reply. */
async function turn(base: string, user: string, messages: { role: string; content: string }[]): Promise<{ ttft: number; reply: string }> {
  const t0 = performance.now();
  const res = await fetch(`${base}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'default', user, messages, max_tokens: 16, temperature: 0, stream: true }),
  });
  if (res.status !== 200) throw new Error(`${user}: HTTP ${res.status}`);
  let ttft = 0;
  let reply = '';
  const decoder = new TextDecoder();
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    for (const line of decoder.decode(chunk).split('\n')) {
      if (!line.startsWith('data: {')) continue;
      const c = JSON.parse(line.slice(6)).choices?.[0]?.delta?.content;
      if (c) {
        ttft ||= performance.now() - t0;
        reply += c;
      }
    }
  }
  return { ttft, reply };
}

/** Growing chats: each user's turns repeat the whole history, as chat clients send it. */
async function conversations(base: string): Promise<number[]> {
  const ttfts: number[] = [];
  const histories = Array.from({ length: USERS }, (_, u) => [
    { role: 'system', content: `You are assistant number ${u}. ${'Answer briefly and precisely. '.repeat(12)}` },
  ]);
  for (let t = 0; t < TURNS; t++) {
    await Promise.all(
      histories.map(async (h, u) => {
        h.push({ role: 'user', content: `Question ${t} from user ${u}: name a color and a number.` });
        const r = await turn(base, `user-${u}`, h);
        ttfts.push(r.ttft);
        h.push({ role: 'assistant', content: r.reply });
      }),
    );
  }
  return ttfts;
}

async function hitRate(ports: number[]): Promise<{ hits: number; queries: number }> {
  let hits = 0;
  let queries = 0;
  for (const p of ports) {
    const m = await (await fetch(`http://127.0.0.1:${p}/metrics`)).text();
    hits += Number(/^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)$/m.exec(m)![1]);
    queries += Number(/^vllm:prefix_cache_queries_total\{[^}]*\} (\S+)$/m.exec(m)![1]);
  }
  return { hits, queries };
}

const pct = (v: number[], q: number) => [...v].sort((a, b) => a - b)[Math.min(v.length - 1, Math.ceil(q * v.length) - 1)];

async function fleet(balance: 'hash' | 'roundrobin'): Promise<string> {
  const ports = await Promise.all(Array.from({ length: N }, () => freePort()));
  const procs = await Promise.all(ports.map((p, i) => replica(p, `r${i + 1}`)));
  const dir = mkdtempSync(path.join(tmpdir(), 'fleet-'));
  let cfg = readFileSync(path.join(ROOT, 'deploy', 'haproxy.cfg'), 'utf8');
  const servers = ports.map((p, i) => `    server r${i + 1} 127.0.0.1:${p} check`).join('\n');
  cfg = cfg.replace(/    server r1[\s\S]*$/, `${servers}\n`);
  if (balance === 'roundrobin') cfg = cfg.replace(/    balance hash var\(txn.key\)\n    hash-type consistent\n/, '    balance roundrobin\n');
  writeFileSync(path.join(dir, 'haproxy.cfg'), cfg);
  const listen = await freePort();
  const proxy = spawn('haproxy', ['-db', '-f', path.join(dir, 'haproxy.cfg')], { env: { ...process.env, LISTEN: `127.0.0.1:${listen}` }, stdio: 'ignore' });
  const base = `http://127.0.0.1:${listen}`;
  try {
    for (;;) {
      if ((await fetch(`${base}/health`).catch(() => undefined))?.status === 200) break;
      await sleep(100);
    }
    await sleep(1500); // every server through its first health checks
    const before = await hitRate(ports);
    const t0 = performance.now();
    const ttfts = await conversations(base);
    const secs = (performance.now() - t0) / 1000;
    const after = await hitRate(ports);
    const rate = (after.hits - before.hits) / Math.max(1, after.queries - before.queries);
    return `| ${balance} | ${N} | ${(ttfts.length / secs).toFixed(2)} | ${(100 * rate).toFixed(1)}% | ${pct(ttfts, 0.5).toFixed(0)} | ${pct(ttfts, 0.95).toFixed(0)} |`;
  } finally {
    proxy.kill('SIGKILL');
    procs.forEach((p) => p.kill('SIGKILL'));
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The proxy's added latency: one-token requests, through HAProxy and straight to the replica. */
async function overhead(): Promise<string> {
  const port = await freePort();
  const p = await replica(port, 'solo');
  const dir = mkdtempSync(path.join(tmpdir(), 'fleet-'));
  const cfg = readFileSync(path.join(ROOT, 'deploy', 'haproxy.cfg'), 'utf8').replace(/    server r1[\s\S]*$/, `    server r1 127.0.0.1:${port} check\n`);
  writeFileSync(path.join(dir, 'haproxy.cfg'), cfg);
  const listen = await freePort();
  const proxy = spawn('haproxy', ['-db', '-f', path.join(dir, 'haproxy.cfg')], { env: { ...process.env, LISTEN: `127.0.0.1:${listen}` }, stdio: 'ignore' });
  try {
    await sleep(1500);
    const time = async (base: string) => {
      const v: number[] = [];
      for (let i = 0; i < 40; i++) {
        const t0 = performance.now();
        await (await fetch(`${base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'default', prompt: 'Hi', max_tokens: 1, user: 'u' }) })).json();
        v.push(performance.now() - t0);
      }
      return pct(v.slice(5), 0.5);
    };
    const direct = await time(`http://127.0.0.1:${port}`);
    const proxied = await time(`http://127.0.0.1:${listen}`);
    return `one-token request, median: ${direct.toFixed(2)} ms direct, ${proxied.toFixed(2)} ms through HAProxy (+${(proxied - direct).toFixed(2)} ms)`;
  } finally {
    proxy.kill('SIGKILL');
    p.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
}

(async () => {
  console.log(`${USERS} users x ${TURNS} turns of a growing chat (16 tokens a reply), ${N} replicas on this machine`);
  console.log('| balance | replicas | requests/s | fleet prefix-cache hit rate | TTFT P50 ms | TTFT P95 ms |');
  console.log('| --- | ---: | ---: | ---: | ---: | ---: |');
  console.log(await fleet('hash'));
  console.log(await fleet('roundrobin'));
  console.log(await overhead());
  process.exit(0);
})();
