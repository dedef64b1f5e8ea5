/**
 * A driver domain's thread: serves VBDs with blkback, each on its own storage. The toolstack
 * adds and removes VBDs over the control channel (as xl's hotplug scripts would); everything
 * between blkback and its frontends goes through xenstore, grants and event channels.
 */
import { parentPort } from 'node:worker_threads';
import { Blkback, type BlkbackOptions, type VbdCounters } from '../blkback/index.js';
import { openStorage, type BlockStorage, type StorageSpec } from '../storage/index.js';
import { attachDomain } from '../xen/index.js';
import { connectGuestXenstore, xenbusStateName } from '../xenbus/index.js';
import { serveRpc } from './rpc.js';

export interface BackendVbdStatus {
  state: string;
  connected: boolean;
  error: string | undefined;
  readOnly: boolean;
  counters: VbdCounters;
  /** vCPUs of the driver domain serving the VBD's queues in threads of their own (empty: its main thread). */
  queueVcpus: number[];
}

const xen = await attachDomain();
const link = await connectGuestXenstore(xen);
const vbds = new Map<string, { be: Blkback; storage: BlockStorage }>();
const log = (msg: string) => parentPort!.postMessage({ kind: 'log', domid: xen.domid, msg });

/**
 * A driver domain serving one VBD serves it alone in this thread: its storage may block here
 * (storage.setOwnThread), which saves a threadpool round trip per request; with two or more,
 * every store goes through the pool again, so that a stalled disk never holds up another VBD.
 */
const stores = new Set<BlockStorage>();
function ownThreadIfAlone(): void {
  for (const s of stores) s.setOwnThread?.(stores.size === 1);
}

async function closeStore(storage: BlockStorage): Promise<void> {
  stores.delete(storage);
  ownThreadIfAlone();
  await storage.close();
}

function vbd(backDir: string) {
  const v = vbds.get(backDir);
  if (v === undefined) throw new Error(`no VBD at ${backDir}`);
  return v;
}

function status(backDir: string): BackendVbdStatus {
  const { be } = vbd(backDir);
  return { state: xenbusStateName(be.xenbusState), connected: be.connected, error: be.error, readOnly: be.readOnly, counters: { ...be.counters }, queueVcpus: be.queueVcpus };
}

serveRpc(parentPort!, {
  async addVbd(backDir: string, spec: StorageSpec, options: Partial<BlkbackOptions>) {
    if (vbds.has(backDir)) throw new Error(`a VBD is already served at ${backDir}`);
    const storage = await openStorage(spec, (m) => log(`${backDir}: ${m}`));
    // Counted before it serves anything: the VBDs already served go asynchronous first.
    stores.add(storage);
    ownThreadIfAlone();
    try {
      // Queue threads open the same spec again (when its kind can be shared).
      const be = await Blkback.start({ xen, xs: link.xs, backDir, storage, storageSpec: spec, options, log });
      vbds.set(backDir, { be, storage });
      return { readOnly: be.readOnly, size: storage.size };
    } catch (e) {
      await closeStore(storage);
      throw e;
    }
  },
  async removeVbd(backDir: string) {
    const v = vbd(backDir);
    vbds.delete(backDir);
    await v.be.close();
    await closeStore(v.storage);
  },
  status: (backDir: string): BackendVbdStatus => status(backDir),
  /** Several VBDs' status in one call (one wake of this thread for a status line, whatever their number). */
  statuses: (backDirs: string[]): BackendVbdStatus[] => backDirs.map(status),
  async shutdown() {
    for (const backDir of [...vbds.keys()]) {
      const v = vbds.get(backDir)!;
      vbds.delete(backDir);
      await v.be.close();
      await closeStore(v.storage);
    }
    link.close();
    xen.dispose();
  },
});
