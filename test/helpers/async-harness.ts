/**
 * Runs an async target (defineAsyncTarget) on the host, without ublk: its parseArgs and prepare
 * as the CLI runs them, then `open` for one queue with a made-up AsyncQueueInfo, and its handlers
 * called directly. `queueData` goes through structuredClone on the way, as it does to a queue
 * thread (SharedArrayBuffers stay shared, everything else is a copy).
 *
 * `request` serves a request as the queue would (serveAsync): the result the kernel would see,
 * bytes or a negative errno, with errors turned into errnos by errorResult.
 */
import { serveAsync, parseTargetArgs, type AsyncHandlers, type AsyncTargetDefinition } from '../../src/ublk/async-target.js';
import type { DeviceSpec } from '../../src/ublk/target.js';
import {
  UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_FLUSH, UBLK_IO_OP_DISCARD, UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_F_FUA,
} from '../../src/ublk/abi.js';

export interface AsyncHarness<O> {
  options: O;
  spec: DeviceSpec;
  handlers: AsyncHandlers;
  /** Lines the target logged through queue.log. */
  lines: string[];
  counters: Float64Array;
  counter(name: string): number;
  /** Reads `length` bytes at `offset` through the handler (throws what it throws). */
  read(offset: number, length: number): Promise<Buffer>;
  write(offset: number, data: Buffer, fua?: boolean): Promise<void>;
  flush(): Promise<void>;
  writeZeroes(offset: number, length: number, noUnmap?: boolean): Promise<void>;
  discard(offset: number, length: number): Promise<void>;
  /** A request as the queue serves it: its result (bytes, 0, or -errno); `data` is a READ's buffer or a WRITE's data. */
  request(op: 'read' | 'write' | 'fua' | 'flush' | 'discard' | 'zeroes', offset?: number, length?: number, data?: Buffer): Promise<number>;
  /** Opens another queue of the same prepared device (for qid > 0, or a second thread's view). */
  openQueue(qid: number): Promise<AsyncHandlers>;
  /** Closes the queue(s) opened, then releases what prepare made. */
  close(): Promise<void>;
}

const OPS = {
  read: [UBLK_IO_OP_READ, 0], write: [UBLK_IO_OP_WRITE, 0], fua: [UBLK_IO_OP_WRITE, UBLK_IO_F_FUA],
  flush: [UBLK_IO_OP_FLUSH, 0], discard: [UBLK_IO_OP_DISCARD, 0], zeroes: [UBLK_IO_OP_WRITE_ZEROES, 0],
} as const;

/** parseArgs(argv) then {@link openPrepared}. */
export async function openAsync<O>(def: AsyncTargetDefinition<O>, argv: string[], opts: { qid?: number; depth?: number } = {}): Promise<AsyncHarness<O>> {
  return openPrepared(def, parseTargetArgs(def, argv), opts);
}

/** prepare(options), then open() for queue `qid` (default 0). */
export async function openPrepared<O>(def: AsyncTargetDefinition<O>, options: O, opts: { qid?: number; depth?: number } = {}): Promise<AsyncHarness<O>> {
  const spec = await def.prepare(options);
  const lines: string[] = [];
  const counters = new Float64Array(Math.max(1, def.counters?.length ?? 0));
  const opened: AsyncHandlers[] = [];
  const openQueue = async (qid: number) => {
    const h = await def.open(options, {
      qid, depth: opts.depth ?? 8, device: structuredClone(spec.queueData), counters, log: (line) => lines.push(line),
    });
    opened.push(h);
    return h;
  };
  let handlers: AsyncHandlers;
  try {
    handlers = await openQueue(opts.qid ?? 0);
  } catch (e) {
    spec.release?.();
    throw e;
  }
  let closed = false;
  return {
    options, spec, handlers, lines, counters,
    counter: (name) => {
      const i = def.counters?.indexOf(name) ?? -1;
      if (i < 0) throw new Error(`${def.name} has no counter ${name}`);
      return counters[i]!;
    },
    async read(offset, length) {
      const buf = Buffer.alloc(length, 0xee);
      await handlers.read(offset, buf);
      return buf;
    },
    async write(offset, data, fua = false) {
      await handlers.write(offset, data, fua);
    },
    async flush() {
      await handlers.flush?.();
    },
    async writeZeroes(offset, length, noUnmap = false) {
      await handlers.writeZeroes?.(offset, length, noUnmap);
    },
    async discard(offset, length) {
      await handlers.discard?.(offset, length);
    },
    async request(op, offset = 0, length = 0, data) {
      const [code, flags] = OPS[op];
      const buf = data ?? Buffer.alloc(length);
      return serveAsync(handlers, code, flags, offset, data ? data.length : length, () => buf);
    },
    openQueue,
    async close() {
      if (closed) return;
      closed = true;
      try {
        for (const h of opened) await h.close?.();
      } finally {
        spec.release?.();
      }
    },
  };
}
