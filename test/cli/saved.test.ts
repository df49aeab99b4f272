/**
 * Saved device declarations (`add --save NAME`, `up`, `down`) on the host: names, the files, and
 * what a missing or foreign file says. Bringing devices up and down is tested in the VM.
 */
import t from 'tap';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { checkName, loadSaved, saveDevice, savedDevices } from '../../src/cli/saved.js';

const dir = mkdtempSync(join(tmpdir(), 'ublk-saved-'));
process.env.UBLK_CONFIG_DIR = join(dir, 'devices');
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

t.test('names are file and link names', (t) => {
  for (const good of ['disk1', 'db-data', 'a.b_c', '0']) t.equal(checkName(good), good);
  for (const bad of ['', '.hidden', 'a/b', '../x', 'has space', 'x'.repeat(65)]) t.throws(() => checkName(bad), /is not a device name/, JSON.stringify(bad));
  t.end();
});

t.test('a declaration round-trips; the list is sorted; a missing or foreign one is a clear error', (t) => {
  t.same(savedDevices(), [], 'none before the directory exists');
  const path = saveDevice({ name: 'web', args: ['-t', 'loop', '-f', '/srv/web.img', '-r', '1'] });
  saveDevice({ name: 'db', args: ['-t', 'mem', '-s', '1G'] });
  t.equal(path, join(dir, 'devices', 'web.json'));
  t.same(JSON.parse(readFileSync(path, 'utf8')), { name: 'web', args: ['-t', 'loop', '-f', '/srv/web.img', '-r', '1'] });
  t.same(savedDevices().map((d) => d.name), ['db', 'web']);
  t.same(loadSaved('db').args, ['-t', 'mem', '-s', '1G']);
  t.throws(() => loadSaved('nosuch'), /no saved device 'nosuch'.*`ublk add \.\.\. --save nosuch` declares one/);
  writeFileSync(join(dir, 'devices', 'odd.json'), JSON.stringify({ name: 'other', args: [] }));
  t.throws(() => loadSaved('odd'), /is not a saved ublk device/);
  t.throws(() => loadSaved('../etc'), /is not a device name/);
  t.end();
});
