/**
 * What the caller's I/O is to blkfront: the error it fails with, the I/O and the chunks it is cut
 * into, and the pure check of an I/O against the disk as negotiated, before anything is queued.
 * A new kind of I/O is named here first (`IoKind`), checked in `checkIo`, encoded in request.ts.
 */
import type { DiskInfo } from './negotiate.js';

/** A feature the backend refused with BLKIF_RSP_EOPNOTSUPP: the control path stops using it. */
export type RefusedFeature = 'flush' | 'barrier' | 'discard';

export type BlkfrontErrorCode = 'EIO' | 'EINVAL' | 'EROFS' | 'EOPNOTSUPP' | 'ETIMEDOUT' | 'ESHUTDOWN';

export class BlkfrontError extends Error {
  override name = 'BlkfrontError';
  constructor(readonly code: BlkfrontErrorCode, message: string) {
    super(message);
  }
}

/** Frontend statistics, readable through `counters`. */
export interface BlkfrontCounters {
  requests: number;
  indirect_requests: number;
  segments: number;
  /** Requests issued again after the backend went away without answering them. */
  reissued: number;
  notify_sent: number;
  notify_received: number;
  responses: number;
  errors: number;
  grants: number;
  /** Persistent grants ended because the backend had unmapped them (Linux purge_persistent_grants). */
  persistent_purged: number;
}

export function newBlkfrontCounters(): BlkfrontCounters {
  return { requests: 0, indirect_requests: 0, segments: 0, reissued: 0, notify_sent: 0, notify_received: 0, responses: 0, errors: 0, grants: 0, persistent_purged: 0 };
}

/** A request a backend went away without answering, as it was on the ring. */
export interface HeldRequest {
  readonly queue: number;
  readonly id: bigint;
  /** BLKIF_OP_* (for an indirect request, its indirect_op). */
  readonly operation: number;
  readonly sector: bigint;
  /** Data bytes it carried (discard: bytes it covered; flush: 0). */
  readonly bytes: number;
}

export type IoKind = 'read' | 'write' | 'flush' | 'discard';

/** One caller's I/O. */
export interface IoOp {
  kind: IoKind;
  /** Byte offset on disk; length in bytes (0 for flush). */
  offset: number;
  length: number;
  buf: Uint8Array | undefined;
  /**
   * A read whose pages are lent to the caller instead of copied into `buf` (Blkfront.readPages):
   * the frame of each page of the I/O, by page index, -1 until its request is answered.
   */
  lent?: number[];
  secure: boolean;
  doneBytes: number;
  failed: boolean;
  resolve: () => void;
  reject: (e: Error) => void;
}

/** A piece of an I/O not yet answered: what a ring request carries, and what is re-issued. */
export interface Chunk {
  op: IoOp;
  /** Byte range within the op. */
  start: number;
  length: number;
}

/** Where the device stands, as far as accepting an I/O goes. */
export interface IoGate {
  /** close() was called, or the device is closed. */
  readonly closing: boolean;
  /** Why the device stopped on a protocol violation, if it did. */
  readonly stopped: string | undefined;
  /** The disk as negotiated (undefined before the first connection). */
  readonly disk: DiskInfo | undefined;
}

/** Why an I/O cannot be accepted, or undefined if it can. */
export function checkIo(kind: IoKind, offset: number, length: number, gate: IoGate): BlkfrontError | undefined {
  if (gate.closing) return new BlkfrontError('ESHUTDOWN', 'device is closing');
  if (gate.stopped !== undefined) return new BlkfrontError('EIO', `device stopped: ${gate.stopped}`);
  const disk = gate.disk;
  if (disk === undefined) return new BlkfrontError('ESHUTDOWN', 'not connected');
  if (kind === 'flush') return undefined;
  const size = disk.sectors * 512;
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    return new BlkfrontError('EINVAL', `offset ${offset} length ${length}: must be non-negative integers`);
  }
  if (offset % disk.sectorSize !== 0 || length % disk.sectorSize !== 0) {
    return new BlkfrontError('EINVAL', `offset ${offset} length ${length}: not aligned to ${disk.sectorSize}-byte sectors`);
  }
  if (offset + length > size) return new BlkfrontError('EINVAL', `bytes ${offset}..${offset + length} beyond the disk's ${size}`);
  if (kind !== 'read' && disk.readOnly) return new BlkfrontError('EROFS', 'the disk is read-only');
  if (kind === 'discard' && !disk.discard) return new BlkfrontError('EOPNOTSUPP', 'the backend offers no discard');
  return undefined;
}

/** Where the device is in its life (Linux blkfront's BLKIF_STATE_*, plus closing and broken). */
export type Phase = 'connecting' | 'connected' | 'closing' | 'closed' | 'broken';
