/**
 * The ublk half of the live trace (src/ublk/trace.ts): ublk commands and requests by name, from
 * SQEs prepared by the same functions the queue and control plane use, and the FIFO sink a
 * `ublk trace` reader gets (never blocks the writer; drops and says so; ends when the reader does).
 */
import t from 'tap';
import { closeSync, mkdtempSync, openSync, readSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describeSqe, describeCqe, libc, sys } from '../../src/uring/index.js';
import { prepCtrlCmd, prepIoCmd } from '../../src/ublk/wire.js';
import {
  UBLK_U_IO_COMMIT_AND_FETCH_REQ, UBLK_U_IO_FETCH_REQ, UBLK_U_CMD_ADD_DEV, UBLK_CMD_START_DEV, UBLK_U_CMD_UPDATE_SIZE,
  UBLK_IO_OP_WRITE, UBLK_IO_F_FUA, UBLK_IO_RES_ABORT, UBLK_IO_RES_OK, ublksrv_io_desc,
} from '../../src/ublk/abi.js';
import { TraceSink, controlTraceDecoder, describeIoDesc, queueTraceDecoder } from '../../src/ublk/trace.js';

t.test('I/O commands: FETCH_REQ and COMMIT_AND_FETCH_REQ with their fields', async (t) => {
  const s = new Uint32Array(16);
  const dec = queueTraceDecoder({ cmdKind: 1, desc32: new Uint32Array(6), userData: (lo, hi) => (hi === 1 ? `cmd tag ${lo}` : undefined) });
  prepIoCmd(s, 0, UBLK_U_IO_FETCH_REQ, 0, true, 2, 17, 0, 0x7f0000001000);
  s[8] = 17;
  s[9] = 1;
  t.equal(describeSqe(s, 0, dec), 'URING_CMD flags=FIXED_FILE fd=0 UBLK_U_IO_FETCH_REQ q_id=2 tag=17 addr=0x7f0000001000 user_data=cmd tag 17');
  prepIoCmd(s, 0, UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0, true, 0, 3, -5, 0);
  t.match(describeSqe(s, 0, dec), / UBLK_U_IO_COMMIT_AND_FETCH_REQ q_id=0 tag=3 result=-5 user_data=/, 'a negative result as such');
});

t.test('control commands by name, the legacy opcodes marked', async (t) => {
  const s = new Uint32Array(32);
  prepCtrlCmd(s, 0, 20, UBLK_U_CMD_ADD_DEV, 4, { devId: -1, len: 64, addr: 0x1000 });
  t.equal(describeSqe(s, 0, controlTraceDecoder), 'URING_CMD fd=4 UBLK_U_CMD_ADD_DEV dev_id=-1 len=64 addr=0x1000 user_data=0x0');
  prepCtrlCmd(s, 0, 20, UBLK_U_CMD_UPDATE_SIZE, 4, { devId: 3, data: 2048 });
  t.equal(describeSqe(s, 0, controlTraceDecoder), 'URING_CMD fd=4 UBLK_U_CMD_UPDATE_SIZE dev_id=3 data=2048 user_data=0x0');
  prepCtrlCmd(s, 0, 20, UBLK_CMD_START_DEV, 4, { devId: 3, data: 99 });
  t.match(describeSqe(s, 0, controlTraceDecoder), /UBLK_U_CMD_START_DEV dev_id=3 data=99 \(legacy opcode\)/);
});

t.test('a fetch CQE names the request its tag\'s descriptor holds', async (t) => {
  const desc = new Uint32Array(6 * 4);
  const at = (3 * ublksrv_io_desc.SIZE) / 4;
  desc[at] = UBLK_IO_OP_WRITE | UBLK_IO_F_FUA;
  desc[at + 1] = 8;
  desc[at + 2] = 2048;
  const dec = queueTraceDecoder({ cmdKind: 1, desc32: desc, userData: (lo, hi) => (hi === 1 ? `cmd tag ${lo}` : undefined) });
  const cq = new Uint32Array([3, 1, UBLK_IO_RES_OK, 0]);
  t.equal(describeCqe(cq, 0, dec), 'user_data=cmd tag 3 res=0 request: WRITE sector=2048 sectors=8 (4096 bytes) flags=FUA');
  cq[2] = UBLK_IO_RES_ABORT >>> 0;
  t.match(describeCqe(cq, 0, dec), /res=-ENODEV ABORT: the device is stopping/);
  cq[1] = 2;
  cq[2] = 4096;
  t.equal(describeCqe(cq, 0, dec), 'user_data=0x200000003 res=4096', 'other kinds: no request');
  t.equal(describeIoDesc({ op: 2, flags: 0, nrSectors: 0, startSector: 0, addr: 0 }), 'FLUSH');
});

t.test('the FIFO sink: nobody reading, a reader, a full pipe, the reader gone', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ublk-trace-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'fifo');
  sys.mkfifo(path, 0o600);
  t.equal(TraceSink.fifo(path), undefined, 'no reader: ENXIO, no sink');
  const r = openSync(path, libc.O_RDONLY | libc.O_NONBLOCK);
  const sink = TraceSink.fifo(path)!;
  t.ok(sink, 'a reader: a sink');
  sink.write('one\ntwo\n');
  const buf = Buffer.alloc(1 << 20);
  t.equal(buf.toString('utf8', 0, readSync(r, buf)), 'one\ntwo\n');
  // Fill the pipe (64 KiB by default): the sink drops instead of blocking, and says so later.
  const line = `${'x'.repeat(99)}\n`;
  for (let i = 0; i < 2000; i++) sink.write(line);
  let got = '';
  for (;;) {
    let n = 0;
    try {
      n = readSync(r, buf);
    } catch {
      break; // EAGAIN: drained
    }
    if (n <= 0) break;
    got += buf.toString('utf8', 0, n);
  }
  t.ok(got.length < 2000 * 100, 'some lines were dropped, none waited for');
  t.ok(got.split('\n').slice(0, -1).every((l) => l === line.slice(0, -1)), 'no line was torn');
  sink.write('after\n');
  const after = buf.toString('utf8', 0, readSync(r, buf));
  t.match(after, /^\(trace: \d+ lines dropped: the reader was too slow\)\nafter\n$/);
  closeSync(r);
  sink.write('nobody\n');
  t.ok(sink.closed, 'the reader left: EPIPE closes the sink');
  sink.write('still nobody\n');
});
