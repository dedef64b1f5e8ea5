/**
 * NBD URIs, as qemu, libnbd and nbdkit write them
 * (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md), for a client to find its
 * server: `nbd://HOST[:PORT]/EXPORT` (TCP, port 10809 by default) and
 * `nbd+unix:///EXPORT?socket=PATH` (a Unix socket). The export name is the path without its
 * leading slash, percent-decoded. TLS (`nbds`, `nbds+unix`) and vsock are not supported.
 */

/** The port an NBD server listens on unless told otherwise. */
export const NBD_DEFAULT_PORT = 10809;

/** Where an NBD server is, and which of its exports to use. */
export type NbdTarget =
  | { readonly transport: 'tcp'; readonly host: string; readonly port: number; readonly exportName: string }
  | { readonly transport: 'unix'; readonly path: string; readonly exportName: string };

/** A URI that does not name an NBD server this module can reach. */
export class NbdUriError extends Error {
  override name = 'NbdUriError';
}

/** Parses an NBD URI (WHATWG URL rules); throws NbdUriError for anything else. */
export function parseNbdUri(uri: string): NbdTarget {
  let url: URL;
  try {
    url = new URL(uri);
  } catch {
    throw new NbdUriError(`"${uri}" is not a URI`);
  }
  const scheme = url.protocol.slice(0, -1);
  if (scheme === 'nbds' || scheme === 'nbds+unix') throw new NbdUriError(`${uri}: TLS (${scheme}://) is not supported; use nbd:// or nbd+unix://`);
  if (scheme !== 'nbd' && scheme !== 'nbd+unix') throw new NbdUriError(`${uri}: not an NBD URI (use nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)`);
  if (url.username !== '' || url.password !== '') throw new NbdUriError(`${uri}: NBD URIs carry no user or password`);
  let exportName: string;
  try {
    exportName = decodeURIComponent(url.pathname.replace(/^\//, ''));
  } catch {
    throw new NbdUriError(`${uri}: the export name is not valid percent-encoding`);
  }
  if (scheme === 'nbd+unix') {
    if (url.host !== '') throw new NbdUriError(`${uri}: nbd+unix:// takes no host (write nbd+unix:///EXPORT?socket=PATH)`);
    const path = url.searchParams.get('socket');
    if (path === null || path === '') throw new NbdUriError(`${uri}: nbd+unix:// needs ?socket=PATH`);
    return { transport: 'unix', path, exportName };
  }
  // A bracketed IPv6 literal comes back with its brackets; net.connect wants the bare address.
  const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
  if (host === '') throw new NbdUriError(`${uri}: nbd:// needs a host`);
  const port = url.port === '' ? NBD_DEFAULT_PORT : Number(url.port);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new NbdUriError(`${uri}: port ${url.port} is not a TCP port`);
  return { transport: 'tcp', host, port, exportName };
}

/** The canonical URI of a target (what logs and error messages name). */
export function formatNbdUri(t: NbdTarget): string {
  const name = encodeURIComponent(t.exportName);
  if (t.transport === 'unix') return `nbd+unix:///${name}?socket=${encodeURIComponent(t.path)}`;
  const host = t.host.includes(':') ? `[${t.host}]` : t.host;
  return `nbd://${host}:${t.port}/${name}`;
}
