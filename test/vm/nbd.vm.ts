/**
 * The nbd target (`ublk add -t nbd`) against real NBD servers, run in the guest: nbdkit's memory
 * and file plugins, Debian's nbd-server and qemu-storage-daemon, over TCP on loopback and over
 * Unix sockets. What each test proves:
 *   - no byte lost: fio randwrite + crc32c verify, then a second verify-only pass, with 1 queue
 *     and with 2 (one connection per queue, counted in /proc/net/tcp);
 *   - a file system survives: mkfs.ext4 through the device, files, e2fsck -fn of the file the
 *     server exports, the same checksums after del and a new device;
 *   - FLUSH, FUA, TRIM and WRITE_ZEROES reach the server (nbdkit's log filter sees each one);
 *   - a server killed under load and restarted: fio finishes and verifies clean, the requests
 *     were held meanwhile, the log says "connection lost" and "reconnected";
 *   - a server that never returns: EIO within --reconnect-timeout, "unreachable" in the log, del
 *     at once; a server that returns after that: the device works again;
 *   - qemu-storage-daemon's qcow2 export: fio verify, then `qemu-img check` clean and the image
 *     holding what the device read back;
 *   - refusals at add (nothing listening, an unknown export, -q 2 without multi-conn, a server
 *     that is not NBD): non-zero exit, a message that names the problem, no device left.
 *
 * Every server is a child of this process (nbd-server daemonizes: it is stopped by its pid
 * file). Before a device is added, each server is checked with a handshake of our own
 * (nbdProbe: fixed newstyle, NBD_OPT_GO, NBD_CMD_DISC), so a failure of the server's set-up is
 * told apart from one of the target; the flags it reads are also how the tests know which
 * server offers multi-conn.
 */
import t from 'tap';
import type { Test } from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { release } from 'node:os';
import {
  ROOT, addDevice, freePort, alive, deleteDevice, deviceLog, fioVerify, listed, noDeviceLeftBehind, sh, sleep, sparseFile, ublk, ublkIds, waitFor,
  onKernel, fullSuiteOnly,
} from './helpers.js';
import { UblkControl } from '../../src/ublk/control.js';
import { DATA_PATH_MODES, modeAvailable } from '../../src/ublk/modes.js';

const MiB = 2 ** 20;
/** fio's volume per verify pass (UBLK_NBD_VERIFY_MIB overrides): small, the VM is emulated. */
const VERIFY = Number(process.env.UBLK_NBD_VERIFY_MIB ?? 16) * MiB;
const work = mkdtempSync('/tmp/ublk-nbd-');
t.afterEach(noDeviceLeftBehind);

// ---------------------------------------------------------------------------------------------
// The NBD side: a probe of our own, and the servers as child processes
// ---------------------------------------------------------------------------------------------

type Addr = { host: string; port: number } | { socket: string };
const NBD_FLAG_SEND_FLUSH = 1 << 2;
const NBD_FLAG_SEND_FUA = 1 << 3;
const NBD_FLAG_SEND_TRIM = 1 << 5;
const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;

/**
 * What an NBD server says of export `name`: its size and transmission flags, after a fixed
 * newstyle handshake and NBD_OPT_GO (then NBD_CMD_DISC). Rejects with the server's error reply
 * (e.g. "NBD_REP_ERR_UNKNOWN: ...") or the socket's error.
 */
function nbdProbe(addr: Addr, name = '', timeoutMs = 5000): Promise<{ size: number; flags: number }> {
  return new Promise((resolve, reject) => {
    const sock = 'socket' in addr ? connect(addr.socket) : connect(addr.port, addr.host);
    let buf = Buffer.alloc(0);
    let greeted = false;
    let info: { size: number; flags: number } | undefined;
    const done = (e?: Error) => {
      clearTimeout(timer);
      if (e) {
        sock.destroy();
        reject(e);
      } else {
        // NBD_CMD_DISC: request magic, flags 0, type 2, handle, offset 0, length 0.
        const disc = Buffer.alloc(28);
        disc.writeUInt32BE(0x25609513, 0);
        disc.writeUInt16BE(2, 6);
        sock.end(disc);
        resolve(info!);
      }
    };
    const timer = setTimeout(() => done(new Error(`no answer in ${timeoutMs} ms`)), timeoutMs);
    sock.on('error', (e) => done(e));
    sock.on('close', () => done(new Error('the server closed the connection')));
    sock.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      if (!greeted) {
        if (buf.length < 18) return;
        if (buf.toString('latin1', 0, 8) !== 'NBDMAGIC' || buf.toString('latin1', 8, 16) !== 'IHAVEOPT') return done(new Error('not an NBD newstyle server'));
        greeted = true;
        buf = buf.subarray(18);
        const nm = Buffer.from(name);
        const opt = Buffer.alloc(4 + 16 + 4 + nm.length + 2);
        opt.writeUInt32BE(3, 0); // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
        opt.write('IHAVEOPT', 4, 'latin1');
        opt.writeUInt32BE(7, 12); // NBD_OPT_GO
        opt.writeUInt32BE(4 + nm.length + 2, 16);
        opt.writeUInt32BE(nm.length, 20);
        nm.copy(opt, 24);
        sock.write(opt); // no information requests: NBD_INFO_EXPORT comes anyway
      }
      while (buf.length >= 20) {
        const type = buf.readUInt32BE(12);
        const len = buf.readUInt32BE(16);
        if (buf.length < 20 + len) return;
        const data = buf.subarray(20, 20 + len);
        buf = buf.subarray(20 + len);
        if (type === 1) return done(); // NBD_REP_ACK
        if (type & 0x80000000) {
          const names: Record<number, string> = { 1: 'UNSUP', 2: 'POLICY', 3: 'INVALID', 5: 'TLS_REQD', 6: 'UNKNOWN', 8: 'BLOCK_SIZE_REQD' };
          return done(new Error(`NBD_REP_ERR_${names[type & 0xff] ?? type & 0xff}: ${data.toString()}`));
        }
        if (type === 3 && data.readUInt16BE(0) === 0) info = { size: Number(data.readBigUInt64BE(2)), flags: data.readUInt16BE(10) };
      }
    });
  });
}

/** Probes until the server answers (it may still be starting); the last error if it never does. */
async function ready(addr: Addr, name = '', ms = 20_000): Promise<{ size: number; flags: number }> {
  const until = Date.now() + ms;
  for (;;) {
    try {
      return await nbdProbe(addr, name);
    } catch (e) {
      if (Date.now() > until) throw e;
      await sleep(200);
    }
  }
}

interface Server { child: ChildProcess; log: string; stop(signal?: NodeJS.Signals): Promise<void> }
const running = new Set<ChildProcess>();
t.teardown(() => {
  for (const c of running) c.kill('SIGKILL');
  sh('umount', ['-l', join(work, 'mnt-ext4')]); // left mounted only by a failed ext4 test
  rmSync(work, { recursive: true, force: true });
});

/** `cmd args...` as a child of this process, its output in work/NAME.log. */
function start(name: string, cmd: string, args: string[]): Server {
  const log = join(work, `${name}.log`);
  const fd = openSync(log, 'a');
  const child = spawn(cmd, args, { stdio: ['ignore', fd, fd] });
  closeSync(fd);
  running.add(child);
  const exited = new Promise<void>((res) => child.once('exit', () => { running.delete(child); res(); }));
  return {
    child, log,
    stop: async (signal = 'SIGTERM') => {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      await exited;
    },
  };
}

/** nbdkit in the foreground (so that kill -9 hits the server itself), PLUGIN ARGS... on `addr`. */
function nbdkit(name: string, addr: Addr, plugin: string[]): Server {
  const listen = 'socket' in addr ? ['-U', addr.socket] : ['-i', addr.host, '-p', String(addr.port)];
  if ('socket' in addr) rmSync(addr.socket, { force: true }); // a socket file left by a killed nbdkit
  return start(name, 'nbdkit', ['-f', '--exit-with-parent', ...listen, ...plugin]);
}

/** Established TCP connections from this machine to 127.0.0.1:`port` (the client ends, /proc/net/tcp). */
function connectionsTo(port: number): number {
  const hex = port.toString(16).toUpperCase().padStart(4, '0');
  return readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1)
    .filter((l) => { const f = l.trim().split(/\s+/); return f[2] === `0100007F:${hex}` && f[3] === '01'; }).length;
}

const sizeOf = (id: number) => Number(readFileSync(`/sys/block/ublkb${id}/size`, 'utf8')) * 512;
const inflight = (id: number) => readFileSync(`/sys/block/ublkb${id}/inflight`, 'utf8').trim().split(/\s+/).map(Number).reduce((a, b) => a + b, 0);
const tcp = (port: number): Addr => ({ host: '127.0.0.1', port });
const nbdArgs = (addr: Addr) => ['-t', 'nbd', ...('socket' in addr ? ['--socket', addr.socket] : ['--host', addr.host, '--port', String(addr.port)])];
const verifyOk = (r: ReturnType<typeof fioVerify>, total: number, write = true) =>
  r.code === 0 && r.error === 0 && (!write || r.written === total) && r.verified === total;
const verifyMsg = (r: ReturnType<typeof fioVerify>) =>
  `wrote ${r.written / MiB} MiB, verified ${r.verified / MiB} MiB, exit ${r.code}, error ${r.error}${r.code || r.error ? ` ${r.stderr.slice(-400)}` : ''}`;

/** One 4 KiB O_DIRECT read of block `block`, with its status, stderr and how long it took. */
function readBlock(dev: string, block: number, timeoutS = 60) {
  const t0 = Date.now();
  const r = sh('timeout', [String(timeoutS), 'dd', `if=${dev}`, 'of=/dev/null', 'bs=4096', `skip=${block}`, 'count=1', 'iflag=direct', 'status=none']);
  return { ...r, ms: Date.now() - t0 };
}

// ---------------------------------------------------------------------------------------------
// Data: fio verify, ext4, the commands that reach the server
// ---------------------------------------------------------------------------------------------

for (const queues of [1, 2]) {
  t.test(`nbdkit memory over TCP, ${queues} queue(s): one connection per queue, fio randwrite + crc32c verify, then a verify-only pass`, queues === 1 ? fullSuiteOnly() : onKernel('newest'), async (t) => {
    const port = await freePort();
    const server = nbdkit(`memory-q${queues}`, tcp(port), ['memory', 'size=32M']);
    try {
      const info = await ready(tcp(port));
      t.equal(info.size, 32 * MiB, 'nbdkit answers: a 32 MiB export');
      t.ok(info.flags & NBD_FLAG_CAN_MULTI_CONN, 'nbdkit memory advertises multi-conn');
      const id = addDevice(...nbdArgs(tcp(port)), '-q', String(queues));
      const dev = `/dev/ublkb${id}`;
      t.equal(sizeOf(id), 32 * MiB, 'the device is the export\'s size');
      t.equal(connectionsTo(port), queues, `${queues} TCP connection(s) to the server, one per queue`);
      // 4 KiB requests through one connection; 64 KiB ones (several segments each) through two.
      const bs = queues === 1 ? '4k' : '64k';
      let r = fioVerify(dev, { bs, engine: 'io_uring', jobs: queues, total: VERIFY, qd: 32 });
      t.ok(verifyOk(r, VERIFY), `${bs} QD 32: ${verifyMsg(r)}`);
      r = fioVerify(dev, { bs, engine: 'libaio', jobs: queues, total: VERIFY, qd: 16, verifyOnly: true }); // the same blocks, read back
      t.ok(verifyOk(r, VERIFY, false), `verify-only pass over what the server holds: ${verifyMsg(r)}`);
      await deleteDevice(t, id);
      t.ok(await waitFor(() => connectionsTo(port) === 0, 10_000), 'del closed the connections');
    } finally {
      await server.stop();
    }
  });
}

// The nbd target in every data path the kernel has: in copy and get_data mode a reply's READ
// data is copied from the receive buffer into the tag buffer (get_data: a WRITE's data comes
// only after NEED_GET_DATA), in the others (user copy, and the zero-copy modes, which ask for
// user copy too) it goes by pwrite of /dev/ublkcN into the request, and a WRITE's data comes by
// pread. Requests from 4 KiB to 512 KiB: the large ones arrive over several receives (a Unix
// socket holds about 200 KiB), each copied on at its place in the request; the small ones come
// several a receive.
const NBD_MODES: Array<{ name: string; args: string[] }> = [
  { name: 'copy', args: [] }, { name: 'get_data', args: ['-g'] }, { name: 'user_copy', args: ['-u'] }, { name: 'zero_copy', args: ['-z'] },
  { name: 'auto_zc', args: ['--auto_zc'] },
];
t.test('every data path: fio verify with 4 KiB to 512 KiB requests over a Unix socket', async (t) => {
  const ctrl = new UblkControl();
  const features = ctrl.features();
  ctrl.close();
  const sock = join(work, 'modes.sock');
  const server = nbdkit('memory-modes', { socket: sock }, ['memory', 'size=64M']);
  try {
    await ready({ socket: sock });
    for (const mode of NBD_MODES) {
      const m = DATA_PATH_MODES.find((x) => x.name === mode.name)!;
      if (!((m.flag === 0 || features & m.flag) && modeAvailable(m, features, release()))) {
        t.comment(`${mode.name}: this kernel (${release()}) does not have it`);
        continue;
      }
      const id = addDevice(...nbdArgs({ socket: sock }), ...mode.args);
      t.equal(listed(id).flags & m.flag, m.flag, `${mode.name}: the device runs in it`);
      const r = fioVerify(`/dev/ublkb${id}`, { bs: '4k', bsrange: '4k-512k', engine: 'io_uring', jobs: 1, total: VERIFY, qd: 16 });
      t.ok(r.code === 0 && r.error === 0 && r.verified === r.written && r.written >= VERIFY, `${mode.name}: ${verifyMsg(r)}`);
      await deleteDevice(t, id);
    }
  } finally {
    await server.stop();
  }
});

t.test('nbdkit file over a Unix socket, 2 queues: ext4 through the device, e2fsck -fn of the exported file, same checksums after del and re-add', onKernel('lts'), async (t) => {
  const sock = join(work, 'file.sock');
  const file = sparseFile(work, 'ext4.img', 32 * MiB);
  const mnt = join(work, 'mnt-ext4');
  mkdirSync(mnt, { recursive: true });
  const server = nbdkit('file-ext4', { socket: sock }, ['file', `file=${file}`]);
  try {
    t.equal((await ready({ socket: sock })).size, 32 * MiB, 'nbdkit answers: a 32 MiB export');
    const id = addDevice(...nbdArgs({ socket: sock }), '-q', '2');
    const dev = `/dev/ublkb${id}`;
    t.equal(sh('mkfs.ext4', ['-q', '-F', dev]).code, 0, 'mkfs.ext4 on the device');
    t.equal(sh('mount', [dev, mnt]).code, 0, 'mount');
    t.equal(sh('cp', ['-r', join(ROOT, 'src'), mnt]).code, 0, 'cp -r src/');
    for (let i = 0; i < 120; i++) {
      const d = join(mnt, 'data', String(i % 7), String(i % 3));
      mkdirSync(d, { recursive: true });
      writeFileSync(join(d, `f${i}`), randomBytes(((i * 7919) % 65_536) + 1));
    }
    const sums = () => sh('sh', ['-c', 'cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum', 'sh', mnt]).out;
    const before = sums();
    t.ok(before.split('\n').length > 120, `${before.split('\n').length - 1} files checksummed`);
    t.equal(sh('umount', [mnt]).code, 0, 'umount');
    await deleteDevice(t, id);
    const fsck = sh('e2fsck', ['-fn', file]);
    t.equal(fsck.code, 0, `e2fsck -fn on the file nbdkit exports: clean (${fsck.out.trim().split('\n').pop()})`);
    const again = addDevice(...nbdArgs({ socket: sock }), '-q', '2');
    t.equal(sh('mount', [`/dev/ublkb${again}`, mnt]).code, 0, 'mount again through a new device');
    t.equal(sums(), before, 'every file has the same checksum');
    t.equal(sh('umount', [mnt]).code, 0, 'umount');
    await deleteDevice(t, again);
  } finally {
    await server.stop();
  }
});

t.test('FLUSH, FUA, TRIM and WRITE_ZEROES reach the server when it advertises them', onKernel('newest'), async (t) => {
  const sock = join(work, 'logged.sock');
  const logfile = join(work, 'requests.log');
  const server = nbdkit('logged', { socket: sock }, ['--filter=log', 'memory', 'size=32M', `logfile=${logfile}`]);
  try {
    const info = await ready({ socket: sock });
    const want = NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
    t.equal(info.flags & want, want, 'nbdkit memory advertises flush, FUA, trim and write zeroes');
    const id = addDevice(...nbdArgs({ socket: sock }));
    const dev = `/dev/ublkb${id}`;
    const since = () => readFileSync(logfile, 'utf8');
    const mark = () => since().length;
    /** Whether nbdkit logged a line matching `re` after `at` (its log may trail the reply a little). */
    const logged = (at: number, re: RegExp) => waitFor(() => re.test(since().slice(at)), 5000);
    // Data everywhere first, so that discard and zeroes have something to clear.
    t.equal(sh('dd', ['if=/dev/urandom', `of=${dev}`, 'bs=1M', 'count=4', 'oflag=direct', 'status=none']).code, 0, 'dd 4 MiB of random data');
    let at = mark();
    let r = sh('blkdiscard', ['-o', String(MiB), '-l', String(MiB), dev]);
    t.equal(r.code, 0, `blkdiscard 1 MiB at 1 MiB ${r.err}`);
    t.ok(await logged(at, /\bTrim id=\d+ offset=0x100000\b/), 'a Trim at 1 MiB reached nbdkit');
    at = mark();
    r = sh('blkdiscard', ['-z', '-o', String(2 * MiB), '-l', String(MiB), dev]);
    t.equal(r.code, 0, `blkdiscard -z (BLKZEROOUT) 1 MiB at 2 MiB ${r.err}`);
    t.ok(await logged(at, /\bZero id=\d+ offset=0x200000\b/), 'a Zero (NBD_CMD_WRITE_ZEROES) at 2 MiB reached nbdkit, not a write of zeros');
    t.equal(sh('cmp', ['-n', String(MiB), `--ignore-initial=${2 * MiB}:0`, dev, '/dev/zero']).code, 0, 'and the range reads as zeros');
    at = mark();
    r = sh('dd', ['if=/dev/urandom', `of=${dev}`, 'bs=4096', 'count=1', 'seek=16', 'oflag=direct,dsync', 'conv=notrunc', 'status=none']);
    t.equal(r.code, 0, `an O_DIRECT|O_DSYNC write ${r.err}`);
    t.ok(await logged(at, /\bWrite id=\d+ offset=0x10000 count=0x1000 fua=1\b/), 'it reached nbdkit with FUA');
    at = mark();
    r = sh('python3', ['-c', 'import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY); os.fsync(fd)', dev]);
    t.equal(r.code, 0, `fsync of the block device ${r.err}`);
    t.ok(await logged(at, /\bFlush id=\d+/), 'a Flush reached nbdkit');
    await deleteDevice(t, id);
  } finally {
    await server.stop();
  }
});

t.test('Debian nbd-server (config file, named export) over TCP: fio verify; an unknown export name is refused by name', onKernel('lts'), async (t) => {
  const port = await freePort();
  const file = sparseFile(work, 'nbd-server.img', 32 * MiB);
  const conf = join(work, 'nbd-server.conf');
  const pidfile = join(work, 'nbd-server.pid');
  writeFileSync(conf, [
    '[generic]', 'user = root', 'group = root', `port = ${port}`, 'listenaddr = 127.0.0.1', '',
    '[disk]', `exportname = ${file}`, 'flush = true', 'fua = true', 'trim = true', '',
  ].join('\n'));
  // It daemonizes (forks a child per connection): stopped by the pid in its pid file.
  const launched = sh('nbd-server', ['-C', conf, '-p', pidfile]);
  t.equal(launched.code, 0, `nbd-server started ${launched.err}`);
  let pid = 0;
  try {
    t.ok(await waitFor(() => existsSync(pidfile), 10_000), 'it wrote its pid file');
    pid = Number(readFileSync(pidfile, 'utf8'));
    t.equal((await ready(tcp(port), 'disk')).size, 32 * MiB, 'nbd-server answers for export "disk": 32 MiB');
    await t.rejects(nbdProbe(tcp(port), 'no-such-disk'), /UNKNOWN/, 'and refuses an unknown name itself');
    const id = addDevice(...nbdArgs(tcp(port)), '--export', 'disk');
    t.equal(sizeOf(id), 32 * MiB, 'the device is the export\'s size');
    const r = fioVerify(`/dev/ublkb${id}`, { bs: '64k', engine: 'io_uring', jobs: 1, total: VERIFY, qd: 16 });
    t.ok(verifyOk(r, VERIFY), `64k QD 16: ${verifyMsg(r)}`);
    await deleteDevice(t, id);
    refused(t, 'an export nbd-server does not have', [...nbdArgs(tcp(port)), '--export', 'no-such-disk'], [/no-such-disk/]);
  } finally {
    if (pid > 0) {
      try { process.kill(pid, 'SIGTERM'); } catch { /* gone */ }
      await waitFor(() => !alive(pid), 10_000);
    }
  }
});

// ---------------------------------------------------------------------------------------------
// Losing the server
// ---------------------------------------------------------------------------------------------

/** fio randwrite + crc32c verify of `size` bytes in the background (resolves with what it wrote and verified). */
function fioVerifyBackground(dev: string, args: string[]) {
  const child = spawn('fio', ['--name=v', `--filename=${dev}`, '--rw=randwrite', '--ioengine=io_uring', '--direct=1',
    '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  running.add(child);
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
  child.stderr.on('data', (d: Buffer) => { err += d.toString(); });
  const done = new Promise<{ code: number; error: number; written: number; verified: number; stderr: string }>((res) => child.on('close', (code) => {
    running.delete(child);
    try {
      const j = (JSON.parse(out.slice(out.indexOf('{'))) as { jobs: Array<{ error: number; read: { io_bytes: number }; write: { io_bytes: number } }> }).jobs[0]!;
      res({ code: code ?? -1, error: j.error, written: j.write.io_bytes, verified: j.read.io_bytes, stderr: err });
    } catch {
      res({ code: code ?? -1, error: -1, written: 0, verified: 0, stderr: `${err}\n${out}` });
    }
  }));
  return { child, done };
}

t.test('nbdkit killed (-9) under fio and restarted 2 s later: fio finishes and verifies clean, the requests were held meanwhile', onKernel('lts'), async (t) => {
  const sock = join(work, 'restart.sock');
  const file = sparseFile(work, 'restart.img', 16 * MiB);
  const plugin = ['file', `file=${file}`];
  let server = nbdkit('restart-1', { socket: sock }, plugin);
  try {
    await ready({ socket: sock });
    const id = addDevice(...nbdArgs({ socket: sock }), '-q', '1');
    const dev = `/dev/ublkb${id}`;
    // 16 MiB of 4 KiB writes at QD 16, limited to 400 writes/s: ~10 s of writing, then the
    // verify reads; the server dies 3 s in, in the middle of the writes, for 2 s.
    const total = 16 * MiB;
    const fio = fioVerifyBackground(dev, ['--bs=4k', '--iodepth=16', `--size=${total}`, '--rate_iops=,400']);
    await sleep(3000);
    t.ok(fio.child.exitCode === null, 'fio is still writing when the server is killed');
    server.child.kill('SIGKILL');
    await server.stop();
    await sleep(1000);
    const held = inflight(id);
    t.ok(held > 0, `requests are held while the server is away (${held} in flight)`);
    await sleep(1000);
    server = nbdkit('restart-2', { socket: sock }, plugin);
    await ready({ socket: sock });
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<'timeout'>((res) => { timer = setTimeout(() => res('timeout'), 180_000); });
    const r = await Promise.race([fio.done, timeout]);
    clearTimeout(timer);
    if (r === 'timeout') {
      fio.child.kill('SIGKILL');
      t.fail('fio did not finish within 180 s of the restart');
    } else {
      t.ok(r.code === 0 && r.error === 0 && r.written === total && r.verified === total,
        `fio wrote ${r.written / MiB} MiB and verified ${r.verified / MiB} MiB across the restart, exit ${r.code}, error ${r.error} ${r.code || r.error ? r.stderr.slice(-400) : ''}`);
    }
    const log = deviceLog(id);
    t.match(log, /connection (to \S+ )?lost/, 'the log says the connection was lost');
    t.match(log, /reconnected/, 'and that it reconnected');
    t.ok(log.search(/connection (to \S+ )?lost/) < log.lastIndexOf('reconnected'), 'in that order');
    await deleteDevice(t, id);
  } finally {
    await server.stop();
  }
});

t.test('a server that never returns: EIO within --reconnect-timeout, "unreachable" in the log, del at once; one that returns later is used again', onKernel('lts'), async (t) => {
  const sock = join(work, 'gone.sock');
  let server = nbdkit('gone-1', { socket: sock }, ['memory', 'size=16M']);
  try {
    await ready({ socket: sock });
    const id = addDevice(...nbdArgs({ socket: sock }), '--reconnect-timeout', '3');
    const dev = `/dev/ublkb${id}`;
    t.equal(readBlock(dev, 100).code, 0, 'a read works while the server is there');
    server.child.kill('SIGKILL');
    await server.stop();
    const r = readBlock(dev, 200);
    t.not(r.code, 0, `a read after the server died fails (${r.err.trim()})`);
    t.match(r.err, /Input\/output error/, 'with EIO');
    t.ok(r.ms < 15_000, `within 15 s (${(r.ms / 1000).toFixed(1)} s; --reconnect-timeout 3)`);
    t.ok(await waitFor(() => /unreachable/.test(deviceLog(id)), 5000), `the log says the server is unreachable: ${deviceLog(id).split('\n').find((l) => l.includes('unreachable')) ?? ''}`);
    const t0 = Date.now();
    await deleteDevice(t, id);
    t.ok(Date.now() - t0 < 10_000, `del took ${((Date.now() - t0) / 1000).toFixed(1)} s with the server still away`);

    // The same, but the server comes back after the device gave up on it.
    server = nbdkit('gone-2', { socket: sock }, ['memory', 'size=16M']);
    await ready({ socket: sock });
    const again = addDevice(...nbdArgs({ socket: sock }), '--reconnect-timeout', '3');
    server.child.kill('SIGKILL');
    await server.stop();
    t.not(readBlock(`/dev/ublkb${again}`, 300).code, 0, 'a read fails while the server is away');
    t.ok(await waitFor(() => /unreachable/.test(deviceLog(again)), 15_000), 'the log says unreachable');
    server = nbdkit('gone-3', { socket: sock }, ['memory', 'size=16M']);
    await ready({ socket: sock });
    t.ok(await waitFor(() => readBlock(`/dev/ublkb${again}`, 400, 10).code === 0, 20_000), 'once the server is back, reads work again');
    const log = deviceLog(again);
    t.ok(log.lastIndexOf('reconnected') > log.indexOf('unreachable'), `the log says it reconnected after it gave up: ${log.split('\n').filter((l) => /unreachable|reconnected/.test(l)).join(' | ')}`);
    await deleteDevice(t, again);
  } finally {
    await server.stop();
  }
});

// ---------------------------------------------------------------------------------------------
// Past one machine: qemu-storage-daemon's qcow2 export
// ---------------------------------------------------------------------------------------------

t.test('qemu-storage-daemon exporting a qcow2 image: fio verify through the device, then qemu-img check clean and the image holds what the device read', onKernel('newest'), async (t) => {
  const img = join(work, 'qsd.qcow2');
  const sock = join(work, 'qsd.sock');
  t.equal(sh('qemu-img', ['create', '-q', '-f', 'qcow2', img, '32M']).code, 0, 'qemu-img create -f qcow2 (32 MiB)');
  const server = start('qsd', 'qemu-storage-daemon', [
    '--blockdev', `driver=file,filename=${img},node-name=file0`,
    '--blockdev', 'driver=qcow2,file=file0,node-name=disk0',
    '--nbd-server', `addr.type=unix,addr.path=${sock}`,
    '--export', 'type=nbd,id=exp0,node-name=disk0,name=disk,writable=on',
  ]);
  try {
    t.equal((await ready({ socket: sock }, 'disk')).size, 32 * MiB, 'qemu-storage-daemon answers for export "disk"');
    const id = addDevice(...nbdArgs({ socket: sock }), '--export', 'disk');
    const dev = `/dev/ublkb${id}`;
    const r = fioVerify(dev, { bs: '64k', engine: 'io_uring', jobs: 1, total: VERIFY, qd: 16 });
    t.ok(verifyOk(r, VERIFY), `64k QD 16: ${verifyMsg(r)}`);
    const seen = join(work, 'qsd-seen.raw');
    t.equal(sh('dd', [`if=${dev}`, `of=${seen}`, 'bs=1M', 'iflag=direct', 'status=none']).code, 0, 'the whole device read back');
    await deleteDevice(t, id);
    await server.stop('SIGTERM');
    t.equal(server.child.exitCode, 0, 'qemu-storage-daemon exited cleanly on SIGTERM');
    const check = sh('qemu-img', ['check', img]);
    t.equal(check.code, 0, `qemu-img check: ${check.out.trim().split('\n').pop()} ${check.err}`);
    const raw = join(work, 'qsd.raw');
    t.equal(sh('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, raw]).code, 0, 'qemu-img convert to raw');
    t.equal(sh('cmp', [raw, seen]).code, 0, 'the image holds exactly what the device read back');
  } finally {
    await server.stop();
  }
});

// ---------------------------------------------------------------------------------------------
// Refusals at add
// ---------------------------------------------------------------------------------------------

/** `ublk add -t nbd ARGS` must fail promptly, say each of `want`, and leave no device. */
function refused(t: Test, what: string, args: string[], want: RegExp[]): void {
  const t0 = Date.now();
  const r = ublk('add', ...args);
  const ms = Date.now() - t0;
  t.not(r.code, 0, `${what}: add fails (exit ${r.code}, ${(ms / 1000).toFixed(1)} s): ${r.stderr.trim()}`);
  for (const re of want) t.match(r.stderr, re, `the message says ${re}`);
  t.ok(ms < 30_000, 'without waiting for a reconnect timeout');
  t.same(ublkIds(), [], 'no ublk device exists');
  t.same(readdirSync('/dev').filter((f) => /^ublkb\d+$/.test(f)), [], 'no /dev/ublkb* left');
}

t.test('add refuses, with a message naming the problem and no device left: nothing listening, an unknown export, -q 2 without multi-conn, not an NBD server', onKernel('lts'), async (t) => {
  const port = await freePort();
  refused(t, 'nothing listens on the port', nbdArgs(tcp(port)), [/refused|ECONNREFUSED/i, new RegExp(String(port))]);
  refused(t, 'no such Unix socket', nbdArgs({ socket: join(work, 'nobody.sock') }), [/nobody\.sock/]);

  const sock = join(work, 'named.sock');
  const qsd = start('qsd-named', 'qemu-storage-daemon', [
    '--blockdev', 'driver=null-co,size=33554432,node-name=null0',
    '--nbd-server', `addr.type=unix,addr.path=${sock}`,
    '--export', 'type=nbd,id=exp0,node-name=null0,name=disk,writable=on',
  ]);
  try {
    await ready({ socket: sock }, 'disk');
    await t.rejects(nbdProbe({ socket: sock }, 'no-such-export'), /UNKNOWN/, 'qemu-storage-daemon refuses an unknown export name itself');
    refused(t, 'an export the server does not have', [...nbdArgs({ socket: sock }), '--export', 'no-such-export'], [/no-such-export/]);
  } finally {
    await qsd.stop();
  }

  const single = join(work, 'single.sock');
  const nbdkitSingle = nbdkit('single-conn', { socket: single }, ['--filter=multi-conn', 'memory', 'size=16M', 'multi-conn-mode=disable']);
  try {
    const info = await ready({ socket: single });
    t.notOk(info.flags & NBD_FLAG_CAN_MULTI_CONN, 'nbdkit with multi-conn-mode=disable does not advertise multi-conn');
    refused(t, '-q 2 against a server without multi-conn', [...nbdArgs({ socket: single }), '-q', '2'], [/multi-conn/, /-q 1/]);
  } finally {
    await nbdkitSingle.stop();
  }

  // Something else on the port: a server that greets with an SSH banner and hangs up.
  const other = await freePort();
  const banner = start('not-nbd', process.execPath, ['-e',
    `require('net').createServer((c) => c.end('SSH-2.0-OpenSSH_9.2p1 Debian-2\\r\\n')).listen(${other}, '127.0.0.1')`]);
  try {
    t.ok(await waitFor(() => readFileSync('/proc/net/tcp', 'utf8').includes(`0100007F:${other.toString(16).toUpperCase().padStart(4, '0')} 00000000:0000 0A`), 20_000), 'the non-NBD server listens');
    refused(t, 'a server that is not NBD', nbdArgs(tcp(other)), [/magic|not an? NBD|handshake/i]);
  } finally {
    await banner.stop();
  }
  t.same(JSON.parse(ublk('list', '--json').stdout || 'null'), [], 'after all that, ublk list --json is empty');
});

