/**
 * `ublk add`: checks everything it can before anything exists, then starts a detached server
 * (serve.ts) and waits until it reports the device live, failed, or neither in time.
 *
 * Order, so that a mistake never leaves anything behind: the command line (exit 2), then the
 * machine (the control device, root, a free device id), then the target's own checks (its
 * `prepare`, run once here and released: a missing backing file fails before a server starts),
 * and only then the run directory, the log and the server.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { release } from 'node:os';
import { closeSync, existsSync, rmSync, statSync } from 'node:fs';
import { resolve } from 'node:path';
import { PAGE_SIZE } from '../libc/index.js';
import { fileURLToPath } from 'node:url';
import { UblkControl, UblkError } from '../ublk/control.js';
import {
  UBLK_F_BATCH_IO, UBLK_F_SHMEM_ZC, UBLK_F_NEED_GET_DATA, UBLK_F_NO_AUTO_PART_SCAN, UBLK_F_PER_IO_DAEMON, UBLK_F_QUIESCE, UBLK_F_USER_COPY, UBLK_F_UNPRIVILEGED_DEV, UBLK_F_USER_RECOVERY, UBLK_F_USER_RECOVERY_FAIL_IO, UBLK_F_USER_RECOVERY_REISSUE, UBLK_MAX_QUEUE_DEPTH, UBLK_MAX_NR_QUEUES,
} from '../ublk/abi.js';
import { DATA_PATH_MODES, dataPathOf, dataPathProblem, releaseAtLeast, type DataPathMode } from '../ublk/modes.js';
import { isPowerOfTwo, MAX_IO_BYTES, MIN_IO_BYTES, specProblem } from '../ublk/params.js';
import { DEFAULT_MAX_IO_BYTES, UBLK_MAX_DEV_ID, sharedSizeProblem } from '../ublk/server.js';
import { loadTarget, resolveTargetModule, targetNames } from '../targets/index.js';
import { parseTargetArgs } from '../ublk/async-target.js';
import { parseOptions, UsageError, type OptionSpec } from '../targets/options.js';
import { RunDir } from './run-dir.js';
import { checkName, deviceNamed, saveDevice } from './saved.js';
import { serve, type ServeConfig, type ServeReport } from './serve.js';

export const ADD_OPTIONS: readonly OptionSpec[] = [
  { key: 'type', names: ['-t', '--type'], kind: 'string' },
  { key: 'devId', names: ['-n', '--number'], kind: 'count', min: 0, max: UBLK_MAX_DEV_ID },
  { key: 'queues', names: ['-q', '--queues'], kind: 'count', min: 1, max: UBLK_MAX_NR_QUEUES },
  { key: 'depth', names: ['-d', '--depth'], kind: 'count', min: 1, max: UBLK_MAX_QUEUE_DEPTH },
  { key: 'maxIoBytes', names: ['--max-io-bytes'], kind: 'size' },
  { key: 'foreground', names: ['--foreground'], kind: 'flag' },
  { key: 'startTimeout', names: ['--start-timeout'], kind: 'count', min: 1, max: 86400 },
  // Ours: the low-latency mode (a queue spins up to N µs for the next request before sleeping).
  { key: 'spinUs', names: ['--spin-us'], kind: 'count', min: 0, max: 1_000_000 },
  // Ours: log a request an async target has held this many milliseconds (it is not failed).
  { key: 'requestTimeout', names: ['--request-timeout'], kind: 'count', min: 0, max: 86_400_000 },
  // Ours: declare the device under NAME (`ublk up NAME` makes it again), linked by that name.
  { key: 'save', names: ['--save'], kind: 'string' },
  // UBLK_F_BATCH_IO (7.0): requests come and go many per command (src/ublk/batch.ts). kublk's -b;
  // the largest request size, which some tools spell -b, is --max-io-bytes here.
  { key: 'batch', names: ['-b', '--batch_io'], kind: 'flag' },
  // kublk's spellings, each taking 0 or 1: -r 1 user recovery (I/O waits while no server runs),
  // -i 1 also REISSUE (requests the dead server held are sent to the next one), -e 1 FAIL_IO
  // instead (I/O fails at once while no server runs).
  { key: 'recovery', names: ['-r', '--recovery'], kind: 'count', min: 0, max: 1 },
  { key: 'reissue', names: ['-i', '--recovery_reissue'], kind: 'count', min: 0, max: 1 },
  { key: 'failIo', names: ['-e', '--recovery_fail_io'], kind: 'count', min: 0, max: 1 },
  // Ours: UBLK_F_UNPRIVILEGED_DEV (6.3), a device a non-root user adds and serves.
  { key: 'unprivileged', names: ['--unprivileged'], kind: 'flag' },
  // UBLK_F_NO_AUTO_PART_SCAN (7.0): the kernel does not read the partition table at START_DEV.
  { key: 'noPartScan', names: ['--no_auto_part_scan', '--no-part-scan'], kind: 'flag' },
  // UBLK_F_NEED_GET_DATA (6.0): a WRITE's data is copied to the server only when it asks (modes.ts).
  { key: 'getData', names: ['-g', '--get_data'], kind: 'flag' },
  // UBLK_F_SUPPORT_ZERO_COPY (6.15): request pages become fixed buffers of the queue's ring (modes.ts).
  { key: 'zeroCopy', names: ['-z', '--zero_copy'], kind: 'flag' },
  // UBLK_F_USER_COPY (6.5): the server moves request data with pread/pwrite on /dev/ublkcN (modes.ts).
  { key: 'userCopy', names: ['-u', '--user_copy'], kind: 'flag' },
  // UBLK_F_AUTO_BUF_REG (6.16): the kernel registers them itself; with _fallback, what it could not
  // register the queue registers (which needs zero copy too, as in kublk).
  { key: 'autoZc', names: ['--auto_zc'], kind: 'flag' },
  { key: 'autoZcFallback', names: ['--auto_zc_fallback'], kind: 'flag' },
  // kublk's per-I/O threads (UBLK_F_PER_IO_DAEMON, 6.16): --nthreads N threads in all, which may
  // differ from -q only with --per_io_tasks; here each queue's tags are split among N / Q threads.
  { key: 'nthreads', names: ['--nthreads'], kind: 'count', min: 1, max: UBLK_MAX_QUEUE_DEPTH },
  { key: 'perIoTasks', names: ['--per_io_tasks'], kind: 'flag' },
  // UBLK_F_SHMEM_ZC (7.1): --htlb FILE (a hugetlbfs or tmpfs file, as in kublk) is mapped shared and
  // registered; a client's O_DIRECT I/O from its own mapping of the file is served in place.
  { key: 'shmemZc', names: ['--shmem_zc'], kind: 'flag' },
  // Every SQE and CQE of the server's rings, decoded, in its log (src/ublk/trace.ts).
  { key: 'trace', names: ['--trace'], kind: 'flag' },
  { key: 'htlb', names: ['--htlb'], kind: 'string' },
];

export async function add(argv: string[]): Promise<number> {
  // 1. The command line: exit 2 for any mistake, before touching the machine.
  const { values, rest } = parseOptions('add', argv, ADD_OPTIONS, { passUnknown: true });
  const type = values.type as string | undefined;
  if (!type) throw new UsageError(`add needs -t TYPE (targets: ${targetNames.join(', ')}, or a module path)`);
  const t = await loadTarget(type);
  if (!t) throw new UsageError(`unknown target '${type}' (targets: ${targetNames.join(', ')}, a module path, or an installed package)`);
  let targetOptions: unknown;
  try {
    targetOptions = parseTargetArgs(t.def, rest);
  } catch (e) {
    if (e instanceof UsageError) throw e;
    throw new UsageError(`${type}: ${(e as Error).message} (\`ublk help -t ${type}\` shows its options)`);
  }
  const cfg: ServeConfig & { flags: number } = {
    // A module is saved by absolute path: the server, recover and del may run elsewhere.
    target: resolveTargetModule(type) ?? type,
    targetOptions,
    requestTimeoutMs: values.requestTimeout as number | undefined,
    trace: values.trace === true ? true : undefined,
    devId: values.devId as number | undefined,
    queues: (values.queues as number | undefined) ?? 1,
    depth: (values.depth as number | undefined) ?? 128,
    maxIoBytes: values.maxIoBytes as number | undefined,
    spinUs: values.spinUs as number | undefined,
    flags: recoveryFlags(values) | (values.noPartScan ? UBLK_F_NO_AUTO_PART_SCAN : 0) | (values.unprivileged ? UBLK_F_UNPRIVILEGED_DEV : 0)
      | (values.getData ? UBLK_F_NEED_GET_DATA : 0) | (values.userCopy ? UBLK_F_USER_COPY : 0)
      | (values.zeroCopy ? modeNamed('zero_copy').flags : 0) | (values.autoZc ? modeNamed('auto_zc').flags : 0)
      | (values.autoZcFallback ? modeNamed('auto_zc').flags | modeNamed('zero_copy').flags : 0)
      | (values.batch ? UBLK_F_BATCH_IO : 0) | (values.shmemZc ? UBLK_F_SHMEM_ZC : 0),
    autoZcFallback: values.autoZcFallback === true ? true : undefined,
    threadsPerQueue: threadsPerQueue(values),
    sharedFiles: sharedFiles(values),
    name: values.save === undefined ? undefined : checkName(values.save as string),
  };
  const m = cfg.maxIoBytes;
  if (m !== undefined && (!isPowerOfTwo(m) || m < MIN_IO_BYTES || m > MAX_IO_BYTES)) {
    throw new UsageError(`--max-io-bytes must be a power of two from 4K to 32M, got ${m}`);
  }

  const modeProblem = dataPathProblem(cfg.flags);
  if (modeProblem) throw new UsageError(modeProblem);

  // 2. The machine: the driver, root, the id.
  if ((cfg.flags & UBLK_F_UNPRIVILEGED_DEV) && (cfg.flags & UBLK_F_USER_RECOVERY)) {
    throw new UsageError('-r/-i/-e cannot be used with --unprivileged: the kernel drops user recovery for unprivileged devices');
  }
  // One control handle for every feature check of this step (it opens /dev/ublk-control once).
  const ctrl = new UblkControl(); // names the fix for a missing driver or a non-root caller
  try {
    if (cfg.flags & UBLK_F_UNPRIVILEGED_DEV) ctrl.requireFeature(UBLK_F_UNPRIVILEGED_DEV, '--unprivileged');
    if ((process.geteuid?.() ?? 0) !== 0 && !(cfg.flags & UBLK_F_UNPRIVILEGED_DEV)) {
      throw new UblkError('adding a device needs root, or --unprivileged for a device of your own (after `ublk setup-unprivileged` as root)');
    }
    if (cfg.devId !== undefined && existsSync(`/dev/ublkc${cfg.devId}`)) {
      throw new UblkError(`device id ${cfg.devId} is taken (ublk list shows the devices)`);
    }
    if (cfg.name !== undefined) {
      const other = deviceNamed(cfg.name);
      if (other) throw new UblkError(`the name ${cfg.name} is device ${other.devId}'s (\`ublk down ${cfg.name}\` removes it)`);
    }
    if (cfg.flags & UBLK_F_NO_AUTO_PART_SCAN) ctrl.requireFeature(UBLK_F_NO_AUTO_PART_SCAN, '--no_auto_part_scan');
    // -b and --shmem_zc first: a kernel without them is told their release, whatever data path goes with them.
    if (cfg.flags & UBLK_F_SHMEM_ZC) ctrl.requireFeature(UBLK_F_SHMEM_ZC, '--shmem_zc');
    if (cfg.flags & UBLK_F_BATCH_IO) ctrl.requireFeature(UBLK_F_BATCH_IO, '-b (batch I/O)');
    requireDataPath(ctrl, cfg.flags, values.autoZcFallback === true);
    if ((cfg.threadsPerQueue ?? 1) > 1) ctrl.requireFeature(UBLK_F_PER_IO_DAEMON, `--nthreads ${String(values.nthreads)} --per_io_tasks`);
    if (cfg.flags & UBLK_F_USER_RECOVERY) {
      if (cfg.flags & UBLK_F_USER_RECOVERY_FAIL_IO) ctrl.requireFeature(UBLK_F_USER_RECOVERY_FAIL_IO, '-e 1');
      if (cfg.flags & UBLK_F_USER_RECOVERY_REISSUE) ctrl.requireFeature(UBLK_F_USER_RECOVERY_REISSUE, '-i 1');
      ctrl.requireFeature(UBLK_F_USER_RECOVERY, '-r 1');
      // As kublk does: where the kernel can quiesce a device (6.16), a recoverable one can be
      // handed to a new server without failing or reissuing I/O (`ublk upgrade`).
      if (ctrl.features() & UBLK_F_QUIESCE) cfg.flags |= UBLK_F_QUIESCE;
    }
  } finally {
    ctrl.close();
  }
  // What the target keeps must outlive this server (mem's disk): the options say where.
  if ((cfg.flags & UBLK_F_USER_RECOVERY) && t.def.persist) cfg.targetOptions = t.def.persist(cfg.targetOptions, randomBytes(8).toString('hex'));

  // 3. The target's own checks, and the device's shape, before any device exists.
  let ok = false;
  try {
    const spec = await t.def.prepare(cfg.targetOptions);
    try {
      const problem = specProblem(spec, cfg.maxIoBytes ?? spec.maxIoBytes ?? DEFAULT_MAX_IO_BYTES, cfg.queues);
      if (problem) throw new UblkError(`${type}: ${problem}`);
    } finally {
      spec.release?.();
    }
    // The declaration (--save): this command line without what only concerns this one run,
    // written once the device is live.
    const save = () => {
      if (cfg.name === undefined) return;
      const path = saveDevice({ name: cfg.name, args: withoutOptions(argv, ['--save', '--foreground', '--start-timeout']) });
      process.stderr.write(`ublk: saved as ${path}: \`ublk up ${cfg.name}\` brings it back\n`);
    };
    if (values.foreground) {
      return await serve(cfg, (id) => {
        ok = true;
        save();
        printDevice(id);
      });
    }
    const status = await startDetached(cfg, ((values.startTimeout as number | undefined) ?? 60) * 1000);
    ok = status === 0;
    if (ok) save();
    return status;
  } finally {
    // A device that was never made keeps nothing (the server also frees it when it unwinds).
    if (!ok && !values.foreground) t.def.destroy?.(cfg.targetOptions);
  }
}

/** `argv` without the options named in `drop` (and their values). */
function withoutOptions(argv: string[], drop: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const name = a.startsWith('--') && a.includes('=') ? a.slice(0, a.indexOf('=')) : a;
    if (!drop.includes(name)) out.push(a);
    else if (name === a && name !== '--foreground') i++; // its value
  }
  return out;
}

/** The UBLK_F_* bits of -r/-i/-e (kublk: -i 1 and -e 1 imply -r 1). */
function recoveryFlags(values: Record<string, unknown>): number {
  let flags = 0;
  if (values.recovery === 1) flags |= UBLK_F_USER_RECOVERY;
  if (values.reissue === 1) flags |= UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE;
  if (values.failIo === 1) flags |= UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_FAIL_IO;
  if ((flags & UBLK_F_USER_RECOVERY_REISSUE) && (flags & UBLK_F_USER_RECOVERY_FAIL_IO)) {
    throw new UsageError('-i 1 (reissue held I/O to the next server) and -e 1 (fail I/O while no server runs) exclude each other');
  }
  return flags;
}

/** Prints the new device the way `list -n ID` does (set by main.ts, which owns the output). */
let printDevice: (id: number) => void = () => undefined;
export function setDevicePrinter(p: (id: number) => void): void {
  printDevice = p;
}

/**
 * Starts a detached server and waits for its report. If it does not come within `timeoutMs`,
 * or the caller itself is interrupted, the server is told to stop (it unwinds what it made), and
 * killed if it does not; a device it had already added is then removed here (never one it was
 * recovering: that one goes back to waiting for a server).
 */
export async function startDetached(cfg: ServeConfig, timeoutMs: number): Promise<number> {
  const runDir = new RunDir();
  runDir.ensure();
  const log = runDir.createLog();
  const bin = fileURLToPath(new URL('../../bin/ublk.js', import.meta.url));
  let child: ChildProcess;
  try {
    child = spawn(process.execPath, [...process.execArgv, bin, '__serve', JSON.stringify({ ...cfg, log: log.path })], {
      detached: true,
      stdio: ['ignore', log.fd, log.fd, 'ipc'],
    });
  } finally {
    closeSync(log.fd);
  }
  let devId: number | undefined;
  type Outcome = { ok: true; devId: number } | { ok: false; error: string; stop?: boolean };
  let timer: NodeJS.Timeout | undefined;
  const outcome = await new Promise<Outcome>((resolve) => {
    timer = setTimeout(() => resolve({ ok: false, stop: true, error: `the server did not report the device ready within ${timeoutMs / 1000} s (--start-timeout); it was stopped` }), timeoutMs);
    const onSignal = (sig: NodeJS.Signals) => resolve({ ok: false, stop: true, error: `${sig}: interrupted; the server was stopped` });
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
    child.on('message', (m: ServeReport) => {
      if (m.kind === 'added') devId = m.devId;
      else if (m.kind === 'ready') resolve({ ok: true, devId: m.devId });
      else if (m.kind === 'failed') resolve({ ok: false, error: m.error });
    });
    child.once('exit', (code, signal) => resolve({ ok: false, error: `the server exited (${signal ?? code}) before the device was ready` }));
    child.once('error', (e) => resolve({ ok: false, error: `the server could not be started: ${e.message}` }));
  }).finally(() => {
    clearTimeout(timer);
    process.removeAllListeners('SIGINT');
    process.removeAllListeners('SIGTERM');
  });
  child.removeAllListeners('message');
  if (outcome.ok) {
    if (child.connected) child.disconnect();
    child.unref();
    printDevice(outcome.devId);
    return 0;
  }
  if (outcome.stop) await stopServer(child, cfg.recover ? undefined : devId);
  if (child.connected) child.disconnect();
  child.unref();
  // The log is kept only if it holds something (then the message names it).
  let logNote = '';
  try {
    if (statSync(log.path).size === 0) rmSync(log.path, { force: true });
    else logNote = `; the server's log: ${log.path}`;
  } catch { /* gone */ }
  process.stderr.write(`ublk: ${outcome.error}${logNote}\n`);
  return 1;
}

/** Stops a server that has not reported ready: SIGTERM (it unwinds), then SIGKILL and our own cleanup. */
async function stopServer(child: ChildProcess, devId: number | undefined): Promise<void> {
  const exited = new Promise<void>((r) => {
    if (child.exitCode !== null || child.signalCode !== null) r();
    else child.once('exit', () => r());
  });
  child.kill('SIGTERM');
  const inTime = await Promise.race([exited.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 15_000))]);
  if (inTime) return;
  child.kill('SIGKILL');
  await exited;
  if (devId === undefined || !existsSync(`/dev/ublkc${devId}`)) return;
  // The server died holding a device: remove it, as `ublk del` would.
  const ctrl = new UblkControl();
  try {
    try { ctrl.stopDev(devId); } catch { /* not started */ }
    new RunDir().removeState(devId, child.pid);
    ctrl.delDev(devId);
  } catch (e) {
    process.stderr.write(`ublk: removing device ${devId} of the stopped server: ${(e as Error).message}\n`);
  } finally {
    ctrl.close();
  }
}

const modeNamed = (name: string): DataPathMode => DATA_PATH_MODES.find((m) => m.name === name)!;

/**
 * Every flag of the chosen data path must be one this kernel grants (GET_FEATURES), and a mode
 * whose flag is older than it works needs its release whatever the features say (zero copy: bit 0
 * was accepted, and served as user copy, since 6.5, while REGISTER_IO_BUF only exists from 6.15;
 * ublk_drv.c before and after "ublk: decouple zero copy from user copy"). modeAvailable is the
 * same rule as a yes or no, for the benchmark and the tests.
 */
function requireDataPath(ctrl: UblkControl, flags: number, fallback: boolean): void {
  const mode = dataPathOf(flags);
  const opt = fallback ? '--auto_zc_fallback' : mode.option;
  // The mode's own flag first, so a kernel without it is told the mode's kernel.
  if (mode.flag) ctrl.requireFeature(mode.flag, opt);
  const used = DATA_PATH_MODES.filter((m) => m.flag && flags & m.flag);
  const label = (m: DataPathMode) => (m.flag === mode.flag ? opt : `${opt} (${m.name})`);
  for (const m of used) if (m.flag !== mode.flag) ctrl.requireFeature(m.flag, label(m));
  for (const m of used) {
    if (m.release && !releaseAtLeast(release(), m.release)) throw new UblkError(`${label(m)} needs Linux ${m.release} or later, and this kernel is ${release()}`);
  }
}

/**
 * --shmem_zc's shared file: kublk's --htlb FILE, here any file the server can map shared (hugetlbfs,
 * or tmpfs such as /dev/shm), whose pages a client maps too. kublk's other way, a client handing
 * its memfd over a socket, is not supported. Checked here so that a mistake makes no device.
 */
function sharedFiles(values: Record<string, unknown>): string[] | undefined {
  const file = values.htlb as string | undefined;
  if (!values.shmemZc) {
    if (file !== undefined) throw new UsageError('--htlb FILE goes with --shmem_zc');
    return undefined;
  }
  if (file === undefined) {
    throw new UsageError('--shmem_zc needs --htlb FILE: a hugetlbfs or tmpfs file (e.g. in /dev/shm) that clients map too (a client handing its memfd over a socket, kublk\'s other way, is not supported)');
  }
  if (values.recovery) throw new UsageError('--shmem_zc with -r 1 is not supported yet: a recovering server would have to find the registered buffers again');
  let st;
  try {
    st = statSync(file);
  } catch (e) {
    throw new UsageError(`--htlb ${file}: ${(e as Error).message}`);
  }
  if (!st.isFile() || sharedSizeProblem(st.size)) {
    throw new UsageError(`--htlb ${file} must be a regular file whose size is a multiple of the page size (${PAGE_SIZE}), from one page to 1 GiB; it is ${st.size} bytes`);
  }
  return [resolve(file)];
}

/**
 * Threads per queue from kublk's --nthreads/--per_io_tasks: N threads in all (default: one per
 * queue); N other than the queue count needs --per_io_tasks, as in kublk. kublk's threads may
 * each serve tags of several queues; ours split each queue's tags evenly (tag t to thread
 * t % (N / Q)), so N must be a multiple of Q. Undefined: one thread per queue.
 */
function threadsPerQueue(values: Record<string, unknown>): number | undefined {
  const q = (values.queues as number | undefined) ?? 1;
  const n = values.nthreads as number | undefined;
  if (n === undefined || n === q) return undefined;
  if (!values.perIoTasks) throw new UsageError(`--nthreads ${n} differs from the ${q} queue(s): add --per_io_tasks to spread each queue's tags over threads`);
  if (values.batch) throw new UsageError(`--nthreads ${n} with -b: batch I/O serves each queue from one thread here (kublk's batch threads that share a queue are not supported)`);
  if (n % q !== 0) throw new UsageError(`--nthreads ${n} must be a multiple of the ${q} queue(s): each queue's tags are split evenly among N / Q threads`);
  const depth = (values.depth as number | undefined) ?? 128;
  if (n / q > depth) throw new UsageError(`--nthreads ${n}: ${n / q} threads per queue, but a queue has only ${depth} tags (-d)`);
  return n / q;
}
