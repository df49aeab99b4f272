/**
 * One ublk hardware queue, served by the thread that calls {@link UblkQueue.run} (a worker thread
 * per queue, see queue-thread.ts). The protocol, as `drivers/block/ublk_drv.c` wants it:
 *
 * 1. Open `/dev/ublkcN` and mmap this queue's descriptor array read-only: one 24-byte
 *    `struct ublksrv_io_desc` per tag, at offset qid * round_up(4096 * 24, PAGE_SIZE). The
 *    stride uses the maximum depth (UBLK_MAX_QUEUE_DEPTH) and the machine's real page size, not
 *    the device's depth: getting either wrong is the classic multi-queue corruption bug.
 * 2. For every tag, a URING_CMD UBLK_U_IO_FETCH_REQ carrying `struct ublksrv_io_cmd` {q_id,
 *    tag, result, addr = this tag's I/O buffer}. The kernel completes it when a request for that
 *    tag arrives; START_DEV (on the main thread) waits until all of them are in.
 * 3. A completed FETCH means "request pending": read the descriptor, serve it, and answer with
 *    UBLK_U_IO_COMMIT_AND_FETCH_REQ {result}, which both completes the request and re-arms the
 *    tag. Many commits and target I/Os go in one io_uring_enter.
 * 4. A command completing with UBLK_IO_RES_ABORT (-ENODEV) means the device is stopping (STOP_DEV,
 *    or the disk went away): that tag is finished. When every tag is finished and no target I/O
 *    is in flight, run() returns.
 * 5. close() then makes sure nothing the kernel may still write to is freed (see close()).
 *
 * Commands for a tag must come from the task that fetched it (the kernel checks; per queue
 * before 6.16's PER_IO_DAEMON), which is why one thread owns the whole queue.
 *
 * The target's SQEs. A handler issues its own SQEs (ctx.getSqe, ctx.track). Every SQE issued
 * while a request is being served (in `handle`, or in the CQE callback of one of that request's
 * SQEs) belongs to that request, and the request is committed only when all of them have
 * completed: its buffer is the memory they read and write, and the tag's next request reuses
 * it. So a handler that throws with an SQE in flight gets its request failed (EIO) when that SQE
 * completes, never before, and a late CQE can never act on the tag's next request.
 *
 * Data path modes (modes.ts names them). In the default copy mode the kernel copies WRITE data
 * into our buffer before the FETCH completes, and copies READ data out of it at COMMIT. Served
 * here as well:
 *   - NEED_GET_DATA (UBLK_F_NEED_GET_DATA): a FETCH completes with UBLK_IO_RES_NEED_GET_DATA for a
 *     WRITE; the queue answers with UBLK_U_IO_NEED_GET_DATA {addr} to get the data copied
 *     ([NEED_GET_DATA]).
 *   - USER_COPY (UBLK_F_USER_COPY, 6.5): no addr in the commands; the queue preads a WRITE's data
 *     into the tag's buffer before dispatch and pwrites a READ's before commit, on the char
 *     device at userCopyOffset(qid, tag, off) (copyRequestData).
 * Still to come, at the marked places:
 *   - Zero copy (SUPPORT_ZERO_COPY 6.15, AUTO_BUF_REG 6.16): the request's pages are registered as
 *     a fixed buffer (REGISTER_IO_BUF, or automatically into sqe->addr's index), and target
 *     SQEs use READ_FIXED/WRITE_FIXED with that index ([BUFFER], [COMMIT]).
 *   - BATCH_IO (7.0): PREP/COMMIT/FETCH_IO_CMDS move many tags per command ([FETCH], [COMMIT]).
 *   - PER_IO_DAEMON (6.16): tags may be served by different threads ([THREADING]).
 */
import {
  IoUring, addFlags, prepCancel2, prepNop, prepPollMultishot, registerFiles, setUserData2, updateFiles, abi as uringAbi,
} from '../uring/index.js';
import { Mapping, PAGE_SIZE, SysError, libc, sys } from '../libc/index.js';
import {
  UBLK_U_IO_FETCH_REQ, UBLK_U_IO_COMMIT_AND_FETCH_REQ, UBLK_U_IO_NEED_GET_DATA, UBLK_IO_RES_OK,
  UBLK_IO_RES_NEED_GET_DATA, UBLK_IO_RES_ABORT, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_NAMES,
  descOffset, descLength, userCopyOffset,
} from './abi.js';
import { prepIoCmd, readIoDesc, SECTOR_SIZE, type IoDesc } from './wire.js';
import type { IoRequest, QueueContext, QueueHandler } from './target.js';

/**
 * user_data high word: what a CQE belongs to; the low word is the tag or the callback slot.
 * None is 0, so an SQE a target prepared but never tracked (prep functions clear user_data)
 * cannot pass for one of ours.
 */
const KIND_CMD = 1; // a ublk FETCH/COMMIT_AND_FETCH/NEED_GET_DATA for tag = lo
const KIND_TARGET = 2; // a target SQE, callback slot = lo
const KIND_WAKE = 3; // the wake eventfd's multishot poll
const KIND_CANCEL = 4; // an ASYNC_CANCEL issued by close()
const KIND_IGNORE = 5; // an SQE we turned into a NOP (prepared by a handler that then threw)

/** Size of the ring's registered file table: slot 0 is /dev/ublkcN, the rest are the target's. */
const FILE_SLOTS = 16;
/** The char device's slot in that table. */
const CHAR_DEV_SLOT = 0;

/** How many problems of one kind a queue reports before it only counts them. */
const LOG_LIMIT = 10;

export interface UblkQueueOptions {
  /**
   * The open `/dev/ublkcN`. The driver allows one open at a time (a second open is EBUSY), so
   * the server opens it once and every queue thread uses the same descriptor; it is closed
   * after the last queue is done, before DEL_DEV.
   */
  charFd: number;
  qid: number;
  depth: number;
  /** Bytes per tag buffer: the device's max_io_buf_bytes. */
  maxIoBytes: number;
  handler: QueueHandler;
  /**
   * An eventfd the owner writes to wake this queue out of io_uring_enter (to stop it, or to
   * deliver async completions): polled with a multishot POLL_ADD on the queue's ring.
   */
  wakeFd?: number;
  /**
   * Low-latency mode (default 0: off). Before sleeping in io_uring_enter for the next request,
   * the queue spins up to this many microseconds watching the CQ tail and the SQ's TASKRUN flag:
   * a request then reaches a thread that is already running, and costs no sleep and wake-up
   * (the scheduler round trip that dominates a QD 1 request). The price is the CPU it spins on,
   * and a second io_uring_enter per wait (one to submit the commits before spinning, one to run
   * the task work that carries the request).
   */
  spinUs?: number;
  /**
   * The device runs with UBLK_F_USER_COPY (6.5): the kernel copies no data. A WRITE's data is
   * read into the tag's buffer with pread(2) on the char device before the target sees the
   * request, and a READ's data is written from it with pwrite(2) before the commit, at the tag's
   * user-copy position (userCopyOffset). Targets see the same buffer as in copy mode.
   */
  userCopy?: boolean;
  /** Called when every tag has its FETCH outstanding (the owner may then START_DEV). */
  onFetched?: () => void;
  /** Called after each wake-up; returns true to stop the queue (it may call failHeld() first). */
  onWake?: () => boolean;
  /**
   * How long close() waits for the target's I/O to finish (default 10 s). What has not finished
   * by then keeps its memory mapped until the process exits.
   */
  drainTimeoutMs?: number;
  /** Where the queue reports problems (default: stderr, one line each). */
  log?: (line: string) => void;
}

/**
 * What close() could prove about the memory the kernel may still use, and where the tag buffers
 * are: close() does not unmap them, because ublk_drv copies a WRITE's data into them from task
 * work that runs in this thread, and such work queued before the ring was closed can still run
 * at this thread's next return to user space (ublk checks only that it runs in the thread that
 * fetched the tag). Once the thread has exited nothing can, and the owner unmaps them then,
 * with {@link releaseQueueBuffers}.
 */
export interface QueueCloseReport {
  /** Every target SQE that named the buffers completed: they may be unmapped once the thread exited. */
  drained: boolean;
  /** Target SQEs still in flight when close() gave up waiting (0 if drained). */
  inFlight: number;
  /** Requests an outside party (an async target) still held when close() gave up waiting. */
  held: number;
  /**
   * Requests answered ahead (trackAndCommit) whose linked target SQE gave no sign of finishing:
   * on success neither it nor the command behind it posts a CQE until the tag's next request or
   * the device's abort, so a queue stopped while the device lives on (leave, hand-over) cannot
   * know. Their buffers stay mapped until the process exits (drained is false), with no log line:
   * this is the normal state of an idle tag, not a stuck one.
   */
  unresolvedLinks: number;
  /** The tag buffers: their address and length. */
  bufBase: number;
  bufBytes: number;
}

/**
 * Unmaps a closed queue's tag buffers, if its report says nothing can still write them. Call it
 * only after the queue's thread has exited (see QueueCloseReport); a report that is not drained
 * leaves them mapped until the process exits, so no later mapping can receive a late write.
 * Returns whether it unmapped them.
 */
export function releaseQueueBuffers(report: QueueCloseReport): boolean {
  if (!report.drained || report.bufBytes === 0) return false;
  sys.munmap(report.bufBase, report.bufBytes);
  return true;
}

/**
 * The IoRequest of one tag, made on its first request and refilled for every later one: a busy
 * queue serves tens of thousands of requests a second, and a fresh object plus a Buffer view per
 * request kept V8's garbage collector running. The target may use it until it completes the
 * request (target.ts says so); the sized Buffer view is made only when a target asks for it.
 */
class TagRequest implements IoRequest {
  op = 0;
  flags = 0;
  offset = 0;
  length = 0;
  private sized: Buffer | undefined;
  private whole: Buffer | undefined;

  constructor(readonly tag: number, readonly address: number, private readonly bufs: Mapping, private readonly maxIoBytes: number) {}

  get buffer(): Buffer {
    this.whole ??= this.bufs.bytes(this.tag * this.maxIoBytes, this.maxIoBytes);
    const n = Math.min(this.length, this.whole.length);
    if (this.sized?.length !== n) this.sized = this.whole.subarray(0, n);
    return this.sized;
  }

  /** "READ 4096 bytes at 1048576", for messages. */
  describe(): string {
    return `${UBLK_IO_OP_NAMES[this.op] ?? `op ${this.op}`} of ${this.length} bytes at ${this.offset}`;
  }
}

const enum TagState {
  /** FETCH or COMMIT_AND_FETCH outstanding in the kernel. */
  InKernel,
  /** A request is being served by the target. */
  Serving,
  /** Finished: aborted (the device is going away), or given up while the queue closes. */
  Done,
  /**
   * Answered ahead: its COMMIT_AND_FETCH is in the kernel, linked behind the target's last SQE
   * (trackAndCommit). Becomes InKernel when a CQE for the command shows the SQE succeeded, or
   * Serving again when the SQE's own CQE shows it did not (the kernel then dropped the command).
   */
  Committing,
}

/** How a target SQE's CQE is handled (per callback slot). */
const enum SlotMode {
  /** track(): the callback gets every CQE. */
  Plain,
  /** trackAndCommit() without a link: a CQE with the expected result completes the request. */
  Commit,
  /** trackAndCommit() with the COMMIT_AND_FETCH linked behind it: a CQE means it failed. */
  Linked,
}

export class UblkQueue implements QueueContext {
  readonly ring: IoUring;
  readonly qid: number;
  readonly depth: number;
  private readonly descs: Mapping;
  private readonly desc32: Uint32Array;
  private readonly desc: IoDesc = { op: 0, flags: 0, nrSectors: 0, startSector: 0, addr: 0 };
  private readonly bufs: Mapping;
  private readonly maxIoBytes: number;
  private readonly handler: QueueHandler;
  private readonly opts: UblkQueueOptions;
  /** UBLK_F_USER_COPY: the queue moves request data itself (copyRequestData). */
  private readonly userCopy: boolean;
  private readonly log: (line: string) => void;

  // Per tag.
  private readonly state: Uint8Array;
  /** The request's target SQEs not yet completed. */
  private readonly inFlight: Uint32Array;
  /** The target threw while serving the request: it fails with EIO once its SQEs are done. */
  private readonly failed: Uint8Array;
  /** The target completed the request while its SQEs were in flight: committed when they finish. */
  private readonly deferred: Uint8Array;
  private readonly deferredResult: Int32Array;
  /** One request object per tag, refilled for each request the tag carries. */
  private readonly requests: TagRequest[] = [];

  private doneTags = 0;
  /** Tags in the Serving state. */
  private serving = 0;

  // Target SQEs: CQE callbacks by slot, the tag each belongs to (-1: none), free slots.
  private readonly callbacks: Array<((res: number, flags: number) => void) | undefined> = [];
  private readonly slotTag: number[] = [];
  private readonly slotMode: SlotMode[] = [];
  /** trackAndCommit: the CQE result that means success, and the request's result then. */
  private readonly slotExpect: number[] = [];
  private readonly slotResult: number[] = [];
  /** Per tag: the callback slot of the SQE its linked COMMIT_AND_FETCH waits behind, or -1. */
  private readonly linkedSlot: Int32Array;
  /** Tags in the Committing state. */
  private committing = 0;
  /** The word index of the last SQE handed out (an SQE can only be linked to the very next one). */
  private lastSqe = -1;
  /** Free callback slots, a stack (typed, so that pushing and popping never allocates). */
  private freeSlots = new Int32Array(64);
  private freeSlotCount = 0;
  private targetInFlight = 0;
  /** The tag whose handler or CQE callback is running, -1 outside of them. */
  private currentTag = -1;
  /**
   * SQEs handed to the running handler or callback by getSqe and not yet tracked: a stack in a
   * typed array, not a JS array emptied with `length = 0`, which frees its backing store and so
   * cost an allocation per target SQE (and the GC work that follows).
   */
  private handedOut = new Int32Array(16);
  private handedOutCount = 0;

  private stopRequested = false;
  /** failHeld() was called: requests are failed instead of served, from now on. */
  private failingAll = false;
  private draining = false;
  private closed = false;
  /** 8 bytes for draining the wake eventfd. */
  private readonly scratch = Mapping.anonymous(8);
  private nextFileSlot = CHAR_DEV_SLOT + 1;
  private readonly problems = new Map<string, number>();

  /** Requests served since start (for stats and tests). */
  served = 0;
  /** Times io_uring_enter said EAGAIN or EBUSY (back-pressure, retried). */
  backPressure = 0;

  constructor(opts: UblkQueueOptions) {
    this.opts = opts;
    this.userCopy = opts.userCopy === true;
    this.qid = opts.qid;
    this.depth = opts.depth;
    this.handler = opts.handler;
    this.maxIoBytes = opts.maxIoBytes;
    this.log = opts.log ?? ((line) => process.stderr.write(`${line}\n`));
    const n = opts.depth;
    this.state = new Uint8Array(n);
    this.inFlight = new Uint32Array(n);
    this.failed = new Uint8Array(n);
    this.deferred = new Uint8Array(n);
    this.deferredResult = new Int32Array(n);
    this.linkedSlot = new Int32Array(n).fill(-1);
    const cleanup: Array<() => void> = [() => this.scratch.unmap()];
    try {
      // The kernel finds the queue from the offset with its own PAGE_SIZE: ours must be the same.
      this.descs = Mapping.file(opts.charFd, descLength(n, PAGE_SIZE), descOffset(opts.qid, PAGE_SIZE), libc.PROT_READ, false);
      cleanup.push(() => this.descs.unmap());
      this.desc32 = this.descs.u32;
      // [BUFFER] copy mode: one buffer per tag, backed as it is touched (NORESERVE: a deep queue
      // of large requests reserves address space, not memory).
      this.bufs = Mapping.anonymous(n * opts.maxIoBytes, { noReserve: true });
      cleanup.push(() => this.bufs.unmap());
      // Room for a command per tag plus target I/O; the CQ gets twice that.
      let entries = 1;
      while (entries < n * 2) entries <<= 1;
      this.ring = openQueueRing(Math.min(entries, 4096));
      cleanup.push(() => this.ring.close());
      // The char device as a fixed file: saves an fget per command (ublksrv does the same). The
      // other slots start empty, for the target's own files (registerFile).
      registerFiles(this.ring, [opts.charFd, ...new Array<number>(FILE_SLOTS - 1).fill(-1)]);
    } catch (e) {
      for (const f of cleanup.reverse()) f();
      throw e;
    }
  }

  /** Address of tag 0's I/O buffer; tag t's is at `bufferBase + t * maxIoBytes`. */
  get bufferBase(): number {
    return this.bufs.address;
  }

  // -------------------------------------------------------------------------------------------
  // QueueContext: what a handler uses
  // -------------------------------------------------------------------------------------------

  /**
   * A free SQE for the target (a word index into `ring.sqes`), handing queued SQEs to the kernel
   * first if the SQ is full. Prepare it and pass it to {@link track} before asking for another.
   */
  getSqe(): number {
    const w = this.nextSqe();
    if (this.currentTag >= 0) {
      if (this.handedOutCount === this.handedOut.length) {
        const grown = new Int32Array(this.handedOut.length * 2);
        grown.set(this.handedOut);
        this.handedOut = grown;
      }
      this.handedOut[this.handedOutCount++] = w;
    }
    return w;
  }

  track(w: number, onCqe: (res: number, flags: number) => void): void {
    const slot = this.takeSlot(w, onCqe, SlotMode.Plain);
    setUserData2(this.ring.sqes, w, slot, KIND_TARGET);
  }

  /**
   * Like track(), for a request's last SQE: if its CQE's result is `expect`, the request is
   * completed with `result` without calling `onCqe`. Where it can, the queue links the tag's
   * COMMIT_AND_FETCH behind the SQE (IOSQE_IO_LINK) and asks for no CQE on success
   * (IOSQE_CQE_SKIP_SUCCESS): the kernel answers the request the moment the SQE succeeds, from
   * its completion, without a trip through this thread, and the whole request costs one
   * io_uring_enter instead of two. A failure or a short transfer posts the SQE's CQE as usual
   * and the kernel drops the command linked behind it without a CQE (req_set_fail: a failed
   * skip-on-success request cancels its links in silence, since 5.17), so `onCqe` then runs as
   * after track() and the request is the target's again: resubmit the rest, or complete it.
   *
   * It links only when the SQE is the request's only one in flight and was the last one taken
   * (a chain is consecutive SQEs, and the commit must wait for all the request's I/O); otherwise,
   * or when the SQ has no room for the command, it behaves the same without the link.
   *
   * The SQE must never go to an io-wq worker (mark reads and writes RWF_NOWAIT and handle
   * EAGAIN): io_uring issues a linked SQE from the worker that ran the one before it, and
   * ublk_drv takes a tag's commands only from the thread that fetched it. 7.3 bounces such a
   * command back to that thread; on 6.12 it was measured to fail with EBUSY and leave the
   * request unanswered (a hung reader).
   */
  trackAndCommit(w: number, expect: number, result: number, onCqe: (res: number, flags: number) => void): void {
    const tag = this.currentTag;
    if (tag < 0) throw new Error(`queue ${this.qid}: trackAndCommit outside a request (use track)`);
    if (w === this.lastSqe && this.inFlight[tag] === 0 && !this.failed[tag] && !this.failingAll && !this.draining
      && this.ring.sqPending > 0 && this.sendsAsIs(tag, result) && !this.copiesOut(tag)) {
      // The command must be the very next SQE (a link joins consecutive SQEs), and w must still
      // be unpublished, or the kernel could already be running it without the link.
      const c = this.ring.getSqe();
      if (c >= 0) {
        const slot = this.takeSlot(w, onCqe, SlotMode.Linked);
        const s = this.ring.sqes;
        addFlags(s, w, uringAbi.IOSQE_IO_LINK | uringAbi.IOSQE_CQE_SKIP_SUCCESS);
        setUserData2(s, w, slot, KIND_TARGET);
        this.lastSqe = c;
        this.linkedSlot[tag] = slot;
        this.commitInto(c, tag, result);
        this.state[tag] = TagState.Committing;
        this.committing++;
        return;
      }
    }
    const slot = this.takeSlot(w, onCqe, SlotMode.Commit);
    this.slotExpect[slot] = expect;
    this.slotResult[slot] = result;
    setUserData2(this.ring.sqes, w, slot, KIND_TARGET);
  }

  /** A callback slot for target SQE `w`, counted against the request being served (if any). */
  private takeSlot(w: number, onCqe: (res: number, flags: number) => void, mode: SlotMode): number {
    const slot = this.freeSlotCount > 0 ? this.freeSlots[--this.freeSlotCount]! : this.callbacks.length;
    this.callbacks[slot] = onCqe;
    this.slotTag[slot] = this.currentTag;
    this.slotMode[slot] = mode;
    this.targetInFlight++;
    if (this.currentTag >= 0) {
      this.inFlight[this.currentTag]!++;
      const h = this.handedOut;
      const n = this.handedOutCount;
      if (n > 0 && h[n - 1] === w) this.handedOutCount = n - 1;
      else {
        const i = h.subarray(0, n).indexOf(w);
        if (i >= 0) {
          h.copyWithin(i, i + 1, n);
          this.handedOutCount = n - 1;
        }
      }
    }
    return slot;
  }

  /** Frees a target SQE's callback slot once it is done; returns its callback. */
  private releaseSlot(slot: number): ((res: number, flags: number) => void) | undefined {
    const cb = this.callbacks[slot];
    this.callbacks[slot] = undefined;
    this.freeSlot(slot);
    this.targetInFlight--;
    const tag = this.slotTag[slot]!;
    if (tag >= 0) this.inFlight[tag]!--;
    return cb;
  }

  private freeSlot(slot: number): void {
    if (this.freeSlotCount === this.freeSlots.length) {
      const grown = new Int32Array(this.freeSlots.length * 2);
      grown.set(this.freeSlots);
      this.freeSlots = grown;
    }
    this.freeSlots[this.freeSlotCount++] = slot;
  }

  registerFile(fd: number): number {
    if (this.nextFileSlot >= FILE_SLOTS) throw new Error(`queue ${this.qid}: all ${FILE_SLOTS - 1} target file slots are taken`);
    const slot = this.nextFileSlot++;
    updateFiles(this.ring, slot, [fd]);
    return slot;
  }

  complete(tag: number, result: number): void {
    if (this.draining) {
      // Closing: the request is not answered any more (the kernel fails it when the ring goes),
      // only counted as no longer held; a late or repeated answer changes nothing.
      if (this.state[tag] === TagState.Serving) this.giveUp(tag);
      return;
    }
    if (this.state[tag] !== TagState.Serving) {
      if (this.failingAll) return; // the queue already failed it (failHeld); the target answers late
      throw new Error(`queue ${this.qid}: tag ${tag} completed twice or never fetched`);
    }
    // A request the queue failed (the handler threw, or failHeld) is answered; the target's word is moot.
    if (this.failed[tag]) return;
    const res = this.checkResult(tag, result);
    if (this.inFlight[tag]! > 0) {
      this.deferred[tag] = 1;
      this.deferredResult[tag] = res;
      return;
    }
    this.commit(tag, res);
  }

  // -------------------------------------------------------------------------------------------
  // Commands to the kernel
  // -------------------------------------------------------------------------------------------

  /** An SQE for the queue itself (never counted as the target's). */
  private nextSqe(): number {
    let w = this.ring.getSqe();
    while (w < 0) {
      this.enter(0);
      w = this.ring.getSqe();
    }
    this.lastSqe = w;
    return w;
  }

  /** Queues a FETCH_REQ, COMMIT_AND_FETCH_REQ or NEED_GET_DATA for `tag`. */
  private queueCmd(op: number, tag: number, result: number): void {
    this.prepCmd(this.nextSqe(), op, tag, result);
    this.state[tag] = TagState.InKernel;
  }

  private prepCmd(w: number, op: number, tag: number, result: number): void {
    // [BUFFER] copy mode passes the tag's buffer; USER_COPY and zero copy pass 0 ("addr should
    // not be used when UBLK_F_USER_COPY is enabled", ublk_cmd.h).
    prepIoCmd(this.ring.sqes, w, op, CHAR_DEV_SLOT, true, this.qid, tag, result, this.userCopy ? 0 : this.bufs.address + tag * this.maxIoBytes);
    setUserData2(this.ring.sqes, w, tag, KIND_CMD);
  }

  /** Answers tag's request with `res` (already checked) and re-arms the tag. */
  private commit(tag: number, res: number): void {
    if (res > 0 && this.copiesOut(tag)) res = this.copyRequestData(tag, res, true);
    // [COMMIT] BATCH_IO would gather these into one COMMIT_IO_CMDS.
    this.commitInto(this.nextSqe(), tag, res);
    this.state[tag] = TagState.InKernel;
  }

  /**
   * USER_COPY: a READ's data goes to the kernel (copyRequestData, in commit) before the answer
   * that completes it, so its commit can never be linked behind the target's SQE.
   */
  private copiesOut(tag: number): boolean {
    return this.userCopy && this.requests[tag]!.op === UBLK_IO_OP_READ;
  }

  /**
   * USER_COPY: moves `bytes` of tag's request between the kernel's request and the tag's buffer,
   * by pwrite (`out`: a READ's data to the kernel) or pread (a WRITE's data from it) on the char
   * device at the tag's user-copy position. ublk_drv takes such a copy only while the request is
   * the server's (UBLK_IO_FLAG_OWNED_BY_SRV), and only in the request's direction (pread for a
   * WRITE, pwrite for a READ; ublk_check_ubuf_dir). Synchronous, as kublk does it: the copy is
   * a memcpy in the kernel, and an SQE on the char device could be handed to an io-wq worker
   * (the file does not promise NOWAIT), which is no place for a commit linked behind it. Returns
   * `bytes`, or a negative errno (with a line in the log) that the request is then failed with.
   */
  private copyRequestData(tag: number, bytes: number, out: boolean): number {
    const req = this.requests[tag]!;
    const base = req.address;
    const pos = userCopyOffset(this.qid, tag);
    let done = 0;
    while (done < bytes) {
      let n: number;
      try {
        n = out
          ? sys.pwrite(this.opts.charFd, base + done, bytes - done, pos + done)
          : sys.pread(this.opts.charFd, base + done, bytes - done, pos + done);
      } catch (e) {
        if (!(e instanceof SysError)) throw e;
        if (e.errno === libc.EINTR) continue;
        this.report('copy', `ublk queue ${this.qid}: user copy of tag ${tag}'s ${req.describe()} failed: ${e.message}`);
        return -e.errno;
      }
      if (n === 0) {
        this.report('copy', `ublk queue ${this.qid}: user copy of tag ${tag}'s ${req.describe()} stopped at ${done} bytes`);
        return -libc.EIO;
      }
      done += n;
    }
    return bytes;
  }

  /** Prepares tag's COMMIT_AND_FETCH with `res` in SQE `w`; the request is no longer being served. */
  private commitInto(w: number, tag: number, res: number): void {
    this.serving--;
    this.deferred[tag] = 0;
    this.prepCmd(w, UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, res);
    this.served++;
  }

  /**
   * The one place a target's answer is checked before the kernel sees it. ublk_drv trusts the
   * result (__ublk_complete_rq), and what it does with a wrong one depends on the kernel: a READ
   * or WRITE answered with 0 bytes is resent forever on 6.12 and 7.2 ("no progress"), while 7.3
   * reports any WRITE result >= 0 as the whole write done; a partial count is resent on one and
   * taken as complete on the other; a count larger than the request draws a kernel warning; a
   * negative number that is no errno becomes an unknown block status. So a READ or WRITE must be
   * answered with exactly its length or a negative errno; anything else becomes a clear EIO here,
   * with a line in the log. FLUSH, DISCARD and WRITE_ZEROES succeed with any count (sent as 0).
   */
  private checkResult(tag: number, res: number): number {
    const req = this.requests[tag]!;
    let problem: string | undefined;
    if (!Number.isInteger(res) || res > 0x7fffffff) problem = `${String(res)}, which is not a result`;
    else if (res < 0) {
      if (libc.isNegErrno(res)) return res;
      problem = `${res}, which is not a negative errno`;
    } else if (req.op === UBLK_IO_OP_READ || req.op === UBLK_IO_OP_WRITE) {
      if (res === req.length) return res;
      if (res === 0) problem = '0 bytes (6.12 resends such a request forever, 7.3 reports a WRITE as done)';
      else if (res > req.length) problem = `${res} bytes, more than it asked for`;
      // Kernels disagree on a partial count: 6.12 resends the rest, 7.3 reports a WRITE whole.
      // Only "all of it" means the same everywhere; a target finishes short transfers itself.
      else problem = `${res} bytes, short of the request (a target must finish a short transfer or fail it)`;
    } else {
      // FLUSH, DISCARD, WRITE_ZEROES: done is done; a byte count means nothing to the kernel here.
      return 0;
    }
    this.report('result', `ublk queue ${this.qid}: the target answered tag ${tag}'s ${req.describe()} with ${problem}: failing it with EIO`);
    return -libc.EIO;
  }

  /** Whether checkResult would pass `res` to the kernel unchanged (and silently). */
  private sendsAsIs(tag: number, res: number): boolean {
    const op = this.requests[tag]!.op;
    if (res < 0) return Number.isInteger(res) && libc.isNegErrno(res);
    return op === UBLK_IO_OP_READ || op === UBLK_IO_OP_WRITE ? res === this.requests[tag]!.length : res === 0;
  }

  /** The target threw while serving `tag` (in `handle` or in one of the request's CQE callbacks). */
  private targetThrew(tag: number, e: unknown): void {
    const req = this.requests[tag]!;
    this.report('throw', `ublk queue ${this.qid}: the target threw on tag ${tag} (${req.describe()}): ${(e as Error)?.stack ?? String(e)}`);
    // SQEs it took but never tracked may be half written: make them harmless NOPs.
    for (let i = 0; i < this.handedOutCount; i++) {
      const w = this.handedOut[i]!;
      prepNop(this.ring.sqes, w);
      setUserData2(this.ring.sqes, w, 0, KIND_IGNORE);
    }
    this.handedOutCount = 0;
    if (this.state[tag] !== TagState.Serving || this.failed[tag]) return; // already answered
    this.failed[tag] = 1;
    this.deferred[tag] = 0;
    if (this.inFlight[tag] === 0) this.finish(tag, -libc.EIO);
  }

  /** Ends a request that failed or was completed while SQEs were in flight: commit, or give up when closing. */
  private finish(tag: number, res: number): void {
    if (this.draining) this.giveUp(tag);
    else this.commit(tag, res);
  }

  /** While closing: a request we no longer answer (the kernel fails it when the ring goes away). */
  private giveUp(tag: number): void {
    if (this.state[tag] === TagState.Serving) this.serving--;
    if (this.state[tag] !== TagState.Done) this.doneTags++;
    this.state[tag] = TagState.Done;
  }

  private report(kind: string, line: string): void {
    const n = (this.problems.get(kind) ?? 0) + 1;
    this.problems.set(kind, n);
    if (n <= LOG_LIMIT) this.log(n === LOG_LIMIT ? `${line} (further ones are only counted)` : line);
  }

  /**
   * Submits what is queued and waits for `waitNr` completions. EAGAIN (the kernel could not
   * allocate requests) and EBUSY (its completion backlog is full) are back-pressure, not
   * failures: the SQEs stay in the ring for the next enter, so reap what is there, or pause
   * a millisecond if nothing is, and go on.
   */
  private enter(waitNr: number): void {
    try {
      this.ring.submit(waitNr);
    } catch (e) {
      if (!(e instanceof SysError && (e.errno === libc.EAGAIN || e.errno === libc.EBUSY))) throw e;
      this.backPressure++;
      if (this.ring.cqReady() === 0) Atomics.wait(pauseWord, 0, 0, 1);
    }
  }

  // -------------------------------------------------------------------------------------------
  // Serving
  // -------------------------------------------------------------------------------------------

  /** Reads tag's descriptor and hands the request to the target. */
  private dispatch(tag: number): void {
    if (this.failingAll) {
      // Forced down (failHeld): the target gets nothing more to hold.
      this.state[tag] = TagState.Serving;
      this.serving++;
      this.commit(tag, -libc.EIO);
      return;
    }
    const d = readIoDesc(this.desc32, tag, this.desc);
    const req = (this.requests[tag] ??= new TagRequest(tag, this.bufs.address + tag * this.maxIoBytes, this.bufs, this.maxIoBytes));
    req.op = d.op;
    req.flags = d.flags;
    req.offset = d.startSector * SECTOR_SIZE;
    req.length = d.nrSectors * SECTOR_SIZE;
    this.state[tag] = TagState.Serving;
    this.serving++;
    this.failed[tag] = 0;
    this.deferred[tag] = 0;
    if (this.userCopy && req.op === UBLK_IO_OP_WRITE && req.length > 0) {
      // USER_COPY: the data first (ublk_drv copied nothing); a copy that fails fails the request.
      const copied = this.copyRequestData(tag, req.length, false);
      if (copied < 0) {
        this.commit(tag, copied);
        return;
      }
    }
    this.currentTag = tag;
    let result: number | undefined;
    try {
      result = this.handler.handle(req, this);
    } catch (e) {
      this.targetThrew(tag, e);
      return;
    } finally {
      this.currentTag = -1;
      this.handedOutCount = 0;
    }
    if (result !== undefined) this.complete(tag, result);
  }

  /** A target SQE's CQE: run its callback as part of its request, then commit the request if it waited for it. */
  private targetCqe(slot: number, res: number, flags: number): void {
    const tag = this.slotTag[slot]!;
    const mode = this.slotMode[slot]!;
    const expect = this.slotExpect[slot];
    const result = this.slotResult[slot]!;
    const cb = this.releaseSlot(slot)!;
    if (tag < 0) {
      // Issued outside any request (afterBatch, onWake): nothing to attribute it to.
      if (!this.draining) cb(res, flags);
      return;
    }
    if (mode === SlotMode.Linked) {
      // A linked SQE posts a CQE only when it failed or fell short, and then the kernel dropped
      // the COMMIT_AND_FETCH behind it without one: the request is the target's again.
      this.linkedSlot[tag] = -1;
      if (this.state[tag] === TagState.Committing) {
        this.state[tag] = TagState.Serving;
        this.committing--;
        this.serving++;
        this.served--;
        if (this.failingAll && !this.draining) {
          this.failed[tag] = 1;
          if (this.inFlight[tag] === 0) this.commit(tag, -libc.EIO);
          return;
        }
      }
    }
    if (this.draining || this.failed[tag]) {
      // No callback: the request is being failed, or the queue is closing. Once its last SQE is
      // done, a failed request is answered; while closing, a request of a target that can only
      // act from its callbacks is given up (one that completes from elsewhere, an async target,
      // still may, through the wake eventfd).
      if (this.inFlight[tag] === 0 && this.state[tag] === TagState.Serving
        && (this.failed[tag] || this.deferred[tag] || this.handler.onWake === undefined)) {
        this.finish(tag, -libc.EIO);
      }
      return;
    }
    this.currentTag = tag;
    try {
      if (mode === SlotMode.Commit && res === expect) this.complete(tag, result);
      else cb(res, flags);
    } catch (e) {
      this.targetThrew(tag, e);
    } finally {
      this.currentTag = -1;
      this.handedOutCount = 0;
    }
    if (this.deferred[tag] && this.inFlight[tag] === 0 && this.state[tag] === TagState.Serving && !this.failed[tag]) {
      this.commit(tag, this.deferredResult[tag]!);
    }
  }

  private cmdCqe(tag: number, res: number): void {
    if (this.state[tag] === TagState.Committing) {
      // Any CQE of a command linked behind a target SQE means that SQE succeeded (had it
      // failed, the command would have been dropped without a CQE) and the command ran.
      this.releaseSlot(this.linkedSlot[tag]!);
      this.linkedSlot[tag] = -1;
      this.state[tag] = TagState.InKernel;
      this.committing--;
    }
    if (res === UBLK_IO_RES_OK) {
      if (this.draining) this.giveUp(tag);
      else this.dispatch(tag);
    } else if (res === UBLK_IO_RES_ABORT) {
      this.giveUp(tag);
    } else if (res === UBLK_IO_RES_NEED_GET_DATA && !this.draining) {
      // [NEED_GET_DATA] not requested by this engine's devices; answered for completeness.
      this.queueCmd(UBLK_U_IO_NEED_GET_DATA, tag, 0);
    } else {
      // A command the kernel refused (e.g. -EINVAL): the tag cannot be re-armed.
      if (!this.draining) this.report('cmd', `ublk queue ${this.qid}: the kernel refused a command for tag ${tag}: ${res}`);
      this.giveUp(tag);
    }
  }

  private wakeCqe(flags: number): void {
    try {
      sys.read(this.opts.wakeFd!, this.scratch.address, 8);
    } catch {
      // EAGAIN: another CQE of this multishot poll already drained it.
    }
    this.handler.onWake?.(this);
    if (this.opts.onWake?.()) this.stopRequested = true;
    // A multishot poll that ends (no F_MORE: cancelled, or the kernel gave up on it) is re-armed.
    if (!(flags & uringAbi.IORING_CQE_F_MORE) && !this.closed) this.armWake();
  }

  private armWake(): void {
    const w = this.nextSqe();
    prepPollMultishot(this.ring.sqes, w, this.opts.wakeFd!, libc.POLLIN);
    setUserData2(this.ring.sqes, w, 0, KIND_WAKE);
  }

  /** Handles every CQE posted so far; returns how many. */
  private reap(): number {
    const ring = this.ring;
    const cq = ring.cq;
    const ready = ring.cqReady();
    for (let i = 0; i < ready; i++) {
      const c = ring.cqeAt(i);
      const lo = cq[c]!;
      const kind = cq[c + 1]!;
      const res = cq[c + 2]! | 0;
      if (kind === KIND_CMD) this.cmdCqe(lo, res);
      else if (kind === KIND_TARGET) this.targetCqe(lo, res, cq[c + 3]!);
      else if (kind === KIND_WAKE) this.wakeCqe(cq[c + 3]!);
      else if (kind !== KIND_CANCEL && kind !== KIND_IGNORE) {
        this.report('stray', `ublk queue ${this.qid}: a CQE nobody tracked (user_data ${kind}:${lo}, res ${res}): an SQE a target never passed to track()`);
      }
    }
    ring.cqAdvance(ready);
    return ready;
  }

  /**
   * Answers every request the target holds with EIO, now or as soon as its SQEs are done (they
   * are cancelled), and every later one at once, without the target. For a device that must go
   * away while its target sits on requests: START_DEV waits for the partition scan's reads and
   * STOP_DEV for every request in flight, and neither can be interrupted, so only answering
   * them lets the kernel finish (and a process that exits instead can hang in the kernel). A
   * late answer from the target is ignored.
   */
  failHeld(): void {
    if (this.failingAll || this.draining) return;
    this.failingAll = true;
    let failed = 0;
    for (let tag = 0; tag < this.depth; tag++) {
      if (this.state[tag] !== TagState.Serving || this.failed[tag]) continue;
      failed++;
      this.failed[tag] = 1;
      this.deferred[tag] = 0;
      if (this.inFlight[tag] === 0) this.commit(tag, -libc.EIO);
    }
    this.cancelTargetSqes(true);
    if (failed > 0) this.log(`ublk queue ${this.qid}: failing the ${failed} request(s) the target holds, and all later ones, with EIO`);
  }

  /** Queues an ASYNC_CANCEL for every target SQE in flight (`onlyFailed`: those of failed requests). */
  private cancelTargetSqes(onlyFailed: boolean): void {
    // By user_data, slot by slot: IORING_ASYNC_CANCEL_ANY would also end the wake poll, through
    // which an async target's last completions still arrive.
    for (let slot = 0; slot < this.callbacks.length; slot++) {
      if (this.callbacks[slot] === undefined) continue;
      const tag = this.slotTag[slot]!;
      if (onlyFailed && (tag < 0 || !this.failed[tag])) continue;
      const w = this.nextSqe();
      prepCancel2(this.ring.sqes, w, slot, KIND_TARGET, 0);
      setUserData2(this.ring.sqes, w, slot, KIND_CANCEL);
    }
  }

  /**
   * Serves until the device stops (every tag aborted and no target I/O in flight) or the owner
   * asks it to stop (onWake). Returns the number of requests served. Whatever way it ends,
   * normally or by an exception, call close() afterwards.
   * [FETCH] BATCH_IO's PREP_IO_CMDS/FETCH_IO_CMDS would replace the per-tag loop below.
   */
  run(): number {
    this.handler.start?.(this);
    for (let tag = 0; tag < this.depth; tag++) this.queueCmd(UBLK_U_IO_FETCH_REQ, tag, -1);
    if (this.opts.wakeFd !== undefined) this.armWake();
    this.enter(0);
    // Every FETCH must be in the kernel before START_DEV; back-pressure may have left some queued.
    while (this.ring.sqReady() > 0) this.enter(0);
    this.opts.onFetched?.();

    const spinMs = (this.opts.spinUs ?? 0) / 1000;
    while ((this.doneTags < this.depth || this.targetInFlight > 0) && !this.stopRequested) {
      if (spinMs === 0) this.enter(1);
      else if (this.ring.cqReady() === 0) {
        this.enter(0); // the commits go now, not after the spin
        this.spin(spinMs);
        // A spin that found CQEs left nothing to submit: reap them without another enter.
        if (this.ring.cqReady() === 0) this.enter(1);
      }
      this.reap();
      this.handler.afterBatch?.(this);
    }
    return this.served;
  }

  /**
   * Busy-waits up to `ms` for a CQE to reap. With DEFER_TASKRUN a ublk command completes as task
   * work that only an enter runs, so the CQ tail alone would never move: the kernel raises
   * IORING_SQ_TASKRUN when it queues such work, and the spin then enters (without waiting) to
   * run it. That work may post nothing (a linked target SQE that succeeded in silence, its
   * commit sent): then the spin goes on.
   */
  private spin(ms: number): void {
    const ring = this.ring;
    const until = performance.now() + ms;
    for (let i = 1; ; i++) {
      if (ring.cqReady() > 0) return;
      if (ring.taskRunPending()) {
        this.enter(0); // TASKRUN makes it enter with GETEVENTS (cqNeedsFlush); back-pressure handled there
        continue;
      }
      // The clock is read every 64 rounds: a look at the rings is far cheaper than a clock read.
      if ((i & 63) === 0 && performance.now() >= until) return;
    }
  }

  /**
   * Waits, for at most `timeoutMs`, until no SQE of the target is in flight and (for targets that
   * complete from elsewhere, through the wake eventfd) no request is held by the target. In-flight
   * target SQEs are cancelled first. CQE callbacks are not run any more: requests are given up,
   * and the kernel fails them when the ring closes. Returns true if everything finished.
   */
  private drain(timeoutMs: number): boolean {
    this.draining = true;
    // Linked SQEs of requests answered ahead are cancelled too (a cancelled one posts a CQE), but
    // not waited for: one that succeeds posts nothing (see QueueCloseReport.unresolvedLinks).
    const busy = () => this.targetInFlight > this.committing || (this.handler.onWake !== undefined && this.serving > 0);
    if (!busy()) return true;
    try {
      this.cancelTargetSqes(false);
      const until = Date.now() + timeoutMs;
      while (busy()) {
        const left = until - Date.now();
        if (left <= 0) return false;
        try {
          this.ring.submitAndWaitTimeout(1, Math.min(left, 100));
        } catch (e) {
          if (!(e instanceof SysError && (e.errno === libc.EAGAIN || e.errno === libc.EBUSY))) throw e;
          Atomics.wait(pauseWord, 0, 0, 1);
        }
        this.reap();
      }
      return true;
    } catch (e) {
      this.log(`ublk queue ${this.qid}: waiting for the target's I/O failed: ${(e as Error).message}`);
      return false;
    }
  }

  /**
   * Releases what the queue holds, but never memory the kernel may still write. Target SQEs are
   * cancelled and reaped first (closing the ring would not wait for them, see IoUring.close),
   * for at most drainTimeoutMs; then the ring is closed and the descriptor array unmapped. The
   * tag buffers are left to the owner, to unmap after this thread exited (QueueCloseReport says
   * why and whether they may be). The char device's fd stays open (the server closes it); after
   * this the queue holds no reference to it.
   */
  close(): QueueCloseReport {
    if (this.closed) throw new Error(`queue ${this.qid} closed twice`);
    const timeoutMs = this.opts.drainTimeoutMs ?? 10_000;
    const finished = this.drain(timeoutMs);
    this.closed = true;
    const report: QueueCloseReport = {
      drained: finished && this.committing === 0,
      inFlight: this.targetInFlight - this.committing,
      held: this.handler.onWake !== undefined ? this.serving : 0,
      unresolvedLinks: this.committing,
      bufBase: this.bufs.address,
      bufBytes: this.bufs.length,
    };
    if (!finished) {
      this.log(`ublk queue ${this.qid}: ${report.inFlight} target I/O(s) and ${report.held} held request(s) did not finish within ${timeoutMs} ms; their ${report.bufBytes} bytes of buffers stay mapped until the process exits`);
    }
    try {
      this.handler.close?.();
    } catch (e) {
      this.log(`ublk queue ${this.qid}: the target's close() threw: ${(e as Error)?.stack ?? String(e)}`);
    } finally {
      this.ring.close();
      this.descs.unmap();
      this.scratch.unmap();
    }
    return report;
  }
}

/** A word nobody notifies: Atomics.wait on it is a plain sleep. */
const pauseWord = new Int32Array(new SharedArrayBuffer(4));

/**
 * The queue's ring: SINGLE_ISSUER|DEFER_TASKRUN where the kernel has them (6.1), so ublk's
 * command completions (task work) run only when we enter to wait, batched; COOP_TASKRUN before.
 */
function openQueueRing(entries: number): IoUring {
  try {
    // TASKRUN_FLAG: the kernel raises IORING_SQ_TASKRUN when it queues task work for us, which
    // the low-latency spin watches (UblkQueueOptions.spinUs).
    return new IoUring(entries, {
      flags: uringAbi.IORING_SETUP_SINGLE_ISSUER | uringAbi.IORING_SETUP_DEFER_TASKRUN | uringAbi.IORING_SETUP_TASKRUN_FLAG,
    });
  } catch (e) {
    if (!(e instanceof SysError && e.code === 'EINVAL')) throw e;
    return new IoUring(entries, { flags: uringAbi.IORING_SETUP_COOP_TASKRUN });
  }
}
