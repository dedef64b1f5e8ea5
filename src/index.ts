/**
 * blkif as a library: what a program needs to run the Xen PV block protocol. Each line names a
 * layer's front door; everything else is internal and may change.
 *
 * - an emulated Xen: `Hypervisor` (domains, memory, grants, event channels) and xenstore
 *   (`XenstoreDaemon`, its socket server and `XenstoreClient`);
 * - a toolstack that plays `xl`: `Toolstack` creates driver and guest domains and plugs VBDs
 *   between them (`GuestDisk`);
 * - the two ends, to run in a domain's thread: `Blkfront` (a guest's disk) and `Blkback` (one
 *   VBD's backend), over `attachDomain()` and `connectGuestXenstore()`;
 * - storage for a backend: `openStorage` and the registry's `StorageSpec`;
 * - NBD: `NbdServer` over any `NbdExportDevice`, and `NbdClient`;
 * - the product: `DiskExport`, a guest's disks exported over NBD (`blkif serve`);
 * - the wire format, as `abi` (blkif.h's constants, layouts and codecs).
 */
export const VERSION = '0.1.0';

export * as abi from './abi/index.js';

export { Hypervisor, attachDomain, checkedByDefault, type HypervisorOptions, type XenDomain } from './xen/index.js';
export { XenstoreClient, XenstoreDaemon, XenstoreSocketServer } from './xenstore/index.js';
export { acceptGuestXenstore, connectGuestXenstore, xenbusStateName } from './xenbus/index.js';

export { Toolstack, type DomainProxy, type GuestDisk, type PlugOptions, type ToolstackOptions } from './toolstack/index.js';
export type { GuestApplicationModule, GuestContext } from './toolstack/index.js';

export { Blkfront, BlkfrontError, type BlkfrontDeps, type BlkfrontOptions, type DeviceInfo } from './blkfront/index.js';
export { Blkback, type BlkbackDeps, type BlkbackOptions } from './blkback/index.js';

export { describeStorage, openStorage, storageFromArgument, type BlockStorage, type StorageSpec } from './storage/index.js';

export { NbdClient, NbdServer, nbdUri, type NbdClientOptions, type NbdExportDevice, type NbdServerOptions } from './nbd/index.js';

export { DiskExport, exportDevice, type DiskExportOptions, type DiskExportStatus } from './product/index.js';
