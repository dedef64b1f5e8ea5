export * from './storage.js';
export * from './file-storage.js';
export * from './memory-storage.js';
export * from './nbd-storage.js';
export * from './registry.js';
