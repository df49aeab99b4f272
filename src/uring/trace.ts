/**
 * A live trace of a ring: every SQE as it is published and every CQE as it is consumed,
 * decoded into one line each. It is how a reader watches the protocol happen, and how a
 * developer sees what a server really asked of the kernel.
 *
 * The ring calls its {@link RingTracer} (IoUring.tracer) from the two places where entries change
 * hands: `flushSq`, just before the SQ tail that publishes [from, to) moves (the entries are still
 * ours to read), and `cqAdvance`/`copyCqes`, just before the CQ head that gives [head, head + n)
 * back moves (the kernel cannot overwrite them until then). With no tracer set, each of those
 * costs one comparison. This module knows nothing of ublk: a layer above decodes its own
 * URING_CMDs and its own user_data through {@link TraceDecoder}.
 */
import { errnoName } from '../libc/index.js';
import { getU64 } from './prep.js';
import {
  IORING_OP_NAMES, IORING_OP_URING_CMD, IOSQE_FIXED_FILE, IOSQE_IO_DRAIN, IOSQE_IO_LINK, IOSQE_IO_HARDLINK,
  IOSQE_ASYNC, IOSQE_BUFFER_SELECT, IOSQE_CQE_SKIP_SUCCESS, IORING_CQE_F_BUFFER, IORING_CQE_F_MORE,
  IORING_CQE_F_SOCK_NONEMPTY, IORING_CQE_F_NOTIF, IORING_CQE_F_BUF_MORE, io_uring_sqe,
} from './abi.js';

/** What a ring calls while a trace is on (IoUring.tracer). */
export interface RingTracer {
  /**
   * SQEs with SQ indices [from, to) (free-running, mod 2^32) are about to be published. `sqes`
   * and the word index of entry i, `(i & mask) << shift`, are the ring's.
   */
  submitted(sqes: Uint32Array, from: number, to: number, mask: number, shift: number): void;
  /** `n` CQEs starting at CQ index `head` are about to be handed back; `at(i)` is the word index of the i-th. */
  completed(cq: Uint32Array, n: number, at: (i: number) => number): void;
}

/** How a layer above the ring names what only it understands. Each may return undefined: the generic text is used. */
export interface TraceDecoder {
  /** A URING_CMD's command (its cmd_op and the bytes from word `w + 12`, io_uring_sqe.cmd). */
  uringCmd?(sqes: Uint32Array, w: number, cmdOp: number): string | undefined;
  /** The owner's meaning of a user_data (64 bits as two words). */
  userData?(lo: number, hi: number): string | undefined;
  /** More about a completion than its result: the request a fetch brought, say. */
  completion?(lo: number, hi: number, res: number, flags: number): string | undefined;
}

const SQE_FLAGS: Array<[number, string]> = [
  [IOSQE_FIXED_FILE, 'FIXED_FILE'], [IOSQE_IO_DRAIN, 'IO_DRAIN'], [IOSQE_IO_LINK, 'IO_LINK'],
  [IOSQE_IO_HARDLINK, 'IO_HARDLINK'], [IOSQE_ASYNC, 'ASYNC'], [IOSQE_BUFFER_SELECT, 'BUFFER_SELECT'],
  [IOSQE_CQE_SKIP_SUCCESS, 'CQE_SKIP_SUCCESS'],
];
const CQE_FLAGS: Array<[number, string]> = [
  [IORING_CQE_F_BUFFER, 'F_BUFFER'], [IORING_CQE_F_MORE, 'F_MORE'], [IORING_CQE_F_SOCK_NONEMPTY, 'F_SOCK_NONEMPTY'],
  [IORING_CQE_F_NOTIF, 'F_NOTIF'], [IORING_CQE_F_BUF_MORE, 'F_BUF_MORE'],
];

/** Names the bits of `flags` from `table` joined by `|`, unknown bits as hex; '' for none. */
export function flagText(flags: number, table: ReadonlyArray<readonly [number, string]>): string {
  const names: string[] = [];
  let rest = flags >>> 0;
  for (const [bit, name] of table) {
    if (rest & bit) {
      names.push(name);
      rest = (rest & ~bit) >>> 0;
    }
  }
  if (rest !== 0) names.push(`0x${rest.toString(16)}`);
  return names.join('|');
}

/** The name of an IORING_OP_* value (`OP_87` for one newer than this module). */
export function opcodeName(op: number): string {
  return IORING_OP_NAMES[op] ?? `OP_${op}`;
}

/** A CQE's result: bytes or a count as a number, a failure as its errno name (`-EAGAIN`). */
export function resultText(res: number): string {
  return res < 0 ? `-${errnoName(-res)}` : String(res);
}

const hex = (n: number) => `0x${n.toString(16)}`;

/**
 * One SQE as text: opcode, flags, fd, and the fields the opcode uses, then its user_data. A
 * URING_CMD's command is the decoder's to name. Mirrors the fields of `struct io_uring_sqe`.
 */
export function describeSqe(sqes: Uint32Array, w: number, decoder: TraceDecoder = {}): string {
  const b0 = sqes[w]!;
  const op = b0 & 0xff;
  const flags = (b0 >>> 8) & 0xff;
  const ioprio = b0 >>> 16;
  const fd = sqes[w + io_uring_sqe.fd / 4]! | 0;
  const off = getU64(sqes, w + io_uring_sqe.off / 4);
  const addr = getU64(sqes, w + io_uring_sqe.addr / 4);
  const len = sqes[w + io_uring_sqe.len / 4]!;
  const opFlags = sqes[w + io_uring_sqe.rw_flags / 4]!;
  const lo = sqes[w + io_uring_sqe.user_data / 4]!;
  const hi = sqes[w + io_uring_sqe.user_data / 4 + 1]!;
  const parts = [opcodeName(op)];
  const f = flagText(flags, SQE_FLAGS);
  if (f) parts.push(`flags=${f}`);
  parts.push(`fd=${fd}`);
  if (op === IORING_OP_URING_CMD) {
    const cmdOp = sqes[w + io_uring_sqe.cmd_op / 4]!;
    parts.push(decoder.uringCmd?.(sqes, w, cmdOp) ?? `cmd_op=${hex(cmdOp)}`);
    if (opFlags) parts.push(`uring_cmd_flags=${hex(opFlags)}`);
  } else {
    if (off) parts.push(`off=${off}`);
    if (addr) parts.push(`addr=${hex(addr)}`);
    if (len) parts.push(`len=${len}`);
    if (opFlags) parts.push(`op_flags=${hex(opFlags)}`);
    if (ioprio) parts.push(`ioprio=${hex(ioprio)}`);
  }
  parts.push(`user_data=${decoder.userData?.(lo, hi) ?? hex(getU64(sqes, w + io_uring_sqe.user_data / 4))}`);
  return parts.join(' ');
}

/** One CQE as text: user_data, result (an errno by name), flags, and what the decoder adds. */
export function describeCqe(cq: Uint32Array, c: number, decoder: TraceDecoder = {}): string {
  const lo = cq[c]!;
  const hi = cq[c + 1]!;
  const res = cq[c + 2]! | 0;
  const flags = cq[c + 3]!;
  const parts = [`user_data=${decoder.userData?.(lo, hi) ?? hex(getU64(cq, c))}`, `res=${resultText(res)}`];
  const f = flagText(flags & 0xffff, CQE_FLAGS);
  if (f) parts.push(`flags=${f}`);
  if (flags >>> 16) parts.push(`buf=${flags >>> 16}`); // IORING_CQE_BUFFER_SHIFT: the provided buffer's id
  const more = decoder.completion?.(lo, hi, res, flags);
  if (more) parts.push(more);
  return parts.join(' ');
}

/** Wall-clock time of day with microseconds, the same clock in every thread. */
export function traceTime(): string {
  const ms = performance.timeOrigin + performance.now();
  const d = new Date(Math.floor(ms));
  const us = Math.floor((ms % 1000) * 1000).toString().padStart(6, '0');
  return `${d.toISOString().slice(11, 19)}.${us}`;
}

/**
 * The usual tracer: one line per entry, `TIME RING SQE|CQE ...`, handed to `write` a batch at a
 * time (one write per publish or per reap, never per entry).
 */
export class RingTrace implements RingTracer {
  constructor(
    /** Names the ring in each line (`ctrl`, `q0`). */
    private readonly name: string,
    /** Takes a batch of lines, each ending in a newline. */
    private readonly write: (text: string) => void,
    private readonly decoder: TraceDecoder = {},
  ) {}

  submitted(sqes: Uint32Array, from: number, to: number, mask: number, shift: number): void {
    const t = traceTime();
    let out = '';
    for (let i = from; i !== to; i = (i + 1) >>> 0) {
      out += `${t} ${this.name} SQE ${describeSqe(sqes, (i & mask) << shift, this.decoder)}\n`;
    }
    if (out) this.write(out);
  }

  completed(cq: Uint32Array, n: number, at: (i: number) => number): void {
    const t = traceTime();
    let out = '';
    for (let i = 0; i < n; i++) out += `${t} ${this.name} CQE ${describeCqe(cq, at(i), this.decoder)}\n`;
    if (out) this.write(out);
  }
}
