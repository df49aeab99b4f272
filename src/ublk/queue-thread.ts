/**
 * Entry point of a queue's worker thread: loads the target module, opens the queue and serves it
 * (queue.ts) in a loop that blocks in io_uring_enter. It talks to the server (server.ts) only
 * through the {@link QueueMessage}s below, and the server to it only through the wake eventfd
 * and a stop word in shared memory.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { UblkQueue, type QueueCloseReport, type UblkQueueOptions } from './queue.js';
import type { TargetDefinition } from './target.js';

/** What the server hands a queue thread (structured-cloned as workerData). */
export interface QueueThreadData extends Pick<UblkQueueOptions, 'charFd' | 'qid' | 'depth' | 'maxIoBytes' | 'drainTimeoutMs'> {
  /** The module whose default export is the TargetDefinition (the thread imports it itself). */
  targetUrl: string;
  targetOptions: unknown;
  wakeFd: number;
  /** Int32Array over it: [0] = 1 asks the queue to stop at the next wake-up. */
  control: SharedArrayBuffer;
  /** Per-queue memory shared with the main thread (an async target's completion ring). */
  shared?: SharedArrayBuffer;
  /** DeviceSpec.queueData from the target's prepare. */
  device?: unknown;
  /** Float64 slots for the target's counters, read by the server. */
  counters: SharedArrayBuffer;
}

/** Every message a queue thread sends to the server, in the order they can come. */
export type QueueMessage =
  /** Every tag has its FETCH in the kernel: START_DEV may go. Where the tag buffers are, for an async target. */
  | { kind: 'fetched'; qid: number; bufBase: number; maxIoBytes: number }
  /** A message of the target's own (QueueInfo.post): an async target's batch of requests. */
  | { kind: 'target'; qid: number; message: unknown }
  /** The queue stopped and released everything it could (see QueueCloseReport); the thread ends next. */
  | { kind: 'done'; qid: number; served: number; close: QueueCloseReport; error?: string }
  /** The queue could not start (before 'fetched'): nothing is left to release. */
  | { kind: 'error'; qid: number; message: string; stack?: string };

const data = workerData as QueueThreadData;
const port = parentPort!;
const send = (m: QueueMessage) => port.postMessage(m);

let queue: UblkQueue | undefined;
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
    handler,
    wakeFd: data.wakeFd,
    onFetched: () => send({ kind: 'fetched', qid: data.qid, bufBase: queue!.bufferBase, maxIoBytes: data.maxIoBytes }),
    onWake: () => Atomics.load(control, 0) === 1,
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
