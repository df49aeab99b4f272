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
 *   npm run bench:ublk -- [--suite all|null|loop|cost|modes|shmem|async|nbd] [--kernel lts|newest] [--cpus N] [--seconds S] [--rounds N] [--json]
 *   modes suite: [--mode copy,user_copy,zero_copy,auto_zc,copy+b,auto_zc+b] [--targets null,mem,loop-tmpfs,loop-ext4] [--qds 1,32,128] [--queues 1,2] [--threads 1,2]
 *   nbd suite (bench/ublk-nbd.ts: -t nbd vs the kernel's nbd-client, same nbdkit): [--transports tcp,unix] [--queues 1,2] [--qds 1,32] [--modes copy,get_data,user_copy,zero_copy,auto_zc,copy+b,auto_zc+b] [--c-ublk PATH]
 *   qcow2 suite (bench/ublk-qcow2.ts: -t qcow2 vs qemu-storage-daemon's NBD export + nbd-client, same image): [--mib N] [--qds 1,32]
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { writeFileSync, existsSync, readdirSync, readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { release } from 'node:os';
import { DATA_PATH_MODES, modeAvailable } from '../src/ublk/modes.js';
import { UblkControl } from '../src/ublk/control.js';
import { UBLK_F_BATCH_IO } from '../src/ublk/abi.js';
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

interface FioSide { iops: number; clat_ns?: { percentile?: Record<string, number> } }
interface FioResult { iops: number; p50: number; p99: number; p999: number }

/** fio on /dev/DEV: IOPS, and completion-latency percentiles in µs (of reads, or of writes). */
function fio(dev: string, rw: string, qd: number, jobs: number, extra: string[] = []): FioResult {
  const out = sh('fio', ['--name=b', `--filename=/dev/${dev}`, `--rw=${rw}`, '--bs=4k', `--iodepth=${qd}`,
    '--ioengine=io_uring', '--direct=1', `--numjobs=${jobs}`, '--group_reporting', '--time_based',
    `--runtime=${seconds}`, '--ramp_time=1', '--output-format=json', ...extra]);
  const j = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: Array<{ error: number; read: FioSide; write: FioSide }> };
  const job = j.jobs[0]!;
  if (job.error) throw new Error(`fio on ${dev}: error ${job.error}`);
  const side = rw.includes('read') ? job.read : job.write;
  const pct = (p: string) => (side.clat_ns?.percentile?.[p] ?? NaN) / 1000;
  return { iops: job.read.iops + job.write.iops, p50: pct('50.000000'), p99: pct('99.000000'), p999: pct('99.900000') };
}
const runFio = (dev: string, rw: string, qd: number, jobs: number): number => fio(dev, rw, qd, jobs).iops;

/** The device id in `add`'s output (ours and C ublksrv both print "dev id N: ..."). */
const addedId = (out: string) => Number(out.match(/dev id (\d+)/)![1]);

function ublkAdd(a: string[]): number {
  return addedId(sh(process.execPath, [join(root, 'bin', 'ublk.js'), 'add', ...a]));
}
const ublkDel = (id: number) => sh(process.execPath, [join(root, 'bin', 'ublk.js'), 'del', '-n', String(id)]);

/**
 * The C reference server (ublksrv's `ublk` binary, `--c-ublk PATH`), driven through its own
 * CLI: it prints the same "dev id N" line, and our `list` reads its pid from the kernel.
 */
function cAdd(bin: string, a: string[]): number {
  return addedId(sh(bin, ['add', ...a]));
}

/** The kernel's null_blk as our devices' reference: /dev/nullb0, `queues` queues of depth 128, no completion delay. */
function loadNullBlk(queues: number): void {
  spawnSync('rmmod', ['null_blk']);
  sh('modprobe', ['-d', KROOT, 'null_blk', 'nr_devices=1', 'queue_mode=2', `submit_queues=${queues}`, 'hw_queue_depth=128', 'irqmode=0', 'gb=250', 'bs=512']);
}

/** Samples per key, over the rounds of a suite: `put` one, `median` of a key's (NaN if none). */
function sampleSet() {
  const samples = new Map<string, number[]>();
  return {
    put: (key: string, v: number) => { samples.set(key, [...(samples.get(key) ?? []), v]); },
    median: (key: string) => median(samples.get(key) ?? [NaN]),
  };
}

async function asyncAdd(queues: number): Promise<{ devId: number; stop: () => Promise<void> }> {
  const child = spawn(process.execPath, ['--import', 'tsx', join(root, 'bench', 'ublk-async-null.ts'), String(queues)], { stdio: ['ignore', 'pipe', 'inherit'] });
  const line = await new Promise<string>((res) => createInterface({ input: child.stdout }).once('line', res));
  const { devId } = JSON.parse(line) as { devId: number };
  return { devId, stop: () => new Promise((res) => { child.once('exit', () => res()); child.kill('SIGTERM'); }) };
}

/**
 * A fresh ext4 on the last of `disks` brd RAM disks of `mib` MiB each (the loop module loaded
 * too), mounted at /tmp/ublk-bench-ext4; returns the mount point. The others stay raw.
 */
function ext4OnBrd(disks: number, mib: number): string {
  const mnt = '/tmp/ublk-bench-ext4';
  spawnSync('modprobe', ['-d', KROOT, 'loop']);
  spawnSync('rmmod', ['brd']);
  sh('modprobe', ['-d', KROOT, 'brd', `rd_nr=${disks}`, `rd_size=${mib * 1024}`]);
  sh('mkfs.ext4', ['-q', `/dev/ram${disks - 1}`]);
  sh('mkdir', ['-p', mnt]);
  sh('mount', [`/dev/ram${disks - 1}`, mnt]);
  return mnt;
}

/**
 * The loop backings of the loop and modes suites: `mib` MiB of random data in a file on tmpfs and
 * the same in a file on ext4 on brd (ram1; ram0, as large, is free for mem vs brd), with no page
 * cached over either: O_DIRECT over cached pages is slower for both loops.
 */
function benchFiles(mib: number): { tmpfsFile: string; mnt: string; ext4File: string } {
  const tmpfsFile = '/tmp/ublk-bench.img';
  sh('dd', ['if=/dev/urandom', `of=${tmpfsFile}`, 'bs=1M', `count=${mib}`, 'status=none']);
  const mnt = ext4OnBrd(2, mib + 128); // room for the file plus ext4's metadata
  const ext4File = `${mnt}/ublk-bench.img`;
  sh('cp', [tmpfsFile, ext4File]);
  sh('sync', []);
  writeFileSync('/proc/sys/vm/drop_caches', '3');
  return { tmpfsFile, mnt, ext4File };
}

interface Row { key: string; queues: number; rw: string; qd: number; ours: number; async: number; nullBlk: number }
async function nullSuite(): Promise<Record<string, number>> {
  const rows: Row[] = [];
  for (const queues of [1, 2]) {
    loadNullBlk(queues);
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
  const { tmpfsFile, mnt, ext4File } = benchFiles(size);
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

/**
 * `--suite modes`: every data path (src/ublk/modes.ts) the kernel grants, against copy mode and
 * against the kernel's own driver, in one boot: null vs null_blk, mem vs brd, loop vs the kernel
 * loop (--direct-io=on) over one file on tmpfs and one on ext4 on brd. randread and randwrite at
 * QD 1 and 32 (`--qds 1,32,128` for more), 1 queue and 1 fio job (`--queues 1,2`: devices of that
 * many queues, as many fio jobs; `--threads 1,2`: that many threads per queue, per-I/O
 * daemons), points interleaved, medians of --rounds (default 3).
 * `--mode copy,zero_copy` (or `--modes`) picks the modes; `--targets null,mem` the targets. A mode
 * name with `+b` is that data path with batch I/O (-b, 7.0): `copy+b`, `auto_zc+b`.
 */
async function modesSuite(): Promise<Record<string, number>> {
  const size = 256;
  const rounds = Number(opt('--rounds', '3'));
  const qds = opt('--qds', '1,32').split(',').map(Number);
  const queueCounts = opt('--queues', '1').split(',').map(Number);
  const threadCounts = opt('--threads', '1').split(',').map(Number);
  // Every (queues, threads per queue) layout measured: "Q" or "Qx T" in keys and tables.
  const layouts = queueCounts.flatMap((q) => threadCounts.map((th) => ({ q, th, key: th > 1 ? `${q}x${th}` : `${q}` })));
  const wanted = opt('--mode', opt('--modes', DATA_PATH_MODES.map((m) => m.name).join(','))).split(',');
  const ctrl = new UblkControl();
  const features = ctrl.features();
  ctrl.close();
  // Each wanted name is a data path, or a data path with batch I/O ("auto_zc+b").
  const modes = wanted.flatMap((w) => {
    const [base, extra] = w.split('+');
    const m = DATA_PATH_MODES.find((x) => x.name === base);
    if (!m || (extra !== undefined && extra !== 'b') || !modeAvailable(m, features, release())) return [];
    if (extra === 'b' && !(features & UBLK_F_BATCH_IO)) return [];
    return [{ name: w, args: [...(m.option ? [m.option] : []), ...(extra === 'b' ? ['-b'] : [])] }];
  });
  const skipped = wanted.filter((w) => !modes.some((m) => m.name === w));
  if (skipped.length) process.stderr.write(`bench: this kernel lacks ${skipped.join(', ')}: not measured\n`);
  if (!modes.some((m) => m.name === 'copy')) throw new Error('bench: --mode must include copy (the reference every other mode is divided by)');
  const { tmpfsFile, mnt, ext4File } = benchFiles(size);
  loadNullBlk(Math.max(...queueCounts));
  const kloops = [tmpfsFile, ext4File].map((f) => sh('losetup', ['--find', '--show', '--direct-io=on', f]).trim().slice(5));
  const kernel: Record<string, string> = { null: 'nullb0', mem: 'ram0', 'loop-tmpfs': kloops[0]!, 'loop-ext4': kloops[1]! };
  const targets = opt('--targets', 'null,mem,loop-tmpfs,loop-ext4').split(',');
  const targetArgs: Record<string, string[]> = {
    null: ['-t', 'null'], mem: ['-t', 'mem', '-s', `${size}M`], 'loop-tmpfs': ['-t', 'loop', '-f', tmpfsFile], 'loop-ext4': ['-t', 'loop', '-f', ext4File],
  };
  const dev = new Map<string, string>(); // "target queues mode" -> ublkbN
  const ids: number[] = [];
  for (const target of targets) {
    for (const { q, th, key } of layouts) {
      for (const m of modes) {
        const threads = th > 1 ? ['--nthreads', String(q * th), '--per_io_tasks'] : [];
        const id = ublkAdd([...targetArgs[target]!, '-q', String(q), ...threads, ...m.args]);
        ids.push(id);
        dev.set(`${target} ${key} ${m.name}`, `ublkb${id}`);
      }
    }
  }
  for (const d of [...dev.values(), ...Object.values(kernel)]) setNone(d);
  for (const [key, d] of dev) if (key.startsWith('mem ')) sh('dd', [`if=${tmpfsFile}`, `of=/dev/${d}`, 'bs=1M', 'oflag=direct', 'status=none']);
  sh('dd', [`if=${tmpfsFile}`, 'of=/dev/ram0', 'bs=1M', 'oflag=direct', 'status=none']);

  const { put, median: m } = sampleSet();
  for (let round = 1; round <= rounds; round++) {
    for (const target of targets) {
      for (const { q, key } of layouts) {
        for (const rw of ['randread', 'randwrite']) {
          for (const qd of qds) {
            const sides: Array<[string, string]> = [...modes.map((x) => [x.name, dev.get(`${target} ${key} ${x.name}`)!] as [string, string]), ['kernel', kernel[target]!]];
            for (const [side, d] of sides) {
              const iops = runFio(d, rw, qd, q);
              put(`${target} ${key} ${rw} ${qd} ${side}`, iops);
              process.stderr.write(`bench: round ${round}/${rounds} ${target} ${key}q ${rw} QD${qd} ${side}: ${Math.round(iops)} IOPS\n`);
            }
          }
        }
      }
    }
  }
  for (const id of ids) ublkDel(id);
  for (const l of kloops) sh('losetup', ['-d', `/dev/${l}`]);
  sh('umount', [mnt]);
  spawnSync('rmmod', ['brd']);
  spawnSync('rmmod', ['null_blk']);
  spawnSync('rm', ['-f', tmpfsFile]);

  const label: Record<string, string> = { null: 'null vs null_blk', mem: 'mem vs brd', 'loop-tmpfs': 'loop vs loop, tmpfs', 'loop-ext4': 'loop vs loop, ext4 on brd' };
  console.log(`\nData paths, ${header()}, queues = fio jobs ("2x2": 2 queues of 2 threads each), median of ${rounds} interleaved rounds\n`);
  const others = modes.filter((x) => x.name !== 'copy');
  console.log(`| pair | queues | workload | QD | kernel IOPS | copy IOPS | copy / kernel |${others.map((x) => ` ${x.name} IOPS | / copy | / kernel |`).join('')}`);
  console.log(`|---|---|---|---|---|---|---|${others.map(() => '---|---|---|').join('')}`);
  const o: Record<string, number> = {};
  for (const target of targets) {
    for (const { key: lk } of layouts) {
      for (const rw of ['randread', 'randwrite']) {
        for (const qd of qds) {
          const v = (side: string) => m(`${target} ${lk} ${rw} ${qd} ${side}`);
          const cols = others.map((x) => ` ${k(v(x.name))} | ${(v(x.name) / v('copy')).toFixed(2)}x | **${(v(x.name) / v('kernel')).toFixed(2)}x** |`).join('');
          console.log(`| ${label[target]} | ${lk} | ${rw} | ${qd} | ${k(v('kernel'))} | ${k(v('copy'))} | **${(v('copy') / v('kernel')).toFixed(2)}x** |${cols}`);
          const key = `${target}${lk !== '1' ? `_${lk}q` : ''}`;
          for (const x of modes) {
            o[`${key}_${x.name}_${rw}_qd${qd}_vs_kernel`] = Number((v(x.name) / v('kernel')).toFixed(3));
            if (x.name !== 'copy') o[`${key}_${x.name}_${rw}_qd${qd}_vs_copy`] = Number((v(x.name) / v('copy')).toFixed(3));
          }
        }
      }
    }
  }
  return o;
}

/**
 * `--suite shmem`: shared-memory zero copy (--shmem_zc, 7.1). A mem device with --shmem_zc over
 * a file in /dev/shm, the same mem without it, and brd, each driven by bench/shmem-load.ts with
 * its I/O buffers in that file's pages (fio cannot be such a client), 4k randread and randwrite
 * at `--qds` (default 1,32), interleaved, medians of --rounds. Only the --shmem_zc device can
 * match the client's pages; the client's own cost is in every column alike.
 */
async function shmemSuite(): Promise<Record<string, number>> {
  const size = 256;
  const rounds = Number(opt('--rounds', '3'));
  const qds = opt('--qds', '1,32').split(',').map(Number);
  const shm = '/dev/shm/ublk-bench-shm.img';
  sh('truncate', ['-s', '16M', shm]);
  spawnSync('rmmod', ['brd']);
  sh('modprobe', ['-d', KROOT, 'brd', 'rd_nr=1', `rd_size=${size * 1024}`]);
  const zc = ublkAdd(['-t', 'mem', '-s', `${size}M`, '--shmem_zc', '--htlb', shm]);
  const copy = ublkAdd(['-t', 'mem', '-s', `${size}M`]);
  const devs: Array<[string, string]> = [['shmem_zc', `ublkb${zc}`], ['copy', `ublkb${copy}`], ['brd', 'ram0']];
  for (const [, d] of devs) {
    setNone(d);
    sh('dd', ['if=/dev/urandom', `of=/dev/${d}`, 'bs=1M', `count=${size}`, 'oflag=direct', 'status=none']);
  }
  const load = (d: string, rw: string, qd: number): number => {
    const r = sh(process.execPath, ['--import', 'tsx', join(root, 'bench', 'shmem-load.ts'), `/dev/${d}`, String(size * 2 ** 20), shm, rw, String(qd), String(seconds)]);
    return (JSON.parse(r) as { iops: number }).iops;
  };
  const { put, median: m } = sampleSet();
  for (let round = 1; round <= rounds; round++) {
    for (const rw of ['randread', 'randwrite']) {
      for (const qd of qds) {
        for (const [side, d] of devs) {
          const iops = load(d, rw, qd);
          put(`${rw} ${qd} ${side}`, iops);
          process.stderr.write(`bench: round ${round}/${rounds} ${rw} QD${qd} ${side}: ${Math.round(iops)} IOPS\n`);
        }
      }
    }
  }
  const log = (JSON.parse(sh(process.execPath, [join(root, 'bin', 'ublk.js'), 'list', '-n', String(zc), '--json'])) as Array<{ log: string }>)[0]!.log;
  const matched = readFileSync(log, 'utf8').includes('UBLK_IO_F_SHMEM_ZC');
  ublkDel(zc);
  ublkDel(copy);
  spawnSync('rmmod', ['brd']);
  spawnSync('rm', ['-f', shm]);
  console.log(`\nShared-memory zero copy, mem vs brd, ${header().replace('fio io_uring 4k', 'bench/shmem-load.ts 4k O_DIRECT from a /dev/shm file')}, median of ${rounds} interleaved rounds; the kernel matched the client's pages: ${matched ? 'yes' : 'NO'}\n`);
  console.log('| workload | QD | brd IOPS | mem (copy) IOPS | / brd | mem --shmem_zc IOPS | / brd | / copy |');
  console.log('|---|---|---|---|---|---|---|---|');
  const o: Record<string, number> = {};
  for (const rw of ['randread', 'randwrite']) {
    for (const qd of qds) {
      const v = (side: string) => m(`${rw} ${qd} ${side}`);
      console.log(`| ${rw} | ${qd} | ${k(v('brd'))} | ${k(v('copy'))} | **${(v('copy') / v('brd')).toFixed(2)}x** | ${k(v('shmem_zc'))} | **${(v('shmem_zc') / v('brd')).toFixed(2)}x** | ${(v('shmem_zc') / v('copy')).toFixed(2)}x |`);
      o[`shmem_mem_${rw}_qd${qd}_vs_brd`] = Number((v('shmem_zc') / v('brd')).toFixed(3));
      o[`shmem_mem_${rw}_qd${qd}_vs_copy`] = Number((v('shmem_zc') / v('copy')).toFixed(3));
    }
  }
  return o;
}

// ---------------------------------------------------------------------------------------------
// The cost suite: what one request costs our server (issue 12)
// ---------------------------------------------------------------------------------------------

/** Clock ticks per second of /proc/PID/stat's utime and stime. */
const CLK_TCK = Number(sh('getconf', ['CLK_TCK']).trim()) || 100;

/** A process's CPU so far: user and system seconds over all its threads, living and exited. */
function processCpu(pid: number): { user: number; sys: number } {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after "(comm) ": state is field 3, utime field 14, stime field 15 (proc(5)).
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { user: Number(f[11]) / CLK_TCK, sys: Number(f[12]) / CLK_TCK };
}

/** On-CPU nanoseconds of each thread of `pid` (schedstat), with the thread's name. */
function threadCpu(pid: number): Map<number, { comm: string; ns: number }> {
  const out = new Map<number, { comm: string; ns: number }>();
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      const ns = Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0]);
      const comm = readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim();
      out.set(Number(tid), { comm, ns });
    } catch { /* the thread exited */ }
  }
  return out;
}

/** Requests a block device has completed (reads + writes, /sys/block/DEV/stat). */
function deviceIos(dev: string): number {
  const f = readFileSync(`/sys/block/${dev}/stat`, 'utf8').trim().split(/\s+/).map(Number);
  return f[0]! + f[4]!;
}

const TRACEFS = '/sys/kernel/tracing';
const ENTER_EVENT = `${TRACEFS}/events/syscalls/sys_enter_io_uring_enter`;

/**
 * How many io_uring_enter calls the threads of `pid` make while `run` runs, counted by the
 * kernel (a histogram trigger on the syscall's tracepoint, keyed by thread id): exact, and the
 * same measure for any server. The trigger slows every system call a little, so CPU is never
 * measured in the same run.
 */
function countEnters(pid: number, run: () => void): number {
  if (!existsSync(ENTER_EVENT)) spawnSync('mount', ['-t', 'tracefs', 'nodev', TRACEFS]);
  writeFileSync(`${ENTER_EVENT}/trigger`, 'hist:keys=common_pid');
  try {
    run();
    const tids = new Set(readdirSync(`/proc/${pid}/task`).map(Number));
    let n = 0;
    for (const m of readFileSync(`${ENTER_EVENT}/hist`, 'utf8').matchAll(/common_pid:\s*(\d+)\s*\}\s*hitcount:\s*(\d+)/g)) {
      if (tids.has(Number(m[1]))) n += Number(m[2]);
    }
    return n;
  } finally {
    writeFileSync(`${ENTER_EVENT}/trigger`, '!hist:keys=common_pid');
  }
}

interface Cost { iops: number; cpuUs: number; userUs: number; sysUs: number; entersPerIo: number }

/**
 * The server's CPU per request while fio drives `dev` at a fixed `rate` (4 KiB randread, QD 32):
 * every thread of the server process, user and system, divided by the requests the device
 * completed in the same window. Then a shorter second run counts io_uring_enter calls per request.
 */
function serverCost(dev: string, pid: number, rate: number): Cost {
  const ios0 = deviceIos(dev);
  const c0 = processCpu(pid);
  const t0 = threadCpu(pid);
  const r = fio(dev, 'randread', 32, 1, [`--rate_iops=${rate}`]);
  const c1 = processCpu(pid);
  const t1 = threadCpu(pid);
  const ios = deviceIos(dev) - ios0;
  // Where it went, thread by thread (the queue threads should be nearly all of it).
  const threads = [...t1].map(([tid, t]) => ({ tid, comm: t.comm, us: (t.ns - (t0.get(tid)?.ns ?? 0)) / 1000 / ios }))
    .filter((t) => t.us >= 0.05).sort((a, b) => b.us - a.us);
  process.stderr.write(`bench: ${dev} per-thread CPU µs per I/O: ${threads.map((t) => `${t.comm}[${t.tid}] ${t.us.toFixed(2)}`).join(', ')}\n`);
  let enterIos = 0;
  const enters = countEnters(pid, () => {
    const before = deviceIos(dev);
    sh('fio', ['--name=e', `--filename=/dev/${dev}`, '--rw=randread', '--bs=4k', '--iodepth=32', '--ioengine=io_uring',
      '--direct=1', '--time_based', '--runtime=2', `--rate_iops=${rate}`, '--output-format=json']);
    enterIos = deviceIos(dev) - before;
  });
  const us = (s: number) => (s * 1e6) / ios;
  return {
    iops: r.iops, userUs: us(c1.user - c0.user), sysUs: us(c1.sys - c0.sys),
    cpuUs: us(c1.user - c0.user + c1.sys - c0.sys), entersPerIo: enters / enterIos,
  };
}

/** The pid of the process serving /dev/ublkbID. */
function serverPid(id: number): number {
  const out = sh(process.execPath, [join(root, 'bin', 'ublk.js'), 'list', '-n', String(id), '--json']);
  const j = JSON.parse(out) as Array<{ daemon_pid: number }> | { daemon_pid: number };
  return (Array.isArray(j) ? j[0]! : j).daemon_pid;
}

const median = (a: number[]) => {
  const b = [...a].sort((p, q) => p - q);
  return b.length % 2 ? b[(b.length - 1) / 2]! : (b[b.length / 2 - 1]! + b[b.length / 2]!) / 2;
};

/**
 * `--suite cost`: the cost of one request. Per round, interleaved in one boot:
 *   - server CPU per I/O and io_uring_enter calls per I/O at a fixed rate (null at
 *     --null-rate, default 20k IOPS; loop over a file on ext4 on brd at --loop-rate, default 8k);
 *   - QD 1 IOPS and completion-latency percentiles: null vs null_blk, loop vs the kernel loop;
 *   - QD 32: loop vs the kernel loop; null with 2 queues x 2 jobs x QD 128 vs null_blk.
 * `--add-args "..."` adds options to every `ublk add` (to compare a mode in the same boot as
 * another run's). `--c-ublk PATH` (C ublksrv's `ublk` binary, built as the README says) adds
 * the C server's null and loop devices to every measurement, so ours/C is a same-boot ratio.
 * Medians over --rounds (default 3).
 */
async function costSuite(): Promise<Record<string, number>> {
  const rounds = Number(opt('--rounds', '3'));
  const nullRate = Number(opt('--null-rate', '20000'));
  const loopRate = Number(opt('--loop-rate', '8000'));
  const extra = opt('--add-args', '').split(' ').filter(Boolean);
  const size = 512;
  loadNullBlk(2);
  setNone('nullb0');
  const mnt = ext4OnBrd(1, size + 128);
  const file = `${mnt}/ublk-bench.img`;
  sh('dd', ['if=/dev/urandom', `of=${file}`, 'bs=1M', `count=${size}`, 'status=none']);
  sh('sync', []);
  writeFileSync('/proc/sys/vm/drop_caches', '3');
  const kloop = sh('losetup', ['--find', '--show', '--direct-io=on', file]).trim().slice(5);
  setNone(kloop);
  const null1 = ublkAdd(['-t', 'null', '-q', '1', '-d', '128', ...extra]);
  const null2 = ublkAdd(['-t', 'null', '-q', '2', '-d', '128', ...extra]);
  const loop = ublkAdd(['-t', 'loop', '-f', file, ...extra]);
  // --spin-us N: the same null and loop devices in the low-latency mode, measured at QD 1 beside them.
  const spinUs = opt('--spin-us', '');
  const spin = spinUs ? {
    null: ublkAdd(['-t', 'null', '-q', '1', '-d', '128', '--spin-us', spinUs, ...extra]),
    loop: ublkAdd(['-t', 'loop', '-f', file, '--spin-us', spinUs, ...extra]),
  } : undefined;
  const ours = [null1, null2, loop, ...(spin ? [spin.null, spin.loop] : [])];
  for (const id of ours) setNone(`ublkb${id}`);
  const cBin = opt('--c-ublk', '');
  const c = cBin ? {
    null1: cAdd(cBin, ['-t', 'null', '-q', '1', '-d', '128']),
    null2: cAdd(cBin, ['-t', 'null', '-q', '2', '-d', '128']),
    loop: cAdd(cBin, ['-t', 'loop', '-q', '1', '-d', '128', '-f', file]),
  } : undefined;
  const theirs = c ? [c.null1, c.null2, c.loop] : [];
  for (const id of theirs) setNone(`ublkb${id}`);
  const pidOf = new Map([...ours, ...theirs].map((id) => [`ublkb${id}`, serverPid(id)]));
  const costed: Array<[string, number, number]> = [['null', null1, nullRate], ['loop', loop, loopRate]];
  if (c) costed.push(['c_null', c.null1, nullRate], ['c_loop', c.loop, loopRate]);

  const { put, median: m } = sampleSet();
  const log = (line: string) => process.stderr.write(`bench: ${line}\n`);
  // Warm-up: V8 compiles the hot path in its background threads during the first seconds, and
  // that CPU would otherwise be charged to the first round's requests.
  for (const id of [...ours, ...theirs]) {
    sh('fio', ['--name=w', `--filename=/dev/ublkb${id}`, '--rw=randread', '--bs=4k', '--iodepth=32', '--ioengine=io_uring',
      '--direct=1', '--time_based', '--runtime=2', '--output-format=json']);
  }
  for (let round = 1; round <= rounds; round++) {
    for (const [name, id, rate] of costed) {
      const dev = `ublkb${id}`;
      const r = serverCost(dev, pidOf.get(dev)!, rate);
      for (const [key, v] of Object.entries(r)) put(`cost_${name}_${key}`, v);
      log(`round ${round}/${rounds} ${name} at ${rate} IOPS: ${r.iops.toFixed(0)} IOPS, ${r.cpuUs.toFixed(1)} µs CPU per I/O (${r.userUs.toFixed(1)} user + ${r.sysUs.toFixed(1)} sys), ${r.entersPerIo.toFixed(2)} enters per I/O`);
    }
    for (const [pair, ours, kernel, rws, spinning, cdev] of [
      ['null', `ublkb${null1}`, 'nullb0', ['randread'], spin && `ublkb${spin.null}`, c && `ublkb${c.null1}`],
      ['loop', `ublkb${loop}`, kloop, ['randread', 'randwrite'], spin && `ublkb${spin.loop}`, c && `ublkb${c.loop}`],
    ] as const) {
      for (const rw of rws) {
        const sides: Array<[string, string]> = [['ours', ours], ['kernel', kernel]];
        if (spinning) sides.push(['spin', spinning]);
        if (cdev) sides.push(['c', cdev]);
        for (const [side, dev] of sides) {
          const pid = pidOf.get(dev);
          const c0 = pid ? processCpu(pid) : undefined;
          const ios0 = deviceIos(dev);
          const r = fio(dev, rw, 1, 1);
          if (pid && c0) {
            const c1 = processCpu(pid);
            put(`qd1_${pair}_${rw}_${side}_cpuUs`, ((c1.user + c1.sys - c0.user - c0.sys) * 1e6) / (deviceIos(dev) - ios0));
          }
          for (const [key, v] of Object.entries(r)) put(`qd1_${pair}_${rw}_${side}_${key}`, v);
          log(`round ${round}/${rounds} QD1 ${pair} ${rw} ${side}: ${r.iops.toFixed(0)} IOPS, p50 ${r.p50.toFixed(0)} µs, p99 ${r.p99.toFixed(0)} µs`);
        }
      }
    }
    for (const rw of ['randread', 'randwrite']) {
      for (const [side, dev] of [['ours', `ublkb${loop}`], ['kernel', kloop], ...(c ? [['c', `ublkb${c.loop}`]] : [])]) {
        const iops = runFio(dev!, rw, 32, 1);
        put(`qd32_loop_${rw}_${side}`, iops);
        log(`round ${round}/${rounds} QD32 loop ${rw} ${side}: ${iops.toFixed(0)} IOPS`);
      }
      for (const [side, dev] of [['ours', `ublkb${null2}`], ['kernel', 'nullb0'], ...(c ? [['c', `ublkb${c.null2}`]] : [])]) {
        const iops = runFio(dev!, rw, 128, 2);
        put(`qd128x2_null_${rw}_${side}`, iops);
        log(`round ${round}/${rounds} 2 jobs x QD128 null ${rw} ${side}: ${iops.toFixed(0)} IOPS`);
      }
    }
  }
  for (const id of ours) ublkDel(id);
  for (const id of theirs) sh(cBin, ['del', '-n', String(id)]);
  sh('losetup', ['-d', `/dev/${kloop}`]);
  sh('umount', [mnt]);
  spawnSync('rmmod', ['brd']);
  spawnSync('rmmod', ['null_blk']);

  const o: Record<string, number> = {};
  const f1 = (n: number) => n.toFixed(1);
  console.log(`\nCost of a request, ${header()}, median of ${rounds} interleaved rounds${extra.length ? `, ublk add ${extra.join(' ')}` : ''}\n`);
  console.log('| server CPU per I/O, 4k randread QD 32 at a fixed rate | IOPS reached | CPU µs per I/O | user | sys | io_uring_enter per I/O |');
  console.log('|---|---|---|---|---|---|');
  const costRows: Array<[string, string, number]> = [['null', 'null', nullRate], ['loop', 'loop, file on ext4 on brd', loopRate]];
  if (c) costRows.push(['c_null', 'C ublksrv null', nullRate], ['c_loop', 'C ublksrv loop, same file', loopRate]);
  for (const [name, label, rate] of costRows) {
    console.log(`| ${label} at ${k(rate)} IOPS | ${k(m(`cost_${name}_iops`))} | **${f1(m(`cost_${name}_cpuUs`))}** | ${f1(m(`cost_${name}_userUs`))} | ${f1(m(`cost_${name}_sysUs`))} | ${m(`cost_${name}_entersPerIo`).toFixed(2)} |`);
    for (const key of ['cpuUs', 'userUs', 'sysUs', 'entersPerIo']) o[`cost_${name}_${key}`] = Number(m(`cost_${name}_${key}`).toFixed(2));
  }
  console.log('\n| QD 1 | workload | ours IOPS | p50 / p99 / p99.9 µs | server CPU µs per I/O | kernel IOPS | p50 / p99 / p99.9 µs | ours / kernel |');
  console.log('|---|---|---|---|---|---|---|---|');
  for (const [pair, label, rws] of [['null', 'null vs null_blk', ['randread']], ['loop', 'loop vs loop, ext4 on brd', ['randread', 'randwrite']]] as const) {
    for (const rw of rws) {
      const q = (side: string, key: string) => m(`qd1_${pair}_${rw}_${side}_${key}`);
      const lat = (side: string) => `${q(side, 'p50').toFixed(0)} / ${q(side, 'p99').toFixed(0)} / ${q(side, 'p999').toFixed(0)}`;
      const ratio = q('ours', 'iops') / q('kernel', 'iops');
      console.log(`| ${label} | ${rw} | ${k(q('ours', 'iops'))} | ${lat('ours')} | ${f1(q('ours', 'cpuUs'))} | ${k(q('kernel', 'iops'))} | ${lat('kernel')} | **${ratio.toFixed(2)}x** |`);
      if (spin) {
        const sr = q('spin', 'iops') / q('kernel', 'iops');
        console.log(`| ${label}, --spin-us ${spinUs} | ${rw} | ${k(q('spin', 'iops'))} | ${lat('spin')} | ${f1(q('spin', 'cpuUs'))} | ${k(q('kernel', 'iops'))} | ${lat('kernel')} | **${sr.toFixed(2)}x** |`);
        o[`qd1_${pair}_${rw}_spin_iops`] = Math.round(q('spin', 'iops'));
        o[`qd1_${pair}_${rw}_spin_cpu_us`] = Number(q('spin', 'cpuUs').toFixed(1));
        o[`qd1_${pair}_${rw}_spin_vs_kernel`] = Number(sr.toFixed(3));
      }
      if (c) {
        const cr = q('c', 'iops') / q('kernel', 'iops');
        console.log(`| ${label}, C ublksrv | ${rw} | ${k(q('c', 'iops'))} | ${lat('c')} | ${f1(q('c', 'cpuUs'))} | ${k(q('kernel', 'iops'))} | ${lat('kernel')} | **${cr.toFixed(2)}x** |`);
        o[`qd1_${pair}_${rw}_c_iops`] = Math.round(q('c', 'iops'));
        o[`qd1_${pair}_${rw}_c_vs_kernel`] = Number(cr.toFixed(3));
      }
      o[`qd1_${pair}_${rw}_iops`] = Math.round(q('ours', 'iops'));
      o[`qd1_${pair}_${rw}_p50_us`] = Math.round(q('ours', 'p50'));
      o[`qd1_${pair}_${rw}_p99_us`] = Math.round(q('ours', 'p99'));
      o[`qd1_${pair}_${rw}_vs_kernel`] = Number(ratio.toFixed(3));
    }
  }
  // With the C server: its IOPS and its ratio to the kernel's driver, then ours / C.
  const cHead = c ? ' C IOPS | C / kernel | ours / C |' : '';
  console.log(`\n| at depth | workload | ours IOPS | kernel IOPS | ours / kernel |${cHead}`);
  console.log(`|---|---|---|---|---|${c ? '---|---|---|' : ''}`);
  for (const [key, label, outKey] of [['qd32_loop', 'loop vs loop, ext4 on brd, 1 job QD 32', 'vs_kernel'], ['qd128x2_null', 'null (2 queues) vs null_blk, 2 jobs x QD 128', 'vs_null_blk']] as const) {
    for (const rw of ['randread', 'randwrite']) {
      const v = (side: string) => m(`${key}_${rw}_${side}`);
      const r = v('ours') / v('kernel');
      const cCols = c ? ` ${k(v('c'))} | ${(v('c') / v('kernel')).toFixed(2)}x | **${(v('ours') / v('c')).toFixed(2)}x** |` : '';
      console.log(`| ${label} | ${rw} | ${k(v('ours'))} | ${k(v('kernel'))} | **${r.toFixed(2)}x** |${cCols}`);
      o[`${key}_${rw}_${outKey}`] = Number(r.toFixed(3));
      if (c) o[`${key}_${rw}_vs_c`] = Number((v('ours') / v('c')).toFixed(3));
    }
  }
  if (c) {
    console.log('\n| ours / C ublksrv, same boot | CPU per I/O at a fixed rate | QD 1 IOPS |');
    console.log('|---|---|---|');
    for (const name of ['null', 'loop']) {
      const cpu = m(`cost_${name}_cpuUs`) / m(`cost_c_${name}_cpuUs`);
      const qd1 = m(`qd1_${name}_randread_ours_iops`) / m(`qd1_${name}_randread_c_iops`);
      console.log(`| ${name} (randread) | ${cpu.toFixed(2)}x | ${qd1.toFixed(2)}x |`);
      o[`cost_${name}_cpu_vs_c`] = Number(cpu.toFixed(3));
      o[`qd1_${name}_randread_vs_c`] = Number(qd1.toFixed(3));
    }
  }
  return o;
}

/**
 * `--suite async`: the same RAM disk written four ways, same boot, points interleaved, medians
 * of `--rounds` (default 3) rounds: ring-native (`-t mem`), the async module served in the
 * queue threads answering at once (examples/ramdisk.mjs), the same answering from the event
 * loop (bench/ramdisk-loop.mjs: a setImmediate per request), and the same functions as closures
 * of one process's main thread (bench/ublk-async-mem.ts: the cross-thread path). 1 and 2 queues
 * (one fio job per queue), QD 1 and 32; QD 1 also gives the median and p99 latency.
 */
async function asyncSuite(): Promise<Record<string, number>> {
  const rounds = Number(opt('--rounds', '3'));
  const s = sampleSet();
  const kinds = [
    ['native', 'ring-native mem'],
    ['module', 'async module, answers at once'],
    ['loop', 'async module, answers from the event loop'],
    ['main', 'async closures on the main thread'],
  ] as const;
  for (const queues of [1, 2]) {
    const devs: Record<string, number> = {};
    const stops: Array<() => Promise<void>> = [];
    devs.native = ublkAdd(['-t', 'mem', '-s', '256M', '-q', String(queues), '-d', '128']);
    devs.module = ublkAdd(['-t', join(root, 'examples', 'ramdisk.mjs'), '--size', '256M', '-q', String(queues), '-d', '128']);
    devs.loop = ublkAdd(['-t', join(root, 'bench', 'ramdisk-loop.mjs'), '--size', '256M', '-q', String(queues), '-d', '128']);
    process.stderr.write(`bench: ${queues} queue(s): ring-native ${devs.native}, module ${devs.module}, event-loop module ${devs.loop}; starting the main-thread server\n`);
    const child = spawn(process.execPath, ['--import', 'tsx', join(root, 'bench', 'ublk-async-mem.ts'), String(queues), '256'], { stdio: ['ignore', 'pipe', 'inherit'] });
    devs.main = (JSON.parse(await new Promise<string>((res) => createInterface({ input: child.stdout }).once('line', res))) as { devId: number }).devId;
    stops.push(() => new Promise((res) => { child.once('exit', () => res()); child.kill('SIGTERM'); }));
    for (const id of Object.values(devs)) setNone(`ublkb${id}`);
    for (let round = 0; round < rounds; round++) {
      for (const rw of ['randread', 'randwrite']) {
        for (const qd of [1, 32]) {
          for (const [kind] of kinds) {
            const r = fio(`ublkb${devs[kind]}`, rw, qd, queues);
            const key = `q${queues}_${rw}_qd${qd}_${kind}`;
            s.put(`${key}_iops`, r.iops);
            s.put(`${key}_p50`, r.p50);
            s.put(`${key}_p99`, r.p99);
            process.stderr.write(`bench: round ${round + 1}: ${key}: ${Math.round(r.iops)} IOPS, p50 ${r.p50.toFixed(0)} us\n`);
          }
        }
      }
    }
    for (const [kind, id] of Object.entries(devs)) if (kind !== 'main') ublkDel(id);
    for (const stop of stops) await stop();
  }
  console.log(`\nasync targets vs the ring-native mem target, ${header()}, medians of ${rounds} rounds\n`);
  console.log(`| queues x jobs | workload | QD | ring-native IOPS | ${kinds.slice(1).map(([, label]) => `${label} IOPS (/ native)`).join(' | ')} |`);
  console.log(`|---|---|---|---|${kinds.slice(1).map(() => '---').join('|')}|`);
  const o: Record<string, number> = {};
  for (const queues of [1, 2]) {
    for (const rw of ['randread', 'randwrite']) {
      for (const qd of [1, 32]) {
        const v = (kind: string, what = 'iops') => s.median(`q${queues}_${rw}_qd${qd}_${kind}_${what}`);
        const cols = kinds.slice(1).map(([kind]) => {
          o[`async_q${queues}_${rw}_qd${qd}_${kind}_vs_native`] = Number((v(kind) / v('native')).toFixed(3));
          return `${k(v(kind))} (**${(v(kind) / v('native')).toFixed(2)}x**)`;
        });
        console.log(`| ${queues} | ${rw} | ${qd} | ${k(v('native'))} | ${cols.join(' | ')} |`);
      }
    }
  }
  console.log('\nQD 1 completion latency, median / p99 (µs):\n');
  console.log(`| queues | workload | ${kinds.map(([, label]) => label).join(' | ')} |`);
  console.log(`|---|---|${kinds.map(() => '---').join('|')}|`);
  for (const queues of [1, 2]) {
    for (const rw of ['randread', 'randwrite']) {
      const v = (kind: string, what: string) => s.median(`q${queues}_${rw}_qd1_${kind}_${what}`);
      console.log(`| ${queues} | ${rw} | ${kinds.map(([kind]) => `${v(kind, 'p50').toFixed(0)} / ${v(kind, 'p99').toFixed(0)}`).join(' | ')} |`);
      for (const [kind] of kinds) o[`async_q${queues}_${rw}_qd1_${kind}_p50_us`] = Math.round(v(kind, 'p50'));
    }
  }
  return o;
}

const k = (n: number) => `${(n / 1000).toFixed(1)}k`;
const header = () => `${process.env.UBLK_VM_PACKAGE}, ${readdirSync('/sys/devices/system/cpu').filter((d) => /^cpu\d+$/.test(d)).length} vCPUs, fio io_uring 4k, ${seconds} s per point, one boot`;
const suite = opt('--suite', 'all');
const out: Record<string, number> = {};
if (suite === 'all' || suite === 'null') Object.assign(out, await nullSuite());
if (suite === 'all' || suite === 'loop') Object.assign(out, await loopSuite());
if (suite === 'cost') Object.assign(out, await costSuite());
if (suite === 'modes') Object.assign(out, await modesSuite());
if (suite === 'shmem') Object.assign(out, await shmemSuite());
if (suite === 'async') Object.assign(out, await asyncSuite());
if (suite === 'nbd') Object.assign(out, await (await import('./ublk-nbd.js')).nbdSuite({ KROOT, opt, runFio, setNone, ublkAdd, ublkDel, cAdd, sampleSet, k, header }));
if (suite === 'qcow2') Object.assign(out, await (await import('./ublk-qcow2.js')).qcow2Suite({ KROOT, opt, runFio, setNone, ublkAdd, ublkDel, cAdd, sampleSet, k, header }));
if (json) console.log(JSON.stringify(out));
