/**
 * The data path's ordering and accounting, with a storage that completes out of order or holds
 * I/O until told: a WRITE_BARRIER waits for every earlier request and no later one overtakes it
 * (blkif.h); requests beyond the per-ring pending pool wait on the ring and each wait counts
 * `oo_req` (Linux __do_block_io_op); `rd_sect`/`wr_sect` are the sectors storage really read and
 * wrote. The frontend here writes ring entries by hand, so every request is exactly as the test says.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
  BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, BLKIF_SEGMENT_SIZE, BLKIF_SEGS_PER_INDIRECT_FRAME, X86_64_ABI, XEN_PAGE_SIZE,
  decodeResponse, encodeRequest, encodeSegment, type BlkifRequest, type BlkifResponse, type BlkifSegment,
} from '../../src/abi/index.js';
import { DataPath, newVbdCounters, type VbdCounters, type VbdLimits } from '../../src/blkback/index.js';
import { MapPerRequest } from '../../src/blkback/page-access.js';
import { BackRing, FrontRing, RING_CONSUMED, RingEntry, SharedRing } from '../../src/ring/index.js';
import { MemoryStorage, type BlockStorage } from '../../src/storage/index.js';
import { GNTMAP_host_map, Hypervisor, type XenDomain } from '../../src/xen/index.js';
import { Rng, firstDifference } from '../e2e/helpers.js';
import { eventually, within } from '../e2e/raw-frontend.js';
import { assertReleased } from '../e2e/helpers.js';

const SIZE = 1 << 20;
const SECTORS = SIZE / 512;
const TIMEOUT = { timeout: 60_000 };
const abi = X86_64_ABI;

let hv: Hypervisor;
before(() => { hv = new Hypervisor({ dom0MemoryPages: 16 }); });
after(async () => {
  await hv.shutdown();
  assertReleased(hv);
});

/** Memory storage that logs when each operation starts and ends, and delays or holds it as told. */
class ScriptedStorage implements BlockStorage {
  readonly mem = new MemoryStorage(SIZE);
  readonly size = SIZE;
  readonly sectorSize = 512;
  readonly readOnly = false;
  readonly canDiscard = true;
  readonly log: string[] = [];
  /** Milliseconds each next read or write at this byte offset takes (default 0). */
  readonly delays = new Map<number, number[]>();
  /** When set, every read and write waits in `held` until released. */
  hold = false;
  readonly held: (() => void)[] = [];
  active = 0;
  maxActive = 0;
  bytesRead = 0;
  bytesWritten = 0;

  private readonly seen = new Map<string, number>();

  /** Logs `<r|w><offset>.<nth op there>+` at the start and `...-` at the end. */
  private async run(kind: string, offset: number, io: () => Promise<void>): Promise<void> {
    const nth = (this.seen.get(`${kind}${offset}`) ?? 0) + 1;
    this.seen.set(`${kind}${offset}`, nth);
    const what = `${kind}${offset}.${nth}`;
    this.log.push(`${what}+`);
    this.active++;
    this.maxActive = Math.max(this.maxActive, this.active);
    try {
      if (this.hold) await new Promise<void>((r) => this.held.push(r));
      const ms = this.delays.get(offset)?.shift() ?? 0;
      if (ms > 0) await new Promise((r) => setTimeout(r, ms)); // the latency the test gives this operation: scenario
      await io();
    } finally {
      this.active--;
      this.log.push(`${what}-`);
    }
  }
  read(o: number, b: readonly Uint8Array[]): Promise<void> {
    return this.run('r', o, async () => { await this.mem.read(o, b); this.bytesRead += b.reduce((n, x) => n + x.length, 0); });
  }
  write(o: number, b: readonly Uint8Array[]): Promise<void> {
    return this.run('w', o, async () => { await this.mem.write(o, b); this.bytesWritten += b.reduce((n, x) => n + x.length, 0); });
  }
  async flush(): Promise<void> {
    this.log.push('f+');
    await new Promise((r) => setImmediate(r));
    this.log.push('f-');
  }
  discard(o: number, l: number): Promise<void> { return this.mem.discard(o, l); }
  writeZeroes(o: number, l: number): Promise<void> { return this.mem.writeZeroes(o, l); }
  async refreshSize(): Promise<number> { return this.size; }
  async close(): Promise<void> {}
}

/** A frontend domain writing ring entries by hand, and one DataPath serving them from `storage`. */
class Rig {
  readonly F: XenDomain;
  readonly B: XenDomain;
  readonly counters: VbdCounters = newVbdCounters();
  readonly responses: BlkifResponse[] = [];
  readonly front: FrontRing;
  readonly back: BackRing;
  readonly dp: DataPath;
  private readonly ringFrame: number;
  private readonly ringRef: number;
  private readonly ringHandle: number;
  private readonly fport: number;
  private readonly bport: number;
  private readonly off: () => void;
  private readonly grants: { ref: number; frame: number }[] = [];
  private readonly entry = new RingEntry(abi.entrySize);
  private waiters: (() => void)[] = [];

  constructor(readonly storage: ScriptedStorage, maxPending = 32, limits: Partial<VbdLimits> = {}) {
    this.F = hv.createLocalDomain({ memoryPages: 256, pollMicros: 0 });
    this.B = hv.createLocalDomain({ memoryPages: 64, pollMicros: 0 });
    [this.ringFrame] = this.F.memory.alloc(1) as [number];
    this.front = FrontRing.init(new SharedRing([this.F.memory.page(this.ringFrame)], abi.entrySize));
    this.ringRef = this.F.grants.grantAccess(this.B.domid, this.ringFrame, false);
    const m = this.B.grants.map([{ dom: this.F.domid, ref: this.ringRef, flags: GNTMAP_host_map }])[0]!;
    this.ringHandle = m.handle;
    this.back = new BackRing(new SharedRing([m.page!], abi.entrySize));
    this.fport = this.F.events.allocUnbound(this.B.domid);
    this.bport = this.B.events.bindInterdomain(this.F.domid, this.fport);
    const rsp = new RingEntry(abi.entrySize);
    this.off = this.F.events.on(this.fport, () => {
      do {
        while (this.front.consumeResponse(rsp) === RING_CONSUMED) this.responses.push(decodeResponse(rsp.view, 0, abi));
      } while (this.front.finalCheckForResponses() !== 0);
      for (const w of this.waiters.splice(0)) w();
    });
    const deps = { xen: this.B, frontDomid: this.F.domid, counters: this.counters };
    this.dp = new DataPath({
      xen: this.B, frontDomid: this.F.domid, ring: this.back, abi, port: this.bport, storage, access: new MapPerRequest(deps),
      limits: () => ({ sectors: SECTORS, sectorSize: 512, readOnly: false, flush: true, barrier: true, discard: true, discardSecure: true, ...limits }),
      maxIndirectSegments: 32, maxPending, counters: this.counters, onFatal: (why) => assert.fail(why), log: () => undefined,
    });
  }

  /** Granted pages of F holding `data` (or zeroes), one per 4 KiB. */
  pages(n: number, data?: Uint8Array): { refs: number[]; pages: Uint8Array[] } {
    const frames = this.F.memory.alloc(n);
    const refs = frames.map((f, i) => {
      const page = this.F.memory.page(f);
      page.fill(0xee);
      if (data !== undefined) page.set(data.subarray(i * XEN_PAGE_SIZE, (i + 1) * XEN_PAGE_SIZE));
      const ref = this.F.grants.grantAccess(this.B.domid, f, false);
      this.grants.push({ ref, frame: f });
      return ref;
    });
    return { refs, pages: frames.map((f) => this.F.memory.page(f)) };
  }

  /** An indirect page listing `segs`, granted. */
  indirectPage(segs: readonly BlkifSegment[]): number {
    const { refs, pages } = this.pages(1);
    const p = pages[0]!;
    const v = new DataView(p.buffer, p.byteOffset, p.byteLength);
    segs.forEach((s, j) => encodeSegment(v, (j % BLKIF_SEGS_PER_INDIRECT_FRAME) * BLKIF_SEGMENT_SIZE, s));
    return refs[0]!;
  }

  /** Publishes the requests in one push and one notification. */
  push(reqs: readonly BlkifRequest[]): void {
    for (const r of reqs) {
      encodeRequest(this.entry.view, 0, abi, r);
      assert.ok(this.front.produceRequest(this.entry));
    }
    this.front.pushRequests();
    this.F.events.notify(this.fport);
  }

  async responsesFor(n: number): Promise<BlkifResponse[]> {
    await within((async () => {
      while (this.responses.length < n) await new Promise<void>((r) => this.waiters.push(r));
    })(), `${n} responses (have ${this.responses.length})`);
    return this.responses;
  }

  async close(): Promise<void> {
    this.storage.hold = false;
    for (const r of this.storage.held.splice(0)) r();
    await this.dp.stop();
    this.off();
    this.B.grants.unmap([this.ringHandle]);
    this.B.events.close(this.bport);
    this.F.events.close(this.fport);
    for (const g of this.grants) assert.equal(this.F.grants.endAccess(g.ref), true, 'nothing left mapped');
    assert.equal(this.F.grants.endAccess(this.ringRef), true);
    await hv.destroyDomain(this.B.domid);
    await hv.destroyDomain(this.F.domid);
  }
}

const full = (refs: readonly number[]): BlkifSegment[] => refs.map((gref) => ({ gref, first_sect: 0, last_sect: 7 }));
const rw = (operation: typeof BLKIF_OP_READ | typeof BLKIF_OP_WRITE | typeof BLKIF_OP_WRITE_BARRIER | typeof BLKIF_OP_FLUSH_DISKCACHE, id: number, sector: number, seg: BlkifSegment[]): BlkifRequest =>
  ({ operation, nr_segments: seg.length, handle: 0, id: BigInt(id), sector_number: BigInt(sector), seg });

test('a read-only VBD that advertises discard: validate.ts alone refuses a hostile discard, write, barrier and indirect write (CVE-2013-2140)', TIMEOUT, async () => {
  // Nothing else stands in the way here: the limits advertise discard (xenbus.ts never would on
  // a read-only VBD, a frontend may send one regardless) and the storage underneath is writable.
  const storage = new ScriptedStorage();
  const before = new Uint8Array(SIZE).fill(0x5a);
  await storage.mem.write(0, [before]);
  const rig = new Rig(storage, 32, { readOnly: true, discard: true, discardSecure: true, flush: true, barrier: true });
  try {
    const p = (n: number) => rig.pages(n, new Uint8Array(n * XEN_PAGE_SIZE).fill(0xc3)).refs;
    const reqs: BlkifRequest[] = [
      { operation: BLKIF_OP_DISCARD, flag: 0, handle: 0, id: 1n, sector_number: 0n, nr_sectors: BigInt(SECTORS) },
      { operation: BLKIF_OP_DISCARD, flag: 1, handle: 0, id: 2n, sector_number: 8n, nr_sectors: 8n },
      rw(BLKIF_OP_WRITE, 3, 0, full(p(2))),
      rw(BLKIF_OP_WRITE_BARRIER, 4, 16, full(p(1))),
      { operation: BLKIF_OP_INDIRECT, indirect_op: BLKIF_OP_WRITE, nr_segments: 12, id: 5n, sector_number: 64n, handle: 0, indirect_grefs: [rig.indirectPage(full(p(12)))] },
      rw(BLKIF_OP_READ, 6, 0, full(p(1))),
    ];
    rig.push(reqs);
    const rsps = await rig.responsesFor(reqs.length);
    const status = (id: bigint) => rsps.find((r) => r.id === id)?.status;
    for (const id of [1n, 2n, 3n, 4n, 5n]) assert.equal(status(id), BLKIF_RSP_ERROR, `request ${id} refused as an error (not EOPNOTSUPP: the feature is advertised)`);
    assert.equal(status(6n), BLKIF_RSP_OKAY, 'reads still served');
    assert.deepEqual(storage.log.filter((e) => e.startsWith('w')), [], 'storage never asked to write');
    const after = new Uint8Array(SIZE);
    await storage.mem.read(0, [after]);
    assert.equal(firstDifference(after, before), -1, 'the disk is as it was: nothing discarded or written');
    assert.equal(rig.counters.ds_req + rig.counters.wr_req, 0);
  } finally {
    await rig.close();
  }
});

test('a WRITE_BARRIER waits for every earlier request, and no later request overtakes it', TIMEOUT, async () => {
  const storage = new ScriptedStorage();
  const rig = new Rig(storage);
  try {
    const rng = new Rng(7);
    const a = rng.bytes(4096);
    const b = rng.bytes(4096);
    const c = rng.bytes(4096);
    const bar = rng.bytes(4096);
    const d = rng.bytes(4096);
    // Earlier writes finish out of order (B, then C, then A) and long after the barrier is consumed:
    // a barrier that did not wait would flush before them, and D (same sector as A, no delay)
    // would land first and then be overwritten by A; E would read C's sector before C is written.
    storage.delays.set(0, [80, 0]);
    storage.delays.set(8 * 512, [5]);
    storage.delays.set(16 * 512, [40]);
    const e = rig.pages(1);
    rig.push([
      rw(BLKIF_OP_WRITE, 1, 0, full(rig.pages(1, a).refs)),
      rw(BLKIF_OP_WRITE, 2, 8, full(rig.pages(1, b).refs)),
      rw(BLKIF_OP_WRITE, 3, 16, full(rig.pages(1, c).refs)),
      rw(BLKIF_OP_WRITE_BARRIER, 4, 24, full(rig.pages(1, bar).refs)),
      rw(BLKIF_OP_WRITE, 5, 0, full(rig.pages(1, d).refs)),
      rw(BLKIF_OP_READ, 6, 16, full(e.refs)),
    ]);
    const rsps = await rig.responsesFor(6);
    assert.deepEqual(rsps.map((r) => r.status), Array(6).fill(BLKIF_RSP_OKAY));
    const at = (ev: string) => {
      const i = storage.log.indexOf(ev);
      assert.ok(i >= 0, `${ev} in ${storage.log.join(' ')}`);
      return i;
    };
    const A = 'w0.1', B = `w${8 * 512}.1`, C = `w${16 * 512}.1`, BAR = `w${24 * 512}.1`, D = 'w0.2', E = `r${16 * 512}.1`;
    const ends = [A, B, C].sort((x, y) => at(`${x}-`) - at(`${y}-`));
    assert.deepEqual(ends, [B, C, A], 'the storage completed the earlier writes out of order');
    const order = rsps.map((r) => Number(r.id));
    assert.deepEqual(new Set(order.slice(0, 3)), new Set([1, 2, 3]), `earlier requests are answered first: ${order}`);
    assert.equal(order[3], 4, `the barrier is answered after every earlier request: ${order}`);
    assert.deepEqual(new Set(order.slice(4)), new Set([5, 6]), `later requests are answered after the barrier: ${order}`);
    const flushStart = at('f+');
    for (const ev of [A, B, C]) assert.ok(at(`${ev}-`) < flushStart, `${ev} ends before the barrier's flush: ${storage.log.join(' ')}`);
    // The barrier's data goes after its flush; later requests start only once it is done.
    const barDone = at(`${BAR}-`);
    assert.ok(at(`${BAR}+`) > at('f-'));
    assert.ok(at(`${D}+`) > barDone, `D starts after the barrier: ${storage.log.join(' ')}`);
    assert.ok(at(`${E}+`) > barDone, `E starts after the barrier: ${storage.log.join(' ')}`);
    const disk = new Uint8Array(SIZE);
    await storage.mem.read(0, [disk]);
    assert.equal(firstDifference(disk.subarray(0, 4096), d), -1, 'the later write to A\'s sector is the one on disk');
    assert.equal(firstDifference(disk.subarray(24 * 512, 24 * 512 + 4096), bar), -1, 'the barrier\'s data is on disk');
    assert.equal(firstDifference(e.pages[0]!, c), -1, 'the later read sees the earlier write');
  } finally {
    await rig.close();
  }
});

test('requests beyond the pending pool wait on the ring; each wait counts oo_req', TIMEOUT, async () => {
  const storage = new ScriptedStorage();
  const POOL = 4;
  const N = 12;
  const rig = new Rig(storage, POOL);
  try {
    storage.hold = true;
    const rng = new Rng(3);
    const data = Array.from({ length: N }, () => rng.bytes(4096));
    rig.push(data.map((x, i) => rw(BLKIF_OP_WRITE, i + 1, i * 8, full(rig.pages(1, x).refs))));
    await eventually(() => storage.held.length === POOL, `${POOL} writes reach storage`);
    assert.equal(rig.back.reqCons, POOL, 'only the pool\'s worth of requests is consumed');
    assert.equal(rig.counters.oo_req, 1, 'the backend found the pool empty with requests waiting');
    // One completion at a time: each frees one slot, one more request is consumed, and the rest wait again.
    for (let k = 1; k <= N - POOL; k++) {
      storage.held.shift()!();
      await eventually(() => rig.back.reqCons === POOL + k && storage.held.length === POOL, `request ${POOL + k} consumed`);
      assert.equal(rig.counters.oo_req, Math.min(1 + k, N - POOL), `after ${k} completion(s)`);
    }
    storage.hold = false;
    for (const r of storage.held.splice(0)) r();
    const rsps = await rig.responsesFor(N);
    assert.deepEqual(rsps.map((r) => r.status), Array(N).fill(BLKIF_RSP_OKAY));
    assert.equal(storage.maxActive, POOL, 'never more requests at the storage than the pool');
    assert.equal(rig.counters.oo_req, N - POOL, 'one wait per request that found the pool empty');
    const disk = new Uint8Array(N * 4096);
    await storage.mem.read(0, [disk]);
    data.forEach((x, i) => assert.equal(firstDifference(disk.subarray(i * 4096, (i + 1) * 4096), x), -1, `write ${i}`));
  } finally {
    await rig.close();
  }
});

test('a full ring within the pool: all consumed at once, oo_req stays 0', TIMEOUT, async () => {
  const storage = new ScriptedStorage();
  const rig = new Rig(storage, 32);
  try {
    storage.hold = true;
    const n = rig.front.size;
    rig.push(Array.from({ length: n }, (_, i) => rw(BLKIF_OP_READ, i, i * 8, full(rig.pages(1).refs))));
    await eventually(() => storage.held.length === n, `all ${n} reads at storage`);
    assert.equal(rig.counters.oo_req, 0);
    storage.hold = false;
    for (const r of storage.held.splice(0)) r();
    await rig.responsesFor(n);
  } finally {
    await rig.close();
  }
});

test('rd_sect and wr_sect are the sectors storage read and wrote; refused requests count none', TIMEOUT, async () => {
  const storage = new ScriptedStorage();
  const rig = new Rig(storage);
  try {
    const seg = (gref: number, first: number, last: number): BlkifSegment => ({ gref, first_sect: first, last_sect: last });
    const p = (n: number) => rig.pages(n).refs;
    const ind = (op: number, id: number, sector: number, segs: BlkifSegment[]): BlkifRequest =>
      ({ operation: BLKIF_OP_INDIRECT, indirect_op: op, nr_segments: segs.length, id: BigInt(id), sector_number: BigInt(sector), handle: 0, indirect_grefs: [rig.indirectPage(segs)] });
    const two = p(2);
    const reqs: { req: BlkifRequest; ok: boolean }[] = [
      { req: rw(BLKIF_OP_READ, 1, 0, full(p(3))), ok: true },
      { req: rw(BLKIF_OP_READ, 2, 100, [seg(p(1)[0]!, 2, 5)]), ok: true },
      { req: rw(BLKIF_OP_WRITE, 3, 200, full(p(11))), ok: true },
      { req: rw(BLKIF_OP_WRITE, 4, 400, [seg(two[0]!, 0, 7), seg(two[1]!, 0, 0)]), ok: true },
      { req: ind(BLKIF_OP_WRITE, 5, 600, full(p(20))), ok: true },
      { req: ind(BLKIF_OP_READ, 6, 800, full(p(13))), ok: true },
      { req: rw(BLKIF_OP_FLUSH_DISKCACHE, 7, 0, []), ok: true },
      { req: rw(BLKIF_OP_WRITE_BARRIER, 8, 1000, full(p(1))), ok: true },
      { req: { operation: BLKIF_OP_DISCARD, flag: 0, handle: 0, id: 9n, sector_number: 1200n, nr_sectors: 64n }, ok: true },
      // Past the end of the disk: refused, nothing read or written.
      { req: rw(BLKIF_OP_WRITE, 10, SECTORS - 8, full(p(2))), ok: false },
      { req: rw(BLKIF_OP_READ, 11, SECTORS, full(p(1))), ok: false },
    ];
    rig.push(reqs.map((r) => r.req));
    const rsps = await rig.responsesFor(reqs.length);
    for (const r of reqs) {
      const got = rsps.find((x) => x.id === r.req.id)!;
      assert.equal(got.status, r.ok ? BLKIF_RSP_OKAY : BLKIF_RSP_ERROR, `request ${r.req.id}`);
    }
    // Expected counts from the requests themselves: sectors of each accepted data segment.
    const want = { rd_req: 0, wr_req: 0, f_req: 0, ds_req: 0, rd_sect: 0, wr_sect: 0 };
    for (const { req, ok } of reqs) {
      if (!ok) continue;
      const op = req.operation === BLKIF_OP_INDIRECT ? req.indirect_op : req.operation;
      // Indirect ones here carry whole pages only.
      const sectors = 'seg' in req ? req.seg.reduce((n, s) => n + s.last_sect - s.first_sect + 1, 0)
        : req.operation === BLKIF_OP_INDIRECT ? req.nr_segments * 8 : 0;
      if (op === BLKIF_OP_READ) { want.rd_req++; want.rd_sect += sectors; }
      else if (op === BLKIF_OP_WRITE) { want.wr_req++; want.wr_sect += sectors; }
      else if (op === BLKIF_OP_DISCARD) want.ds_req++;
      else { want.f_req++; want.wr_sect += sectors; }
    }
    const c = rig.counters;
    assert.deepEqual({ rd_req: c.rd_req, wr_req: c.wr_req, f_req: c.f_req, ds_req: c.ds_req, rd_sect: c.rd_sect, wr_sect: c.wr_sect }, want);
    assert.equal(c.rd_sect * 512, storage.bytesRead, 'rd_sect is what storage read');
    assert.equal(c.wr_sect * 512, storage.bytesWritten, 'wr_sect is what storage wrote');
    assert.equal(c.errors, 2);
  } finally {
    await rig.close();
  }
});
