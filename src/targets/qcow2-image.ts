/**
 * A qcow2 image (versions 2 and 3, as `qemu-img create -f qcow2` makes them), read and written
 * with synchronous file calls: the format logic of the qcow2 target, usable without ublk (the
 * host tests drive it directly against images made by qemu-img and check them with
 * `qemu-img check`).
 *
 * What it implements: the header and its extensions, the L1 table (kept in memory) and L2 tables
 * (cached), refcount blocks of any refcount_order from 0 to 6 (cached), allocation of clusters
 * on write with copy-on-write of the rest of a cluster (from the backing file, from a compressed
 * cluster, or zeros), v3 zero clusters (read; WRITE_ZEROES and DISCARD set them), discard
 * (clusters are deallocated, or zero-flagged where a backing file would otherwise show through),
 * compressed clusters (zlib raw deflate; a write to one allocates a normal cluster), a read-only
 * backing chain (qcow2 or raw, named relative to the image's directory, backing_fmt honoured),
 * and growing the refcount table when the image outgrows it. What it refuses, with the reason and
 * the way out: encryption, external data files, extended L2 entries, zstd compression, unknown
 * incompatible feature bits, the dirty and corrupt bits (`qemu-img check -r all` repairs them),
 * and writing to an image with internal snapshots (its clusters are shared; serve it read-only).
 *
 * Crash safety. `qemu-img check` calls an image corrupt when a cluster is referenced more often
 * than its refcount says, or when a table points at something that is not there; a refcount
 * higher than the references is only a leak. So the on-disk state must at every moment have
 * refcounts >= references, which this module keeps with one rule: metadata reaches the file
 * only in {@link Qcow2Image.flush}, in dependency order, with an fdatasync between the steps:
 *
 *   1. refcount blocks (new clusters counted; data was written to its clusters before, directly)
 *   2. fdatasync; refcount table entries of new refcount blocks; fdatasync
 *   3. L2 tables (entries pointing at the new clusters, new L2 tables whole); fdatasync
 *   4. L1 entries of new L2 tables; fdatasync
 *   5. only now, in memory, the refcounts of clusters that the written tables no longer
 *      reference are lowered (they reach the file at the next flush: a crash before it leaks them)
 *
 * A cluster is reserved (its refcount set in memory) before anything is written to it, so a
 * cluster whose refcount is 0 in memory is really free, and freed clusters are reused only after
 * the tables that stopped referencing them are durable. A new refcount block is placed inside the
 * range it covers, on the first free cluster, and counts itself. Between flushes the device
 * behaves as a disk with a volatile cache: written data goes to the file at once, but a cluster
 * allocated since the last flush is reachable only after it, so the target advertises a
 * volatile cache and FUA, and a FUA write is a write plus a flush. The dirty bit is never set
 * (refcounts are never lazy), and the lazy_refcounts compatible bit, if an image has it, changes
 * nothing here: it allows lazy refcounts, it does not require them. Autoclear bits (bitmaps) are
 * cleared when an image is opened for writing, as the spec asks of a writer that does not keep
 * what they describe.
 *
 * I/O style: synchronous calls (pread/pwrite/fdatasync through an {@link ImageIo}), answered at
 * once. The image is served by one queue, whose thread owns every cache, so no locking is
 * needed; a request costs no event-loop turn. `ImageIo` is also how the host tests inject a
 * crash after any number of writes.
 */
import { closeSync, constants as fsc, fdatasyncSync, fstatSync, openSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { inflateRawSync } from 'node:zlib';
import { TargetError } from '../ublk/target.js';
import { ioError, readFull, writeFull } from './layer-io.js';

/** The file calls the image makes: real ones ({@link fileIo}), or a test's that fail on purpose. */
export interface ImageIo {
  /** Reads up to `len` bytes at `pos` into `buf` at `off`; returns the bytes read (short only at EOF). */
  read(fd: number, buf: Uint8Array, off: number, len: number, pos: number): number;
  /** Writes all `len` bytes. */
  write(fd: number, buf: Uint8Array, off: number, len: number, pos: number): void;
  /** fdatasync. */
  sync(fd: number): void;
}

export const fileIo: ImageIo = {
  read: readFull,
  write: writeFull,
  sync: fdatasyncSync,
};

export const QCOW2_MAGIC = 0x514649fb; // 'QFI\xfb'
const L1E_OFFSET_MASK = 0x00fffffffffffe00n;
const L2E_OFFSET_MASK = 0x00fffffffffffe00n;
const REFT_OFFSET_MASK = 0xfffffffffffffe00n;
const OFLAG_COPIED = 1n << 63n;
const OFLAG_COMPRESSED = 1n << 62n;
const OFLAG_ZERO = 1n;

const INCOMPAT_DIRTY = 1n;
const INCOMPAT_CORRUPT = 2n;
const INCOMPAT_DATA_FILE = 4n;
const INCOMPAT_COMPRESSION = 8n;
const INCOMPAT_EXTL2 = 16n;

const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_NAMES = 0x6803f857;
const EXT_CRYPTO = 0x0537be77;
const EXT_DATA_FILE = 0x44415441;

/** What an L2 entry says about its cluster. */
export const enum ClusterType { Unallocated, ZeroPlain, ZeroAlloc, Normal, Compressed }

/** The parsed header (what the tests and `ublk list -v` show). */
export interface Qcow2Header {
  version: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1Offset: number;
  refTableOffset: number;
  refTableClusters: number;
  snapshots: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  backingFile?: string;
  backingFormat?: string;
  /** Names of feature bits from the feature-name table: `incompatible:5` -> name. */
  featureNames: Map<string, string>;
  dataFile?: string;
}

/** A read-only image under this one: its size and its bytes. */
export interface BackingImage {
  readonly size: number;
  /** What `ublk list -v` shows: each file of the chain and its format, top first. */
  readonly chain: Array<{ file: string; format: string }>;
  /** Reads `len` bytes at `pos` into `buf` at `off` (zeros past the end). */
  readAt(pos: number, buf: Buffer, off: number, len: number): void;
  close(): void;
}

export interface OpenOptions {
  readOnly?: boolean;
  io?: ImageIo;
  /** Bytes of L2 tables and refcount blocks kept in memory before clean ones are dropped (default 64 MiB). */
  cacheBytes?: number;
  /** Backing chain depth allowed (default 16): a loop of backing files is refused, not followed forever. */
  maxChain?: number;
}

/** Counters the target exposes (`ublk list -v`, the tests). */
export interface Qcow2Stats {
  allocatedClusters: number;
  newL2Tables: number;
  newRefBlocks: number;
  cowReads: number;
  compressedReads: number;
  backingReads: number;
  zeroedClusters: number;
  freedClusters: number;
  flushes: number;
  syncs: number;
  refTableGrowths: number;
}

interface Meta {
  /** Where the table lives in the file. */
  off: number;
  buf: Buffer;
  /** Byte range not yet in the file: [lo, hi); lo >= hi when clean. */
  lo: number;
  hi: number;
}

const u64 = (b: Buffer, at: number) => b.readBigUInt64BE(at);
const num = (v: bigint) => Number(v);

function fail(path: string, msg: string): never {
  throw new TargetError(`qcow2: ${path}: ${msg}`);
}

/** Reads and checks the header of the qcow2 image open on `fd` (`path` names it in errors). */
export function readHeader(fd: number, path: string, io: ImageIo = fileIo): Qcow2Header {
  const h = Buffer.alloc(4096);
  const n = io.read(fd, h, 0, h.length, 0);
  if (n < 72 || h.readUInt32BE(0) !== QCOW2_MAGIC) fail(path, 'not a qcow2 image (no QFI\\xfb magic); a raw image is served by -t loop');
  const version = h.readUInt32BE(4);
  if (version !== 2 && version !== 3) fail(path, `qcow2 version ${version}; this ublk reads versions 2 and 3 (qemu-img amend -o compat=1.1 converts)`);
  const clusterBits = h.readUInt32BE(20);
  if (clusterBits < 9 || clusterBits > 21) fail(path, `cluster_bits ${clusterBits} is outside 9..21: the header is damaged`);
  const hd: Qcow2Header = {
    version,
    clusterBits,
    size: num(u64(h, 24)),
    cryptMethod: h.readUInt32BE(32),
    l1Size: h.readUInt32BE(36),
    l1Offset: num(u64(h, 40)),
    refTableOffset: num(u64(h, 48)),
    refTableClusters: h.readUInt32BE(56),
    snapshots: h.readUInt32BE(60),
    incompatible: 0n,
    compatible: 0n,
    autoclear: 0n,
    refcountOrder: 4,
    headerLength: 72,
    compressionType: 0,
    featureNames: new Map(),
  };
  if (version === 3) {
    if (n < 104) fail(path, 'the version 3 header is cut short');
    hd.incompatible = u64(h, 72);
    hd.compatible = u64(h, 80);
    hd.autoclear = u64(h, 88);
    hd.refcountOrder = h.readUInt32BE(96);
    hd.headerLength = h.readUInt32BE(100);
    if (hd.headerLength < 104 || hd.headerLength > 4096 - 8) fail(path, `header_length ${hd.headerLength} is impossible: the header is damaged`);
    if (hd.headerLength > 104) hd.compressionType = h[104]!;
  }
  // Header extensions, 8-byte aligned, until type 0 (they live in the first cluster; we read 4 KiB of it).
  let at = hd.headerLength;
  while (at + 8 <= n) {
    const type = h.readUInt32BE(at);
    const len = h.readUInt32BE(at + 4);
    if (type === 0) break;
    const data = h.subarray(at + 8, Math.min(n, at + 8 + len));
    if (type === EXT_BACKING_FORMAT) hd.backingFormat = data.toString('utf8');
    else if (type === EXT_DATA_FILE) hd.dataFile = data.toString('utf8');
    else if (type === EXT_FEATURE_NAMES) {
      for (let k = 0; k + 48 <= data.length; k += 48) {
        const kind = ['incompatible', 'compatible', 'autoclear'][data[k]!] ?? `type${data[k]}`;
        hd.featureNames.set(`${kind}:${data[k + 1]}`, data.toString('utf8', k + 2, k + 48).replace(/\0.*$/s, ''));
      }
    } else if (type === EXT_CRYPTO) {
      // Only with crypt_method 2, refused below.
    }
    at += 8 + Math.ceil(len / 8) * 8;
  }
  const bOff = num(u64(h, 8));
  const bLen = h.readUInt32BE(16);
  if (bOff !== 0) {
    if (bLen === 0 || bLen > 1023) fail(path, `backing_file_size ${bLen} is impossible: the header is damaged`);
    const b = Buffer.alloc(bLen);
    if (io.read(fd, b, 0, bLen, bOff) !== bLen) fail(path, 'the backing file name lies past the end of the file');
    hd.backingFile = b.toString('utf8');
  }
  return hd;
}

/** Refuses what this module does not implement, naming the feature and what to do instead. */
function checkSupported(hd: Qcow2Header, path: string, readOnly: boolean): void {
  if (hd.cryptMethod !== 0) {
    fail(path, `the image is encrypted (${hd.cryptMethod === 2 ? 'LUKS' : 'AES'}); this ublk does not decrypt qcow2: ` +
      'decrypt it first (qemu-img convert --object secret,... --image-opts ... -O qcow2 plain.qcow2)');
  }
  const name = (bit: number) => hd.featureNames.get(`incompatible:${bit}`);
  if (hd.incompatible & INCOMPAT_CORRUPT) fail(path, 'the image is marked corrupt (incompatible feature bit 1): run `qemu-img check -r all` on it first');
  if (hd.incompatible & INCOMPAT_DIRTY) {
    fail(path, 'the image is marked dirty (its refcounts were being kept lazily when its last writer stopped): ' +
      'run `qemu-img check -r all` on it first, which rebuilds them');
  }
  if (hd.incompatible & INCOMPAT_DATA_FILE || hd.dataFile !== undefined) {
    fail(path, `the image keeps its data in an external data file${hd.dataFile ? ` (${hd.dataFile})` : ''}, which this ublk does not implement: ` +
      'serve that raw file with -t loop, or convert the image (qemu-img convert -O qcow2)');
  }
  if (hd.incompatible & INCOMPAT_EXTL2) fail(path, 'the image has extended L2 entries (subclusters, extended_l2=on), which this ublk does not implement: qemu-img convert -O qcow2 -o extended_l2=off');
  if (hd.incompatible & INCOMPAT_COMPRESSION || hd.compressionType !== 0) {
    fail(path, `the image's compressed clusters use compression type ${hd.compressionType} (zstd); this ublk inflates zlib only: qemu-img convert -O qcow2 -o compression_type=zlib`);
  }
  const known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
  const unknown = hd.incompatible & ~known;
  if (unknown) {
    const bits: string[] = [];
    for (let b = 0; b < 64; b++) if ((unknown >> BigInt(b)) & 1n) bits.push(name(b) ? `${b} (${name(b)})` : String(b));
    fail(path, `the image uses incompatible feature bit(s) ${bits.join(', ')}, unknown to this ublk: it cannot be read safely`);
  }
  if (hd.refcountOrder > 6) fail(path, `refcount_order ${hd.refcountOrder} is outside 0..6: the header is damaged`);
  if (hd.size % 512 !== 0) fail(path, `the virtual size ${hd.size} is not a multiple of 512`);
  if (hd.l1Offset % (1 << hd.clusterBits) !== 0 || hd.refTableOffset % (1 << hd.clusterBits) !== 0) {
    fail(path, 'the L1 or refcount table is not cluster-aligned: the header is damaged (qemu-img check)');
  }
  if (hd.snapshots > 0 && !readOnly) {
    fail(path, `the image has ${hd.snapshots} internal snapshot(s), whose clusters the active image shares; writing would need ` +
      'copy-on-write of shared clusters, which this ublk does not implement: serve it with --read-only, or delete them (qemu-img snapshot -d)');
  }
}

/** A raw backing file: its bytes, zeros past its end. */
class RawBacking implements BackingImage {
  readonly chain: Array<{ file: string; format: string }>;
  constructor(private readonly fd: number, readonly size: number, file: string, private readonly io: ImageIo) {
    this.chain = [{ file, format: 'raw' }];
  }
  readAt(pos: number, buf: Buffer, off: number, len: number): void {
    const n = pos >= this.size ? 0 : this.io.read(this.fd, buf, off, Math.min(len, this.size - pos), pos);
    if (n < len) buf.fill(0, off + n, off + len);
  }
  close(): void {
    closeSync(this.fd);
  }
}

/** Opens the backing file `name` of the image at `path`, read-only, as `format` (probed if undefined). */
function openBacking(path: string, name: string, format: string | undefined, o: OpenOptions, depth: number): BackingImage {
  if (name.startsWith('json:')) fail(path, `its backing file is given as ${name.slice(0, 40)}...; json: backing specifications are not supported (qemu-img rebase -u -b FILE)`);
  if (depth >= (o.maxChain ?? 16)) fail(path, `the backing chain is longer than ${o.maxChain ?? 16} images (a loop of backing files?)`);
  const file = isAbsolute(name) ? name : resolve(dirname(path), name);
  let fd: number;
  try {
    fd = openSync(file, fsc.O_RDONLY);
  } catch (e) {
    fail(path, `cannot open its backing file ${file} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}): it must exist, relative names are relative to the image's directory (qemu-img rebase -u -b fixes the name)`);
  }
  const io = o.io ?? fileIo;
  try {
    let fmt = format;
    if (fmt === undefined) {
      const m = Buffer.alloc(4);
      fmt = io.read(fd, m, 0, 4, 0) === 4 && m.readUInt32BE(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
    }
    if (fmt === 'raw') return new RawBacking(fd, fstatSync(fd).size, file, io);
    if (fmt === 'qcow2') return Qcow2Image.fromFd(fd, file, { ...o, readOnly: true }, depth + 1);
    fail(path, `its backing file ${file} has format '${fmt}'; this ublk reads raw and qcow2 backing files`);
  } catch (e) {
    try { closeSync(fd); } catch { /* closed by a failed open already */ }
    throw e;
  }
}

/** A qcow2 image open for reading, or for reading and writing. */
export class Qcow2Image implements BackingImage {
  readonly header: Qcow2Header;
  readonly size: number;
  readonly clusterSize: number;
  readonly readOnly: boolean;
  readonly backing: BackingImage | undefined;
  readonly stats: Qcow2Stats = {
    allocatedClusters: 0, newL2Tables: 0, newRefBlocks: 0, cowReads: 0, compressedReads: 0, backingReads: 0,
    zeroedClusters: 0, freedClusters: 0, flushes: 0, syncs: 0, refTableGrowths: 0,
  };

  private readonly io: ImageIo;
  private readonly clusterBits: number;
  private readonly l2Bits: number;
  private readonly l2Entries: number;
  private readonly refBits: number;
  /** log2 of the clusters a refcount block covers. */
  private readonly rbShift: number;
  private readonly l1: Buffer;
  private readonly l1Dirty = new Set<number>();
  private refTable: Buffer;
  private refTableOffset: number;
  private readonly refTableDirty = new Set<number>();
  private readonly l2Cache = new Map<number, Meta>();
  private readonly rbCache = new Map<number, Meta>();
  /** The cached tables with bytes not yet in the file (a flush visits only these). */
  private readonly l2Dirty = new Set<Meta>();
  private readonly rbDirty = new Set<Meta>();
  private readonly cacheLimit: number;
  /** Clusters past the last one the file holds: where allocation may always go. */
  private fileClusters: number;
  /** No cluster below this is free. */
  private freeHint = 0;
  /** Host byte ranges whose references were dropped in memory: their refcounts go down after the next flush. */
  private pendingFree: Array<[number, number]> = [];
  private readonly compressedCache = new Map<number, Buffer>();
  private closed = false;

  /** Opens the image at `path` (and its backing chain, read-only). Throws a TargetError naming what is refused and why. */
  static open(path: string, o: OpenOptions = {}): Qcow2Image {
    let fd: number;
    try {
      fd = openSync(path, o.readOnly ? fsc.O_RDONLY : fsc.O_RDWR);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') fail(path, 'does not exist (qemu-img create -f qcow2 FILE SIZE makes one)');
      if (code === 'EACCES' || code === 'EROFS' || code === 'EPERM') fail(path, `cannot open it ${o.readOnly ? 'for reading' : 'for writing'} (${code}): fix its permissions, or add --read-only`);
      fail(path, `cannot open it: ${(e as Error).message}`);
    }
    try {
      return Qcow2Image.fromFd(fd, path, o, 0);
    } catch (e) {
      try { closeSync(fd); } catch { /* already closed */ }
      throw e;
    }
  }

  /** Takes ownership of `fd` (closed by close(), or here if the image is refused). */
  static fromFd(fd: number, path: string, o: OpenOptions, depth: number): Qcow2Image {
    const io = o.io ?? fileIo;
    const st = fstatSync(fd);
    if (!st.isFile() && !st.isBlockDevice()) fail(path, 'is neither a regular file nor a block device');
    const hd = readHeader(fd, path, io);
    checkSupported(hd, path, o.readOnly ?? false);
    let backing: BackingImage | undefined;
    if (hd.backingFile !== undefined) backing = openBacking(path, hd.backingFile, hd.backingFormat, o, depth);
    try {
      return new Qcow2Image(fd, path, hd, st.size, backing, o, io);
    } catch (e) {
      backing?.close();
      throw e;
    }
  }

  private constructor(private readonly fd: number, readonly path: string, hd: Qcow2Header, fileSize: number,
    backing: BackingImage | undefined, o: OpenOptions, io: ImageIo) {
    this.header = hd;
    this.io = io;
    this.readOnly = o.readOnly ?? false;
    this.backing = backing;
    this.size = hd.size;
    this.clusterBits = hd.clusterBits;
    this.clusterSize = 1 << hd.clusterBits;
    this.l2Bits = hd.clusterBits - 3;
    this.l2Entries = 1 << this.l2Bits;
    this.refBits = 1 << hd.refcountOrder;
    this.rbShift = hd.clusterBits + 3 - hd.refcountOrder;
    this.cacheLimit = o.cacheBytes ?? 64 * 2 ** 20;
    this.fileClusters = Math.ceil(fileSize / this.clusterSize);
    const need = Math.ceil(hd.size / (this.clusterSize * this.l2Entries));
    if (hd.l1Size < need) fail(path, `the L1 table has ${hd.l1Size} entries, fewer than the ${need} its virtual size needs: the image is damaged (qemu-img check)`);
    if (hd.l1Size > 2 ** 25) fail(path, `the L1 table has ${hd.l1Size} entries: the header is damaged`);
    this.l1 = Buffer.alloc(hd.l1Size * 8);
    if (io.read(fd, this.l1, 0, this.l1.length, hd.l1Offset) !== this.l1.length) fail(path, 'the L1 table lies past the end of the file: the image is truncated');
    if (hd.refTableClusters === 0 || hd.refTableClusters * this.clusterSize > 2 ** 28) fail(path, `refcount_table_clusters ${hd.refTableClusters} is impossible: the header is damaged`);
    this.refTable = Buffer.alloc(hd.refTableClusters * this.clusterSize);
    this.refTableOffset = hd.refTableOffset;
    if (io.read(fd, this.refTable, 0, this.refTable.length, hd.refTableOffset) !== this.refTable.length) fail(path, 'the refcount table lies past the end of the file: the image is truncated');
    // Allocation goes past the last cluster in use, which a refcount may place beyond the end of
    // the file (a preallocated image, a file cut short): the last non-zero refcount counts too.
    const per = 2 ** this.rbShift;
    for (let ti = this.refTable.length / 8 - 1; ti >= 0; ti--) {
      const rb = num(u64(this.refTable, ti * 8) & REFT_OFFSET_MASK);
      if (rb === 0) continue;
      const b = this.loadMeta(this.rbCache, rb, 'refcount block').buf;
      let i = per - 1;
      while (i >= 0 && this.rcGet(b, i) === 0) i--;
      if (i >= 0) {
        this.fileClusters = Math.max(this.fileClusters, ti * per + i + 1);
        break;
      }
    }
    if (!this.readOnly && hd.autoclear !== 0n) {
      // Bitmaps (autoclear bit 0) would go stale under writes we do not track: the spec says a
      // writer that does not update them clears the bits, which tells readers to ignore them.
      const z = Buffer.alloc(8);
      io.write(fd, z, 0, 8, 88);
      io.sync(fd);
      hd.autoclear = 0n;
    }
  }

  /** The backing chain below this image, top first (this image included). */
  get chain(): Array<{ file: string; format: string }> {
    return [{ file: this.path, format: 'qcow2' }, ...(this.backing?.chain ?? [])];
  }

  // ---- reading ----

  /** Fills `buf` with the image's bytes at `offset` (inside the virtual size). */
  read(offset: number, buf: Buffer): void {
    this.checkRange(offset, buf.length);
    this.readAt(offset, buf, 0, buf.length);
  }

  readAt(pos: number, buf: Buffer, off: number, len: number): void {
    const end = Math.min(pos + len, this.size);
    if (end < pos + len) buf.fill(0, off + Math.max(0, end - pos), off + len);
    const cs = this.clusterSize;
    while (pos < end) {
      const vc = Math.floor(pos / cs);
      const inOff = pos - vc * cs;
      const n = Math.min(cs - inOff, end - pos);
      this.readPiece(vc, inOff, buf, off, n);
      pos += n;
      off += n;
    }
  }

  /** Reads `len` bytes of virtual cluster `vc` from byte `inOff` into `buf` at `off`. */
  private readPiece(vc: number, inOff: number, buf: Buffer, off: number, len: number): void {
    const e = this.entry(vc);
    switch (this.typeOf(e)) {
      case ClusterType.Normal: {
        const host = num(e & L2E_OFFSET_MASK);
        const n = this.io.read(this.fd, buf, off, len, host + inOff);
        if (n < len) buf.fill(0, off + n, off + len);
        return;
      }
      case ClusterType.ZeroPlain:
      case ClusterType.ZeroAlloc:
        buf.fill(0, off, off + len);
        return;
      case ClusterType.Compressed:
        this.inflate(e).copy(buf, off, inOff, inOff + len);
        return;
      default:
        if (this.backing) {
          this.stats.backingReads++;
          this.backing.readAt(vc * this.clusterSize + inOff, buf, off, len);
        } else {
          buf.fill(0, off, off + len);
        }
    }
  }

  /** The L2 entry of virtual cluster `vc` (0 where no L2 table exists). */
  private entry(vc: number): bigint {
    const l1i = vc >>> this.l2Bits;
    const l2Off = num(u64(this.l1, l1i * 8) & L1E_OFFSET_MASK);
    if (l2Off === 0) return 0n;
    return u64(this.l2Table(l2Off).buf, (vc & (this.l2Entries - 1)) * 8);
  }

  private typeOf(e: bigint): ClusterType {
    if (e & OFLAG_COMPRESSED) return ClusterType.Compressed;
    const off = e & L2E_OFFSET_MASK;
    if (this.header.version >= 3 && e & OFLAG_ZERO) return off ? ClusterType.ZeroAlloc : ClusterType.ZeroPlain;
    if (off === 0n) return ClusterType.Unallocated;
    if (num(off) % this.clusterSize !== 0) throw this.corrupt(`an L2 entry points at ${num(off)}, which is not cluster-aligned`);
    return ClusterType.Normal;
  }

  /** Where a compressed L2 entry's data lies: the host bytes qemu counts refcounts for, and the compressed stream. */
  private compressedRange(e: bigint): { start: number; len: number; dataOff: number; dataLen: number } {
    const shift = 62n - BigInt(this.clusterBits - 8);
    const coff = num(e & ((1n << shift) - 1n));
    const sectors = num((e >> shift) & ((1n << BigInt(this.clusterBits - 8)) - 1n)) + 1;
    const start = coff - (coff % 512);
    return { start, len: sectors * 512, dataOff: coff, dataLen: sectors * 512 - (coff % 512) };
  }

  /** The bytes of a compressed cluster (a small cache: sequential reads inflate each cluster once). */
  private inflate(e: bigint): Buffer {
    const r = this.compressedRange(e);
    const hit = this.compressedCache.get(r.dataOff);
    if (hit) return hit;
    const raw = Buffer.alloc(r.dataLen);
    const n = this.io.read(this.fd, raw, 0, r.dataLen, r.dataOff);
    let out: Buffer;
    try {
      out = inflateRawSync(raw.subarray(0, n), { maxOutputLength: this.clusterSize, finishFlush: 2 /* Z_SYNC_FLUSH: tolerate the padding */ });
    } catch (err) {
      throw this.corrupt(`the compressed cluster at ${r.dataOff} does not inflate (${(err as Error).message})`);
    }
    if (out.length < this.clusterSize) {
      const full = Buffer.alloc(this.clusterSize);
      out.copy(full);
      out = full;
    }
    this.stats.compressedReads++;
    if (this.compressedCache.size >= 8) this.compressedCache.delete(this.compressedCache.keys().next().value!);
    this.compressedCache.set(r.dataOff, out);
    return out;
  }

  // ---- writing ----

  /** Writes `buf` at `offset`; with `fua`, durably (a flush follows). */
  write(offset: number, buf: Buffer, fua = false): void {
    this.checkWritable();
    this.checkRange(offset, buf.length);
    const cs = this.clusterSize;
    let pos = offset;
    let off = 0;
    const end = offset + buf.length;
    while (pos < end) {
      const vc = Math.floor(pos / cs);
      const inOff = pos - vc * cs;
      const n = Math.min(cs - inOff, end - pos);
      this.writePiece(vc, inOff, buf, off, n);
      pos += n;
      off += n;
    }
    if (fua) this.flush();
    this.trimCache();
  }

  /**
   * Writes `len` bytes of `src` (from `off`; zeros if `src` is undefined) into virtual cluster
   * `vc` at `inOff`: in place if the cluster is allocated and only this image references it
   * (L2 entry with COPIED), else into a newly allocated cluster that first receives the rest of
   * the old contents (copy-on-write), its old allocation freed after the next flush.
   */
  private writePiece(vc: number, inOff: number, src: Buffer | undefined, off: number, len: number): void {
    const { meta, at } = this.l2Slot(vc);
    const e = u64(meta.buf, at);
    const type = this.typeOf(e);
    const cs = this.clusterSize;
    if (type === ClusterType.Normal && e & OFLAG_COPIED) {
      const host = num(e & L2E_OFFSET_MASK);
      this.io.write(this.fd, src ?? zeroBuf(len), src ? off : 0, len, host + inOff);
      return;
    }
    const host = this.allocCluster();
    if (inOff === 0 && len === cs) {
      this.io.write(this.fd, src ?? zeroBuf(cs), src ? off : 0, cs, host);
    } else {
      const whole = Buffer.alloc(cs);
      if (type !== ClusterType.ZeroPlain && type !== ClusterType.ZeroAlloc && !(type === ClusterType.Unallocated && !this.backing)) {
        this.stats.cowReads++;
        this.readPiece(vc, 0, whole, 0, cs);
      }
      if (src) src.copy(whole, inOff, off, off + len);
      else whole.fill(0, inOff, inOff + len);
      this.io.write(this.fd, whole, 0, cs, host);
    }
    this.setEntry(meta, at, BigInt(host) | OFLAG_COPIED);
    this.dropAllocation(e, type);
  }

  /** Frees (after the next flush) what an L2 entry that is being replaced had allocated. */
  private dropAllocation(e: bigint, type: ClusterType): void {
    if (type === ClusterType.Normal || type === ClusterType.ZeroAlloc) {
      this.pendingFree.push([num(e & L2E_OFFSET_MASK), this.clusterSize]);
    } else if (type === ClusterType.Compressed) {
      const r = this.compressedRange(e);
      this.pendingFree.push([r.start, r.len]);
      this.compressedCache.delete(r.dataOff);
    }
  }

  /**
   * WRITE_ZEROES: the range reads as zeros afterwards. Whole clusters become zero clusters (v3)
   * or unallocated ones (v2 without a backing file), their old allocation freed after the next
   * flush; with `noUnmap` an allocated cluster keeps its allocation and is overwritten with zeros.
   * Parts of clusters, and v2 images with a backing file, get zeros written.
   */
  writeZeroes(offset: number, length: number, noUnmap = false): void {
    this.checkWritable();
    this.checkRange(offset, length);
    this.eachCluster(offset, length, (vc, inOff, n) => {
      const whole = n === this.clusterSize;
      const e = this.entry(vc);
      const type = this.typeOf(e);
      const readsZero = type === ClusterType.ZeroPlain || type === ClusterType.ZeroAlloc || (type === ClusterType.Unallocated && !this.backing);
      if (readsZero) return;
      if (!whole || (noUnmap && type === ClusterType.Normal && e & OFLAG_COPIED)) {
        this.writePiece(vc, inOff, undefined, 0, n);
        return;
      }
      if (this.header.version >= 3) this.replaceEntry(vc, OFLAG_ZERO);
      else if (!this.backing) this.replaceEntry(vc, 0n);
      else this.writePiece(vc, 0, undefined, 0, n);
      this.stats.zeroedClusters++;
    });
    this.trimCache();
  }

  /**
   * DISCARD: whole clusters are deallocated (freed after the next flush). Where a backing file
   * would then show through, a v3 image marks them zero instead, and a v2 image keeps them (it
   * has no zero flag; a discard is a hint). Parts of clusters are left alone.
   */
  discard(offset: number, length: number): void {
    this.checkWritable();
    this.checkRange(offset, length);
    this.eachCluster(offset, length, (vc, _inOff, n) => {
      if (n !== this.clusterSize) return;
      const e = this.entry(vc);
      const type = this.typeOf(e);
      if (this.backing) {
        if (this.header.version < 3 || type === ClusterType.ZeroPlain) return;
        this.replaceEntry(vc, OFLAG_ZERO);
      } else {
        if (type === ClusterType.Unallocated) return;
        this.replaceEntry(vc, 0n);
      }
    });
    this.trimCache();
  }

  /** Sets virtual cluster `vc`'s L2 entry to `e` (no allocation of its own) and frees the old one's. */
  private replaceEntry(vc: number, e: bigint): void {
    const { meta, at } = this.l2Slot(vc);
    const old = u64(meta.buf, at);
    this.setEntry(meta, at, e);
    this.dropAllocation(old, this.typeOf(old));
  }

  private eachCluster(offset: number, length: number, fn: (vc: number, inOff: number, n: number) => void): void {
    const cs = this.clusterSize;
    for (let pos = offset, end = offset + length; pos < end;) {
      const vc = Math.floor(pos / cs);
      const inOff = pos - vc * cs;
      const n = Math.min(cs - inOff, end - pos);
      fn(vc, inOff, n);
      pos += n;
    }
  }

  // ---- metadata: L2 tables, refcounts, allocation ----

  /** The L2 table holding `vc`'s entry (allocating a new table if there is none) and the entry's byte offset in it. */
  private l2Slot(vc: number): { meta: Meta; at: number } {
    const l1i = vc >>> this.l2Bits;
    const l1e = u64(this.l1, l1i * 8);
    let l2Off = num(l1e & L1E_OFFSET_MASK);
    let meta: Meta;
    if (l2Off === 0) {
      l2Off = this.allocCluster();
      meta = { off: l2Off, buf: Buffer.alloc(this.clusterSize), lo: 0, hi: this.clusterSize };
      this.l2Cache.set(l2Off, meta);
      this.l2Dirty.add(meta);
      this.l1.writeBigUInt64BE(BigInt(l2Off) | OFLAG_COPIED, l1i * 8);
      this.l1Dirty.add(l1i);
      this.stats.newL2Tables++;
    } else {
      if (!(l1e & OFLAG_COPIED)) throw this.corrupt(`L1 entry ${l1i} points at an L2 table shared with a snapshot (no COPIED flag)`);
      meta = this.l2Table(l2Off);
    }
    return { meta, at: (vc & (this.l2Entries - 1)) * 8 };
  }

  private setEntry(meta: Meta, at: number, e: bigint): void {
    meta.buf.writeBigUInt64BE(e, at);
    meta.lo = Math.min(meta.lo, at);
    meta.hi = Math.max(meta.hi, at + 8);
    this.l2Dirty.add(meta);
  }

  private l2Table(off: number): Meta {
    return this.loadMeta(this.l2Cache, off, 'L2 table');
  }

  private loadMeta(cache: Map<number, Meta>, off: number, what: string): Meta {
    let m = cache.get(off);
    if (m) return m;
    if (off % this.clusterSize !== 0) throw this.corrupt(`a ${what} offset ${off} is not cluster-aligned`);
    const buf = Buffer.alloc(this.clusterSize);
    const n = this.io.read(this.fd, buf, 0, buf.length, off);
    if (n < buf.length && off >= this.fileClusters * this.clusterSize) throw this.corrupt(`a ${what} at ${off} lies past the end of the file`);
    m = { off, buf, lo: this.clusterSize, hi: 0 };
    cache.set(off, m);
    return m;
  }

  /** Cluster `c`'s refcount (0 where no refcount block covers it). */
  refcount(c: number): number {
    const ti = Math.floor(c / 2 ** this.rbShift);
    if (ti * 8 >= this.refTable.length) return 0;
    const rb = num(u64(this.refTable, ti * 8) & REFT_OFFSET_MASK);
    if (rb === 0) return 0;
    return this.rcGet(this.loadMeta(this.rbCache, rb, 'refcount block').buf, c - ti * 2 ** this.rbShift);
  }

  private rcGet(b: Buffer, i: number): number {
    switch (this.refBits) {
      case 16: return b.readUInt16BE(i * 2);
      case 8: return b[i]!;
      case 32: return b.readUInt32BE(i * 4);
      case 64: return num(b.readBigUInt64BE(i * 8));
      default: {
        const bit = i * this.refBits;
        return (b[bit >> 3]! >> (bit & 7)) & ((1 << this.refBits) - 1);
      }
    }
  }

  /** Returns the byte range of the block that changed. */
  private rcSet(b: Buffer, i: number, v: number): number {
    switch (this.refBits) {
      case 16: b.writeUInt16BE(v, i * 2); return i * 2;
      case 8: b[i] = v; return i;
      case 32: b.writeUInt32BE(v, i * 4); return i * 4;
      case 64: b.writeBigUInt64BE(BigInt(v), i * 8); return i * 8;
      default: {
        const bit = i * this.refBits;
        const mask = ((1 << this.refBits) - 1) << (bit & 7);
        b[bit >> 3] = (b[bit >> 3]! & ~mask) | ((v << (bit & 7)) & mask);
        return bit >> 3;
      }
    }
  }

  /**
   * Sets cluster `c`'s refcount to `v` in memory. A cluster whose range has no refcount block
   * gets one, placed on the first cluster of that range that is free (it counts itself), which
   * is why this may allocate.
   */
  private setRefcount(c: number, v: number): void {
    const per = 2 ** this.rbShift;
    const ti = Math.floor(c / per);
    if (ti * 8 >= this.refTable.length) this.growRefTable(ti);
    let rb = num(u64(this.refTable, ti * 8) & REFT_OFFSET_MASK);
    if (rb === 0) rb = this.newRefBlock(ti, c);
    const meta = this.loadMeta(this.rbCache, rb, 'refcount block');
    const at = this.rcSet(meta.buf, c - ti * per, v);
    meta.lo = Math.min(meta.lo, at);
    meta.hi = Math.max(meta.hi, at + Math.max(1, this.refBits / 8));
    this.rbDirty.add(meta);
  }

  /** A new, empty refcount block for range `ti`, on its first free cluster other than `avoid`; returns its offset. */
  private newRefBlock(ti: number, avoid: number): number {
    const per = 2 ** this.rbShift;
    // Nothing in an uncovered range is counted, so every cluster of it but the one being
    // reserved (`avoid`) is free: take the first.
    let c = ti * per;
    if (c === avoid) c++;
    const off = c * this.clusterSize;
    const meta: Meta = { off, buf: Buffer.alloc(this.clusterSize), lo: 0, hi: this.clusterSize };
    this.rbDirty.add(meta);
    this.rcSet(meta.buf, c - ti * per, 1);
    this.rbCache.set(off, meta);
    this.refTable.writeBigUInt64BE(BigInt(off), ti * 8);
    this.refTableDirty.add(ti);
    if (c >= this.fileClusters) this.fileClusters = c + 1;
    this.stats.newRefBlocks++;
    return off;
  }

  /**
   * Makes the refcount table large enough for range `ti`: a new, larger table is written after
   * the end of the file with the refcount blocks its own clusters need, made durable, and only
   * then does the header point at it (one 12-byte write inside a sector); the old table's
   * clusters are freed after that. A crash before the header write leaves the old table in
   * charge and the new clusters leaked.
   */
  private growRefTable(ti: number): void {
    this.flush(); // a clean state: everything the old table covers is on disk and counted
    const cs = this.clusterSize;
    const per = 2 ** this.rbShift;
    const oldEntries = this.refTable.length / 8;
    let entries = Math.max(ti + 1, oldEntries * 2);
    let start = this.fileClusters;
    let tableClusters = 0;
    let blocks: number[] = [];
    // The table at `start`, new refcount blocks right after it; iterate until the clusters they
    // take are covered by the blocks and the table has room for every range.
    for (let round = 0; round < 64; round++) {
      tableClusters = Math.ceil((entries * 8) / cs);
      const need: number[] = [];
      let end = start + tableClusters;
      for (let k = 0; ; k++) {
        const last = end + need.length - 1;
        let changed = false;
        for (let r = Math.floor(start / per); r <= Math.floor(last / per); r++) {
          const covered = r < oldEntries && u64(this.refTable, r * 8) !== 0n;
          if (!covered && !need.includes(r)) {
            need.push(r);
            changed = true;
          }
        }
        if (!changed || k > 64) break;
      }
      end = start + tableClusters + need.length;
      const maxRange = Math.max(ti, ...need, Math.floor((end - 1) / per));
      if (maxRange < entries) {
        blocks = need;
        break;
      }
      entries = (maxRange + 1) * 2;
    }
    const table = Buffer.alloc(tableClusters * cs);
    this.refTable.copy(table);
    const blockOff = (k: number) => (start + tableClusters + k) * cs;
    const newBlocks = new Map<number, Buffer>();
    blocks.forEach((r, k) => {
      table.writeBigUInt64BE(BigInt(blockOff(k)), r * 8);
      newBlocks.set(r, Buffer.alloc(cs));
    });
    // Count the new clusters: in the new blocks where they cover them, else in existing blocks.
    const count = (c: number) => {
      const r = Math.floor(c / per);
      const nb = newBlocks.get(r);
      if (nb) this.rcSet(nb, c - r * per, 1);
      else this.setRefcount(c, 1);
    };
    const total = tableClusters + blocks.length;
    for (let k = 0; k < total; k++) count(start + k);
    // Existing blocks first (the counts of the new table's clusters that fall in covered ranges).
    this.writeDirty(this.rbDirty);
    blocks.forEach((r, k) => this.io.write(this.fd, newBlocks.get(r)!, 0, cs, blockOff(k)));
    this.io.write(this.fd, table, 0, table.length, start * cs);
    this.sync();
    const hdr = Buffer.alloc(12);
    hdr.writeBigUInt64BE(BigInt(start * cs), 0);
    hdr.writeUInt32BE(tableClusters, 8);
    this.io.write(this.fd, hdr, 0, 12, 48);
    this.sync();
    const oldOff = this.refTableOffset;
    const oldLen = this.refTable.length;
    this.refTable = table;
    this.refTableOffset = start * cs;
    this.header.refTableOffset = this.refTableOffset;
    this.header.refTableClusters = tableClusters;
    blocks.forEach((r, k) => this.rbCache.set(blockOff(k), { off: blockOff(k), buf: newBlocks.get(r)!, lo: cs, hi: 0 }));
    this.fileClusters = Math.max(this.fileClusters, start + total);
    this.refTableDirty.clear();
    // The old table is no longer referenced by the (durable) header.
    this.pendingFree.push([oldOff, oldLen]);
    this.stats.refTableGrowths++;
  }

  /** Reserves a free cluster (refcount 1 in memory) and returns its byte offset. */
  private allocCluster(): number {
    for (let c = this.freeHint; ; c++) {
      if (c >= this.fileClusters || this.refcount(c) === 0) {
        // The file end first: a refcount table that has to grow goes after `c`, not onto it.
        if (c >= this.fileClusters) this.fileClusters = c + 1;
        this.setRefcount(c, 1);
        this.freeHint = c + 1;
        this.stats.allocatedClusters++;
        return c * this.clusterSize;
      }
    }
  }

  /** Lowers the refcount of every cluster the host byte range [start, start + len) touches. */
  private release(start: number, len: number): void {
    const first = Math.floor(start / this.clusterSize);
    const last = Math.floor((start + len - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) {
      const r = this.refcount(c);
      if (r === 0) throw this.corrupt(`cluster ${c} is freed but its refcount is already 0`);
      this.setRefcount(c, r - 1);
      if (r === 1) {
        this.freeHint = Math.min(this.freeHint, c);
        this.stats.freedClusters++;
      }
    }
  }

  // ---- flushing ----

  /** Whether anything is waiting for a flush (metadata in memory, or freed clusters). */
  get dirty(): boolean {
    return this.rbDirty.size > 0 || this.l2Dirty.size > 0 || this.l1Dirty.size > 0 || this.refTableDirty.size > 0 || this.pendingFree.length > 0;
  }

  /**
   * Makes every write that completed before it durable, metadata in dependency order (see the
   * top of the file): refcount blocks, sync, refcount table, sync, L2 tables, sync, L1, sync.
   * Then the clusters no longer referenced are freed in memory.
   */
  flush(): void {
    if (this.readOnly || this.closed) return;
    this.stats.flushes++;
    this.writeDirty(this.rbDirty);
    this.sync(); // written data and refcounts
    if (this.refTableDirty.size) {
      this.writeEntries(this.refTable, this.refTableDirty, this.refTableOffset);
      this.sync();
    }
    if (this.writeDirty(this.l2Dirty)) this.sync();
    if (this.l1Dirty.size) {
      this.writeEntries(this.l1, this.l1Dirty, this.header.l1Offset);
      this.sync();
    }
    const frees = this.pendingFree;
    this.pendingFree = [];
    for (const [start, len] of frees) this.release(start, len);
  }

  private sync(): void {
    this.io.sync(this.fd);
    this.stats.syncs++;
  }

  /** Writes the dirty bytes of the tables in `set` (whole 512-byte sectors), in file order; returns whether it wrote. */
  private writeDirty(set: Set<Meta>): boolean {
    if (set.size === 0) return false;
    for (const m of [...set].sort((a, b) => a.off - b.off)) {
      // Each is clean once written: a failed write leaves the rest in the set for the next flush.
      if (m.lo < m.hi) {
        const lo = m.lo - (m.lo % 512);
        const hi = Math.min(m.buf.length, Math.ceil(m.hi / 512) * 512);
        this.io.write(this.fd, m.buf, lo, hi - lo, m.off + lo);
        m.lo = m.buf.length;
        m.hi = 0;
      }
      set.delete(m);
    }
    return true;
  }

  /** Writes the sectors of an in-memory table (L1, refcount table) that hold the dirty entries. */
  private writeEntries(table: Buffer, dirty: Set<number>, at: number): void {
    const sectors = new Set<number>();
    for (const i of dirty) sectors.add(Math.floor((i * 8) / 512));
    for (const s of [...sectors].sort((a, b) => a - b)) {
      const lo = s * 512;
      const hi = Math.min(table.length, lo + 512);
      this.io.write(this.fd, table, lo, hi - lo, at + lo);
    }
    dirty.clear();
  }

  /** Keeps the caches under their limit: past it, everything is flushed and the clean tables dropped. */
  private trimCache(): void {
    const bytes = (this.l2Cache.size + this.rbCache.size) * this.clusterSize;
    if (bytes <= this.cacheLimit) return;
    this.flush();
    this.flush(); // the second writes the refcounts the first one freed
    for (const c of [this.l2Cache, this.rbCache]) for (const [off, m] of c) if (!this.l2Dirty.has(m) && !this.rbDirty.has(m)) c.delete(off);
  }

  // ---- the rest ----

  /** Flushes (twice: the freed clusters' refcounts too, so a clean close leaks nothing) and closes the files. */
  close(): void {
    if (this.closed) return;
    try {
      if (!this.readOnly) {
        this.flush();
        if (this.dirty) this.flush();
      }
    } finally {
      this.abandon();
    }
  }

  /** Closes the files without flushing anything: what a crash leaves (tests). */
  abandon(): void {
    if (this.closed) return;
    this.closed = true;
    try {
      closeSync(this.fd);
    } finally {
      this.backing?.close();
    }
  }

  /** What the image is, for `ublk list -v`. */
  describe(): Record<string, unknown> {
    const hd = this.header;
    return {
      version: hd.version, cluster_size: this.clusterSize, virtual_size: this.size, refcount_bits: this.refBits,
      ...(hd.snapshots ? { snapshots: hd.snapshots } : {}),
      ...(hd.compatible & 1n ? { lazy_refcounts_allowed: true } : {}),
      ...(this.backing ? { backing_chain: this.backing.chain } : {}),
    };
  }

  private checkRange(offset: number, len: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || len < 0 || offset + len > this.size) {
      throw ioError('EINVAL', `qcow2: ${len} bytes at ${offset} is outside the ${this.size}-byte image`);
    }
  }

  private checkWritable(): void {
    if (this.readOnly) throw ioError('EROFS', `qcow2: ${this.path} is open read-only`);
  }

  private corrupt(what: string): Error {
    return ioError('EIO', `qcow2: ${this.path} is damaged: ${what} (qemu-img check tells more)`);
  }
}

let zeros = Buffer.alloc(0);
function zeroBuf(len: number): Buffer {
  if (zeros.length < len) zeros = Buffer.alloc(len);
  return zeros;
}
