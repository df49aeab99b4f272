/**
 * SQE preparation: one function per operation, each writing a whole submission queue entry.
 *
 * An SQE is addressed as `(s, w)`: `s` is the ring's `Uint32Array` over the SQE array
 * ({@link IoUring.sqes}) and `w` the word index that {@link IoUring.getSqe} returned. Every field
 * of `struct io_uring_sqe` (see `io_uring_sqe` in abi.ts) falls on a 32-bit word boundary or
 * packs into one (opcode | flags << 8 | ioprio << 16), so an SQE is written with sixteen u32
 * stores and no DataView, BigInt or allocation. Word map of the 64-byte SQE:
 *
 *   w+0  opcode, flags, ioprio     w+6  len             w+11 splice_fd_in / file_index
 *   w+1  fd                        w+7  op flags        w+12 addr3 (cmd[] starts here)
 *   w+2  off / addr2 / cmd_op      w+8  user_data lo    w+14 __pad2
 *   w+4  addr                      w+10 buf_index, personality
 *
 * 64-bit values (`off`, `addr`) are JS numbers: exact up to 2^53, which covers every user-space
 * address and file offset; -1 encodes as all ones, the "current file position" marker.
 * Like liburing's `io_uring_prep_*`, every prep function resets user_data to 0 and clears the
 * SQE flags; set them afterwards with {@link setUserData} and {@link setFlags}.
 */
import {
  IORING_OP_NOP, IORING_OP_READ, IORING_OP_WRITE, IORING_OP_READV, IORING_OP_WRITEV,
  IORING_OP_READ_FIXED, IORING_OP_WRITE_FIXED, IORING_OP_FSYNC, IORING_OP_FALLOCATE,
  IORING_OP_POLL_ADD, IORING_OP_POLL_REMOVE, IORING_OP_TIMEOUT, IORING_OP_TIMEOUT_REMOVE,
  IORING_OP_LINK_TIMEOUT, IORING_OP_ASYNC_CANCEL, IORING_OP_URING_CMD, IORING_OP_SEND,
  IORING_OP_RECV, IORING_OP_OPENAT, IORING_OP_CLOSE, IORING_OP_SENDMSG, IORING_OP_SOCKET, IORING_OP_CONNECT, IORING_OP_SHUTDOWN, IORING_FSYNC_DATASYNC, IOSQE_FIXED_FILE, IOSQE_BUFFER_SELECT, IORING_ASYNC_CANCEL_FD,
} from './abi.js';

/**
 * 2^-32. Multiplying by a power of two only changes the exponent, so `v * INV_TWO32` is exact for
 * every integer below 2^53 and `Math.floor` of it is the high word. Measured: a multiply is ~3 ns
 * cheaper per 64-bit field than dividing by 2^32, and SQE writes are the ring's hottest JS path.
 */
const INV_TWO32 = 2.3283064365386963e-10;

/** The high 32 bits of an integer |v| < 2^53 (all ones for negative values down to -2^32). */
function hi32(v: number): number {
  return Math.floor(v * INV_TWO32) >>> 0;
}

/**
 * Stores a 64-bit field that spans words `i` (low) and `i + 1` (high) of `words`, from a number:
 * exact for integers below 2^53 (every address and file offset), and -1 becomes all ones. The
 * one helper for every u64 in SQEs and in the structs the kernel reads (no BigInt, no DataView).
 */
export function setU64(words: Uint32Array, i: number, value: number): void {
  words[i] = value >>> 0; // ToUint32 keeps the low 32 bits of any integer below 2^53
  words[i + 1] = hi32(value);
}

/** Reads the 64-bit field at words `i`, `i + 1` as a number (exact below 2^53). */
export function getU64(words: Uint32Array, i: number): number {
  return words[i]! + words[i + 1]! * 4294967296;
}

/**
 * The common read/write layout; liburing's `io_uring_prep_rw`. Writes all 16 words of the
 * 64-byte entry, so no stale field of a previous use of the slot survives.
 */
export function prepRw(s: Uint32Array, w: number, op: number, fd: number, addr: number, len: number, off: number): void {
  s[w] = op; // flags = 0, ioprio = 0
  s[w + 1] = fd;
  setU64(s, w + 2, off);
  setU64(s, w + 4, addr);
  s[w + 6] = len;
  s[w + 7] = 0;
  s[w + 8] = 0;
  s[w + 9] = 0;
  s[w + 10] = 0;
  s[w + 11] = 0;
  s[w + 12] = 0;
  s[w + 13] = 0;
  s[w + 14] = 0;
  s[w + 15] = 0;
}

/** Sets the 64-bit user_data from a number below 2^53; `io_uring_sqe_set_data64`. */
export function setUserData(s: Uint32Array, w: number, userData: number): void {
  setU64(s, w + 8, userData);
}

/** Sets user_data from two 32-bit halves (the full 64-bit space, no BigInt). */
export function setUserData2(s: Uint32Array, w: number, lo: number, hi: number): void {
  s[w + 8] = lo;
  s[w + 9] = hi;
}

/** Sets `sqe->flags` (IOSQE_*); `io_uring_sqe_set_flags`. */
export function setFlags(s: Uint32Array, w: number, flags: number): void {
  s[w] = (s[w]! & 0xffff00ff) | ((flags & 0xff) << 8);
}

/** ORs IOSQE_* flags into `sqe->flags`. */
export function addFlags(s: Uint32Array, w: number, flags: number): void {
  s[w] = s[w]! | ((flags & 0xff) << 8);
}

/** Sets `sqe->ioprio` (also the flags word of send/recv/poll-first variants). */
export function setIoprio(s: Uint32Array, w: number, ioprio: number): void {
  s[w] = (s[w]! & 0x0000ffff) | ((ioprio & 0xffff) << 16);
}

/** Sets the per-opcode flags word (`rw_flags`, `timeout_flags`, `cancel_flags`, ...). */
export function setOpFlags(s: Uint32Array, w: number, flags: number): void {
  s[w + 7] = flags;
}

/** Marks `fd` as an index into the registered file table (IOSQE_FIXED_FILE). */
export function setFixedFile(s: Uint32Array, w: number): void {
  addFlags(s, w, IOSQE_FIXED_FILE);
}

/** `io_uring_prep_nop`: completes with res 0; the cheapest way to measure the ring itself. */
export function prepNop(s: Uint32Array, w: number): void {
  // Spelled out rather than through prepRw: the benchmark's per-op cost is mostly these stores.
  // (A loop here measured 2x slower than the unrolled stores.)
  s[w] = IORING_OP_NOP;
  s[w + 1] = -1;
  s[w + 2] = 0;
  s[w + 3] = 0;
  s[w + 4] = 0;
  s[w + 5] = 0;
  s[w + 6] = 0;
  s[w + 7] = 0;
  s[w + 8] = 0;
  s[w + 9] = 0;
  s[w + 10] = 0;
  s[w + 11] = 0;
  s[w + 12] = 0;
  s[w + 13] = 0;
  s[w + 14] = 0;
  s[w + 15] = 0;
}

/** `io_uring_prep_read`: read `len` bytes at file offset `off` (-1: current position) into `addr`. */
export function prepRead(s: Uint32Array, w: number, fd: number, addr: number, len: number, off: number): void {
  prepRw(s, w, IORING_OP_READ, fd, addr, len, off);
}

/** `io_uring_prep_write`. */
export function prepWrite(s: Uint32Array, w: number, fd: number, addr: number, len: number, off: number): void {
  prepRw(s, w, IORING_OP_WRITE, fd, addr, len, off);
}

/** `io_uring_prep_readv`: `iovecs` is the address of `nr` `struct iovec` in mapped memory. */
export function prepReadv(s: Uint32Array, w: number, fd: number, iovecs: number, nr: number, off: number): void {
  prepRw(s, w, IORING_OP_READV, fd, iovecs, nr, off);
}

/** `io_uring_prep_writev`. */
export function prepWritev(s: Uint32Array, w: number, fd: number, iovecs: number, nr: number, off: number): void {
  prepRw(s, w, IORING_OP_WRITEV, fd, iovecs, nr, off);
}

/**
 * `io_uring_prep_read_fixed`: `addr`/`len` must lie inside registered buffer `bufIndex`
 * (see {@link IoUring.registerBuffers}); the kernel skips pinning pages per I/O.
 */
export function prepReadFixed(s: Uint32Array, w: number, fd: number, addr: number, len: number, off: number, bufIndex: number): void {
  prepRw(s, w, IORING_OP_READ_FIXED, fd, addr, len, off);
  s[w + 10] = bufIndex & 0xffff;
}

/** `io_uring_prep_write_fixed`. */
export function prepWriteFixed(s: Uint32Array, w: number, fd: number, addr: number, len: number, off: number, bufIndex: number): void {
  prepRw(s, w, IORING_OP_WRITE_FIXED, fd, addr, len, off);
  s[w + 10] = bufIndex & 0xffff;
}

/**
 * Lets the kernel pick this SQE's buffer from provided-buffer group `group` (buf-ring.ts) when
 * data arrives: IOSQE_BUFFER_SELECT and sqe->buf_group, as liburing's callers set them by hand.
 * The CQE then carries IORING_CQE_F_BUFFER and the buffer id in its upper 16 flag bits.
 */
export function setBufferSelect(s: Uint32Array, w: number, group: number): void {
  addFlags(s, w, IOSQE_BUFFER_SELECT);
  s[w + 10] = ((s[w + 10]! & 0xffff0000) | (group & 0xffff)) >>> 0;
}

/** `io_uring_prep_fsync`; `datasync` sets IORING_FSYNC_DATASYNC (fdatasync semantics). */
export function prepFsync(s: Uint32Array, w: number, fd: number, datasync = false): void {
  prepRw(s, w, IORING_OP_FSYNC, fd, 0, 0, 0);
  s[w + 7] = datasync ? IORING_FSYNC_DATASYNC : 0;
}

/** `io_uring_prep_fallocate`: `mode` is FALLOC_FL_*; the length travels in `addr`, as the kernel wants. */
export function prepFallocate(s: Uint32Array, w: number, fd: number, mode: number, off: number, len: number): void {
  prepRw(s, w, IORING_OP_FALLOCATE, fd, len, mode, off);
}

/** `io_uring_prep_poll_add`: one-shot poll for `events` (POLLIN, ...). */
export function prepPollAdd(s: Uint32Array, w: number, fd: number, events: number): void {
  prepRw(s, w, IORING_OP_POLL_ADD, fd, 0, 0, 0);
  s[w + 7] = events; // poll32_events, little-endian layout
}

/** `io_uring_prep_poll_multishot`: keeps posting CQEs with IORING_CQE_F_MORE. */
export function prepPollMultishot(s: Uint32Array, w: number, fd: number, events: number): void {
  prepPollAdd(s, w, fd, events);
  s[w + 6] = 1; // IORING_POLL_ADD_MULTI, carried in sqe->len
}

/** `io_uring_prep_poll_remove`: cancels the poll whose user_data is `target` (< 2^53). */
export function prepPollRemove(s: Uint32Array, w: number, target: number): void {
  prepRw(s, w, IORING_OP_POLL_REMOVE, -1, target, 0, 0);
}

/**
 * `io_uring_prep_timeout`: completes after the `struct __kernel_timespec` at `ts` elapses
 * (res -ETIME) or after `count` other completions (res 0). The kernel copies the timespec at
 * submission, but keep it in mapped memory like everything the kernel reads.
 */
export function prepTimeout(s: Uint32Array, w: number, ts: number, count: number, flags: number): void {
  prepRw(s, w, IORING_OP_TIMEOUT, -1, ts, 1, count);
  s[w + 7] = flags;
}

/** `io_uring_prep_timeout_remove`: cancels the timeout whose user_data is `target`. */
export function prepTimeoutRemove(s: Uint32Array, w: number, target: number, flags: number): void {
  prepRw(s, w, IORING_OP_TIMEOUT_REMOVE, -1, target, 0, 0);
  s[w + 7] = flags;
}

/**
 * `io_uring_prep_link_timeout`: must directly follow an SQE flagged IOSQE_IO_LINK; cancels it
 * (res -ECANCELED) if it has not completed when the timespec at `ts` elapses.
 */
export function prepLinkTimeout(s: Uint32Array, w: number, ts: number, flags: number): void {
  prepRw(s, w, IORING_OP_LINK_TIMEOUT, -1, ts, 1, 0);
  s[w + 7] = flags;
}

/**
 * `io_uring_prep_cancel64`: cancels the request whose user_data is `target` (< 2^53);
 * `flags` are IORING_ASYNC_CANCEL_* (ALL, ANY, FD ...).
 */
export function prepCancel(s: Uint32Array, w: number, target: number, flags: number): void {
  prepRw(s, w, IORING_OP_ASYNC_CANCEL, -1, target, 0, 0);
  s[w + 7] = flags;
}

/** `io_uring_prep_cancel` by user_data halves (any 64-bit value). */
export function prepCancel2(s: Uint32Array, w: number, lo: number, hi: number, flags: number): void {
  prepRw(s, w, IORING_OP_ASYNC_CANCEL, -1, 0, 0, 0);
  s[w + 4] = lo;
  s[w + 5] = hi;
  s[w + 7] = flags;
}

/** `io_uring_prep_cancel_fd`: cancels requests on `fd` (IORING_ASYNC_CANCEL_FD is added). */
export function prepCancelFd(s: Uint32Array, w: number, fd: number, flags: number): void {
  prepRw(s, w, IORING_OP_ASYNC_CANCEL, fd, 0, 0, 0);
  s[w + 7] = flags | IORING_ASYNC_CANCEL_FD;
}

/**
 * A URING_CMD: the driver behind `fd` interprets `cmdOp` and the command payload at
 * `sqe->cmd` (byte 48). `payloadWords` is the size of that area in u32 words: 4 (16 bytes) in a
 * 64-byte SQE, 20 (80 bytes) with IORING_SETUP_SQE128; it is zeroed here, and the caller writes
 * its payload after (`s[w + 12 + i]`). liburing has no single twin: it sets these fields by hand
 * (see its `test/uring_cmd_ublk.c`); `io_uring_prep_uring_cmd` in newer releases.
 */
export function prepUringCmd(s: Uint32Array, w: number, cmdOp: number, fd: number, payloadWords: number): void {
  s[w] = IORING_OP_URING_CMD;
  s[w + 1] = fd;
  s[w + 2] = cmdOp;
  s[w + 3] = 0;
  s[w + 4] = 0;
  s[w + 5] = 0;
  s[w + 6] = 0;
  s[w + 7] = 0; // uring_cmd_flags
  s[w + 8] = 0;
  s[w + 9] = 0;
  s[w + 10] = 0;
  s[w + 11] = 0;
  if (payloadWords === 4) {
    // The 16-byte payload of a 64-byte SQE, unrolled: TypedArray.prototype.fill is a builtin
    // call, measured at 2.4% of a ublk queue thread's time when every command went through it.
    s[w + 12] = 0;
    s[w + 13] = 0;
    s[w + 14] = 0;
    s[w + 15] = 0;
  } else {
    s.fill(0, w + 12, w + 12 + payloadWords);
  }
}

/** The word index of the command payload of the SQE at `w` (`sqe->cmd`, byte 48). */
export function cmdWord(w: number): number {
  return w + 12;
}

/** `io_uring_prep_send`. */
export function prepSend(s: Uint32Array, w: number, fd: number, addr: number, len: number, msgFlags: number): void {
  prepRw(s, w, IORING_OP_SEND, fd, addr, len, 0);
  s[w + 7] = msgFlags;
}

/** `io_uring_prep_recv`. */
export function prepRecv(s: Uint32Array, w: number, fd: number, addr: number, len: number, msgFlags: number): void {
  prepRw(s, w, IORING_OP_RECV, fd, addr, len, 0);
  s[w + 7] = msgFlags;
}

/** `io_uring_prep_sendmsg`: `msg` is the address of a `struct msghdr` (and its iovecs) in mapped memory. */
export function prepSendmsg(s: Uint32Array, w: number, fd: number, msg: number, msgFlags: number): void {
  prepRw(s, w, IORING_OP_SENDMSG, fd, msg, 1, 0);
  s[w + 7] = msgFlags;
}

/** `io_uring_prep_socket` (5.19): the result is the new descriptor. `type` may carry SOCK_CLOEXEC. */
export function prepSocket(s: Uint32Array, w: number, domain: number, type: number, protocol: number): void {
  prepRw(s, w, IORING_OP_SOCKET, domain, 0, protocol, type);
}

/** `io_uring_prep_connect`: `addr` is a sockaddr of `addrLen` bytes in mapped memory. */
export function prepConnect(s: Uint32Array, w: number, fd: number, addr: number, addrLen: number): void {
  prepRw(s, w, IORING_OP_CONNECT, fd, addr, 0, addrLen);
}

/** `io_uring_prep_shutdown`: shutdown(2) with `how` (SHUT_RD, SHUT_WR, SHUT_RDWR). */
export function prepShutdown(s: Uint32Array, w: number, fd: number, how: number): void {
  prepRw(s, w, IORING_OP_SHUTDOWN, fd, 0, how, 0);
}

/**
 * `io_uring_prep_openat`: `path` is the address of a NUL-terminated string in mapped memory
 * (see {@link writeCString}); `dfd` is a directory fd or AT_FDCWD.
 */
export function prepOpenat(s: Uint32Array, w: number, dfd: number, path: number, flags: number, mode: number): void {
  prepRw(s, w, IORING_OP_OPENAT, dfd, path, mode, 0);
  s[w + 7] = flags;
}

/** `io_uring_prep_openat_direct`: opens straight into registered file slot `fileIndex`. */
export function prepOpenatDirect(s: Uint32Array, w: number, dfd: number, path: number, flags: number, mode: number, fileIndex: number): void {
  prepOpenat(s, w, dfd, path, flags, mode);
  // file_index is 1-based in the SQE so that 0 can mean "not direct"; ALLOC (~0) stays as is.
  s[w + 11] = fileIndex === 0xffffffff ? fileIndex : fileIndex + 1;
}

/** `io_uring_prep_close`. */
export function prepClose(s: Uint32Array, w: number, fd: number): void {
  prepRw(s, w, IORING_OP_CLOSE, fd, 0, 0, 0);
}

/** `io_uring_prep_close_direct`: closes registered file slot `fileIndex`. */
export function prepCloseDirect(s: Uint32Array, w: number, fileIndex: number): void {
  prepRw(s, w, IORING_OP_CLOSE, 0, 0, 0, 0);
  s[w + 11] = fileIndex + 1;
}

/** Writes `str` NUL-terminated (UTF-8) into `u8` at `offset`; returns the bytes written. */
export function writeCString(u8: Uint8Array, offset: number, str: string): number {
  const n = Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength).write(str, offset, 'utf8');
  if (offset + n >= u8.length) throw new RangeError('string does not fit');
  u8[offset + n] = 0;
  return n + 1;
}
