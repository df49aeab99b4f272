/**
 * The overlay target: a copy-on-write disk over a read-only base.
 *
 *   ublk add -t overlay --base FILE --overlay FILE [--create]
 *
 * Reads come from the overlay file for the 4 KiB blocks that were written, and from the base for
 * the others; writes go to the overlay only. The base (a file or block device) is opened
 * O_RDONLY and never written. The overlay is a sparse file the size of the device (the base's
 * size rounded up to 4 KiB; a base whose size is not a multiple of 4096 reads as zeros past its
 * end), with its allocation map in a sidecar file `<overlay>.map`:
 *
 *   header, 32 bytes (little-endian):  'UBLKOVL1', u32 version (1), u32 block size (4096),
 *                                      u64 the base's size in bytes, u64 blocks in the device
 *   then the map: 1 bit per block, block i is bit (i % 8) of byte (i / 8), ceil(blocks / 8) bytes
 *
 * A set bit means "this block's data is in the overlay". Bits are only ever set (WRITE,
 * WRITE_ZEROES and DISCARD all set them), never cleared.
 *
 * Every queue runs in its own thread, so the map lives in a SharedArrayBuffer that `prepare`
 * makes (loaded from the .map file) and hands to the queues in `queueData`; bits are set with
 * Atomics.or. Alongside it: one dirty flag per 4 KiB page of the map (set after the bits), the
 * bits known to be in the .map file (a write whose bits are set but not yet there marks their
 * page dirty again, in case the thread that set them has not marked it yet), and a lock that
 * makes map writes from different queues take turns.
 *
 * Crash ordering: a block's data is written to the overlay before its bit is set in memory. On
 * FLUSH, on a FUA write and when a queue closes, the map pages that changed are copied (clearing
 * their dirty flags first), then the overlay is fdatasynced, then the copied pages are written to
 * the .map file and it is fdatasynced. Every bit in a copy was set after its block's data was
 * written, and that data is durable before the copy reaches the file: a bit on disk never points
 * at data that was not durable. A torn write of a map page mixes old and new bytes of a page
 * whose bits only grow, so it too only names durable blocks. The lock keeps an older copy of a
 * page from landing after a newer one. The device advertises a volatile cache and FUA.
 *
 * DISCARD and WRITE_ZEROES write zeros to the overlay and set the bits: the blocks read as zeros,
 * never as the base's data again.
 *
 * The bits set since the last FLUSH live only in memory: a server that dies (kill -9, then
 * `ublk recover` with -r 1) loses them as a power cut would, and those blocks read as the base's
 * again, although the kernel lost no power. File systems FLUSH what they need to keep; anything
 * else on top of an overlay should too.
 *
 * `--create` makes an empty overlay and map where neither exists; without it a missing overlay is
 * an error naming --create. An overlay or map whose recorded base size differs from the base's
 * is refused: it was made over another base.
 */
import { closeSync, constants as fsc, fdatasyncSync, fstatSync, ftruncateSync, fsyncSync, openSync, existsSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { defineAsyncTarget, type AsyncHandlers } from '../ublk/async-target.js';
import { TargetError, type DeviceSpec } from '../ublk/target.js';
import { checkRange, LAYER_BLOCK, LAYER_SHAPE, openSized, readFull, readFullOrZeros, writeFull, writeZeros } from './layer-io.js';
import { parseOptions, UsageError } from './options.js';

export const MAP_MAGIC = 'UBLKOVL1';
export const MAP_VERSION = 1;
export const MAP_HEADER_BYTES = 32;
/** Bytes of map per dirty flag: a map page written as one. */
export const MAP_PAGE = 4096;

export interface OverlayOptions {
  /** The read-only base, absolute. */
  base: string;
  /** The overlay file, absolute (its map is `<overlay>.map`). */
  overlay: string;
  /** Make the overlay and its map if neither exists. */
  create: boolean;
}

/** What every queue gets (DeviceSpec.queueData). The fds are the server's: threads share them. */
export interface OverlayDevice {
  baseFd: number;
  overlayFd: number;
  mapFd: number;
  /** The base's size in bytes (reads past it are zeros). */
  baseSize: number;
  sizeBytes: number;
  blocks: number;
  /** The map: bit i of byte i/8 is block i (see the top of the file). */
  bitmap: SharedArrayBuffer;
  /** The bits known to be in the .map file on disk (a subset of `bitmap`). */
  persisted: SharedArrayBuffer;
  /** Int32 per MAP_PAGE bytes of the map: 1 if the page has bits not yet written out. */
  dirty: SharedArrayBuffer;
  /** Int32[1]: 0 free, 1 taken (map writes take turns). */
  lock: SharedArrayBuffer;
}

/** The .map file of an overlay. */
export function mapPath(overlay: string): string {
  return `${overlay}.map`;
}

/** The bytes of the map of a device of `blocks` blocks (without the header). */
export function mapBytes(blocks: number): number {
  return Math.ceil(blocks / 8);
}

/** A map file's header for a base of `baseSize` bytes. */
export function mapHeader(baseSize: number): Buffer {
  const h = Buffer.alloc(MAP_HEADER_BYTES);
  h.write(MAP_MAGIC, 0, 'latin1');
  h.writeUInt32LE(MAP_VERSION, 8);
  h.writeUInt32LE(LAYER_BLOCK, 12);
  h.writeBigUInt64LE(BigInt(baseSize), 16);
  h.writeBigUInt64LE(BigInt(blocksOf(baseSize)), 24);
  return h;
}

function blocksOf(baseSize: number): number {
  return Math.ceil(baseSize / LAYER_BLOCK);
}

export interface OverlayMap {
  baseSize: number;
  blocks: number;
  /** The map bytes (bit i of byte i/8 is block i). */
  bits: Buffer;
}

/**
 * Reads and checks the map file `path` (its header and its length). Throws a TargetError naming
 * the file and what is wrong with it.
 */
export function readMap(path: string): OverlayMap {
  let fd: number;
  try {
    fd = openSync(path, fsc.O_RDONLY);
  } catch (e) {
    throw new TargetError(`overlay: cannot open the map ${path}: ${(e as Error).message}`);
  }
  try {
    return readMapFd(fd, path);
  } finally {
    closeSync(fd);
  }
}

function readMapFd(fd: number, path: string): OverlayMap {
  const size = fstatSync(fd).size;
  const h = Buffer.alloc(MAP_HEADER_BYTES);
  if (readFull(fd, h, 0, h.length, 0) < h.length || h.toString('latin1', 0, 8) !== MAP_MAGIC) {
    throw new TargetError(`overlay: ${path} is not an overlay map (it does not begin with ${MAP_MAGIC})`);
  }
  const version = h.readUInt32LE(8);
  if (version !== MAP_VERSION) throw new TargetError(`overlay: ${path} is a version ${version} map; this ublk reads version ${MAP_VERSION}`);
  const bs = h.readUInt32LE(12);
  if (bs !== LAYER_BLOCK) throw new TargetError(`overlay: ${path} maps ${bs}-byte blocks; this ublk uses ${LAYER_BLOCK}`);
  const baseSize = Number(h.readBigUInt64LE(16));
  const blocks = Number(h.readBigUInt64LE(24));
  if (blocks !== blocksOf(baseSize) || size !== MAP_HEADER_BYTES + mapBytes(blocks)) {
    throw new TargetError(`overlay: ${path} is damaged: ${size} bytes for ${blocks} blocks of a ${baseSize}-byte base (expected ${MAP_HEADER_BYTES + mapBytes(blocksOf(baseSize))})`);
  }
  const bits = Buffer.alloc(mapBytes(blocks));
  readFull(fd, bits, 0, bits.length, MAP_HEADER_BYTES);
  return { baseSize, blocks, bits };
}

/** Whether block `i` is set in map bytes `bits`. */
export function blockMapped(bits: Uint8Array, i: number): boolean {
  return ((bits[i >> 3]! >> (i & 7)) & 1) === 1;
}

/** The indexes of the set blocks of a map, in order (for tests and tools). */
export function mappedBlocks(bits: Uint8Array): number[] {
  const out: number[] = [];
  for (let byte = 0; byte < bits.length; byte++) {
    const b = bits[byte]!;
    if (b === 0) continue;
    for (let k = 0; k < 8; k++) if ((b >> k) & 1) out.push(byte * 8 + k);
  }
  return out;
}

export default defineAsyncTarget<OverlayOptions>({
  name: 'overlay',
  usage: [
    '  --base FILE            the read-only base: a file or block device (never written)',
    '  --overlay FILE         where written blocks go (a sparse file the size of the base); its',
    '                         allocation map is FILE.map',
    '  --create               make an empty overlay and map if they do not exist',
    '',
  ].join('\n'),
  counters: ['overlay_read_blocks', 'base_read_blocks', 'written_blocks', 'map_pages_written', 'flushes'],

  parseArgs(argv) {
    const { values } = parseOptions('overlay', argv, [
      { key: 'base', names: ['--base'], kind: 'string' },
      { key: 'overlay', names: ['--overlay'], kind: 'string' },
      { key: 'create', names: ['--create'], kind: 'flag' },
    ]);
    if (values.base === undefined) throw new UsageError('overlay needs --base FILE: the read-only disk image or block device it layers over');
    if (values.overlay === undefined) throw new UsageError('overlay needs --overlay FILE: where written blocks go (--create makes it)');
    const base = resolve(values.base as string);
    const overlay = resolve(values.overlay as string);
    if (base === overlay) throw new UsageError(`overlay: --base and --overlay are the same file (${base}); the overlay must be another file`);
    return { base, overlay, create: values.create === true };
  },

  prepare(o) {
    return prepareOverlay(o);
  },

  open(_o, queue) {
    return new OverlayQueue(queue.device as OverlayDevice, queue.counters);
  },
});

/** `prepare`: opens the three files, creating the overlay with --create, and loads the map. */
export function prepareOverlay(o: OverlayOptions): DeviceSpec {
  const base = openSized(o.base, fsc.O_RDONLY, 'overlay', '--base');
  const fds = [base.fd];
  try {
    if (base.size === 0) throw new TargetError(`overlay: --base ${o.base} is empty: there is no disk to layer over`);
    const sizeBytes = blocksOf(base.size) * LAYER_BLOCK;
    const map = mapPath(o.overlay);
    const haveOverlay = existsSync(o.overlay);
    const haveMap = existsSync(map);
    if (!haveOverlay && !haveMap) {
      if (!o.create) throw new TargetError(`overlay: --overlay ${o.overlay} does not exist: add --create to make an empty one`);
      createOverlay(o.overlay, base.size);
    } else if (!haveMap) {
      throw new TargetError(`overlay: ${o.overlay} has no map (${map}), so its blocks cannot be told from the base's: remove it to start afresh (with --create)`);
    } else if (!haveOverlay) {
      throw new TargetError(`overlay: ${map} exists but ${o.overlay} does not: remove the map to start afresh (with --create)`);
    }
    const ov = openSized(o.overlay, fsc.O_RDWR, 'overlay', '--overlay');
    fds.push(ov.fd);
    if (ov.dev === base.dev && ov.ino === base.ino) throw new TargetError(`overlay: --overlay ${o.overlay} is the base itself; the overlay must be another file`);
    if (ov.isBlockDevice) throw new TargetError(`overlay: --overlay ${o.overlay} is a block device; the overlay must be a regular file (it is sparse)`);
    let mapFd: number;
    try {
      mapFd = openSync(map, fsc.O_RDWR);
    } catch (e) {
      throw new TargetError(`overlay: cannot open the map ${map}: ${(e as Error).message}`);
    }
    fds.push(mapFd);
    const m = readMapFd(mapFd, map);
    if (m.baseSize !== base.size) {
      throw new TargetError(`overlay: ${o.overlay} was made over a ${m.baseSize}-byte base, and --base ${o.base} has ${base.size} bytes: it is another base's overlay (use that base, or a new overlay with --create)`);
    }
    if (ov.size < sizeBytes) {
      throw new TargetError(`overlay: ${o.overlay} has ${ov.size} bytes, less than the ${sizeBytes}-byte device: it was truncated (remove it and its map to start afresh)`);
    }
    const bitmap = new SharedArrayBuffer(m.bits.length);
    Buffer.from(bitmap).set(m.bits);
    const persisted = new SharedArrayBuffer(m.bits.length);
    Buffer.from(persisted).set(m.bits);
    const device: OverlayDevice = {
      baseFd: base.fd, overlayFd: ov.fd, mapFd, baseSize: base.size, sizeBytes, blocks: m.blocks, bitmap, persisted,
      dirty: new SharedArrayBuffer(4 * Math.max(1, Math.ceil(m.bits.length / MAP_PAGE))),
      lock: new SharedArrayBuffer(4),
    };
    const store = new MapStore(device);
    return {
      sizeBytes,
      ...LAYER_SHAPE,
      describe: { base: o.base, overlay: o.overlay, map, base_size: base.size, mapped_blocks: countBits(m.bits) },
      queueData: device,
      release: () => {
        // The queues persisted the map when they closed; this catches anything they could not.
        try {
          store.persist();
        } finally {
          for (const fd of fds) closeSync(fd);
        }
      },
    };
  } catch (e) {
    for (const fd of fds) closeSync(fd);
    throw e;
  }
}

function countBits(bits: Uint8Array): number {
  let n = 0;
  for (const b of bits) {
    let v = b;
    while (v) {
      v &= v - 1;
      n++;
    }
  }
  return n;
}

/** Makes an empty overlay (sparse, the device's size) and its map, durably. */
function createOverlay(overlay: string, baseSize: number): void {
  const sizeBytes = blocksOf(baseSize) * LAYER_BLOCK;
  let fd: number;
  try {
    fd = openSync(overlay, fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL, 0o644);
  } catch (e) {
    throw new TargetError(`overlay: cannot create --overlay ${overlay}: ${(e as Error).message}`);
  }
  try {
    ftruncateSync(fd, sizeBytes);
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
  // The map last: an overlay without one is refused, never read as if it were empty.
  const mfd = openSync(mapPath(overlay), fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL, 0o644);
  try {
    writeFull(mfd, mapHeader(baseSize), 0, MAP_HEADER_BYTES, 0);
    ftruncateSync(mfd, MAP_HEADER_BYTES + mapBytes(blocksOf(baseSize)));
    fdatasyncSync(mfd);
  } finally {
    closeSync(mfd);
  }
  try {
    const dfd = openSync(dirname(overlay), fsc.O_RDONLY | fsc.O_DIRECTORY);
    try { fsyncSync(dfd); } finally { closeSync(dfd); }
  } catch { /* a directory we cannot fsync (some network file systems): the files are still there */ }
}

/** The shared map and the rule for writing it out (see "Crash ordering" at the top). */
class MapStore {
  readonly bits: Uint8Array;
  /** The bits the .map file holds for sure: set only after a map write was fdatasynced. */
  private readonly persisted: Uint8Array;
  private readonly dirty: Int32Array;
  private readonly lock: Int32Array;

  constructor(private readonly d: OverlayDevice) {
    this.bits = new Uint8Array(d.bitmap);
    this.persisted = new Uint8Array(d.persisted);
    this.dirty = new Int32Array(d.dirty);
    this.lock = new Int32Array(d.lock);
  }

  /**
   * Sets the bits of blocks [first, first + n) (their data is already in the overlay) and marks
   * their map pages dirty, unless the bits are on disk already. A bit that is set but not yet on
   * disk marks its page again: the thread that set it may not have marked the page yet, and a
   * FLUSH answered now must still write it.
   */
  set(first: number, n: number): void {
    const bits = this.bits;
    const onDisk = this.persisted;
    let i = first;
    const end = first + n;
    let lastPage = -1;
    while (i < end) {
      const byte = i >> 3;
      // A whole byte at once where the range covers it.
      let mask: number;
      if ((i & 7) === 0 && end - i >= 8) {
        mask = 0xff;
        i += 8;
      } else {
        mask = 1 << (i & 7);
        i++;
      }
      if ((Atomics.load(onDisk, byte) & mask) === mask) continue;
      if ((Atomics.load(bits, byte) & mask) !== mask) Atomics.or(bits, byte, mask);
      const page = Math.floor(byte / MAP_PAGE);
      if (page !== lastPage) {
        if (Atomics.load(this.dirty, page) === 0) Atomics.store(this.dirty, page, 1);
        lastPage = page;
      }
    }
  }

  /** Whether block `i` is in the overlay. */
  mapped(i: number): boolean {
    return ((Atomics.load(this.bits, i >> 3) >> (i & 7)) & 1) === 1;
  }

  /**
   * Makes every write that completed before the call durable, data first and its bits after.
   * Returns the map pages written.
   */
  persist(): number {
    this.acquire();
    const pages: Array<[number, Buffer]> = [];
    try {
      for (let p = 0; p < this.dirty.length; p++) {
        if (Atomics.exchange(this.dirty, p, 0) === 0) continue;
        const start = p * MAP_PAGE;
        const end = Math.min(this.bits.length, start + MAP_PAGE);
        pages.push([p, Buffer.from(this.bits.subarray(start, end))]);
      }
      fdatasyncSync(this.d.overlayFd);
      for (const [p, copy] of pages) writeFull(this.d.mapFd, copy, 0, copy.length, MAP_HEADER_BYTES + p * MAP_PAGE);
      if (pages.length) fdatasyncSync(this.d.mapFd);
      for (const [p, copy] of pages) {
        for (let k = 0; k < copy.length; k++) if (copy[k]) Atomics.or(this.persisted, p * MAP_PAGE + k, copy[k]!);
      }
      return pages.length;
    } catch (e) {
      // Those pages are not on disk yet: the next flush tries them again.
      for (const [p] of pages) Atomics.store(this.dirty, p, 1);
      throw e;
    } finally {
      this.release();
    }
  }

  private acquire(): void {
    while (Atomics.compareExchange(this.lock, 0, 0, 1) !== 0) Atomics.wait(this.lock, 0, 1, 100);
  }

  private release(): void {
    Atomics.store(this.lock, 0, 0);
    Atomics.notify(this.lock, 0, 1);
  }
}

const C_OVERLAY_READS = 0;
const C_BASE_READS = 1;
const C_WRITTEN = 2;
const C_MAP_PAGES = 3;
const C_FLUSHES = 4;

/** One queue's handlers: synchronous fs calls, answered at once. */
class OverlayQueue implements AsyncHandlers {
  private readonly map: MapStore;

  constructor(private readonly d: OverlayDevice, private readonly counters: Float64Array) {
    this.map = new MapStore(d);
  }

  read(offset: number, buf: Buffer): void {
    checkRange('overlay', offset, buf.length, this.d.sizeBytes);
    const first = offset / LAYER_BLOCK;
    const n = buf.length / LAYER_BLOCK;
    // Runs of blocks from the same file, one read each.
    let i = 0;
    while (i < n) {
      const inOverlay = this.map.mapped(first + i);
      let j = i + 1;
      while (j < n && this.map.mapped(first + j) === inOverlay) j++;
      const at = i * LAYER_BLOCK;
      const len = (j - i) * LAYER_BLOCK;
      if (inOverlay) {
        readFullOrZeros(this.d.overlayFd, buf, at, len, offset + at);
        this.count(C_OVERLAY_READS, j - i);
      } else {
        readFullOrZeros(this.d.baseFd, buf, at, len, offset + at);
        this.count(C_BASE_READS, j - i);
      }
      i = j;
    }
  }

  write(offset: number, buf: Buffer, fua: boolean): void {
    checkRange('overlay', offset, buf.length, this.d.sizeBytes);
    writeFull(this.d.overlayFd, buf, 0, buf.length, offset);
    this.map.set(offset / LAYER_BLOCK, buf.length / LAYER_BLOCK);
    this.count(C_WRITTEN, buf.length / LAYER_BLOCK);
    if (fua) this.flush();
  }

  flush(): void {
    this.count(C_MAP_PAGES, this.map.persist());
    this.count(C_FLUSHES, 1);
  }

  writeZeroes(offset: number, length: number): void {
    checkRange('overlay', offset, length, this.d.sizeBytes);
    writeZeros(this.d.overlayFd, offset, length);
    this.map.set(offset / LAYER_BLOCK, length / LAYER_BLOCK);
    this.count(C_WRITTEN, length / LAYER_BLOCK);
  }

  discard(offset: number, length: number): void {
    // The base's data must not show through again: a discarded block reads as zeros.
    this.writeZeroes(offset, length);
  }

  close(): void {
    this.map.persist();
  }

  private count(slot: number, n: number): void {
    if (slot < this.counters.length) this.counters[slot] = this.counters[slot]! + n;
  }
}

// For tests: the in-memory map of a prepared device.
export function deviceMap(device: unknown): Uint8Array {
  return new Uint8Array((device as OverlayDevice).bitmap);
}
