export * from './disk-export.js';
export * from './nbd-device.js';
export * from './sizing.js';
export * from './migration.js';
export * from './images.js';
