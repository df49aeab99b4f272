/**
 * Child process for test/targets/loop.test.ts: serves reads and writes of the loop target on a
 * fresh io_uring (nothing else in this process has a ring) and prints, as JSON, how many io-wq
 * worker threads (`iou-wrk-*`) io_uring started for them, and whether the backing fd carries
 * O_NONBLOCK. A worker appears only when io_uring punted a request instead of issuing it inline.
 *
 *   node --import tsx test/helpers/loop-iowq-probe.ts FILE prepare|plain
 *
 * `prepare` opens the file the way the loop target does; `plain` opens it O_DIRECT without
 * O_NONBLOCK, as the target did before it knew about tmpfs.
 */
import { readdirSync, readFileSync } from 'node:fs';
import loop from '../../src/targets/loop.js';
import { UBLK_IO_OP_READ, UBLK_IO_OP_WRITE } from '../../src/ublk/abi.js';
import { sys, libc } from '../../src/uring/index.js';
import { TargetHarness } from './target-harness.js';

const [file, how] = process.argv.slice(2) as [string, 'prepare' | 'plain'];
const opts = loop.parseArgs(['-f', file]);
const spec = how === 'prepare' ? loop.prepare(opts) : undefined;
const fd = spec ? (spec.queueData as { fd: number }).fd : sys.open(file, libc.O_RDWR | libc.O_DIRECT | libc.O_CLOEXEC);
const h = new TargetHarness(loop, opts, { fd, offset: 0 }, { depth: 8 });
let failed = 0;
for (let i = 0; i < 64; i++) {
  const tag = i % 8;
  h.buffer(tag, 4096).fill(i);
  if (h.run(tag, UBLK_IO_OP_WRITE, i * 4096, 4096) !== 4096) failed++;
  if (h.run(tag, UBLK_IO_OP_READ, i * 4096, 4096) !== 4096 || h.buffer(tag, 4096)[4095] !== i) failed++;
}
const workers = readdirSync('/proc/self/task')
  .filter((tid) => readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').startsWith('iou-wrk')).length;
// fdinfo's flags are the file's f_flags, in octal.
const flags = parseInt(/^flags:\s+(\d+)/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))![1]!, 8);
h.close();
if (spec) spec.release!();
else sys.close(fd);
console.log(JSON.stringify({ workers, nonblock: (flags & libc.O_NONBLOCK) !== 0, failed }));
