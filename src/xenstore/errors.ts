// Errors as xenstore names them on the wire (xs_wire.h: "We hand errors as
// strings, for portability").
import { XSD_ERRORS, type XenstoreErrorName } from './wire.js';

export class XenstoreError extends Error {
  /** Xen's error name, e.g. 'ENOENT', as carried by XS_ERROR. */
  readonly code: string;
  /** Linux errno for the name, EINVAL (22) for unknown names as C clients do. */
  readonly errno: number;

  constructor(code: string, message?: string) {
    super(message ?? code);
    this.name = 'XenstoreError';
    this.code = code;
    this.errno = XSD_ERRORS.find((e) => e.errstring === code)?.errnum ?? 22;
  }
}

/** Thrown inside the daemon to become an XS_ERROR reply. */
export class XsReplyError extends Error {
  constructor(readonly code: XenstoreErrorName) {
    super(code);
  }
}

export function fail(code: XenstoreErrorName): never {
  throw new XsReplyError(code);
}
