/**
 * The messages of the NBD wire protocol as plain objects: what the parsers produce and the
 * serializers consume. 64-bit fields (handles, offsets, sizes) are bigints so that every value on
 * the wire round-trips exactly; the server converts offsets to numbers once it has checked them
 * against the export size.
 */

// --- Client → server ---------------------------------------------------------------------------

/** The 32-bit client flags that answer the server's greeting. */
export interface ClientFlagsMessage {
  readonly kind: 'clientFlags';
  readonly flags: number;
}

/** One option during option haggling (IHAVEOPT, option, length, data). */
export interface OptionMessage {
  readonly kind: 'option';
  readonly option: number;
  readonly data: Uint8Array;
}

/** One transmission-phase request; `data` is present exactly for NBD_CMD_WRITE. */
export interface RequestMessage {
  readonly kind: 'request';
  readonly flags: number;
  readonly command: number;
  readonly handle: bigint;
  readonly offset: bigint;
  readonly length: number;
  readonly data?: Uint8Array;
}

export type ClientMessage = ClientFlagsMessage | OptionMessage | RequestMessage;

// --- Server → client ---------------------------------------------------------------------------

/** NBDMAGIC, IHAVEOPT, 16-bit handshake flags. */
export interface GreetingMessage {
  readonly kind: 'greeting';
  readonly handshakeFlags: number;
}

/** A fixed-newstyle option reply. */
export interface OptionReplyMessage {
  readonly kind: 'optionReply';
  readonly option: number;
  readonly replyType: number;
  readonly data: Uint8Array;
}

/** The answer to NBD_OPT_EXPORT_NAME: export size and transmission flags (then maybe 124 zeroes). */
export interface ExportNameReplyMessage {
  readonly kind: 'exportNameReply';
  readonly size: bigint;
  readonly transmissionFlags: number;
}

/** A simple reply; `data` follows only for a successful NBD_CMD_READ. */
export interface SimpleReplyMessage {
  readonly kind: 'simpleReply';
  readonly error: number;
  readonly handle: bigint;
  readonly data?: Uint8Array;
}

/** One structured reply chunk. */
export interface StructuredChunkMessage {
  readonly kind: 'structuredChunk';
  readonly flags: number;
  readonly type: number;
  readonly handle: bigint;
  readonly payload: Uint8Array;
}

export type ServerMessage =
  | GreetingMessage
  | OptionReplyMessage
  | ExportNameReplyMessage
  | SimpleReplyMessage
  | StructuredChunkMessage;

// --- Option and reply payloads -----------------------------------------------------------------

/** Data of NBD_OPT_INFO and NBD_OPT_GO: export name, then the NBD_INFO_* types the client wants. */
export interface InfoRequest {
  readonly name: string;
  readonly infos: readonly number[];
}

/** One NBD_REP_INFO payload. */
export type InfoReply =
  | { readonly info: 0; readonly size: bigint; readonly transmissionFlags: number } // NBD_INFO_EXPORT
  | { readonly info: 1; readonly name: string } // NBD_INFO_NAME
  | { readonly info: 2; readonly description: string } // NBD_INFO_DESCRIPTION
  | { readonly info: 3; readonly minimum: number; readonly preferred: number; readonly maximum: number } // NBD_INFO_BLOCK_SIZE
  | { readonly info: number; readonly unknown: Uint8Array };

/** One NBD_REP_SERVER payload (an NBD_OPT_LIST entry). */
export interface ServerEntry {
  readonly name: string;
  /** The free text after the name ('' when absent). */
  readonly description: string;
}

/** Payload of an error chunk (NBD_REPLY_TYPE_ERROR, or NBD_REPLY_TYPE_ERROR_OFFSET with `offset`). */
export interface ErrorChunk {
  readonly error: number;
  readonly message: string;
  readonly offset?: bigint;
}

/** Payload of NBD_REPLY_TYPE_OFFSET_DATA. */
export interface OffsetDataChunk {
  readonly offset: bigint;
  readonly data: Uint8Array;
}

/** Payload of NBD_REPLY_TYPE_OFFSET_HOLE. */
export interface OffsetHoleChunk {
  readonly offset: bigint;
  readonly length: number;
}

/** A violation of the protocol by the peer: the connection cannot continue. */
export class NbdProtocolError extends Error {
  override name = 'NbdProtocolError';
}
