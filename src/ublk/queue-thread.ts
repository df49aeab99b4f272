/**
 * Entry point of a queue's worker thread: loads the target module, opens the queue and serves it
 * (queue.ts) in a loop that blocks in io_uring_enter. It talks to the server (server.ts) only
 * through QueueMessages, and the server to it only through the wake eventfd and a control word
 * in shared memory (queue-messages.ts). Never imported by anything: it is a thread's entry.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { UblkQueue } from './queue.js';
import { libc, sys } from '../libc/index.js';
import type { TargetDefinition } from './target.js';
import { CONTROL_FAIL_HELD, CONTROL_STOP, type QueueMessage, type QueueThreadData } from './queue-messages.js';

const data = workerData as QueueThreadData;
const port = parentPort!;
const send = (m: QueueMessage) => port.postMessage(m);

let queue: UblkQueue | undefined;
// This thread answers the kernel's I/O: if it had to wait for memory reclaim, and reclaim had to
// write dirty pages to our own device, the two would wait for each other. PR_SET_IO_FLUSHER keeps
// its allocations out of I/O-issuing reclaim (per thread; needs CAP_SYS_RESOURCE).
try {
  sys.prctl(libc.PR_SET_IO_FLUSHER, 1);
} catch (e) {
  send({ kind: 'log', qid: data.qid, line: `queue ${data.qid}: cannot mark the thread as an I/O flusher (${(e as Error).message}); under memory pressure a file system on this device can deadlock with its server` });
}
try {
  const mod = (await import(data.targetUrl)) as { default: TargetDefinition<unknown> };
  const handler = mod.default.openQueue(data.targetOptions, {
    qid: data.qid,
    depth: data.depth,
    shared: data.shared,
    device: data.device,
    counters: new Float64Array(data.counters),
    post: (message) => send({ kind: 'target', qid: data.qid, message }),
  });
  const control = new Int32Array(data.control);
  queue = new UblkQueue({
    charFd: data.charFd,
    qid: data.qid,
    depth: data.depth,
    maxIoBytes: data.maxIoBytes,
    drainTimeoutMs: data.drainTimeoutMs,
    spinUs: data.spinUs,
    dataHome: data.dataHome,
    bufferRegistration: data.bufferRegistration,
    memoryCopy: data.memoryCopy,
    batch: data.batch,
    forceRegFallback: data.forceRegFallback,
    tagStride: data.tagStride,
    tagOffset: data.tagOffset,
    sharedRegions: data.sharedRegions,
    handler,
    wakeFd: data.wakeFd,
    log: (line) => send({ kind: 'log', qid: data.qid, line }),
    onFetched: () => send({ kind: 'fetched', qid: data.qid, bufBase: queue!.bufferBase, maxIoBytes: data.maxIoBytes }),
    onWake: () => {
      const word = Atomics.load(control, 0);
      if (word & CONTROL_FAIL_HELD) queue!.failHeld();
      return (word & CONTROL_STOP) !== 0;
    },
  });
} catch (e) {
  send({ kind: 'error', qid: data.qid, message: (e as Error).message, stack: (e as Error).stack });
}
if (queue) {
  let served = 0;
  let error: string | undefined;
  try {
    served = queue.run();
  } catch (e) {
    error = (e as Error)?.stack ?? String(e);
  }
  // Whatever ended run(), close() waits for the target's I/O before freeing any memory.
  const close = queue.close();
  send({ kind: 'done', qid: data.qid, served: served || queue.served, close, error });
}
