// Public surface of the emulated hypervisor layer.
export * from './constants.js';
export { Hypervisor } from './hypervisor.js';
export type { HypervisorOptions, CreateDomainOptions, DomainHandle, DomainExit } from './hypervisor.js';
export type { StartVcpuOptions, VcpuExit, VcpuHandle } from './domain.js';
export { attachDomain, XenDomain, CounterView } from './domain.js';
export { nameThread, threadComm, TASK_COMM_LEN } from './thread-name.js';
export { DomainMemory } from './memory.js';
export { GrantTable } from './grant-table.js';
export type { GntMapOp, GntMapResult, GntCopyOp, GntCopyPtr } from './grant-table.js';
export { EventChannels } from './event-channel.js';
export type { EvtchnStatus, WaitOptions } from './event-channel.js';
export type { XenCounters } from './shared-tables.js';
export { checkedByDefault, VIOLATION_KINDS } from './checked.js';
export type { ViolationKind, XenViolation } from './checked.js';
export { canStartVcpus } from './access.js';
export type { XenAccess, XenAccessWithVcpus, GrantAccess, EventAccess, MemoryAccess } from './access.js';
