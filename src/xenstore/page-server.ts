// Daemon side of a guest's shared xenstore page. How notifications travel
// is left to the caller: `kick` notifies the guest, and whoever receives
// the guest's event-channel notification calls onEvent().
import { CoalescedRunner } from './coalesced-runner.js';
import { MessageParser } from './codec.js';
import type { ServerConnection, XenstoreDaemon } from './daemon.js';
import { REQUEST_RING, RESPONSE_RING, XenstoreInterface } from './ring.js';
import {
  XENSTORE_CONNECTED,
  XENSTORE_ERROR_NONE,
  XENSTORE_ERROR_PROTO,
  XENSTORE_ERROR_RINGIDX,
  XENSTORE_RECONNECT,
  XENSTORE_SERVER_FEATURE_ERROR,
  XENSTORE_SERVER_FEATURE_RECONNECTION,
} from './wire.js';

export class XenstorePageServer {
  private readonly intf: XenstoreInterface;
  private conn: ServerConnection;
  private parser = new MessageParser();
  private out: Uint8Array[] = [];
  private readonly runner = new CoalescedRunner(() => this.step(), () => this.closed);
  private ignored = false;
  private closed = false;

  constructor(
    private readonly daemon: XenstoreDaemon,
    readonly domid: number,
    page: Uint8Array,
    private readonly kick: () => void,
  ) {
    this.intf = new XenstoreInterface(page);
    this.conn = this.newConnection();
    // As xenstored on introduction: empty rings, advertise our features.
    this.resetRings();
    this.intf.store('error', XENSTORE_ERROR_NONE);
    this.intf.store('server_features', XENSTORE_SERVER_FEATURE_RECONNECTION | XENSTORE_SERVER_FEATURE_ERROR);
    daemon.introduceDomain(domid, () => this.close());
  }

  private newConnection(): ServerConnection {
    return this.daemon.connect(this.domid, {
      send: (bytes) => {
        this.out.push(bytes);
        if (!this.runner.busy) this.onEvent();
      },
      drop: () => {
        this.ignored = true;
      },
    });
  }

  private resetRings(): void {
    for (const f of ['req_cons', 'req_prod', 'rsp_cons', 'rsp_prod'] as const) this.intf.store(f, 0);
  }

  /** The guest notified us: consume requests, send what we can. */
  onEvent(): void {
    this.runner.run();
  }

  private step(): void {
    let notify = false;
    if (this.intf.load('connection') === XENSTORE_RECONNECT) {
      // The guest asked for a fresh connection (XENSTORE_SERVER_FEATURE_RECONNECTION).
      this.daemon.disconnect(this.conn);
      this.conn = this.newConnection();
      this.parser = new MessageParser();
      this.out = [];
      this.ignored = false;
      this.resetRings();
      this.intf.store('error', XENSTORE_ERROR_NONE);
      this.intf.store('connection', XENSTORE_CONNECTED);
      this.kick();
      return;
    }
    if (this.ignored) return;
    const input = this.intf.read(REQUEST_RING);
    if (input === undefined) return this.violation(XENSTORE_ERROR_RINGIDX);
    if (input.length > 0) {
      notify = true;
      this.parser.push(input);
      for (let r = this.parser.next(); r; r = this.parser.next()) {
        if (r.kind === 'oversized') return this.violation(XENSTORE_ERROR_PROTO);
        this.conn.receive(r.message);
        if (this.ignored || this.closed) return;
      }
    }
    while (this.out.length > 0) {
      const head = this.out[0]!;
      const n = this.intf.write(RESPONSE_RING, head);
      if (n < 0) return this.violation(XENSTORE_ERROR_RINGIDX);
      if (n > 0) notify = true;
      if (n < head.length) {
        this.out[0] = head.subarray(n);
        break;
      }
      this.out.shift();
    }
    if (notify) this.kick();
  }

  /** As xenstored's ignore_connection(): report in `error`, stop serving. */
  private violation(err: number): void {
    this.intf.store('error', err);
    this.ignored = true;
    this.out = [];
    this.daemon.disconnect(this.conn);
    this.kick();
  }

  get isIgnored(): boolean {
    return this.ignored;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.daemon.disconnect(this.conn);
  }
}

/** Attaches (and introduces) a guest's page; the returned server's onEvent() takes its notifications. */
export function attachPage(daemon: XenstoreDaemon, domid: number, page: Uint8Array, kick: () => void): XenstorePageServer {
  return new XenstorePageServer(daemon, domid, page, kick);
}
