/**
 * One ring of a connection, with its own event channel and id space (blkif.h "Multi-queue";
 * Linux blkfront's `blkfront_ring_info`): the shared ring pages we granted, the channel, the
 * shadow table of requests in flight, and the response path, where every response is checked
 * before it is believed.
 */
import { decodeResponse, type BlkifAbi } from '../abi/index.js';
import { FrontRing, RING_CONSUMED, RING_PEER_OVERFLOW, RingEntry, SharedRing } from '../ring/index.js';
import type { XenAccess } from '../xen/index.js';
import { allocEvtchn, grantRing } from '../xenbus/index.js';
import type { Chunk } from './io.js';
import { ShadowTable, type ShadowEntry } from './shadow.js';

/**
 * Requests left to the backend when it notifies a batch of answers (see finalCheck), so it keeps
 * working while we complete and refill: more than blkback answers between two pushes (8). At
 * QD32 on a 32-slot ring a notification then brings 20 answers or more (issue 17: <= 0.05 per
 * request); at 13 requests out or fewer every answer is notified, as ring.h's macro does.
 */
const RESPONSE_RESERVE = 12;
/**
 * How long answers already published may wait for the rest of a batch: backends answer out of
 * order, and a slow request (a stalled disk, a long discard) must not hold back the fast ones.
 */
export const BATCH_WAIT_MS = 1;

export class Queue {
  /** Request ids are shadow indexes: one per ring slot. */
  readonly shadow: ShadowTable<Chunk>;
  /** The slot a request is encoded into, or a response decoded from. */
  readonly entry: RingEntry;
  /** The data path's final check for this ring is scheduled (DataPath.service). */
  checkQueued = false;
  /** The last final check asked the backend for a batch rather than every answer. */
  batchArmed = false;
  /** Looks at the ring when a batch has not come within BATCH_WAIT_MS (DataPath.awaitBatch). */
  batchTimer: NodeJS.Timeout | undefined;
  private offEvent: () => void = () => undefined;

  private constructor(
    readonly index: number,
    private readonly abi: BlkifAbi,
    readonly ring: FrontRing,
    readonly ringFrames: number[],
    readonly ringRefs: number[],
    readonly port: number,
  ) {
    this.shadow = new ShadowTable(ring.size);
    this.entry = new RingEntry(abi.entrySize);
  }

  /**
   * Allocates and grants `1 << order` ring pages and an unbound channel to `backDomid`; `onEvent`
   * runs on every notification from the backend.
   */
  static open(xen: XenAccess, backDomid: number, abi: BlkifAbi, order: number, index: number, onEvent: (q: Queue) => void): Queue {
    const ringFrames = xen.memory.alloc(1 << order);
    const ring = FrontRing.init(new SharedRing(ringFrames.map((f) => xen.memory.page(f)), abi.entrySize));
    let ringRefs: number[];
    try {
      ringRefs = grantRing(xen, backDomid, ringFrames);
    } catch (e) {
      xen.memory.free(ringFrames);
      throw e;
    }
    let port: number;
    try {
      port = allocEvtchn(xen, backDomid);
    } catch (e) {
      // Not a queue yet, so no teardown would end these grants (a backend that died as we
      // connected: the checked hypervisor saw them left behind in the soak under load).
      Queue.endRing(xen, ringRefs, ringFrames, () => undefined);
      throw e;
    }
    const q = new Queue(index, abi, ring, ringFrames, ringRefs, port);
    q.offEvent = xen.events.on(port, () => onEvent(q));
    return q;
  }

  /** A slot and a shadow entry are free for one more request. */
  get hasRoom(): boolean {
    return !this.ring.full() && this.shadow.available > 0;
  }

  /**
   * Consumes the responses the backend published, each checked (Linux `blkif_interrupt`): the
   * producer index within the ring (RING_RESPONSE_PROD_OVERFLOW), the id in range and pending,
   * the operation the one sent. `answered` gets each good one and returns false to stop. Returns
   * the protocol violation found, if any (nothing after it is consumed). The caller makes the
   * final check (`finalCheck`) once the ring is refilled.
   */
  consumeResponses(answered: (s: ShadowEntry<Chunk>, status: number) => boolean): string | undefined {
    const ring = this.ring;
    for (;;) {
      const r = ring.consumeResponse(this.entry);
      if (r === RING_PEER_OVERFLOW) return `backend published rsp_prod ${ring.sring.rspProd} beyond the ${ring.size} slots after rsp_cons ${ring.rspCons}`;
      if (r !== RING_CONSUMED) return undefined;
      const rsp = decodeResponse(this.entry.view, 0, this.abi);
      const s = this.shadow.lookup(rsp.id);
      if (s === undefined) return `response for id ${rsp.id}, which is not pending`;
      if (rsp.operation !== s.expectOp) return `response for id ${rsp.id} carries operation ${rsp.operation}, the request was ${s.expectOp}`;
      if (!answered(s, rsp.status)) return undefined;
    }
  }

  /**
   * RING_FINAL_CHECK_FOR_RESPONSES, batched (ring.h invites a customised final check "to create
   * batches of work"): with many requests out, the backend is asked to notify only once all but
   * RESPONSE_RESERVE of them are answered, so one notification brings a batch while the backend
   * still has that many to work on. Returns the responses already waiting (look again).
   */
  finalCheck(): number {
    const batch = ((this.ring.sring.reqProd - this.ring.rspCons) >>> 0) - RESPONSE_RESERVE;
    this.batchArmed = batch > 1;
    return this.ring.finalCheckForResponses(batch);
  }

  /**
   * Lets go of the ring: the channel closed, each request still pending handed to `unanswered`
   * and its entry released, then the ring's grants ended. A ring page the backend still maps goes
   * to `stuck` (freed once its grant can be ended); returns how many it still maps.
   */
  close(xen: XenAccess, unanswered: (s: ShadowEntry<Chunk>) => void, stuck: (frame: number, ref: number) => void): number {
    this.offEvent();
    clearTimeout(this.batchTimer);
    xen.events.close(this.port);
    for (const s of this.shadow.pendingEntries()) {
      unanswered(s);
      this.shadow.release(s);
    }
    return Queue.endRing(xen, this.ringRefs, this.ringFrames, stuck);
  }

  /** Ends the ring pages' grants and frees them; one the backend still maps goes to `stuck`. Returns how many. */
  private static endRing(xen: XenAccess, refs: readonly number[], frames: readonly number[], stuck: (frame: number, ref: number) => void): number {
    let leaked = 0;
    refs.forEach((ref, i) => {
      const frame = frames[i]!;
      if (xen.grants.endAccess(ref)) xen.memory.free([frame]);
      else {
        stuck(frame, ref);
        leaked++;
      }
    });
    return leaked;
  }
}
