/**
 * Where the time goes through the blkfront API, per ring request: CPU time of each thread role of
 * this process (the guest running the workload and blkfront, the driver domain and its queue
 * threads, the main thread), sleeps (each followed by a wake-up) by role and in the emulated Xen,
 * notifications each way, grant maps and copies, and V8 scavenges (allocation) per domain.
 */
import type { GuestDisk } from '../../src/toolstack/index.js';
import type { XenCounters } from '../../src/xen/index.js';
import type { GuestBench } from './guest.js';
import { sampleProcess, usageBetween } from './procstat.js';
import type { TimeRow, Workload } from './types.js';

export const sumOf = (r: Record<string, number>): number => Object.values(r).reduce((a, b) => a + b, 0);

export async function timeInProcess(g: GuestBench, guestName: string, disk: GuestDisk, w: Workload, ms: number, span: number): Promise<TimeRow> {
  const guest = await g.guest(guestName);
  const hv = g.ts.hv;
  const xen = (domid: number): XenCounters => {
    const c = hv.domainCounters(domid);
    if (c === undefined) throw new Error(`domain ${domid} is gone`);
    return c;
  };
  const [ga, ba, pa] = [xen(guest.domid), xen(g.backend.domid), sampleProcess(process.pid)];
  const m = await g.run(disk, w, ms, span);
  const [gb, bb, pb] = [xen(guest.domid), xen(g.backend.domid), sampleProcess(process.pid)];
  const n = m.cost.requests;
  const per = (v: number) => (n > 0 ? v / n : Number.NaN);
  const cpuUs: Record<string, number> = {};
  const sleeps: Record<string, number> = {};
  for (const [role, u] of usageBetween(pa, pb)) {
    cpuUs[role] = per(u.cpuSeconds * 1e6);
    sleeps[role] = per(u.sleeps);
  }
  return {
    where: 'blkfront API', workload: w, perf: m.perf, per: 'ring request', count: n, cpuUs, sleeps,
    feToBe: m.cost.feSentPerReq, beToFe: m.cost.beSentPerReq,
    xenSleeps: { guest: per(gb.sleeps - ga.sleeps), backend: per(bb.sleeps - ba.sleeps) },
    grantMaps: m.cost.grantMapsPerReq,
    grantCopies: per(bb.copyOps - ba.copyOps + gb.copyOps - ga.copyOps),
    copyBytes: per(bb.copyBytes - ba.copyBytes + gb.copyBytes - ga.copyBytes),
    scavengesPerK: { guest: per(gb.scavenges - ga.scavenges) * 1000, backend: per(bb.scavenges - ba.scavenges) * 1000 },
  };
}
