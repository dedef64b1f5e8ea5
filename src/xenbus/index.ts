// The xenbus layer's front door: Xen's states and paths whole, the rest as other layers use it.
export * from './state.js';
export * from './paths.js';
export { allocEvtchn, grantRing, readNodes, readState, switchState, waitForState, writeNodes } from './xenbus.js';
export { acceptGuestXenstore, connectGuestXenstore } from './xenstore-link.js';
export { XenbusDevice } from './device.js';
export { everyPeriod, periodicJobs } from './periodic.js';
