/**
 * The example async targets in examples/, on the host (no ublk needed): each module's default
 * export is prepared and opened as the server would (parseLongOptions, prepare, open with a
 * queue's info) and its functions are called directly.
 *
 * The examples import the package itself ('ublk', which resolves to dist/index.js): run
 * `npm run build` first.
 */
import t from 'tap';
import http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { createRequire, syncBuiltinESMExports } from 'node:module';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, openSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync, closeSync, writeSync, readSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseLongOptions, type AsyncHandlers, type AsyncTargetDefinition } from '../src/ublk/async-target.js';
import type { DeviceSpec } from '../src/ublk/target.js';

type Options = Record<string, string | true>;
type Example = AsyncTargetDefinition<Options>;

const built = readFileSync(new URL('../dist/index.js', import.meta.url), { encoding: 'utf8', flag: 'r' });
if (!built.includes('defineAsyncTarget')) throw new Error('dist/ predates async targets: run `npm run build` (the examples import the package, which is dist/index.js)');

/** An example module (a dynamic import: the .mjs files carry no type declarations). */
async function load<M = { default: Example }>(name: string): Promise<M> {
  return await import(new URL(`../examples/${name}`, import.meta.url).href) as M;
}

/** One queue of a prepared example, with what it logged and counted. */
interface Queue {
  h: AsyncHandlers;
  lines: string[];
  counters: Float64Array;
}

/** prepare() from a command line, as `ublk add -t MODULE ...` does. */
async function prepare(def: Example, argv: string[]): Promise<{ options: Options; spec: DeviceSpec }> {
  const options = def.parseArgs ? def.parseArgs(argv) : parseLongOptions(argv);
  return { options, spec: await def.prepare(options) };
}

/** open() for queue `qid`, with queueData structured-cloned as a queue thread receives it. */
async function open(def: Example, options: Options, spec: DeviceSpec, qid = 0): Promise<Queue> {
  const lines: string[] = [];
  const counters = new Float64Array(def.counters?.length ?? 0);
  const h = await def.open(options, { qid, depth: 8, device: structuredClone(spec.queueData), counters, log: (l) => lines.push(l) });
  return { h, lines, counters };
}

/** Calls read() (which may answer at once or with a Promise) and returns the bytes. */
async function read(q: Queue, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length, 0xee);
  await q.h.read(offset, buf);
  return buf;
}

/** The error a handler threw or rejected with. */
async function failure(f: () => unknown): Promise<NodeJS.ErrnoException | undefined> {
  try {
    await f();
  } catch (e) {
    return e as NodeJS.ErrnoException;
  }
  return undefined;
}

const KiB = 1024;
const MiB = 1024 * 1024;

t.test('ramdisk: what one queue writes, another reads', async (t) => {
  const { default: ramdisk } = await load('ramdisk.mjs');
  t.equal((await prepare(ramdisk, [])).spec.sizeBytes, 64 * MiB, 'the default size');
  const { options, spec } = await prepare(ramdisk, ['--size', '1M']);
  t.equal(spec.sizeBytes, MiB);
  // open() structured-clones queueData as a queue thread gets it: a SharedArrayBuffer stays shared.
  const q0 = await open(ramdisk, options, spec, 0);
  const q1 = await open(ramdisk, options, spec, 1);
  const data = randomBytes(8 * KiB);
  t.equal(q0.h.write(4096, data, false), undefined, 'answered at once');
  t.same(await read(q1, 4096, data.length), data, 'the other queue reads it');
  t.same(await read(q0, 0, 4096), Buffer.alloc(4096), 'unwritten bytes are zeros');
  t.same(await read(q1, 4096 + 512, 512), data.subarray(512, 1024));
});

// --- http-disk -------------------------------------------------------------------------------

interface ImageServer {
  url: string;
  /** `METHOD range` of every request, in order. */
  requests: string[];
  /** Connections ever accepted, and those still open. */
  connections: number;
  open: Set<Socket>;
  /** Behaviour, changeable between requests. */
  mode: { ranges: boolean; head: 'ok' | 'no-length' | '405' | 'redirect'; fail: boolean; stall: boolean };
  close(): Promise<void>;
}

/** A web server that serves `image` at /disk.img, with Range support unless mode.ranges is false. */
async function imageServer(image: Buffer, mode: Partial<ImageServer['mode']> = {}): Promise<ImageServer> {
  const s: Omit<ImageServer, 'url' | 'close'> = {
    requests: [], connections: 0, open: new Set(),
    mode: { ranges: true, head: 'ok', fail: false, stall: false, ...mode },
  };
  const server = http.createServer((req, res) => {
    const range = req.headers.range;
    s.requests.push(`${req.method} ${range ?? ''}`.trimEnd());
    const m = s.mode;
    if (req.method === 'HEAD') {
      if (m.head === 'redirect') res.writeHead(301, { Location: '/elsewhere.img' });
      else if (m.head === '405') res.writeHead(405);
      else res.writeHead(200, { ...(m.ranges ? { 'Accept-Ranges': 'bytes' } : {}), ...(m.head === 'ok' ? { 'Content-Length': image.length } : {}) });
      res.end();
      return;
    }
    if (m.stall) return; // never answers
    if (m.fail) {
      res.writeHead(500).end('broken');
      return;
    }
    const r = range && m.ranges ? /^bytes=(\d+)-(\d+)$/.exec(range) : null;
    if (!r) {
      res.writeHead(200, { 'Content-Length': image.length }).end(image);
      return;
    }
    const start = Number(r[1]);
    const end = Math.min(Number(r[2]), image.length - 1);
    res.writeHead(206, { 'Content-Range': `bytes ${start}-${end}/${image.length}`, 'Content-Length': end - start + 1 });
    res.end(image.subarray(start, end + 1));
  });
  server.on('connection', (sock: Socket) => {
    s.connections++;
    s.open.add(sock);
    sock.on('close', () => s.open.delete(sock));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return Object.assign(s, {
    url: `http://127.0.0.1:${port}/disk.img`,
    close: () => {
      server.closeAllConnections();
      return new Promise<void>((resolve) => server.close(() => resolve()));
    },
  });
}

/** The GETs of a server after the `from`-th request (prepare's HEAD is not one). */
const gets = (s: ImageServer, from = 0) => s.requests.slice(from).filter((r) => r.startsWith('GET'));

async function until(cond: () => boolean, ms = 2000): Promise<boolean> {
  for (const end = Date.now() + ms; Date.now() < end; await new Promise((r) => setTimeout(r, 10))) if (cond()) return true;
  return cond();
}

const HITS = 0;
const MISSES = 1;
const FETCHES = 2;

t.test('http-disk', async (t) => {
  const { default: httpDisk } = await load('http-disk.mjs');
  t.same(httpDisk.counters, ['cacheHits', 'cacheMisses', 'fetches']);

  t.test('the size, from HEAD; an image that is not whole sectors is cut to them and says so', async (t) => {
    const image = randomBytes(MiB + 100);
    const s = await imageServer(image);
    t.teardown(() => s.close());
    const write = process.stderr.write;
    const said: string[] = [];
    process.stderr.write = ((chunk: string) => said.push(String(chunk)) > 0) as typeof process.stderr.write;
    let spec: DeviceSpec;
    try {
      spec = (await prepare(httpDisk, ['--url', s.url])).spec;
    } finally {
      process.stderr.write = write;
    }
    t.equal(spec.sizeBytes, MiB);
    t.equal(spec.readOnly, true);
    t.equal(spec.maxIoBytes, 512 * KiB);
    t.match(spec.describe, { url: s.url, imageBytes: MiB + 100, unreadableBytes: 100, blockBytes: 128 * KiB, cacheBytesPerQueue: 64 * MiB });
    t.match(said.join(''), /is 1048676 bytes, not a multiple of 512: the disk is its first 1048576 bytes, the last 100 cannot be read/);
    t.same(s.requests, ['HEAD'], 'HEAD was enough');
  });

  t.test('the size, from a Range: bytes=0-0 GET when HEAD is refused or gives no length', async (t) => {
    for (const head of ['405', 'no-length'] as const) {
      const s = await imageServer(randomBytes(64 * KiB), { head });
      const { spec } = await prepare(httpDisk, ['--url', s.url]);
      t.equal(spec.sizeBytes, 64 * KiB, head);
      t.same(s.requests, ['HEAD', 'GET bytes=0-0'], head);
      await s.close();
    }
  });

  t.test('servers it cannot use are refused, naming the fix', async (t) => {
    const noRanges = await imageServer(randomBytes(64 * KiB), { ranges: false });
    await t.rejects(prepare(httpDisk, ['--url', noRanges.url]), /does not honour range requests .*200 OK.*: serve the image from a server that does/);
    await noRanges.close();

    const redirect = await imageServer(randomBytes(64 * KiB), { head: 'redirect' });
    await t.rejects(prepare(httpDisk, ['--url', redirect.url]), /redirects to http:\/\/127\.0\.0\.1:\d+\/elsewhere\.img: pass that as --url/);
    await redirect.close();

    const tiny = await imageServer(randomBytes(100));
    await t.rejects(prepare(httpDisk, ['--url', tiny.url]), /is 100 bytes, less than one 512-byte sector/);
    await tiny.close();

    const gone = await imageServer(randomBytes(512));
    const url = gone.url;
    await gone.close(); // nothing listens on its port now
    await t.rejects(prepare(httpDisk, ['--url', url]), /cannot reach http:\/\/127\.0\.0\.1:\d+\/disk\.img \(.*ECONNREFUSED.*\): is the server up, and the URL right\?/);

    await t.rejects(prepare(httpDisk, []), /needs --url URL/);
    await t.rejects(prepare(httpDisk, ['--url', 'ftp://host/x.img']), /must be http:\/\/ or https:\/\//);
    await t.rejects(prepare(httpDisk, ['--url', url, '--block-kb', '0']), /--block-kb takes a whole number from 1 to 16384, got 0/);
    await t.rejects(prepare(httpDisk, ['--url', url, '--cache-mb']), /--cache-mb takes a whole number .*got nothing/);
    await t.rejects(prepare(httpDisk, ['--url', url, '--cache-mib', '4']), /unknown option --cache-mib/);
  });

  t.test('reads at and across block boundaries: one GET per run of missing blocks, then cache hits', async (t) => {
    const image = randomBytes(MiB);
    const s = await imageServer(image);
    t.teardown(() => s.close());
    const { options, spec } = await prepare(httpDisk, ['--url', s.url, '--block-kb', '4']);
    const q = await open(httpDisk, options, spec);
    t.teardown(() => q.h.close?.());
    const B = 4 * KiB;
    const before = s.requests.length;

    t.same(await read(q, 0, B), image.subarray(0, B), 'block 0, exactly');
    t.same(gets(s, before), [`GET bytes=0-${B - 1}`]);
    t.same(await read(q, B - 512, 1024), image.subarray(B - 512, B + 512), 'across the 0/1 boundary');
    t.same(gets(s, before).slice(1), [`GET bytes=${B}-${2 * B - 1}`], 'only block 1 was fetched');
    t.same(await read(q, 3 * B, 512), image.subarray(3 * B, 3 * B + 512), 'a sector at the start of block 3');
    // Blocks 2..5 with 3 cached: two runs, 2 and 4-5.
    t.same(await read(q, 2 * B + 512, 4 * B - 1024), image.subarray(2 * B + 512, 6 * B - 512), 'across 4 blocks, one of them cached');
    t.same(gets(s, before).slice(3), [`GET bytes=${2 * B}-${3 * B - 1}`, `GET bytes=${4 * B}-${6 * B - 1}`]);
    t.same(await read(q, MiB - 512, 512), image.subarray(MiB - 512), 'the last sector');
    // Blocks 0 | 0 1 | 3 | 2 3 4 5 | 255: hits 0 and 3 on their second reads, 6 GETs.
    t.same([...q.counters], [2, 7, 6], 'hits, misses, fetches');

    const fetched = gets(s).length;
    const again = q.h.read(0, Buffer.alloc(6 * B));
    t.equal(again, undefined, 'a read the cache holds whole is answered at once');
    t.same(await read(q, 0, 6 * B), image.subarray(0, 6 * B), 're-read from the cache');
    t.equal(gets(s).length, fetched, 'no GET');
    t.equal(q.counters[HITS], 2 + 2 * 6, 'every block a hit, both times');
    t.equal(q.counters[MISSES], 7);
    // prepare's HEAD had a connection of its own; the GETs were kept alive and reused: 6 GETs,
    // at most 2 at once (the read of blocks 2..5), 2 connections.
    t.equal(s.connections, 1 + 2, 'connections are reused');
  });

  t.test('write is refused with EROFS', async (t) => {
    const s = await imageServer(randomBytes(64 * KiB));
    t.teardown(() => s.close());
    const { options, spec } = await prepare(httpDisk, ['--url', s.url]);
    const q = await open(httpDisk, options, spec);
    t.equal((await failure(() => q.h.write(0, Buffer.alloc(512), false)))?.code, 'EROFS');
    await q.h.close?.();
  });

  t.test('the cache evicts the least recently used block', async (t) => {
    const image = randomBytes(4 * MiB);
    const s = await imageServer(image);
    t.teardown(() => s.close());
    // 1 MiB of 512 KiB blocks: room for 2.
    const { options, spec } = await prepare(httpDisk, ['--url', s.url, '--block-kb', '512', '--cache-mb', '1']);
    const q = await open(httpDisk, options, spec);
    t.teardown(() => q.h.close?.());
    const B = 512 * KiB;
    const at = (b: number) => read(q, b * B, 4096);
    await at(0);
    await at(1);
    await at(0); // hit: 1 is now the least recently used
    await at(2); // evicts 1
    t.same([...q.counters], [1, 3, 3]);
    await at(0);
    t.equal(q.counters[HITS], 2, 'block 0 stayed');
    t.same(await at(1), image.subarray(B, B + 4096));
    t.same([...q.counters], [2, 4, 4], 'block 1 was fetched again');
  });

  t.test('concurrent reads of a block make one GET', async (t) => {
    const image = randomBytes(MiB);
    const s = await imageServer(image);
    t.teardown(() => s.close());
    const { options, spec } = await prepare(httpDisk, ['--url', s.url, '--cache-mb', '0']);
    const q = await open(httpDisk, options, spec);
    t.teardown(() => q.h.close?.());
    const B = 128 * KiB;
    const before = s.requests.length;
    const a = Buffer.alloc(4096);
    const b = Buffer.alloc(8192);
    const c = Buffer.alloc(B + 4096);
    // All three are started before any GET is answered: a and b want block 0 only, c wants 0 and 1.
    await Promise.all([q.h.read(100 * 512, a), q.h.read(8192, b), q.h.read(B - 4096, c)]);
    t.same(a, image.subarray(51200, 51200 + 4096));
    t.same(b, image.subarray(8192, 16384));
    t.same(c, image.subarray(B - 4096, 2 * B));
    t.same(gets(s, before), [`GET bytes=0-${B - 1}`, `GET bytes=${B}-${2 * B - 1}`], 'block 0 once, block 1 once');
    t.same([...q.counters], [0, 4, 2]);
    // With no cache, a later read fetches again: nothing was kept.
    await read(q, 0, 512);
    t.equal(gets(s, before).length, 3);
  });

  t.test('a server that fails: two more tries, then EIO and a log line; later reads try again', async (t) => {
    const image = randomBytes(MiB);
    const s = await imageServer(image);
    t.teardown(() => s.close());
    const { options, spec } = await prepare(httpDisk, ['--url', s.url]);
    const q = await open(httpDisk, options, spec);
    t.teardown(() => q.h.close?.());
    const before = s.requests.length;
    s.mode.fail = true;
    const e = await failure(() => read(q, 4096, 4096));
    t.equal(e?.code, 'EIO');
    t.equal(gets(s, before).length, 3, 'three GETs');
    t.equal(q.counters[FETCHES], 3);
    t.equal(q.lines.length, 1);
    t.match(q.lines[0], /^http-disk queue 0: GET http:\/\/127\.0\.0\.1:\d+\/disk\.img bytes 0-131071 failed 3 times \(last: HTTP 500 Internal Server Error\); the read fails with EIO$/);
    s.mode.fail = false;
    t.same(await read(q, 4096, 4096), image.subarray(4096, 8192), 'the failure was not cached');
  });

  t.test('a server that does not answer: --timeout-ms, then EIO', async (t) => {
    const s = await imageServer(randomBytes(MiB));
    t.teardown(() => s.close());
    const { options, spec } = await prepare(httpDisk, ['--url', s.url, '--timeout-ms', '100']);
    const q = await open(httpDisk, options, spec);
    s.mode.stall = true;
    const started = Date.now();
    const e = await failure(() => read(q, 0, 4096));
    t.equal(e?.code, 'EIO');
    t.ok(Date.now() - started >= 3 * 100 + 100 + 200, 'three timeouts and two pauses');
    t.equal(q.counters[FETCHES], 3);
    t.match(q.lines[0], /failed 3 times \(last: .*abort.*\)/i);
    await q.h.close?.();
  });

  t.test('close() closes the kept-alive connections', async (t) => {
    const s = await imageServer(randomBytes(MiB));
    t.teardown(() => s.close());
    const { options, spec } = await prepare(httpDisk, ['--url', s.url]);
    const q = await open(httpDisk, options, spec);
    await read(q, 0, 4096);
    await read(q, 512 * KiB, 4096);
    t.equal(s.connections, 2, 'prepare\'s HEAD had its own, the GETs shared one');
    t.ok(await until(() => s.open.size === 1), 'the kept-alive one is open');
    await q.h.close?.();
    t.ok(await until(() => s.open.size === 0), 'and closed by close()');
  });
});

// --- sparse-store ----------------------------------------------------------------------------

const require = createRequire(import.meta.url);
const fsCjs = require('node:fs') as { fsyncSync(fd: number): void; fdatasyncSync(fd: number): void };

/** Runs f and returns the paths fsynced (or fdatasynced) meanwhile, whichever module called. */
function fsyncsDuring(f: () => unknown): string[] {
  const paths: string[] = [];
  const { fsyncSync, fdatasyncSync } = fsCjs;
  const spy = (orig: (fd: number) => void, kind: string) => (fd: number) => {
    paths.push(`${kind} ${readlinkSync(`/proc/self/fd/${fd}`)}`);
    orig(fd);
  };
  fsCjs.fsyncSync = spy(fsyncSync, 'fsync');
  fsCjs.fdatasyncSync = spy(fdatasyncSync, 'fdatasync');
  syncBuiltinESMExports(); // `import { fsyncSync } from 'node:fs'` in the example sees the spies
  try {
    f();
  } finally {
    fsCjs.fsyncSync = fsyncSync;
    fsCjs.fdatasyncSync = fdatasyncSync;
    syncBuiltinESMExports();
  }
  return paths.sort();
}

/** A chunk's file name. */
const chunkFile = (i: number) => `c-${i.toString(16).padStart(10, '0')}`;

t.test('sparse-store', async (t) => {
  const mod = await load<{ default: Example; crc32c(buf: Uint8Array): number }>('sparse-store.mjs');
  const store = mod.default;
  const C = 64 * KiB;
  const fresh = () => {
    const dir = mkdtempSync(join(tmpdir(), 'sparse-store-'));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    return dir;
  };
  const chunkFiles = (dir: string) => readdirSync(dir).filter((f) => f.startsWith('c-')).sort();

  t.test('CRC32C', async (t) => {
    t.equal(mod.crc32c(Buffer.from('123456789')), 0xe3069283, 'the standard check value');
    t.equal(mod.crc32c(Buffer.alloc(32)), 0x8a9136aa, 'RFC 3720 B.4: 32 bytes of zeros');
    t.equal(mod.crc32c(Buffer.alloc(32, 0xff)), 0x62a8ab43, 'RFC 3720 B.4: 32 bytes of ones');
  });

  t.test('options', async (t) => {
    const dir = fresh();
    await t.rejects(prepare(store, []), /needs --dir DIR/);
    await t.rejects(prepare(store, ['--dir', dir]), /holds no store yet: give its size with --size/);
    await t.rejects(prepare(store, ['--dir', dir, '--size', '1000']), /--size must be a multiple of 4K/);
    await t.rejects(prepare(store, ['--dir', dir, '--size', '1M', '--chunk-kb', '48']), /--chunk-kb takes a power of two from 4 to 65536, got 48/);
    await t.rejects(prepare(store, ['--dir', dir, '--size', '1M', '--chunks', '4']), /unknown option --chunks/);
    const { spec } = await prepare(store, ['--dir', dir, '--size', '1M']);
    t.match(spec, {
      sizeBytes: MiB, logicalBlockSize: 4096, physicalBlockSize: 4096, volatileCache: true, fua: true,
      discard: { granularity: C }, describe: { dir, chunkBytes: C },
    });
    t.same(JSON.parse(readFileSync(join(dir, 'sparse-store.json'), 'utf8')), { format: 1, sizeBytes: MiB, chunkBytes: C, blockBytes: 4096, checksum: 'crc32c' });
    await t.rejects(prepare(store, ['--dir', dir, '--size', '2M']), /holds a store of 1048576 bytes in 64 KiB chunks: leave out --size and --chunk-kb/);
    await t.rejects(prepare(store, ['--dir', dir, '--chunk-kb', '128']), /holds a store of 1048576 bytes in 64 KiB chunks/);
    t.equal((await prepare(store, ['--dir', dir])).spec.sizeBytes, MiB, 'an existing store needs no --size');
  });

  t.test('writes read back; unwritten bytes are zeros and have no file', async (t) => {
    const dir = fresh();
    const { options, spec } = await prepare(store, ['--dir', dir, '--size', '1G']);
    const q = await open(store, options, spec);
    const data = randomBytes(3 * 4096);
    t.equal(q.h.write(C - 4096, data, false), undefined, 'answered at once');
    const far = randomBytes(4096);
    q.h.write(512 * MiB, far, false);
    t.same(chunkFiles(dir), [chunkFile(0), chunkFile(1), chunkFile(512 * MiB / C)], 'a file per chunk written, none for the rest');
    t.same(await read(q, C - 4096, data.length), data, 'across a chunk boundary');
    t.same(await read(q, 512 * MiB, 4096), far);
    t.same(await read(q, 0, C - 4096), Buffer.alloc(C - 4096), 'the unwritten part of a chunk with a file');
    t.same(await read(q, 4 * C, 2 * C), Buffer.alloc(2 * C), 'chunks with no file');
    t.ok(statSync(join(dir, chunkFile(0))).blocks * 512 <= 3 * 4096, 'a chunk file takes the space of what was written in it (a sparse file)');
    t.ok(statSync(join(dir, chunkFile(0))).size <= C + (C / 4096) * 4, 'data then 4 bytes per block');
  });

  t.test('a changed byte fails its block with EIO and a log line; other blocks still read', async (t) => {
    const dir = fresh();
    const { options, spec } = await prepare(store, ['--dir', dir, '--size', '1M']);
    const q = await open(store, options, spec);
    const data = randomBytes(3 * 4096);
    q.h.write(5 * C, data, false);
    const file = join(dir, chunkFile(5));
    const flip = (pos: number) => {
      const fd = openSync(file, 'r+');
      const b = Buffer.alloc(1);
      readSync(fd, b, 0, 1, pos);
      b[0] = b[0]! ^ 0x10;
      writeSync(fd, b, 0, 1, pos);
      closeSync(fd);
    };
    flip(4096 + 1234); // a byte of block 1's data
    const e = await failure(() => q.h.read(5 * C + 4096, Buffer.alloc(4096)));
    t.equal(e?.code, 'EIO');
    t.equal(q.lines.length, 1);
    t.match(q.lines[0], new RegExp(`^sparse-store: checksum mismatch in ${file} block 1 \\(device bytes ${5 * C + 4096}\\+4096\\): stored 0x[0-9a-f]{8}, data gives 0x[0-9a-f]{8}; the read fails with EIO$`));
    t.equal(q.counters[0], 1, 'checksumErrors');
    t.same(await read(q, 5 * C, 4096), data.subarray(0, 4096), 'block 0 reads');
    t.same(await read(q, 5 * C + 8192, 4096), data.subarray(8192), 'block 2 reads');
    t.equal((await failure(() => q.h.read(5 * C, Buffer.alloc(3 * 4096))))?.code, 'EIO', 'a read that covers it fails whole');

    flip(C + 2 * 4 + 3); // a bit of block 2's checksum
    t.equal((await failure(() => q.h.read(5 * C + 8192, Buffer.alloc(4096))))?.code, 'EIO', 'a changed checksum fails too');
    t.match(q.lines.at(-1), /block 2 /);

    q.h.write(5 * C + 4096, data.subarray(4096, 8192), false);
    t.same(await read(q, 5 * C + 4096, 4096), data.subarray(4096, 8192), 'rewriting the block heals it');
  });

  t.test('discard deletes the chunks it covers whole and zeros the rest; write-zeroes with NOUNMAP deletes nothing', async (t) => {
    const dir = fresh();
    const { options, spec } = await prepare(store, ['--dir', dir, '--size', '1M']);
    const q = await open(store, options, spec);
    const data = randomBytes(3 * C);
    q.h.write(2 * C, data, false);
    t.same(chunkFiles(dir), [chunkFile(2), chunkFile(3), chunkFile(4)]);
    // From the middle of chunk 2 to the middle of chunk 4.
    q.h.discard!(2 * C + C / 2, 2 * C);
    t.same(chunkFiles(dir), [chunkFile(2), chunkFile(4)], 'chunk 3 is gone');
    const expect = Buffer.from(data);
    expect.fill(0, C / 2, 2 * C + C / 2);
    t.same(await read(q, 2 * C, 3 * C), expect, 'zeros where discarded, the data elsewhere, every block checked');

    q.h.writeZeroes!(4 * C, C, true);
    t.same(chunkFiles(dir), [chunkFile(2), chunkFile(4)], 'NOUNMAP: chunk 4 stays');
    q.h.writeZeroes!(2 * C, C, false);
    t.same(chunkFiles(dir), [chunkFile(4)], 'without: chunk 2 goes');
    t.same(await read(q, 0, MiB), Buffer.alloc(MiB), 'all zeros now');
    q.h.discard!(8 * C, 2 * C);
    t.same(chunkFiles(dir), [chunkFile(4)], 'discarding chunks with no file is fine');
  });

  t.test('two queues share the disk; FLUSH on one fsyncs what the other wrote, and DIR', async (t) => {
    const dir = fresh();
    const { options, spec } = await prepare(store, ['--dir', dir, '--size', '1M']);
    const q0 = await open(store, options, spec, 0);
    const q1 = await open(store, options, spec, 1);
    const data = randomBytes(2 * C);
    q0.h.write(0, data, false);
    t.same(await read(q1, 0, 2 * C), data);
    t.same(fsyncsDuring(() => q1.h.flush!()), [`fsync ${dir}`, `fsync ${join(dir, chunkFile(0))}`, `fsync ${join(dir, chunkFile(1))}`]);
    t.same(fsyncsDuring(() => q0.h.flush!()), [], 'nothing written since: nothing to do');
    q1.h.write(4096, data.subarray(0, 4096), false);
    t.same(fsyncsDuring(() => q0.h.flush!()), [`fsync ${join(dir, chunkFile(0))}`], 'a rewrite: the file, not DIR');
    t.same(fsyncsDuring(() => q0.h.write(3 * C, data.subarray(0, 4096), true)), [`fdatasync ${join(dir, chunkFile(3))}`, `fsync ${dir}`], 'FUA: at once, with DIR for a new file');
    t.same(fsyncsDuring(() => q0.h.flush!()), [], 'and nothing left for FLUSH');
    q0.h.discard!(3 * C, C);
    t.same(fsyncsDuring(() => q1.h.flush!()), [`fsync ${dir}`], 'a deleted file: DIR');
  });

  t.test('two queue threads writing and reading the same blocks: no false checksum errors', async (t) => {
    // Without the chunk locks, a read between another thread's data and checksum pwrites sees a
    // mismatch (this test then fails within a few hundred ms).
    const dir = fresh();
    const { options, spec } = await prepare(store, ['--dir', dir, '--size', '1M']);
    const code = `
      const { workerData: w, parentPort } = require('node:worker_threads');
      import(w.url).then(async ({ default: def }) => {
        const lines = [];
        const h = await def.open(w.options, { qid: w.qid, depth: 8, device: w.device, counters: new Float64Array(1), log: (l) => lines.push(l) });
        let ops = 0, errors = 0, torn = 0;
        const data = Buffer.alloc(4 * 4096);
        for (const end = Date.now() + 300; Date.now() < end; ops++) {
          h.write(((ops % 4) * 4096), Buffer.alloc(4096, w.qid * 64 + (ops % 64)), false);
          try { h.read(0, data); } catch { errors++; continue; }
          for (let b = 0; b < 4; b++) if (data.subarray(b * 4096, (b + 1) * 4096).some((x) => x !== data[b * 4096])) torn++;
        }
        parentPort.postMessage({ ops, errors, torn, lines: lines.slice(0, 3) });
      });`;
    const url = new URL('../examples/sparse-store.mjs', import.meta.url).href;
    const { Worker } = await import('node:worker_threads');
    const results = await Promise.all([0, 1].map((qid) => new Promise<{ ops: number; errors: number; torn: number; lines: string[] }>((resolve, reject) => {
      const w = new Worker(code, { eval: true, workerData: { url, options, qid, device: spec.queueData } });
      w.once('message', resolve);
      w.once('error', reject);
    })));
    for (const [qid, r] of results.entries()) {
      t.ok(r.ops > 100, `queue ${qid} did ${r.ops} write+read pairs`);
      t.equal(r.errors, 0, `queue ${qid}: no EIO`, { lines: r.lines });
      t.equal(r.torn, 0, `queue ${qid}: no block mixed from two writes`);
    }
  });

  t.test('the disk outlives its server: close, prepare and open again', async (t) => {
    const dir = fresh();
    let { options, spec } = await prepare(store, ['--dir', dir, '--size', '4M', '--chunk-kb', '16']);
    let q = await open(store, options, spec);
    const data = randomBytes(256 * KiB);
    q.h.write(MiB, data, false);
    q.h.flush!();
    await q.h.close?.();
    spec.release?.();
    ({ options, spec } = await prepare(store, ['--dir', dir]));
    t.equal(spec.sizeBytes, 4 * MiB);
    t.match(spec.describe, { chunkBytes: 16 * KiB });
    q = await open(store, options, spec);
    t.same(await read(q, MiB, data.length), data);
    t.equal(chunkFiles(dir).length, 16, '256 KiB in 16 KiB chunks');
    t.ok(existsSync(join(dir, chunkFile(MiB / (16 * KiB)))));
    writeFileSync(join(dir, 'sparse-store.json'), 'garbage');
    await t.rejects(prepare(store, ['--dir', dir]), /sparse-store\.json is not a store description this version reads/);
  });
});
