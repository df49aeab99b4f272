/**
 * The server process behind `ublk add`: creates the device, serves it until it is stopped,
 * removes it. Detached (the usual case) it reports to the `add` that started it over the IPC
 * channel; with --foreground it is that same process.
 *
 * Lifecycle rules, each one a past bug:
 * - SIGTERM and SIGINT are handled from before ADD_DEV: a signal during creation unwinds it (no
 *   half-made device); after, it stops and deletes the device. A second signal while that is
 *   stuck (a target that never answers, so the kernel waits) fails every request the target
 *   holds, which lets the kernel finish; a third exits at once.
 * - The parent may die at any moment (`ublk add` killed, or its terminal closed): reporting to
 *   it never throws, and the server goes on serving; the device is then LIVE with a live server,
 *   as `ublk list` shows.
 * - The state file is written after START_DEV; if that fails, the device is removed again.
 * - The state file is removed while the device still exists (before DEL_DEV frees its id), and
 *   only if it is ours, so it can never remove the state of a new device that took the id.
 *
 * A device with user recovery (`-r 1`) outlives this process. The server then never deletes it
 * on its own account, and its state file stays for `ublk recover`:
 * - SIGUSR2 (sent by `ublk upgrade` and `ublk quiesce`) hands the device over: QUIESCE_DEV
 *   drains it, the queues end, the server leaves (UblkServer.handOver).
 * - A queue that fails, or a hand-over without QUIESCE_DEV (Linux < 6.16), must leave with
 *   requests in flight. The server then ends the way a crash does, with SIGKILL to itself, and
 *   lets the kernel requeue (REISSUE) or fail them. Measured on 6.12: queue threads that exit one
 *   by one with requests in flight can leave ublk_drv's quiesce work waiting forever for
 *   requests nobody will answer (hung tasks, a device that never reaches QUIESCED); the whole
 *   process dying at once is the path the kill -9 recovery loop proves.
 * - If the queues end because someone else quiesced the device, it leaves too.
 * SIGTERM and SIGINT still stop and delete the device: that is what the operator asked for.
 */
import { watch, lstatSync, type FSWatcher } from 'node:fs';
import { basename } from 'node:path';
import { UblkServer } from '../ublk/server.js';
import { UblkControl, UblkError, type DevInfo } from '../ublk/control.js';
import { UBLK_S_DEV_QUIESCED } from '../ublk/abi.js';
import { loadTarget } from '../targets/index.js';
import { RunDir, type DeviceState } from './run-dir.js';
import { BY_NAME_DIR, linkName, unlinkName } from './saved.js';

/** What a server needs to know (passed as JSON on a detached server's command line). */
export interface ServeConfig {
  target: string;
  targetOptions: unknown;
  devId?: number;
  queues: number;
  depth: number;
  maxIoBytes?: number;
  /** UBLK_F_* flags for ADD_DEV (user recovery and its variants). */
  flags?: number;
  /** --spin-us: the queues' low-latency spin (ServerOptions.spinUs). */
  spinUs?: number;
  /** --request-timeout: report requests an async target holds longer (ServerOptions.requestTimeoutMs). */
  requestTimeoutMs?: number;
  /** --auto_zc_fallback (ServerOptions.autoZcFallback). */
  autoZcFallback?: boolean;
  /** --nthreads / --per_io_tasks (ServerOptions.threadsPerQueue). */
  threadsPerQueue?: number;
  /** --shmem_zc --htlb FILE (ServerOptions.sharedFiles). */
  sharedFiles?: string[];
  /** The device's saved name (`add --save NAME`): linked in /dev/disk/by-ublk-name while served. */
  name?: string;
  /** Recover device `devId` (whose server died) instead of adding one. */
  recover?: boolean;
  /** The detached server's log file (named in the state, so `list -v` shows it). */
  log?: string;
  /** --trace: every SQE and CQE of the rings in the log (ServerOptions.trace). */
  trace?: boolean;
}

/** What a detached server tells `ublk add`, in order: `added` (once ADD_DEV worked), then `ready` or `failed`. */
export type ServeReport =
  | { kind: 'added'; devId: number }
  | { kind: 'ready'; devId: number; queues: number }
  | { kind: 'failed'; error: string };

/** Sends a report to the parent if it is still there; never throws (the parent may be gone). */
function report(m: ServeReport): void {
  if (!process.send || !process.connected) return;
  try {
    process.send(m, undefined, {}, () => { /* an error here means the parent went away: fine */ });
  } catch {
    // The channel closed between the check and the send.
  }
}

const log = (line: string) => process.stderr.write(`ublk: ${line}\n`);

/**
 * Runs the server; resolves to the process's exit status. `printReady` (foreground) prints the
 * device like `list` does once it is live.
 */
export async function serve(cfg: ServeConfig, printReady?: (id: number) => void): Promise<number> {
  const runDir = new RunDir();
  const abort = new AbortController();
  let server: UblkServer | undefined;
  let added: DevInfo | undefined;
  let signals = 0;
  const removeState = () => {
    if (!server) return;
    if (cfg.name !== undefined) unlinkName(cfg.name, server.devId);
    runDir.removeState(server.devId, process.pid);
  };
  let leaving = false;
  const force = new AbortController();
  const onSignal = (sig: NodeJS.Signals) => {
    signals++;
    const what = added ? `device ${added.devId}` : 'the device being created';
    if (signals === 1) {
      log(`${sig}: stopping ${what}`);
      abort.abort();
      server?.stop({ beforeDelete: removeState }).catch((e: Error) => log(`stopping device ${server!.devId}: ${e.message}`));
      return;
    }
    if (signals === 2) {
      // The stop is stuck: the kernel waits for requests the target holds (START_DEV for the
      // partition scan's reads, STOP_DEV for everything in flight) and neither can be
      // interrupted. Answering them is the way out; exiting instead can leave this process
      // hanging in the kernel.
      log(`${sig} again: failing the I/O the target still holds with EIO, so the kernel can let go of ${what}`);
      force.abort();
      return;
    }
    log(`${sig} a third time: exiting without waiting${added ? `; if /dev/ublkc${added.devId} remains, remove it with \`ublk del -n ${added.devId}\`` : ''}`);
    process.exit(sig === 'SIGINT' ? 130 : 143);
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  process.on('SIGUSR2', () => {
    if (!server?.recoverable) {
      log(`SIGUSR2: ${server ? `device ${server.devId} has no user recovery (-r 1): it would die with this server, so the server stays` : 'not serving yet'}`);
      return;
    }
    if (leaving) return;
    log(`SIGUSR2: handing device ${server.devId} over to the next server (\`ublk recover -n ${server.devId}\`)`);
    leaving = true;
    const id = server.devId;
    server.handOver(10_000, log).then(
      (quiesced) => { if (!quiesced) crash(id, 'it cannot be quiesced (QUIESCE_DEV: Linux 6.16)'); },
      (e: Error) => crash(id, e.message),
    );
  });
  // The log is a file: a full file system (or a closed terminal, in the foreground) must cost us
  // log lines, never the device.
  process.stderr.on('error', () => { /* lose the line */ });
  // A parent that dies closes the IPC channel; with this listener that is an event, not a crash.
  process.on('disconnect', () => { /* serve on */ });

  const t = await loadTarget(cfg.target);
  if (!t) {
    report({ kind: 'failed', error: `unknown target '${cfg.target}'` });
    return 1;
  }
  const destroy = () => {
    try {
      t.def.destroy?.(cfg.targetOptions);
    } catch (e) {
      log(`freeing what the target kept for the device: ${(e as Error).message}`);
    }
  };
  try {
    const common = {
      target: t.def, targetUrl: t.url, targetOptions: cfg.targetOptions, signal: abort.signal, force: force.signal, spinUs: cfg.spinUs, requestTimeoutMs: cfg.requestTimeoutMs, autoZcFallback: cfg.autoZcFallback,
      threadsPerQueue: cfg.threadsPerQueue, sharedFiles: cfg.sharedFiles,
      trace: cfg.trace, traceFifo: (devId: number) => runDir.tracePath(devId),
    };
    server = cfg.recover
      ? await UblkServer.recover({ ...common, devId: cfg.devId! })
      : await UblkServer.start({
        ...common,
        devId: cfg.devId, queues: cfg.queues, depth: cfg.depth, maxIoBytes: cfg.maxIoBytes, flags: cfg.flags,
        onAdded: (info) => {
          added = info;
          report({ kind: 'added', devId: info.devId });
        },
      });
    if (cfg.recover) added = server.info;
  } catch (e) {
    const message = (e as Error).message;
    if (!cfg.recover) destroy(); // the device was unwound: nothing of it may stay
    report({ kind: 'failed', error: message });
    if (!process.send) throw e;
    log(message);
    return 1;
  }
  const id = server.devId;
  if (server.info.nrHwQueues < cfg.queues) {
    log(`device ${id}: the kernel granted ${server.info.nrHwQueues} of ${cfg.queues} queues (at most one per possible CPU)`);
  }
  const state: DeviceState = {
    devId: id, target: cfg.target, targetOptions: cfg.targetOptions, queues: cfg.queues, depth: cfg.depth,
    maxIoBytes: cfg.maxIoBytes, flags: cfg.flags, spinUs: cfg.spinUs, requestTimeoutMs: cfg.requestTimeoutMs, autoZcFallback: cfg.autoZcFallback, threadsPerQueue: cfg.threadsPerQueue, sharedFiles: cfg.sharedFiles, name: cfg.name, pid: process.pid, log: cfg.log, describe: server.spec.describe,
  };
  try {
    if (!abort.signal.aborted) runDir.writeState(state); // (a signal's stop is already removing the device)
  } catch (e) {
    // A device nobody can find the server of is worse than none: take it down again.
    const message = `device ${id} was created, but its state file could not be written (${(e as Error).message}); it was removed again`;
    log(message);
    await server.stop({ beforeDelete: removeState }).catch((err: Error) => log(`removing device ${id}: ${err.message}`));
    report({ kind: 'failed', error: message });
    if (!process.send) throw new UblkError(message);
    return 1;
  }
  if (cfg.name !== undefined && !abort.signal.aborted) {
    try {
      linkName(cfg.name, id);
    } catch (e) {
      log(`device ${id}: cannot link ${BY_NAME_DIR}/${cfg.name}: ${(e as Error).message}`);
    }
  }
  const traceWatch = watchTraceReaders(runDir, server);
  if (!abort.signal.aborted) {
    report({ kind: 'ready', devId: id, queues: server.info.nrHwQueues });
    if (process.connected) process.disconnect?.();
    printReady?.(id);
  }

  // Finished: stopped by a signal (which deletes the device), by `ublk del` elsewhere, or, for a
  // device with user recovery, quiesced or left to the next server.
  let status = 0;
  const served = await server.finished.catch((e: Error) => {
    if (server!.recoverable && !leaving) {
      log(`device ${id}: a queue failed: ${e.message}`);
      crash(id, 'a queue failed');
    } else {
      log(`device ${id}: a queue failed, stopping the device: ${e.message}`);
    }
    status = 1;
    return -1;
  });
  traceWatch?.close();
  if (!leaving && server.recoverable && !abort.signal.aborted && quiesced(id)) {
    log(`device ${id} was quiesced (QUIESCE_DEV)`);
    leaving = true;
  }
  if (leaving) {
    await server.leave().catch((e: Error) => {
      log(`device ${id}: ${e.message}`);
      status = 1;
    });
    log(`device ${id} left to the next server${served >= 0 ? ` after ${served} requests` : ''}: \`ublk recover -n ${id}\` serves it again, \`ublk del -n ${id}\` removes it`);
    return status;
  }
  await server.stop({ beforeDelete: removeState }).then(destroy, (e: Error) => {
    log(`device ${id}: ${e.message}`);
    status = 1;
  });
  for (const r of await server.closeReports()) {
    if (r && !r.drained) status = 1; // the queue already said why in the log
  }
  log(`device ${id} stopped${served >= 0 ? ` after ${served} requests` : ''}`);
  return status;
}

/**
 * Leaves a recoverable device the way a crash does: SIGKILL to this process, so every queue
 * thread, ring and reference to /dev/ublkcN goes at once and ublk_drv requeues (REISSUE) or
 * fails the requests this server held. Never returns.
 */
function crash(id: number, why: string): never {
  log(`device ${id}: ${why}; leaving it to the next server at once, as a crash would (\`ublk recover -n ${id}\` serves it again, \`ublk del -n ${id}\` removes it)`);
  process.kill(process.pid, 'SIGKILL');
  throw new Error('unreachable');
}

/** Whether device `id` is QUIESCED (by QUIESCE_DEV, or because its queues lost their server). */
function quiesced(id: number): boolean {
  const ctrl = new UblkControl();
  try {
    return ctrl.devInfo(id).state === UBLK_S_DEV_QUIESCED;
  } catch {
    return false; // gone: deleted by `ublk del`
  } finally {
    ctrl.close();
  }
}

/**
 * Watches the run directory for a `ublk trace -n ID` reader's FIFO (inotify: nothing runs until
 * one appears) and hands each new one to the server, which traces into it until the reader
 * leaves. Undefined if the directory cannot be watched (then `ublk trace` says the server did
 * not answer).
 */
function watchTraceReaders(runDir: RunDir, server: UblkServer): FSWatcher | undefined {
  const path = runDir.tracePath(server.devId);
  const name = basename(path);
  let followed = -1;
  const look = (quiet: boolean) => {
    let ino: number;
    try {
      const st = lstatSync(path);
      if (!st.isFIFO()) return;
      ino = st.ino;
    } catch {
      return; // removed again
    }
    if (ino === followed) return; // one FIFO raises several events
    // Marked as followed only once the server could open it: a later event for the same FIFO
    // (a reader of an older ublk, which opened it after making it) gets another try.
    if (server.followTrace()) followed = ino;
    else if (!quiet) log(`device ${server.devId}: a trace reader's FIFO appeared, but nobody reads it`);
  };
  try {
    const w = watch(runDir.path, { persistent: false }, (_event, file) => {
      if (file === name) look(false);
    });
    w.on('error', () => { /* the directory went away: no more readers */ });
    look(true); // a reader that was there before we watched (or the FIFO of one that was killed)
    return w;
  } catch (e) {
    log(`device ${server.devId}: cannot watch ${runDir.path} for trace readers: ${(e as Error).message}`);
    return undefined;
  }
}
