/**
 * A running ublk device: the control-plane sequence around the queue workers.
 *
 *   ADD_DEV -> SET_PARAMS -> start one worker per queue -> each arms every tag (FETCH_REQ)
 *   -> START_DEV (the disk /dev/ublkbN appears) -> serve ... -> STOP_DEV (the kernel aborts the
 *   fetches, the workers release everything) -> DEL_DEV.
 *
 * Anything that fails on the way up unwinds what was done, so no half-created device stays
 * behind. The main thread never blocks on the queues: it waits for worker messages on its event
 * loop, which stays free for targets that run there.
 */
import type { Worker } from 'node:worker_threads';
import { SysError, abi as ua, sys } from '../uring/index.js';
import { UblkControl, UblkError, type DevInfo, type DevParams } from './control.js';
import {
  UBLK_PARAM_TYPE_BASIC, UBLK_PARAM_TYPE_DISCARD, UBLK_ATTR_READ_ONLY, UBLK_ATTR_ROTATIONAL,
  UBLK_ATTR_VOLATILE_CACHE, UBLK_ATTR_FUA, UBLK_MAX_QUEUE_DEPTH, UBLK_MAX_NR_QUEUES,
} from './abi.js';
import type { DeviceSpec, TargetDefinition } from './target.js';
import { AsyncQueuePort, type AsyncTarget } from './async-target.js';
import { completionRingBytes } from './async-bridge.js';
import { siblingUrl, startWorker } from './workers.js';
import type { QueueWorkerData } from './queue-worker.js';

export interface ServerOptions<O> {
  /** A ring-native target: its definition and the URL of the module that exports it (workers import it). */
  target?: TargetDefinition<O>;
  targetUrl?: string;
  targetOptions?: O;
  /** Or a target written as async functions, run on this thread's event loop (async-target.ts). */
  asyncTarget?: AsyncTarget;
  /** Device id, or -1 / undefined to let the kernel pick. */
  devId?: number;
  queues?: number;
  depth?: number;
  /** Largest request in bytes; overrides the target's choice. */
  maxIoBytes?: number;
  /** UBLK_F_* to ask for (checked against GET_FEATURES). */
  flags?: number;
}

/** Parameters for SET_PARAMS from a target's device spec. */
export function paramsFor(spec: DeviceSpec, maxIoBytes: number): DevParams {
  const lbs = spec.logicalBlockSize ?? 512;
  const pbs = spec.physicalBlockSize ?? lbs;
  const shift = (n: number, what: string) => {
    const s = Math.log2(n);
    if (!Number.isInteger(s) || s < 9 || s > 16) throw new UblkError(`${what} must be a power of two from 512 to 65536, got ${n}`);
    return s;
  };
  if (spec.sizeBytes <= 0 || spec.sizeBytes % lbs !== 0) {
    throw new UblkError(`device size ${spec.sizeBytes} must be a positive multiple of the block size ${lbs}`);
  }
  const attrs = (spec.readOnly ? UBLK_ATTR_READ_ONLY : 0) | (spec.rotational ? UBLK_ATTR_ROTATIONAL : 0)
    | (spec.volatileCache ? UBLK_ATTR_VOLATILE_CACHE : 0) | (spec.fua ? UBLK_ATTR_FUA : 0);
  const p: DevParams = {
    types: UBLK_PARAM_TYPE_BASIC,
    basic: {
      attrs,
      logicalBsShift: shift(lbs, 'logical block size'),
      physicalBsShift: shift(pbs, 'physical block size'),
      ioOptShift: shift(pbs, 'physical block size'),
      ioMinShift: shift(pbs, 'physical block size'),
      maxSectors: maxIoBytes / 512,
      chunkSectors: 0,
      devSectors: spec.sizeBytes / 512, // always 512-byte units, even on 4Kn devices
      virtBoundaryMask: 0,
    },
  };
  if (spec.discard) {
    p.types |= UBLK_PARAM_TYPE_DISCARD;
    // Kernels before 6.11 truncate these u32 sector counts silently if they overflow.
    const cap = (bytes: number) => Math.min(Math.floor(bytes / 512), 0xffffffff >>> 9);
    p.discard = {
      discardAlignment: 0,
      discardGranularity: spec.discard.granularity,
      maxDiscardSectors: cap(spec.discard.maxBytes),
      maxWriteZeroesSectors: cap(spec.discard.maxWriteZeroesBytes),
      maxDiscardSegments: 1,
    };
  }
  return p;
}

interface QueueWorker {
  worker: Worker;
  port?: AsyncQueuePort;
  wakeFd: number;
  control: Int32Array;
  fetched: Promise<void>;
  done: Promise<number>;
  counters: Float64Array;
}

export class UblkServer {
  readonly info: DevInfo;
  readonly spec: DeviceSpec;
  private readonly ctrl: UblkControl;
  private readonly queues: QueueWorker[];
  /** Resolves when every queue has finished (the device was stopped, by us or by `ublk del`). */
  readonly finished: Promise<number>;
  private stopping: Promise<void> | undefined;

  private readonly charFd: number;
  private readonly counterNames: readonly string[];

  private constructor(ctrl: UblkControl, info: DevInfo, spec: DeviceSpec, charFd: number, queues: QueueWorker[], counterNames: readonly string[]) {
    this.ctrl = ctrl;
    this.counterNames = counterNames;
    this.charFd = charFd;
    this.info = info;
    this.spec = spec;
    this.queues = queues;
    this.finished = Promise.all(queues.map((q) => q.done)).then((n) => n.reduce((a, b) => a + b, 0));
  }

  get devId(): number {
    return this.info.devId;
  }

  /** The target's counters (TargetDefinition.counters), summed over the queues. */
  counters(): Record<string, number> {
    const out: Record<string, number> = {};
    this.counterNames.forEach((name, i) => {
      out[name] = this.queues.reduce((sum, q) => sum + q.counters[i]!, 0);
    });
    return out;
  }

  /** Creates the device and returns once `/dev/ublkb<id>` is live. */
  static async start<O>(opts: ServerOptions<O>): Promise<UblkServer> {
    const queues = opts.queues ?? 1;
    const depth = opts.depth ?? 128;
    if (!Number.isInteger(queues) || queues < 1 || queues > UBLK_MAX_NR_QUEUES) {
      throw new UblkError(`queues must be from 1 to ${UBLK_MAX_NR_QUEUES}, got ${queues}`);
    }
    if (!Number.isInteger(depth) || depth < 1 || depth > UBLK_MAX_QUEUE_DEPTH) {
      throw new UblkError(`queue depth must be from 1 to ${UBLK_MAX_QUEUE_DEPTH}, got ${depth}`);
    }
    const spec: DeviceSpec = opts.asyncTarget ?? opts.target!.prepare(opts.targetOptions as O);
    const targetUrl = opts.asyncTarget ? siblingUrl(import.meta.url, 'async-bridge').href : opts.targetUrl!;
    const maxIoBytes = opts.maxIoBytes ?? spec.maxIoBytes ?? 512 * 1024;
    if (maxIoBytes < 4096 || maxIoBytes > 32 * 1024 * 1024 || (maxIoBytes & (maxIoBytes - 1)) !== 0) {
      throw new UblkError(`max I/O size must be a power of two from 4096 to 32 MiB (the kernel's buffer field has 25 bits), got ${maxIoBytes}`);
    }
    const counterNames = opts.target?.counters ?? [];
    let ctrl: UblkControl | undefined;
    let info: DevInfo | undefined;
    let charFd = -1;
    const started: QueueWorker[] = [];
    try {
      const params = paramsFor(spec, maxIoBytes);
      ctrl = new UblkControl();
      info = ctrl.addDev({
        devId: opts.devId === undefined || opts.devId < 0 ? 0xffffffff : opts.devId,
        nrHwQueues: queues,
        queueDepth: depth,
        maxIoBufBytes: maxIoBytes,
        flags: opts.flags ?? 0,
      });
      ctrl.setParams(info.devId, params);
      charFd = openCharDev(info.devId);
      // The kernel caps nr_hw_queues at the number of possible CPUs: serve what it granted.
      for (let qid = 0; qid < info.nrHwQueues; qid++) {
        started.push(spawnQueue(info, charFd, qid, targetUrl, opts.targetOptions ?? {}, spec.queueData, counterNames.length, opts.asyncTarget));
      }
      // If a queue fails before it has fetched, its `done` rejects: race the two.
      await Promise.all(started.map((q) => Promise.race([q.fetched, q.done.then(() => {
        throw new UblkError('a queue exited before it was ready');
      })])));
      // Not the blocking variant: the kernel's partition scan during START_DEV sends I/O, which
      // an async target serves on this very event loop.
      await ctrl.startDevAsync(info.devId);
      return new UblkServer(ctrl, info, spec, charFd, started, counterNames);
    } catch (e) {
      // Unwind: no half-created device may stay behind.
      if (ctrl && info) {
        for (const q of started) wake(q, true);
        try { await ctrl.stopDevAsync(info.devId); } catch { /* not started */ }
        await Promise.allSettled(started.map((q) => q.done));
        if (charFd >= 0) sys.close(charFd);
        try { await ctrl.delDevAsync(info.devId); } catch { /* best effort */ }
      }
      for (const q of started) sys.close(q.wakeFd);
      ctrl?.close();
      spec.release?.();
      throw e;
    }
  }

  /** STOP_DEV, wait for the queues to release everything, DEL_DEV. Idempotent. */
  stop(): Promise<void> {
    return (this.stopping ??= (async () => {
      try {
        await this.ctrl.stopDevAsync(this.devId);
      } catch (e) {
        // Already gone (ublk del from another process got there first).
        if (!(e instanceof UblkError && (e.code === 'ENODEV' || e.code === 'ENOENT'))) throw e;
      }
      // Aborted fetches end the queues; if a kernel did not abort them, the wake flag does.
      const timer = setTimeout(() => this.queues.forEach((q) => wake(q, true)), 5000);
      await Promise.allSettled(this.queues.map((q) => q.done));
      clearTimeout(timer);
      // The last reference to /dev/ublkcN (the queues dropped their mmaps and rings): DEL_DEV
      // waits for exactly this.
      sys.close(this.charFd);
      try {
        await this.ctrl.delDevAsync(this.devId);
      } catch (e) {
        if (!(e instanceof UblkError && (e.code === 'ENODEV' || e.code === 'ENOENT'))) throw e;
      }
      this.ctrl.close();
      for (const q of this.queues) sys.close(q.wakeFd);
      // Every queue has exited: nothing uses the target's device-wide resources any more.
      this.spec.release?.();
    })());
  }
}

function wake(q: QueueWorker, stop: boolean): void {
  if (stop) Atomics.store(q.control, 0, 1);
  try {
    sys.eventfdSignal(q.wakeFd);
  } catch {
    // The fd is gone with the queue.
  }
}

/** Opens /dev/ublkcN, which devtmpfs creates during ADD_DEV (retrying briefly if udev is slow). */
function openCharDev(devId: number): number {
  const path = `/dev/ublkc${devId}`;
  for (let i = 0; ; i++) {
    try {
      return sys.open(path, ua.O_RDWR | ua.O_CLOEXEC);
    } catch (e) {
      if (!(e instanceof SysError) || e.code !== 'ENOENT' || i >= 100) throw e;
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 10);
    }
  }
}

function spawnQueue(
  info: DevInfo, charFd: number, qid: number, targetUrl: string, targetOptions: unknown, device: unknown,
  nrCounters: number, asyncTarget?: AsyncTarget,
): QueueWorker {
  const counters = new SharedArrayBuffer(8 * Math.max(1, nrCounters));
  const wakeFd = sys.eventfd(0, ua.EFD_CLOEXEC | ua.EFD_NONBLOCK);
  const control = new SharedArrayBuffer(4);
  const shared = asyncTarget ? new SharedArrayBuffer(completionRingBytes(info.queueDepth)) : undefined;
  const port = asyncTarget && shared ? new AsyncQueuePort(asyncTarget, shared, info.queueDepth, wakeFd) : undefined;
  const data: QueueWorkerData = {
    devId: info.devId,
    charFd,
    qid,
    depth: info.queueDepth,
    maxIoBufBytes: info.maxIoBufBytes,
    flags: info.flags,
    targetUrl,
    targetOptions,
    wakeFd,
    control,
    shared,
    device,
    counters,
  };
  const worker = startWorker(siblingUrl(import.meta.url, 'queue-worker'), data);
  let onFetched!: () => void;
  const fetched = new Promise<void>((res) => { onFetched = res; });
  const done = new Promise<number>((resolve, reject) => {
    let served = 0;
    let failed: Error | undefined;
    worker.on('message', (m: { kind: string; served?: number; message?: unknown; bufBase?: number; bufSize?: number }) => {
      if (m.kind === 'target') port?.dispatch(m.message as number[]);
      else if (m.kind === 'fetched') {
        port?.attach(m.bufBase!, m.bufSize!);
        onFetched();
      }
      else if (m.kind === 'done') served = m.served ?? 0;
      else if (m.kind === 'error') failed = new UblkError(`queue ${qid}: ${String(m.message)}`);
    });
    worker.on('error', (e) => { failed = e; });
    worker.on('exit', () => (failed ? reject(failed) : resolve(served)));
  });
  done.catch(() => { /* observed by the server */ });
  return { worker, port, wakeFd, control: new Int32Array(control), fetched, done, counters: new Float64Array(counters) };
}
