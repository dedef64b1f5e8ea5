/**
 * ring.h's macros against ring.h itself: a C program built against Xen's genuine headers
 * (test/conformance/ring_vectors.c, gcc -m64 and -m32, the latter under qemu-i386 where needed)
 * answers RING_PUSH_*_AND_CHECK_NOTIFY, RING_FINAL_CHECK_FOR_*, RING_FREE_REQUESTS/RING_FULL and
 * the overflow guards for hand-picked and random indexes (across the 2^32 wrap), and our ring
 * must answer each the same. Also: SHARED_RING_INIT's bytes, our batched final check, the
 * consumers' overflow handling, and straddling entries of multi-page rings.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';
import { BackRing, FrontRing, RING_CONSUMED, RING_EMPTY, RING_PEER_OVERFLOW, RingEntry, SharedRing, ringSizeFor } from '../../src/ring/index.js';
import { Rng } from '../e2e/helpers.js';
import { buildConformance, type CBuild } from '../support/c-build.js';
import { needTools } from '../support/tools.js';

needTools('/usr/include/xen/io/ring.h', 'gcc', 'gcc-m32', 'qemu-i386');

const BLKIF_ENTRY = 112;
const RING_VECTORS_C = fileURLToPath(new URL('../../../test/conformance/ring_vectors.c', import.meta.url));

function rings(start = 0) {
  const s = SharedRing.allocate(0, BLKIF_ENTRY);
  FrontRing.init(s);
  return { s, front: new FrontRing(s, start), back: new BackRing(s, start) };
}

let c: CBuild;
before(() => { c = buildConformance(RING_VECTORS_C); });
after(() => c?.cleanup());

/** Our ring's answer to one of ring_vectors.c's commands, in its output format. */
function ours(cmd: string): string {
  const [op, ...rest] = cmd.split(' ');
  const dir = op === 'push' || op === 'final' ? rest.shift() : undefined;
  const [a = 0, b = 0, d = 0, e = 0] = rest.map(Number);
  const { s, front, back } = rings();
  const bit = (x: boolean) => (x ? 1 : 0);
  switch (`${op} ${dir ?? ''}`.trim()) {
    case 'push req':
      s.reqProd = a; s.reqEvent = d; front.reqProdPvt = b;
      return `${bit(front.pushRequestsAndCheckNotify())} ${s.reqProd}`;
    case 'push rsp':
      s.rspProd = a; s.rspEvent = d; back.rspProdPvt = b;
      return `${bit(back.pushResponsesAndCheckNotify())} ${s.rspProd}`;
    case 'final req': {
      back.reqCons = a; back.rspProdPvt = b; s.reqProd = d; s.reqEvent = e;
      const work = back.finalCheckForRequests();
      return `${work} ${s.reqEvent}`;
    }
    case 'final rsp': {
      front.rspCons = a; s.rspProd = b; s.rspEvent = d;
      const work = front.finalCheckForResponses();
      return `${work} ${s.rspEvent}`;
    }
    case 'free':
      front.reqProdPvt = a; front.rspCons = b;
      return `${front.freeRequests()} ${bit(front.full())}`;
    case 'overflow':
      back.rspProdPvt = a; front.rspCons = b;
      return `${bit(back.requestConsOverflow(d))} ${bit(back.requestProdOverflow(d))} ${bit(front.responseProdOverflow(d))}`;
    default:
      throw new Error(`no such command: ${cmd}`);
  }
}

const u32 = (x: number) => x >>> 0;

/** The commands: the classic vectors (event just in, just out, at the wrap) and random ones near each other. */
function commands(): string[] {
  const out: string[] = [];
  const pushes: [number, number, number][] = [
    [0, 1, 1], [0, 3, 1], [0, 3, 3], [0, 3, 4], [1, 3, 1], [2, 3, 2], [5, 5, 6], [5, 5, 5],
    [0xfffffffe, 2, 0xffffffff], [0xfffffffe, 2, 0], [0xfffffffe, 2, 3], [10, 20, 5], [10, 20, 21], [10, 20, 20], [10, 20, 11],
  ];
  for (const [o, n, ev] of pushes) for (const d of ['req', 'rsp']) out.push(`push ${d} ${o} ${n} ${ev}`);
  out.push('final req 7 7 7 1', 'final req 7 7 9 1', `final req 7 ${u32(7 - 32)} 50 1`, 'final req 0 0 32 1', 'final rsp 4 4 1', 'final rsp 4 6 1');
  out.push('free 32 0', `free 5 ${0xfffffff0}`, 'free 0 0', 'overflow 100 100 131', 'overflow 100 100 132', 'overflow 100 100 133');
  const rng = new Rng(2140);
  const near = (base: number, span: number) => u32(base + rng.int(-span, span));
  for (let i = 0; i < 3000; i++) {
    const base = rng.int(0, 3) === 0 ? u32(0 - rng.int(0, 40)) : rng.next();
    const k = rng.int(0, 5);
    if (k === 0 || k === 1) out.push(`push ${k === 0 ? 'req' : 'rsp'} ${base} ${near(base, 40)} ${near(base, 40)}`);
    // The backend's own indexes keep rsp_prod_pvt <= req_cons <= rsp_prod_pvt + RING_SIZE;
    // req_prod and req_event are the frontend's, anything.
    else if (k === 2) out.push(`final req ${base} ${u32(base - rng.int(0, 32))} ${near(base, 40)} ${near(base, 40)}`);
    else if (k === 3) out.push(`final rsp ${base} ${near(base, 40)} ${near(base, 40)}`);
    // The frontend's own indexes: never more requests out than the ring holds.
    else if (k === 4) out.push(`free ${u32(base + rng.int(0, 32))} ${base}`);
    else out.push(`overflow ${base} ${near(base, 40)} ${near(base, 40)}`);
  }
  return out;
}

for (const abiName of ['x86_64-abi', 'x86_32-abi'] as const) {
  test(`ring.h's notify, final-check, free and overflow macros, compiled (${abiName}), answer as our ring does`, () => {
    const cmds = commands();
    const r = c.run(abiName, [], cmds.join('\n') + '\n');
    assert.equal(r.status, 0, r.stderr);
    const theirs = r.stdout.trim().split('\n');
    assert.equal(theirs.length, cmds.length, 'one answer per command');
    const notifies = cmds.filter((m, i) => m.startsWith('push') && theirs[i]!.startsWith('1')).length;
    assert.ok(notifies > 100 && notifies < cmds.length / 2, `both outcomes of the notify check are covered (${notifies} notifications)`);
    cmds.forEach((m, i) => assert.equal(ours(m), theirs[i], m));
  });
}

test('SHARED_RING_INIT writes req_event = rsp_event = 1 and zeroes the rest of the header only', () => {
  const s = SharedRing.allocate(0, BLKIF_ENTRY);
  s.pages[0]!.fill(0xab);
  s.init();
  assert.deepEqual([...s.pages[0]!.subarray(0, 16)], [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
  assert.ok(s.pages[0]!.subarray(16, 64).every((b) => b === 0));
  assert.ok(s.pages[0]!.subarray(64).every((b) => b === 0xab), 'the entry area is untouched');
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
