/**
 * The public target API on a real kernel: async targets loaded by the CLI from a path
 * (`ublk add -t ./module.mjs`), served in the queue threads (runOnEventLoop). The RAM disk
 * example answers at once (the blocking-wait path); the file-disk fixture answers every request
 * from the event loop (fs.promises on libuv's pool, then the ring's eventfd wakes the loop).
 * Each: fio write + crc32c verify, ext4 round trip, errors mapped to the errno the target
 * names, a hung request reported, and no device or server left behind.
 */
import t from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT, addDevice, deviceLog, exists, ext4RoundTrip, fioVerify, noDeviceLeftBehind, ublk, sh, sparseFile, deleteDevice, onKernel, fullSuiteOnly } from './helpers.js';

const MiB = 2 ** 20;
/** fio's volume per verify pass: 32 MiB in `npm test` (the VM time budget), UBLK_VERIFY_MIB=256 for more. */
const VERIFY = Number(process.env.UBLK_VERIFY_MIB ?? 32) * MiB;
const work = mkdtempSync('/tmp/ublk-api-');
t.teardown(() => rmSync(work, { recursive: true, force: true }));
t.afterEach(noDeviceLeftBehind);

const RAMDISK = join(ROOT, 'examples', 'ramdisk.mjs');
const FILE_DISK = join(ROOT, 'test', 'vm', 'fixtures', 'file-disk.mjs');


const sparse = (name: string, size: number) => sparseFile(work, name, size);

const del = deleteDevice; // (t, id): del, the server exits, the char device goes

t.test('ublk help -t PATH shows an async module\'s usage', onKernel('lts'), async (t) => {
  const r = ublk('help', '-t', RAMDISK);
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /ramdisk: an async target/);
  t.match(r.stdout, /--size SIZE/);
});

for (const queues of [1, 2]) {
  t.test(`examples/ramdisk.mjs from a path, ${queues} queue(s): fio write + crc32c verify`, onKernel(queues === 1 ? 'lts' : 'newest'), async (t) => {
    const id = addDevice('-t', RAMDISK, '--size', '256M', '-q', String(queues));
    const dev = `/dev/ublkb${id}`;
    for (const bs of queues === 1 ? ['4k', '128k'] : ['4k']) {
      const r = fioVerify(dev, { bs, engine: 'io_uring', jobs: queues, total: VERIFY, qd: 32 });
      t.ok(r.code === 0 && r.error === 0 && r.verified === VERIFY, `${bs} QD 32: wrote ${r.written}, verified ${r.verified} bytes (exit ${r.code}, error ${r.error}) ${r.code ? r.stderr : ''}`);
    }
    const listing = JSON.parse(ublk('list', '-n', String(id), '--json').stdout) as Array<{ target: { name: string } }>;
    t.equal(listing[0]?.target.name, RAMDISK, 'list names the module by its absolute path');
    await del(t, id);
  });
}

t.test('a module whose every request waits on the event loop (fs.promises): fio verify at QD 1 and 32, 2 queues', onKernel('lts'), async (t) => {
  const file = sparse('file-disk.img', 256 * MiB);
  const id = addDevice('-t', FILE_DISK, '--file', file, '-q', '2');
  const dev = `/dev/ublkb${id}`;
  for (const [bs, qd] of [['4k', 32], ['128k', 1]] as const) {
    const r = fioVerify(dev, { bs, engine: 'io_uring', jobs: 2, total: VERIFY, qd });
    t.ok(r.code === 0 && r.error === 0 && r.verified === VERIFY, `${bs} QD ${qd}: verified ${r.verified} bytes (exit ${r.code}, error ${r.error}) ${r.code ? r.stderr : ''}`);
  }
  const sync = sh('fio', ['--name=f', `--filename=${dev}`, '--rw=write', '--bs=4k', '--size=1m', '--fsync=1', '--direct=1']);
  t.equal(sync.code, 0, 'writes with fsync: FLUSH requests answered');
  await del(t, id);
});

t.test('ext4 on a module loaded from a path: mkfs, files, e2fsck -fn clean, same checksums after a re-add', fullSuiteOnly(), async (t) => {
  const file = sparse('ext4.img', 256 * MiB);
  ext4RoundTrip(t, file, join(work, 'mnt'), ['-q', '2'], ['-t', FILE_DISK, '--file', file]);
});

t.test('errors a target throws reach the caller as the errno they name; a hung request is reported', onKernel('lts'), async (t) => {
  const file = sparse('errors.img', 16 * MiB);
  const id = addDevice('-t', FILE_DISK, '--file', file, '--eio-at', '1M', '--enospc-at', '2M', '--hang-at', '3M', '--hang-ms', '2500', '--request-timeout', '500');
  const dev = `/dev/ublkb${id}`;
  const dd = (...args: string[]) => sh('dd', [`bs=4096`, 'count=1', 'status=none', ...args]);
  let r = dd(`if=${dev}`, 'of=/dev/null', 'iflag=direct', `skip=${MiB / 4096}`);
  t.not(r.code, 0, 'a read at 1 MiB fails');
  t.match(r.err, /Input\/output error/, `as EIO: ${r.err.trim()}`);
  r = dd('if=/dev/zero', `of=${dev}`, 'oflag=direct', `seek=${(2 * MiB) / 4096}`, 'conv=notrunc');
  t.not(r.code, 0, 'a write at 2 MiB fails');
  t.match(r.err, /No space left on device/, `as ENOSPC: ${r.err.trim()}`);
  r = dd(`if=${dev}`, 'of=/dev/null', 'iflag=direct', `skip=${(4 * MiB) / 4096}`);
  t.equal(r.code, 0, 'a read elsewhere succeeds');
  r = dd(`if=${dev}`, 'of=/dev/null', 'iflag=direct', `skip=${(3 * MiB) / 4096}`);
  t.equal(r.code, 0, 'the slow read at 3 MiB completes after 2.5 s');
  t.match(deviceLog(id), /read\(\) for tag \d+ \(4096 bytes at 3145728\) has not settled after \d+ ms/, 'and was reported after the 500 ms request timeout');
  await del(t, id);
});

t.test('ublk add -t with a module that is not a target, or options it refuses: exit 2, nothing made', onKernel('lts'), async (t) => {
  const notTarget = join(work, 'nothing.mjs');
  writeFileSync(notTarget, 'export default { name: "nothing" };\n');
  let r = ublk('add', '-t', notTarget);
  t.equal(r.code, 2, r.stderr);
  t.match(r.stderr, /is not a target module/);
  r = ublk('add', '-t', RAMDISK, 'stray');
  t.equal(r.code, 2, r.stderr);
  t.match(r.stderr, /unexpected argument "stray"/);
  r = ublk('add', '-t', FILE_DISK);
  t.equal(r.code, 1, r.stderr);
  t.match(r.stderr, /file-disk needs --file FILE/);
  t.same(JSON.parse(ublk('list', '--json').stdout), [], 'no device exists');
});
