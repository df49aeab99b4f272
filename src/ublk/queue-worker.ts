/**
 * Entry point of a queue's worker thread: loads the target module, opens the queue and serves it
 * (src/ublk/queue.ts) in a loop that blocks in io_uring_enter. Talks to the server (server.ts)
 * with three messages: `fetched` (every tag armed: START_DEV may go), `done` (the device stopped
 * and everything is released) and `error`.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { Queue, type QueueOptions } from './queue.js';
import type { TargetDefinition } from './target.js';

/** The queue's own settings (as in QueueOptions), plus what the worker needs to build the rest. */
export interface QueueWorkerData extends Pick<QueueOptions, 'devId' | 'charFd' | 'qid' | 'depth' | 'maxIoBufBytes' | 'flags'> {
  targetUrl: string;
  targetOptions: unknown;
  wakeFd: number;
  /** Int32Array over it: [0] = 1 asks the queue to stop at the next wake-up. */
  control: SharedArrayBuffer;
  /** Per-queue memory shared with the main thread (async targets' completion ring). */
  shared?: SharedArrayBuffer;
  /** DeviceSpec.queueData from the target's prepare. */
  device?: unknown;
  /** Float64 slots for the target's counters, read by the server. */
  counters: SharedArrayBuffer;
}

const data = workerData as QueueWorkerData;
const port = parentPort!;
try {
  const mod = (await import(data.targetUrl)) as { default: TargetDefinition<unknown> };
  const handler = mod.default.openQueue(data.targetOptions, {
    qid: data.qid,
    depth: data.depth,
    shared: data.shared,
    device: data.device,
    counters: new Float64Array(data.counters),
    post: (m) => port.postMessage({ kind: 'target', qid: data.qid, message: m }),
  });
  const control = new Int32Array(data.control);
  const q = new Queue({
    devId: data.devId,
    charFd: data.charFd,
    qid: data.qid,
    depth: data.depth,
    maxIoBufBytes: data.maxIoBufBytes,
    flags: data.flags,
    handler,
    wakeFd: data.wakeFd,
    onFetched: () => port.postMessage({ kind: 'fetched', qid: data.qid, bufBase: q.bufferBase, bufSize: data.maxIoBufBytes }),
    onWake: () => Atomics.load(control, 0) === 1,
  });
  let served = 0;
  try {
    served = q.run();
  } finally {
    q.close();
  }
  port.postMessage({ kind: 'done', qid: data.qid, served });
} catch (e) {
  port.postMessage({ kind: 'error', qid: data.qid, message: (e as Error).message, stack: (e as Error).stack });
}
