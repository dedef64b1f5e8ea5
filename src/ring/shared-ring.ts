/**
 * `struct *_sring` of Xen's io/ring.h over shared memory: a 64-byte header (`req_prod`,
 * `req_event`, `rsp_prod`, `rsp_event`, `pvt`, `__pad`) followed by a power-of-two number of
 * fixed-size entries, spread over 1, 2, 4, 8 or 16 pages (ring page order 0..4).
 *
 * The pages need not be contiguous: a backend maps `ring-ref0..N-1` one by one, and an entry may
 * straddle a page boundary (ring.h treats the ring as one virtually contiguous area). Entries
 * are copied in and out word by word (every slot offset is 4-aligned: 64 + k * entrySize with
 * entrySize a multiple of 4), so nothing is allocated per entry. Header indexes are read and
 * published with `Atomics`, which orders the entry bytes around them for the other thread
 * (ring.h's wmb()/rmb()/mb()).
 *
 * This layer knows nothing of blkif: entry size is a parameter, as with DEFINE_RING_TYPES (only
 * the largest order, which both ends negotiate, comes from abi/negotiation.ts).
 */
import { MAX_RING_PAGE_ORDER } from '../abi/negotiation.js';

export const XEN_PAGE_SIZE = 4096;
/** Offsets in the shared header (identical on every ABI). */
export const SRING_REQ_PROD = 0;
export const SRING_REQ_EVENT = 4;
export const SRING_RSP_PROD = 8;
export const SRING_RSP_EVENT = 12;
/** Entries start after `pvt` and `__pad[44]`: 64 bytes of header. */
export const SRING_HEADER_SIZE = 64;
/** Largest ring page order we speak: the negotiation's limit (abi/negotiation.ts). */
export { MAX_RING_PAGE_ORDER };

/**
 * `__CONST_RING_SIZE`: the largest power of two of entries that fit after the header.
 * 32 << order for blkif on both ABIs.
 */
export function ringSizeFor(bytes: number, entrySize: number): number {
  const fit = Math.floor((bytes - SRING_HEADER_SIZE) / entrySize);
  if (fit < 1) return 0;
  return 2 ** Math.floor(Math.log2(fit));
}

/** What consuming one entry found (`FrontRing.consumeResponse`, `BackRing.consumeRequest`). */
export const RING_EMPTY = 0;
export const RING_CONSUMED = 1;
/** The peer claimed more entries than the ring can hold (RING_*_PROD_OVERFLOW). */
export const RING_PEER_OVERFLOW = -1;
export type ConsumeResult = typeof RING_EMPTY | typeof RING_CONSUMED | typeof RING_PEER_OVERFLOW;

/** Views of the first `count` 4 KiB pages of `bytes`, in order (no copy). */
export function splitPages(bytes: Uint8Array, count: number): Uint8Array[] {
  const pages: Uint8Array[] = [];
  for (let i = 0; i < count; i++) pages.push(bytes.subarray(i * XEN_PAGE_SIZE, (i + 1) * XEN_PAGE_SIZE));
  return pages;
}

/** A private buffer holding one ring entry, with the views codecs and the ring copy need. */
export class RingEntry {
  readonly bytes: Uint8Array;
  readonly view: DataView;
  readonly words: Int32Array;
  constructor(readonly size: number) {
    if (size % 4 !== 0 || size <= 0) throw new RangeError(`entry size ${size} must be a positive multiple of 4`);
    const buf = new ArrayBuffer(size);
    this.bytes = new Uint8Array(buf);
    this.view = new DataView(buf);
    this.words = new Int32Array(buf);
  }
}

export class SharedRing {
  /** `RING_SIZE`: number of entries. */
  readonly size: number;
  readonly order: number;
  private readonly mask: number;
  private readonly header: Int32Array;
  private readonly pageWords: Int32Array[];
  private readonly entryWords: number;

  /**
   * @param pages the ring's pages in `ring-ref` order, each 4096 bytes over a SharedArrayBuffer
   *   (or any ArrayBuffer for single-thread use), 4-aligned.
   * @param entrySize sizeof the ring's entry union (112 for x86_64 blkif, 108 for x86_32).
   */
  constructor(
    readonly pages: readonly Uint8Array[],
    readonly entrySize: number,
  ) {
    const n = pages.length;
    if (n < 1 || n > 1 << MAX_RING_PAGE_ORDER || (n & (n - 1)) !== 0) {
      throw new RangeError(`a ring has 1, 2, 4, 8 or 16 pages, not ${n}`);
    }
    if (entrySize % 4 !== 0 || entrySize < 4) throw new RangeError(`entry size ${entrySize} must be a multiple of 4`);
    this.pageWords = pages.map((p, i) => {
      if (p.byteLength !== XEN_PAGE_SIZE || p.byteOffset % 4 !== 0) {
        throw new RangeError(`ring page ${i} must be 4096 bytes at a 4-aligned offset`);
      }
      return new Int32Array(p.buffer, p.byteOffset, XEN_PAGE_SIZE / 4);
    });
    this.order = Math.log2(n);
    this.size = ringSizeFor(n * XEN_PAGE_SIZE, entrySize);
    if (this.size < 1) throw new RangeError(`entry size ${entrySize} leaves no room for an entry`);
    this.mask = this.size - 1;
    this.header = this.pageWords[0]!;
    this.entryWords = entrySize / 4;
  }

  /** A ring over fresh, contiguous shared memory of `1 << order` pages. */
  static allocate(order: number, entrySize: number): SharedRing {
    if (!Number.isInteger(order) || order < 0 || order > MAX_RING_PAGE_ORDER) {
      throw new RangeError(`ring page order must be 0..${MAX_RING_PAGE_ORDER}, not ${order}`);
    }
    return new SharedRing(splitPages(new Uint8Array(new SharedArrayBuffer(XEN_PAGE_SIZE << order)), 1 << order), entrySize);
  }

  /** `SHARED_RING_INIT`: only the frontend does this (decisions.md: only the frontend initialises the ring); entries are untouched. */
  init(): void {
    for (let i = 0; i < SRING_HEADER_SIZE / 4; i++) Atomics.store(this.header, i, 0);
    Atomics.store(this.header, SRING_REQ_EVENT / 4, 1);
    Atomics.store(this.header, SRING_RSP_EVENT / 4, 1);
  }

  get reqProd(): number {
    return Atomics.load(this.header, SRING_REQ_PROD / 4) >>> 0;
  }
  set reqProd(v: number) {
    Atomics.store(this.header, SRING_REQ_PROD / 4, v | 0);
  }
  get reqEvent(): number {
    return Atomics.load(this.header, SRING_REQ_EVENT / 4) >>> 0;
  }
  set reqEvent(v: number) {
    Atomics.store(this.header, SRING_REQ_EVENT / 4, v | 0);
  }
  get rspProd(): number {
    return Atomics.load(this.header, SRING_RSP_PROD / 4) >>> 0;
  }
  set rspProd(v: number) {
    Atomics.store(this.header, SRING_RSP_PROD / 4, v | 0);
  }
  get rspEvent(): number {
    return Atomics.load(this.header, SRING_RSP_EVENT / 4) >>> 0;
  }
  set rspEvent(v: number) {
    Atomics.store(this.header, SRING_RSP_EVENT / 4, v | 0);
  }

  /** Byte offset of the slot of free-running index `idx` (ring.h: `idx & (RING_SIZE - 1)`). */
  slotOffset(idx: number): number {
    return SRING_HEADER_SIZE + ((idx & this.mask) >>> 0) * this.entrySize;
  }

  /** Copies the slot of `idx` out of shared memory into `dst` (RING_COPY_REQUEST/RESPONSE). */
  copyOut(idx: number, dst: RingEntry): void {
    const w = dst.words;
    const base = this.slotOffset(idx);
    const n = this.entryWords;
    const page = base >>> 12;
    const start = (base & (XEN_PAGE_SIZE - 1)) >>> 2;
    if (start + n <= XEN_PAGE_SIZE / 4) {
      const src = this.pageWords[page]!;
      for (let i = 0; i < n; i++) w[i] = src[start + i]!;
      return;
    }
    for (let i = 0; i < n; i++) {
      const off = base + 4 * i; // a straddling entry continues at the start of the next page
      w[i] = this.pageWords[off >>> 12]![(off & (XEN_PAGE_SIZE - 1)) >>> 2]!;
    }
  }

  /** Copies `src` into the slot of `idx` (before the producer publishes its index). */
  copyIn(idx: number, src: RingEntry): void {
    const w = src.words;
    const base = this.slotOffset(idx);
    const n = this.entryWords;
    const page = base >>> 12;
    const start = (base & (XEN_PAGE_SIZE - 1)) >>> 2;
    if (start + n <= XEN_PAGE_SIZE / 4) {
      const dst = this.pageWords[page]!;
      for (let i = 0; i < n; i++) dst[start + i] = w[i]!;
      return;
    }
    for (let i = 0; i < n; i++) {
      const off = base + 4 * i;
      this.pageWords[off >>> 12]![(off & (XEN_PAGE_SIZE - 1)) >>> 2] = w[i]!;
    }
  }
}
