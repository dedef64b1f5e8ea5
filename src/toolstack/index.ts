export * from './rpc.js';
export * from './storage-spec.js';
export * from './vbd.js';
export * from './toolstack.js';
export type { BackendVbdStatus } from './backend-domain.js';
