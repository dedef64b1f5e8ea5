/**
 * What a toolstack (xl, libxl) writes to xenstore to plug a virtual block device between a guest
 * and a driver domain: both directories, owned by their domain and readable by the other, the
 * `backend`/`frontend` links, the PRIVATE `mode`/`params`/`type`, and both states Initialising.
 */
import { XS_DEVICE_TYPE, XS_MODE, XS_PARAMS, XS_TYPE, XS_VIRTUAL_DEVICE } from '../abi/index.js';
import {
  XS_BACKEND, XS_BACKEND_ID, XS_FRONTEND, XS_FRONTEND_ID, XS_ONLINE, XS_STATE, XenbusStateInitialising, backendPath, frontendPath,
} from '../xenbus/index.js';
import type { XenstoreClient } from '../xenstore/index.js';
import { describeStorage, type StorageSpec } from '../storage/index.js';

export interface VbdPlacement {
  readonly frontDomid: number;
  readonly backDomid: number;
  /** The `virtual-device` number, also the last component of both paths. */
  readonly devid: number;
}

export interface VbdPaths {
  readonly frontDir: string;
  readonly backDir: string;
}

export function vbdPaths(p: VbdPlacement): VbdPaths {
  return { frontDir: frontendPath(p.frontDomid, p.devid), backDir: backendPath(p.backDomid, p.frontDomid, p.devid) };
}

/**
 * With `relink`, the frontend directory exists already (a disk moving to another backend): only
 * its `backend`/`backend-id` links are rewritten, which the frontend watches.
 */
export async function createVbdNodes(xs: XenstoreClient, p: VbdPlacement, storage: StorageSpec, readOnly: boolean, opts: { relink?: boolean } = {}): Promise<VbdPaths> {
  const paths = vbdPaths(p);
  const { frontDir, backDir } = paths;
  await xs.transaction(async (tx) => {
    if (opts.relink !== true) await createFrontend(tx);
    else {
      // Only the new backend may read the guest's nodes now; a node keeps the permissions it was
      // created with, so every existing one is changed, not just the directory.
      const perms = [{ domid: p.frontDomid, perm: 'n' as const }, { domid: p.backDomid, perm: 'r' as const }];
      const walk = async (dir: string): Promise<void> => {
        await xs.setPerms(dir, perms, tx);
        for (const child of await xs.directory(dir, tx)) await walk(`${dir}/${child}`);
      };
      await walk(frontDir);
    }
    await xs.mkdir(backDir, tx);
    await xs.setPerms(backDir, [{ domid: p.backDomid, perm: 'n' }, { domid: p.frontDomid, perm: 'r' }], tx);
    await xs.write(`${frontDir}/${XS_BACKEND}`, backDir, tx);
    await xs.write(`${frontDir}/${XS_BACKEND_ID}`, String(p.backDomid), tx);
    await xs.write(`${backDir}/${XS_FRONTEND}`, frontDir, tx);
    await xs.write(`${backDir}/${XS_FRONTEND_ID}`, String(p.frontDomid), tx);
    await xs.write(`${backDir}/${XS_MODE}`, readOnly ? 'r' : 'w', tx);
    await xs.write(`${backDir}/${XS_TYPE}`, storage.kind, tx);
    await xs.write(`${backDir}/${XS_PARAMS}`, describeStorage(storage), tx);
    await xs.write(`${backDir}/${XS_ONLINE}`, '1', tx);
    await xs.write(`${backDir}/${XS_STATE}`, String(XenbusStateInitialising), tx);
  });
  return paths;

  async function createFrontend(tx: number): Promise<void> {
    await xs.mkdir(frontDir, tx);
    await xs.setPerms(frontDir, [{ domid: p.frontDomid, perm: 'n' }, { domid: p.backDomid, perm: 'r' }], tx);
    await xs.write(`${frontDir}/${XS_VIRTUAL_DEVICE}`, String(p.devid), tx);
    await xs.write(`${frontDir}/${XS_DEVICE_TYPE}`, 'disk', tx);
    await xs.write(`${frontDir}/${XS_STATE}`, String(XenbusStateInitialising), tx);
  }
}

/** Removes both directories (after both ends closed). */
export async function removeVbdNodes(xs: XenstoreClient, paths: VbdPaths): Promise<void> {
  await xs.rm(paths.frontDir).catch(() => undefined);
  await xs.rm(paths.backDir).catch(() => undefined);
}
