export * from './state.js';
export * from './paths.js';
export * from './xenbus.js';
export * from './xenstore-link.js';
export * from './device.js';
export * from './periodic.js';
