/**
 * Entry point of a queue's worker thread: loads the target module, opens the queue and serves it
 * (queue.ts) in a loop that blocks in io_uring_enter. It talks to the server (server.ts) only
 * through QueueMessages, and the server to it only through the wake eventfd and a control word
 * in shared memory (queue-messages.ts). Never imported by anything: it is a thread's entry.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { UblkQueue } from './queue.js';
import { libc, sys } from '../libc/index.js';
import type { QueueHandler, TargetDefinition } from './target.js';
import { isAsyncTarget, openAsyncQueue } from './async-target.js';
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
  const mod = (await import(data.targetUrl)) as { default: unknown };
  const info = {
    qid: data.qid,
    depth: data.depth,
    shared: data.shared,
    device: data.device,
    counters: new Float64Array(data.counters),
    post: (message: unknown) => send({ kind: 'target', qid: data.qid, message }),
    log: (line: string) => send({ kind: 'log', qid: data.qid, line }),
    requestTimeoutMs: data.requestTimeoutMs,
  };
  const def = mod.default;
  const handler: QueueHandler = isAsyncTarget(def)
    ? await openAsyncQueue(def, data.targetOptions, info)
    : (def as TargetDefinition<unknown>).openQueue(data.targetOptions, info);
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
    trace: data.trace && { stderr: data.trace.stderr, fifo: data.trace.fifo, word: data.trace.word && new Int32Array(data.trace.word) },
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
  const onLoop = queue.handlerUsesEventLoop;
  try {
    served = onLoop ? await queue.runOnEventLoop() : queue.run();
  } catch (e) {
    error = (e as Error)?.stack ?? String(e);
  }
  // Whatever ended the run, close() waits for the target's I/O before freeing any memory; a
  // handler on the event loop is waited for there first (its answers need the loop to run).
  if (onLoop) await queue.drainEventLoop();
  const close = queue.close();
  await queue.handlerClosed;
  send({ kind: 'done', qid: data.qid, served: served || queue.served, close, error });
  // A target's sockets or timers left open would keep this thread's event loop, and so the
  // thread, alive: the server waits for it to exit before it unmaps the buffers.
  if (onLoop) setTimeout(() => process.exit(0), 1000).unref();
}
