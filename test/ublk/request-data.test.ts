/**
 * request-data.ts on the host: how request data moves in each data path, without ublk. The char
 * device of user copy is played by a sparse regular file, read and written at the same user-copy
 * positions (the kernel's side of tag t's request is the bytes at userCopyOffset(0, t)); the
 * fixed-buffer mode is checked by the SQEs it prepares (only ublk_drv can register a request).
 * Under ublk_drv every mode runs in test/vm/modes.vm.ts.
 */
import t from 'tap';
import { randomBytes } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, rmSync, truncateSync } from 'node:fs';
import type { Test } from 'tap';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Mapping, getU64, libc, sys, abi as uringAbi } from '../../src/uring/index.js';
import { addRange, DataHome, RequestData } from '../../src/ublk/request-data.js';
import { UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, userCopyOffset } from '../../src/ublk/abi.js';
import mem from '../../src/targets/mem.js';
import loop from '../../src/targets/loop.js';
import { TargetHarness } from '../helpers/target-harness.js';

const MAX = 64 * 1024;
const DEPTH = 4;

function setup(t: Test, home: DataHome, userCopy = false) {
  const dir = mkdtempSync(join(tmpdir(), 'ublk-rd-'));
  const fd = openSync(join(dir, 'chardev'), 'w+');
  const bufs = Mapping.anonymous(DEPTH * MAX);
  const reports: string[] = [];
  const d = new RequestData({ home, charFd: fd, qid: 0, depth: DEPTH, bufs, maxIoBytes: MAX, userCopy, report: (l) => reports.push(l) });
  t.teardown(() => {
    bufs.unmap();
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  });
  /** The kernel's side of tag's request (what a pread of the char device would see). */
  const kernel = (tag: number, len: number) => {
    const b = Buffer.alloc(len);
    sys.preadInto(fd, b, userCopyOffset(0, tag));
    return b;
  };
  const setKernel = (tag: number, data: Buffer) => sys.pwriteFrom(fd, data, userCopyOffset(0, tag));
  const tagBuf = (tag: number, len: number) => bufs.bytes(tag * MAX, len);
  return { d, fd, bufs, kernel, setKernel, tagBuf, reports };
}

const sqe = () => new Uint32Array(16);
const field = (s: Uint32Array, off: number) => (off % 8 === 0 && off >= 8 ? getU64(s, off / 4) : s[off / 4]!);

t.test('copy mode: the tag buffer is the request, copies are a memcpy, SQEs name the buffer', (t) => {
  const { d, bufs, tagBuf } = setup(t, DataHome.TagBuffer);
  d.begin(1, UBLK_IO_OP_READ, 8192);
  const src = randomBytes(4096);
  t.equal(d.copyToRequest(1, src, 4096), 4096);
  t.ok(tagBuf(1, 8192).subarray(4096).equals(src), 'at byte 4096 of the tag buffer');
  t.equal(d.zeroRequest(1, 0, 4096), 4096);
  t.ok(tagBuf(1, 4096).every((x) => x === 0));
  t.equal(d.buffer(1).length, 8192, 'buffer: the request\'s length');
  t.notOk(d.copiesOut(1), 'the kernel copies a READ out at commit, the queue does not');
  t.equal(d.finish(1, 8192), 8192);
  const s = sqe();
  d.prepReadInto(s, 0, 1, 7, 1 << 20, 512, 1024);
  t.equal(s[0]! & 0xff, uringAbi.IORING_OP_READ);
  t.equal(field(s, uringAbi.io_uring_sqe.addr), bufs.address + MAX + 512, 'addr: tag 1\'s buffer + 512');
  t.equal(s[uringAbi.io_uring_sqe.len / 4], 1024);
  t.equal(field(s, uringAbi.io_uring_sqe.off), 1 << 20);
  t.end();
});

t.test('user copy: memory goes straight to the kernel; SQEs and buffer stage through the tag buffer', (t) => {
  const { d, bufs, kernel, setKernel, tagBuf } = setup(t, DataHome.UserCopy);
  // A READ served from memory: one pwrite at the tag's position, nothing staged.
  d.begin(2, UBLK_IO_OP_READ, 8192);
  const src = randomBytes(8192);
  t.equal(d.copyToRequest(2, src.subarray(0, 4096), 0), 4096);
  t.equal(d.copyToRequest(2, src.subarray(4096), 4096), 4096);
  t.ok(kernel(2, 8192).equals(src), 'the kernel has the data');
  t.notOk(d.copiesOut(2), 'nothing left to send at commit');
  t.equal(d.finish(2, 8192), 8192);

  // A WRITE read into memory: one pread.
  const wdata = randomBytes(4096);
  setKernel(3, wdata);
  d.begin(3, UBLK_IO_OP_WRITE, 4096);
  const dst = Buffer.alloc(4096);
  t.equal(d.copyFromRequest(3, dst, 0), 4096);
  t.ok(dst.equals(wdata));

  // A WRITE sent to a file by SQE: staged (read in) once, the SQE names the tag buffer.
  tagBuf(3, 4096).fill(0);
  d.begin(3, UBLK_IO_OP_WRITE, 4096);
  const s = sqe();
  d.prepWriteFrom(s, 0, 3, 9, 0, 0, 4096);
  t.ok(tagBuf(3, 4096).equals(wdata), 'staged into tag 3\'s buffer before the SQE');
  t.equal(s[0]! & 0xff, uringAbi.IORING_OP_WRITE);

  // A READ filled by SQE: written out at commit, so never linked.
  d.begin(0, UBLK_IO_OP_READ, 4096);
  d.prepReadInto(s, 0, 0, 9, 0, 0, 4096);
  t.ok(d.copiesOut(0), 'the commit must wait for the pwrite');
  const rdata = randomBytes(4096);
  rdata.copy(tagBuf(0, 4096)); // what the SQE would have read
  t.equal(d.copyToRequest(0, Buffer.alloc(512, 7), 512), 512, 'a copy into a READ an SQE read into goes to the tag buffer');
  t.equal(d.finish(0, 4096), 4096);
  rdata.fill(7, 512, 1024);
  t.ok(kernel(0, 4096).equals(rdata), 'finish sent the SQE\'s data, the later copy included');

  // A READ whose start is copied from memory and whose rest an SQE reads (a network target: the
  // start of a reply's data was in its receive buffer): only what the SQE read goes out at
  // commit, the copied start stays as the kernel has it.
  tagBuf(2, 8192).fill(0xee);
  d.begin(2, UBLK_IO_OP_READ, 8192);
  const head = randomBytes(1000);
  t.equal(d.copyToRequest(2, head, 0), 1000, 'the start: straight to the kernel');
  d.prepReadInto(s, 0, 2, 9, 0, 1000, 7192);
  t.equal(field(s, 16), bufs.address + 2 * MAX + 1000, 'the SQE reads into the tag buffer, at byte 1000');
  const rest = randomBytes(7192);
  rest.copy(tagBuf(2, 8192), 1000); // what the SQE read
  t.ok(d.copiesOut(2));
  t.equal(d.finish(2, 8192), 8192);
  t.ok(kernel(2, 8192).equals(Buffer.concat([head, rest])), 'the kernel has the copied start and the SQE\'s rest');
  // Short: a result below the SQE's range sends only up to it.
  d.begin(2, UBLK_IO_OP_READ, 8192);
  setKernel(2, Buffer.alloc(8192));
  d.prepReadInto(s, 0, 2, 9, 0, 4096, 4096);
  d.prepReadInto(s, 0, 2, 9, 0, 0, 4096);
  t.equal(d.finish(2, 6000), 6000);
  t.ok(kernel(2, 8192).equals(Buffer.concat([tagBuf(2, 6000), Buffer.alloc(2192)])), 'the two ranges, merged, went out up to the result, and no further');

  // zeroRequest without staging: pwrites of zeros.
  setKernel(1, randomBytes(200000).subarray(0, 65536));
  d.begin(1, UBLK_IO_OP_READ, 65536);
  t.equal(d.zeroRequest(1, 1000, 64536), 64536);
  t.ok(kernel(1, 65536).subarray(1000).every((x) => x === 0));
  t.end();
});

t.test('user copy: a copy the kernel refuses fails the request with its errno, and is reported', (t) => {
  // An O_RDONLY stand-in: pwrite fails with EBADF, as a copy the kernel refuses fails with
  // EACCES or EINVAL.
  const reports: string[] = [];
  const fd = sys.open('/dev/null', libc.O_RDONLY, 0);
  const bufs = Mapping.anonymous(MAX * DEPTH);
  t.teardown(() => { bufs.unmap(); sys.close(fd); });
  const ro = new RequestData({ home: DataHome.UserCopy, charFd: fd, qid: 0, depth: DEPTH, bufs, maxIoBytes: MAX, userCopy: false, report: (l) => reports.push(l) });
  ro.begin(0, UBLK_IO_OP_READ, 512);
  t.equal(ro.copyToRequest(0, Buffer.alloc(512), 0), -libc.EBADF);
  t.match(reports[0], /user copy of 512 bytes at 0 of tag 0's READ failed/);
  ro.begin(1, UBLK_IO_OP_WRITE, 512);
  t.throws(() => ro.buffer(1), /reading tag 1's WRITE data from the kernel/, 'a WRITE that cannot be staged throws (the queue fails it)');
  t.end();
});

t.test('fixed buffers: SQEs name the request\'s own pages; memory copies only with user copy', (t) => {
  const { d } = setup(t, DataHome.FixedBuffer, false);
  d.begin(3, UBLK_IO_OP_READ, 8192);
  const s = sqe();
  d.prepReadInto(s, 0, 3, 5, 1 << 20, 4096, 4096);
  t.equal(s[0]! & 0xff, uringAbi.IORING_OP_READ_FIXED);
  t.equal(field(s, uringAbi.io_uring_sqe.addr), 4096, 'addr: the byte offset in the request (a kernel buffer starts at 0)');
  t.equal(s[uringAbi.io_uring_sqe.buf_index / 4]! & 0xffff, 3, 'buf_index: the tag');
  d.prepWriteFrom(s, 0, 3, 5, 0, 0, 512);
  t.equal(s[0]! & 0xff, uringAbi.IORING_OP_WRITE_FIXED);
  t.notOk(d.copiesOut(3));
  t.equal(d.copyToRequest(3, Buffer.alloc(512), 0), -libc.EOPNOTSUPP, 'no user copy: refused, not attempted');
  t.throws(() => d.buffer(3), /reachable only by fixed-buffer SQEs/);

  const uc = setup(t, DataHome.FixedBuffer, true);
  uc.d.begin(1, UBLK_IO_OP_READ, 4096);
  const src = randomBytes(4096);
  t.equal(uc.d.copyToRequest(1, src, 0), 4096, 'with user copy: a pwrite');
  t.ok(uc.kernel(1, 4096).equals(src));
  t.end();
});

t.test('a request in a shared region (UBLK_IO_F_SHMEM_ZC): its data is there in every mode, and nothing is copied out', (t) => {
  const region = Mapping.anonymous(16 * 4096);
  t.teardown(() => region.unmap());
  const whole = region.bytes();
  for (const home of [DataHome.TagBuffer, DataHome.UserCopy, DataHome.FixedBuffer]) {
    const { d, kernel, tagBuf } = setup(t, home, true);
    d.beginShared(2, UBLK_IO_OP_READ, 8192, whole, region.address, 4096);
    t.ok(d.isShared(2));
    const src = randomBytes(4096);
    t.equal(d.copyToRequest(2, src, 4096), 4096);
    t.ok(region.bytes(8192, 4096).equals(src), `home ${home}: memcpy into the region at the request's offset`);
    t.ok(kernel(2, 4096).every((x) => x === 0) && tagBuf(2, 4096).every((x) => x === 0), 'neither the kernel side nor the tag buffer touched');
    t.equal(d.buffer(2).length, 8192);
    t.equal(d.buffer(2).buffer, whole.buffer, 'buffer: a view of the region');
    const s = sqe();
    d.prepReadInto(s, 0, 2, 7, 0, 512, 1024);
    t.equal(s[0]! & 0xff, uringAbi.IORING_OP_READ, 'a plain READ, even in the fixed-buffer mode');
    t.equal(field(s, uringAbi.io_uring_sqe.addr), region.address + 4096 + 512);
    t.notOk(d.copiesOut(2), 'no copy out before the commit');
    t.equal(d.finish(2, 8192), 8192);
    // The tag's next request is an ordinary one again.
    d.begin(2, UBLK_IO_OP_READ, 4096);
    t.notOk(d.isShared(2));
  }
  t.end();
});

t.test('addRange: a sorted list of disjoint ranges, merged where they overlap or touch', (t) => {
  const cases: Array<[number[], [number, number], number[]]> = [
    [[], [0, 10], [0, 10]],
    [[0, 10], [10, 20], [0, 20]],
    [[0, 10], [20, 30], [0, 10, 20, 30]],
    [[20, 30], [0, 10], [0, 10, 20, 30]],
    [[0, 10, 20, 30, 40, 50], [5, 45], [0, 50]],
    [[0, 10, 20, 30, 40, 50], [12, 18], [0, 10, 12, 18, 20, 30, 40, 50]],
    [[0, 10, 20, 30], [25, 35], [0, 10, 20, 35]],
    [[0, 10], [2, 3], [0, 10]],
  ];
  for (const [before, [from, to], after] of cases) {
    const r = [...before];
    addRange(r, from, to);
    t.same(r, after, `[${before}] + [${from}, ${to})`);
  }
  t.end();
});

t.test('targets in user-copy mode through the harness: mem and loop keep their data', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ublk-rd-t-'));
  const charFd = openSync(join(dir, 'chardev'), 'w+');
  t.teardown(() => {
    closeSync(charFd);
    rmSync(dir, { recursive: true, force: true });
  });
  const spec = mem.prepare(mem.parseArgs(['-s', '16M']));
  const h = new TargetHarness(mem, {}, spec.queueData, { depth: 4, maxIoBytes: 1 << 20, userCopyFd: charFd });
  const data = randomBytes(65536);
  h.setRequestBytes(0, data);
  t.equal(h.run(0, UBLK_IO_OP_WRITE, 1 << 20, 65536), 65536);
  t.equal(h.run(1, UBLK_IO_OP_READ, 1 << 20, 65536), 65536);
  t.ok(h.buffer(1, 65536).equals(data), 'mem: written by pread, read back by pwrite');
  h.close();
  spec.release?.();

  const backing = join(dir, 'backing');
  const lo = loop.parseArgs(['-f', backing, '--buffered']);
  closeSync(openSync(backing, 'w'));
  truncateSync(backing, 4 << 20);
  const lspec = loop.prepare(lo);
  const lh = new TargetHarness(loop, lo, lspec.queueData, { depth: 4, maxIoBytes: 1 << 20, userCopyFd: charFd });
  lh.setRequestBytes(2, data);
  t.equal(lh.run(2, UBLK_IO_OP_WRITE, 8192, 65536), 65536);
  t.equal(lh.run(3, UBLK_IO_OP_READ, 8192, 65536), 65536);
  t.ok(lh.buffer(3, 65536).equals(data), 'loop: staged through the tag buffer both ways');
  lh.close();
  lspec.release?.();
  t.end();
});
