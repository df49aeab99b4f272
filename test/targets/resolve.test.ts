/**
 * `-t NAME`: a built-in target, a module path, or an installed package, resolved to the one
 * absolute file the CLI saves (so a detached server, recover and del load the same module).
 */
import t from 'tap';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { isModulePath, loadTarget, resolveTargetModule } from '../../src/targets/index.js';

const dir = t.testdir({});
const pkg = (name: string, json: Record<string, unknown>, file: string) => {
  const d = join(dir, 'node_modules', name);
  mkdirSync(d, { recursive: true });
  writeFileSync(join(d, 'package.json'), JSON.stringify({ name, ...json }));
  writeFileSync(join(d, file), 'export default { kind: "async", name: "pkg-disk", prepare: () => ({ sizeBytes: 4096 }), open: () => ({ read() {}, write() {} }) };\n');
  return join(d, file);
};

t.test('paths and built-in names', async (t) => {
  t.equal(resolveTargetModule('loop', dir), undefined, 'a built-in name is not a module');
  t.equal(resolveTargetModule('./disk.mjs', dir), join(dir, 'disk.mjs'), 'a relative path is made absolute from the caller\'s directory');
  t.equal(resolveTargetModule('/abs/disk.js', dir), '/abs/disk.js');
  t.ok(isModulePath('disk.mjs') && isModulePath('../x.ts') && !isModulePath('my-disk') && !isModulePath('@me/disk'));
});

t.test('installed packages, by their exports, module or main', async (t) => {
  pkg('my-disk', { type: 'module', exports: { '.': { import: './lib/index.mjs', require: './cjs.js' } } }, 'index.mjs');
  mkdirSync(join(dir, 'node_modules', 'my-disk', 'lib'), { recursive: true });
  writeFileSync(join(dir, 'node_modules', 'my-disk', 'lib', 'index.mjs'), 'export default {};\n');
  t.equal(resolveTargetModule('my-disk', dir), join(dir, 'node_modules', 'my-disk', 'lib', 'index.mjs'), 'exports["."].import');
  const b = pkg('@me/disk', { main: 'main.mjs' }, 'main.mjs');
  t.equal(resolveTargetModule('@me/disk', dir), b, 'a scoped package by its main');
  const c = pkg('str-disk', { exports: './entry.mjs' }, 'entry.mjs');
  t.equal(resolveTargetModule('str-disk', dir), c, 'exports as a string');
  t.equal(resolveTargetModule('not-installed', dir), undefined, 'a package that is not installed');
});

t.test('loadTarget on an installed async target module', async (t) => {
  const file = pkg('async-disk', { main: 'index.mjs' }, 'index.mjs');
  const cwd = process.cwd();
  process.chdir(dir);
  try {
    const loaded = await loadTarget('async-disk');
    t.ok(loaded, 'loaded');
    t.equal(loaded!.def.name, 'pkg-disk');
    t.match(loaded!.url, new RegExp(`${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`));
  } finally {
    process.chdir(cwd);
  }
});
