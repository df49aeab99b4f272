/**
 * The ublk wire encoding (src/ublk/wire.ts), word by word: what an I/O command and a control
 * command put into an SQE, and how a descriptor is read. A real ring's SQE array is the
 * target, filled with garbage first, so a field the encoder forgets shows up.
 */
import t from 'tap';
import { IoUring, abi as uringAbi } from '../../src/uring/index.js';
import {
  UBLK_U_IO_COMMIT_AND_FETCH_REQ, UBLK_U_CMD_ADD_DEV, UBLK_IO_OP_WRITE, UBLK_IO_F_FUA, UBLK_IO_F_NOUNMAP,
  ublksrv_io_desc, UBLK_U_IO_COMMIT_IO_CMDS, UBLK_U_IO_FETCH_IO_CMDS, UBLK_BATCH_F_HAS_BUF_ADDR,
} from '../../src/ublk/abi.js';
import { ANY_DEV_ID, NO_QUEUE_ID, prepBatchCmd, prepBatchFetch, prepCtrlCmd, prepIoCmd, readIoDesc, SECTOR_SIZE } from '../../src/ublk/wire.js';

const hex = (a: ArrayLike<number>) => Array.from(a, (x) => `0x${(x >>> 0).toString(16)}`);

t.test('an I/O command: URING_CMD on fixed file 0 with {q_id, tag, result, addr} at sqe->cmd', (t) => {
  const ring = new IoUring(4);
  t.teardown(() => ring.close());
  const w = ring.getSqe();
  ring.sqes.fill(0xdeadbeef, w, w + 16);
  // A negative result (-EIO) and an address above 2^32 exercise the sign and the high word.
  prepIoCmd(ring.sqes, w, UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0, true, 3, 0x1234, -5, 0x7f12_3456_7000);
  t.same(hex(ring.sqes.subarray(w, w + 16)), hex([
    uringAbi.IORING_OP_URING_CMD | (uringAbi.IOSQE_FIXED_FILE << 8), // opcode, flags, ioprio
    0, // fd: the fixed-file index
    UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0, // cmd_op, __pad1
    0, 0, // addr (unused by URING_CMD)
    0, 0, // len, uring_cmd_flags
    0, 0, // user_data: the caller's
    0, 0, // buf_index/personality, file_index
    3 | (0x1234 << 16), // cmd: q_id, tag
    0xfffffffb, // result -5
    0x34567000, 0x7f12, // addr
  ]));
  const v = ring.getSqe();
  prepIoCmd(ring.sqes, v, UBLK_U_IO_COMMIT_AND_FETCH_REQ, 9, false, 0, 0, 0, 0);
  t.equal(ring.sqes[v]! >>> 8 & 0xff, 0, 'no FIXED_FILE flag when the fd is a real one');
  t.equal(ring.sqes[v + 1], 9);
  t.end();
});

t.test('a control command: struct ublksrv_ctrl_cmd in an SQE128 ring, the rest of the 80 bytes zero', (t) => {
  const ring = new IoUring(4, { flags: uringAbi.IORING_SETUP_SQE128 });
  t.teardown(() => ring.close());
  const w = ring.getSqe();
  ring.sqes.fill(0xdeadbeef, w, w + 32);
  prepCtrlCmd(ring.sqes, w, ring.cmdWords, UBLK_U_CMD_ADD_DEV, 7, {
    devId: ANY_DEV_ID, len: 64, addr: 0x7000_1000_2000, data: 2 ** 33 + 1, devPathLen: 11,
  });
  t.same(hex(ring.sqes.subarray(w, w + 12)), hex([uringAbi.IORING_OP_URING_CMD, 7, UBLK_U_CMD_ADD_DEV, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
  t.same(hex(ring.sqes.subarray(w + 12, w + 20)), hex([
    0xffffffff, // dev_id
    NO_QUEUE_ID | (64 << 16), // queue_id, len
    0x10002000, 0x7000, // addr
    1, 2, // data[0] = 2^33 + 1
    11, // dev_path_len, pad
    0, // reserved
  ]));
  t.ok(ring.sqes.subarray(w + 20, w + 32).every((x) => x === 0), 'the rest of cmd[80] is zeroed');
  const plain = new IoUring(4);
  t.teardown(() => plain.close());
  t.throws(() => prepCtrlCmd(plain.sqes, plain.getSqe(), plain.cmdWords, UBLK_U_CMD_ADD_DEV, 7, { devId: 0 }), /SQE128/,
    'a 64-byte SQE cannot carry it');
  t.end();
});

t.test('a descriptor: op, flags, sectors, start sector (64-bit) and addr, per tag', (t) => {
  const d = new Uint32Array(3 * (ublksrv_io_desc.SIZE >> 2));
  const tag = 2;
  const i = tag * 6;
  d[i] = UBLK_IO_OP_WRITE | UBLK_IO_F_FUA | UBLK_IO_F_NOUNMAP | 0x80000000; // op_flags, a high bit too
  d[i + 1] = 1024; // nr_sectors
  d[i + 2] = 5; d[i + 3] = 3; // start_sector = 3 * 2^32 + 5
  d[i + 4] = 0x1000; d[i + 5] = 0x7fff; // addr
  const out = { op: -1, flags: -1, nrSectors: -1, startSector: -1, addr: -1 };
  t.equal(readIoDesc(d, tag, out), out, 'fills the object it is given');
  t.same(out, { op: UBLK_IO_OP_WRITE, flags: (UBLK_IO_F_FUA | UBLK_IO_F_NOUNMAP | 0x80000000) >>> 0, nrSectors: 1024, startSector: 3 * 2 ** 32 + 5, addr: 0x7fff_0000_1000 });
  t.equal(out.startSector * SECTOR_SIZE, (3 * 2 ** 32 + 5) * 512, 'byte offsets stay exact');
  t.end();
});

t.test('batch commands: struct ublk_batch_io at sqe->cmd, the elements at sqe->addr, multishot fetch with buffer select', (t) => {
  const ring = new IoUring(4);
  t.teardown(() => ring.close());
  const w = ring.getSqe();
  ring.sqes.fill(0xdeadbeef, w, w + 16);
  prepBatchCmd(ring.sqes, w, UBLK_U_IO_COMMIT_IO_CMDS, 0, 2, UBLK_BATCH_F_HAS_BUF_ADDR, 5, 16, 0x7f00_0000_1000);
  t.same(hex(ring.sqes.subarray(w, w + 16)), hex([
    uringAbi.IORING_OP_URING_CMD | (uringAbi.IOSQE_FIXED_FILE << 8),
    0, // the char device's fixed-file slot
    UBLK_U_IO_COMMIT_IO_CMDS, 0,
    0x1000, 0x7f00, // addr: the elements
    5 * 16, 0, // len: their bytes; uring_cmd_flags
    0, 0,
    0, 0,
    2 | (UBLK_BATCH_F_HAS_BUF_ADDR << 16), // q_id, flags
    5 | (16 << 16), // nr_elem, elem_bytes, reserved
    0, 0, // reserved2
  ]));
  const f = ring.getSqe();
  ring.sqes.fill(0xdeadbeef, f, f + 16);
  prepBatchFetch(ring.sqes, f, 0, 1, 2048, 1);
  t.same(hex(ring.sqes.subarray(f, f + 16)), hex([
    uringAbi.IORING_OP_URING_CMD | ((uringAbi.IOSQE_FIXED_FILE | uringAbi.IOSQE_BUFFER_SELECT) << 8),
    0,
    UBLK_U_IO_FETCH_IO_CMDS, 0,
    0, 0, // no elements: the kernel writes tags into a provided buffer
    0, uringAbi.IORING_URING_CMD_MULTISHOT,
    0, 0,
    1, 0, // buf_group 1
    1, // q_id 1, flags 0
    2048 | (2 << 16), // nr_elem, elem_bytes 2 (a u16 tag)
    0, 0,
  ]));
  t.end();
});
