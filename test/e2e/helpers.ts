/** Shared pieces of the end-to-end tests: a seeded random source, a disk model, temp images. */
import { writeFileSync, openSync, ftruncateSync, closeSync } from 'node:fs';
import assert from 'node:assert/strict';
import { after, before } from 'node:test';
import { Blkback, type BlkbackOptions } from '../../src/blkback/index.js';
import { Blkfront, type BlkfrontOptions } from '../../src/blkfront/index.js';
import type { BlockStorage, StorageSpec } from '../../src/storage/index.js';
import { createVbdNodes, removeVbdNodes, Toolstack, type VbdPaths } from '../../src/toolstack/index.js';
import type { Hypervisor, XenDomain } from '../../src/xen/index.js';
import { xvdVirtualDevice } from '../../src/xenbus/index.js';
export { tempDir } from '../support/common.js';

/** Every grant, mapping and event channel the hypervisor handed out is back. */
export function assertReleased(hv: Hypervisor): void {
  const c = hv.counters();
  assert.deepEqual([c.grantsActive, c.mapsActive, c.channelsBound, c.portsOpen], [0, 0, 0, 0], 'everything released');
}

/**
 * A toolstack for the test file: started before its tests, shut down after them (then `cleanup`),
 * with everything released. Read `.ts` inside tests.
 */
export function fileToolstack(cleanup?: () => void): { readonly ts: Toolstack } {
  let ts: Toolstack | undefined;
  before(async () => { ts = await Toolstack.start(); });
  after(async () => {
    if (ts === undefined) return;
    await ts.shutdown();
    cleanup?.();
    assertReleased(ts.hv);
  });
  return { get ts() { return ts!; } };
}

/** xorshift32: reproducible data and choices from a seed printed on failure. */
export class Rng {
  private s: number;
  constructor(readonly seed: number) {
    this.s = seed >>> 0 || 1;
  }
  next(): number {
    let x = this.s;
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    this.s = x;
    return x;
  }
  int(min: number, max: number): number {
    return min + (this.next() % (max - min + 1));
  }
  bytes(n: number): Uint8Array {
    const b = new Uint8Array(n);
    const w = new Uint32Array(b.buffer, 0, n >> 2);
    for (let i = 0; i < w.length; i++) w[i] = this.next();
    for (let i = w.length * 4; i < n; i++) b[i] = this.next() & 0xff;
    return b;
  }
}

/** A temp directory removed by `cleanup`. */
/** A sparse image of `size` bytes (zeroes). */
export function sparseImage(path: string, size: number): void {
  writeFileSync(path, '');
  const fd = openSync(path, 'r+');
  ftruncateSync(fd, size);
  closeSync(fd);
}

/** First differing byte of two arrays, or -1. */
export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

/** What verified I/O needs of a disk. */
export interface ByteDisk {
  read(offset: number, length: number): Promise<Uint8Array>;
  write(offset: number, data: Uint8Array): Promise<void>;
}

/**
 * Runs one batch of disjoint ranges at once, each a random write (kept in `model`) or a read
 * checked against `model`.
 */
export async function verifiedBatch(disk: ByteDisk, model: Uint8Array, rng: Rng, ranges: readonly (readonly [number, number])[]): Promise<void> {
  await Promise.all(ranges.map(async ([off, len]) => {
    if (rng.int(0, 1) === 0) {
      const data = rng.bytes(len);
      await disk.write(off, data);
      model.set(data, off);
    } else {
      const at = firstDifference(await disk.read(off, len), model.subarray(off, off + len));
      if (at !== -1) throw new Error(`read ${len} at ${off}: byte ${at} differs (seed ${rng.seed})`);
    }
  }));
}

/** A blkfront and a blkback in two domains local to this thread, on one VBD (`withLocalDisk`). */
export interface LocalDisk {
  readonly G: XenDomain;
  readonly B: XenDomain;
  readonly paths: VbdPaths;
  readonly be: Blkback;
  readonly f: Blkfront;
}

export interface LocalDiskOptions {
  readonly storage: BlockStorage;
  /** The spec queue threads open the storage again from. */
  readonly storageSpec?: StorageSpec;
  readonly guestPages?: number;
  readonly backendPages?: number;
  readonly backendVcpus?: number;
  readonly back?: Partial<BlkbackOptions>;
  readonly front?: Partial<BlkfrontOptions>;
}

/**
 * Plugs `storage` between a guest and a driver domain created in this thread, runs `body`, then
 * closes both ends and destroys both domains whatever `body` did. Attaching is bounded in time.
 */
export async function withLocalDisk(ts: Toolstack, o: LocalDiskOptions, body: (d: LocalDisk) => Promise<void>): Promise<void> {
  const G = ts.hv.createLocalDomain({ memoryPages: o.guestPages ?? 1024, pollMicros: 0 });
  const B = ts.hv.createLocalDomain({ memoryPages: o.backendPages ?? 64, pollMicros: 0, ...(o.backendVcpus === undefined ? {} : { maxVcpus: o.backendVcpus }) });
  const paths = await createVbdNodes(ts.xs, { frontDomid: G.domid, backDomid: B.domid, devid: xvdVirtualDevice(0) }, { kind: 'memory', size: o.storage.size }, false);
  let be: Blkback | undefined;
  let f: Blkfront | undefined;
  try {
    be = await Blkback.start({ xen: B, xs: ts.xs, backDir: paths.backDir, storage: o.storage, ...(o.storageSpec === undefined ? {} : { storageSpec: o.storageSpec }), options: { housekeepingMs: 0, ...o.back } });
    f = await bounded(Blkfront.attach({ xen: G, xs: ts.xs, frontDir: paths.frontDir, options: { ...o.front } }), 'attach', 10_000);
    await body({ G, B, paths, be, f });
  } finally {
    await f?.close();
    await be?.close();
    await removeVbdNodes(ts.xs, paths);
    await ts.hv.destroyDomain(G.domid);
    await ts.hv.destroyDomain(B.domid);
  }
}

function bounded<T>(p: Promise<T>, what: string, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`${what} did not settle in ${ms} ms`)), ms); });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}
