// The product layer's front door: what other layers (and their tests) use; the rest is internal.
export { DiskExport, type DiskExportOptions, type DiskExportStatus } from './disk-export.js';
export { exportDevice } from './nbd-device.js';
export { backendMemory, sharedFrontendOptions } from './sizing.js';
export { randomBackendFeatures } from './migration.js';
export { ExportSetupError, exportStorage, prepareImages } from './images.js';
