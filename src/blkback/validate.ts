/**
 * Checks a request copied out of the ring against what this VBD negotiated, before any grant is
 * mapped or byte moved (Linux blkback `dispatch_rw_block_io`, `xen_vbd_translate`,
 * `dispatch_discard_io`). Pure: the data path acts on the verdict. Sector quantities are 512-byte
 * units whatever `sector-size` is (decisions.md: sector units); every request must be aligned to `sector-size`.
 */
import {
  BLKIF_DISCARD_SECURE,
  BLKIF_OP_DISCARD,
  BLKIF_OP_FLUSH_DISKCACHE,
  BLKIF_OP_INDIRECT,
  BLKIF_OP_READ,
  BLKIF_OP_WRITE,
  BLKIF_OP_WRITE_BARRIER,
  BLKIF_RSP_EOPNOTSUPP,
  BLKIF_RSP_ERROR,
  SECTOR_SHIFT,
  segmentProblem,
  type BlkifRequest,
  type BlkifSegment,
} from '../abi/index.js';

/** What the VBD offers, as negotiated (features advertised, size, mode). */
export interface VbdLimits {
  /** Disk size in 512-byte sectors. */
  readonly sectors: number;
  /** Logical sector size in bytes (512 or 4096): requests must be aligned to it. */
  readonly sectorSize: number;
  readonly readOnly: boolean;
  readonly flush: boolean;
  readonly barrier: boolean;
  readonly discard: boolean;
  readonly discardSecure: boolean;
}

export type RequestKind = 'read' | 'write' | 'flush' | 'barrier' | 'discard';

/** A request after the copy: ABI-agnostic, everything later in the pipeline reads only this. */
export interface BackendRequest {
  kind: RequestKind;
  id: bigint;
  /** The operation the response echoes (indirect_op for an indirect request). */
  operation: number;
  /** Start on disk in 512-byte sectors. */
  sector: number;
  /** Data segments; for an indirect request filled in from its indirect pages. */
  segs: BlkifSegment[];
  /** Grants of the indirect pages, if the request is indirect. */
  indirectGrefs: readonly number[] | undefined;
  /** Segments an indirect request claims (`nr_segments`). */
  nrSegments: number;
  /** Discard: sectors to drop, and whether BLKIF_DISCARD_SECURE asks for them to be unrecoverable. */
  discardSectors: number;
  secure: boolean;
}

export interface Rejection {
  status: typeof BLKIF_RSP_ERROR | typeof BLKIF_RSP_EOPNOTSUPP;
  why: string;
}

const reject = (why: string, status: Rejection['status'] = BLKIF_RSP_ERROR): Rejection => ({ status, why });

/** u64 sector numbers beyond this cannot be on any disk (made once: classifyRequest runs per request). */
const MAX_SECTOR = BigInt(Number.MAX_SAFE_INTEGER);

/** One object shape for every request (no spread per request on the hot path). */
function backendRequest(
  kind: RequestKind, id: bigint, operation: number, sector: number, segs: BlkifSegment[], nrSegments: number,
  indirectGrefs?: readonly number[], discardSectors = 0, secure = false,
): BackendRequest {
  return { kind, id, operation, sector, segs, indirectGrefs, nrSegments, discardSectors, secure };
}

/** Turns a decoded request into a backend request, or says why it is refused. */
export function classifyRequest(req: BlkifRequest, vbd: VbdLimits): BackendRequest | Rejection {
  // A flush or barrier without data covers no sectors, so its sector_number means nothing: Linux
  // 6.1's blkfront sends the block layer's "no position", (sector_t)-1, and Linux blkback
  // checks the range only of requests with sectors (xen_vbd_translate). Seen on real Xen.
  const empty = (req.operation === BLKIF_OP_FLUSH_DISKCACHE || req.operation === BLKIF_OP_WRITE_BARRIER) && req.nr_segments === 0;
  // u64 sector numbers beyond 2^53 cannot be on any disk; refuse before converting.
  if (req.sector_number > MAX_SECTOR && !empty) return reject(`sector ${req.sector_number} beyond the disk`);
  const sector = empty ? 0 : Number(req.sector_number);
  switch (req.operation) {
    case BLKIF_OP_READ:
      return backendRequest('read', req.id, BLKIF_OP_READ, sector, req.seg, req.nr_segments);
    case BLKIF_OP_WRITE:
      // CVE-2013-2140: a read-only VBD is never written, whatever the frontend asks.
      if (vbd.readOnly) return reject('write to a read-only VBD');
      return backendRequest('write', req.id, BLKIF_OP_WRITE, sector, req.seg, req.nr_segments);
    case BLKIF_OP_WRITE_BARRIER:
      if (vbd.readOnly) return reject('barrier on a read-only VBD');
      if (!vbd.barrier) return reject('barrier not offered', BLKIF_RSP_EOPNOTSUPP);
      return backendRequest('barrier', req.id, BLKIF_OP_WRITE_BARRIER, sector, req.seg, req.nr_segments);
    case BLKIF_OP_FLUSH_DISKCACHE:
      if (!vbd.flush) return reject('flush not offered', BLKIF_RSP_EOPNOTSUPP);
      if (vbd.readOnly && req.nr_segments > 0) return reject('flush with data on a read-only VBD');
      return backendRequest('flush', req.id, BLKIF_OP_FLUSH_DISKCACHE, sector, req.seg, req.nr_segments);
    case BLKIF_OP_DISCARD: {
      if (vbd.readOnly) return reject('discard on a read-only VBD');
      if (!vbd.discard) return reject('discard not offered', BLKIF_RSP_EOPNOTSUPP);
      if (req.nr_sectors > MAX_SECTOR) return reject(`discard of ${req.nr_sectors} sectors beyond the disk`);
      const n = Number(req.nr_sectors);
      const why = rangeProblem(sector, n, vbd);
      if (why !== undefined) return reject(`discard: ${why}`);
      const secure = (req.flag & BLKIF_DISCARD_SECURE) !== 0 && vbd.discardSecure;
      return backendRequest('discard', req.id, BLKIF_OP_DISCARD, sector, [], 0, undefined, n, secure);
    }
    case BLKIF_OP_INDIRECT: {
      if (req.indirect_op === BLKIF_OP_WRITE && vbd.readOnly) return reject('indirect write to a read-only VBD');
      const kind = req.indirect_op === BLKIF_OP_WRITE ? 'write' : 'read';
      return backendRequest(kind, req.id, req.indirect_op, sector, [], req.nr_segments, req.indirect_grefs);
    }
  }
}

export function isRejection(v: BackendRequest | Rejection): v is Rejection {
  return (v as Rejection).why !== undefined;
}

/**
 * Checks the data segments (once known: an indirect request's come from its pages) and the range
 * they cover; returns the problem, or undefined when the request may proceed.
 */
export function dataProblem(req: BackendRequest, vbd: VbdLimits): string | undefined {
  const align = vbd.sectorSize >> SECTOR_SHIFT;
  let total = 0;
  for (let i = 0; i < req.segs.length; i++) {
    const s = req.segs[i]!;
    const why = segmentProblem(s.first_sect, s.last_sect);
    if (why !== undefined) return `seg[${i}]: ${why}`;
    const n = s.last_sect - s.first_sect + 1;
    // Linux blkback: each segment must be a whole number of logical blocks ("Misaligned I/O request").
    if (n % align !== 0 || s.first_sect % align !== 0) return `seg[${i}] ${s.first_sect}..${s.last_sect} not aligned to ${vbd.sectorSize}-byte sectors`;
    total += n;
  }
  if (req.segs.length === 0) return undefined; // a pure flush or barrier
  return rangeProblem(req.sector, total, vbd);
}

/** Start and length (512-byte sectors) aligned to the logical sector size and inside the disk. */
function rangeProblem(sector: number, count: number, vbd: VbdLimits): string | undefined {
  const align = vbd.sectorSize >> SECTOR_SHIFT;
  if (sector % align !== 0 || count % align !== 0) return `sectors ${sector}+${count} not aligned to ${vbd.sectorSize}-byte sectors`;
  if (sector + count > vbd.sectors) return `sectors ${sector}+${count} beyond the disk's ${vbd.sectors}`;
  return undefined;
}

/** Bytes of data the request's segments carry. */
export function dataBytes(segs: readonly BlkifSegment[]): number {
  let n = 0;
  for (const s of segs) n += (s.last_sect - s.first_sect + 1) << SECTOR_SHIFT;
  return n;
}
