/**
 * The loop target's request logic on the host (no ublk needed): every request type against a
 * real backing file through a real io_uring (test/helpers/target-harness.ts), plus the checks
 * `prepare` makes before any device exists. The same target runs under ublk_drv in
 * test/vm/loop.vm.ts.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, readdirSync, readFileSync, rmSync, statfsSync, truncateSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import loop, { type LoopOptions } from '../../src/targets/loop.js';
import { TMPFS_MAGIC } from '../../src/targets/abi.js';
import { TargetError } from '../../src/ublk/target.js';
import { UsageError } from '../../src/targets/options.js';
import { sys, abi as uringAbi, libc } from '../../src/uring/index.js';
import {
  UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_FLUSH, UBLK_IO_OP_DISCARD, UBLK_IO_OP_WRITE_ZEROES,
  UBLK_IO_OP_WRITE_SAME, UBLK_IO_F_FUA, UBLK_IO_F_NOUNMAP,
} from '../../src/ublk/abi.js';
import { TargetHarness } from '../helpers/target-harness.js';

const dir = mkdtempSync(join(tmpdir(), 'ublk-loop-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const MiB = 2 ** 20;
const openFds = () => readdirSync('/proc/self/fd').length;

function backing(name: string, size: number, content?: Buffer): string {
  const f = join(dir, name);
  if (content) writeFileSync(f, content);
  else writeFileSync(f, '');
  truncateSync(f, size);
  return f;
}

/** Data segments and holes of a file, from SEEK_DATA/SEEK_HOLE (python's os.lseek). */
function extents(file: string): Array<[number, number]> {
  const py = `import os,sys
fd=os.open(sys.argv[1],os.O_RDONLY); end=os.fstat(fd).st_size; off=0; out=[]
while off<end:
  try: d=os.lseek(fd,off,os.SEEK_DATA)
  except OSError: break
  h=os.lseek(fd,d,os.SEEK_HOLE); out.append([d,h]); off=h
print(out)`;
  const r = spawnSync('python3', ['-c', py, file], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(r.stderr);
  return JSON.parse(r.stdout.replace(/\(/g, '[').replace(/\)/g, ']')) as Array<[number, number]>;
}

function harness(o: Partial<LoopOptions> & { file: string }, depth = 8) {
  const opts = loop.parseArgs(['-f', o.file, ...(o.buffered ? ['--buffered'] : []), ...(o.offset ? ['--offset', String(o.offset)] : [])]);
  const spec = loop.prepare(opts);
  const h = new TargetHarness(loop, opts, spec.queueData, { depth });
  const counter = (name: string) => h.counters[loop.counters!.indexOf(name)]!;
  return { h, spec, counter, close: () => { h.close(); spec.release!(); } };
}

t.test('options: a backing is required, paths become absolute, unknown options are named', (t) => {
  t.throws(() => loop.parseArgs([]), UsageError);
  t.throws(() => loop.parseArgs(['-f', 'x', '--bogus']), /loop: unknown option --bogus/);
  t.throws(() => loop.parseArgs(['-f', 'x', '--block-size', '8192']), /--block-size must be 512, 1024, 2048 or 4096/);
  t.throws(() => loop.parseArgs(['-f', 'x', '-r']), /loop: unknown option -r/, '-r is kublk\'s recovery: read-only is --read-only');
  const o = loop.parseArgs(['-f', 'rel.img', '--offset', '1M', '--read-only', '--buffered']);
  t.equal(o.file, join(process.cwd(), 'rel.img'));
  t.match(o, { offset: MiB, readOnly: true, buffered: true });
  t.equal(loop.parseArgs(['-f', 'x', '--offset', '0']).offset, 0);
  t.equal(loop.parseArgs(['-f', 'x', '--offset', '00']).offset, 0, '00 is 0 too');
  t.equal(loop.parseArgs(['x.img']).file, join(process.cwd(), 'x.img'), 'kublk\'s form: the backing file after the options');
  // What needs no backing to check is a usage error (exit 2), before anything is opened.
  t.throws(() => loop.parseArgs(['-f', 'x', '--offset', '1000']), /--offset must be a multiple of the block size 512, got 1000/);
  t.throws(() => loop.parseArgs(['-f', 'x', '-s', '1000']), /--size must be a multiple of the block size 512, got 1000/);
  t.end();
});

t.test('prepare refuses bad backings before any device exists, and leaks no fd', (t) => {
  const before = openFds();
  const bad: Array<[string[], RegExp]> = [
    [['-f', join(dir, 'missing.img')], /missing\.img does not exist/],
    [['-f', dir], /is a directory; -f takes a file or a block device/],
    [['-f', '/dev/null'], /neither a regular file nor a block device/],
    [['-f', backing('tiny.img', 100)], /smaller than one block \(100 bytes, block size 512\)/],
    [['-f', backing('small.img', 64 * 1024), '--offset', '64K'], /has 0 bytes after --offset 65536, less than one 512-byte block/],
    [['-f', backing('big.img', MiB), '-s', '2M'], /--size 2097152 is larger than the 1048576 bytes/],
  ];
  for (const [args, re] of bad) {
    t.throws(() => loop.prepare(loop.parseArgs(args)), re, args.join(' '));
  }
  const ro = backing('ro.img', MiB);
  chmodSync(ro, 0o444);
  t.throws(() => loop.prepare(loop.parseArgs(['-f', ro])), /ro\.img is read-only \(mode 0444\): add --read-only, or chmod u\+w it/);
  const spec = loop.prepare(loop.parseArgs(['-f', ro, '--read-only']));
  t.match(spec, { sizeBytes: MiB, readOnly: true, volatileCache: false, discard: undefined }, 'read-only: no cache, no discard');
  spec.release!();
  t.type(new TargetError('x'), Error);
  t.equal(openFds(), before, 'every failed prepare closed what it opened');
  t.end();
});

t.test('prepare takes the size and block sizes from the backing, minus the offset', (t) => {
  const f = backing('shape.img', 8 * MiB + 300);
  const spec = loop.prepare(loop.parseArgs(['-f', f, '--offset', '1M']));
  t.match(spec, {
    sizeBytes: 7 * MiB, // the odd 300 bytes do not make a block
    logicalBlockSize: 512,
    readOnly: false,
    volatileCache: true,
    fua: true,
    describe: { file: f, offset: MiB, direct: true },
  });
  t.ok(spec.physicalBlockSize! >= 512 && spec.physicalBlockSize! <= 4096, `physical ${spec.physicalBlockSize}`);
  t.ok(spec.discard && spec.discard.maxBytes > 0 && spec.discard.granularity >= 512, 'discard advertised');
  spec.release!();
  const s2 = loop.prepare(loop.parseArgs(['-f', f, '-s', '4M', '--block-size', '4096']));
  t.match(s2, { sizeBytes: 4 * MiB, logicalBlockSize: 4096, physicalBlockSize: 4096 });
  s2.release!();
  t.end();
});

for (const buffered of [false, true]) {
  t.test(`read and write round-trip at odd offsets (${buffered ? 'buffered' : 'O_DIRECT'}), and the offset shifts them`, (t) => {
    const f = backing(`rw-${buffered}.img`, 16 * MiB);
    const { h, counter, close } = harness({ file: f, buffered, offset: MiB });
    const writes: Array<[number, number, number]> = [[0, 0, 4096], [1, 8192 + 512, 512], [2, 5 * MiB - 1536, 65536 + 512], [3, 15 * MiB - 4096, 4096]];
    const data = new Map<number, Buffer>();
    for (const [tag, off, len] of writes) {
      const d = randomBytes(len);
      data.set(tag, d);
      d.copy(h.buffer(tag));
      h.submit(tag, UBLK_IO_OP_WRITE, off, len);
    }
    h.drain();
    for (const [tag, , len] of writes) t.equal(h.results.get(tag), len, `write tag ${tag} completes with its length`);
    const file = readFileSync(f);
    for (const [tag, off, len] of writes) t.ok(file.subarray(MiB + off, MiB + off + len).equals(data.get(tag)!), `tag ${tag}'s bytes are at offset + 1 MiB in the file`);
    for (const [tag, off, len] of writes) {
      h.buffer(tag).fill(0xee, 0, len);
      t.equal(h.run(tag, UBLK_IO_OP_READ, off, len), len);
      t.ok(h.buffer(tag, len).equals(data.get(tag)!), `tag ${tag} reads back`);
    }
    t.equal(counter('short_resubmits'), 0);
    t.equal(counter('errors'), 0);
    close();
    t.end();
  });
}

t.test('FUA writes carry RWF_DSYNC; FLUSH is an fdatasync that completes with 0', (t) => {
  const f = backing('fua.img', 4 * MiB);
  const { h, counter, close } = harness({ file: f });
  randomBytes(4096).copy(h.buffer(0));
  // O_DIRECT transfers go with RWF_NOWAIT (the queue links their commit behind them, which must
  // never run in an io-wq worker); one that would block (here: a write into a hole of the sparse
  // backing, which needs blocks allocated, on most file systems) fails with EAGAIN and is sent
  // again without NOWAIT and without the link.
  t.equal(h.run(0, UBLK_IO_OP_WRITE, 0, 4096, UBLK_IO_F_FUA), 4096);
  const writes = h.sqes.filter((s) => (s[0]! & 0xff) === uringAbi.IORING_OP_WRITE);
  t.equal(writes[0]![7], libc.RWF_DSYNC | libc.RWF_NOWAIT, 'a WRITE with rw_flags = RWF_DSYNC, and NOWAIT');
  t.equal((writes[0]![0]! >>> 8) & uringAbi.IOSQE_FIXED_FILE, uringAbi.IOSQE_FIXED_FILE, 'on the registered backing (fixed file)');
  t.equal(counter('nowait_retries'), writes.length - 1, `${writes.length - 1} EAGAIN retries counted`);
  for (const retry of writes.slice(1)) t.equal(retry[7], libc.RWF_DSYNC, 'a retry keeps DSYNC, without NOWAIT');
  t.equal(h.trackAndCommits, 1, 'the first went with trackAndCommit (the queue links its commit)');
  t.equal(h.run(1, UBLK_IO_OP_WRITE, 0, 4096), 4096, 'a write over written blocks');
  t.equal(h.sqes[h.sqes.length - 1]![7], libc.RWF_NOWAIT, 'has no rw_flags but NOWAIT');
  t.equal(counter('dsync_writes'), 1, 'one FUA write');
  t.equal(h.run(2, UBLK_IO_OP_FLUSH, 0, 0), 0, 'FLUSH completes with 0');
  const fs = h.sqes[h.sqes.length - 1]!;
  t.equal(fs[0]! & 0xff, uringAbi.IORING_OP_FSYNC);
  t.equal(fs[7], uringAbi.IORING_FSYNC_DATASYNC, 'fdatasync, not fsync');
  t.equal(counter('fdatasync'), 1, 'counted once it succeeded');
  close();
  t.end();
});

t.test('DISCARD punches a hole, WRITE_ZEROES zeroes with or without NOUNMAP; all complete with 0', (t) => {
  const f = backing('discard.img', 8 * MiB, randomBytes(8 * MiB));
  const { h, counter, close } = harness({ file: f });
  t.same(extents(f), [[0, 8 * MiB]], 'fully allocated to begin with');
  t.equal(h.run(0, UBLK_IO_OP_DISCARD, MiB, 2 * MiB), 0, 'DISCARD: 0, not a byte count');
  t.same(extents(f), [[0, MiB], [3 * MiB, 8 * MiB]], 'a hole where the discard was');
  t.equal(h.run(1, UBLK_IO_OP_WRITE_ZEROES, 4 * MiB, MiB), 0, 'WRITE_ZEROES (may unmap): 0');
  t.same(extents(f), [[0, MiB], [3 * MiB, 4 * MiB], [5 * MiB, 8 * MiB]], 'without NOUNMAP it punches');
  t.equal(h.run(2, UBLK_IO_OP_WRITE_ZEROES, 6 * MiB, MiB, UBLK_IO_F_NOUNMAP), 0, 'WRITE_ZEROES NOUNMAP: 0');
  t.same(extents(f), [[0, MiB], [3 * MiB, 4 * MiB], [5 * MiB, 8 * MiB]], 'with NOUNMAP the blocks stay allocated');
  const file = readFileSync(f);
  for (const [a, b] of [[MiB, 3 * MiB], [4 * MiB, 5 * MiB], [6 * MiB, 7 * MiB]] as const) {
    t.ok(file.subarray(a, b).every((x) => x === 0), `[${a / MiB}M, ${b / MiB}M) reads as zeros`);
  }
  t.ok(file.subarray(7 * MiB, 8 * MiB).some((x) => x !== 0), 'the rest is untouched');
  t.same([counter('punch_hole'), counter('zero_range')], [2, 1]);
  close();
  t.end();
});

t.test('a 3 GiB DISCARD completes with 0 (a byte count would overflow the 32-bit result)', (t) => {
  const f = backing('huge.img', 4 * 2 ** 30);
  const { h, close } = harness({ file: f });
  t.equal(h.run(0, UBLK_IO_OP_DISCARD, 0, 3 * 2 ** 30), 0);
  t.equal(h.run(1, UBLK_IO_OP_WRITE_ZEROES, 0, 3 * 2 ** 30), 0);
  close();
  t.end();
});

t.test('short reads and writes are resubmitted for the rest, not returned', (t) => {
  // Written in full first: a write into a hole could also fail NOWAIT (EAGAIN) and be resent.
  const f = backing('short.img', 4 * MiB, randomBytes(4 * MiB));
  const { h, counter, close } = harness({ file: f });
  // Halve the first READ/WRITE SQE of each request (the one asking for all 64 KiB): the kernel
  // really transfers half, and the handler sees a genuine short count.
  h.tamper = (s, w) => {
    const op = s[w]! & 0xff;
    if ((op === uringAbi.IORING_OP_READ || op === uringAbi.IORING_OP_WRITE) && s[w + 6] === 65536) s[w + 6] = 32768;
  };
  const d = randomBytes(65536);
  d.copy(h.buffer(0));
  t.equal(h.run(0, UBLK_IO_OP_WRITE, 8192, 65536), 65536, 'the write completes whole');
  t.ok(readFileSync(f).subarray(8192, 8192 + 65536).equals(d), 'and all of it reached the file');
  h.buffer(1).fill(0);
  t.equal(h.run(1, UBLK_IO_OP_READ, 8192, 65536), 65536, 'the read completes whole');
  t.ok(h.buffer(1, 65536).equals(d), 'with every byte');
  t.equal(counter('short_resubmits'), 2, 'one resubmission each');
  // (Leaving out NOWAIT transfers that failed EAGAIN and were sent again: the host's page cache decides those.)
  const rw = h.sqes.filter((s, i) => ((s[0]! & 0xff) === uringAbi.IORING_OP_READ || (s[0]! & 0xff) === uringAbi.IORING_OP_WRITE)
    && h.sqeResults[i] !== -libc.EAGAIN);
  t.same(rw.map((s) => [s[2], s[6]]), [[8192, 32768], [8192 + 32768, 32768], [8192, 32768], [8192 + 32768, 32768]],
    'each remainder starts where the short transfer ended');
  close();
  t.end();
});

t.test('a backing that shrank reads as zeros past its end; errors (ENOSPC) reach the block layer', (t) => {
  const f = backing('shrink.img', 4 * MiB, randomBytes(4 * MiB));
  const { h, close } = harness({ file: f, buffered: true });
  truncateSync(f, 2 * MiB + 4096);
  h.buffer(0).fill(0xaa);
  t.equal(h.run(0, UBLK_IO_OP_READ, 2 * MiB, 65536), 65536, 'read across the new end completes');
  t.ok(h.buffer(0, 65536).subarray(4096).every((x) => x === 0), 'zeros past the end');
  t.notOk(h.buffer(0, 4096).every((x) => x === 0), 'data before it');
  close();

  // /dev/full answers every write with ENOSPC; the handler is opened on it directly.
  const fd = sys.open('/dev/full', libc.O_RDWR | libc.O_CLOEXEC);
  const full = new TargetHarness(loop, {}, { fd, offset: 0 });
  t.equal(full.run(0, UBLK_IO_OP_WRITE, 0, 4096), -libc.ENOSPC, 'ENOSPC, as -errno');
  t.equal(full.run(1, UBLK_IO_OP_WRITE_SAME, 0, 4096), -libc.EOPNOTSUPP, 'an op loop does not do: EOPNOTSUPP');
  t.equal(full.run(2, UBLK_IO_OP_READ, 0, 0), 0, 'a zero-length read is 0 without touching the backing');
  t.equal(full.counters[loop.counters!.indexOf('errors')], 1);
  full.close();
  sys.close(fd);
  t.end();
});

t.test('a backing on tmpfs is opened O_NONBLOCK, so io_uring serves it inline, without io-wq workers', (t) => {
  // The contrast needs a tmpfs file and one on a file system with FMODE_NOWAIT (ext4, xfs...).
  const shm = '/dev/shm';
  t.equal(statfsSync(shm).type, TMPFS_MAGIC, `${shm} must be tmpfs for this test`);
  t.not(statfsSync(dir).type, TMPFS_MAGIC, `${dir} must not be tmpfs for this test`);
  const probe = (file: string, how: 'prepare' | 'plain') => {
    // A child process: its only ring is the probe's, so any iou-wrk thread is the probe's doing.
    const r = spawnSync(process.execPath, [...process.execArgv, fileURLToPath(new URL('../helpers/loop-iowq-probe.ts', import.meta.url)), file, how], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`probe failed: ${r.stderr}`);
    return JSON.parse(r.stdout) as { workers: number; nonblock: boolean; failed: number };
  };
  const onShm = join(shm, `ublk-loop-test-${process.pid}.img`);
  writeFileSync(onShm, '');
  truncateSync(onShm, 4 * MiB);
  t.teardown(() => rmSync(onShm, { force: true }));
  t.same(probe(onShm, 'prepare'), { workers: 0, nonblock: true, failed: 0 },
    'tmpfs: O_NONBLOCK, 128 requests served inline with no io-wq worker');
  const plain = probe(onShm, 'plain');
  t.same({ ...plain, workers: plain.workers > 0 }, { workers: true, nonblock: false, failed: 0 },
    `the same file without O_NONBLOCK: io_uring punts to io-wq (${plain.workers} workers)`);
  // Whether ext4 & co. then go inline depends on more than the flag (an O_DIRECT write into a
  // hole, or over cached pages, is punted under NOWAIT), so only the flag is asserted here.
  const other = probe(backing('nowait.img', 4 * MiB), 'prepare');
  t.same({ nonblock: other.nonblock, failed: other.failed }, { nonblock: false, failed: 0 },
    `a file system with FMODE_NOWAIT is opened without O_NONBLOCK (${other.workers} io-wq workers)`);
  t.end();
});

t.test('every decision comes from the fd opened: a path that turns into a FIFO never makes prepare block', (t) => {
  // Another process keeps renaming a regular file and a FIFO in and out of one path. Between a
  // stat of the path and the open, the path can change; an open(O_RDONLY) of a FIFO with no
  // writer blocks forever. prepare() must answer every time: a device, or an error naming what
  // the path was when it was opened.
  const path = join(dir, 'race.img');
  const r = spawnSync(process.execPath, [...process.execArgv, fileURLToPath(new URL('../helpers/loop-race-probe.ts', import.meta.url)), path, '3000'], { encoding: 'utf8', timeout: 120_000 });
  t.equal(r.signal, null, `the prober finished (not killed by the timeout): ${r.stderr.slice(-500)}`);
  t.equal(r.status, 0, r.stderr.slice(-500));
  const counts = JSON.parse(r.stdout || '{}') as Record<string, number>;
  t.comment(JSON.stringify(counts));
  t.ok((counts.device ?? 0) > 0, `some prepares got the regular file (${counts.device})`);
  t.ok((counts.fifo ?? 0) > 0, `some got the FIFO and said so (${counts.fifo})`);
  t.equal(counts.other ?? 0, 0, 'no other outcome');
  t.end();
});

