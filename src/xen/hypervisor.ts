// The toolstack-facing hypervisor, in the main thread: owns the shared tables, runs dom0 in
// the main thread (dom0 hosts the toolstack and backends), creates guest domains as worker
// threads and tears them down. Only lifecycle goes through here; the data path runs in each
// domain's thread against the shared tables.
import { EventEmitter } from 'node:events';
import { MessageChannel, Worker, type MessagePort, type Transferable } from 'node:worker_threads';
import { DEFAULT_MEMORY_PAGES, DEFAULT_POLL_MICROS, MAX_DOMAINS } from './constants.js';
import type { DomainBootstrap, DomainWorkerData } from './domain.js';
import { XenDomain } from './domain.js';
import { closeAllPorts, resetEventSlot } from './event-channel.js';
import { hasPinnedGrants, releaseAllMappings, resetGrantSlot, revokeAllGrants } from './grant-table.js';
import { createPages, MemoryRegistry, type ControlMessage, type Pages } from './memory.js';
import {
  C_STRIDE, D_DOMID, D_STATE, D_STRIDE, SharedTables, SLOT_DYING, SLOT_FREE,
  SLOT_RUNNING, type XenCounters,
} from './shared-tables.js';

export interface HypervisorOptions {
  /** dom0's memory, in pages (default DEFAULT_MEMORY_PAGES). */
  readonly dom0MemoryPages?: number;
  /** dom0's polling budget in microseconds (default DEFAULT_POLL_MICROS). */
  readonly dom0PollMicros?: number;
}

export interface CreateDomainOptions {
  /** The compiled ESM script the domain's worker runs; it calls attachDomain(). */
  readonly script: URL;
  /** Application data, seen as `xen.workerData` (from attachDomain()). */
  readonly workerData?: unknown;
  /** Transferables inside workerData. */
  readonly transferList?: readonly Transferable[];
  readonly memoryPages?: number;
  /** The domain's default polling budget in microseconds (0 = never poll). */
  readonly pollMicros?: number;
  readonly name?: string;
}

/** Why a domain went away. */
export interface DomainExit {
  readonly domid: number;
  readonly exitCode: number;
  /** The uncaught error that killed the thread, if any. */
  readonly error?: unknown;
  /** True if destroyDomain() (or shutdown) asked for it. */
  readonly destroyed: boolean;
}

/** The toolstack's handle on a guest domain. */
export interface DomainHandle {
  readonly domid: number;
  readonly name: string;
  /** The domain's thread (e.g. for test messages; the protocol itself uses xenstore). */
  readonly worker: Worker;
  /** Settles once the domain is gone and everything it held is released. */
  readonly exited: Promise<DomainExit>;
}

interface Guest {
  handle: DomainHandle;
  slot: number;
  control: MessagePort;
  error?: unknown;
  destroying: boolean;
  resolveExit: (e: DomainExit) => void;
}

export class Hypervisor {
  /** dom0, the toolstack/backend domain, running in this (main) thread. */
  readonly dom0: XenDomain;
  private readonly t = SharedTables.allocate();
  private readonly registry: MemoryRegistry;
  private readonly memories = new Map<number, Pages>();
  private readonly guests = new Map<number, Guest>();
  private readonly locals = new Map<number, { slot: number; dom: XenDomain }>();
  private readonly emitter = new EventEmitter();
  private nextDomid = 1;

  constructor(opts: HypervisorOptions = {}) {
    const pages = createPages(opts.dom0MemoryPages ?? DEFAULT_MEMORY_PAGES);
    this.memories.set(0, pages);
    this.registry = new MemoryRegistry([[0, pages]]);
    this.claimSlot(0, 0);
    this.dom0 = new XenDomain(this.t, 0, 0, this.registry, pages, opts.dom0PollMicros ?? DEFAULT_POLL_MICROS, undefined);
  }

  /** Domids of running guests (dom0 excluded). */
  get domids(): number[] { return [...this.guests.keys(), ...this.locals.keys()]; }

  domain(domid: number): DomainHandle | undefined { return this.guests.get(domid)?.handle; }

  /**
   * Registers a callback run after a domain is gone and its grants, mappings and ports are
   * released (the toolstack then drops its xenstore state). Returns an unsubscribe function.
   */
  onDomainDestroyed(cb: (domid: number, exit: DomainExit) => void): () => void {
    const f = (e: DomainExit) => cb(e.domid, e);
    this.emitter.on('destroyed', f);
    return () => { this.emitter.off('destroyed', f); };
  }

  /** Whole-hypervisor counters. */
  counters(): XenCounters { return this.dom0.counters.global(); }

  /** Counters of a running or dying domain (or dom0); undefined once its slot is gone. */
  domainCounters(domid: number): XenCounters | undefined { return this.dom0.counters.domain(domid); }

  /** Claims a domid and a table slot, and gives the domain memory that every thread learns of. */
  private newDomain(memoryPages: number | undefined): { domid: number; slot: number; pages: Pages } {
    const domid = this.nextDomid++;
    const slot = this.claimSlot(domid, -1);
    const pages = createPages(memoryPages ?? DEFAULT_MEMORY_PAGES);
    // Every thread learns the new memory before the domid can reach it (see memory.ts).
    this.memories.set(domid, pages);
    this.registry.add(domid, pages);
    this.broadcast({ t: 'mem', domid, pages });
    return { domid, slot, pages };
  }

  /** Creates a guest domain running `script` in a worker thread; resolves once the thread is online. */
  async createDomain(opts: CreateDomainOptions): Promise<DomainHandle> {
    const { domid, slot } = this.newDomain(opts.memoryPages);
    const { port1, port2 } = new MessageChannel();
    const xen: DomainBootstrap = {
      tables: this.t.init, domid, slot, memories: [...this.memories.entries()], control: port2,
      pollMicros: opts.pollMicros ?? DEFAULT_POLL_MICROS,
    };
    const wd: DomainWorkerData = { xen, app: opts.workerData };
    const worker = new Worker(opts.script, {
      workerData: wd,
      transferList: [port2, ...(opts.transferList ?? [])],
      name: opts.name ?? `dom${domid}`,
    });
    let resolveExit!: (e: DomainExit) => void;
    const exited = new Promise<DomainExit>((r) => { resolveExit = r; });
    const g: Guest = {
      handle: { domid, name: opts.name ?? `dom${domid}`, worker, exited },
      slot, control: port1, destroying: false, resolveExit,
    };
    this.guests.set(domid, g);
    worker.on('error', (err) => { g.error = err; });
    worker.once('exit', (code) => this.reap(g, code));
    await new Promise<void>((resolve, reject) => {
      const onOnline = () => { worker.off('exit', onExit); resolve(); };
      const onExit = () => { worker.off('online', onOnline); reject(new Error(`domain ${domid} exited during start: ${String(g.error)}`)); };
      worker.once('online', onOnline);
      worker.once('exit', onExit);
    });
    return g.handle;
  }

  /**
   * Creates a domain whose code runs in the calling (main) thread, like dom0: for tests,
   * benchmarks and single-threaded setups. Same rules as a worker domain; destroyDomain() ends it.
   */
  createLocalDomain(opts: { memoryPages?: number; pollMicros?: number } = {}): XenDomain {
    const { domid, slot, pages } = this.newDomain(opts.memoryPages);
    const dom = new XenDomain(this.t, domid, slot, this.registry, pages, opts.pollMicros ?? DEFAULT_POLL_MICROS, undefined);
    this.locals.set(domid, { slot, dom });
    return dom;
  }

  /** Destroys a guest: stops its thread and releases everything it held. */
  async destroyDomain(domid: number): Promise<DomainExit> {
    const local = this.locals.get(domid);
    if (local !== undefined) {
      this.locals.delete(domid);
      local.dom.dispose();
      const exit: DomainExit = { domid, exitCode: 0, destroyed: true };
      this.release(domid, local.slot);
      this.emitter.emit('destroyed', exit);
      return exit;
    }
    const g = this.guests.get(domid);
    if (g === undefined) throw new Error(`no such domain ${domid}`);
    g.destroying = true;
    await g.handle.worker.terminate();
    return g.handle.exited;
  }

  /** Destroys every guest and releases dom0's thread-local resources. */
  async shutdown(): Promise<void> {
    await Promise.all(this.domids.map(async (d) => { await this.destroyDomain(d); }));
    this.dom0.dispose();
  }

  /** Teardown after the domain's thread is gone (it cannot race its own tables any more). */
  private reap(g: Guest, exitCode: number): void {
    const { domid } = g.handle;
    if (!this.guests.has(domid)) return;
    this.guests.delete(domid);
    g.control.close();
    this.release(domid, g.slot);
    const exit: DomainExit = g.error === undefined
      ? { domid, exitCode, destroyed: g.destroying }
      : { domid, exitCode, destroyed: g.destroying, error: g.error };
    g.resolveExit(exit);
    this.emitter.emit('destroyed', exit);
  }

  /** Releases what a dead domain held: ports (peers see them unbound), mappings, grants, memory. */
  private release(domid: number, slot: number): void {
    const t = this.t;
    Atomics.store(t.dom, slot * D_STRIDE + D_STATE, SLOT_DYING); // no new map, bind or alloc towards it
    closeAllPorts(t, slot);
    releaseAllMappings(t, slot);
    revokeAllGrants(t, slot);
    this.memories.delete(domid);
    this.registry.remove(domid);
    this.broadcast({ t: 'gone', domid });
    if (!hasPinnedGrants(t, slot)) this.freeSlot(slot);
  }

  private broadcast(msg: ControlMessage): void {
    for (const g of this.guests.values()) g.control.postMessage(msg);
  }

  /** Finds a free slot (reclaiming zombies nobody maps any more) and marks it running. */
  private claimSlot(domid: number, want: number): number {
    const t = this.t;
    for (let s = want >= 0 ? want : 1; s < MAX_DOMAINS; s++) {
      const st = Atomics.load(t.dom, s * D_STRIDE + D_STATE);
      if (st === SLOT_DYING && !hasPinnedGrants(t, s)) this.freeSlot(s);
      if (Atomics.load(t.dom, s * D_STRIDE + D_STATE) !== SLOT_FREE) continue;
      resetGrantSlot(t, s);
      resetEventSlot(t, s);
      // Per-domain counters restart; the global row keeps totals.
      t.ctr.fill(0n, s * C_STRIDE, (s + 1) * C_STRIDE);
      Atomics.store(t.dom, s * D_STRIDE + D_DOMID, domid);
      for (let k = 2; k < D_STRIDE; k++) Atomics.store(t.dom, s * D_STRIDE + k, 0);
      Atomics.store(t.dom, s * D_STRIDE + D_STATE, SLOT_RUNNING);
      return s;
    }
    throw new Error(`no free domain slot (MAX_DOMAINS = ${MAX_DOMAINS})`);
  }

  private freeSlot(s: number): void {
    Atomics.store(this.t.dom, s * D_STRIDE + D_STATE, SLOT_FREE);
  }
}
