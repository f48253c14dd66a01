/**
 * deploy/: the Kubernetes manifests against the Kubernetes schemas
 * (kubernetes-validate, offline: no cluster here), the facts the files must
 * agree on (ports, probes, the drain inside the grace period, the metric the
 * autoscaler reads), the container's own command run for real, and nginx
 * with deploy/nginx.conf in front of real replicas.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { freePort, ROOT, sleep, startReplicas, startServer, type Replica } from './fleet-helpers';

const K8S = path.join(ROOT, 'deploy', 'k8s');
const NGINX = ['/usr/sbin/nginx', '/usr/bin/nginx'].find((p) => existsSync(p));
const HAVE_VALIDATE = spawnSync('python3', ['-c', 'import kubernetes_validate, yaml'], { stdio: 'ignore' }).status === 0;
const NO_VALIDATE = !HAVE_VALIDATE && 'kubernetes-validate is not installed (setup.sh installs it)';

/** Every document of the manifests, parsed (PyYAML comes with kubernetes-validate). */
function manifests(): any[] {
  const files = readdirSync(K8S).filter((f) => f.endsWith('.yaml')).map((f) => path.join(K8S, f));
  const py = 'import json, sys, yaml; print(json.dumps([d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]))';
  return JSON.parse(execFileSync('python3', ['-c', py, ...files], { encoding: 'utf8' }));
}

function validate(files: string[]): { ok: boolean; out: string } {
  const r = spawnSync('python3', ['-m', 'kubernetes_validate', '--strict', '--quiet', ...files], { encoding: 'utf8' });
  return { ok: r.status === 0, out: r.stdout + r.stderr };
}

/** deploy/Dockerfile, its runtime stage, and that stage's ENTRYPOINT (JSON form). */
function dockerfile(): { text: string; runtime: string; entrypoint: string[] } {
  const text = readFileSync(path.join(ROOT, 'deploy', 'Dockerfile'), 'utf8').replace(/\\\n/g, ' ');
  const runtime = text.slice(text.lastIndexOf('\nFROM '));
  const entrypoint = JSON.parse(/^ENTRYPOINT (\[.*\])$/m.exec(runtime)![1]);
  return { text, runtime, entrypoint };
}

describe('the Kubernetes manifests and the Dockerfile', { skip: NO_VALIDATE }, () => {
  test('every manifest passes strict schema validation, and a broken one does not', () => {
    const files = readdirSync(K8S).filter((f) => f.endsWith('.yaml')).map((f) => path.join(K8S, f));
    assert.ok(files.length >= 4, files.join());
    const good = validate(files);
    assert.ok(good.ok, good.out);
    // The check can fail: a misspelt field and a probe port of the wrong type.
    const dir = mkdtempSync(path.join(tmpdir(), 'mlx-serving-k8s-'));
    try {
      const bad = path.join(dir, 'deployment.yaml');
      writeFileSync(bad, readFileSync(path.join(K8S, 'deployment.yaml'), 'utf8').replace('terminationGracePeriodSeconds', 'terminationGracePeriod'));
      assert.equal(validate([bad]).ok, false);
      writeFileSync(bad, readFileSync(path.join(K8S, 'deployment.yaml'), 'utf8').replace('failureThreshold: 90', 'failureThreshold: ninety'));
      assert.equal(validate([bad]).ok, false);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('the files agree: ports, probes, labels, the drain inside the grace period, the autoscaled metric', () => {
    const docs = manifests();
    const deploy = docs.find((d) => d.kind === 'Deployment');
    const pod = deploy.spec.template.spec;
    const c = pod.containers[0];
    const { runtime, entrypoint } = dockerfile();
    const flag = (name: string) => Number(entrypoint[entrypoint.indexOf(name) + 1]);

    // The port the image serves on is the one the pod declares and the probes use.
    assert.equal(c.ports[0].containerPort, flag('--port'));
    assert.match(runtime, new RegExp(`EXPOSE ${flag('--port')}\\b`));
    assert.equal(c.readinessProbe.httpGet.path, '/health');
    assert.equal(c.livenessProbe.httpGet.path, '/live');
    for (const p of [c.readinessProbe, c.livenessProbe, c.startupProbe]) assert.equal(p.httpGet.port, c.ports[0].name);

    // preStop, then SIGTERM and the drain: all inside the grace period.
    const preStop = Number(c.lifecycle.preStop.exec.command[1]);
    assert.ok(pod.terminationGracePeriodSeconds > preStop + flag('--drain-timeout'), `${pod.terminationGracePeriodSeconds} <= ${preStop} + ${flag('--drain-timeout')}`);

    // Services, the disruption budget and the autoscaler point at these pods.
    const labels = deploy.spec.template.metadata.labels;
    const matches = (sel: Record<string, string>) => Object.entries(sel).every(([k, v]) => labels[k] === v);
    for (const s of docs.filter((d) => d.kind === 'Service')) assert.ok(matches(s.spec.selector), s.metadata.name);
    assert.ok(matches(docs.find((d) => d.kind === 'PodDisruptionBudget').spec.selector.matchLabels));
    const hpa = docs.find((d) => d.kind === 'HorizontalPodAutoscaler');
    assert.equal(hpa.spec.scaleTargetRef.name, deploy.metadata.name);
    assert.ok(hpa.spec.minReplicas >= 2, 'one replica left alone would take every user');

    // The metric it reads is the adapter rule's rename of one the server exports.
    const rule = /as: "([^"]+)"[\s\S]*?/.exec(docs.find((d) => d.kind === 'ConfigMap').data['config.yaml'])!;
    assert.equal(hpa.spec.metrics[0].pods.metric.name, rule[1]);
    assert.equal(rule[1], 'vllm_num_requests_waiting');

    // The runtime image runs as a user, not root, and checks its own liveness.
    assert.match(runtime, /^USER (?!root|0\b)\S+/m);
    assert.match(runtime, /^HEALTHCHECK .*\/live/m);
    assert.equal(pod.securityContext.runAsNonRoot, true);
  });

  test("the container's command, with the pod's arguments, serves: /health, /live, metrics with the pod's name", async () => {
    const c = manifests().find((d) => d.kind === 'Deployment').spec.template.spec.containers[0];
    const { entrypoint } = dockerfile();
    assert.deepEqual(entrypoint.slice(0, 2), ['mlx-serving', 'serve']);
    const port = await freePort();
    // As Kubernetes runs it: the image's flags, then the pod's, with $(POD_NAME) expanded.
    const args = [...entrypoint.slice(2), ...c.args.map((a: string) => a.replace('$(POD_NAME)', 'mlx-serving-7d9c-abcde'))];
    args[args.indexOf('--port') + 1] = String(port);
    args[args.indexOf('--host') + 1] = '127.0.0.1';
    const server = await startServer('pod', port, args, { ...process.env, RAYON_NUM_THREADS: '2' });
    try {
      const base = `http://127.0.0.1:${port}`;
      assert.equal((await fetch(`${base}/health`)).status, 200);
      assert.equal((await fetch(`${base}/live`)).status, 200);
      const metrics = await (await fetch(`${base}/metrics`)).text();
      assert.match(metrics, /^vllm:num_requests_waiting\{[^}]*replica="mlx-serving-7d9c-abcde"[^}]*\} 0$/m);
      // SIGTERM as the kubelet sends it: the server drains and exits 0.
      server.proc.kill('SIGTERM');
      assert.equal(await server.exited, 0);
    } finally {
      server.proc.kill('SIGKILL');
    }
  });
});

describe('replicas behind nginx with deploy/nginx.conf', { skip: !NGINX && 'nginx is not installed (setup.sh installs it as root)' }, () => {
  const replicas: Replica[] = [];
  let nginx: ChildProcess;
  let prefix: string;
  let base: string;

  before(async () => {
    replicas.push(...(await startReplicas('n', 3)));
    const ports = replicas.map((r) => r.port);
    const listen = await freePort();
    prefix = mkdtempSync(path.join(tmpdir(), 'mlx-serving-nginx-'));
    // The shipped file with this test's addresses in place of its placeholders.
    let conf = readFileSync(path.join(ROOT, 'deploy', 'nginx.conf'), 'utf8').replace('listen 127.0.0.1:8080;', `listen 127.0.0.1:${listen};`);
    ports.forEach((p, i) => (conf = conf.replace(`server 127.0.0.1:${8081 + i} `, `server 127.0.0.1:${p} `)));
    writeFileSync(path.join(prefix, 'nginx.conf'), conf);
    nginx = spawn(NGINX!, ['-p', prefix, '-c', path.join(prefix, 'nginx.conf'), '-g', 'daemon off;'], { stdio: 'ignore' });
    base = `http://127.0.0.1:${listen}`;
    const end = Date.now() + 10_000;
    while ((await fetch(`${base}/live`).catch(() => undefined))?.status !== 200) {
      assert.ok(Date.now() < end, 'nginx did not come up');
      await sleep(100);
    }
  });

  after(() => {
    nginx?.kill('SIGKILL');
    for (const r of replicas) r.proc.kill('SIGKILL');
    rmSync(prefix, { recursive: true, force: true });
  });

  async function ask(session: string, maxTokens = 2): Promise<{ status: number; replica: string }> {
    const res = await fetch(`${base}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-session-id': session },
      body: JSON.stringify({ model: 'default', messages: [{ role: 'user', content: `Hello from ${session}` }], max_tokens: maxTokens, min_tokens: maxTokens, temperature: 0 }),
    });
    await res.arrayBuffer();
    return { status: res.status, replica: res.headers.get('x-mlx-serving-replica') ?? '' };
  }

  const sessions = Array.from({ length: 12 }, (_, i) => `session-${i}`);

  async function placement(): Promise<Map<string, string>> {
    const where = new Map<string, string>();
    for (const s of sessions) {
      const r = await ask(s);
      assert.equal(r.status, 200, s);
      where.set(s, r.replica);
    }
    return where;
  }

  test('each session sticks to one replica, and sessions spread', async () => {
    const first = await placement();
    assert.deepEqual(await placement(), first);
    assert.ok(new Set(first.values()).size >= 2, JSON.stringify([...first]));
  });

  test('a draining replica finishes its stream; its sessions move, the others stay; nothing fails', async () => {
    const before = await placement();
    const drained = replicas.find((r) => [...before.values()].includes(r.id))!;
    const mine = sessions.filter((s) => before.get(s) === drained.id);
    const long = ask(mine[0], 120);
    await sleep(300);
    drained.proc.kill('SIGTERM');
    await sleep(100);
    // Its 503s are retried on the next replica of the ring.
    const after = await placement();
    for (const s of sessions) {
      if (before.get(s) === drained.id) assert.notEqual(after.get(s), drained.id, s);
      else assert.equal(after.get(s), before.get(s), `${s} moved although its replica lived`);
    }
    const l = await long;
    assert.equal(l.status, 200);
    assert.equal(l.replica, drained.id);
    assert.equal(await drained.exited, 0);
  });
});
