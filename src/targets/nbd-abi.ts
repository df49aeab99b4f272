/**
 * The NBD protocol's numbers: magics, options, replies, flags, commands and errors.
 *
 * The NBD protocol is specified by doc/proto.md of the reference implementation
 * (github.com/NetworkBlockDevice/nbd), not by a kernel header: the kernel's
 * `include/uapi/linux/nbd.h` carries only what its own client uses (the request and simple-reply
 * magics, the first five commands and some transmission flags). Those are checked against that
 * header with gcc by test/targets/nbd.test.ts ({@link KERNEL_HEADER_NAMES}); the rest cite the
 * section of proto.md they come from and are checked by talking to real servers (nbdkit,
 * nbd-server, qemu-storage-daemon) in the tests. Every constant keeps its name from proto.md.
 *
 * All numbers travel big-endian ("network byte order", proto.md "Conventions").
 */

// --- Handshake (proto.md "Newstyle negotiation") -----------------------------------------------

/** The server's first 8 bytes, "NBDMAGIC" in ASCII. */
export const NBDMAGIC = 0x4e42444d41474943n;
/** The next 8 bytes of a newstyle server, "IHAVEOPT"; also what starts every client option. */
export const IHAVEOPT = 0x49484156454f5054n;
/** The next 8 bytes of an oldstyle server (proto.md "Oldstyle negotiation"), which we do not speak. */
export const NBD_OLDSTYLE_MAGIC = 0x00420281861253n;
/** Starts every option reply. */
export const NBD_REP_MAGIC = 0x3e889045565a9n;

/** Handshake flags (server, 16 bits): the server speaks fixed newstyle. */
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
/** Handshake flags (server): the server can skip the 124 zero bytes after NBD_OPT_EXPORT_NAME. */
export const NBD_FLAG_NO_ZEROES = 1 << 1;
/** Client flags (32 bits), echoing the two above. */
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

/** Options (proto.md "Option types"). */
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;

/** Option reply types (proto.md "Option reply types"); errors have bit 31 set. */
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = 0x80000001;
export const NBD_REP_ERR_POLICY = 0x80000002;
export const NBD_REP_ERR_INVALID = 0x80000003;
export const NBD_REP_ERR_PLATFORM = 0x80000004;
export const NBD_REP_ERR_TLS_REQD = 0x80000005;
export const NBD_REP_ERR_UNKNOWN = 0x80000006;
export const NBD_REP_ERR_SHUTDOWN = 0x80000007;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = 0x80000008;
export const NBD_REP_ERR_TOO_BIG = 0x80000009;

/** Information types in NBD_OPT_GO/INFO requests and NBD_REP_INFO replies. */
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// --- Transmission flags (proto.md "Transmission flags", 16 bits) --------------------------------

export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// --- Transmission (proto.md "Transmission phase") -----------------------------------------------

/** Starts every request: magic u32, flags u16, type u16, cookie u64, offset u64, length u32. */
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_REQUEST_BYTES = 28;
/** Starts a simple reply: magic u32, error u32, cookie u64 (then a READ's data). */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_SIMPLE_REPLY_BYTES = 16;
/** Starts a structured reply chunk: magic u32, flags u16, type u16, cookie u64, length u32. */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const NBD_STRUCTURED_REPLY_BYTES = 20;

/** Command types. */
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;

/** Command flags (the request's own 16-bit field; the kernel header's NBD_CMD_FLAG_FUA is this shifted into its type word). */
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;

/** Structured reply flags and chunk types (proto.md "Structured reply chunk message types"); errors have bit 15 set. */
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR_BIT = 1 << 15;
export const NBD_REPLY_TYPE_ERROR = (1 << 15) + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;

/** Error values (proto.md "Error values"): the errno of the most common system with that meaning. */
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** The constants `include/uapi/linux/nbd.h` declares with the same name and value (checked by gcc). */
export const KERNEL_HEADER_NAMES = [
  'NBD_REQUEST_MAGIC', 'NBD_CMD_READ', 'NBD_CMD_WRITE', 'NBD_CMD_DISC', 'NBD_CMD_FLUSH', 'NBD_CMD_TRIM',
  'NBD_FLAG_HAS_FLAGS', 'NBD_FLAG_READ_ONLY', 'NBD_FLAG_SEND_FLUSH', 'NBD_FLAG_SEND_FUA', 'NBD_FLAG_SEND_TRIM',
  'NBD_FLAG_CAN_MULTI_CONN',
] as const;
/** linux/nbd.h calls the simple reply's magic NBD_REPLY_MAGIC (from before structured replies). */
export const KERNEL_HEADER_ALIASES = { NBD_REPLY_MAGIC: 'NBD_SIMPLE_REPLY_MAGIC' } as const;

/** Option names for messages. */
export const NBD_OPT_NAMES: Record<number, string> = {
  [NBD_OPT_EXPORT_NAME]: 'NBD_OPT_EXPORT_NAME', [NBD_OPT_ABORT]: 'NBD_OPT_ABORT', [NBD_OPT_LIST]: 'NBD_OPT_LIST',
  [NBD_OPT_STARTTLS]: 'NBD_OPT_STARTTLS', [NBD_OPT_INFO]: 'NBD_OPT_INFO', [NBD_OPT_GO]: 'NBD_OPT_GO',
  [NBD_OPT_STRUCTURED_REPLY]: 'NBD_OPT_STRUCTURED_REPLY',
};

/** Option reply error names for messages. */
export const NBD_REP_ERR_NAMES: Record<number, string> = {
  [NBD_REP_ERR_UNSUP]: 'NBD_REP_ERR_UNSUP', [NBD_REP_ERR_POLICY]: 'NBD_REP_ERR_POLICY',
  [NBD_REP_ERR_INVALID]: 'NBD_REP_ERR_INVALID', [NBD_REP_ERR_PLATFORM]: 'NBD_REP_ERR_PLATFORM',
  [NBD_REP_ERR_TLS_REQD]: 'NBD_REP_ERR_TLS_REQD', [NBD_REP_ERR_UNKNOWN]: 'NBD_REP_ERR_UNKNOWN',
  [NBD_REP_ERR_SHUTDOWN]: 'NBD_REP_ERR_SHUTDOWN', [NBD_REP_ERR_BLOCK_SIZE_REQD]: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
  [NBD_REP_ERR_TOO_BIG]: 'NBD_REP_ERR_TOO_BIG',
};
