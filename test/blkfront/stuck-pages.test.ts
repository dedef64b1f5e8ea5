/**
 * blkfront never waits forever on pages a backend will not give back, nor on answers to I/O that
 * already failed. A scripted backend (one queue, one ring page, no indirect) holds requests,
 * disconnects keeping their pages mapped (a grant it still maps cannot be ended: grant_table.h
 * GTF_reading/GTF_writing), reconnects, and answers when told. Regressions from the fuzz run
 * `BLKIF_FUZZ_RUNS=400 BLKIF_FUZZ_SEED=16660468 BLKIF_FUZZ_PATH=50` (hostile-backend suite):
 *
 * - pages kept mapped across a reconnect left the pool smaller than one request, so the I/O
 *   re-issued after the reconnect waited for pages that never came and close() never drained;
 * - close() waiting for the last answers of a read that had already failed (an earlier part of
 *   it answered with an error) was never woken: only a settling I/O woke it.
 *
 * And one the fuzz backend never does: going Closing and staying there with requests unanswered
 * left them waiting with no bound (only I/O queued while disconnected had one).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, XS_EVENT_CHANNEL, XS_RING_REF, XS_SECTORS, XS_SECTOR_SIZE,
  abiByName, decodeRequest, encodeResponse, type BlkifRequest,
} from '../../src/abi/index.js';
import { Blkfront } from '../../src/blkfront/index.js';
import { BackRing, RING_CONSUMED, RingEntry, SharedRing } from '../../src/ring/index.js';
import { Toolstack, createVbdNodes, removeVbdNodes, type VbdPaths } from '../../src/toolstack/index.js';
import { GNTMAP_host_map, GNTMAP_readonly, GNTST_okay, type XenDomain } from '../../src/xen/index.js';
import {
  XS_STATE, XenbusStateClosed, XenbusStateClosing, XenbusStateConnected, XenbusStateInitWait, XenbusStateInitialised,
  XenbusStateInitialising, parseXenbusState, xvdVirtualDevice,
} from '../../src/xenbus/index.js';
import { eventually, unlessGone } from '../support/common.js';

const abi = abiByName('x86_64-abi')!;
const SECTORS = 2048;
const PAGE = 4096;
/** Bound on anything that must settle (a hang fails the test instead of stalling the run). */
const BOUND_MS = 30_000;

let ts: Toolstack;
before(async () => { ts = await Toolstack.start(); });
after(async () => { await ts?.shutdown(); });

/**
 * The scripted backend's own failure (an assertion of its, a xenstore error): whatever the test
 * waits for fails with it at once, instead of as a timeout that hides it.
 */
let backendFailed: { promise: Promise<never>; reject: (e: unknown) => void; error?: unknown } = newBackendFailure();
function newBackendFailure(): typeof backendFailed {
  let reject!: (e: unknown) => void;
  const promise = new Promise<never>((_, r) => { reject = r; });
  promise.catch(() => {}); // static-check: allow observed through `within` and `until`, which rethrow it
  const f: typeof backendFailed = { promise, reject: (e) => { f.error ??= e; reject(e); } };
  return f;
}

function within<T>(p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`never settled: ${what}`)), BOUND_MS); });
  return Promise.race([p, t, backendFailed.promise]).finally(() => clearTimeout(timer));
}

async function until(cond: () => boolean, what: string): Promise<void> {
  await within(eventually(() => {
    if (backendFailed.error !== undefined) throw backendFailed.error;
    return cond();
  }, what, BOUND_MS, 2), what);
}

interface Held { req: BlkifRequest; pages: Uint8Array[]; handles: number[] }

/** A backend driven step by step by the test: a memory disk, answers held until asked for. */
class ScriptedBackend {
  readonly disk = new Uint8Array(SECTORS * 512);
  readonly held: Held[] = [];
  /** Every request consumed, by connection (0 before the first bounce). */
  readonly sent: BlkifRequest[][] = [];
  /** Answer at once instead of holding. */
  autoAnswer = false;
  /** Keep request pages (and the ring) mapped when disconnecting. */
  keepOnClose = false;
  /** Once Closing, stay there: never answer, unmap or close. */
  stuckClosing = false;
  private conn: { ring: BackRing; handles: number[]; port: number; off: () => void } | undefined;
  private readonly kept: number[] = [];
  private state = XenbusStateInitialising as number;
  private serial: Promise<void> = Promise.resolve();
  private readonly token: string;

  constructor(readonly G: XenDomain, readonly B: XenDomain, readonly paths: VbdPaths) {
    this.token = `scripted-${paths.backDir}`;
  }

  async start(): Promise<void> {
    await ts.xs.write(`${this.paths.backDir}/${XS_SECTORS}`, String(SECTORS));
    await ts.xs.write(`${this.paths.backDir}/${XS_SECTOR_SIZE}`, '512');
    await this.setState(XenbusStateInitWait);
    await ts.xs.watch(`${this.paths.frontDir}/${XS_STATE}`, this.token, () => {
      this.serial = this.serial.then(() => this.frontendChanged()).catch((e: unknown) => backendFailed.reject(e));
    });
  }

  async stop(): Promise<void> {
    await ts.xs.unwatch(`${this.paths.frontDir}/${XS_STATE}`, this.token);
    await this.serial;
    this.disconnect(false);
    this.B.grants.unmap(this.kept.splice(0));
  }

  /** Unmaps what a bounce kept mapped (the backend lets go late, or its domain went). */
  releaseKept(): void {
    this.B.grants.unmap(this.kept.splice(0));
  }

  get connected(): boolean {
    return this.conn !== undefined && this.state === XenbusStateConnected;
  }

  /** Goes away in the middle of I/O (Closing), answering nothing; it comes back when the frontend asks. */
  async bounce(keep: boolean): Promise<void> {
    this.keepOnClose = keep;
    await this.setState(XenbusStateClosing);
  }

  /** Answers every held request with `status(i)`, in order. */
  answerHeld(status: (i: number) => number = () => BLKIF_RSP_OKAY): void {
    const c = this.conn!;
    this.held.splice(0).forEach((h, i) => this.respond(c.ring, h, status(i)));
    if (c.ring.pushResponsesAndCheckNotify()) this.B.events.notify(c.port);
  }

  /** Answers the held requests `which` picks (OKAY), keeping the others held. */
  answerWhere(which: (r: BlkifRequest) => boolean): number {
    const c = this.conn!;
    const now = this.held.filter((h) => which(h.req));
    for (const h of now) {
      this.held.splice(this.held.indexOf(h), 1);
      this.respond(c.ring, h, BLKIF_RSP_OKAY);
    }
    if (c.ring.pushResponsesAndCheckNotify()) this.B.events.notify(c.port);
    return now.length;
  }

  private async setState(s: number): Promise<void> {
    this.state = s;
    await ts.xs.write(`${this.paths.backDir}/${XS_STATE}`, String(s));
  }

  private async frontendChanged(): Promise<void> {
    const fs = parseXenbusState(await unlessGone(ts.xs.read(`${this.paths.frontDir}/${XS_STATE}`)));
    if (fs === XenbusStateInitialised && this.conn === undefined && this.state === XenbusStateInitWait) await this.connect();
    else if ((fs === XenbusStateClosing || fs === XenbusStateClosed) && this.state !== XenbusStateClosed) {
      if (this.stuckClosing) return;
      this.disconnect(this.keepOnClose);
      await this.setState(XenbusStateClosed);
    } else if (fs === XenbusStateInitialising && this.state === XenbusStateClosed) await this.setState(XenbusStateInitWait);
  }

  private async connect(): Promise<void> {
    const fd = this.paths.frontDir;
    const ref = Number(await ts.xs.read(`${fd}/${XS_RING_REF}`));
    const map = this.B.grants.map([{ dom: this.G.domid, ref, flags: GNTMAP_host_map }])[0]!;
    assert.equal(map.status, GNTST_okay, 'the ring maps');
    const ring = new BackRing(new SharedRing([map.page!], abi.entrySize));
    const port = this.B.events.bindInterdomain(this.G.domid, Number(await ts.xs.read(`${fd}/${XS_EVENT_CHANNEL}`)));
    const entry = new RingEntry(abi.entrySize);
    const sent: BlkifRequest[] = [];
    this.sent.push(sent);
    const off = this.B.events.on(port, () => {
      do {
        while (ring.consumeRequest(entry) === RING_CONSUMED) {
          const d = decodeRequest(entry.view, 0, abi);
          assert.ok(d.ok, 'blkfront sends well-formed requests');
          const req = d.request;
          sent.push(req);
          const segs = req.operation === BLKIF_OP_READ || req.operation === BLKIF_OP_WRITE ? req.seg : [];
          const maps = this.B.grants.map(segs.map((s) => ({ dom: this.G.domid, ref: s.gref, flags: GNTMAP_host_map | (req.operation === BLKIF_OP_WRITE ? GNTMAP_readonly : 0) })));
          assert.ok(maps.every((m) => m.status === GNTST_okay), 'the data pages map');
          const h: Held = { req, pages: maps.map((m) => m.page!), handles: maps.map((m) => m.handle) };
          if (this.autoAnswer) this.respond(ring, h, BLKIF_RSP_OKAY);
          else this.held.push(h);
        }
        if (ring.pushResponsesAndCheckNotify()) this.B.events.notify(port);
      } while (ring.finalCheckForRequests() !== 0);
    });
    this.conn = { ring, handles: [map.handle], port, off };
    await this.setState(XenbusStateConnected);
  }

  /** Does the I/O on the memory disk, lets go of the pages and puts the response on the ring. */
  private respond(ring: BackRing, h: Held, status: number): void {
    const { req } = h;
    if (status === BLKIF_RSP_OKAY && (req.operation === BLKIF_OP_READ || req.operation === BLKIF_OP_WRITE)) {
      let at = Number(req.sector_number) * 512;
      req.seg.forEach((s, i) => {
        const bytes = (s.last_sect - s.first_sect + 1) * 512;
        const page = h.pages[i]!.subarray(s.first_sect * 512, s.first_sect * 512 + bytes);
        if (req.operation === BLKIF_OP_WRITE) this.disk.set(page, at);
        else page.set(this.disk.subarray(at, at + bytes));
        at += bytes;
      });
    }
    this.B.grants.unmap(h.handles.splice(0));
    const out = new RingEntry(abi.entrySize);
    encodeResponse(out.view, 0, abi, { id: req.id, operation: req.operation, status });
    ring.produceResponse(out);
  }

  /** Lets go of the ring and port; held requests' pages are unmapped, or kept mapped with `keep`. */
  private disconnect(keep: boolean): void {
    const c = this.conn;
    if (c === undefined) return;
    this.conn = undefined;
    c.off();
    this.B.events.close(c.port);
    const handles = [...c.handles];
    for (const h of this.held.splice(0)) handles.push(...h.handles.splice(0));
    if (keep) this.kept.push(...handles);
    else this.B.grants.unmap(handles);
  }
}

async function withScriptedBackend(bufferPages: number, body: (f: Blkfront, be: ScriptedBackend) => Promise<void>, connectTimeoutMs = 5000): Promise<void> {
  const G = ts.hv.createLocalDomain({ memoryPages: bufferPages + 64 });
  const B = ts.hv.createLocalDomain({ memoryPages: 16 });
  const paths = await createVbdNodes(ts.xs, { frontDomid: G.domid, backDomid: B.domid, devid: xvdVirtualDevice(1) }, { kind: 'memory', size: 1 << 20 }, false);
  backendFailed = newBackendFailure();
  const be = new ScriptedBackend(G, B, paths);
  let f: Blkfront | undefined;
  let passed = false;
  try {
    await be.start();
    f = await within(Blkfront.attach({ xen: G, xs: ts.xs, frontDir: paths.frontDir, options: { bufferPages, queues: 1, ringPageOrder: 0, connectTimeoutMs } }), 'attach');
    await body(f, be);
    passed = true;
  } finally {
    // After a passing body, close() must work; after a failing one, its error is the one to see.
    if (f !== undefined) await within(f.close(), 'close() after the test').catch((e: unknown) => { if (passed) throw e; });
    await be.stop();
    if (backendFailed.error !== undefined) throw backendFailed.error;
    await removeVbdNodes(ts.xs, paths);
    await ts.hv.destroyDomain(G.domid);
    await ts.hv.destroyDomain(B.domid);
  }
}

const pattern = (n: number, seed: number): Uint8Array => Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed) & 0xff);

/**
 * Writes 11 pages at page 8, and bounces the backend with that request unanswered and its 11
 * pages kept mapped (5 of 16 buffer pages remain); the write completes after the reconnect.
 */
async function writeAcrossKeptBounce(f: Blkfront, be: ScriptedBackend, data: Uint8Array): Promise<void> {
  const writing = f.write(8 * PAGE, data);
  await until(() => be.held.length === 1, 'the write of 11 pages is on the ring');
  await be.bounce(true);
  await until(() => be.sent.length === 2 && be.connected, 'the backend is connected again');
  be.autoAnswer = true;
  be.answerHeld();
  await within(writing, 'the write re-issued after the reconnect');
}

test('pages kept mapped across a reconnect: the I/O is re-issued in requests the smaller pool can hold, and completes', { timeout: 60_000 }, async () => {
  await withScriptedBackend(16, async (f, be) => {
    assert.equal(f.info.maxSegments, 11, 'no indirect offered: 11 segments per request');
    const data = pattern(11 * PAGE, 7);
    await writeAcrossKeptBounce(f, be, data);
    assert.equal(f.leakedPages, 11, 'the pages still mapped are reported leaked');
    const again = be.sent[1]!;
    assert.ok(again.length >= 3, `re-issued in at least 3 requests (${again.length})`);
    for (const r of again) assert.ok(r.operation === BLKIF_OP_WRITE && r.seg.length <= 5, 'no request needs more pages than the pool has left');
    assert.deepEqual(be.disk.subarray(8 * PAGE, 19 * PAGE), data, 'the data reached the disk');
    const back = await within(f.read(8 * PAGE, 11 * PAGE), 'a read of 11 pages on the smaller pool');
    assert.deepEqual(new Uint8Array(back), data, 'read back as written');
    await within(f.close(), 'close()');
  });
});

test('pages a backend kept mapped come back once it lets go: the next connection ends their grants and uses them again', { timeout: 60_000 }, async () => {
  await withScriptedBackend(16, async (f, be) => {
    await writeAcrossKeptBounce(f, be, pattern(11 * PAGE, 5));
    assert.equal(f.leakedPages, 11, 'still mapped: out of use');
    // The backend lets go of what it kept; the next connection ends those grants.
    be.releaseKept();
    await be.bounce(false);
    await until(() => be.sent.length === 3 && be.connected, 'connected a third time');
    assert.equal(f.leakedPages, 0, 'every page is back in the pool');
    const data = pattern(16 * PAGE, 9);
    await within(f.write(0, data), 'a write of all 16 pages');
    const third = be.sent[2]!;
    assert.ok(third.some((r) => r.operation === BLKIF_OP_WRITE && r.seg.length === 11), 'a full 11-page request again');
    assert.deepEqual(be.disk.subarray(0, 16 * PAGE), data);
    await within(f.close(), 'close()');
  });
});

test('every buffer page kept mapped: the re-issued I/O fails instead of waiting, new I/O too, and close() settles', { timeout: 60_000 }, async () => {
  await withScriptedBackend(16, async (f, be) => {
    const writing = f.write(0, pattern(16 * PAGE, 3));
    await until(() => be.held.length === 2, 'the write is on the ring as 11 + 5 pages');
    await be.bounce(true);
    await assert.rejects(within(writing, 'the re-issued write'), /leaked/);
    assert.equal(f.leakedPages, 16);
    await until(() => be.connected, 'the backend is connected again');
    await assert.rejects(within(f.read(0, PAGE), 'a read with no page left'), /leaked/);
    await within(f.close(), 'close()');
  });
});

test('close() settles when the last answers belong to a read that already failed', { timeout: 60_000 }, async () => {
  await withScriptedBackend(64, async (f, be) => {
    const reading = f.read(0, 33 * PAGE).then(() => 'resolved', (e: Error) => e.message);
    await until(() => be.held.length === 3, 'the read is on the ring as 3 requests');
    const closing = f.close();
    // The first part fails (the read with it), the other two answer OKAY with nothing left to settle.
    be.answerHeld((i) => (i === 0 ? BLKIF_RSP_ERROR : BLKIF_RSP_OKAY));
    assert.match(await within(reading, 'the read'), /backend answered/);
    await within(closing, 'close() after the failed read\'s last answers');
    assert.equal(f.inFlight, 0);
  });
});

test('a backend that goes Closing and stays there holding requests: they fail within the connect timeout, and close() settles', { timeout: 60_000 }, async () => {
  await withScriptedBackend(16, async (f, be) => {
    const writing = f.write(0, pattern(4 * PAGE, 1));
    await until(() => be.held.length === 1, 'the write is on the ring');
    be.stuckClosing = true;
    await be.bounce(false);
    await assert.rejects(within(writing, 'the write held by a backend stuck in Closing'), /no backend connected/);
    await within(f.close(), 'close()');
    assert.equal(f.leakedPages, 4, 'the pages the backend still maps are reported leaked');
  }, 300);
});

test('answers to fast requests are not held back by slow ones while blkfront waits for a batch of answers', { timeout: 60_000 }, async () => {
  await withScriptedBackend(64, async (f, be) => {
    for (let p = 0; p < 64; p++) be.disk.fill(p + 1, p * PAGE, (p + 1) * PAGE);
    const pageOf = (r: BlkifRequest) => Number(r.sector_number) / (PAGE / 512);
    // 22 reads the backend sits on (a stalled disk, a long discard).
    const slow = Array.from({ length: 22 }, (_, i) => f.read(i * PAGE, PAGE));
    await until(() => be.held.length === 22, '22 slow reads on the ring');
    // One answered: blkfront's final check then asks for a batch (22 out, all but 12: 10).
    const one = f.read(40 * PAGE, PAGE);
    await until(() => be.held.length === 23, 'a fast read on the ring');
    assert.equal(be.answerWhere((r) => pageOf(r) === 40), 1);
    assert.equal((await within(one, 'the first fast read'))[0], 41);
    await new Promise((r) => setImmediate(r));
    // Nine more, answered at once: fewer than the batch, and the rest of it is stuck.
    const fast = Array.from({ length: 9 }, (_, i) => f.read((41 + i) * PAGE, PAGE));
    await until(() => be.held.length === 31, 'nine more fast reads on the ring');
    assert.equal(be.answerWhere((r) => pageOf(r) >= 41), 9);
    const got = await within(Promise.all(fast), 'nine fast reads answered while 22 slow ones are held');
    got.forEach((b, i) => assert.equal(b[0], 42 + i, `fast read ${i} has its page`));
    be.answerHeld();
    const rest = await within(Promise.all(slow), 'the slow reads');
    rest.forEach((b, i) => assert.equal(b[0], i + 1, `slow read ${i} has its page`));
  });
});
