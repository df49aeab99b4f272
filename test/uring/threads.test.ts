/**
 * One ring per thread: a worker blocks in io_uring_enter while the main event loop keeps running,
 * and the kernel enforces ownership of SINGLE_ISSUER/DEFER_TASKRUN rings.
 */
import t from 'tap';
import { Worker } from 'node:worker_threads';
import { IoUring, Mapping, abi, sys, libc } from '../../src/uring/index.js';

t.test('a worker blocked in enter does not block the main event loop', async (t) => {
  const efd = sys.eventfd(0, libc.EFD_CLOEXEC);
  const mainRing = new IoUring(4, { flags: abi.IORING_SETUP_SINGLE_ISSUER | abi.IORING_SETUP_DEFER_TASKRUN });
  const m = Mapping.anonymous(8);
  t.teardown(() => { sys.close(efd); mainRing.close(); m.unmap(); });
  const worker = new Worker(new URL('../helpers/ts-worker.mjs', import.meta.url), {
    workerData: { entry: new URL('./fixtures/blocking-worker.ts', import.meta.url).href, efd, foreignRingFd: mainRing.fd },
  });
  const messages: Array<Record<string, number | string>> = [];
  const woke = new Promise<void>((resolve, reject) => {
    worker.on('message', (msg) => {
      messages.push(msg);
      if (msg.kind === 'woke') resolve();
    });
    worker.on('error', reject);
  });
  await new Promise<void>((resolve) => worker.on('message', (msg) => msg.kind === 'blocking' && resolve()));
  const blocking = messages[0]!;
  t.not(blocking.tid, sys.gettid(), 'the worker is its own kernel task');
  t.equal(blocking.foreign, -libc.EEXIST, 'waiting on a DEFER_TASKRUN ring from a non-owner task is EEXIST');

  // The worker is (or is about to be) asleep in io_uring_enter. If that blocked this thread,
  // none of these timers would fire and the eventfd below would never be written: the test
  // would time out instead of passing.
  let ticks = 0;
  for (let i = 0; i < 5; i++) {
    await new Promise((r) => setTimeout(r, 10));
    ticks++;
  }
  t.equal(ticks, 5, 'the main loop ran five timers while the worker waited');
  t.equal(messages.length, 1, 'and the worker was still waiting');
  m.view.setBigUint64(0, 1n, true);
  sys.write(efd, m.address, 8);
  await woke;
  t.same(messages[1], { kind: 'woke', userData: 77, res: libc.POLLIN }, 'the worker woke with its poll completion');
  await worker.terminate();
});
