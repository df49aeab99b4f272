/**
 * The null target: reads complete without touching the data (like null_blk without memory
 * backing), writes are discarded. It measures the ublk round trip and nothing else.
 */
import { defineTarget } from '../ublk/target.js';
import { UBLK_IO_OP_READ, UBLK_IO_OP_WRITE } from '../ublk/abi.js';
import { PAGE_SIZE } from '../libc/index.js';
import { blockSizeChoices, parseOptions, UsageError } from './options.js';

export interface NullOptions {
  sizeBytes: number;
  blockSize: number;
}

export default defineTarget<NullOptions>({
  name: 'null',
  usage: '  -s, --size SIZE        device size (default 250G)\n  --block-size 512|4096  logical block size (default 512)\n',
  parseArgs(argv) {
    const { values } = parseOptions('null', argv, [
      { key: 'size', names: ['-s', '--size'], kind: 'size' },
      { key: 'blockSize', names: ['--block-size'], kind: 'size', choices: blockSizeChoices(PAGE_SIZE) },
    ]);
    const o: NullOptions = { sizeBytes: (values.size as number | undefined) ?? 250 * 2 ** 30, blockSize: (values.blockSize as number | undefined) ?? 512 };
    if (o.sizeBytes % o.blockSize !== 0) {
      throw new UsageError(`null: the size must be a multiple of the block size ${o.blockSize}, got ${o.sizeBytes}`);
    }
    return o;
  },
  resize(o, sizeBytes) {
    return { ...o, sizeBytes };
  },

  prepare(o) {
    return { sizeBytes: o.sizeBytes, logicalBlockSize: o.blockSize, describe: { size: o.sizeBytes, block_size: o.blockSize } };
  },
  openQueue() {
    return {
      // Everything succeeds at once: READ/WRITE report their full length, the rest 0.
      handle: (req) => (req.op === UBLK_IO_OP_READ || req.op === UBLK_IO_OP_WRITE ? req.length : 0),
    };
  },
});
