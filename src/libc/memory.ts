/**
 * Memory the kernel reads or writes: rings, SQE arrays, I/O buffers, iovecs, timespecs.
 *
 * The rule this module enforces: an address handed to the kernel must point at memory that no
 * garbage collector can move or free. V8 may keep small typed arrays on its movable heap, and a
 * Buffer freed before its completion arrives turns into a use-after-free in the kernel. So every
 * such byte lives in a {@link Mapping} we obtained with mmap(2) ourselves; JS sees it through a
 * zero-copy `koffi.view` ArrayBuffer, and it stays mapped until {@link Mapping.unmap} is called
 * explicitly (after the last completion that uses it).
 */
import koffi from 'koffi';
import * as sys from './sys.js';
import {
  MAP_ANONYMOUS, MAP_NORESERVE, MAP_POPULATE, MAP_PRIVATE, MAP_SHARED, MADV_DONTFORK, PROT_READ, PROT_WRITE,
} from './abi.js';

/** Rounds `n` up to a multiple of the page size. */
export function pageAlign(n: number): number {
  return Math.ceil(n / sys.PAGE_SIZE) * sys.PAGE_SIZE;
}

export interface AnonymousOptions {
  /** Fault the pages in now (MAP_POPULATE), so the first I/O does not pay for it. */
  populate?: boolean;
  /**
   * Keep the pages out of a forked child (MADV_DONTFORK). Registered buffers want this: a
   * fork would otherwise make them copy-on-write in the parent and the kernel's pinned pages
   * would no longer be the ones the parent sees.
   */
  dontFork?: boolean;
  /**
   * MAP_NORESERVE: do not charge the whole length against the overcommit limit up front; pages
   * are allocated as they are first written (a RAM disk larger than what it holds).
   */
  noReserve?: boolean;
}

/**
 * The largest region we put a single ArrayBuffer over: koffi.view aborts the process (a fatal
 * N-API error, not an exception) for 8 GiB, and Node 20's Buffers stop at 4 GiB. Larger
 * mappings are fine; they are read through {@link Mapping.bytes} windows instead.
 */
export const MAX_VIEW_BYTES = 2 ** 30;

/** One mmapped region, with typed views over it. */
export class Mapping {
  /** The address, as a number (user-space addresses are below 2^47, so exact). */
  readonly address: number;
  /** The mapped length in bytes (a multiple of the page size). */
  readonly length: number;
  private buf: ArrayBuffer | null = null;
  private live = true;
  private u8_: Uint8Array | null = null;
  private u32_: Uint32Array | null = null;
  private dv_: DataView | null = null;

  /** False for a window made by {@link slice}: unmapping it is the parent's business. */
  private readonly owner: boolean;

  private constructor(address: number, length: number, owner = true) {
    this.address = address;
    this.length = length;
    this.owner = owner;
  }

  /**
   * A non-owning Mapping over memory another part of this process mapped (a worker thread
   * handed the address of its device's RAM disk, say). The caller guarantees the memory outlives
   * every use; `unmap()` only drops the views.
   */
  static borrow(address: number, length: number): Mapping {
    return new Mapping(address, length, false);
  }

  /**
   * A non-owning window over `[offset, offset + length)` of this mapping: its own views start at
   * `offset`, its `unmap()` does nothing, and it dies with the parent.
   */
  slice(offset: number, length = this.length - offset): Mapping {
    if (offset < 0 || length <= 0 || offset + length > this.length) {
      throw new RangeError(`slice(${offset}, ${length}) outside a mapping of ${this.length}`);
    }
    return new Mapping(this.address + offset, length, false);
  }

  /** Anonymous private memory, zero-filled and page-aligned: for buffers and small structs. */
  static anonymous(length: number, opts: AnonymousOptions = {}): Mapping {
    const len = pageAlign(Math.max(1, length));
    const flags = MAP_PRIVATE | MAP_ANONYMOUS | (opts.populate ? MAP_POPULATE : 0) | (opts.noReserve ? MAP_NORESERVE : 0);
    const addr = sys.mmap(0, len, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (opts.dontFork) {
      try {
        sys.madvise(addr, len, MADV_DONTFORK);
      } catch (e) {
        sys.munmap(addr, len);
        throw e;
      }
    }
    return new Mapping(addr, len);
  }

  /** A shared mapping of `fd` at `offset` (ring memory, ublk descriptor arrays). */
  static file(fd: number, length: number, offset: number, prot = PROT_READ | PROT_WRITE, populate = true): Mapping {
    const len = pageAlign(length);
    const addr = sys.mmap(0, len, prot, MAP_SHARED | (populate ? MAP_POPULATE : 0), fd, offset);
    return new Mapping(addr, len);
  }

  get mapped(): boolean {
    return this.live;
  }

  /** The whole region as an ArrayBuffer (zero-copy; invalid after unmap). At most MAX_VIEW_BYTES. */
  get buffer(): ArrayBuffer {
    if (!this.live) throw new Error('mapping used after unmap');
    if (this.length > MAX_VIEW_BYTES) {
      throw new RangeError(`a mapping of ${this.length} bytes is too large for one view: use bytes(offset, length)`);
    }
    return (this.buf ??= koffi.view(this.address, this.length) as ArrayBuffer);
  }

  get u8(): Uint8Array {
    return (this.u8_ ??= new Uint8Array(this.buffer));
  }

  get u32(): Uint32Array {
    return (this.u32_ ??= new Uint32Array(this.buffer));
  }

  /** A little-endian-agnostic DataView: always pass `true` for little endian. */
  get view(): DataView {
    return (this.dv_ ??= new DataView(this.buffer));
  }

  /** A Buffer over `[offset, offset + length)` of this mapping (zero-copy). */
  bytes(offset = 0, length = this.length - offset): Buffer {
    if (offset < 0 || length < 0 || offset + length > this.length) {
      throw new RangeError(`bytes(${offset}, ${length}) outside a mapping of ${this.length}`);
    }
    if (this.length <= MAX_VIEW_BYTES) return Buffer.from(this.buffer, offset, length);
    if (!this.live) throw new Error('mapping used after unmap');
    if (length > MAX_VIEW_BYTES) throw new RangeError(`bytes(${offset}, ${length}): at most ${MAX_VIEW_BYTES} bytes per view`);
    return Buffer.from(koffi.view(this.address + offset, Math.max(length, 1)) as ArrayBuffer, 0, length);
  }

  /**
   * Unmaps the region. Every view handed out before stays pointing at unmapped memory: touching
   * one afterwards is a SIGSEGV, which is why callers unmap only once the kernel and JS are done.
   * V8 cannot detach a koffi external buffer, so we drop our own references and refuse further use.
   */
  unmap(): void {
    if (!this.live) return;
    this.live = false;
    this.buf = null;
    this.u8_ = null;
    this.u32_ = null;
    this.dv_ = null;
    if (this.owner) sys.munmap(this.address, this.length);
  }

  [Symbol.dispose](): void {
    this.unmap();
  }
}

/**
 * Runs `fn` with a fresh zeroed mapping of `size` bytes and unmaps it afterwards: for arguments
 * the kernel reads or fills only during one synchronous call (io_uring_register's, ioctl's).
 */
export function withScratch<T>(size: number, fn: (m: Mapping) => T): T {
  const m = Mapping.anonymous(size);
  try {
    return fn(m);
  } finally {
    m.unmap();
  }
}
