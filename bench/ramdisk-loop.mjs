// examples/ramdisk.mjs, but every request answers from the event loop (after a setImmediate):
// the cost of runOnEventLoop's event-loop wait, for `npm run bench:ublk -- --suite async`.
// Same device and the same copies as the example (its prepare and open), one turn added.
import { defineAsyncTarget } from 'ublk';
import ramdisk from '../examples/ramdisk.mjs';

const turn = () => new Promise((resolve) => setImmediate(resolve));

export default defineAsyncTarget({
  name: 'ramdisk-loop',
  prepare: (options) => ramdisk.prepare(options),
  async open(options, queue) {
    const disk = await ramdisk.open(options, queue);
    return {
      async read(offset, buf) { await turn(); disk.read(offset, buf); },
      async write(offset, buf, fua) { await turn(); disk.write(offset, buf, fua); },
    };
  },
});
