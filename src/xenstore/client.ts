// A xenstore client over any transport: requests carry increasing req_ids
// and may overlap; replies are matched by req_id, XS_WATCH_EVENTs are
// delivered to the watch's callback (xs_wire.h, docs/misc/xenstore.txt).
import {
  MessageParser,
  decodeText,
  encodeMessage,
  encodeText,
  joinStrings,
  splitStrings,
  type XsMessage,
} from './codec.js';
import { XenstoreError } from './errors.js';
import { isAtOrBelow } from './paths.js';
import { formatPermission, parsePermission, type XsPermission } from './permissions.js';
import { XenstoreSocketClient } from './socket-transport.js';
import type { XenstoreTransport } from './transport.js';
import {
  EAGAIN,
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
  XS_RM,
  XS_SET_PERMS,
  XS_TRANSACTION_END,
  XS_TRANSACTION_START,
  XS_UNWATCH,
  XS_WATCH,
  XS_WATCH_EVENT,
  XS_WRITE,
} from './wire.js';

export type WatchCallback = (path: string, token: string) => void;

interface Pending {
  type: number;
  resolve: (payload: Uint8Array) => void;
  reject: (e: Error) => void;
}

export class XenstoreClient {
  private readonly parser = new MessageParser();
  private readonly pending = new Map<number, Pending>();
  private readonly watches = new Map<string, Map<string, WatchCallback>>();
  private nextReqId = 1;
  private closedWith: Error | undefined;

  constructor(private readonly transport: XenstoreTransport) {
    transport.onData((chunk) => this.receive(chunk));
    transport.onClose((e) => this.shutdown(e));
  }

  static async connectSocket(path: string): Promise<XenstoreClient> {
    return new XenstoreClient(await XenstoreSocketClient.connect(path));
  }

  private receive(chunk: Uint8Array): void {
    this.parser.push(chunk);
    for (let r = this.parser.next(); r; r = this.parser.next()) {
      if (r.kind === 'oversized') {
        this.transport.close();
        this.shutdown(new XenstoreError('EIO', 'daemon sent an oversized message'));
        return;
      }
      this.dispatch(r.message);
    }
  }

  private dispatch(m: XsMessage): void {
    if (m.type === XS_WATCH_EVENT) {
      const [path, token] = splitStrings(m.payload);
      if (path === undefined || token === undefined) return;
      const byPath = this.watches.get(token);
      if (!byPath) return;
      // Several watches may share a token; call those whose path covers the event.
      let called = false;
      for (const [wpath, cb] of byPath) {
        if (wpath === path || (!wpath.startsWith('@') && isAtOrBelow(path, wpath))) {
          called = true;
          cb(path, token);
        }
      }
      if (!called) for (const cb of byPath.values()) cb(path, token);
      return;
    }
    const p = this.pending.get(m.reqId);
    if (!p) return;
    this.pending.delete(m.reqId);
    if (m.type === XS_ERROR) p.reject(new XenstoreError(splitStrings(m.payload)[0] ?? 'EINVAL'));
    else if (m.type !== p.type) p.reject(new XenstoreError('EIO', `reply type ${m.type} for request type ${p.type}`));
    else p.resolve(m.payload);
  }

  private shutdown(e: Error): void {
    if (this.closedWith) return;
    this.closedWith = e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }

  /** Sends a raw request; resolves with the reply payload. */
  request(type: number, payload: Uint8Array, tx = 0): Promise<Uint8Array> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    const reqId = this.nextReqId;
    this.nextReqId = (this.nextReqId + 1) >>> 0 || 1;
    return new Promise((resolve, reject) => {
      this.pending.set(reqId, { type, resolve, reject });
      try {
        this.transport.send(encodeMessage({ type, reqId, txId: tx, payload }));
      } catch (e) {
        this.pending.delete(reqId);
        reject(e instanceof Error ? e : new Error(String(e)));
      }
    });
  }

  async readBytes(path: string, tx = 0): Promise<Uint8Array> {
    return this.request(XS_READ, joinStrings([path]), tx);
  }

  async read(path: string, tx = 0): Promise<string> {
    return decodeText(await this.readBytes(path, tx));
  }

  async write(path: string, value: string | Uint8Array, tx = 0): Promise<void> {
    const v = typeof value === 'string' ? encodeText(value) : value;
    const p = joinStrings([path]);
    const payload = new Uint8Array(p.length + v.length);
    payload.set(p, 0);
    payload.set(v, p.length);
    await this.request(XS_WRITE, payload, tx);
  }

  async directory(path: string, tx = 0): Promise<string[]> {
    return splitStrings(await this.request(XS_DIRECTORY, joinStrings([path]), tx));
  }

  /** One chunk of a long listing: children from byte `offset`; `done` when the list ended. */
  async directoryPart(path: string, offset: number, tx = 0): Promise<{ generation: string; children: string[]; done: boolean }> {
    const r = await this.request(XS_DIRECTORY_PART, joinStrings([path, String(offset)]), tx);
    const strings = splitStrings(r);
    const generation = strings.shift() ?? '';
    const done = r.length >= 2 && r[r.length - 1] === 0 && r[r.length - 2] === 0;
    if (done) strings.pop();
    return { generation, children: strings, done };
  }

  async mkdir(path: string, tx = 0): Promise<void> {
    await this.request(XS_MKDIR, joinStrings([path]), tx);
  }

  async rm(path: string, tx = 0): Promise<void> {
    await this.request(XS_RM, joinStrings([path]), tx);
  }

  async exists(path: string, tx = 0): Promise<boolean> {
    try {
      await this.readBytes(path, tx);
      return true;
    } catch (e) {
      if (e instanceof XenstoreError && e.code === 'ENOENT') return false;
      throw e;
    }
  }

  async getPerms(path: string, tx = 0): Promise<XsPermission[]> {
    const strs = splitStrings(await this.request(XS_GET_PERMS, joinStrings([path]), tx));
    return strs.map((s) => {
      const p = parsePermission(s);
      if (!p) throw new XenstoreError('EIO', `bad permission ${JSON.stringify(s)}`);
      return p;
    });
  }

  async setPerms(path: string, perms: readonly XsPermission[], tx = 0): Promise<void> {
    await this.request(XS_SET_PERMS, joinStrings([path, ...perms.map(formatPermission)]), tx);
  }

  /** Registers a watch; the daemon fires `cb` once right away, then on every change at or below `path`. */
  async watch(path: string, token: string, cb: WatchCallback): Promise<void> {
    let byPath = this.watches.get(token);
    if (!byPath) this.watches.set(token, (byPath = new Map()));
    const had = byPath.get(path);
    byPath.set(path, cb);
    try {
      await this.request(XS_WATCH, joinStrings([path, token]));
    } catch (e) {
      if (had) byPath.set(path, had);
      else byPath.delete(path);
      throw e;
    }
  }

  async unwatch(path: string, token: string): Promise<void> {
    await this.request(XS_UNWATCH, joinStrings([path, token]));
    this.watches.get(token)?.delete(path);
  }

  async resetWatches(): Promise<void> {
    await this.request(XS_RESET_WATCHES, joinStrings(['']));
    this.watches.clear();
  }

  async transactionStart(): Promise<number> {
    const r = splitStrings(await this.request(XS_TRANSACTION_START, joinStrings([''])));
    return Number(r[0]);
  }

  /** Commits (`commit` true) or aborts; a conflicting commit rejects with EAGAIN. */
  async transactionEnd(tx: number, commit: boolean): Promise<void> {
    await this.request(XS_TRANSACTION_END, joinStrings([commit ? 'T' : 'F']), tx);
  }

  /** Runs `fn` in a transaction, retrying the whole of it while the commit gives EAGAIN. */
  async transaction<T>(fn: (tx: number) => Promise<T>, maxAttempts = 100): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      const tx = await this.transactionStart();
      let result: T;
      try {
        result = await fn(tx);
      } catch (e) {
        await this.transactionEnd(tx, false).catch(() => undefined);
        throw e;
      }
      try {
        await this.transactionEnd(tx, true);
        return result;
      } catch (e) {
        if (!(e instanceof XenstoreError && e.code === EAGAIN) || attempt >= maxAttempts) throw e;
      }
    }
  }

  async getDomainPath(domid: number): Promise<string> {
    return splitStrings(await this.request(XS_GET_DOMAIN_PATH, joinStrings([String(domid)])))[0] ?? '';
  }

  async introduce(domid: number, gfn: number | bigint, port: number): Promise<void> {
    await this.request(XS_INTRODUCE, joinStrings([String(domid), String(gfn), String(port)]));
  }

  async release(domid: number): Promise<void> {
    await this.request(XS_RELEASE, joinStrings([String(domid)]));
  }

  async isDomainIntroduced(domid: number): Promise<boolean> {
    return splitStrings(await this.request(XS_IS_DOMAIN_INTRODUCED, joinStrings([String(domid)])))[0] === 'T';
  }

  close(): void {
    this.transport.close();
    this.shutdown(new Error('client closed'));
  }
}
