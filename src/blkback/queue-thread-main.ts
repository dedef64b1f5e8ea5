/**
 * The script of a queue thread (a vCPU of the driver domain, see queue-thread.ts): opens its own
 * storage handle, connects one queue and serves it until told to stop.
 */
import { BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, abiByName } from '../abi/index.js';
import { openStorage } from '../storage/registry.js';
import type { BlockStorage } from '../storage/storage.js';
import { attachDomain } from '../xen/index.js';
import { everyPeriod } from '../xenbus/periodic.js';
import { sharedVbdCounters } from './counters.js';
import { BouncePool } from './page-access.js';
import { Queue, type QueueAccess } from './queue.js';
import type { FromQueueThread, QueueThreadData, ToQueueThread } from './queue-thread.js';
import type { VbdLimits } from './validate.js';

const xen = await attachDomain();
const d = xen.workerData as QueueThreadData;
const { port } = d;
const send = (m: FromQueueThread) => port.postMessage(m);

type Opened = { storage: BlockStorage; queue: Queue; bounce: BouncePool | undefined };

async function open(): Promise<Opened | { why: string; noThread: boolean }> {
  const abi = abiByName(d.protocol);
  if (abi === undefined) return { why: `protocol ${d.protocol}`, noThread: true };
  let storage: BlockStorage;
  try {
    storage = await openStorage(d.storage);
    // This thread serves this one queue only: its storage may block here (BlockStorage.setOwnThread).
    storage.setOwnThread?.(true);
  } catch (e) {
    return { why: `queue ${d.index} could not open the storage: ${(e as Error).message}`, noThread: true };
  }
  let bounce: BouncePool | undefined;
  let access: QueueAccess;
  if (d.access.kind === 'copy') {
    // The lent frames but a request's indirect pages, which grant copy reads into pages of their own.
    bounce = new BouncePool(xen, xen.memory.alloc(xen.memory.freePages - BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST));
    access = { kind: 'copy', pool: bounce };
  } else {
    access = d.access;
  }
  const counters = sharedVbdCounters(d.counters).counters;
  const queue = Queue.open({
    xen, frontDomid: d.frontDomid, abi, storage, access, limits: () => limits,
    maxIndirectSegments: d.maxIndirectSegments, reqsPerPage: d.reqsPerPage, counters,
    onFatal: (why) => send({ t: 'fatal', why }),
    log: (msg) => send({ t: 'log', msg }),
  }, d.ring, d.index);
  if (typeof queue === 'string') {
    bounce?.dispose();
    await storage.close().catch(() => undefined);
    return { why: queue, noThread: false };
  }
  return { storage, queue, bounce };
}

let limits: VbdLimits = d.limits;
const opened = await open();
if ('why' in opened) {
  send({ t: 'error', why: opened.why, noThread: opened.noThread });
  port.close();
  xen.dispose();
} else {
  const { storage, queue, bounce } = opened;
  const stopHousekeeping = d.housekeepingMs > 0 ? everyPeriod(d.housekeepingMs, (now) => queue.tick(now)) : undefined;
  port.on('message', (m: ToQueueThread) => {
    if (m.t === 'limits') {
      // The storage's size first, so that its own range check agrees with the new limits.
      void storage.refreshSize(true).catch(() => undefined).then(() => {
        limits = m.limits;
        send({ t: 'limits', seq: m.seq });
      });
    } else if (m.t === 'stop') {
      stopHousekeeping?.();
      void (async () => {
        await queue.stop();
        bounce?.dispose();
        await storage.close().catch(() => undefined);
        send({ t: 'stopped' });
      })();
    }
  });
  send({ t: 'ready', port: queue.port });
}
