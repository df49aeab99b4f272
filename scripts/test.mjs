#!/usr/bin/env node
// `npm test`: every test suite this checkout can run, with one summary line at the end.
//
// 0. A type check of everything (tsc --noEmit -p tsconfig.check.json): sources, tests, benches
//    and scripts. Tests and benches run through tsx, which strips types without checking them.
// 1. Host tests (tap, test/**/*.test.ts) on the running kernel: the io_uring layer and the ABI
//    conformance checks against real headers.
// 2. VM tests: test/vm/*.vm.ts, compiled to build/vm, inside a VM (test/vm/runner.ts) on Linux 6.12 LTS and the newest
//    Debian kernel (UBLK_VM_KERNELS overrides the list), where ublk_drv exists; tests that
//    check only our code above the queue engine run on one of the two (UBLK_VM_SUITE, read by
//    onKernel in test/vm/helpers.ts). Without the VM
//    tooling they are reported as not run, with the reason, never as passed.
//
// 3. The ublk protocol conformance matrix (scripts/conformance.mjs): every rule of
//    test/vm/conformance/rules.ts on Linux 6.12, 6.16, 7.2 and the newest, a VM each.
// The last line is `N passed, N failed, N skipped` (tap's assertion counts), which CI reads.
import { spawn, spawnSync } from 'node:child_process';
import { release } from 'node:os';

/** Runs `node ...argv`, streaming its stdout, and reads tap's closing summary from it. */
function runTap(argv) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, argv, { stdio: ['ignore', 'pipe', 'inherit'] });
    let tail = '';
    child.stdout.on('data', (chunk) => {
      process.stdout.write(chunk);
      tail = (tail + chunk.toString()).slice(-4096);
    });
    child.on('close', (code) => {
      // tap's closing line at the root level: "# { total: 1283, pass: 1280, fail: 1, skip: 2 }"
      const all = [...tail.matchAll(/^# \{ total: (\d+)([^}]*)\}/gm)];
      const m = all[all.length - 1];
      const field = (name) => Number((m?.[2].match(new RegExp(`${name}: (\\d+)`)) ?? [])[1] ?? 0);
      resolve({ code, found: Boolean(m), total: m ? Number(m[1]) : 0, pass: field('pass'), fail: field('fail'), skip: field('skip') + field('todo') });
    });
  });
}

const totals = { pass: 0, fail: 0, skip: 0 };
const lines = [];
function count(name, r) {
  let fail = r.fail;
  if (!r.found || r.code !== 0) {
    // The runner itself failed (a crash, a timeout, a file that did not load, a VM that did not
    // boot): a failure even if no assertion said "not ok".
    if (fail === 0) fail = 1;
    lines.push(`# ${name}: exited with ${r.code}${r.found ? '' : ' and printed no summary'}`);
  }
  totals.pass += r.pass;
  totals.fail += fail;
  totals.skip += r.skip;
  lines.push(`# ${name}: ${r.pass} passed, ${fail} failed, ${r.skip} skipped`);
}

const tc = spawnSync(process.execPath, ['node_modules/typescript/bin/tsc', '-p', 'tsconfig.check.json'], { stdio: 'inherit' });
if (tc.status === 0) {
  totals.pass += 1;
  lines.push('# type check (src, test, bench, scripts): passed');
} else {
  totals.fail += 1;
  lines.push('# type check (src, test, bench, scripts): FAILED (npx tsc -p tsconfig.check.json)');
}

const t0 = Date.now();
count(`host tests (kernel ${release()})`, await runTap(['node_modules/tap/dist/esm/run.mjs', '--reporter=tap', ...process.argv.slice(2)]));
lines.push(`#   (${((Date.now() - t0) / 1000).toFixed(0)} s)`);

const missing = ['qemu-system-x86_64', 'busybox', 'cpio', 'depmod', 'modprobe']
  .find((tool) => spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0);
if (missing) {
  lines.push(`# VM tests: NOT RUN: ${missing} is not installed (npm run setup:vm installs the VM tooling and kernels)`);
} else {
  // The guest runs the suite compiled (build/vm): no TypeScript loader under emulation, where
  // tsx's WebAssembly lexer crashed now and then before any test ran.
  const tsc = spawnSync(process.execPath, ['node_modules/typescript/bin/tsc', '-p', 'tsconfig.vm.json'], { stdio: 'inherit' });
  if (tsc.status !== 0) {
    totals.fail += 1;
    lines.push('# VM tests: NOT RUN: the VM suite did not compile (tsc -p tsconfig.vm.json)');
  }
  for (const kernel of tsc.status === 0 ? (process.env.UBLK_VM_KERNELS ?? 'lts newest').split(/\s+/).filter(Boolean) : []) {
    const started = Date.now();
    console.log(`# VM suite on kernel '${kernel}'`);
    // Tests that check only our code above the queue engine run on one of the two kernels
    // (onKernel in test/vm/helpers.ts); any other kernel skips them.
    process.env.UBLK_VM_SUITE = kernel === 'newest' || kernel === 'lts' ? kernel : 'short';
    const r = await runTap(['--import', 'tsx', 'scripts/vm.ts', '--kernel', kernel, '--timeout', '2400',
      // ublk grants a device at most one queue per CPU: 4 vCPUs let the suite test 4-queue devices.
      '--cpus', '4', '--',
      'node', 'build/vm/test/vm/run-in-vm.js']);
    count(`VM tests on kernel '${kernel}'`, r);
    lines.push(`#   (${((Date.now() - started) / 1000).toFixed(0)} s including boot)`);
  }
  if (tsc.status === 0 && process.env.UBLK_CONFORMANCE !== '0') {
    // The protocol conformance matrix (test/vm/conformance) on its four kernels, one VM each;
    // each rule kept on a kernel is one pass. docs/conformance.md is left as it is (npm run
    // conformance regenerates it).
    const started = Date.now();
    console.log('# ublk protocol conformance matrix');
    const r = spawnSync(process.execPath, ['scripts/conformance.mjs', '--no-write'], { stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8', maxBuffer: 64 << 20 });
    process.stdout.write(r.stdout ?? '');
    const m = /^(\d+) passed, (\d+) failed(?:, (\d+) skipped \((.*)\))?$/m.exec(r.stdout ?? '');
    const pass = m ? Number(m[1]) : 0;
    let fail = m ? Number(m[2]) : 0;
    const skip = m?.[3] ? Number(m[3]) : 0;
    if (!m || (r.status !== 0 && fail === 0)) fail = Math.max(fail, 1);
    totals.pass += pass;
    totals.fail += fail;
    totals.skip += skip;
    lines.push(`# conformance matrix: ${pass} passed, ${fail} failed, ${skip} skipped${skip ? ` (${m[4]}: Debian's archive no longer has it)` : ''} (${((Date.now() - started) / 1000).toFixed(0)} s, UBLK_CONFORMANCE=0 leaves it out)`);
  }
}
for (const l of lines) console.log(l);
console.log(`${totals.pass} passed, ${totals.fail} failed, ${totals.skip} skipped`);
process.exitCode = totals.fail > 0 ? 1 : 0;
