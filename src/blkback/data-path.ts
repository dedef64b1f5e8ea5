/**
 * One ring's request pipeline, read top to bottom as Linux blkback's: wake -> consume (copy each
 * request out of the ring once) -> validate -> map grants -> storage I/O -> unmap -> respond.
 * Everything after the copy is ABI-agnostic (`BackendRequest`). The pipeline owns nothing shared
 * with another VBD: its ring, counters and storage are its own.
 */
import {
  BLKIF_OP_INDIRECT,
  BLKIF_RSP_EOPNOTSUPP,
  BLKIF_RSP_ERROR,
  BLKIF_RSP_OKAY,
  SECTOR_SHIFT,
  SECTOR_SIZE,
  decodeRequest,
  encodeResponse,
  responseOperation,
  type BlkifAbi,
} from '../abi/index.js';
import { RING_CONSUMED, RING_PEER_OVERFLOW, RingEntry, type BackRing } from '../ring/index.js';
import type { XenAccess } from '../xen/index.js';
import type { BlockStorage } from '../storage/storage.js';
import type { VbdCounters } from './counters.js';
import type { PageAccess } from './page-access.js';
import { classifyRequest, dataBytes, dataProblem, isRejection, type BackendRequest, type VbdLimits } from './validate.js';

export interface DataPathDeps {
  readonly xen: XenAccess;
  readonly frontDomid: number;
  readonly ring: BackRing;
  readonly abi: BlkifAbi;
  /** Our end of the interdomain event channel. */
  readonly port: number;
  readonly storage: BlockStorage;
  /** How the frontend's pages are reached: mapped per request, persistently, or by grant copy. */
  readonly access: PageAccess;
  /** Read on every request, so a resize or feature change applies to the next one. */
  readonly limits: () => VbdLimits;
  readonly maxIndirectSegments: number;
  /**
   * Requests served at once (Linux's per-ring pool of `pending_req`s, XEN_BLKIF_REQS_PER_PAGE
   * per ring page); requests beyond it wait on the ring, and each wait counts `oo_req`.
   */
  readonly maxPending: number;
  readonly counters: VbdCounters;
  /** The frontend broke the ring protocol: stop serving it (the control path disconnects). */
  readonly onFatal: (why: string) => void;
  readonly log: (msg: string) => void;
}

/** Requests consumed before the loop lets their responses out (see consumeLoop). */
const RESPONSE_BATCH = 8;

export class DataPath {
  private running = false;
  private stopped = false;
  private inflight = 0;
  private drainWaiters: (() => void)[] = [];
  private pushQueued = false;
  private loop: Promise<void> = Promise.resolve();
  /** One entry for the request copy, one for responses: nothing allocated per ring slot. */
  private readonly entry: RingEntry;
  private readonly out: RingEntry;
  private readonly offEvent: () => void;

  constructor(private readonly d: DataPathDeps) {
    this.entry = new RingEntry(d.abi.entrySize);
    this.out = new RingEntry(d.abi.entrySize);
    this.offEvent = d.xen.events.on(d.port, () => {
      d.counters.notify_received++;
      this.kick();
    });
    // Requests may already be waiting: the frontend can publish before we bind.
    this.kick();
  }

  /**
   * Starts the consume loop unless it is already running, or no pending slot is free (Linux's
   * kthread waits on pending_free_wq first; a completion kicks again).
   */
  kick(): void {
    if (!this.running && !this.stopped && this.inflight < this.d.maxPending) this.loop = this.consumeLoop();
  }

  /**
   * Stops consuming, waits for every request in flight to be answered, publishes the answers and
   * detaches from the event channel. The caller then unmaps the ring and closes the port.
   */
  async stop(): Promise<void> {
    this.stopped = true;
    // The consume loop may be waiting to run a barrier: let it see `stopped` and answer first.
    await this.loop;
    await this.drain();
    this.push();
    this.offEvent();
  }

  private async consumeLoop(): Promise<void> {
    this.running = true;
    const { ring, abi, counters } = this.d;
    let batch = 0;
    try {
      do {
        for (;;) {
          if (this.stopped) return;
          if (this.inflight >= this.d.maxPending) {
            // Linux __do_block_io_op: no free pending_req while requests wait on the ring counts
            // st_oo_req; they stay there until a completion frees one (its push kicks us again).
            if (ring.unconsumedRequests() > 0) counters.oo_req++;
            return;
          }
          const r = ring.consumeRequest(this.entry);
          if (r === RING_PEER_OVERFLOW) {
            // RING_REQUEST_PROD_OVERFLOW: Linux blkback halts the ring ("bogus ring requests").
            counters.fatal++;
            this.stopped = true;
            this.d.onFatal(`RING_REQUEST_PROD_OVERFLOW: frontend published req_prod ${ring.sring.reqProd} with only ${ring.size} slots (rsp_prod_pvt ${ring.rspProdPvt})`);
            return;
          }
          if (r !== RING_CONSUMED) break;
          const dec = decodeRequest(this.entry.view, 0, abi, { maxIndirectSegments: this.d.maxIndirectSegments });
          if (!dec.ok) {
            // Unknown operations are "not supported" (Linux `dispatch_other_io`); malformed ones are
            // errors. An indirect request is answered with its indirect_op, the byte after operation.
            const op = dec.operation === BLKIF_OP_INDIRECT ? this.entry.view.getUint8(1) : dec.operation;
            this.respond(dec.id, op, dec.problem === 'unknown-operation' ? BLKIF_RSP_EOPNOTSUPP : BLKIF_RSP_ERROR, dec.message);
            continue;
          }
          const req = classifyRequest(dec.request, this.d.limits());
          if (isRejection(req)) {
            this.respond(dec.request.id, responseOperation(dec.request), req.status, req.why);
            continue;
          }
          if (req.kind === 'barrier') {
            // blkif.h: earlier writes complete before a barrier, later ones start after it
            // (Linux xen_blk_drain_io; not counted in oo_req, which is about the pending pool).
            await this.drain();
            if (this.stopped) {
              // Disconnecting meanwhile: answer the barrier we consumed, touch nothing more.
              this.respond(req.id, req.operation, BLKIF_RSP_ERROR, 'backend disconnecting');
              return;
            }
            await this.serve(req);
            continue;
          }
          void this.serve(req);
          if (++batch % RESPONSE_BATCH === 0) {
            // Let the answers so far complete and be pushed, so the frontend refills the ring
            // while we carry on, instead of both ends taking turns over whole rings.
            await new Promise<void>((resolve) => setImmediate(resolve));
          }
        }
      } while (!this.stopped && ring.finalCheckForRequests() !== 0);
    } finally {
      this.running = false;
    }
  }

  /** Runs one validated request to its response; never throws. */
  private async serve(req: BackendRequest): Promise<void> {
    const { counters } = this.d;
    this.inflight++;
    counters.inflight_req++;
    let bytes = 0;
    let status: number = BLKIF_RSP_OKAY;
    let why: string | undefined;
    try {
      if (req.indirectGrefs !== undefined) {
        // Copy the segments out once (a frontend may change the page meanwhile: only the copy is
        // validated), then let the indirect pages go.
        const segs = this.d.access.readIndirect(req.indirectGrefs, req.nrSegments);
        if (typeof segs === 'string') {
          why = segs;
          return;
        }
        req.segs = segs;
        counters.indirect_req++;
        counters.indirect_segments += segs.length;
      }
      why = dataProblem(req, this.d.limits());
      if (why !== undefined) return;
      bytes = dataBytes(req.segs);
      this.account(req, bytes);
      counters.inflight_bytes += bytes;
      if (counters.inflight_bytes > counters.peak_inflight_bytes) counters.peak_inflight_bytes = counters.inflight_bytes;
      why = await this.execute(req, bytes);
    } catch (e) {
      why = `storage: ${(e as Error).message}`;
    } finally {
      if (why !== undefined) status = BLKIF_RSP_ERROR;
      counters.inflight_bytes -= bytes;
      counters.inflight_req--;
      this.respond(req.id, req.operation, status, why);
      if (--this.inflight === 0) this.wakeDrainers();
    }
  }

  /** Storage work of a request whose data is validated: map, I/O, unmap. Returns a problem or undefined. */
  private async execute(req: BackendRequest, bytes: number): Promise<string | undefined> {
    const { storage } = this.d;
    // Multiply, never shift: byte offsets pass 2^32 on any disk over 4 GiB.
    const offset = req.sector * SECTOR_SIZE;
    switch (req.kind) {
      case 'discard': {
        const length = req.discardSectors * SECTOR_SIZE;
        if (length > 0) await (req.secure ? storage.writeZeroes(offset, length) : storage.discard(offset, length));
        return undefined;
      }
      case 'flush':
      case 'barrier':
        // A flush or barrier carrying data flushes first (Linux maps both to REQ_PREFLUSH).
        await storage.flush();
        if (req.segs.length === 0) return undefined;
        break;
      default:
    }
    if (bytes === 0) return undefined;
    const toDisk = req.kind !== 'read';
    const pages = await this.d.access.acquire(req.segs, toDisk);
    if (typeof pages === 'string') return pages;
    let ok = false;
    try {
      if (toDisk) await storage.write(offset, pages.buffers);
      else await storage.read(offset, pages.buffers);
      ok = true;
    } finally {
      const why = this.d.access.release(pages, toDisk, ok);
      if (why !== undefined && ok) return why;
    }
    return undefined;
  }

  private account(req: BackendRequest, bytes: number): void {
    const c = this.d.counters;
    const sectors = bytes >> SECTOR_SHIFT;
    c.segments += req.segs.length;
    switch (req.kind) {
      case 'read': c.rd_req++; c.rd_sect += sectors; break;
      case 'write': c.wr_req++; c.wr_sect += sectors; break;
      case 'discard': c.ds_req++; break;
      default: c.f_req++; c.wr_sect += sectors;
    }
  }

  /** Writes a response into the next slot; publication is batched (see push). */
  private respond(id: bigint, operation: number, status: number, why?: string): void {
    const c = this.d.counters;
    if (status === BLKIF_RSP_ERROR) c.errors++;
    else if (status !== BLKIF_RSP_OKAY) c.eopnotsupp++;
    if (why !== undefined) this.d.log(`request ${id} (op ${operation}): ${why}`);
    encodeResponse(this.out.view, 0, this.d.abi, { id, operation, status });
    this.d.ring.produceResponse(this.out);
    if (!this.pushQueued) {
      this.pushQueued = true;
      // Completions of one batch run as consecutive microtasks: one push, at most one notify, for all.
      queueMicrotask(() => this.push());
    }
  }

  /** RING_PUSH_RESPONSES_AND_CHECK_NOTIFY, then look for requests that arrived meanwhile. */
  private push(): void {
    this.pushQueued = false;
    if (this.d.ring.pushResponsesAndCheckNotify()) {
      this.d.counters.notify_sent++;
      this.d.xen.events.notify(this.d.port);
    }
    this.kick();
  }

  private drain(): Promise<void> {
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  private wakeDrainers(): void {
    const w = this.drainWaiters;
    this.drainWaiters = [];
    for (const f of w) f();
  }
}
