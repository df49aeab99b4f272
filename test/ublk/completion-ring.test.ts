/**
 * The async completion ring (src/ublk/async-completion-ring.ts): u32 counters that wrap at 2^32
 * without losing or repeating an entry, for depths that are not powers of two too.
 */
import t from 'tap';
import { CompletionRing } from '../../src/ublk/async-completion-ring.js';

for (const depth of [1, 3, 100, 128]) {
  t.test(`depth ${depth}: counters started near 2^32 cross the wrap in order`, (t) => {
    const shared = new SharedArrayBuffer(CompletionRing.bytes(depth));
    const start = 2 ** 32 - 2 * depth - 1;
    const producer = new CompletionRing(shared, depth, start);
    const consumer = new CompletionRing(shared, depth);
    const got: Array<[number, number]> = [];
    let next = 0;
    // Fill to the depth, drain, and again, across the wrap: 6 rounds of `depth` completions.
    for (let round = 0; round < 6; round++) {
      for (let k = 0; k < depth; k++, next++) producer.push(next % 65536, -(next % 4096) - 1);
      t.equal(consumer.pending, depth, `round ${round}: ${depth} pending`);
      consumer.drain((tag, res) => got.push([tag, res]));
    }
    t.equal(got.length, 6 * depth, 'every completion arrived once');
    t.ok(got.every(([tag, res], n) => tag === n % 65536 && res === -(n % 4096) - 1), 'in order, tag and result intact');
    const words = new Uint32Array(shared);
    t.equal(words[0], (start + 6 * depth) % 2 ** 32, 'the tail wrapped past 2^32 as a u32');
    t.equal(words[1], words[0], 'and the head with it');
    t.end();
  });
}

t.test('more completions than the depth is refused, not overwritten', (t) => {
  const shared = new SharedArrayBuffer(CompletionRing.bytes(4));
  const r = new CompletionRing(shared, 4, 2 ** 32 - 2);
  for (let i = 0; i < 4; i++) r.push(i, 0);
  t.throws(() => r.push(9, 0), /completion ring full/);
  let n = 0;
  r.drain(() => n++);
  t.equal(n, 4);
  t.end();
});

t.test('too small a buffer is refused', (t) => {
  t.throws(() => new CompletionRing(new SharedArrayBuffer(16), 8), /needs/);
  t.end();
});
