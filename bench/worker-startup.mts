// How long a worker thread takes to start and load the ring module: compiled JS vs tsx.
import { Worker } from 'node:worker_threads';
const jsEntry = new URL('data:text/javascript,' + encodeURIComponent(`import('${new URL('../dist/uring/index.js', import.meta.url).href}').then(() => process.exit(0))`));
async function time(make: () => Worker): Promise<number> {
  const t0 = performance.now();
  await new Promise<void>((res, rej) => { const w = make(); w.on('exit', () => res()); w.on('error', rej); });
  return performance.now() - t0;
}
const med = (a: number[]) => a.sort((x, y) => x - y)[a.length >> 1]!;
const js: number[] = [], ts: number[] = [];
for (let i = 0; i < 7; i++) {
  js.push(await time(() => new Worker(jsEntry)));
  ts.push(await time(() => new Worker(new URL('../test/helpers/ts-worker.mjs', import.meta.url), { workerData: { entry: new URL('../src/uring/index.ts', import.meta.url).href } })));
}
console.log(`worker start + load src/uring: compiled ${med(js).toFixed(0)} ms, tsx ${med(ts).toFixed(0)} ms (median of 7)`);
