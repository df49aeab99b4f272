/**
 * The qcow2 engine and target on the host (no ublk needed), against the real qemu-img and
 * qemu-io: images made by `qemu-img create` (v2 and v3, 512-byte to 2 MiB clusters, refcount
 * widths 1 to 64 bits), data written by qemu-io read through our engine, our writes checked by
 * `qemu-img check` (no corruption, no leak after a clean close) and `qemu-img compare` against
 * a raw file holding the same bytes, backing chains (qcow2 over qcow2 over raw), compressed
 * images, the refusals, and crashes: the I/O layer fails after every single write or fdatasync
 * of a workload in turn, with the writes since the last fdatasync kept, lost, or half lost, and
 * every resulting image must check free of corruption with every flushed byte intact.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { closeSync, fstatSync, ftruncateSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import qcow2 from '../../src/targets/qcow2.js';
import { fileIo, Qcow2Image, type ImageIo } from '../../src/targets/qcow2-image.js';
import { seededRandom } from '../../src/targets/layer-io.js';
import { TargetError } from '../../src/ublk/target.js';
import { UsageError } from '../../src/targets/options.js';
import { libc } from '../../src/libc/index.js';
import { openAsync } from '../helpers/async-harness.js';

const dir = mkdtempSync(join(tmpdir(), 'ublk-qcow2-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const K = 1024;
const M = 1024 * 1024;
let n = 0;
const path = (name: string) => join(dir, `${n++}-${name}`);

function run(cmd: string, args: string[]): { code: number; out: string; err: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', cwd: dir });
  return { code: r.status ?? -1, out: r.stdout, err: r.stderr };
}
function qemuImg(...args: string[]): string {
  const r = run('qemu-img', args);
  if (r.code !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${r.err}`);
  return r.out;
}
/** qemu-io commands on an image; throws on a failed command or pattern. */
function qemuIo(file: string, ...cmds: string[]): string {
  const r = run('qemu-io', [...cmds.flatMap((c) => ['-c', c]), file]);
  if (r.code !== 0 || /fail|error/i.test(r.out + r.err)) throw new Error(`qemu-io ${cmds.join('; ')}: ${r.out}${r.err}`);
  return r.out;
}
/** A new qcow2 image of `size` bytes, `opts` as qemu-img's -o. */
function create(name: string, size: number, opts = 'compat=1.1', extra: string[] = []): string {
  const f = path(name);
  qemuImg('create', '-q', '-f', 'qcow2', '-o', opts, ...extra, f, String(size));
  return f;
}

interface Check { code: number; corruptions: number; leaks: number; checkErrors: number; out: string }
/** `qemu-img check`: exit 0 clean, 3 leaks only, 2 corruption; counts from its JSON. */
function check(file: string): Check {
  const r = run('qemu-img', ['check', '--output=json', file]);
  let j: Record<string, number> = {};
  try { j = JSON.parse(r.out) as Record<string, number>; } catch { /* reported through code */ }
  return { code: r.code, corruptions: j.corruptions ?? 0, leaks: j.leaks ?? 0, checkErrors: j['check-errors'] ?? 0, out: r.out + r.err };
}
function compare(img: string, raw: string): { code: number; out: string } {
  const r = run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', img, raw]);
  return { code: r.code, out: r.out + r.err };
}
/** The image's contents through qemu itself. */
function qemuRaw(img: string): Buffer {
  const raw = path('conv.raw');
  qemuImg('convert', '-O', 'raw', img, raw);
  const b = readFileSync(raw);
  rmSync(raw);
  return b;
}
const fill = (byte: number, len: number) => Buffer.alloc(len, byte);
function readAll(img: Qcow2Image): Buffer {
  const b = Buffer.alloc(img.size, 0xee);
  img.read(0, b);
  return b;
}

t.test('options, and the device shape', async (t) => {
  t.throws(() => qcow2.parseArgs!([]), /qcow2 needs an image: -f IMAGE/);
  t.throws(() => qcow2.parseArgs!(['-f', 'a', '--bogus']), /qcow2: unknown option --bogus/);
  t.throws(() => qcow2.parseArgs!(['-f', 'a', '--read-only=1']), UsageError);
  t.same(qcow2.parseArgs!(['-f', 'x.qcow2']), { file: join(process.cwd(), 'x.qcow2'), readOnly: false });
  t.same(qcow2.parseArgs!(['--file', '/a', '--read-only']), { file: '/a', readOnly: true });
  const f = create('shape.qcow2', 32 * M, 'compat=1.1,cluster_size=65536');
  const h = await openAsync(qcow2, ['-f', f]);
  t.match(h.spec, {
    sizeBytes: 32 * M, logicalBlockSize: 512, physicalBlockSize: 4096, volatileCache: true, fua: true, readOnly: false,
    discard: { granularity: 65536 },
  });
  t.match(h.spec.describe, { file: f, version: 3, cluster_size: 65536, virtual_size: 32 * M, refcount_bits: 16 });
  t.ok(h.spec.discard!.maxWriteZeroesBytes > 0, 'write-zeroes advertised');
  t.match(h.spec.queueLimit, { max: 1, reason: /one queue/ }, '`add -q 2` is refused before a device exists');
  await t.rejects(h.openQueue(1), /serves one queue \(-q 1\).*queue 1/, 'a second queue is refused, naming -q 1');
  t.equal(await h.request('write', 4096, 4096, fill(0x11, 4096)), 4096);
  t.equal(await h.request('flush'), 0);
  t.equal(await h.request('fua', 3 * 65536, 4096, fill(0x12, 4096)), 4096);
  t.equal(await h.request('discard', 0, 65536), 0);
  t.equal(await h.request('zeroes', 65536, 65536), 0);
  t.equal(await h.request('read', 32 * M, 4096), -libc.EINVAL, 'a read past the end is EINVAL');
  t.ok(h.counter('allocated_clusters') >= 1 && h.counter('flushes') >= 2, 'counters move');
  await h.close();
  t.equal(check(f).code, 0, 'clean after close');
  const odd = create('odd.qcow2', 32 * M + 512);
  const o = await openAsync(qcow2, ['-f', odd]);
  t.equal(o.spec.logicalBlockSize, 512, 'a size that is not a multiple of 4096 is served too (512-byte blocks, as QEMU)');
  await o.close();
  // Read-only: O_RDONLY, no cache, writes are EROFS.
  const ro = await openAsync(qcow2, ['-f', f, '--read-only']);
  t.match(ro.spec, { readOnly: true, volatileCache: false });
  t.notOk(ro.spec.discard, 'no discard on a read-only disk');
  t.equal(await ro.request('write', 0, 4096, fill(1, 4096)), -libc.EROFS);
  t.same(await ro.read(3 * 65536, 4096), fill(0x12, 4096), 'the FUA write is there');
  await ro.close();
});

t.test('refusals name the feature and the way out', (t) => {
  const refused = (file: string, re: RegExp, what: string, readOnly = false) => {
    t.throws(() => qcow2.prepare({ file, readOnly }), re, what);
    try { qcow2.prepare({ file, readOnly }); } catch (e) { t.type(e, TargetError, `${what}: a TargetError`); }
  };
  refused(join(dir, 'nope.qcow2'), /does not exist \(qemu-img create -f qcow2/, 'a missing image');
  const raw = path('raw.img');
  writeFileSync(raw, Buffer.alloc(M));
  refused(raw, /not a qcow2 image.*-t loop/, 'a raw file');
  const luks = path('luks.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '--object', 'secret,id=sec0,data=abc', '-o', 'encrypt.format=luks,encrypt.key-secret=sec0', luks, '1M');
  refused(luks, /is encrypted \(LUKS\).*decrypt it first/, 'LUKS encryption');
  refused(luks, /is encrypted/, 'LUKS encryption, read-only too', true);
  refused(create('extl2.qcow2', M, 'compat=1.1,extended_l2=on'), /extended L2 entries.*extended_l2=off/, 'extended L2');
  const df = create('df.qcow2', M, `compat=1.1,data_file=${path('df.raw')}`);
  refused(df, /external data file.*-t loop/, 'an external data file');
  if (run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd', path('probe.qcow2'), '1M']).code === 0) {
    refused(create('zstd.qcow2', M, 'compat=1.1,compression_type=zstd'), /compression type 1 \(zstd\).*compression_type=zlib/, 'zstd compression');
  }
  // Header bits set by hand: byte 79 holds incompatible bits 0-7.
  const setBits = (name: string, bits: number) => {
    const f = create(name, M);
    const fd = openSync(f, 'r+');
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, 79);
    b[0]! |= bits;
    writeSync(fd, b, 0, 1, 79);
    closeSync(fd);
    return f;
  };
  refused(setBits('dirty.qcow2', 1), /marked dirty.*qemu-img check -r all/, 'the dirty bit');
  refused(setBits('corrupt.qcow2', 2), /marked corrupt.*qemu-img check -r all/, 'the corrupt bit');
  refused(setBits('unknown.qcow2', 0x80), /incompatible feature bit\(s\) 7, unknown to this ublk/, 'an unknown incompatible bit');
  const snap = create('snap.qcow2', M);
  qemuIo(snap, 'write -P 0x61 0 64k');
  qemuImg('snapshot', '-c', 's1', snap);
  refused(snap, /1 internal snapshot\(s\).*--read-only/, 'writing to an image with snapshots');
  const img = Qcow2Image.open(snap, { readOnly: true });
  const b = Buffer.alloc(64 * K);
  img.read(0, b);
  t.same(b, fill(0x61, 64 * K), 'with --read-only it is served');
  img.close();
  const bad = create('badback.qcow2', M, 'compat=1.1', ['-u', '-b', 'missing.raw', '-F', 'raw']);
  refused(bad, /cannot open its backing file .*missing\.raw.*relative to the image's directory/, 'a missing backing file');
  const vmdk = path('base.vmdk');
  qemuImg('create', '-q', '-f', 'vmdk', vmdk, '1M');
  refused(create('vmdkback.qcow2', M, 'compat=1.1', ['-b', vmdk, '-F', 'vmdk']), /format 'vmdk'; this ublk reads raw and qcow2/, 'a backing format we do not read');
  t.end();
});

t.test('a persistent bitmap: a writable open clears the autoclear bit, so qemu knows the bitmaps are stale (leaks only)', (t) => {
  const f = create('bitmap.qcow2', 16 * M);
  qemuImg('bitmap', '--add', f, 'b0');
  qemuIo(f, 'write -P 1 0 1M');
  const ro = Qcow2Image.open(f, { readOnly: true });
  t.equal(ro.header.autoclear, 1n, 'qemu set autoclear bit 0 (bitmaps consistent)');
  ro.close();
  const img = Qcow2Image.open(f);
  img.write(2 * M, fill(2, 64 * K));
  img.close();
  const b = Buffer.alloc(8);
  const fd = openSync(f, 'r');
  readSync(fd, b, 0, 8, 88);
  closeSync(fd);
  t.equal(b.readBigUInt64BE(0), 0n, 'the autoclear bits are 0 in the file');
  const c = check(f);
  t.ok(c.code === 0 || c.code === 3, `qemu-img check: no corruption (exit ${c.code})`);
  t.match(c.out, /lacking bitmap support modified this file/, 'and qemu says the bitmaps are inconsistent');
  qemuIo(f, 'read -P 1 0 1M', `read -P 2 ${2 * M} 64k`);
  t.end();
});

const CONFIGS = [
  { name: 'v2 (compat=0.10) 64K', opts: 'compat=0.10,cluster_size=65536' },
  { name: 'v3 64K', opts: 'compat=1.1,cluster_size=65536' },
  { name: 'v3 4K', opts: 'compat=1.1,cluster_size=4096' },
  { name: 'v3 2M', opts: 'compat=1.1,cluster_size=2097152' },
  { name: 'v3 512, lazy_refcounts=on', opts: 'compat=1.1,cluster_size=512,lazy_refcounts=on' },
  { name: 'v3 64K refcount_bits=1', opts: 'compat=1.1,refcount_bits=1' },
  { name: 'v3 4K refcount_bits=8', opts: 'compat=1.1,cluster_size=4096,refcount_bits=8' },
  { name: 'v3 64K refcount_bits=64', opts: 'compat=1.1,refcount_bits=64' },
  { name: 'v3 64K preallocation=metadata', opts: 'compat=1.1,preallocation=metadata' },
  { name: 'v2 4K preallocation=falloc', opts: 'compat=0.10,cluster_size=4096,preallocation=falloc' },
];

for (const cfg of CONFIGS) {
  t.test(`${cfg.name}: qemu-io's writes read through the engine; the engine's writes pass qemu-img check and compare`, (t) => {
    const size = 24 * M;
    const f = create('rw.qcow2', size, cfg.opts);
    const model = Buffer.alloc(size);
    const qio: Array<[number, number, number]> = [[0x5a, 0, 4 * K], [0x5b, 100 * K, 200 * K], [0x5c, 3 * M - 512, 70 * K], [0x5d, 20 * M, 2 * M + 4 * K]];
    for (const [p, off, len] of qio) {
      qemuIo(f, `write -P 0x${p.toString(16)} ${off} ${len}`);
      model.fill(p, off, off + len);
    }
    qemuIo(f, `write -z ${110 * K} ${8 * K}`);
    model.fill(0, 110 * K, 118 * K);
    let img = Qcow2Image.open(f);
    t.ok(readAll(img).equals(model), 'every byte qemu-io wrote (and zeroed) reads the same');
    // Our writes: within a cluster, across clusters, over qemu's data, unaligned to clusters.
    const ours: Array<[number, number]> = [[8 * K, 4 * K], [60 * K, 12 * K], [150 * K, 100 * K], [3 * M, 512 * K], [5 * M + 512, 1536], [size - 4 * K, 4 * K]];
    for (const [off, len] of ours) {
      const d = randomBytes(len);
      img.write(off, d);
      d.copy(model, off);
    }
    img.writeZeroes(21 * M, M);
    model.fill(0, 21 * M, 22 * M);
    t.ok(readAll(img).equals(model), 'the engine reads its own writes before a flush');
    img.close();
    const c = check(f);
    t.equal(c.code, 0, `qemu-img check: no corruption and no leak after a clean close ${c.code ? c.out : ''}`);
    const raw = path('model.raw');
    writeFileSync(raw, model);
    const cmp = compare(f, raw);
    t.equal(cmp.code, 0, `qemu-img compare with a raw file holding the same writes ${cmp.code ? cmp.out : ''}`);
    for (const [off, len] of ours.slice(0, 2)) {
      const pat = model[off]!;
      if (model.subarray(off, off + len).every((x) => x === pat)) qemuIo(f, `read -P 0x${pat.toString(16)} ${off} ${len}`);
    }
    qemuIo(f, `read -P 0x5d ${20 * M} ${M}`, `read -P 0 ${21 * M} ${M}`);
    img = Qcow2Image.open(f, { readOnly: true });
    t.ok(readAll(img).equals(model), 'opened again, the same bytes');
    img.close();
    t.end();
  });
}

/** Random writes, zeroes, discards and flushes against a model buffer. */
function fuzz(img: Qcow2Image, model: Buffer, rnd: () => number, ops: number, onFlush?: () => void): void {
  const size = img.size;
  const sector = 512;
  for (let i = 0; i < ops; i++) {
    const r = rnd();
    const len = Math.max(1, Math.floor(rnd() * rnd() * 48)) * (rnd() < 0.5 ? sector : 4096);
    const off = Math.min(Math.floor((rnd() * size) / sector) * sector, size - len);
    if (r < 0.55) {
      const d = randomBytes(len);
      img.write(off, d, rnd() < 0.05);
      d.copy(model, off);
    } else if (r < 0.7) {
      img.writeZeroes(off, len, rnd() < 0.3);
      model.fill(0, off, off + len);
    } else if (r < 0.8) {
      // A discard changes only whole clusters; the model learns what the image reads now.
      img.discard(off, len);
      img.read(off, model.subarray(off, off + len));
    } else if (r < 0.9) {
      const b = Buffer.alloc(len);
      img.read(off, b);
      if (!b.equals(model.subarray(off, off + len))) throw new Error(`op ${i}: ${len} bytes at ${off} differ from the model`);
    } else {
      img.flush();
      onFlush?.();
    }
  }
}

for (const [cfg, cacheBytes] of [[CONFIGS[0]!, undefined], [CONFIGS[2]!, 16 * 4096], [CONFIGS[4]!, undefined]] as const) {
  const small = cacheBytes ? `, a ${cacheBytes / 1024} KiB table cache (flushed and emptied as it fills)` : '';
  t.test(`${cfg.name}${small}: random writes, zeroes, discards and flushes match a model; qemu-img agrees`, (t) => {
    const size = 8 * M;
    const f = create('fuzz.qcow2', size, cfg.opts);
    const model = Buffer.alloc(size);
    let img = Qcow2Image.open(f, { cacheBytes });
    fuzz(img, model, seededRandom(42), 1500);
    t.ok(readAll(img).equals(model), 'the engine reads the model');
    img.close();
    const c = check(f);
    t.equal(c.code, 0, `qemu-img check clean ${c.code ? c.out : ''}`);
    const raw = path('fuzz.raw');
    writeFileSync(raw, model);
    t.equal(compare(f, raw).code, 0, 'qemu-img compare: the same bytes');
    img = Qcow2Image.open(f);
    fuzz(img, model, seededRandom(7), 500);
    img.close();
    writeFileSync(raw, model);
    t.equal(check(f).code, 0, 'clean after a second session');
    t.equal(compare(f, raw).code, 0, 'and the same bytes');
    t.end();
  });
}

t.test('a backing chain: qcow2 over qcow2 over raw, relative names, copy-on-write, zero flags over the backing', (t) => {
  const size = 16 * M;
  const base = path('base.raw');
  const baseData = randomBytes(size - M); // shorter than the top: the rest reads as zeros
  writeFileSync(base, baseData);
  const mid = path('mid.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=1.1,cluster_size=65536', '-b', base.split('/').pop()!, '-F', 'raw', mid, String(size));
  qemuIo(mid, `write -P 0x6d ${2 * M} ${M}`, `write -z ${5 * M} ${128 * K}`);
  const top = path('top.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=1.1,cluster_size=4096', '-b', mid.split('/').pop()!, '-F', 'qcow2', top, String(size));
  qemuIo(top, `write -P 0x70 ${3 * M} ${8 * K}`);
  const model = Buffer.alloc(size);
  baseData.copy(model);
  model.fill(0x6d, 2 * M, 3 * M);
  model.fill(0, 5 * M, 5 * M + 128 * K);
  model.fill(0x70, 3 * M, 3 * M + 8 * K);
  const baseBefore = readFileSync(base);
  const midBefore = readFileSync(mid);
  const img = Qcow2Image.open(top);
  t.same(img.chain.map((c) => c.format), ['qcow2', 'qcow2', 'raw'], 'the chain, top first');
  t.ok(readAll(img).equals(model), 'reads go through the chain (zeros past the raw base)');
  t.ok(readAll(img).equals(qemuRaw(top)), 'as qemu reads it');
  // Partial-cluster writes copy the rest of the cluster from the backing.
  const d = randomBytes(1024);
  img.write(2 * M + 512, d);
  d.copy(model, 2 * M + 512);
  img.write(7 * M + 100 * 512, fill(0x77, 512));
  model.fill(0x77, 7 * M + 51200, 7 * M + 51712);
  t.ok(img.stats.cowReads >= 2, 'copy-on-write read the backing');
  // Discard and zeroes must not let the backing show through.
  img.discard(8 * M, 64 * K);
  model.fill(0, 8 * M, 8 * M + 64 * K);
  img.writeZeroes(9 * M, 8 * K);
  model.fill(0, 9 * M, 9 * M + 8 * K);
  t.ok(readAll(img).equals(model), 'the engine reads its writes over the chain');
  img.close();
  const c = check(top);
  t.equal(c.code, 0, `qemu-img check of the top clean ${c.code ? c.out : ''}`);
  t.ok(qemuRaw(top).equals(model), 'qemu reads the same through the chain');
  t.ok(readFileSync(base).equals(baseBefore), 'the raw base is unchanged');
  t.ok(readFileSync(mid).equals(midBefore), 'the middle qcow2 is unchanged');
  // v2 over a backing: no zero flag, so zeroes are written and a discard keeps the data.
  const v2 = path('v2top.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', '-b', base, '-F', 'raw', v2, String(size));
  const im2 = Qcow2Image.open(v2);
  im2.writeZeroes(0, 128 * K);
  im2.discard(M, 64 * K);
  const b = Buffer.alloc(64 * K);
  im2.read(M, b);
  t.ok(b.equals(baseData.subarray(M, M + 64 * K)), 'v2: a discard leaves the backing data readable (it is a hint)');
  im2.read(0, b);
  t.ok(b.equals(Buffer.alloc(64 * K)), 'v2: zeroes read as zeros');
  im2.close();
  t.equal(check(v2).code, 0, 'v2 over raw: clean');
  t.end();
});

t.test('compressed clusters: read as qemu reads them; a write to one allocates a normal cluster', (t) => {
  const size = 8 * M;
  for (const opts of ['compat=1.1,cluster_size=65536', 'compat=0.10,cluster_size=4096', 'compat=1.1,cluster_size=2097152']) {
    const src = create('src.qcow2', size, opts);
    qemuIo(src, `write -P 0x41 0 ${3 * M}`, `write -P 0x42 ${4 * M + 4 * K} ${100 * K}`);
    const raw = path('src.raw');
    const data = Buffer.alloc(size);
    data.fill(0x41, 0, 3 * M);
    randomBytes(M).copy(data, 5 * M); // incompressible
    data.fill(0x42, 4 * M + 4 * K, 4 * M + 104 * K);
    writeFileSync(raw, data);
    const comp = path('comp.qcow2');
    qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', opts, raw, comp);
    const img = Qcow2Image.open(comp);
    t.ok(readAll(img).equals(data), `${opts}: a compressed image reads as its source`);
    t.ok(img.stats.compressedReads > 0, 'through compressed clusters');
    const before = img.stats.allocatedClusters;
    img.write(4 * K, fill(0x99, 4 * K));
    data.fill(0x99, 4 * K, 8 * K);
    img.write(4 * M + 8 * K, fill(0x98, 512));
    data.fill(0x98, 4 * M + 8 * K, 4 * M + 8 * K + 512);
    t.ok(img.stats.allocatedClusters > before, 'the writes allocated normal clusters');
    img.discard(0, img.clusterSize); // a compressed cluster freed
    data.fill(0, 0, img.clusterSize);
    t.ok(readAll(img).equals(data), 'the rest of each cluster came from the compressed data');
    img.close();
    const c = check(comp);
    t.equal(c.code, 0, `${opts}: qemu-img check clean (compressed refcounts released exactly) ${c.code ? c.out : ''}`);
    writeFileSync(raw, data);
    t.equal(compare(comp, raw).code, 0, 'qemu-img compare: the same bytes');
  }
  t.end();
});

t.test('the refcount table grows when the image outgrows it (512-byte clusters)', (t) => {
  const size = 24 * M;
  const f = create('grow.qcow2', size, 'compat=1.1,cluster_size=512');
  const model = Buffer.alloc(size);
  const img = Qcow2Image.open(f);
  for (let off = 0; off < size; off += 256 * K) {
    const d = randomBytes(256 * K);
    img.write(off, d);
    d.copy(model, off);
  }
  t.ok(img.stats.refTableGrowths >= 1, `the table grew ${img.stats.refTableGrowths} time(s)`);
  img.close();
  const c = check(f);
  t.equal(c.code, 0, `qemu-img check clean after the growth ${c.code ? c.out : ''}`);
  const raw = path('grow.raw');
  writeFileSync(raw, model);
  t.equal(compare(f, raw).code, 0, 'qemu-img compare: the same bytes');
  t.end();
});

/**
 * An ImageIo that fails the `limit`-th write or fdatasync of the image, as a crash would, after
 * making the file what a crash may leave: `keep` every write so far, `drop` each one since the
 * last fdatasync (undone newest first, the file cut back to its synced size), or `half` of them
 * (a seeded choice, undone newest first).
 */
class CrashIo implements ImageIo {
  ops = 0;
  crashed = false;
  private undo: Array<{ fd: number; pos: number; old: Buffer }> = [];
  private syncedSize = new Map<number, number>();
  constructor(private readonly limit: number, private readonly mode: 'keep' | 'drop' | 'half', private readonly seed = 1) {}

  read(fd: number, buf: Uint8Array, off: number, len: number, pos: number): number {
    return fileIo.read(fd, buf, off, len, pos);
  }

  write(fd: number, buf: Uint8Array, off: number, len: number, pos: number): void {
    this.step(fd);
    if (!this.syncedSize.has(fd)) this.syncedSize.set(fd, fstatSync(fd).size);
    const old = Buffer.alloc(len);
    fileIo.read(fd, old, 0, len, pos);
    this.undo.push({ fd, pos, old });
    fileIo.write(fd, buf, off, len, pos);
  }

  sync(fd: number): void {
    this.step(fd);
    fileIo.sync(fd);
    this.undo = this.undo.filter((u) => u.fd !== fd);
    this.syncedSize.set(fd, fstatSync(fd).size);
  }

  private step(fd: number): void {
    if (this.crashed) throw new Error('crashed already');
    if (++this.ops < this.limit) return;
    this.crashed = true;
    if (this.mode !== 'keep') {
      const rnd = seededRandom(this.seed);
      for (const u of this.undo.reverse()) if (this.mode === 'drop' || rnd() < 0.5) fileIo.write(u.fd, u.old, 0, u.old.length, u.pos);
      if (this.mode === 'drop') for (const [f, size] of this.syncedSize) ftruncateSync(f, size);
    }
    void fd;
    throw Object.assign(new Error(`simulated crash at I/O ${this.ops}`), { code: 'EIO' });
  }
}

t.test('a crash at every write and fdatasync leaves an image qemu-img check calls free of corruption, flushed data intact', (t) => {
  const size = 4 * M;
  for (const cfg of [{ opts: 'compat=1.1,cluster_size=4096', backing: false }, { opts: 'compat=1.1,cluster_size=65536', backing: true }, { opts: 'compat=0.10,cluster_size=512', backing: false }]) {
    let base: string | undefined;
    let baseData = Buffer.alloc(size);
    if (cfg.backing) {
      base = path('crash-base.raw');
      baseData = randomBytes(size);
      writeFileSync(base, baseData);
    }
    const template = create('crash-template.qcow2', size, cfg.opts, base ? ['-b', base, '-F', 'raw'] : []);
    const templateBytes = readFileSync(template);
    // The workload, deterministic: rounds of writes (new clusters, overwrites, partial
    // clusters), zeroes and discards, each round ended by a flush. Run once to count its I/O.
    const workload = (img: Qcow2Image, model: Buffer, flushed: Buffer[], touched: Uint8Array) => {
      const rnd = seededRandom(99);
      const touch = (off: number, len: number) => touched.fill(1, off / 512, (off + len) / 512);
      for (let round = 0; round < 6; round++) {
        for (let k = 0; k < 6; k++) {
          const len = (1 + Math.floor(rnd() * 16)) * 512;
          const off = Math.floor((rnd() * (size - len)) / 512) * 512;
          const d = randomBytes(len);
          touch(off, len);
          img.write(off, d);
          d.copy(model, off);
        }
        const zo = Math.floor(rnd() * 60) * 64 * K;
        touch(zo, 64 * K);
        img.writeZeroes(zo, 64 * K);
        model.fill(0, zo, zo + 64 * K);
        const dOff = Math.floor(rnd() * 60) * 64 * K;
        touch(dOff, 64 * K);
        img.discard(dOff, 64 * K);
        img.read(dOff, model.subarray(dOff, dOff + 64 * K));
        img.flush();
        flushed.push(Buffer.from(model));
        touched.fill(0);
      }
    };
    const counting = new CrashIo(Infinity, 'keep');
    const f0 = path('crash-count.qcow2');
    writeFileSync(f0, templateBytes);
    const m0 = Buffer.from(baseData);
    const img0 = Qcow2Image.open(f0, { io: counting });
    workload(img0, m0, [], new Uint8Array(size / 512));
    img0.close();
    const total = counting.ops;
    t.ok(total > 50, `the workload does ${total} writes and fdatasyncs`);
    let bad = 0;
    let lost = 0;
    let checked = 0;
    // Every I/O of the first two workloads; of the 512-byte-cluster one (400 I/Os), every fifth
    // (a different phase of its metadata writes each time, and half the test's run time).
    const stride = total > 200 ? 5 : 1;
    for (let limit = 1; limit <= total; limit += stride) {
      for (const mode of ['keep', 'drop', 'half'] as const) {
        const f = join(dir, 'crash.qcow2');
        writeFileSync(f, templateBytes);
        const io = new CrashIo(limit, mode, limit);
        const model = Buffer.from(baseData);
        const flushed: Buffer[] = [Buffer.from(baseData)];
        const touched = new Uint8Array(size / 512);
        const img = Qcow2Image.open(f, { io });
        try {
          workload(img, model, flushed, touched);
          img.close();
        } catch (e) {
          if (!io.crashed) throw e;
          img.abandon();
        }
        const c = check(f);
        checked++;
        if (c.code !== 0 && c.code !== 3) {
          bad++;
          if (bad <= 3) t.fail(`${cfg.opts}: crash at I/O ${limit} (${mode}): qemu-img check exit ${c.code}: ${c.out}`);
          continue;
        }
        // What the last completed flush made durable is there, byte for byte, wherever no later
        // request (which may or may not have landed, in part) touched it.
        const last = flushed[flushed.length - 1]!;
        const now = Qcow2Image.open(f, { readOnly: true });
        const got = readAll(now);
        now.close();
        for (let s = 0; s < size; s += 512) {
          const a = got.subarray(s, s + 512);
          if (!touched[s / 512] && !a.equals(last.subarray(s, s + 512))) {
            lost++;
            if (lost <= 3) t.fail(`${cfg.opts}: crash at I/O ${limit} (${mode}): sector ${s / 512}, untouched since the last flush, lost its flushed data`);
            break;
          }
        }
      }
    }
    t.equal(bad, 0, `${cfg.opts}${cfg.backing ? ' over a raw backing' : ''}: ${checked} crashed images, none corrupt`);
    t.equal(lost, 0, 'and none lost flushed data');
  }
  t.end();
});
