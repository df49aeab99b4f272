/**
 * The overlay target on the host (no ublk needed): prepare/open and the handlers called directly
 * (test/helpers/async-harness.ts) against real files. Reads fall through to the base where no
 * block was written, writes land in the overlay only, the map reaches its file only on FLUSH /
 * FUA / close (data first), and prepare refuses what is not this base's overlay.
 */
import t from 'tap';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { Worker } from 'node:worker_threads';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import overlay, {
  MAP_HEADER_BYTES, MAP_MAGIC, blockMapped, deviceMap, mapPath, mappedBlocks, readMap, type OverlayDevice,
} from '../../src/targets/overlay.js';
import { UsageError } from '../../src/targets/options.js';
import { TargetError } from '../../src/ublk/target.js';
import { errorResult } from '../../src/ublk/async-target.js';
import { libc } from '../../src/libc/index.js';
import { openAsync } from '../helpers/async-harness.js';

const dir = mkdtempSync(join(tmpdir(), 'ublk-overlay-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const B = 4096;
const openFds = () => readdirSync('/proc/self/fd').length;
let n = 0;

/** A base file of `size` random bytes, and paths for a fresh overlay beside it. */
function setup(size = 64 * B) {
  const k = n++;
  const base = join(dir, `base${k}.img`);
  const content = randomBytes(size);
  writeFileSync(base, content);
  return { base, content, ov: join(dir, `ov${k}.img`) };
}

const args = (base: string, ov: string, create = true) => ['--base', base, '--overlay', ov, ...(create ? ['--create'] : [])];
const fill = (byte: number, len = B) => Buffer.alloc(len, byte);

t.test('options: both files are required, paths become absolute, mistakes are named', (t) => {
  t.throws(() => overlay.parseArgs!(['--overlay', 'o']), /overlay needs --base FILE/);
  t.throws(() => overlay.parseArgs!(['--base', 'b']), /overlay needs --overlay FILE.*--create/);
  t.throws(() => overlay.parseArgs!(['--base', 'x', '--overlay', 'x']), /--base and --overlay are the same file/);
  t.throws(() => overlay.parseArgs!(['--base', 'b', '--overlay', 'o', '--bogus']), /overlay: unknown option --bogus/);
  t.throws(() => overlay.parseArgs!(['--base', 'b', '--overlay', 'o', '--create=yes']), /--create takes no value/);
  t.throws(() => overlay.parseArgs!([]), UsageError);
  const o = overlay.parseArgs!(['--base', 'b.img', '--overlay', 'o.img', '--create']);
  t.same(o, { base: join(process.cwd(), 'b.img'), overlay: join(process.cwd(), 'o.img'), create: true });
  t.equal(overlay.parseArgs!(['--base', 'b', '--overlay', 'o']).create, false);
  t.end();
});

t.test('a missing overlay needs --create; --create makes a sparse overlay and its map', async (t) => {
  const { base, ov } = setup(16 * B);
  const before = openFds();
  t.throws(() => overlay.prepare(overlay.parseArgs!(args(base, ov, false))), /--overlay .* does not exist: add --create/);
  t.throws(() => overlay.prepare(overlay.parseArgs!(args(join(dir, 'nope.img'), ov))), /--base .*nope\.img does not exist/);
  t.equal(openFds(), before, 'a refused prepare leaks no fd');
  t.notOk(existsSync(ov), 'nothing was created by the refusals');
  const h = await openAsync(overlay, args(base, ov));
  t.equal(statSync(ov).size, 16 * B, 'the overlay is the device\'s size');
  t.equal(statSync(ov).blocks, 0, 'and sparse');
  const m = readFileSync(mapPath(ov));
  t.equal(m.length, MAP_HEADER_BYTES + 2, '16 blocks: 2 bytes of map after the header');
  t.equal(m.toString('latin1', 0, 8), MAP_MAGIC);
  t.equal(m.readUInt32LE(8), 1, 'version');
  t.equal(m.readUInt32LE(12), B, 'block size');
  t.equal(Number(m.readBigUInt64LE(16)), 16 * B, 'the base\'s size');
  t.equal(Number(m.readBigUInt64LE(24)), 16, 'blocks');
  t.match(h.spec, {
    sizeBytes: 16 * B, logicalBlockSize: B, volatileCache: true, fua: true,
    discard: { granularity: B },
  });
  t.ok(h.spec.discard!.maxBytes > 0 && h.spec.discard!.maxWriteZeroesBytes > 0, 'discard and write-zeroes are advertised');
  t.type((h.spec.queueData as OverlayDevice).bitmap, SharedArrayBuffer, 'the map travels to the queues as a SharedArrayBuffer');
  await h.close();
  t.equal(openFds(), before, 'close and release leave no fd open');
  // --create on an existing pair just opens it.
  const again = await openAsync(overlay, args(base, ov));
  await again.close();
  t.equal(openFds(), before);
});

t.test('reads fall through to the base; written blocks come from the overlay; the base is never written', async (t) => {
  const { base, content, ov } = setup(64 * B);
  const h = await openAsync(overlay, args(base, ov));
  t.same(await h.read(0, 64 * B), content, 'a new overlay reads as the base');
  await h.write(3 * B, fill(0xa1));
  await h.write(10 * B, fill(0xa2, 3 * B));
  const expect = Buffer.from(content);
  fill(0xa1).copy(expect, 3 * B);
  fill(0xa2, 3 * B).copy(expect, 10 * B);
  t.same(await h.read(0, 64 * B), expect, 'the written blocks, and the base around them');
  // A read that alternates between the files within one request.
  t.same(await h.read(2 * B, 10 * B), expect.subarray(2 * B, 12 * B));
  t.same(await h.read(11 * B, B), fill(0xa2), 'one block in the middle of a write');
  t.same(readFileSync(base), content, 'the base is unchanged byte for byte');
  const ovData = readFileSync(ov);
  t.same(ovData.subarray(3 * B, 4 * B), fill(0xa1), 'the data is in the overlay file');
  t.same(ovData.subarray(0, 3 * B), Buffer.alloc(3 * B), 'and nothing else is');
  t.same(mappedBlocks(deviceMap(h.spec.queueData)), [3, 10, 11, 12], 'bits only for the written blocks');
  t.ok(h.counter('overlay_read_blocks') > 0 && h.counter('base_read_blocks') > 0);
  // The base's fd is read-only (O_ACCMODE 0 in fdinfo's octal flags).
  const flags = /flags:\s+([0-7]+)/.exec(readFileSync(`/proc/self/fdinfo/${(h.spec.queueData as OverlayDevice).baseFd}`, 'utf8'))![1]!;
  t.equal(parseInt(flags, 8) & 3, 0, 'the base is opened O_RDONLY');
  await h.close();
  t.same(readFileSync(base), content, 'still unchanged after close');
});

t.test('the map reaches its file on FLUSH, FUA and close, only after the data; it persists across a re-open', async (t) => {
  const { base, content, ov } = setup(64 * B);
  const h = await openAsync(overlay, args(base, ov));
  await h.write(5 * B, fill(0x55));
  t.same(mappedBlocks(deviceMap(h.spec.queueData)), [5], 'set in memory at once');
  t.same(mappedBlocks(readMap(mapPath(ov)).bits), [], 'not on disk before a FLUSH');
  await h.flush();
  t.same(mappedBlocks(readMap(mapPath(ov)).bits), [5], 'on disk after the FLUSH');
  t.equal(h.counter('map_pages_written'), 1);
  // A block whose bit is on disk already: the next FLUSH writes no map page.
  await h.write(5 * B, fill(0x56));
  await h.flush();
  t.equal(h.counter('map_pages_written'), 1, 'an overwrite of a mapped block does not rewrite the map');
  await h.write(40 * B, fill(0x40), true);
  t.same(mappedBlocks(readMap(mapPath(ov)).bits), [5, 40], 'a FUA write persists its bit at once');
  await h.write(41 * B, fill(0x41));
  await h.close();
  t.same(mappedBlocks(readMap(mapPath(ov)).bits), [5, 40, 41], 'close persists the rest');

  // prepare again, without --create: the same disk.
  const again = await openAsync(overlay, args(base, ov, false));
  t.same(mappedBlocks(deviceMap(again.spec.queueData)), [5, 40, 41], 'the map is loaded from its file');
  const expect = Buffer.from(content);
  fill(0x56).copy(expect, 5 * B);
  fill(0x40).copy(expect, 40 * B);
  fill(0x41).copy(expect, 41 * B);
  t.same(await again.read(0, 64 * B), expect, 'the same bytes after the re-open');
  t.match(again.spec.describe, { mapped_blocks: 3 });
  await again.close();
  t.same(readFileSync(base), content, 'the base is unchanged');
});

t.test('WRITE_ZEROES and DISCARD read as zeros, not as the base', async (t) => {
  const { base, content, ov } = setup(32 * B);
  const h = await openAsync(overlay, args(base, ov));
  t.equal(await h.request('zeroes', 4 * B, 4 * B), 0, 'WRITE_ZEROES completes with 0');
  t.equal(await h.request('discard', 20 * B, 2 * B), 0, 'DISCARD completes with 0');
  const expect = Buffer.from(content);
  expect.fill(0, 4 * B, 8 * B);
  expect.fill(0, 20 * B, 22 * B);
  t.same(await h.read(0, 32 * B), expect);
  t.same(mappedBlocks(deviceMap(h.spec.queueData)), [4, 5, 6, 7, 20, 21]);
  // Zeros over an earlier write in the overlay.
  await h.write(12 * B, fill(0x77, 2 * B));
  await h.writeZeroes(12 * B, B, true);
  t.same(await h.read(12 * B, 2 * B), Buffer.concat([Buffer.alloc(B), fill(0x77)]));
  await h.close();
  t.same(readFileSync(base), content);
});

t.test('a map made over another base, or a damaged pair, is refused with what to do', async (t) => {
  const { base, ov } = setup(16 * B);
  const h = await openAsync(overlay, args(base, ov));
  await h.close();
  const other = join(dir, 'other-base.img');
  writeFileSync(other, randomBytes(20 * B));
  const before = openFds();
  const err = t.throws(() => overlay.prepare(overlay.parseArgs!(args(other, ov, false)))) as Error;
  t.type(err, TargetError);
  t.match(err.message, new RegExp(`was made over a ${16 * B}-byte base, and --base .*other-base\\.img has ${20 * B} bytes: it is another base's overlay`));
  t.equal(openFds(), before, 'no fd leaks from the refusal');

  // An overlay without its map, and a map without its overlay.
  const lone = join(dir, 'lone.img');
  writeFileSync(lone, Buffer.alloc(16 * B));
  t.throws(() => overlay.prepare(overlay.parseArgs!(args(base, lone))), /lone\.img has no map .*remove it to start afresh/);
  const orphan = join(dir, 'orphan.img');
  writeFileSync(mapPath(orphan), readFileSync(mapPath(ov)));
  t.throws(() => overlay.prepare(overlay.parseArgs!(args(base, orphan))), /orphan\.img\.map exists but .*orphan\.img does not/);

  // A map that is not one, one of the wrong length, and a truncated overlay.
  const junk = join(dir, 'junk.img');
  writeFileSync(junk, Buffer.alloc(16 * B));
  writeFileSync(mapPath(junk), 'hello');
  t.throws(() => overlay.prepare(overlay.parseArgs!(args(base, junk))), /junk\.img\.map is not an overlay map/);
  writeFileSync(mapPath(junk), Buffer.concat([readFileSync(mapPath(ov)), Buffer.alloc(1)]));
  t.throws(() => overlay.prepare(overlay.parseArgs!(args(base, junk))), /is damaged/);
  truncateSync(ov, 8 * B);
  t.throws(() => overlay.prepare(overlay.parseArgs!(args(base, ov))), /has 32768 bytes, less than the 65536-byte device: it was truncated/);
  t.throws(() => overlay.prepare(overlay.parseArgs!(args(base, base))), UsageError, 'the base as its own overlay');
  const empty = join(dir, 'empty.img');
  writeFileSync(empty, '');
  t.throws(() => overlay.prepare(overlay.parseArgs!(args(empty, join(dir, 'e-ov.img')))), /--base .*empty\.img is empty/);
  t.equal(openFds(), before);
});

t.test('a base that is not a multiple of 4096 bytes: the device rounds up, the tail reads as zeros', async (t) => {
  const { base, content, ov } = setup(3 * B + 100);
  const h = await openAsync(overlay, args(base, ov));
  t.equal(h.spec.sizeBytes, 4 * B);
  const last = await h.read(3 * B, B);
  t.same(last.subarray(0, 100), content.subarray(3 * B));
  t.same(last.subarray(100), Buffer.alloc(B - 100), 'past the base\'s end: zeros');
  await h.write(3 * B, fill(0x33));
  t.same(await h.read(3 * B, B), fill(0x33));
  await h.close();
  t.equal(Number(readFileSync(mapPath(ov)).readBigUInt64LE(16)), 3 * B + 100, 'the map records the base\'s exact size');
  t.same(readFileSync(base), content);
});

t.test('queues share the map: a write on one queue is read on another and persisted by its FLUSH', async (t) => {
  const { base, content, ov } = setup(16 * B);
  const h = await openAsync(overlay, args(base, ov));
  const q1 = await h.openQueue(1);
  await q1.write(7 * B, fill(0x71), false);
  t.same(await h.read(7 * B, B), fill(0x71), 'queue 0 reads queue 1\'s block from the overlay');
  await h.flush();
  t.same(mappedBlocks(readMap(mapPath(ov)).bits), [7], 'queue 0\'s FLUSH wrote queue 1\'s bit');
  t.ok(blockMapped(readMap(mapPath(ov)).bits, 7));
  await h.close();
  t.same(readFileSync(base), content);
});

t.test('requests outside the device or off the 4 KiB grid fail with EINVAL', async (t) => {
  const { base, ov } = setup(16 * B);
  const h = await openAsync(overlay, args(base, ov));
  t.equal(await h.request('read', 16 * B, B), -libc.EINVAL, 'past the end');
  t.equal(await h.request('write', 512, B), -libc.EINVAL, 'not aligned');
  t.equal(await h.request('zeroes', 15 * B, 2 * B), -libc.EINVAL, 'zeroes over the end');
  t.equal(await h.request('read', 0, 2 * B), 2 * B, 'a good read is its length');
  t.equal(await h.request('fua', B, B, fill(1)), B, 'a FUA write is its length');
  t.equal(await h.request('flush'), 0);
  const err = t.throws(() => h.handlers.read(16 * B, Buffer.alloc(B))) as Error & { code: string };
  t.equal(err.code, 'EINVAL');
  t.equal(errorResult(err), -libc.EINVAL);
  await h.close();
  t.equal(statSync(ov).size, 16 * B, 'no write extended the overlay');
});

t.test('crash ordering: the overlay is fdatasynced before the map pages are written, and the map after', async (t) => {
  const fs = await import('node:fs');
  const calls: string[] = [];
  let names = new Map<number, string>();
  const name = (fd: number) => names.get(fd) ?? 'other';
  // The fs module every module under overlay.ts sees, with its writes and syncs logged.
  const mocked = await t.mockImport<typeof import('../../src/targets/overlay.js')>('../../src/targets/overlay.js', {
    'node:fs': {
      ...fs,
      writeSync: (fd: number, ...rest: unknown[]) => {
        calls.push(`write ${name(fd)}`);
        return (fs.writeSync as (...a: unknown[]) => number)(fd, ...rest);
      },
      fdatasyncSync: (fd: number) => {
        calls.push(`fdatasync ${name(fd)}`);
        fs.fdatasyncSync(fd);
      },
    },
  });
  const { base, ov } = setup(16 * B);
  const h = await openAsync(mocked.default, args(base, ov));
  const d = h.spec.queueData as OverlayDevice;
  names = new Map([[d.baseFd, 'base'], [d.overlayFd, 'overlay'], [d.mapFd, 'map']]);
  calls.length = 0;
  await h.write(2 * B, fill(2));
  t.same(calls, ['write overlay'], 'a WRITE writes its data, nothing else');
  calls.length = 0;
  await h.flush();
  t.same(calls, ['fdatasync overlay', 'write map', 'fdatasync map'], 'FLUSH: data durable, then its bits');
  calls.length = 0;
  await h.write(3 * B, fill(3), true);
  t.same(calls, ['write overlay', 'fdatasync overlay', 'write map', 'fdatasync map'], 'FUA: the same, at once');
  calls.length = 0;
  await h.flush();
  t.same(calls, ['fdatasync overlay'], 'a FLUSH with no new bits syncs the data only');
  calls.length = 0;
  await h.writeZeroes(8 * B, B);
  await h.close();
  t.same(calls.filter((c) => c !== 'write overlay').slice(0, 3), ['fdatasync overlay', 'write map', 'fdatasync map'], 'close: the same order');
  t.notOk(calls.some((c) => c.endsWith('base')), 'the base is never written or synced');
});

t.test('queues in real threads share one map: every FLUSH persists what its queue wrote before it', async (t) => {
  const { base, content, ov } = setup(512 * B);
  const h = await openAsync(overlay, args(base, ov));
  const queues = 4;
  // Interleaved blocks, so that the queues set bits in the same bytes of the map at once.
  const blocksOf = (q: number) => Array.from({ length: 96 }, (_, k) => k * queues + q);
  const results = await Promise.all(Array.from({ length: queues }, (_, q) => new Promise<{ problems: string[] }>((resolve, reject) => {
    const w = new Worker(new URL('../helpers/ts-worker.mjs', import.meta.url), {
      workerData: { entry: new URL('./fixtures/overlay-queue-worker.ts', import.meta.url).href, options: h.options, device: h.spec.queueData, qid: q + 1, blocks: blocksOf(q) },
    });
    w.once('message', resolve);
    w.once('error', reject);
  })));
  t.same(results.flatMap((r) => r.problems), [], 'no FLUSH missed a bit of its own queue');
  const onDisk = mappedBlocks(readMap(mapPath(ov)).bits);
  t.equal(onDisk.length, 96 * queues, 'every written block is in the map on disk');
  t.same(onDisk, Array.from({ length: 96 * queues }, (_, i) => i));
  const got = await h.read(0, 512 * B);
  for (let i = 0; i < 512; i++) {
    const blk = got.subarray(i * B, (i + 1) * B);
    if (i < 96 * queues) {
      if (blk[0] !== (i % queues) + 1 || blk[1] !== (i & 0xff)) t.fail(`block ${i} does not hold its queue's data`);
    } else if (!blk.equals(content.subarray(i * B, (i + 1) * B))) t.fail(`block ${i} is not the base's`);
  }
  await h.close();
  t.same(readFileSync(base), content);
});
