/**
 * What a VBD's backend offers its frontend, with Linux blkback's defaults. Validated once, here,
 * so the control and data paths can trust their configuration.
 */
import {
  BLKIF_MAX_INDIRECT_SEGMENTS,
  BLKIF_MAX_SEGMENTS_PER_REQUEST,
  DEFAULT_MAX_INDIRECT_SEGMENTS,
  XEN_IO_PROTO_ABI_X86_32,
} from '../abi/index.js';
import { MAX_RING_PAGE_ORDER } from '../ring/index.js';

/**
 * Linux xen-blkback common.h: pending requests allocated per ring page. A ring page holds 32
 * slots in either ABI, so by default the pool never runs dry before the ring does.
 */
export const XEN_BLKIF_REQS_PER_PAGE = 32;

export interface BlkbackOptions {
  /** `feature-max-indirect-segments`; 0 disables indirect requests (the node is then absent). */
  maxIndirectSegments: number;
  /** `max-ring-page-order` offered (blkif.h "Multi-page ring"). */
  maxRingPageOrder: number;
  /** `feature-flush-cache`. */
  flush: boolean;
  /** `feature-barrier`. */
  barrier: boolean;
  /** `feature-discard` (when the storage can also write zeroes, it always can). */
  discard: boolean;
  /** `discard-secure`: honour BLKIF_DISCARD_SECURE by overwriting with zeroes. */
  discardSecure: boolean;
  /** `physical-sector-size`, bytes; defaults to what the storage reports (else its sector size). */
  physicalSectorSize?: number;
  /** Serve read-only even if the storage is writable (`mode` = "r"). */
  readOnly: boolean;
  /** `info` bits besides VDISK_READONLY. */
  cdrom: boolean;
  removable: boolean;
  /** `multi-queue-max-queues`: rings a frontend may use (Linux: one per CPU). */
  maxQueues: number;
  /** `feature-persistent`: keep the frontend's grants mapped between requests. */
  persistent: boolean;
  /** Linux `max_persistent_grants`: mappings kept per queue. */
  maxPersistentGrants: number;
  /** Linux `persistent_grant_unused_seconds`, in ms: idle mappings are dropped after this. */
  persistentIdleMs: number;
  /** Reach the frontend's pages with GNTTABOP_copy into local pages instead of mapping them (QEMU's way). */
  grantCopy: boolean;
  /** Local pages per VBD for grant copy (bounds the bytes being copied at once; at least one largest request). */
  grantCopyPages: number;
  /**
   * Requests served at once per ring page (Linux XEN_BLKIF_REQS_PER_PAGE, fixed there): the
   * per-queue pool. Lower only to exercise `oo_req`.
   */
  reqsPerPage: number;
  /** Purge and resize checks run this often (ms; 0 = never). */
  housekeepingMs: number;
  /** Check the storage's size on every housekeeping tick and resize online when it changes. */
  watchSize: boolean;
  /**
   * Serve each queue in a thread of its own (a vCPU of the driver domain), as Linux blkback runs
   * a kthread per ring; needs a storage that can be opened again (`BlkbackDeps.storageSpec`).
   */
  queueThreads: boolean;
  /** ABI assumed when the frontend writes no `protocol` (decisions.md: protocol always written; Linux on x86 assumes x86_32). */
  defaultProtocol: string;
}

export const DEFAULT_BLKBACK_OPTIONS: Readonly<BlkbackOptions> = {
  maxIndirectSegments: DEFAULT_MAX_INDIRECT_SEGMENTS,
  maxRingPageOrder: MAX_RING_PAGE_ORDER,
  flush: true,
  barrier: true,
  discard: true,
  discardSecure: true,
  readOnly: false,
  cdrom: false,
  removable: false,
  defaultProtocol: XEN_IO_PROTO_ABI_X86_32,
  maxQueues: 4,
  persistent: true,
  maxPersistentGrants: 1056,
  persistentIdleMs: 60_000,
  grantCopy: false,
  grantCopyPages: BLKIF_MAX_INDIRECT_SEGMENTS + 8,
  reqsPerPage: XEN_BLKIF_REQS_PER_PAGE,
  housekeepingMs: 1000,
  watchSize: true,
  queueThreads: false,
};

export class BlkbackConfigError extends Error {
  override name = 'BlkbackConfigError';
}

/** Fills defaults and rejects impossible values with a message naming the option. */
export function blkbackOptions(given: Partial<BlkbackOptions> = {}): BlkbackOptions {
  const o: BlkbackOptions = { ...DEFAULT_BLKBACK_OPTIONS, ...given };
  const m = o.maxIndirectSegments;
  // Linux blkfront ignores a maximum of 11 or less: indirect buys nothing below a plain request.
  if (!Number.isInteger(m) || (m !== 0 && (m <= BLKIF_MAX_SEGMENTS_PER_REQUEST || m > BLKIF_MAX_INDIRECT_SEGMENTS))) {
    throw new BlkbackConfigError(`max indirect segments ${m}: use 0 (off) or ${BLKIF_MAX_SEGMENTS_PER_REQUEST + 1}..${BLKIF_MAX_INDIRECT_SEGMENTS}`);
  }
  if (!Number.isInteger(o.maxRingPageOrder) || o.maxRingPageOrder < 0 || o.maxRingPageOrder > MAX_RING_PAGE_ORDER) {
    throw new BlkbackConfigError(`max ring page order ${o.maxRingPageOrder}: use 0..${MAX_RING_PAGE_ORDER}`);
  }
  if (!Number.isInteger(o.maxQueues) || o.maxQueues < 1 || o.maxQueues > 64) throw new BlkbackConfigError(`max queues ${o.maxQueues}: use 1..64`);
  if (!Number.isInteger(o.reqsPerPage) || o.reqsPerPage < 1) throw new BlkbackConfigError(`requests per ring page ${o.reqsPerPage}: at least 1`);
  if (!Number.isInteger(o.maxPersistentGrants) || o.maxPersistentGrants < 0) throw new BlkbackConfigError(`max persistent grants ${o.maxPersistentGrants}`);
  if (!Number.isInteger(o.grantCopyPages) || o.grantCopyPages < BLKIF_MAX_INDIRECT_SEGMENTS + 8) {
    throw new BlkbackConfigError(`grant copy pages ${o.grantCopyPages}: at least ${BLKIF_MAX_INDIRECT_SEGMENTS + 8} (one largest request)`);
  }
  return o;
}
