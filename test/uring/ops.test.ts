/**
 * Each prepared operation against real files, sockets and timers on the host kernel.
 */
import t from 'tap';
import { closeSync, openSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { IoUring, Mapping, abi, setUserData, setFlags, prepNop, prepRead, prepWrite, prepReadv, prepWritev, prepFsync, prepFallocate, prepPollAdd, prepPollMultishot, prepPollRemove, prepTimeout, prepTimeoutRemove, prepLinkTimeout, prepCancel, prepCancelFd, prepSend, prepRecv, prepOpenat, prepClose, writeCString, sys, libc } from '../../src/uring/index.js';
import { reap, runAll, tempDir, socketpair } from '../helpers/uring.js';

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

/** A __kernel_timespec of `ms` written at `off` of `m`; returns its address. */
function timespec(m: Mapping, off: number, ms: number): number {
  m.view.setBigInt64(off, BigInt(Math.floor(ms / 1000)), true);
  m.view.setBigInt64(off + 8, BigInt((ms % 1000) * 1e6), true);
  return m.address + off;
}

t.test('NOP completes with 0 and echoes user_data', (t) => {
  const ring = new IoUring(8);
  t.teardown(() => ring.close());
  const w = ring.getSqe();
  prepNop(ring.sqes, w);
  setUserData(ring.sqes, w, 42);
  t.same(runAll(ring, 1), [{ userData: 42, res: 0, flags: 0 }]);
  t.end();
});

t.test('WRITE then READ at offsets round-trips the bytes; EOF reads 0', (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'f');
  writeFileSync(path, Buffer.alloc(0));
  const fd = openSync(path, 'r+');
  const ring = new IoUring(8);
  const m = Mapping.anonymous(3 * 4096);
  t.teardown(() => { ring.close(); m.unmap(); closeSync(fd); });
  pattern(4096, 7).copy(m.bytes(0, 4096));
  pattern(100, 9).copy(m.bytes(4096, 100));
  let w = ring.getSqe();
  prepWrite(ring.sqes, w, fd, m.address, 4096, 8192);
  setUserData(ring.sqes, w, 1);
  w = ring.getSqe();
  prepWrite(ring.sqes, w, fd, m.address + 4096, 100, 0);
  setUserData(ring.sqes, w, 2);
  t.same(runAll(ring, 2).map((c) => c.res), [4096, 100], 'byte counts');
  const onDisk = readFileSync(path);
  t.equal(onDisk.length, 8192 + 4096);
  t.ok(onDisk.subarray(8192).equals(pattern(4096, 7)), 'data at 8192');
  t.ok(onDisk.subarray(0, 100).equals(pattern(100, 9)), 'data at 0');

  w = ring.getSqe();
  prepRead(ring.sqes, w, fd, m.address + 8192, 4096, 8192);
  setUserData(ring.sqes, w, 3);
  w = ring.getSqe();
  prepRead(ring.sqes, w, fd, m.address, 4096, 8192 + 4096);
  setUserData(ring.sqes, w, 4);
  t.same(runAll(ring, 2).map((c) => c.res), [4096, 0], 'full read, then EOF');
  t.ok(m.bytes(8192, 4096).equals(pattern(4096, 7)), 'read back what was written');
  t.end();
});

t.test('READV/WRITEV scatter and gather across three buffers', (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'v');
  const fd = openSync(path, 'w+');
  const ring = new IoUring(8);
  const data = Mapping.anonymous(4096 * 4);
  const iov = Mapping.anonymous(4096);
  t.teardown(() => { ring.close(); data.unmap(); iov.unmap(); closeSync(fd); });
  const parts = [[0, 10], [100, 4000], [8192, 1]] as const;
  parts.forEach(([off, len], i) => {
    pattern(len, i).copy(data.bytes(off, len));
    iov.view.setBigUint64(i * 16, BigInt(data.address + off), true);
    iov.view.setBigUint64(i * 16 + 8, BigInt(len), true);
  });
  let w = ring.getSqe();
  prepWritev(ring.sqes, w, fd, iov.address, 3, 0);
  t.same(runAll(ring, 1).map((c) => c.res), [4011]);
  t.ok(readFileSync(path).equals(Buffer.concat(parts.map(([, len], i) => pattern(len, i)))), 'gathered in order');

  data.u8.fill(0);
  w = ring.getSqe();
  prepReadv(ring.sqes, w, fd, iov.address, 3, 0);
  t.same(runAll(ring, 1).map((c) => c.res), [4011]);
  parts.forEach(([off, len], i) => t.ok(data.bytes(off, len).equals(pattern(len, i)), `iovec ${i} scattered back`));
  t.end();
});

t.test('a failing link head cancels the rest of the chain', (t) => {
  const ring = new IoUring(8);
  const m = Mapping.anonymous(4096);
  t.teardown(() => { ring.close(); m.unmap(); });
  let w = ring.getSqe();
  prepRead(ring.sqes, w, 9999, m.address, 16, 0); // no such fd
  setUserData(ring.sqes, w, 1);
  setFlags(ring.sqes, w, abi.IOSQE_IO_LINK);
  w = ring.getSqe();
  prepNop(ring.sqes, w);
  setUserData(ring.sqes, w, 2);
  setFlags(ring.sqes, w, abi.IOSQE_IO_LINK);
  w = ring.getSqe();
  prepNop(ring.sqes, w);
  setUserData(ring.sqes, w, 3);
  w = ring.getSqe();
  prepNop(ring.sqes, w); // not linked: runs regardless
  setUserData(ring.sqes, w, 4);
  t.same(runAll(ring, 4).map((c) => c.res), [-libc.EBADF, -libc.ECANCELED, -libc.ECANCELED, 0]);
  t.end();
});

t.test('a successful chain runs in order; CQE_SKIP_SUCCESS hides the quiet ones', (t) => {
  const ring = new IoUring(8);
  t.teardown(() => ring.close());
  for (let i = 1; i <= 3; i++) {
    const w = ring.getSqe();
    prepNop(ring.sqes, w);
    setUserData(ring.sqes, w, i);
    setFlags(ring.sqes, w, (i < 3 ? abi.IOSQE_IO_LINK : 0) | (i === 2 ? abi.IOSQE_CQE_SKIP_SUCCESS : 0));
  }
  ring.submit();
  t.same(reap(ring, 2).map((c) => c.userData), [1, 3], 'the skipped NOP posted nothing');
  t.end();
});

t.test('TIMEOUT expires with -ETIME; a count-based TIMEOUT completes with 0', (t) => {
  const ring = new IoUring(8);
  const m = Mapping.anonymous(4096);
  t.teardown(() => { ring.close(); m.unmap(); });
  let w = ring.getSqe();
  prepTimeout(ring.sqes, w, timespec(m, 0, 20), 0, 0);
  setUserData(ring.sqes, w, 1);
  t.same(runAll(ring, 1), [{ userData: 1, res: -libc.ETIME, flags: 0 }]);

  w = ring.getSqe();
  prepTimeout(ring.sqes, w, timespec(m, 64, 60_000), 1, 0); // 60 s, or one completion
  setUserData(ring.sqes, w, 2);
  w = ring.getSqe();
  prepNop(ring.sqes, w);
  setUserData(ring.sqes, w, 3);
  t.same(runAll(ring, 2).map((c) => [c.userData, c.res]), [[2, 0], [3, 0]]);
  t.end();
});

t.test('TIMEOUT_REMOVE cancels a pending timeout', (t) => {
  const ring = new IoUring(8);
  const m = Mapping.anonymous(4096);
  t.teardown(() => { ring.close(); m.unmap(); });
  let w = ring.getSqe();
  prepTimeout(ring.sqes, w, timespec(m, 0, 60_000), 0, 0);
  setUserData(ring.sqes, w, 10);
  ring.submit();
  w = ring.getSqe();
  prepTimeoutRemove(ring.sqes, w, 10, 0);
  setUserData(ring.sqes, w, 11);
  t.same(runAll(ring, 2).map((c) => [c.userData, c.res]), [[10, -libc.ECANCELED], [11, 0]]);
  t.end();
});

t.test('LINK_TIMEOUT cancels a linked request that does not finish in time', (t) => {
  const ring = new IoUring(8);
  const m = Mapping.anonymous(4096);
  const efd = sys.eventfd(0, libc.EFD_CLOEXEC);
  t.teardown(() => { ring.close(); m.unmap(); sys.close(efd); });
  let w = ring.getSqe();
  prepPollAdd(ring.sqes, w, efd, libc.POLLIN); // never readable
  setUserData(ring.sqes, w, 1);
  setFlags(ring.sqes, w, abi.IOSQE_IO_LINK);
  w = ring.getSqe();
  prepLinkTimeout(ring.sqes, w, timespec(m, 0, 20), 0);
  setUserData(ring.sqes, w, 2);
  t.same(runAll(ring, 2).map((c) => [c.userData, c.res]), [[1, -libc.ECANCELED], [2, -libc.ETIME]]);
  t.end();
});

t.test('ASYNC_CANCEL by user_data and by fd; a missing target says ENOENT', (t) => {
  const ring = new IoUring(8);
  const efd = sys.eventfd(0, libc.EFD_CLOEXEC);
  t.teardown(() => { ring.close(); sys.close(efd); });
  let w = ring.getSqe();
  prepPollAdd(ring.sqes, w, efd, libc.POLLIN);
  setUserData(ring.sqes, w, 1);
  ring.submit();
  t.equal(ring.cqReady(), 0, 'poll is pending');
  w = ring.getSqe();
  prepCancel(ring.sqes, w, 1, 0);
  setUserData(ring.sqes, w, 2);
  t.same(runAll(ring, 2).map((c) => [c.userData, c.res]), [[1, -libc.ECANCELED], [2, 0]]);

  for (const ud of [3, 4]) {
    w = ring.getSqe();
    prepPollAdd(ring.sqes, w, efd, libc.POLLIN);
    setUserData(ring.sqes, w, ud);
  }
  w = ring.getSqe();
  prepCancelFd(ring.sqes, w, efd, abi.IORING_ASYNC_CANCEL_ALL);
  setUserData(ring.sqes, w, 5);
  t.same(runAll(ring, 3).map((c) => [c.userData, c.res]), [[3, -libc.ECANCELED], [4, -libc.ECANCELED], [5, 2]], 'CANCEL_ALL by fd reports the count');

  w = ring.getSqe();
  prepCancel(ring.sqes, w, 12345, 0);
  setUserData(ring.sqes, w, 6);
  t.same(runAll(ring, 1).map((c) => c.res), [-libc.ENOENT]);
  t.end();
});

t.test('POLL_ADD fires on readiness; multishot posts CQE_F_MORE until removed', (t) => {
  const ring = new IoUring(8);
  const efd = sys.eventfd(0, libc.EFD_CLOEXEC | libc.EFD_NONBLOCK);
  const m = Mapping.anonymous(4096);
  t.teardown(() => { ring.close(); sys.close(efd); m.unmap(); });
  let w = ring.getSqe();
  prepPollMultishot(ring.sqes, w, efd, libc.POLLIN);
  setUserData(ring.sqes, w, 7);
  ring.submit();
  m.view.setBigUint64(0, 1n, true);
  sys.write(efd, m.address, 8);
  const first = reap(ring, 1);
  t.equal(first.length, 1);
  t.equal(first[0]!.res & libc.POLLIN, libc.POLLIN, 'POLLIN reported');
  t.ok(first[0]!.flags & abi.IORING_CQE_F_MORE, 'multishot stays armed');
  sys.read(efd, m.address, 8); // drain, then signal again
  sys.write(efd, m.address, 8);
  const second = reap(ring, 1);
  t.ok(second[0]!.flags & abi.IORING_CQE_F_MORE, 'second event, still armed');
  w = ring.getSqe();
  prepPollRemove(ring.sqes, w, 7);
  setUserData(ring.sqes, w, 8);
  const rest = runAll(ring, 2);
  t.same(rest.map((c) => [c.userData, c.res]), [[7, -libc.ECANCELED], [8, 0]]);
  t.notOk(rest[0]!.flags & abi.IORING_CQE_F_MORE, 'the last CQE of a multishot has no MORE');
  t.end();
});

t.test('FSYNC and fdatasync complete with 0; FALLOCATE extends and punches holes', (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'a');
  const fd = openSync(path, 'w+');
  const ring = new IoUring(8);
  const m = Mapping.anonymous(65536);
  t.teardown(() => { ring.close(); closeSync(fd); m.unmap(); });
  let w = ring.getSqe();
  prepFallocate(ring.sqes, w, fd, 0, 0, 1 << 20);
  setUserData(ring.sqes, w, 1);
  t.same(runAll(ring, 1).map((c) => c.res), [0]);
  t.equal(statSync(path).size, 1 << 20, 'mode 0 extends the file');
  m.u8.fill(0xab);
  w = ring.getSqe();
  prepWrite(ring.sqes, w, fd, m.address, 65536, 0);
  setUserData(ring.sqes, w, 2);
  w = ring.getSqe();
  prepFsync(ring.sqes, w, fd, false);
  setUserData(ring.sqes, w, 3);
  setFlags(ring.sqes, w, abi.IOSQE_IO_DRAIN);
  w = ring.getSqe();
  prepFsync(ring.sqes, w, fd, true);
  setUserData(ring.sqes, w, 4);
  t.same(runAll(ring, 3).map((c) => c.res), [65536, 0, 0]);
  w = ring.getSqe();
  prepFallocate(ring.sqes, w, fd, libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE, 4096, 8192);
  setUserData(ring.sqes, w, 5);
  const r = runAll(ring, 1)[0]!.res;
  if (r === -libc.EOPNOTSUPP) {
    t.skip(`punch-hole unsupported by ${dir}'s filesystem`, () => {});
  } else {
    t.equal(r, 0);
    const back = readFileSync(path).subarray(0, 65536);
    t.ok(back.subarray(4096, 12288).every((b) => b === 0), 'punched range reads as zeros');
    t.ok(back.subarray(0, 4096).every((b) => b === 0xab) && back.subarray(12288).every((b) => b === 0xab), 'the rest is intact');
    t.equal(statSync(path).size, 1 << 20, 'KEEP_SIZE kept the size');
  }
  t.end();
});

t.test('OPENAT and CLOSE through the ring', (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'opened');
  writeFileSync(path, 'hello ring');
  const ring = new IoUring(8);
  const m = Mapping.anonymous(4096);
  t.teardown(() => { ring.close(); m.unmap(); });
  writeCString(m.u8, 0, path);
  let w = ring.getSqe();
  prepOpenat(ring.sqes, w, libc.AT_FDCWD, m.address, libc.O_RDONLY | libc.O_CLOEXEC, 0);
  setUserData(ring.sqes, w, 1);
  const fd = runAll(ring, 1)[0]!.res;
  t.ok(fd >= 0, `got fd ${fd}`);
  w = ring.getSqe();
  prepRead(ring.sqes, w, fd, m.address + 1024, 100, 0);
  setUserData(ring.sqes, w, 2);
  t.same(runAll(ring, 1).map((c) => c.res), [10]);
  t.equal(m.bytes(1024, 10).toString(), 'hello ring');
  w = ring.getSqe();
  prepClose(ring.sqes, w, fd);
  setUserData(ring.sqes, w, 3);
  t.same(runAll(ring, 1).map((c) => c.res), [0]);
  t.throws(() => closeSync(fd), /EBADF/, 'the ring closed it');
  writeCString(m.u8, 0, join(dir, 'missing'));
  w = ring.getSqe();
  prepOpenat(ring.sqes, w, libc.AT_FDCWD, m.address, libc.O_RDONLY, 0);
  t.same(runAll(ring, 1).map((c) => c.res), [-libc.ENOENT]);
  t.end();
});

t.test('SEND and RECV over a socketpair', (t) => {
  const [a, b] = socketpair();
  const ring = new IoUring(8);
  const m = Mapping.anonymous(4096);
  t.teardown(() => { ring.close(); m.unmap(); sys.close(a); sys.close(b); });
  let w = ring.getSqe();
  prepRecv(ring.sqes, w, b, m.address + 2048, 100, 0); // posted first: waits for data
  setUserData(ring.sqes, w, 2);
  ring.submit();
  m.bytes(0, 5).write('howdy');
  w = ring.getSqe();
  prepSend(ring.sqes, w, a, m.address, 5, 0);
  setUserData(ring.sqes, w, 1);
  t.same(runAll(ring, 2).map((c) => [c.userData, c.res]), [[1, 5], [2, 5]]);
  t.equal(m.bytes(2048, 5).toString(), 'howdy');
  t.end();
});

// The rules the ublk queue's linked commit relies on (queue.ts, trackAndCommit): a READ marked
// IOSQE_IO_LINK | IOSQE_CQE_SKIP_SUCCESS posts no CQE when it reads everything it asked for, and
// then starts the next SQE of its chain. A short read counts as a failure (a result other than
// the requested length sets REQ_F_FAIL, io_uring/rw.c): it posts its CQE with the short count,
// and because it was a skip-on-success request the rest of the chain is cancelled WITHOUT CQEs
// (req_set_fail turns REQ_F_CQE_SKIP into REQ_F_SKIP_LINK_CQES, io_uring.h, since 5.17).
t.test('a linked READ with CQE_SKIP_SUCCESS: silent when whole; when short, its CQE and a chain cancelled in silence', (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'f');
  writeFileSync(path, pattern(6000, 3));
  const fd = openSync(path, 'r');
  const ring = new IoUring(8);
  const m = Mapping.anonymous(8192);
  t.teardown(() => { ring.close(); m.unmap(); closeSync(fd); });
  const chain = (off: number) => {
    let w = ring.getSqe();
    prepRead(ring.sqes, w, fd, m.address, 4096, off);
    setFlags(ring.sqes, w, abi.IOSQE_IO_LINK | abi.IOSQE_CQE_SKIP_SUCCESS);
    setUserData(ring.sqes, w, 1);
    w = ring.getSqe();
    prepNop(ring.sqes, w);
    setUserData(ring.sqes, w, 2);
  };
  chain(0);
  t.same(runAll(ring, 1), [{ userData: 2, res: 0, flags: 0 }], 'a whole read: only the NOP behind it completes');
  t.ok(m.bytes(0, 4096).equals(pattern(6000, 3).subarray(0, 4096)), 'and the data arrived before it');
  chain(4096);
  // A plain NOP after the chain: once its CQE is in, the chain's would be too.
  const w = ring.getSqe();
  prepNop(ring.sqes, w);
  setUserData(ring.sqes, w, 3);
  ring.submitAndWaitTimeout(2, 1000);
  ring.submitAndWaitTimeout(3, 200); // a third CQE, if the kernel posted one for the NOP in the chain
  t.same(reap(ring, ring.cqReady()).map((c) => [c.userData, c.res]).sort((a, b) => a[0]! - b[0]!),
    [[1, 6000 - 4096], [3, 0]], 'a short read: its CQE with the short count, and none for the NOP it cancelled');
  t.end();
});
