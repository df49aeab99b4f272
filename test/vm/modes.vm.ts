/**
 * The data-path modes (src/ublk/modes.ts) on a real kernel, each on loop and mem: fio write +
 * crc32c verify through UBLK_MODES_MIB MiB (16 in `npm test`; UBLK_MODES_FULL=1 sets 256, the
 * full count, and also runs what `npm test` leaves out to stay within its time: each case's
 * `short` list says which of its tests run by default, the others repeating a path another case
 * covers) at 4k and 128k, QD 1 and 64 (`npm test`: 4k QD 64 and 128k QD 1); `ublk list` shows
 * the mode and the kernel kept its flag; del and kill -9 under load leave no device and no server
 * behind. The default mode, copy, has the same checks in loop.vm.ts.
 *
 * The zero-copy modes (-z, --auto_zc, --auto_zc_fallback with every automatic registration made
 * to fail, so each request takes the fallback) also get ext4: mkfs, files, e2fsck and checksums
 * after a re-add; and after each del or kill -9 the device must be gone, which ublk_drv allows
 * only once every registered request buffer was dropped.
 *
 * Batch I/O (-b, 7.0) is not a data path but goes with each: the copy mode gets every check, and
 * -b with -u, -z and --auto_zc each get fio (the last also ext4 and the kill tests).
 *
 * A mode the running kernel lacks is not skipped: its refusal is what is tested (one line that
 * names the kernel that added it, and no device made).
 */
import t from 'tap';
import { mkdtempSync, readdirSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { release } from 'node:os';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { UblkControl } from '../../src/ublk/control.js';
import { DATA_PATH_MODES, modeAvailable } from '../../src/ublk/modes.js';
import { UBLK_F_AUTO_BUF_REG, UBLK_F_BATCH_IO, UBLK_F_SHMEM_ZC, UBLK_F_NEED_GET_DATA, UBLK_F_PER_IO_DAEMON, UBLK_F_SUPPORT_ZERO_COPY, UBLK_F_USER_COPY } from '../../src/ublk/abi.js';
import {
  EXT, nodeArgsFor, addDevice, alive, exists, ext4RoundTrip, fioBackground, fioJob, fioVerify, killServer, listed, serverPid, sleep, ublk, ublkIds, waitFor,
  noDeviceLeftBehind,
} from './helpers.js';

const MiB = 2 ** 20;
const FULL = process.env.UBLK_MODES_FULL === '1';
const TOTAL = Number(process.env.UBLK_MODES_MIB ?? (FULL ? 256 : 16)) * MiB;
const work = mkdtempSync('/tmp/ublk-modes-');
t.teardown(() => rmSync(work, { recursive: true, force: true }));

t.afterEach(noDeviceLeftBehind);
// Each test's backing files go when it ends: they live in the guest's RAM (tmpfs), and a
// dozen 256 MiB images would fill it (the writes then fail with ENOSPC, which is not the mode's fault).
t.afterEach(() => {
  for (const f of readdirSync(work)) if (f.endsWith('.img')) rmSync(join(work, f), { force: true });
});

/** The tests of a case: fio verify on loop and on mem, kill/del under load, kill + recover, ext4. */
type Part = 'loop' | 'mem' | 'kill' | 'recover' | 'ext4';

interface ModeCase {
  /** The test's name for it. */
  label: string;
  /** The data_path `ublk list` shows. */
  name: string;
  args: string[];
  flag: number;
  since: string;
  /** A zero-copy mode: ext4 too. */
  zc?: boolean;
  /** Environment for the server (UBLK_TEST_FORCE_REG_FALLBACK). */
  env?: Record<string, string>;
  /** Per-I/O threads: this many per queue (`--nthreads Q*k --per_io_tasks`). */
  threadsPerQueue?: number;
  /**
   * Without UBLK_MODES_FULL, only these tests (the rest repeat a path another case covers: the
   * kill and recover tests where the data path does not change what they exercise, a second
   * target or ext4 where another mode with the same buffers has them).
   */
  short?: Part[];
  /** Batch I/O (-b): `ublk list` must say so. */
  batch?: boolean;
}
const MODES: ModeCase[] = [
  { label: 'get_data', name: 'get_data', args: ['-g'], flag: UBLK_F_NEED_GET_DATA, since: '6.0', short: ['loop'] },
  { label: 'user_copy', name: 'user_copy', args: ['-u'], flag: UBLK_F_USER_COPY, since: '6.5', short: ['mem'] },
  { label: 'zero_copy', name: 'zero_copy', args: ['-z'], flag: UBLK_F_SUPPORT_ZERO_COPY, since: '6.15', zc: true, short: ['loop'] },
  { label: 'auto_zc', name: 'auto_zc', args: ['--auto_zc'], flag: UBLK_F_AUTO_BUF_REG, since: '6.16', zc: true, short: ['loop', 'ext4'] },
  {
    label: 'auto_zc_fallback', name: 'auto_zc', args: ['--auto_zc_fallback'], flag: UBLK_F_AUTO_BUF_REG, since: '6.16', zc: true,
    env: { UBLK_TEST_FORCE_REG_FALLBACK: '1' }, short: ['loop'],
  },
  // Not a data path: each queue's tags split between two threads (UBLK_F_PER_IO_DAEMON), here
  // together with auto_zc, the mode the kernel that has one also has.
  {
    label: 'per_io_tasks + auto_zc', name: 'auto_zc', args: ['--auto_zc'], flag: UBLK_F_PER_IO_DAEMON, since: '6.16', threadsPerQueue: 2,
    short: ['loop'],
  },
  // Batch I/O: how requests travel, with each data path (the kernel refuses only -g next to it).
  { label: 'batch', name: 'copy', args: ['-b'], flag: UBLK_F_BATCH_IO, since: '7.0', batch: true, short: ['loop', 'recover'] },
  { label: 'batch + user_copy', name: 'user_copy', args: ['-b', '-u'], flag: UBLK_F_BATCH_IO, since: '7.0', batch: true, short: ['loop'] },
  { label: 'batch + zero_copy', name: 'zero_copy', args: ['-b', '-z'], flag: UBLK_F_BATCH_IO, since: '7.0', batch: true, short: ['mem'] },
  {
    label: 'batch + auto_zc', name: 'auto_zc', args: ['-b', '--auto_zc'], flag: UBLK_F_BATCH_IO, since: '7.0', batch: true, zc: true,
    short: ['loop', 'kill'],
  },
];

const ctrl = new UblkControl();
const kernelFeatures = ctrl.features();
ctrl.close();
/** The kernel has the mode: its feature bit, and (zero copy, whose bit is older than it works) the release. */
const kernelHas = (m: ModeCase) => (kernelFeatures & m.flag) !== 0 && modeAvailable(DATA_PATH_MODES.find((x) => x.name === m.name)!, kernelFeatures, release());
/** Batch cases run only where the kernel has batch I/O; the copy case alone tests the refusal. */
const refusalTested = (m: ModeCase) => !m.batch || m.args.length === 1;

/** A device of `target` in `mode`, 256 MiB (loop over a sparse file in the guest's tmpfs). */
/** Runs `fn` with the mode's server environment set (the server inherits the CLI's). */
function withEnv<T>(mode: ModeCase, fn: () => T): T {
  const saved = Object.keys(mode.env ?? {}).map((k) => [k, process.env[k]] as const);
  Object.assign(process.env, mode.env);
  try {
    return fn();
  } finally {
    for (const [k, v] of saved) if (v === undefined) delete process.env[k]; else process.env[k] = v;
  }
}

function addIn(mode: ModeCase, target: 'loop' | 'mem', queues = 1, extra: string[] = []): number {
  return withEnv(mode, () => addWith(mode, target, queues, extra));
}

function addWith(mode: ModeCase, target: 'loop' | 'mem', queues: number, extra0: string[]): number {
  const extra = mode.threadsPerQueue ? [...extra0, '--nthreads', String(queues * mode.threadsPerQueue), '--per_io_tasks'] : extra0;
  if (target === 'mem') return addDevice('-t', 'mem', '-s', '256M', '-q', String(queues), ...mode.args, ...extra);
  const file = join(work, `${mode.label}-${Date.now()}.img`);
  writeFileSync(file, '');
  truncateSync(file, 256 * MiB);
  return addDevice('-t', 'loop', '-f', file, '-q', String(queues), ...mode.args, ...extra);
}

// UBLK_MODES_ONLY=a,b runs only the cases whose label starts with one of them (for work on some
// modes, or a full count split into runs that each fit a VM session).
const only = process.env.UBLK_MODES_ONLY?.split(',');
const picked = (label: string) => only === undefined || only.some((o) => label.startsWith(o));
for (const mode of MODES.filter((m) => picked(m.label))) {
  if (!kernelHas(mode)) {
    if (!refusalTested(mode)) continue;
    t.test(`${mode.label} (${mode.args.join(' ')}): this kernel lacks it, and add says which kernel added it`, (t) => {
      const before = ublkIds();
      // A threads case is refused for its threads, whatever its data path.
      const r = ublk('add', '-t', 'null', ...(mode.threadsPerQueue ? ['--nthreads', '2', '--per_io_tasks'] : mode.args));
      t.equal(r.code, 1, 'add fails');
      t.match(r.stderr, new RegExp(`needs (UBLK_F_\\w+ \\()?Linux ${mode.since.replace('.', '\\.')}`), r.stderr);
      t.equal(r.stderr.trim().split('\n').length, 1, 'in one line');
      t.same(ublkIds(), before, 'no device was made');
      t.end();
    });
    continue;
  }

  /** This test runs: always with UBLK_MODES_FULL, and by default unless the case is short without it. */
  const runs = (what: Part) => FULL || !mode.short || mode.short.includes(what);
  for (const target of ['loop', 'mem'] as const) {
    if (!runs(target)) continue;
    t.test(`${mode.label} (${mode.args.join(' ')}), ${target}: fio write + crc32c verify through ${TOTAL / MiB} MiB, ${FULL ? '4k and 128k, QD 1 and 64' : '4k QD 64 and 128k QD 1'}`, (t) => {
      const id = addIn(mode, target);
      const listed = JSON.parse(ublk('list', '-n', String(id), '--json').stdout) as Array<{ flags: number; data_path: string; threads_per_queue: number; batch_io: boolean }>;
      t.equal(listed[0]!.batch_io, mode.batch === true, `list --json shows batch_io ${mode.batch === true}`);
      t.equal(listed[0]!.threads_per_queue, mode.threadsPerQueue ?? 1, `list --json shows ${mode.threadsPerQueue ?? 1} thread(s) per queue`);
      t.equal(listed[0]!.data_path, mode.name, `list --json shows data_path ${mode.name}`);
      t.ok(listed[0]!.flags & mode.flag, `the kernel kept the flag (flags 0x${listed[0]!.flags.toString(16)})`);
      const verbose = ublk('list', '-n', String(id), '-v').stdout;
      t.match(verbose, new RegExp(`data path ${mode.name}: `), 'list -v names the mode');
      if (mode.batch) t.match(verbose, /batch I\/O: /, 'list -v says batch I/O');
      if (mode.name === 'auto_zc') {
        // The forced fallback is real only if the queue said it registered buffers itself.
        const log = readFileSync((listed[0] as unknown as { log: string }).log, 'utf8');
        if (mode.env) t.match(log, /UBLK_IO_F_NEED_REG_BUF/, 'every automatic registration failed, and the queue registered the buffers');
        else t.notMatch(log, /UBLK_IO_F_NEED_REG_BUF/, 'the kernel registered every buffer itself');
      }
      for (const bs of ['4k', '128k']) {
        for (const qd of [1, 64]) {
          if (!FULL && (bs === '4k') === (qd === 1)) continue; // npm test: 4k QD 64 and 128k QD 1
          const r = fioVerify(`/dev/ublkb${id}`, { bs, qd, engine: 'io_uring', jobs: 1, total: TOTAL });
          t.ok(r.code === 0 && r.error === 0 && r.written === TOTAL && r.verified === TOTAL,
            `${bs} QD ${qd}: wrote ${r.written / MiB} MiB, verified ${r.verified / MiB} MiB, exit ${r.code}, error ${r.error}${r.code ? ` ${r.stderr.slice(-300)}` : ''}`);
        }
      }
      t.equal(ublk('del', '-n', String(id)).code, 0, 'del');
      t.end();
    });
  }

  if (runs('kill')) t.test(`${mode.label}: del and kill -9 under load (loop, 2 queues) leave no device and no server`, async (t) => {
    for (const how of ['del', 'kill -9'] as const) {
      const id = addIn(mode, 'loop', 2);
      const pid = serverPid(id);
      const job = fioBackground(`/dev/ublkb${id}`, 'randrw', { qd: 64, seconds: 60, extra: ['--numjobs=2', '--group_reporting'] });
      await new Promise((r) => setTimeout(r, 2000));
      if (how === 'kill -9') process.kill(pid, 'SIGKILL');
      const d = ublk('del', '-n', String(id));
      t.equal(d.code, 0, `${how}: del ${d.stderr}`);
      const r = await Promise.race([job.done, new Promise<undefined>((res) => setTimeout(() => res(undefined), 60_000))]);
      t.ok(r && (r.code !== 0 || r.error !== 0), `${how}: fio ended, with an error (exit ${r?.code}, error ${r?.error})`);
      t.ok(await waitFor(() => !alive(pid), 10_000), `${how}: the server is gone`);
      t.notOk(exists(`/dev/ublkb${id}`) || exists(`/dev/ublkc${id}`), `${how}: the device is gone`);
    }
  });
  if (runs('recover')) t.test(`${mode.label}: kill -9 under fio write + verify, then recover (-r 1 -i 1), twice: the recovering server serves the same mode, no errors`, async (t) => {
    const id = addIn(mode, 'loop', 2, ['-r', '1', '-i', '1']);
    const dev = `/dev/ublkb${id}`;
    for (let i = 0; i < 2; i++) {
      const job = fioJob(dev, ['--rw=randwrite', '--bs=4k', '--ioengine=io_uring', '--iodepth=16', '--direct=1',
        '--size=32M', `--offset=${i * 32}M`, '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', `--randseed=${2000 + i}`]);
      await sleep(500 + Math.floor(Math.random() * 1500));
      await killServer(t, id);
      const r = withEnv(mode, () => ublk('recover', '-n', String(id)));
      t.equal(r.code, 0, `cycle ${i}: recover ${r.stderr}`);
      const d = listed(id) as unknown as { data_path: string };
      t.equal(d.data_path, mode.name, `cycle ${i}: still ${mode.name}`);
      const f = await job.done;
      t.ok(f.code === 0 && f.error === 0, `cycle ${i}: fio write + verify across the kill: exit ${f.code}, error ${f.error}${f.code ? ` ${f.stderr.slice(-300)}` : ''}`);
    }
    t.equal(ublk('del', '-n', String(id)).code, 0, 'del');
  });
  if (mode.zc && runs('ext4')) {
    t.test(`${mode.label}: ext4 on loop: mkfs, files, e2fsck -fn clean, the same checksums after a re-add`, (t) => {
      const file = join(work, `${mode.label}-fs.img`);
      writeFileSync(file, '');
      truncateSync(file, 256 * MiB);
      withEnv(mode, () => ext4RoundTrip(t, file, join(work, 'mnt'), ['-q', '2', ...mode.args]));
      t.end();
    });
  }
}

/**
 * Shared-memory zero copy (--shmem_zc --htlb FILE, UBLK_F_SHMEM_ZC, 7.1): a client maps the file
 * the server registered and does O_DIRECT I/O from its pages (fixtures/shmem-client.ts). The
 * kernel must match them (the server logs its first in-place request), the data must come back
 * whole through shared pages and through private ones (those go the copy path), on mem and loop,
 * with and without batch I/O. On a kernel without it, one line naming 7.1 and no device.
 */
const CLIENT = new URL(`./fixtures/shmem-client${EXT}`, import.meta.url);
const SHM = '/dev/shm/ublk-modes-shm.img';
if (picked('shmem_zc') && !(kernelFeatures & UBLK_F_SHMEM_ZC)) {
  t.test('shmem_zc (--shmem_zc --htlb FILE): this kernel lacks it, and add says which kernel added it', (t) => {
    writeFileSync(SHM, '');
    truncateSync(SHM, 16 * MiB);
    const before = ublkIds();
    const r = ublk('add', '-t', 'null', '--shmem_zc', '--htlb', SHM);
    t.equal(r.code, 1, 'add fails');
    t.match(r.stderr, /needs (UBLK_F_SHMEM_ZC \()?Linux 7\.1/, r.stderr);
    t.equal(r.stderr.trim().split('\n').length, 1, 'in one line');
    t.same(ublkIds(), before, 'no device was made');
    rmSync(SHM, { force: true });
    t.end();
  });
} else if (picked('shmem_zc')) {
  // `full`: only with UBLK_MODES_FULL (loop with -b covers the same target path).
  const cases: Array<{ label: string; args: () => string[]; bs: number; qd: number; full?: boolean }> = [
    { label: 'mem', args: () => ['-t', 'mem', '-s', '64M'], bs: 64 * 1024, qd: 8 },
    { label: 'loop', args: () => ['-t', 'loop', '-f', backing()], bs: 4096, qd: 16, full: true },
    { label: 'loop, batch I/O (-b)', args: () => ['-t', 'loop', '-f', backing(), '-b'], bs: 128 * 1024, qd: 4 },
  ];
  for (const c of cases.filter((x) => FULL || !x.full)) {
    t.test(`shmem_zc, ${c.label}: O_DIRECT from the shared file's pages is served in place and reads back whole, shared and private`, (t) => {
      writeFileSync(SHM, '');
      truncateSync(SHM, 16 * MiB);
      t.teardown(() => rmSync(SHM, { force: true }));
      const id = addDevice(...c.args(), '--shmem_zc', '--htlb', SHM);
      const d = JSON.parse(ublk('list', '-n', String(id), '--json').stdout)[0] as { shmem_zc: boolean; shared_files: string[]; log: string; flags: number };
      t.ok(d.shmem_zc && d.flags & UBLK_F_SHMEM_ZC, 'list --json: shmem_zc, and the kernel kept the flag');
      t.same(d.shared_files, [SHM], 'list --json names the shared file');
      const total = 8 * MiB;
      const r = spawnSync(process.execPath, [...nodeArgsFor(CLIENT), `/dev/ublkb${id}`, SHM, String(total), String(c.bs), String(c.qd)], { encoding: 'utf8' });
      const out = r.status === 0 ? JSON.parse(r.stdout) as { written: number; verifiedShared: number; verifiedPrivate: number; errors: number } : undefined;
      t.same(out, { written: total, verifiedShared: total, verifiedPrivate: total, errors: 0 }, `client: ${r.stdout}${r.stderr}`);
      t.match(readFileSync(d.log, 'utf8'), /served in place from shared buffer 0 \(UBLK_IO_F_SHMEM_ZC\)/, 'the kernel matched the client\'s pages');
      t.equal(ublk('del', '-n', String(id)).code, 0, 'del');
      t.end();
    });
  }
  t.test('shmem_zc: usage errors make no device', (t) => {
    const before = ublkIds();
    t.match(ublk('add', '-t', 'null', '--shmem_zc').stderr, /--shmem_zc needs --htlb FILE/);
    t.match(ublk('add', '-t', 'null', '--shmem_zc', '--htlb', '/nonexistent').stderr, /--htlb \/nonexistent: ENOENT/);
    t.same(ublkIds(), before);
    t.end();
  });
}

/** A fresh 64 MiB backing file for loop. */
function backing(): string {
  const file = join(work, `shmem-${Date.now()}.img`);
  writeFileSync(file, '');
  truncateSync(file, 64 * MiB);
  return file;
}
