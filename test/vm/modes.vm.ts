/**
 * The data-path modes (src/ublk/modes.ts) on a real kernel, each on loop and mem: fio write +
 * crc32c verify through UBLK_MODES_MIB MiB (64 in `npm test`, 256 for the full count) at 4k and
 * 128k, QD 1 and 64; `ublk list` shows the mode and the
 * kernel kept its flag; del and kill -9 under load leave no device and no server behind. The
 * default mode, copy, has the same checks in loop.vm.ts.
 *
 * A mode the running kernel lacks is not skipped: its refusal is what is tested (one line that
 * names the kernel that added it, and no device made).
 */
import t from 'tap';
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { UblkControl } from '../../src/ublk/control.js';
import { UBLK_F_NEED_GET_DATA, UBLK_F_USER_COPY } from '../../src/ublk/abi.js';
import { addDevice, alive, exists, fioBackground, fioJob, fioVerify, killServer, listed, serverPid, sleep, ublk, ublkIds, waitFor, noDeviceLeftBehind } from './helpers.js';

const MiB = 2 ** 20;
const TOTAL = Number(process.env.UBLK_MODES_MIB ?? 64) * MiB;
const work = mkdtempSync('/tmp/ublk-modes-');
t.teardown(() => rmSync(work, { recursive: true, force: true }));

t.afterEach(noDeviceLeftBehind);

interface ModeCase { name: string; args: string[]; flag: number; since: string }
const MODES: ModeCase[] = [
  { name: 'get_data', args: ['-g'], flag: UBLK_F_NEED_GET_DATA, since: '6.0' },
  { name: 'user_copy', args: ['-u'], flag: UBLK_F_USER_COPY, since: '6.5' },
];

const ctrl = new UblkControl();
const kernelFeatures = ctrl.features();
ctrl.close();

/** A device of `target` in `mode`, 256 MiB (loop over a sparse file in the guest's tmpfs). */
function addIn(mode: ModeCase, target: 'loop' | 'mem', queues = 1, extra: string[] = []): number {
  if (target === 'mem') return addDevice('-t', 'mem', '-s', '256M', '-q', String(queues), ...mode.args, ...extra);
  const file = join(work, `${mode.name}-${Date.now()}.img`);
  writeFileSync(file, '');
  truncateSync(file, 256 * MiB);
  return addDevice('-t', 'loop', '-f', file, '-q', String(queues), ...mode.args, ...extra);
}

for (const mode of MODES) {
  if (!(kernelFeatures & mode.flag)) {
    t.test(`${mode.name} (${mode.args.join(' ')}): this kernel lacks it, and add says which kernel added it`, (t) => {
      const before = ublkIds();
      const r = ublk('add', '-t', 'null', ...mode.args);
      t.equal(r.code, 1, 'add fails');
      t.match(r.stderr, new RegExp(`needs UBLK_F_\\w+ \\(Linux ${mode.since.replace('.', '\\.')}\\)`), r.stderr);
      t.same(ublkIds(), before, 'no device was made');
      t.end();
    });
    continue;
  }

  for (const target of ['loop', 'mem'] as const) {
    t.test(`${mode.name} (${mode.args.join(' ')}), ${target}: fio write + crc32c verify through ${TOTAL / MiB} MiB, 4k and 128k, QD 1 and 64`, (t) => {
      const id = addIn(mode, target);
      const listed = JSON.parse(ublk('list', '-n', String(id), '--json').stdout) as Array<{ flags: number; data_path: string }>;
      t.equal(listed[0]!.data_path, mode.name, `list --json shows data_path ${mode.name}`);
      t.ok(listed[0]!.flags & mode.flag, `the kernel kept the flag (flags 0x${listed[0]!.flags.toString(16)})`);
      t.match(ublk('list', '-n', String(id), '-v').stdout, new RegExp(`data path ${mode.name}: `), 'list -v names the mode');
      for (const bs of ['4k', '128k']) {
        for (const qd of [1, 64]) {
          const r = fioVerify(`/dev/ublkb${id}`, { bs, qd, engine: 'io_uring', jobs: 1, total: TOTAL });
          t.ok(r.code === 0 && r.error === 0 && r.written === TOTAL && r.verified === TOTAL,
            `${bs} QD ${qd}: wrote ${r.written / MiB} MiB, verified ${r.verified / MiB} MiB, exit ${r.code}, error ${r.error}${r.code ? ` ${r.stderr.slice(-300)}` : ''}`);
        }
      }
      t.equal(ublk('del', '-n', String(id)).code, 0, 'del');
      t.end();
    });
  }

  t.test(`${mode.name}: del and kill -9 under load (loop, 2 queues) leave no device and no server`, async (t) => {
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
  t.test(`${mode.name}: kill -9 under fio write + verify, then recover (-r 1 -i 1), twice: the recovering server serves the same mode, no errors`, async (t) => {
    const id = addIn(mode, 'loop', 2, ['-r', '1', '-i', '1']);
    const dev = `/dev/ublkb${id}`;
    for (let i = 0; i < 2; i++) {
      const job = fioJob(dev, ['--rw=randwrite', '--bs=4k', '--ioengine=io_uring', '--iodepth=16', '--direct=1',
        '--size=32M', `--offset=${i * 32}M`, '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', `--randseed=${2000 + i}`]);
      await sleep(500 + Math.floor(Math.random() * 1500));
      await killServer(t, id);
      const r = ublk('recover', '-n', String(id));
      t.equal(r.code, 0, `cycle ${i}: recover ${r.stderr}`);
      const d = listed(id) as unknown as { data_path: string };
      t.equal(d.data_path, mode.name, `cycle ${i}: still ${mode.name}`);
      const f = await job.done;
      t.ok(f.code === 0 && f.error === 0, `cycle ${i}: fio write + verify across the kill: exit ${f.code}, error ${f.error}${f.code ? ` ${f.stderr.slice(-300)}` : ''}`);
    }
    t.equal(ublk('del', '-n', String(id)).code, 0, 'del');
  });
}
