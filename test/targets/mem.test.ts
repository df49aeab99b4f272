/**
 * The mem target's request logic on the host (no ublk needed), through the same harness as the
 * loop tests. Under ublk_drv it runs in test/vm/loop.vm.ts.
 */
import t from 'tap';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { totalmem } from 'node:os';
import mem from '../../src/targets/mem.js';
import { MAX_VIEW_BYTES } from '../../src/libc/index.js';
import {
  UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_FLUSH, UBLK_IO_OP_DISCARD, UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_F_NOUNMAP,
} from '../../src/ublk/abi.js';
import { TargetHarness } from '../helpers/target-harness.js';

const GiB = 2 ** 30;
const MiB = 2 ** 20;

/** Resident kB of the mapping at `address` (from /proc/self/smaps). */
function residentKb(address: number): number {
  const smaps = readFileSync('/proc/self/smaps', 'utf8');
  const start = smaps.indexOf(`${address.toString(16)}-`);
  if (start < 0) throw new Error('mapping not found');
  return Number(/\nRss:\s+(\d+) kB/.exec(smaps.slice(start))![1]);
}

t.test('options and limits', (t) => {
  t.throws(() => mem.parseArgs([]), /mem needs a size: -s SIZE/);
  t.throws(() => mem.parseArgs(['-s', '1G', '--block-size', '8192']), /--block-size must be 512, 1024, 2048 or 4096/);
  t.equal(mem.parseArgs(['-s', '1G', '--block-size', '1024']).blockSize, 1024);
  t.throws(() => mem.parseArgs(['-s', '1000']), /multiple of 4096/, 'a usage error, before anything is mapped');
  t.throws(() => mem.parseArgs(['-s', '1G', '-s', '2G']), /-s given twice/);
  const tooBig = Math.ceil((totalmem() + GiB) / GiB);
  t.throws(() => mem.prepare(mem.parseArgs(['-s', `${tooBig}G`])), /more than this machine's memory .*: choose a smaller -s/);
  t.end();
});

t.test('a 2 GiB disk: data round-trips, also across the 1 GiB view boundary; memory is taken as written', (t) => {
  const spec = mem.prepare(mem.parseArgs(['-s', '2G']));
  t.match(spec, { sizeBytes: 2 * GiB, logicalBlockSize: 512, physicalBlockSize: 4096, discard: { granularity: 4096 } });
  const dev = spec.queueData as { address: number };
  t.ok(residentKb(dev.address) < 1024, 'nothing resident before the first write (MAP_NORESERVE, lazy)');
  const h = new TargetHarness(mem, {}, spec.queueData, { depth: 4, maxIoBytes: MiB });
  const spots: Array<[number, number]> = [[0, 4096], [MAX_VIEW_BYTES - 2048, 8192], [2 * GiB - MiB, MiB], [12345 * 512, 512]];
  const data = spots.map(([, len]) => randomBytes(len));
  spots.forEach(([off, len], i) => {
    data[i]!.copy(h.buffer(0));
    t.equal(h.run(0, UBLK_IO_OP_WRITE, off, len), len, `write ${len} at ${off}`);
  });
  spots.forEach(([off, len], i) => {
    h.buffer(1).fill(0x55);
    t.equal(h.run(1, UBLK_IO_OP_READ, off, len), len);
    t.ok(h.buffer(1, len).equals(data[i]!), `read back ${len} at ${off}${off === MAX_VIEW_BYTES - 2048 ? ' (across the boundary)' : ''}`);
  });
  t.equal(h.run(2, UBLK_IO_OP_FLUSH, 0, 0), 0, 'FLUSH: 0');

  // 8 MiB written, then discarded: the pages go back and read as zeros; the edges are zeroed.
  const big = randomBytes(MiB);
  for (let i = 0; i < 8; i++) {
    big.copy(h.buffer(0));
    h.run(0, UBLK_IO_OP_WRITE, 64 * MiB + i * MiB, MiB);
  }
  const before = residentKb(dev.address);
  t.equal(h.run(3, UBLK_IO_OP_DISCARD, 64 * MiB + 512, 8 * MiB - 1024), 0, 'DISCARD: 0');
  const after = residentKb(dev.address);
  t.ok(before - after >= 8 * 1024 - 8, `the discarded pages were freed (${before} -> ${after} kB resident)`);
  h.run(1, UBLK_IO_OP_READ, 64 * MiB, MiB);
  t.ok(h.buffer(1, 512).equals(big.subarray(0, 512)), 'the 512 bytes before the discard are kept');
  t.ok(h.buffer(1, MiB).subarray(512).every((x) => x === 0), 'the discarded range reads as zeros');

  big.copy(h.buffer(0));
  h.run(0, UBLK_IO_OP_WRITE, 100 * MiB, MiB);
  t.equal(h.run(3, UBLK_IO_OP_WRITE_ZEROES, 100 * MiB + 4096, 8192, UBLK_IO_F_NOUNMAP), 0, 'WRITE_ZEROES NOUNMAP: 0');
  t.equal(h.run(3, UBLK_IO_OP_WRITE_ZEROES, 100 * MiB + 65536, 65536), 0, 'WRITE_ZEROES: 0');
  h.run(1, UBLK_IO_OP_READ, 100 * MiB, MiB);
  const back = h.buffer(1, MiB);
  t.ok(back.subarray(4096, 12288).every((x) => x === 0) && back.subarray(65536, 131072).every((x) => x === 0), 'both ranges read as zeros');
  t.ok(back.subarray(0, 4096).equals(big.subarray(0, 4096)) && back.subarray(131072).equals(big.subarray(131072)), 'around them the data stays');
  t.equal(h.run(3, 4 /* WRITE_SAME */, 0, 512), -95, 'an op mem does not do: EOPNOTSUPP');
  h.close();
  spec.release!();
  t.throws(() => residentKb(dev.address), /mapping not found/, 'release unmapped the disk');
  t.end();
});

t.test('with recovery the disk is a file in the shm directory: it outlives the server that mapped it', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ublk-shm-'));
  process.env.UBLK_SHM_DIR = dir;
  t.teardown(() => {
    delete process.env.UBLK_SHM_DIR;
    rmSync(dir, { recursive: true, force: true });
  });
  const o = mem.persist!(mem.parseArgs(['-s', '64M']), 'test-1');
  t.equal(o.shmFile, join(dir, 'ublk-mem-test-1'), 'persist names a file, unique to the device');
  t.notOk(existsSync(o.shmFile!), 'persist has no side effects');
  const first = mem.prepare(o);
  t.equal(statSync(o.shmFile!).size, 64 * MiB, 'prepare created it at the disk size');
  let h = new TargetHarness(mem, o, first.queueData, { depth: 2, maxIoBytes: MiB });
  const data = randomBytes(MiB);
  data.copy(h.buffer(0));
  t.equal(h.run(0, UBLK_IO_OP_WRITE, 8 * MiB, MiB), MiB);
  h.close();
  first.release!(); // the server is gone

  const again = mem.prepare(o); // a recovering server
  h = new TargetHarness(mem, o, again.queueData, { depth: 2, maxIoBytes: MiB });
  t.equal(h.run(1, UBLK_IO_OP_READ, 8 * MiB, MiB), MiB);
  t.ok(h.buffer(1, MiB).equals(data), 'the next server reads what the first one wrote');
  const blocksBefore = statSync(o.shmFile!).blocks;
  t.equal(h.run(0, UBLK_IO_OP_DISCARD, 8 * MiB, MiB), 0);
  t.ok(statSync(o.shmFile!).blocks <= blocksBefore - (MiB / 512) + 8, 'a discard punched the pages out of the file (MADV_REMOVE)');
  h.run(1, UBLK_IO_OP_READ, 8 * MiB, MiB);
  t.ok(h.buffer(1, MiB).every((x) => x === 0), 'and they read as zeros');
  h.close();
  again.release!();

  t.throws(() => mem.prepare({ ...o, sizeBytes: 128 * MiB }), /holds 67108864 bytes, not the 134217728 of this disk/, 'a file of another size is not this disk');
  mem.destroy!(o);
  t.notOk(existsSync(o.shmFile!), 'destroy removed the file');
  mem.destroy!(o);
  t.pass('destroy twice is harmless');
  t.end();
});
