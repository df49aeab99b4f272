/**
 * The ublk control device, `/dev/ublk-control`: adds, starts, stops and deletes devices.
 *
 * Every control command is an IORING_OP_URING_CMD on an SQE128 ring (the 32-byte
 * `struct ublksrv_ctrl_cmd` does not fit the 16-byte command area of a normal SQE), with the
 * ioctl-encoded opcode (`UBLK_U_CMD_*`, Linux 6.4+ encodes them; older numbers are legacy and
 * may be compiled out). Payloads the kernel reads or writes (dev_info, params, the features word,
 * the affinity mask) live in one page we mmapped, and each command completes before the next is
 * written, so that page is never reused while the kernel can still touch it.
 *
 * The class is synchronous: a command blocks the calling thread in io_uring_enter. That is what
 * the kernel's rules want anyway: START_DEV must come from a thread that is not one of the
 * queues (it waits until every tag has a FETCH outstanding), and the queues live in workers.
 * libublk-rs's `UblkCtrl` and ublksrv's `ublksrv_ctrl_*` are the references.
 */
import { existsSync, readdirSync } from 'node:fs';
import { IoUring, Mapping, SysError, abi as uabi, prepUringCmd, setUserData, sys, errnoName } from '../uring/index.js';
import {
  ublksrv_ctrl_cmd, ublksrv_ctrl_dev_info, ublk_params, ublk_param_basic, ublk_param_discard,
  ublk_param_devt, UBLK_FEATURES, UBLK_U_CMD_ADD_DEV, UBLK_U_CMD_DEL_DEV, UBLK_U_CMD_DEL_DEV_ASYNC,
  UBLK_U_CMD_START_DEV, UBLK_U_CMD_STOP_DEV, UBLK_U_CMD_SET_PARAMS, UBLK_U_CMD_GET_PARAMS,
  UBLK_U_CMD_GET_DEV_INFO, UBLK_U_CMD_GET_DEV_INFO2, UBLK_U_CMD_GET_QUEUE_AFFINITY,
  UBLK_U_CMD_GET_FEATURES, UBLK_U_CMD_START_USER_RECOVERY, UBLK_U_CMD_END_USER_RECOVERY,
  UBLK_U_CMD_UPDATE_SIZE, UBLK_U_CMD_QUIESCE_DEV, UBLK_U_CMD_TRY_STOP_DEV, UBLK_PARAM_TYPE_BASIC,
  UBLK_PARAM_TYPE_DISCARD, UBLK_PARAM_TYPE_DEVT, UBLK_F_UPDATE_SIZE, UBLK_F_QUIESCE,
  UBLK_F_SAFE_STOP_DEV, UBLK_F_CMD_IOCTL_ENCODE,
} from './abi.js';

export const CONTROL_PATH = '/dev/ublk-control';

/** What ADD_DEV takes and GET_DEV_INFO returns (`struct ublksrv_ctrl_dev_info`). */
export interface DevInfo {
  devId: number;
  nrHwQueues: number;
  queueDepth: number;
  state: number;
  maxIoBufBytes: number;
  ublksrvPid: number;
  /** UBLK_F_* (as negotiated: the kernel drops bits it does not know). */
  flags: number;
  /** Stored by the kernel for the server; we keep the target type's id here. */
  ublksrvFlags: number;
  ownerUid: number;
  ownerGid: number;
}

/** The parameter blocks we set (`struct ublk_params`); sizes in bytes, sectors are 512 B. */
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

/** A control command failed; `command` is its name (ADD_DEV), `code` the errno name. */
export class UblkError extends Error {
  constructor(message: string, readonly command?: string, readonly code?: string) {
    super(message);
    this.name = 'UblkError';
  }
}

/** The kernel version that added a UBLK_F_* flag, for "kernel too old" messages. */
export function featureSince(flag: number): string {
  const f = UBLK_FEATURES.find((x) => 2 ** x.bit === flag);
  return f ? `${f.name} (Linux ${f.since})` : `flag 0x${flag.toString(16)}`;
}

const hex = (n: number) => `0x${n.toString(16)}`;

export class UblkControl {
  readonly fd: number;
  private readonly ring: IoUring;
  /** One page for command payloads: dev_info, params, features, cpu masks. */
  private readonly buf: Mapping;
  private featuresCache: number | undefined;

  /**
   * Opens /dev/ublk-control. Fails with a message that names the fix: load the module, or run
   * as root (unprivileged devices need UBLK_F_UNPRIVILEGED_DEV and udev rules we do not set up).
   */
  constructor() {
    if (!existsSync(CONTROL_PATH)) {
      throw new UblkError(`${CONTROL_PATH} does not exist: load the driver with \`modprobe ublk_drv\` (kernel option CONFIG_BLK_DEV_UBLK, Linux 6.0+)`);
    }
    try {
      this.fd = sys.open(CONTROL_PATH, uabi.O_RDWR | uabi.O_CLOEXEC);
    } catch (e) {
      if (e instanceof SysError && (e.code === 'EACCES' || e.code === 'EPERM')) {
        throw new UblkError(`cannot open ${CONTROL_PATH} (${e.code}): run as root`);
      }
      throw e;
    }
    try {
      this.ring = new IoUring(4, { flags: uabi.IORING_SETUP_SQE128 });
    } catch (e) {
      sys.close(this.fd);
      if (e instanceof SysError && e.code === 'EINVAL') {
        throw new UblkError(`this kernel's io_uring has no SQE128 (Linux 5.19+), which ublk control commands need: ${e.message}`);
      }
      throw e;
    }
    this.buf = Mapping.anonymous(4096);
  }

  close(): void {
    this.ring.close();
    this.buf.unmap();
    sys.close(this.fd);
  }

  [Symbol.dispose](): void {
    this.close();
  }

  /**
   * Sends one control command and returns the kernel's non-negative result; throws UblkError
   * naming the command, the device and the errno otherwise. `payload` (if any) was written at
   * offset 0 of the payload page; `len` is its size.
   */
  /** Writes and submits one control command; its CQE is then awaited by the caller. */
  private submitCommand(op: number, devId: number, opts: { len?: number; data?: number; queueId?: number; devPathLen?: number }): void {
    const r = this.ring;
    const w = r.mustGetSqe();
    prepUringCmd(r.sqes, w, op, this.fd, r.cmdWords);
    const c = w + 12; // sqe->cmd: struct ublksrv_ctrl_cmd
    const s = r.sqes;
    const W = (off: number) => c + (off >>> 2);
    s[W(ublksrv_ctrl_cmd.dev_id)] = devId;
    s[W(ublksrv_ctrl_cmd.queue_id)] = (opts.queueId ?? 0xffff) | ((opts.len ?? 0) << 16); // queue_id, len
    if (opts.len) {
      s[W(ublksrv_ctrl_cmd.addr)] = this.buf.address >>> 0;
      s[W(ublksrv_ctrl_cmd.addr) + 1] = Math.floor(this.buf.address / 2 ** 32);
    }
    const data = opts.data ?? 0;
    s[W(ublksrv_ctrl_cmd.data)] = data >>> 0;
    s[W(ublksrv_ctrl_cmd.data) + 1] = Math.floor(data / 2 ** 32);
    s[W(ublksrv_ctrl_cmd.dev_path_len)] = opts.devPathLen ?? 0;
    setUserData(r.sqes, w, op);
    r.submit();
  }

  /** Takes the one outstanding command's result, or undefined if it has not completed. */
  private takeResult(name: string, devId: number): number | undefined {
    const c = this.ring.peekCqe();
    if (c < 0) return undefined;
    const res = this.ring.cqeRes(c);
    this.ring.cqAdvance(1);
    if (res < 0) throw this.error(name, devId, -res);
    return res;
  }

  /**
   * Sends one control command and returns the kernel's non-negative result; throws UblkError
   * naming the command, the device and the errno otherwise. `payload` (if any) was written at
   * offset 0 of the payload page; `len` is its size. Blocks this thread until it completes.
   */
  private command(name: string, op: number, devId: number, opts: { len?: number; data?: number; queueId?: number; devPathLen?: number } = {}): number {
    this.submitCommand(op, devId, opts);
    for (;;) {
      this.ring.waitCqe();
      const res = this.takeResult(name, devId);
      if (res !== undefined) return res;
    }
  }

  /**
   * Like {@link command} but without blocking the event loop: START_DEV, STOP_DEV and DEL_DEV
   * wait for I/O (START_DEV's partition scan, STOP_DEV's drain), and a target that serves I/O on
   * this thread's event loop must keep running meanwhile or the two wait for each other. Polls
   * the CQ every few milliseconds; control commands are rare, so that costs nothing that matters.
   */
  private async commandAsync(name: string, op: number, devId: number, opts: { len?: number; data?: number } = {}): Promise<number> {
    if (this.busy) throw new UblkError(`${name}: another control command of this process is still running`);
    this.busy = true;
    try {
      this.submitCommand(op, devId, opts);
      for (let delay = 1; ; delay = Math.min(delay * 2, 20)) {
        // An enter without waiting runs the task work that posts the CQE, if it is pending.
        this.ring.getEvents(0);
        const res = this.takeResult(name, devId);
        if (res !== undefined) return res;
        await new Promise((r) => setTimeout(r, delay));
      }
    } finally {
      this.busy = false;
    }
  }
  private busy = false;

  private error(name: string, devId: number, errno: number): UblkError {
    const code = errnoName(errno);
    const dev = devId === 0xffffffff ? '' : ` for device ${devId}`;
    let why = '';
    if (code === 'EPERM' || code === 'EACCES') why = ': run as root';
    else if (code === 'EEXIST') why = ': that device id is taken (ublk list shows the devices)';
    else if (code === 'ENODEV' || code === 'ENOENT') why = ': no such device';
    else if (code === 'EOPNOTSUPP' || (code === 'EINVAL' && name !== 'SET_PARAMS' && name !== 'ADD_DEV')) {
      why = ': this kernel does not know the command (too old?)';
    } else if (code === 'EBUSY') why = ': the device is in use';
    return new UblkError(`${name}${dev} failed with ${code}${why}`, name, code);
  }

  /**
   * GET_FEATURES (6.5+): the UBLK_F_* bits this kernel supports. Older kernels lack the command;
   * they are reported as what 6.0-6.4 always had, so callers can still name missing features.
   */
  features(): number {
    if (this.featuresCache !== undefined) return this.featuresCache;
    try {
      this.command('GET_FEATURES', UBLK_U_CMD_GET_FEATURES, 0xffffffff, { len: 8 });
      this.featuresCache = Number(this.buf.view.getBigUint64(0, true));
    } catch (e) {
      if (!(e instanceof UblkError) || (e.code !== 'EINVAL' && e.code !== 'EOPNOTSUPP')) throw e;
      this.featuresCache = 0x7f & ~1; // bits 1..6: the flags of the kernels before GET_FEATURES
    }
    return this.featuresCache;
  }

  /** Throws if the kernel lacks `flag`, naming the flag and the kernel that added it. */
  requireFeature(flag: number, forWhat: string): void {
    if (!(this.features() & flag)) {
      throw new UblkError(`${forWhat} needs ${featureSince(flag)}, which this kernel (features ${hex(this.features())}) does not have`);
    }
  }

  private writeDevInfo(info: Partial<DevInfo>): void {
    const v = this.buf.view;
    this.buf.u8.fill(0, 0, ublksrv_ctrl_dev_info.SIZE);
    v.setUint16(ublksrv_ctrl_dev_info.nr_hw_queues, info.nrHwQueues ?? 1, true);
    v.setUint16(ublksrv_ctrl_dev_info.queue_depth, info.queueDepth ?? 128, true);
    v.setUint32(ublksrv_ctrl_dev_info.max_io_buf_bytes, info.maxIoBufBytes ?? 512 * 1024, true);
    v.setUint32(ublksrv_ctrl_dev_info.dev_id, info.devId ?? 0xffffffff, true);
    v.setInt32(ublksrv_ctrl_dev_info.ublksrv_pid, info.ublksrvPid ?? process.pid, true);
    v.setBigUint64(ublksrv_ctrl_dev_info.flags, BigInt(info.flags ?? 0), true);
    v.setBigUint64(ublksrv_ctrl_dev_info.ublksrv_flags, BigInt(info.ublksrvFlags ?? 0), true);
  }

  private readDevInfo(base = 0): DevInfo {
    const v = this.buf.view;
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
   * ADD_DEV: creates `/dev/ublkcN` (not yet the disk). `devId` -1 lets the kernel pick. Flags
   * the kernel does not support are refused here, by name, rather than silently dropped as
   * the kernel would; the returned info carries the negotiated flags.
   */
  addDev(info: Partial<DevInfo>): DevInfo {
    const want = info.flags ?? 0;
    const unsupported = want & ~this.features() & ~1; // bit 0 (ZERO_COPY) is checked by the caller
    for (let bit = 0; bit < 53; bit++) {
      if (unsupported & 2 ** bit) this.requireFeature(2 ** bit, 'this device');
    }
    this.writeDevInfo({ ...info, flags: want | UBLK_F_CMD_IOCTL_ENCODE });
    this.command('ADD_DEV', UBLK_U_CMD_ADD_DEV, info.devId ?? 0xffffffff, { len: ublksrv_ctrl_dev_info.SIZE });
    return this.readDevInfo();
  }

  /** GET_DEV_INFO. */
  devInfo(devId: number): DevInfo {
    this.command('GET_DEV_INFO', UBLK_U_CMD_GET_DEV_INFO, devId, { len: ublksrv_ctrl_dev_info.SIZE });
    return this.readDevInfo();
  }

  /**
   * GET_DEV_INFO2 (6.3+): like GET_DEV_INFO but the kernel also checks the caller may access
   * `/dev/ublkcN`, whose path we pass in front of the info (needed for unprivileged devices).
   */
  devInfo2(devId: number): DevInfo {
    const path = Buffer.from(`/dev/ublkc${devId}`);
    // One buffer of len bytes: the path first, then the dev_info the kernel fills in after it.
    const total = path.length + ublksrv_ctrl_dev_info.SIZE;
    this.buf.u8.fill(0, 0, total);
    this.buf.u8.set(path, 0);
    this.command('GET_DEV_INFO2', UBLK_U_CMD_GET_DEV_INFO2, devId, { len: total, devPathLen: path.length });
    return this.readDevInfo(path.length);
  }

  /** SET_PARAMS: only while the device is not live. */
  setParams(devId: number, p: DevParams): void {
    const v = this.buf.view;
    this.buf.u8.fill(0, 0, ublk_params.SIZE);
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
    this.command('SET_PARAMS', UBLK_U_CMD_SET_PARAMS, devId, { len: ublk_params.SIZE });
  }

  /** GET_PARAMS: what the kernel actually keeps (it masks types it does not know). */
  params(devId: number): DevParams {
    this.buf.u8.fill(0, 0, ublk_params.SIZE);
    this.buf.view.setUint32(ublk_params.len, ublk_params.SIZE, true);
    this.command('GET_PARAMS', UBLK_U_CMD_GET_PARAMS, devId, { len: ublk_params.SIZE });
    const v = this.buf.view;
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

  /**
   * START_DEV: creates `/dev/ublkbN`. The kernel waits until every queue has a FETCH_REQ
   * outstanding for every tag, so call it only after the queues said they fetched, and never
   * from a queue's own thread. `pid` must be this process (6.17+ checks it is the opener's tgid).
   */
  startDev(devId: number, pid = process.pid): void {
    this.command('START_DEV', UBLK_U_CMD_START_DEV, devId, { data: pid });
  }

  /** {@link startDev} that keeps the event loop running while the kernel waits for I/O. */
  async startDevAsync(devId: number, pid = process.pid): Promise<void> {
    await this.commandAsync('START_DEV', UBLK_U_CMD_START_DEV, devId, { data: pid });
  }

  /** {@link stopDev} that keeps the event loop running while the kernel drains I/O. */
  async stopDevAsync(devId: number): Promise<void> {
    await this.commandAsync('STOP_DEV', UBLK_U_CMD_STOP_DEV, devId);
  }

  /** {@link delDev} that keeps the event loop running until the last reference is gone. */
  async delDevAsync(devId: number): Promise<void> {
    await this.commandAsync('DEL_DEV', UBLK_U_CMD_DEL_DEV, devId);
  }

  /** STOP_DEV: removes the disk; in-flight and later fetches complete with UBLK_IO_RES_ABORT. */
  stopDev(devId: number): void {
    this.command('STOP_DEV', UBLK_U_CMD_STOP_DEV, devId);
  }

  /** TRY_STOP_DEV (7.0, UBLK_F_SAFE_STOP_DEV): STOP_DEV that fails with EBUSY while the disk is open. */
  tryStopDev(devId: number): void {
    this.requireFeature(UBLK_F_SAFE_STOP_DEV, 'TRY_STOP_DEV');
    this.command('TRY_STOP_DEV', UBLK_U_CMD_TRY_STOP_DEV, devId);
  }

  /**
   * DEL_DEV: removes the device for good. It waits until every reference to `/dev/ublkcN` is
   * gone (open fds, mmaps, registered files), so the queues must have exited first; `async`
   * uses DEL_DEV_ASYNC (6.9+), which returns at once.
   */
  delDev(devId: number, async = false): void {
    if (async) this.command('DEL_DEV_ASYNC', UBLK_U_CMD_DEL_DEV_ASYNC, devId);
    else this.command('DEL_DEV', UBLK_U_CMD_DEL_DEV, devId);
  }

  /** GET_QUEUE_AFFINITY: the CPUs the kernel maps to queue `qid`. */
  queueAffinity(devId: number, qid: number): number[] {
    this.buf.u8.fill(0, 0, 1024);
    this.command('GET_QUEUE_AFFINITY', UBLK_U_CMD_GET_QUEUE_AFFINITY, devId, { len: 1024, data: qid });
    const cpus: number[] = [];
    for (let i = 0; i < 1024 * 8; i++) if (this.buf.u8[i >> 3]! & (1 << (i & 7))) cpus.push(i);
    return cpus;
  }

  /** START_USER_RECOVERY (6.1, needs UBLK_F_USER_RECOVERY on the device). */
  startUserRecovery(devId: number): void {
    this.command('START_USER_RECOVERY', UBLK_U_CMD_START_USER_RECOVERY, devId);
  }

  /** END_USER_RECOVERY: the new server `pid` has fetched every tag again. */
  endUserRecovery(devId: number, pid = process.pid): void {
    this.command('END_USER_RECOVERY', UBLK_U_CMD_END_USER_RECOVERY, devId, { data: pid });
  }

  /** UPDATE_SIZE (6.16, UBLK_F_UPDATE_SIZE): resizes a live device to `sectors` (512 B). */
  updateSize(devId: number, sectors: number): void {
    this.requireFeature(UBLK_F_UPDATE_SIZE, 'UPDATE_SIZE');
    this.command('UPDATE_SIZE', UBLK_U_CMD_UPDATE_SIZE, devId, { data: sectors });
  }

  /** QUIESCE_DEV (6.16, UBLK_F_QUIESCE): waits up to `timeoutMs` for in-flight I/O to drain. */
  quiesceDev(devId: number, timeoutMs: number): void {
    this.requireFeature(UBLK_F_QUIESCE, 'QUIESCE_DEV');
    this.command('QUIESCE_DEV', UBLK_U_CMD_QUIESCE_DEV, devId, { data: timeoutMs });
  }

  /** The ids of every ublk device on this machine (from /dev/ublkcN), sorted. */
  static listIds(): number[] {
    try {
      return readdirSync('/dev').filter((n) => /^ublkc\d+$/.test(n)).map((n) => Number(n.slice(5))).sort((a, b) => a - b);
    } catch {
      return [];
    }
  }
}

/** UBLK_S_DEV_* as a word. */
export function stateName(state: number): string {
  return ['DEAD', 'LIVE', 'QUIESCED', 'FAIL_IO'][state] ?? `UNKNOWN(${state})`;
}
