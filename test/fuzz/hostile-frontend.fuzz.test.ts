/**
 * Fuzz: a hostile frontend against blkback. A raw frontend in a local domain (the main thread)
 * plugs a VBD on a real driver domain and then, case after case, writes whatever fast-check
 * makes of its ring: random bytes in slots, structured requests with random fields (grant
 * references valid, ended, foreign, read-only or never granted; random segment ranges and
 * sectors; indirect requests with random pages and segment lists), req_prod jumps within and
 * beyond the ring, slots rewritten after publication, random xenbus `state` sequences including
 * nonsense, and a Closing in the middle of a batch. Over a file image of odd size with a known
 * pattern, in map-per-request, persistent-grant and grant-copy modes, writable or read-only.
 *
 * Properties, per round and per case:
 * - blkback never crashes (its domain keeps answering `status`) and never hangs (every wait bounded);
 * - it answers exactly the requests it consumed (ids as a multiset, each with its request's
 *   operation and a valid status, and the status a correct backend gives where that is certain),
 *   or, when req_prod is bogus, answers nothing, counts one fatal and goes Closing;
 * - pages not granted, granted to another domain, ended, or granted read-only are never written;
 *   no byte outside the granted pages reaches the disk (every disk sector is one of the image's,
 *   a granted page's, or zeroes); the image's tail past the last whole sector and a read-only
 *   image are never written;
 * - a READ answered OKAY delivered the disk's bytes, a WRITE answered OKAY landed where it said;
 * - no data mapping outlives its request (map and copy modes); once Closed nothing of the frontend
 *   is mapped and the ring no longer changes; after the VBD is removed the driver domain's grant,
 *   mapping, port and channel counters are back to their baseline.
 *
 * A second property drives blkback's data path directly: DataPath.stop() at a random moment of a
 * random stream of slow requests must answer everything consumed before it resolves and touch
 * nothing afterwards (the control path unmaps the ring right after).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import {
  BLKIF_OP_DISCARD,
  BLKIF_OP_FLUSH_DISKCACHE,
  BLKIF_OP_INDIRECT,
  BLKIF_OP_READ,
  BLKIF_OP_WRITE,
  BLKIF_OP_WRITE_BARRIER,
  BLKIF_RSP_EOPNOTSUPP,
  BLKIF_RSP_ERROR,
  BLKIF_RSP_OKAY,
  BLKIF_SEGMENT_SIZE,
  BLKIF_SEGS_PER_INDIRECT_FRAME,
  X86_32_ABI,
  X86_64_ABI,
  XEN_PAGE_SIZE,
  XS_EVENT_CHANNEL,
  XS_FEATURE_PERSISTENT,
  XS_PROTOCOL,
  XS_RING_PAGE_ORDER,
  XS_RING_REF,
  decodeRequest,
  decodeResponse,
  decodeSegment,
  encodeRequest,
  encodeRequestOther,
  encodeSegment,
  xsRingRefN,
  type BlkifAbi,
  type BlkifResponse,
  type BlkifSegment,
  type RwOperation,
} from '../../src/abi/index.js';
import { DataPath, newVbdCounters } from '../../src/blkback/index.js';
import { BouncePool, GrantCopy, MapPerRequest, PersistentMaps, type PageAccess } from '../../src/blkback/page-access.js';
import { BackRing, FrontRing, RING_CONSUMED, RING_PEER_OVERFLOW, RingEntry, SharedRing } from '../../src/ring/index.js';
import { MemoryStorage, type BlockStorage } from '../../src/storage/index.js';
import { BACKEND_BASE_PAGES, BACKEND_COPY_PAGES, Toolstack, createVbdNodes, removeVbdNodes, type BackendVbdStatus, type DomainProxy, type VbdPaths } from '../../src/toolstack/index.js';
import type { StorageSpec } from '../../src/storage/index.js';
import { GNTMAP_host_map, type XenDomain } from '../../src/xen/index.js';
import { XS_STATE, XenbusStateClosed, XenbusStateConnected, XenbusStateInitWait, waitForState } from '../../src/xenbus/index.js';
import { Rng, tempDir } from '../e2e/helpers.js';
import { Prng, assertChecksRan, eventually, firstDifference, fuzzRuns, runProperty, sectorKey, sleep, within } from './support.js';

/** Bound on any single wait (generous: CI machines are slow, a hang is still caught). */
const WAIT = 30_000;
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const SECTOR = 512;

// ---------------------------------------------------------------------------------------------
// What a case is made of.

type RefKind = 'rw' | 'ro' | 'ended' | 'foreign' | 'never' | 'zero';
interface RefChoice { kind: RefKind; i: number }
interface SegSpec { ref: RefChoice; first: number; last: number }
type SectorSpec = { k: 'in'; frac: number; align: boolean } | { k: 'end'; delta: number } | { k: 'raw'; v: bigint };
type CountSpec = { k: 'small'; n: number } | { k: 'rest'; delta: number } | { k: 'raw'; v: bigint };
type SlotSpec =
  | { t: 'bytes'; bytes: Uint8Array }
  | { t: 'rw'; op: number; nr: number | null; sector: SectorSpec; segs: SegSpec[] }
  | { t: 'discard'; sector: SectorSpec; count: CountSpec; flag: number }
  | { t: 'indirect'; op: number; nr: number | null; sector: SectorSpec; segs: SegSpec[]; repeat: number; pages: 'ro' | 'rw' | RefChoice }
  | { t: 'other'; op: number }
  /** A request meant to succeed: pages and sector chosen when the case is set up. */
  | { t: 'good'; op: 'read' | 'write'; segs: number; partial: boolean; frac: number; indirect: boolean };
type Jump = { k: 'none' } | { k: 'within'; extra: number } | { k: 'beyond'; by: number } | { k: 'back'; by: number };
interface RoundSpec { slots: SlotSpec[]; jump: Jump; scribble: Uint8Array | null; closeMidway: boolean; dupIds: boolean }
interface CaseSpec {
  seed: number;
  abi: 'x86_64' | 'x86_32';
  order: number;
  mode: 'map' | 'persistent' | 'copy';
  readOnly: 'no' | 'mode' | 'storage';
  sectorSize: 512 | 4096;
  imageSectors: number;
  tail: number;
  maxIndirect: number;
  features: { flush: boolean; barrier: boolean; discard: boolean };
  pools: { rw: number; ro: number; ended: number; foreign: number; sentinel: number };
  statesA: string[];
  rounds: RoundSpec[];
  statesC: string[];
}

const u8 = fc.integer({ min: 0, max: 255 });
const u64 = fc.bigInt({ min: 0n, max: 0xffffffffffffffffn });

const refChoice: fc.Arbitrary<RefChoice> = fc.record({
  kind: fc.oneof(
    { weight: 12, arbitrary: fc.constant('rw' as const) },
    { weight: 4, arbitrary: fc.constant('ro' as const) },
    { weight: 1, arbitrary: fc.constant('ended' as const) },
    { weight: 1, arbitrary: fc.constant('foreign' as const) },
    { weight: 1, arbitrary: fc.constant('never' as const) },
    { weight: 1, arbitrary: fc.constant('zero' as const) },
  ),
  i: fc.nat(63),
});

const segSpec: fc.Arbitrary<SegSpec> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ ref: refChoice, first: fc.constant(0), last: fc.constant(7) }) },
  {
    weight: 6,
    arbitrary: fc.record({ ref: refChoice, first: fc.integer({ min: 0, max: 7 }), len: fc.integer({ min: 0, max: 7 }) })
      .map(({ ref, first, len }) => ({ ref, first, last: Math.min(7, first + len) })),
  },
  { weight: 1, arbitrary: fc.record({ ref: refChoice, first: u8, last: u8 }) },
);

const sectorSpec: fc.Arbitrary<SectorSpec> = fc.oneof(
  { weight: 10, arbitrary: fc.record({ k: fc.constant('in' as const), frac: fc.integer({ min: 0, max: 9999 }), align: fc.boolean() }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constant('end' as const), delta: fc.integer({ min: -24, max: 24 }) }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant('raw' as const), v: u64 }) },
);

const countSpec: fc.Arbitrary<CountSpec> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ k: fc.constant('small' as const), n: fc.integer({ min: 0, max: 64 }) }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constant('rest' as const), delta: fc.integer({ min: -8, max: 8 }) }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant('raw' as const), v: u64 }) },
);

const rwOp = fc.oneof(
  { weight: 4, arbitrary: fc.constant(BLKIF_OP_READ) },
  { weight: 4, arbitrary: fc.constant(BLKIF_OP_WRITE) },
  { weight: 1, arbitrary: fc.constant(BLKIF_OP_WRITE_BARRIER) },
  { weight: 1, arbitrary: fc.constant(BLKIF_OP_FLUSH_DISKCACHE) },
);

const slotSpec: fc.Arbitrary<SlotSpec> = fc.oneof(
  { weight: 2, arbitrary: fc.record({ t: fc.constant('bytes' as const), bytes: fc.uint8Array({ minLength: 112, maxLength: 112 }) }) },
  {
    weight: 10,
    arbitrary: fc.record({
      t: fc.constant('rw' as const),
      op: rwOp,
      nr: fc.oneof({ weight: 10, arbitrary: fc.constant(null) }, { weight: 1, arbitrary: u8 }),
      sector: sectorSpec,
      segs: fc.array(segSpec, { minLength: 0, maxLength: 11 }),
    }),
  },
  { weight: 2, arbitrary: fc.record({ t: fc.constant('discard' as const), sector: sectorSpec, count: countSpec, flag: fc.constantFrom(0, 1, 2, 255) }) },
  {
    weight: 3,
    arbitrary: fc.record({
      t: fc.constant('indirect' as const),
      op: fc.oneof({ weight: 5, arbitrary: fc.constantFrom(BLKIF_OP_READ, BLKIF_OP_WRITE) }, { weight: 1, arbitrary: u8 }),
      nr: fc.oneof({ weight: 10, arbitrary: fc.constant(null) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff }) }),
      sector: sectorSpec,
      segs: fc.array(segSpec, { minLength: 1, maxLength: 24 }),
      repeat: fc.oneof({ weight: 8, arbitrary: fc.constant(1) }, { weight: 1, arbitrary: fc.integer({ min: 2, max: 60 }) }),
      pages: fc.oneof(
        { weight: 6, arbitrary: fc.constant('ro' as const) },
        { weight: 2, arbitrary: fc.constant('rw' as const) },
        { weight: 1, arbitrary: refChoice },
      ),
    }),
  },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('other' as const), op: fc.oneof(fc.constant(4), fc.integer({ min: 7, max: 255 })) }) },
  {
    weight: 12,
    arbitrary: fc.record({
      t: fc.constant('good' as const),
      op: fc.constantFrom('read' as const, 'write' as const),
      segs: fc.integer({ min: 1, max: 11 }),
      partial: fc.boolean(),
      frac: fc.integer({ min: 0, max: 9999 }),
      indirect: fc.oneof({ weight: 4, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
    }),
  },
);

// A case ends at its first bogus req_prod or Closing: rare enough per round that a case runs
// several rounds (many requests per domain set up), common enough that most cases meet one.
const jump: fc.Arbitrary<Jump> = fc.oneof(
  { weight: 40, arbitrary: fc.constant({ k: 'none' as const }) },
  { weight: 2, arbitrary: fc.record({ k: fc.constant('within' as const), extra: fc.integer({ min: 1, max: 8 }) }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant('beyond' as const), by: fc.integer({ min: 0, max: 1000 }) }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant('back' as const), by: fc.integer({ min: 0, max: 100 }) }) },
);

const roundSpec: fc.Arbitrary<RoundSpec> = fc.record({
  slots: fc.array(slotSpec, { minLength: 1, maxLength: 64, size: 'max' }),
  jump,
  scribble: fc.oneof({ weight: 8, arbitrary: fc.constant(null) }, { weight: 1, arbitrary: fc.uint8Array({ minLength: 112, maxLength: 112 }) }),
  closeMidway: fc.oneof({ weight: 40, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
  dupIds: fc.oneof({ weight: 8, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
});

/** Values a frontend might write into its `state` node, sane and not. */
const stateValue: fc.Arbitrary<string> = fc.constantFrom<string>('0', '1', '2', '3', '4', '5', '6', '7', '8', '', 'abc', '-1', '99', ' 4', '4\n', '3x', '\u00e9', 'Connected', '3.0', '0x3', '4294967299');

const caseSpec: fc.Arbitrary<CaseSpec> = fc.record({
  seed: fc.integer(),
  abi: fc.oneof({ weight: 3, arbitrary: fc.constant('x86_64' as const) }, { weight: 1, arbitrary: fc.constant('x86_32' as const) }),
  order: fc.oneof({ weight: 3, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: 1, max: 2 }) }),
  mode: fc.constantFrom('map' as const, 'persistent' as const, 'copy' as const),
  readOnly: fc.oneof({ weight: 5, arbitrary: fc.constant('no' as const) }, { weight: 1, arbitrary: fc.constantFrom('mode' as const, 'storage' as const) }),
  sectorSize: fc.oneof({ weight: 4, arbitrary: fc.constant(512 as const) }, { weight: 1, arbitrary: fc.constant(4096 as const) }),
  imageSectors: fc.integer({ min: 256, max: 4096 }),
  tail: fc.integer({ min: 1, max: 4095 }),
  maxIndirect: fc.constantFrom(0, 32, 300, 1024),
  features: fc.record({
    flush: fc.oneof({ weight: 4, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
    barrier: fc.oneof({ weight: 4, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
    discard: fc.oneof({ weight: 4, arbitrary: fc.constant(true) }, { weight: 1, arbitrary: fc.constant(false) }),
  }),
  pools: fc.record({
    // Up to a ring's worth of READs into pages of their own: rounds of up to 64 slots.
    rw: fc.integer({ min: 4, max: 64 }),
    ro: fc.integer({ min: 1, max: 4 }),
    ended: fc.integer({ min: 1, max: 2 }),
    foreign: fc.integer({ min: 1, max: 2 }),
    sentinel: fc.integer({ min: 1, max: 2 }),
  }),
  statesA: fc.oneof({ weight: 2, arbitrary: fc.constant<string[]>([]) }, { weight: 1, arbitrary: fc.array(stateValue, { minLength: 1, maxLength: 6 }) }),
  rounds: fc.array(roundSpec, { minLength: 1, maxLength: 32, size: 'max' }),
  statesC: fc.oneof({ weight: 4, arbitrary: fc.constant<string[]>([]) }, { weight: 1, arbitrary: fc.array(stateValue, { minLength: 1, maxLength: 4 }) }),
});

// ---------------------------------------------------------------------------------------------
// The environment: one toolstack, one driver domain, one raw-frontend domain for every case.

let ts: Toolstack;
let back: DomainProxy;
let L: XenDomain;
let backBase: number[];
let lBase: number[];
const tmp = tempDir('blkif-fuzz-front-');
let devSeq = 0;
/** What the cases exercised (reported with the case count). */
const stats = { requests: 0, responses: 0, okay: 0, exact: 0, readsVerified: 0, writesVerified: 0, stale: 0, scribbled: 0, midwayCloses: 0, stateSequences: 0, endedUses: 0 };

function resources(domid: number): number[] {
  const c = ts.hv.domainCounters(domid);
  assert.ok(c !== undefined, `domain ${domid} has counters`);
  return [c.grantsActive, c.mapsActive, c.portsOpen, c.channelsBound];
}

before(async () => {
  ts = await Toolstack.start();
  back = await ts.createBackendDomain('driver-domain', BACKEND_BASE_PAGES + 4 * BACKEND_COPY_PAGES);
  L = ts.hv.createLocalDomain({ memoryPages: 4096, pollMicros: 0 });
  backBase = resources(back.domid);
  lBase = resources(L.domid);
});

after(async () => {
  await ts?.shutdown();
  tmp.cleanup();
});
after(() => {
  console.log(`hostile-frontend suite: ${stats.requests} hostile ring requests sent`);
});

// ---------------------------------------------------------------------------------------------
// The oracle: what a correct backend answers, where that is certain.

type Expect = 'okay' | 'error' | 'eopnotsupp' | 'notokay' | 'any';
type GrantClass = 'rw' | 'ro' | 'ind-rw' | 'ind-ro' | 'bad';

interface VbdModel {
  /** Disk size in 512-byte sectors; alignment of requests in 512-byte sectors. */
  sectors: number;
  align: number;
  readOnly: boolean;
  flush: boolean;
  barrier: boolean;
  discard: boolean;
  maxIndirect: number;
  mode: CaseSpec['mode'];
  classOf(gref: number): GrantClass;
}

/** A request as the raw frontend meant it (independent of the codec blkback uses). */
type Logical =
  | { kind: 'rw'; op: number; nr: number; sector: bigint; segs: BlkifSegment[] }
  | { kind: 'discard'; sector: bigint; count: bigint }
  | { kind: 'indirect'; op: number; nr: number; sector: bigint; pages: number[]; segs: BlkifSegment[] }
  | { kind: 'other' }
  | { kind: 'bytes' };

const badRange = (s: BlkifSegment): boolean => s.last_sect > 7 || s.first_sect > s.last_sect;

function dataExpect(read: boolean, segs: readonly BlkifSegment[], sector: bigint, v: VbdModel): Expect {
  if (segs.some(badRange)) return 'error';
  let total = 0;
  for (const s of segs) {
    const n = s.last_sect - s.first_sect + 1;
    if (n % v.align !== 0 || s.first_sect % v.align !== 0) return 'error';
    total += n;
  }
  const sec = Number(sector);
  if (sec % v.align !== 0 || total % v.align !== 0 || sec + total > v.sectors) return 'error';
  for (const s of segs) {
    const c = v.classOf(s.gref);
    const writable = c === 'rw' || c === 'ind-rw';
    // A READ needs a page it may write; persistent grants are mapped writable for everything.
    const ok = read || v.mode === 'persistent' ? writable : c !== 'bad';
    if (!ok) return 'error';
  }
  return 'okay';
}

function expectStatus(q: Logical, v: VbdModel): Expect {
  switch (q.kind) {
    case 'bytes':
      return 'any';
    case 'other':
      return 'eopnotsupp';
    case 'rw': {
      const { op, nr } = q;
      if (nr > 11 || (nr === 0 && (op === BLKIF_OP_READ || op === BLKIF_OP_WRITE))) return 'error';
      if (q.segs.some(badRange)) return 'error';
      if (q.sector > MAX_SAFE) return nr === 0 && op !== BLKIF_OP_READ && op !== BLKIF_OP_WRITE ? 'any' : 'notokay';
      switch (op) {
        case BLKIF_OP_READ:
          return dataExpect(true, q.segs, q.sector, v);
        case BLKIF_OP_WRITE:
          return v.readOnly ? 'error' : dataExpect(false, q.segs, q.sector, v);
        case BLKIF_OP_WRITE_BARRIER:
          if (v.readOnly) return 'notokay';
          if (!v.barrier) return 'eopnotsupp';
          return nr === 0 ? 'okay' : dataExpect(false, q.segs, q.sector, v);
        default: // FLUSH_DISKCACHE
          if (v.readOnly) return 'notokay';
          if (!v.flush) return 'eopnotsupp';
          return nr === 0 ? 'okay' : dataExpect(false, q.segs, q.sector, v);
      }
    }
    case 'discard': {
      if (q.sector > MAX_SAFE || q.count > MAX_SAFE) return 'notokay';
      if (v.readOnly) return 'notokay';
      if (!v.discard) return 'eopnotsupp';
      const s = Number(q.sector);
      const n = Number(q.count);
      if (s % v.align !== 0 || n % v.align !== 0 || s + n > v.sectors) return 'error';
      return 'okay';
    }
    case 'indirect': {
      if (q.op !== BLKIF_OP_READ && q.op !== BLKIF_OP_WRITE) return 'error';
      if (q.nr === 0 || q.nr > Math.min(v.maxIndirect, 4096)) return 'error';
      if (q.sector > MAX_SAFE) return 'error';
      if (q.op === BLKIF_OP_WRITE && v.readOnly) return 'error';
      const need = Math.ceil(q.nr / BLKIF_SEGS_PER_INDIRECT_FRAME);
      for (const gref of q.pages.slice(0, need)) {
        const c = v.classOf(gref);
        const ok = v.mode === 'persistent' ? c === 'rw' || c === 'ind-rw' : c !== 'bad';
        if (!ok) return 'error';
      }
      if (q.pages.length < need) return 'error';
      // Pages that are not indirect pages we wrote (a data page named as one): their bytes are
      // segments of nobody's making.
      if (q.pages.slice(0, need).some((g) => !v.classOf(g).startsWith('ind'))) return 'any';
      return dataExpect(q.op === BLKIF_OP_READ, q.segs, q.sector, v);
    }
  }
}

function statusMatches(status: number, e: Expect): boolean {
  switch (e) {
    case 'okay': return status === BLKIF_RSP_OKAY;
    case 'error': return status === BLKIF_RSP_ERROR;
    case 'eopnotsupp': return status === BLKIF_RSP_EOPNOTSUPP;
    case 'notokay': return status === BLKIF_RSP_ERROR || status === BLKIF_RSP_EOPNOTSUPP;
    case 'any': return true;
  }
}

/** The operation a correct backend echoes for the slot bytes it copied (indirect: indirect_op). */
function echoedOp(bytes: Uint8Array): number {
  return bytes[0] === BLKIF_OP_INDIRECT ? bytes[1]! : bytes[0]!;
}

// ---------------------------------------------------------------------------------------------
// One case.

interface Page {
  frame: number;
  ref: number;
  bytes: Uint8Array;
  initial: Uint8Array;
}

/** Where a request moves data, as far as anyone can tell from its bytes (an over-approximation). */
interface Touch {
  /** Pages a READ writes: (frame, byte range in the page, byte offset on disk). */
  readDests: { frame: number; from: number; to: number; disk: number }[];
  /** Disk byte ranges written (WRITE, flush or barrier with data, discard). */
  diskWrites: [number, number][];
  /** Pages a WRITE takes its data from. */
  writeSources: { frame: number; from: number; to: number; disk: number }[];
}

interface Built {
  entry: RingEntry;
  logical: Logical;
  structured: boolean;
}

class FrontCase {
  readonly abi: BlkifAbi;
  readonly prng: Prng;
  readonly log: string[] = [];
  readonly debug: string[] = [];
  paths!: VbdPaths;
  imagePath = '';
  original: Uint8Array = new Uint8Array(0);
  storageSize = 0;
  v!: VbdModel;
  ring!: FrontRing;
  ringFrames: number[] = [];
  ringRefs: number[] = [];
  port = -1;
  off: (() => void) | undefined;
  responses: BlkifResponse[] = [];
  overflow: string | undefined;
  ignoreEvents = false;
  readonly pools = new Map<RefKind, Page[]>();
  readonly indirectPages: { page: Page; readonly: boolean }[] = [];
  /** Indirect grants prepared per (round, slot). */
  readonly indirectFor = new Map<string, { refs: number[]; segs: BlkifSegment[] }>();
  readonly grantClass = new Map<number, GrantClass>();
  readonly pageByRef = new Map<number, Page>();
  readonly allowed = new Set<string>();
  /** Every ref and frame this case granted or allocated, for the final release. */
  readonly refs: number[] = [];
  readonly frames: number[] = [];
  private idSeq = 1n;
  private readonly rsp: RingEntry;
  private removed = false;
  private plugged = false;
  fatalSeen = false;
  closedByFrontend = false;

  constructor(readonly spec: CaseSpec, readonly n: number) {
    this.abi = spec.abi === 'x86_64' ? X86_64_ABI : X86_32_ABI;
    this.prng = new Prng(spec.seed);
    this.rsp = new RingEntry(this.abi.entrySize);
  }

  get readOnly(): boolean {
    return this.spec.readOnly !== 'no';
  }

  private status(): Promise<BackendVbdStatus> {
    return within(back.rpc.call<BackendVbdStatus>('status', this.paths.backDir), `status of ${this.paths.backDir}`, WAIT);
  }

  private writeState(v: string): Promise<void> {
    return ts.xs.write(`${this.paths.frontDir}/${XS_STATE}`, v);
  }

  /** Waits until blkback reports `state` (and connected or not) steadily: a racing change shows within 40 ms. */
  private async settle(state: 'Closed' | 'Connected', what: string): Promise<void> {
    const want = async () => {
      const st = await this.status();
      return st.state === state && st.connected === (state === 'Connected');
    };
    const deadline = Date.now() + WAIT;
    for (;;) {
      await eventually(want, `${what}: blkback ${state}`, Math.max(1, deadline - Date.now()));
      // Steadiness, not synchronisation: the state must hold across two windows in which a
      // racing change would show (a busy machine only makes the windows look quieter).
      await sleep(20);
      if (await want()) {
        await sleep(20);
        if (await want()) return;
      }
      if (Date.now() > deadline) throw new Error(`${what}: blkback never settled in ${state}`);
    }
  }

  async run(): Promise<void> {
    try {
      await this.plug();
      for (const [k, r] of this.spec.rounds.entries()) {
        if (this.fatalSeen || this.closedByFrontend) break;
        await this.round(r, k);
      }
      if (!this.fatalSeen && !this.closedByFrontend && this.spec.statesC.length > 0) await this.statesC();
      await this.close();
    } catch (e) {
      const err = new Error(`${(e as Error).message}\n  case ${this.n}: ${describeCase(this.spec)}\n  log: ${this.log.slice(-12).join(' | ')}`, { cause: e });
      err.stack = `${err.message}\n${(e as Error).stack ?? ''}`;
      throw err;
    } finally {
      await this.cleanup();
    }
  }

  // ---- setup

  private async plug(): Promise<void> {
    const s = this.spec;
    const fileSize = s.imageSectors * SECTOR + s.tail;
    this.storageSize = Math.floor(fileSize / s.sectorSize) * s.sectorSize;
    this.original = new Rng(s.seed >>> 0 || 1).bytes(fileSize);
    this.imagePath = join(tmp.dir, `case-${this.n}.img`);
    writeFileSync(this.imagePath, this.original);
    for (let at = 0; at + SECTOR <= this.storageSize; at += SECTOR) this.allowed.add(sectorKey(this.original, at));
    this.allowed.add(sectorKey(new Uint8Array(SECTOR)));

    // Served synchronously: the data check judges where each sector's bytes came from, and with the
    // pool's concurrent preadv/pwritev a frontend that lends one page to a read and a write in flight
    // at once tears that page's sectors (its own business, as with DMA on real hardware), so they
    // could come from nowhere whole. The asynchronous path has tests of its own (storage, isolation).
    const storage: StorageSpec = { kind: 'file', path: this.imagePath, sectorSize: s.sectorSize, readOnly: s.readOnly === 'storage', io: 'sync' };
    const devid = 0x10000 + ++devSeq;
    this.paths = await createVbdNodes(ts.xs, { frontDomid: L.domid, backDomid: back.domid, devid }, storage, this.readOnly);
    await within(back.rpc.call('addVbd', this.paths.backDir, storage, {
      maxIndirectSegments: s.maxIndirect,
      grantCopy: s.mode === 'copy',
      persistent: s.mode === 'persistent',
      flush: s.features.flush,
      barrier: s.features.barrier,
      discard: s.features.discard,
    }), 'addVbd', WAIT);
    this.plugged = true;
    await waitForState(ts.xs, this.paths.backDir, (st) => st === XenbusStateInitWait, WAIT);

    const ro = this.readOnly;
    this.v = {
      sectors: this.storageSize / SECTOR,
      align: s.sectorSize / SECTOR,
      readOnly: ro,
      flush: s.features.flush && !ro,
      barrier: s.features.barrier && !ro,
      discard: s.features.discard && !ro,
      maxIndirect: s.maxIndirect,
      mode: s.mode,
      classOf: (gref) => this.grantClass.get(gref) ?? 'bad',
    };

    // The ring, its grants and the event channel, then the nodes blkback reads.
    this.ringFrames = L.memory.alloc(1 << s.order);
    this.frames.push(...this.ringFrames);
    this.ring = FrontRing.init(new SharedRing(this.ringFrames.map((f) => L.memory.page(f)), this.abi.entrySize));
    for (const f of this.ringFrames) {
      const ref = L.grants.grantAccess(back.domid, f, false, { lasting: true }); // a ring: both ends write it
      assert.ok(ref >= 0);
      this.ringRefs.push(ref);
      this.refs.push(ref);
    }
    this.port = L.events.allocUnbound(back.domid);
    assert.ok(this.port > 0);
    this.off = L.events.on(this.port, () => this.onEvent());
    const f = this.paths.frontDir;
    await ts.xs.transaction(async (tx) => {
      if (s.order === 0) await ts.xs.write(`${f}/${XS_RING_REF}`, String(this.ringRefs[0]), tx);
      else {
        await ts.xs.write(`${f}/${XS_RING_PAGE_ORDER}`, String(s.order), tx);
        for (const [i, ref] of this.ringRefs.entries()) await ts.xs.write(`${f}/${xsRingRefN(i)}`, String(ref), tx);
      }
      await ts.xs.write(`${f}/${XS_EVENT_CHANNEL}`, String(this.port), tx);
      await ts.xs.write(`${f}/${XS_PROTOCOL}`, this.abi.protocol, tx);
      if (s.mode === 'persistent') await ts.xs.write(`${f}/${XS_FEATURE_PERSISTENT}`, '1', tx);
    });

    // Phase A: whatever state sequence the case holds, then a proper (re)connection.
    for (const st of s.statesA) {
      await this.writeState(st);
      this.log.push(`state ${JSON.stringify(st)}`);
      // Jitter between the hostile state writes: part of the sequence the case generates.
      if (this.prng.chance(0.5)) await sleep(this.prng.int(0, 3));
      await this.status(); // the backend domain still answers
    }
    if (s.statesA.length > 0) {
      stats.stateSequences++;
      await this.writeState(String(XenbusStateClosed));
      await this.settle('Closed', 'after the state sequence');
      assert.ok(this.ringRefs.every((r) => !L.grants.isMapped(r)), 'a Closed backend has let go of the ring');
      this.ring = FrontRing.init(new SharedRing(this.ringFrames.map((fr) => L.memory.page(fr)), this.abi.entrySize));
    }
    await this.writeState('3');
    await waitForState(ts.xs, this.paths.backDir, (st) => st === XenbusStateConnected, WAIT);
    await this.settle('Connected', 'connecting');
    this.log.push('connected');

    this.makePools();
  }

  private page(kind: RefKind | 'ind', grantTo: number | null, readonly: boolean, fill: 'random' | 'sentinel' | 'zero'): Page {
    const [frame] = L.memory.alloc(1);
    this.frames.push(frame!);
    const bytes = L.memory.page(frame!);
    if (fill === 'random') bytes.set(this.prng.bytes(XEN_PAGE_SIZE));
    else if (fill === 'zero') bytes.fill(0);
    else {
      const tag = new TextEncoder().encode(`\u00a5SENTINEL-${kind}-${frame}-`);
      for (let i = 0; i < XEN_PAGE_SIZE; i++) bytes[i] = tag[i % tag.length]!;
    }
    let ref = -1;
    if (grantTo !== null) {
      ref = L.grants.grantAccess(grantTo, frame!, readonly);
      assert.ok(ref >= 0, `grant: ${ref}`);
      this.refs.push(ref);
    }
    const p: Page = { frame: frame!, ref, bytes, initial: new Uint8Array(bytes) };
    if (ref >= 0) this.pageByRef.set(ref, p);
    return p;
  }

  private makePools(): void {
    const s = this.spec;
    const add = (kind: RefKind, pages: Page[]) => this.pools.set(kind, pages);
    const rw = Array.from({ length: s.pools.rw }, () => this.page('rw', back.domid, false, 'random'));
    const ro = Array.from({ length: s.pools.ro }, () => this.page('ro', back.domid, true, 'random'));
    const foreign = Array.from({ length: s.pools.foreign }, () => this.page('foreign', 0, false, 'sentinel'));
    const sentinel = Array.from({ length: s.pools.sentinel }, () => this.page('sentinel' as RefKind, null, false, 'sentinel'));
    add('rw', rw);
    add('ro', ro);
    add('foreign', foreign);
    add('never', sentinel); // never granted: their frames are the sentinels, their refs bogus
    for (const p of rw) this.grantClass.set(p.ref, 'rw');
    for (const p of ro) this.grantClass.set(p.ref, 'ro');
    for (const p of [...rw, ...ro]) for (let at = 0; at < XEN_PAGE_SIZE; at += SECTOR) this.allowed.add(sectorKey(p.initial, at));

    // Indirect pages for every indirect slot of every round, made now so that no grant made
    // later reuses an ended ref; pages and sectors of the requests meant to succeed, chosen so
    // that a page is read into at most once per round and never both read into and written from.
    const perRound = new Map<number, { read: Set<number>; write: Set<number> }>();
    const used = (k: number) => {
      let u = perRound.get(k);
      if (u === undefined) perRound.set(k, (u = { read: new Set(), write: new Set() }));
      return u;
    };
    for (const [k, r] of s.rounds.entries()) {
      for (const [j, slot] of r.slots.entries()) {
        if (slot.t === 'good') {
          this.prepareGood(slot, `${k}/${j}`, used(k));
          continue;
        }
        if (slot.t !== 'indirect') continue;
        const segs = this.indirectSegs(slot);
        const nrField = slot.nr ?? segs.length;
        const npages = Math.min(8, Math.max(1, Math.ceil(Math.max(nrField, segs.length) / BLKIF_SEGS_PER_INDIRECT_FRAME)));
        let refs: number[];
        if (slot.pages === 'ro' || slot.pages === 'rw') {
          const ro2 = slot.pages === 'ro';
          const pages = Array.from({ length: npages }, () => this.page('ind' as RefKind, back.domid, ro2, 'zero'));
          segs.forEach((sg, jj) => {
            const p = pages[Math.floor(jj / BLKIF_SEGS_PER_INDIRECT_FRAME)];
            if (p === undefined) return;
            encodeSegment(new DataView(p.bytes.buffer, p.bytes.byteOffset, XEN_PAGE_SIZE), (jj % BLKIF_SEGS_PER_INDIRECT_FRAME) * BLKIF_SEGMENT_SIZE, sg);
          });
          for (const p of pages) {
            p.initial.set(p.bytes);
            this.grantClass.set(p.ref, ro2 ? 'ind-ro' : 'ind-rw');
            this.indirectPages.push({ page: p, readonly: ro2 });
            for (let at = 0; at < XEN_PAGE_SIZE; at += SECTOR) this.allowed.add(sectorKey(p.initial, at));
          }
          refs = pages.map((p) => p.ref);
        } else {
          refs = new Array<number>(npages).fill(-1); // resolved below, once ended refs exist
          this.pendingBadIndirect.push({ key: `${k}/${j}`, choice: slot.pages, n: npages });
        }
        this.indirectFor.set(`${k}/${j}`, { refs, segs });
      }
    }
    // Ended last: granted, then ended, and nothing is granted after them in this case.
    const ended = Array.from({ length: s.pools.ended }, () => this.page('ended', back.domid, false, 'sentinel'));
    for (const p of ended) {
      assert.ok(L.grants.endAccess(p.ref));
      this.refs.splice(this.refs.indexOf(p.ref), 1);
      this.pageByRef.delete(p.ref);
    }
    add('ended', ended);
    for (const b of this.pendingBadIndirect) {
      const refs = this.indirectFor.get(b.key)!.refs;
      for (let i = 0; i < b.n; i++) refs[i] = this.resolveRef(b.choice);
    }
  }

  private readonly pendingBadIndirect: { key: string; choice: RefChoice; n: number }[] = [];
  readonly goodFor = new Map<string, { op: number; sector: bigint; segs: BlkifSegment[]; indirectRefs: number[] | undefined }>();

  private prepareGood(slot: Extract<SlotSpec, { t: 'good' }>, key: string, u: { read: Set<number>; write: Set<number> }): void {
    const v = this.v;
    const rw = this.pools.get('rw')!;
    const ro = this.pools.get('ro')!;
    const read = slot.op === 'read';
    const n = slot.indirect ? Math.max(12, Math.min(v.maxIndirect || 12, 12 + slot.segs * 5)) : slot.segs;
    // READ: pages nobody else reads into or writes from this round; WRITE: pages nobody reads into.
    const candidates = read
      ? rw.filter((p) => !u.read.has(p.frame) && !u.write.has(p.frame))
      : [...rw, ...(v.mode === 'persistent' ? [] : ro)].filter((p) => !u.read.has(p.frame));
    const pool = candidates.length > 0 ? candidates : read ? rw : rw.filter((p) => !u.read.has(p.frame));
    const segs: BlkifSegment[] = [];
    for (let i = 0; i < n; i++) {
      const p = pool.length > 0 ? pool[this.prng.int(0, pool.length - 1)]! : rw[0]!;
      (read ? u.read : u.write).add(p.frame);
      let first = 0;
      let last = 7;
      if (slot.partial && v.align === 1) {
        first = this.prng.int(0, 7);
        last = this.prng.int(first, 7);
      }
      segs.push({ gref: p.ref, first_sect: first, last_sect: last });
    }
    const total = segs.reduce((a, sg) => a + sg.last_sect - sg.first_sect + 1, 0);
    let sector = Math.floor((slot.frac / 10000) * Math.max(0, v.sectors - total));
    sector -= sector % v.align;
    let indirectRefs: number[] | undefined;
    if (slot.indirect) {
      const pages = Array.from({ length: Math.ceil(n / BLKIF_SEGS_PER_INDIRECT_FRAME) }, () => this.page('ind' as RefKind, back.domid, v.mode !== 'persistent', 'zero'));
      segs.forEach((sg, jj) => {
        const p = pages[Math.floor(jj / BLKIF_SEGS_PER_INDIRECT_FRAME)]!;
        encodeSegment(new DataView(p.bytes.buffer, p.bytes.byteOffset, XEN_PAGE_SIZE), (jj % BLKIF_SEGS_PER_INDIRECT_FRAME) * BLKIF_SEGMENT_SIZE, sg);
      });
      for (const p of pages) {
        p.initial.set(p.bytes);
        const roInd = v.mode !== 'persistent';
        this.grantClass.set(p.ref, roInd ? 'ind-ro' : 'ind-rw');
        this.indirectPages.push({ page: p, readonly: roInd });
        for (let at = 0; at < XEN_PAGE_SIZE; at += SECTOR) this.allowed.add(sectorKey(p.initial, at));
      }
      indirectRefs = pages.map((p) => p.ref);
    }
    this.goodFor.set(key, { op: read ? BLKIF_OP_READ : BLKIF_OP_WRITE, sector: BigInt(sector), segs, indirectRefs });
  }

  private indirectSegs(slot: Extract<SlotSpec, { t: 'indirect' }>): BlkifSegment[] {
    const out: BlkifSegment[] = [];
    for (let r = 0; r < slot.repeat; r++) for (const sg of slot.segs) out.push(this.resolveSeg(sg));
    return out.slice(0, 8 * BLKIF_SEGS_PER_INDIRECT_FRAME);
  }

  private resolveRef(c: RefChoice): number {
    switch (c.kind) {
      case 'zero':
        return 0;
      case 'never':
        return 30000 + c.i;
      default: {
        const pool = this.pools.get(c.kind);
        // Ended refs are made after the indirect pages: until then, a never-granted number.
        if (pool === undefined || pool.length === 0) return 30100 + c.i;
        return pool[c.i % pool.length]!.ref;
      }
    }
  }

  private resolveSeg(s: SegSpec): BlkifSegment {
    return { gref: this.resolveRef(s.ref), first_sect: s.first, last_sect: s.last };
  }

  private resolveSector(s: SectorSpec): bigint {
    const n = this.v.sectors;
    switch (s.k) {
      case 'in': {
        let x = Math.floor((s.frac / 10000) * n);
        if (s.align) x -= x % 8;
        return BigInt(x);
      }
      case 'end':
        return BigInt(Math.max(0, n + s.delta));
      case 'raw':
        return s.v;
    }
  }

  private nextId(dup: boolean, last: bigint | undefined): bigint {
    if (dup && last !== undefined) return last;
    const id = (BigInt(this.prng.next()) << 32n) | this.idSeq++;
    return this.prng.chance(0.1) ? id & 0xffffn : id;
  }

  // ---- building slots

  private build(slot: SlotSpec, k: number, j: number, id: bigint): Built {
    const a = this.abi;
    const entry = new RingEntry(a.entrySize);
    const view = entry.view;
    switch (slot.t) {
      case 'bytes': {
        entry.bytes.set(slot.bytes.subarray(0, a.entrySize));
        return { entry, logical: { kind: 'bytes' }, structured: false };
      }
      case 'other': {
        encodeRequestOther(view, 0, a, slot.op, id);
        return { entry, logical: { kind: 'other' }, structured: true };
      }
      case 'rw': {
        const segs = slot.segs.map((sg) => this.resolveSeg(sg));
        const nr = slot.nr ?? segs.length;
        const sector = this.resolveSector(slot.sector);
        encodeRequest(view, 0, a, { operation: slot.op as RwOperation, nr_segments: nr, handle: 0, id, sector_number: sector, seg: segs });
        const eff: BlkifSegment[] = [];
        for (let i = 0; i < Math.min(nr, 11); i++) eff.push(segs[i] ?? { gref: 0, first_sect: 0, last_sect: 0 });
        return { entry, logical: { kind: 'rw', op: slot.op, nr, sector, segs: eff }, structured: true };
      }
      case 'discard': {
        const sector = this.resolveSector(slot.sector);
        const c = slot.count;
        const count = c.k === 'small' ? BigInt(c.n) : c.k === 'raw' ? c.v : BigInt(Math.max(0, this.v.sectors - Number(sector < MAX_SAFE ? sector : 0n) + c.delta));
        encodeRequest(view, 0, a, { operation: BLKIF_OP_DISCARD, flag: slot.flag, handle: 0, id, sector_number: sector, nr_sectors: count });
        return { entry, logical: { kind: 'discard', sector, count }, structured: true };
      }
      case 'good': {
        const g = this.goodFor.get(`${k}/${j}`)!;
        if (g.indirectRefs !== undefined) {
          encodeRequest(view, 0, a, { operation: BLKIF_OP_INDIRECT, indirect_op: g.op, nr_segments: g.segs.length, id, sector_number: g.sector, handle: 0, indirect_grefs: g.indirectRefs });
          return { entry, logical: { kind: 'indirect', op: g.op, nr: g.segs.length, sector: g.sector, pages: g.indirectRefs, segs: g.segs }, structured: true };
        }
        encodeRequest(view, 0, a, { operation: g.op as RwOperation, nr_segments: g.segs.length, handle: 0, id, sector_number: g.sector, seg: g.segs });
        return { entry, logical: { kind: 'rw', op: g.op, nr: g.segs.length, sector: g.sector, segs: g.segs }, structured: true };
      }
      case 'indirect': {
        const ind = this.indirectFor.get(`${k}/${j}`)!;
        const nr = slot.nr ?? ind.segs.length;
        const sector = this.resolveSector(slot.sector);
        encodeRequest(view, 0, a, { operation: BLKIF_OP_INDIRECT, indirect_op: slot.op, nr_segments: nr, id, sector_number: sector, handle: 0, indirect_grefs: ind.refs });
        const eff: BlkifSegment[] = [];
        for (let i = 0; i < Math.min(nr, 8 * BLKIF_SEGS_PER_INDIRECT_FRAME); i++) eff.push(ind.segs[i] ?? { gref: 0, first_sect: 0, last_sect: 0 });
        return { entry, logical: { kind: 'indirect', op: slot.op, nr, sector, pages: ind.refs, segs: eff }, structured: true };
      }
    }
  }

  /** Data movement a slot's bytes can cause (from the bytes the backend copies: covers stale and random slots). */
  private touches(bytes: Uint8Array): Touch {
    const t: Touch = { readDests: [], diskWrites: [], writeSources: [] };
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const d = decodeRequest(view, 0, this.abi, { maxIndirectSegments: 4096 });
    if (!d.ok) return t;
    const r = d.request;
    const wholeDisk = (): void => void t.diskWrites.push([0, this.storageSize]);
    if (r.operation === BLKIF_OP_DISCARD) {
      if (r.sector_number > MAX_SAFE || r.nr_sectors > MAX_SAFE) wholeDisk();
      else t.diskWrites.push([Number(r.sector_number) * SECTOR, (Number(r.sector_number) + Number(r.nr_sectors)) * SECTOR]);
      return t;
    }
    let segs: BlkifSegment[];
    let read: boolean;
    if (r.operation === BLKIF_OP_INDIRECT) {
      const pages = r.indirect_grefs.map((g) => this.pageByRef.get(g));
      if (pages.some((p) => p === undefined)) return t; // an indirect page that does not map: nothing moves
      segs = [];
      for (let j = 0; j < r.nr_segments; j++) {
        const p = pages[Math.floor(j / BLKIF_SEGS_PER_INDIRECT_FRAME)]!;
        segs.push(decodeSegment(new DataView(p.bytes.buffer, p.bytes.byteOffset, XEN_PAGE_SIZE), (j % BLKIF_SEGS_PER_INDIRECT_FRAME) * BLKIF_SEGMENT_SIZE));
      }
      read = r.indirect_op === BLKIF_OP_READ;
    } else {
      segs = r.seg;
      read = r.operation === BLKIF_OP_READ;
    }
    // Over-approximate: with grant copy a READ that fails on one segment still fills the pages
    // of the others (each copy out is its own operation), so every page it names may change.
    const base = r.sector_number > MAX_SAFE ? 0 : Number(r.sector_number) * SECTOR;
    let disk = base;
    for (const s of segs) {
      const from = Math.min(s.first_sect, 8) * SECTOR;
      const to = Math.min(Math.max(s.last_sect + 1, s.first_sect), 8) * SECTOR;
      const p = this.pageByRef.get(s.gref);
      if (p !== undefined) {
        if (read) t.readDests.push({ frame: p.frame, from, to, disk });
        else t.writeSources.push({ frame: p.frame, from, to, disk });
      }
      disk += to - from;
    }
    if (!read && r.sector_number > MAX_SAFE) wholeDisk();
    if (!read && r.sector_number <= MAX_SAFE) t.diskWrites.push([base, disk]);
    return t;
  }

  // ---- the ring

  private onEvent(): void {
    if (this.ignoreEvents) return;
    for (;;) {
      for (;;) {
        const r = this.ring.consumeResponse(this.rsp);
        if (r === RING_PEER_OVERFLOW) {
          this.overflow ??= `backend published rsp_prod ${this.ring.sring.rspProd} with rsp_cons ${this.ring.rspCons}`;
          return;
        }
        if (r !== RING_CONSUMED) break;
        this.responses.push(decodeResponse(this.rsp.view, 0, this.abi));
      }
      if (this.ring.finalCheckForResponses() === 0) return;
    }
  }

  private async round(r: RoundSpec, k: number): Promise<void> {
    const sring = this.ring.sring;
    const size = this.ring.size;
    const P = sring.reqProd;
    assert.equal(this.ring.rspCons, P, 'every earlier request was answered');
    assert.equal(sring.rspProd, P);
    const extra = r.jump.k === 'within' ? Math.min(r.jump.extra, size - 1) : 0;
    const n = Math.min(r.slots.length, size - extra);
    const built: Built[] = [];
    let lastId: bigint | undefined;
    for (let j = 0; j < n; j++) {
      const id = this.nextId(r.dupIds && this.prng.chance(0.3), lastId);
      lastId = id;
      const b = this.build(r.slots[j]!, k, j, id);
      built.push(b);
      sring.copyIn((P + j) >>> 0, b.entry);
    }
    const fatal = r.jump.k === 'beyond' || r.jump.k === 'back';
    let newProd = (P + n + extra) >>> 0;
    if (r.jump.k === 'beyond') newProd = (P + size + 1 + r.jump.by) >>> 0;
    if (r.jump.k === 'back') newProd = (P - 1 - r.jump.by) >>> 0;
    // What the backend will copy: written now, nothing changes these slots before it consumes them.
    const snap: Uint8Array[] = [];
    const tmpEntry = new RingEntry(this.abi.entrySize);
    if (!fatal) {
      for (let i = 0; i < n + extra; i++) {
        sring.copyOut((P + i) >>> 0, tmpEntry);
        snap.push(new Uint8Array(tmpEntry.bytes));
      }
    }
    const fatalBefore = (await this.status()).counters.fatal;
    this.responses = [];
    this.log.push(`round ${k}: ${n} slots${extra ? ` + ${extra} stale` : ''} ${built.map((b) => b.logical.kind).join(',')}; req_prod ${P} -> ${newProd}${r.scribble ? ' scribbled' : ''}${r.closeMidway ? ' close-midway' : ''}`);
    sring.reqProd = newProd;
    assert.equal(L.events.notify(this.port), 0);

    // Rewrite the published slots while the backend may be copying them: everything past the
    // bytes a response occupies (the backend may already have answered in that slot), so the
    // operation, id and response area stay, and sector, segments and indirect refs change.
    const scribbled: Uint8Array[] = [];
    if (r.scribble !== null && !fatal) {
      const from = this.abi.response.size;
      const pages = this.ringFrames.map((f) => L.memory.page(f));
      for (let j = 0; j < n; j++) {
        const base = sring.slotOffset((P + j) >>> 0);
        const e = new Uint8Array(snap[j]!);
        for (let b = from; b < this.abi.entrySize; b++) {
          const v = r.scribble[(b + j * 7) % r.scribble.length]!;
          e[b] = v;
          const at = base + b;
          pages[at >>> 12]![at & (XEN_PAGE_SIZE - 1)] = v;
        }
        scribbled.push(e);
      }
    }

    stats.stale += extra;
    stats.requests += n + extra;
    if (scribbled.length > 0) stats.scribbled++;
    if (r.closeMidway) {
      stats.midwayCloses++;
      return this.closeMidway(snap, fatal);
    }

    if (fatal) {
      await eventually(async () => {
        const st = await this.status();
        return st.counters.fatal === fatalBefore + 1 && (st.state === 'Closing' || st.state === 'Closed');
      }, `bogus req_prod ${newProd} (rsp_prod ${P}, ${size} slots): blkback counts a fatal and goes Closing`, WAIT);
      const st = await this.status();
      assert.equal(st.connected, false);
      assert.ok(st.error?.includes('req_prod'), `the error names req_prod: ${st.error}`);
      // A window in which an answer that must not come would land (no event marks its absence).
      await sleep(20);
      assert.equal(sring.rspProd, P, 'nothing is answered once req_prod is bogus');
      assert.equal(this.responses.length, 0);
      assert.equal(this.overflow, undefined);
      this.fatalSeen = true;
      await this.checkPages(`round ${k} (fatal)`);
      await this.checkImage(`round ${k} (fatal)`);
      return;
    }

    const expectN = n + extra;
    try {
      await eventually(() => this.responses.length >= expectN || this.overflow !== undefined, `${expectN} responses`, WAIT, 2);
    } catch (e) {
      const unseen = (sring.rspProd - this.ring.rspCons) >>> 0;
      const st = await this.status();
      throw new Error(`${(e as Error).message}: got ${this.responses.length}; rsp_prod ${sring.rspProd} (${unseen} published but never notified); ` +
        `blkback ${st.state}, connected ${st.connected}, inflight ${st.counters.inflight_req}, error ${st.error}`);
    }
    assert.equal(this.overflow, undefined, this.overflow);
    assert.equal(this.responses.length, expectN, 'no more responses than requests');
    assert.equal(sring.rspProd, newProd, 'rsp_prod stops at req_prod');

    // Ids as a multiset; each response's operation is its request's; statuses valid and, where
    // certain, the right one.
    const byId = new Map<bigint, { left: number; ops: Set<number>; expect: Expect[] }>();
    snap.forEach((bytes, i) => {
      const id = new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(this.abi.request.id, true);
      const e = byId.get(id) ?? { left: 0, ops: new Set<number>(), expect: [] };
      e.left++;
      e.ops.add(echoedOp(bytes));
      if (i < n && scribbled[i] !== undefined) e.ops.add(echoedOp(scribbled[i]!));
      const b = built[i];
      e.expect.push(b !== undefined && b.structured && scribbled[i] === undefined ? expectStatus(b.logical, this.v) : 'any');
      byId.set(id, e);
    });
    const okay = new Set<bigint>();
    for (const rsp of this.responses) {
      const e = byId.get(rsp.id);
      assert.ok(e !== undefined && e.left > 0, `response id ${rsp.id} answers no request the backend consumed (or answers one twice)`);
      e.left--;
      assert.ok(e.ops.has(rsp.operation), `response to id ${rsp.id} carries operation ${rsp.operation}, its request's was ${[...e.ops].join('/')}`);
      assert.ok([BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP].includes(rsp.status), `status ${rsp.status} is no blkif status`);
      stats.responses++;
      if (rsp.status === BLKIF_RSP_OKAY) stats.okay++;
      if (e.expect.length === 1 && e.expect[0] !== 'any') stats.exact++;
      if (e.expect.length === 1 && !statusMatches(rsp.status, e.expect[0]!)) {
        const i = snap.findIndex((b) => new DataView(b.buffer, b.byteOffset).getBigUint64(this.abi.request.id, true) === rsp.id);
        const why = ts.logs.filter((l) => l.includes(`request ${rsp.id} `)).slice(-1)[0] ?? '(no log line)';
        const lg = built[i]?.logical;
        const pagesNow = lg?.kind === 'indirect' ? lg.pages.map((r) => { const pg = this.pageByRef.get(r); return pg ? `ref ${r} frame ${pg.frame}: ${Buffer.from(pg.bytes.subarray(0, 16)).toString('hex')} (was ${Buffer.from(pg.initial.subarray(0, 16)).toString('hex')})` : `ref ${r}: not ours`; }).join('; ') : '';
        if (process.env.BLKIF_FUZZ_DEBUG === '1') console.log(this.debug.join('\n'));
        assert.fail(`indirect pages now: ${pagesNow}\nid ${rsp.id}: status ${rsp.status}, a correct backend answers ${e.expect[0]} (round ${k}): ` +
          `${JSON.stringify(built[i]?.logical, (_k, x) => (typeof x === 'bigint' ? x.toString() : x))}; blkback says ${why}`);
      }
      if (rsp.status === BLKIF_RSP_OKAY && e.expect.length === 1) okay.add(rsp.id);
    }
    for (const [id, e] of byId) assert.equal(e.left, 0, `request id ${id} was consumed but never answered`);

    if (process.env.BLKIF_FUZZ_DEBUG === '1') this.traceRound(k, snap, built);
    const st = await this.status();
    assert.equal(st.state, 'Connected');
    assert.equal(st.connected, true);
    assert.equal(st.counters.fatal, 0);
    assert.equal(st.counters.inflight_req, 0, 'nothing in flight once everything is answered');
    if (this.spec.mode !== 'persistent') {
      assert.equal(ts.hv.domainCounters(back.domid)!.mapsActive, backBase[1]! + this.ringRefs.length, 'no data or indirect page stays mapped once answered');
    }
    await this.checkPages(`round ${k}`);
    const image = await this.checkImage(`round ${k}`);
    if (scribbled.length === 0) this.checkData(k, snap, built, okay, image);
  }

  /** READs answered OKAY delivered the disk's bytes; WRITEs answered OKAY landed where they said. */
  private checkData(k: number, snap: Uint8Array[], built: Built[], okay: Set<bigint>, image: Uint8Array): void {
    const all = snap.map((b) => this.touches(b));
    const readCount = new Map<number, number>();
    for (const t of all) for (const d of t.readDests) readCount.set(d.frame, (readCount.get(d.frame) ?? 0) + 1);
    const overlaps = (i: number, a: number, b: number) =>
      all.some((t, j) => j !== i && t.diskWrites.some(([x, y]) => x < b && a < y));
    snap.forEach((bytes, i) => {
      const b = built[i];
      if (b === undefined || !b.structured) return;
      const id = new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(this.abi.request.id, true);
      if (!okay.has(id)) return;
      const t = all[i]!;
      for (const d of t.readDests) {
        if (readCount.get(d.frame) !== 1 || overlaps(i, d.disk, d.disk + d.to - d.from)) continue;
        const page = L.memory.page(d.frame);
        const at = firstDifference(page.subarray(d.from, d.to), image.subarray(d.disk, d.disk + d.to - d.from));
        if (at !== -1 && process.env.BLKIF_FUZZ_DEBUG === '1') this.explain(image, d.disk + at);
        stats.readsVerified++;
        assert.equal(at, -1, `round ${k}: READ id ${id} answered OKAY put other bytes than the disk's at ${d.disk} into page ${d.frame}+${d.from} (byte ${at})`);
      }
      for (const w of t.writeSources) {
        if ((readCount.get(w.frame) ?? 0) !== 0 || overlaps(i, w.disk, w.disk + w.to - w.from)) continue;
        const page = L.memory.page(w.frame);
        const at = firstDifference(image.subarray(w.disk, w.disk + w.to - w.from), page.subarray(w.from, w.to));
        if (at !== -1 && process.env.BLKIF_FUZZ_DEBUG === '1') this.explain(image, w.disk + at);
        stats.writesVerified++;
        assert.equal(at, -1, `round ${k}: WRITE id ${id} answered OKAY did not put page ${w.frame}+${w.from} at disk byte ${w.disk} (byte ${at})`);
      }
    });
  }

  /** BLKIF_FUZZ_DEBUG=1: what each slot of the round was, got and touched, and the pages' sectors. */
  private traceRound(k: number, snap: Uint8Array[], built: Built[]): void {
    const h = (b: Uint8Array) => Buffer.from(b.subarray(0, 4)).toString('hex');
    const img = new Uint8Array(readFileSync(this.imagePath));
    const big = (_k: string, x: unknown) => (typeof x === 'bigint' ? x.toString() : x);
    this.debug.push(`-- round ${k}: pages ${[...this.pageByRef.values()].map((p) => `${p.frame}:${[0, 1, 2, 3, 4, 5, 6, 7].map((x) => h(p.bytes.subarray(x * 512))).join('.')}`).join(' ')}`);
    snap.forEach((bytes, i) => {
      const id = new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(this.abi.request.id, true);
      const rs = this.responses.filter((x) => x.id === id).map((x) => x.status);
      const t = this.touches(bytes);
      this.debug.push(`  slot ${i} id ${id} status ${rs} ${built[i] ? JSON.stringify(built[i]!.logical, big) : 'stale'} writes ${JSON.stringify(t.diskWrites)} ` +
        `reads-into ${JSON.stringify(t.readDests.map((d) => [d.frame, d.from, d.disk, h(img.subarray(d.disk))]))} sources ${JSON.stringify(t.writeSources.map((d) => [d.frame, d.from, d.disk, h(img.subarray(d.disk))]))}`);
    });
  }

  /** BLKIF_FUZZ_DEBUG=1: where the bytes of a disk sector that fails a data check come from, and the rounds so far. */
  private explain(image: Uint8Array, at: number): void {
    const want = sectorKey(image, at - (at % SECTOR));
    const from: string[] = [];
    for (const [ref, p] of this.pageByRef) {
      for (let o = 0; o < XEN_PAGE_SIZE; o += SECTOR) {
        if (sectorKey(p.bytes, o) === want) from.push(`page ref ${ref} frame ${p.frame} +${o} now`);
        if (sectorKey(p.initial, o) === want) from.push(`page ref ${ref} frame ${p.frame} +${o} initially`);
      }
    }
    for (let o = 0; o + SECTOR <= this.storageSize; o += SECTOR) if (sectorKey(this.original, o) === want) from.push(`image sector ${o / SECTOR} initially`);
    console.log(`disk byte ${at}: the sector's bytes are those of ${from.join(', ') || 'nothing known'}\n${this.debug.join('\n')}`);
  }

  /** A Closing written right after a batch: answers only to consumed requests, then Closed, then quiet. */
  private async closeMidway(snap: Uint8Array[], fatal: boolean): Promise<void> {
    this.closedByFrontend = true;
    await this.writeState('5');
    await waitForState(ts.xs, this.paths.backDir, (st) => st === XenbusStateClosed, WAIT);
    await this.settle('Closed', 'Closing in the middle of a batch');
    if (!fatal) {
      const left = new Map<bigint, number>();
      for (const bytes of snap) {
        const id = new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(this.abi.request.id, true);
        left.set(id, (left.get(id) ?? 0) + 1);
      }
      for (const rsp of this.responses) {
        const c = left.get(rsp.id) ?? 0;
        assert.ok(c > 0, `response id ${rsp.id} answers no published request (or one twice)`);
        left.set(rsp.id, c - 1);
      }
      assert.equal(this.overflow, undefined, this.overflow);
    }
    await this.checkQuietOnceClosed('Closing in the middle of a batch');
  }

  /** Once blkback is Closed: nothing of ours is mapped and the ring no longer changes. */
  private async checkQuietOnceClosed(what: string): Promise<void> {
    for (const ref of this.refs) assert.equal(L.grants.isMapped(ref), false, `${what}: ref ${ref} still mapped by a Closed backend`);
    const before = this.ringFrames.map((f) => new Uint8Array(L.memory.page(f)));
    // A window in which a Closed backend that still wrote the ring would show (no event marks its absence).
    await sleep(30);
    this.ringFrames.forEach((f, i) => assert.equal(firstDifference(L.memory.page(f), before[i]!), -1, `${what}: ring page ${i} changed after blkback went Closed`));
    for (const ref of this.refs) assert.equal(L.grants.isMapped(ref), false, `${what}: ref ${ref} mapped again after blkback went Closed`);
  }

  private async statesC(): Promise<void> {
    // The ring's indexes mean nothing to a backend that reconnects at 0: stop tracking responses.
    this.ignoreEvents = true;
    stats.stateSequences++;
    for (const st of this.spec.statesC) {
      await this.writeState(st);
      this.log.push(`late state ${JSON.stringify(st)}`);
      // Jitter between the hostile state writes: part of the sequence the case generates.
      if (this.prng.chance(0.5)) await sleep(this.prng.int(0, 5));
      await this.status();
    }
    // Room for blkback to act on the late states before the checks; these hold whatever it did
    // (or had not yet done) with them, so this is scenario, not synchronisation.
    await sleep(20);
  }

  // ---- checks

  private async checkPages(what: string): Promise<void> {
    const unchanged = (p: Page, kind: string) =>
      assert.equal(firstDifference(p.bytes, p.initial), -1, `${what}: a page ${kind} was written`);
    for (const p of this.pools.get('ro') ?? []) unchanged(p, 'granted read-only');
    for (const p of this.pools.get('foreign') ?? []) unchanged(p, 'granted to another domain');
    for (const p of this.pools.get('never') ?? []) unchanged(p, 'never granted');
    for (const p of this.pools.get('ended') ?? []) unchanged(p, 'whose grant was ended');
    for (const { page, readonly } of this.indirectPages) if (readonly) unchanged(page, 'granted read-only (indirect)');
  }

  private async checkImage(what: string): Promise<Uint8Array> {
    const now = new Uint8Array(readFileSync(this.imagePath));
    assert.equal(now.length, this.original.length, `${what}: the image changed size`);
    const tailAt = firstDifference(now.subarray(this.storageSize), this.original.subarray(this.storageSize));
    assert.equal(tailAt, -1, `${what}: byte ${this.storageSize + tailAt} past the disk's end was written`);
    if (this.readOnly) {
      const at = firstDifference(now, this.original);
      assert.equal(at, -1, `${what}: a read-only VBD's image was written at byte ${at}`);
    } else {
      for (let at = 0; at + SECTOR <= this.storageSize; at += SECTOR) {
        assert.ok(this.allowed.has(sectorKey(now, at)), `${what}: disk sector ${at / SECTOR} holds bytes from neither the image, a granted page, nor zeroes`);
      }
    }
    return now;
  }

  // ---- teardown

  private async close(): Promise<void> {
    this.ignoreEvents = true;
    await this.writeState('5');
    await waitForState(ts.xs, this.paths.backDir, (st) => st === XenbusStateClosed, WAIT);
    await this.settle('Closed', 'closing');
    await this.writeState('6');
    await this.checkQuietOnceClosed('closing');
    await this.checkPages('closed');
    await within(back.rpc.call('removeVbd', this.paths.backDir), 'removeVbd', WAIT);
    this.removed = true;
    await removeVbdNodes(ts.xs, this.paths);
    assert.deepEqual(resources(back.domid), backBase, 'the driver domain is back to its baseline (grants, maps, ports, channels)');
    await this.checkImage('after removal');
    this.release(true);
    assert.deepEqual(resources(L.domid), lBase, 'the raw frontend holds nothing any more');
  }

  private release(strict: boolean): void {
    this.off?.();
    this.off = undefined;
    for (const ref of this.refs.splice(0)) {
      const ok = L.grants.endAccess(ref);
      if (strict) assert.ok(ok, `ref ${ref} still mapped after the VBD was removed`);
    }
    if (this.frames.length > 0) L.memory.free(this.frames.splice(0));
    if (this.port > 0) {
      const rc = L.events.close(this.port);
      if (strict) assert.equal(rc, 0);
      this.port = -1;
    }
  }

  private async cleanup(): Promise<void> {
    if (this.plugged && !this.removed) {
      // Best effort after a run that failed (or left its VBD half gone): that failure is the one
      // reported; the passing path removes its VBD itself and checks it.
      await ts.xs.write(`${this.paths.frontDir}/${XS_STATE}`, '6').catch(() => undefined); // static-check: allow best-effort cleanup (above)
      await within(back.rpc.call('removeVbd', this.paths.backDir), 'removeVbd (cleanup)', WAIT).catch(() => undefined); // static-check: allow best-effort cleanup (above)
      await removeVbdNodes(ts.xs, this.paths).catch(() => undefined); // static-check: allow best-effort cleanup (above)
    }
    this.release(false);
  }
}

function describeCase(s: CaseSpec): string {
  return `${s.abi} order ${s.order} ${s.mode} ro=${s.readOnly} ${s.sectorSize}-byte sectors, ${s.imageSectors} sectors + ${s.tail}, ` +
    `indirect ${s.maxIndirect}, features ${JSON.stringify(s.features)}, pools ${JSON.stringify(s.pools)}, ` +
    `states A ${JSON.stringify(s.statesA)} C ${JSON.stringify(s.statesC)}, ${s.rounds.length} rounds`;
}

test('blkback against a hostile raw frontend: no crash, no hang, no stray access, every consumed request answered or the frontend disconnected', async (t) => {
  let fatals = 0;
  let rounds = 0;
  const runs = fuzzRuns(25);
  await runProperty(t, 'hostile frontend', caseSpec, async (spec, n) => {
    const c = new FrontCase(spec, n);
    await c.run();
    if (c.fatalSeen) fatals++;
    // The frontend's 'ended' segments make the backend map (or copy) grants it ended: the checked
    // hypervisor reports those, and nothing else (anything else would be the backend's fault).
    for (const v of ts.hv.takeViolations()) {
      assert.ok((v.kind === 'ended-grant-mapped' || v.kind === 'ended-grant-copied') && v.domid === back.domid && v.peer === L.domid,
        `unexpected violation: ${v.kind}: ${v.message}`);
      stats.endedUses++;
    }
    rounds += spec.rounds.length;
    // Still alive and answering for the next case.
    assert.ok(ts.hv.domain(back.domid) !== undefined, 'the driver domain is alive');
  }, runs, () => `${stats.requests} hostile ring requests in ${rounds} rounds, ${fatals} ring floods; ${JSON.stringify(stats)}`);
  // The checks ran: requests answered OKAY, reads and writes verified against the disk (tens of
  // each per case).
  assertChecksRan(runs, stats.okay > 0 && stats.exact > 0 && stats.readsVerified > 0 && stats.writesVerified > 0, JSON.stringify(stats));
});

// ---------------------------------------------------------------------------------------------
// DataPath.stop() at a random moment.

interface SlowReq { op: 'read' | 'write' | 'barrier' | 'flush' | 'discard' | 'bogus'; pages: number; sector: number; ticks: number }
interface StopSpec { mode: 'map' | 'persistent' | 'copy'; reqs: SlowReq[]; stopAfter: number; holdAll: boolean }

const stopSpec: fc.Arbitrary<StopSpec> = fc.record({
  mode: fc.constantFrom('map' as const, 'persistent' as const, 'copy' as const),
  reqs: fc.array(fc.record({
    op: fc.oneof(
      { weight: 3, arbitrary: fc.constantFrom('read' as const, 'write' as const) },
      { weight: 1, arbitrary: fc.constantFrom('barrier' as const, 'flush' as const, 'discard' as const, 'bogus' as const) },
    ),
    pages: fc.integer({ min: 0, max: 3 }),
    sector: fc.integer({ min: 0, max: 255 }).map((x) => x * 8),
    ticks: fc.integer({ min: 0, max: 6 }),
  }), { minLength: 1, maxLength: 24 }),
  stopAfter: fc.integer({ min: 0, max: 8 }),
  holdAll: fc.boolean(),
});

/** Storage over memory whose every operation waits its turn: a number of event-loop turns, or a gate. */
class SlowStorage implements BlockStorage {
  readonly size: number;
  readonly sectorSize = 512;
  readonly readOnly = false;
  readonly canDiscard = true;
  private held: (() => void)[] = [];
  hold = false;
  constructor(private readonly mem: MemoryStorage, private readonly ticks: number[]) {
    this.size = mem.size;
  }
  private async turn(): Promise<void> {
    if (this.hold) {
      await new Promise<void>((r) => this.held.push(r));
      return;
    }
    const n = this.ticks.shift() ?? 0;
    for (let i = 0; i < n; i++) await new Promise<void>((r) => setImmediate(r));
  }
  releaseAll(): void {
    this.hold = false;
    for (const r of this.held.splice(0)) r();
  }
  async read(o: number, b: readonly Uint8Array[]): Promise<void> { await this.turn(); return this.mem.read(o, b); }
  async write(o: number, b: readonly Uint8Array[]): Promise<void> { await this.turn(); return this.mem.write(o, b); }
  async flush(): Promise<void> { await this.turn(); }
  async discard(o: number, l: number): Promise<void> { await this.turn(); return this.mem.discard(o, l); }
  async writeZeroes(o: number, l: number): Promise<void> { await this.turn(); return this.mem.writeZeroes(o, l); }
  async refreshSize(): Promise<number> { return this.size; }
  async close(): Promise<void> {}
}

test('DataPath.stop() at a random moment answers everything consumed before resolving and touches nothing afterwards', async (t) => {
  let consumedAtStop = 0;
  const runs = fuzzRuns(60, 2);
  await runProperty(t, 'data path stop', stopSpec, async (spec) => {
    const F = ts.hv.createLocalDomain({ memoryPages: 256, pollMicros: 0 });
    const B = ts.hv.createLocalDomain({ memoryPages: 256, pollMicros: 0 });
    const abi = X86_64_ABI;
    let dp: DataPath | undefined;
    let storage: SlowStorage | undefined;
    try {
      const [rf] = F.memory.alloc(1);
      const fr = FrontRing.init(new SharedRing([F.memory.page(rf!)], abi.entrySize));
      const ringRef = F.grants.grantAccess(B.domid, rf!, false, { lasting: true });
      const m = B.grants.map([{ dom: F.domid, ref: ringRef, flags: GNTMAP_host_map }])[0]!;
      const br = new BackRing(new SharedRing([m.page!], abi.entrySize));
      const fport = F.events.allocUnbound(B.domid);
      const bport = B.events.bindInterdomain(F.domid, fport);
      const counters = newVbdCounters();
      storage = new SlowStorage(new MemoryStorage(1 << 20), spec.reqs.map((r) => r.ticks));
      const deps = { xen: B, frontDomid: F.domid, counters };
      const access: PageAccess = spec.mode === 'copy' ? new GrantCopy(deps, new BouncePool(B, B.memory.alloc(64)))
        : spec.mode === 'persistent' ? new PersistentMaps(deps, { max: 1056, idleMs: 60_000 }) : new MapPerRequest(deps);
      dp = new DataPath({
        xen: B, frontDomid: F.domid, ring: br, abi, port: bport, storage, access,
        limits: () => ({ sectors: 2048, sectorSize: 512, readOnly: false, flush: true, barrier: true, discard: true, discardSecure: true }),
        maxIndirectSegments: 32, maxPending: 32, counters, onFatal: () => undefined, log: () => undefined,
      });
      const e = new RingEntry(abi.entrySize);
      spec.reqs.forEach((r, i) => {
        const frames = r.pages === 0 ? [] : F.memory.alloc(r.pages);
        const seg = frames.map((f) => ({ gref: F.grants.grantAccess(B.domid, f, false), first_sect: 0, last_sect: 7 }));
        const id = BigInt(i);
        const sector = BigInt(r.sector);
        switch (r.op) {
          case 'read':
          case 'write':
            encodeRequest(e.view, 0, abi, { operation: r.op === 'read' ? BLKIF_OP_READ : BLKIF_OP_WRITE, nr_segments: Math.max(1, seg.length), handle: 0, id, sector_number: sector, seg });
            break;
          case 'barrier':
          case 'flush':
            encodeRequest(e.view, 0, abi, { operation: r.op === 'barrier' ? BLKIF_OP_WRITE_BARRIER : BLKIF_OP_FLUSH_DISKCACHE, nr_segments: seg.length, handle: 0, id, sector_number: sector, seg });
            break;
          case 'discard':
            encodeRequest(e.view, 0, abi, { operation: BLKIF_OP_DISCARD, flag: 0, handle: 0, id, sector_number: sector, nr_sectors: 8n });
            break;
          default:
            encodeRequestOther(e.view, 0, abi, 9, id);
        }
        assert.ok(fr.produceRequest(e));
      });
      if (spec.holdAll) storage.hold = true;
      fr.pushRequests();
      F.events.notify(fport);
      for (let i = 0; i < spec.stopAfter; i++) await new Promise<void>((r) => setImmediate(r));
      const stopping = dp.stop();
      // Let whatever was held go only once stop() has started waiting.
      await new Promise<void>((r) => setImmediate(r));
      storage.releaseAll();
      await within(stopping, 'DataPath.stop()', WAIT);
      const at = {
        inflight: counters.inflight_req,
        reqCons: br.reqCons,
        rspProdPvt: br.rspProdPvt,
        rspProd: br.sring.rspProd,
        maps: B.counters.domain(B.domid)!.mapsActive,
        mapOps: B.counters.domain(B.domid)!.mapOps,
        copyOps: counters.grant_copy_ops,
      };
      consumedAtStop += at.reqCons;
      assert.equal(at.inflight, 0, `stop() resolved with ${at.inflight} request(s) still being served`);
      assert.equal(at.rspProdPvt, at.reqCons, `stop() resolved with ${at.reqCons - at.rspProdPvt} consumed request(s) unanswered`);
      assert.equal(at.rspProd, at.rspProdPvt, 'every answer is published when stop() resolves');
      if (spec.mode !== 'persistent') assert.equal(at.maps, 1, 'only the ring is mapped when stop() resolves');
      // Whatever the storage still had to do is done by now; nothing may have moved since.
      storage.releaseAll();
      for (let i = 0; i < 10; i++) await new Promise<void>((r) => setImmediate(r));
      // A pause in which a data path still at work would move something (no event marks its
      // being idle); a busy machine can only hide a fault here, not fail the test.
      await sleep(5);
      assert.deepEqual({
        inflight: counters.inflight_req,
        reqCons: br.reqCons,
        rspProdPvt: br.rspProdPvt,
        rspProd: br.sring.rspProd,
        maps: B.counters.domain(B.domid)!.mapsActive,
        mapOps: B.counters.domain(B.domid)!.mapOps,
        copyOps: counters.grant_copy_ops,
      }, at, 'the data path touched the ring or the frontend\'s pages after stop() resolved');
      access.clear();
      B.grants.unmap([m.handle]);
      B.events.close(bport);
    } finally {
      storage?.releaseAll();
      await ts.hv.destroyDomain(B.domid);
      await ts.hv.destroyDomain(F.domid);
    }
  }, runs);
  // The stops found requests to answer (not only idle rings).
  assertChecksRan(runs, consumedAtStop > 0, 'no stop() came with consumed requests');
});
