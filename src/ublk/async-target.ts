/**
 * Async targets: a block device written as plain functions, `read`, `write`, `flush`, `discard`,
 * `writeZeroes`, each returning nothing or a Promise. The stable public API for them, and how
 * one is served (in the queue's own thread, on its event loop: see {@link asTargetDefinition}).
 *
 * There are two ways to hand such functions to a server:
 *
 * - A module (`ublk add -t ./my-disk.mjs`, or `UblkServer.start({ target, targetUrl })`) whose
 *   default export is {@link defineAsyncTarget}`({ name, prepare, open, ... })`. `prepare` runs
 *   once on the main thread and shapes the device; `open` runs in every queue's thread and
 *   returns that queue's functions. This is the fast path: a queue thread calls the functions
 *   itself, between two io_uring_enter calls, and waits on its own event loop only while some of
 *   them have not settled (UblkQueue.runOnEventLoop). State the queues share goes through
 *   `DeviceSpec.queueData` (a SharedArrayBuffer, an fd, a path), since each thread has its own heap.
 * - Closures of the calling thread (`UblkServer.start({ asyncTarget: { sizeBytes, read, write } })`,
 *   and `withDevice` in `ublk/testing`): they run on that thread's event loop, and each batch of
 *   requests crosses threads (async-main-thread.ts). Slower, but nothing needs to be a module.
 *
 * Both share {@link serveAsync}: how an operation maps to a function, and an error to an errno.
 */
import { constants as osConstants } from 'node:os';
import { libc } from '../libc/index.js';
import type { DeviceSpec, QueueHandler, QueueInfo, TargetDefinition } from './target.js';
import {
  UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_FLUSH, UBLK_IO_OP_DISCARD, UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_F_FUA, UBLK_IO_F_NOUNMAP,
} from './abi.js';

/**
 * One queue's view of a block device, as functions. Offsets and lengths are in bytes, multiples
 * of the logical block size. Each may return a Promise or nothing (a function that returns at
 * once is answered at once, with no event-loop turn). A function that throws, or whose Promise
 * rejects, fails its request: see {@link errorResult} for which errno the block layer sees.
 */
export interface AsyncHandlers {
  /** Fill `buf` (the request's length) with the device's bytes at `offset`. `buf` is valid until this settles. */
  read(offset: number, buf: Buffer): void | Promise<void>;
  /**
   * Store `buf` at `offset`. `fua` (forced unit access, only sent if the device says `fua`): the
   * data must be durable when this settles. `buf` is valid until this settles: copy what you keep.
   */
  write(offset: number, buf: Buffer, fua: boolean): void | Promise<void>;
  /** Make every write that completed before it durable (sent only if the device says `volatileCache`). */
  flush?(): void | Promise<void>;
  /** The range's contents are no longer needed (sent only if the device advertises `discard`). */
  discard?(offset: number, length: number): void | Promise<void>;
  /**
   * The range must read as zeros. `noUnmap`: the caller wants it to stay allocated (the
   * block layer's REQ_NOUNMAP). Sent only if `discard.maxWriteZeroesBytes` is not 0.
   */
  writeZeroes?(offset: number, length: number, noUnmap: boolean): void | Promise<void>;
  /** The queue is done (the device stopped or the server leaves): release what `open` made. */
  close?(): void | Promise<void>;
}

/** What a queue thread tells an async target's `open` about where it runs. */
export interface AsyncQueueInfo {
  readonly qid: number;
  readonly depth: number;
  /** `DeviceSpec.queueData` from `prepare`, structured-cloned to this thread. */
  readonly device: unknown;
  /** This queue's slots for the target's `counters` (same order), summed by `UblkServer.counters()`. */
  readonly counters: Float64Array;
  /** A line in the server's log. */
  log(line: string): void;
}

/** A block device as a module of async functions (see the top of this file). */
export interface AsyncTargetDefinition<Options = Record<string, unknown>> {
  /** Set by {@link defineAsyncTarget}: tells an async module from a ring-native one. */
  readonly kind: 'async';
  /** The target's name (shown by `ublk list`). */
  readonly name: string;
  /** Help for `ublk help -t MODULE`: the target's own options. */
  readonly usage?: string;
  /**
   * The target's own command-line options (what follows the common ones). Default:
   * {@link parseLongOptions}, `--size 1G --read-only` becoming `{ size: '1G', readOnly: true }`.
   */
  parseArgs?(argv: string[]): Options;
  /** Names of the target's counters (see `AsyncQueueInfo.counters`). */
  readonly counters?: readonly string[];
  /**
   * Main thread, once: validates the options (throw a TargetError that names the fix) and
   * shapes the device (its size, block sizes, cache, discard). May be async (a network target
   * asks its server how large the disk is).
   */
  prepare(options: Options): DeviceSpec | Promise<DeviceSpec>;
  /** Each queue's thread: that queue's functions. May be async (open a connection, a file). */
  open(options: Options, queue: AsyncQueueInfo): AsyncHandlers | Promise<AsyncHandlers>;
  /** As TargetDefinition.persist / resize / destroy (user recovery, update_size, del). */
  persist?(options: Options, name: string): Options;
  resize?(options: Options, sizeBytes: number): Options;
  destroy?(options: Options): void;
}

/** Gives a module's `export default defineAsyncTarget({...})` its types and marks it async. */
export function defineAsyncTarget<O = Record<string, unknown>>(def: Omit<AsyncTargetDefinition<O>, 'kind'>): AsyncTargetDefinition<O> {
  return { ...def, kind: 'async' };
}

/** Whether a module's default export is an async target (rather than a ring-native one). */
export function isAsyncTarget(def: unknown): def is AsyncTargetDefinition<unknown> {
  return typeof def === 'object' && def !== null && (def as { kind?: unknown }).kind === 'async';
}

/**
 * The default `parseArgs` of an async target: `--name value` and `--flag` (followed by another
 * option or nothing) into an object with camelCase keys, values as strings (flags: true).
 * Anything else is refused with the option it could not read.
 */
export function parseLongOptions(argv: string[]): Record<string, string | true> {
  const out: Record<string, string | true> = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const m = /^--([a-z0-9][a-z0-9_-]*)(?:=(.*))?$/i.exec(a);
    if (!m) throw new TypeError(`unexpected argument ${JSON.stringify(a)}: a target's options are --name value or --flag`);
    const key = m[1]!.replace(/[-_]([a-z0-9])/gi, (_, c: string) => c.toUpperCase());
    if (m[2] !== undefined) out[key] = m[2];
    else if (i + 1 < argv.length && !argv[i + 1]!.startsWith('--')) out[key] = argv[++i]!;
    else out[key] = true;
  }
  return out;
}

/**
 * The result a failed function's error becomes, as the block layer will see it:
 * - an error whose `code` names an errno ('ENOSPC' from a Node fs error or a SysError,
 *   or one of your own: `Object.assign(new Error('full'), { code: 'ENOSPC' })`) is that errno;
 * - an error with a positive numeric `errno` and no known code is that errno;
 * - anything else (a TypeError, a string) is EIO.
 * The block layer knows few errors by name: ENOSPC, ETIMEDOUT, EOPNOTSUPP, ENODATA and EILSEQ
 * keep their meaning up to the file system; others reach it as a plain I/O error.
 */
export function errorResult(e: unknown): number {
  const err = e as { code?: unknown; errno?: unknown } | undefined;
  const code = err?.code;
  if (typeof code === 'string') {
    const errno = (osConstants.errno as Record<string, number>)[code];
    if (errno !== undefined && errno > 0) return -errno;
  }
  const n = err?.errno;
  if (typeof n === 'number' && Number.isInteger(n) && n > 0 && libc.isNegErrno(-n)) return -n;
  return -libc.EIO;
}

function isThenable(v: unknown): v is PromiseLike<unknown> {
  return typeof v === 'object' && v !== null && typeof (v as { then?: unknown }).then === 'function';
}

/**
 * Serves one request with `h`: the result (bytes for READ/WRITE, 0 for the others, or a
 * negative errno) at once if the function returned at once, else a Promise of it that never
 * rejects. `buffer()` is called only for READ and WRITE (in the modes where the kernel copies
 * nothing, touching the request's buffer stages its data there).
 */
export function serveAsync(h: AsyncHandlers, op: number, flags: number, offset: number, length: number, buffer: () => Buffer): number | Promise<number> {
  let ret: unknown;
  let done: number;
  try {
    switch (op) {
      case UBLK_IO_OP_READ:
        ret = h.read(offset, buffer());
        done = length;
        break;
      case UBLK_IO_OP_WRITE:
        ret = h.write(offset, buffer(), (flags & UBLK_IO_F_FUA) !== 0);
        done = length;
        break;
      case UBLK_IO_OP_FLUSH:
        ret = h.flush?.();
        done = 0;
        break;
      case UBLK_IO_OP_DISCARD:
        if (!h.discard) return -libc.EOPNOTSUPP;
        ret = h.discard(offset, length);
        done = 0; // not a byte count: a >= 2 GiB discard would overflow the result
        break;
      case UBLK_IO_OP_WRITE_ZEROES:
        if (!h.writeZeroes) return -libc.EOPNOTSUPP;
        ret = h.writeZeroes(offset, length, (flags & UBLK_IO_F_NOUNMAP) !== 0);
        done = 0;
        break;
      default:
        return -libc.EOPNOTSUPP;
    }
  } catch (e) {
    return errorResult(e);
  }
  if (!isThenable(ret)) return done;
  return Promise.resolve(ret).then(() => done, errorResult);
}

const OP_NAMES: Record<number, string> = {
  [UBLK_IO_OP_READ]: 'read', [UBLK_IO_OP_WRITE]: 'write', [UBLK_IO_OP_FLUSH]: 'flush',
  [UBLK_IO_OP_DISCARD]: 'discard', [UBLK_IO_OP_WRITE_ZEROES]: 'writeZeroes',
};

/**
 * Watches requests a target has not answered: after `timeoutMs` (0: never), a line in the log
 * names the request and the function that has not settled. The request is not failed: the
 * function still owns the request's buffer, and answering would hand that memory to the tag's
 * next request while the function may still write it.
 */
export class HangReporter {
  private readonly timers = new Map<number, ReturnType<typeof setTimeout>>();
  constructor(private readonly timeoutMs: number, private readonly qid: number, private readonly log: (line: string) => void) {}

  watch(tag: number, op: number, offset: number, length: number): void {
    if (this.timeoutMs <= 0) return;
    const started = Date.now();
    const t = setTimeout(() => {
      this.log(`ublk queue ${this.qid}: the target's ${OP_NAMES[op] ?? `op ${op}`}() for tag ${tag} (${length} bytes at ${offset}) has not settled after ${Date.now() - started} ms; the request stays outstanding`);
    }, this.timeoutMs);
    t.unref?.();
    this.timers.set(tag, t);
  }

  settled(tag: number): void {
    if (this.timeoutMs <= 0) return;
    const t = this.timers.get(tag);
    if (t !== undefined) {
      clearTimeout(t);
      this.timers.delete(tag);
    }
  }

  clear(): void {
    for (const t of this.timers.values()) clearTimeout(t);
    this.timers.clear();
  }
}

/**
 * Opens queue `queue.qid` of an async module as a ring-native QueueHandler, in the queue's thread:
 * `handle` calls the function; an answer given at once is returned at once, a Promise completes
 * the request when it settles. The handler asks the queue to wait on the thread's event loop
 * while it holds requests (QueueHandler.eventLoop), so that the Promises can settle at all.
 */
export async function openAsyncQueue<O>(def: AsyncTargetDefinition<O>, options: O, queue: QueueInfo): Promise<QueueHandler> {
  const log = queue.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  const h = await def.open(options, { qid: queue.qid, depth: queue.depth, device: queue.device, counters: queue.counters, log });
  if (!h || typeof h.read !== 'function' || typeof h.write !== 'function') {
    throw new TypeError(`${def.name}: open() must return an object with read() and write() functions`);
  }
  const hangs = new HangReporter(queue.requestTimeoutMs ?? 0, queue.qid, log);
  return {
    eventLoop: true,
    handle(req, ctx) {
      const r = serveAsync(h, req.op, req.flags, req.offset, req.length, () => req.buffer);
      if (typeof r === 'number') return r;
      const tag = req.tag;
      hangs.watch(tag, req.op, req.offset, req.length);
      void r.then((res) => {
        hangs.settled(tag);
        ctx.complete(tag, res);
      });
      return undefined;
    },
    close() {
      hangs.clear();
      return h.close?.();
    },
  };
}

/** The parts of a target the CLI and the server use, whichever kind it is. */
export type AnyTargetDefinition<O = unknown> = TargetDefinition<O> | AsyncTargetDefinition<O>;

/** A target's own options from the command line: its parseArgs, or {@link parseLongOptions} for an async one without. */
export function parseTargetArgs<O>(def: AnyTargetDefinition<O>, argv: string[]): O {
  if (def.parseArgs) return def.parseArgs(argv);
  return parseLongOptions(argv) as O;
}
