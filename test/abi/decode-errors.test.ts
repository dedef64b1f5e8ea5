/** Decoding hostile bytes: never a throw, always the id and operation to answer with, and what is wrong. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  BLKIF_MAX_INDIRECT_SEGMENTS,
  BLKIF_OP_DISCARD,
  BLKIF_OP_INDIRECT,
  BLKIF_OP_READ,
  BLKIF_OP_RESERVED_1,
  BLKIF_OP_WRITE,
  BLKIF_OP_WRITE_BARRIER,
  X86_32_ABI,
  X86_64_ABI,
  decodeRequest,
  encodeRequest,
  encodeRequestOther,
  type BlkifAbi,
  type BlkifRequest,
} from '../../src/abi/index.js';

const ABIS: BlkifAbi[] = [X86_64_ABI, X86_32_ABI];

function decodeOf(abi: BlkifAbi, req: BlkifRequest, limits?: { maxIndirectSegments?: number }) {
  const buf = new DataView(new ArrayBuffer(abi.entrySize));
  encodeRequest(buf, 0, abi, req);
  return decodeRequest(buf, 0, abi, limits);
}

const rw = (over: Partial<Extract<BlkifRequest, { seg: unknown }>>): BlkifRequest => ({
  operation: BLKIF_OP_READ, nr_segments: 1, handle: 1, id: 0xfedcba9876543210n, sector_number: 0n, seg: [{ gref: 1, first_sect: 0, last_sect: 7 }], ...over,
});

for (const abi of ABIS) {
  test(`${abi.protocol}: each structural violation is named, with the id to answer`, () => {
    const cases: [BlkifRequest, string][] = [
      [rw({ nr_segments: 12 }), 'bad-segment-count'],
      [rw({ nr_segments: 0, seg: [] }), 'bad-segment-count'],
      [rw({ operation: BLKIF_OP_WRITE, nr_segments: 0, seg: [] }), 'bad-segment-count'],
      [rw({ seg: [{ gref: 1, first_sect: 5, last_sect: 4 }] }), 'bad-segment'],
      [rw({ seg: [{ gref: 1, first_sect: 0, last_sect: 8 }] }), 'bad-segment'],
      [{ operation: BLKIF_OP_INDIRECT, indirect_op: BLKIF_OP_DISCARD, nr_segments: 1, id: 0xfedcba9876543210n, sector_number: 0n, handle: 0, indirect_grefs: [1] }, 'bad-indirect-operation'],
      [{ operation: BLKIF_OP_INDIRECT, indirect_op: BLKIF_OP_READ, nr_segments: 0, id: 0xfedcba9876543210n, sector_number: 0n, handle: 0, indirect_grefs: [] }, 'bad-indirect-segment-count'],
      [{ operation: BLKIF_OP_INDIRECT, indirect_op: BLKIF_OP_READ, nr_segments: BLKIF_MAX_INDIRECT_SEGMENTS + 1, id: 0xfedcba9876543210n, sector_number: 0n, handle: 0, indirect_grefs: [1, 2, 3, 4, 5, 6, 7, 8] }, 'bad-indirect-segment-count'],
    ];
    for (const [req, problem] of cases) {
      const d = decodeOf(abi, req);
      assert.equal(d.ok, false, problem);
      if (!d.ok) {
        assert.equal(d.problem, problem);
        assert.equal(d.id, 0xfedcba9876543210n);
        assert.equal(d.operation, req.operation);
        assert.ok(d.message.length > 0);
      }
    }
  });

  test(`${abi.protocol}: a flush or barrier may carry no data; reads and writes may not`, () => {
    assert.equal(decodeOf(abi, rw({ operation: BLKIF_OP_WRITE_BARRIER, nr_segments: 0, seg: [] })).ok, true);
    assert.equal(decodeOf(abi, rw({ operation: BLKIF_OP_READ, nr_segments: 11, seg: Array(11).fill({ gref: 9, first_sect: 3, last_sect: 3 }) })).ok, true);
  });

  test(`${abi.protocol}: the backend's indirect segment limit is enforced`, () => {
    const req: BlkifRequest = { operation: BLKIF_OP_INDIRECT, indirect_op: BLKIF_OP_WRITE, nr_segments: 257, id: 5n, sector_number: 0n, handle: 0, indirect_grefs: [1] };
    assert.equal(decodeOf(abi, req).ok, true);
    const d = decodeOf(abi, req, { maxIndirectSegments: 256 });
    assert.ok(!d.ok && d.problem === 'bad-indirect-segment-count');
  });

  test(`${abi.protocol}: unknown operations keep their id readable`, () => {
    for (const op of [BLKIF_OP_RESERVED_1, 7, 99, 255]) {
      const buf = new DataView(new ArrayBuffer(abi.entrySize));
      encodeRequestOther(buf, 0, abi, op, 0x8000000000000001n);
      assert.deepEqual(decodeRequest(buf, 0, abi), { ok: false, operation: op, id: 0x8000000000000001n, problem: 'unknown-operation', message: `operation ${op} is not supported` });
    }
  });

  test(`${abi.protocol}: arbitrary bytes never make decode throw, and a rejected request still yields its id`, () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 120 }), fc.integer({ min: -4, max: 130 }), (bytes, off) => {
        const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
        const d = decodeRequest(view, off, abi);
        if (!d.ok && d.problem !== 'truncated') {
          assert.equal(d.id, view.getBigUint64(off + abi.request.id, true));
        }
      }),
      { numRuns: 2000 },
    );
  });
}
