// The hypervisor's state, kept in SharedArrayBuffers so that every thread's copy of the
// hypervisor code runs the data path (grant map/unmap/copy, event send) synchronously, with
// Atomics, and no message to the main thread. Layout is ours; the semantics are Xen's.
import { allocateViolationLog, checkedByDefault, ViolationLog } from './checked.js';
import {
  MAX_DOMAINS, MAX_VCPUS, NR_EVTCHN_PORTS, NR_GRANT_ENTRIES, NR_MAPTRACK,
} from './constants.js';

/** The buffers behind the tables; structured-cloneable, handed to every domain thread. */
export interface SharedTablesInit {
  readonly domains: SharedArrayBuffer;
  readonly counters: SharedArrayBuffer;
  readonly grants: SharedArrayBuffer;
  readonly maptrack: SharedArrayBuffer;
  readonly ports: SharedArrayBuffer;
  readonly portCounters: SharedArrayBuffer;
  readonly pending: SharedArrayBuffer;
  readonly mask: SharedArrayBuffer;
  /** The checked mode's violation log (checked.ts). */
  readonly violations: SharedArrayBuffer;
  /** The checked mode (checked.ts): decided once by the Hypervisor, the same in every thread. */
  readonly checked: boolean;
  /** Domain slots the tables hold (MAX_DOMAINS unless the Hypervisor asked for more). */
  readonly maxDomains: number;
}

// ---- Domain record (Int32, per slot): state and domid, then one block per vCPU ----
export const D_STATE = 0;
export const D_DOMID = 1;
/**
 * Frames of the domain that have a page every thread can learn (memory.ts): the main thread
 * raises it once it has relayed a batch the domain's thread created, which waits on it.
 */
export const D_PAGES = 2;
/** Offset of vCPU 0's block; vCPU v's block is at D_VCPUS + v * V_STRIDE. */
export const D_VCPUS = 4;
/** evtchn_upcall_pending (xen.h, struct vcpu_info): the word a sleeping vCPU waits on. */
export const V_UPCALL = 0;
/** 1 while the vCPU sleeps in Atomics.waitAsync: senders skip Atomics.notify otherwise. */
export const V_SLEEPING = 1;
/** 1 while the vCPU spins in its polling budget (observability, tests). */
export const V_POLLING = 2;
/** 1 while the vCPU is up (vCPU 0 from domain creation; others from startVcpu to their exit). */
export const V_ONLINE = 3;
export const V_STRIDE = 4;
export const D_STRIDE = D_VCPUS + MAX_VCPUS * V_STRIDE;
/** Index in `dom` of one word of a vCPU's block. */
export const vcpuWord = (slot: number, vcpu: number, field: number): number => slot * D_STRIDE + D_VCPUS + vcpu * V_STRIDE + field;

export const SLOT_FREE = 0;
export const SLOT_RUNNING = 1;
/** Destroyed; kept while peers still map its grants (Xen keeps such a domain as a zombie). */
export const SLOT_DYING = 2;

// ---- Counters (BigInt64, one row per slot, plus one global row after them) ----
export const C_GRANTS_ACTIVE = 0;
export const C_MAPS_ACTIVE = 1;
export const C_PORTS_OPEN = 2;
export const C_CHANNELS_BOUND = 3;
export const C_MAP_OPS = 4;
export const C_UNMAP_OPS = 5;
export const C_COPY_OPS = 6;
export const C_COPY_BYTES = 7;
export const C_NOTIFY_SENT = 8;
export const C_NOTIFY_RECEIVED = 9;
export const C_NOTIFY_COALESCED = 10;
export const C_NOTIFY_DROPPED = 11;
export const C_WAKES = 12;
export const C_POLL_HITS = 13;
export const C_SLEEPS = 14;
/** Young-generation collections (V8 scavenges) in the domain's threads: what its code allocates. */
export const C_SCAVENGES = 15;
export const C_STRIDE = 16;

// ---- Grant entry (Int32 x 4, per slot per ref) ----
// Word 0 holds the v1 flags (low 16 bits, grant_table.h struct grant_entry_v1) and the pin
// counts Xen keeps in its active entry, so that ending a grant and mapping it race on one
// compare-exchange, as gnttab_end_foreign_access_ref races Xen's _set_status_v1.
export const G_FLAGS = 0;
export const G_DOMID = 1;
export const G_FRAME = 2;
/** Checked mode: fingerprint of the page at the last unmap that left the entry unpinned. */
export const G_FP = 3;
/** Checked mode: G_CHK_* bits. */
export const G_CHECK = 4;
/** Checked mode: the mapper's handle whose unmap armed G_FP. */
export const G_LAST_HANDLE = 5;
/** Checked mode: writable pins taken so far (a read-only mapping's page may change while one exists). */
export const G_WPINS = 6;
export const G_STRIDE = 8;
/** The granter said the grant is long-lived (a ring, a persistent grant): both sides write it. */
export const G_CHK_LASTING = 1;
/** The granter ended the entry (it was valid before): a later map or copy uses an ended grant. */
export const G_CHK_ENDED = 2;
/**
 * Bit 31 of the flags word (checked mode): G_FP holds the page's fingerprint at the unmap that
 * left the entry unpinned. Lives in the flags word so that a pin clears it in the same
 * compare-exchange.
 */
export const G_ARMED = 1 << 31;
export const G_FLAGS_MASK = 0xffff;
export const PIN_R = 1 << 16;
export const PIN_R_MASK = 0xff << 16;
export const PIN_W = 1 << 24;
export const PIN_W_MASK = 0x7f << 24;

// ---- Maptrack entry (Int32 x 4, per mapping slot per handle) ----
export const M_FLAGS = 0; // 0 = free; M_RESERVED = on one thread's free list; else M_IN_USE | vCPU | GNTMAP_* flags (low 8 bits)
export const M_SLOT = 1;
export const M_REF = 2;
export const M_DOMID = 3;
export const M_STRIDE = 4;
export const M_IN_USE = 1 << 30;
/** Claimed by one thread of the domain for its free list (Xen keeps a maptrack free list per vCPU). */
export const M_RESERVED = 1 << 29;
/** Bits 16..23: the vCPU that mapped (or reserved) the entry; its thread's end releases them. */
export const M_VCPU_SHIFT = 16;
export const M_VCPU_MASK = 0xff << M_VCPU_SHIFT;

// ---- Event-channel port (Int32 x 4, per slot per port) ----
export const P_STATE = 0;
export const P_REMOTE_DOMID = 1;
export const P_REMOTE_PORT = 2;
export const P_REMOTE_SLOT = 3;
/** The vCPU whose upcall a send raises (Xen's notify_vcpu_id; EVTCHNOP_bind_vcpu moves it). */
export const P_VCPU = 4;
export const P_STRIDE = 8;
// Transient states (ours) on top of EVTCHNSTAT_closed/unbound/interdomain.
export const PS_RESERVED = 16;
export const PS_BINDING = 17;
export const PS_CLOSING = 18;
/** Port counters (BigInt64 x 2): notifications sent from, and received on, the port. */
export const PC_SENT = 0;
export const PC_RECEIVED = 1;
export const PC_STRIDE = 2;
export const PORT_WORDS = NR_EVTCHN_PORTS / 32;

/** Typed views over the shared buffers, one set per thread. */
export class SharedTables {
  readonly init: SharedTablesInit;
  readonly dom: Int32Array;
  readonly ctr: BigInt64Array;
  readonly gnt: Int32Array;
  readonly mt: Int32Array;
  readonly port: Int32Array;
  readonly pctr: BigInt64Array;
  readonly pending: Int32Array;
  readonly mask: Int32Array;
  private readonly slotCache = new Map<number, number>();

  readonly checked: boolean;
  readonly violations: ViolationLog;

  static allocate(checked: boolean = checkedByDefault(), maxDomains: number = MAX_DOMAINS): SharedTables {
    const sab = (bytes: number) => new SharedArrayBuffer(bytes);
    const n = maxDomains;
    return new SharedTables({
      domains: sab(n * D_STRIDE * 4),
      counters: sab((n + 1) * C_STRIDE * 8),
      grants: sab(n * NR_GRANT_ENTRIES * G_STRIDE * 4),
      maptrack: sab(n * NR_MAPTRACK * M_STRIDE * 4),
      ports: sab(n * NR_EVTCHN_PORTS * P_STRIDE * 4),
      portCounters: sab(n * NR_EVTCHN_PORTS * PC_STRIDE * 8),
      pending: sab(n * PORT_WORDS * 4),
      mask: sab(n * PORT_WORDS * 4),
      violations: allocateViolationLog(),
      checked,
      maxDomains: n,
    });
  }

  /** Domain slots these tables hold. */
  get maxDomains(): number {
    return this.init.maxDomains;
  }

  /** The counters row that sums every slot's. */
  get globalRow(): number {
    return this.init.maxDomains;
  }

  constructor(init: SharedTablesInit) {
    this.init = init;
    this.dom = new Int32Array(init.domains);
    this.ctr = new BigInt64Array(init.counters);
    this.gnt = new Int32Array(init.grants);
    this.mt = new Int32Array(init.maptrack);
    this.port = new Int32Array(init.ports);
    this.pctr = new BigInt64Array(init.portCounters);
    this.pending = new Int32Array(init.pending);
    this.mask = new Int32Array(init.mask);
    this.checked = init.checked;
    this.violations = new ViolationLog(init.violations);
  }

  /** Slot of a domain in the given state (running by default), or -1. Domids are never reused. */
  slotOf(domid: number, state: number = SLOT_RUNNING): number {
    const cached = this.slotCache.get(domid);
    if (cached !== undefined && Atomics.load(this.dom, cached * D_STRIDE + D_DOMID) === domid) {
      return Atomics.load(this.dom, cached * D_STRIDE + D_STATE) === state ? cached : -1;
    }
    for (let s = 0; s < this.init.maxDomains; s++) {
      const b = s * D_STRIDE;
      if (Atomics.load(this.dom, b + D_STATE) !== SLOT_FREE && Atomics.load(this.dom, b + D_DOMID) === domid) {
        this.slotCache.set(domid, s);
        return Atomics.load(this.dom, b + D_STATE) === state ? s : -1;
      }
    }
    return -1;
  }

  /** Adds to a counter of a slot and to the global row. */
  count(slot: number, c: number, n: bigint = 1n): void {
    Atomics.add(this.ctr, slot * C_STRIDE + c, n);
    Atomics.add(this.ctr, this.init.maxDomains * C_STRIDE + c, n);
  }

  counter(row: number, c: number): number {
    return Number(Atomics.load(this.ctr, row * C_STRIDE + c));
  }
}

/** A snapshot of counters, for one domain or for the whole hypervisor. */
export interface XenCounters {
  /** Grant entries currently permitting access (granted and not ended or revoked). */
  grantsActive: number;
  /** Grant mappings currently held. */
  mapsActive: number;
  /** Event-channel ports not closed (unbound or interdomain). */
  portsOpen: number;
  /** Ports in the interdomain state (a connected channel counts once on each of its two ends). */
  channelsBound: number;
  mapOps: number;
  unmapOps: number;
  copyOps: number;
  copyBytes: number;
  notifySent: number;
  /** Events delivered to the domain's code (pending bits consumed by wait()). */
  notifyReceived: number;
  /** Notifies that found the pending bit already set (coalesced, no second wake). */
  notifyCoalesced: number;
  /** Notifies on an unbound port (Xen drops them silently). */
  notifyDropped: number;
  /** Upcalls raised (evtchn_upcall_pending went 0 -> 1). */
  wakes: number;
  /** Waits satisfied while polling (a sleep saved). */
  pollHits: number;
  /** Waits that went to sleep in Atomics.waitAsync. */
  sleeps: number;
  /** V8 scavenges in the domain's threads (each follows a young generation's worth of allocation). */
  scavenges: number;
}

export function readCounters(t: SharedTables, row: number): XenCounters {
  const c = (i: number) => t.counter(row, i);
  return {
    grantsActive: c(C_GRANTS_ACTIVE), mapsActive: c(C_MAPS_ACTIVE), portsOpen: c(C_PORTS_OPEN),
    channelsBound: c(C_CHANNELS_BOUND), mapOps: c(C_MAP_OPS), unmapOps: c(C_UNMAP_OPS),
    copyOps: c(C_COPY_OPS), copyBytes: c(C_COPY_BYTES), notifySent: c(C_NOTIFY_SENT),
    notifyReceived: c(C_NOTIFY_RECEIVED), notifyCoalesced: c(C_NOTIFY_COALESCED),
    notifyDropped: c(C_NOTIFY_DROPPED), wakes: c(C_WAKES), pollHits: c(C_POLL_HITS), sleeps: c(C_SLEEPS),
    scavenges: c(C_SCAVENGES),
  };
}
