/**
 * `npm run bench:ublk -- --suite qcow2`: our qcow2 target against qemu-storage-daemon serving
 * the same image over NBD (a Unix socket) to the kernel's NBD client, in one boot (run inside
 * the VM by bench/ublk.ts).
 *
 * The image: `--mib` MiB (default 256) of random data converted to qcow2 v3 with 64 KiB
 * clusters on tmpfs, every cluster allocated, so that reads hit data and writes overwrite in
 * place (steady state, not first allocation). Each side gets its own copy (two servers must not
 * write one image). qemu-storage-daemon's file node uses the page cache as ours does (its
 * default, cache.direct=off). 4 KiB randread and randwrite at QD 1 and 32 (`--qds`), fio
 * --direct=1 on /dev/ublkbN and /dev/nbd0, one job, points interleaved, `--rounds` rounds
 * (default 3), medians; prints IOPS and ours / qemu. Both images must pass `qemu-img check`
 * afterwards.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';

/** What bench/ublk.ts hands its suites: the same for every suite, declared once in ublk-nbd.ts. */
import type { BenchContext } from './ublk-nbd.js';

const SOCK = '/tmp/ublk-bench-qsd.sock';
const sh = (cmd: string, a: string[]) => execFileSync(cmd, a, { encoding: 'utf8' });
const sleepSync = (ms: number) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);

export async function qcow2Suite(c: BenchContext): Promise<Record<string, number>> {
  const mib = Number(c.opt('--mib', '256'));
  const qds = c.opt('--qds', '1,32').split(',').map(Number);
  const rounds = Number(c.opt('--rounds', '3'));
  const log = (line: string) => process.stderr.write(`bench: ${line}\n`);
  const raw = '/tmp/ublk-bench-qcow2.raw';
  const ours = '/tmp/ublk-bench-ours.qcow2';
  const theirs = '/tmp/ublk-bench-qemu.qcow2';
  sh('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', `count=${mib}`, 'status=none']);
  sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'compat=1.1,cluster_size=65536', raw, ours]);
  rmSync(raw);
  sh('cp', [ours, theirs]);

  if (!existsSync('/dev/nbd0')) sh('modprobe', ['-d', c.KROOT, 'nbd', 'nbds_max=2']);
  rmSync(SOCK, { force: true });
  const qsd = spawn('qemu-storage-daemon', [
    '--blockdev', `driver=file,node-name=file0,filename=${theirs}`,
    '--blockdev', 'driver=qcow2,node-name=disk0,file=file0',
    '--nbd-server', `addr.type=unix,addr.path=${SOCK}`,
    '--export', 'type=nbd,id=exp0,node-name=disk0,name=disk,writable=on',
  ], { stdio: ['ignore', 'inherit', 'inherit'] });
  const until = Date.now() + 30_000;
  while (!existsSync(SOCK)) {
    if (Date.now() > until || qsd.exitCode !== null) throw new Error('bench: qemu-storage-daemon did not start');
    sleepSync(100);
  }
  sleepSync(300);
  sh('nbd-client', ['-unix', SOCK, '/dev/nbd0', '-N', 'disk', '-b', '4096']);
  const id = c.ublkAdd(['-t', 'qcow2', '-f', ours, '-d', '128']);
  const devs = { ours: `ublkb${id}`, qemu: 'nbd0' } as const;
  c.setNone(devs.ours);
  c.setNone(devs.qemu);
  const { put, median } = c.sampleSet();
  for (let round = 1; round <= rounds; round++) {
    for (const rw of ['randread', 'randwrite']) {
      for (const qd of qds) {
        for (const [side, dev] of Object.entries(devs)) {
          const iops = c.runFio(dev, rw, qd, 1);
          put(`${rw} ${qd} ${side}`, iops);
          log(`round ${round}/${rounds} qcow2 ${rw} QD${qd} ${side}: ${Math.round(iops)} IOPS`);
        }
      }
    }
  }
  c.ublkDel(id);
  spawnSync('nbd-client', ['-d', '/dev/nbd0']);
  qsd.kill('SIGTERM');
  await new Promise((res) => qsd.once('exit', res));
  const checks = [ours, theirs].map((f) => spawnSync('qemu-img', ['check', f], { encoding: 'utf8' }).status);

  console.log(`\nublk -t qcow2 vs qemu-storage-daemon's NBD export of the same image through the kernel's NBD client (Unix socket), ` +
    `${mib} MiB qcow2 v3, 64 KiB clusters, all allocated, on tmpfs, ${c.header()}, 1 fio job, median of ${rounds} interleaved rounds\n`);
  console.log('| workload | QD | ours IOPS | qemu-storage-daemon + nbd IOPS | ours / qemu |');
  console.log('|---|---|---|---|---|');
  const out: Record<string, number> = {};
  for (const rw of ['randread', 'randwrite']) {
    for (const qd of qds) {
      const v = (side: string) => median(`${rw} ${qd} ${side}`);
      const r = v('ours') / v('qemu');
      console.log(`| ${rw} | ${qd} | ${c.k(v('ours'))} | ${c.k(v('qemu'))} | **${r.toFixed(2)}x** |`);
      out[`qcow2_${rw}_qd${qd}_vs_qsd_nbd`] = Number(r.toFixed(3));
    }
  }
  console.log(`\nqemu-img check afterwards: ours exit ${checks[0]}, qemu's exit ${checks[1]} (0: clean)`);
  rmSync(ours, { force: true });
  rmSync(theirs, { force: true });
  return out;
}
