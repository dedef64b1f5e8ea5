/**
 * The ring against a model: random interleavings of produce / push / consume / final-check on
 * both sides, starting anywhere (also just below 2^32), never lose, duplicate or reorder an
 * entry, and a push asks for a notification exactly when it publishes the entry the consumer's
 * event index names (set by a final check that found nothing: the next one, or with a batched
 * final check the batch-th, never beyond what the published requests can bring).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { BackRing, FrontRing, RING_CONSUMED, RING_EMPTY, RingEntry, SharedRing } from '../../src/ring/index.js';

type Op =
  | { k: 'produce'; n: number }
  | { k: 'pushReq' }
  | { k: 'consume'; n: number }
  | { k: 'respond'; n: number }
  | { k: 'pushRsp' }
  | { k: 'consumeRsp'; n: number }
  | { k: 'finalReq' }
  | { k: 'finalRsp'; batch: number };

const op: fc.Arbitrary<Op> = fc.oneof(
  fc.record({ k: fc.constant('produce' as const), n: fc.integer({ min: 1, max: 40 }) }),
  fc.constant({ k: 'pushReq' as const }),
  fc.record({ k: fc.constant('consume' as const), n: fc.integer({ min: 1, max: 40 }) }),
  fc.record({ k: fc.constant('respond' as const), n: fc.integer({ min: 1, max: 40 }) }),
  fc.constant({ k: 'pushRsp' as const }),
  fc.record({ k: fc.constant('consumeRsp' as const), n: fc.integer({ min: 1, max: 40 }) }),
  fc.constant({ k: 'finalReq' as const }),
  // batch 0 and 1: ring.h's RING_FINAL_CHECK_FOR_RESPONSES; more: a batched final check.
  fc.record({ k: fc.constant('finalRsp' as const), batch: fc.oneof(fc.constant(1), fc.integer({ min: 0, max: 40 })) }),
);

test('ring vs model', () => {
  fc.assert(
    fc.property(
      fc.oneof(fc.constant(0), fc.integer({ min: 0xffffff00, max: 0xffffffff }), fc.integer({ min: 0, max: 0xffffffff })),
      fc.integer({ min: 0, max: 2 }),
      fc.constantFrom(112, 108),
      fc.array(op, { minLength: 1, maxLength: 300, size: 'max' }),
      (start, order, entrySize, ops) => {
        const s = SharedRing.allocate(order, entrySize);
        s.init();
        // FRONT/BACK_RING_ATTACH at `start`: the shared header as it would be after `start` exchanges.
        s.reqProd = start;
        s.rspProd = start;
        s.reqEvent = (start + 1) >>> 0;
        s.rspEvent = (start + 1) >>> 0;
        const front = new FrontRing(s, start);
        const back = new BackRing(s, start);
        const e = new RingEntry(entrySize);
        const N = s.size;
        // Model state: sequence numbers of entries at each stage.
        let nextSeq = 0;
        const produced: number[] = []; // written, not published
        const published: number[] = []; // published, not consumed
        const consumed: number[] = []; // consumed by the backend, not answered
        const answered: number[] = []; // answered, not published
        const rspPublished: number[] = []; // responses published, not consumed
        let inFlight = 0; // requests produced whose responses the frontend has not consumed
        let backArmed = true; // SHARED_RING_INIT: req_event = req_prod + 1
        // The frontend's event index as a count of responses: a push notifies when it publishes
        // the response numbered armAt (SHARED_RING_INIT: rsp_event = rsp_prod + 1, the first).
        let armAt: number | undefined = 1;
        let rspPushed = 0;
        let reqPushed = 0;
        let received = 0;
        const tag = (seq: number) => {
          e.words.fill(0);
          e.words[0] = seq;
          e.words[e.words.length - 1] = ~seq;
        };
        const check = (seq: number) => {
          assert.equal(e.words[0], seq);
          assert.equal(e.words[e.words.length - 1], ~seq);
        };
        for (const o of ops) {
          switch (o.k) {
            case 'produce':
              for (let i = 0; i < o.n; i++) {
                tag(nextSeq);
                const ok = front.produceRequest(e);
                assert.equal(ok, inFlight < N, 'produce fails exactly when the ring is full');
                if (!ok) break;
                produced.push(nextSeq++);
                inFlight++;
              }
              break;
            case 'pushReq': {
              const notify = front.pushRequestsAndCheckNotify();
              assert.equal(notify, backArmed && produced.length > 0);
              if (produced.length > 0) backArmed = false;
              reqPushed += produced.length;
              published.push(...produced.splice(0));
              break;
            }
            case 'consume':
              for (let i = 0; i < o.n; i++) {
                const r = back.consumeRequest(e);
                if (published.length === 0) {
                  assert.equal(r, RING_EMPTY);
                  break;
                }
                assert.equal(r, RING_CONSUMED);
                const seq = published.shift()!;
                check(seq);
                consumed.push(seq);
              }
              break;
            case 'respond':
              for (let i = 0; i < o.n; i++) {
                const seq = consumed[0];
                if (seq !== undefined) tag(seq);
                const ok = back.produceResponse(e);
                assert.equal(ok, seq !== undefined);
                if (!ok) break;
                answered.push(consumed.shift()!);
              }
              break;
            case 'pushRsp': {
              const notify = back.pushResponsesAndCheckNotify();
              const was = rspPushed;
              rspPushed += answered.length;
              const crossed: boolean = armAt !== undefined && was < armAt && armAt <= rspPushed;
              assert.equal(notify, crossed);
              if (crossed) armAt = undefined;
              rspPublished.push(...answered.splice(0));
              break;
            }
            case 'consumeRsp':
              for (let i = 0; i < o.n; i++) {
                const r = front.consumeResponse(e);
                if (rspPublished.length === 0) {
                  assert.equal(r, RING_EMPTY);
                  break;
                }
                assert.equal(r, RING_CONSUMED);
                const seq = rspPublished.shift()!;
                assert.equal(seq, received++, 'responses arrive in order, none lost or repeated');
                check(seq);
                inFlight--;
              }
              break;
            case 'finalReq': {
              const work = back.finalCheckForRequests();
              assert.equal(work, published.length);
              if (work === 0) backArmed = true;
              break;
            }
            case 'finalRsp': {
              const work = front.finalCheckForResponses(o.batch);
              assert.equal(work, rspPublished.length);
              if (work === 0) {
                // Asked for the batch-th response, capped by the requests published: it always comes.
                const outstanding = reqPushed - received;
                armAt = received + (o.batch <= 1 || outstanding <= 1 ? 1 : Math.min(o.batch, outstanding));
                if (outstanding >= 1) assert.ok(armAt <= reqPushed, 'the response asked for is one a published request brings');
              }
              break;
            }
          }
          assert.equal(front.freeRequests(), N - inFlight);
          assert.equal(back.unconsumedRequests(), published.length);
          assert.equal(front.unconsumedResponses(), rspPublished.length);
        }
      },
    ),
    { numRuns: 400 },
  );
});
