// Grant tables, v1 semantics (grant_table.h). The granting side writes entries into its own
// table (as a guest writes its shared grant frames); the mapping side's hypervisor code checks
// and pins them with a compare-exchange on the same word the granter clears when ending access.
//
// Read-only enforcement: JavaScript cannot make memory read-only, so a read-only mapping is a
// view of the same page like any other. The hypervisor enforces what Xen checks at map and copy
// time (a writable map or a copy into a GTF_readonly grant fails); a write through a
// GNTMAP_readonly view, or through a view kept after its unmap, is caught afterwards by the
// checked mode (checked.ts): fingerprints taken at map and unmap, compared at unmap and at the
// granter's end of access.
//
// Statuses follow Xen's common/grant_table.c, which reports a bad or foreign grant entry, and a
// writable pin of a GTF_readonly entry, as GNTST_general_error (_set_status_v1).
//
// One idea read whole: map, unmap and copy pin and release the same entries with the same
// compare-exchange rules, so the table stays in one file (a little over 500 lines).
import {
  DOMID_SELF, GNTCOPY_dest_gref, GNTCOPY_source_gref, GNTMAP_device_map, GNTMAP_host_map,
  GNTMAP_readonly, GNTST_bad_copy_arg, GNTST_bad_domain, GNTST_bad_gntref, GNTST_bad_handle,
  GNTST_bad_page, GNTST_general_error, GNTST_no_space, GNTST_okay, GNTST_permission_denied,
  GNTTAB_NR_RESERVED_ENTRIES, GTF_permit_access, GTF_readonly, GTF_reading, GTF_sub_page,
  GTF_type_mask, GTF_writing, EINVAL, ENOSPC, NR_GRANT_ENTRIES, NR_MAPTRACK, XEN_PAGE_SIZE,
} from './constants.js';
import { pageFingerprint } from './checked.js';
import type { DomainMemory, MemoryRegistry } from './memory.js';
import {
  C_COPY_BYTES, C_COPY_OPS, C_GRANTS_ACTIVE, C_MAPS_ACTIVE, C_MAP_OPS, C_UNMAP_OPS, G_ARMED, G_CHECK,
  G_CHK_ENDED, G_CHK_LASTING, G_DOMID, G_FLAGS, G_FLAGS_MASK, G_FP, G_FRAME, G_LAST_HANDLE, G_STRIDE, G_WPINS, M_DOMID, M_FLAGS, M_IN_USE, M_REF, M_RESERVED, M_SLOT, M_STRIDE, M_VCPU_MASK, M_VCPU_SHIFT,
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
 * A pin disarms the write-after-unmap check (the page may change legitimately again), but for
 * a copy out of the page (`keepArmed`), which cannot change it.
 */
export function pinGrant(t: SharedTables, slot: number, ref: number, mapper: number, readonly: boolean, keepArmed = false): number {
  const i = (slot * NR_GRANT_ENTRIES + ref) * G_STRIDE;
  const g = t.gnt;
  for (;;) {
    const w = Atomics.load(g, i + G_FLAGS);
    const flags = w & G_FLAGS_MASK;
    if ((flags & (GTF_type_mask | GTF_sub_page)) !== GTF_permit_access) return GNTST_general_error;
    if (Atomics.load(g, i + G_DOMID) !== mapper) return GNTST_general_error;
    if (!readonly && (flags & GTF_readonly) !== 0) return GNTST_general_error;
    if (readonly ? (w & PIN_R_MASK) === PIN_R_MASK : (w & PIN_W_MASK) === PIN_W_MASK) return GNTST_general_error;
    let nw = (w + (readonly ? PIN_R : PIN_W)) | GTF_reading | (readonly ? 0 : GTF_writing);
    if (!keepArmed) nw &= ~G_ARMED;
    if (Atomics.compareExchange(g, i + G_FLAGS, w, nw) === w) {
      if (!readonly && t.checked) Atomics.add(g, i + G_WPINS, 1);
      return Atomics.load(g, i + G_FRAME);
    }
  }
}

/** What an unmap leaves for the write-after-unmap check: the page's fingerprint now, and the handle. */
export interface UnmapMark {
  readonly fp: number;
  readonly handle: number;
}

/**
 * Drops one pin; GTF_reading/GTF_writing stay set while any read/write pin remains. With `mark`
 * (checked mode, an unmap) the pin that leaves the entry unpinned arms the write-after-unmap
 * check, unless the granter said the grant is long-lived.
 */
export function unpinGrant(t: SharedTables, slot: number, ref: number, readonly: boolean, mark?: UnmapMark): void {
  const e = (slot * NR_GRANT_ENTRIES + ref) * G_STRIDE;
  const i = e + G_FLAGS;
  const arm = mark !== undefined && (Atomics.load(t.gnt, e + G_CHECK) & G_CHK_LASTING) === 0;
  for (;;) {
    const w = Atomics.load(t.gnt, i);
    let nw = w - (readonly ? PIN_R : PIN_W);
    if ((nw & PIN_W_MASK) === 0) nw &= ~GTF_writing;
    if ((nw & (PIN_W_MASK | PIN_R_MASK)) === 0) {
      nw &= ~GTF_reading;
      if (arm) {
        // Stored before the flags say so; a pin in between makes this compare-exchange fail.
        Atomics.store(t.gnt, e + G_FP, mark.fp);
        Atomics.store(t.gnt, e + G_LAST_HANDLE, mark.handle);
        nw |= G_ARMED;
      }
    }
    if (Atomics.compareExchange(t.gnt, i, w, nw) === w) return;
  }
}

/** Where the hypervisor code of a thread finds a domain's page (checked mode's fingerprints). */
export type PageLookup = (domid: number, frame: number) => SharedArrayBuffer | undefined;

/**
 * Releases one maptrack entry of `slot` (unmap); returns a GNTST_* status. In checked mode,
 * `pageOf` lets the unmap fingerprint the page (or `fp` gives it, already computed).
 */
export function releaseMapping(t: SharedTables, slot: number, handle: number, pageOf?: PageLookup, fp?: number): number {
  if (!Number.isInteger(handle) || handle < 0 || handle >= NR_MAPTRACK) return GNTST_bad_handle;
  const m = (slot * NR_MAPTRACK + handle) * M_STRIDE;
  const flags = Atomics.load(t.mt, m + M_FLAGS);
  if ((flags & M_IN_USE) === 0) return GNTST_bad_handle;
  const rslot = Atomics.load(t.mt, m + M_SLOT);
  const ref = Atomics.load(t.mt, m + M_REF);
  // Two of the domain's threads may unmap one handle at once: only one wins it.
  if (Atomics.compareExchange(t.mt, m + M_FLAGS, flags, 0) !== flags) return GNTST_bad_handle;
  let mark: UnmapMark | undefined;
  const e = (rslot * NR_GRANT_ENTRIES + ref) * G_STRIDE;
  if (t.checked && (Atomics.load(t.gnt, e + G_CHECK) & G_CHK_LASTING) === 0) {
    if (fp === undefined && pageOf !== undefined) {
      const page = pageOf(Atomics.load(t.mt, m + M_DOMID), Atomics.load(t.gnt, e + G_FRAME));
      if (page !== undefined) fp = pageFingerprint(page);
    }
    if (fp !== undefined) mark = { fp, handle };
  }
  unpinGrant(t, rslot, ref, (flags & GNTMAP_readonly) !== 0, mark);
  t.count(slot, C_MAPS_ACTIVE, -1n);
  t.count(slot, C_UNMAP_OPS);
  return GNTST_okay;
}

/**
 * A vCPU thread ended: drops the mappings it made and frees the handles it had reserved. Its
 * views died with it (the emulator's rule: a mapping lives in the thread that made it).
 */
export function releaseVcpuMappings(t: SharedTables, slot: number, vcpu: number, pageOf?: PageLookup): number {
  let n = 0;
  const mine = vcpu << M_VCPU_SHIFT;
  for (let h = 0; h < NR_MAPTRACK; h++) {
    const m = (slot * NR_MAPTRACK + h) * M_STRIDE + M_FLAGS;
    const flags = Atomics.load(t.mt, m);
    if ((flags & M_VCPU_MASK) !== mine) continue;
    if ((flags & M_IN_USE) !== 0) {
      if (releaseMapping(t, slot, h, pageOf) === GNTST_okay) n++;
    } else if ((flags & M_RESERVED) !== 0) {
      Atomics.compareExchange(t.mt, m, flags, 0);
    }
  }
  return n;
}

/** Domain teardown: drops every mapping the (dead) domain in `slot` held. */
export function releaseAllMappings(t: SharedTables, slot: number, pageOf?: PageLookup): number {
  let n = 0;
  for (let h = 0; h < NR_MAPTRACK; h++) {
    if ((Atomics.load(t.mt, (slot * NR_MAPTRACK + h) * M_STRIDE + M_FLAGS) & M_IN_USE) !== 0) {
      releaseMapping(t, slot, h, pageOf);
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
  /**
   * Checked mode: each GNTMAP_readonly mapping this thread made: the page's fingerprint then, and
   * the entry's writable-pin count (a writable mapping or copy of the same grant may change it).
   */
  private readonly roMaps = new Map<number, { fp: number; wpins: number }>();
  private readonly pageOf: PageLookup;

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
    this.pageOf = (d, f) => registry.page(d, f);
  }

  /** True if the hypervisor runs checked (checked.ts): violations are recorded. */
  get checked(): boolean { return this.t.checked; }

  /** Checked mode: why a pin of `dom`'s `ref` failed, if it is a violation (an ended grant). */
  private endedGrant(rslot: number, ref: number): boolean {
    const e = (rslot * NR_GRANT_ENTRIES + ref) * G_STRIDE;
    return (Atomics.load(this.t.gnt, e + G_FLAGS) & GTF_type_mask) === 0
      && (Atomics.load(this.t.gnt, e + G_CHECK) & G_CHK_ENDED) !== 0
      && Atomics.load(this.t.gnt, e + G_DOMID) === this.domid;
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
   * `lasting` (ours, not Xen's; only the checked mode reads it): the grant lives across many
   * uses and both sides write the page (a shared ring, a persistent grant), so a change after
   * the peer's unmap is not a stale write.
   */
  grantAccess(domid: number, frame: number, readonly: boolean, opts: { lasting?: boolean } = {}): number {
    if (!this.memory.owns(frame) || !Number.isInteger(domid) || domid < 0 || domid >= DOMID_SELF) return -EINVAL;
    const ref = this.freeRefs.pop();
    if (ref === undefined) return -ENOSPC;
    const i = (this.slot * NR_GRANT_ENTRIES + ref) * G_STRIDE;
    // grant_table.h: domid and frame must be visible before the flags make the entry valid.
    Atomics.store(this.t.gnt, i + G_DOMID, domid);
    Atomics.store(this.t.gnt, i + G_FRAME, frame);
    Atomics.store(this.t.gnt, i + G_CHECK, opts.lasting === true ? G_CHK_LASTING : 0);
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
    const e = (this.slot * NR_GRANT_ENTRIES + ref) * G_STRIDE;
    let w: number;
    for (;;) {
      w = Atomics.load(this.t.gnt, e + G_FLAGS);
      if ((w & (GTF_reading | GTF_writing)) !== 0) return false;
      if (Atomics.compareExchange(this.t.gnt, e + G_FLAGS, w, 0) === w) break;
    }
    const frame = this.refFrame[ref]!;
    if (this.t.checked) {
      Atomics.store(this.t.gnt, e + G_CHECK, G_CHK_ENDED);
      // Armed by the peer's last unmap: only the granter may have changed the page since, and
      // the granter does not write a page it lent for one use before taking it back.
      const page = this.memory._raw(frame);
      if ((w & G_ARMED) !== 0 && page !== undefined && pageFingerprint(page) !== Atomics.load(this.t.gnt, e + G_FP)) {
        this.t.violations.record('written-after-unmap', {
          domid: Atomics.load(this.t.gnt, e + G_DOMID), peer: this.domid, ref, frame,
          handle: Atomics.load(this.t.gnt, e + G_LAST_HANDLE),
        });
      }
    }
    this.memory._granted(frame, -1);
    this.refFrame[ref] = -1;
    this.freeRefs.push(ref);
    this.t.count(this.slot, C_GRANTS_ACTIVE, -1n);
    return true;
  }

  /** @internal The first of our grant references on `frame`, and its grantee (checked mode's reports). */
  _grantOf(frame: number): { ref: number; peer: number } | undefined {
    const ref = this.refFrame.indexOf(frame);
    if (ref < 0) return undefined;
    return { ref, peer: Atomics.load(this.t.gnt, (this.slot * NR_GRANT_ENTRIES + ref) * G_STRIDE + G_DOMID) };
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
    if (frame < 0) {
      if (t.checked && this.endedGrant(rslot, op.ref)) t.violations.record('ended-grant-mapped', { domid: this.domid, peer: op.dom, ref: op.ref });
      return failed(frame);
    }
    const sab = this.registry.page(op.dom, frame);
    if (sab === undefined) {
      unpinGrant(t, rslot, op.ref, readonly);
      if (t.checked) t.violations.record('unowned-frame-mapped', { domid: this.domid, peer: op.dom, ref: op.ref, frame });
      return failed(GNTST_bad_page);
    }
    const handle = this.freeHandles.pop()!;
    if (t.checked) {
      const e = (rslot * NR_GRANT_ENTRIES + op.ref) * G_STRIDE;
      // Pinned writable as well (by this domain: Xen lets a grantee map a grant both ways), or a
      // lasting grant (a persistent grant, a ring), which its granter writes all along: the page
      // may change, nothing to check.
      if (readonly && (Atomics.load(t.gnt, e + G_FLAGS) & PIN_W_MASK) === 0 && (Atomics.load(t.gnt, e + G_CHECK) & G_CHK_LASTING) === 0) {
        this.roMaps.set(handle, { fp: pageFingerprint(sab), wpins: Atomics.load(t.gnt, e + G_WPINS) });
      } else this.roMaps.delete(handle);
    }
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
    let fp: number | undefined;
    if (this.t.checked) fp = this.checkReadonly(handle);
    const st = releaseMapping(this.t, this.slot, handle, this.pageOf, fp);
    if (st === GNTST_okay) this.keepHandle(handle);
    return st;
  }

  /**
   * Checked mode, before an unmap: a GNTMAP_readonly mapping's page must be as it was mapped
   * (grant_table.h: GNTMAP_readonly, "the mapping is read-only"). Returns the fingerprint now,
   * for the write-after-unmap check, or undefined if the handle is not this thread's RO map.
   */
  private checkReadonly(handle: number): number | undefined {
    const before = this.roMaps.get(handle);
    if (before === undefined) return undefined;
    this.roMaps.delete(handle);
    if (!Number.isInteger(handle) || handle < 0 || handle >= NR_MAPTRACK) return undefined;
    const m = (this.slot * NR_MAPTRACK + handle) * M_STRIDE;
    const flags = Atomics.load(this.t.mt, m + M_FLAGS);
    if ((flags & M_IN_USE) === 0 || (flags & GNTMAP_readonly) === 0) return undefined;
    const dom = Atomics.load(this.t.mt, m + M_DOMID);
    const ref = Atomics.load(this.t.mt, m + M_REF);
    const e = (Atomics.load(this.t.mt, m + M_SLOT) * NR_GRANT_ENTRIES + ref) * G_STRIDE;
    const frame = Atomics.load(this.t.gnt, e + G_FRAME);
    const page = this.registry.page(dom, frame);
    if (page === undefined) return undefined;
    const now = pageFingerprint(page);
    const writableMeanwhile = Atomics.load(this.t.gnt, e + G_WPINS) !== before.wpins || (Atomics.load(this.t.gnt, e + G_FLAGS) & PIN_W_MASK) !== 0;
    if (now !== before.fp && !writableMeanwhile) this.t.violations.record('readonly-mapping-written', { domid: this.domid, peer: dom, ref, handle, frame });
    return now;
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
    // A copy out of the page leaves the write-after-unmap check armed: it cannot change the page.
    const frame = pinGrant(this.t, rslot, ref, this.domid, readonly, readonly);
    if (frame < 0) {
      if (this.t.checked && this.endedGrant(rslot, ref)) this.t.violations.record('ended-grant-copied', { domid: this.domid, peer: p.domid, ref });
      return frame;
    }
    const page = this.registry.page(p.domid, frame);
    const release = () => unpinGrant(this.t, rslot, ref, readonly);
    if (page === undefined) {
      release();
      if (this.t.checked) this.t.violations.record('unowned-frame-mapped', { domid: this.domid, peer: p.domid, ref, frame });
      return GNTST_bad_page;
    }
    return { page, release };
  }
}
