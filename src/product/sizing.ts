/**
 * How much memory and how many grants each domain of an export gets: a driver domain's grant-copy
 * bounce pages, a guest's page pools and rings, and the guest's one grant table shared between
 * its disks (Xen's max_grant_frames bounds it, whatever the disk count).
 */
import { BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, BLKIF_MAX_SEGMENTS_PER_REQUEST } from '../abi/index.js';
import { DEFAULT_BLKBACK_OPTIONS, type BlkbackOptions } from '../blkback/index.js';
import { DEFAULT_BLKFRONT_OPTIONS, type BlkfrontOptions } from '../blkfront/index.js';
import { BACKEND_BASE_PAGES, BACKEND_COPY_PAGES } from '../toolstack/index.js';
import { GNTTAB_NR_RESERVED_ENTRIES, NR_GRANT_ENTRIES } from '../xen/index.js';

/**
 * Memory for a driver domain serving `vbds` VBDs with `features`: grant copy needs bounce pages,
 * and with queue threads each queue's share holds at least one largest request.
 */
export function backendMemory(features: Partial<BlkbackOptions>, vbds: number): number {
  if (features.grantCopy !== true) return BACKEND_BASE_PAGES;
  const o = { ...DEFAULT_BLKBACK_OPTIONS, ...features };
  const perQueue = Math.max(o.maxIndirectSegments, BLKIF_MAX_SEGMENTS_PER_REQUEST) + 8 + BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST;
  return BACKEND_BASE_PAGES + vbds * (BACKEND_COPY_PAGES + (o.queueThreads ? o.maxQueues * perQueue : 0));
}

/** A guest's own pages besides its disks' (xenstore ring, slack). */
export const GUEST_BASE_PAGES = 512;

/** Grant entries a guest keeps for itself beside its disks' (the reserved ones and slack). */
const GUEST_OWN_GRANTS = GNTTAB_NR_RESERVED_ENTRIES + 56;

/** Ring pages of one disk, twice over (a reconnection grants new rings while a backend may still map the old). */
function ringPages(o: BlkfrontOptions): number {
  return 2 * o.queues * (1 << o.ringPageOrder);
}

/**
 * The frontend options of each of `disks` disks sharing one guest: every page of a disk's pool
 * may hold a grant (a persistent one stays while the backend maps it), and the guest has one
 * grant table (NR_GRANT_ENTRIES, Xen's max_grant_frames), so the pools share it instead of
 * each taking the default 8192 pages: a disk then never fails for want of a grant another disk
 * holds. One disk keeps the default; 16 get about 2040 pages (8 MiB in flight) each.
 */
export function sharedFrontendOptions(frontend: Partial<BlkfrontOptions>, disks: number): Partial<BlkfrontOptions> {
  const o = { ...DEFAULT_BLKFRONT_OPTIONS, ...frontend };
  const share = Math.floor((NR_GRANT_ENTRIES - GUEST_OWN_GRANTS) / disks) - ringPages(o);
  return { ...frontend, bufferPages: Math.max(16, Math.min(o.bufferPages, share)) };
}

/**
 * Memory for a guest holding `disks` disks attached with `frontend` options: each disk's page
 * pool (blkfront's `bufferPages`) and its rings.
 */
export function guestMemory(frontend: Partial<BlkfrontOptions>, disks: number): number {
  const o = { ...DEFAULT_BLKFRONT_OPTIONS, ...frontend };
  return GUEST_BASE_PAGES + disks * (o.bufferPages + ringPages(o));
}
