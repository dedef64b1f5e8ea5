/**
 * A guest's thread: attaches blkfront to the VBDs the toolstack plugged in and does I/O on them
 * when asked over the control channel (the guest's "applications" in tests and tools), or
 * exports them over NBD from here.
 */
import { parentPort } from 'node:worker_threads';
import { Blkfront, type BlkfrontCounters, type BlkfrontOptions, type DeviceInfo } from '../blkfront/index.js';
import { attachDomain } from '../xen/index.js';
import { connectGuestXenstore, xenbusStateName } from '../xenbus/index.js';
import { NbdServer, nbdUri, type NbdAddress, type NbdListenOptions, type NbdServerLimits, type NbdServerTlsConfig } from '../nbd/index.js';
import { exportDevice } from './disk-export.js';
import { serveRpc, type RpcHandlers } from './rpc.js';
import { runWorkload, type WorkloadResult, type WorkloadSpec } from './workload.js';

/** An export the NBD server in this guest offers: a disk attached here, at `frontDir`. */
export interface GuestExportSpec {
  name: string;
  description: string;
  frontDir: string;
  /** Only the NBD server writes this disk (a local image): it may report what it zeroed (base:allocation). */
  ownsWrites: boolean;
}

const xen = await attachDomain();
const link = await connectGuestXenstore(xen);
const disks = new Map<string, Blkfront>();
const log = (msg: string) => parentPort!.postMessage({ kind: 'log', domid: xen.domid, msg });

function disk(frontDir: string): Blkfront {
  const d = disks.get(frontDir);
  if (d === undefined) throw new Error(`no disk attached at ${frontDir}`);
  return d;
}

let nbd: NbdServer | undefined;

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
  workload: (frontDir: string, spec: WorkloadSpec): Promise<WorkloadResult> => runWorkload(disk(frontDir), spec),
  status(frontDir: string): { state: string; inFlight: number; leakedPages: number; counters: BlkfrontCounters } {
    const d = disk(frontDir);
    return { state: xenbusStateName(d.xenbusState), inFlight: d.inFlight, leakedPages: d.leakedPages, counters: { ...d.counters } };
  },
  /**
   * Starts an NBD server in this guest exporting `exports` on every address of `listen` (a TCP
   * port 0 after the first is the port the first got); returns the addresses and the first's URI.
   */
  async serveNbd(
    exports: GuestExportSpec[], listen: NbdListenOptions | NbdListenOptions[], tls?: NbdServerTlsConfig, limits: NbdServerLimits = {},
  ): Promise<{ uri: string; address: NbdAddress; addresses: NbdAddress[] }> {
    if (nbd !== undefined) throw new Error('an NBD server already runs in this guest');
    const server = new NbdServer({
      defaultExport: exports[0]?.name,
      log: (level, msg) => { if (level !== 'debug') log(`nbd ${level}: ${msg}`); },
      ...(tls !== undefined ? { tls } : {}),
      ...limits,
    });
    for (const e of exports) server.addExport({ name: e.name, description: e.description, device: exportDevice(disk(e.frontDir)), ownsWrites: e.ownsWrites });
    const addresses: NbdAddress[] = [];
    try {
      for (const l of Array.isArray(listen) ? listen : [listen]) {
        const first = addresses[0];
        const where = 'port' in l && l.port === 0 && first !== undefined && 'port' in first ? { ...l, port: first.port } : l;
        addresses.push(await server.listen(where));
      }
    } catch (e) {
      await server.close();
      throw e;
    }
    nbd = server;
    return { uri: nbdUri(addresses[0]!), address: addresses[0]!, addresses };
  },
  /** Stops accepting, lets in-flight requests finish, closes the connections. */
  async stopNbd() {
    const s = nbd;
    nbd = undefined;
    await s?.close();
  },
  nbdStats: () => nbd?.stats(),
  async shutdown() {
    if (nbd !== undefined) await handlers.stopNbd!();
    for (const [k, d] of [...disks]) {
      disks.delete(k);
      await d.close();
    }
    link.close();
    xen.dispose();
  },
};
serveRpc(parentPort!, handlers);
