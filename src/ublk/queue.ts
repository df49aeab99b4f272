/**
 * One ublk hardware queue, served by the thread that calls {@link runQueue} (a worker thread per
 * queue, see queue-worker.ts). The protocol, as `drivers/block/ublk_drv.c` wants it:
 *
 * 1. Open `/dev/ublkcN` and mmap this queue's descriptor array read-only: one 24-byte
 *    `struct ublksrv_io_desc` per tag, at offset qid * round_up(4096 * 24, PAGE_SIZE). The
 *    stride uses the maximum depth (UBLK_MAX_QUEUE_DEPTH), not the device's: using the real
 *    depth is the classic multi-queue corruption bug.
 * 2. For every tag, a URING_CMD UBLK_U_IO_FETCH_REQ carrying `struct ublksrv_io_cmd` {q_id,
 *    tag, result, addr = this tag's I/O buffer}. The kernel completes it when a request for that
 *    tag arrives; START_DEV (on the main thread) waits until all of them are in.
 * 3. A completed FETCH means "request pending": read the descriptor, serve it, and answer with
 *    UBLK_U_IO_COMMIT_AND_FETCH_REQ {result}, which both completes the request and re-arms the
 *    tag. Many commits and target I/Os go in one io_uring_enter.
 * 4. A command completing with UBLK_IO_RES_ABORT (-ENODEV) means the device is stopping (STOP_DEV,
 *    or the disk went away): that tag is finished. When every tag is finished and no target I/O
 *    is in flight, the queue closes its ring, unmaps and closes the char device, so DEL_DEV
 *    (which waits for the last reference) can complete.
 *
 * Commands for a tag must come from the task that fetched it (the kernel checks; per queue
 * before 6.16's PER_IO_DAEMON), which is why one thread owns the whole queue.
 *
 * Data path modes. This file implements the default copy mode: the kernel copies WRITE data into
 * our buffer before the FETCH completes, and copies READ data out of it at COMMIT. The newer
 * modes plug in at the marked places:
 *   - NEED_GET_DATA (UBLK_F_NEED_GET_DATA): a FETCH completes with UBLK_IO_RES_NEED_GET_DATA for a
 *     WRITE; answer with UBLK_U_IO_NEED_GET_DATA {addr} to get the data copied ([NEED_GET_DATA]).
 *   - USER_COPY (UBLK_F_USER_COPY, 6.5): no addr in the commands; the handler pread/pwrites the
 *     char device at userCopyOffset(qid, tag, off) ([BUFFER]).
 *   - Zero copy (SUPPORT_ZERO_COPY 6.15, AUTO_BUF_REG 6.16): the request's pages are registered as
 *     a fixed buffer (REGISTER_IO_BUF, or automatically into sqe->addr's index), and target
 *     SQEs use READ_FIXED/WRITE_FIXED with that index ([BUFFER], [COMMIT]).
 *   - BATCH_IO (7.0): PREP/COMMIT/FETCH_IO_CMDS move many tags per command ([FETCH], [COMMIT]).
 *   - PER_IO_DAEMON (6.16): tags may be served by different threads ([THREADING]).
 */
import {
  IoUring, Mapping, SysError, abi as ua, prepUringCmd, prepPollMultishot, setFlags, setUserData2, sys,
} from '../uring/index.js';
import {
  UBLK_U_IO_FETCH_REQ, UBLK_U_IO_COMMIT_AND_FETCH_REQ, UBLK_U_IO_NEED_GET_DATA, UBLK_IO_RES_OK,
  UBLK_IO_RES_NEED_GET_DATA, UBLK_IO_RES_ABORT, ublksrv_io_cmd, ublksrv_io_desc, descOffset,
  descLength,
} from './abi.js';
import type { IoRequest, QueueContext, QueueHandler } from './target.js';

/** user_data high word: what a CQE belongs to. The low word is the tag or the slot. */
const KIND_CMD = 0; // a ublk FETCH/COMMIT_AND_FETCH for tag = lo
const KIND_TARGET = 1; // a target SQE, callback slot = lo
const KIND_WAKE = 2; // the wake eventfd's multishot poll

/** Size of the ring's registered file table: slot 0 is /dev/ublkcN, the rest are the target's. */
const FILE_SLOTS = 16;

export interface QueueOptions {
  devId: number;
  /**
   * The open `/dev/ublkcN`. The driver allows one open at a time (a second open is EBUSY), so
   * the server opens it once and every queue thread uses the same descriptor; it is closed
   * after the last queue is done, before DEL_DEV.
   */
  charFd: number;
  qid: number;
  depth: number;
  /** Bytes per tag buffer (the device's max_io_buf_bytes). */
  maxIoBufBytes: number;
  /** UBLK_F_* negotiated for the device. */
  flags: number;
  handler: QueueHandler;
  /**
   * An eventfd the owner writes to wake this queue out of io_uring_enter (to stop it, or to
   * deliver async completions): polled with a multishot POLL_ADD on the queue's ring.
   */
  wakeFd?: number;
  /** Called when every tag has its FETCH outstanding (the owner may then START_DEV). */
  onFetched?: () => void;
  /** Called after each wake-up; returns true to stop the queue (closing the ring cancels the commands). */
  onWake?: (q: Queue) => boolean;
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

  constructor(readonly tag: number, readonly address: number, private readonly whole: Buffer) {}

  get buffer(): Buffer {
    const n = Math.min(this.length, this.whole.length);
    if (this.sized?.length !== n) this.sized = this.whole.subarray(0, n);
    return this.sized;
  }
}

const enum TagState {
  /** FETCH or COMMIT_AND_FETCH outstanding in the kernel. */
  InKernel,
  /** A request is being served by the target. */
  Serving,
  /** Aborted: the device is going away. */
  Done,
}

export class Queue implements QueueContext {
  readonly ring: IoUring;
  readonly qid: number;
  readonly depth: number;
  private readonly charFd: number;
  private readonly descs: Mapping;
  private readonly desc32: Uint32Array;
  private readonly bufs: Mapping;
  private readonly bufSize: number;
  private readonly handler: QueueHandler;
  private readonly state: Uint8Array;
  private readonly views: Buffer[] = [];
  /** One request object per tag, refilled for each request the tag carries. */
  private readonly requests: TagRequest[] = [];
  private doneTags = 0;
  /** Target CQE callbacks by slot; free slots are chained through `freeSlots`. */
  private readonly callbacks: Array<((res: number, flags: number) => void) | undefined> = [];
  private readonly freeSlots: number[] = [];
  private targetInFlight = 0;
  private stopping = false;
  private readonly opts: QueueOptions;
  /** 8 bytes for draining the wake eventfd. */
  private readonly scratch = Mapping.anonymous(8);
  private nextFileSlot = 1;
  /** Requests served since start (for stats and tests). */
  served = 0;

  constructor(opts: QueueOptions) {
    this.opts = opts;
    this.qid = opts.qid;
    this.depth = opts.depth;
    this.handler = opts.handler;
    this.bufSize = opts.maxIoBufBytes;
    this.state = new Uint8Array(opts.depth);
    this.charFd = opts.charFd;
    const cleanup: Array<() => void> = [];
    try {
      // [BUFFER] copy mode: one buffer per tag, lazily backed (pages appear when first touched).
      this.descs = Mapping.file(this.charFd, descLength(opts.depth), descOffset(opts.qid), ua.PROT_READ, false);
      cleanup.push(() => this.descs.unmap());
      this.desc32 = this.descs.u32;
      this.bufs = Mapping.anonymous(opts.depth * opts.maxIoBufBytes);
      cleanup.push(() => this.bufs.unmap());
      // Room for a command per tag plus target I/O; the CQ gets twice that.
      let entries = 1;
      while (entries < opts.depth * 2) entries <<= 1;
      this.ring = openQueueRing(Math.min(entries, 4096));
      cleanup.push(() => this.ring.close());
      // The char device as fixed file 0: saves an fget per command (ublksrv does the same). The
      // other slots start empty, for the target's own files (registerFile).
      this.ring.registerFiles([this.charFd, ...new Array<number>(FILE_SLOTS - 1).fill(-1)]);
    } catch (e) {
      for (const f of cleanup.reverse()) f();
      throw e;
    }
  }

  /** Address of tag 0's I/O buffer; tag t's is at `bufferBase + t * maxIoBufBytes`. */
  get bufferBase(): number {
    return this.bufs.address;
  }

  /** The zero-copy Buffer over tag `tag`'s I/O buffer (made once, reused). */
  private view(tag: number): Buffer {
    return (this.views[tag] ??= this.bufs.bytes(tag * this.bufSize, this.bufSize));
  }

  /** Queues a FETCH_REQ or COMMIT_AND_FETCH_REQ for `tag`. */
  private queueCmd(op: number, tag: number, result: number): void {
    const w = this.getSqe();
    const s = this.ring.sqes;
    prepUringCmd(s, w, op, 0, this.ring.cmdWords);
    setFlags(s, w, ua.IOSQE_FIXED_FILE);
    const c = w + 12; // struct ublksrv_io_cmd at sqe->cmd
    s[c + (ublksrv_io_cmd.q_id >> 2)] = this.qid | (tag << 16); // q_id (u16), tag (u16)
    s[c + (ublksrv_io_cmd.result >> 2)] = result;
    // [BUFFER] copy mode passes the tag's buffer; USER_COPY and zero copy pass 0 here.
    const addr = this.bufs.address + tag * this.bufSize;
    s[c + (ublksrv_io_cmd.addr >> 2)] = addr >>> 0;
    s[c + (ublksrv_io_cmd.addr >> 2) + 1] = Math.floor(addr / 2 ** 32);
    setUserData2(s, w, tag, KIND_CMD);
    this.state[tag] = TagState.InKernel;
  }

  /** An SQE slot, submitting what is queued if the SQ is full. */
  getSqe(): number {
    let w = this.ring.getSqe();
    while (w < 0) {
      this.ring.submit();
      w = this.ring.getSqe();
    }
    return w;
  }

  track(w: number, onCqe: (res: number, flags: number) => void): void {
    const slot = this.freeSlots.pop() ?? this.callbacks.length;
    this.callbacks[slot] = onCqe;
    this.targetInFlight++;
    setUserData2(this.ring.sqes, w, slot, KIND_TARGET);
  }

  registerFile(fd: number): number {
    if (this.nextFileSlot >= FILE_SLOTS) throw new Error(`queue ${this.qid}: all ${FILE_SLOTS - 1} target file slots are taken`);
    const slot = this.nextFileSlot++;
    this.ring.updateFiles(slot, [fd]);
    return slot;
  }

  complete(tag: number, result: number): void {
    if (this.state[tag] !== TagState.Serving) throw new Error(`queue ${this.qid}: tag ${tag} completed twice or never fetched`);
    // [COMMIT] BATCH_IO would gather these into one COMMIT_IO_CMDS.
    this.queueCmd(UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, result);
    this.served++;
  }

  /** Reads tag's descriptor and hands the request to the target. */
  private dispatch(tag: number): void {
    this.state[tag] = TagState.Serving;
    const d = this.desc32;
    const i = tag * (ublksrv_io_desc.SIZE >> 2);
    const opFlags = d[i + (ublksrv_io_desc.op_flags >> 2)]!;
    const sectors = d[i + (ublksrv_io_desc.nr_sectors >> 2)]!;
    const start = d[i + (ublksrv_io_desc.start_sector >> 2)]! + d[i + (ublksrv_io_desc.start_sector >> 2) + 1]! * 2 ** 32;
    const req = (this.requests[tag] ??= new TagRequest(tag, this.bufs.address + tag * this.bufSize, this.view(tag)));
    req.op = opFlags & 0xff;
    req.flags = opFlags & ~0xff;
    req.offset = start * 512;
    req.length = sectors * 512;
    let result: number | undefined;
    try {
      result = this.handler.handle(req, this);
    } catch (e) {
      process.stderr.write(`ublk queue ${this.qid}: target threw on tag ${tag}: ${(e as Error).stack ?? e}\n`);
      result = -5; // EIO
    }
    if (result !== undefined) this.complete(tag, result);
  }

  /**
   * Serves until the device stops. Returns the number of requests served.
   * [FETCH] BATCH_IO's PREP_IO_CMDS/FETCH_IO_CMDS would replace the per-tag loop below.
   */
  run(): number {
    const ring = this.ring;
    this.handler.start?.(this);
    for (let tag = 0; tag < this.depth; tag++) this.queueCmd(UBLK_U_IO_FETCH_REQ, tag, -1);
    if (this.opts.wakeFd !== undefined) {
      const w = this.getSqe();
      prepPollMultishot(ring.sqes, w, this.opts.wakeFd, ua.POLLIN);
      setUserData2(ring.sqes, w, 0, KIND_WAKE);
    }
    ring.submit();
    this.opts.onFetched?.();

    const cq = ring.cq;
    while (this.doneTags < this.depth || this.targetInFlight > 0) {
      if (this.stopping) break;
      ring.submit(1);
      const ready = ring.cqReady();
      for (let i = 0; i < ready; i++) {
        const c = ring.cqeAt(i);
        const lo = cq[c]!;
        const kind = cq[c + 1]!;
        const res = cq[c + 2]! | 0;
        if (kind === KIND_CMD) {
          if (res === UBLK_IO_RES_OK) {
            this.dispatch(lo);
          } else if (res === UBLK_IO_RES_ABORT) {
            if (this.state[lo] !== TagState.Done) {
              this.state[lo] = TagState.Done;
              this.doneTags++;
            }
          } else if (res === UBLK_IO_RES_NEED_GET_DATA) {
            // [NEED_GET_DATA] not requested by this engine's devices; answered for completeness.
            this.queueCmd(UBLK_U_IO_NEED_GET_DATA, lo, 0);
          } else {
            // A command the kernel refused (e.g. -EINVAL): the tag cannot be re-armed.
            process.stderr.write(`ublk queue ${this.qid}: command for tag ${lo} failed: ${res}\n`);
            this.state[lo] = TagState.Done;
            this.doneTags++;
          }
        } else if (kind === KIND_TARGET) {
          const cb = this.callbacks[lo]!;
          this.callbacks[lo] = undefined;
          this.freeSlots.push(lo);
          this.targetInFlight--;
          cb(res, cq[c + 3]!);
        } else if (kind === KIND_WAKE) {
          try {
            sys.read(this.opts.wakeFd!, this.scratch.address, 8);
          } catch {
            // EAGAIN: another CQE of this multishot poll already drained it.
          }
          this.handler.onWake?.(this);
          if (this.opts.onWake?.(this)) this.stopping = true;
        }
      }
      ring.cqAdvance(ready);
      this.handler.afterBatch?.(this);
    }
    return this.served;
  }

  /**
   * Releases the queue's references to the char device (its mmap, the ring's registered file);
   * the server closes the fd itself, and then DEL_DEV can finish.
   */
  close(): void {
    try {
      this.handler.close?.();
    } finally {
      this.ring.close();
      this.scratch.unmap();
      this.bufs.unmap();
      this.descs.unmap();
    }
  }
}

/**
 * The queue's ring: SINGLE_ISSUER|DEFER_TASKRUN where the kernel has them (6.1), so ublk's
 * command completions (task work) run only when we enter to wait, batched; COOP_TASKRUN before.
 */
function openQueueRing(entries: number): IoUring {
  try {
    return new IoUring(entries, { flags: ua.IORING_SETUP_SINGLE_ISSUER | ua.IORING_SETUP_DEFER_TASKRUN });
  } catch (e) {
    if (!(e instanceof SysError && e.code === 'EINVAL')) throw e;
    return new IoUring(entries, { flags: ua.IORING_SETUP_COOP_TASKRUN });
  }
}
