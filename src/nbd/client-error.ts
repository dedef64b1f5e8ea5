/**
 * The NBD client's failure: an errno name (the same set the storage layer uses, so the storage
 * adapter passes it on unchanged) and a message naming the server.
 */
import { NBD_EINVAL, NBD_ENOSPC, NBD_EPERM } from './constants.js';

export type NbdClientErrorCode = 'EIO' | 'EROFS' | 'EINVAL' | 'ENOSPC' | 'ENOENT' | 'EEXIST';

export class NbdClientError extends Error {
  override name = 'NbdClientError';
  constructor(
    readonly code: NbdClientErrorCode,
    message: string,
  ) {
    super(message);
  }
}

/** The errno name for an NBD error value a server replied with. */
export function clientErrorCode(errno: number): NbdClientErrorCode {
  if (errno === NBD_EPERM) return 'EROFS';
  if (errno === NBD_ENOSPC) return 'ENOSPC';
  if (errno === NBD_EINVAL) return 'EINVAL';
  return 'EIO';
}

export const why = (e: unknown): string => (e instanceof Error ? e.message : String(e));
