import t from 'tap';
import { IoUring } from '../../src/uring/index.js';
t.test('ring opens', (t) => { const r = new IoUring(4); t.equal(r.sqEntries, 4); r.close(); t.end(); });
