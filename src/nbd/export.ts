/**
 * What an NBD export is backed by. The server checks every request against `size`,
 * `readOnly`, `canFlush` and `canTrim` before calling the device, so a device only ever sees
 * in-range offsets; when the client negotiated block sizes (NBD_INFO_BLOCK_SIZE in
 * NBD_OPT_GO), offsets and lengths are also multiples of `blockSize`. A client that did not
 * negotiate may send byte-granular requests: a device that cannot serve them rejects them
 * (NbdDeviceError with NBD_EINVAL).
 */
import { NBD_EINVAL, NBD_EIO, NBD_ENOMEM, NBD_ENOSPC, NBD_EPERM, NBD_ERRNOS } from './constants.js';

export interface NbdExportDevice {
  /** Bytes. */
  readonly size: number;
  readonly readOnly: boolean;
  /** Minimum and preferred block size (the sector size: 512 or 4096). A power of two. */
  readonly blockSize: number;
  /** Whether `flush` persists anything (else NBD_FLAG_SEND_FLUSH and FUA are not advertised). */
  readonly canFlush: boolean;
  readonly canTrim: boolean;
  /** Whether several connections see one another's writes and flushes (NBD_FLAG_CAN_MULTI_CONN). */
  readonly multiConn: boolean;
  /** Exactly `length` bytes from `offset`. */
  read(offset: number, length: number): Promise<Uint8Array>;
  /**
   * Optional, preferred over `read`: the data in the device's own buffers, lent until
   * `release` (the server calls it once the socket is done with them, sent or not), so a read
   * is not copied before the socket copies it.
   */
  readPages?(offset: number, length: number): Promise<{ readonly pages: readonly Uint8Array[]; release(): void }>;
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Makes every completed write durable. */
  flush(): Promise<void>;
  /** Drops a range (a hint: afterwards its contents are unspecified until written). */
  trim(offset: number, length: number): Promise<void>;
  /**
   * Makes a range read as zeroes. `mayTrim` (the client did not set NBD_CMD_FLAG_NO_HOLE): it may
   * deallocate the range instead of writing, provided it then reads as zeroes. Resolves true when
   * the range was deallocated and is known to read as zeroes (a hole the server may report).
   */
  writeZeroes(offset: number, length: number, mayTrim?: boolean): Promise<boolean | void>;
  /**
   * Optional: whether a zero request (`mayTrim` as for writeZeroes) would take less time than
   * writing the zeroes, known before trying (NBD_CMD_FLAG_FAST_ZERO). Absent means never: such a
   * request is answered NBD_ENOTSUP at once.
   */
  fastZero?(mayTrim: boolean): boolean;
}

/** One named export of an NbdServer. */
export interface NbdExport {
  /** The name clients ask for ('' is allowed, and then is the default export). */
  readonly name: string;
  /** Free text for NBD_INFO_DESCRIPTION and NBD_OPT_LIST. */
  readonly description?: string;
  readonly device: NbdExportDevice;
  /**
   * Only this server writes the device (nothing else changes it behind the server's back): the
   * ranges the server zeroes then stay zero until it writes them, and it offers them as the
   * `base:allocation` metadata context (zero-extents.ts). Default false: no context offered.
   */
  readonly ownsWrites?: boolean;
}

/** A device failure with the NBD error value to report (else the server reports NBD_EIO). */
export class NbdDeviceError extends Error {
  override name = 'NbdDeviceError';
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
  }
}

/**
 * errno names (Node's `code`, or a StorageError's or BlkfrontError's) and the NBD error value each
 * maps to (proto.md, Error values: EDQUOT and EFBIG are NBD_ENOSPC; NBD_EOVERFLOW and NBD_ENOTSUP
 * are kept for the requests they answer, so a host's EOVERFLOW or EOPNOTSUPP is NBD_EINVAL).
 */
export const CODE_TO_ERRNO: Readonly<Record<string, number>> = {
  EPERM: NBD_EPERM, EACCES: NBD_EPERM, EROFS: NBD_EPERM,
  EINVAL: NBD_EINVAL, EOVERFLOW: NBD_EINVAL, EOPNOTSUPP: NBD_EINVAL, ENOTSUP: NBD_EINVAL, ENOSYS: NBD_EINVAL,
  ENOSPC: NBD_ENOSPC, EDQUOT: NBD_ENOSPC, EFBIG: NBD_ENOSPC,
  ENOMEM: NBD_ENOMEM,
  EIO: NBD_EIO,
};

/**
 * The NBD error value for an exception thrown by a device: NbdDeviceError's `errno`, a
 * recognised errno `code` (EROFS → NBD_EPERM, EDQUOT → NBD_ENOSPC as the spec asks, ...), else
 * NBD_EIO.
 */
export function deviceErrno(err: unknown): number {
  if (err instanceof NbdDeviceError && NBD_ERRNOS.has(err.errno)) return err.errno;
  const code = (err as { code?: unknown } | null | undefined)?.code;
  if (typeof code === 'string' && Object.hasOwn(CODE_TO_ERRNO, code)) return CODE_TO_ERRNO[code]!;
  return NBD_EIO;
}

/** Throws unless `device` describes a servable export. */
export function validateDevice(name: string, device: NbdExportDevice): void {
  const { size, blockSize } = device;
  if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`export "${name}": size ${size} is not a byte count`);
  if (!Number.isInteger(blockSize) || blockSize < 1 || blockSize > 65536 || (blockSize & (blockSize - 1)) !== 0) {
    throw new RangeError(`export "${name}": block size ${blockSize} is not a power of two from 1 to 64 KiB`);
  }
}
