/**
 * The NBD codec on its own: every message round-trips through serializer and parser however
 * the byte stream is split; payload codecs round-trip; lengths from the wire are capped; a bad
 * magic fails the parser for good; golden bytes for the fixed layouts.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  ClientParser, IHAVEOPT, NBDMAGIC, NBD_CMD_READ, NBD_CMD_WRITE, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE, NBD_INFO_DESCRIPTION, NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_OPT_GO, NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET, NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REP_ACK,
  NBD_REP_ERR_UNSUP, NBD_REP_MAGIC, NbdProtocolError, ServerParser, decodeErrorChunk, decodeInfo, decodeInfoRequest,
  decodeOffsetData, decodeServerEntry, encodeClientFlags, encodeExportNameReply, encodeGreeting, encodeInfo,
  encodeInfoRequest, encodeOffsetDataHeader, encodeOption, encodeOptionReply, encodeRequest, encodeServerEntry,
  encodeSimpleReply, encodeStructuredError, encodeStructuredHeader, encodeStructuredNone, isOptionReplyError,
  isReplyTypeError, type ClientMessage, type InfoReply, type ServerMessage,
} from '../../src/nbd/index.js';

const u16 = fc.integer({ min: 0, max: 0xffff });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
const bytes = (maxLength: number) => fc.uint8Array({ maxLength });
// Names and messages: any string without NUL whose UTF-8 fits the protocol's 4096 bytes.
const nbdString = fc.string({ unit: 'grapheme', maxLength: 40 }).filter((s) => !s.includes('\0'));

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/** `stream` cut at the (sorted, deduplicated) positions `cuts` taken modulo its length. */
function split(stream: Uint8Array, cuts: number[]): Uint8Array[] {
  const at = [...new Set(cuts.map((c) => (stream.length ? c % stream.length : 0)))].sort((a, b) => a - b);
  const out: Uint8Array[] = [];
  let prev = 0;
  for (const c of [...at, stream.length]) {
    if (c > prev) out.push(stream.subarray(prev, c));
    prev = c;
  }
  return out;
}
const cuts = fc.array(fc.nat(), { maxLength: 40 });

/** A client stream: flags, some options, then requests (writes carry data). */
const clientSession = fc.record({
  flags: u32,
  options: fc.array(fc.record({ option: u32, data: bytes(300) }), { maxLength: 6 }),
  requests: fc.array(
    fc.oneof(
      fc.record({ flags: u16, command: fc.constant(NBD_CMD_WRITE), handle: u64, offset: u64, data: bytes(3000) }).map((r) => ({ ...r, length: r.data.length })),
      fc.record({ flags: u16, command: u16.filter((c) => c !== NBD_CMD_WRITE), handle: u64, offset: u64, length: u32 }),
    ),
    { maxLength: 12 },
  ),
});

describe('client → server stream', () => {
  test('flags, options and requests parse back exactly, however TCP splits them', () => {
    fc.assert(
      fc.property(clientSession, cuts, (s, c) => {
        const expected: ClientMessage[] = [
          { kind: 'clientFlags', flags: s.flags },
          ...s.options.map((o) => ({ kind: 'option' as const, option: o.option, data: o.data })),
          ...s.requests.map((r) => ({ kind: 'request' as const, ...r })),
        ];
        const stream = concat([
          encodeClientFlags(s.flags),
          ...s.options.map((o) => encodeOption(o.option, o.data)),
          ...s.requests.map((r) => encodeRequest(r)),
        ]);
        const parser = new ClientParser();
        const got: ClientMessage[] = [];
        let options = 0;
        for (const chunk of split(stream, c)) {
          parser.push(chunk);
          for (let m = parser.next(); m; m = parser.next()) {
            got.push(m);
            if (m.kind === 'option') options++;
            // The server switches phase once the last option is handled.
            if ((m.kind === 'clientFlags' || m.kind === 'option') && options === s.options.length) parser.enterTransmission();
          }
        }
        if (s.options.length === 0 && parser.phase === 'options') parser.enterTransmission();
        assert.equal(parser.buffered, 0);
        assert.deepEqual(got, expected);
      }),
      { numRuns: 500 },
    );
  });

  test('one byte at a time', () => {
    const stream = concat([
      encodeClientFlags(3),
      encodeOption(NBD_OPT_GO, encodeInfoRequest({ name: 'disk', infos: [NBD_INFO_BLOCK_SIZE] })),
      encodeRequest({ flags: 1, command: NBD_CMD_WRITE, handle: 7n, offset: 4096n, length: 5, data: new Uint8Array([1, 2, 3, 4, 5]) }),
      encodeRequest({ flags: 0, command: NBD_CMD_READ, handle: 8n, offset: 4096n, length: 5 }),
    ]);
    const parser = new ClientParser();
    const kinds: string[] = [];
    for (const b of stream) {
      parser.push(new Uint8Array([b]));
      for (let m = parser.next(); m; m = parser.next()) {
        kinds.push(m.kind);
        if (m.kind === 'option') parser.enterTransmission();
      }
    }
    assert.deepEqual(kinds, ['clientFlags', 'option', 'request', 'request']);
  });

  test('an option longer than the cap fails as soon as its header is in, without waiting for the data', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1025, max: 0xffffffff }), (len) => {
        const parser = new ClientParser({ maxOptionLength: 1024 });
        const header = new Uint8Array(16);
        const v = new DataView(header.buffer);
        v.setBigUint64(0, IHAVEOPT);
        v.setUint32(8, NBD_OPT_GO);
        v.setUint32(12, len);
        parser.push(encodeClientFlags(1));
        parser.push(header);
        assert.equal(parser.next()?.kind, 'clientFlags');
        assert.throws(() => parser.next(), NbdProtocolError);
        // Failed for good: more bytes change nothing.
        parser.push(new Uint8Array(100));
        assert.throws(() => parser.next(), NbdProtocolError);
      }),
      { numRuns: 100 },
    );
  });

  test('a write longer than the cap fails on its header; a long read is only a request', () => {
    const parser = new ClientParser({ maxPayload: 1 << 20 });
    parser.push(encodeClientFlags(1));
    parser.next();
    parser.enterTransmission();
    parser.push(encodeRequest({ flags: 0, command: NBD_CMD_READ, handle: 1n, offset: 0n, length: 0xffffffff }));
    assert.equal((parser.next() as { length: number }).length, 0xffffffff);
    parser.push(encodeRequest({ flags: 0, command: NBD_CMD_WRITE, handle: 2n, offset: 0n, length: (1 << 20) + 1 }));
    assert.throws(() => parser.next(), /exceeds/);
  });

  test('bad magics fail the parser', () => {
    const opt = new ClientParser();
    opt.push(encodeClientFlags(1));
    opt.next();
    opt.push(new Uint8Array(16).fill(0x41));
    assert.throws(() => opt.next(), /bad option magic/);

    fc.assert(
      fc.property(u32.filter((m) => m !== 0x25609513), (magic) => {
        const p = new ClientParser();
        p.push(encodeClientFlags(1));
        p.next();
        p.enterTransmission();
        const req = encodeRequest({ flags: 0, command: NBD_CMD_READ, handle: 1n, offset: 0n, length: 512 });
        new DataView(req.buffer).setUint32(0, magic);
        p.push(req);
        assert.throws(() => p.next(), NbdProtocolError);
      }),
      { numRuns: 200 },
    );
  });
});

/** A server stream: greeting, option replies, then transmission-phase replies. */
const serverSession = fc.record({
  handshakeFlags: u16,
  replies: fc.array(fc.record({ option: u32, replyType: u32, data: bytes(200) }), { maxLength: 6 }),
  exportName: fc.option(fc.record({ size: u64, transmissionFlags: u16, noZeroes: fc.boolean() }), { nil: undefined }),
  transmission: fc.array(
    fc.oneof(
      fc.record({ kind: fc.constant('simpleReply' as const), error: u32, handle: u64 }),
      fc.record({ kind: fc.constant('readReply' as const), handle: u64, data: bytes(2000).filter((d) => d.length > 0) }),
      fc.record({ kind: fc.constant('structuredChunk' as const), flags: u16, type: u16, handle: u64, payload: bytes(500) }),
    ),
    { maxLength: 10 },
  ),
});

describe('server → client stream', () => {
  test('greeting, option replies, export-name reply and replies parse back exactly, however split', () => {
    fc.assert(
      fc.property(serverSession, cuts, (s, c) => {
        // Read handles must be unique among reads for the simple-reply parser to know lengths.
        const reads = new Map<bigint, number>();
        const transmission = s.transmission.filter((t) => {
          if (t.kind !== 'simpleReply' && t.kind !== 'readReply') return true;
          if (reads.has(t.handle)) return false;
          if (t.kind === 'readReply') reads.set(t.handle, t.data.length);
          else reads.set(t.handle, 0);
          return true;
        });
        const parts: Uint8Array[] = [encodeGreeting(s.handshakeFlags), ...s.replies.map((r) => encodeOptionReply(r.option, r.replyType, r.data))];
        const expected: ServerMessage[] = [
          { kind: 'greeting', handshakeFlags: s.handshakeFlags },
          ...s.replies.map((r) => ({ kind: 'optionReply' as const, ...r })),
        ];
        if (s.exportName) {
          parts.push(encodeExportNameReply(s.exportName.size, s.exportName.transmissionFlags, s.exportName.noZeroes));
          expected.push({ kind: 'exportNameReply', size: s.exportName.size, transmissionFlags: s.exportName.transmissionFlags });
        }
        for (const t of transmission) {
          if (t.kind === 'simpleReply') {
            parts.push(encodeSimpleReply(t.error, t.handle));
            expected.push({ kind: 'simpleReply', error: t.error, handle: t.handle });
          } else if (t.kind === 'readReply') {
            parts.push(encodeSimpleReply(0, t.handle), t.data);
            expected.push({ kind: 'simpleReply', error: 0, handle: t.handle, data: t.data });
          } else {
            parts.push(encodeStructuredHeader(t.flags, t.type, t.handle, t.payload.length), t.payload);
            expected.push({ kind: 'structuredChunk', flags: t.flags, type: t.type, handle: t.handle, payload: t.payload });
          }
        }
        const parser = new ServerParser({ readDataLength: (h) => reads.get(h) });
        const got: ServerMessage[] = [];
        let optionReplies = 0;
        const advance = () => {
          if (optionReplies !== s.replies.length || parser.phase !== 'options') return;
          if (s.exportName) parser.expectExportNameReply(s.exportName.noZeroes);
          else parser.enterTransmission();
        };
        for (const chunk of split(concat(parts), c)) {
          parser.push(chunk);
          for (;;) {
            advance();
            const m = parser.next();
            if (!m) break;
            got.push(m);
            if (m.kind === 'optionReply') optionReplies++;
          }
        }
        assert.deepEqual(got, expected);
      }),
      { numRuns: 500 },
    );
  });

  test('a bad reply magic fails the client-side parser', () => {
    const p = new ServerParser();
    p.push(encodeGreeting(3));
    p.next();
    p.enterTransmission();
    p.push(new Uint8Array(16).fill(0x55));
    assert.throws(() => p.next(), /bad reply magic/);
  });

  test('the client-side parser caps announced lengths', () => {
    const p = new ServerParser({ maxPayload: 1000 });
    p.push(encodeGreeting(3));
    p.next();
    p.enterTransmission();
    p.push(encodeStructuredHeader(0, NBD_REPLY_TYPE_OFFSET_DATA, 1n, 1001));
    assert.throws(() => p.next(), NbdProtocolError);
  });
});

describe('payload codecs', () => {
  test('NBD_OPT_INFO / NBD_OPT_GO data round-trips; inconsistent lengths are rejected', () => {
    fc.assert(
      fc.property(nbdString, fc.array(u16, { maxLength: 10 }), fc.nat(), (name, infos, cut) => {
        const data = encodeInfoRequest({ name, infos });
        assert.deepEqual(decodeInfoRequest(data), { name, infos });
        const shorter = data.subarray(0, cut % data.length);
        assert.equal(decodeInfoRequest(shorter), undefined);
        assert.equal(decodeInfoRequest(concat([data, new Uint8Array([0])])), undefined);
      }),
    );
  });

  test('NBD_REP_INFO payloads round-trip', () => {
    const info: fc.Arbitrary<InfoReply> = fc.oneof(
      fc.record({ info: fc.constant(NBD_INFO_EXPORT), size: u64, transmissionFlags: u16 }),
      fc.record({ info: fc.constant(NBD_INFO_NAME), name: nbdString }),
      fc.record({ info: fc.constant(NBD_INFO_DESCRIPTION), description: nbdString }),
      fc.record({ info: fc.constant(NBD_INFO_BLOCK_SIZE), minimum: u32, preferred: u32, maximum: u32 }),
      fc.record({ info: fc.integer({ min: 4, max: 0xffff }), unknown: bytes(20) }),
    );
    fc.assert(fc.property(info, (i) => assert.deepEqual(decodeInfo(encodeInfo(i)), { ...i })));
    assert.equal(decodeInfo(new Uint8Array([0, 0, 1])), undefined, 'NBD_INFO_EXPORT must be 12 bytes');
  });

  test('NBD_REP_SERVER entries round-trip', () => {
    fc.assert(fc.property(nbdString, nbdString, (name, description) => {
      assert.deepEqual(decodeServerEntry(encodeServerEntry({ name, description })), { name, description });
    }));
  });

  test('structured chunks: errors with and without offset, offset data, none', () => {
    fc.assert(
      fc.property(u64, fc.integer({ min: 1, max: 0xffffffff }), nbdString, fc.option(u64, { nil: undefined }), (handle, error, message, offset) => {
        const chunk = encodeStructuredError(handle, offset === undefined ? { error, message } : { error, message, offset });
        const p = new ServerParser();
        p.push(encodeGreeting(0));
        p.next();
        p.enterTransmission();
        p.push(chunk);
        const m = p.next();
        assert.ok(m?.kind === 'structuredChunk');
        assert.equal(m.flags, NBD_REPLY_FLAG_DONE);
        assert.equal(m.type, offset === undefined ? NBD_REPLY_TYPE_ERROR : NBD_REPLY_TYPE_ERROR_OFFSET);
        assert.ok(isReplyTypeError(m.type));
        assert.deepEqual(decodeErrorChunk(m.type, m.payload), offset === undefined ? { error, message } : { error, message, offset });
      }),
    );
    fc.assert(
      fc.property(u64, u64, bytes(100).filter((d) => d.length > 0), (handle, offset, data) => {
        const stream = concat([encodeOffsetDataHeader(NBD_REPLY_FLAG_DONE, handle, offset, data.length), data, encodeStructuredNone(handle)]);
        const p = new ServerParser();
        p.push(encodeGreeting(0));
        p.next();
        p.enterTransmission();
        p.push(stream);
        const d = p.next();
        assert.ok(d?.kind === 'structuredChunk' && d.type === NBD_REPLY_TYPE_OFFSET_DATA && d.handle === handle);
        assert.deepEqual(decodeOffsetData(d.payload), { offset, data });
        const n = p.next();
        assert.ok(n?.kind === 'structuredChunk' && n.type === NBD_REPLY_TYPE_NONE && n.flags === NBD_REPLY_FLAG_DONE && n.payload.length === 0);
      }),
    );
  });
});

describe('golden bytes', () => {
  const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

  test('greeting: NBDMAGIC, IHAVEOPT, flags', () => {
    assert.equal(hex(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)), '4e42444d41474943' + '49484156454f5054' + '0003');
    assert.equal(NBDMAGIC, BigInt('0x' + Buffer.from('NBDMAGIC').toString('hex')));
    assert.equal(IHAVEOPT, BigInt('0x' + Buffer.from('IHAVEOPT').toString('hex')));
  });

  test('option reply: magic 0x3e889045565a9, option, type, length, data', () => {
    assert.equal(hex(encodeOptionReply(NBD_OPT_GO, NBD_REP_ACK)), '0003e889045565a9' + '00000007' + '00000001' + '00000000');
    assert.equal(NBD_REP_MAGIC, 0x3e889045565a9n);
    assert.ok(isOptionReplyError(NBD_REP_ERR_UNSUP) && !isOptionReplyError(NBD_REP_ACK));
    assert.equal(NBD_REP_ERR_UNSUP, 2 ** 31 + 1);
  });

  test('export-name reply: 10 bytes, plus 124 zeroes unless NO_ZEROES', () => {
    assert.equal(hex(encodeExportNameReply(1n << 30n, 0x0143, true)), '0000000040000000' + '0143');
    const full = encodeExportNameReply(1n << 30n, 0x0143, false);
    assert.equal(full.length, 134);
    assert.ok(full.subarray(10).every((b) => b === 0));
  });

  test('request: magic 0x25609513, flags, type, handle, offset, length', () => {
    const r = encodeRequest({ flags: 1, command: NBD_CMD_WRITE, handle: 0x0102030405060708n, offset: 0x200n, length: 2, data: new Uint8Array([0xaa, 0xbb]) });
    assert.equal(hex(r), '25609513' + '0001' + '0001' + '0102030405060708' + '0000000000000200' + '00000002' + 'aabb');
  });

  test('replies: simple 0x67446698, structured 0x668e33ef', () => {
    assert.equal(hex(encodeSimpleReply(22, 9n)), '67446698' + '00000016' + '0000000000000009');
    assert.equal(hex(encodeStructuredNone(9n)), '668e33ef' + '0001' + '0000' + '0000000000000009' + '00000000');
    assert.equal(hex(encodeStructuredError(9n, { error: 5, message: 'x' })), '668e33ef' + '0001' + '8001' + '0000000000000009' + '00000007' + '00000005' + '0001' + '78');
  });
});
