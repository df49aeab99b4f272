/**
 * `ublk/testing`: a real block device for the length of one test.
 *
 *   import { withDevice } from 'ublk/testing';
 *   await withDevice({ target: { read, write }, size: '64M' }, async (path) => {
 *     // `path` is /dev/ublkbN: mkfs it, run fio on it, open it with O_DIRECT ...
 *   });
 *
 * Functions given as closures are served on this thread's event loop: do the device's I/O from
 * here asynchronously (fs.promises, a child process such as mkfs or fio), never with fs's
 * synchronous calls, which would wait for an answer this very thread has to give.
 *
 * The target must answer the kernel's first reads while the device starts: on 6.12 START_DEV
 * waits for the partition scan (7.x scans after START_DEV returns), so a target that never
 * answers a read of the first blocks keeps withDevice from ever calling back.
 *
 * The device is deleted when the callback settles, whether it returned, threw, or its test
 * timed out and rejected; an error of the callback is rethrown after the device is gone. It
 * works with any test runner (tap, node:test, vitest in a Node pool), needs root and the
 * ublk_drv module, and {@link ublkUnavailable} says why not, so a suite can skip instead.
 */
import { existsSync } from 'node:fs';
import { UblkServer } from './ublk/server.js';
import type { AsyncHandlers } from './ublk/async-target.js';
import { parseLongOptions } from './ublk/async-target.js';
import type { DeviceSpec } from './ublk/target.js';
import { loadTarget } from './targets/index.js';
import { parseSize } from './targets/options.js';

export interface WithDeviceOptions {
  /**
   * The device's functions (closures of this thread, run on its event loop), or a target module:
   * a path, an installed package name, or a built-in name ('mem', 'loop', 'null').
   */
  target: AsyncHandlers | string;
  /** For a module: its options, as on the command line (`['--size', '64M']`) or as its parsed object. */
  options?: string[] | Record<string, unknown>;
  /** For functions: the device's size (bytes, or '64M'), required with them. */
  size?: number | string;
  /** For functions: the rest of the device's shape (block sizes, read-only, cache, discard). */
  device?: Omit<DeviceSpec, 'sizeBytes'>;
  queues?: number;
  depth?: number;
  /** Report requests the target holds longer than this (ServerOptions.requestTimeoutMs). */
  requestTimeoutMs?: number;
  /** Where the server's log lines go (default: stderr). */
  log?: (line: string) => void;
}

/**
 * Why this process cannot make a ublk device (not root, no ublk_drv), or undefined if it can.
 * For `t.skip(...)`/`{ skip: ublkUnavailable() }` in suites that also run where ublk is absent.
 */
export function ublkUnavailable(): string | undefined {
  if (process.platform !== 'linux') return 'ublk is a Linux kernel driver';
  if (!existsSync('/dev/ublk-control')) return '/dev/ublk-control is missing: load the driver with `modprobe ublk_drv` (as root)';
  if ((process.getuid?.() ?? 0) !== 0) return 'creating a ublk device needs root';
  return undefined;
}

/**
 * Creates a device served by `opts.target`, calls `fn` with its path (/dev/ublkbN) and the
 * server, and deletes the device when `fn` settles, whatever happened. Resolves with what `fn`
 * resolved with.
 */
export async function withDevice<T>(opts: WithDeviceOptions, fn: (path: string, server: UblkServer) => T | Promise<T>): Promise<T> {
  const force = new AbortController();
  const server = await startDevice(opts, force.signal);
  let result: T;
  try {
    result = await fn(`/dev/ublkb${server.devId}`, server);
  } catch (e) {
    await stop(server, force).catch(() => { /* the callback's error is the one to report */ });
    throw e;
  }
  await stop(server, force);
  return result;
}

/**
 * How long the target may take to answer what it holds once the device is being deleted
 * (STOP_DEV waits for every request): after that its requests are failed with EIO, so a test
 * whose target hangs still ends, and ends without a device. Shorter than the server's own 5 s
 * before it stops the queues (teardown in server.ts): the queues must still be there to fail
 * the requests, because on 6.12 closing the char device does not end a request a stopped queue
 * held, and STOP_DEV would wait for it forever.
 */
const STOP_GRACE_MS = 3_000;

async function stop(server: UblkServer, force: AbortController): Promise<void> {
  const timer = setTimeout(() => force.abort(), STOP_GRACE_MS);
  try {
    await server.stop();
  } finally {
    clearTimeout(timer);
  }
}

async function startDevice(opts: WithDeviceOptions, force: AbortSignal): Promise<UblkServer> {
  const common = { queues: opts.queues ?? 1, depth: opts.depth ?? 64, requestTimeoutMs: opts.requestTimeoutMs, log: opts.log, force };
  if (typeof opts.target === 'string') {
    const t = await loadTarget(opts.target);
    if (!t) throw new TypeError(`withDevice: no target called ${opts.target} (a built-in name, a module path, or an installed package)`);
    const o = opts.options ?? [];
    const targetOptions = Array.isArray(o) ? (t.def.parseArgs ? t.def.parseArgs(o) : parseLongOptions(o)) : o;
    return UblkServer.start({ ...common, target: t.def, targetUrl: t.url, targetOptions });
  }
  if (opts.size === undefined) throw new TypeError('withDevice: a target given as functions needs `size`');
  const sizeBytes = typeof opts.size === 'number' ? opts.size : parseSize(opts.size, 'size');
  const h = opts.target;
  // Bound here: the functions may be methods of a class instance, which a spread would lose.
  return UblkServer.start({
    ...common,
    asyncTarget: {
      device: { ...opts.device, sizeBytes },
      read: h.read.bind(h),
      write: h.write.bind(h),
      flush: h.flush?.bind(h),
      discard: h.discard?.bind(h),
      writeZeroes: h.writeZeroes?.bind(h),
    },
  });
}
