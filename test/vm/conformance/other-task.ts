/**
 * A worker thread (another task of the same process) that sends one ublk I/O command on a ring
 * of its own and posts the CQE's result back: the rule 'tag-owner-task' asks the kernel whether
 * a tag fetched by one task may be committed by another.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { IoUring, setUserData } from '../../../src/uring/index.js';
import { prepIoCmd } from '../../../src/ublk/wire.js';

const { op, fd, qid, tag, result, addr } = workerData as { op: number; fd: number; qid: number; tag: number; result: number; addr: number };
const ring = new IoUring(4);
const w = ring.mustGetSqe();
prepIoCmd(ring.sqes, w, op, fd, false, qid, tag, result, addr);
setUserData(ring.sqes, w, tag);
ring.submitAndWaitTimeout(1, 5000);
const c = ring.peekCqe();
// A refused command completes at once; an accepted COMMIT_AND_FETCH would leave a fetch in this
// ring, which its close cancels (the rule has failed by then).
parentPort!.postMessage(c < 0 ? { res: null } : { res: ring.cqeRes(c) });
if (c >= 0) ring.cqAdvance(1);
ring.close();
