/**
 * What runs inside a guest besides its disks: an application the guest's thread loads when the
 * toolstack creates the guest (an NBD server exporting the disks, a benchmark's workload), as a
 * VM runs programs against its block devices. The toolstack itself only plugs disks; what the
 * guest does with them is the application's business.
 */
import type { Blkfront } from '../blkfront/index.js';
import type { XenDomain } from '../xen/index.js';
import type { RpcHandlers } from './rpc.js';

/** What an application sees of the guest it runs in. */
export interface GuestContext {
  readonly xen: XenDomain;
  /** The disk attached at `frontDir` (throws when none is). */
  disk(frontDir: string): Blkfront;
  log(msg: string): void;
}

/**
 * A module the guest's thread imports (by URL, given to `Toolstack.createGuest`): its
 * `guestHandlers` add control-channel methods; `close` runs at shutdown before the disks close.
 */
export interface GuestApplicationModule {
  guestHandlers(guest: GuestContext): RpcHandlers & { close?: () => Promise<void> | void };
}

/** What the toolstack gives a guest's thread: the applications to load (module URLs). */
export interface GuestWorkerData {
  readonly applications: readonly string[];
}
