/**
 * The nbd target: a block device whose blocks live on an NBD server (nbd-server, nbdkit and its
 * plugins, qemu-storage-daemon and through it Ceph RBD and other stores), reached over TCP or a
 * Unix socket.
 *
 *   ublk add -t nbd (--host HOST [--port PORT] | --socket PATH) [--export NAME]
 *                   [--reconnect-timeout SECONDS]
 *
 * Everything a queue says to the server goes through the queue's own io_uring, next to its ublk
 * commands: IORING_OP_SOCKET and CONNECT open the connection, SEND and RECV carry the handshake,
 * one SENDMSG carries every request gathered in a batch (headers and WRITE data as iovecs, the
 * data straight from the request's buffer), and one RECV stays posted on the socket, its bytes
 * fed to the reply parser (nbd-protocol.ts), which copies READ data into the requests. A request
 * costs no system call of its own: the requests of a batch leave in one SENDMSG, and their
 * replies arrive in as few RECVs as the socket delivers them in.
 *
 * - The handshake (fixed newstyle, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_GO with block sizes) runs
 *   once on the main thread as a probe (`prepare`: the device's size, flags and limits, and
 *   a clear refusal before anything is made), then once per queue connection.
 * - Transmission flags become the device's shape: READ_ONLY, ROTATIONAL, SEND_FLUSH (a volatile
 *   cache: FLUSH is passed on), SEND_FUA, SEND_TRIM (DISCARD), SEND_WRITE_ZEROES (WRITE_ZEROES;
 *   REQ_NOUNMAP becomes NBD_CMD_FLAG_NO_HOLE). Block sizes: the minimum becomes the logical
 *   block (512 at least), the preferred one the physical block, the maximum payload caps the
 *   largest request.
 * - Multi-conn: with `-q N` each queue opens its own connection, which proto.md allows only when
 *   the server sets NBD_FLAG_CAN_MULTI_CONN (a FLUSH on one connection then covers writes
 *   completed on all). Without it, more than one queue is refused before the device exists.
 * - A lost connection (the server restarted, a reset, a protocol error) is reopened with
 *   backoff (100 ms doubling to 2 s) while the device holds the requests: those sent and not
 *   answered are sent again, in their order, on the new connection (reads, writes, flushes and
 *   trims may be repeated). A file system above sees a pause, no error. A server away longer
 *   than `--reconnect-timeout` (default 60 s) gets the held requests failed with EIO, and every
 *   new one until it is back, with a line in the log; reconnecting goes on.
 * - The reconnected export must have the same size; one that shrank or became read-only is not
 *   used (the attempt counts as failed, and the log says why).
 */
import { lookup } from 'node:dns/promises';
import { isIP } from 'node:net';
import { isAbsolute, resolve as resolvePath } from 'node:path';
import { Mapping, errnoName, libc, sys } from '../libc/index.js';
import {
  abi as uringAbi, addFlags, prepConnect, prepLinkTimeout, prepRecv, prepSend, prepSendmsg, prepShutdown, prepSocket, prepTimeout, setIoprio,
} from '../uring/index.js';
import { defineTarget, TargetError, type DeviceSpec, type IoRequest, type QueueContext, type QueueHandler, type QueueInfo } from '../ublk/target.js';
import {
  UBLK_IO_F_FUA, UBLK_IO_F_NOUNMAP, UBLK_IO_OP_DISCARD, UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE_ZEROES,
} from '../ublk/abi.js';
import * as nbd from './nbd-abi.js';
import {
  describeAddress, encodeRequest, handshake, NbdProtocolError, NbdRefusal, probeExport, ReplyReader, type ExportInfo, type HandshakeStep, type NbdAddress,
  type ReplySink,
} from './nbd-protocol.js';
import { parseOptions, UsageError } from './options.js';

export interface NbdOptions {
  host?: string;
  port: number;
  /** Unix socket path, absolute. */
  socket?: string;
  exportName: string;
  reconnectTimeoutS: number;
}

/** What every queue gets from `prepare`: where to connect (an address, resolved once) and what was agreed. */
export interface NbdDevice {
  address: NbdAddress;
  exportName: string;
  info: ExportInfo;
  sizeBytes: number;
  logicalBlockSize: number;
  readOnly: boolean;
  reconnectTimeoutMs: number;
}

export const NBD_DEFAULT_PORT = 10809;
/** Largest request (the ublk I/O buffer per tag). */
const MAX_IO_BYTES = 512 * 1024;
/** DISCARD and WRITE_ZEROES ranges per request (no data travels with them). */
const MAX_RANGE_BYTES = 64 * 1024 * 1024;
/** How long the probe, a connect, and each step of a handshake may take. */
const CONNECT_TIMEOUT_MS = 10_000;
/** Reconnect backoff: first wait and ceiling. */
const BACKOFF_FIRST_MS = 100;
const BACKOFF_MAX_MS = 2_000;
/** The posted receive: replies (READ data included) arrive in pieces of at most this. */
const RECV_BYTES = 256 * 1024;
/** Handshake messages: option replies are at most 64 KiB (nbd-protocol.ts). */
const HANDSHAKE_BYTES = 64 * 1024 + 256;
/** Bytes of WRITE data one SENDMSG carries at most (the rest goes in the next). */
const SEND_BATCH_BYTES = 4 * 1024 * 1024;

const FLAG_NAMES: Array<[number, string]> = [
  [nbd.NBD_FLAG_READ_ONLY, 'read_only'], [nbd.NBD_FLAG_SEND_FLUSH, 'flush'], [nbd.NBD_FLAG_SEND_FUA, 'fua'],
  [nbd.NBD_FLAG_ROTATIONAL, 'rotational'], [nbd.NBD_FLAG_SEND_TRIM, 'trim'], [nbd.NBD_FLAG_SEND_WRITE_ZEROES, 'write_zeroes'],
  [nbd.NBD_FLAG_CAN_MULTI_CONN, 'multi_conn'], [nbd.NBD_FLAG_SEND_CACHE, 'cache'], [nbd.NBD_FLAG_SEND_FAST_ZERO, 'fast_zero'],
];

/** The export's transmission flags by name, for `ublk list` and messages. */
export function flagNames(flags: number): string[] {
  return FLAG_NAMES.filter(([bit]) => flags & bit).map(([, name]) => name);
}

function largestPowerOfTwoAtMost(n: number): number {
  return 2 ** Math.floor(Math.log2(n));
}

/**
 * The device's shape from what the server said: block sizes, limits and flags (see the module
 * comment). Throws a TargetError for an export no block device can present.
 */
export function shapeFor(info: ExportInfo): { sizeBytes: number; logicalBlockSize: number; physicalBlockSize: number; maxIoBytes: number } {
  const logicalBlockSize = Math.max(512, info.minimumBlock);
  if (logicalBlockSize > 4096) {
    throw new TargetError(`nbd: the server's minimum block size is ${info.minimumBlock} bytes; a Linux block device cannot have blocks larger than 4096`);
  }
  const preferred = info.preferredBlock > 0 && (info.preferredBlock & (info.preferredBlock - 1)) === 0 ? info.preferredBlock : logicalBlockSize;
  const physicalBlockSize = Math.min(Math.max(preferred, logicalBlockSize), 65536);
  const maxIoBytes = Math.min(MAX_IO_BYTES, largestPowerOfTwoAtMost(info.maximumPayload));
  if (maxIoBytes < 4096) {
    throw new TargetError(`nbd: the server takes at most ${info.maximumPayload} bytes per request; this client needs at least 4096`);
  }
  const sizeBytes = Math.floor(info.size / logicalBlockSize) * logicalBlockSize;
  if (sizeBytes === 0) throw new TargetError(`nbd: the export has ${info.size} bytes, less than one ${logicalBlockSize}-byte block`);
  return { sizeBytes, logicalBlockSize, physicalBlockSize, maxIoBytes };
}

export default defineTarget<NbdOptions, Promise<DeviceSpec>>({
  name: 'nbd',
  usage: [
    '  --host HOST            the NBD server (name or address; with --port, default 10809)',
    '  --port PORT',
    '  --socket PATH          or: the NBD server\'s Unix socket',
    '  --export NAME          the export to open (default: the server\'s default export, "")',
    '  --reconnect-timeout S  fail I/O with EIO once the server has been unreachable this long',
    '                         (default 60; requests are held, and resent, until then)',
    '',
  ].join('\n'),
  counters: ['reconnects', 'failed_unreachable'],
  parseArgs(argv) {
    const { values } = parseOptions('nbd', argv, [
      { key: 'host', names: ['--host'], kind: 'string' },
      { key: 'port', names: ['--port'], kind: 'count', min: 1, max: 65535 },
      { key: 'socket', names: ['--socket'], kind: 'string' },
      { key: 'exportName', names: ['--export'], kind: 'string' },
      { key: 'reconnectTimeoutS', names: ['--reconnect-timeout'], kind: 'count', min: 1, max: 86_400 },
    ]);
    const host = values.host as string | undefined;
    const socket = values.socket as string | undefined;
    if ((host === undefined) === (socket === undefined)) throw new UsageError('nbd needs a server: --host HOST [--port PORT] or --socket PATH (one of them)');
    if (socket !== undefined && values.port !== undefined) throw new UsageError('nbd: --port goes with --host, not with --socket');
    const o: NbdOptions = {
      port: (values.port as number | undefined) ?? NBD_DEFAULT_PORT,
      exportName: (values.exportName as string | undefined) ?? '',
      reconnectTimeoutS: (values.reconnectTimeoutS as number | undefined) ?? 60,
    };
    if (host !== undefined) o.host = host;
    if (socket !== undefined) {
      o.socket = isAbsolute(socket) ? socket : resolvePath(socket);
      if (Buffer.byteLength(o.socket) > 107) throw new UsageError(`nbd: the socket path ${o.socket} is longer than the 107 bytes a Unix socket address holds`);
    }
    return o;
  },

  async prepare(o) {
    let address: NbdAddress;
    if (o.socket !== undefined) address = { path: o.socket };
    else {
      let ip = o.host!;
      if (!isIP(ip)) {
        try {
          ip = (await lookup(o.host!)).address;
        } catch (e) {
          throw new TargetError(`nbd: cannot resolve the host name '${o.host}': ${(e as Error).message}`);
        }
      }
      address = { host: ip, port: o.port };
    }
    const where = describeAddress(address);
    let info: ExportInfo;
    try {
      info = await probeExport(address, o.exportName, CONNECT_TIMEOUT_MS);
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      if (err.code === 'ECONNREFUSED') throw new TargetError(`nbd: nothing listens at ${where} (connection refused): start the NBD server there, or fix --host/--port/--socket`);
      if (err.code === 'ENOENT') throw new TargetError(`nbd: there is no socket at ${o.socket}: start the NBD server, or fix --socket`);
      if (e instanceof NbdRefusal) throw new TargetError(`nbd: ${where}: ${err.message}`);
      throw new TargetError(`nbd: cannot open export '${o.exportName}' at ${where}: ${err.message}`);
    }
    const shape = shapeFor(info);
    const f = info.flags;
    const device: NbdDevice = {
      address, exportName: o.exportName, info, sizeBytes: shape.sizeBytes, logicalBlockSize: shape.logicalBlockSize,
      readOnly: (f & nbd.NBD_FLAG_READ_ONLY) !== 0, reconnectTimeoutMs: o.reconnectTimeoutS * 1000,
    };
    const trim = (f & nbd.NBD_FLAG_SEND_TRIM) !== 0;
    const zeroes = (f & nbd.NBD_FLAG_SEND_WRITE_ZEROES) !== 0;
    return {
      sizeBytes: shape.sizeBytes,
      logicalBlockSize: shape.logicalBlockSize,
      physicalBlockSize: shape.physicalBlockSize,
      maxIoBytes: shape.maxIoBytes,
      readOnly: device.readOnly,
      rotational: (f & nbd.NBD_FLAG_ROTATIONAL) !== 0,
      volatileCache: (f & nbd.NBD_FLAG_SEND_FLUSH) !== 0,
      fua: (f & nbd.NBD_FLAG_SEND_FLUSH) !== 0 && (f & nbd.NBD_FLAG_SEND_FUA) !== 0,
      ...(trim || zeroes ? {
        discard: { granularity: shape.physicalBlockSize, maxBytes: trim ? MAX_RANGE_BYTES : 0, maxWriteZeroesBytes: zeroes ? MAX_RANGE_BYTES : 0 },
      } : {}),
      ...(f & nbd.NBD_FLAG_CAN_MULTI_CONN ? {} : {
        queueLimit: {
          max: 1,
          reason: `the server does not allow several connections to export '${o.exportName}' (no NBD_FLAG_CAN_MULTI_CONN, multi-conn), and each queue needs its own`,
        },
      }),
      describe: {
        server: where, export: o.exportName, size: info.size, flags: flagNames(f), structured_replies: info.structured,
        block_sizes: { minimum: info.minimumBlock, preferred: info.preferredBlock, maximum: info.maximumPayload },
        reconnect_timeout_s: o.reconnectTimeoutS,
      },
      queueData: device,
    };
  },

  openQueue(_o, q) {
    return new NbdQueue(q.device as NbdDevice, q);
  },
});

/** Per tag: where its request is on the way to the server. */
const enum TagState {
  /** Not ours (no request, or answered). */
  Free,
  /** Waiting to be sent (or sent again after a reconnect). */
  Queued,
  /** Sent (or being sent) on the current connection; its reply is awaited. */
  OnWire,
}

const enum Conn {
  /** Opening: socket, connect, handshake. */
  Connecting,
  Ready,
  /** Being shut down: waiting for the connection's SQEs before closing the socket. */
  Closing,
  /** No connection; a reconnect timer is armed. */
  Waiting,
  /** The queue is closing: nothing more is started. */
  Closed,
}

/**
 * One queue's connection and the requests on it. Runs entirely from `handle`, `afterBatch` and
 * CQE callbacks on the queue's thread: no Promise, no event-loop turn.
 */
class NbdQueue implements QueueHandler {
  private ctx!: QueueContext;
  private readonly qid: number;
  private readonly log: (line: string) => void;
  private readonly counters: Float64Array;
  private readonly where: string;
  private readonly depth: number;

  /** Memory the kernel reads or writes for us: see the offsets below. */
  private readonly mem: Mapping;
  private readonly bytes: Buffer;
  private readonly view: DataView;
  private readonly recvAt = 0;
  private readonly hsAt = RECV_BYTES;
  private readonly hdrAt = RECV_BYTES + HANDSHAKE_BYTES;
  private readonly iovAt: number;
  private readonly maxIov: number;
  private readonly msgAt: number;
  private readonly addrAt: number;
  private readonly addrLen: number;
  private readonly tsAt: number;
  private readonly linkTsAt: number;
  private readonly scratchAt: number;

  private state = Conn.Connecting;
  private fd = -1;
  /** SQEs in flight that belong to the current connection (its socket, its handshake, its I/O). */
  private connOps = 0;
  /** Bumped whenever a connection ends: a CQE of an older one only counts itself out. */
  private gen = 0;
  private reader: ReplyReader;
  private structured: boolean;

  private readonly tagState: Uint8Array;
  private readonly tagType: Uint16Array;
  private readonly tagFlags: Uint16Array;
  private readonly tagOffset: Float64Array;
  private readonly tagLength: Uint32Array;
  /** The errno the server answered with (0: none yet). */
  private readonly tagErrno: Int32Array;
  /** READ bytes the server's chunks covered (structured replies must cover all). */
  private readonly tagCovered: Float64Array;
  /** Order in which requests went on the wire, to send them again in that order. */
  private readonly tagSeq: Float64Array;
  private seq = 0;
  /** FIFO of tags to send: a ring of `depth` slots. */
  private readonly queue: Int32Array;
  private qHead = 0;
  private qLen = 0;

  /** A SENDMSG is in flight: its iovecs (in `mem`) must not change, and the next waits. */
  private sending = false;
  private sendIovs = 0;

  /** When the server was last reachable, if it is not now (ms, Date.now). */
  private outageSince: number | undefined;
  /** Past --reconnect-timeout: requests fail at once until a connection is back. */
  private down = false;
  private backoffMs = BACKOFF_FIRST_MS;
  private everReady = false;
  private attempts = 0;
  private lastFailure = '';
  private timerArmed = false;

  constructor(private readonly device: NbdDevice, q: QueueInfo) {
    this.qid = q.qid;
    this.depth = q.depth;
    this.log = q.log ?? ((line) => process.stderr.write(`${line}\n`));
    this.counters = q.counters;
    this.where = describeAddress(device.address);
    this.structured = device.info.structured;
    const d = q.depth;
    this.maxIov = 2 * d;
    this.iovAt = this.hdrAt + d * 32;
    this.msgAt = this.iovAt + this.maxIov * libc.iovec.SIZE;
    this.addrAt = this.msgAt + 64;
    this.tsAt = this.addrAt + 128;
    this.linkTsAt = this.tsAt + 16;
    this.scratchAt = this.linkTsAt + 16;
    this.mem = Mapping.anonymous(this.scratchAt + 16);
    this.bytes = this.mem.bytes();
    this.view = new DataView(this.bytes.buffer, this.bytes.byteOffset, this.bytes.byteLength);
    this.addrLen = this.writeAddress();
    this.tagState = new Uint8Array(d);
    this.tagType = new Uint16Array(d);
    this.tagFlags = new Uint16Array(d);
    this.tagOffset = new Float64Array(d);
    this.tagLength = new Uint32Array(d);
    this.tagErrno = new Int32Array(d);
    this.tagCovered = new Float64Array(d);
    this.tagSeq = new Float64Array(d);
    this.queue = new Int32Array(d);
    this.reader = new ReplyReader(this.sink, this.structured);
  }

  start(ctx: QueueContext): void {
    this.ctx = ctx;
    this.connect();
  }

  handle(req: IoRequest): number | undefined {
    const f = this.device.info.flags;
    let type: number;
    let flags = 0;
    switch (req.op) {
      case UBLK_IO_OP_READ: type = nbd.NBD_CMD_READ; break;
      case UBLK_IO_OP_WRITE:
        type = nbd.NBD_CMD_WRITE;
        if (req.flags & UBLK_IO_F_FUA && f & nbd.NBD_FLAG_SEND_FUA) flags = nbd.NBD_CMD_FLAG_FUA;
        break;
      case UBLK_IO_OP_FLUSH:
        if (!(f & nbd.NBD_FLAG_SEND_FLUSH)) return 0; // no cache was advertised: nothing to flush
        type = nbd.NBD_CMD_FLUSH;
        break;
      case UBLK_IO_OP_DISCARD:
        if (!(f & nbd.NBD_FLAG_SEND_TRIM)) return -libc.EOPNOTSUPP;
        type = nbd.NBD_CMD_TRIM;
        break;
      case UBLK_IO_OP_WRITE_ZEROES:
        if (!(f & nbd.NBD_FLAG_SEND_WRITE_ZEROES)) return -libc.EOPNOTSUPP;
        type = nbd.NBD_CMD_WRITE_ZEROES;
        if (req.flags & UBLK_IO_F_NOUNMAP) flags = nbd.NBD_CMD_FLAG_NO_HOLE;
        break;
      default: return -libc.EOPNOTSUPP;
    }
    if (this.down) {
      this.counters[1]!++;
      return -libc.EIO;
    }
    const tag = req.tag;
    this.tagType[tag] = type;
    this.tagFlags[tag] = flags;
    // FLUSH carries no range (proto.md: offset and length must be zero).
    this.tagOffset[tag] = type === nbd.NBD_CMD_FLUSH ? 0 : req.offset;
    this.tagLength[tag] = type === nbd.NBD_CMD_FLUSH ? 0 : req.length;
    this.enqueue(tag);
    return undefined;
  }

  afterBatch(): void {
    this.flush();
  }

  close(state?: { drained: boolean }): void {
    const wasReady = this.state === Conn.Ready;
    this.state = Conn.Closed;
    if (this.fd >= 0) {
      // A polite goodbye when the stream is at a message boundary (past the handshake, no send cut short).
      if (wasReady && !this.sending) {
        try {
          encodeRequest(this.bytes, this.hsAt, nbd.NBD_CMD_DISC, 0, 0, 0, 0);
          sys.write(this.fd, this.mem.address + this.hsAt, nbd.NBD_REQUEST_BYTES);
        } catch { /* the connection is gone anyway */ }
      }
      try {
        sys.close(this.fd);
      } catch { /* already closed */ }
      this.fd = -1;
    }
    // The queue cancelled and reaped our SQEs (receive, timers) before calling this, unless it
    // gave up waiting: then the kernel may still write the receive buffer, which stays mapped.
    if (state?.drained !== false) this.mem.unmap();
  }

  // ---------------------------------------------------------------------------------------------
  // Requests
  // ---------------------------------------------------------------------------------------------

  private enqueue(tag: number): void {
    this.tagState[tag] = TagState.Queued;
    this.tagErrno[tag] = 0;
    this.tagCovered[tag] = 0;
    this.queue[(this.qHead + this.qLen) % this.depth] = tag;
    this.qLen++;
  }

  /**
   * Sends what is queued in one SENDMSG: each request's header (from `mem`, one 32-byte slot
   * per tag) and a WRITE's data from the request's own buffer. One SENDMSG at a time: the stream
   * must carry whole messages in order, and a second one could interleave with a first that
   * the socket took only in part.
   */
  private flush(): void {
    if (this.state !== Conn.Ready || this.sending || this.qLen === 0) return;
    const v = this.view;
    let iov = 0;
    let data = 0;
    while (this.qLen > 0 && iov + 2 <= this.maxIov && data < SEND_BATCH_BYTES) {
      const tag = this.queue[this.qHead]!;
      this.qHead = (this.qHead + 1) % this.depth;
      this.qLen--;
      const type = this.tagType[tag]!;
      const length = this.tagLength[tag]!;
      let dataAddress = 0;
      if (type === nbd.NBD_CMD_WRITE) {
        try {
          dataAddress = this.ctx.bufferAddress(tag);
        } catch (e) {
          this.log(`nbd queue ${this.qid}: cannot reach tag ${tag}'s WRITE data: ${(e as Error).message}`);
          this.tagState[tag] = TagState.Free;
          this.ctx.complete(tag, -libc.EIO);
          continue;
        }
      }
      const hdr = this.hdrAt + tag * 32;
      encodeRequest(this.bytes, hdr, type, this.tagFlags[tag]!, tag, this.tagOffset[tag]!, length);
      const i = this.iovAt + iov * libc.iovec.SIZE;
      setIov(v, i, this.mem.address + hdr, nbd.NBD_REQUEST_BYTES);
      iov++;
      if (type === nbd.NBD_CMD_WRITE) {
        setIov(v, this.iovAt + iov * libc.iovec.SIZE, dataAddress, length);
        iov++;
        data += length;
      }
      this.tagState[tag] = TagState.OnWire;
      this.tagSeq[tag] = this.seq++;
    }
    if (iov === 0) return;
    this.sendIovs = iov;
    this.submitSend(0);
  }

  /** SENDMSG of the iovecs from index `first` (earlier ones were sent). */
  private submitSend(first: number): void {
    const v = this.view;
    const m = this.msgAt;
    for (let b = 0; b < libc.msghdr.SIZE; b += 4) v.setUint32(m + b, 0);
    setU64le(v, m + libc.msghdr.msg_iov, this.mem.address + this.iovAt + first * libc.iovec.SIZE);
    setU64le(v, m + libc.msghdr.msg_iovlen, this.sendIovs - first);
    this.sending = true;
    const g = this.gen;
    const w = this.ctx.getSqe();
    prepSendmsg(this.ctx.ring.sqes, w, this.fd, this.mem.address + m, libc.MSG_NOSIGNAL);
    this.connOps++;
    this.ctx.trackBackground(w, (res) => {
      this.connOps--;
      if (g !== this.gen) return this.closedOne();
      if (res < 0) {
        this.sending = false;
        return this.drop(`sending failed: ${errnoName(-res)}`);
      }
      // A stream socket may take part of the message: send the rest from where it stopped.
      let left = res;
      let i = first;
      for (; i < this.sendIovs; i++) {
        const at = this.iovAt + i * libc.iovec.SIZE;
        const len = getU64le(v, at + libc.iovec.iov_len);
        if (left < len) {
          setIov(v, at, getU64le(v, at) + left, len - left);
          break;
        }
        left -= len;
      }
      if (i < this.sendIovs) return this.submitSend(i);
      this.sending = false;
      this.flush();
    });
  }

  private readonly looked = { offset: 0, readLength: 0 };

  /** The reply parser's view of our requests. */
  private readonly sink: ReplySink = {
    lookup: (cookie) => {
      if (cookie >= this.depth || this.tagState[cookie] !== TagState.OnWire) return undefined;
      // One object for every reply (the reader copies both fields out at once): none per request.
      const l = this.looked;
      l.offset = this.tagOffset[cookie]!;
      l.readLength = this.tagType[cookie] === nbd.NBD_CMD_READ ? this.tagLength[cookie]! : 0;
      return l;
    },
    data: (tag, at, bytes) => {
      this.tagCovered[tag]! += bytes.length;
      const r = this.ctx.copyToRequest(tag, bytes, at);
      if (r < 0 && this.tagErrno[tag] === 0) this.tagErrno[tag] = -r;
    },
    hole: (tag, at, length) => {
      this.tagCovered[tag]! += length;
      const r = this.ctx.zeroRequest(tag, at, length);
      if (r < 0 && this.tagErrno[tag] === 0) this.tagErrno[tag] = -r;
    },
    error: (tag, errno, message) => {
      if (this.tagErrno[tag] === 0) this.tagErrno[tag] = errno || nbd.NBD_EIO;
      if (message) this.log(`nbd queue ${this.qid}: the server failed tag ${tag}'s request: ${errnoName(errno)}: ${message}`);
    },
    done: (tag) => this.replied(tag),
  };

  private replied(tag: number): void {
    const errno = this.tagErrno[tag]!;
    if (errno === nbd.NBD_ESHUTDOWN) {
      // The server is going away (proto.md ESHUTDOWN): the request is sent again on the next connection.
      this.drop('the server is shutting down (ESHUTDOWN)');
      return;
    }
    const type = this.tagType[tag]!;
    let res: number;
    if (errno !== 0) res = -serverErrno(errno);
    else if (type === nbd.NBD_CMD_READ && this.structured && this.tagCovered[tag]! < this.tagLength[tag]!) {
      this.log(`nbd queue ${this.qid}: the server ended tag ${tag}'s READ with ${this.tagCovered[tag]} of ${this.tagLength[tag]} bytes and no error; failing it`);
      res = -libc.EIO;
    } else res = type === nbd.NBD_CMD_READ || type === nbd.NBD_CMD_WRITE ? this.tagLength[tag]! : 0;
    this.tagState[tag] = TagState.Free;
    this.ctx.complete(tag, res);
  }

  // ---------------------------------------------------------------------------------------------
  // The connection
  // ---------------------------------------------------------------------------------------------

  /** The sockaddr for CONNECT, in `mem`; returns its length. */
  private writeAddress(): number {
    const a = this.device.address;
    const v = this.view;
    const at = this.addrAt;
    if ('path' in a) {
      v.setUint16(at + libc.sockaddr_un.sun_family, libc.AF_UNIX, true);
      const n = this.bytes.write(a.path, at + libc.sockaddr_un.sun_path, 'utf8');
      this.bytes[at + libc.sockaddr_un.sun_path + n] = 0;
      return libc.sockaddr_un.sun_path + n + 1;
    }
    if (isIP(a.host) === 4) {
      v.setUint16(at + libc.sockaddr_in.sin_family, libc.AF_INET, true);
      v.setUint16(at + libc.sockaddr_in.sin_port, a.port);
      a.host.split('.').forEach((p, i) => { this.bytes[at + libc.sockaddr_in.sin_addr + i] = Number(p); });
      return libc.sockaddr_in.SIZE;
    }
    v.setUint16(at + libc.sockaddr_in6.sin6_family, libc.AF_INET6, true);
    v.setUint16(at + libc.sockaddr_in6.sin6_port, a.port);
    ipv6Bytes(a.host).copy(this.bytes, at + libc.sockaddr_in6.sin6_addr);
    return libc.sockaddr_in6.SIZE;
  }

  private family(): number {
    const a = this.device.address;
    return 'path' in a ? libc.AF_UNIX : isIP(a.host) === 4 ? libc.AF_INET : libc.AF_INET6;
  }

  /** Puts SQE `w` on the ring as part of the current connection, with `cb` for its CQE (stale ones are only counted). */
  private connSqe(w: number, cb: (res: number) => void): void {
    const g = this.gen;
    this.connOps++;
    this.ctx.trackBackground(w, (res) => {
      this.connOps--;
      if (g !== this.gen || this.state === Conn.Closed) return this.closedOne();
      cb(res);
    });
  }

  /** Links a timeout behind SQE `w` (which must be the last one taken): the SQE fails with ECANCELED if it takes longer. */
  private linkTimeout(w: number, ms: number): void {
    addFlags(this.ctx.ring.sqes, w, uringAbi.IOSQE_IO_LINK);
    setTimespec(this.view, this.linkTsAt, ms);
    const t = this.ctx.getSqe();
    prepLinkTimeout(this.ctx.ring.sqes, t, this.mem.address + this.linkTsAt, 0);
    this.connOps++;
    this.ctx.trackBackground(t, () => {
      this.connOps--;
      this.closedOne();
    });
  }

  private connect(): void {
    this.state = Conn.Connecting;
    this.attempts++;
    const w = this.ctx.getSqe();
    prepSocket(this.ctx.ring.sqes, w, this.family(), libc.SOCK_STREAM | libc.SOCK_CLOEXEC, 0);
    this.connSqe(w, (res) => {
      if (res < 0) return this.drop(`cannot make a socket: ${errnoName(-res)}`);
      this.fd = res;
      if (!('path' in this.device.address)) {
        try {
          const s = this.mem.address + this.scratchAt;
          // Requests are small and latency-bound: no Nagle delay. A server that stops taking our
          // bytes for the reconnect timeout is a lost connection (TCP_USER_TIMEOUT).
          sys.setsockoptInt(res, libc.IPPROTO_TCP, libc.TCP_NODELAY, 1, s);
          sys.setsockoptInt(res, libc.IPPROTO_TCP, libc.TCP_USER_TIMEOUT, this.device.reconnectTimeoutMs, s);
          sys.setsockoptInt(res, libc.SOL_SOCKET, libc.SO_KEEPALIVE, 1, s);
        } catch (e) {
          this.log(`nbd queue ${this.qid}: setsockopt: ${(e as Error).message}`);
        }
      }
      const c = this.ctx.getSqe();
      prepConnect(this.ctx.ring.sqes, c, this.fd, this.mem.address + this.addrAt, this.addrLen);
      this.connSqe(c, (r) => {
        if (r < 0) return this.drop(r === -libc.ECANCELED ? `no answer to connect within ${CONNECT_TIMEOUT_MS} ms` : `cannot connect: ${errnoName(-r)}`);
        this.runHandshake(handshake(this.device.exportName), undefined);
      });
      this.linkTimeout(c, CONNECT_TIMEOUT_MS);
    });
  }

  /** Drives the handshake generator: each send or receive is an SQE, and its CQE resumes it. */
  private runHandshake(steps: Generator<HandshakeStep, ExportInfo, Buffer | undefined>, input: Buffer | undefined): void {
    let step: IteratorResult<HandshakeStep, ExportInfo>;
    try {
      step = steps.next(input);
    } catch (e) {
      return this.drop((e as Error).message, e instanceof NbdRefusal);
    }
    if (step.done) return this.ready(step.value);
    const s = step.value;
    if ('send' in s) {
      if (s.send.length > HANDSHAKE_BYTES) return this.drop('a handshake message too large');
      s.send.copy(this.bytes, this.hsAt);
      this.handshakeIo(true, 0, s.send.length, () => this.runHandshake(steps, undefined));
    } else {
      if (s.recv > HANDSHAKE_BYTES) return this.drop('a handshake message too large');
      this.handshakeIo(false, 0, s.recv, () => this.runHandshake(steps, Buffer.from(this.bytes.subarray(this.hsAt, this.hsAt + s.recv))));
    }
  }

  /** Sends or receives exactly bytes [done, length) of the handshake buffer, then calls `next`. */
  private handshakeIo(send: boolean, done: number, length: number, next: () => void): void {
    const w = this.ctx.getSqe();
    const addr = this.mem.address + this.hsAt + done;
    if (send) prepSend(this.ctx.ring.sqes, w, this.fd, addr, length - done, libc.MSG_NOSIGNAL);
    else prepRecv(this.ctx.ring.sqes, w, this.fd, addr, length - done, libc.MSG_WAITALL);
    this.connSqe(w, (res) => {
      if (res === -libc.ECANCELED) return this.drop(`the server did not answer the handshake within ${CONNECT_TIMEOUT_MS} ms`);
      if (res < 0) return this.drop(`handshake: ${errnoName(-res)}`);
      if (res === 0) return this.drop('the server closed the connection during the handshake');
      if (done + res < length) return this.handshakeIo(send, done + res, length, next);
      next();
    });
    this.linkTimeout(w, CONNECT_TIMEOUT_MS);
  }

  private ready(info: ExportInfo): void {
    const d = this.device;
    const size = Math.floor(info.size / d.logicalBlockSize) * d.logicalBlockSize;
    if (size !== d.sizeBytes) return this.drop(`the export now has ${info.size} bytes, not the device's ${d.sizeBytes}: not using it`, true);
    if (!d.readOnly && info.flags & nbd.NBD_FLAG_READ_ONLY) return this.drop('the export is now read-only: not using it', true);
    if (info.structured !== this.structured) {
      this.structured = info.structured;
      this.reader = new ReplyReader(this.sink, info.structured);
    }
    this.state = Conn.Ready;
    if (this.outageSince !== undefined) {
      this.counters[0]!++;
      const queued = this.qLen;
      this.log(`nbd queue ${this.qid}: reconnected to ${this.where} after ${Date.now() - this.outageSince} ms and ${this.attempts} attempt(s)${queued > 0 ? `; sending ${queued} held request(s) again` : ''}`);
    }
    this.outageSince = undefined;
    this.down = false;
    this.everReady = true;
    this.backoffMs = BACKOFF_FIRST_MS;
    this.attempts = 0;
    this.lastFailure = '';
    this.postRecv();
    this.flush();
  }

  /** The receive that stays posted while the connection is up; its bytes go to the reply parser. */
  private postRecv(drained = false): void {
    const w = this.ctx.getSqe();
    prepRecv(this.ctx.ring.sqes, w, this.fd, this.mem.address + this.recvAt, RECV_BYTES, 0);
    // A receive that came back short emptied the socket: the next one would only find nothing
    // and arm a poll, so it arms the poll at once (IORING_RECVSEND_POLL_FIRST, 5.19: older than
    // any ublk_drv that serves us), saving a futile receive per wake-up.
    if (drained) setIoprio(this.ctx.ring.sqes, w, uringAbi.IORING_RECVSEND_POLL_FIRST);
    this.connSqe(w, (res) => {
      if (res > 0) {
        try {
          this.reader.feed(this.bytes.subarray(this.recvAt, this.recvAt + res));
        } catch (e) {
          if (!(e instanceof NbdProtocolError)) throw e;
          return this.drop(`protocol error: ${e.message}`);
        }
        if (this.state === Conn.Ready) this.postRecv(res < RECV_BYTES);
        return;
      }
      this.drop(res === 0 ? 'the server closed the connection' : `receiving failed: ${errnoName(-res)}`);
    });
  }

  /**
   * The connection is over (or the attempt failed): shut the socket down so that its receive and
   * send end, hand the requests that were on it back to the queue, and reconnect once every
   * SQE of it has completed. `refused`: the server answered, but with something we cannot use.
   */
  private drop(reason: string, refused = false): void {
    if (this.state !== Conn.Ready && this.state !== Conn.Connecting) return;
    const wasReady = this.state === Conn.Ready;
    this.state = Conn.Closing;
    this.gen++;
    this.sending = false;
    this.reader.reset();
    // Requests sent and not answered go first, in the order they were sent.
    const onWire: number[] = [];
    for (let t = 0; t < this.depth; t++) if (this.tagState[t] === TagState.OnWire) onWire.push(t);
    onWire.sort((a, b) => this.tagSeq[a]! - this.tagSeq[b]!);
    if (onWire.length > 0) {
      const rest: number[] = [];
      for (let i = 0; i < this.qLen; i++) rest.push(this.queue[(this.qHead + i) % this.depth]!);
      this.qHead = 0;
      this.qLen = 0;
      for (const t of [...onWire, ...rest]) this.enqueue(t);
    }
    if (this.outageSince === undefined) this.outageSince = Date.now();
    const held = this.qLen;
    if (wasReady) {
      this.log(`nbd queue ${this.qid}: connection to ${this.where} lost (${reason}); holding ${held} request(s) and reconnecting`);
    } else if (reason !== this.lastFailure) {
      this.log(`nbd queue ${this.qid}: ${this.everReady ? 'reconnecting' : 'connecting'} to ${this.where} failed (${reason})${refused ? '' : '; trying again'}`);
    }
    this.lastFailure = reason;
    if (this.fd >= 0) {
      const w = this.ctx.getSqe();
      prepShutdown(this.ctx.ring.sqes, w, this.fd, libc.SHUT_RDWR);
      this.connOps++;
      this.ctx.trackBackground(w, () => {
        this.connOps--;
        this.closedOne();
      });
    }
    this.closedOne();
  }

  /** A CQE of an ended connection came in: once the last is in, the socket closes and a reconnect is timed. */
  private closedOne(): void {
    if (this.state !== Conn.Closing || this.connOps > 0) return;
    if (this.fd >= 0) {
      try {
        sys.close(this.fd);
      } catch { /* nothing to do */ }
      this.fd = -1;
    }
    this.state = Conn.Waiting;
    this.checkUnreachable();
    this.armRetry();
  }

  /** Past --reconnect-timeout without a server: fail what is held, and what comes, until it is back. */
  private checkUnreachable(): void {
    if (this.down || this.outageSince === undefined) return;
    const away = Date.now() - this.outageSince;
    if (away < this.device.reconnectTimeoutMs) return;
    this.down = true;
    const held = this.qLen;
    while (this.qLen > 0) {
      const tag = this.queue[this.qHead]!;
      this.qHead = (this.qHead + 1) % this.depth;
      this.qLen--;
      this.tagState[tag] = TagState.Free;
      this.counters[1]!++;
      this.ctx.complete(tag, -libc.EIO);
    }
    this.log(`nbd queue ${this.qid}: the NBD server at ${this.where} has been unreachable for ${(away / 1000).toFixed(1)} s (--reconnect-timeout ${this.device.reconnectTimeoutMs / 1000}): failing ${held} held request(s) and every new one with EIO until it is back; still trying to reconnect`);
  }

  private armRetry(): void {
    if (this.timerArmed) return;
    const w = this.ctx.getSqe();
    setTimespec(this.view, this.tsAt, this.backoffMs);
    prepTimeout(this.ctx.ring.sqes, w, this.mem.address + this.tsAt, 0, 0);
    this.timerArmed = true;
    this.ctx.trackBackground(w, () => {
      this.timerArmed = false;
      if (this.state !== Conn.Waiting) return;
      this.checkUnreachable();
      this.connect();
    });
    // The wait before the attempt after this one: longer, up to the ceiling. Never longer than
    // the reconnect timeout itself, so that it is noticed on time.
    this.backoffMs = Math.min(this.backoffMs * 2, BACKOFF_MAX_MS, Math.max(BACKOFF_FIRST_MS, this.device.reconnectTimeoutMs / 2));
  }
}

/** The errno a server's error value becomes for the block layer: proto.md's list as is, anything else EIO. */
function serverErrno(errno: number): number {
  switch (errno) {
    case nbd.NBD_EPERM: case nbd.NBD_EIO: case nbd.NBD_ENOMEM: case nbd.NBD_EINVAL: case nbd.NBD_ENOSPC:
    case nbd.NBD_EOVERFLOW: case nbd.NBD_ENOTSUP:
      return errno;
    default:
      return libc.EIO;
  }
}

function setU64le(v: DataView, at: number, value: number): void {
  v.setUint32(at, value >>> 0, true);
  v.setUint32(at + 4, Math.floor(value / 0x100000000), true);
}

function getU64le(v: DataView, at: number): number {
  return v.getUint32(at, true) + v.getUint32(at + 4, true) * 0x100000000;
}

function setIov(v: DataView, at: number, base: number, len: number): void {
  setU64le(v, at + libc.iovec.iov_base, base);
  setU64le(v, at + libc.iovec.iov_len, len);
}

/** struct __kernel_timespec {i64 tv_sec; i64 tv_nsec} for `ms` milliseconds. */
function setTimespec(v: DataView, at: number, ms: number): void {
  setU64le(v, at, Math.floor(ms / 1000));
  setU64le(v, at + 8, (ms % 1000) * 1_000_000);
}

/** The 16 bytes of an IPv6 address in text form (`::1`, `fe80::1`, `::ffff:1.2.3.4`). */
export function ipv6Bytes(text: string): Buffer {
  const out = Buffer.alloc(16);
  let s = text.replace(/%.*$/, '');
  const v4 = s.match(/(\d+\.\d+\.\d+\.\d+)$/);
  if (v4) {
    const p = v4[1]!.split('.').map(Number);
    s = s.slice(0, -v4[1]!.length) + `${((p[0]! << 8) | p[1]!).toString(16)}:${((p[2]! << 8) | p[3]!).toString(16)}`;
  }
  const [head, tail] = s.split('::') as [string, string | undefined];
  const h = head ? head.split(':') : [];
  const t = tail !== undefined && tail !== '' ? tail.split(':') : [];
  const groups = tail === undefined ? h : [...h, ...new Array<string>(8 - h.length - t.length).fill('0'), ...t];
  groups.forEach((g, i) => out.writeUInt16BE(parseInt(g, 16), i * 2));
  return out;
}
