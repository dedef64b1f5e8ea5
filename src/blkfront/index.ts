// The blkfront layer's front door: what other layers (and their tests) use; the rest is internal.
export { DEFAULT_BLKFRONT_OPTIONS, type BlkfrontOptions } from './options.js';
export type { DiskInfo } from './negotiate.js';
export { ShadowTable } from './shadow.js';
export { Blkfront, BlkfrontError, type BlkfrontCounters, type BlkfrontDeps, type DeviceInfo, type HeldRequest } from './blkfront.js';
export { zeroByDiscard, zeroRange, type ZeroableDisk } from './zero-range.js';
