// The checked hypervisor: faults real Xen raises (or a real guest would suffer) that a
// SharedArrayBuffer view cannot raise, found after the fact and recorded. JavaScript cannot
// revoke or write-protect a view, so detection is deferred but exact (up to a 32-bit page
// fingerprint): a page is fingerprinted where only one party may still change it, and compared
// where that party's right ends.
//
// Violations go into a SharedArrayBuffer (every thread of every domain records into it, the main
// thread reads it). Which rules are enforced, and the header each comes from, is listed in
// docs/architecture.md ("The checked hypervisor").
import { XEN_PAGE_SIZE } from './constants.js';

/** What a violation is; each names the header rule it breaks (docs/architecture.md). */
export const VIOLATION_KINDS = [
  'readonly-mapping-written',
  'written-after-unmap',
  'ended-grant-mapped',
  'ended-grant-copied',
  'unowned-frame-mapped',
  'granted-frame-freed',
  'grant-leaked',
  'mapping-leaked',
  'port-leaked',
  /** Not a rule: more violations happened than the log holds. */
  'violations-lost',
] as const;
export type ViolationKind = (typeof VIOLATION_KINDS)[number];

/** One violation, as the hypervisor recorded it. -1 where a field does not apply. */
export interface XenViolation {
  readonly kind: ViolationKind;
  /** The domain whose action was caught (the mapper, the granter that freed, the holder). */
  readonly domid: number;
  /** The other domain involved (the granter of a mapping, the grantee of a grant, the port's peer). */
  readonly peer: number;
  /** Grant reference (in the granter's table). */
  readonly ref: number;
  /** Maptrack handle (in the mapper's table). */
  readonly handle: number;
  /** Frame (in the granter's memory). */
  readonly frame: number;
  /** Event-channel port (of `domid`). */
  readonly port: number;
  /** One line saying what happened. */
  readonly message: string;
}

// ---- Violation log (Int32): [0] records written (also past capacity), [1] records taken, then records ----
const V_COUNT = 0;
const V_TAKEN = 1;
const V_HEADER = 4;
const R_KIND = 0; // kind index + 1 (0 = record not complete yet)
const R_DOMID = 1;
const R_PEER = 2;
const R_REF = 3;
const R_HANDLE = 4;
const R_FRAME = 5;
const R_PORT = 6;
const R_STRIDE = 8;
/** Records kept; later ones are counted (and reported as lost) but not stored. */
export const VIOLATION_CAPACITY = 4096;

export function allocateViolationLog(): SharedArrayBuffer {
  return new SharedArrayBuffer((V_HEADER + VIOLATION_CAPACITY * R_STRIDE) * 4);
}

/**
 * Whether a new Hypervisor runs checked when its options do not say: BLKIF_XEN_CHECKED=1 or 0
 * decides; otherwise on under node's test runner (which sets NODE_TEST_CONTEXT in every test
 * file's process, and processes those tests spawn inherit it), off elsewhere (`blkif serve`, bench).
 */
export function checkedByDefault(env: NodeJS.ProcessEnv = process.env): boolean {
  const v = env['BLKIF_XEN_CHECKED'];
  if (v === '1' || v === 'true') return true;
  if (v === '0' || v === 'false') return false;
  return env['NODE_TEST_CONTEXT'] !== undefined;
}

export interface ViolationFields {
  readonly domid: number;
  readonly peer?: number;
  readonly ref?: number;
  readonly handle?: number;
  readonly frame?: number;
  readonly port?: number;
}

/** The violation log as one thread sees it. */
export class ViolationLog {
  private readonly v: Int32Array;
  constructor(readonly sab: SharedArrayBuffer) {
    this.v = new Int32Array(sab);
  }

  record(kind: ViolationKind, f: ViolationFields): void {
    const n = Atomics.add(this.v, V_COUNT, 1);
    if (n >= VIOLATION_CAPACITY) return;
    const r = V_HEADER + n * R_STRIDE;
    Atomics.store(this.v, r + R_DOMID, f.domid);
    Atomics.store(this.v, r + R_PEER, f.peer ?? -1);
    Atomics.store(this.v, r + R_REF, f.ref ?? -1);
    Atomics.store(this.v, r + R_HANDLE, f.handle ?? -1);
    Atomics.store(this.v, r + R_FRAME, f.frame ?? -1);
    Atomics.store(this.v, r + R_PORT, f.port ?? -1);
    Atomics.store(this.v, r + R_KIND, VIOLATION_KINDS.indexOf(kind) + 1); // last: the record is complete
  }

  /** Records not taken yet (a record another thread is still writing is left for the next read). */
  pending(): XenViolation[] {
    return this.read(false);
  }

  /** Returns the records not taken yet and marks them taken. */
  take(): XenViolation[] {
    return this.read(true);
  }

  private read(take: boolean): XenViolation[] {
    const count = Atomics.load(this.v, V_COUNT);
    const from = Atomics.load(this.v, V_TAKEN);
    const out: XenViolation[] = [];
    let n = from;
    for (; n < Math.min(count, VIOLATION_CAPACITY); n++) {
      const r = V_HEADER + n * R_STRIDE;
      const k = Atomics.load(this.v, r + R_KIND);
      if (k === 0) break;
      out.push(describe(VIOLATION_KINDS[k - 1]!, {
        domid: this.v[r + R_DOMID]!, peer: this.v[r + R_PEER]!, ref: this.v[r + R_REF]!,
        handle: this.v[r + R_HANDLE]!, frame: this.v[r + R_FRAME]!, port: this.v[r + R_PORT]!,
      }));
    }
    if (n === VIOLATION_CAPACITY && count > VIOLATION_CAPACITY) {
      out.push({ kind: 'violations-lost', domid: -1, peer: -1, ref: -1, handle: -1, frame: -1, port: -1,
        message: `${count - VIOLATION_CAPACITY} more violations were not stored (log full)` });
    }
    if (take) {
      Atomics.store(this.v, V_TAKEN, n);
      // All taken: start the log over, unless a thread recorded meanwhile.
      if (n === Math.min(count, VIOLATION_CAPACITY)) {
        for (let k = 0; k < n; k++) Atomics.store(this.v, V_HEADER + k * R_STRIDE + R_KIND, 0);
        if (Atomics.compareExchange(this.v, V_COUNT, count, 0) === count) Atomics.store(this.v, V_TAKEN, 0);
      }
    }
    return out;
  }
}

function describe(kind: ViolationKind, f: Required<ViolationFields>): XenViolation {
  const g = `gref ${f.ref} of d${f.peer}`;
  const messages: Record<ViolationKind, string> = {
    'readonly-mapping-written': `d${f.domid} handle ${f.handle}: ${g} (frame ${f.frame}) mapped GNTMAP_readonly changed while mapped (a write through the read-only view, or the granter changing a page it lent)`,
    'written-after-unmap': `${g} (frame ${f.frame}) changed after d${f.domid} unmapped it (handle ${f.handle}) and before d${f.peer} ended access: a write through d${f.domid}'s stale mapping`,
    'ended-grant-mapped': `d${f.domid} mapped ${g}, which d${f.peer} had ended (GNTST_general_error)`,
    'ended-grant-copied': `d${f.domid} copied with ${g}, which d${f.peer} had ended (GNTST_general_error)`,
    'unowned-frame-mapped': `d${f.domid} mapped or copied ${g}, whose frame ${f.frame} d${f.peer} does not own (GNTST_bad_page)`,
    'granted-frame-freed': `d${f.domid} freed frame ${f.frame} while it still grants it${f.ref >= 0 ? ` (gref ${f.ref} to d${f.peer})` : ''}`,
    'grant-leaked': `d${f.domid} still grants ${f.ref >= 0 ? `gref ${f.ref}` : 'a page'} (frame ${f.frame}) to d${f.peer}`,
    'mapping-leaked': `d${f.domid} still maps ${g} (handle ${f.handle})`,
    'port-leaked': `d${f.domid} still holds event-channel port ${f.port}${f.peer >= 0 ? ` (towards d${f.peer})` : ''}`,
    'violations-lost': 'violations lost (log full)',
  };
  return { kind, ...f, message: messages[kind] };
}

/**
 * 32-bit fingerprint of a page, compared to tell whether anybody wrote the page between two
 * points: four FNV-1a lanes over its words (independent, so the CPU runs them side by side;
 * each step is a bijection of the lane, so a change confined to one lane always shows).
 */
export function pageFingerprint(page: SharedArrayBuffer): number {
  const w = new Int32Array(page, 0, XEN_PAGE_SIZE >> 2);
  let a = 0x811c9dc5 | 0;
  let b = 0x2545f491;
  let c = 0x68e31da4;
  let d = 0x1b873593;
  for (let i = 0; i < w.length; i += 4) {
    a = Math.imul(a ^ w[i]!, 0x01000193);
    b = Math.imul(b ^ w[i + 1]!, 0x01000193);
    c = Math.imul(c ^ w[i + 2]!, 0x01000193);
    d = Math.imul(d ^ w[i + 3]!, 0x01000193);
  }
  return (Math.imul(a, 31) ^ Math.imul(b, 37) ^ Math.imul(c, 41) ^ d) | 0;
}
