/** What a frontend asks for, with defaults; validated once here. */
import { BLKIF_MAX_INDIRECT_SEGMENTS, XEN_IO_PROTO_ABI_X86_64, DEFAULT_MAX_INDIRECT_SEGMENTS, MAX_RING_PAGE_ORDER } from '../abi/index.js';

export interface BlkfrontOptions {
  /**
   * Our own cap on segments per indirect request (Linux module parameter `max_indirect_segments`);
   * the negotiated maximum is the smaller of this and the backend's. 0 never uses indirect.
   */
  maxIndirectSegments: number;
  /** Ring size we want, as log2(pages); capped by the backend's `max-ring-page-order`. */
  ringPageOrder: number;
  /** ABI of the ring we write in `protocol` (decisions.md: protocol always written). */
  protocol: string;
  /** Rings wanted (blkif.h "Multi-queue"); capped by the backend's `multi-queue-max-queues`. */
  queues: number;
  /** Offer `feature-persistent`: grant each buffer page once and copy through it. */
  persistent: boolean;
  /** Most guest pages kept for data and indirect pages (taken as the load first needs them): bounds the bytes in flight. */
  bufferPages: number;
  /** How long to wait for a backend to connect (or come back) before failing I/O, in ms. */
  connectTimeoutMs: number;
  /**
   * How often persistent grants the backend no longer maps are ended (Linux blkfront_delay_work
   * every 10 s, purge_persistent_grants); 0 = never.
   */
  purgeIntervalMs: number;
}

export const DEFAULT_BLKFRONT_OPTIONS: Readonly<BlkfrontOptions> = {
  maxIndirectSegments: DEFAULT_MAX_INDIRECT_SEGMENTS,
  ringPageOrder: 0,
  protocol: XEN_IO_PROTO_ABI_X86_64,
  queues: 1,
  persistent: true,
  bufferPages: 8192,
  connectTimeoutMs: 30_000,
  purgeIntervalMs: 10_000,
};

export class BlkfrontConfigError extends Error {
  override name = 'BlkfrontConfigError';
}

export function blkfrontOptions(given: Partial<BlkfrontOptions> = {}): BlkfrontOptions {
  const o: BlkfrontOptions = { ...DEFAULT_BLKFRONT_OPTIONS, ...given };
  if (!Number.isInteger(o.maxIndirectSegments) || o.maxIndirectSegments < 0 || o.maxIndirectSegments > BLKIF_MAX_INDIRECT_SEGMENTS) {
    throw new BlkfrontConfigError(`max indirect segments ${o.maxIndirectSegments}: use 0..${BLKIF_MAX_INDIRECT_SEGMENTS}`);
  }
  if (!Number.isInteger(o.ringPageOrder) || o.ringPageOrder < 0 || o.ringPageOrder > MAX_RING_PAGE_ORDER) {
    throw new BlkfrontConfigError(`ring page order ${o.ringPageOrder}: use 0..${MAX_RING_PAGE_ORDER}`);
  }
  if (!Number.isInteger(o.queues) || o.queues < 1 || o.queues > 16) throw new BlkfrontConfigError(`queues ${o.queues}: use 1..16`);
  if (!Number.isInteger(o.bufferPages) || o.bufferPages < 16) throw new BlkfrontConfigError(`buffer pages ${o.bufferPages}: at least 16`);
  if (!Number.isInteger(o.purgeIntervalMs) || o.purgeIntervalMs < 0) throw new BlkfrontConfigError(`purge interval ${o.purgeIntervalMs} ms: 0 (never) or more`);
  return o;
}
