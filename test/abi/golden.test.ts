/**
 * Golden encodings printed by a C program from Xen 4.17's genuine blkif.h (gcc -m64 / -m32;
 * shared/spec/c/golden_bytes.*.out), copied here as fixtures.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  BLKIF_DISCARD_SECURE,
  BLKIF_OP_DISCARD,
  BLKIF_OP_FLUSH_DISKCACHE,
  BLKIF_OP_INDIRECT,
  BLKIF_OP_READ,
  BLKIF_OP_WRITE,
  BLKIF_RSP_EOPNOTSUPP,
  BLKIF_RSP_ERROR,
  X86_32_ABI,
  X86_64_ABI,
  decodeRequest,
  decodeResponse,
  decodeSegment,
  encodeRequest,
  encodeResponse,
  encodeSegment,
  type BlkifAbi,
  type BlkifRequest,
  type BlkifResponse,
} from '../../src/abi/index.js';

const hex = (s: string) => Uint8Array.from(s.trim().split(/\s+/).map((b) => parseInt(b, 16)));
const padTo = (b: Uint8Array, n: number) => {
  const out = new Uint8Array(n);
  out.set(b);
  return out;
};

const WRITE: BlkifRequest = {
  operation: BLKIF_OP_WRITE, nr_segments: 2, handle: 0x0300, id: 0x1122334455667788n, sector_number: 0x100000002n,
  seg: [{ gref: 0xaabbccdd, first_sect: 0, last_sect: 7 }, { gref: 0x10, first_sect: 2, last_sect: 5 }],
};
const FLUSH: BlkifRequest = { operation: BLKIF_OP_FLUSH_DISKCACHE, nr_segments: 0, handle: 0x0300, id: 7n, sector_number: 0n, seg: [] };
const DISCARD: BlkifRequest = { operation: BLKIF_OP_DISCARD, flag: BLKIF_DISCARD_SECURE, handle: 0x0300, id: 0xdeadbeefn, sector_number: 2048n, nr_sectors: 65536n };
const INDIRECT: BlkifRequest = { operation: BLKIF_OP_INDIRECT, indirect_op: BLKIF_OP_READ, nr_segments: 600, id: 42n, sector_number: 8n, handle: 0x0300, indirect_grefs: [0x100, 0x101] };

const golden: { abi: BlkifAbi; req: [BlkifRequest, Uint8Array][]; rsp: [BlkifResponse, Uint8Array][] }[] = [
  {
    abi: X86_64_ABI,
    req: [
      [WRITE, padTo(hex('01 02 00 03 00 00 00 00 88 77 66 55 44 33 22 11 02 00 00 00 01 00 00 00 dd cc bb aa 00 07 00 00 10 00 00 00 02 05 00 00'), 112)],
      [FLUSH, padTo(hex('03 00 00 03 00 00 00 00 07'), 112)],
      [DISCARD, hex('05 01 00 03 00 00 00 00 ef be ad de 00 00 00 00 00 08 00 00 00 00 00 00 00 00 01 00 00 00 00 00')],
      [INDIRECT, padTo(hex('06 00 58 02 00 00 00 00 2a 00 00 00 00 00 00 00 08 00 00 00 00 00 00 00 00 03 00 00 00 01 00 00 01 01'), 64)],
    ],
    rsp: [
      [{ id: 0x1122334455667788n, operation: 1, status: BLKIF_RSP_EOPNOTSUPP }, hex('88 77 66 55 44 33 22 11 01 00 fe ff 00 00 00 00')],
      [{ id: 0x1122334455667788n, operation: 1, status: BLKIF_RSP_ERROR }, hex('88 77 66 55 44 33 22 11 01 00 ff ff 00 00 00 00')],
    ],
  },
  {
    abi: X86_32_ABI,
    req: [
      [WRITE, padTo(hex('01 02 00 03 88 77 66 55 44 33 22 11 02 00 00 00 01 00 00 00 dd cc bb aa 00 07 00 00 10 00 00 00 02 05 00 00'), 108)],
      [FLUSH, padTo(hex('03 00 00 03 07'), 108)],
      [DISCARD, hex('05 01 00 03 ef be ad de 00 00 00 00 00 08 00 00 00 00 00 00 00 00 01 00 00 00 00 00')],
      [INDIRECT, padTo(hex('06 00 58 02 2a 00 00 00 00 00 00 00 08 00 00 00 00 00 00 00 00 03 00 00 00 01 00 00 01 01 00 00'), 64)],
    ],
    rsp: [
      [{ id: 0x1122334455667788n, operation: 1, status: BLKIF_RSP_EOPNOTSUPP }, hex('88 77 66 55 44 33 22 11 01 00 fe ff')],
      [{ id: 0x1122334455667788n, operation: 1, status: BLKIF_RSP_ERROR }, hex('88 77 66 55 44 33 22 11 01 00 ff ff')],
    ],
  },
];

for (const { abi, req, rsp } of golden) {
  test(`${abi.protocol}: requests encode to the golden bytes and decode back`, () => {
    for (const [r, bytes] of req) {
      const buf = new Uint8Array(abi.entrySize).fill(0xee); // padding must be written as 0, not left
      const n = encodeRequest(new DataView(buf.buffer), 0, abi, r);
      assert.equal(n, bytes.length, `sizeof for operation ${r.operation}`);
      assert.deepEqual(buf.subarray(0, n), bytes, `bytes of operation ${r.operation}`);
      const d = decodeRequest(new DataView(padTo(bytes, abi.entrySize).buffer), 0, abi);
      assert.deepEqual(d, { ok: true, request: r });
    }
  });
  test(`${abi.protocol}: responses encode to the golden bytes and decode back`, () => {
    for (const [r, bytes] of rsp) {
      const buf = new Uint8Array(16).fill(0xee);
      assert.equal(encodeResponse(new DataView(buf.buffer), 0, abi, r), abi.response.size);
      assert.deepEqual(buf.subarray(0, abi.response.size), bytes);
      assert.deepEqual(decodeResponse(new DataView(bytes.buffer), 0, abi), r);
    }
  });
}

test('indirect page segments: the golden first three', () => {
  const bytes = hex('00 02 00 00 00 07 00 00 01 02 00 00 00 07 00 00 02 02 00 00 00 03 00 00');
  const segs = [{ gref: 0x200, first_sect: 0, last_sect: 7 }, { gref: 0x201, first_sect: 0, last_sect: 7 }, { gref: 0x202, first_sect: 0, last_sect: 3 }];
  const buf = new Uint8Array(24).fill(0xee);
  segs.forEach((s, i) => encodeSegment(new DataView(buf.buffer), 8 * i, s));
  assert.deepEqual(buf, bytes);
  segs.forEach((s, i) => assert.deepEqual(decodeSegment(new DataView(bytes.buffer), 8 * i), s));
});
