/**
 * The RAM disk of examples/ramdisk.mjs as closures of this process's main thread
 * (`UblkServer.start({ asyncTarget })`: each batch crosses to the main thread and back), for
 * `npm run bench:ublk -- --suite async`. Prints {devId}, serves until SIGTERM.
 *
 *   node --import tsx bench/ublk-async-mem.ts QUEUES SIZE_MIB
 */
import { UblkServer } from '../src/ublk/server.js';

const queues = Number(process.argv[2] ?? 1);
const disk = Buffer.alloc(Number(process.argv[3] ?? 256) * 2 ** 20);
const server = await UblkServer.start({
  asyncTarget: {
    device: { sizeBytes: disk.length },
    read(offset, buf) { disk.copy(buf, 0, offset, offset + buf.length); },
    write(offset, buf) { buf.copy(disk, offset); },
  },
  queues,
  depth: 128,
});
console.log(JSON.stringify({ devId: server.devId }));
process.on('SIGTERM', () => void server.stop().then(() => process.exit(0)));
