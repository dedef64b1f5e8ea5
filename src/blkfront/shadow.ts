/**
 * The shadow table (Linux blkfront `shadow[]`): one entry per ring slot, indexed by the request
 * `id`, remembering what each in-flight request was so that a response can be checked (id in
 * range, pending, operation as sent) and its grants and pages released. Entries are preallocated
 * and reused; the free ids form a stack.
 */
export interface ShadowEntry<T> {
  readonly index: number;
  pending: boolean;
  /** What the request carries for its owner (the I/O it is part of, byte range). */
  owner: T | undefined;
  /** The operation the response must echo (indirect_op for an indirect request). */
  expectOp: number;
  /** Data pages (guest frames) and their grants, one per segment. */
  readonly frames: number[];
  readonly grefs: number[];
  /** Indirect descriptor pages and their grants. */
  readonly indirectFrames: number[];
  readonly indirectGrefs: number[];
}

export class ShadowTable<T> {
  readonly entries: ShadowEntry<T>[];
  private readonly free: number[];

  constructor(readonly size: number) {
    this.entries = [];
    this.free = [];
    for (let i = 0; i < size; i++) {
      this.entries.push({ index: i, pending: false, owner: undefined, expectOp: 0, frames: [], grefs: [], indirectFrames: [], indirectGrefs: [] });
      this.free.push(size - 1 - i);
    }
  }

  get available(): number {
    return this.free.length;
  }

  get inFlight(): number {
    return this.size - this.free.length;
  }

  /** Takes a free entry (the caller checked `available`). */
  take(): ShadowEntry<T> {
    const i = this.free.pop();
    if (i === undefined) throw new Error('shadow table exhausted');
    const e = this.entries[i]!;
    e.pending = true;
    return e;
  }

  /**
   * The pending entry a response id names, or undefined if the id is out of range or not pending
   * (Linux `blkif_interrupt`: "response has incorrect id" / "response for non-pending request").
   */
  lookup(id: bigint): ShadowEntry<T> | undefined {
    if (id < 0n || id >= BigInt(this.size)) return undefined;
    const e = this.entries[Number(id)]!;
    return e.pending ? e : undefined;
  }

  /** Returns an entry to the free stack, its arrays emptied for reuse. */
  release(e: ShadowEntry<T>): void {
    if (!e.pending) throw new Error(`shadow ${e.index} released twice`);
    e.pending = false;
    e.owner = undefined;
    e.frames.length = 0;
    e.grefs.length = 0;
    e.indirectFrames.length = 0;
    e.indirectGrefs.length = 0;
    this.free.push(e.index);
  }

  /** Pending entries, oldest id first (for re-issue after a reconnect). */
  pendingEntries(): ShadowEntry<T>[] {
    return this.entries.filter((e) => e.pending);
  }
}
