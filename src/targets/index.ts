/**
 * The targets the CLI knows, by `-t` name, and loading a target from a module of the user's.
 * Each entry is the module URL the queue threads import (they load the target themselves), so
 * a target is one self-contained module.
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { TargetDefinition } from '../ublk/target.js';
import { isAsyncTarget, type AnyTargetDefinition, type AsyncTargetDefinition } from '../ublk/async-target.js';
import { UsageError } from './options.js';

const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
const modules: Record<string, string> = {
  null: new URL(`./null${ext}`, import.meta.url).href,
  loop: new URL(`./loop${ext}`, import.meta.url).href,
  mem: new URL(`./mem${ext}`, import.meta.url).href,
  overlay: new URL(`./overlay${ext}`, import.meta.url).href,
  fault: new URL(`./fault${ext}`, import.meta.url).href,
  nbd: new URL(`./nbd${ext}`, import.meta.url).href,
  qcow2: new URL(`./qcow2${ext}`, import.meta.url).href,
};

export const targetNames = Object.keys(modules);

/** A `-t` value that names a module file rather than a built-in target or a package. */
export function isModulePath(name: string): boolean {
  return name.startsWith('./') || name.startsWith('../') || name.startsWith('/') || /\.(m?js|cjs|ts|mts)$/.test(name);
}

/** A `-t` value that could be an npm package name (`my-disk`, `@me/my-disk`). */
function isPackageName(name: string): boolean {
  return /^(@[a-z0-9][\w.-]*\/)?[a-z0-9][\w.-]*$/i.test(name);
}

/**
 * The absolute path of the module `-t name` means, resolved from `fromDir` (the caller's working
 * directory): a path as it is, a package name through node_modules as `import` would find it
 * (its "exports" "." entry for import/node/default, else "module" or "main"). Undefined for a built-in
 * target name or a package that is not installed. The CLI saves this path, so a detached
 * server, `ublk recover` and `ublk del` load the same file from any directory.
 */
export function resolveTargetModule(name: string, fromDir = process.cwd()): string | undefined {
  if (modules[name]) return undefined;
  if (isModulePath(name)) return isAbsolute(name) ? name : resolve(fromDir, name);
  if (!isPackageName(name)) return undefined;
  // node_modules/NAME/package.json in this directory or one above it, as Node looks for it; read
  // directly, because a package's "exports" may hide its package.json from require.resolve.
  let pkgJson: string | undefined;
  for (let d = resolve(fromDir); ; d = dirname(d)) {
    const candidate = join(d, 'node_modules', name, 'package.json');
    if (existsSync(candidate)) {
      pkgJson = candidate;
      break;
    }
    if (dirname(d) === d) return undefined;
  }
  const pkg = JSON.parse(readFileSync(pkgJson, 'utf8')) as { exports?: unknown; module?: string; main?: string };
  const dir = dirname(pkgJson);
  const entry = exportEntry(pkg.exports) ?? pkg.module ?? pkg.main ?? 'index.js';
  return resolve(dir, entry);
}

/** The "." entry of a package.json "exports" for `import`: a string, or the import/node/default condition. */
function exportEntry(exp: unknown): string | undefined {
  if (typeof exp === 'string') return exp;
  if (typeof exp !== 'object' || exp === null) return undefined;
  const o = exp as Record<string, unknown>;
  if ('.' in o) return exportEntry(o['.']);
  for (const cond of ['import', 'node', 'default']) if (cond in o) return exportEntry(o[cond]);
  return undefined;
}

/**
 * The target called `name` and its module URL, or undefined for an unknown name. A built-in
 * name, a path (`./my-disk.mjs`, see {@link isModulePath}) or an installed package name; a
 * module's default export is a ring-native `defineTarget({...})` or an async
 * `defineAsyncTarget({...})` (the stable target API, src/index.ts). It is loaded by absolute URL,
 * so the queue threads and a detached server load the same file.
 */
export async function loadTarget(name: string): Promise<{ def: AnyTargetDefinition<unknown>; url: string } | undefined> {
  let url = modules[name];
  if (!url) {
    const path = resolveTargetModule(name);
    if (path === undefined) return undefined;
    url = pathToFileURL(path).href;
  }
  let mod: { default?: unknown };
  try {
    mod = (await import(url)) as { default?: unknown };
  } catch (e) {
    throw new UsageError(`cannot load the target module ${name}: ${(e as Error).message.split('\n')[0]}`);
  }
  const def = mod.default as Partial<AsyncTargetDefinition<unknown> & TargetDefinition<unknown>> | undefined;
  if (isAsyncTarget(def)) {
    if (typeof def.name !== 'string' || typeof def.prepare !== 'function' || typeof def.open !== 'function') {
      throw new UsageError(`${name}: an async target needs name, prepare(options) and open(options, queue) (see defineAsyncTarget)`);
    }
    return { def, url };
  }
  if (!def || typeof def.openQueue !== 'function' || typeof def.prepare !== 'function' || typeof def.parseArgs !== 'function') {
    throw new UsageError(`${name} is not a target module: its default export must be defineAsyncTarget({ name, prepare, open }) or defineTarget({ name, usage, parseArgs, prepare, openQueue })`);
  }
  return { def: def as TargetDefinition<unknown>, url };
}
