export * from './options.js';
export * from './counters.js';
export * from './validate.js';
export * from './data-path.js';
export * from './xenbus.js';
export * from './queue.js';
export { QueueThread } from './queue-thread.js';
