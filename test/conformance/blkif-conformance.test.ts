/**
 * Byte-exactness against Xen's genuine headers: a C program built with gcc -m64 and -m32 against
 * /usr/include/xen/io/blkif.h and ring.h fills ring pages (orders 0..4, indexes wrapping past
 * 2^32, every kind of request including indirect with 1..8 pages and 1..4096 segments, invalid
 * ones, responses) that our decoder must read back exactly; and checks, through the header's
 * structs and RING_GET_REQUEST/RESPONSE, pages our encoder wrote.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import {
  BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
  BLKIF_SEGS_PER_INDIRECT_FRAME,
  XEN_PAGE_SIZE,
  abiByName,
  decodeSegment,
  encodeSegment,
  indirectSegmentOffset,
  indirectSegmentPage,
  type BlkifRequest,
  type BlkifResponse,
  type BlkifSegment,
} from '../../src/abi/index.js';
import { requestToJson, responseToJson } from '../../src/abi/json.js';
import { decodeRingImage, encodeRingImage } from '../../src/cli/ring-image.js';
import { ringSizeFor } from '../../src/ring/index.js';
import { XEN_BLKIF_H, buildConformance, type CBuild } from '../support/c-build.js';
import * as arb from '../support/arbitraries.js';
import { needTools } from '../support/tools.js';

needTools(XEN_BLKIF_H, 'gcc', 'gcc-m32', 'qemu-i386');

const ABIS = ['x86_64-abi', 'x86_32-abi'] as const;
const ORDERS = [0, 1, 2, 3, 4];
const INDIRECT_BYTES = BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * XEN_PAGE_SIZE;

let c: CBuild;
let tmp: string;
before(() => {
  c = buildConformance();
  tmp = mkdtempSync(join(tmpdir(), 'blkif-conf-'));
});
after(() => {
  c?.cleanup();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

function indirectPages(bytes: Uint8Array): DataView[] {
  const pages: DataView[] = [];
  for (let p = 0; p < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; p++) pages.push(new DataView(bytes.buffer, bytes.byteOffset + p * XEN_PAGE_SIZE, XEN_PAGE_SIZE));
  return pages;
}

describe('C (genuine headers) writes, TypeScript reads', () => {
  for (const abiName of ABIS) {
    for (const order of ORDERS) {
      test(`${abiName}, ring page order ${order}`, () => {
        const abi = abiByName(abiName)!;
        const ringFile = join(tmp, `c-${abiName}-${order}.ring`);
        const indFile = join(tmp, `c-${abiName}-${order}.ind`);
        for (const seed of [order * 7919 + 1, order * 7919 + 2]) {
          const r = c.run(abiName, ['gen', String(order), String(seed), ringFile, indFile]);
          assert.equal(r.status, 0, r.stderr);
          const img = decodeRingImage(readFileSync(ringFile), abi, order);
          const byIndex = new Map(img.requests.map((q) => [q['index'] as number, q]));
          const rspByIndex = new Map(img.responses.map((q) => [q['index'] as number, q]));
          const ind = indirectPages(readFileSync(indFile));
          let records = 0;
          for (const line of r.stdout.trim().split('\n')) {
            const [kind, ...f] = line.split(' ');
            const n = (i: number) => Number(f[i]);
            records++;
            switch (kind) {
              case 'abi':
                assert.equal(f[0], abi.protocol);
                assert.equal(n(1), abi.entrySize, 'sizeof(union blkif_sring_entry)');
                break;
              case 'header':
                assert.deepEqual([img.req_prod, img.req_event, img.rsp_prod, img.rsp_event, img.ring_size], f.map(Number));
                assert.equal(ringSizeFor(XEN_PAGE_SIZE << order, abi.entrySize), n(4), '__CONST_RING_SIZE');
                break;
              case 'rw': {
                const seg = [];
                for (let k = 0; k < n(2); k++) seg.push({ gref: n(6 + 3 * k), first_sect: n(7 + 3 * k), last_sect: n(8 + 3 * k) });
                assert.deepEqual(byIndex.get(n(0)), {
                  index: n(0), operation: n(1), nr_segments: n(2), handle: n(3), id: f[4], sector_number: f[5], seg,
                });
                break;
              }
              case 'badrw': {
                const q = byIndex.get(n(0))!;
                assert.equal(q['error'], 'bad-segment-count', line);
                assert.deepEqual([q['operation'], q['id']], [n(1), f[3]]);
                break;
              }
              case 'discard':
                assert.deepEqual(byIndex.get(n(0)), {
                  index: n(0), operation: 5, flag: n(1), handle: n(2), id: f[3], sector_number: f[4], nr_sectors: f[5],
                });
                break;
              case 'indirect':
                assert.deepEqual(byIndex.get(n(0)), {
                  index: n(0), operation: 6, indirect_op: n(1), nr_segments: n(2), handle: n(3), id: f[4], sector_number: f[5],
                  indirect_grefs: f.slice(7, 7 + n(6)).map(Number),
                });
                break;
              case 'other': {
                const q = byIndex.get(n(0))!;
                assert.equal(q['error'], 'unknown-operation', line);
                assert.deepEqual([q['operation'], q['id']], [n(1), f[2]]);
                break;
              }
              case 'rsp':
                assert.deepEqual(rspByIndex.get(n(0)), { index: n(0), id: f[1], operation: n(2), status: n(3) });
                break;
              case 'iseg': {
                const j = n(0);
                assert.deepEqual(decodeSegment(ind[indirectSegmentPage(j)]!, indirectSegmentOffset(j)), { gref: n(1), first_sect: n(2), last_sect: n(3) });
                break;
              }
              default:
                assert.fail(`unknown record ${line}`);
            }
          }
          assert.ok(records > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * BLKIF_SEGS_PER_INDIRECT_FRAME, 'every indirect segment was compared');
        }
      });
    }
  }
});

function recordsOf(img: { req_prod: number; req_event: number; rsp_prod: number; rsp_event: number; ring_size: number }, abiName: string, entrySize: number, reqs: [number, BlkifRequest][], rsps: [number, BlkifResponse][], segs: BlkifSegment[]): string {
  const out = [`abi ${abiName} ${entrySize}`, `header ${img.req_prod} ${img.req_event} ${img.rsp_prod} ${img.rsp_event} ${img.ring_size}`];
  for (const [i, q] of reqs) {
    if (q.operation === 5) out.push(`discard ${i} ${q.flag} ${q.handle} ${q.id} ${q.sector_number} ${q.nr_sectors}`);
    else if (q.operation === 6) out.push(`indirect ${i} ${q.indirect_op} ${q.nr_segments} ${q.handle} ${q.id} ${q.sector_number} ${q.indirect_grefs.length} ${q.indirect_grefs.join(' ')}`);
    else out.push(`rw ${i} ${q.operation} ${q.nr_segments} ${q.handle} ${q.id} ${q.sector_number} ${q.seg.map((s) => `${s.gref} ${s.first_sect} ${s.last_sect}`).join(' ')}`);
  }
  for (const [i, p] of rsps) out.push(`rsp ${i} ${p.id} ${p.operation} ${p.status}`);
  segs.forEach((s, j) => out.push(`iseg ${j} ${s.gref} ${s.first_sect} ${s.last_sect}`));
  return out.join('\n') + '\n';
}

describe('TypeScript writes, C (genuine headers) checks', () => {
  for (const abiName of ABIS) {
    test(`${abiName}: random rings of every order, indexes wrapping past 2^32`, () => {
      const abi = abiByName(abiName)!;
      const ringFile = join(tmp, `ts-${abiName}.ring`);
      const indFile = join(tmp, `ts-${abiName}.ind`);
      fc.assert(
        fc.property(
          fc.integer({ min: 0, max: 4 }),
          fc.integer({ min: 1, max: 64 }), // distance below 2^32 of rsp_prod
          fc.array(arb.request, { minLength: 1, maxLength: 512 }),
          fc.array(arb.response, { maxLength: 512 }),
          fc.array(arb.segment, { minLength: 16, maxLength: 64 }),
          arb.u32,
          arb.u32,
          (order, below, reqList, rspList, segList, reqEvent, rspEvent) => {
            const size = ringSizeFor(XEN_PAGE_SIZE << order, abi.entrySize);
            const reqs = reqList.slice(0, size);
            const rsps = rspList.slice(0, size - reqs.length);
            const rspProd = (2 ** 32 - below) >>> 0;
            const hdr = { req_prod: (rspProd + reqs.length) >>> 0, req_event: reqEvent, rsp_prod: rspProd, rsp_event: rspEvent, ring_size: size };
            const reqAt = reqs.map((q, k): [number, BlkifRequest] => [(rspProd + k) >>> 0, q]);
            const rspAt = rsps.map((p, k): [number, BlkifResponse] => [(rspProd - rsps.length + k) >>> 0, p]);
            const spec = {
              ...hdr,
              requests: reqAt.map(([index, q]) => ({ index, ...requestToJson(q) })),
              responses: rspAt.map(([index, p]) => ({ index, ...responseToJson(p) })),
            };
            writeFileSync(ringFile, encodeRingImage(spec, abi, order));
            // Spread the segments over all 8 indirect pages: segment j at page j/512, offset (j%512)*8.
            const all: BlkifSegment[] = [];
            const ind = new Uint8Array(INDIRECT_BYTES);
            const pages = indirectPages(ind);
            for (let j = 0; j < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * BLKIF_SEGS_PER_INDIRECT_FRAME; j += 61) {
              const s = segList[all.length % segList.length]!;
              all.push(s);
              encodeSegment(pages[indirectSegmentPage(j)]!, indirectSegmentOffset(j), s);
            }
            writeFileSync(indFile, ind);
            const recs = recordsOf(hdr, abiName, abi.entrySize, reqAt, rspAt, []) +
              all.map((s, k) => `iseg ${k * 61} ${s.gref} ${s.first_sect} ${s.last_sect}`).join('\n') + '\n';
            const r = c.run(abiName, ['check', String(order), ringFile, indFile], recs);
            assert.equal(r.status, 0, r.stdout + r.stderr);
            assert.match(r.stdout, /^ok \d+/);
          },
        ),
        { numRuns: 12 },
      );
    });
  }

  test('the C check catches a page written for the other ABI', () => {
    const spec = { req_prod: 1, rsp_prod: 0, requests: [{ index: 0, operation: 1, handle: 1, id: '12345678901234', sector_number: '99', seg: [{ gref: 5, first_sect: 0, last_sect: 7 }] }], responses: [] };
    const ringFile = join(tmp, 'cross.ring');
    const indFile = join(tmp, 'cross.ind');
    writeFileSync(ringFile, encodeRingImage(spec, abiByName('x86_32-abi')!, 0));
    writeFileSync(indFile, new Uint8Array(INDIRECT_BYTES));
    const abi64 = abiByName('x86_64-abi')!;
    const recs = recordsOf({ req_prod: 1, req_event: 1, rsp_prod: 0, rsp_event: 1, ring_size: 32 }, 'x86_64-abi', abi64.entrySize,
      [[0, { operation: 1, nr_segments: 1, handle: 1, id: 12345678901234n, sector_number: 99n, seg: [{ gref: 5, first_sect: 0, last_sect: 7 }] }]], [], []);
    const r = c.run('x86_64-abi', ['check', '0', ringFile, indFile], recs);
    assert.equal(r.status, 1);
    assert.match(r.stdout, /mismatch/);
  });
});
