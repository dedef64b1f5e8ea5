/**
 * A queue served in a thread of its own: a vCPU of the driver domain (xen.startVcpu) running
 * queue-thread-main.ts, as Linux blkback gives each ring its own kthread. The thread maps the
 * ring, binds the channel (so its events wake that vCPU only), opens its own handle on the
 * storage and runs the data path; the control path keeps xenstore and talks to it over a
 * MessagePort. Counters are a SharedArrayBuffer the control path reads live.
 */
import { MessageChannel, type MessagePort } from 'node:worker_threads';
import type { StorageSpec } from '../storage/registry.js';
import { EVTCHNSTAT_interdomain, type XenAccessWithVcpus } from '../xen/index.js';
import { sharedVbdCounters, type VbdCounters } from './counters.js';
import type { QueueRing } from './queue.js';
import type { VbdLimits } from './validate.js';

/** What a queue thread is told to serve (plain data: it crosses into the thread). */
export interface QueueSetup {
  readonly index: number;
  readonly frontDomid: number;
  readonly protocol: string;
  readonly ring: QueueRing;
  /** The VBD's storage, which the thread opens again through the storage registry. */
  readonly storage: StorageSpec;
  readonly limits: VbdLimits;
  readonly maxIndirectSegments: number;
  readonly reqsPerPage: number;
  /** 'map' | 'persistent' (with max and idleMs) | 'copy' (bounce pages from the lent frames). */
  readonly access: { readonly kind: 'map' } | { readonly kind: 'persistent'; readonly max: number; readonly idleMs: number } | { readonly kind: 'copy' };
  readonly housekeepingMs: number;
}

/** workerData (app part) of a queue thread. */
export interface QueueThreadData extends QueueSetup {
  readonly port: MessagePort;
  readonly counters: SharedArrayBuffer;
}

/** Control path -> queue thread. */
export type ToQueueThread =
  | { readonly t: 'limits'; readonly seq: number; readonly limits: VbdLimits }
  | { readonly t: 'stop' };

/** Queue thread -> control path. */
export type FromQueueThread =
  | { readonly t: 'ready'; readonly port: number }
  /** The queue did not connect; `noThread`: the thread's fault (storage), not the frontend's. */
  | { readonly t: 'error'; readonly why: string; readonly noThread: boolean }
  | { readonly t: 'fatal'; readonly why: string }
  | { readonly t: 'limits'; readonly seq: number }
  | { readonly t: 'stopped' }
  | { readonly t: 'log'; readonly msg: string };

const SCRIPT = new URL('./queue-thread-main.js', import.meta.url);

export interface QueueThreadOptions extends QueueSetup {
  readonly xen: XenAccessWithVcpus;
  /** Frames lent to the thread (grant copy's bounce pages); freed here once it has exited. */
  readonly frames: readonly number[];
  /** The thread found the frontend breaking the protocol, or died: disconnect the VBD. */
  readonly onFatal: (why: string) => void;
  readonly log: (msg: string) => void;
}

/** The control path's handle on one queue thread. */
export class QueueThread {
  readonly counters: VbdCounters;
  private seq = 0;
  private readonly waiters = new Map<number, () => void>();
  private stopping: Promise<void> | undefined;
  private onStopped: (() => void) | undefined;
  private gone = false;

  private constructor(
    private readonly o: QueueThreadOptions,
    private readonly port: MessagePort,
    readonly vcpu: number,
    private readonly evtchn: number,
    private readonly exited: Promise<unknown>,
    counters: VbdCounters,
  ) {
    this.counters = counters;
  }

  /**
   * Starts the thread and waits until its queue is connected. Otherwise (nothing held): `noThread`
   * when no thread could serve it (no vCPU free, storage not opened there), else the frontend's
   * ring or channel is at fault.
   */
  static async start(o: QueueThreadOptions): Promise<QueueThread | { readonly why: string; readonly noThread: boolean }> {
    const { port1, port2 } = new MessageChannel();
    const shared = sharedVbdCounters();
    const { xen: _xen, frames: _frames, onFatal: _onFatal, log: _log, ...setup } = o;
    const data: QueueThreadData = { ...setup, port: port2, counters: shared.buffer };
    let handle;
    try {
      handle = await o.xen.startVcpu({ script: SCRIPT, workerData: data, transferList: [port2], frames: o.frames, peers: [o.frontDomid], name: `blkback-q${o.index}` });
    } catch (e) {
      port1.close();
      return { why: `starting a thread for queue ${o.index}: ${(e as Error).message}`, noThread: true };
    }
    // Until 'ready' (or 'error'), logs and a fatal the thread already met are kept for later.
    let qt: QueueThread | undefined;
    const early: FromQueueThread[] = [];
    const first = await new Promise<FromQueueThread | undefined>((resolve) => {
      port1.on('message', (m: FromQueueThread) => {
        if (qt !== undefined) qt.onMessage(m);
        else if (m.t === 'ready' || m.t === 'error') resolve(m);
        else early.push(m);
      });
      void handle.exited.then(() => resolve(undefined));
    });
    if (first?.t !== 'ready') {
      for (const m of early) if (m.t === 'log') o.log(m.msg);
      await o.xen.stopVcpu(handle.vcpu).catch(() => undefined);
      port1.close();
      return first?.t === 'error' ? { why: first.why, noThread: first.noThread } : { why: `queue ${o.index}'s thread exited while starting`, noThread: true };
    }
    const started = new QueueThread(o, port1, handle.vcpu, first.port, handle.exited, shared.counters);
    qt = started;
    port1.unref();
    void handle.exited.then((exit) => started.onExit(exit));
    for (const m of early) started.onMessage(m);
    return started;
  }

  private onMessage(m: FromQueueThread): void {
    switch (m.t) {
      case 'fatal': this.o.onFatal(m.why); break;
      case 'log': this.o.log(m.msg); break;
      case 'limits': this.waiters.get(m.seq)?.(); this.waiters.delete(m.seq); break;
      case 'stopped': this.onStopped?.(); break;
      default: break;
    }
  }

  private onExit(exit: { error?: string }): void {
    this.gone = true;
    for (const w of this.waiters.values()) w();
    this.waiters.clear();
    this.onStopped?.();
    if (this.stopping === undefined) this.o.onFatal(`queue ${this.o.index}'s thread died${exit.error === undefined ? '' : `: ${exit.error}`}`);
  }

  /** A resize: the thread re-reads its storage's size and takes the new limits; resolves once it has. */
  setLimits(limits: VbdLimits): Promise<void> {
    if (this.gone || this.stopping !== undefined) return Promise.resolve();
    const seq = ++this.seq;
    const done = new Promise<void>((resolve) => { this.waiters.set(seq, resolve); });
    this.port.ref();
    this.port.postMessage({ t: 'limits', seq, limits } satisfies ToQueueThread);
    return done.finally(() => { if (this.waiters.size === 0) this.port.unref(); });
  }

  /** Answers what is in flight, releases the ring and the channel, ends the thread. Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      if (!this.gone) {
        const stopped = new Promise<void>((resolve) => { this.onStopped = resolve; });
        this.port.ref();
        this.port.postMessage({ t: 'stop' } satisfies ToQueueThread);
        await stopped;
      }
      // Everything is released: ending the thread now loses nothing.
      const died = this.gone;
      if (!this.gone) await this.o.xen.stopVcpu(this.vcpu).catch(() => undefined);
      await this.exited;
      // A thread that died left its channel open (its mappings ended with it): close it here.
      if (died) {
        const st = this.o.xen.events.status(this.evtchn);
        if (st.status === EVTCHNSTAT_interdomain && st.remoteDomid === this.o.frontDomid && st.remotePort === this.o.ring.remotePort) this.o.xen.events.close(this.evtchn);
      }
      this.port.close();
      if (this.o.frames.length > 0) this.o.xen.memory.free(this.o.frames);
    })();
    return this.stopping;
  }
}
