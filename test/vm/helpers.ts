/**
 * Helpers for the tests that run inside the VM: the CLI, fio, and waiting for the kernel.
 */
import { spawn, spawnSync } from 'node:child_process';
import { createServer } from 'node:net';
import { existsSync, mkdirSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import type { Test } from 'tap';
import { UblkControl } from '../../src/ublk/control.js';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The checkout: the nearest directory above this file with a package.json (this file may run compiled, from build/vm). */
export const ROOT = ((): string => {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json'))) dir = dirname(dir);
  return dir;
})();

/** '.ts' when the suite runs through tsx, '.js' when it runs compiled (tsconfig.vm.json). */
export const EXT = import.meta.url.endsWith('.ts') ? '.ts' : '.js';

/** Node's arguments for running a sibling module of this suite (through tsx only when it is TypeScript). */
export const nodeArgsFor = (url: URL): string[] => (EXT === '.ts' ? ['--import', 'tsx', fileURLToPath(url)] : [fileURLToPath(url)]);
const BIN = join(ROOT, 'bin', 'ublk.js');

export interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `ublk ARGS...` (the real CLI, compiled) and returns its status and output. */
export function ublk(...args: string[]): Run {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/**
 * `cmd ARGS...` in the background, its output collected: `done` resolves when it exits, and
 * `ended()` says whether it has (for loops that must keep serving the device meanwhile).
 */
export function spawnCollecting(cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env) {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
  let stdout = '';
  let stderr = '';
  let exited = false;
  child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
  child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
  const done = new Promise<{ code: number | null; stdout: string; stderr: string }>((r) => child.on('close', (code) => {
    exited = true;
    r({ code, stdout, stderr });
  }));
  return { child, done, ended: () => exited };
}

/** `ublk ARGS...` in the background, its output collected: `done` resolves when it exits. */
export function ublkInBackground(args: string[], env: NodeJS.ProcessEnv = process.env) {
  return spawnCollecting(process.execPath, [BIN, ...args], env);
}

/** `ublk add ...` that must succeed; returns the new device id. */
export function addDevice(...args: string[]): number {
  const r = ublk('add', ...args);
  if (r.code !== 0) throw new Error(`ublk add ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
  const m = r.stdout.match(/^dev id (\d+):/m);
  if (!m) throw new Error(`ublk add printed no device: ${r.stdout}`);
  return Number(m[1]);
}

/** Device ids present in /dev (char devices): the CLI's own list. */
export const ublkIds = (): number[] => UblkControl.listIds();

/**
 * Every VM test file's afterEach: whatever a test leaves behind would poison the next one, so it
 * is removed, and the test that left it fails saying so.
 */
export function noDeviceLeftBehind(): void {
  const left = ublkIds();
  if (left.length > 0) {
    ublk('del', '-a');
    throw new Error(`devices left behind: ${left.join(', ')}`);
  }
}

export interface FioResult {
  code: number;
  error: number;
  ios: number;
  iops: number;
  raw: string;
}

/** Runs one fio job on `dev` and returns its status, error and I/O count. */
export function fio(dev: string, rw: string, opts: { bs?: string; qd?: number; engine?: string; seconds?: number; extra?: string[] } = {}): FioResult {
  const args = fioArgs(dev, rw, opts);
  const r = spawnSync('fio', args, { encoding: 'utf8', timeout: 180_000 });
  return parseFio(r.status ?? -1, r.stdout);
}

export function fioArgs(dev: string, rw: string, opts: { bs?: string; qd?: number; engine?: string; seconds?: number; extra?: string[] }): string[] {
  return [
    '--name=t', `--filename=${dev}`, `--rw=${rw}`, `--bs=${opts.bs ?? '4k'}`, `--iodepth=${opts.qd ?? 32}`,
    `--ioengine=${opts.engine ?? 'io_uring'}`, '--direct=1', `--runtime=${opts.seconds ?? 2}`, '--time_based',
    '--output-format=json', ...(opts.extra ?? []),
  ];
}

export function parseFio(code: number, stdout: string): FioResult {
  try {
    const j = JSON.parse(stdout.slice(stdout.indexOf('{'))) as { jobs: Array<{ error: number; read: { total_ios: number; iops: number }; write: { total_ios: number; iops: number } }> };
    const job = j.jobs[0]!;
    return { code, error: job.error, ios: job.read.total_ios + job.write.total_ios, iops: job.read.iops + job.write.iops, raw: stdout };
  } catch {
    return { code, error: -1, ios: 0, iops: 0, raw: stdout };
  }
}

/** Starts fio in the background; resolves with its result when it ends. */
export function fioBackground(dev: string, rw: string, opts: Parameters<typeof fioArgs>[2]): { done: Promise<FioResult>; pid: number } {
  const child = spawn('fio', fioArgs(dev, rw, opts), { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
  child.stderr.resume();
  const done = new Promise<FioResult>((res) => child.on('close', (code) => res(parseFio(code ?? -1, out))));
  return { done, pid: child.pid! };
}

/** Polls `cond` every 50 ms until true or `ms` passed; returns whether it became true. */
export async function waitFor(cond: () => boolean, ms: number): Promise<boolean> {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return cond();
}

export const exists = (p: string) => existsSync(p);

/** Whether process `pid` is alive. */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

export interface VerifyResult { code: number; error: number; written: number; verified: number; stderr: string }

/**
 * fio writes `total` bytes of random blocks with crc32c headers, then reads every one back and
 * checks it, at QD `qd` (default 32). With 2 jobs each job owns half of the range and runs on
 * a CPU of its own, so that a 2-queue device gets both queues used.
 */
export function fioVerify(dev: string, o: { bs: string; engine: string; jobs: number; total: number; qd?: number; verifyOnly?: boolean; bsrange?: string }): VerifyResult {
  const per = o.total / o.jobs;
  const args = [
    `--filename=${dev}`, '--rw=randwrite', `--bs=${o.bs}`, `--iodepth=${o.qd ?? 32}`, `--ioengine=${o.engine}`, '--direct=1',
    `--size=${per}`, '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0',
    '--output-format=json', ...(o.verifyOnly ? ['--verify_only=1'] : []), ...(o.bsrange ? [`--bsrange=${o.bsrange}`] : []),
  ];
  for (let j = 0; j < o.jobs; j++) args.push(`--name=j${j}`, `--offset=${j * per}`, `--cpus_allowed=${j === 0 ? 0 : 3}`);
  const r = spawnSync('fio', args, { encoding: 'utf8', timeout: 600_000 });
  try {
    const j = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: Array<{ error: number; read: { io_bytes: number }; write: { io_bytes: number } }> };
    return {
      code: r.status ?? -1,
      error: j.jobs.reduce((e, x) => e || x.error, 0),
      written: j.jobs.reduce((s, x) => s + x.write.io_bytes, 0),
      verified: j.jobs.reduce((s, x) => s + x.read.io_bytes, 0),
      stderr: r.stderr,
    };
  } catch {
    return { code: r.status ?? -1, error: -1, written: 0, verified: 0, stderr: `${r.stderr}\n${r.stdout}` };
  }
}

export interface ListedDevice { dev_id: number; state: string; daemon_pid: number; server: boolean; flags: number; dev_capacity: number; log?: string }
export function listed(id: number): ListedDevice {
  const r = ublk('list', '-n', String(id), '--json');
  if (r.code !== 0) throw new Error(`ublk list -n ${id}: ${r.stderr}`);
  return (JSON.parse(r.stdout) as ListedDevice[])[0]!;
}
/** What device `id`'s servers wrote to its log ('' if it has none, or it is gone). */
export function deviceLog(id: number): string {
  const log = listed(id).log;
  return log && existsSync(log) ? readFileSync(log, 'utf8') : '';
}
export const serverPid = (id: number) => (JSON.parse(readFileSync(join(process.env.UBLK_RUN_DIR || '/run/ublk', `ublkb${id}.json`), 'utf8')) as { pid: number }).pid;
export const state = (id: number) => { try { return listed(id).state; } catch { return 'GONE'; } };

/** fio in the background; resolves with its result. */
export function fioJob(dev: string, args: string[]): { done: Promise<FioResult & { stderr: string }>; pid: number } {
  const job = spawnCollecting('fio', ['--name=t', `--filename=${dev}`, '--output-format=json', ...args]);
  return { done: job.done.then((r) => ({ ...parseFio(r.code ?? -1, r.stdout), stderr: r.stderr })), pid: job.child.pid! };
}
export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Kills device `id`'s server with SIGKILL, waits until the kernel holds the device for the next one. */
export async function killServer(t: { fail(msg: string): void }, id: number, expect = 'QUIESCED'): Promise<number> {
  const pid = serverPid(id);
  process.kill(pid, 'SIGKILL');
  const ok = await waitFor(() => !alive(pid) && state(id) === expect, 30_000);
  if (!ok) t.fail(`device ${id} did not reach ${expect} after its server ${pid} was killed (state ${state(id)})`);
  return pid;
}

/** A command's status and output (synchronous: not for devices this thread's event loop serves). */
export function sh(cmd: string, args: string[]) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 300_000 });
  return { code: r.status ?? -1, out: r.stdout ?? '', err: r.stderr ?? '' };
}

/**
 * ext4 through a loop device over `file` (added with `addArgs`; or the device `target` names,
 * whose data must live in `file`): mkfs, a tree of files (this
 * project's sources and 300 files of random sizes in nested directories), umount, del; then
 * e2fsck -fn of the backing file must be clean, and a device added again the same way must show
 * every file with the same checksum. Removes `file` at the end.
 */
export function ext4RoundTrip(t: Test, file: string, mnt: string, addArgs: string[], target: string[] = ['-t', 'loop', '-f', file]): void {
  mkdirSync(mnt, { recursive: true });
  const id = addDevice(...target, ...addArgs);
  const dev = `/dev/ublkb${id}`;
  let r = sh('mkfs.ext4', ['-q', '-F', dev]);
  t.equal(r.code, 0, `mkfs.ext4 ${r.err}`);
  r = sh('mount', [dev, mnt]);
  t.equal(r.code, 0, `mount ${r.err}`);
  r = sh('cp', ['-r', join(ROOT, 'src'), join(ROOT, 'test'), mnt]);
  t.equal(r.code, 0, `cp ${r.err}`);
  for (let i = 0; i < 300; i++) {
    const d = join(mnt, 'data', String(i % 17), String(i % 5));
    mkdirSync(d, { recursive: true });
    writeFileSync(join(d, `f${i}`), randomBytes(((i * 7919) % 200_000) + 1));
  }
  const sums = () => sh('sh', ['-c', 'cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum', 'sh', mnt]).out;
  const before = sums();
  t.ok(before.split('\n').length > 300, `${before.split('\n').length - 1} files checksummed`);
  t.equal(sh('sync', []).code, 0, 'sync');
  t.equal(sh('umount', [mnt]).code, 0, 'umount');
  t.equal(ublk('del', '-n', String(id)).code, 0, 'del');
  r = sh('e2fsck', ['-fn', file]);
  t.equal(r.code, 0, `e2fsck -fn on the backing file: clean (${r.out.trim().split('\n').pop()})`);
  const again = addDevice(...target, ...addArgs);
  r = sh('mount', [`/dev/ublkb${again}`, mnt]);
  t.equal(r.code, 0, `mount again ${r.err}`);
  t.equal(sums(), before, 'every file has the same checksum');
  sh('umount', [mnt]);
  t.equal(ublk('del', '-n', String(again)).code, 0, 'del again');
  rmSync(file);
}

/** An empty sparse file of `size` bytes at `dir/name`. */
export function sparseFile(dir: string, name: string, size: number): string {
  const f = join(dir, name);
  writeFileSync(f, '');
  truncateSync(f, size);
  return f;
}

/** `ublk del -n id`, then the device's server must exit and its char device go. */
export async function deleteDevice(t: Test, id: number): Promise<void> {
  const pid = serverPid(id);
  t.equal(ublk('del', '-n', String(id)).code, 0, `del ${id}`);
  t.ok(await waitFor(() => !alive(pid), 20_000), 'its server exited');
  t.notOk(exists(`/dev/ublkc${id}`), 'no device left');
}

/** A TCP port on 127.0.0.1 nobody listens on now (for a server a test starts). */
export function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => res(port));
    });
  });
}

/** No UBLK_VM_SUITE (a file run by hand), or `all`: every test runs. */
const everyTest = (): boolean => !process.env.UBLK_VM_SUITE || process.env.UBLK_VM_SUITE === 'all';

/** The two kernels `npm test` runs the VM suite on (scripts/test.mjs sets UBLK_VM_SUITE to one). */
export type SuiteKernel = 'lts' | 'newest';

/**
 * Test options that run a test on one of `npm test`'s two kernels only: for a test whose
 * kernel-facing part other tests exercise on both (it checks our own code: option and error
 * handling, a target's logic, a state file), so that each kernel's run stays inside its time
 * budget. Elsewhere it is reported as skipped, naming the kernel that runs it. A file run by
 * hand (UBLK_VM_SUITE unset) and `UBLK_VM_SUITE=all` run every test.
 */
export function onKernel(kernel: SuiteKernel): { skip: string | false } {
  if (everyTest() || process.env.UBLK_VM_SUITE === kernel) return { skip: false };
  return { skip: `npm test runs this on the ${kernel === 'lts' ? '6.12 LTS' : 'newest'} kernel (UBLK_VM_SUITE=all runs every test)` };
}

/**
 * Test options for a test that `npm test` leaves out on both kernels, for its time budget: one
 * whose path other tests in the suite already take (a second fio pattern, another file system
 * over the same target). `UBLK_VM_SUITE=all` runs it, as does a file run by hand.
 */
export function fullSuiteOnly(): { skip: string | false } {
  if (everyTest()) return { skip: false };
  return { skip: 'npm test leaves this out for its time budget (UBLK_VM_SUITE=all runs every test)' };
}
