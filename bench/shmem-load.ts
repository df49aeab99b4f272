/**
 * A load generator whose I/O buffers are a shared file's pages, the client `--shmem_zc` needs
 * (fio cannot be one: it sizes and truncates its own buffer file). 4 KiB random reads or writes
 * with O_DIRECT, QD requests in flight on one io_uring, for SECONDS; prints {"iops": N}.
 *
 *   node --import tsx bench/shmem-load.ts DEVICE SIZE_BYTES SHARED_FILE randread|randwrite QD SECONDS
 *
 * The same program drives every device of the comparison (a --shmem_zc mem, a plain mem, brd), so
 * its own cost is in every number alike; only the ublk one can match the pages.
 */
import { closeSync, constants, fstatSync, openSync } from 'node:fs';
import { IoUring, Mapping, prepRead, prepWrite, setUserData } from '../src/uring/index.js';

const [device, sizeArg, sharedFile, rw, qdArg, secondsArg] = process.argv.slice(2);
const qd = Number(qdArg);
const BS = 4096;
const sfd = openSync(sharedFile!, 'r+');
const shared = Mapping.file(sfd, fstatSync(sfd).size, 0);
closeSync(sfd);
if (shared.length < qd * BS) throw new Error(`${sharedFile} is smaller than ${qd} blocks`);
const dev = openSync(device!, constants.O_RDWR | constants.O_DIRECT);
const blocks = Math.floor(Number(sizeArg) / BS);
const ring = new IoUring(Math.max(8, qd * 2));
const write = rw === 'randwrite';

function issue(slot: number): void {
  const w = ring.mustGetSqe();
  const off = Math.floor(Math.random() * blocks) * BS;
  (write ? prepWrite : prepRead)(ring.sqes, w, dev, shared.address + slot * BS, BS, off);
  setUserData(ring.sqes, w, slot);
}

for (let s = 0; s < qd; s++) issue(s);
const out = new Uint32Array(ring.cqeWords * qd);
let done = 0;
const until = performance.now() + Number(secondsArg) * 1000;
ring.submit();
while (performance.now() < until) {
  const n = ring.copyCqes(out, 1);
  for (let i = 0; i < n; i++) {
    if ((out[i * ring.cqeWords + 2]! | 0) !== BS) throw new Error(`I/O failed: ${out[i * ring.cqeWords + 2]! | 0}`);
    done++;
    issue(out[i * ring.cqeWords]!);
  }
  ring.submit();
}
const elapsed = Number(secondsArg) + (performance.now() - until) / 1000;
process.stdout.write(`${JSON.stringify({ iops: done / elapsed })}\n`);
