/**
 * The example targets in examples/ on a real kernel, loaded by path as a user would: the
 * read-only disk over HTTP range requests (an ext4 image served by a local HTTP server, read
 * back byte for byte and mounted), and the checksummed sparse store (fio verify, ext4 across a
 * re-add, and a flipped byte in a chunk file caught as EIO). The RAM disk is in targets-api.vm.ts.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { closeSync, mkdirSync, mkdtempSync, openSync, readdirSync, readSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { ROOT, addDevice, deviceLog, fioVerify, noDeviceLeftBehind, ublk, sh, deleteDevice, onKernel, fullSuiteOnly } from './helpers.js';

const MiB = 2 ** 20;
const work = mkdtempSync('/tmp/ublk-examples-');
t.teardown(() => rmSync(work, { recursive: true, force: true }));
t.afterEach(noDeviceLeftBehind);


const del = deleteDevice; // (t, id): del, the server exits, the char device goes

t.test('examples/http-disk.mjs: an ext4 image over HTTP reads back byte for byte and mounts read-only', fullSuiteOnly(), async (t) => {
  const img = join(work, 'served.img');
  writeFileSync(img, '');
  truncateSync(img, 64 * MiB);
  t.equal(sh('mkfs.ext4', ['-q', '-F', img]).code, 0, 'mkfs.ext4 on the image');
  const mnt = join(work, 'mnt-http');
  mkdirSync(mnt, { recursive: true });
  // Files go in through our loop target (the guest has no kernel loop module loaded).
  const writer = addDevice('-t', 'loop', '-f', img);
  t.equal(sh('mount', [`/dev/ublkb${writer}`, mnt]).code, 0, 'mount the image');
  writeFileSync(join(mnt, 'hello.txt'), 'served over HTTP\n');
  writeFileSync(join(mnt, 'random.bin'), randomBytes(3 * MiB));
  const sum = sh('sha256sum', [join(mnt, 'random.bin')]).out.split(' ')[0];
  t.equal(sh('umount', [mnt]).code, 0);
  await del(t, writer);
  const server = spawn(process.execPath, [join(ROOT, 'test', 'vm', 'fixtures', 'range-server.mjs'), img], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.teardown(() => { server.kill(); });
  const { port } = JSON.parse(await new Promise<string>((res) => createInterface({ input: server.stdout }).once('line', res))) as { port: number };
  const id = addDevice('-t', join(ROOT, 'examples', 'http-disk.mjs'), '--url', `http://127.0.0.1:${port}/served.img`, '--cache-mb', '8', '-q', '2');
  const dev = `/dev/ublkb${id}`;
  t.equal(sh('cmp', [dev, img]).code, 0, 'the device reads exactly as the image');
  t.equal(sh('mount', ['-o', 'ro', dev, mnt]).code, 0, 'mount -o ro');
  t.equal(sh('cat', [join(mnt, 'hello.txt')]).out, 'served over HTTP\n', 'a file reads');
  t.equal(sh('sha256sum', [join(mnt, 'random.bin')]).out.split(' ')[0], sum, 'a 3 MiB file has its checksum');
  sh('umount', [mnt]);
  const w = sh('dd', ['if=/dev/zero', `of=${dev}`, 'bs=4096', 'count=1', 'oflag=direct', 'status=none']);
  t.not(w.code, 0, `writes are refused: ${w.err.trim()}`);
  await del(t, id);
});

t.test('examples/sparse-store.mjs: fio verify, ext4 across a re-add, and a flipped byte caught as EIO', onKernel('lts'), async (t) => {
  const dir = join(work, 'store');
  mkdirSync(dir, { recursive: true });
  const mod = join(ROOT, 'examples', 'sparse-store.mjs');
  let id = addDevice('-t', mod, '--dir', dir, '--size', '256M', '-q', '2');
  let dev = `/dev/ublkb${id}`;
  const r = fioVerify(dev, { bs: '64k', engine: 'io_uring', jobs: 2, total: 64 * MiB, qd: 16 });
  t.ok(r.code === 0 && r.error === 0 && r.verified === 64 * MiB, `fio write + crc32c verify (verified ${r.verified}) ${r.code ? r.stderr : ''}`);
  const mnt = join(work, 'mnt-store');
  mkdirSync(mnt, { recursive: true });
  t.equal(sh('mkfs.ext4', ['-q', '-F', dev]).code, 0, 'mkfs.ext4');
  t.equal(sh('mount', [dev, mnt]).code, 0, 'mount');
  sh('cp', ['-r', join(ROOT, 'src'), mnt]);
  const sums = () => sh('sh', ['-c', 'cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum', 'sh', mnt]).out;
  const before = sums();
  t.equal(sh('umount', [mnt]).code, 0, 'umount');
  await del(t, id);
  id = addDevice('-t', mod, '--dir', dir, '-q', '1');
  dev = `/dev/ublkb${id}`;
  const fsck = sh('e2fsck', ['-fn', dev]);
  t.equal(fsck.code, 0, `e2fsck -fn through a new server: clean (${fsck.out.trim().split('\n').pop()})`);
  t.equal(sh('mount', [dev, mnt]).code, 0, 'mount again');
  t.equal(sums(), before, 'every file has the same checksum');
  t.equal(sh('umount', [mnt]).code, 0);
  await del(t, id);
  // Bit rot: flip one byte of the first chunk file's data; that block must fail, not be served.
  const chunk = readdirSync(dir).filter((f) => f.startsWith('c-')).sort()[0]!;
  const fd = openSync(join(dir, chunk), 'r+');
  const b = Buffer.alloc(1);
  readSync(fd, b, 0, 1, 100);
  b[0] = b[0]! ^ 0xff;
  writeSync(fd, b, 0, 1, 100);
  closeSync(fd);
  id = addDevice('-t', mod, '--dir', dir);
  dev = `/dev/ublkb${id}`;
  const chunkIndex = parseInt(chunk.slice(2), 16);
  const chunkBytes = 64 * 1024; // the example's default --chunk-kb 64
  const bad = sh('dd', [`if=${dev}`, 'of=/dev/null', 'bs=4096', `skip=${(chunkIndex * chunkBytes) / 4096}`, 'count=1', 'iflag=direct', 'status=none']);
  t.not(bad.code, 0, `the damaged block fails: ${bad.err.trim()}`);
  t.match(deviceLog(id), new RegExp(chunk), 'and the log names the chunk');
  const good = sh('dd', [`if=${dev}`, 'of=/dev/null', 'bs=4096', `skip=${(chunkIndex * chunkBytes) / 4096 + 1}`, 'count=1', 'iflag=direct', 'status=none']);
  t.equal(good.code, 0, 'its neighbour reads');
  await del(t, id);
});
