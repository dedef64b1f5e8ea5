/**
 * The blkif negotiation written once, for both ends (blkif.h "Backend Device Properties",
 * "Frontend Transport Parameters"; mirage-block-xen keeps the same records in its `blkproto`).
 * Each record is written as a list of (key, value) nodes under the writer's directory and read
 * back from a lookup of the other end's nodes; a reader returns a result, never throws, so a
 * malformed or absurd node never reaches a data path. The xenstore I/O and each end's policy
 * (what to offer, what to ask for) stay in blkback and blkfront.
 */
import { BLKIF_MAX_INDIRECT_SEGMENTS, BLKIF_MAX_SEGMENTS_PER_REQUEST, SECTOR_SIZE, VDISK_CDROM, VDISK_READONLY, VDISK_REMOVABLE } from './constants.js';
import { EINVAL, ENOSYS } from './errno.js';
import { abiByName, type BlkifAbi } from './layout.js';
import {
  XS_DISCARD_ALIGNMENT,
  XS_DISCARD_GRANULARITY,
  XS_DISCARD_SECURE,
  XS_EVENT_CHANNEL,
  XS_FEATURE_BARRIER,
  XS_FEATURE_DISCARD,
  XS_FEATURE_FLUSH_CACHE,
  XS_FEATURE_MAX_INDIRECT_SEGMENTS,
  XS_FEATURE_PERSISTENT,
  XS_INFO,
  XS_MAX_RING_PAGE_ORDER,
  XS_MULTI_QUEUE_MAX_QUEUES,
  XS_MULTI_QUEUE_NUM_QUEUES,
  XS_PHYSICAL_SECTOR_SIZE,
  XS_PROTOCOL,
  XS_RING_PAGE_ORDER,
  XS_RING_REF,
  XS_SECTORS,
  XS_SECTOR_SIZE,
  xsQueueDir,
  xsRingRefN,
} from './xenstore-keys.js';

/** Largest ring page order either end speaks (Linux's XENBUS_MAX_RING_GRANT_ORDER). */
export const MAX_RING_PAGE_ORDER = 4;
/** Most queues a backend may offer (`multi-queue-max-queues`; Linux offers one per CPU). */
export const MAX_QUEUES = 64;

/** The nodes a record writes: (key relative to the writer's directory, value); value undefined = remove the node. */
export type XsNodes = readonly (readonly [key: string, value: string | undefined])[];
/** The other end's nodes: relative key -> value, undefined when absent. */
export type XsLookup = (key: string) => string | undefined;
/** A record read, or why not with the errno Linux reports for it (what `xenbus_dev_fatal` is given). */
export type NegotiationResult<T> = { readonly ok: true; readonly value: T } | { readonly ok: false; readonly errno: number; readonly error: string };

const ok = <T>(value: T): NegotiationResult<T> => ({ ok: true, value });
const fail = <T>(errno: number, error: string): NegotiationResult<T> => ({ ok: false, errno, error });

/** A decimal unsigned integer as xenstore holds it (at most `max`), or undefined. */
function parseXsUint(text: string | undefined, max = Number.MAX_SAFE_INTEGER): number | undefined {
  if (text === undefined) return undefined;
  const t = text.trim();
  if (!/^\d{1,16}$/.test(t)) return undefined;
  const n = Number(t);
  return n <= max ? n : undefined;
}

const U32 = 0xffffffff;
const flag = (t: string | undefined): boolean => parseXsUint(t) === 1;
const bool = (b: boolean): string => (b ? '1' : '0');

// --- The indirect rule -------------------------------------------------------------------------

/**
 * Why `n` cannot be offered as `feature-max-indirect-segments`, or undefined: 0 (off) or more than
 * a plain request's 11 segments (Linux blkfront ignores 11 or fewer: indirect buys nothing
 * there), up to 8 indirect pages of 512 segments.
 */
export function indirectOfferError(n: number): string | undefined {
  if (Number.isInteger(n) && (n === 0 || (n > BLKIF_MAX_SEGMENTS_PER_REQUEST && n <= BLKIF_MAX_INDIRECT_SEGMENTS))) return undefined;
  return `max indirect segments ${n}: use 0 (off) or ${BLKIF_MAX_SEGMENTS_PER_REQUEST + 1}..${BLKIF_MAX_INDIRECT_SEGMENTS}`;
}

/**
 * Segments per indirect request a frontend uses (Linux `blkfront_setup_indirect`): the smaller
 * of the backend's offer and its own maximum, never past BLKIF_MAX_INDIRECT_SEGMENTS; 11 or
 * fewer means no indirect requests (0).
 */
export function negotiatedIndirectSegments(offered: number, ours: number): number {
  const n = Math.min(offered, ours, BLKIF_MAX_INDIRECT_SEGMENTS);
  return n > BLKIF_MAX_SEGMENTS_PER_REQUEST ? n : 0;
}

// --- The backend's offer, before the frontend sets up its rings (blkif.h startup step 2) ------

export interface BackendOffer {
  /** `feature-max-indirect-segments`; 0 = no indirect requests (the node is then absent). */
  readonly maxIndirectSegments: number;
  /** `max-ring-page-order`. */
  readonly maxRingPageOrder: number;
  /** `multi-queue-max-queues`. */
  readonly maxQueues: number;
  /** `feature-persistent`. */
  readonly persistent: boolean;
}

export function backendOfferNodes(o: BackendOffer): XsNodes {
  return [
    [XS_FEATURE_MAX_INDIRECT_SEGMENTS, o.maxIndirectSegments > 0 ? String(o.maxIndirectSegments) : undefined],
    [XS_MAX_RING_PAGE_ORDER, String(o.maxRingPageOrder)],
    [XS_MULTI_QUEUE_MAX_QUEUES, String(o.maxQueues)],
    [XS_FEATURE_PERSISTENT, bool(o.persistent)],
  ];
}

/**
 * The backend's offer as a frontend reads it (Linux `blkfront_gather_backend_features`,
 * `xenbus_read_unsigned`): an absent or malformed node is its default (no indirect, order 0,
 * one queue, no persistent grants), and values past the limits are clamped to them.
 */
export function readBackendOffer(get: XsLookup): NegotiationResult<BackendOffer> {
  const indirect = Math.min(parseXsUint(get(XS_FEATURE_MAX_INDIRECT_SEGMENTS)) ?? 0, BLKIF_MAX_INDIRECT_SEGMENTS);
  return ok({
    maxIndirectSegments: indirect > BLKIF_MAX_SEGMENTS_PER_REQUEST ? indirect : 0,
    maxRingPageOrder: Math.min(parseXsUint(get(XS_MAX_RING_PAGE_ORDER)) ?? 0, MAX_RING_PAGE_ORDER),
    maxQueues: Math.max(1, Math.min(parseXsUint(get(XS_MULTI_QUEUE_MAX_QUEUES)) ?? 1, MAX_QUEUES)),
    persistent: flag(get(XS_FEATURE_PERSISTENT)),
  });
}

// --- The frontend's rings (blkif.h startup step 3) ----------------------------------------------

export interface QueueRingNodes {
  /** Grant references of the ring's pages, `1 << order` of them. */
  readonly refs: readonly number[];
  /** `event-channel`: the frontend's port. */
  readonly port: number;
}

export interface FrontendRings {
  readonly abi: BlkifAbi;
  readonly order: number;
  /** One per queue, in queue order. */
  readonly queues: readonly QueueRingNodes[];
  /** `feature-persistent` = 1. */
  readonly persistent: boolean;
}

/**
 * The nodes of the rings: with one queue at the top, with more under `queue-N` (blkif.h
 * "Multi-queue"); `ring-ref` for one page, `ring-refN` and `ring-page-order` for more. Nodes an
 * earlier connection of another shape may have left come first, as removals.
 */
export function frontendRingNodes(r: FrontendRings): XsNodes {
  const nodes: [string, string | undefined][] = [];
  for (const key of [XS_RING_REF, XS_EVENT_CHANNEL, XS_RING_PAGE_ORDER, XS_MULTI_QUEUE_NUM_QUEUES]) nodes.push([key, undefined]);
  for (let i = 0; i < 1 << MAX_RING_PAGE_ORDER; i++) nodes.push([xsRingRefN(i), undefined]);
  for (let q = 0; q < MAX_QUEUES; q++) nodes.push([xsQueueDir(q), undefined]);
  const nq = r.queues.length;
  if (r.order > 0) nodes.push([XS_RING_PAGE_ORDER, String(r.order)]);
  if (nq > 1) nodes.push([XS_MULTI_QUEUE_NUM_QUEUES, String(nq)]);
  for (const [q, ring] of r.queues.entries()) {
    const dir = nq === 1 ? '' : `${xsQueueDir(q)}/`;
    if (r.order === 0) nodes.push([`${dir}${XS_RING_REF}`, String(ring.refs[0])]);
    else ring.refs.forEach((ref, i) => nodes.push([`${dir}${xsRingRefN(i)}`, String(ref)]));
    nodes.push([`${dir}${XS_EVENT_CHANNEL}`, String(ring.port)]);
  }
  nodes.push([XS_PROTOCOL, r.abi.protocol], [XS_FEATURE_PERSISTENT, bool(r.persistent)]);
  return nodes;
}

/** What a backend accepts of a frontend's rings: its own offer, and the ABI assumed without `protocol`. */
export interface RingLimits {
  readonly maxQueues: number;
  readonly maxRingPageOrder: number;
  /** ABI of a frontend that writes no `protocol` (Linux on x86 assumes x86_32). */
  readonly defaultProtocol: string;
}

/**
 * The frontend's rings as a backend reads them (Linux blkback `connect_ring`, `read_per_ring_refs`):
 * more queues or a larger order than offered, a missing or malformed ref or port, or an unknown
 * protocol is refused, as from a "buggy or malicious guest" (ENOSYS for a protocol or a queue
 * count we do not serve, EINVAL for the rest, as Linux says).
 */
export function readFrontendRings(get: XsLookup, limits: RingLimits): NegotiationResult<FrontendRings> {
  const protocol = get(XS_PROTOCOL) ?? limits.defaultProtocol;
  const abi = abiByName(protocol);
  if (abi === undefined) return fail(ENOSYS, `frontend protocol "${protocol}" is not one we speak`);
  const queuesText = get(XS_MULTI_QUEUE_NUM_QUEUES);
  const nq = queuesText === undefined ? 1 : parseXsUint(queuesText, U32);
  if (nq === undefined || nq < 1 || nq > limits.maxQueues) return fail(ENOSYS, `${XS_MULTI_QUEUE_NUM_QUEUES} "${queuesText}" (offered 1..${limits.maxQueues})`);
  const orderText = get(XS_RING_PAGE_ORDER);
  const order = orderText === undefined ? 0 : parseXsUint(orderText, U32);
  if (order === undefined || order > limits.maxRingPageOrder) return fail(EINVAL, `${XS_RING_PAGE_ORDER} "${orderText}" (max ${limits.maxRingPageOrder})`);
  const queues: QueueRingNodes[] = [];
  for (let q = 0; q < nq; q++) {
    const dir = nq === 1 ? '' : `${xsQueueDir(q)}/`;
    const refs: number[] = [];
    for (let i = 0; i < 1 << order; i++) {
      // Without `ring-page-order` the one page is `ring-ref` (blkif.h: the single-page layout).
      const key = orderText === undefined ? `${dir}${XS_RING_REF}` : `${dir}${xsRingRefN(i)}`;
      const ref = parseXsUint(get(key), U32);
      if (ref === undefined) return fail(EINVAL, `${key} missing or malformed (${get(key)})`);
      refs.push(ref);
    }
    const portKey = `${dir}${XS_EVENT_CHANNEL}`;
    const port = parseXsUint(get(portKey), U32);
    if (port === undefined) return fail(EINVAL, `${portKey} missing or malformed (${get(portKey)})`);
    queues.push({ refs, port });
  }
  return ok({ abi, order, queues, persistent: get(XS_FEATURE_PERSISTENT) === '1' });
}

// --- The disk, once the backend is Connected (blkif.h startup step 4) ---------------------------

/** The disk's features, also written at InitWait so a frontend may plan before Connected. */
export interface DiskFeatures {
  readonly flush: boolean;
  readonly barrier: boolean;
  readonly discard: boolean;
  readonly discardSecure: boolean;
  /** Bytes (blkif.h: `discard-granularity`); with `discard` only. */
  readonly discardGranularity: number;
  readonly discardAlignment: number;
}

export interface DiskProperties extends DiskFeatures {
  /** Size in 512-byte sectors whatever the sector size (decisions.md: sector units). */
  readonly sectors: number;
  readonly sectorSize: number;
  readonly physicalSectorSize: number;
  readonly readOnly: boolean;
  readonly cdrom: boolean;
  readonly removable: boolean;
}

export function diskFeatureNodes(f: DiskFeatures): XsNodes {
  const nodes: [string, string][] = [[XS_FEATURE_FLUSH_CACHE, bool(f.flush)], [XS_FEATURE_BARRIER, bool(f.barrier)], [XS_FEATURE_DISCARD, bool(f.discard)]];
  if (f.discard) nodes.push([XS_DISCARD_GRANULARITY, String(f.discardGranularity)], [XS_DISCARD_ALIGNMENT, String(f.discardAlignment)], [XS_DISCARD_SECURE, bool(f.discardSecure)]);
  return nodes;
}

export function diskNodes(d: DiskProperties): XsNodes {
  const info = (d.readOnly ? VDISK_READONLY : 0) | (d.cdrom ? VDISK_CDROM : 0) | (d.removable ? VDISK_REMOVABLE : 0);
  return [
    [XS_SECTORS, String(d.sectors)],
    [XS_SECTOR_SIZE, String(d.sectorSize)],
    [XS_PHYSICAL_SECTOR_SIZE, String(d.physicalSectorSize)],
    [XS_INFO, String(info)],
    ...diskFeatureNodes(d),
  ];
}

/**
 * The disk as a frontend reads it (Linux `blkfront_connect`): without a usable `sectors`, or with
 * a sector size that is not a power of two 512..4096, there is no disk; lesser nonsense takes
 * the default (a physical sector smaller than the logical one is the logical one).
 */
export function readDiskProperties(get: XsLookup): NegotiationResult<DiskProperties> {
  const sectors = parseXsUint(get(XS_SECTORS));
  if (sectors === undefined) return fail(EINVAL, `no usable "${XS_SECTORS}" (${get(XS_SECTORS)})`);
  const sectorSize = parseXsUint(get(XS_SECTOR_SIZE)) ?? SECTOR_SIZE;
  if (sectorSize < SECTOR_SIZE || sectorSize > 4096 || (sectorSize & (sectorSize - 1)) !== 0) {
    return fail(EINVAL, `${XS_SECTOR_SIZE} ${sectorSize}: must be a power of two 512..4096`);
  }
  let physicalSectorSize = parseXsUint(get(XS_PHYSICAL_SECTOR_SIZE)) ?? sectorSize;
  if (physicalSectorSize < sectorSize || physicalSectorSize % sectorSize !== 0) physicalSectorSize = sectorSize;
  const info = parseXsUint(get(XS_INFO)) ?? 0;
  const discard = flag(get(XS_FEATURE_DISCARD));
  const granularity = parseXsUint(get(XS_DISCARD_GRANULARITY)) ?? sectorSize;
  return ok({
    sectors,
    sectorSize,
    physicalSectorSize,
    readOnly: (info & VDISK_READONLY) !== 0,
    cdrom: (info & VDISK_CDROM) !== 0,
    removable: (info & VDISK_REMOVABLE) !== 0,
    flush: flag(get(XS_FEATURE_FLUSH_CACHE)),
    barrier: flag(get(XS_FEATURE_BARRIER)),
    discard,
    discardSecure: discard && flag(get(XS_DISCARD_SECURE)),
    discardGranularity: granularity > 0 ? granularity : sectorSize,
    discardAlignment: parseXsUint(get(XS_DISCARD_ALIGNMENT)) ?? 0,
  });
}
