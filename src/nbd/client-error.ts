/**
 * The NBD client's failure: an errno name (the same set the storage layer uses, so the storage
 * adapter passes it on unchanged) and a message naming the server.
 */
import { NBD_EIO, NBD_ENOMEM, NBD_ENOSPC, NBD_EPERM } from './constants.js';

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

/**
 * The errno name for an NBD error value a server replied with (NBD_ESHUTDOWN, which asks for a
 * soft disconnect instead, never gets here). The storage layer's names are few: a server out of
 * memory is an I/O failure to us; NBD_EOVERFLOW and NBD_ENOTSUP answer flags (DF, FAST_ZERO) we
 * never send; and "the client SHOULD treat an unexpected error value as if it had been
 * NBD_EINVAL" (proto.md, Error values).
 */
export function clientErrorCode(errno: number): NbdClientErrorCode {
  switch (errno) {
    case NBD_EPERM: return 'EROFS';
    case NBD_EIO: case NBD_ENOMEM: return 'EIO';
    case NBD_ENOSPC: return 'ENOSPC';
    default: return 'EINVAL';
  }
}

export const why = (e: unknown): string => (e instanceof Error ? e.message : String(e));
