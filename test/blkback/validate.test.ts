/**
 * blkback's checks on a request copied out of the ring (Linux `dispatch_rw_block_io`,
 * `xen_vbd_translate`): every refusal has its reason, read-only VBDs are never written, and
 * property runs show that whatever is accepted lies inside the disk and on sector boundaries.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  BLKIF_DISCARD_SECURE, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE,
  BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, type BlkifRequest,
} from '../../src/abi/index.js';
import { classifyRequest, dataProblem, isRejection, type VbdLimits } from '../../src/blkback/index.js';
import { request } from '../support/arbitraries.js';

// Most random u64 sectors miss any disk: fold half of them near its start so acceptance is exercised.
const anyRequest = fc.oneof(request, request.map((r) => ({ ...r, sector_number: r.sector_number % 4096n }) as BlkifRequest));

const rw: VbdLimits = { sectors: 2048, sectorSize: 512, readOnly: false, flush: true, barrier: true, discard: true, discardSecure: true };
const ro: VbdLimits = { ...rw, readOnly: true, flush: false, barrier: false, discard: false, discardSecure: false };
const k4: VbdLimits = { ...rw, sectorSize: 4096 };

const read = (sector: bigint, segs: [number, number][]): BlkifRequest => ({
  operation: BLKIF_OP_READ, nr_segments: segs.length, handle: 0, id: 7n, sector_number: sector,
  seg: segs.map(([first_sect, last_sect], i) => ({ gref: 100 + i, first_sect, last_sect })),
});
const write = (sector: bigint, segs: [number, number][]): BlkifRequest => ({ ...read(sector, segs), operation: BLKIF_OP_WRITE } as BlkifRequest);

function verdict(req: BlkifRequest, vbd: VbdLimits): string {
  const r = classifyRequest(req, vbd);
  if (isRejection(r)) return r.status === BLKIF_RSP_EOPNOTSUPP ? 'eopnotsupp' : 'error';
  return dataProblem(r, vbd) === undefined ? 'ok' : 'error';
}

test('reads and writes inside the disk pass; past its end they fail', () => {
  assert.equal(verdict(read(0n, [[0, 7]]), rw), 'ok');
  assert.equal(verdict(read(2040n, [[0, 7]]), rw), 'ok');
  assert.equal(verdict(read(2041n, [[0, 7]]), rw), 'error');
  assert.equal(verdict(read(2048n, [[0, 0]]), rw), 'error');
  assert.equal(verdict(read(0xffffffffffffffffn, [[0, 0]]), rw), 'error');
  assert.equal(verdict(write(2047n, [[3, 3]]), rw), 'ok');
});

test("a flush or barrier without data is served whatever its sector (Linux 6.1 sends (sector_t)-1); with data, its range is checked", () => {
  const flush = (sector: bigint, segs: [number, number][]) => ({ ...write(sector, segs), operation: BLKIF_OP_FLUSH_DISKCACHE } as BlkifRequest);
  const barrier = (sector: bigint, segs: [number, number][]) => ({ ...write(sector, segs), operation: BLKIF_OP_WRITE_BARRIER } as BlkifRequest);
  assert.equal(verdict(flush(0xffffffffffffffffn, []), rw), 'ok');
  assert.equal(verdict(barrier(0xffffffffffffffffn, []), rw), 'ok');
  assert.equal(verdict(flush(0xffffffffffffffffn, [[0, 7]]), rw), 'error');
  assert.equal(verdict(flush(2041n, [[0, 7]]), rw), 'error');
  assert.equal(verdict(flush(2040n, [[0, 7]]), rw), 'ok');
});

test('segments must satisfy first_sect <= last_sect <= 7', () => {
  assert.equal(verdict(read(0n, [[4, 3]]), rw), 'error');
  assert.equal(verdict(read(0n, [[0, 8]]), rw), 'error');
});

test('4096-byte sectors: start and every segment aligned to 8 sectors', () => {
  assert.equal(verdict(read(8n, [[0, 7], [0, 7]]), k4), 'ok');
  assert.equal(verdict(read(1n, [[0, 7]]), k4), 'error');
  assert.equal(verdict(read(8n, [[0, 3]]), k4), 'error');
  assert.equal(verdict(read(8n, [[4, 7], [0, 3]]), k4), 'error');
});

test('a read-only VBD refuses writes, barriers, discards and indirect writes (CVE-2013-2140)', () => {
  assert.equal(verdict(read(0n, [[0, 7]]), ro), 'ok');
  assert.equal(verdict(write(0n, [[0, 7]]), ro), 'error');
  assert.equal(verdict({ ...read(0n, []), operation: BLKIF_OP_WRITE_BARRIER } as BlkifRequest, ro), 'error');
  assert.equal(verdict({ operation: BLKIF_OP_DISCARD, flag: 0, handle: 0, id: 1n, sector_number: 0n, nr_sectors: 8n }, ro), 'error');
  assert.equal(verdict({ operation: BLKIF_OP_INDIRECT, indirect_op: BLKIF_OP_WRITE, nr_segments: 20, id: 1n, sector_number: 0n, handle: 0, indirect_grefs: [1] }, ro), 'error');
  // Flush is simply not offered on a read-only VBD.
  assert.equal(verdict({ ...read(0n, []), operation: BLKIF_OP_FLUSH_DISKCACHE } as BlkifRequest, ro), 'eopnotsupp');
});

test('a read-only VBD that advertises discard, barrier and flush still refuses discard and writes of any kind (CVE-2013-2140)', () => {
  // The guard in validate.ts alone: every feature on, so no "not offered" refusal can stand in for it.
  const roAll: VbdLimits = { ...rw, readOnly: true };
  const refused = (req: BlkifRequest, why: RegExp) => {
    const r = classifyRequest(req, roAll);
    assert.ok(isRejection(r), `${why}: accepted`);
    assert.equal(r.status, BLKIF_RSP_ERROR, `${why}: ${r.why}`);
    assert.match(r.why, why);
  };
  refused({ operation: BLKIF_OP_DISCARD, flag: 0, handle: 0, id: 1n, sector_number: 0n, nr_sectors: 8n }, /discard on a read-only VBD/);
  refused({ operation: BLKIF_OP_DISCARD, flag: BLKIF_DISCARD_SECURE, handle: 0, id: 1n, sector_number: 0n, nr_sectors: 2048n }, /discard on a read-only VBD/);
  refused(write(0n, [[0, 7]]), /write to a read-only VBD/);
  refused({ ...read(0n, [[0, 7]]), operation: BLKIF_OP_WRITE_BARRIER } as BlkifRequest, /barrier on a read-only VBD/);
  refused({ ...read(0n, [[0, 7]]), operation: BLKIF_OP_FLUSH_DISKCACHE } as BlkifRequest, /flush with data on a read-only VBD/);
  refused({ operation: BLKIF_OP_INDIRECT, indirect_op: BLKIF_OP_WRITE, nr_segments: 20, id: 1n, sector_number: 0n, handle: 0, indirect_grefs: [1] }, /indirect write to a read-only VBD/);
  assert.equal(verdict(read(0n, [[0, 7]]), roAll), 'ok');
  assert.equal(verdict({ ...read(0n, []), operation: BLKIF_OP_FLUSH_DISKCACHE } as BlkifRequest, roAll), 'ok', 'an empty flush is harmless');
});

test('features not offered answer EOPNOTSUPP', () => {
  const none: VbdLimits = { ...rw, flush: false, barrier: false, discard: false, discardSecure: false };
  assert.equal(verdict({ ...read(0n, []), operation: BLKIF_OP_FLUSH_DISKCACHE } as BlkifRequest, none), 'eopnotsupp');
  assert.equal(verdict({ ...read(0n, []), operation: BLKIF_OP_WRITE_BARRIER } as BlkifRequest, none), 'eopnotsupp');
  assert.equal(verdict({ operation: BLKIF_OP_DISCARD, flag: 0, handle: 0, id: 1n, sector_number: 0n, nr_sectors: 8n }, none), 'eopnotsupp');
});

test('discard: range checked, secure only when offered', () => {
  const d = (sector: bigint, n: bigint, flag = 0): BlkifRequest => ({ operation: BLKIF_OP_DISCARD, flag, handle: 0, id: 1n, sector_number: sector, nr_sectors: n });
  assert.equal(verdict(d(0n, 2048n), rw), 'ok');
  assert.equal(verdict(d(1n, 2048n), rw), 'error');
  assert.equal(verdict(d(0n, 1n << 60n), rw), 'error');
  const r = classifyRequest(d(0n, 8n, BLKIF_DISCARD_SECURE), rw);
  assert.ok(!isRejection(r) && r.secure);
  const r2 = classifyRequest(d(0n, 8n, BLKIF_DISCARD_SECURE), { ...rw, discardSecure: false });
  assert.ok(!isRejection(r2) && !r2.secure);
});

test('property: an accepted request lies inside the disk, aligned, and never writes a read-only VBD', () => {
  const limits = fc.record({
    sectors: fc.integer({ min: 0, max: 1 << 20 }),
    sectorSize: fc.constantFrom(512, 4096),
    readOnly: fc.boolean(), flush: fc.boolean(), barrier: fc.boolean(), discard: fc.boolean(), discardSecure: fc.boolean(),
  });
  fc.assert(fc.property(anyRequest, limits, (req, vbd) => {
    const r = classifyRequest(req, vbd);
    if (isRejection(r)) {
      assert.ok(r.status === BLKIF_RSP_ERROR || r.status === BLKIF_RSP_EOPNOTSUPP);
      return;
    }
    if (vbd.readOnly) assert.ok(r.kind === 'read' || (r.kind === 'flush' && r.segs.length === 0), `${r.kind} accepted on a read-only VBD`);
    if (r.indirectGrefs !== undefined) return; // its segments come from pages
    if (dataProblem(r, vbd) !== undefined) return;
    const align = vbd.sectorSize / 512;
    const n = r.kind === 'discard' ? r.discardSectors : r.segs.reduce((a, s) => a + s.last_sect - s.first_sect + 1, 0);
    if (n > 0) {
      assert.ok(r.sector + n <= vbd.sectors);
      assert.equal(r.sector % align, 0);
      assert.equal(n % align, 0);
    }
  }), { numRuns: 2000 });
});
