/**
 * What the layer targets (overlay, fault) and `ublk replay` share: opening a file or block device
 * and learning its size from the fd, whole transfers with the synchronous fs calls (a short read
 * or write is continued, never returned), zero-filling, errors carrying an errno name for
 * errorResult, and a small seeded random generator for reproducible faults.
 *
 * The handlers of these targets use fs.readSync / writeSync / fdatasyncSync on purpose: each
 * returns at once, so the request is answered at once (AsyncHandlers' fast path), and the data
 * goes straight between the request's buffer and the file.
 */
import { closeSync, fstatSync, openSync, readSync, writeSync } from 'node:fs';
import { sys, withScratch } from '../libc/index.js';
import { TargetError } from '../ublk/target.js';
import { BLKGETSIZE64 } from './abi.js';

/** The unit of the layers: their logical block size, and the granule of their maps and caches. */
export const LAYER_BLOCK = 4096;

/**
 * The device shape both layers give: 4 KiB blocks, a volatile cache with FUA (they hold writes
 * until FLUSH), and discard/write-zeroes in requests of at most 64 MiB (zeros are written block
 * by block: the bound keeps one request's work bounded).
 */
export const LAYER_SHAPE = {
  logicalBlockSize: LAYER_BLOCK,
  physicalBlockSize: LAYER_BLOCK,
  rotational: false,
  volatileCache: true,
  fua: true,
  discard: { granularity: LAYER_BLOCK, maxBytes: 64 * 2 ** 20, maxWriteZeroesBytes: 64 * 2 ** 20 },
} as const;

export interface OpenedFile {
  fd: number;
  /** Bytes: the file's size, or the block device's capacity. */
  size: number;
  isBlockDevice: boolean;
  /** Device and inode: two paths that name one file are told apart by these. */
  dev: number;
  ino: number;
}

/**
 * Opens `path` with `flags` (fs.constants) and learns what it is from the fd: a regular file or
 * a block device (BLKGETSIZE64), anything else is refused. (Node's fs opens every file
 * O_CLOEXEC already.) Errors are TargetErrors that begin
 * with `who` and say which option named the path.
 */
export function openSized(path: string, flags: number, who: string, option: string, mode = 0o644): OpenedFile {
  let fd: number;
  try {
    fd = openSync(path, flags, mode);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new TargetError(`${who}: ${option} ${path} does not exist`);
    if (code === 'EISDIR') throw new TargetError(`${who}: ${option} ${path} is a directory, not a file or block device`);
    if (code === 'EACCES' || code === 'EPERM' || code === 'EROFS') {
      throw new TargetError(`${who}: cannot open ${option} ${path} (${code}): fix its permissions or run as root`);
    }
    throw new TargetError(`${who}: cannot open ${option} ${path}: ${(e as Error).message}`);
  }
  try {
    const st = fstatSync(fd);
    if (st.isDirectory()) throw new TargetError(`${who}: ${option} ${path} is a directory, not a file or block device`);
    if (!st.isFile() && !st.isBlockDevice()) throw new TargetError(`${who}: ${option} ${path} is neither a regular file nor a block device`);
    const size = st.isBlockDevice()
      ? withScratch(8, (m) => {
        sys.ioctl(fd, BLKGETSIZE64, m.address, 'BLKGETSIZE64');
        return Number(m.view.getBigUint64(0, true));
      })
      : st.size;
    return { fd, size, isBlockDevice: st.isBlockDevice(), dev: st.dev, ino: st.ino };
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

/**
 * Reads `len` bytes of `fd` at `pos` into `buf` at `off`, continuing short reads. Returns the
 * bytes read: less than `len` only at the end of the file (the rest of `buf` is left as it was).
 */
export function readFull(fd: number, buf: Uint8Array, off: number, len: number, pos: number): number {
  let done = 0;
  while (done < len) {
    const n = readSync(fd, buf, off + done, len - done, pos + done);
    if (n === 0) break;
    done += n;
  }
  return done;
}

/** Reads like {@link readFull} and fills what lies past the end of the file with zeros. */
export function readFullOrZeros(fd: number, buf: Uint8Array, off: number, len: number, pos: number): void {
  const n = readFull(fd, buf, off, len, pos);
  if (n < len) buf.fill(0, off + n, off + len);
}

/** Writes `len` bytes of `buf` from `off` to `fd` at `pos`, continuing short writes. */
export function writeFull(fd: number, buf: Uint8Array, off: number, len: number, pos: number): void {
  let done = 0;
  while (done < len) {
    const n = writeSync(fd, buf, off + done, len - done, pos + done);
    if (n <= 0) throw ioError('EIO', `a write of ${len - done} bytes at ${pos + done} wrote nothing`);
    done += n;
  }
}

const ZEROS = Buffer.alloc(1 << 20);

/** Writes `len` zero bytes to `fd` at `pos` (allocating them: the range reads as zeros afterwards). */
export function writeZeros(fd: number, pos: number, len: number): void {
  for (let done = 0; done < len;) {
    const n = Math.min(ZEROS.length, len - done);
    writeFull(fd, ZEROS, 0, n, pos + done);
    done += n;
  }
}

/** An error whose `code` is an errno name: errorResult answers the request with that errno. */
export function ioError(code: string, message: string): Error & { code: string } {
  return Object.assign(new Error(message), { code });
}

/**
 * A small seeded generator (mulberry32): the same seed gives the same numbers in [0, 1), so a
 * fault run can be repeated exactly. Not for anything that needs real randomness.
 */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Checks that a request lies on whole blocks inside the device; throws an EINVAL-coded error if not. */
export function checkRange(who: string, offset: number, length: number, sizeBytes: number): void {
  if (offset % LAYER_BLOCK !== 0 || length % LAYER_BLOCK !== 0 || offset < 0 || length < 0 || offset + length > sizeBytes) {
    throw ioError('EINVAL', `${who}: ${length} bytes at ${offset} is not whole ${LAYER_BLOCK}-byte blocks inside the ${sizeBytes}-byte device`);
  }
}
