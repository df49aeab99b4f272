/**
 * Provided buffer rings (IORING_REGISTER_PBUF_RING, 5.19): memory the application lends the
 * kernel ahead of time, for operations that pick their buffer when data arrives instead of
 * naming one in the SQE (IOSQE_BUFFER_SELECT with sqe->buf_group). Multishot operations need
 * them: one SQE, many CQEs, each with its data in a buffer the kernel took from the group.
 *
 * The ring is an array of `struct io_uring_buf {addr, len, bid}` in memory we mmapped (page
 * aligned, as the kernel requires), whose 16-bit tail overlays entry 0's `resv` field. The
 * protocol is the SQ's: fill entries past the tail, then publish the new tail with a release
 * store (liburing's io_uring_buf_ring_add / io_uring_buf_ring_advance); the kernel consumes
 * from its private head and reports the buffer id in `cqe->flags >> IORING_CQE_BUFFER_SHIFT`.
 *
 * With IOU_PBUF_RING_INC (6.12) a buffer is consumed a piece at a time: each CQE takes only
 * the bytes it filled, the kernel moves the entry's addr and len past them, and
 * IORING_CQE_F_BUF_MORE says the buffer still has room and stays at the head. So consecutive
 * CQEs' data lie one after the other in the same buffer, and only the CQE without BUF_MORE
 * hands the buffer back.
 */
import { Mapping, sys, libc, SysError, withScratch } from '../libc/index.js';
import type { IoUring } from './ring.js';
import { io_uring_buf, io_uring_buf_reg, io_uring_buf_ring, IORING_REGISTER_PBUF_RING, IORING_UNREGISTER_PBUF_RING } from './abi.js';

/**
 * One registered buffer group: `entries` ring slots in a page of our own. liburing's
 * `io_uring_setup_buf_ring` / `io_uring_free_buf_ring`, with the ring's add and advance as
 * methods.
 */
export class BufRing {
  /** The group id SQEs name in sqe->buf_group. */
  readonly bgid: number;
  readonly entries: number;
  private readonly mem: Mapping;
  private readonly view: DataView;
  /** The tail, as a u16 element index into `tail16` (Atomics needs a typed array). */
  private readonly tail16: Uint16Array;
  private readonly tailIndex = io_uring_buf_ring.tail / 2;
  /** Our copy of the tail: entries added since the last advance() are not yet visible. */
  private localTail = 0;
  private registered = false;

  /**
   * Registers group `bgid` on `ring` with `entries` slots (a power of two, at most 32768) and
   * IOU_PBUF_RING_* `flags`. liburing: io_uring_setup_buf_ring().
   */
  constructor(private readonly ring: IoUring, bgid: number, entries: number, flags = 0) {
    if (!Number.isInteger(entries) || entries < 1 || entries > 32768 || (entries & (entries - 1)) !== 0) {
      throw new RangeError(`a buffer ring needs a power-of-two entry count up to 32768, got ${entries}`);
    }
    this.bgid = bgid;
    this.entries = entries;
    this.mem = Mapping.anonymous(entries * io_uring_buf.SIZE);
    this.view = this.mem.view;
    this.tail16 = new Uint16Array(this.mem.buffer);
    try {
      withScratch(io_uring_buf_reg.SIZE, (m) => {
        const v = m.view;
        v.setBigUint64(io_uring_buf_reg.ring_addr, BigInt(this.mem.address), true);
        v.setUint32(io_uring_buf_reg.ring_entries, entries, true);
        v.setUint16(io_uring_buf_reg.bgid, bgid, true);
        v.setUint16(io_uring_buf_reg.flags, flags, true);
        const ret = sys.ioUringRegister(ring.fd, IORING_REGISTER_PBUF_RING, m.address, 1);
        if (ret < 0) {
          throw new SysError(-ret, `io_uring_register(REGISTER_PBUF_RING, bgid=${bgid}, entries=${entries}, flags=${flags})`,
            -ret === libc.EINVAL ? 'the kernel is too old for buffer rings (5.19) or for these flags (IOU_PBUF_RING_INC: 6.12)' : undefined);
        }
      });
    } catch (e) {
      this.mem.unmap();
      throw e;
    }
    this.registered = true;
  }

  /**
   * Puts buffer `bid` (`len` bytes at `addr`) in the slot `offset` places past the tail, not
   * yet visible to the kernel. liburing: io_uring_buf_ring_add().
   */
  add(addr: number, len: number, bid: number, offset = 0): void {
    const at = ((this.localTail + offset) & (this.entries - 1)) * io_uring_buf.SIZE;
    const v = this.view;
    v.setBigUint64(at + io_uring_buf.addr, BigInt(addr), true);
    v.setUint32(at + io_uring_buf.len, len, true);
    v.setUint16(at + io_uring_buf.bid, bid, true);
  }

  /**
   * Publishes `count` added buffers: the entries were written first, the tail is stored after
   * them (a sequentially consistent store, at least a release). liburing: io_uring_buf_ring_advance().
   */
  advance(count: number): void {
    this.localTail = (this.localTail + count) & 0xffff;
    Atomics.store(this.tail16, this.tailIndex, this.localTail);
  }

  /** The published tail (for tests). */
  get tail(): number {
    return Atomics.load(this.tail16, this.tailIndex);
  }

  /** Slot i's entry as the kernel left it (with IOU_PBUF_RING_INC it moves addr and len). */
  entry(i: number): { addr: number; len: number; bid: number } {
    const at = (i & (this.entries - 1)) * io_uring_buf.SIZE;
    const v = this.view;
    return { addr: Number(v.getBigUint64(at + io_uring_buf.addr, true)), len: v.getUint32(at + io_uring_buf.len, true), bid: v.getUint16(at + io_uring_buf.bid, true) };
  }

  /**
   * Unregisters the group and unmaps the ring. Only when no SQE that selects from it is still in
   * flight: the kernel stops reading the ring at unregister, but the buffers themselves belong
   * to the caller, who keeps them until those SQEs completed. liburing: io_uring_free_buf_ring().
   */
  free(): void {
    if (this.registered) {
      this.registered = false;
      withScratch(io_uring_buf_reg.SIZE, (m) => {
        m.view.setUint16(io_uring_buf_reg.bgid, this.bgid, true);
        // A ring already closed has dropped the group with everything else: nothing to undo.
        const ret = this.ring.isClosed ? 0 : sys.ioUringRegister(this.ring.fd, IORING_UNREGISTER_PBUF_RING, m.address, 1);
        if (ret < 0) throw new SysError(-ret, `io_uring_register(UNREGISTER_PBUF_RING, bgid=${this.bgid})`);
      });
    }
    if (this.mem.mapped) this.mem.unmap();
  }
}
