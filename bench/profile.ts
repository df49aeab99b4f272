/**
 * `npm run bench:profile`: a CPU profile of our server under load, in the test VM, as a table of
 * the functions where each thread spends its time (self time, V8's sampling profiler).
 *
 *   npm run bench:profile -- [-t null|loop|mem|nbd] [--nbd tcp|unix] [--rw randread] [--qd 32] [--rate IOPS]
 *                            [--seconds S] [--kernel lts|newest] [--top N] [--keep DIR] [-- ADD ARGS...]
 *
 * Inside the VM it starts `node --cpu-prof bin/ublk.js add -t TARGET --foreground ...` (V8
 * profiles the main thread and every queue thread, and writes one .cpuprofile per thread when
 * it exits), drives the device with fio (4 KiB, io_uring, O_DIRECT; at a fixed rate with
 * --rate), deletes the device and prints each thread's top functions. loop serves a 512 MiB
 * file on ext4 on brd; nbd reaches a 512 MiB nbdkit memory server on loopback TCP or a Unix
 * socket (`--nbd`, default tcp). The guest cannot write to the project, so `--keep DIR` copies
 * the raw profiles to a guest directory only; the table is the output. Off the VM (a kernel
 * with ublk_drv, as root) it runs directly: `UBLK_VM=1 node --import tsx bench/profile.ts`.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, writeFileSync, cpSync, existsSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { PORT, SOCK, startNbdkit } from './ublk-nbd.js';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const all = process.argv.slice(2);
const dd = all.indexOf('--');
const args = dd >= 0 ? all.slice(0, dd) : all;
const addArgs = dd >= 0 ? all.slice(dd + 1) : [];
const opt = (name: string, dflt: string) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] ?? dflt : dflt;
};

if (process.env.UBLK_VM !== '1') {
  const r = spawnSync(process.execPath, ['--import', 'tsx', join(root, 'scripts', 'vm.ts'),
    '--kernel', opt('--kernel', 'lts'), '--cpus', opt('--cpus', '2'), '--mem', '4096', '--timeout', '1200', '--',
    'node', '--import', 'tsx', 'bench/profile.ts', ...all], { stdio: 'inherit' });
  process.exit(r.status ?? 1);
}

const target = opt('-t', 'null');
const rw = opt('--rw', 'randread');
const qd = opt('--qd', '32');
const rate = opt('--rate', '');
const seconds = opt('--seconds', '10');
const top = Number(opt('--top', '25'));
const KROOT = process.env.UBLK_VM_KROOT;
const sh = (cmd: string, a: string[]) => execFileSync(cmd, a, { encoding: 'utf8' });

let targetArgs: string[] = [];
const mnt = '/tmp/ublk-profile-ext4';
if (target === 'loop') {
  spawnSync('rmmod', ['brd']);
  sh('modprobe', [...(KROOT ? ['-d', KROOT] : []), 'brd', 'rd_nr=1', `rd_size=${640 * 1024}`]);
  sh('mkfs.ext4', ['-q', '/dev/ram0']);
  sh('mkdir', ['-p', mnt]);
  sh('mount', ['/dev/ram0', mnt]);
  sh('dd', ['if=/dev/zero', `of=${mnt}/disk.img`, 'bs=1M', 'count=512', 'status=none']);
  targetArgs = ['-f', `${mnt}/disk.img`];
} else if (target === 'mem') {
  targetArgs = ['-s', '512M'];
}
let nbdkit: ReturnType<typeof spawn> | undefined;
if (target === 'nbd') {
  const unix = opt('--nbd', 'tcp') === 'unix';
  nbdkit = startNbdkit(unix ? 'unix' : 'tcp', 512);
  targetArgs = unix ? ['--socket', SOCK] : ['--host', '127.0.0.1', '--port', String(PORT)];
}

const profDir = mkdtempSync('/tmp/ublk-cpuprof-');
const server = spawn(process.execPath, ['--cpu-prof', `--cpu-prof-dir=${profDir}`, join(root, 'bin', 'ublk.js'), 'add', '-t', target,
  '--foreground', ...targetArgs, ...addArgs], { stdio: ['ignore', 'pipe', 'inherit'] });
const line = await new Promise<string>((res, rej) => {
  createInterface({ input: server.stdout }).once('line', res);
  server.once('exit', (code) => rej(new Error(`the server exited (${code}) before its device was ready`)));
});
const id = Number(/dev id (\d+)/.exec(line)![1]);
const dev = `/dev/ublkb${id}`;
writeFileSync(`/sys/block/ublkb${id}/queue/scheduler`, 'none');
process.stderr.write(`profile: ${dev} (${target}) served by pid ${server.pid}; fio ${rw} QD ${qd}${rate ? ` at ${rate} IOPS` : ''} for ${seconds} s\n`);
const fio = sh('fio', ['--name=p', `--filename=${dev}`, `--rw=${rw}`, '--bs=4k', `--iodepth=${qd}`, '--ioengine=io_uring', '--direct=1',
  '--time_based', `--runtime=${seconds}`, ...(rate ? [`--rate_iops=${rate}`] : []), '--output-format=terse', '--terse-version=3']);
const f = fio.trim().split(';');
process.stderr.write(`profile: fio: ${Number(f[7]) + Number(f[48])} IOPS\n`);
const exited = new Promise<void>((res) => server.once('exit', () => res()));
sh(process.execPath, [join(root, 'bin', 'ublk.js'), 'del', '-n', String(id)]);
await exited;
nbdkit?.kill();
if (target === 'loop') {
  sh('umount', [mnt]);
  spawnSync('rmmod', ['brd']);
}

interface Node { id: number; callFrame: { functionName: string; url: string; lineNumber: number }; children?: number[] }
interface Profile { nodes: Node[]; samples: number[]; timeDeltas: number[] }

const files = readdirSync(profDir).filter((n) => n.endsWith('.cpuprofile')).sort();
for (const name of files) {
  const p = JSON.parse(readFileSync(join(profDir, name), 'utf8')) as Profile;
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const self = new Map<string, number>();
  let total = 0;
  for (let i = 0; i < p.samples.length; i++) {
    const n = byId.get(p.samples[i]!)!;
    const dt = p.timeDeltas[i] ?? 0;
    total += dt;
    const url = n.callFrame.url.replace(/^file:\/\//, '').replace(`${root}/`, '');
    const key = `${n.callFrame.functionName || '(anonymous)'} ${url ? `${url}:${n.callFrame.lineNumber + 1}` : ''}`.trim();
    self.set(key, (self.get(key) ?? 0) + dt);
  }
  const idle = self.get('(idle)') ?? 0;
  const busy = total - idle;
  if (busy < total * 0.01) continue; // a thread that only waited: the main thread under load
  console.log(`\n${name}: ${(total / 1e6).toFixed(1)} s sampled, ${(busy / 1e6).toFixed(2)} s not idle (time in a blocking system call counts as not idle: "(program)" is native code, koffi and the kernel)\n`);
  console.log('| self ms | % of not idle | function |');
  console.log('|---|---|---|');
  for (const [key, t] of [...self].filter(([key]) => key !== '(idle)').sort((a, b) => b[1] - a[1]).slice(0, top)) {
    console.log(`| ${(t / 1000).toFixed(0)} | ${((100 * t) / busy).toFixed(1)} | \`${key}\` |`);
  }
}
const keep = opt('--keep', '');
if (keep) {
  cpSync(profDir, keep, { recursive: true });
  process.stderr.write(`profile: raw profiles in ${keep}\n`);
} else if (existsSync(profDir)) {
  spawnSync('rm', ['-rf', profDir]);
}
