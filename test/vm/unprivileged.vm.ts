/**
 * Unprivileged devices (run inside the VM): a real non-root user adds, serves, uses and deletes
 * a loop device of their own; another user can neither see nor stop it. The guest has no udev,
 * so the test plays udev: it installs the rule with `ublk setup-unprivileged` and runs the
 * rule's own RUN command for every new ublk node, as udevd would.
 */
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, chownSync, existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { UblkControl } from '../../src/ublk/control.js';
import { UBLK_F_UNPRIVILEGED_DEV } from '../../src/ublk/abi.js';
import { ROOT, ublk, ublkIds, waitFor } from './helpers.js';

const USER = 1000;
const OTHER = 1001;
const work = mkdtempSync('/tmp/ublk-unpriv-');
chmodSync(work, 0o755);
const controlMode = statSync('/dev/ublk-control').mode & 0o777;
t.teardown(() => {
  chmodSync('/dev/ublk-control', controlMode);
  rmSync(work, { recursive: true, force: true });
});

const features = (() => {
  const c = new UblkControl();
  try { return c.features(); } finally { c.close(); }
})();

/** setpriv's arguments that run `ublk ARGS` as user `uid` with no supplementary groups. */
const ublkAs = (uid: number, args: string[]) => [`--reuid=${uid}`, `--regid=${uid}`, '--clear-groups', process.execPath, join(ROOT, 'bin', 'ublk.js'), ...args];
/** The user's environment: a home of its own, no XDG_RUNTIME_DIR (so /tmp/ublk-UID). */
const userEnv = (uid: number) => ({ PATH: process.env.PATH, HOME: join(work, `home-${uid}`) });

/** `ublk ARGS` as user `uid` (no supplementary groups, a home of its own). */
function as(uid: number, ...args: string[]) {
  const r = spawnSync('setpriv', ublkAs(uid, args), { encoding: 'utf8', timeout: 120_000, env: userEnv(uid) });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}
/** {@link as} without blocking this event loop (which plays udev meanwhile). */
function asAsync(uid: number, ...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const child = spawn('setpriv', ublkAs(uid, args), { env: userEnv(uid), stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
  child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
  return new Promise((res) => child.on('close', (code) => res({ code: code ?? -1, stdout, stderr })));
}
function runAs(uid: number, cmd: string, args: string[]) {
  return spawnSync('setpriv', [`--reuid=${uid}`, `--regid=${uid}`, '--clear-groups', cmd, ...args], { encoding: 'utf8', timeout: 120_000 });
}

t.test('a non-root user serves a loop device of their own; another user cannot see or stop it', { skip: features & UBLK_F_UNPRIVILEGED_DEV ? false : 'no UNPRIVILEGED_DEV' }, async (t) => {
  // Without the setup: a clear line, nothing made.
  let r = as(USER, 'add', '--unprivileged', '-t', 'null');
  t.equal(r.code, 1);
  t.match(r.stderr, /cannot open \/dev\/ublk-control \(EACCES\): .*`ublk setup-unprivileged` as root/);

  const rules = join(work, 'rules');
  r = ublk('setup-unprivileged', '--rules-dir', rules);
  t.equal(r.code, 0, `setup-unprivileged: ${r.stderr}`);
  const rule = readFileSync(join(rules, '99-ublk-unprivileged.rules'), 'utf8');
  t.match(rule, /KERNEL=="ublk-control", MODE="0666"/);
  t.equal(statSync('/dev/ublk-control').mode & 0o777, 0o666, 'the control device is open to users now');
  const run = /RUN\+="([^"]+)"/.exec(rule)![1]!.split(' ');

  // udev, played: the rule's command for every new ublk node (this event loop must stay free
  // while a user's add runs, hence asAsync there).
  const handled = new Set<string>();
  const udev = setInterval(() => {
    for (const n of readdirSync('/dev').filter((x) => /^ublk[bc]\d+$/.test(x))) {
      const key = `${n}:${statSync(`/dev/${n}`).ino}`;
      if (handled.has(key)) continue;
      handled.add(key);
      spawnSync(run[0]!, run.slice(1).map((a) => a.replace('%k', n)));
    }
  }, 50);
  t.teardown(() => clearInterval(udev));

  r = as(USER, 'add', '-t', 'null');
  t.match(r.stderr, /adding a device needs root, or --unprivileged/, 'a user must ask for an unprivileged device');
  r = as(USER, 'add', '--unprivileged', '-r', '1', '-t', 'null');
  t.match(r.stderr, /cannot be used with --unprivileged/);

  const img = join(work, 'user.img');
  spawnSync('truncate', ['-s', '64M', img]);
  chownSync(img, USER, USER);
  r = await asAsync(USER, 'add', '--unprivileged', '-t', 'loop', '-f', img);
  t.equal(r.code, 0, `the user adds it: ${r.stderr}`);
  const id = Number(/^dev id (\d+):/m.exec(r.stdout)?.[1]);
  t.ok(await waitFor(() => existsSync(`/dev/ublkb${id}`) && statSync(`/dev/ublkb${id}`).uid === USER, 5000), 'the disk node is the user\'s');
  t.equal(statSync(`/dev/ublkc${id}`).uid, USER, 'and so is the char device');
  t.match(as(USER, 'list').stdout, new RegExp(`dev id ${id}:`), 'the user lists it');
  t.match(readFileSync(`/proc/${JSON.parse(readFileSync(`/tmp/ublk-${USER}/ublkb${id}.json`, 'utf8')).pid}/status`, 'utf8'), new RegExp(`Uid:\\s+${USER}\\s`), 'its server runs as the user');

  const fio = runAs(USER, 'fio', ['--name=t', `--filename=/dev/ublkb${id}`, '--rw=randwrite', '--bs=4k', '--ioengine=io_uring', '--iodepth=16',
    '--direct=1', '--size=32M', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=terse']);
  t.equal(fio.status, 0, `the user's fio write + crc32c verify: ${fio.stderr.slice(-300)}`);

  r = as(OTHER, 'list');
  t.notMatch(r.stdout, new RegExp(`dev id ${id}:`), 'another user does not see it');
  r = as(OTHER, 'del', '-n', String(id));
  t.equal(r.code, 1);
  t.match(r.stderr, /(EPERM|EACCES): it is another user's device, or a privileged one/, r.stderr.trim());
  t.ok(existsSync(`/dev/ublkb${id}`), 'and it is still there');

  r = as(USER, 'del', '-n', String(id));
  t.equal(r.code, 0, `the user deletes it: ${r.stderr}`);
  t.same(ublkIds(), [], 'gone');
  t.end();
});
