/**
 * Linux errno values (asm-generic/errno-base.h, errno.h), where the protocol speaks errno: Xen's
 * hypercalls return -errno, and a xenbus driver that gives up writes "<errno> <message>" to its
 * `error` node (Linux `xenbus_dev_fatal`). The numbers are x86's and every Linux port's but alpha,
 * mips, parisc and sparc, which Xen does not run on.
 */
export const EPERM = 1;
export const ENOENT = 2;
export const ESRCH = 3;
export const EIO = 5;
export const ENOMEM = 12;
export const EBUSY = 16;
export const EINVAL = 22;
export const ENOSPC = 28;
export const ENOSYS = 38;
