// The node database. Nodes are immutable records replaced on change, each
// with a generation number, so a transaction can tell whether what it read
// changed meanwhile (the scheme of cxenstored's transaction.c).
import type { XsPermission } from './permissions.js';

export interface XsNode {
  readonly value: Uint8Array;
  readonly children: readonly string[];
  readonly perms: readonly XsPermission[];
  readonly gen: number;
}

/** What tree operations need: the live store or a transaction's view of it. */
export interface NodeView {
  get(path: string): XsNode | undefined;
  /** The node as this view sees it, without counting as a read (a transaction's commit does not depend on it). */
  peek(path: string): XsNode | undefined;
  put(path: string, node: XsNode): void;
  remove(path: string): void;
  /** Nodes whose owner (first permission) is `domid`. */
  ownedBy(domid: number): number;
}

let generation = 0;
export function nextGeneration(): number {
  return ++generation;
}

export const ABSENT_GEN = -1;

export class Store implements NodeView {
  private readonly nodes = new Map<string, XsNode>();
  private readonly owned = new Map<number, number>();

  get(path: string): XsNode | undefined {
    return this.nodes.get(path);
  }

  peek(path: string): XsNode | undefined {
    return this.nodes.get(path);
  }

  put(path: string, node: XsNode): void {
    const old = this.nodes.get(path);
    if (old) this.count(old, -1);
    this.nodes.set(path, node);
    this.count(node, 1);
  }

  remove(path: string): void {
    const old = this.nodes.get(path);
    if (!old) return;
    this.count(old, -1);
    this.nodes.delete(path);
  }

  ownedBy(domid: number): number {
    return this.owned.get(domid) ?? 0;
  }

  paths(): IterableIterator<string> {
    return this.nodes.keys();
  }

  get size(): number {
    return this.nodes.size;
  }

  private count(n: XsNode, d: number): void {
    const owner = n.perms[0]?.domid;
    if (owner === undefined) return;
    this.owned.set(owner, (this.owned.get(owner) ?? 0) + d);
  }
}

/**
 * A transaction's private view: the first access of a path reads the live
 * store and records the generation seen; later accesses see the
 * transaction's own copy. Commit succeeds only if no recorded path changed.
 */
export class TransactionView implements NodeView {
  private readonly overlay = new Map<string, XsNode | null>();
  private readonly seen = new Map<string, number>();
  private readonly ownerDelta = new Map<number, number>();

  constructor(private readonly live: Store) {}

  get(path: string): XsNode | undefined {
    const mine = this.overlay.get(path);
    if (mine !== undefined) return mine ?? undefined;
    const n = this.live.get(path);
    this.seen.set(path, n ? n.gen : ABSENT_GEN);
    this.overlay.set(path, n ?? null);
    return n;
  }

  peek(path: string): XsNode | undefined {
    const mine = this.overlay.get(path);
    return mine !== undefined ? mine ?? undefined : this.live.get(path);
  }

  put(path: string, node: XsNode): void {
    const old = this.get(path);
    if (old) this.delta(old, -1);
    this.delta(node, 1);
    this.overlay.set(path, node);
  }

  remove(path: string): void {
    const old = this.get(path);
    if (old) this.delta(old, -1);
    this.overlay.set(path, null);
  }

  ownedBy(domid: number): number {
    return this.live.ownedBy(domid) + (this.ownerDelta.get(domid) ?? 0);
  }

  get accessedCount(): number {
    return this.overlay.size;
  }

  /** True if nothing this transaction looked at changed since. */
  isCurrent(): boolean {
    for (const [path, gen] of this.seen) {
      if ((this.live.get(path)?.gen ?? ABSENT_GEN) !== gen) return false;
    }
    return true;
  }

  /** Applies the transaction's changes to the live store. */
  apply(): void {
    for (const [path, n] of this.overlay) {
      const cur = this.live.get(path);
      if (n === null) {
        if (cur) this.live.remove(path);
      } else if (n !== cur) {
        this.live.put(path, n);
      }
    }
  }

  private delta(n: XsNode, d: number): void {
    const owner = n.perms[0]?.domid;
    if (owner === undefined) return;
    this.ownerDelta.set(owner, (this.ownerDelta.get(owner) ?? 0) + d);
  }
}
