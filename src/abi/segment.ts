/**
 * `struct blkif_request_segment` (blkif.h): one granted 4 KiB frame and the inclusive 512-byte
 * sector range `[first_sect, last_sect]` used inside it. 8 bytes on every ABI; an indirect page
 * is an array of 512 of them.
 */
import { BLKIF_SEGMENT_SIZE, BLKIF_SEGS_PER_INDIRECT_FRAME, SECTORS_PER_PAGE } from './constants.js';
import { SEG_FIRST_SECT, SEG_GREF, SEG_LAST_SECT } from './layout.js';

export interface BlkifSegment {
  gref: number;
  first_sect: number;
  last_sect: number;
}

export function encodeSegment(view: DataView, off: number, seg: BlkifSegment): void {
  view.setUint32(off + SEG_GREF, seg.gref, true);
  view.setUint8(off + SEG_FIRST_SECT, seg.first_sect);
  view.setUint8(off + SEG_LAST_SECT, seg.last_sect);
  view.setUint16(off + 6, 0, true); // tail padding: unnamed in blkif.h, written as 0
}

export function decodeSegment(view: DataView, off: number): BlkifSegment {
  return {
    gref: view.getUint32(off + SEG_GREF, true),
    first_sect: view.getUint8(off + SEG_FIRST_SECT),
    last_sect: view.getUint8(off + SEG_LAST_SECT),
  };
}

/**
 * Linux blkback's rule for a segment: `first_sect <= last_sect < XEN_PAGE_SIZE >> 9`.
 * Returns a description of what is wrong, or `undefined` when the segment is valid.
 */
export function segmentProblem(first_sect: number, last_sect: number): string | undefined {
  if (last_sect >= SECTORS_PER_PAGE) return `last_sect ${last_sect} is past the page (max ${SECTORS_PER_PAGE - 1})`;
  if (first_sect > last_sect) return `first_sect ${first_sect} > last_sect ${last_sect}`;
  return undefined;
}

/** Where segment `j` of an indirect request lives: indirect page `j / 512`, offset `(j % 512) * 8`. */
export function indirectSegmentPage(j: number): number {
  return Math.floor(j / BLKIF_SEGS_PER_INDIRECT_FRAME);
}
export function indirectSegmentOffset(j: number): number {
  return (j % BLKIF_SEGS_PER_INDIRECT_FRAME) * BLKIF_SEGMENT_SIZE;
}

/** Number of indirect pages `nr_segments` segments need: ceil(n / 512). */
export function indirectPagesFor(nr_segments: number): number {
  return Math.ceil(nr_segments / BLKIF_SEGS_PER_INDIRECT_FRAME);
}
