/**
 * The ublk half of a live trace (`ublk add --trace`, `UBLK_TRACE=1`, `ublk trace -n ID`): names
 * the ublk commands inside URING_CMD SQEs (src/uring/trace.ts decodes the rest of each entry)
 * and, for a queue's ring, what a user_data means to the queue engine and which request a
 * completed fetch brought (read from the tag's descriptor, which the kernel fills before it
 * posts the CQE: ublk_drv's ublk_setup_iod).
 *
 * Where the lines go: `traceSink` picks stderr or a FIFO a `ublk trace` is reading, and
 * stops writing to the FIFO (never blocking the data path) when it is full or its reader is gone.
 */
import { closeSync, openSync, writeSync } from 'node:fs';
import { libc } from '../libc/index.js';
import { flagText, type TraceDecoder } from '../uring/trace.js';
import {
  UBLK_CTRL_COMMANDS, UBLK_IO_COMMANDS, UBLK_IO_OP_NAMES, UBLK_IO_RES_ABORT, UBLK_IO_RES_NEED_GET_DATA, UBLK_IO_RES_OK,
  UBLK_IO_F_FAILFAST_DEV, UBLK_IO_F_FAILFAST_TRANSPORT, UBLK_IO_F_FAILFAST_DRIVER, UBLK_IO_F_META, UBLK_IO_F_FUA,
  UBLK_IO_F_NOUNMAP, UBLK_IO_F_SWAP, UBLK_IO_F_NEED_REG_BUF, UBLK_IO_F_INTEGRITY, UBLK_IO_F_SHMEM_ZC,
  ublk_batch_io, ublksrv_ctrl_cmd, ublksrv_io_cmd, type UblkCommand,
} from './abi.js';
import { readIoDesc, type IoDesc } from './wire.js';
import { cmdWord, getU64 } from '../uring/prep.js';

const IO_FLAGS: Array<[number, string]> = [
  [UBLK_IO_F_FAILFAST_DEV, 'FAILFAST_DEV'], [UBLK_IO_F_FAILFAST_TRANSPORT, 'FAILFAST_TRANSPORT'],
  [UBLK_IO_F_FAILFAST_DRIVER, 'FAILFAST_DRIVER'], [UBLK_IO_F_META, 'META'], [UBLK_IO_F_FUA, 'FUA'],
  [UBLK_IO_F_NOUNMAP, 'NOUNMAP'], [UBLK_IO_F_SWAP, 'SWAP'], [UBLK_IO_F_NEED_REG_BUF, 'NEED_REG_BUF'],
  [UBLK_IO_F_INTEGRITY, 'INTEGRITY'], [UBLK_IO_F_SHMEM_ZC, 'SHMEM_ZC'],
];

function byOp(list: readonly UblkCommand[]): Map<number, UblkCommand> {
  const m = new Map<number, UblkCommand>();
  for (const c of list) {
    m.set(c.op, c);
    if (c.legacy !== undefined) m.set(c.legacy, c);
  }
  return m;
}
const CTRL = byOp(UBLK_CTRL_COMMANDS);
const IO = byOp(UBLK_IO_COMMANDS);
const hex = (n: number) => `0x${n.toString(16)}`;
/** pipe(7): a write of at most this many bytes to a pipe is atomic. */
const PIPE_BUF = 4096;
const W = (bytes: number) => bytes / 4;

/** The 16-bit field at byte `at` of the SQE's cmd area. */
function u16(sqes: Uint32Array, w: number, at: number): number {
  const word = sqes[cmdWord(w) + (at >> 2)]!;
  return (at & 2) ? word >>> 16 : word & 0xffff;
}

/** A control command (struct ublksrv_ctrl_cmd in the SQE128's cmd area), or undefined if cmdOp is none. */
export function describeCtrlCmd(sqes: Uint32Array, w: number, cmdOp: number): string | undefined {
  const c = CTRL.get(cmdOp);
  if (!c) return undefined;
  const at = cmdWord(w);
  const devId = sqes[at + W(ublksrv_ctrl_cmd.dev_id)]! | 0;
  const qid = u16(sqes, w, ublksrv_ctrl_cmd.queue_id);
  const len = u16(sqes, w, ublksrv_ctrl_cmd.len);
  const addr = getU64(sqes, at + W(ublksrv_ctrl_cmd.addr));
  const data = getU64(sqes, at + W(ublksrv_ctrl_cmd.data));
  const parts = [`UBLK_U_CMD_${c.name}`, `dev_id=${devId}`];
  if (qid !== 0xffff) parts.push(`queue_id=${qid}`);
  if (len) parts.push(`len=${len}`);
  if (addr) parts.push(`addr=${hex(addr)}`);
  if (data) parts.push(`data=${data}`);
  if (cmdOp === c.legacy && c.legacy !== c.op) parts.push('(legacy opcode)');
  return parts.join(' ');
}

/** An I/O command (struct ublksrv_io_cmd, or struct ublk_batch_io for the batch commands). */
export function describeIoCmd(sqes: Uint32Array, w: number, cmdOp: number): string | undefined {
  const c = IO.get(cmdOp);
  if (!c) return undefined;
  const at = cmdWord(w);
  const parts = [`UBLK_U_IO_${c.name}`];
  if (c.name.endsWith('_IO_CMDS')) {
    parts.push(`q_id=${u16(sqes, w, ublk_batch_io.q_id)}`, `nr_elem=${u16(sqes, w, ublk_batch_io.nr_elem)}`);
    const flags = u16(sqes, w, ublk_batch_io.flags);
    if (flags) parts.push(`flags=${hex(flags)}`);
    return parts.join(' ');
  }
  parts.push(`q_id=${u16(sqes, w, ublksrv_io_cmd.q_id)}`, `tag=${u16(sqes, w, ublksrv_io_cmd.tag)}`);
  if (c.name === 'COMMIT_AND_FETCH_REQ') parts.push(`result=${sqes[at + W(ublksrv_io_cmd.result)]! | 0}`);
  const addr = getU64(sqes, at + W(ublksrv_io_cmd.addr));
  if (addr) parts.push(`addr=${hex(addr)}`);
  return parts.join(' ');
}

/** A request as its descriptor states it: `READ sector=2048 sectors=8 (4096 bytes) flags=FUA`. */
export function describeIoDesc(d: IoDesc): string {
  const parts = [UBLK_IO_OP_NAMES[d.op] ?? `OP_${d.op}`];
  if (d.nrSectors || d.startSector) parts.push(`sector=${d.startSector}`, `sectors=${d.nrSectors} (${d.nrSectors * 512} bytes)`);
  const f = flagText(d.flags, IO_FLAGS);
  if (f) parts.push(`flags=${f}`);
  return parts.join(' ');
}

/** The control ring's decoder: its commands by name, and its user_data, which is the command's opcode (control.ts). */
export const controlTraceDecoder: TraceDecoder = {
  uringCmd: describeCtrlCmd,
  userData: (lo, hi) => {
    const c = hi === 0 ? CTRL.get(lo) : undefined;
    return c ? c.name : undefined;
  },
};

/** What the queue engine lends its decoder: the user_data kinds and the tag's descriptor. */
export interface QueueTraceView {
  /** Names a user_data of the engine's (`cmd tag 3`, `target slot 7 tag 3`). */
  userData(lo: number, hi: number): string | undefined;
  /** The user_data kind whose lo is a tag and whose CQE completes a fetch. */
  readonly cmdKind: number;
  /** The descriptor array, in 32-bit words. */
  readonly desc32: Uint32Array;
}

/** A queue ring's decoder: commands, user_data, and the request each successful fetch brought. */
export function queueTraceDecoder(view: QueueTraceView): TraceDecoder {
  const desc: IoDesc = { op: 0, flags: 0, nrSectors: 0, startSector: 0, addr: 0 };
  return {
    uringCmd: describeIoCmd,
    userData: (lo, hi) => view.userData(lo, hi),
    completion: (lo, hi, res) => {
      if (hi !== view.cmdKind) return undefined;
      if (res === UBLK_IO_RES_OK) return `request: ${describeIoDesc(readIoDesc(view.desc32, lo, desc))}`;
      if (res === UBLK_IO_RES_NEED_GET_DATA) return 'NEED_GET_DATA: the kernel asks where to copy a WRITE\'s data';
      if (res === UBLK_IO_RES_ABORT) return 'ABORT: the device is stopping, the tag is not re-armed';
      return undefined;
    },
  };
}

/**
 * Where trace lines go. `stderr`: always there (`--trace`, UBLK_TRACE=1). `fifo`: a `ublk trace`
 * reader's FIFO, opened without blocking; when it is full the lines are counted as dropped (the
 * data path never waits for a reader), and when its reader is gone it is closed for good.
 */
export class TraceSink {
  private fd = -1;
  private dropped = 0;
  /** The FIFO was given up (no reader, or it left): later writes do nothing. */
  closed = false;

  private constructor(private readonly stderr: boolean) {}

  static stderr(): TraceSink {
    return new TraceSink(true);
  }

  /** Opens a reader's FIFO for writing; undefined if nobody reads it (ENXIO) or it is gone. */
  static fifo(path: string): TraceSink | undefined {
    const s = new TraceSink(false);
    try {
      s.fd = openSync(path, libc.O_WRONLY | libc.O_NONBLOCK | libc.O_CLOEXEC | libc.O_NOFOLLOW);
    } catch {
      return undefined;
    }
    return s;
  }

  /**
   * Writes a batch of lines. To a FIFO in pieces of at most PIPE_BUF bytes, cut at line ends:
   * the kernel writes such a piece whole or refuses it (pipe(7)), so a line is never torn.
   */
  write = (text: string): void => {
    if (this.stderr) {
      writeSync(2, text);
      return;
    }
    if (this.closed) return;
    if (this.dropped > 0) text = `(trace: ${this.dropped} lines dropped: the reader was too slow)\n${text}`;
    let start = 0;
    while (start < text.length) {
      let end = start;
      for (;;) {
        const nl = text.indexOf('\n', end);
        const next = nl < 0 ? text.length : nl + 1;
        if (end > start && next - start > PIPE_BUF) break; // (lines are ASCII: one byte per char)
        end = next;
        if (end >= text.length) break;
      }
      try {
        writeSync(this.fd, text.slice(start, end));
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'EAGAIN') {
          this.dropped += text.slice(start).split('\n').length - 1;
          return;
        }
        this.close(); // EPIPE: the reader left
        return;
      }
      start = end;
    }
    this.dropped = 0;
  };

  close(): void {
    if (this.fd >= 0) {
      try {
        closeSync(this.fd);
      } catch { /* nothing to do */ }
      this.fd = -1;
    }
    this.closed = true;
  }
}
