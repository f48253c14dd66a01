/**
 * Three replicas behind HAProxy with `deploy/haproxy.cfg`, real processes on
 * loopback: conversations stick to one replica by their `user`, a replica
 * killed with -9 moves only its own users and no request fails, and one
 * drained with SIGTERM finishes its stream, leaves the ring and exits 0.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { freePort, ROOT, sleep, startReplicas, type Replica } from './fleet-helpers';

const HAPROXY = ['/usr/sbin/haproxy', '/usr/bin/haproxy'].find((p) => existsSync(p));

describe('a fleet of three replicas behind HAProxy', { skip: !HAPROXY && 'HAProxy is not installed (setup.sh installs it as root)' }, () => {
  const replicas: Replica[] = [];
  let haproxy: ChildProcess;
  let base: string;

  before(async () => {
    replicas.push(...(await startReplicas('r', 3)));
    const ports = replicas.map((r) => r.port);
    const listen = await freePort();
    haproxy = spawn(HAPROXY!, ['-db', '-f', path.join(ROOT, 'deploy', 'haproxy.cfg')], {
      env: { ...process.env, LISTEN: `127.0.0.1:${listen}`, ...Object.fromEntries(ports.map((p, i) => [`REPLICA_${i + 1}`, `127.0.0.1:${p}`])) },
      stdio: 'ignore',
    });
    base = `http://127.0.0.1:${listen}`;
    // Up once every replica has passed its health checks.
    const end = Date.now() + 20_000;
    for (;;) {
      const seen = new Set<string>();
      for (let u = 0; u < 30; u++) {
        const r = await ask(`probe-${u}`).catch(() => undefined);
        if (r?.status === 200) seen.add(r.replica);
      }
      if (seen.size === 3) break;
      assert.ok(Date.now() < end, `only ${[...seen]} answered through HAProxy`);
      await sleep(200);
    }
  });

  after(async () => {
    haproxy?.kill('SIGKILL');
    for (const r of replicas) r.proc.kill('SIGKILL');
  });

  async function ask(user: string, maxTokens = 2): Promise<{ status: number; replica: string; body: any }> {
    // min_tokens: a long request really is still running when its replica is told to stop.
    const res = await fetch(`${base}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'default', user, messages: [{ role: 'user', content: `Hello from ${user}` }], max_tokens: maxTokens, min_tokens: maxTokens, temperature: 0 }),
    });
    return { status: res.status, replica: res.headers.get('x-mlx-serving-replica') ?? '', body: await res.json() };
  }

  /** Each user's replica over `turns` requests; fails if a user moved between them. */
  async function placement(users: string[], turns: number): Promise<Map<string, string>> {
    const where = new Map<string, string>();
    for (let t = 0; t < turns; t++) {
      await Promise.all(
        users.map(async (u) => {
          const r = await ask(u);
          assert.equal(r.status, 200, `${u}: ${JSON.stringify(r.body)}`);
          if (where.has(u)) assert.equal(r.replica, where.get(u), `${u} moved on turn ${t}`);
          where.set(u, r.replica);
        }),
      );
    }
    return where;
  }

  const users = Array.from({ length: 20 }, (_, i) => `user-${i}`);

  test('every user sticks to one replica, and users spread over all three', async () => {
    const where = await placement(users, 3);
    assert.equal(new Set(where.values()).size, 3, JSON.stringify([...where]));
  });

  test('kill -9 of a replica moves only its users; no request fails', async () => {
    const before = await placement(users, 1);
    const victim = replicas[0];
    victim.proc.kill('SIGKILL');
    // Right away (before the health checks notice), requests are retried elsewhere.
    const during = await placement(users, 1);
    await sleep(1500);
    const after = await placement(users, 2);
    for (const u of users) {
      assert.notEqual(after.get(u), victim.id);
      if (before.get(u) !== victim.id) {
        assert.equal(after.get(u), before.get(u), `${u} moved although its replica lived`);
        assert.equal(during.get(u), before.get(u));
      }
    }
    assert.ok([...before.values()].includes(victim.id), 'the victim had users');
  });

  test('SIGTERM drains a replica: its stream finishes, new requests go elsewhere, it exits 0', async () => {
    const live = replicas.filter((r) => r.proc.exitCode === null && r.proc.signalCode === null);
    const where = await placement(users, 1);
    const drained = live[0];
    const mine = users.filter((u) => where.get(u) === drained.id);
    assert.ok(mine.length > 0, 'the drained replica had users');
    const long = ask(mine[0], 150);
    await sleep(300);
    drained.proc.kill('SIGTERM');
    const finished = await long;
    assert.equal(finished.status, 200);
    assert.equal(finished.replica, drained.id);
    assert.equal(finished.body.usage.completion_tokens > 2, true);
    await sleep(1500);
    const after = await placement(users, 1);
    assert.ok([...after.values()].every((r) => r !== drained.id));
    assert.equal(await drained.exited, 0);
  });
});
