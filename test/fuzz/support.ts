/**
 * What the fuzz suites share: how many cases to run, a seed that is always printed (so any run,
 * green or red, can be replayed with `BLKIF_FUZZ_SEED`), and fast-check parameters that keep a
 * failing run short (no shrinking unless `BLKIF_FUZZ_SHRINK=1`: each case boots domains, so
 * shrinking could take minutes; the seed and path reproduce it).
 *
 * Three run lengths, the same suites:
 *
 *   npm test                          # CI: each property's small built-in case count (seconds)
 *   npm run fuzz                      # BLKIF_FUZZ_RUNS=600: >= 10^5 hostile ring requests, about 6 minutes
 *   BLKIF_FUZZ_LONG=1 npm run fuzz    # ten times the cases: >= 10^6 hostile ring requests
 *   BLKIF_FUZZ_RUNS=2000 npm run fuzz # any other count
 *   BLKIF_FUZZ_SEED=123 BLKIF_FUZZ_PATH=7 BLKIF_FUZZ_SHRINK=1 node --test dist/test/fuzz/x.fuzz.test.js
 *
 * `BLKIF_FUZZ_RUNS` is the cases per property, scaled by the property's weight; `BLKIF_FUZZ_LONG=1`
 * multiplies every count by ten. Each suite prints what it sent at its end: hostile ring requests
 * (hostile-frontend), hostile responses (hostile-backend), xenstore messages (xenstore), with the
 * seed of each property. A failure names its seed and path: replay it with the line above.
 *
 * BLKIF_FUZZ_DEBUG=1 makes the hostile-frontend suite trace every round and explain a failed data check.
 */
import { Rng } from '../e2e/helpers.js';
import type { TestContext } from 'node:test';
import { writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import fc from 'fast-check';
export { eventually, sleep } from '../support/common.js';

/**
 * Cases per property: `BLKIF_FUZZ_RUNS` if set, scaled by `weight` (rounded up, at least 1), else
 * `defaultRuns` (the CI share); ten times that with `BLKIF_FUZZ_LONG=1`.
 */
export function fuzzRuns(defaultRuns: number, weight = 1): number {
  const long = process.env.BLKIF_FUZZ_LONG;
  if (long !== undefined && !['', '0', '1'].includes(long.trim())) throw new Error(`BLKIF_FUZZ_LONG=${long}: 1 or 0, please`);
  const times = long?.trim() === '1' ? 10 : 1;
  const v = process.env.BLKIF_FUZZ_RUNS;
  if (v === undefined || v.trim() === '') return defaultRuns * times;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new Error(`BLKIF_FUZZ_RUNS=${v}: a positive integer, please`);
  return Math.max(1, Math.ceil(n * weight)) * times;
}

/** The seed of this run: `BLKIF_FUZZ_SEED`, else a fresh one. */
export function fuzzSeed(): number {
  const v = process.env.BLKIF_FUZZ_SEED;
  if (v !== undefined && v.trim() !== '') {
    const n = Number(v);
    if (!Number.isInteger(n)) throw new Error(`BLKIF_FUZZ_SEED=${v}: an integer, please`);
    return n | 0;
  }
  return (Date.now() ^ Math.floor(Math.random() * 0x7fffffff)) | 0;
}

/** fast-check parameters for an async property run of `runs` cases. */
export function fuzzParams<T>(runs: number, seed: number, examples: readonly T[] = []): fc.Parameters<T> {
  const shrink = process.env.BLKIF_FUZZ_SHRINK === '1';
  const path = process.env.BLKIF_FUZZ_PATH;
  return {
    numRuns: runs,
    seed,
    // Cases that once failed run first, every time, whatever the seed.
    ...(examples.length > 0 ? { examples: [...examples] } : {}),
    ...(path !== undefined && path !== '' ? { path } : {}),
    endOnFailure: !shrink,
  };
}

/** Counts the cases a property tried and reports them (and the seed) as one diagnostic line. */
export class CaseCounter {
  tried = 0;
  private readonly started = performance.now();
  constructor(readonly what: string, readonly seed: number) {}
  tick(): number {
    return ++this.tried;
  }
  report(t: TestContext, extra = ''): void {
    const ms = Math.round(performance.now() - this.started);
    t.diagnostic(`${this.what}: ${this.tried} cases in ${ms} ms (seed ${this.seed}${extra ? `; ${extra}` : ''})`);
  }
}

/** Runs a fast-check async property with the suite's parameters, reporting cases even when it fails. */
export async function runProperty<T>(
  t: TestContext,
  what: string,
  arb: fc.Arbitrary<T>,
  body: (v: T, n: number) => Promise<void>,
  runs: number,
  extra?: () => string,
  /** Counterexamples of past failures, run before the random cases. */
  regressions: readonly T[] = [],
): Promise<void> {
  const seed = fuzzSeed();
  const counter = new CaseCounter(what, seed);
  try {
    await fc.assert(
      fc.asyncProperty(arb, async (v) => {
        await body(v, counter.tick());
      }),
      fuzzParams<[T]>(runs, seed, regressions.map((v): [T] => [v])),
    );
  } catch (e) {
    throw shortened(e, what, seed);
  } finally {
    counter.report(t, extra?.());
  }
}

/**
 * fast-check's report holds the whole counterexample, which for these cases runs to pages: keep
 * the head and the cause in the error, and the full report in a file named in the message.
 */
function shortened(e: unknown, what: string, seed: number): unknown {
  if (!(e instanceof Error) || e.message.length < 6000) return e;
  const file = join(tmpdir(), `blkif-fuzz-${what.replace(/\W+/g, '-')}-${seed}.txt`);
  writeFileSync(file, `${e.message}\n\ncause: ${String((e as { cause?: unknown }).cause)}\n${(e as { cause?: Error }).cause?.stack ?? ''}\n`);
  const head = e.message.slice(0, e.message.indexOf('Counterexample') >= 0 ? e.message.indexOf('Counterexample') : 1500);
  const cause = (e as { cause?: unknown }).cause;
  const out = new Error(`${head.trim()}\n(counterexample too long to print: full report in ${file})\ncause: ${cause instanceof Error ? cause.message : String(cause)}`);
  if (cause instanceof Error) out.stack = `${out.message}\n${cause.stack ?? ''}`;
  return out;
}

/** Rejects naming `what` if `p` has not settled within `ms`. */
export function within<T>(p: Promise<T>, what: string, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}


/** xorshift32 for choices made while a case runs (seeded from the case, so runs replay). */
export class Prng extends Rng {
  chance(p: number): boolean {
    return this.next() / 0x100000000 < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.next() % xs.length]!;
  }
  u64(): bigint {
    return (BigInt(this.next()) << 32n) | BigInt(this.next());
  }
}

export { firstDifference } from '../e2e/helpers.js';

/** A 512-byte sector as a string key (latin1: one char per byte). */
export function sectorKey(bytes: Uint8Array, at = 0): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset + at, 512).toString('latin1');
}

/**
 * After a property: its data checks ran (`ran`: reads verified, requests resolved...), asserted
 * once there were enough cases (10) that a run without any is a fault, not chance.
 */
export function assertChecksRan(runs: number, ran: boolean, what: string): void {
  if (runs >= 10) assert.ok(ran, `the property's checks never ran: ${what}`);
}
