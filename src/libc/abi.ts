/**
 * The libc and kernel constants below io_uring and ublk: system call numbers, mmap, open, fcntl,
 * fallocate, eventfd and poll flags, the errno values, and the one struct we read from the
 * kernel directly (statfs). Both the ring layer (src/uring) and the ublk layer (src/ublk) build on
 * these; nothing here knows of either.
 *
 * Mirrors glibc's `<sys/syscall.h>` (x86-64 `<asm/unistd_64.h>`), `<sys/mman.h>`, `<fcntl.h>`,
 * `<linux/falloc.h>`, `<linux/fs.h>` (RWF_*), `<sys/prctl.h>`, `<sys/eventfd.h>`, `<poll.h>`, `<errno.h>` and
 * `<sys/vfs.h>`; checked against the system's and Debian sid's headers by
 * test/libc/conformance.test.ts, which compiles every exported number with gcc.
 *
 * Naming rule (as in src/uring/abi.ts and src/ublk/abi.ts): a constant keeps its C name
 * exactly; a struct is an object named after the C struct, `SIZE` its sizeof, every other key
 * the offsetof of the C field of that name. Errno values are positive, as in C: a failed
 * request's result is `-EIO`, never a bare `-5`.
 */

// ---------------------------------------------------------------------------------------------
// System calls (x86-64, <asm/unistd_64.h> via <sys/syscall.h>)
// ---------------------------------------------------------------------------------------------
export const SYS_io_uring_setup = 425;
export const SYS_io_uring_enter = 426;
export const SYS_io_uring_register = 427;
export const SYS_gettid = 186;
export const SYS_eventfd2 = 290;
export const SYS_ioctl = 16;
export const SYS_fcntl = 72;
export const SYS_fstatfs = 138;
export const SYS_prctl = 157;

// <sys/mman.h>
export const PROT_NONE = 0x0;
export const PROT_READ = 0x1;
export const PROT_WRITE = 0x2;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_FIXED = 0x10;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;
export const MAP_POPULATE = 0x8000;
/** Map exactly at the address given, or fail with EEXIST if anything is mapped there (4.17). */
export const MAP_FIXED_NOREPLACE = 0x100000;
export const MADV_DONTNEED = 4;
/** Free the pages of a shared (tmpfs) mapping and the file's blocks behind them: a hole punch (2.6.16). */
export const MADV_REMOVE = 9;
export const MADV_DONTFORK = 10;
export const MADV_DOFORK = 11;

// <fcntl.h>
export const O_RDONLY = 0o0;
export const O_WRONLY = 0o1;
export const O_RDWR = 0o2;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_NOCTTY = 0o400;
export const O_TRUNC = 0o1000;
export const O_APPEND = 0o2000;
export const O_NONBLOCK = 0o4000;
export const O_DIRECT = 0o40000;
export const O_NOFOLLOW = 0o400000;
export const O_CLOEXEC = 0o2000000;
export const AT_FDCWD = -100;
export const F_GETFL = 3;
export const F_SETFL = 4;

// <linux/falloc.h>
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

// <linux/fs.h>: per-I/O flags (pwritev2, io_uring's sqe->rw_flags)
/** This write is durable (data, and metadata needed to read it) when it completes: pwritev2's O_DSYNC per call. */
export const RWF_DSYNC = 0x02;
/** Fail with EAGAIN instead of waiting (for blocks to be mapped, dirty pages written back, a lock). */
export const RWF_NOWAIT = 0x08;

// <sys/prctl.h> (<linux/prctl.h>)
/**
 * Mark the calling thread as one that writes back memory (5.6): its allocations do not recurse into
 * file-system reclaim (PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE), so a server backing a file system
 * cannot deadlock waiting for its own device. Needs CAP_SYS_RESOURCE.
 */
export const PR_SET_IO_FLUSHER = 57;
export const PR_GET_IO_FLUSHER = 58;

// <sys/eventfd.h>
export const EFD_SEMAPHORE = 1;
export const EFD_CLOEXEC = 0o2000000;
export const EFD_NONBLOCK = 0o4000;

// <poll.h>
export const POLLIN = 0x001;
export const POLLOUT = 0x004;
export const POLLERR = 0x008;
export const POLLHUP = 0x010;

// ---------------------------------------------------------------------------------------------
// <errno.h>: the values this project tests for or returns. Positive, as in C; a result that
// failed is the negated value (cqe->res, a ublk COMMIT result).
// ---------------------------------------------------------------------------------------------
export const EPERM = 1;
export const ENOENT = 2;
export const EINTR = 4;
export const EIO = 5;
export const E2BIG = 7;
export const EBADF = 9;
export const EAGAIN = 11;
export const ENOMEM = 12;
export const EACCES = 13;
export const EFAULT = 14;
export const EBUSY = 16;
export const EEXIST = 17;
export const ENODEV = 19;
export const EINVAL = 22;
export const ENOSPC = 28;
export const EROFS = 30;
export const EPIPE = 32;
export const ENOSYS = 38;
export const ETIME = 62;
export const EOPNOTSUPP = 95;
export const ECONNRESET = 104;
export const ENOBUFS = 105;
export const ENOTCONN = 107;
export const ESHUTDOWN = 108;
export const ETIMEDOUT = 110;
export const ECONNREFUSED = 111;
export const ECANCELED = 125;

/**
 * Whether `res` is a negated errno: an integer in [-4095, -1]. 4095 is the kernel's MAX_ERRNO
 * (include/linux/err.h, not a uapi header, hence a function and not an exported number).
 */
export function isNegErrno(res: number): boolean {
  return Number.isInteger(res) && res < 0 && res >= -4095;
}

// ---------------------------------------------------------------------------------------------
// Sockets (<sys/socket.h>, <netinet/in.h>, <netinet/tcp.h>, <sys/un.h>, <sys/uio.h>): what a
// network target (nbd) needs to open, tune and talk over a socket with io_uring's SOCKET,
// CONNECT, SENDMSG and RECV.
// ---------------------------------------------------------------------------------------------
export const SYS_setsockopt = 54;
export const AF_UNIX = 1;
export const AF_INET = 2;
export const AF_INET6 = 10;
export const SOCK_STREAM = 1;
export const SOCK_CLOEXEC = 0o2000000;
export const SOL_SOCKET = 1;
export const SO_KEEPALIVE = 9;
export const IPPROTO_TCP = 6;
export const TCP_NODELAY = 1;
export const TCP_USER_TIMEOUT = 18;
export const MSG_WAITALL = 0x100;
export const MSG_NOSIGNAL = 0x4000;
export const SHUT_RDWR = 2;

export const iovec = {
  SIZE: 16,
  iov_base: 0,
  iov_len: 8,
} as const;

export const msghdr = {
  SIZE: 56,
  msg_name: 0,
  msg_namelen: 8,
  msg_iov: 16,
  msg_iovlen: 24,
  msg_control: 32,
  msg_controllen: 40,
  msg_flags: 48,
} as const;

/** Family u16 in host order; port u16 and address in network order. */
export const sockaddr_in = {
  SIZE: 16,
  sin_family: 0,
  sin_port: 2,
  sin_addr: 4,
} as const;

export const sockaddr_in6 = {
  SIZE: 28,
  sin6_family: 0,
  sin6_port: 2,
  sin6_flowinfo: 4,
  sin6_addr: 8,
  sin6_scope_id: 24,
} as const;

/** A path of at most 107 bytes and its NUL in sun_path. */
export const sockaddr_un = {
  SIZE: 110,
  sun_family: 0,
  sun_path: 2,
} as const;

// <sys/vfs.h>: fstatfs(2)'s buffer; only the file system's magic number is read.
export const statfs = {
  SIZE: 120,
  f_type: 0, // __fsword_t (long)
} as const;
