/**
 * An io_uring instance: setup, the submission and completion rings, and the enter loop.
 *
 * This is the TypeScript twin of liburing's `struct io_uring` plus `setup.c`/`queue.c`, and of
 * Zig's `std.os.linux.IoUring`. The shared-memory protocol follows `io_uring(7)` and liburing's
 * `barrier.h`:
 *
 * - We own the SQ tail and the CQ head; the kernel owns the SQ head and the CQ tail.
 * - SQE contents are written first, then the SQ tail is published with a release store
 *   (`Atomics.store`, sequentially consistent in V8, which is at least release).
 * - The CQ tail is read with an acquire load (`Atomics.load`) before any CQE in [head, tail)
 *   is read, and the CQ head is released (`Atomics.store`) only after those CQEs were copied
 *   out, so the kernel cannot overwrite an entry we are still reading.
 * - With SQPOLL, storing the tail and then loading the SQ flags is a store->load pair that
 *   acquire/release does not order (liburing #541); two SC Atomics operations are ordered.
 * - Counters are free-running u32 values: every difference is taken `>>> 0` so they wrap at
 *   2^32 exactly like the kernel's, and slots are found with `& mask`.
 *
 * One thread owns a ring: the one that created it submits and waits (SINGLE_ISSUER makes the
 * kernel enforce it with -EEXIST; DEFER_TASKRUN runs completion work only for that thread).
 * Never call `enter` through koffi's `.async`: it would run on a libuv pool thread.
 */
import { readFileSync } from 'node:fs';
import { Mapping, SysError, sys, libc, withScratch } from '../libc/index.js';
import { getU64 } from './prep.js';
import type { RingTracer } from './trace.js';
import {
  io_uring_params, io_sqring_offsets, io_cqring_offsets, io_uring_rsrc_update,
  io_uring_getevents_arg, __kernel_timespec, IORING_SETUP_SQPOLL, IORING_SETUP_SQ_AFF,
  IORING_SETUP_CQSIZE, IORING_SETUP_IOPOLL, IORING_SETUP_SQE128, IORING_SETUP_CQE32,
  IORING_SETUP_NO_SQARRAY, IORING_SETUP_DEFER_TASKRUN, IORING_SETUP_NO_MMAP, IORING_SETUP_CLAMP,
  IORING_SETUP_SUBMIT_ALL, IORING_SETUP_COOP_TASKRUN, IORING_SETUP_TASKRUN_FLAG,
  IORING_SETUP_SINGLE_ISSUER, IORING_SETUP_R_DISABLED, IORING_FEAT_SINGLE_MMAP,
  IORING_FEAT_EXT_ARG, IORING_FEAT_NAMES, IORING_OFF_SQ_RING, IORING_OFF_CQ_RING, IORING_OFF_SQES,
  IORING_SQ_NEED_WAKEUP, IORING_SQ_CQ_OVERFLOW, IORING_SQ_TASKRUN, IORING_ENTER_GETEVENTS,
  IORING_ENTER_SQ_WAKEUP, IORING_ENTER_EXT_ARG, IORING_ENTER_REGISTERED_RING,
  IORING_REGISTER_RING_FDS, IORING_UNREGISTER_RING_FDS,
} from './abi.js';

const SETUP_FLAG_NAMES: Record<number, string> = {
  [IORING_SETUP_IOPOLL]: 'IOPOLL', [IORING_SETUP_SQPOLL]: 'SQPOLL', [IORING_SETUP_SQ_AFF]: 'SQ_AFF',
  [IORING_SETUP_CQSIZE]: 'CQSIZE', [IORING_SETUP_CLAMP]: 'CLAMP', [IORING_SETUP_R_DISABLED]: 'R_DISABLED',
  [IORING_SETUP_SUBMIT_ALL]: 'SUBMIT_ALL (5.18)', [IORING_SETUP_COOP_TASKRUN]: 'COOP_TASKRUN (5.19)',
  [IORING_SETUP_TASKRUN_FLAG]: 'TASKRUN_FLAG (5.19)', [IORING_SETUP_SQE128]: 'SQE128 (5.19)',
  [IORING_SETUP_CQE32]: 'CQE32 (5.19)', [IORING_SETUP_SINGLE_ISSUER]: 'SINGLE_ISSUER (6.0)',
  [IORING_SETUP_DEFER_TASKRUN]: 'DEFER_TASKRUN (6.1)', [IORING_SETUP_NO_MMAP]: 'NO_MMAP (6.5)',
  [IORING_SETUP_NO_SQARRAY]: 'NO_SQARRAY (6.6)',
};

/** Names the IORING_SETUP_* bits in `flags`, for messages. */
export function setupFlagNames(flags: number): string[] {
  const out: string[] = [];
  for (let bit = 0; bit < 31; bit++) {
    const f = 1 << bit;
    if (flags & f) out.push(SETUP_FLAG_NAMES[f] ?? `bit ${bit}`);
  }
  return out;
}

export interface RingOptions {
  /** IORING_SETUP_* flags. NO_SQARRAY is tried by default and dropped on EINVAL (like liburing). */
  flags?: number;
  /** CQ ring size (sets IORING_SETUP_CQSIZE); the kernel's default is twice the SQ size. */
  cqEntries?: number;
  /** SQPOLL idle time before the kernel thread sleeps, in ms. */
  sqThreadIdle?: number;
  /** SQPOLL CPU (sets IORING_SETUP_SQ_AFF). */
  sqThreadCpu?: number;
  /** Try IORING_SETUP_NO_SQARRAY first (default true). */
  noSqArray?: boolean;
  /**
   * Register the ring fd with the creating thread (IORING_REGISTER_RING_FDS, 5.18) so every
   * enter skips the fd-table lookup. Default true. Node is always multi-threaded, and in a
   * multi-threaded process each fdget() of the ring takes an atomic reference: measured ~15%
   * of a one-NOP round trip. Silently skipped where the kernel lacks it.
   */
  registerRingFd?: boolean;
}


/**
 * Why an io_uring_setup failed, in words that name the fix: the memlock limit, a disabled or
 * filtered io_uring, or a flag the kernel is too old for.
 */
function setupHint(errno: number, flags: number): string | undefined {
  if (errno === libc.ENOMEM) {
    return 'the ring could not be allocated; on kernels before 5.12 rings count against RLIMIT_MEMLOCK (raise it with `ulimit -l`)';
  }
  if (errno === libc.EPERM) {
    let sysctl = '';
    try {
      sysctl = readFileSync('/proc/sys/kernel/io_uring_disabled', 'utf8').trim();
    } catch { /* older kernel: no such sysctl */ }
    if (sysctl === '2') return 'io_uring is disabled by sysctl kernel.io_uring_disabled=2';
    if (sysctl === '1') return 'io_uring is limited to the io_uring_group by sysctl kernel.io_uring_disabled=1';
    if (flags & IORING_SETUP_SQPOLL) return 'SQPOLL needs CAP_SYS_NICE on kernels before 5.11';
    return 'io_uring is blocked for this process (a seccomp filter, e.g. a container runtime\'s default profile)';
  }
  if (errno === libc.ENOSYS) return 'this kernel has no io_uring (CONFIG_IO_URING=n or older than 5.1)';
  if (errno === libc.EINVAL) {
    return `the kernel rejected the setup flags [${setupFlagNames(flags).join(', ')}]; a flag newer than the running kernel is the usual cause`;
  }
  return undefined;
}

export class IoUring {
  /** The ring's file descriptor. */
  readonly fd: number;
  /** The IORING_SETUP_* flags the ring was created with (after any fall-back). */
  readonly flags: number;
  /** IORING_FEAT_* reported by the kernel. */
  readonly features: number;
  readonly sqEntries: number;
  readonly cqEntries: number;
  /** The kernel task that created the ring: the only one allowed to submit with SINGLE_ISSUER. */
  readonly ownerTid: number;

  /** The SQE array as u32 words: the `s` argument of every prep function. */
  readonly sqes: Uint32Array;
  /** u32 words per SQE: 16, or 32 with SQE128. */
  readonly sqeWords: number;
  /** Command payload words of a URING_CMD on this ring: 4 (16 bytes), or 20 (80 bytes) with SQE128. */
  readonly cmdWords: number;
  /** u32 words per CQE: 4, or 8 with CQE32. */
  readonly cqeWords: number;
  /** The CQ ring as u32 words (CQEs are read from here at the indexes peek returns). */
  readonly cq: Uint32Array;
  /** Word index in {@link cq} of CQE slot 0; slot i starts at `cqeBase + i * cqeWords`. */
  readonly cqeBase: number;

  private readonly sq: Uint32Array;
  private readonly sqHead: number;
  private readonly sqTail: number;
  private readonly sqFlags: number;
  private readonly sqDropped: number;
  private readonly sqMask: number;
  private readonly sqeShift: number;
  private readonly cqHead: number;
  private readonly cqTail: number;
  private readonly cqOverflow: number;
  private readonly cqMask: number;
  private readonly cqeShift: number;

  /** Next SQE slot to hand out (liburing's sqe_tail). */
  private sqeTail = 0;
  /** First handed-out slot not yet published to the kernel (liburing's sqe_head). */
  private sqeHead = 0;
  /** Last SQ head we read from the kernel: saves a shared load per getSqe. */
  private cachedSqHead = 0;
  /** Our copy of the CQ head: only we write it, so we never need to read it back. */
  private localCqHead = 0;

  private enterFd: number;
  private enterFlags = 0;
  private registeredIndex = -1;
  private readonly sqpoll: boolean;
  private readonly iopoll: boolean;

  private readonly ringMap: Mapping;
  private readonly cqMap: Mapping | null;
  private readonly sqeMap: Mapping;
  /** A page for small kernel-read arguments (getevents arg, timespec). */
  private readonly scratch: Mapping;
  private closed = false;
  /**
   * A live trace of this ring (trace.ts): told of every SQE as it is published and every CQE as
   * it is handed back. Null (the default) costs a comparison in flushSq and cqAdvance.
   */
  tracer: RingTracer | null = null;
  /** cqeAt as a function value, made once, for the tracer. */
  private readonly cqeAtFn = (i: number) => this.cqeAt(i);

  /**
   * `io_uring_queue_init_params`: creates a ring with `entries` SQEs (a power of two, 1..32768).
   */
  constructor(entries: number, opts: RingOptions = {}) {
    if (!Number.isInteger(entries) || entries < 1 || entries > 32768 || (entries & (entries - 1)) !== 0) {
      throw new RangeError(`ring entries must be a power of two from 1 to 32768, got ${entries}`);
    }
    const scratch = Mapping.anonymous(4096);
    this.scratch = scratch;
    let flags = opts.flags ?? 0;
    if (opts.cqEntries !== undefined) flags |= IORING_SETUP_CQSIZE;
    if (opts.sqThreadCpu !== undefined) flags |= IORING_SETUP_SQ_AFF;
    if (opts.noSqArray !== false) flags |= IORING_SETUP_NO_SQARRAY;

    const p = scratch.u32;
    const P = (off: number) => off >>> 2;
    let fd: number;
    for (;;) {
      p.fill(0, 0, io_uring_params.SIZE >>> 2);
      p[P(io_uring_params.flags)] = flags;
      if (opts.cqEntries !== undefined) p[P(io_uring_params.cq_entries)] = opts.cqEntries;
      if (opts.sqThreadIdle !== undefined) p[P(io_uring_params.sq_thread_idle)] = opts.sqThreadIdle;
      if (opts.sqThreadCpu !== undefined) p[P(io_uring_params.sq_thread_cpu)] = opts.sqThreadCpu;
      try {
        fd = sys.ioUringSetup(entries, scratch.address);
        break;
      } catch (e) {
        // NO_SQARRAY arrived in 6.6; older kernels say EINVAL. liburing retries without it.
        if (e instanceof SysError && e.code === 'EINVAL' && (flags & IORING_SETUP_NO_SQARRAY) && opts.noSqArray !== true) {
          flags &= ~IORING_SETUP_NO_SQARRAY;
          continue;
        }
        scratch.unmap();
        if (e instanceof SysError) {
          throw new SysError(e.errno, `io_uring_setup(entries=${entries}, flags=[${setupFlagNames(flags).join('|')}])`, setupHint(e.errno, flags));
        }
        throw e;
      }
    }
    this.fd = fd;
    this.enterFd = fd;
    this.flags = flags;
    this.ownerTid = sys.gettid();
    this.sqpoll = (flags & IORING_SETUP_SQPOLL) !== 0;
    this.iopoll = (flags & IORING_SETUP_IOPOLL) !== 0;
    this.features = p[P(io_uring_params.features)]!;
    this.sqEntries = p[P(io_uring_params.sq_entries)]!;
    this.cqEntries = p[P(io_uring_params.cq_entries)]!;
    const so = (f: number) => p[P(io_uring_params.sq_off + f)]!;
    const co = (f: number) => p[P(io_uring_params.cq_off + f)]!;

    const sqeSize = flags & IORING_SETUP_SQE128 ? 128 : 64;
    const cqeSize = flags & IORING_SETUP_CQE32 ? 32 : 16;
    this.sqeWords = sqeSize >>> 2;
    this.sqeShift = sqeSize === 128 ? 5 : 4;
    this.cmdWords = sqeSize === 128 ? 20 : 4;
    this.cqeWords = cqeSize >>> 2;
    this.cqeShift = cqeSize === 32 ? 3 : 2;

    // With NO_SQARRAY the kernel reports array = 0 and the SQ ring is just its header; the
    // single mapping is sized by the larger CQ ring anyway.
    const sqRingSize = so(io_sqring_offsets.array) + this.sqEntries * 4;
    const cqRingSize = co(io_cqring_offsets.cqes) + this.cqEntries * cqeSize;
    let ringMap: Mapping | undefined;
    let cqMap: Mapping | null = null;
    let sqeMap: Mapping | undefined;
    try {
      if (this.features & IORING_FEAT_SINGLE_MMAP) {
        // 5.4+: one mapping covers both rings.
        ringMap = Mapping.file(fd, Math.max(sqRingSize, cqRingSize), IORING_OFF_SQ_RING);
      } else {
        ringMap = Mapping.file(fd, sqRingSize, IORING_OFF_SQ_RING);
        cqMap = Mapping.file(fd, cqRingSize, IORING_OFF_CQ_RING);
      }
      sqeMap = Mapping.file(fd, this.sqEntries * sqeSize, IORING_OFF_SQES);
    } catch (e) {
      ringMap?.unmap();
      cqMap?.unmap();
      sys.close(fd);
      scratch.unmap();
      throw e;
    }
    this.ringMap = ringMap;
    this.cqMap = cqMap;
    this.sqeMap = sqeMap;
    this.sq = ringMap.u32;
    this.cq = (cqMap ?? ringMap).u32;
    this.sqes = sqeMap.u32;

    this.sqHead = so(io_sqring_offsets.head) >>> 2;
    this.sqTail = so(io_sqring_offsets.tail) >>> 2;
    this.sqFlags = so(io_sqring_offsets.flags) >>> 2;
    this.sqDropped = so(io_sqring_offsets.dropped) >>> 2;
    this.sqMask = this.sq[so(io_sqring_offsets.ring_mask) >>> 2]!;
    this.cqHead = co(io_cqring_offsets.head) >>> 2;
    this.cqTail = co(io_cqring_offsets.tail) >>> 2;
    this.cqOverflow = co(io_cqring_offsets.overflow) >>> 2;
    this.cqMask = this.cq[co(io_cqring_offsets.ring_mask) >>> 2]!;
    this.cqeBase = co(io_cqring_offsets.cqes) >>> 2;

    if (!(flags & IORING_SETUP_NO_SQARRAY)) {
      // The indirection array maps ring slot -> SQE index. We always use the identity, so fill it
      // once here instead of on every submission (liburing does the same since 2.2).
      const arr = so(io_sqring_offsets.array) >>> 2;
      for (let i = 0; i < this.sqEntries; i++) this.sq[arr + i] = i;
    }
    this.sqeTail = this.sqeHead = this.cachedSqHead = this.sq[this.sqHead]!;
    this.localCqHead = this.cq[this.cqHead]!;
    if (opts.registerRingFd !== false) {
      try {
        this.registerRingFd();
      } catch (e) {
        // EINVAL: kernel before 5.18. EBUSY: this thread's 16 slots are taken. Both are fine:
        // enter works with the plain fd, only a little slower.
        if (!(e instanceof SysError && (e.code === 'EINVAL' || e.code === 'EBUSY'))) {
          this.close();
          throw e;
        }
      }
    }
  }

  /** The index of the registered ring fd, or -1 if enter uses the plain fd. */
  get registeredRingIndex(): number {
    return this.registeredIndex;
  }

  /** Names of the IORING_FEAT_* bits the kernel reported. */
  featureNames(): string[] {
    return IORING_FEAT_NAMES.filter((_, bit) => this.features & (1 << bit));
  }

  // -------------------------------------------------------------------------------------------
  // Submission side
  // -------------------------------------------------------------------------------------------

  /**
   * `io_uring_get_sqe`: reserves the next SQE slot and returns its word index in {@link sqes}, or
   * -1 if all `sqEntries` slots are handed out and not yet consumed by the kernel (submit first).
   * The slot holds stale data: a prep function must write it completely.
   */
  getSqe(): number {
    const tail = this.sqeTail;
    if (((tail - this.cachedSqHead) >>> 0) >= this.sqEntries) {
      // Acquire: with SQPOLL the kernel may still be reading a slot we are about to reuse.
      this.cachedSqHead = Atomics.load(this.sq, this.sqHead);
      if (((tail - this.cachedSqHead) >>> 0) >= this.sqEntries) return -1;
    }
    this.sqeTail = (tail + 1) >>> 0;
    return (tail & this.sqMask) << this.sqeShift;
  }

  /** Like {@link getSqe} but throws instead of returning -1. */
  mustGetSqe(): number {
    const w = this.getSqe();
    if (w < 0) throw new Error('submission queue is full: submit before preparing more');
    return w;
  }

  /** SQEs handed out but not yet published (liburing `io_uring_sq_ready` counts published ones too). */
  get sqPending(): number {
    return (this.sqeTail - this.sqeHead) >>> 0;
  }

  /**
   * `io_uring_sq_ready`: entries published or pending that the kernel has not consumed, computed
   * from the kernel's real head (liburing #92: a local head desynchronises after a short submit).
   */
  sqReady(): number {
    return (this.sqeTail - Atomics.load(this.sq, this.sqHead)) >>> 0;
  }

  /** `io_uring_sq_space_left`. */
  sqSpaceLeft(): number {
    return this.sqEntries - this.sqReady();
  }

  /**
   * `__io_uring_flush_sq`: publishes every prepared SQE by moving the shared SQ tail, and
   * returns how many entries the kernel has yet to consume.
   */
  flushSq(): number {
    const tail = this.sqeTail;
    if (this.sqeHead !== tail) {
      if (this.tracer !== null) this.tracer.submitted(this.sqes, this.sqeHead, tail, this.sqMask, this.sqeShift);
      this.sqeHead = tail;
      // Release: the SQE words written above become visible before the tail that covers them.
      Atomics.store(this.sq, this.sqTail, tail);
    }
    return (tail - Atomics.load(this.sq, this.sqHead)) >>> 0;
  }

  /**
   * IORING_SQ_TASKRUN is set: the kernel queued task work (completions) that only an enter with
   * GETEVENTS runs. Raised only on rings set up with IORING_SETUP_TASKRUN_FLAG.
   */
  taskRunPending(): boolean {
    return (Atomics.load(this.sq, this.sqFlags) & IORING_SQ_TASKRUN) !== 0;
  }

  /** `cq_ring_needs_flush`: overflowed CQEs or pending task work only an enter will deliver. */
  cqNeedsFlush(): boolean {
    return (Atomics.load(this.sq, this.sqFlags) & (IORING_SQ_CQ_OVERFLOW | IORING_SQ_TASKRUN)) !== 0;
  }

  /**
   * `io_uring_submit_and_wait`: publishes prepared SQEs, enters the kernel if needed, and waits
   * for at least `waitNr` completions. Returns the number of SQEs the kernel consumed.
   *
   * Retries on EINTR. Throws {@link SysError} otherwise; `EBUSY` means the CQ ring is full
   * and the kernel's overflow list too: reap completions, then submit again (nothing was lost:
   * unconsumed SQEs stay in the ring and the next submit sends them, counted from the kernel's
   * head). `EAGAIN`: the kernel could not allocate request memory; retry after reaping.
   */
  submit(waitNr = 0): number {
    for (;;) {
      const submitted = this.flushSq();
      let flags = this.enterFlags;
      let enter = false;
      if (submitted > 0) {
        if (!this.sqpoll) {
          enter = true;
        } else if (Atomics.load(this.sq, this.sqFlags) & IORING_SQ_NEED_WAKEUP) {
          // SC store of the tail (in flushSq) then SC load of the flags: the full fence liburing
          // needs here (#541), or the poller could fall asleep right after we looked.
          flags |= IORING_ENTER_SQ_WAKEUP;
          enter = true;
        }
      }
      if (waitNr > 0 || this.iopoll || this.cqNeedsFlush()) {
        flags |= IORING_ENTER_GETEVENTS;
        enter = true;
      }
      if (!enter) return submitted;
      const ret = sys.ioUringEnter(this.enterFd, submitted, waitNr, flags);
      if (ret >= 0) return this.sqpoll ? submitted : ret;
      if (ret === -libc.EINTR) continue;
      throw this.enterError(-ret, submitted, waitNr, flags);
    }
  }

  /**
   * Waits for at least `waitNr` completions for at most `timeoutMs`, submitting anything
   * prepared on the way (`io_uring_submit_and_wait_timeout`, needs FEAT_EXT_ARG, 5.11).
   * Returns false on timeout.
   */
  submitAndWaitTimeout(waitNr: number, timeoutMs: number): boolean {
    if (!(this.features & IORING_FEAT_EXT_ARG)) {
      throw new Error('waiting with a timeout needs IORING_FEAT_EXT_ARG (Linux 5.11)');
    }
    const v = this.scratch.view;
    const argOff = 256;
    const tsOff = 512;
    v.setBigUint64(tsOff + __kernel_timespec.tv_sec, BigInt(Math.floor(timeoutMs / 1000)), true);
    v.setBigUint64(tsOff + __kernel_timespec.tv_nsec, BigInt(Math.round((timeoutMs % 1000) * 1e6)), true);
    v.setBigUint64(argOff + io_uring_getevents_arg.sigmask, 0n, true);
    v.setUint32(argOff + io_uring_getevents_arg.sigmask_sz, 8, true); // _NSIG / 8
    v.setUint32(argOff + io_uring_getevents_arg.sigmask_sz + 4, 0, true); // min_wait_usec / pad
    v.setBigUint64(argOff + io_uring_getevents_arg.ts, BigInt(this.scratch.address + tsOff), true);
    for (;;) {
      const submitted = this.flushSq();
      const flags = this.enterFlags | IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG
        | (this.sqpoll && (Atomics.load(this.sq, this.sqFlags) & IORING_SQ_NEED_WAKEUP) ? IORING_ENTER_SQ_WAKEUP : 0);
      const ret = sys.ioUringEnterArg(this.enterFd, this.sqpoll ? 0 : submitted, waitNr, flags,
        this.scratch.address + argOff, io_uring_getevents_arg.SIZE);
      if (ret >= 0) return true;
      if (ret === -libc.ETIME) return false;
      if (ret === -libc.EINTR) continue;
      throw this.enterError(-ret, submitted, waitNr, flags);
    }
  }

  private enterError(errno: number, submitted: number, waitNr: number, flags: number): SysError {
    let hint: string | undefined;
    if (errno === libc.EBUSY) hint = 'the completion queue is full: reap completions, then submit again';
    else if (errno === libc.EAGAIN) hint = 'the kernel could not allocate requests now: reap completions and retry';
    else if (errno === libc.EEXIST) hint = `a SINGLE_ISSUER ring used from task ${sys.gettid()}, but task ${this.ownerTid} created it`;
    return new SysError(errno, `io_uring_enter(fd=${this.fd}, to_submit=${submitted}, min_complete=${waitNr}, flags=0x${flags.toString(16)})`, hint);
  }

  /** Entries the kernel dropped as invalid (sq_ring->dropped; always 0 on kernels with NODROP semantics for valid SQEs). */
  get sqDroppedCount(): number {
    return Atomics.load(this.sq, this.sqDropped);
  }

  /** The kernel's SQ head and our published SQ tail, for tests and debugging. */
  sqState(): { head: number; tail: number; pending: number; flags: number } {
    return {
      head: Atomics.load(this.sq, this.sqHead),
      tail: Atomics.load(this.sq, this.sqTail),
      pending: this.sqPending,
      flags: Atomics.load(this.sq, this.sqFlags),
    };
  }

  /** The CQ head, the kernel's CQ tail and the overflow counter, for tests and debugging. */
  cqState(): { head: number; tail: number; overflow: number } {
    return {
      head: Atomics.load(this.cq, this.cqHead),
      tail: Atomics.load(this.cq, this.cqTail),
      overflow: Atomics.load(this.cq, this.cqOverflow),
    };
  }

  // -------------------------------------------------------------------------------------------
  // Completion side
  // -------------------------------------------------------------------------------------------

  /** `io_uring_cq_ready`: completions posted and not yet consumed. */
  cqReady(): number {
    return (Atomics.load(this.cq, this.cqTail) - this.localCqHead) >>> 0;
  }

  /**
   * `io_uring_peek_cqe`: the word index in {@link cq} of the oldest unconsumed CQE, or -1.
   * If none is posted but the kernel holds overflowed CQEs or deferred task work, enters once
   * (without waiting) to flush them. Read it with {@link cqeRes} etc., then {@link cqAdvance}.
   */
  peekCqe(): number {
    if (this.cqReady() === 0) {
      if (!this.cqNeedsFlush()) return -1;
      this.getEvents(0);
      if (this.cqReady() === 0) return -1;
    }
    return this.cqeBase + ((this.localCqHead & this.cqMask) << this.cqeShift);
  }

  /**
   * `io_uring_wait_cqe_nr`: returns the word index of the oldest CQE, entering the kernel to wait
   * for `waitNr` completions (default 1) if fewer are posted.
   */
  waitCqe(waitNr = 1): number {
    for (;;) {
      if (this.cqReady() >= waitNr) return this.cqeBase + ((this.localCqHead & this.cqMask) << this.cqeShift);
      this.submit(waitNr);
    }
  }

  /** The word index of the `i`-th unconsumed CQE (i < cqReady()). */
  cqeAt(i: number): number {
    return this.cqeBase + (((this.localCqHead + i) & this.cqMask) << this.cqeShift);
  }

  /** user_data of the CQE at word `c`, as a number (exact when it was set below 2^53). */
  cqeUserData(c: number): number {
    return getU64(this.cq, c);
  }

  /** Low 32 bits of user_data. */
  cqeUserDataLo(c: number): number {
    return this.cq[c]!;
  }

  /** High 32 bits of user_data. */
  cqeUserDataHi(c: number): number {
    return this.cq[c + 1]!;
  }

  /** `cqe->res`: the operation's result, a negative errno on failure. */
  cqeRes(c: number): number {
    return this.cq[c + 2]! | 0;
  }

  /** `cqe->flags` (IORING_CQE_F_*). */
  cqeFlags(c: number): number {
    return this.cq[c + 3]!;
  }

  /**
   * `io_uring_cq_advance`: marks `n` CQEs consumed. Release store: the kernel may reuse the
   * slots only after we are done reading them.
   */
  cqAdvance(n: number): void {
    if (n === 0) return;
    if (this.tracer !== null) this.tracer.completed(this.cq, n, this.cqeAtFn);
    this.localCqHead = (this.localCqHead + n) >>> 0;
    Atomics.store(this.cq, this.cqHead, this.localCqHead);
  }

  /**
   * Zig's `copy_cqes` / liburing's `io_uring_peek_batch_cqe` + advance: copies up to
   * `out.length / cqeWords` completions into `out` (per CQE: user_data lo, user_data hi, res,
   * flags, then the CQE32 extra words) and advances the head once for all of them. If none is
   * ready, first waits for `waitNr` (0: only flush overflow/task work). Returns the count.
   */
  copyCqes(out: Uint32Array, waitNr = 0): number {
    let n = this.copyReady(out);
    if (n > 0) return n;
    if (waitNr > 0 || this.iopoll || this.cqNeedsFlush()) {
      this.getEvents(waitNr);
      n = this.copyReady(out);
    }
    return n;
  }

  private copyReady(out: Uint32Array): number {
    const words = this.cqeWords;
    const max = (out.length / words) | 0;
    const ready = (Atomics.load(this.cq, this.cqTail) - this.localCqHead) >>> 0;
    const n = ready < max ? ready : max;
    if (n === 0) return 0;
    if (this.tracer !== null) this.tracer.completed(this.cq, n, this.cqeAtFn);
    const cq = this.cq;
    const base = this.cqeBase;
    const mask = this.cqMask;
    const shift = this.cqeShift;
    let head = this.localCqHead;
    for (let i = 0, o = 0; i < n; i++, o += words) {
      const c = base + ((head & mask) << shift);
      out[o] = cq[c]!;
      out[o + 1] = cq[c + 1]!;
      out[o + 2] = cq[c + 2]!;
      out[o + 3] = cq[c + 3]!;
      if (words === 8) {
        out[o + 4] = cq[c + 4]!;
        out[o + 5] = cq[c + 5]!;
        out[o + 6] = cq[c + 6]!;
        out[o + 7] = cq[c + 7]!;
      }
      head = (head + 1) >>> 0;
    }
    this.localCqHead = head;
    Atomics.store(cq, this.cqHead, head);
    return n;
  }

  /**
   * `io_uring_get_events` / a bare `io_uring_enter(GETEVENTS)`: runs pending task work and
   * flushes overflowed CQEs, waiting for `waitNr` completions. Submits nothing new.
   */
  getEvents(waitNr = 0): void {
    for (;;) {
      const ret = sys.ioUringEnter(this.enterFd, 0, waitNr, this.enterFlags | IORING_ENTER_GETEVENTS);
      if (ret >= 0) return;
      if (ret === -libc.EINTR) continue;
      throw this.enterError(-ret, 0, waitNr, IORING_ENTER_GETEVENTS);
    }
  }

  // -------------------------------------------------------------------------------------------
  // The ring fd's own registration (the rest of io_uring_register(2) is in register.ts)
  // -------------------------------------------------------------------------------------------

  /**
   * `io_uring_register_ring_fd`: registers the ring's own fd so io_uring_enter skips the fd
   * table lookup (5.18). Every later enter passes the index with IORING_ENTER_REGISTERED_RING.
   * Returns the index.
   */
  registerRingFd(): number {
    if (this.registeredIndex >= 0) return this.registeredIndex;
    return withScratch(io_uring_rsrc_update.SIZE, (m) => {
      const v = m.view;
      v.setUint32(io_uring_rsrc_update.offset, 0xffffffff, true); // -1: let the kernel pick a slot
      v.setBigUint64(io_uring_rsrc_update.data, BigInt(this.fd), true);
      this.registerRingFds(IORING_REGISTER_RING_FDS, m.address, 'REGISTER_RING_FDS');
      this.registeredIndex = v.getUint32(io_uring_rsrc_update.offset, true);
      this.enterFd = this.registeredIndex;
      this.enterFlags |= IORING_ENTER_REGISTERED_RING;
      return this.registeredIndex;
    });
  }

  private registerRingFds(opcode: number, arg: number, what: string): void {
    const ret = sys.ioUringRegister(this.fd, opcode, arg, 1);
    if (ret < 0) throw new SysError(-ret, `io_uring_register(${what})`);
  }

  /** `io_uring_unregister_ring_fd`. */
  unregisterRingFd(): void {
    if (this.registeredIndex < 0) return;
    withScratch(io_uring_rsrc_update.SIZE, (m) => {
      const v = m.view;
      v.setUint32(io_uring_rsrc_update.offset, this.registeredIndex, true);
      this.registerRingFds(IORING_UNREGISTER_RING_FDS, m.address, 'UNREGISTER_RING_FDS');
    });
    this.registeredIndex = -1;
    this.enterFd = this.fd;
    this.enterFlags &= ~IORING_ENTER_REGISTERED_RING;
  }

  // -------------------------------------------------------------------------------------------
  // Teardown
  // -------------------------------------------------------------------------------------------

  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * `io_uring_queue_exit`: unmaps the SQEs and rings and closes the fd.
   *
   * What this does NOT do is wait for requests still in flight. Closing the fd only starts the
   * ring's teardown (io_ring_exit_work, on a kworker): requests an io-wq worker is executing (a
   * buffered read, anything punted or issued with IOSQE_ASYNC) and block I/O already submitted
   * (an O_DIRECT read's bio) run to completion afterwards, and keep reading and writing the
   * memory their SQEs named, in this process's address space, for as long as that takes
   * (measured: a 256 MiB buffered read wrote into its buffer 1.5 s after close returned).
   *
   * So after close() it is safe to free memory only if no SQE naming it can still be in flight:
   * reap every such request's CQE first (cancel it with ASYNC_CANCEL and wait for its CQE; a
   * cancelled request still posts one). Memory whose requests could not be reaped must stay
   * mapped until the process exits. Memory only the ring itself used (its SQE array, rings and
   * the argument page) is unmapped here, which is safe: the kernel keeps its own reference to
   * those pages.
   */
  close(): void {
    if (this.closed) return;
    // A registered ring fd lives in this task's io_uring context and holds a file reference:
    // without unregistering, closing our fd would leave the ring alive until the thread exits
    // (and after 16 such leaks REGISTER_RING_FDS says EBUSY).
    if (this.registeredIndex >= 0) {
      try {
        this.unregisterRingFd();
      } catch {
        // Only the registering thread can unregister; from elsewhere the entry goes away when
        // that thread exits. Closing must still release everything else.
      }
    }
    this.closed = true;
    this.sqeMap.unmap();
    this.cqMap?.unmap();
    this.ringMap.unmap();
    sys.close(this.fd);
    this.scratch.unmap();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

