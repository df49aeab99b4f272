/**
 * Targets written as plain async functions, and the main-thread half of how they are served
 * (async-queue-thread.ts is the queue-thread half). Everything here runs on the main thread's
 * event loop.
 *
 * Decision (see async-queue-thread.ts for the mechanism): the queue threads stay ring-native and
 * block in io_uring_enter; requests travel to the main thread in one postMessage per batch;
 * results come back through a completion ring in shared memory (async-completion-ring.ts) plus
 * one eventfd write per microtask batch, which the queue's ring polls. The data itself is never
 * copied between threads: the handler sees the queue's mmapped I/O buffer through a Buffer.
 * Cost, measured by `npm run bench:ublk` (null vs async-null): see the README.
 */
import { constants as osConstants } from 'node:os';
import { Mapping, libc, sys } from '../libc/index.js';
import type { DeviceSpec } from './target.js';
import { CompletionRing } from './async-completion-ring.js';
import { BATCH_STRIDE, type AsyncBatch } from './async-queue-thread.js';
import {
  UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_FLUSH, UBLK_IO_OP_DISCARD, UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_F_FUA,
} from './abi.js';

/** A block device as async functions. Offsets and lengths are in bytes. */
export interface AsyncTarget extends DeviceSpec {
  /** Fill `buf` (the request's length) with the data at `offset`. `buf` is valid until the promise settles. */
  read(offset: number, buf: Buffer): Promise<void>;
  /** Store `buf` at `offset`. `fua`: the data must be durable when the promise resolves. */
  write(offset: number, buf: Buffer, fua: boolean): Promise<void>;
  /** Make every completed write durable. */
  flush?(): Promise<void>;
  /** Forget (DISCARD) or zero (WRITE_ZEROES) a range. */
  discardRange?(offset: number, length: number, zero: boolean): Promise<void>;
}

/**
 * The result a failed handler's error becomes: the errno its `code` names (a Node fs error's
 * 'ENOSPC', a SysError's), so the block layer sees ENOSPC as ENOSPC; anything else is EIO.
 */
function errorResult(e: unknown): number {
  const code = (e as { code?: unknown } | undefined)?.code;
  const errno = typeof code === 'string' ? (osConstants.errno as Record<string, number>)[code] : undefined;
  return errno !== undefined && errno > 0 ? -errno : -libc.EIO;
}

/** The main-thread end of one queue of an async target. */
export class AsyncQueuePort {
  private readonly ring: CompletionRing;
  private readonly depth: number;
  private readonly wakeFd: number;
  /** The queue's tag buffers (same process, same memory) and each tag's Buffer over its own. */
  private buffers: Mapping | undefined;
  private readonly views: Buffer[] = [];
  private maxIoBytes = 0;
  private wakeScheduled = false;
  private closed = false;

  constructor(private readonly target: AsyncTarget, shared: SharedArrayBuffer, depth: number, wakeFd: number) {
    this.ring = new CompletionRing(shared, depth);
    this.depth = depth;
    this.wakeFd = wakeFd;
  }

  /**
   * The queue reported where its buffers are. A Buffer is made per tag, on first use: one view
   * over all of them would exceed what koffi and Node can map as one ArrayBuffer once depth x
   * max request size passes 1 GiB (4096 tags of 32 MiB are 128 GiB).
   */
  attach(bufBase: number, maxIoBytes: number): void {
    this.buffers = Mapping.borrow(bufBase, this.depth * maxIoBytes);
    this.maxIoBytes = maxIoBytes;
  }

  /**
   * The queue thread has exited: from now on nothing is written to its completion ring and its
   * wake eventfd (which the server closes next, and whose number the process may reuse) is never
   * signalled again. Handlers still running finish into the void.
   */
  close(): void {
    this.closed = true;
  }

  /** A batch from the queue: tag, op, flags, offset, length per request. */
  dispatch(batch: AsyncBatch): void {
    for (let i = 0; i < batch.length; i += BATCH_STRIDE) {
      const tag = batch[i]!;
      this.run(tag, batch[i + 1]!, batch[i + 2]!, batch[i + 3]!, batch[i + 4]!).then(
        (res) => this.complete(tag, res),
        (e: unknown) => this.complete(tag, errorResult(e)),
      );
    }
  }

  private buf(tag: number, length: number): Buffer {
    const whole = (this.views[tag] ??= this.buffers!.bytes(tag * this.maxIoBytes, this.maxIoBytes));
    return whole.subarray(0, length);
  }

  private async run(tag: number, op: number, flags: number, offset: number, length: number): Promise<number> {
    const t = this.target;
    switch (op) {
      case UBLK_IO_OP_READ:
        await t.read(offset, this.buf(tag, length));
        return length;
      case UBLK_IO_OP_WRITE:
        await t.write(offset, this.buf(tag, length), (flags & UBLK_IO_F_FUA) !== 0);
        return length;
      case UBLK_IO_OP_FLUSH:
        await t.flush?.();
        return 0;
      case UBLK_IO_OP_DISCARD:
      case UBLK_IO_OP_WRITE_ZEROES:
        if (!t.discardRange) return -libc.EOPNOTSUPP;
        await t.discardRange(offset, length, op === UBLK_IO_OP_WRITE_ZEROES);
        return 0; // not a byte count: a >= 2 GiB discard would overflow the result
      default:
        return -libc.EOPNOTSUPP;
    }
  }

  private complete(tag: number, res: number): void {
    if (this.closed) return;
    this.ring.push(tag, res);
    // One eventfd write per microtask batch, however many requests finished in it.
    if (!this.wakeScheduled) {
      this.wakeScheduled = true;
      queueMicrotask(() => {
        this.wakeScheduled = false;
        if (!this.closed) sys.eventfdSignal(this.wakeFd);
      });
    }
  }
}
