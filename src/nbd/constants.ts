/**
 * NBD protocol constants, named as the protocol document names them
 * (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md). Every multi-byte field on
 * the wire is big-endian. 64-bit magics are bigints; everything else fits a number.
 */

// --- Magic numbers -----------------------------------------------------------------------------

/** 'NBDMAGIC': the first 8 bytes a server sends (the INIT_PASSWD). */
export const NBDMAGIC = 0x4e42444d41474943n;
/** 'IHAVEOPT': the newstyle greeting's second magic, and the prefix of every client option. */
export const IHAVEOPT = 0x49484156454f5054n;
/** The oldstyle greeting's second magic (cliserv_magic); oldstyle is not served here. */
export const NBD_CLISERV_MAGIC = 0x00420281861253n;
/** Prefix of every fixed-newstyle option reply. */
export const NBD_REP_MAGIC = 0x3e889045565a9n;
/** Alias of NBD_REP_MAGIC, under the name some implementations use. */
export const NBD_OPT_REPLY_MAGIC = NBD_REP_MAGIC;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
/** Former name of NBD_SIMPLE_REPLY_MAGIC. */
export const NBD_REPLY_MAGIC = NBD_SIMPLE_REPLY_MAGIC;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
/** Extended headers (64-bit lengths): recognised so they can be refused; not negotiated here. */
export const NBD_EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const NBD_EXTENDED_REPLY_MAGIC = 0x6e8a278c;

// --- Handshake flags (16 bits, server → client) ------------------------------------------------

export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;

// --- Client flags (32 bits, client → server) ---------------------------------------------------

export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// --- Transmission flags (16 bits) --------------------------------------------------------------

export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;
export const NBD_FLAG_BLOCK_STAT_PAYLOAD = 1 << 12;

// --- Options -----------------------------------------------------------------------------------

export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
/** Withdrawn; never used. */
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

// --- Option reply types ------------------------------------------------------------------------

export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
/** Bit 31: set in every error reply type. */
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1;
export const NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2;
export const NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3;
export const NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4;
export const NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5;
export const NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6;
export const NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8;
export const NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9;
export const NBD_REP_ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR + 10;

/** Whether an option reply type is an error (bit 31 set). */
export function isOptionReplyError(replyType: number): boolean {
  return (replyType & NBD_REP_FLAG_ERROR) !== 0;
}

// --- NBD_REP_INFO information types (NBD_OPT_INFO / NBD_OPT_GO) ---------------------------------

export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// --- Commands ----------------------------------------------------------------------------------

export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;
export const NBD_CMD_RESIZE = 8;

// --- Command flags (16 bits) -------------------------------------------------------------------

export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;
export const NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5;

// --- Structured replies ------------------------------------------------------------------------

export const NBD_REPLY_FLAG_DONE = 1 << 0;

export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6;
/** Bit 15: set in every error chunk type. */
export const NBD_REPLY_TYPE_ERROR_BIT = 1 << 15;
export const NBD_REPLY_TYPE_ERROR = NBD_REPLY_TYPE_ERROR_BIT + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = NBD_REPLY_TYPE_ERROR_BIT + 2;

/** Whether a structured reply chunk type is an error chunk (bit 15 set). */
export function isReplyTypeError(type: number): boolean {
  return (type & NBD_REPLY_TYPE_ERROR_BIT) !== 0;
}

// --- Metadata contexts ---------------------------------------------------------------------------

/** The one context the spec defines: allocation and zeroes. */
export const NBD_META_BASE_ALLOCATION = 'base:allocation';
/** base:allocation flags of an extent. */
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;
/** Most extents one block status reply carries (a client asks again for the rest). */
export const MAX_EXTENTS_PER_REPLY = 1024;

// --- Error values (the reply's error field) ----------------------------------------------------

export const NBD_SUCCESS = 0;
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** The error values a server may put on the wire. */
export const NBD_ERRNOS: ReadonlySet<number> = new Set([
  NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN,
]);

// --- Sizes -------------------------------------------------------------------------------------

/** Server greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags. */
export const NBD_GREETING_SIZE = 18;
/** Option header: IHAVEOPT, 32-bit option, 32-bit length. */
export const NBD_OPTION_HEADER_SIZE = 16;
/** Option reply header: magic, option, reply type, length. */
export const NBD_OPTION_REPLY_HEADER_SIZE = 20;
/** Request header: magic, flags, type, handle, offset, length. */
export const NBD_REQUEST_SIZE = 28;
/** Simple reply header: magic, error, handle. */
export const NBD_SIMPLE_REPLY_SIZE = 16;
/** Structured reply chunk header: magic, flags, type, handle, length. */
export const NBD_STRUCTURED_REPLY_HEADER_SIZE = 20;
/** Reserved zeroes after the NBD_OPT_EXPORT_NAME reply unless NBD_FLAG_C_NO_ZEROES. */
export const NBD_EXPORT_NAME_ZEROES = 124;
/** Longest string (export name, description, message) the protocol allows. */
export const NBD_MAX_STRING = 4096;

/** Default cap on one option's data. */
export const DEFAULT_MAX_OPTION_LENGTH = 64 * 1024;
/** Default cap on the options of one connection before it chooses an export, with no export. */
export const DEFAULT_MAX_OPTIONS = 128;
/** What each export adds to that cap: a client listing the exports asks about each of them. */
export const OPTIONS_PER_EXPORT = 4;
/** Default cap on connections served at once (qemu 9.1's NBD server caps at 100 since CVE-2024-7409). */
export const DEFAULT_MAX_CONNECTIONS = 100;
/**
 * Connections past the cap being told why (NBD_REP_ERR_POLICY to their options) at once; a newer
 * one closes the oldest.
 */
export const REFUSED_CONNECTIONS = 16;
/** Default time a client has to choose an export (qemu-nbd 9.1's --handshake-limit: 10 s). */
export const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000;
/** Default cap on one request's payload (NBD_CMD_WRITE) and on NBD_CMD_READ lengths: 32 MiB. */
export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;

// --- Names, for logs and stats -----------------------------------------------------------------

const names = (entries: [number, string][]): ReadonlyMap<number, string> => new Map(entries);

export const OPTION_NAMES = names([
  [NBD_OPT_EXPORT_NAME, 'NBD_OPT_EXPORT_NAME'], [NBD_OPT_ABORT, 'NBD_OPT_ABORT'], [NBD_OPT_LIST, 'NBD_OPT_LIST'],
  [NBD_OPT_PEEK_EXPORT, 'NBD_OPT_PEEK_EXPORT'], [NBD_OPT_STARTTLS, 'NBD_OPT_STARTTLS'], [NBD_OPT_INFO, 'NBD_OPT_INFO'],
  [NBD_OPT_GO, 'NBD_OPT_GO'], [NBD_OPT_STRUCTURED_REPLY, 'NBD_OPT_STRUCTURED_REPLY'],
  [NBD_OPT_LIST_META_CONTEXT, 'NBD_OPT_LIST_META_CONTEXT'], [NBD_OPT_SET_META_CONTEXT, 'NBD_OPT_SET_META_CONTEXT'],
  [NBD_OPT_EXTENDED_HEADERS, 'NBD_OPT_EXTENDED_HEADERS'],
]);

export const COMMAND_NAMES = names([
  [NBD_CMD_READ, 'NBD_CMD_READ'], [NBD_CMD_WRITE, 'NBD_CMD_WRITE'], [NBD_CMD_DISC, 'NBD_CMD_DISC'],
  [NBD_CMD_FLUSH, 'NBD_CMD_FLUSH'], [NBD_CMD_TRIM, 'NBD_CMD_TRIM'], [NBD_CMD_CACHE, 'NBD_CMD_CACHE'],
  [NBD_CMD_WRITE_ZEROES, 'NBD_CMD_WRITE_ZEROES'], [NBD_CMD_BLOCK_STATUS, 'NBD_CMD_BLOCK_STATUS'],
  [NBD_CMD_RESIZE, 'NBD_CMD_RESIZE'],
]);

export const REPLY_NAMES = names([
  [NBD_REP_ACK, 'NBD_REP_ACK'], [NBD_REP_SERVER, 'NBD_REP_SERVER'], [NBD_REP_INFO, 'NBD_REP_INFO'],
  [NBD_REP_META_CONTEXT, 'NBD_REP_META_CONTEXT'], [NBD_REP_ERR_UNSUP, 'NBD_REP_ERR_UNSUP'],
  [NBD_REP_ERR_POLICY, 'NBD_REP_ERR_POLICY'], [NBD_REP_ERR_INVALID, 'NBD_REP_ERR_INVALID'],
  [NBD_REP_ERR_PLATFORM, 'NBD_REP_ERR_PLATFORM'], [NBD_REP_ERR_TLS_REQD, 'NBD_REP_ERR_TLS_REQD'],
  [NBD_REP_ERR_UNKNOWN, 'NBD_REP_ERR_UNKNOWN'], [NBD_REP_ERR_SHUTDOWN, 'NBD_REP_ERR_SHUTDOWN'],
  [NBD_REP_ERR_BLOCK_SIZE_REQD, 'NBD_REP_ERR_BLOCK_SIZE_REQD'], [NBD_REP_ERR_TOO_BIG, 'NBD_REP_ERR_TOO_BIG'],
  [NBD_REP_ERR_EXT_HEADER_REQD, 'NBD_REP_ERR_EXT_HEADER_REQD'],
]);

export const ERRNO_NAMES = names([
  [NBD_SUCCESS, 'OK'], [NBD_EPERM, 'NBD_EPERM'], [NBD_EIO, 'NBD_EIO'], [NBD_ENOMEM, 'NBD_ENOMEM'],
  [NBD_EINVAL, 'NBD_EINVAL'], [NBD_ENOSPC, 'NBD_ENOSPC'], [NBD_EOVERFLOW, 'NBD_EOVERFLOW'],
  [NBD_ENOTSUP, 'NBD_ENOTSUP'], [NBD_ESHUTDOWN, 'NBD_ESHUTDOWN'],
]);

/** `NBD_OPT_GO`, or `option 42` for one without a name. */
export function optionName(option: number): string {
  return OPTION_NAMES.get(option) ?? `option ${option}`;
}
export function commandName(command: number): string {
  return COMMAND_NAMES.get(command) ?? `command ${command}`;
}
export function replyName(replyType: number): string {
  return REPLY_NAMES.get(replyType) ?? `reply 0x${replyType.toString(16)}`;
}
export function errnoName(errno: number): string {
  return ERRNO_NAMES.get(errno) ?? `errno ${errno}`;
}
