#!/usr/bin/env node
// The `ublk` command. It runs the compiled JavaScript in dist/ (built by `npm install` through the
// `prepare` script): plain JS starts faster than TypeScript through a loader, and the queue
// worker threads need no loader at all. See "Build" in the README for the measurements.
let cli;
try {
  cli = await import('../dist/cli/main.js');
} catch (e) {
  if (e && e.code === 'ERR_MODULE_NOT_FOUND' && String(e.message).includes('dist')) {
    process.stderr.write('ublk: dist/ is missing: run `npm install` (or `npm run build`) in the package directory\n');
    process.exit(1);
  }
  throw e;
}
process.exitCode = await cli.main(process.argv.slice(2));
