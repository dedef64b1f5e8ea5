// The blkback layer's front door: what other layers (and their tests) use; the rest is internal.
export { DEFAULT_BLKBACK_OPTIONS, XEN_BLKIF_REQS_PER_PAGE, type BlkbackOptions } from './options.js';
export { VBD_COUNTER_NAMES, newVbdCounters, sharedVbdCounters, sumVbdCounters, type VbdCounters } from './counters.js';
export { classifyRequest, dataProblem, isRejection, type VbdLimits } from './validate.js';
export { DataPath } from './data-path.js';
export { Blkback, type BlkbackDeps } from './xenbus.js';
