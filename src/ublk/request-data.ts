/**
 * Where a request's bytes are, and how they move, for each data path (modes.ts): the one place
 * that knows it, so that a target asks for "these bytes of my backing into the request" or
 * "here is the data" (target.ts, QueueContext) and never needs to know the device's mode.
 *
 *   - Kernel copies (copy, get_data): ublk_drv copies a WRITE's data into the tag's buffer before
 *     the request reaches us and a READ's out of it at commit (ublk_map_io / ublk_unmap_io). The
 *     tag buffer is the request's data: SQEs read and write it, copies are a memcpy.
 *   - User copy (user_copy): the kernel copies nothing. Data moves by pread/pwrite of
 *     /dev/ublkcN at the tag's user-copy position (userCopyOffset): a pread gets a WRITE's data,
 *     a pwrite gives a READ's (ublk_check_ubuf_dir allows only that direction), and only while
 *     the server owns the request. A target's own memory goes straight to the kernel in one call;
 *     SQEs between a file and the request, and `IoRequest.buffer`, go through the tag buffer,
 *     which is then "staged": read in once for a WRITE, written out at commit for a READ. A
 *     READ that SQEs fill only in part (a target that copies some of its bytes from its own
 *     memory and reads the rest from a file or a socket) has only the byte ranges those SQEs
 *     read written out, so that the bytes copied before them stay as they were.
 *   - Fixed buffers (zero copy, auto_zc): the request's own pages are a fixed buffer of the
 *     queue's ring at index = tag (registered by REGISTER_IO_BUF, or by the kernel itself with
 *     AUTO_BUF_REG; the queue does that part). SQEs use READ_FIXED/WRITE_FIXED with sqe->addr
 *     the byte offset in the request (a kernel-registered buffer starts at address 0), and the
 *     data never passes through user memory. Memory copies use the user-copy calls where the
 *     kernel allows them next to zero copy (`userCopy`), and are refused otherwise.
 *
 * A request the kernel matched to a registered shared region (UBLK_F_SHMEM_ZC, 7.1; the queue
 * finds its address, beginShared) has its data there, in any mode: the client's own pages, which
 * this process maps too. It is served like the tag buffer of copy mode, SQEs and memcpy on that
 * memory, and the kernel copies nothing at either end.
 *
 * The pread/pwrite calls are synchronous, as kublk makes them: each is a memcpy in the kernel,
 * and an SQE on the char device could be handed to an io-wq worker (the file does not promise
 * NOWAIT), which is no place for a commit linked behind it.
 */
import { prepRead, prepReadFixed, prepWrite, prepWriteFixed } from '../uring/index.js';
import { Mapping, SysError, libc, sys } from '../libc/index.js';
import { UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, userCopyOffset } from './abi.js';

/** Where request data lives for the queue (see the module comment). */
export const enum DataHome {
  /** The tag buffer (copy, get_data). */
  TagBuffer,
  /** The kernel, reached with pread/pwrite of the char device (user_copy). */
  UserCopy,
  /** The kernel, registered as fixed buffer `tag` of the queue's ring (zero copy, auto_zc). */
  FixedBuffer,
}

export interface RequestDataOptions {
  home: DataHome;
  charFd: number;
  qid: number;
  depth: number;
  /** The tag buffers: tag t's is `maxIoBytes` bytes at `t * maxIoBytes`. */
  bufs: Mapping;
  maxIoBytes: number;
  /**
   * FixedBuffer only: the char device also takes pread/pwrite at the user-copy position, so
   * memory copies and `IoRequest.buffer` work (the kernel allows it next to zero copy).
   */
  userCopy: boolean;
  /** Reports a failed copy (one line, rate-limited by the caller). */
  report(line: string): void;
}

/** Zeros for zeroRequest in the copy-free modes: memory we mapped, never written. */
let zeroPage: Buffer | undefined;
const ZERO_BYTES = 64 * 1024;

export class RequestData {
  private readonly o: RequestDataOptions;
  private readonly home: DataHome;
  /** Per tag: the op and length of the request being served. */
  private readonly op: Uint8Array;
  private readonly length: Uint32Array;
  /** Per tag (copy-free modes): the tag buffer holds the request's data (see the module comment). */
  private readonly staged: Uint8Array;
  /**
   * Per tag (user copy, a READ not staged): the byte ranges of the tag buffer that SQEs read into
   * (prepReadInto), merged, as [from, to, from, to, ...]; written out at commit. Reused arrays.
   */
  private readonly readRanges: number[][];
  /** Per tag: a Buffer over its whole tag buffer, made on first use. */
  private readonly views: Array<Buffer | undefined>;
  /**
   * Per tag: the last `buffer()` view, kept while requests have its length: a busy queue serves
   * tens of thousands of requests a second, and a fresh view per request kept V8's garbage
   * collector running (async targets ask for it on every READ and WRITE).
   */
  private readonly sized: Array<Buffer | undefined>;
  /** Per tag: the address of the request's data in a shared region (UBLK_IO_F_SHMEM_ZC), or 0. */
  private readonly shared: Float64Array;
  /** Per tag with `shared`: the whole region as a Buffer, and the request's offset in it. */
  private readonly sharedRegion: Array<Buffer | undefined>;
  private readonly sharedOffset: Float64Array;

  constructor(o: RequestDataOptions) {
    this.o = o;
    this.home = o.home;
    this.op = new Uint8Array(o.depth);
    this.length = new Uint32Array(o.depth);
    this.staged = new Uint8Array(o.depth);
    this.readRanges = Array.from({ length: o.depth }, () => []);
    this.views = new Array<Buffer | undefined>(o.depth);
    this.sized = new Array<Buffer | undefined>(o.depth);
    this.shared = new Float64Array(o.depth);
    this.sharedRegion = new Array<Buffer | undefined>(o.depth);
    this.sharedOffset = new Float64Array(o.depth);
  }

  /** The data path reaches request data from user memory (memory copies, `buffer`). */
  get memoryAccess(): boolean {
    return this.home !== DataHome.FixedBuffer || this.o.userCopy;
  }

  /** A new request for `tag`. */
  begin(tag: number, op: number, length: number): void {
    this.op[tag] = op;
    this.length[tag] = length;
    this.staged[tag] = this.home === DataHome.TagBuffer ? 1 : 0;
    this.shared[tag] = 0;
    this.readRanges[tag]!.length = 0;
  }

  /**
   * A new request whose data the kernel left in a shared region (UBLK_IO_F_SHMEM_ZC): `length`
   * bytes at `offset` of `region` (a Buffer over the region), whose address is `base`.
   */
  beginShared(tag: number, op: number, length: number, region: Buffer, base: number, offset: number): void {
    this.op[tag] = op;
    this.length[tag] = length;
    this.staged[tag] = 1;
    this.readRanges[tag]!.length = 0;
    this.shared[tag] = base + offset;
    this.sharedRegion[tag] = region;
    this.sharedOffset[tag] = offset;
  }

  /** The request's data is in a shared region. */
  isShared(tag: number): boolean {
    return this.shared[tag] !== 0;
  }

  /** Address of tag's buffer. */
  address(tag: number): number {
    return this.o.bufs.address + tag * this.o.maxIoBytes;
  }

  private view(tag: number): Buffer {
    return (this.views[tag] ??= this.o.bufs.bytes(tag * this.o.maxIoBytes, this.o.maxIoBytes));
  }

  /** Where the request's data is in memory: its shared region, or its tag buffer. */
  private dataAddress(tag: number): number {
    return this.shared[tag] || this.address(tag);
  }

  /** The memory holding the request's data as a Buffer (its tag buffer, or its piece of a shared region). */
  private dataView(tag: number): Buffer {
    if (this.shared[tag] === 0) return this.view(tag);
    const off = this.sharedOffset[tag]!;
    return this.sharedRegion[tag]!.subarray(off, off + this.length[tag]!);
  }

  /** IoRequest.buffer: the tag buffer, holding the request's data (staged first where needed). */
  buffer(tag: number): Buffer {
    if (this.shared[tag] !== 0) return this.dataView(tag);
    this.stage(tag);
    const n = Math.min(this.length[tag]!, this.o.maxIoBytes);
    const b = this.sized[tag];
    if (b !== undefined && b.length === n) return b;
    return (this.sized[tag] = this.view(tag).subarray(0, n));
  }

  /**
   * The address of the request's data in our memory (the memory {@link buffer} returns), for an
   * SQE that names memory itself, such as a sendmsg iovec: staged first where needed.
   */
  bufferAddress(tag: number): number {
    if (this.shared[tag] === 0) this.stage(tag);
    return this.dataAddress(tag);
  }

  /**
   * Makes the tag buffer the request's data: in the copy-free modes, reads a WRITE's data in
   * (a READ's goes out at commit, see finish). Throws a SysError if that read fails.
   */
  private stage(tag: number): void {
    if (this.staged[tag]) return;
    if (!this.memoryAccess) throw noMemoryAccess();
    this.staged[tag] = 1;
    const len = this.length[tag]!;
    if (this.op[tag] === UBLK_IO_OP_WRITE && len > 0) {
      const r = this.userCopy(tag, this.view(tag).subarray(0, len), 0, false);
      if (r < 0) {
        this.staged[tag] = 0;
        throw new SysError(-r, `reading tag ${tag}'s WRITE data from the kernel`);
      }
    }
  }

  prepReadInto(s: Uint32Array, w: number, tag: number, fd: number, fileOffset: number, at: number, len: number): void {
    if (this.home === DataHome.FixedBuffer && this.shared[tag] === 0) {
      prepReadFixed(s, w, fd, at, len, fileOffset, tag);
      return;
    }
    // User copy: the READ lands in the tag buffer, whose bytes go to the kernel at commit: all of
    // them if the tag buffer is the request's data (staged), else the ranges SQEs read into.
    if (!this.staged[tag]) {
      if (this.op[tag] === UBLK_IO_OP_READ) addRange(this.readRanges[tag]!, at, at + len);
      else this.staged[tag] = 1;
    }
    prepRead(s, w, fd, this.dataAddress(tag) + at, len, fileOffset);
  }

  prepWriteFrom(s: Uint32Array, w: number, tag: number, fd: number, fileOffset: number, at: number, len: number): void {
    if (this.home === DataHome.FixedBuffer && this.shared[tag] === 0) {
      prepWriteFixed(s, w, fd, at, len, fileOffset, tag);
      return;
    }
    this.stage(tag);
    prepWrite(s, w, fd, this.dataAddress(tag) + at, len, fileOffset);
  }

  copyToRequest(tag: number, src: Buffer, at: number): number {
    if (this.staged[tag]) return src.copy(this.dataView(tag), at);
    const ranges = this.readRanges[tag]!;
    if (ranges.length > 0) {
      // SQEs already read into this READ's tag buffer, which goes out at commit: a later copy
      // joins it there, so that it lands after those bytes whichever parts overlap.
      addRange(ranges, at, at + src.length);
      return src.copy(this.view(tag), at);
    }
    if (!this.memoryAccess) return -libc.EOPNOTSUPP;
    return this.userCopy(tag, src, at, true);
  }

  copyFromRequest(tag: number, dst: Buffer, at: number): number {
    if (this.staged[tag]) return this.dataView(tag).copy(dst, 0, at, at + dst.length);
    if (!this.memoryAccess) return -libc.EOPNOTSUPP;
    return this.userCopy(tag, dst, at, false);
  }

  zeroRequest(tag: number, at: number, len: number): number {
    if (this.staged[tag]) {
      this.dataView(tag).fill(0, at, at + len);
      return len;
    }
    zeroPage ??= Mapping.anonymous(ZERO_BYTES).bytes();
    for (let done = 0; done < len;) {
      const n = Math.min(ZERO_BYTES, len - done);
      const r = this.copyToRequest(tag, zeroPage.subarray(0, n), at + done);
      if (r < 0) return r;
      done += n;
    }
    return len;
  }

  /**
   * A READ whose data sits in the tag buffer of a copy-free mode must reach the kernel before
   * the commit that completes it (so that commit can never be linked behind the target's SQE).
   */
  copiesOut(tag: number): boolean {
    return this.home !== DataHome.TagBuffer && this.op[tag] === UBLK_IO_OP_READ && this.shared[tag] === 0
      && (this.staged[tag] === 1 || this.readRanges[tag]!.length > 0);
  }

  /** Before tag's commit with result `res`: sends a staged READ's first `res` bytes (or what SQEs read of them); returns `res` or -errno. */
  finish(tag: number, res: number): number {
    if (res <= 0 || !this.copiesOut(tag)) return res;
    if (this.staged[tag]) return this.userCopy(tag, this.view(tag).subarray(0, res), 0, true);
    const ranges = this.readRanges[tag]!;
    for (let i = 0; i < ranges.length; i += 2) {
      const from = ranges[i]!;
      const to = Math.min(ranges[i + 1]!, res);
      if (from >= to) continue;
      const r = this.userCopy(tag, this.view(tag).subarray(from, to), from, true);
      if (r < 0) return r;
    }
    return res;
  }

  /**
   * pwrite (`out`) or pread of `buf` at byte `at` of tag's request, on the char device at the
   * tag's user-copy position; whole, across short transfers. Returns buf.length or -errno (with
   * a report).
   */
  private userCopy(tag: number, buf: Buffer, at: number, out: boolean): number {
    const pos = userCopyOffset(this.o.qid, tag) + at;
    const fd = this.o.charFd;
    let done = 0;
    while (done < buf.length) {
      let n: number;
      try {
        const part = done === 0 ? buf : buf.subarray(done);
        n = out ? sys.pwriteFrom(fd, part, pos + done) : sys.preadInto(fd, part, pos + done);
      } catch (e) {
        if (!(e instanceof SysError)) throw e;
        if (e.errno === libc.EINTR) continue;
        this.o.report(`ublk queue ${this.o.qid}: user copy of ${buf.length} bytes at ${at} of tag ${tag}'s ${opName(this.op[tag]!)} failed: ${e.message}`);
        return -e.errno;
      }
      if (n === 0) {
        this.o.report(`ublk queue ${this.o.qid}: user copy of tag ${tag}'s ${opName(this.op[tag]!)} stopped at ${at + done} bytes`);
        return -libc.EIO;
      }
      done += n;
    }
    return buf.length;
  }
}

/** Adds [from, to) to a sorted list of disjoint ranges [f0, t0, f1, t1, ...], merging what overlaps or touches. */
export function addRange(ranges: number[], from: number, to: number): void {
  if (ranges.length === 0) {
    // The usual case, one SQE per READ: no array made (splice returns one).
    ranges.push(from, to);
    return;
  }
  let i = 0;
  while (i < ranges.length && ranges[i + 1]! < from) i += 2;
  let j = i;
  while (j < ranges.length && ranges[j]! <= to) {
    from = Math.min(from, ranges[j]!);
    to = Math.max(to, ranges[j + 1]!);
    j += 2;
  }
  ranges.splice(i, j - i, from, to);
}

function opName(op: number): string {
  return op === UBLK_IO_OP_READ ? 'READ' : op === UBLK_IO_OP_WRITE ? 'WRITE' : `op ${op}`;
}

function noMemoryAccess(): Error {
  return new Error('this data path leaves request data in the kernel, reachable only by fixed-buffer SQEs: move it with ctx.prepReadInto/prepWriteFrom, or run the device in another mode');
}
