// Constants of the xenstore wire protocol, named and valued as in Xen's
// public header xen/include/public/io/xs_wire.h (checked against the
// installed /usr/include/xen/io/xs_wire.h, Xen 4.17).

// enum xsd_sockmsg_type (xs_wire.h)
export const XS_CONTROL = 0;
export const XS_DEBUG = XS_CONTROL; // xs_wire.h: #define XS_DEBUG XS_CONTROL
export const XS_DIRECTORY = 1;
export const XS_READ = 2;
export const XS_GET_PERMS = 3;
export const XS_WATCH = 4;
export const XS_UNWATCH = 5;
export const XS_TRANSACTION_START = 6;
export const XS_TRANSACTION_END = 7;
export const XS_INTRODUCE = 8;
export const XS_RELEASE = 9;
export const XS_GET_DOMAIN_PATH = 10;
export const XS_WRITE = 11;
export const XS_MKDIR = 12;
export const XS_RM = 13;
export const XS_SET_PERMS = 14;
export const XS_WATCH_EVENT = 15;
export const XS_ERROR = 16;
export const XS_IS_DOMAIN_INTRODUCED = 17;
export const XS_RESUME = 18;
export const XS_SET_TARGET = 19;
// 20 was XS_RESTRICT, removed from xs_wire.h; the value stays unused.
export const XS_RESET_WATCHES = XS_SET_TARGET + 2;
export const XS_DIRECTORY_PART = 22;
export const XS_TYPE_COUNT = 23;
export const XS_INVALID = 0xffff;

// enum xs_watch_type: index of each string in an XS_WATCH_EVENT payload.
export const XS_WATCH_PATH = 0;
export const XS_WATCH_TOKEN = 1;

// Legacy write flags (xs_wire.h); not sent by modern clients.
export const XS_WRITE_NONE = 'NONE';
export const XS_WRITE_CREATE = 'CREATE';
export const XS_WRITE_CREATE_EXCL = 'CREATE|EXCL';

// xsd_errors[] in array order (xs_wire.h: "new errors should be added at the
// end"). Only the name travels on the wire; errno is the Linux value, which
// clients use when mapping the name back.
export const XSD_ERRORS = [
  { errnum: 22, errstring: 'EINVAL' },
  { errnum: 13, errstring: 'EACCES' },
  { errnum: 17, errstring: 'EEXIST' },
  { errnum: 21, errstring: 'EISDIR' },
  { errnum: 2, errstring: 'ENOENT' },
  { errnum: 12, errstring: 'ENOMEM' },
  { errnum: 28, errstring: 'ENOSPC' },
  { errnum: 5, errstring: 'EIO' },
  { errnum: 39, errstring: 'ENOTEMPTY' },
  { errnum: 38, errstring: 'ENOSYS' },
  { errnum: 30, errstring: 'EROFS' },
  { errnum: 16, errstring: 'EBUSY' },
  { errnum: 11, errstring: 'EAGAIN' },
  { errnum: 106, errstring: 'EISCONN' },
  { errnum: 7, errstring: 'E2BIG' },
  { errnum: 1, errstring: 'EPERM' },
] as const;

export type XsdErrorName = (typeof XSD_ERRORS)[number]['errstring'];

// oxenstored replies "EQUOTA" (not in xsd_errors[]) when a quota is hit;
// C clients map unknown names to EINVAL.
export const EQUOTA = 'EQUOTA';
export type XenstoreErrorName = XsdErrorName | typeof EQUOTA;

export const EINVAL: XsdErrorName = 'EINVAL';
export const EACCES: XsdErrorName = 'EACCES';
export const EEXIST: XsdErrorName = 'EEXIST';
export const EISDIR: XsdErrorName = 'EISDIR';
export const ENOENT: XsdErrorName = 'ENOENT';
export const ENOMEM: XsdErrorName = 'ENOMEM';
export const ENOSPC: XsdErrorName = 'ENOSPC';
export const EIO: XsdErrorName = 'EIO';
export const ENOTEMPTY: XsdErrorName = 'ENOTEMPTY';
export const ENOSYS: XsdErrorName = 'ENOSYS';
export const EROFS: XsdErrorName = 'EROFS';
export const EBUSY: XsdErrorName = 'EBUSY';
export const EAGAIN: XsdErrorName = 'EAGAIN';
export const EISCONN: XsdErrorName = 'EISCONN';
export const E2BIG: XsdErrorName = 'E2BIG';
export const EPERM: XsdErrorName = 'EPERM';

// struct xsd_sockmsg: four little-endian u32 (xs_wire.h; 16 bytes, align 4).
export const XSD_SOCKMSG_SIZE = 16;
export const XSD_SOCKMSG_TYPE_OFFSET = 0;
export const XSD_SOCKMSG_REQ_ID_OFFSET = 4;
export const XSD_SOCKMSG_TX_ID_OFFSET = 8;
export const XSD_SOCKMSG_LEN_OFFSET = 12;

// xs_wire.h: "Violating this is very bad" (the daemon drops the client).
export const XENSTORE_PAYLOAD_MAX = 4096;
// xs_wire.h: "Violating these just gets you an error back".
export const XENSTORE_ABS_PATH_MAX = 3072;
export const XENSTORE_REL_PATH_MAX = 2048;

// struct xenstore_domain_interface (xs_wire.h), offsets as measured by the
// compiler (xs_layout.m64.out; identical on -m32).
export const XENSTORE_RING_SIZE = 1024;
export const XENSTORE_DOMAIN_INTERFACE_SIZE = 2076;
export const XENSTORE_REQ_OFFSET = 0;
export const XENSTORE_RSP_OFFSET = 1024;
export const XENSTORE_REQ_CONS_OFFSET = 2048;
export const XENSTORE_REQ_PROD_OFFSET = 2052;
export const XENSTORE_RSP_CONS_OFFSET = 2056;
export const XENSTORE_RSP_PROD_OFFSET = 2060;
export const XENSTORE_SERVER_FEATURES_OFFSET = 2064;
export const XENSTORE_CONNECTION_OFFSET = 2068;
export const XENSTORE_ERROR_OFFSET = 2072;

export function MASK_XENSTORE_IDX(idx: number): number {
  return idx & (XENSTORE_RING_SIZE - 1);
}

export const XENSTORE_SERVER_FEATURE_RECONNECTION = 1;
export const XENSTORE_SERVER_FEATURE_ERROR = 2;

export const XENSTORE_CONNECTED = 0;
export const XENSTORE_RECONNECT = 1;

export const XENSTORE_ERROR_NONE = 0;
export const XENSTORE_ERROR_COMM = 1;
export const XENSTORE_ERROR_RINGIDX = 2;
export const XENSTORE_ERROR_PROTO = 3;

// xen/include/public/xen.h: DOMID_SELF, and the first reserved domid.
export const DOMID_SELF = 0x7ff0;
export const DOMID_FIRST_RESERVED = 0x7ff0;
