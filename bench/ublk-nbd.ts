/**
 * `npm run bench:ublk -- --suite nbd`: our nbd target against the kernel's own NBD client, both
 * reaching the same nbdkit memory server in the same boot (run inside the VM by bench/ublk.ts).
 *
 * For each transport (`--transports tcp,unix`: TCP on loopback, a Unix socket; one nbdkit per
 * transport, its RAM disk filled with random data first) and each queue count (`--queues 1,2`:
 * our `-q N` against `nbd-client -C N`, N connections either way, N fio jobs), 4 KiB randread and
 * randwrite at each of `--qds` (default 1,32), fio --direct=1, the two devices interleaved point
 * by point, `--rounds` rounds (default 3), medians. Prints IOPS and ours / kernel; the issue's
 * yardstick is QD 32 (randread + randwrite summed), >= 1.0x.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';

/** What bench/ublk.ts shares with its suites. */
export interface BenchContext {
  KROOT: string;
  opt(name: string, dflt: string): string;
  runFio(dev: string, rw: string, qd: number, jobs: number): number;
  setNone(dev: string): void;
  ublkAdd(args: string[]): number;
  ublkDel(id: number): unknown;
  sampleSet(): { put(key: string, v: number): void; median(key: string): number };
  k(n: number): string;
  header(): string;
}

export const PORT = 10809;
export const SOCK = '/tmp/ublk-bench-nbd.sock';
const sh = (cmd: string, a: string[]) => execFileSync(cmd, a, { encoding: 'utf8' });
const sleepSync = (ms: number) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);

/** Whether something listens on 127.0.0.1:PORT (/proc/net/tcp, state 0A). */
const listening = () => readFileSync('/proc/net/tcp', 'utf8').includes(`0100007F:${PORT.toString(16).toUpperCase().padStart(4, '0')} 00000000:0000 0A`);

/** nbdkit's memory plugin (`mib` MiB) on the transport, in the foreground; returns once it listens. */
export function startNbdkit(transport: string, mib: number): ChildProcess {
  if (transport === 'unix') rmSync(SOCK, { force: true });
  const where = transport === 'unix' ? ['-U', SOCK] : ['-i', '127.0.0.1', '-p', String(PORT)];
  const child = spawn('nbdkit', ['-f', '--exit-with-parent', ...where, 'memory', `size=${mib}M`], { stdio: ['ignore', 'inherit', 'inherit'] });
  const until = Date.now() + 30_000;
  while (!(transport === 'unix' ? existsSync(SOCK) : listening())) {
    if (Date.now() > until || child.exitCode !== null) throw new Error(`bench: nbdkit did not start on ${transport}`);
    sleepSync(100);
  }
  sleepSync(300); // the Unix socket exists from bind(), before listen()
  return child;
}

export async function nbdSuite(c: BenchContext): Promise<Record<string, number>> {
  const transports = c.opt('--transports', 'tcp,unix').split(',');
  const queueCounts = c.opt('--queues', '1').split(',').map(Number);
  const qds = c.opt('--qds', '1,32').split(',').map(Number);
  const rounds = Number(c.opt('--rounds', '3'));
  const mib = 128;
  if (!existsSync('/dev/nbd0')) sh('modprobe', ['-d', c.KROOT, 'nbd', `nbds_max=${Math.max(...queueCounts, 2) * 2}`]);
  const { put, median } = c.sampleSet();
  const log = (line: string) => process.stderr.write(`bench: ${line}\n`);
  for (const transport of transports) {
    const server = startNbdkit(transport, mib);
    const where = transport === 'unix' ? ['-unix', SOCK] : ['127.0.0.1', String(PORT)];
    const ours = transport === 'unix' ? ['--socket', SOCK] : ['--host', '127.0.0.1', '--port', String(PORT)];
    const pairs: Array<{ q: number; ours: string; kernel: string; id: number }> = [];
    queueCounts.forEach((q, i) => {
      const nbd = `nbd${i}`;
      sh('nbd-client', [...where, `/dev/${nbd}`, '-b', '4096', '-C', String(q)]);
      const id = c.ublkAdd(['-t', 'nbd', ...ours, '-q', String(q), '-d', '128']);
      pairs.push({ q, ours: `ublkb${id}`, kernel: nbd, id });
      c.setNone(nbd);
      c.setNone(`ublkb${id}`);
    });
    // Random data in the server's RAM disk (both devices read the same memory).
    sh('dd', ['if=/dev/urandom', `of=/dev/${pairs[0]!.kernel}`, 'bs=1M', `count=${mib}`, 'oflag=direct', 'status=none']);
    for (let round = 1; round <= rounds; round++) {
      for (const { q, ours: o, kernel } of pairs) {
        for (const rw of ['randread', 'randwrite']) {
          for (const qd of qds) {
            for (const [side, dev] of [['ours', o], ['kernel', kernel]] as const) {
              const iops = c.runFio(dev, rw, qd, q);
              put(`${transport} ${q} ${rw} ${qd} ${side}`, iops);
              log(`round ${round}/${rounds} ${transport} ${q}q ${rw} QD${qd} ${side}: ${Math.round(iops)} IOPS`);
            }
          }
        }
      }
    }
    for (const { id, kernel } of pairs) {
      c.ublkDel(id);
      spawnSync('nbd-client', ['-d', `/dev/${kernel}`]);
    }
    server.kill('SIGTERM');
    await new Promise((res) => server.once('exit', res));
  }

  const label: Record<string, string> = { tcp: 'TCP, loopback', unix: 'Unix socket' };
  console.log(`\nublk -t nbd vs the kernel's NBD client (nbd-client -C N), the same nbdkit memory server (${mib} MiB), ${c.header()}, ` +
    `N queues = N connections = N fio jobs, median of ${rounds} interleaved rounds\n`);
  console.log('| transport | queues | workload | QD | ours IOPS | kernel nbd IOPS | ours / kernel |');
  console.log('|---|---|---|---|---|---|---|');
  const out: Record<string, number> = {};
  for (const transport of transports) {
    for (const q of queueCounts) {
      for (const rw of ['randread', 'randwrite']) {
        for (const qd of qds) {
          const v = (side: string) => median(`${transport} ${q} ${rw} ${qd} ${side}`);
          const r = v('ours') / v('kernel');
          console.log(`| ${label[transport] ?? transport} | ${q} | ${rw} | ${qd} | ${c.k(v('ours'))} | ${c.k(v('kernel'))} | **${r.toFixed(2)}x** |`);
          out[`nbd_${transport}_q${q}_${rw}_qd${qd}_vs_kernel`] = Number(r.toFixed(3));
        }
      }
    }
  }
  if (qds.includes(32)) {
    console.log('');
    for (const transport of transports) {
      for (const q of queueCounts) {
        const sum = (side: string) => ['randread', 'randwrite'].reduce((s, rw) => s + median(`${transport} ${q} ${rw} 32 ${side}`), 0);
        const r = sum('ours') / sum('kernel');
        console.log(`${label[transport] ?? transport}, ${q} queue(s): randread + randwrite at QD 32: **${r.toFixed(2)}x** the kernel's NBD client (target >= 1.0x)`);
        out[`nbd_${transport}_q${q}_qd32_rw_sum_vs_kernel`] = Number(r.toFixed(3));
      }
    }
  }
  return out;
}
