/**
 * The backend's view of a shared ring (ring.h `struct *_back_ring`): it consumes requests and
 * produces responses, with its private `req_cons` and `rsp_prod_pvt`. A backend never
 * initialises the shared ring (decisions.md: only the frontend initialises the ring) and never trusts `req_prod`: each request is
 * copied out once (RING_COPY_REQUEST) and both overflow guards are checked (decisions.md: copy once, check both guards).
 */
import { RING_CONSUMED, RING_EMPTY, RING_PEER_OVERFLOW, type ConsumeResult, type RingEntry, type SharedRing } from './shared-ring.js';

export class BackRing {
  /** Next request to consume (ring.h `req_cons`). */
  reqCons: number;
  /** Responses written but not yet published (ring.h `rsp_prod_pvt`). */
  rspProdPvt: number;

  /** `BACK_RING_ATTACH` at index `start` (0 for `BACK_RING_INIT`). */
  constructor(
    readonly sring: SharedRing,
    start = 0,
  ) {
    this.reqCons = start >>> 0;
    this.rspProdPvt = start >>> 0;
  }

  get size(): number {
    return this.sring.size;
  }

  /**
   * `RING_HAS_UNCONSUMED_REQUESTS`: published requests not yet consumed, capped by the slots not
   * still holding unpublished responses (so a frontend that pushes req_prod too far gains nothing).
   */
  unconsumedRequests(): number {
    const req = (this.sring.reqProd - this.reqCons) >>> 0;
    const rsp = this.sring.size - ((this.reqCons - this.rspProdPvt) >>> 0);
    return req < rsp ? req : rsp;
  }

  /** `RING_REQUEST_CONS_OVERFLOW`: consuming `cons` would overrun slots whose responses are not yet produced. */
  requestConsOverflow(cons: number): boolean {
    return ((cons - this.rspProdPvt) >>> 0) >= this.sring.size;
  }

  /** `RING_REQUEST_PROD_OVERFLOW`: an ill-behaved frontend claims more requests than the ring holds. */
  requestProdOverflow(prod: number): boolean {
    return ((prod - this.rspProdPvt) >>> 0) > this.sring.size;
  }

  /**
   * Copies the next request out of the ring (RING_COPY_REQUEST at req_cons++). Returns
   * `RING_EMPTY` (nothing published, or every slot awaits its response), `RING_CONSUMED`, or
   * `RING_PEER_OVERFLOW` when `req_prod` is bogus: Linux blkback treats that as fatal for the ring.
   */
  consumeRequest(entry: RingEntry): ConsumeResult {
    const prod = this.sring.reqProd; // Atomics.load: index before entries (rmb)
    if (this.requestProdOverflow(prod)) return RING_PEER_OVERFLOW;
    if (prod === this.reqCons || this.requestConsOverflow(this.reqCons)) return RING_EMPTY;
    this.sring.copyOut(this.reqCons, entry);
    this.reqCons = (this.reqCons + 1) >>> 0;
    return RING_CONSUMED;
  }

  /** Writes a response into the next private slot; false if no consumed request awaits one. */
  produceResponse(entry: RingEntry): boolean {
    if (this.rspProdPvt === this.reqCons) return false;
    this.sring.copyIn(this.rspProdPvt, entry);
    this.rspProdPvt = (this.rspProdPvt + 1) >>> 0;
    return true;
  }

  /** `RING_PUSH_RESPONSES`. */
  pushResponses(): void {
    this.sring.rspProd = this.rspProdPvt;
  }

  /** `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: notify iff `rsp_event` lies in `(old, new]` modulo 2^32. */
  pushResponsesAndCheckNotify(): boolean {
    const old = this.sring.rspProd;
    const nw = this.rspProdPvt;
    this.sring.rspProd = nw;
    return ((nw - this.sring.rspEvent) >>> 0) < ((nw - old) >>> 0);
  }

  /**
   * `RING_FINAL_CHECK_FOR_REQUESTS`: before sleeping, ask to be notified of the very next
   * request (`req_event = req_cons + 1`) and look once more; returns the unconsumed count.
   */
  finalCheckForRequests(): number {
    let work = this.unconsumedRequests();
    if (work !== 0) return work;
    this.sring.reqEvent = (this.reqCons + 1) >>> 0;
    work = this.unconsumedRequests();
    return work;
  }
}
