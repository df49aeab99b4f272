/**
 * Starting worker threads whose entry is one of our modules, compiled or not.
 *
 * From dist/ (the normal case) the entry is plain JavaScript. From src/ under tsx (tests,
 * development) the entry is TypeScript, and Node 20 does not apply the main thread's loader hooks
 * to a worker's entry module, so the worker starts from a tiny data: module that registers tsx
 * in the worker first and then imports the real entry.
 */
import { Worker } from 'node:worker_threads';

export function startWorker(entry: URL, workerData: unknown, transferList: readonly unknown[] = []): Worker {
  if (!entry.pathname.endsWith('.ts')) {
    return new Worker(entry, { workerData, transferList: transferList as never });
  }
  const tsxApi = import.meta.resolve('tsx/esm/api');
  const boot = `import { register } from ${JSON.stringify(tsxApi)}; register(); await import(${JSON.stringify(entry.href)});`;
  return new Worker(new URL(`data:text/javascript,${encodeURIComponent(boot)}`), { workerData, transferList: transferList as never });
}

/** The URL of a sibling module `name` (given without extension), in the form this file runs as. */
export function siblingUrl(base: string, name: string): URL {
  const ext = base.endsWith('.ts') ? '.ts' : '.js';
  return new URL(`./${name}${ext}`, base);
}
