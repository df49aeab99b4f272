/**
 * The qcow2 target on a real kernel, through the real CLI: fio crc32c verify through the device
 * with `qemu-img check` clean afterwards; ext4 (mkfs, files, e2fsck -fn through the device, the
 * files again after a re-add); an image written through our device against the same writes done
 * by qemu-io (`qemu-img compare`); an image over a raw backing file (the base unchanged, the
 * result as qemu reads it); and the crash loop: `kill -9` of the server under fio load (every
 * other cycle with user recovery, recovered and verified first), `ublk del`, and `qemu-img check`
 * must find no corruption. UBLK_QCOW2_CRASHES cycles (3 by default; the count is 20).
 */
import t from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { addDevice, alive, deleteDevice, fioJob, fioVerify, noDeviceLeftBehind, serverPid, sh, sleep, state, ublk, waitFor, onKernel } from './helpers.js';

const MiB = 2 ** 20;
const CRASHES = Number(process.env.UBLK_QCOW2_CRASHES ?? 2);
const work = mkdtempSync('/tmp/ublk-qcow2-');
t.teardown(() => rmSync(work, { recursive: true, force: true }));
t.afterEach(noDeviceLeftBehind);

const del = deleteDevice;

/** `qemu-img create -f qcow2` of `size` bytes in the work directory. */
function image(name: string, size: number, opts = 'compat=1.1', extra: string[] = []): string {
  const f = join(work, name);
  rmSync(f, { force: true });
  const r = sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts, ...extra, f, String(size)]);
  if (r.code !== 0) throw new Error(`qemu-img create: ${r.err}`);
  return f;
}

/** `qemu-img check`: 0 clean, 3 leaks only, 2 corruption, 1 not checked. */
function check(file: string): { code: number; out: string } {
  const r = sh('qemu-img', ['check', file]);
  return { code: r.code, out: `${r.out}${r.err}`.trim().replace(/\n+/g, ' / ') };
}

/** dd of whole 4 KiB blocks (the device's physical block size) from `src` to `dev`, direct, then fsync (a FLUSH). */
const ddWrite = (src: string, dev: string, seekBytes: number, bytes: number) =>
  sh('dd', [`if=${src}`, `of=${dev}`, 'bs=4096', `seek=${seekBytes / 4096}`, `count=${bytes / 4096}`, 'oflag=direct', 'conv=notrunc,fsync', 'status=none']);

/** Sectors written to /dev/NAME so far (/sys/block/NAME/stat, field 7). */
const sectorsWritten = (name: string) => Number(readFileSync(`/sys/block/${name}/stat`, 'utf8').trim().split(/\s+/)[6]);

t.test('fio crc32c verify through the device; qemu-img check clean afterwards; the data verifies again after a re-add', onKernel('newest'), async (t) => {
  const img = image('fio.qcow2', 32 * MiB, 'compat=1.1,cluster_size=65536');
  let id = addDevice('-t', 'qcow2', '-f', img);
  const r = fioVerify(`/dev/ublkb${id}`, { bs: '4k', engine: 'io_uring', jobs: 1, total: 8 * MiB, qd: 16 });
  t.ok(r.code === 0 && r.error === 0 && r.verified === 8 * MiB, `fio 4k randwrite + verify at QD 16 (verified ${r.verified}) ${r.code ? r.stderr : ''}`);
  await del(t, id);
  const c = check(img);
  t.equal(c.code, 0, `qemu-img check: ${c.out}`);
  id = addDevice('-t', 'qcow2', '-f', img);
  const v = fioVerify(`/dev/ublkb${id}`, { bs: '4k', engine: 'io_uring', jobs: 1, total: 8 * MiB, qd: 16, verifyOnly: true });
  t.ok(v.code === 0 && v.error === 0 && v.verified === 8 * MiB, `re-added, every block verifies (${v.verified})`);
  const big = fioVerify(`/dev/ublkb${id}`, { bs: '128k', engine: 'libaio', jobs: 1, total: 4 * MiB, qd: 8 });
  t.ok(big.code === 0 && big.error === 0 && big.verified === 4 * MiB, `fio 128k (two clusters per request) libaio verify (${big.verified})`);
  await del(t, id);
  t.equal(check(img).code, 0, 'still clean');
});

t.test('ext4 through the device: mkfs, files, e2fsck -fn clean, the same files after a re-add, qemu-img check clean', onKernel('lts'), async (t) => {
  const img = image('ext4.qcow2', 32 * MiB, 'compat=1.1,cluster_size=4096');
  const mnt = join(work, 'mnt');
  mkdirSync(mnt, { recursive: true });
  let id = addDevice('-t', 'qcow2', '-f', img);
  let dev = `/dev/ublkb${id}`;
  t.equal(sh('mkfs.ext4', ['-q', '-F', dev]).code, 0, 'mkfs.ext4 (its discard of the whole device included)');
  t.equal(sh('mount', [dev, mnt]).code, 0, 'mount');
  for (let i = 0; i < 40; i++) {
    mkdirSync(join(mnt, 'd', String(i % 7)), { recursive: true });
    writeFileSync(join(mnt, 'd', String(i % 7), `f${i}`), randomBytes(((i * 7919) % 300_000) + 1));
  }
  const sums = () => sh('sh', ['-c', 'cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum', 'sh', mnt]).out;
  const before = sums();
  t.equal(sh('sync', []).code, 0, 'sync');
  sh('fstrim', [mnt]); // discards through the file system (a no-op where ext4 has nothing to trim)
  t.equal(sh('umount', [mnt]).code, 0, 'umount');
  const fsck = sh('e2fsck', ['-fn', dev]);
  t.equal(fsck.code, 0, `e2fsck -fn through the device: clean (${fsck.out.trim().split('\n').pop()})`);
  await del(t, id);
  const c = check(img);
  t.equal(c.code, 0, `qemu-img check: ${c.out}`);
  id = addDevice('-t', 'qcow2', '-f', img);
  dev = `/dev/ublkb${id}`;
  t.equal(sh('mount', [dev, mnt]).code, 0, 'mount again');
  t.equal(sums(), before, `the ${before.split('\n').length - 1} files have their checksums`);
  sh('umount', [mnt]);
  await del(t, id);
});

t.test('an image written through the device equals the same writes done by qemu-io (qemu-img compare), v2 and v3', onKernel('lts'), async (t) => {
  for (const opts of ['compat=0.10,cluster_size=65536', 'compat=1.1,cluster_size=4096']) {
    const ours = image('ours.qcow2', 16 * MiB, opts);
    const theirs = image('theirs.qcow2', 16 * MiB, opts);
    const id = addDevice('-t', 'qcow2', '-f', ours);
    const dev = `/dev/ublkb${id}`;
    // Inside a cluster, across cluster boundaries, whole clusters, the last block.
    const writes: Array<[number, number]> = [[0, 4096], [17 * 4096, 12_288], [3 * MiB - 4096, 72 * 1024], [9 * MiB, 2 * MiB], [16 * MiB - 4096, 4096]];
    const qio: string[] = [];
    writes.forEach(([off, len], k) => {
      const src = join(work, `chunk${k}`);
      writeFileSync(src, Buffer.alloc(len, 0x30 + k));
      const r = ddWrite(src, dev, off, len);
      t.equal(r.code, 0, `dd ${len} bytes at ${off} ${r.err}`);
      qio.push('-c', `write -P 0x${(0x30 + k).toString(16)} ${off} ${len}`);
    });
    const z = sh('blkdiscard', ['-z', '-o', String(10 * MiB), '-l', String(MiB), dev]);
    t.equal(z.code, 0, `blkdiscard -z (WRITE_ZEROES) ${z.err}`);
    qio.push('-c', `write -z ${10 * MiB} ${MiB}`);
    await del(t, id);
    const q = sh('qemu-io', [...qio, theirs]);
    t.equal(q.code, 0, 'the same writes by qemu-io');
    const cmp = sh('qemu-img', ['compare', ours, theirs]);
    t.equal(cmp.code, 0, `${opts}: qemu-img compare: ${cmp.out.trim()}`);
    t.equal(check(ours).code, 0, `${opts}: qemu-img check of ours clean`);
  }
});

t.test('an image over a raw backing file: reads through it, copy-on-write, the base unchanged, qemu reads what we wrote', onKernel('newest'), async (t) => {
  const base = join(work, 'base.raw');
  const baseData = randomBytes(16 * MiB);
  writeFileSync(base, baseData);
  const top = image('top.qcow2', 16 * MiB, 'compat=1.1,cluster_size=65536', ['-b', 'base.raw', '-F', 'raw']);
  const id = addDevice('-t', 'qcow2', '-f', top);
  const dev = `/dev/ublkb${id}`;
  t.equal(sh('cmp', [dev, base]).code, 0, 'a new top reads exactly as its base');
  const data = join(work, 'cow.bin');
  writeFileSync(data, Buffer.alloc(8192, 0x7c));
  t.equal(ddWrite(data, dev, 5 * MiB + 4096, 8192).code, 0, 'an 8 KiB write inside a 64 KiB cluster');
  t.equal(sh('blkdiscard', ['-o', String(8 * MiB), '-l', String(MiB), dev]).code, 0, 'a discard of 1 MiB');
  await del(t, id);
  const want = Buffer.from(baseData);
  want.fill(0x7c, 5 * MiB + 4096, 5 * MiB + 12_288);
  want.fill(0, 8 * MiB, 9 * MiB); // zero clusters: the base does not show through
  const wantFile = join(work, 'want.raw');
  writeFileSync(wantFile, want);
  const cmp = sh('qemu-img', ['compare', '-F', 'raw', top, wantFile]);
  t.equal(cmp.code, 0, `qemu-img compare with the expected bytes: ${cmp.out.trim()}`);
  t.equal(check(top).code, 0, 'qemu-img check clean');
  t.ok(createHash('sha256').update(readFileSync(base)).digest().equals(createHash('sha256').update(baseData).digest()), 'the base is unchanged');
});

t.test(`crash loop: kill -9 of the server under fio load, ${CRASHES} times, qemu-img check finds no corruption`, onKernel('lts'), async (t) => {
  const img = image('crash.qcow2', 32 * MiB, 'compat=1.1,cluster_size=65536');
  for (let cycle = 1; cycle <= CRASHES; cycle++) {
    const recovery = cycle % 2 === 0;
    const id = addDevice('-t', 'qcow2', '-f', img, ...(recovery ? ['-r', '1'] : []));
    const dev = `/dev/ublkb${id}`;
    // A marker in the last MiB, FLUSHed (dd's fsync) before the load: it must survive the kill.
    const marker = join(work, 'marker');
    writeFileSync(marker, Buffer.alloc(MiB, 0xc0 + cycle));
    t.equal(ddWrite(marker, dev, 31 * MiB, MiB).code, 0, `cycle ${cycle}: a flushed 1 MiB marker`);
    const job = fioJob(dev, ['--rw=randrw', '--bsrange=4k-64k', '--direct=1', '--ioengine=io_uring', '--iodepth=16',
      '--size=28M', '--time_based', '--runtime=20', '--fsync=8', `--randseed=${cycle}`]);
    // Killed once fio's writes are flowing (1 MiB through the device), at a moment that differs per cycle.
    t.ok(await waitFor(() => sectorsWritten(`ublkb${id}`) > 2048, 60_000), `cycle ${cycle}: fio is writing`);
    await sleep(300 + ((cycle * 337) % 1200));
    const pid = serverPid(id);
    process.kill(pid, 'SIGKILL');
    t.ok(await waitFor(() => !alive(pid), 20_000), `cycle ${cycle}: the server (${pid}) is dead`);
    if (recovery) {
      t.ok(await waitFor(() => state(id) === 'QUIESCED', 20_000), `cycle ${cycle}: the device waits for a new server`);
      // The image as the dead server left it, before a new server touches it.
      const c0 = check(img);
      t.ok(c0.code === 0 || c0.code === 3, `cycle ${cycle}: qemu-img check while the device waits: no corruption (exit ${c0.code}: ${c0.out})`);
      const rec = ublk('recover', '-n', String(id));
      t.equal(rec.code, 0, `cycle ${cycle}: recover ${rec.stderr}`);
    }
    if (recovery) {
      await sleep(1000); // fio's I/O goes on through the new server for a moment
      try {
        process.kill(job.pid, 'SIGTERM');
      } catch {
        // fio has stopped by itself: without -i 1 the requests the dead server held failed with EIO
      }
    }
    await job.done; // without recovery its I/O failed once the server was gone
    if (recovery) {
      const v = fioVerify(dev, { bs: '4k', engine: 'io_uring', jobs: 1, total: 4 * MiB, qd: 8 });
      t.ok(v.code === 0 && v.error === 0, `cycle ${cycle}: the recovered device passes fio verify (${v.verified})`);
    }
    const d = ublk('del', '-n', String(id));
    t.equal(d.code, 0, `cycle ${cycle}: del ${d.stderr}`);
    await waitFor(() => state(id) === 'GONE', 20_000);
    const c = check(img);
    t.ok(c.code === 0 || c.code === 3, `cycle ${cycle}${recovery ? ' (recovered, then deleted)' : ''}: qemu-img check: no corruption (exit ${c.code}: ${c.out})`);
    const m = sh('qemu-io', ['-r', '-c', `read -P 0x${(0xc0 + cycle).toString(16)} 31M 1M`, img]);
    t.ok(m.code === 0 && !/fail/i.test(m.out), `cycle ${cycle}: the flushed marker is intact, as qemu reads it ${m.code ? m.err : ''}`);
  }
  // Leaks are allowed; repairing them leaves a clean image.
  const r = sh('qemu-img', ['check', '-r', 'leaks', img]);
  t.ok(r.code === 0, `qemu-img check -r leaks: ${r.out.trim().split('\n').pop()}`);
});
