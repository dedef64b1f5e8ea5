/**
 * A guest's thread: attaches blkfront to the VBDs the toolstack plugged in and does I/O on them
 * when asked over the control channel (the guest's "applications" in tests and tools). Other
 * applications (the product's NBD server, the bench's workload) are modules it loads
 * (guest-application.ts).
 */
import { parentPort } from 'node:worker_threads';
import { Blkfront, type BlkfrontCounters, type BlkfrontOptions, type DeviceInfo } from '../blkfront/index.js';
import { attachDomain } from '../xen/index.js';
import { connectGuestXenstore, xenbusStateName } from '../xenbus/index.js';
import type { GuestApplicationModule, GuestContext, GuestWorkerData } from './guest-application.js';
import { serveRpc, type RpcHandlers } from './rpc.js';

const xen = await attachDomain();
const link = await connectGuestXenstore(xen);
const disks = new Map<string, Blkfront>();
const log = (msg: string) => parentPort!.postMessage({ kind: 'log', domid: xen.domid, msg });

function disk(frontDir: string): Blkfront {
  const d = disks.get(frontDir);
  if (d === undefined) throw new Error(`no disk attached at ${frontDir}`);
  return d;
}

const handlers: RpcHandlers = {
  async attach(frontDir: string, options: Partial<BlkfrontOptions>): Promise<DeviceInfo> {
    if (disks.has(frontDir)) throw new Error(`a disk is already attached at ${frontDir}`);
    const f = await Blkfront.attach({ xen, xs: link.xs, frontDir, options, log });
    disks.set(frontDir, f);
    return f.info;
  },
  async detach(frontDir: string) {
    const d = disk(frontDir);
    disks.delete(frontDir);
    await d.close();
  },
  read: (frontDir: string, offset: number, length: number) => disk(frontDir).read(offset, length),
  write: (frontDir: string, offset: number, data: Uint8Array) => disk(frontDir).write(offset, data),
  flush: (frontDir: string) => disk(frontDir).flush(),
  discard: (frontDir: string, offset: number, length: number, secure: boolean) => disk(frontDir).discard(offset, length, { secure }),
  info: (frontDir: string): DeviceInfo => disk(frontDir).info,
  status(frontDir: string): { state: string; inFlight: number; leakedPages: number; counters: BlkfrontCounters } {
    const d = disk(frontDir);
    return { state: xenbusStateName(d.xenbusState), inFlight: d.inFlight, leakedPages: d.leakedPages, counters: { ...d.counters } };
  },
  async shutdown() {
    for (const close of closers) await close();
    for (const [k, d] of [...disks]) {
      disks.delete(k);
      await d.close();
    }
    link.close();
    xen.dispose();
  },
};
// The applications the toolstack named: their methods join the guest's (a name clash is a bug).
const context: GuestContext = { xen, disk, log };
const closers: (() => Promise<void> | void)[] = [];
for (const url of (xen.workerData as GuestWorkerData | undefined)?.applications ?? []) {
  const app = (await import(url)) as GuestApplicationModule;
  const { close, ...more } = app.guestHandlers(context);
  for (const name of Object.keys(more)) if (name in handlers) throw new Error(`guest application ${url}: method ${name} exists already`);
  Object.assign(handlers, more);
  if (close !== undefined) closers.push(close);
}
serveRpc(parentPort!, handlers);
