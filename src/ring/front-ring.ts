/**
 * The frontend's view of a shared ring (ring.h `struct *_front_ring`): it produces requests and
 * consumes responses, with its private `req_prod_pvt` and `rsp_cons`. All index arithmetic is
 * modulo 2^32 (`>>> 0`), so it stays right when the free-running indexes wrap.
 */
import { RING_CONSUMED, RING_EMPTY, RING_PEER_OVERFLOW, type ConsumeResult, type RingEntry, type SharedRing } from './shared-ring.js';

export class FrontRing {
  /** Requests written but not yet published (ring.h `req_prod_pvt`). */
  reqProdPvt: number;
  /** Next response to consume (ring.h `rsp_cons`). */
  rspCons: number;

  /** `FRONT_RING_ATTACH` at index `start` (0 for `FRONT_RING_INIT`); does not touch shared memory. */
  constructor(
    readonly sring: SharedRing,
    start = 0,
  ) {
    this.reqProdPvt = start >>> 0;
    this.rspCons = start >>> 0;
  }

  /** `XEN_FRONT_RING_INIT`: `SHARED_RING_INIT` plus a front ring at index 0. */
  static init(sring: SharedRing): FrontRing {
    sring.init();
    return new FrontRing(sring, 0);
  }

  /** `RING_SIZE`. */
  get size(): number {
    return this.sring.size;
  }

  /** `RING_FREE_REQUESTS`: slots not holding an outstanding request or unconsumed response. */
  freeRequests(): number {
    return this.sring.size - ((this.reqProdPvt - this.rspCons) >>> 0);
  }

  /** `RING_FULL`. */
  full(): boolean {
    return this.freeRequests() === 0;
  }

  /** Writes a request into the next private slot (RING_GET_REQUEST at req_prod_pvt++); false when full. */
  produceRequest(entry: RingEntry): boolean {
    if (this.full()) return false;
    this.sring.copyIn(this.reqProdPvt, entry);
    this.reqProdPvt = (this.reqProdPvt + 1) >>> 0;
    return true;
  }

  /** `RING_PUSH_REQUESTS`: publish every produced request. */
  pushRequests(): void {
    this.sring.reqProd = this.reqProdPvt;
  }

  /**
   * `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`: publish, then tell whether the backend asked to be
   * notified of one of the new requests: `req_event` in `(old, new]` modulo 2^32.
   */
  pushRequestsAndCheckNotify(): boolean {
    const old = this.sring.reqProd;
    const nw = this.reqProdPvt;
    this.sring.reqProd = nw; // Atomics.store: entries before, index after (wmb; then mb)
    return ((nw - this.sring.reqEvent) >>> 0) < ((nw - old) >>> 0);
  }

  /** `RING_HAS_UNCONSUMED_RESPONSES`: how many responses the backend has published beyond `rsp_cons`. */
  unconsumedResponses(): number {
    return (this.sring.rspProd - this.rspCons) >>> 0;
  }

  /** `RING_RESPONSE_PROD_OVERFLOW`: an ill-behaved backend claims more responses than the ring holds. */
  responseProdOverflow(prod: number): boolean {
    return ((prod - this.rspCons) >>> 0) > this.sring.size;
  }

  /**
   * Copies the next response out of the ring (RING_COPY_RESPONSE at rsp_cons++). Returns
   * `RING_EMPTY`, `RING_CONSUMED`, or `RING_PEER_OVERFLOW` when `rsp_prod` is bogus (nothing copied).
   */
  consumeResponse(entry: RingEntry): ConsumeResult {
    const prod = this.sring.rspProd; // Atomics.load: index before entries (rmb)
    if (prod === this.rspCons) return RING_EMPTY;
    if (this.responseProdOverflow(prod)) return RING_PEER_OVERFLOW;
    this.sring.copyOut(this.rspCons, entry);
    this.rspCons = (this.rspCons + 1) >>> 0;
    return RING_CONSUMED;
  }

  /**
   * `RING_FINAL_CHECK_FOR_RESPONSES`: before sleeping, ask to be notified of the very next
   * response (`rsp_event = rsp_cons + 1`) and look once more; returns the unconsumed count.
   *
   * `batch` > 1 is the customised final check ring.h invites "to create batches of work": the
   * notification comes with the `batch`-th response instead, at most with the last one the
   * published requests can bring (so it always comes); 1 is ring.h's macro.
   */
  finalCheckForResponses(batch = 1): number {
    let work = this.unconsumedResponses();
    if (work !== 0) return work;
    const outstanding = (this.sring.reqProd - this.rspCons) >>> 0;
    const ahead = batch <= 1 || outstanding <= 1 ? 1 : Math.min(batch, outstanding);
    this.sring.rspEvent = (this.rspCons + ahead) >>> 0;
    work = this.unconsumedResponses(); // Atomics are sequentially consistent: the mb() of ring.h
    return work;
  }
}
