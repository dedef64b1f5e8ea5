// The toolstack-facing hypervisor, in the main thread: owns the shared tables, runs dom0 in
// the main thread (dom0 hosts the toolstack and backends), creates guest domains as worker
// threads and tears them down. Only lifecycle goes through here; the data path runs in each
// domain's thread against the shared tables.
// One idea read whole (a little over 500 lines): every domain's life, its threads and its
// memory, from creation to what destruction releases.
import { EventEmitter } from 'node:events';
import { MessageChannel, Worker, type MessagePort, type Transferable } from 'node:worker_threads';
import { checkedByDefault, type ViolationKind, type XenViolation } from './checked.js';
import {
  DEFAULT_MEMORY_PAGES, DEFAULT_POLL_MICROS, EVTCHNSTAT_closed, GTF_type_mask, MAX_DOMAINS, MAX_VCPUS, NR_EVTCHN_PORTS,
  NR_GRANT_ENTRIES, NR_MAPTRACK, XEN_PAGE_SIZE,
} from './constants.js';
import type {
  DomainBootstrap, DomainWorkerData, HypercallRequest, StartVcpuOptions, VcpuExit, VcpuHandle, VcpuService,
} from './domain.js';
import { XenDomain } from './domain.js';
import { closeAllPorts, moveVcpuPorts, resetEventSlot } from './event-channel.js';
import { hasPinnedGrants, releaseAllMappings, releaseVcpuMappings, resetGrantSlot, revokeAllGrants } from './grant-table.js';
import { MemoryRegistry, placePages, type ControlMessage, type Pages } from './memory.js';
import { threadComm } from './thread-name.js';
import {
  C_STRIDE, D_DOMID, D_PAGES, D_STATE, D_STRIDE, G_DOMID, G_FLAGS, G_FRAME, G_STRIDE, M_DOMID, M_FLAGS, M_IN_USE, M_REF,
  M_STRIDE, P_REMOTE_DOMID, P_STATE, P_STRIDE, SharedTables, SLOT_DYING, SLOT_FREE, SLOT_RUNNING, V_ONLINE, V_POLLING, V_STRIDE,
  vcpuWord, type XenCounters,
} from './shared-tables.js';

export interface HypervisorOptions {
  /** dom0's memory, in pages (default DEFAULT_MEMORY_PAGES). */
  readonly dom0MemoryPages?: number;
  /** dom0's polling budget in microseconds (default DEFAULT_POLL_MICROS). */
  readonly dom0PollMicros?: number;
  /**
   * The checked mode (checked.ts, docs/architecture.md): protocol violations real Xen would
   * fault on are recorded, and shutdown() fails if any was not taken. Default: BLKIF_XEN_CHECKED
   * (1/0), else on under `node --test`, else off.
   */
  readonly checked?: boolean;
  /** Domain slots (live domains and zombies still mapped; default MAX_DOMAINS, 32): ~2 MiB of tables each. */
  readonly maxDomains?: number;
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
  /** vCPUs the domain may have, its own thread included (xl `maxvcpus=`; default and most MAX_VCPUS). */
  readonly maxVcpus?: number;
  /**
   * Whose pages the domain's threads can reach to map or copy grants: 'all' (default: every
   * domain's, and each new domain's as it is created — a driver domain's need) or only these
   * domains' (a guest, which grants its pages and maps nobody's: `[]`). Handing a thread a
   * domain's pages costs ~15 µs a page, so a guest that learned every other guest's memory
   * would make each plug slower than the last.
   */
  readonly memoryOf?: 'all' | readonly number[];
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

/** A vCPU thread beyond a domain's own (startVcpu). */
interface VcpuThread {
  readonly vcpu: number;
  readonly worker: Worker;
  readonly control: MessagePort;
  readonly hypercall: MessagePort;
  readonly exited: Promise<VcpuExit>;
  /** True for a domain whose pages the thread maps from (it learns their growth). */
  readonly knows: (domid: number) => boolean;
  error?: unknown;
  stopping: boolean;
}

/** What the hypervisor keeps of a running domain's threads. */
interface Threads {
  readonly slot: number;
  readonly vcpus: Map<number, VcpuThread>;
  /** vCPUs allowed, vCPU 0 included. */
  readonly maxVcpus: number;
  /** Set once destruction began: no vCPU comes up any more. */
  dying: boolean;
}

interface Guest extends Threads {
  handle: DomainHandle;
  control: MessagePort;
  hypercall: MessagePort;
  error?: unknown;
  destroying: boolean;
  resolveExit: (e: DomainExit) => void;
  /** Learns each new domain's memory (CreateDomainOptions.memoryOf 'all'). */
  learnsNewMemory: boolean;
  /** True for a domain whose pages the thread maps from (it learns their growth). */
  readonly knows: (domid: number) => boolean;
}

interface Local extends Threads {
  readonly dom: XenDomain;
}

export class Hypervisor {
  /** dom0, the toolstack/backend domain, running in this (main) thread. */
  readonly dom0: XenDomain;
  private readonly t: SharedTables;
  private readonly registry: MemoryRegistry;
  /** Every domain's pages, as created so far (shared with this thread's registry, grown in place). */
  private readonly memories = new Map<number, (SharedArrayBuffer | undefined)[]>();
  private readonly guests = new Map<number, Guest>();
  private readonly locals = new Map<number, Local>();
  private readonly emitter = new EventEmitter();
  private nextDomid = 1;

  constructor(opts: HypervisorOptions = {}) {
    const maxDomains = opts.maxDomains ?? MAX_DOMAINS;
    if (!Number.isInteger(maxDomains) || maxDomains < 2 || maxDomains > 1024) throw new RangeError(`maxDomains ${maxDomains}: 2..1024`);
    this.t = SharedTables.allocate(opts.checked ?? checkedByDefault(), maxDomains);
    const pages: (SharedArrayBuffer | undefined)[] = [];
    this.memories.set(0, pages);
    this.registry = new MemoryRegistry([[0, pages]]);
    this.claimSlot(0, 0);
    this.dom0 = new XenDomain(this.t, 0, 0, this.registry, pages, opts.dom0PollMicros ?? DEFAULT_POLL_MICROS, undefined, {
      memoryPages: opts.dom0MemoryPages ?? DEFAULT_MEMORY_PAGES, grow: (first, fresh) => this.relayGrowth(0, first, fresh),
    });
  }

  /** True if this hypervisor runs checked: violations are recorded (see `violations`). */
  get checked(): boolean { return this.t.checked; }

  /** Checked mode: the violations recorded and not taken yet, by any domain's thread. */
  violations(): XenViolation[] { return this.t.violations.pending(); }

  /**
   * Checked mode: returns the violations recorded and not taken yet, and takes them (a test that
   * commits one on purpose takes it, so that shutdown() does not fail on it).
   */
  takeViolations(): XenViolation[] { return this.t.violations.take(); }

  /**
   * Checked mode's leak check (grant_table.h: a grant must be ended, and a mapping unmapped,
   * before the device or domain goes; event_channel.h: ports closed): records a violation for
   * every grant `domid` still offers, every mapping it still holds and every port it still has
   * open — towards `peers` only if given, and not towards `ignore`. The toolstack calls it once a
   * domain has shut down cleanly and once a device is unplugged; a test may call it too. Returns
   * what it recorded (nothing outside checked mode).
   */
  checkReleased(domid: number, opts: { peers?: readonly number[]; ignore?: readonly number[] } = {}): XenViolation[] {
    const t = this.t;
    const slot = t.slotOf(domid);
    if (slot < 0) return [];
    const { peers, ignore } = opts;
    const towards = (d: number) => (peers === undefined || peers.includes(d)) && ignore?.includes(d) !== true;
    const found: { kind: ViolationKind; f: { domid: number; peer: number; ref?: number; handle?: number; frame?: number; port?: number } }[] = [];
    for (let ref = 0; ref < NR_GRANT_ENTRIES; ref++) {
      const e = (slot * NR_GRANT_ENTRIES + ref) * G_STRIDE;
      if ((Atomics.load(t.gnt, e + G_FLAGS) & GTF_type_mask) === 0) continue;
      const peer = Atomics.load(t.gnt, e + G_DOMID);
      if (towards(peer)) found.push({ kind: 'grant-leaked', f: { domid, peer, ref, frame: Atomics.load(t.gnt, e + G_FRAME) } });
    }
    for (let h = 0; h < NR_MAPTRACK; h++) {
      const m = (slot * NR_MAPTRACK + h) * M_STRIDE;
      if ((Atomics.load(t.mt, m + M_FLAGS) & M_IN_USE) === 0) continue;
      const peer = Atomics.load(t.mt, m + M_DOMID);
      if (towards(peer)) found.push({ kind: 'mapping-leaked', f: { domid, peer, ref: Atomics.load(t.mt, m + M_REF), handle: h } });
    }
    for (let port = 1; port < NR_EVTCHN_PORTS; port++) {
      const p = (slot * NR_EVTCHN_PORTS + port) * P_STRIDE;
      if (Atomics.load(t.port, p + P_STATE) === EVTCHNSTAT_closed) continue;
      const peer = Atomics.load(t.port, p + P_REMOTE_DOMID);
      if (towards(peer)) found.push({ kind: 'port-leaked', f: { domid, peer, port } });
    }
    if (!t.checked || found.length === 0) return [];
    const before = t.violations.pending().length;
    for (const { kind, f } of found) t.violations.record(kind, f);
    return t.violations.pending().slice(before);
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

  /** Whether a vCPU of `domid` is polling its upcall right now (an observer's view, for tests). */
  isPolling(domid: number, vcpu = 0): boolean {
    const slot = this.t.slotOf(domid);
    return slot >= 0 && Atomics.load(this.t.dom, vcpuWord(slot, vcpu, V_POLLING)) !== 0;
  }

  /**
   * Pages a domain has created so far (each costs its 4 KiB from then on; the rest of its
   * memoryPages cost nothing), as every thread can learn them; undefined once it is gone.
   */
  createdPages(domid: number): number | undefined {
    const pages = this.memories.get(domid);
    if (pages === undefined) return undefined;
    let n = 0;
    for (const p of pages) if (p !== undefined) n++;
    return n;
  }

  /**
   * Claims a domid and a table slot, and gives the domain memory that every thread learns of:
   * none yet; its thread creates pages as it allocates them (relayGrowth).
   */
  private newDomain(memoryPages: number | undefined): { domid: number; slot: number; pages: (SharedArrayBuffer | undefined)[]; memoryPages: number } {
    const size = memoryPages ?? DEFAULT_MEMORY_PAGES;
    if (!Number.isInteger(size) || size < 0) throw new RangeError(`memoryPages ${size}`);
    const domid = this.nextDomid++;
    const slot = this.claimSlot(domid, -1);
    const pages: (SharedArrayBuffer | undefined)[] = [];
    // Every thread learns the new domain before the domid can reach it (see memory.ts).
    this.memories.set(domid, pages);
    this.registry.add(domid, pages);
    this.broadcast({ t: 'mem', domid, pages });
    return { domid, slot, pages, memoryPages: size };
  }

  /**
   * A domain created pages for frames first..: every thread that maps from it learns them on its
   * control port (posted before the domain may grant one), then D_PAGES says so to the domain's
   * thread waiting for it. A domain in this thread comes here directly.
   */
  private relayGrowth(domid: number, first: number, fresh: readonly SharedArrayBuffer[]): void {
    const pages = this.memories.get(domid);
    const slot = this.t.slotOf(domid);
    if (pages === undefined || slot < 0) return; // going: its thread gives up waiting
    if (!Number.isInteger(first) || first < 0 || !Array.isArray(fresh)
        || !fresh.every((p) => p instanceof SharedArrayBuffer && p.byteLength === XEN_PAGE_SIZE)) return;
    placePages(pages, first, fresh);
    const msg: ControlMessage = { t: 'grow', domid, first, pages: fresh };
    for (const g of this.guests.values()) {
      if (g.handle.domid !== domid && g.knows(domid)) g.control.postMessage(msg);
      for (const v of g.vcpus.values()) if (v.knows(domid)) v.control.postMessage(msg);
    }
    for (const l of this.locals.values()) for (const v of l.vcpus.values()) if (v.knows(domid)) v.control.postMessage(msg);
    const word = slot * D_STRIDE + D_PAGES;
    if (Atomics.load(this.t.dom, word) < first + fresh.length) Atomics.store(this.t.dom, word, first + fresh.length);
    Atomics.notify(this.t.dom, word);
  }

  /** Creates a guest domain running `script` in a worker thread; resolves once the thread is online. */
  async createDomain(opts: CreateDomainOptions): Promise<DomainHandle> {
    const { domid, slot, memoryPages } = this.newDomain(opts.memoryPages);
    const { port1, port2 } = new MessageChannel();
    const hc = new MessageChannel();
    const memoryOf = opts.memoryOf ?? 'all';
    const xen: DomainBootstrap = {
      tables: this.t.init, domid, slot, vcpu: 0, memories: this.startMemories(domid, memoryOf), memoryPages, control: port2,
      hypercall: hc.port2, pollMicros: opts.pollMicros ?? DEFAULT_POLL_MICROS, threadName: threadComm(opts.name ?? `dom${domid}`, 0),
    };
    const wd: DomainWorkerData = { xen, app: opts.workerData };
    const worker = new Worker(opts.script, {
      workerData: wd,
      transferList: [port2, hc.port2, ...(opts.transferList ?? [])],
      name: opts.name ?? `dom${domid}`,
    });
    let resolveExit!: (e: DomainExit) => void;
    const exited = new Promise<DomainExit>((r) => { resolveExit = r; });
    const g: Guest = {
      handle: { domid, name: opts.name ?? `dom${domid}`, worker, exited },
      slot, control: port1, hypercall: hc.port1, destroying: false, resolveExit, vcpus: new Map(), dying: false,
      maxVcpus: vcpuLimit(opts.maxVcpus), learnsNewMemory: memoryOf === 'all',
      knows: memoryOf === 'all' ? () => true : (d) => d === domid || memoryOf.includes(d),
    };
    this.guests.set(domid, g);
    this.serveHypercalls(domid, g, hc.port1, opts.name ?? `dom${domid}`, opts.pollMicros);
    worker.on('error', (err) => { g.error = err; });
    worker.once('exit', (code) => void this.reap(g, code));
    await online(worker, () => new Error(`domain ${domid} exited during start: ${String(g.error)}`));
    return g.handle;
  }

  /**
   * Creates a domain whose code runs in the calling (main) thread, like dom0: for tests,
   * benchmarks and single-threaded setups. Same rules as a worker domain; destroyDomain() ends it.
   * It can start vCPU threads like any domain.
   */
  createLocalDomain(opts: { memoryPages?: number; pollMicros?: number; maxVcpus?: number } = {}): XenDomain {
    const { domid, slot, pages, memoryPages } = this.newDomain(opts.memoryPages);
    const pollMicros = opts.pollMicros ?? DEFAULT_POLL_MICROS;
    let rec: Local | undefined;
    const vcpus: VcpuService = {
      up: (o) => (rec === undefined ? Promise.reject(new Error('domain gone')) : this.startVcpu(domid, rec, o, `dom${domid}`, pollMicros)),
      down: (v) => (rec === undefined ? Promise.reject(new Error('domain gone')) : this.downVcpu(rec, v)),
    };
    const dom = new XenDomain(this.t, domid, slot, this.registry, pages, pollMicros, undefined, {
      vcpus, memoryPages, grow: (first, fresh) => this.relayGrowth(domid, first, fresh),
    });
    rec = { slot, dom, vcpus: new Map(), dying: false, maxVcpus: vcpuLimit(opts.maxVcpus) };
    this.locals.set(domid, rec);
    return dom;
  }

  /** Running vCPU threads of a domain (besides its own thread). */
  vcpusOf(domid: number): number[] {
    const rec = this.guests.get(domid) ?? this.locals.get(domid);
    return rec === undefined ? [] : [...rec.vcpus.keys()];
  }

  /** Answers a domain thread's vCPU requests (its hypercall port). */
  private serveHypercalls(domid: number, rec: Threads, port: MessagePort, name: string, pollMicros: number | undefined): void {
    port.on('message', (m: HypercallRequest) => {
      if (m.t === 'up') {
        const opts: StartVcpuOptions = {
          script: new URL(m.script), workerData: m.workerData, transferList: m.transferList,
          ...(m.frames === undefined ? {} : { frames: m.frames }),
          ...(m.pollMicros === undefined ? {} : { pollMicros: m.pollMicros }),
          ...(m.peers === undefined ? {} : { peers: m.peers }),
          ...(m.name === undefined ? {} : { name: m.name }),
        };
        this.startVcpu(domid, rec, opts, name, pollMicros).then(
          (h) => {
            port.postMessage({ t: 'up', id: m.id, vcpu: h.vcpu });
            void h.exited.then((exit) => { try { port.postMessage({ t: 'exit', exit }); } catch { /* domain gone */ } });
          },
          (e: unknown) => port.postMessage({ t: 'up', id: m.id, error: (e as Error).message }),
        );
      } else if (m.t === 'grow') {
        this.relayGrowth(domid, m.first, m.pages);
      } else if (m.t === 'down') {
        this.downVcpu(rec, m.vcpu).then(
          (exit) => port.postMessage({ t: 'down', id: m.id, exit }),
          (e: unknown) => port.postMessage({ t: 'down', id: m.id, error: (e as Error).message }),
        );
      }
    });
    port.unref(); // the domain's thread, not this port, keeps things alive
  }

  /** VCPUOP_up with a thread as the vCPU: same domain, its own upcall word and event loop. */
  private async startVcpu(domid: number, rec: Threads, opts: StartVcpuOptions, domName: string,
                          domainPoll: number | undefined): Promise<VcpuHandle> {
    if (rec.dying) throw new Error(`domain ${domid} is being destroyed`);
    let vcpu = 1;
    while (vcpu < rec.maxVcpus && rec.vcpus.has(vcpu)) vcpu++;
    if (vcpu >= rec.maxVcpus) throw new Error(`domain ${domid} has no free vCPU (maxvcpus ${rec.maxVcpus})`);
    const { slot } = rec;
    for (let k = 0; k < V_STRIDE; k++) Atomics.store(this.t.dom, vcpuWord(slot, vcpu, k), 0);
    Atomics.store(this.t.dom, vcpuWord(slot, vcpu, V_ONLINE), 1);
    const { port1, port2 } = new MessageChannel();
    const hc = new MessageChannel();
    const pollMicros = opts.pollMicros ?? domainPoll ?? DEFAULT_POLL_MICROS;
    const frames = [...(opts.frames ?? [])];
    const xen: DomainBootstrap = {
      tables: this.t.init, domid, slot, vcpu, memories: this.vcpuMemories(domid, frames, opts.peers), memoryPages: 0, control: port2,
      hypercall: hc.port2, pollMicros, frames, threadName: threadComm(domName, vcpu),
    };
    const worker = new Worker(opts.script, {
      workerData: { xen, app: opts.workerData } satisfies DomainWorkerData,
      transferList: [port2, hc.port2, ...(opts.transferList ?? [])],
      name: opts.name ?? `${domName}.vcpu${vcpu}`,
    });
    let resolveExit!: (e: VcpuExit) => void;
    const exited = new Promise<VcpuExit>((r) => { resolveExit = r; });
    const peers = opts.peers;
    const v: VcpuThread = {
      vcpu, worker, control: port1, hypercall: hc.port1, exited, stopping: false,
      knows: peers === undefined ? () => true : (d) => peers.includes(d),
    };
    rec.vcpus.set(vcpu, v);
    this.serveHypercalls(domid, rec, hc.port1, domName, pollMicros);
    worker.on('error', (err) => { v.error = err; });
    worker.once('exit', (exitCode) => {
      rec.vcpus.delete(vcpu);
      port1.close();
      hc.port1.close();
      // Its mappings end with it; its ports notify vCPU 0 from now on (unless the whole domain is going).
      if (!rec.dying) {
        Atomics.store(this.t.dom, vcpuWord(slot, vcpu, V_ONLINE), 0);
        releaseVcpuMappings(this.t, slot, vcpu, this.pageOf);
        moveVcpuPorts(this.t, slot, vcpu);
      }
      const exit: VcpuExit = v.error === undefined
        ? { vcpu, exitCode, stopped: v.stopping }
        : { vcpu, exitCode, stopped: v.stopping, error: String((v.error as Error).stack ?? v.error) };
      resolveExit(exit);
    });
    await online(worker, () => new Error(`vCPU ${vcpu} of domain ${domid} exited during start: ${String(v.error)}`));
    return { vcpu, exited };
  }

  /** Takes a domain's vCPU down from outside (as `xl vcpu-set` would), ending its thread. */
  async stopVcpu(domid: number, vcpu: number): Promise<VcpuExit> {
    const rec = this.guests.get(domid) ?? this.locals.get(domid);
    if (rec === undefined) throw new Error(`no such domain ${domid}`);
    return this.downVcpu(rec, vcpu);
  }

  /** What a new domain's thread learns: its own pages and those of `memoryOf`. */
  private startMemories(domid: number, memoryOf: 'all' | readonly number[]): [number, Pages][] {
    if (memoryOf === 'all') return [...this.memories.entries()];
    return [...this.memories.entries()].filter(([d]) => d === domid || memoryOf.includes(d));
  }

  /** What a new vCPU thread learns: its domain's lent frames, and its peers' pages (or everyone's). */
  private vcpuMemories(domid: number, frames: readonly number[], peers: readonly number[] | undefined): [number, Pages][] {
    if (peers === undefined) return [...this.memories.entries()];
    const own = this.memories.get(domid) ?? [];
    const lent: (SharedArrayBuffer | undefined)[] = [];
    for (const f of frames) if (own[f] !== undefined) lent[f] = own[f];
    const out: [number, Pages][] = [[domid, lent]];
    for (const p of peers) {
      const pages = this.memories.get(p);
      if (p !== domid && pages !== undefined) out.push([p, pages]);
    }
    return out;
  }

  private async downVcpu(rec: Threads, vcpu: number): Promise<VcpuExit> {
    const v = rec.vcpus.get(vcpu);
    if (v === undefined) throw new Error(`no vCPU ${vcpu}`);
    v.stopping = true;
    await v.worker.terminate();
    return v.exited;
  }

  /** Ends every vCPU thread of a domain being destroyed (before its tables are released). */
  private async stopAllVcpus(rec: Threads): Promise<void> {
    rec.dying = true;
    await Promise.all([...rec.vcpus.keys()].map((v) => this.downVcpu(rec, v).catch(() => undefined)));
  }

  /** Destroys a guest: stops its thread and releases everything it held. */
  async destroyDomain(domid: number): Promise<DomainExit> {
    const local = this.locals.get(domid);
    if (local !== undefined) {
      this.locals.delete(domid);
      await this.stopAllVcpus(local);
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

  /**
   * Destroys every guest and releases dom0's thread-local resources. In checked mode, then
   * fails if a violation was recorded and not taken (so a test suite cannot miss one).
   */
  async shutdown(): Promise<void> {
    await Promise.all(this.domids.map(async (d) => { await this.destroyDomain(d); }));
    this.dom0.dispose();
    const left = this.t.checked ? this.t.violations.take() : [];
    if (left.length > 0) {
      const shown = left.slice(0, 20).map((v) => `  ${v.kind}: ${v.message}`);
      if (left.length > 20) shown.push(`  ... and ${left.length - 20} more`);
      throw new Error(`checked hypervisor: ${left.length} protocol violation(s) nobody expected:\n${shown.join('\n')}`);
    }
  }

  /** Teardown after the domain's threads are gone (they cannot race its tables any more). */
  private async reap(g: Guest, exitCode: number): Promise<void> {
    const { domid } = g.handle;
    if (!this.guests.has(domid) || g.dying) return;
    await this.stopAllVcpus(g);
    this.guests.delete(domid);
    g.control.close();
    g.hypercall.close();
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
    releaseAllMappings(t, slot, this.pageOf);
    revokeAllGrants(t, slot);
    this.memories.delete(domid);
    this.registry.remove(domid);
    this.broadcast({ t: 'gone', domid });
    if (!hasPinnedGrants(t, slot)) this.freeSlot(slot);
  }

  private readonly pageOf = (domid: number, frame: number): SharedArrayBuffer | undefined => this.registry.page(domid, frame);

  private broadcast(msg: ControlMessage): void {
    for (const g of this.guests.values()) {
      // A domain that maps only from the peers it named at creation needs no new domain's pages.
      if (msg.t === 'mem' && !g.learnsNewMemory) continue;
      g.control.postMessage(msg);
      for (const v of g.vcpus.values()) v.control.postMessage(msg);
    }
    for (const l of this.locals.values()) for (const v of l.vcpus.values()) v.control.postMessage(msg);
  }

  /** Finds a free slot (reclaiming zombies nobody maps any more) and marks it running. */
  private claimSlot(domid: number, want: number): number {
    const t = this.t;
    for (let s = want >= 0 ? want : 1; s < t.maxDomains; s++) {
      const st = Atomics.load(t.dom, s * D_STRIDE + D_STATE);
      if (st === SLOT_DYING && !hasPinnedGrants(t, s)) this.freeSlot(s);
      if (Atomics.load(t.dom, s * D_STRIDE + D_STATE) !== SLOT_FREE) continue;
      resetGrantSlot(t, s);
      resetEventSlot(t, s);
      // Per-domain counters restart; the global row keeps totals.
      t.ctr.fill(0n, s * C_STRIDE, (s + 1) * C_STRIDE);
      Atomics.store(t.dom, s * D_STRIDE + D_DOMID, domid);
      for (let k = 2; k < D_STRIDE; k++) Atomics.store(t.dom, s * D_STRIDE + k, 0);
      Atomics.store(t.dom, vcpuWord(s, 0, V_ONLINE), 1);
      Atomics.store(t.dom, s * D_STRIDE + D_STATE, SLOT_RUNNING);
      return s;
    }
    throw new Error(`no free domain slot (${t.maxDomains} in this hypervisor)`);
  }

  private freeSlot(s: number): void {
    Atomics.store(this.t.dom, s * D_STRIDE + D_STATE, SLOT_FREE);
  }
}

/** Resolves once a new worker runs; rejects if it exits first. */
function online(worker: Worker, failure: () => Error): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const onOnline = () => { worker.off('exit', onExit); resolve(); };
    const onExit = () => { worker.off('online', onOnline); reject(failure()); };
    worker.once('online', onOnline);
    worker.once('exit', onExit);
  });
}

function vcpuLimit(n: number | undefined): number {
  if (n === undefined) return MAX_VCPUS;
  if (!Number.isInteger(n) || n < 1 || n > MAX_VCPUS) throw new RangeError(`maxVcpus ${n}: use 1..${MAX_VCPUS}`);
  return n;
}
