/**
 * How the toolstack names a VBD's storage to the backend domain: plain data, so it crosses into
 * the domain's thread; the backend opens it there.
 */
import { FileStorage, MemoryStorage, type BlockStorage } from '../storage/index.js';

export type StorageSpec =
  | { readonly kind: 'file'; readonly path: string; readonly readOnly?: boolean; readonly sectorSize?: 512 | 4096; readonly io?: 'sync' | 'async' }
  | { readonly kind: 'memory'; readonly size: number; readonly readOnly?: boolean; readonly sectorSize?: 512 | 4096 };

export function describeStorage(s: StorageSpec): string {
  return s.kind === 'file' ? s.path : `memory:${s.size}`;
}

export async function openStorage(s: StorageSpec): Promise<BlockStorage> {
  if (s.kind === 'file') return FileStorage.open(s.path, { readOnly: s.readOnly, sectorSize: s.sectorSize, io: s.io });
  return new MemoryStorage(s.size, { sectorSize: s.sectorSize, readOnly: s.readOnly });
}
