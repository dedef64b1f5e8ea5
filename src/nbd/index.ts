export * from './constants.js';
export * from './messages.js';
export { ByteQueue } from './byte-queue.js';
export * from './parser.js';
export * from './serializer.js';
export * from './export.js';
export * from './server.js';
export * from './uri.js';
export * from './tls.js';
