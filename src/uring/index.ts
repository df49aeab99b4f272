/**
 * `ublk/uring`: io_uring in TypeScript over raw system calls. Knows nothing of ublk.
 *
 * - {@link IoUring} (ring.ts): setup, submission/completion rings, registration, probe.
 * - prep.ts: one function per SQE operation, writing into the ring's SQE words.
 * - memory.ts: mmapped memory for everything the kernel reads or writes.
 * - sys.ts: the system calls and the errno-carrying {@link SysError}.
 * - abi.ts: every constant and struct offset, mirroring `linux/io_uring.h`.
 */
export * from './ring.js';
export * from './prep.js';
export * from './memory.js';
export { SysError, errnoName, errnoOf, PAGE_SIZE } from './sys.js';
export * as sys from './sys.js';
export * as abi from './abi.js';
