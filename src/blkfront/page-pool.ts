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
  /** Frames the backend never let go of (grant still mapped): never reused, never freed. */
  leaked = 0;

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
