export * from './options.js';
export * from './negotiate.js';
export * from './shadow.js';
export * from './page-pool.js';
export * from './blkfront.js';
export * from './zero-range.js';
