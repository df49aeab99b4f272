/**
 * The run directory (src/cli/run-dir.ts), where root keeps state files and logs: refused when
 * someone else could have put things in it, files created with their own modes whatever the
 * umask, never written through a planted symlink, and removed only by their own server.
 */
import t from 'tap';
import {
  chmodSync, chownSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RunDir, type DeviceState } from '../../src/cli/run-dir.js';

const root = mkdtempSync(join(tmpdir(), 'ublk-rundir-'));
t.teardown(() => rmSync(root, { recursive: true, force: true }));
const state = (devId: number, pid: number): DeviceState => ({ devId, target: 'null', targetOptions: {}, queues: 1, depth: 128, pid });
const isRoot = process.geteuid?.() === 0;

t.test('created with explicit modes even under umask 000; state round-trips', (t) => {
  const old = process.umask(0);
  t.teardown(() => process.umask(old));
  const dir = new RunDir(join(root, 'fresh'));
  dir.writeState(state(3, 1234));
  t.equal(statSync(dir.path).mode & 0o7777, 0o755, 'the directory is 0755, not 0777');
  t.equal(statSync(dir.logDir).mode & 0o7777, 0o755, 'and log/');
  t.equal(statSync(dir.statePath(3)).mode & 0o7777, 0o644, 'a state file is 0644, not 0666');
  const log = dir.createLog();
  t.equal(statSync(log.path).mode & 0o7777, 0o640, 'a log is 0640');
  t.match(dir.readState(3), { devId: 3, pid: 1234 });
  t.end();
});

t.test('a directory others could write, a symlink, or someone else\'s is refused, and nothing is written', (t) => {
  const groupWritable = join(root, 'gw');
  mkdirSync(groupWritable);
  chmodSync(groupWritable, 0o775);
  t.throws(() => new RunDir(groupWritable).writeState(state(1, 1)), /writable by its group \(mode 0775\); refusing to use it: chmod go-w/);
  const worldWritable = join(root, 'ww');
  mkdirSync(worldWritable);
  chmodSync(worldWritable, 0o757);
  t.throws(() => new RunDir(worldWritable).ensure(), /writable by others/);
  t.throws(() => new RunDir(worldWritable).readState(1), /writable by others/, 'reading it is refused too');
  const link = join(root, 'link');
  symlinkSync(join(root, 'fresh'), link);
  t.throws(() => new RunDir(link).ensure(), /is a symbolic link; refusing to use it/);
  const file = join(root, 'plain-file');
  writeFileSync(file, '');
  t.throws(() => new RunDir(file).ensure(), /is not a directory/);
  t.notOk(existsSync(join(groupWritable, 'ublkb1.json')), 'nothing was written');
  t.end();
});

t.test('a directory owned by another user is refused', { skip: isRoot ? false : 'needs root to chown' }, (t) => {
  const theirs = join(root, 'theirs');
  mkdirSync(theirs, { mode: 0o755 });
  chownSync(theirs, 65534, 65534);
  t.throws(() => new RunDir(theirs).writeState(state(1, 1)), /belongs to uid 65534, not to us \(uid 0\)/);
  t.end();
});

t.test('a symlink planted where a state file goes is replaced, never followed', (t) => {
  const dir = new RunDir(join(root, 'planted'));
  dir.ensure();
  const victim = join(root, 'victim');
  writeFileSync(victim, 'precious\n');
  symlinkSync(victim, dir.statePath(4));
  t.equal(dir.readState(4), undefined, 'reading through the link finds nothing (O_NOFOLLOW)');
  dir.writeState(state(4, 99));
  t.equal(readFileSync(victim, 'utf8'), 'precious\n', 'the file the link pointed at is untouched');
  t.notOk(lstatSync(dir.statePath(4)).isSymbolicLink(), 'the state file is a file of its own now');
  t.match(dir.readState(4), { pid: 99 });
  t.end();
});

t.test('a state file is removed only by the server it names', (t) => {
  const dir = new RunDir(join(root, 'owners'));
  dir.writeState(state(7, 111));
  dir.removeState(7, 222);
  t.match(dir.readState(7), { pid: 111 }, 'another pid leaves it');
  dir.removeState(7, 111);
  t.equal(dir.readState(7), undefined, 'its own pid removes it');
  dir.removeState(7, 111);
  t.pass('removing what is gone is fine');
  t.end();
});
