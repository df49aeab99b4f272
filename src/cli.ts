/**
 * The `ublk` command line. Only the parts whose machinery exists are wired up; the README's
 * status table says which commands are still to come.
 */
import { readFileSync } from 'node:fs';

const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };

const USAGE = `usage: ublk <command> [options]

Linux userspace block devices (ublk), served from TypeScript over io_uring.

commands:
  add -t TYPE [options]   create a device served by this process (not yet available)
  del -n ID | -a          delete one or all devices (not yet available)
  list [-n ID] [--json]   list devices (not yet available)
  features                the kernel's ublk feature flags (not yet available)
  help [-t TYPE]          this text, or a target's options
  --version               print the version

The io_uring layer these commands will run on is usable today as a library:
  import { IoUring } from 'ublk/uring'
`;

/** Runs the CLI; returns the process exit status (2 for usage errors, like ublksrv). */
export function main(argv: string[]): number {
  const [cmd, ...rest] = argv;
  switch (cmd) {
    case undefined:
    case 'help':
    case '-h':
    case '--help':
      process.stdout.write(USAGE);
      return cmd === undefined ? 2 : 0;
    case '-V':
    case '--version':
      process.stdout.write(`ublk ${pkg.version}\n`);
      return 0;
    case 'add':
    case 'del':
    case 'list':
    case 'features':
    case 'recover':
      process.stderr.write(`ublk: '${cmd}' is not available yet: the ublk control plane is not implemented in this version (see the README's status table)\n`);
      void rest;
      return 1;
    default:
      process.stderr.write(`ublk: unknown command '${cmd}'; run 'ublk --help'\n`);
      return 2;
  }
}
