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
import { Mapping, sys } from '../libc/index.js';
import type { DeviceSpec } from './target.js';
import { CompletionRing } from './async-completion-ring.js';
import { BATCH_STRIDE, type AsyncBatch } from './async-queue-thread.js';
import { HangReporter, serveAsync, type AsyncHandlers } from './async-target.js';

/**
 * A block device as functions of the calling thread (`UblkServer.start({ asyncTarget })`): the
 * functions of {@link AsyncHandlers} (async-target.ts), shared by every queue, and the device's
 * shape. `close` is not called: the caller owns what the functions use, and knows when
 * `server.stop()` has returned.
 */
export interface AsyncTarget extends AsyncHandlers {
  readonly device: DeviceSpec;
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

  private readonly hangs: HangReporter;

  constructor(private readonly target: AsyncTarget, shared: SharedArrayBuffer, depth: number, wakeFd: number, qid: number, requestTimeoutMs: number, log: (line: string) => void) {
    this.hangs = new HangReporter(requestTimeoutMs, qid, log);
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
    this.hangs.clear();
  }

  /** A batch from the queue: tag, op, flags, offset, length per request. */
  dispatch(batch: AsyncBatch): void {
    for (let i = 0; i < batch.length; i += BATCH_STRIDE) {
      const tag = batch[i]!;
      const op = batch[i + 1]!;
      const offset = batch[i + 3]!;
      const length = batch[i + 4]!;
      const r = serveAsync(this.target, op, batch[i + 2]!, offset, length, () => this.buf(tag, length));
      if (typeof r === 'number') {
        this.complete(tag, r);
        continue;
      }
      this.hangs.watch(tag, op, offset, length);
      void r.then((res) => {
        this.hangs.settled(tag);
        this.complete(tag, res);
      });
    }
  }

  private buf(tag: number, length: number): Buffer {
    const whole = (this.views[tag] ??= this.buffers!.bytes(tag * this.maxIoBytes, this.maxIoBytes));
    return whole.subarray(0, length);
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
