/**
 * The loop and mem targets on a real kernel (run inside the VM): no byte lost under fio's crc32c
 * verify, a file system that survives del and re-add, discard and write-zeroes that reach the
 * backing file, flushes that reach it as fdatasync, edge cases compared with the kernel's own
 * loop driver, and the errors `add` gives before any device exists.
 *
 * Backing files live in the guest's /tmp (tmpfs: O_DIRECT, holes and fallocate work there).
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { UblkServer } from '../../src/ublk/server.js';
import { loadTarget } from '../../src/targets/index.js';
import { addDevice, alive, exists, ext4RoundTrip, fio, fioBackground, fioVerify, ublk, ublkIds, waitFor, noDeviceLeftBehind, onKernel, fullSuiteOnly } from './helpers.js';

const MiB = 2 ** 20;
/** fio's volume per verify pass: 32 MiB in `npm test` (the VM time budget), UBLK_VERIFY_MIB=256 the full count. */
const VERIFY = Number(process.env.UBLK_VERIFY_MIB ?? 32) * MiB;
const work = mkdtempSync('/tmp/ublk-loop-');
t.teardown(() => rmSync(work, { recursive: true, force: true }));
const { def: loop, url: LOOP_URL } = (await loadTarget('loop'))!;

t.afterEach(noDeviceLeftBehind);

function sh(cmd: string, args: string[], input?: string) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', input, timeout: 300_000 });
  return { code: r.status ?? -1, out: r.stdout ?? '', err: r.stderr ?? '' };
}

function sparse(name: string, size: number): string {
  const f = join(work, name);
  writeFileSync(f, '');
  truncateSync(f, size);
  return f;
}

/** Data extents of a file, by SEEK_DATA/SEEK_HOLE. */
function extents(file: string): Array<[number, number]> {
  const py = `import os,sys,json
fd=os.open(sys.argv[1],os.O_RDONLY); end=os.fstat(fd).st_size; off=0; out=[]
while off<end:
  try: d=os.lseek(fd,off,os.SEEK_DATA)
  except OSError: break
  h=os.lseek(fd,d,os.SEEK_HOLE); out.append([d,h]); off=h
print(json.dumps(out))`;
  const r = sh('python3', ['-c', py, file]);
  return JSON.parse(r.out) as Array<[number, number]>;
}
const allocated = (file: string) => statSync(file).blocks * 512;

// npm test runs three of the four (loop 1 queue and mem 2 queues on 6.12, loop 2 queues on the
// newest): the queue engine's paths are the same in all four.
for (const target of ['loop', 'mem'] as const) {
  for (const queues of [1, 2]) {
    t.test(`${target}, ${queues} queue(s): fio randwrite + crc32c verify through ${VERIFY / MiB} MiB, 4k and 64k, io_uring and libaio`, target === 'mem' && queues === 1 ? fullSuiteOnly() : onKernel((target === 'loop') === (queues === 1) ? 'lts' : 'newest'), (t) => {
      const file = target === 'loop' ? sparse(`verify-${queues}.img`, 256 * MiB) : '';
      const id = addDevice('-t', target, '-q', String(queues), ...(target === 'loop' ? ['-f', file] : ['-s', '256M']));
      const dev = `/dev/ublkb${id}`;
      for (const bs of ['4k', '64k']) {
        for (const engine of ['io_uring', 'libaio']) {
          const r = fioVerify(dev, { bs, engine, jobs: queues, total: VERIFY });
          t.ok(r.code === 0 && r.error === 0 && r.written === VERIFY && r.verified === VERIFY,
            `${bs} ${engine}: wrote ${r.written / MiB} MiB, verified ${r.verified / MiB} MiB, exit ${r.code}, error ${r.error}${r.code ? ` ${r.stderr.slice(-300)}` : ''}`);
        }
      }
      t.equal(ublk('del', '-n', String(id)).code, 0, 'del');
      if (target === 'loop') {
        // The last pass's data is in the file: a new device over it must verify without writing.
        // (Added in kublk's form: the backing file after the options.)
        const again = addDevice('-t', 'loop', '-q', '1', file);
        const r = fioVerify(`/dev/ublkb${again}`, { bs: '64k', engine: 'libaio', jobs: queues, total: VERIFY, verifyOnly: true });
        t.ok(r.code === 0 && r.error === 0 && r.verified === VERIFY, `after del and re-add the backing verifies: ${r.verified / MiB} MiB, exit ${r.code}, error ${r.error}`);
        t.equal(ublk('del', '-n', String(again)).code, 0);
        rmSync(file);
      }
      t.end();
    });
  }
}

t.test('ext4 on loop: mkfs, a tree of files, umount, del; e2fsck -fn of the backing is clean and a re-added device shows the same files', (t) => {
  ext4RoundTrip(t, sparse('fs.img', 256 * MiB), join(work, 'mnt'), ['-q', '2']);
  t.end();
});

/** An in-process device (its counters are readable) over `file`. */
async function startLoop(file: string, extra: string[] = []) {
  const opts = loop.parseArgs!(['-f', file, ...extra]);
  const server = await UblkServer.start({ target: loop, targetUrl: LOOP_URL, targetOptions: opts, queues: 1 });
  return { server, dev: `/dev/ublkb${server.devId}` };
}

t.test('blkdiscard punches holes in the backing (a range, then the whole device); write-zeroes reads back as zeros', async (t) => {
  const file = sparse('discard.img', 64 * MiB);
  const { server, dev } = await startLoop(file);
  let r = sh('dd', [`if=/dev/urandom`, `of=${dev}`, 'bs=1M', 'count=64', 'oflag=direct', 'status=none']);
  t.equal(r.code, 0, `filled the device ${r.err}`);
  t.same(extents(file), [[0, 64 * MiB]], 'the backing is fully allocated');
  r = sh('blkdiscard', ['-f', '-o', String(8 * MiB), '-l', String(16 * MiB), dev]);
  t.equal(r.code, 0, `blkdiscard a range ${r.err}`);
  t.same(extents(file), [[0, 8 * MiB], [24 * MiB, 64 * MiB]], 'SEEK_HOLE finds the discarded range');
  t.equal(allocated(file), 48 * MiB, 'and 16 MiB fewer blocks are allocated (du)');

  // BLKZEROOUT sends WRITE_ZEROES with NOUNMAP: zeros that stay allocated (on tmpfs, via the
  // punch + allocate fallback, since tmpfs has no ZERO_RANGE).
  r = sh('blkdiscard', ['-f', '-z', '-o', String(32 * MiB), '-l', String(4 * MiB), dev]);
  t.equal(r.code, 0, `blkdiscard -z ${r.err}`);
  // fallocate --punch-hole on the device: WRITE_ZEROES that may unmap.
  r = sh('fallocate', ['-p', '-o', String(40 * MiB), '-l', String(4 * MiB), dev]);
  t.equal(r.code, 0, `fallocate -p ${r.err}`);
  // tmpfs's SEEK_DATA calls fallocated-but-unwritten pages holes, so count blocks (du) here.
  t.equal(allocated(file), 44 * MiB, 'zeroing with NOUNMAP kept its 4 MiB allocated; zeroing that may unmap freed 4 MiB');
  t.same(extents(file).filter(([a, b]) => a < 44 * MiB && b > 40 * MiB), [], 'and SEEK_HOLE finds the hole it left');
  const data = readFileSync(dev);
  t.ok(data.subarray(32 * MiB, 36 * MiB).every((x) => x === 0) && data.subarray(40 * MiB, 44 * MiB).every((x) => x === 0), 'both zeroed ranges read as zeros through the device');
  t.ok(data.subarray(36 * MiB, 40 * MiB).some((x) => x !== 0), 'between them the data is intact');
  const c = server.counters();
  t.ok(c.punch_hole! >= 2 && c.zero_range! >= 1, `counted: punch_hole ${c.punch_hole}, zero_range ${c.zero_range}`);

  r = sh('blkdiscard', ['-f', dev]);
  t.equal(r.code, 0, `blkdiscard the whole device ${r.err}`);
  t.same(extents(file), [], 'no data left in the backing');
  t.equal(allocated(file), 0, 'du: 0');
  t.equal(statSync(file).size, 64 * MiB, 'the file keeps its size (KEEP_SIZE)');
  t.equal(server.counters().errors, 0, 'no request failed');
  await server.stop();
  rmSync(file);
});

// The case that hung on 6.12 when a transfer linked to its commit went to an io-wq worker: a
// backing on ext4 whose page cache is dirty (written and never synced), so O_DIRECT transfers
// must wait for writeback, read at a fixed rate (the queue sleeps between requests). The
// transfers go NOWAIT, fail EAGAIN, and are sent again unlinked; every read must come back, with
// the bytes that were written.
t.test('O_DIRECT transfers that would block (dirty page cache on ext4) are sent again unlinked: every request answered, bytes intact', onKernel('newest'), async (t) => {
  const m = sh('modprobe', ['-d', process.env.UBLK_VM_KROOT ?? '/', 'brd', 'rd_nr=1', 'rd_size=196608']);
  t.equal(m.code, 0, `modprobe brd ${m.err}`);
  const mnt = join(work, 'ext4');
  mkdirSync(mnt);
  t.equal(sh('mkfs.ext4', ['-q', '/dev/ram0']).code, 0, 'mkfs.ext4 on brd');
  t.equal(sh('mount', ['/dev/ram0', mnt]).code, 0, 'mounted');
  t.teardown(() => { sh('umount', [mnt]); sh('rmmod', ['brd']); });
  const file = join(mnt, 'dirty.img');
  const data = randomBytes(128 * MiB);
  writeFileSync(file, data); // dirty in the page cache: no sync
  const { server, dev } = await startLoop(file);
  const r = sh('fio', ['--name=r', `--filename=${dev}`, '--rw=randread', '--bs=4k', '--iodepth=32', '--ioengine=io_uring', '--direct=1',
    '--time_based', '--runtime=3', '--rate_iops=4000', '--output-format=json']);
  t.equal(r.code, 0, `fio randread at a fixed rate finished (it hung before) ${r.err}`);
  const read = sh('python3', ['-c', `import os,sys,hashlib
fd=os.open(sys.argv[1],os.O_RDONLY|os.O_DIRECT); import mmap; b=mmap.mmap(-1,1<<20); h=hashlib.sha256()
while True:
  n=os.readv(fd,[b])
  if n<=0: break
  h.update(b[:n])
print(h.hexdigest())`, dev]);
  const { createHash } = await import('node:crypto');
  t.equal(read.out.trim(), createHash('sha256').update(data).digest('hex'), 'the whole device reads back as the bytes written to the file');
  const c = server.counters();
  t.ok(c.nowait_retries! > 0, `${c.nowait_retries} transfers would have blocked and were sent again unlinked`);
  t.equal(c.errors, 0, 'no request failed');
  await server.stop();
});

t.test('--spin-us: a loop device in the low-latency mode passes fio crc32c verify at QD 1 and 32, and its state keeps the mode', fullSuiteOnly(), (t) => {
  const file = sparse('spin.img', 64 * MiB);
  const id = addDevice('-t', 'loop', '-f', file, '--spin-us', '50');
  const dev = `/dev/ublkb${id}`;
  for (const qd of [1, 32]) {
    const r = sh('fio', ['--name=s', `--filename=${dev}`, '--rw=randwrite', '--bs=4k', `--iodepth=${qd}`, '--ioengine=io_uring', '--direct=1',
      '--size=16M', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json']);
    const j = JSON.parse(r.out.slice(r.out.indexOf('{'))) as { jobs: Array<{ error: number; read: { io_bytes: number } }> };
    t.ok(r.code === 0 && j.jobs[0]!.error === 0 && j.jobs[0]!.read.io_bytes === 16 * MiB, `QD ${qd}: 16 MiB written and verified (exit ${r.code}) ${r.err}`);
  }
  const st = JSON.parse(readFileSync(`/run/ublk/ublkb${id}.json`, 'utf8')) as { spinUs?: number };
  t.equal(st.spinUs, 50, 'the state file keeps --spin-us (recover and upgrade serve the device the same way)');
  t.equal(ublk('del', '-n', String(id)).code, 0, 'del');
  t.match(ublk('add', '-t', 'null', '--spin-us', 'x').stderr, /--spin-us/, 'a bad value is a usage error naming the option');
  rmSync(file);
  t.end();
});

t.test('FLUSH reaches the backing as fdatasync; O_DSYNC writes are FUA writes with RWF_DSYNC', async (t) => {
  const file = sparse('flush.img', 64 * MiB);
  const { server, dev } = await startLoop(file);
  const c0 = server.counters();
  // fio: 64 direct writes with an fsync(2) of the device after every 8; each fsync is a FLUSH.
  let r = sh('fio', ['--name=f', `--filename=${dev}`, '--rw=write', '--bs=4k', '--size=256k', '--direct=1', '--fsync=8', '--ioengine=psync', '--output-format=json']);
  t.equal(r.code, 0, `fio --fsync=8 ${r.err}`);
  const syncs = (JSON.parse(r.out.slice(r.out.indexOf('{'))) as { jobs: Array<{ sync: { total_ios: number } }> }).jobs[0]!.sync.total_ios;
  const c1 = server.counters();
  t.ok(syncs >= 7, `fio issued ${syncs} fsyncs`);
  t.ok(c1.fdatasync! - c0.fdatasync! >= syncs, `the backing saw ${c1.fdatasync! - c0.fdatasync!} fdatasync completions for them`);
  r = sh('fio', ['--name=d', `--filename=${dev}`, '--rw=write', '--bs=4k', '--size=128k', '--direct=1', '--sync=dsync', '--ioengine=psync', '--output-format=json']);
  t.equal(r.code, 0, `fio --sync=dsync ${r.err}`);
  const c2 = server.counters();
  t.ok(c2.dsync_writes! - c1.dsync_writes! >= 32, `32 O_DSYNC writes arrived as ${c2.dsync_writes! - c1.dsync_writes!} FUA writes`);
  t.equal(readFileSync(`/sys/block/ublkb${server.devId}/queue/write_cache`, 'utf8').trim(), 'write back', 'the device advertises a volatile write cache');
  t.equal(readFileSync(`/sys/block/ublkb${server.devId}/queue/fua`, 'utf8').trim(), '1', 'and FUA');
  await server.stop();
  rmSync(file);
});

/**
 * Edge cases run against a device: reads at and past the end, zero-length I/O, writes past the
 * end. The same script runs on the kernel's loop driver over an identical file; the outputs must
 * be the same.
 */
const EDGE = `import os,sys,mmap,json
dev=sys.argv[1]; out={}
def tryit(name, f):
  try: out[name]=f()
  except OSError as e: out[name]='errno '+str(e.errno)
size=int(open('/sys/class/block/'+os.path.basename(dev)+'/size').read())*512
out['size']=size
fd=os.open(dev,os.O_RDWR)
tryit('read_at_end', lambda: len(os.pread(fd,4096,size)))
tryit('read_past_end', lambda: len(os.pread(fd,4096,size+65536)))
tryit('read_across_end', lambda: len(os.pread(fd,4096,size-512)))
tryit('read_zero', lambda: len(os.pread(fd,0,4096)))
tryit('write_zero', lambda: os.pwrite(fd,b'',4096))
tryit('write_at_end', lambda: os.pwrite(fd,b'x'*512,size))
tryit('write_across_end', lambda: os.pwrite(fd,b'y'*4096,size-512))
os.fsync(fd)
tryit('last_sector_written', lambda: os.pread(fd,512,size-512)==b'y'*512)
os.close(fd)
d=os.open(dev,os.O_RDWR|os.O_DIRECT); buf=mmap.mmap(-1,65536)
tryit('direct_read_at_end', lambda: os.preadv(d,[buf],size))
tryit('direct_read_across_end', lambda: os.preadv(d,[buf],size-4096))
tryit('direct_misaligned', lambda: os.preadv(d,[memoryview(buf)[0:100]],0))
os.close(d)
print(json.dumps(out))`;

t.test('reads past the end and zero-length I/O behave as on the kernel loop driver', onKernel('newest'), (t) => {
  const size = 8 * MiB + 512 * 3; // not a multiple of 4096: the last page is partial
  const ours = sparse('edge-ublk.img', size);
  const theirs = sparse('edge-kloop.img', size);
  const id = addDevice('-t', 'loop', '-f', ours);
  sh('modprobe', ['-d', process.env.UBLK_VM_KROOT ?? '/', 'loop']);
  const lo = sh('losetup', ['--find', '--show', '--direct-io=on', theirs]);
  t.equal(lo.code, 0, `losetup ${lo.err}`);
  const kdev = lo.out.trim();
  const a = sh('python3', ['-c', EDGE, `/dev/ublkb${id}`]);
  const b = sh('python3', ['-c', EDGE, kdev]);
  t.equal(a.code, 0, a.err);
  t.equal(b.code, 0, b.err);
  const ra = JSON.parse(a.out) as Record<string, unknown>;
  const rb = JSON.parse(b.out) as Record<string, unknown>;
  t.equal(ra.size, size, 'the device is as large as the file (512-byte blocks)');
  t.same(ra, rb, `ublk loop ${a.out.trim()} matches kernel loop`);
  sh('losetup', ['-d', kdev]);
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.end();
});

t.test('add refuses bad backings with an error that names the fix, and creates nothing', onKernel('lts'), (t) => {
  const tiny = join(work, 'tiny.img');
  writeFileSync(tiny, 'x'.repeat(100));
  const ro = sparse('ro.img', MiB);
  chmodSync(ro, 0o444);
  // A file on a read-only mount: writable by its mode, but open(O_RDWR) fails with EROFS.
  const roDir = join(work, 'rodir');
  mkdirSync(roDir);
  const onRo = join(roDir, 'disk.img');
  sparse('rodir/disk.img', MiB);
  t.equal(sh('sh', ['-c', 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1"', 'sh', roDir]).code, 0, 'a read-only bind mount');
  t.teardown(() => sh('umount', [roDir]));
  const cases: Array<[string[], number, RegExp]> = [
    [['-t', 'loop'], 2, /loop needs a backing file: -f FILE/],
    [['-t', 'loop', '-f', join(work, 'nope.img')], 1, /nope\.img does not exist/],
    [['-t', 'loop', '-f', work], 1, /is a directory; -f takes a file or a block device/],
    [['-t', 'loop', '-f', tiny], 1, /smaller than one block \(100 bytes, block size 512\)/],
    [['-t', 'loop', '-f', ro], 1, /read-only \(mode 0444\): add --read-only/],
    [['-t', 'loop', '-f', onRo], 1, /cannot be opened for writing \(EROFS\): add --read-only/],
    [['-t', 'mem'], 2, /mem needs a size/],
    [['-t', 'mem', '-s', '100T'], 1, /more than this machine's memory/],
  ];
  for (const [args, code, re] of cases) {
    const r = ublk('add', ...args);
    t.equal(r.code, code, `add ${args.join(' ')}: exit ${code}`);
    t.match(r.stderr, re);
    t.equal(r.stderr.trim().split('\n').length, 1, 'one line');
  }
  t.same(ublkIds(), [], 'no device exists');
  const id = addDevice('-t', 'loop', '-f', ro, '--read-only');
  t.equal(readFileSync(`/sys/block/ublkb${id}/ro`, 'utf8').trim(), '1', 'with --read-only the read-only file serves a read-only disk');
  const w = sh('dd', ['if=/dev/zero', `of=/dev/ublkb${id}`, 'bs=4k', 'count=1', 'oflag=direct', 'status=none']);
  t.not(w.code, 0, `and writes are refused (${w.err.trim()})`);
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.end();
});

t.test('a backing error reaches the block layer: ENOSPC from a full file system, and the device lives on', onKernel('newest'), (t) => {
  const small = join(work, 'small');
  mkdirSync(small, { recursive: true });
  t.equal(sh('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', small]).code, 0, 'an 8 MiB tmpfs');
  t.teardown(() => sh('umount', [small]));
  const file = join(small, 'over.img');
  writeFileSync(file, '');
  truncateSync(file, 64 * MiB); // sparse: claims 64 MiB on an 8 MiB file system
  const id = addDevice('-t', 'loop', '-f', file);
  const dev = `/dev/ublkb${id}`;
  const w = sh('dd', ['if=/dev/urandom', `of=${dev}`, 'bs=1M', 'count=16', 'oflag=direct']);
  t.not(w.code, 0, 'dd fails');
  t.match(w.err, /No space left on device/, 'with ENOSPC, not a generic I/O error');
  const rd = sh('dd', [`if=${dev}`, 'of=/dev/null', 'bs=1M', 'count=4', 'iflag=direct', 'status=none']);
  t.equal(rd.code, 0, 'reads still work');
  t.equal(ublk('del', '-n', String(id)).code, 0, 'and del works');
  t.end();
});

t.test('a block device as backing (brd): size and sector size by ioctl, verify, read-only devices', fullSuiteOnly(), (t) => {
  const m = sh('modprobe', ['-d', process.env.UBLK_VM_KROOT ?? '/', 'brd', 'rd_nr=1', 'rd_size=65536']);
  t.equal(m.code, 0, `modprobe brd ${m.err}`);
  t.teardown(() => sh('rmmod', ['brd']));
  const id = addDevice('-t', 'loop', '-f', '/dev/ram0', '-q', '2');
  const list = JSON.parse(ublk('list', '--json').stdout) as Array<{ dev_id: number; dev_capacity: number; block_size: number }>;
  t.match(list.find((d) => d.dev_id === id), { dev_capacity: 131072, block_size: Number(readFileSync('/sys/block/ram0/queue/logical_block_size', 'utf8')) }, '64 MiB, the sector size of ram0');
  const r = fioVerify(`/dev/ublkb${id}`, { bs: '4k', engine: 'io_uring', jobs: 2, total: 64 * MiB });
  t.ok(r.code === 0 && r.error === 0 && r.verified === 64 * MiB, `fio verify over brd: ${r.verified / MiB} MiB, error ${r.error}`);
  const z = sh('blkdiscard', ['-f', '-z', `/dev/ublkb${id}`]);
  t.equal(z.code, 0, `write-zeroes over a block device (ZERO_RANGE on /dev/ram0) ${z.err}`);
  t.ok(readFileSync('/dev/ram0').every((x) => x === 0), 'ram0 reads as zeros');
  t.equal(ublk('del', '-n', String(id)).code, 0);
  t.equal(sh('blockdev', ['--setro', '/dev/ram0']).code, 0);
  const ro = ublk('add', '-t', 'loop', '-f', '/dev/ram0');
  t.equal(ro.code, 1);
  t.match(ro.stderr, /read-only|cannot be opened for writing/, `a read-only block device needs --read-only: ${ro.stderr.trim()}`);
  const rid = addDevice('-t', 'loop', '-f', '/dev/ram0', '--read-only');
  t.equal(readFileSync(`/sys/block/ublkb${rid}/ro`, 'utf8').trim(), '1');
  t.equal(ublk('del', '-n', String(rid)).code, 0);
  sh('blockdev', ['--setrw', '/dev/ram0']);
  t.end();
});

/** The io-wq workers (`iou-wrk-TID`) of process `pid` that serve a thread other than its main one. */
function queueWorkers(pid: number): string[] {
  const names = sh('sh', ['-c', `cat /proc/${pid}/task/*/comm`]).out.split('\n');
  // The main thread's control ring has a worker of its own (ublk_drv answers some control
  // commands only from a blocking context); the queue threads' rings are what this is about.
  return names.filter((n) => n.startsWith('iou-wrk-') && n !== `iou-wrk-${pid}`);
}

t.test('a tmpfs backing is opened O_NONBLOCK and served inline: no io-wq worker for O_DIRECT I/O', onKernel('lts'), (t) => {
  // Without O_NONBLOCK io_uring sends every READ/WRITE on tmpfs to an io-wq worker (shmem sets
  // no FMODE_NOWAIT); buffered writes it punts regardless, which shows the count works here.
  const file = sparse('inline.img', 64 * MiB);
  for (const buffered of [false, true]) {
    const id = addDevice('-t', 'loop', '-f', file, ...(buffered ? ['--buffered'] : []));
    const pid = (JSON.parse(readFileSync(`/run/ublk/ublkb${id}.json`, 'utf8')) as { pid: number }).pid;
    const fdinfo = sh('sh', ['-c', `for f in /proc/${pid}/fd/*; do [ "$(readlink $f)" = ${file} ] && cat /proc/${pid}/fdinfo/\${f##*/}; done`]).out;
    const flags = parseInt(/^flags:\s+(\d+)/m.exec(fdinfo)?.[1] ?? 'NaN', 8);
    t.equal(flags & 0o4000, 0o4000, `${buffered ? 'buffered' : 'O_DIRECT'}: the server's backing fd has O_NONBLOCK (flags 0${flags.toString(8)})`);
    const r = fio(`/dev/ublkb${id}`, 'randrw', { qd: 32, seconds: 2 });
    t.equal(r.error, 0, `${buffered ? 'buffered' : 'O_DIRECT'}: fio randrw: ${r.ios} I/Os`);
    const workers = queueWorkers(pid);
    if (buffered) t.ok(workers.length > 0, `buffered writes are punted to io-wq: ${workers.join(' ')}`);
    else t.same(workers, [], 'O_DIRECT reads and writes: the queue thread started no io-wq worker');
    ublk('del', '-n', String(id));
  }
  rmSync(file);
  t.end();
});

t.test('loop under load: del ends fio and releases the backing; kill -9 of the server, then del, too', async (t) => {
  const file = sparse('load.img', 128 * MiB);
  for (const how of ['del', 'kill -9'] as const) {
    const id = addDevice('-t', 'loop', '-f', file, '-q', '2');
    const pid = (JSON.parse(readFileSync(`/run/ublk/ublkb${id}.json`, 'utf8')) as { pid: number }).pid;
    const job = fioBackground(`/dev/ublkb${id}`, 'randrw', { qd: 64, seconds: 60, extra: ['--numjobs=2', '--group_reporting'] });
    await new Promise((r) => setTimeout(r, 2000));
    if (how === 'kill -9') process.kill(pid, 'SIGKILL');
    const d = ublk('del', '-n', String(id));
    t.equal(d.code, 0, `${how} under load: del ${d.stderr}`);
    const r = await Promise.race([job.done, new Promise<undefined>((res) => setTimeout(() => res(undefined), 60_000))]);
    t.ok(r && (r.code !== 0 || r.error !== 0), `${how}: fio ended with an error (exit ${r?.code}, error ${r?.error})`);
    t.notOk(exists(`/dev/ublkc${id}`), `${how}: the device is gone`);
    t.ok(await waitFor(() => !alive(pid), 10_000), `${how}: the server is gone`);
    const holders = sh('sh', ['-c', `ls -l /proc/[0-9]*/fd 2>/dev/null | grep -c ${file} || true`]).out.trim();
    t.equal(holders, '0', `${how}: no process holds the backing file open`);
  }
  rmSync(file);
});
