/**
 * Zeroing a range of a disk through the PV protocol, which has no write-zeroes: blkif.h's
 * BLKIF_OP_DISCARD says only that the range "may be discarded", and no xenstore key promises
 * that a discarded range reads back as zeroes (nor does BLKIF_DISCARD_SECURE, which only makes
 * the old data unrecoverable). So where the backend advertises `feature-discard`, a zero that may
 * deallocate is a plain discard followed by reading the range back through the same ring: what
 * reads as zeroes is done, anything else is written with zeroes (and the disk is remembered as
 * one whose discards leave data, so later zeroes write at once). Decided only from what the VBD
 * advertises and what it returns, never from a look at the backend's storage.
 */
import { BlkfrontError } from './io.js';
import type { Blkfront } from './blkfront.js';

/** Bytes zeroed, or checked, per request. */
const CHUNK = 1024 * 1024;
/** Read-back requests in flight at once. */
const DEPTH = 4;

/** What zeroing needs of a disk (a Blkfront). */
export type ZeroableDisk = Pick<Blkfront, 'info' | 'discard' | 'readPages' | 'write'>;

/** Disks whose discarded ranges were seen to hold something other than zeroes. */
const discardKeepsData = new WeakSet<ZeroableDisk>();
const zeroes = new Uint8Array(CHUNK);

/**
 * Whether a zero of `f` that may deallocate can be a discard (the backend offers discard, and
 * its discards have read back as zeroes so far): what NBD_CMD_FLAG_FAST_ZERO asks.
 */
export function zeroByDiscard(f: ZeroableDisk): boolean {
  return f.info.discard && !f.info.readOnly && !discardKeepsData.has(f);
}

function isZero(b: Uint8Array): boolean {
  return Buffer.from(b.buffer, b.byteOffset, b.length).equals(Buffer.from(zeroes.buffer, 0, b.length));
}

/** Writes zeroes over [offset, offset + length), a chunk per request, all at once. */
async function writeZeroes(f: ZeroableDisk, offset: number, length: number): Promise<void> {
  const writes: Promise<void>[] = [];
  for (let at = offset; at < offset + length; at += CHUNK) writes.push(f.write(at, zeroes.subarray(0, Math.min(CHUNK, offset + length - at))));
  await Promise.all(writes);
}

/**
 * Makes [offset, offset + length) read as zeroes: by discarding where `mayTrim` and
 * `zeroByDiscard` allow (then read back, and written where the read-back is not zeroes), else by
 * writing zeroes. Resolves true when the whole range was discarded and read back as zeroes.
 */
export async function zeroRange(f: ZeroableDisk, offset: number, length: number, mayTrim: boolean): Promise<boolean> {
  if (!mayTrim || !zeroByDiscard(f)) {
    await writeZeroes(f, offset, length);
    return false;
  }
  try {
    await f.discard(offset, length, { secure: false });
  } catch (e) {
    // The backend may still refuse a discard (blkif.h: BLKIF_RSP_EOPNOTSUPP at any time).
    if (!(e instanceof BlkfrontError) || e.code !== 'EOPNOTSUPP') throw e;
    await writeZeroes(f, offset, length);
    return false;
  }
  let hole = true;
  let next = offset;
  const end = offset + length;
  const worker = async () => {
    while (next < end) {
      const at = next;
      const n = Math.min(CHUNK, end - at);
      next += n;
      const { pages, release } = await f.readPages(at, n);
      let zero: boolean;
      try {
        zero = pages.every(isZero);
      } finally {
        release();
      }
      if (!zero) {
        hole = false;
        discardKeepsData.add(f);
        await f.write(at, zeroes.subarray(0, n));
      }
    }
  };
  await Promise.all(Array.from({ length: DEPTH }, worker));
  return hole;
}
