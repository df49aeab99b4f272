/**
 * Async targets: a device whose read/write are async functions on the main event loop, with the
 * queue threads blocked in io_uring_enter and woken through the eventfd. fio writes and then
 * verifies crc32c through it.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { alive, exists, fio, waitFor, EXT, nodeArgsFor, onKernel } from './helpers.js';

async function startAsyncMem(args: string[]): Promise<{ devId: number; pid: number }> {
  const child = spawn(process.execPath, [...nodeArgsFor(new URL(`./fixtures/async-mem-server${EXT}`, import.meta.url)), ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
  const line = await new Promise<string>((res, rej) => {
    createInterface({ input: child.stdout }).once('line', res);
    child.once('exit', (c) => rej(new Error(`async-mem server exited ${c}`)));
  });
  return JSON.parse(line) as { devId: number; pid: number };
}

for (const queues of [1, 2]) {
  t.test(`async RAM disk, ${queues} queue(s): fio write + crc32c verify`, onKernel(queues === 1 ? 'lts' : 'newest'), async (t) => {
    const { devId, pid } = await startAsyncMem(['128', String(queues)]);
    const dev = `/dev/ublkb${devId}`;
    t.ok(exists(dev), `${dev} is live`);
    for (const [bs, engine] of [['4k', 'io_uring'], ['64k', 'libaio']] as const) {
      const r = fio(dev, 'randwrite', {
        bs, qd: 32, engine, seconds: 0,
        extra: ['--size=32m', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--time_based=0', '--runtime=0', '--randrepeat=0'],
      });
      t.ok(r.code === 0 && r.error === 0, `${bs} ${engine}: write then verify, exit ${r.code}, error ${r.error}, ${r.ios} I/Os`);
    }
    const flush = fio(dev, 'write', { bs: '4k', qd: 1, seconds: 1, extra: ['--fsync=1'] });
    t.equal(flush.error, 0, 'writes with fsync (FLUSH requests) complete');
    process.kill(pid, 'SIGTERM');
    t.ok(await waitFor(() => !alive(pid), 20_000), 'the server stopped');
    t.notOk(exists(`/dev/ublkc${devId}`), 'and deleted its device');
  });
}

t.test('an async target whose tag buffers add up to 8 GiB (depth 256 x 32 MiB): served, not refused, no crash', async (t) => {
  // The main thread once mapped one view over all of a queue's buffers; past 4 GiB that aborted
  // the process after ADD_DEV. Each tag's buffer has its own view now.
  const { devId, pid } = await startAsyncMem(['64', '1', '--depth', '256', '--max-io-bytes', String(32 * 2 ** 20)]);
  const dev = `/dev/ublkb${devId}`;
  const r = fio(dev, 'randwrite', {
    bs: '1m', qd: 32, engine: 'libaio', seconds: 0,
    extra: ['--size=32m', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--time_based=0', '--runtime=0'],
  });
  t.ok(r.code === 0 && r.error === 0, `1 MiB writes then verify, exit ${r.code}, error ${r.error}, ${r.ios} I/Os`);
  process.kill(pid, 'SIGTERM');
  t.ok(await waitFor(() => !alive(pid), 20_000), 'the server stopped');
  t.notOk(exists(`/dev/ublkc${devId}`), 'and deleted its device');
});
