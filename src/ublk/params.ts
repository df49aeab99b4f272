/**
 * The control commands' payloads: `struct ublksrv_ctrl_dev_info` (ADD_DEV, GET_DEV_INFO) and
 * `struct ublk_params` (SET_PARAMS, GET_PARAMS), as pure encoders and decoders over a DataView of
 * the payload memory, and the parameters a target's device shape asks for ({@link paramsFor}).
 * Layouts are src/ublk/abi.ts's; test/ublk/params.test.ts checks them byte by byte.
 */
import { PAGE_SIZE } from '../libc/index.js';
import {
  ublksrv_ctrl_dev_info, ublk_params, ublk_param_basic, ublk_param_discard, ublk_param_devt,
  UBLK_PARAM_TYPE_BASIC, UBLK_PARAM_TYPE_DISCARD, UBLK_PARAM_TYPE_DEVT, UBLK_ATTR_READ_ONLY,
  UBLK_ATTR_ROTATIONAL, UBLK_ATTR_VOLATILE_CACHE, UBLK_ATTR_FUA, UBLK_IO_BUF_BITS,
} from './abi.js';
import { ANY_DEV_ID, SECTOR_SHIFT, SECTOR_SIZE } from './wire.js';
import type { DeviceSpec } from './target.js';

/** What ADD_DEV takes and GET_DEV_INFO returns (`struct ublksrv_ctrl_dev_info`). */
export interface DevInfo {
  devId: number;
  nrHwQueues: number;
  queueDepth: number;
  /** UBLK_S_DEV_*. */
  state: number;
  /** max_io_buf_bytes: the largest request, and the size of each tag's buffer in copy mode. */
  maxIoBufBytes: number;
  ublksrvPid: number;
  /** UBLK_F_* (as negotiated: the kernel drops bits it does not know). */
  flags: number;
  /** The server's own word; the kernel only stores it. */
  ublksrvFlags: number;
  ownerUid: number;
  ownerGid: number;
}

/** The parameter blocks we set or read (`struct ublk_params`); sizes in bytes, sectors are 512 B. */
export interface DevParams {
  types: number;
  basic?: {
    attrs: number;
    logicalBsShift: number;
    physicalBsShift: number;
    ioOptShift: number;
    ioMinShift: number;
    maxSectors: number;
    chunkSectors: number;
    devSectors: number;
    virtBoundaryMask: number;
  };
  discard?: {
    discardAlignment: number;
    discardGranularity: number;
    maxDiscardSectors: number;
    maxWriteZeroesSectors: number;
    maxDiscardSegments: number;
  };
  devt?: { charMajor: number; charMinor: number; diskMajor: number; diskMinor: number };
}

/** Writes `info` at `base` of `v` (64 bytes, zeroed first); absent fields take ADD_DEV's defaults. */
export function writeDevInfo(v: DataView, base: number, info: Partial<DevInfo>): void {
  new Uint8Array(v.buffer, v.byteOffset + base, ublksrv_ctrl_dev_info.SIZE).fill(0);
  v.setUint16(base + ublksrv_ctrl_dev_info.nr_hw_queues, info.nrHwQueues ?? 1, true);
  v.setUint16(base + ublksrv_ctrl_dev_info.queue_depth, info.queueDepth ?? 128, true);
  v.setUint32(base + ublksrv_ctrl_dev_info.max_io_buf_bytes, info.maxIoBufBytes ?? 512 * 1024, true);
  v.setUint32(base + ublksrv_ctrl_dev_info.dev_id, info.devId ?? ANY_DEV_ID, true);
  v.setInt32(base + ublksrv_ctrl_dev_info.ublksrv_pid, info.ublksrvPid ?? process.pid, true);
  v.setBigUint64(base + ublksrv_ctrl_dev_info.flags, BigInt(info.flags ?? 0), true);
  v.setBigUint64(base + ublksrv_ctrl_dev_info.ublksrv_flags, BigInt(info.ublksrvFlags ?? 0), true);
}

/** Reads a `struct ublksrv_ctrl_dev_info` at `base` of `v`. */
export function readDevInfo(v: DataView, base: number): DevInfo {
  return {
    nrHwQueues: v.getUint16(base + ublksrv_ctrl_dev_info.nr_hw_queues, true),
    queueDepth: v.getUint16(base + ublksrv_ctrl_dev_info.queue_depth, true),
    state: v.getUint16(base + ublksrv_ctrl_dev_info.state, true),
    maxIoBufBytes: v.getUint32(base + ublksrv_ctrl_dev_info.max_io_buf_bytes, true),
    devId: v.getUint32(base + ublksrv_ctrl_dev_info.dev_id, true),
    ublksrvPid: v.getInt32(base + ublksrv_ctrl_dev_info.ublksrv_pid, true),
    flags: Number(v.getBigUint64(base + ublksrv_ctrl_dev_info.flags, true)),
    ublksrvFlags: Number(v.getBigUint64(base + ublksrv_ctrl_dev_info.ublksrv_flags, true)),
    ownerUid: v.getUint32(base + ublksrv_ctrl_dev_info.owner_uid, true),
    ownerGid: v.getUint32(base + ublksrv_ctrl_dev_info.owner_gid, true),
  };
}

/**
 * Writes `p` as a `struct ublk_params` at offset 0 of `v` (zeroed first), with `len` = our
 * struct's size: the kernel copies at most its own and ignores the types it does not know.
 */
export function writeParams(v: DataView, p: DevParams): void {
  new Uint8Array(v.buffer, v.byteOffset, ublk_params.SIZE).fill(0);
  v.setUint32(ublk_params.len, ublk_params.SIZE, true);
  v.setUint32(ublk_params.types, p.types, true);
  if (p.basic) {
    const b = ublk_params.basic;
    const x = p.basic;
    v.setUint32(b + ublk_param_basic.attrs, x.attrs, true);
    v.setUint8(b + ublk_param_basic.logical_bs_shift, x.logicalBsShift);
    v.setUint8(b + ublk_param_basic.physical_bs_shift, x.physicalBsShift);
    v.setUint8(b + ublk_param_basic.io_opt_shift, x.ioOptShift);
    v.setUint8(b + ublk_param_basic.io_min_shift, x.ioMinShift);
    v.setUint32(b + ublk_param_basic.max_sectors, x.maxSectors, true);
    v.setUint32(b + ublk_param_basic.chunk_sectors, x.chunkSectors, true);
    v.setBigUint64(b + ublk_param_basic.dev_sectors, BigInt(x.devSectors), true);
    v.setBigUint64(b + ublk_param_basic.virt_boundary_mask, BigInt(x.virtBoundaryMask), true);
  }
  if (p.discard) {
    const d = ublk_params.discard;
    const x = p.discard;
    v.setUint32(d + ublk_param_discard.discard_alignment, x.discardAlignment, true);
    v.setUint32(d + ublk_param_discard.discard_granularity, x.discardGranularity, true);
    v.setUint32(d + ublk_param_discard.max_discard_sectors, x.maxDiscardSectors, true);
    v.setUint32(d + ublk_param_discard.max_write_zeroes_sectors, x.maxWriteZeroesSectors, true);
    v.setUint16(d + ublk_param_discard.max_discard_segments, x.maxDiscardSegments, true);
  }
}

/** Prepares `v` for GET_PARAMS: zeroed, `len` = the struct size we understand. */
export function prepareParamsRead(v: DataView): void {
  new Uint8Array(v.buffer, v.byteOffset, ublk_params.SIZE).fill(0);
  v.setUint32(ublk_params.len, ublk_params.SIZE, true);
}

/** Decodes the `struct ublk_params` GET_PARAMS wrote at offset 0 of `v`. */
export function readParams(v: DataView): DevParams {
  const types = v.getUint32(ublk_params.types, true);
  const out: DevParams = { types };
  if (types & UBLK_PARAM_TYPE_BASIC) {
    const b = ublk_params.basic;
    out.basic = {
      attrs: v.getUint32(b + ublk_param_basic.attrs, true),
      logicalBsShift: v.getUint8(b + ublk_param_basic.logical_bs_shift),
      physicalBsShift: v.getUint8(b + ublk_param_basic.physical_bs_shift),
      ioOptShift: v.getUint8(b + ublk_param_basic.io_opt_shift),
      ioMinShift: v.getUint8(b + ublk_param_basic.io_min_shift),
      maxSectors: v.getUint32(b + ublk_param_basic.max_sectors, true),
      chunkSectors: v.getUint32(b + ublk_param_basic.chunk_sectors, true),
      devSectors: Number(v.getBigUint64(b + ublk_param_basic.dev_sectors, true)),
      virtBoundaryMask: Number(v.getBigUint64(b + ublk_param_basic.virt_boundary_mask, true)),
    };
  }
  if (types & UBLK_PARAM_TYPE_DISCARD) {
    const d = ublk_params.discard;
    out.discard = {
      discardAlignment: v.getUint32(d + ublk_param_discard.discard_alignment, true),
      discardGranularity: v.getUint32(d + ublk_param_discard.discard_granularity, true),
      maxDiscardSectors: v.getUint32(d + ublk_param_discard.max_discard_sectors, true),
      maxWriteZeroesSectors: v.getUint32(d + ublk_param_discard.max_write_zeroes_sectors, true),
      maxDiscardSegments: v.getUint16(d + ublk_param_discard.max_discard_segments, true),
    };
  }
  if (types & UBLK_PARAM_TYPE_DEVT) {
    const d = ublk_params.devt;
    out.devt = {
      charMajor: v.getUint32(d + ublk_param_devt.char_major, true),
      charMinor: v.getUint32(d + ublk_param_devt.char_minor, true),
      diskMajor: v.getUint32(d + ublk_param_devt.disk_major, true),
      diskMinor: v.getUint32(d + ublk_param_devt.disk_minor, true),
    };
  }
  return out;
}

/** The largest request ublk can describe: a tag's buffer offset has UBLK_IO_BUF_BITS bits (32 MiB). */
export const MAX_IO_BYTES = 2 ** UBLK_IO_BUF_BITS;
/** The smallest request size we accept: one page (the kernel wants at least one). */
export const MIN_IO_BYTES = 4096;

/** n is 1, 2, 4, 8, ... Exact below 2^31 (bitwise operators see 32 bits); every caller bounds n below that too. */
export const isPowerOfTwo = (n: number): boolean => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;

/**
 * Why `spec` (with requests of up to `maxIoBytes`) cannot be a ublk device, or undefined if it
 * can: the rules SET_PARAMS enforces (ublk_validate_params in ublk_drv.c), checked before any
 * device exists so a user sees one clear line instead of an EINVAL after ADD_DEV.
 */
export function specProblem(spec: DeviceSpec, maxIoBytes: number, queues = 1): string | undefined {
  if (spec.queueLimit !== undefined && queues > spec.queueLimit.max) {
    return `${spec.queueLimit.reason}: it can serve at most ${spec.queueLimit.max} queue(s); use -q ${spec.queueLimit.max}`;
  }
  const lbs = spec.logicalBlockSize ?? SECTOR_SIZE;
  const pbs = spec.physicalBlockSize ?? lbs;
  // The kernel refuses a logical block larger than a page (logical_bs_shift > PAGE_SHIFT).
  if (!isPowerOfTwo(lbs) || lbs < SECTOR_SIZE || lbs > PAGE_SIZE) {
    return `the logical block size must be a power of two from ${SECTOR_SIZE} to ${PAGE_SIZE} (this machine's page size), got ${lbs}`;
  }
  if (!isPowerOfTwo(pbs) || pbs < lbs || pbs > 65536) {
    return `the physical block size must be a power of two from the logical block size (${lbs}) to 65536, got ${pbs}`;
  }
  if (!Number.isSafeInteger(spec.sizeBytes) || spec.sizeBytes < lbs || spec.sizeBytes % lbs !== 0) {
    return `the device size must be a positive multiple of the logical block size ${lbs}, got ${spec.sizeBytes}`;
  }
  // SET_PARAMS refuses max_sectors below a page (and ADD_DEV rounds the buffer down to pages).
  const min = Math.max(MIN_IO_BYTES, PAGE_SIZE);
  if (!isPowerOfTwo(maxIoBytes) || maxIoBytes < min || maxIoBytes > MAX_IO_BYTES) {
    return `the largest request must be a power of two from ${min} to ${MAX_IO_BYTES} bytes, got ${maxIoBytes}`;
  }
  return undefined;
}

/** Parameters for SET_PARAMS from a target's device spec; throws a RangeError naming what is wrong (see specProblem). */
export function paramsFor(spec: DeviceSpec, maxIoBytes: number): DevParams {
  const problem = specProblem(spec, maxIoBytes);
  if (problem) throw new RangeError(problem);
  const lbs = spec.logicalBlockSize ?? SECTOR_SIZE;
  const pbs = spec.physicalBlockSize ?? lbs;
  const attrs = (spec.readOnly ? UBLK_ATTR_READ_ONLY : 0) | (spec.rotational ? UBLK_ATTR_ROTATIONAL : 0)
    | (spec.volatileCache ? UBLK_ATTR_VOLATILE_CACHE : 0) | (spec.fua ? UBLK_ATTR_FUA : 0);
  const p: DevParams = {
    types: UBLK_PARAM_TYPE_BASIC,
    basic: {
      attrs,
      logicalBsShift: Math.log2(lbs),
      physicalBsShift: Math.log2(pbs),
      ioOptShift: Math.log2(pbs),
      ioMinShift: Math.log2(pbs),
      maxSectors: maxIoBytes >>> SECTOR_SHIFT,
      chunkSectors: 0,
      devSectors: spec.sizeBytes / SECTOR_SIZE, // always 512-byte units, even on 4Kn devices
      virtBoundaryMask: 0,
    },
  };
  if (spec.discard) {
    p.types |= UBLK_PARAM_TYPE_DISCARD;
    // Kernels before 6.11 truncate these u32 sector counts silently if they overflow.
    const cap = (bytes: number) => Math.min(Math.floor(bytes / SECTOR_SIZE), 0xffffffff >>> SECTOR_SHIFT);
    p.discard = {
      discardAlignment: 0,
      discardGranularity: spec.discard.granularity,
      maxDiscardSectors: cap(spec.discard.maxBytes),
      maxWriteZeroesSectors: cap(spec.discard.maxWriteZeroesBytes),
      maxDiscardSegments: 1,
    };
  }
  return p;
}
