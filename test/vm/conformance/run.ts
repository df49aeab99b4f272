/**
 * Runs the conformance catalogue (rules.ts) on the kernel it boots with, as root, and prints one
 * line, `CONFORMANCE {json}`, that scripts/conformance.mjs collects from each kernel of the
 * matrix. Each rule runs in a process of its own with a time limit (a kernel that never answers
 * a command would otherwise hang the rest), and prints a human line as it ends.
 */
import { spawnSync } from 'node:child_process';
import { release } from 'node:os';
import { fileURLToPath } from 'node:url';
import { UblkControl } from '../../../src/ublk/control.js';
import { RULES, hasFlag } from './rules.js';

/** Whether kernel release `rel` (6.16.12+deb13-amd64) is at least `since` (major.minor). */
function atLeast(rel: string, since: string): boolean {
  const [a = 0, b = 0] = rel.split(/[.+-]/).map(Number);
  const [c = 0, d = 0] = since.split('.').map(Number);
  return a > c || (a === c && b >= d);
}

type Result = { id: string; status: 'pass' | 'fail' | 'n/a'; detail?: string; note?: string; ms: number };
const RULE_LIMIT_MS = 60_000;
const kernel = release();
const only = process.env.UBLK_CONFORMANCE_ONLY;
const results: Result[] = [];

if (only) {
  // One rule, in this process.
  const r = RULES.find((x) => x.id === only)!;
  const t0 = Date.now();
  try {
    const note = await r.check();
    results.push({ id: r.id, status: 'pass', ...(note ? { note } : {}), ms: Date.now() - t0 });
  } catch (e) {
    results.push({ id: r.id, status: 'fail', detail: (e as Error).message, ms: Date.now() - t0 });
  }
} else {
  const ctrl = new UblkControl();
  const features = ctrl.features();
  ctrl.close();
  for (const r of RULES) {
    if (r.since && !atLeast(kernel, r.since)) {
      results.push({ id: r.id, status: 'n/a', detail: `needs ${r.since}`, ms: 0 });
      continue;
    }
    if (r.needs && !hasFlag(features, r.needs)) {
      results.push({ id: r.id, status: 'n/a', detail: 'GET_FEATURES does not list the flag', ms: 0 });
      continue;
    }
    const t0 = Date.now();
    const p = spawnSync(process.execPath, [fileURLToPath(import.meta.url)], {
      env: { ...process.env, UBLK_CONFORMANCE_ONLY: r.id }, encoding: 'utf8', timeout: RULE_LIMIT_MS, killSignal: 'SIGKILL',
    });
    const line = p.stdout?.split('\n').find((l) => l.startsWith('CONFORMANCE '));
    const got = line ? (JSON.parse(line.slice(12)) as { results: Result[] }).results[0] : undefined;
    results.push(got ?? {
      id: r.id, status: 'fail', ms: Date.now() - t0,
      detail: p.error ? `no answer within ${RULE_LIMIT_MS / 1000} s (the check was killed): ${p.stderr.trim().split('\n').slice(-2).join(' ')}` : `the check died: ${p.stderr.trim().split('\n').slice(-3).join(' ')}`,
    });
    const last = results[results.length - 1]!;
    process.stderr.write(`conformance: ${kernel}: ${r.id}: ${last.status}${last.detail ? ` (${last.detail})` : ''}${last.note ? ` [${last.note}]` : ''} in ${last.ms} ms\n`);
  }
}
process.stdout.write(`CONFORMANCE ${JSON.stringify({ kernel, results })}\n`);
