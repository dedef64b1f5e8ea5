// Grant tables, v1 semantics (grant_table.h). The granting side writes entries into its own
// table (as a guest writes its shared grant frames); the mapping side's hypervisor code checks
// and pins them with a compare-exchange on the same word the granter clears when ending access.
//
// Read-only enforcement: JavaScript cannot make memory read-only, so a read-only mapping is a
// view of the same page like any other. The hypervisor enforces what Xen checks at map and copy
// time (a writable map or a copy into a GTF_readonly grant fails); not writing through a
// GNTMAP_readonly view is a contract the mapping code (the backend) keeps.
//
// Statuses follow Xen's common/grant_table.c, which reports a bad or foreign grant entry, and a
// writable pin of a GTF_readonly entry, as GNTST_general_error (_set_status_v1).
import {
  DOMID_SELF, GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTMAP_device_map, GNTMAP_host_map,
  GNTMAP_readonly, GNTST_bad_copy_arg, GNTST_bad_domain, GNTST_bad_gntref, GNTST_bad_handle,
  GNTST_bad_page, GNTST_general_error, GNTST_no_space, GNTST_okay, GNTST_permission_denied,
  GNTTAB_NR_RESERVED_ENTRIES, GTF_permit_access, GTF_readonly, GTF_reading, GTF_sub_page,
  GTF_type_mask, GTF_writing, EINVAL, ENOSPC, NR_GRANT_ENTRIES, NR_MAPTRACK, XEN_PAGE_SIZE,
} from './constants.js';
import type { DomainMemory, MemoryRegistry } from './memory.js';
import {
  C_COPY_BYTES, C_COPY_OPS, C_GRANTS_ACTIVE, C_MAPS_ACTIVE, C_MAP_OPS, C_UNMAP_OPS, G_DOMID,
  G_FLAGS, G_FLAGS_MASK, G_FRAME, G_STRIDE, M_DOMID, M_FLAGS, M_IN_USE, M_REF, M_RESERVED, M_SLOT, M_STRIDE, M_VCPU_MASK, M_VCPU_SHIFT,
  PIN_R, PIN_R_MASK, PIN_W, PIN_W_MASK, type SharedTables,
} from './shared-tables.js';

/** One GNTTABOP_map_grant_ref op (struct gnttab_map_grant_ref, IN fields). */
export interface GntMapOp {
  /** Granting domain. */
  readonly dom: number;
  readonly ref: number;
  /** GNTMAP_host_map (required, or GNTMAP_device_map) | GNTMAP_readonly. */
  readonly flags: number;
}

/**
 * Result of one map op (struct gnttab_map_grant_ref, OUT fields, plus the view): on
 * GNTST_okay a handle >= 0 and the page; otherwise handle -1 and no page.
 */
export interface GntMapResult {
  readonly status: number;
  readonly handle: number;
  readonly page: Uint8Array | undefined;
}

/** One side of a GNTTABOP_copy (struct gnttab_copy_ptr): `ref` if the GNTCOPY_*_gref flag says so, else `gmfn`. */
export interface GntCopyPtr {
  readonly ref?: number;
  readonly gmfn?: number;
  /** Granting domain for a ref; DOMID_SELF for a local frame (Xen allows nothing else). */
  readonly domid: number;
  readonly offset: number;
}

/** One GNTTABOP_copy op (struct gnttab_copy, IN fields). */
export interface GntCopyOp {
  readonly source: GntCopyPtr;
  readonly dest: GntCopyPtr;
  readonly len: number;
  /** GNTCOPY_source_gref | GNTCOPY_dest_gref. */
  readonly flags: number;
}

const FAIL: GntMapResult = { status: GNTST_general_error, handle: -1, page: undefined };
const failed = (status: number): GntMapResult =>
  status === GNTST_general_error ? FAIL : { status, handle: -1, page: undefined };

/**
 * Pins a grant entry of `slot` for `mapper` (compare-exchange loop). Returns the frame, or a
 * negative GNTST_* status. Mirrors the checks of _set_status_v1 plus Xen's pin-overflow check.
 */
export function pinGrant(t: SharedTables, slot: number, ref: number, mapper: number, readonly: boolean): number {
  const i = (slot * NR_GRANT_ENTRIES + ref) * G_STRIDE;
  const g = t.gnt;
  for (;;) {
    const w = Atomics.load(g, i + G_FLAGS);
    const flags = w & G_FLAGS_MASK;
    if ((flags & (GTF_type_mask | GTF_sub_page)) !== GTF_permit_access) return GNTST_general_error;
    if (Atomics.load(g, i + G_DOMID) !== mapper) return GNTST_general_error;
    if (!readonly && (flags & GTF_readonly) !== 0) return GNTST_general_error;
    if (readonly ? (w & PIN_R_MASK) === PIN_R_MASK : (w & PIN_W_MASK) === PIN_W_MASK) return GNTST_general_error;
    const nw = (w + (readonly ? PIN_R : PIN_W)) | GTF_reading | (readonly ? 0 : GTF_writing);
    if (Atomics.compareExchange(g, i + G_FLAGS, w, nw) === w) return Atomics.load(g, i + G_FRAME);
  }
}

/** Drops one pin; GTF_reading/GTF_writing stay set while any read/write pin remains. */
export function unpinGrant(t: SharedTables, slot: number, ref: number, readonly: boolean): void {
  const i = (slot * NR_GRANT_ENTRIES + ref) * G_STRIDE + G_FLAGS;
  for (;;) {
    const w = Atomics.load(t.gnt, i);
    let nw = w - (readonly ? PIN_R : PIN_W);
    if ((nw & PIN_W_MASK) === 0) nw &= ~GTF_writing;
    if ((nw & (PIN_W_MASK | PIN_R_MASK)) === 0) nw &= ~GTF_reading;
    if (Atomics.compareExchange(t.gnt, i, w, nw) === w) return;
  }
}

/** Releases one maptrack entry of `slot` (unmap); returns a GNTST_* status. */
export function releaseMapping(t: SharedTables, slot: number, handle: number): number {
  if (!Number.isInteger(handle) || handle < 0 || handle >= NR_MAPTRACK) return GNTST_bad_handle;
  const m = (slot * NR_MAPTRACK + handle) * M_STRIDE;
  const flags = Atomics.load(t.mt, m + M_FLAGS);
  if ((flags & M_IN_USE) === 0) return GNTST_bad_handle;
  const rslot = Atomics.load(t.mt, m + M_SLOT);
  const ref = Atomics.load(t.mt, m + M_REF);
  // Two of the domain's threads may unmap one handle at once: only one wins it.
  if (Atomics.compareExchange(t.mt, m + M_FLAGS, flags, 0) !== flags) return GNTST_bad_handle;
  unpinGrant(t, rslot, ref, (flags & GNTMAP_readonly) !== 0);
  t.count(slot, C_MAPS_ACTIVE, -1n);
  t.count(slot, C_UNMAP_OPS);
  return GNTST_okay;
}

/**
 * A vCPU thread ended: drops the mappings it made and frees the handles it had reserved. Its
 * views died with it (the emulator's rule: a mapping lives in the thread that made it).
 */
export function releaseVcpuMappings(t: SharedTables, slot: number, vcpu: number): number {
  let n = 0;
  const mine = vcpu << M_VCPU_SHIFT;
  for (let h = 0; h < NR_MAPTRACK; h++) {
    const m = (slot * NR_MAPTRACK + h) * M_STRIDE + M_FLAGS;
    const flags = Atomics.load(t.mt, m);
    if ((flags & M_VCPU_MASK) !== mine) continue;
    if ((flags & M_IN_USE) !== 0) {
      if (releaseMapping(t, slot, h) === GNTST_okay) n++;
    } else if ((flags & M_RESERVED) !== 0) {
      Atomics.compareExchange(t.mt, m, flags, 0);
    }
  }
  return n;
}

/** Domain teardown: drops every mapping the (dead) domain in `slot` held. */
export function releaseAllMappings(t: SharedTables, slot: number): number {
  let n = 0;
  for (let h = 0; h < NR_MAPTRACK; h++) {
    if ((Atomics.load(t.mt, (slot * NR_MAPTRACK + h) * M_STRIDE + M_FLAGS) & M_IN_USE) !== 0) {
      releaseMapping(t, slot, h);
      n++;
    }
  }
  return n;
}

/**
 * Domain teardown: revokes every grant of the (dead) domain in `slot`. Pinned entries keep
 * their flags (the peer's mapping stays valid until unmapped, as on Xen) but the domain is no
 * longer running, so no new map succeeds (GNTST_bad_domain).
 */
export function revokeAllGrants(t: SharedTables, slot: number): number {
  let n = 0;
  for (let ref = 0; ref < NR_GRANT_ENTRIES; ref++) {
    const i = (slot * NR_GRANT_ENTRIES + ref) * G_STRIDE + G_FLAGS;
    for (;;) {
      const w = Atomics.load(t.gnt, i);
      if ((w & GTF_type_mask) === 0) break;
      if ((w & (PIN_R_MASK | PIN_W_MASK)) !== 0) { n++; break; }
      if (Atomics.compareExchange(t.gnt, i, w, 0) === w) { n++; break; }
    }
  }
  if (n > 0) t.count(slot, C_GRANTS_ACTIVE, -BigInt(n));
  return n;
}

/** True while any entry of `slot` is still pinned by a peer (its slot cannot be reused yet). */
export function hasPinnedGrants(t: SharedTables, slot: number): boolean {
  for (let ref = 0; ref < NR_GRANT_ENTRIES; ref++) {
    if ((Atomics.load(t.gnt, (slot * NR_GRANT_ENTRIES + ref) * G_STRIDE + G_FLAGS) & (PIN_R_MASK | PIN_W_MASK)) !== 0) return true;
  }
  return false;
}

/** Clears a slot's grant table and maptrack for reuse. */
export function resetGrantSlot(t: SharedTables, slot: number): void {
  t.gnt.fill(0, slot * NR_GRANT_ENTRIES * G_STRIDE, (slot + 1) * NR_GRANT_ENTRIES * G_STRIDE);
  t.mt.fill(0, slot * NR_MAPTRACK * M_STRIDE, (slot + 1) * NR_MAPTRACK * M_STRIDE);
}

/** Maptrack handles a thread claims at once, and keeps at most, on its own free list. */
const HANDLE_BATCH = 64;
const HANDLE_KEEP = 1024;

/**
 * A domain's grant-table interface, as one of its threads (vCPUs) sees it: the guest side
 * (grant/end access, as Linux's gnttab_* helpers) and the hypercalls (GNTTABOP_map_grant_ref,
 * unmap_grant_ref, copy).
 *
 * Maptrack handles are the domain's, claimed in batches onto a per-thread free list with a
 * compare-exchange (Xen keeps a maptrack free list per vCPU), so any of the domain's threads can
 * map and unmap without a lock. Grant references stay with vCPU 0: its free list is thread-local,
 * and another vCPU's table has no references to hand out (it maps and copies only).
 */
export class GrantTable {
  private readonly freeRefs: number[] = [];
  private readonly refFrame = new Int32Array(NR_GRANT_ENTRIES).fill(-1);
  private readonly freeHandles: number[] = [];
  private handleHint = 0;

  constructor(
    private readonly t: SharedTables,
    private readonly domid: number,
    private readonly slot: number,
    private readonly memory: DomainMemory,
    private readonly registry: MemoryRegistry,
    ownsRefs = true,
    /** The vCPU (thread) this interface runs on: recorded in the maptrack entries it takes. */
    private readonly vcpu = 0,
  ) {
    // Refs below GNTTAB_NR_RESERVED_ENTRIES belong to the toolstack (grant_table.h).
    if (ownsRefs) for (let r = NR_GRANT_ENTRIES - 1; r >= GNTTAB_NR_RESERVED_ENTRIES; r--) this.freeRefs.push(r);
  }

  /** Claims up to HANDLE_BATCH free maptrack entries for this thread; false if none is free. */
  private claimHandles(): boolean {
    const base = this.slot * NR_MAPTRACK;
    for (let k = 0; k < NR_MAPTRACK && this.freeHandles.length < HANDLE_BATCH; k++) {
      const h = (this.handleHint + k) % NR_MAPTRACK;
      if (Atomics.compareExchange(this.t.mt, (base + h) * M_STRIDE + M_FLAGS, 0, this.reserved()) === 0) this.freeHandles.push(h);
    }
    this.handleHint = ((this.freeHandles.at(-1) ?? this.handleHint) + 1) % NR_MAPTRACK;
    return this.freeHandles.length > 0;
  }

  /** Keeps a released handle on this thread's list, up to HANDLE_KEEP; beyond that it stays free for any thread. */
  private keepHandle(h: number): void {
    if (this.freeHandles.length >= HANDLE_KEEP) return;
    if (Atomics.compareExchange(this.t.mt, (this.slot * NR_MAPTRACK + h) * M_STRIDE + M_FLAGS, 0, this.reserved()) === 0) this.freeHandles.push(h);
  }

  private reserved(): number { return M_RESERVED | (this.vcpu << M_VCPU_SHIFT); }

  /** Number of grant entries of a table (GNTTABOP_query_size, in entries). */
  get nrEntries(): number { return NR_GRANT_ENTRIES; }

  /**
   * Grants `domid` access to one of our frames (gnttab_grant_foreign_access): returns the
   * grant reference, or -ENOSPC (table full) / -EINVAL (frame not ours or bad domid).
   */
  grantAccess(domid: number, frame: number, readonly: boolean): number {
    if (!this.memory.owns(frame) || !Number.isInteger(domid) || domid < 0 || domid >= DOMID_SELF) return -EINVAL;
    const ref = this.freeRefs.pop();
    if (ref === undefined) return -ENOSPC;
    const i = (this.slot * NR_GRANT_ENTRIES + ref) * G_STRIDE;
    // grant_table.h: domid and frame must be visible before the flags make the entry valid.
    Atomics.store(this.t.gnt, i + G_DOMID, domid);
    Atomics.store(this.t.gnt, i + G_FRAME, frame);
    Atomics.store(this.t.gnt, i + G_FLAGS, GTF_permit_access | (readonly ? GTF_readonly : 0));
    this.refFrame[ref] = frame;
    this.memory._granted(frame, 1);
    this.t.count(this.slot, C_GRANTS_ACTIVE);
    return ref;
  }

  /**
   * Ends access (gnttab_end_foreign_access_ref): false while the grantee still has it mapped
   * (GTF_reading/GTF_writing set), as Linux's helper fails; true once ended, and the ref is freed.
   */
  endAccess(ref: number): boolean {
    if (!Number.isInteger(ref) || ref < 0 || ref >= NR_GRANT_ENTRIES || this.refFrame[ref] === -1) return false;
    const i = (this.slot * NR_GRANT_ENTRIES + ref) * G_STRIDE + G_FLAGS;
    for (;;) {
      const w = Atomics.load(this.t.gnt, i);
      if ((w & (GTF_reading | GTF_writing)) !== 0) return false;
      if (Atomics.compareExchange(this.t.gnt, i, w, 0) === w) break;
    }
    this.memory._granted(this.refFrame[ref]!, -1);
    this.refFrame[ref] = -1;
    this.freeRefs.push(ref);
    this.t.count(this.slot, C_GRANTS_ACTIVE, -1n);
    return true;
  }

  /** True while a peer has our grant `ref` mapped (or pinned for a copy). */
  isMapped(ref: number): boolean {
    if (!Number.isInteger(ref) || ref < 0 || ref >= NR_GRANT_ENTRIES) return false;
    const w = Atomics.load(this.t.gnt, (this.slot * NR_GRANT_ENTRIES + ref) * G_STRIDE + G_FLAGS);
    return (w & (GTF_reading | GTF_writing)) !== 0;
  }

  /** GNTTABOP_map_grant_ref with count = ops.length: per-op status, handle and view. */
  map(ops: readonly GntMapOp[]): GntMapResult[] {
    return ops.map((op) => this.mapOne(op));
  }

  /** Maps one grant: `{ dom, ref, flags: GNTMAP_host_map | (readonly ? GNTMAP_readonly : 0) }`. */
  mapGrant(dom: number, ref: number, readonly: boolean): GntMapResult {
    return this.mapOne({ dom, ref, flags: GNTMAP_host_map | (readonly ? GNTMAP_readonly : 0) });
  }

  private mapOne(op: GntMapOp): GntMapResult {
    const t = this.t;
    t.count(this.slot, C_MAP_OPS);
    // Order of checks as in Xen's map_grant_ref: flags, domain, maptrack, ref bounds, entry.
    if ((op.flags & (GNTMAP_host_map | GNTMAP_device_map)) === 0) return failed(GNTST_bad_gntref);
    const rslot = t.slotOf(op.dom);
    if (rslot < 0) return failed(GNTST_bad_domain);
    if (this.freeHandles.length === 0 && !this.claimHandles()) return failed(GNTST_no_space);
    if (!Number.isInteger(op.ref) || op.ref < 0 || op.ref >= NR_GRANT_ENTRIES) return failed(GNTST_bad_gntref);
    const readonly = (op.flags & GNTMAP_readonly) !== 0;
    const frame = pinGrant(t, rslot, op.ref, this.domid, readonly);
    if (frame < 0) return failed(frame);
    const sab = this.registry.page(op.dom, frame);
    if (sab === undefined) {
      unpinGrant(t, rslot, op.ref, readonly);
      return failed(GNTST_bad_page);
    }
    const handle = this.freeHandles.pop()!;
    const m = (this.slot * NR_MAPTRACK + handle) * M_STRIDE;
    Atomics.store(t.mt, m + M_SLOT, rslot);
    Atomics.store(t.mt, m + M_REF, op.ref);
    Atomics.store(t.mt, m + M_DOMID, op.dom);
    Atomics.store(t.mt, m + M_FLAGS, M_IN_USE | (this.vcpu << M_VCPU_SHIFT) | (op.flags & 0xff));
    t.count(this.slot, C_MAPS_ACTIVE);
    return { status: GNTST_okay, handle, page: new Uint8Array(sab) };
  }

  /** GNTTABOP_unmap_grant_ref with count = handles.length: per-op GNTST_* status. */
  unmap(handles: readonly number[]): number[] {
    return handles.map((h) => this.unmapGrant(h));
  }

  unmapGrant(handle: number): number {
    const st = releaseMapping(this.t, this.slot, handle);
    if (st === GNTST_okay) this.keepHandle(handle);
    return st;
  }

  /** GNTTABOP_copy with count = ops.length: per-op GNTST_* status. */
  copy(ops: readonly GntCopyOp[]): number[] {
    return ops.map((op) => this.copyOne(op));
  }

  private copyOne(op: GntCopyOp): number {
    const src = this.acquire(op.source, (op.flags & GNTCOPY_source_gref) !== 0, true);
    if (typeof src === 'number') return src;
    const dst = this.acquire(op.dest, (op.flags & GNTCOPY_dest_gref) !== 0, false);
    if (typeof dst === 'number') {
      src.release();
      return dst;
    }
    let status: number = GNTST_okay;
    const { len } = op;
    const so = op.source.offset;
    const doff = op.dest.offset;
    // gnttab_copy_buf: neither side may cross its page.
    if (!Number.isInteger(len) || !Number.isInteger(so) || !Number.isInteger(doff) || len < 0 || so < 0 || doff < 0
        || so + len > XEN_PAGE_SIZE || doff + len > XEN_PAGE_SIZE) {
      status = GNTST_bad_copy_arg;
    } else {
      // TypedArray.set copies as if through a temporary when both views share a buffer.
      new Uint8Array(dst.page, doff, len).set(new Uint8Array(src.page, so, len));
      this.t.count(this.slot, C_COPY_OPS);
      this.t.count(this.slot, C_COPY_BYTES, BigInt(len));
    }
    src.release();
    dst.release();
    return status;
  }

  /** Resolves one side of a copy (gnttab_copy_lock_domain + gnttab_copy_claim_buf). */
  private acquire(p: GntCopyPtr, isGref: boolean, readonly: boolean):
      number | { page: SharedArrayBuffer; release: () => void } {
    if (!isGref) {
      // Only DOMID_SELF may be referenced by frame (Xen: GNTST_permission_denied otherwise).
      if (p.domid !== DOMID_SELF) return GNTST_permission_denied;
      const f = p.gmfn ?? -1;
      const page = this.memory.owns(f) ? this.memory._raw(f) : undefined;
      return page === undefined ? GNTST_bad_page : { page, release: () => undefined };
    }
    const rslot = this.t.slotOf(p.domid);
    if (rslot < 0) return GNTST_bad_domain;
    const ref = p.ref ?? -1;
    if (!Number.isInteger(ref) || ref < 0 || ref >= NR_GRANT_ENTRIES) return GNTST_bad_gntref;
    const frame = pinGrant(this.t, rslot, ref, this.domid, readonly);
    if (frame < 0) return frame;
    const page = this.registry.page(p.domid, frame);
    const release = () => unpinGrant(this.t, rslot, ref, readonly);
    if (page === undefined) {
      release();
      return GNTST_bad_page;
    }
    return { page, release };
  }
}
