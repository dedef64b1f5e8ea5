/**
 * One client connection of NbdServer, from greeting to hang-up: fixed newstyle option haggling
 * (with NBD_OPT_STARTTLS), then pipelined transmission against one export's device, with the
 * flow control the server's header describes. One connection's state machine, read whole: the
 * negotiation and transmission phases share its socket, parser, counters and limits.
 */
import type { Socket } from 'node:net';
import { TLSSocket } from 'node:tls';
import {
  NBD_CMD_DISC, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLUSH, NBD_CMD_READ,
  NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_ENOSPC, NBD_ENOTSUP,
  NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN,
  NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS, NBD_FLAG_NO_ZEROES, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION, NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO,
  NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY, NBD_REPLY_FLAG_DONE, NBD_REP_ACK,
  NBD_REP_ERR_INVALID, NBD_REP_ERR_POLICY, NBD_REP_ERR_SHUTDOWN, NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_REP_SERVER, commandName, errnoName, optionName, replyName,
  MAX_EXTENTS_PER_REPLY, NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, NBD_META_BASE_ALLOCATION, NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT, NBD_REP_META_CONTEXT, NBD_STATE_ZERO,
} from './constants.js';
import { deviceErrno, type NbdExportDevice } from './export.js';
import { NbdProtocolError, type InfoReply, type OptionMessage, type RequestMessage } from './messages.js';
import { ClientParser } from './parser.js';
import {
  decodeInfoRequest, decodeUtf8, encodeExportNameReply, encodeGreeting, encodeInfo, encodeOffsetDataHeader,
  encodeOptionError, encodeOptionReply, encodeServerEntry, encodeSimpleReply, encodeStructuredError,
  encodeStructuredNone, decodeMetaContextRequest, encodeBlockStatus, encodeMetaContext,
} from './serializer.js';
import { HOLE_AND_ZERO, type ExtentChange } from './zero-extents.js';

import type { ConnectionHost, NbdConnectionInfo, NbdLogLevel, ResolvedExport } from './server-types.js';

const EMPTY = new Uint8Array(0);

/** Transmission flags for `device`, given whether structured replies were negotiated. */
function transmissionFlags(device: NbdExportDevice, structured: boolean): number {
  let f = NBD_FLAG_HAS_FLAGS;
  if (device.readOnly) f |= NBD_FLAG_READ_ONLY;
  else {
    // FAST_ZERO is offered whatever the device can do: a fast NBD_ENOTSUP is a fast answer too.
    f |= NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
    if (device.canTrim) f |= NBD_FLAG_SEND_TRIM;
  }
  if (device.canFlush) f |= NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
  if (structured) f |= NBD_FLAG_SEND_DF;
  if (device.multiConn) f |= NBD_FLAG_CAN_MULTI_CONN;
  return f;
}

/** A request refused before it reaches the device. */
interface Refusal {
  errno: number;
  message: string;
}

export class Connection {
  private readonly parser: ClientParser;
  phase: 'handshake' | 'transmission' | 'closing' = 'handshake';
  private exp: ResolvedExport | undefined;
  private noZeroes = false;
  private structured = false;
  /** base:allocation as the last NBD_OPT_SET_META_CONTEXT selected it: for which export name, with which ID. */
  private metaContext: { exportName: string; id: number } | undefined;
  /** Its ID in transmission, if it was selected for the export chosen. */
  private blockStatusId: number | undefined;
  /** The client asked for NBD_INFO_BLOCK_SIZE in NBD_OPT_GO, so it promised to honour it. */
  private blockSizeAgreed = false;
  private inFlight = 0;
  private inFlightBytes = 0;
  private requestCount = 0;
  /** NBD_CMD_DISC, end of input, or server shutdown: answer what is in flight, then end. */
  private draining = false;
  private shuttingDown = false;
  private gone = false;
  private ended = false;
  /** The client half-closed: no more bytes will arrive. */
  private inputEnded = false;
  private pumping = false;
  private handshakeTimer: NodeJS.Timeout | undefined;
  private readonly remote: string;
  /** NBD_OPT_STARTTLS answered: the TLS session is being set up or is up. */
  private tlsStarted = false;
  private optionCount = 0;
  /** The TLS handshake finished: `socket` is the TLSSocket. */
  private tlsUp = false;
  private socket: Socket;

  constructor(
    private readonly server: ConnectionHost,
    socket: Socket,
    readonly id: number,
    /** Past the server's connection cap: why, told to every option, and nothing served. */
    private readonly refusal?: string,
  ) {
    this.socket = socket;
    this.parser = new ClientParser({ maxOptionLength: server.options.maxOptionLength, maxPayload: server.options.maxPayload });
    this.remote = socket.remoteAddress !== undefined ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
  }

  info(): NbdConnectionInfo {
    const i: NbdConnectionInfo = {
      id: this.id,
      remote: this.remote,
      phase: this.phase,
      structuredReplies: this.structured,
      tls: this.tlsUp,
      inFlight: this.inFlight,
      requests: this.requestCount,
    };
    if (this.exp) i.export = this.exp.name;
    return i;
  }

  private log(level: NbdLogLevel, message: string): void {
    this.server.log(level, `nbd[${this.id}] ${message}`);
  }

  private readonly onData = (chunk: Buffer): void => {
    this.parser.push(chunk);
    this.pump();
  };

  private readonly onEnd = (): void => {
    // The client will send nothing more: serve what it sent, then close.
    this.inputEnded = true;
    this.pump();
  };

  private readonly onDrain = (): void => this.pump();

  private readonly onClose = (): void => {
    if (this.gone) return;
    this.gone = true;
    this.phase = 'closing';
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.log('info', `closed (${this.requestCount} requests, ${this.inFlight} still in flight)`);
    this.server.connectionClosed(this);
  };

  /** Reads and writes go through `s` from now on. */
  private attach(s: Socket): void {
    s.on('data', this.onData);
    s.on('end', this.onEnd);
    s.on('drain', this.onDrain);
    s.on('close', this.onClose);
  }

  start(): void {
    const s = this.socket;
    s.setNoDelay(true);
    s.on('error', (err) => this.log('debug', `socket error: ${err.message}`));
    this.attach(s);
    const t = this.server.options.handshakeTimeoutMs;
    if (t > 0) {
      this.handshakeTimer = setTimeout(() => {
        if (this.phase !== 'handshake') return;
        this.log('warn', `no export chosen, nothing heard for ${t} ms`);
        this.destroy();
      }, t);
      this.handshakeTimer.unref();
    }
    this.log('info', `connected from ${this.remote}`);
    this.send(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
  }

  /** Hard disconnect. */
  destroy(): void {
    this.phase = 'closing';
    this.parser.discard();
    this.socket.destroy();
  }

  /** Server shutdown: refuse what arrives from now on, finish what is in flight, then close. */
  shutdown(): void {
    this.shuttingDown = true;
    if (this.phase === 'handshake') {
      // Options already received are answered (NBD_REP_ERR_SHUTDOWN), then the session ends:
      // nothing is in flight during negotiation.
      this.pump();
      this.end();
      return;
    }
    if (this.inFlight === 0) this.end();
  }

  /** Soft close: stop reading, send what is queued, then close (cut after a grace period). */
  private end(): void {
    if (this.gone || this.ended) return;
    this.ended = true;
    this.phase = 'closing';
    this.parser.discard();
    if (!this.socket.writableEnded) this.socket.end();
    const t = setTimeout(() => this.socket.destroy(), 2000);
    t.unref();
    this.socket.once('close', () => clearTimeout(t));
  }

  private drain(): void {
    this.draining = true;
    this.parser.discard();
    if (this.inFlight === 0) this.end();
  }

  private protocolError(err: NbdProtocolError): void {
    this.server.stat.protocolErrors++;
    this.log('warn', `protocol error, disconnecting: ${err.message}`);
    this.destroy();
  }

  /**
   * Writes one whole message (its parts back to back, never interleaved with another). In
   * transmission, replies are gathered (the socket corked) until the current batch of work is
   * done: the requests one notification completes are answered in one writev, not one each.
   */
  private send(...parts: Uint8Array[]): boolean {
    return this.sendThen(undefined, ...parts);
  }

  /**
   * `send`, and `written` once the socket is done with the last part, taken or failed (in
   * transmission only).
   */
  private sendThen(written: (() => void) | undefined, ...parts: Uint8Array[]): boolean {
    const s = this.socket;
    if (this.gone || s.destroyed || s.writableEnded) return false;
    if (this.phase === 'transmission') {
      if (this.corked === undefined) {
        // The socket corked is the one uncorked, even if STARTTLS replaced `socket` meanwhile.
        this.corked = s;
        s.cork();
        process.nextTick(this.uncork);
      }
      let last = parts.length - 1;
      while (last > 0 && parts[last]!.length === 0) last--;
      for (let i = 0; i <= last; i++) {
        const p = parts[i]!;
        if (i === last && written !== undefined) s.write(p, () => written());
        else if (p.length > 0) s.write(p);
      }
      return true;
    }
    if (parts.length === 1) {
      s.write(parts[0]!);
      return true;
    }
    s.cork();
    for (const p of parts) if (p.length > 0) s.write(p);
    s.uncork();
    return true;
  }

  /** The socket `send` corked, if its batch of replies is still gathering. */
  private corked: Socket | undefined;

  /**
   * After the microtasks of this turn (process.nextTick runs once the promise jobs queued
   * before it are done), so completions that finish together leave together.
   */
  private readonly uncork = (): void => {
    const s = this.corked;
    this.corked = undefined;
    s?.uncork();
  };

  /** Whether to stop reading: too much in progress, or replies the client is not reading. */
  private busy(): boolean {
    const o = this.server.options;
    if (this.socket.writableLength >= o.maxInFlightBytes) return true;
    return this.phase === 'transmission' && (this.inFlight >= o.maxInFlight || this.inFlightBytes >= o.maxInFlightBytes);
  }

  /** Handles every whole message buffered, as far as the in-flight limits allow. */
  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (!this.gone && this.phase !== 'closing' && !this.draining) {
        if (this.busy()) {
          this.socket.pause();
          return;
        }
        let msg;
        try {
          msg = this.parser.next();
        } catch (e) {
          if (e instanceof NbdProtocolError) this.protocolError(e);
          else throw e;
          return;
        }
        if (!msg) {
          if (this.inputEnded) {
            if (this.phase === 'handshake') this.destroy();
            else this.drain();
          }
          break;
        }
        switch (msg.kind) {
          case 'clientFlags':
            this.onClientFlags(msg.flags);
            break;
          case 'option':
            this.onOption(msg);
            break;
          case 'request':
            this.onRequest(msg);
            break;
        }
      }
      if (!this.gone && !this.draining && this.phase !== 'closing' && this.socket.isPaused()) this.socket.resume();
    } finally {
      this.pumping = false;
    }
  }

  // --- Handshake -------------------------------------------------------------------------------

  private onClientFlags(flags: number): void {
    const known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    if ((flags & ~known) !== 0) {
      this.protocolError(new NbdProtocolError(`unknown client flags 0x${flags.toString(16)}`));
      return;
    }
    this.noZeroes = (flags & NBD_FLAG_C_NO_ZEROES) !== 0;
  }

  private reply(option: number, replyType: number, data?: Uint8Array): void {
    this.log('debug', `${optionName(option)} → ${replyName(replyType)}`);
    this.send(encodeOptionReply(option, replyType, data));
  }

  private replyError(option: number, replyType: number, message: string): void {
    this.log('debug', `${optionName(option)} → ${replyName(replyType)}: ${message}`);
    this.send(encodeOptionError(option, replyType, message));
  }

  private onOption({ option, data }: OptionMessage): void {
    // The handshake limit counts from the last whole option: a peer that stalls is dropped, one
    // that keeps negotiating (nbdinfo --list asks about each export, waiting on TCP's delayed
    // ACKs) is bounded by maxOptions instead.
    this.handshakeTimer?.refresh();
    if (++this.optionCount > this.server.options.maxOptions) {
      // Said once, then the session ends (what is queued is still sent, within end()'s grace).
      const why = `more than ${this.server.options.maxOptions} options without choosing an export`;
      this.server.stat.protocolErrors++;
      this.log('warn', `${why}, disconnecting`);
      this.replyError(option, NBD_REP_ERR_POLICY, why);
      this.end();
      return;
    }
    if (this.server.isClosing && option !== NBD_OPT_ABORT) {
      if (option === NBD_OPT_EXPORT_NAME) this.destroy();
      else this.replyError(option, NBD_REP_ERR_SHUTDOWN, 'server shutting down');
      return;
    }
    if (this.refusal !== undefined && option !== NBD_OPT_ABORT) {
      if (option === NBD_OPT_EXPORT_NAME) this.destroy();
      else this.replyError(option, NBD_REP_ERR_POLICY, this.refusal);
      return;
    }
    if (this.server.tls.mode === 'require' && !this.tlsStarted && option !== NBD_OPT_STARTTLS && option !== NBD_OPT_ABORT) {
      if (option === NBD_OPT_EXPORT_NAME) {
        this.log('info', 'NBD_OPT_EXPORT_NAME without TLS, which this server requires: disconnecting');
        this.destroy();
      } else this.replyError(option, NBD_REP_ERR_TLS_REQD, 'this server requires TLS: use NBD_OPT_STARTTLS first');
      return;
    }
    switch (option) {
      case NBD_OPT_EXPORT_NAME: {
        const name = decodeUtf8(data);
        const exp = name === undefined ? undefined : this.server.resolveExport(name);
        if (!exp) {
          // This option cannot fail politely: the spec says to end the session.
          this.log('info', `NBD_OPT_EXPORT_NAME: no export ${JSON.stringify(name ?? '<invalid UTF-8>')}, disconnecting`);
          this.destroy();
          return;
        }
        this.send(encodeExportNameReply(BigInt(exp.device.size), transmissionFlags(exp.device, this.structured), this.noZeroes));
        this.enterTransmission(exp, false, name!);
        return;
      }
      case NBD_OPT_ABORT:
        this.reply(option, NBD_REP_ACK);
        this.end();
        return;
      case NBD_OPT_LIST:
        if (data.length !== 0) {
          this.replyError(option, NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
          return;
        }
        for (const e of this.server.allExports()) this.reply(option, NBD_REP_SERVER, encodeServerEntry(e));
        this.reply(option, NBD_REP_ACK);
        return;
      case NBD_OPT_STARTTLS:
        this.startTls(option, data);
        return;
      case NBD_OPT_STRUCTURED_REPLY:
        if (data.length !== 0) {
          this.replyError(option, NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
          return;
        }
        this.structured = true;
        this.reply(option, NBD_REP_ACK);
        return;
      case NBD_OPT_INFO:
      case NBD_OPT_GO: {
        const req = decodeInfoRequest(data);
        if (!req) {
          this.replyError(option, NBD_REP_ERR_INVALID, `malformed ${optionName(option)} data`);
          return;
        }
        const exp = this.server.resolveExport(req.name);
        if (!exp) {
          this.replyError(option, NBD_REP_ERR_UNKNOWN, req.name === '' ? 'no default export' : `no export named ${JSON.stringify(req.name)}`);
          return;
        }
        const dev = exp.device;
        const infos: InfoReply[] = [{ info: NBD_INFO_EXPORT, size: BigInt(dev.size), transmissionFlags: transmissionFlags(dev, this.structured) }];
        const wants = new Set(req.infos);
        if (wants.has(NBD_INFO_NAME)) infos.push({ info: NBD_INFO_NAME, name: exp.name });
        if (wants.has(NBD_INFO_DESCRIPTION) && exp.description !== '') infos.push({ info: NBD_INFO_DESCRIPTION, description: exp.description });
        if (wants.has(NBD_INFO_BLOCK_SIZE)) {
          infos.push({
            info: NBD_INFO_BLOCK_SIZE,
            minimum: dev.blockSize,
            preferred: Math.max(4096, dev.blockSize),
            maximum: this.server.options.maxPayload,
          });
        }
        for (const i of infos) this.reply(option, NBD_REP_INFO, encodeInfo(i));
        this.reply(option, NBD_REP_ACK);
        if (option === NBD_OPT_GO) this.enterTransmission(exp, wants.has(NBD_INFO_BLOCK_SIZE), req.name);
        return;
      }
      case NBD_OPT_LIST_META_CONTEXT:
      case NBD_OPT_SET_META_CONTEXT:
        this.metaContextOption(option, data);
        return;
      default:
        this.replyError(option, NBD_REP_ERR_UNSUP, `${optionName(option)} is not supported by this server`);
    }
  }

  /**
   * NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT. The one context is base:allocation,
   * offered for exports the server alone writes. LIST with no query, or the query "base:", lists
   * it; SET selects it by its full name (and needs structured replies, which carry block status);
   * a SET replaces the selection even when it fails; unknown namespaces are ignored.
   */
  private metaContextOption(option: number, data: Uint8Array): void {
    const set = option === NBD_OPT_SET_META_CONTEXT;
    if (set) this.metaContext = undefined;
    const req = decodeMetaContextRequest(data);
    if (req === undefined) {
      this.replyError(option, NBD_REP_ERR_INVALID, `malformed ${optionName(option)} data`);
      return;
    }
    if (set && !this.structured) {
      this.replyError(option, NBD_REP_ERR_INVALID, 'NBD_OPT_SET_META_CONTEXT needs structured replies (NBD_OPT_STRUCTURED_REPLY) first');
      return;
    }
    const exp = this.server.resolveExport(req.name);
    if (!exp) {
      this.replyError(option, NBD_REP_ERR_UNKNOWN, req.name === '' ? 'no default export' : `no export named ${JSON.stringify(req.name)}`);
      return;
    }
    const offered = exp.zeroes !== undefined;
    const matches = set
      ? req.queries.includes(NBD_META_BASE_ALLOCATION)
      : req.queries.length === 0 || req.queries.some((q) => q === 'base:' || q === NBD_META_BASE_ALLOCATION);
    if (offered && matches) {
      // The spec reserves ID 0 in LIST replies; a SET's ID is ours to choose.
      const id = set ? 1 : 0;
      if (set) this.metaContext = { exportName: req.name, id };
      this.reply(option, NBD_REP_META_CONTEXT, encodeMetaContext(id, NBD_META_BASE_ALLOCATION));
    }
    this.reply(option, NBD_REP_ACK);
  }

  /**
   * NBD_OPT_STARTTLS: acknowledge in plaintext, then hand the socket to TLS and carry on reading
   * options from the TLS session once its handshake is done.
   */
  private startTls(option: number, data: Uint8Array): void {
    const tls = this.server.tls;
    if (tls.mode === 'off') {
      this.replyError(option, NBD_REP_ERR_UNSUP, 'TLS is not enabled on this server');
      return;
    }
    if (this.tlsStarted) {
      this.replyError(option, NBD_REP_ERR_INVALID, 'TLS is already on');
      return;
    }
    if (data.length !== 0) {
      this.replyError(option, NBD_REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
      return;
    }
    if (this.parser.buffered > 0) {
      // The client had to wait for our reply before its handshake: these bytes were sent in the
      // clear after asking for TLS, and must not be taken as options of the TLS session.
      this.protocolError(new NbdProtocolError(`${this.parser.buffered} bytes sent after NBD_OPT_STARTTLS before its reply`));
      return;
    }
    this.log('debug', 'NBD_OPT_STARTTLS → NBD_REP_ACK');
    this.send(encodeOptionReply(option, NBD_REP_ACK));
    this.tlsStarted = true;
    // What was agreed in the clear could have been a man in the middle's doing: the TLS session
    // starts from nothing (nbdkit's fix for CVE-2021-3716 does the same).
    this.structured = false;
    this.metaContext = undefined;
    const plain = this.socket;
    plain.off('data', this.onData);
    plain.off('end', this.onEnd);
    plain.off('drain', this.onDrain);
    // The TLSSocket reads the plain socket from now on; 'close' of either ends the connection.
    let identity: string | undefined;
    const psk = tls.socketOptions.pskCallback;
    const options = psk === undefined ? tls.socketOptions : {
      ...tls.socketOptions,
      pskCallback: (s: TLSSocket, id: string) => {
        identity = id;
        return psk(s, id);
      },
    };
    const secure = new TLSSocket(plain, { isServer: true, ...options });
    this.socket = secure;
    secure.on('error', (err) => {
      const reason = (err as Error & { reason?: string }).reason ?? err.message.trim();
      if (!this.tlsUp) this.log('warn', `TLS handshake with ${this.remote} failed: ${reason}`);
      else this.log('debug', `TLS error: ${reason}`);
      this.destroy();
    });
    const timer = setTimeout(() => {
      if (this.tlsUp || this.gone) return;
      this.log('warn', `TLS handshake with ${this.remote} not finished after ${this.server.options.tlsHandshakeTimeoutMs} ms`);
      this.destroy();
    }, this.server.options.tlsHandshakeTimeoutMs);
    timer.unref();
    secure.once('secure', () => {
      clearTimeout(timer);
      this.tlsUp = true;
      const peer = secure.getPeerCertificate();
      const cn = peer !== null && typeof peer === 'object' && peer.subject !== undefined ? peer.subject.CN ?? JSON.stringify(peer.subject) : undefined;
      const who = identity !== undefined ? `, PSK user ${JSON.stringify(identity)}` : cn !== undefined ? `, client ${cn}` : '';
      this.log('info', `TLS ${secure.getProtocol() ?? ''} ${secure.getCipher().name}${who}`);
      this.pump();
    });
    this.attach(secure);
    secure.on('close', () => clearTimeout(timer));
  }

  private enterTransmission(exp: ResolvedExport, blockSizeAgreed: boolean, requestedName: string): void {
    this.exp = exp;
    // Block status only for the export name the last NBD_OPT_SET_META_CONTEXT named (proto.md).
    this.blockStatusId = this.metaContext?.exportName === requestedName ? this.metaContext.id : undefined;
    this.blockSizeAgreed = blockSizeAgreed;
    this.phase = 'transmission';
    this.parser.enterTransmission();
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    const dev = exp.device;
    this.log('info', `export ${JSON.stringify(exp.name)}: ${dev.size} bytes${dev.readOnly ? ', read-only' : ''}${this.structured ? ', structured replies' : ''}`);
  }

  // --- Transmission ----------------------------------------------------------------------------

  private countRequest(command: number): void {
    const r = this.server.stat.requests;
    this.requestCount++;
    switch (command) {
      case NBD_CMD_READ: r.read++; break;
      case NBD_CMD_WRITE: r.write++; break;
      case NBD_CMD_FLUSH: r.flush++; break;
      case NBD_CMD_TRIM: r.trim++; break;
      case NBD_CMD_WRITE_ZEROES: r.writeZeroes++; break;
      case NBD_CMD_DISC: r.disc++; break;
      default: r.other++;
    }
  }

  /** Why `req` cannot be served, or undefined. */
  private refuse(req: RequestMessage): Refusal | undefined {
    const dev = this.exp!.device;
    const { command, flags, offset, length } = req;
    const name = commandName(command);
    if (this.shuttingDown) return { errno: NBD_ESHUTDOWN, message: 'server shutting down' };
    const known = command === NBD_CMD_READ || command === NBD_CMD_WRITE || command === NBD_CMD_FLUSH ||
      command === NBD_CMD_TRIM || command === NBD_CMD_WRITE_ZEROES || command === NBD_CMD_BLOCK_STATUS;
    if (!known) return { errno: NBD_EINVAL, message: `${name} is not supported` };
    let allowed = command === NBD_CMD_BLOCK_STATUS ? NBD_CMD_FLAG_REQ_ONE : NBD_CMD_FLAG_FUA;
    if (command === NBD_CMD_WRITE_ZEROES) allowed |= NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
    if (command === NBD_CMD_READ && this.structured) allowed |= NBD_CMD_FLAG_DF;
    if ((flags & ~allowed) !== 0) return { errno: NBD_EINVAL, message: `flags 0x${flags.toString(16)} are not valid for ${name}` };
    const writes = command === NBD_CMD_WRITE || command === NBD_CMD_TRIM || command === NBD_CMD_WRITE_ZEROES;
    if (writes && dev.readOnly) return { errno: NBD_EPERM, message: 'the export is read-only' };
    if (command === NBD_CMD_FLUSH) {
      return dev.canFlush ? undefined : { errno: NBD_EINVAL, message: 'the export does not support flush' };
    }
    if (command === NBD_CMD_BLOCK_STATUS) {
      if (this.blockStatusId === undefined) return { errno: NBD_EINVAL, message: 'no metadata context was selected for this export (NBD_OPT_SET_META_CONTEXT)' };
      if (length === 0) return { errno: NBD_EINVAL, message: 'NBD_CMD_BLOCK_STATUS of 0 bytes' };
    }
    if (command === NBD_CMD_TRIM && !dev.canTrim) return { errno: NBD_EINVAL, message: 'the export does not support trim' };
    if (command === NBD_CMD_READ && length > this.server.options.maxPayload) {
      return { errno: NBD_EINVAL, message: `read of ${length} bytes exceeds the maximum of ${this.server.options.maxPayload}` };
    }
    if (offset + BigInt(length) > BigInt(dev.size)) {
      const errno = command === NBD_CMD_WRITE || command === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
      return { errno, message: `${name} of ${length} bytes at ${offset} is beyond the end of the export (${dev.size} bytes)` };
    }
    if (command === NBD_CMD_WRITE_ZEROES && (flags & NBD_CMD_FLAG_FAST_ZERO) !== 0 && dev.fastZero?.((flags & NBD_CMD_FLAG_NO_HOLE) === 0) !== true) {
      // proto.md: fail quickly, changing nothing, unless it takes less time than the write would.
      return { errno: NBD_ENOTSUP, message: 'zeroing this range would be no faster than writing it' };
    }
    const bs = dev.blockSize;
    if (this.blockSizeAgreed && bs > 1 && (offset % BigInt(bs) !== 0n || length % bs !== 0)) {
      return { errno: NBD_EINVAL, message: `${name} of ${length} bytes at ${offset} is not aligned to the ${bs}-byte block size` };
    }
    return undefined;
  }

  private onRequest(req: RequestMessage): void {
    this.countRequest(req.command);
    if (req.command === NBD_CMD_DISC) {
      this.log('debug', `NBD_CMD_DISC with ${this.inFlight} in flight`);
      this.drain();
      return;
    }
    const refusal = this.refuse(req);
    if (refusal) {
      this.answerError(req, refusal.errno, refusal.message);
      return;
    }
    const bytes = req.command === NBD_CMD_READ || req.command === NBD_CMD_WRITE ? req.length : 0;
    // What the export knows of zeroes is forgotten over a range the moment a change of it starts.
    const changes = req.command === NBD_CMD_WRITE || req.command === NBD_CMD_TRIM || req.command === NBD_CMD_WRITE_ZEROES;
    const change = changes && req.length > 0 ? this.exp!.zeroes?.begin(Number(req.offset), req.length, req.command === NBD_CMD_WRITE_ZEROES) : undefined;
    this.inFlight++;
    this.inFlightBytes += bytes;
    this.server.stat.inFlight++;
    void this.execute(req, this.exp!, change).finally(() => {
      change?.done();
      this.inFlight--;
      this.inFlightBytes -= bytes;
      this.server.stat.inFlight--;
      if ((this.draining || this.shuttingDown) && this.inFlight === 0) this.end();
      else this.pump();
      this.server.notifyIdle();
    });
  }

  /** Runs one checked request on the device and answers it. Never rejects. */
  private async execute(req: RequestMessage, exp: ResolvedExport, change: ExtentChange | undefined): Promise<void> {
    const dev = exp.device;
    const offset = Number(req.offset);
    const length = req.length;
    const fua = (req.flags & NBD_CMD_FLAG_FUA) !== 0 && dev.canFlush;
    const stat = this.server.stat;
    try {
      switch (req.command) {
        case NBD_CMD_READ: {
          if (length > 0 && dev.readPages !== undefined) {
            const { pages, release } = await dev.readPages(offset, length);
            stat.bytesRead += length;
            // The pages go back once the socket is done with the reply, or at once if it is not sent.
            this.answerRead(req, pages, release);
            return;
          }
          const data = length === 0 ? EMPTY : await dev.read(offset, length);
          if (!(data instanceof Uint8Array) || data.length !== length) {
            throw new Error(`device read returned ${data instanceof Uint8Array ? data.length : typeof data} instead of ${length} bytes`);
          }
          stat.bytesRead += length;
          this.answerRead(req, data);
          return;
        }
        case NBD_CMD_WRITE:
          if (length > 0) {
            await dev.write(offset, req.data!);
            if (fua) await dev.flush();
          }
          stat.bytesWritten += length;
          break;
        case NBD_CMD_FLUSH:
          await dev.flush();
          break;
        case NBD_CMD_TRIM:
          if (length > 0) {
            await dev.trim(offset, length);
            if (fua) await dev.flush();
          }
          break;
        case NBD_CMD_WRITE_ZEROES:
          // Without NBD_CMD_FLAG_NO_HOLE the device may deallocate; either way the range must read as zeroes.
          if (length > 0) {
            const hole = await dev.writeZeroes(offset, length, (req.flags & NBD_CMD_FLAG_NO_HOLE) === 0);
            if (fua) await dev.flush();
            change?.done(hole === true ? HOLE_AND_ZERO : NBD_STATE_ZERO);
          }
          break;
        case NBD_CMD_BLOCK_STATUS: {
          // Structured replies are on: NBD_OPT_SET_META_CONTEXT required them.
          const max = (req.flags & NBD_CMD_FLAG_REQ_ONE) !== 0 ? 1 : MAX_EXTENTS_PER_REPLY;
          this.send(encodeBlockStatus(req.handle, this.blockStatusId!, exp.zeroes!.query(offset, length, max)));
          return;
        }
      }
      this.send(encodeSimpleReply(0, req.handle));
    } catch (e) {
      let errno = deviceErrno(e);
      // proto.md: NBD_ENOTSUP only answers a fast zero, NBD_EOVERFLOW only DF or an oversize length.
      const fastZero = req.command === NBD_CMD_WRITE_ZEROES && (req.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0;
      if ((errno === NBD_ENOTSUP && !fastZero) || errno === NBD_EOVERFLOW) errno = NBD_EINVAL;
      const message = e instanceof Error ? e.message : String(e);
      this.log('warn', `${commandName(req.command)} of ${length} bytes at ${offset} failed (${errnoName(errno)}): ${message}`);
      this.answerError(req, errno, message);
    }
  }

  /**
   * `data`: one buffer, or the pieces of the read in order. `written`: called once the socket is
   * done with `data`, whether the write went out or failed, or at once if the reply was not sent
   * (lent pages must come back).
   */
  private answerRead(req: RequestMessage, data: Uint8Array | readonly Uint8Array[], written?: () => void): void {
    const parts = data instanceof Uint8Array ? [data] : data;
    let length = 0;
    for (const p of parts) length += p.length;
    let sent: boolean;
    if (!this.structured) {
      sent = this.sendThen(written, encodeSimpleReply(0, req.handle), ...parts);
    } else if (length === 0) {
      sent = this.sendThen(written, encodeStructuredNone(req.handle));
    } else {
      // One content chunk covering the whole read, marked final: the data is all here, so no
      // error can follow it (and NBD_CMD_FLAG_DF is satisfied whatever the length).
      sent = this.sendThen(written, encodeOffsetDataHeader(NBD_REPLY_FLAG_DONE, req.handle, req.offset, length), ...parts);
    }
    if (!sent) written?.();
  }

  private answerError(req: RequestMessage, errno: number, message: string): void {
    this.server.stat.errors++;
    this.log('debug', `${commandName(req.command)} handle ${req.handle} → ${errnoName(errno)}: ${message}`);
    if (this.structured) this.send(encodeStructuredError(req.handle, { error: errno, message }));
    else this.send(encodeSimpleReply(errno, req.handle));
  }
}
