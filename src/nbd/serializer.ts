/**
 * Byte-exact encoders for every NBD message, both directions, and decoders for the payloads
 * that travel inside option data, option replies and structured chunks. Pure: no sockets.
 */
import {
  IHAVEOPT, NBDMAGIC, NBD_EXPORT_NAME_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_DESCRIPTION, NBD_INFO_EXPORT,
  NBD_INFO_NAME, NBD_MAX_STRING, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REP_MAGIC, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC,
  NBD_REPLY_TYPE_BLOCK_STATUS, NBD_STRUCTURED_REPLY_HEADER_SIZE, NBD_STRUCTURED_REPLY_MAGIC,
} from './constants.js';
import type { ErrorChunk, InfoReply, InfoRequest, OffsetDataChunk, OffsetHoleChunk, RequestMessage, ServerEntry } from './messages.js';

const encoder = new TextEncoder();
const strictDecoder = new TextDecoder('utf-8', { fatal: true });

/** UTF-8 bytes of `s`, cut at a character boundary to at most `max` bytes. */
export function utf8(s: string, max = Number.MAX_SAFE_INTEGER): Uint8Array {
  const bytes = encoder.encode(s);
  if (bytes.length <= max) return bytes;
  let end = max;
  while (end > 0 && (bytes[end]! & 0xc0) === 0x80) end--;
  return bytes.subarray(0, end);
}

/** Strict UTF-8 decoding; undefined for invalid sequences. */
export function decodeUtf8(bytes: Uint8Array): string | undefined {
  try {
    return strictDecoder.decode(bytes);
  } catch {
    return undefined;
  }
}

/** Big-endian field writer over a fresh buffer of known size. */
class Writer {
  readonly bytes: Uint8Array;
  private readonly view: DataView;
  private pos = 0;
  constructor(size: number) {
    this.bytes = new Uint8Array(size);
    this.view = new DataView(this.bytes.buffer);
  }
  u16(v: number): this {
    this.view.setUint16(this.pos, v);
    this.pos += 2;
    return this;
  }
  u32(v: number): this {
    this.view.setUint32(this.pos, v >>> 0);
    this.pos += 4;
    return this;
  }
  u64(v: bigint): this {
    this.view.setBigUint64(this.pos, BigInt.asUintN(64, v));
    this.pos += 8;
    return this;
  }
  raw(b: Uint8Array): this {
    this.bytes.set(b, this.pos);
    this.pos += b.length;
    return this;
  }
  done(): Uint8Array {
    if (this.pos !== this.bytes.length) throw new Error(`encoder wrote ${this.pos} of ${this.bytes.length} bytes`);
    return this.bytes;
  }
}

const view = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);

// --- Server → client: handshake ----------------------------------------------------------------

/** NBDMAGIC, IHAVEOPT, handshake flags (18 bytes). */
export function encodeGreeting(handshakeFlags: number): Uint8Array {
  return new Writer(18).u64(NBDMAGIC).u64(IHAVEOPT).u16(handshakeFlags).done();
}

/** A fixed-newstyle option reply: magic, option, reply type, length, data. */
export function encodeOptionReply(option: number, replyType: number, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  return new Writer(20 + data.length).u64(NBD_REP_MAGIC).u32(option).u32(replyType).u32(data.length).raw(data).done();
}

/** An error option reply carrying a human-readable message. */
export function encodeOptionError(option: number, replyType: number, message: string): Uint8Array {
  return encodeOptionReply(option, replyType, utf8(message, NBD_MAX_STRING));
}

/** The NBD_OPT_EXPORT_NAME answer: size, transmission flags, and 124 zeroes unless `noZeroes`. */
export function encodeExportNameReply(size: bigint, transmissionFlags: number, noZeroes: boolean): Uint8Array {
  const w = new Writer(10 + (noZeroes ? 0 : NBD_EXPORT_NAME_ZEROES)).u64(size).u16(transmissionFlags);
  if (!noZeroes) w.raw(new Uint8Array(NBD_EXPORT_NAME_ZEROES));
  return w.done();
}

/** NBD_REP_INFO payload for `info` (NBD_INFO_EXPORT, NAME, DESCRIPTION, BLOCK_SIZE). */
export function encodeInfo(info: InfoReply): Uint8Array {
  if ('unknown' in info) return new Writer(2 + info.unknown.length).u16(info.info).raw(info.unknown).done();
  switch (info.info) {
    case NBD_INFO_EXPORT:
      return new Writer(12).u16(NBD_INFO_EXPORT).u64(info.size).u16(info.transmissionFlags).done();
    case NBD_INFO_NAME: {
      const s = utf8(info.name, NBD_MAX_STRING);
      return new Writer(2 + s.length).u16(NBD_INFO_NAME).raw(s).done();
    }
    case NBD_INFO_DESCRIPTION: {
      const s = utf8(info.description, NBD_MAX_STRING);
      return new Writer(2 + s.length).u16(NBD_INFO_DESCRIPTION).raw(s).done();
    }
    case NBD_INFO_BLOCK_SIZE:
      return new Writer(14).u16(NBD_INFO_BLOCK_SIZE).u32(info.minimum).u32(info.preferred).u32(info.maximum).done();
  }
  throw new Error('unreachable');
}

/** Decodes an NBD_REP_INFO payload; undefined when its length does not fit its type. */
export function decodeInfo(data: Uint8Array): InfoReply | undefined {
  if (data.length < 2) return undefined;
  const v = view(data);
  const info = v.getUint16(0);
  const rest = data.subarray(2);
  switch (info) {
    case NBD_INFO_EXPORT:
      return data.length === 12 ? { info, size: v.getBigUint64(2), transmissionFlags: v.getUint16(10) } : undefined;
    case NBD_INFO_NAME: {
      const name = decodeUtf8(rest);
      return name === undefined ? undefined : { info, name };
    }
    case NBD_INFO_DESCRIPTION: {
      const description = decodeUtf8(rest);
      return description === undefined ? undefined : { info, description };
    }
    case NBD_INFO_BLOCK_SIZE:
      return data.length === 14
        ? { info, minimum: v.getUint32(2), preferred: v.getUint32(6), maximum: v.getUint32(10) }
        : undefined;
    default:
      return { info, unknown: rest.slice() };
  }
}

/** NBD_REP_SERVER payload: name length, name, then free text (the description). */
export function encodeServerEntry(entry: ServerEntry): Uint8Array {
  const name = utf8(entry.name, NBD_MAX_STRING);
  const description = utf8(entry.description, NBD_MAX_STRING);
  return new Writer(4 + name.length + description.length).u32(name.length).raw(name).raw(description).done();
}

export function decodeServerEntry(data: Uint8Array): ServerEntry | undefined {
  if (data.length < 4) return undefined;
  const n = view(data).getUint32(0);
  if (n > data.length - 4) return undefined;
  const name = decodeUtf8(data.subarray(4, 4 + n));
  const description = decodeUtf8(data.subarray(4 + n));
  return name === undefined || description === undefined ? undefined : { name, description };
}

// --- Server → client: transmission -------------------------------------------------------------

/** A simple reply header (16 bytes); a successful read's data follows it. */
export function encodeSimpleReply(error: number, handle: bigint): Uint8Array {
  return new Writer(16).u32(NBD_SIMPLE_REPLY_MAGIC).u32(error).u64(handle).done();
}

/** A structured reply chunk header (20 bytes); `length` payload bytes follow it. */
export function encodeStructuredHeader(flags: number, type: number, handle: bigint, length: number): Uint8Array {
  return new Writer(20).u32(NBD_STRUCTURED_REPLY_MAGIC).u16(flags).u16(type).u64(handle).u32(length).done();
}

/** Header and offset of an NBD_REPLY_TYPE_OFFSET_DATA chunk (28 bytes); `dataLength` bytes follow. */
export function encodeOffsetDataHeader(flags: number, handle: bigint, offset: bigint, dataLength: number): Uint8Array {
  return new Writer(28)
    .u32(NBD_STRUCTURED_REPLY_MAGIC).u16(flags).u16(NBD_REPLY_TYPE_OFFSET_DATA).u64(handle).u32(8 + dataLength)
    .u64(offset)
    .done();
}

/** The final NBD_REPLY_TYPE_NONE chunk. */
export function encodeStructuredNone(handle: bigint): Uint8Array {
  return encodeStructuredHeader(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, handle, 0);
}

/**
 * An error chunk: NBD_REPLY_TYPE_ERROR, or NBD_REPLY_TYPE_ERROR_OFFSET when `offset` is given.
 * Flags default to NBD_REPLY_FLAG_DONE (the error ends the reply).
 */
export function encodeStructuredError(handle: bigint, error: ErrorChunk, flags = NBD_REPLY_FLAG_DONE): Uint8Array {
  const message = utf8(error.message, NBD_MAX_STRING);
  const withOffset = error.offset !== undefined;
  const length = 6 + message.length + (withOffset ? 8 : 0);
  const w = new Writer(20 + length)
    .u32(NBD_STRUCTURED_REPLY_MAGIC).u16(flags).u16(withOffset ? NBD_REPLY_TYPE_ERROR_OFFSET : NBD_REPLY_TYPE_ERROR)
    .u64(handle).u32(length)
    .u32(error.error).u16(message.length).raw(message);
  if (withOffset) w.u64(error.offset!);
  return w.done();
}

/** Decodes an error chunk's payload; undefined when malformed. */
export function decodeErrorChunk(type: number, payload: Uint8Array): ErrorChunk | undefined {
  if (payload.length < 6) return undefined;
  const v = view(payload);
  const error = v.getUint32(0);
  const n = v.getUint16(4);
  const tail = type === NBD_REPLY_TYPE_ERROR_OFFSET ? 8 : 0;
  if (6 + n + tail > payload.length) return undefined;
  if (type === NBD_REPLY_TYPE_ERROR && 6 + n !== payload.length) return undefined;
  const message = decodeUtf8(payload.subarray(6, 6 + n));
  if (message === undefined) return undefined;
  return tail ? { error, message, offset: v.getBigUint64(6 + n) } : { error, message };
}

export function decodeOffsetData(payload: Uint8Array): OffsetDataChunk | undefined {
  if (payload.length < 9) return undefined;
  return { offset: view(payload).getBigUint64(0), data: payload.subarray(8) };
}

export function decodeOffsetHole(payload: Uint8Array): OffsetHoleChunk | undefined {
  if (payload.length !== 12) return undefined;
  const v = view(payload);
  return { offset: v.getBigUint64(0), length: v.getUint32(8) };
}

// --- Client → server ---------------------------------------------------------------------------

export function encodeClientFlags(flags: number): Uint8Array {
  return new Writer(4).u32(flags).done();
}

/** IHAVEOPT, option, length, data. */
export function encodeOption(option: number, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  return new Writer(16 + data.length).u64(IHAVEOPT).u32(option).u32(data.length).raw(data).done();
}

/** Data of NBD_OPT_INFO / NBD_OPT_GO. */
export function encodeInfoRequest(req: InfoRequest): Uint8Array {
  const name = utf8(req.name);
  const w = new Writer(4 + name.length + 2 + 2 * req.infos.length).u32(name.length).raw(name).u16(req.infos.length);
  for (const i of req.infos) w.u16(i);
  return w.done();
}

/** Decodes NBD_OPT_INFO / NBD_OPT_GO data; undefined when the lengths do not add up. */
export function decodeInfoRequest(data: Uint8Array): InfoRequest | undefined {
  if (data.length < 6) return undefined;
  const v = view(data);
  const n = v.getUint32(0);
  if (n > data.length - 6) return undefined;
  const count = v.getUint16(4 + n);
  if (data.length !== 6 + n + 2 * count) return undefined;
  const name = decodeUtf8(data.subarray(4, 4 + n));
  if (name === undefined) return undefined;
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(v.getUint16(6 + n + 2 * i));
  return { name, infos };
}

/** A request header (28 bytes), followed by `data` when given (NBD_CMD_WRITE). */
export function encodeRequest(req: Omit<RequestMessage, 'kind'>): Uint8Array {
  const data = req.data ?? new Uint8Array(0);
  return new Writer(28 + data.length)
    .u32(NBD_REQUEST_MAGIC).u16(req.flags).u16(req.command).u64(req.handle).u64(req.offset).u32(req.length)
    .raw(data)
    .done();
}

// --- Metadata contexts (NBD_OPT_LIST/SET_META_CONTEXT, NBD_CMD_BLOCK_STATUS) --------------------

/** The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: an export name and queries. */
export interface MetaContextRequest {
  name: string;
  queries: string[];
}

export function encodeMetaContextRequest(req: MetaContextRequest): Uint8Array {
  const name = utf8(req.name, NBD_MAX_STRING);
  const queries = req.queries.map((q) => utf8(q, NBD_MAX_STRING));
  const w = new Writer(8 + name.length + queries.reduce((n, q) => n + 4 + q.length, 0)).u32(name.length).raw(name).u32(queries.length);
  for (const q of queries) w.u32(q.length).raw(q);
  return w.done();
}

/** Decodes that data; undefined when the lengths do not add up or a string is not UTF-8. */
export function decodeMetaContextRequest(data: Uint8Array): MetaContextRequest | undefined {
  const v = view(data);
  const str = (at: number): [string, number] | undefined => {
    if (at + 4 > data.length) return undefined;
    const n = v.getUint32(at);
    if (n > NBD_MAX_STRING || at + 4 + n > data.length) return undefined;
    const s = decodeUtf8(data.subarray(at + 4, at + 4 + n));
    return s === undefined ? undefined : [s, at + 4 + n];
  };
  const name = str(0);
  if (name === undefined || name[1] + 4 > data.length) return undefined;
  const count = v.getUint32(name[1]);
  let at = name[1] + 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    const q = str(at);
    if (q === undefined) return undefined;
    queries.push(q[0]);
    at = q[1];
  }
  return at === data.length ? { name: name[0], queries } : undefined;
}

/** NBD_REP_META_CONTEXT's data: the context's ID and name. */
export function encodeMetaContext(id: number, name: string): Uint8Array {
  const n = utf8(name, NBD_MAX_STRING);
  return new Writer(4 + n.length).u32(id).raw(n).done();
}

export function decodeMetaContext(data: Uint8Array): { id: number; name: string } | undefined {
  if (data.length < 4) return undefined;
  const name = decodeUtf8(data.subarray(4));
  return name === undefined ? undefined : { id: view(data).getUint32(0), name };
}

/** A final NBD_REPLY_TYPE_BLOCK_STATUS chunk: the context ID, then (length, flags) per extent. */
export function encodeBlockStatus(handle: bigint, contextId: number, extents: readonly { length: number; flags: number }[]): Uint8Array {
  const length = 4 + 8 * extents.length;
  const w = new Writer(NBD_STRUCTURED_REPLY_HEADER_SIZE + length).raw(encodeStructuredHeader(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, handle, length))
    .u32(contextId);
  for (const e of extents) w.u32(e.length).u32(e.flags);
  return w.done();
}

export function decodeBlockStatus(payload: Uint8Array): { contextId: number; extents: { length: number; flags: number }[] } | undefined {
  if (payload.length < 4 || (payload.length - 4) % 8 !== 0) return undefined;
  const v = view(payload);
  const extents: { length: number; flags: number }[] = [];
  for (let at = 4; at < payload.length; at += 8) extents.push({ length: v.getUint32(at), flags: v.getUint32(at + 4) });
  return { contextId: v.getUint32(0), extents };
}
