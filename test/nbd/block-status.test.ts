/**
 * base:allocation as the export truthfully knows it: the ranges the server zeroed itself, a hole
 * where the device deallocated them, forgotten when written or trimmed; everything else data.
 * The extent map against a per-block model (fast-check), the negotiation (LIST/SET_META_CONTEXT)
 * and NBD_CMD_BLOCK_STATUS byte by byte, and qemu-img map and nbdinfo --map reading it.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT, NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REP_ACK,
  NBD_REP_ERR_INVALID, NBD_REP_META_CONTEXT, NBD_STATE_HOLE, NBD_STATE_ZERO, NbdServer, ZeroExtents, decodeBlockStatus,
  decodeErrorChunk, decodeMetaContext, encodeInfoRequest, encodeMetaContextRequest, encodeOption, nbdUri,
  NBD_OPT_GO, NBD_OPT_STRUCTURED_REPLY, type NbdAddress,
} from '../../src/nbd/index.js';
import { RawClient, TrimmingDevice, randomBytes, runOk } from './support.js';
import { needTools } from '../support/tools.js';

needTools('qemu-img', 'nbdinfo', 'qemu-io');

const HZ = NBD_STATE_HOLE | NBD_STATE_ZERO;

test('ZeroExtents against a per-block model: zeroes marked, writes and trims forget, overlaps in flight mark nothing', () => {
  const B = 16;
  const op = fc.record({ kind: fc.constantFrom('write', 'trim', 'zero', 'hole'), start: fc.nat(B - 1), len: fc.integer({ min: 1, max: B }) });
  fc.assert(fc.property(fc.array(fc.tuple(op, fc.boolean()), { maxLength: 30 }), (ops) => {
    const z = new ZeroExtents();
    const model = new Array<number>(B).fill(0);
    const flagsOf = (k: string) => (k === 'zero' ? NBD_STATE_ZERO : k === 'hole' ? HZ : 0);
    const set = (a: number, b: number, f: number, except?: [number, number]) => {
      for (let i = a; i < b; i++) if (except === undefined || i < except[0] || i >= except[1]) model[i] = f;
    };
    // An op left open (its boolean) is still in flight while the next one starts; then it ends, then the next.
    let open: { done: (f?: number) => void; range: [number, number]; flags: number } | undefined;
    for (const [o, keepOpen] of ops) {
      const range: [number, number] = [o.start, Math.min(B, o.start + o.len)];
      const c = z.begin(range[0], range[1] - range[0], o.kind === 'zero' || o.kind === 'hole');
      set(range[0], range[1], 0);
      const flags = flagsOf(o.kind);
      if (open !== undefined) {
        open.done(open.flags);
        if (open.flags !== 0) set(open.range[0], open.range[1], open.flags, range);
        c.done(flags);
        if (flags !== 0) set(range[0], range[1], flags, open.range);
        open = undefined;
      } else if (keepOpen) {
        open = { done: (f) => c.done(f), range, flags };
      } else {
        c.done(flags);
        set(range[0], range[1], flags);
      }
    }
    if (open !== undefined) {
      open.done(open.flags);
      set(open.range[0], open.range[1], open.flags);
    }
    const got: number[] = [];
    for (const e of z.query(0, B, 1000)) for (let i = 0; i < e.length; i++) got.push(e.flags);
    assert.deepEqual(got, model);
    const one = z.query(3, B - 3, 1);
    assert.equal(one.length, 1);
    assert.ok(one[0]!.length >= 1 && one[0]!.length <= B - 3);
  }), { numRuns: 1000 });
});

const MiB = 1024 * 1024;
const owned = new TrimmingDevice(8 * MiB);
const shared = new TrimmingDevice(MiB);
const server = new NbdServer({ exports: [{ name: 'owned', device: owned, ownsWrites: true }, { name: 'shared', device: shared }] });
let addr: NbdAddress;
before(async () => { addr = await server.listen({ host: '127.0.0.1', port: 0 }); });
after(() => server.close());

async function metaContexts(c: RawClient, option: number, name: string, queries: string[]): Promise<{ id: number; name: string }[] | number> {
  c.send(encodeOption(option, encodeMetaContextRequest({ name, queries })));
  const contexts: { id: number; name: string }[] = [];
  for (;;) {
    const r = await c.recvOptionReply();
    if (r.replyType === NBD_REP_META_CONTEXT) contexts.push(decodeMetaContext(r.data)!);
    else return r.replyType === NBD_REP_ACK ? contexts : r.replyType;
  }
}

/** NBD_OPT_STRUCTURED_REPLY after the handshake. */
async function structured(c: RawClient): Promise<void> {
  const [r] = await c.option(NBD_OPT_STRUCTURED_REPLY);
  assert.equal(r!.replyType, NBD_REP_ACK);
}

/** NBD_OPT_GO after the other options. */
async function go(c: RawClient, name: string): Promise<void> {
  const replies = await c.option(NBD_OPT_GO, encodeInfoRequest({ name, infos: [] }));
  assert.equal(replies[replies.length - 1]!.replyType, NBD_REP_ACK);
  c.parser.enterTransmission();
}

test('negotiation: base:allocation listed and selected for an export the server alone writes, never for another', async () => {
  const c = await RawClient.connect({ port: (addr as { port: number }).port });
  try {
    await c.handshake();
    assert.deepEqual(await metaContexts(c, NBD_OPT_LIST_META_CONTEXT, 'owned', []), [{ id: 0, name: 'base:allocation' }]);
    assert.deepEqual(await metaContexts(c, NBD_OPT_LIST_META_CONTEXT, 'owned', ['base:']), [{ id: 0, name: 'base:allocation' }]);
    assert.deepEqual(await metaContexts(c, NBD_OPT_LIST_META_CONTEXT, 'owned', ['qemu:dirty-bitmap:x']), []);
    assert.deepEqual(await metaContexts(c, NBD_OPT_LIST_META_CONTEXT, 'shared', []), []);
    assert.equal(await metaContexts(c, NBD_OPT_SET_META_CONTEXT, 'owned', ['base:allocation']), NBD_REP_ERR_INVALID, 'SET needs structured replies');
  } finally {
    c.destroy();
  }
});

async function blockStatus(c: RawClient, offset: number, length: number, flags = 0): Promise<{ length: number; flags: number }[] | number> {
  const h = c.request(NBD_CMD_BLOCK_STATUS, offset, length, { flags });
  const m = await c.recv();
  assert.ok(m?.kind === 'structuredChunk' && m.handle === h, `${m?.kind} ${m?.kind === 'simpleReply' ? m.error : ''}`);
  if (m.type !== NBD_REPLY_TYPE_BLOCK_STATUS) return decodeErrorChunk(m.type, m.payload)!.error;
  const bs = decodeBlockStatus(m.payload)!;
  assert.equal(bs.contextId, 1);
  return bs.extents;
}

async function zero(c: RawClient, offset: number, length: number, flags: number): Promise<void> {
  const h = c.request(NBD_CMD_WRITE_ZEROES, offset, length, { flags });
  assert.deepEqual(await c.recv(), { kind: 'simpleReply', error: 0, handle: h });
}

test('NBD_CMD_BLOCK_STATUS: zeroed ranges as holes or zeroes, data written over a discarded range is data again', async () => {
  const c = await RawClient.connect({ port: (addr as { port: number }).port });
  try {
    await c.handshake();
    await structured(c);
    assert.deepEqual(await metaContexts(c, NBD_OPT_SET_META_CONTEXT, 'owned', ['base:allocation', 'x-unknown:thing']), [{ id: 1, name: 'base:allocation' }]);
    await go(c, 'owned');
    assert.deepEqual(await blockStatus(c, 0, 8 * MiB), [{ length: 8 * MiB, flags: 0 }], 'nothing known: data');
    await zero(c, MiB, 2 * MiB, 0);
    await zero(c, 4 * MiB, MiB, NBD_CMD_FLAG_NO_HOLE);
    assert.deepEqual(await blockStatus(c, 0, 8 * MiB), [
      { length: MiB, flags: 0 }, { length: 2 * MiB, flags: HZ }, { length: MiB, flags: 0 }, { length: MiB, flags: NBD_STATE_ZERO }, { length: 3 * MiB, flags: 0 },
    ]);
    assert.deepEqual(await blockStatus(c, MiB + 4096, 8192, NBD_CMD_FLAG_REQ_ONE), [{ length: 8192, flags: HZ }]);
    // Data over part of the discarded range: no hole may be reported there.
    const data = randomBytes(65536, 5);
    c.request(NBD_CMD_WRITE, 2 * MiB, data.length, { data });
    await c.recv();
    c.request(NBD_CMD_TRIM, 4 * MiB, 4096);
    await c.recv();
    assert.deepEqual(await blockStatus(c, MiB, 4 * MiB), [
      { length: MiB, flags: HZ }, { length: 65536, flags: 0 }, { length: MiB - 65536, flags: HZ }, { length: MiB + 4096, flags: 0 }, { length: MiB - 4096, flags: NBD_STATE_ZERO },
    ]);
    assert.deepEqual([...owned.bytes.subarray(2 * MiB, 2 * MiB + data.length)], [...data]);
    assert.equal(await blockStatus(c, 8 * MiB - 512, 1024), NBD_EINVAL, 'beyond the end');
  } finally {
    c.destroy();
  }
});

test('NBD_CMD_BLOCK_STATUS without a selected context, or for another export than the one selected: NBD_EINVAL', async () => {
  const c = await RawClient.connect({ port: (addr as { port: number }).port });
  try {
    await c.handshake();
    await structured(c);
    assert.deepEqual(await metaContexts(c, NBD_OPT_SET_META_CONTEXT, 'owned', ['base:allocation']), [{ id: 1, name: 'base:allocation' }]);
    await go(c, 'shared');
    const h = c.request(NBD_CMD_BLOCK_STATUS, 0, 4096);
    const m = await c.recv();
    assert.ok(m?.kind === 'structuredChunk' && m.handle === h);
    assert.equal(decodeErrorChunk(m.type, m.payload)?.error, NBD_EINVAL);
  } finally {
    c.destroy();
  }
});

test('qemu-img map and nbdinfo --map read it: zeroes and holes where the server zeroed, data where written since', async () => {
  const uri = nbdUri(addr, 'owned');
  await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 7 0 8M', '-c', 'write -z -u 1M 3M', '-c', 'write -P 9 2M 64k', uri]);
  const map = JSON.parse((await runOk('qemu-img', ['map', '--output=json', '-f', 'raw', uri])).stdout) as { start: number; length: number; zero: boolean; data: boolean }[];
  const at = (o: number) => map.find((e) => e.start <= o && o < e.start + e.length)!;
  assert.deepEqual([at(0).zero, at(0).data], [false, true]);
  assert.deepEqual([at(MiB).zero, at(MiB).data], [true, false], JSON.stringify(map));
  assert.deepEqual([at(2 * MiB).zero, at(2 * MiB).data], [false, true], 'written over the hole: data');
  assert.deepEqual([at(2 * MiB + 65536).zero, at(2 * MiB + 65536).data], [true, false]);
  assert.deepEqual([at(4 * MiB).zero, at(4 * MiB).data], [false, true]);
  const m = (await runOk('nbdinfo', ['--map', uri])).stdout;
  assert.match(m, new RegExp(`^\\s*${MiB}\\s+${MiB}\\s+3\\s+hole,zero$`, 'm'), m);
  assert.match(m, new RegExp(`^\\s*${2 * MiB}\\s+65536\\s+0\\s+data$`, 'm'), m);
});
