/**
 * How the data path reaches the frontend's granted pages. Three ways, one interface, so the
 * pipeline reads the same whichever is negotiated or chosen:
 * - `MapPerRequest`: GNTTABOP_map_grant_ref for each request, unmap after (Linux blkback without
 *   persistent grants): zero-copy, two grant operations per page per request.
 * - `PersistentMaps`: the frontend reuses its grants (`feature-persistent`); mappings stay in a
 *   cache bounded by `maxPersistentGrants` and purged of idle entries (Linux `persistent_gnts`,
 *   LRU_INTERVAL / LRU_PERCENT_CLEAN); a page in use is never purged.
 * - `GrantCopy`: GNTTABOP_copy between the frontend's grants and local bounce pages (QEMU's
 *   xen-block): one copy per page, no mapping at all.
 */
import {
  BLKIF_SEGMENT_SIZE,
  BLKIF_SEGS_PER_INDIRECT_FRAME,
  SECTOR_SHIFT,
  XEN_PAGE_SIZE,
  decodeSegment,
  type BlkifSegment,
} from '../abi/index.js';
import {
  DOMID_SELF, GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTMAP_host_map, GNTMAP_readonly, GNTST_okay,
  type GntCopyOp, type GntMapOp, type XenAccess,
} from '../xen/index.js';
import type { VbdCounters } from './counters.js';

/** Views ready for storage I/O, one per segment, and what to undo afterwards. */
export interface Acquired {
  readonly buffers: Uint8Array[];
  /** Opaque to the pipeline: handles, cache entries or bounce frames. */
  readonly hold: unknown;
}

export interface PageAccess {
  /**
   * Makes the segments' bytes reachable. `toDisk`: storage will write them out (the frontend's
   * data), else storage fills them. Resolves to the views, or a problem string.
   */
  acquire(segs: readonly BlkifSegment[], toDisk: boolean): Acquired | string | Promise<Acquired | string>;
  /** After storage I/O (`ok` if it succeeded): copies data out where needed, lets go of the pages. */
  release(a: Acquired, toDisk: boolean, ok: boolean): string | undefined;
  /** Copies an indirect request's segments out of its granted pages (read once, validated later). */
  readIndirect(grefs: readonly number[], count: number): BlkifSegment[] | string;
  /** Periodic housekeeping (persistent-grant purge). */
  tick(now: number): void;
  /** Disconnect: nothing is in flight any more; let go of everything. */
  clear(): void;
}

interface Deps {
  readonly xen: XenAccess;
  readonly frontDomid: number;
  readonly counters: VbdCounters;
}

/** Sectors in a page: a segment covering them all is the page itself. */
const PAGE_SECTORS = XEN_PAGE_SIZE >> SECTOR_SHIFT;

function segmentView(page: Uint8Array, s: BlkifSegment): Uint8Array {
  if (s.first_sect === 0 && s.last_sect === PAGE_SECTORS - 1 && page.byteLength === XEN_PAGE_SIZE) return page;
  return page.subarray(s.first_sect << SECTOR_SHIFT, (s.last_sect + 1) << SECTOR_SHIFT);
}

function parseIndirect(pages: readonly Uint8Array[], count: number): BlkifSegment[] {
  const segs: BlkifSegment[] = new Array(count);
  let view: DataView | undefined;
  for (let j = 0; j < count; j++) {
    const k = j % BLKIF_SEGS_PER_INDIRECT_FRAME;
    if (k === 0) {
      const page = pages[j / BLKIF_SEGS_PER_INDIRECT_FRAME]!;
      view = new DataView(page.buffer, page.byteOffset, page.byteLength);
    }
    segs[j] = decodeSegment(view!, k * BLKIF_SEGMENT_SIZE);
  }
  return segs;
}

/** Maps a batch; on any failure unmaps the rest and returns the problem. */
function mapBatch(d: Deps, grefs: readonly number[], readOnly: boolean): { pages: Uint8Array[]; handles: number[] } | string {
  const flags = GNTMAP_host_map | (readOnly ? GNTMAP_readonly : 0);
  const ops: GntMapOp[] = grefs.map((ref) => ({ dom: d.frontDomid, ref, flags }));
  const res = d.xen.grants.map(ops);
  const handles: number[] = [];
  const pages: Uint8Array[] = [];
  let problem: string | undefined;
  for (let i = 0; i < res.length; i++) {
    const r = res[i]!;
    if (r.status !== GNTST_okay) {
      problem ??= `gref ${grefs[i]} does not map: ${r.status}`;
      continue;
    }
    handles.push(r.handle);
    pages.push(r.page!);
  }
  d.counters.grant_map_ops += handles.length;
  if (problem !== undefined) {
    unmapBatch(d, handles);
    return problem;
  }
  return { pages, handles };
}

function unmapBatch(d: Deps, handles: readonly number[]): void {
  if (handles.length === 0) return;
  d.counters.grant_unmap_ops += handles.length;
  d.xen.grants.unmap(handles);
}

export class MapPerRequest implements PageAccess {
  constructor(private readonly d: Deps) {}

  acquire(segs: readonly BlkifSegment[], toDisk: boolean): Acquired | string {
    // Read-only when storage only reads the page (the frontend granted it read-only).
    const m = mapBatch(this.d, segs.map((s) => s.gref), toDisk);
    if (typeof m === 'string') return m;
    return { buffers: m.pages.map((p, i) => segmentView(p, segs[i]!)), hold: m.handles };
  }

  release(a: Acquired): undefined {
    unmapBatch(this.d, a.hold as number[]);
    return undefined;
  }

  readIndirect(grefs: readonly number[], count: number): BlkifSegment[] | string {
    const m = mapBatch(this.d, grefs, true);
    if (typeof m === 'string') return `indirect page: ${m}`;
    try {
      return parseIndirect(m.pages, count);
    } finally {
      unmapBatch(this.d, m.handles);
    }
  }

  tick(): void {}
  clear(): void {}
}

interface CachedGrant {
  readonly gref: number;
  readonly handle: number;
  readonly page: Uint8Array;
  inUse: number;
  lastUsed: number;
}

export interface PersistentOptions {
  /** Linux `max_persistent_grants` (1056). */
  readonly max: number;
  /** Linux `persistent_grant_unused_seconds` (60 s): idle entries are purged after this. */
  readonly idleMs: number;
}

/** Share of the cache purged when it is full (Linux LRU_PERCENT_CLEAN). */
const PURGE_PERCENT = 5;

export class PersistentMaps implements PageAccess {
  private readonly cache = new Map<number, CachedGrant>();

  constructor(private readonly d: Deps, private readonly o: PersistentOptions) {}

  get size(): number {
    return this.cache.size;
  }

  acquire(segs: readonly BlkifSegment[]): Acquired | string {
    const now = performance.now();
    const entries: (CachedGrant | undefined)[] = new Array(segs.length);
    const missing: number[] = [];
    for (let i = 0; i < segs.length; i++) {
      const e = this.cache.get(segs[i]!.gref);
      if (e !== undefined) {
        e.inUse++;
        e.lastUsed = now;
        entries[i] = e;
      } else missing.push(i);
    }
    // Persistent grants are mapped writable (the frontend grants them so): one mapping serves
    // reads and writes alike. Past the bound, the rest are mapped for this request only.
    const temp: number[] = [];
    if (missing.length > 0) {
      const m = mapBatch(this.d, missing.map((i) => segs[i]!.gref), false);
      if (typeof m === 'string') {
        for (const e of entries) if (e !== undefined) e.inUse--;
        return m;
      }
      for (let k = 0; k < missing.length; k++) {
        const i = missing[k]!;
        const gref = segs[i]!.gref;
        const dup = this.cache.get(gref);
        if (dup !== undefined || this.cache.size >= this.o.max) {
          // Same gref twice in one request, or the cache is full: keep this mapping temporary.
          temp.push(m.handles[k]!);
          entries[i] = { gref, handle: m.handles[k]!, page: m.pages[k]!, inUse: 1, lastUsed: now };
          continue;
        }
        const e: CachedGrant = { gref, handle: m.handles[k]!, page: m.pages[k]!, inUse: 1, lastUsed: now };
        this.cache.set(gref, e);
        entries[i] = e;
        // Counted per VBD, over all its queues' caches.
        const c = this.d.counters;
        if (++c.persistent_grants > c.persistent_grants_peak) c.persistent_grants_peak = c.persistent_grants;
      }
    }
    return { buffers: entries.map((e, i) => segmentView(e!.page, segs[i]!)), hold: { entries, temp } };
  }

  release(a: Acquired): undefined {
    const { entries, temp } = a.hold as { entries: CachedGrant[]; temp: number[] };
    for (const e of entries) e.inUse--;
    unmapBatch(this.d, temp);
    return undefined;
  }

  readIndirect(grefs: readonly number[], count: number): BlkifSegment[] | string {
    const segs = grefs.map((gref) => ({ gref, first_sect: 0, last_sect: 7 }));
    const a = this.acquire(segs);
    if (typeof a === 'string') return `indirect page: ${a}`;
    try {
      return parseIndirect(a.buffers, count);
    } finally {
      this.release(a);
    }
  }

  /** Purges entries idle past `idleMs`; when full, also the least recently used 5% not in use. */
  tick(now: number): void {
    const victims: CachedGrant[] = [];
    for (const e of this.cache.values()) if (e.inUse === 0 && now - e.lastUsed > this.o.idleMs) victims.push(e);
    if (this.cache.size - victims.length >= this.o.max) {
      const idle = [...this.cache.values()].filter((e) => e.inUse === 0 && !victims.includes(e)).sort((a, b) => a.lastUsed - b.lastUsed);
      victims.push(...idle.slice(0, Math.max(1, Math.floor((this.o.max * PURGE_PERCENT) / 100))));
    }
    this.evict(victims);
  }

  clear(): void {
    this.evict([...this.cache.values()]);
  }

  private evict(victims: readonly CachedGrant[]): void {
    if (victims.length === 0) return;
    for (const e of victims) this.cache.delete(e.gref);
    unmapBatch(this.d, victims.map((e) => e.handle));
    this.d.counters.persistent_grants -= victims.length;
    this.d.counters.persistent_purged += victims.length;
  }
}

/** Pages a lazy bounce pool takes from the domain at once when it needs more. */
export const BOUNCE_CHUNK = 64;

/**
 * Local pages for grant copy, taken per request and given back; waiters queue in order. Given
 * a `capacity`, the pool takes the domain's pages as the load first needs them (BOUNCE_CHUNK at
 * a time, up to it), so a VBD copying little holds few; given only frames, it has those.
 */
export class BouncePool {
  private readonly free: number[];
  private readonly owned: number[];
  private waiters: { n: number; resolve: (frames: number[]) => void }[] = [];
  /** The most pages the pool holds: its capacity, or fewer once the domain ran out of memory. */
  private limit: number;
  constructor(private readonly xen: XenAccess, frames: readonly number[], capacity = frames.length) {
    this.owned = [...frames];
    this.free = [...frames];
    this.limit = Math.max(capacity, frames.length);
  }
  /** Every page the pool holds now. */
  get frames(): readonly number[] {
    return this.owned;
  }
  take(n: number): number[] | Promise<number[]> {
    if (this.waiters.length === 0 && this.free.length < n) this.grow(n - this.free.length);
    if (n > this.limit) throw new Error(`a request of ${n} pages exceeds the ${this.limit}-page bounce pool`);
    if (this.waiters.length === 0 && this.free.length >= n) return this.free.splice(this.free.length - n, n);
    return new Promise((resolve) => this.waiters.push({ n, resolve }));
  }
  private grow(short: number): void {
    const want = Math.min(this.limit - this.owned.length, Math.max(short, BOUNCE_CHUNK));
    if (want <= 0) return;
    // Out of the domain's memory: take what is left, and grow no further.
    const got = this.xen.memory.allocUpTo(want);
    if (got.length < want) this.limit = this.owned.length + got.length;
    this.owned.push(...got);
    this.free.push(...got);
  }
  give(frames: readonly number[]): void {
    this.free.push(...frames);
    while (this.waiters.length > 0 && this.free.length >= this.waiters[0]!.n) {
      const w = this.waiters.shift()!;
      w.resolve(this.free.splice(this.free.length - w.n, w.n));
    }
  }
  page(frame: number): Uint8Array {
    return this.xen.memory.page(frame);
  }
  dispose(): void {
    this.xen.memory.free(this.owned.splice(0));
    this.free.length = 0;
  }
}

export class GrantCopy implements PageAccess {
  /** The VBD's bounce pages, shared by its queues (one pool bounds the bytes being copied). */
  constructor(private readonly d: Deps, private readonly pool: BouncePool) {}

  async acquire(segs: readonly BlkifSegment[], toDisk: boolean): Promise<Acquired | string> {
    const frames = await this.pool.take(segs.length);
    const buffers = frames.map((f, i) => segmentView(this.pool.page(f), segs[i]!));
    if (toDisk) {
      // The frontend's data into our pages, before storage writes them.
      const why = this.copy(segs, frames, true);
      if (why !== undefined) {
        this.pool.give(frames);
        return why;
      }
    }
    return { buffers, hold: { frames, segs } };
  }

  release(a: Acquired, toDisk: boolean, ok: boolean): string | undefined {
    const { frames, segs } = a.hold as { frames: number[]; segs: readonly BlkifSegment[] };
    try {
      // What storage read, out to the frontend's pages.
      if (!toDisk && ok) return this.copy(segs, frames, false);
      return undefined;
    } finally {
      this.pool.give(frames);
    }
  }

  readIndirect(grefs: readonly number[], count: number): BlkifSegment[] | string {
    // Copied synchronously into dedicated pages: an indirect page never waits for the pool.
    const frames = this.d.xen.memory.alloc(grefs.length);
    try {
      const segs = grefs.map((gref) => ({ gref, first_sect: 0, last_sect: 7 }));
      const why = this.copy(segs, frames, true);
      if (why !== undefined) return `indirect page: ${why}`;
      return parseIndirect(frames.map((f) => this.d.xen.memory.page(f)), count);
    } finally {
      this.d.xen.memory.free(frames);
    }
  }

  tick(): void {}

  /** The pool belongs to the connection, which disposes of it. */
  clear(): void {}

  /** GNTTABOP_copy of each segment's bytes; `fromFront`: frontend grant -> local page, else back. */
  private copy(segs: readonly BlkifSegment[], frames: readonly number[], fromFront: boolean): string | undefined {
    const ops: GntCopyOp[] = segs.map((s, i) => {
      const offset = s.first_sect << SECTOR_SHIFT;
      const len = (s.last_sect - s.first_sect + 1) << SECTOR_SHIFT;
      const front = { ref: s.gref, domid: this.d.frontDomid, offset };
      const local = { gmfn: frames[i]!, domid: DOMID_SELF, offset };
      return fromFront
        ? { source: front, dest: local, len, flags: GNTCOPY_source_gref }
        : { source: local, dest: front, len, flags: GNTCOPY_dest_gref };
    });
    const st = this.d.xen.grants.copy(ops);
    this.d.counters.grant_copy_ops += ops.length;
    const bad = st.findIndex((s) => s !== GNTST_okay);
    return bad < 0 ? undefined : `grant copy of seg[${bad}] (gref ${segs[bad]!.gref}) failed: ${st[bad]}`;
  }
}

