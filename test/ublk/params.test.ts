/**
 * The host-side rules of the ublk layer: descriptor offsets, user-copy offsets, the parameters
 * a device spec turns into, and the feature table.
 */
import t from 'tap';
import { descOffset, descLength, userCopyOffset, UBLK_FEATURES, UBLK_ATTR_VOLATILE_CACHE, UBLK_PARAM_TYPE_DISCARD, UBLK_PARAM_TYPE_BASIC } from '../../src/ublk/abi.js';
import { paramsFor } from '../../src/ublk/server.js';
import { featureSince } from '../../src/ublk/control.js';

t.test('descriptor arrays use the fixed 4096-tag stride per queue, whatever the depth', (t) => {
  t.equal(descOffset(0), 0);
  t.equal(descOffset(1), 98304, 'round_up(4096 * 24, 4096)');
  t.equal(descOffset(3), 3 * 98304);
  t.equal(descLength(64), 4096, '64 * 24 bytes round up to one page');
  t.equal(descLength(128), 4096);
  t.equal(descLength(4096), 98304);
  t.end();
});

t.test('user-copy offsets: 0x80000000 + qid << 41 + tag << 25 + offset', (t) => {
  t.equal(userCopyOffset(0, 0, 0), 0x80000000);
  t.equal(userCopyOffset(0, 1, 512), 0x80000000 + 2 ** 25 + 512);
  t.equal(userCopyOffset(2, 3, 4096), 0x80000000 + 2 * 2 ** 41 + 3 * 2 ** 25 + 4096);
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
  t.throws(() => paramsFor({ sizeBytes: 1000 }, 4096), /multiple of the block size/);
  t.throws(() => paramsFor({ sizeBytes: 12288, logicalBlockSize: 3072 }, 4096), /power of two/);
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
