/**
 * The live trace on a real kernel: `ublk add --trace` (every SQE and CQE of the control ring and
 * the queue ring in the server's stderr, decoded), and `ublk trace -n ID` following a running
 * server (a FIFO the server finds by inotify; the trace ends when the reader does, and the
 * device serves on).
 */
import t from 'tap';
import { existsSync } from 'node:fs';
import {
  addDevice, deleteDevice, deviceLog, killServer, sh, state, ublk, ublkIds, ublkInBackground, waitFor, noDeviceLeftBehind, onKernel,
} from './helpers.js';

t.afterEach(noDeviceLeftBehind);

/** Lines without their time stamp (`HH:MM:SS.uuuuuu `), which every line must start with. */
const TIME = /^\d\d:\d\d:\d\d\.\d{6} /;

const run = (args: string[]) => ublkInBackground(args);

/** One 4 KiB O_DIRECT read at byte 8192 (sector 16) of the device. */
const readOne = (id: number) => sh('dd', [`if=/dev/ublkb${id}`, 'of=/dev/null', 'bs=4096', 'skip=2', 'count=1', 'iflag=direct', 'status=none']);

t.test('add --trace: the control plane and one READ, every SQE and CQE decoded, in order', onKernel('lts'), async (t) => {
  const before = ublkIds();
  const add = run(['add', '-t', 'null', '-q', '1', '-d', '4', '--foreground', '--trace']);
  let id: number | undefined;
  t.ok(await waitFor(() => (id = ublkIds().find((x) => !before.includes(x))) !== undefined && existsSync(`/dev/ublkb${id}`), 60_000), 'the device is up');
  readOne(id!);
  add.child.kill('SIGTERM');
  const r = await add.done;
  t.equal(r.code, 0, 'the foreground server stopped cleanly');
  const lines = r.stderr.split('\n').filter((l) => TIME.test(l)).map((l) => l.replace(TIME, ''));
  t.ok(lines.length > 20, `${lines.length} trace lines`);
  const first = (re: RegExp, from = 0) => {
    for (let i = from; i < lines.length; i++) if (re.test(lines[i]!)) return i;
    return -1;
  };
  // The control plane, in the order server.ts issues it, and our READ among them (START_DEV's
  // partition scan reads too: each step is looked for after the one before).
  const order = [
    /^ctrl SQE URING_CMD fd=\d+ UBLK_U_CMD_ADD_DEV dev_id=-1 len=64 addr=0x[0-9a-f]+ user_data=/,
    /^ctrl SQE URING_CMD fd=\d+ UBLK_U_CMD_SET_PARAMS dev_id=\d+ len=\d+ addr=/,
    /^q0 SQE URING_CMD flags=FIXED_FILE fd=0 UBLK_U_IO_FETCH_REQ q_id=0 tag=0 addr=0x[0-9a-f]+ user_data=cmd tag 0$/,
    /^ctrl SQE URING_CMD fd=\d+ UBLK_U_CMD_START_DEV dev_id=\d+ data=\d+ user_data=/,
    /^q0 CQE user_data=cmd tag \d res=0 request: READ sector=16 sectors=8 \(4096 bytes\)$/,
    /^q0 SQE URING_CMD flags=FIXED_FILE fd=0 UBLK_U_IO_COMMIT_AND_FETCH_REQ q_id=0 tag=\d result=4096 addr=/,
    /^ctrl SQE URING_CMD fd=\d+ UBLK_U_CMD_STOP_DEV dev_id=\d+ user_data=/,
    /^q0 CQE user_data=cmd tag \d res=-ENODEV ABORT: the device is stopping/,
    /^ctrl SQE URING_CMD fd=\d+ UBLK_U_CMD_DEL_DEV/,
  ];
  let at = -1;
  for (const re of order) {
    const i = first(re, at + 1);
    t.ok(i > at, `${re.source.slice(1, 60)}... after the step before (line ${i})`);
    if (i > at) at = i;
  }
  for (let tag = 0; tag < 4; tag++) t.ok(first(new RegExp(`UBLK_U_IO_FETCH_REQ q_id=0 tag=${tag} `)) >= 0, `tag ${tag} fetched`);
  t.ok(lines.filter((l) => l.startsWith('ctrl CQE')).every((l) => / res=(0|\d+)$/.test(l) || /res=-/.test(l)), 'every control CQE has its result');
  t.ok(first(/^ctrl CQE user_data=\S+ res=0$/) >= 0, 'ADD_DEV and its peers answered 0');
});

t.test('ublk trace -n ID follows a running server; the device serves on when the reader leaves', onKernel('newest'), async (t) => {
  const id = addDevice('-t', 'null', '-q', '2', '-d', '8');
  t.teardown(() => { ublk('del', '-n', String(id)); });
  const reader = run(['trace', '-n', String(id), '--seconds', '20']);
  let out = '';
  reader.child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
  t.ok(await waitFor(() => out.includes(`ctrl # device ${id}, server process`), 15_000), 'the server says it follows');
  t.match(out, /the control ring and 2 queue ring\(s\) follow/);
  readOne(id);
  t.ok(await waitFor(() => / CQE user_data=cmd tag \d+ res=0 request: READ sector=16 sectors=8 \(4096 bytes\)/.test(out), 15_000), 'the READ arrives on a queue ring');
  t.match(out, /q[01] SQE URING_CMD flags=FIXED_FILE fd=0 UBLK_U_IO_COMMIT_AND_FETCH_REQ q_id=[01] tag=\d+ result=4096/, 'and its answer');
  reader.child.kill('SIGINT');
  const r = await reader.done;
  t.equal(r.code, 0, 'the reader ends on SIGINT');
  t.notOk(existsSync(`/run/ublk/ublkb${id}.trace`), 'and removes its FIFO');
  // The server's next writes fail with EPIPE: it stops tracing and serves on.
  for (let i = 0; i < 3; i++) readOne(id);
  const again = await run(['trace', '-n', String(id), '--count', '1']).done;
  t.equal(again.code, 0, 'a second reader follows too');
  t.match(again.stdout, new RegExp(`ctrl # device ${id}, server process`));
  const log = ublk('list', '-n', String(id), '-v').stdout;
  t.match(log, /LIVE/, 'the device is still live');
  await deleteDevice(t, id);
  const none = ublk('trace', '-n', String(id));
  t.equal(none.code, 1, 'no such device: exit 1');
  t.match(none.stderr, new RegExp(`device ${id} has no running server started by \`ublk add\``));
});

t.test('recover --trace: the recovering server traces START_USER_RECOVERY, its fetches, END_USER_RECOVERY and the I/O after', onKernel('lts'), async (t) => {
  const id = addDevice('-t', 'null', '-q', '1', '-d', '4', '-r', '1');
  t.teardown(() => { ublk('del', '-n', String(id)); });
  await killServer(t, id);
  const rec = run(['recover', '-n', String(id), '--foreground', '--trace']);
  t.ok(await waitFor(() => state(id) === 'LIVE', 60_000), 'the device is LIVE again');
  readOne(id);
  rec.child.kill('SIGTERM');
  const r = await rec.done;
  t.equal(r.code, 0, 'the recovering server stopped cleanly');
  const lines = r.stderr.split('\n').filter((l) => TIME.test(l)).map((l) => l.replace(TIME, ''));
  const order = [
    new RegExp(`^ctrl SQE URING_CMD fd=\\d+ UBLK_U_CMD_START_USER_RECOVERY dev_id=${id} `),
    /^q0 SQE URING_CMD flags=FIXED_FILE fd=0 UBLK_U_IO_FETCH_REQ q_id=0 tag=3 /,
    new RegExp(`^ctrl SQE URING_CMD fd=\\d+ UBLK_U_CMD_END_USER_RECOVERY dev_id=${id} `),
    /^q0 CQE user_data=cmd tag \d res=0 request: READ sector=16 sectors=8 \(4096 bytes\)$/,
  ];
  let at = -1;
  for (const re of order) {
    const i = lines.findIndex((l, k) => k > at && re.test(l));
    t.ok(i > at, `${re.source.slice(1, 70)}... after the step before (line ${i})`);
    if (i > at) at = i;
  }
  t.notOk(lines.some((l) => /UBLK_U_CMD_ADD_DEV/.test(l)), 'and no ADD_DEV: the device was recovered, not made again');
});

t.test('upgrade --trace: the new server traces its recovery and its I/O into the device\'s log', onKernel('newest'), async (t) => {
  const id = addDevice('-t', 'null', '-q', '1', '-d', '4', '-r', '1', '-i', '1');
  t.teardown(() => { ublk('del', '-n', String(id)); });
  t.notMatch(deviceLog(id), /UBLK_U_CMD_/, 'the first server, added without --trace, traced nothing');
  const r = ublk('upgrade', '-n', String(id), '--trace');
  t.equal(r.code, 0, r.stderr);
  readOne(id);
  const read = /q0 CQE user_data=cmd tag \d res=0 request: READ sector=16 sectors=8 \(4096 bytes\)/;
  t.ok(await waitFor(() => read.test(deviceLog(id)), 15_000), 'the READ after the upgrade is in the log');
  const log = deviceLog(id);
  t.match(log, new RegExp(`ctrl SQE URING_CMD fd=\\d+ UBLK_U_CMD_START_USER_RECOVERY dev_id=${id} `));
  t.match(log, new RegExp(`ctrl SQE URING_CMD fd=\\d+ UBLK_U_CMD_END_USER_RECOVERY dev_id=${id} `));
});
