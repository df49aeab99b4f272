/**
 * The mem target: a RAM disk, like the kernel's brd.
 *
 *   ublk add -t mem -s SIZE [--block-size 512|4096]
 *
 * The disk is one anonymous mapping made by `prepare` on the main thread, MAP_NORESERVE so that
 * only the blocks written take memory. Every queue thread reaches it by address (threads share
 * the address space) and serves requests by copying between it and the request
 * (ctx.copyToRequest / copyFromRequest), on the queue's thread: a memcpy with the tag's buffer in
 * copy mode, one pread or pwrite of the char device straight from the disk's memory in the
 * copy-free modes. DISCARD and WRITE_ZEROES give whole pages back
 * with madvise(MADV_DONTNEED) (they read as zeros afterwards) and zero the partial pages at the
 * edges. The mapping is unmapped by `release`, after the last queue has stopped.
 *
 * With user recovery (`-r 1`) the disk must survive its server: `persist` names a file in
 * /dev/shm (tmpfs: still memory, taken as blocks are written), `prepare` creates it the first
 * time and maps it MAP_SHARED, and the server that recovers the device maps the same file again.
 * Pages of a shared mapping are given back with MADV_REMOVE (a hole punch in the file), since
 * MADV_DONTNEED there only drops our view of them. `destroy` removes the file with the device.
 */
import { fstatSync, ftruncateSync, rmSync } from 'node:fs';
import { totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { Mapping, MAX_VIEW_BYTES, PAGE_SIZE, libc, sys } from '../libc/index.js';
import {
  UBLK_IO_OP_DISCARD, UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_F_NOUNMAP,
} from '../ublk/abi.js';
import { defineTarget, TargetError, type IoRequest, type QueueContext, type QueueHandler } from '../ublk/target.js';
import { blockSizeChoices, parseOptions, UsageError } from './options.js';

export interface MemOptions {
  sizeBytes: number;
  blockSize: number;
  /** A file (in /dev/shm) that holds the disk, so that it outlives the server (set by persist). */
  shmFile?: string;
}

/** What the queues get (DeviceSpec.queueData): where the disk is. */
interface MemDevice {
  address: number;
  size: number;
  /** The memory is a shared file mapping (pages go back with MADV_REMOVE). */
  shared: boolean;
}

/** Where persisted disks go: tmpfs, so they are memory like the anonymous kind. */
const shmDir = () => process.env.UBLK_SHM_DIR || '/dev/shm';

export default defineTarget<MemOptions>({
  name: 'mem',
  usage: '  -s, --size SIZE        device size (required; memory is taken as blocks are written)\n  --block-size 512|4096  logical block size (default 512)\n',

  parseArgs(argv) {
    const { values } = parseOptions('mem', argv, [
      { key: 'size', names: ['-s', '--size'], kind: 'size' },
      { key: 'blockSize', names: ['--block-size'], kind: 'size', choices: blockSizeChoices(PAGE_SIZE) },
    ]);
    const size = values.size as number | undefined;
    if (size === undefined) throw new UsageError('mem needs a size: -s SIZE (e.g. -s 1G)');
    // Discards give whole pages back (MADV_DONTNEED): the disk is made of whole pages.
    if (size % 4096 !== 0) throw new UsageError(`mem: the size must be a multiple of 4096, got ${size}`);
    return { sizeBytes: size, blockSize: (values.blockSize as number | undefined) ?? 512 };
  },

  prepare(o) {
    if (o.sizeBytes > totalmem()) {
      // MAP_NORESERVE would accept it, and the OOM killer would end the server once it filled.
      throw new TargetError(`mem: ${o.sizeBytes} bytes is more than this machine's memory (${totalmem()} bytes): choose a smaller -s`);
    }
    const ram = o.shmFile ? mapShmFile(o.shmFile, o.sizeBytes) : Mapping.anonymous(o.sizeBytes, { noReserve: true });
    const device: MemDevice = { address: ram.address, size: o.sizeBytes, shared: o.shmFile !== undefined };
    return {
      sizeBytes: o.sizeBytes,
      logicalBlockSize: o.blockSize,
      physicalBlockSize: 4096,
      rotational: false,
      // Nothing is cached on the way to the memory: no FLUSH needed (brd does the same).
      discard: { granularity: 4096, maxBytes: 2 ** 30, maxWriteZeroesBytes: 2 ** 30 },
      describe: { size: o.sizeBytes, block_size: o.blockSize, ...(o.shmFile ? { shm_file: o.shmFile } : {}) },
      queueData: device,
      release: () => ram.unmap(),
    };
  },

  openQueue(_o, queue) {
    return new MemQueue(queue.device as MemDevice);
  },

  persist(o, name) {
    return { ...o, shmFile: join(shmDir(), `ublk-mem-${name}`) };
  },

  destroy(o) {
    if (o.shmFile) rmSync(o.shmFile, { force: true });
  },
});

/**
 * Maps the disk file `path` (MAP_SHARED): created and sized the first time; mapped as it is
 * when a recovering server finds it, which must then be the same size (or it is not this disk).
 */
function mapShmFile(path: string, size: number): Mapping {
  let fd: number;
  try {
    fd = sys.open(path, libc.O_RDWR | libc.O_CREAT | libc.O_NOFOLLOW | libc.O_CLOEXEC, 0o600);
  } catch (e) {
    throw new TargetError(`mem: cannot open the disk's memory file ${path}: ${(e as Error).message} (is ${dirname(path)} a mounted tmpfs? UBLK_SHM_DIR names another directory)`);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new TargetError(`mem: ${path} is not a regular file`);
    if (st.size === 0) ftruncateSync(fd, size);
    else if (st.size !== size) throw new TargetError(`mem: ${path} holds ${st.size} bytes, not the ${size} of this disk: it belongs to another device`);
    return Mapping.file(fd, size, 0, libc.PROT_READ | libc.PROT_WRITE, false);
  } finally {
    sys.close(fd); // the mapping keeps the file
  }
}

class MemQueue implements QueueHandler {
  private readonly ram: Mapping;
  /** Buffers over the disk, MAX_VIEW_BYTES each (one view cannot cover more), made on first use. */
  private readonly chunks: Buffer[] = [];

  private readonly shared: boolean;

  constructor(device: MemDevice) {
    this.ram = Mapping.borrow(device.address, device.size);
    this.shared = device.shared;
  }

  private chunk(i: number): Buffer {
    return (this.chunks[i] ??= this.ram.bytes(i * MAX_VIEW_BYTES, Math.min(MAX_VIEW_BYTES, this.ram.length - i * MAX_VIEW_BYTES)));
  }

  handle(req: IoRequest, ctx: QueueContext): number {
    switch (req.op) {
      case UBLK_IO_OP_READ:
      case UBLK_IO_OP_WRITE:
        return this.copy(req, ctx);
      case UBLK_IO_OP_FLUSH:
        return 0;
      case UBLK_IO_OP_DISCARD:
        this.zero(req.offset, req.length, true);
        return 0;
      case UBLK_IO_OP_WRITE_ZEROES:
        // NOUNMAP: the zeros stay allocated; otherwise the pages may go back, like a discard.
        this.zero(req.offset, req.length, !(req.flags & UBLK_IO_F_NOUNMAP));
        return 0;
      default:
        return -libc.EOPNOTSUPP;
    }
  }

  /** Copies between the request and the disk; returns the request's result. */
  private copy(req: IoRequest, ctx: QueueContext): number {
    const read = req.op === UBLK_IO_OP_READ;
    let res = req.length;
    this.pieces(req.offset, req.length, (c, at, n, done) => {
      if (res < 0) return;
      const part = c.subarray(at, at + n);
      const r = read ? ctx.copyToRequest(req.tag, part, done) : ctx.copyFromRequest(req.tag, part, done);
      if (r < 0) res = r;
    });
    return res;
  }

  /** Zeros [off, off + len): whole pages are given back (`unmap`) or filled, the edges filled. */
  private zero(off: number, len: number, unmap: boolean): void {
    const page = PAGE_SIZE; // madvise works on whole pages of this machine
    const first = Math.ceil(off / page) * page;
    const last = Math.floor((off + len) / page) * page;
    if (unmap && last > first) {
      this.fill(off, first - off);
      // MADV_DONTNEED on private anonymous memory: the pages are freed, and read as zeros after.
      // On a shared file mapping that would only drop our view of the pages: MADV_REMOVE
      // punches the hole in the file itself.
      sys.madvise(this.ram.address + first, last - first, this.shared ? libc.MADV_REMOVE : libc.MADV_DONTNEED);
      this.fill(last, off + len - last);
    } else {
      this.fill(off, len);
    }
  }

  private fill(off: number, len: number): void {
    this.pieces(off, len, (c, at, n) => c.fill(0, at, at + n));
  }

  /**
   * Walks disk range [off, off + len) in pieces that do not cross a chunk: `fn` gets the chunk,
   * the piece's offset in it, its length, and how much of the range came before it.
   */
  private pieces(off: number, len: number, fn: (chunk: Buffer, at: number, n: number, done: number) => void): void {
    for (let done = 0; done < len;) {
      const i = Math.floor((off + done) / MAX_VIEW_BYTES);
      const at = off + done - i * MAX_VIEW_BYTES;
      const n = Math.min(len - done, MAX_VIEW_BYTES - at);
      fn(this.chunk(i), at, n, done);
      done += n;
    }
  }

  close(): void {
    this.ram.unmap(); // drops this queue's views; the memory itself is the device's (release)
  }
}
