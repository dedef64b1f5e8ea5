// A domain's hypercall interface: its memory, grant table and event channels, bound to the
// shared hypervisor tables. The same class serves dom0 (main thread) and guests (workers).
import { workerData as rawWorkerData, isMainThread, type MessagePort } from 'node:worker_threads';
import { DEFAULT_POLL_MICROS } from './constants.js';
import { EventChannels } from './event-channel.js';
import { GrantTable } from './grant-table.js';
import { DomainMemory, MemoryRegistry, type Pages } from './memory.js';
import { GLOBAL_ROW, readCounters, SharedTables, SLOT_DYING, type SharedTablesInit, type XenCounters } from './shared-tables.js';

/** What the hypervisor hands a domain's thread (inside workerData.xen). Internal. */
export interface DomainBootstrap {
  readonly tables: SharedTablesInit;
  readonly domid: number;
  readonly slot: number;
  readonly memories: readonly (readonly [number, Pages])[];
  readonly control: MessagePort;
  readonly pollMicros: number;
}

/** workerData of a domain thread: the hypervisor's part and the application's part. */
export interface DomainWorkerData {
  readonly xen: DomainBootstrap;
  readonly app: unknown;
}

/** Read-only counter access for domain code. */
export class CounterView {
  constructor(private readonly t: SharedTables) {}
  /** Whole-hypervisor counters. */
  global(): XenCounters { return readCounters(this.t, GLOBAL_ROW); }
  /** Counters of a running or dying domain; undefined if unknown. */
  domain(domid: number): XenCounters | undefined {
    let slot = this.t.slotOf(domid);
    if (slot < 0) slot = this.t.slotOf(domid, SLOT_DYING);
    return slot < 0 ? undefined : readCounters(this.t, slot);
  }
}

/** The hypercall interface of one domain. */
export class XenDomain {
  readonly domid: number;
  /** The domain's own pages: alloc/free/page(frame). */
  readonly memory: DomainMemory;
  /** Grant table: grantAccess/endAccess (guest side) and map/unmap/copy (GNTTABOP_*). */
  readonly grants: GrantTable;
  /** Event channels: allocUnbound/bindInterdomain/notify/close/mask/unmask/status/wait/on. */
  readonly events: EventChannels;
  readonly counters: CounterView;
  /** The application's workerData given to createDomain (undefined for dom0). */
  readonly workerData: unknown;

  /** @internal */
  constructor(t: SharedTables, domid: number, slot: number, registry: MemoryRegistry, pages: Pages,
              pollMicros: number, workerData: unknown) {
    this.domid = domid;
    this.memory = new DomainMemory(pages);
    this.grants = new GrantTable(t, domid, slot, this.memory, registry);
    // Idle time is when the thread applies the toolstack's memory news (e.g. drops the pages
    // of destroyed domains), off the data path.
    this.events = new EventChannels(t, domid, slot, pollMicros, () => registry.drain());
    this.counters = new CounterView(t);
    this.workerData = workerData;
  }

  /** Releases thread-local resources (timers); the hypervisor releases the shared ones. */
  dispose(): void { this.events.dispose(); }
}

let attached: XenDomain | undefined;

/**
 * Inside a domain's worker thread: the domain's hypercall interface, built from workerData.
 * Calling it again returns the same interface.
 */
export async function attachDomain(): Promise<XenDomain> {
  if (attached !== undefined) return attached;
  if (isMainThread) throw new Error('attachDomain() runs inside a domain worker; dom0 uses hypervisor.dom0');
  const wd = rawWorkerData as DomainWorkerData | undefined;
  if (wd === undefined || typeof wd !== 'object' || wd.xen === undefined) {
    throw new Error('attachDomain(): this worker was not created by Hypervisor.createDomain');
  }
  const b = wd.xen;
  const t = new SharedTables(b.tables);
  const registry = new MemoryRegistry(b.memories, b.control);
  const own = b.memories.find(([d]) => d === b.domid)?.[1];
  if (own === undefined) throw new Error(`attachDomain(): no memory for domain ${b.domid}`);
  attached = new XenDomain(t, b.domid, b.slot, registry, own, b.pollMicros ?? DEFAULT_POLL_MICROS, wd.app);
  // The bootstrap holds every domain's pages: take it out of the domain code's reach.
  delete (wd as { xen?: DomainBootstrap }).xen;
  return attached;
}
