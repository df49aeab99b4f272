/**
 * The TypeScript side of the ring benchmark: the same work as bench/uring-ref.c, through
 * src/uring, so `bench/uring.ts` can print the two as ratios. One JSON line per run, in the same
 * shape as the C program's.
 *
 *   node --import tsx bench/uring-js.ts nop BATCH SECONDS
 *   node --import tsx bench/uring-js.ts read FILE QD SECONDS
 *   node --import tsx bench/uring-js.ts fs-promises FILE QD SECONDS
 */
import { openSync, fstatSync } from 'node:fs';
import { open as openAsync } from 'node:fs/promises';
import { IoUring, Mapping, prepNop, prepRead, setUserData } from '../src/uring/index.js';

const IO_SIZE = 4096;
const CLOCK_CHECK_EVERY = 1000;
const WARMUP_SECONDS = 0.2;

function die(msg: string): never {
  process.stderr.write(`uring-js: ${msg}\n`);
  process.exit(1);
}

/**
 * xorshift64 (13/7/17) on two u32 halves, bit-identical to the C program's uint64_t version, so
 * both read the same blocks in the same order without a BigInt per draw. The state lives in a
 * Uint32Array: a u32 above 2^31 in an object field would be a boxed double.
 */
class Xorshift64 {
  private readonly x = Uint32Array.of(0x7f4a7c15, 0x9e3779b9); // [lo, hi] of the C seed
  /** Advances and returns the block: `x & (n - 1)` for a power-of-two n, else `x % n` (n < 2^21). */
  nextBlock(n: number): number {
    const x = this.x;
    let lo = x[0]!, hi = x[1]!;
    // x ^= x << 13
    hi = (hi ^ ((hi << 13) | (lo >>> 19))) >>> 0;
    lo = (lo ^ (lo << 13)) >>> 0;
    // x ^= x >> 7
    lo = (lo ^ ((lo >>> 7) | (hi << 25))) >>> 0;
    hi = (hi ^ (hi >>> 7)) >>> 0;
    // x ^= x << 17
    hi = (hi ^ ((hi << 17) | (lo >>> 15))) >>> 0;
    lo = (lo ^ (lo << 17)) >>> 0;
    x[0] = lo;
    x[1] = hi;
    if ((n & (n - 1)) === 0) return (lo & (n - 1)) >>> 0;
    // (hi * 2^32 + lo) % n, exact in doubles: (hi % n) * (2^32 % n) < 2^42.
    return ((hi % n) * (4294967296 % n) + (lo % n)) % n;
  }
}

/** Sequence state carried across the warm-up and the measured run. */
interface NopState { nextSubmit: number; nextExpect: number }

/**
 * One timed NOP loop. Counters live in locals for the loop and go back into `st` at the end:
 * captured `let`s written on every op would be context-slot stores, which is not what a fair
 * comparison with C's register-held counters measures.
 */
function nopRun(ring: IoUring, batch: number, secs: number, st: NopState): [number, number] {
  const s = ring.sqes;
  let nextSubmit = st.nextSubmit;
  let nextExpect = st.nextExpect;
  let ops = 0;
  const start = performance.now();
  const end = start + secs * 1000;
  for (let iter = 1; ; iter++) {
    for (let i = 0; i < batch; i++) {
      const w = ring.getSqe();
      prepNop(s, w);
      setUserData(s, w, nextSubmit++);
    }
    ring.submit(batch);
    const ready = ring.cqReady();
    for (let i = 0; i < ready; i++) {
      const c = ring.cqeAt(i);
      if (ring.cqeRes(c) !== 0) die(`nop res ${ring.cqeRes(c)}`);
      if (ring.cqeUserData(c) !== nextExpect) die(`nop user_data ${ring.cqeUserData(c)}, expected ${nextExpect}`);
      nextExpect++;
    }
    ring.cqAdvance(ready);
    ops += ready;
    if (iter % CLOCK_CHECK_EVERY === 0 && performance.now() >= end) break;
  }
  st.nextSubmit = nextSubmit;
  st.nextExpect = nextExpect;
  return [ops, (performance.now() - start) / 1000];
}

function nop(batch: number, seconds: number): void {
  const ring = new IoUring(256);
  const st: NopState = { nextSubmit: 0, nextExpect: 0 };
  nopRun(ring, batch, WARMUP_SECONDS, st);
  const [ops, elapsed] = nopRun(ring, batch, seconds, st);
  console.log(JSON.stringify({ mode: 'nop', batch, flags: 'none', ops, seconds: elapsed, ops_per_sec: ops / elapsed }));
  ring.close();
}

function read(file: string, qd: number, seconds: number): void {
  const fd = openSync(file, 'r');
  const nblocks = Math.floor(fstatSync(fd).size / IO_SIZE);
  if (nblocks === 0) die(`${file} is smaller than one block`);
  const ring = new IoUring(64);
  const s = ring.sqes;
  const bufs = Mapping.anonymous(qd * IO_SIZE, { populate: true });
  const rng = new Xorshift64();
  const queueRead = (slot: number) => {
    const block = rng.nextBlock(nblocks);
    const w = ring.getSqe();
    prepRead(s, w, fd, bufs.address + slot * IO_SIZE, IO_SIZE, block * IO_SIZE);
    setUserData(s, w, slot);
  };
  for (let slot = 0; slot < qd; slot++) queueRead(slot);
  const run = (secs: number): [number, number] => {
    let ops = 0;
    const start = performance.now();
    const end = start + secs * 1000;
    for (let iter = 1; ; iter++) {
      ring.submit(1);
      const ready = ring.cqReady();
      for (let i = 0; i < ready; i++) {
        const c = ring.cqeAt(i);
        if (ring.cqeRes(c) !== IO_SIZE) die(`read res ${ring.cqeRes(c)}`);
        const slot = ring.cqeUserDataLo(c);
        if (slot >= qd) die(`bad slot ${slot}`);
        queueRead(slot);
      }
      ring.cqAdvance(ready);
      ops += ready;
      if (iter % CLOCK_CHECK_EVERY === 0 && performance.now() >= end) {
        return [ops, (performance.now() - start) / 1000];
      }
    }
  };
  run(WARMUP_SECONDS);
  const [ops, elapsed] = run(seconds);
  console.log(JSON.stringify({ mode: 'read', qd, flags: 'none', ops, seconds: elapsed, ops_per_sec: ops / elapsed }));
  ring.close();
  bufs.unmap();
}

/** What a Node user would write without us: `qd` FileHandle.read()s in flight. */
async function fsPromises(file: string, qd: number, seconds: number): Promise<void> {
  const fh = await openAsync(file, 'r');
  const nblocks = Math.floor((await fh.stat()).size / IO_SIZE);
  const rng = new Xorshift64();
  let ops = 0;
  let stopAt = 0;
  let counting = false;
  const worker = async (slot: number) => {
    const buf = Buffer.alloc(IO_SIZE);
    while (performance.now() < stopAt) {
      const { bytesRead } = await fh.read(buf, 0, IO_SIZE, rng.nextBlock(nblocks) * IO_SIZE);
      if (bytesRead !== IO_SIZE) die(`fs.promises read ${bytesRead} in slot ${slot}`);
      if (counting) ops++;
    }
  };
  stopAt = performance.now() + WARMUP_SECONDS * 1000;
  await Promise.all(Array.from({ length: qd }, (_, i) => worker(i)));
  counting = true;
  const start = performance.now();
  stopAt = start + seconds * 1000;
  await Promise.all(Array.from({ length: qd }, (_, i) => worker(i)));
  const elapsed = (performance.now() - start) / 1000;
  console.log(JSON.stringify({ mode: 'fs-promises', qd, flags: 'none', ops, seconds: elapsed, ops_per_sec: ops / elapsed }));
  await fh.close();
}

const [mode, ...args] = process.argv.slice(2);
if (mode === 'nop') nop(Number(args[0]), Number(args[1]));
else if (mode === 'read') read(args[0]!, Number(args[1]), Number(args[2]));
else if (mode === 'fs-promises') await fsPromises(args[0]!, Number(args[1]), Number(args[2]));
else die('usage: uring-js.ts nop BATCH SECONDS | read FILE QD SECONDS | fs-promises FILE QD SECONDS');
