/**
 * What a split driver reaches of its hypervisor: the narrow seam between blkback/blkfront and a
 * Xen, emulated (`XenDomain`, this folder) or real (`src/xen/real/`, a Linux domain's
 * /dev/xen devices through Xen's own libraries). Each method is one hypercall or driver call,
 * named and answering as the emulated `XenDomain` does (its docs are the contract: GNTST_*
 * statuses, negative errno for ports, handles per mapping).
 */
import type { VcpuExit, VcpuHandle, StartVcpuOptions } from './domain.js';
import type { EvtchnStatus } from './event-channel.js';
import type { GntCopyOp, GntMapOp, GntMapResult } from './grant-table.js';

/** Grant table: mapping another domain's grants (backend) and granting our frames (frontend). */
export interface GrantAccess {
  /** GNTTABOP_map_grant_ref, one result per op; `page` is a view of the mapped page. */
  map(ops: readonly GntMapOp[]): GntMapResult[];
  /** GNTTABOP_unmap_grant_ref by handle; one GNTST_* per handle. */
  unmap(handles: readonly number[]): number[];
  /** GNTTABOP_copy; one GNTST_* per op. */
  copy(ops: readonly GntCopyOp[]): number[];
  /** gnttab_grant_foreign_access: a grant ref, or a negative errno. */
  grantAccess(domid: number, frame: number, readonly: boolean, opts?: { lasting?: boolean }): number;
  /** gnttab_end_foreign_access_ref: false while the grantee still has it mapped. */
  endAccess(ref: number): boolean;
}

/** Event channels. Ports and results as EVTCHNOP_* (a negative errno on failure). */
export interface EventAccess {
  allocUnbound(remoteDomid: number): number;
  bindInterdomain(remoteDomid: number, remotePort: number): number;
  bindVcpu(port: number, vcpu: number): number;
  notify(port: number): number;
  close(port: number): number;
  status(port: number): EvtchnStatus;
  /** Calls `handler` on each notification of `port` (unmasked again after it); returns the off switch. */
  on(port: number, handler: (port: number) => void): () => void;
}

/** The domain's own pages: what it grants, and what it copies into. */
export interface MemoryAccess {
  readonly freePages: number;
  alloc(count?: number, opts?: { contiguous?: boolean }): number[];
  /** As many as are free, up to `count`. */
  allocUpTo(count: number): number[];
  free(frames: readonly number[]): void;
  /** The 4096-byte view of one of our allocated frames. */
  page(frame: number): Uint8Array;
}

/** One domain's (one vCPU's) access to its hypervisor. */
export interface XenAccess {
  readonly domid: number;
  /** The vCPU this thread is (0 where there are no vCPU threads). */
  readonly vcpu: number;
  readonly grants: GrantAccess;
  readonly events: EventAccess;
  readonly memory: MemoryAccess;
  /**
   * More vCPUs as threads of this domain (emulated Xen): where absent, every queue is served in
   * the calling thread.
   */
  startVcpu?(opts: StartVcpuOptions): Promise<VcpuHandle>;
  stopVcpu?(vcpu: number): Promise<VcpuExit>;
}

/** A XenAccess that can start vCPU threads. */
export type XenAccessWithVcpus = XenAccess & Required<Pick<XenAccess, 'startVcpu' | 'stopVcpu'>>;

export function canStartVcpus(xen: XenAccess): xen is XenAccessWithVcpus {
  return xen.startVcpu !== undefined && xen.stopVcpu !== undefined;
}
