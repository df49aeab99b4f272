#!/usr/bin/env node
// `npm test`: every test suite this checkout can run, with one summary line at the end.
//
// 1. Host tests (tap, test/**/*.test.ts) on the running kernel: the io_uring layer and the ABI
//    conformance checks against real headers.
// 2. VM tests (ublk_drv on Linux 6.12 LTS and the newest Debian kernel): not part of this
//    version yet; reported as not run, with the reason, never as passed.
//
// The last line is `N passed, N failed, N skipped` (tap's assertion counts), which CI reads.
import { spawn } from 'node:child_process';

function runTap(args) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['node_modules/tap/dist/esm/run.mjs', ...args], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let tail = '';
    child.stdout.on('data', (chunk) => {
      process.stdout.write(chunk);
      tail = (tail + chunk.toString()).slice(-4096);
    });
    child.on('close', (code) => {
      // tap's closing line: "# { total: 1283, pass: 1280, fail: 1, skip: 2 }"
      const m = tail.match(/# \{ total: (\d+)([^}]*)\}/);
      const field = (name) => Number((m?.[2].match(new RegExp(`${name}: (\\d+)`)) ?? [])[1] ?? 0);
      resolve({
        code,
        found: Boolean(m),
        total: m ? Number(m[1]) : 0,
        pass: field('pass'),
        fail: field('fail'),
        skip: field('skip') + field('todo'),
      });
    });
  });
}

const host = await runTap(['--reporter=tap', ...process.argv.slice(2)]);
let failed = host.fail;
if (!host.found || host.code !== 0) {
  // tap itself failed (a crash, a timeout, a file that did not load): count it as a failure even
  // if no assertion said "not ok".
  if (failed === 0) failed = 1;
  console.log(`# host tests: tap exited with ${host.code}${host.found ? '' : ' and printed no summary'}`);
}
console.log(`# host tests (kernel ${(await import('node:os')).release()}): ${host.pass} passed, ${host.fail} failed, ${host.skip} skipped`);
console.log('# VM tests (ublk_drv on 6.12 LTS and newest): not run: the VM runner is not part of this version yet');
console.log(`${host.pass} passed, ${failed} failed, ${host.skip} skipped`);
process.exitCode = failed > 0 ? 1 : 0;
