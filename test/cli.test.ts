/**
 * The CLI on the host, whose kernel has no ublk_drv: help, version, every usage error (exit 2,
 * one line, before anything touches the kernel), kublk's spellings, and the error that names the
 * fix when the driver is missing. (Everything that needs ublk_drv is in test/vm/.)
 */
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { PAGE_SIZE } from '../src/libc/index.js';
import { targetNames } from '../src/targets/index.js';

const bin = fileURLToPath(new URL('../bin/ublk.js', import.meta.url));
const run = (...args: string[]) => spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8' });
const version = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;
const work = mkdtempSync(join(tmpdir(), 'ublk-cli-'));
t.teardown(() => rmSync(work, { recursive: true, force: true }));

t.test('--help, --version, help -t null', (t) => {
  const h = run('--help');
  t.equal(h.status, 0);
  t.match(h.stdout, /^usage: ublk <command>/);
  t.ok(h.stdout.includes(`targets: ${targetNames.join(', ')}, or the path of a module`), 'help lists every built-in target');
  t.same(run('--version').stdout, `ublk ${version}\n`);
  const n = run('help', '-t', 'null');
  t.equal(n.status, 0);
  t.match(n.stdout, /-s, --size SIZE/);
  t.equal(run().status, 2, 'no command is a usage error');
  t.end();
});

const usageErrors: Array<[string[], RegExp]> = [
  [['add'], /needs -t TYPE/],
  [['add', '-t', 'nosuch'], /unknown target 'nosuch'/],
  [['add', '-t', 'null', '-q', '0'], /-q must be from 1 to 4096/],
  [['add', '-t', 'null', '-d', '5000'], /-d must be from 1 to 4096/],
  [['add', '-t', 'null', '-n', '1048576'], /-n must be from 0 to 1048575, got 1048576/],
  [['add', '-t', 'null', '-n', '-1'], /-n takes a number, got '-1'/],
  [['add', '-t', 'null', '--max-io-bytes', '100K'], /power of two from 4K to 32M/],
  [['add', '-t', 'null', '--max-io-bytes', '64M'], /--max-io-bytes must be a power of two from 4K to 32M, got 67108864/],
  [['add', '-t', 'null', '--max-io-bytes', '3000'], /--max-io-bytes must be a power of two from 4K to 32M, got 3000/],
  [['add', '-t', 'null', '-s', '-1'], /takes a size/],
  [['add', '-t', 'null', '-s', '1'], /null: the size must be a multiple of the block size 512, got 1/],
  [['add', '-t', 'null', '--block-size', '3'], /--block-size must be 512, 1024, 2048 or 4096, got 3/],
  [['add', '-t', 'null', '--block-size', String(PAGE_SIZE * 2)], new RegExp(`--block-size must be .* or ${PAGE_SIZE}, got ${PAGE_SIZE * 2}`)],
  [['add', '-t', 'null', '--frob'], /null: unknown option --frob/],
  [['add', '-t', 'overlay', '--base', 'b.img'], /overlay needs --overlay FILE/],
  [['add', '-t', 'fault', '-f', 'x', '--error-at', 'x'], /fault: --error-at takes OFFSET\[:LENGTH\]\[:read\|write\|any\]/],
  [['add', '-t', 'null', '-q', '1', '-q', '2'], /add: -q given twice/],
  [['add', '-t', 'null', '-q', '1', '--queues=2'], /add: -q and --queues are the same option, given twice/],
  [['add', '-t', 'null', '-s', '1G', '--size', '2G'], /null: -s and --size are the same option/],
  [['add', '-t', 'null', '--foreground=yes'], /--foreground takes no value/],
  // kublk's -b is batch I/O, a flag: a size after it is the target's argument, not ours.
  [['add', '-t', 'null', '-b', '1M'], /null: unexpected argument '1M'/],
  [['add', '-t', 'null', '-b', '-g'], /-g \(get_data\) and -b \(batch I\/O\) exclude each other/],
  [['add', '-t', 'null', '-b', '--nthreads', '2', '--per_io_tasks'], /--nthreads 2 with -b: batch I\/O serves each queue from one thread/],
  // kublk's recovery options take 0 or 1; REISSUE and FAIL_IO exclude each other.
  [['add', '-t', 'null', '-r'], /add: -r takes a value/],
  [['add', '-t', 'null', '-r', '2'], /-r must be from 0 to 1, got 2/],
  [['add', '-t', 'null', '-i', '1', '-e', '1'], /-i 1 .* and -e 1 .* exclude each other/],
  [['recover'], /recover needs -n ID/],
  [['recover', '-n', '1', '-t', 'null'], /recover: unknown option -t/],
  [['upgrade'], /upgrade needs -n ID/],
  [['stop', '--safe'], /stop needs -n ID/],
  [['quiesce', '--frob'], /quiesce: unknown option --frob/],
  [['update_size', '-n', '1'], /update_size needs -s SIZE/],
  [['update_size', '-n', '1', '-s', 'big'], /-s takes a size/],
  [['add', '-t', 'null', '-g', '-z'], /-g \(get_data\) and -z \(zero_copy\) exclude each other/],
  [['add', '-t', 'null', '--auto_zc', '--unprivileged'], /--auto_zc \(auto_zc\) cannot be used with --unprivileged/],
  [['add', '-t', 'null', '-g', '-u'], /-g \(get_data\) and -u \(user_copy\) exclude each other/],
  [['add', '-t', 'null', '-u', '--unprivileged'], /-u \(user_copy\) cannot be used with --unprivileged/],
  [['add', '-t', 'null', '--get_data=1'], /--get_data takes no value/],
  [['add', '-t', 'null', '--nthreads', '2'], /--nthreads 2 differs from the 1 queue\(s\): add --per_io_tasks/],
  [['add', '-t', 'null', '-q', '2', '--nthreads', '3', '--per_io_tasks'], /--nthreads 3 must be a multiple of the 2 queue\(s\)/],
  [['add', '-t', 'null', '-d', '2', '--nthreads', '4', '--per_io_tasks'], /4 threads per queue, but a queue has only 2 tags/],
  [['add', '-t', 'null', '--shmem_zc'], /--shmem_zc needs --htlb FILE: a hugetlbfs or tmpfs file/],
  [['add', '-t', 'null', '--htlb', '/dev/shm/x'], /--htlb FILE goes with --shmem_zc/],
  [['add', '-t', 'null', '--shmem_zc', '--htlb', '/nonexistent'], /--htlb \/nonexistent: ENOENT/],
  [['add', '-t', 'null', '--shmem_zc', '--htlb', '/dev/null'], /--htlb \/dev\/null must be a regular file whose size is a multiple of the page size/],
  [['add', '-t', 'null', '--shmem_zc', '--htlb', '/etc/hostname', '-r', '1'], /--shmem_zc with -r 1 is not supported yet/],
  [['add', '-t', 'loop'], /loop needs a backing file/],
  [['add', '-t', 'loop', '-f', '/a', '/b'], /the backing file is given twice/],
  [['add', '-t', 'loop', '/a', '/b'], /unexpected argument '\/b'/],
  [['add', '-t', 'loop', '-f', '/a', '--offset', '1000'], /--offset must be a multiple of the block size 512, got 1000/],
  [['add', '-t', 'loop', '-f', '/a', '--block-size', '4096', '-s', '6144'], /--size must be a multiple of the block size 4096/],
  [['add', '-t', 'loop', '-f', '/a', '--buffered', '--direct'], /contradict/],
  [['add', '-t', 'mem'], /mem needs a size/],
  [['add', '-t', 'mem', '-s', '5000'], /mem: the size must be a multiple of 4096, got 5000/],
  [['add', '-t', './no/such/module.mjs'], /cannot load the target module/],
  [['help', '-t', 'nosuch'], /unknown target/],
  [['help', '--frob'], /help: unknown option --frob/],
  [['help', 'extra'], /help: unexpected argument 'extra'/],
  [['features', '--frob'], /features: unknown option --frob/],
  [['features', '--json', '--json'], /--json given twice/],
  [['list', '--frob'], /list: unknown option --frob/],
  [['list', '-n', 'x'], /-n takes a number/],
  [['del'], /del needs -n ID or -a/],
  [['del', '-n', '1', '-a'], /not both/],
  [['--version', '--frob'], /unknown option --frob/],
  [['bogus'], /unknown command 'bogus'/],
];

t.test('usage errors exit 2 with one line before touching the kernel', (t) => {
  for (const [args, msg] of usageErrors) {
    const r = run(...args);
    t.equal(r.status, 2, `ublk ${args.join(' ')}: exit 2`);
    t.match(r.stderr, msg, `ublk ${args.join(' ')}: ${r.stderr.trim()}`);
    t.equal(r.stderr.trim().split('\n').length, 1, 'one line');
  }
  t.end();
});

t.test('what is accepted: 0 and 00 alike, --name=value, kublk\'s positional backing file', (t) => {
  // Without ublk_drv these get as far as the machine check, which proves the command line passed.
  const driverMissing = /\/dev\/ublk-control does not exist/;
  for (const args of [
    ['add', '-t', 'loop', '-f', '/a', '--offset', '0'],
    ['add', '-t', 'loop', '-f', '/a', '--offset', '00'],
    ['add', '-t', 'loop', '--offset=4096', '/a'],
    ['add', '-t', 'null', '--queues=2', '--depth', '64', '-s', '1G', '--block-size', '4096'],
    ['add', '--type=mem', '-s', '64M'],
    ['add', '-t', 'mem', '-s', '64M', '-r', '1', '-i', '1'],
    ['add', '-t', 'null', '-r', '0', '-e', '0', '--no_auto_part_scan'],
  ]) {
    const r = run(...args);
    if (existsSync('/dev/ublk-control')) t.not(r.status, 2, `ublk ${args.join(' ')}: ${r.stderr.trim()}`);
    else t.match(r.stderr, driverMissing, `ublk ${args.join(' ')}: parsed, then ${r.stderr.trim()}`);
  }
  t.end();
});

t.test('without ublk_drv, commands name the fix', { skip: existsSync('/dev/ublk-control') ? 'this host has ublk_drv' : false }, (t) => {
  for (const args of [['list'], ['features'], ['add', '-t', 'null'], ['del', '-n', '0']]) {
    const r = run(...args);
    t.equal(r.status, 1, `ublk ${args.join(' ')}`);
    t.match(r.stderr, /^ublk: \/dev\/ublk-control does not exist: load the driver with `modprobe ublk_drv` \(kernel option CONFIG_BLK_DEV_UBLK, Linux 6\.0\+\)\n$/);
  }
  t.end();
});

t.test('a reader that closes the pipe early ends the command quietly (no EPIPE stack trace)', async (t) => {
  for (const args of [['--help'], ['help', '-t', 'loop']]) {
    const child = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    child.stdout.destroy(); // the read end is closed before the command writes
    let err = '';
    child.stderr.on('data', (d: Buffer) => { err += d.toString(); });
    const code = await new Promise<number | null>((r) => child.on('close', (c) => r(c)));
    t.equal(code, 0, `ublk ${args.join(' ')}: exit 0`);
    t.equal(err, '', 'nothing on stderr');
  }
});

t.test('-t PATH loads a target module; a module that is not a target is refused', (t) => {
  const notTarget = join(work, 'not-a-target.mjs');
  writeFileSync(notTarget, 'export default { name: "x" };\n');
  let r = run('help', '-t', notTarget);
  t.equal(r.status, 2);
  t.match(r.stderr, /is not a target module: its default export must be defineAsyncTarget/);
  const mod = join(work, 'tiny.mjs');
  writeFileSync(mod, 'export default { name: "tiny", usage: "  --tiny   a tiny option\\n", parseArgs: () => ({}), prepare: () => ({ sizeBytes: 4096 }), openQueue: () => ({ handle: (r) => r.length }) };\n');
  r = run('help', '-t', mod);
  t.equal(r.status, 0, r.stderr);
  t.match(r.stdout, /--tiny {3}a tiny option/);
  t.end();
});
