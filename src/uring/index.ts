/**
 * `ublk/uring`: io_uring in TypeScript over raw system calls. Knows nothing of ublk.
 *
 * - {@link IoUring} (ring.ts): setup, the submission and completion rings, enter, close.
 * - prep.ts: one function per SQE operation, writing into the ring's SQE words.
 * - register.ts: io_uring_register(2) for buffers, files and eventfds; probe.ts: the opcode probe.
 * - buf-ring.ts: provided buffer rings (IOSQE_BUFFER_SELECT, multishot operations).
 * - abi.ts: every constant and struct offset, mirroring `linux/io_uring.h`.
 *
 * Below it, src/libc: the system calls, the mmapped memory everything the kernel touches lives in
 * ({@link Mapping}), and libc's constants; re-exported here so a ring user needs one import.
 */
export * from './ring.js';
export * from './prep.js';
export * from './register.js';
export * from './buf-ring.js';
export * from './probe.js';
export * as abi from './abi.js';
export { Mapping, MAX_VIEW_BYTES, pageAlign, withScratch, SysError, errnoName, PAGE_SIZE, sys, libc } from '../libc/index.js';
export * from './trace.js';
