/**
 * The sections that measure what a user sees, each driving `blkif serve` as a child: start-up
 * (time to ready, idle CPU, resident memory), scaling over VBDs (a fio job per VBD; fairness),
 * isolation (a VBD on slow storage beside one on a file), the NBD servers side by side (with where
 * the time goes in serve's threads), and bytes in flight on fixed-latency NBD storage.
 */
import { join } from 'node:path';
import type { Cleanup } from './cleanup.js';
import { createImage } from './cleanup.js';
import { NBD_WORKLOADS, SCALING_WORKLOAD } from './matrix.js';
import type { Section } from './types.js';
import { fioJobs, idleOf, observe, scrape, sparseImages, startDelayedMemory, startNbdkitFile, startQemuNbd, startServe, type Server } from './serve.js';
import {
  MiB, sizeLabel, workloadId, workloadLabel, type BenchResults, type Perf, type Row, type TimeRow, type Workload,
} from './types.js';

export interface ServeParameters {
  readonly fioSeconds: number;
  readonly warmSeconds: number;
  readonly startupCounts: readonly number[];
  readonly idleSeconds: number;
  readonly serveScalingCounts: readonly number[];
  readonly serveImageBytes: number;
  readonly slowDelayMs: number;
  readonly inflightDelayMs: number;
  readonly inflightNbdThreads: number;
  readonly inflightNbdConfigs: readonly (readonly [number, number])[];
}

export interface ServeSectionsContext {
  readonly add: (section: Section, name: string, run: () => Promise<string | undefined>, timeoutMs?: number) => void;
  readonly cleanup: Cleanup;
  readonly results: BenchResults;
  readonly P: ServeParameters;
  readonly image: () => string;
  readonly dir: () => string;
  readonly tools: Readonly<Record<string, string | undefined>>;
  readonly skip: (what: string, why: string) => void;
}

const int = (v: number) => Math.round(v).toLocaleString('en-US');
/** Debian packages of the tools these sections run. */
const PACKAGE: Record<string, string> = { fio: 'fio', nbdkit: 'nbdkit', 'qemu-nbd': 'qemu-utils' };

export function addServeSections(c: ServeSectionsContext): void {
  const { add, cleanup, results, P } = c;
  const need = (...tools: string[]) => {
    for (const t of tools) if (c.tools[t] === undefined) throw new Error(`${t} is not installed (Debian package ${PACKAGE[t] ?? t})`);
  };
  /**
   * A new server's first requests pay for what later ones reuse (persistent grants mapped on first
   * use, code not yet optimized): a run of `w` for warmSeconds (default: 1 MiB reads at QD32,
   * which touch the whole page pool) before anything is measured.
   */
  const warm = async (uris: readonly string[], w: Workload = { pattern: 'read', blockSize: MiB, depth: 32 }) => {
    await fioJobs(uris, w, P.warmSeconds);
  };
  const stopped = async (s: Server) => {
    const code = await s.child.stop();
    if (code !== 0 && code !== null) c.skip('blkif serve exit', `exited ${code}: ${s.child.stderr().slice(-300)}`);
  };

  // ---- start-up and idle ----
  // Many images take a while to plug (a guest each, at the time of writing): their own limit.
  const readyLimitMs = (n: number) => Math.max(110_000, n * 4_000);
  for (const n of P.startupCounts) {
    add('startup', `start-up: blkif serve with ${n} image${n > 1 ? 's' : ''}: time to ready, idle CPU over ${P.idleSeconds} s, VmRSS`, async () => {
      const images = sparseImages(c.dir(), `startup${n}-`, n, 64 * MiB);
      const s = await startServe(cleanup, images, [], { readyTimeoutMs: readyLimitMs(n) });
      try {
        const idle = await idleOf(s, P.idleSeconds);
        results.startup!.push({ images: n, readySeconds: s.readySeconds, idleSeconds: P.idleSeconds, idleCpuPercent: idle.cpuPercent, rssBytes: idle.rssBytes });
        return `ready in ${s.readySeconds.toFixed(1)} s, idle ${idle.cpuPercent.toFixed(1)}% CPU, ${idle.rssBytes === undefined ? '?' : int(idle.rssBytes / MiB)} MiB resident`;
      } finally {
        await stopped(s);
      }
    }, readyLimitMs(n) + 60_000);
  }

  // ---- scaling: n VBDs, a fio job each ----
  const maxVbds = Math.max(...P.serveScalingCounts);
  let scaleImages: string[] = [];
  add('scaling', `scaling: ${maxVbds} images of ${sizeLabel(P.serveImageBytes)}, written and warm in the page cache`, async () => {
    scaleImages = Array.from({ length: maxVbds }, (_, i) => {
      const p = join(c.dir(), `scale${i}.img`);
      createImage(p, P.serveImageBytes);
      return p;
    });
    return undefined;
  });
  for (const n of P.serveScalingCounts) {
    add('scaling', `scaling: blkif serve with ${n} VBD${n > 1 ? 's' : ''}, fio ${workloadLabel(SCALING_WORKLOAD)} on each`, async () => {
      need('fio');
      const s = await startServe(cleanup, scaleImages.slice(0, n));
      try {
        const uris = Array.from({ length: n }, (_, i) => s.uri(i));
        await warm(uris, SCALING_WORKLOAD);
        const perfs = await fioJobs(Array.from({ length: n }, (_, i) => s.uri(i)), SCALING_WORKLOAD, P.fioSeconds);
        const iops = perfs.reduce((a, p) => a + p.iops, 0);
        const mean = iops / n;
        const one = results.serveScaling!.find((r) => r.vbds === 1);
        results.serveScaling!.push({
          vbds: n, iops, mibps: perfs.reduce((a, p) => a + p.mibps, 0), perVbd: perfs.map((p) => p.iops),
          worstDeviation: Math.max(...perfs.map((p) => Math.abs(p.iops - mean) / mean)),
          p50us: perfs.reduce((a, p) => a + p.p50us, 0) / n, p99us: Math.max(...perfs.map((p) => p.p99us)),
          ratio: one === undefined ? (n === 1 ? 1 : Number.NaN) : iops / one.iops,
        });
        return `${int(iops)} IOPS aggregate, VBDs ${int(Math.min(...perfs.map((p) => p.iops)))}..${int(Math.max(...perfs.map((p) => p.iops)))}`;
      } finally {
        await stopped(s);
      }
    });
  }

  // ---- isolation: vbd0 on slow storage, busy; vbd1 on a file ----
  add('isolation', `isolation: vbd0 on nbdkit memory + delay ${P.slowDelayMs} ms, vbd1 on a file: vbd1 alone, then beside vbd0`, async () => {
    need('fio', 'nbdkit');
    const slow = await startDelayedMemory(cleanup, c.dir(), 64 * MiB, P.slowDelayMs);
    try {
      const s = await startServe(cleanup, [slow.uri, c.image()]);
      try {
        await warm([s.uri(1)], SCALING_WORKLOAD);
        const [alone] = await fioJobs([s.uri(1)], SCALING_WORKLOAD, P.fioSeconds);
        const [slowPerf, beside] = await fioJobs([s.uri(0), s.uri(1)], SCALING_WORKLOAD, P.fioSeconds);
        results.isolation = { delayMs: P.slowDelayMs, workload: SCALING_WORKLOAD, slowWorkload: SCALING_WORKLOAD, alone: alone!, beside: beside!, slow: slowPerf! };
        return `vbd1 ${int(alone!.iops)} IOPS alone, ${int(beside!.iops)} beside vbd0 (${int(slowPerf!.iops)} IOPS)`;
      } finally {
        await stopped(s);
      }
    } finally {
      await slow.child.stop();
    }
  });

  // ---- NBD servers side by side, same image, same client ----
  const servers: { name: string; tool: string; start: () => Promise<Server> }[] = [
    { name: 'blkif serve', tool: 'fio', start: () => startServe(cleanup, [c.image()], [], { metrics: true }) },
    { name: 'qemu-nbd', tool: 'qemu-nbd', start: () => startQemuNbd(cleanup, c.image()) },
    { name: 'nbdkit file', tool: 'nbdkit', start: () => startNbdkitFile(cleanup, c.image()) },
  ];
  for (const sv of servers) {
    add('nbd', `NBD: ${sv.name}: ${NBD_WORKLOADS.map((w) => `fio ${workloadLabel(w)}`).join(', ')}`, async () => {
      need('fio', sv.tool);
      const s = await sv.start();
      const got: string[] = [];
      try {
        await warm([s.uri(0)]);
        for (const w of NBD_WORKLOADS) {
          const o = await observe(s, () => fioJobs([s.uri(0)], w, P.fioSeconds));
          const perf = o.result[0]!;
          const row: Row = { id: `nbd/${slugOf(sv.name)}/fio-${workloadId(w)}`, label: `fio ${workloadLabel(w)}`, config: sv.name, workload: w, perf };
          results.nbd.push(row);
          if (sv.name === 'blkif serve') results.time!.push(serveTimeRow(sv.name, w, perf, o));
          got.push(w.blockSize < 64 * 1024 ? `${int(perf.iops)} IOPS` : `${int(perf.mibps)} MiB/s`);
        }
      } finally {
        await s.child.stop();
      }
      return got.join(', ');
    });
  }

  // ---- bytes in flight on fixed-latency storage ----
  const w1m: Workload = { pattern: 'read', blockSize: MiB, depth: 32 };
  add('inflight-nbd', `bytes in flight over NBD: the storage alone (nbdkit memory, delay ${P.inflightDelayMs} ms, --threads ${P.inflightNbdThreads}), fio ${workloadLabel(w1m)} straight at it`, async () => {
    need('fio', 'nbdkit');
    const store = await startDelayedMemory(cleanup, c.dir(), 256 * MiB, P.inflightDelayMs, P.inflightNbdThreads);
    try {
      const [perf] = await fioJobs([store.uri], w1m, P.fioSeconds);
      results.inflightNbdStorage = { threads: P.inflightNbdThreads, perf: perf! };
      return `${int(perf!.mibps)} MiB/s`;
    } finally {
      await store.child.stop();
    }
  });
  for (const [indirect, order] of P.inflightNbdConfigs) {
    const label = `${indirect === 0 ? 'classic' : `indirect ${indirect}`}, ring order ${order}`;
    add('inflight-nbd', `bytes in flight over NBD (delay ${P.inflightDelayMs} ms): ${label}, fio ${workloadLabel(w1m)}`, async () => {
      need('fio', 'nbdkit');
      const store = await startDelayedMemory(cleanup, c.dir(), 256 * MiB, P.inflightDelayMs, P.inflightNbdThreads);
      try {
        const s = await startServe(cleanup, [store.uri], ['--max-indirect-segments', String(indirect), '--ring-page-order', String(order)], { metrics: true });
        try {
          await warm([s.uri(0)], w1m);
          const o = await observe(s, () => fioJobs([s.uri(0)], w1m, P.fioSeconds));
          const perf = o.result[0];
          const peak = (await scrape(s.metrics)).get('blkif_vbd_peak_inflight_bytes');
          const cpuPercent = ([...o.cpu.values()].reduce((a, u) => a + u.cpuSeconds, 0) / o.seconds) * 100;
          const segments = indirect === 0 ? 11 : indirect;
          const slots = 32 << order;
          results.inflightNbd!.push({ indirect, ringPageOrder: order, segments, slots, bytesInFlight: segments * slots * 4096, perf: perf!, peakBytes: peak, cpuPercent });
          return `${int(perf!.mibps)} MiB/s, peak in flight ${peak === undefined ? '?' : `${(peak / MiB).toFixed(1)} MiB`}, serve at ${cpuPercent.toFixed(0)}% CPU`;
        } finally {
          await stopped(s);
        }
      } finally {
        await store.child.stop();
      }
    });
  }
}

const slugOf = (s: string) => s.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '');

/** Per client I/O: serve's threads by role, and its backend's kicks and grant maps per I/O. */
function serveTimeRow(where: string, w: Workload, perf: Perf, o: { cpu: Map<string, { cpuSeconds: number; sleeps: number }>; counters: Map<string, number> }): TimeRow {
  const n = perf.ops;
  const per = (v: number | undefined) => (v === undefined || n <= 0 ? Number.NaN : v / n);
  const cpuUs: Record<string, number> = {};
  const sleeps: Record<string, number> = {};
  for (const [role, u] of o.cpu) {
    cpuUs[role] = per(u.cpuSeconds * 1e6);
    sleeps[role] = per(u.sleeps);
  }
  const k = (name: string) => o.counters.get(name);
  return {
    where, workload: w, perf, per: 'I/O', count: n, cpuUs, sleeps,
    feToBe: per(k('blkif_vbd_notify_received_total')), beToFe: per(k('blkif_vbd_notify_sent_total')),
    grantMaps: per(k('blkif_vbd_grant_map_ops_total')), grantCopies: per(k('blkif_vbd_grant_copy_ops_total')),
  };
}
