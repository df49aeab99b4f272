/**
 * `npm run bench:uring`: our TypeScript ring against C liburing, fio and Node's fs.promises, in
 * the same run, as ratios.
 *
 * Every figure is measured by the program itself (after a 0.2 s warm-up, so process start-up
 * and JIT warm-up are excluded) and printed as one JSON line; this harness only schedules them.
 * Repetitions are interleaved (A B, then B A, ...) so that drift in a shared, noisy machine hits
 * both sides alike, and each ratio is taken within one repetition before the median is taken.
 *
 *   npm run bench:uring -- [--reps N] [--seconds S] [--only nop|read] [--json]
 *
 * Needs gcc, liburing-dev and fio (`npm run setup` installs them).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const root = dirname(here);
const args = process.argv.slice(2);
const opt = (name: string, dflt: string) => {
  const i = args.indexOf(name);
  return i >= 0 && args[i + 1] !== undefined ? args[i + 1]! : dflt;
};
const reps = Number(opt('--reps', '5'));
const seconds = opt('--seconds', '1');
const only = opt('--only', 'all');
const wantJson = args.includes('--json');

const cache = process.env.UBLK_CACHE ?? join(homedir(), '.cache', 'ublk');
const outDir = join(cache, 'bench');
mkdirSync(outDir, { recursive: true });
const refBin = join(outDir, 'uring-ref');
const dataFile = join(outDir, 'read-256m.dat');

function need(cmd: string, pkg: string): void {
  if (spawnSync('sh', ['-c', `command -v ${cmd}`]).status !== 0) {
    console.error(`bench: ${cmd} not found: install ${pkg} (npm run setup does)`);
    process.exit(2);
  }
}

// Build the C reference if it is missing or older than its source.
need('gcc', 'gcc');
const src = join(here, 'uring-ref.c');
if (!existsSync(refBin) || statSync(refBin).mtimeMs < statSync(src).mtimeMs) {
  try {
    execFileSync('gcc', ['-O2', '-Wall', '-o', refBin, src, '-luring'], { stdio: 'inherit' });
  } catch {
    console.error('bench: building bench/uring-ref.c failed: is liburing-dev installed? (npm run setup)');
    process.exit(2);
  }
}

interface Result { ops_per_sec: number }

function run(cmd: string, argv: string[]): number {
  const r = spawnSync(cmd, argv, { encoding: 'utf8', cwd: root });
  if (r.status !== 0) {
    throw new Error(`${cmd} ${argv.join(' ')} failed (${r.status}): ${r.stderr}`);
  }
  const line = r.stdout.trim().split('\n').pop()!;
  return (JSON.parse(line) as Result).ops_per_sec;
}

const js = (...a: string[]) => run(process.execPath, ['--import', 'tsx', join(here, 'uring-js.ts'), ...a]);
const c = (...a: string[]) => run(refBin, a);

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

interface Row { key: string; what: string; ours: number[]; ref: number[]; ratios: number[] }
const rows: Row[] = [];
const row = (key: string, what: string): Row => {
  const r = { key, what, ours: [], ref: [], ratios: [] };
  rows.push(r);
  return r;
};

const batches = [1, 8, 32, 128];
const nopRows = batches.map((b) => row(`nop_b${b}_vs_liburing`, `NOP, ${b} per enter, vs liburing`));
const readC = row('read_qd32_vs_liburing', '4 KiB random read QD32, vs liburing');
const readFio = row('read_qd32_vs_fio', '4 KiB random read QD32, vs fio io_uring');
const readFsp = row('read_qd32_vs_fs_promises', '4 KiB random read QD32, vs fs.promises');

if (only === 'all' || only === 'read') {
  need('fio', 'fio');
  execFileSync('bash', [join(here, 'prepare-file.sh'), dataFile, '256'], { stdio: 'inherit' });
}

for (let rep = 0; rep < reps; rep++) {
  const flip = rep % 2 === 1; // alternate which side runs first
  if (only === 'all' || only === 'nop') {
    batches.forEach((b, i) => {
      const pair = flip ? [c('nop', `${b}`, seconds), js('nop', `${b}`, seconds)].reverse()
        : [js('nop', `${b}`, seconds), c('nop', `${b}`, seconds)];
      const r = nopRows[i]!;
      r.ours.push(pair[0]!);
      r.ref.push(pair[1]!);
      r.ratios.push(pair[0]! / pair[1]!);
    });
  }
  if (only === 'all' || only === 'read') {
    const order = ['js', 'c', 'fio', 'fsp'];
    if (flip) order.reverse();
    const got: Record<string, number> = {};
    for (const who of order) {
      if (who === 'js') got.js = js('read', dataFile, '32', seconds);
      if (who === 'c') got.c = c('read', dataFile, '32', seconds);
      if (who === 'fio') got.fio = run('bash', [join(here, 'fio-read.sh'), dataFile, '32', seconds]);
      if (who === 'fsp') got.fsp = js('fs-promises', dataFile, '32', seconds);
    }
    for (const [r, ref] of [[readC, got.c!], [readFio, got.fio!], [readFsp, got.fsp!]] as const) {
      r.ours.push(got.js!);
      r.ref.push(ref);
      r.ratios.push(got.js! / ref);
    }
  }
  process.stderr.write(`bench: repetition ${rep + 1}/${reps} done\n`);
}

const fmt = (n: number) => (n >= 1e6 ? `${(n / 1e6).toFixed(2)}M` : `${(n / 1e3).toFixed(0)}k`);
const done = rows.filter((r) => r.ratios.length > 0);
console.log(`\n${reps} interleaved repetitions of ${seconds} s each; ops/s are medians, ratio = ours / reference\n`);
console.log('| comparison | ours ops/s | reference ops/s | median ratio | min ratio | max ratio |');
console.log('|---|---|---|---|---|---|');
for (const r of done) {
  console.log(`| ${r.what} | ${fmt(median(r.ours))} | ${fmt(median(r.ref))} | **${median(r.ratios).toFixed(2)}x** | ${Math.min(...r.ratios).toFixed(2)}x | ${Math.max(...r.ratios).toFixed(2)}x |`);
}
if (wantJson) {
  console.log(JSON.stringify(Object.fromEntries(done.map((r) => [r.key, Number(median(r.ratios).toFixed(3))]))));
}
