/**
 * The qcow2 target: a disk served from a qcow2 image (v2 or v3, as `qemu-img create -f qcow2`
 * makes them), with its backing chain read-only underneath.
 *
 *   ublk add -t qcow2 -f IMAGE [--read-only]
 *
 * The format is in qcow2-image.ts (header, L1/L2 tables, refcounts, allocation, compressed
 * clusters, the backing chain, what is refused and why, and the order in which metadata reaches
 * the file so that a crash leaves an image `qemu-img check` calls free of corruption). This file
 * is the glue: options, the device's shape, and the handlers.
 *
 * One queue (`-q 1`): the L2 and refcount caches and the allocator live in the queue thread's
 * heap, and two threads allocating clusters would need a lock around all of them. The handlers
 * make synchronous file calls (pread, pwrite, fdatasync) and answer at once, so a request costs
 * no event-loop turn; the queue thread blocks in them, as loop's buffered mode would.
 *
 * The device: the image's virtual size; 512-byte logical blocks, as QEMU presents a qcow2 disk
 * to a guest by default, so partition tables and file systems written by a VM read back at the
 * sectors they were written to (a 4096-byte logical block would move a GPT from byte 512 to
 * 4096), and 4096-byte physical blocks when the cluster allows, so file systems made here write
 * whole 4 KiB blocks; a volatile write cache with FUA, because a cluster allocated by a write becomes
 * reachable on disk only at the next FLUSH (the metadata is written then, in order); DISCARD and
 * WRITE_ZEROES in whole clusters (see Qcow2Image.discard / writeZeroes). `--read-only` opens
 * the image O_RDONLY and makes a read-only disk; an image with internal snapshots can only be
 * served that way.
 *
 * After `kill -9` of the server the image holds every write that completed before the last
 * FLUSH, and the clusters allocated since then are leaked (`qemu-img check` reports them as
 * leaks, `-r leaks` reclaims them): the same as a power cut for what runs on top, with user
 * recovery or without.
 */
import { resolve } from 'node:path';
import { defineAsyncTarget, type AsyncHandlers, type AsyncQueueInfo } from '../ublk/async-target.js';
import { type DeviceSpec } from '../ublk/target.js';
import { parseOptions, UsageError } from './options.js';
import { Qcow2Image } from './qcow2-image.js';

export interface Qcow2Options {
  /** The image, absolute. */
  file: string;
  readOnly: boolean;
}

interface Qcow2Device {
  file: string;
  readOnly: boolean;
}

const COUNTERS = ['allocated_clusters', 'new_l2_tables', 'cow_reads', 'compressed_reads', 'backing_reads', 'flushes', 'syncs', 'freed_clusters'] as const;

/** The device shape for an image (exported for the tests). */
export function qcow2Shape(img: Qcow2Image, readOnly: boolean): DeviceSpec {
  const lbs = 512;
  const granularity = Math.max(img.clusterSize, lbs);
  return {
    sizeBytes: img.size,
    logicalBlockSize: lbs,
    physicalBlockSize: Math.min(4096, Math.max(lbs, img.clusterSize)),
    rotational: false,
    readOnly,
    volatileCache: !readOnly,
    fua: !readOnly,
    ...(readOnly ? {} : { discard: { granularity, maxBytes: 64 * 2 ** 20, maxWriteZeroesBytes: 64 * 2 ** 20 } }),
  };
}

export default defineAsyncTarget<Qcow2Options>({
  name: 'qcow2',
  usage: [
    '  -f, --file IMAGE      the qcow2 image (v2 or v3; its backing chain, qcow2 or raw, is read-only)',
    '  --read-only           serve it read-only (the image is opened O_RDONLY)',
    '  (add it with -q 1, the default: the image\'s caches and allocator live in one queue)',
    '',
  ].join('\n'),
  counters: COUNTERS,

  parseArgs(argv) {
    const { values } = parseOptions('qcow2', argv, [
      { key: 'file', names: ['-f', '--file'], kind: 'string' },
      { key: 'readOnly', names: ['--read-only'], kind: 'flag' },
    ]);
    if (values.file === undefined) throw new UsageError('qcow2 needs an image: -f IMAGE (qemu-img create -f qcow2 IMAGE SIZE makes one)');
    return { file: resolve(values.file as string), readOnly: values.readOnly === true };
  },

  prepare(o) {
    // Opened once here, so that a refused image fails `add` before any device exists; the queue
    // opens it again in its own thread.
    const img = Qcow2Image.open(o.file, { readOnly: o.readOnly });
    try {
      const device: Qcow2Device = { file: o.file, readOnly: o.readOnly };
      return {
        ...qcow2Shape(img, o.readOnly),
        describe: { file: o.file, ...img.describe() },
        queueData: device,
        // -q 2 is refused by `add` before the device exists; open() refuses it too, for servers
        // started some other way.
        queueLimit: { max: 1, reason: 'the image\'s caches and cluster allocator live in one queue\'s thread' },
      };
    } finally {
      img.abandon(); // nothing was written
    }
  },

  open(_o, queue) {
    if (queue.qid > 0) {
      throw new Error(`qcow2: the qcow2 target serves one queue (-q 1): the image's caches and cluster allocator live in one queue's thread, and this is queue ${queue.qid}`);
    }
    return new Qcow2Queue(queue);
  },
});

/** The one queue's handlers: the image's own calls, answered at once. */
class Qcow2Queue implements AsyncHandlers {
  private readonly img: Qcow2Image;

  constructor(private readonly queue: AsyncQueueInfo) {
    const d = queue.device as Qcow2Device;
    this.img = Qcow2Image.open(d.file, { readOnly: d.readOnly });
    const chain = this.img.chain.map((c) => `${c.file} (${c.format})`).join(' over ');
    queue.log(`qcow2: serving ${chain}: v${this.img.header.version}, ${this.img.clusterSize}-byte clusters, ${this.img.size} bytes${d.readOnly ? ', read-only' : ''}`);
  }

  read(offset: number, buf: Buffer): void {
    this.img.read(offset, buf);
    this.count();
  }

  write(offset: number, buf: Buffer, fua: boolean): void {
    this.img.write(offset, buf, fua);
    this.count();
  }

  flush(): void {
    this.img.flush();
    this.count();
  }

  discard(offset: number, length: number): void {
    this.img.discard(offset, length);
    this.count();
  }

  writeZeroes(offset: number, length: number, noUnmap: boolean): void {
    this.img.writeZeroes(offset, length, noUnmap);
    this.count();
  }

  close(): void {
    this.img.close();
  }

  private count(): void {
    const s = this.img.stats;
    const c = this.queue.counters;
    const v = [s.allocatedClusters, s.newL2Tables, s.cowReads, s.compressedReads, s.backingReads, s.flushes, s.syncs, s.freedClusters];
    for (let i = 0; i < v.length && i < c.length; i++) c[i] = v[i]!;
  }
}
