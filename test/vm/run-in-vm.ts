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
 * the nbd and qcow2 targets): their kernel-facing part other files cover on every kernel (the
 * nbd target's socket SQEs: nbd-recover). `npm test` runs each of them on one kernel only, to keep
 * both kernels' runs inside their budget (scripts/test.mjs sets UBLK_VM_SUITE to the kernel's
 * name): these on the LTS kernel, the kernel most users run...
 */
const ONCE_ON_LTS = ['examples', 'layers', 'targets-api'];
/** ...and these, whose numbers the benchmarks give on the newest kernel, on the newest. */
const ONCE_ON_NEWEST = ['nbd', 'qcow2'];
const suite = filters.length === 0 ? process.env.UBLK_VM_SUITE : undefined; // a file named on the command line runs anywhere
const elsewhere = suite === 'lts' ? ONCE_ON_NEWEST : suite === 'newest' ? ONCE_ON_LTS : suite === 'short' ? [...ONCE_ON_LTS, ...ONCE_ON_NEWEST] : [];
const files = matching.filter((f) => !elsewhere.some((n) => f.startsWith(`${n}.vm`)));
if (elsewhere.length > 0) console.log(`# UBLK_VM_SUITE=${suite}: run on another kernel of \`npm test\`: ${matching.filter((f) => !files.includes(f)).join(', ')}`);
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
