/**
 * Small helpers shared by the ring tests: reaping into plain objects, test files in mapped
 * memory, and the few libc socket calls the ring layer itself does not need.
 */
import koffi from 'koffi';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { IoUring, Mapping, SysError } from '../../src/uring/index.js';

export interface Cqe {
  userData: number;
  res: number;
  flags: number;
  extra?: number[];
}

/** Copies every ready CQE out (waiting for `waitNr` first) and advances the head. */
export function reap(ring: IoUring, waitNr = 0): Cqe[] {
  const out = new Uint32Array(ring.cqeWords * 64);
  const all: Cqe[] = [];
  for (;;) {
    // Block for one more at a time until `waitNr` arrived, then take whatever else is ready.
    const n = ring.copyCqes(out, all.length < waitNr ? 1 : 0);
    if (n === 0) return all;
    for (let i = 0; i < n; i++) {
      const o = i * ring.cqeWords;
      const cqe: Cqe = { userData: out[o]! + out[o + 1]! * 2 ** 32, res: out[o + 2]! | 0, flags: out[o + 3]! };
      if (ring.cqeWords === 8) cqe.extra = Array.from(out.subarray(o + 4, o + 8));
      all.push(cqe);
    }
  }
}

/** Submits and waits until `n` CQEs arrived; returns them sorted by user_data. */
export function runAll(ring: IoUring, n: number): Cqe[] {
  ring.submit();
  return reap(ring, n).sort((a, b) => a.userData - b.userData);
}

/** A temporary directory removed when the test ends. */
export function tempDir(t: { teardown(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'ublk-test-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Opens a ring, or returns the reason the kernel refuses these flags (for a clean skip). */
export function tryRing(entries: number, opts: ConstructorParameters<typeof IoUring>[1]): IoUring | string {
  try {
    return new IoUring(entries, opts);
  } catch (e) {
    if (e instanceof SysError && ['EINVAL', 'EPERM', 'ENOSYS'].includes(e.code)) return e.message;
    throw e;
  }
}

const libc = koffi.load('libc.so.6');
const socketpair_ = libc.func('int socketpair(int domain, int type, int protocol, intptr_t sv)');
const socket_ = libc.func('int socket(int domain, int type, int protocol)');
const bind_ = libc.func('int bind(int fd, intptr_t addr, uint32_t len)');
const getsockname_ = libc.func('int getsockname(int fd, intptr_t addr, intptr_t len)');
const sendto_ = libc.func('intptr_t sendto(int fd, intptr_t buf, size_t len, int flags, intptr_t addr, uint32_t alen)');

export const AF_UNIX = 1;
export const AF_INET = 2;
export const SOCK_STREAM = 1;
export const SOCK_DGRAM = 2;

function check(r: number | bigint, what: string): number {
  const n = Number(r);
  if (n < 0) throw new SysError(koffi.errno(), what);
  return n;
}

/** socketpair(2) into two fds. */
export function socketpair(type = SOCK_STREAM): [number, number] {
  const m = Mapping.anonymous(8);
  try {
    check(socketpair_(AF_UNIX, type, 0, m.address), 'socketpair');
    return [m.view.getInt32(0, true), m.view.getInt32(4, true)];
  } finally {
    m.unmap();
  }
}

/**
 * A UDP socket on 127.0.0.1 with `payload` already queued on it (sent to itself), for the socket
 * URING_CMDs, which need a protocol with an ioctl hook (UDP/TCP have one, AF_UNIX does not).
 */
export function udpSocketWithPending(payload: Buffer): number {
  const fd = check(socket_(AF_INET, SOCK_DGRAM, 0), 'socket');
  const m = Mapping.anonymous(4096);
  try {
    const v = m.view;
    // struct sockaddr_in { sa_family_t (u16); in_port_t (be16); struct in_addr (be32); zero[8] }
    v.setUint16(0, AF_INET, true);
    v.setUint16(2, 0, false);
    v.setUint32(4, 0x7f000001, false);
    check(bind_(fd, m.address, 16), 'bind');
    v.setUint32(64, 16, true);
    check(getsockname_(fd, m.address, m.address + 64), 'getsockname');
    payload.copy(m.bytes(128, payload.length));
    check(sendto_(fd, m.address + 128, payload.length, 0, m.address, 16), 'sendto');
    return fd;
  } finally {
    m.unmap();
  }
}
