/**
 * A running ublk device: the control-plane sequence around the queue threads.
 *
 *   ADD_DEV -> SET_PARAMS -> start one thread per queue -> each arms every tag (FETCH_REQ)
 *   -> START_DEV (the disk /dev/ublkbN appears) -> serve ... -> STOP_DEV (the kernel aborts the
 *   fetches, the queues release everything) -> DEL_DEV.
 *
 * Anything that fails or is interrupted (an AbortSignal) on the way up unwinds what was done, so
 * no half-created device stays behind.
 *
 * A device added with UBLK_F_USER_RECOVERY outlives its server: when the server dies (killed, or
 * it gave up after a queue failed), ublk_drv quiesces the disk (QUIESCED: I/O waits; FAIL_IO with
 * UBLK_F_USER_RECOVERY_FAIL_IO: I/O fails) instead of removing it. {@link UblkServer.recover}
 * attaches a new server: START_USER_RECOVERY (once the old server's last reference to
 * /dev/ublkcN is gone) -> the queues fetch every tag again -> END_USER_RECOVERY (the disk is
 * LIVE again; with REISSUE the requests the old server held are sent again). The main thread never blocks on the queues: it waits for
 * their messages on its event loop, which stays free for targets that run there.
 */
import { RingTrace, traceTime } from '../uring/trace.js';
import { TraceSink, controlTraceDecoder } from './trace.js';
import { closeSync, fstatSync, openSync } from 'node:fs';
import type { Worker } from 'node:worker_threads';
import { Mapping, PAGE_SIZE, SysError, libc, sys } from '../libc/index.js';
import { UblkControl, UblkError, stateName, type DevInfo } from './control.js';
import { UBLK_F_BATCH_IO, UBLK_F_PER_IO_DAEMON, UBLK_F_QUIESCE, UBLK_F_USER_RECOVERY, UBLK_MAX_QUEUE_DEPTH, UBLK_MAX_NR_QUEUES, UBLK_S_DEV_LIVE } from './abi.js';
import { paramsFor, specProblem } from './params.js';
import { queueDataPath } from './modes.js';
import { ANY_DEV_ID } from './wire.js';
import type { DeviceSpec } from './target.js';
import type { AnyTargetDefinition } from './async-target.js';
import { AsyncQueuePort, type AsyncTarget } from './async-main-thread.js';
import { CompletionRing } from './async-completion-ring.js';
import type { AsyncBatch } from './async-queue-thread.js';
import { siblingUrl, startWorker } from './workers.js';
import { releaseQueueBuffers, type QueueCloseReport } from './queue.js';
import { CONTROL_FAIL_HELD, CONTROL_STOP, type QueueMessage, type QueueThreadData } from './queue-messages.js';

/** The largest device id ublk_drv hands out: ids are minor numbers (UBLK_MINORS = 1 << MINORBITS). */
export const UBLK_MAX_DEV_ID = (1 << 20) - 1;
/** Requests are at most this large unless the target or the caller says otherwise. */
export const DEFAULT_MAX_IO_BYTES = 512 * 1024;

export interface ServerOptions<O> {
  /**
   * A target module: its definition (ring-native, or async from defineAsyncTarget) and the URL
   * of the module whose default export it is (the queue threads import it).
   */
  target?: AnyTargetDefinition<O>;
  targetUrl?: string;
  targetOptions?: O;
  /**
   * Or functions of this thread (closures: no module needed), run on this thread's event loop
   * (async-main-thread.ts). A module (`target`) is faster: its queue threads call it themselves.
   */
  asyncTarget?: AsyncTarget;
  /**
   * Report in the log a request a handler has held for this many milliseconds (default 0: never).
   * The request is not failed: the handler still owns its buffer.
   */
  requestTimeoutMs?: number;
  /** Device id; undefined lets the kernel pick. */
  devId?: number;
  queues?: number;
  depth?: number;
  /** Largest request in bytes; overrides the target's choice. */
  maxIoBytes?: number;
  /** UBLK_F_* to ask for (checked against GET_FEATURES). */
  flags?: number;
  /**
   * Aborting it while start() runs unwinds everything start() did (the device is deleted) and
   * rejects with an UblkError whose code is 'ABORTED'. START_DEV itself cannot be interrupted:
   * an abort during it takes effect when it returns.
   */
  signal?: AbortSignal;
  /** Called right after ADD_DEV with the device's info (its id), before anything can fail later. */
  onAdded?: (info: DevInfo) => void;
  /** How long a stopping queue waits for its target's I/O before keeping its buffers (default 10 s). */
  drainTimeoutMs?: number;
  /**
   * Low-latency mode: before sleeping in io_uring_enter, a queue thread spins this many
   * microseconds watching its rings for the next request (UblkQueueOptions.spinUs). Default 0.
   */
  spinUs?: number;
  /**
   * AUTO_BUF_REG devices: ask for UBLK_AUTO_BUF_REG_FALLBACK, so a request whose pages the kernel
   * could not register arrives marked UBLK_IO_F_NEED_REG_BUF for the queue to register itself,
   * instead of failing (`--auto_zc_fallback`).
   */
  autoZcFallback?: boolean;
  /**
   * Threads per queue (default 1). More than one splits each queue's tags among that many
   * threads, each with its own ring (tag t goes to thread t % threadsPerQueue), which needs
   * UBLK_F_PER_IO_DAEMON (6.16): commands for a tag must come from the thread that fetched it,
   * and before 6.16 the kernel wanted one thread per queue.
   */
  threadsPerQueue?: number;
  /**
   * UBLK_F_SHMEM_ZC (7.1) devices: files (tmpfs, hugetlbfs) this server maps shared and registers
   * with REG_BUF before the disk starts. A client that maps the same file and does O_DIRECT I/O
   * from it has its requests served in place, with no copy (UblkQueueOptions.sharedRegions). The
   * mappings last as long as the process: the kernel holds the pages pinned until DEL_DEV anyway.
   */
  sharedFiles?: readonly string[];
  /**
   * Aborting it (during start() or any time after) makes every queue fail the requests its
   * target holds, and all later ones, with EIO (UblkQueue.failHeld): the way out when a target
   * that never answers holds START_DEV or STOP_DEV in the kernel.
   */
  force?: AbortSignal;
  /** Where the queues' lines go (a target's nonsense answer, a throw, a drain that timed out); default stderr. */
  log?: (line: string) => void;
  /**
   * A live trace to stderr of the control ring and every queue ring: each SQE and CQE decoded
   * (src/uring/trace.ts, src/ublk/trace.ts). The environment variable UBLK_TRACE=1 turns it on
   * for any server.
   */
  trace?: boolean;
  /**
   * The path of the FIFO a trace reader (`ublk trace -n ID`) creates for this device, given its
   * id: {@link UblkServer.followTrace} then sends the trace there until the reader leaves.
   */
  traceFifo?: (devId: number) => string;
}

/** How the queues trace: a shared generation word for followTrace, and where the lines go. */
function queueTrace<O>(opts: ServerOptions<O>, devId: number): { stderr: boolean; word?: SharedArrayBuffer; fifo?: string } {
  return {
    stderr: traceToStderr(opts),
    word: opts.traceFifo !== undefined ? new SharedArrayBuffer(4) : undefined,
    fifo: opts.traceFifo?.(devId),
  };
}

/** ServerOptions.trace, or UBLK_TRACE=1 in the environment. */
function traceToStderr<O>(opts: ServerOptions<O>): boolean {
  return opts.trace === true || process.env.UBLK_TRACE === '1';
}

/** Traces the control ring to stderr, if the options (or UBLK_TRACE=1) ask for it. */
function traceControl<O>(ctrl: UblkControl, opts: ServerOptions<O>): void {
  if (traceToStderr(opts)) ctrl.setTracer(new RingTrace('ctrl', TraceSink.stderr().write, controlTraceDecoder));
}

interface QueueThread {
  qid: number;
  worker: Worker;
  port?: AsyncQueuePort;
  wakeFd: number;
  control: Int32Array;
  fetched: Promise<void>;
  /**
   * Resolves when the thread ended, with its 'done' report if it sent one; by then its port is
   * closed and its tag buffers are unmapped, if the report allowed it.
   */
  done: Promise<Extract<QueueMessage, { kind: 'done' }> | undefined>;
  /** The same moment, without the report (for waiting). */
  exited: Promise<void>;
  counters: Float64Array;
}

export class UblkServer {
  readonly info: DevInfo;
  readonly spec: DeviceSpec;
  private readonly ctrl: UblkControl;
  private readonly queues: QueueThread[];
  /**
   * Resolves with the number of requests served once every queue has finished (the device was
   * stopped, by us or by `ublk del`); rejects as soon as one queue fails.
   */
  readonly finished: Promise<number>;
  private stopping: Promise<void> | undefined;
  private readonly charFd: number;
  private readonly counterNames: readonly string[];

  private readonly trace: ReturnType<typeof queueTrace>;
  private traceSink: TraceSink | undefined;

  private constructor(ctrl: UblkControl, info: DevInfo, spec: DeviceSpec, charFd: number, queues: QueueThread[], counterNames: readonly string[], trace: ReturnType<typeof queueTrace>) {
    this.ctrl = ctrl;
    this.trace = trace;
    this.counterNames = counterNames;
    this.charFd = charFd;
    this.info = info;
    this.spec = spec;
    this.queues = queues;
    // A queue that ends with an error fails the device at once, even while the others serve:
    // I/O the kernel routes to the dead queue would otherwise hang until someone stops it.
    this.finished = new Promise<number>((resolve, reject) => {
      let left = queues.length;
      let served = 0;
      for (const q of queues) {
        void q.done.then((r) => {
          if (!r || r.error) reject(new UblkError(`queue ${q.qid}: ${r?.error ?? 'the thread ended without a report'}`));
          served += r?.served ?? 0;
          if (--left === 0) resolve(served);
        });
      }
    });
    this.finished.catch(() => { /* observed by whoever awaits it */ });
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

  /**
   * A trace reader created the FIFO of {@link ServerOptions.traceFifo}: the control ring and
   * every queue ring trace into it until the reader leaves (each writer notices on its next
   * write; the queues are woken to open it now). Returns false if nobody reads the FIFO.
   */
  followTrace(): boolean {
    const { word, fifo } = this.trace;
    if (word === undefined || fifo === undefined) return false;
    this.traceSink?.close();
    this.traceSink = TraceSink.fifo(fifo);
    if (!this.traceSink) return false;
    this.traceSink.write(`${traceTime()} ctrl # device ${this.devId}, server process ${process.pid}: the control ring and ${this.queues.length} queue ring(s) follow\n`);
    this.ctrl.setTracer(new RingTrace('ctrl', this.traceSink.write, controlTraceDecoder));
    Atomics.add(new Int32Array(word), 0, 1);
    for (const q of this.queues) {
      try {
        sys.eventfdSignal(q.wakeFd);
      } catch { /* the queue is gone */ }
    }
    return true;
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
    if (opts.devId !== undefined && (!Number.isInteger(opts.devId) || opts.devId < 0 || opts.devId > UBLK_MAX_DEV_ID)) {
      throw new UblkError(`device id must be from 0 to ${UBLK_MAX_DEV_ID}, got ${opts.devId}`);
    }
    const signal = opts.signal;
    const checkAbort = () => {
      if (signal?.aborted) throw new UblkError('interrupted while creating the device; it was removed', undefined, 'ABORTED');
    };
    checkAbort();
    const spec: DeviceSpec = opts.asyncTarget?.device ?? await opts.target!.prepare(opts.targetOptions as O);
    const targetUrl = opts.asyncTarget ? siblingUrl(import.meta.url, 'async-queue-thread').href : opts.targetUrl!;
    const maxIoBytes = opts.maxIoBytes ?? spec.maxIoBytes ?? DEFAULT_MAX_IO_BYTES;
    const counterNames = opts.target?.counters ?? [];
    let ctrl: UblkControl | undefined;
    let info: DevInfo | undefined;
    let charFd = -1;
    let live = false;
    const started: QueueThread[] = [];
    try {
      const problem = specProblem(spec, maxIoBytes, queues);
      if (problem) throw new UblkError(problem);
      const params = paramsFor(spec, maxIoBytes);
      checkAbort();
      ctrl = new UblkControl();
      traceControl(ctrl, opts);
      info = ctrl.addDev({
        devId: opts.devId ?? ANY_DEV_ID,
        nrHwQueues: queues,
        queueDepth: depth,
        maxIoBufBytes: maxIoBytes,
        flags: opts.flags ?? 0,
      });
      opts.onAdded?.(info);
      checkAbort();
      // The char device first: for a user's unprivileged device, every command after ADD_DEV needs
      // access to it, which udev's helper grants a moment after ADD_DEV made the node.
      charFd = openCharDev(info.devId);
      ctrl.setParams(info.devId, params);
      const regions = registerShared(ctrl, info.devId, opts.sharedFiles ?? []);
      const trace = queueTrace(opts, info.devId);
      await attachQueues({ info, charFd, started, targetUrl, opts, spec, nrCounters: counterNames.length, regions, trace });
      checkAbort();
      // Not the blocking variant: the kernel's partition scan during START_DEV sends I/O, which
      // an async target serves on this very event loop.
      await ctrl.startDevAsync(info.devId);
      live = true;
      checkAbort();
      return new UblkServer(ctrl, info, spec, charFd, started, counterNames, trace);
    } catch (e) {
      // Unwind: no half-created device may stay behind.
      if (ctrl && info) {
        try {
          await teardown({ ctrl, devId: info.devId, queues: started, charFd, live });
        } catch { /* best effort: `ublk del` can finish it */ }
      } else {
        for (const q of started) sys.close(q.wakeFd);
      }
      ctrl?.close();
      spec.release?.();
      throw e;
    }
  }

  /**
   * Serves device `devId` again after its server died: the device must have been added with
   * UBLK_F_USER_RECOVERY and be waiting for a server (QUIESCED, or FAIL_IO). The target and its
   * options must be the ones the device was served with (the CLI keeps them in its run-dir state).
   * START_USER_RECOVERY is refused with EBUSY while the old server still holds /dev/ublkcN (a
   * killed process releases it only once it has fully exited): it is retried until
   * `waitForOldServerMs` (default 10 s). Failing or aborted, recover leaves the device as it found
   * it, waiting for a server, so it can be tried again (or deleted).
   */
  static async recover<O>(opts: ServerOptions<O> & { devId: number; waitForOldServerMs?: number }): Promise<UblkServer> {
    const signal = opts.signal;
    const checkAbort = () => {
      if (signal?.aborted) throw new UblkError(`interrupted while recovering device ${opts.devId}; it still waits for a server`, undefined, 'ABORTED');
    };
    const ctrl = new UblkControl();
    traceControl(ctrl, opts);
    let spec: DeviceSpec | undefined;
    let charFd = -1;
    const started: QueueThread[] = [];
    try {
      let info = ctrl.devInfo(opts.devId);
      if (!(info.flags & UBLK_F_USER_RECOVERY)) {
        throw new UblkError(`device ${opts.devId} was added without user recovery (-r 1), so it cannot be recovered: remove it with \`ublk del -n ${opts.devId}\``);
      }
      spec = opts.asyncTarget?.device ?? await opts.target!.prepare(opts.targetOptions as O);
      const params = ctrl.params(opts.devId);
      const devBytes = (params.basic?.devSectors ?? 0) * 512;
      if (spec.sizeBytes < devBytes) {
        throw new UblkError(`device ${opts.devId} is ${devBytes} bytes, but its target now offers only ${spec.sizeBytes}: it cannot serve the disk it had`);
      }
      // START_USER_RECOVERY: EBUSY while the dying server still holds the char device (or the
      // kernel has not yet noticed it died: the device is then still LIVE).
      const until = Date.now() + (opts.waitForOldServerMs ?? 10_000);
      for (;;) {
        checkAbort();
        try {
          ctrl.startUserRecovery(opts.devId);
          break;
        } catch (e) {
          if (!(e instanceof UblkError) || e.code !== 'EBUSY' || Date.now() >= until) {
            info = ctrl.devInfo(opts.devId);
            if (info.state === UBLK_S_DEV_LIVE && pidAlive(info.ublksrvPid)) {
              throw new UblkError(`device ${opts.devId} is LIVE, served by process ${info.ublksrvPid}: there is nothing to recover`);
            }
            throw new UblkError(`device ${opts.devId} (state ${stateName(info.state)}) could not enter recovery: ${(e as Error).message}`, 'START_USER_RECOVERY', (e as UblkError).code);
          }
        }
        await new Promise((r) => setTimeout(r, 50));
      }
      info = ctrl.devInfo(opts.devId);
      const targetUrl = opts.asyncTarget ? siblingUrl(import.meta.url, 'async-queue-thread').href : opts.targetUrl!;
      const counterNames = opts.target?.counters ?? [];
      charFd = openCharDev(info.devId);
      const trace = queueTrace(opts, info.devId);
      await attachQueues({ info, charFd, started, targetUrl, opts, spec, nrCounters: counterNames.length, trace });
      checkAbort();
      // Like START_DEV, END_USER_RECOVERY waits until every tag is fetched; with REISSUE the
      // held requests arrive right after, so the event loop must keep running (async targets).
      await ctrl.endUserRecoveryAsync(info.devId);
      return new UblkServer(ctrl, ctrl.devInfo(info.devId), spec, charFd, started, counterNames, trace);
    } catch (e) {
      // Leave the device waiting for a server: stop our queues, let go of the char device.
      for (const q of started) signalQueue(q, CONTROL_STOP);
      await Promise.allSettled(started.map((q) => q.exited));
      if (charFd >= 0) sys.close(charFd);
      for (const q of started) sys.close(q.wakeFd);
      ctrl.close();
      spec?.release?.();
      throw e;
    }
  }

  /**
   * Ends this server without stopping the device (user recovery): the queues stop serving and
   * every reference to /dev/ublkcN is dropped, so ublk_drv quiesces the disk until another
   * server recovers it. Requests the queues held are sent again to that server (REISSUE) or
   * failed (without it); the target's own I/O is drained first, as in any stop.
   */
  leave(): Promise<void> {
    return (this.stopping ??= (async () => {
      try {
        for (const q of this.queues) signalQueue(q, CONTROL_STOP);
        await Promise.allSettled(this.queues.map((q) => q.exited));
        sys.close(this.charFd);
        for (const q of this.queues) sys.close(q.wakeFd);
      } finally {
        this.ctrl.close();
        this.spec.release?.();
      }
    })());
  }

  /**
   * Hands the device over to the next server (live upgrade) with QUIESCE_DEV: the kernel lets
   * the I/O in flight finish and holds new I/O, then aborts this server's fetches; the queues
   * end with nothing outstanding and the server leaves. Resolves true once it has let go, false
   * if the device cannot be quiesced (no UBLK_F_QUIESCE, or the I/O did not drain in
   * `timeoutMs`): the caller must then leave with requests in flight, which on Linux 6.12 is
   * only safe the way a crash does it (see serve.ts). Rejects, naming the queues, if they are
   * still running `timeoutMs` after QUIESCE_DEV: the device is QUIESCED by then, so the caller
   * can leave the way a crash does and the next server recovers it.
   */
  async handOver(timeoutMs = 10_000, log: (line: string) => void = () => undefined): Promise<boolean> {
    if (!(this.info.flags & UBLK_F_QUIESCE)) return false;
    try {
      await this.ctrl.quiesceDevAsync(this.devId, timeoutMs);
    } catch (e) {
      log(`device ${this.devId}: QUIESCE_DEV failed (${(e as Error).message})`);
      return false;
    }
    // The fetches were aborted: the queues end on their own. Seen once on 7.3 under fio (a
    // server that had itself been started by an upgrade): one did not, and the server never
    // left; a bound turns that into a crash-like exit with the evidence in the log.
    const ended = this.queues.map(() => false);
    this.queues.forEach((q, i) => void q.done.then(() => { ended[i] = true; }));
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<'late'>((r) => { timer = setTimeout(() => r('late'), timeoutMs); });
    const outcome = await Promise.race([this.finished.then(() => 'done', () => 'done'), late]);
    clearTimeout(timer);
    if (outcome === 'late') {
      const running = this.queues.filter((_, i) => !ended[i]).map((q) => q.qid);
      throw new UblkError(`device ${this.devId}: QUIESCE_DEV succeeded, but queue(s) ${running.join(', ')} still run ${timeoutMs} ms later`);
    }
    await this.leave();
    return true;
  }

  /** Whether the device was added with user recovery, so that it can outlive this server. */
  get recoverable(): boolean {
    return (this.info.flags & UBLK_F_USER_RECOVERY) !== 0;
  }

  /**
   * STOP_DEV, wait for the queues to release everything, DEL_DEV. Idempotent. `beforeDelete`
   * runs after the queues are gone and before DEL_DEV frees the device id (the CLI removes its
   * state file there, so it can never delete the state of a new device that reuses the id).
   */
  stop(opts: { beforeDelete?: () => void } = {}): Promise<void> {
    return (this.stopping ??= (async () => {
      try {
        await teardown({ ctrl: this.ctrl, devId: this.devId, queues: this.queues, charFd: this.charFd, live: true, beforeDelete: opts.beforeDelete });
      } finally {
        this.ctrl.close();
        // Every queue has exited: nothing uses the target's device-wide resources any more.
        this.spec.release?.();
      }
    })());
  }

  /** What each queue reported when it closed (undefined for one still running). */
  async closeReports(): Promise<Array<QueueCloseReport | undefined>> {
    return (await Promise.all(this.queues.map((q) => q.done))).map((r) => r?.close);
  }
}

/**
 * Takes a device down, from any state start() can leave it in:
 *
 * 1. A live device is stopped the orderly way: STOP_DEV, during which the kernel still sends us
 *    the I/O it had queued, then aborts every tag's FETCH, which ends the queues. A device that
 *    never went live would not abort the fetches: the queues get the stop word at once. Either
 *    way, queues still running after `graceMs` get it too.
 * 2. Once every queue thread has exited, its tag buffers are unmapped (if it could prove no SQE
 *    still names them) and the char device is closed: our last reference to it. On 7.x that
 *    close is also what makes the kernel fail requests a dead queue still held, which a STOP_DEV
 *    waiting in del_gendisk needs; so STOP_DEV is awaited only after it.
 * 3. `beforeDelete`, then DEL_DEV, which waits for the last reference to go.
 */
async function teardown(o: {
  ctrl: UblkControl; devId: number; queues: QueueThread[]; charFd: number; live: boolean; beforeDelete?: () => void;
}): Promise<void> {
  const gone = (e: unknown) => e instanceof UblkError && (e.code === 'ENODEV' || e.code === 'ENOENT');
  let stopped: Promise<unknown> = Promise.resolve();
  if (o.live) stopped = o.ctrl.stopDevAsync(o.devId).then(() => undefined, (e: unknown) => (gone(e) ? undefined : e));
  else for (const q of o.queues) signalQueue(q, CONTROL_STOP);
  const timer = setTimeout(() => o.queues.forEach((q) => signalQueue(q, CONTROL_STOP)), 5000);
  await Promise.allSettled(o.queues.map((q) => q.exited));
  clearTimeout(timer);
  if (o.charFd >= 0) sys.close(o.charFd);
  const stopError = await stopped;
  for (const q of o.queues) sys.close(q.wakeFd);
  try {
    o.beforeDelete?.();
  } finally {
    try {
      await o.ctrl.delDevAsync(o.devId);
    } catch (e) {
      if (!gone(e)) throw e;
    }
  }
  if (stopError) throw stopError;
}

/**
 * Starts a thread per queue the kernel granted and waits until each has fetched every tag (or
 * until one fails, or `opts.signal` aborts). Threads are pushed on `started` as they start, so
 * the caller's unwinding finds them all.
 */
async function attachQueues<O>(a: {
  info: DevInfo; charFd: number; started: QueueThread[]; targetUrl: string; opts: ServerOptions<O>; spec: DeviceSpec; nrCounters: number;
  regions?: SharedRegion[]; trace: ReturnType<typeof queueTrace>;
}): Promise<void> {
  const { info, opts, started } = a;
  // The kernel caps nr_hw_queues at the number of possible CPUs: serve what it granted.
  // [THREADING] with per-I/O threads, each queue's tags are split among threadsPerQueue threads.
  const k = Math.min(opts.threadsPerQueue ?? 1, info.queueDepth);
  if (k > 1 && (info.flags & UBLK_F_BATCH_IO)) {
    // Tags then go to whichever thread's fetch the kernel fills, which the split by tag cannot follow.
    throw new UblkError(`batch I/O (-b) serves each queue from one thread here; ${k} threads per queue are not supported with it`);
  }
  if (k > 1 && !(info.flags & UBLK_F_PER_IO_DAEMON)) {
    // ublk_drv grants PER_IO_DAEMON itself (6.16); without it a queue's tags must all come from one task.
    throw new UblkError(`${k} threads per queue need UBLK_F_PER_IO_DAEMON (Linux 6.16), which this kernel did not grant: it serves each queue from one thread`);
  }
  for (let qid = 0; qid < info.nrHwQueues; qid++) {
    for (let t = 0; t < k; t++) {
      started.push(spawnQueue({
        info, charFd: a.charFd, qid, targetUrl: a.targetUrl, targetOptions: opts.targetOptions ?? {}, device: a.spec.queueData,
        nrCounters: a.nrCounters, asyncTarget: opts.asyncTarget, requestTimeoutMs: opts.requestTimeoutMs, drainTimeoutMs: opts.drainTimeoutMs, spinUs: opts.spinUs, autoZcFallback: opts.autoZcFallback, log: opts.log,
        tagStride: k, tagOffset: t, sharedRegions: a.regions, trace: a.trace,
      }));
    }
  }
  opts.force?.addEventListener('abort', () => started.forEach((q) => signalQueue(q, CONTROL_FAIL_HELD)), { once: true });
  // A queue that ends before it has fetched failed; an abort ends the wait too.
  const signal = opts.signal;
  const aborted = new Promise<void>((resolve) => {
    if (signal?.aborted) resolve();
    signal?.addEventListener('abort', () => resolve(), { once: true });
  });
  await Promise.race([
    Promise.all(started.map((q) => Promise.race([q.fetched, q.done.then((r) => {
      throw new UblkError(`queue ${q.qid} could not start: ${r?.error ?? 'its thread ended'}`);
    })]))),
    aborted,
  ]);
}

/** Whether process `pid` exists (signal 0 is delivered to nobody, only checked). */
export function pidAlive(pid: number): boolean {
  if (pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Sets `bits` in a queue's control word and wakes it to read them. */
function signalQueue(q: QueueThread, bits: number): void {
  Atomics.or(q.control, 0, bits);
  try {
    sys.eventfdSignal(q.wakeFd);
  } catch {
    // The fd is gone with the queue.
  }
}

/**
 * Opens /dev/ublkcN, which devtmpfs creates during ADD_DEV (retrying briefly if udev is slow;
 * for a user's unprivileged device, until udev's helper has handed the node to its owner).
 */
function openCharDev(devId: number): number {
  const path = `/dev/ublkc${devId}`;
  const waitFor = (process.geteuid?.() ?? 0) === 0 ? ['ENOENT'] : ['ENOENT', 'EACCES', 'EPERM'];
  for (let i = 0; ; i++) {
    try {
      return sys.open(path, libc.O_RDWR | libc.O_CLOEXEC);
    } catch (e) {
      if (!(e instanceof SysError) || !waitFor.includes(e.code) || i >= 500) {
        if (e instanceof SysError && (e.code === 'EACCES' || e.code === 'EPERM')) {
          throw new UblkError(`cannot open ${path} (${e.code}): udev did not hand it to you; is the rule of \`ublk setup-unprivileged\` installed?`);
        }
        throw e;
      }
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 10);
    }
  }
}

interface SpawnOptions {
  trace: ReturnType<typeof queueTrace>;
  info: DevInfo;
  charFd: number;
  qid: number;
  targetUrl: string;
  targetOptions: unknown;
  /** DeviceSpec.queueData. */
  device: unknown;
  nrCounters: number;
  asyncTarget?: AsyncTarget;
  requestTimeoutMs?: number;
  drainTimeoutMs?: number;
  spinUs?: number;
  autoZcFallback?: boolean;
  tagStride?: number;
  tagOffset?: number;
  sharedRegions?: SharedRegion[];
  log?: (line: string) => void;
}

/** A file mapped shared and registered with REG_BUF: its index, and where it is in this process. */
interface SharedRegion {
  index: number;
  address: number;
  length: number;
}

/** Files a shared region may be: the queue reads it through one Buffer view (MAX_VIEW_BYTES). */
export const MAX_SHARED_BYTES = 2 ** 30;

/** Why a file of `size` bytes cannot be a shared region (REG_BUF wants whole pages), or undefined. */
export function sharedSizeProblem(size: number): string | undefined {
  if (size > 0 && size % PAGE_SIZE === 0 && size <= MAX_SHARED_BYTES) return undefined;
  return `its size (${size} bytes) must be a multiple of the page size (${PAGE_SIZE}), from one page to 1 GiB`;
}

/**
 * Maps each file shared and registers it (REG_BUF, UBLK_F_SHMEM_ZC): the kernel pins its pages and
 * matches O_DIRECT requests whose pages lie in it. Before START_DEV, so the disk's first request
 * can already match. The mappings stay for the life of the process (ServerOptions.sharedFiles).
 */
function registerShared(ctrl: UblkControl, devId: number, files: readonly string[]): SharedRegion[] {
  return files.map((path) => {
    const fd = openSync(path, 'r+');
    let m: Mapping;
    try {
      const size = fstatSync(fd).size;
      const problem = sharedSizeProblem(size);
      if (problem) throw new UblkError(`shared file ${path}: ${problem}`);
      m = Mapping.file(fd, size, 0);
    } finally {
      closeSync(fd);
    }
    try {
      return { index: ctrl.regBuf(devId, m.address, m.length), address: m.address, length: m.length };
    } catch (e) {
      m.unmap(); // a refused registration pinned nothing
      throw e;
    }
  });
}

const writeStderr = (line: string) => { process.stderr.write(`${line}\n`); };

function spawnQueue(o: SpawnOptions): QueueThread {
  const counters = new SharedArrayBuffer(8 * Math.max(1, o.nrCounters));
  const wakeFd = sys.eventfd(0, libc.EFD_CLOEXEC | libc.EFD_NONBLOCK);
  const control = new SharedArrayBuffer(4);
  const shared = o.asyncTarget ? new SharedArrayBuffer(CompletionRing.bytes(o.info.queueDepth)) : undefined;
  const port = o.asyncTarget && shared ? new AsyncQueuePort(o.asyncTarget, shared, o.info.queueDepth, wakeFd, o.qid, o.requestTimeoutMs ?? 0, o.log ?? writeStderr) : undefined;
  const data: QueueThreadData = {
    charFd: o.charFd,
    qid: o.qid,
    depth: o.info.queueDepth,
    maxIoBytes: o.info.maxIoBufBytes,
    drainTimeoutMs: o.drainTimeoutMs,
    spinUs: o.spinUs,
    // The negotiated flags, so a recovering server serves the mode the device was added with.
    ...queueDataPath(o.info.flags, o.autoZcFallback),
    forceRegFallback: process.env.UBLK_TEST_FORCE_REG_FALLBACK === '1',
    tagStride: o.tagStride,
    tagOffset: o.tagOffset,
    sharedRegions: o.sharedRegions,
    targetUrl: o.targetUrl,
    targetOptions: o.targetOptions,
    wakeFd,
    control,
    shared,
    device: o.device,
    counters,
    requestTimeoutMs: o.requestTimeoutMs,
    trace: o.trace,
  };
  const worker = startWorker(siblingUrl(import.meta.url, 'queue-thread'), data);
  let onFetched!: () => void;
  const fetched = new Promise<void>((res) => { onFetched = res; });
  const done = new Promise<Extract<QueueMessage, { kind: 'done' }> | undefined>((resolve) => {
    let report: Extract<QueueMessage, { kind: 'done' }> | undefined;
    const failed = (error: string) => ({ kind: 'done' as const, qid: o.qid, served: 0, error,
      close: { drained: false, inFlight: 0, held: 0, unresolvedLinks: 0, bufBase: 0, bufBytes: 0 } });
    worker.on('message', (m: QueueMessage) => {
      switch (m.kind) {
        case 'log': (o.log ?? writeStderr)(m.line); break;
        case 'target': port?.dispatch(m.message as AsyncBatch); break;
        case 'fetched': port?.attach(m.bufBase, m.maxIoBytes); onFetched(); break;
        case 'done': report = m; break;
        case 'error': report = failed(m.stack ?? m.message); break;
      }
    });
    worker.on('error', (e) => { report ??= failed(e.stack ?? e.message); });
    worker.on('exit', () => {
      // The thread is gone: no task work of ublk_drv can copy into its buffers any more.
      port?.close();
      if (report) releaseQueueBuffers(report.close);
      resolve(report);
    });
  });
  const exited = done.then(() => undefined);
  return { qid: o.qid, worker, port, wakeFd, control: new Int32Array(control), fetched, done, exited, counters: new Float64Array(counters) };
}
