// Event channels (event_channel.h), 2-level ABI flavour: per-port pending and mask bits in
// shared bitmaps, and one evtchn_upcall_pending word per vCPU that a sleeping vCPU waits on.
// Each port notifies one vCPU (notify_vcpu_id): vCPU 0 unless EVTCHNOP_bind_vcpu named another;
// a vCPU's scan takes only its own ports.
// A send sets the remote pending bit; only a 0 -> 1 transition of an unmasked port raises the
// upcall, and only a raised upcall of a sleeping domain costs an Atomics.notify, so repeated
// sends before the peer runs coalesce into one wake-up as on Xen.
// One file (about 500 lines) on purpose: every operation here (alloc/bind/send/close/mask and the
// wait loop) reads and writes the same per-port and per-vCPU words with the same memory-ordering
// rules, as Xen keeps them in one event_channel.c; split, the ordering argument would span files.
import { performance } from 'node:perf_hooks';
import {
  DEFAULT_POLL_MICROS, DOMID_SELF, EINVAL, ENOENT, ENOSPC, ESRCH, EVTCHNSTAT_closed, EVTCHNSTAT_interdomain,
  EVTCHNSTAT_unbound, MAX_VCPUS, NR_EVTCHN_PORTS,
} from './constants.js';
import {
  C_CHANNELS_BOUND, C_NOTIFY_COALESCED, C_NOTIFY_DROPPED, C_NOTIFY_RECEIVED, C_NOTIFY_SENT, C_POLL_HITS,
  C_PORTS_OPEN, C_SLEEPS, C_WAKES, P_REMOTE_DOMID, P_REMOTE_PORT, P_REMOTE_SLOT, P_STATE, P_STRIDE, P_VCPU,
  PC_RECEIVED, PC_SENT, PC_STRIDE, PORT_WORDS, PS_BINDING, PS_CLOSING, PS_RESERVED, V_ONLINE, V_POLLING,
  V_SLEEPING, V_UPCALL, vcpuWord, type SharedTables,
} from './shared-tables.js';


const pidx = (slot: number, port: number) => (slot * NR_EVTCHN_PORTS + port) * P_STRIDE;
const validPort = (port: number) => Number.isInteger(port) && port > 0 && port < NR_EVTCHN_PORTS;

/** Raises a vCPU's upcall; wakes it only if it sleeps (see file comment). */
export function raiseUpcall(t: SharedTables, slot: number, vcpu: number): void {
  const u = vcpuWord(slot, vcpu, V_UPCALL);
  if (Atomics.compareExchange(t.dom, u, 0, 1) !== 0) return;
  t.count(slot, C_WAKES);
  if (Atomics.load(t.dom, vcpuWord(slot, vcpu, V_SLEEPING)) !== 0) Atomics.notify(t.dom, u);
}

/** The vCPU a port of `slot` notifies. */
const notifyVcpu = (t: SharedTables, slot: number, port: number): number => Atomics.load(t.port, pidx(slot, port) + P_VCPU);

/**
 * A vCPU went down: its ports notify vCPU 0 from now on (as Linux moves the IRQs of a CPU going
 * offline), and vCPU 0 is woken for any of them already pending.
 */
export function moveVcpuPorts(t: SharedTables, slot: number, vcpu: number): void {
  let pending = false;
  for (let p = 1; p < NR_EVTCHN_PORTS; p++) {
    const i = pidx(slot, p);
    if (Atomics.load(t.port, i + P_VCPU) !== vcpu) continue;
    Atomics.store(t.port, i + P_VCPU, 0);
    if ((Atomics.load(t.pending, slot * PORT_WORDS + (p >>> 5)) & (1 << (p & 31))) !== 0) pending = true;
  }
  if (pending) raiseUpcall(t, slot, 0);
}

/** evtchn_port_set_pending: sets the pending bit; a masked port stays pending until unmask. */
export function setPending(t: SharedTables, slot: number, port: number): boolean {
  const w = slot * PORT_WORDS + (port >>> 5);
  const bit = 1 << (port & 31);
  if ((Atomics.or(t.pending, w, bit) & bit) !== 0) {
    t.count(slot, C_NOTIFY_COALESCED);
    return false;
  }
  if ((Atomics.load(t.mask, w) & bit) === 0) raiseUpcall(t, slot, notifyVcpu(t, slot, port));
  return true;
}

/**
 * EVTCHNOP_close for a port of `slot` (also used at domain teardown). An interdomain peer's
 * port goes back to unbound towards us (as Xen's evtchn_close does) and, beyond Xen, is made
 * pending so that the peer notices. Returns 0 or -EINVAL.
 */
export function closePort(t: SharedTables, slot: number, port: number): number {
  if (!validPort(port)) return -EINVAL;
  const i = pidx(slot, port);
  let wasBound = false;
  for (let spins = 0; ; spins++) {
    const st = Atomics.load(t.port, i + P_STATE);
    if (st === EVTCHNSTAT_closed || st === PS_CLOSING) return -EINVAL;
    if (st === PS_RESERVED) {
      // Only seen at teardown: the owner died between reserving and opening the port (it was
      // never counted as open).
      Atomics.compareExchange(t.port, i + P_STATE, PS_RESERVED, EVTCHNSTAT_closed);
      return -EINVAL;
    }
    // PS_BINDING: a peer is mid-bind, which takes a few stores; if the peer died there, stop
    // waiting after a bounded spin and close the port as unbound.
    if (st === PS_BINDING && spins < 1_000_000) continue;
    if (Atomics.compareExchange(t.port, i + P_STATE, st, PS_CLOSING) === st) {
      wasBound = st === EVTCHNSTAT_interdomain;
      break;
    }
  }
  if (wasBound) {
    const rslot = Atomics.load(t.port, i + P_REMOTE_SLOT);
    const rport = Atomics.load(t.port, i + P_REMOTE_PORT);
    const r = pidx(rslot, rport);
    if (Atomics.load(t.port, r + P_REMOTE_SLOT) === slot && Atomics.load(t.port, r + P_REMOTE_PORT) === port
        && Atomics.compareExchange(t.port, r + P_STATE, EVTCHNSTAT_interdomain, EVTCHNSTAT_unbound) === EVTCHNSTAT_interdomain) {
      t.count(rslot, C_CHANNELS_BOUND, -1n);
      setPending(t, rslot, rport);
    }
    t.count(slot, C_CHANNELS_BOUND, -1n);
  }
  const w = slot * PORT_WORDS + (port >>> 5);
  const bit = 1 << (port & 31);
  Atomics.and(t.pending, w, ~bit);
  Atomics.and(t.mask, w, ~bit);
  Atomics.store(t.port, i + P_REMOTE_DOMID, 0);
  Atomics.store(t.port, i + P_REMOTE_PORT, 0);
  Atomics.store(t.port, i + P_REMOTE_SLOT, 0);
  Atomics.store(t.port, i + P_VCPU, 0);
  Atomics.store(t.port, i + P_STATE, EVTCHNSTAT_closed);
  t.count(slot, C_PORTS_OPEN, -1n);
  return 0;
}

/** Domain teardown: closes every port of the (dead) domain in `slot`. */
export function closeAllPorts(t: SharedTables, slot: number): number {
  let n = 0;
  for (let p = 1; p < NR_EVTCHN_PORTS; p++) if (closePort(t, slot, p) === 0) n++;
  return n;
}

/** Clears a slot's ports, bitmaps and per-port counters for reuse. */
export function resetEventSlot(t: SharedTables, slot: number): void {
  t.port.fill(0, pidx(slot, 0), pidx(slot + 1, 0));
  t.pctr.fill(0n, slot * NR_EVTCHN_PORTS * PC_STRIDE, (slot + 1) * NR_EVTCHN_PORTS * PC_STRIDE);
  t.pending.fill(0, slot * PORT_WORDS, (slot + 1) * PORT_WORDS);
  t.mask.fill(0, slot * PORT_WORDS, (slot + 1) * PORT_WORDS);
}

/** EVTCHNOP_status result. */
export interface EvtchnStatus {
  /** EVTCHNSTAT_closed | EVTCHNSTAT_unbound | EVTCHNSTAT_interdomain. */
  readonly status: number;
  /** unbound: the domain allowed to bind; interdomain: the peer. */
  readonly remoteDomid: number;
  /** interdomain: the peer's port. */
  readonly remotePort: number;
}

export interface WaitOptions {
  /** Override of the domain's polling budget for this wait, in microseconds (0 = never poll). */
  readonly pollMicros?: number;
  /** Stops waiting (resolves with [] ) when aborted. */
  readonly signal?: AbortSignal;
}

/** Longest stretch a poll blocks its thread before letting other work run (µs). */
const POLL_SLICE_MICROS = 10;
/** Where a polling window that had shrunk to nothing starts again when it grows (µs; KVM's halt_poll_ns_grow_start). */
const POLL_GROW_START_MICROS = 10;

/** One vCPU's event-channel interface. Calls return Xen's values: >= 0, or -errno. */
export class EventChannels {
  /** Adaptive polling budget before sleeping, in microseconds (0 = never poll): the window's most. */
  pollMicros: number;
  /**
   * How long the next wait polls (µs), adapted as KVM's halt-polling adapts halt_poll_ns: a sleep
   * that ended within the budget (an event came soon after) doubles it, up to `pollMicros`; a sleep
   * longer than the budget (polling would not have caught it) resets it to 0. So a thread whose
   * events come in streams polls, and one whose events come seldom (a driver domain between a
   * QD1 client's requests: each costs a round trip through the client) sleeps at once, leaving
   * the core to the threads that produce its next event.
   */
  private pollWindow: number;
  private readonly handlers = new Map<number, (port: number) => void>();
  private dispatchAbort: AbortController | undefined;
  private waiting = false;
  private hint = 1;
  /** A ref'd timer held only while sleeping: a pending Atomics.waitAsync alone does not keep Node's event loop alive. */
  private readonly keepAlive: NodeJS.Timeout;

  constructor(
    private readonly t: SharedTables,
    private readonly domid: number,
    private readonly slot: number,
    pollMicros: number = DEFAULT_POLL_MICROS,
    private readonly beforeSleep: () => void = () => undefined,
    /** The vCPU this interface runs on (its thread). */
    readonly vcpu: number = 0,
  ) {
    this.pollMicros = pollMicros;
    this.pollWindow = pollMicros;
    this.keepAlive = setInterval(() => undefined, 1 << 30);
    this.keepAlive.unref();
  }

  get nrPorts(): number { return NR_EVTCHN_PORTS; }

  private reserve(): number {
    for (let k = 0; k < NR_EVTCHN_PORTS - 1; k++) {
      const p = ((this.hint - 1 + k) % (NR_EVTCHN_PORTS - 1)) + 1;
      if (Atomics.compareExchange(this.t.port, pidx(this.slot, p) + P_STATE, EVTCHNSTAT_closed, PS_RESERVED) === EVTCHNSTAT_closed) {
        this.hint = p + 1;
        // event_channel.h (EVTCHNOP_bind_vcpu): a new interdomain or unbound port notifies vCPU 0
        // until EVTCHNOP_bind_vcpu moves it.
        Atomics.store(this.t.port, pidx(this.slot, p) + P_VCPU, 0);
        const w = this.slot * PORT_WORDS + (p >>> 5);
        Atomics.and(this.t.pending, w, ~(1 << (p & 31)));
        Atomics.and(this.t.mask, w, ~(1 << (p & 31)));
        const c = (this.slot * NR_EVTCHN_PORTS + p) * PC_STRIDE;
        Atomics.store(this.t.pctr, c + PC_SENT, 0n);
        Atomics.store(this.t.pctr, c + PC_RECEIVED, 0n);
        return p;
      }
    }
    return -ENOSPC;
  }

  /**
   * EVTCHNOP_alloc_unbound: a port that `remoteDomid` may bind. Returns the port, or -EINVAL (not
   * a domid) / -ENOSPC. As on Xen 4.17 (docs/real-xen.md), the remote domain need not exist yet:
   * only a bind checks it.
   */
  allocUnbound(remoteDomid: number): number {
    const rdom = remoteDomid === DOMID_SELF ? this.domid : remoteDomid;
    if (!Number.isInteger(rdom) || rdom < 0 || rdom > 0xffff) return -EINVAL;
    const p = this.reserve();
    if (p < 0) return p;
    const i = pidx(this.slot, p);
    Atomics.store(this.t.port, i + P_REMOTE_DOMID, rdom);
    Atomics.store(this.t.port, i + P_STATE, EVTCHNSTAT_unbound);
    this.t.count(this.slot, C_PORTS_OPEN);
    return p;
  }

  /**
   * EVTCHNOP_bind_interdomain: connects a new local port to `remotePort` of `remoteDomid`, which
   * must be unbound towards us. Returns the local port, or -ESRCH / -EINVAL / -ENOSPC. As Xen
   * does, the new local port is made pending, since notifications sent before the bind are lost.
   */
  bindInterdomain(remoteDomid: number, remotePort: number): number {
    const t = this.t;
    const rdom = remoteDomid === DOMID_SELF ? this.domid : remoteDomid;
    const rslot = t.slotOf(rdom);
    if (rslot < 0) return -ESRCH;
    if (!validPort(remotePort)) return -EINVAL;
    const r = pidx(rslot, remotePort);
    const lport = this.reserve();
    if (lport < 0) return lport;
    if (Atomics.load(t.port, r + P_REMOTE_DOMID) !== this.domid
        || Atomics.compareExchange(t.port, r + P_STATE, EVTCHNSTAT_unbound, PS_BINDING) !== EVTCHNSTAT_unbound) {
      Atomics.store(t.port, pidx(this.slot, lport) + P_STATE, EVTCHNSTAT_closed);
      return -EINVAL;
    }
    const l = pidx(this.slot, lport);
    Atomics.store(t.port, l + P_REMOTE_DOMID, rdom);
    Atomics.store(t.port, l + P_REMOTE_PORT, remotePort);
    Atomics.store(t.port, l + P_REMOTE_SLOT, rslot);
    Atomics.store(t.port, r + P_REMOTE_PORT, lport);
    Atomics.store(t.port, r + P_REMOTE_SLOT, this.slot);
    Atomics.store(t.port, l + P_STATE, EVTCHNSTAT_interdomain);
    Atomics.store(t.port, r + P_STATE, EVTCHNSTAT_interdomain);
    t.count(this.slot, C_PORTS_OPEN);
    t.count(this.slot, C_CHANNELS_BOUND);
    t.count(rslot, C_CHANNELS_BOUND);
    setPending(t, this.slot, lport);
    return lport;
  }

  /**
   * EVTCHNOP_send. Returns 0, or -EINVAL for a closed or invalid port. A send on an unbound
   * port is dropped silently and returns 0, as Xen's evtchn_send does (counted in notifyDropped).
   */
  notify(port: number): number {
    const t = this.t;
    if (!validPort(port)) return -EINVAL;
    const i = pidx(this.slot, port);
    const st = Atomics.load(t.port, i + P_STATE);
    if (st === EVTCHNSTAT_interdomain) {
      const rslot = Atomics.load(t.port, i + P_REMOTE_SLOT);
      const rport = Atomics.load(t.port, i + P_REMOTE_PORT);
      setPending(t, rslot, rport);
      Atomics.add(t.pctr, (this.slot * NR_EVTCHN_PORTS + port) * PC_STRIDE + PC_SENT, 1n);
      t.count(this.slot, C_NOTIFY_SENT);
      return 0;
    }
    if (st === EVTCHNSTAT_unbound || st === PS_BINDING) {
      t.count(this.slot, C_NOTIFY_DROPPED);
      return 0;
    }
    return -EINVAL;
  }

  /** EVTCHNOP_close. Returns 0 or -EINVAL. */
  close(port: number): number {
    this.handlers.delete(port);
    return closePort(this.t, this.slot, port);
  }

  /** Masks a port: sends to it stay pending without waking us (evtchn_mask). */
  mask(port: number): number {
    if (!this.isOpen(port)) return -EINVAL;
    Atomics.or(this.t.mask, this.slot * PORT_WORDS + (port >>> 5), 1 << (port & 31));
    return 0;
  }

  /** EVTCHNOP_unmask: clears the mask; an event held pending meanwhile raises the upcall now. */
  unmask(port: number): number {
    if (!this.isOpen(port)) return -EINVAL;
    const w = this.slot * PORT_WORDS + (port >>> 5);
    const bit = 1 << (port & 31);
    Atomics.and(this.t.mask, w, ~bit);
    if ((Atomics.load(this.t.pending, w) & bit) !== 0) raiseUpcall(this.t, this.slot, notifyVcpu(this.t, this.slot, port));
    return 0;
  }

  /**
   * EVTCHNOP_bind_vcpu: sends to `port` raise `vcpu`'s upcall from now on; an event already
   * pending is delivered there. Returns 0, -EINVAL (port not open) or -ENOENT (no such vCPU up).
   */
  bindVcpu(port: number, vcpu: number): number {
    if (!this.isOpen(port)) return -EINVAL;
    if (!Number.isInteger(vcpu) || vcpu < 0 || vcpu >= MAX_VCPUS || Atomics.load(this.t.dom, vcpuWord(this.slot, vcpu, V_ONLINE)) === 0) return -ENOENT;
    Atomics.store(this.t.port, pidx(this.slot, port) + P_VCPU, vcpu);
    if (this.isPending(port) && !this.isMasked(port)) raiseUpcall(this.t, this.slot, vcpu);
    return 0;
  }

  /** The vCPU a port notifies. */
  vcpuOf(port: number): number {
    return validPort(port) ? notifyVcpu(this.t, this.slot, port) : -1;
  }

  isPending(port: number): boolean {
    return validPort(port) && (Atomics.load(this.t.pending, this.slot * PORT_WORDS + (port >>> 5)) & (1 << (port & 31))) !== 0;
  }

  isMasked(port: number): boolean {
    return validPort(port) && (Atomics.load(this.t.mask, this.slot * PORT_WORDS + (port >>> 5)) & (1 << (port & 31))) !== 0;
  }

  /** EVTCHNOP_status for one of our ports. */
  status(port: number): EvtchnStatus {
    if (!validPort(port)) return { status: EVTCHNSTAT_closed, remoteDomid: 0, remotePort: 0 };
    const i = pidx(this.slot, port);
    const st = Atomics.load(this.t.port, i + P_STATE);
    const status = st === EVTCHNSTAT_interdomain ? st : st === EVTCHNSTAT_unbound || st === PS_BINDING ? EVTCHNSTAT_unbound : EVTCHNSTAT_closed;
    return {
      status,
      remoteDomid: status === EVTCHNSTAT_closed ? 0 : Atomics.load(this.t.port, i + P_REMOTE_DOMID),
      remotePort: status === EVTCHNSTAT_interdomain ? Atomics.load(this.t.port, i + P_REMOTE_PORT) : 0,
    };
  }

  /** Notifications sent from, and received (consumed by wait) on, one of our ports. */
  portCounters(port: number): { sent: number; received: number } {
    if (!validPort(port)) return { sent: 0, received: 0 };
    const c = (this.slot * NR_EVTCHN_PORTS + port) * PC_STRIDE;
    return { sent: Number(Atomics.load(this.t.pctr, c + PC_SENT)), received: Number(Atomics.load(this.t.pctr, c + PC_RECEIVED)) };
  }

  private isOpen(port: number): boolean {
    if (!validPort(port)) return false;
    const st = Atomics.load(this.t.port, pidx(this.slot, port) + P_STATE);
    return st === EVTCHNSTAT_unbound || st === EVTCHNSTAT_interdomain || st === PS_BINDING;
  }

  /**
   * Takes (clears) this vCPU's pending, unmasked ports, as an upcall handler scans the 2-level
   * bitmaps (Linux also skips ports bound to other CPUs).
   */
  takePending(): number[] {
    const t = this.t;
    const out: number[] = [];
    const base = this.slot * PORT_WORDS;
    for (let w = 0; w < PORT_WORDS; w++) {
      const ready = Atomics.load(t.pending, base + w) & ~Atomics.load(t.mask, base + w);
      if (ready === 0) continue;
      let mine = 0;
      for (let b = 0; b < 32; b++) {
        if ((ready & (1 << b)) === 0) continue;
        const port = w * 32 + b;
        if (notifyVcpu(t, this.slot, port) !== this.vcpu) continue;
        mine |= 1 << b;
        out.push(port);
        Atomics.add(t.pctr, (this.slot * NR_EVTCHN_PORTS + port) * PC_STRIDE + PC_RECEIVED, 1n);
      }
      if (mine !== 0) Atomics.and(t.pending, base + w, ~mine);
    }
    if (out.length > 0) t.count(this.slot, C_NOTIFY_RECEIVED, BigInt(out.length));
    return out;
  }

  /**
   * Waits for events and returns the pending ports (their pending bits cleared). Polls the
   * upcall word for up to `pollMicros` (busy, bounded) before sleeping in Atomics.waitAsync,
   * which leaves the event loop running. One waiter at a time per vCPU.
   */
  async wait(opts: WaitOptions = {}): Promise<number[]> {
    if (this.waiting) throw new Error('events.wait(): another wait is in progress in this domain');
    this.waiting = true;
    try {
      return await this.waitLoop(opts.pollMicros, opts.signal);
    } finally {
      this.waiting = false;
    }
  }

  /** `fixedPoll`: this wait's own budget, not adapted; undefined: the adaptive window. */
  private async waitLoop(fixedPoll: number | undefined, signal: AbortSignal | undefined): Promise<number[]> {
    const t = this.t;
    const upcall = vcpuWord(this.slot, this.vcpu, V_UPCALL);
    const sleeping = vcpuWord(this.slot, this.vcpu, V_SLEEPING);
    let onAbort: (() => void) | undefined;
    if (signal !== undefined) {
      // Abort pokes our own upcall word so that a sleeping wait returns.
      onAbort = () => { Atomics.store(t.dom, upcall, 1); Atomics.notify(t.dom, upcall); };
      signal.addEventListener('abort', onAbort, { once: true });
    }
    try {
      let yielded = false;
      for (;;) {
        if (signal?.aborted === true) return [];
        // Clear the upcall before scanning, as a guest clears evtchn_upcall_pending, so that a
        // send racing the scan re-raises it.
        Atomics.store(t.dom, upcall, 0);
        const ports = this.takePending();
        if (ports.length > 0) return ports;
        if (!yielded) {
          // Let this thread's own work run first (promise continuations that issue the next
          // request, socket callbacks): spinning before them would only delay what we wait for.
          yielded = true;
          await new Promise<void>((resolve) => setImmediate(resolve));
          continue;
        }
        const poll = Math.min(fixedPoll ?? this.pollWindow, fixedPoll ?? this.pollMicros);
        if (poll > 0 && (await this.pollYielding(poll, signal))) {
          t.count(this.slot, C_POLL_HITS);
          continue;
        }
        this.beforeSleep();
        Atomics.store(t.dom, sleeping, 1);
        const r = Atomics.waitAsync(t.dom, upcall, 0);
        if (r.async) {
          t.count(this.slot, C_SLEEPS);
          this.keepAlive.ref();
          const slept = performance.now();
          try { await r.value; } finally { this.keepAlive.unref(); }
          if (fixedPoll === undefined) this.adaptPoll((performance.now() - slept) * 1000);
        }
        Atomics.store(t.dom, sleeping, 0);
      }
    } finally {
      if (onAbort !== undefined) signal?.removeEventListener('abort', onAbort);
    }
  }

  /** After a sleep of `sleptMicros`: grow the polling window if polling longer would have caught the event, else drop it. */
  private adaptPoll(sleptMicros: number): void {
    if (sleptMicros <= this.pollMicros) this.pollWindow = Math.min(this.pollMicros, Math.max(POLL_GROW_START_MICROS, this.pollWindow * 2));
    else this.pollWindow = 0;
  }

  /**
   * Polls for at most `micros` in short slices, letting the thread's other work (sockets, timers)
   * run between them: a spin that blocked the event loop would delay exactly the I/O that
   * produces the next request. True if an event came meanwhile.
   */
  private async pollYielding(micros: number, signal: AbortSignal | undefined): Promise<boolean> {
    const deadline = performance.now() + micros / 1000;
    for (;;) {
      const left = (deadline - performance.now()) * 1000;
      if (left <= 0 || signal?.aborted === true) return false;
      if (this.poll(Math.min(POLL_SLICE_MICROS, left))) return true;
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  }

  /** Spins on the upcall word for at most `micros`; true if it was raised meanwhile. */
  private poll(micros: number): boolean {
    const t = this.t;
    const u = vcpuWord(this.slot, this.vcpu, V_UPCALL);
    const polling = vcpuWord(this.slot, this.vcpu, V_POLLING);
    Atomics.store(t.dom, polling, 1);
    try {
      const deadline = performance.now() + micros / 1000;
      for (;;) {
        for (let k = 0; k < 64; k++) if (Atomics.load(t.dom, u) !== 0) return true;
        if (performance.now() >= deadline) return false;
      }
    } finally {
      Atomics.store(t.dom, polling, 0);
    }
  }

  /**
   * Registers a handler for a port; a dispatch loop (built on wait()) runs while any handler is
   * registered. Returns a function that removes the handler. Don't mix with a direct wait().
   */
  on(port: number, handler: (port: number) => void): () => void {
    this.handlers.set(port, handler);
    if (this.dispatchAbort === undefined) void this.dispatch();
    return () => {
      if (this.handlers.get(port) === handler) this.handlers.delete(port);
      if (this.handlers.size === 0) this.dispatchAbort?.abort();
    };
  }

  private async dispatch(): Promise<void> {
    const ac = new AbortController();
    this.dispatchAbort = ac;
    try {
      while (this.handlers.size > 0 && !ac.signal.aborted) {
        const ports = await this.wait({ signal: ac.signal });
        for (const p of ports) this.handlers.get(p)?.(p);
      }
    } finally {
      if (this.dispatchAbort === ac) this.dispatchAbort = undefined;
    }
  }

  /** Stops the keep-alive timer (domain teardown in its own thread). */
  dispose(): void {
    this.dispatchAbort?.abort();
    clearInterval(this.keepAlive);
  }
}
