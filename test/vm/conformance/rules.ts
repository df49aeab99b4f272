/**
 * The ublk protocol conformance catalogue: each rule a sentence about what ublk_drv does, the
 * place in the kernel's source it comes from, and a small check against the running kernel,
 * written with the rawest pieces we have (UblkControl's commands, a queue served by hand in
 * hand-queue.ts), not with our queue engine, so that a rule tests the kernel and not our server.
 * `npm run conformance` runs every rule on every kernel of the matrix (scripts/conformance.mjs)
 * and writes docs/conformance.md.
 *
 * A check throws, saying what it saw, when the kernel breaks the rule, and may return a note
 * (what it measured) for the table. `since` or `needs` mark a rule about a command or flag
 * younger than some kernels of the matrix: reported n/a there.
 */
import { closeSync, openSync, readFileSync, readSync, readdirSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { Mapping, PAGE_SIZE, SysError, libc } from '../../../src/uring/index.js';
import { UblkControl, UblkError } from '../../../src/ublk/control.js';
import type { DevInfo, DevParams } from '../../../src/ublk/params.js';
import {
  UBLK_U_IO_COMMIT_AND_FETCH_REQ, UBLK_IO_RES_ABORT, UBLK_PARAM_TYPE_BASIC, UBLK_PARAM_TYPE_DISCARD, UBLK_PARAM_TYPE_DEVT, UBLK_FEATURES, UBLK_MAX_QUEUE_DEPTH,
  UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_F_USER_COPY, UBLK_F_NEED_GET_DATA, UBLK_F_UPDATE_SIZE, UBLK_F_USER_RECOVERY,
  UBLK_F_ZONED, UBLK_F_QUIESCE, UBLK_F_USER_RECOVERY_REISSUE, UBLK_F_USER_RECOVERY_FAIL_IO, UBLK_F_UNPRIVILEGED_DEV, UBLK_F_INTEGRITY, UBLK_F_AUTO_BUF_REG, UBLK_F_BUF_REG_OFF_DAEMON,
  UBLK_F_SUPPORT_ZERO_COPY, UBLK_U_IO_REGISTER_IO_BUF, UBLK_U_IO_UNREGISTER_IO_BUF,
  descLength, descOffset, userCopyOffset,
} from '../../../src/ublk/abi.js';
import {
  HandQueue, MAX_IO, closeAll, fullLength, openChar, otherResult, serveUntil, serveWhile, stopServing, type Answer,
  type HandQueueOptions,
} from './hand-queue.js';
import { spawnCollecting } from '../helpers.js';

export interface Rule {
  id: string;
  /** The rule, as a sentence. */
  rule: string;
  /** Where the kernel says so. */
  source: string;
  /** The first kernel (major.minor) the rule can hold on; older ones are n/a. */
  since?: string;
  /** A UBLK_F_* flag the rule is about; kernels whose GET_FEATURES lacks it are n/a. */
  needs?: number;
  /** Throws if the kernel breaks the rule; may return what it measured, for the table. */
  check(): Promise<string | void>;
}

/** The device every rule uses: 1 MiB, 512-byte sectors, requests up to MAX_IO. */
const SECTORS = 2048;
/** The sector of the rules' own requests: 512 KiB in, clear of the partition scan's reads. */
const OUR_SECTOR = 1024;

function basicParams(sectors = SECTORS): DevParams {
  return {
    types: UBLK_PARAM_TYPE_BASIC,
    basic: { attrs: 0, logicalBsShift: 9, physicalBsShift: 12, ioOptShift: 12, ioMinShift: 9, maxSectors: MAX_IO >> 9, chunkSectors: 0, devSectors: sectors, virtBoundaryMask: 0 },
  };
}

/** A device added (not started) for the duration of `fn`, deleted after whatever happens. */
async function withDevice<T>(info: Partial<DevInfo>, fn: (ctrl: UblkControl, dev: DevInfo) => Promise<T>): Promise<T> {
  const ctrl = new UblkControl();
  let dev: DevInfo | undefined;
  try {
    dev = ctrl.addDev({ devId: -1, nrHwQueues: 1, queueDepth: 2, maxIoBufBytes: MAX_IO, ...info });
    return await fn(ctrl, dev);
  } finally {
    if (dev) {
      try {
        ctrl.stopDev(dev.devId);
      } catch { /* never started, or stopped by the rule */ }
      try {
        ctrl.delDev(dev.devId);
      } catch { /* gone already */ }
    }
    ctrl.close();
  }
}

/**
 * A started device served by hand: SET_PARAMS, the char device opened, `nrQueues` queues
 * fetching every tag, START_DEV served to completion; `fn` runs, then STOP_DEV (served) and the
 * memory released.
 */
async function withLiveDevice<T>(
  info: Partial<DevInfo>, opts: Omit<HandQueueOptions, 'qid'>,
  fn: (ctrl: UblkControl, dev: DevInfo, queues: HandQueue[]) => Promise<T>,
): Promise<T> {
  return withDevice(info, async (ctrl, dev) => {
    ctrl.setParams(dev.devId, basicParams());
    const charFd = openChar(dev.devId);
    const queues: HandQueue[] = [];
    try {
      for (let q = 0; q < dev.nrHwQueues; q++) queues.push(new HandQueue(charFd, dev.queueDepth, { qid: q, ...opts }));
      for (const q of queues) q.fetchAll();
      let r: T;
      try {
        await serveUntil(queues, ctrl.startDevAsync(dev.devId), 'START_DEV');
        r = await fn(ctrl, dev, queues);
      } catch (e) {
        // Say why first: the clean-up may hang in the kernel under test, and the runner then
        // kills this process. Stop while serving (a STOP_DEV from a thread that has stopped
        // serving can wait forever; see stopServing).
        process.stderr.write(`conformance: ${(e as Error).message}\n`);
        await stopServing(ctrl, dev.devId, queues).catch(() => undefined);
        throw e;
      }
      await stopServing(ctrl, dev.devId, queues);
      return r;
    } finally {
      closeAll(queues, charFd);
    }
  });
}

/** The refusal's errno name, or 'granted' if `fn` did not throw. */
function outcome(fn: () => void): string {
  try {
    fn();
    return 'granted';
  } catch (e) {
    if (e instanceof UblkError) return e.code ?? e.message;
    throw e;
  }
}

/** One 4 KiB O_DIRECT read (or write) of our sector through /dev/ublkbN, optionally on one CPU. */
function dd(devId: number, dir: 'read' | 'write', file: string, cpu?: number) {
  const io = dir === 'read'
    ? [`if=/dev/ublkb${devId}`, `of=${file}`, `skip=${OUR_SECTOR / 8}`, 'iflag=direct']
    : [`if=${file}`, `of=/dev/ublkb${devId}`, `seek=${OUR_SECTOR / 8}`, 'oflag=direct'];
  const args = ['dd', ...io, 'bs=4096', 'count=1', 'status=none'];
  return cpu === undefined ? spawnCollecting(args[0]!, args.slice(1)) : spawnCollecting('taskset', ['-c', String(cpu), ...args]);
}

async function ddOk(queues: HandQueue[], job: ReturnType<typeof dd>, what: string): Promise<void> {
  await serveWhile(queues, job.ended, what);
  const r = await job.done;
  if (r.code !== 0) throw new Error(`${what}: dd exited ${r.code}: ${r.stderr.trim()}`);
}

/**
 * Runs `fn` with 4 KiB no two runs share, in a file in /tmp (the VM's tmpfs); that file and
 * every file named after it (FILE.suffix, where a rule keeps what it read back) go afterwards.
 */
async function withPattern<T>(fn: (pat: { bytes: Buffer; file: string }) => Promise<T>): Promise<T> {
  const bytes = Buffer.alloc(4096);
  for (let i = 0; i < bytes.length; i += 4) bytes.writeUInt32LE((i * 2654435761 + Date.now()) >>> 0, i);
  const name = `conformance-${process.pid}.pattern`;
  const file = `/tmp/${name}`;
  writeFileSync(file, bytes);
  try {
    return await fn({ bytes, file });
  } finally {
    for (const f of readdirSync('/tmp')) if (f === name || f.startsWith(`${name}.`)) rmSync(`/tmp/${f}`, { force: true });
  }
}

/** Sends `op` for (qid, tag) from a worker thread: another task of this process. */
function fromOtherTask(data: { op: number; fd: number; qid: number; tag: number; result: number; addr: number }): Promise<number | null> {
  return new Promise((resolve, reject) => {
    const w = new Worker(new URL('./other-task.js', import.meta.url), { workerData: data });
    w.once('message', (m: { res: number | null }) => resolve(m.res));
    w.once('error', reject);
  });
}

/** Whether 64-bit flag word `word` (a number) has `flag`; JS's & only sees the low 32 bits. */
export function hasFlag(word: number, flag: number): boolean {
  return Math.floor(word / flag) % 2 === 1;
}

function flagName(bit: number): string {
  return UBLK_FEATURES.find((f) => f.bit === bit)?.name.replace(/^UBLK_F_/, '') ?? `bit ${bit}`;
}

/**
 * A 4 KiB WRITE and then a READ of our sector, each held while its data moves between the
 * request's pages, as a fixed buffer of the queue's ring, and a file in /tmp: WRITE_FIXED from
 * the WRITE's pages into a file, READ_FIXED from the pattern file into the READ's pages. 'manual'
 * registers and unregisters the pages with REGISTER_IO_BUF / UNREGISTER_IO_BUF (zero copy);
 * 'auto' leaves both to the kernel (AUTO_BUF_REG: registered before the fetch completes,
 * unregistered at the commit).
 */
function fixedBufferRoundTrip(mode: 'manual' | 'auto', flags: number): Promise<string> {
  return withPattern((pat) => fixedBufferRoundTripWith(pat, mode, flags));
}

async function fixedBufferRoundTripWith(pat: { bytes: Buffer; file: string }, mode: 'manual' | 'auto', flags: number): Promise<string> {
  let emptied = 0;
  const written = `${pat.file}.written`;
  const readBack = `${pat.file}.read`;
  const patFd = openSync(pat.file, 'r');
  const writtenFd = openSync(written, 'w+');
  const hold: Answer = (r) => (r.startSector === OUR_SECTOR ? 'hold' : fullLength(r));
  try {
    await withLiveDevice({ queueDepth: 2, flags }, { userCopy: true, autoBufReg: mode === 'auto', fixedBuffers: true, answer: hold }, async (_ctrl, dev, queues) => {
      const q = queues[0]!;
      const expect = async (ud: number, want: number, what: string) => {
        const res = await otherResult(queues, q, ud, what);
        if (res !== want) throw new Error(`${what}: res ${res}, not ${want}`);
      };
      for (const dir of ['write', 'read'] as const) {
        const job = dd(dev.devId, dir, dir === 'write' ? pat.file : readBack);
        await serveWhile(queues, () => q.held.size > 0, `our ${dir} reaching the queue`);
        const [tag] = [...q.held.keys()] as [number];
        if (mode === 'manual') await expect(q.bufferCmd(UBLK_U_IO_REGISTER_IO_BUF, tag), 0, `REGISTER_IO_BUF of tag ${tag}`);
        const io = dir === 'write' ? q.fixedIo('write', writtenFd, tag, 4096) : q.fixedIo('read', patFd, tag, 4096);
        await expect(io, 4096, dir === 'write' ? 'WRITE_FIXED from the WRITE\'s pages' : 'READ_FIXED into the READ\'s pages');
        if (mode === 'manual') await expect(q.bufferCmd(UBLK_U_IO_UNREGISTER_IO_BUF, tag), 0, `UNREGISTER_IO_BUF of tag ${tag}`);
        q.commit(tag, 4096);
        const seen = q.seen.length;
        await ddOk(queues, job, `our ${dir}`);
        // Given back: the slot is empty again, so fixed I/O on it fails, unless another request
        // (a late partition-scan read) has come for the tag meanwhile and filled it.
        if (q.seen.length === seen) {
          const res = await otherResult(queues, q, q.fixedIo('read', patFd, tag, 4096), `READ_FIXED into slot ${tag} after the commit`);
          if (res >= 0) throw new Error(`after the ${dir}'s commit, fixed buffer ${tag} still held pages (READ_FIXED gave ${res})`);
          emptied++;
        }
      }
      if (!readFileSync(written).equals(pat.bytes)) throw new Error('the WRITE\'s pages, written out with WRITE_FIXED, held other bytes');
      if (!readFileSync(readBack).equals(pat.bytes)) throw new Error('a READ filled with READ_FIXED read back other bytes');
    });
  } finally {
    closeSync(patFd);
    closeSync(writtenFd);
  }
  return `slot empty again after ${emptied} of 2 commits${emptied < 2 ? ' (another request had come for the tag before the others were checked)' : ''}`;
}

/** Flags the kernel refuses unless asked together with these (ublk_ctrl_add_dev's checks). */
const PREREQUISITES: Record<number, number> = {
  [UBLK_F_USER_RECOVERY_REISSUE]: UBLK_F_USER_RECOVERY,
  [UBLK_F_USER_RECOVERY_FAIL_IO]: UBLK_F_USER_RECOVERY,
  [UBLK_F_ZONED]: UBLK_F_USER_COPY,
  [UBLK_F_QUIESCE]: UBLK_F_USER_RECOVERY,
  [UBLK_F_INTEGRITY]: UBLK_F_USER_COPY,
  [UBLK_F_BUF_REG_OFF_DAEMON]: UBLK_F_AUTO_BUF_REG,
};

export const RULES: Rule[] = [
  {
    id: 'params-roundtrip',
    rule: 'GET_PARAMS returns the basic parameters SET_PARAMS set',
    source: 'ublk_ctrl_set_params stores them, ublk_ctrl_get_params copies them back (drivers/block/ublk_drv.c)',
    async check() {
      await withDevice({}, async (ctrl, dev) => {
        const p = basicParams();
        ctrl.setParams(dev.devId, p);
        const got = ctrl.params(dev.devId).basic!;
        for (const k of ['logicalBsShift', 'physicalBsShift', 'ioOptShift', 'ioMinShift', 'maxSectors', 'devSectors'] as const) {
          if (got[k] !== p.basic![k]) throw new Error(`${k}: set ${p.basic![k]}, got ${got[k]}`);
        }
      });
    },
  },
  {
    id: 'params-invalid',
    rule: 'SET_PARAMS refuses with EINVAL: no basic parameters; a logical block below 512 bytes or above the page size; a physical block smaller than the logical one; max_sectors above max_io_buf_bytes; discard with other than one segment or a zero granularity; a dev_t, which only the kernel sets',
    source: 'ublk_validate_params, called by ublk_ctrl_set_params (drivers/block/ublk_drv.c)',
    async check() {
      await withDevice({}, async (ctrl, dev) => {
        const discard = { discardAlignment: 0, discardGranularity: 4096, maxDiscardSectors: 2048, maxWriteZeroesSectors: 0, maxDiscardSegments: 1 };
        const bad: Array<[string, (p: DevParams) => void]> = [
          ['no basic parameters', (p) => { p.types = 0; }],
          ['logical 256 bytes', (p) => { p.basic!.logicalBsShift = 8; }],
          ['logical above the page size', (p) => { p.basic!.logicalBsShift = p.basic!.physicalBsShift = Math.log2(PAGE_SIZE) + 1; }],
          ['physical below logical', (p) => { p.basic!.logicalBsShift = 12; p.basic!.physicalBsShift = 9; }],
          ['max_sectors above max_io_buf_bytes', (p) => { p.basic!.maxSectors = (MAX_IO >> 9) + 8; }],
          ['discard with 2 segments', (p) => { p.types |= UBLK_PARAM_TYPE_DISCARD; p.discard = { ...discard, maxDiscardSegments: 2 }; }],
          ['discard granularity 0', (p) => { p.types |= UBLK_PARAM_TYPE_DISCARD; p.discard = { ...discard, discardGranularity: 0 }; }],
          ['a dev_t from the server', (p) => { p.types |= UBLK_PARAM_TYPE_DEVT; }],
        ];
        for (const [what, change] of bad) {
          const p = basicParams();
          change(p);
          const r = outcome(() => ctrl.setParams(dev.devId, p));
          if (r !== 'EINVAL') throw new Error(`${what}: ${r}, not EINVAL`);
        }
        // And the checks are not a blanket refusal: the same device takes valid parameters,
        // a valid discard among them.
        const good = basicParams();
        good.types |= UBLK_PARAM_TYPE_DISCARD;
        good.discard = discard;
        ctrl.setParams(dev.devId, good);
      });
      return '8 invalid sets refused, a valid one taken';
    },
  },
  {
    id: 'start-waits-for-fetch',
    rule: 'START_DEV completes only once every tag of every queue has a FETCH_REQ outstanding',
    source: 'ublk_ctrl_start_dev waits for ub->completion, completed by ublk_mark_io_ready when the last tag is fetched (drivers/block/ublk_drv.c)',
    async check() {
      await withDevice({ queueDepth: 2 }, async (ctrl, dev) => {
        ctrl.setParams(dev.devId, basicParams());
        const charFd = openChar(dev.devId);
        const q = new HandQueue(charFd, 2);
        try {
          q.fetch(0);
          let done = false;
          const start = ctrl.startDevAsync(dev.devId).then(() => { done = true; });
          const until = Date.now() + 1500;
          await serveWhile([q], () => Date.now() > until, 'a wait of 1.5 s');
          if (done) throw new Error('START_DEV completed with one of two tags fetched');
          q.fetch(1);
          await serveUntil([q], start, 'START_DEV once both tags were fetched');
          await stopServing(ctrl, dev.devId, [q]);
        } finally {
          closeAll([q], charFd);
        }
      });
    },
  },
  {
    id: 'stop-aborts-fetches',
    rule: 'STOP_DEV completes every outstanding FETCH with UBLK_IO_RES_ABORT (-ENODEV)',
    source: 'ublk_stop_dev -> ublk_cancel_dev -> ublk_cancel_cmd: io_uring_cmd_done(cmd, UBLK_IO_RES_ABORT, ...) (drivers/block/ublk_drv.c)',
    async check() {
      let tail: Array<[number, number]> = [];
      await withLiveDevice({ queueDepth: 4 }, {}, async (ctrl, dev, queues) => {
        const q = queues[0]!;
        const before = q.results.length;
        await stopServing(ctrl, dev.devId, queues);
        tail = q.results.slice(before);
      });
      // Each tag's last CQE: what STOP_DEV completed its fetch with (reads of a partition scan
      // still running may come first, served by stopServing).
      const last = new Map(tail);
      const aborted = [...last.values()].filter((res) => res === UBLK_IO_RES_ABORT).length;
      if (last.size !== 4 || aborted !== 4) throw new Error(`after STOP_DEV the tags' commands ended (tag, res) ${JSON.stringify(tail)}; want each of 4 tags ending ${UBLK_IO_RES_ABORT}`);
    },
  },
  {
    id: 'del-waits-for-opener',
    rule: 'DEL_DEV returns only once nobody holds /dev/ublkcN open',
    source: 'ublk_ctrl_del_dev waits on ublk_idr_wq until ublk_cdev_rel frees the id (drivers/block/ublk_drv.c)',
    async check() {
      const ctrl = new UblkControl();
      try {
        const dev = ctrl.addDev({ devId: -1, nrHwQueues: 1, queueDepth: 2, maxIoBufBytes: MAX_IO });
        const fd = openChar(dev.devId);
        let done = false;
        const del = ctrl.delDevAsync(dev.devId).then(() => { done = true; });
        await new Promise((r) => setTimeout(r, 1500));
        const early = done;
        closeSync(fd);
        await del;
        if (early) throw new Error('DEL_DEV returned while /dev/ublkcN was open');
      } finally {
        ctrl.close();
      }
    },
  },
  {
    id: 'set-params-live',
    rule: 'SET_PARAMS is refused on a started (LIVE) device',
    source: 'ublk_ctrl_set_params: -EACCES once the device is live (drivers/block/ublk_drv.c)',
    async check() {
      let r = '';
      await withLiveDevice({ queueDepth: 2 }, {}, async (ctrl, dev) => {
        r = outcome(() => ctrl.setParams(dev.devId, basicParams(2 * SECTORS)));
      });
      if (r === 'granted') throw new Error('SET_PARAMS was accepted on a LIVE device');
      return `refused with ${r}`;
    },
  },
  {
    id: 'desc-stride',
    rule: 'Queue q\'s descriptor array is mapped at UBLKSRV_CMD_BUF_OFFSET + q x round_up(UBLK_MAX_QUEUE_DEPTH x 24, PAGE_SIZE), whatever the device\'s depth, and is depth x 24 bytes long; no array lies past the last queue',
    source: 'ublk_ch_mmap: q_id = (off - UBLKSRV_CMD_BUF_OFFSET) / ublk_max_cmd_buf_size(), the length must be ublk_queue_cmd_buf_size() (drivers/block/ublk_drv.c)',
    async check() {
      const depth = 4;
      await withLiveDevice({ nrHwQueues: 2, queueDepth: depth }, {}, async (ctrl, dev, queues) => {
        // A mapping past the last queue is refused.
        const charFd = queues[0]!.charFd;
        let past = 'granted';
        try {
          Mapping.file(charFd, descLength(depth, PAGE_SIZE), descOffset(2, PAGE_SIZE), libc.PROT_READ, false).unmap();
        } catch (e) {
          past = e instanceof SysError ? e.code : String(e);
        }
        if (past !== 'EINVAL') throw new Error(`mmap of a third queue's array on a 2-queue device: ${past}, not EINVAL`);
        // One read from a CPU of each queue, as blk-mq maps them (/sys/block/ublkbN/mq/Q/cpu_list;
        // 6.12 maps CPU c to queue c, 7.2 the other way round): each must show up, with its sector,
        // in the array mapped at that queue's stride, and in no other.
        const cpuList = (qid: number) => readFileSync(`/sys/block/ublkb${dev.devId}/mq/${qid}/cpu_list`, 'utf8').trim();
        for (const q of queues) {
          const list = cpuList(q.qid);
          if (list === '') throw new Error(`queue ${q.qid} serves no CPU: the VM needs at least as many CPUs as the device has queues (2)`);
          const cpu = Number(list.split(/[,-]/)[0]);
          for (const x of queues) x.seen.length = 0;
          await ddOk(queues, dd(dev.devId, 'read', '/dev/null', cpu), `a read from CPU ${cpu}`);
          const ours = (r: { op: number; startSector: number; nrSectors: number }) => r.op === UBLK_IO_OP_READ && r.startSector === OUR_SECTOR && r.nrSectors === 8;
          const where = queues.filter((x) => x.seen.some(ours)).map((x) => x.qid);
          if (where.length !== 1 || where[0] !== q.qid) {
            const shown = queues.map((x) => `queue ${x.qid} (CPUs ${cpuList(x.qid)}): ${JSON.stringify(x.seen.map((r) => [r.tag, r.op, r.startSector, r.nrSectors]))}`);
            throw new Error(`a read of sector ${OUR_SECTOR} from CPU ${cpu} showed in the arrays of queues [${where.join(',')}], not queue ${q.qid}'s alone (mapped at ${descOffset(q.qid, PAGE_SIZE)}); (tag, op, sector, sectors) seen: ${shown.join('; ')}`);
          }
        }
      });
      return `stride ${descOffset(1, PAGE_SIZE)} bytes (UBLK_MAX_QUEUE_DEPTH ${UBLK_MAX_QUEUE_DEPTH}) at depth ${depth}`;
    },
  },
  {
    id: 'tag-owner-task',
    rule: 'A COMMIT_AND_FETCH_REQ for a tag is refused with EINVAL unless it comes from the task that fetched the tag',
    source: 'ublk_ch_uring_cmd: io->task (6.16+; ubq->ubq_daemon before) must be current, else -EINVAL (drivers/block/ublk_drv.c)',
    async check() {
      const hold: Answer = (r) => (r.startSector === OUR_SECTOR ? 'hold' : fullLength(r));
      await withLiveDevice({ queueDepth: 2 }, { answer: hold }, async (ctrl, dev, queues) => {
        const q = queues[0]!;
        const job = dd(dev.devId, 'read', '/dev/null');
        await serveWhile(queues, () => q.held.size > 0, 'our read reaching the queue');
        const [tag] = [...q.held.keys()];
        const res = await fromOtherTask({ op: UBLK_U_IO_COMMIT_AND_FETCH_REQ, fd: q.charFd, qid: 0, tag: tag!, result: 4096, addr: q.bufAddr(tag!) });
        if (res !== -libc.EINVAL) {
          throw new Error(`COMMIT_AND_FETCH_REQ for tag ${tag} from another thread: ${res === null ? 'accepted (no CQE)' : `res ${res}`}, not ${-libc.EINVAL}`);
        }
        // The refusal is about the task, not the command: the fetching task's own commit works.
        q.commit(tag!, 4096);
        await ddOk(queues, job, 'our read, committed by the fetching task');
      });
    },
  },
  {
    id: 'commit-buffer',
    rule: 'A READ\'s data is copied out of the buffer its COMMIT_AND_FETCH_REQ names, not the one its FETCH named, while the command is issued: memory changed once io_uring_enter has returned does not reach the reader',
    source: '__ublk_ch_uring_cmd / ublk_commit_and_fetch: io->addr takes the command\'s addr, then the request completes and ublk_unmap_io copies from io->addr (drivers/block/ublk_drv.c)',
    check: () => withPattern(async (pat) => {
      // So a server may answer a READ from any memory of its own by naming it in the commit, and
      // reuse that memory once io_uring_enter has returned, if the tag's next request cannot be a
      // WRITE copied there at dispatch (NEED_GET_DATA). Tried for the nbd target's receive buffer:
      // correct, and not faster (README, "NBD: -t nbd vs the kernel's NBD client").
      const hold: Answer = (r) => (r.startSector === OUR_SECTOR && r.op === UBLK_IO_OP_READ ? 'hold' : fullLength(r));
      const other = Mapping.anonymous(4096);
      await withLiveDevice({ queueDepth: 2 }, { answer: hold }, async (_ctrl, dev, queues) => {
        const q = queues[0]!;
        const out = `${pat.file}.read`;
        const job = dd(dev.devId, 'read', out);
        await serveWhile(queues, () => q.held.size > 0, 'our read reaching the queue');
        const [tag] = [...q.held.keys()];
        q.bufs.u8.fill(0xa5, tag! * MAX_IO, tag! * MAX_IO + 4096); // what the FETCH's buffer holds
        pat.bytes.copy(other.bytes());
        q.commit(tag!, 4096, other.address);
        other.bytes().fill(0x5a); // after io_uring_enter issued the commit
        await ddOk(queues, job, 'our read, committed from other memory');
        const got = readFileSync(out);
        if (!got.equals(pat.bytes)) {
          const what = got.every((b) => b === 0xa5) ? 'the bytes of the buffer the FETCH named'
            : got.every((b) => b === 0x5a) ? 'the bytes written to the commit\'s buffer after io_uring_enter returned (copied later than the issue)' : 'other bytes';
          throw new Error(`the reader got ${what}, not those the commit's buffer held when it was issued`);
        }
      });
      // Unmapped only now: had the kernel kept the address, it would have been a live one until the device went.
      other.unmap();
    }),
  },
  {
    id: 'unlisted-flags',
    rule: 'ADD_DEV never grants a UBLK_F_* flag that GET_FEATURES does not list',
    source: 'ublk_ctrl_add_dev masks info.flags with UBLK_F_ALL; GET_FEATURES reports UBLK_F_ALL (drivers/block/ublk_drv.c)',
    since: '6.5',
    async check() {
      const ctrl = new UblkControl();
      const asked: string[] = [];
      try {
        const listed = ctrl.features();
        // Every bit of the 64, not only the ones our ABI module names: a kernel may know more.
        for (let bit = 0; bit < 53; bit++) {
          const flag = 2 ** bit;
          if (hasFlag(listed, flag)) continue;
          asked.push(flagName(bit));
          let dev: DevInfo | undefined;
          try {
            dev = ctrl.addDev({ devId: -1, nrHwQueues: 1, queueDepth: 2, maxIoBufBytes: MAX_IO, flags: flag }, { asIs: true });
          } catch (e) {
            if (e instanceof UblkError) continue; // refused outright: the rule holds
            throw e;
          }
          try {
            if (hasFlag(dev.flags, flag)) throw new Error(`${asked[asked.length - 1]} is not in GET_FEATURES, yet ADD_DEV granted it`);
          } finally {
            ctrl.delDev(dev.devId);
          }
        }
      } finally {
        ctrl.close();
      }
      return `${asked.length} unlisted bits asked, none granted`;
    },
  },
  {
    id: 'listed-flags',
    rule: 'Each UBLK_F_* flag GET_FEATURES lists (but UNPRIVILEGED_DEV, next rule), asked for with the flags it requires, is either granted by ADD_DEV or refused with an error, never silently dropped',
    source: 'ublk_ctrl_add_dev: the flag checks and the flags it forces or clears (drivers/block/ublk_drv.c)',
    since: '6.5',
    async check() {
      const ctrl = new UblkControl();
      const granted: string[] = [];
      const refused: string[] = [];
      const dropped: string[] = [];
      try {
        const listed = ctrl.features();
        for (let bit = 0; bit < 53; bit++) {
          const flag = 2 ** bit;
          if (!hasFlag(listed, flag) || flag === UBLK_F_UNPRIVILEGED_DEV) continue;
          const name = flagName(bit);
          let dev: DevInfo;
          try {
            dev = ctrl.addDev({ devId: -1, nrHwQueues: 1, queueDepth: 2, maxIoBufBytes: MAX_IO, flags: flag | (PREREQUISITES[flag] ?? 0) }, { asIs: true });
          } catch (e) {
            if (!(e instanceof UblkError)) throw e;
            refused.push(`${name} (${e.code})`);
            continue;
          }
          (hasFlag(dev.flags, flag) ? granted : dropped).push(name);
          ctrl.delDev(dev.devId);
        }
      } finally {
        ctrl.close();
      }
      if (dropped.length > 0) throw new Error(`listed but silently dropped: ${dropped.join(', ')} (granted: ${granted.join(', ')}${refused.length ? `; refused: ${refused.join(', ')}` : ''})`);
      return `granted: ${granted.join(', ')}${refused.length ? `; refused: ${refused.join(', ')}` : ''}`;
    },
  },
  {
    id: 'unprivileged-for-root',
    rule: 'ADD_DEV from a caller with CAP_SYS_ADMIN clears UBLK_F_UNPRIVILEGED_DEV: root\'s devices are privileged',
    source: 'ublk_ctrl_add_dev: if (capable(CAP_SYS_ADMIN)) info.flags &= ~UBLK_F_UNPRIVILEGED_DEV (drivers/block/ublk_drv.c)',
    needs: UBLK_F_UNPRIVILEGED_DEV,
    async check() {
      if (process.geteuid?.() !== 0) throw new Error('the rule runs as root (the VM\'s user)');
      const ctrl = new UblkControl();
      try {
        const dev = ctrl.addDev({ devId: -1, nrHwQueues: 1, queueDepth: 2, maxIoBufBytes: MAX_IO, flags: UBLK_F_UNPRIVILEGED_DEV }, { asIs: true });
        ctrl.delDev(dev.devId);
        if (hasFlag(dev.flags, UBLK_F_UNPRIVILEGED_DEV)) throw new Error('root asked for UNPRIVILEGED_DEV and was granted it');
      } finally {
        ctrl.close();
      }
    },
  },
  {
    id: 'user-copy',
    rule: 'With UBLK_F_USER_COPY a WRITE\'s data is pread and a READ\'s data pwritten on /dev/ublkcN at UBLKSRV_IO_BUF_OFFSET + (q_id << 41 | tag << 25), and the commands carry no buffer address',
    source: 'ublk_ch_read_iter / ublk_ch_write_iter, ublk_user_copy_pos (drivers/block/ublk_drv.c); include/uapi/linux/ublk_cmd.h (UBLK_QID_OFF, UBLK_TAG_OFF)',
    needs: UBLK_F_USER_COPY,
    check: () => withPattern(async (pat) => {
      let written: Buffer | undefined;
      const answer: Answer = (r, q) => {
        const at = userCopyOffset(r.qid, r.tag);
        const len = r.nrSectors * 512;
        if (r.op === UBLK_IO_OP_WRITE && r.startSector === OUR_SECTOR) {
          written = Buffer.alloc(len);
          readSync(q.charFd, written, 0, len, at);
        } else if (r.op === UBLK_IO_OP_READ) {
          // Our sector reads back the pattern; any other (the partition scan) reads zeros.
          const data = r.startSector === OUR_SECTOR ? pat.bytes.subarray(0, len) : Buffer.alloc(len);
          writeSync(q.charFd, data, 0, len, at);
        }
        return len;
      };
      await withLiveDevice({ queueDepth: 2, flags: UBLK_F_USER_COPY }, { userCopy: true, answer }, async (_ctrl, dev, queues) => {
        await ddOk(queues, dd(dev.devId, 'write', pat.file), 'a 4 KiB write');
        if (!written || !written.equals(pat.bytes)) throw new Error(`pread of the WRITE at its user-copy offset gave ${written ? 'other bytes' : 'nothing (the write never came)'}`);
        const out = `${pat.file}.out`;
        await ddOk(queues, dd(dev.devId, 'read', out), 'a 4 KiB read');
        if (!readFileSync(out).equals(pat.bytes)) throw new Error('a READ answered by pwrite at its user-copy offset read back other bytes');
      });
    }),
  },
  {
    id: 'need-get-data',
    rule: 'With UBLK_F_NEED_GET_DATA a WRITE is fetched with result UBLK_IO_RES_NEED_GET_DATA and no data; NEED_GET_DATA with a buffer address then brings its data',
    source: 'ublk_need_get_data, ublk_get_data (drivers/block/ublk_drv.c)',
    needs: UBLK_F_NEED_GET_DATA,
    check: () => withPattern(async (pat) => {
      let got: Buffer | undefined;
      const answer: Answer = (r, q) => {
        if (r.op === UBLK_IO_OP_WRITE && r.startSector === OUR_SECTOR) got = Buffer.from(q.bufs.u8.subarray(r.tag * MAX_IO, r.tag * MAX_IO + r.nrSectors * 512));
        return fullLength(r);
      };
      await withLiveDevice({ queueDepth: 2, flags: UBLK_F_NEED_GET_DATA }, { answer }, async (_ctrl, dev, queues) => {
        await ddOk(queues, dd(dev.devId, 'write', pat.file), 'a 4 KiB write');
        if (queues[0]!.needGetData !== 1) throw new Error(`the WRITE came with UBLK_IO_RES_NEED_GET_DATA ${queues[0]!.needGetData} times, not once`);
        if (!got || !got.equals(pat.bytes)) throw new Error(`after NEED_GET_DATA the buffer held ${got ? 'other bytes' : 'nothing (no WRITE came)'}`);
      });
    }),
  },
  {
    id: 'zero-copy',
    rule: 'With UBLK_F_SUPPORT_ZERO_COPY, REGISTER_IO_BUF makes a request\'s pages a fixed buffer of the server\'s ring (WRITE_FIXED takes a WRITE\'s data from it, READ_FIXED fills a READ) and UNREGISTER_IO_BUF empties the slot again',
    source: 'ublk_register_io_buf, ublk_unregister_io_buf: io_buffer_register_bvec (drivers/block/ublk_drv.c)',
    needs: UBLK_F_SUPPORT_ZERO_COPY,
    async check() {
      return fixedBufferRoundTrip('manual', UBLK_F_SUPPORT_ZERO_COPY);
    },
  },
  {
    id: 'auto-buf-reg',
    rule: 'With UBLK_F_AUTO_BUF_REG the kernel registers each request\'s pages as the fixed buffer named by the struct ublk_auto_buf_reg in the command SQE\'s addr, before the fetch completes, and unregisters them at the commit',
    source: 'ublk_auto_buf_reg, ublk_auto_buf_unregister (drivers/block/ublk_drv.c)',
    needs: UBLK_F_AUTO_BUF_REG,
    async check() {
      return fixedBufferRoundTrip('auto', UBLK_F_AUTO_BUF_REG);
    },
  },
  {
    id: 'update-size',
    rule: 'With UBLK_F_UPDATE_SIZE, UPDATE_SIZE on a live device changes the disk\'s size',
    source: 'ublk_ctrl_set_size: set_capacity_and_notify (drivers/block/ublk_drv.c)',
    needs: UBLK_F_UPDATE_SIZE,
    async check() {
      await withLiveDevice({ queueDepth: 2, flags: UBLK_F_UPDATE_SIZE }, {}, async (ctrl, dev) => {
        const size = () => Number(readFileSync(`/sys/block/ublkb${dev.devId}/size`, 'utf8'));
        if (size() !== SECTORS) throw new Error(`the disk started at ${size()} sectors, not ${SECTORS}`);
        ctrl.updateSize(dev.devId, 2 * SECTORS);
        if (size() !== 2 * SECTORS) throw new Error(`after UPDATE_SIZE to ${2 * SECTORS} sectors the disk has ${size()}`);
      });
    },
  },
];
