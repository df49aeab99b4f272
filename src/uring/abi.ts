/**
 * The io_uring ABI: every constant and struct layout this layer uses, in one place.
 *
 * Mirrors `include/uapi/linux/io_uring.h` (checked against Debian sid's 7.2 `linux-libc-dev`
 * and the system's 6.1 headers by `test/uring/conformance.test.ts`, which compiles a C program
 * with gcc and compares every exported number below). A name that an older header lacks is a
 * feature that kernel cannot have; the comment after each says which kernel added it where that
 * matters for callers. Constants of libc and of other kernel headers (syscall numbers, mmap,
 * open and poll flags, errno values) live one layer down, in src/libc/abi.ts.
 *
 * Naming rule: a constant keeps its C name exactly, so `grep` finds both sides. A struct is an
 * object named after the C struct; `SIZE` is `sizeof`, every other key is `offsetof` of the C
 * field of the same name (anonymous union members included). All offsets are in bytes.
 */

// ---------------------------------------------------------------------------------------------
// struct io_uring_sqe (64 bytes; 128 with IORING_SETUP_SQE128, the extra 64 extending `cmd`)
// ---------------------------------------------------------------------------------------------
export const io_uring_sqe = {
  SIZE: 64,
  opcode: 0, // __u8
  flags: 1, // __u8 IOSQE_*
  ioprio: 2, // __u16
  fd: 4, // __s32
  off: 8, // __u64; union with addr2 and {cmd_op, __pad1}
  addr2: 8,
  cmd_op: 8, // __u32 (URING_CMD)
  addr: 16, // __u64; union with splice_off_in and {level, optname}
  splice_off_in: 16,
  len: 24, // __u32
  rw_flags: 28, // __u32; union of every per-opcode flags word
  fsync_flags: 28,
  poll32_events: 28,
  timeout_flags: 28,
  cancel_flags: 28,
  open_flags: 28,
  msg_flags: 28,
  uring_cmd_flags: 28,
  user_data: 32, // __u64
  buf_index: 40, // __u16 (packed union with buf_group)
  buf_group: 40,
  personality: 42, // __u16
  splice_fd_in: 44, // __s32; union with file_index, optlen, addr_len
  file_index: 44,
  addr3: 48, // __u64
  cmd: 48, // __u8 cmd[]: 16 bytes in a 64-byte SQE, 80 bytes with SQE128
} as const;

// IOSQE_* (sqe->flags)
export const IOSQE_FIXED_FILE = 1 << 0;
export const IOSQE_IO_DRAIN = 1 << 1;
export const IOSQE_IO_LINK = 1 << 2;
export const IOSQE_IO_HARDLINK = 1 << 3;
export const IOSQE_ASYNC = 1 << 4;
export const IOSQE_BUFFER_SELECT = 1 << 5;
export const IOSQE_CQE_SKIP_SUCCESS = 1 << 6; // 5.17

/** sqe->file_index value that asks the kernel to pick a free direct descriptor (5.19). */
export const IORING_FILE_INDEX_ALLOC = 0xffffffff;

// IORING_SETUP_* (io_uring_params.flags)
export const IORING_SETUP_IOPOLL = 1 << 0;
export const IORING_SETUP_SQPOLL = 1 << 1;
export const IORING_SETUP_SQ_AFF = 1 << 2;
export const IORING_SETUP_CQSIZE = 1 << 3;
export const IORING_SETUP_CLAMP = 1 << 4;
export const IORING_SETUP_ATTACH_WQ = 1 << 5;
export const IORING_SETUP_R_DISABLED = 1 << 6;
export const IORING_SETUP_SUBMIT_ALL = 1 << 7; // 5.18
export const IORING_SETUP_COOP_TASKRUN = 1 << 8; // 5.19
export const IORING_SETUP_TASKRUN_FLAG = 1 << 9; // 5.19
export const IORING_SETUP_SQE128 = 1 << 10; // 5.19
export const IORING_SETUP_CQE32 = 1 << 11; // 5.19
export const IORING_SETUP_SINGLE_ISSUER = 1 << 12; // 6.0
export const IORING_SETUP_DEFER_TASKRUN = 1 << 13; // 6.1
export const IORING_SETUP_NO_MMAP = 1 << 14; // 6.5
export const IORING_SETUP_REGISTERED_FD_ONLY = 1 << 15; // 6.5
export const IORING_SETUP_NO_SQARRAY = 1 << 16; // 6.6

// enum io_uring_op
export const IORING_OP_NOP = 0;
export const IORING_OP_READV = 1;
export const IORING_OP_WRITEV = 2;
export const IORING_OP_FSYNC = 3;
export const IORING_OP_READ_FIXED = 4;
export const IORING_OP_WRITE_FIXED = 5;
export const IORING_OP_POLL_ADD = 6;
export const IORING_OP_POLL_REMOVE = 7;
export const IORING_OP_SYNC_FILE_RANGE = 8;
export const IORING_OP_SENDMSG = 9;
export const IORING_OP_RECVMSG = 10;
export const IORING_OP_TIMEOUT = 11;
export const IORING_OP_TIMEOUT_REMOVE = 12;
export const IORING_OP_ACCEPT = 13;
export const IORING_OP_ASYNC_CANCEL = 14;
export const IORING_OP_LINK_TIMEOUT = 15;
export const IORING_OP_CONNECT = 16;
export const IORING_OP_FALLOCATE = 17;
export const IORING_OP_OPENAT = 18;
export const IORING_OP_CLOSE = 19;
export const IORING_OP_FILES_UPDATE = 20;
export const IORING_OP_STATX = 21;
export const IORING_OP_READ = 22;
export const IORING_OP_WRITE = 23;
export const IORING_OP_FADVISE = 24;
export const IORING_OP_MADVISE = 25;
export const IORING_OP_SEND = 26;
export const IORING_OP_RECV = 27;
export const IORING_OP_OPENAT2 = 28;
export const IORING_OP_EPOLL_CTL = 29;
export const IORING_OP_SPLICE = 30;
export const IORING_OP_PROVIDE_BUFFERS = 31;
export const IORING_OP_REMOVE_BUFFERS = 32;
export const IORING_OP_TEE = 33;
export const IORING_OP_SHUTDOWN = 34;
export const IORING_OP_RENAMEAT = 35;
export const IORING_OP_UNLINKAT = 36;
export const IORING_OP_MKDIRAT = 37;
export const IORING_OP_SYMLINKAT = 38;
export const IORING_OP_LINKAT = 39;
export const IORING_OP_MSG_RING = 40;
export const IORING_OP_FSETXATTR = 41;
export const IORING_OP_SETXATTR = 42;
export const IORING_OP_FGETXATTR = 43;
export const IORING_OP_GETXATTR = 44;
export const IORING_OP_SOCKET = 45;
export const IORING_OP_URING_CMD = 46; // 5.19
export const IORING_OP_SEND_ZC = 47;
export const IORING_OP_SENDMSG_ZC = 48;
export const IORING_OP_READ_MULTISHOT = 49; // 6.7
export const IORING_OP_WAITID = 50;
export const IORING_OP_FUTEX_WAIT = 51;
export const IORING_OP_FUTEX_WAKE = 52;
export const IORING_OP_FUTEX_WAITV = 53;
export const IORING_OP_FIXED_FD_INSTALL = 54;
export const IORING_OP_FTRUNCATE = 55;
export const IORING_OP_BIND = 56;
export const IORING_OP_LISTEN = 57;

/** Human names of the opcodes above, indexed by opcode (for probes and error messages). */
export const IORING_OP_NAMES: readonly string[] = [
  'NOP', 'READV', 'WRITEV', 'FSYNC', 'READ_FIXED', 'WRITE_FIXED', 'POLL_ADD', 'POLL_REMOVE',
  'SYNC_FILE_RANGE', 'SENDMSG', 'RECVMSG', 'TIMEOUT', 'TIMEOUT_REMOVE', 'ACCEPT', 'ASYNC_CANCEL',
  'LINK_TIMEOUT', 'CONNECT', 'FALLOCATE', 'OPENAT', 'CLOSE', 'FILES_UPDATE', 'STATX', 'READ',
  'WRITE', 'FADVISE', 'MADVISE', 'SEND', 'RECV', 'OPENAT2', 'EPOLL_CTL', 'SPLICE',
  'PROVIDE_BUFFERS', 'REMOVE_BUFFERS', 'TEE', 'SHUTDOWN', 'RENAMEAT', 'UNLINKAT', 'MKDIRAT',
  'SYMLINKAT', 'LINKAT', 'MSG_RING', 'FSETXATTR', 'SETXATTR', 'FGETXATTR', 'GETXATTR', 'SOCKET',
  'URING_CMD', 'SEND_ZC', 'SENDMSG_ZC', 'READ_MULTISHOT', 'WAITID', 'FUTEX_WAIT', 'FUTEX_WAKE',
  'FUTEX_WAITV', 'FIXED_FD_INSTALL', 'FTRUNCATE', 'BIND', 'LISTEN',
];

// sqe->uring_cmd_flags
export const IORING_URING_CMD_FIXED = 1 << 0; // 6.1
/** A uring_cmd that posts many CQEs, each with data in a provided buffer (needs IOSQE_BUFFER_SELECT; 6.18). */
export const IORING_URING_CMD_MULTISHOT = 1 << 1;
// sqe->fsync_flags
export const IORING_FSYNC_DATASYNC = 1 << 0;
// sqe->timeout_flags
export const IORING_TIMEOUT_ABS = 1 << 0;
export const IORING_TIMEOUT_UPDATE = 1 << 1;
export const IORING_TIMEOUT_BOOTTIME = 1 << 2;
export const IORING_TIMEOUT_REALTIME = 1 << 3;
export const IORING_LINK_TIMEOUT_UPDATE = 1 << 4;
export const IORING_TIMEOUT_ETIME_SUCCESS = 1 << 5;
// POLL_ADD command flags (in sqe->len)
export const IORING_POLL_ADD_MULTI = 1 << 0;
export const IORING_POLL_UPDATE_EVENTS = 1 << 1;
export const IORING_POLL_UPDATE_USER_DATA = 1 << 2;
export const IORING_POLL_ADD_LEVEL = 1 << 3;
// ASYNC_CANCEL flags (sqe->cancel_flags)
export const IORING_ASYNC_CANCEL_ALL = 1 << 0;
export const IORING_ASYNC_CANCEL_FD = 1 << 1;
export const IORING_ASYNC_CANCEL_ANY = 1 << 2;
export const IORING_ASYNC_CANCEL_FD_FIXED = 1 << 3;
// send/recv ioprio flags
export const IORING_RECVSEND_POLL_FIRST = 1 << 0;
export const IORING_RECV_MULTISHOT = 1 << 1;

// ---------------------------------------------------------------------------------------------
// struct io_uring_cqe (16 bytes; 32 with IORING_SETUP_CQE32, the extra 16 in big_cqe[])
// ---------------------------------------------------------------------------------------------
export const io_uring_cqe = {
  SIZE: 16,
  user_data: 0, // __u64
  res: 8, // __s32
  flags: 12, // __u32
  big_cqe: 16, // __u64[] (CQE32 only)
} as const;

export const IORING_CQE_F_BUFFER = 1 << 0;
export const IORING_CQE_F_MORE = 1 << 1;
export const IORING_CQE_F_SOCK_NONEMPTY = 1 << 2;
export const IORING_CQE_F_NOTIF = 1 << 3;
/** An incrementally consumed provided buffer (IOU_PBUF_RING_INC) has room left and stays in use (6.12). */
export const IORING_CQE_F_BUF_MORE = 1 << 4;
export const IORING_CQE_BUFFER_SHIFT = 16;

// mmap offsets of the ring fd
export const IORING_OFF_SQ_RING = 0;
export const IORING_OFF_CQ_RING = 0x8000000;
export const IORING_OFF_SQES = 0x10000000;

export const io_sqring_offsets = {
  SIZE: 40,
  head: 0,
  tail: 4,
  ring_mask: 8,
  ring_entries: 12,
  flags: 16,
  dropped: 20,
  array: 24,
  resv1: 28,
  user_addr: 32, // 6.5 (was resv2)
} as const;

// sq_ring->flags
export const IORING_SQ_NEED_WAKEUP = 1 << 0;
export const IORING_SQ_CQ_OVERFLOW = 1 << 1;
export const IORING_SQ_TASKRUN = 1 << 2; // 5.19

export const io_cqring_offsets = {
  SIZE: 40,
  head: 0,
  tail: 4,
  ring_mask: 8,
  ring_entries: 12,
  overflow: 16,
  cqes: 20,
  flags: 24,
  resv1: 28,
  user_addr: 32, // 6.5 (was resv2)
} as const;

export const IORING_CQ_EVENTFD_DISABLED = 1 << 0;

// io_uring_enter(2) flags
export const IORING_ENTER_GETEVENTS = 1 << 0;
export const IORING_ENTER_SQ_WAKEUP = 1 << 1;
export const IORING_ENTER_SQ_WAIT = 1 << 2;
export const IORING_ENTER_EXT_ARG = 1 << 3; // 5.11
export const IORING_ENTER_REGISTERED_RING = 1 << 4; // 5.18

export const io_uring_params = {
  SIZE: 120,
  sq_entries: 0,
  cq_entries: 4,
  flags: 8,
  sq_thread_cpu: 12,
  sq_thread_idle: 16,
  features: 20,
  wq_fd: 24,
  resv: 28,
  sq_off: 40,
  cq_off: 80,
} as const;

// io_uring_params.features
export const IORING_FEAT_SINGLE_MMAP = 1 << 0;
export const IORING_FEAT_NODROP = 1 << 1;
export const IORING_FEAT_SUBMIT_STABLE = 1 << 2;
export const IORING_FEAT_RW_CUR_POS = 1 << 3;
export const IORING_FEAT_CUR_PERSONALITY = 1 << 4;
export const IORING_FEAT_FAST_POLL = 1 << 5;
export const IORING_FEAT_POLL_32BITS = 1 << 6;
export const IORING_FEAT_SQPOLL_NONFIXED = 1 << 7;
export const IORING_FEAT_EXT_ARG = 1 << 8;
export const IORING_FEAT_NATIVE_WORKERS = 1 << 9;
export const IORING_FEAT_RSRC_TAGS = 1 << 10;
export const IORING_FEAT_CQE_SKIP = 1 << 11;
export const IORING_FEAT_LINKED_FILE = 1 << 12;
export const IORING_FEAT_REG_REG_RING = 1 << 13; // 6.3

/** Names of the feature bits, lowest first, for reports. */
export const IORING_FEAT_NAMES: readonly string[] = [
  'SINGLE_MMAP', 'NODROP', 'SUBMIT_STABLE', 'RW_CUR_POS', 'CUR_PERSONALITY', 'FAST_POLL',
  'POLL_32BITS', 'SQPOLL_NONFIXED', 'EXT_ARG', 'NATIVE_WORKERS', 'RSRC_TAGS', 'CQE_SKIP',
  'LINKED_FILE', 'REG_REG_RING', 'RECVSEND_BUNDLE', 'MIN_TIMEOUT', 'RW_ATTR', 'NO_IOWAIT',
];

// enum io_uring_register_op (io_uring_register(2) opcodes)
export const IORING_REGISTER_BUFFERS = 0;
export const IORING_UNREGISTER_BUFFERS = 1;
export const IORING_REGISTER_FILES = 2;
export const IORING_UNREGISTER_FILES = 3;
export const IORING_REGISTER_EVENTFD = 4;
export const IORING_UNREGISTER_EVENTFD = 5;
export const IORING_REGISTER_FILES_UPDATE = 6;
export const IORING_REGISTER_EVENTFD_ASYNC = 7;
export const IORING_REGISTER_PROBE = 8;
export const IORING_REGISTER_PERSONALITY = 9;
export const IORING_UNREGISTER_PERSONALITY = 10;
export const IORING_REGISTER_RESTRICTIONS = 11;
export const IORING_REGISTER_ENABLE_RINGS = 12;
export const IORING_REGISTER_FILES2 = 13; // 5.13
export const IORING_REGISTER_FILES_UPDATE2 = 14; // 5.13
export const IORING_REGISTER_BUFFERS2 = 15; // 5.13
export const IORING_REGISTER_BUFFERS_UPDATE = 16; // 5.13
export const IORING_REGISTER_IOWQ_AFF = 17;
export const IORING_UNREGISTER_IOWQ_AFF = 18;
export const IORING_REGISTER_IOWQ_MAX_WORKERS = 19;
export const IORING_REGISTER_RING_FDS = 20; // 5.18
export const IORING_UNREGISTER_RING_FDS = 21; // 5.18
export const IORING_REGISTER_PBUF_RING = 22; // 5.19
export const IORING_UNREGISTER_PBUF_RING = 23; // 5.19
export const IORING_REGISTER_SYNC_CANCEL = 24;
export const IORING_REGISTER_FILE_ALLOC_RANGE = 25;
export const IORING_REGISTER_USE_REGISTERED_RING = 0x80000000; // 6.3

// ---------------------------------------------------------------------------------------------
// Provided buffer rings (IORING_REGISTER_PBUF_RING, 5.19): the application lends the kernel a
// ring of buffers, and an SQE with IOSQE_BUFFER_SELECT takes one from group sqe->buf_group.
// ---------------------------------------------------------------------------------------------

/** struct io_uring_buf_reg: the argument of IORING_REGISTER_PBUF_RING / UNREGISTER_PBUF_RING. */
export const io_uring_buf_reg = {
  SIZE: 40,
  ring_addr: 0, // __u64 page-aligned ring memory (ours, unless IOU_PBUF_RING_MMAP)
  ring_entries: 8, // __u32 a power of two
  bgid: 12, // __u16 buffer group id
  flags: 14, // __u16 IOU_PBUF_RING_*
  // Then reserved words, zero: __u64 resv[3] in older headers, __u32 min_left (an
  // IOU_PBUF_RING_INC tuning this project does not use) and __u32 resv[5] in 7.2's.
} as const;

/** The kernel allocates the ring; the application mmaps it (6.4). */
export const IOU_PBUF_RING_MMAP = 1;
/**
 * Incremental consumption (6.12): a buffer is used a piece at a time, each completion taking
 * only the bytes it filled; the entry's addr and len move past them, and the CQE says
 * IORING_CQE_F_BUF_MORE while room is left.
 */
export const IOU_PBUF_RING_INC = 2;

/** struct io_uring_buf: one ring entry. */
export const io_uring_buf = {
  SIZE: 16,
  addr: 0, // __u64
  len: 8, // __u32
  bid: 12, // __u16 the id CQEs report (cqe->flags >> IORING_CQE_BUFFER_SHIFT)
  resv: 14, // __u16
} as const;

/** struct io_uring_buf_ring: the entries, with the tail the application publishes overlaying entry 0's resv. */
export const io_uring_buf_ring = {
  SIZE: 16,
  bufs: 0,
  tail: 14, // __u16
} as const;

export const io_uring_files_update = { SIZE: 16, offset: 0, resv: 4, fds: 8 } as const;

export const IORING_RSRC_REGISTER_SPARSE = 1 << 0; // 5.19

export const io_uring_rsrc_register = {
  SIZE: 32,
  nr: 0,
  flags: 4,
  resv2: 8,
  data: 16,
  tags: 24,
} as const;

export const io_uring_rsrc_update = { SIZE: 16, offset: 0, resv: 4, data: 8 } as const;

export const io_uring_rsrc_update2 = {
  SIZE: 32,
  offset: 0,
  resv: 4,
  data: 8,
  tags: 16,
  nr: 24,
  resv2: 28,
} as const;

/** In a files update, leave this slot as it is. */
export const IORING_REGISTER_FILES_SKIP = -2;

export const IO_URING_OP_SUPPORTED = 1 << 0;

export const io_uring_probe_op = { SIZE: 8, op: 0, resv: 1, flags: 2, resv2: 4 } as const;
export const io_uring_probe = {
  SIZE: 16,
  last_op: 0,
  ops_len: 1,
  resv: 2,
  resv2: 4,
  ops: 16,
} as const;

export const io_uring_getevents_arg = {
  SIZE: 24,
  sigmask: 0,
  sigmask_sz: 8,
  ts: 16,
} as const;

/** struct __kernel_timespec (<linux/time_types.h>): 64-bit seconds and nanoseconds. */
export const __kernel_timespec = { SIZE: 16, tv_sec: 0, tv_nsec: 8 } as const;

/** struct iovec (<sys/uio.h>). */
export const iovec = { SIZE: 16, iov_base: 0, iov_len: 8 } as const;

// enum io_uring_socket_op (URING_CMD on a socket, 6.7)
export const SOCKET_URING_OP_SIOCINQ = 0;
export const SOCKET_URING_OP_SIOCOUTQ = 1;
export const SOCKET_URING_OP_GETSOCKOPT = 2;
export const SOCKET_URING_OP_SETSOCKOPT = 3;
