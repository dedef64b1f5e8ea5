/**
 * A cpio archive in the "newc" format, the one the Linux kernel unpacks as an initramfs
 * (Documentation/driver-api/early-userspace/buffer-format.rst): a 110-byte ASCII header per
 * entry, name and data each padded to 4 bytes, closed by `TRAILER!!!`. Archives concatenate:
 * the kernel unpacks one after the other, so a per-test file can be appended to a cached base.
 */

export type CpioEntry =
  | { readonly path: string; readonly kind: 'dir'; readonly mode?: number }
  | { readonly path: string; readonly kind: 'file'; readonly data: Uint8Array; readonly mode?: number }
  | { readonly path: string; readonly kind: 'symlink'; readonly target: string };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;

function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

function header(ino: number, mode: number, size: number, nameSize: number): string {
  const hex = (v: number) => v.toString(16).padStart(8, '0');
  // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check
  return '070701' + [ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, nameSize, 0].map(hex).join('');
}

/** The archive of `entries`, in order (a directory must come before what it holds). */
export function cpioNewc(entries: readonly CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  const put = (name: string, mode: number, data: Uint8Array) => {
    const nameBytes = Buffer.from(`${name}\0`);
    const head = Buffer.from(header(ino++, mode, data.length, nameBytes.length));
    parts.push(head, nameBytes, Buffer.alloc(pad4(head.length + nameBytes.length)));
    parts.push(Buffer.from(data.buffer, data.byteOffset, data.length), Buffer.alloc(pad4(data.length)));
  };
  for (const e of entries) {
    const name = e.path.replace(/^\/+/, '');
    if (e.kind === 'dir') put(name, S_IFDIR | (e.mode ?? 0o755), new Uint8Array(0));
    else if (e.kind === 'file') put(name, S_IFREG | (e.mode ?? 0o644), e.data);
    else put(name, S_IFLNK | 0o777, Buffer.from(e.target));
  }
  put('TRAILER!!!', 0, new Uint8Array(0));
  return Buffer.concat(parts);
}
