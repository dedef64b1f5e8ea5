/**
 * Xenbus device-path conventions (Xen's toolstack, Linux xenbus): where each end of a virtual
 * block device keeps its nodes, and how each finds the other through `backend` / `frontend`.
 */
export const DEVICE_CLASS_VBD = 'vbd';

/** `/local/domain/<domid>`: what XS_GET_DOMAIN_PATH answers. */
export function domainPath(domid: number): string {
  return `/local/domain/${domid}`;
}

/**
 * Where a xenbus device says why it failed (Linux `xenbus_va_dev_error`): `error/<nodename>/error`
 * relative to the domain's home, `nodename` being the device's directory there (so
 * `/local/domain/<d>/error/backend/vbd/<front>/<devid>/error`): a node the domain may write.
 */
export function errorNodePath(dir: string): string {
  const m = /^\/local\/domain\/(\d+)\/(.+)$/.exec(dir);
  return m === null ? `/${XS_ERROR_DIR}${dir.startsWith('/') ? '' : '/'}${dir}/error` : `${domainPath(Number(m[1]))}/${XS_ERROR_DIR}/${m[2]}/error`;
}

/** The domain's `error` directory, which the toolstack creates writable by the domain (as libxl does). */
export const XS_ERROR_DIR = 'error';

/** The frontend's directory: `/local/domain/<front>/device/vbd/<devid>`. */
export function frontendPath(frontDomid: number, devid: number, cls = DEVICE_CLASS_VBD): string {
  return `${domainPath(frontDomid)}/device/${cls}/${devid}`;
}

/** The backend's directory: `/local/domain/<back>/backend/vbd/<front>/<devid>`. */
export function backendPath(backDomid: number, frontDomid: number, devid: number, cls = DEVICE_CLASS_VBD): string {
  return `${domainPath(backDomid)}/backend/${cls}/${frontDomid}/${devid}`;
}

/** Nodes both ends keep (xenbus convention, not blkif.h). */
export const XS_STATE = 'state';
export const XS_BACKEND = 'backend';
export const XS_BACKEND_ID = 'backend-id';
export const XS_FRONTEND = 'frontend';
export const XS_FRONTEND_ID = 'frontend-id';
export const XS_ONLINE = 'online';
export const XS_HOTPLUG_STATUS = 'hotplug-status';

/**
 * A Linux-style `virtual-device` number for xvd disks (docs/misc/vbd-interface.txt): major 202,
 * 16 minors per disk, so xvda = 51712, xvdb = 51728, up to xvdp; disks 16 onwards take the
 * extended form `1 << 28 | disk << 8` (the 202 form has no room for them).
 */
export function xvdVirtualDevice(disk: number): number {
  if (!Number.isInteger(disk) || disk < 0 || disk >= 1 << 20) throw new RangeError(`xvd disk ${disk}: 0..${(1 << 20) - 1}`);
  return disk < 16 ? (202 << 8) | (disk << 4) : (1 << 28) | (disk << 8);
}

/** The disk's name in the guest, as Linux names it: xvda .. xvdz, xvdaa, ... */
export function xvdName(disk: number): string {
  let letters = '';
  for (let n = disk + 1; n > 0; n = Math.floor((n - 1) / 26)) letters = String.fromCharCode(97 + ((n - 1) % 26)) + letters;
  return `xvd${letters}`;
}
