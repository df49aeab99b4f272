/**
 * `ublk trace -n ID [--count N] [--seconds S]`: follows the live trace of device ID's running
 * server: every SQE and CQE of its control ring and queue rings, decoded (src/uring/trace.ts,
 * src/ublk/trace.ts), one line each, on stdout.
 *
 * The reader creates a FIFO in the run directory (RunDir.tracePath); the server watches that
 * directory (inotify, serve.ts) and, seeing the FIFO, opens it and writes its trace there, first
 * a line that says it follows. The reader holds the FIFO open for reading and writing, so that
 * opening it never blocks either side; when the reader exits, the server's next write fails with
 * EPIPE and the trace stops. A reader too slow for the device loses lines (counted in the trace):
 * the server never waits for it. One reader at a time: a second one takes the trace over.
 */
import { lstatSync, openSync, renameSync, rmSync } from 'node:fs';
import { Socket } from 'node:net';
import { createInterface } from 'node:readline';
import { UblkError } from '../ublk/control.js';
import { pidAlive } from '../ublk/server.js';
import { parseOptions, UsageError } from '../targets/options.js';
import { libc, sys } from '../libc/index.js';
import { RunDir } from './run-dir.js';

/** How long the server has to pick up the FIFO and say so. */
const FOLLOW_TIMEOUT_MS = 5000;

export async function trace(argv: string[]): Promise<number> {
  const { values } = parseOptions('trace', argv, [
    { key: 'devId', names: ['-n', '--number'], kind: 'count', min: 0, max: 0x7fffffff },
    { key: 'count', names: ['--count'], kind: 'count', min: 1, max: Number.MAX_SAFE_INTEGER },
    { key: 'seconds', names: ['--seconds'], kind: 'count', min: 1, max: 86_400 },
  ]);
  const id = values.devId as number | undefined;
  if (id === undefined) throw new UsageError('trace needs -n ID');
  const runDir = new RunDir();
  const st = runDir.readState(id);
  if (!st || !pidAlive(st.pid)) {
    throw new UblkError(`device ${id} has no running server started by \`ublk add\` (\`ublk list\` shows what there is)`);
  }
  const path = runDir.tracePath(id);
  // The FIFO is made and opened under a name of its own, then renamed into place: the server
  // opens it for writing (O_NONBLOCK, which fails with ENXIO while no reader has it open) as
  // soon as the name appears, so the name must only appear once we hold the FIFO open. Made
  // under the final name, the server could come first, fail, and never look again.
  const fresh = `${path}.${process.pid}.new`;
  rmSync(fresh, { force: true });
  sys.mkfifo(fresh, 0o600);
  let fd: number;
  try {
    // O_RDWR: a FIFO opened for reading alone blocks until a writer comes (fifo(7)). Read as a
    // pipe on the event loop (libuv polls it), not by a blocking read in the thread pool, which
    // nothing could interrupt when the reader wants to end.
    fd = openSync(fresh, libc.O_RDWR | libc.O_NONBLOCK | libc.O_CLOEXEC | libc.O_NOFOLLOW);
    // Replaces the FIFO a killed reader left behind, or that of a reader still following, which
    // stops getting lines when the server moves to ours (one reader at a time).
    renameSync(fresh, path);
  } catch (e) {
    rmSync(fresh, { force: true });
    throw e;
  }
  const ino = lstatSync(path).ino;
  const stream = new Socket({ fd, readable: true, writable: false });
  const lines = createInterface({ input: stream, crlfDelay: Infinity });
  const limit = values.count as number | undefined;
  const seconds = values.seconds as number | undefined;
  let n = 0;
  let following = false;
  let status = 0;
  let ended = false;
  const done = new Promise<void>((resolve) => {
    const finish = () => {
      ended = true;
      resolve();
    };
    const noAnswer = setTimeout(() => {
      if (!following) {
        process.stderr.write(`ublk: the server of device ${id} (process ${st.pid}) did not answer within ${FOLLOW_TIMEOUT_MS / 1000} s: it may predate \`ublk trace\` (\`ublk upgrade -n ${id}\` replaces it)\n`);
        status = 1;
        finish();
      }
    }, FOLLOW_TIMEOUT_MS);
    if (seconds !== undefined) setTimeout(finish, seconds * 1000).unref();
    process.once('SIGINT', finish);
    process.once('SIGTERM', finish);
    lines.on('line', (line) => {
      if (ended) return; // the rest of a piece that came with the last line wanted
      if (!following) {
        following = true;
        clearTimeout(noAnswer);
      }
      process.stdout.write(`${line}\n`);
      if (limit !== undefined && ++n >= limit) finish();
    });
  });
  await done;
  lines.close();
  stream.destroy(); // closes the fd
  // Only our own FIFO: a second reader may have made a new one since.
  try {
    if (lstatSync(path).ino === ino) rmSync(path, { force: true });
  } catch { /* gone already */ }
  return status;
}
