/**
 * Batch I/O (UBLK_F_BATCH_IO, 7.0): a queue's requests travel in groups instead of one command
 * per tag. What changes against the per-tag protocol (queue.ts), from ublk_drv.c's
 * ublk_ch_batch_io_uring_cmd:
 *
 * - PREP_IO_CMDS, once per queue before START_DEV: one command whose elements (struct
 *   ublk_elem_header {tag, buf_index, result}, then the tag's buffer address in copy mode) hand
 *   every tag to the server, where FETCH_REQ took one tag each. All or nothing: a refused element
 *   undoes the ones before it.
 * - FETCH_IO_CMDS, multishot (IORING_URING_CMD_MULTISHOT): one command that posts a CQE whenever
 *   requests arrive, its result the number of bytes of u16 tags the kernel wrote into a buffer
 *   of a provided-buffer group (src/uring/buf-ring.ts). The kernel keeps a list of such commands
 *   per queue and fills one at a time; we keep two, each with its own group, as ublksrv does, so
 *   one re-arming never leaves the queue without a fetch. The groups consume their buffer
 *   incrementally (IOU_PBUF_RING_INC): consecutive CQEs' tags lie one after the other, and only
 *   a CQE without IORING_CQE_F_BUF_MORE has used the buffer up, after which we hand it back
 *   before the kernel would end the command with ENOBUFS.
 * - COMMIT_IO_CMDS: the answers gathered since the last io_uring_enter, in one command; its
 *   result is the bytes of elements the kernel took, all of them unless one was refused (which
 *   ends the walk: the ones after it are sent again).
 *
 * NEED_GET_DATA does not exist here (the kernel clears it), and the per-I/O task rule is gone:
 * any task may commit any tag of the queue (the kernel clears PER_IO_DAEMON).
 *
 * This module owns the element and tag buffers and the wire format; the queue decides when to
 * send. The buffers live in memory the queue gives it (the tail of its tag-buffer mapping), which
 * is unmapped only after the queue's thread exited, like the tag buffers themselves: the kernel
 * writes fetched tags into it from task work of that thread.
 */
import { BufRing, IoUring, Mapping, PAGE_SIZE, libc, abi as uringAbi, setU64, setUserData2 } from '../uring/index.js';
import {
  UBLK_U_IO_PREP_IO_CMDS, UBLK_U_IO_COMMIT_IO_CMDS, UBLK_BATCH_F_HAS_BUF_ADDR, UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK,
  ublk_elem_header,
} from './abi.js';
import { prepBatchCmd, prepBatchFetch } from './wire.js';

/** Fetch commands (and provided-buffer groups) per queue. */
export const BATCH_FETCHES = 2;
/** Commit buffers per queue: one being filled, the others with a COMMIT_IO_CMDS in flight. */
const COMMIT_BUFS = 4;

export interface BatchLayout {
  /** Bytes per element: 8 (the header), 16 with the buffer address (copy mode). */
  elemBytes: number;
  /** Bytes of one commit buffer (depth elements, page-aligned). */
  commitBytes: number;
  /** Bytes of one fetch buffer (depth u16 tags, page-aligned). */
  fetchBytes: number;
  /** Everything: COMMIT_BUFS commit buffers, then BATCH_FETCHES fetch buffers. */
  total: number;
}

const pageUp = (n: number) => Math.ceil(n / PAGE_SIZE) * PAGE_SIZE;

/** How much memory a batch queue of `depth` tags needs (`withAddr`: copy mode's 16-byte elements). */
export function batchLayout(depth: number, withAddr: boolean): BatchLayout {
  const elemBytes = ublk_elem_header.SIZE + (withAddr ? 8 : 0);
  const commitBytes = pageUp(depth * elemBytes);
  const fetchBytes = pageUp(depth * 2);
  return { elemBytes, commitBytes, fetchBytes, total: COMMIT_BUFS * commitBytes + BATCH_FETCHES * fetchBytes };
}

export interface BatchOptions {
  ring: IoUring;
  qid: number;
  depth: number;
  /** The char device's slot in the ring's file table. */
  charDevSlot: number;
  /** Memory of batchLayout(depth, withAddr).total bytes, page-aligned. */
  mem: Mapping;
  /** Copy mode: every element carries the tag's buffer address (UBLK_BATCH_F_HAS_BUF_ADDR). */
  bufferAddress?: (tag: number) => number;
  /** AUTO_BUF_REG: the fixed-buffer slot for each tag, and whether to ask for the fallback. */
  autoRegIndex?: (tag: number) => number;
  autoRegFallback?: boolean;
  /** user_data kinds of the three commands (lo: the commit buffer or the fetch group). */
  kinds: { prep: number; commit: number; fetch: number };
}

export class BatchCommands {
  private readonly o: BatchOptions;
  private readonly layout: BatchLayout;
  /** UBLK_BATCH_F_* of PREP and COMMIT. */
  private readonly flags: number;
  private readonly view: DataView;
  /** The same memory as u32 words, for the 64-bit buffer address (setU64: no BigInt per element). */
  private readonly words: Uint32Array;
  private readonly groups: BufRing[] = [];
  private readonly tags16: Uint16Array;
  /** Per fetch group: bytes of its buffer already read (the kernel fills it incrementally). */
  private readonly fetchOffset = new Uint32Array(BATCH_FETCHES);
  /** Per fetch group: its buffer is in the ring (not yet used up by the kernel). */
  private readonly inRing = new Uint8Array(BATCH_FETCHES);
  /** Fetch commands armed and not ended. */
  fetching = 0;

  /** Commit buffers: the one being filled, and which have a command in flight. */
  private current = 0;
  private readonly busy = new Uint8Array(COMMIT_BUFS);
  private readonly count = new Uint32Array(COMMIT_BUFS);
  /** COMMIT_IO_CMDS in flight. */
  inFlight = 0;

  constructor(o: BatchOptions) {
    this.o = o;
    this.layout = batchLayout(o.depth, o.bufferAddress !== undefined);
    if (o.mem.length < this.layout.total) throw new RangeError(`batch memory: ${o.mem.length} bytes, ${this.layout.total} needed`);
    this.flags = (o.bufferAddress ? UBLK_BATCH_F_HAS_BUF_ADDR : 0) | (o.autoRegFallback ? UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK : 0);
    this.view = o.mem.view;
    this.words = o.mem.u32;
    this.tags16 = new Uint16Array(o.mem.buffer, this.fetchBase(0), (BATCH_FETCHES * this.layout.fetchBytes) / 2);
    try {
      for (let g = 0; g < BATCH_FETCHES; g++) this.groups.push(new BufRing(o.ring, g, 1, uringAbi.IOU_PBUF_RING_INC));
    } catch (e) {
      this.free();
      throw e;
    }
  }

  private commitBase(i: number): number {
    return i * this.layout.commitBytes;
  }

  private fetchBase(g: number): number {
    return COMMIT_BUFS * this.layout.commitBytes + g * this.layout.fetchBytes;
  }

  /** Answers waiting for the next flush. */
  get pending(): number {
    return this.count[this.current]!;
  }

  /** Writes element `i` of commit buffer `b`. */
  private putElem(b: number, i: number, tag: number, result: number): void {
    const at = this.commitBase(b) + i * this.layout.elemBytes;
    const v = this.view;
    v.setUint16(at + ublk_elem_header.tag, tag, true);
    v.setUint16(at + ublk_elem_header.buf_index, this.o.autoRegIndex ? this.o.autoRegIndex(tag) : 0, true);
    v.setInt32(at + ublk_elem_header.result, result, true);
    if (this.o.bufferAddress) setU64(this.words, (at + ublk_elem_header.SIZE) / 4, this.o.bufferAddress(tag));
  }

  /**
   * PREP_IO_CMDS for `tags` in SQE `w` (commit buffer 0, free until its CQE: the queue waits for
   * it before anything else is committed).
   */
  prepPrep(w: number, tags: Int32Array): void {
    if (tags.length > 0xffff) throw new RangeError(`${tags.length} tags in one PREP_IO_CMDS`);
    tags.forEach((tag, i) => this.putElem(0, i, tag, 0));
    const o = this.o;
    prepBatchCmd(o.ring.sqes, w, UBLK_U_IO_PREP_IO_CMDS, o.charDevSlot, o.qid, this.flags, tags.length, this.layout.elemBytes, o.mem.address);
    setUserData2(o.ring.sqes, w, 0, o.kinds.prep);
  }

  /**
   * FETCH_IO_CMDS on group `g` in SQE `w`. Its buffer goes back to the kernel first if it was used
   * up; one the ended command left partly filled stays where it is, and the next command goes on
   * filling it after the tags already read.
   */
  prepFetch(w: number, g: number): void {
    if (!this.inRing[g]) this.giveBack(g);
    const o = this.o;
    prepBatchFetch(o.ring.sqes, w, o.charDevSlot, o.qid, this.layout.fetchBytes / 2, g);
    setUserData2(o.ring.sqes, w, g, o.kinds.fetch);
    this.fetching++;
  }

  /** Puts group g's buffer back in its ring, to be filled from the start. */
  private giveBack(g: number): void {
    this.fetchOffset[g] = 0;
    this.inRing[g] = 1;
    const br = this.groups[g]!;
    br.add(this.o.mem.address + this.fetchBase(g), this.layout.fetchBytes, 0);
    br.advance(1);
  }

  /**
   * A fetch CQE with res >= 0: calls `onTag` for each tag it delivered, and hands the buffer back
   * once the kernel has used it up. Returns whether the command is still armed (IORING_CQE_F_MORE);
   * if not, the queue re-arms it with prepFetch.
   */
  fetched(g: number, res: number, flags: number, onTag: (tag: number) => void): boolean {
    const first = (this.fetchBase(g) - this.fetchBase(0) + this.fetchOffset[g]!) / 2;
    this.fetchOffset[g]! += res;
    const t = this.tags16;
    for (let i = first, end = first + res / 2; i < end; i++) onTag(t[i]!);
    // A buffer the CQE says is used up (F_BUFFER without BUF_MORE) has left the ring: it goes
    // back at once, before the kernel would end the command with ENOBUFS for want of one.
    if ((flags & uringAbi.IORING_CQE_F_BUFFER) && !(flags & uringAbi.IORING_CQE_F_BUF_MORE)) this.inRing[g] = 0;
    const more = (flags & uringAbi.IORING_CQE_F_MORE) !== 0;
    if (!more) this.fetching--;
    else if (!this.inRing[g]) this.giveBack(g);
    return more;
  }

  /** A fetch CQE with an error: the command ended (ENOBUFS: its buffer was used up). */
  fetchEnded(g: number, res: number): void {
    this.fetching--;
    if (res === -libc.ENOBUFS) this.inRing[g] = 0;
  }

  /** Queues tag's answer for the next COMMIT_IO_CMDS. */
  add(tag: number, result: number): void {
    const b = this.current;
    this.putElem(b, this.count[b]!, tag, result);
    this.count[b]!++;
  }

  /** The buffer that gathers answers after the current one is sent, or -1 if all are in flight. */
  private nextFree(): number {
    for (let i = 1; i < COMMIT_BUFS; i++) {
      const c = (this.current + i) % COMMIT_BUFS;
      if (!this.busy[c]) return c;
    }
    return -1;
  }

  /**
   * Answers are waiting, and another commit buffer is free to gather the next ones while they
   * travel (otherwise they wait for a COMMIT_IO_CMDS in flight to complete).
   */
  get canFlush(): boolean {
    return this.count[this.current]! > 0 && this.nextFree() >= 0;
  }

  /** COMMIT_IO_CMDS of the answers gathered so far, in SQE `w` (only when canFlush). */
  flush(w: number): void {
    const b = this.current;
    const n = this.count[b]!;
    const next = this.nextFree();
    if (n === 0 || next < 0) throw new Error('flush() without canFlush');
    const o = this.o;
    prepBatchCmd(o.ring.sqes, w, UBLK_U_IO_COMMIT_IO_CMDS, o.charDevSlot, o.qid, this.flags, n, this.layout.elemBytes, o.mem.address + this.commitBase(b));
    setUserData2(o.ring.sqes, w, b, o.kinds.commit);
    this.busy[b] = 1;
    this.inFlight++;
    this.current = next;
    this.count[next] = 0;
  }

  /**
   * A COMMIT_IO_CMDS CQE for commit buffer `b`: frees the buffer. If the kernel stopped short (a
   * refused element ends its walk: res is the bytes before it, or the error if it was the first),
   * the elements after the refused one are queued again, and the refused tag is returned with the
   * error (0 when the kernel did not say); undefined if it took them all.
   */
  committed(b: number, res: number): { refusedTag: number; error: number } | undefined {
    this.busy[b] = 0;
    this.inFlight--;
    const n = this.count[b]!;
    const taken = res < 0 ? 0 : res / this.layout.elemBytes;
    if (res >= 0 && taken === n) return undefined;
    const at = this.commitBase(b) + taken * this.layout.elemBytes;
    const refusedTag = this.view.getUint16(at + ublk_elem_header.tag, true);
    // The elements after the refused one were never looked at: send them again.
    for (let i = taken + 1; i < n; i++) {
      const e = this.commitBase(b) + i * this.layout.elemBytes;
      this.add(this.view.getUint16(e + ublk_elem_header.tag, true), this.view.getInt32(e + ublk_elem_header.result, true));
    }
    return { refusedTag, error: res < 0 ? res : 0 };
  }

  /** Unregisters the provided-buffer groups (the memory is the queue's). */
  free(): void {
    for (const br of this.groups) {
      try {
        br.free();
      } catch {
        // The ring is going away with it.
      }
    }
    this.groups.length = 0;
  }
}
