/** Bad input from the user: reported as one line on stderr, exit code 2. */
export class UsageError extends Error {
  override name = 'UsageError';
}

/** A flag's value as a whole number (>= 0), or a UsageError naming the flag. */
export function wholeNumber(name: string, v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new UsageError(`${name} ${JSON.stringify(v)}: a whole number, please`);
  return n;
}
