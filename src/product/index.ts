export * from './disk-export.js';
export * from './nbd-device.js';
