/**
 * The CLI on the host, whose kernel has no ublk_drv: help, version, usage errors, and the
 * error that names the fix when the driver is missing. (Everything that needs ublk_drv is in
 * test/vm/.)
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const bin = fileURLToPath(new URL('../bin/ublk.js', import.meta.url));
const run = (...args: string[]) => spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8' });
const version = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;

t.test('--help, --version, help -t null', (t) => {
  const h = run('--help');
  t.equal(h.status, 0);
  t.match(h.stdout, /^usage: ublk <command>/);
  t.match(h.stdout, /targets: null/);
  t.same(run('--version').stdout, `ublk ${version}\n`);
  const n = run('help', '-t', 'null');
  t.equal(n.status, 0);
  t.match(n.stdout, /-s, --size SIZE/);
  t.equal(run().status, 2, 'no command is a usage error');
  t.end();
});

t.test('usage errors exit 2 with one line before touching the kernel', (t) => {
  for (const [args, msg] of [
    [['add'], /needs -t TYPE/],
    [['add', '-t', 'nosuch'], /unknown target 'nosuch'/],
    [['add', '-t', 'null', '-q', '0'], /-q must be from 1 to 4096/],
    [['add', '-t', 'null', '-d', '5000'], /-d must be from 1 to 4096/],
    [['add', '-t', 'null', '-b', '100K'], /power of two from 4K to 32M/],
    [['add', '-t', 'null', '-s', '-1'], /takes a size/],
    [['add', '-t', 'null', '--frob'], /null: unknown option --frob/],
    [['help', '-t', 'nosuch'], /unknown target/],
    [['list', '--frob'], /unknown option/],
    [['bogus'], /unknown command 'bogus'/],
  ] as Array<[string[], RegExp]>) {
    const r = run(...args);
    t.equal(r.status, 2, `ublk ${args.join(' ')}`);
    t.match(r.stderr, msg);
    t.equal(r.stderr.trim().split('\n').length, 1);
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
