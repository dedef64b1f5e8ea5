/**
 * What `blkif serve` says while it runs: rates computed between two snapshots of the per-VBD
 * counters (IOPS, MiB/s, queue depth, the share of indirect requests, notifications per request),
 * as a live line on a terminal or as structured log records.
 */
import type { DiskExportStatus } from '../product/index.js';

export interface Rates {
  iops: number;
  mibPerSecond: number;
  /** Requests in flight in the backends now. */
  queueDepth: number;
  /** Share of requests that were BLKIF_OP_INDIRECT, 0..1. */
  indirectShare: number;
  /** Frontend kicks the backends received per request. */
  notificationsPerRequest: number;
  connections: number;
}

interface Totals { reqs: number; sectors: number; indirect: number; kicks: number; at: number }

function totals(s: DiskExportStatus, at: number): Totals {
  const t = { reqs: 0, sectors: 0, indirect: 0, kicks: 0, at };
  for (const v of s.vbds) {
    const c = v.backend.counters;
    t.reqs += c.rd_req + c.wr_req + c.f_req + c.ds_req;
    t.sectors += c.rd_sect + c.wr_sect;
    t.indirect += c.indirect_req;
    t.kicks += c.notify_received;
  }
  return t;
}

export class RateMeter {
  private last: Totals | undefined;

  /** Rates since the previous call (zeros the first time). */
  sample(s: DiskExportStatus, now = performance.now()): Rates {
    const t = totals(s, now);
    const p = this.last ?? t;
    this.last = t;
    const dt = Math.max((t.at - p.at) / 1000, 1e-9);
    const dr = t.reqs - p.reqs;
    return {
      iops: p === t ? 0 : dr / dt,
      mibPerSecond: p === t ? 0 : ((t.sectors - p.sectors) * 512) / dt / (1024 * 1024),
      queueDepth: s.vbds.reduce((a, v) => a + v.backend.counters.inflight_req, 0),
      indirectShare: dr > 0 ? (t.indirect - p.indirect) / dr : 0,
      notificationsPerRequest: dr > 0 ? (t.kicks - p.kicks) / dr : 0,
      connections: s.nbd?.connections.active ?? 0,
    };
  }
}

export function formatRates(r: Rates): string {
  const iops = r.iops >= 1000 ? `${(r.iops / 1000).toFixed(1)}K` : r.iops.toFixed(0);
  return `${iops} IOPS  ${r.mibPerSecond.toFixed(1)} MiB/s  QD ${r.queueDepth}  indirect ${(r.indirectShare * 100).toFixed(0)}%  ` +
    `${r.notificationsPerRequest.toFixed(3)} notif/req  ${r.connections} conn`;
}
