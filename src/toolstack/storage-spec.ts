/**
 * How the toolstack names a VBD's storage to the backend domain: plain data, so it crosses into
 * the domain's thread; the backend opens it there.
 */
import { FileStorage, MemoryStorage, NbdStorage, type BlockStorage } from '../storage/index.js';

export type StorageSpec =
  | { readonly kind: 'file'; readonly path: string; readonly readOnly?: boolean; readonly sectorSize?: 512 | 4096; readonly io?: 'sync' | 'async' }
  | { readonly kind: 'memory'; readonly size: number; readonly readOnly?: boolean; readonly sectorSize?: 512 | 4096 }
  /** An export of a remote NBD server: `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`. */
  | { readonly kind: 'nbd'; readonly uri: string; readonly readOnly?: boolean; readonly sectorSize?: 512 | 4096; readonly connections?: number };

export function describeStorage(s: StorageSpec): string {
  if (s.kind === 'file') return s.path;
  if (s.kind === 'nbd') return s.uri;
  return `memory:${s.size}`;
}

export async function openStorage(s: StorageSpec, log?: (msg: string) => void): Promise<BlockStorage> {
  if (s.kind === 'file') return FileStorage.open(s.path, { readOnly: s.readOnly, sectorSize: s.sectorSize, io: s.io });
  if (s.kind === 'nbd') return NbdStorage.connect(s.uri, { readOnly: s.readOnly, sectorSize: s.sectorSize, connections: s.connections, log });
  return new MemoryStorage(s.size, { sectorSize: s.sectorSize, readOnly: s.readOnly });
}
