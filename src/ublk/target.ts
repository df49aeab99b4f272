/**
 * The target interface: what a block device implementation (null, loop, mem, ...) provides.
 *
 * A target is a module whose default export is a {@link TargetDefinition}. It is loaded twice:
 * on the main thread, where `prepare` turns options into the device's shape (size, block sizes,
 * limits), and in each queue's worker thread, where `openQueue` returns the handler that serves
 * that queue's requests. Options therefore travel as JSON between the two.
 *
 * A handler is ring-native: `handle` runs on the queue's thread between two io_uring_enter
 * calls and must not block. It either returns the result at once (null) or issues its own SQEs
 * on the queue's ring (`ctx.getSqe`, then `ctx.track`) and calls `ctx.complete` from the CQE
 * callback (loop). Targets written as plain async functions use {@link AsyncTarget} instead
 * (see async-main-thread.ts), which runs them on an event loop.
 *
 * The queue keeps a request's memory safe for the target: every SQE taken while a request is
 * being served (in `handle`, or in the CQE callback of one of its SQEs) belongs to that request,
 * and the request is answered to the kernel only after all of them completed, even if the target
 * completes it earlier. A handler or callback that throws fails its request with EIO (once its
 * SQEs are done); SQEs it took but never tracked become NOPs. A result that makes no sense (0
 * bytes for a READ or WRITE, more bytes than asked, a negative number that is not an errno)
 * becomes EIO, with a line in the server's log.
 */
import type { IoUring } from '../uring/index.js';

/**
 * One block request, as the kernel described it in the queue's descriptor array. Valid until the
 * target completes it: the queue reuses the object for the tag's next request, so copy out
 * anything needed later.
 *
 * Where the request's data is depends on the device's data path (modes.ts): in a buffer of ours
 * the kernel copies into (copy, get_data), in the kernel only, moved by pread/pwrite of the char
 * device (user_copy), or in the kernel only, reachable by io_uring fixed-buffer SQEs (zero copy,
 * auto_zc). A target does not need to know which: it moves data through {@link QueueContext}'s
 * prepReadInto / prepWriteFrom (SQEs between a file and the request), copyToRequest /
 * copyFromRequest (its own memory), or, simplest and slowest in the copy-free modes, `buffer`.
 */
export interface IoRequest {
  /** The tag: index of this request's slot in the queue (0 .. depth-1). */
  readonly tag: number;
  /** UBLK_IO_OP_* (READ 0, WRITE 1, FLUSH 2, DISCARD 3, WRITE_ZEROES 5, ...). */
  readonly op: number;
  /** UBLK_IO_F_* bits as in the descriptor (FUA 1<<13, NOUNMAP 1<<15, ...). */
  readonly flags: number;
  /** Byte offset on the device (start_sector * 512). */
  readonly offset: number;
  /** Byte length (nr_sectors * 512). */
  readonly length: number;
  /**
   * The request's data as `length` bytes of memory we mmapped: holds a WRITE's data, receives a
   * READ's. In copy mode it is the tag's buffer the kernel copies to and from, at no extra cost.
   * In the modes where the kernel copies nothing, the first use stages the data through that
   * buffer: a WRITE's data is read in at once (pread of the char device), a READ's is written out
   * when the request completes; a target that moves its data with the context's functions
   * instead never pays for that. Valid until the request is completed.
   */
  readonly buffer: Buffer;
}

/** What a queue handler can use besides the request. */
export interface QueueContext {
  /** The queue's ring (shared with the ublk commands; do not close it). */
  readonly ring: IoUring;
  readonly qid: number;
  readonly depth: number;
  /**
   * Sets the user_data of the SQE at word `w` (from {@link getSqe}, already prepared: prep
   * functions clear user_data) so that its CQE calls `onCqe`. Every SQE a target puts on the
   * ring must go through this: the queue tells ublk commands from target I/O by user_data, and
   * counts the SQE against the request being served.
   */
  track(w: number, onCqe: (res: number, flags: number) => void): void;
  /**
   * track() for a request's last SQE, when its success means the request is done: a CQE with
   * result `expect` completes the request with `result` (no callback); any other result calls
   * `onCqe`, and the request is still the target's (resubmit the rest of a short transfer, or
   * complete it). The queue links the request's COMMIT_AND_FETCH behind the SQE where it can,
   * so the kernel answers the request as soon as the SQE succeeds: one io_uring_enter per
   * request instead of two, and no trip through the queue thread in between. The SQE must not
   * be one io_uring may hand to an io-wq worker: give reads and writes RWF_NOWAIT and resubmit
   * on EAGAIN with track() (see UblkQueue.trackAndCommit and the loop target).
   */
  trackAndCommit(w: number, expect: number, result: number, onCqe: (res: number, flags: number) => void): void;
  /**
   * track() for an SQE of the target's own that belongs to no request and must not keep a
   * stopped device's queue alive: a network target's receive on its socket, a reconnect timer.
   * Its memory must stay valid until its CQE, which comes when it completes or, when the queue
   * closes, when the queue cancels it (the callback is then not run). A request answered from
   * such a callback (with {@link complete}) is the target's to keep safe: nothing else of the
   * request may be in flight when it does.
   */
  trackBackground(w: number, onCqe: (res: number, flags: number) => void): void;
  /** Completes request `tag` with `result` (bytes, 0, or -errno); for results not returned by handle. */
  complete(tag: number, result: number): void;
  /**
   * Prepares SQE `w` (from {@link getSqe}) to read `len` bytes of file `fd` at `fileOffset` into
   * request `tag`'s data at byte `at`: "read these bytes of my backing into the request", for a
   * READ. The engine picks the SQE the data path needs: IORING_OP_READ into the tag's buffer
   * (copy modes, and user copy, which then writes the buffer out at completion) or
   * IORING_OP_READ_FIXED on the request's own pages, registered as a fixed buffer (zero copy).
   * Sets no SQE flags: add IOSQE_FIXED_FILE (when `fd` is a registerFile index), rw flags, and
   * track it as any other SQE.
   */
  prepReadInto(w: number, tag: number, fd: number, fileOffset: number, at: number, len: number): void;
  /**
   * Prepares SQE `w` to write request `tag`'s data, `len` bytes from byte `at`, to file `fd` at
   * `fileOffset`: "write the request's bytes to my backing", for a WRITE. IORING_OP_WRITE from
   * the tag's buffer (user copy reads the data in first) or IORING_OP_WRITE_FIXED (zero copy).
   * Throws a SysError if the data could not be staged (the request then fails).
   */
  prepWriteFrom(w: number, tag: number, fd: number, fileOffset: number, at: number, len: number): void;
  /**
   * "Here is the data": copies `src` into request `tag`'s data at byte `at`, for a READ whose
   * bytes the target has in memory (mem) or computes. One memcpy in copy mode, one pwrite of the
   * char device straight from `src` in the copy-free modes. Returns the bytes copied, or a
   * negative errno to fail the request with.
   */
  copyToRequest(tag: number, src: Buffer, at: number): number;
  /** Copies request `tag`'s data from byte `at` into `dst` (its whole length), for a WRITE; as copyToRequest. */
  copyFromRequest(tag: number, dst: Buffer, at: number): number;
  /**
   * The address of request `tag`'s data in memory of ours, `length` bytes (the memory of
   * `IoRequest.buffer`, staged as it is): for SQEs that take an address themselves, such as the
   * iovecs of a sendmsg that puts a WRITE's data on a socket. Valid until the request is
   * completed; throws a SysError where the data cannot be reached from memory (as `buffer`).
   */
  bufferAddress(tag: number): number;
  /** Fills `len` bytes of request `tag`'s data from byte `at` with zeros (a READ past the end of a backing). */
  zeroRequest(tag: number, at: number, len: number): number;
  /**
   * Registers `fd` in the ring's file table and returns its index: SQEs that set
   * IOSQE_FIXED_FILE and put the index in `fd` skip the per-I/O file lookup and reference
   * count. The queue unregisters everything when it closes; the caller still owns `fd`.
   */
  registerFile(fd: number): number;
  /**
   * A free SQE (word index into `ring.sqes`), handing queued SQEs to the kernel first if the SQ is
   * full. Prepare and {@link track} it before taking the next one (a full SQ submits what is
   * queued, a half-written SQE included). Never take SQEs from `ring.getSqe()` directly.
   */
  getSqe(): number;
}

export interface QueueHandler {
  /** Called once on the queue's thread, after the ring exists and before the first request. */
  start?(ctx: QueueContext): void;
  /**
   * Serves one request. Return the result now (bytes transferred for READ/WRITE, 0 for FLUSH,
   * DISCARD and WRITE_ZEROES, or a negative errno), or `undefined` to complete later with
   * `ctx.complete`.
   */
  handle(req: IoRequest, ctx: QueueContext): number | undefined;
  /** Called after each batch of completions was handled, before the queue enters the kernel again. */
  afterBatch?(ctx: QueueContext): void;
  /** Called when the queue's wake eventfd fired (another thread has news for this queue). */
  onWake?(ctx: QueueContext): void;
  /**
   * The handler may answer requests from the thread's event loop (Promises, timers, sockets), not
   * only from `handle` and CQE callbacks: the queue then waits on the event loop while the
   * handler holds requests, instead of blocking in io_uring_enter (UblkQueue.runOnEventLoop).
   * Async targets are served this way (async-target.ts).
   */
  readonly eventLoop?: boolean;
  /**
   * Called once when the queue shuts down (a Promise is awaited before the thread exits).
   * `drained` says whether every SQE the target put on the ring has completed (they are
   * cancelled first): only then may it free memory those SQEs named. When false, memory the
   * kernel may still write must be left mapped (the process exits soon anyway).
   */
  close?(state?: { drained: boolean }): void | Promise<void>;
}

/** What a queue thread is told about itself when its handler is opened. */
export interface QueueInfo {
  qid: number;
  depth: number;
  /** Memory shared with the main thread for this queue, if the server set some up. */
  shared?: SharedArrayBuffer;
  /** Sends a message to the server on the main thread. */
  post(message: unknown): void;
  /** `DeviceSpec.queueData` from `prepare`, as every queue of the device sees it. */
  device?: unknown;
  /**
   * This queue's slots for the target's `counters` (same order), in memory the server reads:
   * add to them from the queue thread, `UblkServer.counters()` sums them over the queues.
   */
  counters: Float64Array;
  /** A line in the server's log (the queue thread's own stderr would wait for its event loop). */
  log?(line: string): void;
  /**
   * For handlers that answer later (eventLoop): report a request not answered after this many
   * milliseconds in the log (0 or undefined: never). `ublk add --request-timeout MS`.
   */
  requestTimeoutMs?: number;
}

/** The device's shape, decided by the target from its options. */
export interface DeviceSpec {
  sizeBytes: number;
  /** 512 or 4096 (default 512). */
  logicalBlockSize?: number;
  physicalBlockSize?: number;
  readOnly?: boolean;
  rotational?: boolean;
  /** Advertise a volatile write cache, so file systems send FLUSH (and FUA if `fua`). */
  volatileCache?: boolean;
  fua?: boolean;
  /** Advertise DISCARD / WRITE_ZEROES with these limits (bytes). */
  discard?: { granularity: number; maxBytes: number; maxWriteZeroesBytes: number };
  /**
   * The most queues the target can serve, and why (nbd: a server that does not allow several
   * connections; a target whose state lives in one thread). A device asked for more is refused
   * before it exists, with the reason and the `-q` that works.
   */
  queueLimit?: { max: number; reason: string };
  /** Largest request in bytes (default 512 KiB; the I/O buffer of each tag has this size). */
  maxIoBytes?: number;
  /**
   * The target's own description of the device (its backing file, the options that shaped it),
   * shown by `ublk list -v` and in `ublk list --json` as `target.describe`.
   */
  describe?: Record<string, unknown>;
  /**
   * Data every queue's `openQueue` receives as `queue.device` (structured-cloned to the worker
   * threads): resources `prepare` set up once for the whole device, such as an open backing fd
   * or the address of a shared memory region (one address space: the threads can use both).
   */
  queueData?: unknown;
  /**
   * Releases what `prepare` set up. The server calls it exactly once, after every queue has
   * finished (or when creating the device failed), so no queue can still be using it.
   */
  release?(): void;
}

export interface TargetDefinition<Options = Record<string, unknown>, Spec extends DeviceSpec | Promise<DeviceSpec> = DeviceSpec | Promise<DeviceSpec>> {
  /** The `-t` name. */
  readonly name: string;
  /** Help text for `ublk help -t NAME`: the target's own options. */
  readonly usage: string;
  /** Parses the target's own command-line options (after the common ones were taken out). */
  parseArgs(argv: string[]): Options;
  /** Names of the target's counters (see `QueueInfo.counters`), e.g. `['fdatasync']`. */
  readonly counters?: readonly string[];
  /**
   * Main thread: validates options (throwing errors that name the fix) and shapes the device.
   * May be async (a network target asks its server what the device is).
   */
  prepare(options: Options): Spec;
  /** Queue thread: the handler for queue `qid`. */
  openQueue(options: Options, queue: QueueInfo): QueueHandler;
  /**
   * For a device with user recovery (`ublk add -r 1`), whose data must outlive the server that
   * serves it: returns the options every server of the device is given, the first one and each
   * one that recovers it after a crash (they are saved in the run directory). A target that keeps
   * data in the server's own memory names memory that outlives the process here (mem: a file in
   * /dev/shm, which `prepare` creates the first time and maps again on recovery). `name` is
   * unique to the device. No side effects: `prepare` makes what the options name.
   */
  persist?(options: Options, name: string): Options;
  /**
   * `ublk update_size`: the live device is about to become `sizeBytes` large. Throws a
   * TargetError if the target cannot serve that (loop: its backing file has not grown that far);
   * returns the options a recovering server should be given for the new size. A target without
   * it cannot change size.
   */
  resize?(options: Options, sizeBytes: number): Options;
  /**
   * The device is deleted for good: frees what {@link persist}'s options named. Called after
   * DEL_DEV (or when creating the device failed), possibly by another process than the one that
   * served it (`ublk del` of a device whose server is gone); calling it twice is harmless.
   */
  destroy?(options: Options): void;
}

/**
 * A target cannot serve what it was asked to (a missing backing file, a size that does not fit):
 * thrown by `prepare` with a message that names the fix. The CLI prints it and exits with 1.
 */
export class TargetError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TargetError';
  }
}

/** Identity helper that gives `defineTarget({...})` its types. */
export function defineTarget<O, S extends DeviceSpec | Promise<DeviceSpec> = DeviceSpec>(def: TargetDefinition<O, S>): TargetDefinition<O, S> {
  return def;
}
