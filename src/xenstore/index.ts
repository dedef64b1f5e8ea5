// Public surface of the xenstore layer.
export * from './wire.js';
export * from './codec.js';
export { XenstoreError } from './errors.js';
export { type XsPermission, type PermLetter, formatPermission, parsePermission } from './permissions.js';
export { DEFAULT_QUOTAS, type XenstoreQuotas, type QuotaErrorStyle } from './quota.js';
export { canonicalize, domainPath } from './paths.js';
export { XenstoreDaemon, ServerConnection, type XenstoreDaemonOptions, type ConnectionSink } from './daemon.js';
export { XenstorePageServer, attachPage } from './page-server.js';
export { XenstorePageClient } from './page-client.js';
export { XenstoreInterface, REQUEST_RING, RESPONSE_RING } from './ring.js';
export { XenstoreSocketServer, XenstoreSocketClient } from './socket-transport.js';
export { XenstoreClient, type WatchCallback } from './client.js';
export type { XenstoreTransport } from './transport.js';
