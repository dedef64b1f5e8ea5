/**
 * A real Xen, as a Linux domain's userspace reaches it (XenAccess over /dev/xen): grants of other
 * domains mapped and copied through gntdev, event channels through evtchn, and pages of our own
 * (what grant copy copies into) from anonymous memory. Used by a driver domain's backend
 * (dom0 or another), and by a frontend: with `shareWith`, our pages are gntalloc's, each granted
 * to that one domain when the pages are made (xengntshr_share_pages), and `grantAccess` hands out
 * the page's standing grant (docs/real-xen.md says what that costs: no per-request grants, no
 * read-only ones).
 *
 * Zero copy: a mapped grant is a view (`koffi.view`) over gntdev's mapping of the guest's page;
 * the storage reads into and writes from it directly.
 */
import * as fs from 'node:fs';
import { EVTCHNSTAT_closed, EVTCHNSTAT_interdomain, GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTMAP_readonly, GNTST_bad_handle, GNTST_general_error, GNTST_okay, XEN_PAGE_SIZE } from '../constants.js';
import type { EventAccess, GrantAccess, MemoryAccess, XenAccess } from '../access.js';
import type { EvtchnStatus } from '../event-channel.js';
import type { GntCopyOp, GntCopyPtr, GntMapOp, GntMapResult } from '../grant-table.js';
import {
  errno, GCS_DEST, GCS_FLAGS, GCS_LEN, GCS_SOURCE, GCS_STATUS, GRANT_COPY_SEGMENT_SIZE, MAP_ANONYMOUS, MAP_PRIVATE, native, PROT_READ, PROT_WRITE,
  type Native, type Pointer,
} from './native.js';

const ENOSYS = 38;
const EBADF = 9;
const EINVAL = 22;

export interface RealXenOptions {
  /** Our own domain id (xenstore's `domid`: 0 in dom0). */
  readonly domid: number;
  /** Grants gntdev lets us map at once (its default is small). */
  readonly maxGrants?: number;
  /** Pages of our own for grant copy (default 16384: 64 MiB of address space), or with `shareWith` the pages a frontend lends. */
  readonly memoryPages?: number;
  /**
   * A frontend's backend domain: our pages come from /dev/xen/gntalloc, each granted writable to
   * it once, up front (gntalloc grants at allocation, to one domain, and only ends a grant when
   * the page goes).
   */
  readonly shareWith?: number;
}

/** Grant map, unmap and copy through gntdev. */
class RealGrants implements GrantAccess {
  private readonly maps = new Map<number, Pointer>();
  private nextHandle = 1;

  constructor(private readonly n: Native, private readonly xgt: Pointer, private readonly memory: RealMemory) {}

  get mapped(): number { return this.maps.size; }

  map(ops: readonly GntMapOp[]): GntMapResult[] {
    return ops.map((op) => {
      const readonly = (op.flags & GNTMAP_readonly) !== 0;
      const p = this.n.gnttabMapGrantRef(this.xgt, op.dom, op.ref, PROT_READ | (readonly ? 0 : PROT_WRITE)) as Pointer | null;
      // gntdev answers a failed map with EFAULT/EINVAL and no GNTST_*: a general error.
      if (p === null) return { status: GNTST_general_error, handle: -1, page: undefined };
      const handle = this.nextHandle++;
      this.maps.set(handle, p);
      return { status: GNTST_okay, handle, page: new Uint8Array(this.n.koffi.view(p, XEN_PAGE_SIZE)) };
    });
  }

  unmap(handles: readonly number[]): number[] {
    return handles.map((h) => {
      const p = this.maps.get(h);
      if (p === undefined) return GNTST_bad_handle;
      this.maps.delete(h);
      return this.n.gnttabUnmap(this.xgt, p, 1) === 0 ? GNTST_okay : GNTST_general_error;
    });
  }

  copy(ops: readonly GntCopyOp[]): number[] {
    if (ops.length === 0) return [];
    const segs = Buffer.alloc(ops.length * GRANT_COPY_SEGMENT_SIZE);
    ops.forEach((op, i) => {
      const at = i * GRANT_COPY_SEGMENT_SIZE;
      this.ptr(segs, at + GCS_SOURCE, op.source, (op.flags & GNTCOPY_source_gref) !== 0);
      this.ptr(segs, at + GCS_DEST, op.dest, (op.flags & GNTCOPY_dest_gref) !== 0);
      segs.writeUInt16LE(op.len, at + GCS_LEN);
      segs.writeUInt16LE(op.flags & (GNTCOPY_source_gref | GNTCOPY_dest_gref), at + GCS_FLAGS);
    });
    const rc = this.n.gnttabGrantCopy(this.xgt, ops.length, segs) as number;
    if (rc !== 0) return ops.map(() => GNTST_general_error);
    return ops.map((_, i) => segs.readInt16LE(i * GRANT_COPY_SEGMENT_SIZE + GCS_STATUS));
  }

  /** One side of a copy segment: a foreign grant, or the address of our own frame's byte. */
  private ptr(segs: Buffer, at: number, p: GntCopyPtr, foreign: boolean): void {
    if (foreign) {
      segs.writeUInt32LE(p.ref ?? 0, at);
      segs.writeUInt16LE(p.offset, at + 4);
      segs.writeUInt16LE(p.domid, at + 6);
    } else {
      segs.writeBigUInt64LE(this.memory.address(p.gmfn ?? -1) + BigInt(p.offset), at);
    }
  }

  /**
   * The standing gntalloc grant of one of our pages, if they were shared with `domid`. Asked
   * read-only, the grant is still writable: gntalloc makes one kind per allocation.
   */
  grantAccess(domid: number, frame: number): number {
    const refs = this.memory.refs;
    if (refs === undefined) return -ENOSYS; // pages not shared: a backend's RealXen
    if (domid !== this.memory.sharedWith) return -EINVAL;
    return refs[frame] ?? -EINVAL;
  }

  /**
   * gntalloc ends a grant only when its page is unshared: the page goes back to the pool with
   * its grant standing (a backend that kept it mapped could still reach it).
   */
  endAccess(): boolean {
    return this.memory.refs !== undefined;
  }

  /** Unmaps whatever is still mapped (the connection's end should have done it). */
  releaseAll(): number {
    const n = this.maps.size;
    this.unmap([...this.maps.keys()]);
    return n;
  }
}

/**
 * Event channels through /dev/xen/evtchn. Notifications arrive as ports read from its fd: a
 * blocking read in libuv's thread pool (fs.read), so nothing spins; each port is handed to its
 * handler, then unmasked (the driver masks a port as it reports it).
 */
class RealEvents implements EventAccess {
  private readonly handlers = new Map<number, (port: number) => void>();
  private readonly peers = new Map<number, { remoteDomid: number; remotePort: number }>();
  private readonly fd: number;
  private reading = false;
  private closing = false;
  /** A loopback channel that wakes the blocked read when we close. */
  private wake: { local: number; remote: number } | undefined;

  constructor(private readonly n: Native, private readonly xce: Pointer, private readonly domid: number) {
    this.fd = n.evtchnFd(xce) as number;
  }

  get bound(): number { return this.peers.size; }

  allocUnbound(remoteDomid: number): number {
    const p = this.n.evtchnBindUnboundPort(this.xce, remoteDomid) as number;
    if (p < 0) return -errno();
    // Its peer binds later: interdomain from then on, as far as we track it.
    this.peers.set(p, { remoteDomid, remotePort: 0 });
    return p;
  }

  bindInterdomain(remoteDomid: number, remotePort: number): number {
    const p = this.n.evtchnBindInterdomain(this.xce, remoteDomid, remotePort) as number;
    if (p < 0) return -errno();
    this.peers.set(p, { remoteDomid, remotePort });
    return p;
  }

  bindVcpu(): number {
    return 0; // one thread: every port notifies it
  }

  notify(port: number): number {
    return this.n.evtchnNotify(this.xce, port) === 0 ? 0 : -errno();
  }

  close(port: number): number {
    this.handlers.delete(port);
    this.peers.delete(port);
    return this.n.evtchnUnbind(this.xce, port) === 0 ? 0 : -errno();
  }

  status(port: number): EvtchnStatus {
    const p = this.peers.get(port);
    return p === undefined ? { status: EVTCHNSTAT_closed, remoteDomid: 0, remotePort: 0 } : { status: EVTCHNSTAT_interdomain, ...p };
  }

  on(port: number, handler: (port: number) => void): () => void {
    this.handlers.set(port, handler);
    this.read();
    return () => {
      if (this.handlers.get(port) === handler) this.handlers.delete(port);
    };
  }

  private read(): void {
    if (this.reading || this.closing) return;
    this.reading = true;
    const buf = Buffer.alloc(4 * 64);
    const loop = () => {
      fs.read(this.fd, buf, 0, buf.length, null, (err, n) => {
        if (err !== null || this.closing) {
          this.reading = false;
          return;
        }
        for (let i = 0; i + 4 <= n; i += 4) {
          const port = buf.readUInt32LE(i);
          try {
            this.handlers.get(port)?.(port);
          } finally {
            if (this.peers.has(port)) this.n.evtchnUnmask(this.xce, port);
          }
        }
        loop();
      });
    };
    loop();
  }

  /** Ends the read loop (a notification on a loopback channel wakes its blocked read). */
  async stop(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    if (!this.reading) return;
    const remote = this.n.evtchnBindUnboundPort(this.xce, this.domid) as number;
    const local = remote < 0 ? -1 : this.n.evtchnBindInterdomain(this.xce, this.domid, remote) as number;
    if (local >= 0) {
      this.wake = { local, remote };
      this.n.evtchnNotify(this.xce, local);
    }
    const deadline = Date.now() + 2000;
    while (this.reading && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    if (this.wake !== undefined) {
      this.n.evtchnUnbind(this.xce, this.wake.local);
      this.n.evtchnUnbind(this.xce, this.wake.remote);
    }
  }
}

/** Our own pages: one anonymous mapping, handed out by frame number. */
class RealMemory implements MemoryAccess {
  private readonly free_: number[] = [];
  private readonly used: Uint8Array;
  private readonly base: bigint;
  private readonly view: ArrayBuffer;

  constructor(
    private readonly n: Native,
    private readonly region: Pointer,
    readonly totalPages: number,
    /** gntalloc's grant refs of the pages, by frame, and the domain they are granted to. */
    readonly refs?: Uint32Array,
    readonly sharedWith?: number,
    private readonly xgs?: Pointer,
  ) {
    this.base = n.koffi.address(region);
    this.view = n.koffi.view(region, totalPages * XEN_PAGE_SIZE);
    this.used = new Uint8Array(totalPages);
    for (let f = totalPages - 1; f >= 0; f--) this.free_.push(f);
  }

  get freePages(): number { return this.free_.length; }

  alloc(count = 1): number[] {
    if (count > this.free_.length) throw new Error(`out of memory: ${count} pages wanted, ${this.free_.length} free`);
    return this.allocUpTo(count);
  }

  allocUpTo(count: number): number[] {
    const out = this.free_.splice(Math.max(0, this.free_.length - count)).reverse();
    for (const f of out) this.used[f] = 1;
    return out;
  }

  free(frames: readonly number[]): void {
    for (const f of frames) {
      if (this.used[f] !== 1) continue;
      this.used[f] = 0;
      this.free_.push(f);
    }
  }

  page(frame: number): Uint8Array {
    if (this.used[frame] !== 1) throw new Error(`frame ${frame} is not allocated`);
    return new Uint8Array(this.view, frame * XEN_PAGE_SIZE, XEN_PAGE_SIZE);
  }

  address(frame: number): bigint {
    if (this.used[frame] !== 1) throw new Error(`frame ${frame} is not allocated`);
    return this.base + BigInt(frame * XEN_PAGE_SIZE);
  }

  unmapAll(): void {
    if (this.xgs !== undefined) {
      this.n.gntshrUnshare(this.xgs, this.region, this.totalPages);
      this.n.gntshrClose(this.xgs);
    } else {
      this.n.munmap(this.region, this.totalPages * XEN_PAGE_SIZE);
    }
  }
}

/** A driver domain's access to the real Xen it runs on. */
export class RealXen implements XenAccess {
  readonly vcpu = 0;
  private closed = false;

  private constructor(
    readonly domid: number,
    private readonly n: Native,
    private readonly xgt: Pointer,
    private readonly xce: Pointer,
    readonly grants: RealGrants,
    readonly events: RealEvents,
    readonly memory: RealMemory,
  ) {}

  /** Opens gntdev and evtchn; fails with one line saying what is missing. */
  static open(o: RealXenOptions): RealXen {
    const n = native();
    const xgt = n.gnttabOpen(null, 0) as Pointer | null;
    if (xgt === null) throw new Error(`opening /dev/xen/gntdev failed (errno ${errno()}): is this a Xen domain with the xen-gntdev module loaded?`);
    const xce = n.evtchnOpen(null, 0) as Pointer | null;
    if (xce === null) {
      n.gnttabClose(xgt);
      throw new Error(`opening /dev/xen/evtchn failed (errno ${errno()}): is this a Xen domain with the xen-evtchn module loaded?`);
    }
    // Every segment of a full ring of indirect requests, mapped at once.
    if (n.gnttabSetMaxGrants(xgt, o.maxGrants ?? 65536) !== 0 && errno() !== EBADF) {
      // Older gntdev without a limit to raise: its default stands.
    }
    // Grant copy's bounce pages: blkback takes up to grantCopyPages (4104 by default) per VBD.
    // An anonymous private mapping costs only the pages touched.
    const pages = o.memoryPages ?? 16384;
    let memory: RealMemory;
    if (o.shareWith !== undefined) {
      const xgs = n.gntshrOpen(null, 0) as Pointer | null;
      const refs = new Uint32Array(pages);
      const region = xgs === null ? null : n.gntshrSharePages(xgs, o.shareWith, pages, refs, 1) as Pointer | null;
      if (region === null) {
        const e = errno();
        if (xgs !== null) n.gntshrClose(xgs);
        n.gnttabClose(xgt);
        n.evtchnClose(xce);
        throw new Error(`sharing ${pages} pages with domain ${o.shareWith} through /dev/xen/gntalloc failed (errno ${e}): is xen-gntalloc loaded, and its limit (/sys/module/xen_gntalloc/parameters/limit) at least ${pages}?`);
      }
      memory = new RealMemory(n, region, pages, refs, o.shareWith, xgs!);
    } else {
      const region = n.mmap(null, pages * XEN_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) as Pointer | null;
      if (region === null || n.koffi.address(region) === 0xffffffffffffffffn) {
        n.gnttabClose(xgt);
        n.evtchnClose(xce);
        throw new Error(`mmap of ${pages} pages failed (errno ${errno()})`);
      }
      memory = new RealMemory(n, region, pages);
    }
    return new RealXen(o.domid, n, xgt, xce, new RealGrants(n, xgt, memory), new RealEvents(n, xce, o.domid), memory);
  }

  /** What is still held: grant mappings and bound ports (0 and 0 once every device let go). */
  held(): { mapped: number; bound: number } {
    return { mapped: this.grants.mapped, bound: this.events.bound };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.events.stop();
    this.grants.releaseAll();
    this.n.evtchnClose(this.xce);
    this.n.gnttabClose(this.xgt);
    this.memory.unmapAll();
  }
}
