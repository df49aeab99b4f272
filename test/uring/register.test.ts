/**
 * io_uring_register(2): fixed buffers and files (dense and sparse), eventfd, the registered
 * ring fd and the opcode probe.
 */
import t from 'tap';
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { IoUring, Mapping, abi, setUserData, setFixedFile, prepNop, prepRead, prepReadFixed, prepWriteFixed, prepOpenatDirect, prepCloseDirect, writeCString, sys, libc, registerBuffers, unregisterBuffers, registerBuffersSparse, updateBuffers, registerFiles, updateFiles, unregisterFiles, registerFilesSparse, registerEventfd, unregisterEventfd, probe } from '../../src/uring/index.js';
import { runAll, tempDir } from '../helpers/uring.js';

t.test('fixed buffers: WRITE_FIXED then READ_FIXED through registered slots', (t) => {
  const dir = tempDir(t);
  const fd = openSync(join(dir, 'f'), 'w+');
  const ring = new IoUring(8);
  const a = Mapping.anonymous(8192, { dontFork: true });
  const b = Mapping.anonymous(8192, { dontFork: true });
  t.teardown(() => { ring.close(); a.unmap(); b.unmap(); closeSync(fd); });
  registerBuffers(ring, [{ address: a.address, length: a.length }, { address: b.address, length: b.length }]);
  a.u8.fill(0x5a);
  let w = ring.getSqe();
  prepWriteFixed(ring.sqes, w, fd, a.address + 4096, 4096, 0, 0); // inside slot 0
  setUserData(ring.sqes, w, 1);
  t.same(runAll(ring, 1).map((c) => c.res), [4096]);
  w = ring.getSqe();
  prepReadFixed(ring.sqes, w, fd, b.address, 4096, 0, 1);
  setUserData(ring.sqes, w, 2);
  t.same(runAll(ring, 1).map((c) => c.res), [4096]);
  t.ok(b.bytes(0, 4096).every((x) => x === 0x5a), 'read into slot 1');
  w = ring.getSqe();
  prepReadFixed(ring.sqes, w, fd, a.address, 4096, 0, 1); // address outside slot 1
  setUserData(ring.sqes, w, 3);
  t.same(runAll(ring, 1).map((c) => c.res), [-libc.EFAULT], 'the kernel checks the range against the slot');
  unregisterBuffers(ring);
  w = ring.getSqe();
  prepReadFixed(ring.sqes, w, fd, b.address, 4096, 0, 0);
  setUserData(ring.sqes, w, 4);
  t.same(runAll(ring, 1).map((c) => c.res), [-libc.EFAULT], 'no table after unregister');
  t.end();
});

t.test('sparse buffer table filled by update', (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'g');
  writeFileSync(path, Buffer.alloc(4096, 0x33));
  const fd = openSync(path, 'r');
  const ring = new IoUring(8);
  const m = Mapping.anonymous(4096);
  t.teardown(() => { ring.close(); m.unmap(); closeSync(fd); });
  registerBuffersSparse(ring, 4);
  let w = ring.getSqe();
  prepReadFixed(ring.sqes, w, fd, m.address, 4096, 0, 2);
  setUserData(ring.sqes, w, 1);
  t.same(runAll(ring, 1).map((c) => c.res), [-libc.EFAULT], 'an empty slot');
  t.equal(updateBuffers(ring, 2, [{ address: m.address, length: 4096 }]), 1);
  w = ring.getSqe();
  prepReadFixed(ring.sqes, w, fd, m.address, 4096, 0, 2);
  setUserData(ring.sqes, w, 2);
  t.same(runAll(ring, 1).map((c) => c.res), [4096]);
  t.ok(m.u8.every((x) => x === 0x33));
  t.end();
});

t.test('fixed files: dense table, sparse table, update, direct open and close', (t) => {
  const dir = tempDir(t);
  const p1 = join(dir, 'one');
  const p2 = join(dir, 'two');
  writeFileSync(p1, 'first file');
  writeFileSync(p2, 'second file');
  const fd1 = openSync(p1, 'r');
  const fd2 = openSync(p2, 'r');
  const ring = new IoUring(8);
  const m = Mapping.anonymous(4096);
  t.teardown(() => { ring.close(); m.unmap(); closeSync(fd1); closeSync(fd2); });

  registerFiles(ring, [fd1, -1]);
  let w = ring.getSqe();
  prepRead(ring.sqes, w, 0, m.address, 100, 0);
  setFixedFile(ring.sqes, w);
  setUserData(ring.sqes, w, 1);
  t.same(runAll(ring, 1).map((c) => c.res), [10]);
  t.equal(m.bytes(0, 10).toString(), 'first file', 'index 0 is fd1');
  t.equal(updateFiles(ring, 1, [fd2]), 1);
  w = ring.getSqe();
  prepRead(ring.sqes, w, 1, m.address, 100, 0);
  setFixedFile(ring.sqes, w);
  setUserData(ring.sqes, w, 2);
  t.same(runAll(ring, 1).map((c) => c.res), [11]);
  t.equal(m.bytes(0, 11).toString(), 'second file');
  unregisterFiles(ring);

  registerFilesSparse(ring, 4);
  w = ring.getSqe();
  prepRead(ring.sqes, w, 3, m.address, 100, 0);
  setFixedFile(ring.sqes, w);
  setUserData(ring.sqes, w, 3);
  t.same(runAll(ring, 1).map((c) => c.res), [-libc.EBADF], 'an empty sparse slot');
  writeCString(m.u8, 1024, p2);
  w = ring.getSqe();
  prepOpenatDirect(ring.sqes, w, libc.AT_FDCWD, m.address + 1024, libc.O_RDONLY, 0, 3);
  setUserData(ring.sqes, w, 4);
  t.same(runAll(ring, 1).map((c) => c.res), [0], 'opened straight into slot 3');
  w = ring.getSqe();
  prepRead(ring.sqes, w, 3, m.address, 6, 0);
  setFixedFile(ring.sqes, w);
  setUserData(ring.sqes, w, 5);
  t.same(runAll(ring, 1).map((c) => c.res), [6]);
  t.equal(m.bytes(0, 6).toString(), 'second');
  w = ring.getSqe();
  prepCloseDirect(ring.sqes, w, 3);
  setUserData(ring.sqes, w, 6);
  t.same(runAll(ring, 1).map((c) => c.res), [0]);
  t.end();
});

t.test('a registered eventfd is signalled per completion', (t) => {
  const ring = new IoUring(8);
  const efd = sys.eventfd(0, libc.EFD_CLOEXEC | libc.EFD_NONBLOCK);
  const m = Mapping.anonymous(4096);
  t.teardown(() => { ring.close(); sys.close(efd); m.unmap(); });
  t.throws(() => sys.read(efd, m.address, 8), { code: 'EAGAIN' }, 'nothing signalled yet');
  registerEventfd(ring, efd);
  for (let i = 0; i < 3; i++) {
    const w = ring.getSqe();
    prepNop(ring.sqes, w);
    setUserData(ring.sqes, w, i);
  }
  runAll(ring, 3);
  t.equal(sys.read(efd, m.address, 8), 8);
  t.ok(m.view.getBigUint64(0, true) >= 1n, `counter ${m.view.getBigUint64(0, true)}`);
  unregisterEventfd(ring);
  const w = ring.getSqe();
  prepNop(ring.sqes, w);
  runAll(ring, 1);
  t.throws(() => sys.read(efd, m.address, 8), { code: 'EAGAIN' }, 'silent after unregister');
  t.end();
});

t.test('registered ring fd: enters use the index and still work', (t) => {
  const plain = new IoUring(8, { registerRingFd: false });
  t.equal(plain.registeredRingIndex, -1, 'opted out');
  plain.close();
  const ring = new IoUring(8);
  t.teardown(() => ring.close());
  t.ok(ring.registeredRingIndex >= 0, 'registered by default');
  const idx = ring.registerRingFd();
  t.ok(idx >= 0 && idx < 16, `index ${idx}`);
  t.equal(ring.registerRingFd(), idx, 'idempotent');
  for (let round = 0; round < 3; round++) {
    const w = ring.getSqe();
    prepNop(ring.sqes, w);
    setUserData(ring.sqes, w, round);
    t.same(runAll(ring, 1).map((c) => c.userData), [round]);
  }
  ring.unregisterRingFd();
  t.equal(ring.registeredRingIndex, -1);
  const w = ring.getSqe();
  prepNop(ring.sqes, w);
  setUserData(ring.sqes, w, 9);
  t.same(runAll(ring, 1).map((c) => c.userData), [9], 'plain fd again');
  t.end();
});

t.test('the probe lists what this kernel supports', (t) => {
  const ring = new IoUring(4);
  t.teardown(() => ring.close());
  const p = probe(ring);
  t.comment(`kernel ${readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim()}: last op ${p.lastOp}, ${p.names().length} ops`);
  for (const op of [abi.IORING_OP_NOP, abi.IORING_OP_READ, abi.IORING_OP_WRITE, abi.IORING_OP_READV,
    abi.IORING_OP_READ_FIXED, abi.IORING_OP_TIMEOUT, abi.IORING_OP_URING_CMD]) {
    t.ok(p.supports(op), `${abi.IORING_OP_NAMES[op]} supported`);
  }
  t.notOk(p.supports(250), 'an opcode past the last is not');
  t.ok(p.lastOp >= abi.IORING_OP_URING_CMD);
  t.end();
});
