/**
 * The queue engine and the server when things go wrong (run inside the VM): memory the kernel
 * may still write is never freed under it, a target's mistakes become clean errors, back-pressure
 * is not a crash, and creating or stopping a device never leaves half a device behind, whatever
 * kills or interrupts what. Each test names the defect it guards against.
 *
 * Most use test/vm/fixtures/misbehaving-target.ts, a RAM disk that misbehaves on request.
 */
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, chmodSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { UblkServer } from '../../src/ublk/server.js';
import { Mapping, libc, sys } from '../../src/libc/index.js';
import type { TargetDefinition } from '../../src/ublk/target.js';
import type { AsyncTarget } from '../../src/ublk/async-main-thread.js';
import misbehaving, { type MisbehavingOptions } from './fixtures/misbehaving-target.js';
import { alive, exists, ublk, ublkIds, waitFor, EXT, ROOT, noDeviceLeftBehind, onKernel, ublkInBackground } from './helpers.js';

const MiB = 2 ** 20;
const TARGET = fileURLToPath(new URL(`./fixtures/misbehaving-target${EXT}`, import.meta.url));
const TARGET_URL = new URL(`./fixtures/misbehaving-target${EXT}`, import.meta.url).href;
const work = mkdtempSync('/tmp/ublk-hardening-');
t.teardown(() => rmSync(work, { recursive: true, force: true }));

t.afterEach(noDeviceLeftBehind);

/** An in-process device served by the misbehaving target (its counters are readable). */
async function startMisbehaving(args: string[], extra: { queues?: number; depth?: number; maxIoBytes?: number; drainTimeoutMs?: number } = {}) {
  const def = misbehaving as unknown as TargetDefinition<MisbehavingOptions>;
  const server = await UblkServer.start({ target: def, targetUrl: TARGET_URL, targetOptions: def.parseArgs(args), ...extra });
  return { server, dev: `/dev/ublkb${server.devId}` };
}

/** Runs a python snippet with the device as argv[1]; returns its parsed JSON output. */
function py(code: string, dev: string, timeoutMs = 60_000): { status: number | null; out: Record<string, unknown>; err: string } {
  const r = spawnSync('python3', ['-c', code, dev], { encoding: 'utf8', timeout: timeoutMs });
  let out: Record<string, unknown> = {};
  try { out = JSON.parse(r.stdout) as Record<string, unknown>; } catch { /* reported by the caller */ }
  return { status: r.status, out, err: `${r.stderr}${r.signal ? ` (killed by ${r.signal})` : ''}` };
}

/** Resolves when `child` has exited (at once if it already has). */
const exited = (child: ReturnType<typeof spawn>) => new Promise<void>((r) => {
  if (child.exitCode !== null || child.signalCode !== null) r();
  else child.once('exit', () => r());
});

/** O_DIRECT I/O of `len` bytes at `off`: 'ok' with the first and last byte, or the errno. */
const DIRECT_IO = `import os,sys,mmap,json
dev,op,off,ln=sys.argv[1],sys.argv[2],int(sys.argv[3]),int(sys.argv[4])
fd=os.open(dev,os.O_RDWR|os.O_DIRECT); b=mmap.mmap(-1,ln)
try:
  n=os.preadv(fd,[b],off) if op=='read' else os.pwritev(fd,[b],off)
  print(json.dumps({'res':'ok','n':n,'first':b[0],'last':b[ln-1]}))
except OSError as e:
  print(json.dumps({'res':e.errno}))`;
function directIo(dev: string, op: 'read' | 'write', off: number, len: number, timeoutMs = 30_000) {
  const r = spawnSync('python3', ['-c', DIRECT_IO, dev, op, String(off), String(len)], { encoding: 'utf8', timeout: timeoutMs });
  try {
    return JSON.parse(r.stdout) as { res: 'ok' | number; n?: number; first?: number; last?: number };
  } catch {
    return { res: `no answer (${r.signal ?? r.status}): ${r.stderr.slice(-200)}` as unknown as number };
  }
}

t.test('a handler that throws with an SQE in flight: its request fails with EIO once that SQE is done, and never touches the tag\'s next request', async (t) => {
  // Depth 1: every request uses tag 0. The read at 1 MiB throws after issuing a 100 ms TIMEOUT
  // whose callback would complete "its" request with 0xEE bytes; the read at 2 MiB, right after,
  // takes 400 ms. An engine that answered the first at once (EIO) and kept the callback would
  // let it complete the second request early, with 0xEE instead of the disk's 0x5A.
  const { server, dev } = await startMisbehaving(['-s', '16M', '--fill', '90', '--throw-at', '1M', '--delay-ms', '400', '--delay-from', '2M', '--delay-to', '3M'], { depth: 1 });
  const r = py(`import os,sys,mmap,json
fd=os.open(sys.argv[1],os.O_RDONLY|os.O_DIRECT); b=mmap.mmap(-1,4096); out={}
try: os.preadv(fd,[b],1<<20); out['first']='ok'
except OSError as e: out['first']=e.errno
os.preadv(fd,[b],2<<20); out['second']=sorted(set(b[:]))
print(json.dumps(out))`, dev);
  t.equal(r.status, 0, r.err);
  t.equal(r.out.first, libc.EIO, 'the request whose handler threw fails with EIO');
  t.same(r.out.second, [0x5a], 'the tag\'s next request reads the disk\'s own data');
  const c = server.counters();
  t.equal(c.threw, 1, 'the handler threw once');
  t.equal(c.stale_callbacks, 0, 'and the callback of its SQE never ran');
  await server.stop();
});

t.test('answers that make no sense (0 bytes, too many, too few, no errno) are a clear EIO for READ and WRITE, logged, and the device lives on', onKernel('newest'), (t) => {
  // On 6.12 a WRITE answered with 0 bytes is resent forever; on 7.3 it counts as written.
  const lies = { zero: MiB, over: 2 * MiB, short: 3 * MiB, errno: 4 * MiB };
  const add = ublk('add', '-t', TARGET, '-s', '16M', '--lies', Object.entries(lies).map(([k, at]) => `${k}@${at}`).join(','));
  t.equal(add.code, 0, add.stderr);
  const id = Number(/^dev id (\d+)/m.exec(add.stdout)?.[1]);
  const dev = `/dev/ublkb${id}`;
  for (const [lie, at] of Object.entries(lies)) {
    t.same(directIo(dev, 'write', at, 4096), { res: libc.EIO }, `${lie}: WRITE is EIO, no hang`);
    t.same(directIo(dev, 'read', at, 4096), { res: libc.EIO }, `${lie}: READ is EIO`);
  }
  t.match(directIo(dev, 'read', 8 * MiB, 4096), { res: 'ok', n: 4096 }, 'elsewhere the device works');
  const log = readFileSync((JSON.parse(ublk('list', '--json').stdout) as Array<{ dev_id: number; log: string }>).find((d) => d.dev_id === id)!.log, 'utf8');
  for (const [what, at] of [['0 bytes', MiB], ['4608 bytes, more than it asked for', 2 * MiB], ['3584 bytes, short of the request', 3 * MiB], ['-100000, which is not a negative errno', 4 * MiB]] as const) {
    t.match(log, new RegExp(`the target answered tag \\d+'s (READ|WRITE) of 4096 bytes at ${at} with ${what.replace(/[()]/g, '\\$&')}.*: failing it with EIO`), `the log says: ${what}`);
  }
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.end();
});

t.test('EAGAIN from io_uring_enter is back-pressure: fio write + crc32c verify with every 5th submit refused', async (t) => {
  const { server, dev } = await startMisbehaving(['-s', '64M', '--eagain-every', '5'], { queues: 2 });
  const r = spawnSync('fio', ['--name=v', `--filename=${dev}`, '--rw=randwrite', '--bs=4k', '--iodepth=32', '--ioengine=io_uring',
    '--direct=1', '--size=32M', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0',
    '--numjobs=2', '--offset_increment=32M', '--group_reporting', '--output-format=json'], { encoding: 'utf8', timeout: 300_000 });
  const job = (JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: Array<{ error: number; read: { io_bytes: number } }> }).jobs[0]!;
  t.ok(r.status === 0 && job.error === 0, `fio verify: exit ${r.status}, error ${job.error}, ${job.read.io_bytes / MiB} MiB verified`);
  t.equal(job.read.io_bytes, 64 * MiB, 'every block verified');
  t.ok(server.counters().eagain! > 50, `${server.counters().eagain} EAGAINs injected, and retried`);
  await server.stop();
  t.ok((await server.closeReports()).every((q) => q?.drained), 'both queues closed clean');
});

/**
 * Maps `len` bytes exactly at `address` if nothing is mapped there (MAP_FIXED_NOREPLACE), and
 * returns the address; undefined if something still is (EEXIST).
 */
function mapExactly(address: number, len: number): number | undefined {
  try {
    return sys.mmap(address, len, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_FIXED_NOREPLACE, -1, 0);
  } catch (e) {
    if ((e as { code?: string }).code === 'EEXIST') return undefined;
    throw e;
  }
}

for (const drainTimeoutMs of [10_000, 500]) {
  t.test(`a queue that dies with an uncancellable read in flight never frees its buffers under it (drain timeout ${drainTimeoutMs} ms)`, async (t) => {
    // Device A answers reads in [1 MiB, 16 MiB) 3 s late, with 0xAB bytes. Device B's read at
    // 1 MiB makes its queue read the same range of A, buffered, in an io-wq worker: that worker
    // sleeps in the page cache until A answers (a cancel cannot interrupt it: it waits only for
    // fatal signals), then copies into B's tag buffer. B's queue dies 100 ms after issuing it.
    // Freeing the buffer then (what closing a ring and unmapping did) lets the copy land in
    // whatever is mapped there 3 s later.
    const a = await startMisbehaving(['-s', '32M', '--fill', '171', '--delay-ms', '3000', '--delay-from', '1M', '--delay-to', '16M']);
    const b = await startMisbehaving(['-s', '32M', '--slow-source', a.dev, '--slow-at', '1M'], { depth: 2, maxIoBytes: 4 * MiB, drainTimeoutMs });
    // 64 KiB: one readahead of A, so the worker waits once (3 s), not once per window.
    const reader = spawn('python3', ['-c', DIRECT_IO, b.dev, 'read', String(MiB), String(64 * 1024)], { stdio: 'ignore' });
    // Starting python under emulation takes a while: time everything from the read's issue.
    await waitFor(() => b.server.counters().slow_issued === 1, 60_000);
    const started = Date.now();
    const buffer = b.server.counters().slow_buffer!;
    t.ok(buffer > 0, `the slow read was issued into the tag buffer at 0x${buffer.toString(16)}`);
    if (buffer <= 0) { reader.kill(); await b.server.stop(); await a.server.stop(); return; }
    // 1 s in, the queue has died and the read is still waiting for A. Map memory exactly where
    // the tag buffer is: that must fail (it is still mapped); if it succeeded, the late read
    // would land in the new mapping at 3 s.
    await new Promise((r) => setTimeout(r, 1000));
    const probe = mapExactly(buffer, 64 * 1024);
    t.equal(probe, undefined, 'at 1 s, with the read still pending, the tag buffer is still mapped (MAP_FIXED_NOREPLACE: EEXIST)');
    let failure = '';
    await b.server.finished.catch((e: Error) => { failure = e.message; });
    const endedAfter = Date.now() - started;
    t.match(failure, /the queue dies with a read in flight/, 'the queue died');
    const reports = await b.server.closeReports();
    if (drainTimeoutMs > 3000) {
      t.match(reports[0], { drained: true, inFlight: 0 }, `it waited for the read (${endedAfter} ms) and its report says everything finished`);
    } else {
      t.match(reports[0], { drained: false, inFlight: 1 }, `it gave up waiting after ${drainTimeoutMs} ms, and says so`);
      t.equal(mapExactly(buffer, 64 * 1024), undefined, 'its buffers are still mapped after its thread ended (kept until the process exits)');
    }
    await new Promise((r) => setTimeout(r, Math.max(0, 4500 - (Date.now() - started)))); // past A's 3 s
    if (probe !== undefined) {
      t.notOk(Buffer.from(Mapping.borrow(probe, 64 * 1024).bytes()).includes(0xab), 'the late read\'s data did not land in memory mapped after the queue died');
      sys.munmap(probe, 64 * 1024);
    }
    t.equal(b.server.counters().slow_issued, 1);
    await b.server.stop();
    await exited(reader);
    await a.server.stop();
  });
}

t.test('an async target\'s late completion, after its queue stopped, writes no completion and signals no fd', async (t) => {
  // The read at 1 MiB is held by the target until the test lets it go, after the device is gone.
  let release!: () => void;
  const held = new Promise<void>((r) => { release = r; });
  let reached!: () => void;
  const holding = new Promise<void>((r) => { reached = r; });
  const store = Buffer.alloc(16 * MiB);
  const target: AsyncTarget = {
    device: { sizeBytes: store.length },
    async read(offset, buf) {
      if (offset === MiB) {
        reached();
        await held;
        buf.fill(0x77); // the queue kept this memory mapped: writing it is harmless
        return;
      }
      store.copy(buf, 0, offset, offset + buf.length);
    },
    async write(offset, buf) { buf.copy(store, offset); },
  };
  const server = await UblkServer.start({ asyncTarget: target, depth: 4, drainTimeoutMs: 1000 });
  const reader = spawn('python3', ['-c', DIRECT_IO, `/dev/ublkb${server.devId}`, 'read', String(MiB), '4096'], { stdio: 'ignore' });
  // python starts slowly under emulation: wait until the target holds the read, not a fixed time.
  const timedOut = await Promise.race([holding.then(() => false), new Promise<boolean>((r) => setTimeout(() => r(true), 60_000))]);
  t.notOk(timedOut, 'the target holds the read');
  await server.stop(); // STOP_DEV waits for the held read; the stop word, then the ring's close, end it
  const [report] = await server.closeReports();
  t.match(report, { drained: false, held: 1 }, 'the queue stopped with the request still held by the target');
  // Take the fd numbers the server just closed (its eventfds among them), as a busy process would.
  const fds = Array.from({ length: 16 }, () => sys.eventfd(0, libc.EFD_CLOEXEC | libc.EFD_NONBLOCK));
  release();
  await new Promise((r) => setTimeout(r, 200));
  const scratch = Mapping.anonymous(8);
  const signalled = fds.filter((fd) => {
    try { sys.read(fd, scratch.address, 8); return true; } catch { return false; }
  });
  t.same(signalled, [], 'none of the reused fd numbers was written to');
  for (const fd of fds) sys.close(fd);
  scratch.unmap();
  await exited(reader);
});

/** Starts `ublk add ARGS` in the background; resolves to its output when it exits. */
function addInBackground(args: string[], env: NodeJS.ProcessEnv = process.env) {
  return ublkInBackground(['add', ...args], env);
}

/** Waits for a ublk device to appear that was not there before; returns its id. */
async function newDevice(before: number[], ms = 60_000): Promise<number | undefined> {
  let id: number | undefined;
  await waitFor(() => {
    id = ublkIds().find((x) => !before.includes(x));
    return id !== undefined;
  }, ms);
  return id;
}

t.test('`ublk add` killed before its server reports ready: the server carries on, and the device ends LIVE with it', onKernel('newest'), async (t) => {
  // Reads take 1.5 s, so START_DEV's partition scan keeps the server busy for seconds.
  const before = ublkIds();
  const add = addInBackground(['-t', TARGET, '-s', '16M', '--delay-ms', '1500']);
  const id = await newDevice(before);
  t.ok(id !== undefined, `ADD_DEV happened (device ${id})`);
  add.child.kill('SIGKILL');
  await add.done;
  const live = await waitFor(() => {
    const d = (JSON.parse(ublk('list', '--json').stdout) as Array<{ dev_id: number; state: string; daemon_pid: number }>).find((x) => x.dev_id === id);
    return d?.state === 'LIVE' && alive(d.daemon_pid);
  }, 90_000);
  t.ok(live, 'the device is LIVE and its server alive');
  const st = JSON.parse(readFileSync(`/run/ublk/ublkb${id}.json`, 'utf8')) as { pid: number };
  t.ok(alive(st.pid), 'its state file names the live server');
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.ok(await waitFor(() => !alive(st.pid), 20_000), 'del ends the server');
});

t.test('SIGINT to `add --foreground` during START_DEV removes the device; when a target that never answers holds the kernel, a second SIGINT fails its I/O, and nothing hangs', onKernel('newest'), async (t) => {
  let before = ublkIds();
  let add = addInBackground(['-t', TARGET, '-s', '16M', '--delay-ms', '1500', '--foreground']);
  let id = await newDevice(before);
  t.ok(id !== undefined, `creating device ${id}`);
  add.child.kill('SIGINT');
  let r = await add.done;
  t.equal(r.code, 1, `the server exits 1: ${r.stderr.trim().split('\n').pop()}`);
  t.match(r.stderr, /SIGINT: stopping the device being created|SIGINT: stopping device/);
  t.notOk(exists(`/dev/ublkc${id}`), 'and the device is gone');

  // Reads that are never answered. On 6.12 START_DEV waits for the partition scan's, holding the
  // device's mutex, and cannot be interrupted: the first SIGINT can only wait, and the second
  // must fail what the target holds. On 7.x the scan runs after START_DEV; a stop it holds up
  // is freed by the server's own 5 s grace (the queues stop, their requests fail), so one
  // SIGINT may do. Either way: no hang, no third signal, nothing left.
  before = ublkIds();
  add = addInBackground(['-t', TARGET, '-s', '16M', '--delay-ms', '0', '--never', '--foreground']);
  id = await newDevice(before);
  t.ok(id !== undefined, `creating device ${id}, whose reads are never answered`);
  await new Promise((res) => setTimeout(res, 3000));
  add.child.kill('SIGINT');
  const first = Date.now();
  await waitFor(() => add.child.exitCode !== null, 10_000);
  if (add.child.exitCode === null) {
    t.comment(`still waiting ${Date.now() - first} ms after the first SIGINT: sending the second`);
    add.child.kill('SIGINT');
  } else {
    t.comment(`the first SIGINT was enough (${Date.now() - first} ms)`);
  }
  r = await add.done;
  t.comment(r.stderr.trim());
  t.ok(Date.now() - first < 60_000, `the server exited ${Date.now() - first} ms after the first SIGINT`);
  if (/SIGINT again/.test(r.stderr)) t.match(r.stderr, /SIGINT again: failing the I\/O the target still holds with EIO/, 'the second SIGINT failed the held I/O');
  t.notMatch(r.stderr, /a third time/, 'no third signal was needed');
  t.notOk(exists(`/dev/ublkc${id}`), 'the device is gone');
  t.same(ublkIds(), before, 'no device left');
});

t.test('add gives up on a server that is not ready within --start-timeout, and nothing is left', onKernel('lts'), async (t) => {
  const before = ublkIds();
  const started = Date.now();
  const r = ublk('add', '-t', TARGET, '-s', '16M', '--delay-ms', '4000', '--start-timeout', '2');
  t.equal(r.code, 1);
  t.match(r.stderr, /^ublk: the server did not report the device ready within 2 s \(--start-timeout\); it was stopped/);
  t.equal(r.stderr.trim().split('\n').length, 1, 'one line');
  // A server stopped before it wrote anything leaves no log; one that did is named, not empty.
  const named = /the server's log: (\S+)$/.exec(r.stderr.trim())?.[1];
  if (named) t.ok(statSync(named).size > 0, `the log it names holds the story: ${named}`);
  else t.pass('the server was stopped before it logged anything, and left no empty log');
  t.comment(`add returned after ${Date.now() - started} ms`);
  t.same(ublkIds(), before, 'no device left');
  t.end();
});

t.test('a state file that cannot be written takes the device down again', onKernel('newest'), (t) => {
  const run = join(work, 'full-run');
  mkdirSync(run, { recursive: true });
  t.equal(spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', run]).status, 0, 'a 64 KiB tmpfs');
  t.teardown(() => { spawnSync('umount', [run]); });
  chmodSync(run, 0o755);
  mkdirSync(join(run, 'log'), { mode: 0o755 });
  spawnSync('dd', ['if=/dev/zero', `of=${join(run, 'filler')}`, 'bs=4k', 'count=64'], { encoding: 'utf8' });
  const before = ublkIds();
  const r = spawnSync(process.execPath, [join(ROOT, 'bin', 'ublk.js'), 'add', '-t', 'null', '-s', '1G'], { encoding: 'utf8', env: { ...process.env, UBLK_RUN_DIR: run }, timeout: 120_000 });
  t.equal(r.status, 1, r.stderr);
  t.match(r.stderr, /was created, but its state file could not be written \(ENOSPC.*\); it was removed again/);
  t.same(ublkIds(), before, 'no device left');
  t.end();
});

t.test('del removes a state file before DEL_DEV frees the id: a new device with that id keeps its own', onKernel('lts'), async (t) => {
  t.equal(ublk('add', '-t', 'null', '-n', '5').code, 0);
  const oldPid = (JSON.parse(readFileSync('/run/ublk/ublkb5.json', 'utf8')) as { pid: number }).pid;
  const del = spawn(process.execPath, [join(ROOT, 'bin', 'ublk.js'), 'del', '-n', '5'], { stdio: 'ignore' });
  const delDone = new Promise<void>((r) => del.on('exit', () => r()));
  // Take id 5 again as soon as the kernel frees it.
  let added = false;
  const until = Date.now() + 60_000;
  while (!added && Date.now() < until) added = ublk('add', '-t', 'null', '-n', '5').code === 0;
  t.ok(added, 'a new device took id 5');
  await delDone;
  await waitFor(() => !alive(oldPid), 20_000);
  const st = JSON.parse(readFileSync('/run/ublk/ublkb5.json', 'utf8')) as { pid: number };
  t.not(st.pid, oldPid, 'the state file is the new server\'s');
  t.ok(alive(st.pid), 'and that server is alive');
  t.equal(ublk('del', '-n', '5').code, 0);
  t.notOk(existsSync('/run/ublk/ublkb5.json'), 'its own del removed it');
});

t.test('errors before anything exists: not root, a run directory others can write; failing adds leave no empty log', onKernel('lts'), (t) => {
  const logs = () => (existsSync('/run/ublk/log') ? readdirSync('/run/ublk/log') : []);
  const logsBefore = logs();
  const nobody = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, join(ROOT, 'bin', 'ublk.js'), 'add', '-t', 'null'], { encoding: 'utf8' });
  t.equal(nobody.status, 1);
  t.equal(nobody.stderr, 'ublk: cannot open /dev/ublk-control (EACCES): run as root (or, for unprivileged devices, let users open it: `ublk setup-unprivileged` as root)\n', 'one line, no stack trace');
  const evil = join(work, 'evil-run');
  mkdirSync(evil);
  chmodSync(evil, 0o1777);
  const r = spawnSync(process.execPath, [join(ROOT, 'bin', 'ublk.js'), 'add', '-t', 'null'], { encoding: 'utf8', env: { ...process.env, UBLK_RUN_DIR: evil } });
  t.equal(r.status, 1);
  t.match(r.stderr, /the run directory .*evil-run is writable by its group \(mode 1777\); refusing to use it: chmod go-w/);
  t.same(readdirSync(evil), [], 'nothing was created in it');
  // A failure in the parent (before any server) makes no log; one in the server keeps its log, named.
  const taken = ublk('add', '-t', 'null', '-n', '6');
  t.equal(taken.code, 0);
  t.equal(ublk('add', '-t', 'null', '-n', '6').code, 1, 'a taken id fails in add itself');
  const inServer = ublk('add', '-t', TARGET, '-s', '16M', '--fail-open');
  t.equal(inServer.code, 1, 'a server whose queues cannot open');
  t.match(inServer.stderr, /queue 0 could not start: .*test: this queue cannot open/);
  const named = /the server's log: (\S+)/.exec(inServer.stderr)?.[1];
  t.ok(named && statSync(named).size > 0, `its error names its log, which says why: ${inServer.stderr.trim()}`);
  // The live device's server has logged nothing yet; every other new log holds a reason.
  const liveLog = (JSON.parse(readFileSync('/run/ublk/ublkb6.json', 'utf8')) as { log: string }).log;
  const added = logs().filter((f) => !logsBefore.includes(f) && join('/run/ublk/log', f) !== liveLog);
  t.ok(added.length > 0 && added.every((f) => statSync(join('/run/ublk/log', f)).size > 0), `no empty log left behind (${added.length} from failed adds, each with its reason)`);
  t.same(ublkIds(), [6]);
  t.equal(ublk('del', '-n', '6').code, 0);
  t.end();
});
