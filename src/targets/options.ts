/**
 * Command-line options, parsed one way everywhere: the CLI's commands and every target's own
 * options. Each command declares its options ({@link OptionSpec}); {@link parseOptions} then
 * treats them all alike:
 *
 * - `-q 2`, `--queues 2` and `--queues=2` are the same option; `--flag=x` for a flag is an error.
 * - An option given twice (under either spelling) is an error, never "the last one wins".
 * - An option the command does not know is an error, unless the command passes unknown ones on
 *   (`add` hands them, in order, to the target's own parser).
 * - Numbers are decimal digits only; sizes take K, M, G, T (binary) and an optional B or iB;
 *   `0` and `00` mean the same wherever zero is allowed.
 *
 * Every mistake is a {@link UsageError}: one line, exit status 2, before anything is created.
 */

const UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** A mistake in how the command was called (exit status 2). */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

/**
 * Parses `4096`, `64K`, `512M`, `1G`, `2T` (binary units) into bytes; throws naming the option.
 * Zero is refused unless `allowZero`.
 */
export function parseSize(value: string | undefined, option: string, allowZero = false): number {
  const m = value?.trim().toUpperCase().match(/^(\d+)([KMGT]?)(I?B)?$/);
  if (!m) throw new UsageError(`${option} takes a size like 4096, 64K, 512M or 1G, got '${value ?? ''}'`);
  const n = Number(m[1]) * UNITS[m[2]!]!;
  if (!Number.isSafeInteger(n) || n < 0 || (n === 0 && !allowZero)) throw new UsageError(`${option}: ${value} is out of range`);
  return n;
}

/** Parses a whole number in [min, max]. */
export function parseCount(value: string | undefined, option: string, min: number, max: number): number {
  if (value === undefined || !/^\d+$/.test(value)) throw new UsageError(`${option} takes a number, got '${value ?? ''}'`);
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < min || n > max) throw new UsageError(`${option} must be from ${min} to ${max}, got ${value}`);
  return n;
}

export interface OptionSpec {
  /** The property of the result that receives the value. */
  key: string;
  /** Its spellings: `-q`, `--queues`. */
  names: readonly string[];
  /** flag: no value (true); count: a whole number; size: bytes with a unit; string: any non-empty text. */
  kind: 'flag' | 'count' | 'size' | 'string';
  /** Bounds of a count or size. */
  min?: number;
  max?: number;
  /** The only values allowed (a count or size). */
  choices?: readonly number[];
  /** A size may be 0 (`--offset 0`). */
  zero?: boolean;
  /**
   * Instead of a value: an error saying why this spelling is refused (a kublk option whose
   * feature this server does not have yet, or one we moved to a long spelling).
   */
  refuse?: string;
}

export interface ParsedOptions {
  /** Values by OptionSpec.key, for the options given. */
  values: Record<string, number | string | boolean>;
  /** With `passUnknown`: the arguments not recognised, in order (options and their values). */
  rest: string[];
  /** Arguments that are not options (without `passUnknown`, when `positional` allows them). */
  positional: string[];
}

/**
 * Parses `argv` against `specs` for `command` (named in messages). `passUnknown`: arguments that
 * are not ours go to `rest` instead of being refused (values included, in order). `positional`:
 * how many non-option arguments are allowed (default none).
 */
export function parseOptions(
  command: string, argv: readonly string[], specs: readonly OptionSpec[],
  opts: { passUnknown?: boolean; positional?: number } = {},
): ParsedOptions {
  const byName = new Map<string, OptionSpec>();
  for (const s of specs) for (const n of s.names) byName.set(n, s);
  const out: ParsedOptions = { values: {}, rest: [], positional: [] };
  const seen = new Map<string, string>();
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const eq = arg.startsWith('--') ? arg.indexOf('=') : -1;
    const name = eq > 0 ? arg.slice(0, eq) : arg;
    const spec = arg.startsWith('-') && arg !== '-' ? byName.get(name) : undefined;
    if (!spec) {
      if (opts.passUnknown) out.rest.push(arg);
      else if (arg.startsWith('-') && arg !== '-' && !/^-\d/.test(arg)) throw new UsageError(`${command}: unknown option ${name}`);
      else if (out.positional.length < (opts.positional ?? 0)) out.positional.push(arg);
      else throw new UsageError(`${command}: unexpected argument '${arg}'`);
      continue;
    }
    if (spec.refuse) throw new UsageError(`${command}: ${name}: ${spec.refuse}`);
    const earlier = seen.get(spec.key);
    if (earlier !== undefined) {
      throw new UsageError(earlier === name ? `${command}: ${name} given twice` : `${command}: ${earlier} and ${name} are the same option, given twice`);
    }
    seen.set(spec.key, name);
    if (spec.kind === 'flag') {
      if (eq > 0) throw new UsageError(`${command}: ${name} takes no value`);
      out.values[spec.key] = true;
      continue;
    }
    const value = eq > 0 ? arg.slice(eq + 1) : argv[++i];
    if (value === undefined || (eq < 0 && value.startsWith('-') && value !== '-' && spec.kind === 'string')) {
      throw new UsageError(`${command}: ${name} takes a value`);
    }
    let v: number | string;
    if (spec.kind === 'count') v = parseCount(value, name, spec.min ?? 0, spec.max ?? Number.MAX_SAFE_INTEGER);
    else if (spec.kind === 'size') {
      v = parseSize(value, name, spec.zero ?? false);
      if ((spec.min !== undefined && v < spec.min) || (spec.max !== undefined && v > spec.max)) {
        throw new UsageError(`${name} must be from ${spec.min ?? 0} to ${spec.max ?? 'any'} bytes, got ${value}`);
      }
    } else {
      if (value === '') throw new UsageError(`${command}: ${name} takes a value`);
      v = value;
    }
    if (spec.choices && !spec.choices.includes(v as number)) {
      throw new UsageError(`${name} must be ${spec.choices.slice(0, -1).join(', ')}${spec.choices.length > 1 ? ' or ' : ''}${spec.choices[spec.choices.length - 1]}, got ${value}`);
    }
    out.values[spec.key] = v;
  }
  return out;
}

/** The power-of-two block sizes a ublk device may have on this machine: 512 up to the page size. */
export function blockSizeChoices(pageSize: number): number[] {
  const out: number[] = [];
  for (let b = 512; b <= Math.min(pageSize, 65536); b *= 2) out.push(b);
  return out;
}
