/**
 * The loop target: a block device backed by a file or another block device, like the kernel's
 * loop driver (drivers/block/loop.c), with the I/O on the queue's own io_uring.
 *
 *   ublk add -t loop -f FILE|BLOCKDEV [--buffered] [--offset BYTES] [--read-only] [-s SIZE]
 *
 * Request mapping (device offset + --offset = backing offset):
 *   READ / WRITE   -> a read or write between the backing fd (O_DIRECT unless --buffered) and
 *                     the request (ctx.prepReadInto / prepWriteFrom: IORING_OP_READ / WRITE on
 *                     the tag buffer, or READ_FIXED / WRITE_FIXED on the request's own pages in
 *                     the zero-copy modes, where the data never passes through user memory). A
 *                     short transfer is resubmitted for the remainder; a READ that hits the
 *                     backing's end (it shrank under us) reads zeros there, like a hole.
 *   WRITE + FUA    -> the same WRITE with RWF_DSYNC: durable when it completes.
 *   FLUSH          -> IORING_OP_FSYNC with IORING_FSYNC_DATASYNC (fdatasync).
 *   DISCARD        -> fallocate(PUNCH_HOLE | KEEP_SIZE): frees the backing's blocks.
 *   WRITE_ZEROES   -> fallocate(ZERO_RANGE | KEEP_SIZE) when the request says NOUNMAP, else
 *                     PUNCH_HOLE, as loop.c's lo_fallocate does; where a file system lacks
 *                     ZERO_RANGE (tmpfs), PUNCH_HOLE then fallocate(KEEP_SIZE) give the same bytes.
 * FLUSH, DISCARD and WRITE_ZEROES complete with 0, never a byte count: ublk_drv would read a
 * count of 2 GiB or more as a negative errno.
 *
 * `prepare` opens the backing once, on the main thread (loop-backing.ts: every decision comes from
 * the fd it opened; O_NONBLOCK on tmpfs), and checks everything a user can get wrong before a
 * device exists; the queues share that fd (one address space, one fd table), each registering
 * it as a fixed file of its own ring.
 */
import { resolve } from 'node:path';
import { PAGE_SIZE, libc, sys } from '../libc/index.js';
import { prepFallocate, prepFsync, setFlags, setOpFlags, abi as uringAbi } from '../uring/index.js';
import {
  UBLK_IO_OP_DISCARD, UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE_ZEROES,
  UBLK_IO_F_FUA, UBLK_IO_F_NOUNMAP,
} from '../ublk/abi.js';
import { defineTarget, TargetError, type DeviceSpec, type IoRequest, type QueueContext, type QueueHandler } from '../ublk/target.js';
import { openBacking, type Backing } from './loop-backing.js';
import { blockSizeChoices, parseOptions, UsageError } from './options.js';

export interface LoopOptions {
  /** The backing file or block device (absolute path). */
  file: string;
  /** Go through the backing's page cache instead of O_DIRECT. */
  buffered: boolean;
  /** Where the device starts in the backing, in bytes. */
  offset: number;
  readOnly: boolean;
  /** Device size; default: the backing's size minus the offset. */
  sizeBytes?: number;
  /** Logical block size; default: the backing's (its sector size, or the O_DIRECT alignment). */
  blockSize?: number;
}

/** What every queue gets from `prepare` (DeviceSpec.queueData). */
interface LoopDevice {
  fd: number;
  offset: number;
  /** O_DIRECT (not --buffered): transfers are linked to their commit (see submitRw). */
  direct: boolean;
}

/** Counter slots (TargetDefinition.counters). */
const C_FDATASYNC = 0; // FLUSHes that reached the backing and succeeded
const C_DSYNC_WRITES = 1; // FUA writes issued (with RWF_DSYNC)
const C_PUNCH = 2; // fallocate PUNCH_HOLE completed
const C_ZERO_RANGE = 3; // fallocate ZERO_RANGE (or its fallback) completed
const C_SHORT = 4; // short transfers resubmitted
const C_ERRORS = 5; // requests completed with an error
const C_NOWAIT_RETRIES = 6; // linked transfers that would have blocked, sent again unlinked

export default defineTarget<LoopOptions>({
  name: 'loop',
  usage: [
    '  -f, --file PATH        backing file or block device (required; kublk\'s form, a path after the options, works too)',
    '  --buffered             use the page cache of the backing (default: O_DIRECT)',
    '  --offset BYTES         start the device this far into the backing (a multiple of the block size)',
    '  --read-only            read-only device (required for a backing we may not write)',
    '  -s, --size SIZE        device size (default: the backing\'s size minus the offset)',
    '  --block-size N         logical block size, 512 to 4096 (default: the backing\'s)',
    '',
  ].join('\n'),
  counters: ['fdatasync', 'dsync_writes', 'punch_hole', 'zero_range', 'short_resubmits', 'errors', 'nowait_retries'],

  parseArgs(argv) {
    const { values, positional } = parseOptions('loop', argv, [
      { key: 'file', names: ['-f', '--file'], kind: 'string' },
      { key: 'buffered', names: ['--buffered'], kind: 'flag' },
      { key: 'direct', names: ['--direct'], kind: 'flag' },
      { key: 'offset', names: ['--offset'], kind: 'size', zero: true },
      { key: 'readOnly', names: ['--read-only'], kind: 'flag' },
      { key: 'size', names: ['-s', '--size'], kind: 'size' },
      { key: 'blockSize', names: ['--block-size'], kind: 'size', choices: blockSizeChoices(Math.min(PAGE_SIZE, 4096)) },
    ], { positional: 1 });
    if (values.file !== undefined && positional.length > 0) {
      throw new UsageError(`loop: the backing file is given twice (-f ${String(values.file)} and ${positional[0]})`);
    }
    const file = (values.file as string | undefined) ?? positional[0];
    if (!file) throw new UsageError('loop needs a backing file: -f FILE (or a block device)');
    if (values.buffered && values.direct) throw new UsageError('loop: --buffered and --direct contradict each other');
    // What can be checked without the backing is checked here (exit 2); the rest in prepare.
    const unit = (values.blockSize as number | undefined) ?? 512;
    for (const [key, opt] of [['offset', '--offset'], ['size', '--size']] as const) {
      const v = values[key] as number | undefined;
      if (v !== undefined && v % unit !== 0) throw new UsageError(`loop: ${opt} must be a multiple of the block size ${unit}, got ${v}`);
    }
    return {
      // Absolute, so the detached server and `ublk list` mean the same file whatever their cwd.
      file: resolve(file),
      buffered: values.buffered === true,
      offset: (values.offset as number | undefined) ?? 0,
      readOnly: values.readOnly === true,
      sizeBytes: values.size as number | undefined,
      blockSize: values.blockSize as number | undefined,
    };
  },

  prepare(o) {
    const b = openBacking(o);
    try {
      return deviceSpec(o, b);
    } catch (e) {
      sys.close(b.fd);
      throw e;
    }
  },

  openQueue(_o, queue) {
    return new LoopQueue(queue.device as LoopDevice, queue.counters);
  },

  resize(o, sizeBytes) {
    // The new size must fit the backing as it is now (grow the file first, then the device).
    const resized = { ...o, sizeBytes };
    const b = openBacking(resized);
    try {
      deviceSpec(resized, b);
    } finally {
      sys.close(b.fd);
    }
    return resized;
  },
});

function deviceSpec(o: LoopOptions, b: Backing): DeviceSpec {
  if (b.readOnly && !o.readOnly) {
    throw new TargetError(`loop: ${o.file} is a read-only block device: add --read-only`);
  }
  const lbs = o.blockSize ?? b.logicalBlockSize;
  if (lbs < b.logicalBlockSize) {
    throw new TargetError(`loop: --block-size ${lbs} is below what ${o.file} can address with O_DIRECT (${b.logicalBlockSize})${b.isBlockDevice ? '' : ': use a larger one, or --buffered'}`);
  }
  if (o.offset % lbs !== 0) throw new TargetError(`loop: --offset ${o.offset} must be a multiple of the block size ${lbs}`);
  const available = Math.floor(Math.max(0, b.size - o.offset) / lbs) * lbs;
  if (available < lbs) {
    throw new TargetError(o.offset > 0
      ? `loop: ${o.file} has ${Math.max(0, b.size - o.offset)} bytes after --offset ${o.offset}, less than one ${lbs}-byte block`
      : `loop: ${o.file} is smaller than one block (${b.size} bytes, block size ${lbs})`);
  }
  let size = available;
  if (o.sizeBytes !== undefined) {
    if (o.sizeBytes > available) throw new TargetError(`loop: --size ${o.sizeBytes} is larger than the ${available} bytes ${o.file} has${o.offset ? ` after --offset ${o.offset}` : ''}`);
    if (o.sizeBytes % lbs !== 0) throw new TargetError(`loop: --size ${o.sizeBytes} must be a multiple of the block size ${lbs}`);
    size = o.sizeBytes;
  }
  const writable = !o.readOnly;
  const device: LoopDevice = { fd: b.fd, offset: o.offset, direct: !o.buffered };
  // Discard and write-zeroes in one request: the kernel splits larger ones. 1 GiB keeps a
  // single fallocate short enough not to stall the queue for long.
  const maxDiscard = 2 ** 30;
  return {
    sizeBytes: size,
    logicalBlockSize: lbs,
    physicalBlockSize: Math.max(lbs, b.physicalBlockSize),
    readOnly: o.readOnly,
    rotational: false,
    // The backing has a cache (the page cache, or the disk's): file systems must send FLUSH, and
    // may send FUA, for their data to be durable.
    volatileCache: writable,
    fua: writable,
    discard: writable ? {
      granularity: Math.max(lbs, b.discardGranularity),
      maxBytes: b.canDiscard ? maxDiscard : 0,
      maxWriteZeroesBytes: maxDiscard,
    } : undefined,
    describe: {
      file: o.file, offset: o.offset, direct: !o.buffered, read_only: o.readOnly,
      ...(b.isBlockDevice ? { block_device: true } : {}),
    },
    queueData: device,
    release: () => sys.close(b.fd),
  };
}

/** One queue's requests, on the queue's ring. Per-tag state lives in arrays: no allocation per I/O. */
class LoopQueue implements QueueHandler {
  private readonly fd: number;
  private readonly base: number;
  private readonly counters: Float64Array;
  private fixed = -1;
  private ctx!: QueueContext;
  /**
   * Per op (READ 0, WRITE 1): linked NOWAIT transfers sent, and how many said EAGAIN. Where a
   * backing often would block (ext4 on 7.3 answers about a fifth of NOWAIT overwrites EAGAIN,
   * 6.12 almost none), each such transfer pays a trip through this thread before io-wq, so
   * linking that op stops once more than one in eight says EAGAIN; a backing that refuses
   * NOWAIT outright stops it for both (see rwDone). Buffered backings never link.
   */
  private readonly linkedByOp = new Float64Array(2);
  private readonly eagainByOp = new Float64Array(2);
  private readonly linkOp: Uint8Array;
  /** Per tag: this request's transfers go unlinked (one would have blocked, see rwDone). */
  private unlinked: Uint8Array = new Uint8Array(0);
  // Per tag: the request in flight.
  private op: Uint8Array = new Uint8Array(0);
  private flags: Uint32Array = new Uint32Array(0);
  /** Device offset (the backing offset is `base` more). */
  private pos: Float64Array = new Float64Array(0);
  private len: Uint32Array = new Uint32Array(0);
  private done: Uint32Array = new Uint32Array(0);
  /** One CQE callback per tag, made once. */
  private onRw: Array<(res: number) => void> = [];
  private onOther: Array<(res: number) => void> = [];
  private onZeroFallback: Array<(res: number) => void> = [];
  /** Set once the backing answered ZERO_RANGE with EOPNOTSUPP: use the fallback from then on. */
  private noZeroRange = false;

  constructor(device: LoopDevice, counters: Float64Array) {
    this.fd = device.fd;
    this.base = device.offset;
    this.linkOp = new Uint8Array(2).fill(device.direct ? 1 : 0);
    this.counters = counters;
  }

  start(ctx: QueueContext): void {
    this.ctx = ctx;
    this.fixed = ctx.registerFile(this.fd);
    const n = ctx.depth;
    this.op = new Uint8Array(n);
    this.flags = new Uint32Array(n);
    this.pos = new Float64Array(n);
    this.len = new Uint32Array(n);
    this.done = new Uint32Array(n);
    this.unlinked = new Uint8Array(n);
    for (let tag = 0; tag < n; tag++) {
      this.onRw.push((res) => this.rwDone(tag, res));
      this.onOther.push((res) => this.otherDone(tag, res));
      this.onZeroFallback.push((res) => this.zeroFallbackStep(tag, res));
    }
  }

  handle(req: IoRequest, ctx: QueueContext): number | undefined {
    const tag = req.tag;
    switch (req.op) {
      case UBLK_IO_OP_READ:
      case UBLK_IO_OP_WRITE:
        if (req.length === 0) return 0;
        this.op[tag] = req.op;
        this.flags[tag] = req.flags;
        this.pos[tag] = req.offset;
        this.len[tag] = req.length;
        this.done[tag] = 0;
        this.unlinked[tag] = this.linkOp[req.op] ? 0 : 1;
        if (req.op === UBLK_IO_OP_WRITE && req.flags & UBLK_IO_F_FUA) this.counters[C_DSYNC_WRITES]!++;
        this.submitRw(tag);
        return undefined;
      case UBLK_IO_OP_FLUSH: {
        this.op[tag] = req.op;
        const w = this.sqe();
        prepFsync(ctx.ring.sqes, w, this.fixed, true);
        this.issue(w, this.onOther[tag]!);
        return undefined;
      }
      case UBLK_IO_OP_DISCARD:
        this.op[tag] = req.op;
        this.fallocate(libc.FALLOC_FL_PUNCH_HOLE, req.offset, req.length, this.onOther[tag]!);
        return undefined;
      case UBLK_IO_OP_WRITE_ZEROES:
        this.op[tag] = req.op;
        this.flags[tag] = req.flags;
        this.pos[tag] = req.offset;
        this.len[tag] = req.length;
        this.done[tag] = 0;
        if (req.flags & UBLK_IO_F_NOUNMAP) {
          // Zeros that stay allocated, so later writes there cannot fail for space.
          if (this.noZeroRange) this.fallocate(libc.FALLOC_FL_PUNCH_HOLE, req.offset, req.length, this.onZeroFallback[tag]!);
          else this.fallocate(libc.FALLOC_FL_ZERO_RANGE, req.offset, req.length, this.onOther[tag]!);
        } else {
          this.fallocate(libc.FALLOC_FL_PUNCH_HOLE, req.offset, req.length, this.onOther[tag]!);
        }
        return undefined;
      default:
        return -libc.EOPNOTSUPP;
    }
  }

  private sqe(): number {
    return this.ctx.getSqe();
  }

  /** Sends the SQE at `w`, prepared on `this.fixed`, to the backing's fixed file; `cb` gets its CQE. */
  private issue(w: number, cb: (res: number) => void): void {
    setFlags(this.ctx.ring.sqes, w, uringAbi.IOSQE_FIXED_FILE);
    this.ctx.track(w, cb);
  }

  /**
   * READ/WRITE of what is left of tag's request.
   *
   * On an O_DIRECT backing the transfer goes with RWF_NOWAIT and the queue links the request's
   * commit behind it (trackAndCommit): when all of it transfers, the kernel answers the request
   * at once, and rwDone never runs. NOWAIT matters for the link: a transfer that would block is
   * otherwise handed to an io-wq worker, and io_uring then issues the linked commit from that
   * worker too; ublk_drv takes a tag's commands only from the thread that fetched it, and on 6.12
   * such a commit was measured to fail (EBUSY) and leave the request unanswered. With NOWAIT the
   * transfer fails with EAGAIN instead (the commit is then dropped), and rwDone sends it again,
   * unlinked, as a plain SQE that may block in io-wq. Buffered backings (mostly page-cache
   * misses that block) never link.
   */
  private submitRw(tag: number): void {
    const ctx = this.ctx;
    const s = ctx.ring.sqes;
    const w = this.sqe();
    const done = this.done[tag]!;
    const n = this.len[tag]! - done;
    const off = this.base + this.pos[tag]! + done;
    const link = this.unlinked[tag] === 0;
    let rwFlags = link ? libc.RWF_NOWAIT : 0;
    if (this.op[tag] === UBLK_IO_OP_READ) {
      ctx.prepReadInto(w, tag, this.fixed, off, done, n);
    } else {
      ctx.prepWriteFrom(w, tag, this.fixed, off, done, n);
      if (this.flags[tag]! & UBLK_IO_F_FUA) {
        rwFlags |= libc.RWF_DSYNC;
      }
    }
    if (rwFlags) setOpFlags(s, w, rwFlags); // sqe->rw_flags
    if (!link) return this.issue(w, this.onRw[tag]!);
    setFlags(s, w, uringAbi.IOSQE_FIXED_FILE);
    this.linkedByOp[this.op[tag]!]!++;
    this.ctx.trackAndCommit(w, n, this.len[tag]!, this.onRw[tag]!);
  }

  private rwDone(tag: number, res: number): void {
    if ((res === -libc.EAGAIN || res === -libc.EOPNOTSUPP) && this.unlinked[tag] === 0) {
      // A NOWAIT transfer that would have blocked: again, as a plain SQE (see submitRw). A
      // backing that refuses NOWAIT outright (EOPNOTSUPP: tmpfs writes on 6.12) is never linked
      // again: its transfers run inline anyway (loop opens tmpfs files O_NONBLOCK).
      const op = this.op[tag]!;
      if (res === -libc.EOPNOTSUPP) this.linkOp.fill(0);
      else if (++this.eagainByOp[op]! * 8 > this.linkedByOp[op]! && this.linkedByOp[op]! >= 64) this.linkOp[op] = 0;
      this.unlinked[tag] = 1;
      this.counters[C_NOWAIT_RETRIES]!++;
      this.submitRw(tag);
      return;
    }
    if (res < 0) return this.fail(tag, res);
    const len = this.len[tag]!;
    if (res === 0) {
      if (this.op[tag] === UBLK_IO_OP_WRITE) return this.fail(tag, -libc.EIO); // no progress: never loop
      // The backing ends before the device does (it was truncated): the rest reads as zeros.
      const z = this.ctx.zeroRequest(tag, this.done[tag]!, len - this.done[tag]!);
      if (z < 0) return this.fail(tag, z);
      this.done[tag] = len;
    } else {
      this.done[tag]! += res;
    }
    if (this.done[tag]! < len) {
      // A short transfer (a signal, a page-cache hiccup, a file system's choice): not an error.
      this.counters[C_SHORT]!++;
      this.submitRw(tag);
      return;
    }
    this.ctx.complete(tag, len);
  }

  /** fallocate(mode | KEEP_SIZE) over device range [offset, offset + length). */
  private fallocate(mode: number, offset: number, length: number, cb: (res: number) => void): void {
    const w = this.sqe();
    prepFallocate(this.ctx.ring.sqes, w, this.fixed, mode | libc.FALLOC_FL_KEEP_SIZE, this.base + offset, length);
    this.issue(w, cb);
  }

  /** FLUSH, DISCARD and WRITE_ZEROES: complete with 0 (never a byte count) or the error. */
  private otherDone(tag: number, res: number): void {
    const op = this.op[tag];
    if (res === -libc.EOPNOTSUPP && op === UBLK_IO_OP_WRITE_ZEROES && this.flags[tag]! & UBLK_IO_F_NOUNMAP) {
      // This file system has no ZERO_RANGE (tmpfs): punch, then allocate, from now on.
      this.noZeroRange = true;
      this.done[tag] = 0;
      this.fallocate(libc.FALLOC_FL_PUNCH_HOLE, this.pos[tag]!, this.len[tag]!, this.onZeroFallback[tag]!);
      return;
    }
    if (res < 0) return this.fail(tag, res);
    if (op === UBLK_IO_OP_FLUSH) this.counters[C_FDATASYNC]!++;
    else if (op === UBLK_IO_OP_DISCARD || !(this.flags[tag]! & UBLK_IO_F_NOUNMAP)) this.counters[C_PUNCH]!++;
    else this.counters[C_ZERO_RANGE]!++;
    this.ctx.complete(tag, 0);
  }

  /** The ZERO_RANGE fallback: step 0 punched the range, step 1 allocated it again (zeroed). */
  private zeroFallbackStep(tag: number, res: number): void {
    if (res < 0) return this.fail(tag, res);
    if (this.done[tag] === 0) {
      this.done[tag] = 1;
      this.fallocate(0, this.pos[tag]!, this.len[tag]!, this.onZeroFallback[tag]!);
      return;
    }
    this.counters[C_ZERO_RANGE]!++;
    this.ctx.complete(tag, 0);
  }

  private fail(tag: number, res: number): void {
    this.counters[C_ERRORS]!++;
    // The errno reaches the block layer (errno_to_blk_status): ENOSPC and EOPNOTSUPP keep their
    // meaning, anything it has no status for becomes EIO.
    this.ctx.complete(tag, res);
  }
}
