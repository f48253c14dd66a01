/** Real server processes on loopback, for the fleet and deploy tests. */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import * as net from 'node:net';
import * as path from 'node:path';

export const ROOT = path.join(__dirname, '..');

export async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export interface Replica {
  id: string;
  proc: ChildProcess;
  port: number;
  exited: Promise<number | null>;
}

/** `mlx-serving serve` with `args` (the default model), once it serves. */
export async function startServer(id: string, port: number, args: string[], env: NodeJS.ProcessEnv = process.env): Promise<Replica> {
  const proc = spawn(process.execPath, [path.join(ROOT, 'bin', 'mlx-serving.js'), 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env });
  let out = '';
  proc.stdout!.on('data', (d) => (out += d));
  proc.stderr!.on('data', () => {});
  const exited = new Promise<number | null>((r) => proc.on('exit', (code) => r(code)));
  const end = Date.now() + 60_000;
  while (!/serving 'default'/.test(out) && Date.now() < end && proc.exitCode === null) await sleep(50);
  assert.match(out, /serving 'default'/, `replica ${id} did not start`);
  return { id, proc, port, exited };
}

/** A replica named `id` on `port`, draining for up to 20 s on SIGTERM. */
export function startReplica(id: string, port: number): Promise<Replica> {
  return startServer(id, port, ['--port', String(port), '--replica-id', id, '--drain-timeout', '20']);
}

/** `n` replicas named `${prefix}1`.. on free ports, started together. */
export async function startReplicas(prefix: string, n: number): Promise<Replica[]> {
  const ports = await Promise.all(Array.from({ length: n }, () => freePort()));
  return Promise.all(ports.map((p, i) => startReplica(`${prefix}${i + 1}`, p)));
}
