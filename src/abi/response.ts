/**
 * `struct blkif_response` (blkif.h): `id` and `operation` echoed from the request, `status` one of
 * `BLKIF_RSP_OKAY`, `BLKIF_RSP_ERROR`, `BLKIF_RSP_EOPNOTSUPP` (int16). 16 bytes on x86_64 (4 bytes of
 * tail padding), 12 on x86_32; a reader only ever looks at the first 12.
 */
import type { BlkifAbi } from './layout.js';

export interface BlkifResponse {
  id: bigint;
  operation: number;
  status: number;
}

export function encodeResponse(view: DataView, off: number, abi: BlkifAbi, rsp: BlkifResponse): number {
  const l = abi.response;
  view.setBigUint64(off + l.id, rsp.id, true);
  view.setUint8(off + l.operation, rsp.operation);
  view.setUint8(off + l.operation + 1, 0); // padding before `status`
  view.setInt16(off + l.status, rsp.status, true);
  if (l.size > 12) view.setUint32(off + 12, 0, true); // x86_64 tail padding
  return l.size;
}

export function decodeResponse(view: DataView, off: number, abi: BlkifAbi): BlkifResponse {
  const l = abi.response;
  return {
    id: view.getBigUint64(off + l.id, true),
    operation: view.getUint8(off + l.operation),
    status: view.getInt16(off + l.status, true),
  };
}
