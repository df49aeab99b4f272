/**
 * The thin system-call layer: every call into the kernel this project makes goes through here.
 *
 * There is no native addon of ours. koffi binds glibc's `syscall()` and a few libc wrappers;
 * errno is read with `koffi.errno()` immediately after the call, before any other JS that could
 * make a libc call, and turned into a {@link SysError} that names the call and the errno.
 *
 * Hot-path calls use fixed (non-variadic) prototypes: koffi analyses a variadic call afresh on
 * every invocation, measured here at ~225 ns more per call. glibc's `syscall` is assembly that
 * only moves integer registers, so calling it through a fixed all-`long` prototype is exact on
 * x86-64 and AArch64 Linux (every argument is an integer or an address passed as a number).
 */
import koffi from 'koffi';
import { writeSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import {
  SYS_io_uring_setup, SYS_io_uring_enter, SYS_io_uring_register, SYS_gettid, SYS_eventfd2, SYS_ioctl,
  SYS_fcntl, SYS_fstatfs, SYS_prctl, SYS_setsockopt, F_GETFL, F_SETFL, statfs,
} from './abi.js';

const libc = koffi.load('libc.so.6');

// `long syscall(long number, ...)` through fixed prototypes. Six parameters keep koffi on its
// fast call path; io_uring_enter with an extended argument needs the seventh (argsz).
const syscall3 = libc.func('long syscall(long nr, long a, long b, long c)');
const syscall6 = libc.func('long syscall(long nr, long a, long b, long c, long d, long e)');
// io_uring_enter's result always fits an int (a count, or -1 with errno): read as one, koffi
// makes a small integer of it instead of converting a 64-bit value (napi_create_int64 and
// v8::Number::New were 2.7% of a busy ublk queue thread). glibc's syscall leaves the result in
// rax; an int return reads eax, the same value for every result io_uring_enter can give.
const syscall6i = libc.func('int syscall(long nr, long a, long b, long c, long d, long e)');
const syscall7 = libc.func('long syscall(long nr, long a, long b, long c, long d, long e, long f)');

// Addresses travel as JS numbers: user-space addresses on x86-64/AArch64 are below 2^47, so they
// are exact doubles, and numbers avoid a BigInt allocation per call.
const mmap_ = libc.func('intptr_t mmap(intptr_t addr, size_t len, int prot, int flags, int fd, int64_t off)');
const munmap_ = libc.func('int munmap(intptr_t addr, size_t len)');
const madvise_ = libc.func('int madvise(intptr_t addr, size_t len, int advice)');
const open_ = libc.func('int open(const char *path, int flags, uint32_t mode)');
const close_ = libc.func('int close(int fd)');
const pread_ = libc.func('intptr_t pread(int fd, intptr_t buf, size_t count, int64_t off)');
const pwrite_ = libc.func('intptr_t pwrite(int fd, intptr_t buf, size_t count, int64_t off)');
// The same calls on a Buffer: koffi passes a Buffer's own bytes as the pointer (no copy), which is
// safe here because the kernel is done with them when the call returns.
const preadBuf_ = libc.func('intptr_t pread(int fd, void *buf, size_t count, int64_t off)');
const pwriteBuf_ = libc.func('intptr_t pwrite(int fd, const void *buf, size_t count, int64_t off)');
const read_ = libc.func('intptr_t read(int fd, intptr_t buf, size_t count)');
const write_ = libc.func('intptr_t write(int fd, intptr_t buf, size_t count)');
const getpagesize_ = libc.func('int getpagesize(void)');
const mkfifo_ = libc.func('int mkfifo(const char *path, uint32_t mode)');

const errnoNames = new Map<number, string>();
for (const [name, value] of Object.entries(osConstants.errno)) {
  if (!errnoNames.has(value)) errnoNames.set(value, name);
}

/** The symbolic name of an errno value (`EINVAL`), or `E<number>` if Node does not know it. */
export function errnoName(errno: number): string {
  return errnoNames.get(errno) ?? `E${errno}`;
}

/**
 * A failed system call. `code` is the errno name (`EINVAL`), `errno` the positive number and
 * `call` the call with its arguments, so the message reads `EINVAL from io_uring_setup(entries=8, ...)`.
 */
export class SysError extends Error {
  readonly errno: number;
  readonly code: string;
  readonly call: string;
  constructor(errno: number, call: string, hint?: string) {
    const code = errnoName(errno);
    super(`${code} from ${call}${hint ? `: ${hint}` : ''}`);
    this.name = 'SysError';
    this.errno = errno;
    this.code = code;
    this.call = call;
  }
}

/** Throws a SysError for a -1 return, reading errno at once. Returns the result as a number. */
function check(ret: number | bigint, call: () => string): number {
  const r = Number(ret);
  if (r === -1) {
    const e = koffi.errno();
    throw new SysError(e, call());
  }
  return r;
}

/**
 * Like {@link check} but returns `-errno` instead of throwing: for the ring's hot path, where
 * EINTR/EAGAIN/EBUSY are expected outcomes, not exceptions.
 */
function negErrno(ret: number | bigint): number {
  const r = Number(ret);
  return r === -1 ? -koffi.errno() : r;
}

export const PAGE_SIZE: number = getpagesize_();

/** `io_uring_setup(2)`: `params` is the address of a 120-byte `struct io_uring_params`. */
export function ioUringSetup(entries: number, params: number): number {
  return check(syscall3(SYS_io_uring_setup, entries, params, 0), () => `io_uring_setup(entries=${entries})`);
}

/**
 * `io_uring_enter(2)` without an extended argument. Returns the kernel's result, or `-errno`
 * (never throws): the caller decides which errors are back-pressure and which are bugs.
 */
export function ioUringEnter(fd: number, toSubmit: number, minComplete: number, flags: number): number {
  // The sixth kernel argument (argsz) is left unset: the kernel reads it only with EXT_ARG or a
  // non-NULL sigmask pointer, and we pass argp = 0.
  const r = syscall6i(SYS_io_uring_enter, fd, toSubmit, minComplete, flags, 0) as number;
  return r === -1 ? -koffi.errno() : r;
}

/** `io_uring_enter(2)` with `argp`/`argsz` (IORING_ENTER_EXT_ARG). Returns result or `-errno`. */
export function ioUringEnterArg(
  fd: number, toSubmit: number, minComplete: number, flags: number, arg: number, argSize: number,
): number {
  return negErrno(syscall7(SYS_io_uring_enter, fd, toSubmit, minComplete, flags, arg, argSize));
}

/** `io_uring_register(2)`. Returns the kernel's result or `-errno`. */
export function ioUringRegister(fd: number, opcode: number, arg: number, nrArgs: number): number {
  return negErrno(syscall6(SYS_io_uring_register, fd, opcode, arg, nrArgs, 0));
}

/** `mmap(2)`; returns the address as a number. */
export function mmap(addr: number, length: number, prot: number, flags: number, fd: number, offset: number): number {
  const r = Number(mmap_(addr, length, prot, flags, fd, offset));
  if (r === -1) {
    const e = koffi.errno();
    throw new SysError(e, `mmap(len=${length}, prot=${prot}, flags=0x${flags.toString(16)}, fd=${fd}, off=0x${offset.toString(16)})`);
  }
  return r;
}

export function munmap(addr: number, length: number): void {
  check(munmap_(addr, length), () => `munmap(0x${addr.toString(16)}, ${length})`);
}

export function madvise(addr: number, length: number, advice: number): void {
  check(madvise_(addr, length, advice), () => `madvise(0x${addr.toString(16)}, ${length}, ${advice})`);
}

export function open(path: string, flags: number, mode = 0o644): number {
  return check(open_(path, flags, mode), () => `open(${JSON.stringify(path)}, 0o${flags.toString(8)})`);
}

/** `mkfifo(3)`: a named pipe at `path` (Node has no call for it). */
export function mkfifo(path: string, mode: number): void {
  check(mkfifo_(path, mode), () => `mkfifo(${path})`);
}

export function close(fd: number): void {
  check(close_(fd), () => `close(${fd})`);
}

/** `pread(2)` into memory at `addr` (an address we mapped). */
export function pread(fd: number, addr: number, count: number, offset: number): number {
  return check(pread_(fd, addr, count, offset), () => `pread(fd=${fd}, count=${count}, off=${offset})`);
}

/** `pread(2)` into `buf` (any Buffer: the call is synchronous). */
export function preadInto(fd: number, buf: Buffer, offset: number): number {
  return check(preadBuf_(fd, buf, buf.length, offset), () => `pread(fd=${fd}, count=${buf.length}, off=${offset})`);
}

/** `pwrite(2)` of `buf` (any Buffer: the call is synchronous). */
export function pwriteFrom(fd: number, buf: Buffer, offset: number): number {
  return check(pwriteBuf_(fd, buf, buf.length, offset), () => `pwrite(fd=${fd}, count=${buf.length}, off=${offset})`);
}

/** `pwrite(2)` from memory at `addr` (an address we mapped). */
export function pwrite(fd: number, addr: number, count: number, offset: number): number {
  return check(pwrite_(fd, addr, count, offset), () => `pwrite(fd=${fd}, count=${count}, off=${offset})`);
}

export function read(fd: number, addr: number, count: number): number {
  return check(read_(fd, addr, count), () => `read(fd=${fd}, count=${count})`);
}

export function write(fd: number, addr: number, count: number): number {
  return check(write_(fd, addr, count), () => `write(fd=${fd}, count=${count})`);
}

/** `eventfd(2)` through the raw syscall. */
export function eventfd(initval: number, flags: number): number {
  return check(syscall3(SYS_eventfd2, initval, flags, 0), () => `eventfd(${initval}, 0x${flags.toString(16)})`);
}

const EVENTFD_ONE = Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]);

/**
 * Adds 1 to an eventfd's counter, waking whoever polls it. The 8 bytes are only read during
 * this synchronous write(2), so a Buffer is fine here. Throws SysError-like Node errors
 * (EBADF once the fd is closed; EAGAIN only if the counter would overflow).
 */
export function eventfdSignal(fd: number): void {
  writeSync(fd, EVENTFD_ONE);
}

/**
 * Watches `fd` on the calling thread's libuv event loop, the way Node watches a socket
 * (koffi.node.poll: uv_poll_init_socket on this thread's loop): `onReadable` runs from the loop
 * whenever `fd` is readable, until the handle is closed. Close it before closing `fd`. A thread
 * that waits for a ring's eventfd this way keeps running JavaScript meanwhile, which a thread
 * blocked in io_uring_enter cannot.
 */
export function watchReadable(fd: number, onReadable: () => void): { close(): void } {
  const handle = koffi.node.poll(fd, { readable: true }, () => onReadable());
  let open = true;
  return {
    close() {
      if (open) handle.close();
      open = false;
    },
  };
}

/**
 * `ioctl(2)` with an address argument (the raw syscall: glibc's wrapper is variadic). `arg` is
 * memory we mapped, which the kernel reads or fills; `what` names the request in errors.
 */
export function ioctl(fd: number, request: number, arg: number, what = `0x${request.toString(16)}`): number {
  return check(syscall3(SYS_ioctl, fd, request, arg), () => `ioctl(fd=${fd}, ${what})`);
}

/** `fcntl(fd, F_GETFL)`: the file status flags (O_NONBLOCK, O_DIRECT, the access mode ...). */
export function getFileFlags(fd: number): number {
  return check(syscall3(SYS_fcntl, fd, F_GETFL, 0), () => `fcntl(fd=${fd}, F_GETFL)`);
}

/** `fcntl(fd, F_SETFL, flags)`: only O_APPEND, O_NONBLOCK, O_DIRECT, O_NOATIME and O_ASYNC change. */
export function setFileFlags(fd: number, flags: number): void {
  check(syscall3(SYS_fcntl, fd, F_SETFL, flags), () => `fcntl(fd=${fd}, F_SETFL, 0o${flags.toString(8)})`);
}

/**
 * `fstatfs(2)`'s f_type: the magic number of the file system `fd` lives on (TMPFS_MAGIC, ...).
 * Of an open fd, not a path, so the answer is about the file we hold. `scratch` is memory we
 * mapped with room for a struct statfs (the kernel writes all of it).
 */
export function fstatfsType(fd: number, scratch: number): number {
  check(syscall3(SYS_fstatfs, fd, scratch, 0), () => `fstatfs(fd=${fd})`);
  const f = new DataView(koffi.view(scratch, statfs.SIZE) as ArrayBuffer);
  return Number(f.getBigInt64(statfs.f_type, true));
}

/** The calling thread's kernel task id (differs per worker thread; equals the pid on the main thread). */
export function gettid(): number {
  return Number(syscall3(SYS_gettid, 0, 0, 0));
}

/** `prctl(option, arg2)` through the raw syscall (glibc's wrapper is variadic); returns its result. */
export function prctl(option: number, arg2: number): number {
  return check(syscall6(SYS_prctl, option, arg2, 0, 0, 0), () => `prctl(${option}, ${arg2})`);
}

/**
 * `setsockopt(fd, level, name, &value, sizeof(int))` for the int-valued options (TCP_NODELAY,
 * SO_KEEPALIVE, TCP_USER_TIMEOUT). `scratch` is 4 bytes of mapped memory the value passes through.
 */
export function setsockoptInt(fd: number, level: number, name: number, value: number, scratch: number): void {
  new Int32Array(koffi.view(scratch, 4) as ArrayBuffer)[0] = value;
  check(syscall6(SYS_setsockopt, fd, level, name, scratch, 4), () => `setsockopt(fd=${fd}, level ${level}, option ${name})`);
}
