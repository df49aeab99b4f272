/**
 * What the server and a queue thread (queue-thread.ts) say to each other: the thread's start-up
 * data, the messages it posts, and the bits of its control word. A module of its own, so that
 * the server imports these without importing the thread's entry module (which runs on import).
 */
import type { QueueCloseReport, UblkQueueOptions } from './queue.js';

/** What the server hands a queue thread (structured-cloned as workerData). */
export interface QueueThreadData extends Pick<UblkQueueOptions, 'charFd' | 'qid' | 'depth' | 'maxIoBytes' | 'drainTimeoutMs' | 'spinUs' | 'dataHome' | 'bufferRegistration' | 'memoryCopy' | 'batch' | 'forceRegFallback' | 'tagStride' | 'tagOffset' | 'sharedRegions'> {
  /** The module whose default export is the TargetDefinition (the thread imports it itself). */
  targetUrl: string;
  targetOptions: unknown;
  wakeFd: number;
  /** Int32Array over it: [0] holds CONTROL_* bits, read at each wake-up. */
  control: SharedArrayBuffer;
  /** Per-queue memory shared with the main thread (an async target's completion ring). */
  shared?: SharedArrayBuffer;
  /** DeviceSpec.queueData from the target's prepare. */
  device?: unknown;
  /** Float64 slots for the target's counters, read by the server. */
  counters: SharedArrayBuffer;
  /** QueueInfo.requestTimeoutMs: report requests a handler on the event loop holds longer. */
  requestTimeoutMs?: number;
  /** UblkQueueOptions.trace, with the generation word as shared memory. */
  trace?: { stderr: boolean; word?: SharedArrayBuffer; fifo?: string };
}

/** Control word bits: stop serving (the queue closes); fail every request the target holds (UblkQueue.failHeld). */
export const CONTROL_STOP = 1;
export const CONTROL_FAIL_HELD = 2;

/** Every message a queue thread sends to the server, in the order they can come. */
export type QueueMessage =
  /** Every tag has its FETCH in the kernel: START_DEV may go. Where the tag buffers are, for an async target. */
  | { kind: 'fetched'; qid: number; bufBase: number; maxIoBytes: number }
  /**
   * A line for the server's log. A worker's own process.stderr only hands a line on when the
   * thread's event loop runs, and a queue thread blocks in io_uring_enter: all but the first
   * line would wait until the queue stops. The server's thread writes it at once.
   */
  | { kind: 'log'; qid: number; line: string }
  /** A message of the target's own (QueueInfo.post): an async target's batch of requests. */
  | { kind: 'target'; qid: number; message: unknown }
  /** The queue stopped and released everything it could (see QueueCloseReport); the thread ends next. */
  | { kind: 'done'; qid: number; served: number; close: QueueCloseReport; error?: string }
  /** The queue could not start (before 'fetched'): nothing is left to release. */
  | { kind: 'error'; qid: number; message: string; stack?: string };

