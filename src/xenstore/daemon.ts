// The xenstore daemon: the store, connections, watches, transactions and
// domains, answering xs_wire.h requests with xenstored's semantics
// (docs/misc/xenstore.txt; Xen 4.17 tools/xenstore/xenstored_*.c for the
// error cases).
// One idea read whole: every request type acts on the same connections, watches,
// transactions and domains, so they stay in one file (a little over 500 lines).
import {
  countNuls,
  decodeText,
  encodeMessage,
  encodeText,
  joinStrings,
  leadingStrings,
  type XsMessage,
} from './codec.js';
import { XsReplyError, fail } from './errors.js';
import { canonicalize, domainPath } from './paths.js';
import { formatPermission, parsePermission, type AccessSubject, type XsPermission } from './permissions.js';
import { DEFAULT_QUOTAS, type QuotaErrorStyle, type XenstoreQuotas } from './quota.js';
import { Store, TransactionView, nextGeneration, type NodeView } from './store.js';
import * as tree from './tree.js';
import type { ChangeEvent, QuotaKind, TreeContext } from './tree.js';
import {
  DOMID_SELF,
  E2BIG,
  EACCES,
  EAGAIN,
  EBUSY,
  EEXIST,
  EINVAL,
  EIO,
  ENOENT,
  ENOSPC,
  ENOSYS,
  EQUOTA,
  XENSTORE_PAYLOAD_MAX,
  XS_CONTROL,
  XS_DIRECTORY,
  XS_DIRECTORY_PART,
  XS_ERROR,
  XS_GET_DOMAIN_PATH,
  XS_GET_PERMS,
  XS_INTRODUCE,
  XS_IS_DOMAIN_INTRODUCED,
  XS_MKDIR,
  XS_READ,
  XS_RELEASE,
  XS_RESET_WATCHES,
  XS_RESUME,
  XS_RM,
  XS_SET_PERMS,
  XS_SET_TARGET,
  XS_TRANSACTION_END,
  XS_TRANSACTION_START,
  XS_UNWATCH,
  XS_WATCH,
  XS_WATCH_EVENT,
  XS_WRITE,
  type XenstoreErrorName,
} from './wire.js';

export interface XenstoreDaemonOptions {
  quotas?: Partial<XenstoreQuotas>;
  quotaErrorStyle?: QuotaErrorStyle;
  /** xenstored -K: on release, give a domain's nodes to dom0 instead of deleting them. */
  keepOrphans?: boolean;
  /**
   * XS_INTRODUCE from a toolstack connection: whoever knows the hypervisor maps the guest's
   * xenstore page (`gfn`), binds `port` and attaches a XenstorePageServer, which introduces the
   * domain. Without it, or when it returns false, the domain is introduced without a page.
   * Injected so the daemon stays apart from the hypervisor and from its own transports.
   */
  introduce?: (domid: number, gfn: string, port: number) => boolean;
  /** Where the daemon reports internal errors (never the protocol replies). */
  log?: (line: string) => void;
}

/** Where a connection's outgoing bytes go; the transports implement it. */
export interface ConnectionSink {
  send(bytes: Uint8Array): void;
  /** The daemon gives up on the connection (xenstored ignore_connection()). */
  drop(reason: string): void;
}

interface Watch {
  path: string;
  token: string;
  /** Chars to strip from event paths of a watch set with a relative path. */
  prefixLen: number;
}

interface Transaction {
  id: number;
  view: TransactionView;
  events: ChangeEvent[];
}

const SPECIAL_NODES = ['@introduceDomain', '@releaseDomain'];
const OK = joinStrings(['OK']);

// Request types only the privileged domain may send (xenstored wire_funcs XS_FLAG_PRIV).
const PRIVILEGED_ONLY = new Set([XS_CONTROL, XS_INTRODUCE, XS_RELEASE, XS_IS_DOMAIN_INTRODUCED, XS_RESUME, XS_SET_TARGET]);
// Requests that ignore the header's tx_id (XS_FLAG_NOTID).
const IGNORES_TX = new Set([XS_WATCH, XS_UNWATCH]);
const HANDLED = new Set([
  XS_CONTROL, XS_DIRECTORY, XS_READ, XS_GET_PERMS, XS_WATCH, XS_UNWATCH, XS_TRANSACTION_START,
  XS_TRANSACTION_END, XS_INTRODUCE, XS_RELEASE, XS_GET_DOMAIN_PATH, XS_WRITE, XS_MKDIR, XS_RM,
  XS_SET_PERMS, XS_IS_DOMAIN_INTRODUCED, XS_RESUME, XS_SET_TARGET, XS_RESET_WATCHES, XS_DIRECTORY_PART,
]);

export class ServerConnection {
  readonly watches: Watch[] = [];
  readonly transactions = new Map<number, Transaction>();
  private nextTxId = 1;
  closed = false;

  constructor(
    private readonly daemon: XenstoreDaemon,
    readonly domid: number,
    private readonly sink: ConnectionSink,
  ) {}

  get subject(): AccessSubject {
    return { domid: this.domid, privileged: this.domid === 0, target: this.daemon.targetOf(this.domid) };
  }

  allocTxId(): number {
    while (this.nextTxId === 0 || this.transactions.has(this.nextTxId)) this.nextTxId = (this.nextTxId + 1) >>> 0;
    return this.nextTxId++;
  }

  send(m: XsMessage): void {
    if (!this.closed) this.sink.send(encodeMessage(m));
  }

  /** Handles one complete request. */
  receive(m: XsMessage): void {
    if (this.closed) return;
    this.daemon.dispatch(this, m);
  }

  /** Forget watches and transactions (XS_RESET_WATCHES, connection loss). */
  reset(): void {
    this.watches.length = 0;
    this.transactions.clear();
  }

  /** Protocol violation: stop serving this connection. */
  drop(reason: string): void {
    if (this.closed) return;
    this.daemon.disconnect(this);
    this.sink.drop(reason);
  }
}

interface DomainState {
  introduced: boolean;
  target?: number;
  detach?: () => void;
}

export class XenstoreDaemon {
  readonly store = new Store();
  readonly quotas: XenstoreQuotas;
  private readonly quotaStyle: QuotaErrorStyle;
  private readonly connections = new Set<ServerConnection>();
  private readonly domains = new Map<number, DomainState>();
  private readonly closers = new Set<() => Promise<void> | void>();

  constructor(readonly options: XenstoreDaemonOptions = {}) {
    this.quotas = { ...DEFAULT_QUOTAS, ...options.quotas };
    this.quotaStyle = options.quotaErrorStyle ?? 'cxenstored';
    // Initial tree as cxenstored's setup_structure(): "/" and /tool/xenstored owned by dom0.
    const dom0: XsPermission[] = [{ domid: 0, perm: 'n' }];
    const empty = new Uint8Array(0);
    this.store.put('/', { value: empty, children: ['tool'], perms: dom0, gen: nextGeneration() });
    this.store.put('/tool', { value: empty, children: ['xenstored'], perms: dom0, gen: nextGeneration() });
    this.store.put('/tool/xenstored', { value: empty, children: [], perms: dom0, gen: nextGeneration() });
    // Special watch paths are pseudo-nodes that carry permissions only.
    for (const p of SPECIAL_NODES) this.store.put(p, { value: empty, children: [], perms: dom0, gen: nextGeneration() });
    this.domains.set(0, { introduced: true });
  }

  /** A new connection for `domid` whose replies go to `sink`. */
  connect(domid: number, sink: ConnectionSink): ServerConnection {
    const c = new ServerConnection(this, domid, sink);
    this.connections.add(c);
    return c;
  }

  disconnect(c: ServerConnection): void {
    c.reset();
    c.closed = true;
    this.connections.delete(c);
  }

  /** Registers cleanup run by close() (transports use it). */
  onClose(fn: () => Promise<void> | void): () => void {
    this.closers.add(fn);
    return () => this.closers.delete(fn);
  }

  async close(): Promise<void> {
    const fns = [...this.closers];
    this.closers.clear();
    await Promise.all(fns.map((f) => f()));
    for (const c of [...this.connections]) this.disconnect(c);
  }

  targetOf(domid: number): number | undefined {
    return this.domains.get(domid)?.target;
  }

  isDomainIntroduced(domid: number): boolean {
    return this.domains.get(domid)?.introduced === true;
  }

  /**
   * Marks a domain introduced and fires @introduceDomain (not for dom0, as
   * xenstored). `detach` is called when the domain is released.
   */
  introduceDomain(domid: number, detach?: () => void): void {
    const d = this.domains.get(domid) ?? { introduced: false };
    this.domains.set(domid, d);
    if (detach) {
      d.detach?.();
      d.detach = detach;
    }
    if (d.introduced) return;
    d.introduced = true;
    if (domid !== 0) this.fireSpecial('@introduceDomain');
  }

  /**
   * A destroyed domain: its connections lose watches and transactions, its
   * nodes are removed (or handed to dom0 with keepOrphans), and
   * @releaseDomain fires. False if the domain was not introduced.
   */
  releaseDomain(domid: number): boolean {
    const d = this.domains.get(domid);
    if (!d?.introduced || domid === 0) return false;
    for (const c of [...this.connections]) if (c.domid === domid) this.disconnect(c);
    d.detach?.();
    this.domains.delete(domid);
    for (const [, other] of this.domains) if (other.target === domid) delete other.target;
    this.removeDomainNodes(domid);
    this.fireSpecial('@releaseDomain');
    return true;
  }

  private removeDomainNodes(domid: number): void {
    const events: ChangeEvent[] = [];
    const walk = (path: string): void => {
      const n = this.store.get(path);
      if (!n) return;
      if (n.perms[0]?.domid === domid && path !== '/') {
        if (!this.options.keepOrphans) {
          events.push(...tree.removeSubtree(this.store, path));
          return;
        }
      }
      let perms = n.perms.filter((p, i) => i === 0 || p.domid !== domid);
      if (perms[0]!.domid === domid) perms = [{ domid: 0, perm: perms[0]!.perm }, ...perms.slice(1)];
      if (perms.length !== n.perms.length || perms[0] !== n.perms[0]) {
        this.store.put(path, { ...n, perms, gen: nextGeneration() });
      }
      for (const c of n.children) walk(path === '/' ? `/${c}` : `${path}/${c}`);
    };
    walk('/');
    this.fire(events);
  }

  private fireSpecial(path: string): void {
    const e = tree.specialEvent(this.store, path);
    if (e) this.fire([e]);
  }

  /** Sends watch events for committed changes (xenstored fire_watches()). */
  fire(events: readonly ChangeEvent[]): void {
    for (const e of events) {
      for (const c of this.connections) {
        if (c.closed || c.watches.length === 0 || !e.visibleTo(c.subject)) continue;
        for (const w of c.watches) {
          const hit = e.match === 'exact' ? w.path === e.path : isWatched(e.path, w.path);
          if (!hit) continue;
          const payload = joinStrings([e.path.slice(w.prefixLen), w.token]);
          // A long token on a deep path cannot be sent in one message: that watcher misses this
          // event (its own doing); nobody else does, and the change itself stands.
          if (payload.length > XENSTORE_PAYLOAD_MAX) continue;
          c.send({ type: XS_WATCH_EVENT, reqId: 0, txId: 0, payload });
        }
      }
    }
  }

  private quotaError(kind: QuotaKind): XenstoreErrorName {
    if (this.quotaStyle === 'oxenstored') return kind === 'entry' ? E2BIG : EQUOTA;
    return kind === 'watches' ? E2BIG : ENOSPC;
  }

  /** Watches held by a domain's connections. */
  watchCount(domid: number): number {
    let n = 0;
    for (const c of this.connections) if (c.domid === domid) n += c.watches.length;
    return n;
  }

  private domainTransactions(domid: number): number {
    let n = 0;
    for (const c of this.connections) if (c.domid === domid) n += c.transactions.size;
    return n;
  }

  /** Answers one request; errors become XS_ERROR and never escape. */
  dispatch(c: ServerConnection, m: XsMessage): void {
    let reply: Uint8Array;
    let after: (() => void) | undefined;
    try {
      const r = this.handle(c, m);
      reply = r.reply;
      after = r.after;
      if (reply.length > XENSTORE_PAYLOAD_MAX) fail(E2BIG);
    } catch (e) {
      let code: string = EIO;
      if (e instanceof XsReplyError) code = e.code;
      else this.options.log?.(`xenstored: internal error: ${e instanceof Error ? e.stack : String(e)}`);
      c.send({ type: XS_ERROR, reqId: m.reqId, txId: m.txId, payload: joinStrings([code]) });
      return;
    }
    c.send({ type: m.type, reqId: m.reqId, txId: m.txId, payload: reply });
    after?.();
  }

  private handle(c: ServerConnection, m: XsMessage): { reply: Uint8Array; after?: () => void } {
    if (!HANDLED.has(m.type)) fail(ENOSYS);
    const subject = c.subject;
    if (PRIVILEGED_ONLY.has(m.type) && !subject.privileged) fail(EACCES);
    let tx: Transaction | undefined;
    if (!IGNORES_TX.has(m.type) && m.txId !== 0) {
      tx = c.transactions.get(m.txId);
      if (!tx) fail(ENOENT);
    }
    const view: NodeView = tx ? tx.view : this.store;
    const ctx: TreeContext = { view, subject, quotas: this.quotas, quotaError: (k) => this.quotaError(k) };
    const path = (p: string | undefined, allowSpecial = false): string => {
      if (p === undefined) fail(EINVAL);
      return canonicalize(p, c.domid, { allowSpecial, pathMax: this.quotas.pathMax }) ?? fail(EINVAL);
    };
    const changed = (events: ChangeEvent[]): { reply: Uint8Array } => {
      if (tx) {
        tx.events.push(...events);
        if (!subject.privileged && tx.view.accessedCount > 1024) fail(ENOSPC);
      } else this.fire(events);
      return { reply: OK };
    };
    const p = m.payload;

    switch (m.type) {
      case XS_READ:
        return { reply: tree.read(ctx, path(oneArg(p))) };
      case XS_DIRECTORY:
        return { reply: joinStrings(tree.directory(ctx, path(oneArg(p)))) };
      case XS_DIRECTORY_PART: {
        if (countNuls(p) !== 2) fail(EINVAL);
        const [name, offStr] = leadingStrings(p, 2);
        const node = tree.lookup(ctx, path(name), 1);
        return { reply: directoryPart(node.children, node.gen, Number.parseInt(offStr!, 10) || 0) };
      }
      case XS_GET_PERMS:
        return { reply: joinStrings(tree.getPerms(ctx, path(oneArg(p), true)).map(formatPermission)) };
      case XS_WRITE: {
        const nul = p.indexOf(0);
        if (nul < 0) fail(EINVAL);
        const name = path(decodeText(p.subarray(0, nul)));
        return changed(tree.write(ctx, name, p.slice(nul + 1)));
      }
      case XS_MKDIR:
        return changed(tree.mkdir(ctx, path(oneArg(p))));
      case XS_RM:
        return changed(tree.rm(ctx, path(oneArg(p))));
      case XS_SET_PERMS: {
        const n = countNuls(p);
        if (n < 2) fail(EINVAL);
        if (!subject.privileged && n - 1 > this.quotas.permsPerNode) fail(this.quotaError('perms'));
        const [name, ...permStrs] = leadingStrings(p);
        const perms = permStrs.map((s) => parsePermission(s) ?? fail(EINVAL));
        return changed(tree.setPerms(ctx, path(name, true), perms));
      }
      case XS_WATCH: {
        const args = leadingStrings(p, 3);
        if (args.length !== 2) fail(EINVAL);
        const [raw, token] = args as [string, string];
        const abs = path(raw, true);
        if (c.watches.some((w) => w.path === abs && w.token === token)) fail(EEXIST);
        if (!subject.privileged && this.watchCount(c.domid) >= this.quotas.watchesPerDomain) {
          fail(this.quotaError('watches'));
        }
        const relative = !raw.startsWith('/') && !raw.startsWith('@');
        const w: Watch = { path: abs, token, prefixLen: relative ? domainPath(c.domid).length + 1 : 0 };
        c.watches.push(w);
        // xenstored fires once on registration, after the reply.
        const first = joinStrings([abs.slice(w.prefixLen), token]);
        return { reply: OK, after: () => c.send({ type: XS_WATCH_EVENT, reqId: 0, txId: 0, payload: first }) };
      }
      case XS_UNWATCH: {
        const args = leadingStrings(p, 2);
        if (args.length !== 2) fail(EINVAL);
        const abs = path(args[0], true);
        const i = c.watches.findIndex((w) => w.path === abs && w.token === args[1]);
        if (i < 0) fail(ENOENT);
        c.watches.splice(i, 1);
        return { reply: OK };
      }
      case XS_TRANSACTION_START: {
        if (tx) fail(EBUSY);
        if (!subject.privileged && this.domainTransactions(c.domid) >= this.quotas.transactionsPerDomain) {
          fail(this.quotaError('transactions'));
        }
        const id = c.allocTxId();
        c.transactions.set(id, { id, view: new TransactionView(this.store), events: [] });
        return { reply: joinStrings([String(id)]) };
      }
      case XS_TRANSACTION_END: {
        if (!tx) fail(ENOENT);
        const arg = oneArg(p);
        if (arg !== 'T' && arg !== 'F') fail(EINVAL);
        c.transactions.delete(tx.id);
        if (arg === 'T') {
          if (!tx.view.isCurrent()) fail(EAGAIN);
          tx.view.apply();
          this.fire(tx.events);
        }
        return { reply: OK };
      }
      case XS_GET_DOMAIN_PATH:
        return { reply: joinStrings([domainPath(parseDomid(oneArg(p)))]) };
      case XS_IS_DOMAIN_INTRODUCED: {
        const d = parseDomid(oneArg(p));
        return { reply: joinStrings([d === DOMID_SELF || this.isDomainIntroduced(d) ? 'T' : 'F']) };
      }
      case XS_INTRODUCE: {
        const args = leadingStrings(p, 3);
        if (args.length < 3) fail(EINVAL);
        const domid = parseDomid(args[0]);
        const port = Number.parseInt(args[2]!, 10);
        if (!(port > 0)) fail(EINVAL);
        if (!this.isDomainIntroduced(domid)) {
          if (this.options.introduce?.(domid, args[1]!, port) !== true) this.introduceDomain(domid);
        }
        return { reply: OK };
      }
      case XS_RELEASE: {
        const domid = parseDomid(oneArg(p));
        if (domid === 0 || domid === DOMID_SELF) fail(EINVAL);
        if (!this.isDomainIntroduced(domid)) fail(ENOENT);
        // Reply first: the releasing connection may belong to the domain.
        return { reply: OK, after: () => this.releaseDomain(domid) };
      }
      case XS_RESUME: {
        const domid = parseDomid(oneArg(p));
        if (domid === 0 || domid === DOMID_SELF) fail(EINVAL);
        if (!this.isDomainIntroduced(domid)) fail(ENOENT);
        return { reply: OK };
      }
      case XS_SET_TARGET: {
        const args = leadingStrings(p, 2);
        if (args.length < 2) fail(EINVAL);
        const domid = parseDomid(args[0]);
        const target = parseDomid(args[1]);
        if (!this.isDomainIntroduced(domid) || !this.isDomainIntroduced(target)) fail(ENOENT);
        this.domains.get(domid)!.target = target;
        return { reply: OK };
      }
      case XS_RESET_WATCHES:
        c.reset();
        return { reply: OK };
      case XS_CONTROL: {
        // Only the "print" command of xenstore-control is meaningful here.
        const args = leadingStrings(p);
        if (args[0] === 'print') {
          this.options.log?.(args.slice(1).join(' '));
          return { reply: OK };
        }
        fail(EINVAL);
      }
    }
    fail(ENOSYS);
  }
}

/** Set by the page transport so XS_INTRODUCE can attach a page without an import cycle. */
function isWatched(path: string, watchPath: string): boolean {
  if (watchPath === '/') return path.startsWith('/');
  return path === watchPath || path.startsWith(watchPath + '/');
}

/** The payload must be one string with its NUL at the very end (xenstored onearg()). */
function oneArg(p: Uint8Array): string {
  if (p.length === 0 || p.indexOf(0) !== p.length - 1) fail(EINVAL);
  return decodeText(p.subarray(0, p.length - 1));
}

function parseDomid(s: string | undefined): number {
  if (s === undefined || !/^\d{1,5}$/.test(s)) fail(EINVAL);
  const d = Number(s);
  if (d > 0xffff) fail(EINVAL);
  return d;
}

/**
 * XS_DIRECTORY_PART reply: generation, then as many children as fit from
 * byte offset `off` of the child list; an extra empty string marks the end
 * (xenstored send_directory_part()).
 */
function directoryPart(children: readonly string[], gen: number, off: number): Uint8Array {
  const all = joinStrings(children);
  const genBytes = encodeText(`${gen}\0`);
  const maxLen = XENSTORE_PAYLOAD_MAX - genBytes.length - 1;
  if (off >= all.length) return joinStrings([`${gen}`, '']);
  let len = 0;
  let complete = false;
  while (true) {
    const nul = all.indexOf(0, off + len);
    const childLen = nul - (off + len);
    if (len + childLen >= maxLen) break;
    len += childLen + 1;
    if (off + len === all.length) {
      complete = true;
      break;
    }
  }
  const out = new Uint8Array(genBytes.length + len + (complete ? 1 : 0));
  out.set(genBytes, 0);
  out.set(all.subarray(off, off + len), genBytes.length);
  return out;
}
