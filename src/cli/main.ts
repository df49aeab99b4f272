/**
 * The `ublk` command line: add, del, list, features, help. Output follows ublksrv's and the
 * kernel selftests' kublk dialect so existing scripts keep working; `--json` is the stable
 * machine format. Every command parses its options the same way (targets/options.ts): unknown
 * or repeated options are errors, exit status 2, one line.
 */
import { readFileSync } from 'node:fs';
import { UblkControl, UblkError, stateName, type DevInfo, type DevParams } from '../ublk/control.js';
import { TargetError } from '../ublk/target.js';
import { UBLK_FEATURES, ublkFeatureNames } from '../ublk/abi.js';
import { UBLK_MAX_DEV_ID } from '../ublk/server.js';
import { loadTarget, targetNames } from '../targets/index.js';
import { parseOptions, UsageError } from '../targets/options.js';
import { SysError } from '../libc/index.js';
import { add, setDevicePrinter } from './add.js';
import { serve, type ServeConfig } from './serve.js';
import { RunDir, type DeviceState } from './run-dir.js';

const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };

const USAGE = `usage: ublk <command> [options]

Linux userspace block devices (ublk), served from TypeScript over io_uring.

commands:
  add -t TYPE [-n ID] [-q QUEUES] [-d DEPTH] [--max-io-bytes BYTES] [--foreground]
      [--start-timeout SECONDS] [target options]
                          create /dev/ublkbID served by a background process (or this one)
  del -n ID | -a [--async]
                          stop and delete one device or all of them
  list [-n ID] [-v] [--json]
                          show devices
  features [--json]       the ublk features this kernel supports
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
      case 'list':
        return list(rest);
      case 'features':
        return features(rest);
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
  if (!t) throw new UsageError(`unknown target '${type}' (targets: ${targetNames.join(', ')}, or a module path)`);
  out(`ublk add -t ${type} [common options] [target options]\n\ntarget options:\n${t.def.usage}`);
  return 0;
}

async function del(argv: string[]): Promise<number> {
  const { values } = parseOptions('del', argv, [
    { key: 'all', names: ['-a', '--all'], kind: 'flag' },
    { key: 'async', names: ['--async'], kind: 'flag' },
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
        ctrl.stopDev(id);
        // Before DEL_DEV: until it returns the id is still this device's, so the state file
        // cannot be a new device's yet (and it is removed only if it names this server).
        if (st) runDir.removeState(id, st.pid);
        ctrl.delDev(id, values.async === true);
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
    state: stateName(info.state),
    ublkc: `/dev/ublkc${info.devId}`,
    ublkb: `/dev/ublkb${info.devId}`,
    target: state ? { name: state.target, options: state.targetOptions, describe: state.describe } : undefined,
    log: state?.log,
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
      if (values.verbose) {
        for (let q = 0; q < info.nrHwQueues; q++) {
          let aff = '';
          try { aff = ctrl.queueAffinity(id, q).join(' '); } catch { aff = '?'; }
          out(`\tqueue ${q}: affinity(${aff} )\n`);
        }
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
