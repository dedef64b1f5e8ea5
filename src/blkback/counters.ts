/**
 * Per-VBD statistics: what Linux blkback exposes in sysfs `statistics/` (`oo_req`, `rd_req`,
 * `wr_req`, `f_req`, `ds_req`, `rd_sect`, `wr_sect`) plus what the indirect and notification
 * machinery costs. Plain numbers owned by one VBD: nothing is shared between VBDs.
 */
export interface VbdCounters {
  /**
   * Linux `oo_req`: times the backend found requests on the ring but no free pending slot (its
   * per-ring pool of XEN_BLKIF_REQS_PER_PAGE x ring pages), so they waited there.
   */
  oo_req: number;
  rd_req: number;
  wr_req: number;
  /** Flushes and barriers. */
  f_req: number;
  /** Discards. */
  ds_req: number;
  /** Sectors (512 bytes) read and written. */
  rd_sect: number;
  wr_sect: number;
  /** Requests of BLKIF_OP_INDIRECT and the segments they carried. */
  indirect_req: number;
  indirect_segments: number;
  /** Data segments of every request. */
  segments: number;
  /** Requests answered BLKIF_RSP_ERROR / BLKIF_RSP_EOPNOTSUPP. */
  errors: number;
  eopnotsupp: number;
  /** Event-channel notifications sent to and received from the frontend. */
  notify_sent: number;
  notify_received: number;
  /** Pages mapped (successful GNTTABOP_map_grant_ref ops) and unmapped. */
  grant_map_ops: number;
  grant_unmap_ops: number;
  /** Requests being served now, and the data bytes they carry; the peak of the latter. */
  inflight_req: number;
  inflight_bytes: number;
  peak_inflight_bytes: number;
  /** GNTTABOP_copy operations (grant-copy mode; one per segment). */
  grant_copy_ops: number;
  /** Persistent grants mapped now, at most ever, and purged (idle or over the bound). */
  persistent_grants: number;
  persistent_grants_peak: number;
  persistent_purged: number;
  /** Frontends disconnected for breaking the protocol (ring overflow). */
  fatal: number;
}

export function newVbdCounters(): VbdCounters {
  return {
    oo_req: 0, rd_req: 0, wr_req: 0, f_req: 0, ds_req: 0, rd_sect: 0, wr_sect: 0,
    indirect_req: 0, indirect_segments: 0, segments: 0, errors: 0, eopnotsupp: 0,
    notify_sent: 0, notify_received: 0, grant_map_ops: 0, grant_unmap_ops: 0,
    inflight_req: 0, inflight_bytes: 0, peak_inflight_bytes: 0, grant_copy_ops: 0,
    persistent_grants: 0, persistent_grants_peak: 0, persistent_purged: 0, fatal: 0,
  };
}

/** The counters' names, in one fixed order (the layout of shared counters). */
export const VBD_COUNTER_NAMES: readonly (keyof VbdCounters)[] = Object.keys(newVbdCounters()) as (keyof VbdCounters)[];

/**
 * Counters kept in a SharedArrayBuffer: written by the one thread serving a queue, read live by
 * the VBD's control path in another. Each field is one aligned float64, so a reader sees a
 * whole value (never torn), possibly one update behind.
 */
export function sharedVbdCounters(buffer: SharedArrayBuffer = new SharedArrayBuffer(VBD_COUNTER_NAMES.length * 8)): { counters: VbdCounters; buffer: SharedArrayBuffer } {
  const f = new Float64Array(buffer);
  const counters = {} as VbdCounters;
  VBD_COUNTER_NAMES.forEach((name, i) => {
    Object.defineProperty(counters, name, { get: () => f[i]!, set: (v: number) => { f[i] = v; }, enumerable: true });
  });
  return { counters, buffer };
}

/** A VBD's counters from its parts (control path and queue threads). Peaks add up: an upper bound. */
export function sumVbdCounters(parts: readonly VbdCounters[]): VbdCounters {
  const sum = newVbdCounters();
  for (const p of parts) for (const name of VBD_COUNTER_NAMES) sum[name] += p[name];
  return sum;
}
