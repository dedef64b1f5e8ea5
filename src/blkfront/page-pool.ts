/**
 * Guest pages the frontend lends to the backend for data and indirect descriptors, taken from
 * the domain's memory as the load first needs them (GROW_CHUNK at a time, up to the pool size)
 * and reused, never given back before close: no allocation per request once warm. The pool size
 * bounds the bytes in flight; an idle or lightly used disk holds few pages.
 */
import type { XenAccess } from '../xen/index.js';

/** Pages the pool takes from the domain at once when it needs more. */
export const GROW_CHUNK = 64;

export class PagePool {
  private readonly free: number[] = [];
  /**
   * Views by frame number (dense arrays: a lookup per page of every request; a Map's hashing
   * showed in the profiles of 1 MiB requests). Holes are filled in order, so that the arrays
   * stay fast however high the pool's first frame.
   */
  private readonly views: (Uint8Array | undefined)[] = [];
  private readonly dataViews: (DataView | undefined)[] = [];
  private readonly owned: number[] = [];
  /** The most pages the pool holds: its size, or fewer once the domain ran out of memory. */
  private limit: number;
  /**
   * Pages whose grant a backend still mapped when it was to end, by frame: out of use until the
   * grant can be ended (`retryStuck`), as Linux defers a gnttab_end_foreign_access it cannot do
   * yet. `pooled`: one of the pool's pages (else a ring page, the domain's once set free).
   */
  private readonly stuck = new Map<number, { readonly ref: number; readonly pooled: boolean }>();
  /**
   * Pages a finished read lent to its caller (Blkfront.readPages), by frame: neither free nor on
   * a request until the caller gives them back (`giveBack`).
   */
  private readonly onLoan: number[] = [];
  private disposed = false;

  constructor(private readonly xen: XenAccess, count: number) {
    if (!Number.isInteger(count) || count < 1) throw new RangeError(`pool of ${count} pages`);
    this.limit = count;
  }

  /** Every frame the pool holds now (free, lent to a request or stuck). */
  get frames(): readonly number[] {
    return this.owned;
  }

  /** Frames free to take now (`reserve` first makes room for a request). */
  get available(): number {
    return this.free.length;
  }

  /**
   * Makes `n` frames free if the pool may still grow to that (chunks of GROW_CHUNK, up to its
   * size): none is allocated while enough are free. If the domain has no more memory, the pool
   * stops growing where it is (`usable` then says so). Returns `available >= n`.
   */
  reserve(n: number): boolean {
    const short = n - this.free.length;
    if (short <= 0) return true;
    const room = this.limit - this.owned.length;
    if (room <= 0) return false;
    const want = Math.min(room, Math.max(short, GROW_CHUNK));
    // Out of the domain's memory: take what is left, and grow no further.
    const got = this.xen.memory.allocUpTo(want);
    if (got.length < want) this.limit = this.owned.length + got.length;
    for (const f of got) {
      const page = this.xen.memory.page(f);
      while (this.views.length <= f) {
        this.views.push(undefined);
        this.dataViews.push(undefined);
        this.onLoan.push(0);
      }
      this.views[f] = page;
      this.dataViews[f] = new DataView(page.buffer, page.byteOffset, page.byteLength);
      this.owned.push(f);
      this.free.push(f);
    }
    return this.free.length >= n;
  }

  /** The frames not lent to a request now. */
  freeFrames(): readonly number[] {
    return this.free;
  }

  /** Pool pages a backend still maps: not reused while it does. */
  get leaked(): number {
    let n = 0;
    for (const s of this.stuck.values()) if (s.pooled) n++;
    return n;
  }

  /** A page whose grant `ref` a backend still maps: out of use until `retryStuck` ends it. */
  stick(frame: number, ref: number, pooled = true): void {
    if (pooled) this.retire(frame);
    this.stuck.set(frame, { ref, pooled });
  }

  /**
   * Tries again to end every stuck grant (the backend may have unmapped, or its domain gone): a
   * pool page comes back to the pool, a ring page to the domain. Returns how many came back.
   */
  retryStuck(): number {
    let n = 0;
    for (const [frame, s] of this.stuck) {
      if (!this.xen.grants.endAccess(s.ref)) continue;
      this.stuck.delete(frame);
      // A page on loan comes back with giveBack.
      if (s.pooled) { if (this.onLoan[frame] !== 1) this.free.push(frame); }
      else this.xen.memory.free([frame]);
      n++;
    }
    return n;
  }

  /**
   * Frames that can still carry I/O: the pool's size (held now or still to take) but the leaked
   * ones (free now or back once answered).
   */
  get usable(): number {
    return this.limit - this.leaked;
  }

  /** Takes `n` frames into `out`; the caller checked `available`. */
  take(n: number, out: number[]): void {
    for (let i = 0; i < n; i++) out.push(this.free.pop()!);
  }

  give(frame: number): void {
    this.free.push(frame);
  }

  /** Lends an answered read's page to the I/O's caller (out of the pool until `giveBack`). */
  lend(frame: number): void {
    this.onLoan[frame] = 1;
  }

  /**
   * A lent page comes back: free again, unless its grant could not be ended meanwhile (it waits
   * in the stuck list, as any page a backend still maps) or the pool was disposed (the page goes
   * back to the domain).
   */
  giveBack(frame: number): void {
    if (this.onLoan[frame] !== 1) return;
    this.onLoan[frame] = 0;
    if (this.stuck.size > 0 && this.stuck.has(frame)) return;
    if (!this.disposed) {
      this.free.push(frame);
      return;
    }
    this.views[frame] = undefined;
    this.dataViews[frame] = undefined;
    const i = this.owned.indexOf(frame);
    if (i >= 0) this.owned.splice(i, 1);
    this.xen.memory.free([frame]);
  }

  /** Takes a frame out of use for good (the backend kept it mapped). */
  retire(frame: number): void {
    const i = this.free.lastIndexOf(frame);
    if (i >= 0) this.free.splice(i, 1);
  }

  page(frame: number): Uint8Array {
    return this.views[frame]!;
  }

  view(frame: number): DataView {
    return this.dataViews[frame]!;
  }

  /** Returns every frame that is not leaked to the domain's allocator (a lent one once given back). */
  dispose(): void {
    this.disposed = true;
    const back = new Set(this.free.splice(0));
    this.xen.memory.free([...back]);
    const kept = this.owned.filter((f) => !back.has(f));
    for (const f of back) {
      this.views[f] = undefined;
      this.dataViews[f] = undefined;
    }
    this.owned.splice(0, this.owned.length, ...kept);
  }
}
