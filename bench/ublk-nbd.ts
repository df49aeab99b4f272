/**
 * `npm run bench:ublk -- --suite nbd`: our nbd target against the kernel's own NBD client, both
 * reaching the same nbdkit memory server in the same boot (run inside the VM by bench/ublk.ts).
 *
 * For each transport (`--transports tcp,unix`: TCP on loopback, a Unix socket; one nbdkit per
 * transport, its RAM disk filled with random data first) and each queue count (`--queues 1,2`:
 * our `-q N` against `nbd-client -C N`, N connections either way, N fio jobs), 4 KiB randread and
 * randwrite at each of `--qds` (default 1,32), fio --direct=1, the two devices interleaved point
 * by point, `--rounds` rounds (default 3), medians. Prints IOPS and ours / kernel; the issue's
 * yardstick is QD 32 (randread + randwrite summed), >= 1.0x. `--modes` adds a device of ours per
 * data path (MODE_ARGS: in `-u` and the zero-copy modes `-z`/`--auto_zc` the nbd target moves a
 * READ's data by pwrite on /dev/ublkcN straight from its receive buffer into the request, a
 * WRITE's by pread into the tag buffer, then sendmsg; `+b` adds batch I/O), and `--c-ublk PATH`
 * one of C ublksrv's own nbd target. Each point also prints how busy the VM's CPUs were
 * and the CPU time per I/O of the whole VM, and of each command (our server's threads as user
 * and system time): under emulation the CPUs are nearly the limit, so CPU per I/O is where a
 * difference comes from.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, rmSync } from 'node:fs';

/** What bench/ublk.ts shares with its suites. */
export interface BenchContext {
  KROOT: string;
  opt(name: string, dflt: string): string;
  runFio(dev: string, rw: string, qd: number, jobs: number): number;
  setNone(dev: string): void;
  ublkAdd(args: string[]): number;
  ublkDel(id: number): unknown;
  /** `bin add ARGS...` with C ublksrv's CLI (`--c-ublk`): the device's id. */
  cAdd(bin: string, args: string[]): number;
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

/** The whole VM's CPU time so far, busy and all, in clock ticks (/proc/stat's first line). */
function cpuTicks(): { busy: number; all: number; switches: number } {
  const stat = readFileSync('/proc/stat', 'utf8');
  const f = stat.split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  const all = f.reduce((a, b) => a + b, 0);
  // idle and iowait are not busy; ctxt: context switches so far, every CPU
  return { busy: all - f[3]! - f[4]!, all, switches: Number(/^ctxt (\d+)/m.exec(stat)![1]) };
}

/** CPU ticks so far of every thread alive now, summed by command name (kworkers by their kind). */
function ticksByComm(): Map<string, number> {
  const m = new Map<string, number>();
  for (const pid of readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    let tids: string[];
    try {
      tids = readdirSync(`/proc/${pid}/task`);
    } catch {
      continue;
    }
    for (const tid of tids) {
      let stat: string;
      try {
        stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
      } catch {
        continue;
      }
      const close = stat.lastIndexOf(')');
      const comm = stat.slice(stat.indexOf('(') + 1, close).replace(/[/:]\d.*$/, '').replace(/\d+$/, '');
      const f = stat.slice(close + 2).split(' ');
      // Our server's threads split into user (JavaScript, koffi) and system time.
      if (comm === 'node' || comm.startsWith('ublk')) {
        m.set(`${comm} user`, (m.get(`${comm} user`) ?? 0) + Number(f[11]));
        m.set(`${comm} sys`, (m.get(`${comm} sys`) ?? 0) + Number(f[12]));
      } else m.set(comm, (m.get(comm) ?? 0) + Number(f[11]) + Number(f[12]));
    }
  }
  return m;
}

/** Our data-path modes the nbd target serves, as `add` options (--modes). */
const MODE_ARGS: Record<string, string[]> = {
  copy: [], get_data: ['-g'], user_copy: ['-u'], zero_copy: ['-z'], auto_zc: ['--auto_zc'],
  // Batch I/O (7.0): the same data paths, requests fetched and answered in groups.
  'copy+b': ['-b'], 'auto_zc+b': ['--auto_zc', '-b'],
};

export async function nbdSuite(c: BenchContext): Promise<Record<string, number>> {
  const transports = c.opt('--transports', 'tcp,unix').split(',');
  const queueCounts = c.opt('--queues', '1').split(',').map(Number);
  const qds = c.opt('--qds', '1,32').split(',').map(Number);
  const rounds = Number(c.opt('--rounds', '3'));
  const modes = c.opt('--modes', 'copy').split(',');
  // C ublksrv's own nbd target (`--c-ublk PATH`, bench/build-c-ublksrv.sh), as one more "mode":
  // another userspace ublk server, to tell what any ublk server pays from what ours does.
  for (const m of modes) if (!(m in MODE_ARGS)) throw new Error(`bench: --modes: ${m} is not one of ${Object.keys(MODE_ARGS).join(', ')}`);
  const cBin = c.opt('--c-ublk', '');
  if (cBin) modes.push('c_ublksrv');
  const mib = 128;
  if (!existsSync('/dev/nbd0')) sh('modprobe', ['-d', c.KROOT, 'nbd', `nbds_max=${Math.max(...queueCounts, 2) * 2}`]);
  const { put, median } = c.sampleSet();
  const ncpu = readFileSync('/proc/stat', 'utf8').split('\n').filter((l) => /^cpu\d/.test(l)).length;
  const log = (line: string) => process.stderr.write(`bench: ${line}\n`);
  for (const transport of transports) {
    const server = startNbdkit(transport, mib);
    const where = transport === 'unix' ? ['-unix', SOCK] : ['127.0.0.1', String(PORT)];
    const ours = transport === 'unix' ? ['--socket', SOCK] : ['--host', '127.0.0.1', '--port', String(PORT)];
    const theirs = transport === 'unix' ? ['--unix', SOCK] : ['--host', '127.0.0.1', '--port', String(PORT)];
    const pairs: Array<{ q: number; ours: Array<{ mode: string; dev: string; id: number }>; kernel: string }> = [];
    queueCounts.forEach((q, i) => {
      const nbd = `nbd${i}`;
      sh('nbd-client', [...where, `/dev/${nbd}`, '-b', '4096', '-C', String(q)]);
      c.setNone(nbd);
      const mine = modes.map((mode) => {
        const id = mode === 'c_ublksrv'
          ? c.cAdd(cBin, ['-t', 'nbd', ...theirs, '-q', String(q), '-d', '128'])
          : c.ublkAdd(['-t', 'nbd', ...ours, '-q', String(q), '-d', '128', ...MODE_ARGS[mode]!]);
        c.setNone(`ublkb${id}`);
        return { mode, dev: `ublkb${id}`, id };
      });
      pairs.push({ q, ours: mine, kernel: nbd });
    });
    // Random data in the server's RAM disk (both devices read the same memory).
    sh('dd', ['if=/dev/urandom', `of=/dev/${pairs[0]!.kernel}`, 'bs=1M', `count=${mib}`, 'oflag=direct', 'status=none']);
    // A warm-up on every device, not measured: our server has just started, and V8 compiles
    // its hot functions during the first seconds of load (measured: the server's user time per
    // I/O three times higher in a first round than in later ones). A server runs for hours.
    for (const { q, ours: mine, kernel } of pairs) {
      for (const dev of [...mine.map((m) => m.dev), kernel]) for (const rw of ['randread', 'randwrite']) c.runFio(dev, rw, 32, q);
    }
    for (let round = 1; round <= rounds; round++) {
      for (const { q, ours: mine, kernel } of pairs) {
        for (const rw of ['randread', 'randwrite']) {
          for (const qd of qds) {
            for (const [side, dev] of [...mine.map((m) => [`ours ${m.mode}`, m.dev] as const), ['kernel', kernel] as const]) {
              const byCommBefore = ticksByComm();
              const before = cpuTicks();
              const iops = c.runFio(dev, rw, qd, q);
              const after = cpuTicks();
              const byComm = [...ticksByComm()].map(([k, v]) => [k, v - (byCommBefore.get(k) ?? 0)] as const).filter(([, v]) => v > 0).sort((a, b) => b[1] - a[1]);
              put(`${transport} ${q} ${rw} ${qd} ${side}`, iops);
              // Whether the VM's CPUs were the limit (busy near 100%), and the CPU each request
              // cost the whole machine (server, client, kernel) over fio's whole run, by command.
              const busy = (after.busy - before.busy) / (after.all - before.all);
              const seconds = (after.all - before.all) / 100 / ncpu;
              const usPerIo = ((after.busy - before.busy) / 100) * 1e6 / (iops * seconds);
              const switchesPerIo = (after.switches - before.switches) / (iops * seconds);
              put(`${transport} ${q} ${rw} ${qd} ${side} cpu`, usPerIo);
              log(`round ${round}/${rounds} ${transport} ${q}q ${rw} QD${qd} ${side}: ${Math.round(iops)} IOPS, CPUs ${Math.round(busy * 100)}% busy, ` +
                `${Math.round(usPerIo)} µs of CPU and ${switchesPerIo.toFixed(2)} context switches per I/O ` +
                `(${byComm.slice(0, 6).map(([k, v]) => `${k} ${Math.round((v / 100) * 1e6 / (iops * seconds))}`).join(', ')})`);
            }
          }
        }
      }
    }
    for (const { ours: mine, kernel } of pairs) {
      for (const { id, mode } of mine) {
        if (mode === 'c_ublksrv') sh(cBin, ['del', '-n', String(id)]);
        else c.ublkDel(id);
      }
      spawnSync('nbd-client', ['-d', `/dev/${kernel}`]);
    }
    server.kill('SIGTERM');
    await new Promise((res) => server.once('exit', res));
  }

  const label: Record<string, string> = { tcp: 'TCP, loopback', unix: 'Unix socket' };
  console.log(`\nublk -t nbd vs the kernel's NBD client (nbd-client -C N), the same nbdkit memory server (${mib} MiB), ${c.header()}, ` +
    `N queues = N connections = N fio jobs, median of ${rounds} interleaved rounds; CPU: the whole VM's, per I/O\n`);
  console.log('| transport | queues | ours in mode | workload | QD | ours IOPS | kernel nbd IOPS | ours / kernel | CPU µs per I/O, ours / kernel |');
  console.log('|---|---|---|---|---|---|---|---|---|');
  const out: Record<string, number> = {};
  // The original keys (copy mode) stay as they were; another mode's carry its name.
  const keyMode = (mode: string) => (mode === 'copy' ? '' : `_${mode}`);
  for (const transport of transports) {
    for (const q of queueCounts) {
      for (const mode of modes) {
        for (const rw of ['randread', 'randwrite']) {
          for (const qd of qds) {
            const v = (side: string) => median(`${transport} ${q} ${rw} ${qd} ${side}`);
            const r = v(`ours ${mode}`) / v('kernel');
            console.log(`| ${label[transport] ?? transport} | ${q} | ${mode} | ${rw} | ${qd} | ${c.k(v(`ours ${mode}`))} | ${c.k(v('kernel'))} | **${r.toFixed(2)}x** | ` +
              `${Math.round(v(`ours ${mode} cpu`))} / ${Math.round(v('kernel cpu'))} |`);
            out[`nbd_${transport}_q${q}${keyMode(mode)}_${rw}_qd${qd}_vs_kernel`] = Number(r.toFixed(3));
          }
        }
      }
    }
  }
  if (qds.includes(32)) {
    console.log('');
    for (const transport of transports) {
      for (const q of queueCounts) {
        for (const mode of modes) {
          const sum = (side: string) => ['randread', 'randwrite'].reduce((s, rw) => s + median(`${transport} ${q} ${rw} 32 ${side}`), 0);
          const r = sum(`ours ${mode}`) / sum('kernel');
          console.log(`${label[transport] ?? transport}, ${q} queue(s), ${mode} mode: randread + randwrite at QD 32: **${r.toFixed(2)}x** the kernel's NBD client (target >= 1.0x)`);
          out[`nbd_${transport}_q${q}${keyMode(mode)}_qd32_rw_sum_vs_kernel`] = Number(r.toFixed(3));
        }
      }
    }
  }
  return out;
}
