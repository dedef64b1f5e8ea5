/**
 * A disk in memory, sparse in 1 MiB chunks allocated on first write, so a large memory disk costs
 * nothing until written. Same rules as a file: whole sectors, range checked, read-only enforced.
 */
import { checkRange, totalLength } from './range.js';
import { StorageError, type BlockStorage, type StorageKind, type StorageSpecBase } from './storage.js';

/** Allocation unit: a multiple of 4096, so a sector never straddles two chunks. */
const CHUNK = 1024 * 1024;

export interface MemoryStorageOptions {
  readonly sectorSize?: 512 | 4096;
  readonly readOnly?: boolean;
  /** What to report as the physical sector size (tests of `physical-sector-size`); default the sector size. */
  readonly physicalSectorSize?: number;
}

export class MemoryStorage implements BlockStorage {
  readonly sectorSize: number;
  readonly physicalSectorSize: number;
  readonly readOnly: boolean;
  readonly canDiscard = true;
  private currentSize = 0;
  private closed = false;
  private readonly chunks = new Map<number, Uint8Array>();

  constructor(size: number, opts: MemoryStorageOptions = {}) {
    const ss = opts.sectorSize ?? 512;
    if (ss !== 512 && ss !== 4096) throw new StorageError('EINVAL', `sector size ${String(ss)}: use 512 or 4096`);
    this.sectorSize = ss;
    const pss = opts.physicalSectorSize ?? ss;
    if (!Number.isInteger(pss) || pss < ss || pss % ss !== 0 || (pss & (pss - 1)) !== 0) {
      throw new StorageError('EINVAL', `physical sector size ${pss}: a power of two, a multiple of the ${ss}-byte sector`);
    }
    this.physicalSectorSize = pss;
    this.readOnly = opts.readOnly === true;
    this.currentSize = this.wholeSectors(size);
  }

  /** Usable bytes, whole sectors only. */
  get size(): number {
    return this.currentSize;
  }

  /** Bytes held in memory (chunks written and not since discarded). */
  get allocated(): number {
    return this.chunks.size * CHUNK;
  }

  async read(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    this.open();
    checkRange(offset, totalLength(buffers), this.currentSize, this.sectorSize);
    let pos = offset;
    for (const b of buffers) {
      this.each(pos, b.length, (chunk, at, n, done) => {
        if (chunk === undefined) b.fill(0, done, done + n);
        else b.set(chunk.subarray(at, at + n), done);
      });
      pos += b.length;
    }
  }

  async write(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    this.writable();
    checkRange(offset, totalLength(buffers), this.currentSize, this.sectorSize);
    let pos = offset;
    for (const b of buffers) {
      this.each(pos, b.length, (_c, at, n, done, index) => this.chunk(index).set(b.subarray(done, done + n), at));
      pos += b.length;
    }
  }

  async flush(): Promise<void> {
    this.open();
  }

  /** Frees every chunk the range wholly covers (up to the disk's end) and zeroes the rest. */
  async discard(offset: number, length: number): Promise<void> {
    this.writable();
    checkRange(offset, length, this.currentSize, this.sectorSize);
    this.each(offset, length, (chunk, at, n, _d, index) => {
      if (chunk === undefined) return;
      // The last chunk may reach past the end of the disk: covering its in-disk part is enough.
      const inDisk = Math.min(CHUNK, this.currentSize - index * CHUNK);
      if (at === 0 && n >= inDisk) this.chunks.delete(index);
      else chunk.fill(0, at, at + n);
    });
  }

  /** In memory, dropping a range leaves nothing behind: the same as discard. */
  writeZeroes(offset: number, length: number): Promise<void> {
    return this.discard(offset, length);
  }

  async refreshSize(): Promise<number> {
    this.open();
    return this.currentSize;
  }

  /**
   * Grows or shrinks the disk (rounded down to whole sectors), for tests of online resize. Bytes cut
   * off are gone: growing again exposes zeroes, as truncating and re-extending a file would.
   */
  resize(size: number): void {
    this.open();
    this.currentSize = this.wholeSectors(size);
    for (const [index, chunk] of this.chunks) {
      const start = index * CHUNK;
      if (start >= this.currentSize) this.chunks.delete(index);
      else if (start + CHUNK > this.currentSize) chunk.fill(0, this.currentSize - start);
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    this.chunks.clear();
  }

  private wholeSectors(size: number): number {
    if (!Number.isSafeInteger(size) || size < 0) throw new StorageError('EINVAL', `memory disk size ${size}: must be a non-negative integer`);
    return size - (size % this.sectorSize);
  }

  /** Calls `fn` once per chunk the range touches: offset `at` in it, `n` bytes, `done` bytes before. */
  private each(offset: number, length: number, fn: (chunk: Uint8Array | undefined, at: number, n: number, done: number, index: number) => void): void {
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / CHUNK);
      const at = pos % CHUNK;
      const n = Math.min(CHUNK - at, length - done);
      fn(this.chunks.get(index), at, n, done, index);
      done += n;
    }
  }

  private chunk(index: number): Uint8Array {
    let c = this.chunks.get(index);
    if (c === undefined) this.chunks.set(index, (c = new Uint8Array(CHUNK)));
    return c;
  }

  private open(): void {
    if (this.closed) throw new StorageError('EIO', 'memory disk is closed');
  }

  private writable(): void {
    this.open();
    if (this.readOnly) throw new StorageError('EROFS', 'memory disk is read-only');
  }
}

/** A disk in memory, gone with its handle. */
export interface MemoryStorageSpec extends StorageSpecBase {
  readonly kind: 'memory';
  readonly size: number;
}

export const memoryStorageKind: StorageKind<MemoryStorageSpec> = {
  kind: 'memory',
  open: async (s) => new MemoryStorage(s.size, { sectorSize: s.sectorSize, readOnly: s.readOnly }),
  describe: (s) => `memory:${s.size}`,
  // Each handle is a disk of its own: a second one would not see the first one's writes.
  shareable: () => false,
};
