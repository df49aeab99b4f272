/**
 * Runs inside the test VM (test/vm/runner.ts): proves the harness gives ublk tests what they
 * need. The harness's own behaviour seen from outside (exit status, timeout, shared files) is
 * checked by test/vm/harness.test.ts on the host.
 */
import t from 'tap';
import { existsSync, statSync, writeFileSync, readFileSync } from 'node:fs';
import { release } from 'node:os';
import { IoUring, prepNop, setUserData } from '../../src/uring/index.js';

t.ok(process.env.UBLK_VM === '1', 'running inside the test VM');
t.equal(process.getuid?.(), 0, 'as root');
t.comment(`kernel ${release()} from ${process.env.UBLK_VM_PACKAGE}`);
const want = process.env.UBLK_VM_EXPECT_RELEASE;
if (want) t.equal(release(), want, 'the kernel asked for');
else t.ok(process.env.UBLK_VM_PACKAGE?.includes(release()), 'the kernel is the one the package says');

t.test('ublk_drv is loaded and its control device exists', (t) => {
  t.ok(existsSync('/dev/ublk-control'), '/dev/ublk-control');
  t.ok(statSync('/dev/ublk-control').isCharacterDevice(), 'is a character device');
  t.ok(existsSync('/sys/module/ublk_drv'), 'module loaded');
  t.end();
});

t.test('io_uring works in the guest', (t) => {
  const ring = new IoUring(8);
  t.teardown(() => ring.close());
  const w = ring.getSqe();
  prepNop(ring.sqes, w);
  setUserData(ring.sqes, w, 99);
  ring.submit(1);
  const c = ring.peekCqe();
  t.equal(ring.cqeUserData(c), 99);
  t.equal(ring.cqeRes(c), 0);
  ring.cqAdvance(1);
  t.end();
});

t.test('the file systems the tests rely on', (t) => {
  writeFileSync('/tmp/vm-smoke', 'x');
  t.equal(readFileSync('/tmp/vm-smoke', 'utf8'), 'x', '/tmp is writable (tmpfs)');
  t.throws(() => writeFileSync('/usr/vm-smoke', 'x'), { code: 'EROFS' }, 'the host root is read-only');
  t.ok(existsSync('/dev/fd/0') || existsSync('/proc/self/fd/0'), '/dev/fd works');
  t.end();
});
