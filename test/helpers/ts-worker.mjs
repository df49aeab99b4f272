// Worker entry for TypeScript fixtures. On Node 20 a worker's entry module does not go through
// the loader hooks that `--import tsx` installed on the main thread (and passing the flag in
// execArgv does not help), so this plain-JS entry registers tsx in the worker and then imports
// the real entry, given as `workerData.entry` (a file URL).
import { workerData } from 'node:worker_threads';
import { register } from 'tsx/esm/api';

register();
await import(workerData.entry);
