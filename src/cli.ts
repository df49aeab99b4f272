/**
 * The `ublk` command line: add, del, list, features, help. Output follows ublksrv's and the
 * kernel selftests' kublk dialect so existing scripts keep working; `--json` is the stable
 * machine format.
 */
import { spawn } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { UblkControl, UblkError, stateName, type DevInfo, type DevParams } from './ublk/control.js';
import { UblkServer } from './ublk/server.js';
import { TargetError } from './ublk/target.js';
import { UBLK_FEATURES } from './ublk/abi.js';
import { loadTarget, targetNames } from './targets/index.js';
import { parseCount, parseSize, UsageError } from './targets/options.js';
import { SysError } from './uring/index.js';

const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };
const RUN_DIR = process.env.UBLK_RUN_DIR ?? '/run/ublk';

const USAGE = `usage: ublk <command> [options]

Linux userspace block devices (ublk), served from TypeScript over io_uring.

commands:
  add -t TYPE [-n ID] [-q QUEUES] [-d DEPTH] [-b MAX_IO_BYTES] [--foreground] [target options]
                          create /dev/ublkbID served by a background process (or this one)
  del -n ID | -a [--async]
                          stop and delete one device or all of them
  list [-n ID] [-v] [--json]
                          show devices
  features [--json]       the ublk features this kernel supports
  help [-t TYPE]          this text, or a target's own options
  --version               print the version

targets: ${targetNames.join(', ')}
`;

/** What a background server needs to know (passed as JSON on its command line). */
interface ServeConfig {
  target: string;
  targetOptions: unknown;
  devId?: number;
  queues: number;
  depth: number;
  maxIoBytes?: number;
}

/** Saved under the run directory so `list -v` (and a later `recover`) can find the server. */
interface DeviceState extends ServeConfig {
  devId: number;
  pid: number;
  log?: string;
}

const statePath = (id: number) => join(RUN_DIR, `ublkb${id}.json`);

function readState(id: number): DeviceState | undefined {
  try {
    return JSON.parse(readFileSync(statePath(id), 'utf8')) as DeviceState;
  } catch {
    return undefined;
  }
}

/** Runs the CLI; resolves to the exit status (2 for usage errors, like ublksrv). */
export async function main(argv: string[]): Promise<number> {
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
        process.stdout.write(`ublk ${pkg.version}\n`);
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
        return await serve(JSON.parse(rest[0] ?? '{}') as ServeConfig, rest[1]);
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
  const i = argv.indexOf('-t');
  if (i < 0) {
    process.stdout.write(USAGE);
    return 0;
  }
  const t = await loadTarget(argv[i + 1] ?? '');
  if (!t) throw new UsageError(`unknown target '${argv[i + 1] ?? ''}' (targets: ${targetNames.join(', ')})`);
  process.stdout.write(`ublk add -t ${t.def.name} [common options] [target options]\n\ntarget options:\n${t.def.usage}`);
  return 0;
}

async function add(argv: string[]): Promise<number> {
  let type: string | undefined;
  let foreground = false;
  const cfg: Partial<ServeConfig> = { queues: 1, depth: 128 };
  const targetArgs: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const next = () => argv[++i];
    if (a === '-t' || a === '--type') type = next();
    else if (a === '-n' || a === '--number') cfg.devId = parseCount(next(), a, 0, 0x7fffffff);
    else if (a === '-q' || a === '--queues') cfg.queues = parseCount(next(), a, 1, 4096);
    else if (a === '-d' || a === '--depth') cfg.depth = parseCount(next(), a, 1, 4096);
    else if (a === '-b' || a === '--max-io-bytes') {
      const b = parseSize(next(), a);
      if ((b & (b - 1)) !== 0 || b < 4096 || b > 32 * 2 ** 20) {
        throw new UsageError(`${a} must be a power of two from 4K to 32M, got ${b}`);
      }
      cfg.maxIoBytes = b;
    } else if (a === '--foreground') foreground = true;
    else targetArgs.push(a);
  }
  if (!type) throw new UsageError(`add needs -t TYPE (targets: ${targetNames.join(', ')})`);
  const t = await loadTarget(type);
  if (!t) throw new UsageError(`unknown target '${type}' (targets: ${targetNames.join(', ')})`);
  cfg.target = type;
  cfg.targetOptions = t.def.parseArgs(targetArgs);
  // Validate the target's options here, before any device exists (the server does it again).
  t.def.prepare(cfg.targetOptions).release?.();
  if (cfg.devId !== undefined && existsSync(`/dev/ublkc${cfg.devId}`)) {
    throw new UblkError(`device id ${cfg.devId} is taken (ublk list shows the devices)`);
  }
  if (foreground) return serve(cfg as ServeConfig);
  return addDetached(cfg as ServeConfig);
}

/** Starts a detached server process and waits until it reports the device live (or failed). */
async function addDetached(cfg: ServeConfig): Promise<number> {
  mkdirSync(join(RUN_DIR, 'log'), { recursive: true });
  const log = join(RUN_DIR, 'log', `server-${Date.now()}-${process.pid}.log`);
  const fd = openSync(log, 'a');
  const bin = fileURLToPath(new URL('../bin/ublk.js', import.meta.url));
  const child = spawn(process.execPath, [...process.execArgv, bin, '__serve', JSON.stringify(cfg), log], {
    detached: true,
    stdio: ['ignore', fd, fd, 'ipc'],
  });
  closeSync(fd);
  const msg = await new Promise<{ ok: boolean; devId?: number; error?: string }>((resolve) => {
    child.once('message', (m) => resolve(m as { ok: boolean }));
    child.once('exit', (code) => resolve({ ok: false, error: `the server exited (${code}) before the device was ready; its log: ${log}` }));
  });
  child.removeAllListeners();
  if (child.connected) child.disconnect();
  child.unref();
  if (!msg.ok) {
    process.stderr.write(`ublk: ${msg.error}\n`);
    return 1;
  }
  return list(['-n', String(msg.devId)]);
}

/** The server: creates the device, serves it until stopped, cleans up. */
async function serve(cfg: ServeConfig, log?: string): Promise<number> {
  const t = await loadTarget(cfg.target);
  if (!t) throw new UsageError(`unknown target '${cfg.target}'`);
  let server: UblkServer;
  try {
    server = await UblkServer.start({
      target: t.def, targetUrl: t.url, targetOptions: cfg.targetOptions,
      devId: cfg.devId, queues: cfg.queues, depth: cfg.depth, maxIoBytes: cfg.maxIoBytes,
    });
  } catch (e) {
    if (process.send) {
      process.send({ ok: false, error: (e as Error).message });
      process.disconnect?.();
      return 1;
    }
    throw e;
  }
  const id = server.devId;
  if (server.info.nrHwQueues < cfg.queues) {
    process.stderr.write(`ublk: device ${id}: the kernel granted ${server.info.nrHwQueues} of ${cfg.queues} queues (at most one per possible CPU)\n`);
  }
  mkdirSync(RUN_DIR, { recursive: true });
  const state: DeviceState = { ...cfg, devId: id, pid: process.pid, log };
  writeFileSync(statePath(id), `${JSON.stringify(state, null, 2)}\n`);
  let stopping = false;
  const stop = (sig: string) => {
    if (stopping) return;
    stopping = true;
    process.stderr.write(`ublk: ${sig}: stopping device ${id}\n`);
    server.stop().catch((e) => process.stderr.write(`ublk: stopping device ${id}: ${(e as Error).message}\n`));
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  if (process.send) {
    process.send({ ok: true, devId: id });
    process.disconnect?.();
  } else {
    list(['-n', String(id)]);
  }
  // Finished: stopped by a signal (stop() deletes the device) or by `ublk del` elsewhere.
  const served = await server.finished.catch((e: Error) => {
    process.stderr.write(`ublk: device ${id}: a queue failed: ${e.message}\n`);
    return -1;
  });
  await server.stop().catch(() => undefined);
  rmSync(statePath(id), { force: true });
  process.stderr.write(`ublk: device ${id} stopped after ${served} requests\n`);
  return served < 0 ? 1 : 0;
}

async function del(argv: string[]): Promise<number> {
  let ids: number[] = [];
  let all = false;
  let async = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '-n' || a === '--number') ids.push(parseCount(argv[++i], a, 0, 0x7fffffff));
    else if (a === '-a' || a === '--all') all = true;
    else if (a === '--async') async = true;
    else throw new UsageError(`del: unknown option ${a}`);
  }
  if (all) ids = UblkControl.listIds();
  else if (ids.length === 0) throw new UsageError('del needs -n ID or -a');
  const ctrl = new UblkControl();
  let status = 0;
  try {
    for (const id of ids) {
      try {
        ctrl.stopDev(id);
        ctrl.delDev(id, async);
      } catch (e) {
        // With -a, a device that vanished meanwhile is not an error.
        if (all && e instanceof UblkError && (e.code === 'ENODEV' || e.code === 'ENOENT')) continue;
        process.stderr.write(`ublk: ${(e as Error).message}\n`);
        status = 1;
        continue;
      }
      const st = readState(id);
      if (st && !async) await waitForExit(st.pid, 10_000);
      rmSync(statePath(id), { force: true });
    }
  } finally {
    ctrl.close();
  }
  return status;
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
    target: state ? { name: state.target, options: state.targetOptions } : undefined,
  };
}

function list(argv: string[]): number {
  let ids: number[] | undefined;
  let verbose = false;
  let json = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '-n' || a === '--number') (ids ??= []).push(parseCount(argv[++i], a, 0, 0x7fffffff));
    else if (a === '-v' || a === '--verbose') verbose = true;
    else if (a === '--json') json = true;
    else throw new UsageError(`list: unknown option ${a}`);
  }
  const ctrl = new UblkControl();
  const out: ReturnType<typeof deviceJson>[] = [];
  let status = 0;
  try {
    for (const id of ids ?? UblkControl.listIds()) {
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
      const st = readState(id);
      const d = deviceJson(info, params, st);
      out.push(d);
      if (json) continue;
      // kublk / ublksrv dialect.
      process.stdout.write(`dev id ${d.dev_id}: nr_hw_queues ${d.nr_hw_queues} queue_depth ${d.queue_depth} block size ${d.block_size ?? 0} dev_capacity ${d.dev_capacity ?? 0}\n`);
      process.stdout.write(`\tmax rq size ${d.max_rq_size} daemon pid ${d.daemon_pid} flags 0x${d.flags.toString(16)} state ${d.state}\n`);
      if (verbose) {
        for (let q = 0; q < info.nrHwQueues; q++) {
          let aff = '';
          try { aff = ctrl.queueAffinity(id, q).join(' '); } catch { aff = '?'; }
          process.stdout.write(`\tqueue ${q}: affinity(${aff} )\n`);
        }
        if (st) process.stdout.write(`\ttarget ${JSON.stringify({ name: st.target, ...(st.targetOptions as object) })}\n`);
      }
    }
  } finally {
    ctrl.close();
  }
  if (json) process.stdout.write(`${JSON.stringify(out)}\n`);
  return status;
}

function features(argv: string[]): number {
  const json = argv.includes('--json');
  const ctrl = new UblkControl();
  let f: number;
  try {
    f = ctrl.features();
  } finally {
    ctrl.close();
  }
  const names: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    if (Math.floor(f / 2 ** bit) % 2 === 1) {
      names.push(UBLK_FEATURES.find((x) => x.bit === bit)?.name ?? `UBLK_F_BIT${bit} (newer than this tool)`);
    }
  }
  if (json) {
    process.stdout.write(`${JSON.stringify({ features: f, names })}\n`);
  } else {
    process.stdout.write(`ublk_drv features: 0x${f.toString(16)}\n`);
    for (const n of names) process.stdout.write(`\t${n}\n`);
  }
  return 0;
}


