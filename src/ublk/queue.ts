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
 * Commands for a tag must come from the task that fetched it (the kernel checks). Before 6.16
 * that task is the queue's: one thread owns the whole queue. With UBLK_F_PER_IO_DAEMON (6.16,
 * granted by the kernel itself) each tag has its own, so a queue's tags may be split among
 * threads ([THREADING]): this UblkQueue then serves the tags t with t % tagStride === tagOffset,
 * on a ring of its own, and another UblkQueue in another thread serves the rest.
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
 *   - USER_COPY (UBLK_F_USER_COPY, 6.5): no addr in the commands; data moves by pread/pwrite of
 *     the char device at userCopyOffset(qid, tag) (request-data.ts).
 *   - Zero copy (SUPPORT_ZERO_COPY, 6.15): the request's pages become fixed buffer `tag` of this
 *     ring: UBLK_U_IO_REGISTER_IO_BUF before the target sees a READ or WRITE, and
 *     UBLK_U_IO_UNREGISTER_IO_BUF just before its commit ([BUFFER], [COMMIT]); target SQEs use
 *     READ_FIXED/WRITE_FIXED with that index (request-data.ts).
 *   - AUTO_BUF_REG (6.16): the same fixed buffer, registered by the kernel before the FETCH
 *     completes and dropped by the commit: the commands carry struct ublk_auto_buf_reg
 *     {index = tag} in sqe->addr. With UBLK_AUTO_BUF_REG_FALLBACK a registration the kernel
 *     could not make arrives as UBLK_IO_F_NEED_REG_BUF, and the queue registers it as in zero copy.
 *
 * Batch I/O (UBLK_F_BATCH_IO, 7.0) changes how requests arrive and leave, not where data lives
 * (batch.ts): one PREP_IO_CMDS replaces the per-tag FETCHes ([FETCH]), a multishot FETCH_IO_CMDS
 * delivers tags in groups, and the answers gathered between two io_uring_enter calls go in one
 * COMMIT_IO_CMDS ([COMMIT]). It combines with every data path above but NEED_GET_DATA.
 */
import { RingTrace } from '../uring/trace.js';
import { TraceSink, queueTraceDecoder } from './trace.js';
import {
  IoUring, addFlags, prepCancel2, setU64, prepNop, prepPollMultishot, registerBuffersSparse, registerEventfd, registerFiles, setUserData2, updateFiles,
  abi as uringAbi,
} from '../uring/index.js';
import { Mapping, PAGE_SIZE, SysError, errnoName, libc, sys } from '../libc/index.js';
import {
  UBLK_U_IO_FETCH_REQ, UBLK_U_IO_COMMIT_AND_FETCH_REQ, UBLK_U_IO_NEED_GET_DATA, UBLK_U_IO_REGISTER_IO_BUF,
  UBLK_U_IO_UNREGISTER_IO_BUF, UBLK_IO_RES_OK, UBLK_IO_RES_NEED_GET_DATA, UBLK_IO_RES_ABORT, UBLK_IO_OP_READ,
  UBLK_IO_OP_WRITE, UBLK_IO_OP_NAMES, UBLK_IO_F_NEED_REG_BUF, UBLK_IO_F_SHMEM_ZC, UBLK_AUTO_BUF_REG_FALLBACK, descOffset, descLength,
  shmemZcIndex, shmemZcOffset,
} from './abi.js';
import { DataHome, RequestData } from './request-data.js';
import { BATCH_FETCHES, BatchCommands, batchLayout } from './batch.js';
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
const KIND_BUFREG = 6; // a REGISTER_IO_BUF/UNREGISTER_IO_BUF for tag = lo (a CQE only if it failed)
const KIND_BATCH_PREP = 7; // batch I/O: the queue's PREP_IO_CMDS
const KIND_BATCH_COMMIT = 8; // batch I/O: a COMMIT_IO_CMDS from commit buffer lo
const KIND_BATCH_FETCH = 9; // batch I/O: the multishot FETCH_IO_CMDS of provided-buffer group lo

/** Size of the ring's registered file table: slot 0 is /dev/ublkcN, the rest are the target's. */
const FILE_SLOTS = 16;
/** The char device's slot in that table. */
const CHAR_DEV_SLOT = 0;
/** sqe->addr, in 32-bit words from the SQE's start. */
const SQE_ADDR_WORD = uringAbi.io_uring_sqe.addr / 4;

/** How many problems of one kind a queue reports before it only counts them. */
const LOG_LIMIT = 10;
/**
 * runOnEventLoop's longest blocking wait while the handler holds nothing: the target's timers
 * (a cache flush, a connection's keep-alive) run at least this often on an idle device.
 */
const IDLE_WAIT_MS = 50;

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
   * A live trace of this queue's ring (trace.ts): `stderr` traces from the start; `word[0]` is a
   * generation the server bumps (then wakes the queue) when a `ublk trace` reader created `fifo`,
   * which the queue then opens and writes to until the reader leaves.
   */
  trace?: { stderr: boolean; word?: Int32Array; fifo?: string };
  /** Where request data lives (request-data.ts; default: the tag buffer, the kernel copies). */
  dataHome?: DataHome;
  /**
   * FixedBuffer only: who registers the request's pages as fixed buffer `tag`: the queue with
   * REGISTER_IO_BUF (zero copy, 'manual'), or the kernel (AUTO_BUF_REG, 'auto'; 'auto-fallback'
   * also asks for UBLK_AUTO_BUF_REG_FALLBACK).
   */
  bufferRegistration?: 'manual' | 'auto' | 'auto-fallback';
  /** FixedBuffer only: the kernel also takes pread/pwrite of the char device (request-data.ts). */
  memoryCopy?: boolean;
  /**
   * Test hook ('auto-fallback' only): name a buffer slot that does not exist in the commands, so
   * every automatic registration fails and each request takes the fallback path (kublk's null
   * target does the same to test it). Set by UBLK_TEST_FORCE_REG_FALLBACK=1 in the server.
   */
  forceRegFallback?: boolean;
  /**
   * [THREADING] Per-I/O threads (UBLK_F_PER_IO_DAEMON, 6.16): this queue object serves only the
   * tags t with t % tagStride === tagOffset (default: stride 1, every tag).
   */
  tagStride?: number;
  tagOffset?: number;
  /**
   * Shared regions registered with REG_BUF (UBLK_F_SHMEM_ZC, 7.1): a request the kernel matched
   * to one (UBLK_IO_F_SHMEM_ZC) has its data at `address + offset`, in this process.
   */
  sharedRegions?: ReadonlyArray<{ index: number; address: number; length: number }>;
  /**
   * Batch I/O (UBLK_F_BATCH_IO, 7.0; batch.ts): PREP/FETCH/COMMIT_IO_CMDS instead of per-tag
   * commands. The queue's tags are then served by one thread (no tagStride).
   */
  batch?: boolean;
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

  constructor(readonly tag: number, private readonly data: RequestData) {}

  get buffer(): Buffer {
    return this.data.buffer(this.tag);
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
  /** trackBackground(): the target's own SQE, of no request, that does not keep the queue alive. */
  Background,
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
  /** How request data moves in this device's data path. */
  private readonly data: RequestData;
  /** What the commands carry in addr: the tag buffer (copy modes), 0, or a ublk_auto_buf_reg. */
  private readonly cmdAddr: 'buffer' | 'none' | 'auto';
  /** The auto_buf_reg flags byte (UBLK_AUTO_BUF_REG_FALLBACK or 0). */
  private readonly autoRegFlags: number;
  /** The queue registers request pages itself (zero copy, or the auto_zc fallback). */
  private readonly manualRegistration: boolean;
  /** Batch I/O's commands and buffers, or undefined for the per-tag protocol. */
  private readonly batch: BatchCommands | undefined;
  /** Batch I/O: PREP_IO_CMDS's result once its CQE arrived. */
  private prepResult: number | undefined;
  /** Shared regions by REG_BUF index: address, length, and a Buffer over them (made on first use). */
  private readonly regions = new Map<number, { address: number; length: number; bytes?: Buffer }>();
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
  /** The request's pages are a fixed buffer the queue registered (UNREGISTER_IO_BUF before the commit). */
  private readonly registered: Uint8Array;
  /** One request object per tag, refilled for each request the tag carries. */
  private readonly requests: TagRequest[] = [];

  private doneTags = 0;
  /** The tags this queue object serves (every tag, unless the queue is split among threads). */
  private readonly tags: Int32Array;
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
  /** Of targetInFlight, the SQEs of trackBackground (a socket's receive, a timer). */
  private backgroundInFlight = 0;
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
  /** runOnEventLoop: the eventfd the ring signals, libuv's watch on it, and who waits for it. */
  private loopFd: number | undefined;
  private loopPoll: { close(): void } | undefined;
  private loopWaiter: (() => void) | undefined;
  /** drainEventLoop's verdict, which close() then takes instead of draining again. */
  private loopDrained: boolean | undefined;
  /** Answers the target gave (complete() calls): settle() watches it move. */
  private completions = 0;
  /** Whether the handler answers from the event loop: serve it with runOnEventLoop. */
  get handlerUsesEventLoop(): boolean {
    return this.handler.eventLoop === true;
  }
  /** The handler's close(), if it returned a Promise (the thread awaits it before it exits). */
  handlerClosed: Promise<void> | undefined;
  private nextFileSlot = CHAR_DEV_SLOT + 1;
  private readonly problems = new Map<string, number>();

  /** Requests served since start (for stats and tests). */
  served = 0;
  /** Times io_uring_enter said EAGAIN or EBUSY (back-pressure, retried). */
  backPressure = 0;

  constructor(opts: UblkQueueOptions) {
    this.opts = opts;
    const home = opts.dataHome ?? DataHome.TagBuffer;
    this.cmdAddr = home === DataHome.TagBuffer ? 'buffer' : home === DataHome.UserCopy || opts.bufferRegistration === 'manual' ? 'none' : 'auto';
    this.autoRegFlags = opts.bufferRegistration === 'auto-fallback' ? UBLK_AUTO_BUF_REG_FALLBACK : 0;
    this.manualRegistration = home === DataHome.FixedBuffer && opts.bufferRegistration === 'manual';
    this.qid = opts.qid;
    this.depth = opts.depth;
    this.handler = opts.handler;
    this.maxIoBytes = opts.maxIoBytes;
    this.log = opts.log ?? ((line) => process.stderr.write(`${line}\n`));
    const n = opts.depth;
    const stride = opts.tagStride ?? 1;
    const first = opts.tagOffset ?? 0;
    if (!(stride >= 1 && first >= 0 && first < stride && first < n)) throw new Error(`queue ${opts.qid}: no tags for offset ${first} of stride ${stride} at depth ${n}`);
    this.tags = Int32Array.from({ length: Math.ceil((n - first) / stride) }, (_, i) => first + i * stride);
    this.state = new Uint8Array(n);
    this.inFlight = new Uint32Array(n);
    this.failed = new Uint8Array(n);
    this.deferred = new Uint8Array(n);
    this.deferredResult = new Int32Array(n);
    this.linkedSlot = new Int32Array(n).fill(-1);
    this.registered = new Uint8Array(n);
    for (const r of opts.sharedRegions ?? []) this.regions.set(r.index, { address: r.address, length: r.length });
    const cleanup: Array<() => void> = [() => this.scratch.unmap()];
    try {
      // The kernel finds the queue from the offset with its own PAGE_SIZE: ours must be the same.
      this.descs = Mapping.file(opts.charFd, descLength(n, PAGE_SIZE), descOffset(opts.qid, PAGE_SIZE), libc.PROT_READ, false);
      cleanup.push(() => this.descs.unmap());
      this.desc32 = this.descs.u32;
      // [BUFFER] one buffer per tag, backed as it is touched (NORESERVE: a deep queue of large
      // requests reserves address space, not memory). Copy modes hand it to the kernel; the
      // copy-free modes stage data in it only for targets that ask (request-data.ts).
      // Batch I/O's element and tag buffers go at its end (batch.ts says why they share its fate).
      const batchBytes = opts.batch ? batchLayout(n, home === DataHome.TagBuffer).total : 0;
      if (opts.batch && stride !== 1) throw new Error(`queue ${opts.qid}: batch I/O serves a queue from one thread (no tagStride)`);
      this.bufs = Mapping.anonymous(n * opts.maxIoBytes + batchBytes, { noReserve: true });
      cleanup.push(() => this.bufs.unmap());
      this.data = new RequestData({
        home, charFd: opts.charFd, qid: opts.qid, depth: n, bufs: this.bufs, maxIoBytes: opts.maxIoBytes,
        userCopy: opts.memoryCopy === true, report: (line) => this.report('copy', line),
      });
      // Room for a command per tag served plus target I/O; the CQ gets twice that.
      let entries = 1;
      while (entries < this.tags.length * 2) entries <<= 1;
      this.ring = openQueueRing(Math.min(entries, 4096), opts.handler.eventLoop === true);
      cleanup.push(() => this.ring.close());
      // The char device as a fixed file: saves an fget per command (ublksrv does the same). The
      // other slots start empty, for the target's own files (registerFile).
      registerFiles(this.ring, [opts.charFd, ...new Array<number>(FILE_SLOTS - 1).fill(-1)]);
      // [BUFFER] zero copy: an empty fixed-buffer table with a slot per tag, where ublk_drv puts
      // each request's pages (io_buffer_register_bvec needs the slot to exist and be empty).
      if (home === DataHome.FixedBuffer) registerBuffersSparse(this.ring, n);
      if (opts.batch) {
        this.batch = new BatchCommands({
          ring: this.ring, qid: opts.qid, depth: n, charDevSlot: CHAR_DEV_SLOT, mem: this.bufs.slice(n * opts.maxIoBytes, batchBytes),
          bufferAddress: home === DataHome.TagBuffer ? (tag) => this.data.address(tag) : undefined,
          autoRegIndex: this.cmdAddr === 'auto' ? (tag) => this.autoRegIndex(tag) : undefined,
          autoRegFallback: this.autoRegFlags !== 0,
          kinds: { prep: KIND_BATCH_PREP, commit: KIND_BATCH_COMMIT, fetch: KIND_BATCH_FETCH },
        });
      }
    } catch (e) {
      for (const f of cleanup.reverse()) f();
      throw e;
    }
    this.setTracer();
  }

  // -------------------------------------------------------------------------------------------
  // Live trace
  // -------------------------------------------------------------------------------------------

  private traceGen = 0;
  private traceSink: TraceSink | undefined;

  /** The ring's name in trace lines: `q0`, or `q0.1` for the second thread of a queue. */
  private get traceName(): string {
    const o = this.opts;
    return (o.tagStride ?? 1) > 1 ? `q${o.qid}.${o.tagOffset ?? 0}` : `q${o.qid}`;
  }

  private makeTracer(sink: TraceSink): RingTrace {
    const kinds: Record<number, string> = {
      [KIND_WAKE]: 'wake', [KIND_CANCEL]: 'cancel', [KIND_IGNORE]: 'ignored', [KIND_BATCH_PREP]: 'batch prep',
    };
    return new RingTrace(this.traceName, sink.write, queueTraceDecoder({
      cmdKind: KIND_CMD,
      desc32: this.desc32,
      userData: (lo, hi) => {
        if (hi === KIND_CMD) return `cmd tag ${lo}`;
        if (hi === KIND_TARGET) return `target slot ${lo}${this.slotTag[lo] !== undefined && this.slotTag[lo]! >= 0 ? ` (tag ${this.slotTag[lo]})` : ''}`;
        if (hi === KIND_BUFREG) return `bufreg tag ${lo}`;
        if (hi === KIND_BATCH_COMMIT) return `batch commit buffer ${lo}`;
        if (hi === KIND_BATCH_FETCH) return `batch fetch group ${lo}`;
        return kinds[hi];
      },
    }));
  }

  /**
   * Follows the server's trace word: a new generation means a `ublk trace` reader is waiting on
   * the FIFO. A reader that left (its sink closed) ends the trace. One Atomics.load per reap.
   */
  private checkTrace(word: Int32Array): void {
    const gen = Atomics.load(word, 0);
    if (gen !== this.traceGen) {
      this.traceGen = gen;
      this.traceSink?.close();
      this.traceSink = this.opts.trace?.fifo ? TraceSink.fifo(this.opts.trace.fifo) : undefined;
      this.setTracer();
    } else if (this.traceSink?.closed) {
      this.traceSink = undefined;
      this.setTracer();
    }
  }

  /** The ring traces to the reader's FIFO while there is one, else to stderr if asked, else not at all. */
  private setTracer(): void {
    const sink = this.traceSink ?? (this.opts.trace?.stderr ? TraceSink.stderr() : undefined);
    this.ring.tracer = sink ? this.makeTracer(sink) : null;
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
   * Like track(), for an SQE that belongs to no request and does not keep the queue running:
   * the receive a network target keeps posted on its socket, a timer. Counting it against the
   * request being served would hold that request until the socket next speaks; counting it as
   * the queue's work would keep a stopped device's queue waiting on a peer. When the queue
   * closes it is cancelled and waited for like any target SQE (its memory is still the kernel's
   * until its CQE), and its callback is not run any more.
   */
  trackBackground(w: number, onCqe: (res: number, flags: number) => void): void {
    const slot = this.takeSlot(w, onCqe, SlotMode.Background);
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
    // Batch I/O commits many tags per command, gathered at the next enter: nothing to link.
    if (this.batch === undefined && w === this.lastSqe && this.inFlight[tag] === 0 && !this.failed[tag] && !this.failingAll && !this.draining
      && this.ring.sqPending > 0 && this.sendsAsIs(tag, result) && !this.data.copiesOut(tag) && !this.registered[tag]) {
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
    const tag = mode === SlotMode.Background ? -1 : this.currentTag;
    this.callbacks[slot] = onCqe;
    this.slotTag[slot] = tag;
    this.slotMode[slot] = mode;
    this.targetInFlight++;
    if (mode === SlotMode.Background) this.backgroundInFlight++;
    if (tag >= 0) this.inFlight[tag]!++;
    if (this.currentTag >= 0) {
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
    if (this.slotMode[slot] === SlotMode.Background) this.backgroundInFlight--;
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
    this.completions++;
    if (this.loopWaiter !== undefined) this.wakeLoop();
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
    // [BUFFER] copy modes pass the tag's buffer in the command; the copy-free modes pass 0 ("addr
    // should not be used when UBLK_F_USER_COPY is enabled", ublk_cmd.h; ublk_check_fetch_buf
    // refuses anything else). AUTO_BUF_REG puts struct ublk_auto_buf_reg {index u16, flags u8,
    // reserved} in the SQE's own addr field instead (ublk_sqe_addr_to_auto_buf_reg): the
    // fixed-buffer slot the kernel registers the tag's next request into is the tag.
    const a = this.cmdAddr;
    const s = this.ring.sqes;
    prepIoCmd(s, w, op, CHAR_DEV_SLOT, true, this.qid, tag, result, a === 'buffer' ? this.data.address(tag) : 0);
    if (a === 'auto') setU64(s, w + SQE_ADDR_WORD, this.autoRegIndex(tag) + this.autoRegFlags * 0x10000);
    setUserData2(s, w, tag, KIND_CMD);
  }

  /** The fixed-buffer slot the kernel registers tag's next request into (AUTO_BUF_REG). */
  private autoRegIndex(tag: number): number {
    return this.opts.forceRegFallback ? 0xffff : tag;
  }

  /**
   * Zero copy: REGISTER_IO_BUF or UNREGISTER_IO_BUF of tag's request pages as fixed buffer `tag`
   * (struct ublksrv_io_cmd addr = the buffer index). Both complete inline, in SQ order, so the
   * target's SQEs queued after the register find the buffer, and the commit queued after the
   * unregister finds it gone; a success posts no CQE (IOSQE_CQE_SKIP_SUCCESS).
   */
  private queueBufferCmd(op: number, tag: number): void {
    const w = this.nextSqe();
    prepIoCmd(this.ring.sqes, w, op, CHAR_DEV_SLOT, true, this.qid, tag, 0, tag);
    addFlags(this.ring.sqes, w, uringAbi.IOSQE_CQE_SKIP_SUCCESS);
    setUserData2(this.ring.sqes, w, tag, KIND_BUFREG);
  }

  /** Answers tag's request with `res` (already checked) and re-arms the tag. */
  private commit(tag: number, res: number): void {
    res = this.data.finish(tag, res);
    if (this.registered[tag]) {
      // [COMMIT] zero copy: the pages go back before the answer (the request completes when its
      // last reference, the buffer's included, is dropped: ublk_drv's io->ref).
      this.registered[tag] = 0;
      this.queueBufferCmd(UBLK_U_IO_UNREGISTER_IO_BUF, tag);
    }
    if (this.batch) {
      // [COMMIT] batch I/O: gathered, and sent in one COMMIT_IO_CMDS at the next enter (flushCommits).
      this.batch.add(tag, res);
      this.answered(tag);
    } else {
      this.commitInto(this.nextSqe(), tag, res);
    }
    this.state[tag] = TagState.InKernel;
  }

  /** Prepares tag's COMMIT_AND_FETCH with `res` in SQE `w`; the request is no longer being served. */
  private commitInto(w: number, tag: number, res: number): void {
    this.prepCmd(w, UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, res);
    this.answered(tag);
  }

  /** Tag's answer is on its way to the kernel: the request is no longer being served. */
  private answered(tag: number): void {
    this.serving--;
    this.deferred[tag] = 0;
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
    if (this.batch !== undefined && this.batch.pending > 0) this.flushCommits();
    this.submit(waitNr);
  }

  /**
   * Batch I/O: the answers gathered since the last enter, as one COMMIT_IO_CMDS. If the SQ is
   * full the queued SQEs go first; if no SQE or commit buffer is free they wait for the next enter.
   */
  private flushCommits(): void {
    if (!this.batch!.canFlush) return;
    let w = this.ring.getSqe();
    if (w < 0) {
      this.submit(0);
      w = this.ring.getSqe();
      if (w < 0) return;
    }
    this.batch!.flush(w);
    this.lastSqe = w;
  }

  private submit(waitNr: number): void {
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
    const req = (this.requests[tag] ??= new TagRequest(tag, this.data));
    req.op = d.op;
    req.flags = d.flags;
    req.offset = d.startSector * SECTOR_SIZE;
    req.length = d.nrSectors * SECTOR_SIZE;
    this.state[tag] = TagState.Serving;
    this.serving++;
    this.failed[tag] = 0;
    this.deferred[tag] = 0;
    if (d.flags & UBLK_IO_F_SHMEM_ZC) {
      // The client's pages lie in a region we registered: the data is already in our memory.
      if (!this.beginShared(tag, req, d.addr)) return;
    } else {
      this.data.begin(tag, req.op, req.length);
    }
    if ((this.manualRegistration || d.flags & UBLK_IO_F_NEED_REG_BUF) && !this.data.isShared(tag)
      && (req.op === UBLK_IO_OP_READ || req.op === UBLK_IO_OP_WRITE) && req.length > 0) {
      // [BUFFER] zero copy (or an automatic registration the kernel could not make): the
      // request's pages become fixed buffer `tag` before any SQE of the target can name them.
      this.registered[tag] = 1;
      this.queueBufferCmd(UBLK_U_IO_REGISTER_IO_BUF, tag);
      if (!this.manualRegistration) {
        this.report('fallback', `ublk queue ${this.qid}: the kernel could not register tag ${tag}'s buffer (UBLK_IO_F_NEED_REG_BUF); the queue registers it`);
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

  /**
   * UBLK_IO_F_SHMEM_ZC: points the request's data at buffer index `addr >> 32`, offset
   * `addr & 0xffffffff`. A region this queue does not know, or a range past its end, would be the
   * kernel's mistake or a stale registration: the request fails with EIO and is never served.
   */
  private beginShared(tag: number, req: TagRequest, addr: number): boolean {
    const index = shmemZcIndex(addr);
    const off = shmemZcOffset(addr);
    const r = this.regions.get(index);
    if (r === undefined || off + req.length > r.length) {
      this.report('shmem', `ublk queue ${this.qid}: tag ${tag}'s ${req.describe()} is in shared buffer ${index} at ${off}, which this server did not register${r ? ` that far (${r.length} bytes)` : ''}: failing it with EIO`);
      this.data.begin(tag, req.op, req.length);
      this.commit(tag, -libc.EIO);
      return false;
    }
    if (r.bytes === undefined) {
      r.bytes = Mapping.borrow(r.address, r.length).bytes();
      // Once per region: the evidence that the kernel matched a client's pages (tests look for it).
      this.log(`ublk queue ${this.qid}: a request is served in place from shared buffer ${index} (UBLK_IO_F_SHMEM_ZC)`);
    }
    this.data.beginShared(tag, req.op, req.length, r.bytes, r.address, off);
    return true;
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

  /**
   * Batch I/O: a FETCH_IO_CMDS CQE. Tags go to the target in the order the kernel wrote them;
   * a command that ended is re-armed unless the device is going away (ABORT: STOP_DEV or the
   * disk's removal cancelled it) or the queue is closing.
   */
  private batchFetchCqe(g: number, res: number, flags: number): void {
    const b = this.batch!;
    let more: boolean;
    if (res >= 0) {
      more = b.fetched(g, res, flags, (tag) => {
        if (tag >= this.depth || this.state[tag] !== TagState.InKernel) {
          this.report('cmd', `ublk queue ${this.qid}: the kernel fetched tag ${tag}, which is not waiting for a request`);
        } else if (this.draining) {
          this.giveUp(tag);
        } else {
          this.dispatch(tag);
        }
      });
    } else {
      more = false;
      b.fetchEnded(g, res);
      if (res !== UBLK_IO_RES_ABORT && res !== -libc.ENOBUFS && !this.draining) {
        this.report('cmd', `ublk queue ${this.qid}: the kernel ended FETCH_IO_CMDS: ${errnoName(-res)}`);
      }
    }
    if (!more && (res >= 0 || res === -libc.ENOBUFS) && !this.draining && !this.closed) b.prepFetch(this.nextSqe(), g);
  }

  /** Batch I/O: a COMMIT_IO_CMDS CQE (the bytes of elements the kernel took). */
  private batchCommitCqe(buf: number, res: number): void {
    const refused = this.batch!.committed(buf, res);
    // Once the fetches were aborted the device is going away, and its requests with it.
    if (refused && this.batch!.fetching > 0 && !this.draining) {
      this.report('cmd', `ublk queue ${this.qid}: the kernel refused the answer for tag ${refused.refusedTag}${refused.error ? `: ${errnoName(-refused.error)}` : ''}`);
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
    const traceWord = this.opts.trace?.word;
    if (traceWord !== undefined) this.checkTrace(traceWord);
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
      else if (kind === KIND_BATCH_FETCH) this.batchFetchCqe(lo, res, cq[c + 3]!);
      else if (kind === KIND_BATCH_COMMIT) this.batchCommitCqe(lo, res);
      else if (kind === KIND_BATCH_PREP) this.prepResult = res;
      else if (kind === KIND_BUFREG) {
        // Only a failure posts a CQE. A failed register fails the target's fixed-buffer SQEs
        // (no buffer at that index), and so its request; a failed unregister leaves the buffer
        // to the ring's teardown, which drops it.
        this.report('bufreg', `ublk queue ${this.qid}: the kernel refused a buffer (un)registration for tag ${lo}: ${errnoName(-res)}`);
      } else if (kind !== KIND_CANCEL && kind !== KIND_IGNORE) {
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
    this.startServing();
    const spinMs = (this.opts.spinUs ?? 0) / 1000;
    while (this.active() && !this.stopRequested) {
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

  /** [FETCH] Arms every tag and, with batch I/O, waits for the kernel's word on PREP_IO_CMDS. */
  private startServing(): void {
    this.handler.start?.(this);
    if (this.batch) {
      // [FETCH] batch I/O: every tag in one PREP_IO_CMDS, then the multishot fetches.
      this.batch.prepPrep(this.nextSqe(), this.tags);
      for (const tag of this.tags) this.state[tag] = TagState.InKernel;
      for (let g = 0; g < BATCH_FETCHES; g++) this.batch.prepFetch(this.nextSqe(), g);
    } else {
      for (const tag of this.tags) this.queueCmd(UBLK_U_IO_FETCH_REQ, tag, -1);
    }
    if (this.opts.wakeFd !== undefined) this.armWake();
    this.enter(0);
    // Every FETCH must be in the kernel before START_DEV; back-pressure may have left some queued.
    while (this.ring.sqReady() > 0) this.enter(0);
    if (this.batch) {
      // START_DEV waits for every tag to be prepared, and a refused PREP prepares none: know
      // which before the owner starts the device (the command completes as it is issued).
      while (this.prepResult === undefined && !this.stopRequested) {
        this.enter(1);
        this.reap();
      }
      if (this.prepResult !== undefined && this.prepResult < 0) {
        throw new Error(`queue ${this.qid}: the kernel refused PREP_IO_CMDS: ${errnoName(-this.prepResult)}`);
      }
    }
    this.opts.onFetched?.();
  }

  /**
   * run() for a handler that answers from the thread's event loop (QueueHandler.eventLoop: an
   * async target's Promises). A thread blocked in io_uring_enter runs no JavaScript, so while the
   * handler holds requests the queue waits on the event loop instead: the ring signals an eventfd
   * (IORING_REGISTER_EVENTFD) whenever it posts a CQE or queues task work for us, and libuv
   * watches that eventfd like any socket (koffi.node.poll), next to the target's own timers and
   * sockets. A completion from the handler wakes the loop too, and its commit is submitted at
   * once. When the handler holds nothing (everything answered at once, or from microtasks that
   * ran right after the batch) the queue blocks in io_uring_enter as run() does, so a target
   * whose functions settle without waiting costs no event-loop turn per request; that wait
   * returns every IDLE_WAIT_MS to give the target's timers a turn.
   */
  async runOnEventLoop(): Promise<number> {
    this.startServing();
    const efd = sys.eventfd(0, libc.EFD_CLOEXEC | libc.EFD_NONBLOCK);
    this.loopFd = efd;
    registerEventfd(this.ring, efd);
    this.loopPoll = sys.watchReadable(efd, () => {
      try {
        sys.read(efd, this.scratch.address, 8);
      } catch { /* EAGAIN: drained already */ }
      this.wakeLoop();
    });
    while (this.active() && !this.stopRequested) {
      await this.settle();
      if (this.serving > 0) {
        this.enter(0); // commits go now; TASKRUN makes it run the task work that carries requests
        if (this.ring.cqReady() === 0 && !this.ring.cqNeedsFlush()) await this.loopWait(0);
      } else if (!this.enterIdle()) {
        await new Promise<void>((resolve) => setImmediate(resolve)); // the target's timers' turn
      }
      this.reap();
      this.handler.afterBatch?.(this);
    }
    return this.served;
  }

  /**
   * Lets the handler's Promises that can settle without the event loop (a function that did its
   * work before its first await) settle: microtask generations run until three in a row answered
   * nothing. A Promise that needs the loop (a timer, a socket) is waited for by runOnEventLoop.
   */
  private async settle(): Promise<void> {
    let quiet = 0;
    while (this.serving > 0 && quiet < 3) {
      const before = this.completions;
      await null;
      quiet = this.completions === before ? quiet + 1 : 0;
    }
  }

  /** Waits on the event loop for the ring's eventfd or a completion (or `ms` milliseconds, if not 0). */
  private loopWait(ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      this.loopWaiter = () => {
        if (timer !== undefined) clearTimeout(timer);
        resolve();
      };
      if (ms > 0) timer = setTimeout(() => this.wakeLoop(), ms);
    });
  }

  private wakeLoop(): void {
    const w = this.loopWaiter;
    this.loopWaiter = undefined;
    w?.();
  }

  /**
   * The idle wait of runOnEventLoop: submits and blocks for one completion, at most
   * IDLE_WAIT_MS. Returns false if it timed out. Back-pressure as in enter().
   */
  private enterIdle(): boolean {
    if (this.batch !== undefined && this.batch.pending > 0) this.flushCommits();
    try {
      return this.ring.submitAndWaitTimeout(1, IDLE_WAIT_MS);
    } catch (e) {
      if (!(e instanceof SysError && (e.errno === libc.EAGAIN || e.errno === libc.EBUSY))) throw e;
      this.backPressure++;
      return true;
    }
  }

  /**
   * The event-loop half of closing a runOnEventLoop queue (call it before close()): waits, on
   * the event loop, up to the drain timeout for the requests the handler still holds. Answers
   * that come now are not sent (the kernel fails the requests when the ring closes), as in
   * drain(). Returns whether the handler let go of every request.
   */
  async drainEventLoop(): Promise<boolean> {
    this.draining = true;
    const until = Date.now() + (this.opts.drainTimeoutMs ?? 10_000);
    try {
      this.cancelTargetSqes(false);
      while (this.serving > 0 || this.targetInFlight > this.committing) {
        const left = until - Date.now();
        if (left <= 0) break;
        this.enter(0);
        this.reap();
        if (this.serving > 0 || this.targetInFlight > this.committing) await this.loopWait(Math.min(left, 100));
      }
    } catch (e) {
      this.log(`ublk queue ${this.qid}: waiting for the target's requests failed: ${(e as Error).message}`);
    }
    this.loopPoll?.close();
    this.loopPoll = undefined;
    this.loopDrained = this.serving === 0 && this.targetInFlight <= this.committing;
    return this.loopDrained;
  }

  /**
   * The device still has work for this queue: tags not yet aborted (per-tag protocol) or a fetch
   * still armed and answers not yet delivered (batch I/O), or target I/O in flight.
   */
  private active(): boolean {
    const b = this.batch;
    const targetWork = this.targetInFlight > this.backgroundInFlight;
    if (b === undefined) return this.doneTags < this.tags.length || targetWork;
    return b.fetching > 0 || this.serving > 0 || b.inFlight > 0 || b.pending > 0 || targetWork;
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
    if (this.loopDrained !== undefined) return this.loopDrained; // drainEventLoop waited already
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
      held: this.handler.onWake !== undefined || this.handler.eventLoop ? this.serving : 0,
      unresolvedLinks: this.committing,
      bufBase: this.bufs.address,
      bufBytes: this.bufs.length,
    };
    if (!finished) {
      this.log(`ublk queue ${this.qid}: ${report.inFlight} target I/O(s) and ${report.held} held request(s) did not finish within ${timeoutMs} ms; their ${report.bufBytes} bytes of buffers stay mapped until the process exits`);
    }
    try {
      const closing = this.handler.close?.({ drained: finished });
      if (closing) {
        this.handlerClosed = Promise.resolve(closing).catch((e: unknown) => {
          this.log(`ublk queue ${this.qid}: the target's close() failed: ${(e as Error)?.stack ?? String(e)}`);
        });
      }
    } catch (e) {
      this.log(`ublk queue ${this.qid}: the target's close() threw: ${(e as Error)?.stack ?? String(e)}`);
    } finally {
      this.loopPoll?.close();
      this.ring.tracer = null;
      this.traceSink?.close();
      this.ring.close();
      // The ring held a reference to the eventfd's context; with the ring gone, nothing signals it.
      if (this.loopFd !== undefined) sys.close(this.loopFd);
      this.batch?.free();
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
 *
 * A queue that waits on its event loop (`onEventLoop`, UblkQueue.runOnEventLoop) gets
 * COOP_TASKRUN|TASKRUN_FLAG instead. Measured on 7.3.4: with DEFER_TASKRUN, once such a queue
 * had waited in libuv's epoll_wait while it held requests, the requests the kernel dispatched
 * afterwards (in flight in blk-mq's debugfs, on tags whose FETCH was outstanding) never reached
 * the ring: no CQE, no IORING_SQ_TASKRUN, no eventfd signal, and later GETEVENTS waits found
 * nothing. With COOP_TASKRUN the same sequence works: ublk's task work is ordinary task work of
 * this thread, which runs when it returns from any system call (epoll_wait included), and the
 * CQE it posts signals the ring's eventfd.
 */
function openQueueRing(entries: number, onEventLoop: boolean): IoUring {
  const coop = () => new IoUring(entries, { flags: uringAbi.IORING_SETUP_COOP_TASKRUN | uringAbi.IORING_SETUP_TASKRUN_FLAG });
  if (onEventLoop) return coop();
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
