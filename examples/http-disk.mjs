// A read-only disk whose bytes live on a web server:
//
//   ublk add -t ./examples/http-disk.mjs --url http://host/disk.img [--cache-mb 64] [--block-kb 128] [--timeout-ms 10000]
//
// How it works. prepare() runs once, on the main thread: it asks the server how large the image
// is (a HEAD request, or a `Range: bytes=0-0` GET when HEAD does not say) and checks that the
// server answers range requests, since every read is one. open() runs in each queue's thread and
// gives that queue a cache of fixed-size blocks (--block-kb) with room for --cache-mb of them.
// A read takes the blocks it covers from the cache; the blocks it lacks are fetched with one
// ranged GET per run of adjacent missing blocks, over kept-alive connections, and a block
// another read is already fetching is waited for rather than fetched twice. A GET that fails is
// tried again twice before the read fails with EIO.
//
// Each queue has its own cache (queues are threads with separate heaps): the memory used is up
// to --cache-mb per queue, and a block read through two queues is fetched twice. The image must
// not change while it is served: nothing checks (an ETag and If-Range would).
import http from 'node:http';
import https from 'node:https';
import { defineAsyncTarget, TargetError } from 'ublk';

/** The sector size: the device is the image's size rounded down to a multiple of it. */
const SECTOR = 512;
/** Largest request the kernel sends us: with 128 KiB blocks, one GET of at most 5 blocks. */
const MAX_IO_BYTES = 512 * 1024;
/** A failed GET is tried this many more times, after BACKOFF_MS, then twice that, ... */
const RETRIES = 2;
const BACKOFF_MS = 100;
/** Connections per queue: reads beyond that wait for a free one (the agent queues them). */
const MAX_SOCKETS = 8;

/** Indexes into queue.counters, in the order of the definition's `counters`. */
const HITS = 0;
const MISSES = 1;
const FETCHES = 2;

const OPTIONS = ['url', 'cacheMb', 'blockKb', 'timeoutMs'];

/**
 * @typedef {object} Settings What prepare() learned, handed to every queue as `queue.device`.
 * @property {string} url
 * @property {number} imageBytes the image's size, as the server told it
 * @property {number} sizeBytes the device's size: imageBytes rounded down to 512
 * @property {number} blockBytes the cache's unit, and of every GET's alignment
 * @property {number} cacheBytes the cache's size in each queue
 * @property {number} timeoutMs how long one GET may take
 */

export default defineAsyncTarget({
  name: 'http-disk',
  usage: [
    '  --url URL          the disk image (http:// or https://); the server must answer range requests',
    '  --cache-mb N       cache per queue, in MiB (default 64; 0: no cache)',
    '  --block-kb N       the unit of the cache and of each GET, in KiB (default 128)',
    '  --timeout-ms N     how long one GET may take before it is tried again (default 10000)',
    '',
  ].join('\n'),
  counters: ['cacheHits', 'cacheMisses', 'fetches'],

  /**
   * Main thread, once: checks the options, asks the server for the image's size.
   * @param {Record<string, string | true>} options from parseLongOptions (`--cache-mb 64` is `{ cacheMb: '64' }`)
   * @returns {Promise<import('ublk').DeviceSpec>}
   */
  async prepare(options) {
    for (const key of Object.keys(options)) {
      if (!OPTIONS.includes(key)) throw new TargetError(`http-disk: unknown option --${kebab(key)} (it takes ${OPTIONS.map((o) => `--${kebab(o)}`).join(', ')})`);
    }
    const url = checkUrl(options.url);
    const blockBytes = wholeNumber(options.blockKb, '--block-kb', 128, 1, 16384) * 1024;
    const cacheBytes = wholeNumber(options.cacheMb, '--cache-mb', 64, 0, 1 << 20) * 1024 * 1024;
    const timeoutMs = wholeNumber(options.timeoutMs, '--timeout-ms', 10000, 1, 3600_000);

    const imageBytes = await imageSize(url, timeoutMs);
    const sizeBytes = imageBytes - (imageBytes % SECTOR);
    if (sizeBytes === 0) {
      throw new TargetError(`http-disk: ${url} is ${imageBytes} bytes, less than one ${SECTOR}-byte sector: a disk image is at least that (pad it with \`truncate -s 512 FILE\`)`);
    }
    if (sizeBytes !== imageBytes) {
      // Not an error (a disk image with a trailer still works), but the user should know.
      process.stderr.write(`http-disk: ${url} is ${imageBytes} bytes, not a multiple of ${SECTOR}: the disk is its first ${sizeBytes} bytes, the last ${imageBytes - sizeBytes} cannot be read\n`);
    }
    /** @type {Settings} */
    const settings = { url, imageBytes, sizeBytes, blockBytes, cacheBytes, timeoutMs };
    return {
      sizeBytes,
      readOnly: true,
      maxIoBytes: MAX_IO_BYTES,
      describe: { url, imageBytes, unreadableBytes: imageBytes - sizeBytes, blockBytes, cacheBytesPerQueue: cacheBytes },
      queueData: settings,
    };
  },

  /**
   * Each queue's thread: a cache, a connection pool, and the functions that use them.
   * @param {unknown} _options the same options (prepare already turned them into `queue.device`)
   * @param {import('ublk').AsyncQueueInfo} queue
   * @returns {import('ublk').AsyncHandlers}
   */
  open(_options, queue) {
    const settings = /** @type {Settings} */ (queue.device);
    const { sizeBytes, blockBytes: B } = settings;
    const client = settings.url.startsWith('https:') ? https : http;
    // keepAlive: a read's GET reuses an idle connection instead of opening one (a TCP, and
    // maybe a TLS, handshake per read would cost more than the transfer).
    const agent = new client.Agent({ keepAlive: true, maxSockets: MAX_SOCKETS });
    const cache = new BlockCache(Math.floor(settings.cacheBytes / B));
    /** Blocks a GET is under way for: block index -> its data when the GET is done. */
    const inFlight = new Map();
    let closed = false;

    /**
     * Bytes [start, end] of the image (end included, as in a Range header), trying again after
     * a failure; the last failure becomes an EIO with a line in the log.
     * @returns {Promise<Buffer>}
     */
    async function fetchRange(start, end) {
      for (let attempt = 0; ; attempt++) {
        queue.counters[FETCHES]++;
        try {
          return await getRange(client, agent, settings, start, end);
        } catch (e) {
          if (attempt === RETRIES || closed) {
            const why = /** @type {Error} */ (e).message;
            queue.log(`http-disk queue ${queue.qid}: GET ${settings.url} bytes ${start}-${end} failed ${attempt + 1} times (last: ${why}); the read fails with EIO`);
            throw Object.assign(new Error(`GET bytes ${start}-${end}: ${why}`), { code: 'EIO', cause: e });
          }
          await new Promise((resolve) => setTimeout(resolve, BACKOFF_MS * 2 ** attempt));
        }
      }
    }

    /**
     * Starts one GET for blocks first..last and records a Promise of each block in inFlight,
     * so that other reads of these blocks wait for this GET instead of starting their own.
     */
    function fetchBlocks(first, last) {
      const start = first * B;
      const run = fetchRange(start, Math.min((last + 1) * B, sizeBytes) - 1);
      for (let b = first; b <= last; b++) {
        const from = b * B - start;
        const block = run.then((body) => {
          // A copy of its own: a view would keep the whole run's buffer alive as long as any
          // of its blocks is cached, and the cache's size would no longer be what it says.
          const data = Buffer.from(body.subarray(from, from + B));
          cache.set(b, data);
          return data;
        });
        inFlight.set(b, block);
        // Once settled, the block is in the cache (or failed: the next read tries again). The
        // second function also handles the rejection, so a failed GET that no read waits on any
        // more is not an "unhandled rejection" (the reads that wait see the error themselves).
        const done = () => inFlight.delete(b);
        block.then(done, done);
      }
    }

    return {
      /**
       * Fills buf with the image's bytes at offset. Returns nothing when every block was cached
       * (the request is answered at once), else a Promise that settles when the blocks it
       * lacked have arrived.
       * @param {number} offset
       * @param {Buffer} buf
       */
      read(offset, buf) {
        const first = Math.floor(offset / B);
        const last = Math.floor((offset + buf.length - 1) / B);
        /** @type {Buffer[]} the blocks first..last, as they become known */
        const blocks = new Array(last - first + 1);

        // 1. What the cache has.
        for (let b = first; b <= last; b++) {
          const data = cache.get(b);
          if (data) blocks[b - first] = data;
          queue.counters[data ? HITS : MISSES]++;
        }
        // 2. One GET per run of adjacent blocks that are neither cached nor being fetched.
        const lacking = (b) => b <= last && !blocks[b - first] && !inFlight.has(b);
        for (let b = first; b <= last; b++) {
          if (!lacking(b)) continue;
          let end = b;
          while (lacking(end + 1)) end++;
          fetchBlocks(b, end);
          b = end;
        }
        // 3. Wait for the blocks being fetched (by this read or by another), then copy.
        const copyOut = () => {
          for (let i = 0; i < blocks.length; i++) {
            const blockStart = (first + i) * B;
            const from = Math.max(offset, blockStart);
            const to = Math.min(offset + buf.length, blockStart + blocks[i].length);
            blocks[i].copy(buf, from - offset, from - blockStart, to - blockStart);
          }
        };
        const waits = [];
        for (let b = first; b <= last; b++) {
          if (!blocks[b - first]) waits.push(inFlight.get(b).then((data) => { blocks[b - first] = data; }));
        }
        if (waits.length === 0) return copyOut();
        return Promise.all(waits).then(copyOut);
      },

      /** Never sent (the device is read-only); refused as a read-only medium would. */
      write() {
        throw Object.assign(new Error('http-disk is read-only'), { code: 'EROFS' });
      },

      /** Closes the kept-alive connections; GETs still under way fail and are not tried again. */
      close() {
        closed = true;
        agent.destroy();
        cache.clear();
      },
    };
  },
});

/**
 * A least-recently-used cache of blocks. A Map iterates in insertion order, so deleting and
 * re-inserting a key on each use keeps the least recently used block first, the one to evict.
 */
class BlockCache {
  /** @param {number} capacity how many blocks it keeps (0: none) */
  constructor(capacity) {
    this.capacity = capacity;
    /** @type {Map<number, Buffer>} */
    this.blocks = new Map();
  }

  /** @param {number} index @returns {Buffer | undefined} */
  get(index) {
    const data = this.blocks.get(index);
    if (data) {
      this.blocks.delete(index);
      this.blocks.set(index, data);
    }
    return data;
  }

  /** @param {number} index @param {Buffer} data */
  set(index, data) {
    if (this.capacity === 0) return;
    this.blocks.delete(index);
    this.blocks.set(index, data);
    if (this.blocks.size > this.capacity) this.blocks.delete(this.blocks.keys().next().value);
  }

  clear() {
    this.blocks.clear();
  }
}

/**
 * One ranged GET: bytes [start, end] of the image. Anything but a 206 whose Content-Range is
 * the range asked for, with exactly that many bytes, within settings.timeoutMs, is an error.
 * @param {typeof http | typeof https} client
 * @param {http.Agent} agent
 * @param {Settings} settings
 * @returns {Promise<Buffer>}
 */
async function getRange(client, agent, settings, start, end) {
  const res = await send(client, settings.url, {
    agent, headers: { Range: `bytes=${start}-${end}` }, signal: AbortSignal.timeout(settings.timeoutMs),
  });
  const length = end - start + 1;
  if (res.statusCode !== 206) {
    res.destroy(); // a 200 would be the whole image: do not read it
    throw new Error(`HTTP ${res.statusCode} ${res.statusMessage ?? ''}`.trimEnd());
  }
  const range = res.headers['content-range'];
  if (range !== `bytes ${start}-${end}/${settings.imageBytes}`) {
    res.destroy();
    throw new Error(`the server sent Content-Range ${range ?? '(none)'} for bytes ${start}-${end} of ${settings.imageBytes} (did the image change?)`);
  }
  const body = Buffer.allocUnsafe(length);
  let got = 0;
  for await (const chunk of res) { // throws if the connection breaks or the timeout fires
    if (got + chunk.length > length) {
      res.destroy();
      throw new Error(`the server sent more than the ${length} bytes asked for`);
    }
    chunk.copy(body, got);
    got += chunk.length;
  }
  if (got !== length) throw new Error(`the server sent ${got} of ${length} bytes`);
  return body;
}

/**
 * Sends a request without a body and resolves with the response once its headers are in (the
 * body is the caller's to read or destroy).
 * @param {typeof http | typeof https} client
 * @param {string} url
 * @param {http.RequestOptions} options
 * @returns {Promise<http.IncomingMessage>}
 */
function send(client, url, options) {
  return new Promise((resolve, reject) => {
    client.request(url, options, resolve).on('error', reject).end();
  });
}

/**
 * The image's size in bytes, from a HEAD (when it gives Content-Length and Accept-Ranges: bytes)
 * or from the Content-Range of a `Range: bytes=0-0` GET (which also proves ranges work).
 * Throws a TargetError that says what to do when the server cannot be used.
 * @param {string} url
 * @param {number} timeoutMs
 * @returns {Promise<number>}
 */
async function imageSize(url, timeoutMs) {
  const client = url.startsWith('https:') ? https : http;
  const ask = async (method, headers) => {
    try {
      const res = await send(client, url, { method, headers, agent: false, signal: AbortSignal.timeout(timeoutMs) });
      res.destroy(); // only the headers matter
      if (res.statusCode >= 300 && res.statusCode < 400 && res.headers.location) {
        throw new TargetError(`http-disk: ${url} redirects to ${new URL(res.headers.location, url).href}: pass that as --url`);
      }
      return res;
    } catch (e) {
      if (e instanceof TargetError) throw e;
      const why = e.name === 'AbortError' || e.name === 'TimeoutError' ? `no answer within ${timeoutMs} ms` : e.message;
      throw new TargetError(`http-disk: cannot reach ${url} (${why}): is the server up, and the URL right?`);
    }
  };

  const head = await ask('HEAD', {});
  const length = head.headers['content-length'];
  if (head.statusCode === 200 && head.headers['accept-ranges'] === 'bytes' && length !== undefined && /^\d+$/.test(length)) {
    return Number(length);
  }
  // HEAD did not say it all (some servers refuse HEAD, or do not advertise ranges they serve):
  // ask for the first byte, which a server that honours ranges answers with 206 and the size.
  const probe = await ask('GET', { Range: 'bytes=0-0' });
  if (probe.statusCode === 206) {
    const m = /^bytes 0-0\/(\d+)$/.exec(probe.headers['content-range'] ?? '');
    if (!m) throw new TargetError(`http-disk: ${url} answered a range request without the image's size (Content-Range: ${probe.headers['content-range'] ?? 'none'}): serve it from a server that states it`);
    return Number(m[1]);
  }
  if (probe.statusCode === 200) {
    throw new TargetError(`http-disk: ${url} does not honour range requests (a GET with Range: bytes=0-0 got the whole file, 200 OK): serve the image from a server that does (nginx, Apache and most static file servers do)`);
  }
  if (probe.statusCode === 416) throw new TargetError(`http-disk: ${url} is empty (416 Range Not Satisfiable for its first byte): a disk image needs at least ${SECTOR} bytes`);
  throw new TargetError(`http-disk: GET ${url} answered HTTP ${probe.statusCode} ${probe.statusMessage ?? ''}: check the URL`);
}

/** @param {string | true | undefined} value @returns {string} an http(s) URL */
function checkUrl(value) {
  if (typeof value !== 'string') throw new TargetError('http-disk needs --url URL: the disk image, e.g. --url http://host/disk.img');
  let url;
  try {
    url = new URL(value);
  } catch {
    throw new TargetError(`http-disk: --url ${value} is not a URL (expected http://host/path)`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new TargetError(`http-disk: --url must be http:// or https://, got ${url.protocol}`);
  return url.href;
}

/**
 * A whole-number option: its value, or `fallback` when it was not given.
 * @param {string | true | undefined} value @param {string} name @param {number} fallback @param {number} min @param {number} max
 */
function wholeNumber(value, name, fallback, min, max) {
  if (value === undefined) return fallback;
  const n = typeof value === 'string' && /^\d+$/.test(value) ? Number(value) : NaN;
  if (!(n >= min && n <= max)) throw new TargetError(`http-disk: ${name} takes a whole number from ${min} to ${max}, got ${value === true ? 'nothing' : value}`);
  return n;
}

/** `cacheMb` -> `cache-mb`, to name an option as it was typed. */
function kebab(key) {
  return key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
}
