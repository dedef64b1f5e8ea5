/**
 * One side of a two-thread ring exchange (see ring-exchange.ts): the frontend produces requests
 * and checks every response; the backend copies each request out, decodes it and answers it.
 * Kicks are an Int32 counter per direction with Atomics.notify/Atomics.wait, sent only when the
 * peer's event index asks for one (ring.h notification suppression).
 */
import { parentPort, workerData } from 'node:worker_threads';
import {
  BLKIF_OP_INDIRECT,
  BLKIF_OP_READ,
  BLKIF_OP_WRITE,
  BLKIF_RSP_OKAY,
  abiByName,
  decodeRequest,
  decodeResponse,
  encodeRequest,
  encodeResponse,
  responseOperation,
  type BlkifAbi,
  type BlkifRequest,
} from '../abi/index.js';
import { BackRing, FrontRing, RING_CONSUMED, RING_PEER_OVERFLOW, RingEntry, SharedRing } from '../ring/index.js';

export interface ExchangeWorkerData {
  role: 'front' | 'back';
  pages: Uint8Array[];
  protocol: string;
  entries: number;
  /** kicks[0]: frontend -> backend, kicks[1]: backend -> frontend. */
  kicks: Int32Array;
}

export interface ExchangeWorkerResult {
  role: 'front' | 'back';
  entries: number;
  notifiesSent: number;
  sleeps: number;
  errors: string[];
  elapsedMs: number;
}

const d = workerData as ExchangeWorkerData;
const found = abiByName(d.protocol);
if (found === undefined) throw new Error(`unknown ABI ${d.protocol}`);
const abi: BlkifAbi = found;
const ring = new SharedRing(d.pages, abi.entrySize);
const entry = new RingEntry(abi.entrySize);
const TO_BACK = 0;
const TO_FRONT = 1;
let notifiesSent = 0;
let sleeps = 0;
const errors: string[] = [];

function kick(word: number): void {
  notifiesSent++;
  Atomics.add(d.kicks, word, 1);
  Atomics.notify(d.kicks, word);
}

/** A request for sequence number `n`: mostly plain reads/writes of 1..11 segments, every 8th indirect. */
function requestFor(n: number): BlkifRequest {
  const id = BigInt(n) * 0x100000001n; // exercises both halves of the 64-bit id
  if (n % 8 === 7) {
    return { operation: BLKIF_OP_INDIRECT, indirect_op: BLKIF_OP_READ, nr_segments: 1 + (n % 4096), id, sector_number: BigInt(n), handle: 0x300, indirect_grefs: [n & 0xffff] };
  }
  const nr = 1 + (n % 11);
  const seg = [];
  for (let i = 0; i < nr; i++) seg.push({ gref: n + i, first_sect: 0, last_sect: 7 });
  return { operation: n % 2 === 0 ? BLKIF_OP_READ : BLKIF_OP_WRITE, nr_segments: nr, handle: 0x300, id, sector_number: BigInt(n) * 8n, seg };
}

function runFront(): void {
  const front = new FrontRing(ring); // the main thread ran SHARED_RING_INIT
  let sent = 0;
  let received = 0;
  while (received < d.entries) {
    let produced = false;
    while (sent < d.entries && !front.full()) {
      encodeRequest(entry.view, 0, abi, requestFor(sent));
      front.produceRequest(entry);
      sent++;
      produced = true;
    }
    if (produced && front.pushRequestsAndCheckNotify()) kick(TO_BACK);
    let got = false;
    for (;;) {
      const r = front.consumeResponse(entry);
      if (r === RING_PEER_OVERFLOW) throw new Error('backend overflowed rsp_prod');
      if (r !== RING_CONSUMED) break;
      const rsp = decodeResponse(entry.view, 0, abi);
      const want = requestFor(received);
      if (rsp.id !== want.id || rsp.status !== BLKIF_RSP_OKAY || rsp.operation !== responseOperation(want)) {
        if (errors.length < 10) errors.push(`response ${received}: id ${rsp.id} op ${rsp.operation} status ${rsp.status}`);
      }
      received++;
      got = true;
    }
    if (got || (sent < d.entries && !front.full())) continue;
    const seen = Atomics.load(d.kicks, TO_FRONT);
    if (front.finalCheckForResponses() === 0) {
      sleeps++;
      Atomics.wait(d.kicks, TO_FRONT, seen);
    }
  }
}

function runBack(): void {
  const back = new BackRing(ring);
  const out = new RingEntry(abi.entrySize);
  let answered = 0;
  while (answered < d.entries) {
    const r = back.consumeRequest(entry);
    if (r === RING_PEER_OVERFLOW) throw new Error('frontend overflowed req_prod');
    if (r === RING_CONSUMED) {
      const req = decodeRequest(entry.view, 0, abi);
      if (req.ok) encodeResponse(out.view, 0, abi, { id: req.request.id, operation: responseOperation(req.request), status: BLKIF_RSP_OKAY });
      else encodeResponse(out.view, 0, abi, { id: req.id, operation: req.operation, status: -1 });
      back.produceResponse(out);
      answered++;
      continue;
    }
    if (back.pushResponsesAndCheckNotify()) kick(TO_FRONT);
    const seen = Atomics.load(d.kicks, TO_BACK);
    if (back.finalCheckForRequests() === 0 && answered < d.entries) {
      sleeps++;
      Atomics.wait(d.kicks, TO_BACK, seen);
    }
  }
  if (back.pushResponsesAndCheckNotify()) kick(TO_FRONT);
}

const start = performance.now();
if (d.role === 'front') runFront();
else runBack();
const result: ExchangeWorkerResult = { role: d.role, entries: d.entries, notifiesSent, sleeps, errors, elapsedMs: performance.now() - start };
parentPort!.postMessage(result);
