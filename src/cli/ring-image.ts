/**
 * Ring page images: the bytes of a blkif shared ring (one page, or 2^order pages in `ring-ref`
 * order) to and from JSON. Requests shown are the slots of indexes `rsp_prod <= i < req_prod`
 * (published, not yet answered); responses the slots `rsp_prod - n <= i < rsp_prod` with
 * `n = min(rsp_prod, ring_size - (req_prod - rsp_prod))` (answered, not yet overwritten).
 */
import {
  BlkifJsonError,
  asObject,
  decodeRequest,
  decodeResponse,
  encodeRequest,
  encodeRequestOther,
  encodeResponse,
  requestFromJson,
  requestToJson,
  responseFromJson,
  responseToJson,
  uint,
  type BlkifAbi,
  type JsonObject,
} from '../abi/index.js';
import { RingEntry, SharedRing, XEN_PAGE_SIZE, splitPages } from '../ring/index.js';

export interface RingImage {
  req_prod: number;
  req_event: number;
  rsp_prod: number;
  rsp_event: number;
  ring_size: number;
  requests: JsonObject[];
  responses: JsonObject[];
  /** Present when the indexes are impossible (a hostile or torn ring): what was clipped and why. */
  warnings?: string[];
}

export function ringImageBytes(order: number): number {
  return XEN_PAGE_SIZE << order;
}

/** Decodes a ring image. `bytes` must hold at least `4096 << order` bytes (the caller checks). */
export function decodeRingImage(bytes: Uint8Array, abi: BlkifAbi, order: number): RingImage {
  // Copy into an aligned private buffer: file contents may sit at any offset.
  const copy = new Uint8Array(ringImageBytes(order));
  copy.set(bytes.subarray(0, copy.byteLength));
  const ring = new SharedRing(splitPages(copy, 1 << order), abi.entrySize);
  const entry = new RingEntry(abi.entrySize);
  const img: RingImage = {
    req_prod: ring.reqProd,
    req_event: ring.reqEvent,
    rsp_prod: ring.rspProd,
    rsp_event: ring.rspEvent,
    ring_size: ring.size,
    requests: [],
    responses: [],
  };
  const warnings: string[] = [];
  let outstanding = (img.req_prod - img.rsp_prod) >>> 0;
  if (outstanding > ring.size) {
    warnings.push(`req_prod - rsp_prod = ${outstanding} exceeds the ring size ${ring.size} (RING_REQUEST_PROD_OVERFLOW); showing ${ring.size}`);
    outstanding = ring.size;
  }
  for (let k = 0; k < outstanding; k++) {
    const index = (img.rsp_prod + k) >>> 0;
    ring.copyOut(index, entry);
    const r = decodeRequest(entry.view, 0, abi);
    img.requests.push(
      r.ok
        ? { index, ...requestToJson(r.request) }
        : { index, operation: r.operation, id: r.id.toString(), error: r.problem, message: r.message },
    );
  }
  const n = Math.min(img.rsp_prod, ring.size - outstanding);
  for (let k = n; k > 0; k--) {
    const index = (img.rsp_prod - k) >>> 0;
    ring.copyOut(index, entry);
    img.responses.push({ index, ...responseToJson(decodeResponse(entry.view, 0, abi)) });
  }
  if (warnings.length > 0) img.warnings = warnings;
  return img;
}

/** Builds a ring image from its JSON form. Throws `BlkifJsonError` naming the bad field. */
export function encodeRingImage(spec: unknown, abi: BlkifAbi, order: number): Uint8Array {
  const o = asObject(spec, 'spec');
  const bytes = new Uint8Array(ringImageBytes(order));
  const ring = new SharedRing(splitPages(bytes, 1 << order), abi.entrySize);
  if (o['ring_size'] !== undefined && o['ring_size'] !== ring.size) {
    throw new BlkifJsonError(`spec.ring_size: ${JSON.stringify(o['ring_size'])} does not match order ${order} (${ring.size} entries for ${abi.protocol})`);
  }
  ring.init();
  const u32 = (key: string, dflt: number): number => (o[key] === undefined ? dflt : uint(o, key, 'spec', 0xffffffff));
  ring.reqProd = u32('req_prod', 0);
  ring.reqEvent = u32('req_event', 1);
  ring.rspProd = u32('rsp_prod', 0);
  ring.rspEvent = u32('rsp_event', 1);
  const entry = new RingEntry(abi.entrySize);
  const list = (key: string): unknown[] => {
    const v = o[key] ?? [];
    if (!Array.isArray(v)) throw new BlkifJsonError(`spec.${key}: an array is required`);
    return v;
  };
  const indexOf = (e: unknown, where: string): number => uint(asObject(e, where), 'index', where, 0xffffffff);
  list('responses').forEach((e, i) => {
    const where = `spec.responses[${i}]`;
    entry.bytes.fill(0);
    encodeResponse(entry.view, 0, abi, responseFromJson(e, where));
    ring.copyIn(indexOf(e, where), entry);
  });
  list('requests').forEach((e, i) => {
    const where = `spec.requests[${i}]`;
    entry.bytes.fill(0);
    const p = requestFromJson(e, where);
    if (p.known) encodeRequest(entry.view, 0, abi, p.request);
    else encodeRequestOther(entry.view, 0, abi, p.operation, p.id);
    ring.copyIn(indexOf(e, where), entry);
  });
  return bytes;
}
