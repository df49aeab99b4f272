/**
 * One ublk queue served by hand, for the conformance rules: the descriptor array mapped
 * read-only, a buffer per tag, FETCH_REQ / COMMIT_AND_FETCH_REQ / NEED_GET_DATA prepared with
 * prepIoCmd on a ring of its own, as liburing's test/uring_cmd_ublk.c does it. No part of our
 * queue engine runs here, so a rule that fails blames the kernel (or this page), not the engine.
 */
import { closeSync, openSync } from 'node:fs';
import {
  IoUring, Mapping, PAGE_SIZE, abi as uringAbi, libc, prepReadFixed, prepWriteFixed, registerBuffersSparse, setU64, setUserData,
} from '../../../src/uring/index.js';
import {
  UBLK_U_IO_COMMIT_AND_FETCH_REQ, UBLK_U_IO_FETCH_REQ, UBLK_U_IO_NEED_GET_DATA, UBLK_IO_RES_NEED_GET_DATA,
  autoBufRegAddr, descLength, descOffset,
} from '../../../src/ublk/abi.js';
import { prepIoCmd, readIoDesc, type IoDesc } from '../../../src/ublk/wire.js';
import type { UblkControl } from '../../../src/ublk/control.js';

/** The largest request a conformance device takes (its max_io_buf_bytes). */
export const MAX_IO = 64 * 1024;

/** user_data of SQEs other than tag commands start here (tags are below 4096). */
const OTHER = 0x10000;

/** A request as a descriptor showed it, with the queue and tag it came on. */
export interface Seen extends IoDesc { qid: number; tag: number }

/**
 * What to do with a request: a result to commit at once, or 'hold' (the rule commits it later
 * with {@link HandQueue.commit}). The default answers every request with its full length.
 */
export type Answer = (r: Seen, q: HandQueue) => number | 'hold';
export const fullLength = (r: Seen): number => r.nrSectors * 512;

export interface HandQueueOptions {
  qid?: number;
  /**
   * UBLK_F_USER_COPY or SUPPORT_ZERO_COPY: commands carry no buffer address (data moves by
   * pread/pwrite, or through buffers registered with REGISTER_IO_BUF).
   */
  userCopy?: boolean;
  /**
   * UBLK_F_AUTO_BUF_REG: each command's SQE carries a struct ublk_auto_buf_reg naming fixed
   * buffer `tag`, where the kernel registers the request's pages before the fetch completes.
   */
  autoBufReg?: boolean;
  /** A sparse table of `depth` fixed buffers in the ring, for the zero-copy modes. */
  fixedBuffers?: boolean;
  answer?: Answer;
}

/** Opens /dev/ublkcN. One open per device: the driver refuses a second with EBUSY. */
export function openChar(devId: number): number {
  return openSync(`/dev/ublkc${devId}`, 'r+');
}

export class HandQueue {
  readonly ring = new IoUring(64);
  readonly qid: number;
  readonly bufs: Mapping;
  private readonly descs: Mapping;
  private readonly userCopy: boolean;
  private readonly autoBufReg: boolean;
  /** Results of the other SQEs (fixed-buffer I/O, buffer commands), by their user_data. */
  readonly other = new Map<number, number>();
  private nextOther = OTHER;
  private readonly answer: Answer;
  /** Every command CQE reaped (tag, res), in order. */
  readonly results: Array<[tag: number, res: number]> = [];
  /** Every request fetched, in order. */
  readonly seen: Seen[] = [];
  /** Requests the answer held, by tag. */
  readonly held = new Map<number, Seen>();
  /** Tags whose command is in the kernel. */
  readonly armed = new Set<number>();
  /** How many WRITEs came with UBLK_IO_RES_NEED_GET_DATA. */
  needGetData = 0;

  constructor(readonly charFd: number, readonly depth: number, opts: HandQueueOptions = {}) {
    this.qid = opts.qid ?? 0;
    this.userCopy = opts.userCopy ?? false;
    this.autoBufReg = opts.autoBufReg ?? false;
    this.answer = opts.answer ?? fullLength;
    // Queue q's array sits at q times the stride of a UBLK_MAX_QUEUE_DEPTH array (descOffset).
    this.descs = Mapping.file(charFd, descLength(depth, PAGE_SIZE), descOffset(this.qid, PAGE_SIZE), libc.PROT_READ, false);
    this.bufs = Mapping.anonymous(depth * MAX_IO);
    if (opts.fixedBuffers || opts.autoBufReg) registerBuffersSparse(this.ring, depth);
  }

  bufAddr(tag: number): number {
    return this.bufs.address + tag * MAX_IO;
  }

  private cmd(op: number, tag: number, result: number, addr?: number): void {
    const w = this.ring.mustGetSqe();
    // With USER_COPY the kernel refuses a command that names a buffer (EINVAL).
    prepIoCmd(this.ring.sqes, w, op, this.charFd, false, this.qid, tag, result, addr ?? (this.userCopy || this.autoBufReg ? 0 : this.bufAddr(tag)));
    // AUTO_BUF_REG's struct ublk_auto_buf_reg goes in the SQE's own addr, not the command's
    // (ublk_sqe_addr_to_auto_buf_reg), which must stay 0 as in every copy-free mode.
    if (this.autoBufReg) setU64(this.ring.sqes, w + uringAbi.io_uring_sqe.addr / 4, autoBufRegAddr(tag));
    setUserData(this.ring.sqes, w, tag);
    this.armed.add(tag);
  }

  fetchAll(): void {
    for (let t = 0; t < this.depth; t++) this.cmd(UBLK_U_IO_FETCH_REQ, t, 0);
    this.ring.submit(0);
  }

  fetch(tag: number): void {
    this.cmd(UBLK_U_IO_FETCH_REQ, tag, 0);
    this.ring.submit(0);
  }

  /**
   * Completes a held request with `res` and fetches the tag's next one; the command names the
   * tag's buffer, or `addr`. Returns once io_uring_enter has issued it.
   */
  commit(tag: number, res: number, addr?: number): void {
    this.held.delete(tag);
    this.cmd(UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, res, addr);
    this.ring.submit(0);
  }

  /**
   * Queues an SQE that is not a tag's FETCH or COMMIT (prepared by `prep` in slot w); returns the
   * user_data under which {@link other} will hold its result.
   */
  submitOther(prep: (s: Uint32Array, w: number) => void): number {
    const w = this.ring.mustGetSqe();
    prep(this.ring.sqes, w);
    const ud = this.nextOther++;
    setUserData(this.ring.sqes, w, ud);
    this.pendingOther++;
    this.ring.submit(0);
    return ud;
  }

  private pendingOther = 0;

  /** REGISTER_IO_BUF or UNREGISTER_IO_BUF of tag's request pages as fixed buffer `tag`. */
  bufferCmd(op: number, tag: number): number {
    return this.submitOther((s, w) => prepIoCmd(s, w, op, this.charFd, false, this.qid, tag, 0, tag));
  }

  /** READ_FIXED (into fixed buffer `index`) or WRITE_FIXED (from it) of `len` bytes at file offset 0. */
  fixedIo(dir: 'read' | 'write', fd: number, index: number, len: number): number {
    return this.submitOther((s, w) => (dir === 'read' ? prepReadFixed : prepWriteFixed)(s, w, fd, 0, len, 0, index));
  }

  /** Waits up to `ms` for CQEs and handles each; returns how many came. */
  poll(ms: number): number {
    if (this.armed.size === 0 && this.pendingOther === 0) return 0;
    this.ring.submitAndWaitTimeout(1, ms);
    const n = this.ring.cqReady();
    for (let i = 0; i < n; i++) {
      const c = this.ring.cqeAt(i);
      const tag = this.ring.cqeUserData(c);
      const res = this.ring.cqeRes(c);
      if (tag >= OTHER) {
        this.other.set(tag, res);
        this.pendingOther--;
        continue;
      }
      this.results.push([tag, res]);
      this.armed.delete(tag);
      if (res === UBLK_IO_RES_NEED_GET_DATA) {
        // A WRITE whose data the kernel copies only once we name the buffer (UBLK_F_NEED_GET_DATA).
        this.needGetData++;
        this.cmd(UBLK_U_IO_NEED_GET_DATA, tag, 0);
        continue;
      }
      if (res !== 0) continue; // UBLK_IO_RES_ABORT or an error: the tag is not fetched again
      const r: Seen = { ...readIoDesc(this.descs.u32, tag, { op: 0, flags: 0, nrSectors: 0, startSector: 0, addr: 0 }), qid: this.qid, tag };
      this.seen.push(r);
      const a = this.answer(r, this);
      if (a === 'hold') this.held.set(tag, r);
      else this.cmd(UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, a);
    }
    this.ring.cqAdvance(n);
    this.ring.submit(0);
    return n;
  }

  /**
   * Only once no command of ours is in the kernel (STOP_DEV aborts them) may the buffers go: a
   * command still armed (a rule that failed half-way) names one, so they are left mapped until
   * the process, which runs this one rule, exits.
   */
  close(): void {
    const safe = this.armed.size === 0 && this.pendingOther === 0;
    this.ring.close();
    this.descs.unmap();
    if (safe) this.bufs.unmap();
  }
}

/**
 * Serves `queues` (each polled a few milliseconds in turn, the event loop run in between) until
 * `done()` holds; throws, with what the queues saw, after `limitMs`.
 */
export async function serveWhile(queues: HandQueue[], done: () => boolean, what: string, limitMs = 20_000): Promise<void> {
  const end = Date.now() + limitMs;
  while (!done()) {
    if (Date.now() > end) {
      const saw = queues.map((q) => `queue ${q.qid}: CQEs (tag, res) ${JSON.stringify(q.results)}, armed ${[...q.armed].join(',') || 'none'}`).join('; ');
      const e = new Error(`${what} did not happen within ${limitMs / 1000} s; ${saw}`);
      // The cleanup after a failed rule may hang in the kernel (it is the kernel under test):
      // say what failed first.
      process.stderr.write(`conformance: ${e.message}\n`);
      throw e;
    }
    for (const q of queues) q.poll(queues.length > 1 ? 2 : 5);
    await new Promise((r) => setTimeout(r, 1));
  }
}

/** Serves `queues` until `p` settles, then returns its outcome (throws as serveWhile does). */
export async function serveUntil<T>(queues: HandQueue[], p: Promise<T>, what: string, limitMs = 20_000): Promise<T> {
  let settled = false;
  p.then(() => { settled = true; }, () => { settled = true; });
  await serveWhile(queues, () => settled, what, limitMs);
  return p;
}

/**
 * STOP_DEV while still serving: since 7.x the partition scan runs in a work item after START_DEV
 * has returned, and STOP_DEV (del_gendisk) waits for the disk's lock that scan holds, so a stop
 * from a thread that has stopped serving waits forever for a READ only it could answer. Then
 * reaps every aborted command, after which the queues' memory may go.
 */
export async function stopServing(ctrl: UblkControl, devId: number, queues: HandQueue[]): Promise<void> {
  await serveUntil(queues, ctrl.stopDevAsync(devId), 'STOP_DEV');
  await serveWhile(queues, () => queues.every((q) => q.armed.size === 0), 'every command aborted after STOP_DEV', 10_000);
}

/** Serves `queues` until the other SQE `ud` of `q` completes; returns its result. */
export async function otherResult(queues: HandQueue[], q: HandQueue, ud: number, what: string): Promise<number> {
  await serveWhile(queues, () => q.other.has(ud), what);
  return q.other.get(ud)!;
}

export function closeAll(queues: HandQueue[], charFd: number): void {
  for (const q of queues) q.close();
  closeSync(charFd);
}
