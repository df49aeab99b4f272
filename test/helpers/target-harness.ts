/**
 * Runs a target's queue handler on the host, without ublk: a real io_uring, real I/O buffers in
 * mapped memory, and requests we make up. It plays the part of src/ublk/queue.ts (the
 * QueueContext a handler sees) so the target's request logic can be tested where no ublk_drv
 * exists, down to exact results, counters and SQE fields.
 *
 * Request data moves as the queue moves it (request-data.ts): in copy mode through the tag
 * buffers, and in user-copy mode through pread/pwrite of a file that stands in for the char
 * device, at the same user-copy positions (a sparse file: the kernel's side of each request is
 * the bytes at the tag's position, see requestBytes).
 */
import { IoUring, Mapping, prepCancel2, setUserData2, registerFiles, updateFiles, sys } from '../../src/uring/index.js';
import type { IoRequest, QueueContext, QueueHandler, TargetDefinition } from '../../src/ublk/target.js';
import { DataHome, RequestData } from '../../src/ublk/request-data.js';
import { userCopyOffset } from '../../src/ublk/abi.js';

/** user_data of the harness's own cancel SQEs. */
const CANCEL_SLOT = 0xffffffff;

export interface HarnessOptions {
  depth?: number;
  /** Bytes per tag buffer (the device's largest request). */
  maxIoBytes?: number;
  /** User-copy mode: this fd (a regular file) plays the char device. Default: copy mode. */
  userCopyFd?: number;
}

export class TargetHarness implements QueueContext {
  readonly ring: IoUring;
  readonly qid = 0;
  readonly depth: number;
  readonly bufs: Mapping;
  readonly maxIoBytes: number;
  readonly counters: Float64Array;
  readonly handler: QueueHandler;
  readonly data: RequestData;
  private readonly userCopyFd: number | undefined;
  /** Results by tag, as the handler completed them. */
  readonly results = new Map<number, number>();
  /** Every SQE the handler tracked, copied as 16 words before submission. */
  readonly sqes: Uint32Array[] = [];
  /** The CQE result of each of those SQEs, in the same order (undefined until it completed). */
  readonly sqeResults: Array<number | undefined> = [];
  /** When set, called with each tracked SQE's words before it is submitted (to alter it). */
  tamper: ((s: Uint32Array, w: number) => void) | undefined;
  private readonly callbacks: Array<((res: number, flags: number) => void) | undefined> = [];
  /** Per callback slot: the request it belongs to. */
  private readonly slotTag: number[] = [];
  /** The request whose handler or callback runs, -1 outside them (the queue's currentTag). */
  private current = -1;
  /** trackAndCommit()s seen (the queue would link their commit; here they only complete). */
  trackAndCommits = 0;
  private inFlight = 0;
  /** Callback slots of trackBackground SQEs still in flight. */
  private readonly background = new Set<number>();
  private files: number[] = [];

  constructor(def: TargetDefinition<any>, options: unknown, device: unknown, opts: HarnessOptions = {}) {
    this.depth = opts.depth ?? 8;
    this.maxIoBytes = opts.maxIoBytes ?? 1 << 20;
    this.ring = new IoUring(64);
    registerFiles(this.ring, new Array<number>(16).fill(-1));
    this.bufs = Mapping.anonymous(this.depth * this.maxIoBytes);
    this.userCopyFd = opts.userCopyFd;
    this.data = new RequestData({
      home: opts.userCopyFd === undefined ? DataHome.TagBuffer : DataHome.UserCopy,
      charFd: opts.userCopyFd ?? -1, qid: 0, depth: this.depth, bufs: this.bufs, maxIoBytes: this.maxIoBytes,
      userCopy: false, report: (line) => { throw new Error(line); },
    });
    this.counters = new Float64Array(Math.max(1, def.counters?.length ?? 0));
    this.handler = def.openQueue(options, { qid: 0, depth: this.depth, post: () => undefined, device, counters: this.counters });
    this.handler.start?.(this);
  }

  registerFile(fd: number): number {
    const slot = this.files.length;
    updateFiles(this.ring, slot, [fd]);
    this.files.push(fd);
    return slot;
  }

  getSqe(): number {
    let w = this.ring.getSqe();
    while (w < 0) {
      this.ring.submit();
      w = this.ring.getSqe();
    }
    return w;
  }

  track(w: number, onCqe: (res: number, flags: number) => void): void {
    const slot = this.callbacks.length;
    this.callbacks.push(onCqe);
    this.slotTag.push(this.current);
    this.inFlight++;
    setUserData2(this.ring.sqes, w, slot, 0);
    this.tamper?.(this.ring.sqes, w);
    this.sqes.push(this.ring.sqes.slice(w, w + 16));
  }

  /** As the queue does it: a request-less SQE that does not count for drain(); see runUntil. */
  trackBackground(w: number, onCqe: (res: number, flags: number) => void): void {
    const slot = this.callbacks.length;
    this.callbacks.push(onCqe);
    this.slotTag.push(-1);
    this.inFlight++;
    this.background.add(slot);
    setUserData2(this.ring.sqes, w, slot, 0);
    this.sqes.push(this.ring.sqes.slice(w, w + 16));
  }

  /** As the queue does it, without the link: a CQE of exactly `expect` completes the request with `result`. */
  trackAndCommit(w: number, expect: number, result: number, onCqe: (res: number, flags: number) => void): void {
    const tag = this.current;
    if (tag < 0) throw new Error('trackAndCommit outside a request');
    this.trackAndCommits++;
    this.track(w, (res, flags) => (res === expect ? this.complete(tag, result) : onCqe(res, flags)));
  }

  complete(tag: number, result: number): void {
    if (this.results.has(tag)) throw new Error(`tag ${tag} completed twice`);
    // As the queue's commit does: a READ staged in the tag buffer goes to the "kernel" first.
    this.results.set(tag, this.data.finish(tag, result));
  }

  prepReadInto(w: number, tag: number, fd: number, fileOffset: number, at: number, len: number): void {
    this.data.prepReadInto(this.ring.sqes, w, tag, fd, fileOffset, at, len);
  }

  prepWriteFrom(w: number, tag: number, fd: number, fileOffset: number, at: number, len: number): void {
    this.data.prepWriteFrom(this.ring.sqes, w, tag, fd, fileOffset, at, len);
  }

  copyToRequest(tag: number, src: Buffer, at: number): number {
    return this.data.copyToRequest(tag, src, at);
  }

  copyFromRequest(tag: number, dst: Buffer, at: number): number {
    return this.data.copyFromRequest(tag, dst, at);
  }

  zeroRequest(tag: number, at: number, len: number): number {
    return this.data.zeroRequest(tag, at, len);
  }

  bufferAddress(tag: number): number {
    return this.data.bufferAddress(tag);
  }

  /**
   * The request's data as the kernel sees it: tag `tag`'s I/O buffer in copy mode; in user-copy
   * mode a copy of the bytes at the tag's position in the stand-in file (write to it with
   * setRequestBytes).
   */
  buffer(tag: number, length = this.maxIoBytes): Buffer {
    if (this.userCopyFd === undefined) return this.bufs.bytes(tag * this.maxIoBytes, length);
    const b = Buffer.alloc(length);
    sys.preadInto(this.userCopyFd, b, userCopyOffset(0, tag));
    return b;
  }

  /** Puts `data` where the kernel keeps request `tag`'s data (for a WRITE's data before submit). */
  setRequestBytes(tag: number, data: Buffer): void {
    if (this.userCopyFd === undefined) data.copy(this.bufs.bytes(tag * this.maxIoBytes, data.length));
    else sys.pwriteFrom(this.userCopyFd, data, userCopyOffset(0, tag));
  }

  /** Makes a request for `tag` and hands it to the handler. */
  submit(tag: number, op: number, offset: number, length: number, flags = 0): void {
    const data = this.data;
    this.data.begin(tag, op, length);
    const req: IoRequest = {
      tag, op, flags, offset, length,
      get buffer() { return data.buffer(tag); },
    };
    this.results.delete(tag);
    this.current = tag;
    let r: number | undefined;
    try {
      r = this.handler.handle(req, this);
    } finally {
      this.current = -1;
    }
    if (r !== undefined) this.complete(tag, r);
    this.handler.afterBatch?.(this);
  }

  /** Runs the ring until every tracked SQE has completed (background ones aside). */
  drain(): void {
    this.runUntil(() => this.inFlight === this.background.size);
  }

  /** Runs the ring for `ms` milliseconds (completions are handled as they come). */
  runFor(ms: number): void {
    const end = Date.now() + ms;
    this.runUntil(() => Date.now() >= end, ms + 1000);
  }

  /**
   * Runs the ring until `done()` holds (checked before each wait), for at most `timeoutMs`:
   * for targets that complete requests from background SQEs (a socket's receive).
   */
  runUntil(done: () => boolean, timeoutMs = 10_000): void {
    const until = Date.now() + timeoutMs;
    while (!done()) {
      if (Date.now() > until) throw new Error(`runUntil: not done after ${timeoutMs} ms`);
      if (!this.ring.submitAndWaitTimeout(1, 100)) continue;
      const ready = this.ring.cqReady();
      const cq = this.ring.cq;
      for (let i = 0; i < ready; i++) {
        const c = this.ring.cqeAt(i);
        const slot = cq[c]!;
        if (slot === CANCEL_SLOT) continue;
        const res = cq[c + 2]! | 0;
        const flags = cq[c + 3]!;
        const cb = this.callbacks[slot]!;
        this.callbacks[slot] = undefined;
        this.inFlight--;
        this.background.delete(slot);
        this.sqeResults[slot] = res;
        this.current = this.slotTag[slot]!;
        try {
          cb(res, flags);
        } finally {
          this.current = -1;
        }
      }
      this.ring.cqAdvance(ready);
      this.handler.afterBatch?.(this);
    }
  }

  /** submit + drain; returns the request's result. */
  run(tag: number, op: number, offset: number, length: number, flags = 0): number {
    this.submit(tag, op, offset, length, flags);
    this.drain();
    const r = this.results.get(tag);
    if (r === undefined) throw new Error(`tag ${tag} was never completed`);
    return r;
  }

  close(): void {
    // As the queue does: background SQEs (a socket's receive) are cancelled and reaped before
    // their memory can go; their callbacks are not run.
    if (this.background.size > 0) {
      for (const slot of this.background) {
        const w = this.getSqe();
        prepCancel2(this.ring.sqes, w, slot, 0, 0);
        setUserData2(this.ring.sqes, w, CANCEL_SLOT, 0);
      }
      for (const slot of this.background) this.callbacks[slot] = () => undefined;
      this.runUntil(() => this.background.size === 0);
    }
    this.handler.close?.();
    this.ring.close();
    this.bufs.unmap();
  }
}
