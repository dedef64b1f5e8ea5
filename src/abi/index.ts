export * from './constants.js';
export * from './layout.js';
export * from './segment.js';
export * from './request.js';
export * from './response.js';
export * from './json.js';
export * from './xenstore-keys.js';
export * from './negotiation.js';
