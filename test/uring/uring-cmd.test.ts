/**
 * URING_CMD on 64- and 128-byte SQE rings, with 16- and 32-byte CQEs. The socket commands
 * (SOCKET_URING_OP_*, Linux 6.7) are the host's stand-in for ublk's commands, which need a
 * kernel with ublk_drv and are tested in the VM.
 */
import t from 'tap';
import { IoUring, Mapping, abi, prepUringCmd, prepNop, setUserData, cmdWord, sys } from '../../src/uring/index.js';
import { runAll, tryRing, udpSocketWithPending } from '../helpers/uring.js';

const SOL_SOCKET = 1;
const SO_TYPE = 3;
const SOCK_DGRAM = 2;

const layouts = [
  { name: '64-byte SQE, 16-byte CQE', flags: 0, sqeWords: 16, cqeWords: 4, cmdWords: 4 },
  { name: 'SQE128', flags: abi.IORING_SETUP_SQE128, sqeWords: 32, cqeWords: 4, cmdWords: 20 },
  { name: 'SQE128 + CQE32', flags: abi.IORING_SETUP_SQE128 | abi.IORING_SETUP_CQE32, sqeWords: 32, cqeWords: 8, cmdWords: 20 },
];

for (const L of layouts) {
  t.test(L.name, (t) => {
    const ring = tryRing(8, { flags: L.flags });
    if (typeof ring === 'string') {
      t.skip(`kernel refuses ${L.name}: ${ring}`, () => {});
      return t.end();
    }
    const payload = Buffer.from('datagram of 23 bytes...');
    const fd = udpSocketWithPending(payload);
    const m = Mapping.anonymous(4096);
    t.teardown(() => { ring.close(); sys.close(fd); m.unmap(); });
    t.equal(ring.sqeWords, L.sqeWords);
    t.equal(ring.cqeWords, L.cqeWords);
    t.equal(ring.cmdWords, L.cmdWords);

    // A NOP first so the command lands in slot 1: checks the SQE stride of this layout.
    let w = ring.getSqe();
    prepNop(ring.sqes, w);
    setUserData(ring.sqes, w, 1);
    w = ring.getSqe();
    t.equal(w, L.sqeWords, 'second SQE starts one entry in');
    ring.sqes.fill(0xffffffff, w, w + L.sqeWords); // stale garbage the prep must clear
    prepUringCmd(ring.sqes, w, abi.SOCKET_URING_OP_SIOCINQ, fd, ring.cmdWords);
    setUserData(ring.sqes, w, 2);
    t.ok(ring.sqes.subarray(cmdWord(w), cmdWord(w) + ring.cmdWords).every((x) => x === 0), 'the whole command area is zeroed');
    if (L.sqeWords === 32) t.equal(ring.sqes[w + 31], 0, 'including the last word of a 128-byte SQE');
    const probeRes = runAll(ring, 2);
    if (probeRes[1]!.res === -95 /* EOPNOTSUPP */ || probeRes[1]!.res === -22 /* EINVAL */) {
      t.skip(`socket URING_CMD needs Linux 6.7 (res ${probeRes[1]!.res})`, () => {});
      return t.end();
    }
    t.same(probeRes.map((c) => [c.userData, c.res]), [[1, 0], [2, payload.length]], 'SIOCINQ: bytes of the pending datagram');
    if (L.cqeWords === 8) t.same(probeRes[1]!.extra, [0, 0, 0, 0], 'CQE32 carries the big_cqe words (zero for sockets)');

    w = ring.getSqe();
    prepUringCmd(ring.sqes, w, abi.SOCKET_URING_OP_SIOCOUTQ, fd, ring.cmdWords);
    setUserData(ring.sqes, w, 3);
    t.same(runAll(ring, 1).map((c) => c.res), [0], 'SIOCOUTQ: nothing unsent');

    // GETSOCKOPT: level/optname in the addr words, optval address in the command area (addr3),
    // optlen in the file_index word.
    w = ring.getSqe();
    prepUringCmd(ring.sqes, w, abi.SOCKET_URING_OP_GETSOCKOPT, fd, ring.cmdWords);
    ring.sqes[w + 4] = SOL_SOCKET;
    ring.sqes[w + 5] = SO_TYPE;
    ring.sqes[w + 11] = 4;
    ring.sqes[cmdWord(w)] = m.address >>> 0;
    ring.sqes[cmdWord(w) + 1] = Math.floor(m.address / 2 ** 32);
    setUserData(ring.sqes, w, 4);
    t.same(runAll(ring, 1).map((c) => c.res), [4], 'GETSOCKOPT returns optlen');
    t.equal(m.view.getInt32(0, true), SOCK_DGRAM, 'SO_TYPE written into our mapped memory');
    t.end();
  });
}

t.test('an unknown command on a socket is refused, not crashed', (t) => {
  const ring = new IoUring(4, { flags: abi.IORING_SETUP_SQE128 });
  const fd = udpSocketWithPending(Buffer.from('x'));
  t.teardown(() => { ring.close(); sys.close(fd); });
  const w = ring.getSqe();
  prepUringCmd(ring.sqes, w, 0x7777, fd, ring.cmdWords);
  const res = runAll(ring, 1)[0]!.res;
  t.ok(res < 0, `res ${res}`);
  t.end();
});
