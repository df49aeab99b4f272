/**
 * Registration: io_uring_register(2) for buffers, files and eventfds, as free functions of a ring
 * (liburing's `io_uring_register_*`). The ring fd's own registration lives in ring.ts, because
 * it changes how the ring enters the kernel.
 *
 * Every argument is written into a small mapping of ours for the duration of the call (the
 * kernel copies it in); registration is rare, so a mapping per call costs nothing that matters.
 */
import { Mapping, SysError, sys, libc, withScratch } from '../libc/index.js';
import type { IoUring } from './ring.js';
import {
  io_uring_rsrc_register, io_uring_rsrc_update2, io_uring_files_update, iovec,
  IORING_REGISTER_BUFFERS, IORING_UNREGISTER_BUFFERS, IORING_REGISTER_BUFFERS2,
  IORING_REGISTER_BUFFERS_UPDATE, IORING_REGISTER_FILES, IORING_UNREGISTER_FILES,
  IORING_REGISTER_FILES2, IORING_REGISTER_FILES_UPDATE, IORING_REGISTER_EVENTFD,
  IORING_REGISTER_EVENTFD_ASYNC, IORING_UNREGISTER_EVENTFD, IORING_RSRC_REGISTER_SPARSE,
} from './abi.js';

/** A registered or to-be-registered memory range. */
export interface BufferRange {
  address: number;
  length: number;
}

/** `io_uring_register(2)` on `ring`, throwing a SysError that names the registration and the likely fix. */
function call(ring: IoUring, opcode: number, arg: number, nrArgs: number, what: string): number {
  const ret = sys.ioUringRegister(ring.fd, opcode, arg, nrArgs);
  if (ret < 0) {
    let hint: string | undefined;
    if (-ret === libc.ENOMEM && (opcode === IORING_REGISTER_BUFFERS || opcode === IORING_REGISTER_BUFFERS2 || opcode === IORING_REGISTER_BUFFERS_UPDATE)) {
      hint = 'registered buffers are pinned and count against RLIMIT_MEMLOCK (raise it with `ulimit -l`)';
    } else if (-ret === libc.EINVAL) {
      hint = 'the kernel rejected the arguments, or is too old for this registration';
    }
    throw new SysError(-ret, `io_uring_register(${what})`, hint);
  }
  return ret;
}

function writeIovecs(m: Mapping, off: number, bufs: readonly BufferRange[]): void {
  const v = m.view;
  bufs.forEach((b, i) => {
    v.setBigUint64(off + i * iovec.SIZE + iovec.iov_base, BigInt(b.address), true);
    v.setBigUint64(off + i * iovec.SIZE + iovec.iov_len, BigInt(b.length), true);
  });
}

/**
 * `io_uring_register_buffers`: pins `bufs` for READ_FIXED/WRITE_FIXED (and ublk's zero-copy
 * buffer tables). Index i of the table is `bufs[i]`.
 */
export function registerBuffers(ring: IoUring, bufs: readonly BufferRange[]): void {
  withScratch(bufs.length * iovec.SIZE, (m) => {
    writeIovecs(m, 0, bufs);
    call(ring, IORING_REGISTER_BUFFERS, m.address, bufs.length, `REGISTER_BUFFERS, nr=${bufs.length}`);
  });
}

/** `io_uring_register_buffers_sparse`: a table of `nr` empty slots to fill with {@link updateBuffers} (5.19). */
export function registerBuffersSparse(ring: IoUring, nr: number): void {
  withScratch(io_uring_rsrc_register.SIZE, (m) => {
    const v = m.view;
    v.setUint32(io_uring_rsrc_register.nr, nr, true);
    v.setUint32(io_uring_rsrc_register.flags, IORING_RSRC_REGISTER_SPARSE, true);
    call(ring, IORING_REGISTER_BUFFERS2, m.address, io_uring_rsrc_register.SIZE, `REGISTER_BUFFERS2 sparse, nr=${nr}`);
  });
}

/** `io_uring_register_buffers_update_tag`: replaces slots `[offset, offset + bufs.length)`. */
export function updateBuffers(ring: IoUring, offset: number, bufs: readonly BufferRange[]): number {
  return withScratch(io_uring_rsrc_update2.SIZE + bufs.length * iovec.SIZE, (m) => {
    const v = m.view;
    const iovOff = io_uring_rsrc_update2.SIZE;
    writeIovecs(m, iovOff, bufs);
    v.setUint32(io_uring_rsrc_update2.offset, offset, true);
    v.setBigUint64(io_uring_rsrc_update2.data, BigInt(m.address + iovOff), true);
    v.setUint32(io_uring_rsrc_update2.nr, bufs.length, true);
    return call(ring, IORING_REGISTER_BUFFERS_UPDATE, m.address, io_uring_rsrc_update2.SIZE, `BUFFERS_UPDATE, offset=${offset}, nr=${bufs.length}`);
  });
}

/** `io_uring_unregister_buffers`. */
export function unregisterBuffers(ring: IoUring): void {
  call(ring, IORING_UNREGISTER_BUFFERS, 0, 0, 'UNREGISTER_BUFFERS');
}

/** `io_uring_register_files`: IOSQE_FIXED_FILE then takes an index into `fds`; -1 leaves a slot empty. */
export function registerFiles(ring: IoUring, fds: readonly number[]): void {
  withScratch(fds.length * 4, (m) => {
    const v = m.view;
    fds.forEach((fd, i) => v.setInt32(i * 4, fd, true));
    call(ring, IORING_REGISTER_FILES, m.address, fds.length, `REGISTER_FILES, nr=${fds.length}`);
  });
}

/** `io_uring_register_files_sparse`: `nr` empty slots (5.19). */
export function registerFilesSparse(ring: IoUring, nr: number): void {
  withScratch(io_uring_rsrc_register.SIZE, (m) => {
    const v = m.view;
    v.setUint32(io_uring_rsrc_register.nr, nr, true);
    v.setUint32(io_uring_rsrc_register.flags, IORING_RSRC_REGISTER_SPARSE, true);
    call(ring, IORING_REGISTER_FILES2, m.address, io_uring_rsrc_register.SIZE, `REGISTER_FILES2 sparse, nr=${nr}`);
  });
}

/**
 * `io_uring_register_files_update`: sets slots from `offset`; -1 clears a slot and
 * IORING_REGISTER_FILES_SKIP (-2) leaves it. Returns the number of slots updated.
 */
export function updateFiles(ring: IoUring, offset: number, fds: readonly number[]): number {
  return withScratch(io_uring_files_update.SIZE + fds.length * 4, (m) => {
    const v = m.view;
    const fdsOff = io_uring_files_update.SIZE;
    fds.forEach((fd, i) => v.setInt32(fdsOff + i * 4, fd, true));
    v.setUint32(io_uring_files_update.offset, offset, true);
    v.setBigUint64(io_uring_files_update.fds, BigInt(m.address + fdsOff), true);
    return call(ring, IORING_REGISTER_FILES_UPDATE, m.address, fds.length, `FILES_UPDATE, offset=${offset}, nr=${fds.length}`);
  });
}

/** `io_uring_unregister_files`. */
export function unregisterFiles(ring: IoUring): void {
  call(ring, IORING_UNREGISTER_FILES, 0, 0, 'UNREGISTER_FILES');
}

/**
 * `io_uring_register_eventfd`: the kernel signals `efd` for every posted CQE, so an event loop
 * (or another thread) can wait on it. `async` only signals for completions that went async.
 */
export function registerEventfd(ring: IoUring, efd: number, async = false): void {
  withScratch(4, (m) => {
    m.view.setInt32(0, efd, true);
    const op = async ? IORING_REGISTER_EVENTFD_ASYNC : IORING_REGISTER_EVENTFD;
    call(ring, op, m.address, 1, `REGISTER_EVENTFD${async ? '_ASYNC' : ''}, fd=${efd}`);
  });
}

/** `io_uring_unregister_eventfd`. */
export function unregisterEventfd(ring: IoUring): void {
  call(ring, IORING_UNREGISTER_EVENTFD, 0, 0, 'UNREGISTER_EVENTFD');
}
