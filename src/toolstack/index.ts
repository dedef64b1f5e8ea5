// The toolstack layer's front door: what other layers (and their tests) use; the rest is internal.
export { createVbdNodes, removeVbdNodes, type VbdPaths } from './vbd.js';
export { BACKEND_BASE_PAGES, BACKEND_COPY_PAGES, DomainProxy, GuestDisk, Toolstack, type PlugOptions, type ToolstackOptions } from './toolstack.js';
export type { BackendVbdStatus } from './backend-domain.js';
export type { GuestApplicationModule, GuestContext } from './guest-application.js';
