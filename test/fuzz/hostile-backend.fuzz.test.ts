/**
 * Fuzz: a hostile backend against a real Blkfront. The backend is hand-written, in a local domain
 * of the main thread: it offers whatever xenstore features fast-check makes (valid, absurd or not
 * numbers at all), maps blkfront's rings (multi-page, multi-queue), and answers its requests
 * with the right data most of the time, and otherwise with wrong statuses, wrong operations,
 * unknown or duplicate ids, random bytes, answers held back and given out of order, pages kept
 * mapped after answering, `rsp_prod` moved within or beyond the ring, disconnections in the
 * middle of I/O, and disappearances. Blkfront runs in another local domain and serves batches of
 * concurrent reads, writes, flushes and discards, some of them out of range or misaligned.
 *
 * Properties:
 * - blkfront never crashes and never hangs: every I/O settles within its bound (the backend
 *   answers, breaks the protocol, or goes away, and blkfront's connect timeout covers the last);
 *   close() settles too;
 * - a read resolves only with the bytes the backend put in the granted pages of valid OKAY
 *   responses (right id, pending, right operation, pages let go) to requests it consumed after
 *   the read was issued; a write, flush or discard resolves only on such responses, and a write's
 *   pages held the caller's data; a resolved read's buffer never changes afterwards;
 * - blkfront keeps to what was negotiated: ring order, queues, indirect segments, features,
 *   disk size and sector size, ids of pending requests only;
 * - with a backend that behaves and offers sane features, every valid I/O succeeds with the
 *   right data;
 * - after close(), every grant of the guest is ended, except pages the backend still maps and
 *   blkfront reported as leaked.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
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
  XS_EVENT_CHANNEL,
  XS_FEATURE_BARRIER,
  XS_FEATURE_DISCARD,
  XS_FEATURE_FLUSH_CACHE,
  XS_FEATURE_MAX_INDIRECT_SEGMENTS,
  XS_FEATURE_PERSISTENT,
  XS_INFO,
  XS_MAX_RING_PAGE_ORDER,
  XS_MULTI_QUEUE_MAX_QUEUES,
  XS_MULTI_QUEUE_NUM_QUEUES,
  XS_PHYSICAL_SECTOR_SIZE,
  XS_PROTOCOL,
  XS_RING_PAGE_ORDER,
  XS_RING_REF,
  XS_SECTORS,
  XS_SECTOR_SIZE,
  abiByName,
  decodeRequest,
  decodeResponse,
  decodeSegment,
  encodeResponse,
  xsQueueDir,
  xsRingRefN,
  type BlkifAbi,
  type BlkifSegment,
} from '../../src/abi/index.js';
import { Blkfront, type BlkfrontOptions } from '../../src/blkfront/index.js';
import { BackRing, RING_CONSUMED, RING_PEER_OVERFLOW, RingEntry, SharedRing } from '../../src/ring/index.js';
import { Toolstack, createVbdNodes, removeVbdNodes, type VbdPaths } from '../../src/toolstack/index.js';
import { GNTMAP_host_map, GNTMAP_readonly, GNTST_okay, type XenDomain } from '../../src/xen/index.js';
import { XS_STATE, parseXenbusState } from '../../src/xenbus/index.js';
import { Prng, assertChecksRan, firstDifference, fuzzRuns, runProperty, sleep, within } from './support.js';
import { unlessGone } from '../support/common.js';

const SECTOR = 512;
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
/** Blkfront's wait for a backend; I/O must settle within this plus SLACK of being issued. */
const CONNECT_MS = 600;
const SLACK_MS = 4000;

// ---------------------------------------------------------------------------------------------
// A case.

type Feature = string | null;
interface Features {
  maxIndirect: Feature;
  maxOrder: Feature;
  maxQueues: Feature;
  persistent: Feature;
  sectors: Feature;
  sectorSize: Feature;
  physical: Feature;
  info: Feature;
  flush: Feature;
  barrier: Feature;
  discard: Feature;
}
interface Faults {
  /** Per response: wrong status, wrong operation, unknown id, a duplicate, random bytes, pages kept mapped, held back. */
  status: number;
  wrongOp: number;
  unknownId: number;
  dup: number;
  garbage: number;
  keepMap: number;
  delay: number;
  /** Per push: rsp_prod a little too far (stale slots), or beyond the ring. */
  staleJump: number;
  overflow: number;
  /** Per batch of requests: the backend disconnects (Closing) instead of answering. */
  bounce: number;
  /** After a disconnection the backend never comes back. */
  vanish: boolean;
  /** Pages (and ring) stay mapped when the backend closes. */
  keepMapOnClose: boolean;
}
interface IoSpec {
  kind: 'read' | 'write' | 'flush' | 'discard';
  frac: number;
  units: number;
  odd: 'none' | 'misalign' | 'beyond' | 'negative';
}
interface BeCase {
  seed: number;
  fe: { ringPageOrder: number; queues: number; maxIndirectSegments: number; persistent: boolean; bufferPages: number; protocol: string };
  features: Features;
  faults: Faults | null;
  batches: IoSpec[][];
  closeWhileBusy: boolean;
}

const maybe = (valid: fc.Arbitrary<string>, bogus: readonly string[], w = [6, 1, 1]): fc.Arbitrary<Feature> =>
  fc.oneof(
    { weight: w[0]!, arbitrary: valid },
    { weight: w[1]!, arbitrary: fc.constantFrom(...bogus) },
    { weight: w[2]!, arbitrary: fc.constant(null) },
  );

const features: fc.Arbitrary<Features> = fc.record({
  maxIndirect: maybe(fc.constantFrom('32', '64', '256', '1024', '4096'), ['4294967295', '-1', 'abc', '0', '12', '4097', '11', ' 64', '']),
  maxOrder: maybe(fc.constantFrom('0', '1', '2', '3', '4'), ['99', '-1', 'x', '']),
  maxQueues: maybe(fc.constantFrom('1', '2', '4'), ['0', '1000', 'q', '-3']),
  persistent: maybe(fc.constantFrom('0', '1'), ['junk', '2', ' 1', '1.0']),
  sectors: fc.oneof(
    { weight: 14, arbitrary: fc.integer({ min: 64, max: 1 << 22 }).map(String) },
    { weight: 1, arbitrary: fc.constantFrom('18446744073709551615', '-5', 'garbage', '9007199254740991', '0', '1e6', '', '4611686018427387904') },
  ),
  sectorSize: fc.oneof(
    { weight: 10, arbitrary: fc.constantFrom('512', '4096') },
    { weight: 2, arbitrary: fc.constant(null) },
    { weight: 1, arbitrary: fc.constantFrom('0', '3', '8192', '1024', '2048', 'x') },
  ),
  physical: maybe(fc.constantFrom('512', '4096'), ['0', '999', 'p']),
  info: maybe(fc.constant('0'), ['4', '5', 'x', '1'], [8, 1, 2]),
  flush: maybe(fc.constantFrom('0', '1'), ['yes', '2']),
  barrier: maybe(fc.constantFrom('0', '1'), ['yes', '2']),
  discard: maybe(fc.constantFrom('0', '1'), ['yes', '2']),
});

const p = (max: number) => fc.oneof({ weight: 2, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: 1, max: 100 }).map((x) => (x / 100) * max) });

const faults: fc.Arbitrary<Faults | null> = fc.oneof(
  { weight: 1, arbitrary: fc.constant(null) },
  {
    weight: 3,
    arbitrary: fc.record({
      status: p(0.2),
      wrongOp: p(0.05),
      unknownId: p(0.05),
      dup: p(0.05),
      garbage: p(0.05),
      keepMap: p(0.05),
      delay: p(0.4),
      staleJump: p(0.05),
      overflow: p(0.03),
      bounce: p(0.15),
      vanish: fc.oneof({ weight: 4, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
      keepMapOnClose: fc.oneof({ weight: 4, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
    }),
  },
);

const io: fc.Arbitrary<IoSpec> = fc.record({
  kind: fc.oneof(
    { weight: 4, arbitrary: fc.constant('read' as const) },
    { weight: 3, arbitrary: fc.constant('write' as const) },
    { weight: 1, arbitrary: fc.constantFrom('flush' as const, 'discard' as const) },
  ),
  frac: fc.integer({ min: 0, max: 9999 }),
  units: fc.oneof({ weight: 4, arbitrary: fc.integer({ min: 1, max: 16 }) }, { weight: 1, arbitrary: fc.integer({ min: 17, max: 300 }) }),
  odd: fc.oneof(
    { weight: 20, arbitrary: fc.constant('none' as const) },
    { weight: 1, arbitrary: fc.constantFrom('misalign' as const, 'beyond' as const, 'negative' as const) },
  ),
});

const beCase: fc.Arbitrary<BeCase> = fc.record({
  seed: fc.integer(),
  fe: fc.record({
    ringPageOrder: fc.oneof({ weight: 2, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: 1, max: 4 }) }),
    queues: fc.oneof({ weight: 2, arbitrary: fc.constant(1) }, { weight: 1, arbitrary: fc.integer({ min: 2, max: 4 }) }),
    maxIndirectSegments: fc.constantFrom(0, 32, 256, 1024),
    persistent: fc.boolean(),
    bufferPages: fc.constantFrom(16, 64, 300),
    protocol: fc.constantFrom('x86_64-abi', 'x86_32-abi'),
  }),
  features,
  faults,
  // Cases are dear (two domains each): many I/Os in each.
  batches: fc.array(fc.array(io, { minLength: 1, maxLength: 12, size: 'max' }), { minLength: 1, maxLength: 6, size: 'max' }),
  closeWhileBusy: fc.oneof({ weight: 4, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
});

// ---------------------------------------------------------------------------------------------

let ts: Toolstack;
let devSeq = 0;
before(async () => {
  ts = await Toolstack.start();
});
after(async () => {
  await ts?.shutdown();
});
after(() => {
  console.log(`hostile-backend suite: ${stats.responses} hostile responses sent`);
});

const stats = { responses: 0, cases: 0, connected: 0, ios: 0, resolved: 0, rejected: 0, readsChecked: 0, broken: 0, bounces: 0, leaked: 0 };

/** A number as blkfront may fairly read it: decimal digits, surrounding blanks allowed. */
function num(t: Feature): number | undefined {
  if (t === null) return undefined;
  const s = t.trim();
  if (!/^\d{1,16}$/.test(s)) return undefined;
  const n = Number(s);
  return n <= Number.MAX_SAFE_INTEGER ? n : undefined;
}
const offered = (t: Feature): boolean => num(t) === 1;

/** One request as the raw backend consumed it. */
interface Req {
  q: number;
  id: bigint;
  /** The operation its response must carry. */
  op: number;
  kind: 'read' | 'write' | 'flush' | 'barrier' | 'discard' | 'other';
  /** Disk range in 512-byte sectors. */
  sector: number;
  count: number;
  segs: BlkifSegment[];
  /** Mapped pages: one per segment (a view of blkfront's page), and every handle held. */
  pages: Uint8Array[];
  handles: number[];
  /** Global sequence number when consumed. */
  seq: number;
  /** WRITE: the bytes blkfront handed over, per segment. */
  written: Uint8Array | undefined;
  mapFailed: boolean;
  /** Answered with its pages still mapped (the fault). */
  keptMapped: boolean;
}

/** What a valid response settled, for the checks of resolved I/O. */
interface Settled {
  kind: Req['kind'];
  seq: number;
  status: number;
  sector: number;
  count: number;
  /** READ answered OKAY: the bytes in its pages when answered; WRITE: the bytes it carried. */
  data: Uint8Array | undefined;
}

interface QueueConn {
  index: number;
  ring: BackRing;
  ringHandles: number[];
  port: number;
  off: () => void;
  entry: RingEntry;
  /** Next response slot (our own count: faults may publish more or fewer than consumed). */
  rspIdx: number;
  /** Consumed and not answered (backend's view), by id. */
  outstanding: Map<bigint, Req>;
  fresh: Req[];
  held: Req[];
  timer: NodeJS.Timeout | undefined;
  dead: boolean;
  /**
   * A response on this ring stops blkfront: it believes nothing after it here. Other rings'
   * valid responses it may still believe (it takes the queues' events in any order), so they
   * count as settled.
   */
  broken: boolean;
}

class RawBackend {
  readonly violations: string[] = [];
  readonly log: string[] = [];
  readonly settled: Settled[] = [];
  seq = 0;
  /** Blkfront is (or may be) broken: nothing after this is a valid response. */
  broken = false;
  persistent = false;
  keptAny = false;
  conn: { abi: BlkifAbi; queues: QueueConn[] } | undefined;
  state = 1;
  vanished = false;
  bounces = 0;
  private serial: Promise<void> = Promise.resolve();
  private readonly token: string;
  /** Mappings kept past a response or a close (the fault), to let go at the very end. */
  readonly kept: number[] = [];
  readonly sectors: number | undefined;
  readonly align: number;
  private readonly prng: Prng;

  constructor(readonly c: BeCase, readonly G: XenDomain, readonly B: XenDomain, readonly paths: VbdPaths) {
    this.prng = new Prng(c.seed ^ 0x5bd1e995);
    this.token = `raw-backend-${paths.backDir}`;
    const sectors = num(c.features.sectors);
    this.sectors = sectors;
    const ss = num(c.features.sectorSize) ?? 512;
    this.align = [512, 1024, 2048, 4096].includes(ss) ? ss / SECTOR : 1;
  }

  private get f(): Faults | null {
    return this.c.faults;
  }

  private chance(p: number | undefined): boolean {
    return p !== undefined && p > 0 && this.prng.chance(p);
  }

  private violate(why: string): void {
    if (this.violations.length < 20) this.violations.push(why);
  }

  private enqueue(fn: () => Promise<void>): void {
    this.serial = this.serial.then(fn).catch((e: unknown) => this.violate(`raw backend control path: ${(e as Error).message}`));
  }

  async start(): Promise<void> {
    const { xs } = ts;
    const b = this.paths.backDir;
    const f = this.c.features;
    const put: [string, Feature][] = [
      [XS_FEATURE_MAX_INDIRECT_SEGMENTS, f.maxIndirect], [XS_MAX_RING_PAGE_ORDER, f.maxOrder], [XS_MULTI_QUEUE_MAX_QUEUES, f.maxQueues],
      [XS_FEATURE_PERSISTENT, f.persistent], [XS_SECTORS, f.sectors], [XS_SECTOR_SIZE, f.sectorSize], [XS_PHYSICAL_SECTOR_SIZE, f.physical],
      [XS_INFO, f.info], [XS_FEATURE_FLUSH_CACHE, f.flush], [XS_FEATURE_BARRIER, f.barrier], [XS_FEATURE_DISCARD, f.discard],
    ];
    for (const [k, v] of put) if (v !== null) await xs.write(`${b}/${k}`, v);
    await this.setState(2);
    await xs.watch(`${this.paths.frontDir}/${XS_STATE}`, this.token, () => this.enqueue(() => this.frontendChanged()));
  }

  async stop(): Promise<void> {
    await ts.xs.unwatch(`${this.paths.frontDir}/${XS_STATE}`, this.token);
    await this.serial;
  }

  private async setState(s: number): Promise<void> {
    this.state = s;
    await ts.xs.write(`${this.paths.backDir}/${XS_STATE}`, String(s));
  }

  private async frontendChanged(): Promise<void> {
    const fs = parseXenbusState(await unlessGone(ts.xs.read(`${this.paths.frontDir}/${XS_STATE}`)));
    switch (fs) {
      case 3:
      case 4:
        if (this.conn === undefined && this.state === 2 && !this.vanished) await this.connect();
        break;
      case 5:
      case 6:
        this.disconnect(this.f?.keepMapOnClose === true);
        if (this.state !== 6) await this.setState(6);
        break;
      case 1:
        if (this.state === 6 && !this.vanished) await this.setState(2);
        break;
      default:
    }
  }

  private async connect(): Promise<void> {
    const { xs } = ts;
    const fd = this.paths.frontDir;
    const opt = (k: string) => unlessGone(xs.read(`${fd}/${k}`));
    const abi = abiByName((await opt(XS_PROTOCOL)) ?? 'x86_32-abi');
    if (abi === undefined) return this.violate('blkfront wrote an unknown protocol');
    const orderText = await opt(XS_RING_PAGE_ORDER);
    const order = orderText === undefined ? 0 : Number(orderText);
    const nqText = await opt(XS_MULTI_QUEUE_NUM_QUEUES);
    const nq = nqText === undefined ? 1 : Number(nqText);
    const f = this.c.features;
    const maxOrder = Math.min(num(f.maxOrder) ?? 0, 4);
    if (!(order >= 0 && order <= Math.min(maxOrder, this.c.fe.ringPageOrder))) this.violate(`ring-page-order ${orderText} beyond what was offered (${f.maxOrder}) or asked (${this.c.fe.ringPageOrder})`);
    const maxQ = Math.max(1, Math.min(num(f.maxQueues) ?? 1, 64));
    if (!(nq >= 1 && nq <= Math.min(maxQ, this.c.fe.queues))) this.violate(`multi-queue-num-queues ${nqText} beyond what was offered (${f.maxQueues}) or asked (${this.c.fe.queues})`);
    const queues: QueueConn[] = [];
    for (let q = 0; q < nq; q++) {
      const dir = nq === 1 ? '' : `${xsQueueDir(q)}/`;
      const refs: number[] = [];
      for (let i = 0; i < 1 << order; i++) refs.push(Number(await opt(orderText === undefined ? `${dir}${XS_RING_REF}` : `${dir}${xsRingRefN(i)}`)));
      const evtchn = Number(await opt(`${dir}${XS_EVENT_CHANNEL}`));
      const maps = this.B.grants.map(refs.map((ref) => ({ dom: this.G.domid, ref, flags: GNTMAP_host_map })));
      if (maps.some((m) => m.status !== GNTST_okay)) {
        this.violate(`ring ${q} refs ${refs.join(',')} do not map: ${maps.map((m) => m.status).join(',')}`);
        this.B.grants.unmap(maps.filter((m) => m.status === GNTST_okay).map((m) => m.handle));
        continue;
      }
      const port = this.B.events.bindInterdomain(this.G.domid, evtchn);
      if (port < 0) {
        this.violate(`event channel ${evtchn} does not bind: ${port}`);
        this.B.grants.unmap(maps.map((m) => m.handle));
        continue;
      }
      const qc: QueueConn = {
        index: q, ring: new BackRing(new SharedRing(maps.map((m) => m.page!), abi.entrySize)), ringHandles: maps.map((m) => m.handle),
        port, off: () => undefined, entry: new RingEntry(abi.entrySize), rspIdx: 0, outstanding: new Map(), fresh: [], held: [], timer: undefined, dead: false, broken: false,
      };
      qc.off = this.B.events.on(port, () => this.onEvent(qc));
      queues.push(qc);
    }
    this.conn = { abi, queues };
    this.log.push(`connected: ${abi.protocol}, ${nq} queue(s), order ${order}`);
    await this.setState(4);
  }

  /** Lets go of the rings, ports and pages (unless the fault keeps them mapped). */
  disconnect(keep: boolean): void {
    const c = this.conn;
    if (c === undefined) return;
    this.conn = undefined;
    for (const q of c.queues) {
      q.dead = true;
      clearTimeout(q.timer);
      q.off();
      this.B.events.close(q.port);
      const handles = [...q.ringHandles];
      for (const r of [...q.outstanding.values(), ...q.held, ...q.fresh]) handles.push(...r.handles.splice(0));
      if (keep) {
        this.kept.push(...handles);
        if (handles.length > 0) this.keptAny = true;
      } else this.B.grants.unmap(handles);
    }
    if (!keep) {
      this.B.grants.unmap(this.kept.splice(0));
    }
    // Blkfront tears its rings down: answers it never saw do not count, its requests come again.
  }

  /** Backend-initiated disconnection in the middle of I/O. */
  private bounce(): void {
    this.bounces++;
    this.log.push(`bounce${this.f?.vanish ? ' (vanishing)' : ''}`);
    if (this.f?.vanish) this.vanished = true;
    this.enqueue(async () => {
      if (this.state === 4) await this.setState(5);
    });
  }

  // ---- data path

  private onEvent(q: QueueConn): void {
    if (q.dead) return;
    this.consumeAll(q);
    if (q.dead) return;
    if (q.fresh.length > 0 && this.chance(this.f?.bounce)) {
      // Hold everything and go away instead of answering.
      q.held.push(...q.fresh.splice(0));
      this.bounce();
      return;
    }
    this.answer(q, q.fresh.splice(0));
  }

  private consumeAll(q: QueueConn): void {
    const c = this.conn!;
    do {
      for (;;) {
        const r = q.ring.consumeRequest(q.entry);
        if (r === RING_PEER_OVERFLOW) {
          // A broken blkfront's ring is nobody's business any more (our extra answers may have confused it).
          if (!this.broken) this.violate(`blkfront published req_prod ${q.ring.sring.reqProd} beyond the ring (rsp_prod_pvt ${q.ring.rspProdPvt})`);
          q.dead = true;
          return;
        }
        if (r !== RING_CONSUMED) break;
        const req = this.take(q, c.abi, q.entry);
        if (req !== undefined) q.fresh.push(req);
      }
    } while (q.ring.finalCheckForRequests() !== 0);
  }

  /** Decodes, checks blkfront kept to what was negotiated, maps the pages, takes write data. */
  private take(q: QueueConn, abi: BlkifAbi, entry: RingEntry): Req | undefined {
    const d = decodeRequest(entry.view, 0, abi, { maxIndirectSegments: 4096 });
    const v = (why: string) => this.violate(`queue ${q.index}: ${why}`);
    if (!d.ok) {
      v(`undecodable request: ${d.message}`);
      return undefined;
    }
    const r = d.request;
    if (r.id >= BigInt(q.ring.size)) v(`id ${r.id} is no shadow slot of a ${q.ring.size}-slot ring`);
    if (q.outstanding.has(r.id) || q.held.some((h) => h.id === r.id) || q.fresh.some((h) => h.id === r.id)) v(`id ${r.id} reused while still pending`);
    const f = this.c.features;
    const ro = ((num(f.info) ?? 0) & 4) !== 0;
    let kind: Req['kind'];
    let op: number = r.operation;
    let segs: BlkifSegment[] = [];
    let count = 0;
    const pages: Uint8Array[] = [];
    const handles: number[] = [];
    let mapFailed = false;
    const map = (gref: number, readonly: boolean): Uint8Array | undefined => {
      const m = this.B.grants.map([{ dom: this.G.domid, ref: gref, flags: GNTMAP_host_map | (readonly ? GNTMAP_readonly : 0) }])[0]!;
      if (m.status !== GNTST_okay) {
        v(`gref ${gref} (${readonly ? 'read-only' : 'writable'}) does not map: ${m.status}`);
        mapFailed = true;
        return undefined;
      }
      handles.push(m.handle);
      return m.page!;
    };
    switch (r.operation) {
      case BLKIF_OP_DISCARD:
        kind = 'discard';
        if (!offered(f.discard)) v('DISCARD though feature-discard was not offered');
        if (ro) v('DISCARD on a read-only disk');
        if (r.sector_number > MAX_SAFE || r.nr_sectors > MAX_SAFE) v('DISCARD beyond 2^53 sectors');
        count = Number(r.nr_sectors);
        break;
      case BLKIF_OP_INDIRECT: {
        op = r.indirect_op;
        kind = r.indirect_op === BLKIF_OP_READ ? 'read' : 'write';
        if (r.indirect_op !== BLKIF_OP_READ && r.indirect_op !== BLKIF_OP_WRITE) v(`indirect_op ${r.indirect_op}`);
        const lim = Math.min(num(f.maxIndirect) ?? 0, 4096, this.c.fe.maxIndirectSegments);
        if (lim <= 11) v(`an indirect request though indirect was not negotiated (offered ${JSON.stringify(f.maxIndirect)}, ours ${this.c.fe.maxIndirectSegments})`);
        else if (r.nr_segments > lim) v(`indirect request of ${r.nr_segments} segments, negotiated ${lim}`);
        const ipages = r.indirect_grefs.map((g) => map(g, true));
        if (ipages.some((x) => x === undefined)) break;
        for (let j = 0; j < r.nr_segments; j++) {
          const pg = ipages[Math.floor(j / BLKIF_SEGS_PER_INDIRECT_FRAME)]!;
          segs.push(decodeSegment(new DataView(pg.buffer, pg.byteOffset, pg.byteLength), (j % BLKIF_SEGS_PER_INDIRECT_FRAME) * BLKIF_SEGMENT_SIZE));
        }
        break;
      }
      case BLKIF_OP_READ:
      case BLKIF_OP_WRITE:
        kind = r.operation === BLKIF_OP_READ ? 'read' : 'write';
        segs = r.seg;
        if (segs.length === 0 || segs.length > 11) v(`${kind} of ${segs.length} segments`);
        break;
      case BLKIF_OP_FLUSH_DISKCACHE:
        kind = 'flush';
        segs = r.seg;
        if (!offered(f.flush)) v('FLUSH_DISKCACHE though feature-flush-cache was not offered');
        break;
      case BLKIF_OP_WRITE_BARRIER:
        kind = 'barrier';
        segs = r.seg;
        if (!offered(f.barrier)) v('WRITE_BARRIER though feature-barrier was not offered');
        break;
      default:
        kind = 'other';
        v(`operation ${(r as { operation: number }).operation}`);
    }
    if (kind === 'write' && ro) v('WRITE on a read-only disk');
    for (const [i, s] of segs.entries()) {
      if (s.first_sect > s.last_sect || s.last_sect > 7) v(`seg[${i}] ${s.first_sect}..${s.last_sect}`);
      else if ((s.last_sect - s.first_sect + 1) % this.align !== 0 || s.first_sect % this.align !== 0) v(`seg[${i}] ${s.first_sect}..${s.last_sect} not aligned to ${this.align * SECTOR}-byte sectors`);
      if (kind !== 'discard') count += Math.max(0, s.last_sect - s.first_sect + 1);
    }
    const sector = r.sector_number > MAX_SAFE ? Number.MAX_SAFE_INTEGER : Number(r.sector_number);
    if (this.sectors === undefined) v(`I/O though the disk size ${JSON.stringify(f.sectors)} is no number`);
    else if (sector + count > this.sectors) v(`sectors ${sector}+${count} beyond the disk's ${this.sectors}`);
    if (sector % this.align !== 0 || count % this.align !== 0) v(`sectors ${sector}+${count} not aligned to ${this.align * SECTOR}-byte sectors`);

    // Map the data pages: writable for a READ, read-only otherwise (blkfront grants so).
    const segPages: Uint8Array[] = [];
    if (!mapFailed) {
      for (const s of segs) {
        const pg = map(s.gref, kind !== 'read');
        if (pg === undefined) break;
        segPages.push(pg);
      }
    }
    pages.push(...segPages);
    let written: Uint8Array | undefined;
    if (!mapFailed && (kind === 'write' || kind === 'flush' || kind === 'barrier') && segs.length > 0) {
      written = new Uint8Array(count * SECTOR);
      let at = 0;
      segs.forEach((s, i) => {
        const b = pages[i]!.subarray(s.first_sect * SECTOR, (s.last_sect + 1) * SECTOR);
        written!.set(b, at);
        at += b.length;
      });
    }
    return { q: q.index, id: r.id, op, kind, sector, count, segs, pages, handles, seq: ++this.seq, written, mapFailed, keptMapped: false };
  }

  /** Answers `reqs` (and anything held whose time has come), faults and all, then publishes. */
  private answer(q: QueueConn, reqs: Req[]): void {
    const c = this.conn;
    if (c === undefined || q.dead) return;
    const abi = c.abi;
    const out: Uint8Array[] = [];
    const rsp = new RingEntry(abi.entrySize);
    const encode = (id: bigint, operation: number, status: number): Uint8Array => {
      rsp.bytes.fill(0);
      encodeResponse(rsp.view, 0, abi, { id, operation: operation & 0xff, status });
      return new Uint8Array(rsp.bytes);
    };
    const f = this.f;
    for (const r of reqs) {
      if (this.chance(f?.delay)) {
        q.held.push(r);
        continue;
      }
      q.outstanding.set(r.id, r);
      let status: number = r.mapFailed ? BLKIF_RSP_ERROR : BLKIF_RSP_OKAY;
      if (r.kind === 'other') status = BLKIF_RSP_EOPNOTSUPP;
      if (r.kind === 'read' && !r.mapFailed) {
        // The data: random bytes in every segment's sectors.
        r.segs.forEach((s, i) => r.pages[i]?.set(this.prng.bytes((s.last_sect - s.first_sect + 1) * SECTOR), s.first_sect * SECTOR));
      }
      if (this.chance(f?.status)) status = this.prng.pick([BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP, (this.prng.next() & 0xffff) << 16 >> 16]);
      if (this.chance(f?.keepMap) && r.handles.length > 0) {
        this.kept.push(...r.handles.splice(0));
        this.keptAny = true;
        r.keptMapped = true;
      } else {
        this.B.grants.unmap(r.handles.splice(0));
      }
      if (this.chance(f?.garbage)) {
        out.push(this.prng.bytes(abi.entrySize));
        continue;
      }
      const op = this.chance(f?.wrongOp) ? (r.op + 1 + this.prng.int(0, 254)) & 0xff : r.op;
      const id = this.chance(f?.unknownId) ? (this.prng.chance(0.5) ? this.prng.u64() : BigInt(this.prng.int(0, q.ring.size * 2))) : r.id;
      out.push(encode(id, op, status));
      if (this.chance(f?.dup)) out.push(encode(r.id, r.op, BLKIF_RSP_OKAY));
    }
    if (q.held.length > 0 && q.timer === undefined) {
      q.timer = setTimeout(() => {
        q.timer = undefined;
        if (q.dead || this.conn === undefined) return;
        this.consumeAll(q);
        const due = q.held.splice(0);
        // Held answers go out in a shuffled order, after whatever came since.
        for (let i = due.length - 1; i > 0; i--) {
          const j = this.prng.int(0, i);
          [due[i], due[j]] = [due[j]!, due[i]!];
        }
        const fresh = q.fresh.splice(0);
        const saved = this.c.faults;
        this.answerNow(q, [...fresh, ...due], saved);
      }, this.prng.int(1, 15));
    }
    this.publish(q, out);
  }

  /** Answers without holding any back (held requests must come out eventually). */
  private answerNow(q: QueueConn, reqs: Req[], f: Faults | null): void {
    const d = f?.delay;
    if (f !== null) f.delay = 0;
    try {
      this.answer(q, reqs);
    } finally {
      if (f !== null) f.delay = d ?? 0;
    }
  }

  /** Writes the response slots and publishes rsp_prod (or a bogus one); the model follows what blkfront will see. */
  private publish(q: QueueConn, out: Uint8Array[]): void {
    if (out.length === 0) return;
    const c = this.conn!;
    const sring = q.ring.sring;
    const e = new RingEntry(c.abi.entrySize);
    const start = q.rspIdx;
    for (const b of out) {
      e.bytes.set(b);
      sring.copyIn(q.rspIdx, e);
      q.rspIdx = (q.rspIdx + 1) >>> 0;
    }
    // BackRing guards its consumer with rsp_prod_pvt: never let our extra answers run it past req_cons.
    q.ring.rspProdPvt = ((q.rspIdx - q.ring.reqCons) >>> 0) < 0x80000000 ? q.ring.reqCons : q.rspIdx;
    let prod = q.rspIdx;
    if (this.chance(this.f?.overflow)) {
      prod = (q.rspIdx + q.ring.size + 1 + this.prng.int(0, 100)) >>> 0;
      this.log.push(`rsp_prod beyond the ring: ${prod}`);
      this.broken = true;
      q.broken = true;
    } else if (this.chance(this.f?.staleJump)) {
      prod = (q.rspIdx + this.prng.int(1, 3)) >>> 0;
      this.log.push(`rsp_prod past the answers: ${prod}`);
    }
    // The model: what blkfront makes of each published slot, in order.
    const tmp = new RingEntry(c.abi.entrySize);
    for (let i = start; i !== prod && !q.broken; i = (i + 1) >>> 0) {
      sring.copyOut(i, tmp);
      this.believe(q, decodeResponse(tmp.view, 0, c.abi));
    }
    sring.rspProd = prod;
    stats.responses += out.length;
    this.B.events.notify(q.port);
  }

  private believe(q: QueueConn, rsp: { id: bigint; operation: number; status: number }): void {
    const r = q.outstanding.get(rsp.id);
    if (r === undefined || rsp.operation !== r.op || (!this.persistent && (r.handles.length > 0 || r.keptMapped))) {
      this.broken = true;
      q.broken = true;
      return;
    }
    q.outstanding.delete(rsp.id);
    let data: Uint8Array | undefined;
    if (r.kind === 'read' && rsp.status === BLKIF_RSP_OKAY && !r.mapFailed) {
      data = new Uint8Array(r.count * SECTOR);
      let at = 0;
      r.segs.forEach((s, i) => {
        const b = r.pages[i]!.subarray(s.first_sect * SECTOR, (s.last_sect + 1) * SECTOR);
        data!.set(b, at);
        at += b.length;
      });
    } else data = r.written;
    this.settled.push({ kind: r.kind, seq: r.seq, status: rsp.status, sector: r.sector, count: r.count, data });
  }

  /** The end: let go of everything still mapped. */
  releaseAll(): void {
    this.disconnect(false);
    this.B.grants.unmap(this.kept.splice(0));
  }
}

// ---------------------------------------------------------------------------------------------

interface IoRecord {
  spec: IoSpec;
  kind: IoSpec['kind'];
  offset: number;
  length: number;
  seq: number;
  flushOffered: boolean;
  data: Uint8Array | undefined;
  outcome: 'pending' | 'resolved' | 'rejected';
  error: string | undefined;
  buf: Uint8Array | undefined;
  snapshot: Uint8Array | undefined;
  settledAt: number;
}

/**
 * Cases that once failed, run first every time. Seed 197110962: a flush refused (EOPNOTSUPP) while
 * more flushes were queued, the backend offering no barrier: the queued ones went out as
 * WRITE_BARRIER.
 */
const REGRESSIONS: BeCase[] = [
  {"seed": -828833783, "fe": {"ringPageOrder": 0, "queues": 1, "maxIndirectSegments": 32, "persistent": false, "bufferPages": 16, "protocol": "x86_32-abi"}, "features": {"maxIndirect": null, "maxOrder": "4", "maxQueues": "2", "persistent": "1", "sectors": "3338395", "sectorSize": "512", "physical": "512", "info": "0", "flush": "1", "barrier": null, "discard": "0"}, "faults": {"status": 0.192, "wrongOp": 0, "unknownId": 0.005000000000000001, "dup": 0, "garbage": 0.0005, "keepMap": 0, "delay": 0, "staleJump": 0, "overflow": 0, "bounce": 0.1005, "vanish": false, "keepMapOnClose": false}, "batches": [[{"kind": "discard", "frac": 3509, "units": 104, "odd": "negative"}, {"kind": "write", "frac": 2390, "units": 8, "odd": "none"}, {"kind": "read", "frac": 1517, "units": 16, "odd": "none"}, {"kind": "read", "frac": 8911, "units": 3, "odd": "none"}, {"kind": "flush", "frac": 8934, "units": 14, "odd": "none"}, {"kind": "write", "frac": 2544, "units": 220, "odd": "none"}, {"kind": "read", "frac": 700, "units": 6, "odd": "none"}, {"kind": "write", "frac": 756, "units": 15, "odd": "none"}, {"kind": "discard", "frac": 1271, "units": 4, "odd": "none"}, {"kind": "write", "frac": 892, "units": 1, "odd": "none"}, {"kind": "flush", "frac": 7086, "units": 4, "odd": "none"}], [{"kind": "write", "frac": 3313, "units": 10, "odd": "none"}, {"kind": "write", "frac": 3285, "units": 2, "odd": "none"}, {"kind": "write", "frac": 6077, "units": 7, "odd": "none"}, {"kind": "write", "frac": 724, "units": 245, "odd": "none"}, {"kind": "read", "frac": 8729, "units": 11, "odd": "none"}], [{"kind": "read", "frac": 4453, "units": 5, "odd": "none"}, {"kind": "read", "frac": 6070, "units": 11, "odd": "none"}, {"kind": "discard", "frac": 5304, "units": 2, "odd": "none"}], [{"kind": "write", "frac": 4198, "units": 2, "odd": "none"}, {"kind": "write", "frac": 3795, "units": 16, "odd": "none"}, {"kind": "read", "frac": 507, "units": 7, "odd": "none"}], [{"kind": "read", "frac": 9341, "units": 13, "odd": "none"}, {"kind": "read", "frac": 9511, "units": 13, "odd": "none"}, {"kind": "write", "frac": 8427, "units": 16, "odd": "none"}]], "closeWhileBusy": true},
];

async function runCase(c: BeCase, n: number): Promise<void> {
  stats.cases++;
  const prng = new Prng(c.seed);
  const G = ts.hv.createLocalDomain({ memoryPages: c.fe.bufferPages + 256, pollMicros: 0 });
  const B = ts.hv.createLocalDomain({ memoryPages: 64, pollMicros: 0 });
  const devid = 0x20000 + ++devSeq;
  const paths = await createVbdNodes(ts.xs, { frontDomid: G.domid, backDomid: B.domid, devid }, { kind: 'memory', size: 1 << 20 }, false);
  const be = new RawBackend(c, G, B, paths);
  const flog: string[] = [];
  const ios: IoRecord[] = [];
  let front: Blkfront | undefined;
  const problems: string[] = [];
  try {
    await be.start();
    const options: Partial<BlkfrontOptions> = { ...c.fe, connectTimeoutMs: CONNECT_MS };
    let attachError: unknown;
    try {
      front = await within(Blkfront.attach({ xen: G, xs: ts.xs, frontDir: paths.frontDir, options, log: (m) => flog.push(m) }), 'attach', CONNECT_MS * 3 + SLACK_MS);
    } catch (e) {
      attachError = e;
      if ((e as Error).message.startsWith('timed out')) problems.push(`attach never settled: ${(e as Error).message}`);
    }
    if (front !== undefined) {
      stats.connected++;
      const f = front;
      be.persistent = f.info.persistent;
      const info = f.info;
      // What was negotiated is within what was offered.
      const ss = num(c.features.sectorSize) ?? 512;
      assert.equal(info.sectorSize, ss, 'sector size as offered');
      assert.equal(info.sectors, num(c.features.sectors), 'disk size as offered');
      assert.ok(info.ringPageOrder <= Math.min(num(c.features.maxOrder) ?? 0, 4, c.fe.ringPageOrder));
      assert.ok(info.queues >= 1 && info.queues <= Math.min(Math.max(1, num(c.features.maxQueues) ?? 1), c.fe.queues));
      if (info.indirect) assert.ok(info.maxSegments > 11 && info.maxSegments <= Math.min(num(c.features.maxIndirect) ?? 0, 4096, c.fe.maxIndirectSegments));
      else assert.equal(info.maxSegments, 11);
      const size = info.size;
      const unit = info.sectorSize;
      const span = Math.min(size, 64 << 20);

      for (const [bi, batch] of c.batches.entries()) {
        const last = bi === c.batches.length - 1;
        const started: Promise<void>[] = [];
        for (const s of batch) {
          stats.ios++;
          let length = s.units * unit;
          let offset = Math.floor((s.frac / 10000) * Math.max(0, span - length) / unit) * unit;
          if (span < length) length = Math.floor(span / unit) * unit;
          if (s.odd === 'misalign') offset += 1;
          if (s.odd === 'beyond') offset = size - unit;
          if (s.odd === 'negative') offset = -unit;
          const rec: IoRecord = {
            spec: s, kind: s.kind, offset, length, seq: be.seq, flushOffered: f.info.flush || f.info.barrier,
            data: undefined, outcome: 'pending', error: undefined, buf: undefined, snapshot: undefined, settledAt: 0,
          };
          ios.push(rec);
          let p: Promise<unknown>;
          const t0 = Date.now();
          switch (s.kind) {
            case 'read':
              p = f.read(offset, length).then((b) => {
                rec.buf = b;
                rec.snapshot = new Uint8Array(b);
              });
              break;
            case 'write':
              rec.data = prng.bytes(Math.max(0, length));
              p = f.write(offset, rec.data);
              break;
            case 'flush':
              p = f.flush();
              break;
            default:
              p = f.discard(offset, length);
          }
          started.push(within(p.then(
            () => { rec.outcome = 'resolved'; },
            (e: unknown) => { rec.outcome = 'rejected'; rec.error = (e as Error).message; },
          ), `${s.kind} of ${length} at ${offset}`, CONNECT_MS + SLACK_MS).then(() => { rec.settledAt = Date.now() - t0; }, (e: Error) => {
            problems.push(`I/O never settled: ${e.message}`);
          }));
        }
        if (last && c.closeWhileBusy) {
          await within(f.close(), 'close() while I/O is in flight', CONNECT_MS * 2 + SLACK_MS).catch((e: Error) => problems.push(e.message));
        }
        await Promise.all(started);
        if (problems.length > 0) break;
      }
      if (!c.closeWhileBusy || problems.length > 0) {
        await within(f.close(), 'close()', CONNECT_MS * 2 + SLACK_MS).catch((e: Error) => problems.push(e.message));
      }
    } else if (attachError !== undefined && c.faults === null && num(c.features.sectors) !== undefined && [512, 4096, null].includes(num(c.features.sectorSize) ?? null)) {
      problems.push(`attach to a sane backend failed: ${(attachError as Error).message}`);
    }
    assert.deepEqual(problems, [], 'blkfront never hangs');
    assert.deepEqual(be.violations, [], 'blkfront keeps to what was negotiated');

    // Resolved I/O: only on valid responses, with the data of those responses.
    const settled = be.settled;
    for (const r of ios) {
      if (r.outcome === 'resolved') stats.resolved++;
      if (r.outcome === 'rejected') stats.rejected++;
      if (r.outcome !== 'resolved') continue;
      const after = settled.filter((s) => s.seq > r.seq);
      const what = `${r.kind} of ${r.length} at ${r.offset}`;
      if (r.kind === 'flush') {
        if (r.flushOffered) {
          assert.ok(after.some((s) => (s.kind === 'flush' || s.kind === 'barrier') && (s.status === BLKIF_RSP_OKAY || s.status === BLKIF_RSP_EOPNOTSUPP)),
            `${what}: resolved without a valid flush response`);
        }
        continue;
      }
      const first = r.offset / SECTOR;
      for (let sct = first; sct < first + r.length / SECTOR; sct++) {
        const cover = after.filter((s) => s.status === BLKIF_RSP_OKAY && s.sector <= sct && sct < s.sector + s.count
          && (r.kind === 'discard' ? s.kind === 'discard' : r.kind === 'read' ? s.kind === 'read' : s.kind === 'write'));
        const at = (sct - first) * SECTOR;
        if (r.kind === 'discard') {
          assert.ok(cover.length > 0, `${what}: resolved though sector ${sct} got no valid OKAY discard`);
          continue;
        }
        const mine = (r.kind === 'read' ? r.buf! : r.data!).subarray(at, at + SECTOR);
        const match = cover.some((s) => s.data !== undefined && firstDifference(s.data.subarray((sct - s.sector) * SECTOR, (sct - s.sector + 1) * SECTOR), mine) === -1);
        assert.ok(match, `${what}: sector ${sct} ${r.kind === 'read' ? 'holds bytes no valid OKAY response delivered' : 'was never carried by a valid OKAY write'} (${cover.length} candidate responses)`);
      }
      if (r.kind === 'read') stats.readsChecked++;
    }
    for (const r of ios) {
      if (r.buf !== undefined) assert.equal(firstDifference(r.buf, r.snapshot!), -1, `a resolved read's buffer changed afterwards (${r.kind} at ${r.offset})`);
    }
    // A backend that behaves, offering sane features: every valid I/O works.
    if (c.faults === null && front !== undefined && !c.closeWhileBusy) {
      for (const r of ios) {
        if (r.spec.odd !== 'none' || r.length === 0) continue;
        if (r.kind === 'discard' && !offered(c.features.discard)) continue;
        if ((r.kind === 'write' || r.kind === 'discard') && ((num(c.features.info) ?? 0) & 4) !== 0) continue;
        assert.equal(r.outcome, 'resolved', `${r.kind} of ${r.length} at ${r.offset} against a well-behaved backend: ${r.error}`);
      }
    }
    if (be.broken) stats.broken++;
    stats.bounces += be.bounces;

    // After close(): no grants left but those the backend still maps, reported as leaked.
    if (front !== undefined) {
      assert.equal(front.inFlight, 0, 'nothing in flight after close()');
      const grants = ts.hv.domainCounters(G.domid)!.grantsActive;
      const leaked = front.leakedPages;
      stats.leaked += leaked;
      if (!be.keptAny) {
        assert.equal(grants, 0, 'every grant ended after close() (the backend kept nothing mapped)');
        assert.equal(leaked, 0, 'no page reported leaked when the backend kept nothing mapped');
      } else {
        const mapped = ts.hv.domainCounters(B.domid)!.mapsActive;
        assert.ok(grants <= leaked + mapped, `after close(): ${grants} grants active, ${leaked} pages reported leaked, ${mapped} still mapped by the backend`);
      }
    }
  } catch (e) {
    const err = new Error(`${(e as Error).message}`, { cause: e });
    err.message += `\n  case ${n}: fe ${JSON.stringify(c.fe)} features ${JSON.stringify(c.features)} faults ${JSON.stringify(c.faults)} closeWhileBusy ${c.closeWhileBusy}` +
      `\n  ios: ${ios.map((r) => `${r.kind}@${r.offset}+${r.length}:${r.outcome}${r.error ? `(${r.error.slice(0, 80)})` : ''}`).join(' ')}` +
      `\n  backend: ${be.log.slice(-10).join(' | ')}\n  blkfront: ${flog.slice(-6).join(' | ')}`;
    err.stack = `${err.message}\n${(e as Error).stack ?? ''}`;
    throw err;
  } finally {
    await be.stop();
    be.releaseAll();
    await removeVbdNodes(ts.xs, paths);
    await ts.hv.destroyDomain(B.domid);
    await ts.hv.destroyDomain(G.domid);
    // Let the frontend's timers and watches of this case run out before the next (isolation
    // between cases; nothing is asserted on it).
    await sleep(1);
  }
}

test('blkfront against a hostile raw backend: no crash, no hang, data only from valid responses, grants all ended', async (t) => {
  const runs = fuzzRuns(40);
  await runProperty(t, 'hostile backend', beCase, runCase, runs, () => `${stats.responses} hostile responses; ${JSON.stringify(stats)}`, REGRESSIONS);
  // The data checks ran: I/O resolved, reads compared byte for byte (~10 and ~5 per case; with a
  // handful of cases a hostile backend may break them all).
  assertChecksRan(runs, stats.connected > 0 && stats.resolved > 0 && stats.readsChecked > 0, JSON.stringify(stats));
});
