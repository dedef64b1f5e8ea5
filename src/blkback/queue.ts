/**
 * One queue of a connected VBD (Linux blkback's `xen_blkif_ring`): the frontend's ring mapped,
 * its event channel bound, the page access and the data path. The same code serves a queue in
 * the control path's thread or in a queue thread of its own (queue-thread.ts).
 */
import { BackRing, SharedRing } from '../ring/index.js';
import { GNTMAP_host_map, GNTST_okay, type XenAccess } from '../xen/index.js';
import type { VbdCounters } from './counters.js';
import { DataPath, type DataPathDeps } from './data-path.js';
import { GrantCopy, MapPerRequest, PersistentMaps, type BouncePool, type PageAccess } from './page-access.js';

/** Where the frontend put one queue (blkif.h: `ring-ref*` and `event-channel`, under `queue-N/` with several). */
export interface QueueRing {
  readonly refs: readonly number[];
  readonly remotePort: number;
}

/** How a queue reaches the frontend's pages. */
export type QueueAccess =
  | { readonly kind: 'map' }
  | { readonly kind: 'persistent'; readonly max: number; readonly idleMs: number }
  | { readonly kind: 'copy'; readonly pool: BouncePool };

/** What a queue needs: the data path's dependencies but its ring, channel and page access, which it sets up. */
export interface QueueDeps extends Pick<DataPathDeps, 'xen' | 'frontDomid' | 'abi' | 'storage' | 'limits' | 'maxIndirectSegments' | 'counters' | 'onFatal' | 'log'> {
  readonly access: QueueAccess;
  /** Pending requests per ring page (Linux XEN_BLKIF_REQS_PER_PAGE). */
  readonly reqsPerPage: number;
}

export class Queue {
  private constructor(
    private readonly xen: XenAccess,
    private readonly counters: VbdCounters,
    private readonly dataPath: DataPath,
    private readonly access: PageAccess,
    private readonly ringHandles: readonly number[],
    /** Our end of the queue's event channel. */
    readonly port: number,
  ) {}

  /** Maps the ring and binds the channel; a string says why it could not (nothing is left held). */
  static open(d: QueueDeps, r: QueueRing, index: number): Queue | string {
    const { xen } = d;
    const maps = xen.grants.map(r.refs.map((ref) => ({ dom: d.frontDomid, ref, flags: GNTMAP_host_map })));
    const ringHandles = maps.filter((m) => m.status === GNTST_okay).map((m) => m.handle);
    d.counters.grant_map_ops += ringHandles.length;
    if (ringHandles.length !== r.refs.length) {
      unmapRing(xen, d.counters, ringHandles);
      return `mapping ring ${index} (refs ${r.refs.join(',')}) failed: ${maps.map((m) => m.status).join(',')}`;
    }
    const port = xen.events.bindInterdomain(d.frontDomid, r.remotePort);
    if (port < 0) {
      unmapRing(xen, d.counters, ringHandles);
      return `binding event channel ${r.remotePort} of domain ${d.frontDomid} failed (${port})`;
    }
    // A new port notifies vCPU 0 (event_channel.h); a queue thread takes its own kicks, as
    // Linux sets the ring's IRQ affinity. A kick vCPU 0 saw first is covered: the data path
    // looks at the ring as it starts.
    if (xen.vcpu !== 0) xen.events.bindVcpu(port, xen.vcpu);
    // Only the frontend initialises the shared ring (decisions.md: only the frontend initialises the ring): attach at index 0.
    const ring = new BackRing(new SharedRing(maps.map((m) => m.page!), d.abi.entrySize));
    const deps = { xen, frontDomid: d.frontDomid, counters: d.counters };
    const a = d.access;
    const access: PageAccess = a.kind === 'copy'
      ? new GrantCopy(deps, a.pool)
      : a.kind === 'persistent' ? new PersistentMaps(deps, { max: a.max, idleMs: a.idleMs }) : new MapPerRequest(deps);
    const dataPath = new DataPath({
      xen, frontDomid: d.frontDomid, ring, abi: d.abi, port, storage: d.storage, access,
      limits: d.limits, maxIndirectSegments: d.maxIndirectSegments, counters: d.counters,
      // Linux xen_blkif_map: XEN_BLKIF_REQS_PER_PAGE pending requests per ring page.
      maxPending: d.reqsPerPage * r.refs.length,
      onFatal: d.onFatal, log: d.log,
    });
    return new Queue(xen, d.counters, dataPath, access, ringHandles, port);
  }

  /** Housekeeping: purge idle persistent grants. */
  tick(now: number): void {
    this.access.tick(now);
  }

  /** Answers what is in flight, lets go of every page, unmaps the ring, closes the channel. */
  async stop(): Promise<void> {
    await this.dataPath.stop();
    this.access.clear();
    unmapRing(this.xen, this.counters, this.ringHandles);
    this.xen.events.close(this.port);
  }
}

function unmapRing(xen: XenAccess, counters: VbdCounters, handles: readonly number[]): void {
  if (handles.length === 0) return;
  counters.grant_unmap_ops += handles.length;
  xen.grants.unmap(handles);
}
