/**
 * The layer below io_uring and ublk: system calls through koffi (sys.ts), memory we mmap
 * ourselves for everything the kernel reads or writes (memory.ts), and the libc and kernel
 * constants both upper layers use (abi.ts).
 */
export * from './memory.js';
export { SysError, errnoName, PAGE_SIZE } from './sys.js';
export * as sys from './sys.js';
export * as libc from './abi.js';
