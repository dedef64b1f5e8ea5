/**
 * Fuzz: xenstored, over both transports (the Unix socket and a guest's shared page).
 *
 * 1. Malformed and oversized traffic: raw socket connections send random headers (any type,
 *    request id, transaction id, lengths past XENSTORE_PAYLOAD_MAX), random or structured
 *    payloads, strings without their NUL, cut into random chunks; guests scribble on their page
 *    (junk bytes, oversized headers, impossible ring indexes, reconnection requests). Each complete
 *    request gets exactly one reply, in order, with its id, its transaction id and either its own
 *    type or XS_ERROR with a known error name; an oversized header drops that connection (socket)
 *    or sets the page's error and stops serving it; the daemon keeps serving everyone else.
 * 2. Permission escalation by an unprivileged guest: reads, writes, mkdir, rm, directory,
 *    get/set-perms, watches, transactions (its own and random ids), introduce/release/set-target
 *    and @-paths, against dom0's private nodes, another guest's nodes, nodes it may only read and
 *    nodes it may write. It never reads a node it may not read (values, children, permissions),
 *    learns of no absent node under one it may not read (EACCES, not ENOENT), never hears a watch
 *    event for a path it may not read, gets EACCES for every privileged operation, and changes
 *    nothing outside what it may write.
 * 3. Transaction storms: socket clients and page guests (privileged and not) run conflicting
 *    transactions concurrently (counter increments, transfers between two nodes, read-only
 *    audits, aborted and abandoned transactions, random transaction ids). Every committed
 *    increment and transfer is counted exactly once, every committed audit saw a consistent pair.
 *
 * Throughout, a well-behaved socket client and a well-behaved guest read, write and watch, and
 * every one of their operations completes, with the right answers and events.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  EACCES,
  XENSTORE_ERROR_NONE,
  XENSTORE_PAYLOAD_MAX,
  XSD_ERRORS,
  XS_CONTROL,
  XS_DIRECTORY,
  XS_DIRECTORY_PART,
  XS_ERROR,
  XS_GET_PERMS,
  XS_INTRODUCE,
  XS_IS_DOMAIN_INTRODUCED,
  XS_MKDIR,
  XS_READ,
  XS_RELEASE,
  XS_RESUME,
  XS_RM,
  XS_SET_PERMS,
  XS_SET_TARGET,
  XS_WATCH,
  XS_WATCH_EVENT,
  XS_WRITE,
  XenstoreClient,
  XenstoreDaemon,
  XenstoreError,
  XenstoreInterface,
  encodeHeader,
  encodeText,
  joinStrings,
  parsePermission,
  splitStrings,
  type XsPermission,
} from '../../src/xenstore/index.js';
import { RawConnection, connectGuest, startSocketDaemon, type Guest, type SocketDaemon } from '../xenstore/helpers.js';

/**
 * xenstore messages the suite's clients sent (hostile and well-behaved, both transports), counted
 * as the daemon takes each in (a header it refuses outright is not counted).
 */
let messages = 0;
function counted(sd: SocketDaemon): SocketDaemon {
  const d = sd.daemon;
  const dispatch = d.dispatch.bind(d);
  d.dispatch = (c, m) => {
    messages++;
    dispatch(c, m);
  };
  return sd;
}
const sent = (from: number) => `${messages - from} xenstore messages`;
after(() => {
  console.log(`xenstore suite: ${messages} xenstore messages sent`);
});
import { assertChecksRan, fuzzRuns, runProperty, sleep, within } from './support.js';
import { unlessGone } from '../support/common.js';

const WAIT = 30_000;
const KNOWN_ERRORS = new Set<string>([...XSD_ERRORS.map((e) => e.errstring), 'EQUOTA']);

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'OK';
  } catch (e) {
    if (e instanceof XenstoreError) return e.code;
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// The well-behaved: a socket client and a guest that keep reading, writing and watching.

class WellBehaved {
  private n = 0;
  readonly events: string[] = [];
  readonly guestEvents: string[] = [];
  private constructor(readonly xs: XenstoreClient, readonly guest: Guest, readonly domid: number) {}

  static async start(d: XenstoreDaemon, xs: XenstoreClient, domid: number): Promise<WellBehaved> {
    await xs.mkdir(`/local/domain/${domid}`);
    await xs.setPerms(`/local/domain/${domid}`, [{ domid, perm: 'n' }]);
    await xs.write('/good/init', '0');
    const g = connectGuest(d, domid);
    const w = new WellBehaved(xs, g, domid);
    await xs.watch('/good', 'good-watch', (p) => w.events.push(p));
    await g.client.watch('mine', 'guest-watch', (p) => w.guestEvents.push(p));
    return w;
  }

  /** One round of ordinary work; every step bounded. */
  async step(what: string): Promise<void> {
    const i = ++this.n;
    const v = `v${i}`;
    const doing = async <T>(p: Promise<T>, act: string): Promise<T> => {
      try {
        return await within(p, `${what}: ${act}`, WAIT);
      } catch (e) {
        throw new Error(`${what}: ${act} failed: ${(e as Error).message}`, { cause: e });
      }
    };
    await doing(this.xs.write(`/good/k${i % 7}`, v), 'the well-behaved socket client writes');
    assert.equal(await doing(this.xs.read(`/good/k${i % 7}`), 'the well-behaved socket client reads'), v, `${what}: the well-behaved client reads what it wrote`);
    await doing(this.guest.client.write(`mine/k${i % 5}`, v), 'the well-behaved guest writes');
    assert.equal(await doing(this.guest.client.read(`mine/k${i % 5}`), 'the well-behaved guest reads'), v, `${what}: the well-behaved guest reads what it wrote`);
  }

  /** Their watches heard every write (events are sent before the reply that follows them). */
  async checkEvents(what: string): Promise<void> {
    await within(this.xs.read('/good/init'), `${what}: round trip`, WAIT);
    await within(unlessGone(this.guest.client.read(`mine/k0`)), `${what}: guest round trip`, WAIT);
    for (let i = 1; i <= this.n; i++) {
      assert.ok(this.events.includes(`/good/k${i % 7}`), `${what}: the socket client's watch heard /good/k${i % 7}`);
      assert.ok(this.guestEvents.includes(`mine/k${i % 5}`), `${what}: the guest's watch heard mine/k${i % 5}`);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 1. Malformed and oversized traffic.

interface RawMsg {
  type: number;
  reqId: number;
  txId: number;
  payload: Uint8Array;
  /** Announce this many bytes instead of the payload's length (past the max: a protocol violation). */
  lenOverride: number | null;
}
type PageAttack =
  | { k: 'junk'; bytes: Uint8Array }
  | { k: 'oversized'; len: number }
  | { k: 'index'; field: 'req_prod' | 'req_cons' | 'rsp_prod' | 'rsp_cons'; v: number }
  | { k: 'reconnect' };
type Attack =
  | { t: 'socket'; msgs: RawMsg[]; chunks: number[]; truncate: boolean }
  | { t: 'page'; attacks: PageAttack[] };

const sandboxStrings = ['/fuzz', '/fuzz/a', 'n100', '/fuzz/b/c', 'fuzz/rel', '@introduceDomain', '@releaseDomain', '', 'T', 'F', 'n0', 'r5', 'b1234', 'q0', '100', '101', '199', '99999', 'tok', 'print', '/', '/fuzz//x', '/fuzz/a/', 'bad path', '0'];
const payload: fc.Arbitrary<Uint8Array> = fc.oneof(
  { weight: 3, arbitrary: fc.uint8Array({ maxLength: 64 }) },
  { weight: 5, arbitrary: fc.array(fc.constantFrom(...sandboxStrings), { minLength: 1, maxLength: 3 }).map((ss) => joinStrings(ss)) },
  { weight: 1, arbitrary: fc.constantFrom(...sandboxStrings).map((s) => encodeText(s)) },
  // A watch whose token fills the payload: its events for deeper paths cannot fit one.
  { weight: 1, arbitrary: fc.constantFrom('/', '/good', '/fuzz', '@releaseDomain').map((w) => joinStrings([w, 'T'.repeat(XENSTORE_PAYLOAD_MAX - w.length - 2)])) },
  { weight: 1, arbitrary: fc.record({ n: fc.integer({ min: 2000, max: XENSTORE_PAYLOAD_MAX }), nul: fc.boolean() }).map(({ n, nul }) => {
    const b = new Uint8Array(n).fill(0x61);
    b[0] = 0x2f;
    if (nul) b[n - 1] = 0;
    return b;
  }) },
);
const randomMsg: fc.Arbitrary<RawMsg> = fc.record({
  type: fc.oneof(
    { weight: 8, arbitrary: fc.integer({ min: 0, max: 22 }) },
    { weight: 1, arbitrary: fc.constantFrom(0xffff, XS_WATCH_EVENT, XS_ERROR, 20, 23, 0x7fffffff) },
    { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffffffff }) },
  ),
  reqId: fc.integer({ min: 0, max: 0xffffffff }),
  txId: fc.oneof({ weight: 6, arbitrary: fc.constant(0) }, { weight: 2, arbitrary: fc.integer({ min: 1, max: 4 }) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffffffff }) }),
  payload,
  lenOverride: fc.oneof({ weight: 14, arbitrary: fc.constant(null) }, { weight: 1, arbitrary: fc.integer({ min: XENSTORE_PAYLOAD_MAX + 1, max: 0xffffffff }) }),
});
const watchPath = fc.constantFrom('/', '/good', '/fuzz', '/local', '@releaseDomain', '@introduceDomain');
/** Requests that make sense, with sandbox paths and domids, so that sequences of them do things. */
const structuredMsg: fc.Arbitrary<RawMsg> = fc.record({
  req: fc.oneof(
    fc.tuple(fc.constant(XS_WATCH), fc.tuple(watchPath, fc.boolean()).map(([w, long]) => joinStrings([w, long ? 'T'.repeat(XENSTORE_PAYLOAD_MAX - w.length - 2) : 'tok']))),
    fc.tuple(fc.constant(XS_WRITE), fc.constantFrom('/fuzz/a', '/fuzz/b/c', 'fuzz/rel', '/fuzz/a/deeper/still').map((w) => Buffer.concat([joinStrings([w]), encodeText('v')]))),
    fc.tuple(fc.constantFrom(XS_MKDIR, XS_RM, XS_READ, XS_DIRECTORY, XS_GET_PERMS), fc.constantFrom('/fuzz/a', '/fuzz/b', '/fuzz').map((w) => joinStrings([w]))),
    fc.tuple(fc.constant(XS_SET_PERMS), fc.constantFrom(['/fuzz/a', 'n100'], ['/fuzz/a', 'n0', 'r5'], ['/fuzz', 'n101'], ['/fuzz/b', 'b0']).map((a) => joinStrings(a))),
    fc.tuple(fc.constant(XS_INTRODUCE), fc.constantFrom('100', '101').map((d) => joinStrings([d, '1', '7']))),
    fc.tuple(fc.constantFrom(XS_RELEASE, XS_RESUME, XS_IS_DOMAIN_INTRODUCED), fc.constantFrom('100', '101', '0').map((d) => joinStrings([d]))),
    fc.tuple(fc.constant(XS_SET_TARGET), fc.constant(joinStrings(['100', '101']))),
    fc.tuple(fc.constant(XS_DIRECTORY_PART), fc.constantFrom('-5', '0', '3', '99999', 'x').map((o) => joinStrings(['/fuzz', o]))),
    fc.tuple(fc.constantFrom(6, 7, 10, 21), fc.constantFrom('', 'T', 'F', '100').map((a) => joinStrings([a]))),
  ),
  reqId: fc.integer({ min: 0, max: 0xffffffff }),
  txId: fc.oneof({ weight: 6, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: 1, max: 3 }) }),
}).map(({ req: [type, pl], reqId, txId }) => ({ type, reqId, txId, payload: pl, lenOverride: null }));
const rawMsg: fc.Arbitrary<RawMsg> = fc.oneof({ weight: 3, arbitrary: randomMsg }, { weight: 3, arbitrary: structuredMsg });
const pageAttack: fc.Arbitrary<PageAttack> = fc.oneof(
  { weight: 3, arbitrary: fc.record({ k: fc.constant('junk' as const), bytes: fc.uint8Array({ minLength: 1, maxLength: 300 }) }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant('oversized' as const), len: fc.integer({ min: XENSTORE_PAYLOAD_MAX + 1, max: 0xffffffff }) }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant('index' as const), field: fc.constantFrom('req_prod' as const, 'req_cons' as const, 'rsp_prod' as const, 'rsp_cons' as const), v: fc.integer({ min: 0, max: 0xffffffff }) }) },
  { weight: 1, arbitrary: fc.constant({ k: 'reconnect' as const }) },
);
const attack: fc.Arbitrary<Attack> = fc.oneof(
  { weight: 3, arbitrary: fc.record({ t: fc.constant('socket' as const), msgs: fc.array(rawMsg, { minLength: 1, maxLength: 12 }), chunks: fc.array(fc.integer({ min: 1, max: 200 }), { maxLength: 6 }), truncate: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('page' as const), attacks: fc.array(pageAttack, { minLength: 1, maxLength: 4 }) }) },
);

function wire(m: RawMsg): Uint8Array {
  const len = m.lenOverride ?? m.payload.length;
  const out = new Uint8Array(16 + (m.lenOverride === null ? m.payload.length : 0));
  out.set(encodeHeader({ type: m.type, reqId: m.reqId, txId: m.txId, len }), 0);
  if (m.lenOverride === null) out.set(m.payload, 16);
  return out;
}

async function socketAttack(sd: SocketDaemon, a: Extract<Attack, { t: 'socket' }>, what: string, whileOpen: () => Promise<void>): Promise<void> {
  const raw = await RawConnection.connect(sd.socketPath);
  try {
    // Everything up to the first oversized header is served; that header drops the connection.
    const cut = a.msgs.findIndex((m) => m.lenOverride !== null);
    const served = cut < 0 ? a.msgs : a.msgs.slice(0, cut);
    let bytes = Buffer.concat(a.msgs.slice(0, cut < 0 ? a.msgs.length : cut + 1).map(wire));
    // A truncated tail: half of one more message, which is never answered.
    if (a.truncate && cut < 0) bytes = Buffer.concat([bytes, Buffer.from(wire({ ...a.msgs[0]!, payload: new Uint8Array(40), lenOverride: null }).subarray(0, 30))]);
    let at = 0;
    for (const c of a.chunks) {
      if (at >= bytes.length) break;
      raw.send(bytes.subarray(at, at + c));
      at += c;
      await new Promise<void>((r) => setImmediate(r));
    }
    if (at < bytes.length) raw.send(bytes.subarray(at));
    const got: { type: number; reqId: number; txId: number; payload: Uint8Array }[] = [];
    while (got.length < served.length) {
      const m = await raw.next(WAIT);
      if (m === undefined) break;
      if (m.type === XS_WATCH_EVENT) continue;
      got.push(m);
    }
    assert.equal(got.length, served.length, `${what}: one reply per complete request (got ${got.length} of ${served.length}${raw.closed ? ', connection closed' : ''})`);
    served.forEach((m, i) => {
      const r = got[i]!;
      assert.equal(r.reqId, m.reqId, `${what}: reply ${i} carries its request's id`);
      assert.equal(r.txId, m.txId, `${what}: reply ${i} carries its request's transaction id`);
      if (r.type === XS_ERROR) {
        const name = splitStrings(r.payload)[0] ?? '';
        assert.ok(KNOWN_ERRORS.has(name) && r.payload[r.payload.length - 1] === 0, `${what}: reply ${i} error ${JSON.stringify(name)} is a known, NUL-terminated error name`);
      } else {
        assert.equal(r.type, m.type >>> 0, `${what}: reply ${i} has its request's type (${m.type}) or XS_ERROR`);
      }
    });
    if (cut >= 0) {
      // Nothing after the violation; the daemon hangs up.
      for (;;) {
        const m = await raw.next(WAIT);
        if (m === undefined) break;
        assert.equal(m.type, XS_WATCH_EVENT, `${what}: no reply after an oversized header`);
      }
      assert.ok(raw.closed, `${what}: a connection announcing ${a.msgs[cut]!.lenOverride} bytes is dropped`);
    }
    // Everyone else is served while this connection (its watches, its transactions) is alive.
    await whileOpen();
  } finally {
    raw.close();
  }
}

let guestSeq = 0;

async function pageAttackRun(sd: SocketDaemon, dom0: XenstoreClient, a: Extract<Attack, { t: 'page' }>, what: string): Promise<void> {
  const domid = 2000 + (++guestSeq % 1000);
  await dom0.mkdir(`/local/domain/${domid}`);
  await dom0.setPerms(`/local/domain/${domid}`, [{ domid, perm: 'n' }]);
  const g = connectGuest(sd.daemon, domid);
  const intf = new XenstoreInterface(g.page);
  // Whether the page's byte stream is at a message boundary (nothing sent yet).
  let clean = true;
  for (const x of a.attacks) {
    switch (x.k) {
      case 'junk':
        try { g.transport.send(x.bytes); } catch { /* the connection is already closed on our side */ } // static-check: allow an attack on a closed connection is moot
        clean = false;
        break;
      case 'oversized':
        try { g.transport.send(encodeHeader({ type: XS_READ, reqId: 1, txId: 0, len: x.len })); } catch { /* closed */ } // static-check: allow an attack on a closed connection is moot
        if (clean && !g.server.isIgnored) {
          await new Promise<void>((r) => setImmediate(r));
          assert.ok(g.server.isIgnored && intf.load('error') !== XENSTORE_ERROR_NONE, `${what}: an oversized header on the page sets its error and stops the daemon serving it`);
        }
        clean = false;
        break;
      case 'index': {
        intf.store(x.field, x.v);
        g.server.onEvent();
        clean = false;
        break;
      }
      case 'reconnect':
        // The daemon starts a fresh connection, but our client may still hold unsent bytes.
        intf.store('connection', 1);
        g.server.onEvent();
        clean = false;
        break;
    }
    await new Promise<void>((r) => setImmediate(r));
  }
  // A timer's turn for the daemon to act on the last attack before dom0's round trip below
  // (which would see its effect either way): scenario, not synchronisation.
  await sleep(1);
  // The guest's home is still there for dom0, and the daemon answers dom0.
  assert.ok(await within(dom0.exists(`/local/domain/${domid}`), `${what}: dom0 still served`, WAIT));
  g.client.close();
  sd.daemon.releaseDomain(domid);
}

test('xenstored against malformed and oversized traffic on both transports: one reply per request or a dropped connection, everyone else served', async (t) => {
  let replies = 0;
  const from = messages;
  await runProperty(t, 'xenstore malformed', fc.array(attack, { minLength: 1, maxLength: 6 }), async (attacks, n) => {
    const sd = counted(await startSocketDaemon());
    const dom0 = await XenstoreClient.connectSocket(sd.socketPath);
    try {
      await dom0.mkdir('/fuzz');
      const good = await WellBehaved.start(sd.daemon, dom0, 1300);
      for (const [i, a] of attacks.entries()) {
        const what = `case ${n} attack ${i} (${a.t})`;
        try {
          if (a.t === 'socket') {
            await socketAttack(sd, a, what, () => good.step(`${what}, with the raw connection open`));
            replies += a.msgs.length;
          } else await pageAttackRun(sd, dom0, a, what);
          await good.step(what);
        } catch (e) {
          if (e instanceof XenstoreError) throw new Error(`${what}: ${e.code} from ${e.stack}`, { cause: e });
          throw e;
        }
      }
      await good.checkEvents(`case ${n}`);
    } finally {
      dom0.close();
      await sd.close();
    }
  }, fuzzRuns(40), () => `${sent(from)}, ${replies} raw requests`);
  assertChecksRan(fuzzRuns(40), replies > 0, 'no raw request was answered');
});

// ---------------------------------------------------------------------------------------------
// 2. Permission escalation by an unprivileged guest.

const ATTACKER = 1234;
const VICTIM = 1235;

/** The tree dom0 sets up before the attacker starts. */
const INITIAL: [string, string, XsPermission[]][] = [
  ['/secret', 'top', [{ domid: 0, perm: 'n' }]],
  ['/secret/a', 's1', [{ domid: 0, perm: 'n' }]],
  ['/secret/b', '', [{ domid: 0, perm: 'n' }]],
  ['/secret/b/c', 's2', [{ domid: 0, perm: 'n' }]],
  ['/public', 'pub', [{ domid: 0, perm: 'r' }]],
  ['/public/x', 'px', [{ domid: 0, perm: 'r' }]],
  ['/public/hidden', 'ph', [{ domid: 0, perm: 'n' }]],
  ['/local/domain/0/name', 'Domain-0', [{ domid: 0, perm: 'n' }]],
  [`/local/domain/${ATTACKER}`, '', [{ domid: ATTACKER, perm: 'n' }]],
  [`/local/domain/${VICTIM}`, '', [{ domid: VICTIM, perm: 'n' }]],
  [`/local/domain/${VICTIM}/data`, 'v', [{ domid: VICTIM, perm: 'n' }]],
  [`/local/domain/${VICTIM}/shared`, 'shared', [{ domid: VICTIM, perm: 'n' }, { domid: ATTACKER, perm: 'r' }]],
  [`/local/domain/${VICTIM}/rw`, 'rwok', [{ domid: VICTIM, perm: 'n' }, { domid: ATTACKER, perm: 'b' }]],
  [`/local/domain/${VICTIM}/wonly`, 'wo', [{ domid: VICTIM, perm: 'n' }, { domid: ATTACKER, perm: 'w' }]],
  [`/local/domain/${VICTIM}/deny`, 'dn', [{ domid: VICTIM, perm: 'r' }, { domid: ATTACKER, perm: 'n' }]],
];
/** Where the attacker may legitimately change things. */
const MAY_CHANGE = [`/local/domain/${ATTACKER}`, `/local/domain/${VICTIM}/rw`, `/local/domain/${VICTIM}/wonly`];

const targets = [
  ...INITIAL.map(([p]) => p), '/secret/nope', '/secret/b/c/d', '/public/new', '/local/domain/0', '/local/domain/0/new', '/', '/good', '/good/k1',
  `/local/domain/${VICTIM}/new`, `/local/domain/${VICTIM}/rw/child`, `/local/domain/${ATTACKER}/mine`, 'mine/rel', 'rel', '@introduceDomain', '@releaseDomain',
  '/tool/xenstored', '/local/domain/1235/../0', 'bad path', '/local', '/local/domain',
];

type Esc =
  | { op: 'read' | 'directory' | 'getPerms' | 'mkdir' | 'rm' | 'directoryPart'; path: string; tx: 'none' | 'own' | number }
  | { op: 'write'; path: string; value: string; tx: 'none' | 'own' | number }
  | { op: 'setPerms'; path: string; perms: string[]; tx: 'none' | 'own' | number }
  | { op: 'watch' | 'unwatch'; path: string; token: string }
  | { op: 'txStart' }
  | { op: 'txEnd'; commit: boolean }
  | { op: 'priv'; type: number; args: string[] }
  | { op: 'resetWatches' }
  | { op: 'dom0introduce'; domid: number };

const txChoice = fc.oneof(
  { weight: 6, arbitrary: fc.constant('none' as const) },
  { weight: 2, arbitrary: fc.constant('own' as const) },
  { weight: 1, arbitrary: fc.integer({ min: 1, max: 20 }) },
);
const escPath = fc.constantFrom(...targets);
const esc: fc.Arbitrary<Esc> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ op: fc.constantFrom('read' as const, 'directory' as const, 'getPerms' as const, 'directoryPart' as const), path: escPath, tx: txChoice }) },
  { weight: 4, arbitrary: fc.record({ op: fc.constant('write' as const), path: escPath, value: fc.constantFrom('pwned', '', 'x'.repeat(100)), tx: txChoice }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constantFrom('mkdir' as const, 'rm' as const), path: escPath, tx: txChoice }) },
  {
    weight: 3,
    arbitrary: fc.record({
      op: fc.constant('setPerms' as const),
      path: escPath,
      perms: fc.array(fc.constantFrom('n0', 'r0', 'b0', `n${ATTACKER}`, `b${ATTACKER}`, `r${ATTACKER}`, `n${VICTIM}`, `b${VICTIM}`, 'w7', 'q1', ''), { minLength: 1, maxLength: 4 }),
      tx: txChoice,
    }),
  },
  { weight: 3, arbitrary: fc.record({ op: fc.constantFrom('watch' as const, 'unwatch' as const), path: escPath, token: fc.constantFrom('t1', 't2', 'long') }) },
  { weight: 1, arbitrary: fc.constant({ op: 'txStart' as const }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('txEnd' as const), commit: fc.boolean() }) },
  {
    weight: 2,
    arbitrary: fc.record({
      op: fc.constant('priv' as const),
      type: fc.constantFrom(XS_INTRODUCE, XS_RELEASE, XS_SET_TARGET, XS_RESUME, XS_IS_DOMAIN_INTRODUCED, XS_CONTROL),
      args: fc.array(fc.constantFrom(String(ATTACKER), String(VICTIM), '0', '1300', '5', '7', 'print', '32752'), { minLength: 1, maxLength: 3 }),
    }),
  },
  { weight: 1, arbitrary: fc.constant({ op: 'resetWatches' as const }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('dom0introduce' as const), domid: fc.integer({ min: 3000, max: 3100 }) }) },
);

/** The longest token a watch on `path` can carry (its request payload exactly XENSTORE_PAYLOAD_MAX). */
function longToken(path: string): string {
  return 't'.repeat(XENSTORE_PAYLOAD_MAX - Buffer.byteLength(path) - 2);
}

/** What a domain may do with a node, computed here from docs/misc/xenstore.txt's rules. */
function may(perms: readonly XsPermission[], domid: number): { read: boolean; write: boolean; owner: boolean } {
  const owner = perms[0]!;
  if (owner.domid === domid) return { read: true, write: true, owner: true };
  const e = perms.slice(1).find((p) => p.domid === domid) ?? owner;
  return { read: e.perm === 'r' || e.perm === 'b', write: e.perm === 'w' || e.perm === 'b', owner: false };
}

const abs = (p: string): string => (p.startsWith('/') || p.startsWith('@') ? p : `/local/domain/${ATTACKER}/${p}`);
const parentOf = (p: string): string => (p.lastIndexOf('/') <= 0 ? '/' : p.slice(0, p.lastIndexOf('/')));
const below = (p: string, a: string): boolean => p === a || p.startsWith(`${a}/`);

interface Snap { value: string; perms: string; children: string }
function snapshot(d: XenstoreDaemon): Map<string, Snap> {
  const out = new Map<string, Snap>();
  for (const p of d.store.paths()) {
    if (p.startsWith('@')) continue;
    const n = d.store.get(p)!;
    out.set(p, { value: Buffer.from(n.value).toString('latin1'), perms: n.perms.map((x) => `${x.perm}${x.domid}`).join(','), children: [...n.children].sort().join(',') });
  }
  return out;
}

test('an unprivileged guest never reads, hears of or changes what its permissions deny, and never does privileged operations', async (t) => {
  let ops = 0;
  let denied = 0;
  const from = messages;
  await runProperty(t, 'xenstore escalation', fc.array(esc, { minLength: 1, maxLength: 40 }), async (script, n) => {
    const sd = counted(await startSocketDaemon());
    const dom0 = await XenstoreClient.connectSocket(sd.socketPath);
    let attacker: Guest | undefined;
    try {
      const d = sd.daemon;
      for (const [p, v, perms] of INITIAL) {
        await dom0.write(p, v);
        await dom0.setPerms(p, perms);
      }
      const good = await WellBehaved.start(d, dom0, 1300);
      const before = snapshot(d);
      attacker = connectGuest(d, ATTACKER);
      connectGuest(d, VICTIM);
      const c = attacker.client;
      const heard: { path: string; token: string }[] = [];
      const registered = new Set<string>();
      let ownTx: number | undefined;
      for (const [i, s] of script.entries()) {
        ops++;
        const what = `case ${n} step ${i}: ${JSON.stringify(s)}`;
        const txOf = (x: 'none' | 'own' | number): number => (x === 'none' ? 0 : x === 'own' ? (ownTx ?? 0) : x);
        const pre = (p: string) => d.store.get(p);
        const nearest = (p: string) => {
          let q = p;
          while (pre(q) === undefined && q !== '/') q = parentOf(q);
          return pre(q);
        };
        const beforeOp = new Map<string, string | undefined>();
        if ('path' in s) {
          const n0 = d.store.get(abs(s.path));
          beforeOp.set(abs(s.path), n0 === undefined ? undefined : `${Buffer.from(n0.value).toString('latin1')}|${n0.perms.map((x) => x.perm + x.domid)}`);
        }
        let r: string;
        switch (s.op) {
          case 'read':
          case 'directory':
          case 'getPerms':
          case 'directoryPart': {
            const tx = txOf(s.tx);
            const p = abs(s.path);
            const node = pre(p);
            let got: Uint8Array | undefined;
            const type = s.op === 'read' ? XS_READ : s.op === 'directory' ? XS_DIRECTORY : s.op === 'getPerms' ? XS_GET_PERMS : XS_DIRECTORY_PART;
            const args = s.op === 'directoryPart' ? [s.path, '0'] : [s.path];
            r = await code(c.request(type, joinStrings(args), tx).then((b) => { got = b; }));
            if (r === 'OK' && tx === 0) {
              assert.ok(node !== undefined, `${what}: answered for a node that does not exist`);
              assert.ok(may(node.perms, ATTACKER).read, `${what}: the guest read a node it may not read (perms ${node.perms.map((x) => x.perm + x.domid)})`);
              if (s.op === 'read') assert.equal(Buffer.from(got!).toString('latin1'), Buffer.from(node.value).toString('latin1'));
            }
            if (r === 'OK' && tx !== 0 && node !== undefined && !below(p, `/local/domain/${ATTACKER}`)) {
              // In a transaction the node may be the guest's own creation; an existing one must be readable.
              assert.ok(may(node.perms, ATTACKER).read, `${what}: the guest read (in a transaction) a node it may not read`);
            }
            if (r === 'ENOENT' && tx === 0 && !p.startsWith('@')) {
              const anc = nearest(p);
              assert.ok(anc !== undefined && may(anc.perms, ATTACKER).read, `${what}: ENOENT reveals that a node is absent under one the guest may not read`);
            }
            break;
          }
          case 'write':
          case 'mkdir':
          case 'rm': {
            const tx = txOf(s.tx);
            const p = abs(s.path);
            const node = pre(p);
            const type = s.op === 'write' ? XS_WRITE : s.op === 'mkdir' ? XS_MKDIR : XS_RM;
            const pl = s.op === 'write' ? Buffer.concat([joinStrings([s.path]), encodeText(s.value)]) : joinStrings([s.path]);
            r = await code(c.request(type, pl, tx));
            if (r === 'OK' && tx === 0) {
              if (node !== undefined) {
                assert.ok(may(node.perms, ATTACKER).write, `${what}: the guest changed a node it may not write`);
              } else {
                const anc = nearest(p);
                assert.ok(anc !== undefined && may(anc.perms, ATTACKER).write, `${what}: the guest created a node under one it may not write`);
              }
            }
            break;
          }
          case 'setPerms': {
            const tx = txOf(s.tx);
            const p = abs(s.path);
            const node = pre(p);
            r = await code(c.request(XS_SET_PERMS, joinStrings([s.path, ...s.perms]), tx));
            if (r === 'OK' && tx === 0) {
              assert.ok(node !== undefined && may(node.perms, ATTACKER).owner, `${what}: the guest changed the permissions of a node it does not own`);
              assert.equal(parsePermission(s.perms[0]!)?.domid, ATTACKER, `${what}: the guest gave its node away`);
            }
            break;
          }
          case 'watch':
            r = await code(c.watch(s.path, s.token === 'long' ? longToken(s.path) : s.token, (path, token) => heard.push({ path, token })));
            if (r === 'OK') registered.add(s.path);
            break;
          case 'unwatch':
            r = await code(c.unwatch(s.path, s.token));
            break;
          case 'txStart':
            r = await code(c.transactionStart().then((x) => { ownTx = x; }));
            break;
          case 'txEnd':
            r = await code(c.transactionEnd(ownTx ?? 0, s.commit));
            ownTx = undefined;
            break;
          case 'priv':
            r = await code(c.request(s.type, joinStrings(s.args)));
            assert.equal(r, EACCES, `${what}: a privileged operation from a guest is refused with EACCES`);
            break;
          case 'resetWatches':
            r = await code(c.resetWatches());
            break;
          case 'dom0introduce':
            // dom0 introduces (and releases) some domain: @introduceDomain/@releaseDomain fire.
            await dom0.introduce(s.domid, 1, 1);
            await dom0.release(s.domid);
            r = 'dom0';
            break;
        }
        if (r !== 'OK') denied++;
        // A refused change changes nothing.
        if (r !== 'OK' && r !== 'dom0' && (s.op === 'write' || s.op === 'mkdir' || s.op === 'rm' || s.op === 'setPerms') && txOf(s.tx) === 0) {
          const p = abs(s.path);
          const was = beforeOp.get(p);
          const now = d.store.get(p);
          assert.equal(now === undefined ? undefined : `${Buffer.from(now.value).toString('latin1')}|${now.perms.map((x) => x.perm + x.domid)}`, was,
            `${what}: refused with ${r}, yet ${p} changed`);
        }
        if (i % 4 === 0) await good.step(what);
      }
      // The attacker's events: only paths it may read now, or registration echoes of its own watches.
      // Any answer will do (OK, ENOENT, or EACCES once the guest removed its own home: /local/domain
      // is not its to read, so xenstored hides whether the node exists); it only orders the events.
      await within(code(c.read(`/local/domain/${ATTACKER}`)), 'attacker round trip', WAIT);
      for (const e of heard) {
        if (registered.has(e.path) || [...registered].some((w) => abs(w) === abs(e.path))) continue;
        const p = abs(e.path);
        assert.ok(!below(p, '/good') && !below(p, '/secret') && !p.startsWith('@') && !below(p, '/local/domain/0'),
          `case ${n}: the guest heard a watch event for ${e.path}, which it may not read`);
      }
      // Nothing it may not write changed; nothing appeared where it may not create.
      const afterSnap = snapshot(d);
      for (const [p, s] of before) {
        if (MAY_CHANGE.some((m) => below(p, m)) || below(p, '/good') || below(p, '/local/domain/1300')) continue;
        const now = afterSnap.get(p);
        assert.ok(now !== undefined, `case ${n}: ${p} was removed by the guest`);
        assert.equal(now.value, s.value, `case ${n}: ${p}'s value was changed by the guest`);
        assert.equal(now.perms, s.perms, `case ${n}: ${p}'s permissions were changed by the guest`);
        // A node the guest may write it may also remove (xenstored's rm needs write on the node alone).
        const removable = new Set(MAY_CHANGE.filter((m) => parentOf(m) === p).map((m) => m.slice(p.length + 1)));
        const was = s.children.split(',').filter((x) => x !== '');
        const kids = now.children.split(',').filter((x) => x !== '');
        assert.ok(kids.every((k) => was.includes(k)) && was.every((k) => kids.includes(k) || removable.has(k)),
          `case ${n}: ${p}'s children were changed by the guest (${s.children} -> ${now.children})`);
      }
      for (const p of afterSnap.keys()) {
        if (before.has(p) || MAY_CHANGE.some((m) => below(p, m)) || below(p, '/good') || below(p, '/local/domain/1300')) continue;
        assert.fail(`case ${n}: the guest created ${p}, where it may not write`);
      }
      await good.step(`case ${n} end`);
      await good.checkEvents(`case ${n}`);
    } finally {
      attacker?.client.close();
      dom0.close();
      await sd.close();
    }
  }, fuzzRuns(40), () => `${sent(from)}, ${ops} guest operations, ${denied} refused`);
  assertChecksRan(fuzzRuns(40), denied > 0 && ops > denied, `${ops} guest operations, ${denied} refused: both kinds wanted`);
});

// ---------------------------------------------------------------------------------------------
// 3. Transaction storms.

interface Worker {
  transport: 'socket' | 'page0' | 'guest';
  job: 'inc' | 'transfer' | 'audit' | 'abandon' | 'abort' | 'randomTx';
  times: number;
  pause: number;
}
const worker: fc.Arbitrary<Worker> = fc.record({
  transport: fc.constantFrom('socket' as const, 'page0' as const, 'guest' as const),
  job: fc.oneof(
    { weight: 4, arbitrary: fc.constantFrom('inc' as const, 'transfer' as const) },
    { weight: 2, arbitrary: fc.constant('audit' as const) },
    { weight: 1, arbitrary: fc.constantFrom('abandon' as const, 'abort' as const, 'randomTx' as const) },
  ),
  times: fc.integer({ min: 1, max: 8 }),
  pause: fc.integer({ min: 0, max: 2 }),
});

const GUESTS = [1400, 1401, 1402, 1403, 1404, 1405, 1406, 1407, 1408, 1409, 1410, 1411];

test('transaction storms over both transports: every commit counted once, every committed read consistent, everyone else served', async (t) => {
  let commits = 0;
  let conflicts = 0;
  const from = messages;
  await runProperty(t, 'xenstore storm', fc.array(worker, { minLength: 2, maxLength: 10 }), async (workers, n) => {
    const sd = counted(await startSocketDaemon());
    const dom0 = await XenstoreClient.connectSocket(sd.socketPath);
    const clients: XenstoreClient[] = [];
    try {
      const d = sd.daemon;
      await dom0.write('/storm/c', '0');
      await dom0.write('/storm/x', '1000');
      await dom0.write('/storm/y', '0');
      const perms: XsPermission[] = [{ domid: 0, perm: 'n' }, ...GUESTS.map((g) => ({ domid: g, perm: 'b' as const }))];
      for (const p of ['/storm', '/storm/c', '/storm/x', '/storm/y']) await dom0.setPerms(p, perms);
      for (const g of GUESTS) {
        await dom0.mkdir(`/local/domain/${g}`);
        await dom0.setPerms(`/local/domain/${g}`, [{ domid: g, perm: 'n' }]);
      }
      const good = await WellBehaved.start(d, dom0, 1300);
      let guestIdx = 0;
      let page0 = false;
      const make = async (w: Worker): Promise<XenstoreClient> => {
        let c: XenstoreClient;
        // A domain has one page: a second page for dom0 would replace the first.
        if (w.transport === 'socket' || (w.transport === 'page0' && page0)) c = await XenstoreClient.connectSocket(sd.socketPath);
        else if (w.transport === 'page0') {
          page0 = true;
          c = connectGuest(d, 0).client;
        }
        else c = connectGuest(d, GUESTS[guestIdx++ % GUESTS.length]!).client;
        clients.push(c);
        return c;
      };
      let incs = 0;
      let transfers = 0;
      const bad: string[] = [];
      const pause = async (k: number) => {
        for (let i = 0; i < k; i++) await new Promise<void>((r) => setImmediate(r));
      };
      const run = async (w: Worker, c: XenstoreClient): Promise<void> => {
        for (let i = 0; i < w.times; i++) {
          switch (w.job) {
            case 'inc':
            case 'transfer': {
              const r = await code(c.transaction(async (tx) => {
                if (w.job === 'inc') {
                  const v = Number(await c.read('/storm/c', tx));
                  await pause(w.pause);
                  await c.write('/storm/c', String(v + 1), tx);
                } else {
                  const x = Number(await c.read('/storm/x', tx));
                  await pause(w.pause);
                  const y = Number(await c.read('/storm/y', tx));
                  await c.write('/storm/x', String(x - 1), tx);
                  await c.write('/storm/y', String(y + 1), tx);
                }
              }, 1000));
              if (r === 'OK') {
                if (w.job === 'inc') incs++;
                else transfers++;
              } else if (r === 'EAGAIN') conflicts++;
              else if (r !== 'ENOSPC' && r !== 'EQUOTA') bad.push(`${w.job}: ${r}`);
              break;
            }
            case 'audit': {
              let x = -1;
              let y = -1;
              const r = await code(c.transaction(async (tx) => {
                x = Number(await c.read('/storm/x', tx));
                await pause(w.pause);
                y = Number(await c.read('/storm/y', tx));
              }, 1));
              if (r === 'OK' && x + y !== 1000) bad.push(`a committed audit saw x ${x} + y ${y} != 1000`);
              if (r === 'EAGAIN') conflicts++;
              break;
            }
            case 'abandon':
            case 'abort': {
              // A transaction the storm may refuse (quota, EAGAIN) or its own close may cut: these
              // writes are meant to be thrown away; the audits check what was committed.
              const tx = await c.transactionStart().catch(() => undefined); // static-check: allow thrown away by design (above)
              if (tx === undefined) break;
              await c.write('/storm/c', '-999999', tx).catch(() => undefined); // static-check: allow thrown away by design (above)
              await c.write('/storm/x', '-999999', tx).catch(() => undefined); // static-check: allow thrown away by design (above)
              await pause(w.pause);
              if (w.job === 'abort') await c.transactionEnd(tx, false).catch(() => undefined); // static-check: allow thrown away by design (above)
              else if (i === w.times - 1) c.close(); // the connection goes away with its transaction open
              break;
            }
            case 'randomTx': {
              const r = await code(c.request(XS_WRITE, Buffer.concat([joinStrings(['/storm/c']), encodeText('-1')]), 0x7000 + i));
              if (r !== 'ENOENT') bad.push(`a write in a transaction nobody started answered ${r}`);
              break;
            }
          }
        }
      };
      const all = await Promise.all(workers.map(make));
      const storm = Promise.all(workers.map((w, i) => run(w, all[i]!)));
      // The well-behaved keep working during the storm.
      for (let i = 0; i < 3; i++) await good.step(`case ${n} during the storm`);
      await within(storm, `case ${n}: the storm`, 30_000);
      assert.deepEqual(bad, [], `case ${n}`);
      const c = Number(await dom0.read('/storm/c'));
      const x = Number(await dom0.read('/storm/x'));
      const y = Number(await dom0.read('/storm/y'));
      assert.equal(c, incs, `case ${n}: the counter counts every committed increment once`);
      assert.equal(y, transfers, `case ${n}: y counts every committed transfer once`);
      assert.equal(x + y, 1000, `case ${n}: transfers keep x + y`);
      commits += incs + transfers;
      await good.step(`case ${n} after the storm`);
      await good.checkEvents(`case ${n}`);
    } finally {
      for (const c of clients) c.close();
      dom0.close();
      await sd.close();
    }
  }, fuzzRuns(30), () => `${sent(from)}, ${commits} commits, ${conflicts} conflicts`);
  assertChecksRan(fuzzRuns(30), commits > 0, 'no transaction committed');
});

// ---------------------------------------------------------------------------------------------
// 4. Watch tokens of any length: xs_wire.h lets a token fill the XS_WATCH payload, so an event
//    for a path deeper than the watch cannot be sent whole. That must cost at most that one
//    event: never the change itself, nor other watchers' events, nor the daemon.

interface TokenCase {
  watcher: 'socket' | 'guest';
  slack: number;
  depth: number;
  trigger: 'write' | 'mkdir' | 'rm' | 'setPerms' | 'release';
}
const tokenCase: fc.Arbitrary<TokenCase> = fc.record({
  watcher: fc.constantFrom('socket' as const, 'guest' as const),
  slack: fc.integer({ min: 0, max: 12 }),
  depth: fc.integer({ min: 1, max: 4 }),
  trigger: fc.constantFrom('write' as const, 'mkdir' as const, 'rm' as const, 'setPerms' as const, 'release' as const),
});

test('a watch token of any length costs at most its own event: the change is made and answered OK, other watchers hear it, the daemon lives', async (t) => {
  const from = messages;
  let heardChecked = 0;
  await runProperty(t, 'xenstore long tokens', tokenCase, async (c, n) => {
    const uncaught: unknown[] = [];
    const onUncaught = (e: unknown) => uncaught.push(e);
    process.on('uncaughtException', onUncaught);
    const sd = counted(await startSocketDaemon());
    const dom0 = await XenstoreClient.connectSocket(sd.socketPath);
    const others: XenstoreClient[] = [];
    try {
      const d = sd.daemon;
      const X = 50;
      const D = 60;
      const home = `/local/domain/${X}`;
      await dom0.mkdir(home);
      await dom0.setPerms(home, [{ domid: X, perm: 'n' }, { domid: D, perm: 'w' }]);
      await dom0.mkdir(`/local/domain/${D}`);
      await dom0.setPerms(`/local/domain/${D}`, [{ domid: D, perm: 'n' }]);
      const gx = connectGuest(d, X);
      const gd = connectGuest(d, D);
      const deep = `${home}/${Array.from({ length: c.depth }, (_, i) => `n${i}`).join('/')}`;
      // What the trigger acts on exists beforehand (rm, setPerms: dom0's node; release: D's node).
      if (c.trigger === 'rm' || c.trigger === 'setPerms') await dom0.write(deep, 'old');
      const target = c.trigger === 'release' ? `${home}/fromD` : deep;
      if (c.trigger === 'release') await gd.client.write(target, 'd');
      const early = await XenstoreClient.connectSocket(sd.socketPath);
      others.push(early);
      const heardEarly: string[] = [];
      await early.watch(home, 'early', (p) => heardEarly.push(p));
      const watcher = c.watcher === 'socket' ? await XenstoreClient.connectSocket(sd.socketPath) : gx.client;
      if (c.watcher === 'socket') others.push(watcher);
      const token = 'L'.repeat(XENSTORE_PAYLOAD_MAX - Buffer.byteLength(home) - 2 - c.slack);
      await watcher.watch(home, token, () => undefined);
      const late = await XenstoreClient.connectSocket(sd.socketPath);
      others.push(late);
      const heardLate: string[] = [];
      await late.watch(home, 'late', (p) => heardLate.push(p));
      let r: string;
      switch (c.trigger) {
        case 'write': r = await code(dom0.write(deep, 'new')); break;
        case 'mkdir': r = await code(dom0.mkdir(deep)); break;
        case 'rm': r = await code(dom0.rm(deep)); break;
        case 'setPerms': r = await code(dom0.setPerms(deep, [{ domid: 0, perm: 'r' }])); break;
        default: r = await code(dom0.release(D));
      }
      // A window for an exception the daemon throws asynchronously to surface (no event marks
      // its absence); the events themselves are waited for by round trips below.
      await sleep(5);
      assert.deepEqual(uncaught.map(String), [], `case ${n} (${JSON.stringify(c)}): the daemon threw`);
      assert.equal(r, 'OK', `case ${n} (${JSON.stringify(c)}): the ${c.trigger} is answered OK`);
      const node = d.store.get(target);
      switch (c.trigger) {
        case 'write': assert.equal(node && Buffer.from(node.value).toString(), 'new', `case ${n}: the write was made`); break;
        case 'mkdir': assert.ok(node !== undefined, `case ${n}: the node was made`); break;
        case 'rm':
        case 'release': assert.equal(node, undefined, `case ${n}: the node was removed`); break;
        default: assert.equal(node?.perms[0]?.perm, 'r', `case ${n}: the permissions were set`);
      }
      await within(early.read(home), 'round trip', WAIT);
      await within(late.read(home), 'round trip', WAIT);
      assert.ok(heardEarly.includes(target),
        `case ${n} (${JSON.stringify(c)}): a watcher registered before the long token heard ${target} (heard ${heardEarly.join(', ')})`);
      assert.ok(heardLate.includes(target), `case ${n} (${JSON.stringify(c)}): a watcher registered after the long token heard ${target} (heard ${heardLate.join(', ')})`);
      assert.ok(await within(dom0.exists(home), 'the daemon still serves dom0', WAIT));
      heardChecked++;
    } finally {
      process.off('uncaughtException', onUncaught);
      for (const o of others) o.close();
      dom0.close();
      await sd.close();
    }
  }, fuzzRuns(30), () => `${sent(from)}, ${heardChecked} cases' events checked`);
  assertChecksRan(fuzzRuns(30), heardChecked > 0, 'no case reached its watch checks');
});
