/**
 * The VM runner seen from the host, on each kernel the suite uses: the command's exit status comes
 * back, a file it writes in the project appears here, and a hung command is killed by the
 * timeout instead of hanging the suite. Skipped, with the reason, where the VM tooling is not
 * installed (npm run setup:vm).
 */
import t from 'tap';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { REPO_ROOT, runVm, vmToolingMissing } from './runner.js';

const missing = vmToolingMissing();
const kernels = (process.env.UBLK_VM_KERNELS ?? 'lts newest').split(/\s+/).filter(Boolean);

for (const kernel of kernels) {
  t.test(`VM runner on kernel '${kernel}'`, { skip: missing ? `VM tooling missing: ${missing}` : false }, async (t) => {
    const probe = join(REPO_ROOT, '.tap', `vm-probe-${kernel}-${process.pid}`);
    t.teardown(() => rmSync(probe, { force: true }));
    let out = '';
    const output = new PassThrough();
    output.on('data', (d: Buffer) => { out += d.toString(); });
    const r = await runVm({
      kernel,
      command: ['sh', '-c', `uname -r; pwd; echo "written in the guest" > ${probe}; exit 7`],
      output,
      timeoutSec: 300,
    });
    t.comment(`${r.package}: booted in ${(r.bootMs / 1000).toFixed(1)} s (${r.accel}), ran in ${(r.totalMs / 1000).toFixed(1)} s`);
    t.equal(r.code, 7, 'a non-zero exit status comes back as is');
    t.equal(r.failure, undefined, 'no VM failure');
    const [rel, cwd] = out.trim().split('\n');
    t.equal(rel, r.release, 'the guest runs the kernel that was prepared');
    t.equal(cwd, REPO_ROOT, 'the command starts in the project directory');
    t.ok(existsSync(probe), 'a file written in the guest appears on the host');
    t.equal(existsSync(probe) ? readFileSync(probe, 'utf8') : '', 'written in the guest\n');

    const hung = await runVm({ kernel, command: ['sleep', '3600'], output, timeoutSec: 5 });
    t.equal(hung.code, 124, 'a hung command is killed by the timeout');
    t.match(hung.failure, /longer than 5 s/);
    t.ok(hung.totalMs < 5 * 60 * 1000, `and the VM is gone (${(hung.totalMs / 1000).toFixed(1)} s)`);
  });
}
