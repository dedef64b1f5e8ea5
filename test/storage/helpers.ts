/** Shared pieces of the storage tests: temp dirs, the drivers under test, vector and data helpers. */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { NbdServer, nbdUri } from '../../src/nbd/index.js';
import { FileStorage, StorageError, openStorage, storageKinds, type BlockStorage, type StorageKindName } from '../../src/storage/index.js';
import { MemoryDevice } from '../nbd/support.js';
export { tempDir } from '../support/common.js';

/** A temp directory removed by `cleanup`. */
/** One way of getting a fresh, zeroed disk of `size` bytes. */
export interface Driver {
  readonly name: string;
  make(size: number, sectorSize: 512 | 4096, opts?: { readOnly?: boolean }): Promise<BlockStorage>;
}

/**
 * How each registered storage kind makes test instances (files go under `dir`), each opened
 * through the registry. A kind registered in src/storage/registry.ts needs its entry here.
 */
const fixtures: { readonly [K in StorageKindName]: (dir: string) => Driver[] } = {
  memory: () => [{ name: 'memory', make: (size, sectorSize, opts = {}) => openStorage({ kind: 'memory', size, sectorSize, readOnly: opts.readOnly }) }],
  // Both I/O modes.
  file: (dir) => {
    let n = 0;
    return (['sync', 'async'] as const).map((io): Driver => ({
      name: `file (${io})`,
      async make(size, sectorSize, opts = {}) {
        const path = join(dir, `disk-${io}-${n++}.img`);
        await FileStorage.create(path, size);
        return openStorage({ kind: 'file', path, sectorSize, io, readOnly: opts.readOnly });
      },
    }));
  },
  /**
   * A remote disk: NbdStorage over TCP to an in-process NbdServer serving a fresh memory device
   * (block size = sector size; read-only on the server's side). Closing the storage stops the server.
   */
  nbd: () => [{
    name: 'nbd',
    async make(size, sectorSize, opts = {}) {
      const device = new MemoryDevice(size, { blockSize: sectorSize, readOnly: opts.readOnly === true });
      const server = new NbdServer({ exports: [{ name: 'disk', device }] });
      try {
        const s = await openStorage({ kind: 'nbd', uri: nbdUri(await server.listen({ host: '127.0.0.1', port: 0 }), 'disk'), sectorSize });
        const close = s.close.bind(s);
        Object.defineProperty(s, 'close', { value: async () => { await close(); await server.close(); } });
        return s;
      } catch (e) {
        await server.close();
        throw e;
      }
    },
  }],
};

/**
 * The drivers of every kind in the storage registry; throws for a registered kind with no
 * fixture, so that a new kind cannot go untested by the contract suite.
 */
export function drivers(dir: string): Driver[] {
  const byKind: Readonly<Record<string, ((dir: string) => Driver[]) | undefined>> = fixtures;
  return storageKinds.flatMap((k) => {
    const make = byKind[k.kind];
    if (make === undefined) throw new Error(`storage kind ${k.kind} is registered but has no fixture in test/storage/helpers.ts`);
    return make(dir);
  });
}

/** Asserts that `p` rejects with a StorageError of `code`. */
export async function rejectsWith(p: Promise<unknown>, code: StorageError['code'], message?: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof StorageError, `expected a StorageError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    if (message !== undefined) assert.match(e.message, message);
    return true;
  });
}

/** Splits `data` into views of a SharedArrayBuffer at the given cut points (like mapped grant pages). */
export function sharedViews(data: Uint8Array, cuts: readonly number[]): Uint8Array[] {
  // A leading gap, so no view starts at byte 0 of its buffer.
  const sab = new SharedArrayBuffer(data.length + 64);
  const whole = new Uint8Array(sab, 64, data.length);
  whole.set(data);
  return split(whole, cuts);
}

/** Views of `whole` between consecutive cut points (sorted, deduplicated, clamped). */
export function split(whole: Uint8Array, cuts: readonly number[]): Uint8Array[] {
  const at = [...new Set(cuts.map((c) => Math.max(0, Math.min(whole.length, c))))].sort((a, b) => a - b);
  const out: Uint8Array[] = [];
  let from = 0;
  for (const c of [...at, whole.length]) {
    out.push(whole.subarray(from, c));
    from = c;
  }
  return out;
}

/** Concatenates views, to compare what a vectored read filled. */
export function concat(bufs: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(bufs.reduce((n, b) => n + b.length, 0));
  let at = 0;
  for (const b of bufs) {
    out.set(b, at);
    at += b.length;
  }
  return out;
}

/** Deterministic bytes from a seed (xorshift32): cheap to generate, easy to reproduce. */
export function pattern(seed: number, n: number): Uint8Array {
  const b = new Uint8Array(n);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    b[i] = s & 0xff;
  }
  return b;
}

/** Reads `length` bytes at `offset` into one fresh buffer. */
export async function readBytes(s: BlockStorage, offset: number, length: number): Promise<Uint8Array> {
  const b = new Uint8Array(length).fill(0xee); // not zero: a read that fills nothing shows
  await s.read(offset, [b]);
  return b;
}

export function isZero(b: Uint8Array): boolean {
  return b.every((x) => x === 0);
}
