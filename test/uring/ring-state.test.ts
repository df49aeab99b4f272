/**
 * The ring protocol, observed step by step: exact head/tail values after each operation, CQ
 * wrap-around, the overflow backlog of a tiny CQ, and batched reaping. In the spirit of Zig's
 * IoUring tests, which assert ring state rather than only end results.
 */
import t from 'tap';
import { IoUring, Mapping, prepNop, prepRecv, setUserData, setUserData2, abi, sys } from '../../src/uring/index.js';
import { reap, socketpair } from '../helpers/uring.js';

t.test('SQ and CQ indexes after each step of one NOP round trip', (t) => {
  const ring = new IoUring(4);
  t.teardown(() => ring.close());
  t.equal(ring.sqEntries, 4);
  t.equal(ring.cqEntries, 8, 'the kernel sizes the CQ at twice the SQ by default');
  t.same(ring.sqState(), { head: 0, tail: 0, pending: 0, flags: 0 });

  const w0 = ring.getSqe();
  const w1 = ring.getSqe();
  t.equal(w0, 0, 'first slot is word 0');
  t.equal(w1, 16, 'a 64-byte SQE is 16 words');
  prepNop(ring.sqes, w0);
  setUserData(ring.sqes, w0, 0xaa);
  prepNop(ring.sqes, w1);
  setUserData(ring.sqes, w1, 0xbb);
  t.same(ring.sqState(), { head: 0, tail: 0, pending: 2, flags: 0 }, 'prepared SQEs are not yet published');

  t.equal(ring.flushSq(), 2, 'flush publishes two entries the kernel has not consumed');
  t.same(ring.sqState(), { head: 0, tail: 2, pending: 0, flags: 0 }, 'tail moved, kernel head did not');
  t.same(ring.cqState(), { head: 0, tail: 0, overflow: 0 });

  t.equal(ring.submit(), 2, 'enter consumed both');
  t.same(ring.sqState(), { head: 2, tail: 2, pending: 0, flags: 0 });
  t.same(ring.cqState(), { head: 0, tail: 2, overflow: 0 }, 'NOPs complete inline during submit');
  t.equal(ring.cqReady(), 2);

  const c = ring.peekCqe();
  t.equal(ring.cqeUserData(c), 0xaa, 'completions arrive in submission order for inline NOPs');
  t.equal(ring.cqeRes(c), 0);
  ring.cqAdvance(1);
  t.same(ring.cqState(), { head: 1, tail: 2, overflow: 0 }, 'advance releases exactly one slot');
  t.equal(ring.cqeUserData(ring.peekCqe()), 0xbb);
  ring.cqAdvance(1);
  t.equal(ring.peekCqe(), -1, 'an empty CQ peeks as -1 without a syscall');
  t.same(ring.cqState(), { head: 2, tail: 2, overflow: 0 });
  t.end();
});

t.test('getSqe refuses a fifth slot on a 4-entry ring until the kernel consumes', (t) => {
  const ring = new IoUring(4);
  t.teardown(() => ring.close());
  for (let i = 0; i < 4; i++) {
    const w = ring.getSqe();
    t.equal(w, i * 16);
    prepNop(ring.sqes, w);
    setUserData(ring.sqes, w, i);
  }
  t.equal(ring.getSqe(), -1, 'full');
  t.equal(ring.sqSpaceLeft(), 0);
  t.throws(() => ring.mustGetSqe(), /submission queue is full/);
  t.equal(ring.submit(), 4);
  t.equal(ring.sqSpaceLeft(), 4);
  t.equal(ring.getSqe(), 0, 'slot 0 again: the SQ index wrapped');
  prepNop(ring.sqes, 0);
  setUserData(ring.sqes, 0, 4);
  t.equal(ring.submit(), 1);
  t.same(ring.sqState().tail, 5, 'the free-running tail keeps counting past the ring size');
  t.same(reap(ring).map((c) => c.userData), [0, 1, 2, 3, 4]);
  t.end();
});

t.test('CQ wrap-around: many rounds through a 4/8 ring keep order and positions', (t) => {
  const ring = new IoUring(4);
  t.teardown(() => ring.close());
  let next = 0;
  const seen: number[] = [];
  for (let round = 0; round < 13; round++) {
    // 3 per round, so head and tail land on every residue mod 8 over the run.
    for (let i = 0; i < 3; i++) {
      const w = ring.getSqe();
      prepNop(ring.sqes, w);
      setUserData(ring.sqes, w, next++);
    }
    ring.submit();
    const before = ring.cqState();
    t.equal((before.tail - before.head) >>> 0, 3, `round ${round}: three ready`);
    // Where the kernel put them: slot = index & mask, read by word index.
    for (let i = 0; i < 3; i++) {
      const c = ring.cqeAt(i);
      t.equal(c, ring.cqeBase + ((before.head + i) & 7) * ring.cqeWords, `round ${round}: CQE ${i} in slot (head + ${i}) & mask`);
      seen.push(ring.cqeUserData(c));
    }
    ring.cqAdvance(3);
  }
  t.same(seen, Array.from({ length: 39 }, (_, i) => i), 'every user_data once, in order, across 4 wraps of the CQ');
  t.same(ring.cqState(), { head: 39, tail: 39, overflow: 0 });
  t.end();
});

t.test('64-bit user_data round-trips without BigInt, including the top bit', (t) => {
  const ring = new IoUring(8);
  t.teardown(() => ring.close());
  const values: [number, number][] = [[0, 0], [1, 0], [0xffffffff, 0], [0, 1], [0xdeadbeef, 0xffffffff], [0x12345678, 0x80000000]];
  values.forEach(([lo, hi]) => {
    const w = ring.getSqe();
    prepNop(ring.sqes, w);
    setUserData2(ring.sqes, w, lo, hi);
  });
  ring.submit();
  const out = new Uint32Array(values.length * 4);
  t.equal(ring.copyCqes(out), values.length);
  values.forEach(([lo, hi], i) => {
    t.equal(out[i * 4], lo, `lo ${i}`);
    t.equal(out[i * 4 + 1], hi, `hi ${i}`);
  });
  const w = ring.getSqe();
  prepNop(ring.sqes, w);
  setUserData(ring.sqes, w, 2 ** 53 - 1);
  ring.submit(1);
  t.equal(ring.cqeUserData(ring.peekCqe()), 2 ** 53 - 1, 'a number user_data is exact up to 2^53 - 1');
  ring.cqAdvance(1);
  t.end();
});

t.test('copyCqes copies a batch and advances the head once; partial batches continue', (t) => {
  const ring = new IoUring(16);
  t.teardown(() => ring.close());
  for (let i = 0; i < 10; i++) {
    const w = ring.getSqe();
    prepNop(ring.sqes, w);
    setUserData(ring.sqes, w, 100 + i);
  }
  ring.submit();
  const out = new Uint32Array(4 * 4);
  t.equal(ring.copyCqes(out), 4, 'limited by the output size');
  t.same(ring.cqState(), { head: 4, tail: 10, overflow: 0 });
  t.same([out[0], out[4], out[8], out[12]], [100, 101, 102, 103]);
  t.equal(ring.copyCqes(out), 4);
  t.equal(ring.copyCqes(out), 2);
  t.same([out[0], out[4]], [108, 109]);
  t.equal(ring.copyCqes(out), 0, 'nothing left, and no wait asked');
  t.end();
});

t.test('a tiny CQ overflows into the kernel backlog and nothing is lost (FEAT_NODROP)', (t) => {
  const ring = new IoUring(4, { cqEntries: 4 });
  t.teardown(() => ring.close());
  t.equal(ring.cqEntries, 4);
  t.ok(ring.features & abi.IORING_FEAT_NODROP, 'kernel keeps overflowed CQEs');
  for (let round = 0; round < 3; round++) {
    for (let i = 0; i < 4; i++) {
      const w = ring.getSqe();
      prepNop(ring.sqes, w);
      setUserData(ring.sqes, w, round * 4 + i);
    }
    ring.submit();
  }
  t.equal(ring.cqReady(), 4, 'the CQ itself holds only four');
  t.ok(ring.sqState().flags & abi.IORING_SQ_CQ_OVERFLOW, 'the kernel flags the overflow in the SQ flags');
  t.ok(ring.cqNeedsFlush());
  const got = reap(ring);
  t.same(got.map((c) => c.userData), Array.from({ length: 12 }, (_, i) => i), 'all twelve, in order, after flushing the backlog');
  t.notOk(ring.sqState().flags & abi.IORING_SQ_CQ_OVERFLOW, 'overflow flag cleared once drained');
  t.end();
});

t.test('NO_SQARRAY falls back like liburing; both layouts work', (t) => {
  const a = new IoUring(8);
  const b = new IoUring(8, { noSqArray: false });
  t.teardown(() => { a.close(); b.close(); });
  t.equal(b.flags & abi.IORING_SETUP_NO_SQARRAY, 0, 'asked without it');
  t.comment(`default ring flags: 0x${a.flags.toString(16)} (NO_SQARRAY ${a.flags & abi.IORING_SETUP_NO_SQARRAY ? 'on' : 'dropped: kernel < 6.6'})`);
  for (const ring of [a, b]) {
    for (let i = 0; i < 8; i++) {
      const w = ring.getSqe();
      prepNop(ring.sqes, w);
      setUserData(ring.sqes, w, i);
    }
    ring.submit();
    t.same(reap(ring).map((c) => c.userData), [0, 1, 2, 3, 4, 5, 6, 7]);
  }
  t.end();
});

t.test('a short submit leaves the rest in the ring, counted from the kernel head (liburing #92)', (t) => {
  const ring = new IoUring(8, { noSqArray: false });
  t.teardown(() => ring.close());
  for (let i = 0; i < 4; i++) {
    const w = ring.getSqe();
    prepNop(ring.sqes, w);
    setUserData(ring.sqes, w, i);
    if (i === 1) ring.sqes[w] = 0xfe; // an opcode no kernel has: fails when the kernel reads it
  }
  const first = ring.submit();
  const st = ring.sqState();
  t.comment(`kernel consumed ${first} of 4`);
  t.equal(st.head, first, 'the kernel head says how many were consumed');
  t.equal(ring.sqReady(), 4 - first, 'the rest is still pending in the ring');
  const second = first < 4 ? ring.submit() : 0;
  t.equal(first + second, 4, 'the next submit sends exactly the remainder');
  const got = reap(ring, 4);
  t.same(got.map((c) => c.userData), [0, 1, 2, 3], 'one CQE per SQE, the bad one included');
  t.equal(got[1]!.res, -22, 'the bad opcode completes with -EINVAL');
  t.end();
});

t.test('SQPOLL: the kernel thread sleeps when idle and submit wakes it', async (t) => {
  let ring: IoUring;
  try {
    ring = new IoUring(8, { flags: abi.IORING_SETUP_SQPOLL, sqThreadIdle: 10 });
  } catch (e) {
    t.skip(`SQPOLL refused: ${(e as Error).message}`, () => {});
    return;
  }
  t.teardown(() => ring.close());
  await new Promise((r) => setTimeout(r, 100)); // idle well past sq_thread_idle
  t.ok(ring.sqState().flags & abi.IORING_SQ_NEED_WAKEUP, 'the poller went to sleep and says so');
  const w = ring.getSqe();
  prepNop(ring.sqes, w);
  setUserData(ring.sqes, w, 5);
  ring.submit();
  t.same(reap(ring, 1).map((c) => c.userData), [5], 'the wakeup enter got it processed');
});

t.test('submitAndWaitTimeout: false when nothing completes in time, true (and the CQE there) when one does', (t) => {
  const ring = new IoUring(4);
  t.teardown(() => ring.close());
  const t0 = Date.now();
  t.equal(ring.submitAndWaitTimeout(1, 150), false, 'an empty ring times out');
  const waited = Date.now() - t0;
  t.ok(waited >= 140, `after about the timeout (${waited} ms)`);
  t.equal(ring.cqReady(), 0);
  const w = ring.getSqe();
  prepNop(ring.sqes, w);
  setUserData(ring.sqes, w, 77);
  t.equal(ring.submitAndWaitTimeout(1, 5000), true, 'a NOP it submits itself completes within it');
  t.equal(ring.cqReady(), 1);
  t.equal(ring.cqeUserData(ring.peekCqe()), 77);
  ring.cqAdvance(1);
  t.same(ring.sqState().pending, 0, 'nothing left unsubmitted');
  t.end();
});

// What the ublk queue's low-latency spin watches (queue.ts, spin): on a DEFER_TASKRUN ring a
// completion that arrives as task work is not in the CQ until an enter runs it, but with
// IORING_SETUP_TASKRUN_FLAG the kernel raises IORING_SQ_TASKRUN in the SQ flags as it queues it.
t.test('DEFER_TASKRUN + TASKRUN_FLAG: queued task work shows as IORING_SQ_TASKRUN, not as a CQE, until an enter runs it', (t) => {
  const ring = new IoUring(4, { flags: abi.IORING_SETUP_SINGLE_ISSUER | abi.IORING_SETUP_DEFER_TASKRUN | abi.IORING_SETUP_TASKRUN_FLAG });
  const [a, b] = socketpair();
  const buf = Mapping.anonymous(4096);
  t.teardown(() => { ring.close(); sys.close(a); sys.close(b); buf.unmap(); });
  // A RECV with nothing to read waits on the socket's poll; data makes the poll queue task work.
  const w = ring.getSqe();
  prepRecv(ring.sqes, w, a, buf.address, 16, 0);
  setUserData(ring.sqes, w, 7);
  t.equal(ring.submit(), 1);
  t.equal(ring.taskRunPending(), false, 'nothing queued yet');
  sys.write(b, buf.address, 5);
  t.equal(ring.cqReady(), 0, 'the completion is not in the CQ');
  t.equal(ring.taskRunPending(), true, 'but IORING_SQ_TASKRUN says task work waits');
  ring.getEvents(0);
  t.equal(ring.taskRunPending(), false, 'an enter ran it and cleared the flag');
  t.same(reap(ring).map((c) => [c.userData, c.res]), [[7, 5]], 'and the CQE is there');
  t.end();
});
