/**
 * Every constant in src/targets/abi.ts, checked against <linux/fs.h> and <linux/magic.h> by gcc (the host's headers
 * and Debian sid's newest, which must declare everything; see test/helpers/cabi.ts).
 */
import t from 'tap';
import * as abi from '../../src/targets/abi.js';
import { checkAbi, debianHeaderSet, systemHeaderSet } from '../helpers/cabi.js';

await checkAbi(t, abi, {
  includes: ['<linux/fs.h>', '<linux/magic.h>'],
  headerSets: [
    systemHeaderSet({ mustHaveAll: true }),
    debianHeaderSet('sid', { mustHaveAll: true }),
  ],
});
