/**
 * The ublk ABI: every constant and struct layout of the kernel's ublk uapi, in one place.
 *
 * Mirrors `include/uapi/linux/ublk_cmd.h` as of Linux 7.2 (Debian sid's `linux-libc-dev`
 * 7.2.13-1), checked against those headers and the system's 6.1 headers by
 * `test/ublk/conformance.test.ts`, which compiles a C program with gcc and compares every
 * exported number below. A name that an older header lacks is a feature that kernel cannot have;
 * the comment after each says which kernel release added it where that matters to callers (from
 * the reference facts, cross-checked against the 6.1, 6.12 and 7.2 headers Debian ships).
 *
 * Naming rule (the same as src/uring/abi.ts): a constant keeps its C name exactly, so `grep`
 * finds both sides. A struct is an object named after the C struct; `SIZE` is `sizeof`, every
 * other key is `offsetof` of the C field of the same name (anonymous union members included).
 * All offsets are in bytes, x86-64 natural alignment. Exports that are not numbers or layouts
 * (tables, functions, camelCase names) are ours, not C, and the conformance test ignores them;
 * so every *numeric* export here must be a C name, and private numbers stay unexported.
 *
 * Two macros of the header are deliberately absent, because they are 64-bit values a JS number
 * cannot hold exactly (the checker compares safe integers only):
 *  - `UBLKSRV_IO_BUF_TOTAL_SIZE` = 1ULL << 53 (one past the largest user-copy position field);
 *  - `UBLKSRV_IO_INTEGRITY_FLAG` = 1ULL << 62 (7.0: OR it into a user-copy position to copy the
 *    request's integrity data instead of its data; use `BigInt(userCopyOffset(...)) |
 *    (1n << BigInt(UBLK_INTEGRITY_FLAG_OFF))`, which `fs.read`/`pread` accept as a bigint).
 */

// ---------------------------------------------------------------------------------------------
// Control commands: IORING_OP_URING_CMD on /dev/ublk-control, on a ring set up with
// IORING_SETUP_SQE128, with a struct ublksrv_ctrl_cmd at SQE byte 48 (io_uring_sqe.cmd).
// ---------------------------------------------------------------------------------------------

// Legacy (plain-number) opcodes. Still accepted unless the kernel is built with
// CONFIG_BLKDEV_UBLK_LEGACY_OPCODES=n (some 6.18 distributions are), so prefer the encoded ones
// from 6.4 on; on 6.0-6.3 these are the only ones.
export const UBLK_CMD_GET_QUEUE_AFFINITY = 0x01;
export const UBLK_CMD_GET_DEV_INFO = 0x02;
export const UBLK_CMD_ADD_DEV = 0x04;
export const UBLK_CMD_DEL_DEV = 0x05;
export const UBLK_CMD_START_DEV = 0x06;
export const UBLK_CMD_STOP_DEV = 0x07;
export const UBLK_CMD_SET_PARAMS = 0x08;
export const UBLK_CMD_GET_PARAMS = 0x09;
export const UBLK_CMD_START_USER_RECOVERY = 0x10; // 6.1
export const UBLK_CMD_END_USER_RECOVERY = 0x11; // 6.1
export const UBLK_CMD_GET_DEV_INFO2 = 0x12; // 6.3

// ioctl-encoded opcodes (6.4, UBLK_F_CMD_IOCTL_ENCODE): _IOR('u', nr, struct ublksrv_ctrl_cmd)
// = 0x80207500 | nr, _IOWR(...) = 0xc0207500 | nr. Commands after 0x12 exist only encoded.
export const UBLK_U_CMD_GET_QUEUE_AFFINITY = 0x80207501;
export const UBLK_U_CMD_GET_DEV_INFO = 0x80207502;
export const UBLK_U_CMD_ADD_DEV = 0xc0207504;
export const UBLK_U_CMD_DEL_DEV = 0xc0207505; // blocks until every /dev/ublkcN reference is gone
export const UBLK_U_CMD_START_DEV = 0xc0207506; // blocks until every tag has a FETCH outstanding
export const UBLK_U_CMD_STOP_DEV = 0xc0207507;
export const UBLK_U_CMD_SET_PARAMS = 0xc0207508;
export const UBLK_U_CMD_GET_PARAMS = 0x80207509;
export const UBLK_U_CMD_START_USER_RECOVERY = 0xc0207510;
export const UBLK_U_CMD_END_USER_RECOVERY = 0xc0207511;
export const UBLK_U_CMD_GET_DEV_INFO2 = 0x80207512;
export const UBLK_U_CMD_GET_FEATURES = 0x80207513; // 6.5; addr -> __u64, len must be 8
export const UBLK_U_CMD_DEL_DEV_ASYNC = 0x80207514; // 6.9
export const UBLK_U_CMD_UPDATE_SIZE = 0xc0207515; // 6.16; data[0] = new size in sectors
export const UBLK_U_CMD_QUIESCE_DEV = 0xc0207516; // 6.16; data[0] = timeout in ms
export const UBLK_U_CMD_TRY_STOP_DEV = 0xc0207517; // 7.0; -EBUSY while the disk is open
export const UBLK_U_CMD_REG_BUF = 0xc0207518; // 7.1; addr -> ublk_shmem_buf_reg, returns index
export const UBLK_U_CMD_UNREG_BUF = 0xc0207519; // 7.1; data[0] = buffer index

/** Size of the GET_FEATURES reply (6.5). */
export const UBLK_FEATURES_LEN = 8;

// ---------------------------------------------------------------------------------------------
// I/O commands: IORING_OP_URING_CMD on /dev/ublkcN with a struct ublksrv_io_cmd (16 bytes,
// fits a plain 64-byte SQE) at SQE byte 48.
// ---------------------------------------------------------------------------------------------

// Legacy opcodes (6.0), same caveat as the legacy control opcodes.
export const UBLK_IO_FETCH_REQ = 0x20;
export const UBLK_IO_COMMIT_AND_FETCH_REQ = 0x21;
export const UBLK_IO_NEED_GET_DATA = 0x22;

// Encoded: _IOWR('u', nr, struct ublksrv_io_cmd) = 0xc0107500 | nr (struct ublk_batch_io, also
// 16 bytes, for the batch commands).
export const UBLK_U_IO_FETCH_REQ = 0xc0107520; // 6.4
export const UBLK_U_IO_COMMIT_AND_FETCH_REQ = 0xc0107521; // 6.4
export const UBLK_U_IO_NEED_GET_DATA = 0xc0107522; // 6.4
export const UBLK_U_IO_REGISTER_IO_BUF = 0xc0107523; // 6.15 (zero copy)
export const UBLK_U_IO_UNREGISTER_IO_BUF = 0xc0107524; // 6.15
export const UBLK_U_IO_PREP_IO_CMDS = 0xc0107525; // 7.0 (UBLK_F_BATCH_IO)
export const UBLK_U_IO_COMMIT_IO_CMDS = 0xc0107526; // 7.0; returns bytes of the buffer handled
export const UBLK_U_IO_FETCH_IO_CMDS = 0xc0107527; // 7.0; needs IORING_URING_CMD_MULTISHOT

// cqe->res of a FETCH/COMMIT_AND_FETCH. Only ABORT means "do not fetch this tag again".
export const UBLK_IO_RES_OK = 0;
export const UBLK_IO_RES_NEED_GET_DATA = 1;
export const UBLK_IO_RES_ABORT = -19; // -ENODEV

// ---------------------------------------------------------------------------------------------
// mmap and user-copy positions on /dev/ublkcN
// ---------------------------------------------------------------------------------------------

/** mmap offset of queue 0's descriptor array; see descOffset() for the others. */
export const UBLKSRV_CMD_BUF_OFFSET = 0;
/** pread/pwrite position of the first request buffer (UBLK_F_USER_COPY); see userCopyOffset(). */
export const UBLKSRV_IO_BUF_OFFSET = 0x80000000;

/** The most tags a queue may have; also fixes the per-queue descriptor stride (descOffset). */
export const UBLK_MAX_QUEUE_DEPTH = 4096;

// A user-copy position is UBLKSRV_IO_BUF_OFFSET + (qid << 41 | tag << 25 | byte offset). These
// came with user copy: absent from the 6.1 headers, present in 6.12.
export const UBLK_IO_BUF_OFF = 0;
export const UBLK_IO_BUF_BITS = 25; // one request buffer is at most 32 MiB
export const UBLK_IO_BUF_BITS_MASK = 0x1ffffff;
export const UBLK_TAG_OFF = 25;
export const UBLK_TAG_BITS = 16;
export const UBLK_TAG_BITS_MASK = 0xffff;
export const UBLK_QID_OFF = 41;
export const UBLK_QID_BITS = 12;
export const UBLK_QID_BITS_MASK = 0xfff;
export const UBLK_MAX_NR_QUEUES = 4096;
export const UBLKSRV_IO_BUF_TOTAL_BITS = 53;
// UBLKSRV_IO_BUF_TOTAL_SIZE (1 << 53) is left out: see the header comment.

/** Bit of a user-copy position that selects integrity data (7.0); the mask itself is left out. */
export const UBLK_INTEGRITY_FLAG_OFF = 62;

// ---------------------------------------------------------------------------------------------
// Feature flags (ublksrv_ctrl_dev_info.flags for ADD_DEV; GET_FEATURES reports what the kernel
// supports). The kernel silently drops bits it does not know or refuses: read dev_info back.
// The versions here are repeated, with notes, in UBLK_FEATURES below.
// ---------------------------------------------------------------------------------------------
export const UBLK_F_SUPPORT_ZERO_COPY = 1 << 0; // defined 6.0, functional only from 6.15
export const UBLK_F_URING_CMD_COMP_IN_TASK = 1 << 1; // 6.0
export const UBLK_F_NEED_GET_DATA = 1 << 2; // 6.0
export const UBLK_F_USER_RECOVERY = 1 << 3; // 6.1
export const UBLK_F_USER_RECOVERY_REISSUE = 1 << 4; // 6.1
export const UBLK_F_UNPRIVILEGED_DEV = 1 << 5; // 6.3
export const UBLK_F_CMD_IOCTL_ENCODE = 1 << 6; // 6.4
export const UBLK_F_USER_COPY = 1 << 7; // 6.5
export const UBLK_F_ZONED = 1 << 8; // 6.6; needs USER_COPY or SUPPORT_ZERO_COPY
export const UBLK_F_USER_RECOVERY_FAIL_IO = 1 << 9; // 6.13
export const UBLK_F_UPDATE_SIZE = 1 << 10; // 6.16
export const UBLK_F_AUTO_BUF_REG = 1 << 11; // 6.16
export const UBLK_F_QUIESCE = 1 << 12; // 6.16; needs USER_RECOVERY
export const UBLK_F_PER_IO_DAEMON = 1 << 13; // 6.16
export const UBLK_F_BUF_REG_OFF_DAEMON = 1 << 14; // 6.17
export const UBLK_F_BATCH_IO = 1 << 15; // 7.0
export const UBLK_F_INTEGRITY = 1 << 16; // 7.0; needs USER_COPY
export const UBLK_F_SAFE_STOP_DEV = 1 << 17; // 7.0
export const UBLK_F_NO_AUTO_PART_SCAN = 1 << 18; // 7.0
export const UBLK_F_SHMEM_ZC = 1 << 19; // 7.1
// UBLK_F_IO_DESC_SIZE (1 << 20) is not in the 7.2 headers; it is only a UBLK_FEATURES entry.

// Device states (ublksrv_ctrl_dev_info.state).
export const UBLK_S_DEV_DEAD = 0;
export const UBLK_S_DEV_LIVE = 1;
export const UBLK_S_DEV_QUIESCED = 2;
export const UBLK_S_DEV_FAIL_IO = 3; // 6.13

// ---------------------------------------------------------------------------------------------
// Requests: struct ublksrv_io_desc, op in op_flags bits 0-7, flags in bits 8-31
// ---------------------------------------------------------------------------------------------
export const UBLK_IO_OP_READ = 0;
export const UBLK_IO_OP_WRITE = 1;
export const UBLK_IO_OP_FLUSH = 2;
export const UBLK_IO_OP_DISCARD = 3;
export const UBLK_IO_OP_WRITE_SAME = 4;
export const UBLK_IO_OP_WRITE_ZEROES = 5;
export const UBLK_IO_OP_ZONE_OPEN = 10; // zone ops: 6.6 (UBLK_F_ZONED)
export const UBLK_IO_OP_ZONE_CLOSE = 11;
export const UBLK_IO_OP_ZONE_FINISH = 12;
export const UBLK_IO_OP_ZONE_APPEND = 13;
export const UBLK_IO_OP_ZONE_RESET_ALL = 14;
export const UBLK_IO_OP_ZONE_RESET = 15;
export const UBLK_IO_OP_REPORT_ZONES = 18;

// Unshifted, as in the header: test `op_flags & UBLK_IO_F_FUA`, not the C helper
// ublksrv_get_flags() (which returns op_flags >> 8) against these.
export const UBLK_IO_F_FAILFAST_DEV = 1 << 8;
export const UBLK_IO_F_FAILFAST_TRANSPORT = 1 << 9;
export const UBLK_IO_F_FAILFAST_DRIVER = 1 << 10;
export const UBLK_IO_F_META = 1 << 11;
export const UBLK_IO_F_FUA = 1 << 13;
export const UBLK_IO_F_NOUNMAP = 1 << 15;
export const UBLK_IO_F_SWAP = 1 << 16;
export const UBLK_IO_F_NEED_REG_BUF = 1 << 17; // 6.16: auto-buf-reg failed, register by hand
export const UBLK_IO_F_INTEGRITY = 1 << 18; // 7.0
export const UBLK_IO_F_SHMEM_ZC = 1 << 19; // 7.1: desc.addr is a shmem index + offset

export const ublksrv_io_desc = {
  SIZE: 24,
  op_flags: 0, // __u32
  nr_sectors: 4, // __u32; union with nr_zones
  nr_zones: 4, // 6.6 (REPORT_ZONES)
  start_sector: 8, // __u64, 512-byte sectors
  addr: 16, // __u64 buffer address (or shmem index + offset with UBLK_IO_F_SHMEM_ZC)
} as const;

export const ublksrv_io_cmd = {
  SIZE: 16,
  q_id: 0, // __u16
  tag: 2, // __u16
  result: 4, // __s32, COMMIT* only
  addr: 8, // __u64; union with zone_append_lba
  zone_append_lba: 8, // 6.6
} as const;

// ---------------------------------------------------------------------------------------------
// Control structs
// ---------------------------------------------------------------------------------------------
export const ublksrv_ctrl_cmd = {
  SIZE: 32,
  dev_id: 0, // __u32; -1 on ADD_DEV = let the kernel choose
  queue_id: 4, // __u16; 0xffff unless the command is per-queue
  len: 6, // __u16
  addr: 8, // __u64
  data: 16, // __u64 data[1] (data[2] before 6.3, same offset)
  dev_path_len: 24, // __u16; 6.3, unprivileged devices and GET_DEV_INFO2
  pad: 26,
  reserved: 28,
} as const;

export const ublksrv_ctrl_dev_info = {
  SIZE: 64,
  nr_hw_queues: 0, // __u16
  queue_depth: 2, // __u16, <= UBLK_MAX_QUEUE_DEPTH
  state: 4, // __u16 UBLK_S_DEV_*
  pad0: 6, // __u16; becomes io_desc_size in 7.3 (UBLK_F_IO_DESC_SIZE)
  max_io_buf_bytes: 8, // __u32
  dev_id: 12, // __u32
  ublksrv_pid: 16, // __s32
  pad1: 20,
  flags: 24, // __u64 UBLK_F_*
  ublksrv_flags: 32, // __u64, the server's own; the kernel only stores it
  owner_uid: 40, // __u32; 6.3 (6.1 had __u64 reserved0 here)
  owner_gid: 44, // __u32; 6.3
  reserved1: 48,
  reserved2: 56,
} as const;

/** Parameter buffer of UBLK_U_CMD_REG_BUF (7.1). 24 bytes in 7.2; an early 7.1-cycle copy had 16. */
export const ublk_shmem_buf_reg = {
  SIZE: 24,
  addr: 0, // __u64 address of the shared mapping
  len: 8, // __u64 page-aligned length
  flags: 16, // __u32 UBLK_SHMEM_BUF_*
  reserved: 20,
} as const;

/** Pin without FOLL_WRITE, so a write-sealed memfd can be registered (7.1). */
export const UBLK_SHMEM_BUF_READ_ONLY = 1 << 0;

// With UBLK_IO_F_SHMEM_ZC, ublksrv_io_desc.addr is (buffer index << 32) | byte offset (7.1).
export const UBLK_SHMEM_ZC_OFF_MASK = 0xffffffff;
export const UBLK_SHMEM_ZC_IDX_OFF = 32;
export const UBLK_SHMEM_ZC_IDX_MASK = 0xffff;

// ---------------------------------------------------------------------------------------------
// Automatic buffer registration (UBLK_F_AUTO_BUF_REG, 6.16): a struct ublk_auto_buf_reg packed
// into the FETCH/COMMIT SQE's addr field (index bits 0-15, flags 16-23, reserved 24-63).
// ---------------------------------------------------------------------------------------------
export const UBLK_AUTO_BUF_REG_FALLBACK = 1 << 0;
export const UBLK_AUTO_BUF_REG_F_MASK = 1 << 0;

export const ublk_auto_buf_reg = {
  SIZE: 8,
  index: 0, // __u16 slot in the ring's sparse buffer table
  flags: 2, // __u8 UBLK_AUTO_BUF_REG_*
  reserved0: 3,
  reserved1: 4, // __u32, must be 0
} as const;

// ---------------------------------------------------------------------------------------------
// Batch I/O (UBLK_F_BATCH_IO, 7.0): PREP/COMMIT/FETCH_IO_CMDS carry a struct ublk_batch_io in
// the SQE and point at a buffer of nr_elem elements of elem_bytes each: a ublk_elem_header, then
// an 8-byte buffer address if HAS_BUF_ADDR, then an 8-byte zone LBA if HAS_ZONE_LBA.
// ---------------------------------------------------------------------------------------------
export const UBLK_BATCH_F_HAS_ZONE_LBA = 1 << 0;
export const UBLK_BATCH_F_HAS_BUF_ADDR = 1 << 1;
export const UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK = 1 << 2;

export const ublk_batch_io = {
  SIZE: 16,
  q_id: 0, // __u16
  flags: 2, // __u16 UBLK_BATCH_F_*
  nr_elem: 4, // __u16
  elem_bytes: 6, // __u8
  reserved: 7,
  reserved2: 8, // __u64
} as const;

export const ublk_elem_header = {
  SIZE: 8,
  tag: 0, // __u16
  buf_index: 2, // __u16, with UBLK_F_AUTO_BUF_REG
  result: 4, // __s32, COMMIT only
} as const;

// ---------------------------------------------------------------------------------------------
// Device parameters (SET_PARAMS / GET_PARAMS). struct ublk_params grows by appending members;
// `len` tells the kernel which version we speak and it copies at most its own size, masking the
// `types` it does not know; read the result back with GET_PARAMS.
// ---------------------------------------------------------------------------------------------
export const UBLK_PARAM_TYPE_BASIC = 1 << 0; // mandatory
export const UBLK_PARAM_TYPE_DISCARD = 1 << 1;
export const UBLK_PARAM_TYPE_DEVT = 1 << 2; // 6.3, read-only (GET_PARAMS after START_DEV)
export const UBLK_PARAM_TYPE_ZONED = 1 << 3; // 6.6
export const UBLK_PARAM_TYPE_DMA_ALIGN = 1 << 4; // 6.15
export const UBLK_PARAM_TYPE_SEGMENT = 1 << 5; // 6.15
export const UBLK_PARAM_TYPE_INTEGRITY = 1 << 6; // 7.0; needs UBLK_F_INTEGRITY

// ublk_param_basic.attrs
export const UBLK_ATTR_READ_ONLY = 1 << 0;
export const UBLK_ATTR_ROTATIONAL = 1 << 1;
export const UBLK_ATTR_VOLATILE_CACHE = 1 << 2;
export const UBLK_ATTR_FUA = 1 << 3;

export const ublk_param_basic = {
  SIZE: 32,
  attrs: 0, // __u32 UBLK_ATTR_*
  logical_bs_shift: 4, // __u8
  physical_bs_shift: 5,
  io_opt_shift: 6,
  io_min_shift: 7,
  max_sectors: 8, // __u32
  chunk_sectors: 12, // __u32
  dev_sectors: 16, // __u64, 512-byte sectors whatever the block size
  virt_boundary_mask: 24, // __u64
} as const;

export const ublk_param_discard = {
  SIZE: 20,
  discard_alignment: 0, // __u32
  discard_granularity: 4,
  max_discard_sectors: 8, // cap at UINT32_MAX >> 9: kernels before 6.11 truncate silently
  max_write_zeroes_sectors: 12,
  max_discard_segments: 16, // __u16
  reserved0: 18,
} as const;

/** 6.3; filled in by the kernel, rejected by SET_PARAMS. */
export const ublk_param_devt = {
  SIZE: 16,
  char_major: 0,
  char_minor: 4,
  disk_major: 8,
  disk_minor: 12,
} as const;

/** 6.6. */
export const ublk_param_zoned = {
  SIZE: 32,
  max_open_zones: 0,
  max_active_zones: 4,
  max_zone_append_sectors: 8,
  reserved: 12, // __u8[20]
} as const;

/** 6.15. */
export const ublk_param_dma_align = { SIZE: 8, alignment: 0, pad: 4 } as const;

/** Lower bound of max_segment_size and of seg_boundary_mask + 1 (6.15). */
export const UBLK_MIN_SEGMENT_SIZE = 4096;

/** 6.15. */
export const ublk_param_segment = {
  SIZE: 16,
  seg_boundary_mask: 0, // __u64; + 1 must be a power of two >= UBLK_MIN_SEGMENT_SIZE
  max_segment_size: 8, // __u32
  max_segments: 12, // __u16
  pad: 14,
} as const;

/** 7.0. */
export const ublk_param_integrity = {
  SIZE: 16,
  flags: 0, // __u32 LBMD_PI_CAP_* (<linux/fs.h>)
  max_integrity_segments: 4, // __u16, 0 = no limit
  interval_exp: 6, // __u8
  metadata_size: 7, // must be non-zero with UBLK_PARAM_TYPE_INTEGRITY
  pi_offset: 8,
  csum_type: 9, // LBMD_PI_CSUM_*
  tag_size: 10,
  pad: 11, // __u8[5]
} as const;

/**
 * The 7.0+ layout (152 bytes). Older kernels' versions are prefixes of it: 64 bytes in 6.1
 * (basic, discard), 112 in 6.12 (+ devt 6.3, zoned 6.6), 136 in 6.15 (+ dma, seg).
 */
export const ublk_params = {
  SIZE: 152,
  len: 0, // __u32, bytes of this struct we send / want back
  types: 4, // __u32 UBLK_PARAM_TYPE_*
  basic: 8,
  discard: 40,
  devt: 60, // 6.3
  zoned: 76, // 6.6
  dma: 108, // 6.15 (struct ublk_param_dma_align)
  seg: 120, // 6.15 (struct ublk_param_segment)
  integrity: 136, // 7.0
} as const;

// =============================================================================================
// Not C: tables and helpers built on the numbers above (ignored by the conformance test).
// =============================================================================================

export interface UblkFeature {
  /** The C name, e.g. 'UBLK_F_USER_COPY'. */
  name: string;
  bit: number;
  /** First kernel release where the flag works, e.g. '6.5'. */
  since: string;
  /** Caveats worth repeating in a "kernel too old" message or in `ublk features`. */
  note?: string;
}

/** Every feature bit, lowest first (`UBLK_FEATURES[bit].bit === bit`). */
export const UBLK_FEATURES: readonly UblkFeature[] = [
  { name: 'UBLK_F_SUPPORT_ZERO_COPY', bit: 0, since: '6.15',
    note: 'defined since 6.0, but the driver cleared it before 6.15; not for unprivileged devices' },
  { name: 'UBLK_F_URING_CMD_COMP_IN_TASK', bit: 1, since: '6.0', note: 'always on since 6.5' },
  { name: 'UBLK_F_NEED_GET_DATA', bit: 2, since: '6.0',
    note: 'cleared by user copy, zero copy and batch I/O' },
  { name: 'UBLK_F_USER_RECOVERY', bit: 3, since: '6.1' },
  { name: 'UBLK_F_USER_RECOVERY_REISSUE', bit: 4, since: '6.1' },
  { name: 'UBLK_F_UNPRIVILEGED_DEV', bit: 5, since: '6.3',
    note: 'excludes user copy and zero copy' },
  { name: 'UBLK_F_CMD_IOCTL_ENCODE', bit: 6, since: '6.4', note: 'always on' },
  { name: 'UBLK_F_USER_COPY', bit: 7, since: '6.5' },
  { name: 'UBLK_F_ZONED', bit: 8, since: '6.6', note: 'needs user copy or zero copy' },
  { name: 'UBLK_F_USER_RECOVERY_FAIL_IO', bit: 9, since: '6.13' },
  { name: 'UBLK_F_UPDATE_SIZE', bit: 10, since: '6.16' },
  { name: 'UBLK_F_AUTO_BUF_REG', bit: 11, since: '6.16' },
  { name: 'UBLK_F_QUIESCE', bit: 12, since: '6.16', note: 'needs user recovery' },
  { name: 'UBLK_F_PER_IO_DAEMON', bit: 13, since: '6.16', note: 'always on except with batch I/O' },
  { name: 'UBLK_F_BUF_REG_OFF_DAEMON', bit: 14, since: '6.17', note: 'always on' },
  { name: 'UBLK_F_BATCH_IO', bit: 15, since: '7.0' },
  { name: 'UBLK_F_INTEGRITY', bit: 16, since: '7.0', note: 'needs user copy' },
  { name: 'UBLK_F_SAFE_STOP_DEV', bit: 17, since: '7.0' },
  { name: 'UBLK_F_NO_AUTO_PART_SCAN', bit: 18, since: '7.0' },
  { name: 'UBLK_F_SHMEM_ZC', bit: 19, since: '7.1' },
  { name: 'UBLK_F_IO_DESC_SIZE', bit: 20, since: '7.3',
    note: 'not in the 7.2 headers this module mirrors; reuses dev_info.pad0 as io_desc_size' },
];

/**
 * The names of the feature bits set in `flags` (a dev_info.flags or GET_FEATURES value; u64, so
 * a bigint is accepted), lowest first; bits we have no name for come out as 'bit N'.
 */
export function ublkFeatureNames(flags: bigint | number): string[] {
  const value = BigInt(flags);
  const names: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    if ((value >> BigInt(bit)) & 1n) names.push(UBLK_FEATURES[bit]?.name ?? `bit ${bit}`);
  }
  return names;
}

export interface UblkCommand {
  /** The C name without its prefix: 'ADD_DEV' for UBLK_U_CMD_ADD_DEV. */
  name: string;
  /** The command number ('u' ioctl nr). */
  nr: number;
  /** The ioctl-encoded opcode (kernel 6.4+). */
  op: number;
  /** The plain opcode, for kernels before 6.4; absent for commands that never had one. */
  legacy?: number;
  /** First kernel release with the command (in legacy form, where it has one). */
  since: string;
}

/**
 * Every control command. On kernels before 6.4 only `legacy` opcodes work; from 6.4 on, prefer
 * `op` (a kernel built without CONFIG_BLKDEV_UBLK_LEGACY_OPCODES rejects `legacy` ones).
 */
export const UBLK_CTRL_COMMANDS: readonly UblkCommand[] = [
  { name: 'GET_QUEUE_AFFINITY', nr: 0x01, op: UBLK_U_CMD_GET_QUEUE_AFFINITY, legacy: UBLK_CMD_GET_QUEUE_AFFINITY, since: '6.0' },
  { name: 'GET_DEV_INFO', nr: 0x02, op: UBLK_U_CMD_GET_DEV_INFO, legacy: UBLK_CMD_GET_DEV_INFO, since: '6.0' },
  { name: 'ADD_DEV', nr: 0x04, op: UBLK_U_CMD_ADD_DEV, legacy: UBLK_CMD_ADD_DEV, since: '6.0' },
  { name: 'DEL_DEV', nr: 0x05, op: UBLK_U_CMD_DEL_DEV, legacy: UBLK_CMD_DEL_DEV, since: '6.0' },
  { name: 'START_DEV', nr: 0x06, op: UBLK_U_CMD_START_DEV, legacy: UBLK_CMD_START_DEV, since: '6.0' },
  { name: 'STOP_DEV', nr: 0x07, op: UBLK_U_CMD_STOP_DEV, legacy: UBLK_CMD_STOP_DEV, since: '6.0' },
  { name: 'SET_PARAMS', nr: 0x08, op: UBLK_U_CMD_SET_PARAMS, legacy: UBLK_CMD_SET_PARAMS, since: '6.0' },
  { name: 'GET_PARAMS', nr: 0x09, op: UBLK_U_CMD_GET_PARAMS, legacy: UBLK_CMD_GET_PARAMS, since: '6.0' },
  { name: 'START_USER_RECOVERY', nr: 0x10, op: UBLK_U_CMD_START_USER_RECOVERY, legacy: UBLK_CMD_START_USER_RECOVERY, since: '6.1' },
  { name: 'END_USER_RECOVERY', nr: 0x11, op: UBLK_U_CMD_END_USER_RECOVERY, legacy: UBLK_CMD_END_USER_RECOVERY, since: '6.1' },
  { name: 'GET_DEV_INFO2', nr: 0x12, op: UBLK_U_CMD_GET_DEV_INFO2, legacy: UBLK_CMD_GET_DEV_INFO2, since: '6.3' },
  { name: 'GET_FEATURES', nr: 0x13, op: UBLK_U_CMD_GET_FEATURES, since: '6.5' },
  { name: 'DEL_DEV_ASYNC', nr: 0x14, op: UBLK_U_CMD_DEL_DEV_ASYNC, since: '6.9' },
  { name: 'UPDATE_SIZE', nr: 0x15, op: UBLK_U_CMD_UPDATE_SIZE, since: '6.16' },
  { name: 'QUIESCE_DEV', nr: 0x16, op: UBLK_U_CMD_QUIESCE_DEV, since: '6.16' },
  { name: 'TRY_STOP_DEV', nr: 0x17, op: UBLK_U_CMD_TRY_STOP_DEV, since: '7.0' },
  { name: 'REG_BUF', nr: 0x18, op: UBLK_U_CMD_REG_BUF, since: '7.1' },
  { name: 'UNREG_BUF', nr: 0x19, op: UBLK_U_CMD_UNREG_BUF, since: '7.1' },
];

/** Every I/O command, in the same shape as UBLK_CTRL_COMMANDS. */
export const UBLK_IO_COMMANDS: readonly UblkCommand[] = [
  { name: 'FETCH_REQ', nr: 0x20, op: UBLK_U_IO_FETCH_REQ, legacy: UBLK_IO_FETCH_REQ, since: '6.0' },
  { name: 'COMMIT_AND_FETCH_REQ', nr: 0x21, op: UBLK_U_IO_COMMIT_AND_FETCH_REQ, legacy: UBLK_IO_COMMIT_AND_FETCH_REQ, since: '6.0' },
  { name: 'NEED_GET_DATA', nr: 0x22, op: UBLK_U_IO_NEED_GET_DATA, legacy: UBLK_IO_NEED_GET_DATA, since: '6.0' },
  { name: 'REGISTER_IO_BUF', nr: 0x23, op: UBLK_U_IO_REGISTER_IO_BUF, since: '6.15' },
  { name: 'UNREGISTER_IO_BUF', nr: 0x24, op: UBLK_U_IO_UNREGISTER_IO_BUF, since: '6.15' },
  { name: 'PREP_IO_CMDS', nr: 0x25, op: UBLK_U_IO_PREP_IO_CMDS, since: '7.0' },
  { name: 'COMMIT_IO_CMDS', nr: 0x26, op: UBLK_U_IO_COMMIT_IO_CMDS, since: '7.0' },
  { name: 'FETCH_IO_CMDS', nr: 0x27, op: UBLK_U_IO_FETCH_IO_CMDS, since: '7.0' },
];

/** Request op names by UBLK_IO_OP_* value, for logs and errors. */
export const UBLK_IO_OP_NAMES: Readonly<Record<number, string>> = {
  [UBLK_IO_OP_READ]: 'READ',
  [UBLK_IO_OP_WRITE]: 'WRITE',
  [UBLK_IO_OP_FLUSH]: 'FLUSH',
  [UBLK_IO_OP_DISCARD]: 'DISCARD',
  [UBLK_IO_OP_WRITE_SAME]: 'WRITE_SAME',
  [UBLK_IO_OP_WRITE_ZEROES]: 'WRITE_ZEROES',
  [UBLK_IO_OP_ZONE_OPEN]: 'ZONE_OPEN',
  [UBLK_IO_OP_ZONE_CLOSE]: 'ZONE_CLOSE',
  [UBLK_IO_OP_ZONE_FINISH]: 'ZONE_FINISH',
  [UBLK_IO_OP_ZONE_APPEND]: 'ZONE_APPEND',
  [UBLK_IO_OP_ZONE_RESET_ALL]: 'ZONE_RESET_ALL',
  [UBLK_IO_OP_ZONE_RESET]: 'ZONE_RESET',
  [UBLK_IO_OP_REPORT_ZONES]: 'REPORT_ZONES',
};

/** The request op of a ublksrv_io_desc.op_flags (C: ublksrv_get_op()). */
export function opOf(opFlags: number): number {
  return opFlags & 0xff;
}

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

function checkPageSize(pageSize: number): void {
  if (!Number.isInteger(pageSize) || pageSize < 4096 || (pageSize & (pageSize - 1)) !== 0) {
    throw new RangeError(`the page size must be the kernel's (a power of two, at least 4096), got ${pageSize}`);
  }
}

function checkIndex(what: string, value: number, limit: number): void {
  if (!Number.isInteger(value) || value < 0 || value >= limit) {
    throw new RangeError(`${what} must be an integer in [0, ${limit}), got ${value}`);
  }
}

/**
 * mmap offset of queue `qid`'s descriptor array on /dev/ublkcN.
 *
 * The stride between queues is fixed: the kernel divides the offset by the size of a
 * *maximum-depth* array, round_up(UBLK_MAX_QUEUE_DEPTH * 24, PAGE_SIZE), whatever the device's
 * depth, to find the queue. Computing the stride from the device's own depth (the "obvious"
 * qid * descLength(depth)) works for queue 0 and silently maps the wrong queue's descriptors,
 * or fails, for every other one: a known multi-queue corruption bug in other ublk servers.
 * `pageSize` is the running kernel's (PAGE_SIZE from src/libc): there is deliberately no
 * default, because a 4 KiB guess on a 64 KiB-page kernel misplaces every queue but the first.
 */
export function descOffset(qid: number, pageSize: number): number {
  checkPageSize(pageSize);
  checkIndex('queue id', qid, UBLK_MAX_NR_QUEUES);
  return UBLKSRV_CMD_BUF_OFFSET + qid * roundUp(UBLK_MAX_QUEUE_DEPTH * ublksrv_io_desc.SIZE, pageSize);
}

/**
 * mmap length of one queue's descriptor array: the kernel insists on exactly
 * round_up(depth * 24, PAGE_SIZE) for the device's depth (unlike the stride; see descOffset).
 */
export function descLength(depth: number, pageSize: number): number {
  checkPageSize(pageSize);
  if (!Number.isInteger(depth) || depth < 1 || depth > UBLK_MAX_QUEUE_DEPTH) {
    throw new RangeError(`queue depth must be an integer in [1, ${UBLK_MAX_QUEUE_DEPTH}], got ${depth}`);
  }
  return roundUp(depth * ublksrv_io_desc.SIZE, pageSize);
}

/**
 * pread/pwrite position on /dev/ublkcN of byte `byteOffset` of request (qid, tag)'s buffer, for
 * UBLK_F_USER_COPY. Exact as a JS number: with qid < 4096 and tag < UBLK_MAX_QUEUE_DEPTH it stays
 * below 2^53, which is why tags are bounded by the queue depth limit rather than UBLK_TAG_BITS.
 * (For integrity data, OR in bit UBLK_INTEGRITY_FLAG_OFF as a bigint; see the header comment.)
 */
export function userCopyOffset(qid: number, tag: number, byteOffset = 0): number {
  checkIndex('queue id', qid, UBLK_MAX_NR_QUEUES);
  checkIndex('tag', tag, UBLK_MAX_QUEUE_DEPTH);
  checkIndex('buffer offset', byteOffset, 2 ** UBLK_IO_BUF_BITS);
  // Multiplication, not shifts: JS shifts are 32-bit.
  return UBLKSRV_IO_BUF_OFFSET + qid * 2 ** UBLK_QID_OFF + tag * 2 ** UBLK_TAG_OFF + byteOffset;
}

/**
 * The SQE addr value carrying a struct ublk_auto_buf_reg (C: ublk_auto_buf_reg_to_sqe_addr()),
 * reserved fields zero as the kernel requires.
 */
export function autoBufRegAddr(index: number, flags = 0): number {
  checkIndex('buffer index', index, 0x10000);
  checkIndex('auto-buf-reg flags', flags, 0x100);
  return index + flags * 0x10000;
}

/** Buffer index of a UBLK_IO_F_SHMEM_ZC descriptor address (C: ublk_shmem_zc_index()). */
export function shmemZcIndex(addr: number): number {
  return Math.floor(addr / 2 ** UBLK_SHMEM_ZC_IDX_OFF) & UBLK_SHMEM_ZC_IDX_MASK;
}

/** Byte offset in the buffer of a UBLK_IO_F_SHMEM_ZC descriptor address (C: ublk_shmem_zc_offset()). */
export function shmemZcOffset(addr: number): number {
  return addr % 2 ** UBLK_SHMEM_ZC_IDX_OFF;
}
