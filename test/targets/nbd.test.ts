/**
 * The nbd target on the host, without ublk: the protocol pieces (handshake steps, the reply
 * parser fed a byte at a time, the request header), the constants the kernel's <linux/nbd.h>
 * shares with us, and the queue handler itself on a real io_uring (test/helpers/target-harness.ts)
 * talking to a real nbdkit over TCP and a Unix socket: every request type, data checked both
 * ways, a server killed and restarted with requests held, and a server that never comes back.
 * The same target runs under ublk_drv in test/vm/nbd.vm.ts.
 */
import t from 'tap';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import nbdTarget, { ipv6Bytes, shapeFor, type NbdOptions } from '../../src/targets/nbd.js';
import * as nbd from '../../src/targets/nbd-abi.js';
import { encodeRequest, handshake, NbdProtocolError, NbdRefusal, probeExport, ReplyReader, type ReplySink } from '../../src/targets/nbd-protocol.js';
import { TargetError } from '../../src/ublk/target.js';
import { UsageError } from '../../src/targets/options.js';
import { libc } from '../../src/uring/index.js';
import { sys } from '../../src/libc/index.js';
import {
  UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_FLUSH, UBLK_IO_OP_DISCARD, UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_F_FUA,
} from '../../src/ublk/abi.js';
import { TargetHarness } from '../helpers/target-harness.js';
import { checkAbi, debianHeaderSet, systemHeaderSet } from '../helpers/cabi.js';

const MiB = 2 ** 20;
const dir = mkdtempSync(join(tmpdir(), 'ublk-nbd-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

// --- The constants <linux/nbd.h> has too --------------------------------------------------------
t.test('constants shared with <linux/nbd.h>', async (t) => {
  const subset: Record<string, number> = {};
  for (const name of nbd.KERNEL_HEADER_NAMES) subset[name] = nbd[name];
  for (const [cName, ours] of Object.entries(nbd.KERNEL_HEADER_ALIASES)) subset[cName] = nbd[ours];
  await checkAbi(t, subset, {
    includes: ['<linux/nbd.h>'],
    headerSets: [systemHeaderSet({ mustHaveAll: true }), debianHeaderSet('sid', { mustHaveAll: true })],
  });
});

// --- Protocol pieces -----------------------------------------------------------------------------
function u64(n: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(n);
  return b;
}
function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}
function u16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
}
function optReply(option: number, type: number, payload = Buffer.alloc(0)): Buffer {
  return Buffer.concat([u64(nbd.NBD_REP_MAGIC), u32(option), u32(type), u32(payload.length), payload]);
}

/** Runs the handshake generator against a scripted server: `replies` are the bytes it sends, in order. */
function scripted(exportName: string, server: Buffer): { sent: Buffer[]; result?: unknown; error?: Error } {
  const steps = handshake(exportName);
  const sent: Buffer[] = [];
  let at = 0;
  let input: Buffer | undefined;
  try {
    for (;;) {
      const s = steps.next(input);
      if (s.done) return { sent, result: s.value };
      if ('send' in s.value) {
        sent.push(s.value.send);
        input = undefined;
      } else {
        if (at + s.value.recv > server.length) throw new Error(`the script ran out at byte ${at}`);
        input = server.subarray(at, at + s.value.recv);
        at += s.value.recv;
      }
    }
  } catch (e) {
    return { sent, error: e as Error };
  }
}

const greeting = (flags = nbd.NBD_FLAG_FIXED_NEWSTYLE | nbd.NBD_FLAG_NO_ZEROES) => Buffer.concat([u64(nbd.NBDMAGIC), u64(nbd.IHAVEOPT), u16(flags)]);

t.test('handshake: structured replies, GO with block sizes, unknown reply types ignored', async (t) => {
  const info = Buffer.concat([u16(nbd.NBD_INFO_EXPORT), u64(8n * BigInt(MiB)), u16(nbd.NBD_FLAG_HAS_FLAGS | nbd.NBD_FLAG_SEND_FLUSH)]);
  const bs = Buffer.concat([u16(nbd.NBD_INFO_BLOCK_SIZE), u32(512), u32(4096), u32(1 << 20)]);
  const r = scripted('disk', Buffer.concat([
    greeting(),
    optReply(nbd.NBD_OPT_STRUCTURED_REPLY, nbd.NBD_REP_ACK),
    optReply(nbd.NBD_OPT_GO, nbd.NBD_REP_INFO, info),
    optReply(nbd.NBD_OPT_GO, 99, Buffer.from('future')),
    optReply(nbd.NBD_OPT_GO, nbd.NBD_REP_INFO, bs),
    optReply(nbd.NBD_OPT_GO, nbd.NBD_REP_ACK),
  ]));
  t.equal(r.error, undefined);
  t.same(r.result, { size: 8 * MiB, flags: nbd.NBD_FLAG_HAS_FLAGS | nbd.NBD_FLAG_SEND_FLUSH, structured: true, minimumBlock: 512, preferredBlock: 4096, maximumPayload: 1 << 20, go: true });
  t.same(r.sent[0], u32(nbd.NBD_FLAG_C_FIXED_NEWSTYLE | nbd.NBD_FLAG_C_NO_ZEROES), 'client flags echo NO_ZEROES');
  t.same(r.sent[1], Buffer.concat([u64(nbd.IHAVEOPT), u32(nbd.NBD_OPT_STRUCTURED_REPLY), u32(0)]));
  t.same(r.sent[2], Buffer.concat([u64(nbd.IHAVEOPT), u32(nbd.NBD_OPT_GO), u32(4 + 4 + 2 + 2), u32(4), Buffer.from('disk'), u16(1), u16(nbd.NBD_INFO_BLOCK_SIZE)]), 'GO names the export and asks for block sizes');
});

t.test('handshake: a server without GO or structured replies gets EXPORT_NAME (with the 124 zeros)', async (t) => {
  const r = scripted('', Buffer.concat([
    greeting(nbd.NBD_FLAG_FIXED_NEWSTYLE),
    optReply(nbd.NBD_OPT_STRUCTURED_REPLY, nbd.NBD_REP_ERR_UNSUP),
    optReply(nbd.NBD_OPT_GO, nbd.NBD_REP_ERR_UNSUP),
    u64(BigInt(MiB)), u16(nbd.NBD_FLAG_HAS_FLAGS), Buffer.alloc(124),
  ]));
  t.equal(r.error, undefined);
  t.match(r.result, { size: MiB, structured: false, go: false, minimumBlock: 1, preferredBlock: 4096 });
  t.same(r.sent[0], u32(nbd.NBD_FLAG_C_FIXED_NEWSTYLE), 'no NO_ZEROES when the server did not offer it');
  t.same(r.sent[3], Buffer.concat([u64(nbd.IHAVEOPT), u32(nbd.NBD_OPT_EXPORT_NAME), u32(0)]));
});

t.test('handshake: refusals name the problem', async (t) => {
  const unknown = scripted('nope', Buffer.concat([
    greeting(), optReply(nbd.NBD_OPT_STRUCTURED_REPLY, nbd.NBD_REP_ACK),
    optReply(nbd.NBD_OPT_GO, nbd.NBD_REP_ERR_UNKNOWN, Buffer.from('no such export')),
  ]));
  t.ok(unknown.error instanceof NbdRefusal);
  t.match(unknown.error?.message, /no export named 'nope'.*no such export.*--export/);
  const tls = scripted('x', Buffer.concat([greeting(), optReply(nbd.NBD_OPT_STRUCTURED_REPLY, nbd.NBD_REP_ERR_TLS_REQD)]));
  t.ok(tls.error instanceof Error, 'TLS required at the first option is not an ACK');
  const old = scripted('', Buffer.concat([u64(nbd.NBDMAGIC), u64(nbd.NBD_OLDSTYLE_MAGIC), u16(0)]));
  t.match(old.error?.message, /oldstyle/);
  const http = scripted('', Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n'));
  t.match(http.error?.message, /not an NBD server/);
  const notFixed = scripted('', greeting(0));
  t.match(notFixed.error?.message, /fixed newstyle/);
  const wrongOpt = scripted('', Buffer.concat([greeting(), optReply(nbd.NBD_OPT_GO, nbd.NBD_REP_ACK)]));
  t.ok(wrongOpt.error instanceof NbdProtocolError, 'a reply to an option not asked');
});

t.test('request header: the 28 bytes of proto.md', async (t) => {
  const b = encodeRequest(Buffer.alloc(28), 0, nbd.NBD_CMD_WRITE, nbd.NBD_CMD_FLAG_FUA, 7, 2 ** 40 + 512, 4096);
  t.equal(b.toString('hex'), '25609513' + '0001' + '0001' + '0000000000000007' + '0000010000000200' + '00001000');
});

/** A sink that records what the reader reports, for requests we declare. */
function recorder(reqs: Record<number, { offset: number; readLength: number }>) {
  const events: string[] = [];
  const data = new Map<number, Buffer>();
  const sink: ReplySink = {
    lookup: (c) => reqs[c],
    data: (c, at, bytes) => {
      const b = data.get(c) ?? Buffer.alloc(reqs[c]!.readLength, 0xee);
      bytes.copy(b, at);
      data.set(c, b);
      events.push(`data ${c} ${at} ${bytes.length}`);
    },
    hole: (c, at, len) => {
      const b = data.get(c) ?? Buffer.alloc(reqs[c]!.readLength, 0xee);
      b.fill(0, at, at + len);
      data.set(c, b);
      events.push(`hole ${c} ${at} ${len}`);
    },
    error: (c, errno, msg) => events.push(`error ${c} ${errno} ${msg}`),
    done: (c) => events.push(`done ${c}`),
  };
  return { sink, events, data };
}

function simple(cookie: number, error = 0, payload = Buffer.alloc(0)): Buffer {
  return Buffer.concat([u32(nbd.NBD_SIMPLE_REPLY_MAGIC), u32(error), u64(BigInt(cookie)), payload]);
}
function chunk(cookie: number, type: number, flags: number, payload: Buffer): Buffer {
  return Buffer.concat([u32(nbd.NBD_STRUCTURED_REPLY_MAGIC), u16(flags), u16(type), u64(BigInt(cookie)), u32(payload.length), payload]);
}

t.test('reply reader: simple and structured replies, in one piece and a byte at a time', async (t) => {
  const readData = randomBytes(8192);
  const stream = Buffer.concat([
    simple(3), // a WRITE's reply
    chunk(1, nbd.NBD_REPLY_TYPE_OFFSET_DATA, 0, Buffer.concat([u64(1024n * 1024n + 4096n), readData.subarray(4096)])),
    chunk(1, nbd.NBD_REPLY_TYPE_OFFSET_HOLE, 0, Buffer.concat([u64(1024n * 1024n), u32(4096)])),
    chunk(2, nbd.NBD_REPLY_TYPE_ERROR, nbd.NBD_REPLY_FLAG_DONE, Buffer.concat([u32(nbd.NBD_ENOSPC), u16(4), Buffer.from('full')])),
    chunk(1, nbd.NBD_REPLY_TYPE_NONE, nbd.NBD_REPLY_FLAG_DONE, Buffer.alloc(0)),
    chunk(4, nbd.NBD_REPLY_TYPE_OFFSET_DATA, nbd.NBD_REPLY_FLAG_DONE, Buffer.concat([u64(0n), readData.subarray(0, 512)])),
  ]);
  const reqs = { 1: { offset: MiB, readLength: 8192 }, 2: { offset: 0, readLength: 0 }, 3: { offset: 0, readLength: 0 }, 4: { offset: 0, readLength: 512 } };
  const expected = ['done 3', `data 1 4096 4096`, 'hole 1 0 4096', `error 2 ${nbd.NBD_ENOSPC} full`, 'done 2', 'done 1', 'data 4 0 512', 'done 4'];
  const whole = recorder(reqs);
  new ReplyReader(whole.sink, true).feed(stream);
  t.same(whole.events, expected, 'one piece');
  t.same(whole.data.get(1), Buffer.concat([Buffer.alloc(4096), readData.subarray(4096)]), 'the READ is the hole then the data');
  const bytewise = recorder(reqs);
  const reader = new ReplyReader(bytewise.sink, true);
  for (let i = 0; i < stream.length; i++) reader.feed(stream.subarray(i, i + 1));
  // Data arrives in 1-byte pieces: merge them for the comparison.
  const merged = bytewise.events.filter((e) => !e.startsWith('data'));
  t.same(merged, expected.filter((e) => !e.startsWith('data')));
  t.same(bytewise.data.get(1), whole.data.get(1), 'the same bytes a byte at a time');
  t.same(bytewise.data.get(4), readData.subarray(0, 512));
  // Pieces of every size from 2 to 41 bytes: headers and chunk fields now whole in a piece
  // (parsed where they lie), now split across two (gathered first).
  const bad: number[] = [];
  for (let size = 2; size <= 41; size++) {
    const pieces = recorder(reqs);
    const r = new ReplyReader(pieces.sink, true);
    for (let i = 0; i < stream.length; i += size) r.feed(stream.subarray(i, i + size));
    const same = JSON.stringify(pieces.events.filter((e) => !e.startsWith('data'))) === JSON.stringify(merged)
      && pieces.data.get(1)!.equals(whole.data.get(1)!) && pieces.data.get(4)!.equals(readData.subarray(0, 512));
    if (!same) bad.push(size);
  }
  t.same(bad, [], 'the same replies and bytes in pieces of 2 to 41 bytes');
  // A simple READ reply with data, and a simple error.
  const s = recorder({ 9: { offset: 0, readLength: 16 } });
  new ReplyReader(s.sink, false).feed(Buffer.concat([simple(9, 0, Buffer.alloc(16, 7)), simple(9, nbd.NBD_EIO)]));
  t.same(s.events, ['data 9 0 16', 'done 9', 'error 9 5 ', 'done 9']);
});

t.test('reply reader: broken streams are protocol errors', async (t) => {
  const reqs = { 1: { offset: 4096, readLength: 4096 } };
  const cases: Array<[string, Buffer, boolean]> = [
    ['a wrong magic', u32(0xdeadbeef), true],
    ['a cookie never sent', simple(5), true],
    ['a structured chunk without structured replies', chunk(1, nbd.NBD_REPLY_TYPE_NONE, 1, Buffer.alloc(0)), false],
    ['data outside the request', chunk(1, nbd.NBD_REPLY_TYPE_OFFSET_DATA, 1, Buffer.concat([u64(0n), Buffer.alloc(16)])), true],
    ['a hole past the request', chunk(1, nbd.NBD_REPLY_TYPE_OFFSET_HOLE, 1, Buffer.concat([u64(4096n), u32(8192)])), true],
    ['a NONE chunk with a payload', chunk(1, nbd.NBD_REPLY_TYPE_NONE, 1, Buffer.alloc(4)), true],
  ];
  for (const [what, bytes, structured] of cases) {
    t.throws(() => new ReplyReader(recorder(reqs).sink, structured).feed(bytes), NbdProtocolError, what);
  }
});

t.test('options and shape', async (t) => {
  const parse = (a: string[]) => nbdTarget.parseArgs(a);
  t.match(parse(['--host', 'h', '--export', 'e']), { host: 'h', port: 10809, exportName: 'e', reconnectTimeoutS: 60 });
  t.match(parse(['--socket', 'rel/s.sock']), { socket: /^\/.*rel\/s\.sock$/, exportName: '' });
  t.throws(() => parse([]), UsageError);
  t.throws(() => parse(['--host', 'h', '--socket', '/s']), UsageError);
  t.throws(() => parse(['--socket', '/s', '--port', '1']), UsageError);
  t.throws(() => parse(['--socket', `/${'x'.repeat(120)}`]), /107 bytes/);
  const base = { size: 10 * MiB + 100, flags: 0, structured: true, minimumBlock: 1, preferredBlock: 4096, maximumPayload: 32 * MiB, go: true };
  t.same(shapeFor(base), { sizeBytes: 10 * MiB, logicalBlockSize: 512, physicalBlockSize: 4096, maxIoBytes: 512 * 1024 }, 'size rounded down to blocks');
  t.same(shapeFor({ ...base, minimumBlock: 4096, maximumPayload: 65536 + 5 }), { sizeBytes: 10 * MiB, logicalBlockSize: 4096, physicalBlockSize: 4096, maxIoBytes: 65536 });
  t.throws(() => shapeFor({ ...base, minimumBlock: 8192 }), TargetError);
  t.throws(() => shapeFor({ ...base, maximumPayload: 2048 }), TargetError);
  t.throws(() => shapeFor({ ...base, size: 100 }), TargetError);
  t.same([...ipv6Bytes('::1')], [...Buffer.alloc(15), 1]);
  t.equal(ipv6Bytes('fe80::1:2%eth0').toString('hex'), 'fe800000000000000000000000010002');
  t.equal(ipv6Bytes('::ffff:10.1.2.3').toString('hex'), '00000000000000000000ffff0a010203');
});

// --- Against a real nbdkit -----------------------------------------------------------------------
const haveNbdkit = spawnSync('sh', ['-c', 'command -v nbdkit']).status === 0;

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/** Starts nbdkit in the foreground; resolves once it accepts connections. */
async function nbdkit(args: string[], ready: () => boolean): Promise<ChildProcess> {
  const child = spawn('nbdkit', ['-f', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => { err += d.toString(); });
  for (let i = 0; i < 100; i++) {
    if (ready()) return child;
    if (child.exitCode !== null) throw new Error(`nbdkit exited: ${err}`);
    await sleep(50);
  }
  child.kill('SIGKILL');
  throw new Error(`nbdkit did not start: ${err}`);
}

async function listening(port: number): Promise<boolean> {
  try {
    await probeExport({ host: '127.0.0.1', port }, '', 1000);
    return true;
  } catch {
    return false;
  }
}

/** The target's queue handler on a harness, after `prepare` against the live server. */
async function open(o: NbdOptions, depth = 8) {
  const spec = await nbdTarget.prepare(o);
  const h = new TargetHarness(nbdTarget, o, spec.queueData, { depth, maxIoBytes: spec.maxIoBytes ?? 512 * 1024 });
  return { spec, h };
}

t.test('against nbdkit (memory plugin, TCP): every request type, data both ways', { skip: haveNbdkit ? false : 'nbdkit is not installed (npm run setup installs it)' }, async (t) => {
  const port = await freePort();
  const server = await nbdkit(['-p', String(port), '-i', '127.0.0.1', 'memory', '16M'], () => true);
  t.teardown(() => server.kill('SIGKILL'));
  for (let i = 0; i < 100 && !(await listening(port)); i++) await sleep(50);
  const o = nbdTarget.parseArgs(['--host', '127.0.0.1', '--port', String(port)]);
  const { spec, h } = await open(o);
  t.teardown(() => h.close());
  t.equal(spec.sizeBytes, 16 * MiB);
  t.ok(spec.volatileCache, 'nbdkit memory advertises flush');
  t.ok(spec.discard && spec.discard.maxBytes > 0 && spec.discard.maxWriteZeroesBytes > 0, 'and trim and write zeroes');
  t.equal(spec.queueLimit, undefined, 'and multi-conn');
  t.match(spec.describe, { server: `127.0.0.1:${port}`, structured_replies: true });
  const wait = (tag: number) => h.runUntil(() => h.results.has(tag), 5000);

  // Writes at several places and sizes, in flight together; then read back and compare.
  const model = Buffer.alloc(16 * MiB);
  const writes: Array<[number, number]> = [[0, 4096], [MiB, 512 * 1024], [3 * MiB + 512, 1536], [16 * MiB - 4096, 4096]];
  writes.forEach(([off, len], tag) => {
    const data = randomBytes(len);
    data.copy(model, off);
    h.setRequestBytes(tag, data);
    h.submit(tag, UBLK_IO_OP_WRITE, off, len, tag === 1 ? UBLK_IO_F_FUA : 0);
  });
  h.runUntil(() => writes.every((_, tag) => h.results.has(tag)));
  writes.forEach(([, len], tag) => t.equal(h.results.get(tag), len, `write ${tag}`));
  h.submit(0, UBLK_IO_OP_FLUSH, 0, 0);
  wait(0);
  t.equal(h.results.get(0), 0, 'flush');
  for (const [tag, [off, len]] of writes.entries()) {
    h.submit(tag, UBLK_IO_OP_READ, off, len);
    wait(tag);
    t.equal(h.results.get(tag), len);
    t.ok(h.buffer(tag, len).equals(model.subarray(off, off + len)), `read back ${len} bytes at ${off}`);
  }
  // A READ of never-written space: nbdkit answers with a hole chunk.
  h.submit(5, UBLK_IO_OP_READ, 8 * MiB, 64 * 1024);
  h.setRequestBytes(5, Buffer.alloc(64 * 1024, 0xff));
  wait(5);
  t.ok(h.buffer(5, 64 * 1024).equals(Buffer.alloc(64 * 1024)), 'unwritten space reads as zeros');
  // WRITE_ZEROES and DISCARD.
  h.submit(6, UBLK_IO_OP_WRITE_ZEROES, MiB, 64 * 1024);
  wait(6);
  t.equal(h.results.get(6), 0);
  h.submit(6, UBLK_IO_OP_READ, MiB, 128 * 1024);
  wait(6);
  t.ok(h.buffer(6, 128 * 1024).equals(Buffer.concat([Buffer.alloc(64 * 1024), model.subarray(MiB + 64 * 1024, MiB + 128 * 1024)])), 'zeroed range and its neighbour');
  h.submit(7, UBLK_IO_OP_DISCARD, 3 * MiB, MiB);
  wait(7);
  t.equal(h.results.get(7), 0, 'discard');
  // A request past the end: the server's error reaches the block layer as an errno.
  h.submit(3, UBLK_IO_OP_READ, 16 * MiB, 4096);
  wait(3);
  t.ok(h.results.get(3)! < 0, `a read past the end fails (${h.results.get(3)})`);
});

for (const mode of ['copy', 'user_copy'] as const) {
  t.test(`against nbdkit (memory plugin, Unix socket, ${mode}): 512 KiB and 4 KiB requests in flight together keep their bytes`, { skip: haveNbdkit ? false : 'nbdkit is not installed' }, async (t) => {
    const sock = join(dir, `modes-${mode}.sock`);
    const server = await nbdkit(['-U', sock, 'memory', '16M'], () => existsSync(sock));
    t.teardown(() => server.kill('SIGKILL'));
    const o = nbdTarget.parseArgs(['--socket', sock]);
    const spec = await nbdTarget.prepare(o);
    // User copy: a regular file plays the char device (the harness's stand-in).
    const fd = mode === 'user_copy' ? sys.open(join(dir, 'char-user-copy'), libc.O_RDWR | libc.O_CREAT) : undefined;
    const h = new TargetHarness(nbdTarget, o, spec.queueData, { depth: 8, maxIoBytes: spec.maxIoBytes!, ...(fd === undefined ? {} : { userCopyFd: fd }) });
    t.teardown(() => {
      h.close();
      if (fd !== undefined) sys.close(fd);
    });
    // 512 KiB a request: more than a Unix socket holds at once (its buffer is about 200 KiB),
    // so a reply's data arrives over several receives, each copied on into the request (in
    // user copy by pwrite of the char device, here its stand-in file). Then 4 KiB reads, 8 in
    // flight, several replies a receive.
    const big = 512 * 1024;
    const model = randomBytes(4 * big);
    for (let tag = 0; tag < 4; tag++) {
      h.setRequestBytes(tag, model.subarray(tag * big, (tag + 1) * big));
      h.submit(tag, UBLK_IO_OP_WRITE, tag * big, big);
    }
    h.runUntil(() => [0, 1, 2, 3].every((tag) => h.results.get(tag) === big), 10_000);
    for (let tag = 0; tag < 4; tag++) {
      h.setRequestBytes(tag, Buffer.alloc(big, 0xee));
      h.submit(tag, UBLK_IO_OP_READ, (3 - tag) * big, big);
    }
    h.runUntil(() => [0, 1, 2, 3].every((tag) => h.results.has(tag)), 10_000);
    const bad = [0, 1, 2, 3].filter((tag) => h.results.get(tag) !== big || !h.buffer(tag, big).equals(model.subarray((3 - tag) * big, (4 - tag) * big)));
    t.same(bad, [], '4 reads of 512 KiB return the bytes written');
    const small = 4096;
    for (let tag = 0; tag < 8; tag++) h.submit(tag, UBLK_IO_OP_READ, tag * 3 * small + 512, small);
    h.runUntil(() => [...Array(8).keys()].every((tag) => h.results.has(tag)), 10_000);
    const badSmall = [...Array(8).keys()].filter((tag) => h.results.get(tag) !== small || !h.buffer(tag, small).equals(model.subarray(tag * 3 * small + 512, tag * 3 * small + 512 + small)));
    t.same(badSmall, [], '8 reads of 4 KiB in flight together return their bytes');
  });
}

t.test('against nbdkit (file plugin, Unix socket): a server restarted under held requests, and one that never returns', { skip: haveNbdkit ? false : 'nbdkit is not installed' }, async (t) => {
  const sock = join(dir, 'nbd.sock');
  const file = join(dir, 'disk.img');
  writeFileSync(file, Buffer.alloc(4 * MiB));
  const start = () => nbdkit(['-U', sock, 'file', file], () => existsSync(sock));
  let server = await start();
  t.teardown(() => server.kill('SIGKILL'));
  const o = nbdTarget.parseArgs(['--socket', sock, '--reconnect-timeout', '2']);
  const { h } = await open(o);
  t.teardown(() => h.close());
  const data = randomBytes(64 * 1024);
  h.setRequestBytes(0, data);
  h.submit(0, UBLK_IO_OP_WRITE, 0, data.length);
  h.runUntil(() => h.results.has(0));
  t.equal(h.results.get(0), data.length);

  // Kill the server, queue requests, bring it back: they complete, nothing failed.
  server.kill('SIGKILL');
  await new Promise((r) => server.once('exit', r));
  rmSync(sock, { force: true });
  const more = randomBytes(4096);
  h.setRequestBytes(1, more);
  h.submit(1, UBLK_IO_OP_WRITE, MiB, 4096);
  h.submit(2, UBLK_IO_OP_READ, 0, data.length);
  h.runFor(300);
  t.notOk(h.results.has(1) || h.results.has(2), 'held while the server is away');
  server = await start();
  h.runUntil(() => h.results.has(1) && h.results.has(2), 8000);
  t.equal(h.results.get(1), 4096, 'the held write went through after the reconnect');
  t.ok(h.buffer(2, data.length).equals(data), 'the held read returned the data');
  t.ok(readFileSync(file).subarray(MiB, MiB + 4096).equals(more), 'and the write is in the file');

  // Kill it for good: after --reconnect-timeout (2 s) held requests fail with EIO, new ones at once.
  server.kill('SIGKILL');
  await new Promise((r) => server.once('exit', r));
  rmSync(sock, { force: true });
  const t0 = Date.now();
  h.submit(3, UBLK_IO_OP_READ, 0, 4096);
  h.runUntil(() => h.results.has(3), 10_000);
  const waited = Date.now() - t0;
  t.equal(h.results.get(3), -libc.EIO, 'failed with EIO');
  t.ok(waited >= 1500, `only after the timeout (${waited} ms)`);
  h.submit(4, UBLK_IO_OP_READ, 0, 4096);
  t.equal(h.results.get(4), -libc.EIO, 'a new request fails at once while the server is unreachable');
  // And back again: the device works (the next reconnect attempt finds it, within the 2 s backoff ceiling).
  server = await start();
  const until = Date.now() + 8000;
  for (;;) {
    h.submit(5, UBLK_IO_OP_READ, 0, 4096);
    if (h.results.get(5) !== -libc.EIO || Date.now() > until) break;
    h.runFor(200);
  }
  h.runUntil(() => h.results.has(5), 5000);
  t.equal(h.results.get(5), 4096, 'reads work again once the server is back');
});
