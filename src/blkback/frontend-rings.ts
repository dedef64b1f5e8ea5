/**
 * What a frontend published for its rings before going Initialised (blkif.h "startup" step 3,
 * Linux blkback `connect_ring`): the protocol, the queues, the ring order, `ring-ref*` and
 * `event-channel` of each queue, `feature-persistent`. Read and checked here; nothing is mapped.
 */
import {
  XS_EVENT_CHANNEL,
  XS_FEATURE_PERSISTENT,
  XS_MULTI_QUEUE_NUM_QUEUES,
  XS_PROTOCOL,
  XS_RING_PAGE_ORDER,
  XS_RING_REF,
  abiByName,
  xsQueueDir,
  xsRingRefN,
  type BlkifAbi,
} from '../abi/index.js';
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
): Promise<FrontendRings | string> {
  const opt = async (key: string): Promise<string | undefined> => xs.read(`${frontDir}/${key}`).catch(() => undefined);
  // A frontend that writes no `protocol` is assumed to be x86_32 (decisions.md: protocol always written).
  const protocol = (await opt(XS_PROTOCOL)) ?? o.defaultProtocol;
  const abi = abiByName(protocol);
  if (abi === undefined) return `frontend protocol "${protocol}" is not one we speak`;
  // Linux connect_ring: 0 or more queues than offered is refused.
  const queuesText = await opt(XS_MULTI_QUEUE_NUM_QUEUES);
  const nq = queuesText === undefined ? 1 : parseUint(queuesText);
  if (nq === undefined || nq < 1 || nq > o.maxQueues) return `multi-queue-num-queues "${queuesText}" (offered 1..${o.maxQueues})`;
  const orderText = await opt(XS_RING_PAGE_ORDER);
  const order = orderText === undefined ? 0 : parseUint(orderText);
  if (order === undefined || order > o.maxRingPageOrder) return `ring-page-order "${orderText}" (max ${o.maxRingPageOrder})`;
  // With one queue the nodes are top-level; with more, under queue-N (blkif.h "Multi-queue").
  const rings: QueueRing[] = [];
  for (let q = 0; q < nq; q++) {
    const dir = nq === 1 ? '' : `${xsQueueDir(q)}/`;
    const refs: number[] = [];
    for (let i = 0; i < 1 << order; i++) {
      const key = orderText === undefined ? `${dir}${XS_RING_REF}` : `${dir}${xsRingRefN(i)}`;
      const text = await opt(key);
      const ref = text === undefined ? undefined : parseUint(text);
      if (ref === undefined) return `${key} missing or malformed (${text})`;
      refs.push(ref);
    }
    const portText = await opt(`${dir}${XS_EVENT_CHANNEL}`);
    const remotePort = portText === undefined ? undefined : parseUint(portText);
    if (remotePort === undefined) return `${dir}event-channel missing or malformed (${portText})`;
    rings.push({ refs, remotePort });
  }
  return { abi, order, rings, frontendPersistent: (await opt(XS_FEATURE_PERSISTENT)) === '1' };
}

/** A decimal u32 as xenstore holds it, or undefined. */
function parseUint(text: string): number | undefined {
  const t = text.trim();
  if (!/^\d{1,10}$/.test(t)) return undefined;
  const n = Number(t);
  return n <= 0xffffffff ? n : undefined;
}
