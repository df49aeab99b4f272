/**
 * The kernel ABI the targets use beyond io_uring and ublk: block-device ioctls and file-system
 * magic numbers.
 *
 * Mirrors `include/uapi/linux/fs.h` and `include/uapi/linux/magic.h` (checked against the
 * system's and Debian sid's headers by test/targets/conformance.test.ts, which compiles the C
 * names with gcc). Same naming rule as
 * src/uring/abi.ts: every constant keeps its C name.
 */

/** `_IO(0x12, 94)`: int, non-zero if the block device is read-only. */
export const BLKROGET = 0x125e;
/** `_IO(0x12, 104)`: int, the logical block (sector) size in bytes. */
export const BLKSSZGET = 0x1268;
/** `_IOR(0x12, 114, size_t)`: u64, the device size in bytes. */
export const BLKGETSIZE64 = 0x80081272;
/** `_IO(0x12, 123)`: unsigned int, the physical block size in bytes. */
export const BLKPBSZGET = 0x127b;

/** statfs(2) `f_type` of tmpfs (and of /dev/shm): shmem, mm/shmem.c. */
export const TMPFS_MAGIC = 0x01021994;
