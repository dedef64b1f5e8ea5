/**
 * What a frontend published for its rings before going Initialised (blkif.h "startup" step 3,
 * Linux blkback `connect_ring`), read from xenstore and checked against what we offered by the
 * negotiation record (abi/negotiation.ts). Nothing is mapped here.
 */
import { readFrontendRings as readRingsRecord, type BlkifAbi, type NegotiationResult } from '../abi/index.js';
import { readNodes } from '../xenbus/index.js';
import type { XenstoreClient } from '../xenstore/index.js';
import type { BlkbackOptions } from './options.js';
import type { QueueRing } from './queue.js';

export interface FrontendRings {
  readonly abi: BlkifAbi;
  readonly order: number;
  /** One per queue, in queue order. */
  readonly rings: readonly QueueRing[];
  /** The frontend wrote `feature-persistent` = 1. */
  readonly frontendPersistent: boolean;
}

/** The frontend's ring nodes, or why they are unusable (a "buggy or malicious guest", as Linux says). */
export async function readFrontendRings(
  xs: XenstoreClient, frontDir: string, o: Pick<BlkbackOptions, 'defaultProtocol' | 'maxQueues' | 'maxRingPageOrder'>,
): Promise<NegotiationResult<FrontendRings>> {
  const nodes = await readNodes(xs, frontDir);
  const r = readRingsRecord((k) => nodes.get(k), o);
  if (!r.ok) return r;
  const { abi, order, queues, persistent } = r.value;
  return { ok: true, value: { abi, order, rings: queues.map((q) => ({ refs: q.refs, remotePort: q.port })), frontendPersistent: persistent } };
}
