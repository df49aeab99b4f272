/**
 * The async-target wake-up path on its own, on the host: a worker blocked in io_uring_enter on a
 * multishot POLL_ADD of an eventfd, and the main thread answering each of its messages with an
 * eventfd write (what async-target.ts does per batch). Prints the round trip per ring setup.
 *
 *   node --import tsx bench/async-wake/main.ts
 */
import { Worker } from 'node:worker_threads';
import { writeSync } from 'node:fs';
import { abi, sys, libc } from '../../src/uring/index.js';
for (const [name, flags] of [['defer', abi.IORING_SETUP_SINGLE_ISSUER | abi.IORING_SETUP_DEFER_TASKRUN], ['coop', abi.IORING_SETUP_COOP_TASKRUN], ['plain', 0]] as const) {
  const efd = sys.eventfd(0, libc.EFD_CLOEXEC | libc.EFD_NONBLOCK);
  const boot = `import { register } from ${JSON.stringify(import.meta.resolve('tsx/esm/api'))}; register(); await import(${JSON.stringify(new URL('./worker.ts', import.meta.url).href)});`;
  const wk = new Worker(new URL('data:text/javascript,' + encodeURIComponent(boot)), { workerData: { efd, flags } });
  const one = Buffer.from([1,0,0,0,0,0,0,0]);
  let t0 = 0;
  await new Promise<void>((res) => wk.on('message', (m) => {
    if (m === 0) t0 = performance.now();
    if (m === 'done') { console.log(name, 'round trip us', ((performance.now() - t0) * 1000 / 199).toFixed(0)); res(); return; }
    queueMicrotask(() => writeSync(efd, one));
  }));
  await wk.terminate();
}
