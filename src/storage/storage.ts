/**
 * The backend's storage interface: what blkback needs from whatever holds a VBD's bytes (a raw
 * image file, memory, a remote NBD export); and what a kind of storage tells the registry
 * (registry.ts). Offsets and lengths are bytes; the caller
 * (blkback) has already checked alignment and range, but every driver checks range again and
 * never touches a byte past `size`.
 */
export interface BlockStorage {
  /** Usable bytes: whole sectors only (an image of 1000 bytes with 512-byte sectors exposes 512). */
  readonly size: number;
  /** Logical sector size in bytes (512 or 4096). */
  readonly sectorSize: number;
  /**
   * The smallest write the store does without a read-modify-write beneath (blkif.h
   * `physical-sector-size`): a power of two, a multiple of `sectorSize`; absent means `sectorSize`.
   */
  readonly physicalSectorSize?: number;
  readonly readOnly: boolean;
  /** Whether `discard` frees space (else it still zeroes the range, by writing). */
  readonly canDiscard: boolean;
  /** Reads consecutive bytes from `offset` into `buffers`, one after another. */
  read(offset: number, buffers: readonly Uint8Array[]): Promise<void>;
  /** Writes `buffers`, one after another, to consecutive bytes from `offset`. */
  write(offset: number, buffers: readonly Uint8Array[]): Promise<void>;
  /** Makes every completed write durable (fdatasync for a file). */
  flush(): Promise<void>;
  /** Drops a range: reads afterwards return zeroes. */
  discard(offset: number, length: number): Promise<void>;
  /** Overwrites a range with zeroes (secure discard: nothing of the old data is left). */
  writeZeroes(offset: number, length: number): Promise<void>;
  /**
   * Re-reads the size of the backing store (online resize); returns the new `size`. `now`: the
   * caller knows it changed (a store that rate-limits its checks asks at once).
   */
  refreshSize(now?: boolean): Promise<number>;
  close(): Promise<void>;
  /**
   * Told by the caller whether its thread serves this handle and nothing else (no other VBD, no
   * other queue): then a store may make blocking system calls there, since a stall holds up only
   * this handle's own requests (GUIDE: no synchronous storage call on a thread serving other
   * VBDs). A store without the method ignores the hint.
   */
  setOwnThread?(own: boolean): void;
}

/** A storage failure, with the errno name blkback maps to a response status. */
export class StorageError extends Error {
  override name = 'StorageError';
  constructor(
    readonly code: 'EIO' | 'EROFS' | 'EINVAL' | 'ENOSPC' | 'ENOENT' | 'EEXIST',
    message: string,
  ) {
    super(message);
  }
}

/**
 * What every storage spec has: plain data naming a store (structured-cloneable: the toolstack
 * hands it to the driver domain's thread, blkback to its queue threads).
 */
export interface StorageSpecBase {
  readonly kind: string;
  readonly readOnly?: boolean;
  readonly sectorSize?: 512 | 4096;
}

/** What `blkif serve` applies to every image it is given. */
export interface StorageArgumentOptions {
  readonly sectorSize: 512 | 4096;
  readonly readOnly: boolean;
  /** Connections per remote export, where the kind has such a thing. */
  readonly connections?: number;
}

/** One kind of storage, as the registry (registry.ts) knows it. */
export interface StorageKind<S extends StorageSpecBase> {
  readonly kind: S['kind'];
  /** Opens a handle; `log` receives the driver's notices (connections lost and the like). */
  open(spec: S, log?: (msg: string) => void): Promise<BlockStorage>;
  /** How the store is named in xenstore's `params` and in logs. */
  describe(spec: S): string;
  /** The spec for an IMAGE argument of `blkif serve` this kind recognises, else undefined. */
  fromArgument?(arg: string, o: StorageArgumentOptions): S | undefined;
  /**
   * Whether another thread may open a handle of its own on the same store: whether that handle
   * sees every write this one completed, and a flush through either covers both. Asked of the
   * handle `open` gave; blkback serves queues in threads of their own only when it says yes.
   */
  shareable(storage: BlockStorage): boolean;
}
