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
 * Modes still to come are refused by name in the CLI (src/cli/add.ts).
 */
import { UBLK_F_NEED_GET_DATA, UBLK_F_UNPRIVILEGED_DEV, UBLK_F_USER_COPY, UBLK_F_SUPPORT_ZERO_COPY, UBLK_F_AUTO_BUF_REG, UBLK_F_BATCH_IO, UBLK_F_SHMEM_ZC } from './abi.js';

export interface DataPathMode {
  /** The name `ublk list` shows (`data_path` in --json). */
  readonly name: string;
  /** The UBLK_F_* flag that selects it (0: copy, the default). */
  readonly flag: number;
  /** kublk's option for it. */
  readonly option: string;
  /** One line for `ublk list -v`. */
  readonly describe: string;
}

export const DATA_PATH_MODES: readonly DataPathMode[] = [
  { name: 'copy', flag: 0, option: '', describe: 'the kernel copies data between the request and a buffer per tag' },
  {
    name: 'get_data', flag: UBLK_F_NEED_GET_DATA, option: '-g',
    describe: 'copy, and a WRITE\'s data is copied only when the server asks for it (NEED_GET_DATA)',
  },
  {
    name: 'user_copy', flag: UBLK_F_USER_COPY, option: '-u',
    describe: 'the server moves request data itself, with pread/pwrite on /dev/ublkcN (USER_COPY)',
  },
];

/**
 * Why these ADD_DEV flags ask for a combination of modes the kernel would not grant as asked,
 * or undefined. Checked before anything exists (ublk_ctrl_add_dev clears NEED_GET_DATA silently
 * next to the copy-free modes, and refuses user copy on an unprivileged device).
 */
export function dataPathProblem(flags: number): string | undefined {
  const modes = DATA_PATH_MODES.filter((m) => m.flag && (flags & m.flag));
  if (modes.length > 1) {
    return `${modes.map((m) => `${m.option} (${m.name})`).join(' and ')} exclude each other: a device has one data path`;
  }
  if ((flags & UBLK_F_USER_COPY) && (flags & UBLK_F_UNPRIVILEGED_DEV)) {
    return '-u (user_copy) cannot be used with --unprivileged: the kernel allows user copy only on devices root adds';
  }
  return undefined;
}

/** Flags that choose where data goes; a device has at most one of them that we serve. */
const MODE_FLAGS = UBLK_F_NEED_GET_DATA | UBLK_F_USER_COPY | UBLK_F_SUPPORT_ZERO_COPY | UBLK_F_AUTO_BUF_REG | UBLK_F_BATCH_IO | UBLK_F_SHMEM_ZC;

/**
 * The mode a device with these (negotiated) flags runs in. A flag this server does not serve
 * yet (another server's device, seen by `ublk list`) is named by its bits.
 */
export function dataPathOf(flags: number): DataPathMode {
  const chosen = flags & MODE_FLAGS;
  const m = DATA_PATH_MODES.find((x) => x.flag === chosen);
  if (m) return m;
  return { name: `flags 0x${chosen.toString(16)}`, flag: chosen, option: '', describe: 'a data path this server does not serve' };
}
