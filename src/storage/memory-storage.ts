/**
 * A disk in memory, sparse in 1 MiB chunks allocated on first write, so a large memory disk costs
 * nothing until written. Same rules as a file: whole sectors, range checked, read-only enforced.
 */
import { checkRange, totalLength } from './range.js';
import { StorageError, type BlockStorage } from './storage.js';

const CHUNK = 1024 * 1024;

export class MemoryStorage implements BlockStorage {
  size: number;
  readonly sectorSize: number;
  readonly readOnly: boolean;
  readonly canDiscard = true;
  private readonly chunks = new Map<number, Uint8Array>();

  constructor(size: number, opts: { sectorSize?: 512 | 4096; readOnly?: boolean } = {}) {
    this.sectorSize = opts.sectorSize ?? 512;
    if (!Number.isSafeInteger(size) || size < 0) throw new StorageError('EINVAL', `memory disk size ${size}`);
    this.size = size - (size % this.sectorSize);
    this.readOnly = opts.readOnly === true;
  }

  async read(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    checkRange(offset, totalLength(buffers), this.size, this.sectorSize);
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
    checkRange(offset, totalLength(buffers), this.size, this.sectorSize);
    let pos = offset;
    for (const b of buffers) {
      this.each(pos, b.length, (_c, at, n, done, index) => this.chunk(index).set(b.subarray(done, done + n), at));
      pos += b.length;
    }
  }

  async flush(): Promise<void> {}

  async discard(offset: number, length: number): Promise<void> {
    this.writable();
    checkRange(offset, length, this.size, this.sectorSize);
    this.each(offset, length, (chunk, at, n, _d, index) => {
      if (chunk === undefined) return;
      if (n === CHUNK) this.chunks.delete(index);
      else chunk.fill(0, at, at + n);
    });
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    return this.discard(offset, length);
  }

  async refreshSize(): Promise<number> {
    return this.size;
  }

  /** Grows (or shrinks) the disk, for tests of online resize. */
  resize(size: number): void {
    this.size = size - (size % this.sectorSize);
    for (const k of this.chunks.keys()) if (k * CHUNK >= this.size) this.chunks.delete(k);
  }

  async close(): Promise<void> {
    this.chunks.clear();
  }

  /** Bytes held in memory (chunks written). */
  get allocated(): number {
    return this.chunks.size * CHUNK;
  }

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

  private writable(): void {
    if (this.readOnly) throw new StorageError('EROFS', 'memory disk is read-only');
  }
}
