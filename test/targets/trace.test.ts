/**
 * Write traces (src/targets/trace.ts) and `ublk replay`: the format byte for byte, reading back
 * what was written, continuing a trace, an incomplete last record, damaged and foreign files,
 * and the replay command's results, summary line and usage errors (through the CLI's main()).
 */
import t from 'tap';
import { appendFileSync, mkdtempSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  TraceReader, TraceWriter, TraceError, replayTrace, summarizeTrace, traceFileProblem,
  TRACE_HEADER_BYTES, TRACE_RECORD_BYTES, TRACE_WRITE, TRACE_FLUSH, TRACE_DISCARD, TRACE_WRITE_ZEROES,
} from '../../src/targets/trace.js';
import { main } from '../../src/cli/main.js';

const dir = mkdtempSync(join(tmpdir(), 'ublk-trace-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const B = 4096;
let n = 0;
const path = (name: string) => join(dir, `${name}-${n++}`);

function records(file: string) {
  const r = new TraceReader(file);
  try {
    const out = [];
    // Copied as they come: the reader reuses its data buffer.
    for (const x of r.records()) out.push({ ...x, data: x.data ? Buffer.from(x.data) : undefined });
    return out;
  } finally {
    r.close();
  }
}

/** Runs the CLI in this process; its exit status and what it printed. */
async function cli(...argv: string[]): Promise<{ status: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  const ow = process.stdout.write.bind(process.stdout);
  const ew = process.stderr.write.bind(process.stderr);
  process.stdout.write = ((s: string) => { stdout += s; return true; }) as typeof process.stdout.write;
  process.stderr.write = ((s: string) => { stderr += s; return true; }) as typeof process.stderr.write;
  try {
    const status = await main(argv);
    return { status, stdout, stderr };
  } finally {
    process.stdout.write = ow;
    process.stderr.write = ew;
  }
}

t.test('the format: header, then op/offset/length records with a WRITE\'s data', (t) => {
  const f = path('fmt');
  const w = TraceWriter.open(f, 1 << 20);
  w.write(8192, Buffer.from('abcd'), false);
  w.write(4096, Buffer.from('xy'), true);
  w.flush();
  w.writeZeroes(12288, 8192);
  w.discard(0, 4096);
  w.close();
  t.equal(w.records, 5);
  const b = readFileSync(f);
  t.equal(b.toString('latin1', 0, 8), 'UBLKTRC1');
  t.equal(Number(b.readBigUInt64LE(8)), 1 << 20, 'the device size');
  let p = TRACE_HEADER_BYTES;
  t.equal(b[p], 1, 'WRITE');
  t.equal(Number(b.readBigUInt64LE(p + 1)), 8192);
  t.equal(b.readUInt32LE(p + 9), 4);
  t.equal(b.toString('latin1', p + 13, p + 17), 'abcd', 'the data follows the record');
  p += TRACE_RECORD_BYTES + 4;
  t.equal(b[p], 0x81, 'a FUA WRITE has bit 0x80');
  p += TRACE_RECORD_BYTES + 2;
  t.same([b[p], Number(b.readBigUInt64LE(p + 1)), b.readUInt32LE(p + 9)], [2, 0, 0], 'FLUSH');
  p += TRACE_RECORD_BYTES;
  t.same([b[p], Number(b.readBigUInt64LE(p + 1)), b.readUInt32LE(p + 9)], [5, 12288, 8192], 'WRITE_ZEROES, no data');
  p += TRACE_RECORD_BYTES;
  t.same([b[p], b.readUInt32LE(p + 9)], [3, 4096], 'DISCARD');
  p += TRACE_RECORD_BYTES;
  t.equal(b.length, p, 'nothing else');

  const rs = records(f);
  t.same(rs.map((r) => [r.op, r.fua, r.offset, r.length]), [
    [TRACE_WRITE, false, 8192, 4], [TRACE_WRITE, true, 4096, 2], [TRACE_FLUSH, false, 0, 0],
    [TRACE_WRITE_ZEROES, false, 12288, 8192], [TRACE_DISCARD, false, 0, 4096],
  ]);
  t.same(rs[0]!.data, Buffer.from('abcd'));
  t.same(rs[1]!.data, Buffer.from('xy'));
  t.equal(rs[2]!.data, undefined);
  t.match(summarizeTrace(f), { deviceSize: 1 << 20, records: 5, writes: 2, fuaWrites: 1, flushes: 1, zeroes: 1, discards: 1, bytes: 4 + 2 + 8192 + 4096, truncatedBytes: 0 });
  t.end();
});

t.test('a trace is continued by the next writer, and an incomplete last record is ignored, then cut off', (t) => {
  const f = path('cont');
  const w1 = TraceWriter.open(f, 64 * B);
  w1.write(0, Buffer.alloc(B, 1));
  w1.flush();
  w1.close();
  const whole = statSync(f).size;
  // A server killed in the middle of a record: half a header's worth of a WRITE.
  appendFileSync(f, Buffer.from([1, 0, 0, 0]));
  t.equal(summarizeTrace(f).truncatedBytes, 4, 'the reader names the incomplete tail');
  t.equal(summarizeTrace(f).records, 2, 'and reads the whole records');
  // A WRITE whose header is whole but whose data is not.
  const r2 = path('cont2');
  writeFileSync(r2, readFileSync(f).subarray(0, whole));
  const w = TraceWriter.open(r2, 64 * B);
  w.write(B, Buffer.alloc(B, 2));
  w.close();
  truncateSync(r2, statSync(r2).size - 100);
  t.match(summarizeTrace(r2), { records: 2, truncatedBytes: TRACE_RECORD_BYTES + B - 100 });

  const w2 = TraceWriter.open(f, 64 * B);
  t.equal(statSync(f).size, whole, 'the next writer cut the incomplete record off');
  w2.write(2 * B, Buffer.alloc(B, 3));
  w2.close();
  t.same(records(f).map((r) => [r.op, r.offset]), [[TRACE_WRITE, 0], [TRACE_FLUSH, 0], [TRACE_WRITE, 2 * B]], 'and went on after the last whole one');
  t.end();
});

t.test('foreign and damaged files are refused by name', (t) => {
  const junk = path('junk');
  writeFileSync(junk, 'this is not a trace file');
  t.throws(() => new TraceReader(junk), /is not a trace: it does not begin with UBLKTRC1/);
  t.throws(() => new TraceReader(join(dir, 'nope')), /the trace .*nope does not exist/);
  t.throws(() => TraceWriter.open(junk, 4096), /exists and is not a trace: remove it or record to another file/);
  const f = path('size');
  TraceWriter.open(f, 64 * B).close();
  t.match(traceFileProblem(f, 32 * B), /is the trace of a 262144-byte device, not of this 131072-byte one/);
  t.equal(traceFileProblem(f, 64 * B), undefined, 'the same size may be continued');
  t.equal(traceFileProblem(join(dir, 'absent'), 64 * B), undefined, 'a missing file may be created');
  t.match(traceFileProblem(dir, 64 * B), /is not a regular file/);
  const empty = path('empty');
  writeFileSync(empty, '');
  t.equal(traceFileProblem(empty, B), undefined, 'an empty file gets a header');

  const bad = path('badop');
  const w = TraceWriter.open(bad, 64 * B);
  w.write(0, Buffer.alloc(8));
  w.close();
  const b = readFileSync(bad);
  b[TRACE_HEADER_BYTES] = 9;
  writeFileSync(bad, b);
  t.throws(() => summarizeTrace(bad), /the record at byte 16 has op 9, which no trace has: the file is damaged/);
  b[TRACE_HEADER_BYTES] = 1;
  b.writeBigUInt64LE(BigInt(64 * B), TRACE_HEADER_BYTES + 1);
  writeFileSync(bad, b);
  const err = t.throws(() => summarizeTrace(bad)) as Error;
  t.type(err, TraceError);
  t.match(err.message, /lies beyond the 262144-byte device/);
  t.end();
});

t.test('replayTrace: writes, zeroes and discards in order; a small file is extended', (t) => {
  const f = path('apply');
  const w = TraceWriter.open(f, 16 * B);
  const a = randomBytes(3 * B);
  w.write(B, a);
  w.write(2 * B, Buffer.alloc(B, 0x22)); // overwrites a's middle block
  w.flush();
  w.writeZeroes(3 * B, B); // a's last block
  w.discard(0, B);
  w.write(15 * B, Buffer.alloc(B, 0xff));
  w.close();
  const to = path('to');
  writeFileSync(to, Buffer.alloc(2 * B, 0x77));
  const s = replayTrace(f, to);
  const got = readFileSync(to);
  t.equal(got.length, 16 * B, 'extended to the device size');
  const expect = Buffer.alloc(16 * B);
  a.copy(expect, B);
  expect.fill(0x22, 2 * B, 3 * B);
  expect.fill(0, 3 * B, 4 * B);
  expect.fill(0, 0, B);
  expect.fill(0xff, 15 * B);
  t.same(got, expect);
  t.match(s, { records: 6, writes: 3, zeroes: 1, discards: 1, flushes: 1, bytes: 3 * B + B + B + B + B, traceFlushes: 1 });
  const missing = path('created');
  replayTrace(f, missing, { untilFlush: 1 });
  const part = Buffer.alloc(16 * B);
  a.copy(part, B);
  part.fill(0x22, 2 * B, 3 * B);
  t.same(readFileSync(missing), part, 'a missing file is created; --until-flush 1 stops at the flush');
  t.end();
});

t.test('ublk replay: the summary line, --until-flush, and usage errors', async (t) => {
  const f = path('cli');
  const w = TraceWriter.open(f, 8 * B);
  w.write(0, Buffer.alloc(B, 1));
  w.flush();
  w.write(B, Buffer.alloc(2 * B, 2), true);
  w.flush();
  w.writeZeroes(0, B);
  w.close();
  const to = path('cli-to');
  let r = await cli('replay', f, '--to', to);
  t.equal(r.status, 0, r.stderr);
  t.equal(r.stdout, `replayed 5 records of ${f} onto ${to}: 2 writes (1 FUA), 1 write-zeroes, 0 discards, 2 flushes; ${4 * B} bytes written\n`);
  const all = readFileSync(to);
  t.same(all.subarray(0, 3 * B), Buffer.concat([Buffer.alloc(B), Buffer.alloc(2 * B, 2)]));
  r = await cli('replay', f, '--to', to, '--until-flush', '1');
  t.equal(r.status, 0);
  t.match(r.stdout, /^replayed 2 records .* 1 flushes; 4096 bytes written; stopped after flush 1 of 2\n$/);
  t.same(readFileSync(to).subarray(0, B), Buffer.alloc(B, 1), 'block 0 as it was at flush 1');

  const usage: Array<[string[], RegExp]> = [
    [['replay'], /^ublk: replay needs a trace: ublk replay TRACE --to PATH/],
    [['replay', f], /^ublk: replay needs --to PATH/],
    [['replay', f, '--to'], /^ublk: replay: --to takes a value/],
    [['replay', f, '--to', to, '--until-flush', 'x'], /--until-flush takes a number, got 'x'/],
    [['replay', f, 'g', '--to', to], /replay: unexpected argument 'g'/],
    [['replay', f, '--to', to, '--fast'], /replay: unknown option --fast/],
  ];
  for (const [argv, msg] of usage) {
    const u = await cli(...argv);
    t.equal(u.status, 2, `${argv.join(' ')}: exit 2`);
    t.match(u.stderr, msg);
    t.equal(u.stderr.split('\n').length, 2, 'one line');
  }
  const before = readFileSync(to);
  r = await cli('replay', f, '--to', to, '--until-flush', '3');
  t.equal(r.status, 1);
  t.match(r.stderr, /^ublk: --until-flush 3: .* has 2 FLUSH records\n$/);
  t.same(readFileSync(to), before, 'nothing was written');
  r = await cli('replay', join(dir, 'none'), '--to', to);
  t.equal(r.status, 1);
  t.match(r.stderr, /the trace .*none does not exist/);
  r = await cli('replay', f, '--to', dir);
  t.equal(r.status, 1);
  t.match(r.stderr, /is a directory/);
  const h = await cli('--help');
  t.match(h.stdout, /replay TRACE --to PATH \[--until-flush N\]/);
});
