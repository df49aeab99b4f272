/**
 * Every constant and struct layout in src/ublk/abi.ts, checked against <linux/ublk_cmd.h> by gcc.
 *
 * Same two header sets as test/uring/conformance.test.ts: the host's (Debian bookworm's 6.1
 * here), which predates most of ublk and may lack names, and Debian sid's newest linux-libc-dev,
 * which must declare everything we export. Needs gcc, and network access for the sid package
 * (cached for an hour); UBLK_OFFLINE=1 turns a missing download or compiler into a skip.
 */
import t from 'tap';
import * as abi from '../../src/ublk/abi.js';
import { checkAbi, debianHeaderSet, systemHeaderSet } from '../helpers/cabi.js';

await checkAbi(t, abi, {
  includes: [
    // ublk_cmd.h uses _IOR/_IOWR for the encoded opcodes without including their definition,
    // and ENODEV for UBLK_IO_RES_ABORT.
    '<linux/ioctl.h>',
    '<errno.h>',
    '<linux/ublk_cmd.h>',
  ],
  // Older kernels' ublk_params is a prefix of ours (64 bytes in 6.1, 112 in 6.12).
  appendOnly: ['ublk_params'],
  headerSets: [
    systemHeaderSet({ mustHaveAll: false }),
    debianHeaderSet('sid', { mustHaveAll: true }),
  ],
});
