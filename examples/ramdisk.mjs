// A RAM disk in 20 lines: `ublk add -t ./examples/ramdisk.mjs --size 256M`.
// prepare() runs once and shapes the device; open() runs in each queue's thread. The memory is a
// SharedArrayBuffer, so every queue sees the same disk.
import { defineAsyncTarget, parseSize } from 'ublk';

export default defineAsyncTarget({
  name: 'ramdisk',
  usage: '  --size SIZE   the disk\'s size (256M, 1G, ...; default 64M)\n',
  prepare({ size = '64M' }) {
    const sizeBytes = parseSize(size);
    return { sizeBytes, queueData: new SharedArrayBuffer(sizeBytes) };
  },
  open(_options, queue) {
    const disk = Buffer.from(queue.device);
    return {
      read(offset, buf) { disk.copy(buf, 0, offset, offset + buf.length); },
      write(offset, buf) { buf.copy(disk, offset); },
    };
  },
});
