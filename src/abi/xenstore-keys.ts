/**
 * The xenstore nodes of blkif.h ("Backend Device Properties", "Frontend Transport Parameters"),
 * under the names Xen gives them. Values are decimal ASCII unless noted.
 */

// Backend nodes (written by the backend unless marked PRIVATE: written by the toolstack).
export const XS_MODE = 'mode'; // PRIVATE: "r" or "w"
export const XS_PARAMS = 'params'; // PRIVATE: where the backing store is
export const XS_TYPE = 'type'; // PRIVATE: "file", "phy", ...
export const XS_FEATURE_BARRIER = 'feature-barrier';
export const XS_FEATURE_FLUSH_CACHE = 'feature-flush-cache';
export const XS_FEATURE_DISCARD = 'feature-discard';
export const XS_FEATURE_PERSISTENT = 'feature-persistent';
export const XS_FEATURE_MAX_INDIRECT_SEGMENTS = 'feature-max-indirect-segments';
export const XS_MAX_RING_PAGE_ORDER = 'max-ring-page-order';
export const XS_MULTI_QUEUE_MAX_QUEUES = 'multi-queue-max-queues';
export const XS_DISCARD_ENABLE = 'discard-enable';
export const XS_DISCARD_ALIGNMENT = 'discard-alignment';
export const XS_DISCARD_GRANULARITY = 'discard-granularity';
export const XS_DISCARD_SECURE = 'discard-secure';
export const XS_INFO = 'info'; // VDISK_* bits
export const XS_SECTOR_SIZE = 'sector-size';
export const XS_PHYSICAL_SECTOR_SIZE = 'physical-sector-size';
export const XS_SECTORS = 'sectors';

// Frontend nodes.
export const XS_RING_REF = 'ring-ref';
/** `ring-ref%u`: page `i` of a multi-page ring (then plain `ring-ref` is not written). */
export const xsRingRefN = (i: number): string => `ring-ref${i}`;
export const XS_EVENT_CHANNEL = 'event-channel';
export const XS_PROTOCOL = 'protocol';
export const XS_RING_PAGE_ORDER = 'ring-page-order';
export const XS_MULTI_QUEUE_NUM_QUEUES = 'multi-queue-num-queues';
/** `queue-%u`: a queue's directory when more than one queue is used. */
export const xsQueueDir = (i: number): string => `queue-${i}`;
export const XS_VIRTUAL_DEVICE = 'virtual-device';
export const XS_DEVICE_TYPE = 'device-type';

/** Linux blkback's default `feature-max-indirect-segments` (MAX_INDIRECT_SEGMENTS). */
export const DEFAULT_MAX_INDIRECT_SEGMENTS = 256;
