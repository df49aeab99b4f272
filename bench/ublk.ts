/**
 * `npm run bench:ublk`: our ublk targets against the kernel's null_blk, inside the test VM, in
 * one boot, as ratios (absolute IOPS under software emulation mean little; ratios within one
 * boot do).
 *
 * On the host this boots the VM (Linux 6.12 LTS, 2 vCPUs unless --kernel/--cpus say otherwise)
 * and runs itself inside. Inside, for 1 and 2 queues and 4 KiB randread/randwrite at QD 1, 32
 * and 128 (fio io_uring, one job per queue, scheduler none everywhere), it measures:
 *   - ours: `ublk add -t null` (ring-native target)
 *   - async: the same null device as an AsyncTarget on the event loop (async-target.ts)
 *   - null_blk: the kernel's, with the same queue count and depth
 * and prints IOPS and the ratios ours/null_blk and async/ours.
 *
 *   npm run bench:ublk -- [--kernel lts|newest] [--cpus N] [--seconds S] [--json]
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { writeFileSync, existsSync, readdirSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const args = process.argv.slice(2);
const opt = (name: string, dflt: string) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] ?? dflt : dflt;
};

if (process.env.UBLK_VM !== '1') {
  // Host side: run this file in the VM.
  const r = spawnSync(process.execPath, ['--import', 'tsx', join(root, 'scripts', 'vm.ts'),
    '--kernel', opt('--kernel', 'lts'), '--cpus', opt('--cpus', '2'), '--timeout', '2400', '--',
    'node', '--import', 'tsx', 'bench/ublk.ts', ...args], { stdio: 'inherit' });
  process.exit(r.status ?? 1);
}

const seconds = Number(opt('--seconds', '5'));
const json = args.includes('--json');
const KROOT = process.env.UBLK_VM_KROOT!;
const sh = (cmd: string, a: string[]) => execFileSync(cmd, a, { encoding: 'utf8' });

function setNone(dev: string): void {
  const p = `/sys/block/${dev}/queue/scheduler`;
  if (existsSync(p)) writeFileSync(p, 'none');
}

function runFio(dev: string, rw: string, qd: number, jobs: number): number {
  const out = sh('fio', ['--name=b', `--filename=/dev/${dev}`, `--rw=${rw}`, '--bs=4k', `--iodepth=${qd}`,
    '--ioengine=io_uring', '--direct=1', `--numjobs=${jobs}`, '--group_reporting', '--time_based',
    `--runtime=${seconds}`, '--ramp_time=1', '--output-format=json']);
  const j = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: Array<{ error: number; read: { iops: number }; write: { iops: number } }> };
  const job = j.jobs[0]!;
  if (job.error) throw new Error(`fio on ${dev}: error ${job.error}`);
  return job.read.iops + job.write.iops;
}

function ublkAdd(queues: number): number {
  const out = sh(process.execPath, [join(root, 'bin', 'ublk.js'), 'add', '-t', 'null', '-q', String(queues), '-d', '128']);
  return Number(out.match(/dev id (\d+)/)![1]);
}

async function asyncAdd(queues: number): Promise<{ devId: number; stop: () => Promise<void> }> {
  const child = spawn(process.execPath, ['--import', 'tsx', join(root, 'bench', 'ublk-async-null.ts'), String(queues)], { stdio: ['ignore', 'pipe', 'inherit'] });
  const line = await new Promise<string>((res) => createInterface({ input: child.stdout }).once('line', res));
  const { devId } = JSON.parse(line) as { devId: number };
  return { devId, stop: () => new Promise((res) => { child.once('exit', () => res()); child.kill('SIGTERM'); }) };
}

interface Row { key: string; queues: number; rw: string; qd: number; ours: number; async: number; nullBlk: number }
const rows: Row[] = [];
for (const queues of [1, 2]) {
  spawnSync('rmmod', ['null_blk']);
  sh('modprobe', ['-d', KROOT, 'null_blk', 'nr_devices=1', 'queue_mode=2', `submit_queues=${queues}`, 'hw_queue_depth=128', 'irqmode=0', 'gb=250', 'bs=512']);
  setNone('nullb0');
  const id = ublkAdd(queues);
  setNone(`ublkb${id}`);
  const a = await asyncAdd(queues);
  setNone(`ublkb${a.devId}`);
  for (const rw of ['randread', 'randwrite']) {
    for (const qd of [1, 32, 128]) {
      // Interleaved, same boot: ours, null_blk, async.
      const ours = runFio(`ublkb${id}`, rw, qd, queues);
      const nullBlk = runFio('nullb0', rw, qd, queues);
      const asyncIops = runFio(`ublkb${a.devId}`, rw, qd, queues);
      const row = { key: `q${queues}_${rw}_qd${qd}`, queues, rw, qd, ours, async: asyncIops, nullBlk };
      rows.push(row);
      process.stderr.write(`bench: ${row.key}: ours ${Math.round(ours)} null_blk ${Math.round(nullBlk)} async ${Math.round(asyncIops)} IOPS\n`);
    }
  }
  await a.stop();
  sh(process.execPath, [join(root, 'bin', 'ublk.js'), 'del', '-n', String(id)]);
}
spawnSync('rmmod', ['null_blk']);

const k = (n: number) => `${(n / 1000).toFixed(1)}k`;
console.log(`\nublk null target vs null_blk, ${process.env.UBLK_VM_PACKAGE}, ${readdirSync('/sys/devices/system/cpu').filter((d) => /^cpu\d+$/.test(d)).length} vCPUs, fio io_uring 4k, ${seconds} s per point, one boot\n`);
console.log('| queues x jobs | workload | QD | ours IOPS | null_blk IOPS | ours / null_blk | async IOPS | async / ours |');
console.log('|---|---|---|---|---|---|---|---|');
for (const r of rows) {
  console.log(`| ${r.queues} | ${r.rw} | ${r.qd} | ${k(r.ours)} | ${k(r.nullBlk)} | **${(r.ours / r.nullBlk).toFixed(2)}x** | ${k(r.async)} | ${(r.async / r.ours).toFixed(2)}x |`);
}
if (json) {
  const o: Record<string, number> = {};
  for (const r of rows) {
    o[`null_${r.key}_vs_null_blk`] = Number((r.ours / r.nullBlk).toFixed(3));
    o[`async_${r.key}_vs_null`] = Number((r.async / r.ours).toFixed(3));
  }
  console.log(JSON.stringify(o));
}
