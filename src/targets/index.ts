/**
 * The targets the CLI knows, by `-t` name. Each entry is the module URL the queue workers import
 * (they load the target themselves), so a target is one self-contained module.
 */
import type { TargetDefinition } from '../ublk/target.js';

const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
const modules: Record<string, string> = {
  null: new URL(`./null${ext}`, import.meta.url).href,
  loop: new URL(`./loop${ext}`, import.meta.url).href,
  mem: new URL(`./mem${ext}`, import.meta.url).href,
};

export const targetNames = Object.keys(modules);

/** The target called `name` and its module URL, or undefined. */
export async function loadTarget(name: string): Promise<{ def: TargetDefinition<unknown>; url: string } | undefined> {
  const url = modules[name];
  if (!url) return undefined;
  const mod = (await import(url)) as { default: TargetDefinition<unknown> };
  return { def: mod.default, url };
}
