/**
 * The toolstack in dom0 (the main thread): starts the emulated Xen and its xenstore, creates
 * driver and guest domains as worker threads, plugs VBDs between them as xl does, and tears
 * everything down in order. Tests and the CLI drive the stack through it.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BlkbackOptions } from '../blkback/index.js';
import type { BlkfrontCounters, BlkfrontOptions, DeviceInfo } from '../blkfront/index.js';
import { Hypervisor, type DomainHandle } from '../xen/index.js';
import { XS_ERROR_DIR, XenbusStateConnected, acceptGuestXenstore, domainPath, waitForState, xvdVirtualDevice } from '../xenbus/index.js';
import { XenstoreClient, XenstoreDaemon, XenstoreSocketServer, type XenstoreQuotas } from '../xenstore/index.js';
import type { BackendVbdStatus } from './backend-domain.js';
import type { GuestWorkerData } from './guest-application.js';
import { RpcClient } from './rpc.js';
import type { StorageSpec } from '../storage/index.js';
import { createVbdNodes, removeVbdNodes, type VbdPaths } from './vbd.js';

export interface ToolstackOptions {
  /** Where domains' log lines go (default: kept, see `logs`). */
  readonly log?: (domid: number, msg: string) => void;
  /** xenstored's per-domain quotas (default cxenstored's: -E 1000 nodes, -W 128 watches). */
  readonly quotas?: Partial<XenstoreQuotas>;
}

/** A running domain and the control channel into its thread. */
export class DomainProxy {
  constructor(
    readonly handle: DomainHandle,
    readonly role: 'guest' | 'backend',
    readonly rpc: RpcClient,
    readonly releaseXenstore: () => void,
  ) {}
  get domid(): number {
    return this.handle.domid;
  }
}

export interface PlugOptions {
  readonly guest: DomainProxy;
  readonly backend: DomainProxy;
  readonly storage: StorageSpec;
  /** `virtual-device` (default: the next xvd disk of this guest). */
  readonly devid?: number;
  readonly readOnly?: boolean;
  readonly backendOptions?: Partial<BlkbackOptions>;
  readonly frontendOptions?: Partial<BlkfrontOptions>;
}

export interface GuestStatus {
  state: string;
  inFlight: number;
  leakedPages: number;
  counters: BlkfrontCounters;
}

/** A VBD plugged between a guest and a driver domain; its I/O methods run in the guest. */
export class GuestDisk {
  constructor(
    private readonly ts: Toolstack,
    readonly guest: DomainProxy,
    readonly backend: DomainProxy,
    readonly paths: VbdPaths,
    readonly info: DeviceInfo,
    readonly storage: StorageSpec,
    readonly readOnly: boolean,
  ) {}
  /** The device as the guest sees it now (after a resize or a move to another backend). */
  currentInfo(): Promise<DeviceInfo> {
    return this.guest.rpc.call('info', this.paths.frontDir);
  }
  read(offset: number, length: number): Promise<Uint8Array> {
    return this.guest.rpc.call('read', this.paths.frontDir, offset, length);
  }
  write(offset: number, data: Uint8Array): Promise<void> {
    return this.guest.rpc.call('write', this.paths.frontDir, offset, data);
  }
  flush(): Promise<void> {
    return this.guest.rpc.call('flush', this.paths.frontDir);
  }
  discard(offset: number, length: number, secure = false): Promise<void> {
    return this.guest.rpc.call('discard', this.paths.frontDir, offset, length, secure);
  }
  status(): Promise<GuestStatus> {
    return this.guest.rpc.call('status', this.paths.frontDir);
  }
  backendStatus(): Promise<BackendVbdStatus> {
    return this.backend.rpc.call('status', this.paths.backDir);
  }
  /**
   * Closes the frontend (the backend follows to Closed), stops serving, removes the nodes. The
   * checked hypervisor then checks that neither end keeps a grant, mapping or port towards the
   * other (when no other disk links them).
   */
  async unplug(): Promise<void> {
    await this.guest.rpc.call('detach', this.paths.frontDir);
    await this.backend.rpc.call('removeVbd', this.paths.backDir);
    await removeVbdNodes(this.ts.xs, this.paths);
    this.ts._unplugged(this);
  }
}

/**
 * A driver domain's memory without grant copy, and what each grant-copy VBD adds: bounds, not
 * costs (a page costs only once allocated; bounce pages are taken as copies first need them).
 */
export const BACKEND_BASE_PAGES = 2048;
export const BACKEND_COPY_PAGES = 4200;

export class Toolstack {
  /** Recent log lines of every domain (when no `log` option is given). */
  readonly logs: string[] = [];
  private readonly domains: DomainProxy[] = [];
  private readonly disksPerGuest = new Map<number, number>();
  /** Disks plugged and not unplugged (the checked mode's leak check at unplug). */
  private readonly plugged = new Set<GuestDisk>();

  private constructor(
    readonly hv: Hypervisor,
    readonly daemon: XenstoreDaemon,
    private readonly server: XenstoreSocketServer,
    readonly xs: XenstoreClient,
    /** The xenstored socket (for xenstore-utils: XENSTORED_PATH). */
    readonly socketPath: string,
    private readonly dir: string,
    private readonly opts: ToolstackOptions,
  ) {}

  static async start(opts: ToolstackOptions = {}): Promise<Toolstack> {
    const dir = mkdtempSync(join(tmpdir(), 'blkif-xen-'));
    const socketPath = join(dir, 'xenstored.socket');
    const hv = new Hypervisor();
    const daemon = new XenstoreDaemon(opts.quotas === undefined ? {} : { quotas: opts.quotas });
    const server = await XenstoreSocketServer.listen(daemon, socketPath);
    const xs = await XenstoreClient.connectSocket(socketPath);
    return new Toolstack(hv, daemon, server, xs, socketPath, dir, opts);
  }

  /**
   * A driver domain running blkback. Its memory holds grant-copy bounce pages: about 4200 pages
   * per VBD served that way (BACKEND_COPY_PAGES); map-based VBDs need none. `maxVcpus` (xl's
   * `maxvcpus=`) bounds its threads: queue threads beyond it are served in its main thread.
   */
  createBackendDomain(name = 'driver-domain', memoryPages = BACKEND_BASE_PAGES, opts: { maxVcpus?: number } = {}): Promise<DomainProxy> {
    return this.createDomain(new URL('./backend-domain.js', import.meta.url), 'backend', name, memoryPages, opts.maxVcpus);
  }

  /**
   * A guest running blkfront; `memoryPages` must hold blkfront's buffer pages and rings. Only the
   * pages it allocates cost memory (src/xen/memory.ts), so sizing it for the largest pool is free.
   * `applications` are modules its thread loads to use its disks (guest-application.ts).
   */
  createGuest(name = 'guest', memoryPages = 16384 + 512, opts: { applications?: readonly URL[] } = {}): Promise<DomainProxy> {
    const workerData: GuestWorkerData = { applications: (opts.applications ?? []).map((u) => u.href) };
    return this.createDomain(new URL('./guest-domain.js', import.meta.url), 'guest', name, memoryPages, undefined, workerData);
  }

  private async createDomain(script: URL, role: 'guest' | 'backend', name: string, memoryPages: number | undefined, maxVcpus?: number, workerData?: unknown): Promise<DomainProxy> {
    // A guest grants its pages and maps nobody's: it need not learn other domains' memory (which
    // would make each plug slower than the last); a driver domain maps from every frontend.
    const memoryOf = role === 'guest' ? [] : 'all';
    const handle = await this.hv.createDomain({ script, name, memoryPages, memoryOf, ...(maxVcpus === undefined ? {} : { maxVcpus }), ...(workerData === undefined ? {} : { workerData }) });
    handle.worker.on('message', (m: { kind?: string; domid?: number; msg?: string }) => {
      if (m?.kind !== 'log') return;
      if (this.opts.log !== undefined) this.opts.log(m.domid!, m.msg!);
      else {
        this.logs.push(`d${m.domid}: ${m.msg}`);
        if (this.logs.length > 2000) this.logs.splice(0, 1000);
      }
    });
    const rpc = new RpcClient(handle.worker);
    // As libxl__domain_make: the domain's own `error` directory, where its drivers say why they
    // gave up (xenbus_dev_fatal writes error/<device path>/error under the domain's home).
    await this.xs.mkdir(`${domainPath(handle.domid)}/${XS_ERROR_DIR}`);
    await this.xs.setPerms(`${domainPath(handle.domid)}/${XS_ERROR_DIR}`, [{ domid: handle.domid, perm: 'n' }]);
    const release = await acceptGuestXenstore(this.hv, this.daemon, handle.domid, handle.worker);
    const d = new DomainProxy(handle, role, rpc, release);
    this.domains.push(d);
    return d;
  }

  /** Plugs a VBD: xenstore nodes, blkback in the driver domain, blkfront in the guest; resolves once Connected. */
  async plug(o: PlugOptions): Promise<GuestDisk> {
    const n = this.disksPerGuest.get(o.guest.domid) ?? 0;
    this.disksPerGuest.set(o.guest.domid, n + 1);
    const devid = o.devid ?? xvdVirtualDevice(n);
    const readOnly = o.readOnly === true || o.storage.readOnly === true;
    const paths = await createVbdNodes(this.xs, { frontDomid: o.guest.domid, backDomid: o.backend.domid, devid }, o.storage, readOnly);
    try {
      await o.backend.rpc.call('addVbd', paths.backDir, o.storage, o.backendOptions ?? {});
      const info = await o.guest.rpc.call<DeviceInfo>('attach', paths.frontDir, o.frontendOptions ?? {});
      const disk = new GuestDisk(this, o.guest, o.backend, paths, info, o.storage, readOnly);
      this.plugged.add(disk);
      return disk;
    } catch (e) {
      await o.backend.rpc.call('removeVbd', paths.backDir).catch(() => undefined);
      await removeVbdNodes(this.xs, paths);
      throw e;
    }
  }

  /**
   * Moves a disk to another driver domain while the guest keeps using it (what a migration or a
   * backend restart does): the old backend finishes what it consumed and closes (the frontend
   * keeps everything unanswered), the toolstack points the frontend at a new backend directory,
   * the new backend — possibly with other features — serves it, and the frontend reconnects and
   * re-issues what waited, re-split under the new limits. Resolves once the guest is Connected.
   * An old backend that is already dead (its domain destroyed) is simply skipped.
   */
  async migrate(disk: GuestDisk, to: DomainProxy, backendOptions: Partial<BlkbackOptions> = {}, timeoutMs = 30_000): Promise<GuestDisk> {
    const frontDomid = disk.guest.domid;
    const devid = Number(disk.paths.frontDir.slice(disk.paths.frontDir.lastIndexOf('/') + 1));
    if (this.hv.domain(disk.backend.domid) !== undefined) {
      await disk.backend.rpc.call('removeVbd', disk.paths.backDir).catch(() => undefined);
    }
    await this.xs.rm(disk.paths.backDir).catch(() => undefined);
    const paths = await createVbdNodes(this.xs, { frontDomid, backDomid: to.domid, devid }, disk.storage, disk.readOnly, { relink: true });
    await to.rpc.call('addVbd', paths.backDir, disk.storage, backendOptions);
    await waitForState(this.xs, paths.frontDir, (s) => s === XenbusStateConnected, timeoutMs);
    const info = await disk.guest.rpc.call<DeviceInfo>('info', paths.frontDir);
    const moved = new GuestDisk(this, disk.guest, to, paths, info, disk.storage, disk.readOnly);
    this.plugged.delete(disk);
    this.plugged.add(moved);
    return moved;
  }

  /** @internal A disk was unplugged: the checked hypervisor's leak check at device close. */
  _unplugged(disk: GuestDisk): void {
    this.plugged.delete(disk);
    for (const o of this.plugged) if (o.guest === disk.guest && o.backend === disk.backend) return;
    this.hv.checkReleased(disk.guest.domid, { peers: [disk.backend.domid] });
    this.hv.checkReleased(disk.backend.domid, { peers: [disk.guest.domid] });
  }

  /**
   * Asks a domain to close its devices, then destroys it. A domain that shut down cleanly must
   * hold nothing towards other domains any more (the checked hypervisor's leak check; its
   * xenstore page and port towards dom0 last until destruction, as a guest's xenstore ring does).
   */
  async destroy(d: DomainProxy, graceMs = 10_000): Promise<void> {
    const i = this.domains.indexOf(d);
    if (i < 0) return;
    this.domains.splice(i, 1);
    for (const disk of [...this.plugged]) if (disk.guest === d || disk.backend === d) this.plugged.delete(disk);
    let timer: NodeJS.Timeout | undefined;
    const clean = await Promise.race([
      d.rpc.call('shutdown').then(() => true, () => false),
      new Promise<false>((r) => { timer = setTimeout(() => r(false), graceMs); }),
    ]);
    clearTimeout(timer);
    d.releaseXenstore();
    if (clean && this.hv.domain(d.domid) !== undefined) this.hv.checkReleased(d.domid, { ignore: [0] });
    if (this.hv.domain(d.domid) !== undefined) await this.hv.destroyDomain(d.domid);
    await d.handle.exited;
  }

  /** Guests first (their frontends close), then driver domains, then xenstore and the hypervisor. */
  async shutdown(): Promise<void> {
    const guests = this.domains.filter((d) => d.role === 'guest');
    for (const d of guests) await this.destroy(d);
    for (const d of [...this.domains]) await this.destroy(d);
    this.xs.close();
    // Everything is torn down even if the checked hypervisor reports violations; then they fail it.
    let violations: unknown;
    await this.hv.shutdown().catch((e: unknown) => { violations = e; });
    await this.server.close();
    this.daemon.close();
    rmSync(this.dir, { recursive: true, force: true });
    if (violations !== undefined) throw violations;
  }
}
