/**
 * The ublk wire encoding, as small pure functions: what goes into an SQE for an I/O command
 * (FETCH_REQ, COMMIT_AND_FETCH_REQ, NEED_GET_DATA on /dev/ublkcN) and for a control command (on
 * /dev/ublk-control), and how a request descriptor is read from a queue's descriptor array. The
 * queue engine (queue.ts) and the control device (control.ts) only call these;
 * test/ublk/wire.test.ts checks them word by word, the way the ring tests check ring state.
 *
 * Layouts are those of src/ublk/abi.ts (struct ublksrv_io_cmd, ublksrv_ctrl_cmd,
 * ublksrv_io_desc, all in include/uapi/linux/ublk_cmd.h); an SQE is addressed as in
 * src/uring/prep.ts, `(s, w)` = the ring's SQE words and the SQE's first word.
 */
import { prepUringCmd, setBufferSelect, setFlags, setU64, getU64, cmdWord, abi as uringAbi } from '../uring/index.js';
import { ublksrv_io_cmd, ublksrv_ctrl_cmd, ublksrv_io_desc, ublk_batch_io, UBLK_U_IO_FETCH_IO_CMDS } from './abi.js';

/** dev_id for "let the kernel choose" (ADD_DEV) or "no device" (GET_FEATURES): -1 as a __u32. */
export const ANY_DEV_ID = 0xffffffff;
/** queue_id of a control command that is not about one queue: -1 as a __u16. */
export const NO_QUEUE_ID = 0xffff;
/**
 * ublk counts in 512-byte sectors whatever the logical block size: start_sector and nr_sectors
 * of a descriptor, dev_sectors and max_sectors of the parameters (the kernel's SECTOR_SHIFT,
 * include/linux/blk_types.h).
 */
export const SECTOR_SHIFT = 9;
export const SECTOR_SIZE = 1 << SECTOR_SHIFT;

/** Word offset of a byte offset in a struct (every ublk field we write is 32-bit aligned). */
const W = (byteOffset: number) => byteOffset >>> 2;

/**
 * An I/O command: a URING_CMD carrying `struct ublksrv_io_cmd` {q_id, tag, result, addr}.
 * `op` is UBLK_U_IO_FETCH_REQ, _COMMIT_AND_FETCH_REQ or _NEED_GET_DATA; `file` is the char
 * device's fd, or its index in the ring's file table when `fixed` (IOSQE_FIXED_FILE); `result`
 * is the COMMIT's (ignored by FETCH); `addr` the tag's buffer in copy mode, 0 otherwise.
 * user_data is left 0 for the caller to set.
 */
export function prepIoCmd(
  s: Uint32Array, w: number, op: number, file: number, fixed: boolean, qid: number, tag: number, result: number, addr: number,
): void {
  prepUringCmd(s, w, op, file, ublksrv_io_cmd.SIZE >>> 2);
  if (fixed) setFlags(s, w, uringAbi.IOSQE_FIXED_FILE);
  const c = cmdWord(w);
  s[c + W(ublksrv_io_cmd.q_id)] = (qid & 0xffff) | ((tag & 0xffff) << 16); // __u16 q_id, __u16 tag
  s[c + W(ublksrv_io_cmd.result)] = result; // __s32: stored as its two's complement
  setU64(s, c + W(ublksrv_io_cmd.addr), addr);
}

/**
 * A batch I/O command (UBLK_F_BATCH_IO, 7.0): a URING_CMD carrying `struct ublk_batch_io`
 * {q_id, flags, nr_elem, elem_bytes}, with sqe->addr pointing at `nrElem` elements of
 * `elemBytes` each (PREP_IO_CMDS, COMMIT_IO_CMDS; the kernel reads them while it issues the
 * command) and sqe->len their size. FETCH_IO_CMDS passes no elements: the kernel writes u16 tags
 * into a provided buffer instead, so its `elemBytes` is 2 and `buf` 0 (see prepBatchFetch).
 */
export function prepBatchCmd(
  s: Uint32Array, w: number, op: number, file: number, qid: number, flags: number, nrElem: number, elemBytes: number, buf: number,
): void {
  prepUringCmd(s, w, op, file, ublk_batch_io.SIZE >>> 2);
  setFlags(s, w, uringAbi.IOSQE_FIXED_FILE);
  setU64(s, w + W(uringAbi.io_uring_sqe.addr), buf);
  s[w + W(uringAbi.io_uring_sqe.len)] = nrElem * elemBytes;
  const c = cmdWord(w);
  s[c + W(ublk_batch_io.q_id)] = (qid & 0xffff) | ((flags & 0xffff) << 16); // __u16 q_id, __u16 flags
  s[c + W(ublk_batch_io.nr_elem)] = (nrElem & 0xffff) | ((elemBytes & 0xff) << 16); // __u16 nr_elem, __u8 elem_bytes, __u8 reserved
}

/**
 * FETCH_IO_CMDS: a multishot command (IORING_URING_CMD_MULTISHOT) that posts a CQE whenever
 * requests arrive, its result the bytes of u16 tags written into a buffer the kernel takes from
 * provided-buffer group `group` (IOSQE_BUFFER_SELECT, sqe->buf_group). `nrElem` is the most tags
 * the buffer holds.
 */
export function prepBatchFetch(s: Uint32Array, w: number, file: number, qid: number, nrElem: number, group: number): void {
  prepBatchCmd(s, w, UBLK_U_IO_FETCH_IO_CMDS, file, qid, 0, nrElem, 2, 0);
  s[w + W(uringAbi.io_uring_sqe.len)] = 0;
  s[w + W(uringAbi.io_uring_sqe.uring_cmd_flags)] = uringAbi.IORING_URING_CMD_MULTISHOT;
  setBufferSelect(s, w, group);
}

/** The fields of a control command (`struct ublksrv_ctrl_cmd`); absent ones are 0 (queueId: none). */
export interface CtrlCmd {
  devId: number;
  queueId?: number;
  /** Bytes of the payload at `addr` the kernel may read or write. */
  len?: number;
  addr?: number;
  /** data[0]: a pid, a size, a queue id, a timeout ... depending on the command. */
  data?: number;
  /** GET_DEV_INFO2 and unprivileged devices: length of the char-device path in front of the payload. */
  devPathLen?: number;
}

/**
 * A control command: a URING_CMD on /dev/ublk-control (`fd`) carrying `struct
 * ublksrv_ctrl_cmd` (32 bytes, so the ring must use SQE128: `payloadWords` = the ring's
 * cmdWords, 20). user_data is left 0 for the caller to set.
 */
export function prepCtrlCmd(s: Uint32Array, w: number, payloadWords: number, op: number, fd: number, cmd: CtrlCmd): void {
  if (payloadWords * 4 < ublksrv_ctrl_cmd.SIZE) {
    throw new RangeError(`a control command needs ${ublksrv_ctrl_cmd.SIZE} bytes of payload: use an SQE128 ring`);
  }
  prepUringCmd(s, w, op, fd, payloadWords);
  const c = cmdWord(w);
  s[c + W(ublksrv_ctrl_cmd.dev_id)] = cmd.devId;
  s[c + W(ublksrv_ctrl_cmd.queue_id)] = ((cmd.queueId ?? NO_QUEUE_ID) & 0xffff) | ((cmd.len ?? 0) << 16); // __u16 queue_id, __u16 len
  setU64(s, c + W(ublksrv_ctrl_cmd.addr), cmd.addr ?? 0);
  setU64(s, c + W(ublksrv_ctrl_cmd.data), cmd.data ?? 0);
  s[c + W(ublksrv_ctrl_cmd.dev_path_len)] = (cmd.devPathLen ?? 0) & 0xffff; // __u16, then __u16 pad
}

/** One request as the kernel describes it in `struct ublksrv_io_desc`. */
export interface IoDesc {
  /** UBLK_IO_OP_*: op_flags bits 0-7. */
  op: number;
  /** UBLK_IO_F_*: op_flags bits 8-31, unshifted (test with `flags & UBLK_IO_F_FUA`). */
  flags: number;
  /** nr_sectors (512-byte units; nr_zones for REPORT_ZONES). */
  nrSectors: number;
  /** start_sector (512-byte units). */
  startSector: number;
  /** addr: the buffer address the server gave (copy mode), or an index/offset (SHMEM_ZC). */
  addr: number;
}

/**
 * Reads tag `tag`'s descriptor from a queue's descriptor array (`d`: the mapping's u32 words)
 * into `out`, which is returned (no allocation: the hot path reuses one object).
 */
export function readIoDesc(d: Uint32Array, tag: number, out: IoDesc): IoDesc {
  const i = tag * W(ublksrv_io_desc.SIZE);
  const opFlags = d[i + W(ublksrv_io_desc.op_flags)]!;
  out.op = opFlags & 0xff;
  out.flags = (opFlags & ~0xff) >>> 0;
  out.nrSectors = d[i + W(ublksrv_io_desc.nr_sectors)]!;
  out.startSector = getU64(d, i + W(ublksrv_io_desc.start_sector));
  out.addr = getU64(d, i + W(ublksrv_io_desc.addr));
  return out;
}
