/**
 * Run inside the rig's dom0 (not a test file): each rule the checked hypervisor enforces
 * (docs/architecture.md "The checked hypervisor"), tried on the real Xen from dom0's userspace.
 * dom0 grants its own pages to itself through /dev/xen/gntalloc (xengntshr_*) and maps them
 * through /dev/xen/gntdev (xengnttab_*); grant copy (GNTTABOP_copy through gntdev) shows Xen's
 * own GNTST_* status where a map only shows gntdev's errno. A write that would fault is tried
 * twice: as read(2) from /dev/zero into the page (the kernel answers EFAULT: no crash), and in a
 * child python3 process doing a plain store, whose signal is recorded. Prints `RESULT rule NAME
 * OBSERVED...` lines for xen-rules.test.ts and docs/real-xen.md.
 */
import { spawnSync } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { GCS_DEST, GCS_FLAGS, GCS_LEN, GCS_SOURCE, GCS_STATUS, GRANT_COPY_SEGMENT_SIZE, MAP_ANONYMOUS, MAP_PRIVATE, native, PROT_READ, PROT_WRITE, type Pointer } from '../../src/xen/real/native.js';
import { GNTCOPY_dest_gref, GNTCOPY_source_gref } from '../../src/xen/constants.js';

const n = native();
const k = n.koffi;
const libc = k.load('libc.so.6');
const cRead = libc.func('intptr_t read(int fd, void *buf, size_t count)') as (...a: unknown[]) => number;
const out = (...v: (string | number)[]) => process.stdout.write(`RESULT rule ${v.join(' ')}\n`);
const err = () => `errno=${k.errno()}`;
const PAGE = 4096;
const SELF = 0;

const xgs = n.gntshrOpen(null, 0) as Pointer;
const xgt = n.gnttabOpen(null, 0) as Pointer;
const xce = n.evtchnOpen(null, 0) as Pointer;
const zero = openSync('/dev/zero', 'r');
const local = n.mmap(null, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) as Pointer;
const localAddr = k.address(local);

/** One page shared with ourselves: its ref and address. */
function share(writable: boolean): { ref: number; p: Pointer } {
  const refs = new Uint32Array(1);
  const p = n.gntshrSharePages(xgs, SELF, 1, refs, writable ? 1 : 0) as Pointer | null;
  if (p === null) throw new Error(`xengntshr_share_pages: ${err()}`);
  return { ref: refs[0]!, p };
}

/** GNTTABOP_copy of one page between a grant of ours and our local page; Xen's GNTST_*. */
function copy(ref: number, fromGrant: boolean, domid = SELF): number {
  const segs = Buffer.alloc(GRANT_COPY_SEGMENT_SIZE);
  const foreign = fromGrant ? GCS_SOURCE : GCS_DEST;
  segs.writeUInt32LE(ref, foreign);
  segs.writeUInt16LE(0, foreign + 4);
  segs.writeUInt16LE(domid, foreign + 6);
  segs.writeBigUInt64LE(localAddr, fromGrant ? GCS_DEST : GCS_SOURCE);
  segs.writeUInt16LE(PAGE, GCS_LEN);
  segs.writeUInt16LE(fromGrant ? GNTCOPY_source_gref : GNTCOPY_dest_gref, GCS_FLAGS);
  const rc = n.gnttabGrantCopy(xgt, 1, segs) as number;
  return rc !== 0 ? 1000 + k.errno() : segs.readInt16LE(GCS_STATUS);
}

function map(ref: number, writable: boolean): Pointer | null {
  return n.gnttabMapGrantRef(xgt, SELF, ref, PROT_READ | (writable ? PROT_WRITE : 0)) as Pointer | null;
}

/** A write into `p` by the kernel (read(2) from /dev/zero): 'ok' or its errno. */
function kernelWrite(p: Pointer): string {
  const r = cRead(zero, p, 16);
  return r === 16 ? 'ok' : err();
}

/** A plain store into grant `ref` mapped with `prot` by a child python3 (after unmapping it first if `unmapFirst`). */
function childStore(ref: number, writable: boolean, unmapFirst: boolean): string {
  const py = `
import ctypes, sys
g = ctypes.CDLL('libxengnttab.so.1', use_errno=True)
g.xengnttab_open.restype = ctypes.c_void_p
g.xengnttab_map_grant_ref.restype = ctypes.c_void_p
g.xengnttab_map_grant_ref.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int]
g.xengnttab_unmap.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32]
h = g.xengnttab_open(None, 0)
p = g.xengnttab_map_grant_ref(h, 0, ${ref}, ${writable ? 3 : 1})
if not p: print('map-failed', ctypes.get_errno()); sys.exit(3)
${unmapFirst ? 'g.xengnttab_unmap(h, p, 1)' : ''}
sys.stdout.flush()
ctypes.memset(p, 0x5a, 1)
print('stored'); sys.exit(0)
`;
  const r = spawnSync('python3', ['-c', py], { encoding: 'utf8', timeout: 60_000 });
  if (r.error !== undefined) return `spawn-error:${r.error.message.replace(/\s+/g, '_')}`;
  return r.signal !== null ? `signal=${r.signal}` : `exit=${r.status}:${(r.stdout ?? '').trim().replace(/\s+/g, '_')}`;
}

function probe(name: string, f: () => (string | number)[]): void {
  try {
    out(name, ...f());
  } catch (e) {
    out(name, 'probe-error', String((e as Error).message).replace(/\s+/g, '_'));
  }
}

// ended-grant-mapped / ended-grant-copied: a grant we ended (gntalloc ends it at unshare).
probe('ended-grant', () => {
  const g = share(true);
  const before = copy(g.ref, true);
  n.gntshrUnshare(xgs, g.p, 1);
  const m = map(g.ref, false);
  const mapped = m === null ? `map-failed:${err()}` : 'map-ok';
  if (m !== null) n.gnttabUnmap(xgt, m, 1);
  return [`copy-before=${before}`, mapped, `copy=${copy(g.ref, true)}`];
});

// A reference past the grant table's end, and one naming no domain.
probe('bad-ref', () => {
  const m = map(0x7ffffff, false);
  if (m !== null) n.gnttabUnmap(xgt, m, 1);
  return [m === null ? `map-failed:${err()}` : 'map-ok', `copy=${copy(0x7ffffff, true)}`];
});
probe('bad-domain', () => [`copy=${copy(1, true, 0x7f00)}`]);

// unowned-frame-mapped is not tried: a grant entry naming a frame its granter does not own
// cannot be made from userspace (gntalloc fills the entry with its own page's frame).

// readonly-mapping-written: a read-only grant, mapped writable, copied into, written through.
probe('readonly', () => {
  const g = share(false);
  const w = map(g.ref, true);
  const mapW = w === null ? `map-rw-failed:${err()}` : 'map-rw-ok';
  if (w !== null) n.gnttabUnmap(xgt, w, 1);
  const r = map(g.ref, false);
  if (r === null) return [mapW, `map-ro-failed:${err()}`];
  const kw = kernelWrite(r);
  n.gnttabUnmap(xgt, r, 1);
  const copyIn = copy(g.ref, false);
  const child = childStore(g.ref, false, false);
  n.gntshrUnshare(xgs, g.p, 1);
  return [mapW, 'map-ro-ok', `kernel-write=${kw}`, `copy-into=${copyIn}`, `child-store=${child}`];
});

// written-after-unmap: the address of an unmapped grant.
probe('after-unmap', () => {
  const g = share(true);
  const m = map(g.ref, true);
  if (m === null) return [`map-failed:${err()}`];
  n.gnttabUnmap(xgt, m, 1);
  const kw = kernelWrite(m);
  const again = n.gnttabUnmap(xgt, m, 1) as number;
  const child = childStore(g.ref, true, true);
  n.gntshrUnshare(xgs, g.p, 1);
  return [`kernel-write=${kw}`, `unmap-again=${again === 0 ? 'ok' : err()}`, `child-store=${child}`];
});

// granted-frame-freed: the granter lets its page go while the grantee maps it.
probe('freed-while-mapped', () => {
  const g = share(true);
  new Uint8Array(k.view(g.p, PAGE)).fill(0xa5);
  const m = map(g.ref, true);
  if (m === null) return [`map-failed:${err()}`];
  n.gntshrUnshare(xgs, g.p, 1);
  const view = new Uint8Array(k.view(m, PAGE));
  const still = view[0] === 0xa5 && view[PAGE - 1] === 0xa5 ? 'page-kept' : 'page-changed';
  view[0] = 1; // no fault: the frame stays the grantee's to use
  const again = map(g.ref, false);
  const remap = again === null ? `remap-failed:${err()}` : 'remap-ok';
  if (again !== null) n.gnttabUnmap(xgt, again, 1);
  n.gnttabUnmap(xgt, m, 1);
  // gntalloc ends a grant still mapped at unshare later (Linux's deferred end, retried each
  // second). Whether it had within 10 s of the unmap varied between runs (at once in one, not
  // within 60 s in two on a busy machine): reported, not asserted (blkfront-on-linux.test.ts).
  const t0 = Date.now();
  let ended = false;
  while (!ended && Date.now() - t0 < 10_000) {
    spawnSync('sleep', ['2']);
    const after = map(g.ref, false);
    if (after === null) ended = true;
    else n.gnttabUnmap(xgt, after, 1);
  }
  return [still, 'write-ok', remap, ended ? 'ended-after-unmap' : 'still-granted-10s-after-unmap'];
});

// Event channels: notify and close on a closed port, a bind to a port not offered to us.
probe('evtchn', () => {
  const remote = n.evtchnBindUnboundPort(xce, SELF) as number;
  const localPort = n.evtchnBindInterdomain(xce, SELF, remote) as number;
  const ok = n.evtchnNotify(xce, localPort) as number;
  n.evtchnUnbind(xce, localPort);
  const notifyClosed = n.evtchnNotify(xce, localPort) === 0 ? 'ok' : err();
  const closeClosed = n.evtchnUnbind(xce, localPort) === 0 ? 'ok' : err();
  // The other end of a channel whose peer closed is unbound again (Xen: ECS_UNBOUND): a new bind takes it.
  const rebound = n.evtchnBindInterdomain(xce, SELF, remote) as number;
  const rebind = rebound >= 0 ? 'ok' : err();
  if (rebound >= 0) n.evtchnUnbind(xce, rebound);
  n.evtchnUnbind(xce, remote);
  const bindClosed = n.evtchnBindInterdomain(xce, SELF, remote) as number;
  const bindBad = bindClosed >= 0 ? 'ok' : err();
  if (bindClosed >= 0) n.evtchnUnbind(xce, bindClosed);
  const noDom = n.evtchnBindUnboundPort(xce, 0x7f00) as number;
  if (noDom >= 0) n.evtchnUnbind(xce, noDom);
  return [`notify-open=${ok === 0 ? 'ok' : err()}`, `notify-closed=${notifyClosed}`, `close-closed=${closeClosed}`, `rebind-after-peer-close=${rebind}`, `bind-closed-port=${bindBad}`, `alloc-unbound-no-domain=${noDom >= 0 ? 'ok' : err()}`];
});

closeSync(zero);
n.evtchnClose(xce);
n.gnttabClose(xgt);
n.gntshrClose(xgs);
out('done');
