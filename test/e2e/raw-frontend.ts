/**
 * A hand-written, deliberately hostile blkif frontend for the end-to-end tests: a domain living in
 * the main thread (`Hypervisor.createLocalDomain`) whose xenstore part is played by the toolstack's
 * privileged client. It sets up a ring the way blkif.h says, then writes whatever bytes a test
 * wants into the ring slots, publishes them (or a bogus `req_prod`) and collects the responses by
 * id. Nothing here goes through blkfront: every request is built field by field.
 *
 * Every wait is time-bound, so a backend that stops answering fails the test instead of hanging it.
 */
import assert from 'node:assert/strict';
import {
  BLKIF_OP_DISCARD,
  BLKIF_OP_INDIRECT,
  BLKIF_OP_READ,
  BLKIF_OP_WRITE,
  BLKIF_RSP_EOPNOTSUPP,
  BLKIF_RSP_ERROR,
  BLKIF_RSP_OKAY,
  BLKIF_SEGMENT_SIZE,
  BLKIF_SEGS_PER_INDIRECT_FRAME,
  XEN_PAGE_SIZE,
  XS_EVENT_CHANNEL,
  XS_PROTOCOL,
  XS_RING_REF,
  X86_64_ABI,
  blkifOpName,
  decodeResponse,
  encodeRequest,
  encodeRequestOther,
  encodeSegment,
  type BlkifAbi,
  type BlkifRequest,
  type BlkifRequestDiscard,
  type BlkifRequestIndirect,
  type BlkifRequestRw,
  type BlkifResponse,
  type BlkifSegment,
  type RwOperation,
} from '../../src/abi/index.js';
import type { BlkbackOptions } from '../../src/blkback/index.js';
import { FrontRing, RING_CONSUMED, RING_PEER_OVERFLOW, RingEntry, SharedRing } from '../../src/ring/index.js';
import {
  createVbdNodes,
  removeVbdNodes,
  type BackendVbdStatus,
  type DomainProxy,
  type Toolstack,
  type VbdPaths,
} from '../../src/toolstack/index.js';
import type { StorageSpec } from '../../src/storage/index.js';
import type { XenDomain } from '../../src/xen/index.js';
import {
  XS_STATE,
  XenbusStateClosed,
  XenbusStateClosing,
  XenbusStateConnected,
  XenbusStateInitWait,
  XenbusStateInitialised,
  readState,
  waitForState,
} from '../../src/xenbus/index.js';
import { eventually as pollUntil } from '../support/common.js';

/** How long any single wait may take before the test fails. */
export const WAIT_MS = 30_000;

/** Rejects with a message naming `what` if `p` has not settled within `ms`. */
export function within<T>(p: Promise<T>, what: string, ms = WAIT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

/** Polls `cond` every 5 ms until it holds; rejects after `ms` naming `what`. */
export function eventually(cond: () => Promise<boolean> | boolean, what: string, ms = WAIT_MS): Promise<void> {
  return pollUntil(cond, what, ms);
}

export function statusName(s: number): string {
  switch (s) {
    case BLKIF_RSP_OKAY: return 'OKAY';
    case BLKIF_RSP_ERROR: return 'ERROR';
    case BLKIF_RSP_EOPNOTSUPP: return 'EOPNOTSUPP';
    default: return `status ${s}`;
  }
}

/** A request of an operation blkif.h has no struct for: only `operation` and `id` are written. */
export interface OtherRequest {
  readonly other: number;
  readonly id: bigint;
}
export type AnyRequest = BlkifRequest | OtherRequest;

const isOther = (r: AnyRequest): r is OtherRequest => (r as OtherRequest).other !== undefined;

/** The `operation` a correct backend answers `r` with (indirect: its `indirect_op`). */
export function expectedOperation(r: AnyRequest): number {
  if (isOther(r)) return r.other;
  return r.operation === BLKIF_OP_INDIRECT ? r.indirect_op : r.operation;
}

// Request builders: they take any values, including ones blkif.h forbids.
export function rw(operation: RwOperation, id: bigint, sector: bigint | number, seg: BlkifSegment[], nr_segments = seg.length): BlkifRequestRw {
  return { operation, nr_segments, handle: 0, id, sector_number: BigInt(sector), seg };
}
export function indirect(indirect_op: number, id: bigint, sector: bigint | number, nr_segments: number, grefs: number[]): BlkifRequestIndirect {
  return { operation: BLKIF_OP_INDIRECT, indirect_op, nr_segments, id, sector_number: BigInt(sector), handle: 0, indirect_grefs: grefs };
}
export function discard(id: bigint, sector: bigint | number, nr_sectors: bigint | number, flag = 0): BlkifRequestDiscard {
  return { operation: BLKIF_OP_DISCARD, flag, handle: 0, id, sector_number: BigInt(sector), nr_sectors: BigInt(nr_sectors) };
}
/** One whole-page segment per gref. */
export function fullSegs(refs: readonly number[]): BlkifSegment[] {
  return refs.map((gref) => ({ gref, first_sect: 0, last_sect: 7 }));
}

/** Frames of the raw frontend's domain granted to some domain. */
export interface Granted {
  readonly frames: number[];
  readonly refs: number[];
  readonly pages: Uint8Array[];
}

export interface RawVbdOptions {
  readonly devid: number;
  readonly storage: StorageSpec;
  readonly readOnly?: boolean;
  readonly backendOptions?: Partial<BlkbackOptions>;
  /** Ring ABI (default x86_64). */
  readonly abi?: BlkifAbi;
}

/** One VBD between the backend domain and the raw frontend domain `L`. */
export class RawVbd {
  /** Responses nobody was waiting for (an id answered twice, or never asked). */
  readonly strays: BlkifResponse[] = [];
  /** Statuses of every response received, as the backend's counters should see them. */
  readonly tally = { okay: 0, error: 0, eopnotsupp: 0, other: 0 };
  /** Set if the backend ever published a bogus `rsp_prod`. */
  backendOverflow = false;
  private readonly waiters = new Map<bigint, (r: BlkifResponse) => void>();
  private readonly granted = new Set<Granted>();
  private readonly entry: RingEntry;
  private readonly rspEntry: RingEntry;
  private offEvent: (() => void) | undefined;
  private closed = false;

  private constructor(
    readonly ts: Toolstack,
    readonly L: XenDomain,
    readonly back: DomainProxy,
    readonly paths: VbdPaths,
    readonly abi: BlkifAbi,
    readonly ring: FrontRing,
    readonly ringFrame: number,
    readonly ringRef: number,
    readonly port: number,
  ) {
    this.entry = new RingEntry(abi.entrySize);
    this.rspEntry = new RingEntry(abi.entrySize);
  }

  get sring(): SharedRing {
    return this.ring.sring;
  }
  get frontDir(): string {
    return this.paths.frontDir;
  }
  get backDir(): string {
    return this.paths.backDir;
  }

  /**
   * Plugs a VBD as the toolstack and a frontend would: nodes, blkback, wait for InitWait, ring page
   * granted, event channel allocated, ring-ref/event-channel/protocol written, state Initialised,
   * wait for Connected.
   */
  static async plug(ts: Toolstack, L: XenDomain, back: DomainProxy, o: RawVbdOptions): Promise<RawVbd> {
    const abi = o.abi ?? X86_64_ABI;
    const readOnly = o.readOnly === true || o.storage.readOnly === true;
    const paths = await createVbdNodes(ts.xs, { frontDomid: L.domid, backDomid: back.domid, devid: o.devid }, o.storage, readOnly);
    await within(back.rpc.call('addVbd', paths.backDir, o.storage, o.backendOptions ?? {}), `addVbd ${paths.backDir}`);
    await waitForState(ts.xs, paths.backDir, (s) => s === XenbusStateInitWait, WAIT_MS);
    const [frame] = L.memory.alloc(1);
    const ring = FrontRing.init(new SharedRing([L.memory.page(frame!)], abi.entrySize));
    const ref = L.grants.grantAccess(back.domid, frame!, false, { lasting: true }); // a ring: both ends write it
    assert.ok(ref >= 0, `granting the ring page: ${ref}`);
    const port = L.events.allocUnbound(back.domid);
    assert.ok(port > 0, `allocating the event channel: ${port}`);
    const v = new RawVbd(ts, L, back, paths, abi, ring, frame!, ref, port);
    v.offEvent = L.events.on(port, () => v.onEvent());
    const f = paths.frontDir;
    await ts.xs.transaction(async (tx) => {
      await ts.xs.write(`${f}/${XS_RING_REF}`, String(ref), tx);
      await ts.xs.write(`${f}/${XS_EVENT_CHANNEL}`, String(port), tx);
      await ts.xs.write(`${f}/${XS_PROTOCOL}`, abi.protocol, tx);
    });
    await ts.xs.write(`${f}/${XS_STATE}`, String(XenbusStateInitialised));
    await waitForState(ts.xs, paths.backDir, (s) => s === XenbusStateConnected, WAIT_MS);
    return v;
  }

  /** The backend's view of this VBD. */
  status(): Promise<BackendVbdStatus> {
    return within(this.back.rpc.call<BackendVbdStatus>('status', this.backDir), `status of ${this.backDir}`);
  }

  /** Writes requests into the next slots without publishing them. */
  produce(reqs: readonly AnyRequest[]): void {
    for (const r of reqs) {
      if (isOther(r)) encodeRequestOther(this.entry.view, 0, this.abi, r.other, r.id);
      else encodeRequest(this.entry.view, 0, this.abi, r);
      assert.ok(this.ring.produceRequest(this.entry), 'the ring has room for the request');
    }
  }

  /** RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, and the notify if the backend asked for it. */
  push(): void {
    if (this.ring.pushRequestsAndCheckNotify()) assert.equal(this.L.events.notify(this.port), 0, 'notify');
  }

  /** Sends a batch in one push and resolves with the responses in request order (ids must be distinct). */
  async submit(reqs: readonly AnyRequest[], what = 'requests'): Promise<BlkifResponse[]> {
    const waits = reqs.map((r) => {
      assert.ok(!this.waiters.has(r.id), `id ${r.id} is already outstanding`);
      return new Promise<BlkifResponse>((resolve) => this.waiters.set(r.id, resolve));
    });
    this.produce(reqs);
    this.push();
    try {
      return await within(Promise.all(waits), `responses to ${reqs.length} ${what} on ${this.backDir}`);
    } finally {
      for (const r of reqs) this.waiters.delete(r.id);
    }
  }

  /**
   * Sends a batch of cases in one push; asserts each response carries its request's id, the
   * expected operation and the expected status.
   */
  async expect(cases: readonly { req: AnyRequest; status: number; what: string }[]): Promise<BlkifResponse[]> {
    const rsps = await this.submit(cases.map((c) => c.req), cases.map((c) => c.what).join('; '));
    cases.forEach((c, i) => {
      const r = rsps[i]!;
      assert.equal(r.id, c.req.id, `${c.what}: response id`);
      assert.equal(r.operation, expectedOperation(c.req), `${c.what}: response operation ${blkifOpName(r.operation)}`);
      assert.equal(statusName(r.status), statusName(c.status), `${c.what}: response status`);
    });
    return rsps;
  }

  private onEvent(): void {
    for (;;) {
      for (;;) {
        const r = this.ring.consumeResponse(this.rspEntry);
        if (r === RING_PEER_OVERFLOW) {
          this.backendOverflow = true;
          return;
        }
        if (r !== RING_CONSUMED) break;
        this.deliver(decodeResponse(this.rspEntry.view, 0, this.abi));
      }
      if (this.ring.finalCheckForResponses() === 0) return;
    }
  }

  private deliver(r: BlkifResponse): void {
    if (r.status === BLKIF_RSP_OKAY) this.tally.okay++;
    else if (r.status === BLKIF_RSP_ERROR) this.tally.error++;
    else if (r.status === BLKIF_RSP_EOPNOTSUPP) this.tally.eopnotsupp++;
    else this.tally.other++;
    const w = this.waiters.get(r.id);
    if (w === undefined) {
      this.strays.push(r);
      return;
    }
    this.waiters.delete(r.id);
    w(r);
  }

  /** Allocates and grants `n` frames of L to `to` (default: the backend). */
  grant(n: number, opts: { readonly?: boolean; to?: number } = {}): Granted {
    const frames = this.L.memory.alloc(n);
    const refs = frames.map((f) => {
      const ref = this.L.grants.grantAccess(opts.to ?? this.back.domid, f, opts.readonly === true);
      assert.ok(ref >= 0, `grant of frame ${f}: ${ref}`);
      return ref;
    });
    const g: Granted = { frames, refs, pages: frames.map((f) => this.L.memory.page(f)) };
    this.granted.add(g);
    return g;
  }

  /** Ends the grants and frees the frames; every grant must be unmapped by now (endAccess true). */
  release(g: Granted): void {
    if (!this.granted.delete(g)) return;
    const stillMapped = g.refs.filter((ref) => !this.L.grants.endAccess(ref));
    assert.deepEqual(stillMapped, [], 'every granted page is unmapped by the backend once answered');
    this.L.memory.free(g.frames);
  }

  /** Runs `fn` with `n` granted frames, releasing them afterwards. */
  async withGrants<T>(n: number, opts: { readonly?: boolean; to?: number }, fn: (g: Granted) => Promise<T>): Promise<T> {
    const g = this.grant(n, opts);
    try {
      return await fn(g);
    } finally {
      this.release(g);
    }
  }

  /** Indirect pages holding `segs`, granted read-only to the backend. */
  indirectPages(segs: readonly BlkifSegment[]): Granted {
    const g = this.grant(Math.max(1, Math.ceil(segs.length / BLKIF_SEGS_PER_INDIRECT_FRAME)), { readonly: true });
    segs.forEach((s, j) => {
      const page = g.pages[Math.floor(j / BLKIF_SEGS_PER_INDIRECT_FRAME)]!;
      encodeSegment(new DataView(page.buffer, page.byteOffset, page.byteLength), (j % BLKIF_SEGS_PER_INDIRECT_FRAME) * BLKIF_SEGMENT_SIZE, s);
    });
    return g;
  }

  /** A valid WRITE of whole pages (at most 11) at `sector`, expected OKAY. */
  async writePages(sector: number | bigint, data: Uint8Array, id: bigint): Promise<void> {
    const n = data.length / XEN_PAGE_SIZE;
    assert.ok(Number.isInteger(n) && n >= 1 && n <= 11);
    await this.withGrants(n, { readonly: true }, async (g) => {
      g.pages.forEach((p, i) => p.set(data.subarray(i * XEN_PAGE_SIZE, (i + 1) * XEN_PAGE_SIZE)));
      await this.expect([{ req: rw(BLKIF_OP_WRITE, id, sector, fullSegs(g.refs)), status: BLKIF_RSP_OKAY, what: `write ${n} pages at ${sector}` }]);
    });
  }

  /** A valid READ of `n` whole pages (at most 11) at `sector`, expected OKAY. */
  async readPages(sector: number | bigint, n: number, id: bigint): Promise<Uint8Array> {
    return this.withGrants(n, {}, async (g) => {
      for (const p of g.pages) p.fill(0xee); // the backend must overwrite every byte
      await this.expect([{ req: rw(BLKIF_OP_READ, id, sector, fullSegs(g.refs)), status: BLKIF_RSP_OKAY, what: `read ${n} pages at ${sector}` }]);
      const out = new Uint8Array(n * XEN_PAGE_SIZE);
      g.pages.forEach((p, i) => out.set(p, i * XEN_PAGE_SIZE));
      return out;
    });
  }

  /** A valid indirect WRITE (`write`) or READ of whole pages, expected OKAY; returns what was read. */
  async indirectPagesIo(op: typeof BLKIF_OP_READ | typeof BLKIF_OP_WRITE, sector: number, n: number, id: bigint, data?: Uint8Array): Promise<Uint8Array> {
    return this.withGrants(n, { readonly: op === BLKIF_OP_WRITE }, async (g) => {
      if (data !== undefined) g.pages.forEach((p, i) => p.set(data.subarray(i * XEN_PAGE_SIZE, (i + 1) * XEN_PAGE_SIZE)));
      else for (const p of g.pages) p.fill(0xee);
      const ind = this.indirectPages(fullSegs(g.refs));
      try {
        await this.expect([{ req: indirect(op, id, sector, n, ind.refs), status: BLKIF_RSP_OKAY, what: `indirect ${blkifOpName(op)} of ${n} pages at ${sector}` }]);
      } finally {
        this.release(ind);
      }
      const out = new Uint8Array(n * XEN_PAGE_SIZE);
      g.pages.forEach((p, i) => out.set(p, i * XEN_PAGE_SIZE));
      return out;
    });
  }

  /**
   * Closes as a frontend does (Closing, wait for the backend's Closed, Closed), then checks the
   * backend let go of the ring (the grant can be ended), closes the channel and unplugs the VBD.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const { xs } = this.ts;
    const fs = await readState(xs, this.frontDir);
    if (fs === undefined || fs < XenbusStateClosing) await xs.write(`${this.frontDir}/${XS_STATE}`, String(XenbusStateClosing));
    await waitForState(xs, this.backDir, (s) => s === XenbusStateClosed, WAIT_MS);
    await xs.write(`${this.frontDir}/${XS_STATE}`, String(XenbusStateClosed));
    this.offEvent?.();
    this.offEvent = undefined;
    for (const g of [...this.granted]) this.release(g);
    assert.equal(this.L.grants.endAccess(this.ringRef), true, 'the backend unmapped the ring once Closed');
    this.L.memory.free([this.ringFrame]);
    assert.equal(this.L.events.close(this.port), 0, 'closing our end of the event channel');
    await within(this.back.rpc.call('removeVbd', this.backDir), `removeVbd ${this.backDir}`);
    await removeVbdNodes(xs, this.paths);
  }
}
