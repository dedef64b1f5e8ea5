export * from './rpc.js';
export * from './vbd.js';
export * from './toolstack.js';
export type { BackendVbdStatus } from './backend-domain.js';
export type { GuestExportSpec } from './guest-domain.js';
