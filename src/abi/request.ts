/**
 * Requests of blkif.h: `blkif_request` (read, write, barrier, flush), `blkif_request_discard`,
 * `blkif_request_indirect`, and the `id` of a request of any other operation (Linux's
 * `blkif_request_other`), so a backend can still answer it.
 *
 * Encoding writes exactly the struct's bytes (padding as 0) and takes whatever values it is
 * given, so tests can also build hostile requests. Decoding never throws on hostile bytes: it
 * returns either a request that satisfies blkif.h's structural rules or what is wrong with it,
 * together with the `id` and `operation` to answer with `BLKIF_RSP_ERROR`/`BLKIF_RSP_EOPNOTSUPP`.
 * Semantic checks that need the device (range, read-only, negotiated features) belong to blkback.
 */
import {
  BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
  BLKIF_MAX_INDIRECT_SEGMENTS,
  BLKIF_MAX_SEGMENTS_PER_REQUEST,
  BLKIF_OP_DISCARD,
  BLKIF_OP_FLUSH_DISKCACHE,
  BLKIF_OP_INDIRECT,
  BLKIF_OP_READ,
  BLKIF_OP_WRITE,
  BLKIF_OP_WRITE_BARRIER,
  BLKIF_SEGMENT_SIZE,
} from './constants.js';
import { REQ_BYTE1, REQ_HALF2, REQ_OPERATION, type BlkifAbi } from './layout.js';
import { decodeSegment, encodeSegment, indirectPagesFor, segmentProblem, type BlkifSegment } from './segment.js';

export type RwOperation =
  | typeof BLKIF_OP_READ
  | typeof BLKIF_OP_WRITE
  | typeof BLKIF_OP_WRITE_BARRIER
  | typeof BLKIF_OP_FLUSH_DISKCACHE;

/** `struct blkif_request`: up to 11 segments carried in the ring slot itself. */
export interface BlkifRequestRw {
  operation: RwOperation;
  nr_segments: number;
  handle: number;
  id: bigint;
  sector_number: bigint;
  seg: BlkifSegment[];
}

/** `struct blkif_request_discard`: `flag` may hold `BLKIF_DISCARD_SECURE`. */
export interface BlkifRequestDiscard {
  operation: typeof BLKIF_OP_DISCARD;
  flag: number;
  handle: number;
  id: bigint;
  sector_number: bigint;
  nr_sectors: bigint;
}

/** `struct blkif_request_indirect`: segments live in the granted pages `indirect_grefs`. */
export interface BlkifRequestIndirect {
  operation: typeof BLKIF_OP_INDIRECT;
  indirect_op: number;
  nr_segments: number;
  id: bigint;
  sector_number: bigint;
  handle: number;
  /** One gref per indirect page in use: ceil(nr_segments / 512) of the 8 in the struct. */
  indirect_grefs: number[];
}

export type BlkifRequest = BlkifRequestRw | BlkifRequestDiscard | BlkifRequestIndirect;

/** What a structurally invalid request is guilty of. */
export type RequestProblem =
  | 'truncated'
  | 'unknown-operation'
  | 'bad-segment-count'
  | 'bad-segment'
  | 'bad-indirect-operation'
  | 'bad-indirect-segment-count';

export type RequestDecodeResult =
  | { ok: true; request: BlkifRequest }
  | { ok: false; operation: number; id: bigint; problem: RequestProblem; message: string };

export interface DecodeLimits {
  /** Largest `nr_segments` accepted in an indirect request (the backend's advertised maximum). */
  maxIndirectSegments?: number;
}

/** Writes `req` at `off` in this ABI's layout; returns the number of bytes the struct spans. */
export function encodeRequest(view: DataView, off: number, abi: BlkifAbi, req: BlkifRequest): number {
  switch (req.operation) {
    case BLKIF_OP_DISCARD: {
      const l = abi.discard;
      writeHead(view, off, l, req.operation, req.flag, req.handle, req.id, req.sector_number);
      view.setBigUint64(off + l.nr_sectors, req.nr_sectors, true);
      return l.size;
    }
    case BLKIF_OP_INDIRECT: {
      const l = abi.indirect;
      // The u16 at 2 is nr_segments here; handle moves after sector_number.
      writeHead(view, off, l, req.operation, req.indirect_op, req.nr_segments, req.id, req.sector_number);
      view.setUint16(off + l.handle, req.handle, true);
      const n = Math.min(req.indirect_grefs.length, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
      for (let i = 0; i < n; i++) view.setUint32(off + l.indirect_grefs + 4 * i, req.indirect_grefs[i]!, true);
      return l.size;
    }
    default: {
      const l = abi.request;
      writeHead(view, off, l, req.operation, req.nr_segments, req.handle, req.id, req.sector_number);
      const n = Math.min(req.seg.length, BLKIF_MAX_SEGMENTS_PER_REQUEST);
      for (let i = 0; i < n; i++) encodeSegment(view, off + l.seg + BLKIF_SEGMENT_SIZE * i, req.seg[i]!);
      return l.size;
    }
  }
}

/**
 * Writes a request of an operation this codec has no struct for (Linux's `blkif_request_other`):
 * the operation byte and the `id`, which sits where every request keeps it.
 */
export function encodeRequestOther(view: DataView, off: number, abi: BlkifAbi, operation: number, id: bigint): number {
  zero(view, off, abi.request.size);
  view.setUint8(off + REQ_OPERATION, operation);
  view.setBigUint64(off + abi.request.id, id, true);
  return abi.request.size;
}

/** Reads the request at `off`. Never throws: bad bytes give `{ ok: false }` with the id to answer. */
export function decodeRequest(view: DataView, off: number, abi: BlkifAbi, limits?: DecodeLimits): RequestDecodeResult {
  const avail = view.byteLength - off;
  if (!Number.isInteger(off) || off < 0 || avail < abi.request.id + 8) {
    const op = Number.isInteger(off) && off >= 0 && avail > 0 ? view.getUint8(off) : 0;
    return fail(op, 0n, 'truncated', `only ${Math.max(avail, 0)} bytes at offset ${off}`);
  }
  const operation = view.getUint8(off + REQ_OPERATION);
  // Every request keeps `id` at the same offset, so it is readable whatever the operation.
  const id = view.getBigUint64(off + abi.request.id, true);
  switch (operation) {
    case BLKIF_OP_READ:
    case BLKIF_OP_WRITE:
    case BLKIF_OP_WRITE_BARRIER:
    case BLKIF_OP_FLUSH_DISKCACHE: {
      const l = abi.request;
      if (avail < l.size) return fail(operation, id, 'truncated', `only ${avail} bytes`);
      const nr = view.getUint8(off + REQ_BYTE1);
      // blkif.h: at most 11 segments; a data-less request is only meaningful as a flush/barrier.
      if (nr > BLKIF_MAX_SEGMENTS_PER_REQUEST || (nr === 0 && (operation === BLKIF_OP_READ || operation === BLKIF_OP_WRITE))) {
        return fail(operation, id, 'bad-segment-count', `nr_segments ${nr} (allowed 1..${BLKIF_MAX_SEGMENTS_PER_REQUEST})`);
      }
      const seg: BlkifSegment[] = new Array(nr);
      for (let i = 0; i < nr; i++) {
        const s = decodeSegment(view, off + l.seg + BLKIF_SEGMENT_SIZE * i);
        const why = segmentProblem(s.first_sect, s.last_sect);
        if (why !== undefined) return fail(operation, id, 'bad-segment', `seg[${i}]: ${why}`);
        seg[i] = s;
      }
      return {
        ok: true,
        request: {
          operation,
          nr_segments: nr,
          handle: view.getUint16(off + REQ_HALF2, true),
          id,
          sector_number: view.getBigUint64(off + l.sector_number, true),
          seg,
        },
      };
    }
    case BLKIF_OP_DISCARD: {
      const l = abi.discard;
      if (avail < l.size) return fail(operation, id, 'truncated', `only ${avail} bytes`);
      return {
        ok: true,
        request: {
          operation,
          flag: view.getUint8(off + REQ_BYTE1),
          handle: view.getUint16(off + REQ_HALF2, true),
          id,
          sector_number: view.getBigUint64(off + l.sector_number, true),
          nr_sectors: view.getBigUint64(off + l.nr_sectors, true),
        },
      };
    }
    case BLKIF_OP_INDIRECT: {
      const l = abi.indirect;
      if (avail < l.size) return fail(operation, id, 'truncated', `only ${avail} bytes`);
      const indirect_op = view.getUint8(off + REQ_BYTE1);
      // blkif.h: "The only supported operations are READ and WRITE" inside an indirect request.
      if (indirect_op !== BLKIF_OP_READ && indirect_op !== BLKIF_OP_WRITE) {
        return fail(operation, id, 'bad-indirect-operation', `indirect_op ${indirect_op} (only READ or WRITE)`);
      }
      const nr = view.getUint16(off + REQ_HALF2, true);
      const max = Math.min(limits?.maxIndirectSegments ?? BLKIF_MAX_INDIRECT_SEGMENTS, BLKIF_MAX_INDIRECT_SEGMENTS);
      if (nr === 0 || nr > max) return fail(operation, id, 'bad-indirect-segment-count', `nr_segments ${nr} (allowed 1..${max})`);
      const pages = indirectPagesFor(nr);
      const indirect_grefs: number[] = new Array(pages);
      for (let i = 0; i < pages; i++) indirect_grefs[i] = view.getUint32(off + l.indirect_grefs + 4 * i, true);
      return {
        ok: true,
        request: {
          operation,
          indirect_op,
          nr_segments: nr,
          id,
          sector_number: view.getBigUint64(off + l.sector_number, true),
          handle: view.getUint16(off + l.handle, true),
          indirect_grefs,
        },
      };
    }
    default:
      return fail(operation, id, 'unknown-operation', `operation ${operation} is not supported`);
  }
}

/** The operation a response to this request must carry: an indirect request is answered with its `indirect_op` (decisions.md: indirect responses carry indirect_op). */
export function responseOperation(req: BlkifRequest): number {
  return req.operation === BLKIF_OP_INDIRECT ? req.indirect_op : req.operation;
}

function fail(operation: number, id: bigint, problem: RequestProblem, message: string): RequestDecodeResult {
  return { ok: false, operation, id, problem, message };
}

/**
 * Clears a request struct and writes what every request shares: `operation` at 0, a byte at 1,
 * a u16 at 2, then `id` and `sector_number` at this struct's offsets for the ABI.
 */
function writeHead(
  view: DataView,
  off: number,
  l: { id: number; sector_number: number; size: number },
  operation: number,
  byte1: number,
  half2: number,
  id: bigint,
  sector_number: bigint,
): void {
  zero(view, off, l.size);
  view.setUint8(off + REQ_OPERATION, operation);
  view.setUint8(off + REQ_BYTE1, byte1);
  view.setUint16(off + REQ_HALF2, half2, true);
  view.setBigUint64(off + l.id, id, true);
  view.setBigUint64(off + l.sector_number, sector_number, true);
}

/** Clears a struct's bytes (every blkif struct size is a multiple of 4); allocates nothing. */
function zero(view: DataView, off: number, len: number): void {
  for (let i = 0; i < len; i += 4) view.setUint32(off + i, 0, true);
}
