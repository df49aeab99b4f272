/**
 * The targets the CLI knows, by `-t` name, and loading a target from a module of the user's.
 * Each entry is the module URL the queue threads import (they load the target themselves), so
 * a target is one self-contained module.
 */
import { isAbsolute, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { TargetDefinition } from '../ublk/target.js';
import { UsageError } from './options.js';

const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
const modules: Record<string, string> = {
  null: new URL(`./null${ext}`, import.meta.url).href,
  loop: new URL(`./loop${ext}`, import.meta.url).href,
  mem: new URL(`./mem${ext}`, import.meta.url).href,
  overlay: new URL(`./overlay${ext}`, import.meta.url).href,
  fault: new URL(`./fault${ext}`, import.meta.url).href,
};

export const targetNames = Object.keys(modules);

/** A `-t` value that names a module file rather than a built-in target. */
export function isModulePath(name: string): boolean {
  return name.includes('/') || /\.(m?js|ts)$/.test(name);
}

/**
 * The target called `name` and its module URL, or undefined for an unknown name. A name with a
 * slash (or ending in .js/.mjs/.ts) is a module of the user's whose default export is a
 * ring-native TargetDefinition; it is loaded by absolute URL, so the queue threads and a detached
 * server load the same file. (Experimental: the target interface is not yet declared stable.)
 */
export async function loadTarget(name: string): Promise<{ def: TargetDefinition<unknown>; url: string } | undefined> {
  let url = modules[name];
  if (!url && isModulePath(name)) url = pathToFileURL(isAbsolute(name) ? name : resolve(name)).href;
  if (!url) return undefined;
  let mod: { default?: TargetDefinition<unknown> };
  try {
    mod = (await import(url)) as { default?: TargetDefinition<unknown> };
  } catch (e) {
    throw new UsageError(`cannot load the target module ${name}: ${(e as Error).message.split('\n')[0]}`);
  }
  const def = mod.default;
  if (!def || typeof def.openQueue !== 'function' || typeof def.prepare !== 'function' || typeof def.parseArgs !== 'function') {
    throw new UsageError(`${name} is not a target module: its default export must be defineTarget({ name, usage, parseArgs, prepare, openQueue })`);
  }
  return { def, url };
}
