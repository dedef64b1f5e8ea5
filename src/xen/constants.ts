// Every Xen constant the emulated hypervisor uses, with the value Xen's public headers give
// (/usr/include/xen/{xen,grant_table,event_channel}.h) and Linux errno values for hypercall
// return codes. Emulator sizing knobs (not Xen ABI) are at the end, marked as ours.

/** xen.h: page size of x86 Xen guests. */
export const XEN_PAGE_SHIFT = 12;
export const XEN_PAGE_SIZE = 1 << XEN_PAGE_SHIFT;

// xen.h, "DOMID_FIRST_RESERVED": ids from here up are not ordinary domains.
export const DOMID_FIRST_RESERVED = 0x7ff0;
export const DOMID_SELF = 0x7ff0;
export const DOMID_IO = 0x7ff1;
export const DOMID_XEN = 0x7ff2;
export const DOMID_INVALID = 0x7ff4;

// grant_table.h, "GTF_* : grant entry flags" (struct grant_entry_v1.flags).
export const GTF_invalid = 0 << 0;
export const GTF_permit_access = 1 << 0;
export const GTF_accept_transfer = 2 << 0;
export const GTF_transitive = 3 << 0;
export const GTF_type_mask = 3 << 0;
export const GTF_readonly = 1 << 2;
export const GTF_reading = 1 << 3;
export const GTF_writing = 1 << 4;
export const GTF_PWT = 1 << 5;
export const GTF_PCD = 1 << 6;
export const GTF_PAT = 1 << 7;
export const GTF_sub_page = 1 << 8;

// grant_table.h: the first entries are reserved for the toolstack (console, xenstore).
export const GNTTAB_NR_RESERVED_ENTRIES = 8;
export const GNTTAB_RESERVED_CONSOLE = 0;
export const GNTTAB_RESERVED_XENSTORE = 1;

// grant_table.h, "GNTTABOP_*" command numbers.
export const GNTTABOP_map_grant_ref = 0;
export const GNTTABOP_unmap_grant_ref = 1;
export const GNTTABOP_setup_table = 2;
export const GNTTABOP_dump_table = 3;
export const GNTTABOP_transfer = 4;
export const GNTTABOP_copy = 5;
export const GNTTABOP_query_size = 6;

// grant_table.h, "GNTMAP_*": flags of gnttab_map_grant_ref.
export const GNTMAP_device_map = 1 << 0;
export const GNTMAP_host_map = 1 << 1;
export const GNTMAP_readonly = 1 << 2;
export const GNTMAP_application_map = 1 << 3;
export const GNTMAP_contains_pte = 1 << 4;

// grant_table.h, "GNTCOPY_*": which side of a gnttab_copy is a grant reference.
export const GNTCOPY_source_gref = 1 << 0;
export const GNTCOPY_dest_gref = 1 << 1;

// grant_table.h, "GNTST_*": per-op status of grant-table operations.
export const GNTST_okay = 0;
export const GNTST_general_error = -1;
export const GNTST_bad_domain = -2;
export const GNTST_bad_gntref = -3;
export const GNTST_bad_handle = -4;
export const GNTST_bad_virt_addr = -5;
export const GNTST_bad_dev_addr = -6;
export const GNTST_no_device_space = -7;
export const GNTST_permission_denied = -8;
export const GNTST_bad_page = -9;
export const GNTST_bad_copy_arg = -10;
export const GNTST_address_too_big = -11;
export const GNTST_eagain = -12;
export const GNTST_no_space = -13;

// event_channel.h, "EVTCHNOP_*" command numbers.
export const EVTCHNOP_bind_interdomain = 0;
export const EVTCHNOP_close = 3;
export const EVTCHNOP_send = 4;
export const EVTCHNOP_status = 5;
export const EVTCHNOP_alloc_unbound = 6;
export const EVTCHNOP_bind_vcpu = 8;
export const EVTCHNOP_unmask = 9;

// event_channel.h, "EVTCHNSTAT_*": port states reported by EVTCHNOP_status.
export const EVTCHNSTAT_closed = 0;
export const EVTCHNSTAT_unbound = 1;
export const EVTCHNSTAT_interdomain = 2;
export const EVTCHNSTAT_pirq = 3;
export const EVTCHNSTAT_virq = 4;
export const EVTCHNSTAT_ipi = 5;

// Linux errno values: event-channel hypercalls return -errno (one list, abi/errno.ts).
export { EBUSY, EINVAL, ENOENT, ENOSPC, EPERM, ESRCH } from '../abi/errno.js';

// ---- Emulator sizing (ours, not Xen ABI) ----
/**
 * Domain slots in the shared tables (live domains plus zombies whose grants are still mapped),
 * by default; a Hypervisor may be made with more (`maxDomains`, each slot ~2 MiB of tables).
 */
export const MAX_DOMAINS = 32;
/** v1 grant entries per domain: Xen's default max_grant_frames (64) x 512 entries, room for a ring of indirect requests. */
export const NR_GRANT_ENTRIES = 32768;
/** Mapping handles per domain (maptrack). */
export const NR_MAPTRACK = 32768;
/** vCPUs per domain (Xen's HVM limit): vCPU 0 is the domain's own thread, the others are threads it starts (startVcpu). */
export const MAX_VCPUS = 128;
/** Event-channel ports per domain; port 0 is never handed out, as on Xen. */
export const NR_EVTCHN_PORTS = 1024;
/** Default memory of a domain, in pages (4 MiB). */
export const DEFAULT_MEMORY_PAGES = 1024;
/** Default adaptive-polling budget of a waiting domain, in microseconds. */
export const DEFAULT_POLL_MICROS = 50;
