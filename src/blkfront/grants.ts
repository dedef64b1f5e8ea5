/**
 * How the frontend lends its pages to the backend. Two ways, one interface, so the data path reads
 * the same whichever is negotiated (as blkback's page-access.ts puts its three behind one):
 * - `GrantPerRequest`: a grant per page per request, read-only for data going to disk, ended once
 *   the response is in (Linux blkfront without `feature-persistent`).
 * - `PersistentGrants`: each page is granted writable once, on first use, and keeps its grant for
 *   the whole connection (`feature-persistent`, Linux `persistent_gnts`); a grant the backend has
 *   unmapped may be ended while its page is idle (Linux `purge_persistent_grants`).
 * Either way a page whose grant the backend still maps is not reused while it does (page-pool.ts
 * retries ending such grants, as Linux defers them).
 */
import type { XenAccess } from '../xen/index.js';
import { BlkfrontError, type BlkfrontCounters } from './io.js';
import type { PagePool } from './page-pool.js';
import type { ShadowEntry } from './shadow.js';

export interface GrantPolicy {
  /** `feature-persistent` on both ends. */
  readonly persistent: boolean;
  /** Pages holding a lasting grant now. */
  readonly kept: number;
  /** The grant for one page of a request; throws a BlkfrontError when none can be made. */
  grant(frame: number, readOnly: boolean): number;
  /**
   * After the response (or an undo): ends access to the request's pages. A page whose grant the
   * backend still maps is marked -1 in its frame list, so `givePages` never returns it to the
   * pool, and counted as leaked. Returns how many there were.
   */
  end(s: ShadowEntry<unknown>): number;
  /** Ends the lasting grants of idle pages the backend no longer maps; returns how many. */
  purge(): number;
  /** The connection ends: every lasting grant with it. */
  endAll(): void;
}

/** Returns the request's pages to the pool, but for those `GrantPolicy.end` found still mapped. */
export function givePages(pool: PagePool, s: ShadowEntry<unknown>): void {
  for (const f of s.frames) if (f >= 0) pool.give(f);
  for (const f of s.indirectFrames) if (f >= 0) pool.give(f);
}

interface GrantDeps {
  readonly xen: XenAccess;
  readonly backDomid: number;
  readonly pool: PagePool;
  readonly counters: BlkfrontCounters;
}

function grantPage(d: GrantDeps, frame: number, readOnly: boolean, lasting: boolean): number {
  // A persistent grant is reused by request after request: the checked hypervisor must know.
  const ref = d.xen.grants.grantAccess(d.backDomid, frame, readOnly, { lasting });
  if (ref < 0) throw new BlkfrontError('EIO', `granting page ${frame} to domain ${d.backDomid} failed (${ref})`);
  d.counters.grants++;
  return ref;
}

export class GrantPerRequest implements GrantPolicy {
  readonly persistent = false;
  readonly kept = 0;

  constructor(private readonly d: GrantDeps) {}

  /** The backend only reads a page we write out: granted read-only then. */
  grant(frame: number, readOnly: boolean): number {
    return grantPage(this.d, frame, readOnly, false);
  }

  end(s: ShadowEntry<unknown>): number {
    let leaked = 0;
    const end = (refs: number[], frames: number[]) => {
      for (let i = 0; i < refs.length; i++) {
        if (this.d.xen.grants.endAccess(refs[i]!)) continue;
        this.d.pool.stick(frames[i]!, refs[i]!);
        frames[i] = -1;
        leaked++;
      }
    };
    end(s.grefs, s.frames);
    end(s.indirectGrefs, s.indirectFrames);
    return leaked;
  }

  purge(): number {
    return 0;
  }

  endAll(): void {}
}

export class PersistentGrants implements GrantPolicy {
  readonly persistent = true;
  /**
   * Persistent grants by frame, -1 or a hole for none: a dense array, as the pool's views (a
   * lookup per page of every request). Walked through the pool's frames, every one of them.
   */
  private readonly refs: number[] = [];
  private count = 0;

  constructor(private readonly d: GrantDeps) {}

  get kept(): number {
    return this.count;
  }

  /** The page's lasting writable grant, made on first use. */
  grant(frame: number, _readOnly: boolean): number {
    const ref = this.refs[frame];
    if (ref !== undefined && ref >= 0) return ref;
    const made = grantPage(this.d, frame, false, true);
    while (this.refs.length <= frame) this.refs.push(-1);
    this.refs[frame] = made;
    this.count++;
    return made;
  }

  /** Persistent grants outlive the request: nothing to end. */
  end(_s: ShadowEntry<unknown>): number {
    return 0;
  }

  purge(): number {
    if (this.count === 0) return 0;
    const free = new Set(this.d.pool.freeFrames());
    let n = 0;
    for (const frame of this.granted()) {
      // A page lent to a request keeps its grant; one the backend still maps cannot be ended.
      if (!free.has(frame) || !this.d.xen.grants.endAccess(this.refs[frame]!)) continue;
      this.refs[frame] = -1;
      this.count--;
      n++;
    }
    return n;
  }

  /** Persistent grants end with the connection; a page the backend still maps waits in the pool's stuck list. */
  endAll(): void {
    for (const frame of this.granted()) {
      const ref = this.refs[frame]!;
      this.refs[frame] = -1;
      if (this.d.xen.grants.endAccess(ref)) continue;
      this.d.pool.stick(frame, ref);
    }
    this.count = 0;
  }

  /** The frames holding a persistent grant now (a copy: the caller may end them). */
  private granted(): number[] {
    const out: number[] = [];
    for (const f of this.d.pool.frames) {
      const ref = this.refs[f];
      if (ref !== undefined && ref >= 0) out.push(f);
    }
    return out;
  }
}
