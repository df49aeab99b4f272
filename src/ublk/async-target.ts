/**
 * Targets written as plain async functions, run on the main thread's event loop.
 *
 * Decision (see async-bridge.ts for the mechanism): the queue threads stay ring-native and block
 * in io_uring_enter; requests travel to the main thread in one postMessage per batch; results
 * come back through a completion ring in shared memory plus one eventfd write per microtask
 * batch, which the queue's ring polls. The data itself is never copied between threads: the
 * handler sees the queue's mmapped I/O buffer through a Buffer made once per queue.
 * Cost, measured by `npm run bench:ublk` (null vs async-null): see the README.
 */
import koffi from 'koffi';
import { sys } from '../uring/index.js';
import type { DeviceSpec } from './target.js';
import { RING_HEADER } from './async-bridge.js';
import { UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_FLUSH, UBLK_IO_OP_DISCARD, UBLK_IO_OP_WRITE_ZEROES } from './abi.js';

/** A block device as async functions. Offsets and lengths are in bytes. */
export interface AsyncTarget extends DeviceSpec {
  /** Fill `buf` (the request's length) with the data at `offset`. */
  read(offset: number, buf: Buffer): Promise<void>;
  /** Store `buf` at `offset`. `fua`: the data must be durable when the promise resolves. */
  write(offset: number, buf: Buffer, fua: boolean): Promise<void>;
  /** Make every completed write durable. */
  flush?(): Promise<void>;
  /** Forget (DISCARD) or zero (WRITE_ZEROES) a range. */
  discardRange?(offset: number, length: number, zero: boolean): Promise<void>;
}

const EIO = -5;
const EOPNOTSUPP = -95;
const UBLK_IO_F_FUA = 1 << 13;

/** The main-thread end of one queue of an async target. */
export class AsyncQueuePort {
  private readonly ring: Int32Array;
  private readonly depth: number;
  private readonly wakeFd: number;
  private buffers: Buffer | undefined;
  private bufSize = 0;
  private wakeScheduled = false;
  /** Requests answered (for stats). */
  served = 0;

  constructor(private readonly target: AsyncTarget, shared: SharedArrayBuffer, depth: number, wakeFd: number) {
    this.ring = new Int32Array(shared);
    this.depth = depth;
    this.wakeFd = wakeFd;
  }

  /** The queue reported its buffers: map them once as one Buffer (same process, same memory). */
  attach(bufBase: number, bufSize: number): void {
    this.buffers = Buffer.from(koffi.view(bufBase, bufSize * this.depth) as ArrayBuffer);
    this.bufSize = bufSize;
  }

  /** A batch from the queue: tag, op, flags, offset, length per request. */
  dispatch(batch: number[]): void {
    for (let i = 0; i < batch.length; i += 5) {
      const tag = batch[i]!;
      this.run(tag, batch[i + 1]!, batch[i + 2]!, batch[i + 3]!, batch[i + 4]!).then(
        (res) => this.complete(tag, res),
        () => this.complete(tag, EIO),
      );
    }
  }

  private async run(tag: number, op: number, flags: number, offset: number, length: number): Promise<number> {
    const t = this.target;
    const buf = () => this.buffers!.subarray(tag * this.bufSize, tag * this.bufSize + length);
    switch (op) {
      case UBLK_IO_OP_READ:
        await t.read(offset, buf());
        return length;
      case UBLK_IO_OP_WRITE:
        await t.write(offset, buf(), (flags & UBLK_IO_F_FUA) !== 0);
        return length;
      case UBLK_IO_OP_FLUSH:
        await t.flush?.();
        return 0;
      case UBLK_IO_OP_DISCARD:
      case UBLK_IO_OP_WRITE_ZEROES:
        if (!t.discardRange) return EOPNOTSUPP;
        await t.discardRange(offset, length, op === UBLK_IO_OP_WRITE_ZEROES);
        return 0; // not a byte count: a >= 2 GiB discard would overflow the result
      default:
        return EOPNOTSUPP;
    }
  }

  private complete(tag: number, res: number): void {
    const r = this.ring;
    const tail = r[0]!;
    const i = RING_HEADER + (tail % this.depth) * 2;
    r[i] = tag;
    r[i + 1] = res;
    Atomics.store(r, 0, (tail + 1) | 0); // release: the entry is visible before the new tail
    this.served++;
    // One eventfd write per microtask batch, however many requests finished in it.
    if (!this.wakeScheduled) {
      this.wakeScheduled = true;
      queueMicrotask(() => {
        this.wakeScheduled = false;
        sys.eventfdSignal(this.wakeFd);
      });
    }
  }
}
