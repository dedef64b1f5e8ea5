export * from './rpc.js';
export * from './vbd.js';
export * from './toolstack.js';
export type { BackendVbdStatus } from './backend-domain.js';
export type { GuestApplicationModule, GuestContext } from './guest-application.js';
