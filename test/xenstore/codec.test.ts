import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  MessageParser,
  XENSTORE_PAYLOAD_MAX,
  XS_ERROR,
  XS_READ,
  XS_TRANSACTION_END,
  XS_TRANSACTION_START,
  XS_WATCH,
  XS_WRITE,
  decodeMessage,
  encodeHeader,
  encodeMessage,
  joinStrings,
  type XsMessage,
} from '../../src/xenstore/index.js';
import { hex } from './helpers.js';

// Bytes printed by the C program compiled against xs_wire.h (spec c/xs_golden.out).
const golden: { name: string; msg: XsMessage; bytes: string }[] = [
  {
    name: 'XS_WRITE device/vbd/768/state = 4',
    msg: { type: XS_WRITE, reqId: 5, txId: 0, payload: Uint8Array.from([...Buffer.from('device/vbd/768/state\0'), 0x34]) },
    bytes: `0b 00 00 00 05 00 00 00 00 00 00 00 16 00 00 00
            64 65 76 69 63 65 2f 76 62 64 2f 37 36 38 2f 73
            74 61 74 65 00 34`,
  },
  {
    name: 'XS_READ backend/vbd/1/768/sectors',
    msg: { type: XS_READ, reqId: 6, txId: 0, payload: joinStrings(['backend/vbd/1/768/sectors']) },
    bytes: `02 00 00 00 06 00 00 00 00 00 00 00 1a 00 00 00
            62 61 63 6b 65 6e 64 2f 76 62 64 2f 31 2f 37 36
            38 2f 73 65 63 74 6f 72 73 00`,
  },
  {
    name: 'XS_WATCH',
    msg: { type: XS_WATCH, reqId: 7, txId: 0, payload: joinStrings(['/local/domain/0/backend/vbd/1/768/state', 'be']) },
    bytes: `04 00 00 00 07 00 00 00 00 00 00 00 2b 00 00 00
            2f 6c 6f 63 61 6c 2f 64 6f 6d 61 69 6e 2f 30 2f
            62 61 63 6b 65 6e 64 2f 76 62 64 2f 31 2f 37 36
            38 2f 73 74 61 74 65 00 62 65 00`,
  },
  {
    name: 'XS_TRANSACTION_START',
    msg: { type: XS_TRANSACTION_START, reqId: 8, txId: 0, payload: joinStrings(['']) },
    bytes: `06 00 00 00 08 00 00 00 00 00 00 00 01 00 00 00 00`,
  },
  {
    name: 'XS_TRANSACTION_END commit',
    msg: { type: XS_TRANSACTION_END, reqId: 9, txId: 3, payload: joinStrings(['T']) },
    bytes: `07 00 00 00 09 00 00 00 03 00 00 00 02 00 00 00 54 00`,
  },
  {
    name: 'reply XS_ERROR ENOENT',
    msg: { type: XS_ERROR, reqId: 6, txId: 0, payload: joinStrings(['ENOENT']) },
    bytes: `10 00 00 00 06 00 00 00 00 00 00 00 07 00 00 00 45 4e 4f 45 4e 54 00`,
  },
  {
    name: 'reply XS_WRITE OK',
    msg: { type: XS_WRITE, reqId: 5, txId: 0, payload: joinStrings(['OK']) },
    bytes: `0b 00 00 00 05 00 00 00 00 00 00 00 03 00 00 00 4f 4b 00`,
  },
];

for (const g of golden) {
  test(`golden bytes: ${g.name}`, () => {
    assert.deepEqual(encodeMessage(g.msg), hex(g.bytes));
    assert.deepEqual(decodeMessage(hex(g.bytes)), g.msg);
  });
}

// The constants and XSD_ERRORS are checked against xs_wire.h itself, compiled on both ABIs, in
// test/conformance/xen-constants.test.ts.

const arbMessage = fc.record({
  type: fc.nat(0xffffffff),
  reqId: fc.nat(0xffffffff),
  txId: fc.nat(0xffffffff),
  payload: fc.uint8Array({ maxLength: XENSTORE_PAYLOAD_MAX }),
});

test('encode/decode round-trip, also through the parser in arbitrary chunks', () => {
  fc.assert(
    fc.property(fc.array(arbMessage, { maxLength: 5 }), fc.array(fc.integer({ min: 1, max: 700 }), { minLength: 1 }), (records, cuts) => {
      const msgs: XsMessage[] = records.map((m) => ({ ...m })); // fc.record objects have a null prototype
      const bytes = Buffer.concat(msgs.map((m) => encodeMessage(m)));
      for (const m of msgs) assert.deepEqual(decodeMessage(encodeMessage(m)), m);
      const p = new MessageParser();
      const out: XsMessage[] = [];
      let off = 0;
      for (let i = 0; off < bytes.length; i++) {
        const n = cuts[i % cuts.length]!;
        p.push(bytes.subarray(off, off + n));
        off += n;
        for (let r = p.next(); r; r = p.next()) {
          assert.equal(r.kind, 'message');
          if (r.kind === 'message') out.push(r.message);
        }
      }
      assert.deepEqual(out, msgs);
    }),
    { numRuns: 200 },
  );
});

test('garbage never throws out of the parser; oversized length is reported once', () => {
  fc.assert(
    fc.property(fc.array(fc.uint8Array({ maxLength: 300 }), { maxLength: 20 }), (chunks) => {
      const p = new MessageParser();
      let oversized = 0;
      for (const c of chunks) {
        p.push(c);
        for (let r = p.next(); r; r = p.next()) {
          if (r.kind === 'oversized') {
            oversized++;
            assert.ok(r.header.len > XENSTORE_PAYLOAD_MAX);
          } else assert.ok(r.message.payload.length <= XENSTORE_PAYLOAD_MAX);
        }
      }
      assert.ok(oversized <= 1);
    }),
    { numRuns: 500 },
  );
  const p = new MessageParser();
  p.push(encodeHeader({ type: XS_READ, reqId: 1, txId: 0, len: XENSTORE_PAYLOAD_MAX + 1 }));
  assert.equal(p.next()?.kind, 'oversized');
  assert.throws(() => encodeMessage({ type: XS_READ, reqId: 1, txId: 0, payload: new Uint8Array(XENSTORE_PAYLOAD_MAX + 1) }), /payload 4097 exceeds XENSTORE_PAYLOAD_MAX/);
});
