/**
 * The negotiation records (abi/negotiation.ts): what one end writes, the other reads back the
 * same; arbitrary node values (a hostile other end) give a result, never a throw; the indirect
 * rule and the limits hold.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  BLKIF_MAX_INDIRECT_SEGMENTS,
  BLKIF_MAX_SEGMENTS_PER_REQUEST,
  MAX_QUEUES,
  MAX_RING_PAGE_ORDER,
  X86_32_ABI,
  X86_64_ABI,
  XEN_IO_PROTO_ABI_X86_32,
  backendOfferNodes,
  diskNodes,
  frontendRingNodes,
  indirectOfferError,
  negotiatedIndirectSegments,
  readBackendOffer,
  readDiskProperties,
  readFrontendRings,
  type XsNodes,
} from '../../src/abi/index.js';

/** Applies written nodes as xenstore would: a removal takes the node and everything under it. */
function store(nodes: XsNodes, into = new Map<string, string>()): Map<string, string> {
  for (const [key, value] of nodes) {
    if (value === undefined) {
      for (const k of [...into.keys()]) if (k === key || k.startsWith(`${key}/`)) into.delete(k);
    } else {
      into.set(key, value);
    }
  }
  return into;
}

/** Records as the readers build them (fast-check's default has no prototype). */
const plain = { noNullPrototype: true } as const;
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const indirect = fc.oneof(fc.constant(0), fc.integer({ min: BLKIF_MAX_SEGMENTS_PER_REQUEST + 1, max: BLKIF_MAX_INDIRECT_SEGMENTS }));
const offer = fc.record({
  maxIndirectSegments: indirect,
  maxRingPageOrder: fc.integer({ min: 0, max: MAX_RING_PAGE_ORDER }),
  maxQueues: fc.integer({ min: 1, max: MAX_QUEUES }),
  persistent: fc.boolean(),
}, plain);
const rings = fc.integer({ min: 0, max: MAX_RING_PAGE_ORDER }).chain((order) => fc.record({
  abi: fc.constantFrom(X86_64_ABI, X86_32_ABI),
  order: fc.constant(order),
  queues: fc.array(fc.record({ refs: fc.array(u32, { minLength: 1 << order, maxLength: 1 << order }), port: u32 }, plain), { minLength: 1, maxLength: 8 }),
  persistent: fc.boolean(),
}, plain));
const wide = { maxQueues: MAX_QUEUES, maxRingPageOrder: MAX_RING_PAGE_ORDER, defaultProtocol: XEN_IO_PROTO_ABI_X86_32 };
const disk = fc.record({
  sectors: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
  sectorSize: fc.constantFrom(512, 1024, 2048, 4096),
  readOnly: fc.boolean(),
  cdrom: fc.boolean(),
  removable: fc.boolean(),
  flush: fc.boolean(),
  barrier: fc.boolean(),
  discard: fc.boolean(),
  discardSecure: fc.boolean(),
  discardAlignment: fc.nat(),
  physicalFactor: fc.constantFrom(1, 2, 8),
  discardGranularity: fc.integer({ min: 1, max: 1 << 30 }),
}).map(({ physicalFactor, ...d }) => ({ ...d, physicalSectorSize: d.sectorSize * physicalFactor }));

/** A hostile end's nodes: any of the record's keys, with any text (digits, junk, huge numbers). */
const junkText = fc.oneof(fc.string(), fc.nat().map(String), fc.bigInt({ min: 0n, max: 1n << 80n }).map(String), fc.constantFrom('', ' 1', '-1', '0x10', '1e3'));
const junkNodes = (keys: readonly string[]) => fc.dictionary(fc.constantFrom(...keys), junkText);
const ringKeys = ['protocol', 'multi-queue-num-queues', 'ring-page-order', 'ring-ref', 'event-channel', 'feature-persistent',
  'ring-ref0', 'ring-ref1', 'queue-0/ring-ref', 'queue-0/event-channel', 'queue-1/ring-ref', 'queue-1/event-channel', 'queue-0/ring-ref0', 'queue-0/ring-ref1'];
const backendKeys = ['feature-max-indirect-segments', 'max-ring-page-order', 'multi-queue-max-queues', 'feature-persistent', 'sectors', 'sector-size',
  'physical-sector-size', 'info', 'feature-flush-cache', 'feature-barrier', 'feature-discard', 'discard-granularity', 'discard-alignment', 'discard-secure'];

test('the backend offer round-trips', () => {
  fc.assert(fc.property(offer, (o) => {
    const nodes = store(backendOfferNodes(o));
    assert.deepEqual(readBackendOffer((k) => nodes.get(k)), { ok: true, value: o });
    assert.equal(nodes.has('feature-max-indirect-segments'), o.maxIndirectSegments > 0, 'no indirect: no node');
  }), { numRuns: 500 });
});

test('the frontend rings round-trip, over whatever an earlier connection left', () => {
  fc.assert(fc.property(rings, rings, (earlier, r) => {
    const nodes = store(frontendRingNodes(r), store(frontendRingNodes(earlier)));
    assert.deepEqual(readFrontendRings((k) => nodes.get(k), wide), { ok: true, value: r });
    if (r.queues.length === 1) assert.ok(![...nodes.keys()].some((k) => k.startsWith('queue-')), 'one queue: top-level nodes only');
    if (r.order === 0) assert.ok(!nodes.has('ring-page-order') && !nodes.has('ring-ref0'), 'one page: ring-ref alone');
  }), { numRuns: 500 });
});

test('the disk round-trips', () => {
  fc.assert(fc.property(disk, (d) => {
    const nodes = store(diskNodes(d));
    const want = d.discard ? { ...d, discardSecure: d.discardSecure } : { ...d, discardSecure: false, discardGranularity: d.sectorSize, discardAlignment: 0 };
    assert.deepEqual(readDiskProperties((k) => nodes.get(k)), { ok: true, value: want });
  }), { numRuns: 500 });
});

test('a backend reading junk ring nodes gets a result within its limits, never a throw', () => {
  fc.assert(fc.property(junkNodes(ringKeys), fc.integer({ min: 1, max: 8 }), fc.integer({ min: 0, max: MAX_RING_PAGE_ORDER }), (junk, maxQueues, maxRingPageOrder) => {
    const r = readFrontendRings((k) => junk[k], { maxQueues, maxRingPageOrder, defaultProtocol: XEN_IO_PROTO_ABI_X86_32 });
    if (!r.ok) return assert.ok(r.error.length > 0);
    assert.ok(r.value.queues.length >= 1 && r.value.queues.length <= maxQueues);
    assert.ok(r.value.order <= maxRingPageOrder);
    for (const q of r.value.queues) {
      assert.equal(q.refs.length, 1 << r.value.order);
      for (const n of [...q.refs, q.port]) assert.ok(Number.isInteger(n) && n >= 0 && n <= 0xffffffff);
    }
  }), { numRuns: 3000 });
});

test('a frontend reading junk backend nodes gets usable values or a result error, never a throw', () => {
  fc.assert(fc.property(junkNodes(backendKeys), (junk) => {
    const get = (k: string) => junk[k];
    const o = readBackendOffer(get);
    assert.ok(o.ok, 'every offer value has a default');
    const v = o.value;
    assert.ok(v.maxIndirectSegments === 0 || indirectOfferError(v.maxIndirectSegments) === undefined);
    assert.ok(v.maxRingPageOrder >= 0 && v.maxRingPageOrder <= MAX_RING_PAGE_ORDER);
    assert.ok(v.maxQueues >= 1 && v.maxQueues <= MAX_QUEUES);
    const d = readDiskProperties(get);
    if (!d.ok) return assert.ok(d.error.length > 0);
    assert.ok([512, 1024, 2048, 4096].includes(d.value.sectorSize));
    assert.ok(d.value.physicalSectorSize % d.value.sectorSize === 0);
    assert.ok(Number.isSafeInteger(d.value.sectors) && d.value.discardGranularity > 0);
  }), { numRuns: 3000 });
});

test('a backend refuses more queues or a larger order than it offered, and an unknown protocol', () => {
  const good = store(frontendRingNodes({ abi: X86_64_ABI, order: 2, queues: [{ refs: [1, 2, 3, 4], port: 5 }, { refs: [6, 7, 8, 9], port: 10 }], persistent: true }));
  const read = (nodes: Map<string, string>, limits = wide) => readFrontendRings((k) => nodes.get(k), limits);
  assert.equal(read(good).ok, true);
  assert.match(String((read(good, { ...wide, maxQueues: 1 }) as { error: string }).error), /multi-queue-num-queues "2" \(offered 1\.\.1\)/);
  assert.match(String((read(good, { ...wide, maxRingPageOrder: 1 }) as { error: string }).error), /ring-page-order "2" \(max 1\)/);
  assert.match(String((read(new Map([...good, ['protocol', 'arm-abi']])) as { error: string }).error), /protocol "arm-abi"/);
  const noRef = new Map(good);
  noRef.delete('queue-1/ring-ref3');
  assert.match(String((read(noRef) as { error: string }).error), /queue-1\/ring-ref3 missing/);
  // Without a `protocol` node the backend's default ABI applies (blkif.h: x86_32 on x86).
  const bare = new Map(good);
  bare.delete('protocol');
  assert.equal((read(bare) as { value: { abi: unknown } }).value.abi, X86_32_ABI);
});

test('the indirect rule: 11 segments or fewer means none, in the offer and in what a frontend uses', () => {
  for (let n = 1; n <= BLKIF_MAX_SEGMENTS_PER_REQUEST; n++) {
    assert.notEqual(indirectOfferError(n), undefined, `offer ${n}`);
    assert.equal(negotiatedIndirectSegments(n, BLKIF_MAX_INDIRECT_SEGMENTS), 0);
    assert.equal(negotiatedIndirectSegments(BLKIF_MAX_INDIRECT_SEGMENTS, n), 0);
  }
  assert.equal(indirectOfferError(0), undefined);
  assert.equal(indirectOfferError(BLKIF_MAX_SEGMENTS_PER_REQUEST + 1), undefined);
  assert.equal(indirectOfferError(BLKIF_MAX_INDIRECT_SEGMENTS), undefined);
  assert.notEqual(indirectOfferError(BLKIF_MAX_INDIRECT_SEGMENTS + 1), undefined);
  assert.notEqual(indirectOfferError(32.5), undefined);
  fc.assert(fc.property(fc.nat(100_000), fc.nat(100_000), (offered, ours) => {
    const n = negotiatedIndirectSegments(offered, ours);
    assert.ok(n === 0 || (n > BLKIF_MAX_SEGMENTS_PER_REQUEST && n <= Math.min(offered, ours, BLKIF_MAX_INDIRECT_SEGMENTS)));
    if (Math.min(offered, ours) > BLKIF_MAX_SEGMENTS_PER_REQUEST) assert.equal(n, Math.min(offered, ours, BLKIF_MAX_INDIRECT_SEGMENTS));
  }));
  // A backend offering 11 over xenstore reads as no indirect at all.
  const nodes = store([['feature-max-indirect-segments', '11']]);
  assert.equal((readBackendOffer((k) => nodes.get(k)) as { value: { maxIndirectSegments: number } }).value.maxIndirectSegments, 0);
});
