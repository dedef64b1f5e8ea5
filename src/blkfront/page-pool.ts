/**
 * Guest pages the frontend lends to the backend for data and indirect descriptors, allocated once
 * from the domain's memory and reused: no allocation per request. The pool size bounds the bytes
 * in flight.
 */
import type { XenDomain } from '../xen/index.js';

export class PagePool {
  private readonly free: number[];
  private readonly views = new Map<number, Uint8Array>();
  private readonly dataViews = new Map<number, DataView>();
  readonly frames: readonly number[];
  /**
   * Pages whose grant a backend still mapped when it was to end, by frame: out of use until the
   * grant can be ended (`retryStuck`), as Linux defers a gnttab_end_foreign_access it cannot do
   * yet. `pooled`: one of the pool's pages (else a ring page, the domain's once set free).
   */
  private readonly stuck = new Map<number, { readonly ref: number; readonly pooled: boolean }>();

  constructor(private readonly xen: XenDomain, count: number) {
    this.frames = xen.memory.alloc(count);
    this.free = [...this.frames];
    for (const f of this.frames) {
      const page = xen.memory.page(f);
      this.views.set(f, page);
      this.dataViews.set(f, new DataView(page.buffer, page.byteOffset, page.byteLength));
    }
  }

  get available(): number {
    return this.free.length;
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
      if (s.pooled) this.free.push(frame);
      else this.xen.memory.free([frame]);
      n++;
    }
    return n;
  }

  /** Frames that can still carry I/O: all but the leaked ones (free now or back once answered). */
  get usable(): number {
    return this.frames.length - this.leaked;
  }

  /** Takes `n` frames into `out`; the caller checked `available`. */
  take(n: number, out: number[]): void {
    for (let i = 0; i < n; i++) out.push(this.free.pop()!);
  }

  give(frame: number): void {
    this.free.push(frame);
  }

  /** Takes a frame out of use for good (the backend kept it mapped). */
  retire(frame: number): void {
    const i = this.free.lastIndexOf(frame);
    if (i >= 0) this.free.splice(i, 1);
  }

  page(frame: number): Uint8Array {
    return this.views.get(frame)!;
  }

  view(frame: number): DataView {
    return this.dataViews.get(frame)!;
  }

  /** Returns every frame that is not leaked to the domain's allocator. */
  dispose(): void {
    this.xen.memory.free(this.free.splice(0));
  }
}
