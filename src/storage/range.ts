/** The one range check every storage driver applies before touching a byte. */
import { StorageError } from './storage.js';

/** Throws EINVAL unless [offset, offset+length) is whole sectors inside `size`. */
export function checkRange(offset: number, length: number, size: number, sectorSize: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new StorageError('EINVAL', `offset ${offset} length ${length}: not non-negative integers`);
  }
  if (offset % sectorSize !== 0 || length % sectorSize !== 0) {
    throw new StorageError('EINVAL', `offset ${offset} length ${length}: not aligned to ${sectorSize}-byte sectors`);
  }
  if (offset + length > size) throw new StorageError('EINVAL', `bytes ${offset}..${offset + length} beyond the end (${size})`);
}

export function totalLength(buffers: readonly Uint8Array[]): number {
  let n = 0;
  for (const b of buffers) n += b.length;
  return n;
}
