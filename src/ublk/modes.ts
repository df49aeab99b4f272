/**
 * The data paths ublk offers: how a request's bytes travel between the block layer and the
 * server. One table, so the CLI, `ublk list` and the queue engine name a mode the same way and
 * refuse the same combinations.
 *
 * Each mode is a UBLK_F_* flag asked for at ADD_DEV (include/uapi/linux/ublk_cmd.h) and granted or
 * not by the kernel (GET_FEATURES says beforehand; ublk_drv.c, ublk_ctrl_add_dev, clears what it
 * will not combine). What each one changes for the server:
 *   - copy (no flag): the kernel copies a WRITE's data into the tag's buffer before the request
 *     reaches us, and a READ's data out of it when we commit (ublk_map_io / ublk_unmap_io).
 *   - get_data (UBLK_F_NEED_GET_DATA, 6.0): a WRITE first completes the tag's FETCH with
 *     UBLK_IO_RES_NEED_GET_DATA and no data; the server answers UBLK_U_IO_NEED_GET_DATA with the
 *     buffer to copy into, and only then gets the request (so a server may choose the buffer
 *     late). The kernel drops the flag with user copy, zero copy and batch I/O.
 *   - user_copy (UBLK_F_USER_COPY, 6.5): the kernel copies nothing and the commands carry no
 *     buffer; the server moves a request's data itself with pread/pwrite on /dev/ublkcN at the
 *     tag's user-copy position (userCopyOffset). Not for unprivileged devices: a server that
 *     never wrote a READ's data would hand the reader stale kernel memory.
 *   - zero_copy (UBLK_F_SUPPORT_ZERO_COPY, working from 6.15): the kernel copies nothing; the
 *     server registers a request's pages as a fixed buffer of its ring (REGISTER_IO_BUF) and
 *     reads or writes them with READ_FIXED/WRITE_FIXED, so loop's data goes between the backing
 *     file and the request's pages with no copy in user space. Not for unprivileged devices.
 *   - auto_zc (UBLK_F_AUTO_BUF_REG, 6.16): the same, with the kernel registering the buffer before
 *     the request arrives and dropping it at the commit: no register/unregister commands.
 * How the queue serves each: request-data.ts. Modes still to come are refused by name in the CLI
 * (src/cli/add.ts).
 *
 * Batch I/O (UBLK_F_BATCH_IO, 7.0, kublk's -b) is not one of these: it changes how requests
 * reach the server and go back (many tags per command, batch.ts), not where their data is, and
 * goes with every data path but get_data (the kernel clears NEED_GET_DATA next to it). Nor is
 * shared-memory zero copy (UBLK_F_SHMEM_ZC, 7.1, --shmem_zc): it applies request by request, to
 * those whose pages lie in a region the server registered, and the others take the device's
 * data path (request-data.ts, beginShared).
 */
import { UBLK_F_NEED_GET_DATA, UBLK_F_UNPRIVILEGED_DEV, UBLK_F_USER_COPY, UBLK_F_SUPPORT_ZERO_COPY, UBLK_F_AUTO_BUF_REG, UBLK_F_BATCH_IO } from './abi.js';
import { DataHome } from './request-data.js';

export interface DataPathMode {
  /** The name `ublk list` shows (`data_path` in --json). */
  readonly name: string;
  /** The UBLK_F_* flag that defines it (0: copy, the default); the kernel must grant it. */
  readonly flag: number;
  /** Every UBLK_F_* flag ADD_DEV asks for in this mode (flag, and what it goes with). */
  readonly flags: number;
  /** kublk's option for it. */
  readonly option: string;
  /** One line for `ublk list -v`. */
  readonly describe: string;
  /** Where the queue finds request data in this mode (request-data.ts). */
  readonly home: DataHome;
  /** The kernel release it needs, where GET_FEATURES cannot tell (zero copy: bit 0 is older than it works). */
  readonly release?: string;
}

/**
 * The copy-free zero-copy modes also ask for USER_COPY, which the kernel combines with them
 * (ublk_ctrl_add_dev has no rule against it; kublk refuses it only by its own choice): without
 * it pread/pwrite of the char device fail with EACCES (6.15 and later), and a target whose data
 * is in its own memory (mem), a READ that must be zero-filled, or an async target could not
 * reach the request at all. With it, such data moves by one user copy, and everything a target
 * sends with fixed-buffer SQEs moves with no copy in user space.
 */
export const DATA_PATH_MODES: readonly DataPathMode[] = [
  { name: 'copy', flag: 0, flags: 0, option: '', home: DataHome.TagBuffer, describe: 'the kernel copies data between the request and a buffer per tag' },
  {
    name: 'get_data', flag: UBLK_F_NEED_GET_DATA, flags: UBLK_F_NEED_GET_DATA, option: '-g', home: DataHome.TagBuffer,
    describe: 'copy, and a WRITE\'s data is copied only when the server asks for it (NEED_GET_DATA)',
  },
  {
    name: 'user_copy', flag: UBLK_F_USER_COPY, flags: UBLK_F_USER_COPY, option: '-u', home: DataHome.UserCopy,
    describe: 'the server moves request data itself, with pread/pwrite on /dev/ublkcN (USER_COPY)',
  },
  {
    name: 'zero_copy', flag: UBLK_F_SUPPORT_ZERO_COPY, flags: UBLK_F_SUPPORT_ZERO_COPY | UBLK_F_USER_COPY, option: '-z',
    home: DataHome.FixedBuffer, release: '6.15',
    describe: 'request pages are registered as fixed buffers of the queue\'s ring (REGISTER_IO_BUF): file I/O without a copy in user space',
  },
  {
    name: 'auto_zc', flag: UBLK_F_AUTO_BUF_REG, flags: UBLK_F_AUTO_BUF_REG | UBLK_F_USER_COPY, option: '--auto_zc', home: DataHome.FixedBuffer,
    describe: 'zero copy with the kernel registering each request\'s pages itself (AUTO_BUF_REG)',
  },
];

const COPY_FREE = UBLK_F_USER_COPY | UBLK_F_SUPPORT_ZERO_COPY | UBLK_F_AUTO_BUF_REG;

/**
 * Why these ADD_DEV flags ask for a combination of modes the kernel would not grant as asked,
 * or undefined. Checked before anything exists (ublk_ctrl_add_dev clears NEED_GET_DATA silently
 * next to the copy-free modes, and refuses those on an unprivileged device).
 */
export function dataPathProblem(flags: number): string | undefined {
  const m = dataPathOf(flags);
  if ((flags & UBLK_F_NEED_GET_DATA) && (flags & COPY_FREE)) {
    return `-g (get_data) and ${m.option} (${m.name}) exclude each other: get_data is a way of copying, and ${m.name} copies nothing`;
  }
  if ((flags & UBLK_F_NEED_GET_DATA) && (flags & UBLK_F_BATCH_IO)) {
    return '-g (get_data) and -b (batch I/O) exclude each other: batch I/O commits carry no NEED_GET_DATA step, and the kernel drops -g next to -b';
  }
  if ((flags & COPY_FREE) && (flags & UBLK_F_UNPRIVILEGED_DEV)) {
    return `${m.option} (${m.name}) cannot be used with --unprivileged: the kernel allows the copy-free modes only on devices root adds`;
  }
  return undefined;
}

/** Flags that choose where data goes. */
const MODE_FLAGS = UBLK_F_NEED_GET_DATA | COPY_FREE;

const byFlag = (flag: number) => DATA_PATH_MODES.find((x) => x.flag === flag)!;

/**
 * The mode a device with these (negotiated) flags runs in: the most copy-free one it has
 * (auto_zc, then zero_copy, user_copy, get_data), or copy.
 */
export function dataPathOf(flags: number): DataPathMode {
  const chosen = flags & MODE_FLAGS;
  for (const f of [UBLK_F_AUTO_BUF_REG, UBLK_F_SUPPORT_ZERO_COPY, UBLK_F_USER_COPY, UBLK_F_NEED_GET_DATA]) {
    if (chosen & f) return byFlag(f);
  }
  return byFlag(0);
}

/** What a queue needs to know of its device's data path (UblkQueueOptions' part). */
export interface QueueDataPath {
  dataHome: DataHome;
  bufferRegistration?: 'manual' | 'auto' | 'auto-fallback';
  memoryCopy?: boolean;
  /** Batch I/O (UBLK_F_BATCH_IO): requests come and go in groups (batch.ts). */
  batch?: boolean;
}

/**
 * The queue's data path for a device with these negotiated flags (so a recovering server serves
 * the mode the device was added with). `autoFallback`: the commands ask for
 * UBLK_AUTO_BUF_REG_FALLBACK (`--auto_zc_fallback`), for which the device must also have zero
 * copy (the queue then registers what the kernel could not).
 */
export function queueDataPath(flags: number, autoFallback = false): QueueDataPath {
  const m = dataPathOf(flags);
  const batch = (flags & UBLK_F_BATCH_IO) !== 0 ? { batch: true } : {};
  if (m.home !== DataHome.FixedBuffer) return { dataHome: m.home, ...batch };
  const auto = m.flag === UBLK_F_AUTO_BUF_REG;
  return {
    ...batch,
    dataHome: m.home,
    bufferRegistration: !auto ? 'manual' : autoFallback && (flags & UBLK_F_SUPPORT_ZERO_COPY) ? 'auto-fallback' : 'auto',
    memoryCopy: (flags & UBLK_F_USER_COPY) !== 0,
  };
}

/** Kernel release `release` (uname -r, e.g. '6.12.117+deb12-amd64') is `need` ('6.15') or later. */
export function releaseAtLeast(release: string, need: string): boolean {
  const have = /^(\d+)\.(\d+)/.exec(release);
  const [nMaj, nMin] = need.split('.').map(Number) as [number, number];
  if (!have) return true; // an unparsable release: let GET_FEATURES and the kernel decide
  const maj = Number(have[1]);
  return maj > nMaj || (maj === nMaj && Number(have[2]) >= nMin);
}

/** The kernel with these GET_FEATURES bits and this release can run mode `m`. */
export function modeAvailable(m: DataPathMode, features: number, release: string): boolean {
  return (m.flag === 0 || (features & m.flag) !== 0) && (m.release === undefined || releaseAtLeast(release, m.release));
}
