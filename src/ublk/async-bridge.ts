/**
 * The queue-thread half of async targets (see async-target.ts for the main-thread half).
 *
 * A queue thread blocks in io_uring_enter, so a Promise-returning target cannot run there. This
 * handler forwards each batch of requests to the main thread in one postMessage and returns
 * "later" for them. The main thread writes results into a completion ring in shared memory and
 * signals the queue's wake eventfd, which the queue's ring polls (multishot POLL_ADD): the wake
 * CQE ends the queue's io_uring_enter, `onWake` drains the ring, and the COMMIT_AND_FETCH_REQs
 * go out with the next enter.
 *
 * Completion ring layout (Int32Array over the queue's SharedArrayBuffer):
 *   [0] tail  (written by the main thread, after the entry)   [1] head (written by the queue)
 *   [4 + 2i] tag, [5 + 2i] result   for i = index % depth
 * A queue never has more than `depth` requests outstanding, so `depth` entries cannot overflow.
 */
import { defineTarget, type QueueHandler } from './target.js';

export const RING_HEADER = 4;

/** Bytes of shared memory the completion ring of a `depth`-deep queue needs. */
export function completionRingBytes(depth: number): number {
  return (RING_HEADER + depth * 2) * 4;
}

export default defineTarget<Record<string, never>>({
  name: 'async-bridge',
  usage: '',
  parseArgs: () => ({}),
  prepare: () => {
    throw new Error('async-bridge is the queue side of an async target; it has no device of its own');
  },
  openQueue(_options, queue): QueueHandler {
    if (!queue.shared) throw new Error('async-bridge needs the completion ring (QueueInfo.shared)');
    const ring = new Int32Array(queue.shared);
    const depth = queue.depth;
    // Requests of the current batch, flattened: tag, op, flags, offset, length.
    let batch: number[] = [];
    return {
      handle(req) {
        batch.push(req.tag, req.op, req.flags, req.offset, req.length);
        return undefined;
      },
      afterBatch() {
        if (batch.length === 0) return;
        queue.post(batch);
        batch = [];
      },
      onWake(ctx) {
        let head = ring[1]!;
        const tail = Atomics.load(ring, 0); // acquire: the entries before tail are written
        while (head !== tail) {
          const i = RING_HEADER + (head % depth) * 2;
          ctx.complete(ring[i]!, ring[i + 1]!);
          head = (head + 1) | 0;
        }
        Atomics.store(ring, 1, head);
      },
    };
  },
});
