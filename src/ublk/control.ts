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
 * Unprivileged devices (UBLK_F_UNPRIVILEGED_DEV, 6.3): every command but ADD_DEV and
 * GET_FEATURES must carry the path of the device's `/dev/ublkcN` in front of its payload
 * (`dev_path_len` bytes at `addr`; the kernel checks the caller's access to that inode and
 * strips the prefix), root's commands included. So payloads start 128 bytes into the page,
 * leaving room for the path right before them, and each device's kind is learnt once with
 * GET_DEV_INFO2, the one command that always takes the path.
 *
 * The class is synchronous: a command blocks the calling thread in io_uring_enter. That is what
 * the kernel's rules want anyway: START_DEV must come from a thread that is not one of the
 * queues (it waits until every tag has a FETCH outstanding), and the queues live in workers.
 * libublk-rs's `UblkCtrl` and ublksrv's `ublksrv_ctrl_*` are the references.
 */
import type { RingTracer } from '../uring/trace.js';
import { existsSync, readdirSync } from 'node:fs';
import { IoUring, setUserData, abi as uringAbi } from '../uring/index.js';
import { Mapping, SysError, errnoName, sys, libc } from '../libc/index.js';
import {
  ublksrv_ctrl_dev_info, ublk_params, UBLK_FEATURES, UBLK_U_CMD_ADD_DEV, UBLK_U_CMD_DEL_DEV,
  UBLK_U_CMD_DEL_DEV_ASYNC, UBLK_U_CMD_START_DEV, UBLK_U_CMD_STOP_DEV, UBLK_U_CMD_SET_PARAMS,
  UBLK_U_CMD_GET_PARAMS, UBLK_U_CMD_GET_DEV_INFO, UBLK_U_CMD_GET_DEV_INFO2,
  UBLK_U_CMD_GET_QUEUE_AFFINITY, UBLK_U_CMD_GET_FEATURES, UBLK_U_CMD_START_USER_RECOVERY,
  UBLK_U_CMD_END_USER_RECOVERY, UBLK_U_CMD_UPDATE_SIZE, UBLK_U_CMD_QUIESCE_DEV,
  UBLK_U_CMD_TRY_STOP_DEV, UBLK_U_CMD_REG_BUF, UBLK_U_CMD_UNREG_BUF, ublk_shmem_buf_reg, UBLK_F_SHMEM_ZC,
  UBLK_F_UPDATE_SIZE, UBLK_F_QUIESCE, UBLK_F_SAFE_STOP_DEV,
  UBLK_F_CMD_IOCTL_ENCODE, UBLK_F_UNPRIVILEGED_DEV, UBLK_S_DEV_DEAD, UBLK_S_DEV_LIVE, UBLK_S_DEV_QUIESCED, UBLK_S_DEV_FAIL_IO,
} from './abi.js';
import { ANY_DEV_ID, prepCtrlCmd, type CtrlCmd } from './wire.js';
import {
  readDevInfo, writeDevInfo, writeParams, readParams, prepareParamsRead, type DevInfo, type DevParams,
} from './params.js';

export type { DevInfo, DevParams } from './params.js';

export const CONTROL_PATH = '/dev/ublk-control';

/** Room for a device path in front of a payload (the longest, `/dev/ublkc1048575`, is 17 bytes). */
const PATH_ROOM = 128;
/** Commands that never carry the path: no device yet, none at all, or one that places it itself. */
const NO_PATH = new Set(['ADD_DEV', 'GET_FEATURES', 'GET_DEV_INFO2']);

/** The char device of ublk device `devId`. */
export const charDevPath = (devId: number) => `/dev/ublkc${devId}`;

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
  /** One page: a device path (and GET_DEV_INFO2's answer) below PATH_ROOM, payloads from it. */
  private readonly page: Mapping;
  /** The payload area: dev_info, params, features, cpu masks. */
  private readonly buf: Mapping;
  /** Whether each device id seen is unprivileged (its commands carry the path). */
  private readonly unprivileged = new Map<number, boolean>();
  private featuresCache: number | undefined;
  /** An async command is waiting for its CQE (one command at a time per control ring). */
  private busy = false;

  /** Traces the control ring's SQEs and CQEs (src/uring/trace.ts), or stops with null. */
  setTracer(tracer: RingTracer | null): void {
    this.ring.tracer = tracer;
  }

  /**
   * Opens /dev/ublk-control. Fails with a message that names the fix: load the module, or run
   * as root (unprivileged devices need UBLK_F_UNPRIVILEGED_DEV and udev rules we do not set up).
   */
  constructor() {
    if (!existsSync(CONTROL_PATH)) {
      throw new UblkError(`${CONTROL_PATH} does not exist: load the driver with \`modprobe ublk_drv\` (kernel option CONFIG_BLK_DEV_UBLK, Linux 6.0+)`);
    }
    try {
      this.fd = sys.open(CONTROL_PATH, libc.O_RDWR | libc.O_CLOEXEC);
    } catch (e) {
      if (e instanceof SysError && (e.code === 'EACCES' || e.code === 'EPERM')) {
        throw new UblkError(`cannot open ${CONTROL_PATH} (${e.code}): run as root (or, for unprivileged devices, let users open it: \`ublk setup-unprivileged\` as root)`);
      }
      throw e;
    }
    try {
      this.ring = new IoUring(4, { flags: uringAbi.IORING_SETUP_SQE128 });
    } catch (e) {
      sys.close(this.fd);
      if (e instanceof SysError && e.code === 'EINVAL') {
        throw new UblkError(`this kernel's io_uring has no SQE128 (Linux 5.19+), which ublk control commands need: ${e.message}`);
      }
      throw e;
    }
    this.page = Mapping.anonymous(4096);
    this.buf = this.page.slice(PATH_ROOM);
  }

  /**
   * Closes the control ring and the device. Never while an async command is pending: its CQE
   * would be lost and its payload page unmapped under the kernel.
   */
  close(): void {
    if (this.busy) throw new UblkError('a control command is still running: await it before close()');
    this.ring.close();
    this.page.unmap();
    sys.close(this.fd);
  }

  [Symbol.dispose](): void {
    this.close();
  }

  /**
   * Writes and submits one control command; its CQE is then awaited by the caller. The payload
   * (if `cmd.len`) is at the start of `buf`, or at `addr` if given. A command on an unprivileged
   * device gets its char-dev path in front of the payload.
   */
  private submitCommand(name: string, op: number, cmd: CtrlCmd & { addr?: number }): void {
    let addr = cmd.addr ?? (cmd.len ? this.buf.address : 0);
    let len = cmd.len ?? 0;
    let devPathLen = cmd.devPathLen ?? 0;
    if (!NO_PATH.has(name) && cmd.devId !== ANY_DEV_ID && this.isUnprivileged(cmd.devId, name)) {
      const path = Buffer.from(charDevPath(cmd.devId));
      this.page.u8.set(path, PATH_ROOM - path.length);
      addr = this.page.address + PATH_ROOM - path.length;
      len += path.length;
      devPathLen = path.length;
    }
    const r = this.ring;
    const w = r.mustGetSqe();
    prepCtrlCmd(r.sqes, w, r.cmdWords, op, this.fd, { ...cmd, addr, len, devPathLen });
    setUserData(r.sqes, w, op);
    r.submit();
  }

  /**
   * Whether device `devId` is unprivileged (learnt once, by GET_DEV_INFO2; kernels before 6.3
   * have none). A failure is reported as the failure of `name`, the command the caller asked for.
   */
  private isUnprivileged(devId: number, name = 'GET_DEV_INFO2'): boolean {
    let u = this.unprivileged.get(devId);
    if (u === undefined) {
      try {
        u = (this.devInfo2(devId).flags & UBLK_F_UNPRIVILEGED_DEV) !== 0;
      } catch (e) {
        if (!(e instanceof UblkError)) throw e;
        if (e.code === 'EINVAL') u = false; // no GET_DEV_INFO2 (before 6.3)
        else {
          const errno = (libc as unknown as Record<string, number>)[e.code ?? ''];
          throw errno ? this.error(name, devId, errno) : e;
        }
      }
      this.unprivileged.set(devId, u);
    }
    return u;
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
   * naming the command, the device and the errno otherwise. The payload (if `cmd.len`) was
   * written at offset 0 of the payload page. Blocks this thread until the command completes.
   */
  private command(name: string, op: number, cmd: CtrlCmd & { addr?: number }): number {
    this.submitCommand(name, op, cmd);
    for (;;) {
      this.ring.waitCqe();
      const res = this.takeResult(name, cmd.devId);
      if (res !== undefined) return res;
    }
  }

  /**
   * Like {@link command} but without blocking the event loop: START_DEV, STOP_DEV and DEL_DEV
   * wait for I/O (START_DEV's partition scan, STOP_DEV's drain), and a target that serves I/O on
   * this thread's event loop must keep running meanwhile or the two wait for each other. Polls
   * the CQ every few milliseconds; control commands are rare, so that costs nothing that matters.
   */
  private async commandAsync(name: string, op: number, cmd: CtrlCmd): Promise<number> {
    if (this.busy) throw new UblkError(`${name}: another control command of this process is still running`);
    this.busy = true;
    try {
      this.submitCommand(name, op, cmd);
      for (let delay = 1; ; delay = Math.min(delay * 2, 20)) {
        // An enter without waiting runs the task work that posts the CQE, if it is pending.
        this.ring.getEvents(0);
        const res = this.takeResult(name, cmd.devId);
        if (res !== undefined) return res;
        await new Promise((r) => setTimeout(r, delay));
      }
    } finally {
      this.busy = false;
    }
  }

  private error(name: string, devId: number, errno: number): UblkError {
    const code = errnoName(errno);
    const dev = devId === ANY_DEV_ID ? '' : ` for device ${devId}`;
    let why = '';
    const root = (process.geteuid?.() ?? 0) === 0;
    if ((errno === libc.EPERM || errno === libc.EACCES) && !root && devId !== ANY_DEV_ID) why = ': it is another user\'s device, or a privileged one';
    else if (errno === libc.EPERM || errno === libc.EACCES) why = root ? '' : ': run as root, or add an unprivileged device (--unprivileged)';
    else if (errno === libc.EEXIST) why = ': that device id is taken (ublk list shows the devices)';
    else if (errno === libc.ENODEV || errno === libc.ENOENT) why = ': no such device';
    else if (errno === libc.EOPNOTSUPP || (errno === libc.EINVAL && name !== 'SET_PARAMS' && name !== 'ADD_DEV')) {
      why = ': this kernel does not know the command (too old?)';
    } else if (errno === libc.EBUSY) why = ': the device is in use';
    return new UblkError(`${name}${dev} failed with ${code}${why}`, name, code);
  }

  /**
   * GET_FEATURES (6.5+): the UBLK_F_* bits this kernel supports. Older kernels lack the command;
   * they are reported as what 6.0-6.4 always had, so callers can still name missing features.
   */
  features(): number {
    if (this.featuresCache !== undefined) return this.featuresCache;
    try {
      this.command('GET_FEATURES', UBLK_U_CMD_GET_FEATURES, { devId: ANY_DEV_ID, len: 8 });
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

  /**
   * ADD_DEV: creates `/dev/ublkcN` (not yet the disk). `devId` undefined lets the kernel pick.
   * Flags the kernel does not support are refused here, by name, rather than silently dropped
   * as the kernel would; the returned info carries the negotiated flags. `opts.asIs` sends the
   * flags unchecked, for the conformance rules that ask what the kernel itself does with them.
   */
  addDev(info: Partial<DevInfo>, opts: { asIs?: boolean } = {}): DevInfo {
    const want = info.flags ?? 0;
    const unsupported = opts.asIs ? 0 : want & ~this.features() & ~1; // bit 0 (ZERO_COPY) is checked by the caller
    for (let bit = 0; bit < 53; bit++) {
      if (unsupported & 2 ** bit) this.requireFeature(2 ** bit, 'this device');
    }
    writeDevInfo(this.buf.view, 0, { ...info, flags: want | UBLK_F_CMD_IOCTL_ENCODE });
    this.command('ADD_DEV', UBLK_U_CMD_ADD_DEV, { devId: info.devId ?? ANY_DEV_ID, len: ublksrv_ctrl_dev_info.SIZE });
    const added = readDevInfo(this.buf.view, 0);
    this.unprivileged.set(added.devId, (added.flags & UBLK_F_UNPRIVILEGED_DEV) !== 0);
    return added;
  }

  /** GET_DEV_INFO. */
  devInfo(devId: number): DevInfo {
    this.command('GET_DEV_INFO', UBLK_U_CMD_GET_DEV_INFO, { devId, len: ublksrv_ctrl_dev_info.SIZE });
    return readDevInfo(this.buf.view, 0);
  }

  /**
   * GET_DEV_INFO2 (6.3+): like GET_DEV_INFO but the kernel also checks the caller may access
   * `/dev/ublkcN`, whose path we pass in front of the info (needed for unprivileged devices).
   */
  devInfo2(devId: number): DevInfo {
    const path = Buffer.from(charDevPath(devId));
    // One buffer of len bytes: the path first, then the dev_info the kernel fills in after it.
    // Below PATH_ROOM, so that a payload already written for the next command stays intact.
    const total = path.length + ublksrv_ctrl_dev_info.SIZE;
    this.page.u8.fill(0, 0, total);
    this.page.u8.set(path, 0);
    this.command('GET_DEV_INFO2', UBLK_U_CMD_GET_DEV_INFO2, { devId, len: total, devPathLen: path.length, addr: this.page.address });
    return readDevInfo(this.page.view, path.length);
  }

  /** SET_PARAMS: only while the device is not live. */
  setParams(devId: number, p: DevParams): void {
    writeParams(this.buf.view, p);
    this.command('SET_PARAMS', UBLK_U_CMD_SET_PARAMS, { devId, len: ublk_params.SIZE });
  }

  /** GET_PARAMS: what the kernel actually keeps (it masks types it does not know). */
  params(devId: number): DevParams {
    prepareParamsRead(this.buf.view);
    this.command('GET_PARAMS', UBLK_U_CMD_GET_PARAMS, { devId, len: ublk_params.SIZE });
    return readParams(this.buf.view);
  }

  /**
   * START_DEV: creates `/dev/ublkbN`. The kernel waits until every queue has a FETCH_REQ
   * outstanding for every tag, so call it only after the queues said they fetched, and never
   * from a queue's own thread. `pid` must be this process (6.17+ checks it is the opener's tgid).
   */
  startDev(devId: number, pid = process.pid): void {
    this.command('START_DEV', UBLK_U_CMD_START_DEV, { devId, data: pid });
  }

  /** {@link startDev} that keeps the event loop running while the kernel waits for I/O. */
  async startDevAsync(devId: number, pid = process.pid): Promise<void> {
    await this.commandAsync('START_DEV', UBLK_U_CMD_START_DEV, { devId, data: pid });
  }

  /** STOP_DEV: removes the disk; in-flight and later fetches complete with UBLK_IO_RES_ABORT. */
  stopDev(devId: number): void {
    this.command('STOP_DEV', UBLK_U_CMD_STOP_DEV, { devId });
  }

  /** {@link stopDev} that keeps the event loop running while the kernel drains I/O. */
  async stopDevAsync(devId: number): Promise<void> {
    await this.commandAsync('STOP_DEV', UBLK_U_CMD_STOP_DEV, { devId });
  }

  /** TRY_STOP_DEV (7.0, UBLK_F_SAFE_STOP_DEV): STOP_DEV that fails with EBUSY while the disk is open. */
  tryStopDev(devId: number): void {
    this.requireFeature(UBLK_F_SAFE_STOP_DEV, 'TRY_STOP_DEV');
    this.command('TRY_STOP_DEV', UBLK_U_CMD_TRY_STOP_DEV, { devId });
  }

  /**
   * REG_BUF (7.1, UBLK_F_SHMEM_ZC): pins `len` bytes of shared memory at `addr` (page-aligned, a
   * MAP_SHARED mapping of a memfd, tmpfs or hugetlbfs file) and returns the buffer's index. From
   * then on a request whose pages all lie in it, in one piece, reaches the server as
   * UBLK_IO_F_SHMEM_ZC with desc.addr = index << 32 | offset, and no data is copied. Allowed
   * before START_DEV; on a live disk the kernel freezes its queue while it registers.
   */
  regBuf(devId: number, addr: number, len: number, flags = 0): number {
    this.requireFeature(UBLK_F_SHMEM_ZC, 'REG_BUF');
    const v = this.buf.view;
    v.setBigUint64(ublk_shmem_buf_reg.addr, BigInt(addr), true);
    v.setBigUint64(ublk_shmem_buf_reg.len, BigInt(len), true);
    v.setUint32(ublk_shmem_buf_reg.flags, flags, true);
    v.setUint32(ublk_shmem_buf_reg.reserved, 0, true);
    return this.command('REG_BUF', UBLK_U_CMD_REG_BUF, { devId, len: ublk_shmem_buf_reg.SIZE });
  }

  /** UNREG_BUF (7.1): drops shared buffer `index` (its pages are unpinned). */
  unregBuf(devId: number, index: number): void {
    this.requireFeature(UBLK_F_SHMEM_ZC, 'UNREG_BUF');
    this.command('UNREG_BUF', UBLK_U_CMD_UNREG_BUF, { devId, data: index });
  }

  /**
   * DEL_DEV: removes the device for good. It waits until every reference to `/dev/ublkcN` is
   * gone (open fds, mmaps, registered files), so the queues must have exited first; `async`
   * uses DEL_DEV_ASYNC (6.9+), which returns at once.
   */
  delDev(devId: number, async = false): void {
    // DEL_DEV_ASYNC is missing from the kernel's permission switch for unprivileged devices.
    if (async && !this.isUnprivileged(devId)) this.command('DEL_DEV_ASYNC', UBLK_U_CMD_DEL_DEV_ASYNC, { devId });
    else this.command('DEL_DEV', UBLK_U_CMD_DEL_DEV, { devId });
    this.unprivileged.delete(devId);
  }

  /** {@link delDev} that keeps the event loop running until the last reference is gone. */
  async delDevAsync(devId: number): Promise<void> {
    await this.commandAsync('DEL_DEV', UBLK_U_CMD_DEL_DEV, { devId });
  }

  /** GET_QUEUE_AFFINITY: the CPUs the kernel maps to queue `qid`. */
  queueAffinity(devId: number, qid: number): number[] {
    this.buf.u8.fill(0, 0, 1024);
    this.command('GET_QUEUE_AFFINITY', UBLK_U_CMD_GET_QUEUE_AFFINITY, { devId, len: 1024, data: qid });
    const cpus: number[] = [];
    for (let i = 0; i < 1024 * 8; i++) if (this.buf.u8[i >> 3]! & (1 << (i & 7))) cpus.push(i);
    return cpus;
  }

  /** START_USER_RECOVERY (6.1, needs UBLK_F_USER_RECOVERY on the device). */
  startUserRecovery(devId: number): void {
    this.command('START_USER_RECOVERY', UBLK_U_CMD_START_USER_RECOVERY, { devId });
  }

  /**
   * END_USER_RECOVERY: the new server `pid` serves the device (6.17+ checks it is the tgid of the
   * process that opened /dev/ublkcN). Like START_DEV it waits until every tag is fetched.
   */
  endUserRecovery(devId: number, pid = process.pid): void {
    this.command('END_USER_RECOVERY', UBLK_U_CMD_END_USER_RECOVERY, { devId, data: pid });
  }

  /** {@link endUserRecovery} that keeps the event loop running (requests reissued at once go to async targets). */
  async endUserRecoveryAsync(devId: number, pid = process.pid): Promise<void> {
    await this.commandAsync('END_USER_RECOVERY', UBLK_U_CMD_END_USER_RECOVERY, { devId, data: pid });
  }

  /** UPDATE_SIZE (6.16, UBLK_F_UPDATE_SIZE): resizes a live device to `sectors` (512 B). */
  updateSize(devId: number, sectors: number): void {
    this.requireFeature(UBLK_F_UPDATE_SIZE, 'UPDATE_SIZE');
    this.command('UPDATE_SIZE', UBLK_U_CMD_UPDATE_SIZE, { devId, data: sectors });
  }

  /**
   * QUIESCE_DEV (6.16, UBLK_F_QUIESCE on the device): new I/O is held, and once every queue has
   * an idle tag (waiting up to `timeoutMs`; EBUSY after, and the device stays held) the server's
   * fetches complete with UBLK_IO_RES_ABORT. The state reads LIVE until that server has let go
   * of /dev/ublkcN; then QUIESCED (or FAIL_IO), ready for START_USER_RECOVERY.
   */
  quiesceDev(devId: number, timeoutMs: number): void {
    this.requireFeature(UBLK_F_QUIESCE, 'QUIESCE_DEV');
    this.command('QUIESCE_DEV', UBLK_U_CMD_QUIESCE_DEV, { devId, data: timeoutMs });
  }

  /** {@link quiesceDev} from the device's own server: its event loop must keep serving meanwhile. */
  async quiesceDevAsync(devId: number, timeoutMs: number): Promise<void> {
    this.requireFeature(UBLK_F_QUIESCE, 'QUIESCE_DEV');
    await this.commandAsync('QUIESCE_DEV', UBLK_U_CMD_QUIESCE_DEV, { devId, data: timeoutMs });
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
  switch (state) {
    case UBLK_S_DEV_DEAD: return 'DEAD';
    case UBLK_S_DEV_LIVE: return 'LIVE';
    case UBLK_S_DEV_QUIESCED: return 'QUIESCED';
    case UBLK_S_DEV_FAIL_IO: return 'FAIL_IO';
    default: return `UNKNOWN(${state})`;
  }
}
