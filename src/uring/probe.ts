/**
 * The opcode probe (IORING_REGISTER_PROBE, 5.6): which IORING_OP_* the running kernel supports.
 */
import { SysError, sys, libc, withScratch } from '../libc/index.js';
import type { IoUring } from './ring.js';
import { io_uring_probe, io_uring_probe_op, IORING_REGISTER_PROBE, IO_URING_OP_SUPPORTED, IORING_OP_NAMES } from './abi.js';

/** The result of `IORING_REGISTER_PROBE`: which opcodes the running kernel supports. */
export class Probe {
  constructor(readonly lastOp: number, private readonly supported: Uint8Array) {}
  /** True if the kernel knows `op` (an IORING_OP_* value). */
  supports(op: number): boolean {
    return op < this.supported.length && this.supported[op] === 1;
  }
  /** Names of the supported opcodes this module knows. */
  names(): string[] {
    const out: string[] = [];
    for (let op = 0; op < this.supported.length; op++) {
      if (this.supported[op]) out.push(IORING_OP_NAMES[op] ?? `op ${op}`);
    }
    return out;
  }
}

/** `io_uring_get_probe_ring`: asks the kernel which opcodes it supports. */
export function probe(ring: IoUring): Probe {
  const nOps = 256;
  return withScratch(io_uring_probe.SIZE + nOps * io_uring_probe_op.SIZE, (m) => {
    m.u8.fill(0, 0, io_uring_probe.SIZE + nOps * io_uring_probe_op.SIZE);
    const ret = sys.ioUringRegister(ring.fd, IORING_REGISTER_PROBE, m.address, nOps);
    if (ret < 0) throw new SysError(-ret, 'io_uring_register(REGISTER_PROBE)', -ret === libc.EINVAL ? 'the kernel has no opcode probe (Linux 5.6+)' : undefined);
    const u8 = m.u8;
    const lastOp = u8[io_uring_probe.last_op]!;
    const opsLen = u8[io_uring_probe.ops_len]!;
    const supported = new Uint8Array(opsLen);
    for (let i = 0; i < opsLen; i++) {
      const o = io_uring_probe.ops + i * io_uring_probe_op.SIZE;
      const flags = m.view.getUint16(o + io_uring_probe_op.flags, true);
      supported[u8[o + io_uring_probe_op.op]!] = flags & IO_URING_OP_SUPPORTED ? 1 : 0;
    }
    return new Probe(lastOp, supported);
  });
}
