/**
 * One end of a split device on xenbus, as Linux's `struct xenbus_device` and its driver's
 * `otherend_changed` give every PV driver: our directory and state, the other end's `state`
 * watched, and every control-path step (a change at the other end, a close, a resize) run one at a
 * time and in order, as Linux runs them on its xenwatch thread. blkback and blkfront both sit on it.
 */
import type { XenstoreClient } from '../xenstore/index.js';
import { XS_STATE, errorNodePath } from './paths.js';
import { XenbusStateClosed, XenbusStateClosing, XenbusStateInitialising, type XenbusSide, type XenbusState } from './state.js';
import { readState, switchState } from './xenbus.js';

export interface XenbusDeviceDeps {
  readonly xs: XenstoreClient;
  readonly side: XenbusSide;
  /** Our directory (Linux `nodename`), where our `state` lives. */
  readonly nodename: string;
  /** A step that threw: the driver gives up on its peer here (its `xenbus_dev_fatal`). */
  readonly onError: (e: Error) => Promise<void>;
}

let watchSeq = 0;

export class XenbusDevice {
  private current: XenbusState = XenbusStateInitialising;
  private otherendDir: string | undefined;
  private serial: Promise<void> = Promise.resolve();
  private readonly watches = new Map<string, string>();

  constructor(private readonly d: XenbusDeviceDeps) {}

  /** Our state as we last wrote it (or read it, `readOwnState`). */
  get state(): XenbusState {
    return this.current;
  }

  /** The other end's directory (Linux `otherend`), once watched. */
  get otherend(): string | undefined {
    return this.otherendDir;
  }

  /** Takes our `state` node as we find it (a driver starting on a device that existed before). */
  async readOwnState(): Promise<XenbusState> {
    this.current = (await readState(this.d.xs, this.d.nodename)) ?? XenbusStateInitialising;
    return this.current;
  }

  /** `xenbus_read_driver_state(otherend)`: undefined while the node is absent. */
  otherendState(): Promise<XenbusState | undefined> {
    if (this.otherendDir === undefined) return Promise.resolve(undefined);
    return readState(this.d.xs, this.otherendDir);
  }

  /** Runs `fn` after every step before it; a step that throws goes to `onError`, in order too. */
  enqueue(fn: () => Promise<void>): Promise<void> {
    const run = this.serial.then(fn).catch((e: unknown) => this.d.onError(e instanceof Error ? e : new Error(String(e))));
    this.serial = run;
    return run;
  }

  /**
   * `xenbus_watch_otherend`: follows the `state` node of the other end at `dir`, calling `changed`
   * (serialised) on every change and once at once. An other end watched before is let go.
   */
  async watchOtherend(dir: string, changed: () => Promise<void>): Promise<void> {
    if (this.otherendDir !== undefined) await this.unwatch(`${this.otherendDir}/${XS_STATE}`);
    this.otherendDir = dir;
    await this.watch(`${dir}/${XS_STATE}`, changed);
  }

  /** Follows another node (blkfront: its `backend` link); `changed` runs serialised. */
  async watch(path: string, changed: () => Promise<void>): Promise<void> {
    const token = `${this.d.side}-${process.pid}-${++watchSeq}`;
    this.watches.set(path, token);
    await this.d.xs.watch(path, token, () => void this.enqueue(changed));
  }

  async unwatch(path: string): Promise<void> {
    const token = this.watches.get(path);
    if (token === undefined) return;
    this.watches.delete(path);
    await this.d.xs.unwatch(path, token).catch(() => undefined);
  }

  /** Stops following the other end and every other node. */
  async unwatchAll(): Promise<void> {
    for (const path of [...this.watches.keys()]) await this.unwatch(path);
  }

  /** `xenbus_switch_state`: refuses a move blkif.h does not allow this side. */
  async switchState(to: XenbusState): Promise<void> {
    await switchState(this.d.xs, this.d.nodename, this.d.side, to);
    this.current = to;
  }

  /**
   * `xenbus_dev_error`: says why in our `error` node ("<errno> <message>", errorNodePath), where
   * the toolstack and an administrator read it. Best effort: a node that cannot be written is
   * only not written (Linux logs it).
   */
  async error(errno: number, message: string): Promise<void> {
    await this.d.xs.write(errorNodePath(this.d.nodename), `${errno} ${message}`).catch(() => undefined);
  }

  /** `xenbus_dev_fatal`: the `error` node, then Closing (unless closing or closed already). */
  async fatal(errno: number, message: string): Promise<void> {
    await this.error(errno, message);
    if (this.current !== XenbusStateClosing && this.current !== XenbusStateClosed) await this.switchState(XenbusStateClosing).catch(() => undefined);
  }
}
