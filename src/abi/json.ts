/**
 * blkif requests and responses as JSON, with blkif.h's field names and 64-bit values as decimal
 * strings (JSON numbers lose precision above 2^53). Used by `blkif ring decode/encode` and logs.
 * Parsing user JSON never throws anything but `BlkifJsonError`, whose message names the field.
 */
import { BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER } from './constants.js';
import type { BlkifRequest } from './request.js';
import type { BlkifResponse } from './response.js';

export type JsonObject = { [key: string]: unknown };

export class BlkifJsonError extends Error {
  override name = 'BlkifJsonError';
}

export function requestToJson(req: BlkifRequest): JsonObject {
  switch (req.operation) {
    case BLKIF_OP_DISCARD:
      return {
        operation: req.operation,
        flag: req.flag,
        handle: req.handle,
        id: req.id.toString(),
        sector_number: req.sector_number.toString(),
        nr_sectors: req.nr_sectors.toString(),
      };
    case BLKIF_OP_INDIRECT:
      return {
        operation: req.operation,
        indirect_op: req.indirect_op,
        nr_segments: req.nr_segments,
        handle: req.handle,
        id: req.id.toString(),
        sector_number: req.sector_number.toString(),
        indirect_grefs: [...req.indirect_grefs],
      };
    default:
      return {
        operation: req.operation,
        nr_segments: req.nr_segments,
        handle: req.handle,
        id: req.id.toString(),
        sector_number: req.sector_number.toString(),
        seg: req.seg.map((s) => ({ gref: s.gref, first_sect: s.first_sect, last_sect: s.last_sect })),
      };
  }
}

export function responseToJson(rsp: BlkifResponse): JsonObject {
  return { id: rsp.id.toString(), operation: rsp.operation, status: rsp.status };
}

/** A request of a known operation, or `{ operation, id }` for any other one. */
export type ParsedRequest = { known: true; request: BlkifRequest } | { known: false; operation: number; id: bigint };

export function requestFromJson(o: unknown, where: string): ParsedRequest {
  const obj = asObject(o, where);
  const operation = uint(obj, 'operation', where, 0xff);
  const id = u64(obj, 'id', where);
  switch (operation) {
    case BLKIF_OP_READ:
    case BLKIF_OP_WRITE:
    case BLKIF_OP_WRITE_BARRIER:
    case BLKIF_OP_FLUSH_DISKCACHE: {
      const segs = Array.isArray(obj['seg']) ? obj['seg'] : [];
      if (segs.length > 11) throw new BlkifJsonError(`${where}.seg: at most 11 segments fit in a request`);
      const seg = segs.map((s, i) => {
        const so = asObject(s, `${where}.seg[${i}]`);
        const w = `${where}.seg[${i}]`;
        return { gref: uint(so, 'gref', w, 0xffffffff), first_sect: uint(so, 'first_sect', w, 0xff), last_sect: uint(so, 'last_sect', w, 0xff) };
      });
      return {
        known: true,
        request: {
          operation,
          nr_segments: obj['nr_segments'] === undefined ? seg.length : uint(obj, 'nr_segments', where, 0xff),
          handle: optUint(obj, 'handle', where, 0xffff),
          id,
          sector_number: u64(obj, 'sector_number', where, 0n),
          seg,
        },
      };
    }
    case BLKIF_OP_DISCARD:
      return {
        known: true,
        request: {
          operation,
          flag: optUint(obj, 'flag', where, 0xff),
          handle: optUint(obj, 'handle', where, 0xffff),
          id,
          sector_number: u64(obj, 'sector_number', where, 0n),
          nr_sectors: u64(obj, 'nr_sectors', where, 0n),
        },
      };
    case BLKIF_OP_INDIRECT: {
      const g = obj['indirect_grefs'];
      if (!Array.isArray(g) || g.length > 8) throw new BlkifJsonError(`${where}.indirect_grefs: an array of at most 8 grant references`);
      return {
        known: true,
        request: {
          operation,
          indirect_op: uint(obj, 'indirect_op', where, 0xff),
          nr_segments: uint(obj, 'nr_segments', where, 0xffff),
          id,
          sector_number: u64(obj, 'sector_number', where, 0n),
          handle: optUint(obj, 'handle', where, 0xffff),
          indirect_grefs: g.map((v, i) => checkUint(v, `${where}.indirect_grefs[${i}]`, 0xffffffff)),
        },
      };
    }
    default:
      return { known: false, operation, id };
  }
}

export function responseFromJson(o: unknown, where: string): BlkifResponse {
  const obj = asObject(o, where);
  const status = obj['status'];
  if (typeof status !== 'number' || !Number.isInteger(status) || status < -32768 || status > 32767) {
    throw new BlkifJsonError(`${where}.status: an int16 is required`);
  }
  return { id: u64(obj, 'id', where), operation: uint(obj, 'operation', where, 0xff), status };
}

export function asObject(o: unknown, where: string): JsonObject {
  if (typeof o !== 'object' || o === null || Array.isArray(o)) throw new BlkifJsonError(`${where}: an object is required`);
  return o as JsonObject;
}

export function checkUint(v: unknown, where: string, max: number): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > max) {
    throw new BlkifJsonError(`${where}: an integer 0..${max} is required, got ${JSON.stringify(v)}`);
  }
  return v;
}

export function uint(obj: JsonObject, key: string, where: string, max: number): number {
  return checkUint(obj[key], `${where}.${key}`, max);
}

function optUint(obj: JsonObject, key: string, where: string, max: number): number {
  return obj[key] === undefined ? 0 : uint(obj, key, where, max);
}

/** A 64-bit field: a decimal string (or a safe integer number), 0..2^64-1. */
export function u64(obj: JsonObject, key: string, where: string, dflt?: bigint): bigint {
  const v = obj[key];
  if (v === undefined && dflt !== undefined) return dflt;
  let b: bigint | undefined;
  if (typeof v === 'string' && /^[0-9]+$/.test(v)) b = BigInt(v);
  else if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) b = BigInt(v);
  if (b === undefined || b > 0xffffffffffffffffn) {
    throw new BlkifJsonError(`${where}.${key}: a 64-bit unsigned decimal string is required, got ${JSON.stringify(v)}`);
  }
  return b;
}
