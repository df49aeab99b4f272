/**
 * The live trace of a ring (src/uring/trace.ts) on the host kernel: what lines a real ring's
 * SQEs and CQEs become, that publishing and reaping call the tracer exactly once per batch with
 * exactly the entries that changed hands (also across the CQ's wrap-around), and that a ring
 * without a tracer calls nothing.
 */
import t from 'tap';
import { closeSync, openSync } from 'node:fs';
import { IoUring, Mapping, abi, libc, prepNop, prepRead, setUserData, setFlags } from '../../src/uring/index.js';
import { RingTrace, describeCqe, describeSqe, flagText, opcodeName, resultText, type RingTracer } from '../../src/uring/trace.js';

const TIME = /^\d\d:\d\d:\d\d\.\d{6} /;

function collect(tt: { ok(v: unknown, m: string): unknown }, name: string): { lines: string[]; writes: number; tracer: RingTrace } {
  const out = { lines: [] as string[], writes: 0, tracer: undefined as unknown as RingTrace };
  out.tracer = new RingTrace(name, (text) => {
    out.writes++;
    tt.ok(text.endsWith('\n'), 'a batch ends in a newline');
    out.lines.push(...text.slice(0, -1).split('\n'));
  });
  return out;
}

t.test('names: opcodes, flags, results', async (t) => {
  t.equal(opcodeName(abi.IORING_OP_URING_CMD), 'URING_CMD');
  t.equal(opcodeName(250), 'OP_250', 'an opcode newer than the table');
  t.equal(resultText(-libc.EAGAIN), '-EAGAIN');
  t.equal(resultText(4096), '4096');
  t.equal(flagText(0b101 | 0x80, [[1, 'A'], [4, 'C']]), 'A|C|0x80', 'unknown bits in hex');
  t.equal(flagText(0, [[1, 'A']]), '');
});

t.test('a NOP and a READ of /dev/zero: one line per SQE at publish, one per CQE at reap', async (t) => {
  const ring = new IoUring(4);
  const buf = Mapping.anonymous(4096);
  const zero = openSync('/dev/zero', 'r');
  t.teardown(() => {
    ring.close();
    buf.unmap();
  });
  const c = collect(t, 'r');
  ring.tracer = c.tracer;
  let w = ring.mustGetSqe();
  prepNop(ring.sqes, w);
  setUserData(ring.sqes, w, 42);
  w = ring.mustGetSqe();
  prepRead(ring.sqes, w, zero, buf.address, 512, 0);
  setFlags(ring.sqes, w, abi.IOSQE_ASYNC);
  setUserData(ring.sqes, w, 0x1234);
  t.equal(c.lines.length, 0, 'nothing before the SQEs are published');
  ring.submit(2);
  t.equal(c.writes, 1, 'both SQEs in one write');
  t.equal(c.lines.length, 2);
  t.match(c.lines[0], TIME);
  t.equal(c.lines[0]!.replace(TIME, ''), 'r SQE NOP fd=-1 user_data=0x2a');
  t.equal(c.lines[1]!.replace(TIME, ''), `r SQE READ flags=ASYNC fd=${zero} addr=0x${buf.address.toString(16)} len=512 user_data=0x1234`);
  const n = ring.cqReady();
  t.equal(n, 2);
  ring.cqAdvance(n);
  t.equal(c.writes, 2, 'the CQEs in one write');
  const cqes = c.lines.slice(2).map((l) => l.replace(TIME, '')).sort();
  t.same(cqes, ['r CQE user_data=0x1234 res=512', 'r CQE user_data=0x2a res=0']);
  closeSync(zero);
});

t.test('a failure shows as its errno name', async (t) => {
  const ring = new IoUring(2);
  t.teardown(() => ring.close());
  const c = collect(t, 'e');
  ring.tracer = c.tracer;
  const w = ring.mustGetSqe();
  prepRead(ring.sqes, w, 9999, 0, 8, 0);
  setUserData(ring.sqes, w, 7);
  ring.submit(1);
  const out = new Uint32Array(ring.cqeWords * 2);
  t.equal(ring.copyCqes(out), 1);
  t.equal(c.lines[1]!.replace(TIME, ''), 'e CQE user_data=0x7 res=-EBADF', 'copyCqes traces too');
});

t.test('each CQE exactly once across the CQ wrap-around, and none without a tracer', async (t) => {
  const ring = new IoUring(4); // CQ of 8
  t.teardown(() => ring.close());
  let seen: number[] = [];
  const tracer: RingTracer = {
    submitted: () => {},
    completed: (cq, n, at) => {
      for (let i = 0; i < n; i++) seen.push(cq[at(i)]!);
    },
  };
  let next = 0;
  const round = (k: number) => {
    for (let i = 0; i < k; i++) {
      const w = ring.mustGetSqe();
      prepNop(ring.sqes, w);
      setUserData(ring.sqes, w, next++);
    }
    ring.submit(k);
    ring.cqAdvance(ring.cqReady());
  };
  ring.tracer = tracer;
  for (let r = 0; r < 7; r++) round(3); // 21 CQEs through a CQ of 8: wraps twice
  t.same(seen, Array.from({ length: 21 }, (_, i) => i), 'user_data 0..20 in order, each once');
  ring.tracer = null;
  seen = [];
  round(3);
  t.same(seen, [], 'a ring without a tracer calls none');
  t.equal(ring.cqState().head, 24, 'and still reaps');
});

t.test('describeSqe/describeCqe let a layer above name its URING_CMDs and user_data', async (t) => {
  const sqes = new Uint32Array(32);
  sqes[0] = abi.IORING_OP_URING_CMD;
  sqes[1] = 3; // fd
  sqes[2] = 0xc0107520; // cmd_op
  sqes[8] = 5;
  sqes[9] = 1;
  t.equal(describeSqe(sqes, 0), 'URING_CMD fd=3 cmd_op=0xc0107520 user_data=0x100000005', 'without a decoder: raw');
  t.equal(describeSqe(sqes, 0, { uringCmd: (_s, _w, op) => (op === 0xc0107520 ? 'FETCH' : undefined), userData: (lo, hi) => `${hi}:${lo}` }),
    'URING_CMD fd=3 FETCH user_data=1:5');
  const cq = new Uint32Array([5, 1, (-libc.ENODEV) >>> 0, abi.IORING_CQE_F_MORE | (3 << 16)]);
  t.equal(describeCqe(cq, 0, { completion: (lo, hi, res) => `lo=${lo} hi=${hi} res=${res}` }),
    'user_data=0x100000005 res=-ENODEV flags=F_MORE buf=3 lo=5 hi=1 res=-19');
});
