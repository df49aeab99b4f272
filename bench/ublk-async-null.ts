/**
 * The null device as an AsyncTarget (async functions that resolve at once), for measuring what
 * the event-loop path costs per I/O against the ring-native null target. Prints {devId}, serves
 * until SIGTERM.
 */
import { UblkServer } from '../src/ublk/server.js';

const queues = Number(process.argv[2] ?? 1);
const server = await UblkServer.start({
  asyncTarget: {
    device: { sizeBytes: 250 * 2 ** 30 },
    async read() {},
    async write() {},
  },
  queues,
  depth: 128,
});
console.log(JSON.stringify({ devId: server.devId }));
process.on('SIGTERM', () => void server.stop().then(() => process.exit(0)));
