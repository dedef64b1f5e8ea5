// Byte-stream access to struct xenstore_domain_interface (xs_wire.h) in a
// page shared between threads. Index fields are accessed with Atomics so
// data bytes are published before the producer index that covers them, and
// read only after the index is seen (the barriers xenstored and Linux use,
// docs/misc/xenstore-ring.txt).
import {
  MASK_XENSTORE_IDX,
  XENSTORE_CONNECTION_OFFSET,
  XENSTORE_DOMAIN_INTERFACE_SIZE,
  XENSTORE_ERROR_OFFSET,
  XENSTORE_REQ_CONS_OFFSET,
  XENSTORE_REQ_OFFSET,
  XENSTORE_REQ_PROD_OFFSET,
  XENSTORE_RING_SIZE,
  XENSTORE_RSP_CONS_OFFSET,
  XENSTORE_RSP_OFFSET,
  XENSTORE_RSP_PROD_OFFSET,
  XENSTORE_SERVER_FEATURES_OFFSET,
} from './wire.js';

export type RingField =
  | 'req_cons'
  | 'req_prod'
  | 'rsp_cons'
  | 'rsp_prod'
  | 'server_features'
  | 'connection'
  | 'error';

const FIELD_OFFSET: Record<RingField, number> = {
  req_cons: XENSTORE_REQ_CONS_OFFSET,
  req_prod: XENSTORE_REQ_PROD_OFFSET,
  rsp_cons: XENSTORE_RSP_CONS_OFFSET,
  rsp_prod: XENSTORE_RSP_PROD_OFFSET,
  server_features: XENSTORE_SERVER_FEATURES_OFFSET,
  connection: XENSTORE_CONNECTION_OFFSET,
  error: XENSTORE_ERROR_OFFSET,
};

/** One direction of the page: the req ring (guest→daemon) or rsp ring. */
export interface RingDirection {
  data: number;
  cons: RingField;
  prod: RingField;
}

export const REQUEST_RING: RingDirection = { data: XENSTORE_REQ_OFFSET, cons: 'req_cons', prod: 'req_prod' };
export const RESPONSE_RING: RingDirection = { data: XENSTORE_RSP_OFFSET, cons: 'rsp_cons', prod: 'rsp_prod' };

export class XenstoreInterface {
  private readonly words: Int32Array;

  constructor(readonly page: Uint8Array) {
    if (page.length < XENSTORE_DOMAIN_INTERFACE_SIZE) throw new RangeError('page smaller than xenstore_domain_interface');
    if (page.byteOffset % 4 !== 0) throw new RangeError('page must be 4-byte aligned');
    this.words = new Int32Array(page.buffer, page.byteOffset, XENSTORE_DOMAIN_INTERFACE_SIZE / 4);
  }

  load(f: RingField): number {
    return Atomics.load(this.words, FIELD_OFFSET[f] / 4) >>> 0;
  }

  store(f: RingField, v: number): void {
    Atomics.store(this.words, FIELD_OFFSET[f] / 4, v | 0);
  }

  /**
   * Producer: copies as much of `bytes` as fits; returns the count, or -1
   * when the indexes are impossible (XENSTORE_ERROR_RINGIDX).
   */
  write(dir: RingDirection, bytes: Uint8Array): number {
    const cons = this.load(dir.cons);
    const prod = this.load(dir.prod);
    const used = (prod - cons) >>> 0;
    if (used > XENSTORE_RING_SIZE) return -1;
    const n = Math.min(XENSTORE_RING_SIZE - used, bytes.length);
    for (let i = 0; i < n; ) {
      const at = MASK_XENSTORE_IDX(prod + i);
      const chunk = Math.min(n - i, XENSTORE_RING_SIZE - at);
      this.page.set(bytes.subarray(i, i + chunk), dir.data + at);
      i += chunk;
    }
    if (n > 0) this.store(dir.prod, prod + n);
    return n;
  }

  /** Consumer: takes everything available; undefined on impossible indexes. */
  read(dir: RingDirection): Uint8Array | undefined {
    const prod = this.load(dir.prod);
    const cons = this.load(dir.cons);
    const avail = (prod - cons) >>> 0;
    if (avail > XENSTORE_RING_SIZE) return undefined;
    const out = new Uint8Array(avail);
    for (let i = 0; i < avail; ) {
      const at = MASK_XENSTORE_IDX(cons + i);
      const chunk = Math.min(avail - i, XENSTORE_RING_SIZE - at);
      out.set(this.page.subarray(dir.data + at, dir.data + at + chunk), i);
      i += chunk;
    }
    if (avail > 0) this.store(dir.cons, cons + avail);
    return out;
  }
}
