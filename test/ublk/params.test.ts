/**
 * The host-side rules of the ublk layer: descriptor offsets, user-copy offsets, the control
 * payloads (dev_info, params) byte by byte, the parameters a device spec turns into, the checks
 * that refuse a device shape before any device exists, and the feature table.
 */
import t from 'tap';
import {
  descOffset, descLength, userCopyOffset, UBLK_FEATURES, UBLK_ATTR_VOLATILE_CACHE, UBLK_PARAM_TYPE_DISCARD,
  UBLK_PARAM_TYPE_BASIC, ublksrv_ctrl_dev_info, ublk_params, ublk_param_basic, ublk_param_discard,
} from '../../src/ublk/abi.js';
import { paramsFor, specProblem, writeDevInfo, readDevInfo, writeParams, readParams, prepareParamsRead } from '../../src/ublk/params.js';
import { featureSince } from '../../src/ublk/control.js';
import { PAGE_SIZE } from '../../src/libc/index.js';

t.test('descriptor arrays use the fixed 4096-tag stride per queue, whatever the depth, in the real page size', (t) => {
  t.equal(descOffset(0, 4096), 0);
  t.equal(descOffset(1, 4096), 98304, 'round_up(4096 * 24, 4096)');
  t.equal(descOffset(3, 4096), 3 * 98304);
  t.equal(descLength(64, 4096), 4096, '64 * 24 bytes round up to one page');
  t.equal(descLength(128, 4096), 4096);
  t.equal(descLength(4096, 4096), 98304);
  // A 64 KiB-page kernel (arm64, ppc64): the stride and the length round up to its pages.
  t.equal(descOffset(1, 65536), 131072, 'round_up(4096 * 24, 65536)');
  t.equal(descLength(128, 65536), 65536);
  // No default: a forgotten page size must not silently mean 4 KiB.
  const noPage = descOffset as unknown as (qid: number) => number;
  t.throws(() => noPage(1), /page size must be the kernel's/);
  t.throws(() => descLength(128, 3000), /page size/);
  t.equal(PAGE_SIZE % 4096, 0, `this machine's page size (${PAGE_SIZE}) is what the queues pass`);
  t.end();
});

t.test('user-copy offsets: 0x80000000 + qid << 41 + tag << 25 + offset', (t) => {
  t.equal(userCopyOffset(0, 0, 0), 0x80000000);
  t.equal(userCopyOffset(0, 1, 512), 0x80000000 + 2 ** 25 + 512);
  t.equal(userCopyOffset(2, 3, 4096), 0x80000000 + 2 * 2 ** 41 + 3 * 2 ** 25 + 4096);
  t.end();
});

t.test('dev_info is written and read field by field at the header offsets', (t) => {
  const buf = new ArrayBuffer(256);
  const v = new DataView(buf);
  new Uint8Array(buf).fill(0xee); // stale bytes must be cleared
  writeDevInfo(v, 64, { nrHwQueues: 3, queueDepth: 77, maxIoBufBytes: 1 << 20, devId: 0xffffffff, ublksrvPid: 4242, flags: 2 ** 40 + 6, ublksrvFlags: 9 });
  const at = (off: number, n: number) => [...new Uint8Array(buf, 64 + off, n)];
  t.same(at(ublksrv_ctrl_dev_info.nr_hw_queues, 2), [3, 0]);
  t.same(at(ublksrv_ctrl_dev_info.queue_depth, 2), [77, 0]);
  t.same(at(ublksrv_ctrl_dev_info.state, 2), [0, 0], 'state cleared');
  t.same(at(ublksrv_ctrl_dev_info.max_io_buf_bytes, 4), [0, 0, 0x10, 0]);
  t.same(at(ublksrv_ctrl_dev_info.dev_id, 4), [0xff, 0xff, 0xff, 0xff]);
  t.same(at(ublksrv_ctrl_dev_info.ublksrv_pid, 4), [0x92, 0x10, 0, 0]);
  t.same(at(ublksrv_ctrl_dev_info.flags, 8), [6, 0, 0, 0, 0, 1, 0, 0], 'a u64 above 2^32');
  t.same(at(ublksrv_ctrl_dev_info.reserved2, 8), [0, 0, 0, 0, 0, 0, 0, 0], 'reserved zero');
  t.same(new Uint8Array(buf, 0, 64).every((b) => b === 0xee), true, 'nothing before base touched');
  t.same(new Uint8Array(buf, 128).every((b) => b === 0xee), true, 'nothing after the 64 bytes touched');
  const back = readDevInfo(v, 64);
  t.match(back, { nrHwQueues: 3, queueDepth: 77, maxIoBufBytes: 1 << 20, devId: 0xffffffff, ublksrvPid: 4242, flags: 2 ** 40 + 6, ublksrvFlags: 9 });
  t.end();
});

t.test('params: len = our struct size, every field at its offset, and back', (t) => {
  const buf = new ArrayBuffer(ublk_params.SIZE + 16);
  const v = new DataView(buf);
  new Uint8Array(buf).fill(0xee);
  const p = paramsFor({ sizeBytes: 2 ** 40, logicalBlockSize: 4096, readOnly: false, volatileCache: true, fua: true,
    discard: { granularity: 4096, maxBytes: 2 ** 30, maxWriteZeroesBytes: 2 ** 20 } }, 1 << 20);
  writeParams(v, p);
  t.equal(v.getUint32(ublk_params.len, true), ublk_params.SIZE);
  t.equal(v.getUint32(ublk_params.types, true), UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD);
  const b = ublk_params.basic;
  t.equal(v.getUint8(b + ublk_param_basic.logical_bs_shift), 12);
  t.equal(v.getUint32(b + ublk_param_basic.max_sectors, true), 2048);
  t.equal(v.getBigUint64(b + ublk_param_basic.dev_sectors, true), 2n ** 31n);
  t.equal(v.getUint32(ublk_params.discard + ublk_param_discard.max_discard_sectors, true), 2 ** 21);
  t.equal(v.getUint16(ublk_params.discard + ublk_param_discard.max_discard_segments, true), 1);
  t.equal(v.getUint32(ublk_params.devt, true), 0, 'blocks we do not send are zero');
  t.same([...new Uint8Array(buf, ublk_params.SIZE)], new Array(16).fill(0xee), 'nothing past the struct touched');
  const back = readParams(v);
  t.same(back.basic, p.basic);
  t.same(back.discard, p.discard);
  prepareParamsRead(v);
  t.equal(v.getUint32(ublk_params.len, true), ublk_params.SIZE, 'GET_PARAMS asks for our size');
  t.equal(v.getUint32(ublk_params.types, true), 0);
  t.end();
});

t.test('a device spec becomes SET_PARAMS in 512-byte sectors', (t) => {
  const p = paramsFor({ sizeBytes: 2 ** 30, logicalBlockSize: 4096, volatileCache: true, discard: { granularity: 4096, maxBytes: 2 ** 40, maxWriteZeroesBytes: 2 ** 20 } }, 512 * 1024);
  t.equal(p.types, UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD);
  t.equal(p.basic!.devSectors, 2 ** 21, 'sectors are 512 bytes even on a 4Kn device');
  t.equal(p.basic!.logicalBsShift, 12);
  t.equal(p.basic!.maxSectors, 1024);
  t.equal(p.basic!.attrs, UBLK_ATTR_VOLATILE_CACHE);
  t.equal(p.discard!.maxDiscardSectors, 0xffffffff >>> 9, 'capped so pre-6.11 kernels cannot truncate it');
  t.equal(p.discard!.maxWriteZeroesSectors, 2048);
  t.end();
});

t.test('shapes the kernel would refuse after ADD_DEV are refused before, with the reason', (t) => {
  t.equal(specProblem({ sizeBytes: 2 ** 30 }, 512 * 1024), undefined, 'a plain 1 GiB disk is fine');
  const limited = { sizeBytes: 2 ** 30, queueLimit: { max: 1, reason: 'one thread holds the cache' } };
  t.equal(specProblem(limited, 512 * 1024, 1), undefined, 'a queue limit met');
  t.equal(specProblem(limited, 512 * 1024, 2), 'one thread holds the cache: it can serve at most 1 queue(s); use -q 1', 'a queue limit exceeded names the reason and the -q that works');
  t.match(specProblem({ sizeBytes: 1000 }, 4096), /multiple of the logical block size 512, got 1000/);
  t.match(specProblem({ sizeBytes: 1 }, 4096), /multiple of the logical block size/);
  t.match(specProblem({ sizeBytes: 0 }, 4096), /positive multiple/);
  t.match(specProblem({ sizeBytes: 12288, logicalBlockSize: 3072 }, 4096), /power of two/);
  t.match(specProblem({ sizeBytes: 12288, logicalBlockSize: 3 }, 4096), /power of two from 512/);
  // ublk_drv: logical_bs_shift > PAGE_SHIFT is EINVAL.
  t.match(specProblem({ sizeBytes: 2 ** 20, logicalBlockSize: PAGE_SIZE * 2 }, 4096), new RegExp(`from 512 to ${PAGE_SIZE}`));
  t.match(specProblem({ sizeBytes: 2 ** 20, logicalBlockSize: 4096, physicalBlockSize: 512 }, 4096), /physical block size/);
  t.match(specProblem({ sizeBytes: 2 ** 20 }, 3000), /power of two from 4096 to 33554432/);
  t.match(specProblem({ sizeBytes: 2 ** 20 }, 64 * 2 ** 20), /largest request/);
  t.throws(() => paramsFor({ sizeBytes: 1000 }, 4096), /multiple of the logical block size/);
  t.end();
});

t.test('every feature bit has a name and a kernel version', (t) => {
  for (let bit = 0; bit <= 19; bit++) {
    const f = UBLK_FEATURES.find((x) => x.bit === bit);
    t.ok(f && /^UBLK_F_[A-Z_]+$/.test(f.name) && /^\d+\.\d+/.test(f.since), `bit ${bit}: ${f?.name} (${f?.since})`);
  }
  t.equal(featureSince(2 ** 7), 'UBLK_F_USER_COPY (Linux 6.5)');
  t.end();
});
