/**
 * Write traces: what a device acknowledged, in the order it did, so that a run can be checked or
 * replayed afterwards (`ublk add -t fault --record TRACE`, `ublk replay TRACE --to PATH`).
 *
 * Format (all integers little-endian):
 *
 *   header, 16 bytes:  'UBLKTRC1' (8 ASCII bytes), u64 device size in bytes
 *   then records:      u8 op, u64 offset, u32 length, and for a WRITE `length` data bytes
 *
 *   op (low 7 bits)    1 WRITE          offset/length in bytes, followed by the data
 *                      2 FLUSH          offset 0, length 0: every earlier record is durable
 *                      3 DISCARD        the range's contents are no longer needed (replayed as zeros)
 *                      5 WRITE_ZEROES   the range reads as zeros
 *   bit 0x80           on a WRITE: it was FUA (durable when acknowledged, without a FLUSH)
 *
 * The op numbers are ublk's (UBLK_IO_OP_*). A record is written with one pwritev, so a server
 * killed between records leaves whole records; a reader stops at an incomplete tail and says how
 * many bytes it ignored. Appending to an existing trace of the same device size continues it.
 */
import { closeSync, fdatasyncSync, fstatSync, ftruncateSync, openSync, constants as fsc, writevSync } from 'node:fs';
import { TargetError } from '../ublk/target.js';
import { openSized, readFull, writeFull, writeZeros } from './layer-io.js';

export const TRACE_MAGIC = 'UBLKTRC1';
export const TRACE_HEADER_BYTES = 16;
export const TRACE_RECORD_BYTES = 13;
export const TRACE_WRITE = 1;
export const TRACE_FLUSH = 2;
export const TRACE_DISCARD = 3;
export const TRACE_WRITE_ZEROES = 5;
export const TRACE_FUA = 0x80;

const OPS = new Set([TRACE_WRITE, TRACE_FLUSH, TRACE_DISCARD, TRACE_WRITE_ZEROES]);

/** A trace that cannot be read or written as one (exit status 1 in the CLI, like a target's errors). */
export class TraceError extends TargetError {
  constructor(message: string) {
    super(message);
    this.name = 'TraceError';
  }
}

export interface TraceRecord {
  /** TRACE_WRITE, TRACE_FLUSH, TRACE_DISCARD or TRACE_WRITE_ZEROES (without the FUA bit). */
  op: number;
  /** A WRITE that was FUA. */
  fua: boolean;
  offset: number;
  length: number;
  /**
   * A WRITE's data (`length` bytes), when the reader was asked for it. Valid until the next
   * record is read: the reader reuses its buffer.
   */
  data?: Buffer;
  /** Where the record starts in the trace file. */
  position: number;
}

function header(deviceSize: number): Buffer {
  const h = Buffer.alloc(TRACE_HEADER_BYTES);
  h.write(TRACE_MAGIC, 0, 'latin1');
  h.writeBigUInt64LE(BigInt(deviceSize), 8);
  return h;
}

/** The device size a trace header records, or undefined if `h` is not a trace header. */
function parseHeader(h: Buffer): number | undefined {
  if (h.length < TRACE_HEADER_BYTES || h.toString('latin1', 0, 8) !== TRACE_MAGIC) return undefined;
  return Number(h.readBigUInt64LE(8));
}

/**
 * Reads a trace record by record (see the top of this file). Throws a TraceError for a file that
 * is not a trace or holds a record that makes no sense; an incomplete last record ends the
 * iteration and is counted in {@link truncatedBytes}.
 */
export class TraceReader {
  readonly deviceSize: number;
  /** Bytes at the end that do not form a whole record (known once the records were read to the end). */
  truncatedBytes = 0;
  private readonly fd: number;
  private readonly fileSize: number;
  private data = Buffer.alloc(1 << 20);

  constructor(readonly path: string) {
    try {
      this.fd = openSync(path, fsc.O_RDONLY);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      throw new TraceError(code === 'ENOENT' ? `the trace ${path} does not exist` : `cannot open the trace ${path}: ${(e as Error).message}`);
    }
    try {
      this.fileSize = fstatSync(this.fd).size;
      const h = Buffer.alloc(TRACE_HEADER_BYTES);
      const size = readFull(this.fd, h, 0, h.length, 0) === h.length ? parseHeader(h) : undefined;
      if (size === undefined) throw new TraceError(`${path} is not a trace: it does not begin with ${TRACE_MAGIC} (traces are made by ublk add -t fault --record)`);
      this.deviceSize = size;
    } catch (e) {
      closeSync(this.fd);
      throw e;
    }
  }

  /** The records in order; `withData: false` skips reading the WRITEs' data. */
  *records(withData = true): Generator<TraceRecord> {
    const h = Buffer.alloc(TRACE_RECORD_BYTES);
    let pos = TRACE_HEADER_BYTES;
    this.truncatedBytes = 0;
    while (pos < this.fileSize) {
      if (readFull(this.fd, h, 0, h.length, pos) < h.length) break;
      const raw = h[0]!;
      const op = raw & 0x7f;
      const offset = Number(h.readBigUInt64LE(1));
      const length = h.readUInt32LE(9);
      if (!OPS.has(op) || ((raw & TRACE_FUA) !== 0 && op !== TRACE_WRITE)) {
        throw new TraceError(`${this.path}: the record at byte ${pos} has op ${raw}, which no trace has: the file is damaged`);
      }
      if (offset + length > this.deviceSize) {
        throw new TraceError(`${this.path}: the record at byte ${pos} (${length} bytes at ${offset}) lies beyond the ${this.deviceSize}-byte device: the file is damaged`);
      }
      const dataBytes = op === TRACE_WRITE ? length : 0;
      if (pos + TRACE_RECORD_BYTES + dataBytes > this.fileSize) break;
      const rec: TraceRecord = { op, fua: (raw & TRACE_FUA) !== 0, offset, length, position: pos };
      if (withData && op === TRACE_WRITE) {
        if (this.data.length < length) this.data = Buffer.alloc(length);
        if (readFull(this.fd, this.data, 0, length, pos + TRACE_RECORD_BYTES) < length) break;
        rec.data = this.data.subarray(0, length);
      }
      pos += TRACE_RECORD_BYTES + dataBytes;
      yield rec;
    }
    this.truncatedBytes = this.fileSize - pos;
  }

  close(): void {
    closeSync(this.fd);
  }
}

/**
 * Appends records to a trace. {@link TraceWriter.open} creates the trace, or continues one of the
 * same device size (a server that recovers the device goes on where the last one stopped).
 */
export class TraceWriter {
  /** Records written by this writer. */
  records = 0;
  private readonly head = Buffer.alloc(TRACE_RECORD_BYTES);

  private constructor(readonly path: string, private readonly fd: number, readonly deviceSize: number, private pos: number) {}

  /**
   * Opens `path` for appending records of a `deviceSize`-byte device: a missing or empty file
   * gets the header; a trace of the same device size is continued after its last whole record
   * (an incomplete one is cut off). Anything else is refused, naming the file.
   */
  static open(path: string, deviceSize: number): TraceWriter {
    const problem = traceFileProblem(path, deviceSize);
    if (problem) throw new TraceError(problem);
    const fd = openSync(path, fsc.O_RDWR | fsc.O_CREAT, 0o644);
    try {
      let end = fstatSync(fd).size;
      if (end === 0) {
        writeFull(fd, header(deviceSize), 0, TRACE_HEADER_BYTES, 0);
        end = TRACE_HEADER_BYTES;
      } else {
        const r = new TraceReader(path);
        try {
          for (const _ of r.records(false)) { /* to the end */ }
          end -= r.truncatedBytes;
        } finally {
          r.close();
        }
        ftruncateSync(fd, end);
      }
      return new TraceWriter(path, fd, deviceSize, end);
    } catch (e) {
      closeSync(fd);
      throw e;
    }
  }

  private append(op: number, offset: number, length: number, data?: Uint8Array): void {
    const h = this.head;
    h[0] = op;
    h.writeBigUInt64LE(BigInt(offset), 1);
    h.writeUInt32LE(length, 9);
    const total = TRACE_RECORD_BYTES + (data ? data.length : 0);
    const n = writevSync(this.fd, data ? [h, data] : [h], this.pos);
    // pwritev to a regular file writes everything or fails; the rest, if ever, one more time.
    if (n < total) {
      const rest = Buffer.concat(data ? [h, data] : [h]);
      writeFull(this.fd, rest, n, total - n, this.pos + n);
    }
    this.pos += total;
    this.records++;
  }

  write(offset: number, data: Uint8Array, fua = false): void {
    this.append(TRACE_WRITE | (fua ? TRACE_FUA : 0), offset, data.length, data);
  }

  writeZeroes(offset: number, length: number): void {
    this.append(TRACE_WRITE_ZEROES, offset, length);
  }

  discard(offset: number, length: number): void {
    this.append(TRACE_DISCARD, offset, length);
  }

  flush(): void {
    this.append(TRACE_FLUSH, 0, 0);
  }

  close(): void {
    closeSync(this.fd);
  }
}

/**
 * Why `path` cannot take a trace of a `deviceSize`-byte device (it exists and is not an empty
 * file or a trace of that size), or undefined if it can. The fault target asks in `prepare`, so
 * that the mistake is named before a device exists.
 */
export function traceFileProblem(path: string, deviceSize: number): string | undefined {
  let fd: number;
  try {
    fd = openSync(path, fsc.O_RDONLY);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    return code === 'ENOENT' ? undefined : `cannot open the trace ${path}: ${(e as Error).message}`;
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) return `the trace ${path} is not a regular file`;
    if (st.size === 0) return undefined;
    const h = Buffer.alloc(TRACE_HEADER_BYTES);
    const size = readFull(fd, h, 0, h.length, 0) === h.length ? parseHeader(h) : undefined;
    if (size === undefined) return `${path} exists and is not a trace: remove it or record to another file`;
    if (size !== deviceSize) return `${path} is the trace of a ${size}-byte device, not of this ${deviceSize}-byte one: remove it or record to another file`;
    return undefined;
  } finally {
    closeSync(fd);
  }
}

export interface TraceSummary {
  deviceSize: number;
  records: number;
  writes: number;
  fuaWrites: number;
  zeroes: number;
  discards: number;
  flushes: number;
  /** Bytes of WRITE data, WRITE_ZEROES and DISCARD ranges (what a replay writes). */
  bytes: number;
  /** Bytes at the end that form no whole record (a server killed while appending). */
  truncatedBytes: number;
}

function emptySummary(deviceSize: number): TraceSummary {
  return { deviceSize, records: 0, writes: 0, fuaWrites: 0, zeroes: 0, discards: 0, flushes: 0, bytes: 0, truncatedBytes: 0 };
}

function count(s: TraceSummary, r: TraceRecord): void {
  s.records++;
  if (r.op === TRACE_WRITE) {
    s.writes++;
    if (r.fua) s.fuaWrites++;
  } else if (r.op === TRACE_WRITE_ZEROES) s.zeroes++;
  else if (r.op === TRACE_DISCARD) s.discards++;
  else s.flushes++;
  if (r.op !== TRACE_FLUSH) s.bytes += r.length;
}

/** Counts a trace's records without reading their data. */
export function summarizeTrace(path: string): TraceSummary {
  const r = new TraceReader(path);
  try {
    const s = emptySummary(r.deviceSize);
    for (const rec of r.records(false)) count(s, rec);
    s.truncatedBytes = r.truncatedBytes;
    return s;
  } finally {
    r.close();
  }
}

export interface ReplaySummary extends TraceSummary {
  /** The trace's FLUSH records in all (the replay may have stopped before the last). */
  traceFlushes: number;
  /** --until-flush: the replay stopped after this many FLUSH records. */
  untilFlush?: number;
}

/**
 * `ublk replay`: applies the trace at `tracePath` to the file or block device `toPath` in order
 * (WRITE data; WRITE_ZEROES and DISCARD as zeros); with `untilFlush` N, only the records up to
 * the N-th FLUSH (0: those before the first). A regular file is created if missing and extended
 * to the trace's device size; a block device must be at least that large. Ends with fdatasync.
 * Returns what was applied (the counts of the records replayed).
 */
export function replayTrace(tracePath: string, toPath: string, opts: { untilFlush?: number } = {}): ReplaySummary {
  const all = summarizeTrace(tracePath);
  const until = opts.untilFlush;
  if (until !== undefined && until > all.flushes) {
    throw new TraceError(`--until-flush ${until}: ${tracePath} has ${all.flushes} FLUSH record${all.flushes === 1 ? '' : 's'}`);
  }
  const out = openSized(toPath, fsc.O_RDWR | fsc.O_CREAT, 'replay', '--to');
  try {
    if (out.size < all.deviceSize) {
      if (out.isBlockDevice) {
        throw new TraceError(`replay: --to ${toPath} has ${out.size} bytes, less than the ${all.deviceSize}-byte device of the trace`);
      }
      ftruncateSync(out.fd, all.deviceSize);
    }
    const r = new TraceReader(tracePath);
    const done: ReplaySummary = { ...emptySummary(r.deviceSize), traceFlushes: all.flushes, untilFlush: until };
    try {
      if (until !== 0) {
        for (const rec of r.records()) {
          if (rec.op === TRACE_WRITE) writeFull(out.fd, rec.data!, 0, rec.length, rec.offset);
          else if (rec.op !== TRACE_FLUSH) writeZeros(out.fd, rec.offset, rec.length);
          count(done, rec);
          if (rec.op === TRACE_FLUSH && done.flushes === until) break;
        }
      }
      done.truncatedBytes = until === undefined ? r.truncatedBytes : 0;
    } finally {
      r.close();
    }
    fdatasyncSync(out.fd);
    return done;
  } finally {
    closeSync(out.fd);
  }
}

/** The one line `ublk replay` prints. */
export function replayLine(tracePath: string, toPath: string, s: ReplaySummary): string {
  const stop = s.untilFlush !== undefined ? `; stopped after flush ${s.untilFlush} of ${s.traceFlushes}` : '';
  const tail = s.truncatedBytes ? `; the trace's last ${s.truncatedBytes} bytes are an incomplete record, ignored` : '';
  return `replayed ${s.records} records of ${tracePath} onto ${toPath}: ${s.writes} writes (${s.fuaWrites} FUA), ${s.zeroes} write-zeroes, ${s.discards} discards, ${s.flushes} flushes; ${s.bytes} bytes written${stop}${tail}`;
}
