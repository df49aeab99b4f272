/**
 * Every constant and struct layout in src/uring/abi.ts, checked against C headers by gcc.
 *
 * Two header sets: the host's (Debian bookworm's linux-libc-dev 6.1 here), which may lack newer
 * names, and Debian sid's newest linux-libc-dev, which must declare everything we export, so a
 * typo or a renamed field cannot hide behind "the old kernel doesn't have it". Needs gcc, and
 * network access for the sid package (cached for an hour); UBLK_OFFLINE=1 turns a missing
 * download or compiler into a skip.
 */
import t from 'tap';
import * as abi from '../../src/uring/abi.js';
import { checkAbi, debianHeaderSet, systemHeaderSet } from '../helpers/cabi.js';

await checkAbi(t, abi, {
  includes: [
    '<linux/io_uring.h>',
    '<linux/time_types.h>',
    '<sys/uio.h>',
  ],
  headerSets: [
    systemHeaderSet({ mustHaveAll: false }),
    debianHeaderSet('sid', { mustHaveAll: true }),
  ],
});
