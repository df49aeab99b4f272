/**
 * The fault target on the host (no ublk needed): its handlers called directly
 * (test/helpers/async-harness.ts) over a real backing file. Injected errors fail exactly the
 * requests they name, with the errno asked for; latency delays; the write cache serves reads and
 * reaches the file only on FLUSH, FUA or close; a power cut drops or tears exactly the unflushed
 * blocks, then fails everything; a recorded trace replays to the same bytes.
 */
import t from 'tap';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { constants as osConstants, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import fault, { parseErrorRange, tornBlocks } from '../../src/targets/fault.js';
import { replayTrace, summarizeTrace } from '../../src/targets/trace.js';
import { UsageError } from '../../src/targets/options.js';
import { TargetError } from '../../src/ublk/target.js';
import { errorResult } from '../../src/ublk/async-target.js';
import { libc } from '../../src/libc/index.js';
import { openAsync } from '../helpers/async-harness.js';

const dir = mkdtempSync(join(tmpdir(), 'ublk-fault-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const B = 4096;
const ETIMEDOUT = osConstants.errno.ETIMEDOUT;
const K = 1024;
const M = 2 ** 20;
const openFds = () => readdirSync('/proc/self/fd').length;
let n = 0;

/** A backing file (zeros, or `content`) and its path. */
function backing(size = 64 * B, content?: Buffer): string {
  const f = join(dir, `disk${n++}.img`);
  writeFileSync(f, content ?? Buffer.alloc(size));
  return f;
}
const path = (name: string) => join(dir, `${name}-${n++}`);
const fill = (byte: number, len = B) => Buffer.alloc(len, byte);
const parse = (argv: string[]) => fault.parseArgs!(argv);

t.test('options: parsed into one object, every mistake named', (t) => {
  const o = parse(['-f', 'd.img', '--latency-ms', '5', '--latency-jitter-ms', '2', '--error-at', '1M', '--error-at', '8K:8K:write,64K:read',
    '--error-rate', '0.25', '--error-errno', 'enospc', '--power-cut-after-writes', '3', '--power-cut-mode', 'tear', '--seed', '7', '--record', 't.trc', '--cache-max', '1M']);
  t.same(o, {
    file: join(process.cwd(), 'd.img'), latencyMs: 5, latencyJitterMs: 2,
    errorAt: [{ offset: M, length: B, op: 'any' }, { offset: 8 * K, length: 8 * K, op: 'write' }, { offset: 64 * K, length: B, op: 'read' }],
    errorRate: 0.25, errorErrno: 'ENOSPC', powerCutFile: undefined, powerCutAfterWrites: 3, powerCutMode: 'tear', seed: 7,
    record: join(process.cwd(), 't.trc'), cacheMax: M,
  });
  const d = parse(['--file=d.img']);
  t.match(d, { latencyMs: 0, latencyJitterMs: 0, errorAt: [], errorRate: 0, errorErrno: 'EIO', powerCutMode: 'drop', cacheMax: 256 * M });
  t.ok(Number.isInteger(d.seed) && d.seed >= 0, 'a seed is chosen when none is given (and kept in the options)');
  t.same(parse(['-f', 'x', '--error-at=0:write']).errorAt, [{ offset: 0, length: B, op: 'write' }]);
  t.same(parseErrorRange('4K:1'), { offset: 4 * K, length: 1, op: 'any' });

  const bad: Array<[string[], RegExp]> = [
    [[], /fault needs a backing file: -f FILE/],
    [['-f', 'x', '--bogus'], /fault: unknown option --bogus/],
    [['-f', 'x', '--error-at'], /--error-at takes a value/],
    [['-f', 'x', '--error-at', 'lots'], /--error-at takes OFFSET\[:LENGTH\]\[:read\|write\|any\] .*got 'lots'/],
    [['-f', 'x', '--error-at', '1M:0'], /got '1M:0'/],
    [['-f', 'x', '--error-at', '1M:4K:both'], /got '1M:4K:both'/],
    [['-f', 'x', '--error-at', '1M:read:4K'], /got '1M:read:4K'/],
    [['-f', 'x', '--error-at', '1M,,2M'], /got ''/],
    [['-f', 'x', '--error-rate', '1.5'], /--error-rate takes a probability from 0 to 1 .*got '1.5'/],
    [['-f', 'x', '--error-rate', 'often'], /--error-rate takes a probability/],
    [['-f', 'x', '--error-errno', 'EBOGUS'], /--error-errno takes an errno name like EIO, ENOSPC or ETIMEDOUT, got 'EBOGUS'/],
    [['-f', 'x', '--latency-ms', '-1'], /--latency-ms takes a value|--latency-ms takes a number/],
    [['-f', 'x', '--power-cut-mode', 'tear'], /--power-cut-mode needs a power cut: --power-cut-file PATH or --power-cut-after-writes N/],
    [['-f', 'x', '--power-cut-file', 'p', '--power-cut-mode', 'melt'], /--power-cut-mode takes drop or tear, got 'melt'/],
    [['-f', 'x', '--power-cut-file', 'p', '--power-cut-after-writes', '2'], /exclude each other/],
    [['-f', 'x', '--power-cut-after-writes', '0'], /--power-cut-after-writes must be from 1/],
    [['-f', 'x', '--seed', '4294967296'], /--seed must be from 0 to 4294967295/],
    [['-f', 'x', '--cache-max', '100'], /--cache-max must be from 4096/],
    [['-f', 'x', '--seed', '1', '--seed', '2'], /--seed given twice/],
  ];
  for (const [argv, msg] of bad) {
    const err = t.throws(() => parse(argv), msg, argv.join(' ')) as Error;
    t.type(err, UsageError, `${argv.join(' ')} is a usage error`);
  }
  t.end();
});

t.test('prepare: the backing must be whole 4 KiB blocks; what would misfire is refused first', async (t) => {
  const before = openFds();
  t.throws(() => fault.prepare(parse(['-f', join(dir, 'missing.img')])), /fault: -f .*missing\.img does not exist/);
  const odd = backing(0, Buffer.alloc(B + 512));
  t.throws(() => fault.prepare(parse(['-f', odd])), /has 4608 bytes; .*a non-zero multiple of 4096 \(truncate -s it\)/);
  const f = backing(16 * B);
  const cut = path('cut');
  writeFileSync(cut, '');
  t.throws(() => fault.prepare(parse(['-f', f, '--power-cut-file', cut])), /the power-cut file .* exists already.*remove it first/);
  const notTrace = path('not-a-trace');
  writeFileSync(notTrace, 'hello world, long enough');
  const err = t.throws(() => fault.prepare(parse(['-f', f, '--record', notTrace]))) as Error;
  t.type(err, TargetError);
  t.match(err.message, /--record: .* exists and is not a trace: remove it or record to another file/);
  t.equal(openFds(), before, 'refusals leak no fd');
  const spec = await fault.prepare(parse(['-f', f]));
  t.match(spec, { sizeBytes: 16 * B, logicalBlockSize: B, volatileCache: true, fua: true, discard: { granularity: B } });
  t.ok(spec.discard!.maxBytes > 0 && spec.discard!.maxWriteZeroesBytes > 0);
  t.equal(openFds(), before, 'prepare keeps no fd (the queue opens the file)');
});

t.test('one queue only: open refuses queue 1, naming -q 1', async (t) => {
  const f = backing(16 * B);
  await t.rejects(openAsync(fault, ['-f', f], { qid: 1 }), /the fault layer serves one queue \(-q 1\)/);
  const h = await openAsync(fault, ['-f', f]);
  t.match(h.lines[0], /fault: serving .* seed \d+/);
  await h.close();
});

t.test('--error-at fails exactly the requests that overlap its range, for its ops, with its errno', async (t) => {
  const f = backing(64 * B, randomBytes(64 * B));
  const original = readFileSync(f);
  const h = await openAsync(fault, ['-f', f, '--error-at', '8K:8K:write', '--error-at', '64K:4K:read', '--error-at', '128K']);
  const EIO = -libc.EIO;
  t.equal(await h.request('write', 0, 8 * K, fill(1, 8 * K)), 8 * K, 'a write ending where the range begins succeeds');
  t.equal(await h.request('write', 4 * K, 8 * K, fill(2, 8 * K)), EIO, 'a write into the range fails');
  t.equal(await h.request('write', 12 * K, 4 * K, fill(3)), EIO, 'the range\'s last block fails');
  t.equal(await h.request('write', 16 * K, 4 * K, fill(4)), 4 * K, 'the block after it succeeds');
  t.equal(await h.request('zeroes', 0, 64 * K), EIO, 'WRITE_ZEROES over it fails (a write)');
  t.equal(await h.request('discard', 8 * K, 4 * K), EIO, 'so does DISCARD');
  t.equal(await h.request('read', 8 * K, 8 * K), 8 * K, 'a read of a write-only range succeeds');
  t.equal(await h.request('read', 64 * K, 4 * K), EIO, 'a read of the read range fails');
  t.equal(await h.request('read', 60 * K, 8 * K), EIO, 'so does one that only overlaps it');
  t.equal(await h.request('write', 64 * K, 4 * K, fill(5)), 4 * K, 'a write there succeeds');
  t.equal(await h.request('read', 128 * K, 4 * K), EIO, 'the default op is any: reads');
  t.equal(await h.request('write', 128 * K, 4 * K, fill(6)), EIO, 'and writes');
  t.equal(await h.request('read', 132 * K, 4 * K), 4 * K, 'the default length is 4K');
  t.equal(await h.request('flush'), 0, 'FLUSH has no range: it is never hit');
  const err = t.throws(() => h.handlers.read(64 * K, Buffer.alloc(B))) as Error & { code: string };
  t.equal(err.code, 'EIO');
  t.equal(errorResult(err), -libc.EIO);
  t.match(err.message, /injected EIO for READ of 4096 bytes at 65536/);
  t.equal(h.counter('injected_errors'), 9);
  // The failed writes changed nothing: the cache has blocks 0-1, 4 and 16 only.
  const expect = Buffer.from(original);
  fill(1, 8 * K).copy(expect, 0);
  fill(4).copy(expect, 16 * K);
  fill(5).copy(expect, 64 * K);
  t.same(await h.read(0, 60 * K), expect.subarray(0, 60 * K), 'only the successful writes are seen');
  await h.close();
  t.same(readFileSync(f), expect, 'and only they reach the file');

  const g = await openAsync(fault, ['-f', backing(16 * B), '--error-at', '0:1', '--error-errno', 'ENOSPC']);
  t.equal(await g.request('write', 0, B, fill(7)), -libc.ENOSPC, '--error-errno ENOSPC');
  const e2 = t.throws(() => g.handlers.write(0, fill(7), false)) as Error & { code: string };
  t.equal(e2.code, 'ENOSPC');
  t.equal(await g.request('write', B, B, fill(7)), B, 'a one-byte range hits only the block holding it');
  await g.close();
});

t.test('--error-rate fails that share of requests, FLUSH included, the same way for the same seed', async (t) => {
  const all = await openAsync(fault, ['-f', backing(16 * B), '--error-rate', '1', '--error-errno', 'ETIMEDOUT']);
  t.equal(await all.request('read', 0, B), -ETIMEDOUT);
  t.equal(await all.request('flush'), -ETIMEDOUT);
  t.equal(await all.request('zeroes', 0, B), -ETIMEDOUT);
  await all.close();
  const none = await openAsync(fault, ['-f', backing(16 * B), '--error-rate', '0']);
  for (let i = 0; i < 50; i++) t.equal(await none.request('read', 0, B), B);
  await none.close();
  const pattern = async (seed: number) => {
    const h = await openAsync(fault, ['-f', backing(16 * B), '--error-rate', '0.5', '--seed', String(seed)]);
    const out: number[] = [];
    for (let i = 0; i < 200; i++) out.push(await h.request('read', (i % 16) * B, B));
    await h.close();
    return out;
  };
  const a = await pattern(11);
  const failed = a.filter((r) => r === -libc.EIO).length;
  t.ok(failed > 60 && failed < 140, `about half of 200 fail (${failed})`);
  t.ok(a.every((r) => r === B || r === -libc.EIO), 'the others succeed');
  t.same(await pattern(11), a, 'the same seed fails the same requests');
  t.notSame(await pattern(12), a, 'another seed, others');
});

t.test('latency delays every request; without it the answer is immediate', async (t) => {
  const f = backing(16 * B);
  const fast = await openAsync(fault, ['-f', f]);
  t.equal(fast.handlers.read(0, Buffer.alloc(B)), undefined, 'no latency: answered at once (no Promise)');
  await fast.close();
  const slow = await openAsync(fault, ['-f', f, '--latency-ms', '40']);
  for (const op of ['read', 'write', 'flush'] as const) {
    const t0 = performance.now();
    const r = await slow.request(op, 0, B, op === 'write' ? fill(9) : undefined);
    const took = performance.now() - t0;
    t.equal(r, op === 'flush' ? 0 : B);
    t.ok(took >= 39, `${op} took ${took.toFixed(1)} ms, at least the 40 ms asked`);
  }
  t.ok(slow.handlers.read(0, Buffer.alloc(B)) instanceof Promise, 'with latency: a Promise');
  await slow.close();
  const jitter = await openAsync(fault, ['-f', f, '--latency-jitter-ms', '30', '--seed', '3']);
  const t0 = performance.now();
  const rs = await Promise.all(Array.from({ length: 20 }, (_, i) => jitter.request('read', (i % 16) * B, B)));
  t.same(rs, new Array(20).fill(B));
  t.ok(performance.now() - t0 > 5, 'jitter delays some requests');
  await jitter.close();
});

t.test('the write cache: reads see unflushed writes, the file sees them only on FLUSH (FUA at once), in write order', async (t) => {
  const f = backing(32 * B);
  const h = await openAsync(fault, ['-f', f]);
  await h.write(0, fill(0xa1, 2 * B));
  await h.write(B, fill(0xa2));
  t.same(await h.read(0, 2 * B), Buffer.concat([fill(0xa1), fill(0xa2)]), 'read your own writes, the last one wins');
  t.same(readFileSync(f).subarray(0, 2 * B), Buffer.alloc(2 * B), 'nothing in the file yet');
  await h.write(5 * B, fill(0xf5), true);
  t.same(readFileSync(f).subarray(5 * B, 6 * B), fill(0xf5), 'a FUA write is in the file at once');
  await h.write(6 * B, fill(0xc6));
  await h.write(6 * B, fill(0xf6), true);
  await h.flush();
  const file = readFileSync(f);
  t.same(file.subarray(0, 2 * B), Buffer.concat([fill(0xa1), fill(0xa2)]), 'FLUSH wrote the cache');
  t.same(file.subarray(6 * B, 7 * B), fill(0xf6), 'the older cached block did not overwrite the later FUA write');
  t.equal(h.counter('flushes'), 1);
  t.equal(h.counter('fua_writes'), 2);
  await h.writeZeroes(0, B);
  await h.discard(B, B);
  t.same(await h.read(0, 2 * B), Buffer.alloc(2 * B), 'zeroes and discards read as zeros from the cache');
  t.same(readFileSync(f).subarray(0, B), fill(0xa1), 'but are not in the file');
  await h.write(9 * B, fill(0x99));
  await h.close();
  const end = readFileSync(f);
  t.same(end.subarray(0, 2 * B), Buffer.alloc(2 * B), 'close without a power cut writes the cache');
  t.same(end.subarray(9 * B, 10 * B), fill(0x99));
});

t.test('--cache-max: past it the oldest blocks are written back', async (t) => {
  const f = backing(32 * B);
  const h = await openAsync(fault, ['-f', f, '--cache-max', '8K', '--power-cut-after-writes', '4']);
  await h.write(0, fill(1));
  await h.write(B, fill(2));
  await h.write(2 * B, fill(3));
  t.same(readFileSync(f).subarray(0, B), fill(1), 'the oldest block went to the file');
  t.equal(h.counter('written_back_blocks'), 1);
  await h.write(3 * B, fill(4));
  t.same(readFileSync(f).subarray(0, 4 * B), Buffer.concat([fill(1), fill(2), Buffer.alloc(2 * B)]), 'the cut lost only what was still cached');
  await h.close();
});

t.test('power cut (drop): exactly the unflushed writes are lost; flushed and FUA ones stay; then everything fails', async (t) => {
  const f = backing(32 * B);
  const cut = path('cut');
  const h = await openAsync(fault, ['-f', f, '--power-cut-file', cut]);
  await h.write(0, fill(0x0a)); // flushed
  await h.flush();
  await h.write(B, fill(0x1b), true); // FUA
  await h.write(2 * B, fill(0x2c)); // unflushed
  await h.write(0, fill(0x0d)); // unflushed overwrite of a flushed block
  await h.writeZeroes(3 * B, B); // unflushed
  t.same(await h.read(0, 3 * B), Buffer.concat([fill(0x0d), fill(0x1b), fill(0x2c)]), 'before the cut: the cache is read');
  writeFileSync(cut, '');
  t.equal(await h.request('read', 0, B), -libc.EIO, 'the first request after the file appears fails');
  t.match(h.lines.join('\n'), /power cut \(.*cut-\d+ appeared\), mode drop: 3 unflushed writes lost \(3 blocks\); every request fails with EIO from now on/);
  for (const [op, off, len] of [['read', 0, B], ['write', 0, B], ['fua', 0, B], ['flush', 0, 0], ['zeroes', 0, B], ['discard', 0, B]] as const) {
    t.equal(await h.request(op, off, len, op === 'write' || op === 'fua' ? fill(0xee) : undefined), -libc.EIO, `${op} after the cut: EIO`);
  }
  t.equal(h.counter('lost_blocks'), 3);
  await h.close();
  const file = readFileSync(f);
  t.same(file.subarray(0, B), fill(0x0a), 'the flushed write stayed, its unflushed overwrite was lost');
  t.same(file.subarray(B, 2 * B), fill(0x1b), 'the FUA write stayed');
  t.same(file.subarray(2 * B, 3 * B), Buffer.alloc(B), 'the unflushed write was lost');
  t.same(file.subarray(3 * B), Buffer.alloc(29 * B), 'nothing else was written, not even by close');
});

t.test('power cut by timer: the file is noticed within ~100 ms without any request', async (t) => {
  const f = backing(16 * B);
  const cut = path('cut');
  const h = await openAsync(fault, ['-f', f, '--power-cut-file', cut]);
  await h.write(0, fill(1));
  writeFileSync(cut, '');
  await new Promise((r) => setTimeout(r, 300));
  t.match(h.lines.join('\n'), /mode drop: 1 unflushed writes lost \(1 blocks\)/, 'the timer cut the power');
  await h.close();
  t.same(readFileSync(f).subarray(0, B), Buffer.alloc(B));
});

t.test('--power-cut-after-writes N: the N-th write completes, then the disk is gone', async (t) => {
  const f = backing(16 * B);
  const h = await openAsync(fault, ['-f', f, '--power-cut-after-writes', '3']);
  t.equal(await h.request('write', 0, B, fill(1)), B);
  t.equal(await h.request('flush'), 0);
  t.equal(await h.request('write', B, B, fill(2)), B);
  t.equal(await h.request('write', 2 * B, B, fill(3)), B, 'the third write is acknowledged');
  t.match(h.lines.join('\n'), /power cut \(after write 3\), mode drop: 2 unflushed writes lost \(2 blocks\)/);
  t.equal(await h.request('read', 0, B), -libc.EIO, 'and then nothing works');
  await h.close();
  t.same(readFileSync(f).subarray(0, 3 * B), Buffer.concat([fill(1), Buffer.alloc(2 * B)]));
});

t.test('power cut (tear): a seeded subset of the unflushed blocks reaches the file, the same one for the same seed', async (t) => {
  const blocks = 24;
  const run = async (seed: number) => {
    const f = backing(32 * B);
    const h = await openAsync(fault, ['-f', f, '--power-cut-after-writes', String(blocks + 1), '--power-cut-mode', 'tear', '--seed', String(seed)]);
    await h.write(31 * B, fill(0xff));
    await h.flush();
    // Blocks written in a scrambled order: the cache's order is the order of writes.
    const order = Array.from({ length: blocks }, (_, i) => (i * 7) % blocks);
    for (const i of order) await h.write(i * B, fill(i + 1));
    t.match(h.lines.join('\n'), new RegExp(`mode tear, seed ${seed}: 24 unflushed writes torn: \\d+ of their 24 blocks reached`));
    await h.close();
    const file = readFileSync(f);
    const written: number[] = [];
    for (let i = 0; i < blocks; i++) {
      const got = file.subarray(i * B, (i + 1) * B);
      if (got.equals(fill(i + 1))) written.push(i);
      else t.same(got, Buffer.alloc(B), `block ${i} is either all new or all old`);
    }
    t.same(file.subarray(31 * B), fill(0xff), 'the flushed block stayed');
    const expected = tornBlocks(order, seed).sort((a, b) => a - b);
    t.same(written, expected, `seed ${seed}: the blocks tornBlocks names`);
    return written;
  };
  const a = await run(42);
  t.ok(a.length > 0 && a.length < blocks, `a proper subset (${a.length} of ${blocks})`);
  t.same(await run(42), a, 'the same seed tears the same way');
  t.notSame(await run(43), a, 'another seed, another subset');
});

t.test('--record and replay: the trace reproduces the file byte for byte, and --until-flush stops where asked', async (t) => {
  const initial = Buffer.alloc(64 * B);
  const f = backing(64 * B, initial);
  const trace = path('trace');
  const h = await openAsync(fault, ['-f', f, '--record', trace, '--latency-jitter-ms', '5', '--seed', '5']);
  // Overlapping writes in flight at once: they complete out of order, and the trace has that order.
  const rnd = randomBytes(64 * B);
  const flushStates: Buffer[] = [];
  for (let round = 0; round < 3; round++) {
    const ps: Array<Promise<void>> = [];
    for (let i = 0; i < 12; i++) {
      const blk = (round * 13 + i * 5) % 60;
      const len = ((i % 3) + 1) * B;
      ps.push(h.write(blk * B, rnd.subarray(blk * B, blk * B + len).map((x) => x ^ (round + i)) as Buffer, i % 4 === 0));
    }
    ps.push(h.writeZeroes(((round * 7) % 60) * B, 2 * B));
    ps.push(h.discard(((round * 11) % 60) * B, B));
    await Promise.all(ps);
    await h.flush();
    flushStates.push(await h.read(0, 64 * B));
  }
  await h.write(0, fill(0x5a), false); // after the last flush: in the trace, cached until close
  const final = await h.read(0, 64 * B);
  await h.close();
  t.same(readFileSync(f), final, 'close wrote the cache');

  const s = summarizeTrace(trace);
  t.match(s, { deviceSize: 64 * B, writes: 37, fuaWrites: 9, zeroes: 3, discards: 3, flushes: 3, records: 46, truncatedBytes: 0 });
  const to = path('replayed');
  writeFileSync(to, initial);
  const r = replayTrace(trace, to);
  t.same(readFileSync(to), final, 'replaying the whole trace gives the file byte for byte');
  t.match(r, { records: 46, flushes: 3, traceFlushes: 3 });
  for (const k of [1, 2, 3]) {
    const part = path(`until${k}`);
    writeFileSync(part, initial);
    const rk = replayTrace(trace, part, { untilFlush: k });
    t.equal(rk.flushes, k);
    t.same(readFileSync(part), flushStates[k - 1], `--until-flush ${k}: the device as it was at flush ${k}`);
  }
  const zero = path('until0');
  writeFileSync(zero, initial);
  t.equal(replayTrace(trace, zero, { untilFlush: 0 }).records, 0, '--until-flush 0 applies nothing');
  t.same(readFileSync(zero), initial);
  t.throws(() => replayTrace(trace, zero, { untilFlush: 4 }), /--until-flush 4: .* has 3 FLUSH records/);
});

t.test('a power cut after flush N leaves the file a replay --until-flush N makes', async (t) => {
  const f = backing(32 * B);
  const trace = path('trace');
  const h = await openAsync(fault, ['-f', f, '--record', trace, '--power-cut-after-writes', '7', '--seed', '9']);
  for (let i = 0; i < 7; i++) {
    await h.write(((i * 3) % 32) * B, fill(0x10 + i, 2 * B));
    if (i === 2 || i === 4) await h.flush();
  }
  t.equal(await h.request('read', 0, B), -libc.EIO);
  await h.close();
  const to = path('replayed');
  writeFileSync(to, Buffer.alloc(32 * B));
  replayTrace(trace, to, { untilFlush: 2 });
  t.same(readFileSync(f), readFileSync(to), 'the cut left exactly the state at the last flush');
  t.equal(summarizeTrace(trace).writes, 7, 'the trace has every acknowledged write, lost ones too');
});
