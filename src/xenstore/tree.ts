// Tree operations with xenstored's permission and error rules (Xen 4.17
// xenstored_core.c: get_node_chk_perm(), errno_from_parents(),
// construct_node(), do_rm()). They work on a NodeView, so the same code runs
// on the live store and inside a transaction.
import { fail } from './errors.js';
import { baseName, childPath, parentOf } from './paths.js';
import {
  PERM_OWNER,
  PERM_READ,
  PERM_WRITE,
  permBitsFor,
  type AccessSubject,
  type XsPermission,
} from './permissions.js';
import { NODE_RECORD_HEADER_SIZE, NODE_RECORD_PERM_SIZE, type XenstoreQuotas } from './quota.js';
import { nextGeneration, type NodeView, type XsNode } from './store.js';
import { EACCES, EINVAL, ENOENT, EPERM, type XenstoreErrorName } from './wire.js';

export type QuotaKind = 'nodes' | 'entry' | 'watches' | 'transactions' | 'perms';

export interface TreeContext {
  view: NodeView;
  subject: AccessSubject;
  quotas: XenstoreQuotas;
  quotaError(kind: QuotaKind): XenstoreErrorName;
}

/** A change to report to watchers; `visibleTo` applies xenstored's watch_permitted(). */
export interface ChangeEvent {
  path: string;
  /** 'subtree': watches at or above path fire; 'exact': only a watch on path. */
  match: 'subtree' | 'exact';
  visibleTo(s: AccessSubject): boolean;
}

const EMPTY = new Uint8Array(0);

function eventFor(view: NodeView, path: string, node: XsNode, match: ChangeEvent['match']): ChangeEvent {
  // Read access to the node or its parent lets a watcher see the event. Who may see an event is
  // not something a transaction read: peek, so a write to the parent elsewhere cannot fail its
  // commit with EAGAIN (xenstored checks watch permissions outside the transaction).
  const parent = path.startsWith('@') ? undefined : view.peek(parentOf(path));
  const nodePerms = node.perms;
  const parentPerms = parent?.perms;
  return {
    path,
    match,
    visibleTo: (s) =>
      (permBitsFor(s, nodePerms) & PERM_READ) !== 0 ||
      (parentPerms !== undefined && (permBitsFor(s, parentPerms) & PERM_READ) !== 0),
  };
}

export function entrySize(n: Pick<XsNode, 'value' | 'children' | 'perms'>): number {
  let children = 0;
  for (const c of n.children) children += Buffer.byteLength(c) + 1;
  return NODE_RECORD_HEADER_SIZE + NODE_RECORD_PERM_SIZE * n.perms.length + n.value.length + children;
}

/**
 * The node at `path` if the subject has `need`; otherwise the error
 * xenstored gives: ENOENT only if the nearest existing ancestor would have
 * granted `need`, else EACCES, so absence leaks nothing.
 */
export function lookup(ctx: TreeContext, path: string, need: number): XsNode {
  const n = ctx.view.get(path);
  if (n && (permBitsFor(ctx.subject, n.perms) & need) === need) return n;
  if (n) fail(EACCES);
  let p = path;
  let anc: XsNode | undefined;
  do {
    p = parentOf(p);
    anc = ctx.view.get(p);
  } while (!anc && p !== '/');
  if (anc && (permBitsFor(ctx.subject, anc.perms) & need) !== 0) fail(ENOENT);
  fail(EACCES);
}

function tryLookup(ctx: TreeContext, path: string, need: number): XsNode | undefined {
  try {
    return lookup(ctx, path, need);
  } catch (e) {
    if (e instanceof Error && e.message === ENOENT) return undefined;
    throw e;
  }
}

function putChecked(ctx: TreeContext, path: string, node: XsNode): void {
  if (!ctx.subject.privileged && entrySize(node) >= ctx.quotas.maxEntrySize) fail(ctx.quotaError('entry'));
  ctx.view.put(path, node);
}

export function read(ctx: TreeContext, path: string): Uint8Array {
  return lookup(ctx, path, PERM_READ).value;
}

export function directory(ctx: TreeContext, path: string): readonly string[] {
  return lookup(ctx, path, PERM_READ).children;
}

export function getPerms(ctx: TreeContext, path: string): readonly XsPermission[] {
  return lookup(ctx, path, PERM_READ).perms;
}

/** Creates `path` and any missing ancestors; new nodes inherit the parent's permissions. */
function create(ctx: TreeContext, path: string, value: Uint8Array): XsNode {
  const missing: string[] = [path];
  let top = parentOf(path);
  let parent = ctx.view.get(top);
  while (!parent) {
    missing.push(top);
    top = parentOf(top);
    parent = ctx.view.get(top);
  }
  let parentPath = top;
  let created: XsNode | undefined;
  for (let i = missing.length - 1; i >= 0; i--) {
    const p = missing[i]!;
    if (!ctx.subject.privileged && ctx.view.ownedBy(ctx.subject.domid) >= ctx.quotas.nodesPerDomain) {
      fail(ctx.quotaError('nodes'));
    }
    const perms: XsPermission[] = parent!.perms.map((x) => ({ ...x }));
    // cxenstored: unprivileged domains own what they create.
    if (!ctx.subject.privileged && perms[0]) perms[0] = { perm: perms[0].perm, domid: ctx.subject.domid };
    const updatedParent: XsNode = { ...parent!, children: [...parent!.children, baseName(p)], gen: nextGeneration() };
    putChecked(ctx, parentPath, updatedParent);
    created = { value: i === 0 ? value : EMPTY, children: [], perms, gen: nextGeneration() };
    putChecked(ctx, p, created);
    parent = created;
    parentPath = p;
  }
  return created!;
}

export function write(ctx: TreeContext, path: string, value: Uint8Array): ChangeEvent[] {
  const n = tryLookup(ctx, path, PERM_WRITE);
  let node: XsNode;
  if (n) {
    node = { ...n, value, gen: nextGeneration() };
    putChecked(ctx, path, node);
  } else {
    node = create(ctx, path, value);
  }
  return [eventFor(ctx.view, path, node, 'subtree')];
}

export function mkdir(ctx: TreeContext, path: string): ChangeEvent[] {
  if (tryLookup(ctx, path, PERM_WRITE)) return [];
  const node = create(ctx, path, EMPTY);
  return [eventFor(ctx.view, path, node, 'subtree')];
}

/** Removes a subtree; events come children first, as xenstored's post-order walk sends them. */
export function removeSubtree(view: NodeView, path: string): ChangeEvent[] {
  const events: ChangeEvent[] = [];
  const walk = (p: string, isRoot: boolean): void => {
    const n = view.get(p);
    if (!n) return;
    for (const c of n.children) walk(childPath(p, c), false);
    events.push(eventFor(view, p, n, isRoot ? 'subtree' : 'exact'));
    view.remove(p);
  };
  walk(path, true);
  const pp = parentOf(path);
  const parent = view.get(pp);
  if (parent) {
    const name = baseName(path);
    view.put(pp, { ...parent, children: parent.children.filter((c) => c !== name), gen: nextGeneration() });
  }
  return events;
}

export function rm(ctx: TreeContext, path: string): ChangeEvent[] {
  const n = tryLookup(ctx, path, PERM_WRITE);
  if (!n) {
    // Removing what is not there is fine if the parent exists.
    if (ctx.view.get(parentOf(path))) return [];
    fail(ENOENT);
  }
  if (path === '/') fail(EINVAL);
  return removeSubtree(ctx.view, path);
}

export function setPerms(ctx: TreeContext, path: string, perms: XsPermission[]): ChangeEvent[] {
  const n = lookup(ctx, path, PERM_WRITE | PERM_OWNER);
  if (!ctx.subject.privileged && perms[0]!.domid !== n.perms[0]!.domid) fail(EPERM);
  const node: XsNode = { ...n, perms, gen: nextGeneration() };
  putChecked(ctx, path, node);
  const before = eventFor(ctx.view, path, n, 'subtree');
  const after = eventFor(ctx.view, path, node, 'subtree');
  // Watchers who could see the node before or after the change hear of it.
  return [{ path, match: 'subtree', visibleTo: (s) => before.visibleTo(s) || after.visibleTo(s) }];
}

/** Event for a special path such as @releaseDomain, visible per its pseudo-node. */
export function specialEvent(view: NodeView, path: string): ChangeEvent | undefined {
  const n = view.get(path);
  if (!n) return undefined;
  return { path, match: 'exact', visibleTo: (s) => (permBitsFor(s, n.perms) & PERM_READ) !== 0 };
}
