/**
 * The fault target: a disk over a backing file that misbehaves on purpose, for testing what runs
 * on top of it (file systems, databases, this project's own clients).
 *
 *   ublk add -t fault -f FILE [--latency-ms N] [--latency-jitter-ms N]
 *            [--error-at OFFSET[:LENGTH][:read|write|any]]... [--error-rate P] [--error-errno NAME]
 *            [--power-cut-file PATH | --power-cut-after-writes N] [--power-cut-mode drop|tear]
 *            [--seed N] [--record TRACE] [--cache-max SIZE]
 *
 * It must be served by one queue (`-q 1`): its write cache and power cut live in that queue's
 * thread; `open` refuses any other queue.
 *
 * - Latency: every request waits `--latency-ms` plus a uniform `0..--latency-jitter-ms` before it
 *   is served (a timer; requests then complete out of order).
 * - Errors: a READ (`read`), WRITE/WRITE_ZEROES/DISCARD (`write`) or any of them (`any`, the
 *   default) that overlaps a `--error-at` byte range fails (LENGTH defaults to 4K; sizes take
 *   K/M/G; the option may be repeated or take a comma-separated list); `--error-rate P` fails
 *   any request, FLUSH included, with probability P. Both fail with EIO, or the errno
 *   `--error-errno` names (ENOSPC, ETIMEDOUT, ...). A failed request changes nothing.
 * - A volatile write cache: a WRITE (or WRITE_ZEROES, DISCARD) that is not FUA is kept in memory
 *   (4 KiB blocks, by index), and reads see it. FLUSH writes the cached blocks to the file in the
 *   order they were last written, then fdatasyncs. A FUA write goes to the file, which is then
 *   fdatasynced, at once. The device advertises a volatile cache and FUA. Past `--cache-max`
 *   (default 256M) the oldest blocks are written to the file without a FLUSH (a disk's cache
 *   writes back on its own too): they survive a power cut.
 * - A power cut, when the file `--power-cut-file` appears (looked for on every request and every
 *   100 ms) or right after the N-th completed WRITE (`--power-cut-after-writes`, WRITE requests
 *   only). `--power-cut-mode drop` (default) forgets every cached block; `tear` writes a random
 *   subset of them (each with probability 1/2, in cache order, drawn from `--seed`; see
 *   {@link tornBlocks}) and forgets the rest. From then on every request fails with EIO: the
 *   disk is gone. The log says how many writes and blocks were lost or torn.
 * - `--record TRACE`: every completed WRITE (with its data), WRITE_ZEROES, DISCARD and FLUSH,
 *   in the order they completed, whatever the cache did with them (trace.ts has the format);
 *   `ublk replay TRACE --to PATH [--until-flush N]` applies one.
 *
 * Without a power cut, closing the queue writes the cache to the file. The seed is chosen at
 * random when not given and is printed in the log, so that a run can be repeated.
 */
import { closeSync, constants as fsc, existsSync, fdatasyncSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { randomInt } from 'node:crypto';
import { defineAsyncTarget, type AsyncHandlers, type AsyncQueueInfo } from '../ublk/async-target.js';
import { TargetError } from '../ublk/target.js';
import { checkRange, ioError, LAYER_BLOCK, LAYER_SHAPE, openSized, readFullOrZeros, seededRandom, writeFull } from './layer-io.js';
import { parseOptions, parseSize, UsageError } from './options.js';
import { TraceWriter, traceFileProblem } from './trace.js';

export type ErrorOp = 'read' | 'write' | 'any';

export interface ErrorRange {
  offset: number;
  length: number;
  op: ErrorOp;
}

export interface FaultOptions {
  /** The backing file or block device, absolute. */
  file: string;
  latencyMs: number;
  latencyJitterMs: number;
  errorAt: ErrorRange[];
  /** Probability in [0, 1] that a request fails. */
  errorRate: number;
  /** The errno name injected errors carry. */
  errorErrno: string;
  powerCutFile?: string;
  powerCutAfterWrites?: number;
  powerCutMode: 'drop' | 'tear';
  seed: number;
  /** The trace file, absolute. */
  record?: string;
  /** Bytes the cache holds before it writes its oldest blocks back. */
  cacheMax: number;
}

interface FaultDevice {
  sizeBytes: number;
}

const MAX_SEED = 2 ** 32 - 1;
const POLL_MS = 100;

/** Parses one `--error-at` item: `OFFSET[:LENGTH][:read|write|any]`. */
export function parseErrorRange(item: string): ErrorRange {
  const bad = () => new UsageError(`fault: --error-at takes OFFSET[:LENGTH][:read|write|any] with sizes like 4096 or 1M, got '${item}'`);
  const parts = item.split(':');
  if (parts.length > 3 || parts.some((p) => p === '')) throw bad();
  let op: ErrorOp = 'any';
  const last = parts[parts.length - 1]!;
  if (parts.length > 1 && (last === 'read' || last === 'write' || last === 'any')) {
    op = last;
    parts.pop();
  } else if (parts.length === 3) {
    throw bad();
  }
  if (parts.length > 2) throw bad();
  let offset: number;
  let length = LAYER_BLOCK;
  try {
    offset = parseSize(parts[0], '--error-at', true);
    if (parts[1] !== undefined) length = parseSize(parts[1], '--error-at');
  } catch {
    throw bad();
  }
  return { offset, length, op };
}

/** Parses `--error-rate`: a probability from 0 to 1 (`0.01`, `.5`, `1`). */
function parseRate(value: string): number {
  if (!/^(\d+(\.\d*)?|\.\d+)$/.test(value) || Number(value) > 1) {
    throw new UsageError(`fault: --error-rate takes a probability from 0 to 1 (like 0.01), got '${value}'`);
  }
  return Number(value);
}

function parseErrno(value: string): string {
  const name = value.toUpperCase();
  const n = (osConstants.errno as Record<string, number>)[name];
  if (!/^E[A-Z0-9]+$/.test(name) || n === undefined || n <= 0) {
    throw new UsageError(`fault: --error-errno takes an errno name like EIO, ENOSPC or ETIMEDOUT, got '${value}'`);
  }
  return name;
}

/**
 * The subset of cached blocks a torn power cut writes: `blocks` in cache order, each kept with
 * probability 1/2 drawn from `seed`. The same blocks and seed always give the same subset.
 */
export function tornBlocks(blocks: readonly number[], seed: number): number[] {
  const rnd = seededRandom(seed);
  return blocks.filter(() => rnd() < 0.5);
}

export default defineAsyncTarget<FaultOptions>({
  name: 'fault',
  usage: [
    '  -f, --file FILE               the backing file or block device (required; a multiple of 4096 bytes)',
    '  --latency-ms N                delay every request by N ms (default 0)',
    '  --latency-jitter-ms N         and by up to N ms more, at random',
    '  --error-at OFFSET[:LENGTH][:read|write|any]',
    '                                fail requests that overlap these bytes (LENGTH default 4K;',
    '                                repeat the option or give a comma-separated list)',
    '  --error-rate P                fail any request with probability P (0 to 1)',
    '  --error-errno NAME            the errno injected errors carry (default EIO; ENOSPC, ETIMEDOUT, ...)',
    '  --power-cut-file PATH         cut the power when PATH appears (checked per request and every 100 ms)',
    '  --power-cut-after-writes N    cut the power right after the N-th completed WRITE',
    '  --power-cut-mode drop|tear    at the cut, forget the unflushed writes (drop, default) or write',
    '                                a random subset of their blocks (tear); then every request fails',
    '  --seed N                      seed of the random choices (default: random, printed in the log)',
    '  --record TRACE                append every completed write, zeroes, discard and flush to TRACE',
    '                                (ublk replay TRACE --to PATH applies it)',
    '  --cache-max SIZE              unflushed data kept before the oldest is written back (default 256M)',
    '  (add it with -q 1, the default: the write cache and the power cut live in one queue)',
    '',
  ].join('\n'),
  counters: ['injected_errors', 'cached_blocks', 'fua_writes', 'flushes', 'flushed_blocks', 'written_back_blocks', 'lost_blocks', 'torn_blocks'],

  parseArgs(argv) {
    // --error-at may be repeated: its items are taken out first, the rest parsed as usual.
    const errorItems: string[] = [];
    const rest: string[] = [];
    for (let i = 0; i < argv.length; i++) {
      const a = argv[i]!;
      if (a === '--error-at') {
        const v = argv[++i];
        if (v === undefined || v.startsWith('-')) throw new UsageError('fault: --error-at takes a value');
        errorItems.push(...v.split(','));
      } else if (a.startsWith('--error-at=')) {
        errorItems.push(...a.slice('--error-at='.length).split(','));
      } else {
        rest.push(a);
      }
    }
    const { values } = parseOptions('fault', rest, [
      { key: 'file', names: ['-f', '--file'], kind: 'string' },
      { key: 'latencyMs', names: ['--latency-ms'], kind: 'count', min: 0, max: 600_000 },
      { key: 'latencyJitterMs', names: ['--latency-jitter-ms'], kind: 'count', min: 0, max: 600_000 },
      { key: 'errorRate', names: ['--error-rate'], kind: 'string' },
      { key: 'errorErrno', names: ['--error-errno'], kind: 'string' },
      { key: 'powerCutFile', names: ['--power-cut-file'], kind: 'string' },
      { key: 'powerCutAfterWrites', names: ['--power-cut-after-writes'], kind: 'count', min: 1 },
      { key: 'powerCutMode', names: ['--power-cut-mode'], kind: 'string' },
      { key: 'seed', names: ['--seed'], kind: 'count', min: 0, max: MAX_SEED },
      { key: 'record', names: ['--record'], kind: 'string' },
      { key: 'cacheMax', names: ['--cache-max'], kind: 'size', min: LAYER_BLOCK },
    ]);
    const file = values.file as string | undefined;
    if (!file) throw new UsageError('fault needs a backing file: -f FILE');
    const mode = (values.powerCutMode as string | undefined) ?? 'drop';
    if (mode !== 'drop' && mode !== 'tear') throw new UsageError(`fault: --power-cut-mode takes drop or tear, got '${mode}'`);
    const hasCut = values.powerCutFile !== undefined || values.powerCutAfterWrites !== undefined;
    if (values.powerCutMode !== undefined && !hasCut) {
      throw new UsageError('fault: --power-cut-mode needs a power cut: --power-cut-file PATH or --power-cut-after-writes N');
    }
    if (values.powerCutFile !== undefined && values.powerCutAfterWrites !== undefined) {
      throw new UsageError('fault: --power-cut-file and --power-cut-after-writes exclude each other (one power cut per run)');
    }
    const errorAt = errorItems.map(parseErrorRange);
    return {
      file: resolve(file),
      latencyMs: (values.latencyMs as number | undefined) ?? 0,
      latencyJitterMs: (values.latencyJitterMs as number | undefined) ?? 0,
      errorAt,
      errorRate: values.errorRate !== undefined ? parseRate(values.errorRate as string) : 0,
      errorErrno: values.errorErrno !== undefined ? parseErrno(values.errorErrno as string) : 'EIO',
      powerCutFile: values.powerCutFile !== undefined ? resolve(values.powerCutFile as string) : undefined,
      powerCutAfterWrites: values.powerCutAfterWrites as number | undefined,
      powerCutMode: mode,
      // Chosen here when not given, so that the saved options (and a recovering server) keep it.
      seed: (values.seed as number | undefined) ?? randomInt(0, MAX_SEED),
      record: values.record !== undefined ? resolve(values.record as string) : undefined,
      cacheMax: (values.cacheMax as number | undefined) ?? 256 * 2 ** 20,
    };
  },

  prepare(o) {
    const f = openSized(o.file, fsc.O_RDWR, 'fault', '-f');
    closeSync(f.fd);
    if (f.size < LAYER_BLOCK || f.size % LAYER_BLOCK !== 0) {
      throw new TargetError(`fault: -f ${o.file} has ${f.size} bytes; the fault layer serves 4096-byte blocks, so it must be a non-zero multiple of 4096 (truncate -s it)`);
    }
    if (o.powerCutFile !== undefined && existsSync(o.powerCutFile)) {
      throw new TargetError(`fault: the power-cut file ${o.powerCutFile} exists already, so the power would be cut at once: remove it first`);
    }
    if (o.record !== undefined) {
      const problem = traceFileProblem(o.record, f.size);
      if (problem) throw new TargetError(`fault: --record: ${problem}`);
    }
    const device: FaultDevice = { sizeBytes: f.size };
    return {
      sizeBytes: f.size,
      ...LAYER_SHAPE,
      queueLimit: { max: 1, reason: 'its write cache and power cut live in one queue\'s thread' },
      describe: {
        file: o.file, seed: o.seed,
        ...(o.latencyMs || o.latencyJitterMs ? { latency_ms: o.latencyMs, latency_jitter_ms: o.latencyJitterMs } : {}),
        ...(o.errorAt.length ? { error_at: o.errorAt } : {}),
        ...(o.errorRate ? { error_rate: o.errorRate } : {}),
        ...(o.errorAt.length || o.errorRate ? { error_errno: o.errorErrno } : {}),
        ...(o.powerCutFile !== undefined ? { power_cut_file: o.powerCutFile } : {}),
        ...(o.powerCutAfterWrites !== undefined ? { power_cut_after_writes: o.powerCutAfterWrites } : {}),
        ...(o.powerCutFile !== undefined || o.powerCutAfterWrites !== undefined ? { power_cut_mode: o.powerCutMode } : {}),
        ...(o.record !== undefined ? { record: o.record } : {}),
      },
      queueData: device,
    };
  },

  open(o, queue) {
    if (queue.qid > 0) {
      throw new Error(`fault: the fault layer serves one queue (-q 1): its write cache and power cut live in one queue's thread, and this is queue ${queue.qid}`);
    }
    return new FaultQueue(o, queue);
  },
});

const C_ERRORS = 0;
const C_CACHED = 1;
const C_FUA = 2;
const C_FLUSHES = 3;
const C_FLUSHED = 4;
const C_WRITTEN_BACK = 5;
const C_LOST = 6;
const C_TORN = 7;

const OP_READ = 0;
const OP_WRITE = 1;
const OP_FLUSH = 2;
const OP_DISCARD = 3;
const OP_ZEROES = 5;
const OP_NAMES: Record<number, string> = { [OP_READ]: 'READ', [OP_WRITE]: 'WRITE', [OP_FLUSH]: 'FLUSH', [OP_DISCARD]: 'DISCARD', [OP_ZEROES]: 'WRITE_ZEROES' };

/** A cached block of zeros (WRITE_ZEROES, DISCARD): one buffer for all of them. */
const ZERO_BLOCK = Buffer.alloc(LAYER_BLOCK);

/** The one queue: cache, faults and trace, in this thread. */
class FaultQueue implements AsyncHandlers {
  private readonly fd: number;
  private readonly sizeBytes: number;
  private readonly trace: TraceWriter | undefined;
  /** Unflushed blocks by index, in the order they were last written (a Map keeps insertion order). */
  private readonly cache = new Map<number, Buffer>();
  /** Cached blocks that hold their own buffer (not ZERO_BLOCK): what --cache-max limits. */
  private cachedData = 0;
  /** Write requests (WRITE, WRITE_ZEROES, DISCARD) with data in the cache since the last FLUSH. */
  private unflushedWrites = 0;
  private completedWrites = 0;
  private cut = false;
  private readonly random: () => number;
  private readonly timer: ReturnType<typeof setInterval> | undefined;

  constructor(private readonly o: FaultOptions, private readonly queue: AsyncQueueInfo) {
    this.sizeBytes = (queue.device as FaultDevice).sizeBytes;
    const f = openSized(o.file, fsc.O_RDWR, 'fault', '-f');
    this.fd = f.fd;
    try {
      if (f.size < this.sizeBytes) throw new TargetError(`fault: -f ${o.file} shrank to ${f.size} bytes, less than the ${this.sizeBytes}-byte device`);
      this.trace = o.record !== undefined ? TraceWriter.open(o.record, this.sizeBytes) : undefined;
    } catch (e) {
      closeSync(this.fd);
      throw e;
    }
    // Errors and jitter draw from their own sequence: the torn subset depends on the seed alone.
    this.random = seededRandom(o.seed ^ 0x5bd1e995);
    if (o.powerCutFile !== undefined) {
      const path = o.powerCutFile;
      this.timer = setInterval(() => {
        if (!this.cut && existsSync(path)) this.powerCut(`${path} appeared`);
      }, POLL_MS);
      this.timer.unref?.();
    }
    queue.log(`fault: serving ${o.file} (${this.sizeBytes} bytes), seed ${o.seed}${o.record ? `, recording to ${o.record}` : ''}`);
  }

  read(offset: number, buf: Buffer): void | Promise<void> {
    return this.serve(OP_READ, offset, buf.length, () => this.doRead(offset, buf));
  }

  write(offset: number, buf: Buffer, fua: boolean): void | Promise<void> {
    return this.serve(OP_WRITE, offset, buf.length, () => this.doWrite(offset, buf, fua));
  }

  flush(): void | Promise<void> {
    return this.serve(OP_FLUSH, 0, 0, () => this.doFlush());
  }

  writeZeroes(offset: number, length: number): void | Promise<void> {
    return this.serve(OP_ZEROES, offset, length, () => this.doZeroes(OP_ZEROES, offset, length));
  }

  discard(offset: number, length: number): void | Promise<void> {
    return this.serve(OP_DISCARD, offset, length, () => this.doZeroes(OP_DISCARD, offset, length));
  }

  close(): void {
    if (this.timer !== undefined) clearInterval(this.timer);
    try {
      if (!this.cut && this.cache.size) {
        // Not a FLUSH the device completed, so not in the trace: the server is leaving cleanly.
        this.writeBack(this.cache.size);
        fdatasyncSync(this.fd);
      }
    } finally {
      this.trace?.close();
      closeSync(this.fd);
    }
  }

  /** The power cut: the cache is dropped or torn, and the disk is gone for good. */
  powerCut(reason: string): void {
    if (this.cut) return;
    this.cut = true;
    if (this.timer !== undefined) clearInterval(this.timer);
    const blocks = [...this.cache.keys()];
    const writes = this.unflushedWrites;
    let line: string;
    if (this.o.powerCutMode === 'tear') {
      const torn = tornBlocks(blocks, this.o.seed);
      for (const i of torn) writeFull(this.fd, this.cache.get(i)!, 0, LAYER_BLOCK, i * LAYER_BLOCK);
      if (torn.length) fdatasyncSync(this.fd);
      this.count(C_TORN, torn.length);
      this.count(C_LOST, blocks.length - torn.length);
      line = `fault: power cut (${reason}), mode tear, seed ${this.o.seed}: ${writes} unflushed writes torn: ${torn.length} of their ${blocks.length} blocks reached ${this.o.file}, ${blocks.length - torn.length} were lost`;
    } else {
      this.count(C_LOST, blocks.length);
      line = `fault: power cut (${reason}), mode drop: ${writes} unflushed writes lost (${blocks.length} blocks)`;
    }
    this.cache.clear();
    this.cachedData = 0;
    this.unflushedWrites = 0;
    this.queue.log(`${line}; every request fails with EIO from now on`);
  }

  /** Whether the power was cut (for tests). */
  get powerIsCut(): boolean {
    return this.cut;
  }

  /** Runs `fn` after the latency, if the disk is still there and no fault is injected. */
  private serve(op: number, offset: number, length: number, fn: () => void): void | Promise<void> {
    this.checkPower();
    const o = this.o;
    const delay = o.latencyMs + (o.latencyJitterMs ? this.random() * o.latencyJitterMs : 0);
    if (delay > 0) {
      return sleep(delay).then(() => {
        this.checkPower();
        this.inject(op, offset, length);
        fn();
      });
    }
    this.inject(op, offset, length);
    fn();
  }

  private checkPower(): void {
    if (!this.cut && this.o.powerCutFile !== undefined && existsSync(this.o.powerCutFile)) this.powerCut(`${this.o.powerCutFile} appeared`);
    if (this.cut) throw ioError('EIO', 'fault: the power was cut: the disk is gone');
  }

  private inject(op: number, offset: number, length: number): void {
    const o = this.o;
    let hit = false;
    if (op !== OP_FLUSH) {
      for (const r of o.errorAt) {
        if (r.op === 'read' ? op !== OP_READ : r.op === 'write' ? op === OP_READ : false) continue;
        if (offset < r.offset + r.length && r.offset < offset + length) {
          hit = true;
          break;
        }
      }
    }
    if (!hit && o.errorRate > 0 && this.random() < o.errorRate) hit = true;
    if (!hit) return;
    this.count(C_ERRORS, 1);
    throw ioError(o.errorErrno, `fault: injected ${o.errorErrno} for ${OP_NAMES[op]} of ${length} bytes at ${offset}`);
  }

  private doRead(offset: number, buf: Buffer): void {
    checkRange('fault', offset, buf.length, this.sizeBytes);
    readFullOrZeros(this.fd, buf, 0, buf.length, offset);
    if (this.cache.size === 0) return;
    const first = offset / LAYER_BLOCK;
    for (let k = 0; k < buf.length / LAYER_BLOCK; k++) {
      const c = this.cache.get(first + k);
      if (c) c.copy(buf, k * LAYER_BLOCK);
    }
  }

  private doWrite(offset: number, buf: Buffer, fua: boolean): void {
    checkRange('fault', offset, buf.length, this.sizeBytes);
    const first = offset / LAYER_BLOCK;
    const n = buf.length / LAYER_BLOCK;
    if (fua) {
      writeFull(this.fd, buf, 0, buf.length, offset);
      // The cached versions are older than this one: a later FLUSH must not write them over it.
      for (let k = 0; k < n; k++) this.uncache(first + k);
      fdatasyncSync(this.fd);
      this.count(C_FUA, 1);
    } else {
      for (let k = 0; k < n; k++) {
        const copy = Buffer.allocUnsafe(LAYER_BLOCK);
        buf.copy(copy, 0, k * LAYER_BLOCK, (k + 1) * LAYER_BLOCK);
        this.put(first + k, copy);
      }
      this.unflushedWrites++;
      this.count(C_CACHED, n);
    }
    this.trace?.write(offset, buf, fua);
    this.completedWrites++;
    this.limitCache();
    if (this.o.powerCutAfterWrites !== undefined && this.completedWrites === this.o.powerCutAfterWrites) {
      this.powerCut(`after write ${this.completedWrites}`);
    }
  }

  private doZeroes(op: number, offset: number, length: number): void {
    checkRange('fault', offset, length, this.sizeBytes);
    const first = offset / LAYER_BLOCK;
    for (let k = 0; k < length / LAYER_BLOCK; k++) this.put(first + k, ZERO_BLOCK);
    this.unflushedWrites++;
    if (op === OP_DISCARD) this.trace?.discard(offset, length);
    else this.trace?.writeZeroes(offset, length);
  }

  private doFlush(): void {
    const n = this.cache.size;
    this.writeBack(n);
    fdatasyncSync(this.fd);
    this.unflushedWrites = 0;
    this.count(C_FLUSHES, 1);
    this.count(C_FLUSHED, n);
    this.trace?.flush();
  }

  /** Writes the `n` oldest cached blocks to the file and forgets them (no fdatasync). */
  private writeBack(n: number): void {
    let done = 0;
    for (const [i, data] of this.cache) {
      if (done++ === n) break;
      writeFull(this.fd, data, 0, LAYER_BLOCK, i * LAYER_BLOCK);
      this.uncache(i);
    }
  }

  private limitCache(): void {
    const max = Math.floor(this.o.cacheMax / LAYER_BLOCK);
    if (this.cachedData <= max) return;
    const before = this.cache.size;
    // Oldest first, until the data blocks fit again (zero blocks on the way go too).
    for (const [i, data] of this.cache) {
      if (this.cachedData <= max) break;
      writeFull(this.fd, data, 0, LAYER_BLOCK, i * LAYER_BLOCK);
      this.uncache(i);
    }
    this.count(C_WRITTEN_BACK, before - this.cache.size);
  }

  private put(i: number, data: Buffer): void {
    this.uncache(i); // re-inserted: the Map's order is the order of last writes
    this.cache.set(i, data);
    if (data !== ZERO_BLOCK) this.cachedData++;
  }

  private uncache(i: number): void {
    const old = this.cache.get(i);
    if (old === undefined) return;
    this.cache.delete(i);
    if (old !== ZERO_BLOCK) this.cachedData--;
  }

  private count(slot: number, n: number): void {
    if (slot < this.queue.counters.length) this.queue.counters[slot] = this.queue.counters[slot]! + n;
  }
}
