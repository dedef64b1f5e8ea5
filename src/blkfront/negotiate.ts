/**
 * The frontend's reading of the backend's xenstore nodes (blkif.h "Backend Device Properties"):
 * the records and their rules for absent or nonsense values are the negotiation's
 * (abi/negotiation.ts, after Linux `blkfront_gather_backend_features` and `blkfront_connect`);
 * here are the xenstore reads and the frontend's policy, which takes the smaller of the backend's
 * indirect offer and its own.
 */
import { negotiatedIndirectSegments, readBackendOffer, readDiskProperties, type BackendOffer, type DiskProperties } from '../abi/index.js';
import { readNodes } from '../xenbus/index.js';
import type { XenstoreClient } from '../xenstore/index.js';

/** Transport parameters the backend offers before the frontend sets up its ring, with the frontend's indirect limit applied. */
export interface BackendTransport extends BackendOffer {
  /** Segments per indirect request we will use: 0 = plain requests of up to 11 segments only. */
  readonly maxIndirectSegments: number;
}

/** The disk as the backend describes it once Connected (`sectors` follows an online resize). */
export type DiskInfo = { -readonly [K in keyof DiskProperties]: DiskProperties[K] };

/** The backend's nodes are unusable; `errno` is what Linux would report (`xenbus_dev_fatal`). */
export class NegotiationError extends Error {
  override name = 'NegotiationError';
  constructor(readonly errno: number, message: string) {
    super(message);
  }
}

export async function readBackendTransport(xs: XenstoreClient, backDir: string, ourMaxIndirect: number): Promise<BackendTransport> {
  const nodes = await readNodes(xs, backDir, 1);
  const offer = readBackendOffer((k) => nodes.get(k));
  // Every value has a default: the offer always reads.
  if (!offer.ok) throw new NegotiationError(offer.errno, `backend ${backDir}: ${offer.error}`);
  return { ...offer.value, maxIndirectSegments: negotiatedIndirectSegments(offer.value.maxIndirectSegments, ourMaxIndirect) };
}

export async function readDiskInfo(xs: XenstoreClient, backDir: string): Promise<DiskInfo> {
  const nodes = await readNodes(xs, backDir, 1);
  const disk = readDiskProperties((k) => nodes.get(k));
  if (!disk.ok) throw new NegotiationError(disk.errno, `backend ${backDir}: ${disk.error}`);
  return { ...disk.value };
}
