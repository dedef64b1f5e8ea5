/**
 * Byte layouts of blkif.h's structures, one parameterised table per ABI.
 *
 * Every offset is the one gcc gives Xen 4.17's genuine headers with -m64 (x86_64) and -m32
 * (x86_32); they differ only because uint64_t is 8-aligned on x86_64 and 4-aligned on x86_32,
 * plus the explicit `#ifdef __i386__` pad that keeps `blkif_request_indirect` at 64 bytes.
 * All fields are little-endian. The ABI is chosen per ring from the frontend's `protocol` key.
 */
import { XEN_IO_PROTO_ABI_X86_32, XEN_IO_PROTO_ABI_X86_64 } from './constants.js';

export type BlkifProtocol = typeof XEN_IO_PROTO_ABI_X86_32 | typeof XEN_IO_PROTO_ABI_X86_64;

export interface BlkifAbi {
  /** The `protocol` string a frontend writes for this ABI. */
  readonly protocol: BlkifProtocol;
  /** `sizeof(union blkif_sring_entry)`: the ring slot stride. */
  readonly entrySize: number;
  /** `struct blkif_request` (read, write, barrier, flush); `seg` is an array of 8-byte segments. */
  readonly request: { readonly id: number; readonly sector_number: number; readonly seg: number; readonly size: number };
  /** `struct blkif_request_discard`. */
  readonly discard: { readonly id: number; readonly sector_number: number; readonly nr_sectors: number; readonly size: number };
  /** `struct blkif_request_indirect`: note `nr_segments` is u16 at 2 and `handle` moves after `sector_number`. */
  readonly indirect: {
    readonly id: number;
    readonly sector_number: number;
    readonly handle: number;
    readonly indirect_grefs: number;
    readonly size: number;
  };
  /** `struct blkif_response`: id at 0, operation at 8, status (int16) at 10 on both ABIs. */
  readonly response: { readonly id: number; readonly operation: number; readonly status: number; readonly size: number };
}

/** Offsets common to every request struct: `operation` u8 at 0, then per-struct bytes 1..3. */
export const REQ_OPERATION = 0;
/** `blkif_request.nr_segments` (u8) / `blkif_request_discard.flag` / `blkif_request_indirect.indirect_op`. */
export const REQ_BYTE1 = 1;
/** `blkif_request.handle` (u16) / `blkif_request_indirect.nr_segments` (u16). */
export const REQ_HALF2 = 2;
/** Offsets inside `struct blkif_request_segment` (8 bytes on both ABIs). */
export const SEG_GREF = 0;
export const SEG_FIRST_SECT = 4;
export const SEG_LAST_SECT = 5;

export const X86_64_ABI: BlkifAbi = Object.freeze({
  protocol: XEN_IO_PROTO_ABI_X86_64,
  entrySize: 112,
  request: { id: 8, sector_number: 16, seg: 24, size: 112 },
  discard: { id: 8, sector_number: 16, nr_sectors: 24, size: 32 },
  indirect: { id: 8, sector_number: 16, handle: 24, indirect_grefs: 28, size: 64 },
  response: { id: 0, operation: 8, status: 10, size: 16 },
});

export const X86_32_ABI: BlkifAbi = Object.freeze({
  protocol: XEN_IO_PROTO_ABI_X86_32,
  entrySize: 108,
  request: { id: 4, sector_number: 12, seg: 20, size: 108 },
  discard: { id: 4, sector_number: 12, nr_sectors: 20, size: 28 },
  indirect: { id: 4, sector_number: 12, handle: 20, indirect_grefs: 24, size: 64 },
  response: { id: 0, operation: 8, status: 10, size: 12 },
});

/** The ABI names a backend accepts: `native` is ours (x86_64), as `XEN_IO_PROTO_ABI_NATIVE`. */
export type AbiName = 'native' | BlkifProtocol;
export const ABI_NAMES: readonly AbiName[] = ['native', XEN_IO_PROTO_ABI_X86_64, XEN_IO_PROTO_ABI_X86_32];

/** Looks an ABI up by `protocol` string (or `native`); `undefined` for anything else. */
export function abiByName(name: string): BlkifAbi | undefined {
  switch (name) {
    case 'native':
    case XEN_IO_PROTO_ABI_X86_64:
      return X86_64_ABI;
    case XEN_IO_PROTO_ABI_X86_32:
      return X86_32_ABI;
    default:
      return undefined;
  }
}
