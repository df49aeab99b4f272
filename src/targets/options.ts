/** Option parsing shared by targets and the CLI. */

const UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** Parses `4096`, `64K`, `512M`, `1G`, `2T` (binary units) into bytes; throws naming the option. */
export function parseSize(value: string | undefined, option: string): number {
  const m = value?.trim().toUpperCase().match(/^(\d+)([KMGT]?)(I?B)?$/);
  if (!m) throw new UsageError(`${option} takes a size like 4096, 64K, 512M or 1G, got '${value ?? ''}'`);
  const n = Number(m[1]) * UNITS[m[2]!]!;
  if (!Number.isSafeInteger(n) || n <= 0) throw new UsageError(`${option}: ${value} is out of range`);
  return n;
}

/** Parses a whole number in [min, max]. */
export function parseCount(value: string | undefined, option: string, min: number, max: number): number {
  if (value === undefined || !/^\d+$/.test(value)) throw new UsageError(`${option} takes a number, got '${value ?? ''}'`);
  const n = Number(value);
  if (n < min || n > max) throw new UsageError(`${option} must be from ${min} to ${max}, got ${n}`);
  return n;
}

/** A mistake in how the command was called (exit status 2). */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}
