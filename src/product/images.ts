/**
 * What an export serves: each IMAGE argument as whatever kind of storage recognises it
 * (storage/registry.ts: a path, an NBD URI), or default images `vbdN.img` in a data directory;
 * and each image file made ready (created sparse, reused, or resized only when forced, as
 * qemu-img create and truncate would).
 */
import { existsSync, mkdirSync, statSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { FileStorage, describeStorage, storageFromArgument, type StorageSpec } from '../storage/index.js';

/** A new default image's size. */
export const DEFAULT_IMAGE_SIZE = 1024 ** 3;

/** A request the export cannot serve as given (the CLI reports it as a usage error). */
export class ExportSetupError extends Error {
  override name = 'ExportSetupError';
}

export interface ImageChoice {
  /** IMAGE arguments; none means `vbds` default images in `dataDir`. */
  readonly images: readonly string[];
  readonly vbds?: number;
  readonly dataDir: string;
  readonly sectorSize: 512 | 4096;
  readonly readOnly: boolean;
  /** Connections to a remote NBD export. */
  readonly connections: number;
}

/** The storage of each VBD, one per IMAGE (or per default image). */
export function exportStorage(c: ImageChoice): StorageSpec[] {
  const { sectorSize, readOnly } = c;
  if (c.images.length > 0 && c.vbds !== undefined && c.vbds !== c.images.length) {
    throw new ExportSetupError(`--vbds ${c.vbds} but ${c.images.length} image(s) given: give one image per VBD, or none`);
  }
  if (c.images.length > 0) {
    return c.images.map((p) => {
      const spec = storageFromArgument(p, { sectorSize, readOnly, connections: c.connections });
      if (spec === undefined) throw new ExportSetupError(`${p}: neither an image file nor an NBD export (nbd://, nbds://, nbd+unix://, nbds+unix://)`);
      return spec;
    });
  }
  mkdirSync(c.dataDir, { recursive: true });
  return Array.from({ length: c.vbds ?? 1 }, (_, i) => ({ kind: 'file', path: join(c.dataDir, `vbd${i}.img`), sectorSize, readOnly }));
}

/**
 * Makes each image ready: a file is created (sparse) if missing and allowed, reused as it is,
 * and resized to `size` only with `force`; a remote export is taken as it is. Returns one line
 * per image saying what was done.
 */
export async function prepareImages(
  storage: readonly StorageSpec[], o: { size?: number; force: boolean; createIfMissing: boolean },
): Promise<{ image: string; done: string }[]> {
  const lines: { image: string; done: string }[] = [];
  for (const s of storage) {
    if (s.kind === 'file') {
      lines.push({ image: s.path, done: await prepareImage(s.path, o.size, o.force, o.createIfMissing) });
    } else {
      const name = describeStorage(s);
      if (o.size !== undefined) throw new ExportSetupError(`--size does not apply to a remote export (${name})`);
      lines.push({ image: name, done: `using remote export ${name}` });
    }
  }
  return lines;
}

async function prepareImage(path: string, size: number | undefined, force: boolean, createIfMissing: boolean): Promise<string> {
  if (!existsSync(path)) {
    if (!createIfMissing && size === undefined) throw new ExportSetupError(`${path} does not exist (give --size to create it)`);
    await FileStorage.create(path, size ?? DEFAULT_IMAGE_SIZE);
    return `created ${path} (${formatSize(size ?? DEFAULT_IMAGE_SIZE)}, sparse)`;
  }
  const st = statSync(path);
  if (!st.isFile()) throw new ExportSetupError(`${path} is not a regular file`);
  if (size === undefined || size === st.size) return `using ${path} (${formatSize(st.size)})`;
  if (!force) {
    throw new ExportSetupError(`${path} holds ${formatSize(st.size)}; refusing to ${size < st.size ? 'shrink' : 'resize'} it to ${formatSize(size)} without --force`);
  }
  truncateSync(path, size);
  return `resized ${path} from ${formatSize(st.size)} to ${formatSize(size)}`;
}

/** 1073741824 -> "1 GiB", for messages. */
function formatSize(n: number): string {
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1 && v % 1024 === 0) { v /= 1024; i++; }
  return `${v} ${units[i]}`;
}
