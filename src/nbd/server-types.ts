/**
 * What NbdServer and its connections share: the counters, a connection's status, an export as a
 * connection sees it, and what a connection asks of its server (`ConnectionHost`, which
 * NbdServer implements), so that neither file imports the other's implementation.
 */
import type { NbdExportDevice } from './export.js';
import type { serverTlsOptions } from './tls.js';
import type { ZeroExtents } from './zero-extents.js';

export type NbdLogLevel = 'debug' | 'info' | 'warn' | 'error';

/** Counters for status lines. All counts since the server was created. */
export interface NbdServerStats {
  connections: {
    /** Connections open now (negotiating or transmitting). */
    active: number;
    /** Connections ever accepted. */
    total: number;
    /** Connections open now that reached the transmission phase. */
    transmitting: number;
  };
  /** Requests received, by command. */
  requests: { read: number; write: number; flush: number; trim: number; writeZeroes: number; disc: number; other: number };
  /** Requests answered with an error. */
  errors: number;
  /** Connections dropped because the client broke the protocol. */
  protocolErrors: number;
  /** Bytes returned by successful reads / accepted by successful writes. */
  bytesRead: number;
  bytesWritten: number;
  /** Device operations in progress now (including those of clients that have gone). */
  inFlight: number;
}

/** One open connection, for status displays. */
export interface NbdConnectionInfo {
  id: number;
  remote: string;
  phase: 'handshake' | 'transmission' | 'closing';
  export?: string;
  structuredReplies: boolean;
  /** The connection went through NBD_OPT_STARTTLS. */
  tls: boolean;
  inFlight: number;
  requests: number;
}

/** An export as a connection sees it. */
export interface ResolvedExport {
  name: string;
  description: string;
  device: NbdExportDevice;
  /** What the server zeroed itself, when it is the device's only writer (base:allocation). */
  zeroes: ZeroExtents | undefined;
}

/** What a connection needs of its server. */
export interface ConnectionHost {
  readonly options: {
    readonly handshakeTimeoutMs: number;
    readonly tlsHandshakeTimeoutMs: number;
    readonly maxOptions: number;
    readonly maxOptionLength: number;
    readonly maxPayload: number;
    readonly maxInFlight: number;
    readonly maxInFlightBytes: number;
  };
  readonly tls: { mode: 'off' } | { mode: 'on' | 'require'; socketOptions: ReturnType<typeof serverTlsOptions> };
  readonly isClosing: boolean;
  readonly stat: NbdServerStats;
  resolveExport(name: string): ResolvedExport | undefined;
  allExports(): ResolvedExport[];
  /** The connection has ended. */
  connectionClosed(conn: object): void;
  notifyIdle(): void;
  log(level: NbdLogLevel, message: string): void;
}
