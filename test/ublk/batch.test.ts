/**
 * Batch I/O's buffers (src/ublk/batch.ts) on a host ring, without ublk_drv: the elements PREP and
 * COMMIT hand the kernel, how answers are gathered into commit buffers and sent, what a partial
 * COMMIT result re-sends, and how fetched tags are read from the incrementally filled buffers.
 * The kernel side (a real FETCH_IO_CMDS) is tested in the VM (test/vm/modes.vm.ts).
 */
import t from 'tap';
import { IoUring, Mapping, abi as uringAbi, getU64 } from '../../src/uring/index.js';
import { BATCH_FETCHES, BatchCommands, batchLayout } from '../../src/ublk/batch.js';
import { UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK, UBLK_BATCH_F_HAS_BUF_ADDR, UBLK_U_IO_COMMIT_IO_CMDS, UBLK_U_IO_PREP_IO_CMDS, ublk_batch_io } from '../../src/ublk/abi.js';

const KINDS = { prep: 7, commit: 8, fetch: 9 };
const DEPTH = 8;

function setup(t: { teardown(fn: () => void): void }, withAddr: boolean, auto = false) {
  const ring = new IoUring(16);
  const layout = batchLayout(DEPTH, withAddr);
  const mem = Mapping.anonymous(layout.total);
  const b = new BatchCommands({
    ring, qid: 3, depth: DEPTH, charDevSlot: 0, mem, kinds: KINDS,
    bufferAddress: withAddr ? (tag) => 0x10_0000 + tag * 0x1000 : undefined,
    autoRegIndex: auto ? (tag) => tag + 100 : undefined,
    autoRegFallback: auto,
  });
  t.teardown(() => { b.free(); ring.close(); mem.unmap(); });
  return { ring, mem, b, layout };
}

/** The elements of the command in SQE w: [tag, buf_index, result, addr?]. */
function elements(ring: IoUring, w: number): number[][] {
  const s = ring.sqes;
  const addr = getU64(s, w + uringAbi.io_uring_sqe.addr / 4);
  const c = w + 12;
  const nr = s[c + ublk_batch_io.nr_elem / 4]! & 0xffff;
  const size = (s[c + ublk_batch_io.nr_elem / 4]! >>> 16) & 0xff;
  const v = new DataView(Mapping.borrow(addr, 4096).buffer);
  return Array.from({ length: nr }, (_, i) => {
    const e = [v.getUint16(i * size, true), v.getUint16(i * size + 2, true), v.getInt32(i * size + 4, true)];
    return size === 16 ? [...e, Number(v.getBigUint64(i * size + 8, true))] : e;
  });
}

t.test('layout: 8-byte elements, 16 with the buffer address; page-aligned buffers', (t) => {
  t.match(batchLayout(128, false), { elemBytes: 8, commitBytes: 4096, fetchBytes: 4096 });
  t.match(batchLayout(4096, true), { elemBytes: 16, commitBytes: 65536, fetchBytes: 8192 });
  t.end();
});

t.test('PREP: every tag with its buffer address (copy mode)', (t) => {
  const { ring, b } = setup(t, true);
  const w = ring.getSqe();
  b.prepPrep(w, Int32Array.from([0, 1, 2, 7]));
  t.equal(ring.sqes[w + 2], UBLK_U_IO_PREP_IO_CMDS);
  t.equal(ring.sqes[w + 12]! >>> 16, UBLK_BATCH_F_HAS_BUF_ADDR, 'flags: HAS_BUF_ADDR');
  t.same(elements(ring, w), [[0, 0, 0, 0x10_0000], [1, 0, 0, 0x10_1000], [2, 0, 0, 0x10_2000], [7, 0, 0, 0x10_7000]]);
  t.same([ring.sqes[w + 8], ring.sqes[w + 9]], [0, KINDS.prep], 'user_data');
  t.end();
});

t.test('COMMIT: answers gathered, sent in one command, buffers rotate while commands are in flight', (t) => {
  const { ring, b } = setup(t, false, true);
  t.notOk(b.canFlush, 'nothing to send');
  b.add(5, 4096);
  b.add(2, -5);
  t.equal(b.pending, 2);
  const w = ring.getSqe();
  b.flush(w);
  t.equal(ring.sqes[w + 2], UBLK_U_IO_COMMIT_IO_CMDS);
  t.equal(ring.sqes[w + 12]! >>> 16, UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK, 'flags: the auto_zc fallback');
  t.same(elements(ring, w), [[5, 105, 4096], [2, 102, -5]], 'tag, the fixed-buffer slot of its next request, result');
  t.same([b.pending, b.inFlight], [0, 1]);
  const first = ring.sqes[w + 8]!;
  // Two more in flight: three of the four buffers busy, the fourth gathering; the next answers wait.
  for (let i = 0; i < 2; i++) {
    b.add(i, 0);
    b.flush(ring.getSqe());
  }
  b.add(6, 0);
  t.equal(b.inFlight, 3);
  t.notOk(b.canFlush, 'no free buffer to gather into while these travel');
  t.equal(b.committed(first, 2 * 8), undefined, 'the kernel took both elements');
  t.ok(b.canFlush, 'a buffer is free again');
  t.end();
});

t.test('COMMIT stopped short: the refused element is reported, the ones after it are sent again', (t) => {
  const { ring, b } = setup(t, true);
  for (const tag of [1, 2, 3, 4]) b.add(tag, 4096);
  const w = ring.getSqe();
  b.flush(w);
  const buf = ring.sqes[w + 8]!;
  t.same(b.committed(buf, 16), { refusedTag: 2, error: 0 }, 'one element taken, the second refused');
  t.equal(b.pending, 2, 'tags 3 and 4 wait for the next commit');
  const v = ring.getSqe();
  b.flush(v);
  t.same(elements(ring, v), [[3, 0, 4096, 0x10_3000], [4, 0, 4096, 0x10_4000]]);
  t.same(b.committed(ring.sqes[v + 8]!, -22), { refusedTag: 3, error: -22 }, 'a refused first element: the error itself');
  t.equal(b.pending, 1);
  t.end();
});

t.test('FETCH: tags read back to back from each group, the buffer given back once used up', (t) => {
  const { ring, mem, b, layout } = setup(t, false);
  for (let g = 0; g < BATCH_FETCHES; g++) b.prepFetch(ring.getSqe(), g);
  t.equal(b.fetching, 2);
  // Play the kernel: tags written into group 1's buffer, the CQE saying how many bytes.
  const base = 4 * layout.commitBytes + layout.fetchBytes;
  const tags = new Uint16Array(mem.buffer, base, 8);
  tags.set([4, 0, 6, 1, 2]);
  const got: number[] = [];
  const F = uringAbi.IORING_CQE_F_MORE | uringAbi.IORING_CQE_F_BUFFER;
  t.ok(b.fetched(1, 6, F | uringAbi.IORING_CQE_F_BUF_MORE, (tag) => got.push(tag)), 'still armed');
  t.same(got, [4, 0, 6]);
  t.ok(b.fetched(1, 4, F | uringAbi.IORING_CQE_F_BUF_MORE, (tag) => got.push(tag)));
  t.same(got, [4, 0, 6, 1, 2], 'the next CQE\'s tags follow the last one\'s');
  tags[5] = 7; // at byte 10, after the 5 tags read
  t.notOk(b.fetched(1, 2, uringAbi.IORING_CQE_F_BUFFER, (tag) => got.push(tag)), 'the command ended');
  t.same(got, [4, 0, 6, 1, 2, 7], 'its last tag read after the others');
  t.equal(b.fetching, 1);
  t.end();
});
