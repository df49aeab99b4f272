/**
 * The null target: reads complete without touching the data (like null_blk without memory
 * backing), writes are discarded. It measures the ublk round trip and nothing else.
 */
import { defineTarget } from '../ublk/target.js';
import { UBLK_IO_OP_READ, UBLK_IO_OP_WRITE } from '../ublk/abi.js';
import { parseSize, UsageError } from './options.js';

export interface NullOptions {
  sizeBytes: number;
  blockSize: number;
}

export default defineTarget<NullOptions>({
  name: 'null',
  usage: '  -s, --size SIZE        device size (default 250G)\n  --block-size 512|4096  logical block size (default 512)\n',
  parseArgs(argv) {
    const o: NullOptions = { sizeBytes: 250 * 2 ** 30, blockSize: 512 };
    for (let i = 0; i < argv.length; i++) {
      const a = argv[i]!;
      if (a === '-s' || a === '--size') o.sizeBytes = parseSize(argv[++i], a);
      else if (a === '--block-size') o.blockSize = parseSize(argv[++i], a);
      else throw new UsageError(`null: unknown option ${a}`);
    }
    return o;
  },
  prepare(o) {
    return { sizeBytes: o.sizeBytes, logicalBlockSize: o.blockSize, describe: { size: o.sizeBytes } };
  },
  openQueue() {
    return {
      // Everything succeeds at once: READ/WRITE report their full length, the rest 0.
      handle: (req) => (req.op === UBLK_IO_OP_READ || req.op === UBLK_IO_OP_WRITE ? req.length : 0),
    };
  },
});
