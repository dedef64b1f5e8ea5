/**
 * The floor the later layers stand on: blkif entries encoded, decoded, produced and consumed per
 * second on one thread, and round trips per second between two threads sharing one ring.
 */
import {
  BLKIF_OP_INDIRECT,
  BLKIF_OP_READ,
  BLKIF_RSP_OKAY,
  X86_32_ABI,
  X86_64_ABI,
  decodeRequest,
  decodeResponse,
  encodeRequest,
  encodeResponse,
  type BlkifRequest,
} from '../src/abi/index.js';
import { BackRing, FrontRing, RING_CONSUMED, RingEntry, SharedRing } from '../src/ring/index.js';
import { runRingExchange } from '../src/cli/ring-exchange.js';
import { opsPerSecond, type Figure } from './measure.js';

export async function benchRing(quick = false): Promise<Figure[]> {
  const out: Figure[] = [];
  const ms = quick ? 30 : 300;
  for (const abi of [X86_64_ABI, X86_32_ABI]) {
    const e = new RingEntry(abi.entrySize);
    const rw: BlkifRequest = {
      operation: BLKIF_OP_READ, nr_segments: 11, handle: 0x300, id: 123456789n, sector_number: 4096n,
      seg: Array.from({ length: 11 }, (_, i) => ({ gref: 1000 + i, first_sect: 0, last_sect: 7 })),
    };
    const ind: BlkifRequest = { operation: BLKIF_OP_INDIRECT, indirect_op: BLKIF_OP_READ, nr_segments: 256, id: 1n, sector_number: 0n, handle: 0x300, indirect_grefs: [77] };
    for (const [label, req] of [['11-segment request', rw], ['indirect request', ind]] as const) {
      out.push({ name: `${abi.protocol} encode ${label}`, value: opsPerSecond((n) => { for (let i = 0; i < n; i++) encodeRequest(e.view, 0, abi, req); }, ms), unit: 'entries/s' });
      encodeRequest(e.view, 0, abi, req);
      out.push({ name: `${abi.protocol} decode ${label}`, value: opsPerSecond((n) => { for (let i = 0; i < n; i++) decodeRequest(e.view, 0, abi); }, ms), unit: 'entries/s' });
    }
    const rsp = { id: 5n, operation: 0, status: BLKIF_RSP_OKAY };
    out.push({ name: `${abi.protocol} encode+decode response`, value: opsPerSecond((n) => { for (let i = 0; i < n; i++) { encodeResponse(e.view, 0, abi, rsp); decodeResponse(e.view, 0, abi); } }, ms), unit: 'entries/s' });

    // Produce and consume through the shared ring on one thread (copy in, publish, copy out).
    const s = SharedRing.allocate(0, abi.entrySize);
    const front = FrontRing.init(s);
    const back = new BackRing(s);
    encodeRequest(e.view, 0, abi, rw);
    out.push({
      name: `${abi.protocol} ring produce+push+consume (batches of 32)`,
      value: opsPerSecond((n) => {
        for (let i = 0; i < n; i += 32) {
          for (let k = 0; k < 32; k++) front.produceRequest(e);
          front.pushRequests();
          for (let k = 0; k < 32; k++) if (back.consumeRequest(e) !== RING_CONSUMED) throw new Error('ring lost an entry');
          for (let k = 0; k < 32; k++) back.produceResponse(e);
          back.pushResponses();
          for (let k = 0; k < 32; k++) front.consumeResponse(e);
        }
      }, ms),
      unit: 'entries/s',
    });
  }
  const x = await runRingExchange({ entries: quick ? 100_000 : 1_000_000, protocol: 'x86_64-abi', order: 0 });
  out.push({ name: 'two threads, one ring: request/response round trips', value: (x.entries / x.elapsedMs) * 1000, unit: 'round trips/s' });
  out.push({ name: 'two threads: frontend notifications per request', value: x.front.notifiesSent / x.entries, unit: 'kicks/request' });
  out.push({ name: 'two threads: backend notifications per response', value: x.back.notifiesSent / x.entries, unit: 'kicks/response' });
  return out;
}
