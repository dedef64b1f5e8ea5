/**
 * Sizes as qemu-img and friends write them: a number with an optional binary suffix
 * (k/K = KiB, M, G, T, P, E; an optional "iB"/"B" after it), e.g. 1G, 512M, 64KiB, 1048576.
 * npm's `bytes` reads "1G" as 1 byte, so this small parser is ours.
 */
import { UsageError } from './errors.js';

const POWERS: Readonly<Record<string, number>> = { '': 0, k: 1, m: 2, g: 3, t: 4, p: 5, e: 6 };

export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(?:i?b)?\s*$/i.exec(text);
  if (m === null) throw new UsageError(`${what} "${text}": use a number of bytes or a suffix K, M, G, T (e.g. 1G)`);
  const n = Number(m[1]) * 1024 ** POWERS[m[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(Math.round(n)) || n <= 0) throw new UsageError(`${what} "${text}" is out of range`);
  return Math.round(n);
}
