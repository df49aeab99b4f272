/**
 * `ublk trace -n ID`'s reader on the host, with this test playing the server: the FIFO appears
 * in the run directory, what the server writes is printed line by line, `--count` ends it, the
 * FIFO goes with it, and a server that never answers is reported (exit 1) instead of waited for.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import { chmodSync, existsSync, lstatSync, mkdtempSync, openSync, readdirSync, rmSync, watch, writeFileSync, writeSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { libc } from '../../src/libc/index.js';

const BIN = join(import.meta.dirname, '..', '..', 'bin', 'ublk.js');

function runDir(t: { teardown(f: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'ublk-run-'));
  chmodSync(dir, 0o755);
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  // A device whose "server" is this test's process: alive, so the reader goes on.
  writeFileSync(join(dir, 'ublkb7.json'), JSON.stringify({ devId: 7, target: 'null', targetOptions: {}, queues: 1, depth: 4, pid: process.pid }), { mode: 0o644 });
  return dir;
}

function trace(dir: string, args: string[]) {
  const child = spawn(process.execPath, [BIN, 'trace', '-n', '7', ...args], { env: { ...process.env, UBLK_RUN_DIR: dir }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
  child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
  return new Promise<{ code: number | null; stdout: string; stderr: string }>((r) => child.on('close', (code) => r({ code, stdout, stderr })));
}

async function until(cond: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) return false;
    await new Promise((r) => setTimeout(r, 20));
  }
  return true;
}

t.test('the reader prints what the server writes, stops at --count and removes its FIFO', async (t) => {
  const dir = runDir(t);
  const fifo = join(dir, 'ublkb7.trace');
  const done = trace(dir, ['--count', '3']);
  t.ok(await until(() => existsSync(fifo) && lstatSync(fifo).isFIFO(), 10_000), 'the FIFO appears');
  const w = openSync(fifo, libc.O_WRONLY | libc.O_NONBLOCK);
  writeSync(w, '00:00:00.000001 ctrl # device 7, server process 1: the control ring and 1 queue ring(s) follow\n');
  writeSync(w, '00:00:00.000002 q0 CQE user_data=cmd tag 0 res=0 request: READ sector=0 sectors=8 (4096 bytes)\n00:00:00.000003 q0 SQE one\n00:00:00.000004 q0 SQE beyond the count\n');
  const r = await done;
  closeSync(w);
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stdout.split('\n').length - 1, 3, 'exactly --count lines');
  t.match(r.stdout, /ctrl # device 7/);
  t.notOk(existsSync(fifo), 'the FIFO is gone');
});

t.test('a server that opens the FIFO at the first event naming it finds the reader there; no FIFO is left under either name', async (t) => {
  // The server opens the FIFO O_WRONLY|O_NONBLOCK when inotify tells it the name appeared; with
  // no reader yet that fails with ENXIO, and a reader that made the FIFO under its final name
  // and opened it after could lose that race (seen: 1 run in 3 of the VM trace test under load).
  const dir = runDir(t);
  const name = 'ublkb7.trace';
  const opened: string[] = [];
  const w = watch(dir, (_event, file) => {
    if (file !== name || opened.length > 0) return;
    try {
      closeSync(openSync(join(dir, name), libc.O_WRONLY | libc.O_NONBLOCK));
      opened.push('ok');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') opened.push((e as NodeJS.ErrnoException).code ?? String(e));
    }
  });
  const done = trace(dir, ['--seconds', '1']);
  await done;
  w.close();
  t.same(opened, ['ok'], 'opened for writing at the first event that named it');
  t.same(readdirSync(dir).filter((f) => f.includes('.trace')), [], 'no FIFO left behind, under either name');
});

t.test('a server that never picks the FIFO up: exit 1 within seconds, saying so', async (t) => {
  const dir = runDir(t);
  const r = await trace(dir, []);
  t.equal(r.code, 1);
  t.match(r.stderr, /the server of device 7 \(process \d+\) did not answer within 5 s/);
  t.notOk(existsSync(join(dir, 'ublkb7.trace')), 'and its FIFO is removed');
});

t.test('no such device: exit 1 and a pointer to ublk list; no -n: usage error', async (t) => {
  const dir = runDir(t);
  rmSync(join(dir, 'ublkb7.json'));
  const r = await trace(dir, []);
  t.equal(r.code, 1);
  t.match(r.stderr, /device 7 has no running server started by `ublk add`/);
  const u = await new Promise<number | null>((res) => spawn(process.execPath, [BIN, 'trace'], { stdio: 'ignore' }).on('close', res));
  t.equal(u, 2);
});
