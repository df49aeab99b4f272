/**
 * The ublk server on a real kernel (run inside the VM): the CLI's add/list/del, fio through
 * the null target, features, errors, and devices going away under load.
 */
import t from 'tap';
import { readFileSync } from 'node:fs';
import { UblkControl } from '../../src/ublk/control.js';
import { UBLK_FEATURES } from '../../src/ublk/abi.js';
import { addDevice, alive, exists, fio, fioBackground, ublk, ublkIds, waitFor, ROOT, noDeviceLeftBehind, onKernel } from './helpers.js';

const runState = (id: number) => JSON.parse(readFileSync(`/run/ublk/ublkb${id}.json`, 'utf8')) as { pid: number };

t.afterEach(noDeviceLeftBehind);

t.test('features lists every bit GET_FEATURES reports, by name', (t) => {
  const ctrl = new UblkControl();
  const f = ctrl.features();
  ctrl.close();
  const r = ublk('features', '--json');
  t.equal(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout) as { features: number; names: string[] };
  t.equal(j.features, f, `0x${f.toString(16)} as GET_FEATURES says`);
  const want = UBLK_FEATURES.filter((x) => Math.floor(f / 2 ** x.bit) % 2 === 1).map((x) => x.name);
  t.same(j.names, want, 'one UBLK_F_* name per bit');
  t.ok(j.names.every((n) => /^UBLK_F_[A-Z_]+$/.test(n)), `every bit has its C name: ${j.names.join(' ')}`);
  const text = ublk('features');
  t.match(text.stdout, new RegExp(`^ublk_drv features: 0x${f.toString(16)}\\n`), 'kublk-style header');
  const lines = text.stdout.trim().split('\n').slice(1);
  t.same(lines, want.map((name) => {
    const bit = UBLK_FEATURES.find((x) => x.name === name)!.bit;
    return `0x${(2 ** bit).toString(16).padEnd(16)}: ${name}`;
  }), 'then kublk\'s line per bit: 0x<value padded to 16>: UBLK_F_NAME');
  t.end();
});

t.test('add, list and del with 1 and 4 queues, several devices at once', async (t) => {
  const a = addDevice('-t', 'null', '-s', '1G');
  const b = addDevice('-t', 'null', '-q', '4', '-d', '64', '-s', '2G');
  const c = addDevice('-t', 'null', '-n', '7', '-q', '2', '--max-io-bytes', '1M', '--block-size', '4096');
  t.equal(c, 7, 'the id asked for');
  t.same(ublkIds(), [a, b, c].sort((x, y) => x - y));
  for (const id of [a, b, c]) t.ok(exists(`/dev/ublkb${id}`), `/dev/ublkb${id} is live`);

  const list = JSON.parse(ublk('list', '--json').stdout) as Array<Record<string, unknown>>;
  const byId = new Map(list.map((d) => [d.dev_id as number, d]));
  t.match(byId.get(a), { nr_hw_queues: 1, queue_depth: 128, block_size: 512, dev_capacity: 2097152, state: 'LIVE', max_rq_size: 524288 });
  t.match(byId.get(b), { nr_hw_queues: 4, queue_depth: 64, dev_capacity: 4194304, state: 'LIVE' });
  t.match(byId.get(c), { nr_hw_queues: 2, block_size: 4096, max_rq_size: 1048576, state: 'LIVE' });
  t.equal(readFileSync(`/sys/block/ublkb${c}/queue/logical_block_size`, 'utf8').trim(), '4096', 'the kernel took the block size');
  t.equal(readFileSync(`/sys/block/ublkb${b}/size`, 'utf8').trim(), '4194304', 'and the capacity (512-byte sectors)');

  const text = ublk('list', '-n', String(b), '-v').stdout;
  t.match(text, new RegExp(`^dev id ${b}: nr_hw_queues 4 queue_depth 64 block size 512 dev_capacity 4194304\\n\\tmax rq size 524288 daemon pid \\d+ flags 0x[0-9a-f]+ state LIVE\\n`), 'kublk format');
  t.match(text, /\tqueue 3: affinity\(/, '-v shows each queue');
  t.match(text, /\ttarget null \{"size":2147483648,"block_size":512\}\n/, 'and the target, as it describes itself');
  t.match(text, /\tlog \/run\/ublk\/log\/server-\d+-\d+\.log\n/, 'and the server\'s log');

  const pids = [a, b, c].map((id) => runState(id).pid);
  for (const id of [a, b, c]) t.equal(ublk('del', '-n', String(id)).code, 0, `del ${id}`);
  t.same(ublkIds(), [], 'all gone');
  t.ok(await waitFor(() => pids.every((p) => !alive(p)), 10_000), 'the servers exited');
  t.notOk(exists(`/run/ublk/ublkb${a}.json`), 'run state removed');
});

for (const queues of [1, 4]) {
  t.test(`fio 4k on null with ${queues} queue(s): randread/randwrite x QD 1/128 x io_uring/libaio`, onKernel(queues === 1 ? 'lts' : 'newest'), (t) => {
    const id = addDevice('-t', 'null', '-q', String(queues), '-s', '4G');
    const dev = `/dev/ublkb${id}`;
    for (const rw of ['randread', 'randwrite']) {
      for (const qd of [1, 128]) {
        for (const engine of ['io_uring', 'libaio']) {
          const r = fio(dev, rw, { qd, engine, seconds: 2 });
          t.ok(r.code === 0 && r.error === 0 && r.ios > 0, `${rw} QD${qd} ${engine}: ${r.ios} I/Os, ${Math.round(r.iops)} IOPS, error ${r.error}`);
        }
      }
    }
    t.equal(ublk('del', '-n', String(id)).code, 0);
    t.end();
  });
}

t.test('a write is served and a flush completes (dd with oflag=direct,dsync)', (t) => {
  const id = addDevice('-t', 'null', '-s', '64M');
  const r = ublk('list', '-n', String(id));
  t.equal(r.code, 0);
  const dd = spawnDd(`/dev/ublkb${id}`);
  t.equal(dd.status, 0, `dd: ${dd.stderr.trim().split('\n').pop()}`);
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.end();
});

import { spawnSync } from 'node:child_process';
function spawnDd(dev: string) {
  return spawnSync('dd', ['if=/dev/zero', `of=${dev}`, 'bs=64k', 'count=100', 'oflag=direct,dsync'], { encoding: 'utf8' });
}

t.test('usage errors exit 2 with one line, and leave no device behind', onKernel('lts'), (t) => {
  const cases: Array<[string[], RegExp]> = [
    [['add'], /needs -t TYPE/],
    [['add', '-t', 'nosuch'], /unknown target 'nosuch'/],
    [['add', '-t', 'null', '-q', '5000'], /-q must be from 1 to 4096/],
    [['add', '-t', 'null', '-d', '0'], /-d must be from 1 to 4096/],
    [['add', '-t', 'null', '-d', '4097'], /-d must be from 1 to 4096/],
    [['add', '-t', 'null', '--max-io-bytes', '3000'], /power of two/],
    // kublk's -b is batch I/O, a flag: a size after it is the target's argument (--max-io-bytes is ours).
    [['add', '-t', 'null', '-b', '1M'], /null: unexpected argument '1M'/],
    [['add', '-t', 'null', '-b', '-g'], /-g \(get_data\) and -b \(batch I\/O\) exclude each other/],
    [['add', '-t', 'null', '-s', 'lots'], /takes a size/],
    [['del'], /needs -n ID or -a/],
    [['frobnicate'], /unknown command/],
  ];
  for (const [args, msg] of cases) {
    const r = ublk(...args);
    t.equal(r.code, 2, `ublk ${args.join(' ')} exits 2`);
    t.match(r.stderr, msg);
    t.equal(r.stderr.trim().split('\n').length, 1, 'one line');
  }
  t.same(ublkIds(), [], 'no device was created');
  t.end();
});

t.test('a taken device id is refused and the existing device is untouched', onKernel('newest'), (t) => {
  const id = addDevice('-t', 'null', '-n', '3');
  const r = ublk('add', '-t', 'null', '-n', '3');
  t.equal(r.code, 1);
  t.match(r.stderr, /device id 3 is taken/);
  t.same(ublkIds(), [id], 'still exactly one device');
  t.equal(fio(`/dev/ublkb${id}`, 'randread', { qd: 4, seconds: 1 }).error, 0, 'and it still works');
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.end();
});

t.test('SIGTERM to the server stops and deletes its device', onKernel('lts'), async (t) => {
  const id = addDevice('-t', 'null');
  const pid = runState(id).pid;
  process.kill(pid, 'SIGTERM');
  t.ok(await waitFor(() => !alive(pid), 20_000), 'the server exited');
  t.notOk(exists(`/dev/ublkc${id}`), 'and deleted the device');
});

t.test('del while fio runs: fio ends with errors, the device goes away, nothing hangs', async (t) => {
  const id = addDevice('-t', 'null', '-q', '2');
  const pid = runState(id).pid;
  const job = fioBackground(`/dev/ublkb${id}`, 'randrw', { qd: 64, seconds: 60, extra: ['--numjobs=2', '--group_reporting'] });
  await new Promise((r) => setTimeout(r, 2000));
  const started = Date.now();
  const d = ublk('del', '-n', String(id));
  t.equal(d.code, 0, `del under load: ${d.stderr}`);
  const r = await Promise.race([job.done, new Promise<undefined>((res) => setTimeout(() => res(undefined), 60_000))]);
  t.ok(r, `fio ended ${((Date.now() - started) / 1000).toFixed(1)} s after del`);
  t.ok(r && (r.code !== 0 || r.error !== 0), `with an error (exit ${r?.code}, error ${r?.error})`);
  t.notOk(exists(`/dev/ublkb${id}`), 'the disk is gone');
  t.notOk(exists(`/dev/ublkc${id}`), 'the device is gone');
  t.ok(await waitFor(() => !alive(pid), 10_000), 'the server exited');
});

t.test('kill -9 of the server while fio runs: fio fails, del cleans up, nothing hangs', async (t) => {
  const id = addDevice('-t', 'null', '-q', '2');
  const pid = runState(id).pid;
  const job = fioBackground(`/dev/ublkb${id}`, 'randrw', { qd: 64, seconds: 60 });
  await new Promise((r) => setTimeout(r, 2000));
  process.kill(pid, 'SIGKILL');
  const r = await Promise.race([job.done, new Promise<undefined>((res) => setTimeout(() => res(undefined), 60_000))]);
  t.ok(r, 'fio ended');
  t.ok(r && (r.code !== 0 || r.error !== 0), `with an error (exit ${r?.code}, error ${r?.error})`);
  const d = ublk('del', '-n', String(id));
  t.equal(d.code, 0, `del after the server died: ${d.stderr}`);
  t.notOk(exists(`/dev/ublkb${id}`), 'the disk is gone');
  t.notOk(exists(`/dev/ublkc${id}`), 'the device is gone');
});

t.test('not root: a one-line error that says so', onKernel('newest'), (t) => {
  const r = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, `${ROOT}/bin/ublk.js`, 'list'], { encoding: 'utf8' });
  t.equal(r.status, 1);
  t.match(r.stderr, /cannot open \/dev\/ublk-control \(EACCES\): run as root/);
  t.end();
});

t.test('no ublk_drv: the error names modprobe ublk_drv, and add creates nothing', onKernel('lts'), (t) => {
  const rm = spawnSync('rmmod', ['ublk_drv'], { encoding: 'utf8' });
  t.equal(rm.status, 0, `rmmod ublk_drv ${rm.stderr}`);
  t.teardown(() => {
    spawnSync('modprobe', ['-d', process.env.UBLK_VM_KROOT!, 'ublk_drv']);
  });
  for (const args of [['list'], ['features'], ['add', '-t', 'null']]) {
    const r = ublk(...args);
    t.equal(r.code, 1, `ublk ${args.join(' ')} exits 1`);
    t.match(r.stderr, /\/dev\/ublk-control does not exist: load the driver with `modprobe ublk_drv`/);
  }
  t.end();
});
