/**
 * The completion ring of an async target's queue: results travel from the main thread (which
 * runs the target's async functions) to the queue's thread (which commits them to the kernel)
 * through shared memory, one (tag, result) entry per request. Both sides use this module.
 *
 * Layout over a SharedArrayBuffer, as u32 words:
 *
 *   [0] tail   written by the producer (main thread), after the entry it covers
 *   [1] head   written by the consumer (queue thread), after it read the entries before it
 *   [4 + 2i] tag, [5 + 2i] result (an i32)   for i = counter & (capacity - 1)
 *
 * The counters run freely as u32 values and wrap at 2^32, like io_uring's: differences are taken
 * `>>> 0`, so a ring that has carried 2^32 completions (11 hours at 100k IOPS) goes on working.
 * The capacity is a power of two so that wrapping at 2^32 keeps the slot sequence continuous
 * (2^32 is a multiple of it; with `% depth` and a depth of 3 two consecutive counters would
 * share a slot). A queue never has more than `depth` requests outstanding, so it cannot overflow;
 * push() checks anyway.
 *
 * Memory order: the producer writes the entry, then publishes the tail with Atomics.store; the
 * consumer loads the tail with Atomics.load before reading entries, and publishes the head after.
 * (The same release/acquire pairs as the io_uring rings, see src/uring/ring.ts.)
 */

const TAIL = 0;
const HEAD = 1;
const HEADER_WORDS = 4;

/** The smallest power of two >= n. */
function capacityFor(depth: number): number {
  let c = 1;
  while (c < depth) c <<= 1;
  return c;
}

export class CompletionRing {
  private readonly words: Uint32Array;
  private readonly results: Int32Array;
  private readonly mask: number;

  /** Bytes of shared memory the ring of a `depth`-deep queue needs. */
  static bytes(depth: number): number {
    return (HEADER_WORDS + capacityFor(depth) * 2) * 4;
  }

  /**
   * A view of the ring in `shared` (made by the server with {@link bytes}). `start` sets both
   * counters, for a new ring only: tests start near 2^32 to cross the wrap.
   */
  constructor(shared: SharedArrayBuffer, depth: number, start?: number) {
    const capacity = capacityFor(depth);
    if (shared.byteLength < CompletionRing.bytes(depth)) {
      throw new RangeError(`a completion ring for depth ${depth} needs ${CompletionRing.bytes(depth)} bytes, got ${shared.byteLength}`);
    }
    this.words = new Uint32Array(shared);
    this.results = new Int32Array(shared);
    this.mask = capacity - 1;
    if (start !== undefined) {
      Atomics.store(this.words, HEAD, start >>> 0);
      Atomics.store(this.words, TAIL, start >>> 0);
    }
  }

  /** Entries pushed and not yet taken. */
  get pending(): number {
    return (Atomics.load(this.words, TAIL) - Atomics.load(this.words, HEAD)) >>> 0;
  }

  /** Producer: appends one completion. */
  push(tag: number, result: number): void {
    const tail = this.words[TAIL]!; // only the producer writes it
    if (((tail - Atomics.load(this.words, HEAD)) >>> 0) > this.mask) {
      throw new Error(`completion ring full (${this.mask + 1} entries): more requests outstanding than the queue depth`);
    }
    const i = HEADER_WORDS + (tail & this.mask) * 2;
    this.words[i] = tag;
    this.results[i + 1] = result;
    Atomics.store(this.words, TAIL, (tail + 1) >>> 0); // release: the entry before the tail
  }

  /** Consumer: calls `fn` for every completion pushed so far, oldest first; returns how many. */
  drain(fn: (tag: number, result: number) => void): number {
    let head = this.words[HEAD]!; // only the consumer writes it
    const tail = Atomics.load(this.words, TAIL); // acquire: the entries before it are written
    let n = 0;
    while (head !== tail) {
      const i = HEADER_WORDS + (head & this.mask) * 2;
      const tag = this.words[i]!;
      const result = this.results[i + 1]!;
      head = (head + 1) >>> 0;
      Atomics.store(this.words, HEAD, head); // the slot may be reused from here on
      n++;
      fn(tag, result);
    }
    return n;
  }
}
