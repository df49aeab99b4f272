/**
 * The VM suite's entry point, run inside the guest: imports every test/vm/*.vm.ts into this one
 * process, so tap's root test prints a single TAP stream with one summary. One process rather
 * than tap's runner and a process per file because, under software emulation over 9p, loading
 * tap and tsx costs ~15 s per process (measured: `import('tap')` 8 s plain, 15 s through tsx).
 *
 *   npm run vm -- node --import tsx test/vm/run-in-vm.ts [FILTER...]   (files whose name holds any FILTER)
 */
import { readdirSync } from 'node:fs';
import { IoUring } from '../../src/uring/index.js';
import { EXT } from './helpers.js';

// Software emulation (TCG) can kill the guest kernel when the kernel live-patches its own code
// while another vCPU runs it: an int3 Oops, then a panic. io_uring patches io_get_sqe whenever
// the number of rings that use an SQ index array goes between 0 and 1 (a static key): fio's own
// rings use one, ours do not (NO_SQARRAY), so every fio run flipped it. Seen once in a full run,
// RIP at the patched NOP in io_submit_sqes during a loop fio test on 7.3.4. One such ring held
// open for the whole suite keeps the key from flipping. (On real hardware the patching is safe.)
const keepSqArrayKey = new IoUring(1, { noSqArray: false });
void keepSqArrayKey;

// Run directly (not under tap's runner), tap's root test has a 30 s default timeout; the VM suite
// bounds itself instead (each test waits with its own limits, and the VM runner kills a hung run).
process.env.TAP_TIMEOUT ??= '0';

const filters = process.argv.slice(2);
const dir = new URL('.', import.meta.url);
// Through tsx the suite is the .vm.ts files; compiled (build/vm, which CI runs) the .vm.js files.
const matching = readdirSync(dir).filter((f) => f.endsWith(`.vm${EXT}`) && (filters.length === 0 || filters.some((x) => f.includes(x)))).sort();
if (matching.length === 0) throw new Error(`no VM test matches ${filters.join(' or ')}`);
/**
 * Files that test our own code above the queue engine (example modules, layers, module loading,
 * the nbd and qcow2 targets), whose kernel-facing part other files cover on every kernel (the
 * nbd target's socket SQEs: nbd-recover). `npm test` runs them on the newest
 * kernel only (UBLK_VM_SUITE=short on the others, see scripts/test.mjs) to keep each kernel's
 * run inside its budget; naming a file on the command line runs it on any kernel.
 */
const NEWEST_ONLY = ['examples', 'layers', 'targets-api', 'nbd', 'qcow2'];
const short = process.env.UBLK_VM_SUITE === 'short' && filters.length === 0;
const files = short ? matching.filter((f) => !NEWEST_ONLY.some((n) => f.startsWith(`${n}.vm`))) : matching;
if (short) console.log(`# UBLK_VM_SUITE=short: not run on this kernel (they run on the newest): ${matching.filter((f) => !files.includes(f)).join(', ')}`);
// Seconds per file, printed as TAP comments at the end: what the suite's time is spent on, for
// keeping it inside its budget. Each top-level test is counted to the file whose import added it.
// Imported here, after TAP_TIMEOUT is set above: a static import would load tap first, and its
// root test would get the 30 s default.
const { t } = await import('tap');
const fileOf = new Map<object, string>();
const seconds = new Map<string, number>();
let importing = '';
const root = t as unknown as { on(event: string, fn: (st: { name?: string; time?: number }) => void): void };
root.on('subtestAdd', (st) => { fileOf.set(st, importing); });
root.on('subtestEnd', (st) => {
  const f = fileOf.get(st);
  if (f !== undefined) seconds.set(f, (seconds.get(f) ?? 0) + (st.time ?? 0) / 1000);
});
t.teardown(() => {
  const rows = [...seconds].sort((a, b) => b[1] - a[1]).map(([f, s]) => `${f} ${s.toFixed(0)} s`);
  console.log(`# seconds per file: ${rows.join(', ')}`);
});
for (const f of files) {
  importing = f;
  await import(new URL(f, dir).href);
}
