/**
 * The NBD client's handshake (fixed newstyle): dialling the server, NBD_OPT_STARTTLS for nbds://
 * URIs with the rest inside TLS (see tls.ts for the key and certificate files),
 * NBD_OPT_STRUCTURED_REPLY, then NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE, falling back to
 * NBD_OPT_EXPORT_NAME where GO is unsupported; and NBD_OPT_INFO on a short connection of its own
 * to ask for an export's size again.
 */
import { connect as netConnect, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import {
  NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_INFO_BLOCK_SIZE,
  NBD_INFO_EXPORT, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK, NBD_REP_ERR_POLICY, NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, NBD_REP_INFO,
  isOptionReplyError, replyName,
} from './constants.js';
import { NbdClientError, why } from './client-error.js';
import { NbdProtocolError, type ServerMessage } from './messages.js';
import { ServerParser } from './parser.js';
import { decodeInfo, decodeUtf8, encodeClientFlags, encodeInfoRequest, encodeOption } from './serializer.js';
import { NbdTlsConfigError, clientTlsOptions } from './tls.js';
import { formatNbdUri, type NbdTarget } from './uri.js';

/** What the server said about the export during the handshake. */
export interface NbdExportInfo {
  /** Bytes, as the server reported them (not rounded to sectors). */
  readonly exportSize: number;
  readonly transmissionFlags: number;
  /** Whether NBD_OPT_STRUCTURED_REPLY was accepted. */
  readonly structuredReplies: boolean;
  /** How the export was selected: NBD_OPT_GO, or NBD_OPT_EXPORT_NAME for servers without GO. */
  readonly negotiation: 'go' | 'exportName';
  /** NBD_INFO_BLOCK_SIZE, when the server sent it. */
  readonly blockSize: { readonly minimum: number; readonly preferred: number; readonly maximum: number } | undefined;
}

/** An established, negotiated socket. */
export interface Session {
  readonly socket: Socket;
  readonly parser: ServerParser;
  readonly info: NbdExportInfo;
  /** Tells the parser how many data bytes follow a simple reply to a handle. */
  readonly setReadLengths: (f: (handle: bigint) => number | undefined) => void;
}

/** The server hung up (or reset the connection) during the handshake. */
class HangUp extends Error {}

function dial(t: NbdTarget, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = t.transport === 'unix' ? netConnect({ path: t.path }) : netConnect({ host: t.host, port: t.port });
    const timer = timeoutMs > 0 ? setTimeout(() => {
      socket.destroy();
      reject(new Error(`no connection within ${timeoutMs} ms`));
    }, timeoutMs) : undefined;
    socket.once('connect', () => {
      clearTimeout(timer);
      if (t.transport === 'tcp') {
        socket.setNoDelay(true);
        socket.setKeepAlive(true, 10_000);
      }
      resolve(socket);
    });
    // Stays attached for the socket's life: an 'error' without a listener would throw. The
    // connection's own listeners (added once it is adopted) act on errors.
    socket.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
}

/** Connects and negotiates; on success the socket is paused, its parser in the transmission phase. */
export async function openSession(t: NbdTarget, where: string, timeoutMs: number): Promise<Session> {
  let socket: Socket;
  try {
    socket = await dial(t, timeoutMs);
  } catch (e) {
    throw new NbdClientError('EIO', `cannot connect to NBD server ${where}: ${why(e)}`);
  }
  let lookup = (_h: bigint): number | undefined => undefined;
  const parser = new ServerParser({ readDataLength: (h) => lookup(h) });
  const current = { socket };
  try {
    const tls = t.tls === undefined ? undefined : tlsOptionsOf(t);
    const info = await negotiate(current, parser, t.exportName, where, timeoutMs, tls);
    return { socket: current.socket, parser, info, setReadLengths: (f) => (lookup = f) };
  } catch (e) {
    current.socket.destroy();
    socket.destroy();
    throw e instanceof NbdClientError ? e : new NbdClientError('EIO', `NBD server ${where}: handshake failed: ${why(e)}`);
  }
}

/** Describes the export on a connection of its own (NBD_OPT_INFO), then NBD_OPT_ABORT and hangs up. */
export async function queryExport(t: NbdTarget, where: string, timeoutMs: number): Promise<NbdExportInfo> {
  let socket: Socket;
  try {
    socket = await dial(t, timeoutMs);
  } catch (e) {
    throw new NbdClientError('EIO', `cannot connect to NBD server ${where}: ${why(e)}`);
  }
  const current = { socket };
  try {
    const tls = t.tls === undefined ? undefined : tlsOptionsOf(t);
    return await negotiate(current, new ServerParser({ readDataLength: () => undefined }), t.exportName, where, timeoutMs, tls, true);
  } finally {
    // NBD_OPT_ABORT: a polite goodbye; the server's reply is not worth waiting for.
    if (!current.socket.destroyed) current.socket.end(encodeOption(NBD_OPT_ABORT));
    current.socket.destroySoon();
    if (current.socket !== socket) socket.destroySoon();
  }
}

/** The TLS options of an nbds:// target (its key or certificate files read now). */
export function tlsOptionsOf(t: NbdTarget): ConnectionOptions {
  try {
    return clientTlsOptions(t.tls!, t.transport === 'tcp' ? t.host : undefined);
  } catch (e) {
    if (e instanceof NbdTlsConfigError) throw new NbdClientError('EINVAL', `${formatNbdUri(t)}: ${e.message}`);
    throw e;
  }
}

/**
 * Fixed newstyle negotiation on `current.socket`; with `tls`, NBD_OPT_STARTTLS first, after which
 * `current.socket` is the TLS session. `query`: NBD_OPT_INFO instead of NBD_OPT_GO (the export is
 * described, not entered; no fallback).
 */
async function negotiate(
  current: { socket: Socket }, parser: ServerParser, name: string, where: string, timeoutMs: number, tls: ConnectionOptions | undefined, query = false,
): Promise<NbdExportInfo> {
  let socket = current.socket;
  const inbox: ServerMessage[] = [];
  let failure: Error | undefined;
  let wake: (() => void) | undefined;
  const poke = () => {
    const w = wake;
    wake = undefined;
    w?.();
  };
  const onData = (chunk: Buffer) => {
    parser.push(chunk);
    try {
      for (let m = parser.next(); m; m = parser.next()) inbox.push(m);
    } catch (e) {
      failure ??= e as Error;
    }
    poke();
  };
  const onClose = () => {
    failure ??= new HangUp('the server closed the connection');
    poke();
  };
  const onError = (e: Error) => {
    failure ??= (e as NodeJS.ErrnoException).code === 'ECONNRESET' || (e as NodeJS.ErrnoException).code === 'EPIPE' ? new HangUp(e.message) : e;
    poke();
  };
  socket.on('data', onData);
  socket.on('close', onClose);
  socket.on('error', onError);
  const timer = timeoutMs > 0 ? setTimeout(() => {
    failure ??= new Error(`no answer within ${timeoutMs} ms`);
    poke();
  }, timeoutMs) : undefined;
  const next = async (): Promise<ServerMessage> => {
    for (;;) {
      const m = inbox.shift();
      if (m !== undefined) return m;
      if (failure !== undefined) throw failure;
      await new Promise<void>((r) => (wake = r));
    }
  };
  const nextReply = async (option: number) => {
    const m = await next();
    if (m.kind !== 'optionReply') throw new NbdProtocolError(`expected an option reply, got ${m.kind}`);
    if (m.option !== option) throw new NbdProtocolError(`reply for option ${m.option} while waiting for option ${option}`);
    return m;
  };
  const quoted = JSON.stringify(name);
  try {
    const g = await next();
    if (g.kind !== 'greeting') throw new NbdProtocolError(`expected the greeting, got ${g.kind}`);
    const fixed = (g.handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
    const noZeroes = (g.handshakeFlags & NBD_FLAG_NO_ZEROES) !== 0;
    socket.write(encodeClientFlags((fixed ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0)));
    if (tls !== undefined) {
      if (!fixed) throw new NbdClientError('EIO', `NBD server ${where} is not fixed newstyle, so it cannot do TLS`);
      socket.write(encodeOption(NBD_OPT_STARTTLS));
      const r = await nextReply(NBD_OPT_STARTTLS);
      if (r.replyType !== NBD_REP_ACK) {
        const text = decodeUtf8(r.data) ?? '';
        throw new NbdClientError('EIO', `NBD server ${where} refused TLS (${replyName(r.replyType)}${text === '' ? '' : `: ${text}`})`);
      }
      // Anything after the ACK and before our handshake would be plaintext we never asked for.
      if (inbox.length > 0 || parser.buffered > 0) throw new NbdProtocolError('data after the NBD_OPT_STARTTLS reply, before the TLS handshake');
      const plain = socket;
      plain.off('data', onData);
      plain.off('close', onClose);
      plain.off('error', onError);
      socket = tlsConnect({ ...tls, socket: plain });
      current.socket = socket;
      let secured = false;
      socket.once('secureConnect', () => {
        secured = true;
        poke();
      });
      socket.on('data', onData);
      socket.on('close', onClose);
      socket.on('error', onError);
      try {
        while (!secured) {
          if (failure !== undefined) throw failure;
          await new Promise<void>((r) => (wake = r));
        }
      } catch (e) {
        const hint = e instanceof HangUp ? ' (a key or certificate the server does not accept?)' : '';
        throw new NbdClientError('EIO', `NBD server ${where}: TLS handshake failed: ${why(e)}${hint}`);
      }
    }
    let structured = false;
    if (fixed) {
      socket.write(encodeOption(NBD_OPT_STRUCTURED_REPLY));
      try {
        structured = (await nextReply(NBD_OPT_STRUCTURED_REPLY)).replyType === NBD_REP_ACK;
      } catch (e) {
        // In TLS 1.3 a client's handshake is over before the server has checked its certificate.
        if (tls !== undefined && e instanceof HangUp) throw new NbdClientError('EIO', `NBD server ${where} hung up right after the TLS handshake: it did not accept our certificate or key`);
        throw e;
      }
      const option = query ? NBD_OPT_INFO : NBD_OPT_GO;
      socket.write(encodeOption(option, encodeInfoRequest({ name, infos: [NBD_INFO_BLOCK_SIZE] })));
      let exp: { size: bigint; transmissionFlags: number } | undefined;
      let blockSize: NbdExportInfo['blockSize'];
      for (;;) {
        const r = await nextReply(option);
        if (r.replyType === NBD_REP_INFO) {
          const info = decodeInfo(r.data);
          if (info === undefined) throw new NbdProtocolError('malformed NBD_REP_INFO');
          if (info.info === NBD_INFO_EXPORT && 'size' in info) exp = info;
          else if (info.info === NBD_INFO_BLOCK_SIZE && 'minimum' in info) blockSize = { minimum: info.minimum, preferred: info.preferred, maximum: info.maximum };
          continue;
        }
        if (r.replyType === NBD_REP_ACK) {
          if (exp === undefined) throw new NbdProtocolError(`${query ? 'NBD_OPT_INFO' : 'NBD_OPT_GO'} acknowledged without NBD_INFO_EXPORT`);
          if (!query) parser.enterTransmission();
          return { exportSize: exportSize(exp.size, where), transmissionFlags: exp.transmissionFlags, structuredReplies: structured, negotiation: 'go', blockSize };
        }
        if (r.replyType === NBD_REP_ERR_UNSUP) {
          if (query) throw new NbdClientError('EIO', `NBD server ${where} does not support NBD_OPT_INFO`);
          break; // an older server: fall back to NBD_OPT_EXPORT_NAME
        }
        if (!isOptionReplyError(r.replyType)) throw new NbdProtocolError(`unexpected ${replyName(r.replyType)} to NBD_OPT_GO`);
        const text = decodeUtf8(r.data) ?? '';
        const detail = text === '' ? replyName(r.replyType) : `${replyName(r.replyType)}: ${text}`;
        if (r.replyType === NBD_REP_ERR_UNKNOWN) throw new NbdClientError('ENOENT', `NBD server ${where} has no export ${quoted} (${detail})`);
        if (r.replyType === NBD_REP_ERR_TLS_REQD) throw new NbdClientError('EIO', `NBD server ${where} requires TLS: use an nbds:// URI with tls-psk-file= or tls-certificates= (${detail})`);
        if (r.replyType === NBD_REP_ERR_POLICY) throw new NbdClientError('EIO', `NBD server ${where} refused export ${quoted} by policy (${detail})`);
        throw new NbdClientError('EIO', `NBD server ${where} refused export ${quoted}: ${detail}`);
      }
    }
    if (query) throw new NbdClientError('EIO', `NBD server ${where} is not fixed newstyle: it cannot be asked for NBD_OPT_INFO`);
    parser.expectExportNameReply(noZeroes);
    socket.write(encodeOption(NBD_OPT_EXPORT_NAME, new TextEncoder().encode(name)));
    let m: ServerMessage;
    try {
      m = await next();
    } catch (e) {
      // The only way a server can refuse NBD_OPT_EXPORT_NAME is to hang up.
      if (e instanceof HangUp) throw new NbdClientError('ENOENT', `NBD server ${where} hung up when asked for export ${quoted} (NBD_OPT_EXPORT_NAME): no such export?`);
      throw e;
    }
    if (m.kind !== 'exportNameReply') throw new NbdProtocolError(`expected the NBD_OPT_EXPORT_NAME reply, got ${m.kind}`);
    return { exportSize: exportSize(m.size, where), transmissionFlags: m.transmissionFlags, structuredReplies: structured, negotiation: 'exportName', blockSize: undefined };
  } finally {
    clearTimeout(timer);
    socket.off('data', onData);
    socket.off('close', onClose);
    socket.off('error', onError);
    socket.pause();
  }
}

function exportSize(size: bigint, where: string): number {
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new NbdClientError('EINVAL', `NBD server ${where}: export size ${size} is too large`);
  return Number(size);
}
