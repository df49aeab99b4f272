/**
 * The async target API's pieces that need no kernel: how a request becomes a function call
 * (serveAsync), how an error becomes the errno the block layer sees (errorResult), the default
 * option parser, and the hang reporter.
 */
import t from 'tap';
import { HangReporter, defineAsyncTarget, errorResult, isAsyncTarget, parseLongOptions, parseTargetArgs, serveAsync, type AsyncHandlers } from '../../src/ublk/async-target.js';
import { UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_FLUSH, UBLK_IO_OP_DISCARD, UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_F_FUA, UBLK_IO_F_NOUNMAP } from '../../src/ublk/abi.js';
import { constants } from 'node:os';
import { SysError, libc } from '../../src/libc/index.js';

const E = constants.errno;

const buf = Buffer.alloc(4096);
const calls: string[] = [];
const sync: AsyncHandlers = {
  read(offset, b) { calls.push(`read ${offset} ${b.length}`); },
  write(offset, b, fua) { calls.push(`write ${offset} ${b.length} ${fua}`); },
  flush() { calls.push('flush'); },
  discard(offset, length) { calls.push(`discard ${offset} ${length}`); },
  writeZeroes(offset, length, noUnmap) { calls.push(`zeroes ${offset} ${length} ${noUnmap}`); },
};

t.test('serveAsync: each operation calls its function with the request; an answer given at once is a number at once', async (t) => {
  calls.length = 0;
  t.equal(serveAsync(sync, UBLK_IO_OP_READ, 0, 8192, 4096, () => buf), 4096);
  t.equal(serveAsync(sync, UBLK_IO_OP_WRITE, UBLK_IO_F_FUA, 0, 4096, () => buf), 4096);
  t.equal(serveAsync(sync, UBLK_IO_OP_FLUSH, 0, 0, 0, () => buf), 0);
  t.equal(serveAsync(sync, UBLK_IO_OP_DISCARD, 0, 4096, 3 * 2 ** 30, () => buf), 0, 'a 3 GiB discard answers 0, not a byte count that overflows');
  t.equal(serveAsync(sync, UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_F_NOUNMAP, 0, 4096, () => buf), 0);
  t.same(calls, ['read 8192 4096', 'write 0 4096 true', 'flush', `discard 4096 ${3 * 2 ** 30}`, 'zeroes 0 4096 true']);
  t.equal(serveAsync({ read() {}, write() {} }, UBLK_IO_OP_DISCARD, 0, 0, 4096, () => buf), -libc.EOPNOTSUPP, 'no discard(): EOPNOTSUPP');
  t.equal(serveAsync({ read() {}, write() {} }, UBLK_IO_OP_FLUSH, 0, 0, 0, () => buf), 0, 'no flush(): nothing to flush');
  t.equal(serveAsync(sync, 99, 0, 0, 0, () => buf), -libc.EOPNOTSUPP, 'an unknown op');
  let touched = false;
  serveAsync(sync, UBLK_IO_OP_FLUSH, 0, 0, 0, () => { touched = true; return buf; });
  t.notOk(touched, 'the buffer is not touched for a FLUSH (touching it stages data in the copy-free modes)');
});

t.test('serveAsync: a Promise becomes a Promise of the result that never rejects', async (t) => {
  const h: AsyncHandlers = {
    async read() { await new Promise((r) => setTimeout(r, 5)); },
    async write() { throw Object.assign(new Error('full'), { code: 'ENOSPC' }); },
    flush: () => Promise.reject(new TypeError('oops')),
  };
  const r = serveAsync(h, UBLK_IO_OP_READ, 0, 0, 4096, () => buf);
  t.type(r, Promise);
  t.equal(await r, 4096);
  t.equal(await serveAsync(h, UBLK_IO_OP_WRITE, 0, 0, 4096, () => buf), -E.ENOSPC, 'a rejection with code ENOSPC');
  t.equal(await serveAsync(h, UBLK_IO_OP_FLUSH, 0, 0, 0, () => buf), -libc.EIO, 'any other rejection is EIO');
  t.equal(serveAsync({ read() { throw new SysError(E.ENODATA, 'pread'); }, write() {} }, UBLK_IO_OP_READ, 0, 0, 4096, () => buf), -E.ENODATA, 'a synchronous SysError');
});

t.test('errorResult', async (t) => {
  t.equal(errorResult(Object.assign(new Error('x'), { code: 'ETIMEDOUT' })), -E.ETIMEDOUT);
  t.equal(errorResult(Object.assign(new Error('x'), { code: 'ENOTANERRNO' })), -libc.EIO, 'an unknown code');
  t.equal(errorResult(Object.assign(new Error('x'), { errno: E.ENOSPC })), -E.ENOSPC, 'a positive errno and no code');
  t.equal(errorResult(Object.assign(new Error('x'), { errno: -2 })), -libc.EIO, "Node's negative errno alone is not trusted");
  t.equal(errorResult('a string'), -libc.EIO);
  t.equal(errorResult(undefined), -libc.EIO);
});

t.test('parseLongOptions and parseTargetArgs', async (t) => {
  t.same(parseLongOptions(['--size', '64M', '--read-only', '--cache_mb=8', '--url', 'http://x/']), { size: '64M', readOnly: true, cacheMb: '8', url: 'http://x/' });
  t.throws(() => parseLongOptions(['stray']), /unexpected argument "stray"/);
  t.throws(() => parseLongOptions(['-s', '1']), /unexpected argument "-s"/);
  const def = defineAsyncTarget({ name: 'x', prepare: () => ({ sizeBytes: 4096 }), open: () => sync });
  t.ok(isAsyncTarget(def));
  t.notOk(isAsyncTarget({ name: 'ring', openQueue() {} }));
  t.same(parseTargetArgs(def, ['--a', '1']), { a: '1' });
  const own = defineAsyncTarget({ name: 'y', parseArgs: (argv) => ({ n: argv.length }), prepare: () => ({ sizeBytes: 4096 }), open: () => sync });
  t.same(parseTargetArgs(own, ['q', 'r']), { n: 2 }, "a module's own parseArgs wins");
});

t.test('HangReporter: a line for a request held past the timeout, none for one settled in time', async (t) => {
  const lines: string[] = [];
  const h = new HangReporter(30, 1, (l) => lines.push(l));
  h.watch(3, UBLK_IO_OP_READ, 8192, 4096);
  h.watch(4, UBLK_IO_OP_WRITE, 0, 512);
  h.settled(4);
  await new Promise((r) => setTimeout(r, 80));
  t.equal(lines.length, 1);
  t.match(lines[0], /ublk queue 1: the target's read\(\) for tag 3 \(4096 bytes at 8192\) has not settled after \d+ ms; the request stays outstanding/);
  h.clear();
  const off = new HangReporter(0, 0, (l) => lines.push(l));
  off.watch(1, UBLK_IO_OP_READ, 0, 512);
  await new Promise((r) => setTimeout(r, 20));
  t.equal(lines.length, 1, 'timeout 0: never');
});
