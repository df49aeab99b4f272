/**
 * Every constant and struct layout in src/libc/abi.ts, checked against glibc's and the kernel's
 * headers by gcc: the host's, and Debian sid's newest linux-libc-dev, which must declare all of
 * them (see test/helpers/cabi.ts).
 */
import t from 'tap';
import * as abi from '../../src/libc/abi.js';
import { checkAbi, debianHeaderSet, systemHeaderSet } from '../helpers/cabi.js';

await checkAbi(t, abi, {
  // glibc only exposes O_DIRECT and O_NOFOLLOW's friends to _GNU_SOURCE.
  defines: ['_GNU_SOURCE'],
  includes: [
    '<sys/syscall.h>',
    '<sys/mman.h>',
    '<fcntl.h>',
    '<linux/falloc.h>',
    '<linux/fs.h>',
    '<sys/prctl.h>',
    '<sys/eventfd.h>',
    '<poll.h>',
    '<errno.h>',
    '<sys/vfs.h>',
    '<sys/socket.h>',
    '<netinet/in.h>',
    '<netinet/tcp.h>',
    '<sys/un.h>',
    '<sys/uio.h>',
  ],
  headerSets: [
    systemHeaderSet({ mustHaveAll: true }),
    debianHeaderSet('sid', { mustHaveAll: true }),
  ],
});
