/**
 * The guest's block device (Linux xen-blkfront): a promise API over the PV protocol. Each I/O is
 * cut into ring requests under the negotiated limits (plain up to 11 segments, indirect up to the
 * backend's `feature-max-indirect-segments`), tracked in a shadow table keyed by `id`, and
 * completes when all its parts have answered. Every response is checked before it is believed;
 * a backend that breaks the protocol stops the device. When the backend goes away, requests it
 * never answered are kept and issued again, re-split, once a backend connects.
 */
import {
  BLKIF_OP_DISCARD,
  BLKIF_OP_FLUSH_DISKCACHE,
  BLKIF_OP_INDIRECT,
  BLKIF_OP_READ,
  BLKIF_OP_WRITE,
  BLKIF_OP_WRITE_BARRIER,
  BLKIF_MAX_SEGMENTS_PER_REQUEST,
  BLKIF_RSP_EOPNOTSUPP,
  BLKIF_RSP_OKAY,
  BLKIF_SEGMENT_SIZE,
  BLKIF_SEGS_PER_INDIRECT_FRAME,
  BLKIF_DISCARD_SECURE,
  SECTOR_SHIFT,
  XEN_PAGE_SIZE,
  XS_EVENT_CHANNEL,
  XS_FEATURE_PERSISTENT,
  XS_MULTI_QUEUE_NUM_QUEUES,
  XS_PROTOCOL,
  XS_RING_PAGE_ORDER,
  XS_RING_REF,
  abiByName,
  decodeResponse,
  encodeRequest,
  encodeSegment,
  indirectPagesFor,
  xsQueueDir,
  xsRingRefN,
  type BlkifAbi,
  type BlkifSegment,
  type RwOperation,
} from '../abi/index.js';
import { FrontRing, MAX_RING_PAGE_ORDER, RING_CONSUMED, RING_PEER_OVERFLOW, RingEntry, SharedRing } from '../ring/index.js';
import type { XenDomain } from '../xen/index.js';
import {
  XS_BACKEND,
  XS_BACKEND_ID,
  XS_STATE,
  XenbusStateClosed,
  XenbusStateClosing,
  XenbusStateConnected,
  XenbusStateInitWait,
  XenbusStateInitialised,
  XenbusStateInitialising,
  allocEvtchn,
  grantRing,
  readState,
  switchState,
  waitForState,
  xenbusStateName,
  type XenbusState,
} from '../xenbus/index.js';
import type { XenstoreClient } from '../xenstore/index.js';
import { readBackendTransport, readDiskInfo, type DiskInfo } from './negotiate.js';
import { blkfrontOptions, type BlkfrontOptions } from './options.js';
import { PagePool } from './page-pool.js';
import { ShadowTable, type ShadowEntry } from './shadow.js';

export type BlkfrontErrorCode = 'EIO' | 'EINVAL' | 'EROFS' | 'EOPNOTSUPP' | 'ETIMEDOUT' | 'ESHUTDOWN';

export class BlkfrontError extends Error {
  override name = 'BlkfrontError';
  constructor(readonly code: BlkfrontErrorCode, message: string) {
    super(message);
  }
}

export interface BlkfrontDeps {
  readonly xen: XenDomain;
  readonly xs: XenstoreClient;
  /** The frontend directory the toolstack created (with `backend`, `backend-id`, `state`). */
  readonly frontDir: string;
  readonly options?: Partial<BlkfrontOptions>;
  readonly log?: (msg: string) => void;
  /** Told, at each teardown, which requests the backend left unanswered (they are issued again). */
  readonly onReissue?: (held: readonly HeldRequest[]) => void;
}

/** A request a backend went away without answering, as it was on the ring. */
export interface HeldRequest {
  readonly queue: number;
  readonly id: bigint;
  /** BLKIF_OP_* (for an indirect request, its indirect_op). */
  readonly operation: number;
  readonly sector: bigint;
  /** Data bytes it carried (discard: bytes it covered; flush: 0). */
  readonly bytes: number;
}

/** Frontend statistics, readable through `counters`. */
export interface BlkfrontCounters {
  requests: number;
  indirect_requests: number;
  segments: number;
  /** Requests issued again after the backend went away without answering them. */
  reissued: number;
  notify_sent: number;
  notify_received: number;
  responses: number;
  errors: number;
  grants: number;
  /** Persistent grants ended because the backend had unmapped them (Linux purge_persistent_grants). */
  persistent_purged: number;
}

/** What the device is now, as negotiated. */
export interface DeviceInfo extends DiskInfo {
  /** Bytes of the disk. */
  size: number;
  /** Segments per request in use: 11 without indirect, else the negotiated indirect maximum. */
  maxSegments: number;
  indirect: boolean;
  ringPageOrder: number;
  /** Slots per ring; `queues` rings. */
  ringSize: number;
  queues: number;
  /** Persistent grants negotiated. */
  persistent: boolean;
  protocol: string;
}

type IoKind = 'read' | 'write' | 'flush' | 'discard';

/** One caller's I/O. */
interface IoOp {
  kind: IoKind;
  /** Byte offset on disk; length in bytes (0 for flush). */
  offset: number;
  length: number;
  buf: Uint8Array | undefined;
  secure: boolean;
  doneBytes: number;
  failed: boolean;
  resolve: () => void;
  reject: (e: Error) => void;
}

/** A piece of an I/O not yet answered: what a ring request carries, and what is re-issued. */
interface Chunk {
  op: IoOp;
  /** Byte range within the op. */
  start: number;
  length: number;
}

/** One ring of a connection, with its own channel and id space (blkif.h "Multi-queue"). */
interface Queue {
  readonly index: number;
  readonly ring: FrontRing;
  readonly ringFrames: number[];
  readonly ringRefs: number[];
  readonly port: number;
  offEvent: () => void;
  readonly shadow: ShadowTable<Chunk>;
  readonly entry: RingEntry;
}

/** One connection to a backend: its queues and negotiated limits. */
interface Link {
  backDomid: number;
  backDir: string;
  abi: BlkifAbi;
  ringPageOrder: number;
  maxSegments: number;
  indirect: boolean;
  /** `feature-persistent` on both ends: pages keep their (writable) grant for the whole link. */
  persistent: boolean;
  /** Persistent grants by frame. */
  readonly pgrants: Map<number, number>;
  readonly queues: Queue[];
  /** Round-robin start for spreading requests over the queues. */
  next: number;
}

type Phase = 'connecting' | 'connected' | 'closing' | 'closed' | 'broken';

let watchSeq = 0;

export class Blkfront {
  readonly counters: BlkfrontCounters = { requests: 0, indirect_requests: 0, segments: 0, reissued: 0, notify_sent: 0, notify_received: 0, responses: 0, errors: 0, grants: 0, persistent_purged: 0 };
  readonly options: BlkfrontOptions;
  readonly handle: number;
  private phase: Phase = 'connecting';
  private link: Link | undefined;
  private disk: DiskInfo | undefined;
  private readonly pool: PagePool;
  /** Chunks waiting for a ring slot, pages, or a connection; re-issued ones go first. */
  private queue: Chunk[] = [];
  private serial: Promise<void> = Promise.resolve();
  private readonly token = `blkfront-${++watchSeq}`;
  private backDir = '';
  private waitTimer: NodeJS.Timeout | undefined;
  private connectedWaiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  private closing: Promise<void> | undefined;
  private brokenReason: string | undefined;
  private userClosing = false;
  private state: XenbusState = XenbusStateInitialising;

  private constructor(private readonly d: BlkfrontDeps) {
    this.options = blkfrontOptions(d.options);
    this.handle = Number(d.frontDir.slice(d.frontDir.lastIndexOf('/') + 1)) & 0xffff;
    this.pool = new PagePool(d.xen, this.options.bufferPages);
  }

  /** Connects to the backend named in `frontDir` and resolves once the disk is usable. */
  static async attach(d: BlkfrontDeps): Promise<Blkfront> {
    const f = new Blkfront(d);
    try {
      await f.watchBackend();
      await f.whenConnected();
      return f;
    } catch (e) {
      await f.close().catch(() => undefined);
      throw e;
    }
  }

  /** The disk and the protocol limits in use. */
  get info(): DeviceInfo {
    const disk = this.disk;
    const link = this.link;
    if (disk === undefined) throw new BlkfrontError('ESHUTDOWN', 'not connected');
    // Read on every request by exporters: built once per change (connect, resize, feature
    // dropped, link lost), not per call.
    if (this.infoCache !== undefined && this.infoCacheLink === link) return this.infoCache;
    this.infoCacheLink = link;
    return (this.infoCache = {
      ...disk,
      size: disk.sectors * 512,
      maxSegments: link?.maxSegments ?? BLKIF_MAX_SEGMENTS_PER_REQUEST,
      indirect: link?.indirect ?? false,
      ringPageOrder: link?.ringPageOrder ?? 0,
      ringSize: link?.queues[0]?.ring.size ?? 0,
      queues: link?.queues.length ?? 0,
      persistent: link?.persistent ?? false,
      protocol: link?.abi.protocol ?? this.options.protocol,
    });
  }

  private infoCache: DeviceInfo | undefined;
  private infoCacheLink: Link | undefined;

  get xenbusState(): XenbusState {
    return this.state;
  }

  /** Requests on the ring now. */
  get inFlight(): number {
    let n = 0;
    for (const q of this.link?.queues ?? []) n += q.shadow.inFlight;
    return n;
  }

  /** Pages holding a persistent grant now. */
  get persistentGrants(): number {
    return this.link?.pgrants.size ?? 0;
  }

  /**
   * Linux `purge_persistent_grants`: ends the persistent grants of pages no request holds that
   * the backend no longer maps (its idle purge unmapped them); such a page is granted afresh when
   * used again. Runs every `purgeIntervalMs`; returns how many were ended.
   */
  purgePersistentGrants(): number {
    const link = this.link;
    if (link === undefined || !link.persistent || link.pgrants.size === 0) return 0;
    const free = new Set(this.pool.freeFrames());
    let n = 0;
    for (const [frame, ref] of link.pgrants) {
      // A page lent to a request keeps its grant; one the backend still maps cannot be ended.
      if (!free.has(frame) || !this.d.xen.grants.endAccess(ref)) continue;
      link.pgrants.delete(frame);
      n++;
    }
    this.counters.persistent_purged += n;
    return n;
  }

  private purgeTimer: NodeJS.Timeout | undefined;

  /** Frames the backend kept mapped after answering (a misbehaving backend): never reused. */
  get leakedPages(): number {
    return this.pool.leaked;
  }

  read(offset: number, length: number): Promise<Uint8Array> {
    // Every byte is overwritten by a successful read (a failed one is never returned): no zero-fill.
    const buf: Uint8Array = Buffer.allocUnsafeSlow(length);
    return this.submit('read', offset, length, buf, false).then(() => buf);
  }

  /** Reads into `buf` (its length is the length). */
  readInto(offset: number, buf: Uint8Array): Promise<void> {
    return this.submit('read', offset, buf.length, buf, false);
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.submit('write', offset, data.length, data, false);
  }

  /**
   * Makes completed writes durable: FLUSH_DISKCACHE if offered, else a WRITE_BARRIER, else
   * nothing (a backend offering neither has no volatile cache to flush, as Linux assumes).
   */
  flush(): Promise<void> {
    const disk = this.disk;
    if (disk !== undefined && !disk.flush && !disk.barrier && this.checkIo('flush', 0, 0) === undefined) return Promise.resolve();
    return this.submit('flush', 0, 0, undefined, false);
  }

  /** Drops a range (reads then return zeroes); `secure` asks for BLKIF_DISCARD_SECURE. */
  discard(offset: number, length: number, opts: { secure?: boolean } = {}): Promise<void> {
    return this.submit('discard', offset, length, undefined, opts.secure === true);
  }

  /**
   * Unplug: refuse new I/O, finish what is queued and in flight, then close with the backend
   * (Closing, the backend unmaps and closes, Closed) and give the pages back. Idempotent.
   */
  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  private async shutdown(): Promise<void> {
    this.userClosing = true;
    if (this.phase === 'connected') await this.drained();
    await this.d.xs.unwatch(`${this.backDir}/${XS_STATE}`, this.token).catch(() => undefined);
    await this.d.xs.unwatch(`${this.d.frontDir}/${XS_BACKEND}`, `${this.token}-path`).catch(() => undefined);
    await this.enqueue(async () => {
      // Also when the device stopped on a protocol violation: a correct backend still maps the
      // ring until it sees Closing and closes; tearing down first would leak those grants.
      if (this.link !== undefined) {
        if (this.state !== XenbusStateClosing) await this.setState(XenbusStateClosing).catch(() => undefined);
        await waitForState(this.d.xs, this.backDir, (s) => s === XenbusStateClosed || s === undefined, this.options.connectTimeoutMs).catch(() => undefined);
      }
      this.teardown();
      await this.setState(XenbusStateClosed).catch(() => undefined);
    });
    this.phase = 'closed';
    this.failAll(new BlkfrontError('ESHUTDOWN', 'device closed'));
    clearTimeout(this.waitTimer);
    clearInterval(this.purgeTimer);
    this.pool.dispose();
  }

  // ---- I/O submission ----

  private submit(kind: IoKind, offset: number, length: number, buf: Uint8Array | undefined, secure: boolean): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const bad = this.checkIo(kind, offset, length);
      if (bad !== undefined) return reject(bad);
      if (length === 0 && kind !== 'flush') return resolve();
      const op: IoOp = { kind, offset, length, buf, secure, doneBytes: 0, failed: false, resolve, reject };
      this.queue.push({ op, start: 0, length });
      // Waiting for a backend is bounded for every I/O, also those queued after a timer fired.
      if (this.phase !== 'connected' && this.waitTimer === undefined) this.armWaitTimer();
      this.pump();
    });
  }

  private checkIo(kind: IoKind, offset: number, length: number): BlkfrontError | undefined {
    if (this.userClosing || this.phase === 'closed') return new BlkfrontError('ESHUTDOWN', 'device is closing');
    if (this.phase === 'broken') return new BlkfrontError('EIO', `device stopped: ${this.brokenReason}`);
    const disk = this.disk;
    if (disk === undefined) return new BlkfrontError('ESHUTDOWN', 'not connected');
    if (kind === 'flush') return undefined;
    const size = disk.sectors * 512;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      return new BlkfrontError('EINVAL', `offset ${offset} length ${length}: must be non-negative integers`);
    }
    if (offset % disk.sectorSize !== 0 || length % disk.sectorSize !== 0) {
      return new BlkfrontError('EINVAL', `offset ${offset} length ${length}: not aligned to ${disk.sectorSize}-byte sectors`);
    }
    if (offset + length > size) return new BlkfrontError('EINVAL', `bytes ${offset}..${offset + length} beyond the disk's ${size}`);
    if (kind !== 'read' && disk.readOnly) return new BlkfrontError('EROFS', 'the disk is read-only');
    if (kind === 'discard' && !disk.discard) return new BlkfrontError('EOPNOTSUPP', 'the backend offers no discard');
    return undefined;
  }

  /** Moves queued chunks onto the rings (spread round-robin) while they have slots and the pool has pages. */
  private pump(): void {
    const link = this.link;
    if (link === undefined || this.phase !== 'connected') return;
    const nq = link.queues.length;
    let produced = 0;
    const touched = new Set<Queue>();
    while (this.queue.length > 0) {
      const c = this.queue[0]!;
      if (c.op.failed) {
        this.queue.shift();
        continue;
      }
      let q: Queue | undefined;
      for (let k = 0; k < nq && q === undefined; k++) {
        const cand = link.queues[(link.next + k) % nq]!;
        if (!cand.ring.full() && cand.shadow.available > 0) q = cand;
      }
      if (q === undefined || !this.issue(link, q, c)) break;
      link.next = (q.index + 1) % nq;
      touched.add(q);
      produced++;
    }
    this.wakeDrained();
    if (produced === 0) return;
    for (const q of touched) {
      if (q.ring.pushRequestsAndCheckNotify()) {
        this.counters.notify_sent++;
        this.d.xen.events.notify(q.port);
      }
    }
  }

  /**
   * Puts the head of `c` on the ring as one request (plain, or indirect when more than 11
   * segments are needed and negotiated). Returns false if the pool lacks pages for it.
   */
  private issue(link: Link, q: Queue, c: Chunk): boolean {
    const op = c.op;
    const disk = this.disk!;
    let operation: number;
    let nsegs = 0;
    let bytes = 0;
    if (op.kind === 'read' || op.kind === 'write') {
      operation = op.kind === 'read' ? BLKIF_OP_READ : BLKIF_OP_WRITE;
      // Pages a backend kept mapped never come back to the pool: a request is cut to what the
      // pool can still hold (waiting for more would be forever), and with no page left it fails.
      const usable = this.pool.usable;
      if (usable < 1) {
        this.queue.shift();
        this.finish(op, new BlkfrontError('EIO', `${op.kind} at ${op.offset + c.start}: every buffer page is leaked (the backend kept them mapped)`));
        return true;
      }
      nsegs = Math.min(Math.ceil(c.length / XEN_PAGE_SIZE), link.maxSegments);
      if (nsegs > BLKIF_MAX_SEGMENTS_PER_REQUEST && nsegs + indirectPagesFor(nsegs) > usable) {
        nsegs = Math.max(usable - indirectPagesFor(usable), BLKIF_MAX_SEGMENTS_PER_REQUEST);
      }
      if (nsegs <= BLKIF_MAX_SEGMENTS_PER_REQUEST) nsegs = Math.min(nsegs, usable);
      bytes = Math.min(c.length, nsegs * XEN_PAGE_SIZE);
    } else if (op.kind === 'flush') {
      operation = disk.flush ? BLKIF_OP_FLUSH_DISKCACHE : BLKIF_OP_WRITE_BARRIER;
    } else {
      operation = BLKIF_OP_DISCARD;
    }
    const indirect = nsegs > BLKIF_MAX_SEGMENTS_PER_REQUEST;
    const indPages = indirect ? indirectPagesFor(nsegs) : 0;
    if (this.pool.available < nsegs + indPages) return false;

    const s = q.shadow.take();
    const toDisk = op.kind === 'write';
    this.pool.take(nsegs, s.frames);
    if (indirect) this.pool.take(indPages, s.indirectFrames);
    const segs: BlkifSegment[] = [];
    try {
      for (let i = 0; i < nsegs; i++) {
        const frame = s.frames[i]!;
        const len = Math.min(XEN_PAGE_SIZE, bytes - i * XEN_PAGE_SIZE);
        if (toDisk) {
          const from = c.start + i * XEN_PAGE_SIZE;
          this.pool.page(frame).set(op.buf!.subarray(from, from + len));
        }
        // The backend only reads a page we write out: grant it read-only (unless persistent).
        const gref = this.grantFor(link, frame, toDisk);
        s.grefs.push(gref);
        segs.push({ gref, first_sect: 0, last_sect: (len >> SECTOR_SHIFT) - 1 });
      }
      for (const frame of s.indirectFrames) s.indirectGrefs.push(this.grantFor(link, frame, true));
    } catch (e) {
      // Out of grant entries: undo, and wait for completions to free some (Linux
      // gnttab_request_free_callback); with nothing in flight to free any, fail this I/O.
      this.endGrants(link, s);
      this.givePages(s);
      q.shadow.release(s);
      if (this.inFlight === 0) {
        this.queue.shift();
        this.finish(op, e as Error);
        return true;
      }
      return false;
    }
    const sector = BigInt((op.offset + c.start) / 512);
    const id = BigInt(s.index);
    if (indirect) {
      for (let j = 0; j < nsegs; j++) {
        const frame = s.indirectFrames[Math.floor(j / BLKIF_SEGS_PER_INDIRECT_FRAME)]!;
        encodeSegment(this.pool.view(frame), (j % BLKIF_SEGS_PER_INDIRECT_FRAME) * BLKIF_SEGMENT_SIZE, segs[j]!);
      }
      encodeRequest(q.entry.view, 0, link.abi, {
        operation: BLKIF_OP_INDIRECT, indirect_op: operation, nr_segments: nsegs, id, sector_number: sector, handle: this.handle, indirect_grefs: s.indirectGrefs,
      });
      this.counters.indirect_requests++;
    } else if (operation === BLKIF_OP_DISCARD) {
      encodeRequest(q.entry.view, 0, link.abi, {
        operation, flag: op.secure ? BLKIF_DISCARD_SECURE : 0, handle: this.handle, id, sector_number: sector, nr_sectors: BigInt(c.length / 512),
      });
      bytes = c.length;
    } else {
      encodeRequest(q.entry.view, 0, link.abi, {
        operation: operation as RwOperation, nr_segments: nsegs, handle: this.handle, id, sector_number: sector, seg: segs,
      });
    }
    s.expectOp = operation;
    this.counters.requests++;
    this.counters.segments += nsegs;
    q.ring.produceRequest(q.entry);
    // The request carries [c.start, c.start + bytes); the rest of the chunk stays queued.
    s.owner = { op, start: c.start, length: bytes };
    if (bytes < c.length) {
      c.start += bytes;
      c.length -= bytes;
    } else {
      this.queue.shift();
    }
    return true;
  }

  /**
   * The grant for one page of a request: with persistent grants the page's lasting writable grant
   * (made on first use, kept until the link ends), else a fresh one ended after the response.
   */
  private grantFor(link: Link, frame: number, readOnly: boolean): number {
    if (link.persistent) {
      const ref = link.pgrants.get(frame);
      if (ref !== undefined) return ref;
    }
    // A persistent grant is reused by request after request: the checked hypervisor must know.
    const ref = this.d.xen.grants.grantAccess(link.backDomid, frame, readOnly && !link.persistent, { lasting: link.persistent });
    if (ref < 0) throw new BlkfrontError('EIO', `granting page ${frame} to domain ${link.backDomid} failed (${ref})`);
    this.counters.grants++;
    if (link.persistent) link.pgrants.set(frame, ref);
    return ref;
  }

  // ---- responses ----

  private onEvent(link: Link, q: Queue): void {
    if (this.link !== link || this.phase === 'broken') return;
    this.counters.notify_received++;
    const ring = q.ring;
    do {
      for (;;) {
        const r = ring.consumeResponse(q.entry);
        if (r === RING_PEER_OVERFLOW) return this.broken(`backend published rsp_prod ${ring.sring.rspProd} beyond the ${ring.size} slots after rsp_cons ${ring.rspCons}`);
        if (r !== RING_CONSUMED) break;
        const rsp = decodeResponse(q.entry.view, 0, link.abi);
        const s = q.shadow.lookup(rsp.id);
        if (s === undefined) return this.broken(`response for id ${rsp.id}, which is not pending`);
        if (rsp.operation !== s.expectOp) return this.broken(`response for id ${rsp.id} carries operation ${rsp.operation}, the request was ${s.expectOp}`);
        this.counters.responses++;
        this.complete(link, q, s, rsp.status);
        if (this.link !== link || (this.phase as Phase) === 'broken') return;
      }
    } while (ring.finalCheckForResponses() !== 0);
    this.pump();
  }

  /** One request answered: release its grants and pages, then account it to its I/O. */
  private complete(link: Link, q: Queue, s: ShadowEntry<Chunk>, status: number): void {
    const c = s.owner!;
    const op = c.op;
    const leaked = this.endGrants(link, s);
    if (leaked > 0) {
      // Linux `blkif_completion`: a grant the backend still maps after answering is a backend
      // bug. Those pages are never reused, the device stops, and this I/O fails with the rest.
      this.givePages(s);
      q.shadow.release(s);
      this.broken(`backend still maps ${leaked} page(s) of a request it answered`);
      this.finish(op, new BlkfrontError('EIO', `backend misbehaved: ${this.brokenReason}`));
      return;
    }
    if (status === BLKIF_RSP_OKAY && op.kind === 'read' && !op.failed) {
      for (let i = 0; i < s.frames.length; i++) {
        const at = c.start + i * XEN_PAGE_SIZE;
        const len = Math.min(XEN_PAGE_SIZE, c.length - i * XEN_PAGE_SIZE);
        op.buf!.set(this.pool.page(s.frames[i]!).subarray(0, len), at);
      }
    }
    this.givePages(s);
    q.shadow.release(s);
    if (status !== BLKIF_RSP_OKAY) {
      this.counters.errors++;
      if (status === BLKIF_RSP_EOPNOTSUPP && (op.kind === 'flush' || op.kind === 'discard')) {
        // Linux blkif_interrupt: the feature is gone for good once the backend says so.
        this.dropFeature(op.kind === 'discard' ? 'discard' : s.expectOp === BLKIF_OP_FLUSH_DISKCACHE ? 'flush' : 'barrier');
        if (op.kind === 'flush') return this.finish(op, undefined);
        return this.finish(op, new BlkfrontError('EOPNOTSUPP', 'the backend does not support discard'));
      }
      return this.finish(op, new BlkfrontError('EIO', `${op.kind} of ${c.length} bytes at ${op.offset + c.start}: backend answered ${status}`));
    }
    op.doneBytes += c.length;
    if (op.doneBytes >= op.length) this.finish(op, undefined);
    else this.wakeDrained();
  }

  /**
   * Ends access to the request's pages (persistent grants outlive it: nothing to end). A page
   * whose grant the backend still maps is marked -1 in its frame list, so `givePages` never
   * returns it to the pool, and counted as leaked. Returns how many there were.
   */
  private endGrants(link: Link, s: ShadowEntry<Chunk>): number {
    if (link.persistent) return 0;
    let leaked = 0;
    const end = (refs: number[], frames: number[]) => {
      for (let i = 0; i < refs.length; i++) {
        if (this.d.xen.grants.endAccess(refs[i]!)) continue;
        frames[i] = -1;
        leaked++;
      }
    };
    end(s.grefs, s.frames);
    end(s.indirectGrefs, s.indirectFrames);
    this.pool.leaked += leaked;
    return leaked;
  }

  /** Returns the request's pages to the pool, but for those `endGrants` found still mapped. */
  private givePages(s: ShadowEntry<Chunk>): void {
    for (const f of s.frames) if (f >= 0) this.pool.give(f);
    for (const f of s.indirectFrames) if (f >= 0) this.pool.give(f);
  }

  private dropFeature(f: 'flush' | 'barrier' | 'discard'): void {
    const disk = this.disk;
    if (disk === undefined) return;
    if (f === 'flush') disk.flush = false;
    else if (f === 'barrier') disk.barrier = false;
    else disk.discard = false;
    this.infoCache = undefined;
    this.log(`backend refused ${f}: not using it any more`);
  }

  private finish(op: IoOp, err: Error | undefined): void {
    if (!op.failed) {
      if (err !== undefined) {
        op.failed = true;
        op.reject(err);
      } else {
        op.doneBytes = op.length;
        op.resolve();
      }
    }
    this.wakeDrained();
  }

  /**
   * Wakes close() once nothing is queued or in flight. Not only when an I/O settles: the last
   * request of an I/O that already failed is answered (or its queued rest dropped) with no I/O
   * left to settle, and close() must not wait for one.
   */
  private wakeDrained(): void {
    if (this.drainWaiters.length > 0 && this.inFlight === 0 && this.queue.length === 0) for (const w of this.drainWaiters.splice(0)) w();
  }

  private drainWaiters: (() => void)[] = [];
  private drained(): Promise<void> {
    if (this.inFlight === 0 && this.queue.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  /** The backend broke the protocol: fail everything, stop using the ring (Linux BLKIF_STATE_ERROR). */
  private broken(why: string): void {
    if (this.phase === 'broken') return;
    this.phase = 'broken';
    this.brokenReason = why;
    this.log(`backend misbehaved, device stopped: ${why}`);
    this.failAll(new BlkfrontError('EIO', `backend misbehaved: ${why}`));
    void this.enqueue(() => this.setState(XenbusStateClosing).catch(() => undefined));
  }

  private failAll(err: Error): void {
    const ops = new Set<IoOp>();
    for (const c of this.queue) ops.add(c.op);
    this.queue = [];
    for (const q of this.link?.queues ?? []) for (const s of q.shadow.pendingEntries()) if (s.owner !== undefined) ops.add(s.owner.op);
    for (const op of ops) this.finish(op, err);
    for (const w of this.connectedWaiters.splice(0)) w.reject(err);
    for (const w of this.drainWaiters.splice(0)) w();
  }

  // ---- control path ----

  private enqueue(fn: () => Promise<void>): Promise<void> {
    const run = this.serial.then(fn).catch((e: unknown) => this.log(`xenbus: ${(e as Error).message}`));
    this.serial = run;
    return run;
  }

  private async watchBackend(): Promise<void> {
    const { xs, frontDir } = this.d;
    this.backDir = await xs.read(`${frontDir}/${XS_BACKEND}`);
    this.state = (await readState(xs, frontDir)) ?? XenbusStateInitialising;
    this.armWaitTimer();
    await xs.watch(`${this.backDir}/${XS_STATE}`, this.token, () => void this.enqueue(() => this.backendChanged()));
    // The toolstack rewrites `backend` when the disk moves to another driver domain (migration,
    // a backend restarted elsewhere): follow it.
    await xs.watch(`${frontDir}/${XS_BACKEND}`, `${this.token}-path`, () => void this.enqueue(() => this.backendMoved()));
  }

  /** Our `backend` node changed: let go of the old backend's ring and follow the new one. */
  private async backendMoved(): Promise<void> {
    if (this.phase === 'closed' || this.userClosing) return;
    const { xs, frontDir } = this.d;
    const dir = await xs.read(`${frontDir}/${XS_BACKEND}`).catch(() => undefined);
    if (dir === undefined || dir === this.backDir) return;
    this.log(`backend moved: ${this.backDir} -> ${dir}`);
    await xs.unwatch(`${this.backDir}/${XS_STATE}`, this.token).catch(() => undefined);
    // Requests the old backend never answered are kept and go to the new one.
    this.teardown();
    if (this.state !== XenbusStateClosed && this.state !== XenbusStateInitialising) await this.setState(XenbusStateClosed);
    if (this.state === XenbusStateClosed) await this.setState(XenbusStateInitialising);
    this.backDir = dir;
    await xs.watch(`${dir}/${XS_STATE}`, this.token, () => void this.enqueue(() => this.backendChanged()));
  }

  /** Linux `blkback_changed`: follow the backend's state. */
  private async backendChanged(): Promise<void> {
    if (this.phase === 'closed' || this.phase === 'broken') return;
    const bs = await readState(this.d.xs, this.backDir);
    switch (bs) {
      case XenbusStateInitWait:
      case XenbusStateInitialised:
        if (this.userClosing || this.link !== undefined) break;
        if (this.state === XenbusStateClosed) await this.setState(XenbusStateInitialising);
        await this.talkToBackend();
        break;
      case XenbusStateConnected:
        if (this.userClosing) break;
        if (this.link === undefined) {
          // Connected to a frontend that is no more (a guest restarted without closing): reset it
          // as Linux's xenbus_reset_state does — Closing, the backend closes, then start over.
          if (this.state !== XenbusStateClosing) {
            this.log('backend is already connected to an earlier frontend: resetting it');
            await this.setState(XenbusStateClosing);
          }
          break;
        }
        await this.connected();
        break;
      case XenbusStateClosing:
        if (this.link !== undefined && this.state !== XenbusStateClosing) {
          // Stop issuing; the backend answers what it consumed, unmaps, and goes Closed. One that
          // never does keeps our requests: they wait for it no longer than for a new backend.
          this.phase = 'connecting';
          this.armWaitTimer();
          await this.setState(XenbusStateClosing);
        }
        break;
      case XenbusStateClosed:
      case undefined:
        this.teardown();
        if (this.state !== XenbusStateClosed && this.state !== XenbusStateInitialising) await this.setState(XenbusStateClosed);
        // Ask for a new connection (blkif.h: a closed frontend may initialise again).
        if (!this.userClosing && bs === XenbusStateClosed) await this.setState(XenbusStateInitialising);
        break;
      default:
    }
  }

  /** Linux `talk_to_blkback`: set up the rings and channels, publish them, go Initialised. */
  private async talkToBackend(): Promise<void> {
    const { xen, xs, frontDir } = this.d;
    const backDomid = Number(await xs.read(`${frontDir}/${XS_BACKEND_ID}`));
    const t = await readBackendTransport(xs, this.backDir, this.options.maxIndirectSegments);
    const abi = abiByName(this.options.protocol)!;
    const order = Math.min(this.options.ringPageOrder, t.maxRingPageOrder);
    const nq = Math.max(1, Math.min(this.options.queues, t.maxQueues));
    const persistent = this.options.persistent && t.persistent;
    // The pool must hold one largest request; fall back to a smaller maximum otherwise.
    let maxSegments = t.maxIndirectSegments > 0 ? t.maxIndirectSegments : BLKIF_MAX_SEGMENTS_PER_REQUEST;
    // (Its usable part: pages an earlier backend kept mapped are gone.)
    while (maxSegments > BLKIF_MAX_SEGMENTS_PER_REQUEST && maxSegments + indirectPagesFor(maxSegments) > this.pool.usable) maxSegments >>= 1;
    maxSegments = Math.max(maxSegments, BLKIF_MAX_SEGMENTS_PER_REQUEST);
    const link: Link = {
      backDomid, backDir: this.backDir, abi, ringPageOrder: order, maxSegments,
      indirect: maxSegments > BLKIF_MAX_SEGMENTS_PER_REQUEST, persistent, pgrants: new Map(), queues: [], next: 0,
    };
    this.link = link;
    for (let i = 0; i < nq; i++) {
      const ringFrames = xen.memory.alloc(1 << order);
      const ring = FrontRing.init(new SharedRing(ringFrames.map((f) => xen.memory.page(f)), abi.entrySize));
      const ringRefs = grantRing(xen, backDomid, ringFrames);
      const port = allocEvtchn(xen, backDomid);
      const q: Queue = {
        index: i, ring, ringFrames, ringRefs, port, offEvent: () => undefined,
        shadow: new ShadowTable(ring.size), entry: new RingEntry(abi.entrySize),
      };
      q.offEvent = xen.events.on(port, () => this.onEvent(link, q));
      link.queues.push(q);
    }
    await xs.transaction(async (tx) => {
      const rm = (key: string) => xs.rm(`${frontDir}/${key}`, tx).catch(() => undefined);
      // Nodes of an earlier connection with another shape must not linger.
      for (const key of [XS_RING_REF, XS_EVENT_CHANNEL, XS_RING_PAGE_ORDER, XS_MULTI_QUEUE_NUM_QUEUES]) await rm(key);
      for (let i = 0; i < 1 << MAX_RING_PAGE_ORDER; i++) await rm(xsRingRefN(i));
      for (let i = 0; i < 64; i++) await rm(xsQueueDir(i));
      if (order > 0) await xs.write(`${frontDir}/${XS_RING_PAGE_ORDER}`, String(order), tx);
      if (nq > 1) await xs.write(`${frontDir}/${XS_MULTI_QUEUE_NUM_QUEUES}`, String(nq), tx);
      for (const q of link.queues) {
        // One queue: top-level nodes; several: under queue-N (blkif.h "Multi-queue").
        const dir = nq === 1 ? frontDir : `${frontDir}/${xsQueueDir(q.index)}`;
        if (order === 0) await xs.write(`${dir}/${XS_RING_REF}`, String(q.ringRefs[0]), tx);
        else for (let i = 0; i < q.ringRefs.length; i++) await xs.write(`${dir}/${xsRingRefN(i)}`, String(q.ringRefs[i]), tx);
        await xs.write(`${dir}/${XS_EVENT_CHANNEL}`, String(q.port), tx);
      }
      await xs.write(`${frontDir}/${XS_PROTOCOL}`, abi.protocol, tx);
      await xs.write(`${frontDir}/${XS_FEATURE_PERSISTENT}`, this.options.persistent ? '1' : '0', tx);
    });
    await this.setState(XenbusStateInitialised);
  }

  /** Linux `blkfront_connect`: read the disk, go Connected, issue what waited; later calls are resizes. */
  private async connected(): Promise<void> {
    const fresh = this.state !== XenbusStateConnected;
    const disk = await readDiskInfo(this.d.xs, this.backDir);
    if (!fresh && this.disk !== undefined) {
      if (disk.sectors !== this.disk.sectors) this.log(`resized: ${this.disk.sectors} -> ${disk.sectors} sectors`);
      this.disk.sectors = disk.sectors;
      this.infoCache = undefined;
      return;
    }
    this.disk = disk;
    this.infoCache = undefined;
    await this.setState(XenbusStateConnected);
    this.phase = 'connected';
    clearTimeout(this.waitTimer);
    this.waitTimer = undefined;
    const l = this.link!;
    this.log(`connected to ${this.backDir}: ${l.abi.protocol}, ${l.queues.length} queue(s) of ${l.queues[0]!.ring.size} slots, ` +
      `${l.indirect ? `indirect ${l.maxSegments}` : 'no indirect'} segments, ${l.persistent ? 'persistent grants' : 'grant per request'}, ${disk.sectors} sectors of ${disk.sectorSize}`);
    for (const w of this.connectedWaiters.splice(0)) w.resolve();
    clearInterval(this.purgeTimer);
    if (l.persistent && this.options.purgeIntervalMs > 0) {
      this.purgeTimer = setInterval(() => this.purgePersistentGrants(), this.options.purgeIntervalMs);
      this.purgeTimer.unref();
    }
    this.pump();
  }

  /**
   * Lets go of the ring. Requests the backend never answered go back to the head of the queue, to
   * be issued again (re-split under the new limits) once a backend connects (Linux `blkif_recover`),
   * or failed by close() or the wait timer.
   */
  private teardown(): void {
    const link = this.link;
    if (link === undefined) return;
    this.link = undefined;
    clearInterval(this.purgeTimer);
    this.purgeTimer = undefined;
    if (this.phase === 'connected') this.phase = 'connecting';
    const again: Chunk[] = [];
    const held: HeldRequest[] = [];
    let ringLeaked = 0;
    for (const q of link.queues) {
      q.offEvent();
      this.d.xen.events.close(q.port);
      for (const s of q.shadow.pendingEntries()) {
        const c = s.owner;
        // Pages a backend still maps are never reused; the I/O itself is kept either way.
        this.endGrants(link, s);
        this.givePages(s);
        q.shadow.release(s);
        if (c !== undefined && !c.op.failed) {
          again.push(c);
          held.push({ queue: q.index, id: BigInt(s.index), operation: s.expectOp, sector: BigInt((c.op.offset + c.start) / 512), bytes: c.length });
        }
      }
      let leaked = 0;
      for (const ref of q.ringRefs) if (!this.d.xen.grants.endAccess(ref)) leaked++;
      if (leaked === 0) this.d.xen.memory.free(q.ringFrames);
      ringLeaked += leaked;
    }
    if (ringLeaked > 0) this.log(`backend still maps the ring: ${ringLeaked} page(s) not reused`);
    // Persistent grants end with the link; a page the backend still maps is never reused.
    for (const [frame, ref] of link.pgrants) {
      if (this.d.xen.grants.endAccess(ref)) continue;
      this.pool.retire(frame);
      this.pool.leaked++;
    }
    link.pgrants.clear();
    if (again.length > 0) {
      this.counters.reissued += again.length;
      this.queue.unshift(...again);
    }
    if (held.length > 0) this.d.onReissue?.(held);
    // Closing: no backend will come for them.
    if (this.userClosing) this.failAll(new BlkfrontError('ESHUTDOWN', 'device closed while its backend went away'));
    else this.armWaitTimer();
  }

  /** Queued I/O may wait for a backend only so long. */
  private armWaitTimer(): void {
    clearTimeout(this.waitTimer);
    this.waitTimer = setTimeout(() => {
      this.waitTimer = undefined;
      if (this.phase === 'connected' || this.phase === 'closed') return;
      const err = new BlkfrontError('ETIMEDOUT', `no backend connected at ${this.backDir} within ${this.options.connectTimeoutMs} ms (backend ${this.backDir} state ${xenbusStateName(this.state)})`);
      this.failAll(err);
    }, this.options.connectTimeoutMs);
    this.waitTimer.unref();
  }

  private whenConnected(): Promise<void> {
    if (this.phase === 'connected') return Promise.resolve();
    return new Promise((resolve, reject) => this.connectedWaiters.push({ resolve, reject }));
  }

  private async setState(s: XenbusState): Promise<void> {
    await switchState(this.d.xs, this.d.frontDir, 'frontend', s);
    this.state = s;
  }

  private log(msg: string): void {
    this.d.log?.(`blkfront ${this.d.frontDir}: ${msg}`);
  }
}

