/**
 * Constants of Xen's `io/blkif.h`, `io/protocols.h` and the page size, under Xen's own names so a
 * grep for the C name finds them. Values measured from Xen 4.17's genuine headers
 * (see test/conformance: they are re-checked against /usr/include/xen on every test run).
 */

/** `XEN_PAGE_SHIFT` / `XEN_PAGE_SIZE`: grants and ring pages are always 4 KiB. */
export const XEN_PAGE_SHIFT = 12;
export const XEN_PAGE_SIZE = 1 << XEN_PAGE_SHIFT;

/** blkif.h: sector quantities in requests are always 512-byte units (decisions.md: sector units). */
export const SECTOR_SHIFT = 9;
export const SECTOR_SIZE = 1 << SECTOR_SHIFT;
/** Sectors per granted frame; `last_sect` must be below this (Linux blkback's rule). */
export const SECTORS_PER_PAGE = XEN_PAGE_SIZE >> SECTOR_SHIFT;

// blkif.h "REQUEST CODES"
export const BLKIF_OP_READ = 0;
export const BLKIF_OP_WRITE = 1;
export const BLKIF_OP_WRITE_BARRIER = 2;
export const BLKIF_OP_FLUSH_DISKCACHE = 3;
export const BLKIF_OP_RESERVED_1 = 4;
export const BLKIF_OP_DISCARD = 5;
export const BLKIF_OP_INDIRECT = 6;

/** blkif.h: segments carried directly in a `blkif_request`. */
export const BLKIF_MAX_SEGMENTS_PER_REQUEST = 11;
/** blkif.h: indirect pages one `blkif_request_indirect` may name. */
export const BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8;
/** `sizeof(struct blkif_request_segment)`, identical on every ABI. */
export const BLKIF_SEGMENT_SIZE = 8;
/** Linux's SEGS_PER_INDIRECT_FRAME: XEN_PAGE_SIZE / sizeof(struct blkif_request_segment). */
export const BLKIF_SEGS_PER_INDIRECT_FRAME = XEN_PAGE_SIZE / BLKIF_SEGMENT_SIZE;
/** The header's hard limit on `nr_segments` of an indirect request: 8 x 512. */
export const BLKIF_MAX_INDIRECT_SEGMENTS = BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * BLKIF_SEGS_PER_INDIRECT_FRAME;

/** blkif.h: `flag` bit of `blkif_request_discard`. */
export const BLKIF_DISCARD_SECURE = 1;

// blkif.h "STATUS RETURN CODES" (int16_t)
export const BLKIF_RSP_EOPNOTSUPP = -2;
export const BLKIF_RSP_ERROR = -1;
export const BLKIF_RSP_OKAY = 0;

// blkif.h `info` bits
export const VDISK_CDROM = 0x1;
export const VDISK_REMOVABLE = 0x2;
export const VDISK_READONLY = 0x4;

// io/protocols.h
export const XEN_IO_PROTO_ABI_X86_32 = 'x86_32-abi';
export const XEN_IO_PROTO_ABI_X86_64 = 'x86_64-abi';

/** Names of the request codes, for messages and tables. */
export const BLKIF_OP_NAMES: Readonly<Record<number, string>> = {
  [BLKIF_OP_READ]: 'BLKIF_OP_READ',
  [BLKIF_OP_WRITE]: 'BLKIF_OP_WRITE',
  [BLKIF_OP_WRITE_BARRIER]: 'BLKIF_OP_WRITE_BARRIER',
  [BLKIF_OP_FLUSH_DISKCACHE]: 'BLKIF_OP_FLUSH_DISKCACHE',
  [BLKIF_OP_RESERVED_1]: 'BLKIF_OP_RESERVED_1',
  [BLKIF_OP_DISCARD]: 'BLKIF_OP_DISCARD',
  [BLKIF_OP_INDIRECT]: 'BLKIF_OP_INDIRECT',
};

export function blkifOpName(op: number): string {
  return BLKIF_OP_NAMES[op] ?? `unknown operation ${op}`;
}
