/**
 * The frontend's reading of the backend's xenstore nodes (blkif.h "Backend Device Properties")
 * into typed values, with blkif.h's defaults for absent nodes and Linux blkfront's rules for
 * nonsense (`blkfront_gather_backend_features`, `blkfront_connect`): a malformed or absurd value
 * never reaches the data path.
 */
import {
  BLKIF_MAX_INDIRECT_SEGMENTS,
  BLKIF_MAX_SEGMENTS_PER_REQUEST,
  SECTOR_SIZE,
  VDISK_CDROM,
  VDISK_READONLY,
  VDISK_REMOVABLE,
  XS_DISCARD_ALIGNMENT,
  XS_DISCARD_GRANULARITY,
  XS_DISCARD_SECURE,
  XS_FEATURE_BARRIER,
  XS_FEATURE_DISCARD,
  XS_FEATURE_FLUSH_CACHE,
  XS_FEATURE_MAX_INDIRECT_SEGMENTS,
  XS_FEATURE_PERSISTENT,
  XS_INFO,
  XS_MULTI_QUEUE_MAX_QUEUES,
  XS_MAX_RING_PAGE_ORDER,
  XS_PHYSICAL_SECTOR_SIZE,
  XS_SECTORS,
  XS_SECTOR_SIZE,
} from '../abi/index.js';
import { MAX_RING_PAGE_ORDER } from '../ring/index.js';
import type { XenstoreClient } from '../xenstore/index.js';

/** Transport parameters the backend offers before the frontend sets up its ring. */
export interface BackendTransport {
  /** Segments per indirect request we will use: 0 = plain requests of up to 11 segments only. */
  maxIndirectSegments: number;
  maxRingPageOrder: number;
  /** `multi-queue-max-queues` (absent: 1). */
  maxQueues: number;
  /** `feature-persistent`. */
  persistent: boolean;
}

/** The disk as the backend describes it once Connected. */
export interface DiskInfo {
  /** Size in 512-byte sectors (decisions.md: sector units). */
  sectors: number;
  sectorSize: number;
  physicalSectorSize: number;
  readOnly: boolean;
  cdrom: boolean;
  removable: boolean;
  flush: boolean;
  barrier: boolean;
  discard: boolean;
  discardSecure: boolean;
  discardGranularity: number;
  discardAlignment: number;
}

export class NegotiationError extends Error {
  override name = 'NegotiationError';
}

async function readOpt(xs: XenstoreClient, path: string): Promise<string | undefined> {
  try {
    return await xs.read(path);
  } catch {
    return undefined;
  }
}

function uint(text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const t = text.trim();
  return /^\d{1,16}$/.test(t) && Number(t) <= Number.MAX_SAFE_INTEGER ? Number(t) : undefined;
}

const flag = (t: string | undefined): boolean => uint(t) === 1;

export async function readBackendTransport(xs: XenstoreClient, backDir: string, ourMaxIndirect: number): Promise<BackendTransport> {
  const ind = uint(await readOpt(xs, `${backDir}/${XS_FEATURE_MAX_INDIRECT_SEGMENTS}`)) ?? 0;
  // Linux: min(backend, ours); 11 or fewer means indirect buys nothing; never past 8 pages x 512.
  let maxIndirectSegments = Math.min(ind, ourMaxIndirect, BLKIF_MAX_INDIRECT_SEGMENTS);
  if (maxIndirectSegments <= BLKIF_MAX_SEGMENTS_PER_REQUEST) maxIndirectSegments = 0;
  const order = uint(await readOpt(xs, `${backDir}/${XS_MAX_RING_PAGE_ORDER}`)) ?? 0;
  const queues = uint(await readOpt(xs, `${backDir}/${XS_MULTI_QUEUE_MAX_QUEUES}`)) ?? 1;
  return {
    maxIndirectSegments,
    maxRingPageOrder: Math.min(order, MAX_RING_PAGE_ORDER),
    maxQueues: Math.max(1, Math.min(queues, 64)),
    persistent: flag(await readOpt(xs, `${backDir}/${XS_FEATURE_PERSISTENT}`)),
  };
}

export async function readDiskInfo(xs: XenstoreClient, backDir: string): Promise<DiskInfo> {
  const r = (k: string) => readOpt(xs, `${backDir}/${k}`);
  const sectors = uint(await r(XS_SECTORS));
  if (sectors === undefined) throw new NegotiationError(`backend ${backDir} gave no usable "${XS_SECTORS}"`);
  const sectorSize = uint(await r(XS_SECTOR_SIZE)) ?? SECTOR_SIZE;
  if (sectorSize < SECTOR_SIZE || sectorSize > 4096 || (sectorSize & (sectorSize - 1)) !== 0) {
    throw new NegotiationError(`backend ${backDir} sector-size ${sectorSize}: must be a power of two 512..4096`);
  }
  let physicalSectorSize = uint(await r(XS_PHYSICAL_SECTOR_SIZE)) ?? sectorSize;
  if (physicalSectorSize < sectorSize || physicalSectorSize % sectorSize !== 0) physicalSectorSize = sectorSize;
  const info = uint(await r(XS_INFO)) ?? 0;
  const discard = flag(await r(XS_FEATURE_DISCARD));
  const gran = uint(await r(XS_DISCARD_GRANULARITY)) ?? sectorSize;
  return {
    sectors,
    sectorSize,
    physicalSectorSize,
    readOnly: (info & VDISK_READONLY) !== 0,
    cdrom: (info & VDISK_CDROM) !== 0,
    removable: (info & VDISK_REMOVABLE) !== 0,
    flush: flag(await r(XS_FEATURE_FLUSH_CACHE)),
    barrier: flag(await r(XS_FEATURE_BARRIER)),
    discard,
    discardSecure: discard && flag(await r(XS_DISCARD_SECURE)),
    discardGranularity: gran > 0 ? gran : sectorSize,
    discardAlignment: uint(await r(XS_DISCARD_ALIGNMENT)) ?? 0,
  };
}
