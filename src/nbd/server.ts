/**
 * An NBD server: fixed newstyle negotiation (NBD_OPT_GO / INFO / EXPORT_NAME / LIST / ABORT /
 * STRUCTURED_REPLY / LIST_META_CONTEXT / SET_META_CONTEXT), then pipelined transmission (READ,
 * WRITE, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS, DISC) against the named exports' devices.
 * `base:allocation` only for exports the server alone writes, reporting what it zeroed itself
 * (zero-extents.ts). No extended headers.
 *
 * TLS (`tls` option, see tls.ts): NBD_OPT_STARTTLS is acknowledged, then the same connection
 * becomes a TLS session and negotiation goes on inside it. In `require` mode every other option
 * before that gets NBD_REP_ERR_TLS_REQD (NBD_OPT_EXPORT_NAME, which cannot fail politely, ends
 * the session), so a client without TLS learns nothing, not even the export names. Bytes sent
 * after NBD_OPT_STARTTLS and before its reply would be plaintext the client could not have
 * meant (the spec has it wait for the reply): they end the session, as does a handshake that
 * fails (wrong key, untrusted certificate) or does not finish within `tlsHandshakeTimeoutMs`.
 *
 * Requests run concurrently and are answered as they complete, each reply written whole. A
 * connection stops reading while it has `maxInFlight` requests or `maxInFlightBytes` of
 * payload in progress, or that many reply bytes unsent, so a client cannot make the server
 * buffer without bound. Device operations are never abandoned: a client that vanishes only
 * loses its replies.
 */
import { createServer, type Server, type Socket } from 'node:net';
import { lstatSync, rmSync } from 'node:fs';
import {
  DEFAULT_HANDSHAKE_TIMEOUT_MS, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_OPTION_LENGTH, DEFAULT_MAX_OPTIONS, DEFAULT_MAX_PAYLOAD,
  OPTIONS_PER_EXPORT, REFUSED_CONNECTIONS,
} from './constants.js';
import { validateDevice, type NbdExport } from './export.js';
import { serverTlsOptions, type NbdServerTlsConfig } from './tls.js';
import { Connection } from './server-connection.js';
import { ZeroExtents } from './zero-extents.js';
import type { ConnectionHost, NbdConnectionInfo, NbdLogLevel, NbdServerStats, ResolvedExport } from './server-types.js';

export type { NbdConnectionInfo, NbdLogLevel, NbdServerStats } from './server-types.js';

export interface NbdServerOptions {
  /** The exports to serve; more can be added with `addExport`. */
  exports?: readonly NbdExport[];
  /**
   * The export a client gets by asking for the empty name: by default the export named '' if
   * there is one, else the first export.
   */
  defaultExport?: string;
  /** Largest option data accepted; a longer option drops the connection (default 64 KiB). */
  maxOptionLength?: number;
  /**
   * Options one connection may send before choosing an export; one more drops it (default 128,
   * and 4 more per export: a client listing every export asks about each, as `nbdinfo --list`
   * does with NBD_OPT_INFO; nbdkit allows 32). Bounds what a client can make the server do
   * without ever using an export.
   */
  maxOptions?: number;
  /**
   * Largest NBD_CMD_READ / NBD_CMD_WRITE length, advertised as the maximum block size
   * (default 32 MiB). A longer write drops the connection, a longer read gets NBD_EINVAL.
   */
  maxPayload?: number;
  /** Requests one connection may have in progress before the server stops reading it (default 64). */
  maxInFlight?: number;
  /** Read and write bytes one connection may have in progress, and unsent reply bytes, before the server stops reading it (default 64 MiB). */
  maxInFlightBytes?: number;
  /**
   * Connections served at once, negotiating or transmitting (default 100, as qemu 9.1; 0: no
   * limit). Past it a new connection gets the greeting and NBD_REP_ERR_POLICY, saying why, to
   * each option until it leaves or its handshake time runs out (at most 16 such at once, the
   * oldest closed for a newer one), so a flood cannot take what served clients hold.
   */
  maxConnections?: number;
  /**
   * Drop a client that has not chosen an export and has sent no whole option for this many ms
   * (default 10 s, as qemu-nbd 9.1's --handshake-limit; 0: never): a stalled or idle peer holds
   * nothing for long, and one that keeps negotiating is bounded by `maxOptions`.
   */
  handshakeTimeoutMs?: number;
  /** How long `close()` waits for in-flight requests and clients before cutting connections (default 10 s). */
  closeTimeoutMs?: number;
  /** Receives the server's diagnostics; by default nothing is logged. */
  log?: (level: NbdLogLevel, message: string) => void;
  /** TLS mode and credentials (default: no TLS; NBD_OPT_STARTTLS gets NBD_REP_ERR_UNSUP). */
  tls?: NbdServerTlsConfig;
  /** Drop a client whose TLS handshake has not finished after this many ms (default 30 s). */
  tlsHandshakeTimeoutMs?: number;
}

/** What a server lets one peer hold: connections at once, and time to choose an export. */
export type NbdServerLimits = Pick<NbdServerOptions, 'maxConnections' | 'handshakeTimeoutMs'>;

/** A TCP address, a Unix socket path, or a listening socket already open (systemd's LISTEN_FDS). */
export type NbdListenOptions = { host?: string; port: number; ipv6Only?: boolean } | { path: string } | { fd: number };
export type NbdAddress = { host: string; port: number; family: string } | { path: string };

/**
 * The URI a client such as qemu-img, nbdinfo or nbdcopy uses for `address` and `exportName`;
 * with `tls`, the `nbds` schemes (which make libnbd insist on TLS), and `query` (e.g.
 * `tls-psk-file=...`) appended.
 */
export function nbdUri(address: NbdAddress, exportName = '', tls: { user?: string; query?: string } | undefined = undefined): string {
  const name = encodeURIComponent(exportName);
  const s = tls !== undefined ? 's' : '';
  const user = tls?.user !== undefined ? `${encodeURIComponent(tls.user)}@` : '';
  const query = tls?.query !== undefined && tls.query !== '' ? tls.query : undefined;
  if ('path' in address) return `nbd${s}+unix://${user}/${name}?socket=${encodeURIComponent(address.path)}${query !== undefined ? `&${query}` : ''}`;
  const host = address.host.includes(':') ? `[${address.host}]` : address.host;
  return `nbd${s}://${user}${host}:${address.port}/${name}${query !== undefined ? `?${query}` : ''}`;
}

interface Listener {
  server: Server;
  path?: string;
}

export class NbdServer implements ConnectionHost {
  private readonly exportMap = new Map<string, ResolvedExport>();
  private defaultName: string | undefined;
  private readonly listeners: Listener[] = [];
  private readonly conns = new Set<Connection>();
  /** Connections past maxConnections, being told so (not in `conns`). */
  private readonly refused = new Set<Connection>();
  private nextId = 1;
  private closing = false;
  private closed: Promise<void> | undefined;
  private idleWaiters: (() => void)[] = [];
  private readonly maxOptionsGiven: boolean;
  readonly options: Required<Omit<NbdServerOptions, 'exports' | 'defaultExport' | 'log' | 'tls'>>;
  /** @internal TLS mode and the options of each connection's TLSSocket. */
  readonly tls: { mode: 'off' } | { mode: 'on' | 'require'; socketOptions: ReturnType<typeof serverTlsOptions> };
  private readonly logFn: ((level: NbdLogLevel, message: string) => void) | undefined;
  private readonly counters: NbdServerStats = {
    connections: { active: 0, total: 0, transmitting: 0 },
    requests: { read: 0, write: 0, flush: 0, trim: 0, writeZeroes: 0, disc: 0, other: 0 },
    errors: 0,
    protocolErrors: 0,
    bytesRead: 0,
    bytesWritten: 0,
    inFlight: 0,
  };

  constructor(options: NbdServerOptions = {}) {
    const maxPayload = options.maxPayload ?? DEFAULT_MAX_PAYLOAD;
    if (!Number.isInteger(maxPayload) || maxPayload < 65536 || maxPayload % 65536 !== 0 || maxPayload > 0x80000000) {
      throw new RangeError(`maxPayload ${maxPayload} must be a multiple of 64 KiB from 64 KiB to 2 GiB`);
    }
    this.maxOptionsGiven = options.maxOptions !== undefined;
    this.options = {
      maxOptionLength: options.maxOptionLength ?? DEFAULT_MAX_OPTION_LENGTH,
      maxOptions: options.maxOptions ?? DEFAULT_MAX_OPTIONS,
      maxPayload,
      maxInFlight: Math.max(1, options.maxInFlight ?? 64),
      maxInFlightBytes: Math.max(1, options.maxInFlightBytes ?? 64 * 1024 * 1024),
      maxConnections: Math.max(0, options.maxConnections ?? DEFAULT_MAX_CONNECTIONS),
      handshakeTimeoutMs: Math.max(0, options.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS),
      closeTimeoutMs: options.closeTimeoutMs ?? 10_000,
      tlsHandshakeTimeoutMs: options.tlsHandshakeTimeoutMs ?? 30_000,
    };
    const t = options.tls;
    this.tls = t === undefined || t.mode === 'off' ? { mode: 'off' } : { mode: t.mode, socketOptions: serverTlsOptions(t.credentials, t.aesFirst) };
    this.logFn = options.log;
    for (const e of options.exports ?? []) this.addExport(e);
    if (options.defaultExport !== undefined) this.defaultName = options.defaultExport;
  }

  /** Adds (or replaces) an export. Connections already using a replaced export keep the old device. */
  addExport(exp: NbdExport): void {
    validateDevice(exp.name, exp.device);
    if (exp.device.blockSize > this.options.maxPayload) throw new RangeError(`export "${exp.name}": block size exceeds maxPayload`);
    const zeroes = exp.ownsWrites === true ? new ZeroExtents() : undefined;
    this.exportMap.set(exp.name, { name: exp.name, description: exp.description ?? '', device: exp.device, zeroes });
    if (!this.maxOptionsGiven) this.options.maxOptions = DEFAULT_MAX_OPTIONS + OPTIONS_PER_EXPORT * this.exportMap.size;
  }

  /** Stops offering an export to new clients; connections using it carry on. */
  removeExport(name: string): boolean {
    return this.exportMap.delete(name);
  }

  /** Export names, in the order they were added. */
  exportNames(): string[] {
    return [...this.exportMap.keys()];
  }

  /**
   * Binds a TCP port (port 0: any free one; host defaults to 127.0.0.1) or a Unix socket path,
   * or listens on an inherited listening socket (`fd`, as systemd passes them).
   */
  async listen(where: NbdListenOptions): Promise<NbdAddress> {
    if (this.closing) throw new Error('NbdServer is closed');
    const server = createServer({ allowHalfOpen: true }, (socket) => this.accept(socket));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      const done = () => {
        server.off('error', reject);
        resolve();
      };
      if ('path' in where) server.listen(where.path, done);
      else if ('fd' in where) server.listen({ fd: where.fd }, done);
      else server.listen({ port: where.port, host: where.host ?? '127.0.0.1', ipv6Only: where.ipv6Only === true }, done);
    });
    server.on('error', (err) => this.log('error', `listener: ${err.message}`));
    // A socket file is ours to remove only if we made it (not one systemd passed us).
    const listener: Listener = 'path' in where ? { server, path: where.path } : { server };
    this.listeners.push(listener);
    const addr = server.address();
    if ('path' in where) {
      this.log('info', `listening on ${where.path}`);
      return { path: where.path };
    }
    if (typeof addr === 'string' || addr === null) {
      // An inherited Unix socket: its path, if the kernel still has one.
      this.log('info', `listening on fd ${'fd' in where ? where.fd : '?'} (${addr ?? 'unnamed'})`);
      return { path: addr ?? '' };
    }
    const a = addr;
    this.log('info', `listening on ${a.address}:${a.port}`);
    return { host: a.address, port: a.port, family: a.family };
  }

  /** A snapshot of the counters. */
  stats(): NbdServerStats {
    const c = this.counters;
    let transmitting = 0;
    for (const conn of this.conns) if (conn.phase !== 'handshake') transmitting++;
    return {
      connections: { active: this.conns.size, total: c.connections.total, transmitting },
      requests: { ...c.requests },
      errors: c.errors,
      protocolErrors: c.protocolErrors,
      bytesRead: c.bytesRead,
      bytesWritten: c.bytesWritten,
      inFlight: c.inFlight,
    };
  }

  /** The open connections. */
  connections(): NbdConnectionInfo[] {
    return [...this.conns].map((c) => c.info());
  }

  /**
   * Stops accepting, answers requests that arrive from now on with NBD_ESHUTDOWN (and options
   * with NBD_REP_ERR_SHUTDOWN), lets in-flight requests finish, closes every connection and
   * removes Unix socket files. After `closeTimeoutMs` connections are cut regardless (device
   * operations still running are not abandoned; they finish unobserved).
   */
  close(): Promise<void> {
    this.closed ??= this.shutdown();
    return this.closed;
  }

  private async shutdown(): Promise<void> {
    this.closing = true;
    const deadline = Date.now() + this.options.closeTimeoutMs;
    const listenersClosed = this.listeners.map((l) => new Promise<void>((resolve) => l.server.close(() => resolve())));
    for (const c of this.refused) c.destroy();
    for (const c of this.conns) c.shutdown();
    const finished = await this.waitUntil(() => this.counters.inFlight === 0 && this.conns.size === 0, deadline);
    if (!finished) {
      this.log('warn', `close: ${this.counters.inFlight} requests still in flight, ${this.conns.size} connections open after ${this.options.closeTimeoutMs} ms; cutting connections`);
      for (const c of this.conns) c.destroy();
    }
    await Promise.all(listenersClosed);
    for (const l of this.listeners) {
      if (l.path === undefined) continue;
      try {
        if (lstatSync(l.path).isSocket()) rmSync(l.path, { force: true });
      } catch {
        // already gone
      }
    }
    this.log('info', 'closed');
  }

  /** Resolves true once `cond()` holds (checked whenever a request or connection ends), false at `deadline`. */
  private waitUntil(cond: () => boolean, deadline: number): Promise<boolean> {
    if (cond()) return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.idleWaiters = this.idleWaiters.filter((w) => w !== check);
        resolve(false);
      }, Math.max(0, deadline - Date.now()));
      const check = () => {
        if (!cond()) return;
        clearTimeout(timer);
        this.idleWaiters = this.idleWaiters.filter((w) => w !== check);
        resolve(true);
      };
      this.idleWaiters.push(check);
    });
  }

  /** @internal */
  notifyIdle(): void {
    for (const w of [...this.idleWaiters]) w();
  }

  private accept(socket: Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    const max = this.options.maxConnections;
    if (max > 0 && this.conns.size >= max) {
      if (this.refused.size >= REFUSED_CONNECTIONS) {
        // The oldest refused peer has had its chance to read why: the newest gets the slot, so
        // a real client arriving during a flood is still told.
        const oldest = this.refused.values().next().value!;
        this.refused.delete(oldest);
        oldest.destroy();
      }
      this.log('warn', `${socket.remoteAddress ?? 'unix'}: refused, ${max} connections already (the limit)`);
      const conn = new Connection(this, socket, this.nextId++, `server busy: ${max} connections already, the limit; try again later`);
      this.refused.add(conn);
      conn.start();
      return;
    }
    const conn = new Connection(this, socket, this.nextId++);
    this.conns.add(conn);
    this.counters.connections.total++;
    conn.start();
  }

  // --- Hooks for Connection --------------------------------------------------------------------

  /** @internal */
  get isClosing(): boolean {
    return this.closing;
  }

  /** @internal */
  resolveExport(name: string): ResolvedExport | undefined {
    if (name === '') {
      if (this.defaultName !== undefined) return this.exportMap.get(this.defaultName);
      return this.exportMap.get('') ?? this.exportMap.values().next().value;
    }
    return this.exportMap.get(name);
  }

  /** @internal */
  allExports(): ResolvedExport[] {
    return [...this.exportMap.values()];
  }

  /** @internal */
  get stat(): NbdServerStats {
    return this.counters;
  }

  /** @internal */
  connectionClosed(conn: Connection): void {
    this.conns.delete(conn);
    this.refused.delete(conn);
    this.notifyIdle();
  }

  /** @internal */
  log(level: NbdLogLevel, message: string): void {
    if (!this.logFn) return;
    try {
      this.logFn(level, message);
    } catch {
      // a logger's failure is not the connection's
    }
  }
}
