/**
 * The queue-thread half of async targets (async-main-thread.ts is the other half). Runs in each
 * queue's worker thread, as that queue's handler.
 *
 * A queue thread blocks in io_uring_enter, so a Promise-returning target cannot run there. This
 * handler forwards each batch of requests to the main thread in one postMessage and returns
 * "later" for them. The main thread pushes results into the queue's completion ring in shared
 * memory (async-completion-ring.ts) and signals the queue's wake eventfd, which the queue's ring
 * polls (multishot POLL_ADD): the wake CQE ends the queue's io_uring_enter, `onWake` drains the
 * ring, and the COMMIT_AND_FETCH_REQs go out with the next enter.
 */
import { defineTarget, type QueueHandler } from './target.js';
import { CompletionRing } from './async-completion-ring.js';
import { UBLK_IO_OP_READ, UBLK_IO_OP_WRITE } from './abi.js';

/** What the queue thread posts to the main thread: tag, op, flags, offset, length per request. */
export type AsyncBatch = number[];
/** Numbers per request in an {@link AsyncBatch}. */
export const BATCH_STRIDE = 5;

export default defineTarget<Record<string, never>>({
  name: 'async-queue-thread',
  usage: '',
  parseArgs: () => ({}),
  prepare: () => {
    throw new Error('async-queue-thread is the queue side of an async target; it has no device of its own');
  },
  openQueue(_options, queue): QueueHandler {
    if (!queue.shared) throw new Error('an async target\'s queue needs its completion ring (QueueInfo.shared)');
    const ring = new CompletionRing(queue.shared, queue.depth);
    let batch: AsyncBatch = [];
    return {
      handle(req) {
        // The main thread reads and writes the tag's buffer: in the modes where the kernel copies
        // nothing, touching it makes the queue stage the data there (request-data.ts).
        if (req.op === UBLK_IO_OP_READ || req.op === UBLK_IO_OP_WRITE) void req.buffer;
        batch.push(req.tag, req.op, req.flags, req.offset, req.length);
        return undefined;
      },
      afterBatch() {
        if (batch.length === 0) return;
        queue.post(batch);
        batch = [];
      },
      onWake(ctx) {
        ring.drain((tag, result) => ctx.complete(tag, result));
      },
    };
  },
});
