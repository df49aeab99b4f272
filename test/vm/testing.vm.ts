/**
 * `ublk/testing` on a real kernel: withDevice from tap (this file) and from node:test (a
 * fixture run with `node --test`), with functions of this thread and with a module; the device
 * is gone after the callback whether it returned, threw, or its target hung.
 */
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { withDevice, ublkUnavailable } from '../../src/testing.js';
import { ROOT, fioVerify, noDeviceLeftBehind, ublkIds } from './helpers.js';

const MiB = 2 ** 20;
t.afterEach(noDeviceLeftBehind);

/** A child process, awaited without blocking this thread (whose event loop may serve the device). */
function run(cmd: string, args: string[]): Promise<{ code: number; out: string; err: string }> {
  return new Promise((resolve) => {
    const c = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    c.stdout.on('data', (d: Buffer) => { out += d.toString(); });
    c.stderr.on('data', (d: Buffer) => { err += d.toString(); });
    c.on('close', (code) => resolve({ code: code ?? -1, out, err }));
  });
}

t.test('ublkUnavailable() is undefined here (root, ublk_drv loaded)', async (t) => {
  t.equal(ublkUnavailable(), undefined);
});

t.test('withDevice with functions of this thread: fio write + verify, and the device is gone afterwards', async (t) => {
  const store = Buffer.alloc(32 * MiB);
  let dev = '';
  const result = await withDevice({
    target: {
      read(offset, buf) { store.copy(buf, 0, offset, offset + buf.length); },
      async write(offset, buf) { buf.copy(store, offset); },
    },
    size: '32M',
    queues: 2,
  }, async (path) => {
    dev = path;
    const r = await run('fio', ['--name=v', `--filename=${path}`, '--rw=randwrite', '--bs=4k', '--iodepth=16', '--ioengine=io_uring', '--direct=1', '--size=16M', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0']);
    t.equal(r.code, 0, `fio write + verify through closures ${r.err}`);
    return 'value';
  });
  t.equal(result, 'value', 'withDevice resolves with what the callback returned');
  t.notOk(existsSync(dev), `${dev} is gone`);
});

t.test('withDevice with a module path: its queue threads serve it, so synchronous tools work too', async (t) => {
  await withDevice({ target: join(ROOT, 'examples', 'ramdisk.mjs'), options: ['--size', '64M'] }, (path) => {
    const r = fioVerify(path, { bs: '64k', engine: 'io_uring', jobs: 1, total: 16 * MiB, qd: 8 });
    t.ok(r.code === 0 && r.error === 0 && r.verified === 16 * MiB, `fio verify (verified ${r.verified})`);
  });
  t.same(ublkIds(), [], 'no device left');
});

t.test('a callback that throws: the error comes back and the device is gone', async (t) => {
  let dev = '';
  await t.rejects(withDevice({ target: { read() {}, write() {} }, size: '4M' }, (path) => {
    dev = path;
    throw new Error('the test failed');
  }), /the test failed/);
  t.notOk(existsSync(dev), `${dev} is gone`);
});

t.test('a target that never answers: the callback ends, the held request fails with EIO after the grace period, the device is gone', async (t) => {
  const started = Date.now();
  let dd: Promise<{ code: number; err: string }> | undefined;
  await withDevice({
    // Reads at 32 KiB never settle; the others answer (6.12's START_DEV waits for the
    // partition scan's reads of the first blocks).
    target: { read: (offset) => (offset === 32768 ? new Promise<void>(() => { /* never */ }) : undefined), write() {} },
    size: '4M',
    log: () => {},
  }, async (path) => {
    dd = run('dd', [`if=${path}`, 'of=/dev/null', 'bs=4096', 'count=1', 'iflag=direct', 'skip=8']);
    await new Promise((r) => setTimeout(r, 1000));
  });
  const r = await dd!;
  t.not(r.code, 0, `the held read failed: ${r.err.trim()}`);
  t.ok(Date.now() - started < 60_000, `withDevice returned after ${Date.now() - started} ms`);
  t.same(ublkIds(), [], 'no device left');
});

t.test('withDevice from node:test', async (t) => {
  const r = spawnSync(process.execPath, ['--test', join(ROOT, 'test', 'vm', 'fixtures', 'node-test-withdevice.mjs')], { encoding: 'utf8', timeout: 120_000 });
  t.equal(r.status, 0, `node --test passes ${r.stdout.slice(-600)} ${r.stderr}`);
  t.match(r.stdout, /# pass 1/);
  t.match(r.stdout, /# skipped 0/);
});
