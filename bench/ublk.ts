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
 * and prints IOPS and the ratios ours/null_blk and async/ours. The loop suite compares our loop
 * target with the kernel's loop driver (losetup --direct-io=on) over the same file (on tmpfs, and
 * on ext4 on a RAM disk), and our mem target with brd, at 1 queue and QD 1, 32 and 128.
 *
 *   npm run bench:ublk -- [--suite all|null|loop] [--kernel lts|newest] [--cpus N] [--seconds S] [--rounds N] [--json]
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
    '--kernel', opt('--kernel', 'lts'), '--cpus', opt('--cpus', '2'), '--mem', opt('--mem', '4096'), '--timeout', '2400', '--',
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

function ublkAdd(a: string[]): number {
  const out = sh(process.execPath, [join(root, 'bin', 'ublk.js'), 'add', ...a]);
  return Number(out.match(/dev id (\d+)/)![1]);
}
const ublkDel = (id: number) => sh(process.execPath, [join(root, 'bin', 'ublk.js'), 'del', '-n', String(id)]);

async function asyncAdd(queues: number): Promise<{ devId: number; stop: () => Promise<void> }> {
  const child = spawn(process.execPath, ['--import', 'tsx', join(root, 'bench', 'ublk-async-null.ts'), String(queues)], { stdio: ['ignore', 'pipe', 'inherit'] });
  const line = await new Promise<string>((res) => createInterface({ input: child.stdout }).once('line', res));
  const { devId } = JSON.parse(line) as { devId: number };
  return { devId, stop: () => new Promise((res) => { child.once('exit', () => res()); child.kill('SIGTERM'); }) };
}

interface Row { key: string; queues: number; rw: string; qd: number; ours: number; async: number; nullBlk: number }
async function nullSuite(): Promise<Record<string, number>> {
  const rows: Row[] = [];
  for (const queues of [1, 2]) {
    spawnSync('rmmod', ['null_blk']);
    sh('modprobe', ['-d', KROOT, 'null_blk', 'nr_devices=1', 'queue_mode=2', `submit_queues=${queues}`, 'hw_queue_depth=128', 'irqmode=0', 'gb=250', 'bs=512']);
    setNone('nullb0');
    const id = ublkAdd(['-t', 'null', '-q', String(queues), '-d', '128']);
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
    ublkDel(id);
  }
  spawnSync('rmmod', ['null_blk']);

  console.log(`\nublk null target vs null_blk, ${header()}\n`);
  console.log('| queues x jobs | workload | QD | ours IOPS | null_blk IOPS | ours / null_blk | async IOPS | async / ours |');
  console.log('|---|---|---|---|---|---|---|---|');
  const o: Record<string, number> = {};
  for (const r of rows) {
    console.log(`| ${r.queues} | ${r.rw} | ${r.qd} | ${k(r.ours)} | ${k(r.nullBlk)} | **${(r.ours / r.nullBlk).toFixed(2)}x** | ${k(r.async)} | ${(r.async / r.ours).toFixed(2)}x |`);
    o[`null_${r.key}_vs_null_blk`] = Number((r.ours / r.nullBlk).toFixed(3));
    o[`async_${r.key}_vs_null`] = Number((r.async / r.ours).toFixed(3));
  }
  return o;
}

/**
 * loop vs the kernel's loop driver (losetup --direct-io=on) over the same file, and mem vs brd:
 * 1 queue, 1 fio job, every device filled with data first so reads hit real data, points
 * interleaved. The loop pair runs over two backings: a file on tmpfs, and a file on ext4 on a
 * brd RAM disk (a disk file system, without a slow disk under it). `--rounds N` repeats the
 * whole interleaved sweep N times and reports each device's median IOPS per point.
 */
async function loopSuite(): Promise<Record<string, number>> {
  const size = 512;
  const rounds = Number(opt('--rounds', '1'));
  const tmpfsFile = '/tmp/ublk-bench.img';
  const mnt = '/tmp/ublk-bench-ext4';
  const ext4File = `${mnt}/ublk-bench.img`;
  sh('dd', ['if=/dev/urandom', `of=${tmpfsFile}`, 'bs=1M', `count=${size}`, 'status=none']);
  spawnSync('modprobe', ['-d', KROOT, 'loop']);
  spawnSync('rmmod', ['brd']);
  // ram0 for mem vs brd, ram1 for the ext4 backing (room for the file plus ext4's metadata).
  sh('modprobe', ['-d', KROOT, 'brd', 'rd_nr=2', `rd_size=${(size + 128) * 1024}`]);
  sh('mkfs.ext4', ['-q', '/dev/ram1']);
  sh('mkdir', ['-p', mnt]);
  sh('mount', ['/dev/ram1', mnt]);
  sh('cp', [tmpfsFile, ext4File]);
  sh('sync', []);
  // No cached pages over the file: O_DIRECT over cached pages is slower for both loops.
  writeFileSync('/proc/sys/vm/drop_caches', '3');
  const kloops: string[] = [];
  const ids: number[] = [];
  const pairs: Array<{ pair: string; ours: string; kernel: string }> = [];
  for (const [pair, file] of [['loop-tmpfs', tmpfsFile], ['loop-ext4', ext4File]] as const) {
    const kloop = sh('losetup', ['--find', '--show', '--direct-io=on', file]).trim().slice(5);
    kloops.push(kloop);
    setNone(kloop);
    const id = ublkAdd(['-t', 'loop', '-f', file]);
    ids.push(id);
    setNone(`ublkb${id}`);
    pairs.push({ pair, ours: `ublkb${id}`, kernel: kloop });
  }
  setNone('ram0');
  const mem = ublkAdd(['-t', 'mem', '-s', `${size}M`]);
  ids.push(mem);
  setNone(`ublkb${mem}`);
  for (const dev of ['ram0', `ublkb${mem}`]) sh('dd', [`if=${tmpfsFile}`, `of=/dev/${dev}`, 'bs=1M', 'oflag=direct', 'status=none']);
  pairs.push({ pair: 'mem', ours: `ublkb${mem}`, kernel: 'ram0' });

  const samples = new Map<string, { ours: number[]; kernel: number[] }>();
  for (let round = 0; round < rounds; round++) {
    for (const { pair, ours, kernel } of pairs) {
      for (const rw of ['randread', 'randwrite']) {
        for (const qd of [1, 32, 128]) {
          const x = runFio(ours, rw, qd, 1);
          const y = runFio(kernel, rw, qd, 1);
          const key = `${pair} ${rw} ${qd}`;
          const s = samples.get(key) ?? { ours: [], kernel: [] };
          s.ours.push(x);
          s.kernel.push(y);
          samples.set(key, s);
          process.stderr.write(`bench: round ${round + 1}/${rounds} ${pair} ${rw} QD${qd}: ours ${Math.round(x)} kernel ${Math.round(y)} IOPS\n`);
        }
      }
    }
  }
  for (const id of ids) ublkDel(id);
  for (const kloop of kloops) sh('losetup', ['-d', `/dev/${kloop}`]);
  sh('umount', [mnt]);
  spawnSync('rmmod', ['brd']);
  spawnSync('rm', ['-f', tmpfsFile]);

  const median = (a: number[]) => {
    const b = [...a].sort((p, q) => p - q);
    return b.length % 2 ? b[(b.length - 1) / 2]! : (b[b.length / 2 - 1]! + b[b.length / 2]!) / 2;
  };
  const label: Record<string, string> = {
    'loop-tmpfs': 'loop vs loop, file on tmpfs', 'loop-ext4': 'loop vs loop, file on ext4 on brd', mem: 'mem vs brd',
  };
  console.log(`\nublk loop vs kernel loop (--direct-io=on, the same ${size} MiB file) and ublk mem vs brd, ${header()}, 1 queue, 1 job, ` +
    `${rounds > 1 ? `median of ${rounds} interleaved rounds` : 'one round'}\n`);
  console.log('| pair | workload | QD | ours IOPS | kernel IOPS | ours / kernel |');
  console.log('|---|---|---|---|---|---|');
  const o: Record<string, number> = {};
  const rows = [...samples].map(([key, s]) => {
    const [pair, rw, qd] = key.split(' ') as [string, string, string];
    return { pair, rw, qd: Number(qd), ours: median(s.ours), kernel: median(s.kernel) };
  });
  for (const r of rows) {
    console.log(`| ${label[r.pair]} | ${r.rw} | ${r.qd} | ${k(r.ours)} | ${k(r.kernel)} | **${(r.ours / r.kernel).toFixed(2)}x** |`);
    o[`${r.pair}_${r.rw}_qd${r.qd}_vs_kernel`] = Number((r.ours / r.kernel).toFixed(3));
  }
  for (const { pair } of pairs) {
    // The issue's yardstick: randread + randwrite at QD 32, summed.
    const at32 = rows.filter((r) => r.pair === pair && r.qd === 32);
    const ratio = at32.reduce((s, r) => s + r.ours, 0) / at32.reduce((s, r) => s + r.kernel, 0);
    console.log(`\n${label[pair]}: randread + randwrite at QD 32: **${ratio.toFixed(2)}x** the kernel's`);
    o[`${pair}_qd32_rw_sum_vs_kernel`] = Number(ratio.toFixed(3));
  }
  return o;
}

const k = (n: number) => `${(n / 1000).toFixed(1)}k`;
const header = () => `${process.env.UBLK_VM_PACKAGE}, ${readdirSync('/sys/devices/system/cpu').filter((d) => /^cpu\d+$/.test(d)).length} vCPUs, fio io_uring 4k, ${seconds} s per point, one boot`;
const suite = opt('--suite', 'all');
const out: Record<string, number> = {};
if (suite === 'all' || suite === 'null') Object.assign(out, await nullSuite());
if (suite === 'all' || suite === 'loop') Object.assign(out, await loopSuite());
if (json) console.log(JSON.stringify(out));
