// One READ through our io_uring, every step by hand: docs/ring.md walks through it.
// Run it: node --import tsx docs/snippets/ring-read.ts
import { openSync, closeSync } from 'node:fs';
import { IoUring, Mapping, prepRead, setUserData } from '../../src/uring/index.js';

const ring = new IoUring(8); // io_uring_setup + the three mmaps
const buf = Mapping.anonymous(4096); // memory the kernel writes: ours, never the JS heap
const fd = openSync('/dev/zero', 'r');
try {
  buf.u8.fill(0xff);
  const w = ring.getSqe(); // a free SQE slot (word index into ring.sqes)
  prepRead(ring.sqes, w, fd, buf.address, 4096, 0); // fill all 64 bytes of it
  setUserData(ring.sqes, w, 7); // comes back in the CQE
  ring.submit(1); // publish the tail, io_uring_enter(to_submit=1, min_complete=1, GETEVENTS)
  const c = ring.cqeAt(0); // the first CQE between our head and the kernel's tail
  console.log(`user_data ${ring.cqeUserData(c)} res ${ring.cqeRes(c)}`); // user_data 7 res 4096
  ring.cqAdvance(1); // hand the slot back: store the new CQ head
  if (buf.u8.some((b) => b !== 0)) throw new Error('the kernel did not write our buffer');
} finally {
  closeSync(fd);
  ring.close(); // nothing is in flight: the buffer may go
  buf.unmap();
}
