/**
 * Xenbus device-path conventions (Xen's toolstack, Linux xenbus): where each end of a virtual
 * block device keeps its nodes, and how each finds the other through `backend` / `frontend`.
 */
export const DEVICE_CLASS_VBD = 'vbd';

/** `/local/domain/<domid>`: what XS_GET_DOMAIN_PATH answers. */
export function domainPath(domid: number): string {
  return `/local/domain/${domid}`;
}

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
 * 16 minors per disk, so xvda = 51712, xvdb = 51728.
 */
export function xvdVirtualDevice(disk: number): number {
  return (202 << 8) | (disk << 4);
}
