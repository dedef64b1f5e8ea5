/**
 * Linux `blkif_recover` between backends with and without indirect descriptors: a driver domain
 * takes requests off the ring and dies without answering them; the disk moves to a backend with
 * other limits. The requests blkfront issues again are exactly the ones that were held (id,
 * operation, sector, size as the dead backend saw them), re-split under the new limits — at most
 * 11 segments when the new backend offers no `feature-max-indirect-segments`, indirect requests of
 * more than 11 segments once it offers 4096 — and every byte lands where it was written.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_INDIRECT, BLKIF_OP_WRITE, XEN_PAGE_SIZE, XS_EVENT_CHANNEL,
  XS_FEATURE_MAX_INDIRECT_SEGMENTS, XS_RING_REF, XS_SECTORS, XS_SECTOR_SIZE, abiByName, decodeRequest,
} from '../../src/abi/index.js';
import { Blkback } from '../../src/blkback/index.js';
import { Blkfront, type HeldRequest } from '../../src/blkfront/index.js';
import { BackRing, RING_CONSUMED, RingEntry, SharedRing } from '../../src/ring/index.js';
import { MemoryStorage, type BlockStorage } from '../../src/storage/index.js';
import { createVbdNodes, removeVbdNodes, type VbdPaths } from '../../src/toolstack/index.js';
import { GNTMAP_host_map, type XenDomain } from '../../src/xen/index.js';
import { XS_STATE, XenbusStateInitialised, waitForState, xvdVirtualDevice } from '../../src/xenbus/index.js';
import { Rng, firstDifference, fileToolstack } from './helpers.js';
import { eventually, within } from './raw-frontend.js';

const SIZE = 16 * 1024 * 1024;
const TIMEOUT = { timeout: 120_000 };
const PLAIN_BYTES = BLKIF_MAX_SEGMENTS_PER_REQUEST * XEN_PAGE_SIZE;
const abi = abiByName('x86_64-abi')!;

const suite = fileToolstack();

/** A request as a backend saw it on the ring. */
interface Seen { id: bigint; operation: number; sector: bigint; bytes: number; indirect: boolean }

/**
 * A driver domain that connects, takes every request off the ring, and answers none (it is
 * about to die). Advertises indirect descriptors only if `maxIndirect` is given.
 */
async function holdingBackend(R: XenDomain, frontDomid: number, paths: VbdPaths, maxIndirect: number | undefined): Promise<Seen[]> {
  const { xs } = suite.ts;
  if (maxIndirect !== undefined) await xs.write(`${paths.backDir}/${XS_FEATURE_MAX_INDIRECT_SEGMENTS}`, String(maxIndirect));
  await xs.write(`${paths.backDir}/${XS_SECTORS}`, String(SIZE / 512));
  await xs.write(`${paths.backDir}/${XS_SECTOR_SIZE}`, '512');
  await xs.write(`${paths.backDir}/${XS_STATE}`, '2');
  await waitForState(xs, paths.frontDir, (s) => s === XenbusStateInitialised, 10_000);
  const ref = Number(await xs.read(`${paths.frontDir}/${XS_RING_REF}`));
  const map = R.grants.map([{ dom: frontDomid, ref, flags: GNTMAP_host_map }])[0]!;
  const ring = new BackRing(new SharedRing([map.page!], abi.entrySize));
  const port = R.events.bindInterdomain(frontDomid, Number(await xs.read(`${paths.frontDir}/${XS_EVENT_CHANNEL}`)));
  const seen: Seen[] = [];
  const entry = new RingEntry(abi.entrySize);
  R.events.on(port, () => {
    do {
      while (ring.consumeRequest(entry) === RING_CONSUMED) {
        const d = decodeRequest(entry.view, 0, abi, { maxIndirectSegments: 4096 });
        assert.ok(d.ok);
        const r = d.request;
        assert.ok(r.operation === BLKIF_OP_WRITE || r.operation === BLKIF_OP_INDIRECT, `a write (${r.operation})`);
        const indirect = r.operation === BLKIF_OP_INDIRECT;
        const op = indirect ? r.indirect_op : r.operation;
        // Whole pages only in these tests.
        const segs = 'seg' in r ? r.seg.length : r.operation === BLKIF_OP_INDIRECT ? r.nr_segments : 0;
        seen.push({ id: r.id, operation: op, sector: r.sector_number, bytes: segs * XEN_PAGE_SIZE, indirect });
      }
    } while (ring.finalCheckForRequests() !== 0);
  });
  await xs.write(`${paths.backDir}/${XS_STATE}`, '4');
  return seen;
}

/** Memory storage that records every write it is asked for. */
class RecordingStorage implements BlockStorage {
  readonly mem = new MemoryStorage(SIZE);
  readonly size = SIZE;
  readonly sectorSize = 512;
  readonly readOnly = false;
  readonly canDiscard = true;
  readonly writes: [number, number][] = [];
  read(o: number, b: readonly Uint8Array[]): Promise<void> { return this.mem.read(o, b); }
  write(o: number, b: readonly Uint8Array[]): Promise<void> {
    this.writes.push([o, b.reduce((n, x) => n + x.length, 0)]);
    return this.mem.write(o, b);
  }
  flush(): Promise<void> { return this.mem.flush(); }
  discard(o: number, l: number): Promise<void> { return this.mem.discard(o, l); }
  writeZeroes(o: number, l: number): Promise<void> { return this.mem.writeZeroes(o, l); }
  async refreshSize(): Promise<number> { return this.size; }
  async close(): Promise<void> {}
}

const byOffset = (a: readonly [number, number][]) => [...a].sort((x, y) => x[0] - y[0] || x[1] - y[1]);
const asHeld = (s: Seen): Omit<HeldRequest, 'queue'> => ({ id: s.id, operation: s.operation, sector: s.sector, bytes: s.bytes });

/**
 * Plugs a frontend to a holding backend, issues `writes` (not awaited), lets the backend die with
 * them held, moves the disk to a real blkback with `maxIndirectSegments`, and hands over.
 */
async function moveWithHeldWrites(o: { oldIndirect: number | undefined; newIndirect: number; writes: readonly [number, number][]; seed: number },
  body: (r: { f: Blkfront; seen: Seen[]; held: HeldRequest[]; storage: RecordingStorage; be: Blkback; model: Uint8Array; acks: Promise<void>[] }) => Promise<void>): Promise<void> {
  const G = suite.ts.hv.createLocalDomain({ memoryPages: 8192 + 256, pollMicros: 0 });
  const R = suite.ts.hv.createLocalDomain({ memoryPages: 16, pollMicros: 0 });
  const B = suite.ts.hv.createLocalDomain({ memoryPages: 64, pollMicros: 0 });
  const devid = xvdVirtualDevice(0);
  const spec = { kind: 'memory' as const, size: SIZE };
  let paths = await createVbdNodes(suite.ts.xs, { frontDomid: G.domid, backDomid: R.domid, devid }, spec, false);
  const held: HeldRequest[] = [];
  const storage = new RecordingStorage();
  let f: Blkfront | undefined;
  let be: Blkback | undefined;
  try {
    const attaching = Blkfront.attach({
      xen: G, xs: suite.ts.xs, frontDir: paths.frontDir, onReissue: (h) => held.push(...h),
      options: { maxIndirectSegments: 4096, bufferPages: 8192, connectTimeoutMs: 20_000 },
    });
    const seen = await holdingBackend(R, G.domid, paths, o.oldIndirect);
    f = await within(attaching, 'attach to the holding backend');
    const model = new Uint8Array(SIZE);
    const rng = new Rng(o.seed);
    const acks = o.writes.map(([off, len]) => {
      const data = rng.bytes(len);
      model.set(data, off);
      return f!.write(off, data);
    });
    await eventually(() => f!.inFlight > 0 && seen.length === f!.inFlight, 'the backend holds what is on the ring');
    // The driver domain dies with the requests unanswered; the toolstack moves the disk.
    await suite.ts.hv.destroyDomain(R.domid);
    await suite.ts.xs.rm(paths.backDir);
    paths = await createVbdNodes(suite.ts.xs, { frontDomid: G.domid, backDomid: B.domid, devid }, spec, false, { relink: true });
    be = await Blkback.start({ xen: B, xs: suite.ts.xs, backDir: paths.backDir, storage, options: { maxIndirectSegments: o.newIndirect, housekeepingMs: 0 } });
    await within(Promise.all(acks), 'the held writes complete on the new backend');
    await body({ f, seen, held, storage, be, model, acks });
    const disk = new Uint8Array(SIZE);
    await storage.mem.read(0, [disk]);
    assert.equal(firstDifference(disk, model), -1, 'the new backend\'s storage holds every write');
    assert.equal(firstDifference(await f.read(0, SIZE), model), -1, 'and reads back through the frontend');
  } finally {
    await f?.close();
    await be?.close();
    await removeVbdNodes(suite.ts.xs, paths);
    for (const d of [G, R, B]) if (suite.ts.hv.domain(d.domid) !== undefined) await suite.ts.hv.destroyDomain(d.domid);
  }
}

test('indirect (4096) -> no indirect: the held requests, exactly, issued again in requests of at most 11 segments', TIMEOUT, async () => {
  const MiB = 1024 * 1024;
  const writes: [number, number][] = [[0, MiB], [2 * MiB, MiB], [4 * MiB, 2 * MiB], [8 * MiB + 4096, 3 * 4096]];
  await moveWithHeldWrites({ oldIndirect: 4096, newIndirect: 0, writes, seed: 1 }, async ({ f, seen, held, storage, be }) => {
    assert.equal(seen.length, writes.length, 'one request per write on the old backend');
    assert.ok(seen.filter((s) => s.indirect).length >= 3, 'held as indirect requests');
    assert.equal(f.counters.reissued, seen.length);
    assert.deepEqual(held.map(({ queue: _, ...h }) => h).sort((a, b) => Number(a.id - b.id)), seen.map(asHeld).sort((a, b) => Number(a.id - b.id)),
      'the re-issued requests are the held ones: ids, operations, sectors, sizes');
    assert.equal(f.info.indirect, false);
    // Each held range issued again, cut from its start into requests of at most 11 pages.
    const want: [number, number][] = [];
    for (const h of held) for (let at = 0; at < h.bytes; at += PLAIN_BYTES) want.push([Number(h.sector) * 512 + at, Math.min(PLAIN_BYTES, h.bytes - at)]);
    assert.deepEqual(byOffset(storage.writes), byOffset(want), 'what reached the new storage');
    const c = be.counters;
    assert.equal(c.indirect_req, 0);
    assert.equal(c.wr_req, want.length);
    assert.ok(c.segments <= BLKIF_MAX_SEGMENTS_PER_REQUEST * c.wr_req);
  });
});

test('no indirect -> indirect (4096): the held requests, exactly, then larger requests in indirect ones', TIMEOUT, async () => {
  const MiB = 1024 * 1024;
  // 3 x 1 MiB in 11-segment requests is more than a ring holds: the rest waits in the frontend.
  const writes: [number, number][] = [[0, MiB], [2 * MiB, MiB], [4 * MiB, MiB]];
  await moveWithHeldWrites({ oldIndirect: undefined, newIndirect: 4096, writes, seed: 2 }, async ({ f, seen, held, storage, be, model }) => {
    assert.ok(seen.length > 0);
    assert.ok(seen.every((s) => !s.indirect && s.bytes <= PLAIN_BYTES), 'held as plain requests');
    assert.equal(f.counters.reissued, seen.length);
    assert.deepEqual(held.map(({ queue: _, ...h }) => h).sort((a, b) => Number(a.id - b.id)), seen.map(asHeld).sort((a, b) => Number(a.id - b.id)),
      'the re-issued requests are the held ones: ids, operations, sectors, sizes');
    const got = new Set(storage.writes.map(([o, l]) => `${o}+${l}`));
    for (const h of held) assert.ok(got.has(`${Number(h.sector) * 512}+${h.bytes}`), `held request at sector ${h.sector} reached the new storage as it was`);
    assert.equal(f.info.maxSegments, 4096);
    assert.ok(storage.writes.some(([, l]) => l > PLAIN_BYTES), 'what waited behind them went in indirect requests');
    // And afterwards: a 4 MiB write is one indirect request of 1024 segments.
    const before = be.counters.indirect_req;
    const big = new Rng(3).bytes(4 * MiB);
    await f.write(8 * MiB, big);
    model.set(big, 8 * MiB);
    assert.equal(be.counters.indirect_req, before + 1);
    assert.deepEqual(storage.writes.at(-1), [8 * MiB, 4 * MiB]);
    assert.ok(be.counters.indirect_segments / be.counters.indirect_req > BLKIF_MAX_SEGMENTS_PER_REQUEST);
  });
});
