// Domain memory. Each 4 KiB page is its own SharedArrayBuffer, so a view handed out by a
// grant map exposes exactly the granted page (even through `.buffer`), never its neighbours.
// The hypervisor creates a domain's pages at domain creation (Xen's `memory=` is fixed too)
// and every thread's hypervisor code learns them through a private control port that it
// drains synchronously (receiveMessageOnPort), so a map needs no round trip.
import { receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { XEN_PAGE_SIZE } from './constants.js';

export type Pages = readonly SharedArrayBuffer[];

/** Control messages from the main thread's hypervisor to the hypervisor code in a domain thread. */
export type ControlMessage =
  | { readonly t: 'mem'; readonly domid: number; readonly pages: Pages }
  | { readonly t: 'gone'; readonly domid: number };

export function createPages(count: number): SharedArrayBuffer[] {
  const pages: SharedArrayBuffer[] = [];
  for (let i = 0; i < count; i++) pages.push(new SharedArrayBuffer(XEN_PAGE_SIZE));
  return pages;
}

/** Per-thread registry of every domain's pages; private to the hypervisor layer. */
export class MemoryRegistry {
  private readonly byDomid = new Map<number, Pages>();
  private readonly control: MessagePort | undefined;

  constructor(initial: Iterable<readonly [number, Pages]>, control?: MessagePort) {
    for (const [domid, pages] of initial) this.byDomid.set(domid, pages);
    this.control = control;
  }

  add(domid: number, pages: Pages): void { this.byDomid.set(domid, pages); }
  remove(domid: number): void { this.byDomid.delete(domid); }

  /** The SharedArrayBuffer of a domain's frame, or undefined. */
  page(domid: number, frame: number): SharedArrayBuffer | undefined {
    let pages = this.byDomid.get(domid);
    if (pages === undefined) {
      this.drain();
      pages = this.byDomid.get(domid);
    }
    return pages?.[frame];
  }

  /** Applies pending control messages; the main thread posts them before a new domid is visible. */
  drain(): void {
    if (this.control === undefined) return;
    for (;;) {
      const m = receiveMessageOnPort(this.control);
      if (m === undefined) return;
      const msg = m.message as ControlMessage;
      if (msg.t === 'mem') this.byDomid.set(msg.domid, msg.pages);
      else this.byDomid.delete(msg.domid);
    }
  }
}

/** `used` values: free, allocated here, or not this thread's to allocate (a vCPU's view). */
const FREE = 0;
const ALLOCATED = 1;
const ELSEWHERE = 2;

/**
 * A domain's page allocator over its own frames (0 .. memoryPages-1), thread-local. The
 * domain's own thread (vCPU 0) allocates from all of them; a vCPU thread it starts allocates
 * only from the frames it was lent (startVcpu `frames`), which vCPU 0 keeps allocated meanwhile.
 * Frames are addressed by number; `page(frame)` is a 4096-byte view.
 */
export class DomainMemory {
  readonly pageSize = XEN_PAGE_SIZE;
  private readonly pages: Pages;
  private readonly used: Uint8Array;
  /** Grants per frame, so a granted frame cannot be freed under its grantee. */
  private readonly grantCount: Uint16Array;
  private hint = 0;
  private inUse = 0;
  private readonly usable: number;

  constructor(pages: Pages, lent?: readonly number[]) {
    this.pages = pages;
    this.used = new Uint8Array(pages.length);
    this.grantCount = new Uint16Array(pages.length);
    this.usable = pages.length;
    if (lent !== undefined) {
      this.used.fill(ELSEWHERE);
      for (const f of lent) if (Number.isInteger(f) && f >= 0 && f < pages.length) this.used[f] = FREE;
      this.usable = this.used.reduce((n, u) => n + (u === FREE ? 1 : 0), 0);
    }
  }

  /** Frames this allocator manages (the domain's, or those lent to this vCPU). */
  get totalPages(): number { return this.usable; }
  /** Frames not allocated. */
  get freePages(): number { return this.usable - this.inUse; }

  /**
   * Allocates `count` frames. With `contiguous`, the frames are consecutive numbers
   * (each still its own page: there is no single view spanning them). Throws if out of memory.
   */
  alloc(count = 1, opts: { contiguous?: boolean } = {}): number[] {
    if (!Number.isInteger(count) || count < 1) throw new RangeError(`bad page count ${count}`);
    if (count > this.freePages) throw new Error(`out of memory: ${count} pages wanted, ${this.freePages} free`);
    const n = this.pages.length;
    const out: number[] = [];
    if (opts.contiguous === true) {
      let run = 0;
      for (let f = 0; f < n; f++) {
        run = this.used[f] === FREE ? run + 1 : 0;
        if (run === count) {
          for (let g = f - count + 1; g <= f; g++) out.push(g);
          break;
        }
      }
      if (out.length === 0) throw new Error(`no ${count} contiguous free pages`);
    } else {
      for (let i = 0, f = this.hint; out.length < count && i < n; i++, f = (f + 1) % n) {
        if (this.used[f] === FREE) out.push(f);
      }
    }
    for (const f of out) {
      this.used[f] = ALLOCATED;
      new Uint8Array(this.pages[f]!).fill(0); // fresh pages are zeroed, as Xen scrubs them
    }
    this.inUse += out.length;
    this.hint = (out[out.length - 1]! + 1) % n;
    return out;
  }

  /** Checked mode: told of a frame freed while granted (the free is refused either way). */
  private onGrantedFree: ((frame: number) => void) | undefined;

  /** Frees frames; a frame still granted cannot be freed (its grantee may map it). */
  free(frames: readonly number[]): void {
    for (const f of frames) {
      if (!this.owns(f)) throw new Error(`frame ${f} is not allocated`);
      if (this.grantCount[f]! > 0) {
        this.onGrantedFree?.(f);
        throw new Error(`frame ${f} is still granted`);
      }
    }
    for (const f of frames) {
      this.used[f] = FREE;
      this.inUse--;
    }
  }

  owns(frame: number): boolean {
    return Number.isInteger(frame) && frame >= 0 && frame < this.pages.length && this.used[frame] === ALLOCATED;
  }

  /** The 4096-byte view of one of the domain's own allocated frames. */
  page(frame: number): Uint8Array {
    if (!this.owns(frame)) throw new Error(`frame ${frame} is not allocated`);
    return new Uint8Array(this.pages[frame]!);
  }

  /** @internal the checked mode's hook (domain.ts). */
  _onGrantedFree(cb: (frame: number) => void): void { this.onGrantedFree = cb; }
  /** @internal grant-table bookkeeping. */
  _granted(frame: number, delta: 1 | -1): void { this.grantCount[frame] = this.grantCount[frame]! + delta; }
  /** @internal raw page for the hypervisor layer (no allocation check). */
  _raw(frame: number): SharedArrayBuffer | undefined { return this.pages[frame]; }
}
