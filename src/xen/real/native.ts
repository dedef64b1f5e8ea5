/**
 * Xen's own userspace libraries, called through koffi (docs/decisions.md: "Real Xen through
 * koffi and Xen's libraries"): libxengnttab (/dev/xen/gntdev: map, unmap and copy other
 * domains' grants; its xengntshr_* half shares our own pages through /dev/xen/gntalloc), libxenevtchn (/dev/xen/evtchn) and libc's mmap for our own pages. Loaded
 * only when a real Xen is asked for: where koffi or the libraries are missing, nothing else in
 * blkif notices, and the error names what to install.
 */
import { createRequire } from 'node:module';

// A C function as koffi binds it: a call with any arguments.
type Fn = (...args: unknown[]) => unknown;
/**
 * The part of koffi's API used here, declared here so that blkif builds where koffi (an
 * optional dependency) is not installed.
 */
interface Koffi {
  load(path: string): { func(declaration: string): Fn };
  /** An ArrayBuffer over `len` bytes at a C pointer, without a copy. */
  view(ptr: unknown, len: number): ArrayBuffer;
  address(ptr: unknown): bigint;
  errno(): number;
}
/** An opaque C pointer as koffi hands it back (null for NULL). */
export type Pointer = object;

export interface Native {
  readonly koffi: Koffi;
  // libxengnttab (xengnttab.h)
  readonly gnttabOpen: Fn;
  readonly gnttabClose: Fn;
  readonly gnttabSetMaxGrants: Fn;
  readonly gnttabMapGrantRef: Fn;
  readonly gnttabUnmap: Fn;
  readonly gnttabGrantCopy: Fn;
  // libxengnttab's granting half (xengntshr_*, over /dev/xen/gntalloc)
  readonly gntshrOpen: Fn;
  readonly gntshrClose: Fn;
  readonly gntshrSharePages: Fn;
  readonly gntshrUnshare: Fn;
  // libxenevtchn (xenevtchn.h)
  readonly evtchnOpen: Fn;
  readonly evtchnClose: Fn;
  readonly evtchnFd: Fn;
  readonly evtchnBindInterdomain: Fn;
  readonly evtchnBindUnboundPort: Fn;
  readonly evtchnNotify: Fn;
  readonly evtchnUnbind: Fn;
  readonly evtchnUnmask: Fn;
  // libc
  readonly mmap: Fn;
  readonly munmap: Fn;
}

let loaded: Native | undefined;

/** The libraries, loaded on first use; throws one line naming what is missing. */
export function native(): Native {
  if (loaded !== undefined) return loaded;
  let koffi: Koffi;
  try {
    koffi = createRequire(import.meta.url)('koffi') as Koffi;
  } catch (e) {
    throw new Error(`real Xen needs the koffi package (an optional dependency of blkif; npm install koffi): ${(e as Error).message}`);
  }
  const lib = (name: string, pkg: string) => {
    try {
      return koffi.load(name);
    } catch (e) {
      throw new Error(`real Xen needs ${name} (Debian package ${pkg}): ${(e as Error).message}`);
    }
  };
  const gnttab = lib('libxengnttab.so.1', 'libxengnttab1');
  const evtchn = lib('libxenevtchn.so.1', 'libxenevtchn1');
  const libc = lib('libc.so.6', 'libc6');
  loaded = {
    koffi,
    gnttabOpen: gnttab.func('void *xengnttab_open(void *logger, unsigned int flags)'),
    gnttabClose: gnttab.func('int xengnttab_close(void *xgt)'),
    gnttabSetMaxGrants: gnttab.func('int xengnttab_set_max_grants(void *xgt, uint32_t nr_grants)'),
    gnttabMapGrantRef: gnttab.func('void *xengnttab_map_grant_ref(void *xgt, uint32_t domid, uint32_t ref, int prot)'),
    gnttabUnmap: gnttab.func('int xengnttab_unmap(void *xgt, void *start_address, uint32_t count)'),
    // The segments are laid out by hand in a Buffer (grantCopySegments below).
    gnttabGrantCopy: gnttab.func('int xengnttab_grant_copy(void *xgt, uint32_t count, _Inout_ uint8_t *segs)'),
    gntshrOpen: gnttab.func('void *xengntshr_open(void *logger, unsigned int flags)'),
    gntshrClose: gnttab.func('int xengntshr_close(void *xgs)'),
    gntshrSharePages: gnttab.func('void *xengntshr_share_pages(void *xgs, uint32_t domid, int count, _Out_ uint32_t *refs, int writable)'),
    gntshrUnshare: gnttab.func('int xengntshr_unshare(void *xgs, void *start_address, uint32_t count)'),
    evtchnOpen: evtchn.func('void *xenevtchn_open(void *logger, unsigned int flags)'),
    evtchnClose: evtchn.func('int xenevtchn_close(void *xce)'),
    evtchnFd: evtchn.func('int xenevtchn_fd(void *xce)'),
    evtchnBindInterdomain: evtchn.func('int xenevtchn_bind_interdomain(void *xce, uint32_t domid, uint32_t remote_port)'),
    evtchnBindUnboundPort: evtchn.func('int xenevtchn_bind_unbound_port(void *xce, uint32_t domid)'),
    evtchnNotify: evtchn.func('int xenevtchn_notify(void *xce, uint32_t port)'),
    evtchnUnbind: evtchn.func('int xenevtchn_unbind(void *xce, uint32_t port)'),
    evtchnUnmask: evtchn.func('int xenevtchn_unmask(void *xce, uint32_t port)'),
    mmap: libc.func('void *mmap(void *addr, size_t length, int prot, int flags, int fd, intptr_t offset)'),
    munmap: libc.func('int munmap(void *addr, size_t length)'),
  } as Native;
  return loaded;
}

/** The C errno of the last call on this thread. */
export function errno(): number {
  return native().koffi.errno();
}

// <sys/mman.h> on Linux.
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_PRIVATE = 0x02;
export const MAP_ANONYMOUS = 0x20;
export const MAP_FAILED = -1n;

/**
 * struct xengnttab_grant_copy_segment (xengnttab.h), x86_64: two 8-byte unions (a foreign
 * {uint32 ref; uint16 offset; uint16 domid} or a `void *virt`), uint16 len, uint16 flags,
 * int16 status, padded to 24 bytes.
 */
export const GRANT_COPY_SEGMENT_SIZE = 24;
export const GCS_SOURCE = 0;
export const GCS_DEST = 8;
export const GCS_LEN = 16;
export const GCS_FLAGS = 18;
export const GCS_STATUS = 20;
