/**
 * For test/targets/loop.test.ts: calls the loop target's prepare() N times on PATH while a child
 * process renames a regular file and a FIFO in and out of PATH as fast as it can. Prints how
 * each call ended: {"device": n, "fifo": n, "missing": n, "other": n}. A prepare that blocks (an
 * open of the FIFO without O_NONBLOCK) never returns, and the test's timeout kills this process.
 *
 *   node --import tsx test/helpers/loop-race-probe.ts PATH N
 */
import { spawn } from 'node:child_process';
import { rmSync, writeFileSync, truncateSync } from 'node:fs';
import loop from '../../src/targets/loop.js';

const [path, nArg] = process.argv.slice(2);
const n = Number(nArg);
const reg = `${path}.reg`;
const fifo = `${path}.fifo`;
writeFileSync(reg, '');
truncateSync(reg, 1 << 20);
rmSync(fifo, { force: true });
const swapper = spawn('python3', ['-c', `
import os, sys
path, reg, fifo = sys.argv[1:4]
os.mkfifo(fifo)
print('ready', flush=True)
while True:
    for src in (reg, fifo):
        os.rename(src, path)
        os.rename(path, src)
`, path!, reg, fifo], { stdio: ['ignore', 'pipe', 'inherit'] });
await new Promise<void>((res) => swapper.stdout.once('data', () => res()));

const counts = { device: 0, fifo: 0, missing: 0, other: 0 };
const opts = loop.parseArgs(['-f', path!, '--read-only', '--buffered']);
for (let i = 0; i < n; i++) {
  try {
    loop.prepare(opts).release?.();
    counts.device++;
  } catch (e) {
    const m = (e as Error).message;
    if (/neither a regular file nor a block device/.test(m)) counts.fifo++;
    else if (/does not exist/.test(m)) counts.missing++;
    else {
      counts.other++;
      process.stderr.write(`${m}\n`);
    }
  }
}
swapper.kill();
rmSync(reg, { force: true });
rmSync(fifo, { force: true });
rmSync(path!, { force: true });
process.stdout.write(`${JSON.stringify(counts)}\n`);
