/**
 * Every kind of storage blkback can serve from, in one place: how a spec of that kind is opened,
 * named, recognised among `blkif serve`'s IMAGE arguments, and whether queue threads may each
 * open a handle of their own. A new kind is a file exporting its spec type and its StorageKind,
 * plus its line below; the storage contract tests run over every kind listed here.
 */
import { fileStorageKind } from './file-storage.js';
import { memoryStorageKind } from './memory-storage.js';
import { nbdStorageKind } from './nbd-storage.js';
import type { BlockStorage, StorageArgumentOptions, StorageKind } from './storage.js';

/** The registered kinds. */
export const storageKinds = [
  fileStorageKind,
  memoryStorageKind,
  nbdStorageKind,
] as const;

type SpecOf<K> = K extends StorageKind<infer S> ? S : never;

/** A store of any registered kind, as plain data (it crosses into threads): a union on `kind`. */
export type StorageSpec = SpecOf<(typeof storageKinds)[number]>;
export type StorageKindName = StorageSpec['kind'];

const byName = new Map<string, StorageKind<StorageSpec>>();
for (const k of storageKinds) {
  if (byName.has(k.kind)) throw new Error(`storage kind ${k.kind} is registered twice`);
  byName.set(k.kind, k);
}

/** The kind of a spec. */
export function storageKind(spec: StorageSpec): StorageKind<StorageSpec> {
  const k = byName.get(spec.kind);
  // Only a spec built around the types (e.g. from JSON) can name no kind.
  if (k === undefined) throw new Error(`no storage kind ${JSON.stringify((spec as { kind: unknown }).kind)}`);
  return k;
}

export function openStorage(spec: StorageSpec, log?: (msg: string) => void): Promise<BlockStorage> {
  return storageKind(spec).open(spec, log);
}

export function describeStorage(spec: StorageSpec): string {
  return storageKind(spec).describe(spec);
}

/** Whether queue threads may each open `spec` again beside `storage` (the handle opened on it). */
export function storageShareable(spec: StorageSpec, storage: BlockStorage): boolean {
  return storageKind(spec).shareable(storage);
}

/** The spec for a `blkif serve` IMAGE argument: the first kind that recognises it, else undefined. */
export function storageFromArgument(arg: string, o: StorageArgumentOptions): StorageSpec | undefined {
  for (const k of storageKinds) {
    const spec = k.fromArgument?.(arg, o);
    if (spec !== undefined) return spec;
  }
  return undefined;
}
