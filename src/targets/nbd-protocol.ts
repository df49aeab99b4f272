/**
 * The NBD protocol as a client speaks it, with no I/O of its own: the handshake as a sequence
 * of "send these bytes" / "receive that many bytes" steps ({@link handshake}), the 28-byte
 * request ({@link encodeRequest}), and a reader that turns the server's reply stream, fed in
 * whatever pieces the socket delivers, into per-request events ({@link ReplyReader}).
 *
 * Keeping the bytes apart from the transport lets one implementation run on a queue's io_uring
 * (nbd.ts: SEND and RECV SQEs), on a Node socket (prepare's probe, {@link probeExport}) and in
 * host tests against real servers. Numbers are in nbd-abi.ts; the rules cited are proto.md's.
 */
import { connect as netConnect, type Socket } from 'node:net';
import * as nbd from './nbd-abi.js';

/** What the handshake learned about the export. */
export interface ExportInfo {
  /** Bytes. */
  size: number;
  /** Transmission flags (NBD_FLAG_*). */
  flags: number;
  /** The server agreed to structured replies (NBD_OPT_STRUCTURED_REPLY). */
  structured: boolean;
  /**
   * Block size constraints (NBD_INFO_BLOCK_SIZE), or proto.md's defaults for a server that sent
   * none: minimum 1, preferred 4096, maximum payload 32 MiB.
   */
  minimumBlock: number;
  preferredBlock: number;
  maximumPayload: number;
  /** The export was opened with NBD_OPT_GO (else the old NBD_OPT_EXPORT_NAME). */
  go: boolean;
}

/** One step of the handshake: bytes to send, or a count of bytes to receive (the step's result). */
export type HandshakeStep = { send: Buffer } | { recv: number };

/**
 * The server said something that trying again will not change (no such export, TLS required,
 * not an NBD server): `ublk add` fails with it, and a reconnect gives up at once on it.
 */
export class NbdRefusal extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NbdRefusal';
  }
}

/** The server broke the protocol (a wrong magic, a reply to nothing we asked): the connection is dropped. */
export class NbdProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NbdProtocolError';
  }
}

/** Longest option reply payload we accept: proto.md caps strings at 4096 bytes; INFO replies are tiny. */
const MAX_OPTION_REPLY = 64 * 1024;

function optionHeader(option: number, length: number): Buffer {
  const b = Buffer.alloc(16);
  b.writeBigUInt64BE(nbd.IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(length, 12);
  return b;
}

function replyErrorText(type: number, payload: Buffer): string {
  const name = nbd.NBD_REP_ERR_NAMES[type] ?? `error 0x${type.toString(16)}`;
  const text = payload.length > 0 ? payload.toString('utf8') : '';
  return text ? `${name}: ${text}` : name;
}

/**
 * The fixed newstyle handshake (proto.md "Fixed newstyle negotiation"), as steps: the driver
 * performs each and resumes the generator with the received bytes (undefined after a send).
 *
 *   1. The server's greeting: NBDMAGIC, IHAVEOPT, handshake flags. An oldstyle server, or one
 *      without NBD_FLAG_FIXED_NEWSTYLE, is refused: option haggling needs fixed newstyle.
 *   2. Our client flags: fixed newstyle, and no zeroes if the server offered it.
 *   3. NBD_OPT_STRUCTURED_REPLY: reads then arrive as chunks, holes without their zeros. A
 *      server may refuse it (nbd-server before 3.25 does): simple replies are spoken then.
 *   4. NBD_OPT_GO with the export's name, asking for NBD_INFO_BLOCK_SIZE: replies of
 *      NBD_REP_INFO (size and flags, block sizes) until NBD_REP_ACK opens transmission. A server
 *      that does not know NBD_OPT_GO (NBD_REP_ERR_UNSUP) gets NBD_OPT_EXPORT_NAME instead, whose
 *      only reply is the size and flags (and 124 zeros unless NBD_FLAG_C_NO_ZEROES).
 */
export function* handshake(exportName: string): Generator<HandshakeStep, ExportInfo, Buffer | undefined> {
  const greeting = (yield { recv: 18 })!;
  if (greeting.readBigUInt64BE(0) !== nbd.NBDMAGIC) {
    throw new NbdRefusal('the server is not an NBD server (its first bytes are not NBDMAGIC)');
  }
  const second = greeting.readBigUInt64BE(8);
  if (second === nbd.NBD_OLDSTYLE_MAGIC) {
    throw new NbdRefusal('the server speaks the oldstyle NBD handshake, which has no export names or options; configure it for newstyle (nbd-server has done so by default since 3.0)');
  }
  if (second !== nbd.IHAVEOPT) throw new NbdRefusal('the server is not a newstyle NBD server (no IHAVEOPT after NBDMAGIC)');
  const handshakeFlags = greeting.readUInt16BE(16);
  if (!(handshakeFlags & nbd.NBD_FLAG_FIXED_NEWSTYLE)) {
    throw new NbdRefusal('the NBD server does not speak fixed newstyle negotiation (NBD_FLAG_FIXED_NEWSTYLE), which this client needs');
  }
  const noZeroes = (handshakeFlags & nbd.NBD_FLAG_NO_ZEROES) !== 0;
  const clientFlags = Buffer.alloc(4);
  clientFlags.writeUInt32BE(nbd.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? nbd.NBD_FLAG_C_NO_ZEROES : 0));
  yield { send: clientFlags };

  /** One option reply: its type and payload, checked to answer `option`. */
  function* reply(option: number): Generator<HandshakeStep, { type: number; payload: Buffer }, Buffer | undefined> {
    const h = (yield { recv: 20 })!;
    if (h.readBigUInt64BE(0) !== nbd.NBD_REP_MAGIC) throw new NbdProtocolError('an option reply without NBD_REP_MAGIC');
    const answered = h.readUInt32BE(8);
    if (answered !== option) {
      throw new NbdProtocolError(`a reply to ${nbd.NBD_OPT_NAMES[answered] ?? answered} while ${nbd.NBD_OPT_NAMES[option]} was asked`);
    }
    const type = h.readUInt32BE(12);
    const length = h.readUInt32BE(16);
    if (length > MAX_OPTION_REPLY) throw new NbdProtocolError(`an option reply of ${length} bytes (at most ${MAX_OPTION_REPLY} expected)`);
    const payload = length > 0 ? (yield { recv: length })! : Buffer.alloc(0);
    return { type, payload };
  }

  yield { send: optionHeader(nbd.NBD_OPT_STRUCTURED_REPLY, 0) };
  let structured = false;
  for (;;) {
    const r = yield* reply(nbd.NBD_OPT_STRUCTURED_REPLY);
    if (r.type === nbd.NBD_REP_ACK) structured = true;
    else if (r.type & nbd.NBD_REP_FLAG_ERROR) structured = false;
    else continue; // proto.md: a client ignores reply types it does not know, until the final one
    break;
  }

  const name = Buffer.from(exportName, 'utf8');
  if (name.length > 4096) throw new NbdRefusal('the export name is longer than the 4096 bytes NBD allows');
  const go = Buffer.alloc(4 + name.length + 2 + 2);
  go.writeUInt32BE(name.length, 0);
  name.copy(go, 4);
  go.writeUInt16BE(1, 4 + name.length);
  go.writeUInt16BE(nbd.NBD_INFO_BLOCK_SIZE, 6 + name.length);
  yield { send: Buffer.concat([optionHeader(nbd.NBD_OPT_GO, go.length), go]) };
  const info: ExportInfo = {
    size: -1, flags: 0, structured, minimumBlock: 1, preferredBlock: 4096, maximumPayload: 32 << 20, go: true,
  };
  for (;;) {
    const r = yield* reply(nbd.NBD_OPT_GO);
    if (r.type === nbd.NBD_REP_ACK) break;
    if (r.type === nbd.NBD_REP_INFO) {
      if (r.payload.length < 2) throw new NbdProtocolError('an NBD_REP_INFO shorter than its type');
      const kind = r.payload.readUInt16BE(0);
      if (kind === nbd.NBD_INFO_EXPORT && r.payload.length >= 12) {
        info.size = Number(r.payload.readBigUInt64BE(2));
        info.flags = r.payload.readUInt16BE(10);
      } else if (kind === nbd.NBD_INFO_BLOCK_SIZE && r.payload.length >= 14) {
        info.minimumBlock = r.payload.readUInt32BE(2);
        info.preferredBlock = r.payload.readUInt32BE(6);
        info.maximumPayload = r.payload.readUInt32BE(10);
      }
      continue;
    }
    if (r.type === nbd.NBD_REP_ERR_UNSUP) {
      // A server from before NBD_OPT_GO: the old way, which ends negotiation at once.
      info.go = false;
      yield { send: Buffer.concat([optionHeader(nbd.NBD_OPT_EXPORT_NAME, name.length), name]) };
      const e = (yield { recv: noZeroes ? 10 : 134 })!;
      info.size = Number(e.readBigUInt64BE(0));
      info.flags = e.readUInt16BE(8);
      break;
    }
    if (r.type & nbd.NBD_REP_FLAG_ERROR) {
      const why = replyErrorText(r.type, r.payload);
      if (r.type === nbd.NBD_REP_ERR_UNKNOWN) throw new NbdRefusal(`the server has no export named '${exportName}' (${why}); pick one with --export NAME`);
      if (r.type === nbd.NBD_REP_ERR_TLS_REQD) throw new NbdRefusal(`the server requires TLS for export '${exportName}' (${why}), which this client does not speak; export it without TLS on a trusted network or a Unix socket`);
      if (r.type === nbd.NBD_REP_ERR_SHUTDOWN) throw new NbdProtocolError(`the server is shutting down (${why})`);
      throw new NbdRefusal(`the server refused export '${exportName}' (${why})`);
    }
    // Any other reply type: ignored, as proto.md asks of a client that does not know it.
  }
  if (info.size < 0) throw new NbdProtocolError('the server opened the export without telling its size (no NBD_INFO_EXPORT)');
  if (info.minimumBlock < 1 || (info.minimumBlock & (info.minimumBlock - 1)) !== 0 || info.maximumPayload < info.minimumBlock) {
    throw new NbdProtocolError(`the server sent impossible block sizes (minimum ${info.minimumBlock}, preferred ${info.preferredBlock}, maximum ${info.maximumPayload})`);
  }
  return info;
}

/** Where an NBD server listens. */
export type NbdAddress = { host: string; port: number } | { path: string };

export function describeAddress(a: NbdAddress): string {
  return 'path' in a ? `unix:${a.path}` : `${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}`;
}

/**
 * Runs the handshake on a Node socket: `ublk add`'s probe on the main thread, which learns the
 * export's size and flags before the device exists and refuses what cannot work (no server, no
 * such export) before anything is made. The connection is then closed politely (NBD_CMD_DISC).
 */
export async function probeExport(address: NbdAddress, exportName: string, timeoutMs = 10_000): Promise<ExportInfo> {
  const socket: Socket = 'path' in address ? netConnect(address.path) : netConnect(address.port, address.host);
  let pending: Buffer = Buffer.alloc(0);
  let waiter: (() => void) | undefined;
  let failure: Error | undefined;
  let ended = false;
  socket.on('data', (d: Buffer) => {
    pending = pending.length ? Buffer.concat([pending, d]) : d;
    waiter?.();
  });
  socket.on('error', (e) => {
    failure = e;
    waiter?.();
  });
  socket.on('end', () => {
    ended = true;
    waiter?.();
  });
  const timer = setTimeout(() => {
    failure = new Error(`no answer from the NBD server at ${describeAddress(address)} within ${timeoutMs} ms`);
    waiter?.();
  }, timeoutMs);
  const recv = async (n: number): Promise<Buffer> => {
    while (pending.length < n) {
      if (failure) throw failure;
      if (ended) throw new NbdProtocolError('the server closed the connection during the handshake');
      await new Promise<void>((resolve) => { waiter = resolve; });
      waiter = undefined;
    }
    const b = pending.subarray(0, n);
    pending = pending.subarray(n);
    return b;
  };
  try {
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const steps = handshake(exportName);
    let input: Buffer | undefined;
    for (;;) {
      const s = steps.next(input);
      if (s.done) {
        const disc = encodeRequest(Buffer.alloc(nbd.NBD_REQUEST_BYTES), 0, nbd.NBD_CMD_DISC, 0, 0, 0, 0);
        socket.end(disc);
        return s.value;
      }
      if ('send' in s.value) {
        socket.write(s.value.send);
        input = undefined;
      } else input = await recv(s.value.recv);
    }
  } finally {
    clearTimeout(timer);
    socket.destroy();
  }
}

/**
 * Writes a request header into `into` at `at`: returns `into`. The cookie is ours to choose (we
 * use the tag, below 2^32). The 64-bit fields go as two 32-bit halves: no BigInt per request.
 */
export function encodeRequest(into: Buffer, at: number, type: number, flags: number, cookie: number, offset: number, length: number): Buffer {
  into.writeUInt32BE(nbd.NBD_REQUEST_MAGIC, at);
  into.writeUInt16BE(flags, at + 4);
  into.writeUInt16BE(type, at + 6);
  into.writeUInt32BE(0, at + 8);
  into.writeUInt32BE(cookie, at + 12);
  into.writeUInt32BE(Math.floor(offset / 0x100000000), at + 16);
  into.writeUInt32BE(offset >>> 0, at + 20);
  into.writeUInt32BE(length, at + 24);
  return into;
}

/** What the {@link ReplyReader} tells its owner, per request (by cookie). */
export interface ReplySink {
  /**
   * The request this cookie names, if it is one we sent and is still waiting: its offset and
   * the bytes its data takes in a reply (a READ's length, 0 for the rest). Undefined for a
   * cookie we never sent: the reader throws an NbdProtocolError. The reader copies both fields
   * out at once, so the object may be reused.
   */
  lookup(cookie: number): { offset: number; readLength: number } | undefined;
  /** READ data for `cookie` at byte `at` of the request; `bytes` is valid only during the call. */
  data(cookie: number, at: number, bytes: Buffer): void;
  /** A hole: `length` bytes at byte `at` of the request read as zeros. */
  hole(cookie: number, at: number, length: number): void;
  /** The server reports an error (an errno of proto.md's list) for the request. */
  error(cookie: number, errno: number, message: string): void;
  /** The request's reply is complete. */
  done(cookie: number): void;
}

const enum ReadState {
  /** Reading a reply's fixed header (simple or structured). */
  Header,
  /** Reading a chunk's own fields after the structured header (offset, hole size, error). */
  ChunkFields,
  /** Streaming READ data to the sink. */
  Payload,
  /** Skipping a chunk we do not use. */
  Skip,
}

/** A big-endian 64-bit field as a number: exact below 2^53, beyond any device offset. */
function readU64(b: Buffer, at: number): number {
  return b.readUInt32BE(at) * 0x100000000 + b.readUInt32BE(at + 4);
}

/**
 * Parses the server's replies (proto.md "Simple reply message", "Structured reply chunk
 * message") from a byte stream fed in arbitrary pieces: the recv buffer of a socket that
 * delivered half a header, or forty replies at once. READ data is handed on as it arrives, so
 * no reply is ever buffered whole.
 */
export class ReplyReader {
  private state = ReadState.Header;
  /**
   * A header or a chunk's fields that arrived split across pieces, gathered here (the longest:
   * an error chunk's fields). One that arrived whole is parsed where it lies in the piece.
   */
  private readonly head = Buffer.alloc(4096 + 16);
  private have = 0;
  private need = 4;
  private simple = false;
  private cookie = 0;
  private reqOffset = 0;
  private readLength = 0;
  private chunkFlags = 0;
  private chunkType = 0;
  private chunkLength = 0;
  /** Payload: where in the request the next byte goes, and how many are left. */
  private at = 0;
  private left = 0;

  constructor(private readonly sink: ReplySink, private readonly structured: boolean) {}

  /** Forgets a partial reply (the connection it came from is gone). */
  reset(): void {
    this.nextHeader();
  }

  /** Consumes `bytes` (valid only during the call). Throws NbdProtocolError on a broken stream. */
  feed(bytes: Buffer): void {
    let p = 0;
    const n = bytes.length;
    while (p < n) {
      const state = this.state;
      if (state === ReadState.Payload || state === ReadState.Skip) {
        const take = Math.min(this.left, n - p);
        if (state === ReadState.Payload) this.sink.data(this.cookie, this.at, bytes.subarray(p, p + take));
        this.at += take;
        this.left -= take;
        p += take;
        if (this.left === 0) this.chunkDone();
        continue;
      }
      if (this.have === 0) {
        // The usual case, replies arriving by the dozen: the whole header (or the chunk's
        // fields) is in this piece, so it is parsed where it lies, with no copy.
        const whole = state === ReadState.Header && n - p >= 4 ? this.headerBytes(bytes.readUInt32BE(p)) : this.need;
        if (n - p >= whole) {
          const at = p;
          p += whole;
          this.parse(bytes, at);
          continue;
        }
      }
      const take = Math.min(this.need - this.have, n - p);
      bytes.copy(this.head, this.have, p, p + take);
      this.have += take;
      p += take;
      if (this.have < this.need) continue;
      if (state === ReadState.Header && this.need === 4) {
        this.need = this.headerBytes(this.head.readUInt32BE(0)); // the magic says how long the header is
        continue;
      }
      this.have = 0;
      this.parse(this.head, 0);
    }
  }

  /** The length of the header that starts with `magic` (proto.md: simple 16, structured 20 bytes). */
  private headerBytes(magic: number): number {
    if (magic === nbd.NBD_SIMPLE_REPLY_MAGIC) return nbd.NBD_SIMPLE_REPLY_BYTES;
    if (magic === nbd.NBD_STRUCTURED_REPLY_MAGIC && this.structured) return nbd.NBD_STRUCTURED_REPLY_BYTES;
    throw new NbdProtocolError(`a reply with magic 0x${magic.toString(16)}`);
  }

  /** A whole header or chunk-fields block is at `h[at...]`: act on it. */
  private parse(h: Buffer, at: number): void {
    if (this.state === ReadState.Header) {
      this.simple = h.readUInt32BE(at) === nbd.NBD_SIMPLE_REPLY_MAGIC;
      this.cookie = this.checkCookie(h.readUInt32BE(at + 8), h.readUInt32BE(at + 12));
      if (this.simple) {
        const errno = h.readUInt32BE(at + 4);
        if (errno !== 0) {
          // proto.md: an error reply to a READ carries no data (with structured replies off).
          this.sink.error(this.cookie, errno, '');
          this.replyDone();
        } else if (this.readLength > 0) {
          this.startPayload(ReadState.Payload, 0, this.readLength);
        } else this.replyDone();
        return;
      }
      this.chunkFlags = h.readUInt16BE(at + 4);
      this.chunkType = h.readUInt16BE(at + 6);
      this.chunkLength = h.readUInt32BE(at + 16);
      const t = this.chunkType;
      if (t === nbd.NBD_REPLY_TYPE_NONE) {
        if (this.chunkLength !== 0) throw new NbdProtocolError('an NBD_REPLY_TYPE_NONE chunk with a payload');
        this.chunkDone();
      } else if (t === nbd.NBD_REPLY_TYPE_OFFSET_DATA) this.fields(8);
      else if (t === nbd.NBD_REPLY_TYPE_OFFSET_HOLE) this.fields(12);
      else if (t & nbd.NBD_REPLY_TYPE_ERROR_BIT) {
        if (this.chunkLength < 6 || this.chunkLength > this.head.length) {
          throw new NbdProtocolError(`an error chunk of ${this.chunkLength} bytes`);
        }
        this.fields(this.chunkLength);
      } else this.startPayload(ReadState.Skip, 0, this.chunkLength); // BLOCK_STATUS or unknown: not asked for, skipped
      return;
    }
    // ChunkFields: the chunk's own fields, which follow its structured header.
    const t = this.chunkType;
    if (t === nbd.NBD_REPLY_TYPE_OFFSET_DATA) {
      const offset = this.within(readU64(h, at), this.chunkLength - 8);
      this.startPayload(ReadState.Payload, offset, this.chunkLength - 8);
    } else if (t === nbd.NBD_REPLY_TYPE_OFFSET_HOLE) {
      const size = h.readUInt32BE(at + 8);
      const offset = this.within(readU64(h, at), size);
      this.sink.hole(this.cookie, offset, size);
      this.chunkDone();
    } else {
      const errno = h.readUInt32BE(at);
      const msgLen = h.readUInt16BE(at + 4);
      const message = h.toString('utf8', at + 6, at + 6 + Math.min(msgLen, this.chunkLength - 6));
      this.sink.error(this.cookie, errno === 0 ? nbd.NBD_EIO : errno, message);
      this.chunkDone();
    }
  }

  /** The cookie (a 64-bit handle, read as two 32-bit halves: no BigInt per reply) of a request in flight. */
  private checkCookie(high: number, low: number): number {
    const req = high === 0 ? this.sink.lookup(low) : undefined;
    if (req === undefined) throw new NbdProtocolError(`a reply for cookie ${high * 0x100000000 + low}, which names no request in flight`);
    this.reqOffset = req.offset;
    this.readLength = req.readLength;
    return low;
  }

  /** A chunk's byte range [offset, offset+length) as a position in the request, or a protocol error. */
  private within(offset: number, length: number): number {
    const at = offset - this.reqOffset;
    if (at < 0 || length < 0 || at + length > this.readLength) {
      throw new NbdProtocolError(`a read chunk of ${length} bytes at ${offset}, outside the request (${this.readLength} bytes at ${this.reqOffset})`);
    }
    return at;
  }

  private fields(length: number): void {
    this.state = ReadState.ChunkFields;
    this.need = length;
  }

  private startPayload(state: ReadState, at: number, length: number): void {
    this.state = state;
    this.at = at;
    this.left = length;
    if (length === 0) this.chunkDone();
  }

  private chunkDone(): void {
    // A simple reply is one "chunk" that is always the last.
    if (this.simple || this.chunkFlags & nbd.NBD_REPLY_FLAG_DONE) this.replyDone();
    else this.nextHeader();
  }

  private replyDone(): void {
    const cookie = this.cookie;
    this.nextHeader();
    this.sink.done(cookie);
  }

  private nextHeader(): void {
    this.state = ReadState.Header;
    this.have = 0;
    this.need = 4;
  }
}
