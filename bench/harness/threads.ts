/**
 * "Queues in threads": what blkback's `queueThreads` buys. The same layouts of VBDs on the image
 * file, the same workloads, once with every queue served in the backend's own thread and once
 * with each queue in a thread of its own (a vCPU of the driver domain with its own file handle).
 * Each run checks that the backend really did what was asked of it.
 */
import type { StorageSpec } from '../../src/storage/index.js';
import type { DomainProxy, GuestDisk } from '../../src/toolstack/index.js';
import { poolPagesFor, type GuestBench, type Measured } from './guest.js';
import { KiB, MiB, workloadId, type ThreadsLayout, type ThreadsPerf, type ThreadsRow, type Workload } from './types.js';

export interface ThreadsLayoutSpec {
  readonly layout: ThreadsLayout;
  readonly vbds: number;
  /** Queues each frontend asks for (blkback offers up to its default maxQueues, 4). */
  readonly queues: number;
}

export const THREADS_LAYOUTS: readonly ThreadsLayoutSpec[] = [
  { layout: '1 VBD x 2 queues', vbds: 1, queues: 2 },
  { layout: '4 VBDs x 1 queue', vbds: 4, queues: 1 },
];

export const THREADS_WORKLOADS: readonly Workload[] = [
  { pattern: 'randread', blockSize: 4 * KiB, depth: 32 },
  { pattern: 'read', blockSize: MiB, depth: 8 },
];

export const THREADS_INDIRECT = 256;
/** Each VBD's frontend pool: room for eight 1 MiB reads at once (8 x 257 pages + 64, about 8 MiB). */
export const THREADS_BUFFER_PAGES = poolPagesFor(THREADS_INDIRECT, 32, MiB, 8);

/** How long each workload runs untimed before it is measured. */
export const threadsWarmupMs = (ms: number) => Math.min(250, Math.ceil(ms / 2));

export const threadsModeLabel = (threaded: boolean) => (threaded ? 'a thread per queue' : "in the backend's thread");

/** Several VBDs' runs at once as one: throughput summed, mean of the p50s, worst p99. */
export function aggregatePerf(ms: readonly Measured[]): ThreadsPerf {
  return {
    iops: ms.reduce((s, m) => s + m.perf.iops, 0),
    mibps: ms.reduce((s, m) => s + m.perf.mibps, 0),
    p50us: ms.reduce((s, m) => s + m.perf.p50us, 0) / Math.max(1, ms.length),
    p99us: Math.max(...ms.map((m) => m.perf.p99us)),
  };
}

/**
 * Plugs `l.vbds` VBDs on `spec` (read-only: they may share one image), VBD i into guest
 * i mod guests.length, checks that the backend serves their queues in threads exactly when asked
 * to, runs each workload on all of them at once (untimed for a while, then for `ms`), and unplugs them. Returns the aggregate
 * per workload id.
 */
export async function measureThreads(
  g: GuestBench, guests: readonly DomainProxy[], spec: StorageSpec, span: number, l: ThreadsLayoutSpec, threaded: boolean, ms: number,
): Promise<Map<string, ThreadsPerf>> {
  if (guests.length === 0) throw new Error('no guest to plug into');
  const disks: GuestDisk[] = [];
  try {
    for (let i = 0; i < l.vbds; i++) {
      disks.push(await g.plug(guests[i % guests.length]!, { ...spec, readOnly: true },
        { maxIndirectSegments: THREADS_INDIRECT, queueThreads: threaded },
        { maxIndirectSegments: THREADS_INDIRECT, queues: l.queues, bufferPages: THREADS_BUFFER_PAGES }));
    }
    for (const [i, d] of disks.entries()) {
      if (d.info.queues !== l.queues) throw new Error(`${l.layout}: VBD ${i} negotiated ${d.info.queues} queues, not ${l.queues}`);
      const vcpus = (await d.backendStatus()).queueVcpus.length;
      const want = threaded ? l.queues : 0;
      if (vcpus !== want) {
        throw new Error(`${l.layout}, queueThreads ${threaded}: VBD ${i} has ${vcpus} queue vCPUs, expected ${want}${threaded ? ' (did the backend fall back to its own thread?)' : ''}`);
      }
    }
    // Untimed first: new queue threads start with cold code, and every VBD with no persistent grants.
    for (const w of THREADS_WORKLOADS) await Promise.all(disks.map((d) => g.run(d, w, threadsWarmupMs(ms), span)));
    const out = new Map<string, ThreadsPerf>();
    for (const w of THREADS_WORKLOADS) {
      out.set(workloadId(w), aggregatePerf(await Promise.all(disks.map((d) => g.run(d, w, ms, span)))));
    }
    return out;
  } finally {
    for (const d of disks) await d.unplug().catch(() => undefined);
  }
}

/** The measurements of both modes, as rows; a layout measured in one mode only gives none. */
export class ThreadsRuns {
  private readonly got = new Map<string, Map<string, ThreadsPerf>>();

  record(layout: ThreadsLayout, threaded: boolean, perf: Map<string, ThreadsPerf>): void {
    this.got.set(`${layout}|${threaded}`, perf);
  }

  rows(): ThreadsRow[] {
    const rows: ThreadsRow[] = [];
    for (const l of THREADS_LAYOUTS) {
      const off = this.got.get(`${l.layout}|false`);
      const on = this.got.get(`${l.layout}|true`);
      if (off === undefined || on === undefined) continue;
      for (const w of THREADS_WORKLOADS) {
        const inThread = off.get(workloadId(w));
        const threaded = on.get(workloadId(w));
        if (inThread === undefined || threaded === undefined) continue;
        rows.push({ layout: l.layout, workload: w, inThread, threaded, ratio: threaded.mibps / inThread.mibps });
      }
    }
    return rows;
  }
}
