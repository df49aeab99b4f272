/**
 * The run directory (`/run/ublk`, or $UBLK_RUN_DIR): one state file per device served by a
 * `ublk add` server (`ublkbN.json`: the target, its options, the server's pid, its log), and the
 * servers' logs (`log/`).
 *
 * `add` and `del` run as root, so this directory is trusted only if nobody else could have put
 * things in it: it must be a real directory (not a symlink), owned by us, and writable by no one
 * else (no group/other write bit). Files are never opened through a symlink (O_NOFOLLOW), are
 * created with explicit modes (whatever the umask), and state files are replaced atomically (a
 * new file made with O_EXCL, then renamed over the old one; rename replaces a planted symlink
 * instead of following it).
 */
import {
  closeSync, fstatSync, fsyncSync, lstatSync, mkdirSync, openSync, readFileSync, renameSync, rmSync,
  unlinkSync, writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { libc } from '../libc/index.js';
import { UblkError } from '../ublk/control.js';

const { O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_APPEND, O_CLOEXEC } = libc;

/** What a server saves about its device, read by `list`, `del` (and a later `recover`). */
export interface DeviceState {
  devId: number;
  /** The target's -t value and its parsed options. */
  target: string;
  targetOptions: unknown;
  queues: number;
  depth: number;
  maxIoBytes?: number;
  /** The UBLK_F_* flags the device was added with (user recovery). */
  flags?: number;
  /** --spin-us, kept by recover and upgrade. */
  spinUs?: number;
  requestTimeoutMs?: number;
  /** --auto_zc_fallback, kept by recover and upgrade (the flag travels in each command, not in the device's flags). */
  autoZcFallback?: boolean;
  /** Threads per queue (--nthreads / --per_io_tasks), kept by recover and upgrade. */
  threadsPerQueue?: number;
  /** --shmem_zc's shared files (--htlb), registered with REG_BUF. */
  sharedFiles?: string[];
  /** Its saved name (`add --save NAME`). */
  name?: string;
  /** The server process. */
  pid: number;
  /** Its log file, for a detached server. */
  log?: string;
  /** DeviceSpec.describe: the target's own description of the device. */
  describe?: Record<string, unknown>;
}

export class RunDir {
  readonly path: string;
  private readonly uid: number;

  constructor(path = process.env.UBLK_RUN_DIR || defaultRunDir()) {
    this.path = path;
    this.uid = process.geteuid?.() ?? 0;
  }

  statePath(id: number): string {
    return join(this.path, `ublkb${id}.json`);
  }

  /** The FIFO a `ublk trace -n ID` reader creates, and device ID's server writes its trace into. */
  tracePath(id: number): string {
    return join(this.path, `ublkb${id}.trace`);
  }

  get logDir(): string {
    return join(this.path, 'log');
  }

  /** Creates the directory (and `log/`) if missing, and refuses one that is not trustworthy. */
  ensure(): void {
    this.ensureDir(this.path);
    this.ensureDir(this.logDir);
  }

  private ensureDir(dir: string): void {
    try {
      // mkdir's mode passes through the umask, which can only remove bits: 0o755 or stricter.
      mkdirSync(dir, { mode: 0o755 });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') {
        throw new UblkError(`cannot create the run directory ${dir}: ${(e as Error).message}`);
      }
    }
    this.checkDir(dir);
  }

  /** Throws unless `dir` is a directory we own that nobody else can write. */
  private checkDir(dir: string): void {
    const st = lstatSync(dir);
    const fix = '(set UBLK_RUN_DIR to a directory of your own, or fix this one)';
    if (st.isSymbolicLink()) throw new UblkError(`the run directory ${dir} is a symbolic link; refusing to use it ${fix}`);
    if (!st.isDirectory()) throw new UblkError(`the run directory ${dir} is not a directory ${fix}`);
    if (st.uid !== this.uid) throw new UblkError(`the run directory ${dir} belongs to uid ${st.uid}, not to us (uid ${this.uid}); refusing to use it ${fix}`);
    if (st.mode & 0o022) {
      throw new UblkError(`the run directory ${dir} is writable by ${st.mode & 0o020 ? 'its group' : 'others'} (mode ${(st.mode & 0o7777).toString(8).padStart(4, '0')}); refusing to use it: chmod go-w ${dir}`);
    }
  }

  /**
   * Whether the directory can be read at all: absent is fine (no state), untrustworthy throws.
   * Readers use it so a planted state file cannot steer `del` or `list`.
   */
  private readable(): boolean {
    try {
      lstatSync(this.path);
    } catch {
      return false;
    }
    this.checkDir(this.path);
    return true;
  }

  /** Device `id`'s state, or undefined if there is none (or it is not a regular file of ours). */
  readState(id: number): DeviceState | undefined {
    if (!this.readable()) return undefined;
    let fd: number;
    try {
      fd = openSync(this.statePath(id), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    } catch {
      return undefined;
    }
    try {
      const st = fstatSync(fd);
      if (!st.isFile() || st.uid !== this.uid) return undefined;
      return JSON.parse(readFileSync(fd, 'utf8')) as DeviceState;
    } catch {
      return undefined;
    } finally {
      closeSync(fd);
    }
  }

  /** Writes `state` atomically (a new file, then rename), mode 0644 whatever the umask. */
  writeState(state: DeviceState): void {
    this.ensure();
    const final = this.statePath(state.devId);
    const tmp = join(this.path, `.ublkb${state.devId}.json.${process.pid}.tmp`);
    rmSync(tmp, { force: true }); // our own leftover from a crash, if any (rm does not follow links)
    const fd = openSync(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644);
    try {
      writeSync(fd, `${JSON.stringify(state, null, 2)}\n`);
      fsyncSync(fd);
    } catch (e) {
      closeSync(fd);
      rmSync(tmp, { force: true });
      throw e;
    }
    closeSync(fd);
    try {
      renameSync(tmp, final);
    } catch (e) {
      rmSync(tmp, { force: true });
      throw e;
    }
  }

  /**
   * Removes device `id`'s state, but only if it is the state of server `pid` (when given): a
   * state file is removed while its device still exists, so that no new device can have taken
   * the id yet, and never someone else's.
   */
  removeState(id: number, pid?: number): void {
    if (pid !== undefined) {
      const st = this.readState(id);
      if (!st || st.pid !== pid) return;
    }
    try {
      unlinkSync(this.statePath(id));
    } catch {
      // Already gone.
    }
  }

  /** Creates a new log file for a server: O_EXCL, never through a symlink, mode 0640. */
  createLog(): { fd: number; path: string } {
    this.ensure();
    for (let i = 0; ; i++) {
      const path = join(this.logDir, `server-${Date.now()}-${process.pid}${i ? `-${i}` : ''}.log`);
      try {
        return { fd: openSync(path, O_WRONLY | O_APPEND | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o640), path };
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST' || i > 100) throw e;
      }
    }
  }
}

/** /run/ublk for root; a user's own (unprivileged devices): $XDG_RUNTIME_DIR/ublk, else /tmp/ublk-UID. */
export function defaultRunDir(): string {
  const uid = process.geteuid?.() ?? 0;
  if (uid === 0) return '/run/ublk';
  return process.env.XDG_RUNTIME_DIR ? join(process.env.XDG_RUNTIME_DIR, 'ublk') : `/tmp/ublk-${uid}`;
}
