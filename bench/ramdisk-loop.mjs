// examples/ramdisk.mjs, but every request answers from the event loop (after a setImmediate):
// the cost of runOnEventLoop's event-loop wait, for `npm run bench:ublk -- --suite async`.
import { defineAsyncTarget, parseSize } from 'ublk';

const turn = () => new Promise((resolve) => setImmediate(resolve));

export default defineAsyncTarget({
  name: 'ramdisk-loop',
  prepare({ size = '64M' }) {
    const sizeBytes = parseSize(size);
    return { sizeBytes, queueData: new SharedArrayBuffer(sizeBytes) };
  },
  open(_options, queue) {
    const disk = Buffer.from(queue.device);
    return {
      async read(offset, buf) { await turn(); disk.copy(buf, 0, offset, offset + buf.length); },
      async write(offset, buf) { await turn(); buf.copy(disk, offset); },
    };
  },
});
