/**
 * ring.h macro semantics against the vectors a C program printed with Xen 4.17's genuine ring.h
 * (shared/spec/c/ring_notify.m64.out), and straddling entries of multi-page rings.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BackRing, FrontRing, RING_CONSUMED, RING_EMPTY, RING_PEER_OVERFLOW, RingEntry, SharedRing, ringSizeFor } from '../../src/ring/index.js';

const BLKIF_ENTRY = 112;

function rings(start = 0) {
  const s = SharedRing.allocate(0, BLKIF_ENTRY);
  FrontRing.init(s);
  return { s, front: new FrontRing(s, start), back: new BackRing(s, start) };
}

test('RING_PUSH_REQUESTS_AND_CHECK_NOTIFY vectors', () => {
  const vectors: [number, number, number, boolean][] = [
    [0, 1, 1, true], [0, 3, 1, true], [0, 3, 3, true], [0, 3, 4, false], [1, 3, 1, false], [2, 3, 2, false], [5, 5, 6, false],
    [0xfffffffe, 2, 0xffffffff, true], [0xfffffffe, 2, 0, true], [0xfffffffe, 2, 3, false], [10, 20, 5, false],
  ];
  for (const [old, nw, ev, notify] of vectors) {
    const { s, front, back } = rings();
    s.reqProd = old;
    s.reqEvent = ev;
    front.reqProdPvt = nw;
    assert.equal(front.pushRequestsAndCheckNotify(), notify, `old=${old} new=${nw} req_event=${ev}`);
    assert.equal(s.reqProd, nw);
    // The response direction is the same macro on the other indexes.
    s.rspProd = old;
    s.rspEvent = ev;
    back.rspProdPvt = nw;
    assert.equal(back.pushResponsesAndCheckNotify(), notify, `responses old=${old} new=${nw} rsp_event=${ev}`);
    assert.equal(s.rspProd, nw);
  }
});

test('SHARED_RING_INIT writes req_event = rsp_event = 1 and zeroes the rest of the header only', () => {
  const s = SharedRing.allocate(0, BLKIF_ENTRY);
  s.pages[0]!.fill(0xab);
  s.init();
  assert.deepEqual([...s.pages[0]!.subarray(0, 16)], [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
  assert.ok(s.pages[0]!.subarray(16, 64).every((b) => b === 0));
  assert.ok(s.pages[0]!.subarray(64).every((b) => b === 0xab), 'the entry area is untouched');
});

test('RING_FINAL_CHECK_FOR_REQUESTS / RESPONSES vectors', () => {
  const { s, back, front } = rings();
  back.reqCons = 7;
  back.rspProdPvt = 7;
  s.reqProd = 7;
  s.reqEvent = 1;
  assert.equal(back.finalCheckForRequests(), 0);
  assert.equal(s.reqEvent, 8, 'req_event = req_cons + 1');
  s.reqProd = 9;
  s.reqEvent = 1;
  assert.equal(back.finalCheckForRequests(), 2);
  assert.equal(s.reqEvent, 1, 'left unchanged when there is work');
  back.reqCons = 7;
  back.rspProdPvt = (7 - 32) >>> 0;
  s.reqProd = 50;
  assert.equal(back.unconsumedRequests(), 0, 'capped at RING_SIZE - (req_cons - rsp_prod_pvt)');

  s.rspProd = 4;
  front.rspCons = 4;
  assert.equal(front.finalCheckForResponses(), 0);
  assert.equal(s.rspEvent, 5);
});

test('a batched final check for responses: notified with the batch-th answer, never past the requests published', () => {
  const start = 0xfffffff0; // across the 2^32 wrap
  const { s, front, back } = rings(start);
  s.reqProd = s.rspProd = start;
  const e = new RingEntry(BLKIF_ENTRY);
  for (let i = 0; i < 32; i++) assert.ok(front.produceRequest(e));
  front.pushRequests();
  assert.equal(front.finalCheckForResponses(20), 0);
  assert.equal(s.rspEvent, (start + 20) >>> 0, 'rsp_event = rsp_cons + batch');
  for (let i = 0; i < 32; i++) assert.equal(back.consumeRequest(e), RING_CONSUMED);
  const pushes: boolean[] = [];
  for (let i = 0; i < 32; i++) {
    back.produceResponse(e);
    pushes.push(back.pushResponsesAndCheckNotify());
  }
  assert.deepEqual(pushes.map((n, i) => (n ? i + 1 : 0)).filter((n) => n > 0), [20], 'one notification, with the 20th answer');
  for (let i = 0; i < 32; i++) assert.equal(front.consumeResponse(e), RING_CONSUMED);

  // A batch beyond the requests out is cut to them; with none or one out it is ring.h's + 1.
  for (let i = 0; i < 5; i++) front.produceRequest(e);
  front.pushRequests();
  assert.equal(front.finalCheckForResponses(20), 0);
  assert.equal(s.rspEvent, (front.rspCons + 5) >>> 0, 'the last of the 5 published requests');
  for (let i = 0; i < 3; i++) front.produceRequest(e); // produced, not published: not counted
  assert.equal(front.finalCheckForResponses(20), 0);
  assert.equal(s.rspEvent, (front.rspCons + 5) >>> 0);
  for (const batch of [0, 1, -3]) {
    assert.equal(front.finalCheckForResponses(batch), 0);
    assert.equal(s.rspEvent, (front.rspCons + 1) >>> 0);
  }
  // Answers already waiting: nothing armed, the count returned.
  for (let i = 0; i < 5; i++) back.consumeRequest(e);
  back.produceResponse(e);
  back.produceResponse(e);
  back.pushResponses();
  s.rspEvent = 7;
  assert.equal(front.finalCheckForResponses(20), 2);
  assert.equal(s.rspEvent, 7, 'left unchanged when there is work');
});

test('RING_FREE_REQUESTS / RING_FULL, also across the 2^32 wrap', () => {
  const { front } = rings();
  front.reqProdPvt = 32;
  front.rspCons = 0;
  assert.equal(front.freeRequests(), 0);
  assert.equal(front.full(), true);
  front.reqProdPvt = 5;
  front.rspCons = 0xfffffff0;
  assert.equal(front.freeRequests(), 11);
  assert.equal(front.full(), false);
});

test('overflow guards: RING_REQUEST_CONS/PROD_OVERFLOW and RING_RESPONSE_PROD_OVERFLOW', () => {
  const { back, front } = rings();
  back.rspProdPvt = 100;
  assert.equal(back.requestConsOverflow(131), false);
  assert.equal(back.requestConsOverflow(132), true);
  assert.equal(back.requestProdOverflow(132), false);
  assert.equal(back.requestProdOverflow(133), true);
  front.rspCons = 100;
  assert.equal(front.responseProdOverflow(132), false);
  assert.equal(front.responseProdOverflow(133), true);
});

test('a frontend that claims more requests than the ring holds is caught before anything is copied', () => {
  const { s, back } = rings(0xfffffff0);
  const e = new RingEntry(BLKIF_ENTRY);
  s.reqProd = (0xfffffff0 + 33) >>> 0; // one more than RING_SIZE outstanding, across the wrap
  assert.equal(back.consumeRequest(e), RING_PEER_OVERFLOW);
  assert.equal(back.reqCons, 0xfffffff0, 'nothing consumed');
  s.reqProd = (0xfffffff0 + 32) >>> 0;
  for (let i = 0; i < 32; i++) assert.equal(back.consumeRequest(e), RING_CONSUMED);
  assert.equal(back.consumeRequest(e), RING_EMPTY, 'RING_REQUEST_CONS_OVERFLOW: every slot awaits its response');
});

test('a backend that claims more responses than requests outstanding is caught', () => {
  const { s, front } = rings(5);
  const e = new RingEntry(BLKIF_ENTRY);
  s.rspProd = 5 + 33;
  assert.equal(front.consumeResponse(e), RING_PEER_OVERFLOW);
  assert.equal(front.rspCons, 5);
});

test('entries straddling page boundaries, over pages that are not contiguous', () => {
  // x86_64 blkif, order 2: entries 72 (bytes 8128..8240) and 109 (12272..12384) straddle.
  // x86_32 blkif, order 1: entry 37 (4060..4168) straddles.
  for (const [order, entrySize, straddlers] of [[2, 112, [72, 109]], [1, 108, [37]]] as const) {
    const pages = Array.from({ length: 1 << order }, () => new Uint8Array(new SharedArrayBuffer(4096)));
    const ring = new SharedRing(pages, entrySize);
    assert.equal(ring.size, ringSizeFor(4096 << order, entrySize));
    assert.equal(ring.size, 32 << order);
    const e = new RingEntry(entrySize);
    for (let k = 0; k < ring.size; k++) {
      for (let b = 0; b < entrySize; b++) e.bytes[b] = (k * 7 + b) & 0xff;
      ring.copyIn(k + ring.size * 3, e); // a later lap maps to the same slot
    }
    const flat = new Uint8Array(4096 << order);
    pages.forEach((p, i) => flat.set(p, i * 4096));
    for (let k = 0; k < ring.size; k++) {
      const off = 64 + k * entrySize;
      const crosses = Math.floor(off / 4096) !== Math.floor((off + entrySize - 1) / 4096);
      assert.equal(crosses, (straddlers as readonly number[]).includes(k), `entry ${k} straddles?`);
      for (let b = 0; b < entrySize; b++) assert.equal(flat[off + b], (k * 7 + b) & 0xff);
      ring.copyOut(k, e);
      for (let b = 0; b < entrySize; b++) assert.equal(e.bytes[b], (k * 7 + b) & 0xff);
    }
  }
});

test('ring sizes: 32 << order for both blkif ABIs, and bad geometry is refused', () => {
  for (let order = 0; order <= 4; order++) {
    assert.equal(SharedRing.allocate(order, 112).size, 32 << order);
    assert.equal(SharedRing.allocate(order, 108).size, 32 << order);
  }
  assert.throws(() => SharedRing.allocate(5, 112), RangeError);
  assert.throws(() => new SharedRing([new Uint8Array(4096), new Uint8Array(4096), new Uint8Array(4096)], 112), RangeError);
  assert.throws(() => new SharedRing([new Uint8Array(100)], 112), RangeError);
});
