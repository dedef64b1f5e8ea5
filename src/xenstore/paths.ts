// Path rules of xenstored (docs/misc/xenstore.txt "Paths"; xenstored_core.c
// is_valid_nodename()/canonicalize() in Xen 4.17).
import { XENSTORE_REL_PATH_MAX } from './wire.js';

const VALID = /^[A-Za-z0-9\-/_@]*$/;

export function domainPath(domid: number): string {
  return `/local/domain/${domid}`;
}

export function parentOf(path: string): string {
  const i = path.lastIndexOf('/');
  return i <= 0 ? '/' : path.slice(0, i);
}

export function baseName(path: string): string {
  return path.slice(path.lastIndexOf('/') + 1);
}

export function childPath(parent: string, name: string): string {
  return parent === '/' ? `/${name}` : `${parent}/${name}`;
}

/** True when `path` is `ancestor` or lies below it. */
export function isAtOrBelow(path: string, ancestor: string): boolean {
  if (ancestor === '/') return path.startsWith('/');
  return path === ancestor || path.startsWith(ancestor + '/');
}

/**
 * Absolute, validated form of a request path, or undefined when xenstored
 * would answer EINVAL. Relative paths are taken below /local/domain/<domid>;
 * the length limit applies to what follows /local/domain/<id>/.
 */
export function canonicalize(
  path: string,
  domid: number,
  opts: { allowSpecial: boolean; pathMax: number },
): string | undefined {
  if (path.startsWith('@')) {
    if (!opts.allowSpecial || path.length > XENSTORE_REL_PATH_MAX || !VALID.test(path)) return undefined;
    return path;
  }
  const abs = path.startsWith('/') ? path : `${domainPath(domid)}/${path}`;
  if (!VALID.test(abs)) return undefined;
  if (abs.endsWith('/') && abs !== '/') return undefined;
  if (abs.includes('//')) return undefined;
  const m = /^\/local\/domain\/\d{1,5}\//.exec(abs);
  const localOff = m ? m[0].length : 0;
  if (abs.length > localOff + opts.pathMax) return undefined;
  return abs;
}
