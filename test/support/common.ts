/** Small helpers every test suite uses: a temporary directory, a pause, a bounded poll. */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { XenstoreError } from '../../src/xenstore/errors.js';

/** A fresh directory under the system's temporary one; `cleanup` removes it and its contents. */
export function tempDir(prefix: string): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Polls `cond` every `every` ms until it holds; rejects after `ms` naming `what`. */
export async function eventually(cond: () => Promise<boolean> | boolean, what: string, ms: number, every = 5): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await cond()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms: ${what}`);
    await sleep(every);
  }
}

/**
 * `p` (a xenstore read), or undefined when the node is gone (ENOENT, as after a device's nodes
 * are removed while a watch still fires). Any other error is a failure and stays one.
 */
export function unlessGone<T>(p: Promise<T>): Promise<T | undefined> {
  return p.catch((e: unknown) => {
    if (e instanceof XenstoreError && e.code === 'ENOENT') return undefined;
    throw e;
  });
}
