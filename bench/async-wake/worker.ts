import { parentPort, workerData } from 'node:worker_threads';
import { IoUring, prepPollMultishot, setUserData, sys, Mapping, libc } from '../../src/uring/index.js';
const { efd, flags } = workerData as { efd: number; flags: number };
const ring = new IoUring(8, { flags });
const w = ring.getSqe(); prepPollMultishot(ring.sqes, w, efd, libc.POLLIN); setUserData(ring.sqes, w, 1); ring.submit();
const m = Mapping.anonymous(8);
for (let i = 0; i < 200; i++) {
  parentPort!.postMessage(i);
  ring.submit(1);
  const n = ring.cqReady(); ring.cqAdvance(n);
  try { sys.read(efd, m.address, 8); } catch {}
}
parentPort!.postMessage('done');
