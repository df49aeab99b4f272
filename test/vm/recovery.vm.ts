/**
 * A device outlives its server (run inside the VM): user recovery after SIGKILL and after a queue
 * died, FAIL_IO, live upgrade, safe stop, resize, partition-scan control and the I/O-flusher mark.
 *
 * Every test drives the real CLI, as an operator would. The crash loop runs UBLK_RECOVER_CYCLES
 * kills per target (default 2 in `npm test`; the full count is 20) and the upgrade loop
 * UBLK_UPGRADE_CYCLES upgrades (default 2; full 10). Saved devices (up/down) are tested last.
 */
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, openSync, closeSync, readSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { UblkControl } from '../../src/ublk/control.js';
import {
  UBLK_F_NO_AUTO_PART_SCAN, UBLK_F_QUIESCE, UBLK_F_UPDATE_SIZE, UBLK_F_USER_RECOVERY, UBLK_F_USER_RECOVERY_FAIL_IO,
  UBLK_F_SAFE_STOP_DEV,
} from '../../src/ublk/abi.js';
import { addDevice, alive, deviceLog, fioJob, killServer, listed, serverPid, sleep, state, ublk, ublkIds, waitFor, EXT, ROOT, noDeviceLeftBehind, onKernel } from './helpers.js';

const MiB = 2 ** 20;
const CYCLES = Number(process.env.UBLK_RECOVER_CYCLES ?? 2);
const UPGRADES = Number(process.env.UBLK_UPGRADE_CYCLES ?? 2);
const MISBEHAVING = fileURLToPath(new URL(`./fixtures/misbehaving-target${EXT}`, import.meta.url));
const work = mkdtempSync('/tmp/ublk-recovery-');
t.teardown(() => rmSync(work, { recursive: true, force: true }));

const features = (() => {
  const c = new UblkControl();
  try { return c.features(); } finally { c.close(); }
})();
const has = (f: number) => (features & f) !== 0;

t.afterEach(noDeviceLeftBehind);

t.test('-r/-i/-e are kublk\'s: a value of 0 or 1; a kernel without a flag is named with its version', (t) => {
  let r = ublk('add', '-t', 'null', '-r');
  t.equal(r.code, 2, '-r needs its value');
  r = ublk('add', '-t', 'null', '-r', '2');
  t.match(r.stderr, /-r must be from 0 to 1/);
  r = ublk('add', '-t', 'null', '-i', '1', '-e', '1');
  t.match(r.stderr, /exclude each other/);
  if (!has(UBLK_F_USER_RECOVERY_FAIL_IO)) {
    r = ublk('add', '-t', 'null', '-e', '1');
    t.equal(r.code, 1);
    t.match(r.stderr, /-e 1 needs UBLK_F_USER_RECOVERY_FAIL_IO \(Linux 6\.13\)/, 'one line naming the kernel that added FAIL_IO');
  }
  if (!has(UBLK_F_NO_AUTO_PART_SCAN)) {
    r = ublk('add', '-t', 'null', '--no_auto_part_scan');
    t.match(r.stderr, /UBLK_F_NO_AUTO_PART_SCAN \(Linux 7\.0\)/);
  }
  t.same(ublkIds(), [], 'nothing was created');
  t.end();
});

t.test('kill -9 of a null device\'s server: list says the server is gone and what to run; recover brings it back LIVE', async (t) => {
  const id = addDevice('-t', 'null', '-s', '1G', '-q', '2', '-r', '1');
  const before = listed(id);
  t.ok(before.flags & UBLK_F_USER_RECOVERY, 'the device has USER_RECOVERY');
  t.equal(before.server, true);
  const old = await killServer(t, id);
  const text = ublk('list', '-n', String(id)).stdout;
  t.match(text, /state QUIESCED/);
  t.match(text, new RegExp(`no server: \`ublk recover -n ${id}\` serves it again, \`ublk del -n ${id}\` removes it`));
  t.equal(listed(id).server, false, '--json: server false');
  t.ok(existsSync(`/dev/ublkb${id}`), 'the disk stayed');
  const rec = ublk('recover', '-n', String(id));
  t.equal(rec.code, 0, `recover: ${rec.stderr}`);
  t.match(rec.stdout, new RegExp(`dev id ${id}:.*\\n.*state LIVE`));
  const now = listed(id);
  t.equal(now.state, 'LIVE');
  t.not(serverPid(id), old, 'a new server');
  t.equal(now.server, true);
  const dd = spawnSync('dd', [`if=/dev/ublkb${id}`, 'of=/dev/null', 'bs=64k', 'count=64', 'iflag=direct'], { encoding: 'utf8', timeout: 30_000 });
  t.equal(dd.status, 0, 'the recovered device serves I/O');
  const again = ublk('recover', '-n', String(id));
  t.match(again.stderr, /is LIVE, served by process \d+: there is nothing to recover/, 'recover of a served device is refused');
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.end();
});

t.test('a device without -r cannot be recovered, and says so', onKernel('newest'), async (t) => {
  const id = addDevice('-t', 'null', '-s', '1G');
  const r = ublk('recover', '-n', String(id));
  t.equal(r.code, 1);
  t.match(r.stderr, /was added without user recovery \(-r 1\): it cannot be recovered/);
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.end();
});

for (const target of ['loop', 'mem'] as const) {
  t.test(`${target} with -r 1 -i 1: fio write + crc32c verify across ${CYCLES} SIGKILLs at random moments, each followed by recover: no errors`, onKernel(target === 'loop' ? 'lts' : 'newest'), async (t) => {
    const backing = join(work, `${target}.img`);
    if (target === 'loop') spawnSync('truncate', ['-s', '64M', backing]);
    const targetArgs = target === 'loop' ? ['-f', backing] : ['-s', '64M'];
    const id = addDevice('-t', target, '-q', '2', '-r', '1', '-i', '1', ...targetArgs);
    const dev = `/dev/ublkb${id}`;
    const shm = target === 'mem' ? readdirSync('/dev/shm').filter((n) => n.startsWith('ublk-mem-')) : [];
    if (target === 'mem') t.equal(shm.length, 1, 'mem keeps its disk in /dev/shm');
    let kills = 0;
    let recovers = 0;
    let verifyErrors = 0;
    const pids = new Set<number>([serverPid(id)]);
    for (let i = 0; i < CYCLES; i++) {
      // Each cycle writes a 32 MiB region with crc32c headers, then reads it back and checks it;
      // the server dies somewhere in the write or the verify phase.
      const job = fioJob(dev, ['--rw=randwrite', '--bs=4k', '--ioengine=io_uring', '--iodepth=16', '--direct=1',
        '--size=32M', `--offset=${(i % 2) * 32}M`, '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', `--randseed=${1000 + i}`]);
      await sleep(200 + Math.floor(Math.random() * 2500));
      await killServer(t, id);
      kills++;
      const r = ublk('recover', '-n', String(id));
      if (r.code !== 0) t.fail(`cycle ${i}: recover failed: ${r.stderr}`);
      else recovers++;
      pids.add(serverPid(id));
      const f = await job.done;
      if (f.code !== 0 || f.error !== 0) {
        verifyErrors++;
        t.fail(`cycle ${i}: fio ended ${f.code}, error ${f.error}: ${f.stderr.slice(-400)}`);
      }
    }
    t.equal(kills, CYCLES, `${kills} kills`);
    t.equal(recovers, CYCLES, `${recovers} recovers`);
    t.equal(verifyErrors, 0, '0 verify or I/O errors');
    t.equal(pids.size, CYCLES + 1, 'a new server each time');
    t.comment(`recovery loop ${target}: kills ${kills}, recovers ${recovers}, verify errors ${verifyErrors}`);
    t.equal(ublk('del', '-n', String(id)).code, 0);
    if (target === 'mem') t.notOk(existsSync(join('/dev/shm', shm[0]!)), 'del removed the disk file of a device whose first server is long gone');
    t.end();
  });
}

t.test('a write acknowledged after a completed FLUSH is on the backing after a kill and recover', async (t) => {
  const backing = join(work, 'durable.img');
  spawnSync('truncate', ['-s', '16M', backing]);
  const id = addDevice('-t', 'loop', '-f', backing, '--buffered', '-r', '1');
  const dev = `/dev/ublkb${id}`;
  const r = spawnSync('python3', ['-c', `import os,sys
fd=os.open(sys.argv[1],os.O_WRONLY)
os.pwrite(fd,b'\\xa7'*1048576,4194304)
os.fsync(fd)
print('flushed')`, dev], { encoding: 'utf8', timeout: 60_000 });
  t.equal(r.stdout.trim(), 'flushed', `write + fsync: ${r.stderr}`);
  await killServer(t, id);
  const fd = openSync(backing, 'r');
  const b = Buffer.alloc(MiB);
  readSync(fd, b, 0, MiB, 4 * MiB);
  closeSync(fd);
  t.ok(b.every((x) => x === 0xa7), 'the backing holds the flushed write with the server dead');
  t.equal(ublk('recover', '-n', String(id)).code, 0);
  const dd = spawnSync('python3', ['-c', `import os,sys
fd=os.open(sys.argv[1],os.O_RDONLY|os.O_DIRECT)
import mmap; m=mmap.mmap(-1,1048576); os.preadv(fd,[m],4194304); print(m[:]==b'\\xa7'*1048576)`, dev], { encoding: 'utf8', timeout: 60_000 });
  t.equal(dd.stdout.trim(), 'True', 'and the recovered device reads it');
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.end();
});

t.test('a queue thread that dies: the server gets out of the way (device QUIESCED, not limping), and recover serves it again', async (t) => {
  const flag = join(work, 'died');
  const id = addDevice('-t', MISBEHAVING, '-s', '16M', '--fill', '90', '-q', '2', '-r', '1', '--die-at', '1M', '--die-flag', flag);
  const pid = serverPid(id);
  const dd = spawnSync('dd', [`if=/dev/ublkb${id}`, 'of=/dev/null', 'bs=4k', 'count=1', 'skip=256', 'iflag=direct'], { timeout: 1000 });
  t.ok(existsSync(flag), 'the queue died on the read at 1 MiB');
  t.ok(await waitFor(() => !alive(pid), 30_000), 'the server exited instead of serving on with a dead queue');
  t.ok(await waitFor(() => state(id) === 'QUIESCED', 30_000), `the device waits for a server (state ${state(id)})`);
  void dd;
  const r = ublk('recover', '-n', String(id));
  t.equal(r.code, 0, `recover: ${r.stderr}`);
  const read = spawnSync('python3', ['-c', `import os,sys,mmap
fd=os.open(sys.argv[1],os.O_RDONLY|os.O_DIRECT); m=mmap.mmap(-1,4096); os.preadv(fd,[m],1048576); print(m[0])`, `/dev/ublkb${id}`], { encoding: 'utf8', timeout: 30_000 });
  t.equal(read.stdout.trim(), '90', 'the read that killed the first server is served by the second');
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.end();
});

t.test('-e 1 (FAIL_IO): I/O fails fast while no server runs, and the device serves again after recover', { skip: has(UBLK_F_USER_RECOVERY_FAIL_IO) ? false : 'this kernel has no UBLK_F_USER_RECOVERY_FAIL_IO (6.13); its refusal is tested above' }, async (t) => {
  const id = addDevice('-t', 'mem', '-s', '16M', '-e', '1');
  await killServer(t, id, 'FAIL_IO');
  const began = Date.now();
  const dd = spawnSync('dd', [`if=/dev/ublkb${id}`, 'of=/dev/null', 'bs=4k', 'count=1', 'iflag=direct'], { encoding: 'utf8', timeout: 20_000 });
  t.not(dd.status, 0, 'the read failed');
  t.ok(Date.now() - began < 10_000, `and failed fast (${Date.now() - began} ms)`);
  t.equal(ublk('recover', '-n', String(id)).code, 0);
  const ok = spawnSync('dd', [`if=/dev/ublkb${id}`, 'of=/dev/null', 'bs=4k', 'count=1', 'iflag=direct'], { timeout: 20_000 });
  t.equal(ok.status, 0, 'after recover it reads');
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.end();
});

t.test(`live upgrade: fio randrw with verify runs across ${UPGRADES} upgrades with no error; the server changes each time`, async (t) => {
  const quiesce = has(UBLK_F_QUIESCE);
  const id = addDevice('-t', 'mem', '-s', '64M', '-q', '2', '-r', '1', '-i', '1');
  t.equal((listed(id).flags & UBLK_F_QUIESCE) !== 0, quiesce, quiesce ? 'add -r 1 asked for QUIESCE' : 'no QUIESCE on this kernel: upgrades reissue');
  const job = fioJob(`/dev/ublkb${id}`, ['--rw=randrw', '--bs=4k', '--ioengine=io_uring', '--iodepth=16', '--direct=1',
    '--size=32M', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--loops=1000', '--time_based', '--runtime=3600']);
  // The stall: a probe reads 4 KiB at QD 1 in a loop and reports every read slower than 20 ms
  // (wall-clock end time and latency); the slowest read within an upgrade is that upgrade's stall.
  const probe = spawn('python3', ['-u', '-c', `import os,sys,mmap,time
fd=os.open(sys.argv[1],os.O_RDONLY|os.O_DIRECT); m=mmap.mmap(-1,4096); off=48*1048576
while True:
  a=time.time(); os.preadv(fd,[m],off); b=time.time()
  if b-a>0.02: print(int(b*1000),int((b-a)*1000),flush=True)
  off=48*1048576+((off+4096)%(8*1048576))`, `/dev/ublkb${id}`], { stdio: ['ignore', 'pipe', 'inherit'] });
  const slow: Array<[number, number]> = [];
  let partial = '';
  probe.stdout.on('data', (d: Buffer) => {
    // Whole lines only: a chunk may end in the middle of one.
    const lines = (partial + d.toString()).split('\n');
    partial = lines.pop()!;
    for (const line of lines) if (line) slow.push(line.split(' ').map(Number) as [number, number]);
  });
  const windows: Array<[number, number]> = [];
  const pids = [serverPid(id)];
  for (let i = 0; i < UPGRADES; i++) {
    await sleep(1000);
    const began = Date.now();
    const before = serverPid(id);
    const r = ublk('upgrade', '-n', String(id));
    windows.push([began, Date.now()]);
    t.equal(r.code, 0, `upgrade ${i}: ${r.stderr.trim()}`);
    if (r.code !== 0) {
      // What the old server said is the only record of why it did not hand over.
      t.comment(`server log:\n${deviceLog(id).split('\n').slice(-40).join('\n')}`);
      // A server stuck in its hand-over would leave fio waiting forever: kill it, recover.
      if (alive(before)) await killServer(t, id);
      break;
    }
    pids.push(serverPid(id));
  }
  await sleep(500);
  // A failed upgrade must not leave fio waiting on a device nobody serves.
  if (state(id) !== 'LIVE') t.equal(ublk('recover', '-n', String(id)).code, 0, 'recovered after a failed upgrade');
  probe.kill();
  process.kill(job.pid, 'SIGINT');
  let timer: NodeJS.Timeout | undefined;
  const f = await Promise.race([job.done, new Promise<{ error: number; stderr: string }>((r) => {
    timer = setTimeout(() => r({ error: -1, stderr: 'fio did not end within 60 s of SIGINT' }), 60_000);
  })]);
  clearTimeout(timer);
  const stalls = windows.map(([a, b]) => Math.max(0, ...slow.filter(([end]) => end >= a && end <= b + 500).map(([, ms]) => ms)));
  t.equal(f.error, 0, `fio: no I/O or verify error (${f.stderr.slice(-300)})`);
  t.equal(new Set(pids).size, UPGRADES + 1, `server pids ${pids.join(' -> ')}`);
  // A hand-over whose queues did not end after QUIESCE_DEV leaves like a crash (server.ts,
  // handOver) and the upgrade still works; say so, since it is not the path meant to run.
  const late = deviceLog(id).split('\n').filter((l) => l.includes('QUIESCE_DEV succeeded, but'));
  if (late.length) t.comment(`hand-overs that ended like a crash: ${late.join(' | ')}`);
  const sorted = [...stalls].sort((a, b) => a - b);
  t.comment(`upgrade (${quiesce ? 'QUIESCE_DEV' : 'leave + REISSUE'}): ${UPGRADES} upgrades, longest read per upgrade ${stalls.join(' ')} ms: median ${sorted[Math.floor(sorted.length / 2)]} ms, max ${sorted[sorted.length - 1]} ms`);
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.end();
});

t.test('quiesce -n ID (kublk): the server lets go, the device waits QUIESCED with its data, and recover serves it', async (t) => {
  const id = addDevice('-t', 'mem', '-s', '16M', '-r', '1');
  if (!has(UBLK_F_QUIESCE)) {
    const r = ublk('quiesce', '-n', String(id));
    t.equal(r.code, 1);
    t.match(r.stderr, /quiesce needs UBLK_F_QUIESCE \(Linux 6\.16\)/, 'a kernel without QUIESCE_DEV is named');
    t.equal(state(id), 'LIVE', 'and the device is untouched');
    t.equal(ublk('del', '-n', String(id)).code, 0);
    t.end();
    return;
  }
  spawnSync('python3', ['-c', 'import os,sys; fd=os.open(sys.argv[1],os.O_WRONLY); os.pwrite(fd,b"quiet"*1000,0); os.fsync(fd)', `/dev/ublkb${id}`]);
  const pid = serverPid(id);
  const r = ublk('quiesce', '-n', String(id));
  t.equal(r.code, 0, `quiesce: ${r.stderr}`);
  t.notOk(alive(pid), 'the server exited');
  t.ok(await waitFor(() => state(id) === 'QUIESCED', 10_000), `the device waits (state ${state(id)})`);
  t.equal(ublk('recover', '-n', String(id)).code, 0);
  const read = spawnSync('python3', ['-c', 'import os,sys; fd=os.open(sys.argv[1],os.O_RDONLY); print(os.pread(fd,5,0).decode())', `/dev/ublkb${id}`], { encoding: 'utf8' });
  t.equal(read.stdout.trim(), 'quiet', 'with its data');
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.end();
});

t.test('stop --safe and del --safe refuse while the disk is open, and work once it is closed', async (t) => {
  const id = addDevice('-t', 'null', '-s', '1G');
  const holder = spawn('python3', ['-c', 'import os,sys,time; fd=os.open(sys.argv[1],os.O_RDONLY); print("open",flush=True); time.sleep(60)', `/dev/ublkb${id}`], { stdio: ['ignore', 'pipe', 'ignore'] });
  await new Promise<void>((r) => holder.stdout.once('data', () => r()));
  for (const cmd of [['stop', '-n', String(id), '--safe'], ['del', '-n', String(id), '--safe']]) {
    const r = ublk(...cmd);
    t.equal(r.code, 1, `${cmd[0]} --safe refused`);
    t.match(r.stderr, /is (open or mounted|in use).*not stopped \(--safe\)/, r.stderr.trim());
  }
  t.ok(existsSync(`/dev/ublkb${id}`), 'the device is still there');
  t.equal(state(id), 'LIVE');
  t.comment(has(UBLK_F_SAFE_STOP_DEV) ? 'TRY_STOP_DEV (kernel)' : 'our own check (no TRY_STOP_DEV on this kernel)');
  holder.kill();
  await new Promise((r) => holder.once('exit', r));
  const r = ublk('stop', '-n', String(id), '--safe');
  t.equal(r.code, 0, `stop --safe with the disk closed: ${r.stderr}`);
  t.ok(await waitFor(() => !ublkIds().includes(id), 30_000), 'the server removed the stopped device');
  t.end();
});

t.test('update_size: a mounted ext4 on loop grows with its backing file and resize2fs', { skip: has(UBLK_F_UPDATE_SIZE) ? false : 'no UPDATE_SIZE (6.16) on this kernel: the refusal is checked instead' }, async (t) => {
  const backing = join(work, 'grow.img');
  spawnSync('truncate', ['-s', '64M', backing]);
  const id = addDevice('-t', 'loop', '-f', backing, '-r', '1');
  const dev = `/dev/ublkb${id}`;
  const mnt = join(work, 'mnt');
  spawnSync('mkdir', ['-p', mnt]);
  t.equal(spawnSync('mkfs.ext4', ['-q', '-F', dev]).status, 0, 'mkfs');
  t.equal(spawnSync('mount', [dev, mnt]).status, 0, 'mount');
  let r = ublk('update_size', '-n', String(id), '-s', '128M');
  t.match(r.stderr, /larger than the 67108864 bytes/, 'growing past the backing file is refused by the target');
  spawnSync('truncate', ['-s', '128M', backing]);
  r = ublk('update_size', '-n', String(id), '-s', '128M');
  t.equal(r.code, 0, `update_size: ${r.stderr}`);
  t.equal(listed(id).dev_capacity, 128 * MiB / 512, 'the kernel has the new capacity');
  t.equal(spawnSync('resize2fs', [dev], { encoding: 'utf8' }).status, 0, 'resize2fs online');
  const df = spawnSync('df', ['-B1', '--output=size', mnt], { encoding: 'utf8' }).stdout.trim().split('\n')[1];
  t.ok(Number(df) > 100 * MiB, `the file system grew (${df} bytes)`);
  spawnSync('umount', [mnt]);
  t.equal(spawnSync('fsck.ext4', ['-n', '-f', dev]).status, 0, 'fsck clean');
  // A recovered server serves the new size (the state follows update_size).
  await killServer(t, id);
  t.equal(ublk('recover', '-n', String(id)).code, 0);
  t.equal(listed(id).dev_capacity, 128 * MiB / 512);
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.end();
});

t.test('update_size on a kernel without UPDATE_SIZE names the kernel that added it', { skip: has(UBLK_F_UPDATE_SIZE) ? 'this kernel has UPDATE_SIZE' : false }, (t) => {
  const id = addDevice('-t', 'null', '-s', '1G');
  const r = ublk('update_size', '-n', String(id), '-s', '512M');
  t.equal(r.code, 1);
  t.match(r.stderr, /update_size needs UBLK_F_UPDATE_SIZE \(Linux 6\.16\)/);
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.end();
});

t.test('--no_auto_part_scan: the kernel does not read the partition table at start', { skip: has(UBLK_F_NO_AUTO_PART_SCAN) ? false : 'no NO_AUTO_PART_SCAN (7.0): its refusal is tested above' }, (t) => {
  const backing = join(work, 'parted.img');
  spawnSync('truncate', ['-s', '32M', backing]);
  // One MBR partition (type 0x83 at LBA 2048, 20480 sectors), written straight into the image.
  spawnSync('python3', ['-c', `import struct,sys
f=open(sys.argv[1],'r+b'); f.seek(446); f.write(struct.pack('<B3sB3sII',0,b'\\0'*3,0x83,b'\\0'*3,2048,20480)); f.seek(510); f.write(b'\\x55\\xaa')`, backing]);
  const scanned = addDevice('-t', 'loop', '-f', backing, '--read-only');
  t.ok(existsSync(`/dev/ublkb${scanned}p1`), 'by default the partition appears');
  t.equal(ublk('del', '-n', String(scanned)).code, 0);
  const id = addDevice('-t', 'loop', '-f', backing, '--read-only', '--no_auto_part_scan');
  t.ok(listed(id).flags & UBLK_F_NO_AUTO_PART_SCAN, 'the flag is on the device');
  t.notOk(existsSync(`/dev/ublkb${id}p1`), 'with --no_auto_part_scan it does not');
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.end();
});

t.test('queue threads are I/O flushers (PR_SET_IO_FLUSHER: PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE)', onKernel('lts'), (t) => {
  const id = addDevice('-t', 'null', '-s', '1G', '-q', '2');
  const pid = serverPid(id);
  const PF_MEMALLOC_NOIO = 0x00080000;
  const PF_LOCAL_THROTTLE = 0x00100000;
  let flushers = 0;
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    const flags = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[6]);
    if ((flags & PF_MEMALLOC_NOIO) && (flags & PF_LOCAL_THROTTLE)) flushers++;
  }
  t.equal(flushers, 2, 'both queue threads, and no other thread');
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.end();
});

t.test('saved devices: add --save NAME, a stable link by name, up and down as the systemd unit runs them', onKernel('lts'), async (t) => {
  process.env.UBLK_CONFIG_DIR = join(work, 'devices');
  t.teardown(() => { delete process.env.UBLK_CONFIG_DIR; });
  // The unit's commands, with %i filled in; `/usr/bin/env ublk` is this checkout's CLI.
  const unit = readFileSync(join(ROOT, 'systemd', 'ublk@.service'), 'utf8');
  const command = (key: string, name: string) => {
    const line = unit.split('\n').find((l) => l.startsWith(`${key}=/usr/bin/env ublk `))!;
    return line.slice(`${key}=/usr/bin/env ublk `.length).replace('%i', name).split(' ');
  };
  t.same(command('ExecStart', 'disk1'), ['up', 'disk1']);
  t.same(command('ExecStop', 'disk1'), ['down', 'disk1']);

  const id = addDevice('-t', 'mem', '-s', '32M', '-r', '1', '-i', '1', '--save', 'disk1');
  const link = '/dev/disk/by-ublk-name/disk1';
  t.equal(readlinkSync(link), `../../ublkb${id}`, 'the name links to the disk');
  t.ok(existsSync(join(work, 'devices', 'disk1.json')), 'the declaration was saved');
  t.match(ublk('add', '-t', 'null', '--save', 'disk1').stderr, new RegExp(`the name disk1 is device ${id}'s`), 'a name serves one device');
  const write = spawnSync('python3', ['-c', 'import os,sys; fd=os.open(sys.argv[1],os.O_WRONLY); os.pwrite(fd,b"saved!"*100,0); os.fsync(fd)', link]);
  t.equal(write.status, 0, 'written through the link');

  let r = ublk(...command('ExecStart', 'disk1'));
  t.match(r.stdout, new RegExp(`disk1: up \\(device ${id}, server \\d+\\)`), 'up of a device that is up changes nothing');
  await killServer(t, id);
  r = ublk(...command('ExecStart', 'disk1'));
  t.equal(r.code, 0, `up after its server died: ${r.stderr}`);
  t.equal(listed(id).state, 'LIVE', 'recovered, same id');
  const read = spawnSync('python3', ['-c', 'import os,sys; fd=os.open(sys.argv[1],os.O_RDONLY); print(os.pread(fd,6,0).decode())', link], { encoding: 'utf8' });
  t.equal(read.stdout.trim(), 'saved!', 'with its data');

  r = ublk(...command('ExecStop', 'disk1'));
  t.equal(r.code, 0, `down: ${r.stderr}`);
  t.same(ublkIds(), [], 'down removed the device');
  t.notOk(existsSync(link), 'and its link');
  t.ok(existsSync(join(work, 'devices', 'disk1.json')), 'the declaration stays');
  r = ublk('up', '-a');
  t.equal(r.code, 0, `up -a: ${r.stderr}`);
  t.equal(ublkIds().length, 1, 'the saved device is made again');
  t.ok(existsSync(link), 'under its name');
  t.equal(ublk('down', '-a').code, 0);
  t.same(ublkIds(), []);
  t.match(ublk('up', 'nosuch').stderr, /no saved device 'nosuch'/);
  t.end();
});
