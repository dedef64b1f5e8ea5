// Guest side of the shared xenstore page, mirrored from the daemon side:
// requests go into req[], replies and watch events come from rsp[].
// `kick` notifies the daemon; the guest's event-channel handler calls onEvent().
import { CoalescedRunner } from './coalesced-runner.js';
import { REQUEST_RING, RESPONSE_RING, XenstoreInterface } from './ring.js';
import type { XenstoreTransport } from './transport.js';
import { XENSTORE_ERROR_NONE } from './wire.js';

export class XenstorePageClient implements XenstoreTransport {
  private readonly intf: XenstoreInterface;
  private pending: Uint8Array[] = [];
  private dataCb: ((chunk: Uint8Array) => void) | undefined;
  private closeCb: ((reason: Error) => void) | undefined;
  private readonly runner = new CoalescedRunner(() => this.step(), () => this.closed);
  private closed = false;

  constructor(page: Uint8Array, private readonly kick: () => void) {
    this.intf = new XenstoreInterface(page);
  }

  onData(cb: (chunk: Uint8Array) => void): void {
    this.dataCb = cb;
  }

  onClose(cb: (reason: Error) => void): void {
    this.closeCb = cb;
  }

  send(bytes: Uint8Array): void {
    if (this.closed) throw new Error('xenstore page connection closed');
    this.pending.push(bytes);
    this.onEvent();
  }

  /** The daemon notified us (or we have something to send). */
  onEvent(): void {
    this.runner.run();
  }

  private step(): void {
    let notify = false;
    const err = this.intf.load('error');
    if (err !== XENSTORE_ERROR_NONE) return this.fail(new Error(`xenstore page error ${err}`));
    while (this.pending.length > 0) {
      const head = this.pending[0]!;
      const n = this.intf.write(REQUEST_RING, head);
      if (n < 0) return this.fail(new Error('xenstore ring indexes corrupt'));
      if (n > 0) notify = true;
      if (n < head.length) {
        this.pending[0] = head.subarray(n);
        break;
      }
      this.pending.shift();
    }
    const input = this.intf.read(RESPONSE_RING);
    if (input === undefined) return this.fail(new Error('xenstore ring indexes corrupt'));
    if (notify || input.length > 0) this.kick();
    if (input.length > 0) this.dataCb?.(input);
  }

  private fail(e: Error): void {
    if (this.closed) return;
    this.closed = true;
    this.closeCb?.(e);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.closeCb?.(new Error('closed'));
  }
}
