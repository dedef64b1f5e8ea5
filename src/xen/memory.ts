// Domain memory. Each 4 KiB page is its own SharedArrayBuffer, so a view handed out by a
// grant map exposes exactly the granted page (even through `.buffer`), never its neighbours.
// A domain's `memoryPages` bound its frames (Xen's `memory=`), but a page exists only once the
// domain allocates it: its own thread creates pages in batches (GROW_BATCH) as alloc needs them
// (a PV guest's balloon grows into its maximum the same way, a page costing nothing until
// populated). Every other thread's hypervisor code learns a domain's pages through a private
// control port that it drains synchronously (receiveMessageOnPort), so a map needs no round
// trip: the main thread relays each new batch to every port that knows the domain before the
// owner may use (and so grant) a page of it.
import { receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { XEN_PAGE_SIZE } from './constants.js';

/** A domain's pages by frame number; a frame not created yet is a hole. */
export type Pages = readonly (SharedArrayBuffer | undefined)[];

/** Pages a domain's thread creates at once when it needs more (1 MiB): growth stays rare. */
export const GROW_BATCH = 256;

/** Control messages from the main thread's hypervisor to the hypervisor code in a domain thread. */
export type ControlMessage =
  | { readonly t: 'mem'; readonly domid: number; readonly pages: Pages }
  | { readonly t: 'grow'; readonly domid: number; readonly first: number; readonly pages: readonly SharedArrayBuffer[] }
  | { readonly t: 'gone'; readonly domid: number };

/**
 * Makes new pages known (to the hypervisor, and through it to every thread that maps from this
 * domain) before the owner uses them: frames first .. first + pages.length - 1. Returns once they
 * are known; throws if they cannot be (the domain is going).
 */
export type GrowHook = (first: number, pages: readonly SharedArrayBuffer[]) => void;

/** Writes `pages` into `into` at `first` (a frame is created once, so repeating it changes nothing). */
export function placePages(into: (SharedArrayBuffer | undefined)[], first: number, pages: readonly SharedArrayBuffer[]): void {
  for (let i = 0; i < pages.length; i++) into[first + i] = pages[i];
}

/** Per-thread registry of every domain's pages; private to the hypervisor layer. */
export class MemoryRegistry {
  private readonly byDomid = new Map<number, (SharedArrayBuffer | undefined)[]>();
  private readonly control: MessagePort | undefined;

  /** The arrays are kept (not copied): a domain's allocator and this registry share its own. */
  constructor(initial: Iterable<readonly [number, (SharedArrayBuffer | undefined)[]]>, control?: MessagePort) {
    for (const [domid, pages] of initial) this.byDomid.set(domid, pages);
    this.control = control;
  }

  add(domid: number, pages: (SharedArrayBuffer | undefined)[]): void { this.byDomid.set(domid, pages); }
  remove(domid: number): void { this.byDomid.delete(domid); }

  /** A domain's page array as this thread knows it (shared, not copied), or undefined. */
  pagesOf(domid: number): (SharedArrayBuffer | undefined)[] | undefined { return this.byDomid.get(domid); }

  /** The SharedArrayBuffer of a domain's frame, or undefined. */
  page(domid: number, frame: number): SharedArrayBuffer | undefined {
    const page = this.byDomid.get(domid)?.[frame];
    if (page !== undefined) return page;
    // A domain or a batch of pages this thread has not heard of yet: its news is on the port.
    this.drain();
    return this.byDomid.get(domid)?.[frame];
  }

  /** Applies pending control messages; the main thread posts them before a domid or a page is visible. */
  drain(): void {
    if (this.control === undefined) return;
    for (;;) {
      const m = receiveMessageOnPort(this.control);
      if (m === undefined) return;
      const msg = m.message as ControlMessage;
      if (msg.t === 'mem') this.byDomid.set(msg.domid, [...msg.pages]);
      else if (msg.t === 'grow') {
        const pages = this.byDomid.get(msg.domid);
        if (pages !== undefined) placePages(pages, msg.first, msg.pages);
      } else this.byDomid.delete(msg.domid);
    }
  }
}

/** `used` values: free (and dirty), allocated here, not this thread's to allocate (a vCPU's view), free and never written. */
const FREE = 0;
const ALLOCATED = 1;
const ELSEWHERE = 2;
const CLEAN = 3;

const isFree = (u: number): boolean => u === FREE || u === CLEAN;

/**
 * A domain's page allocator over its own frames (0 .. memoryPages-1), thread-local. The
 * domain's own thread (vCPU 0) allocates from all of them, creating pages as it first needs
 * them (`grow`: the hook makes them known to every thread first); a vCPU thread it starts
 * allocates only from the frames it was lent (startVcpu `frames`), which vCPU 0 keeps allocated
 * meanwhile. Frames are addressed by number; `page(frame)` is a 4096-byte view.
 */
export class DomainMemory {
  readonly pageSize = XEN_PAGE_SIZE;
  /** Shared with this thread's registry: a page created here is found by a map of it here. */
  private readonly pages: (SharedArrayBuffer | undefined)[];
  private readonly used: Uint8Array;
  /** Grants per frame, so a granted frame cannot be freed under its grantee. */
  private readonly grantCount: Uint16Array;
  private hint = 0;
  private inUse = 0;
  private readonly usable: number;
  /** Frames 0 .. created-1 have a page (all of a vCPU's lent ones: it never grows). */
  private created: number;
  private readonly growHook: GrowHook | undefined;

  /**
   * `pages`: the domain's pages known so far, shared with the registry (vCPU 0: those its
   * domain created; a vCPU: its lent frames). `limit`: the domain's memoryPages (vCPU 0).
   */
  constructor(pages: (SharedArrayBuffer | undefined)[], opts: { limit?: number; lent?: readonly number[]; grow?: GrowHook } = {}) {
    this.pages = pages;
    const { lent } = opts;
    if (lent !== undefined) {
      this.used = new Uint8Array(pages.length).fill(ELSEWHERE);
      for (const f of lent) if (Number.isInteger(f) && f >= 0 && f < pages.length && pages[f] !== undefined) this.used[f] = FREE;
      this.usable = this.used.reduce((n, u) => n + (u === FREE ? 1 : 0), 0);
      this.created = pages.length;
    } else {
      const limit = opts.limit ?? pages.length;
      if (!Number.isInteger(limit) || limit < 0) throw new RangeError(`bad memory size ${limit}`);
      this.used = new Uint8Array(limit).fill(CLEAN);
      this.usable = limit;
      this.created = 0;
      while (this.created < limit && pages[this.created] !== undefined) this.created++;
    }
    this.grantCount = new Uint16Array(this.used.length);
    this.growHook = lent === undefined ? opts.grow : undefined;
  }

  /** Frames this allocator manages (the domain's, or those lent to this vCPU). */
  get totalPages(): number { return this.usable; }
  /** Frames not allocated. */
  get freePages(): number { return this.usable - this.inUse; }
  /** Frames that have a page (a vCPU: the frames it can see): what the domain's memory costs. */
  get createdPages(): number { return this.created; }

  /**
   * Creates pages for frames created .. created+n-1 and makes them known before any is used.
   * A vCPU's allocator (lent frames only) never grows.
   */
  private grow(want: number): void {
    const n = Math.min(Math.max(want, GROW_BATCH), this.used.length - this.created);
    if (n <= 0) return;
    const first = this.created;
    const fresh: SharedArrayBuffer[] = [];
    for (let i = 0; i < n; i++) fresh.push(new SharedArrayBuffer(XEN_PAGE_SIZE));
    placePages(this.pages, first, fresh);
    this.growHook?.(first, fresh);
    this.created += n;
  }

  /**
   * Allocates `count` frames. With `contiguous`, the frames are consecutive numbers
   * (each still its own page: there is no single view spanning them). Throws if out of memory.
   */
  alloc(count = 1, opts: { contiguous?: boolean } = {}): number[] {
    if (!Number.isInteger(count) || count < 1) throw new RangeError(`bad page count ${count}`);
    if (count > this.freePages) throw new Error(`out of memory: ${count} pages wanted, ${this.freePages} free`);
    const out: number[] = [];
    if (opts.contiguous === true) {
      if (!this.findRun(count, out)) {
        // The free run at the end of what exists goes on into the frames not created yet.
        let tail = 0;
        while (tail < this.created && isFree(this.used[this.created - 1 - tail]!)) tail++;
        this.grow(count - tail);
        if (!this.findRun(count, out)) throw new Error(`no ${count} contiguous free pages`);
      }
    } else {
      const freeCreated = this.created - this.inUse - this.notMine();
      if (count > freeCreated) this.grow(count - freeCreated);
      const n = this.created;
      for (let i = 0, f = this.hint % n; out.length < count && i < n; i++, f = (f + 1) % n) {
        if (isFree(this.used[f]!)) out.push(f);
      }
    }
    for (const f of out) {
      // Fresh pages are zeroed, as Xen scrubs them; a page never written needs no scrub (and
      // is not touched, so it costs no resident memory until used).
      if (this.used[f] === FREE) new Uint8Array(this.pages[f]!).fill(0);
      this.used[f] = ALLOCATED;
    }
    this.inUse += out.length;
    this.hint = (out[out.length - 1]! + 1) % this.created;
    return out;
  }

  /** Frames among those created that are not this allocator's (a vCPU's view of its domain). */
  private notMine(): number { return this.created - this.usable > 0 ? this.created - this.usable : 0; }

  private findRun(count: number, out: number[]): boolean {
    let run = 0;
    for (let f = 0; f < this.created; f++) {
      run = isFree(this.used[f]!) ? run + 1 : 0;
      if (run === count) {
        for (let g = f - count + 1; g <= f; g++) out.push(g);
        return true;
      }
    }
    return false;
  }

  /**
   * Allocates up to `count` frames: as many as are left when fewer are (pools that grow as the
   * load asks take what the domain still has, then grow no further); none once the domain is going.
   */
  allocUpTo(count: number): number[] {
    const n = Math.min(count, this.freePages);
    if (n <= 0) return [];
    try {
      return this.alloc(n);
    } catch {
      return []; // the domain is going: no memory to add
    }
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
    return Number.isInteger(frame) && frame >= 0 && frame < this.used.length && this.used[frame] === ALLOCATED;
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
