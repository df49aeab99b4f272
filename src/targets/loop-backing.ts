/**
 * The loop target's backing: opening it, and learning what it is (size, block sizes, whether it
 * can discard) from the open descriptor.
 *
 * Every decision comes from the fd we opened (fstat, fstatfs, ioctl, a probing pread), never
 * from a second lookup of the path: between a stat of the path and the open, the path could
 * become something else (a FIFO, say, whose open would block forever). The open itself is
 * O_NONBLOCK so that whatever the path names, opening it returns at once; the flag stays on a
 * tmpfs file (see onTmpfs) and is cleared everywhere else.
 */
import { fstatSync, readFileSync, type Stats } from 'node:fs';
import { Mapping, SysError, libc, sys, withScratch } from '../libc/index.js';
import { TargetError } from '../ublk/target.js';
import { BLKGETSIZE64, BLKPBSZGET, BLKROGET, BLKSSZGET, TMPFS_MAGIC } from './abi.js';

/** What we learned about the backing while opening it. */
export interface Backing {
  fd: number;
  isBlockDevice: boolean;
  /** Bytes. */
  size: number;
  /** The smallest block we can address: the sector size, or the O_DIRECT alignment. */
  logicalBlockSize: number;
  physicalBlockSize: number;
  /** A block device we may not write (BLKROGET). */
  readOnly: boolean;
  /** Discard granularity and whether the backing can punch holes. */
  discardGranularity: number;
  canDiscard: boolean;
  /** The fd keeps O_NONBLOCK (a tmpfs file): io_uring serves it inline. */
  nonBlocking: boolean;
}

export interface BackingRequest {
  /** Absolute path of the file or block device. */
  file: string;
  readOnly: boolean;
  /** Through the page cache instead of O_DIRECT. */
  buffered: boolean;
}

/** Opens the backing and probes it; throws a TargetError that names the fix. */
export function openBacking(o: BackingRequest): Backing {
  // Without O_DIRECT for now: a FIFO or a socket would refuse it (EINVAL) before fstat could
  // name what they are. It is set below, once we know we have a file or a block device.
  const flags = (o.readOnly ? libc.O_RDONLY : libc.O_RDWR) | libc.O_CLOEXEC | libc.O_NOCTTY | libc.O_NONBLOCK;
  let fd: number;
  try {
    fd = sys.open(o.file, flags);
  } catch (e) {
    throw openError(o, e);
  }
  try {
    const st = fstatSync(fd);
    if (st.isDirectory()) throw new TargetError(`loop: ${o.file} is a directory; -f takes a file or a block device`);
    if (!st.isFile() && !st.isBlockDevice()) throw new TargetError(`loop: ${o.file} is neither a regular file nor a block device`);
    if (st.isFile() && !o.readOnly && (st.mode & 0o222) === 0) {
      // Root could write it anyway; the missing write bits are the owner's "do not", so ask.
      throw new TargetError(`loop: ${o.file} is read-only (mode ${(st.mode & 0o777).toString(8).padStart(4, '0')}): add --read-only, or chmod u+w it`);
    }
    const nonBlocking = st.isFile() && onTmpfs(fd);
    let fl = sys.getFileFlags(fd);
    if (!nonBlocking) fl &= ~libc.O_NONBLOCK;
    if (!o.buffered) fl |= libc.O_DIRECT;
    try {
      sys.setFileFlags(fd, fl);
    } catch (e) {
      if (e instanceof SysError && e.code === 'EINVAL' && !o.buffered) {
        throw new TargetError(`loop: the file system of ${o.file} does not support O_DIRECT: add --buffered`);
      }
      throw e;
    }
    const b = st.isBlockDevice() ? probeBlockDevice(fd, st) : probeFile(fd, st, o.buffered);
    return { ...b, nonBlocking };
  } catch (e) {
    sys.close(fd);
    throw e;
  }
}

function openError(o: BackingRequest, e: unknown): Error {
  if (!(e instanceof SysError)) return e as Error;
  switch (e.code) {
    case 'ENOENT': return new TargetError(`loop: ${o.file} does not exist`);
    case 'EISDIR': return new TargetError(`loop: ${o.file} is a directory; -f takes a file or a block device`);
    case 'ENXIO': return new TargetError(`loop: ${o.file} has no device behind it (ENXIO)`);
    case 'EROFS': case 'EACCES': case 'EPERM': case 'ETXTBSY':
      if (!o.readOnly) return new TargetError(`loop: ${o.file} cannot be opened for writing (${e.code}): add --read-only${e.code === 'EACCES' ? ', or run as root' : ''}`);
      if (e.code === 'EACCES') return new TargetError(`loop: cannot read ${o.file} (EACCES): run as root or fix its permissions`);
      break;
    default:
      break;
  }
  return new TargetError(`loop: cannot open ${o.file}: ${e.message}`);
}

/**
 * Whether the open file `fd` lives on tmpfs, whose files we keep O_NONBLOCK so that io_uring
 * reads and writes them inline instead of in its io-wq worker threads.
 *
 * io_uring issues a READ/WRITE from the submitting thread only when the file promises not to
 * block under IOCB_NOWAIT; otherwise it hands the request to an io-wq worker at once, which costs
 * two thread wake-ups per request. The promise is FMODE_NOWAIT, or O_NONBLOCK on the open file
 * (io_uring/io_uring.c, io_file_get_flags: "any ->read/write should understand O_NONBLOCK").
 * ext4, xfs, btrfs and block devices set FMODE_NOWAIT themselves. tmpfs does not
 * (mm/shmem.c, shmem_file_open sets only FMODE_CAN_ODIRECT), yet its reads and O_DIRECT writes
 * are copies to and from page-cache memory that never wait for a device, so running them inline
 * is safe; buffered writes io_uring still punts itself (io_write: no FOP_BUFFER_WASYNC). Measured
 * in the VM (6.12, 4 KiB, QD 32): about 1.5x the IOPS, and 2.7x at QD 1. Other file systems keep
 * their default: on NFS or FUSE a read that ignored O_NONBLOCK could stall the whole queue
 * behind one slow server.
 */
function onTmpfs(fd: number): boolean {
  try {
    return withScratch(libc.statfs.SIZE, (m) => sys.fstatfsType(fd, m.address)) === TMPFS_MAGIC;
  } catch {
    return false; // not knowing only costs speed
  }
}

type Probed = Omit<Backing, 'nonBlocking'>;

function probeBlockDevice(fd: number, st: Stats): Probed {
  return withScratch(16, (m) => {
    sys.ioctl(fd, BLKGETSIZE64, m.address, 'BLKGETSIZE64');
    const size = Number(m.view.getBigUint64(0, true));
    sys.ioctl(fd, BLKSSZGET, m.address, 'BLKSSZGET');
    const lbs = m.view.getInt32(0, true);
    sys.ioctl(fd, BLKPBSZGET, m.address, 'BLKPBSZGET');
    const pbs = m.view.getUint32(0, true);
    sys.ioctl(fd, BLKROGET, m.address, 'BLKROGET');
    const ro = m.view.getInt32(0, true) !== 0;
    // fallocate(PUNCH_HOLE) on a block device is a zero-out that must unmap (blkdev_fallocate):
    // it works where the device takes REQ_OP_WRITE_ZEROES; ZERO_RANGE works everywhere. (sysfs
    // is named by the device number fstat gave, so it describes the device we hold.)
    const q = `/sys/dev/block/${major(st.rdev)}:${minor(st.rdev)}/queue`;
    const wz = readNumber(`${q}/write_zeroes_max_bytes`);
    return {
      fd, isBlockDevice: true, size, logicalBlockSize: lbs, physicalBlockSize: Math.max(pbs, lbs), readOnly: ro,
      discardGranularity: Math.max(lbs, readNumber(`${q}/discard_granularity`)), canDiscard: wz > 0,
    };
  });
}

function probeFile(fd: number, st: Stats, buffered: boolean): Probed {
  const lbs = buffered ? 512 : directIoAlignment(fd, st.size);
  // The file system's block: the unit it allocates and punches in.
  const fsBlock = powerOfTwoIn(st.blksize, lbs, 65536);
  return {
    fd, isBlockDevice: false, size: st.size, logicalBlockSize: lbs, physicalBlockSize: Math.max(lbs, Math.min(fsBlock, 4096)),
    readOnly: false, discardGranularity: fsBlock, canDiscard: true,
  };
}

/**
 * The smallest block O_DIRECT accepts on this file: 512 where the file system allows it, up to
 * 4096 (a file system on a 4Kn disk). Measured with a real read rather than statx's
 * dio_offset_align, which only 6.1+ reports and not for every file system.
 */
function directIoAlignment(fd: number, size: number): number {
  const m = Mapping.anonymous(8192);
  try {
    for (let bs = 512; bs <= 4096; bs *= 2) {
      try {
        sys.pread(fd, m.address + bs, bs, size >= 2 * bs ? bs : 0);
        return bs;
      } catch (e) {
        if (!(e instanceof SysError && e.code === 'EINVAL')) throw e;
      }
    }
  } finally {
    m.unmap();
  }
  throw new TargetError('loop: O_DIRECT refuses even 4096-byte aligned reads on this file: add --buffered');
}

// glibc's dev_t encoding (<bits/sysmacros.h>): major in bits 8-19 and 44-63, minor in 0-7 and 20-43.
function major(dev: number): number {
  return ((dev >>> 8) & 0xfff) + Math.floor(dev / 2 ** 44) * 0x1000;
}
function minor(dev: number): number {
  return (dev & 0xff) + (Math.floor(dev / 2 ** 20) % 2 ** 24) * 0x100;
}

function readNumber(path: string): number {
  try {
    return Number(readFileSync(path, 'utf8').trim()) || 0;
  } catch {
    return 0;
  }
}

/** The power of two nearest below `n`, within [lo, hi]. */
function powerOfTwoIn(n: number, lo: number, hi: number): number {
  let p = lo;
  while (p * 2 <= Math.min(n, hi)) p *= 2;
  return p;
}
