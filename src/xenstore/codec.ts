// Encoding and incremental decoding of struct xsd_sockmsg + payload
// (xs_wire.h). The same byte stream runs over the Unix socket and the
// shared-page rings.
import {
  XENSTORE_PAYLOAD_MAX,
  XSD_SOCKMSG_LEN_OFFSET,
  XSD_SOCKMSG_REQ_ID_OFFSET,
  XSD_SOCKMSG_SIZE,
  XSD_SOCKMSG_TX_ID_OFFSET,
  XSD_SOCKMSG_TYPE_OFFSET,
} from './wire.js';

export interface XsMessage {
  type: number;
  reqId: number;
  txId: number;
  payload: Uint8Array;
}

export interface XsHeader {
  type: number;
  reqId: number;
  txId: number;
  len: number;
}

const utf8 = new TextEncoder();
const utf8d = new TextDecoder();

export function encodeHeader(h: XsHeader): Uint8Array {
  const out = new Uint8Array(XSD_SOCKMSG_SIZE);
  const dv = new DataView(out.buffer);
  dv.setUint32(XSD_SOCKMSG_TYPE_OFFSET, h.type >>> 0, true);
  dv.setUint32(XSD_SOCKMSG_REQ_ID_OFFSET, h.reqId >>> 0, true);
  dv.setUint32(XSD_SOCKMSG_TX_ID_OFFSET, h.txId >>> 0, true);
  dv.setUint32(XSD_SOCKMSG_LEN_OFFSET, h.len >>> 0, true);
  return out;
}

export function decodeHeader(bytes: Uint8Array, offset = 0): XsHeader {
  if (bytes.length - offset < XSD_SOCKMSG_SIZE) throw new RangeError('short xsd_sockmsg');
  const dv = new DataView(bytes.buffer, bytes.byteOffset + offset, XSD_SOCKMSG_SIZE);
  return {
    type: dv.getUint32(XSD_SOCKMSG_TYPE_OFFSET, true),
    reqId: dv.getUint32(XSD_SOCKMSG_REQ_ID_OFFSET, true),
    txId: dv.getUint32(XSD_SOCKMSG_TX_ID_OFFSET, true),
    len: dv.getUint32(XSD_SOCKMSG_LEN_OFFSET, true),
  };
}

/** Header + payload. Refuses payloads the protocol forbids (xs_wire.h XENSTORE_PAYLOAD_MAX). */
export function encodeMessage(m: XsMessage): Uint8Array {
  if (m.payload.length > XENSTORE_PAYLOAD_MAX) {
    throw new RangeError(`payload ${m.payload.length} exceeds XENSTORE_PAYLOAD_MAX`);
  }
  const out = new Uint8Array(XSD_SOCKMSG_SIZE + m.payload.length);
  out.set(encodeHeader({ type: m.type, reqId: m.reqId, txId: m.txId, len: m.payload.length }), 0);
  out.set(m.payload, XSD_SOCKMSG_SIZE);
  return out;
}

/** Decodes exactly one complete message from `bytes` (tests, golden vectors). */
export function decodeMessage(bytes: Uint8Array): XsMessage {
  const h = decodeHeader(bytes);
  if (bytes.length !== XSD_SOCKMSG_SIZE + h.len) throw new RangeError('length mismatch');
  return { type: h.type, reqId: h.reqId, txId: h.txId, payload: new Uint8Array(bytes.subarray(XSD_SOCKMSG_SIZE)) };
}

/** Each string NUL-terminated, concatenated: the usual payload shape. */
export function joinStrings(strings: readonly (string | Uint8Array)[]): Uint8Array {
  const parts = strings.map((s) => (typeof s === 'string' ? utf8.encode(s) : s));
  const total = parts.reduce((n, p) => n + p.length + 1, 0);
  const out = new Uint8Array(total);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length + 1; // the NUL is already 0
  }
  return out;
}

/**
 * The NUL-terminated strings at the start of a payload, up to `max`
 * (xenstored's get_strings()): trailing bytes without a NUL are not a string.
 */
export function leadingStrings(payload: Uint8Array, max = Infinity): string[] {
  const out: string[] = [];
  let off = 0;
  while (out.length < max) {
    const nul = payload.indexOf(0, off);
    if (nul < 0) break;
    out.push(utf8d.decode(payload.subarray(off, nul)));
    off = nul + 1;
  }
  return out;
}

/** Number of NUL bytes (xenstore_count_strings()). */
export function countNuls(payload: Uint8Array): number {
  let n = 0;
  for (const b of payload) if (b === 0) n++;
  return n;
}

/** Strings of a reply such as XS_DIRECTORY: every one NUL-terminated. */
export function splitStrings(payload: Uint8Array): string[] {
  if (payload.length === 0) return [];
  const end = payload[payload.length - 1] === 0 ? payload.length - 1 : payload.length;
  return utf8d.decode(payload.subarray(0, end)).split('\0');
}

export function decodeText(payload: Uint8Array): string {
  return utf8d.decode(payload);
}

export function encodeText(s: string): Uint8Array {
  return utf8.encode(s);
}

export type ParseResult =
  | { kind: 'message'; message: XsMessage }
  | { kind: 'oversized'; header: XsHeader };

/**
 * Incremental parser for the byte stream. Never throws on input: a header
 * announcing more than XENSTORE_PAYLOAD_MAX yields 'oversized' and the parser
 * stops (xenstored treats it as a protocol violation and gives up on the
 * connection, xenstored_core.c handle_input()).
 */
export class MessageParser {
  private chunks: Uint8Array[] = [];
  private buffered = 0;
  private dead = false;

  push(chunk: Uint8Array): void {
    if (this.dead || chunk.length === 0) return;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
  }

  get pendingBytes(): number {
    return this.buffered;
  }

  next(): ParseResult | undefined {
    if (this.dead || this.buffered < XSD_SOCKMSG_SIZE) return undefined;
    const header = decodeHeader(this.peek(XSD_SOCKMSG_SIZE));
    if (header.len > XENSTORE_PAYLOAD_MAX) {
      this.dead = true;
      this.chunks = [];
      this.buffered = 0;
      return { kind: 'oversized', header };
    }
    if (this.buffered < XSD_SOCKMSG_SIZE + header.len) return undefined;
    const all = this.take(XSD_SOCKMSG_SIZE + header.len);
    return {
      kind: 'message',
      // Copy into a plain Uint8Array: socket chunks are Buffers whose slice() is a view.
      message: { type: header.type, reqId: header.reqId, txId: header.txId, payload: new Uint8Array(all.subarray(XSD_SOCKMSG_SIZE)) },
    };
  }

  private flatten(): Uint8Array {
    if (this.chunks.length === 1) return this.chunks[0]!;
    const out = new Uint8Array(this.buffered);
    let off = 0;
    for (const c of this.chunks) {
      out.set(c, off);
      off += c.length;
    }
    this.chunks = [out];
    return out;
  }

  private peek(n: number): Uint8Array {
    return this.flatten().subarray(0, n);
  }

  private take(n: number): Uint8Array {
    const flat = this.flatten();
    const head = flat.subarray(0, n);
    const rest = flat.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.buffered = rest.length;
    return head;
  }
}
