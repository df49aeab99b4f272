/**
 * Devices added and deleted by one process, through the compiled library (as `ublk add` runs
 * it): no fd, mapping, thread or device may be left over. 10 cycles in `npm test` (any leak per
 * cycle shows as 10 of something); UBLK_CYCLES=100 for the full count.
 */
import t from 'tap';
import { readdirSync, readFileSync } from 'node:fs';
import { ROOT, ublkIds } from './helpers.js';

const { UblkServer } = (await import(`${ROOT}/dist/ublk/server.js`)) as typeof import('../../src/ublk/server.js');
const nullUrl = new URL(`file://${ROOT}/dist/targets/null.js`).href;
const nullTarget = ((await import(nullUrl)) as { default: import('../../src/ublk/target.js').TargetDefinition<unknown> }).default;

const snapshot = () => ({
  fds: readdirSync('/proc/self/fd').length,
  ublkMaps: readFileSync('/proc/self/maps', 'utf8').split('\n').filter((l) => /ublkc|\[io_uring\]/.test(l)).length,
  threads: readdirSync('/proc/self/task').length,
  devices: ublkIds().length,
});

const CYCLES = Number(process.env.UBLK_CYCLES ?? 10);

t.test(`${CYCLES} add/del cycles leak nothing`, async (t) => {
  const cycle = async (queues: number) => {
    const s = await UblkServer.start({
      target: nullTarget, targetUrl: nullUrl, targetOptions: { sizeBytes: 2 ** 30, blockSize: 512 }, queues, depth: 32,
    });
    await s.stop();
  };
  await cycle(1); // warm up: the first cycle loads modules and grows the heap once
  // Worker threads end asynchronously after their last message; so do idle helper threads.
  await new Promise((r) => setTimeout(r, 1000));
  const before = snapshot();
  const started = Date.now();
  for (let i = 0; i < CYCLES; i++) await cycle(1 + (i % 2));
  // Worker threads end asynchronously after their last message.
  await new Promise((r) => setTimeout(r, 1000));
  const after = snapshot();
  t.comment(`${CYCLES} cycles in ${((Date.now() - started) / 1000).toFixed(1)} s; before ${JSON.stringify(before)}, after ${JSON.stringify(after)}`);
  t.equal(after.devices, 0, 'no device left');
  t.equal(after.fds, before.fds, 'no fd left');
  t.equal(after.ublkMaps, before.ublkMaps, 'no ring or descriptor mapping left');
  // Fewer is fine (a helper thread of the runtime may retire meanwhile); more would be a leak.
  t.ok(after.threads <= before.threads, `no thread left (${before.threads} before, ${after.threads} after)`);
});
