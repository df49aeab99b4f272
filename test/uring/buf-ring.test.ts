/**
 * Provided buffer rings (buf-ring.ts): the kernel takes buffers in ring order and names them in
 * the CQE; with IOU_PBUF_RING_INC it fills one buffer a piece at a time and moves the entry.
 * Reads of a small file at given offsets, so every read returns known bytes.
 */
import t from 'tap';
import { closeSync, openSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BufRing, IoUring, Mapping, abi, libc, prepRead, setBufferSelect, setUserData } from '../../src/uring/index.js';
import { runAll, tempDir } from '../helpers/uring.js';

const TEXT = 'firstsecondthird';

function textFile(t: { teardown(fn: () => void): void }): number {
  const path = join(tempDir(t), 'text');
  writeFileSync(path, TEXT);
  const fd = openSync(path, 'r');
  t.teardown(() => closeSync(fd));
  return fd;
}

/** A READ of `len` bytes at `off` of `fd` into a buffer the kernel picks from group `bgid`. */
function selectRead(ring: IoUring, fd: number, bgid: number, off: number, len: number, userData: number): void {
  const w = ring.getSqe();
  prepRead(ring.sqes, w, fd, 0, len, off);
  setBufferSelect(ring.sqes, w, bgid);
  setUserData(ring.sqes, w, userData);
}

const bidOf = (flags: number) => flags >>> abi.IORING_CQE_BUFFER_SHIFT;

t.test('buffers are taken in ring order, named in the CQE, and run out with ENOBUFS', (t) => {
  const fd = textFile(t);
  const ring = new IoUring(8);
  const mem = Mapping.anonymous(4096);
  const br = new BufRing(ring, 7, 2);
  t.teardown(() => { br.free(); ring.close(); mem.unmap(); });
  br.add(mem.address, 64, 10, 0);
  br.add(mem.address + 64, 64, 11, 1);
  t.equal(br.tail, 0, 'added entries are not visible before advance');
  br.advance(2);
  t.equal(br.tail, 2);

  selectRead(ring, fd, 7, 0, 5, 1);
  const [a] = runAll(ring, 1);
  t.equal(a!.res, 5);
  t.ok(a!.flags & abi.IORING_CQE_F_BUFFER, 'F_BUFFER');
  t.equal(bidOf(a!.flags), 10, 'the first buffer added');
  t.equal(mem.bytes(0, 5).toString(), 'first');

  selectRead(ring, fd, 7, 5, 6, 2);
  const [b] = runAll(ring, 1);
  t.equal(b!.res, 6);
  t.equal(bidOf(b!.flags), 11, 'then the next one');
  t.equal(mem.bytes(64, 6).toString(), 'second');

  selectRead(ring, fd, 7, 11, 5, 3);
  t.same(runAll(ring, 1).map((c) => c.res), [-libc.ENOBUFS], 'an empty group');

  // Giving a buffer back is adding it again.
  br.add(mem.address, 64, 10);
  br.advance(1);
  selectRead(ring, fd, 7, 11, 5, 4);
  const [c] = runAll(ring, 1);
  t.equal(c!.res, 5);
  t.equal(bidOf(c!.flags), 10);
  t.equal(mem.bytes(0, 5).toString(), 'third');
  t.end();
});

t.test('IOU_PBUF_RING_INC: consecutive reads fill one buffer back to back', (t) => {
  const fd = textFile(t);
  const ring = new IoUring(8);
  const mem = Mapping.anonymous(4096);
  const br = new BufRing(ring, 3, 1, abi.IOU_PBUF_RING_INC);
  t.teardown(() => { br.free(); ring.close(); mem.unmap(); });
  br.add(mem.address, 16, 5);
  br.advance(1);
  const chunks = [[0, 5], [5, 6], [11, 5]] as const; // first, second, third: 16 bytes in all
  const flags: number[] = [];
  for (const [i, [off, len]] of chunks.entries()) {
    selectRead(ring, fd, 3, off, len, i + 1);
    const [c] = runAll(ring, 1);
    t.equal(c!.res, len, `read ${i + 1}`);
    t.equal(bidOf(c!.flags), 5, 'always the same buffer');
    flags.push(c!.flags & abi.IORING_CQE_F_BUF_MORE);
    if (i === 0) t.same(br.entry(0), { addr: mem.address + 5, len: 11, bid: 5 }, 'the entry moved past the bytes taken');
  }
  t.same(flags, [abi.IORING_CQE_F_BUF_MORE, abi.IORING_CQE_F_BUF_MORE, 0], 'BUF_MORE until the buffer is full');
  t.equal(mem.bytes(0, 16).toString(), TEXT, 'the data lies back to back');
  selectRead(ring, fd, 3, 0, 1, 9);
  t.same(runAll(ring, 1).map((c) => c.res), [-libc.ENOBUFS], 'a full buffer is gone from the ring');
  t.end();
});

t.test('registration: bad sizes refused, a group id freed can be registered again', (t) => {
  const ring = new IoUring(4);
  t.teardown(() => ring.close());
  t.throws(() => new BufRing(ring, 1, 3), RangeError, 'not a power of two');
  t.throws(() => new BufRing(ring, 1, 0), RangeError);
  const a = new BufRing(ring, 1, 4);
  t.throws(() => new BufRing(ring, 1, 4), { code: 'EEXIST' }, 'one ring per group id');
  a.free();
  const b = new BufRing(ring, 1, 4);
  b.free();
  b.free(); // idempotent
  const c = new BufRing(ring, 2, 4);
  ring.close();
  c.free(); // after the ring closed: nothing left to unregister, the memory is still ours to unmap
  t.end();
});
