// Event channels (event_channel.h), 2-level ABI flavour: per-port pending and mask bits in
// shared bitmaps, and one per-domain evtchn_upcall_pending word that a sleeping domain waits on.
// A send sets the remote pending bit; only a 0 -> 1 transition of an unmasked port raises the
// upcall, and only a raised upcall of a sleeping domain costs an Atomics.notify, so repeated
// sends before the peer runs coalesce into one wake-up as on Xen.
import { performance } from 'node:perf_hooks';
import {
  DEFAULT_POLL_MICROS, DOMID_SELF, EINVAL, ENOSPC, ESRCH, EVTCHNSTAT_closed, EVTCHNSTAT_interdomain,
  EVTCHNSTAT_unbound, NR_EVTCHN_PORTS,
} from './constants.js';
import {
  C_CHANNELS_BOUND, C_NOTIFY_COALESCED, C_NOTIFY_DROPPED, C_NOTIFY_RECEIVED, C_NOTIFY_SENT, C_POLL_HITS,
  C_PORTS_OPEN, C_SLEEPS, C_WAKES, D_POLLING, D_SLEEPING, D_STRIDE, D_UPCALL, P_REMOTE_DOMID, P_REMOTE_PORT,
  P_REMOTE_SLOT, P_STATE, P_STRIDE, PC_RECEIVED, PC_SENT, PC_STRIDE, PORT_WORDS, PS_BINDING, PS_CLOSING,
  PS_RESERVED, type SharedTables,
} from './shared-tables.js';


const pidx = (slot: number, port: number) => (slot * NR_EVTCHN_PORTS + port) * P_STRIDE;
const validPort = (port: number) => Number.isInteger(port) && port > 0 && port < NR_EVTCHN_PORTS;

/** Raises the domain's upcall; wakes it only if it sleeps (see file comment). */
export function raiseUpcall(t: SharedTables, slot: number): void {
  const d = slot * D_STRIDE;
  if (Atomics.compareExchange(t.dom, d + D_UPCALL, 0, 1) !== 0) return;
  t.count(slot, C_WAKES);
  if (Atomics.load(t.dom, d + D_SLEEPING) !== 0) Atomics.notify(t.dom, d + D_UPCALL);
}

/** evtchn_port_set_pending: sets the pending bit; a masked port stays pending until unmask. */
export function setPending(t: SharedTables, slot: number, port: number): boolean {
  const w = slot * PORT_WORDS + (port >>> 5);
  const bit = 1 << (port & 31);
  if ((Atomics.or(t.pending, w, bit) & bit) !== 0) {
    t.count(slot, C_NOTIFY_COALESCED);
    return false;
  }
  if ((Atomics.load(t.mask, w) & bit) === 0) raiseUpcall(t, slot);
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

/** A domain's event-channel interface. Calls return Xen's values: >= 0, or -errno. */
export class EventChannels {
  /** Adaptive polling budget before sleeping, in microseconds (0 = never poll). */
  pollMicros: number;
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
  ) {
    this.pollMicros = pollMicros;
    this.keepAlive = setInterval(() => undefined, 1 << 30);
    this.keepAlive.unref();
  }

  get nrPorts(): number { return NR_EVTCHN_PORTS; }

  private reserve(): number {
    for (let k = 0; k < NR_EVTCHN_PORTS - 1; k++) {
      const p = ((this.hint - 1 + k) % (NR_EVTCHN_PORTS - 1)) + 1;
      if (Atomics.compareExchange(this.t.port, pidx(this.slot, p) + P_STATE, EVTCHNSTAT_closed, PS_RESERVED) === EVTCHNSTAT_closed) {
        this.hint = p + 1;
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

  /** EVTCHNOP_alloc_unbound: a port that `remoteDomid` may bind. Returns the port or -ESRCH/-ENOSPC. */
  allocUnbound(remoteDomid: number): number {
    const rdom = remoteDomid === DOMID_SELF ? this.domid : remoteDomid;
    if (this.t.slotOf(rdom) < 0) return -ESRCH;
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
    if ((Atomics.load(this.t.pending, w) & bit) !== 0) raiseUpcall(this.t, this.slot);
    return 0;
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

  /** Takes (clears) the pending, unmasked ports, as an upcall handler scans the 2-level bitmaps. */
  takePending(): number[] {
    const t = this.t;
    const out: number[] = [];
    const base = this.slot * PORT_WORDS;
    for (let w = 0; w < PORT_WORDS; w++) {
      const ready = Atomics.load(t.pending, base + w) & ~Atomics.load(t.mask, base + w);
      if (ready === 0) continue;
      Atomics.and(t.pending, base + w, ~ready);
      for (let b = 0; b < 32; b++) {
        if ((ready & (1 << b)) === 0) continue;
        const port = w * 32 + b;
        out.push(port);
        Atomics.add(t.pctr, (this.slot * NR_EVTCHN_PORTS + port) * PC_STRIDE + PC_RECEIVED, 1n);
      }
    }
    if (out.length > 0) t.count(this.slot, C_NOTIFY_RECEIVED, BigInt(out.length));
    return out;
  }

  /**
   * Waits for events and returns the pending ports (their pending bits cleared). Polls the
   * upcall word for up to `pollMicros` (busy, bounded) before sleeping in Atomics.waitAsync,
   * which leaves the event loop running. One waiter at a time per domain.
   */
  async wait(opts: WaitOptions = {}): Promise<number[]> {
    if (this.waiting) throw new Error('events.wait(): another wait is in progress in this domain');
    this.waiting = true;
    try {
      return await this.waitLoop(opts.pollMicros ?? this.pollMicros, opts.signal);
    } finally {
      this.waiting = false;
    }
  }

  private async waitLoop(pollMicros: number, signal: AbortSignal | undefined): Promise<number[]> {
    const t = this.t;
    const d = this.slot * D_STRIDE;
    let onAbort: (() => void) | undefined;
    if (signal !== undefined) {
      // Abort pokes our own upcall word so that a sleeping wait returns.
      onAbort = () => { Atomics.store(t.dom, d + D_UPCALL, 1); Atomics.notify(t.dom, d + D_UPCALL); };
      signal.addEventListener('abort', onAbort, { once: true });
    }
    try {
      let yielded = false;
      for (;;) {
        if (signal?.aborted === true) return [];
        // Clear the upcall before scanning, as a guest clears evtchn_upcall_pending, so that a
        // send racing the scan re-raises it.
        Atomics.store(t.dom, d + D_UPCALL, 0);
        const ports = this.takePending();
        if (ports.length > 0) return ports;
        if (!yielded) {
          // Let this thread's own work run first (promise continuations that issue the next
          // request, socket callbacks): spinning before them would only delay what we wait for.
          yielded = true;
          await new Promise<void>((resolve) => setImmediate(resolve));
          continue;
        }
        if (pollMicros > 0 && (await this.pollYielding(pollMicros, signal))) {
          t.count(this.slot, C_POLL_HITS);
          continue;
        }
        this.beforeSleep();
        Atomics.store(t.dom, d + D_SLEEPING, 1);
        const r = Atomics.waitAsync(t.dom, d + D_UPCALL, 0);
        if (r.async) {
          t.count(this.slot, C_SLEEPS);
          this.keepAlive.ref();
          try { await r.value; } finally { this.keepAlive.unref(); }
        }
        Atomics.store(t.dom, d + D_SLEEPING, 0);
      }
    } finally {
      if (onAbort !== undefined) signal?.removeEventListener('abort', onAbort);
    }
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
    const u = this.slot * D_STRIDE + D_UPCALL;
    Atomics.store(t.dom, this.slot * D_STRIDE + D_POLLING, 1);
    try {
      const deadline = performance.now() + micros / 1000;
      for (;;) {
        for (let k = 0; k < 64; k++) if (Atomics.load(t.dom, u) !== 0) return true;
        if (performance.now() >= deadline) return false;
      }
    } finally {
      Atomics.store(t.dom, this.slot * D_STRIDE + D_POLLING, 0);
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
