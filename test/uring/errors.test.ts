/**
 * Errors name the call and the errno; teardown releases everything; the setup flags a ublk server
 * needs work together, and a flag the kernel lacks is a reported skip, never a silent pass.
 */
import t from 'tap';
import { closeSync, fstatSync, readdirSync, readFileSync } from 'node:fs';
import { IoUring, Mapping, SysError, abi, errnoName, prepNop, prepRead, setUserData, sys, setupFlagNames, libc, probe } from '../../src/uring/index.js';
import { reap, tryRing } from '../helpers/uring.js';

t.test('errno names and numbers map both ways', (t) => {
  t.equal(errnoName(2), 'ENOENT');
  t.equal(errnoName(22), 'EINVAL');
  t.equal(errnoName(libc.EBUSY), 'EBUSY', 'our constants name what Node names');
  t.equal(errnoName(4000), 'E4000', 'unknown numbers still print');
  t.end();
});

t.test('a failed syscall throws SysError naming the call, read right after it', (t) => {
  const e = t.throws(() => sys.open('/nonexistent/dir/file', libc.O_RDONLY)) as SysError;
  t.type(e, SysError);
  t.equal(e.code, 'ENOENT');
  t.equal(e.errno, 2);
  t.match(e.message, /^ENOENT from open\("\/nonexistent\/dir\/file", 0o0\)/);
  const c = t.throws(() => sys.close(987654)) as SysError;
  t.equal(c.code, 'EBADF');
  t.end();
});

t.test('io_uring_setup errors say which flags and why', (t) => {
  t.throws(() => new IoUring(3), RangeError, 'entries must be a power of two');
  t.throws(() => new IoUring(65536), RangeError, 'and at most 32768');
  const e = t.throws(() => new IoUring(4, { flags: 1 << 30, noSqArray: false })) as SysError;
  t.equal(e.code, 'EINVAL');
  t.match(e.message, /io_uring_setup\(entries=4, flags=\[bit 30\]\)/);
  t.match(e.message, /flag newer than the running kernel/);
  const d = t.throws(() => new IoUring(4, { flags: abi.IORING_SETUP_DEFER_TASKRUN, noSqArray: false })) as SysError;
  t.equal(d.code, 'EINVAL', 'DEFER_TASKRUN without SINGLE_ISSUER is refused');
  t.match(d.message, /DEFER_TASKRUN \(6\.1\)/);
  t.same(setupFlagNames(abi.IORING_SETUP_SQE128 | abi.IORING_SETUP_CQSIZE), ['CQSIZE', 'SQE128 (5.19)']);
  t.end();
});

t.test('a bad fd is a negative res in the CQE, not an exception', (t) => {
  const ring = new IoUring(4);
  const m = Mapping.anonymous(4096);
  t.teardown(() => { ring.close(); m.unmap(); });
  const w = ring.getSqe();
  prepRead(ring.sqes, w, -5, m.address, 10, 0);
  setUserData(ring.sqes, w, 1);
  ring.submit(1);
  t.same(reap(ring).map((c) => c.res), [-libc.EBADF]);
  t.end();
});

/** Our ring mappings in /proc/self/maps (the kernel names them anon_inode:[io_uring]). */
const ringMaps = () => readFileSync('/proc/self/maps', 'utf8').split('\n').filter((l) => l.includes('[io_uring]')).length;

t.test('close unmaps the rings, closes the fd, and is idempotent', (t) => {
  const before = ringMaps();
  const ring = new IoUring(64, { flags: abi.IORING_SETUP_SQE128 });
  const fd = ring.fd;
  t.ok(fstatSync(fd), 'fd open');
  const during = ringMaps();
  t.equal(during, before + 2, 'one mapping for both rings (FEAT_SINGLE_MMAP) and one for the SQEs');
  ring.close();
  t.ok(ring.isClosed);
  t.throws(() => fstatSync(fd), { code: 'EBADF' }, 'fd closed');
  t.equal(ringMaps(), before, 'ring mappings released');
  t.doesNotThrow(() => ring.close(), 'second close is a no-op');

  const m = Mapping.anonymous(100);
  t.equal(m.length, 4096, 'rounded up to a page');
  m.unmap();
  t.notOk(m.mapped);
  t.throws(() => m.u8, /mapping used after unmap/, 'views refuse after unmap instead of faulting');
  t.doesNotThrow(() => m.unmap());
  t.end();
});

t.test('100 rings opened and closed leak no fds or mappings', (t) => {
  const count = () => ({
    maps: ringMaps(),
    fds: readdirSync('/proc/self/fd').length,
  });
  const before = count();
  for (let i = 0; i < 100; i++) {
    const r = new IoUring(32, { flags: abi.IORING_SETUP_SQE128 | abi.IORING_SETUP_CQE32 });
    r.registerRingFd();
    probe(r);
    r.close();
  }
  const after = count();
  t.equal(after.maps, before.maps, 'no ring mapping left');
  t.equal(after.fds, before.fds, 'no fd left');
  t.end();
});

// The flag combinations a ublk server uses, each exercised with NOPs, a read, a wrap of the CQ.
const matrix: Array<[string, number]> = [
  ['plain', 0],
  ['SUBMIT_ALL', abi.IORING_SETUP_SUBMIT_ALL],
  ['COOP_TASKRUN|TASKRUN_FLAG', abi.IORING_SETUP_COOP_TASKRUN | abi.IORING_SETUP_TASKRUN_FLAG],
  ['SINGLE_ISSUER', abi.IORING_SETUP_SINGLE_ISSUER],
  ['SINGLE_ISSUER|DEFER_TASKRUN', abi.IORING_SETUP_SINGLE_ISSUER | abi.IORING_SETUP_DEFER_TASKRUN],
  ['SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG', abi.IORING_SETUP_SINGLE_ISSUER | abi.IORING_SETUP_DEFER_TASKRUN | abi.IORING_SETUP_TASKRUN_FLAG],
  ['SQE128|CQE32', abi.IORING_SETUP_SQE128 | abi.IORING_SETUP_CQE32],
  ['SQPOLL', abi.IORING_SETUP_SQPOLL],
];
for (const [name, flags] of matrix) {
  for (const noSqArray of [true, false]) {
    t.test(`flags ${name}${noSqArray ? '' : ' with SQ array'}`, (t) => {
      const ring = tryRing(8, { flags, noSqArray: noSqArray ? undefined : false, sqThreadIdle: 50 });
      if (typeof ring === 'string') {
        t.skip(`kernel refuses ${name}: ${ring}`, () => {});
        return t.end();
      }
      const m = Mapping.anonymous(4096);
      const statFd = sys.open('/proc/self/stat', libc.O_RDONLY | libc.O_CLOEXEC);
      t.teardown(() => { ring.close(); m.unmap(); closeSync(statFd); });
      let ud = 0;
      const seen: number[] = [];
      for (let round = 0; round < 5; round++) {
        for (let i = 0; i < 5; i++) {
          const w = ring.mustGetSqe();
          if (i === 4) prepRead(ring.sqes, w, statFd, m.address, 64, 0);
          else prepNop(ring.sqes, w);
          setUserData(ring.sqes, w, ud++);
        }
        ring.submit();
        const got = reap(ring, 5);
        for (const c of got) {
          t.ok(c.res >= 0, `res ${c.res}`);
          seen.push(c.userData);
        }
      }
      t.same(seen.sort((a, b) => a - b), Array.from({ length: 25 }, (_, i) => i), 'all 25 completions, CQ wrapped (16 entries)');
      t.end();
    });
  }
}
