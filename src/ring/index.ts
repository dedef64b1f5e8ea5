export * from './shared-ring.js';
export * from './front-ring.js';
export * from './back-ring.js';
