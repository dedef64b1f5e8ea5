// Per-domain limits. Defaults are cxenstored's (Xen 4.17
// tools/xenstore/xenstored_core.c: quota_nb_entry_per_domain etc.); they
// apply to unprivileged domains only, as in xenstored.
import { XENSTORE_REL_PATH_MAX } from './wire.js';

export interface XenstoreQuotas {
  /** Nodes a domain may own (xenstored -E, default 1000). */
  nodesPerDomain: number;
  /** Size of one node record: header, permissions, value, child names (-S, 2048). */
  maxEntrySize: number;
  /** Watches per domain (-W, 128). */
  watchesPerDomain: number;
  /** Open transactions per domain (-t, 10). */
  transactionsPerDomain: number;
  /** Permission entries per node (-A, 5). */
  permsPerNode: number;
  /** Path length below /local/domain/<id>/ (-M, XENSTORE_REL_PATH_MAX). */
  pathMax: number;
}

export const DEFAULT_QUOTAS: Readonly<XenstoreQuotas> = {
  nodesPerDomain: 1000,
  maxEntrySize: 2048,
  watchesPerDomain: 128,
  transactionsPerDomain: 10,
  permsPerNode: 5,
  pathMax: XENSTORE_REL_PATH_MAX,
};

/**
 * Which error names a quota hit produces. 'cxenstored' (default): ENOSPC for
 * nodes, entry size, permissions and transactions, E2BIG for watches
 * (xenstored_watch.c do_watch()). 'oxenstored': EQUOTA for counted limits,
 * E2BIG for an oversized entry (oxenstored process.ml).
 */
export type QuotaErrorStyle = 'cxenstored' | 'oxenstored';

// Bytes xenstored's node record takes besides value and children:
// struct xs_tdb_record_hdr (u64 generation + 3 x u32, padded to 24) and
// 8 bytes per struct xs_permissions.
export const NODE_RECORD_HEADER_SIZE = 24;
export const NODE_RECORD_PERM_SIZE = 8;
