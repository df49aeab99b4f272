/**
 * ABI conformance checker: compares the numbers a TypeScript ABI module exports against what a
 * C compiler computes from real kernel/libc headers.
 *
 * The module's exports follow the project's naming rule (see src/uring/abi.ts): a numeric export
 * is a C constant of the same name (macro or enumerator); an object export with a numeric `SIZE`
 * is a C struct of the same name, `SIZE` being `sizeof` and every other key the `offsetof` of the
 * field of that name. Anything else (name tables, functions) is not C and is ignored.
 *
 * For each header set we generate one C program that prints `label value` for every item, build
 * it with gcc and compare. A name a header does not declare makes gcc fail; we read gcc's
 * diagnostics for the lines of the offending items, drop those items and rebuild until the
 * program compiles. Dropped items are reported as absent (never as passes), and absence is a
 * failure for a header set marked `mustHaveAll`: the newest headers must know everything we use,
 * older ones may predate newer features.
 *
 * Header sets are described by `systemHeaderSet()` (the host's /usr/include) and
 * `debianHeaderSet()` (a linux-libc-dev from another Debian suite, fetched with
 * scripts/debian-fetch.sh and cached), so another ABI module (e.g. src/ublk/abi.ts against
 * <linux/ublk_cmd.h>) can reuse all of this with its own include list.
 */
import { spawnSync } from 'node:child_process';
import {
  existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync,
  writeFileSync,
} from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Test } from 'tap';

const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url));

/** When set to 1, work that needs the network or missing tools is skipped instead of failed. */
const OFFLINE = process.env.UBLK_OFFLINE === '1';

export interface HeaderSet {
  /** Shown in test names and in "absent from <name>" comments. */
  name: string;
  /** The linux-libc-dev version these headers come from; reported, and asserted to be known. */
  version: string | undefined;
  /** Searched (via -I) before the compiler's system include directories. */
  includeDirs: string[];
  /** If true, a name these headers do not declare is a failure rather than a comment. */
  mustHaveAll: boolean;
  /** Extra context for the report (e.g. "from cache"). */
  note?: string;
}

/** A header set that could not be obtained; fails the check unless UBLK_OFFLINE=1. */
export interface UnavailableHeaderSet {
  name: string;
  /** What went wrong and how to fix it. */
  unavailable: string;
}

export interface AbiCheckOptions {
  /** Headers for the generated program, in order: `<linux/io_uring.h>` or `"x.h"` or bare `x.h`. */
  includes: string[];
  /** Macros defined before any include, e.g. `_GNU_SOURCE` (glibc hides O_DIRECT without it). */
  defines?: string[];
  headerSets: (HeaderSet | UnavailableHeaderSet)[];
  /** The C type of a struct export; `struct <name>` unless a header uses a typedef. */
  structType?: (name: string) => string;
  /**
   * Structs the kernel extends by appending members (e.g. `ublk_params`, whose `len` field tells
   * the kernel which version userspace speaks). In a header set that may lack names, such a
   * struct's `sizeof` may be smaller than ours, provided that set also lacks at least one of the
   * struct's fields: that is an older layout, not a mismatch. Headers marked `mustHaveAll` must
   * match exactly.
   */
  appendOnly?: readonly string[];
}

/** One number to check: `label` names it in reports, `expr` computes it in C. */
interface Item {
  label: string;
  expr: string;
  ts: number;
  /** For struct items, the struct's name. */
  struct?: string;
}

/** Splits a module's exports into checkable items, sorted by label for stable reports. */
function collectItems(
  exports: Record<string, unknown>,
  structType: (name: string) => string,
): { items: Item[]; ignored: string[] } {
  const items: Item[] = [];
  const ignored: string[] = [];
  for (const [name, value] of Object.entries(exports)) {
    if (typeof value === 'number') {
      items.push({ label: name, expr: name, ts: value });
    } else if (isStructLayout(value)) {
      const type = structType(name);
      for (const [field, ts] of Object.entries(value)) {
        const expr = field === 'SIZE' ? `sizeof(${type})` : `offsetof(${type}, ${field})`;
        items.push({ label: `${name}.${field}`, expr, ts, struct: name });
      }
    } else {
      ignored.push(name);
    }
  }
  items.sort((a, b) => (a.label < b.label ? -1 : a.label > b.label ? 1 : 0));
  return { items, ignored: ignored.sort() };
}

function isStructLayout(value: unknown): value is Record<string, number> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return false;
  const entries = Object.entries(value);
  return typeof (value as { SIZE?: unknown }).SIZE === 'number'
    && entries.every(([, v]) => typeof v === 'number');
}

/**
 * The generated program. Each item sits alone on a known line so gcc's diagnostics map back to
 * it. The printed value is the mathematical value of the C expression whatever its type:
 * negative values go through `long long`, all others through `unsigned long long`. That makes
 * `-100` (AT_FDCWD, an int), `1U << 31` (an unsigned enumerator) and `~0U` all print exactly as
 * the TypeScript numbers that mirror them, with no sign-extension guesswork.
 *
 * A name that happens to be a variable or pointer (say `stdout`) would otherwise print an
 * address and pass as a plain mismatch; `(expr) & 0` makes gcc reject pointers and floating
 * values, and `__builtin_constant_p` flags run-time values, so both are reported as such.
 */
function generate(items: readonly Item[], opts: AbiCheckOptions): { source: string; lineOf: Map<number, Item> } {
  const lines: string[] = [];
  for (const d of opts.defines ?? []) lines.push(`#define ${d}`);
  lines.push('#include <stddef.h>', '#include <stdio.h>');
  for (const h of opts.includes) lines.push(`#include ${/^[<"]/.test(h) ? h : `<${h}>`}`);
  lines.push(
    '#define ABI_PRINT(label, expr) ((void)((expr) & 0), \\',
    '  !__builtin_constant_p(expr) ? printf("%s not-constant\\n", label) \\',
    '  : (expr) < 0 ? printf("%s %lld\\n", label, (long long)(expr)) \\',
    '  : printf("%s %llu\\n", label, (unsigned long long)(expr)))',
    'int main(void) {',
  );
  const lineOf = new Map<number, Item>();
  for (const item of items) {
    lines.push(`  ABI_PRINT("${item.label}", ${item.expr});`);
    lineOf.set(lines.length, item); // 1-based line number of the line just pushed
  }
  lines.push('  return 0;', '}', '');
  return { source: lines.join('\n'), lineOf };
}

/** gcc's error text for an item means "this header does not have it", as opposed to "broken". */
const ABSENT_RE = /undeclared|has no member named|incomplete type|undefined type|unknown type name/;

interface BuildResult {
  /** label -> value printed by the program. */
  values: Map<string, bigint>;
  /** Items the headers do not declare, with gcc's first complaint about each. */
  absent: { item: Item; error: string }[];
  /** Items that fail to compile for another reason (e.g. a macro that is not an integer). */
  broken: { item: Item; error: string }[];
}

/**
 * Compiles and runs the program for one header set, dropping items gcc rejects until it builds.
 * Throws (with gcc's output) if an error cannot be pinned on an item, e.g. a missing header.
 */
function buildAndRun(items: readonly Item[], set: HeaderSet, opts: AbiCheckOptions, dir: string): BuildResult {
  const src = join(dir, 'abi.c');
  const exe = join(dir, 'abi');
  const absent: BuildResult['absent'] = [];
  const broken: BuildResult['broken'] = [];
  let remaining = [...items];
  for (;;) {
    const { source, lineOf } = generate(remaining, opts);
    writeFileSync(src, source);
    // -w: only errors matter, and with warnings gone every diagnostic on our file is an error or
    // a note about one. -ftrack-macro-expansion=0: an error inside a macro (O_DIRECT expanding to
    // an undeclared __O_DIRECT, offsetof, ABI_PRINT) is reported at the line that used it, which
    // is the item's line, rather than in the header that defined the macro.
    const args = ['-w', '-ftrack-macro-expansion=0', '-std=gnu11',
      ...set.includeDirs.map((d) => `-I${d}`), '-o', exe, src];
    // LC_ALL=C: plain ASCII quotes and English messages, which ABSENT_RE expects.
    const cc = spawnSync('gcc', args, { encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } });
    if (cc.error) throw cc.error;
    if (cc.status === 0) break;
    // item -> gcc's first error on its line (a note only if no error landed there).
    const rejected = new Map<Item, { kind: string; text: string }>();
    const diag = new RegExp(`^${escapeRe(src)}:(\\d+):(?:\\d+:)? (error|note): (.*)$`);
    for (const line of cc.stderr.split('\n')) {
      const m = diag.exec(line);
      const item = m && lineOf.get(Number(m[1]));
      if (!m || !item) continue;
      const seen = rejected.get(item);
      if (!seen || (seen.kind === 'note' && m[2] === 'error')) rejected.set(item, { kind: m[2]!, text: m[3]! });
    }
    if (rejected.size === 0) {
      throw new Error(`gcc failed for ${set.name} on something other than a checked item `
        + `(a clashing or missing header?):\ngcc ${args.join(' ')}\n${tail(cc.stderr, 40)}`);
    }
    for (const [item, { text }] of rejected) (ABSENT_RE.test(text) ? absent : broken).push({ item, error: text });
    remaining = remaining.filter((i) => !rejected.has(i));
  }
  const run = spawnSync(exe, [], { encoding: 'utf8' });
  if (run.error) throw run.error;
  if (run.status !== 0) throw new Error(`${exe} exited with ${run.status}: ${run.stderr}`);
  const values = new Map<string, bigint>();
  for (const line of run.stdout.split('\n')) {
    const m = /^(\S+) (-?\d+|not-constant)$/.exec(line);
    const item = m && items.find((i) => i.label === m[1]);
    if (!m || !item) continue;
    if (m[2] === 'not-constant') broken.push({ item, error: 'not a compile-time constant' });
    else values.set(item.label, BigInt(m[2]!));
  }
  return { values, absent, broken };
}

/**
 * Checks every numeric constant and struct layout in `exports` against each header set, one tap
 * subtest per set and one assertion per constant and per struct field.
 */
export async function checkAbi(t: Test, exports: Record<string, unknown>, opts: AbiCheckOptions): Promise<void> {
  const { items, ignored } = collectItems(exports, opts.structType ?? ((n) => `struct ${n}`));
  if (ignored.length) t.comment(`not C constants, ignored: ${ignored.join(', ')}`);

  const gcc = spawnSync('gcc', ['--version'], { encoding: 'utf8' });
  const noGcc = gcc.error || gcc.status !== 0
    ? 'gcc not found or not working: install it with `apt-get install gcc libc6-dev`' : undefined;

  for (const set of opts.headerSets) {
    await t.test(set.name, async (t) => {
      if ('unavailable' in set || noGcc) {
        const why = [noGcc, 'unavailable' in set ? set.unavailable : undefined].filter(Boolean).join('; ');
        // Offline, a missing tool or download is expected and reported as a skip; otherwise the
        // check would silently stop protecting us, so it fails and says how to fix it.
        if (OFFLINE) t.pass(`ABI check against ${set.name}`, { skip: `UBLK_OFFLINE=1: ${why}` });
        else t.fail(`cannot check the ABI against ${set.name}: ${why} (or set UBLK_OFFLINE=1 to skip)`);
        return;
      }
      t.comment(`${set.name}: linux-libc-dev ${set.version ?? '(unknown)'}${set.note ? ` (${set.note})` : ''}`);
      t.ok(set.version, `${set.name} reports its linux-libc-dev version`);

      const dir = mkdtempSync(join(tmpdir(), 'ublk-cabi-'));
      try {
        const { values, absent, broken } = buildAndRun(items, set, opts, dir);
        let checked = 0;
        for (const item of items) {
          const c = values.get(item.label);
          if (c === undefined) continue; // absent or broken, reported below
          checked++;
          if (!Number.isSafeInteger(item.ts)) {
            t.fail(`${item.label}: TS value ${item.ts} is not a safe integer (C has ${c})`);
            continue;
          }
          const ts = BigInt(item.ts);
          if (item.struct && item.label === `${item.struct}.SIZE` && opts.appendOnly?.includes(item.struct)
            && !set.mustHaveAll && c < ts) {
            const lacks = absent.filter((a) => a.item.struct === item.struct).map((a) => a.item.label);
            if (lacks.length) {
              t.pass(`${item.label} = ${c}: ${set.name} has an older, shorter layout (ours is ${ts}; `
                + `it lacks ${lacks.join(', ')})`);
              continue;
            }
          }
          t.ok(c === ts, c === ts ? `${item.label} = ${c}` : `${item.label}: C has ${c}, TS has ${ts}`,
            { found: c.toString(), wanted: ts.toString() });
        }
        const missingOutput = items.filter((i) => !values.has(i.label)
          && !absent.some((a) => a.item === i) && !broken.some((b) => b.item === i));
        for (const item of missingOutput) t.fail(`${item.label}: compiled but the program printed no value`);
        for (const { item, error } of broken) t.fail(`${item.label} is not an integer constant in ${set.name}: ${error}`);
        if (absent.length) {
          t.comment(`absent from ${set.name}: ${absent.map((a) => a.item.label).join(', ')}`);
          if (set.mustHaveAll) {
            for (const { item, error } of absent) t.fail(`${item.label} absent from ${set.name}: ${error}`);
          }
        }
        t.comment(`${set.name}: ${checked} checked, ${absent.length} absent, ${broken.length} broken`);
      } catch (e) {
        t.fail(`ABI check against ${set.name} could not run: ${(e as Error).message}`);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  }
}

/** The host's own headers, versioned by its installed linux-libc-dev. */
export function systemHeaderSet(opts: { mustHaveAll: boolean }): HeaderSet {
  const q = spawnSync('dpkg-query', ['-W', '-f=${Version}', 'linux-libc-dev'], { encoding: 'utf8' });
  const version = q.status === 0 && q.stdout.trim() ? q.stdout.trim() : undefined;
  return { name: 'system headers', version, includeDirs: [], mustHaveAll: opts.mustHaveAll };
}

/** Re-downloads at most this often, matching debian-fetch.sh's hourly apt-list refresh. */
const REFRESH_MS = 60 * 60 * 1000;

/**
 * linux-libc-dev from a Debian suite (e.g. sid, for the newest kernel headers), extracted into
 * `${UBLK_CACHE:-~/.cache/ublk}/headers/<suite>/<version>/`. The file `current` there names the
 * version last fetched; its age decides whether to ask the archive again. With UBLK_OFFLINE=1
 * the cache is used however old it is, and the set is unavailable (skipped) if there is none.
 */
export function debianHeaderSet(suite: string, opts: { mustHaveAll: boolean }): HeaderSet | UnavailableHeaderSet {
  const name = `Debian ${suite} headers`;
  const cacheRoot = process.env.UBLK_CACHE || join(homedir(), '.cache', 'ublk');
  const base = join(cacheRoot, 'headers', suite);
  const stamp = join(base, 'current');
  const make = (version: string, note: string): HeaderSet => {
    const root = join(base, safeName(version));
    return {
      name, version, note, mustHaveAll: opts.mustHaveAll,
      // The multiarch dir holds asm/ (e.g. asm/unistd_64.h behind <sys/syscall.h>).
      includeDirs: [join(root, 'usr/include'), join(root, 'usr/include/x86_64-linux-gnu')],
    };
  };
  const cached = (): string | undefined => {
    if (!existsSync(stamp)) return undefined;
    const version = readFileSync(stamp, 'utf8').trim();
    return version && existsSync(join(base, safeName(version), 'usr/include')) ? version : undefined;
  };

  const have = cached();
  if (have && (OFFLINE || Date.now() - statSync(stamp).mtimeMs < REFRESH_MS)) {
    return make(have, OFFLINE ? 'cached, not refreshed: UBLK_OFFLINE=1' : 'cached');
  }
  if (OFFLINE) return { name, unavailable: `no cached ${suite} headers under ${base} and UBLK_OFFLINE=1` };

  mkdirSync(base, { recursive: true });
  const work = mkdtempSync(join(base, '.fetch-')); // same filesystem as the cache, for rename
  try {
    const debs = join(work, 'debs');
    const fetch = spawnSync('bash', [join(REPO_ROOT, 'scripts/debian-fetch.sh'), suite, debs, 'linux-libc-dev'],
      { encoding: 'utf8' });
    const deb = fetch.status === 0 ? fetch.stdout.split('\n').find((l) => l.endsWith('.deb')) : undefined;
    if (!deb) {
      return {
        name,
        unavailable: `scripts/debian-fetch.sh ${suite} failed (${fetch.error?.message ?? `exit ${fetch.status}`}): `
          + `${tail(fetch.stderr ?? '', 5).trim() || 'no .deb downloaded'}; it needs apt-get and network access `
          + 'to deb.debian.org',
      };
    }
    const debPath = join(debs, deb);
    const version = sh('dpkg-deb', ['-f', debPath, 'Version']).trim();
    const root = join(base, safeName(version));
    if (!existsSync(join(root, 'usr/include'))) {
      const staging = join(work, 'root');
      sh('dpkg-deb', ['-x', debPath, staging]);
      try {
        renameSync(staging, root);
      } catch (e) {
        // Another test process extracted the same version first; theirs is as good as ours.
        if (!existsSync(join(root, 'usr/include'))) throw e;
      }
    }
    // Write-then-rename so a concurrent reader never sees a half-written stamp.
    const tmpStamp = join(work, 'current');
    writeFileSync(tmpStamp, `${version}\n`);
    renameSync(tmpStamp, stamp);
    // Older versions are dead weight once the stamp moved on.
    for (const entry of readdirSync(base)) {
      if (entry !== safeName(version) && entry !== 'current' && !entry.startsWith('.')) {
        rmSync(join(base, entry), { recursive: true, force: true });
      }
    }
    return make(version, `fetched ${deb}`);
  } catch (e) {
    return { name, unavailable: `could not unpack ${suite} linux-libc-dev: ${(e as Error).message}` };
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.error) throw r.error;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited with ${r.status}: ${tail(r.stderr, 5)}`);
  return r.stdout;
}

/** Debian versions may hold ':' (epochs); keep directory names plain. */
function safeName(version: string): string {
  return version.replace(/[^A-Za-z0-9.+~-]/g, '_');
}

function escapeRe(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

function tail(text: string, lines: number): string {
  return text.split('\n').slice(-lines - 1).join('\n');
}
