/**
 * `ublk replay TRACE --to PATH [--until-flush N]`: applies a write trace (recorded by
 * `ublk add -t fault --record TRACE`, format in src/targets/trace.ts) to a file or block device,
 * in the order the device completed the writes: WRITE data, WRITE_ZEROES and DISCARD as zeros.
 * `--until-flush N` stops after the N-th FLUSH record, which reproduces what the device had made
 * durable at that point. PATH must be at least the trace's device size (a regular file is
 * created or extended). Prints one line: what was applied.
 */
import { parseOptions, UsageError } from '../targets/options.js';
import { replayLine, replayTrace, TraceError, type ReplaySummary } from '../targets/trace.js';

export function replay(argv: string[]): number {
  const { values, positional } = parseOptions('replay', argv, [
    { key: 'to', names: ['--to'], kind: 'string' },
    { key: 'untilFlush', names: ['--until-flush'], kind: 'count', min: 0 },
  ], { positional: 1 });
  const trace = positional[0];
  if (trace === undefined) throw new UsageError('replay needs a trace: ublk replay TRACE --to PATH (traces come from ublk add -t fault --record TRACE)');
  const to = values.to as string | undefined;
  if (to === undefined) throw new UsageError('replay needs --to PATH: the file or block device to apply the trace to');
  let summary: ReplaySummary;
  try {
    summary = replayTrace(trace, to, { untilFlush: values.untilFlush as number | undefined });
  } catch (e) {
    // A failed read or write (ENOSPC, EIO) is the command's error, not a crash.
    if (!(e instanceof TraceError) && typeof (e as NodeJS.ErrnoException).code === 'string') throw new TraceError(`replay: ${(e as Error).message}`);
    throw e;
  }
  process.stdout.write(`${replayLine(trace, to, summary)}\n`);
  return 0;
}
