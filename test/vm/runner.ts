/**
 * The test VM: boots a Debian kernel under qemu, runs one command as root in the project
 * directory with the host's root file system (read-only) around it, streams the command's output
 * and returns its exit status.
 *
 * Pieces: scripts/vm-kernel.sh fetches and prepares the kernel (vmlinuz, the modules tree, an
 * initramfs base with busybox and the 9p modules); this file appends /init (test/vm/init.sh) to
 * that initramfs, writes the command into a job directory shared over 9p, and watches qemu.
 * The command's output arrives on the second serial port (our stdout pipe); the kernel's and
 * init's messages go to the first, which is a log file read only to detect readiness and to
 * explain a failed boot.
 */
import { spawn, execFileSync } from 'node:child_process';
import { accessSync, constants, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Writable } from 'node:stream';

export const REPO_ROOT = resolve(fileURLToPath(new URL('../..', import.meta.url)));

export interface VmOptions {
  /** lts, newest or a version such as 6.12.117 (see scripts/vm-kernel.sh). */
  kernel?: string;
  /** The command and its arguments, run with the project directory as working directory. */
  command: string[];
  /** Guest memory in MiB (default 2048). */
  memMiB?: number;
  /** Guest CPUs (default 2). */
  cpus?: number;
  /** Seconds the command may run before the VM is killed (default 1800). */
  timeoutSec?: number;
  /** Seconds the kernel may take to reach the command (default 180; software emulation is slow). */
  bootTimeoutSec?: number;
  /** kvm, tcg, or auto: KVM where /dev/kvm is usable and boots this kernel, else TCG. */
  accel?: 'auto' | 'kvm' | 'tcg';
  /** Where the command's output goes (default process.stdout). */
  output?: Writable;
  /** Extra environment for the command. */
  env?: Record<string, string>;
  /** Print progress lines (kernel preparation, boot time) on stderr. */
  verbose?: boolean;
}

export interface VmResult {
  /** The command's exit status; 124 if it timed out, 125 if the VM failed before or after it. */
  code: number;
  /** `uname -r` in the guest. */
  release: string;
  /** The Debian package and version the kernel came from. */
  package: string;
  accel: 'kvm' | 'tcg';
  /** Milliseconds from qemu start to the command's start. */
  bootMs: number;
  /** Milliseconds from qemu start to its exit. */
  totalMs: number;
  /** Why the VM failed, when code is 124 or 125 without the command saying so. */
  failure?: string;
}

const CACHE = process.env.UBLK_CACHE ?? join(process.env.HOME ?? '/root', '.cache', 'ublk');

/** Prepares (or finds in the cache) the kernel and returns its directory. */
export function prepareKernel(kernel: string): string {
  return execFileSync(join(REPO_ROOT, 'scripts', 'vm-kernel.sh'), [kernel], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
  }).trim();
}

/** Whether the tools a VM run needs are installed; a reason if not. */
export function vmToolingMissing(): string | undefined {
  for (const tool of ['qemu-system-x86_64', 'busybox', 'cpio', 'depmod', 'modprobe']) {
    try {
      execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
    } catch {
      return `${tool} is not installed (npm run setup:vm installs the VM tooling)`;
    }
  }
  return undefined;
}

/** A single-file entry of a "newc" cpio archive (the initramfs format the kernel unpacks). */
function cpioEntry(name: string, mode: number, data: Buffer): Buffer {
  const hex = (n: number) => n.toString(16).padStart(8, '0');
  const fields = [0, mode, 0, 0, 1, 0, data.length, 0, 0, 0, 0, name.length + 1, 0];
  const header = Buffer.from(`070701${fields.map(hex).join('')}${name}\0`, 'latin1');
  const pad = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  return Buffer.concat([header, pad(header.length), data, pad(data.length)]);
}

/** /init and /sbin/modprobe, appended to the kernel's initramfs base (archives may be concatenated). */
function initArchive(): Buffer {
  const modprobe = Buffer.from(
    '#!/bin/busybox sh\n'
    + '# The kernel runs /sbin/modprobe from the initramfs root for on-demand loads (a file system\n'
    + '# type, a block driver): defer to the host\'s modprobe with the Debian package\'s module tree.\n'
    + 'exec /bin/busybox chroot /newroot /sbin/modprobe -d "$(/bin/busybox cat /kroot)" "$@"\n',
  );
  return Buffer.concat([
    cpioEntry('init', 0o100755, readFileSync(join(REPO_ROOT, 'test', 'vm', 'init.sh'))),
    cpioEntry('sbin/modprobe', 0o100755, modprobe),
    cpioEntry('TRAILER!!!', 0, Buffer.alloc(0)),
  ]);
}

const shQuote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

/** Environment variables handed from the host to the command when set. */
const PASS_ENV = /^(CI|UBLK_.*|TAP_.*|NODE_OPTIONS|DEBUG|FORCE_COLOR)$/;

function kvmUsable(kdir: string): boolean {
  if (existsSync(join(kdir, 'kvm-unusable'))) return false;
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/** Boots a VM, runs the command, and resolves when the VM is gone. */
export async function runVm(opts: VmOptions): Promise<VmResult> {
  const kernel = opts.kernel ?? 'lts';
  const kdir = prepareKernel(kernel);
  const accel = opts.accel ?? 'auto';
  if (accel === 'kvm' || (accel === 'auto' && kvmUsable(kdir))) {
    const r = await boot(kdir, opts, 'kvm', accel === 'auto' ? Math.min(opts.bootTimeoutSec ?? 180, 30) : undefined);
    if (r.code !== 125 || r.bootMs > 0 || accel === 'kvm') return r;
    // KVM did not bring this kernel up (on these machines /dev/kvm cannot run stock kernels):
    // remember that, and use software emulation.
    writeFileSync(join(kdir, 'kvm-unusable'), `${r.failure ?? 'boot failed'}\n`);
    if (opts.verbose) process.stderr.write('vm: KVM could not boot this kernel; using software emulation (TCG)\n');
  }
  // Software emulation occasionally kills a kernel while it boots (seen: an int3 Oops in
  // sched_clock_cpu 3 s in, on 4 vCPUs, as the kernel patches its own code). The command had not
  // started, so booting again is safe; a failure after READY is never retried.
  for (let attempt = 1; ; attempt++) {
    const r = await boot(kdir, opts, 'tcg');
    if (r.code !== 125 || r.bootMs > 0 || r.failure?.startsWith('VM init failed') || attempt === 3) return r;
    process.stderr.write(`vm: the kernel died before the command started (attempt ${attempt} of 3); booting again\n`);
  }
}

async function boot(kdir: string, opts: VmOptions, accel: 'kvm' | 'tcg', bootTimeoutOverride?: number): Promise<VmResult> {
  const job = mkdtempSync(join(tmpdir(), 'ublk-vm-'));
  const out = opts.output ?? process.stdout;
  const pkg = readFileSync(join(kdir, 'package'), 'utf8').trim();
  const env: Record<string, string> = {
    PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
    HOME: '/tmp/home', // the host root is read-only in the guest; npm and friends want a home
    LANG: 'C.UTF-8',
    UBLK_VM: '1',
    UBLK_VM_PACKAGE: pkg,
    // The kernel package's module tree, for `modprobe -d "$UBLK_VM_KROOT" null_blk ...`.
    UBLK_VM_KROOT: join(kdir, 'root'),
  };
  for (const [k, v] of Object.entries(process.env)) if (PASS_ENV.test(k) && v !== undefined) env[k] = v;
  Object.assign(env, opts.env ?? {});
  writeFileSync(join(job, 'cmd.sh'), [
    ...Object.entries(env).map(([k, v]) => `export ${k}=${shQuote(v)}`),
    'mkdir -p "$HOME"',
    `cd ${shQuote(REPO_ROOT)} || exit 125`,
    opts.command.map(shQuote).join(' '),
    '',
  ].join('\n'));
  // The kernel unpacks concatenated archives, but each must start 4-byte aligned.
  const base = readFileSync(join(kdir, 'modules.cpio.gz'));
  writeFileSync(join(job, 'initrd.img'), Buffer.concat([base, Buffer.alloc((4 - (base.length % 4)) % 4), initArchive()]));

  const share = (tag: string, path: string, extra = '') =>
    ['-virtfs', `local,path=${path},mount_tag=${tag},security_model=none,multidevs=remap${extra}`];
  const args = [
    '-nodefaults', '-display', 'none', '-no-reboot',
    ...(accel === 'kvm' ? ['-accel', 'kvm', '-cpu', 'host'] : ['-accel', 'tcg,thread=multi', '-cpu', 'max']),
    '-smp', String(opts.cpus ?? 2), '-m', String(opts.memMiB ?? 2048),
    '-serial', `file:${join(job, 'console.log')}`, '-serial', 'stdio',
    '-kernel', join(kdir, 'vmlinuz'), '-initrd', join(job, 'initrd.img'),
    '-append', `console=ttyS0 loglevel=4 panic=-1 ublk.project=${REPO_ROOT} ublk.kroot=${join(kdir, 'root')}`,
    ...share('hostroot', '/', ',readonly=on'),
    ...share('project', REPO_ROOT),
    ...share('job', job),
  ];
  const started = Date.now();
  const qemu = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let qemuErr = '';
  qemu.stderr.on('data', (d: Buffer) => { qemuErr += d.toString(); });
  qemu.stdout.on('data', (d: Buffer) => out.write(d));

  const consoleLog = () => {
    try {
      return readFileSync(join(job, 'console.log'), 'utf8');
    } catch {
      return '';
    }
  };
  let bootMs = 0;
  let release = '';
  let failure: string | undefined;
  let timedOut = false;
  const bootLimit = (bootTimeoutOverride ?? opts.bootTimeoutSec ?? 180) * 1000;
  const cmdLimit = (opts.timeoutSec ?? 1800) * 1000;
  const watch = setInterval(() => {
    const elapsed = Date.now() - started;
    if (bootMs === 0) {
      const log = consoleLog();
      // Whole lines only: qemu may have written half of one when we read the file.
      const ready = log.match(/ublk-vm: READY (\S+)\r?\n/);
      const fatal = log.match(/ublk-vm: FATAL: (.*)\r?\n/);
      if (ready) {
        bootMs = elapsed;
        release = ready[1]!;
        if (opts.verbose) process.stderr.write(`vm: ${pkg} (${release}, ${accel}) up in ${(bootMs / 1000).toFixed(1)} s\n`);
      } else if (fatal) {
        failure = `VM init failed: ${fatal[1]}`;
        qemu.kill('SIGKILL');
      } else if (elapsed > bootLimit) {
        failure = `the VM did not reach the command within ${bootLimit / 1000} s`;
        qemu.kill('SIGKILL');
      }
    } else if (elapsed - bootMs > cmdLimit) {
      timedOut = true;
      failure = `the command ran longer than ${cmdLimit / 1000} s and was killed`;
      qemu.kill('SIGKILL');
    }
  }, 100);

  const exit = await new Promise<number | null>((res) => qemu.on('close', (code) => res(code)));
  clearInterval(watch);
  const totalMs = Date.now() - started;
  if (bootMs === 0) {
    // The command finished between two polls: the boot took at most this long.
    const ready = consoleLog().match(/ublk-vm: READY (\S+)\r?\n/);
    if (ready) {
      bootMs = totalMs;
      release = ready[1]!;
    }
  }
  let code: number;
  if (timedOut) {
    code = 124;
  } else if (existsSync(join(job, 'status'))) {
    code = Number(readFileSync(join(job, 'status'), 'utf8').trim());
  } else {
    code = 125;
    failure ??= `qemu exited (${exit}) before the command reported a status${qemuErr ? `: ${qemuErr.trim()}` : ''}`;
  }
  if (failure && !(accel === 'kvm' && bootTimeoutOverride !== undefined && bootMs === 0)) {
    const tail = consoleLog().split('\n').slice(-40).join('\n');
    process.stderr.write(`vm: ${failure}\n--- kernel console (last 40 lines) ---\n${tail}\n---\n`);
  }
  rmSync(job, { recursive: true, force: true });
  return { code, release, package: pkg, accel, bootMs, totalMs, failure };
}
