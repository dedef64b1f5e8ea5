/** fast-check generators for blkif structures, shared by the property and conformance tests. */
import fc from 'fast-check';
import {
  BLKIF_DISCARD_SECURE,
  BLKIF_MAX_INDIRECT_SEGMENTS,
  BLKIF_MAX_SEGMENTS_PER_REQUEST,
  BLKIF_OP_DISCARD,
  BLKIF_OP_FLUSH_DISKCACHE,
  BLKIF_OP_INDIRECT,
  BLKIF_OP_READ,
  BLKIF_OP_WRITE,
  BLKIF_OP_WRITE_BARRIER,
  BLKIF_RSP_EOPNOTSUPP,
  BLKIF_RSP_ERROR,
  BLKIF_RSP_OKAY,
  indirectPagesFor,
  type BlkifRequest,
  type BlkifRequestDiscard,
  type BlkifRequestIndirect,
  type BlkifRequestRw,
  type BlkifResponse,
  type BlkifSegment,
} from '../../src/abi/index.js';

export const u8 = fc.integer({ min: 0, max: 0xff });
export const u16 = fc.integer({ min: 0, max: 0xffff });
export const u32 = fc.integer({ min: 0, max: 0xffffffff });
export const u64 = fc.bigInt({ min: 0n, max: 0xffffffffffffffffn });

// fc.record builds objects without a prototype; spread them into plain ones for deepEqual.
export const segment: fc.Arbitrary<BlkifSegment> = fc
  .record({ gref: u32, first_sect: fc.integer({ min: 0, max: 7 }), len: fc.integer({ min: 0, max: 7 }) })
  .map(({ gref, first_sect, len }) => ({ gref, first_sect, last_sect: Math.min(7, first_sect + len) }));

export const rwRequest: fc.Arbitrary<BlkifRequestRw> = fc
  .record({
    operation: fc.constantFrom(BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE),
    handle: u16,
    id: u64,
    sector_number: u64,
    seg: fc.array(segment, { minLength: 1, maxLength: BLKIF_MAX_SEGMENTS_PER_REQUEST }),
  })
  .map((r) => ({ ...r, nr_segments: r.seg.length }));

export const discardRequest: fc.Arbitrary<BlkifRequestDiscard> = fc
  .record({
    operation: fc.constant(BLKIF_OP_DISCARD),
    flag: fc.constantFrom(0, BLKIF_DISCARD_SECURE),
    handle: u16,
    id: u64,
    sector_number: u64,
    nr_sectors: u64,
  })
  .map((r) => ({ ...r }));

export const indirectRequest: fc.Arbitrary<BlkifRequestIndirect> = fc
  .record({
    indirect_op: fc.constantFrom(BLKIF_OP_READ, BLKIF_OP_WRITE),
    nr_segments: fc.integer({ min: 1, max: BLKIF_MAX_INDIRECT_SEGMENTS }),
    id: u64,
    sector_number: u64,
    handle: u16,
    grefs: fc.array(u32, { minLength: 8, maxLength: 8 }),
  })
  .map(({ grefs, ...r }) => ({ operation: BLKIF_OP_INDIRECT, ...r, indirect_grefs: grefs.slice(0, indirectPagesFor(r.nr_segments)) }));

export const request: fc.Arbitrary<BlkifRequest> = fc.oneof(rwRequest, discardRequest, indirectRequest);

export const response: fc.Arbitrary<BlkifResponse> = fc
  .record({
    id: u64,
    operation: fc.integer({ min: 0, max: 6 }),
    status: fc.constantFrom(BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP),
  })
  .map((r) => ({ ...r }));
