// A domain's hypercall interface: its memory, grant table and event channels, bound to the
// shared hypervisor tables. The same class serves dom0 (main thread), guests (workers) and the
// extra vCPU threads a domain starts.
import { constants as perfConstants, PerformanceObserver } from 'node:perf_hooks';
import { workerData as rawWorkerData, isMainThread, type MessagePort, type Transferable } from 'node:worker_threads';
import { DEFAULT_POLL_MICROS } from './constants.js';
import { EventChannels } from './event-channel.js';
import { GrantTable } from './grant-table.js';
import { DomainMemory, MemoryRegistry, type GrowHook, type Pages } from './memory.js';
import {
  C_SCAVENGES, D_DOMID, D_PAGES, D_STATE, D_STRIDE, readCounters, SharedTables, SLOT_DYING, SLOT_RUNNING, type SharedTablesInit, type XenCounters,
} from './shared-tables.js';
import { nameThread } from './thread-name.js';

/** What the hypervisor hands a domain's thread, or one of its vCPU threads (inside workerData.xen). Internal. */
export interface DomainBootstrap {
  readonly tables: SharedTablesInit;
  readonly domid: number;
  readonly slot: number;
  /** 0 for the domain's own thread; 1.. for a thread started with startVcpu. */
  readonly vcpu: number;
  readonly memories: readonly (readonly [number, Pages])[];
  /** The domain's memory size in frames (its pages are created as it allocates them). */
  readonly memoryPages: number;
  readonly control: MessagePort;
  /** Requests to the hypervisor that need the main thread (vCPU up/down). */
  readonly hypercall: MessagePort;
  readonly pollMicros: number;
  /** A vCPU thread's frames to allocate from (lent by the thread that started it). */
  readonly frames?: readonly number[];
  /** The thread's name for ps and top (threadComm). */
  readonly threadName?: string;
}

/** workerData of a domain thread: the hypervisor's part and the application's part. */
export interface DomainWorkerData {
  readonly xen: DomainBootstrap;
  readonly app: unknown;
}

/** What startVcpu runs, and with what. */
export interface StartVcpuOptions {
  /** The compiled ESM script of the vCPU's thread; it calls attachDomain(). */
  readonly script: URL;
  /** Application data, seen as `xen.workerData` in the vCPU's thread. */
  readonly workerData?: unknown;
  /** Transferables inside workerData (e.g. a MessagePort to talk to the vCPU). */
  readonly transferList?: readonly Transferable[];
  /**
   * Frames of this domain's memory the vCPU allocates from. The caller allocated them and keeps
   * them (neither uses nor frees them) until the vCPU has exited.
   */
  readonly frames?: readonly number[];
  /** Polling budget of the vCPU's waits, in microseconds (default: the domain's). */
  readonly pollMicros?: number;
  /**
   * The other domains whose grants the vCPU maps or copies (default: every domain). A thread
   * learns each known domain's pages when it starts, about 15 µs a page: a queue thread needs
   * only its frontend's. Domains created later are learnt by every thread.
   */
  readonly peers?: readonly number[];
  readonly name?: string;
}

/** How a vCPU thread ended. */
export interface VcpuExit {
  readonly vcpu: number;
  readonly exitCode: number;
  /** The uncaught error that ended the thread, as text. */
  readonly error?: string;
  /** True if stopVcpu (or the domain's destruction) ended it. */
  readonly stopped: boolean;
}

/** A running vCPU thread of this domain. */
export interface VcpuHandle {
  readonly vcpu: number;
  /** Settles when the thread is gone; its ports then notify vCPU 0. */
  readonly exited: Promise<VcpuExit>;
}

/** @internal How a domain's code reaches the hypervisor's vCPU operations. */
export interface VcpuService {
  up(opts: StartVcpuOptions): Promise<VcpuHandle>;
  down(vcpu: number): Promise<VcpuExit>;
}

type HypercallReply =
  | { readonly t: 'up'; readonly id: number; readonly vcpu?: number; readonly error?: string }
  | { readonly t: 'down'; readonly id: number; readonly exit?: VcpuExit; readonly error?: string }
  | { readonly t: 'exit'; readonly exit: VcpuExit };

/** @internal A hypercall request from a domain thread to the main thread. */
export type HypercallRequest =
  | { readonly t: 'up'; readonly id: number; readonly script: string; readonly workerData: unknown;
      readonly transferList: readonly Transferable[]; readonly frames: readonly number[] | undefined;
      readonly pollMicros: number | undefined; readonly peers: readonly number[] | undefined; readonly name: string | undefined }
  | { readonly t: 'down'; readonly id: number; readonly vcpu: number }
  /** The domain's thread created pages for frames first..: relay them, then raise D_PAGES. */
  | { readonly t: 'grow'; readonly first: number; readonly pages: readonly SharedArrayBuffer[] };

/** vCPU operations of a worker domain: messages to the hypervisor over the hypercall port. */
class PortVcpuService implements VcpuService {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (r: HypercallReply) => void }>();
  private readonly exits = new Map<number, (e: VcpuExit) => void>();
  private listening = false;

  constructor(private readonly port: MessagePort) {}

  private request(build: (id: number) => HypercallRequest, transfer: readonly Transferable[]): Promise<HypercallReply> {
    if (!this.listening) {
      this.listening = true;
      this.port.on('message', (m: HypercallReply) => this.onReply(m));
    }
    const id = this.nextId++;
    const reply = new Promise<HypercallReply>((resolve) => { this.pending.set(id, { resolve }); });
    this.port.ref(); // a reply is due: keep the thread alive for it
    this.port.postMessage(build(id), transfer as Transferable[]);
    return reply;
  }

  private onReply(m: HypercallReply): void {
    if (m.t === 'exit') {
      this.exits.get(m.exit.vcpu)?.(m.exit);
      this.exits.delete(m.exit.vcpu);
      this.unrefIfIdle();
      return;
    }
    const p = this.pending.get(m.id);
    this.pending.delete(m.id);
    this.unrefIfIdle();
    p?.resolve(m);
  }

  /** The port keeps the thread alive while a reply or the exit of a vCPU it started is due. */
  private unrefIfIdle(): void {
    if (this.pending.size === 0 && this.exits.size === 0) this.port.unref();
  }

  async up(opts: StartVcpuOptions): Promise<VcpuHandle> {
    const transferList = opts.transferList ?? [];
    const r = await this.request((id) => ({
      t: 'up', id, script: opts.script.href, workerData: opts.workerData, transferList,
      frames: opts.frames, pollMicros: opts.pollMicros, peers: opts.peers, name: opts.name,
    }), transferList);
    if (r.t !== 'up' || r.vcpu === undefined) throw new Error(`startVcpu: ${r.t === 'up' || r.t === 'down' ? r.error : 'bad reply'}`);
    const vcpu = r.vcpu;
    // The exit message comes on the same port after this reply, never before it.
    const exited = new Promise<VcpuExit>((resolve) => { this.exits.set(vcpu, resolve); });
    this.port.ref(); // until that exit message comes
    return { vcpu, exited };
  }

  async down(vcpu: number): Promise<VcpuExit> {
    const r = await this.request((id) => ({ t: 'down', id, vcpu }), []);
    if (r.t !== 'down' || r.exit === undefined) throw new Error(`stopVcpu(${vcpu}): ${r.t === 'up' || r.t === 'down' ? r.error : 'bad reply'}`);
    return r.exit;
  }
}

/** Read-only counter access for domain code. */
export class CounterView {
  constructor(private readonly t: SharedTables) {}
  /** Whole-hypervisor counters. */
  global(): XenCounters { return readCounters(this.t, this.t.globalRow); }
  /** Counters of a running or dying domain; undefined if unknown. */
  domain(domid: number): XenCounters | undefined {
    let slot = this.t.slotOf(domid);
    if (slot < 0) slot = this.t.slotOf(domid, SLOT_DYING);
    return slot < 0 ? undefined : readCounters(this.t, slot);
  }
}

/** The hypercall interface of one domain, as one of its threads (vCPUs) sees it. */
export class XenDomain {
  readonly domid: number;
  /** The vCPU this thread is: 0 for the domain's own thread, 1.. for threads from startVcpu. */
  readonly vcpu: number;
  /** The domain's own pages: alloc/free/page(frame) (a vCPU thread: only the frames lent to it). */
  readonly memory: DomainMemory;
  /** Grant table: grantAccess/endAccess (guest side, vCPU 0) and map/unmap/copy (GNTTABOP_*). */
  readonly grants: GrantTable;
  /** Event channels: allocUnbound/bindInterdomain/bindVcpu/notify/close/mask/unmask/status/wait/on. */
  readonly events: EventChannels;
  readonly counters: CounterView;
  /** The application's workerData given to createDomain (undefined for dom0). */
  readonly workerData: unknown;
  private readonly vcpus: VcpuService | undefined;

  /** @internal */
  constructor(t: SharedTables, domid: number, slot: number, registry: MemoryRegistry, pages: (SharedArrayBuffer | undefined)[],
              pollMicros: number, workerData: unknown,
              opts: { vcpu?: number; frames?: readonly number[]; vcpus?: VcpuService; memoryPages?: number; grow?: GrowHook } = {}) {
    this.domid = domid;
    this.vcpu = opts.vcpu ?? 0;
    this.memory = this.vcpu === 0
      ? new DomainMemory(pages, { ...(opts.memoryPages === undefined ? {} : { limit: opts.memoryPages }), ...(opts.grow === undefined ? {} : { grow: opts.grow }) })
      : new DomainMemory(pages, { lent: opts.frames ?? [] });
    this.grants = new GrantTable(t, domid, slot, this.memory, registry, this.vcpu === 0, this.vcpu);
    if (t.checked) {
      this.memory._onGrantedFree((frame) => {
        const g = this.grants._grantOf(frame);
        t.violations.record('granted-frame-freed', { domid, frame, ...(g === undefined ? {} : { ref: g.ref, peer: g.peer }) });
      });
    }
    // Idle time is when the thread applies the toolstack's memory news (e.g. drops the pages
    // of destroyed domains), off the data path.
    this.events = new EventChannels(t, domid, slot, pollMicros, () => registry.drain(), this.vcpu);
    this.counters = new CounterView(t);
    this.workerData = workerData;
    this.vcpus = opts.vcpus;
  }

  /**
   * Brings up another vCPU of this domain: a thread running `script` with the same domid, grant
   * table (mapping side), event channels and memory view (VCPUOP_up, with the thread as the
   * vCPU). Ports notify vCPU 0 until `events.bindVcpu` moves them (event_channel.h). Resolves
   * once the thread runs.
   */
  startVcpu(opts: StartVcpuOptions): Promise<VcpuHandle> {
    if (this.vcpus === undefined) return Promise.reject(new Error('startVcpu: this domain cannot start vCPUs'));
    return this.vcpus.up(opts);
  }

  /** Takes a vCPU down (terminates its thread); resolves with its exit once it is gone. */
  stopVcpu(vcpu: number): Promise<VcpuExit> {
    if (this.vcpus === undefined) return Promise.reject(new Error('stopVcpu: this domain has no vCPUs to stop'));
    return this.vcpus.down(vcpu);
  }

  /** Releases thread-local resources (timers); the hypervisor releases the shared ones. */
  dispose(): void { this.events.dispose(); }
}

/** How long a domain's thread waits for the main thread to relay its new pages before it gives up. */
const GROW_TIMEOUT_MS = 60_000;

/**
 * A worker domain's growth: the pages go to the main thread's hypervisor, which relays them to
 * every thread that maps from this domain and then raises D_PAGES; this thread waits for that
 * (Atomics.wait: a worker may block; a domain in the main thread is relayed synchronously), so
 * no grant of a new page can reach a thread that cannot find the page on its control port.
 */
function growThroughHypervisor(t: SharedTables, slot: number, domid: number, port: MessagePort): GrowHook {
  const word = slot * D_STRIDE + D_PAGES;
  return (first, pages) => {
    port.postMessage({ t: 'grow', first, pages } satisfies HypercallRequest);
    const want = first + pages.length;
    const deadline = Date.now() + GROW_TIMEOUT_MS;
    for (;;) {
      const seen = Atomics.load(t.dom, word);
      if (seen >= want) return;
      if (Atomics.load(t.dom, slot * D_STRIDE + D_STATE) !== SLOT_RUNNING || Atomics.load(t.dom, slot * D_STRIDE + D_DOMID) !== domid) {
        throw new Error(`domain ${domid} is being destroyed: no new memory`);
      }
      if (Date.now() > deadline) throw new Error(`domain ${domid}: the hypervisor did not take ${pages.length} new pages in ${GROW_TIMEOUT_MS} ms`);
      Atomics.wait(t.dom, word, seen, 100);
    }
  };
}

let attached: XenDomain | undefined;

/**
 * Counts this thread's V8 scavenges in its domain's counters: a cheap, honest measure of what the
 * domain's code allocates (one per young generation filled), read by benchmarks per request.
 */
function countScavenges(t: SharedTables, slot: number): void {
  const obs = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      if ((e as { detail?: { kind?: number } }).detail?.kind === perfConstants.NODE_PERFORMANCE_GC_MINOR) t.count(slot, C_SCAVENGES);
    }
  });
  obs.observe({ entryTypes: ['gc'] });
}

/**
 * Inside a domain's worker thread (or a vCPU thread): the domain's hypercall interface, built from workerData.
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
  if (b.threadName !== undefined) nameThread(b.threadName);
  countScavenges(t, b.slot);
  // The bootstrap's arrays are this thread's copies: the registry keeps them, growing them in place.
  const registry = new MemoryRegistry(b.memories.map(([d, p]) => [d, p as (SharedArrayBuffer | undefined)[]]), b.control);
  const own = registry.pagesOf(b.domid);
  if (own === undefined) throw new Error(`attachDomain(): no memory for domain ${b.domid}`);
  attached = new XenDomain(t, b.domid, b.slot, registry, own, b.pollMicros ?? DEFAULT_POLL_MICROS, wd.app, {
    vcpu: b.vcpu, frames: b.frames, vcpus: new PortVcpuService(b.hypercall), memoryPages: b.memoryPages,
    ...(b.vcpu === 0 ? { grow: growThroughHypervisor(t, b.slot, b.domid, b.hypercall) } : {}),
  });
  // The bootstrap holds every domain's pages: take it out of the domain code's reach.
  delete (wd as { xen?: DomainBootstrap }).xen;
  return attached;
}
