/**
 * A hostile frontend against blkback in a real driver domain: raw ring entries written field by
 * field (unknown operations, bad segment counts and ranges, sectors past the end or near 2^64,
 * grants that do not map, broken indirect requests, misaligned I/O on 4096-byte sectors, writes to
 * a read-only disk, disabled features, extreme ids), each answered with its id, its operation and
 * the right status, while the backend stays Connected and keeps serving. Then a ring flood (a
 * bogus req_prod) must disconnect that VBD alone while a normal blkfront VBD on the same driver
 * domain keeps serving verified I/O before, during and after. Afterwards every grant, mapping and
 * channel is back to where it was.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  BLKIF_DISCARD_SECURE,
  BLKIF_OP_DISCARD,
  BLKIF_OP_FLUSH_DISKCACHE,
  BLKIF_OP_INDIRECT,
  BLKIF_OP_READ,
  BLKIF_OP_RESERVED_1,
  BLKIF_OP_WRITE,
  BLKIF_OP_WRITE_BARRIER,
  BLKIF_RSP_EOPNOTSUPP,
  BLKIF_RSP_ERROR,
  BLKIF_RSP_OKAY,
  VDISK_READONLY,
  X86_32_ABI,
  XEN_PAGE_SIZE,
  XS_DISCARD_GRANULARITY,
  XS_FEATURE_BARRIER,
  XS_FEATURE_DISCARD,
  XS_FEATURE_FLUSH_CACHE,
  XS_FEATURE_MAX_INDIRECT_SEGMENTS,
  XS_INFO,
  XS_SECTORS,
  XS_SECTOR_SIZE,
} from '../../src/abi/index.js';
import { Toolstack, type DomainProxy, type GuestDisk } from '../../src/toolstack/index.js';
import type { XenCounters, XenDomain } from '../../src/xen/index.js';
import { XS_STATE, XenbusStateClosed, XenbusStateClosing, waitForState, xvdVirtualDevice } from '../../src/xenbus/index.js';
import { Rng, firstDifference, tempDir } from './helpers.js';
import { unlessGone } from '../support/common.js';
import {
  RawVbd,
  WAIT_MS,
  discard,
  eventually,
  fullSegs,
  indirect,
  rw,
  within,
  type AnyRequest,
} from './raw-frontend.js';

const MiB = 1024 * 1024;
/** The main raw VBD: 4 MiB in memory, indirect requests up to 320 segments. */
const MAIN_SIZE = 4 * MiB;
const MAIN_SECTORS = MAIN_SIZE / 512;
const MAIN_MAX_INDIRECT = 320;
/** A gref the raw frontend never grants (refs are handed out from the bottom of the table). */
const NEVER_GRANTED = 30000;
const U64_MAX = 0xffffffffffffffffn;

let ts: Toolstack;
let back: DomainProxy;
let guest: DomainProxy;
let L: XenDomain;
let main: RawVbd;
let baseline: { back: number[]; guest: number[] };
const tmp = tempDir('blkif-hostile-');
const rng = new Rng(0xbad5eed);
let idSeq = 0x1000n;
const id = (): bigint => ++idSeq;

function resources(domid: number): number[] {
  const c: XenCounters | undefined = ts.hv.domainCounters(domid);
  assert.ok(c !== undefined, `domain ${domid} has counters`);
  return [c.grantsActive, c.mapsActive, c.portsOpen, c.channelsBound];
}
const backMaps = (): number => ts.hv.domainCounters(back.domid)!.mapsActive;

/** A verified write and read on a raw VBD, and the backend still Connected with no error. */
async function healthy(v: RawVbd, sector = 0): Promise<void> {
  const data = rng.bytes(XEN_PAGE_SIZE);
  await v.writePages(sector, data, id());
  assert.equal(firstDifference(await v.readPages(sector, 1, id()), data), -1, 'a valid write reads back');
  const st = await v.status();
  assert.equal(st.state, 'Connected');
  assert.equal(st.connected, true);
  assert.equal(st.error, undefined);
  assert.equal(st.counters.fatal, 0);
  assert.deepEqual(v.strays, [], 'no response without a request');
  assert.equal(v.backendOverflow, false);
}

before(async () => {
  ts = await Toolstack.start();
  back = await ts.createBackendDomain();
  guest = await ts.createGuest();
  baseline = { back: resources(back.domid), guest: resources(guest.domid) };
  // No polling: the local domain shares the main thread with xenstored and the test.
  L = ts.hv.createLocalDomain({ memoryPages: 2048, pollMicros: 0 });
  main = await RawVbd.plug(ts, L, back, {
    devid: xvdVirtualDevice(0),
    storage: { kind: 'memory', size: MAIN_SIZE },
    backendOptions: { maxIndirectSegments: MAIN_MAX_INDIRECT },
  });
});

after(async () => {
  await ts?.shutdown();
  tmp.cleanup();
  if (ts !== undefined) {
    const c = ts.hv.counters();
    assert.deepEqual([c.grantsActive, c.mapsActive, c.channelsBound, c.portsOpen], [0, 0, 0, 0], 'everything released once the domains are gone');
  }
});

describe('blkback against a hostile raw frontend', () => {
  test('the raw VBD is connected as advertised', async () => {
    assert.equal(await ts.xs.read(`${main.backDir}/${XS_SECTORS}`), String(MAIN_SECTORS));
    assert.equal(await ts.xs.read(`${main.backDir}/${XS_FEATURE_MAX_INDIRECT_SEGMENTS}`), String(MAIN_MAX_INDIRECT));
    await healthy(main);
  });

  test('unknown operations are answered EOPNOTSUPP with their id and operation', async () => {
    const ops = [BLKIF_OP_RESERVED_1, 7, 8, 200, 255];
    await main.expect(ops.map((op) => ({ req: { other: op, id: id() }, status: BLKIF_RSP_EOPNOTSUPP, what: `operation ${op}` })));
    await healthy(main);
  });

  test('READ/WRITE with 0 or more than 11 segments, or a segment outside its page, are errors', async () => {
    const S = 64;
    const before = rng.bytes(2 * XEN_PAGE_SIZE);
    await main.writePages(S, before, id());
    await main.withGrants(2, {}, async (g) => {
      for (const p of g.pages) p.fill(0x77);
      const [a, b] = g.refs as [number, number];
      const seg = (gref: number, first_sect: number, last_sect: number) => ({ gref, first_sect, last_sect });
      const cases: { req: AnyRequest; status: number; what: string }[] = [];
      for (const op of [BLKIF_OP_READ, BLKIF_OP_WRITE] as const) {
        const n = op === BLKIF_OP_READ ? 'READ' : 'WRITE';
        cases.push(
          { req: rw(op, id(), S, [], 0), status: BLKIF_RSP_ERROR, what: `${n} with nr_segments 0` },
          { req: rw(op, id(), S, fullSegs(new Array(11).fill(a)), 12), status: BLKIF_RSP_ERROR, what: `${n} with nr_segments 12` },
          { req: rw(op, id(), S, fullSegs(new Array(11).fill(a)), 255), status: BLKIF_RSP_ERROR, what: `${n} with nr_segments 255` },
          { req: rw(op, id(), S, [seg(a, 5, 4)]), status: BLKIF_RSP_ERROR, what: `${n} with first_sect 5 > last_sect 4` },
          { req: rw(op, id(), S, [seg(a, 0, 8)]), status: BLKIF_RSP_ERROR, what: `${n} with last_sect 8` },
          { req: rw(op, id(), S, [seg(a, 8, 8)]), status: BLKIF_RSP_ERROR, what: `${n} with first_sect = last_sect = 8` },
          { req: rw(op, id(), S, [seg(a, 0, 255)]), status: BLKIF_RSP_ERROR, what: `${n} with last_sect 255` },
          { req: rw(op, id(), S, [seg(a, 0, 7), seg(b, 3, 2)]), status: BLKIF_RSP_ERROR, what: `${n} whose second segment is inverted` },
        );
      }
      await main.expect(cases);
      assert.ok(g.pages.every((p) => p.every((x) => x === 0x77)), 'no refused READ filled a page');
    });
    assert.equal(firstDifference(await main.readPages(S, 2, id()), before), -1, 'no refused WRITE reached the disk');
    await healthy(main);
  });

  test('ranges past the end of the disk, straddling it, or near 2^64 are errors', async () => {
    const end = MAIN_SECTORS;
    const tail = rng.bytes(2 * XEN_PAGE_SIZE);
    await main.writePages(end - 16, tail, id());
    await main.withGrants(2, { readonly: true }, async (g) => {
      for (const p of g.pages) p.fill(0x99);
      const one = fullSegs([g.refs[0]!]);
      const two = fullSegs(g.refs);
      const half = [{ gref: g.refs[0]!, first_sect: 0, last_sect: 3 }];
      const cases: { req: AnyRequest; status: number; what: string }[] = [];
      for (const op of [BLKIF_OP_READ, BLKIF_OP_WRITE] as const) {
        const n = op === BLKIF_OP_READ ? 'READ' : 'WRITE';
        // READ maps its pages writable: use them only where the range check must refuse first.
        cases.push(
          { req: rw(op, id(), end, one), status: BLKIF_RSP_ERROR, what: `${n} at the first sector past the end` },
          { req: rw(op, id(), end, half), status: BLKIF_RSP_ERROR, what: `${n} of 4 sectors at the end` },
          { req: rw(op, id(), end - 4, one), status: BLKIF_RSP_ERROR, what: `${n} straddling the end by 4 sectors` },
          { req: rw(op, id(), end - 8, two), status: BLKIF_RSP_ERROR, what: `${n} of two pages straddling the end` },
          { req: rw(op, id(), end + 1_000_000, one), status: BLKIF_RSP_ERROR, what: `${n} far past the end` },
          { req: rw(op, id(), 2n ** 32n, one), status: BLKIF_RSP_ERROR, what: `${n} at sector 2^32` },
          { req: rw(op, id(), 2n ** 53n - 8n, one), status: BLKIF_RSP_ERROR, what: `${n} at sector 2^53 - 8` },
          { req: rw(op, id(), 2n ** 53n, one), status: BLKIF_RSP_ERROR, what: `${n} at sector 2^53` },
          { req: rw(op, id(), 2n ** 63n, one), status: BLKIF_RSP_ERROR, what: `${n} at sector 2^63` },
          { req: rw(op, id(), U64_MAX - 7n, one), status: BLKIF_RSP_ERROR, what: `${n} at sector 2^64 - 8 (wraps to 0 in u64)` },
          { req: rw(op, id(), U64_MAX, one), status: BLKIF_RSP_ERROR, what: `${n} at sector 2^64 - 1` },
        );
      }
      await main.expect(cases);
    });
    assert.equal(firstDifference(await main.readPages(end - 16, 2, id()), tail), -1, 'the last sectors are untouched');
    // The very last page is in range.
    const last = rng.bytes(XEN_PAGE_SIZE);
    await main.writePages(end - 8, last, id());
    assert.equal(firstDifference(await main.readPages(end - 8, 1, id()), last), -1);
    await healthy(main);
  });

  test('grants that do not map are errors and leave nothing mapped', async () => {
    const S = 128;
    const content = rng.bytes(2 * XEN_PAGE_SIZE);
    await main.writePages(S, content, id());
    const mapsBefore = backMaps();
    const foreign = main.grant(1, { to: 0 }); // granted to dom0, not to the driver domain
    const ro = main.grant(1, { readonly: true }); // the backend must write a READ's page
    const good = main.grant(2);
    for (const p of good.pages) p.fill(0x5a);
    const wdata = main.grant(2, { readonly: true });
    for (const p of wdata.pages) p.fill(0xa5);
    // Granted and ended before the request: a stale ref (taken last, so no later grant reuses it).
    const stale = main.grant(1);
    const staleRef = stale.refs[0]!;
    main.release(stale);
    const seg = (gref: number) => ({ gref, first_sect: 0, last_sect: 7 });
    try {
      await main.expect([
        { req: rw(BLKIF_OP_READ, id(), S, [seg(NEVER_GRANTED)]), status: BLKIF_RSP_ERROR, what: 'READ into a gref never granted' },
        { req: rw(BLKIF_OP_READ, id(), S, [seg(0)]), status: BLKIF_RSP_ERROR, what: 'READ into reserved gref 0' },
        { req: rw(BLKIF_OP_READ, id(), S, [seg(0xffffffff)]), status: BLKIF_RSP_ERROR, what: 'READ into gref 2^32 - 1 (past the table)' },
        { req: rw(BLKIF_OP_READ, id(), S, [seg(staleRef)]), status: BLKIF_RSP_ERROR, what: 'READ into a gref already ended' },
        { req: rw(BLKIF_OP_READ, id(), S, [seg(foreign.refs[0]!)]), status: BLKIF_RSP_ERROR, what: 'READ into a gref granted to another domain' },
        { req: rw(BLKIF_OP_READ, id(), S, [seg(ro.refs[0]!)]), status: BLKIF_RSP_ERROR, what: 'READ into a page granted read-only' },
        { req: rw(BLKIF_OP_READ, id(), S, [seg(good.refs[0]!), seg(ro.refs[0]!)]), status: BLKIF_RSP_ERROR, what: 'READ whose second page is read-only' },
        { req: rw(BLKIF_OP_READ, id(), S, [seg(good.refs[0]!), seg(good.refs[1]!), seg(NEVER_GRANTED)]), status: BLKIF_RSP_ERROR, what: 'READ whose third gref is bogus' },
        { req: rw(BLKIF_OP_WRITE, id(), S, [seg(NEVER_GRANTED)]), status: BLKIF_RSP_ERROR, what: 'WRITE from a gref never granted' },
        { req: rw(BLKIF_OP_WRITE, id(), S, [seg(foreign.refs[0]!)]), status: BLKIF_RSP_ERROR, what: 'WRITE from a gref granted to another domain' },
        { req: rw(BLKIF_OP_WRITE, id(), S, [seg(wdata.refs[0]!), seg(staleRef)]), status: BLKIF_RSP_ERROR, what: 'WRITE whose second gref was ended' },
        { req: rw(BLKIF_OP_WRITE, id(), S, [seg(wdata.refs[0]!), seg(wdata.refs[1]!), seg(foreign.refs[0]!)]), status: BLKIF_RSP_ERROR, what: 'WRITE whose third gref is foreign' },
      ]);
      assert.ok(good.pages.every((p) => p.every((x) => x === 0x5a)), 'no refused READ filled a page it could map');
      assert.equal(firstDifference(await main.readPages(S, 2, id()), content), -1, 'no refused WRITE reached the disk');
      assert.equal(backMaps(), mapsBefore, 'the pages that did map were unmapped again');
      for (const g of [foreign, ro, good, wdata]) assert.ok(g.refs.every((r) => !L.grants.isMapped(r)));
      // The two requests naming the ended gref made the backend map an ended grant: what the
      // checked hypervisor reports (and real Xen refuses), the frontend's fault here.
      const v = ts.hv.takeViolations().map((x) => [x.kind, x.domid, x.peer, x.ref]);
      assert.deepEqual(v, ts.hv.checked ? [0, 1].map(() => ['ended-grant-mapped', back.domid, L.domid, staleRef]) : []);
    } finally {
      for (const g of [foreign, ro, good, wdata]) main.release(g);
    }
    await healthy(main);
  });

  test('indirect requests: bad operation, bad count, bad pages and bad segments are errors; a valid 300-segment one works', async () => {
    const S = 4096;
    const mapsBefore = backMaps();
    await main.withGrants(20, {}, async (data) => {
      for (const p of data.pages) p.fill(0x3c);
      const segs = fullSegs(data.refs);
      const ind = main.indirectPages(segs);
      const lastSect8 = main.indirectPages(segs.map((s, j) => (j === 13 ? { ...s, last_sect: 8 } : s)));
      const inverted = main.indirectPages(segs.map((s, j) => (j === 13 ? { ...s, first_sect: 6, last_sect: 5 } : s)));
      const badGref = main.indirectPages(segs.map((s, j) => (j === 19 ? { ...s, gref: NEVER_GRANTED } : s)));
      const foreign = main.grant(1, { to: 0 });
      const pages = [ind, lastSect8, inverted, badGref, foreign];
      try {
        const r = ind.refs;
        await main.expect([
          { req: indirect(BLKIF_OP_WRITE_BARRIER, id(), S, 20, r), status: BLKIF_RSP_ERROR, what: 'indirect WRITE_BARRIER' },
          { req: indirect(BLKIF_OP_FLUSH_DISKCACHE, id(), S, 20, r), status: BLKIF_RSP_ERROR, what: 'indirect FLUSH_DISKCACHE' },
          { req: indirect(BLKIF_OP_RESERVED_1, id(), S, 20, r), status: BLKIF_RSP_ERROR, what: 'indirect RESERVED_1' },
          { req: indirect(BLKIF_OP_DISCARD, id(), S, 20, r), status: BLKIF_RSP_ERROR, what: 'indirect DISCARD' },
          { req: indirect(BLKIF_OP_INDIRECT, id(), S, 20, r), status: BLKIF_RSP_ERROR, what: 'indirect INDIRECT' },
          { req: indirect(99, id(), S, 20, r), status: BLKIF_RSP_ERROR, what: 'indirect operation 99' },
          { req: indirect(255, id(), S, 20, r), status: BLKIF_RSP_ERROR, what: 'indirect operation 255' },
          { req: indirect(BLKIF_OP_READ, id(), S, 0, r), status: BLKIF_RSP_ERROR, what: 'indirect READ of 0 segments' },
          { req: indirect(BLKIF_OP_READ, id(), S, MAIN_MAX_INDIRECT + 1, r), status: BLKIF_RSP_ERROR, what: `indirect READ of ${MAIN_MAX_INDIRECT + 1} segments (max ${MAIN_MAX_INDIRECT})` },
          { req: indirect(BLKIF_OP_WRITE, id(), S, MAIN_MAX_INDIRECT + 1, r), status: BLKIF_RSP_ERROR, what: `indirect WRITE of ${MAIN_MAX_INDIRECT + 1} segments` },
          { req: indirect(BLKIF_OP_READ, id(), S, 4097, r), status: BLKIF_RSP_ERROR, what: 'indirect READ of 4097 segments (past blkif.h)' },
          { req: indirect(BLKIF_OP_READ, id(), S, 65535, r), status: BLKIF_RSP_ERROR, what: 'indirect READ of 65535 segments' },
          { req: indirect(BLKIF_OP_READ, id(), S, 20, [NEVER_GRANTED]), status: BLKIF_RSP_ERROR, what: 'indirect page gref never granted' },
          { req: indirect(BLKIF_OP_READ, id(), S, 20, [0xffffffff]), status: BLKIF_RSP_ERROR, what: 'indirect page gref 2^32 - 1' },
          { req: indirect(BLKIF_OP_READ, id(), S, 20, foreign.refs), status: BLKIF_RSP_ERROR, what: 'indirect page granted to another domain' },
          { req: indirect(BLKIF_OP_READ, id(), S, 20, lastSect8.refs), status: BLKIF_RSP_ERROR, what: 'indirect segment 13 with last_sect 8' },
          { req: indirect(BLKIF_OP_WRITE, id(), S, 20, inverted.refs), status: BLKIF_RSP_ERROR, what: 'indirect segment 13 inverted' },
          { req: indirect(BLKIF_OP_READ, id(), S, 20, badGref.refs), status: BLKIF_RSP_ERROR, what: 'indirect READ, segment 19 gref never granted' },
          { req: indirect(BLKIF_OP_WRITE, id(), S, 20, badGref.refs), status: BLKIF_RSP_ERROR, what: 'indirect WRITE, segment 19 gref never granted' },
          { req: indirect(BLKIF_OP_READ, id(), MAIN_SECTORS - 8, 20, r), status: BLKIF_RSP_ERROR, what: 'indirect READ straddling the end' },
          { req: indirect(BLKIF_OP_READ, id(), U64_MAX - 7n, 20, r), status: BLKIF_RSP_ERROR, what: 'indirect READ at sector 2^64 - 8' },
        ]);
        assert.ok(data.pages.every((p) => p.every((x) => x === 0x3c)), 'no refused indirect READ filled a page');
      } finally {
        for (const g of pages) main.release(g);
      }
    });
    assert.equal(backMaps(), mapsBefore, 'no indirect or data page stays mapped');

    // A valid indirect WRITE then READ of 300 segments (1.2 MB) through one indirect page.
    const n = 300;
    const data = rng.bytes(n * XEN_PAGE_SIZE);
    const c0 = (await main.status()).counters;
    await main.indirectPagesIo(BLKIF_OP_WRITE, S, n, id(), data);
    const got = await main.indirectPagesIo(BLKIF_OP_READ, S, n, id());
    assert.equal(firstDifference(got, data), -1, 'the indirect READ returns what the indirect WRITE wrote');
    // And it landed where it says: first and last page through plain READs.
    assert.equal(firstDifference(await main.readPages(S, 1, id()), data.subarray(0, XEN_PAGE_SIZE)), -1);
    assert.equal(firstDifference(await main.readPages(S + (n - 1) * 8, 1, id()), data.subarray((n - 1) * XEN_PAGE_SIZE)), -1);
    const c1 = (await main.status()).counters;
    assert.equal(c1.indirect_req - c0.indirect_req, 2);
    assert.equal(c1.indirect_segments - c0.indirect_segments, 2 * n);
    await healthy(main);
  });

  test('discards past the end, straddling it, or overflowing u64 are errors and discard nothing', async () => {
    const end = MAIN_SECTORS;
    const tail = rng.bytes(2 * XEN_PAGE_SIZE);
    await main.writePages(end - 16, tail, id());
    await main.expect([
      { req: discard(id(), end - 8, 16), status: BLKIF_RSP_ERROR, what: 'DISCARD straddling the end' },
      { req: discard(id(), end - 16, 17), status: BLKIF_RSP_ERROR, what: 'DISCARD one sector too long' },
      { req: discard(id(), end, 1), status: BLKIF_RSP_ERROR, what: 'DISCARD at the first sector past the end' },
      { req: discard(id(), end - 8, 16, BLKIF_DISCARD_SECURE), status: BLKIF_RSP_ERROR, what: 'secure DISCARD straddling the end' },
      { req: discard(id(), 0, U64_MAX), status: BLKIF_RSP_ERROR, what: 'DISCARD of 2^64 - 1 sectors' },
      { req: discard(id(), 8, U64_MAX - 3n), status: BLKIF_RSP_ERROR, what: 'DISCARD whose end wraps u64' },
      { req: discard(id(), U64_MAX - 7n, 8), status: BLKIF_RSP_ERROR, what: 'DISCARD at sector 2^64 - 8' },
      { req: discard(id(), 2n ** 53n, 8), status: BLKIF_RSP_ERROR, what: 'DISCARD at sector 2^53' },
    ]);
    assert.equal(firstDifference(await main.readPages(end - 16, 2, id()), tail), -1, 'nothing was discarded');
    // The last 8 sectors can be discarded.
    await main.expect([{ req: discard(id(), end - 8, 8), status: BLKIF_RSP_OKAY, what: 'DISCARD of the last page' }]);
    const after = await main.readPages(end - 16, 2, id());
    assert.equal(firstDifference(after.subarray(0, XEN_PAGE_SIZE), tail.subarray(0, XEN_PAGE_SIZE)), -1);
    assert.ok(after.subarray(XEN_PAGE_SIZE).every((x) => x === 0), 'the discarded page reads as zeroes');
    await healthy(main);
  });

  test('every id is echoed, whatever its u64 value, in one batch of mixed requests', async () => {
    const S = 256;
    await main.withGrants(2, {}, async (g) => {
      const ro = main.grant(1, { readonly: true });
      const ind = main.indirectPages(fullSegs([g.refs[1]!]));
      try {
        const cases: { req: AnyRequest; status: number; what: string }[] = [
          { req: rw(BLKIF_OP_WRITE, 0n, S, fullSegs(ro.refs)), status: BLKIF_RSP_OKAY, what: 'WRITE with id 0' },
          { req: rw(BLKIF_OP_READ, 1n, S + 8, fullSegs([g.refs[0]!])), status: BLKIF_RSP_OKAY, what: 'READ with id 1' },
          { req: { other: 200, id: 0xffffffffn }, status: BLKIF_RSP_EOPNOTSUPP, what: 'operation 200 with id 2^32 - 1' },
          { req: rw(BLKIF_OP_READ, 0x100000000n, S, [], 0), status: BLKIF_RSP_ERROR, what: 'bad READ with id 2^32' },
          { req: indirect(99, 0x7fffffffffffffffn, S, 1, ind.refs), status: BLKIF_RSP_ERROR, what: 'bad indirect with id 2^63 - 1' },
          { req: indirect(BLKIF_OP_READ, 0x8000000000000000n, S + 16, 1, ind.refs), status: BLKIF_RSP_OKAY, what: 'indirect READ with id 2^63' },
          { req: discard(0xdeadbeefcafebaben, S + 64, 8), status: BLKIF_RSP_OKAY, what: 'DISCARD with id 0xdeadbeefcafebabe' },
          { req: rw(BLKIF_OP_FLUSH_DISKCACHE, 0xfffffffffffffffen, 0, []), status: BLKIF_RSP_OKAY, what: 'FLUSH with id 2^64 - 2' },
          { req: { other: 255, id: U64_MAX }, status: BLKIF_RSP_EOPNOTSUPP, what: 'operation 255 with id 2^64 - 1' },
          { req: rw(BLKIF_OP_READ, U64_MAX - 2n, U64_MAX, fullSegs([g.refs[0]!])), status: BLKIF_RSP_ERROR, what: 'READ at sector 2^64 - 1 with id 2^64 - 3' },
        ];
        await main.expect(cases);
        // The barrier orders itself after everything before it; then it has its own turn.
        await main.expect([{ req: rw(BLKIF_OP_WRITE_BARRIER, U64_MAX, S, fullSegs(ro.refs)), status: BLKIF_RSP_OKAY, what: 'WRITE_BARRIER with id 2^64 - 1' }]);
      } finally {
        main.release(ind);
        main.release(ro);
      }
    });
    await healthy(main);
  });

  test("the backend's counters account for every refusal; only the ring stays mapped", async () => {
    const st = await main.status();
    assert.equal(st.state, 'Connected');
    assert.equal(st.counters.fatal, 0);
    assert.equal(main.tally.other, 0, 'every status is one of OKAY, ERROR, EOPNOTSUPP');
    assert.equal(st.counters.errors, main.tally.error, 'errors counts every ERROR answered');
    assert.equal(st.counters.eopnotsupp, main.tally.eopnotsupp, 'eopnotsupp counts every EOPNOTSUPP answered');
    assert.ok(main.tally.error >= 80 && main.tally.eopnotsupp >= 7, `tally ${JSON.stringify(main.tally)}`);
    assert.equal(st.counters.inflight_req, 0);
    assert.equal(st.counters.inflight_bytes, 0);
    assert.equal(backMaps(), baseline.back[1]! + 1, 'the driver domain holds only the ring mapping');
    assert.equal(st.counters.grant_map_ops, st.counters.grant_unmap_ops + 1,
      `grant_map_ops (${st.counters.grant_map_ops}) = grant_unmap_ops (${st.counters.grant_unmap_ops}) + 1 (the ring) after the bad grants`);
  });

  test('4096-byte sectors (x86_32 ring): misaligned sectors, segments and discards are errors', async () => {
    const v = await RawVbd.plug(ts, L, back, {
      devid: xvdVirtualDevice(1),
      storage: { kind: 'memory', size: MiB, sectorSize: 4096 },
      abi: X86_32_ABI,
    });
    try {
      assert.equal(await ts.xs.read(`${v.backDir}/${XS_SECTOR_SIZE}`), '4096');
      assert.equal(await ts.xs.read(`${v.backDir}/${XS_SECTORS}`), String(MiB / 512), 'sectors stay 512-byte units');
      const content = rng.bytes(2 * XEN_PAGE_SIZE);
      await v.writePages(8, content, id());
      await v.withGrants(2, {}, async (g) => {
        for (const p of g.pages) p.fill(0x11);
        const [a, b] = g.refs as [number, number];
        const s = (gref: number, first_sect: number, last_sect: number) => ({ gref, first_sect, last_sect });
        const ind = v.indirectPages([s(a, 0, 7), s(b, 0, 3)]);
        try {
          await v.expect([
            { req: rw(BLKIF_OP_READ, id(), 9, [s(a, 0, 7)]), status: BLKIF_RSP_ERROR, what: 'READ at sector 9' },
            { req: rw(BLKIF_OP_READ, id(), 12, [s(a, 0, 7)]), status: BLKIF_RSP_ERROR, what: 'READ at sector 12' },
            { req: rw(BLKIF_OP_READ, id(), 8, [s(a, 0, 3)]), status: BLKIF_RSP_ERROR, what: 'READ of 4 sectors' },
            { req: rw(BLKIF_OP_READ, id(), 8, [s(a, 4, 7)]), status: BLKIF_RSP_ERROR, what: 'READ of sectors 4..7 of a page' },
            { req: rw(BLKIF_OP_READ, id(), 8, [s(a, 1, 7)]), status: BLKIF_RSP_ERROR, what: 'READ of 7 sectors' },
            { req: rw(BLKIF_OP_READ, id(), 8, [s(a, 0, 3), s(b, 4, 7)]), status: BLKIF_RSP_ERROR, what: 'READ of two half pages (8 sectors in all)' },
            { req: rw(BLKIF_OP_WRITE, id(), 12, [s(a, 0, 7)]), status: BLKIF_RSP_ERROR, what: 'WRITE at sector 12' },
            { req: rw(BLKIF_OP_WRITE, id(), 8, [s(a, 0, 7), s(b, 0, 3)]), status: BLKIF_RSP_ERROR, what: 'WRITE whose second segment is half a sector' },
            { req: indirect(BLKIF_OP_READ, id(), 8, 2, ind.refs), status: BLKIF_RSP_ERROR, what: 'indirect READ with a misaligned segment' },
            { req: indirect(BLKIF_OP_WRITE, id(), 8, 2, ind.refs), status: BLKIF_RSP_ERROR, what: 'indirect WRITE with a misaligned segment' },
            { req: discard(id(), 1, 8), status: BLKIF_RSP_ERROR, what: 'DISCARD at sector 1' },
            { req: discard(id(), 8, 4), status: BLKIF_RSP_ERROR, what: 'DISCARD of 4 sectors' },
            { req: discard(id(), 8, 12), status: BLKIF_RSP_ERROR, what: 'DISCARD of 12 sectors' },
            { req: { other: BLKIF_OP_RESERVED_1, id: U64_MAX }, status: BLKIF_RSP_EOPNOTSUPP, what: 'RESERVED_1 with id 2^64 - 1 on x86_32' },
            { req: rw(BLKIF_OP_READ, 0xfedcba9876543210n, 0, [s(a, 0, 7)]), status: BLKIF_RSP_OKAY, what: 'an aligned READ with a large id on x86_32' },
          ]);
          assert.ok(g.pages[1]!.every((x) => x === 0x11), 'no refused READ filled a page');
        } finally {
          v.release(ind);
        }
      });
      assert.equal(firstDifference(await v.readPages(8, 2, id()), content), -1, 'no refused WRITE or DISCARD touched the disk');
      await v.expect([{ req: discard(id(), 8, 8), status: BLKIF_RSP_OKAY, what: 'an aligned DISCARD' }]);
      assert.ok((await v.readPages(8, 1, id())).every((x) => x === 0));
      await healthy(v, 64);
      const st = await v.status();
      assert.equal(st.counters.errors, v.tally.error);
    } finally {
      await v.close();
    }
  });

  const roVariants = [
    // mode "r" over writable storage: only blkback stands between the frontend and the file.
    { name: 'plugged read-only over a writable file', readOnly: true, storageReadOnly: false },
    { name: 'over read-only file storage', readOnly: false, storageReadOnly: true },
  ];
  for (const [k, variant] of roVariants.entries()) test(`a read-only VBD (${variant.name}) refuses every write, barrier and discard, offers no flush, and is never written`, async () => {
    const path = join(tmp.dir, `ro-${k}.img`);
    const pattern = rng.bytes(MiB);
    writeFileSync(path, pattern);
    const v = await RawVbd.plug(ts, L, back, {
      devid: xvdVirtualDevice(2),
      storage: { kind: 'file', path, readOnly: variant.storageReadOnly },
      readOnly: variant.readOnly,
    });
    try {
      const st0 = await v.status();
      assert.equal(st0.readOnly, true);
      // VDISK_READONLY is blkif.h's, compiled (test/conformance/xen-constants.test.ts).
      assert.equal(Number(await ts.xs.read(`${v.backDir}/${XS_INFO}`)) & VDISK_READONLY, VDISK_READONLY);
      for (const key of [XS_FEATURE_FLUSH_CACHE, XS_FEATURE_BARRIER, XS_FEATURE_DISCARD]) {
        assert.equal(await ts.xs.read(`${v.backDir}/${key}`), '0', `${key} is not offered`);
      }
      await v.withGrants(11, { readonly: true }, async (g) => {
        for (const p of g.pages) p.fill(0xcd);
        const one = fullSegs([g.refs[0]!]);
        const ind = v.indirectPages(fullSegs(g.refs));
        try {
          await v.expect([
            { req: rw(BLKIF_OP_WRITE, id(), 0, one), status: BLKIF_RSP_ERROR, what: 'WRITE' },
            { req: rw(BLKIF_OP_WRITE, id(), 256, fullSegs(g.refs)), status: BLKIF_RSP_ERROR, what: 'WRITE of 11 pages' },
            { req: rw(BLKIF_OP_WRITE_BARRIER, id(), 0, one), status: BLKIF_RSP_ERROR, what: 'WRITE_BARRIER with data' },
            { req: rw(BLKIF_OP_WRITE_BARRIER, id(), 0, []), status: BLKIF_RSP_ERROR, what: 'WRITE_BARRIER without data' },
            { req: discard(id(), 0, 8), status: BLKIF_RSP_ERROR, what: 'DISCARD' },
            { req: discard(id(), 0, 2048, BLKIF_DISCARD_SECURE), status: BLKIF_RSP_ERROR, what: 'secure DISCARD of the whole disk' },
            { req: indirect(BLKIF_OP_WRITE, id(), 0, 11, ind.refs), status: BLKIF_RSP_ERROR, what: 'indirect WRITE' },
            { req: rw(BLKIF_OP_FLUSH_DISKCACHE, id(), 0, []), status: BLKIF_RSP_EOPNOTSUPP, what: 'FLUSH_DISKCACHE' },
            { req: rw(BLKIF_OP_FLUSH_DISKCACHE, id(), 0, one), status: BLKIF_RSP_EOPNOTSUPP, what: 'FLUSH_DISKCACHE with data' },
          ]);
        } finally {
          v.release(ind);
        }
      });
      // Reads still work and see the file as it was.
      assert.equal(firstDifference(await v.readPages(0, 11, id()), pattern.subarray(0, 11 * XEN_PAGE_SIZE)), -1);
      assert.equal(firstDifference(await v.readPages(256, 11, id()), pattern.subarray(256 * 512, 256 * 512 + 11 * XEN_PAGE_SIZE)), -1);
      assert.equal(firstDifference(await v.indirectPagesIo(BLKIF_OP_READ, 0, 40, id()), pattern.subarray(0, 40 * XEN_PAGE_SIZE)), -1);
      const st = await v.status();
      assert.equal(st.state, 'Connected');
      assert.equal(st.counters.wr_req + st.counters.ds_req + st.counters.f_req, 0, 'nothing was served but reads');
      assert.equal(st.counters.errors, v.tally.error);
      assert.equal(st.counters.eopnotsupp, v.tally.eopnotsupp);
    } finally {
      await v.close();
    }
    assert.equal(firstDifference(readFileSync(path), pattern), -1, 'the file is byte for byte what it was');
  });

  test('features turned off are not advertised and their requests are refused', async () => {
    const v = await RawVbd.plug(ts, L, back, {
      devid: xvdVirtualDevice(3),
      storage: { kind: 'memory', size: MiB },
      backendOptions: { maxIndirectSegments: 0, flush: false, barrier: false, discard: false },
    });
    try {
      assert.equal(await unlessGone(ts.xs.read(`${v.backDir}/${XS_FEATURE_MAX_INDIRECT_SEGMENTS}`)), undefined, 'no feature-max-indirect-segments node');
      assert.equal(await unlessGone(ts.xs.read(`${v.backDir}/${XS_DISCARD_GRANULARITY}`)), undefined, 'no discard-granularity node');
      for (const key of [XS_FEATURE_FLUSH_CACHE, XS_FEATURE_BARRIER, XS_FEATURE_DISCARD]) {
        assert.equal(await ts.xs.read(`${v.backDir}/${key}`), '0', `${key} is not offered`);
      }
      const content = rng.bytes(XEN_PAGE_SIZE);
      await v.writePages(0, content, id());
      await v.withGrants(8, {}, async (g) => {
        const ind = v.indirectPages(fullSegs(g.refs));
        try {
          await v.expect([
            { req: indirect(BLKIF_OP_READ, id(), 0, 8, ind.refs), status: BLKIF_RSP_ERROR, what: 'indirect READ with indirect off' },
            { req: indirect(BLKIF_OP_WRITE, id(), 0, 8, ind.refs), status: BLKIF_RSP_ERROR, what: 'indirect WRITE with indirect off' },
            { req: indirect(BLKIF_OP_READ, id(), 0, 1, ind.refs), status: BLKIF_RSP_ERROR, what: 'indirect READ of 1 segment with indirect off' },
            { req: rw(BLKIF_OP_FLUSH_DISKCACHE, id(), 0, []), status: BLKIF_RSP_EOPNOTSUPP, what: 'FLUSH with flush off' },
            { req: rw(BLKIF_OP_WRITE_BARRIER, id(), 0, []), status: BLKIF_RSP_EOPNOTSUPP, what: 'WRITE_BARRIER with barrier off' },
            { req: discard(id(), 0, 8), status: BLKIF_RSP_EOPNOTSUPP, what: 'DISCARD with discard off' },
          ]);
        } finally {
          v.release(ind);
        }
      });
      assert.equal(firstDifference(await v.readPages(0, 1, id()), content), -1, 'nothing was discarded or overwritten');
      await healthy(v, 8);
      const st = await v.status();
      assert.equal(st.counters.indirect_req, 0);
      assert.equal(st.counters.errors, v.tally.error);
      assert.equal(st.counters.eopnotsupp, v.tally.eopnotsupp);
    } finally {
      await v.close();
    }
  });

  test('on a disk larger than 4 GiB, I/O and discards above 4 GiB land where they say', async () => {
    const size = 8 * 1024 * MiB + MiB; // sparse in memory
    const v = await RawVbd.plug(ts, L, back, { devid: xvdVirtualDevice(4), storage: { kind: 'memory', size } });
    try {
      const at4G = 2 ** 23; // sectors
      const at6G = 3 * 2 ** 22;
      const p4 = rng.bytes(XEN_PAGE_SIZE);
      const p6 = rng.bytes(XEN_PAGE_SIZE);
      const p0 = rng.bytes(XEN_PAGE_SIZE);
      await v.writePages(16, p0, id());
      await v.writePages(at4G, p4, id());
      assert.equal(firstDifference(await v.readPages(16, 1, id()), p0), -1, 'a WRITE at 4 GiB must not land at the start of the disk');
      assert.ok((await v.readPages(0, 1, id())).every((x) => x === 0), 'a WRITE at 4 GiB must not land at sector 0');
      await v.writePages(at6G, p6, id());
      assert.equal(firstDifference(await v.readPages(at4G, 1, id()), p4), -1);
      assert.equal(firstDifference(await v.readPages(at6G, 1, id()), p6), -1);
      // A discard of 4 GiB + 8 KiB from 0 covers sector 16 and the page at 4 GiB, not the one at 6 GiB.
      await v.expect([{ req: discard(id(), 0, at4G + 16 + 8), status: BLKIF_RSP_OKAY, what: 'DISCARD of 4 GiB + 12 KiB' }]);
      assert.ok((await v.readPages(16, 1, id())).every((x) => x === 0), 'the discard reached sector 16');
      assert.ok((await v.readPages(at4G, 1, id())).every((x) => x === 0), 'the discard reached 4 GiB');
      assert.equal(firstDifference(await v.readPages(at6G, 1, id()), p6), -1, 'the discard stopped where it said');
    } finally {
      await v.close();
    }
  });
});

describe('a ring flood', () => {
  const NORMAL_SIZE = 8 * MiB;

  async function verifiedIo(disk: GuestDisk, model: Uint8Array, rounds: number): Promise<void> {
    for (let i = 0; i < rounds; i++) {
      const len = rng.int(1, 64) * 512;
      const off = rng.int(0, (model.length - len) / 512) * 512;
      const data = rng.bytes(len);
      await within(disk.write(off, data), `normal VBD: write ${len} at ${off}`);
      model.set(data, off);
      const rlen = rng.int(1, 128) * 512;
      const roff = rng.int(0, (model.length - rlen) / 512) * 512;
      const got = await within(disk.read(roff, rlen), `normal VBD: read ${rlen} at ${roff}`);
      assert.equal(firstDifference(got, model.subarray(roff, roff + rlen)), -1, `normal VBD: read ${rlen} at ${roff} (seed ${rng.seed})`);
    }
  }

  // The flooded queue served in the backend's own thread, or in a queue thread of its own.
  for (const threaded of [false, true]) test(`disconnects that VBD alone${threaded ? ' (its queue in a thread of its own)' : ''}: fatal, Closing, ring released; a normal VBD on the same backend keeps serving`, async () => {
    const disk = await within(ts.plug({ guest, backend: back, storage: { kind: 'memory', size: NORMAL_SIZE } }), 'plugging the normal VBD');
    const model = new Uint8Array(NORMAL_SIZE);
    let flood: RawVbd | undefined;
    let stop = false;
    let bg: Promise<void> | undefined;
    try {
      await verifiedIo(disk, model, 4); // before
      const floodImage = join(tmp.dir, 'flood.img');
      writeFileSync(floodImage, new Uint8Array(MiB));
      flood = await RawVbd.plug(ts, L, back, threaded
        ? { devid: xvdVirtualDevice(6), storage: { kind: 'file', path: floodImage }, backendOptions: { queueThreads: true } }
        : { devid: xvdVirtualDevice(5), storage: { kind: 'memory', size: MiB } });
      await healthy(flood);
      if (threaded) assert.equal((await flood.status()).queueVcpus.length, 1, 'the flooded queue runs in a thread of its own');
      const logsBefore = ts.logs.length;
      const f = flood;

      let rounds = 0;
      bg = (async () => {
        while (!stop) {
          await verifiedIo(disk, model, 1);
          rounds++;
        }
      })();
      await eventually(() => rounds >= 1, 'the normal VBD is busy');
      const atFlood = rounds;

      // One valid request sits in its slot; then req_prod claims more than the ring holds.
      const page = f.grant(1);
      f.produce([rw(BLKIF_OP_READ, id(), 0, fullSegs(page.refs))]);
      const rspProd = f.sring.rspProd;
      const bogus = (rspProd + f.ring.size + 5) >>> 0;
      f.sring.reqProd = bogus;
      assert.equal(L.events.notify(f.port), 0);

      await waitForState(ts.xs, f.backDir, (s) => s === XenbusStateClosing, WAIT_MS);
      // blkback records its state once xenstore acknowledged the write: wait for both views.
      await eventually(async () => (await f.status()).state === 'Closing', 'blkback reports Closing');
      const st = await f.status();
      assert.equal(st.counters.fatal, 1, 'the flood is counted as fatal');
      assert.equal(st.state, 'Closing');
      assert.equal(st.connected, false);
      assert.ok(st.error !== undefined && st.error.includes('req_prod') && st.error.includes(String(bogus)),
        `the error names the bogus req_prod ${bogus}: ${st.error}`);
      assert.equal(f.sring.rspProd, rspProd, 'nothing is answered after the flood');
      assert.deepEqual(f.strays, []);
      assert.equal(L.grants.isMapped(page.refs[0]!), false, 'the flooded request was never served');
      const fatalLines = ts.logs.slice(logsBefore).filter((l) => l.includes('fatal'));
      assert.ok(fatalLines.length >= 1 && fatalLines.every((l) => l.includes(`${f.backDir}:`)), `only the flooded VBD went fatal: ${fatalLines.join(' | ')}`);

      // The frontend closes: the backend follows to Closed and has let go of the ring.
      await ts.xs.write(`${f.frontDir}/${XS_STATE}`, String(XenbusStateClosing));
      await waitForState(ts.xs, f.backDir, (s) => s === XenbusStateClosed, WAIT_MS);
      await ts.xs.write(`${f.frontDir}/${XS_STATE}`, String(XenbusStateClosed));
      await eventually(async () => (await f.status()).state === 'Closed', 'blkback reports Closed');
      const st2 = await f.status();
      assert.equal(st2.state, 'Closed');
      assert.equal(st2.counters.fatal, 1);
      assert.equal(f.sring.rspProd, rspProd, 'still nothing answered');
      assert.equal(L.grants.isMapped(f.ringRef), false, 'the ring is unmapped');
      assert.deepEqual(ts.hv.vcpusOf(back.domid), [], 'no queue thread left');

      // The normal VBD went on serving while all this happened, and goes on.
      await eventually(() => rounds >= atFlood + 2, 'the normal VBD kept serving during the flood');
      stop = true;
      await within(bg, 'the normal VBD finishing its round');
      bg = undefined;
      await verifiedIo(disk, model, 4); // after
      const bs = await within(disk.backendStatus(), 'normal VBD status');
      assert.equal(bs.state, 'Connected');
      assert.equal(bs.connected, true);
      assert.equal(bs.error, undefined);
      assert.equal(bs.counters.fatal, 0);
      assert.equal(bs.counters.errors, 0);
      const fs = await within(disk.status(), 'normal VBD frontend status');
      assert.equal(fs.state, 'Connected');
      assert.equal(fs.counters.errors, 0);
      assert.equal(firstDifference(await within(disk.read(0, NORMAL_SIZE), 'normal VBD: read all'), model), -1, 'the normal disk holds exactly what was written');
      // The main raw VBD on the same backend is unaffected too.
      await healthy(main);
    } finally {
      stop = true;
      await bg?.catch(() => undefined); // static-check: allow set only when the test failed before awaiting it: that failure is the one reported
      await flood?.close();
      await within(disk.unplug(), 'unplugging the normal VBD');
    }
  });
});

describe('teardown', () => {
  test('closing the raw frontend and the normal disk brings every grant, mapping and channel back to baseline', async () => {
    await main.close();
    assert.deepEqual(resources(L.domid), [0, 0, 0, 0], 'the raw frontend holds no grant, mapping or port');
    await ts.hv.destroyDomain(L.domid);
    assert.equal(ts.hv.domainCounters(L.domid), undefined, 'nothing of the raw frontend is still pinned');
    assert.deepEqual(resources(back.domid), baseline.back, 'the driver domain is back to its baseline');
    assert.deepEqual(resources(guest.domid), baseline.guest, 'the guest is back to its baseline');
    for (const front of [L.domid, guest.domid]) {
      const left = (await unlessGone(ts.xs.directory(`/local/domain/${back.domid}/backend/vbd/${front}`))) ?? [];
      assert.deepEqual(left, [], `no VBD of domain ${front} left in xenstore`);
    }
  });
});
