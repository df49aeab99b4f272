// A disk kept as a directory of chunk files, with a checksum for every 4 KiB block:
//
//   ublk add -t ./examples/sparse-store.mjs --dir DIR --size 1G [--chunk-kb 64]
//
// How it works. The disk is cut into chunks of --chunk-kb. Chunk i is the file DIR/c-<i in hex,
// 10 digits>, created by the first write into it: chunks never written have no file, cost no
// space and read as zeros. A chunk file holds the chunk's data at its own offsets, then one
// CRC32C per 4 KiB block:
//
//   [ block 0 | block 1 | ... | block n-1 ][ crc 0 | crc 1 | ... | crc n-1 ]   (4 bytes each, LE)
//
// A write stores its blocks and their checksums with two pwrites; a read checks every block it
// returns against its checksum, and a block that does not match fails the read with EIO and a
// line in the log naming the chunk file and the block: bit rot is reported, never served.
// Discard and write-zeroes delete the files of the chunks they cover whole and zero the rest.
// FLUSH fsyncs the chunk files written since the last one, and DIR when files came or went.
//
// The device's logical block is the checksum's block (4 KiB), so every request covers whole
// blocks: no write has to read a block back to recompute its checksum. DIR/sparse-store.json
// records the size and the chunk size, which a store keeps for life (--size and --chunk-kb may
// be left out when DIR already holds a store).
//
// Limits: a crash between a write's data and its checksums (nothing makes the two pwrites one)
// can leave a block that reads as EIO until it is written again. Only blocks written since the
// last FLUSH are at risk, which a file system is ready for, but it expects the old or the new
// data there, as a real disk gives, not an error. One server per DIR: nothing stops two.
import {
  closeSync, constants, fdatasyncSync, fsyncSync, mkdirSync, openSync, readFileSync, readSync, renameSync, unlinkSync, writeSync,
} from 'node:fs';
import { join, resolve } from 'node:path';
import { defineAsyncTarget, parseSize, TargetError } from 'ublk';

/** The checksum's block, and the device's logical and physical block size. */
const BLOCK = 4096;
/** Bytes of checksum per block. */
const SUM = 4;
/** The file in DIR that records the store's shape. */
const META = 'sparse-store.json';
/** Lock stripes: chunk i is guarded by lock i % LOCKS (see "Several queues" below). */
const LOCKS = 64;
/** Index of queue.counters' one slot. */
const CHECKSUM_ERRORS = 0;

/**
 * @typedef {object} Store What prepare() made, handed to every queue as `queue.device`.
 * @property {string} dir
 * @property {number} sizeBytes
 * @property {number} chunkBytes
 * @property {SharedArrayBuffer} shared the locks and the unflushed-chunk bitmap, shared by every queue
 */

export default defineAsyncTarget({
  name: 'sparse-store',
  usage: [
    '  --dir DIR        the directory of chunk files (created if missing)',
    '  --size SIZE      the disk\'s size: 1G, 512M, ... (a multiple of 4K; required for a new store)',
    '  --chunk-kb N     the size of one chunk file\'s data, in KiB: a power of two from 4 to 65536 (default 64)',
    '',
  ].join('\n'),
  counters: ['checksumErrors'],

  /**
   * Main thread, once: creates DIR and its sparse-store.json, or checks that the options match
   * the store DIR already holds.
   * @param {Record<string, string | true>} options
   * @returns {import('ublk').DeviceSpec}
   */
  prepare(options) {
    for (const key of Object.keys(options)) {
      if (!['dir', 'size', 'chunkKb'].includes(key)) throw new TargetError(`sparse-store: unknown option --${key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} (it takes --dir, --size, --chunk-kb)`);
    }
    if (typeof options.dir !== 'string') throw new TargetError('sparse-store needs --dir DIR: the directory that holds the chunk files (created if missing)');
    const dir = resolve(options.dir);
    try {
      mkdirSync(dir, { recursive: true });
    } catch (e) {
      throw new TargetError(`sparse-store: cannot create --dir ${dir}: ${e.message}`);
    }
    const meta = readMeta(dir);

    let sizeBytes = meta?.sizeBytes;
    if (typeof options.size === 'string') sizeBytes = parseSize(options.size, '--size');
    else if (sizeBytes === undefined) throw new TargetError(`sparse-store: ${dir} holds no store yet: give its size with --size (1G, 512M, ...)`);
    let chunkBytes = meta?.chunkBytes ?? 64 * 1024;
    if (options.chunkKb !== undefined) {
      const kb = typeof options.chunkKb === 'string' && /^\d+$/.test(options.chunkKb) ? Number(options.chunkKb) : NaN;
      if (!(kb >= 4 && kb <= 65536 && (kb & (kb - 1)) === 0)) throw new TargetError(`sparse-store: --chunk-kb takes a power of two from 4 to 65536, got ${options.chunkKb}`);
      chunkBytes = kb * 1024;
    }
    if (meta && (meta.sizeBytes !== sizeBytes || meta.chunkBytes !== chunkBytes)) {
      throw new TargetError(`sparse-store: ${dir} holds a store of ${meta.sizeBytes} bytes in ${meta.chunkBytes / 1024} KiB chunks: `
        + `leave out --size and --chunk-kb, or give those (${sizeBytes} bytes in ${chunkBytes / 1024} KiB chunks were asked for)`);
    }
    if (sizeBytes % BLOCK !== 0) throw new TargetError(`sparse-store: --size must be a multiple of 4K (the checksummed block), got ${sizeBytes} bytes`);
    const chunks = Math.ceil(sizeBytes / chunkBytes);
    if (chunks > 2 ** 28) throw new TargetError(`sparse-store: ${chunks} chunks are too many (the most is 2^28): use a larger --chunk-kb`);
    if (!meta) {
      // Written whole or not at all: a crash leaves the old file or none, never half of one.
      const tmp = join(dir, `${META}.tmp`);
      const fd = openSync(tmp, 'w');
      try {
        writeSync(fd, `${JSON.stringify({ format: 1, sizeBytes, chunkBytes, blockBytes: BLOCK, checksum: 'crc32c' })}\n`);
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
      renameSync(tmp, join(dir, META));
      fsyncPath(dir);
    }

    // Shared by every queue (a SharedArrayBuffer is the same memory in every thread):
    // LOCKS chunk locks, FLUSH's lock, one "DIR changed" word, then one bit per chunk: "written
    // since the last FLUSH".
    const shared = new SharedArrayBuffer(4 * (LOCKS + 2 + Math.ceil(chunks / 32)));
    /** @type {Store} */
    const store = { dir, sizeBytes, chunkBytes, shared };
    return {
      sizeBytes,
      logicalBlockSize: BLOCK,
      physicalBlockSize: BLOCK,
      // Writes land in the page cache: say so, and file systems send FLUSH (and FUA) when they need durability.
      volatileCache: true,
      fua: true,
      // Discards of whole chunks free space; smaller ones only zero.
      discard: { granularity: chunkBytes, maxBytes: 2 ** 30, maxWriteZeroesBytes: 2 ** 30 },
      describe: { dir, chunkBytes, checksum: 'crc32c per 4 KiB block' },
      queueData: store,
    };
  },

  /**
   * Each queue's thread. The functions use synchronous fs calls and so answer every request at
   * once, with no trip through the event loop: chunk files are read and written in the page
   * cache, where a pread or pwrite takes microseconds, less than handing it to libuv's thread
   * pool and waiting for the result (which is what fs.promises does). The cost: FLUSH's fsyncs
   * hold up this queue while they run (the other queues go on, unless they FLUSH too). And the
   * locks below are only this simple because no lock is ever held across an `await`.
   * @param {unknown} _options
   * @param {import('ublk').AsyncQueueInfo} queue
   * @returns {import('ublk').AsyncHandlers}
   */
  open(_options, queue) {
    const { dir, sizeBytes, chunkBytes } = /** @type {Store} */ (queue.device);
    const words = new Int32Array(/** @type {Store} */ (queue.device).shared);
    const FLUSH_LOCK = LOCKS; // see flush()
    const DIR_CHANGED = LOCKS + 1;
    const DIRTY = LOCKS + 2;
    const sumsAt = chunkBytes; // where a chunk file's checksums start

    const chunkPath = (chunk) => join(dir, `c-${chunk.toString(16).padStart(10, '0')}`);

    // Several queues. Each queue is a thread, and two of them may work on the same chunk at
    // once. Writes to different blocks of a chunk never conflict: each block's data and its
    // checksum have fixed places in the file, and a write changes only its own (no shared
    // table is read, changed and written back). What could still go wrong is a read, write or
    // discard of the *same* blocks on two queues at once: a read between a write's data and
    // its checksums would see a mismatch and report bit rot that is not there, and a write into
    // a file another queue is deleting would be lost. So each operation on a chunk file holds
    // the chunk's lock (one of LOCKS words in the SharedArrayBuffer, chosen by chunk % LOCKS)
    // for the few syscalls it makes. A lock is held by one queue at a time for microseconds,
    // never across an await, and never together with another, so queues cannot deadlock.
    const lock = (i) => {
      while (Atomics.compareExchange(words, i, 0, 1) !== 0) Atomics.wait(words, i, 1);
    };
    const unlock = (i) => {
      Atomics.store(words, i, 0);
      Atomics.notify(words, i, 1);
    };
    const withChunk = (chunk, fn) => {
      lock(chunk % LOCKS);
      try {
        return fn(chunkPath(chunk));
      } finally {
        unlock(chunk % LOCKS);
      }
    };
    // A FLUSH must cover writes completed on every queue, not only its own: the bitmap is shared.
    const markDirty = (chunk) => Atomics.or(words, DIRTY + (chunk >>> 5), 1 << (chunk & 31));

    /** For each chunk that bytes [offset, offset+length) touch: fn(chunk, offset in the chunk, length in it, offset in the range). */
    const eachChunk = (offset, length, fn) => {
      for (let pos = offset, end = offset + length; pos < end;) {
        const chunk = Math.floor(pos / chunkBytes);
        const at = pos - chunk * chunkBytes;
        const n = Math.min(chunkBytes - at, end - pos);
        fn(chunk, at, n, pos - offset);
        pos += n;
      }
    };

    /** Zeros bytes [at, at+length) of a chunk; deletes its file if that is all of it and `drop`. */
    const zeroChunk = (chunk, at, length, drop) => withChunk(chunk, (path) => {
      const whole = at === 0 && length === Math.min(chunkBytes, sizeBytes - chunk * chunkBytes);
      if (whole && drop) {
        try {
          unlinkSync(path);
          Atomics.store(words, DIR_CHANGED, 1);
        } catch (e) {
          if (e.code !== 'ENOENT') throw e;
        }
        return;
      }
      const fd = openIfExists(path, constants.O_RDWR);
      if (fd === undefined) return; // no file: already zeros
      try {
        // Zero data has the stored checksum 0 (see storedSum), so both parts are plain zeros.
        writeAll(fd, Buffer.alloc(length), at);
        writeAll(fd, Buffer.alloc((length / BLOCK) * SUM), sumsAt + (at / BLOCK) * SUM);
      } finally {
        closeSync(fd);
      }
      markDirty(chunk);
    });

    return {
      /** @param {number} offset @param {Buffer} buf */
      read(offset, buf) {
        eachChunk(offset, buf.length, (chunk, at, length, bufAt) => {
          const data = buf.subarray(bufAt, bufAt + length);
          const sums = Buffer.alloc((length / BLOCK) * SUM);
          const found = withChunk(chunk, (path) => {
            const fd = openIfExists(path, constants.O_RDONLY);
            if (fd === undefined) return false;
            try {
              readAll(fd, data, at);
              readAll(fd, sums, sumsAt + (at / BLOCK) * SUM);
            } finally {
              closeSync(fd);
            }
            return true;
          });
          if (!found) {
            data.fill(0); // never written
            return;
          }
          // Checked outside the lock: the bytes are ours now.
          let bad = 0;
          for (let i = 0; i < length / BLOCK; i++) {
            const stored = sums.readUInt32LE(i * SUM);
            const actual = storedSum(data, i * BLOCK);
            if (stored === actual) continue;
            bad++;
            queue.counters[CHECKSUM_ERRORS]++;
            const block = at / BLOCK + i;
            queue.log(`sparse-store: checksum mismatch in ${chunkPath(chunk)} block ${block} (device bytes ${chunk * chunkBytes + block * BLOCK}+${BLOCK}): `
              + `stored ${hex(stored)}, data gives ${hex(actual)}; the read fails with EIO`);
          }
          if (bad > 0) {
            // EIO: every layer above knows it, and md/raid1 reads the other mirror and rewrites
            // ours. (EILSEQ would reach the block layer as BLK_STS_PROTECTION, meant for T10 PI
            // integrity errors, and ENODATA as a medium error; we have not checked what every
            // consumer does with those, so we keep the error everything handles.)
            throw Object.assign(new Error(`${bad} block(s) of ${chunkPath(chunk)} fail their checksum`), { code: 'EIO' });
          }
        });
      },

      /** @param {number} offset @param {Buffer} buf @param {boolean} fua */
      write(offset, buf, fua) {
        eachChunk(offset, buf.length, (chunk, at, length, bufAt) => {
          const data = buf.subarray(bufAt, bufAt + length);
          const sums = Buffer.alloc((length / BLOCK) * SUM);
          for (let i = 0; i < length / BLOCK; i++) sums.writeUInt32LE(storedSum(data, i * BLOCK), i * SUM);
          withChunk(chunk, (path) => {
            let fd = openIfExists(path, constants.O_RDWR);
            const created = fd === undefined;
            if (created) fd = openSync(path, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL, 0o644);
            try {
              writeAll(fd, data, at);
              writeAll(fd, sums, sumsAt + (at / BLOCK) * SUM);
              if (fua) fdatasyncSync(fd);
            } finally {
              closeSync(fd);
            }
            if (created) {
              if (fua) fsyncPath(dir); // the new file's name must be durable too
              else Atomics.store(words, DIR_CHANGED, 1);
            }
            if (!fua) markDirty(chunk);
          });
        });
      },

      /**
       * fsyncs every chunk file written (by any queue) since the last FLUSH, then DIR if files
       * were created or deleted. A chunk's bit is cleared *before* its fsync: a write that
       * lands after the clear sets it again for the next FLUSH. FLUSH_LOCK makes FLUSHes take
       * turns: a FLUSH on another queue that finds the bits already cleared must not return
       * before the fsyncs they stood for are done.
       */
      flush() {
        lock(FLUSH_LOCK);
        try {
          for (let w = DIRTY; w < words.length; w++) {
            if (Atomics.load(words, w) === 0) continue;
            let bits = Atomics.exchange(words, w, 0);
            try {
              for (; bits !== 0; bits &= bits - 1) {
                const chunk = (w - DIRTY) * 32 + (31 - Math.clz32(bits & -bits));
                const fd = openIfExists(chunkPath(chunk), constants.O_RDONLY);
                if (fd === undefined) continue; // discarded since: nothing to sync
                try {
                  fsyncSync(fd);
                } finally {
                  closeSync(fd);
                }
              }
            } catch (e) {
              Atomics.or(words, w, bits); // not synced: the next FLUSH tries again
              throw e;
            }
          }
          if (Atomics.exchange(words, DIR_CHANGED, 0) !== 0) {
            try {
              fsyncPath(dir);
            } catch (e) {
              Atomics.store(words, DIR_CHANGED, 1);
              throw e;
            }
          }
        } finally {
          unlock(FLUSH_LOCK);
        }
      },

      /** The range reads as zeros from now on; chunks it covers whole are deleted. */
      discard(offset, length) {
        eachChunk(offset, length, (chunk, at, n) => zeroChunk(chunk, at, n, true));
      },

      /** As discard, but with noUnmap (the caller wants the space kept) no file is deleted. */
      writeZeroes(offset, length, noUnmap) {
        eachChunk(offset, length, (chunk, at, n) => zeroChunk(chunk, at, n, !noUnmap));
      },
    };
  },
});

// --- checksums -------------------------------------------------------------------------------

/** CRC32C (Castagnoli, the iSCSI/ext4/btrfs one) lookup table, one byte at a time. */
const CRC_TABLE = new Uint32Array(256);
for (let n = 0; n < 256; n++) {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
  CRC_TABLE[n] = c;
}

/**
 * CRC32C of buf[start, end): about 400 MB/s in V8, table-driven (node:crypto has no CRC32C,
 * and zlib.crc32 is the other CRC-32 and only in Node >= 20.15). `crc32c('123456789')` is 0xe3069283.
 * @param {Uint8Array} buf @returns {number}
 */
export function crc32c(buf, start = 0, end = buf.length) {
  let c = 0xffffffff;
  for (let i = start; i < end; i++) c = CRC_TABLE[(c ^ buf[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

const ZERO_BLOCK_CRC = crc32c(new Uint8Array(BLOCK));

/**
 * What the file stores for the block at buf[at, at+4096): its CRC32C, XORed with the CRC32C of
 * a block of zeros. So a block of zeros stores 0, and a hole in a chunk file (the data of a
 * block never written, and its checksum slot, both read as zeros) checks out: a new chunk file
 * needs no table of checksums written first, which is one step fewer that two queues could race on.
 * (The price: damage that zeroes a block's data and its checksum both goes unnoticed.)
 */
function storedSum(buf, at) {
  return (crc32c(buf, at, at + BLOCK) ^ ZERO_BLOCK_CRC) >>> 0;
}

// --- files -----------------------------------------------------------------------------------

/** Opens path, or returns undefined if it does not exist. */
function openIfExists(path, flags) {
  try {
    return openSync(path, flags);
  } catch (e) {
    if (e.code === 'ENOENT') return undefined;
    throw e;
  }
}

/** Reads buf.length bytes at pos; what lies past the end of the file reads as zeros. */
function readAll(fd, buf, pos) {
  let got = 0;
  while (got < buf.length) {
    const n = readSync(fd, buf, got, buf.length - got, pos + got);
    if (n === 0) break;
    got += n;
  }
  buf.fill(0, got);
}

/** Writes all of buf at pos (a short write is continued; an error such as ENOSPC is thrown). */
function writeAll(fd, buf, pos) {
  for (let done = 0; done < buf.length;) done += writeSync(fd, buf, done, buf.length - done, pos + done);
}

/** fsyncs a file or directory by name. */
function fsyncPath(path) {
  const fd = openSync(path, constants.O_RDONLY);
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** DIR's sparse-store.json, or undefined when DIR holds no store yet. */
function readMeta(dir) {
  let text;
  try {
    text = readFileSync(join(dir, META), 'utf8');
  } catch (e) {
    if (e.code === 'ENOENT') return undefined;
    throw new TargetError(`sparse-store: cannot read ${join(dir, META)}: ${e.message}`);
  }
  let meta;
  try {
    meta = JSON.parse(text);
  } catch {
    meta = undefined;
  }
  if (meta?.format !== 1 || !Number.isSafeInteger(meta.sizeBytes) || !Number.isSafeInteger(meta.chunkBytes) || meta.blockBytes !== BLOCK) {
    throw new TargetError(`sparse-store: ${join(dir, META)} is not a store description this version reads: is --dir the right directory?`);
  }
  return meta;
}

/** @param {number} n */
function hex(n) {
  return `0x${n.toString(16).padStart(8, '0')}`;
}
