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
// Tests that check our own code above the queue engine (option handling, a target's logic, the
// example modules, layers, the nbd and qcow2 targets) run on one of `npm test`'s two kernels
// only, to keep each kernel's run inside its budget: see onKernel in helpers.ts, which reads
// UBLK_VM_SUITE (scripts/test.mjs sets it to the kernel's name; `all` runs every test).
const files = matching;
// Seconds per file, printed as TAP comments at the end: what the suite's time is spent on, for
// keeping it inside its budget. Each top-level test is counted to the file whose import added it.
// Imported here, after TAP_TIMEOUT is set above: a static import would load tap first, and its
// root test would get the 30 s default.
const { t } = await import('tap');
const fileOf = new Map<object, string>();
const seconds = new Map<string, number>();
const added = new Map<string, number>();
const ended = new Map<string, number>();
let importing = '';
const root = t as unknown as { on(event: string, fn: (st: { name?: string; time?: number }) => void): void };
root.on('subtestAdd', (st) => {
  fileOf.set(st, importing);
  added.set(importing, (added.get(importing) ?? 0) + 1);
});
// Each file's total is also printed when its last test ends, so a run the VM runner kills at
// its timeout still says where the time went.
root.on('subtestEnd', (st) => {
  const f = fileOf.get(st);
  if (f === undefined) return;
  seconds.set(f, (seconds.get(f) ?? 0) + (st.time ?? 0) / 1000);
  ended.set(f, (ended.get(f) ?? 0) + 1);
  if (ended.get(f) === added.get(f)) console.log(`# ${f}: ${seconds.get(f)!.toFixed(0)} s`);
});
t.teardown(() => {
  const rows = [...seconds].sort((a, b) => b[1] - a[1]).map(([f, s]) => `${f} ${s.toFixed(0)} s`);
  console.log(`# seconds per file: ${rows.join(', ')}`);
});
for (const f of files) {
  importing = f;
  await import(new URL(f, dir).href);
}
