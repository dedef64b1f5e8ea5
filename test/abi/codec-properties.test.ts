/** decode(encode(x)) = x for every blkif struct and ABI, at any offset of a shared buffer. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { X86_32_ABI, X86_64_ABI, decodeRequest, decodeResponse, decodeSegment, encodeRequest, encodeResponse, encodeSegment, requestFromJson, requestToJson, responseFromJson, responseToJson } from '../../src/abi/index.js';
import * as arb from '../support/arbitraries.js';

for (const abi of [X86_64_ABI, X86_32_ABI]) {
  test(`${abi.protocol}: requests round-trip`, () => {
    fc.assert(
      fc.property(arb.request, fc.integer({ min: 0, max: 64 }), (req, off) => {
        const view = new DataView(new SharedArrayBuffer(off + abi.entrySize));
        const n = encodeRequest(view, off, abi, req);
        assert.ok(n <= abi.entrySize);
        assert.deepEqual(decodeRequest(view, off, abi), { ok: true, request: req });
      }),
      { numRuns: 3000 },
    );
  });
  test(`${abi.protocol}: responses round-trip and stay inside their ${abi.response.size} bytes`, () => {
    fc.assert(
      fc.property(arb.response, (rsp) => {
        const buf = new Uint8Array(abi.entrySize).fill(0xa5);
        encodeResponse(new DataView(buf.buffer), 0, abi, rsp);
        assert.deepEqual(decodeResponse(new DataView(buf.buffer), 0, abi), rsp);
        assert.ok(buf.subarray(abi.response.size).every((b) => b === 0xa5));
      }),
      { numRuns: 2000 },
    );
  });
}

test('segments round-trip', () => {
  fc.assert(
    fc.property(arb.segment, fc.integer({ min: 0, max: 511 }), (seg, slot) => {
      const view = new DataView(new ArrayBuffer(4096));
      encodeSegment(view, slot * 8, seg);
      assert.deepEqual(decodeSegment(view, slot * 8), seg);
    }),
  );
});

test('the JSON form round-trips every request and response, 64-bit values exact', () => {
  fc.assert(
    fc.property(arb.request, arb.response, (req, rsp) => {
      const viaJson = JSON.parse(JSON.stringify(requestToJson(req)));
      assert.deepEqual(requestFromJson(viaJson, 'r'), { known: true, request: req });
      assert.deepEqual(responseFromJson(JSON.parse(JSON.stringify(responseToJson(rsp))), 'p'), rsp);
    }),
    { numRuns: 1000 },
  );
});
