/**
 * The `ublk` command line: add, del, list, features, help. Output follows ublksrv's and the
 * kernel selftests' kublk dialect so existing scripts keep working; `--json` is the stable
 * machine format. Every command parses its options the same way (targets/options.ts): unknown
 * or repeated options are errors, exit status 2, one line.
 */
import { spawnSync } from 'node:child_process';
import {
  chmodSync, chownSync, closeSync, constants as fsConstants, mkdirSync, openSync, readFileSync, readdirSync, readlinkSync, writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CONTROL_PATH as CONTROL_DEVICE, UblkControl, UblkError, stateName, type DevInfo, type DevParams } from '../ublk/control.js';
import { TargetError } from '../ublk/target.js';
import {
  UBLK_FEATURES, ublkFeatureNames, UBLK_F_BATCH_IO, UBLK_F_SHMEM_ZC, UBLK_F_QUIESCE, UBLK_F_SAFE_STOP_DEV, UBLK_F_UPDATE_SIZE, UBLK_F_USER_RECOVERY,
  UBLK_F_UNPRIVILEGED_DEV, UBLK_F_USER_RECOVERY_REISSUE, UBLK_S_DEV_LIVE,
} from '../ublk/abi.js';
import { UBLK_MAX_DEV_ID, pidAlive } from '../ublk/server.js';
import { dataPathOf } from '../ublk/modes.js';
import { loadTarget, targetNames } from '../targets/index.js';
import { parseOptions, UsageError } from '../targets/options.js';
import { SysError } from '../libc/index.js';
import { add, setDevicePrinter, startDetached } from './add.js';
import { serve, type ServeConfig } from './serve.js';
import { RunDir, type DeviceState } from './run-dir.js';
import { deviceNamed, loadSaved, savedDevices } from './saved.js';
import { replay } from './replay.js';
import { trace } from './trace.js';

const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };

const USAGE = `usage: ublk <command> [options]

Linux userspace block devices (ublk), served from TypeScript over io_uring.

commands:
  add -t TYPE [-n ID] [-q QUEUES] [-d DEPTH] [--max-io-bytes BYTES] [--foreground]
      [--start-timeout SECONDS] [target options]
                          create /dev/ublkbID served by a background process (or this one)
      [-r 1 | -i 1 | -e 1]  user recovery: the device outlives its server (I/O waits;
                          -i: requests the server held are sent again; -e: I/O fails)
      [-g | -u | -z | --auto_zc | --auto_zc_fallback]
                          the data path (default copy): -g get_data, a WRITE's data is
                          copied only when the server asks (NEED_GET_DATA); -u user_copy,
                          the server copies data itself with pread/pwrite (USER_COPY);
                          -z zero copy, request pages become fixed buffers of the queue's
                          ring (6.15); --auto_zc, registered by the kernel itself (6.16);
                          --auto_zc_fallback, and by the server where the kernel could not
      [--nthreads N --per_io_tasks]
                          N threads serve the queues (a multiple of -q): each queue's tags
                          are split among N/Q threads, each with its own ring (6.16)
      [--spin-us N]       low latency: each queue spins up to N µs for the next request
                          before sleeping (costs a CPU while it spins)
      [--trace]           print every SQE and CQE of the control and queue rings, decoded
                          (to the server's log; with --foreground, to the terminal)
  del -n ID | -a [--async] [--safe]
                          stop and delete one device or all of them (--safe: not while
                          the disk is open or mounted)
  stop -n ID [--safe]     stop a device (its server then deletes it)
  recover -n ID [--foreground] [--start-timeout SECONDS] [--trace]
                          serve a device whose server died, with the target and options
                          it was added with (--trace as for add)
  upgrade -n ID [--start-timeout SECONDS] [--trace]
                          replace a device's server by a new one (this ublk's code)
                          without the device going away (--trace: the new server's rings)
  quiesce -n ID           QUIESCE_DEV: the server exits, the device waits for recover
  update_size -n ID -s SIZE
                          change a live device's capacity (bytes, or with K/M/G/T)
  setup-unprivileged [--rules-dir DIR]
                          as root: install the udev rule that lets users add devices of
                          their own (add --unprivileged) and hands them their nodes
  up [NAME | -a]          bring saved devices up (add ... --save NAME declares one): added,
                          or recovered if their server died
  down [NAME | -a]        stop and delete saved devices (the declarations stay)
  list [-n ID] [-v] [--json]
                          show devices
  features [--json]       the ublk features this kernel supports
  trace -n ID [--count N] [--seconds S]
                          follow a running server's live trace: every SQE and CQE of its
                          control and queue rings, decoded (UBLK_TRACE=1: a library server's)
  replay TRACE --to PATH [--until-flush N]
                          apply a write trace (add -t fault --record TRACE) to a file or
                          block device, up to the N-th FLUSH
  help [-t TYPE]          this text, or a target's own options
  --version               print the version

targets: ${targetNames.join(', ')}, or the path of a module that exports a target
`;

const out = (s: string) => process.stdout.write(s);

/** Runs the CLI; resolves to the exit status (2 for usage errors, like ublksrv). */
export async function main(argv: string[]): Promise<number> {
  // A reader that stops early (`ublk features | head -3`) closes our stdout: end quietly, as
  // other command-line tools do, instead of dying on an unhandled EPIPE.
  process.stdout.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(0);
    throw e;
  });
  setDevicePrinter((id) => list(['-n', String(id)]));
  const [cmd, ...rest] = argv;
  try {
    switch (cmd) {
      case undefined:
        process.stderr.write(USAGE);
        return 2;
      case 'help':
      case '-h':
      case '--help':
        return await help(rest);
      case '-V':
      case '--version':
        parseOptions(cmd, rest, []);
        out(`ublk ${pkg.version}\n`);
        return 0;
      case 'add':
        return await add(rest);
      case 'del':
        return await del(rest);
      case 'stop':
        return await stop(rest);
      case 'recover':
        return await recover(rest);
      case 'upgrade':
        return await upgrade(rest);
      case 'quiesce':
        return await quiesce(rest);
      case 'update_size':
        return await updateSize(rest);
      case 'setup-unprivileged':
        return setupUnprivileged(rest);
      case '__chown':
        // udev's helper (the rule setup-unprivileged installs): hands a user's device to them.
        return chownDevice(rest[0] ?? '');
      case 'up':
        return await up(rest);
      case 'down':
        return await down(rest);
      case 'list':
        return list(rest);
      case 'features':
        return features(rest);
      case 'replay':
        return replay(rest);
      case 'trace':
        return await trace(rest);
      case '__serve':
        // The detached server (add.ts starts it): its configuration comes as JSON.
        return await serve(JSON.parse(rest[0] ?? '{}') as ServeConfig);
      default:
        throw new UsageError(`unknown command '${cmd}'; run 'ublk --help'`);
    }
  } catch (e) {
    if (e instanceof UsageError) {
      process.stderr.write(`ublk: ${e.message}\n`);
      return 2;
    }
    if (e instanceof UblkError || e instanceof SysError || e instanceof TargetError) {
      process.stderr.write(`ublk: ${e.message}\n`);
      return 1;
    }
    throw e;
  }
}

async function help(argv: string[]): Promise<number> {
  const { values } = parseOptions('help', argv, [{ key: 'type', names: ['-t', '--type'], kind: 'string' }]);
  const type = values.type as string | undefined;
  if (type === undefined) {
    out(USAGE);
    return 0;
  }
  const t = await loadTarget(type);
  if (!t) throw new UsageError(`unknown target '${type}' (targets: ${targetNames.join(', ')}, a module path, or an installed package)`);
  const kind = 'kind' in t.def && t.def.kind === 'async' ? 'an async target' : 'a ring-native target';
  const usage = t.def.usage ?? '';
  out(`ublk add -t ${type} [common options] [target options]\n\n${t.def.name}: ${kind}${usage ? `\n\ntarget options:\n${usage}` : ' (no usage given: options are --name value)'}`);
  return 0;
}

async function del(argv: string[]): Promise<number> {
  const { values } = parseOptions('del', argv, [
    { key: 'all', names: ['-a', '--all'], kind: 'flag' },
    { key: 'async', names: ['--async'], kind: 'flag' },
    { key: 'safe', names: ['--safe'], kind: 'flag' },
    ...idOption(),
  ]);
  const all = values.all === true;
  if (all && values.id !== undefined) throw new UsageError('del takes -n ID or -a, not both');
  if (!all && values.id === undefined) throw new UsageError('del needs -n ID or -a');
  const ids = all ? UblkControl.listIds() : [values.id as number];
  const runDir = new RunDir();
  const ctrl = new UblkControl();
  let status = 0;
  try {
    for (const id of ids) {
      const st = runDir.readState(id);
      try {
        if (values.safe) safeStop(ctrl, id);
        else ctrl.stopDev(id);
        // Before DEL_DEV: until it returns the id is still this device's, so the state file
        // cannot be a new device's yet (and it is removed only if it names this server).
        if (st) runDir.removeState(id, st.pid);
        ctrl.delDev(id, values.async === true);
        // What the target kept beyond its server (mem's disk file): its server frees it too, if
        // it still runs; one whose server is gone has nobody else to do it.
        if (st) await destroyTargetData(st);
      } catch (e) {
        // With -a, a device that vanished meanwhile is not an error.
        if (all && e instanceof UblkError && (e.code === 'ENODEV' || e.code === 'ENOENT')) continue;
        process.stderr.write(`ublk: ${(e as Error).message}\n`);
        status = 1;
        continue;
      }
      if (st && values.async !== true) await waitForExit(st.pid, 10_000);
    }
  } finally {
    ctrl.close();
  }
  return status;
}

/** Where setup-unprivileged installs its rule, and the rule's file name. */
const UDEV_RULES = '/etc/udev/rules.d';
export const UDEV_RULE_FILE = '99-ublk-unprivileged.rules';

/**
 * `setup-unprivileged`: what the kernel expects around UBLK_F_UNPRIVILEGED_DEV, which it leaves
 * to userspace (ublksrv ships the same pieces): /dev/ublk-control open to every user (the kernel
 * itself checks that a non-root ADD_DEV asks for an unprivileged device, and limits how many), and
 * a udev rule that hands each unprivileged device's /dev/ublkcN and /dev/ublkbN to the user who
 * added it (`ublk __chown`). Privileged devices stay root's: their commands need CAP_SYS_ADMIN.
 */
function setupUnprivileged(argv: string[]): number {
  const { values } = parseOptions('setup-unprivileged', argv, [{ key: 'dir', names: ['--rules-dir'], kind: 'string' }]);
  if ((process.geteuid?.() ?? 0) !== 0) throw new UblkError('setup-unprivileged installs a udev rule: run it as root');
  const dir = (values.dir as string | undefined) ?? UDEV_RULES;
  const bin = fileURLToPath(new URL('../../bin/ublk.js', import.meta.url));
  const rule = [
    '# Installed by `ublk setup-unprivileged`: users may add ublk devices of their own',
    '# (`ublk add --unprivileged`, UBLK_F_UNPRIVILEGED_DEV), and each one\'s nodes go to its owner.',
    'KERNEL=="ublk-control", MODE="0666"',
    `ACTION=="add", KERNEL=="ublk[bc][0-9]*", RUN+="${process.execPath} ${bin} __chown %k"`,
    '',
  ].join('\n');
  mkdirSync(dir, { recursive: true });
  const path = join(dir, UDEV_RULE_FILE);
  writeFileSync(path, rule, { mode: 0o644 });
  // What the rule does for ublk-control, now, without waiting for udev to replay it.
  try { chmodSync(CONTROL_DEVICE, 0o666); } catch { /* the driver is not loaded yet: udev applies the rule when it is */ }
  spawnSync('udevadm', ['control', '--reload'], { stdio: 'ignore' });
  out(`installed ${path}; ${CONTROL_DEVICE} is open to users, and their unprivileged devices are handed to them\n`);
  return 0;
}

/** `__chown ublkcN|ublkbN` (run by udev as root): gives an unprivileged device's node to its owner. */
function chownDevice(name: string): number {
  const m = /^ublk([bc])(\d+)$/.exec(name);
  if (!m) throw new UsageError(`__chown takes a device node name like ublkc0, got '${name}'`);
  const ctrl = new UblkControl();
  try {
    const info = ctrl.devInfo2(Number(m[2]));
    if (info.flags & UBLK_F_UNPRIVILEGED_DEV) chownSync(`/dev/${name}`, info.ownerUid, info.ownerGid);
  } finally {
    ctrl.close();
  }
  return 0;
}

/** Frees what a device's target kept beyond its server (TargetDefinition.destroy). */
async function destroyTargetData(st: DeviceState): Promise<void> {
  try {
    (await loadTarget(st.target))?.def.destroy?.(st.targetOptions);
  } catch (e) {
    process.stderr.write(`ublk: freeing what target ${st.target} kept for device ${st.devId}: ${(e as Error).message}\n`);
  }
}

/**
 * `stop --safe`: the device is stopped only if nobody uses its disk. TRY_STOP_DEV (Linux 7.0,
 * UBLK_F_SAFE_STOP_DEV) makes the kernel check that atomically; older kernels get our own
 * check, which is not atomic (an opener can come between it and STOP_DEV): holders (device
 * mapper, md), an exclusive open (mounts, swap), and every process's open files.
 */
function safeStop(ctrl: UblkControl, id: number): void {
  const info = ctrl.devInfo(id);
  if (info.flags & UBLK_F_SAFE_STOP_DEV) {
    try {
      ctrl.tryStopDev(id);
    } catch (e) {
      if (e instanceof UblkError && e.code === 'EBUSY') throw new UblkError(`device ${id}: /dev/ublkb${id} is open or mounted, so it was not stopped (--safe): ${diskUsers(id).join(', ') || 'close it first'}`);
      throw e;
    }
    return;
  }
  const users = diskUsers(id);
  if (users.length) throw new UblkError(`device ${id}: /dev/ublkb${id} is in use (${users.join(', ')}), so it was not stopped (--safe)`);
  ctrl.stopDev(id);
}

/** Who uses /dev/ublkbN: holders, an exclusive opener (a mount), processes with it open. */
function diskUsers(id: number): string[] {
  const disk = `ublkb${id}`;
  const users: string[] = [];
  try {
    for (const h of readdirSync(`/sys/block/${disk}/holders`)) users.push(`held by ${h}`);
  } catch { /* no such disk */ }
  try {
    closeSync(openSync(`/dev/${disk}`, fsConstants.O_RDONLY | fsConstants.O_EXCL | fsConstants.O_NONBLOCK));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EBUSY') users.push('mounted or opened exclusively');
  }
  let pids: string[] = [];
  try { pids = readdirSync('/proc').filter((n) => /^\d+$/.test(n)); } catch { /* no /proc */ }
  for (const pid of pids) {
    let fds: string[] = [];
    try { fds = readdirSync(`/proc/${pid}/fd`); } catch { continue; }
    for (const fd of fds) {
      let target = '';
      try { target = readlinkSync(`/proc/${pid}/fd/${fd}`); } catch { continue; }
      if (target === `/dev/${disk}`) {
        let comm = '?';
        try { comm = readFileSync(`/proc/${pid}/comm`, 'utf8').trim(); } catch { /* gone */ }
        users.push(`open by ${comm} (pid ${pid})`);
        break;
      }
    }
  }
  return users;
}

async function stop(argv: string[]): Promise<number> {
  const { values } = parseOptions('stop', argv, [{ key: 'safe', names: ['--safe'], kind: 'flag' }, ...idOption()]);
  const id = requireId('stop', values);
  const ctrl = new UblkControl();
  try {
    if (values.safe) safeStop(ctrl, id);
    else ctrl.stopDev(id);
  } finally {
    ctrl.close();
  }
  return 0;
}

function requireId(cmd: string, values: Record<string, unknown>): number {
  if (values.id === undefined) throw new UsageError(`${cmd} needs -n ID`);
  return values.id as number;
}

/** What a server that recovers the device saved in `st` is given: everything the first one had. */
function recoveryConfig(st: DeviceState, values: Record<string, unknown>): ServeConfig {
  return {
    // --trace is the new server's own choice, as with add: it is not part of the saved state.
    trace: values.trace === true ? true : undefined,
    target: st.target, targetOptions: st.targetOptions, devId: st.devId, queues: st.queues, depth: st.depth,
    maxIoBytes: st.maxIoBytes, flags: st.flags, spinUs: st.spinUs, requestTimeoutMs: st.requestTimeoutMs, autoZcFallback: st.autoZcFallback, threadsPerQueue: st.threadsPerQueue, name: st.name, recover: true,
  };
}

/** The saved state of device `id`, or an error that says why it cannot be had. */
function savedState(cmd: string, id: number): DeviceState {
  const st = new RunDir().readState(id);
  if (!st) {
    throw new UblkError(`${cmd}: device ${id} has no saved state in ${new RunDir().path} (it was not added by this ublk, or the run directory was cleared), so its target and options are unknown`);
  }
  return st;
}

/**
 * `recover -n ID`: serves a device whose server died, with the target, options and queue shape
 * the state file saved (kublk wants the whole add command line again; ublksrv and we do not).
 */
async function recover(argv: string[]): Promise<number> {
  const { values } = parseOptions('recover', argv, [
    { key: 'foreground', names: ['--foreground'], kind: 'flag' },
    { key: 'trace', names: ['--trace'], kind: 'flag' },
    { key: 'startTimeout', names: ['--start-timeout'], kind: 'count', min: 1, max: 86400 },
    ...idOption(),
  ]);
  const id = requireId('recover', values);
  const st = savedState('recover', id);
  const ctrl = new UblkControl();
  try {
    const info = ctrl.devInfo(id);
    if (!(info.flags & UBLK_F_USER_RECOVERY)) {
      throw new UblkError(`device ${id} was added without user recovery (-r 1): it cannot be recovered; \`ublk del -n ${id}\` removes it`);
    }
    if (info.state === UBLK_S_DEV_LIVE && pidAlive(info.ublksrvPid)) {
      throw new UblkError(`device ${id} is LIVE, served by process ${info.ublksrvPid}: there is nothing to recover (\`ublk upgrade -n ${id}\` replaces a running server)`);
    }
  } finally {
    ctrl.close();
  }
  const cfg = recoveryConfig(st, values);
  if (values.foreground) return serve(cfg, (n) => list(['-n', String(n)]));
  return startDetached(cfg, ((values.startTimeout as number | undefined) ?? 60) * 1000);
}

/**
 * `upgrade -n ID`: the device's server is replaced by a new one running this ublk's code, and
 * the disk stays. The old server is told to hand the device over (SIGUSR2): with QUIESCE_DEV
 * (Linux 6.16, the device added with UBLK_F_QUIESCE, which `add -r 1` asks for where the kernel
 * has it) the kernel first lets the I/O in flight finish and holds new I/O; without it the
 * requests the old server held are sent again to the new one, which needs REISSUE (`-i 1`).
 * Then the new server recovers the device. I/O waits meanwhile; the stall is printed.
 */
async function upgrade(argv: string[]): Promise<number> {
  const { values } = parseOptions('upgrade', argv, [
    { key: 'startTimeout', names: ['--start-timeout'], kind: 'count', min: 1, max: 86400 },
    { key: 'trace', names: ['--trace'], kind: 'flag' },
    ...idOption(),
  ]);
  const id = requireId('upgrade', values);
  const st = savedState('upgrade', id);
  const ctrl = new UblkControl();
  const began = Date.now();
  let how: string;
  try {
    const info = ctrl.devInfo(id);
    if (!(info.flags & UBLK_F_USER_RECOVERY)) {
      throw new UblkError(`device ${id} was added without user recovery (-r 1): its disk would go away with its server, so it cannot be upgraded`);
    }
    if (!pidAlive(st.pid)) throw new UblkError(`device ${id} has no running server (process ${st.pid} is gone): \`ublk recover -n ${id}\` serves it`);
    if (info.flags & UBLK_F_QUIESCE) {
      how = 'quiesced (QUIESCE_DEV)';
    } else if (info.flags & UBLK_F_USER_RECOVERY_REISSUE) {
      how = 'without QUIESCE_DEV (Linux 6.16, or a device added without it): the requests the old server held were reissued';
    } else {
      throw new UblkError(`device ${id}: without QUIESCE_DEV (Linux 6.16) an upgrade must reissue the requests the old server holds, and the device was added without -i 1; they would fail`);
    }
    // The server hands the device over itself (UblkServer.handOver), and exits.
    process.kill(st.pid, 'SIGUSR2');
  } finally {
    ctrl.close();
  }
  await waitForExit(st.pid, 30_000);
  if (pidAlive(st.pid)) throw new UblkError(`device ${id}: the old server (process ${st.pid}) did not exit within 30 s`);
  const cfg = recoveryConfig(st, values);
  const status = await startDetached(cfg, ((values.startTimeout as number | undefined) ?? 60) * 1000);
  if (status === 0) {
    const now = new RunDir().readState(id);
    process.stderr.write(`ublk: device ${id} upgraded: server ${st.pid} -> ${now?.pid ?? '?'}, ${how}; the hand-over took ${Date.now() - began} ms\n`);
  }
  return status;
}

/**
 * `quiesce -n ID` (kublk): QUIESCE_DEV with a 10 s drain; the server exits and the device waits,
 * QUIESCED, for `ublk recover`. Our own server is asked to do it (SIGUSR2), so that it knows to
 * leave rather than delete the device; one of another program's gets the bare command.
 */
async function quiesce(argv: string[]): Promise<number> {
  const { values } = parseOptions('quiesce', argv, [...idOption()]);
  const id = requireId('quiesce', values);
  const ctrl = new UblkControl();
  try {
    if (!(ctrl.devInfo(id).flags & UBLK_F_QUIESCE)) {
      ctrl.requireFeature(UBLK_F_QUIESCE, 'quiesce');
      throw new UblkError(`device ${id} was added without UBLK_F_QUIESCE (add -r 1 asks for it on kernels that have it)`);
    }
    const st = new RunDir().readState(id);
    if (!st || !pidAlive(st.pid)) {
      ctrl.quiesceDev(id, 10_000);
      return 0;
    }
    process.kill(st.pid, 'SIGUSR2');
    await waitForExit(st.pid, 30_000);
    if (pidAlive(st.pid)) throw new UblkError(`device ${id}: its server (process ${st.pid}) did not let go within 30 s`);
  } finally {
    ctrl.close();
  }
  return 0;
}

/**
 * `update_size -n ID -s SIZE` (kublk; SIZE in bytes, units allowed): UPDATE_SIZE (Linux 6.16)
 * changes the live disk's capacity. The target is asked first whether it can serve that size
 * (loop: the backing file must have grown to it); the saved state follows, so that a recovering
 * server serves the new size.
 */
async function updateSize(argv: string[]): Promise<number> {
  const { values } = parseOptions('update_size', argv, [{ key: 'size', names: ['-s', '--size'], kind: 'size' }, ...idOption()]);
  const id = requireId('update_size', values);
  const size = values.size as number | undefined;
  if (size === undefined) throw new UsageError('update_size needs -s SIZE');
  const runDir = new RunDir();
  const st = runDir.readState(id);
  const ctrl = new UblkControl();
  try {
    ctrl.requireFeature(UBLK_F_UPDATE_SIZE, 'update_size');
    const bs = 2 ** (ctrl.params(id).basic?.logicalBsShift ?? 9);
    if (size % bs !== 0) throw new UsageError(`update_size: -s ${size} is not a multiple of device ${id}'s block size ${bs}`);
    let options = st?.targetOptions;
    if (st) {
      const t = await loadTarget(st.target);
      if (!t?.def.resize) throw new UblkError(`device ${id}: target ${st.target} cannot change its size`);
      options = t.def.resize(st.targetOptions, size);
    }
    ctrl.updateSize(id, size / 512);
    if (st) runDir.writeState({ ...st, targetOptions: options, describe: { ...st.describe, size } });
  } finally {
    ctrl.close();
  }
  return 0;
}

function savedNames(cmd: string, argv: string[]): string[] {
  const { values, positional } = parseOptions(cmd, argv, [{ key: 'all', names: ['-a', '--all'], kind: 'flag' }], { positional: 1 });
  if (values.all && positional.length) throw new UsageError(`${cmd} takes NAME or -a, not both`);
  if (!values.all && !positional.length) throw new UsageError(`${cmd} needs a NAME or -a`);
  return values.all ? savedDevices().map((d) => d.name) : [loadSaved(positional[0]!).name];
}

/**
 * `up [NAME|-a]`: each saved device is made to serve: left alone if its server runs, recovered
 * if its server died and it has user recovery, otherwise (re)added with its saved command line.
 */
async function up(argv: string[]): Promise<number> {
  let status = 0;
  for (const name of savedNames('up', argv)) {
    const st = deviceNamed(name);
    let r: number;
    if (st && pidAlive(st.pid)) {
      out(`${name}: up (device ${st.devId}, server ${st.pid})\n`);
      continue;
    } else if (st && (st.flags ?? 0) & UBLK_F_USER_RECOVERY) {
      r = await recover(['-n', String(st.devId)]);
    } else {
      if (st) await del(['-n', String(st.devId)]); // a device left without its server and no way back
      r = await add([...loadSaved(name).args, '--save', name]);
    }
    if (r !== 0) {
      process.stderr.write(`ublk: ${name}: could not be brought up\n`);
      status = 1;
    }
  }
  return status;
}

/** `down [NAME|-a]`: stops and deletes the saved devices that are up; their declarations stay. */
async function down(argv: string[]): Promise<number> {
  let status = 0;
  for (const name of savedNames('down', argv)) {
    const st = deviceNamed(name);
    if (!st) continue;
    if ((await del(['-n', String(st.devId)])) !== 0) status = 1;
  }
  return status;
}

/** `-n ID`, checked against the kernel's limit on device ids. */
function idOption() {
  return [{ key: 'id', names: ['-n', '--number'], kind: 'count' as const, min: 0, max: UBLK_MAX_DEV_ID }];
}

async function waitForExit(pid: number, ms: number): Promise<void> {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    try {
      process.kill(pid, 0);
    } catch {
      return;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

function deviceJson(info: DevInfo, params: DevParams | undefined, state: DeviceState | undefined) {
  const b = params?.basic;
  return {
    dev_id: info.devId,
    nr_hw_queues: info.nrHwQueues,
    queue_depth: info.queueDepth,
    block_size: b ? 2 ** b.logicalBsShift : undefined,
    dev_capacity: b?.devSectors,
    max_rq_size: info.maxIoBufBytes,
    daemon_pid: info.ublksrvPid,
    flags: info.flags,
    /** How data moves (src/ublk/modes.ts): copy, get_data, ... */
    data_path: dataPathOf(info.flags).name,
    /** Requests come and go many per command (-b, UBLK_F_BATCH_IO). */
    batch_io: (info.flags & UBLK_F_BATCH_IO) !== 0,
    /** Requests from a registered shared region are served in place (--shmem_zc, UBLK_F_SHMEM_ZC). */
    shmem_zc: (info.flags & UBLK_F_SHMEM_ZC) !== 0,
    /** --shmem_zc's shared files (--htlb); absent for a device we do not serve. */
    shared_files: state?.sharedFiles,
    state: stateName(info.state),
    /** A server serves the device (false: QUIESCED or FAIL_IO, waiting for `ublk recover`). */
    server: info.state === UBLK_S_DEV_LIVE && pidAlive(info.ublksrvPid),
    ublkc: `/dev/ublkc${info.devId}`,
    ublkb: `/dev/ublkb${info.devId}`,
    target: state ? { name: state.target, options: state.targetOptions, describe: state.describe } : undefined,
    log: state?.log,
    /** Threads serving each queue (--nthreads / --per_io_tasks); absent for a device we do not serve. */
    threads_per_queue: state ? state.threadsPerQueue ?? 1 : undefined,
  };
}

function list(argv: string[]): number {
  const { values } = parseOptions('list', argv, [
    { key: 'verbose', names: ['-v', '--verbose'], kind: 'flag' },
    { key: 'json', names: ['--json'], kind: 'flag' },
    // kublk's `list -a` (all devices) is what list does anyway.
    { key: 'all', names: ['-a', '--all'], kind: 'flag' },
    ...idOption(),
  ]);
  const runDir = new RunDir();
  const ctrl = new UblkControl();
  const devices: ReturnType<typeof deviceJson>[] = [];
  let status = 0;
  try {
    for (const id of values.id !== undefined ? [values.id as number] : UblkControl.listIds()) {
      let info: DevInfo;
      try {
        info = ctrl.devInfo(id);
      } catch (e) {
        // Listing everything, a user sees only the devices they may see (their unprivileged ones).
        if (values.id === undefined && e instanceof UblkError && (e.code === 'EPERM' || e.code === 'EACCES') && (process.geteuid?.() ?? 0) !== 0) continue;
        process.stderr.write(`ublk: ${(e as Error).message}\n`);
        status = 1;
        continue;
      }
      let params: DevParams | undefined;
      try {
        params = ctrl.params(id);
      } catch {
        params = undefined;
      }
      const d = deviceJson(info, params, runDir.readState(id));
      devices.push(d);
      if (values.json) continue;
      // kublk / ublksrv dialect.
      out(`dev id ${d.dev_id}: nr_hw_queues ${d.nr_hw_queues} queue_depth ${d.queue_depth} block size ${d.block_size ?? 0} dev_capacity ${d.dev_capacity ?? 0}\n`);
      out(`\tmax rq size ${d.max_rq_size} daemon pid ${d.daemon_pid} flags 0x${d.flags.toString(16)} state ${d.state}\n`);
      if (!d.server) {
        out(d.flags & UBLK_F_USER_RECOVERY
          ? `\tno server: \`ublk recover -n ${d.dev_id}\` serves it again, \`ublk del -n ${d.dev_id}\` removes it\n`
          : `\tno server: \`ublk del -n ${d.dev_id}\` removes it\n`);
      }
      if (values.verbose) {
        for (let q = 0; q < info.nrHwQueues; q++) {
          let aff = '';
          try { aff = ctrl.queueAffinity(id, q).join(' '); } catch { aff = '?'; }
          out(`\tqueue ${q}: affinity(${aff} )\n`);
        }
        out(`\tdata path ${d.data_path}: ${dataPathOf(d.flags).describe}\n`);
        if (d.batch_io) out('\tbatch I/O: requests come and go many per command (PREP/FETCH/COMMIT_IO_CMDS)\n');
        if (d.shmem_zc) out(`\tshared-memory zero copy: O_DIRECT requests from ${d.shared_files?.join(', ') ?? 'a registered region'} are served in place\n`);
        if ((d.threads_per_queue ?? 1) > 1) out(`\tthreads ${d.threads_per_queue} per queue (per-I/O daemons): tag t is served by thread t % ${d.threads_per_queue}\n`);
        if (d.target) out(`\ttarget ${d.target.name} ${JSON.stringify(d.target.describe ?? d.target.options)}\n`);
        if (d.log) out(`\tlog ${d.log}\n`);
      }
    }
  } finally {
    ctrl.close();
  }
  if (values.json) out(`${JSON.stringify(devices)}\n`);
  return status;
}

function features(argv: string[]): number {
  const { values } = parseOptions('features', argv, [{ key: 'json', names: ['--json'], kind: 'flag' }]);
  const ctrl = new UblkControl();
  let f: number;
  try {
    f = ctrl.features();
  } finally {
    ctrl.close();
  }
  const names = ublkFeatureNames(f);
  if (values.json) {
    out(`${JSON.stringify({ features: f, names })}\n`);
    return 0;
  }
  // kublk's format: the header, then `0x<bit value padded to 16>: UBLK_F_NAME` per bit.
  out(`ublk_drv features: 0x${f.toString(16)}\n`);
  for (let bit = 0; bit < 64; bit++) {
    if (Math.floor(f / 2 ** bit) % 2 !== 1) continue;
    const name = UBLK_FEATURES[bit]?.name ?? 'unknown';
    out(`0x${(2 ** bit).toString(16).padEnd(16)}: ${name}\n`);
  }
  return 0;
}
