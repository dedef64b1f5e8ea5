// The storage layer's front door: what other layers (and their tests) use; the rest is internal.
export { StorageError, type BlockStorage } from './storage.js';
export { FileStorage } from './file-storage.js';
export { MemoryStorage } from './memory-storage.js';
export { NbdStorage } from './nbd-storage.js';
export { describeStorage, openStorage, storageFromArgument, storageKinds, storageShareable, type StorageKindName, type StorageSpec } from './registry.js';
