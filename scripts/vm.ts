/**
 * `npm run vm -- [options] COMMAND [ARGS...]`: runs COMMAND as root in a throwaway VM with
 * ublk_drv, in this project directory, and exits with its status.
 *
 *   --kernel lts|newest|VERSION   default lts (Linux 6.12 from bookworm-security)
 *   --mem MiB                     default 2048
 *   --cpus N                      default 2
 *   --timeout SECONDS             default 1800; the command is killed after that (exit 124)
 *   --accel auto|kvm|tcg          default auto
 *   -q, --quiet                   no progress lines on stderr
 */
import { runVm, vmToolingMissing } from '../test/vm/runner.js';

const argv = process.argv.slice(2);
const opts: Parameters<typeof runVm>[0] = { command: [], verbose: true };
const usage = (msg: string): never => {
  process.stderr.write(`vm: ${msg}\nusage: npm run vm -- [--kernel lts|newest|VERSION] [--mem MiB] [--cpus N] [--timeout S] [--accel auto|kvm|tcg] COMMAND [ARGS...]\n`);
  process.exit(2);
};
while (argv.length > 0 && argv[0]!.startsWith('-')) {
  const flag = argv.shift()!;
  if (flag === '--') break;
  if (flag === '-q' || flag === '--quiet') { opts.verbose = false; continue; }
  const value = argv.shift() ?? usage(`${flag} needs a value`);
  const num = () => (/^\d+$/.test(value) ? Number(value) : usage(`${flag} takes a number, not '${value}'`));
  if (flag === '--kernel') opts.kernel = value;
  else if (flag === '--mem') opts.memMiB = num();
  else if (flag === '--cpus') opts.cpus = num();
  else if (flag === '--timeout') opts.timeoutSec = num();
  else if (flag === '--accel') opts.accel = ['auto', 'kvm', 'tcg'].includes(value) ? value as 'auto' : usage(`bad --accel ${value}`);
  else usage(`unknown option ${flag}`);
}
opts.command = argv;
if (opts.command.length === 0) usage('no command given');
const missing = vmToolingMissing();
if (missing) {
  process.stderr.write(`vm: ${missing}\n`);
  process.exit(125);
}
const r = await runVm(opts);
if (opts.verbose) process.stderr.write(`vm: exit ${r.code} after ${(r.totalMs / 1000).toFixed(1)} s (${r.package}, ${r.accel})\n`);
process.exit(r.code);
